"""mmats demo: the main job on the embedded database (or MMATS_DATABASE_URL)."""

from __future__ import annotations

import time

import click

from api.cli_data import coverage
from db.config import load_settings, redact_url
from db.connect import connect, database_url
from db.migrate import upgrade
from db.queries import query


@click.command("demo")
def demo() -> None:
    """Start the database, migrate, import the sample data and show what is stored."""
    from workers.ingest.importer import import_file
    from workers.ingest.samples import sample_datasets

    settings = load_settings()
    started = time.monotonic()
    url = database_url(settings)
    where = "external server" if settings.database_url else f"embedded, data in {settings.home}"
    click.echo(f"1. database: {redact_url(url)} ({where})")

    result = upgrade(url)
    click.echo(f"2. schema: {result.after} "
               + (f"(applied {', '.join(result.applied)})" if result.applied else "(up to date)"))

    click.echo("3. sample data:")
    with connect(url) as conn:
        for ds in sample_datasets():
            report = import_file(conn, ds.path, symbol=ds.symbol, market=ds.market,
                                 timeframe=ds.timeframe, venue=ds.venue)
            click.echo(f"   {ds.symbol:<9} {ds.timeframe:<3} {ds.path.name:<22} "
                       f"{report.rows_read:>6} rows: {report.inserted} new, "
                       f"{report.unchanged} already stored")

        click.echo("4. what is stored:")
        click.echo(coverage(conn, indent="   "))
        aggregates = conn.execute(query("aggregate_counts")).fetchall()
        click.echo("   aggregates from 1m bars: "
                   + ", ".join(f"{name} {count}" for name, count in aggregates))
        info = conn.execute(query("server_info")).fetchone()
        events, bad = conn.execute(query("audit_chain_status")).fetchone() or (0, None)
    assert info is not None
    click.echo(f"5. audit chain: {events} events, "
               + ("intact" if bad is None else f"BROKEN at event {bad}"))
    click.echo(f"done in {time.monotonic() - started:.1f}s — PostgreSQL {info[0]}, "
               f"TimescaleDB {info[1] or 'not installed (plain tables and views)'}. "
               "Explore with `mmats db psql` or `mmats data list`.")
