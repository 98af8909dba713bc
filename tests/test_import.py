"""Importing bar files: exact values, all-or-nothing, quarantine, idempotence."""

from __future__ import annotations

from pathlib import Path

import psycopg

from workers.ingest.importer import import_file

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
