"""Crash isolation for the runner: one failing strategy never stops the others.

`StrategyGuard.run_isolated(strategy, context)` calls `on_bar`, catches whatever it
raises (or a malformed return value), records it as a StrategyError and, after
`max_consecutive_errors` failures in a row, disables that strategy instance until
`enable()` is called. A successful bar resets the count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from weakref import WeakKeyDictionary

from strategies.base import IStrategy, SignalOutput
from strategies.market import StrategyContext
from strategies.signal import TradeSignal


@dataclass(frozen=True, slots=True)
class StrategyError:
    strategy: str
    version: str
    error_type: str
    message: str
    ts: datetime
    consecutive: int
    disabled: bool

    def __str__(self) -> str:
        tail = " -> strategy disabled" if self.disabled else ""
        return (
            f"{self.strategy} {self.version}: {self.error_type}: {self.message} "
            f"({self.consecutive} in a row){tail}"
        )


@dataclass(frozen=True, slots=True)
class RunResult:
    signals: list[TradeSignal] = field(default_factory=list)
    error: StrategyError | None = None
    skipped: bool = False  # the strategy is disabled: on_bar was not called

    @property
    def ok(self) -> bool:
        return self.error is None and not self.skipped


@dataclass(slots=True)
class _Health:
    consecutive: int = 0
    disabled: bool = False
    last_error: StrategyError | None = None


class StrategyGuard:
    def __init__(self, max_consecutive_errors: int = 5) -> None:
        if max_consecutive_errors < 1:
            raise ValueError(f"max_consecutive_errors must be >= 1, got {max_consecutive_errors}")
        self.max_consecutive_errors = max_consecutive_errors
        self._health: WeakKeyDictionary[IStrategy, _Health] = WeakKeyDictionary()

    def is_disabled(self, strategy: IStrategy) -> bool:
        return self._state(strategy).disabled

    def last_error(self, strategy: IStrategy) -> StrategyError | None:
        return self._state(strategy).last_error

    def enable(self, strategy: IStrategy) -> None:
        self._health[strategy] = _Health()

    def run_isolated(
        self,
        strategy: IStrategy,
        context: StrategyContext,
        call: Callable[[StrategyContext], SignalOutput] | None = None,
    ) -> RunResult:
        """`on_bar(context)` (or `call`, e.g. `strategy.on_timer`) without letting it raise."""
        health = self._state(strategy)
        if health.disabled:
            return RunResult(skipped=True)
        try:
            signals = _as_list((call or strategy.on_bar)(context))
        except Exception as exc:  # isolating arbitrary strategy code
            return RunResult(error=self._failed(strategy, context, health, exc))
        health.consecutive = 0
        return RunResult(signals=signals)

    def _state(self, strategy: IStrategy) -> _Health:
        return self._health.setdefault(strategy, _Health())

    def _failed(
        self, strategy: IStrategy, context: StrategyContext, health: _Health, exc: Exception
    ) -> StrategyError:
        health.consecutive += 1
        health.disabled = health.consecutive >= self.max_consecutive_errors
        lines = str(exc).strip().splitlines()
        error = StrategyError(
            strategy=type(strategy).name,
            version=type(strategy).version,
            error_type=type(exc).__name__,
            message=lines[0] if lines else "(no message)",
            ts=context.now,
            consecutive=health.consecutive,
            disabled=health.disabled,
        )
        health.last_error = error
        context.logger.error("strategy failed: %s", error)
        return error


def _as_list(output: object) -> list[TradeSignal]:
    if output is None:
        return []
    if isinstance(output, TradeSignal):
        return [output]
    if isinstance(output, list) and all(isinstance(s, TradeSignal) for s in output):
        return list(output)
    raise TypeError(
        f"on_bar returned {type(output).__name__}, expected TradeSignal, "
        "a list of TradeSignal or None"
    )
