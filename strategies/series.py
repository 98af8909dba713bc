"""BarSeries: one symbol's bars, as exact Bars and float arrays, plus their indicators.

Indicators are computed once for the whole series; `market_data(i)` hands a strategy
read-only views that end at bar i, so data after the current bar is out of its reach.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from strategies.indicators import compute_indicators
from strategies.market import Bar, FloatArray, MarketData

COLUMNS = ("open", "high", "low", "close", "volume")


class BarSeries:
    def __init__(self, symbol: str, bars: Sequence[Bar], indicators: Iterable[str] = ()) -> None:
        for earlier, later in itertools.pairwise(bars):
            if later.ts <= earlier.ts:
                raise ValueError(
                    f"{symbol}: bars must be in increasing time order "
                    f"({later.ts.isoformat()} after {earlier.ts.isoformat()})"
                )
        stored = tuple(bars)
        columns: dict[str, FloatArray] = {
            c: np.array([float(getattr(b, c)) for b in stored], dtype=np.float64) for c in COLUMNS
        }
        self._init(symbol, columns, len(stored), stored.__getitem__, indicators)

    @classmethod
    def from_columns(
        cls,
        symbol: str,
        columns: Mapping[str, FloatArray],
        bar_at: Callable[[int], Bar],
        indicators: Iterable[str] = (),
    ) -> BarSeries:
        """A series from float columns (open, high, low, close, volume; already in time
        order), with `bar_at(i)` building the exact Bar of index i when a strategy asks."""
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            raise ValueError(f"{symbol}: missing columns {', '.join(missing)}")
        lengths = {len(columns[c]) for c in COLUMNS}
        if len(lengths) != 1:
            raise ValueError(f"{symbol}: columns of different lengths {sorted(lengths)}")
        series = cls.__new__(cls)
        copied = {c: np.array(columns[c], dtype=np.float64) for c in COLUMNS}
        series._init(symbol, copied, lengths.pop(), bar_at, indicators)
        return series

    def _init(self, symbol: str, columns: dict[str, FloatArray], n: int,
              bar_at: Callable[[int], Bar], indicators: Iterable[str]) -> None:
        self.symbol = symbol
        self._n = n
        self._bar_at = bar_at
        columns.update(compute_indicators(indicators, columns))
        for array in columns.values():
            array.flags.writeable = False
        self.columns: dict[str, FloatArray] = columns
        self.indicator_keys = tuple(k for k in columns if k not in COLUMNS)

    @property
    def bars(self) -> tuple[Bar, ...]:
        return tuple(self._bar_at(i) for i in range(self._n))

    def __len__(self) -> int:
        return self._n

    def market_data(self, i: int) -> MarketData:
        """The symbol as seen at the close of bar i (0 <= i < len)."""
        if not 0 <= i < self._n:
            raise IndexError(f"{self.symbol}: bar {i} is outside 0..{self._n - 1}")
        bar_at = self._bar_at
        return MarketData.at(self.symbol, self.columns, i, self.indicator_keys,
                             lambda: bar_at(i))
