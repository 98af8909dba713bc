"""Donchian breakout: the turtle rule, with ATR-sized protective and trailing stops.

Idea: a close above the highest high of the previous `channel` bars is a breakout; trends
that start that way tend to continue. The entry carries a stop_loss `stop_atr` ATRs below
the close and a trailing stop `trail_atr` ATRs behind the best price (both kept by the
database on every bar); a long whose stop would be at or below zero (an ATR that large
against the price) is entered without the stop_loss, as its reasoning says. A long is
also closed when the close falls below the lowest low of the previous `exit_channel`
bars. With `allow_short`, the mirror image on the downside.

The channel compared with the close is the one of the bars BEFORE the current one (the
current bar's own high is always inside its channel).

Parameters:
    channel (int, 20): entry channel length in bars.
    exit_channel (int, 10): exit channel length in bars.
    atr_period (int, 14): ATR period for the stops.
    stop_atr (float, 2.0): stop-loss distance in ATRs.
    trail_atr (float, 3.0): trailing-stop distance in ATRs (0 = none).
    allow_short (bool, False): trade downside breakouts too.
    size (float, 1.0): fraction of the allotted capital per position.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from strategies.base import IStrategy, SignalOutput
from strategies.market import MarketData, StrategyContext
from strategies.params import ParamSpec
from strategies.signal import TradeSignal


class DonchianBreakout(IStrategy):
    name = "donchian_breakout"
    version = "1.0.0"
    author = "MMATS"
    description = "N-bar channel breakout with ATR stop-loss and trailing stop"
    parameters: ClassVar = {
        "channel": ParamSpec(20, low=5, high=100, step=5, minimum=2),
        "exit_channel": ParamSpec(10, low=2, high=50, step=2, minimum=2),
        "atr_period": ParamSpec(14, low=5, high=50, step=1, minimum=1),
        "stop_atr": ParamSpec(2.0, low=0.5, high=5.0, step=0.5, minimum=0.01),
        "trail_atr": ParamSpec(3.0, low=0.0, high=6.0, step=0.5, minimum=0.0),
        "allow_short": ParamSpec(False, choices=(False, True)),
        "size": ParamSpec(1.0, low=0.1, high=1.0, step=0.1, minimum=0.01, maximum=1.0),
    }

    def get_required_indicators(self) -> list[str]:
        return [
            f"DONCHIAN_{self.int_param('channel')}",
            f"DONCHIAN_{self.int_param('exit_channel')}",
            f"ATR_{self.int_param('atr_period')}",
        ]

    def get_risk_parameters(self) -> dict[str, Any]:
        return {
            "stop_atr": self.float_param("stop_atr"),
            "trail_atr": self.float_param("trail_atr"),
        }

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        signals = [self._decide(context, symbol, md) for symbol, md in context.data.items()]
        kept = [s for s in signals if s is not None]
        return kept or None

    def _decide(self, context: StrategyContext, symbol: str, md: MarketData) -> TradeSignal | None:
        entry, exit_, atr_key = self.get_required_indicators()
        close, atr = md["close"], md[atr_key]
        upper, lower = md.previous(f"{entry}.upper"), md.previous(f"{entry}.lower")
        exit_low, exit_high = md.previous(f"{exit_}.lower"), md.previous(f"{exit_}.upper")
        if any(math.isnan(v) for v in (atr, upper, lower, exit_low, exit_high)):
            return None
        position = context.account.position(symbol)
        if position.is_long and close < exit_low:
            return self.signal(
                context,
                symbol,
                "close",
                reasoning=f"close {close:.6g} < {exit_}.lower {exit_low:.6g}",
            )
        if position.is_short and close > exit_high:
            return self.signal(
                context,
                symbol,
                "close",
                reasoning=f"close {close:.6g} > {exit_}.upper {exit_high:.6g}",
            )
        stop, trail = self.float_param("stop_atr") * atr, self.float_param("trail_atr") * atr
        size = self.float_param("size")
        if not position.is_long and close > upper:
            reasoning = f"close {close:.6g} > {entry}.upper {upper:.6g}"
            stop_loss = close - stop
            if stop_loss <= 0:  # a stop price must be > 0: entered without one
                reasoning += (f"; no stop_loss: close - {self.float_param('stop_atr'):g} ATR"
                              f" = {stop_loss:.6g} <= 0")
            return self.signal(
                context,
                symbol,
                "buy",
                size=size,
                stop_loss=stop_loss if stop_loss > 0 else None,
                trailing_stop=trail or None,
                reasoning=reasoning,
                metadata={"atr": atr},
            )
        if self.bool_param("allow_short") and not position.is_short and close < lower:
            return self.signal(
                context,
                symbol,
                "sell",
                size=size,
                stop_loss=close + stop,
                trailing_stop=trail or None,
                reasoning=f"close {close:.6g} < {entry}.lower {lower:.6g}",
                metadata={"atr": atr},
            )
        return None
