"""MarketData read from a whole series' columns: the values at the current bar, and
nothing after it, through every public accessor."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import pytest

from strategies.market import Bar
from strategies.series import BarSeries

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def series(n: int = 30) -> BarSeries:
    close = np.arange(1.0, n + 1.0)
    columns = {"open": close, "high": close + 0.5, "low": close - 0.5, "close": close,
               "volume": np.full(n, 10.0)}

    def bar_at(i: int) -> Bar:
        c = Decimal(int(close[i]))
        return Bar(T0 + timedelta(minutes=i), c, c + Decimal("0.5"), c - Decimal("0.5"), c,
                   Decimal(10))
    return BarSeries.from_columns("X", columns, bar_at, ["SMA_3"])


def test_values_at_the_current_bar_only() -> None:
    s = series()
    md = s.market_data(9)  # close = 10
    assert md["close"] == 10.0 and md["SMA_3"] == 9.0  # (8 + 9 + 10) / 3
    assert md.previous("close") == 9.0 and md.previous("close", 9) == 1.0
    assert math.isnan(md.previous("close", 10))
    assert len(md) == 10 and md.close[-1] == 10.0 and len(md.close) == 10
    assert all(len(v) == 10 for v in md.history.values())
    assert md.indicators == {"SMA_3": 9.0}
    assert md.bar.close == Decimal(10) and md.bar.ts == T0 + timedelta(minutes=9)


def test_no_accessor_reaches_a_later_bar() -> None:
    md = series().market_data(4)
    with pytest.raises(ValueError, match="bars_ago must be >= 0"):
        md.previous("close", -1)
    with pytest.raises(KeyError, match="no indicator 'SMA_50'"):
        md["SMA_50"]
    with pytest.raises(ValueError, match="read-only"):
        md.history["close"][0] = 99.0
    with pytest.raises(AttributeError, match="immutable"):
        md.symbol = "Y"  # type: ignore[misc]


def test_the_same_values_as_a_series_cut_at_the_bar() -> None:
    # computing on the prefix must give what the full series shows at that bar
    full = series(30)
    for i in (0, 2, 3, 17, 29):
        cut = series(i + 1).market_data(i)
        md = full.market_data(i)
        for key in ("close", "SMA_3"):
            a, b = md[key], cut[key]
            assert (math.isnan(a) and math.isnan(b)) or a == b, (i, key)
