"""IStrategy: the one interface every strategy implements, in backtest, paper and live."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

from strategies._decimal import Number, to_decimal
from strategies.events import NewsSentiment, OrderFilled, OrderRejected
from strategies.market import ParamValue, StrategyContext
from strategies.params import ParamSpec, param_grid, resolve_params
from strategies.signal import Action, TradeSignal

Market = Literal["crypto", "forex", "stocks"]
SignalOutput = TradeSignal | list[TradeSignal] | None


class IStrategy(ABC):
    """Subclass it, set the class metadata and `parameters`, and implement `on_bar`.

    The runner builds the strategy with its parameter overrides (checked against
    `parameters`), calls `initialize(config)` once, then `on_bar(context)` for every bar.
    A strategy returns intents (TradeSignal); it never places orders itself.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1.0.0"
    author: ClassVar[str] = ""
    description: ClassVar[str] = ""
    markets: ClassVar[frozenset[Market]] = frozenset({"crypto", "forex", "stocks"})
    timeframes: ClassVar[tuple[str, ...]] = ("1m", "5m", "15m", "1h", "4h", "1d")
    parameters: ClassVar[Mapping[str, ParamSpec]] = {}

    def __init__(self, params: Mapping[str, object] | None = None) -> None:
        self.params: dict[str, ParamValue] = resolve_params(type(self).parameters, params or {})

    def int_param(self, name: str) -> int:
        value = self.params[name]
        assert isinstance(value, int) and not isinstance(value, bool), name
        return value

    def float_param(self, name: str) -> float:
        value = self.params[name]
        assert isinstance(value, int | float) and not isinstance(value, bool), name
        return float(value)

    def bool_param(self, name: str) -> bool:
        value = self.params[name]
        assert isinstance(value, bool), name
        return value

    @classmethod
    def search_space(cls) -> dict[str, Sequence[ParamValue]]:
        """Every parameter's candidate values, for walk-forward optimisation."""
        return param_grid(cls.parameters)

    @abstractmethod
    def get_required_indicators(self) -> list[str]:
        """Indicator names (`SMA_20`, `MACD_12_26_9`, ...) built from `self.params`."""

    def warmup_bars(self) -> int:
        """Bars to feed before the first useful bar: every required indicator is defined
        on the current bar and on the one before it (crossings need both), and a
        recursive one (EMA, RSI, ATR, MACD) has settled there: its value is that of a
        long history, as a strategy worker computes it, not of where the data starts."""
        # imported here so that the interface itself loads without TA-Lib
        from strategies.indicators import parse_indicator

        warmups = [parse_indicator(n).warmup for n in self.get_required_indicators()]
        return max(warmups, default=0) + 2

    def get_risk_parameters(self) -> dict[str, Any]:
        """What the strategy asks of the risk gate (the database has the last word)."""
        return {}

    def initialize(self, config: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Called once before the first bar with the runner's configuration."""

    @abstractmethod
    def on_bar(self, context: StrategyContext) -> SignalOutput:
        """The decision at the close of the current bar."""

    def on_order_filled(self, event: OrderFilled) -> None:  # noqa: B027 - optional hook
        pass

    def on_order_rejected(self, event: OrderRejected) -> None:  # noqa: B027 - optional hook
        pass

    def timer_interval(self) -> timedelta | None:
        """How often `on_timer` runs (None, the default: never). See `timer_due`."""
        return None

    def on_timer(self, context: StrategyContext) -> SignalOutput:
        """The scheduled decision: called, after `on_bar`, at the first bar close of each
        new period of `timer_interval()` (e.g. a daily rebalance on hourly bars), with the
        same context; its signals go the same way as `on_bar`'s."""
        return None

    def on_news_sentiment(self, event: NewsSentiment) -> None:  # noqa: B027 - optional hook
        pass

    def signal(
        self,
        context: StrategyContext,
        symbol: str,
        action: Action,
        *,
        size: Number = 1,
        stop_loss: Number | None = None,
        take_profit: Number | None = None,
        trailing_stop: Number | None = None,
        confidence: Number | None = None,
        price: Number | None = None,
        reasoning: str = "",
        venue: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> TradeSignal:
        """A TradeSignal from this strategy at `context.now`; floats become Decimals."""

        def opt(value: Number | None, field: str) -> Any:
            return None if value is None else to_decimal(value, field)

        return TradeSignal(
            strategy=type(self).name,
            version=type(self).version,
            symbol=symbol,
            venue=venue,
            action=action,
            ts=context.now,
            size=to_decimal(size, "size"),
            stop_loss=opt(stop_loss, "stop_loss"),
            take_profit=opt(take_profit, "take_profit"),
            trailing_stop=opt(trailing_stop, "trailing_stop"),
            confidence=opt(confidence, "confidence"),
            price=opt(price, "price"),
            reasoning=reasoning,
            metadata=metadata or {},
        )


# Periods of a strategy's timer are counted from Monday 1970-01-05 00:00 UTC: a daily
# timer's periods start at midnight UTC, a weekly one's on Mondays, an hourly one's on the
# hour.
TIMER_ORIGIN = datetime(1970, 1, 5, tzinfo=UTC)


class TimerIntervalError(ValueError):
    """A strategy's timer_interval() is not None or a positive timedelta."""


def check_timer_interval(strategy: IStrategy) -> timedelta | None:
    """The strategy's timer interval, checked: None or a positive whole number of seconds
    (a malformed one raises TimerIntervalError naming the strategy)."""
    interval = strategy.timer_interval()
    if interval is None:
        return None
    if (not isinstance(interval, timedelta) or interval <= timedelta(0)
            or interval % timedelta(seconds=1)):
        raise TimerIntervalError(f"strategy {type(strategy).name}: timer_interval() returned "
                         f"{interval!r}, expected None or a positive timedelta of whole seconds")
    return interval


def timer_due(interval: timedelta | None, previous: datetime | None, close: datetime) -> bool:
    """Whether a bar closing at `close` runs the timer: it is the first bar close of a new
    period of `interval` after the previous bar close the strategy saw (`previous`; None:
    this is its first bar, and no timer runs). A gap of several periods (a weekend, an
    outage) runs it once, at the first bar after the gap. Backtest, paper and live apply
    this same rule to the same bars, so a timer's signals are the same in all three."""
    if interval is None or previous is None:
        return False
    return (close - TIMER_ORIGIN) // interval > (previous - TIMER_ORIGIN) // interval
