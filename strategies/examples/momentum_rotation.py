"""Momentum rotation: every K bars, hold the top-N symbols by lookback return.

Idea: relative momentum persists over weeks to months (Jegadeesh & Titman). Every
`rebalance_every` bars the strategy ranks the symbols it trades by their return over the
last `lookback` bars (ROC), buys the best `top_n` (each with 1/top_n of the allotted
capital) and closes whatever else it holds (a held symbol without a bar at the rebalance
too). An absolute-momentum filter keeps out winners whose return is not above
`min_return` (e.g. 0: never hold a falling market).

A rotation sells before it buys: when a rebalance closes positions, the new winners are
bought on the first bar after those closes have filled (their cash is then free; bought on
the same bar, they were sized against cash still in the old positions and refused), at
the latest at the next rebalance, which decides afresh.

The bar count starts at the first bar the strategy sees (reset by `initialize`), so the
rebalance days are reproducible in a backtest. Symbols without `lookback` bars of history
yet are left out of the ranking.

Parameters:
    lookback (int, 20): return lookback in bars.
    top_n (int, 2): how many symbols to hold.
    rebalance_every (int, 5): bars between rebalances (K).
    min_return (float, 0.0): the lookback return a winner must exceed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from strategies.base import IStrategy, SignalOutput
from strategies.market import StrategyContext
from strategies.params import ParamSpec
from strategies.signal import TradeSignal


class MomentumRotation(IStrategy):
    name = "momentum_rotation"
    version = "1.0.0"
    author = "MMATS"
    description = "Every K bars hold the top-N symbols by lookback return"
    parameters: ClassVar = {
        "lookback": ParamSpec(20, low=5, high=250, step=5, minimum=1),
        "top_n": ParamSpec(2, low=1, high=10, step=1, minimum=1),
        "rebalance_every": ParamSpec(5, low=1, high=60, step=1, minimum=1),
        "min_return": ParamSpec(0.0, low=-0.5, high=0.5, step=0.05, minimum=-1.0),
    }

    def __init__(self, params: dict[str, object] | None = None) -> None:
        super().__init__(params)
        self._bars_seen = 0
        self._closing: set[str] = set()  # closed at the last rebalance, maybe not yet filled
        self._buys: list[TradeSignal] = []  # the winners to buy once those have filled

    def initialize(self, config: Mapping[str, Any]) -> None:
        self._bars_seen = 0
        self._closing, self._buys = set(), []

    @property
    def roc(self) -> str:
        return f"ROC_{self.int_param('lookback')}"

    def get_required_indicators(self) -> list[str]:
        return [self.roc]

    def on_bar(self, context: StrategyContext) -> SignalOutput:
        due = self._bars_seen % self.int_param("rebalance_every") == 0
        self._bars_seen += 1
        if not due:
            if self._buys and all(context.account.position(s).is_flat for s in self._closing):
                ready, self._buys, self._closing = self._buys, [], set()
                return [self.signal(context, b.symbol, "buy", size=b.size,
                                    reasoning=b.reasoning, metadata=dict(b.metadata))
                        for b in ready]
            return None
        self._closing, self._buys = set(), []
        returns = {s: md[self.roc] / 100.0 for s, md in context.data.items()}
        ranked = sorted(
            (s for s, r in returns.items() if not math.isnan(r)),
            key=lambda s: (-returns[s], s),
        )
        top_n = self.int_param("top_n")
        winners = [s for s in ranked[:top_n] if returns[s] > self.float_param("min_return")]
        signals: list[TradeSignal] = []
        buys: list[TradeSignal] = []
        # the held symbols as well: one without a bar now (a holiday on its venue, a halt)
        # is not in context.data, and is out of the ranking
        held_now = {s for s, p in context.account.positions.items() if not p.is_flat}
        for symbol in sorted(set(context.data) | held_now):
            held = not context.account.position(symbol).is_flat
            if symbol in winners:
                rank = ranked.index(symbol) + 1
                (signals if held else buys).append(
                    self.signal(
                        context,
                        symbol,
                        "buy",
                        size=1 / top_n,
                        reasoning=f"rank {rank}: {self.roc} return {returns[symbol]:+.2%}",
                        metadata={"rank": rank},
                    )
                )
            elif held:
                self._closing.add(symbol)
                r = returns.get(symbol)
                why = "no bar at the rebalance" if r is None else f"return {r:+.2%}"
                signals.append(self.signal(context, symbol, "close",
                                           reasoning=f"out of the top {top_n}: {why}"))
        if self._closing:
            self._buys = buys  # after the closes have filled
        else:
            signals += buys
        return signals or None
