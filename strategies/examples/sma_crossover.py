"""SMA crossover: trend following on two simple moving averages.

Idea: when the fast average crosses above the slow one, the recent trend has turned up;
when it crosses below, it has turned down. The strategy signals only on the bar of the
cross, so it is stateless (the database turns `buy` into "be long", idempotently).

Parameters:
    fast (int, 10): the fast SMA period; must be below `slow`.
    slow (int, 20): the slow SMA period.
    allow_short (bool, False): on a cross down, `sell` (go short) instead of `close`.
    size (float, 1.0): fraction of the allotted capital per position (1 = all of it,
        like backtesting.py's `buy()`).
"""

from __future__ import annotations

from typing import ClassVar

from strategies.base import IStrategy, SignalOutput
from strategies.crossing import crossed_above, crossed_below
from strategies.market import StrategyContext
from strategies.params import ParamError, ParamSpec
from strategies.signal import Action, TradeSignal


class SmaCrossover(IStrategy):
    name = "sma_crossover"
    version = "1.0.0"
    author = "MMATS"
    description = "Long (or long/short) on fast/slow SMA crossovers"
    parameters: ClassVar = {
        "fast": ParamSpec(10, low=2, high=100, step=2, minimum=1, help="fast SMA period"),
        "slow": ParamSpec(20, low=5, high=300, step=5, minimum=2, help="slow SMA period"),
        "allow_short": ParamSpec(False, choices=(False, True), help="sell on a cross down"),
        "size": ParamSpec(
            1.0, low=0.1, high=1.0, step=0.1, minimum=0.01, maximum=1.0, help="fraction of capital"
        ),
    }

    def __init__(self, params: dict[str, object] | None = None) -> None:
        super().__init__(params)
        fast, slow = self.int_param("fast"), self.int_param("slow")
        if fast >= slow:
            raise ParamError(f"sma_crossover: fast ({fast}) must be below slow ({slow})")

    def get_required_indicators(self) -> list[str]:
        return [f"SMA_{self.params['fast']}", f"SMA_{self.params['slow']}"]

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        fast, slow = self.get_required_indicators()
        signals: list[TradeSignal] = []
        for symbol, md in context.data.items():
            if crossed_above(md, fast, slow):
                reason = f"{fast} {md[fast]:.6g} crossed above {slow} {md[slow]:.6g}"
                signals.append(self._signal(context, symbol, "buy", reason))
            elif crossed_below(md, fast, slow):
                action: Action = "sell" if self.bool_param("allow_short") else "close"
                reason = f"{fast} {md[fast]:.6g} crossed below {slow} {md[slow]:.6g}"
                signals.append(self._signal(context, symbol, action, reason))
        return signals or None

    def _signal(
        self, context: StrategyContext, symbol: str, action: Action, reason: str
    ) -> TradeSignal:
        size = self.float_param("size")
        return self.signal(context, symbol, action, size=size, reasoning=reason)
