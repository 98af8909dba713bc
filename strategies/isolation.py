"""Crash isolation for the runner: one failing strategy never stops the others.

`StrategyGuard.run_isolated(strategy, context)` calls `on_bar`, catches whatever it
raises (SystemExit too; only KeyboardInterrupt goes through), or a malformed return value
(a signal signed with another strategy's name or version among them), records it as a
StrategyError and, after
`max_consecutive_errors` failures in a row, disables that strategy instance until
`enable()` is called. A successful bar resets the count.

With a `timeout` the call runs on the strategy instance's own thread and the caller waits
at most that long: a call over its budget is a StrategyTimeout error (counted as any
other), its late result is dropped, and until it returns the strategy is not called
again — each call meanwhile is another StrategyTimeout — so a strategy never runs
concurrently with itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from queue import SimpleQueue
from weakref import WeakKeyDictionary, finalize

from strategies.base import IStrategy, SignalOutput
from strategies.market import StrategyContext
from strategies.signal import SignalError, TradeSignal


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


class StrategyTimeout(Exception):
    """A call took longer than its time budget (or the previous one still runs)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    signals: list[TradeSignal] = field(default_factory=list)
    error: StrategyError | None = None
    skipped: bool = False  # the strategy is disabled: on_bar was not called
    timed_out: bool = False  # over its budget, or its previous call still runs

    @property
    def ok(self) -> bool:
        return self.error is None and not self.skipped


@dataclass(slots=True)
class _Health:
    consecutive: int = 0
    disabled: bool = False
    last_error: StrategyError | None = None
    runner: _Runner | None = None  # the thread its calls with a time budget run on
    running: _Job | None = None  # a call over its budget, still running
    running_since: datetime | None = None  # (the decision time it was called for)


class _Job:
    __slots__ = ("call", "context", "done", "error", "signals", "strategy")

    def __init__(self, call: Callable[[StrategyContext], SignalOutput],
                 context: StrategyContext, strategy: type[IStrategy]) -> None:
        self.call: Callable[[StrategyContext], SignalOutput] | None = call
        self.context: StrategyContext | None = context
        self.strategy = strategy
        self.done = threading.Event()
        self.signals: list[TradeSignal] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        assert self.call is not None and self.context is not None
        try:
            self.signals = _as_list(self.call(self.context), self.strategy,
                                    getattr(self.call, "__name__", "on_bar"))
        except BaseException as exc:  # isolating arbitrary strategy code
            self.error = exc
        finally:
            self.call = self.context = None  # (holds the strategy no longer)
            self.done.set()


class _Runner:
    """One strategy's thread: its calls, one at a time, in order."""

    def __init__(self, name: str) -> None:
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, call: Callable[[StrategyContext], SignalOutput],
               context: StrategyContext, strategy: type[IStrategy]) -> _Job:
        job = _Job(call, context, strategy)
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        self._jobs.put(None)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()
            del job  # (nor the strategy while it waits for the next call)


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
        old = self._health.get(strategy)
        fresh = self._health[strategy] = _Health()
        if old is not None:  # a call still running stays one: not called again meanwhile
            fresh.runner, fresh.running = old.runner, old.running
            fresh.running_since = old.running_since

    def run_isolated(
        self,
        strategy: IStrategy,
        context: StrategyContext,
        call: Callable[[StrategyContext], SignalOutput] | None = None,
        *,
        timeout: float | None = None,
        waiting: Callable[[], None] | None = None,
        tick: float = 1.0,
    ) -> RunResult:
        """`on_bar(context)` (or `call`, e.g. `strategy.on_timer`) without letting it raise;
        with a `timeout` (seconds), without waiting longer than that for it, calling
        `waiting()` about every `tick` seconds meanwhile (a heartbeat)."""
        health = self._state(strategy)
        if health.disabled:
            return RunResult(skipped=True)
        fn = call or strategy.on_bar
        if timeout is None:
            try:
                signals = _as_list(fn(context), type(strategy),
                                   getattr(fn, "__name__", "on_bar"))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # isolating arbitrary strategy code, sys.exit too
                return RunResult(error=self._failed(strategy, context, health, exc))
            health.consecutive = 0
            return RunResult(signals=signals)
        if self.busy(strategy):
            since = health.running_since
            at = f" (on {since.isoformat()})" if since is not None else ""
            return RunResult(timed_out=True, error=self._failed(
                strategy, context, health, StrategyTimeout(
                    f"still running from a call over its {timeout:g} s budget{at}: "
                    "bar skipped")))
        if health.runner is None:
            health.runner = _Runner(f"strategy-{type(strategy).name}")
            # the runner's thread ends with the strategy instance (a reload replaces it)
            finalize(strategy, health.runner.stop)
        job = health.runner.submit(fn, context, type(strategy))
        deadline = time.monotonic() + timeout
        while not job.done.wait(max(0.0, min(deadline - time.monotonic(), tick))):
            if time.monotonic() >= deadline:
                # over budget: whatever it returns later is dropped
                health.running, health.running_since = job, context.now
                return RunResult(timed_out=True, error=self._failed(
                    strategy, context, health, StrategyTimeout(
                        f"{getattr(fn, '__name__', 'on_bar')} took longer than its "
                        f"{timeout:g} s budget: bar skipped")))
            if waiting is not None:
                waiting()
        if isinstance(job.error, KeyboardInterrupt):
            raise job.error
        if job.error is not None:
            return RunResult(error=self._failed(strategy, context, health, job.error))
        health.consecutive = 0
        return RunResult(signals=job.signals)

    def busy(self, strategy: IStrategy) -> bool:
        """A call of this strategy over its budget is still running."""
        health = self._state(strategy)
        if health.running is not None and health.running.done.is_set():
            health.running = health.running_since = None
        return health.running is not None

    def _state(self, strategy: IStrategy) -> _Health:
        return self._health.setdefault(strategy, _Health())

    def _failed(
        self, strategy: IStrategy, context: StrategyContext, health: _Health,
        exc: BaseException,
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


def _as_list(output: object, strategy: type[IStrategy],
             hook: str = "on_bar") -> list[TradeSignal]:
    """The signals of a call's return value; a malformed one raises (the call's error)."""
    if output is None:
        return []
    if isinstance(output, TradeSignal):
        signals = [output]
    elif isinstance(output, list) and all(isinstance(s, TradeSignal) for s in output):
        signals = list(output)
    else:
        raise TypeError(
            f"{hook} returned {type(output).__name__}, expected TradeSignal, "
            "a list of TradeSignal or None"
        )
    for sig in signals:
        # the runners submit a signal as it is: signed by another strategy, it would count
        # as that one's (its votes, its allotted capital, its positions)
        if sig.strategy != strategy.name or sig.version != strategy.version:
            raise SignalError(
                f"{hook} returned a signal of {sig.strategy} {sig.version}, not of "
                f"{strategy.name} {strategy.version}: refused (make it with self.signal)"
            )
    return signals
