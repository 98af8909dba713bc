"""Concurrent sessions racing for one risk limit: the account lock taken by submit_signal
must make the gate decide one order at a time, and open (not yet filled) entry orders must
count, so that N racers can never pass a limit that leaves room for K < N of them."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

ROUNDS = 3
TS = "2026-03-02T12:00:00Z"


def _setup(conn: psycopg.Connection, symbols: list[str], cash: str) -> None:
    for sym in symbols:
        iid = conn.execute(
            "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
            " price_tick, quantity_step, min_quantity, calendar_id)"
            " VALUES (%s, 'test', 'stock', %s, 'USD', 0.01, 1, 1, 'XNYS') RETURNING instrument_id",
            (sym, sym)).fetchone()[0]
        conn.execute(
            "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)"
            " VALUES (%s, '1d', '2026-03-01T00:00:00Z', 100, 100, 100, 100, 1000)", (iid,))
    conn.execute("SELECT trading.create_account('race', 'backtest', 'operator', %s::numeric)",
                 (cash,))
    conn.execute("SELECT trading.assign_strategy('race', 'racer', 1, 'fixed_quantity',"
                 " '{\"quantity\": 1}')")


def _race(db_url: str, symbols: list[str], size: str = "1",
          strategies: list[str] | None = None) -> list[dict[str, Any]]:
    """Each symbol's buy in its own session, all released at once by a barrier."""
    strategies = strategies or ["racer"] * len(symbols)
    conns = [psycopg.connect(db_url, autocommit=True) for _ in symbols]
    barrier = threading.Barrier(len(symbols))
    results: list[Any] = [None] * len(symbols)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = conns[i].execute("SELECT trading.submit_signal(%s)", (Jsonb({
                "account": "race", "strategy": strategies[i], "symbol": symbols[i],
                "action": "buy", "size": size, "ts": TS}),)).fetchone()[0]
        except Exception as exc:  # reported below, never swallowed
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(symbols))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        for c in conns:
            c.close()
    for r in results:
        assert isinstance(r, dict), f"a racer failed: {r!r}"
    return results


def _reset(conn: psycopg.Connection) -> None:
    """Cancel the open orders of the previous round so the next one starts from zero."""
    for (oid,) in conn.execute(
            "SELECT order_id FROM trading.orders WHERE status = 'created'").fetchall():
        conn.execute("SELECT trading.cancel_order(%s, 'next round')", (str(oid),))


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_max_open_positions_race(db_url: str, conn: psycopg.Connection, round_no: int) -> None:
    symbols = [f"R{i}" for i in range(8)]
    _setup(conn, symbols, "100000")
    conn.execute("SELECT risk.set_limit('MAX_OPEN_POSITIONS', 3)")
    results = _race(db_url, symbols)
    statuses = sorted(r["status"] for r in results)
    assert statuses == ["approved"] * 3 + ["rejected"] * 5
    for r in results:
        if r["status"] == "rejected":
            assert r["reason_code"] == "MAX_OPEN_POSITIONS"
            assert r["reason"] == "MAX_OPEN_POSITIONS: limit=3, requested=4, scope=global"
    # read back: exactly 3 entry orders, 3 messages, 5 rejected signal rows
    assert conn.execute("SELECT count(*), count(DISTINCT instrument_id) FROM trading.orders"
                        ).fetchone() == (3, 3)
    assert conn.execute("SELECT count(*) FROM pgmq.q_orders").fetchone()[0] == 3
    assert conn.execute("SELECT status::text, reason_code, count(*) FROM trading.signals"
                        " GROUP BY 1, 2 ORDER BY 1").fetchall() == [
        ("approved", None, 3), ("rejected", "MAX_OPEN_POSITIONS", 5)]


def test_max_open_positions_race_repeated_after_fills(db_url: str,
                                                       conn: psycopg.Connection) -> None:
    """One filled position plus racers: only two more may open, round after round."""
    symbols = [f"R{i}" for i in range(8)]
    _setup(conn, symbols, "100000")
    conn.execute("SELECT risk.set_limit('MAX_OPEN_POSITIONS', 3)")
    first = conn.execute("SELECT trading.submit_signal(%s)", (Jsonb({
        "account": "race", "strategy": "racer", "symbol": "R0", "action": "buy",
        "ts": TS}),)).fetchone()[0]
    conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "order_id": first["order_id"], "broker_fill_id": "f0", "quantity": 1, "price": 100,
        "ts": TS}),))
    for _ in range(ROUNDS):
        results = _race(db_url, symbols[1:])
        assert sorted(r["status"] for r in results) == ["approved"] * 2 + ["rejected"] * 5
        assert conn.execute("SELECT count(*) FROM trading.orders WHERE status = 'created'"
                            ).fetchone()[0] == 2
        _reset(conn)


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_insufficient_cash_race(db_url: str, conn: psycopg.Connection, round_no: int) -> None:
    symbols = [f"C{i}" for i in range(6)]
    _setup(conn, symbols, "200")  # exactly two orders of 1 x 100
    results = _race(db_url, symbols)
    assert sorted(r["status"] for r in results) == ["approved"] * 2 + ["rejected"] * 4
    for r in results:
        if r["status"] == "rejected":
            assert r["reason_code"] == "INSUFFICIENT_CASH"
            assert r["reason"] == "INSUFFICIENT_CASH: available=0.00, required=100.00"
    assert conn.execute("SELECT count(*), sum(quantity * reference_price) FROM trading.orders"
                        ).fetchone() == (2, 200)
    assert conn.execute("SELECT count(*) FROM pgmq.q_orders").fetchone()[0] == 2
    assert conn.execute("SELECT cash FROM trading.accounts WHERE name = 'race'"
                        ).fetchone()[0] == 200


@pytest.mark.parametrize("round_no", range(ROUNDS))
def test_max_exposure_race(db_url: str, conn: psycopg.Connection, round_no: int) -> None:
    """Equity 1 000, exposure limit 0.3, each racer wants 100 (0.1): three fit."""
    symbols = [f"E{i}" for i in range(8)]
    _setup(conn, symbols, "1000")
    conn.execute("SELECT risk.set_limit('MAX_EXPOSURE', 0.3)")
    results = _race(db_url, symbols)
    assert sorted(r["status"] for r in results) == ["approved"] * 3 + ["rejected"] * 5
    assert {r["reason"] for r in results if r["status"] == "rejected"} == {
        "MAX_EXPOSURE: limit=0.3, requested=0.4000, scope=global"}
    assert conn.execute("SELECT count(*) FROM trading.orders").fetchone()[0] == 3


def test_max_open_positions_symbol_scope_race(db_url: str, conn: psycopg.Connection) -> None:
    """Six strategies of an independent account race for one symbol limited to 2 rows."""
    _setup(conn, ["SYM"], "100000")
    names = [f"st{i}" for i in range(6)]
    for n in names:
        conn.execute("SELECT trading.assign_strategy('race', %s, 1, 'fixed_quantity',"
                     " '{\"quantity\": 1}')", (n,))
    conn.execute("SELECT risk.set_limit('MAX_OPEN_POSITIONS', 2, 'symbol', 'SYM')")
    for _ in range(ROUNDS):
        results = _race(db_url, ["SYM"] * 6, strategies=names)
        assert sorted(r["status"] for r in results) == ["approved"] * 2 + ["rejected"] * 4
        assert {r["reason"] for r in results if r["status"] == "rejected"} == {
            "MAX_OPEN_POSITIONS: limit=2, requested=3, scope=symbol:SYM"}
        assert conn.execute("SELECT count(DISTINCT strategy_id) FROM trading.orders"
                            " WHERE status = 'created'").fetchone()[0] == 2
        _reset(conn)
