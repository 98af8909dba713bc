"""Walk-forward optimisation: choose parameters on a training window, trade them on the
window that follows, move on, and judge the strategy by the stitched out-of-sample result.

Every candidate on every training window, and every test window, is a real backtest run
(`run_backtest`, same engine, same database functions), labelled `wf<id> w<n> train` or
`wf<id> w<n> test` and carrying the walk-forward's id; scores are read back from the
`backtest.metrics` rows. The pieces:

- `windows()`: test windows are calendar months or quarters (UTC), the last one clipped
  to the end; each is preceded by a training span whose length makes
  train / (train + test) = train_share (rolling), or that starts at the beginning of the
  period (anchored). The first test window is the first calendar step whose training
  span fits after the start, so less than one step of data at the start may go unused.
- Candidates: every combination of the strategy's `search_space()` or, when ranges are
  given, of those ranges (the other parameters keep their defaults; `name=*` takes the
  strategy's own candidates for one parameter); a grid larger than `max_candidates` and
  the `random` method sample without replacement, seeded. Combinations the strategy's
  constructor refuses (ParamError, e.g. fast >= slow) are skipped and counted. The same
  candidates are tried on every window.
- The best candidate by the objective (a numeric metric of compute_metrics, maximised,
  except the costs in MINIMISED (drawdowns, volatility, commission), which are minimised;
  a missing value counts as the worst; ties go to the first candidate) is run on the test
  window with the cash the previous test run ended with, so the stitched out-of-sample
  curve is continuous. A position still open at a test window's end is valued at its last
  close (as in any run) and the next window starts flat with that equity in cash.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from db.queries import query
from strategies.base import IStrategy
from strategies.loader import StrategyLoader, StrategyLoadError
from strategies.market import ParamValue
from strategies.params import ParamError
from workers.backtest.config import BacktestConfig, BacktestError
from workers.backtest.data import instrument, to_us
from workers.backtest.engine import check_limits
from workers.backtest.metrics import (
    EquityCurve,
    TradeRecord,
    compute_metrics,
    drawdown_series,
    periods_per_year,
)
from workers.backtest.results import clean_metrics, jsonable, sample_indices, trade_records
from workers.backtest.run import run_backtest

STEPS: dict[str, int] = {"monthly": 1, "quarterly": 3}  # months per test window
METHODS = ("grid", "random")
ENUMERATE_LIMIT = 200_000  # grids up to this size are enumerated (and checked) in full
STITCHED_POINTS = 5_000  # at most this many points of the stitched curve in the result
MAX_RANGE_VALUES = 10_000  # values one --param may expand to


# --------------------------------------------------------------------------- windows
@dataclass(frozen=True, slots=True)
class Window:
    """One walk-forward window: train on [train_start, train_end), test on
    [test_start, test_end); train_end == test_start."""

    number: int
    train_start: datetime
    train_end: datetime
    test_start: datetime
    test_end: datetime

    @property
    def train(self) -> timedelta:
        return self.train_end - self.train_start

    @property
    def test(self) -> timedelta:
        return self.test_end - self.test_start


def _step_floor(ts: datetime, months: int) -> datetime:
    month0 = (ts.month - 1) // months * months
    return datetime(ts.year, month0 + 1, 1, tzinfo=UTC)


def _add_months(ts: datetime, months: int) -> datetime:
    """A month (or quarter) start `months` later."""
    index = ts.year * 12 + ts.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _train_length(test: timedelta, ratio: float) -> timedelta:
    return timedelta(seconds=round(test.total_seconds() * ratio))


def _utc(ts: datetime, what: str) -> datetime:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise BacktestError(f"{what} must be timezone-aware (UTC), got {ts}")
    return ts.astimezone(UTC)


def _fmt_time(ts: datetime) -> str:
    return f"{ts:%Y-%m-%d}" if ts.time() == datetime.min.time() else f"{ts:%Y-%m-%d %H:%M}"


def windows(start: datetime, end: datetime, *, train_share: float = 0.7,
            step: str = "monthly", anchored: bool = False) -> list[Window]:
    """The walk-forward windows of [start, end) (see the module docstring)."""
    start, end = _utc(start, "start"), _utc(end, "end")
    if end <= start:
        raise BacktestError(f"--to {end.isoformat()} must be after --from {start.isoformat()}")
    if isinstance(train_share, bool) or not isinstance(train_share, int | float) \
            or not math.isfinite(train_share) or not 0 < train_share < 1:
        raise BacktestError(
            f"--train-share must be a fraction between 0 and 1 (exclusive), got {train_share!r}")
    if step not in STEPS:
        raise BacktestError(f"--step {step!r}: expected one of {', '.join(STEPS)}")
    months = STEPS[step]
    unit = "month" if months == 1 else "quarter"
    ratio = train_share / (1 - train_share)
    # the first test window: the first calendar step whose training span fits after start
    test_start = _add_months(_step_floor(start, months), months)
    while test_start - _train_length(_add_months(test_start, months) - test_start,
                                     ratio) < start:
        test_start = _add_months(test_start, months)
    first_end = _add_months(test_start, months)
    if first_end > end:
        train = _train_length(first_end - test_start, ratio)
        raise BacktestError(
            f"the period {_fmt_time(start)} to {_fmt_time(end)} is too short for one {step} "
            f"walk-forward window at train share {train_share:g}: the first test {unit} "
            f"would be {_fmt_time(test_start)} to {_fmt_time(first_end)} after "
            f"{train.total_seconds() / 86_400:.1f} days of training, so --to must be at "
            f"least {_fmt_time(first_end)} ({(first_end - start).days} days after --from)")
    return _tile(start, end, test_start, months, ratio, anchored)


def _tile(start: datetime, end: datetime, test_start: datetime, months: int, ratio: float,
          anchored: bool) -> list[Window]:
    out: list[Window] = []
    while test_start < end:
        test_end = min(_add_months(test_start, months), end)
        # months differ in length: with a high train share a 31-day month after a
        # 28-day one would train from before `start`; such a span starts at `start`
        train_start = start if anchored else max(
            start, test_start - _train_length(test_end - test_start, ratio))
        out.append(Window(len(out) + 1, train_start, test_start, test_start, test_end))
        test_start = test_end
    return out


# --------------------------------------------------------------------------- candidates
def _scalar(raw: str) -> ParamValue:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise BacktestError(f"{raw!r} is not a finite number")
        return value
    return raw


def _number(raw: str, what: str) -> int | float:
    try:
        value = _scalar(raw.strip())
    except BacktestError as exc:
        raise BacktestError(f"{what}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BacktestError(f"{what}: {raw.strip()!r} is not a number")
    return value


# the marker for "this parameter's own search space" in --param name=*
OWN_SPACE = "*"


def parse_param_range(text: str) -> tuple[str, list[ParamValue] | str]:
    """`fast=5:20:5` (low:high:step, both ends included), `slow=20,30,50` (a list; one
    value fixes the parameter) or `size=*` (the strategy's own candidates)."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    where = f"--param {text.strip()!r}"
    if not sep or not name or not raw:
        raise BacktestError(f"{where}: expected name=low:high:step or name=v1,v2,...")
    if not name.isidentifier():
        raise BacktestError(f"{where}: {name!r} is not a parameter name")
    if raw == OWN_SPACE:
        return name, OWN_SPACE
    if ":" in raw:
        parts = raw.split(":")
        if len(parts) != 3:
            raise BacktestError(f"{where}: a range is low:high:step, e.g. {name}=5:20:5")
        low, high, step = (_number(p, where) for p in parts)
        if step <= 0:
            raise BacktestError(f"{where}: the step must be positive, got {parts[2].strip()}")
        if low > high:
            raise BacktestError(f"{where}: low {parts[0].strip()} is above high {parts[1].strip()}")
        count = math.floor((high - low) / step + 1e-9) + 1
        if count > MAX_RANGE_VALUES:
            raise BacktestError(f"{where}: {count:,} values, more than {MAX_RANGE_VALUES:,}")
        if all(isinstance(v, int) for v in (low, high, step)):
            return name, [int(low + i * step) for i in range(count)]
        return name, [round(low + i * step, 10) for i in range(count)]
    values: list[ParamValue] = []
    for part in raw.split(","):
        if not part.strip():
            raise BacktestError(f"{where}: an empty value in the list")
        try:
            value = _scalar(part.strip())
        except BacktestError as exc:
            raise BacktestError(f"{where}: {exc}") from None
        if value not in values:
            values.append(value)
    return name, values


def parse_param_ranges(texts: Sequence[str]) -> dict[str, list[ParamValue] | str]:
    """Every `--param` of the command, each parameter at most once."""
    out: dict[str, list[ParamValue] | str] = {}
    for text in texts:
        name, values = parse_param_range(text)
        if name in out:
            raise BacktestError(f"--param {name} given twice")
        out[name] = values
    return out


def search_grid(cls: type[IStrategy],
                param_ranges: Mapping[str, Sequence[ParamValue] | str] | None = None,
                fixed: Mapping[str, object] | None = None) -> dict[str, list[ParamValue]]:
    """Each parameter's candidates: the strategy's search space, or, when ranges are given,
    those ranges with every other parameter at its default (or its `fixed` value). Values
    are checked against the parameter's type and domain (one-line errors)."""
    own = {name: list(values) for name, values in cls.search_space().items()}
    specs = cls.parameters
    known = ", ".join(specs) or "none"
    fixed = dict(fixed or {})
    for name in fixed:
        if name not in specs:
            raise BacktestError(f"{cls.name} has no parameter {name} (known: {known})")
    ranges = dict(param_ranges or {})
    for name in ranges:
        if name not in specs:
            raise BacktestError(f"--param {name}: {cls.name} has no parameter {name} "
                                f"(known: {known})")
    grid: dict[str, list[ParamValue]] = {}
    for name, spec in specs.items():
        if name in ranges:
            given = ranges[name]
            values: Sequence[object] = own.get(name, [spec.default]) if given == OWN_SPACE \
                else given
            if not values:
                raise BacktestError(f"--param {name}: no values")
            checked: list[ParamValue] = []
            for value in values:
                try:
                    v = spec.validate(name, value)
                except ParamError as exc:
                    raise BacktestError(f"--param {name}: {exc}") from None
                if v not in checked:
                    checked.append(v)
            grid[name] = checked
        elif name in fixed:
            try:
                grid[name] = [spec.validate(name, fixed[name])]
            except ParamError as exc:
                raise BacktestError(str(exc)) from None
        elif ranges:
            grid[name] = [spec.default]
        else:
            grid[name] = list(own.get(name, [spec.default])) or [spec.default]
    return grid


@dataclass(frozen=True)
class CandidateSet:
    """The parameter sets tried on every training window, in grid order."""

    candidates: list[dict[str, ParamValue]]
    grid_size: int  # combinations in the grid
    refused: int  # combinations the strategy refused (among those checked)
    first_refusal: str | None
    sampled: bool
    notes: list[str] = field(default_factory=list)


def _decode(index: int, names: Sequence[str],
            grid: Mapping[str, Sequence[ParamValue]]) -> dict[str, ParamValue]:
    """The combination at `index` of the grid in itertools.product order."""
    out: dict[str, ParamValue] = {}
    for name in reversed(names):
        values = grid[name]
        index, k = divmod(index, len(values))
        out[name] = values[k]
    return {name: out[name] for name in names}


def generate_candidates(cls: type[IStrategy], grid: Mapping[str, Sequence[ParamValue]], *,
                        method: str = "grid", samples: int | None = None, seed: int = 0,
                        max_candidates: int = 50) -> CandidateSet:
    """Every valid combination of the grid (`grid`) or a seeded sample without replacement
    (`random`, or a grid with more valid combinations than `max_candidates`)."""
    if method not in METHODS:
        raise BacktestError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if isinstance(max_candidates, bool) or max_candidates < 1:
        raise BacktestError(f"--max-candidates must be at least 1, got {max_candidates}")
    if samples is not None and samples < 1:
        raise BacktestError(f"--samples must be at least 1, got {samples}")
    if samples is not None and method != "random":
        raise BacktestError("--samples applies to --method random only")
    names = list(grid)
    total = math.prod(len(grid[n]) for n in names)
    if total == 0:
        empty = next(n for n in names if not grid[n])
        raise BacktestError(f"parameter {empty} has no candidate values")
    notes: list[str] = []
    wanted = max_candidates
    if method == "random":
        wanted = samples if samples is not None else max_candidates
        if wanted > max_candidates:
            notes.append(f"--samples {wanted} is more than --max-candidates {max_candidates}: "
                         f"trying {max_candidates}")
            wanted = max_candidates
    refusals: list[str] = []

    def accepted(params: dict[str, ParamValue]) -> bool:
        try:
            cls(params)
        except ParamError as exc:
            refusals.append(str(exc))
            return False
        return True

    rng = random.Random(seed)
    if total <= ENUMERATE_LIMIT:
        valid = [c for c in (dict(zip(names, combo, strict=True))
                             for combo in itertools.product(*(grid[n] for n in names)))
                 if accepted(c)]
        if not valid:
            raise BacktestError(
                f"{cls.name} refused every one of the {total:,} parameter combinations "
                f"(first: {refusals[0]})")
        if len(valid) <= wanted:
            if method == "random" and samples is not None and samples > len(valid):
                notes.append(f"the grid has only {len(valid)} valid combinations: trying all")
            chosen, sampled = valid, False
        else:
            picked = sorted(rng.sample(range(len(valid)), wanted))
            chosen, sampled = [valid[i] for i in picked], True
            if method == "grid":
                notes.append(f"the grid has {len(valid):,} valid combinations, more than "
                             f"--max-candidates {max_candidates}: trying a random sample of "
                             f"{wanted} (seed {seed})")
        refused = total - len(valid)
    else:
        # too many to enumerate: draw indices without replacement until enough are valid
        seen: set[int] = set()
        found: dict[int, dict[str, ParamValue]] = {}
        attempts = max(50 * wanted, 1_000)
        while len(found) < wanted and len(seen) < min(total, attempts):
            index = rng.randrange(total)
            if index in seen:
                continue
            seen.add(index)
            params = _decode(index, names, grid)
            if accepted(params):
                found[index] = params
        if not found:
            raise BacktestError(
                f"{cls.name} refused all of the {len(seen):,} parameter combinations tried "
                f"(first: {refusals[0]})")
        chosen, sampled = [found[i] for i in sorted(found)], True
        refused = len(refusals)
        notes.append(f"the grid has {total:,} combinations, too many to try: trying a random "
                     f"sample of {len(chosen)} (seed {seed})")
    return CandidateSet(chosen, total, refused, refusals[0] if refusals else None, sampled,
                        notes)


# --------------------------------------------------------------------------- objective
@cache
def objectives() -> frozenset[str]:
    """The numeric metric names a run records (what an objective may be)."""
    curve = EquityCurve(times=np.array([0, 86_400_000_000], dtype=np.int64),
                        equity=np.array([1.0, 1.0]), exposure=np.array([False, False]),
                        benchmark=np.array([1.0, 1.0]))
    metrics = compute_metrics(curve, [], starting_cash=1.0, periods_per_year=365)
    names = {k for k, v in metrics.items() if not isinstance(v, str)}
    return frozenset(names | {"final_cash", "open_positions"})


# Metrics where less is better (each a positive magnitude): the best candidate has the least.
MINIMISED = frozenset({"max_drawdown", "max_drawdown_duration", "average_drawdown",
                       "annual_volatility", "total_commission"})


def check_objective(objective: str) -> str:
    if objective not in objectives():
        raise BacktestError(f"--objective {objective!r}: expected a run metric, one of "
                            f"{', '.join(sorted(objectives()))}")
    return objective


def _score(objective: str, value: float | None) -> float:
    """Higher is better: a minimised metric's value counts negated; None is the worst."""
    if value is None:
        return -math.inf
    return -value if objective in MINIMISED else value


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class WindowResult:
    window: Window
    params: dict[str, ParamValue]
    train_score: float | None
    candidates: int
    train_run_id: int  # the chosen candidate's training run
    test_run_id: int
    test_cash: Decimal
    test_final_equity: Decimal
    test_metrics: dict[str, float | int]

    def to_dict(self) -> dict[str, Any]:
        w, m = self.window, self.test_metrics
        return {
            "window": w.number, "train_start": w.train_start.isoformat(),
            "train_end": w.train_end.isoformat(), "test_start": w.test_start.isoformat(),
            "test_end": w.test_end.isoformat(), "params": dict(self.params),
            "train_score": self.train_score, "candidates": self.candidates,
            "train_run_id": self.train_run_id, "test_run_id": self.test_run_id,
            "test_cash": float(self.test_cash),
            "test_final_equity": float(self.test_final_equity),
            "test_return": m.get("total_return"), "test_sharpe": m.get("sharpe"),
            "test_max_drawdown": m.get("max_drawdown"), "test_trades": m.get("trades"),
        }


@dataclass(frozen=True)
class Event:
    """What run_walk_forward reports as it goes: the plan, notes, each training run and
    each finished window."""

    kind: Literal["plan", "note", "train", "window"]
    message: str = ""
    window: Window | None = None
    done: int = 0
    total: int = 0
    result: WindowResult | None = None


Progress = Callable[[Event], None]


def stability(values_per_window: Sequence[Mapping[str, ParamValue]]) -> dict[str, Any]:
    """Per parameter: the value chosen in each window, the most common one (the first to
    appear among equals) and how often it changed between consecutive windows."""
    out: dict[str, Any] = {}
    names: list[str] = []
    for params in values_per_window:
        names.extend(n for n in params if n not in names)
    for name in names:
        values = [p.get(name) for p in values_per_window]
        firsts = list(dict.fromkeys(values))
        mode = max(firsts, key=values.count)
        changes = sum(1 for a, b in itertools.pairwise(values) if a != b)
        out[name] = {"values": values, "mode": mode, "changes": changes}
    return out


def _plain_number(value: Decimal) -> float | int:
    """A stored metric as JSON shows it: counts as integers, the rest as floats."""
    return int(value) if value == value.to_integral_value() and abs(value) < 2**53 \
        else float(value)


def _run_metrics(conn: psycopg.Connection,
                 runs: Sequence[int]) -> dict[int, dict[str, float | int]]:
    """The run-scope rows of backtest.metrics (a metric that was None has no row)."""
    rows = conn.execute(
        "SELECT run_id, metric, value FROM backtest.metrics "
        "WHERE run_id = ANY(%s) AND scope = 'run' AND scope_key = ''", (list(runs),))
    out: dict[int, dict[str, float | int]] = {r: {} for r in runs}
    for run, metric, value in rows:
        out[int(run)][metric] = _plain_number(Decimal(value))
    return out


def _final_equity(conn: psycopg.Connection, run: int) -> Decimal:
    row = conn.execute(query("backtest_final_state"), {"run": run}).fetchone()
    assert row is not None
    return Decimal(row[1])


def stitch(conn: psycopg.Connection, results: Sequence[WindowResult], cash: Decimal,
           markets: Sequence[str], timeframe: str) -> dict[str, Any]:
    """The test runs' equity curves chained into one out-of-sample curve (it starts at
    `cash` at the first test window's start), with its metrics."""
    times: list[int] = [to_us(results[0].window.test_start)]
    equity: list[float] = [float(cash)]
    exposed: list[bool] = [False]
    bench: list[float] | None = [float(cash)]
    trades: list[TradeRecord] = []
    for r in results:
        rows = conn.execute(query("backtest_equity"), {"run": r.test_run_id}).fetchall()
        if bench is not None and any(row[2] is None for row in rows):
            bench = None
        scale = 1.0 if bench is None else bench[-1] / float(r.test_cash)
        for ts, eq, bm, _dd, ex in rows:
            t = to_us(ts)
            if t <= times[-1]:
                raise BacktestError(f"test run {r.test_run_id} overlaps the previous test "
                                    f"window at {ts.isoformat()}")
            times.append(t)
            equity.append(float(eq))
            exposed.append(bool(ex))
            if bench is not None:
                bench.append(float(bm) * scale)
        trades.extend(trade_records(conn, r.test_run_id))
    curve = EquityCurve(times=np.array(times, dtype=np.int64), equity=np.array(equity),
                        exposure=np.array(exposed, dtype=bool),
                        benchmark=None if bench is None else np.array(bench))
    metrics = clean_metrics(compute_metrics(curve, trades, starting_cash=float(cash),
                                     periods_per_year=periods_per_year(markets, timeframe)))
    metrics["final_equity"] = float(results[-1].test_final_equity)
    metrics["windows"] = len(results)
    metrics["total_commission"] = float(conn.execute(
        "SELECT COALESCE(sum(f.commission), 0) FROM trading.fills f JOIN backtest.runs r"
        " ON r.account_id = f.account_id WHERE r.run_id = ANY(%s)",
        ([r.test_run_id for r in results],)).fetchone()[0])  # type: ignore[index]
    drawdown = drawdown_series(curve.equity, starting_cash=float(cash))
    keep = [0, len(times) - 1, int(np.argmax(drawdown)), int(np.argmin(curve.equity)),
            int(np.argmax(curve.equity))]
    pick = sample_indices(len(times), STITCHED_POINTS, keep)
    iso = [datetime.fromtimestamp(0, UTC) + timedelta(microseconds=int(t))
           for t in curve.times[pick]]
    return {"ts": [t.isoformat() for t in iso],
            "equity": np.round(curve.equity[pick], 6).tolist(),
            "points": len(times), "metrics": metrics}


# --------------------------------------------------------------------------- the run
def _strategy_class(config: BacktestConfig) -> type[IStrategy]:
    loader = StrategyLoader(config.strategy_dirs)
    try:
        return loader.get(config.strategy)
    except StrategyLoadError as exc:
        errors = "; ".join(loader.errors.values())
        raise BacktestError(f"{exc}{' (' + errors + ')' if errors else ''}") from None


_BAR_CHECK = """
SELECT w.n, w.kind
FROM unnest(%(n)s::int[], %(kind)s::text[], %(s)s::timestamptz[], %(e)s::timestamptz[])
     AS w(n, kind, s, e)
WHERE NOT EXISTS (SELECT 1 FROM market.bars b
                  WHERE b.instrument_id = %(instrument)s
                    AND b.timeframe = %(timeframe)s::market.timeframe
                    AND b.ts >= w.s AND b.ts < w.e
                    -- a bar closing after the window's end is not the window's (the runs
                    -- replay only the bars that close by their end)
                    AND b.ts + market.timeframe_interval(b.timeframe) <= w.e)
ORDER BY w.n, w.kind
"""


def _check_bars(conn: psycopg.Connection, config: BacktestConfig,
                plan: list[Window]) -> tuple[list[Window], list[str], list[str]]:
    """Every window needs bars of every symbol in its training and its test period;
    trailing windows without test bars (the period runs past the data) are dropped.
    Returns the windows, the notes and the symbols' markets."""
    n = [w.number for w in plan for _ in (0, 1)]
    kind = [k for _ in plan for k in ("test", "train")]
    s = [t for w in plan for t in (w.test_start, w.train_start)]
    e = [t for w in plan for t in (w.test_end, w.train_end)]
    missing: dict[int, dict[str, list[str]]] = {}
    markets = []
    for symbol in config.symbols:
        inst = instrument(conn, symbol)
        markets.append(inst.market)
        for number, what in conn.execute(_BAR_CHECK, {
                "n": n, "kind": kind, "s": s, "e": e, "instrument": inst.instrument_id,
                "timeframe": config.timeframe}):
            missing.setdefault(int(number), {}).setdefault(what, []).append(inst.symbol)
    last = len(plan)
    while last >= 1 and "test" in missing.get(last, {}):
        last -= 1
    notes = []
    if last < len(plan):
        dropped = plan[last:]
        if last == 0:
            raise BacktestError(
                f"no {config.timeframe} bars of {', '.join(missing[1]['test'])} in the first "
                f"test window ({_fmt_time(plan[0].test_start)} to {_fmt_time(plan[0].test_end)})"
                f": import the bars or choose another period")
        which = (f"windows {dropped[0].number}-{dropped[-1].number}" if len(dropped) > 1
                 else f"window {dropped[0].number}")
        notes.append(f"{which} dropped: no {config.timeframe} bars of "
                     f"{', '.join(missing[dropped[0].number]['test'])} from "
                     f"{_fmt_time(dropped[0].test_start)} on")
    for w in plan[:last]:
        for what, symbols in sorted(missing.get(w.number, {}).items()):
            start, end = (w.train_start, w.train_end) if what == "train" else (
                w.test_start, w.test_end)
            raise BacktestError(
                f"window {w.number}: no {config.timeframe} bars of {', '.join(symbols)} in its "
                f"{what}ing period {_fmt_time(start)} to {_fmt_time(end)} (a gap in the data)")
    return plan[:last], notes, markets


def run_walk_forward(conn: psycopg.Connection, base_config: BacktestConfig, *,
                     train_share: float = 0.7, step: str = "monthly", anchored: bool = False,
                     objective: str = "sharpe", method: str = "grid",
                     samples: int | None = None, seed: int = 0,
                     param_ranges: Mapping[str, Sequence[ParamValue] | str] | None = None,
                     max_candidates: int = 50, progress: Progress | None = None) -> int:
    """Walk forward over base_config's period (its symbols, timeframe, cash and costs;
    its params fix those parameters) on an autocommit connection; returns the id of the
    backtest.walk_forwards row. Everything is checked before anything is written; a
    failure later marks the walk-forward failed and re-raises."""
    if not conn.autocommit:
        raise ValueError("run_walk_forward needs an autocommit connection")

    def report(event: Event) -> None:
        if progress is not None:
            progress(event)

    check_objective(objective)
    check_limits(conn, base_config.limits)
    plan = windows(base_config.start, base_config.end, train_share=train_share, step=step,
                   anchored=anchored)
    cls = _strategy_class(base_config)
    grid = search_grid(cls, param_ranges, base_config.params)
    cands = generate_candidates(cls, grid, method=method, samples=samples, seed=seed,
                                max_candidates=max_candidates)
    plan, bar_notes, markets = _check_bars(conn, base_config, plan)
    notes = [*cands.notes, *bar_notes]
    if cands.refused:
        notes.append(f"{cands.refused:,} of {cands.grid_size:,} combinations refused by "
                     f"{cls.name} (e.g. {cands.first_refusal})")
    k = len(cands.candidates)
    report(Event("plan", f"{len(plan)} window(s), {k} candidate(s) each: "
                         f"{len(plan) * (k + 1)} backtest runs", total=len(plan)))
    for note in notes:
        report(Event("note", note))
    settings = jsonable({
        "train_share": train_share, "step": step, "anchored": anchored, "method": method,
        "samples": samples, "seed": seed, "max_candidates": max_candidates,
        "param_ranges": dict(param_ranges or {}), "parameters": list(grid), "grid": grid,
        "grid_size": cands.grid_size, "candidates": k, "refused": cands.refused,
        "cash": base_config.cash, "currency": base_config.currency,
        "backtest": base_config.settings(), "notes": notes})
    row = conn.execute(
        "SELECT backtest.create_walk_forward(%s, %s, %s, %s, %s, %s, %s)",
        (cls.name, list(base_config.symbols), base_config.timeframe, base_config.start,
         base_config.end, objective, Jsonb(settings))).fetchone()
    assert row is not None
    wf_id = int(row[0])
    head = {"walk_forward_id": wf_id, "objective": objective, "strategy": cls.name,
            "version": cls.version, "symbols": list(base_config.symbols),
            "timeframe": base_config.timeframe, "start": base_config.start.isoformat(),
            "end": base_config.end.isoformat(), "cash": float(base_config.cash),
            "train_share": train_share, "step": step, "anchored": anchored, "method": method,
            "parameters": list(grid), "candidates": k, "grid_size": cands.grid_size,
            "refused": cands.refused, "notes": notes}
    done: list[WindowResult] = []
    try:
        cash = base_config.cash
        for w in plan:
            result = _window(conn, base_config, wf_id, w, cands.candidates, objective, cash,
                             report)
            done.append(result)
            report(Event("window", window=w, done=w.number, total=len(plan), result=result))
            cash = result.test_final_equity
            if cash <= 0:
                raise BacktestError(
                    f"window {w.number}: the out-of-sample equity fell to {cash}; the "
                    "walk-forward cannot go on")
        params = [r.params for r in done]
        result_json = jsonable({
            **head, "windows": [r.to_dict() for r in done],
            "stitched": stitch(conn, done, base_config.cash, markets,
                               base_config.timeframe),
            "stability": stability(params)})
        conn.execute("SELECT backtest.finish_walk_forward(%s, 'finished', %s)",
                     (wf_id, Jsonb(result_json)))
    except BaseException as exc:
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        partial = jsonable({**head, "error": f"{type(exc).__name__}: {message}",
                             "windows": [r.to_dict() for r in done], "stitched": None,
                             "stability": stability([r.params for r in done])})
        with contextlib.suppress(psycopg.Error):  # the original error is the one to report
            conn.execute("SELECT backtest.finish_walk_forward(%s, 'failed', %s)",
                         (wf_id, Jsonb(partial)))
        raise
    return wf_id


def _window(conn: psycopg.Connection, base: BacktestConfig, wf_id: int, w: Window,
            candidates: Sequence[dict[str, ParamValue]], objective: str, cash: Decimal,
            report: Progress) -> WindowResult:
    train_runs: list[int] = []
    for n, params in enumerate(candidates, 1):
        config = replace(base, params=params, start=w.train_start, end=w.train_end,
                         label=f"wf{wf_id} w{w.number} train", walk_forward_id=wf_id)
        train_runs.append(run_backtest(conn, config))
        report(Event("train", window=w, done=n, total=len(candidates)))
    scores = _run_metrics(conn, train_runs)
    best, best_score = 0, _score(objective, scores[train_runs[0]].get(objective))
    for i, run in enumerate(train_runs[1:], 1):
        score = _score(objective, scores[run].get(objective))
        if score > best_score:  # ties go to the earlier candidate
            best, best_score = i, score
    found = scores[train_runs[best]].get(objective)
    train_score = None if found is None else float(found)
    params = dict(candidates[best])
    config = replace(base, params=params, start=w.test_start, end=w.test_end, cash=cash,
                     label=f"wf{wf_id} w{w.number} test", walk_forward_id=wf_id)
    test_run = run_backtest(conn, config)
    test_metrics = _run_metrics(conn, [test_run])[test_run]
    final = _final_equity(conn, test_run)
    conn.execute("SELECT backtest.record_window(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                 (wf_id, w.number, w.train_start, w.train_end, w.test_start, w.test_end,
                  Jsonb(params), train_score, len(candidates), test_run))
    return WindowResult(w, params, train_score, len(candidates), train_runs[best], test_run,
                        cash, final, test_metrics)


# --------------------------------------------------------------------------- reading back
_WALK_FORWARD = """
SELECT walk_forward_id, strategy, symbols, timeframe::text, start_ts, end_ts, settings::text,
       objective, status::text, result::text, created_at, finished_at
FROM backtest.walk_forwards WHERE walk_forward_id = %s
"""
_WINDOWS = """
SELECT w.window_no, w.train_start, w.train_end, w.test_start, w.test_end, w.params::text,
       w.train_score, w.candidates, w.test_run_id,
       (SELECT m.value FROM backtest.metrics m WHERE m.run_id = w.test_run_id
          AND m.scope = 'run' AND m.metric = 'total_return'),
       (SELECT m.value FROM backtest.metrics m WHERE m.run_id = w.test_run_id
          AND m.scope = 'run' AND m.metric = 'sharpe')
FROM backtest.walk_forward_windows w WHERE w.walk_forward_id = %s ORDER BY w.window_no
"""


def _ordered(mapping: Mapping[str, Any], order: Sequence[str]) -> dict[str, Any]:
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(mapping.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def load_walk_forward(conn: psycopg.Connection, wf_id: int) -> dict[str, Any]:
    """A walk-forward as stored: its result when finished (or failed), else what its
    recorded windows show so far; with its id, status and times."""
    row = conn.execute(_WALK_FORWARD, (wf_id,)).fetchone()
    if row is None:
        raise LookupError(f"unknown walk-forward {wf_id}")
    (wid, strategy, symbols, timeframe, start, end, settings, objective, status, result,
     created, finished) = row
    out: dict[str, Any] = json.loads(result) if result else {}
    if "windows" not in out:
        out["windows"] = [
            {"window": r[0], "train_start": r[1].isoformat(), "train_end": r[2].isoformat(),
             "test_start": r[3].isoformat(), "test_end": r[4].isoformat(),
             "params": json.loads(r[5]), "train_score": r[6], "candidates": r[7],
             "test_run_id": r[8], "test_return": None if r[9] is None else float(r[9]),
             "test_sharpe": None if r[10] is None else float(r[10])}
            for r in conn.execute(_WINDOWS, (wid,))]
        out.setdefault("stitched", None)
        out.setdefault("stability", stability([w["params"] for w in out["windows"]]))
    out.setdefault("objective", objective)
    settings_json = json.loads(settings)
    order = out.get("parameters") or settings_json.get("parameters") or []
    if order:  # jsonb keeps no key order: restore the strategy's
        for w in out["windows"]:
            w["params"] = _ordered(w.get("params") or {}, order)
        out["stability"] = _ordered(out.get("stability") or {}, order)
    out.update({"walk_forward_id": int(wid), "status": status, "strategy": strategy,
                "symbols": list(symbols), "timeframe": timeframe, "start": start.isoformat(),
                "end": end.isoformat(), "settings": settings_json,
                "created_at": created.isoformat(),
                "finished_at": None if finished is None else finished.isoformat()})
    return out


__all__ = [
    "METHODS", "MINIMISED", "STEPS", "CandidateSet", "Event", "Progress", "Window",
    "WindowResult", "check_objective", "generate_candidates", "load_walk_forward",
    "objectives", "parse_param_range", "parse_param_ranges", "run_walk_forward",
    "search_grid", "stability", "stitch", "windows",
]
