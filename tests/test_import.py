"""Importing bar files: exact values, all-or-nothing, quarantine, idempotence."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.errors import MmatsError
from workers.ingest.importer import ImportRefused, import_file

HEADER = "Date,Open,High,Low,Close,Volume\n"
GOOD = (HEADER + "2024-01-02,10.5,11.25,10.0,11.0,1000\n"
        "2024-01-03,11.0,12.0,10.75,11.5,1200\n"
        "2024-01-04,11.5,11.5,11.0,11.125,900\n")


def write(tmp_path: Path, text: str, name: str = "bars.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def counts(conn: psycopg.Connection) -> tuple[int, int, int, int]:
    return tuple(conn.execute(  # type: ignore[return-value]
        "SELECT (SELECT count(*) FROM market.bars), (SELECT count(*) FROM market.imports),"
        " (SELECT count(*) FROM market.bar_quarantine),"
        " (SELECT count(*) FROM market.instruments)").fetchone())


def bars(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT ts, open, high, low, close, volume FROM market.bars "
                        "ORDER BY ts").fetchall()


def test_good_csv_imports_exact_values(conn, tmp_path):
    rep = import_file(conn, write(tmp_path, GOOD), symbol="aapl", market="stock",
                      timeframe="1d")
    assert (rep.rows_read, rep.inserted, rep.unchanged, rep.quarantined) == (3, 3, 0, 0)
    assert rep.symbol == "AAPL" and rep.venue == "us"
    rows = bars(conn)
    assert [str(r[4]) for r in rows] == ["11.0", "11.5", "11.125"]
    assert rows[0][0].isoformat() == "2024-01-02T00:00:00+00:00"
    inst = conn.execute("SELECT base_currency, quote_currency, calendar_id, market::text "
                        "FROM market.instruments").fetchone()
    assert inst == ("AAPL", "USD", "XNYS", "stock")
    assert conn.execute("SELECT count(*) FROM audit.events WHERE event_type = 'data.import'"
                        ).fetchone()[0] == 1


def test_parquet_float_decimal_and_timestamp_columns(conn, tmp_path):
    import datetime as dt
    from decimal import Decimal as D

    t = pa.table({
        "Open Time": pa.array([dt.datetime(2024, 1, 1, 0, 0), dt.datetime(2024, 1, 1, 0, 1)],
                              pa.timestamp("ms")),
        "o": pa.array([0.1, 0.30000000000000004]),
        "h": pa.array([D("0.2000"), D("0.4000")], pa.decimal128(10, 4)),
        "l": pa.array([0.1, 0.3]),
        "c": pa.array([0.15, 0.35]),
        "v": pa.array([10, 0], pa.int64()),
    })
    path = tmp_path / "x.parquet"
    pq.write_table(t, path)
    rep = import_file(conn, path, symbol="ETH/USDT", market="crypto", timeframe="1m")
    assert rep.inserted == 2 and rep.row_label == "row"
    rows = bars(conn)
    assert [str(v) for v in rows[0][1:]] == ["0.1", "0.2000", "0.1", "0.15", "10"]
    assert str(rows[1][1]) == "0.30000000000000004"


@pytest.mark.parametrize("header,row", [
    ("TIMESTAMP,OPEN,HIGH,LOW,CLOSE,VOLUME", "2024-01-02T00:00:00Z,1,2,1,2,5"),
    ("time,o,h,l,c,v", "2024-01-02 00:00:00,1,2,1,2,5"),
    ("Open time,Open,High,Low,Close,Volume", "1704153600000,1,2,1,2,5"),
    ("datetime,open,high,low,close,adj close,volume", "1704153600,1,2,1,2,99,5"),
    # Binance's kline files are in microseconds since 2025; nanoseconds elsewhere
    ("open_time,open,high,low,close,volume", "1704153600000000,1,2,1,2,5"),
    ("ts,open,high,low,close,volume", "1704153600000000000,1,2,1,2,5"),
    (" Date ,Open,High,Low,Close", "2024-01-02,1,2,1,2"),
    ("date_time,Open,High,Low,Close,Vol", "2024-01-01T19:00:00-05:00,1,2,1,2,5"),
])
def test_column_spellings_case_and_time_formats(conn, tmp_path, header, row):
    rep = import_file(conn, write(tmp_path, f"{header}\n{row}\n"), symbol="BTCUSDT",
                      market="crypto", timeframe="1d")
    assert rep.inserted == 1
    ts, o, h, _low, c, v = bars(conn)[0]
    assert ts.isoformat() == "2024-01-02T00:00:00+00:00"
    assert (o, h, c) == (1, 2, 2)
    assert v == (5 if "vol" in header.lower() or header.endswith(",v") else 0)
    assert conn.execute("SELECT base_currency, quote_currency FROM market.instruments"
                        ).fetchone() == ("BTC", "USDT")


def test_naive_times_read_in_zone_across_dst(conn, tmp_path):
    text = ("Datetime,Open,High,Low,Close,Volume\n"
            "2024-03-08 09:30,1,1,1,1,1\n"  # EST, UTC-5
            "2024-03-11 09:30,1,1,1,1,1\n"  # EDT, UTC-4
            "2024-11-03 01:30,1,1,1,1,1\n"  # ambiguous, first (EDT)
            "2024-11-03 01:30,1,1,1,1,2\n")  # ambiguous, second (EST)
    rep = import_file(conn, write(tmp_path, text), symbol="IBM", market="stock",
                      timeframe="1m", tz="America/New_York")
    assert rep.inserted == 4
    got = [r[0].astimezone(__import__("datetime").UTC).strftime("%Y-%m-%d %H:%M")
           for r in bars(conn)]
    assert got == ["2024-03-08 14:30", "2024-03-11 13:30", "2024-11-03 05:30",
                   "2024-11-03 06:30"]


def test_nonexistent_local_time_is_a_bad_row(conn, tmp_path):
    text = HEADER + "2024-03-10 01:59,1,1,1,1,1\n2024-03-10 02:30,1,1,1,1,1\n"
    with pytest.raises(ImportRefused, match=r"line 3 .*02:30 does not exist or is ambig"):
        import_file(conn, write(tmp_path, text), symbol="IBM", market="stock",
                    timeframe="1m", tz="America/New_York")
    assert counts(conn) == (0, 0, 0, 0)


@pytest.mark.parametrize("tz", ["Mars/Olympus", "../../etc/passwd", "", "UTC; DROP"])
def test_invalid_zone_is_refused(conn, tmp_path, tz):
    with pytest.raises(MmatsError, match="unknown time zone"):
        import_file(conn, write(tmp_path, GOOD), symbol="IBM", market="stock",
                    timeframe="1d", tz=tz)
    assert counts(conn) == (0, 0, 0, 0)


BAD_ROWS = [
    ("not-a-date,1,1,1,1,1", "time 'not-a-date' is not a date/time"),
    (",1,1,1,1,1", "time is empty"),
    ("2024-01-09,,1,1,1,1", "open is empty"),
    ("2024-01-09,abc,1,1,1,1", "open 'abc' is not a number"),
    ("2024-01-09,NaN,1,1,1,1", "open is NaN (not a finite number)"),
    ("2024-01-09,1,inf,1,1,1", "high is inf (not a finite number)"),
    ("2024-01-09,1,1,-1,1,1", "low -1 is not positive"),
    ("2024-01-09,0,1,1,1,1", "open 0 is not positive"),
    ("2024-01-09,0.0,1,1,1,1", "open 0.0 is not positive"),
    ("2024-01-09,1,1,1,1,-5", "volume -5 is negative"),
    ("2024-01-09,1,1,2,1,1", "high 1 is below low 2"),
    ("2024-01-09,1.5,1.4,1,1,1", "high 1.4 is below open 1.5"),
    ("2024-01-09,1,1.4,1,1.5,1", "high 1.4 is below close 1.5"),
    ("2024-01-09,1,2,1.5,1.6,1", "low 1.5 is above open 1"),
    ("2024-01-09,1.6,2,1.5,1.4,1", "low 1.5 is above close 1.4"),
    ("2024-01-09,1,1.00000000000000000001,1,1.00000000000000000002,1",
     "high 1.00000000000000000001 is below close 1.00000000000000000002"),
    ("2024-01-03,11.0,12.0,10.75,11.51,1200",
     "time 2024-01-03 00:00:00 UTC appears again with different values (first at line 3)"),
    # numbers no market has (a unit or parsing slip upstream), which sizing would act on
    ("2024-01-09,1,1e400,1,1,1", "high '1e400' is out of range (10^18 or more)"),
    ("2024-01-09,1,1,1,1,1000000000000000000", "volume '1000000000000000000' is out of "
     "range (10^18 or more)"),
    # a daily bar opens at midnight UTC or New York, or at 17:00 New York
    ("2024-01-09 13:00,1,1,1,1,1", "time 2024-01-09 13:00 UTC is not aligned to 1d (a 1d "
     "bar opens at midnight UTC or New York, or 17:00 New York)"),
]


def test_each_bad_row_refuses_the_whole_file(conn, tmp_path):
    # one database for all reasons (a clone per case would dominate the run time)
    for n, (row, reason) in enumerate(BAD_ROWS):
        path = write(tmp_path, GOOD + row + "\n", f"bad{n}.csv")
        with pytest.raises(ImportRefused) as err:
            import_file(conn, path, symbol="AAPL", market="stock", timeframe="1d")
        msg = str(err.value)
        assert "\n" not in msg
        assert f"line 5 (header = line 1): {reason}" in msg, msg
        assert str(path) in msg and "nothing was imported" in msg
        assert counts(conn) == (0, 0, 0, 0)


def test_an_epoch_time_beyond_any_unit_is_a_bad_row(conn, tmp_path):
    # read as milliseconds like the column's other times, it is after the year 2200 (it
    # reached COPY and failed there with a bare database error)
    text = ("open_time,open,high,low,close,volume\n1704153600000,1,2,1,2,5\n"
            "1704240000000,1,2,1,2,5\n9999999999999999,1,2,1,2,5\n")
    with pytest.raises(ImportRefused, match=r"line 4 \(header = line 1\): time "
                       r"'9999999999999999' is out of range \(after the year 2200 in milliseconds, "
                       r"the column's unit\)"):
        import_file(conn, write(tmp_path, text), symbol="BTC/USDT", market="crypto",
                    timeframe="1d")
    assert counts(conn) == (0, 0, 0, 0)


def test_an_intraday_time_off_its_timeframe_is_a_bad_row(conn, tmp_path):
    """The live ingest's rule: a 5m bar opens on a multiple of five minutes from midnight
    UTC. A file with a bar at 10:02 (or 10:05:30) held two bars in one period."""
    text = ("ts,open,high,low,close,volume\n2024-01-09T10:00:00Z,1,1,1,1,1\n"
            "2024-01-09T10:02:00Z,1,1,1,1,1\n2024-01-09T10:05:30Z,1,1,1,1,1\n"
            "2024-01-09T10:10:00+00:00,1,1,1,1,1\n")
    with pytest.raises(ImportRefused, match=r"line 3 \(header = line 1\): time "
                       r"2024-01-09 10:02 UTC is not aligned to 5m \(120s past the boundary"
                       r"\) \(1 more bad rows\)"):
        import_file(conn, write(tmp_path, text), symbol="BTC/USDT", market="crypto",
                    timeframe="5m")
    assert counts(conn) == (0, 0, 0, 0)
    rep = import_file(conn, write(tmp_path, text), symbol="BTC/USDT", market="crypto",
                      timeframe="5m", skip_bad=True)
    assert [(b.row_number, b.reason) for b in rep.bad_rows] == [
        (3, "time 2024-01-09 10:02 UTC is not aligned to 5m (120s past the boundary)"),
        (4, "time 2024-01-09 10:05:30 UTC is not aligned to 5m (30s past the boundary)")]
    assert [r[0].isoformat() for r in bars(conn)] == ["2024-01-09T10:00:00+00:00",
                                                      "2024-01-09T10:10:00+00:00"]


def test_more_bad_rows_are_counted(conn, tmp_path):
    text = GOOD + "".join(r + "\n" for r, _ in BAD_ROWS[:4])
    with pytest.raises(ImportRefused, match=r"line 5 .*\(3 more bad rows\)"):
        import_file(conn, write(tmp_path, text), symbol="AAPL", market="stock",
                    timeframe="1d")
    assert counts(conn) == (0, 0, 0, 0)


def test_skip_bad_imports_good_rows_and_quarantines_bad(conn, tmp_path):
    text = GOOD + "2024-01-05,1,1,2,1,1\n\n2024-01-08,1,1,1,1,-5\n2024-01-09,1,2,1,2,3\n"
    rep = import_file(conn, write(tmp_path, text), symbol="AAPL", market="stock",
                      timeframe="1d", skip_bad=True)
    assert (rep.rows_read, rep.inserted, rep.quarantined) == (6, 4, 2)
    assert [(b.row_number, b.reason) for b in rep.bad_rows] == [
        (5, "high 1 is below low 2"), (7, "volume -5 is negative")]
    q = conn.execute("SELECT import_id, row_number, raw, reason FROM market.bar_quarantine "
                     "ORDER BY row_number").fetchall()
    assert [(r[0], r[1]) for r in q] == [(rep.import_id, 5), (rep.import_id, 7)]
    assert q[0][2] == {"Date": "2024-01-05", "Open": "1", "High": "1", "Low": "2",
                       "Close": "1", "Volume": "1"}
    imp = conn.execute("SELECT rows_read, rows_inserted, rows_unchanged, rows_quarantined "
                       "FROM market.imports").fetchone()
    assert imp == (6, 4, 0, 2)


def test_reimport_changes_nothing(conn, tmp_path):
    path = write(tmp_path, GOOD + GOOD.splitlines()[1] + "\n")  # plus an exact duplicate row
    first = import_file(conn, path, symbol="AAPL", market="stock", timeframe="1d")
    assert (first.inserted, first.unchanged) == (3, 1)
    before = bars(conn)
    audit_before = conn.execute("SELECT count(*) FROM audit.events").fetchone()
    again = import_file(conn, path, symbol="AAPL", market="stock", timeframe="1d")
    assert (again.inserted, again.unchanged, again.quarantined) == (0, 4, 0)
    assert again.import_id is None
    assert "nothing changed" in again.summary()
    assert bars(conn) == before
    # no new row anywhere: not the bars, not an import record, not an audit event
    assert counts(conn) == (3, 1, 0, 1)
    assert conn.execute("SELECT count(*) FROM audit.events").fetchone() == audit_before


def test_conflicting_reimport_is_refused(conn, tmp_path):
    import_file(conn, write(tmp_path, GOOD), symbol="AAPL", market="stock", timeframe="1d")
    changed = GOOD.replace("11.0,12.0,10.75,11.5", "11.0,12.0,10.75,11.50001")
    path = write(tmp_path, changed + "2024-01-05,1,1,1,1,1\n", "changed.csv")
    with pytest.raises(ImportRefused, match=r"line 3 .*2024-01-03 00:00:00 UTC is already "
                                            r"stored with different values"):
        import_file(conn, path, symbol="AAPL", market="stock", timeframe="1d")
    assert counts(conn) == (3, 1, 0, 1)
    rep = import_file(conn, path, symbol="AAPL", market="stock", timeframe="1d", skip_bad=True)
    assert (rep.inserted, rep.unchanged, rep.quarantined) == (1, 2, 1)
    assert str(bars(conn)[1][4]) == "11.5"


HOSTILE_SYMBOLS = ["AAPL'; DROP TABLE market.bars; --", "ÄPFEL", "A" * 41, "", " ",
                   "BTC\nUSDT", "X\x00Y", "$(rm -rf /)", "🚀MOON", "BTC/US'DT", "XYZ"]
HOSTILE_VENUES = ["Bin ance", "x'; --", "ü", "a" * 33, "/etc", "A\nB"]


def test_hostile_symbols_and_venues_are_refused(conn, tmp_path):
    path = write(tmp_path, GOOD)
    for symbol in HOSTILE_SYMBOLS:
        with pytest.raises(MmatsError) as err:
            import_file(conn, path, symbol=symbol, market="crypto", timeframe="1d")
        assert "\n" not in str(err.value), symbol
    for venue in HOSTILE_VENUES:
        with pytest.raises(MmatsError, match="invalid venue") as err:
            import_file(conn, path, symbol="AAPL", market="stock", timeframe="1d", venue=venue)
        assert "\n" not in str(err.value), venue
    assert counts(conn) == (0, 0, 0, 0)


def test_hostile_file_name_is_stored_as_is(conn, tmp_path):
    name = "we'ird; DROP TABLE x; -- ü \"q\".csv"
    rep = import_file(conn, write(tmp_path, GOOD, name), symbol="brk.b", market="stock",
                      timeframe="1d")
    assert rep.symbol == "BRK.B"
    stored = conn.execute("SELECT file_name FROM market.imports").fetchone()[0]
    assert stored == str(tmp_path / name)
    assert conn.execute("SELECT base_currency FROM market.instruments").fetchone() == ("BRKB",)


@pytest.mark.parametrize("content,expected", [
    ("", "the file is empty"),
    ("\n\n", "the file is empty"),
    (HEADER, "no data rows"),
    ("Date,Open,Close\n2024-01-02,1,1\n",
     "missing column(s) high, low (found: 'Date', 'Open', 'Close')"),
    ("foo;bar\n1;2\n", "missing column(s) time, open, high, low, close (found: 'foo;bar')"),
    ("Date,Open,High,Low,Close\n2024-01-02,1,1,1\n", "as CSV"),
])
def test_unusable_files(conn, tmp_path, content, expected):
    with pytest.raises(MmatsError) as err:
        import_file(conn, write(tmp_path, content), symbol="AAPL", market="stock",
                    timeframe="1d")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert counts(conn) == (0, 0, 0, 0)


def test_binary_garbage_and_truncated_files(conn, tmp_path):
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 40)
    bad_gz = tmp_path / "bad.csv.gz"
    bad_gz.write_bytes(b"\x1f\x8b\x08\x00garbage")
    good = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"date": ["2024-01-02"], "open": [1.0], "high": [1.0],
                             "low": [1.0], "close": [1.0]}), good)
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(good.read_bytes()[:-20])
    for path in (garbage, bad_gz, truncated, tmp_path / "missing.csv", tmp_path / "x.xlsx"):
        if path.suffix == ".xlsx":
            path.write_text("x")
        with pytest.raises(MmatsError) as err:
            import_file(conn, path, symbol="AAPL", market="stock", timeframe="1d")
        assert "\n" not in str(err.value)
    assert counts(conn) == (0, 0, 0, 0)


def test_gzip_csv(conn, tmp_path):
    path = tmp_path / "bars.csv.gz"
    path.write_bytes(gzip.compress(GOOD.encode()))
    assert import_file(conn, path, symbol="AAPL", market="stock", timeframe="1d").inserted == 3


@pytest.mark.parametrize("kwargs,expected", [
    ({"market": "bonds", "timeframe": "1d"}, "unknown market 'bonds'"),
    ({"market": "stock", "timeframe": "2d"}, "unknown timeframe '2d'"),
])
def test_unknown_market_or_timeframe(conn, tmp_path, kwargs, expected):
    with pytest.raises(MmatsError, match=expected):
        import_file(conn, write(tmp_path, GOOD), symbol="AAPL", **kwargs)


def test_instrument_of_another_market_is_refused(conn, tmp_path):
    path = write(tmp_path, GOOD)
    import_file(conn, path, symbol="EURUSD", market="forex", timeframe="1d")
    assert conn.execute("SELECT venue, base_currency, quote_currency, calendar_id "
                        "FROM market.instruments").fetchone() == ("fx", "EUR", "USD", "FX_24X5")
    with pytest.raises(MmatsError, match="already stored as a forex instrument"):
        import_file(conn, path, symbol="EURUSD", market="crypto", timeframe="1d")
    with pytest.raises(MmatsError, match="already exists as a forex instrument"):
        import_file(conn, path, symbol="EURUSD", market="crypto", venue="fx", timeframe="1d")


def test_one_minute_import_refreshes_aggregates(conn, tmp_path):
    text = "timestamp,open,high,low,close,volume\n" + "".join(
        f"2024-01-01T00:0{i}:00Z,1,2,1,{1 + i / 10},{i}\n" for i in range(5))
    import_file(conn, write(tmp_path, text), symbol="BTC/USDT", market="crypto",
                timeframe="1m")
    row = conn.execute("SELECT open, high, low, close, volume, bar_count FROM market.bars_5m"
                       ).fetchone()
    assert row == (1, 2, 1, Decimal("1.4"), 10, 5)


# ------------------------------------------------------------------------- CLI
def run_cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", *args],
                          env={**os.environ, "MMATS_DATABASE_URL": db_url},
                          capture_output=True, text=True, timeout=120)


def test_cli_import_list_and_errors(db_url, tmp_path):
    good = write(tmp_path, GOOD)
    r = run_cli(db_url, "data", "import", str(good), "--symbol", "AAPL", "--market", "stock",
                "--timeframe", "1d")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("imported ") and "3 inserted" in r.stdout

    bad = write(tmp_path, GOOD + "2024-01-09,1,1,2,1,1\n", "bad.csv")
    r = run_cli(db_url, "data", "import", str(bad), "--symbol", "AAPL", "--market", "stock",
                "--timeframe", "1d")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "line 5" in r.stderr and "Traceback" not in r.stderr

    r = run_cli(db_url, "data", "import", str(bad), "--symbol", "AAPL", "--market", "stock",
                "--timeframe", "1d", "--skip-bad")
    assert r.returncode == 0, r.stderr
    assert "1 quarantined" in r.stdout and "line 5: high 1 is below low 2" in r.stdout

    r = run_cli(db_url, "data", "import", str(tmp_path / "nope.csv"), "--symbol", "AAPL",
                "--market", "stock", "--timeframe", "1d")
    assert r.returncode == 1 and r.stderr.startswith("error: file not found")
    assert r.stderr.count("\n") == 1

    r = run_cli(db_url, "data", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["symbol", "venue", "market", "timeframe", "first", "(UTC)",
                                "last", "(UTC)", "rows"]
    assert lines[2].split() == ["AAPL", "us", "stock", "1d", "2024-01-02", "00:00",
                                "2024-01-04", "00:00", "3"]
    assert len({len(line) for line in lines[:3]}) == 1  # aligned

    r = run_cli(db_url, "data", "gaps", "--symbol", "AAPL")
    assert r.returncode == 0, r.stderr
    assert "0 missing" in r.stdout
    assert r.stdout.rstrip().endswith("total: 0 missing bars in 1 series")

    # a venue of the form replay<N> is a paper session's: not imported into
    r = run_cli(db_url, "data", "import", str(good), "--symbol", "AAPL", "--market", "stock",
                "--timeframe", "1d", "--venue", "replay7")
    assert r.returncode == 1 and r.stderr.startswith(
        "error: venue 'replay7' is the form of a paper replay session's copies"), r.stderr
    # the copies paper replay sessions make are counted, not listed
    with psycopg.connect(db_url, autocommit=True) as conn:
        for venue in ("replay7", "replay12"):
            conn.execute("INSERT INTO market.instruments (symbol, venue, market, base_currency,"
                         " quote_currency, price_tick, quantity_step, min_quantity, calendar_id)"
                         " SELECT symbol, %s, market, base_currency, quote_currency, price_tick,"
                         " quantity_step, min_quantity, calendar_id FROM market.instruments"
                         " WHERE venue = 'us'", (venue,))
            conn.execute("INSERT INTO market.bars SELECT i.instrument_id, b.timeframe, b.ts,"
                         " b.open, b.high, b.low, b.close, b.volume FROM market.bars b"
                         " JOIN market.instruments s USING (instrument_id),"
                         " market.instruments i WHERE s.venue = 'us' AND i.venue = %s",
                         (venue,))
    r = run_cli(db_url, "data", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines[2:-1]] == [["AAPL", "us"]]
    assert lines[-1] == ("(2 series of paper sessions' replay copies (venue replay<N>) not "
                         "shown: `mmats data list --replays` lists them)")
    r = run_cli(db_url, "data", "list", "--replays")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split()[1] for line in r.stdout.splitlines()[2:]) == [
        "replay12", "replay7", "us"]


# ------------------------------------------------------------------------- properties
price = st.decimals(min_value=Decimal("0.00000001"), max_value=Decimal("99999999"),
                    places=8, allow_nan=False, allow_infinity=False)


@st.composite
def bar_rows(draw):
    n = draw(st.integers(1, 20))
    rows = []
    for i in range(n):
        o, c, extra_h, extra_l = (draw(price) for _ in range(4))
        high = max(o, c) + extra_h
        low = max(min(o, c) - extra_l, min(o, c) / 2)
        vol = draw(st.decimals(min_value=0, max_value=10**12, places=draw(st.integers(0, 6)),
                               allow_nan=False, allow_infinity=False))
        rows.append((i, o, high, low, c, vol))
    return rows


_counter = iter(range(10**9))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=bar_rows(), parquet=st.booleans())
def test_any_valid_file_round_trips_exactly(conn, tmp_path, rows, parquet):
    symbol = f"P{next(_counter)}/USDT"
    frame = pd.DataFrame({
        "timestamp": [f"2024-01-01T00:{i:02d}:00Z" for i, *_ in rows],
        **{k: [str(r[j + 1]) for r in rows]
           for j, k in enumerate(("open", "high", "low", "close", "volume"))}})
    if parquet:
        path = tmp_path / f"{symbol.replace('/', '-')}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    else:
        path = tmp_path / f"{symbol.replace('/', '-')}.csv"
        frame.to_csv(path, index=False)
    rep = import_file(conn, path, symbol=symbol, market="crypto", timeframe="1m")
    assert rep.inserted == len(rows)
    got = conn.execute(
        "SELECT open, high, low, close, volume FROM market.bars WHERE instrument_id = %s "
        "ORDER BY ts", (rep.instrument_id,)).fetchall()
    assert got == [tuple(r[1:]) for r in rows]


def test_one_letter_stock_ticker(conn, tmp_path):
    # Ford trades as F: the base "currency" of a stock is its ticker
    rep = import_file(conn, write(tmp_path, GOOD), symbol="F", market="stock", timeframe="1d")
    assert rep.inserted == 3
    assert conn.execute("SELECT symbol, base_currency, quote_currency FROM market.instruments"
                        ).fetchone() == ("F", "F", "USD")
