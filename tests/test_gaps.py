"""Session calendars and the calendar-aware gap finder."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import numpy as np
import pytest

from workers.ingest import calendars
from workers.ingest.calendars import easter, fill_holidays, nyse_holidays, sessions, trading_days
from workers.ingest.gaps import find_gaps, missing_bars
from workers.ingest.importer import import_file
from workers.ingest.samples import sample_datasets
from workers.ingest.synthetic import generate, write

NYSE = {
    2012: ["2012-01-02", "2012-01-16", "2012-02-20", "2012-04-06", "2012-05-28",
           "2012-07-04", "2012-09-03", "2012-10-29", "2012-10-30", "2012-11-22",
           "2012-12-25"],
    # New Year's Day on a Saturday is not observed; Juneteenth from 2022, observed Monday
    2022: ["2022-01-17", "2022-02-21", "2022-04-15", "2022-05-30", "2022-06-20",
           "2022-07-04", "2022-09-05", "2022-11-24", "2022-12-26"],
    # Independence Day on Sunday -> Monday; Christmas on Saturday -> Friday; no Juneteenth
    2021: ["2021-01-01", "2021-01-18", "2021-02-15", "2021-04-02", "2021-05-31",
           "2021-07-05", "2021-09-06", "2021-11-25", "2021-12-24"],
    2001: ["2001-01-01", "2001-01-15", "2001-02-19", "2001-04-13", "2001-05-28",
           "2001-07-04", "2001-09-03", "2001-09-11", "2001-09-12", "2001-09-13",
           "2001-09-14", "2001-11-22", "2001-12-25"],
    # MLK Day is a NYSE holiday from 1998 only
    1997: ["1997-01-01", "1997-02-17", "1997-03-28", "1997-05-26", "1997-07-04",
           "1997-09-01", "1997-11-27", "1997-12-25"],
    2025: ["2025-01-01", "2025-01-09", "2025-01-20", "2025-02-17", "2025-04-18",
           "2025-05-26", "2025-06-19", "2025-07-04", "2025-09-01", "2025-11-27",
           "2025-12-25"],
}


@pytest.mark.parametrize("year", sorted(NYSE))
def test_nyse_holidays_by_rule(year):
    assert [d.isoformat() for d in nyse_holidays(year)] == NYSE[year]


def test_special_closures_and_easter():
    assert date(2004, 6, 11) in nyse_holidays(2004)
    assert date(2007, 1, 2) in nyse_holidays(2007)
    assert date(2018, 12, 5) in nyse_holidays(2018)
    assert [easter(y) for y in (2019, 2024, 2038)] == [
        date(2019, 4, 21), date(2024, 3, 31), date(2038, 4, 25)]


def test_trading_days():
    days = trading_days("XNYS", date(2012, 10, 26), date(2012, 11, 2))
    assert [str(d) for d in days] == ["2012-10-26", "2012-10-31", "2012-11-01", "2012-11-02"]
    assert len(trading_days("FX_24X5", date(2024, 1, 1), date(2024, 1, 14))) == 10
    assert len(trading_days("CRYPTO_24X7", date(2024, 1, 1), date(2024, 1, 14))) == 14


def test_fill_holidays_is_idempotent(conn):
    # full-day holidays plus early closes (3 in each year)
    assert fill_holidays(conn, 2012, 2013) == (11 + 3) + (9 + 3)
    assert fill_holidays(conn, 2012, 2013) == 0
    rows = conn.execute("SELECT day, name FROM market.calendar_holidays "
                        "WHERE calendar_id = 'XNYS' AND day < '2013-01-01' "
                        "AND early_close IS NULL ORDER BY day").fetchall()
    assert [d.isoformat() for d, _ in rows] == NYSE[2012]
    assert rows[7][1] == "Hurricane Sandy"


# NYSE early closes (13:00 New York), by rule
NYSE_EARLY = {
    # July 3 Wednesday (a half day from 2013), Christmas Eve Tuesday
    2024: ["2024-07-03", "2024-11-29", "2024-12-24"],
    2025: ["2025-07-03", "2025-11-28", "2025-12-24"],
    # July 3 Friday is the observed Independence Day: a holiday, not a half day
    2026: ["2026-11-27", "2026-12-24"],
    # July 4 Sunday -> Monday (Friday July 2 is a full day); Dec 24 Friday is Christmas
    2027: ["2027-11-26"],
    2021: ["2021-11-26"],
    2019: ["2019-07-03", "2019-11-29", "2019-12-24"],
    2012: ["2012-07-03", "2012-11-23", "2012-12-24"],
    # before 2013 a Thursday July 4 made Friday July 5 the half day, not Wednesday July 3
    2002: ["2002-07-05", "2002-11-29", "2002-12-24"],
    2003: ["2003-07-03", "2003-11-28", "2003-12-24", "2003-12-26"],
}


@pytest.mark.parametrize("year", sorted(NYSE_EARLY))
def test_nyse_early_closes_by_rule(year):
    early = calendars.nyse_early_closes(year)
    assert [d.isoformat() for d in early] == NYSE_EARLY[year]
    assert {t for _, t in early.values()} == {time(13, 0)}
    assert not set(early) & set(nyse_holidays(year))


def _utc_us(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp() * 1_000_000)


def _session_of(day: date, **kw) -> tuple[str, str] | None:
    opens, closes = sessions("XNYS", _utc_us(day.year, day.month, day.day),
                             _utc_us(day.year, day.month, day.day), **kw)
    for o, c in zip(opens, closes, strict=True):
        if np.datetime64(int(o), "us").astype("datetime64[D]") == np.datetime64(day, "D"):
            return (str(np.datetime64(int(o), "us").astype("datetime64[m]")),
                    str(np.datetime64(int(c), "us").astype("datetime64[m]")))
    return None


def test_xnys_half_day_sessions_without_stored_rows():
    # day after Thanksgiving 2025: 09:30-13:00 EST = 14:30-18:00 UTC
    assert _session_of(date(2025, 11, 28)) == ("2025-11-28T14:30", "2025-11-28T18:00")
    assert _session_of(date(2025, 11, 26)) == ("2025-11-26T14:30", "2025-11-26T21:00")
    # Christmas Eve in winter time (EST): 13:00 = 18:00 UTC
    assert _session_of(date(2025, 12, 24)) == ("2025-12-24T14:30", "2025-12-24T18:00")
    # July 3 in summer time (EDT): 13:00 = 17:00 UTC
    assert _session_of(date(2025, 7, 3)) == ("2025-07-03T13:30", "2025-07-03T17:00")
    assert _session_of(date(2024, 7, 3)) == ("2024-07-03T13:30", "2024-07-03T17:00")
    # 2026: July 3 is the observed holiday, July 2 a full day
    assert _session_of(date(2026, 7, 3)) is None
    assert _session_of(date(2026, 7, 2)) == ("2026-07-02T13:30", "2026-07-02T20:00")


def test_stored_rows_win_over_the_rule():
    nov28 = date(2025, 11, 28)
    assert _session_of(nov28, early_closes={}) == ("2025-11-28T14:30", "2025-11-28T18:00")
    got = _session_of(nov28, early_closes={nov28: time(12, 0)})
    assert got == ("2025-11-28T14:30", "2025-11-28T17:00")
    assert _session_of(nov28, extra_closed=frozenset({nov28})) is None


def test_complete_half_day_series_has_no_gap():
    # the bars of 2025-11-28 (14:30-18:00 UTC), then Monday's first bar
    ts = np.arange(_utc_us(2025, 11, 28, 14, 30), _utc_us(2025, 11, 28, 18, 0), 60_000_000)
    ts = np.append(ts, _utc_us(2025, 12, 1, 14, 30))
    assert missing_bars(ts, "1m", "XNYS") == []
    ranges = missing_bars(np.delete(ts, [208, 209]), "1m", "XNYS")
    assert [(r.start.isoformat(), r.count) for r in ranges] == [
        ("2025-11-28T17:58:00+00:00", 2)]


def test_fill_holidays_stores_early_closes(conn):
    # a row stored by hand for a day is kept as it is
    conn.execute("INSERT INTO market.calendar_holidays (calendar_id, day, name, early_close) "
                 "VALUES ('XNYS', '2025-12-24', 'by hand', '12:00')")
    assert fill_holidays(conn, 2025, 2026) == (11 + 3 - 1) + (10 + 2)
    rows = conn.execute("SELECT day, name, early_close FROM market.calendar_holidays "
                        "WHERE calendar_id = 'XNYS' AND early_close IS NOT NULL ORDER BY day"
                        ).fetchall()
    assert [(d.isoformat(), t.isoformat("minutes")) for d, _, t in rows] == [
        ("2025-07-03", "13:00"), ("2025-11-28", "13:00"), ("2025-12-24", "12:00"),
        ("2026-11-27", "13:00"), ("2026-12-24", "13:00")]
    assert rows[1][1] == "Day after Thanksgiving" and rows[2][1] == "by hand"
    closed = {d for (d,) in conn.execute(
        "SELECT day FROM market.calendar_holidays WHERE early_close IS NULL")}
    assert date(2026, 7, 3) in closed and date(2025, 11, 28) not in closed


def _us(stamps: list[str]) -> np.ndarray:
    return np.array(stamps, dtype="datetime64[us]").astype(np.int64)


def test_forex_weekend_is_not_a_gap():
    # Friday 21:58, 21:59 UTC (16:58/16:59 New York, EST), then Sunday 22:00 UTC (17:00)
    ts = _us(["2024-01-05T21:58", "2024-01-05T21:59", "2024-01-07T22:00", "2024-01-07T22:01"])
    assert missing_bars(ts, "1m", "FX_24X5") == []
    ranges = missing_bars(np.delete(ts, 1), "1m", "FX_24X5")
    assert [(r.start.isoformat(), r.count) for r in ranges] == [("2024-01-05T21:59:00+00:00", 1)]
    # the same times in a 24x7 market: the whole weekend is missing
    assert missing_bars(ts, "1m", "CRYPTO_24X7")[0].count == 2 * 24 * 60


def test_daily_forex_bars_are_expected_monday_to_friday():
    days = [f"2024-01-{d:02d}" for d in (1, 2, 3, 4, 5, 8, 9, 11, 12)]
    ranges = missing_bars(_us(days), "1d", "FX_24X5")
    assert [(r.start.date().isoformat(), r.count) for r in ranges] == [("2024-01-10", 1)]
    # stamped at 17:00 New York the evening before (22:00 UTC), as some brokers do
    evening = _us([f"2024-01-{d:02d}T22:00" for d in (7, 8, 9, 10, 11, 14)])
    assert missing_bars(evening, "1d", "FX_24X5") == []


def test_intraday_stock_bars_only_inside_the_session():
    # 2024-01-12 (Fri) 15:58 .. 16:00 New York, then MLK Day (Mon 15th) closed, Tue 09:30
    ts = _us(["2024-01-12T20:58", "2024-01-12T20:59", "2024-01-16T14:30", "2024-01-16T14:31"])
    assert missing_bars(ts, "1m", "XNYS") == []
    ts = _us(["2024-01-12T20:58", "2024-01-16T14:31"])
    got = [(r.start.isoformat(), r.end.isoformat(), r.count)
           for r in missing_bars(ts, "1m", "XNYS")]
    assert got == [("2024-01-12T20:59:00+00:00", "2024-01-16T14:30:00+00:00", 2)]


def test_stock_sample_has_no_gaps(conn):
    aapl = next(s for s in sample_datasets() if s.symbol == "AAPL")
    import_file(conn, aapl.path, symbol=aapl.symbol, market=aapl.market,
                timeframe=aapl.timeframe, venue=aapl.venue)
    (series,) = find_gaps(conn, symbol="aapl")
    assert (series.bars, series.missing, series.ranges) == (3270, 0, ())
    assert (series.first.date(), series.last.date()) == (date(2000, 3, 1), date(2013, 3, 1))


def test_synthetic_removed_bars_are_exactly_the_gaps(conn, tmp_path):
    bars = generate("BTC/USDT", "crypto", start="2024-03-01", bars=3000, seed=3, gap_rate=0)
    removed = [5, 6, 7, 100, 2500]
    frame = bars.frame.drop(index=removed).reset_index(drop=True)
    path = write(type(bars)(frame, bars.missing_us, bars.price_decimals), tmp_path / "b.csv")
    import_file(conn, path, symbol="BTC/USDT", market="crypto", timeframe="1m")
    (series,) = find_gaps(conn, symbol="BTC/USDT", timeframe="1m", venue="crypto")
    stamps = bars.frame["timestamp"]
    assert [(r.start, r.end, r.count) for r in series.ranges] == [
        (stamps[5], stamps[7], 3), (stamps[100], stamps[100], 1),
        (stamps[2500], stamps[2500], 1)]


def test_forex_sample_gaps_are_the_generators(conn):
    fx = next(s for s in sample_datasets() if s.symbol == "EUR/USD")
    import_file(conn, fx.path, symbol=fx.symbol, market=fx.market, timeframe=fx.timeframe,
                venue=fx.venue)
    (series,) = find_gaps(conn, symbol="EUR/USD")
    again = generate("EUR/USD", "forex", start="2024-01-01", bars=14000, seed=42)
    starts = [int(r.start.timestamp() * 1_000_000) for r in series.ranges]
    assert all(r.count == 1 for r in series.ranges)
    assert starts == again.missing_us.tolist()
