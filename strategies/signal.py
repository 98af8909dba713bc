"""TradeSignal: what a strategy wants, in the shape trading.submit_signal(jsonb) takes.

The runner adds the account; the database sizes, risk-checks and (maybe) orders it.
Actions are targets, not deltas: `buy` = be long `size` of the allotted capital, `sell` = be
short (or flat on a long-only account), `close` = be flat, `hold` = record only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal, get_args

from strategies._decimal import to_decimal

Action = Literal["buy", "sell", "close", "hold"]
ACTIONS: frozenset[str] = frozenset(get_args(Action))

# the limits of the database function's text fields (trading._text max_length)
_TEXT_LIMITS = {"strategy": 64, "version": 32, "symbol": 40, "venue": 32, "reasoning": 4000}
_PRICES = ("stop_loss", "take_profit", "trailing_stop", "price")


class SignalError(ValueError):
    """A TradeSignal that trading.submit_signal would refuse; the message is one line."""


@dataclass(frozen=True, kw_only=True)
class TradeSignal:
    strategy: str
    version: str
    symbol: str
    action: Action
    ts: datetime
    venue: str | None = None
    size: Decimal = Decimal(1)
    stop_loss: Decimal | None = None
    take_profit: Decimal | None = None
    trailing_stop: Decimal | None = None  # an absolute price distance
    price: Decimal | None = None  # a sizing price; used only above the latest close
    confidence: Decimal | None = None
    reasoning: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        self._check_texts()
        if self.action not in ACTIONS:
            raise SignalError(
                f"signal.action must be buy, sell, close or hold, got {self.action!r}"
            )
        self._check_ts()
        self._set("size", _fraction(self.size, "size"))
        if self.confidence is not None:
            self._set("confidence", _fraction(self.confidence, "confidence"))
        for name in _PRICES:
            raw = getattr(self, name)
            if raw is not None:
                self._set(name, _positive(raw, name))
        self._check_stops()
        self._set("metadata", _frozen_metadata(self.metadata))

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _check_texts(self) -> None:
        for name, limit in _TEXT_LIMITS.items():
            value = getattr(self, name)
            if value is None and name == "venue":
                continue
            if not isinstance(value, str):
                raise SignalError(f"signal.{name} must be a string, got {value!r}")
            if name != "reasoning" and not value.strip():
                raise SignalError(f"signal.{name} must not be empty")
            if len(value) > limit:
                raise SignalError(f"signal.{name} is longer than {limit} characters")

    def _check_ts(self) -> None:
        if not isinstance(self.ts, datetime):
            raise SignalError(f"signal.ts must be a datetime, got {self.ts!r}")
        if self.ts.tzinfo is None or self.ts.utcoffset() is None:
            raise SignalError(f"signal.ts must be timezone-aware (UTC), got naive {self.ts}")
        self._set("ts", self.ts.astimezone(UTC))

    def _check_stops(self) -> None:
        sl, tp = self.stop_loss, self.take_profit
        if sl is None or tp is None:
            return
        if self.action == "buy" and sl >= tp:
            raise SignalError(f"signal: a buy needs stop_loss < take_profit, got {sl} >= {tp}")
        if self.action == "sell" and sl <= tp:
            raise SignalError(f"signal: a sell needs stop_loss > take_profit, got {sl} <= {tp}")

    def to_dict(self) -> dict[str, Any]:
        """The jsonb payload as a JSON-ready dict: Decimals as strings, ts ISO-8601 with offset."""
        out: dict[str, Any] = {
            "strategy": self.strategy,
            "version": self.version,
            "symbol": self.symbol,
            "action": self.action,
            "size": str(self.size),
            "ts": self.ts.isoformat(),
            "reasoning": self.reasoning,
            "metadata": _jsonable(self.metadata),
        }
        optional = {
            "venue": self.venue,
            "stop_loss": self.stop_loss,
            "take_profit": self.take_profit,
            "trailing_stop": self.trailing_stop,
            "price": self.price,
            "confidence": self.confidence,
        }
        for key, value in optional.items():
            if value is not None:
                out[key] = str(value)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _fraction(value: object, name: str) -> Decimal:
    number = _number(value, name)
    if not Decimal(0) <= number <= Decimal(1):
        raise SignalError(f"signal.{name} must be between 0 and 1, got {number}")
    return number


def _positive(value: object, name: str) -> Decimal:
    number = _number(value, name)
    if number <= 0:
        raise SignalError(f"signal.{name} must be greater than 0, got {number}")
    return number


def _number(value: object, name: str) -> Decimal:
    try:
        return to_decimal(value, f"signal.{name}")  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise SignalError(str(exc)) from None


def _frozen_metadata(metadata: object) -> Mapping[str, Any]:
    if not isinstance(metadata, Mapping):
        raise SignalError(f"signal.metadata must be a mapping, got {type(metadata).__name__}")
    copy = dict(metadata)
    if "breakeven" in copy and copy["breakeven"] is not None:
        copy["breakeven"] = _positive(copy["breakeven"], "metadata.breakeven")
    try:
        json.dumps(_jsonable(copy), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SignalError(f"signal.metadata must be JSON-serialisable: {exc}") from None
    return MappingProxyType(copy)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
