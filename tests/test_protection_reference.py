"""The set-based bar protection (migration 0004_04) decides exactly as the per-position
one it replaced (0004_03), on random books and bars (hypothesis).

The replaced trading.protect_bars is created again, from its migration's own text, as
ref.protect_bars. Each example builds twin backtest accounts holding the same positions
(long and short; stops, targets, trailing stops and breakeven drawn at random; marked up
to a random time or never) and gives both functions the same random batch of bars, which
may hold bars of another instrument and, at some times, a 5-minute bar closing with a
1-minute one. The orders made (side, quantity, trigger, price, reference price, leg,
strategy, in order), the advisory risk events, the marks left on every position and the
accounts and time returned must be the same. Each example is rolled back.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MIGRATIONS = Path(__file__).resolve().parent.parent / "db" / "sql" / "migrations"
T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
M = timedelta(minutes=1)
_names = itertools.count(1)


def reference_protect_bars() -> str:
    """0004_03's trading.protect_bars, renamed ref.protect_bars."""
    text = (MIGRATIONS / "0004_03_pre_protection_locks.sql").read_text()
    start = text.index("CREATE OR REPLACE FUNCTION trading.protect_bars(")
    end = text.index("$$;", start) + 3
    return text[start:end].replace("FUNCTION trading.protect_bars(", "FUNCTION ref.protect_bars(")


def _one(conn: psycopg.Connection, query: str, args: tuple) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture
def world(conn: psycopg.Connection) -> dict[str, Any]:
    conn.execute("CREATE SCHEMA ref")
    conn.execute(reference_protect_bars())
    insts = [_one(
        conn, "INSERT INTO market.instruments (symbol, venue, market, base_currency,"
        " quote_currency, price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES (%s, 'test', 'crypto', %s, 'USD', 0.01, 1, 1, 'CRYPTO_24X7')"
        " RETURNING instrument_id", (sym, sym[:3])) for sym in ("AAAUSD", "BBBUSD")]
    strategies = [_one(conn, "INSERT INTO trading.strategies (name) VALUES (%s)"
                             " RETURNING strategy_id", (f"s{k}",)) for k in range(3)]
    return {"inst": insts[0], "other": insts[1], "strategies": strategies}


price = st.integers(80, 120)
position = st.fixed_dictionaries({
    "long": st.booleans(),
    "entry": price,
    "stop": st.none() | st.integers(1, 15),        # distance from the entry
    "target": st.none() | st.integers(1, 15),
    "trailing": st.none() | st.integers(1, 10),
    "breakeven": st.none() | st.integers(1, 10),
    "marked": st.none() | st.integers(-2, 3),       # minutes from T0
})
bar_moves = st.lists(st.tuples(st.integers(-6, 6), st.integers(0, 5), st.integers(0, 5),
                               st.integers(-6, 6), st.booleans()), min_size=1, max_size=6)


def _bars(inst: int, other: int, moves: list[tuple]) -> list[tuple]:
    """1m bars from T0 on a random walk from 100, a 5m bar closing with some of them, and
    one bar of another instrument (which must change nothing)."""
    rows, close = [], 100
    for k, (d_open, up, down, d_close, five) in enumerate(moves):
        o = max(close + d_open, 20)
        c = max(o + d_close, 20)
        h, lo = max(o, c) + up, max(min(o, c) - down, 1)
        rows.append((inst, "1m", T0 + k * M, o, h, lo, c))
        if five and k >= 4:
            rows.append((inst, "5m", T0 + (k - 4) * M, o, h + 2, max(lo - 2, 1), c + 1))
        close = c
    rows.append((other, "1m", T0, 100, 200, 1, 100))
    return rows


def _book(conn: psycopg.Connection, world: dict[str, Any], positions: list[dict],
          mode: str) -> int:
    acc = _one(conn, "SELECT trading.create_account(%s, 'backtest', %s, 100000,"
                     " allow_short => true)", (f"ref{next(_names)}", mode))
    for strategy, p in zip(world["strategies"], positions, strict=False):
        sign = 1 if p["long"] else -1
        entry = D(p["entry"])
        conn.execute(
            "INSERT INTO trading.positions (account_id, instrument_id, strategy_id, leg,"
            " quantity, average_price, stop_loss, take_profit, trailing_stop, trail_anchor,"
            " breakeven, marked_at, opened_at, entry_strategy_id)"
            " VALUES (%s, %s, %s, 'net', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (acc, world["inst"], strategy, sign * 10, entry,
             None if p["stop"] is None else entry - sign * p["stop"],
             None if p["target"] is None else entry + sign * p["target"],
             p["trailing"], entry if p["trailing"] else None,
             None if p["breakeven"] is None else entry + sign * p["breakeven"],
             None if p["marked"] is None else T0 + p["marked"] * M, T0 - M, strategy))
    return int(acc)


def _outcome(conn: psycopg.Connection, acc: int) -> tuple[list, list, list]:
    orders = conn.execute(
        "SELECT side::text, quantity, trigger::text, trigger_price, reference_price,"
        " position_leg::text, strategy_id, reduce_only FROM trading.orders"
        " WHERE account_id = %s ORDER BY order_id", (acc,)).fetchall()
    events = conn.execute(
        "SELECT event_type, details ->> 'price', details ->> 'bar_close' FROM risk.events"
        " WHERE account_id = %s ORDER BY event_id", (acc,)).fetchall()
    marks = conn.execute(
        "SELECT strategy_id, quantity, stop_loss, take_profit, trailing_stop, trail_anchor,"
        " breakeven, last_price, marked_at FROM trading.positions WHERE account_id = %s"
        " ORDER BY strategy_id", (acc,)).fetchall()
    return orders, events, marks


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(positions=st.lists(position, min_size=1, max_size=3), moves=bar_moves,
       advisory=st.booleans())
def test_set_based_protection_decides_as_the_per_position_one(
        conn: psycopg.Connection, world: dict[str, Any], positions: list[dict],
        moves: list[tuple], advisory: bool) -> None:
    mode = "advisory" if advisory else "operator"
    bars = _bars(world["inst"], world["other"], moves)
    with conn.transaction(force_rollback=True):
        a, b = _book(conn, world, positions, mode), _book(conn, world, positions, mode)
        batch = "ARRAY(SELECT ROW(i, tf::market.timeframe, t, o, h, l, c, 1)::market.bars" \
                " FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[], %s::numeric[]," \
                " %s::numeric[], %s::numeric[], %s::numeric[]) AS x(i, tf, t, o, h, l, c))"
        cols = [list(col) for col in zip(*bars, strict=True)]
        new = conn.execute(f"SELECT cardinality(order_ids), touched, marked_until FROM"
                           f" trading.protect_bars(%s, {batch}, %s, false)",
                           [world["inst"], *cols, a]).fetchone()
        old = conn.execute(f"SELECT cardinality(order_ids), touched, marked_until FROM"
                           f" ref.protect_bars(%s, {batch}, %s, false)",
                           [world["inst"], *cols, b]).fetchone()
        assert new is not None and old is not None
        assert (new[0], new[2]) == (old[0], old[2])
        assert (new[1] == [a]) == (old[1] == [b]) and (new[1] in ([], [a]))
        assert _outcome(conn, a) == _outcome(conn, b)
