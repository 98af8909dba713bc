"""The SYNTHETIC bar generator: deterministic, valid, shaped like markets."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from workers.ingest.importer import import_file
from workers.ingest.samples import DATA_DIR, sample_datasets
from workers.ingest.synthetic import generate, generate_file, write

SHIPPED = {  # the commands in data/README.md
    "BTC-USDT_1m.csv": ("BTC/USDT", "crypto", 10_000),
    "EUR-USD_1m.csv": ("EUR/USD", "forex", 14_000),
}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = generate_file(tmp_path / "a.csv", "BTC/USDT", "crypto", bars=2000, seed=1)
    b = generate_file(tmp_path / "b.csv", "BTC/USDT", "crypto", bars=2000, seed=1)
    c = generate_file(tmp_path / "c.csv", "BTC/USDT", "crypto", bars=2000, seed=2)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_shipped_files_regenerate_identically(tmp_path):
    for name, (symbol, market, bars) in SHIPPED.items():
        out = generate_file(tmp_path / name, symbol, market, timeframe="1m",
                            start="2024-01-01", bars=bars, seed=42)
        assert out.read_bytes() == (DATA_DIR / "synthetic" / name).read_bytes(), name


def test_samples_listed_exist():
    samples = sample_datasets()
    assert {s.symbol for s in samples} >= {"AAPL", "IBM", "MSFT", "GOOG", "BTC/USDT", "EUR/USD"}
    assert all(Path(s.path).is_file() for s in samples)


def _check_valid(frame: pd.DataFrame, places: int) -> None:
    o, h, lo, c = (frame[k].map(Decimal) for k in ("open", "high", "low", "close"))
    assert (lo > 0).all() and (lo <= o).all() and (lo <= c).all()
    assert (h >= o).all() and (h >= c).all()
    assert (frame["volume"].map(Decimal) >= 0).all()
    for k in ("open", "high", "low", "close"):
        assert frame[k].str.fullmatch(rf"\d+\.\d{{{places}}}").all()
    ts = frame["timestamp"]
    assert ts.is_monotonic_increasing and ts.is_unique


def test_bars_are_valid_on_tick_and_in_session():
    fx = generate("EUR/USD", "forex", start="2024-01-03", bars=8000, seed=5)
    _check_valid(fx.frame, 5)
    ny = fx.frame["timestamp"].dt.tz_convert("America/New_York")
    wd, hour = ny.dt.day_of_week, ny.dt.hour
    closed = (wd == 5) | ((wd == 4) & (hour >= 17)) | ((wd == 6) & (hour < 17))
    assert not closed.any()
    assert (ny.dt.day_of_week == 6).any()  # it does reopen on Sunday evening

    stock = generate("AAPL", "stock", start="2024-07-01", bars=2000, seed=5)
    _check_valid(stock.frame, 2)
    ny = stock.frame["timestamp"].dt.tz_convert("America/New_York")
    minutes = ny.dt.hour * 60 + ny.dt.minute
    assert ((minutes >= 9 * 60 + 30) & (minutes < 16 * 60)).all()
    assert not (ny.dt.date.astype(str) == "2024-07-04").any()

    btc = generate("BTC/USDT", "crypto", bars=5000, seed=5, gap_rate=0.01)
    _check_valid(btc.frame, 2)
    assert len(btc.missing_us) > 10
    assert not np.isin(btc.missing_us, btc.frame["timestamp"].astype("int64") // 1000).any()


def test_volatility_clusters_and_volume_follows_it():
    f = generate("BTC/USDT", "crypto", bars=200_000, seed=11).frame
    r = np.diff(np.log(f["close"].astype(float).to_numpy()))
    a = np.abs(r)
    hourly = a[: len(a) // 60 * 60].reshape(-1, 60).mean(axis=1)
    # volatility is persistent: this hour's mean |return| predicts the next hour's
    assert np.corrcoef(hourly[1:], hourly[:-1])[0, 1] > 0.3
    vol = f["volume"].astype(float).to_numpy()[1:]
    assert np.corrcoef(np.log(vol), np.log(a + 1e-9))[0, 1] > 0.05
    assert pd.Series(r).kurt() > 3  # fat tails (jumps, GARCH)


def test_parquet_output_imports_exactly(conn, tmp_path):
    bars = generate("EUR/USD", "forex", bars=500, seed=9)
    path = write(bars, tmp_path / "fx.parquet")
    assert pq.read_schema(path).metadata[b"mmats.synthetic"] == b"true"
    rep = import_file(conn, path, symbol="EUR/USD", market="forex", timeframe="1m")
    assert rep.inserted == 500
    got = conn.execute("SELECT open, high, low, close, volume FROM market.bars ORDER BY ts"
                       ).fetchall()
    want = [tuple(Decimal(x) for x in row) for row in
            bars.frame[["open", "high", "low", "close", "volume"]].itertuples(index=False)]
    assert got == want
    assert str(got[0][0]) == bars.frame["open"][0]  # scale kept: 1.10000


def test_cli_generate(tmp_path):
    out = tmp_path / "g.csv.gz"
    r = subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "data",
                        "generate", "--symbol", "ETH/USDT", "--market", "crypto", "--bars",
                        "100", "--seed", "1", "--out", str(out)],
                       capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC" in r.stdout and out.stat().st_size > 0
    r = subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "data",
                        "generate", "--symbol", "ETH/USDT", "--market", "crypto",
                        "--start", "not a date", "--out", str(out)],
                       capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_generated_bars_are_bars_import_takes(tmp_path):
    """generate wrote bars up to 2200-01-03 that bar import refuses (times from 2200 on);
    it refuses them itself now, writing nothing. The bars up to the limit import."""
    out = tmp_path / "late.csv"
    try:
        generate_file(out, "BTC/USDT", "crypto", start="2199-12-31", bars=5000)
    except ValueError as exc:
        assert str(exc) == ("the last bar would be at 2200-01-03 11:24 UTC, and bar import"
                            " refuses times from 2200-01-01 on: start earlier or make fewer"
                            " bars")
    else:
        raise AssertionError("bars after 2199 were generated")
    assert not out.exists()
    bars = generate("BTC/USDT", "crypto", start="2199-12-31", bars=1000)
    assert str(bars.frame["timestamp"].iloc[-1]) < "2200-01-01"


def test_cli_generate_names_the_option(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "data",
                               "generate", "--symbol", "ETH/USDT", "--market", "crypto",
                               "--out", str(tmp_path / "g.csv"), *args],
                              capture_output=True, text=True, env=dict(os.environ), timeout=60)
    r = run("--start", "2024-13-01")
    assert (r.returncode, r.stderr) == (1, "error: --start '2024-13-01' is not a date or time"
                                           " (YYYY-MM-DD or ISO 8601): month must be in 1..12:"
                                           " 2024-13-01\n")
    r = run("--seed", "-1")
    assert (r.returncode, r.stderr) == (2, "error: Invalid value for '--seed': -1 is not in the"
                                           " range x>=0 (see `mmats data generate --help`)\n")
    assert not (tmp_path / "g.csv").exists()
