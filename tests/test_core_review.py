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


# ---------------------------------------------------------------- found by a second review
def assign(conn: psycopg.Connection, method: str, params: dict[str, Any],
           account_name: str = "p") -> None:
    conn.execute("SELECT trading.assign_strategy(%s, 'st', 1, %s, %s)",
                 (account_name, method, Jsonb(params)))


def order_qty(conn: psycopg.Connection, order_id: int) -> D:
    return one(conn, "SELECT quantity FROM trading.orders WHERE order_id = %s", order_id)


def filled(conn: psycopg.Connection, order_id: int, qty: str, ref: str) -> dict[str, Any]:
    return one(conn, "SELECT trading.apply_fill(%s)", Jsonb(
        {"order_id": order_id, "broker_fill_id": ref, "quantity": qty, "price": "100",
         "ts": (T0 + timedelta(minutes=1)).isoformat()}))


def test_a_short_s_risk_is_measured_from_the_market_not_a_price_nearer_its_stop(conn, btc):
    # 0004_13: the price of 109.9 (taken: above the market) put the stop 0.1 away, and a
    # risk of 1,000 (1 % of 100,000) sized 10,000 units: 100,000 lost at the stop
    account(conn, short=True)
    assign(conn, "risk_per_trade", {"risk": 0.01})
    r = signal(conn, "sell", stop_loss=110, price=109.9)
    assert r["status"] == "approved", r
    assert order_qty(conn, r["order_id"]) == D(100)   # 1,000 / (110 - 100)


def test_a_signal_of_an_unassigned_version_leaves_the_assigned_one_trading(conn, btc):
    # 0004_13: version 2 (refused) became the newest row, and every versionless signal
    # after it was refused STRATEGY_NOT_ASSIGNED, closes included
    account(conn)
    assign(conn, "fixed_quantity", {"quantity": 1})
    assert signal(conn, "buy", version="2")["reason_code"] == "STRATEGY_NOT_ASSIGNED"
    r = signal(conn, "buy")
    assert r["status"] == "approved", r


def test_a_new_version_registered_then_assigned_is_the_one_assigned(conn, btc):
    # what `mmats run` does when a strategy's code says version 2: register it, assign it
    account(conn)
    for version in ("1", "2"):
        conn.execute("SELECT trading._strategy('st', %s)", (version,))
        conn.execute("SELECT trading.assign_strategy('p', 'st')")
    assert conn.execute("SELECT t.version FROM trading.account_strategies x JOIN"
                        " trading.strategies t USING (strategy_id) ORDER BY t.version"
                        ).fetchall() == [("1",), ("2",)]
    # and a versionless signal is for the newest the account trades
    r = signal(conn, "buy")
    assert one(conn, "SELECT t.version FROM trading.signals g JOIN trading.strategies t"
                     " USING (strategy_id) WHERE g.signal_id = %s", r["signal_id"]) == "2"


def test_volatility_is_measured_against_the_market_s_close(conn, btc):
    # 0004_13: divided by the price given, 600, the ATR ratio of 0.10 read 0.017
    account(conn)
    assign(conn, "fixed_quantity", {"quantity": 10})
    conn.cursor().executemany(
        "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)"
        " VALUES (%s, '1m', %s, 100, 105, 95, 100, 1000)",
        [(btc, T0 + timedelta(minutes=i)) for i in range(1, 21)])
    conn.execute("SELECT risk.set_limit('MAX_VOLATILITY', 0.02, account => 'p')")
    for r in (signal(conn, "buy"), signal(conn, "buy", price=600),
              manual(conn, "buy", "1", type="limit", limit_price="600")):
        assert (r["status"], r["reason_code"]) == ("rejected", "MAX_VOLATILITY"), r
        assert "atr_ratio=0.1" in r["reason"]


@pytest.mark.parametrize(("minutes", "allowed"), [
    (12 * 60 + 14, True),    # 22:14
    (20 * 60, True),         # 05:59:59.999999 the next day
    (20 * 60 + 1, False),    # 06:01
    (1, False),              # 10:01
])
def test_a_trading_window_past_midnight_wraps(conn, btc, minutes, allowed):
    # 0004_13: 22:00-06:00 refused every order (no time is after 22:00 and before 06:00)
    account(conn, "b", "backtest")
    conn.execute("SELECT trading.assign_strategy('b', 'st')")
    conn.execute("SELECT risk.set_limit('TRADING_HOURS', 1, account => 'b',"
                 " params => '{\"start\": \"22:00\", \"end\": \"06:00\", \"tz\": \"UTC\"}')")
    at = T0 + timedelta(minutes=minutes) - (timedelta(microseconds=1) if minutes == 20 * 60
                                            else timedelta(0))
    r = one(conn, "SELECT trading.submit_signal(%s)", Jsonb(
        {"account": "b", "strategy": "st", "symbol": "BTCUSD", "action": "buy", "size": 0.1,
         "ts": at.isoformat()}))
    assert (r["status"] == "approved") is allowed, r
    if not allowed:
        assert r["reason_code"] == "TRADING_HOURS"


def test_a_hedge_manual_order_is_checked_as_the_whole_entry_it_makes(conn, btc):
    # 0004_13: with a short leg of 10, a buy of 19 was checked as 9 (the net change) and
    # went out whole on the long leg: MAX_ORDER_VALUE 1,000 passed 1,900
    one(conn, "SELECT trading.create_account(name => 'p', environment => 'paper',"
              " mode => 'operator', cash => 100000, currency => 'USD', allow_short => true,"
              " position_mode => 'hedge')")
    filled(conn, manual(conn, "sell", "10")["order_id"], "10", "s1")
    conn.execute("SELECT risk.set_limit('MAX_ORDER_VALUE', 1000, account => 'p')")
    r = manual(conn, "buy", "19")
    assert (r["status"], r["reason_code"]) == ("rejected", "MAX_ORDER_VALUE"), r
    # a buy that only closes the short leg is not an entry
    assert manual(conn, "buy", "10")["status"] == "approved"


def test_a_sell_sized_to_nothing_does_not_buy_back_a_short(conn, btc):
    # 0004_13: approved as a reduce-only buy of 10
    account(conn, short=True)
    assign(conn, "fixed_quantity", {"quantity": 10})
    filled(conn, signal(conn, "sell")["order_id"], "10", "s1")
    r = signal(conn, "sell", size=0)
    assert (r["status"], r["reason_code"]) == ("rejected", "QUANTITY_BELOW_MINIMUM"), r
    assert one(conn, "SELECT count(*) FROM trading.orders") == 1


def test_a_fill_under_a_hard_breaker_on_an_advisory_account_sends_no_orders(conn, btc):
    # 0004_13: the fill answered "breaker_orders": [2], a sell for an advisory account
    account(conn)
    oid = manual(conn, "buy", "10")["order_id"]
    conn.execute("SELECT trading.mark_in_flight(%s)", (str(oid),))
    conn.execute("SELECT trading.acknowledge_order(%s, 'BRK-1')", (str(oid),))
    conn.execute("SELECT trading.set_advisory('p', 'test')")
    conn.execute("SELECT risk.trip_breaker('p', 'HARD', 'test')")
    r = filled(conn, oid, "10", "f1")
    assert r["status"] == "applied" and "breaker_orders" not in r, r
    assert one(conn, "SELECT count(*) FROM trading.orders") == 1


def test_a_client_id_no_order_has_is_unknown(conn, btc):
    # 0004_13: {"client_order_id": "1"} was booked to order 1 (client id mm...)
    account(conn)
    manual(conn, "buy", "10")
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="unknown order '1'"):
        conn.execute("SELECT trading.apply_fill(%s)", (Jsonb(
            {"client_order_id": "1", "broker_fill_id": "z", "quantity": "1",
             "price": "100"}),))
    assert one(conn, "SELECT count(*) FROM trading.fills") == 0


def test_protection_is_judged_where_the_order_fills(conn, btc):
    # 0004_13: a buy limit of 110 (it fills at the market, 100) took a stop of 105, and a
    # breakeven level of 50 under a long's entry was taken (the stop jumped to the entry)
    account(conn)
    conn.execute("SELECT trading.assign_strategy('p', 'st')")
    r = manual(conn, "buy", "1", type="limit", limit_price="110", stop_loss="105")
    assert r["reason_code"] == "INVALID_PROTECTION" and "price=100" in r["reason"], r
    r = signal(conn, "buy", metadata={"breakeven": 50})
    assert (r["reason_code"], r["reason"]) == ("INVALID_PROTECTION", (
        "INVALID_PROTECTION: side=long, price=100, stop_loss=-, take_profit=-, breakeven=50"))
    assert signal(conn, "buy", metadata={"breakeven": 105})["status"] == "approved"


def test_a_breaker_trip_without_a_mode_names_the_modes(conn, btc):
    account(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match="breaker mode must be SOFT, HARD or FREEZE, got nothing"):
        conn.execute("SELECT risk.trip_breaker('p', NULL, 'x')")
    assert one(conn, "SELECT count(*) FROM risk.breaker_state WHERE mode <> 'OK'") == 0


@pytest.mark.parametrize(("method", "params", "says"), [
    # 0004_13: stored; sized at the default risk of 1 %
    ("risk_per_trade", {"risk_pct": 0.05},
     r"sizing_params of risk_per_trade sizing: unknown field\(s\) \"risk_pct\" \(known: risk\)"),
    # 0004_13: stored; the first signal raised, rolled back with it
    ("fixed_quantity", {"qty": 5}, r"unknown field\(s\) \"qty\" \(known: quantity\)"),
    ("fixed_quantity", {}, "fixed_quantity sizing needs sizing_params.quantity"),
    ("volatility", {"period": 1e12}, "sizing_params.period must be a whole number of bars"),
    ("volatility", {"period": 2.5}, "sizing_params.period must be a whole number of bars"),
    ("volatility", {"timeframe": "2m"}, "sizing_params.timeframe must be one of 1m, 5m"),
    ("kelly", {"cap": 2}, "sizing_params.cap"),
    ("percent_equity", {"x": 1}, r"unknown field\(s\) \"x\" \(known: \)"),
    ("martingale", {}, "sizing method must be one of fixed_fractional, percent_equity"),
])
def test_sizing_parameters_are_checked_when_assigned(conn, btc, method, params, says):
    account(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=says):
        assign(conn, method, params)
    assert one(conn, "SELECT count(*) FROM trading.account_strategies") == 0


@pytest.mark.parametrize(("method", "params"), [
    ("volatility", {"risk": 0.01, "period": 14, "timeframe": "1m", "multiple": 2}),
    ("kelly", {"min_trades": 20, "fallback": 0.02, "fraction": 0.5, "cap": 0.25}),
    ("fixed_notional", {"amount": "1000"}),
    ("percent_equity", {}),
])
def test_sizing_parameters_that_make_sense_are_assigned(conn, btc, method, params):
    account(conn)
    assign(conn, method, params)
    assert one(conn, "SELECT sizing_params FROM trading.account_strategies") == params
