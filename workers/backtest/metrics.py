"""Performance metrics of a backtest run, vectorised with numpy.

An equity curve is one point per bar close (UTC epoch microseconds); the metrics of a
curve of a million points take a few tens of milliseconds. Definitions:

- total_return = final_equity / starting_cash - 1, final_equity being the last point.
- Daily returns: the equity at the last point of each UTC calendar day that has points;
  the return of a day is its percentage change from the previous such day, the first day
  measured against starting_cash. Days without points are skipped, not filled. A return
  measured from a non-positive equity is undefined (NaN).
- annual_volatility = stdev(daily, ddof=1) * sqrt(periods_per_year);
  sharpe = mean(daily) / stdev(daily, ddof=1) * sqrt(periods_per_year) (risk-free rate 0);
  sortino = mean(daily) / sqrt(mean(min(r, 0)^2)) * sqrt(periods_per_year), the downside
  deviation taken over all days. All three are None with fewer than 2 daily returns or an
  undefined one; sharpe is None when the deviation is zero, sortino when no day lost.
- years = (times[-1] - times[0]) / 365.25 days;
  cagr = (final_equity / starting_cash) ^ (1 / years) - 1, None when years <= 0,
  final_equity <= 0 or the power overflows a float (a huge return over a short span).
- Drawdown at a point = 1 - equity / running peak, the running peak starting at
  starting_cash, so a loss from the very start counts. max_drawdown is its maximum (a
  positive fraction). A drawdown episode runs from a peak until equity first gets back to
  that peak, or until the last point if it never does; max_drawdown_duration is the
  longest episode in seconds (an episode that starts below starting_cash starts at
  times[0]); average_drawdown is the mean depth of the episodes, 0 when there is none.
  calmar = cagr / max_drawdown, None when max_drawdown is 0 or cagr is None.
- exposure_time = share of curve points with a position open.
- buy_and_hold_return = benchmark[-1] / starting_cash - 1 (the benchmark starts invested
  with starting_cash), None without a benchmark.
- Trade metrics: trades (count); win_rate = share of trades with pnl > 0 (None without
  trades); profit_factor = gross_profit / -gross_loss (None without a losing trade);
  expectancy = mean pnl; average_trade_duration in seconds; best_trade / worst_trade =
  max / min pnl; gross_profit = sum of positive pnl, gross_loss = sum of negative pnl (a
  negative number, so gross_profit + gross_loss = total_pnl); total_pnl; total_commission
  (of the closed trades; a run's and a walk-forward's figure is every fill's).
  Sums are exact (Decimal) and converted to float at the end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.float64]
Metric: TypeAlias = float | int | None
# compute_metrics also carries the ISO-8601 start and end of the curve
RunMetric: TypeAlias = float | int | str | None

PERIODS_PER_YEAR: dict[str, int] = {"crypto": 365, "stock": 252, "forex": 260}
GROUP_KEYS = ("strategy", "market", "symbol")
SIDES = ("long", "short")

US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
US_PER_YEAR = 365.25 * US_PER_DAY
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# sanity_check reports at most this many trade problems, then a count of the rest: a
# broken engine can produce one per trade, and a million warnings help nobody
MAX_TRADE_WARNINGS = 20


@dataclass(frozen=True, slots=True)
class TradeRecord:
    """One closed trade (a round trip) of a backtest."""

    symbol: str
    market: str  # "crypto" | "forex" | "stock"
    strategy: str
    side: str  # "long" | "short"
    quantity: Decimal
    entry_time: datetime  # aware UTC
    entry_price: Decimal
    exit_time: datetime  # aware UTC
    exit_price: Decimal
    pnl: Decimal  # net of commission, in the account currency
    commission: Decimal


# eq=False: the generated __eq__/__hash__ would compare arrays element-wise and fail
@dataclass(frozen=True, eq=False)
class EquityCurve:
    """Account equity at each bar close; validated on construction.

    The arrays are stored as read-only views (no copy): the curve cannot be changed
    through its attributes, but whoever owns the underlying buffers still can.
    """

    times: np.ndarray  # int64 UTC epoch microseconds, strictly increasing (bar closes)
    equity: np.ndarray  # float64 account equity at each time
    exposure: np.ndarray  # bool: a position was open during that bar
    benchmark: np.ndarray | None = None  # float64 buy-and-hold equity at the same times

    def __post_init__(self) -> None:
        times = _one_dimensional("times", self.times)
        if times.dtype.kind not in "iu":
            raise ValueError(f"times must be integer epoch microseconds, not {times.dtype}")
        n = times.size
        if n == 0:
            raise ValueError("equity curve has no points")
        equity = _same_length("equity", _one_dimensional("equity", self.equity), n)
        exposure = _same_length("exposure", _one_dimensional("exposure", self.exposure), n)
        not_increasing = np.flatnonzero(np.diff(times) <= 0)
        if not_increasing.size:
            raise ValueError(
                f"times are not strictly increasing at point {int(not_increasing[0]) + 1}"
            )
        equity = equity.astype(np.float64, copy=False)
        _require_finite("equity", equity)
        object.__setattr__(self, "times", _read_only(times.astype(np.int64, copy=False)))
        object.__setattr__(self, "equity", _read_only(equity))
        object.__setattr__(self, "exposure", _read_only(exposure.astype(bool, copy=False)))
        if self.benchmark is not None:
            benchmark = _one_dimensional("benchmark", self.benchmark)
            benchmark = _same_length("benchmark", benchmark, n).astype(np.float64, copy=False)
            _require_finite("benchmark", benchmark)
            object.__setattr__(self, "benchmark", _read_only(benchmark))


def _one_dimensional(name: str, values: object) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a one-dimensional array, got {array.ndim} dimensions")
    return array


def _same_length(name: str, array: np.ndarray, n: int) -> np.ndarray:
    if array.size != n:
        raise ValueError(f"{name} has {array.size} points but times has {n}")
    return array


def _require_finite(name: str, values: FloatArray) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name} is not finite at point {i} ({values[i]})")


def _read_only(array: np.ndarray) -> np.ndarray:
    # a view, so the caller's own array stays writable and nothing is copied
    view = array.view()
    view.flags.writeable = False
    return view


def periods_per_year(markets: Iterable[str], timeframe: str = "1d") -> int:
    """Return periods per year for a run trading these markets on this timeframe.

    Daily returns: a mix takes the largest, since a portfolio holding crypto has an
    equity that moves (and a daily return) on every calendar day, even if it also holds
    stocks. Weekly bars give one return a week, so 52 (scaled as daily returns, the
    ratios of a weekly run were sqrt(7) too large).
    """
    found = list(markets)
    if not found:
        raise ValueError("no markets given")
    for market in found:
        if market not in PERIODS_PER_YEAR:
            known = ", ".join(sorted(PERIODS_PER_YEAR))
            raise ValueError(f"unknown market {market!r} (expected one of: {known})")
    daily = max(PERIODS_PER_YEAR[market] for market in found)
    return min(daily, 52) if timeframe == "1w" else daily


def _positive_cash(starting_cash: float) -> float:
    value = float(starting_cash)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"starting_cash must be a positive number, got {starting_cash!r}")
    return value


def _iso(epoch_us: int | np.integer) -> str:
    # timedelta arithmetic is exact to the microsecond, unlike a float timestamp
    return (EPOCH + timedelta(microseconds=int(epoch_us))).isoformat()


def _num(value: float) -> str:
    return f"{value:.10g}"


# --- returns ---------------------------------------------------------------------------


def _last_of_each_group(keys: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal keys (keys are non-decreasing).

    Equivalent to np.unique(keys, return_index=True) on the reversed array, but O(n): the
    keys come from strictly increasing times, so a group ends exactly where the key changes.
    """
    return np.append(np.flatnonzero(keys[1:] != keys[:-1]), keys.size - 1)


def _period_returns(closes: FloatArray, starting_cash: float) -> FloatArray:
    previous = np.concatenate(([starting_cash], closes[:-1]))
    with np.errstate(divide="ignore", invalid="ignore"):
        returns = closes / previous - 1.0
    # a percentage change from zero or from a negative equity means nothing
    returns[previous <= 0] = np.nan
    return returns


def daily_returns(curve: EquityCurve, starting_cash: float) -> np.ndarray:
    """Return of each UTC calendar day that has points (see the module docstring)."""
    cash = _positive_cash(starting_cash)
    days = curve.times // US_PER_DAY  # floor division: also right before 1970
    return _period_returns(curve.equity[_last_of_each_group(days)], cash)


def monthly_returns(curve: EquityCurve, starting_cash: float) -> list[dict[str, float | int]]:
    """Return of each UTC calendar month that has points, in order.

    Same rule as the daily returns: the last point of each month against the last point
    of the previous month that has points (starting_cash for the first one).
    """
    cash = _positive_cash(starting_cash)
    months = curve.times.view("datetime64[us]").astype("datetime64[M]").astype(np.int64)
    ends = _last_of_each_group(months)
    returns = _period_returns(curve.equity[ends], cash)
    # months since 1970-01: divmod gives the calendar year and month
    years, month_index = np.divmod(months[ends], 12)
    return [
        {"year": int(y) + 1970, "month": int(m) + 1, "return": float(r)}
        for y, m, r in zip(years, month_index, returns, strict=True)
    ]


def _return_ratios(returns: FloatArray, per_year: int) -> tuple[Metric, Metric, Metric]:
    """annual_volatility, sharpe and sortino of a series of period returns."""
    if returns.size < 2 or not bool(np.all(np.isfinite(returns))):
        return None, None, None
    scale = math.sqrt(per_year)
    mean = float(np.mean(returns))
    std = float(np.std(returns, ddof=1))
    # a constant nonzero series has a float stdev of ~1e-18 rather than 0 (the mean is not
    # exact); treat a deviation that small against the returns themselves as zero so the
    # Sharpe ratio is None instead of an absurd 1e16
    if std <= 1e-12 * float(np.max(np.abs(returns))):
        std = 0.0
    sharpe = mean / std * scale if std > 0 else None
    downside = math.sqrt(float(np.mean(np.square(np.minimum(returns, 0.0)))))
    sortino = mean / downside * scale if downside > 0 else None
    return std * scale, sharpe, sortino


def _cagr(growth: float, years: float) -> float | None:
    if years <= 0 or growth <= 0:
        return None
    try:
        return float(growth ** (1.0 / years) - 1.0)
    except OverflowError:  # e.g. +10% over one minute, annualised
        return None


# --- drawdowns -------------------------------------------------------------------------


def _running_peak(equity: FloatArray, starting_cash: float | None) -> FloatArray:
    # max(starting_cash, max(equity[:i+1])) is the running maximum of max(equity, cash)
    floor = equity if starting_cash is None else np.maximum(equity, starting_cash)
    return np.maximum.accumulate(floor)


def drawdown_series(equity: np.ndarray, *, starting_cash: float | None = None) -> np.ndarray:
    """1 - equity / running peak at each point, >= 0.

    The running peak starts at the first point, or at starting_cash when given (as in
    compute_metrics, so that a loss from the very start counts).
    """
    values = _one_dimensional("equity", equity).astype(np.float64, copy=False)
    if values.size == 0:
        return np.zeros(0)
    _require_finite("equity", values)
    cash = None if starting_cash is None else _positive_cash(starting_cash)
    peak = _running_peak(values, cash)
    if peak[0] <= 0:  # the peak never decreases, so this is the only place to check
        raise ValueError(f"drawdown is undefined from a non-positive peak ({peak[0]})")
    return 1.0 - values / peak


def _drawdown_stats(
    times: np.ndarray, equity: FloatArray, starting_cash: float
) -> tuple[float, float, float]:
    """max_drawdown, max_drawdown_duration (seconds) and average_drawdown."""
    peak = _running_peak(equity, starting_cash)
    depth = 1.0 - equity / peak
    underwater = equity < peak
    if not bool(underwater.any()):
        return 0.0, 0.0, 0.0
    edges = np.diff(underwater.astype(np.int8), prepend=0, append=0)
    starts = np.flatnonzero(edges == 1)  # first point below the peak
    stops = np.flatnonzero(edges == -1)  # first point back at the peak (n: never)
    last = equity.size - 1
    # the peak is the point before the first one below it; an episode that is underwater
    # from the first point fell from starting_cash, which has no time of its own
    peak_times = times[np.maximum(starts - 1, 0)]
    end_times = times[np.minimum(stops, last)]
    durations = (end_times - peak_times) / US_PER_SECOND
    # reduceat takes each slice from one start to the next; the points between an
    # episode's end and the next start have depth 0, so the maximum is the episode's
    depths = np.maximum.reduceat(depth, starts)
    return float(depth.max()), float(durations.max()), float(depths.mean())


# --- trades ----------------------------------------------------------------------------


def trade_metrics(trades: Sequence[TradeRecord]) -> dict[str, Metric]:
    """Count, hit rate and P&L statistics of closed trades (see the module docstring)."""
    pnls = [trade.pnl for trade in trades]
    for number, pnl in enumerate(pnls, start=1):
        if not pnl.is_finite():  # a NaN Decimal would raise on comparison below
            raise ValueError(f"trade {number} has a non-finite pnl ({pnl})")
    count = len(pnls)
    gross_profit = sum((p for p in pnls if p > 0), Decimal(0))
    gross_loss = sum((p for p in pnls if p < 0), Decimal(0))
    total = sum(pnls, Decimal(0))
    commission = sum((trade.commission for trade in trades), Decimal(0))
    metrics: dict[str, Metric] = {
        "trades": count,
        "win_rate": None,
        "profit_factor": float(gross_profit / -gross_loss) if gross_loss < 0 else None,
        "expectancy": None,
        "average_trade_duration": None,
        "best_trade": None,
        "worst_trade": None,
        "gross_profit": float(gross_profit),
        "gross_loss": float(gross_loss),
        "total_pnl": float(total),
        "total_commission": float(commission),
    }
    if count:
        held = sum((trade.exit_time - trade.entry_time for trade in trades), timedelta())
        metrics["win_rate"] = sum(1 for p in pnls if p > 0) / count
        metrics["expectancy"] = float(total / count)
        metrics["average_trade_duration"] = (held / count).total_seconds()
        metrics["best_trade"] = float(max(pnls))
        metrics["worst_trade"] = float(min(pnls))
    return metrics


def grouped_trade_metrics(
    trades: Sequence[TradeRecord], by: str
) -> dict[str, dict[str, Metric]]:
    """trade_metrics per strategy, market or symbol, keys in sorted order."""
    if by not in GROUP_KEYS:
        known = ", ".join(GROUP_KEYS)
        raise ValueError(f"cannot group trades by {by!r} (expected one of: {known})")
    groups: dict[str, list[TradeRecord]] = {}
    for trade in trades:
        groups.setdefault(getattr(trade, by), []).append(trade)
    return {key: trade_metrics(groups[key]) for key in sorted(groups)}


# --- the whole run ---------------------------------------------------------------------


def compute_metrics(
    curve: EquityCurve,
    trades: Sequence[TradeRecord],
    *,
    starting_cash: float,
    periods_per_year: int,
) -> dict[str, RunMetric]:
    """Every metric of a run, keyed by stable snake_case names (module docstring)."""
    cash = _positive_cash(starting_cash)
    if periods_per_year <= 0:
        raise ValueError(f"periods_per_year must be positive, got {periods_per_year}")
    times, equity = curve.times, curve.equity
    final = float(equity[-1])
    volatility, sharpe, sortino = _return_ratios(daily_returns(curve, cash), periods_per_year)
    cagr = _cagr(final / cash, float(times[-1] - times[0]) / US_PER_YEAR)
    max_drawdown, max_duration, average_drawdown = _drawdown_stats(times, equity, cash)
    benchmark = curve.benchmark
    metrics: dict[str, RunMetric] = {
        "start": _iso(times[0]),
        "end": _iso(times[-1]),
        "final_equity": final,
        "total_return": final / cash - 1.0,
        "cagr": cagr,
        "annual_volatility": volatility,
        "sharpe": sharpe,
        "sortino": sortino,
        "max_drawdown": max_drawdown,
        "max_drawdown_duration": max_duration,
        "average_drawdown": average_drawdown,
        "calmar": cagr / max_drawdown if cagr is not None and max_drawdown > 0 else None,
        "exposure_time": float(np.mean(curve.exposure)),
        "buy_and_hold_return": None if benchmark is None else float(benchmark[-1]) / cash - 1.0,
    }
    metrics.update(trade_metrics(trades))
    return metrics


# --- plausibility ----------------------------------------------------------------------


def max_return_bound(high: np.ndarray, low: np.ndarray) -> float:
    """The largest return an unleveraged strategy could plausibly make on these bars.

    prod(high / low) - 1: buying every low and selling every high, one round trip per
    bar. Where a bar's range lies wholly above or below the previous bar's (a price gap)
    no path connects them inside the ranges, and holding across the gap in its direction
    gains more than either bar's range: the gap's factor (next low / previous high, or
    previous low / next high) is multiplied in too. Without gaps this is exactly
    prod(high / low) - 1. It assumes at most one favourable move per bar, which is what
    a bar-by-bar engine can trade; it may overflow to inf on long series (no bound then).
    """
    highs = _one_dimensional("high", high).astype(np.float64, copy=False)
    lows = _one_dimensional("low", low).astype(np.float64, copy=False)
    if highs.size != lows.size:
        raise ValueError(f"high has {highs.size} bars but low has {lows.size}")
    if highs.size == 0:
        return 0.0
    _require_finite("high", highs)
    _require_finite("low", lows)
    bad = np.flatnonzero((lows <= 0) | (highs <= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"prices must be positive: bar {i} has high {highs[i]}, low {lows[i]}")
    inverted = np.flatnonzero(highs < lows)
    if inverted.size:
        i = int(inverted[0])
        raise ValueError(f"high is below low at bar {i} ({highs[i]} < {lows[i]})")
    gaps = np.maximum(1.0, np.maximum(lows[1:] / highs[:-1], lows[:-1] / highs[1:]))
    with np.errstate(over="ignore"):
        return float(np.prod(highs / lows) * np.prod(gaps)) - 1.0


def _trade_label(number: int, trade: TradeRecord) -> str:
    return f"trade {number} ({trade.symbol} {trade.side} entered {trade.entry_time.isoformat()})"


def _trade_problems(number: int, trade: TradeRecord) -> list[str]:
    label = _trade_label(number, trade)
    problems = []
    if trade.side not in SIDES:
        problems.append(f"{label} has an unknown side {trade.side!r}")
    for name in ("quantity", "entry_price", "exit_price"):
        value: Decimal = getattr(trade, name)
        # is_finite first: comparing a NaN Decimal raises
        if not value.is_finite() or value <= 0:
            problems.append(f"{label} has {name} {value} (must be positive)")
    if trade.exit_time < trade.entry_time:
        problems.append(f"{label} exits at {trade.exit_time.isoformat()}, before it enters")
    return problems


def sanity_check(
    curve: EquityCurve,
    trades: Sequence[TradeRecord],
    *,
    starting_cash: float,
    leverage_allowed: bool,
    price_bound: float | None,
) -> list[str]:
    """One-line warnings about results no correct engine can produce; empty when fine.

    price_bound is the best return the prices allow (max_return_bound); it only holds for
    unleveraged runs, so pass None when leverage is allowed.
    """
    cash = _positive_cash(starting_cash)
    trade_warnings = [
        problem
        for number, trade in enumerate(trades, start=1)
        for problem in _trade_problems(number, trade)
    ]
    warnings = trade_warnings[:MAX_TRADE_WARNINGS]
    if len(trade_warnings) > MAX_TRADE_WARNINGS:
        warnings.append(f"... and {len(trade_warnings) - MAX_TRADE_WARNINGS} more trade problems")
    if not leverage_allowed:
        broke = np.flatnonzero(curve.equity <= 0)
        if broke.size:
            i = int(broke[0])
            warnings.append(
                f"equity fell to {_num(float(curve.equity[i]))} at {_iso(curve.times[i])}"
                " without leverage"
            )
    if price_bound is not None:
        total_return = float(curve.equity[-1]) / cash - 1.0
        # a run that reaches the bound exactly must not be flagged for float rounding
        if total_return > price_bound + 1e-9 * (1.0 + abs(price_bound)):
            warnings.append(
                f"return {_num(total_return)} exceeds what the price path allows"
                f" (max {_num(price_bound)})"
            )
    return warnings
