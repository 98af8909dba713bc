"""Indicator values against hand computations, name parsing, and no look-ahead."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.indicators import IndicatorError, compute_indicators, parse_indicator
from strategies.market import Bar
from strategies.series import BarSeries

NAN = float("nan")


def ohlc(
    close: list[float], high: list[float] | None = None, low: list[float] | None = None
) -> dict[str, np.ndarray]:
    c = np.array(close, dtype=float)
    return {
        "open": c,
        "close": c,
        "volume": np.zeros_like(c),
        "high": np.array(high, dtype=float) if high else c,
        "low": np.array(low, dtype=float) if low else c,
    }


def values(name: str, close: list[float], **kw: list[float]) -> dict[str, np.ndarray]:
    return compute_indicators([name], ohlc(close, **kw))


def test_sma_hand_computed() -> None:
    np.testing.assert_allclose(values("SMA_3", [1, 2, 3, 4, 5])["SMA_3"], [NAN, NAN, 2, 3, 4])


def test_ema_seeded_with_sma() -> None:
    # seed SMA(1,2,3)=2; alpha=2/(3+1)=0.5: 2+0.5*(10-2)=6; 6+0.5*(5-6)=5.5
    np.testing.assert_allclose(values("EMA_3", [1, 2, 3, 10, 5])["EMA_3"], [NAN, NAN, 2, 6, 5.5])


def test_rsi_hand_computed_wilder() -> None:
    # diffs +1 +1 -1 +2; first averages gain 1 loss 0 -> 100; then (1+0)/2=.5 vs (0+1)/2=.5
    # -> 50; then (.5+2)/2=1.25 vs .25 -> RS 5 -> 100 - 100/6
    np.testing.assert_allclose(
        values("RSI_2", [1, 2, 3, 2, 4])["RSI_2"], [NAN, NAN, 100, 50, 100 - 100 / 6]
    )


def test_rsi_matches_the_published_stockcharts_example() -> None:
    # StockCharts' RSI worksheet (14 periods); its figures are from rounded averages,
    # hence the 0.1 tolerance
    closes = [
        44.34,
        44.09,
        44.15,
        43.61,
        44.33,
        44.83,
        45.10,
        45.42,
        45.84,
        46.08,
        45.89,
        46.03,
        45.61,
        46.28,
        46.28,
        46.00,
        46.03,
        46.41,
        46.22,
        45.64,
    ]
    published = [70.53, 66.32, 66.55, 69.41, 66.36, 57.97]
    rsi = values("RSI_14", closes)["RSI_14"]
    assert np.isnan(rsi[:14]).all()
    np.testing.assert_allclose(rsi[14:], published, atol=0.1)


def test_atr_wilder_hand_computed() -> None:
    # true ranges from bar 1: 2, 3, 1, 3.5; ATR_2 = mean(2,3)=2.5, (2.5+1)/2, (1.75+3.5)/2
    out = values("ATR_2", [9, 10, 11, 10.5, 13], high=[10, 11, 12, 11, 14], low=[8, 9, 9, 10, 11])
    np.testing.assert_allclose(out["ATR_2"], [NAN, NAN, 2.5, 1.75, 2.625])


def test_bbands_population_stddev() -> None:
    close = [1.0, 2, 3, 4, 6]
    out = values("BBANDS_3_2", close)
    for i in (2, 3, 4):
        window = close[i - 2 : i + 1]
        mid, sd = statistics.fmean(window), statistics.pstdev(window)
        assert out["BBANDS_3_2.middle"][i] == pytest.approx(mid)
        assert out["BBANDS_3_2.upper"][i] == pytest.approx(mid + 2 * sd)
        assert out["BBANDS_3_2.lower"][i] == pytest.approx(mid - 2 * sd)
    assert np.isnan(out["BBANDS_3_2.upper"][:2]).all()


def test_macd_outputs_are_consistent_with_emas() -> None:
    rng = np.random.default_rng(1)
    close = list(100 + np.cumsum(rng.normal(0, 1, 600)))
    out = compute_indicators(["MACD_12_26_9", "EMA_12", "EMA_26"], ohlc(close))
    macd, sig, hist = (out[f"MACD_12_26_9.{k}"] for k in ("macd", "signal", "hist"))
    assert np.isnan(macd[:33]).all() and not np.isnan(macd[33:]).any()  # lookback 25 + 8
    np.testing.assert_allclose(hist[33:], macd[33:] - sig[33:], atol=1e-12)
    # TA-Lib seeds the fast EMA later than a standalone EMA_12; the difference decays
    np.testing.assert_allclose(macd[300:], (out["EMA_12"] - out["EMA_26"])[300:], atol=1e-9)
    flat = compute_indicators(["MACD_3_6_2"], ohlc([5.0] * 20))
    assert np.nanmax(np.abs(flat["MACD_3_6_2.macd"])) == 0


def test_donchian_and_roc() -> None:
    out = values("DONCHIAN_3", [2, 3, 4, 5], high=[3, 5, 4, 6], low=[1, 2, 3, 4])
    np.testing.assert_allclose(out["DONCHIAN_3.upper"], [NAN, NAN, 5, 6])
    np.testing.assert_allclose(out["DONCHIAN_3.lower"], [NAN, NAN, 1, 2])
    np.testing.assert_allclose(out["DONCHIAN_3.middle"], [NAN, NAN, 3, 4])
    np.testing.assert_allclose(values("ROC_2", [100, 50, 110, 55])["ROC_2"], [NAN, NAN, 10, 10])


def test_parse_names() -> None:
    ind = parse_indicator("SMA_20")
    assert (ind.kind, ind.params, ind.name, ind.keys) == ("SMA", (20.0,), "SMA_20", ("SMA_20",))
    assert parse_indicator("macd_12_26_9").keys == (
        "MACD_12_26_9.macd",
        "MACD_12_26_9.signal",
        "MACD_12_26_9.hist",
    )
    assert parse_indicator("BBANDS_20_2.5").name == "BBANDS_20_2.5"
    assert parse_indicator("BBANDS_20_2.0").name == "BBANDS_20_2"
    assert parse_indicator("sma_020").name == "SMA_20"
    assert parse_indicator("BBANDS_20_2").keys[0] == "BBANDS_20_2.upper"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("FOO_3", "unknown indicator 'FOO_3' (known: ATR, BBANDS, DONCHIAN, EMA, MACD"),
        ("SMA", "SMA_20"),
        ("SMA_20_3", "SMA takes 1 parameter(s) (period)"),
        ("SMA_0", "SMA_0: period must be between 1 and 100000, got 0"),
        ("RSI_1", "RSI_1: period must be between 2 and 100000"),
        ("SMA_2.5", "period must be a whole number"),
        # what float() takes, a name does not: a whole number is digits only
        ("SMA_2e1", "SMA_2e1: period must be a whole number in digits (e.g. 20), got '2E1'"),
        ("SMA_+20", "period must be a whole number in digits (e.g. 20), got '+20'"),
        ("SMA_ 20", "period must be a whole number in digits (e.g. 20), got ' 20'"),
        ("SMA_20.0", "period must be a whole number in digits"),
        ("SMA_\u0662\u0660", "period must be a whole number in digits"),  # Arabic-Indic 20
        ("SMA_inf", "period must be a whole number in digits"),
        ("BBANDS_20_2e0", "deviations must be a plain decimal number (e.g. 2 or 2.5), got '2E0'"),
        ("BBANDS_20_+2", "deviations must be a plain decimal number"),
        ("BBANDS_20_2.", "deviations must be a plain decimal number"),
        ("BBANDS_20_nan", "deviations must be a plain decimal number"),
        ("EMA_abc", "period must be a number, got 'ABC'"),
        ("MACD_26_12_9", "the fast period must be below the slow period"),
        ("BBANDS_20_-1", "deviations must be between 0"),
        ("", "non-empty string"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(IndicatorError) as info:
        parse_indicator(name)
    assert message in str(info.value) and "\n" not in str(info.value)


ALL = ["SMA_5", "EMA_5", "RSI_5", "MACD_3_6_2", "ATR_4", "BBANDS_5_2", "DONCHIAN_4", "ROC_3"]


@settings(max_examples=60, deadline=None)
@given(
    closes=st.lists(st.floats(1, 1000, allow_nan=False), min_size=2, max_size=120),
    spread=st.floats(0, 0.1),
    data=st.data(),
)
def test_no_look_ahead_prefix_property(
    closes: list[float], spread: float, data: st.DataObject
) -> None:
    """The value at i depends only on bars <= i: a prefix gives the same values."""
    c = np.array(closes)
    full = {"close": c, "high": c * (1 + spread), "low": c * (1 - spread)}
    k = data.draw(st.integers(1, len(closes)), label="prefix")
    whole = compute_indicators(ALL, full)
    prefix = compute_indicators(ALL, {key: v[:k] for key, v in full.items()})
    for key, series in whole.items():
        np.testing.assert_allclose(prefix[key], series[:k], rtol=1e-12, equal_nan=True, err_msg=key)


@pytest.mark.parametrize("name", [*ALL, "MACD_12_26_9", "BBANDS_20_2", "ATR_14"])
def test_lookback_is_the_index_of_the_first_value(name: str) -> None:
    rng = np.random.default_rng(3)
    c = 100 + np.cumsum(rng.normal(0, 1, 200))
    out = compute_indicators([name], {"close": c, "high": c + 1, "low": c - 1})
    first = min(int(np.argmax(~np.isnan(v))) for v in out.values())
    assert parse_indicator(name).lookback == first


def _bars(closes: list[float]) -> list[Bar]:
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    return [
        Bar(
            t0 + timedelta(hours=i),
            Decimal(str(c)),
            Decimal(str(c)),
            Decimal(str(c)),
            Decimal(str(c)),
        )
        for i, c in enumerate(closes)
    ]


def test_market_data_views_end_at_the_current_bar_and_are_read_only() -> None:
    series = BarSeries("X", _bars([1, 2, 3, 4, 5]), ["SMA_3"])
    md = series.market_data(2)
    assert len(md) == 3 and md.close.tolist() == [1, 2, 3]
    assert md["SMA_3"] == 2 and md.previous("close") == 2 and math.isnan(md.previous("SMA_3"))
    assert md.bar.close == Decimal(3)
    assert md.history["SMA_3"].shape == (3,)
    with pytest.raises(ValueError, match="read-only"):
        md.history["close"][0] = 99.0
    with pytest.raises(KeyError, match="no indicator 'RSI_14'"):
        md["RSI_14"]
    with pytest.raises(IndexError):
        series.market_data(5)


def test_bar_series_refuses_unordered_bars() -> None:
    bars = _bars([1, 2])
    with pytest.raises(ValueError, match="increasing time order"):
        BarSeries("X", [bars[1], bars[0]])


@pytest.mark.parametrize("name", ["EMA_50", "RSI_14", "ATR_14", "MACD_12_26_9", "EMA_3",
                                  "SMA_20", "BBANDS_20_2", "DONCHIAN_20", "ROC_10"])
def test_warmup_is_long_enough_for_the_smoothing_to_forget_its_start(name: str) -> None:
    # a backtest loads warmup_bars() bars before --from; a strategy worker holds thousands:
    # the recursive indicators (EMA, Wilder's RSI and ATR, MACD) at the period's first bar
    # must be those of a long history, or backtest and paper/live see different values
    from strategies.base import IStrategy

    class Needs(IStrategy):
        name = "needs"

        def get_required_indicators(self) -> list[str]:
            return [name]

        def on_bar(self, context):  # type: ignore[no-untyped-def]
            return None

    rng = np.random.default_rng(7)
    close = 100 + np.cumsum(rng.normal(0, 1, 4000))
    high, low = close + rng.uniform(0, 2, 4000), close - rng.uniform(0, 2, 4000)
    first = 3500  # the period's first bar
    warm = Needs().warmup_bars()
    full = compute_indicators([name], ohlc(list(close), list(high), list(low)))
    short = compute_indicators([name], ohlc(list(close[first - warm:first + 1]),
                                            list(high[first - warm:first + 1]),
                                            list(low[first - warm:first + 1])))
    for key, column in full.items():
        scale = max(abs(float(column[first])), 1.0)
        assert abs(short[key][-1] - column[first]) <= 1e-3 * scale, (key, warm)
        assert abs(short[key][-2] - column[first - 1]) <= 1e-3 * scale, (key, warm)
