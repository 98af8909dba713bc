"""Bars drive protection (migration 0002_06): stops, targets, trailing stops, breakeven,
marking, equity snapshots and the drawdown / daily-loss breakers.

Paper accounts in operator mode get protection from the AFTER INSERT trigger on
market.bars; backtest accounts call trading.on_bar(..., account) themselves. Every
expectation is worked out by hand from small numbers.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import psycopg
import pytest
from psycopg.types.json import Jsonb

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # a Monday
M = timedelta(minutes=1)


def add_instrument(conn: psycopg.Connection, symbol: str = "BTCUSD") -> int:
    return conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES (%s, 'test', 'crypto', %s, 'USD', 0.01, 1, 1, 'CRYPTO_24X7')"
        " RETURNING instrument_id", (symbol, symbol[:-3])).fetchone()[0]


def add_account(conn: psycopg.Connection, name: str, environment: str = "paper",
                mode: str = "operator", cash: int = 10000, allow_short: bool = False,
                aggregation: str = "independent") -> int:
    return conn.execute(
        "SELECT trading.create_account(%s, %s, %s, %s, aggregation => %s, allow_short => %s)",
        (name, environment, mode, cash, aggregation, allow_short)).fetchone()[0]


def bar(conn: psycopg.Connection, inst: int, ts: datetime, o, h, lo, c, tf: str = "1m") -> None:
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, %s, %s, %s, %s, %s, %s, 1)", (inst, tf, ts, o, h, lo, c))


def bars_in_one_insert(conn: psycopg.Connection, inst: int, rows: list[tuple]) -> None:
    """1m bars (open, high, low, close) from T0, one a minute, in a single INSERT: the
    trigger judges them as one batch."""
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) SELECT %s, '1m', t, o, h, l, c, 1 FROM unnest(%s::timestamptz[],"
                 " %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[]) AS x(t, o, h, l, c)",
                 (inst, [T0 + k * M for k in range(len(rows))],
                  *([D(str(r[j])) for r in rows] for j in range(4))))


def on_bar(conn: psycopg.Connection, inst: int, ts: datetime, o, h, lo, c, account=None,
           tf: str = "1m") -> list[int]:
    return conn.execute("SELECT trading.on_bar(%s, %s, %s, %s, %s, %s, %s, %s)",
                        (inst, tf, ts, o, h, lo, c, account)).fetchone()[0]


def signal(conn: psycopg.Connection, **fields) -> dict:
    return conn.execute("SELECT trading.submit_signal(%s)", (Jsonb(fields),)).fetchone()[0]


def fill(conn: psycopg.Connection, order_id: int, fill_id: str, qty, price, ts=None) -> dict:
    """A fill dated in market time: ts, or else when the instrument's latest bar closed
    (before any bar, a minute before T0). A position is judged on the bars closing after
    its opening fill, so a fill dated now() would be newer than every bar of 2026-03-02."""
    if ts is None:
        ts = conn.execute(
            "SELECT max(b.ts + market.timeframe_interval(b.timeframe)) FROM market.bars b"
            " WHERE b.instrument_id = (SELECT instrument_id FROM trading.orders"
            " WHERE order_id = %s)", (order_id,)).fetchone()[0] or T0 - M
    return conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "order_id": order_id, "broker_fill_id": fill_id, "quantity": str(qty),
        "price": str(price), "ts": ts.isoformat()}),)).fetchone()[0]


def open_position(conn: psycopg.Connection, account: str, symbol: str, qty: int = 10,
                  price: int = 100, action: str = "buy", strategy: str = "s1",
                  **protection) -> int:
    """A position of qty at price opened through a signal and its fill; its order id."""
    conn.execute("SELECT trading.assign_strategy(%s, %s, 1, 'fixed_quantity', %s)",
                 (account, strategy, Jsonb({"quantity": qty})))
    r = signal(conn, account=account, strategy=strategy, symbol=symbol, action=action,
               price=price, **protection)
    assert r["status"] == "approved", r
    assert fill(conn, r["order_id"], f"f-{r['order_id']}", qty, price)["status"] == "applied"
    return r["order_id"]


def exits(conn: psycopg.Connection, account_id: int | None = None) -> list[tuple]:
    """Protective / closing orders: (side, quantity, reduce_only, trigger, trigger_price)."""
    return conn.execute(
        "SELECT side::text, quantity, reduce_only, trigger::text, trigger_price, order_type::text"
        " FROM trading.orders WHERE trigger NOT IN ('signal', 'manual')"
        " AND (%s::bigint IS NULL OR account_id = %s) ORDER BY order_id",
        (account_id, account_id)).fetchall()


def position(conn: psycopg.Connection, account_id: int, inst: int) -> dict:
    cur = conn.execute(
        "SELECT quantity, average_price, stop_loss, take_profit, trailing_stop, trail_anchor,"
        " breakeven, last_price, marked_at FROM trading.positions"
        " WHERE account_id = %s AND instrument_id = %s", (account_id, inst))
    names = [d.name for d in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


@pytest.fixture
def paper(conn: psycopg.Connection) -> tuple[int, int]:
    """(account id, instrument id): paper operator account P with 10,000 USD; BTCUSD."""
    return add_account(conn, "P"), add_instrument(conn)


# ------------------------------------------------------------------------------ stops


def test_stop_loss_fires_once_with_a_reduce_only_market_order(conn, paper):
    acc, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=95)
    before = conn.execute("SELECT count(*) FROM pgmq.q_orders").fetchone()[0]
    bar(conn, inst, T0, 99, 100, 96, 97)          # above the stop: nothing
    assert exits(conn) == []
    bar(conn, inst, T0 + M, 97, 98, 94, 96)       # low 94 crosses 95
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(95), "market")]
    oid = conn.execute("SELECT order_id FROM trading.orders WHERE trigger = 'stop_loss'"
                       ).fetchone()[0]
    msgs = conn.execute("SELECT message FROM pgmq.q_orders WHERE (message->>'order_id')::bigint"
                        " = %s", (oid,)).fetchall()
    assert len(msgs) == 1 and msgs[0][0]["account_id"] == acc
    assert conn.execute("SELECT count(*) FROM pgmq.q_orders").fetchone()[0] == before + 1
    # a later bar still below the stop: the exit already open covers the position
    bar(conn, inst, T0 + 2 * M, 96, 96, 90, 91)
    assert len(exits(conn)) == 1
    # the stop order fills: the trade is recorded with its trigger
    fill(conn, oid, "stop-1", 10, 95)
    assert conn.execute("SELECT quantity, exit_trigger::text, pnl FROM trading.trades"
                        ).fetchall() == [(D(10), "stop_loss", D(-50))]


def test_gap_through_the_stop_fires_at_the_open(conn, paper):
    _, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=95)
    bar(conn, inst, T0, 93, 94, 92, 93)
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(93), "market")]


def test_stop_wins_over_target_inside_one_bar(conn, paper):
    _, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=95, take_profit=110)
    bar(conn, inst, T0, 100, 111, 94, 100)
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(95), "market")]


def test_take_profit_at_the_target(conn, paper):
    _, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=95, take_profit=110)
    bar(conn, inst, T0, 100, 109, 99, 108)
    assert exits(conn) == []
    bar(conn, inst, T0 + M, 108, 111, 107, 109)
    assert exits(conn) == [("sell", D(10), True, "take_profit", D(110), "market")]


def test_take_profit_on_a_gap_up_fires_at_the_open(conn, paper):
    _, inst = paper
    open_position(conn, "P", "BTCUSD", take_profit=110)
    bar(conn, inst, T0, 112, 115, 111, 114)
    assert exits(conn) == [("sell", D(10), True, "take_profit", D(112), "market")]


def test_a_bar_is_judged_once(conn, paper):
    """The same bar again, an older bar, a coarser bar ending at the same time: no refire."""
    acc, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=95)
    bar(conn, inst, T0 + 4 * M, 97, 98, 94, 96)   # 10:04-10:05 fires
    assert len(exits(conn)) == 1
    oid = conn.execute("SELECT order_id FROM trading.orders WHERE trigger = 'stop_loss'"
                       ).fetchone()[0]
    conn.execute("SELECT trading.cancel_order(%s, 'test')", (str(oid),))  # exit gone
    # the very same bar again (replayed by a feed): nothing
    assert on_bar(conn, inst, T0 + 4 * M, 97, 98, 94, 96) == []
    # an older bar
    bar(conn, inst, T0 + 2 * M, 97, 98, 90, 96)
    # a coarser bar ending at the same time: 5m bar 10:00-10:05
    bar(conn, inst, T0, 99, 100, 90, 96, tf="5m")
    assert len(exits(conn)) == 1
    p = position(conn, acc, inst)
    assert p["marked_at"] == T0 + 5 * M and p["last_price"] == D(96)
    # the next bar does fire again (the exit was cancelled)
    bar(conn, inst, T0 + 5 * M, 96, 96, 93, 94)
    assert exits(conn)[1] == ("sell", D(10), True, "stop_loss", D(95), "market")


def test_an_open_exit_order_prevents_a_second_exit(conn, paper):
    """A strategy's close already on its way: the stop adds nothing."""
    _, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=95)
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="close", price=100)
    assert r["status"] == "approved" and r["quantity"] == 10
    bar(conn, inst, T0, 97, 98, 94, 96)
    assert exits(conn) == []
    assert conn.execute("SELECT count(*) FROM trading.orders WHERE reduce_only").fetchone()[0] == 1


def test_a_partial_exit_order_leaves_only_the_remainder(conn):
    """Net positions (priority aggregation): a manual reduce-only sell of 4 of 10 is open;
    the stop sells the other 6."""
    add_account(conn, "N", aggregation="priority")
    inst = add_instrument(conn)
    open_position(conn, "N", "BTCUSD", stop_loss=95)
    r = conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb({
        "account": "N", "symbol": "BTCUSD", "side": "sell", "quantity": 4,
        "type": "limit", "limit_price": 120, "reduce_only": True}),)).fetchone()[0]
    assert r["status"] == "approved"
    bar(conn, inst, T0, 97, 98, 94, 96)
    assert exits(conn) == [("sell", D(6), True, "stop_loss", D(95), "market")]


# ------------------------------------------------------------------------------ shorts


def test_short_stop_loss_and_gap(conn):
    add_account(conn, "S", allow_short=True)
    inst = add_instrument(conn)
    open_position(conn, "S", "BTCUSD", action="sell", stop_loss=105, take_profit=90)
    assert conn.execute("SELECT quantity FROM trading.positions").fetchone()[0] == -10
    bar(conn, inst, T0, 100, 104, 95, 101)
    assert exits(conn) == []
    bar(conn, inst, T0 + M, 101, 106, 89, 103)    # both inside: the stop
    assert exits(conn) == [("buy", D(10), True, "stop_loss", D(105), "market")]


def test_short_gap_up_through_the_stop_fires_at_the_open(conn):
    add_account(conn, "S", allow_short=True)
    inst = add_instrument(conn)
    open_position(conn, "S", "BTCUSD", action="sell", stop_loss=105)
    bar(conn, inst, T0, 107, 108, 106, 107)
    assert exits(conn) == [("buy", D(10), True, "stop_loss", D(107), "market")]


def test_short_take_profit_and_gap_down(conn):
    add_account(conn, "S", allow_short=True)
    add_account(conn, "S2", allow_short=True)
    inst = add_instrument(conn)
    open_position(conn, "S", "BTCUSD", action="sell", take_profit=90)
    open_position(conn, "S2", "BTCUSD", action="sell", take_profit=95, strategy="s2")
    bar(conn, inst, T0, 94, 96, 89, 91)
    # S: target 90 inside the bar; S2: the bar opened at 94, below its target 95
    assert exits(conn) == [("buy", D(10), True, "take_profit", D(90), "market"),
                           ("buy", D(10), True, "take_profit", D(94), "market")]


def test_short_trailing_stop_follows_the_lows(conn):
    acc = add_account(conn, "S", allow_short=True)
    inst = add_instrument(conn)
    open_position(conn, "S", "BTCUSD", action="sell", trailing_stop=5)
    assert position(conn, acc, inst)["trail_anchor"] == 100
    bar(conn, inst, T0, 100, 103, 96, 97)    # stop 105 not reached; anchor -> 96
    assert exits(conn) == [] and position(conn, acc, inst)["trail_anchor"] == 96
    bar(conn, inst, T0 + M, 97, 101, 97, 100)  # stop 101 reached
    assert exits(conn) == [("buy", D(10), True, "trailing_stop", D(101), "market")]


# ------------------------------------------------------------------------------ trailing


def test_trailing_stop_follows_the_highs(conn, paper):
    acc, inst = paper
    open_position(conn, "P", "BTCUSD", trailing_stop=5)
    p = position(conn, acc, inst)
    assert (p["trailing_stop"], p["trail_anchor"]) == (5, 100)   # anchor: the fill price
    bar(conn, inst, T0, 100, 104, 98, 103)          # stop 95 holds; anchor 104
    assert exits(conn) == [] and position(conn, acc, inst)["trail_anchor"] == 104
    bar(conn, inst, T0 + M, 103, 110, 100, 108)     # stop 99: low 100 holds; anchor 110
    assert exits(conn) == [] and position(conn, acc, inst)["trail_anchor"] == 110
    bar(conn, inst, T0 + 2 * M, 108, 109, 106, 107)  # stop 105: holds; anchor stays 110
    assert exits(conn) == [] and position(conn, acc, inst)["trail_anchor"] == 110
    bar(conn, inst, T0 + 3 * M, 107, 108, 104, 105)  # stop 105 touched
    assert exits(conn) == [("sell", D(10), True, "trailing_stop", D(105), "market")]


def test_trailing_stop_ignores_the_current_bars_high(conn, paper):
    """A bar with high 120 and low 112: with the bar's own high the stop would be 115 and
    fire; it is judged against the stop before the bar (95) and does not."""
    acc, inst = paper
    open_position(conn, "P", "BTCUSD", trailing_stop=5)
    bar(conn, inst, T0, 113, 120, 112, 114)
    assert exits(conn) == []
    assert position(conn, acc, inst)["trail_anchor"] == 120
    bar(conn, inst, T0 + M, 116, 117, 114, 115)     # now the stop is 115
    assert exits(conn) == [("sell", D(10), True, "trailing_stop", D(115), "market")]


def test_trailing_stop_gap_fires_at_the_open(conn, paper):
    _, inst = paper
    open_position(conn, "P", "BTCUSD", trailing_stop=5)
    bar(conn, inst, T0, 106, 110, 106, 108)   # anchor 110 -> stop 105
    bar(conn, inst, T0 + M, 101, 102, 100, 101)
    assert exits(conn) == [("sell", D(10), True, "trailing_stop", D(101), "market")]


def test_trailing_stop_does_not_lower_a_higher_fixed_stop(conn, paper):
    """stop_loss 98 above the trail (100 - 5): the fixed stop is in force and named."""
    _, inst = paper
    open_position(conn, "P", "BTCUSD", trailing_stop=5, stop_loss=98)
    bar(conn, inst, T0, 99, 100, 97, 98)
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(98), "market")]


# ------------------------------------------------------------------------------ breakeven


def test_breakeven_moves_the_stop_to_entry_then_fires(conn, paper):
    acc, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=90, metadata={"breakeven": 105})
    p = position(conn, acc, inst)
    assert (p["stop_loss"], p["breakeven"]) == (90, 105)
    bar(conn, inst, T0, 100, 104, 99, 103)          # not reached
    assert position(conn, acc, inst)["stop_loss"] == 90
    bar(conn, inst, T0 + M, 103, 106, 101, 105)     # reached: stop -> 100 after the bar
    p = position(conn, acc, inst)
    assert (p["stop_loss"], p["breakeven"]) == (100, None)
    assert exits(conn) == []
    bar(conn, inst, T0 + 2 * M, 104, 104, 101, 102)  # above entry: nothing
    assert exits(conn) == []
    bar(conn, inst, T0 + 3 * M, 102, 102, 99, 100)   # back to entry
    assert exits(conn) == [("sell", D(10), True, "breakeven", D(100), "market")]


@pytest.mark.parametrize("side", ["long", "short"])
def test_breakeven_reached_and_then_touched_within_one_insert_fires(conn, side):
    # one insert of two bars: the first reaches breakeven (the stop moves to the entry),
    # the second comes back to the entry, while the original stop is never touched
    add_account(conn, "P", allow_short=True)
    inst = add_instrument(conn)
    long_ = side == "long"
    open_position(conn, "P", "BTCUSD", action="buy" if long_ else "sell",
                  stop_loss=90 if long_ else 110, metadata={"breakeven": 105 if long_ else 95})
    rows = ([(100, 106, 100, 105), (104, 104, 99, 100)] if long_ else
            [(99.5, 99.5, 94, 95), (96, 101, 96, 100)])
    bars_in_one_insert(conn, inst, rows)
    assert exits(conn) == [("sell" if long_ else "buy", D(10), True, "breakeven", D(100),
                            "market")]


@pytest.mark.parametrize("side", ["long", "short"])
def test_a_trailing_stop_moved_and_then_touched_within_one_insert_fires(conn, side):
    # trailing 3 from 100: the first bar of the insert moves the anchor 6 away (the stop
    # follows to 3 from it), the second touches that moved stop, never the first one
    add_account(conn, "P", allow_short=True)
    inst = add_instrument(conn)
    long_ = side == "long"
    open_position(conn, "P", "BTCUSD", action="buy" if long_ else "sell", trailing_stop=3)
    rows = ([(100, 106, 100, 105), (104, 104, 102, 103)] if long_ else
            [(100, 100, 94, 95), (96, 98, 96, 97)])
    bars_in_one_insert(conn, inst, rows)
    assert exits(conn) == [("sell" if long_ else "buy", D(10), True, "trailing_stop",
                            D(103) if long_ else D(97), "market")]


def test_breakeven_reached_and_dipped_in_one_bar_does_not_fire_at_entry(conn, paper):
    """The stop moves only after the bar: the bar that reached breakeven and dipped to
    99 is judged against the old stop 90."""
    acc, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=90, metadata={"breakeven": 105})
    bar(conn, inst, T0, 100, 106, 99, 101)
    assert exits(conn) == []
    assert position(conn, acc, inst)["stop_loss"] == 100


def test_short_breakeven(conn):
    acc = add_account(conn, "S", allow_short=True)
    inst = add_instrument(conn)
    open_position(conn, "S", "BTCUSD", action="sell", stop_loss=110,
                  metadata={"breakeven": 95})
    bar(conn, inst, T0, 100, 101, 94, 96)
    assert position(conn, acc, inst)["stop_loss"] == 100
    bar(conn, inst, T0 + M, 96, 100, 95, 99)
    assert exits(conn) == [("buy", D(10), True, "breakeven", D(100), "market")]


# ------------------------------------------------------------------------------ marking


def test_marking_and_equity_snapshots(conn, paper):
    acc, inst = paper
    open_position(conn, "P", "BTCUSD")     # 10 at 100: cash 9,000
    bar(conn, inst, T0, 100, 103, 99, 102)
    p = position(conn, acc, inst)
    assert (p["last_price"], p["marked_at"]) == (102, T0 + M)
    bar(conn, inst, T0 + M, 102, 102, 90, 91, tf="1m")
    bar(conn, inst, T0 + 2 * M, 91, 96, 91, 95)
    rows = conn.execute("SELECT ts, cash, positions_value, equity, peak_equity,"
                        " round(drawdown, 8) FROM trading.equity_snapshots"
                        " WHERE account_id = %s ORDER BY ts", (acc,)).fetchall()
    assert rows == [
        (T0 + M, 9000, 1020, 10020, 10020, 0),
        (T0 + 2 * M, 9000, 910, 9910, 10020, D("0.01097804")),   # 110 / 10,020
        (T0 + 3 * M, 9000, 950, 9950, 10020, D("0.00698603")),   # 70 / 10,020
    ]
    # an hourly bar closes at its end: marked_at = ts + 1 hour
    bar(conn, inst, T0 + timedelta(hours=1), 95, 97, 94, 96, tf="1h")
    assert position(conn, acc, inst)["marked_at"] == T0 + timedelta(hours=2)


def test_backtest_account_is_driven_by_on_bar_only(conn):
    acc = add_account(conn, "B", environment="backtest")
    inst = add_instrument(conn)
    open_position(conn, "B", "BTCUSD", stop_loss=95)
    bar(conn, inst, T0, 97, 98, 94, 96)   # the trigger leaves backtest accounts alone
    assert exits(conn) == [] and position(conn, acc, inst)["marked_at"] is None
    assert conn.execute("SELECT count(*) FROM trading.equity_snapshots").fetchone()[0] == 0
    ids = on_bar(conn, inst, T0, 97, 98, 94, 96, account=acc)
    assert len(ids) == 1
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(95), "market")]
    assert conn.execute("SELECT order_id FROM trading.orders WHERE trigger = 'stop_loss'"
                        ).fetchone()[0] == ids[0]
    assert conn.execute("SELECT equity FROM trading.equity_snapshots WHERE account_id = %s",
                        (acc,)).fetchall() == [(D(9960),)]
    # the same bar again returns nothing
    assert on_bar(conn, inst, T0, 97, 98, 94, 96, account=acc) == []


def test_on_bar_for_one_account_leaves_the_others(conn):
    b = add_account(conn, "B", environment="backtest")
    p = add_account(conn, "P")
    inst = add_instrument(conn)
    open_position(conn, "B", "BTCUSD", stop_loss=95)
    open_position(conn, "P", "BTCUSD", stop_loss=95, strategy="s2")
    on_bar(conn, inst, T0, 97, 98, 94, 96, account=b)
    assert exits(conn, p) == [] and len(exits(conn, b)) == 1


def test_bars_of_instruments_nobody_holds_do_nothing(conn, paper):
    acc, inst = paper
    other = add_instrument(conn, "ETHUSD")
    open_position(conn, "P", "BTCUSD", stop_loss=95)
    bar(conn, other, T0, 10, 11, 1, 2)
    assert on_bar(conn, other, T0 + M, 10, 11, 1, 2) == []
    assert conn.execute("SELECT count(*) FROM trading.equity_snapshots").fetchone()[0] == 0
    assert exits(conn) == [] and position(conn, acc, inst)["marked_at"] is None


def test_closed_positions_are_not_protected(conn, paper):
    acc, inst = paper
    oid = open_position(conn, "P", "BTCUSD", stop_loss=95)
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="close", price=100)
    fill(conn, r["order_id"], "close-1", 10, 100)
    assert oid and position(conn, acc, inst)["quantity"] == 0
    bar(conn, inst, T0, 97, 98, 90, 96)
    assert conn.execute("SELECT count(*) FROM trading.orders").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM trading.equity_snapshots").fetchone()[0] == 0


# ------------------------------------------------------------------------------ breakers


def test_max_drawdown_trips_hard_and_closes(conn, paper):
    acc, inst = paper
    conn.execute("SELECT risk.set_limit('MAX_DRAWDOWN', 0.05, params => %s)",
                 (Jsonb({"mode": "HARD"}),))
    open_position(conn, "P", "BTCUSD")   # 10 at 100, no stop; equity 10,000 (peak)
    bar(conn, inst, T0, 100, 100, 96, 96)   # equity 9,960: drawdown 0.4 %
    assert conn.execute("SELECT mode::text FROM risk.breaker_state").fetchone()[0] == "OK"
    bar(conn, inst, T0 + M, 96, 96, 49, 50)   # equity 9,500: drawdown 5 %
    assert conn.execute("SELECT mode::text FROM risk.breaker_state WHERE account_id = %s",
                        (acc,)).fetchone()[0] == "HARD"
    assert exits(conn) == [("sell", D(10), True, "breaker", None, "market")]
    ev = conn.execute("SELECT severity::text, event_type, details->>'mode' FROM risk.events"
                      " WHERE account_id = %s", (acc,)).fetchall()
    assert ev == [("critical", "MAX_DRAWDOWN", "HARD")]
    snap = conn.execute("SELECT equity, drawdown FROM trading.equity_snapshots"
                        " WHERE ts = %s", (T0 + 2 * M,)).fetchone()
    assert snap == (9500, D("0.05"))
    # entries are refused now (the closing order counts: the position is 0 after it)
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="buy", price=50)
    assert (r["status"], r["reason_code"]) == ("rejected", "BREAKER_HARD")


def test_daily_loss_trips_soft_without_closing(conn, paper):
    acc, inst = paper
    conn.execute("SELECT risk.set_limit('DAILY_LOSS', 300, params => %s)",
                 (Jsonb({"mode": "SOFT"}),))
    open_position(conn, "P", "BTCUSD")   # 10 at 100
    bar(conn, inst, T0, 100, 100, 99, 100)     # equity 10,000 at the day's first bar
    bar(conn, inst, T0 + M, 100, 100, 79, 80)  # equity 9,800: loss 200 < 300
    assert conn.execute("SELECT mode::text FROM risk.breaker_state").fetchone()[0] == "OK"
    bar(conn, inst, T0 + 2 * M, 80, 80, 69, 70)  # 9,700: loss 300
    assert conn.execute("SELECT mode::text FROM risk.breaker_state").fetchone()[0] == "SOFT"
    assert exits(conn) == []
    assert conn.execute("SELECT event_type FROM risk.events WHERE account_id = %s",
                        (acc,)).fetchall() == [("DAILY_LOSS",)]
    # the breaker stops entries; closes still pass
    conn.execute("SELECT trading.assign_strategy('P', 's2', 1, 'fixed_quantity', %s)",
                 (Jsonb({"quantity": 1}),))
    r = signal(conn, account="P", strategy="s2", symbol="BTCUSD", action="buy", price=70)
    assert (r["status"], r["reason_code"]) == ("rejected", "BREAKER_SOFT")
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="close", price=70)
    assert r["status"] == "approved"


def test_daily_loss_counts_the_first_bar_of_the_day(conn, paper):
    """Daily bars: every bar starts a new UTC day. The loss of the day is measured from
    the equity the day started with (the last snapshot before it), so a 1d bar that
    loses 500 must trip a 300 limit."""
    acc, inst = paper
    conn.execute("SELECT risk.set_limit('DAILY_LOSS', 300, params => %s)",
                 (Jsonb({"mode": "SOFT"}),))
    open_position(conn, "P", "BTCUSD")   # 10 at 100
    day = datetime(2026, 3, 2, tzinfo=UTC)
    bar(conn, inst, day, 100, 101, 99, 100, tf="1d")             # equity 10,000
    bar(conn, inst, day + timedelta(days=1), 100, 100, 49, 50, tf="1d")  # 9,500
    assert conn.execute("SELECT mode::text FROM risk.breaker_state WHERE account_id = %s",
                        (acc,)).fetchone()[0] == "SOFT"


def test_advisory_accounts_get_a_risk_event_instead_of_an_order(conn):
    acc = add_account(conn, "A", mode="operator")
    inst = add_instrument(conn)
    open_position(conn, "A", "BTCUSD", stop_loss=95)
    conn.execute("SELECT trading.set_advisory('A', 'test')")
    bar(conn, inst, T0, 97, 98, 94, 96)
    assert exits(conn) == []
    ev = conn.execute("SELECT severity::text, event_type, details->>'price' FROM risk.events"
                      " WHERE account_id = %s", (acc,)).fetchall()
    assert ev == [("warning", "STOP_LOSS", "95")]
    # still marked and snapshotted
    assert position(conn, acc, inst)["last_price"] == 96
    assert conn.execute("SELECT count(*) FROM trading.equity_snapshots").fetchone()[0] == 1


def test_a_bar_that_changes_no_peak_leaves_the_account_row_alone(conn, paper):
    """Every bar of a held instrument snapshots equity; the account row (peak, trading
    day, day-start equity) is rewritten only when one of them changes, so that a stream
    of bars does not pile up row versions of the account (see the benchmark)."""
    acc, inst = paper
    open_position(conn, "P", "BTCUSD")          # 10 at 100
    bar(conn, inst, T0, 100, 103, 99, 102)      # new peak 10,020: the row changes
    xmin = conn.execute("SELECT xmin::text, peak_equity FROM trading.accounts"
                        " WHERE account_id = %s", (acc,)).fetchone()
    assert xmin[1] == 10020
    bar(conn, inst, T0 + M, 102, 102, 100, 101)  # equity 10,010: below the peak
    assert conn.execute("SELECT xmin::text, peak_equity FROM trading.accounts"
                        " WHERE account_id = %s", (acc,)).fetchone() == xmin
    assert conn.execute("SELECT equity, round(drawdown, 8) FROM trading.equity_snapshots"
                        " WHERE ts = %s", (T0 + 2 * M,)).fetchone() == (10010, D("0.00099800"))


def test_hedge_legs_are_protected_each_on_its_own(conn):
    acc = conn.execute("SELECT trading.create_account('H', 'paper', 'operator', 10000,"
                       " position_mode => 'hedge', allow_short => true)").fetchone()[0]
    inst = add_instrument(conn)
    open_position(conn, "H", "BTCUSD", stop_loss=95)                  # long leg 10
    open_position(conn, "H", "BTCUSD", action="sell", stop_loss=105)  # short leg 10
    legs = conn.execute("SELECT leg::text, quantity FROM trading.positions WHERE account_id"
                        " = %s ORDER BY leg", (acc,)).fetchall()
    assert legs == [("long", 10), ("short", 10)]
    bar(conn, inst, T0, 100, 106, 94, 100)
    assert conn.execute(
        "SELECT position_leg::text, side::text, quantity, trigger::text, trigger_price"
        " FROM trading.orders WHERE trigger = 'stop_loss' ORDER BY order_id").fetchall() == [
        ("long", "sell", 10, "stop_loss", 95), ("short", "buy", 10, "stop_loss", 105)]


def test_a_stop_and_the_drawdown_breaker_in_one_bar_close_once(conn, paper):
    """The bar fires the stop; the same bar's drawdown trips HARD: the breaker's closing
    pass finds the exit already open and adds nothing."""
    acc, inst = paper
    conn.execute("SELECT risk.set_limit('MAX_DRAWDOWN', 0.05, params => %s)",
                 (Jsonb({"mode": "HARD"}),))
    open_position(conn, "P", "BTCUSD", stop_loss=95)
    bar(conn, inst, T0, 96, 96, 40, 45)       # equity 9,450: drawdown 5.5 %
    assert conn.execute("SELECT mode::text FROM risk.breaker_state WHERE account_id = %s",
                        (acc,)).fetchone()[0] == "HARD"
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(95), "market")]
    assert conn.execute("SELECT details->'closing_orders' FROM risk.events"
                        " WHERE event_type = 'MAX_DRAWDOWN'").fetchone()[0] == []


# ------------------------------------------------------------------------------ races
def test_a_stop_hit_while_a_close_is_being_decided_waits_and_sees_that_close(db_url, conn,
                                                                            paper):
    """A strategy's close and a bar through the stop, in two sessions at once: the bar's
    protection waits for the close's transaction (both lock the account) and then counts
    the close as the exit already on its way, so the position gets one exit, not two
    (two would sell what is held twice; the second fill would be refused)."""
    import threading

    acc, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=95)
    bar(conn, inst, T0, 99, 100, 96, 97)
    with psycopg.connect(db_url) as strategy, psycopg.connect(db_url, autocommit=True) as feed:
        r = strategy.execute("SELECT trading.submit_signal(%s)", (Jsonb({
            "account": "P", "strategy": "s1", "symbol": "BTCUSD", "action": "close",
            "price": 97}),)).fetchone()[0]
        assert r["status"] == "approved"  # not committed yet
        done = threading.Event()
        errors: list[BaseException] = []

        def stop_bar() -> None:
            try:
                bar(feed, inst, T0 + M, 97, 98, 94, 96)  # low 94 crosses the stop at 95
            except BaseException as exc:  # (reported below)
                errors.append(exc)
            done.set()

        t = threading.Thread(target=stop_bar)
        t.start()
        try:
            assert not done.wait(0.5), "the bar's protection did not wait for the close"
        finally:
            strategy.commit()
            t.join(10)
        assert errors == []
    closing = conn.execute("SELECT trigger::text, quantity FROM trading.orders"
                           " WHERE reduce_only ORDER BY order_id").fetchall()
    assert closing == [("signal", D(10))]
    assert position(conn, acc, inst)["last_price"] == D(96)  # the bar still marked it


def insert_waiting_for_a_lock(conn: psycopg.Connection, feed: psycopg.Connection, inst: int,
                              ts: datetime, o, h, lo, c) -> tuple[threading.Thread, list]:
    """Insert a bar on `feed` in a thread, and return once that insert waits for a lock
    (seen from `conn` in pg_stat_activity); the thread and the errors it will report."""
    errors: list[BaseException] = []

    def insert() -> None:
        try:
            bar(feed, inst, ts, o, h, lo, c)
        except BaseException as exc:  # (reported through errors)
            errors.append(exc)

    t = threading.Thread(target=insert)
    t.start()
    for _ in range(500):
        waiting = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                               (feed.info.backend_pid,)).fetchone()
        if waiting and waiting[0] == "Lock":
            return t, errors
        time.sleep(0.01)
    t.join(10)
    raise AssertionError(f"the bar insert never waited for a lock (errors: {errors})")


def test_a_position_opened_while_an_insert_waits_for_its_locks_is_not_judged_by_it(
        db_url, conn):
    """The bars trigger locks the accounts that hold the instrument, then judges their
    positions. A position of another account, opened by a fill that committed while the
    insert waited for those locks, is neither judged nor locked by that insert: it opened
    after the bar, and its account's lock was never taken (judging it broke the order in
    which every writer takes accounts, and raced that account's own exits)."""
    inst = add_instrument(conn, "LKUSD")
    a = add_account(conn, "LA")  # the lower id: not an account the insert locks
    b = add_account(conn, "LB")
    bar(conn, inst, T0, 100, 100, 100, 100)
    open_position(conn, "LB", "LKUSD", stop_loss=50)
    conn.execute("SELECT trading.assign_strategy('LA', 's1', 1, 'fixed_quantity', %s)",
                 (Jsonb({"quantity": 10}),))
    r = signal(conn, account="LA", strategy="s1", symbol="LKUSD", action="buy", price=100,
               stop_loss=95)
    assert r["status"] == "approved", r
    with psycopg.connect(db_url) as holder, psycopg.connect(db_url, autocommit=True) as feed:
        holder.execute("SELECT 1 FROM trading.accounts WHERE account_id = %s FOR UPDATE", (b,))
        # its low 90 would cross A's stop at 95; it waits for B's lock
        t, errors = insert_waiting_for_a_lock(conn, feed, inst, T0 + M, 100, 100, 90, 92)
        try:
            # A's position opens now, committed while the insert waits
            assert fill(conn, r["order_id"], "la-1", 10, 100)["status"] == "applied"
        finally:
            holder.commit()
            t.join(10)
        assert errors == []
    assert exits(conn, a) == []
    assert position(conn, a, inst)["marked_at"] is None
    assert position(conn, b, inst)["last_price"] == D(92)  # B, locked, was judged


def test_a_writer_of_several_accounts_that_locks_them_first_never_deadlocks_with_a_bar(
        db_url, conn):
    """Every audit event locks the audit chain's head until commit. A router taking two
    accounts' orders into the paper book in one transaction audits the first before it
    touches the second; a bar insert holding the second and auditing its stop's exit
    then waited for it as it waited for the bar (a deadlock). With trading.lock_accounts
    first (as the router and the strategy worker call it) the bar waits its turn."""
    inst = add_instrument(conn, "DLUSD")
    other = add_instrument(conn, "DOUSD")
    x = add_account(conn, "DX")
    y = add_account(conn, "DY")
    assert x < y
    bar(conn, inst, T0, 100, 100, 100, 100)
    bar(conn, other, T0, 100, 100, 100, 100)
    open_position(conn, "DY", "DLUSD", stop_loss=95)
    conn.execute("SELECT trading.assign_strategy('DX', 's1', 1, 'fixed_quantity', %s)",
                 (Jsonb({"quantity": 1}),))
    pending = [signal(conn, account=name, strategy="s1", symbol="DOUSD", action="buy",
                      price=100)["order_id"] for name in ("DX", "DY")]
    coids = [conn.execute("SELECT client_order_id FROM trading.orders WHERE order_id = %s",
                          (o,)).fetchone()[0] for o in pending]
    with psycopg.connect(db_url) as router, psycopg.connect(db_url, autocommit=True) as feed:
        router.execute("SET ROLE mmats_router")
        router.execute("SELECT trading.lock_accounts(%s)", ([y, x],))
        router.execute("SELECT trading.acknowledge_order(%s, 'p-x')", (coids[0],))
        # its low 90 crosses DY's stop at 95: an exit, and its audit event
        t, errors = insert_waiting_for_a_lock(conn, feed, inst, T0 + M, 100, 100, 90, 92)
        try:
            router.execute("SELECT trading.acknowledge_order(%s, 'p-y')", (coids[1],))
            router.commit()
        finally:
            t.join(10)
        assert errors == []
    assert [r[3] for r in exits(conn, y)] == ["stop_loss"]
    assert [conn.execute("SELECT status::text FROM trading.orders WHERE order_id = %s",
                         (o,)).fetchone()[0] for o in pending] == ["submitted", "submitted"]


# ------------------------------------------------------------------ many instruments


def test_one_insert_of_many_instruments_decides_as_one_insert_per_instrument(conn):
    # Twin books: accounts A0-A2 on instruments AX0-AX2 and B0-B2 on BX0-BX2 hold the same
    # positions with the same protection (long and short; stops, targets, trailing stops,
    # breakeven) and see the same bars. A's bars arrive in one insert for all three
    # instruments; B's one instrument at a time. The trigger judges A's in one pass over
    # every position: it must give the same exits, in the same order, and the same marks.
    books = {}
    for book in "AB":
        insts = [add_instrument(conn, f"{book}X{i}USD") for i in range(3)]
        accs = [add_account(conn, f"{book}{j}", allow_short=True) for j in range(3)]
        books[book] = (insts, accs)
        for i in range(3):
            for j in range(3):
                k = 3 * i + j
                long_ = k % 2 == 0
                protection = {
                    0: {"stop_loss": 97 if long_ else 103},
                    1: {"take_profit": 104 if long_ else 96},
                    2: {"trailing_stop": 2},
                    3: {"stop_loss": 90 if long_ else 110,
                        "metadata": {"breakeven": 102 if long_ else 98}},
                }[k % 4]
                open_position(conn, f"{book}{j}", f"{book}X{i}USD", qty=1 + j,
                              action="buy" if long_ else "sell", strategy=f"s{i}", **protection)
    paths = [  # (open, high, low, close) per minute, one path per instrument
        [(100, 101, 99, 100), (100, 103, 99, 102), (102, 105, 101, 104), (104, 104, 96, 97)],
        [(100, 100, 98, 99), (99, 99, 95, 96), (96, 100, 96, 99), (99, 106, 99, 105)],
        [(100, 102, 100, 101), (101, 101, 99, 100), (100, 100, 100, 100), (100, 111, 89, 95)],
    ]
    rows = {book: [(books[book][0][i], T0 + k * M) + path[k] for k in range(4)
                   for i, path in enumerate(paths)] for book in "AB"}
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low,"
                 " close, volume) SELECT i, '1m', t, o, h, l, c, 1 FROM unnest("
                 "%s::bigint[], %s::timestamptz[], %s::numeric[], %s::numeric[],"
                 " %s::numeric[], %s::numeric[]) AS x(i, t, o, h, l, c)",
                 [list(col) for col in zip(*rows["A"], strict=True)])
    for i in range(3):  # B: instrument by instrument, a bar at a time
        for r in rows["B"][i::3]:
            bar(conn, *r)

    def outcome(book: str) -> tuple[list, list]:
        insts, accs = books[book]
        orders = conn.execute(
            "SELECT array_position(%s, instrument_id), array_position(%s, account_id),"
            " side::text, quantity, trigger::text, trigger_price FROM trading.orders"
            " WHERE trigger NOT IN ('signal', 'manual') AND account_id = ANY(%s)"
            " ORDER BY order_id", (insts, accs, accs)).fetchall()
        marks = conn.execute(
            "SELECT array_position(%s, instrument_id), array_position(%s, account_id),"
            " quantity, stop_loss, trail_anchor, breakeven, last_price, marked_at"
            " FROM trading.positions WHERE account_id = ANY(%s) ORDER BY 1, 2",
            (insts, accs, accs)).fetchall()
        return orders, marks

    a_orders, a_marks = outcome("A")
    b_orders, b_marks = outcome("B")
    assert len(a_orders) >= 6  # stops, targets, trailing stops and breakeven all fired
    assert {o[4] for o in a_orders} == {"stop_loss", "take_profit", "trailing_stop", "breakeven"}
    assert [o[2:] for o in sorted(a_orders)] == [o[2:] for o in sorted(b_orders)]
    assert sorted(a_orders) == sorted(b_orders)
    # in one pass the exits are made instrument by instrument, then account by account
    assert a_orders == sorted(a_orders, key=lambda o: (o[0], o[1]))
    assert a_marks == b_marks and all(m[7] == T0 + 4 * M for m in a_marks)


def test_a_position_is_judged_only_on_bars_newer_than_its_own_mark(conn):
    # A has been marked through 10:05; B, on another account, has no mark: its fill, of
    # 10:02:30, is reported only now. A batch brings a late bar for the gap at 10:02 (low
    # 90, closing after B's fill) and the next bar (low 99): the late bar is older than
    # A's mark, so only B's stop (95) fires on it.
    add_instrument(conn)
    a, b = add_account(conn, "A"), add_account(conn, "B")
    inst = conn.execute("SELECT instrument_id FROM market.instruments").fetchone()[0]
    open_position(conn, "A", "BTCUSD", stop_loss=95)
    for k in (0, 1, 3, 4):
        bar(conn, inst, T0 + k * M, 100, 101, 99, 100)
    conn.execute("SELECT trading.assign_strategy('B', 's1', 1, 'fixed_quantity', %s)",
                 (Jsonb({"quantity": 10}),))
    r = signal(conn, account="B", strategy="s1", symbol="BTCUSD", action="buy", price=100,
               stop_loss=95)
    assert fill(conn, r["order_id"], "fb", 10, 100, ts=T0 + 2.5 * M)["status"] == "applied"
    assert [position(conn, x, inst)["marked_at"] for x in (a, b)] == [T0 + 5 * M, None]
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1m', %s, 100, 100, 90, 96, 1),"
                 " (%s, '1m', %s, 100, 101, 99, 100, 1)", (inst, T0 + 2 * M, inst, T0 + 5 * M))
    assert exits(conn, a) == []
    assert exits(conn, b) == [("sell", D(10), True, "stop_loss", D(95), "market")]
    assert [position(conn, x, inst)["marked_at"] for x in (a, b)] == [T0 + 6 * M] * 2


def test_a_stop_on_the_accounts_own_row_fires_beside_a_strategys_open_close(conn, paper):
    # An independent account: s1's row (10, no stop) has its close on the way; the
    # account's own row (a manual buy of 10, stop 90) is hit. s1's close reduces s1's row
    # only, so the stop sends the account's row its own exit.
    inst = paper[1]
    bar(conn, inst, T0, 100, 100, 100, 100)
    open_position(conn, "P", "BTCUSD")
    m = conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb({
        "account": "P", "symbol": "BTCUSD", "side": "buy", "quantity": 10,
        "stop_loss": 90}),)).fetchone()[0]
    assert m["status"] == "approved", m
    assert fill(conn, m["order_id"], "m", 10, 100)["status"] == "applied"
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="close")
    assert (r["status"], r["side"], r["quantity"]) == ("approved", "sell", 10)
    bar(conn, inst, T0 + M, 95, 95, 85, 86)          # low 85 under the stop (90)
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(90), "market")]
    assert conn.execute("SELECT strategy_id FROM trading.orders WHERE trigger = 'stop_loss'"
                        ).fetchone()[0] is None


def test_a_bar_that_closed_before_the_entry_neither_fires_nor_marks(conn, paper):
    # Bought at 100 at 10:05:10 with a stop at 95 (a fill sets no mark). Bars inserted
    # afterwards that closed before the fill (a backfill after a reconnect, an import of
    # history) are not the position's: no stop, no mark. The bar holding the fill is.
    acc, inst = paper
    conn.execute("SELECT trading.assign_strategy('P', 's1', 1, 'fixed_quantity', %s)",
                 (Jsonb({"quantity": 10}),))
    r = signal(conn, account="P", strategy="s1", symbol="BTCUSD", action="buy", price=100,
               stop_loss=95)
    at = T0 + 5 * M + timedelta(seconds=10)
    assert fill(conn, r["order_id"], "f", 10, 100, ts=at)["status"] == "applied"
    assert position(conn, acc, inst)["marked_at"] is None
    bar(conn, inst, T0 - 10 * M, 96, 97, 90, 91)     # 09:50, closed 15 minutes before
    bar(conn, inst, T0 + 4 * M, 96, 97, 90, 91)      # 10:04, closed 10 seconds before
    assert exits(conn) == []
    p = position(conn, acc, inst)
    assert (p["last_price"], p["marked_at"]) == (D(100), None)
    bar(conn, inst, T0 + 5 * M, 100, 100, 94, 96)    # 10:05-10:06 holds the fill: judged
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(95), "market")]
    p = position(conn, acc, inst)
    assert (p["last_price"], p["marked_at"]) == (D(96), T0 + 6 * M)
    bar(conn, inst, T0 + 3 * M, 90, 90, 80, 81)      # older than the mark: ignored
    p = position(conn, acc, inst)
    assert (p["last_price"], p["marked_at"]) == (D(96), T0 + 6 * M)
    assert len(exits(conn)) == 1
