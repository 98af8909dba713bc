"""What a strategy sees: bars, market data for one symbol, the account, the context."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
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


class MarketData:
    """One symbol at the current bar.

    `indicators` holds the current value of each indicator output (`SMA_20`,
    `MACD_12_26_9.signal`, ...). `history` holds read-only numpy views of `open`, `high`,
    `low`, `close`, `volume` and every indicator output, ending AT the current bar:
    `history["close"][-1]` is this bar's close and nothing after it exists here.

    `bar` (exact Decimals) may be given, or built on first use by `bar_factory`: a
    backtest makes a million of these, and most strategies read only the floats. For the
    same reason `MarketData.at(...)` reads the whole series' columns at one index, and
    builds `history` and `indicators` only when a strategy asks for them.
    Immutable once built.
    """

    __slots__ = ("_bar", "_bar_factory", "_columns", "_history", "_i", "_indicators",
                 "_keys", "symbol")

    symbol: str
    _bar: Bar | None
    _bar_factory: Callable[[], Bar] | None
    _indicators: Mapping[str, float] | None
    _history: Mapping[str, FloatArray] | None
    _columns: Mapping[str, FloatArray] | None
    _keys: tuple[str, ...]
    _i: int

    def __init__(
        self,
        symbol: str,
        bar: Bar | None = None,
        indicators: Mapping[str, float] | None = None,
        history: Mapping[str, FloatArray] | None = None,
        *,
        bar_factory: Callable[[], Bar] | None = None,
    ) -> None:
        if bar is None and bar_factory is None:
            raise ValueError(f"MarketData({symbol!r}) needs a bar or a bar_factory")
        set_ = object.__setattr__
        set_(self, "symbol", symbol)
        set_(self, "_bar", bar)
        set_(self, "_bar_factory", bar_factory)
        set_(self, "_indicators", indicators if indicators is not None else {})
        set_(self, "_history", history if history is not None else {})
        set_(self, "_columns", None)
        set_(self, "_keys", ())
        set_(self, "_i", -1)

    @classmethod
    def at(cls, symbol: str, columns: Mapping[str, FloatArray], i: int,
           indicator_keys: tuple[str, ...], bar_factory: Callable[[], Bar]) -> MarketData:
        """The symbol at index i of full-series columns (read-only arrays): nothing after
        index i is reachable through it."""
        md = cls.__new__(cls)
        set_ = object.__setattr__
        set_(md, "symbol", symbol)
        set_(md, "_bar", None)
        set_(md, "_bar_factory", bar_factory)
        set_(md, "_indicators", None)
        set_(md, "_history", None)
        set_(md, "_columns", columns)
        set_(md, "_keys", indicator_keys)
        set_(md, "_i", i)
        return md

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"MarketData is immutable (tried to set {name})")

    @property
    def bar(self) -> Bar:
        bar = self._bar
        if bar is None:
            assert self._bar_factory is not None
            bar = self._bar_factory()
            object.__setattr__(self, "_bar", bar)
        return bar

    @property
    def indicators(self) -> Mapping[str, float]:
        found = self._indicators
        if found is None:
            assert self._columns is not None
            found = MappingProxyType({k: float(self._columns[k][self._i]) for k in self._keys})
            object.__setattr__(self, "_indicators", found)
        return found

    @property
    def history(self) -> Mapping[str, FloatArray]:
        found = self._history
        if found is None:
            assert self._columns is not None
            end = self._i + 1
            found = MappingProxyType({k: v[:end] for k, v in self._columns.items()})
            object.__setattr__(self, "_history", found)
        return found

    def __repr__(self) -> str:
        return f"MarketData({self.symbol!r}, bars={len(self)})"

    def __getitem__(self, key: str) -> float:
        """The current value of an indicator output (or of a price column)."""
        columns = self._columns
        if columns is not None:
            column = columns.get(key)
            if column is not None:
                return float(column[self._i])
        else:
            assert self._indicators is not None and self._history is not None
            if key in self._indicators:
                return self._indicators[key]
            if key in self._history:
                return float(self._history[key][-1])
        known = ", ".join(sorted(self.indicators)) or "none"
        raise KeyError(f"{self.symbol}: no indicator {key!r} (available: {known})")

    def previous(self, key: str, bars_ago: int = 1) -> float:
        """The value `bars_ago` (>= 0) bars before the current one (NaN if there is none)."""
        if bars_ago < 0:
            raise ValueError(f"{self.symbol}: bars_ago must be >= 0, got {bars_ago}")
        columns = self._columns
        if columns is not None:
            if key not in columns:
                raise KeyError(f"{self.symbol}: no series {key!r}")
            j = self._i - bars_ago
            return float(columns[key][j]) if j >= 0 else float("nan")
        series = self.history[key]
        return float(series[-1 - bars_ago]) if bars_ago < len(series) else float("nan")

    @property
    def close(self) -> FloatArray:
        return self.history["close"]

    def __len__(self) -> int:
        if self._columns is not None:
            return self._i + 1
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


class StrategyContext:
    """What `on_bar` sees: the environment, the decision time (the close of the current
    bar, aware UTC), the market data of the symbols with a bar at this time, the account
    and the strategy's parameters.

    `account` may be an AccountState or a function returning one: the backtest engine
    passes a function, so that the ledger is read only when a strategy looks at it.
    Immutable once built.
    """

    __slots__ = ("_account", "data", "environment", "logger", "now", "params")

    environment: Environment
    now: datetime
    data: Mapping[str, MarketData]
    params: Mapping[str, ParamValue]
    logger: logging.Logger | logging.LoggerAdapter[Any]
    _account: AccountState | Callable[[], AccountState]

    def __init__(
        self,
        environment: Environment,
        now: datetime,
        data: Mapping[str, MarketData],
        account: AccountState | Callable[[], AccountState],
        params: Mapping[str, ParamValue] | None = None,
        logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    ) -> None:
        require_utc(now, "StrategyContext.now")
        set_ = object.__setattr__
        set_(self, "environment", environment)
        set_(self, "now", now)
        set_(self, "data", MappingProxyType(dict(data)))
        set_(self, "_account", account)
        set_(self, "params", params if isinstance(params, MappingProxyType)
             else MappingProxyType(dict(params or {})))
        set_(self, "logger", logger if logger is not None else _LOGGER)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"StrategyContext is immutable (tried to set {name})")

    @property
    def account(self) -> AccountState:
        account = self._account
        if not isinstance(account, AccountState):
            account = account()
            object.__setattr__(self, "_account", account)
        return account

    def __repr__(self) -> str:
        return (f"StrategyContext({self.environment.value}, {self.now.isoformat()}, "
                f"symbols={sorted(self.data)})")


_LOGGER = logging.getLogger("strategies")
