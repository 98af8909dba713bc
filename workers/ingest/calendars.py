"""Session calendars: when a market trades, so that closed hours are not called gaps.

CRYPTO_24X7 never closes. FX_24X5 trades from Sunday 17:00 to Friday 17:00 New York time.
XNYS trades Monday to Friday 09:30-16:00 New York time, except NYSE holidays, which are
computed here by rule (and can be stored in market.calendar_holidays by fill_holidays).
"""

from __future__ import annotations

from datetime import date, time, timedelta

import numpy as np
import pandas as pd
import psycopg

NEW_YORK = "America/New_York"
US_PER_MINUTE = 60_000_000
# one-off NYSE closures (not by rule)
SPECIAL_CLOSURES = {
    date(2001, 9, 11): "September 11 attacks",
    date(2001, 9, 12): "September 11 attacks",
    date(2001, 9, 13): "September 11 attacks",
    date(2001, 9, 14): "September 11 attacks",
    date(2004, 6, 11): "National Day of Mourning for Ronald Reagan",
    date(2007, 1, 2): "National Day of Mourning for Gerald Ford",
    date(2012, 10, 29): "Hurricane Sandy",
    date(2012, 10, 30): "Hurricane Sandy",
    date(2018, 12, 5): "National Day of Mourning for George H. W. Bush",
    date(2025, 1, 9): "National Day of Mourning for Jimmy Carter",
}


def easter(year: int) -> date:
    """Gregorian Easter Sunday (the anonymous Gregorian algorithm)."""
    a, b, c = year % 19, year // 100, year % 100
    d, e = b // 4, b % 4
    f = (b + 8) // 25
    g = (b - f + 1) // 3
    h = (19 * a + b - d - g + 15) % 30
    i, k = c // 4, c % 4
    L = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * L) // 451
    month = (h + L - 7 * m + 114) // 31
    day = (h + L - 7 * m + 114) % 31 + 1
    return date(year, month, day)


def _nth_weekday(year: int, month: int, weekday: int, n: int) -> date:
    first = date(year, month, 1)
    return first + timedelta(days=(weekday - first.weekday()) % 7 + 7 * (n - 1))


def _last_weekday(year: int, month: int, weekday: int) -> date:
    nxt = date(year + (month == 12), month % 12 + 1, 1)
    last = nxt - timedelta(days=1)
    return last - timedelta(days=(last.weekday() - weekday) % 7)


def _observed(d: date) -> date:
    """Saturday holidays are observed on Friday, Sunday ones on Monday."""
    if d.weekday() == 5:
        return d - timedelta(days=1)
    if d.weekday() == 6:
        return d + timedelta(days=1)
    return d


def nyse_holidays(year: int) -> dict[date, str]:
    """Full-day NYSE closures in a year, by rule plus the special closures."""
    mon, thu = 0, 3
    out: dict[date, str] = {}
    new_year = date(year, 1, 1)
    if new_year.weekday() != 5:  # a Saturday New Year's Day is not observed on Friday
        out[_observed(new_year)] = "New Year's Day"
    if year >= 1998:
        out[_nth_weekday(year, 1, mon, 3)] = "Martin Luther King Jr. Day"
    out[_nth_weekday(year, 2, mon, 3)] = "Presidents' Day"
    out[easter(year) - timedelta(days=2)] = "Good Friday"
    out[_last_weekday(year, 5, mon)] = "Memorial Day"
    if year >= 2022:
        out[_observed(date(year, 6, 19))] = "Juneteenth"
    out[_observed(date(year, 7, 4))] = "Independence Day"
    out[_nth_weekday(year, 9, mon, 1)] = "Labor Day"
    out[_nth_weekday(year, 11, thu, 4)] = "Thanksgiving Day"
    out[_observed(date(year, 12, 25))] = "Christmas Day"
    out.update({d: n for d, n in SPECIAL_CLOSURES.items() if d.year == year})
    return dict(sorted(out.items()))


def holidays(calendar_id: str, first_year: int, last_year: int) -> dict[date, str]:
    if calendar_id != "XNYS":
        return {}
    out: dict[date, str] = {}
    for y in range(first_year, last_year + 1):
        out.update(nyse_holidays(y))
    return out


def trading_days(calendar_id: str, first: date, last: date,
                 extra_closed: set[date] | frozenset[date] = frozenset()) -> np.ndarray:
    """Days (datetime64[D]) on which a daily bar is expected, first..last inclusive."""
    days = np.arange(np.datetime64(first, "D"), np.datetime64(last, "D") + 1)
    if calendar_id == "CRYPTO_24X7":
        return days
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    keep = weekday < 5
    closed = set(extra_closed) | set(holidays(calendar_id, first.year, last.year))
    if closed:
        keep &= ~np.isin(days, np.array(sorted(closed), dtype="datetime64[D]"))
    return days[keep]


def _local_to_us(days: np.ndarray, at: time) -> np.ndarray:
    local = pd.DatetimeIndex(days.astype("datetime64[us]")) + pd.Timedelta(
        hours=at.hour, minutes=at.minute)
    return local.tz_localize(NEW_YORK).tz_convert("UTC").as_unit("us").asi8


def sessions(calendar_id: str, start_us: int, end_us: int,
             early_closes: dict[date, time] | None = None,
             extra_closed: set[date] | frozenset[date] = frozenset()
             ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint trading intervals [start, end) in UTC microseconds covering the range."""
    if calendar_id == "CRYPTO_24X7":
        return (np.array([np.iinfo(np.int64).min // 2]), np.array([np.iinfo(np.int64).max // 2]))
    first = (np.datetime64(start_us, "us").astype("datetime64[D]") - 8).astype(date)
    last = (np.datetime64(end_us, "us").astype("datetime64[D]") + 8).astype(date)
    if calendar_id == "FX_24X5":
        days = np.arange(np.datetime64(first, "D"), np.datetime64(last, "D") + 1)
        sundays = days[(days.astype(np.int64) + 3) % 7 == 6]
        opens = _local_to_us(sundays, time(17, 0))
        closes = _local_to_us(sundays + 5, time(17, 0))
        return opens, closes
    if calendar_id == "XNYS":
        days = trading_days("XNYS", first, last, extra_closed)
        opens = _local_to_us(days, time(9, 30))
        closes = _local_to_us(days, time(16, 0))
        for d, t in (early_closes or {}).items():
            hit = np.flatnonzero(days == np.datetime64(d, "D"))
            if len(hit):
                closes[hit[0]] = _local_to_us(np.array([np.datetime64(d, "D")]), t)[0]
        return opens, closes
    raise ValueError(f"unknown calendar {calendar_id!r}")


def in_session(ts_us: np.ndarray, step_us: int, opens: np.ndarray,
               closes: np.ndarray) -> np.ndarray:
    """True where the bar [ts, ts + step) overlaps a trading interval."""
    i = np.searchsorted(closes, ts_us, side="right")
    ok = i < len(opens)
    out = np.zeros(len(ts_us), dtype=bool)
    out[ok] = opens[i[ok]] < ts_us[ok] + step_us
    return out


def fill_holidays(conn: psycopg.Connection, first_year: int, last_year: int) -> int:
    """Store the XNYS holidays of these years in market.calendar_holidays. Idempotent."""
    rows = [("XNYS", d, name) for d, name in holidays("XNYS", first_year, last_year).items()]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO market.calendar_holidays (calendar_id, day, name) VALUES (%s, %s, %s) "
            "ON CONFLICT (calendar_id, day) DO NOTHING", rows)
        return max(cur.rowcount, 0)
