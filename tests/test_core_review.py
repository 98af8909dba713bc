"""Migration 0004_14: what a review of the trading core found, each case reproduced on
0004_13 first (its comment says what happened there): a back-dated paper signal passed
the gate at an old price; a manual order took protection on the wrong side and a client
order id written like an order id; a drawdown or daily-loss limit of 0 tripped at once;
the strategy role could move any worker's resume point and stand in for its heartbeat."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal as D
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from test_exits_and_fields import T0, account, manual, one, signal
from test_exits_and_fields import btc as btc  # (the fixture: BTCUSD at 100 at T0)


def bar_at(conn: psycopg.Connection, iid: int, ts: Any, close: str) -> None:
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1m', %s, %s, %s, %s, %s, 1000)",
                 (iid, ts, close, close, close, close))


# ---------------------------------------------------------------- a paper signal decides now
def test_a_back_dated_paper_signal_is_judged_at_the_latest_bar(conn, btc):
    # 0004_13: stamped at T0 + 1m, the buy was sized at that time's close of 100 (1,000 BTC
    # for the 100,000 of cash) while the market had moved to 200: the order met today's
    # market with twice the cash the account had
    account(conn)
    conn.execute("SELECT trading.assign_strategy('p', 'st')")
    later = T0 + timedelta(days=29)
    bar_at(conn, btc, later, "200")
    r = signal(conn, "buy", size=0.5)
    assert r["status"] == "approved", r
    qty, = conn.execute("SELECT quantity FROM trading.orders WHERE order_id = %s",
                        (r["order_id"],)).fetchone()
    assert D(200) * qty <= D(50000)  # half the capital at the price of the latest bar
    assert qty > D(240)               # (sized from it, less the commission reserved)
    # the row keeps the time the signal states
    assert one(conn, "SELECT ts FROM trading.signals WHERE signal_id = %s",
               r["signal_id"]) == T0 + timedelta(minutes=1)


def test_a_backtest_signal_keeps_its_own_time(conn, btc):
    # a backtest lives at the bar its engine is on: a later stored bar is its future
    account(conn, "b", "backtest")
    conn.execute("SELECT trading.assign_strategy('b', 'st')")
    later = T0 + timedelta(days=29)
    bar_at(conn, btc, later, "200")
    r = one(conn, "SELECT trading.submit_signal(%s)", Jsonb(
        {"account": "b", "strategy": "st", "symbol": "BTCUSD", "action": "buy", "size": 0.5,
         "ts": (T0 + timedelta(minutes=1)).isoformat()}))
    assert r["status"] == "approved", r
    qty, = conn.execute("SELECT quantity FROM trading.orders WHERE order_id = %s",
                        (r["order_id"],)).fetchone()
    assert D(480) < qty <= D(500)  # at the close of 100 of its own time


# ---------------------------------------------------------------- manual orders
@pytest.mark.parametrize(("side", "more"), [
    ("buy", {"stop_loss": "100"}),                   # a buy's stop at the market
    ("buy", {"stop_loss": "101"}),
    ("buy", {"take_profit": "99"}),
    ("buy", {"type": "limit", "limit_price": "90", "stop_loss": "95"}),  # above its limit
    ("sell", {"stop_loss": "99"}),                   # a short's stop below the market
    ("sell", {"take_profit": "100"}),
])
def test_a_manual_order_with_protection_on_the_wrong_side_is_refused(conn, btc, side, more):
    # 0004_13: approved; the stop fired on the next bar and closed what had just opened
    account(conn, short=True)
    before = one(conn, "SELECT count(*) FROM trading.orders")
    r = manual(conn, side, "1", **more)
    assert (r["status"], r["reason_code"]) == ("rejected", "INVALID_PROTECTION"), r
    assert r["reason"].startswith("INVALID_PROTECTION: side=")
    assert one(conn, "SELECT count(*) FROM trading.orders") == before
    assert one(conn, "SELECT count(*) FROM audit.events WHERE event_type = 'order.refused'") == 1


@pytest.mark.parametrize(("side", "more"), [
    ("buy", {"stop_loss": "99.99", "take_profit": "100.01"}),
    ("buy", {"type": "limit", "limit_price": "90", "stop_loss": "89", "take_profit": "95"}),
    ("sell", {"stop_loss": "100.01", "take_profit": "99.99"}),
])
def test_a_manual_order_with_protection_on_the_right_side_passes(conn, btc, side, more):
    account(conn, short=True)
    assert manual(conn, side, "1", **more)["status"] == "approved"


def test_a_reducing_manual_order_is_not_judged_on_protection(conn, btc):
    # protection belongs to what an order opens: selling part of a long opens nothing
    account(conn)
    oid = manual(conn, "buy", "10")["order_id"]
    one(conn, "SELECT trading.apply_fill(%s)", Jsonb(
        {"order_id": oid, "broker_fill_id": "f1", "quantity": "10", "price": "100"}))
    assert manual(conn, "sell", "4", stop_loss="150")["status"] == "approved"


@pytest.mark.parametrize("coid", ["12", "0", "0123456789"])
def test_a_manual_client_order_id_of_digits_only_is_refused(conn, btc, coid):
    # 0004_13: stored; "cancel 12" then looked 12 up as that client id first, and could
    # cancel that order (of any account) instead of order 12
    account(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=f'order.client_order_id "{coid}" is all digits'):
        manual(conn, "buy", "1", client_order_id=coid)
    assert manual(conn, "buy", "1", client_order_id=f"x{coid}")["status"] == "approved"


# ---------------------------------------------------------------- limits reached at once
@pytest.mark.parametrize("limit_type", ["MAX_DRAWDOWN", "DAILY_LOSS"])
@pytest.mark.parametrize("value", ["0", "0.0"])
def test_a_loss_limit_of_zero_is_refused(conn, limit_type, value):
    # 0004_13: stored; the first bar's snapshot (drawdown 0 >= 0) tripped the breaker HARD,
    # in profit, and every entry was refused
    account(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match=f"a {limit_type} limit of {value} is reached at once"):
        conn.execute("SELECT risk.set_limit(%s, %s, account => 'p')", (limit_type, D(value)))
    assert one(conn, "SELECT count(*) FROM risk.limits") == 0
    lid = one(conn, "SELECT risk.set_limit(%s, 0.05, account => 'p')", limit_type)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="is reached at once"):
        conn.execute("UPDATE risk.limits SET value = 0 WHERE limit_id = %s", (lid,))
    assert one(conn, "SELECT value FROM risk.limits WHERE limit_id = %s", lid) == D("0.05")


# ---------------------------------------------------------------- the strategy role's reach
@pytest.fixture
def as_strategy(conn: psycopg.Connection) -> psycopg.Connection:
    conn.execute("SELECT runtime.heartbeat('router', 'router', 'running', 1, 'h')")
    conn.execute("SELECT runtime.advance_cursor('paper:1:1m', NULL, %s)", (T0,))
    conn.execute("SET ROLE mmats_strategy")
    return conn


@pytest.mark.parametrize("sql", [
    "SELECT runtime.advance_cursor('paper:1:1m', NULL, '9999-01-01')",
    "SELECT runtime.heartbeat('router', 'router', 'running', 1, 'h')",
])
def test_the_strategy_role_cannot_call_the_general_worker_functions(as_strategy, sql):
    # 0004_13: allowed: the paper broker's cursor went to 9999 (no bar settled again), the
    # router's heartbeat was kept fresh by a strategy
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        as_strategy.execute(sql)


@pytest.mark.parametrize("name", ["paper:1:1m", "reconcile:p", "notifier", "strategyx:p"])
def test_the_strategy_role_moves_only_its_own_resume_points(as_strategy, name):
    with pytest.raises(psycopg.errors.InsufficientPrivilege,
                       match="moves only its own resume points"):
        as_strategy.execute("SELECT runtime.advance_strategy_cursor(%s, NULL, '9999-01-01')",
                            (name,))
    as_strategy.execute("RESET ROLE")
    assert one(as_strategy, "SELECT at FROM runtime.cursors WHERE name = 'paper:1:1m'") == T0


def test_the_strategy_role_keeps_its_own_cursors_and_heartbeat(as_strategy):
    for name in ("strategy:p:st:1m", "events:p:st:1m", "news:p:st:1m"):
        as_strategy.execute("SELECT runtime.advance_strategy_cursor(%s, 7, %s)", (name, T0))
    as_strategy.execute("SELECT runtime.strategy_heartbeat('strategies', 'running', 2, 'h')")
    with pytest.raises(psycopg.errors.InsufficientPrivilege,
                       match="'router' is a router worker: a strategy worker beats only"):
        as_strategy.execute("SELECT runtime.strategy_heartbeat('router', 'running', 2, 'h')")
    as_strategy.execute("RESET ROLE")
    assert one(as_strategy, "SELECT count(*) FROM runtime.cursors WHERE seq = 7") == 3
    assert as_strategy.execute("SELECT name, kind FROM runtime.workers ORDER BY name"
                               ).fetchall() == [("router", "router"), ("strategies", "strategies")]
