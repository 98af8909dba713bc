"""The stored bars of a run's symbols, loaded once into arrays.

Prices stay exact: when every price of a series lies on the instrument's tick (the
database checks that, exactly), they travel as integer tick counts and become Decimals
(ticks x tick) only where a Bar or a fill needs one; otherwise as decimal strings.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import numpy.typing as npt
import pandas as pd
import psycopg
import talib

from db.queries import query
from strategies.market import Bar
from strategies.series import BarSeries
from workers.backtest.config import BacktestError
from workers.backtest.simulator import InstrumentRules, SimBar

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIMEFRAME_US = {"1m": 60_000_000, "5m": 300_000_000, "15m": 900_000_000,
                "1h": 3_600_000_000, "4h": 14_400_000_000, "1d": 86_400_000_000,
                "1w": 604_800_000_000}
ATR_PERIOD = 14


def to_us(ts: datetime) -> int:
    delta = ts - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


@dataclass(frozen=True)
class Instrument:
    instrument_id: int
    symbol: str
    venue: str
    market: str
    quote_currency: str
    rules: InstrumentRules


class SymbolData:
    """One symbol's bars (warm-up included) as arrays; `first` is the first bar of the
    run's period. Bar i opens at ts_us[i] and closes at close_us[i]."""

    def __init__(self, inst: Instrument, timeframe: str, ts_us: IntArray,
                 prices: tuple[IntArray, ...] | tuple[npt.NDArray[np.object_], ...],
                 volume: FloatArray, first: int) -> None:
        self.inst = inst
        self.symbol = inst.symbol
        self.timeframe = timeframe
        self.ts_us = ts_us
        self.close_us = ts_us + TIMEFRAME_US[timeframe]
        self.first = first
        self._ticks = prices[0].dtype == np.int64
        self._prices = prices
        tick = float(inst.rules.price_tick)
        floats = [p.astype(np.float64) * tick if self._ticks else np.array(p, dtype=np.float64)
                  for p in prices]
        self.open, self.high, self.low, self.close = floats
        self.volume = volume
        # the ATR known at each bar's open: computed to the previous close
        atr = talib.ATR(self.high, self.low, self.close, ATR_PERIOD)
        self.atr_before = np.concatenate(([np.nan], atr[:-1]))
        self.series: BarSeries | None = None

    def __len__(self) -> int:
        return len(self.ts_us)

    def price(self, column: int, i: int) -> Decimal:
        """Exact price: column 0 open, 1 high, 2 low, 3 close."""
        raw = self._prices[column][i]
        if self._ticks:
            return Decimal(int(raw)) * self.inst.rules.price_tick
        return Decimal(str(raw))

    def bar(self, i: int) -> Bar:
        return Bar(ts=from_us(int(self.ts_us[i])), open=self.price(0, i), high=self.price(1, i),
                   low=self.price(2, i), close=self.price(3, i),
                   volume=Decimal(repr(float(self.volume[i]))))

    def sim_bar(self, i: int) -> SimBar:
        atr = float(self.atr_before[i])
        return SimBar(int(self.ts_us[i]), self.price(0, i), self.price(1, i), self.price(2, i),
                      self.price(3, i), Decimal(repr(float(self.volume[i]))),
                      None if np.isnan(atr) else atr)

    def build_series(self, indicators: Iterable[str]) -> BarSeries:
        columns = {"open": self.open, "high": self.high, "low": self.low, "close": self.close,
                   "volume": self.volume}
        self.series = BarSeries.from_columns(self.symbol, columns, self.bar, indicators)
        return self.series


def instrument(conn: psycopg.Connection, symbol: str) -> Instrument:
    """The instrument of a symbol (`SYMBOL` or `SYMBOL@venue`), or a one-line error."""
    name, _, venue = symbol.strip().partition("@")
    rows = conn.execute(query("backtest_instrument"),
                        {"symbol": name.upper(), "venue": venue or None}).fetchall()
    if not rows:
        where = f" on venue {venue!r}" if venue else ""
        raise BacktestError(f"unknown symbol {name!r}{where}: import its bars first "
                            "(mmats data import; `mmats data list` shows what is stored)")
    if len(rows) > 1:
        venues = ", ".join(r[2] for r in rows)
        raise BacktestError(f"symbol {name!r} exists on several venues ({venues}): "
                            f"name one as {name}@VENUE")
    iid, sym, ven, market, quote, tick, step, minimum = rows[0]
    return Instrument(iid, sym, ven, market, quote,
                      InstrumentRules(plain(tick), plain(step), plain(minimum)))


def plain(value: Decimal) -> Decimal:
    """0.010000 -> 0.01 (the prices built from it print without trailing zeros)."""
    normal = value.normalize()
    exponent = normal.as_tuple().exponent
    return normal.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else normal


def load_symbol(conn: psycopg.Connection, inst: Instrument, timeframe: str, start: datetime,
                end: datetime, warmup_bars: int) -> SymbolData:
    args = {"instrument": inst.instrument_id, "timeframe": timeframe, "start": start,
            "end": end, "warmup": max(warmup_bars, 0)}
    row = conn.execute(query("backtest_bar_range"), args).fetchone()
    assert row is not None
    first_ts, in_range, off_tick = row
    if not in_range:
        stored = conn.execute(query("backtest_bar_coverage"), args).fetchone()
        have = (f"stored: {stored[0]:%Y-%m-%d %H:%M} to {stored[1]:%Y-%m-%d %H:%M}"
                if stored and stored[0] else f"no {timeframe} bars are stored for it")
        raise BacktestError(
            f"no {timeframe} bars for {inst.symbol} from {start:%Y-%m-%d %H:%M} to "
            f"{end:%Y-%m-%d %H:%M} UTC ({have})")
    args["from"] = first_ts
    name = "backtest_bars_text" if off_tick else "backtest_bars_ticks"
    # only the bars that close by `end` (exclusive for their open times): a bar opening
    # before `end` but closing after it (a weekly bar at a month's end) holds later prices
    closed_by = end - timedelta(microseconds=TIMEFRAME_US[timeframe] - 1)
    buf = io.BytesIO()
    with conn.cursor().copy(query(name), {**args, "end": closed_by,
                                          "tick": inst.rules.price_tick}) as copy:
        for chunk in copy:
            buf.write(chunk)
    buf.seek(0)
    price_type = object if off_tick else np.int64
    frame = pd.read_csv(buf, sep="\t", header=None, names=["ts", "o", "h", "l", "c", "v"],
                        dtype={"ts": np.int64, "o": price_type, "h": price_type,
                               "l": price_type, "c": price_type, "v": np.float64})
    ts_us = frame["ts"].to_numpy(dtype=np.int64)
    prices = tuple(frame[c].to_numpy() for c in ("o", "h", "l", "c"))
    first = int(np.searchsorted(ts_us, to_us(start)))
    if first >= len(ts_us):
        raise BacktestError(
            f"no {timeframe} bar of {inst.symbol} both opens at or after "
            f"{start:%Y-%m-%d %H:%M} and closes by {end:%Y-%m-%d %H:%M} UTC")
    return SymbolData(inst, timeframe, ts_us, prices, frame["v"].to_numpy(np.float64), first)
