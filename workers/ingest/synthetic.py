"""SYNTHETIC intraday bars for tests, demos and benchmarks: not market data.

Deterministic for a seed (same arguments, same bytes). The model, vectorised with numpy:

- volatility clustering: GARCH(1,1), h[t] = omega + (alpha z[t-1]^2 + beta) h[t-1], solved
  in blocks as a linear recurrence with random coefficients (no per-bar Python loop);
- occasional jumps (a Bernoulli-Poisson jump added inside a bar);
- OHLC from sub-steps: each bar is a path of SUBSTEPS log-returns, open = previous close,
  high/low = the path's extremes;
- volume grows with volatility (times log-normal noise);
- sessions: crypto trades 24x7, forex from Sunday 17:00 to Friday 17:00 New York, stocks
  09:30-16:00 New York on NYSE trading days; and gaps: bars missing at random.

Prices are rounded to the instrument's tick and written as exact decimal strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pandas as pd

from workers.ingest.calendars import in_session, sessions
from workers.ingest.gaps import STEP_US
from workers.ingest.instruments import CALENDAR, check_timeframe, spec_for
from workers.ingest.parse import LATEST_BAR_TIME

LATEST_US = int((LATEST_BAR_TIME - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()) * 1_000_000

SUBSTEPS = 6
ALPHA, BETA = 0.06, 0.93
BLOCK = 512
START_PRICE = {"crypto": "42000", "forex": "1.1", "stock": "150"}
ANNUAL_VOL = {"crypto": 0.60, "forex": 0.08, "stock": 0.25}
TRADING_MINUTES_PER_YEAR = {"crypto": 525_600, "forex": 372_600, "stock": 98_280}
# volume of a one-minute bar at average volatility, and its step (decimals)
BASE_VOLUME = {"crypto": (5.0, 5), "forex": (150.0, 0), "stock": (20_000.0, 0)}
COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")


@dataclass(frozen=True)
class SyntheticBars:
    frame: pd.DataFrame  # timestamp (datetime64[us, UTC]) and decimal-string columns
    missing_us: np.ndarray  # in-session bar times dropped as gaps (UTC microseconds)
    price_decimals: int


def _grid(market: str, step_us: int, start_us: int, slots: int) -> np.ndarray:
    """The first `slots` in-session bar times from start."""
    factor = {"crypto": 1.0, "forex": 1.5, "stock": 6.0}[market]
    want = int(slots * factor) + 10_000
    while True:
        grid = start_us + np.arange(want, dtype=np.int64) * step_us
        if market != "crypto":
            opens, closes = sessions(CALENDAR[market], int(grid[0]), int(grid[-1]))
            grid = grid[in_session(grid, step_us, opens, closes)]
        if len(grid) >= slots:
            return grid[:slots]
        want *= 2


def _garch_variance(z: np.ndarray, long_var: float) -> np.ndarray:
    """h[t] = omega + a[t] h[t-1], a[t] = alpha z[t-1]^2 + beta, blockwise in closed form."""
    n = len(z)
    omega = long_var * (1 - ALPHA - BETA)
    a = np.empty(n)
    a[0] = ALPHA + BETA
    a[1:] = ALPHA * z[:-1] ** 2 + BETA
    nb = -(-n // BLOCK)
    pad = np.ones(nb * BLOCK)
    pad[:n] = a
    log_a = np.cumsum(np.log(pad.reshape(nb, BLOCK)), axis=1)
    prod = np.exp(log_a)
    const = prod * omega * np.cumsum(np.exp(-log_a), axis=1)
    h0 = np.empty(nb)
    h = long_var
    for b in range(nb):  # one step per block, not per bar
        h0[b] = h
        h = prod[b, -1] * h + const[b, -1]
    return (prod * h0[:, None] + const).reshape(-1)[:n]


def _decimals(ticks: np.ndarray, places: int) -> np.ndarray:
    if places == 0:
        return ticks.astype(str).astype(object)
    scale = 10**places
    whole = pd.Series(ticks // scale).astype(str)
    frac = pd.Series(ticks % scale).astype(str).str.zfill(places)
    return (whole + "." + frac).to_numpy(dtype=object)


def generate(symbol: str, market: str, *, timeframe: str = "1m",
             start: str | datetime = "2024-01-01", bars: int = 10_000, seed: int = 42,
             gap_rate: float = 0.002, jump_rate: float = 0.0005,
             start_price: str | None = None) -> SyntheticBars:
    """`bars` SYNTHETIC bars from `start` (UTC), within the market's sessions."""
    check_timeframe(timeframe)
    if timeframe not in STEP_US:
        raise ValueError("the synthetic generator makes intraday bars (1m to 4h)")
    spec = spec_for(symbol, market)
    rng = np.random.default_rng(seed)
    step_us = STEP_US[timeframe] * 1_000_000
    t0 = pd.Timestamp(start)
    t0 = t0.tz_localize("UTC") if t0.tzinfo is None else t0.tz_convert("UTC")
    start_us = int(np.datetime64(t0.tz_localize(None), "us").astype(np.int64))
    slots = int(bars / (1 - gap_rate)) + 50
    grid = _grid(market, step_us, start_us, slots)
    n = len(grid)
    minutes = STEP_US[timeframe] / 60
    long_var = ANNUAL_VOL[market] ** 2 / (TRADING_MINUTES_PER_YEAR[market] / minutes)
    sub = rng.standard_normal((n, SUBSTEPS))
    z = sub.sum(axis=1) / np.sqrt(SUBSTEPS)
    h = _garch_variance(z, long_var)
    steps = sub * np.sqrt(h / SUBSTEPS)[:, None]
    jumps = rng.random(n) < jump_rate
    steps[jumps, 0] += rng.standard_normal(int(jumps.sum())) * np.sqrt(long_var) * 12
    path = np.cumsum(steps.reshape(-1)).reshape(n, SUBSTEPS)
    first = Decimal(start_price or START_PRICE[market])
    tick = spec.price_tick
    places = -tick.as_tuple().exponent  # type: ignore[operator]
    level = float(first / tick)
    close = np.rint(level * np.exp(path[:, -1]))
    open_ = np.concatenate(([np.rint(level)], close[:-1]))
    high = np.maximum(np.rint(level * np.exp(path.max(axis=1))), np.maximum(open_, close))
    low = np.minimum(np.rint(level * np.exp(path.min(axis=1))), np.minimum(open_, close))
    low = np.maximum(low, 1)
    base, vplaces = BASE_VOLUME[market]
    noise = rng.lognormal(0.0, 0.5, n)
    vol = base * minutes * (h / long_var) ** 0.75 * noise
    vol_ticks = np.rint(vol * 10**vplaces).astype(np.int64)
    keep = rng.random(n) >= gap_rate
    keep[0] = True
    kept = np.flatnonzero(keep)[:bars]
    last = kept[-1]
    if grid[last] >= LATEST_US:
        at = pd.Timestamp(int(grid[last]), unit="us", tz="UTC")
        raise ValueError(
            f"the last bar would be at {at:%Y-%m-%d %H:%M}"
            f" UTC, and bar import refuses times from {LATEST_BAR_TIME:%Y-%m-%d} on: start earlier"
            " or make fewer bars")
    missing = grid[: last + 1][~keep[: last + 1]]
    frame = pd.DataFrame({
        "timestamp": pd.to_datetime(grid[kept], unit="us", utc=True),
        "open": _decimals(open_[kept].astype(np.int64), places),
        "high": _decimals(high[kept].astype(np.int64), places),
        "low": _decimals(low[kept].astype(np.int64), places),
        "close": _decimals(close[kept].astype(np.int64), places),
        "volume": _decimals(vol_ticks[kept], vplaces),
    })
    return SyntheticBars(frame, missing, places)


def write(bars: SyntheticBars, path: str | Path) -> Path:
    """CSV (.csv, .csv.gz) or Parquet (.parquet) by extension; exact decimals either way."""
    p = Path(path)
    f = bars.frame
    if p.name.lower().endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = {"timestamp": pa.array(f["timestamp"], pa.timestamp("us", tz="UTC"))}
        for c in COLUMNS[1:]:
            places = bars.price_decimals if c != "volume" else _places(f[c])
            cols[c] = pa.array(f[c].tolist(), pa.string()).cast(pa.decimal128(38, places))
        table = pa.table(cols).replace_schema_metadata(
            {"mmats.synthetic": "true", "generator": "workers.ingest.synthetic"})
        pq.write_table(table, p)
        return p
    ts = np.datetime_as_string(f["timestamp"].dt.tz_localize(None).to_numpy(
        dtype="datetime64[us]"), unit="s")
    lines = map(",".join, zip((t + "Z" for t in ts.tolist()),
                              *(f[c].tolist() for c in COLUMNS[1:]), strict=True))
    text = ",".join(COLUMNS) + "\n" + "\n".join(lines) + "\n"
    if p.name.lower().endswith(".gz"):
        import gzip

        with gzip.GzipFile(p, "wb", mtime=0) as gz:
            gz.write(text.encode())
    else:
        p.write_text(text)
    return p


def _places(col: pd.Series) -> int:
    first = str(col.iloc[0]) if len(col) else "0"
    return len(first.split(".")[1]) if "." in first else 0


def generate_file(path: str | Path, symbol: str, market: str, *, timeframe: str = "1m",
                  start: str = "2024-01-01", bars: int = 10_000, seed: int = 42) -> Path:
    return write(generate(symbol, market, timeframe=timeframe, start=start, bars=bars,
                          seed=seed), path)
