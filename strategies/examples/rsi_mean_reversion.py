"""RSI mean reversion: buy oversold, sell overbought, exit back at the middle.

Idea: after a sharp fall the RSI drops below the oversold line and prices tend to revert.
When flat, the strategy buys as RSI is below `oversold` (and, with `allow_short`, sells
as it is above `overbought`); it closes a long once RSI is back up to `exit_level` and a
short once it is back down to it. The position comes from `context.account`, so a restart
or a rejected order never leaves the strategy believing in a position it does not hold.

Parameters:
    period (int, 14): the RSI period (Wilder's smoothing).
    oversold (float, 30): buy below this RSI.
    overbought (float, 70): sell short above this RSI (only with allow_short).
    exit_level (float, 50): close when RSI gets back to this level.
    stop_pct (float, 0.0): optional stop-loss as a fraction of the entry close
        (0.05 = 5 % below a long's entry); 0 = no stop.
    allow_short (bool, False): also trade the overbought side.
    size (float, 1.0): fraction of the allotted capital per position.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from strategies.base import IStrategy, SignalOutput
from strategies.market import MarketData, PositionState, StrategyContext
from strategies.params import ParamError, ParamSpec
from strategies.signal import TradeSignal


class RsiMeanReversion(IStrategy):
    name = "rsi_mean_reversion"
    version = "1.0.0"
    author = "MMATS"
    description = "Buy RSI oversold, exit at the middle; optional short side and stop"
    parameters: ClassVar = {
        "period": ParamSpec(14, low=2, high=50, step=1, minimum=2),
        "oversold": ParamSpec(30.0, low=5.0, high=45.0, step=5.0, minimum=0.0, maximum=100.0),
        "overbought": ParamSpec(70.0, low=55.0, high=95.0, step=5.0, minimum=0.0, maximum=100.0),
        "exit_level": ParamSpec(50.0, low=30.0, high=70.0, step=5.0, minimum=0.0, maximum=100.0),
        "stop_pct": ParamSpec(0.0, low=0.0, high=0.2, step=0.01, minimum=0.0, maximum=0.99),
        "allow_short": ParamSpec(False, choices=(False, True)),
        "size": ParamSpec(1.0, low=0.1, high=1.0, step=0.1, minimum=0.01, maximum=1.0),
    }

    def __init__(self, params: dict[str, object] | None = None) -> None:
        super().__init__(params)
        low, mid, high = (self.float_param(k) for k in ("oversold", "exit_level", "overbought"))
        if not low < mid < high:
            raise ParamError(
                f"rsi_mean_reversion: need oversold < exit_level < overbought, "
                f"got {low:g}, {mid:g}, {high:g}"
            )

    @property
    def rsi(self) -> str:
        return f"RSI_{self.int_param('period')}"

    def get_required_indicators(self) -> list[str]:
        return [self.rsi]

    def get_risk_parameters(self) -> dict[str, Any]:
        stop = self.float_param("stop_pct")
        return {"stop_loss_pct": stop} if stop else {}

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        signals = [
            self._decide(context, symbol, md, context.account.position(symbol))
            for symbol, md in context.data.items()
        ]
        kept = [s for s in signals if s is not None]
        return kept or None

    def _decide(
        self, context: StrategyContext, symbol: str, md: MarketData, position: PositionState
    ) -> TradeSignal | None:
        rsi = md[self.rsi]
        if math.isnan(rsi):
            return None
        exit_level = self.float_param("exit_level")
        why = f"{self.rsi}={rsi:.2f}"
        if position.is_long:
            if rsi >= exit_level:
                return self.signal(context, symbol, "close", reasoning=f"{why} >= {exit_level:g}")
            return None
        if position.is_short:
            if rsi <= exit_level:
                return self.signal(context, symbol, "close", reasoning=f"{why} <= {exit_level:g}")
            return None
        close, stop_pct, size = md["close"], self.float_param("stop_pct"), self.float_param("size")
        if rsi < self.float_param("oversold"):
            stop = close * (1 - stop_pct) if stop_pct else None
            return self.signal(
                context, symbol, "buy", size=size, stop_loss=stop, reasoning=f"{why} oversold"
            )
        if self.bool_param("allow_short") and rsi > self.float_param("overbought"):
            stop = close * (1 + stop_pct) if stop_pct else None
            return self.signal(
                context, symbol, "sell", size=size, stop_loss=stop, reasoning=f"{why} overbought"
            )
        return None
