"""Importing news sentiment (`mmats data news`): exact rows, all or nothing, idempotent,
one-line errors naming the line; the table's own checks for any other writer."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from workers.ingest.news import NewsImportError, import_news

REPO = Path(__file__).resolve().parent.parent
HEADER = "time,symbol,score,source,headline\n"
GOOD = (HEADER
        + "2024-01-02T10:00:00Z,BTC/USDT,0.75,vader,ETF inflows\n"
        + '2024-01-02 10:30,,-0.5,finbert,"Fed: ""higher for longer"""\n'
        + "2024-01-02T11:05:00+01:00,ETH/USDT,0,vader,\n")


@pytest.fixture
def market(conn: psycopg.Connection) -> psycopg.Connection:
    for symbol, venue in (("BTC/USDT", "binance"), ("ETH/USDT", "binance"),
                          ("SOL/USDT", "binance"), ("SOL/USDT", "kraken")):
        conn.execute(
            "INSERT INTO market.instruments (symbol, venue, market, base_currency,"
            " quote_currency, price_tick, quantity_step, min_quantity, calendar_id)"
            " VALUES (%s, %s, 'crypto', %s, 'USDT', 0.01, 0.0001, 0, 'CRYPTO_24X7')",
            (symbol, venue, symbol.split("/")[0]))
    return conn


def write(tmp_path: Path, text: str, name: str = "news.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8", newline="")
    return p


def stored(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT n.ts, i.symbol, n.score, n.source, n.headline, n.extra"
        " FROM market.news_sentiment n LEFT JOIN market.instruments i USING (instrument_id)"
        " ORDER BY n.ts, n.news_id").fetchall()


def test_a_file_is_stored_exactly_and_a_second_import_adds_nothing(market, tmp_path):
    path = write(tmp_path, GOOD)
    report = import_news(market, path)
    assert (report.rows_read, report.inserted) == (3, 3)
    assert stored(market) == [
        (datetime(2024, 1, 2, 10, 0, tzinfo=UTC), "BTC/USDT", Decimal("0.75"), "vader",
         "ETF inflows", {}),
        (datetime(2024, 1, 2, 10, 5, tzinfo=UTC), "ETH/USDT", Decimal("0"), "vader", "", {}),
        (datetime(2024, 1, 2, 10, 30, tzinfo=UTC), None, Decimal("-0.5"), "finbert",
         'Fed: "higher for longer"', {}),
    ]
    again = import_news(market, path)
    assert (again.rows_read, again.inserted) == (3, 0)
    assert "3 rows: 0 new, 3 already stored" in again.summary()
    assert len(stored(market)) == 3


def test_times_without_an_offset_are_read_in_tz_and_venue_picks_the_instrument(
        market, tmp_path):
    path = write(tmp_path, "published,ticker,sentiment,source,extra\n"
                           '2024-07-01 09:30,SOL/USDT,0.2,desk,"{""model"": ""v2""}"\n')
    import_news(market, path, tz="America/New_York", venue="kraken")
    ((ts, symbol, score, source, headline, extra),) = stored(market)
    assert ts == datetime(2024, 7, 1, 13, 30, tzinfo=UTC)
    assert (symbol, score, source, headline, extra) == (
        "SOL/USDT", Decimal("0.2"), "desk", "", {"model": "v2"})
    venue = market.execute("SELECT i.venue FROM market.news_sentiment n"
                           " JOIN market.instruments i USING (instrument_id)").fetchone()
    assert venue == ("kraken",)


def test_a_replay_session_s_copy_is_taken_only_where_its_venue_is_named(market, tmp_path):
    # every `mmats paper` copies its symbols onto venue replay<N>: a bare symbol was then
    # "on several venues (binance, replay1)"
    market.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES ('BTC/USDT', 'replay1', 'crypto', 'BTC', 'USDT', 0.01, 0.0001, 0, 'CRYPTO_24X7')")
    import_news(market, write(tmp_path, "ts,symbol,score,source\n1704192300,BTC/USDT,0.1,x\n"))
    import_news(market, write(tmp_path, "ts,symbol,score,source\n1704192300,BTC/USDT,0.2,x\n",
                              "copy.csv"), venue="replay1")
    venues = market.execute("SELECT i.venue, n.score FROM market.news_sentiment n JOIN"
                            " market.instruments i USING (instrument_id) ORDER BY 2").fetchall()
    assert venues == [("binance", Decimal("0.1")), ("replay1", Decimal("0.2"))]


def test_epoch_seconds(market, tmp_path):
    import_news(market, write(tmp_path, "ts,score,source\n1704192300,0.1,x\n"))
    assert stored(market)[0][0] == datetime(2024, 1, 2, 10, 45, tzinfo=UTC)


def test_a_gzipped_file_with_a_bom_and_crlf(market, tmp_path):
    p = tmp_path / "news.csv.gz"
    p.write_bytes(gzip.compress(("\ufeff" + GOOD).replace("\n", "\r\n").encode()))
    assert import_news(market, p).inserted == 3


@pytest.mark.parametrize("row, says", [
    ("2024-01-02T10:00:00Z,BTC/USDT,NaN,vader,x",
     "line 3: score 'NaN' is not a number from -1 to 1"),
    ("2024-01-02T10:00:00Z,BTC/USDT,1.5,vader,x",
     "line 3: score '1.5' is not a number from -1 to 1"),
    ("2024-01-02T10:00:00Z,BTC/USDT,high,vader,x", "line 3: score 'high' is not a number"),
    ("2024-01-02T10:00:00Z,DOGE/USDT,0.1,vader,x", "line 3: unknown symbol 'DOGE/USDT'"),
    ("2024-01-02T10:00:00Z,SOL/USDT,0.1,vader,x",
     "line 3: symbol 'SOL/USDT' is on several venues (binance, kraken)"),
    ("2024-01-02T10:00:00Z,BTC/USDT,0.1,,x", "line 3: source '' must be 1-100 characters"),
    ("2024-01-02T10:00:00Z,BTC/USDT,0.1,vader,\"two\nlines\"",
     "line 4: headline 'two\\nlines' must be at most 500 characters without control"),
    ("2024-01-02T10:00:00Z,BTC/USDT,0.1,vader," + "h" * 501, "must be at most 500 characters"),
    ("yesterday,BTC/USDT,0.1,vader,x", "line 3: time 'yesterday' is not a date/time"),
    ("1900-01-01T00:00:00Z,BTC/USDT,0.1,vader,x", "line 3: time 1900-01-01T00:00:00+00:00 is out"),
    ("2024-01-02T10:00:00Z,BTC/USDT,0.1,vader", "line 3: 4 fields, the header has 5"),
])
def test_one_bad_row_refuses_the_file_with_one_line_naming_it(market, tmp_path, row, says):
    path = write(tmp_path, HEADER + "2024-01-02T09:00:00Z,BTC/USDT,0.5,vader,fine\n"
                 + row + "\n")
    with pytest.raises(NewsImportError) as err:
        import_news(market, path)
    message = str(err.value)
    assert says in message, message
    assert "\n" not in message and message.endswith("nothing was imported")
    assert stored(market) == []  # the good row was not written either


@pytest.mark.parametrize("text, says", [
    ("", "the file is empty"),
    ("when,score,source\n2024-01-02,0.1,x\n", "unknown column 'when'"),
    ("time,score\n2024-01-02,0.1\n", "no source column"),
    ("time,ts,score,source\n", "columns 'time' and 'ts' both give the time"),
])
def test_a_file_that_is_not_news_is_refused(market, tmp_path, text, says):
    with pytest.raises(NewsImportError) as err:
        import_news(market, write(tmp_path, text))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_file_that_is_not_utf8_names_its_line(market, tmp_path):
    p = tmp_path / "news.csv"
    p.write_bytes(HEADER.encode() + b"2024-01-02T10:00:00Z,BTC/USDT,0.1,vader,caf\xe9\n")
    with pytest.raises(NewsImportError, match="line 2 is not UTF-8 text"):
        import_news(market, p)


@pytest.mark.parametrize("column, value, constraint", [
    ("score", "'NaN'", "news_sentiment_score_range"),
    ("score", "-1.01", "news_sentiment_score_range"),
    ("source", "'a\tb'", "news_sentiment_source_format"),
    ("source", "' padded'", "news_sentiment_source_format"),
    ("extra", "'[1]'", "news_sentiment_extra_object"),
])
def test_the_table_refuses_what_the_importer_refuses(conn, column, value, constraint):
    values = {"score": "0", "source": "'x'", "extra": "'{}'"} | {column: value}
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        conn.execute("INSERT INTO market.news_sentiment (ts, score, source, extra) VALUES "
                     f"(now(), {values['score']}, {values['source']}, {values['extra']})")


def test_the_cli_prints_one_line_and_exits_1_on_a_bad_file(market, db_url, tmp_path):
    bad = write(tmp_path, HEADER + "2024-01-02T10:00:00Z,BTC/USDT,2,vader,x\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMATS_")}
    env["MMATS_DATABASE_URL"] = db_url
    result = subprocess.run([sys.executable, "-c", "from api.cli import main; main()",
                             "data", "news", str(bad)], env=env, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot import")
    good = subprocess.run([sys.executable, "-c", "from api.cli import main; main()",
                           "data", "news", str(write(tmp_path, GOOD, "good.csv"))], env=env,
                          capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=REPO)
    assert good.returncode == 0, good.stderr
    assert "3 rows: 3 new, 0 already stored" in good.stdout


def test_the_same_item_with_another_score_is_refused_not_dropped(market, tmp_path):
    # same time, symbol, source and headline: the second score was dropped in silence
    # ("1 new, 1 already stored"), within a file and against what is stored
    with pytest.raises(NewsImportError, match="line 3: the item of line 2 again .* "
                                              r"\(0.1 against 0.9\); nothing was imported"):
        import_news(market, write(tmp_path, "ts,symbol,score,source\n"
                                            "1704192300,BTC/USDT,0.1,x\n1704192300,BTC/USDT,0.9,x\n"))
    assert stored(market) == []
    import_news(market, write(tmp_path, "ts,symbol,score,source\n1704192300,BTC/USDT,0.5,x\n"))
    again = write(tmp_path, "ts,symbol,score,source\n1704192400,BTC/USDT,0.2,x\n"
                            "1704192300,BTC/USDT,-0.9,x\n", "again.csv")
    with pytest.raises(NewsImportError, match=r"line 3: this item is stored already with "
                                              r"another score or extra \(0.5 against -0.9\)"):
        import_news(market, again)
    assert [r[2] for r in stored(market)] == [Decimal("0.5")]  # the good row not written
    same = write(tmp_path, "ts,symbol,score,source\n1704192300,BTC/USDT,0.50,x\n", "same.csv")
    assert import_news(market, same).inserted == 0  # the same item again: nothing to do
