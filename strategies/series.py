"""BarSeries: one symbol's bars, as exact Bars and float arrays, plus their indicators.

Indicators are computed once for the whole series; `market_data(i)` hands a strategy
read-only views that end at bar i, so data after the current bar is out of its reach.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from types import MappingProxyType

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
        self.symbol = symbol
        self.bars = tuple(bars)
        columns: dict[str, FloatArray] = {
            c: np.array([float(getattr(b, c)) for b in bars], dtype=np.float64) for c in COLUMNS
        }
        columns.update(compute_indicators(indicators, columns))
        for array in columns.values():
            array.flags.writeable = False
        self.columns: dict[str, FloatArray] = columns
        self.indicator_keys = tuple(k for k in columns if k not in COLUMNS)

    def __len__(self) -> int:
        return len(self.bars)

    def market_data(self, i: int) -> MarketData:
        """The symbol as seen at the close of bar i (0 <= i < len)."""
        if not 0 <= i < len(self.bars):
            raise IndexError(f"{self.symbol}: bar {i} is outside 0..{len(self.bars) - 1}")
        history = {k: v[: i + 1] for k, v in self.columns.items()}
        current = {k: float(self.columns[k][i]) for k in self.indicator_keys}
        return MarketData(
            symbol=self.symbol,
            bar=self.bars[i],
            indicators=MappingProxyType(current),
            history=MappingProxyType(history),
        )
