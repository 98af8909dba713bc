"""Import news sentiment from a CSV file into market.news_sentiment (all or nothing).

Columns (a header row; names are case-insensitive, in any order):

    time      when the news was published (ISO 8601; without an offset it is read in
              `--tz`; or epoch seconds / milliseconds), also `ts`, `timestamp`, `published`
    score     the sentiment, -1 (bearish) to 1 (bullish), also `sentiment`
    source    who scored it (1-100 characters)
    symbol    the instrument it is about; empty: the whole market (optional column)
    venue     the symbol's venue when it is on several (optional; `--venue` for all rows)
    headline  up to 500 characters (optional)
    extra     a JSON object (optional)

Every row is checked before anything is written: one bad row refuses the file, naming its
line and the problem. Importing the same item again (source, instrument, time, headline)
adds nothing, so a file can be imported twice.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
from psycopg.types.json import Jsonb

from db.errors import MmatsError
from db.numbers import parse_number
from db.structured import json_values, loads_json
from workers.ingest.instruments import shown
from workers.ingest.parse import _zone, parse_times

_ALIASES = {
    "time": ("time", "ts", "timestamp", "datetime", "date", "published", "published_at"),
    "score": ("score", "sentiment", "sentiment_score"),
    "source": ("source",),
    "symbol": ("symbol", "ticker"),
    "venue": ("venue", "exchange"),
    "headline": ("headline", "title"),
    "extra": ("extra",),
}
_REQUIRED = ("time", "score", "source")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_REPLAY_VENUE = re.compile(r"replay[0-9]+")  # a replay session's copy of instruments
MAX_SOURCE = 100
MAX_HEADLINE = 500


class NewsImportError(MmatsError):
    """A news file that cannot be imported; nothing was written."""


@dataclass(frozen=True)
class NewsReport:
    file: str
    rows_read: int
    inserted: int
    first_ts: datetime | None
    last_ts: datetime | None

    def summary(self) -> str:
        span = ("" if self.first_ts is None else
                f" ({self.first_ts:%Y-%m-%d %H:%M} .. {self.last_ts:%Y-%m-%d %H:%M} UTC)")
        return (f"news {self.file}: {self.rows_read} rows: {self.inserted} new, "
                f"{self.rows_read - self.inserted} already stored{span}")


@dataclass(frozen=True)
class _Row:
    line: int
    cells: dict[str, str]


def _read(path: Path) -> tuple[dict[str, str], list[_Row]]:
    """The header's mapping (our name -> the file's) and the data rows with their lines."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise NewsImportError(f"cannot read {shown(str(path), 300)}: {exc.strerror}") from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise NewsImportError(f"cannot read {shown(str(path), 300)}: not a valid gzip "
                                  f"file ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise NewsImportError(f"cannot read {shown(str(path), 300)}: line {line} is not "
                              "UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise NewsImportError(f"cannot import {shown(str(path), 300)}: the file is empty "
                                  "(expected a header row: time,score,source,...)")
        names = [h.strip().lower() for h in header]
        mapping: dict[str, str] = {}
        for name in names:
            ours = next((k for k, al in _ALIASES.items() if name in al), None)
            if ours is None:
                raise NewsImportError(
                    f"cannot import {shown(str(path), 300)}: unknown column {shown(name)} "
                    f"(expected {', '.join(_ALIASES)})")
            if ours in mapping:
                raise NewsImportError(f"cannot import {shown(str(path), 300)}: columns "
                                      f"{shown(mapping[ours])} and {shown(name)} both give "
                                      f"the {ours}")
            mapping[ours] = name
        missing = [c for c in _REQUIRED if c not in mapping]
        if missing:
            raise NewsImportError(f"cannot import {shown(str(path), 300)}: no "
                                  f"{' or '.join(missing)} column (the header is "
                                  f"{','.join(names)})")
        rows = []
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue  # a blank line
            line = reader.line_num
            if len(cells) != len(names):
                raise NewsImportError(
                    f"cannot import {shown(str(path), 300)}: line {line}: {len(cells)} "
                    f"fields, the header has {len(names)}; nothing was imported")
            rows.append(_Row(line, dict(zip(names, cells, strict=True))))
    except csv.Error as exc:
        raise NewsImportError(f"cannot import {shown(str(path), 300)}: line "
                              f"{reader.line_num}: {exc}; nothing was imported") from None
    return mapping, rows


def _instruments(conn: psycopg.Connection) -> dict[str, list[tuple[str, int]]]:
    """Each symbol's (venue, instrument id) pairs: one read for the whole file."""
    by_symbol: dict[str, list[tuple[str, int]]] = {}
    for i, s, v in conn.execute("SELECT instrument_id, symbol, venue FROM market.instruments"):
        by_symbol.setdefault(s, []).append((v, int(i)))
    return by_symbol


def _check(row: _Row, mapping: dict[str, str], when: Any, when_reason: str | None,
           known: dict[str, list[tuple[str, int]]], venue: str | None) -> tuple[Any, ...]:
    """The row's values for the insert, or ValueError saying what is wrong with it."""
    def cell(name: str) -> str:
        return row.cells[mapping[name]].strip() if name in mapping else ""

    if when_reason is not None:
        raise ValueError(when_reason)
    if not 1970 <= when.year < 2200:
        raise ValueError(f"time {when.isoformat()} is out of range (1970 to 2199)")
    text = cell("score")
    try:
        score = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"score {shown(text)} is not a number") from None
    if not score.is_finite() or not Decimal(-1) <= score <= Decimal(1):
        raise ValueError(f"score {shown(text)} is not a number from -1 to 1")
    # (at most 18 decimal places, as written in ASCII: 1E-999999999 overflowed the
    # database's numeric, and the error named neither the file nor the line)
    score = parse_number(text, "score")
    source = cell("source")
    if not source or len(source) > MAX_SOURCE or _CONTROL.search(source):
        raise ValueError(f"source {shown(source)} must be 1-{MAX_SOURCE} characters without "
                         "control characters")
    headline = row.cells[mapping["headline"]].strip() if "headline" in mapping else ""
    if len(headline) > MAX_HEADLINE or _CONTROL.search(headline):
        raise ValueError(f"headline {shown(headline)} must be at most {MAX_HEADLINE} "
                         "characters without control characters (line breaks included)")
    symbol = cell("symbol").upper()
    where = cell("venue").lower() or venue
    instrument: int | None = None
    if symbol:
        # a replay session's copy (venue replay<N>) only when its venue is named
        matches = [(v, i) for v, i in known.get(symbol, [])
                   if v == where or (where is None and not _REPLAY_VENUE.fullmatch(v))]
        if not matches:
            at = f" on venue {shown(where)}" if where else ""
            raise ValueError(f"unknown symbol {shown(symbol)}{at} (import its bars first; "
                             "an empty symbol is news about the whole market)")
        if len(matches) > 1:
            raise ValueError(f"symbol {shown(symbol)} is on several venues "
                             f"({', '.join(sorted(v for v, _ in matches))}): give a venue "
                             "column or --venue")
        instrument = matches[0][1]
    elif cell("venue"):
        raise ValueError("a venue without a symbol (market-wide news has neither)")
    extra_text = cell("extra")
    extra: Any = {}
    if extra_text:
        try:
            extra = loads_json(extra_text)
            json_values(extra, "extra")
        except ValueError as exc:
            raise ValueError(f"extra {shown(extra_text)}: {exc}") from None
        if not isinstance(extra, dict):
            raise ValueError(f"extra {shown(extra_text)} is not a JSON object")
    return when.to_pydatetime(), instrument, score, source, headline, Jsonb(extra)


def import_news(conn: psycopg.Connection, path: str | Path, *, tz: str = "UTC",
                venue: str | None = None) -> NewsReport:
    """Check every row of the file, then store them in one transaction (or nothing)."""
    file = Path(path)
    mapping, rows = _read(file)
    zone = _zone(tz)
    times, reasons = parse_times(
        pd.Series([r.cells[mapping["time"]].strip() for r in rows], dtype=object), zone)
    known = _instruments(conn)
    values = []
    bad: list[tuple[int, str]] = []
    for k, row in enumerate(rows):
        try:
            reason = reasons.iat[k]
            values.append(_check(row, mapping, times.iat[k],
                                 None if reason is None else str(reason), known,
                                 venue.lower() if venue else None))
        except ValueError as exc:
            bad.append((row.line, str(exc)))
    if bad:
        line, reason = bad[0]
        more = f" ({len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise NewsImportError(f"cannot import {shown(str(file), 300)}: line {line}: {reason}"
                              f"{more}; nothing was imported")
    # the same item twice (time, instrument, source, headline) must say the same thing:
    # a second score for it is a conflict, never silently dropped
    first: dict[tuple[Any, ...], int] = {}
    for k, v in enumerate(values):
        key = (v[0], v[1], v[3], v[4])
        seen = first.setdefault(key, k)
        if seen != k and (values[seen][2], values[seen][5].obj) != (v[2], v[5].obj):
            raise NewsImportError(
                f"cannot import {shown(str(file), 300)}: line {rows[k].line}: the item of line "
                f"{rows[seen].line} again (same time, symbol, source and headline) with "
                f"another score or extra ({values[seen][2]} against {v[2]}); nothing was "
                "imported")
    columns: list[Any] = list(zip(*values, strict=True)) if values else [()] * 6
    with conn.transaction():
        clash = conn.execute(
            "SELECT u.ord, n.score FROM unnest(%s::timestamptz[], %s::bigint[], %s::numeric[],"
            " %s::text[], %s::text[], %s::jsonb[]) WITH ORDINALITY"
            " u(ts, instrument_id, score, source, headline, extra, ord)"
            " JOIN market.news_sentiment n ON n.ts = u.ts AND n.source = u.source"
            " AND n.instrument_id IS NOT DISTINCT FROM u.instrument_id"
            " AND n.headline IS NOT DISTINCT FROM u.headline"
            " WHERE n.score <> u.score OR n.extra IS DISTINCT FROM u.extra"
            " ORDER BY u.ord LIMIT 1", [list(c) for c in columns]).fetchone()
        if clash is not None:
            k = int(clash[0]) - 1
            raise NewsImportError(
                f"cannot import {shown(str(file), 300)}: line {rows[k].line}: this item is "
                f"stored already with another score or extra ({clash[1]} against "
                f"{values[k][2]}); nothing was imported")
        inserted = conn.execute(
            "WITH new AS (INSERT INTO market.news_sentiment (ts, instrument_id, score, source,"
            " headline, extra) SELECT * FROM unnest(%s::timestamptz[], %s::bigint[],"
            " %s::numeric[], %s::text[], %s::text[], %s::jsonb[])"
            " ON CONFLICT ON CONSTRAINT news_sentiment_once DO NOTHING RETURNING 1)"
            " SELECT count(*) FROM new", [list(c) for c in columns]).fetchone()
    stamps = [v[0] for v in values]
    return NewsReport(file=str(file), rows_read=len(values),
                      inserted=int(inserted[0]) if inserted else 0,
                      first_ts=min(stamps, default=None), last_ts=max(stamps, default=None))
