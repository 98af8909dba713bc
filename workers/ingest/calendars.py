"""Session calendars: when a market trades, so that closed hours are not called gaps.

CRYPTO_24X7 never closes. FX_24X5 trades from Sunday 17:00 to Friday 17:00 New York time.
XNYS trades Monday to Friday 09:30-16:00 New York time, except NYSE holidays and early
closes (13:00 New York), which are computed here by rule (and can be stored in
market.calendar_holidays by fill_holidays: early_close NULL = closed all day).
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
NYSE_EARLY_CLOSE = time(13, 0)
# one-off NYSE early closes (not by rule), New York time
SPECIAL_EARLY_CLOSES = {
    date(1997, 12, 26): ("Day after Christmas", NYSE_EARLY_CLOSE),
    date(2003, 12, 26): ("Day after Christmas", NYSE_EARLY_CLOSE),
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


def nyse_early_closes(year: int) -> dict[date, tuple[str, time]]:
    """NYSE early closes in a year (name, close time New York), by rule plus special ones.

    13:00 on the day after Thanksgiving (from 1993), on Christmas Eve when it is Monday to
    Thursday (from 1993; a Friday Christmas Eve is the observed Christmas holiday), and
    before Independence Day: July 3 when it is Monday, Tuesday or Thursday (from 1995) or
    Wednesday (from 2013; before that the Friday July 5 after a Thursday July 4 was the
    half day instead). A Friday July 3 is the observed holiday; when July 4 is a Sunday the
    Friday before is a full day. A day that is a full-day holiday is never an early close.
    """
    mon, tue, wed, thu, fri = range(5)
    out: dict[date, tuple[str, time]] = {}
    july3, july5 = date(year, 7, 3), date(year, 7, 5)
    if year >= 1995 and (july3.weekday() in (mon, tue, thu)
                         or (year >= 2013 and july3.weekday() == wed)):
        out[july3] = ("Day before Independence Day", NYSE_EARLY_CLOSE)
    if 1995 <= year < 2013 and july5.weekday() == fri:
        out[july5] = ("Day after Independence Day", NYSE_EARLY_CLOSE)
    if year >= 1993:
        out[_nth_weekday(year, 11, thu, 4) + timedelta(days=1)] = (
            "Day after Thanksgiving", NYSE_EARLY_CLOSE)
        christmas_eve = date(year, 12, 24)
        if christmas_eve.weekday() in (mon, tue, wed, thu):
            out[christmas_eve] = ("Christmas Eve", NYSE_EARLY_CLOSE)
    out.update({d: v for d, v in SPECIAL_EARLY_CLOSES.items() if d.year == year})
    closed = nyse_holidays(year)
    return {d: v for d, v in sorted(out.items()) if d not in closed}


def early_closes_by_rule(calendar_id: str, first_year: int, last_year: int
                         ) -> dict[date, tuple[str, time]]:
    """Early closes by rule (name, close time in the calendar's time zone)."""
    if calendar_id != "XNYS":
        return {}
    out: dict[date, tuple[str, time]] = {}
    for y in range(first_year, last_year + 1):
        out.update(nyse_early_closes(y))
    return out


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
    """Sorted, disjoint trading intervals [start, end) in UTC microseconds covering the range.

    XNYS closes early on the days early_closes_by_rule() gives; `early_closes` (e.g. rows
    stored in market.calendar_holidays) adds to them and wins for the same day, and a day
    in `extra_closed` is closed all day even if it would be an early close.
    """
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
        early = {d: t for d, (_, t) in early_closes_by_rule(
            "XNYS", first.year, last.year).items()}
        early.update(early_closes or {})
        for d, t in early.items():
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
    """Store the XNYS holidays (early_close NULL) and early closes of these years in
    market.calendar_holidays; returns how many rows were added. Idempotent, and a row
    already stored for a day (e.g. entered by hand) is kept as it is."""
    rows: list[tuple[str, date, str, time | None]] = [
        ("XNYS", d, name, None) for d, name in holidays("XNYS", first_year, last_year).items()]
    rows += [("XNYS", d, name, t)
             for d, (name, t) in early_closes_by_rule("XNYS", first_year, last_year).items()]
    rows.sort(key=lambda r: r[1])
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO market.calendar_holidays (calendar_id, day, name, early_close) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (calendar_id, day) DO NOTHING", rows)
        return max(cur.rowcount, 0)
