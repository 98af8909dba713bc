"""mmats demo: the main job on the embedded database (or MMATS_DATABASE_URL)."""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import psycopg

from api.cli_data import coverage
from db.config import load_settings, redact_url
from db.connect import connect, database_url
from db.migrate import upgrade
from db.queries import query

# (label, strategy, symbols, timeframe, from, to, params, commission, allow_short)
DEMO_BACKTESTS: tuple[tuple[Any, ...], ...] = (
    ("demo-sma", "sma_crossover", ("BTC/USDT",), "1m", "2024-01-01", "2024-01-08",
     {"fast": 10, "slow": 20}, "0.001", False),
    ("demo-rsi", "rsi_mean_reversion", ("EUR/USD",), "1m", "2024-01-01", "2024-01-13",
     {}, "0.00002", True),
    # the sample stocks are not split-adjusted (data/README.md): IBM has no split in
    # 2000-2013, and none of the four has one from March 2005 (warm-up included) on
    ("demo-donchian", "donchian_breakout", ("IBM",), "1d", "2001-01-01", "2013-03-02",
     {}, "0.0005", False),
    ("demo-momentum", "momentum_rotation", ("AAPL", "GOOG", "IBM", "MSFT"), "1d",
     "2005-06-01", "2013-03-02", {"lookback": 60, "top_n": 2, "rebalance_every": 21},
     "0.0005", False),
)


def _demo_backtest(conn: psycopg.Connection, spec: tuple[Any, ...], reports: Path) -> None:
    from workers.backtest.config import BacktestConfig, parse_time
    from workers.backtest.report import write_html
    from workers.backtest.results import load_report
    from workers.backtest.run import run_backtest

    label, strategy, symbols, tf, start, end, params, commission, short = spec
    previous = conn.execute(query("backtest_last_fingerprint"), {"label": label}).fetchone()
    config = BacktestConfig(strategy=strategy, symbols=_at_venue(symbols), timeframe=tf,
                            start=parse_time(start, "from"), end=parse_time(end, "to"),
                            params=params, commission=Decimal(commission), allow_short=short,
                            label=label)
    run_id = run_backtest(conn, config)
    report = load_report(conn, run_id)
    m, run = report["metrics"], report["run"]
    path = write_html(report, reports / f"run-{run_id}-{strategy}.html")
    same = ""
    if previous is not None:
        same = (f", identical to run {previous[0]}" if previous[1] == run["fingerprint"]
                else f", DIFFERS from run {previous[0]}")
    click.echo(f"   run {run_id:<4} {strategy:<19} {','.join(symbols):<19} {tf:<3} "
               f"{run['bars']:>6} bars: return {_pct(m.get('total_return'))}, "
               f"Sharpe {_num(m.get('sharpe'))}, max DD {_pct(m.get('max_drawdown'), sign=False)}, "
               f"{m.get('trades', 0)} trades (buy & hold {_pct(m.get('buy_and_hold_return'))})"
               f" in {run['elapsed_seconds']:.1f} s{same}")
    click.echo(f"        report {path}")


def _at_venue(symbols: tuple[str, ...]) -> tuple[str, ...]:
    """The sample symbols at the sample data's venue (`BTC/USDT@crypto`): a live feed
    configured later adds the same symbol on an exchange's venue."""
    from workers.ingest.samples import sample_datasets

    venues = {ds.symbol: ds.venue for ds in sample_datasets()}
    return tuple(f"{s}@{venues[s]}" if venues.get(s) else s for s in symbols)


def _pct(value: object, sign: bool = True) -> str:
    if value is None:
        return "-"
    pct = float(value) * 100  # type: ignore[arg-type]
    return f"{pct:+.1f} %" if sign else f"{pct:.1f} %"


def _num(value: object) -> str:
    return "-" if value is None else f"{float(value):.2f}"  # type: ignore[arg-type]


# a short paper session on the replay feed, then the same bars through the backtest
DEMO_PAPER = ("sma_crossover", "BTC/USDT", "1m", "2024-01-02T00:00", "2024-01-02T02:00",
              {"fast": 10, "slow": 20}, "0.001", "1200")

_TRADES = """
SELECT t.side, t.quantity, t.entry_time, t.entry_price, t.exit_time, t.exit_price, t.pnl
FROM trading.trades t JOIN trading.accounts a USING (account_id) WHERE a.name = %s
ORDER BY t.entry_time, t.trade_id
"""


def _demo_paper_session(url: str) -> None:
    from api.cli_runtime import run_replay_session
    from workers.backtest.config import BacktestConfig, parse_time
    from workers.backtest.run import run_backtest

    strategy, symbol, tf, start, end, params, commission, speed = DEMO_PAPER
    click.echo(f"7. paper trading on the replay feed: {strategy} on {symbol} {tf}, {start} to "
               f"{end} UTC at {speed}x real time; ingest, strategy worker and router run as "
               "processes (bars -> signals -> order queue -> paper fills):")
    result = run_replay_session(
        strategy=strategy, symbols=list(_at_venue((symbol,))), timeframe=tf,
        start=parse_time(start, "from"), end=parse_time(end, "to"), speed=speed,
        params=params, cash=Decimal(10000),
        commission=Decimal(commission), echo=lambda line: click.echo("   " + line.strip()
                                                                    if line.startswith("  ")
                                                                    else "   " + line))
    s = result["summary"]
    with connect(url, autocommit=True) as conn:
        run_id = run_backtest(conn, BacktestConfig(
            strategy=strategy, symbols=_at_venue((symbol,)), timeframe=tf,
            start=parse_time(start, "from"),
            end=parse_time(end, "to"), params=params, commission=Decimal(commission),
            label="demo-paper-parity"))
        same = (conn.execute(_TRADES, (result["account"],)).fetchall()
                == conn.execute(_TRADES, (f"bt-{run_id}",)).fetchall())
    click.echo(f"   {result['account']} (PAPER): {s['signals']} signals, {s['orders']} orders, "
               f"{s['fills']} fills, {s['trades']} closed trades, equity {s['equity']:.2f} in "
               f"{result['seconds']:.1f} s; the same bars through `mmats backtest` (run "
               f"{run_id}): {'the same trades' if same else 'DIFFERENT trades'}")


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
    click.echo("6. backtests of the example strategies on the sample data "
               "(through the trading core's functions):")
    reports = settings.home / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    with connect(url, autocommit=True) as conn:
        for spec in DEMO_BACKTESTS:
            _demo_backtest(conn, spec, reports)
    _demo_paper_session(url)
    click.echo(f"done in {time.monotonic() - started:.1f}s — PostgreSQL {info[0]}, "
               f"TimescaleDB {info[1] or 'not installed (plain tables and views)'}. "
               "Explore with `mmats db psql`, `mmats runs` or `mmats report RUN --html FILE`.")
