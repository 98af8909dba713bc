"""mmats data: import, list, gaps, generate."""

from __future__ import annotations

from datetime import UTC

import click
import psycopg

from api.table import printable, table
from db.connect import connect, database_url
from db.queries import query

MAX_BAD_SHOWN = 20


@click.group("data")
def data_group() -> None:
    """Market data: import files, list what is stored, find gaps, generate SYNTHETIC bars."""


@data_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--symbol", required=True, help="e.g. AAPL, BTC/USDT, EUR/USD")
@click.option("--market", required=True, type=click.Choice(["crypto", "forex", "stock"]))
@click.option("--timeframe", required=True,
              type=click.Choice(["1m", "5m", "15m", "1h", "4h", "1d", "1w"]))
@click.option("--venue", default=None, help="default: crypto, fx or us by market")
@click.option("--tz", default="UTC", show_default=True,
              help="IANA zone in which times without an offset are read")
@click.option("--skip-bad", is_flag=True,
              help="Import the good rows and quarantine the bad ones (default: all or nothing).")
def data_import(file: str, symbol: str, market: str, timeframe: str, venue: str | None,
                tz: str, skip_bad: bool) -> None:
    """Import a CSV, CSV.gz or Parquet file of bars (exact decimals; idempotent)."""
    from workers.ingest.importer import import_file

    with connect(database_url(), autocommit=True) as conn:
        rep = import_file(conn, file, symbol=symbol, market=market, timeframe=timeframe,
                          venue=venue, tz=tz, skip_bad=skip_bad)
    click.echo(printable(rep.summary()))  # (a file name may hold escape sequences)
    if rep.bad_rows:
        click.echo(f"bad rows (quarantined, import {rep.import_id}):")
        for b in rep.bad_rows[:MAX_BAD_SHOWN]:
            click.echo(f"  {rep.row_label} {b.row_number}: {printable(b.reason)}")
        if len(rep.bad_rows) > MAX_BAD_SHOWN:
            click.echo(f"  ... {len(rep.bad_rows) - MAX_BAD_SHOWN} more")


@data_group.command("news")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--tz", default="UTC", show_default=True,
              help="IANA zone in which times without an offset are read")
@click.option("--venue", default=None, help="the venue of every row's symbol")
def data_news(file: str, tz: str, venue: str | None) -> None:
    """Import news sentiment (CSV: time, score, source[, symbol, venue, headline, extra]),
    told to strategies by on_news_sentiment; all or nothing, idempotent."""
    from workers.ingest.news import import_news

    with connect(database_url(), autocommit=True) as conn:
        click.echo(printable(import_news(conn, file, tz=tz, venue=venue).summary()))


def _is_replay_copy(venue: str) -> bool:
    """A paper session's copy of the bars it replays (venue replay<N>)."""
    return venue.startswith("replay") and venue[len("replay"):].isdigit()


def coverage(conn: psycopg.Connection, indent: str = "", replays: bool = False) -> str:
    """What is stored, one line per instrument and timeframe (times in UTC). The copies a
    paper session replays (venue replay<N>) are counted, not listed, unless `replays`."""
    rows = conn.execute(query("bar_coverage")).fetchall()
    copies = 0 if replays else sum(1 for r in rows if _is_replay_copy(r[1]))
    note = (f"{indent}({copies:,} series of paper sessions' replay copies (venue replay<N>)"
            " not shown: `mmats data list --replays` lists them)") if copies else ""
    rows = [r for r in rows if replays or not _is_replay_copy(r[1])]
    if not rows:
        return indent + "no bars stored (import some with `mmats data import`)" + (
            "\n" + note if note else "")
    out = [(s, v, m, tf, f"{a.astimezone(UTC):%Y-%m-%d %H:%M}",
            f"{b.astimezone(UTC):%Y-%m-%d %H:%M}", f"{n:,}")
           for s, v, m, tf, a, b, n in rows]
    return table(("symbol", "venue", "market", "timeframe", "first (UTC)", "last (UTC)",
                  "rows"), out, right=(6,), indent=indent) + ("\n" + note if note else "")


@data_group.command("list")
@click.option("--replays", is_flag=True,
              help="the copies paper sessions replayed too (venues replay1, replay2, ...)")
def data_list(replays: bool) -> None:
    """What is stored: one line per instrument and timeframe."""
    with connect(database_url()) as conn:
        click.echo(coverage(conn, replays=replays))


@data_group.command("gaps")
@click.option("--symbol", default=None)
@click.option("--timeframe", default=None,
              type=click.Choice(["1m", "5m", "15m", "1h", "4h", "1d", "1w"]))
@click.option("--venue", default=None)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=0),
              help="ranges listed per series")
def data_gaps(symbol: str | None, timeframe: str | None, venue: str | None,
              limit: int) -> None:
    """Missing bars between the first and last stored bar, per the market's calendar."""
    from workers.ingest.gaps import find_gaps

    with connect(database_url()) as conn:
        series = find_gaps(conn, symbol=symbol, timeframe=timeframe, venue=venue)
    if not series:
        click.echo("no stored bars match")
        return
    total = 0
    for s in series:
        total += s.missing
        daily = s.timeframe in ("1d", "1w")
        fmt = "%Y-%m-%d" if daily else "%Y-%m-%d %H:%M"
        click.echo(f"{s.symbol} {s.venue} {s.timeframe} ({s.calendar_id}): {s.bars:,} bars "
                   f"{s.first:{fmt}} .. {s.last:{fmt}} UTC, {s.missing:,} missing in "
                   f"{len(s.ranges):,} range(s)")
        if s.ranges:
            rows = [(f"{r.start:{fmt}}", f"{r.end:{fmt}}", f"{r.count:,}")
                    for r in s.ranges[:limit]]
            text = table(("from", "to", "missing"), rows, right=(2,))
            click.echo("\n".join("  " + line for line in text.splitlines()))
            if len(s.ranges) > limit:
                click.echo(f"  ... {len(s.ranges) - limit} more ranges")
    click.echo(f"total: {total:,} missing bars in {len(series)} series")


@data_group.command("generate")
@click.option("--symbol", required=True)
@click.option("--market", required=True, type=click.Choice(["crypto", "forex", "stock"]))
@click.option("--timeframe", default="1m", show_default=True,
              type=click.Choice(["1m", "5m", "15m", "1h", "4h"]))
@click.option("--start", default="2024-01-01", show_default=True, help="UTC date or time")
@click.option("--bars", default=10_000, show_default=True, type=click.IntRange(1, 50_000_000))
@click.option("--seed", default=42, show_default=True, type=click.IntRange(min=0))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help=".csv, .csv.gz or .parquet")
def data_generate(symbol: str, market: str, timeframe: str, start: str, bars: int, seed: int,
                  out: str) -> None:
    """Write SYNTHETIC bars (not market data): deterministic for a seed."""
    import pandas as pd

    from db.errors import MmatsError
    from workers.ingest.synthetic import generate, write

    try:
        begin = pd.Timestamp(start.strip())
    except ValueError as exc:
        raise MmatsError(f"--start {start.strip()[:40]!r} is not a date or time (YYYY-MM-DD or"
                         f" ISO 8601): {str(exc).splitlines()[0][:80]}") from None
    if pd.isna(begin):
        raise MmatsError(f"--start {start.strip()[:40]!r} is not a date or time")
    try:
        result = generate(symbol, market, timeframe=timeframe, start=begin, bars=bars,
                          seed=seed)
    except ValueError as exc:
        raise MmatsError(str(exc).splitlines()[0]) from exc
    try:
        path = write(result, out)
    except OSError as exc:
        raise MmatsError(f"cannot write {out!r}: {exc.strerror or exc}") from exc
    f = result.frame
    click.echo(f"wrote {len(f):,} SYNTHETIC {timeframe} bars for {symbol} to {path} "
               f"({f['timestamp'].iloc[0]:%Y-%m-%d %H:%M} .. "
               f"{f['timestamp'].iloc[-1]:%Y-%m-%d %H:%M} UTC, seed {seed}, "
               f"{len(result.missing_us):,} bars left out as gaps)")
