"""The account controls (migration 0002_06 and the closing orders of 0002_05): the
breaker (SOFT, HARD, FREEZE, reset), two-step operator mode, advisory, close_position /
close_all and manual orders. Every outcome is read back from the database."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D

import psycopg
import pytest
from psycopg.types.json import Jsonb
from test_protection import T0, fill  # fills dated in market time


def add_instrument(conn: psycopg.Connection, symbol: str) -> int:
    return conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES (%s, 'test', 'crypto', %s, 'USD', 0.01, 1, 1, 'CRYPTO_24X7')"
        " RETURNING instrument_id", (symbol, symbol[:-3])).fetchone()[0]


def add_account(conn: psycopg.Connection, name: str, environment: str = "paper",
                mode: str = "operator", cash: int = 100000) -> int:
    return conn.execute("SELECT trading.create_account(%s, %s, %s, %s)",
                        (name, environment, mode, cash)).fetchone()[0]


def manual(conn: psycopg.Connection, **spec) -> dict:
    return conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb(spec),)).fetchone()[0]


def hold(conn: psycopg.Connection, account: str, symbol: str, qty: int, price: int) -> None:
    """A net position of qty at price (a manual limit buy and its fill)."""
    r = manual(conn, account=account, symbol=symbol, side="buy", quantity=qty, type="limit",
               limit_price=price)
    assert r["status"] == "approved", r
    fill(conn, r["order_id"], f"f-{r['order_id']}", qty, price)


def signal(conn: psycopg.Connection, **fields) -> dict:
    return conn.execute("SELECT trading.submit_signal(%s)", (Jsonb(fields),)).fetchone()[0]


def breaker(conn: psycopg.Connection, account_id: int) -> str:
    return conn.execute("SELECT mode::text FROM risk.breaker_state WHERE account_id = %s",
                        (account_id,)).fetchone()[0]


def closing_orders(conn: psycopg.Connection, account_id: int) -> list[tuple]:
    return conn.execute(
        "SELECT i.symbol, o.side::text, o.quantity, o.reduce_only, o.trigger::text"
        " FROM trading.orders o JOIN market.instruments i USING (instrument_id)"
        " WHERE o.account_id = %s AND o.trigger IN ('breaker', 'close') ORDER BY o.order_id",
        (account_id,)).fetchall()


def audit_types(conn: psycopg.Connection, account_id: int) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT event_type FROM audit.events WHERE entity = 'trading.accounts'"
        " AND entity_id = %s ORDER BY event_id", (str(account_id),))]


def risk_events(conn: psycopg.Connection, account_id: int) -> list[tuple]:
    return conn.execute("SELECT severity::text, event_type, details->>'mode' FROM risk.events"
                        " WHERE account_id = %s ORDER BY event_id", (account_id,)).fetchall()


@pytest.fixture
def acct(conn: psycopg.Connection) -> int:
    """Paper operator account P (100,000 USD) with a strategy s1 buying 10 units; BTCUSD
    with a bar at 100."""
    acc = add_account(conn, "P")
    inst = add_instrument(conn, "BTCUSD")
    conn.execute("INSERT INTO market.bars VALUES (%s, '1m', %s, 100, 100, 100, 100, 1)",
                 (inst, T0))
    conn.execute("SELECT trading.assign_strategy('P', 's1', 1, 'fixed_quantity', %s)",
                 (Jsonb({"quantity": 10}),))
    return acc


def buy_filled(conn: psycopg.Connection, strategy: str = "s1") -> int:
    r = signal(conn, account="P", strategy=strategy, symbol="BTCUSD", action="buy")
    assert r["status"] == "approved", r
    fill(conn, r["order_id"], f"f-{r['order_id']}", 10, 100)
    return r["order_id"]


# ------------------------------------------------------------------------------ breaker


def test_soft_stops_entries_but_lets_closes_through(conn, acct):
    buy_filled(conn)
    r = conn.execute("SELECT risk.trip_breaker('P', 'soft', 'manual test')").fetchone()[0]
    assert (r["mode"], r["account"]) == ("SOFT", "P")
    assert breaker(conn, acct) == "SOFT"
    assert conn.execute("SELECT reason, tripped_by FROM risk.breaker_state WHERE account_id = %s",
                        (acct,)).fetchone() == ("manual test", "postgres")
    conn.execute("SELECT trading.assign_strategy('P', 's2', 1, 'fixed_quantity', %s)",
                 (Jsonb({"quantity": 1}),))
    r = signal(conn, account="P", strategy="s2", symbol="BTCUSD", action="buy")
    assert (r["status"], r["reason_code"], r["order_id"]) == ("rejected", "BREAKER_SOFT", None)
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="close")
    assert (r["status"], r["side"], r["quantity"]) == ("approved", "sell", 10)
    # SOFT sends no closing orders of its own
    assert closing_orders(conn, acct) == []
    assert risk_events(conn, acct) == [("critical", "BREAKER_MANUAL", "SOFT")]
    assert "risk.breaker_tripped" in audit_types(conn, acct)


def test_hard_closes_every_position_riskiest_first(conn):
    acc = add_account(conn, "H")
    prices = {"AAAUSD": (10, 100, 90), "BBBUSD": (10, 100, 80), "CCCUSD": (1, 1000, 1100),
              "DDDUSD": (20, 50, 50), "EEEUSD": (5, 100, 100)}
    for sym, (qty, entry, _) in prices.items():
        add_instrument(conn, sym)
        hold(conn, "H", sym, qty, entry)
    for sym, (_, _, last) in prices.items():   # mark them (the bars trigger)
        conn.execute("INSERT INTO market.bars SELECT instrument_id, '1m', %s, %s, %s, %s, %s,"
                     " 1 FROM market.instruments WHERE symbol = %s",
                     (T0, last, last, last, last, sym))
    # unrealized P&L / exposure: AAA -100/900, BBB -200/800, CCC +100/1100, DDD 0/1000,
    # EEE 0/500 -> BBB, AAA (losses, largest first), DDD, EEE (flat, larger exposure
    # first), CCC (a gain)
    r = conn.execute("SELECT risk.trip_breaker('H', 'HARD', 'flatten')").fetchone()[0]
    assert r["mode"] == "HARD" and r["open_orders"] == 5
    assert closing_orders(conn, acc) == [
        ("BBBUSD", "sell", 10, True, "breaker"), ("AAAUSD", "sell", 10, True, "breaker"),
        ("DDDUSD", "sell", 20, True, "breaker"), ("EEEUSD", "sell", 5, True, "breaker"),
        ("CCCUSD", "sell", 1, True, "breaker")]
    ids = conn.execute("SELECT array_agg(order_id ORDER BY order_id) FROM trading.orders"
                       " WHERE trigger = 'breaker'").fetchone()[0]
    ev = conn.execute("SELECT event_type, details FROM risk.events WHERE account_id = %s",
                      (acc,)).fetchall()
    assert len(ev) == 1 and ev[0][0] == "BREAKER_MANUAL"
    assert ev[0][1]["closing_orders"] == ids and ev[0][1]["previous"] == "OK"
    assert conn.execute("SELECT count(*) FROM pgmq.q_orders WHERE (message->>'order_id')::bigint"
                        " = ANY(%s)", (ids,)).fetchone()[0] == 5
    payload = conn.execute("SELECT payload FROM audit.events WHERE event_type ="
                           " 'risk.breaker_tripped'").fetchone()[0]
    assert payload["mode"] == "HARD" and payload["closing_orders"] == ids
    # entries refused
    r = manual(conn, account="H", symbol="AAAUSD", side="buy", quantity=1, type="limit",
               limit_price=90)
    assert (r["status"], r["reason_code"]) == ("rejected", "BREAKER_HARD")


def test_hard_on_an_advisory_account_sends_no_orders(conn):
    acc = add_account(conn, "H")
    add_instrument(conn, "AAAUSD")
    hold(conn, "H", "AAAUSD", 10, 100)
    conn.execute("SELECT trading.set_advisory('H', 'watch only')")
    conn.execute("SELECT risk.trip_breaker('H', 'HARD', 'flatten')")
    assert breaker(conn, acc) == "HARD" and closing_orders(conn, acc) == []


def test_freeze_refuses_closes_and_signals(conn, acct):
    buy_filled(conn)
    conn.execute("SELECT risk.trip_breaker('P', 'FREEZE', 'exchange incident')")
    assert breaker(conn, acct) == "FREEZE"
    with pytest.raises(psycopg.errors.InsufficientPrivilege,
                       match=r"account P is frozen \(breaker FREEZE\)"):
        conn.execute("SELECT trading.close_position('P', 'BTCUSD')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="frozen"):
        conn.execute("SELECT trading.close_all('P')")
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="close")
    assert (r["status"], r["reason_code"]) == ("rejected", "BREAKER_FREEZE")
    assert "exchange incident" in r["reason"]
    conn.execute("SELECT trading.assign_strategy('P', 's2', 1, 'fixed_quantity', %s)",
                 (Jsonb({"quantity": 1}),))
    r = signal(conn, account="P", strategy="s2", symbol="BTCUSD", action="buy")
    assert (r["status"], r["reason_code"]) == ("rejected", "BREAKER_FREEZE")
    r = manual(conn, account="P", symbol="BTCUSD", side="sell", quantity=10, reduce_only=True)
    assert (r["status"], r["reason_code"]) == ("rejected", "BREAKER_FREEZE")
    # only the entry order exists
    assert conn.execute("SELECT count(*) FROM trading.orders").fetchone()[0] == 1


def test_a_weaker_trip_does_not_downgrade(conn, acct):
    conn.execute("SELECT risk.trip_breaker('P', 'HARD', 'first')")
    r = conn.execute("SELECT risk.trip_breaker('P', 'SOFT', 'second')").fetchone()[0]
    assert r["mode"] == "HARD" and breaker(conn, acct) == "HARD"
    conn.execute("SELECT risk.trip_breaker('P', 'FREEZE', 'third')")
    r = conn.execute("SELECT risk.trip_breaker('P', 'HARD', 'fourth')").fetchone()[0]
    assert r["mode"] == "FREEZE" and breaker(conn, acct) == "FREEZE"
    assert conn.execute("SELECT reason FROM risk.breaker_state WHERE account_id = %s",
                        (acct,)).fetchone()[0] == "third"
    assert [e[2] for e in risk_events(conn, acct)] == ["HARD", "FREEZE"]


def test_trip_needs_a_mode_and_a_reason(conn, acct):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="SOFT, HARD or FREEZE"):
        conn.execute("SELECT risk.trip_breaker('P', 'OK', 'x')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="needs a reason"):
        conn.execute("SELECT risk.trip_breaker('P', 'SOFT', '  ')")
    assert breaker(conn, acct) == "OK" and risk_events(conn, acct) == []


def test_reset_needs_the_exact_confirmation(conn, acct):
    conn.execute("SELECT risk.trip_breaker('P', 'HARD', 'test')")
    n_audit = conn.execute("SELECT count(*) FROM audit.events").fetchone()[0]
    for wrong in ("RESET p", "reset P", "RESET", "RESET P ", "", None):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="'RESET P'"):
            conn.execute("SELECT risk.reset_breaker('P', %s)", (wrong,))
    assert breaker(conn, acct) == "HARD"
    assert conn.execute("SELECT count(*) FROM audit.events").fetchone()[0] == n_audit
    assert [e[1] for e in risk_events(conn, acct)] == ["BREAKER_MANUAL"]
    r = conn.execute("SELECT risk.reset_breaker('P', 'RESET P')").fetchone()[0]
    assert (r["mode"], r["previous"]) == ("OK", "HARD")
    assert conn.execute("SELECT mode::text, reason, tripped_at FROM risk.breaker_state"
                        " WHERE account_id = %s", (acct,)).fetchone() == ("OK", None, None)
    assert [e[1] for e in risk_events(conn, acct)] == ["BREAKER_MANUAL", "BREAKER_RESET"]
    assert audit_types(conn, acct)[-2:] == ["risk.breaker_tripped", "risk.breaker_reset"]
    # entries flow again
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="buy")
    assert r["status"] == "approved"


def test_the_api_role_runs_the_controls(conn, acct):
    conn.execute("SET ROLE mmats_api")
    try:
        conn.execute("SELECT risk.trip_breaker('P', 'SOFT', 'from the api')")
        conn.execute("SELECT risk.reset_breaker('P', 'RESET P')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT trading.on_bar(1, '1m', now(), 1, 1, 1, 1)")
    finally:
        conn.execute("RESET ROLE")
    assert [e[1] for e in risk_events(conn, acct)] == ["BREAKER_MANUAL", "BREAKER_RESET"]
    assert conn.execute("SELECT actor FROM audit.events WHERE event_type = 'risk.breaker_reset'"
                        ).fetchone()[0] == "postgres"  # session_user


# ------------------------------------------------------------------------------ modes


def test_operator_mode_in_two_steps(conn):
    acc = add_account(conn, "A", mode="advisory")
    token = conn.execute("SELECT trading.request_operator_mode('A')").fetchone()[0]
    assert len(token) == 64
    row = conn.execute("SELECT requested_by, expires_at - requested_at FROM trading.mode_requests"
                       " WHERE account_id = %s", (acc,)).fetchone()
    assert row[0] == "postgres" and row[1].total_seconds() == 300
    assert token not in str(conn.execute("SELECT token_hash FROM trading.mode_requests"
                                         ).fetchone()[0])
    for wrong in (token[:-1] + ("0" if token[-1] != "0" else "1"), "", None):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no valid request"):
            conn.execute("SELECT trading.confirm_operator_mode('A', %s)", (wrong,))
    assert conn.execute("SELECT mode::text FROM trading.accounts").fetchone()[0] == "advisory"
    r = conn.execute("SELECT trading.confirm_operator_mode('A', %s)", (token,)).fetchone()[0]
    assert r == {"account": "A", "mode": "operator"}
    assert conn.execute("SELECT mode::text FROM trading.accounts").fetchone()[0] == "operator"
    assert conn.execute("SELECT count(*) FROM trading.mode_requests").fetchone()[0] == 0
    assert audit_types(conn, acc) == ["account.created", "control.operator_requested",
                                      "control.operator_confirmed"]
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="already in operator mode"):
        conn.execute("SELECT trading.request_operator_mode('A')")


def test_an_expired_request_is_refused(conn):
    add_account(conn, "A", mode="advisory")
    token = conn.execute("SELECT trading.request_operator_mode('A')").fetchone()[0]
    conn.execute("UPDATE trading.mode_requests SET expires_at = now() - interval '1 second'")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="expires after 5 minutes"):
        conn.execute("SELECT trading.confirm_operator_mode('A', %s)", (token,))
    assert conn.execute("SELECT mode::text FROM trading.accounts").fetchone()[0] == "advisory"
    # a new request replaces the old one; the old token is no good
    token2 = conn.execute("SELECT trading.request_operator_mode('A')").fetchone()[0]
    assert token2 != token
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SELECT trading.confirm_operator_mode('A', %s)", (token,))
    conn.execute("SELECT trading.confirm_operator_mode('A', %s)", (token2,))
    assert conn.execute("SELECT mode::text FROM trading.accounts").fetchone()[0] == "operator"


def test_a_live_account_needs_live_credentials(conn):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="starts in advisory mode"):
        conn.execute("SELECT trading.create_account('L', 'live', 'operator', 1000)")
    assert conn.execute("SELECT count(*) FROM trading.accounts").fetchone()[0] == 0
    acc = add_account(conn, "L", environment="live", mode="advisory")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no credentials marked live"):
        conn.execute("SELECT trading.request_operator_mode('L')")
    conn.execute("INSERT INTO trading.credentials (account_id, venue, label, is_live, endpoint)"
                 " VALUES (%s, 'binance', 'testnet', false, 'testnet')", (acc,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no credentials marked live"):
        conn.execute("SELECT trading.request_operator_mode('L')")
    assert conn.execute("SELECT count(*) FROM trading.mode_requests").fetchone()[0] == 0
    conn.execute("INSERT INTO trading.credentials (account_id, venue, label, is_live, endpoint)"
                 " VALUES (%s, 'binance', 'main', true, 'live')", (acc,))
    token = conn.execute("SELECT trading.request_operator_mode('L')").fetchone()[0]
    conn.execute("SELECT trading.confirm_operator_mode('L', %s)", (token,))
    assert conn.execute("SELECT mode::text FROM trading.accounts").fetchone()[0] == "operator"


def test_set_advisory_stops_orders(conn, acct):
    r = conn.execute("SELECT trading.set_advisory('P', 'going on holiday')").fetchone()[0]
    assert r == {"account": "P", "mode": "advisory"}
    assert conn.execute("SELECT mode::text FROM trading.accounts").fetchone()[0] == "advisory"
    payload = conn.execute("SELECT payload FROM audit.events WHERE event_type ="
                           " 'control.advisory'").fetchone()[0]
    assert payload == {"reason": "going on holiday", "previous": "operator"}
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="buy")
    assert (r["status"], r["order_id"]) == ("advisory", None)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="advisory mode"):
        manual(conn, account="P", symbol="BTCUSD", side="buy", quantity=1)
    assert conn.execute("SELECT count(*) FROM trading.orders").fetchone()[0] == 0


# ------------------------------------------------------------------------------ closing


def test_close_position_sends_what_is_held_minus_open_exits(conn):
    acc = add_account(conn, "C")
    add_instrument(conn, "AAAUSD")
    add_instrument(conn, "BBBUSD")
    hold(conn, "C", "AAAUSD", 10, 100)
    hold(conn, "C", "BBBUSD", 3, 100)
    r = manual(conn, account="C", symbol="AAAUSD", side="sell", quantity=4, type="limit",
               limit_price=150, reduce_only=True)
    assert r["status"] == "approved"
    r = conn.execute("SELECT trading.close_position('C', 'AAAUSD')").fetchone()[0]
    assert len(r["order_ids"]) == 1
    assert closing_orders(conn, acc) == [("AAAUSD", "sell", 6, True, "close")]
    o = conn.execute("SELECT order_type::text, status::text FROM trading.orders WHERE order_id"
                     " = %s", (r["order_ids"][0],)).fetchone()
    assert o == ("market", "created")
    # again: everything is covered, nothing new
    r = conn.execute("SELECT trading.close_position('C', 'AAAUSD')").fetchone()[0]
    assert r["order_ids"] == []
    # close_all: only BBB is left to close
    r = conn.execute("SELECT trading.close_all('C')").fetchone()[0]
    assert len(r["order_ids"]) == 1
    assert closing_orders(conn, acc)[-1] == ("BBBUSD", "sell", 3, True, "close")
    assert conn.execute("SELECT trading.close_all('C')").fetchone()[0]["order_ids"] == []
    types = audit_types(conn, acc)
    assert types.count("control.close_position") == 2 and types.count("control.close_all") == 2
    # a partly filled exit counts only its remainder: 2 of the 4 fill, then 2 more can go
    four = conn.execute("SELECT order_id FROM trading.orders WHERE quantity = 4").fetchone()[0]
    fill(conn, four, "part", 2, 150)
    six = r_id = conn.execute("SELECT order_id FROM trading.orders WHERE quantity = 6"
                              ).fetchone()[0]
    conn.execute("SELECT trading.cancel_order(%s)", (str(six),))
    r = conn.execute("SELECT trading.close_position('C', 'AAAUSD')").fetchone()[0]
    assert r_id and closing_orders(conn, acc)[-1] == ("AAAUSD", "sell", 6, True, "close")
    assert conn.execute("SELECT quantity FROM trading.positions p JOIN market.instruments i"
                        " USING (instrument_id) WHERE i.symbol = 'AAAUSD'").fetchone()[0] == 8


def test_close_position_with_nothing_held(conn, acct):
    r = conn.execute("SELECT trading.close_position('P', 'BTCUSD')").fetchone()[0]
    assert r["order_ids"] == []
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="unknown symbol"):
        conn.execute("SELECT trading.close_position('P', 'NOPEUSD')")


def test_closing_orders_fill_to_flat(conn):
    add_account(conn, "C", cash=10000)
    add_instrument(conn, "AAAUSD")
    hold(conn, "C", "AAAUSD", 10, 100)
    oid = conn.execute("SELECT trading.close_all('C')").fetchone()[0]["order_ids"][0]
    r = fill(conn, oid, "x", 10, 110)
    assert (r["position"], r["realized_pnl"]) == (0, 100)
    assert conn.execute("SELECT cash FROM trading.accounts").fetchone()[0] == D(10100)
    assert conn.execute("SELECT exit_trigger::text FROM trading.trades").fetchone()[0] == "close"


@pytest.mark.parametrize("how", ["close_all", "hard"])
def test_close_all_closes_the_accounts_own_row_beside_a_strategys_row(conn, acct, how):
    # An independent account holds s1's row (10 bought at 100) and its own row (a manual
    # buy of 10 at 90); marked at 95, s1's row (-50) is the riskier and is closed first.
    # s1's closing order reduces s1's row only: the account's row gets its own close.
    s1 = conn.execute("SELECT strategy_id FROM trading.strategies WHERE name = 's1'").fetchone()[0]
    buy_filled(conn)
    hold(conn, "P", "BTCUSD", 10, 90)
    conn.execute("INSERT INTO market.bars SELECT instrument_id, '1m', %s, 95, 95, 95, 95, 1"
                 " FROM market.instruments WHERE symbol = 'BTCUSD'", (T0 + timedelta(minutes=1),))
    if how == "close_all":
        assert len(conn.execute("SELECT trading.close_all('P')").fetchone()[0]["order_ids"]) == 2
    else:
        r = conn.execute("SELECT risk.trip_breaker('P', 'HARD', 'flatten')").fetchone()[0]
        assert r["open_orders"] == 2
    trig = "close" if how == "close_all" else "breaker"
    closes = conn.execute("SELECT order_id, strategy_id, side::text, quantity FROM trading.orders"
                          " WHERE trigger = %s ORDER BY order_id", (trig,)).fetchall()
    assert [c[1:] for c in closes] == [(s1, "sell", 10), (None, "sell", 10)]
    for oid, *_ in closes:
        assert fill(conn, oid, f"c-{oid}", 10, 95)["status"] == "applied"
    assert conn.execute("SELECT strategy_id, quantity FROM trading.positions"
                        " ORDER BY position_id").fetchall() == [(s1, 0), (None, 0)]


def test_a_manual_exit_beyond_the_accounts_own_row_counts_for_the_strategy_rows(conn, acct):
    # A manual reduce-only sell reduces the account's own row first and the strategies'
    # rows with the rest (trading.apply_fill): of a sell of 12, 5 close the account's row
    # and 7 reach s1's row of 10, which then needs a close of 3 only.
    s1 = conn.execute("SELECT strategy_id FROM trading.strategies WHERE name = 's1'").fetchone()[0]
    buy_filled(conn)
    hold(conn, "P", "BTCUSD", 5, 100)
    m = manual(conn, account="P", symbol="BTCUSD", side="sell", quantity=12, type="limit",
               limit_price=150, reduce_only=True)
    assert m["status"] == "approved", m
    ids = conn.execute("SELECT trading.close_all('P')").fetchone()[0]["order_ids"]
    assert conn.execute("SELECT strategy_id, side::text, quantity FROM trading.orders"
                        " WHERE trigger = 'close'").fetchall() == [(s1, "sell", 3)]
    assert fill(conn, m["order_id"], "m", 12, 150)["status"] == "applied"
    assert fill(conn, ids[0], "c", 3, 150)["status"] == "applied"
    assert conn.execute("SELECT sum(quantity) FROM trading.positions").fetchone()[0] == 0
