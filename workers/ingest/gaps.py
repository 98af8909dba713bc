"""Missing bars between the first and last stored bar of each series, calendar-aware.

The timestamps of a series are read with one COPY and compared with the bars its calendar
expects (numpy, no per-bar Python), so a series of a million bars takes well under a
second. A bar is expected when it overlaps a trading session; daily bars are expected on
trading days, weekly bars every week.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time

import numpy as np
import psycopg
from psycopg import sql

from workers.ingest.calendars import in_session, sessions, trading_days

STEP_US = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14400}
DAY_US = 86_400_000_000


@dataclass(frozen=True)
class GapRange:
    start: datetime  # the first missing bar
    end: datetime  # the last missing bar
    count: int


@dataclass(frozen=True)
class SeriesGaps:
    symbol: str
    venue: str
    market: str
    timeframe: str
    calendar_id: str
    first: datetime
    last: datetime
    bars: int
    ranges: tuple[GapRange, ...]

    @property
    def missing(self) -> int:
        return sum(r.count for r in self.ranges)


_SERIES = """
SELECT i.instrument_id, i.symbol, i.venue, i.market::text, i.calendar_id, tf::text
FROM market.instruments i CROSS JOIN unnest(enum_range(NULL::market.timeframe)) AS tf
WHERE (%(symbol)s::text IS NULL OR i.symbol = upper(%(symbol)s))
  AND (%(venue)s::text IS NULL OR i.venue = lower(%(venue)s))
  AND (%(timeframe)s::text IS NULL OR tf::text = %(timeframe)s)
  AND EXISTS (SELECT 1 FROM market.bars b WHERE b.instrument_id = i.instrument_id
              AND b.timeframe = tf)
ORDER BY i.symbol, i.venue, tf
"""
_TIMES = """
COPY (SELECT (extract(epoch FROM ts) * 1000000)::int8 FROM market.bars
      WHERE instrument_id = {} AND timeframe = {} ORDER BY ts) TO STDOUT
"""
_HOLIDAYS = "SELECT day, early_close FROM market.calendar_holidays WHERE calendar_id = %s"


def read_times(conn: psycopg.Connection, instrument_id: int, timeframe: str) -> np.ndarray:
    stmt = sql.SQL(_TIMES).format(sql.Literal(instrument_id), sql.Literal(timeframe))
    buf = bytearray()
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        for block in copy:
            buf += block
    return np.array(bytes(buf).split(), dtype="S24").astype(np.int64)


def _dt(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + np.timedelta64(int(us), "us").item()


def _ranges(expected: np.ndarray, missing_pos: np.ndarray) -> list[GapRange]:
    if len(missing_pos) == 0:
        return []
    breaks = np.flatnonzero(np.diff(missing_pos) != 1) + 1
    out = []
    for chunk in np.split(missing_pos, breaks):
        out.append(GapRange(_dt(int(expected[chunk[0]])), _dt(int(expected[chunk[-1]])),
                            len(chunk)))
    return out


def missing_bars(ts_us: np.ndarray, timeframe: str, calendar_id: str,
                 closed: frozenset[date] = frozenset(),
                 early_closes: dict[date, time] | None = None) -> list[GapRange]:
    """Ranges of expected bars absent from a sorted array of bar times (UTC microseconds)."""
    if len(ts_us) < 2:
        return []
    ts_us = np.unique(ts_us)
    first, last = int(ts_us[0]), int(ts_us[-1])
    if timeframe in STEP_US:
        step = STEP_US[timeframe] * 1_000_000
        grid = np.arange(first, last + 1, step, dtype=np.int64)
        opens, closes = sessions(calendar_id, first, last, early_closes, closed)
        expected = grid[in_session(grid, step, opens, closes)]
        present = ts_us
    elif timeframe == "1d":
        shift = 7 * 3_600_000_000 if calendar_id == "FX_24X5" else 0
        if calendar_id == "FX_24X5":  # a forex day opens at 17:00 New York the day before
            local = _ny_local_us(ts_us)
            present = np.unique((local + shift) // DAY_US)
        else:
            present = np.unique(ts_us // DAY_US)
        d0 = np.datetime64(int(present[0]), "D").astype(date)
        d1 = np.datetime64(int(present[-1]), "D").astype(date)
        expected = trading_days(calendar_id, d0, d1, closed).astype(np.int64)
        missing = np.flatnonzero(~np.isin(expected, present))
        return _ranges(expected * DAY_US, missing)
    else:  # 1w: one bar per Monday-based week
        present = np.unique((ts_us // DAY_US + 3) // 7)
        expected = np.arange(present[0], present[-1] + 1)
        missing = np.flatnonzero(~np.isin(expected, present))
        return _ranges((expected * 7 - 3) * DAY_US, missing)
    pos = np.searchsorted(present, expected)
    pos[pos >= len(present)] = 0
    missing = np.flatnonzero(present[pos] != expected)
    return _ranges(expected, missing)


def _ny_local_us(ts_us: np.ndarray) -> np.ndarray:
    import pandas as pd

    idx = pd.DatetimeIndex(ts_us.astype("datetime64[us]")).tz_localize("UTC")
    return idx.tz_convert("America/New_York").tz_localize(None).as_unit("us").asi8


def find_gaps(conn: psycopg.Connection, *, symbol: str | None = None,
              timeframe: str | None = None, venue: str | None = None) -> list[SeriesGaps]:
    out = []
    series = conn.execute(_SERIES, {"symbol": symbol, "venue": venue,
                                    "timeframe": timeframe}).fetchall()
    for instrument_id, sym, ven, market, calendar_id, tf in series:
        rows = conn.execute(_HOLIDAYS, (calendar_id,)).fetchall()
        closed = frozenset(d for d, early in rows if early is None)
        early = {d: e for d, e in rows if e is not None}
        ts = read_times(conn, instrument_id, tf)
        ranges = missing_bars(ts, tf, calendar_id, closed, early)
        out.append(SeriesGaps(sym, ven, market, tf, calendar_id, _dt(int(ts[0])),
                              _dt(int(ts[-1])), len(ts), tuple(ranges)))
    return out
