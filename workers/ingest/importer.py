"""Import a bar file into market.bars: all or nothing, or good rows plus a quarantine.

One transaction: the parsed rows are COPYed into a temporary staging table, rows that
contradict stored bars are found in SQL, the rest go into market.bars with ON CONFLICT
DO NOTHING (so a re-import changes nothing), and the import, its quarantined rows and an
audit event are recorded alongside.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.csv as pcsv
from psycopg import sql

from db.errors import MmatsError
from workers.ingest.instruments import check_timeframe, ensure_instrument, shown, spec_for
from workers.ingest.parse import BadRow, ParsedBars, parse_file

COPY_CHUNK = 100_000


class ImportRefused(MmatsError):
    """A file with bad rows, imported without --skip-bad: nothing was written."""


@dataclass(frozen=True)
class ImportReport:
    file: str
    symbol: str
    venue: str
    market: str
    timeframe: str
    instrument_id: int
    import_id: int | None  # None: nothing new (a re-import), so nothing was recorded
    rows_read: int
    inserted: int
    unchanged: int
    quarantined: int
    first_ts: datetime | None
    last_ts: datetime | None
    bad_rows: tuple[BadRow, ...] = ()
    row_label: str = "line"
    instrument_created: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        span = (f", {self.first_ts:%Y-%m-%d %H:%M} .. {self.last_ts:%Y-%m-%d %H:%M} UTC"
                if self.first_ts and self.last_ts else "")
        note = " (already stored: nothing changed)" if self.inserted == 0 and \
            self.unchanged and not self.quarantined else ""
        return (f"imported {self.file}: {self.symbol} {self.venue} {self.timeframe}: "
                f"{self.rows_read} rows read, {self.inserted} inserted, {self.unchanged} "
                f"unchanged, {self.quarantined} quarantined{span}{note}")


_STAGING = """
CREATE TEMP TABLE {} (
    line integer NOT NULL, ts timestamptz NOT NULL, open numeric NOT NULL,
    high numeric NOT NULL, low numeric NOT NULL, close numeric NOT NULL,
    volume numeric NOT NULL
) ON COMMIT DROP
"""
_MATCHES = """
SELECT count(*), count(*) FILTER (WHERE (b.open, b.high, b.low, b.close, b.volume)
                                  IS DISTINCT FROM (s.open, s.high, s.low, s.close, s.volume))
FROM {} s JOIN market.bars b
  ON b.instrument_id = %s AND b.timeframe = %s::market.timeframe AND b.ts = s.ts
"""
_CONFLICTS = """
SELECT s.line, s.ts, b.open, b.high, b.low, b.close, b.volume
FROM {} s JOIN market.bars b
  ON b.instrument_id = %s AND b.timeframe = %s::market.timeframe AND b.ts = s.ts
WHERE (b.open, b.high, b.low, b.close, b.volume)
      IS DISTINCT FROM (s.open, s.high, s.low, s.close, s.volume)
ORDER BY s.line
"""
_OVERLAP = """
SELECT EXISTS (SELECT 1 FROM market.bars WHERE instrument_id = %s
               AND timeframe = %s::market.timeframe AND ts BETWEEN %s AND %s)
"""
_INSERT = """
INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)
SELECT %s, %s::market.timeframe, ts, open, high, low, close, volume FROM {} ORDER BY ts
ON CONFLICT DO NOTHING
"""
_IMPORT_ROW = """
INSERT INTO market.imports (instrument_id, timeframe, file_name, file_sha256, rows_read,
    rows_inserted, rows_unchanged, rows_quarantined, first_ts, last_ts)
VALUES (%s, %s::market.timeframe, %s, %s, %s, %s, %s, %s, %s, %s)
RETURNING import_id
"""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def refusal(file: str, parsed: ParsedBars, bad: list[BadRow]) -> ImportRefused:
    first = min(bad, key=lambda b: b.row_number)
    more = f" ({len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
    return ImportRefused(
        f"cannot import {shown(file, 300)}: {parsed.label} {first.row_number} "
        f"({parsed.convention()}): {first.reason}{more}; nothing was imported "
        "(--skip-bad imports the good rows and quarantines the bad ones)")


def _copy_rows(cur: psycopg.Cursor, staging: sql.Identifier, parsed: ParsedBars,
               file: str) -> None:
    """COPY text format written by Arrow (the values are validated numbers and times); a
    value the database still refuses is named by its line in the file."""
    stmt = sql.SQL("COPY {} (line, ts, open, high, low, close, volume) FROM STDIN").format(
        staging)
    table = pa.table({
        "line": pa.array(parsed.numbers, pa.int64()),
        "ts": pa.array(parsed.ts_us, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        **{c: parsed.values[c] for c in ("open", "high", "low", "close", "volume")}})
    options = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    try:
        with cur.copy(stmt) as copy:
            for lo in range(0, table.num_rows, COPY_CHUNK):
                buf = io.BytesIO()
                pcsv.write_csv(table.slice(lo, COPY_CHUNK), buf, options)
                copy.write(buf.getbuffer())
    except psycopg.errors.DataError as exc:
        raise _copy_refusal(exc, file, parsed) from None


def _copy_refusal(exc: psycopg.errors.DataError, file: str, parsed: ParsedBars) -> ImportRefused:
    """COPY's context says `COPY staging, line N, column low: "..."` (N counts the rows
    sent, from 1): the file's line (or row) and column."""
    problem = (exc.diag.message_primary or str(exc) or type(exc).__name__).splitlines()[0]
    where = ""
    found = re.search(r"line (\d+)(?:, column (\w+))?", exc.diag.context or "")
    if found and 0 < int(found.group(1)) <= len(parsed.numbers):
        where = (f" {parsed.label} {int(parsed.numbers[int(found.group(1)) - 1])} "
                 f"({parsed.convention()}):")
        if found.group(2):
            where += f" {found.group(2)}"
    return ImportRefused(f"cannot import {shown(file, 300)}:{where} the database refuses the "
                         f"value: {problem}; nothing was imported")


def _utc(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC) if us % 1_000_000 else \
        datetime.fromtimestamp(us // 1_000_000, tz=UTC)


def import_file(conn: psycopg.Connection, path: str | Path, *, symbol: str, market: str,
                timeframe: str, venue: str | None = None, tz: str = "UTC",
                skip_bad: bool = False, now: datetime | None = None) -> ImportReport:
    """Import one CSV / CSV.gz / Parquet file of bars. See the module docstring. A bar
    that had not closed by `now` (default: the clock) is a bad row."""
    t0 = time.perf_counter()
    spec = spec_for(symbol, market, venue)
    check_timeframe(timeframe)
    file = str(path)
    parsed = parse_file(path, tz, timeframe, now)
    if parsed.bad and not skip_bad:
        raise refusal(file, parsed, parsed.bad)
    digest = _sha256(Path(path))
    t1 = time.perf_counter()
    staging = sql.Identifier("mmats_import_staging")
    with conn.transaction(), conn.cursor() as cur:
        instrument_id, created = ensure_instrument(conn, spec)
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('mmats.import.bars'), %s::int)",
                    (instrument_id,))
        cur.execute("SET LOCAL timezone = 'UTC'")
        cur.execute(sql.SQL(_STAGING).format(staging))
        _copy_rows(cur, staging, parsed, file)
        conflicts = []
        overlap = bool(len(parsed.ts_us)) and cur.execute(_OVERLAP, (
            instrument_id, timeframe, _utc(int(parsed.ts_us.min())),
            _utc(int(parsed.ts_us.max())))).fetchone()[0]  # type: ignore[index]
        stored = 0
        if overlap:
            cur.execute("SET LOCAL work_mem = '256MB'")
            cur.execute(sql.SQL("ANALYZE {}").format(staging))
            stored, differing = cur.execute(sql.SQL(_MATCHES).format(staging), (
                instrument_id, timeframe)).fetchone()  # type: ignore[misc]
            if differing:
                conflicts = cur.execute(sql.SQL(_CONFLICTS).format(staging),
                                        (instrument_id, timeframe)).fetchall()
        bad = list(parsed.bad)
        if conflicts:
            bad += _conflict_rows(cur, staging, conflicts, parsed)
            if not skip_bad:
                raise refusal(file, parsed, bad)
            cur.execute(sql.SQL("DELETE FROM {} WHERE line = ANY(%s)").format(staging),
                        ([int(c[0]) for c in conflicts],))
        # Nothing stored in the file's time range (checked under the per-instrument lock):
        # a plain INSERT, which is much cheaper than ON CONFLICT for a million rows. A
        # concurrent writer of the same bars would make it fail on bars_pkey, never
        # half-write. Otherwise ON CONFLICT DO NOTHING skips the rows already stored.
        insert = _INSERT if overlap else _INSERT.replace("ON CONFLICT DO NOTHING", "")
        if len(parsed.ts_us) < 2 or bool(np.all(np.diff(parsed.ts_us) > 0)):
            insert = insert.replace(" ORDER BY ts", "")  # already in index order
        staged = len(parsed.ts_us) - len(conflicts)
        inserted = 0
        if stored - len(conflicts) < staged:  # else every row is stored already, unchanged
            # (the statement-level trigger on market.bars judges live and paper positions'
            # stops over all the new bars at once)
            inserted = cur.execute(sql.SQL(insert).format(staging),
                                   (instrument_id, timeframe)).rowcount
        first_us = last_us = None
        kept = _kept_ts(parsed, {int(c[0]) for c in conflicts})
        if len(kept):
            first_us, last_us = int(kept.min()), int(kept.max())
        first_ts = _utc(first_us) if first_us is not None else None
        last_ts = _utc(last_us) if last_us is not None else None
        unchanged = staged - inserted + parsed.duplicates
        import_id: int | None = None
        if inserted or bad:
            # a re-import that adds nothing writes nothing, not even its own record
            import_id = cur.execute(_IMPORT_ROW, (
                instrument_id, timeframe, file, digest, parsed.rows_read, inserted, unchanged,
                len(bad), first_ts, last_ts)).fetchone()[0]  # type: ignore[index]
            _quarantine(cur, import_id, bad)
            summary = {"import_id": import_id, "file": file, "sha256": digest,
                       "symbol": spec.symbol, "venue": spec.venue, "timeframe": timeframe,
                       "tz": tz, "skip_bad": skip_bad,
                       "rows_read": parsed.rows_read, "inserted": inserted,
                       "unchanged": unchanged, "quarantined": len(bad),
                       "first_ts": first_ts.isoformat() if first_ts else None,
                       "last_ts": last_ts.isoformat() if last_ts else None}
            cur.execute("SELECT audit.record('data.import', 'market.bars', %s::text, %s::jsonb)",
                        (str(instrument_id), json.dumps(summary)))
    t2 = time.perf_counter()
    if timeframe == "1m" and inserted:
        with conn.transaction():
            conn.execute("SELECT market.refresh_bar_aggregates()")
    t3 = time.perf_counter()
    return ImportReport(
        file=file, symbol=spec.symbol, venue=spec.venue, market=spec.market,
        timeframe=timeframe, instrument_id=instrument_id, import_id=import_id,
        rows_read=parsed.rows_read, inserted=inserted, unchanged=unchanged,
        quarantined=len(bad), first_ts=first_ts, last_ts=last_ts,
        bad_rows=tuple(sorted(bad, key=lambda b: b.row_number)), row_label=parsed.label,
        instrument_created=created,
        seconds={"parse": t1 - t0, "write": t2 - t1, "refresh": t3 - t2, "total": t3 - t0})


def _kept_ts(parsed: ParsedBars, conflict_lines: set[int]) -> np.ndarray:
    if not conflict_lines:
        return parsed.ts_us
    mask = ~np.isin(parsed.numbers, np.fromiter(conflict_lines, dtype=np.int64))
    return parsed.ts_us[mask]


def _conflict_rows(cur: psycopg.Cursor, staging: sql.Identifier, conflicts: list[tuple],
                   parsed: ParsedBars) -> list[BadRow]:
    pos = {int(n): i for i, n in enumerate(parsed.numbers.tolist())}
    out = []
    for line, ts, o, h, lo, c, v in conflicts:
        i = pos[int(line)]
        raw = {"time": ts.isoformat(), **{k: str(parsed.values[k][i].as_py())
                                          for k in ("open", "high", "low", "close", "volume")}}
        out.append(BadRow(int(line), f"time {ts:%Y-%m-%d %H:%M:%S} UTC is already stored with "
                          f"different values (stored open={o} high={h} low={lo} close={c} "
                          f"volume={v})", raw))
    return out


def _quarantine(cur: psycopg.Cursor, import_id: int | None, bad: list[BadRow]) -> None:
    if not bad:
        return
    stmt = "COPY market.bar_quarantine (import_id, row_number, raw, reason) FROM STDIN"
    with cur.copy(stmt) as copy:
        for b in bad:
            copy.write_row((import_id, b.row_number, json.dumps(b.raw), b.reason))
