"""What a strategy sees: bars, market data for one symbol, the account, the context."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ParamValue = int | float | bool | str


class Environment(StrEnum):
    BACKTEST = "backtest"
    PAPER = "paper"
    LIVE = "live"


def require_utc(ts: datetime, what: str) -> None:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {ts}")


@dataclass(frozen=True, slots=True)
class Bar:
    """One OHLCV bar, exact (Decimal) as stored; `ts` is the bar's open time, aware UTC."""

    ts: datetime
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        require_utc(self.ts, "Bar.ts")
        if not self.low <= min(self.open, self.close) <= max(self.open, self.close) <= self.high:
            raise ValueError(
                f"Bar at {self.ts.isoformat()}: need low <= open, close <= high, got "
                f"o={self.open} h={self.high} l={self.low} c={self.close}"
            )


@dataclass(frozen=True, slots=True)
class MarketData:
    """One symbol at the current bar.

    `indicators` holds the current value of each indicator output (`SMA_20`,
    `MACD_12_26_9.signal`, ...). `history` holds read-only numpy views of `open`, `high`,
    `low`, `close`, `volume` and every indicator output, ending AT the current bar:
    `history["close"][-1]` is this bar's close and nothing after it exists here.
    """

    symbol: str
    bar: Bar
    indicators: Mapping[str, float]
    history: Mapping[str, FloatArray]

    def __getitem__(self, key: str) -> float:
        """The current value of an indicator output (or of a price column)."""
        if key in self.indicators:
            return self.indicators[key]
        if key in self.history:
            return float(self.history[key][-1])
        known = ", ".join(sorted(self.indicators)) or "none"
        raise KeyError(f"{self.symbol}: no indicator {key!r} (available: {known})")

    def previous(self, key: str, bars_ago: int = 1) -> float:
        """The value `bars_ago` bars before the current one (NaN if there is none)."""
        series = self.history[key]
        return float(series[-1 - bars_ago]) if bars_ago < len(series) else float("nan")

    @property
    def close(self) -> FloatArray:
        return self.history["close"]

    def __len__(self) -> int:
        return len(self.history["close"])


@dataclass(frozen=True, slots=True)
class PositionState:
    quantity: Decimal  # signed: > 0 long, < 0 short
    average_price: Decimal = Decimal(0)
    unrealized_pnl: Decimal = Decimal(0)

    @property
    def is_flat(self) -> bool:
        return self.quantity == 0

    @property
    def is_long(self) -> bool:
        return self.quantity > 0

    @property
    def is_short(self) -> bool:
        return self.quantity < 0


FLAT = PositionState(Decimal(0))


@dataclass(frozen=True, slots=True)
class AccountState:
    cash: Decimal
    equity: Decimal
    margin_used: Decimal = Decimal(0)
    currency: str = "USD"
    positions: Mapping[str, PositionState] = field(default_factory=dict)

    def position(self, symbol: str) -> PositionState:
        return self.positions.get(symbol, FLAT)


@dataclass(frozen=True, slots=True)
class StrategyContext:
    environment: Environment
    now: datetime
    data: Mapping[str, MarketData]
    account: AccountState
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    logger: logging.Logger | logging.LoggerAdapter[Any] = field(
        default_factory=lambda: logging.getLogger("strategies")
    )

    def __post_init__(self) -> None:
        require_utc(self.now, "StrategyContext.now")
        object.__setattr__(self, "data", MappingProxyType(dict(self.data)))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
