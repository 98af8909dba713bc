"""Importing hostile or odd bar files: every problem is one line naming the file and the
line (or column), nothing is half-written, and no bar is stored that had not closed."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from db.errors import MmatsError
from workers.ingest import parse
from workers.ingest.importer import import_file

HEADER = "timestamp,open,high,low,close,volume\n"
ROW = "{},100,101,99,100.5,10\n"
GOOD = HEADER + ROW.format("2024-02-01T00:00:00Z")
NOW = dt.datetime(2024, 2, 1, 12, 0, 30, tzinfo=dt.UTC)


def write(tmp_path: Path, text: str | bytes, name: str = "bars.csv") -> Path:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def counts(conn: psycopg.Connection) -> tuple[int, int, int]:
    return tuple(conn.execute(  # type: ignore[return-value]
        "SELECT (SELECT count(*) FROM market.bars), (SELECT count(*) FROM market.imports),"
        " (SELECT count(*) FROM market.bar_quarantine)").fetchone())


def refused(conn: psycopg.Connection, path: Path, timeframe: str = "1m",
            **kwargs: object) -> str:
    with pytest.raises(MmatsError) as err:
        import_file(conn, path, symbol="BTC/USDT", market="crypto", timeframe=timeframe,
                    **kwargs)  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message and "\x07" not in message
    assert str(path) in message
    assert counts(conn) == (0, 0, 0)
    return message


# ------------------------------------------------------------------ bars in the future
@pytest.mark.parametrize("row,timeframe,reason", [
    # a typo (2103 for 2013): the live ingest, resuming after max(ts), would never store
    # another bar
    ("2103-03-04,431.0,436.0,429.0,432.0,100", "1d",
     "time 2103-03-04 00:00:00 UTC is in the future (now 2024-02-01 12:00:30 UTC)"),
    ("2500-01-01T00:00:00Z,1,1,1,1,1", "1d",
     "time '2500-01-01T00:00:00Z' is out of range (after the year 2200)"),
    ("9999-12-31T00:00:00Z,1,1,1,1,1", "1d",
     "time '9999-12-31T00:00:00Z' is out of range (after the year 2200)"),
    # opened 30 s before now, closes in 4.5 minutes: still open (beyond the tolerance)
    ("2024-02-01T12:00:00Z,1,1,1,1,1", "5m",
     "the 5m bar at 2024-02-01 12:00:00 UTC has not closed yet (it closes at "
     "2024-02-01 12:05:00 UTC; now 2024-02-01 12:00:30 UTC)"),
    ("2024-02-01T00:00:00Z,1,1,1,1,1", "1d",
     "the 1d bar at 2024-02-01 00:00:00 UTC has not closed yet"),
])
def test_a_bar_that_has_not_closed_is_a_bad_row(conn, tmp_path, row, timeframe, reason):
    path = write(tmp_path, "Date,Open,High,Low,Close,Volume\n" + row + "\n")
    message = refused(conn, path, timeframe, now=NOW)
    assert f"line 2 (header = line 1): {reason}" in message, message


def test_a_closed_bar_within_the_tolerance_is_imported_and_an_open_one_quarantined(
        conn, tmp_path):
    text = HEADER + "".join(ROW.format(f"2024-02-01T11:5{m}:00Z") for m in (8, 9)) + \
        ROW.format("2024-02-01T12:00:00Z")
    rep = import_file(conn, write(tmp_path, text), symbol="BTC/USDT", market="crypto",
                      timeframe="1m", skip_bad=True,
                      now=dt.datetime(2024, 2, 1, 11, 59, 30, tzinfo=dt.UTC))
    # 11:59 closes at 12:00, 30 s after now: inside the minute's tolerance
    assert (rep.inserted, rep.quarantined) == (2, 1)
    assert rep.bad_rows[0].row_number == 4 and "is in the future" in rep.bad_rows[0].reason


def test_parquet_times_after_2200_are_bad_rows(conn, tmp_path):
    for n, (col, kind) in enumerate([
            (pa.array([dt.datetime(3000, 1, 1)], pa.timestamp("us")), "naive"),
            (pa.array([dt.datetime(3000, 1, 1, tzinfo=dt.UTC)], pa.timestamp("us", "UTC")),
             "aware"),
            (pa.array([dt.date(3000, 1, 1)], pa.date32()), "date")]):
        path = tmp_path / f"y3000-{kind}.parquet"
        pq.write_table(pa.table({"time": col, **{c: [1.0] for c in
                                                 ("open", "high", "low", "close")}}), path)
        message = refused(conn, path, "1d")
        assert ("row 1 (first data row = row 1): time 3000-01-01 00:00:00 UTC is out of "
                "range (after the year 2200)") in message, (n, message)


# ------------------------------------------------------------------ times, types, numbers
def test_a_trailing_utc_or_gmt_is_read_as_utc(conn, tmp_path):
    text = (HEADER + ROW.format("2024-02-01 00:01:00 UTC") + ROW.format("2024-02-01 00:02 GMT")
            + ROW.format("2024-02-01 03:03:00 UTC+03:00"))
    rep = import_file(conn, write(tmp_path, text), symbol="BTC/USDT", market="crypto",
                      timeframe="1m", tz="America/New_York")
    assert rep.inserted == 3
    got = [r[0].isoformat() for r in conn.execute("SELECT ts FROM market.bars ORDER BY ts")]
    assert got == ["2024-02-01T00:01:00+00:00", "2024-02-01T00:02:00+00:00",
                   "2024-02-01T00:03:00+00:00"]
    path = tmp_path / "utc.parquet"
    pq.write_table(pa.table({"time": ["2024-02-01 00:05:00 UTC", "2024-02-01 00:06:00 UTC"],
                             **{c: ["1", "1"] for c in ("open", "high", "low", "close")}}),
                   path)
    assert import_file(conn, path, symbol="BTC/USDT", market="crypto",
                       timeframe="1m").inserted == 2


def test_times_in_other_forms_with_and_without_zones_are_rows_not_tracebacks(conn, tmp_path):
    # not ISO 8601 (so pandas guesses), one with an offset, one with a zone it cannot read
    text = (HEADER + ROW.format("02/01/2024 00:00") + ROW.format("02/01/2024 00:01 +00:00")
            + ROW.format("02/01/2024 00:02") + ROW.format("02/01/2024 00:03 EST"))
    rep = import_file(conn, write(tmp_path, text), symbol="BTC/USDT", market="crypto",
                      timeframe="1m", skip_bad=True)
    assert (rep.inserted, rep.quarantined) == (3, 1)
    assert rep.bad_rows[0].reason == "time '02/01/2024 00:03 EST' is not a date/time"


@pytest.mark.parametrize("column,says", [
    (pa.array([[1.0], [2.0]], pa.list_(pa.float64())), "has type list<element: double>"),
    (pa.array([{"a": 1}, {"a": 2}]), "has type struct<a: int64>"),
    (pa.array([b"\xff", b"\xfe"], pa.binary()), "has type binary that is not UTF-8 text"),
])
def test_parquet_columns_of_unusable_types_are_named(conn, tmp_path, column, says):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"time": ["2024-02-01T00:00:00Z", "2024-02-01T00:01:00Z"],
                             "open": column, **{c: [1.0, 1.0] for c in ("high", "low", "close")},
                             }), path)
    message = refused(conn, path)
    assert f"column 'open' (open) {says}: expected numbers, text or times" in message


def test_an_unusable_parquet_column_the_import_does_not_read_is_ignored(conn, tmp_path):
    path = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"time": ["2024-02-01T00:00:00Z"], "tags": [["a", "b"]],
                             **{c: [1.0] for c in ("open", "high", "low", "close")}}), path)
    assert import_file(conn, path, symbol="BTC/USDT", market="crypto",
                       timeframe="1m").inserted == 1


def test_a_number_of_millions_of_digits_is_a_bad_row(conn, tmp_path):
    text = GOOD + "2024-02-01T00:01:00Z," + "1" * (2 << 20) + ",101,99,100,1\n"
    message = refused(conn, write(tmp_path, text))
    assert ("line 3 (header = line 1): open '" + "1" * 40 + "...' is too long (2,097,152 "
            "characters; a number has at most 64)") in message
    tiny = GOOD + "2024-02-01T00:01:00Z,100,101,0." + "0" * 20000 + "1,100,1\n"
    assert "line 3 (header = line 1): low '0.0000" in refused(conn, write(tmp_path, tiny))


@pytest.mark.parametrize(("low", "says"), [
    ("1e-1000", "has an exponent below -99"),   # 0004_13: stored, 1,000 decimal places
    ("5E-100", "has an exponent below -99"),
    ("1E+100", "is out of range (10^18 or more)"),
])
def test_a_number_with_a_long_exponent_is_a_bad_row(conn, tmp_path, low, says):
    text = GOOD + f"2024-02-01T00:01:00Z,100,101,{low},100,1\n"
    assert (f"line 3 (header = line 1): low '{low}' {says}"
            in refused(conn, write(tmp_path, text)))


def test_a_value_the_database_refuses_names_its_line(conn, tmp_path, monkeypatch):
    # (the length bound keeps such values out; without it COPY refused them, naming
    # neither the file nor the line)
    monkeypatch.setattr(parse, "MAX_NUMBER_LENGTH", 10**6)
    text = GOOD + "2024-02-01T00:01:00Z,100,101,0." + "0" * 16400 + "1,100,1\n"
    message = refused(conn, write(tmp_path, text))
    assert "line 3 (header = line 1): low the database refuses the value: value " \
        "overflows numeric format; nothing was imported" in message, message


# ------------------------------------------------------------------ CSV structure
@pytest.mark.parametrize("content,says", [
    (GOOD + "2024-02-01T00:01:00Z,100,101,99,100,1,\x1b]0;pwned\x07\n",
     "line 3: 7 fields, but the header has 6: 2024-02-01T00:01:00Z,100,101,99,100,1,"
     "\\x1b]0;pwned\\x07"),
    (GOOD + "Thu, 01 Feb 2024 00:01:00 GMT,100,101,99,100.5,10\n",
     "line 3: 7 fields, but the header has 6: Thu, 01 Feb 2024"),
    (GOOD + "2024-02-01T00:01:00Z,1,2\n" + GOOD[len(HEADER):],
     "line 3: 3 fields, but the header has 6"),
    (GOOD + '"2024-02-01T00:01:00Z,100,101,99,100,1\n' + ROW.format("2024-02-01T00:02:00Z"),
     "line 3: 1 field, but the header has 6 (a quoted field runs across lines: a quote "
     "that is never closed?)"),
    (GOOD.encode() + b"2024-02-01T00:01:00Z,100,101,99,100,1\xff\n",
     "line 3: not UTF-8 text (byte b'\\xff' at character 38)"),
    ("timestamp,open,high,low,close,close,volume\n2024-02-01T00:01:00Z,100,101,99,100,2,1\n",
     "column 'close' appears twice in the header"),
    ("Date,Open,High,Low,Close,close\n2024-02-01,1,1,1,1,1\n",
     "column 'close' is the same as 'Close' in the header"),
])
def test_csv_structure_errors_name_the_line_and_escape_the_text(conn, tmp_path, content, says):
    message = refused(conn, write(tmp_path, content))
    assert says in message, message


def test_repeated_columns_the_import_does_not_read_are_no_problem(conn, tmp_path):
    text = "timestamp,x,open,high,low,close,volume,x\n2024-02-01T00:00:00Z,a,1,1,1,1,1,b\n"
    assert import_file(conn, write(tmp_path, text), symbol="BTC/USDT", market="crypto",
                       timeframe="1m").inserted == 1
    assert import_file(conn, write(tmp_path, text.replace("x", ""), "e.csv"),
                       symbol="BTC/USDT", market="crypto", timeframe="1m").unchanged == 1


def test_cli_import_errors_are_one_escaped_line(db_url, tmp_path):
    import os
    import subprocess
    import sys

    path = write(tmp_path, GOOD + "2024-02-01T00:01:00Z,100,101,99,100,1,\x1b]0;x\x07\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMATS_")},
           "MMATS_DATABASE_URL": db_url}
    result = subprocess.run(
        [sys.executable, "-c", "from api.cli import main; main()", "data", "import", str(path),
         "--symbol", "BTC/USDT", "--market", "crypto", "--timeframe", "1m"],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "\x1b" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "line 3: 7 fields" in result.stderr
