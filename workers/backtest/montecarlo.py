"""Monte Carlo robustness of a backtest's trade list.

Each path is an equity path: starting_cash plus the cumulative sum of the closed trades'
P&Ls in a random order. "shuffle" permutes the trade list, so every path ends at the same
equity and only the drawdowns differ (how bad could the order have been?); "bootstrap"
draws len(trades) trades with replacement, so the final return varies too (how much of
the result was luck?). The P&Ls are taken as fixed amounts of money: the resampling does
not re-size trades to the equity of the moment.

Per path: the final return, the maximum drawdown (1 - equity / running peak, the peak
starting at starting_cash, as in workers.backtest.metrics) and whether the path was
ruined (its equity touched starting_cash * ruin_level). The result summarises them as
percentiles p5..p95 (numpy's linear interpolation) and means.

Determinism: numpy.random.default_rng(seed) draws one permutation or one bootstrap sample
per path, in path order, whatever the chunking, so the same arguments give the same
result bit for bit. Paths are processed in chunks of rows so that 1,000 paths of 100,000
trades never need the whole 1000 x 100000 matrix at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

METHODS = ("shuffle", "bootstrap")
MAX_PATHS = 100_000
PERCENTILES = {"p5": 5.0, "p25": 25.0, "p50": 50.0, "p75": 75.0, "p95": 95.0}
# a chunk holds three (rows x trades) arrays of 8-byte values: the trade indices, the
# equity and the running peak; keep them within about 48 MB together
CHUNK_BYTES = 48 * 2**20
_ARRAYS_PER_CHUNK = 3


@dataclass(frozen=True)
class MonteCarloResult:
    method: str  # "shuffle" | "bootstrap"
    paths: int
    seed: int
    trades: int
    starting_cash: float
    ruin_level: float  # a path is ruined when its equity touches starting_cash * ruin_level
    final_return: dict[str, float]  # percentiles "p5","p25","p50","p75","p95" plus "mean"
    max_drawdown: dict[str, float]  # same keys
    probability_of_ruin: float

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "paths": self.paths,
            "seed": self.seed,
            "trades": self.trades,
            "starting_cash": self.starting_cash,
            "ruin_level": self.ruin_level,
            "final_return": dict(self.final_return),
            "max_drawdown": dict(self.max_drawdown),
            "probability_of_ruin": self.probability_of_ruin,
        }


@dataclass(frozen=True)
class _Paths:
    """Per-path outcomes, one element per path (what the summary is computed from)."""

    final_return: npt.NDArray[np.float64]
    max_drawdown: npt.NDArray[np.float64]
    ruined: npt.NDArray[np.bool_]


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _validate(
    trade_pnls: Sequence[float],
    starting_cash: float,
    method: str,
    paths: int,
    seed: int,
    ruin_level: float,
) -> npt.NDArray[np.float64]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (expected 'shuffle' or 'bootstrap')")
    if not _is_int(paths) or not 1 <= paths <= MAX_PATHS:
        raise ValueError(f"paths must be an integer from 1 to {MAX_PATHS}, got {paths!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not (math.isfinite(starting_cash) and starting_cash > 0):
        raise ValueError(f"starting_cash must be a positive number, got {starting_cash!r}")
    if not 0 < ruin_level < 1:  # also rejects NaN
        raise ValueError(f"ruin_level must be between 0 and 1 (exclusive), got {ruin_level!r}")
    pnls = np.asarray(trade_pnls, dtype=np.float64)
    if pnls.ndim != 1:
        raise ValueError(f"trade_pnls must be a flat sequence, got {pnls.ndim} dimensions")
    if pnls.size == 0:
        raise ValueError("no closed trades to resample")
    bad = np.flatnonzero(~np.isfinite(pnls))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"trade P&L {i} is not finite ({pnls[i]})")
    return pnls


def _chunk_rows(trades: int, chunk_paths: int | None) -> int:
    if chunk_paths is not None:
        if not _is_int(chunk_paths) or chunk_paths < 1:
            raise ValueError(f"_chunk_paths must be a positive integer, got {chunk_paths!r}")
        return chunk_paths
    return max(1, CHUNK_BYTES // (_ARRAYS_PER_CHUNK * 8 * trades))


def _draw_orders(rng: np.random.Generator, method: str, rows: int, trades: int) -> np.ndarray:
    """Trade indices of `rows` paths, one generator call per path.

    One call per path (rather than one per chunk) keeps the random stream independent of
    the chunk size: bounded integer draws discard buffered bits at the end of each call,
    so drawing a chunk at once would depend on where the chunks are cut.
    """
    orders = np.empty((rows, trades), dtype=np.intp)
    for row in range(rows):
        if method == "shuffle":
            orders[row] = rng.permutation(trades)
        else:
            orders[row] = rng.integers(0, trades, size=trades)
    return orders


def _simulate_paths(
    pnls: npt.NDArray[np.float64],
    starting_cash: float,
    method: str,
    paths: int,
    seed: int,
    ruin_level: float,
    chunk_rows: int,
) -> _Paths:
    rng = np.random.default_rng(seed)
    trades = pnls.size
    ruin_equity = starting_cash * ruin_level
    final_return = np.empty(paths)
    max_drawdown = np.empty(paths)
    ruined = np.empty(paths, dtype=bool)
    for first in range(0, paths, chunk_rows):
        rows = min(chunk_rows, paths - first)
        done = slice(first, first + rows)
        equity = pnls[_draw_orders(rng, method, rows, trades)]
        np.cumsum(equity, axis=1, out=equity)
        equity += starting_cash
        # running peak from starting_cash: running maximum of max(equity, starting_cash)
        peak = np.maximum(equity, starting_cash)
        np.maximum.accumulate(peak, axis=1, out=peak)
        np.divide(equity, peak, out=peak)  # reuse the buffer: equity / peak <= 1
        max_drawdown[done] = 1.0 - peak.min(axis=1)
        ruined[done] = equity.min(axis=1) <= ruin_equity
        final_return[done] = equity[:, -1] / starting_cash - 1.0
    if method == "shuffle":
        # every permutation has the same sum, but float cumulative sums in different
        # orders differ in the last bits; use the exact sum so all paths agree
        final_return[:] = (starting_cash + math.fsum(pnls.tolist())) / starting_cash - 1.0
    return _Paths(final_return, max_drawdown, ruined)


def _summary(values: npt.NDArray[np.float64]) -> dict[str, float]:
    levels = np.percentile(values, list(PERCENTILES.values()))
    summary = {key: float(level) for key, level in zip(PERCENTILES, levels, strict=True)}
    # the mean of n equal floats can be off by an ulp; keep a constant exactly constant
    low, high = float(values.min()), float(values.max())
    summary["mean"] = low if low == high else float(np.mean(values))
    return summary


def run_montecarlo(
    trade_pnls: Sequence[float],
    starting_cash: float,
    *,
    method: str = "shuffle",
    paths: int = 1000,
    seed: int = 0,
    ruin_level: float = 0.5,
    _chunk_paths: int | None = None,
) -> MonteCarloResult:
    """Resample the trade P&Ls into `paths` equity paths and summarise them.

    _chunk_paths overrides how many paths are simulated at once (tests use it to show
    that chunking does not change the result); by default a chunk stays within ~48 MB.
    """
    pnls = _validate(trade_pnls, starting_cash, method, paths, seed, ruin_level)
    rows = _chunk_rows(pnls.size, _chunk_paths)
    outcome = _simulate_paths(pnls, float(starting_cash), method, paths, seed, ruin_level, rows)
    return MonteCarloResult(
        method=method,
        paths=paths,
        seed=seed,
        trades=int(pnls.size),
        starting_cash=float(starting_cash),
        ruin_level=float(ruin_level),
        final_return=_summary(outcome.final_return),
        max_drawdown=_summary(outcome.max_drawdown),
        probability_of_ruin=int(np.count_nonzero(outcome.ruined)) / paths,
    )
