"""The hierarchical pre-trade risk gate (risk.check_order), driven through
trading.submit_signal and trading.place_manual_order: each rule at its boundary (just
under passes, just over is refused with its stable code and key=value context), the order
of the hierarchy, the breaker, and closes/reductions that pass every limit.

Numbers are small and written out by hand: price 100, equity 10 000 unless stated.
Sizing is fixed_quantity 1000 x the signal's size, so size 0.01 buys 10 units (notional
1 000, 0.10 of equity) and size 0.01001 buys 10.01 units (0.1001 of equity).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

TS = "2026-03-02T15:00:00Z"  # a Monday, 10:00 in New York
BAR_TS = datetime(2026, 3, 1, tzinfo=UTC)


def instrument(conn: psycopg.Connection, symbol: str, market: str = "stock",
               base: str | None = None, calendar: str | None = None) -> int:
    calendar = calendar or {"stock": "XNYS", "crypto": "CRYPTO_24X7", "forex": "FX_24X5"}[market]
    return conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES (%s, 'test', %s, %s, 'USD', 0.01, 0.01, 0.01, %s) RETURNING instrument_id",
        (symbol, market, base or symbol, calendar)).fetchone()[0]


def bar(conn: psycopg.Connection, iid: int, ts: datetime, close: float | str,
        high: float | str | None = None, low: float | str | None = None,
        volume: float | str = 1000, tf: str = "1d") -> None:
    conn.execute(
        "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (iid, tf, ts, close, high if high is not None else close,
         low if low is not None else close, close, volume))


def stock(conn: psycopg.Connection, symbol: str, close: float = 100, **kw: Any) -> int:
    iid = instrument(conn, symbol, **kw)
    bar(conn, iid, BAR_TS, close)
    return iid


def account(conn: psycopg.Connection, name: str = "acct", cash: float | str = 10000,
            strategies: tuple[str, ...] = ("s1",), aggregation: str = "independent",
            taker_fee: float | str = 0, allow_short: bool = False) -> int:
    aid = conn.execute(
        "SELECT trading.create_account(%s, 'backtest', 'operator', %s::numeric, 'USD', 'oneway',"
        " %s, %s, %s::numeric)", (name, cash, aggregation, allow_short, taker_fee)).fetchone()[0]
    for s in strategies:
        conn.execute("SELECT trading.assign_strategy(%s, %s, 1, 'fixed_quantity',"
                     " '{\"quantity\": 1000}')", (name, s))
    return aid


def signal(conn: psycopg.Connection, symbol: str, action: str = "buy",
           size: float | str | None = None, acct: str = "acct", strategy: str = "s1",
           ts: str = TS, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"account": acct, "strategy": strategy, "symbol": symbol,
                            "action": action, "ts": ts, **extra}
    if size is not None:
        body["size"] = str(size)
    return conn.execute("SELECT trading.submit_signal(%s)", (Jsonb(body),)).fetchone()[0]


def manual(conn: psycopg.Connection, symbol: str, side: str, quantity: str,
           acct: str = "acct", **extra: Any) -> dict[str, Any]:
    return conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb({
        "account": acct, "symbol": symbol, "side": side, "quantity": quantity, **extra}),
    )).fetchone()[0]


def fill(conn: psycopg.Connection, order_id: int, quantity: str, price: str | float = 100,
         ts: str = TS) -> None:
    fid = f"f{order_id}-{quantity}"
    r = conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "order_id": order_id, "broker_fill_id": fid, "quantity": quantity,
        "price": str(price), "ts": ts}),)).fetchone()[0]
    assert r["status"] == "applied", r


def hold(conn: psycopg.Connection, symbol: str, size: str, acct: str = "acct",
         strategy: str = "s1") -> None:
    """An open long position from an approved signal and its fill at 100."""
    r = signal(conn, symbol, size=size, acct=acct, strategy=strategy)
    assert r["status"] == "approved", r
    fill(conn, r["order_id"], r["quantity"])


def queued(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM pgmq.q_orders").fetchone()[0]


def approved(conn: psycopg.Connection, r: dict[str, Any], quantity: str | None = None,
             side: str = "buy") -> None:
    assert r["status"] == "approved", r
    assert r["reason_code"] is None and r["reason"] is None
    row = conn.execute("SELECT side::text, quantity, status::text FROM trading.orders"
                       " WHERE order_id = %s", (r["order_id"],)).fetchone()
    assert row[0] == side and row[2] == "created"
    if quantity is not None:
        assert row[1] == Decimal(quantity)
    assert conn.execute("SELECT count(*) FROM pgmq.q_orders WHERE message->>'order_id' = %s",
                        (str(r["order_id"]),)).fetchone()[0] == 1


def rejected(conn: psycopg.Connection, r: dict[str, Any], code: str, reason: str,
             queued_before: int | None = None) -> None:
    """Refused with the code and text; recorded on the signal row; no order, no message."""
    assert r["status"] == "rejected", r
    assert r["reason_code"] == code, r
    assert r["reason"] == reason
    assert r["order_id"] is None
    if "signal_id" in r:
        assert conn.execute(
            "SELECT status::text, reason_code, reason FROM trading.signals WHERE signal_id = %s",
            (r["signal_id"],)).fetchone() == ("rejected", code, reason)
        assert conn.execute("SELECT count(*) FROM trading.orders WHERE signal_id = %s",
                            (r["signal_id"],)).fetchone()[0] == 0
    if queued_before is not None:
        assert queued(conn) == queued_before


def set_limit(conn: psycopg.Connection, limit_type: str, value: str, scope: str = "global",
              key: str | None = None, params: dict[str, Any] | None = None,
              acct: str | None = None) -> int:
    return conn.execute("SELECT risk.set_limit(%s, %s::numeric, %s, %s, %s, NULL, %s)",
                        (limit_type, value, scope, key, acct, Jsonb(params or {}))).fetchone()[0]


# ------------------------------------------------------------------ position size


def test_max_position_size_global_boundary(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    set_limit(conn, "MAX_POSITION_SIZE", "0.10")
    q = queued(conn)
    rejected(conn, signal(conn, "AAA", size="0.01001"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.10, requested=0.1001, scope=global", q)
    approved(conn, signal(conn, "AAA", size="0.01"), "10.00")


def test_max_position_size_counts_the_open_position(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    hold(conn, "AAA", "0.005")  # 5 units held (0.05)
    set_limit(conn, "MAX_POSITION_SIZE", "0.10")
    # target 10.01: 5.01 more, but the position after it is 0.1001 of equity
    rejected(conn, signal(conn, "AAA", size="0.01001"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.10, requested=0.1001, scope=global")
    approved(conn, signal(conn, "AAA", size="0.01"), "5.00")


def test_max_position_size_counts_unfilled_entries(conn: psycopg.Connection) -> None:
    """An approved entry not yet filled counts: two halves cannot pass a limit together."""
    stock(conn, "AAA")
    account(conn)
    set_limit(conn, "MAX_POSITION_SIZE", "0.10")
    approved(conn, signal(conn, "AAA", size="0.006"), "6.00")
    rejected(conn, signal(conn, "AAA", size="0.012"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.10, requested=0.1200, scope=global")


def test_max_position_size_symbol_scope(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    stock(conn, "BBB")
    account(conn)
    set_limit(conn, "MAX_POSITION_SIZE", "0.05", "symbol", "aaa")  # key upper-cased
    rejected(conn, signal(conn, "AAA", size="0.00501"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.05, requested=0.0501, scope=symbol:AAA")
    approved(conn, signal(conn, "AAA", size="0.005"), "5.00")
    approved(conn, signal(conn, "BBB", size="0.00501"), "5.01")  # other symbol: no limit


def test_max_position_size_strategy_scope(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn, strategies=("s1", "s2"))
    set_limit(conn, "MAX_POSITION_SIZE", "0.05", "strategy", "s1")
    rejected(conn, signal(conn, "AAA", size="0.006"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.05, requested=0.0600, scope=strategy:s1")
    approved(conn, signal(conn, "AAA", size="0.006", strategy="s2"), "6.00")


def test_max_position_size_manual_order(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    set_limit(conn, "MAX_POSITION_SIZE", "0.10")
    set_limit(conn, "MAX_POSITION_SIZE", "0.01", "strategy", "s1")  # not for manual orders
    q = queued(conn)
    rejected(conn, manual(conn, "AAA", "buy", "10.01"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.10, requested=0.1001, scope=global", q)
    assert conn.execute("SELECT payload->>'reason_code' FROM audit.events"
                        " WHERE event_type = 'order.refused'").fetchall() == [
        ("MAX_POSITION_SIZE",)]
    r = manual(conn, "AAA", "buy", "10")
    approved(conn, r, "10")


# ------------------------------------------------------------------ exposure, leverage


def test_max_exposure_market_crypto(conn: psycopg.Connection) -> None:
    for sym, base in (("BTCUSD", "BTC"), ("ETHUSD", "ETH")):
        stock(conn, sym, market="crypto", base=base)
    stock(conn, "AAA")
    account(conn)
    hold(conn, "BTCUSD", "0.02")  # 20 BTC at 100: 2 000 of crypto; equity stays 10 000
    set_limit(conn, "MAX_EXPOSURE", "0.4", "market", "crypto")
    # 2 000 + 2 001 = 0.4001 of equity
    rejected(conn, signal(conn, "ETHUSD", size="0.02001"), "MAX_EXPOSURE",
             "MAX_EXPOSURE: limit=0.4, requested=0.4001, scope=market:crypto")
    approved(conn, signal(conn, "ETHUSD", size="0.02"), "20.00")  # exactly 0.4
    # the ETH entry is not filled yet but counts: nothing more of crypto fits
    rejected(conn, signal(conn, "BTCUSD", size="0.02001"), "MAX_EXPOSURE",
             "MAX_EXPOSURE: limit=0.4, requested=0.4001, scope=market:crypto")
    approved(conn, signal(conn, "AAA", size="0.05"), "50.00")  # stocks are not in scope


def test_max_leverage(conn: psycopg.Connection) -> None:
    stock(conn, "BTCUSD", market="crypto", base="BTC")
    stock(conn, "AAA")
    account(conn)
    hold(conn, "BTCUSD", "0.02")  # 2 000
    set_limit(conn, "MAX_LEVERAGE", "0.5")
    rejected(conn, signal(conn, "AAA", size="0.03001"), "MAX_LEVERAGE",
             "MAX_LEVERAGE: limit=0.5, requested=0.5001, scope=global")
    approved(conn, signal(conn, "AAA", size="0.03"), "30.00")



def test_max_leverage_counts_both_legs_of_a_hedge_account(conn: psycopg.Connection) -> None:
    """A long leg and an equal short leg of one instrument are both exposure: before
    0004_08 they netted to 0, so the second leg passed any leverage limit (1.8x here)."""
    stock(conn, "AAA")
    conn.execute("SELECT trading.create_account('h', 'backtest', 'operator', 10000, 'USD',"
                 " 'hedge', 'independent', true)")
    conn.execute("SELECT trading.assign_strategy('h', 's1', 1, 'fixed_quantity',"
                 " '{\"quantity\": 90}')")
    set_limit(conn, "MAX_LEVERAGE", "1.0")
    r = signal(conn, "AAA", acct="h")
    approved(conn, r, "90")
    fill(conn, r["order_id"], "90")  # long 90 at 100: 9 000 of 10 000
    rejected(conn, signal(conn, "AAA", action="sell", acct="h"), "MAX_LEVERAGE",
             "MAX_LEVERAGE: limit=1.0, requested=1.8000, scope=global")
    # a position's size on a hedge account is its leg's: the short leg would be 0.9
    set_limit(conn, "MAX_LEVERAGE", "2")
    set_limit(conn, "MAX_POSITION_SIZE", "0.89")
    rejected(conn, signal(conn, "AAA", action="sell", acct="h"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.89, requested=0.9000, scope=global")
    set_limit(conn, "MAX_POSITION_SIZE", "0.9")
    approved(conn, signal(conn, "AAA", action="sell", acct="h"), "90", side="sell")

# ------------------------------------------------------------------ open positions


def test_max_open_positions_global(conn: psycopg.Connection) -> None:
    for s in ("AAA", "BBB", "CCC"):
        stock(conn, s)
    account(conn)
    set_limit(conn, "MAX_OPEN_POSITIONS", "2")
    hold(conn, "AAA", "0.001")
    approved(conn, signal(conn, "BBB", size="0.001"), "1.00")  # the second: allowed
    rejected(conn, signal(conn, "CCC", size="0.001"), "MAX_OPEN_POSITIONS",
             "MAX_OPEN_POSITIONS: limit=2, requested=3, scope=global")
    # adding to a held instrument opens no new position
    approved(conn, signal(conn, "AAA", size="0.002"), "1.00")


def test_max_open_positions_symbol_scope(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    stock(conn, "BBB")
    account(conn, strategies=("s1", "s2"))
    set_limit(conn, "MAX_OPEN_POSITIONS", "1", "symbol", "AAA")
    hold(conn, "AAA", "0.001", strategy="s1")
    rejected(conn, signal(conn, "AAA", size="0.001", strategy="s2"), "MAX_OPEN_POSITIONS",
             "MAX_OPEN_POSITIONS: limit=1, requested=2, scope=symbol:AAA")
    approved(conn, signal(conn, "BBB", size="0.001", strategy="s2"), "1.00")
    approved(conn, signal(conn, "AAA", size="0.002", strategy="s1"), "1.00")  # its own row


def test_max_open_positions_strategy_and_market_scope(conn: psycopg.Connection) -> None:
    for s in ("AAA", "BBB"):
        stock(conn, s)
    stock(conn, "BTCUSD", market="crypto", base="BTC")
    stock(conn, "ETHUSD", market="crypto", base="ETH")
    account(conn, strategies=("s1", "s2"))
    set_limit(conn, "MAX_OPEN_POSITIONS", "1", "strategy", "s1")
    set_limit(conn, "MAX_OPEN_POSITIONS", "1", "market", "crypto")
    hold(conn, "AAA", "0.001", strategy="s1")
    rejected(conn, signal(conn, "BBB", size="0.001"), "MAX_OPEN_POSITIONS",
             "MAX_OPEN_POSITIONS: limit=1, requested=2, scope=strategy:s1")
    approved(conn, signal(conn, "BBB", size="0.001", strategy="s2"))
    approved(conn, signal(conn, "BTCUSD", size="0.001", strategy="s2"))  # not filled yet
    rejected(conn, signal(conn, "ETHUSD", size="0.001", strategy="s2"), "MAX_OPEN_POSITIONS",
             "MAX_OPEN_POSITIONS: limit=1, requested=2, scope=market:crypto")


def test_max_open_positions_symbol_scope_net_account(conn: psycopg.Connection) -> None:
    """A net (aggregated) account has one row per symbol: adding to it is not a second."""
    stock(conn, "AAA")
    account(conn, aggregation="priority")
    set_limit(conn, "MAX_OPEN_POSITIONS", "1", "symbol", "AAA")
    hold(conn, "AAA", "0.001")
    assert conn.execute("SELECT strategy_id, quantity FROM trading.positions").fetchall() == [
        (None, Decimal("1.00"))]
    approved(conn, signal(conn, "AAA", size="0.002"), "1.00")


# ------------------------------------------------------------------ drawdown, daily loss


def test_max_drawdown_from_a_marked_loss(conn: psycopg.Connection) -> None:
    aaa = stock(conn, "AAA")
    stock(conn, "BBB")
    aid = account(conn)
    hold(conn, "AAA", "0.05")  # 50 at 100: cash 5 000
    # the next day's bar marks AAA at 90: equity 5 000 + 4 500 = 9 500, peak 10 000 -> drawdown 0.05
    conn.execute("SELECT trading.on_bar(%s, '1d', '2026-03-03T00:00:00Z', 100, 100, 90, 90, %s)",
                 (aaa, aid))
    assert conn.execute("SELECT equity, peak_equity, drawdown FROM trading.equity_snapshots"
                        ).fetchone() == (Decimal("9500.00"), Decimal("10000"), Decimal("0.05"))
    set_limit(conn, "MAX_DRAWDOWN", "0.05")
    rejected(conn, signal(conn, "BBB", size="0.001"), "MAX_DRAWDOWN",
             "MAX_DRAWDOWN: limit=0.05, drawdown=0.0500, peak=10000, equity=9500.00")
    set_limit(conn, "MAX_DRAWDOWN", "0.0501")
    approved(conn, signal(conn, "BBB", size="0.001"), "1.00")


def test_max_drawdown_from_peak_equity(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    conn.execute("UPDATE trading.accounts SET peak_equity = 12500")  # equity 10 000: 0.2
    set_limit(conn, "MAX_DRAWDOWN", "0.2")
    rejected(conn, signal(conn, "AAA", size="0.001"), "MAX_DRAWDOWN",
             "MAX_DRAWDOWN: limit=0.2, drawdown=0.2000, peak=12500, equity=10000.00")
    set_limit(conn, "MAX_DRAWDOWN", "0.21")
    approved(conn, signal(conn, "AAA", size="0.001"))


def test_daily_loss_amount(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    conn.execute("UPDATE trading.accounts SET trading_day = '2026-03-02',"
                 " day_start_equity = 10100")  # lost 100 today
    set_limit(conn, "DAILY_LOSS", "100")
    rejected(conn, signal(conn, "AAA", size="0.001"), "DAILY_LOSS",
             "DAILY_LOSS: limit=100, loss=100.0000")
    set_limit(conn, "DAILY_LOSS", "100.01")
    approved(conn, signal(conn, "AAA", size="0.001"))


def test_daily_loss_fraction_and_a_new_day(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    conn.execute("UPDATE trading.accounts SET trading_day = '2026-03-02',"
                 " day_start_equity = 12500")  # lost 2 500 = 0.2 today
    set_limit(conn, "DAILY_LOSS", "0.2", params={"unit": "fraction"})
    rejected(conn, signal(conn, "AAA", size="0.001"), "DAILY_LOSS",
             "DAILY_LOSS: limit=0.2, loss=0.2000, unit=fraction")
    # the next UTC day starts afresh (yesterday's loss does not count)
    approved(conn, signal(conn, "AAA", size="0.001", ts="2026-03-03T00:00:00Z"))
    set_limit(conn, "DAILY_LOSS", "0.21", params={"unit": "fraction"})
    assert signal(conn, "AAA", size="0.002")["status"] == "approved"


# ------------------------------------------------------------------ correlation


def _series(conn: psycopg.Connection, symbol: str, returns: list[float], start: float) -> None:
    iid = instrument(conn, symbol)
    close = Decimal(str(start))
    t0 = BAR_TS - timedelta(days=len(returns))
    bar(conn, iid, t0, str(close))
    for i, r in enumerate(returns, 1):
        close = (close * (1 + Decimal(str(r)))).quantize(Decimal("0.000001"))
        bar(conn, iid, t0 + timedelta(days=i), str(close))


def test_max_correlation(conn: psycopg.Connection) -> None:
    base = [0.01, -0.02, 0.015, 0.005, -0.01, 0.02] * 5  # 30 daily returns
    _series(conn, "XXX", base, 100)
    _series(conn, "YYY", base, 50)  # the same returns: correlation 1
    _series(conn, "ZZZ", [-r for r in base], 80)  # opposite: correlation -1
    # alternating returns against a series that repeats every 6: uncorrelated
    _series(conn, "WWW", [0.01, -0.01] * 15, 100)
    account(conn, cash=1000000)
    r = signal(conn, "XXX", size="0.001")
    fill(conn, r["order_id"], r["quantity"], price=r["reference_price"])
    set_limit(conn, "MAX_CORRELATION", "0.8")
    q = queued(conn)
    rejected(conn, signal(conn, "YYY", size="0.001"), "MAX_CORRELATION",
             "MAX_CORRELATION: limit=0.8, correlation=1.0000, with=XXX", q)
    approved(conn, signal(conn, "WWW", size="0.001"))
    approved(conn, signal(conn, "ZZZ", size="0.001"))
    corr = conn.execute(
        "SELECT risk.return_correlation(a.instrument_id, b.instrument_id, '1d', 30, %s)"
        " FROM market.instruments a, market.instruments b"
        " WHERE a.symbol = 'XXX' AND b.symbol = 'WWW'", (TS,)).fetchone()[0]
    assert abs(corr) < Decimal("0.3")


def test_max_correlation_counts_an_unfilled_entry(conn: psycopg.Connection) -> None:
    base = [0.01, -0.02, 0.015, 0.005, -0.01, 0.02] * 5
    _series(conn, "XXX", base, 100)
    _series(conn, "YYY", base, 50)
    account(conn, cash=1000000)
    set_limit(conn, "MAX_CORRELATION", "0.8")
    approved(conn, signal(conn, "XXX", size="0.001"))  # not filled yet
    rejected(conn, signal(conn, "YYY", size="0.001"), "MAX_CORRELATION",
             "MAX_CORRELATION: limit=0.8, correlation=1.0000, with=XXX")


def test_max_correlation_from_the_cache(conn: psycopg.Connection) -> None:
    """MAX_CORRELATION answers from risk.correlation_cache while a row holds the latest bar
    of both instruments (with the signal's instrument either the lower id or the higher),
    computes a pair it lacks, computes again once a new bar arrives, and names the first
    instrument held (by id) above the limit."""
    base = [0.01, -0.02, 0.015, 0.005, -0.01, 0.02] * 5
    for sym, start in (("AAA", 100), ("BBB", 50), ("CCC", 80), ("DDD", 70)):
        _series(conn, sym, base, start)  # the same returns: every pair correlates 1
    ids = {s: i for s, i in conn.execute("SELECT symbol, instrument_id FROM market.instruments")}
    assert ids["AAA"] < ids["BBB"] < ids["CCC"] < ids["DDD"]
    account(conn, cash=1000000)
    hold(conn, "BBB", "0.001")
    hold(conn, "DDD", "0.001")
    set_limit(conn, "MAX_CORRELATION", "0.8")
    for sym in ("AAA", "CCC"):
        rejected(conn, signal(conn, sym, size="0.001"), "MAX_CORRELATION",
                 "MAX_CORRELATION: limit=0.8, correlation=1.0000, with=BBB")
    conn.execute("SELECT risk.return_correlation(%s, %s, '1d', 30, %s)",
                 (ids["DDD"], ids["CCC"], TS))  # (a pair the first check need not reach)
    pairs = {(ids[a], ids[b]) for a, b in (("AAA", "BBB"), ("BBB", "CCC"), ("CCC", "DDD"))}
    assert pairs <= set(conn.execute(
        "SELECT a, b FROM risk.correlation_cache WHERE value > 0.9999").fetchall())
    # a row holding both latest bars is taken as it is, whichever id is the lower
    conn.execute("UPDATE risk.correlation_cache SET value = 0.5")
    approved(conn, signal(conn, "CCC", size="0.001"))  # an entry not yet filled
    # AAA against BBB (cached: 0.5), CCC (not cached: 1) and DDD
    rejected(conn, signal(conn, "AAA", size="0.001"), "MAX_CORRELATION",
             "MAX_CORRELATION: limit=0.8, correlation=1.0000, with=CCC")
    # a new bar for every instrument: each row is stale, computed again
    for sym in ids:
        last = conn.execute("SELECT close FROM market.bars WHERE instrument_id = %s"
                            " ORDER BY ts DESC LIMIT 1", (ids[sym],)).fetchone()[0]
        bar(conn, ids[sym], BAR_TS + timedelta(hours=12), str(last * Decimal("1.01")))
    rejected(conn, signal(conn, "AAA", size="0.001"), "MAX_CORRELATION",
             "MAX_CORRELATION: limit=0.8, correlation=1.0000, with=BBB")
    assert conn.execute(
        "SELECT count(*) FROM risk.correlation_cache WHERE a = %s AND b = %s AND value > 0.9999"
        " AND a_ts = %s AND b_ts = a_ts", (ids["AAA"], ids["BBB"],
                                           BAR_TS + timedelta(hours=12))).fetchone()[0] == 1


def test_max_correlation_needs_history(conn: psycopg.Connection) -> None:
    """With fewer than three common returns there is no correlation to refuse on."""
    _series(conn, "XXX", [0.01, -0.02], 100)
    _series(conn, "YYY", [0.01, -0.02], 50)
    account(conn, cash=1000000)
    set_limit(conn, "MAX_CORRELATION", "0.8")
    hold(conn, "XXX", "0.001")
    approved(conn, signal(conn, "YYY", size="0.001"))


# ------------------------------------------------------------------ market conditions


def test_trading_hours(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    set_limit(conn, "TRADING_HOURS", "1", params={
        "days": [1, 2, 3, 4, 5], "start": "09:30", "end": "16:00", "tz": "America/New_York"})
    allowed = "allowed=days [1, 2, 3, 4, 5] 09:30-16:00"
    for ts, local in (("2026-03-02T14:29:00Z", "Mon 09:29"),   # a minute before the open
                      ("2026-03-02T21:00:00Z", "Mon 16:00"),   # the close is excluded
                      ("2026-03-07T15:00:00Z", "Sat 10:00")):  # weekend
        rejected(conn, signal(conn, "AAA", size="0.001", ts=ts), "TRADING_HOURS",
                 f"TRADING_HOURS: at={local} America/New_York, {allowed}")
    approved(conn, signal(conn, "AAA", size="0.001", ts="2026-03-02T14:30:00Z"))  # the open


def test_min_volume(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")  # latest bar volume 1000
    account(conn)
    set_limit(conn, "MIN_VOLUME", "1000.01")
    rejected(conn, signal(conn, "AAA", size="0.001"), "MIN_VOLUME",
             "MIN_VOLUME: limit=1000.01, volume=1000")
    set_limit(conn, "MIN_VOLUME", "1000")
    approved(conn, signal(conn, "AAA", size="0.001"))


def test_max_volatility(conn: psycopg.Connection) -> None:
    iid = instrument(conn, "AAA")
    for d in range(15):  # range 101-99 around a close of 100: true range 2, ATR(14) 2
        bar(conn, iid, BAR_TS - timedelta(days=14 - d), 100, high=101, low=99)
    account(conn)
    set_limit(conn, "MAX_VOLATILITY", "0.0199")
    rejected(conn, signal(conn, "AAA", size="0.001"), "MAX_VOLATILITY",
             "MAX_VOLATILITY: limit=0.0199, atr_ratio=0.020000")
    set_limit(conn, "MAX_VOLATILITY", "0.02")
    approved(conn, signal(conn, "AAA", size="0.001"))


def test_max_volatility_without_a_measure_refuses(conn: psycopg.Connection) -> None:
    """Too few bars for the ATR, or none of the limit's timeframe: the limit cannot be
    checked, so it refuses (before 0004_08 it passed, a limit that never applied)."""
    iid = instrument(conn, "AAA")
    for d in range(14):  # ATR(14) needs 15 bars
        bar(conn, iid, BAR_TS - timedelta(days=13 - d), 100, high=101, low=99)
    account(conn)
    set_limit(conn, "MAX_VOLATILITY", "0.5")
    rejected(conn, signal(conn, "AAA", size="0.001"), "MAX_VOLATILITY",
             "MAX_VOLATILITY: limit=0.5, atr_ratio=none (fewer than 15 bars of 1d)")
    set_limit(conn, "MAX_VOLATILITY", "0.5", params={"period": 5, "timeframe": "1h"})
    rejected(conn, signal(conn, "AAA", size="0.001"), "MAX_VOLATILITY",
             "MAX_VOLATILITY: limit=0.5, atr_ratio=none (fewer than 6 bars of 1h)")
    set_limit(conn, "MAX_VOLATILITY", "0.5", params={"period": 5})
    approved(conn, signal(conn, "AAA", size="0.001"))


def test_require_stop_loss(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    set_limit(conn, "REQUIRE_STOP_LOSS", "1")
    rejected(conn, signal(conn, "AAA", size="0.001"), "REQUIRE_STOP_LOSS",
             "REQUIRE_STOP_LOSS: an entry must carry stop_loss")
    rejected(conn, manual(conn, "AAA", "buy", "1"), "REQUIRE_STOP_LOSS",
             "REQUIRE_STOP_LOSS: an entry must carry stop_loss")
    r = signal(conn, "AAA", size="0.001", stop_loss=95)
    approved(conn, r)
    assert conn.execute("SELECT stop_loss FROM trading.orders WHERE order_id = %s",
                        (r["order_id"],)).fetchone()[0] == 95


def test_max_order_value(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    set_limit(conn, "MAX_ORDER_VALUE", "1000")
    rejected(conn, signal(conn, "AAA", size="0.01001"), "MAX_ORDER_VALUE",
             "MAX_ORDER_VALUE: limit=1000, requested=1001.00")
    approved(conn, signal(conn, "AAA", size="0.01"), "10.00")


# ------------------------------------------------------------------ built-in checks


def test_insufficient_cash_manual_order(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn, cash=1000)
    q = queued(conn)
    rejected(conn, manual(conn, "AAA", "buy", "10.01"), "INSUFFICIENT_CASH",
             "INSUFFICIENT_CASH: available=1000.00, required=1001.00", q)
    approved(conn, manual(conn, "AAA", "buy", "10"), "10")
    # that order reserves the cash: not one more unit
    rejected(conn, manual(conn, "AAA", "buy", "0.01"), "INSUFFICIENT_CASH",
             "INSUFFICIENT_CASH: available=0.00, required=1.00")


def test_insufficient_cash_counts_the_fee(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn, cash=1000, taker_fee="0.001")
    rejected(conn, manual(conn, "AAA", "buy", "10"), "INSUFFICIENT_CASH",
             "INSUFFICIENT_CASH: available=1000.00, required=1001.00")
    approved(conn, manual(conn, "AAA", "buy", "9.99"), "9.99")  # 999.999


def test_short_not_allowed(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn, aggregation="priority")  # net: manual orders move the same position row
    rejected(conn, manual(conn, "AAA", "sell", "1"), "SHORT_NOT_ALLOWED",
             "SHORT_NOT_ALLOWED: position=0, sell=1, account=acct")
    rejected(conn, signal(conn, "AAA", "sell"), "SHORT_NOT_ALLOWED",
             "SHORT_NOT_ALLOWED: position=0, account=acct")
    hold(conn, "AAA", "0.005")
    rejected(conn, manual(conn, "AAA", "sell", "5.01"), "SHORT_NOT_ALLOWED",
             "SHORT_NOT_ALLOWED: position=5.0, sell=5.01, account=acct")
    approved(conn, manual(conn, "AAA", "sell", "5"), "5", side="sell")


def test_short_not_allowed_against_an_unfilled_buy(conn: psycopg.Connection) -> None:
    """A buy not yet filled is no holding to sell: the sell could fill first."""
    stock(conn, "AAA")
    account(conn, aggregation="priority")
    approved(conn, signal(conn, "AAA", size="0.005"), "5.00")
    rejected(conn, manual(conn, "AAA", "sell", "5"), "SHORT_NOT_ALLOWED",
             "SHORT_NOT_ALLOWED: position=0, sell=5, account=acct")


def test_short_allowed_account_may_sell_short(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn, allow_short=True)
    approved(conn, manual(conn, "AAA", "sell", "1"), "1", side="sell")


# ------------------------------------------------------------------ breaker


@pytest.mark.parametrize("mode", ["SOFT", "HARD"])
def test_breaker_soft_hard_stop_entries_not_closes(conn: psycopg.Connection, mode: str) -> None:
    stock(conn, "AAA")
    stock(conn, "BBB")
    account(conn)
    hold(conn, "AAA", "0.005")
    conn.execute("SELECT risk.trip_breaker('acct', %s, 'test')", (mode,))
    reason = f"BREAKER_{mode}: account=acct, entries stopped until risk.reset_breaker()"
    rejected(conn, signal(conn, "BBB", size="0.001"), f"BREAKER_{mode}", reason)
    rejected(conn, signal(conn, "AAA", size="0.01"), f"BREAKER_{mode}", reason)
    rejected(conn, manual(conn, "BBB", "buy", "1"), f"BREAKER_{mode}", reason)
    if mode == "HARD":  # HARD sent a closing order itself; take it back to close by signal
        (oid,) = conn.execute("SELECT order_id FROM trading.orders WHERE trigger = 'breaker'"
                              " AND reduce_only").fetchone()
        conn.execute("SELECT trading.cancel_order(%s, 'test')", (str(oid),))
    r = signal(conn, "AAA", "close")
    approved(conn, r, "5.00", side="sell")
    assert conn.execute("SELECT reduce_only FROM trading.orders WHERE order_id = %s",
                        (r["order_id"],)).fetchone()[0] is True


def test_breaker_freeze_stops_closes_too(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    hold(conn, "AAA", "0.005")
    conn.execute("SELECT risk.trip_breaker('acct', 'FREEZE', 'ops freeze')")
    q = queued(conn)
    reason = "BREAKER_FREEZE: account=acct, reason=ops freeze"
    rejected(conn, signal(conn, "AAA", size="0.01"), "BREAKER_FREEZE", reason, q)
    rejected(conn, signal(conn, "AAA", "close"), "BREAKER_FREEZE", reason, q)
    rejected(conn, signal(conn, "AAA", "sell"), "BREAKER_FREEZE", reason, q)
    rejected(conn, manual(conn, "AAA", "sell", "5"), "BREAKER_FREEZE", reason, q)
    assert conn.execute("SELECT count(*) FROM trading.orders WHERE status = 'created'"
                        ).fetchone()[0] == 0


# ------------------------------------------------------------------ hierarchy


def test_first_denial_wins_global_market_strategy_symbol(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn)
    # a 0.05 order (500) that every one of these limits refuses
    set_limit(conn, "MAX_POSITION_SIZE", "0.01", "symbol", "AAA")
    rejected(conn, signal(conn, "AAA", size="0.005"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.01, requested=0.0500, scope=symbol:AAA")
    set_limit(conn, "MAX_EXPOSURE", "0.02", "strategy", "s1")
    rejected(conn, signal(conn, "AAA", size="0.005"), "MAX_EXPOSURE",
             "MAX_EXPOSURE: limit=0.02, requested=0.0500, scope=strategy:s1")
    set_limit(conn, "MAX_LEVERAGE", "0.03", "market", "stock")
    rejected(conn, signal(conn, "AAA", size="0.005"), "MAX_LEVERAGE",
             "MAX_LEVERAGE: limit=0.03, requested=0.0500, scope=market:stock")
    # global last in the list, alphabetically after the others, still first to be asked
    set_limit(conn, "MAX_ORDER_VALUE", "400")
    rejected(conn, signal(conn, "AAA", size="0.005"), "MAX_ORDER_VALUE",
             "MAX_ORDER_VALUE: limit=400, requested=500.00")


def test_global_and_symbol_of_the_same_type_global_reported(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    account(conn, cash=100)  # not enough cash either: limits come before trade checks
    set_limit(conn, "MAX_POSITION_SIZE", "0.5", "symbol", "AAA")
    set_limit(conn, "MAX_POSITION_SIZE", "0.6")
    rejected(conn, signal(conn, "AAA", size="0.001"), "MAX_POSITION_SIZE",
             "MAX_POSITION_SIZE: limit=0.6, requested=1.0000, scope=global")


# ------------------------------------------------------------------ reductions


def test_closes_and_reductions_pass_every_limit(conn: psycopg.Connection) -> None:
    stock(conn, "AAA")
    # a net account: the manual exit and the strategy's close move the same position row
    account(conn, aggregation="priority")
    hold(conn, "AAA", "0.01")  # 10 held
    conn.execute("UPDATE trading.accounts SET peak_equity = 1000000")
    for lt, v, params in (("MAX_POSITION_SIZE", "0.0001", {}), ("MAX_EXPOSURE", "0", {}),
                          ("MAX_LEVERAGE", "0", {}), ("MAX_OPEN_POSITIONS", "0", {}),
                          ("MAX_DRAWDOWN", "0.01", {}), ("MIN_VOLUME", "1000000", {}),
                          ("MAX_VOLATILITY", "0", {}), ("REQUIRE_STOP_LOSS", "1", {}),
                          ("MAX_ORDER_VALUE", "0.01", {}), ("MAX_CORRELATION", "0", {}),
                          ("TRADING_HOURS", "1", {"days": [7]})):
        set_limit(conn, lt, v, params=params)
    rejected(conn, signal(conn, "AAA", size="0.02"), "MAX_DRAWDOWN",
             "MAX_DRAWDOWN: limit=0.01, drawdown=0.9900, peak=1000000, equity=10000.00")
    approved(conn, manual(conn, "AAA", "sell", "4"), "4", side="sell")
    r = signal(conn, "AAA", "close")  # what is left after the open exit
    approved(conn, r, "6.00", side="sell")
    assert conn.execute("SELECT count(*), bool_and(reduce_only) FROM trading.orders"
                        " WHERE side = 'sell'").fetchone() == (2, True)
    for (oid, qty) in conn.execute("SELECT order_id, quantity FROM trading.orders"
                                   " WHERE side = 'sell' ORDER BY order_id").fetchall():
        fill(conn, oid, str(qty))
    assert conn.execute("SELECT quantity FROM trading.positions").fetchone()[0] == 0
