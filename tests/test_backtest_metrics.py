"""Backtest performance metrics against values worked out by hand (no database needed)."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pytest

from workers.backtest.metrics import (
    EquityCurve,
    TradeRecord,
    compute_metrics,
    daily_returns,
    drawdown_series,
    grouped_trade_metrics,
    max_return_bound,
    monthly_returns,
    periods_per_year,
    sanity_check,
    trade_metrics,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T0 = datetime(2024, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)


def us(when: datetime) -> int:
    return (when - EPOCH) // timedelta(microseconds=1)


def make_curve(
    points: list[tuple[datetime, float]],
    exposure: list[bool] | None = None,
    benchmark: list[float] | None = None,
) -> EquityCurve:
    return EquityCurve(
        times=np.array([us(t) for t, _ in points], dtype=np.int64),
        equity=np.array([e for _, e in points], dtype=np.float64),
        exposure=np.array(exposure if exposure is not None else [False] * len(points)),
        benchmark=None if benchmark is None else np.array(benchmark, dtype=np.float64),
    )


def make_trade(
    pnl: str,
    *,
    hours: float = 1,
    symbol: str = "BTC/USDT",
    market: str = "crypto",
    strategy: str = "trend",
    side: str = "long",
    quantity: str = "1",
    entry_price: str = "100",
    exit_price: str = "101",
    commission: str = "0",
    entry_time: datetime = T0,
) -> TradeRecord:
    return TradeRecord(
        symbol=symbol,
        market=market,
        strategy=strategy,
        side=side,
        quantity=Decimal(quantity),
        entry_time=entry_time,
        entry_price=Decimal(entry_price),
        exit_time=entry_time + timedelta(hours=hours),
        exit_price=Decimal(exit_price),
        pnl=Decimal(pnl),
        commission=Decimal(commission),
    )


def metrics_of(curve: EquityCurve, cash: float = 100.0, per_year: int = 365) -> dict:
    return compute_metrics(curve, [], starting_cash=cash, periods_per_year=per_year)


# --- drawdowns -------------------------------------------------------------------------

# Five points, starting_cash 100, at 0h, 1h, 2h, 3h and 10h:
#   equity        95    80    100   120   108
#   running peak  100   100   100   120   120   (the peak starts at starting_cash)
#   drawdown      0.05  0.20  0     0     0.10
# Episode 1: below starting_cash from the first point (so it starts at times[0] = 0h),
#   back at 100 at 2h: 7200 s, depth 0.20.
# Episode 2: falls from the 120 peak at 3h and never recovers, so it lasts until the last
#   point at 10h: 25200 s, depth 0.10.
# max_drawdown 0.20, max_drawdown_duration 25200, average_drawdown (0.20 + 0.10) / 2.
FIVE = [(T0, 95.0), (T0 + HOUR, 80.0), (T0 + 2 * HOUR, 100.0), (T0 + 3 * HOUR, 120.0),
        (T0 + 10 * HOUR, 108.0)]


def test_drawdown_of_a_five_point_curve() -> None:
    m = metrics_of(make_curve(FIVE))
    assert m["max_drawdown"] == pytest.approx(0.20)
    assert m["max_drawdown_duration"] == 25200.0
    assert m["average_drawdown"] == pytest.approx(0.15)
    assert m["total_return"] == pytest.approx(0.08)
    assert m["final_equity"] == 108.0
    # 10 hours is 10 / (365.25 * 24) years
    cagr = 1.08 ** (365.25 * 24 / 10) - 1
    assert m["cagr"] == pytest.approx(cagr)
    assert m["calmar"] == pytest.approx(cagr / 0.20)


def test_drawdown_series_with_and_without_starting_cash() -> None:
    equity = np.array([e for _, e in FIVE])
    np.testing.assert_allclose(
        drawdown_series(equity, starting_cash=100.0), [0.05, 0.20, 0, 0, 0.10]
    )
    # without starting_cash the peak starts at the first point, 95
    np.testing.assert_allclose(drawdown_series(equity), [0, 1 - 80 / 95, 0, 0, 0.10])
    assert drawdown_series(np.array([])).size == 0


def test_drawdown_series_rejects_a_non_positive_peak() -> None:
    with pytest.raises(ValueError, match=r"^drawdown is undefined from a non-positive peak"):
        drawdown_series(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"^equity is not finite at point 1 \(nan\)$"):
        drawdown_series(np.array([1.0, math.nan]))


def test_longest_drawdown_that_recovers() -> None:
    # hourly 100, 90, 100, 105, 104 from 100: 0h->2h (7200 s, depth 0.1), then 3h->4h
    # unrecovered (3600 s, depth 1 - 104/105)
    points = [(T0 + i * HOUR, e) for i, e in enumerate([100.0, 90.0, 100.0, 105.0, 104.0])]
    m = metrics_of(make_curve(points))
    assert m["max_drawdown"] == pytest.approx(0.1)
    assert m["max_drawdown_duration"] == 7200.0
    assert m["average_drawdown"] == pytest.approx((0.1 + 1 / 105) / 2)


def test_no_drawdown_on_a_rising_curve() -> None:
    points = [(T0 + i * HOUR, e) for i, e in enumerate([100.0, 101.0, 101.0, 103.0])]
    m = metrics_of(make_curve(points))
    assert (m["max_drawdown"], m["max_drawdown_duration"], m["average_drawdown"]) == (0, 0, 0)
    assert m["calmar"] is None


# --- returns ---------------------------------------------------------------------------


def test_daily_returns_use_the_last_point_of_each_utc_day() -> None:
    day = timedelta(days=1)
    last_us = timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999)
    points = [
        (T0, 101.0), (T0 + 12 * HOUR, 102.0), (T0 + last_us, 104.0),  # day 1 closes at 104
        (T0 + day, 103.0), (T0 + day + 5 * HOUR, 106.0),  # day 2 closes at 106
        (T0 + 2 * day, 100.0), (T0 + 2 * day + HOUR, 99.0), (T0 + 2 * day + 9 * HOUR, 110.0),
    ]
    returns = daily_returns(make_curve(points), 100.0)
    np.testing.assert_allclose(returns, [104 / 100 - 1, 106 / 104 - 1, 110 / 106 - 1])


def test_daily_return_from_a_non_positive_equity_is_undefined() -> None:
    points = [(T0 + timedelta(days=i), e) for i, e in enumerate([-10.0, 5.0, 6.0])]
    returns = daily_returns(make_curve(points), 100.0)
    assert returns[0] == pytest.approx(-1.1)
    assert math.isnan(returns[1])
    assert returns[2] == pytest.approx(0.2)
    m = metrics_of(make_curve(points))
    assert (m["annual_volatility"], m["sharpe"], m["sortino"]) == (None, None, None)


def test_volatility_sharpe_and_sortino_by_hand() -> None:
    rets = [0.01, -0.02, 0.03, 0.005, -0.01]
    equity, points = 100.0, []
    for i, r in enumerate(rets):
        equity *= 1 + r
        points.append((T0 + timedelta(days=i, hours=12), equity))
    m = metrics_of(make_curve(points), per_year=252)
    mean, stdev = statistics.mean(rets), statistics.stdev(rets)
    downside = math.sqrt(sum(min(r, 0.0) ** 2 for r in rets) / len(rets))
    assert m["annual_volatility"] == pytest.approx(stdev * math.sqrt(252), rel=1e-12)
    assert m["sharpe"] == pytest.approx(mean / stdev * math.sqrt(252), rel=1e-12)
    assert m["sortino"] == pytest.approx(mean / downside * math.sqrt(252), rel=1e-12)


def test_ratios_are_none_when_undefined() -> None:
    one_day = metrics_of(make_curve([(T0, 100.0), (T0 + HOUR, 110.0)]))
    assert (one_day["annual_volatility"], one_day["sharpe"], one_day["sortino"]) == (
        None, None, None,
    )
    days = [T0 + timedelta(days=i) for i in range(4)]
    flat = metrics_of(make_curve([(t, 100.0) for t in days]))
    assert (flat["annual_volatility"], flat["sharpe"], flat["sortino"]) == (0.0, None, None)
    # +1% every day: no deviation (float noise aside) and no losing day
    steady = metrics_of(make_curve([(t, 100.0 * 1.01 ** (i + 1)) for i, t in enumerate(days)]))
    assert (steady["annual_volatility"], steady["sharpe"], steady["sortino"]) == (
        0.0, None, None,
    )
    # gains only, but uneven: Sharpe exists, Sortino has no downside to divide by
    gains = metrics_of(make_curve([(t, e) for t, e in zip(days, [101.0, 103.0, 104.0, 107.0],
                                                         strict=True)]))
    assert gains["sharpe"] is not None and gains["sharpe"] > 0
    assert gains["sortino"] is None


def test_cagr_doubling_over_exactly_one_year_is_one() -> None:
    year = timedelta(days=365.25)
    m = metrics_of(make_curve([(T0, 120.0), (T0 + year, 200.0)]))
    assert m["cagr"] == 1.0
    two = metrics_of(make_curve([(T0, 100.0), (T0 + 2 * year, 400.0)]))
    assert two["cagr"] == pytest.approx(1.0)


def test_cagr_is_none_without_time_or_equity() -> None:
    assert metrics_of(make_curve([(T0, 150.0)]))["cagr"] is None
    assert metrics_of(make_curve([(T0, 50.0), (T0 + HOUR, -1.0)]))["cagr"] is None
    # +100% in one microsecond annualised overflows a float: None rather than inf
    tiny = make_curve([(T0, 100.0), (T0 + timedelta(microseconds=1), 200.0)])
    assert metrics_of(tiny)["cagr"] is None


def test_monthly_returns_across_a_year_boundary() -> None:
    points = [
        (datetime(2023, 11, 3, tzinfo=UTC), 1050.0),
        (datetime(2023, 11, 30, 23, 59, tzinfo=UTC), 1100.0),  # Nov: 1100 / 1000 - 1
        (datetime(2023, 12, 1, tzinfo=UTC), 1200.0),
        (datetime(2023, 12, 31, 23, 0, tzinfo=UTC), 990.0),  # Dec: 990 / 1100 - 1
        (datetime(2024, 1, 15, tzinfo=UTC), 1089.0),  # Jan: 1089 / 990 - 1
        # no point in February: the month is skipped, March is measured against January
        (datetime(2024, 3, 2, tzinfo=UTC), 1197.9),  # Mar: 1197.9 / 1089 - 1
    ]
    months = monthly_returns(make_curve(points), 1000.0)
    assert [(m["year"], m["month"]) for m in months] == [(2023, 11), (2023, 12), (2024, 1),
                                                          (2024, 3)]
    assert [m["return"] for m in months] == pytest.approx([0.1, -0.1, 0.1, 0.1])


def test_exposure_benchmark_start_and_end() -> None:
    points = [(T0 + i * HOUR, e) for i, e in enumerate([100.0, 101.0, 99.0, 102.0])]
    curve = make_curve(points, exposure=[False, True, True, False],
                       benchmark=[100.0, 103.0, 98.0, 110.0])
    m = metrics_of(curve)
    assert m["exposure_time"] == 0.5
    assert m["buy_and_hold_return"] == pytest.approx(0.10)
    assert m["start"] == "2024-01-01T00:00:00+00:00"
    assert m["end"] == "2024-01-01T03:00:00+00:00"
    assert metrics_of(make_curve(points))["buy_and_hold_return"] is None


def test_compute_metrics_keys_are_stable() -> None:
    trades = [make_trade("5")]
    m = compute_metrics(make_curve(FIVE), trades, starting_cash=100.0, periods_per_year=365)
    assert list(m) == [
        "start", "end", "final_equity", "total_return", "cagr", "annual_volatility", "sharpe",
        "sortino", "max_drawdown", "max_drawdown_duration", "average_drawdown", "calmar",
        "exposure_time", "buy_and_hold_return", *trade_metrics(trades),
    ]
    assert m["trades"] == 1 and m["total_pnl"] == 5.0


def test_compute_metrics_rejects_bad_arguments() -> None:
    curve = make_curve(FIVE)
    with pytest.raises(ValueError, match=r"^starting_cash must be a positive number, got 0$"):
        compute_metrics(curve, [], starting_cash=0, periods_per_year=365)
    with pytest.raises(ValueError, match=r"^starting_cash must be a positive number, got nan$"):
        compute_metrics(curve, [], starting_cash=math.nan, periods_per_year=365)
    with pytest.raises(ValueError, match=r"^periods_per_year must be positive, got 0$"):
        compute_metrics(curve, [], starting_cash=100.0, periods_per_year=0)


# --- the curve itself ------------------------------------------------------------------


def test_equity_curve_validation_messages() -> None:
    t = np.array([1, 2, 3], dtype=np.int64)
    e = np.array([1.0, 2.0, 3.0])
    x = np.array([False, False, True])
    with pytest.raises(ValueError, match=r"^equity curve has no points$"):
        EquityCurve(np.array([], dtype=np.int64), np.array([]), np.array([], dtype=bool))
    with pytest.raises(ValueError, match=r"^equity has 2 points but times has 3$"):
        EquityCurve(t, e[:2], x)
    with pytest.raises(ValueError, match=r"^exposure has 2 points but times has 3$"):
        EquityCurve(t, e, x[:2])
    with pytest.raises(ValueError, match=r"^benchmark has 4 points but times has 3$"):
        EquityCurve(t, e, x, np.ones(4))
    with pytest.raises(ValueError, match=r"^times are not strictly increasing at point 2$"):
        EquityCurve(np.array([1, 2, 2], dtype=np.int64), e, x)
    with pytest.raises(ValueError, match=r"^equity is not finite at point 1 \(inf\)$"):
        EquityCurve(t, np.array([1.0, math.inf, 3.0]), x)
    with pytest.raises(ValueError, match=r"^benchmark is not finite at point 0 \(nan\)$"):
        EquityCurve(t, e, x, np.array([math.nan, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"^times must be integer epoch microseconds, not float"):
        EquityCurve(t.astype(float), e, x)
    with pytest.raises(ValueError, match=r"^equity must be a one-dimensional array, got 2 dim"):
        EquityCurve(t, np.ones((3, 1)), x)


def test_equity_curve_is_read_only_without_touching_the_callers_arrays() -> None:
    equity = np.array([1.0, 2.0])
    curve = EquityCurve(np.array([1, 2], dtype=np.int64), equity, np.array([True, False]))
    with pytest.raises(ValueError, match="read-only"):
        curve.equity[0] = 5.0
    equity[0] = 5.0  # the caller's own array stays writable
    assert curve.equity[0] == 5.0


# --- trades ----------------------------------------------------------------------------


def test_trade_metrics_on_four_trades() -> None:
    # pnl +30, -10, +20, -20 held 1h, 2h, 3h, 6h, commission 1 each:
    # win_rate 2/4, profit_factor 50/30, expectancy 20/4, average duration 12h/4 = 3h
    trades = [
        make_trade("30", hours=1, commission="1"),
        make_trade("-10", hours=2, commission="1"),
        make_trade("20", hours=3, commission="1"),
        make_trade("-20", hours=6, commission="1"),
    ]
    assert trade_metrics(trades) == {
        "trades": 4,
        "win_rate": 0.5,
        "profit_factor": pytest.approx(5 / 3),
        "expectancy": 5.0,
        "average_trade_duration": 10800.0,
        "best_trade": 30.0,
        "worst_trade": -20.0,
        "gross_profit": 50.0,
        "gross_loss": -30.0,
        "total_pnl": 20.0,
        "total_commission": 4.0,
    }


def test_trade_metrics_edge_cases() -> None:
    none = trade_metrics([])
    assert none["trades"] == 0
    assert [none[k] for k in ("win_rate", "profit_factor", "expectancy", "best_trade")] == [
        None, None, None, None,
    ]
    assert (none["gross_profit"], none["total_pnl"], none["total_commission"]) == (0, 0, 0)
    assert trade_metrics([make_trade("3"), make_trade("0")])["profit_factor"] is None
    losers = trade_metrics([make_trade("-3"), make_trade("0")])
    assert (losers["profit_factor"], losers["win_rate"]) == (0.0, 0.0)  # breakeven: no win
    with pytest.raises(ValueError, match=r"^trade 2 has a non-finite pnl \(NaN\)$"):
        trade_metrics([make_trade("1"), make_trade("NaN")])


def test_grouped_trade_metrics() -> None:
    trades = [
        make_trade("10", strategy="trend", market="crypto", symbol="BTC/USDT"),
        make_trade("-4", strategy="revert", market="stock", symbol="AAPL"),
        make_trade("6", strategy="trend", market="stock", symbol="AAPL"),
    ]
    by_strategy = grouped_trade_metrics(trades, "strategy")
    assert list(by_strategy) == ["revert", "trend"]
    assert by_strategy["trend"]["total_pnl"] == 16.0
    assert by_strategy["revert"]["trades"] == 1
    assert grouped_trade_metrics(trades, "market")["stock"]["total_pnl"] == 2.0
    assert grouped_trade_metrics(trades, "symbol")["BTC/USDT"]["win_rate"] == 1.0
    with pytest.raises(ValueError, match=r"^cannot group trades by 'side' \(expected one of"):
        grouped_trade_metrics(trades, "side")


def test_periods_per_year() -> None:
    assert periods_per_year(["stock"]) == 252
    # weekly bars: one return a week, whatever the market's days
    assert periods_per_year(["crypto"], "1w") == periods_per_year(["stock"], "1w") == 52
    assert periods_per_year(["crypto"], "1d") == periods_per_year(["crypto"], "1h") == 365
    assert periods_per_year(["stock", "forex"]) == 260
    assert periods_per_year(iter(["stock", "crypto", "forex"])) == 365
    with pytest.raises(ValueError, match=r"^unknown market 'bond' \(expected one of: crypto, "):
        periods_per_year(["stock", "bond"])
    with pytest.raises(ValueError, match=r"^no markets given$"):
        periods_per_year([])


# --- plausibility ----------------------------------------------------------------------


def test_max_return_bound_on_three_bars() -> None:
    # overlapping bars: (11/10) * (12/10.5) * (10.5/9.8) - 1 = 13.2/9.8 - 1
    bound = max_return_bound(np.array([11.0, 12.0, 10.5]), np.array([10.0, 10.5, 9.8]))
    assert bound == pytest.approx(13.2 / 9.8 - 1)
    assert max_return_bound(np.array([]), np.array([])) == 0.0


def test_max_return_bound_counts_price_gaps() -> None:
    # gap up: buy 10 in bar 1, sell 21 in bar 2 makes 110%, more than (11/10)*(21/20) - 1;
    # the bound multiplies in the gap 20/11: 1.1 * 1.05 * 20/11 - 1 = 1.1
    up = max_return_bound(np.array([11.0, 21.0]), np.array([10.0, 20.0]))
    assert up == pytest.approx(1.1)
    # gap down: the same factor for a short held across it
    down = max_return_bound(np.array([21.0, 11.0]), np.array([20.0, 10.0]))
    assert down == pytest.approx(1.1)


def test_max_return_bound_rejects_bad_prices() -> None:
    with pytest.raises(ValueError, match=r"^prices must be positive: bar 1 has high 2.0, low 0.0$"):
        max_return_bound(np.array([1.0, 2.0]), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"^prices must be positive: bar 0 has high -1.0"):
        max_return_bound(np.array([-1.0]), np.array([-2.0]))
    with pytest.raises(ValueError, match=r"^high is below low at bar 0 \(1.0 < 2.0\)$"):
        max_return_bound(np.array([1.0]), np.array([2.0]))
    with pytest.raises(ValueError, match=r"^high has 2 bars but low has 1$"):
        max_return_bound(np.array([1.0, 2.0]), np.array([1.0]))
    with pytest.raises(ValueError, match=r"^low is not finite at point 0 \(nan\)$"):
        max_return_bound(np.array([1.0]), np.array([math.nan]))


def clean_run() -> tuple[EquityCurve, list[TradeRecord]]:
    points = [(T0 + i * HOUR, e) for i, e in enumerate([100.0, 104.0, 103.0, 105.0])]
    trades = [make_trade("5", hours=2), make_trade("-1", side="short", entry_time=T0 + HOUR)]
    return make_curve(points, exposure=[True, True, True, False]), trades


def check(curve: EquityCurve, trades: list[TradeRecord], *, leverage: bool = False,
          bound: float | None = 0.5) -> list[str]:
    return sanity_check(curve, trades, starting_cash=100.0, leverage_allowed=leverage,
                        price_bound=bound)


def test_sanity_check_is_empty_on_a_clean_run() -> None:
    curve, trades = clean_run()
    assert check(curve, trades) == []
    assert check(curve, trades, bound=None, leverage=True) == []


def test_sanity_check_flags_impossible_trades() -> None:
    curve, _ = clean_run()
    label = "trade 1 (BTC/USDT long entered 2024-01-01T00:00:00+00:00)"
    assert check(curve, [make_trade("1", entry_price="0")]) == [
        f"{label} has entry_price 0 (must be positive)"
    ]
    assert check(curve, [make_trade("1", exit_price="-2.5")]) == [
        f"{label} has exit_price -2.5 (must be positive)"
    ]
    assert check(curve, [make_trade("1", quantity="0")]) == [
        f"{label} has quantity 0 (must be positive)"
    ]
    assert check(curve, [make_trade("1", quantity="NaN")]) == [
        f"{label} has quantity NaN (must be positive)"
    ]
    assert check(curve, [make_trade("1", hours=-1)]) == [
        f"{label} exits at 2023-12-31T23:00:00+00:00, before it enters"
    ]
    assert check(curve, [make_trade("1", side="buy")]) == [
        "trade 1 (BTC/USDT buy entered 2024-01-01T00:00:00+00:00) has an unknown side 'buy'"
    ]


def test_sanity_check_caps_trade_warnings() -> None:
    curve, _ = clean_run()
    warnings = check(curve, [make_trade("1", quantity="0")] * 25)
    assert len(warnings) == 21
    assert warnings[19].startswith("trade 20 ")
    assert warnings[-1] == "... and 5 more trade problems"


def test_sanity_check_flags_equity_at_or_below_zero_without_leverage() -> None:
    day2 = datetime(2024, 1, 2, tzinfo=UTC)
    points = [(day2, 50.0), (day2 + 10 * HOUR, -12.5), (day2 + 11 * HOUR, -20.0)]
    curve = make_curve(points)
    assert check(curve, [], bound=None) == [
        "equity fell to -12.5 at 2024-01-02T10:00:00+00:00 without leverage"
    ]
    assert check(curve, [], bound=None, leverage=True) == []
    # zero equity is already ruin: the first point at or below zero is reported
    zero = make_curve([(day2, 0.0)])
    assert check(zero, [], bound=None) == [
        "equity fell to 0 at 2024-01-02T00:00:00+00:00 without leverage"
    ]


def test_sanity_check_flags_a_return_beyond_the_price_bound() -> None:
    curve = make_curve([(T0, 100.0), (T0 + HOUR, 420.0)])  # a return of 3.2
    assert check(curve, [], bound=1.1) == [
        "return 3.2 exceeds what the price path allows (max 1.1)"
    ]
    assert check(curve, [], bound=3.2) == []  # reaching the bound exactly is possible
    assert check(curve, [], bound=None) == []
