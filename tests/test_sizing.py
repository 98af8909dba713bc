"""Position sizing of trading.submit_signal, method by method, with hand-computed quantities.

Unless a test says otherwise: cash 10000 USD, BTCUSD at 100, quantity_step 0.01, no fee.
The arithmetic behind every expected quantity is written next to it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest
from assigned import ensure_assigned
from psycopg.types.json import Jsonb

BAR_TS = "2024-01-02T00:00:00Z"
TS = "2024-01-02T00:10:00Z"


# ---------------------------------------------------------------------------- helpers
def scalar(conn: psycopg.Connection, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def add_instrument(conn: psycopg.Connection, symbol: str = "BTCUSD", base: str = "BTC",
                   quote: str = "USD", step: str = "0.01", market: str = "crypto") -> int:
    return scalar(conn, """
        INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,
                                        price_tick, quantity_step, min_quantity, calendar_id)
        VALUES (%s, 'binance', %s, %s, %s, 0.0001, %s, 0, 'CRYPTO_24X7')
        RETURNING instrument_id""", symbol, market, base, quote, step)


def add_bar(conn: psycopg.Connection, instrument: int, close: str, ts: str = BAR_TS,
            open_: str | None = None, high: str | None = None, low: str | None = None) -> None:
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close)"
                 " VALUES (%s, '1m', %s, %s, %s, %s, %s)",
                 (instrument, ts, open_ or close, high or close, low or close, close))


def make_account(conn: psycopg.Connection, cash: str = "10000", taker_fee: str = "0",
                 allow_short: bool = False) -> int:
    return scalar(conn, "SELECT trading.create_account(name => 'acct', environment => 'backtest',"
                        " mode => 'operator', cash => %s::numeric, allow_short => %s,"
                        " taker_fee => %s::numeric)", cash, allow_short, taker_fee)


def assign(conn: psycopg.Connection, method: str, params: dict[str, Any] | None = None,
           allocation: str = "1", strategy: str = "alpha") -> None:
    conn.execute("SELECT trading.assign_strategy('acct', %s, %s::numeric, %s, %s)",
                 (strategy, allocation, method, Jsonb(params or {})))


def submit(conn: psycopg.Connection, **signal: Any) -> dict[str, Any]:
    body = {"account": "acct", "strategy": "alpha", "symbol": "BTCUSD", "ts": TS}
    body.update(signal)
    ensure_assigned(conn, body)
    return scalar(conn, "SELECT trading.submit_signal(%s)", Jsonb(body))


def ordered(conn: psycopg.Connection, r: dict[str, Any]) -> Decimal:
    """The quantity of the order a signal created (read back from trading.orders)."""
    assert r["status"] == "approved", r
    return scalar(conn, "SELECT quantity FROM trading.orders WHERE order_id = %s", r["order_id"])


def fill(conn: psycopg.Connection, order_id: int, quantity: Decimal | str, price: str,
         broker_fill_id: str, commission: str = "0") -> dict[str, Any]:
    return scalar(conn, "SELECT trading.apply_fill(%s)", Jsonb({
        "order_id": order_id, "broker_fill_id": broker_fill_id, "quantity": str(quantity),
        "price": price, "commission": commission, "ts": TS}))


def cancel(conn: psycopg.Connection, order_id: int) -> None:
    conn.execute("SELECT trading.cancel_order(%s, 'test')", (str(order_id),))


@pytest.fixture
def btc(conn: psycopg.Connection) -> int:
    iid = add_instrument(conn)
    add_bar(conn, iid, "100")
    return iid


# ---------------------------------------------------------------------------- percent_equity
def test_percent_equity_default_and_rounding_down(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    # no assignment: percent_equity, allocation 1. 10000 * 0.12345 / 100 = 12.345 -> 12.34
    r = submit(conn, action="buy", size=0.12345)
    assert ordered(conn, r) == Decimal("12.34")


def test_percent_equity_allocation(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "percent_equity", allocation="0.25")
    # 10000 * 0.25 * 0.5 / 100 = 12.5
    assert ordered(conn, submit(conn, action="buy", size=0.5)) == Decimal("12.5")


def test_percent_equity_reserves_the_commission(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn, taker_fee="0.001")
    # 10000 / (100 * 1.001) = 99.9000999 -> 99.90; it costs 99.90 * 100.1 = 9999.99 <= 10000
    # (without the reserve it would be 100 units costing 10010)
    q = ordered(conn, submit(conn, action="buy", size=1))
    assert q == Decimal("99.90")


@pytest.mark.parametrize(("price", "fee", "step"), [
    ("33.33", "0.001", "0.001"), ("7.77", "0.0075", "0.01"), ("123.45", "0.002", "0.0001"),
    ("0.0123", "0.001", "1"), ("99999.99", "0.0004", "0.00001")])
def test_buy_cost_with_fee_never_exceeds_cash_and_is_maximal(
        conn: psycopg.Connection, price: str, fee: str, step: str) -> None:
    iid = add_instrument(conn, step=step)
    add_bar(conn, iid, price)
    make_account(conn, taker_fee=fee)
    q = ordered(conn, submit(conn, action="buy", size=1))
    p, f, s = Decimal(price), Decimal(fee), Decimal(step)
    assert q * p * (1 + f) <= 10000
    assert (q + s) * p * (1 + f) > 10000  # one step more would not be affordable
    assert q % s == 0  # a whole number of steps


def test_percent_equity_is_capped_by_cash_when_other_positions_exist(
        conn: psycopg.Connection, btc: int) -> None:
    eth = add_instrument(conn, symbol="ETHUSD", base="ETH")
    add_bar(conn, eth, "100")
    make_account(conn)
    e = submit(conn, action="buy", symbol="ETHUSD", size=0.6)
    # 10000 * 0.6 / 100 = 60 ETH
    assert ordered(conn, e) == 60
    # while the ETH order is open its 6000 are reserved: equity 10000 -> 100 BTC wanted,
    # but (10000 - 6000) / 100 = 40 affordable
    b = submit(conn, action="buy", size=1)
    assert ordered(conn, b) == 40
    cancel(conn, b["order_id"])
    fill(conn, e["order_id"], "60", "100", "e1")
    # filled: cash 4000, ETH 60 * 100 = 6000, equity 10000 -> 100 wanted, 4000 / 100 = 40
    assert scalar(conn, "SELECT equity FROM trading.account_equity(1)") == 10000
    b2 = submit(conn, action="buy", size=1)
    assert ordered(conn, b2) == 40
    cost = ordered(conn, b2) * 100
    assert cost <= scalar(conn, "SELECT cash FROM trading.accounts")


def test_percent_equity_in_a_foreign_quote_currency(conn: psycopg.Connection) -> None:
    eur = add_instrument(conn, symbol="EURUSD", base="EUR", quote="USD", market="forex")
    add_bar(conn, eur, "1.25")
    eth = add_instrument(conn, symbol="ETHEUR", base="ETH", quote="EUR")
    add_bar(conn, eth, "100")
    make_account(conn)
    # 100 EUR * 1.25 = 125 USD a unit: 10000 * 0.5 / 125 = 40
    r = submit(conn, action="buy", symbol="ETHEUR", size=0.5)
    assert ordered(conn, r) == 40
    assert scalar(conn, "SELECT reference_price FROM trading.orders") == 100


# ---------------------------------------------------------------------------- fixed_*
def test_fixed_fractional_uses_starting_cash_not_equity(
        conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "fixed_fractional", allocation="0.5")
    conn.execute("UPDATE trading.accounts SET cash = 8000")  # as if 2000 had been lost
    # starting cash 10000 * 0.5 * 1 / 100 = 50 (percent_equity would give 8000*0.5/100 = 40)
    r = submit(conn, action="buy")
    assert ordered(conn, r) == 50
    cancel(conn, r["order_id"])
    conn.execute("UPDATE trading.accounts SET cash = 3000")
    # still 50 wanted, but only 3000 / 100 = 30 affordable
    assert ordered(conn, submit(conn, action="buy")) == 30


def test_fixed_quantity(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "fixed_quantity", {"quantity": 3.456})
    # 3.456 * 0.5 = 1.728 -> 1.72
    assert ordered(conn, submit(conn, action="buy", size=0.5)) == Decimal("1.72")


def test_fixed_quantity_is_not_capped_by_cash_the_gate_refuses_it(
        conn: psycopg.Connection, btc: int) -> None:
    make_account(conn, cash="100")
    assign(conn, "fixed_quantity", {"quantity": 3})
    r = submit(conn, action="buy")
    # 3 * 100 = 300 > 100 cash
    assert (r["status"], r["reason_code"]) == ("rejected", "INSUFFICIENT_CASH")
    assert scalar(conn, "SELECT count(*) FROM trading.orders") == 0


def test_fixed_quantity_needs_a_positive_quantity(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    # (refused when assigned: a signal would have raised, rolled back with it)
    with pytest.raises(psycopg.Error, match=r"sizing_params\.quantity must be > 0"):
        assign(conn, "fixed_quantity", {"quantity": 0})


def test_fixed_notional_with_fee(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn, taker_fee="0.001")
    assign(conn, "fixed_notional", {"amount": 1000})
    # 1000 / (100 * 1.001) = 9.99000999 -> 9.99
    r = submit(conn, action="buy")
    assert ordered(conn, r) == Decimal("9.99")
    cancel(conn, r["order_id"])
    # size 0.5: 500 / 100.1 = 4.995004... -> 4.99
    assert ordered(conn, submit(conn, action="buy", size=0.5)) == Decimal("4.99")


# ---------------------------------------------------------------------------- risk_per_trade
def test_risk_per_trade(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "risk_per_trade", {"risk": 0.02})
    # 10000 * 1 * 0.02 = 200 at risk; 200 / |100 - 95| = 40
    r = submit(conn, action="buy", stop_loss=95)
    assert ordered(conn, r) == 40
    cancel(conn, r["order_id"])
    # size 0.5: 100 / 5 = 20
    assert ordered(conn, submit(conn, action="buy", stop_loss=95, size=0.5)) == 20


def test_risk_per_trade_default_risk_and_allocation(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "risk_per_trade", allocation="0.5")
    # 10000 * 0.5 * 0.01 (default) = 50; 50 / |100 - 92| = 6.25
    assert ordered(conn, submit(conn, action="buy", stop_loss=92)) == Decimal("6.25")


def test_risk_per_trade_short_with_stop_above(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn, allow_short=True)
    assign(conn, "risk_per_trade")
    # 10000 * 0.01 = 100; 100 / |100 - 104| = 25, short
    r = submit(conn, action="sell", stop_loss=104)
    assert ordered(conn, r) == 25
    assert scalar(conn, "SELECT side FROM trading.orders") == "sell"


def test_risk_per_trade_is_not_capped_by_cash(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "risk_per_trade", {"risk": 0.1})
    # 10000 * 0.1 / |100 - 99| = 1000 units = 100000 > 10000 cash: the gate refuses
    r = submit(conn, action="buy", stop_loss=99)
    assert (r["status"], r["reason_code"]) == ("rejected", "INSUFFICIENT_CASH")


@pytest.mark.parametrize("stop", [None, 100])
def test_risk_per_trade_needs_a_stop_away_from_the_price(
        conn: psycopg.Connection, btc: int, stop: int | None) -> None:
    make_account(conn)
    assign(conn, "risk_per_trade")
    body: dict[str, Any] = {"action": "buy"}
    if stop is not None:
        body["stop_loss"] = stop
    with pytest.raises(psycopg.Error, match="risk_per_trade sizing needs a stop_loss"):
        submit(conn, **body)
    assert scalar(conn, "SELECT count(*) FROM trading.signals") == 0


def test_long_only_sell_closes_without_sizing(conn: psycopg.Connection, btc: int) -> None:
    """A long-only sell closes what is held: it needs no stop even for risk_per_trade."""
    make_account(conn)
    assign(conn, "risk_per_trade")
    b = submit(conn, action="buy", stop_loss=95)
    # 10000 * 0.01 / 5 = 20
    fill(conn, b["order_id"], ordered(conn, b), "100", "b1")
    r = submit(conn, action="sell")
    assert ordered(conn, r) == 20


# ---------------------------------------------------------------------------- volatility
def volatility_bars(conn: psycopg.Connection, instrument: int, n: int = 4) -> None:
    """Bars one minute apart; true ranges (from the 2nd bar) 3, 8, 5."""
    bars = [  # open, high, low, close
        ("100", "101", "99", "100"),
        ("101", "103", "100", "102"),  # TR max(3, |103-100|, |100-100|) = 3
        ("95", "96", "94", "95"),      # gap: max(2, |96-102| = 6, |94-102| = 8) = 8
        ("95", "100", "95", "100"),    # max(5, |100-95| = 5, 0) = 5
    ]
    for i, (o, h, lo, c) in enumerate(bars[:n]):
        add_bar(conn, instrument, c, ts=f"2024-01-02T00:0{i}:00Z", open_=o, high=h, low=lo)


def test_volatility(conn: psycopg.Connection) -> None:
    iid = add_instrument(conn)
    volatility_bars(conn, iid)
    make_account(conn)
    assign(conn, "volatility", {"period": 3})
    # ATR(3) = (3 + 8 + 5) / 3 = 16/3; risk 10000 * 0.01 = 100;
    # 100 / (2 * 16/3) = 9.375 -> 9.37
    r = submit(conn, action="buy")
    assert ordered(conn, r) == Decimal("9.37")
    cancel(conn, r["order_id"])
    assign(conn, "volatility", {"period": 3, "multiple": 1, "risk": 0.02})
    # 200 / (1 * 16/3) = 37.5
    assert ordered(conn, submit(conn, action="buy")) == Decimal("37.5")
    with pytest.raises(psycopg.Error, match=r"sizing_params\.multiple must be > 0"):
        assign(conn, "volatility", {"period": 3, "multiple": 0})  # would divide by zero


def test_volatility_without_enough_bars(conn: psycopg.Connection) -> None:
    iid = add_instrument(conn)
    volatility_bars(conn, iid, n=3)  # 2 true ranges: fewer than the period 3
    make_account(conn)
    assign(conn, "volatility", {"period": 3})
    with pytest.raises(psycopg.Error, match="volatility sizing needs 4 bars of history for BTCUSD"):
        submit(conn, action="buy")
    assign(conn, "volatility")  # default period 14
    with pytest.raises(psycopg.Error, match="needs 15 bars"):
        submit(conn, action="buy")
    assert scalar(conn, "SELECT count(*) FROM trading.signals") == 0


def test_volatility_uses_only_bars_up_to_the_signal_time(conn: psycopg.Connection) -> None:
    iid = add_instrument(conn)
    volatility_bars(conn, iid)
    make_account(conn)
    assign(conn, "volatility", {"period": 3})
    # at 00:02:30 only three bars exist (two true ranges): not enough
    with pytest.raises(psycopg.Error, match="needs 4 bars"):
        submit(conn, action="buy", ts="2024-01-02T00:02:30Z")


# ---------------------------------------------------------------------------- kelly
KELLY = {"min_trades": 4, "fallback": 0.02, "fraction": 0.5, "cap": 0.25}


def round_trip(conn: psycopg.Connection, exit_price: str, n: int) -> Decimal:
    """Buy through a signal, fill at 100, sell through a signal, fill at exit_price."""
    b = submit(conn, action="buy")
    q = ordered(conn, b)
    fill(conn, b["order_id"], q, "100", f"b{n}")
    s = submit(conn, action="sell")
    assert ordered(conn, s) == q
    fill(conn, s["order_id"], q, exit_price, f"s{n}")
    return q


def test_kelly_falls_back_below_min_trades_then_uses_the_formula(
        conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "kelly", KELLY)
    # fallback 0.02 while fewer than 4 trades:
    # 1: 10000 * 0.02 / 100 = 2;      2 @ 100 -> 110: +20, cash 10020
    assert round_trip(conn, "110", 1) == 2
    # 2: 10020 * 0.02 / 100 = 2.004 -> 2.00; +20, cash 10040
    assert round_trip(conn, "110", 2) == 2
    # 3: 10040 * 0.02 / 100 = 2.008 -> 2.00; 2 @ 100 -> 95: -10, cash 10030
    assert round_trip(conn, "95", 3) == 2
    # 4: (3 trades < 4) 10030 * 0.02 / 100 = 2.006 -> 2.00; -10, cash 10020
    assert round_trip(conn, "95", 4) == 2
    trades = conn.execute("SELECT pnl, strategy_id FROM trading.trades"
                          " ORDER BY trade_id").fetchall()
    assert [t[0] for t in trades] == [20, 20, -10, -10]
    alpha = scalar(conn, "SELECT strategy_id FROM trading.strategies WHERE name = 'alpha'")
    assert {t[1] for t in trades} == {alpha}
    assert scalar(conn, "SELECT cash FROM trading.accounts") == 10020
    # 4 trades: W = 2/4 = 0.5, R = avg win 20 / avg loss 10 = 2;
    # f = 0.5 - 0.5 / 2 = 0.25; x fraction 0.5 = 0.125 (under the cap 0.25)
    # 10020 * 0.125 / 100 = 12.525 -> 12.52
    r = submit(conn, action="buy")
    assert ordered(conn, r) == Decimal("12.52")
    cancel(conn, r["order_id"])
    # fraction 1 and cap 0.2: f = 0.25 capped to 0.2: 10020 * 0.2 / 100 = 20.04
    assign(conn, "kelly", {**KELLY, "fraction": 1, "cap": 0.2})
    assert ordered(conn, submit(conn, action="buy")) == Decimal("20.04")


def test_kelly_counts_only_its_own_strategys_trades(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "kelly", KELLY)
    for i in range(4):
        round_trip(conn, "110", i)
    # alpha: 4 wins of +20 (cash 10080). Another kelly strategy with no trades: fallback
    # 10080 * 0.02 / 100 = 2.016 -> 2.01
    assign(conn, "kelly", KELLY, strategy="beta")
    assert ordered(conn, submit(conn, action="buy", strategy="beta")) == Decimal("2.01")


def test_kelly_with_only_losing_trades_sizes_nothing(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "kelly", KELLY)
    # fallback while < 4 trades, each round trip 100 -> 90:
    # 10000 * 0.02 / 100 = 2 (-20: 9980); 9980 * 0.02 / 100 = 1.996 -> 1.99 (-19.9: 9960.1);
    # 9960.1 * 0.02 / 100 = 1.992002 -> 1.99 (-19.9: 9940.2); 1.988 -> 1.98 (-19.8: 9920.4)
    assert [round_trip(conn, "90", i) for i in range(4)] == [2, Decimal("1.99"),
                                                             Decimal("1.99"), Decimal("1.98")]
    assert scalar(conn, "SELECT cash FROM trading.accounts") == Decimal("9920.4")
    # 4 trades, no win: W = 0, so f = 0 - 1/R < 0 -> 0: nothing to buy (not the fallback)
    r = submit(conn, action="buy")
    assert (r["status"], r["reason_code"]) == ("rejected", "QUANTITY_BELOW_MINIMUM"), r


def test_kelly_with_only_winning_trades_is_capped(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn)
    assign(conn, "kelly", KELLY)
    for i in range(4):
        round_trip(conn, "110", i)
    # 4 wins of +20 each: cash 10080. W = 1: f = 1 - 0 = 1; x 0.5 = 0.5; cap 0.25
    # 10080 * 0.25 / 100 = 25.2
    assert ordered(conn, submit(conn, action="buy")) == Decimal("25.2")


# ---------------------------------------------------------------------------- bad params
@pytest.mark.parametrize(("method", "params", "message"), [
    ("fixed_quantity", {}, "fixed_quantity sizing needs sizing_params.quantity"),
    ("fixed_notional", {}, "fixed_notional sizing needs sizing_params.amount"),
    ("fixed_notional", {"amount": "abc"}, 'sizing_params.amount must be a number, got "abc"'),
    ("fixed_quantity", {"quantity": -2}, "sizing_params.quantity must be > 0"),
    ("risk_per_trade", {"risk": 2}, "sizing_params.risk must be between 0 and 1"),
    ("volatility", {"period": "x"}, "sizing_params.period must be a number"),
    ("volatility", {"period": 0}, "sizing_params.period must be >= 1"),
    ("kelly", {"min_trades": "x"}, "sizing_params.min_trades must be a number"),
    ("kelly", {"fallback": "NaN"}, "sizing_params.fallback must be a finite number"),
])
def test_bad_sizing_params_give_a_clear_error(
        conn: psycopg.Connection, btc: int, method: str, params: dict[str, Any],
        message: str) -> None:
    make_account(conn)
    with pytest.raises(psycopg.Error) as e:  # (when assigned, not at the first signal)
        assign(conn, method, params)
    assert message in str(e.value), str(e.value)
    assert scalar(conn, "SELECT count(*) FROM trading.account_strategies") == 0
    assert scalar(conn, "SELECT count(*) FROM trading.signals") == 0
    assert scalar(conn, "SELECT count(*) FROM trading.orders") == 0
