"""Each example strategy on small crafted price series.

The replay below is a test harness only: it feeds bars through BarSeries (the same views a
runner gives) and, when `fills` is on, treats every signal as filled at once (buy -> long
`size`, sell -> short `size`, close -> flat) so position-aware strategies can be followed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from strategies.base import IStrategy
from strategies.examples.donchian_breakout import DonchianBreakout
from strategies.examples.momentum_rotation import MomentumRotation
from strategies.examples.rsi_mean_reversion import RsiMeanReversion
from strategies.examples.sma_crossover import SmaCrossover
from strategies.market import AccountState, Bar, Environment, PositionState, StrategyContext
from strategies.params import ParamError
from strategies.series import BarSeries
from strategies.signal import TradeSignal

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def bars(
    close: Sequence[float], high: Sequence[float] | None = None, low: Sequence[float] | None = None
) -> list[Bar]:
    high = high or close
    low = low or close
    return [
        Bar(
            T0 + timedelta(days=i),
            Decimal(str(c)),
            Decimal(str(h)),
            Decimal(str(lo)),
            Decimal(str(c)),
        )
        for i, (c, h, lo) in enumerate(zip(close, high, low, strict=True))
    ]


def replay(
    strategy: IStrategy, data: dict[str, list[Bar]], fills: bool = True
) -> list[tuple[int, TradeSignal]]:
    strategy.initialize({})
    series = {s: BarSeries(s, b, strategy.get_required_indicators()) for s, b in data.items()}
    positions: dict[str, PositionState] = {}
    out: list[tuple[int, TradeSignal]] = []
    for i in range(len(next(iter(data.values())))):
        account = AccountState(
            cash=Decimal(10_000), equity=Decimal(10_000), positions=dict(positions)
        )
        ctx = StrategyContext(
            Environment.BACKTEST,
            T0 + timedelta(days=i),
            {s: v.market_data(i) for s, v in series.items()},
            account,
            strategy.params,
        )
        result = strategy.on_bar(ctx)
        signals = [] if result is None else [result] if isinstance(result, TradeSignal) else result
        for sig in signals:
            assert sig.ts == ctx.now and sig.strategy == strategy.name
            out.append((i, sig))
            if fills:
                qty = {"buy": sig.size, "sell": -sig.size, "close": Decimal(0)}[sig.action]
                positions[sig.symbol] = PositionState(qty)
    return out


def actions(trace: list[tuple[int, TradeSignal]]) -> list[tuple[int, str, str]]:
    return [(i, s.symbol, s.action) for i, s in trace]


# fast SMA_2 vs slow SMA_3: equal at bar 3, below from bar 4, above at 8, below at 12
CROSSING = [10, 10, 10, 10, 9, 8, 7, 8, 10, 12, 13, 12, 10, 8, 7, 8]


def test_sma_crossover_signals_exactly_on_the_crossing_bars() -> None:
    strategy = SmaCrossover({"fast": 2, "slow": 3})
    trace = replay(strategy, {"X": bars(CROSSING)}, fills=False)
    assert actions(trace) == [(4, "X", "close"), (8, "X", "buy"), (12, "X", "close")]
    buy = trace[1][1]
    assert buy.size == Decimal(1) and "SMA_2 9 crossed above SMA_3 8.33333" in buy.reasoning


def test_sma_crossover_long_short_and_size() -> None:
    strategy = SmaCrossover({"fast": 2, "slow": 3, "allow_short": True, "size": 0.5})
    trace = replay(strategy, {"X": bars(CROSSING)}, fills=False)
    assert actions(trace) == [(4, "X", "sell"), (8, "X", "buy"), (12, "X", "sell")]
    assert {s.size for _, s in trace} == {Decimal("0.5")}


def test_sma_crossover_defaults_and_parameter_checks() -> None:
    strategy = SmaCrossover()
    assert strategy.get_required_indicators() == ["SMA_10", "SMA_20"]
    assert strategy.warmup_bars() == 21  # SMA_20 defined at index 19, and on the bar before
    assert SmaCrossover.search_space()["allow_short"] == [False, True]
    with pytest.raises(ParamError, match=r"fast \(30\) must be below slow \(20\)"):
        SmaCrossover({"fast": 30})


def test_rsi_mean_reversion_buys_oversold_and_exits_at_the_middle() -> None:
    close = [100, 101, 102, 101, 95, 90, 88, 92, 97, 99, 100]
    strategy = RsiMeanReversion({"period": 2, "stop_pct": 0.05})
    trace = replay(strategy, {"X": bars(close)})
    assert actions(trace) == [(4, "X", "buy"), (7, "X", "close")]
    entry = trace[0][1]
    assert entry.stop_loss == Decimal("90.25")  # 95 * (1 - 0.05)
    assert entry.reasoning.startswith("RSI_2=")


def test_rsi_mean_reversion_short_side() -> None:
    close = [100, 99, 98, 99, 105, 110, 112, 108, 103]
    strategy = RsiMeanReversion({"period": 2, "allow_short": True})
    trace = replay(strategy, {"X": bars(close)})
    # RSI_2: nan nan 0 50 92.9 97.1 98 43.0 17.9
    assert actions(trace) == [
        (2, "X", "buy"),
        (3, "X", "close"),
        (4, "X", "sell"),
        (7, "X", "close"),
        (8, "X", "buy"),
    ]
    assert trace[2][1].stop_loss is None
    with pytest.raises(ParamError, match="oversold < exit_level < overbought"):
        RsiMeanReversion({"oversold": 40.0, "exit_level": 35.0})


def test_donchian_breakout_enters_with_atr_stops_and_exits_on_the_exit_channel() -> None:
    close = [10, 10.5, 10, 10.5, 10, 12, 12.5, 13, 12.8, 11, 10.5]
    high = [c + 0.5 for c in close]
    low = [c - 0.5 for c in close]
    strategy = DonchianBreakout({"channel": 5, "exit_channel": 2, "atr_period": 5})
    trace = replay(strategy, {"X": bars(close, high, low)})
    # bar 5: close 12 > highest high of bars 0..4 (11); bar 9: 11 < lowest low of 7..8 (12.3)
    assert actions(trace) == [(5, "X", "buy"), (9, "X", "close")]
    entry = trace[0][1]
    atr = float(entry.metadata["atr"])
    # true ranges of bars 1..5: 1, 1, 1, 1, 2.5 -> ATR_5 at bar 5 = 6.5 / 5
    assert atr == pytest.approx(1.3)
    assert float(entry.stop_loss or 0) == pytest.approx(12 - 2 * 1.3)
    assert float(entry.trailing_stop or 0) == pytest.approx(3 * 1.3)


def test_donchian_breakout_short_side_and_no_repeat_entries() -> None:
    close = [10, 9.5, 10, 9.5, 10, 8, 7.5, 7, 7.2, 9]
    strategy = DonchianBreakout(
        {"channel": 5, "exit_channel": 2, "atr_period": 5, "allow_short": True, "trail_atr": 0.0}
    )
    trace = replay(strategy, {"X": bars(close)})
    assert actions(trace) == [(5, "X", "sell"), (9, "X", "close")]
    assert trace[0][1].trailing_stop is None
    assert float(trace[0][1].stop_loss or 0) > 8


def test_donchian_breakout_enters_without_a_stop_that_would_be_at_or_below_zero() -> None:
    # a cheap, volatile instrument: 3 ATRs below the close is below zero
    close = [1.0, 1.0, 1.0, 1.6, 1.0, 1.0, 1.7]
    high = [max(c, 1.0) for c in close]
    low = [0.5 if c > 1 else 1.0 for c in close]
    strategy = DonchianBreakout({"channel": 2, "exit_channel": 2, "atr_period": 1,
                                 "stop_atr": 3.0})
    trace = replay(strategy, {"X": bars(close, high, low)}, fills=False)
    assert actions(trace) == [(3, "X", "buy"), (6, "X", "buy")]
    entry = trace[0][1]
    # ATR_1 at bar 3 = its true range 1.6 - 0.5 = 1.1: the stop 1.6 - 3.3 = -1.7
    assert entry.stop_loss is None and float(entry.trailing_stop or 0) == pytest.approx(3.3)
    assert entry.reasoning == (
        "close 1.6 > DONCHIAN_2.upper 1; no stop_loss: close - 3 ATR = -1.7 <= 0")
    # a stop above zero is still given
    trace = replay(DonchianBreakout({"channel": 2, "exit_channel": 2, "atr_period": 1,
                                     "stop_atr": 1.0}), {"X": bars(close, high, low)})
    assert float(trace[0][1].stop_loss or 0) == pytest.approx(0.5)
    assert "no stop_loss" not in trace[0][1].reasoning


def test_momentum_rotation_closes_a_held_symbol_without_a_bar_at_the_rebalance() -> None:
    strategy = MomentumRotation({"lookback": 1, "top_n": 1, "rebalance_every": 1})
    strategy.initialize({})
    b = BarSeries("B", bars([100, 110]), strategy.get_required_indicators())
    # A was bought at an earlier rebalance and has no bar now (a holiday on its venue, a
    # halt): the runner leaves it out of context.data
    account = AccountState(cash=Decimal(0), equity=Decimal(1000),
                           positions={"A": PositionState(Decimal(5), Decimal(100))})
    ctx = StrategyContext(Environment.BACKTEST, T0 + timedelta(days=1), {"B": b.market_data(1)},
                          account)
    out = strategy.on_bar(ctx)
    assert isinstance(out, list)
    assert [(s.symbol, s.action, s.reasoning) for s in out] == [
        ("A", "close", "out of the top 1: no bar at the rebalance")]
    # B is bought once A's close has filled
    flat = StrategyContext(Environment.BACKTEST, T0 + timedelta(days=1), {"B": b.market_data(1)},
                           AccountState(cash=Decimal(1000), equity=Decimal(1000)))
    bought = strategy.on_bar(flat)
    assert isinstance(bought, list) and [(s.symbol, s.action) for s in bought] == [("B", "buy")]


def test_momentum_rotation_holds_the_top_n_and_rotates_every_k_bars() -> None:
    a = [100, 101, 102, 103, 104, 105, 105, 105, 105]  # steady riser, then stalls
    b = [100, 100, 100, 100, 100, 100, 100, 100, 100]  # flat: never above min_return 0
    c = [100, 99, 98, 97, 96, 100, 110, 120, 130]  # falls, then surges
    strategy = MomentumRotation({"lookback": 2, "top_n": 1, "rebalance_every": 2})
    trace = replay(strategy, {"A": bars(a), "B": bars(b), "C": bars(c)})
    assert actions(trace) == [
        (2, "A", "buy"),  # bar 0 has no 2-bar return yet; bar 2: A +1.98 %
        (4, "A", "buy"),  # still the leader (the database ignores: already at target)
        (6, "A", "close"),
        (7, "C", "buy"),  # C +14.6 % over bars 4..6: bought once A's close has filled
        (8, "C", "buy"),
    ]
    assert trace[0][1].size == Decimal(1) and trace[0][1].metadata["rank"] == 1
    assert trace[3][1].metadata["rank"] == 1 and "rank 1" in trace[3][1].reasoning


def test_momentum_rotation_splits_capital_between_the_top_n() -> None:
    rising = [100, 102, 104, 106]
    strategy = MomentumRotation({"lookback": 1, "top_n": 2, "rebalance_every": 3})
    trace = replay(
        strategy,
        {"A": bars(rising), "B": bars([r * 2 for r in rising]), "C": bars([100, 99, 98, 97])},
    )
    assert actions(trace) == [(3, "A", "buy"), (3, "B", "buy")]
    assert {s.size for _, s in trace} == {Decimal("0.5")}


@pytest.mark.parametrize(
    "cls", [SmaCrossover, RsiMeanReversion, DonchianBreakout, MomentumRotation]
)
def test_examples_have_metadata_docs_and_valid_search_spaces(cls: type[IStrategy]) -> None:
    assert cls.name and cls.version and cls.description and cls.__module__
    assert "Parameters:" in (sys.modules[cls.__module__].__doc__ or "")
    strategy = cls()
    for name in strategy.get_required_indicators():
        assert name == name.upper()
    for values in cls.search_space().values():
        assert len(values) >= 1
