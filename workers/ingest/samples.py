"""The sample data sets that `mmats demo` imports (see data/README.md for their sources)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

DATA_DIR = Path(__file__).resolve().parents[2] / "data"


class Sample(NamedTuple):
    path: Path
    symbol: str
    market: str
    timeframe: str
    venue: str


def sample_datasets(data_dir: Path | None = None) -> list[Sample]:
    """(path, symbol, market, timeframe, venue) for each shipped file, real data first.

    Every row of every file is valid, so all of them import without --skip-bad.
    """
    d = data_dir or DATA_DIR
    stocks = [Sample(d / "stocks" / f"{t}.csv", t, "stock", "1d", "us")
              for t in ("AAPL", "GOOG", "IBM", "MSFT")]
    synthetic = [
        Sample(d / "synthetic" / "BTC-USDT_1m.csv", "BTC/USDT", "crypto", "1m", "crypto"),
        Sample(d / "synthetic" / "EUR-USD_1m.csv", "EUR/USD", "forex", "1m", "fx"),
    ]
    return stocks + synthetic
