"""The order-status state machine: trading.order_transitions, enforced by a trigger."""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from db.errors import describe

STATES = ["created", "in_flight", "submitted", "partially_filled", "filled", "cancelled",
          "rejected", "expired"]
TERMINAL = ["filled", "cancelled", "rejected", "expired"]
# The legal transitions, pinned: a change to trading.order_transitions must change this too.
LEGAL = {
    ("created", "in_flight"), ("created", "submitted"), ("created", "rejected"),
    ("created", "cancelled"),
    # a fill may arrive before the broker's acknowledgement (migration 0002_01)
    ("created", "partially_filled"), ("created", "filled"), ("created", "expired"),
    ("in_flight", "submitted"), ("in_flight", "partially_filled"), ("in_flight", "filled"),
    ("in_flight", "rejected"), ("in_flight", "cancelled"), ("in_flight", "expired"),
    ("submitted", "in_flight"), ("submitted", "partially_filled"), ("submitted", "filled"),
    ("submitted", "cancelled"), ("submitted", "rejected"), ("submitted", "expired"),
    ("partially_filled", "partially_filled"), ("partially_filled", "in_flight"),
    ("partially_filled", "filled"), ("partially_filled", "cancelled"),
    ("partially_filled", "expired"),
}
ILLEGAL = sorted((a, b) for a, b in itertools.product(STATES, STATES)
                 if a != b and (a, b) not in LEGAL)


@pytest.fixture(scope="module")
def mconn(mod_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(mod_url, autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def refs(mconn: psycopg.Connection) -> dict[str, int]:
    def one(q: str) -> int:
        row = mconn.execute(q).fetchone()
        assert row is not None
        return int(row[0])

    return {
        "account": one("INSERT INTO trading.accounts (name, environment, base_currency, "
                       "starting_cash, cash) VALUES ('ot-1', 'paper', 'USD', 1000, 1000) "
                       "RETURNING account_id"),
        "account2": one("INSERT INTO trading.accounts (name, environment, base_currency, "
                        "starting_cash, cash) VALUES ('ot-2', 'paper', 'USD', 1000, 1000) "
                        "RETURNING account_id"),
        "instrument": one("INSERT INTO market.instruments (symbol, venue, market, base_currency, "
                          "quote_currency, price_tick, quantity_step, calendar_id) VALUES "
                          "('BTC/USDT', 'binance', 'crypto', 'BTC', 'USDT', 0.01, 0.0001, "
                          "'CRYPTO_24X7') RETURNING instrument_id"),
        "instrument2": one("INSERT INTO market.instruments (symbol, venue, market, base_currency, "
                           "quote_currency, price_tick, quantity_step, calendar_id) VALUES "
                           "('ETH/USDT', 'binance', 'crypto', 'ETH', 'USDT', 0.01, 0.0001, "
                           "'CRYPTO_24X7') RETURNING instrument_id"),
        "strategy": one("INSERT INTO trading.strategies (name) VALUES ('ot_a') "
                        "RETURNING strategy_id"),
        "strategy2": one("INSERT INTO trading.strategies (name) VALUES ('ot_b') "
                         "RETURNING strategy_id"),
    }


def new_order(conn: psycopg.Connection, refs: dict[str, int], status: str | None = None) -> int:
    cols = "account_id, instrument_id, strategy_id, client_order_id, side, order_type, quantity"
    vals = "%s, %s, %s, %s, 'buy', 'market', 10"
    params: list[object] = [refs["account"], refs["instrument"], refs["strategy"],
                            f"ot-{uuid.uuid4().hex[:20]}"]
    if status is not None:
        cols += ", status"
        vals += ", %s"
        params.append(status)
    row = conn.execute(f"INSERT INTO trading.orders ({cols}) VALUES ({vals}) RETURNING order_id",
                       params).fetchone()
    assert row is not None
    return int(row[0])


def status_of(conn: psycopg.Connection, order_id: int) -> tuple[str, object]:
    row = conn.execute("SELECT status::text, filled_quantity FROM trading.orders "
                       "WHERE order_id = %s", (order_id,)).fetchone()
    assert row is not None
    return row[0], row[1]


def path_to(target: str) -> list[str]:
    """The shortest legal walk from created to target (the states after created)."""
    prev: dict[str, str | None] = {"created": None}
    queue = deque(["created"])
    while queue:
        s = queue.popleft()
        for a, b in sorted(LEGAL):
            if a == s and b not in prev:
                prev[b] = s
                queue.append(b)
    assert target in prev, f"{target} is unreachable"
    steps: list[str] = []
    cur: str | None = target
    while cur is not None and cur != "created":
        steps.append(cur)
        cur = prev[cur]
    return list(reversed(steps))


def move(conn: psycopg.Connection, order_id: int, to: str) -> None:
    filled = {"partially_filled": "filled_quantity + 1", "filled": "quantity"}.get(
        to, "filled_quantity")
    conn.execute(f"UPDATE trading.orders SET status = %s, filled_quantity = {filled} "
                 "WHERE order_id = %s", (to, order_id))


def order_in(conn: psycopg.Connection, refs: dict[str, int], state: str) -> int:
    order_id = new_order(conn, refs)
    for step in path_to(state):
        move(conn, order_id, step)
    assert status_of(conn, order_id)[0] == state
    return order_id


# ------------------------------------------------------------------ the table itself
def test_transition_table_is_pinned(mconn: psycopg.Connection) -> None:
    rows = mconn.execute("SELECT from_status::text, to_status::text "
                         "FROM trading.order_transitions").fetchall()
    assert set(rows) == LEGAL
    enum = mconn.execute("SELECT enum_range(NULL::trading.order_status)::text[]").fetchone()
    assert enum is not None and enum[0] == STATES


def test_terminal_states_have_no_way_out() -> None:
    assert not [p for p in LEGAL if p[0] in TERMINAL]
    assert len(ILLEGAL) == 64 - 8 - (len(LEGAL) - 1)


# ------------------------------------------------------------------ inserting
def test_new_order_starts_created(mconn: psycopg.Connection, refs: dict[str, int]) -> None:
    order_id = new_order(mconn, refs)
    assert status_of(mconn, order_id)[0] == "created"
    assert status_of(mconn, new_order(mconn, refs, "created"))[0] == "created"


@pytest.mark.parametrize("status", STATES[1:])
def test_new_order_in_other_state_is_refused(mconn: psycopg.Connection, refs: dict[str, int],
                                             mod_url: str, status: str) -> None:
    before = mconn.execute("SELECT count(*) FROM trading.orders").fetchone()
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        new_order(mconn, refs, status)
    assert exc.value.diag.constraint_name == "order_status_transition"
    assert exc.value.diag.sqlstate == "23514"
    assert f"a new order must start in state created, not {status}" in str(exc.value)
    assert "[SQLSTATE 23514]" in describe(exc.value, mod_url)
    assert mconn.execute("SELECT count(*) FROM trading.orders").fetchone() == before


# ------------------------------------------------------------------ legal walks
@pytest.mark.parametrize("frm,to", sorted(LEGAL))
def test_legal_transition_succeeds(mconn: psycopg.Connection, refs: dict[str, int],
                                   frm: str, to: str) -> None:
    order_id = order_in(mconn, refs, frm)
    before = mconn.execute("SELECT updated_at FROM trading.orders WHERE order_id = %s",
                           (order_id,)).fetchone()
    move(mconn, order_id, to)
    assert status_of(mconn, order_id)[0] == to
    after = mconn.execute("SELECT updated_at FROM trading.orders WHERE order_id = %s",
                          (order_id,)).fetchone()
    assert before is not None and after is not None and after[0] >= before[0]


def test_full_lifecycle(mconn: psycopg.Connection, refs: dict[str, int]) -> None:
    order_id = new_order(mconn, refs)
    for step in ["in_flight", "submitted", "partially_filled", "partially_filled",
                 "in_flight", "partially_filled", "filled"]:
        move(mconn, order_id, step)
    assert status_of(mconn, order_id) == ("filled", 10)


@pytest.mark.parametrize("state", STATES)
def test_same_state_update_is_a_no_op(mconn: psycopg.Connection, refs: dict[str, int],
                                      state: str) -> None:
    order_id = order_in(mconn, refs, state)
    mconn.execute("UPDATE trading.orders SET status = status, reason = 'touched' "
                  "WHERE order_id = %s", (order_id,))
    assert mconn.execute("SELECT status::text, reason FROM trading.orders WHERE order_id = %s",
                         (order_id,)).fetchone() == (state, "touched")


# ------------------------------------------------------------------ illegal pairs
@pytest.mark.parametrize("frm,to", ILLEGAL)
def test_illegal_transition_is_refused(mconn: psycopg.Connection, refs: dict[str, int],
                                       mod_url: str, frm: str, to: str) -> None:
    order_id = order_in(mconn, refs, frm)
    before = status_of(mconn, order_id)
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        mconn.execute("UPDATE trading.orders SET status = %s WHERE order_id = %s",
                      (to, order_id))
    err = exc.value
    assert err.diag.sqlstate == "23514"
    assert err.diag.constraint_name == "order_status_transition"
    assert f"illegal order transition {frm} -> {to} (order {order_id})" in str(err)
    assert "trading.order_transitions" in (err.diag.message_hint or "")
    text = describe(err, mod_url)
    assert f"illegal order transition {frm} -> {to}" in text
    assert "hint: the legal transitions are the rows of trading.order_transitions" in text
    assert status_of(mconn, order_id) == before


@pytest.mark.parametrize("state", TERMINAL)
def test_terminal_state_accepts_no_transition(mconn: psycopg.Connection, refs: dict[str, int],
                                              state: str) -> None:
    order_id = order_in(mconn, refs, state)
    for to in STATES:
        if to == state:
            continue
        with pytest.raises(psycopg.errors.CheckViolation, match=f"{state} -> {to}"):
            mconn.execute("UPDATE trading.orders SET status = %s WHERE order_id = %s",
                          (to, order_id))
    assert status_of(mconn, order_id)[0] == state


def test_refused_transition_in_a_batch_changes_nothing(mconn: psycopg.Connection,
                                                       refs: dict[str, int]) -> None:
    ok = order_in(mconn, refs, "submitted")
    done = order_in(mconn, refs, "filled")
    with pytest.raises(psycopg.errors.CheckViolation):
        mconn.execute("UPDATE trading.orders SET status = 'cancelled' WHERE order_id IN (%s, %s)",
                      (ok, done))
    assert status_of(mconn, ok)[0] == "submitted"
    assert status_of(mconn, done)[0] == "filled"


# ------------------------------------------------------------------ identity
@pytest.mark.parametrize("column,ref", [
    ("account_id", "account2"), ("instrument_id", "instrument2"), ("strategy_id", "strategy2"),
    ("strategy_id", None), ("side", "sell"), ("client_order_id", "other-client-id"),
])
@pytest.mark.parametrize("state", ["created", "submitted", "filled"])
def test_identity_cannot_change(mconn: psycopg.Connection, refs: dict[str, int], column: str,
                                ref: str | None, state: str) -> None:
    order_id = order_in(mconn, refs, state)
    before = mconn.execute("SELECT * FROM trading.orders WHERE order_id = %s",
                           (order_id,)).fetchone()
    value: object = refs.get(ref, ref) if ref is not None else None
    if column == "client_order_id":
        value = f"{ref}-{order_id}"
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        mconn.execute(sql.SQL("UPDATE trading.orders SET {} = %s WHERE order_id = %s").format(
            sql.Identifier(column)), (value, order_id))
    assert exc.value.diag.constraint_name == "order_identity_immutable"
    assert "cannot change" in str(exc.value)
    assert mconn.execute("SELECT * FROM trading.orders WHERE order_id = %s",
                         (order_id,)).fetchone() == before


def test_manual_order_cannot_gain_a_strategy(mconn: psycopg.Connection,
                                             refs: dict[str, int]) -> None:
    order_id = new_order(mconn, refs)
    mconn.execute("UPDATE trading.orders SET status = 'submitted' WHERE order_id = %s",
                  (order_id,))
    row = mconn.execute(
        "INSERT INTO trading.orders (account_id, instrument_id, client_order_id, side, "
        "order_type, quantity) VALUES (%s, %s, %s, 'buy', 'market', 1) RETURNING order_id",
        (refs["account"], refs["instrument"], f"manual-{order_id}")).fetchone()
    assert row is not None
    with pytest.raises(psycopg.errors.CheckViolation, match="cannot change"):
        mconn.execute("UPDATE trading.orders SET strategy_id = %s WHERE order_id = %s",
                      (refs["strategy"], row[0]))


def test_order_id_cannot_be_rewritten(mconn: psycopg.Connection, refs: dict[str, int]) -> None:
    order_id = new_order(mconn, refs)
    with pytest.raises(psycopg.errors.GeneratedAlways):
        mconn.execute("UPDATE trading.orders SET order_id = order_id + 100000 "
                      "WHERE order_id = %s", (order_id,))


# ------------------------------------------------------------------ quantities
@pytest.mark.parametrize("state", ["in_flight", "submitted", "partially_filled"])
def test_filled_quantity_cannot_decrease(mconn: psycopg.Connection, refs: dict[str, int],
                                         state: str) -> None:
    order_id = order_in(mconn, refs, state)
    mconn.execute("UPDATE trading.orders SET filled_quantity = filled_quantity + 2 "
                  "WHERE order_id = %s", (order_id,))
    before = status_of(mconn, order_id)
    with pytest.raises(psycopg.errors.CheckViolation, match="cannot decrease") as exc:
        mconn.execute("UPDATE trading.orders SET filled_quantity = filled_quantity - 1 "
                      "WHERE order_id = %s", (order_id,))
    assert exc.value.diag.constraint_name == "order_filled_quantity_monotonic"
    assert status_of(mconn, order_id) == before


@pytest.mark.parametrize("state", TERMINAL)
@pytest.mark.parametrize("change", ["filled_quantity = filled_quantity + 1",
                                    "quantity = quantity + 1"])
def test_terminal_order_quantities_frozen(mconn: psycopg.Connection, refs: dict[str, int],
                                          state: str, change: str) -> None:
    order_id = order_in(mconn, refs, state)
    before = status_of(mconn, order_id)
    # the trigger runs before the CHECK constraints: it refuses even filled 11 of 10
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        mconn.execute(f"UPDATE trading.orders SET {change} WHERE order_id = %s", (order_id,))
    assert exc.value.diag.constraint_name == "order_terminal_immutable"
    assert f"is {state}" in str(exc.value)
    assert status_of(mconn, order_id) == before
    # what is not a quantity may still be annotated
    mconn.execute("UPDATE trading.orders SET reason = 'reconciled' WHERE order_id = %s",
                  (order_id,))
