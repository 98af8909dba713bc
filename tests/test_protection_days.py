"""Migration 0004_12: a coarser bar is judged only on prices after a position's mark, and
the day of DAILY_LOSS (trading.snapshot_equity) ends with the bar closing at midnight and
never goes back.

Found by a review of the ledger on a real database (reproduced there first). Paper
accounts; bars are plain INSERTs into market.bars, so the bars trigger runs as it does
for a live feed; orders are made with trading._emit_order (as the owner) to carry stops.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

MIN = timedelta(minutes=1)


def instrument(conn: psycopg.Connection, symbol: str) -> int:
    return conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES (%s, 'test', 'crypto', %s, 'USD', 0.00001, 0.001, 0, 'CRYPTO_24X7')"
        " RETURNING instrument_id", (symbol, symbol)).fetchone()[0]


def bar(conn: psycopg.Connection, iid: int, ts: datetime | str, close: str, o: str | None = None,
        h: str | None = None, low: str | None = None, tf: str = "1m") -> None:
    o = o or close
    conn.execute(
        "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, 1)",
        (iid, tf, ts, o, h or max(D(o), D(close)), low or min(D(o), D(close)), close))


def account(conn: psycopg.Connection, name: str, cash: str) -> int:
    return conn.execute("SELECT trading.create_account(%s, 'paper', 'operator', %s::numeric)",
                        (name, cash)).fetchone()[0]


def hold(conn: psycopg.Connection, aid: int, iid: int, qty: str, ts: str,
         **protection: Any) -> None:
    """A long position of `qty` at 100, filled at `ts`, with its protection."""
    extra = "".join(f", {k} => %s::numeric" for k in protection)
    oid = conn.execute(
        "SELECT trading._emit_order((SELECT a FROM trading.accounts a WHERE account_id = %s),"
        " (SELECT i FROM market.instruments i WHERE instrument_id = %s), NULL, NULL,"
        f" 'buy', %s::numeric, 'manual', 100::numeric{extra})",
        (aid, iid, qty, *protection.values())).fetchone()[0]
    r = conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "order_id": oid, "broker_fill_id": f"f{oid}", "quantity": qty, "price": "100",
        "ts": ts}),)).fetchone()[0]
    assert r["status"] == "applied", r


def exits(conn: psycopg.Connection, aid: int) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT trigger::text, trigger_price FROM trading.orders"
                        " WHERE account_id = %s AND reduce_only ORDER BY order_id",
                        (aid,)).fetchall()


def quiet_minutes(conn: psycopg.Connection, iid: int, start: datetime, end: datetime) -> None:
    t = start
    while t < end:
        bar(conn, iid, t, "100", o="100", h="100.5", low="99.5")
        t += MIN


T10 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def test_an_hour_bar_arriving_after_its_minutes_fires_no_stop_on_a_dip_before_the_fill(
        conn: psycopg.Connection) -> None:
    """A dip to 90 at 10:05, a buy at 100 with its stop at 95 filled at 10:30, minutes
    between 99.5 and 100.5 up to 10:59; then the 10:00 hour bar (low 90) comes: no price
    since the fill broke the stop. It sold at 95 before 0004_12. An hour bar whose whole
    period is after the position's mark is judged as before."""
    iid = instrument(conn, "MTF")
    bar(conn, iid, T10 - timedelta(hours=1), "100", tf="1h")
    bar(conn, iid, T10 + 5 * MIN, "91", o="100", h="100", low="90")
    aid = account(conn, "mtf", "100000")
    hold(conn, aid, iid, "10", (T10 + 30 * MIN).isoformat(), stop_loss="95")
    quiet_minutes(conn, iid, T10 + 30 * MIN, T10 + 59 * MIN)
    bar(conn, iid, T10, "100", o="100", h="101", low="90", tf="1h")
    assert exits(conn, aid) == []
    # the next hour, all of it after the mark, breaks the stop: it fires
    quiet_minutes(conn, iid, T10 + 59 * MIN, T10 + 60 * MIN)
    bar(conn, iid, T10 + timedelta(hours=1), "94", o="100", h="100", low="94", tf="1h")
    assert exits(conn, aid) == [("stop_loss", D(95))]


def test_an_hour_bar_does_not_move_a_trailing_stop_to_a_high_before_the_fill(
        conn: psycopg.Connection) -> None:
    """A spike to 110 at 10:05, a buy at 100 trailing 5 filled at 10:30; one INSERT then
    brings the 10:59 minute (high 100.5) and the 10:00 hour (high 110). The anchor stays
    at 100.5 (it was 110, and the next minute's low of 99.5 sold at 105 - 5 = 100...)."""
    iid = instrument(conn, "TRL")
    bar(conn, iid, T10 - timedelta(hours=1), "100", tf="1h")
    bar(conn, iid, T10 + 5 * MIN, "101", o="101", h="110", low="101")
    aid = account(conn, "trl", "100000")
    hold(conn, aid, iid, "10", (T10 + 30 * MIN).isoformat(), trailing_stop="5")
    quiet_minutes(conn, iid, T10 + 30 * MIN, T10 + 59 * MIN)
    conn.execute(
        "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)"
        " VALUES (%s, '1m', %s, 100, 100.5, 99.5, 100, 1), (%s, '1h', %s, 100, 110, 99.5, 100, 1)",
        (iid, T10 + 59 * MIN, iid, T10))
    anchor = conn.execute("SELECT trail_anchor FROM trading.positions WHERE account_id = %s",
                          (aid,)).fetchone()[0]
    assert anchor == D("100.5")
    bar(conn, iid, T10 + 60 * MIN, "100", o="100", h="100.5", low="99.5")
    assert exits(conn, aid) == []


def daily_loss_account(conn: psycopg.Connection, name: str) -> tuple[int, int]:
    """A paper account of 10,000 holding 100 of an instrument at 100 from 23:50, with a
    DAILY_LOSS limit of 1,200: (account, instrument)."""
    iid = instrument(conn, name.upper())
    bar(conn, iid, "2026-01-05T23:00Z", "100")
    aid = account(conn, name, "10000")
    conn.execute("SELECT risk.set_limit('DAILY_LOSS', 1200, account => %s)", (name,))
    hold(conn, aid, iid, "100", "2026-01-05T23:50Z")
    return aid, iid


def breaker(conn: psycopg.Connection, aid: int) -> str:
    return conn.execute("SELECT mode::text FROM risk.breaker_state WHERE account_id = %s",
                        (aid,)).fetchone()[0]


def test_the_bar_closing_at_midnight_is_the_last_of_its_day(conn: psycopg.Connection) -> None:
    """10,000 falls to 8,500 on Jan 5, the last 1,000 on the bar 23:59-00:00: a loss of
    1,500 that day, beyond 1,200 (before 0004_12 that bar counted in Jan 6: 1,000 lost, no
    breach)."""
    aid, iid = daily_loss_account(conn, "dla")
    for ts, close in (("23:57", "100"), ("23:58", "95"), ("23:59", "85")):
        bar(conn, iid, f"2026-01-05T{ts}Z", close)
    assert breaker(conn, aid) == "HARD"
    assert conn.execute("SELECT trading_day, day_start_equity FROM trading.accounts"
                        " WHERE account_id = %s", (aid,)).fetchone() == (
        datetime(2026, 1, 5).date(), D(10000))


def test_the_next_day_starts_from_the_midnight_equity(conn: psycopg.Connection) -> None:
    """The next day starts at 8,500 and loses 200: no breach (it started at 9,500 and read
    a loss of 1,200 before 0004_12). The limit is lifted for Jan 5's breach first."""
    aid, iid = daily_loss_account(conn, "dlc")
    conn.execute("SELECT risk.set_limit('DAILY_LOSS', 5000, account => 'dlc')")
    for ts, close in (("05T23:57", "100"), ("05T23:58", "95"), ("05T23:59", "85"),
                      ("06T00:00", "83")):
        bar(conn, iid, f"2026-01-{ts}Z", close)
    assert conn.execute("SELECT trading_day, day_start_equity FROM trading.accounts"
                        " WHERE account_id = %s", (aid,)).fetchone() == (
        datetime(2026, 1, 6).date(), D(8500))
    assert breaker(conn, aid) == "OK"


def test_a_late_bar_of_the_day_before_does_not_restart_the_day(
        conn: psycopg.Connection) -> None:
    """90 of X and 10 of Y; Jan 6 loses 900 on X by 10:00, then Y's bar of 23:58 Jan 5
    arrives late, then X loses 450 more: 1,350 lost on Jan 6, beyond 1,200 (the late bar
    took the day back to Jan 5 and the next bar started Jan 6 afresh from 9,100)."""
    x, y = instrument(conn, "DX"), instrument(conn, "DY")
    for iid in (x, y):
        bar(conn, iid, "2026-01-05T23:00Z", "100")
    aid = account(conn, "dl2", "10000")
    conn.execute("SELECT risk.set_limit('DAILY_LOSS', 1200, account => 'dl2')")
    hold(conn, aid, x, "90", "2026-01-05T23:50Z")
    hold(conn, aid, y, "10", "2026-01-05T23:50Z")
    for iid in (x, y):
        bar(conn, iid, "2026-01-05T23:57Z", "100")
    bar(conn, x, "2026-01-06T00:00Z", "100")
    bar(conn, x, "2026-01-06T10:00Z", "90")
    assert breaker(conn, aid) == "OK"  # 900 lost
    bar(conn, y, "2026-01-05T23:58Z", "100")  # late
    assert conn.execute("SELECT trading_day FROM trading.accounts WHERE account_id = %s",
                        (aid,)).fetchone()[0] == datetime(2026, 1, 6).date()
    bar(conn, x, "2026-01-06T10:01Z", "85")
    assert breaker(conn, aid) == "HARD"
