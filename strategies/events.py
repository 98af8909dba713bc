"""Events the runner passes to a strategy besides bars."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class OrderFilled:
    order_id: int
    symbol: str
    side: Literal["buy", "sell"]
    quantity: Decimal
    price: Decimal
    commission: Decimal
    ts: datetime
    signal_id: int | None = None


@dataclass(frozen=True, slots=True)
class OrderRejected:
    symbol: str
    reason_code: str  # the database's stable UPPER_SNAKE code, e.g. MAX_POSITION_SIZE
    reason: str
    ts: datetime
    signal_id: int | None = None
    order_id: int | None = None


@dataclass(frozen=True, slots=True)
class NewsSentiment:
    symbol: str | None  # None: market-wide
    score: float  # -1 (bearish) .. 1 (bullish)
    source: str
    ts: datetime
    headline: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
