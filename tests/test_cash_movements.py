"""Cash outside fills (migration 0004_07): trading.book_cash and trading.cash_movements,
against the real database. Fees, financing, dividends and interest are profit or loss;
deposits and withdrawals are not, and the drawdown and daily-loss rules must not see them.
The numbers are worked out by hand in each test."""

from __future__ import annotations

import threading
from decimal import Decimal as D
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from test_risk_gate import TS, account, approved, hold, rejected, set_limit, signal, stock

T_BOOKED = "2026-03-02T14:00:00Z"


def book(conn: psycopg.Connection, **movement: Any) -> dict[str, Any]:
    body = {"account": "acct", "ts": T_BOOKED, **movement}
    return conn.execute("SELECT trading.book_cash(%s)", (Jsonb(body),)).fetchone()[0]


def cash(conn: psycopg.Connection, name: str = "acct") -> D:
    return conn.execute("SELECT cash FROM trading.accounts WHERE name = %s",
                        (name,)).fetchone()[0]


def movements(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT kind::text, amount, currency, fx, amount_account, broker_ref, symbol,"
        " description FROM trading.cash_movements ORDER BY movement_id").fetchall()


# ------------------------------------------------------------------ booking
def test_a_fee_is_booked_once_and_moves_cash_by_its_amount(conn: psycopg.Connection) -> None:
    account(conn)
    r = book(conn, kind="fee", amount="-0.02", broker_ref="alp-1", symbol="aapl",
             description="REG/TAF fee")
    assert (r["status"], r["currency"], D(str(r["amount_account"])), D(str(r["cash"]))) == (
        "booked", "USD", D("-0.02"), D("9999.98"))
    again = book(conn, kind="fee", amount="-0.020", broker_ref="alp-1")  # the same movement
    assert (again["status"], again["movement_id"]) == ("duplicate", r["movement_id"])
    assert cash(conn) == D("9999.98")
    assert movements(conn) == [("fee", D("-0.02"), "USD", D(1), D("-0.02"), "alp-1", "AAPL",
                                "REG/TAF fee")]
    [(payload,)] = conn.execute("SELECT payload FROM audit.events"
                                " WHERE event_type = 'cash.booked'").fetchall()
    assert (payload["account"], payload["kind"], payload["amount"], payload["broker_ref"]) == (
        "acct", "fee", -0.02, "alp-1")
    assert conn.execute("SELECT count(*) FROM audit.verify_chain()").fetchone() == (0,)


def test_a_broker_ref_booked_with_another_amount_is_refused(conn: psycopg.Connection) -> None:
    account(conn)
    book(conn, kind="fee", amount="-0.02", broker_ref="alp-1")
    with pytest.raises(psycopg.errors.UniqueViolation) as info:
        book(conn, kind="fee", amount="-0.03", broker_ref="alp-1")
    assert info.value.diag.message_primary == (
        'book_cash: broker_ref "alp-1" of account acct is already booked as fee -0.02 USD, '
        "not fee -0.03 USD")
    assert cash(conn) == D("9999.98")
    assert len(movements(conn)) == 1


def test_a_movement_in_another_currency_is_converted_at_the_latest_bar(
        conn: psycopg.Connection) -> None:
    """A EUR dividend into a USD account: 5 EUR at EUR/USD 1.1 is 5.50 USD."""
    eurusd = stock(conn, "EUR/USD", close=1.1, market="forex", base="EUR")
    assert eurusd
    account(conn)
    r = book(conn, kind="dividend", amount="5", currency="eur", broker_ref="d-1")
    assert D(str(r["amount_account"])) == D("5.50")
    assert cash(conn) == D("10005.50")
    assert movements(conn)[0][:5] == ("dividend", D(5), "EUR", D("1.1"), D("5.50"))


def test_without_a_conversion_rate_nothing_is_booked(conn: psycopg.Connection) -> None:
    account(conn)
    with pytest.raises(psycopg.errors.NoDataFound) as info:
        book(conn, kind="interest", amount="3", currency="GBP", broker_ref="i-1")
    assert (info.value.diag.message_primary or "").startswith(
        "no conversion rate from GBP to USD: no bar for GBP/USD or USD/GBP at or before "
        "2026-03-02 14:00:00")
    assert (cash(conn), movements(conn)) == (D(10000), [])


def test_a_symbol_mmats_does_not_know_is_kept_as_text(conn: psycopg.Connection) -> None:
    """Money moved either way: a dividend of a stock without bars is still cash."""
    aaa = stock(conn, "AAA")
    account(conn)
    book(conn, kind="dividend", amount="2", broker_ref="d-1", symbol="AAA")
    book(conn, kind="dividend", amount="3", broker_ref="d-2", symbol="ZZZ")
    assert conn.execute("SELECT symbol, instrument_id FROM trading.cash_movements"
                        " ORDER BY movement_id").fetchall() == [("AAA", aaa), ("ZZZ", None)]
    assert cash(conn) == D(10005)


# ------------------------------------------------------------------ risk rules
def test_a_withdrawal_is_no_drawdown_but_a_fee_is(conn: psycopg.Connection) -> None:
    """Peak 10 000. Withdrawing 5 000 leaves equity 5 000 and the peak 5 000: drawdown 0,
    the signal passes a 0.05 limit. A 300 fee then is a real loss: 300 / 5 000 = 0.06."""
    stock(conn, "AAA")
    stock(conn, "BBB")
    account(conn)
    set_limit(conn, "MAX_DRAWDOWN", "0.05")
    book(conn, kind="withdrawal", amount="-5000", broker_ref="w-1")
    assert conn.execute("SELECT cash, peak_equity FROM trading.accounts").fetchone() == (
        D(5000), D(5000))
    approved(conn, signal(conn, "AAA", size="0.001"))
    book(conn, kind="fee", amount="-300", broker_ref="f-1")
    rejected(conn, signal(conn, "BBB", size="0.001"), "MAX_DRAWDOWN",
             "MAX_DRAWDOWN: limit=0.05, drawdown=0.0600, peak=5000, equity=4700.00")


def test_a_deposit_is_no_daily_gain_and_financing_is_a_daily_loss(
        conn: psycopg.Connection) -> None:
    """The day started at 10 100 and equity is 10 000: 100 lost. A 1 000 deposit moves the
    day's start with it (still 100 lost, under a 100.01 limit); 0.02 of financing makes
    it 100.02, over."""
    stock(conn, "AAA")
    stock(conn, "BBB")
    account(conn)
    conn.execute("UPDATE trading.accounts SET trading_day = '2026-03-02',"
                 " day_start_equity = 10100")
    set_limit(conn, "DAILY_LOSS", "100.01")
    book(conn, kind="deposit", amount="1000", broker_ref="dep-1")
    assert conn.execute("SELECT cash, day_start_equity FROM trading.accounts").fetchone() == (
        D(11000), D(11100))
    approved(conn, signal(conn, "AAA", size="0.001", ts=TS))
    book(conn, kind="financing", amount="-0.02", broker_ref="fin-1")
    rejected(conn, signal(conn, "BBB", size="0.001", ts=TS), "DAILY_LOSS",
             "DAILY_LOSS: limit=100.01, loss=100.0200")



def _bar(conn: psycopg.Connection, iid: int, aid: int, ts: str, close: str) -> None:
    conn.execute("SELECT trading.on_bar(%s, '1h', %s, %s, %s, %s, %s, %s)",
                 (iid, ts, close, close, close, close, aid))


def _breaker(conn: psycopg.Connection) -> tuple[str, str | None]:
    return conn.execute("SELECT b.mode::text, b.reason FROM risk.breaker_state b").fetchone() \
        or ("OK", None)


def test_a_withdrawal_keeps_the_drawdown_fraction(conn: psycopg.Connection) -> None:
    """50 AAA bought at 100, now 70: equity 8 500, 15 % below the peak of 10 000. A
    withdrawal of 4 000 leaves 4 500, still 15 % below the peak, which scales with it to
    10 000 x 4 500 / 8 500 = 5 294.117647058824. Before 0004_08 the peak moved by the
    amount, to 6 000: 25 %, and a MAX_DRAWDOWN of 20 % tripped by itself."""
    aaa = stock(conn, "AAA")
    stock(conn, "BBB")
    stock(conn, "CCC")
    aid = account(conn)
    set_limit(conn, "MAX_DRAWDOWN", "0.2", params={"mode": "SOFT"})
    hold(conn, "AAA", "0.05")  # 50 at 100: cash 5 000
    _bar(conn, aaa, aid, "2026-03-03T10:00:00Z", "70")
    assert _breaker(conn)[0] == "OK"
    book(conn, kind="withdrawal", amount="-4000", broker_ref="w-1")
    assert conn.execute("SELECT cash, peak_equity FROM trading.accounts").fetchone() == (
        D(1000), D("5294.117647058824"))
    _bar(conn, aaa, aid, "2026-03-03T11:00:00Z", "70")
    assert _breaker(conn)[0] == "OK"
    [(dd,)] = conn.execute("SELECT drawdown FROM trading.equity_snapshots"
                           " WHERE ts = '2026-03-03T12:00:00Z'").fetchall()
    assert round(dd, 6) == D("0.15")
    approved(conn, signal(conn, "BBB", size="0.001", ts="2026-03-03T12:00:01Z"))
    set_limit(conn, "MAX_DRAWDOWN", "0.15")
    rejected(conn, signal(conn, "CCC", size="0.001", ts="2026-03-03T12:00:01Z"),
             "MAX_DRAWDOWN", "MAX_DRAWDOWN: limit=0.15, drawdown=0.1500, "
             "peak=5294.117647058824, equity=4500.00")


def test_a_withdrawal_keeps_the_days_loss_as_a_fraction_and_in_money(
        conn: psycopg.Connection) -> None:
    """The day starts at 10 000 and loses 800 (50 AAA from 100 to 84): 8 %. A withdrawal of
    4 000 leaves 5 200: still 8 % of the day's start scaled with it (10 000 x 5 200 /
    9 200), still 800 in money. Before 0004_08 the fraction was 800 / 6 000 = 13.3 %, and
    a DAILY_LOSS of 10 % tripped by itself."""
    aaa = stock(conn, "AAA")
    aid = account(conn)
    set_limit(conn, "DAILY_LOSS", "0.1", params={"mode": "SOFT", "unit": "fraction"})
    hold(conn, "AAA", "0.05")
    _bar(conn, aaa, aid, "2026-03-03T00:00:00Z", "100")  # the day's first snapshot: 10 000
    _bar(conn, aaa, aid, "2026-03-03T01:00:00Z", "84")   # 9 200
    book(conn, kind="withdrawal", amount="-4000", broker_ref="w-1")
    assert conn.execute("SELECT day_start_equity, day_start_scaled FROM trading.accounts"
                        ).fetchone() == (D(6000), D("5652.173913043478"))
    _bar(conn, aaa, aid, "2026-03-03T02:00:00Z", "84")
    assert _breaker(conn)[0] == "OK"
    set_limit(conn, "DAILY_LOSS", "799", params={"mode": "SOFT"})  # in money: 800 lost
    _bar(conn, aaa, aid, "2026-03-03T03:00:00Z", "84")
    assert _breaker(conn) == ("SOFT", "DAILY_LOSS: limit=799, loss=800.0000")

def test_a_withdrawal_overnight_is_not_the_next_days_loss(conn: psycopg.Connection) -> None:
    """50 AAA at 100 and 5 000 cash; the day's last snapshot (21:00) says 10 000. 3 000
    withdrawn at 23:30: the next day starts at 7 000, so its first bar, at an unchanged
    price, loses nothing (before 0004_07's fix it lost 3 000 and tripped the breaker).
    A real loss that day still trips it: AAA at 80 is 1 000 lost."""
    aaa = stock(conn, "AAA")
    aid = account(conn)
    hold(conn, "AAA", "0.05")
    set_limit(conn, "DAILY_LOSS", "500", params={"mode": "HARD"})

    def bar_at(ts: str, close: int) -> None:
        conn.execute("SELECT trading.on_bar(%s, '1h', %s, %s, %s, %s, %s, %s)",
                     (aaa, ts, close, close, close, close, aid))

    def breaker() -> str | None:
        row = conn.execute("SELECT mode::text FROM risk.breaker_state").fetchone()
        return row[0] if row else None

    bar_at("2026-03-02T20:00:00Z", 100)
    book(conn, kind="withdrawal", amount="-3000", broker_ref="w-1", ts="2026-03-02T23:30:00Z")
    bar_at("2026-03-03T00:00:00Z", 100)
    assert conn.execute("SELECT trading_day::text, day_start_equity, flows_since_snapshot"
                        " FROM trading.accounts").fetchone() == ("2026-03-03", D(7000), D(0))
    assert breaker() in (None, "OK")
    bar_at("2026-03-03T01:00:00Z", 80)
    assert breaker() == "HARD"
    assert conn.execute("SELECT reason FROM risk.breaker_state").fetchone() == (
        "DAILY_LOSS: limit=500, loss=1000.0000",)


def test_a_deposit_overnight_does_not_hide_the_next_days_loss(conn: psycopg.Connection) -> None:
    """The mirror case: 10 000 deposited overnight, then AAA falls from 100 to 80: 1 000
    lost, over the 500 limit (before the fix the deposit made it a 9 000 gain)."""
    aaa = stock(conn, "AAA")
    aid = account(conn)
    hold(conn, "AAA", "0.05")
    set_limit(conn, "DAILY_LOSS", "500", params={"mode": "SOFT"})
    conn.execute("SELECT trading.on_bar(%s, '1h', '2026-03-02T20:00:00Z', 100, 100, 100, 100,"
                 " %s)", (aaa, aid))
    book(conn, kind="deposit", amount="10000", broker_ref="d-1", ts="2026-03-02T23:30:00Z")
    conn.execute("SELECT trading.on_bar(%s, '1h', '2026-03-03T00:00:00Z', 80, 80, 80, 80, %s)",
                 (aaa, aid))
    assert conn.execute("SELECT mode::text, reason FROM risk.breaker_state").fetchone() == (
        "SOFT", "DAILY_LOSS: limit=500, loss=1000.0000")


# ------------------------------------------------------------------ bad input
BAD = [
    ({"amount": "5", "broker_ref": "x"},
     "book_cash.kind is required: one of fee, financing, dividend, interest, deposit, "
     "withdrawal, adjustment"),
    ({"kind": "bonus", "amount": "5", "broker_ref": "x"},
     'book_cash.kind must be one of fee, financing, dividend, interest, deposit, withdrawal, '
     'adjustment, got "bonus"'),
    ({"kind": "fee", "amount": "0", "broker_ref": "x"},
     "book_cash.amount is required and must not be zero"),
    ({"kind": "fee", "broker_ref": "x"}, "book_cash.amount is required and must not be zero"),
    ({"kind": "fee", "amount": "NaN", "broker_ref": "x"},
     'book_cash.amount must be a finite number, got "NaN"'),
    ({"kind": "fee", "amount": "-1e400000", "broker_ref": "x"},
     "book_cash.amount is out of range, got -1e400000"),
    ({"kind": "fee", "amount": "-" + "9" * 200000, "broker_ref": "x"},
     "book_cash.amount is out of range, got -999999999999999999999999999999999999999..."),
    ({"kind": "deposit", "amount": "-5", "broker_ref": "x"},
     "book_cash.amount of a deposit must be positive, got -5"),
    ({"kind": "withdrawal", "amount": "5", "broker_ref": "x"},
     "book_cash.amount of a withdrawal must be negative, got 5"),
    ({"kind": "fee", "amount": "-1"}, "book_cash.broker_ref is required: 1 to 128 printable "
     "characters, got none"),
    ({"kind": "fee", "amount": "-1", "broker_ref": "a\u0001b"},
     'book_cash.broker_ref is required: 1 to 128 printable characters, got "a\\u0001b"'),
    ({"kind": "fee", "amount": "-1", "broker_ref": "r" * 129},
     "book_cash.broker_ref is longer than 128 characters"),
    ({"kind": "fee", "amount": "-1", "broker_ref": "x", "description": "d" * 201},
     "book_cash.description is longer than 200 characters"),
    ({"kind": "fee", "amount": "-1", "broker_ref": "x", "currency": "US$"},
     'book_cash.currency must be 2 to 12 letters or digits, got "US$"'),
    ({"kind": "fee", "amount": "-1", "broker_ref": "x", "symbol": "AA\nPL"},
     'book_cash.symbol must be printable characters, got "AA\\nPL"'),
    ({"kind": "fee", "amount": "-1", "broker_ref": "x", "ts": "yesterday"}, None),
    ({"kind": "fee", "amount": "-1", "broker_ref": "x", "ts": "2026-03-02T10:00:00+16:00"},
     "book_cash.ts has a UTC offset out of range (-15:59 to +15:59): 2026-03-02T10:00:00+16:00"),
    ({"kind": "deposit", "amount": "1000000000000000000", "broker_ref": "x"},
     "book_cash.amount is out of range, got 1000000000000000000"),
    ({"kind": "deposit", "amount": 1e300, "broker_ref": "x"},  # a JSON number
     "book_cash.amount is out of range, got 1" + "0" * 39 + "..."),
    ({"kind": "fee", "amount": "-1", "broker_ref": "x", "account": "nobody"},
     "unknown account 'nobody'"),
    ({"kind": "fee", "amount": "-1", "broker_ref": "x", "account": "'; DROP TABLE x; --"},
     "unknown account '''; DROP TABLE x; --'"),
]


@pytest.mark.parametrize(("movement", "message"), BAD)
def test_bad_input_is_refused_in_one_line_and_nothing_is_written(
        conn: psycopg.Connection, movement: dict[str, Any], message: str | None) -> None:
    account(conn)
    with pytest.raises(psycopg.Error) as info:
        book(conn, **movement)
    text = info.value.diag.message_primary or ""
    assert "\n" not in text
    if message is not None:
        assert text == message
    else:
        assert text.startswith("book_cash.")
    assert (cash(conn), movements(conn)) == (D(10000), [])
    assert conn.execute("SELECT count(*) FROM audit.events WHERE event_type = 'cash.booked'"
                        ).fetchone() == (0,)


def test_a_number_numeric_cannot_hold_is_refused_naming_its_field_anywhere(
        conn: psycopg.Connection) -> None:
    """The parser every trading function shares: before 0004_07 the cast failed with
    PostgreSQL's bare 'value overflows numeric format'."""
    stock(conn, "AAA")
    account(conn)
    with pytest.raises(psycopg.errors.NumericValueOutOfRange) as info:
        signal(conn, "AAA", size="0.001", stop_loss="1e-99999")
    assert info.value.diag.message_primary == "signal.stop_loss is out of range, got 1e-99999"
    assert conn.execute("SELECT count(*) FROM trading.signals").fetchone() == (0,)


def test_book_cash_takes_a_json_object(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as info:
        conn.execute("SELECT trading.book_cash('[1]')")
    assert info.value.diag.message_primary == "book_cash takes a JSON object, got [1]"


# ------------------------------------------------------------------ roles, races
def test_only_the_router_and_the_api_book_and_nobody_writes_the_table(
        conn: psycopg.Connection) -> None:
    account(conn)
    for role in ("mmats_router", "mmats_api"):
        conn.execute(f"SET ROLE {role}")
        try:
            assert book(conn, kind="interest", amount="1", broker_ref=f"i-{role}")["status"] \
                == "booked"
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO trading.cash_movements (account_id, kind, amount,"
                             " currency, fx, broker_ref, ts)"
                             " VALUES (1, 'deposit', 1e6, 'USD', 1, 'mine', now())")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE trading.cash_movements SET amount = 1e6")
        finally:
            conn.execute("RESET ROLE")
    conn.execute("SET ROLE mmats_strategy")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            book(conn, kind="deposit", amount="1000000", broker_ref="mine")
    finally:
        conn.execute("RESET ROLE")
    assert cash(conn) == D(10002)


def test_two_sessions_booking_the_same_movement_book_it_once(db_url: str,
                                                              conn: psycopg.Connection) -> None:
    """The first holds the account's lock until it commits; the second then finds the
    row and answers duplicate. Run 20 times with the two calls started together."""
    account(conn)
    for n in range(20):
        start = threading.Barrier(2)
        answers: list[str] = []

        def one(n: int = n, start: threading.Barrier = start,
                answers: list[str] = answers) -> None:
            with psycopg.connect(db_url, autocommit=True) as c:
                start.wait()
                answers.append(book(c, kind="fee", amount="-1", broker_ref=f"race-{n}")["status"])

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(answers) == ["booked", "duplicate"], (n, answers)
    assert cash(conn) == D(9980)
    assert len(movements(conn)) == 20
