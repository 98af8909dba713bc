"""mmats backtest, runs, report, montecarlo: backtests through the trading core, as rows."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import click
import psycopg

from api.table import printable, table
from db.connect import connect, database_url
from db.errors import MmatsError
from db.queries import query
from workers.backtest.files import atomic_write, is_stream

METRIC_LINES = (
    ("final_equity", "final equity", "money"), ("total_return", "total return", "pct"),
    ("cagr", "CAGR", "pct"), ("annual_volatility", "annual volatility", "pct"),
    ("sharpe", "Sharpe", "ratio"), ("sortino", "Sortino", "ratio"), ("calmar", "Calmar", "ratio"),
    ("max_drawdown", "max drawdown", "pct"), ("max_drawdown_duration", "max DD duration", "dur"),
    ("trades", "trades", "int"), ("win_rate", "win rate", "pct"),
    ("profit_factor", "profit factor", "ratio"), ("expectancy", "expectancy", "money"),
    ("exposure_time", "exposure", "pct"), ("buy_and_hold_return", "buy & hold", "pct"),
    ("open_positions", "open positions", "int"),
)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    v = float(value)
    if kind == "pct":
        return f"{v * 100:.2f} %"
    if kind == "money":
        return f"{v:,.2f}"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "dur":
        days, rest = divmod(int(v), 86_400)
        return f"{days}d {rest // 3600}h" if days else f"{rest // 3600}h {rest % 3600 // 60}m"
    return f"{v:.3f}"


def print_summary(report: Mapping[str, Any], indent: str = "") -> None:
    run, m = report["run"], report["metrics"]
    click.echo(f"{indent}run {run['run_id']} ({run['name']}): {run['strategy']} "
               f"{run['version']} on {', '.join(run['symbols'])} {run['timeframe']}, "
               f"{str(run['start'])[:16]} to {str(run['end'])[:16]}, "
               f"{run['bars']:,} bars in {run['elapsed_seconds']:.1f} s")
    rows = [(label, _fmt(m.get(key), kind)) for key, label, kind in METRIC_LINES]
    click.echo(table(["metric", "value"], rows, right=[1], indent=indent + "  "))
    counts = run.get("counts", {})
    click.echo(f"{indent}  signals {counts.get('signals', 0)} "
               f"(approved {counts.get('approved', 0)}, rejected {counts.get('rejected', 0)}, "
               f"ignored {counts.get('ignored', 0)}), "
               f"fills {counts.get('fills', 0)}, fingerprint {str(run['fingerprint'])[:16]}…")
    for warning in report.get("sanity", []):
        click.echo(f"{indent}  SANITY: {warning}")
    errors = report.get("strategy_errors", [])
    if errors:
        click.echo(f"{indent}  strategy errors: {len(errors)} (first: {errors[0]})")


def check_output(flag: str, path: str | None) -> None:
    """Refuse, before anything runs or is stored, an output file that cannot be written:
    a folder, a file in a folder that does not exist or where no file can be created."""
    if path is None:
        return
    target = Path(path)
    where = f"{flag} {printable(path)}"
    if not path.strip():
        raise MmatsError(f"{flag}: the file name is empty")
    if target.is_dir():
        raise MmatsError(f"{where}: it is a folder, not a file")
    folder = target.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise MmatsError(f"{where}: folder {printable(str(folder))} {what}")
    if is_stream(target):  # a device or a pipe: written in place
        if not os.access(target, os.W_OK):
            raise MmatsError(f"{where}: cannot write to it (permission denied)")
        return
    real = Path(os.path.realpath(target))
    try:  # the real test: create (and remove) a file there, as the writer will
        fd, name = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".check")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise MmatsError(f"{where}: cannot create a file in {printable(str(folder))}: "
                         f"{exc.strerror or exc}") from None


def write_json(report: Mapping[str, Any], path: str, flag: str = "--json") -> None:
    """Write the JSON via a temp file renamed over the target (never half-written; a
    device or a named pipe is written in place: `files.atomic_write`)."""
    check_output(flag, path)
    text = json.dumps(report, indent=1, allow_nan=False).encode("utf-8")

    def write(fh: IO[bytes]) -> None:
        fh.write(text)

    try:
        atomic_write(Path(path), write)
    except OSError as exc:
        raise MmatsError(f"{flag} {printable(path)}: cannot write it: "
                         f"{exc.strerror or exc}") from None


class _Progress:
    """Progress on stderr: a line every 10 % (or every 5 s on long runs)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = time.monotonic()
        self.last_pct = -10
        self.last_time = self.started

    def __call__(self, done: int, total: int) -> None:
        pct = done * 100 // max(total, 1)
        now = time.monotonic()
        if pct >= self.last_pct + 10 or now - self.last_time >= 5 or done == total:
            self.last_pct, self.last_time = pct, now
            click.echo(f"  {self.what}: {pct:3d} % ({done:,}/{total:,} bars, "
                       f"{now - self.started:.1f} s)", err=True)


def build_config(*, strategy: str, symbol: tuple[str, ...], timeframe: str, date_from: str,
                 date_to: str, params: str | None, cash: str, currency: str | None,
                 commission: str, maker_fee: str | None, slippage: str | None,
                 spread: str | None, allow_short: bool, limits: str | None,
                 strategy_dir: tuple[str, ...], label: str | None = None) -> Any:
    from workers.backtest.config import (
        BacktestConfig,
        BacktestError,
        load_limits,
        parse_decimal,
        parse_params,
        parse_spread,
        parse_time,
        symbol_ref,
    )
    from workers.backtest.simulator import SimulatorError, Slippage

    try:
        return BacktestConfig(
            strategy=strategy, symbols=tuple(symbol_ref(s) for s in symbol),
            timeframe=timeframe,
            start=parse_time(date_from, "--from"), end=parse_time(date_to, "--to"),
            params=parse_params(params), cash=parse_decimal(cash, "--cash"),
            currency=currency, commission=parse_decimal(commission, "--commission"),
            maker_fee=None if maker_fee is None else parse_decimal(maker_fee, "--maker-fee"),
            slippage=Slippage.parse(slippage), spread=parse_spread(spread),
            allow_short=allow_short, limits=load_limits(limits) if limits else (),
            strategy_dirs=tuple(Path(d) for d in strategy_dir), label=label)
    except (BacktestError, SimulatorError) as exc:
        raise MmatsError(str(exc)) from None


def backtest_options(f: Any) -> Any:
    """The options a backtest and a walk-forward share."""
    for option in reversed([
        click.option("--strategy", required=True, help="strategy name (mmats strategies)"),
        click.option("--symbol", "symbol", multiple=True, required=True,
                     help="symbol (repeat for several; SYMBOL@venue when ambiguous)"),
        click.option("--timeframe", required=True, help="1m, 5m, 15m, 1h, 4h, 1d or 1w"),
        click.option("--from", "date_from", required=True, help="start date/time (UTC)"),
        click.option("--to", "date_to", required=True, help="end date/time (UTC, exclusive)"),
        click.option("--cash", default="10000", show_default=True),
        click.option("--currency", default=None, help="account currency (default: the quote)"),
        click.option("--commission", default="0", show_default=True,
                     help="fraction of the notional per side (taker)"),
        click.option("--maker-fee", default=None, help="maker fee (default: --commission)"),
        click.option("--slippage", default=None, help="none | bps:N | atr:F | volume:K"),
        click.option("--spread", default=None, help="fraction, or SYMBOL=fraction,..."),
        click.option("--allow-short", is_flag=True, help="sell signals may open shorts"),
        click.option("--limits", default=None, type=click.Path(dir_okay=False),
                     help="risk limits for the run's account (TOML or JSON)"),
        click.option("--strategy-dir", multiple=True,
                     type=click.Path(file_okay=False, exists=True),
                     help="a folder of user strategies"),
    ]):
        f = option(f)
    return f


def _label(value: str | None) -> str | None:
    if value is not None and not 1 <= len(value) <= 200:  # (the runs_label_length check)
        raise click.BadParameter(f"must be 1 to 200 characters, got {len(value):,}")
    return value


@click.command("backtest")
@backtest_options
@click.option("--params", default=None, help="strategy parameters: name=value,...")
@click.option("--label", default=None, callback=lambda _ctx, _param, value: _label(value),
              help="a label stored with the run (1-200 characters)")
@click.option("--json", "json_file", default=None, help="write run_id, metrics, trades… here")
@click.option("--html", "html_file", default=None, help="write the HTML report here")
@click.option("--quiet", is_flag=True, help="no progress lines")
def backtest_command(json_file: str | None, html_file: str | None, quiet: bool,
                     **options: Any) -> None:
    """Backtest a strategy on stored bars through the trading core's own functions."""
    from workers.backtest.config import BacktestError
    from workers.backtest.results import load_report
    from workers.backtest.run import run_backtest

    config = build_config(**options)
    check_output("--json", json_file)
    check_output("--html", html_file)
    progress = None if quiet else _Progress("replay")
    with connect(database_url(), autocommit=True) as conn:
        try:
            run_id = run_backtest(conn, config, progress=progress)
        except BacktestError as exc:
            raise MmatsError(str(exc)) from None
        report = load_report(conn, run_id)
    print_summary(report)
    if json_file:
        write_json(report, json_file)
        click.echo(f"  JSON written to {json_file}")
    if html_file:
        _write_report(report, html_file, None)
    click.echo(f"  query it: SELECT * FROM backtest.trades WHERE run_id = {run_id};")


@click.command("runs")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
def runs_command(limit: int) -> None:
    """The latest backtest runs with their headline figures."""
    with connect(database_url()) as conn:
        rows = conn.execute(query("backtest_list"), {"limit": limit}).fetchall()
    if not rows:
        click.echo("no backtest runs yet (mmats backtest --help)")
        return
    out = [(r[0], r[1], r[2], r[3], f"{r[4]:%Y-%m-%d}", f"{r[5]:%Y-%m-%d}", r[6],
            _fmt(r[7], "pct"), _fmt(r[8], "ratio"), _fmt(r[9], "pct"), _fmt(r[10], "int"),
            (r[11] or "")[:12]) for r in rows]
    click.echo(table(["run", "strategy", "symbols", "tf", "from", "to", "status", "return",
                      "sharpe", "max dd", "trades", "fingerprint"], out,
                     right=[0, 7, 8, 9, 10]))


def _load(conn: psycopg.Connection, run_id: int) -> dict[str, Any]:
    from workers.backtest.results import load_report

    try:
        report = load_report(conn, run_id)
    except LookupError as exc:
        raise MmatsError(str(exc)) from None
    _require_finished(f"run {run_id}", report["run"])
    return report


def _require_finished(what: str, row: Mapping[str, Any]) -> None:
    """A run (or walk-forward) still going or one that failed has no results, or part of
    them: its summary, report or Monte Carlo would show half a run as if it were whole."""
    if row.get("status") == "running":
        raise MmatsError(f"{what} is still running: it has no results yet")
    if row.get("status") != "finished":
        why = printable(str(row.get("error") or "no error recorded"))
        raise MmatsError(f"{what} {row.get('status')} ({why}): it has no results to show")


def _write_report(report: Mapping[str, Any], html: str | None, pdf: str | None) -> None:
    from workers.backtest.report import write_html, write_pdf

    flag, path = "--html", html
    try:
        if html:
            click.echo(f"  HTML report written to {write_html(report, html)}")
        flag, path = "--pdf", pdf
        if pdf:
            click.echo(f"  PDF report written to {write_pdf(report, pdf)}")
    except ValueError as exc:
        raise MmatsError(str(exc)) from None
    except OSError as exc:
        raise MmatsError(f"{flag} {printable(str(path))}: cannot write the report: "
                         f"{exc.strerror or exc}") from None


@click.command("report")
@click.argument("run_id", type=int, required=False)
@click.option("--walk-forward", "walk_forward", type=int, default=None,
              help="report a walk-forward (its stitched out-of-sample run) instead of a run")
@click.option("--html", "html_file", default=None, help="write a self-contained HTML report")
@click.option("--pdf", "pdf_file", default=None, help="write a PDF report")
@click.option("--json", "json_file", default=None, help="write the report data as JSON")
def report_command(run_id: int | None, walk_forward: int | None, html_file: str | None,
                   pdf_file: str | None, json_file: str | None) -> None:
    """A run's report: metrics, charts, trades, assumptions (HTML, PDF or JSON)."""
    from workers.backtest.results import walk_forward_report

    if (run_id is None) == (walk_forward is None):
        raise MmatsError("name a run (mmats report RUN) or a walk-forward (--walk-forward ID)")
    for flag, path in (("--html", html_file), ("--pdf", pdf_file), ("--json", json_file)):
        check_output(flag, path)
    with connect(database_url()) as conn:
        if walk_forward is not None:
            try:
                report = walk_forward_report(conn, walk_forward)
            except LookupError as exc:
                raise MmatsError(str(exc)) from None
            _require_finished(f"walk-forward {walk_forward}", report["walk_forward"])
            if not (html_file or pdf_file or json_file):
                raise MmatsError("a walk-forward report needs --html, --pdf or --json")
        else:
            assert run_id is not None
            report = _load(conn, run_id)
    if not (html_file or pdf_file or json_file):
        print_summary(report)
        return
    _write_report(report, html_file, pdf_file)
    if json_file:
        write_json(report, json_file)
        click.echo(f"  JSON written to {json_file}")


@click.command("montecarlo")
@click.argument("run_id", type=int)
@click.option("--paths", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**63 - 1))
@click.option("--method", default="both", show_default=True,
              type=click.Choice(["shuffle", "bootstrap", "both"]))
@click.option("--ruin", "ruin_level", default="0.5", show_default=True,
              help="ruin when equity touches this share of the starting cash")
def montecarlo_command(run_id: int, paths: int, seed: int, method: str, ruin_level: str) -> None:
    """Trade-order shuffling and bootstrap resampling of a run's closed trades."""
    from psycopg.types.json import Jsonb

    from workers.backtest.montecarlo import run_montecarlo

    try:
        ruin = float(ruin_level)
    except ValueError:
        raise MmatsError(f"--ruin must be a number, got {ruin_level!r}") from None
    with connect(database_url()) as conn:
        report = _load(conn, run_id)
        pnls = [float(t["pnl"]) for t in report["trades"]]
        cash = float(report["run"]["cash"])
        methods = ["shuffle", "bootstrap"] if method == "both" else [method]
        rows = []
        for m in methods:
            try:
                result = run_montecarlo(pnls, cash, method=m, paths=paths, seed=seed,
                                        ruin_level=ruin)
            except ValueError as exc:
                raise MmatsError(f"run {run_id}: {exc}") from None
            conn.execute("SELECT backtest.record_montecarlo(%s, %s, %s, %s, %s::numeric, %s)",
                         (run_id, m, paths, seed, str(ruin), Jsonb(result.to_dict())))
            fr, dd = result.final_return, result.max_drawdown
            rows.append((m, paths, f"{fr['p5'] * 100:.1f} %", f"{fr['p50'] * 100:.1f} %",
                         f"{fr['p95'] * 100:.1f} %", f"{dd['p50'] * 100:.1f} %",
                         f"{dd['p95'] * 100:.1f} %", f"{result.probability_of_ruin * 100:.2f} %"))
        conn.commit()
    click.echo(f"run {run_id}: {len(pnls)} closed trades, {paths} paths, seed {seed}")
    click.echo(table(["method", "paths", "return p5", "p50", "p95", "max dd p50", "p95",
                      "P(ruin)"], rows, right=[1, 2, 3, 4, 5, 6, 7], indent="  "))
    click.echo(f"  stored in backtest.montecarlo; `mmats report {run_id} --html FILE` shows it")


@click.command("strategies")
@click.option("--strategy-dir", multiple=True, type=click.Path(file_okay=False, exists=True))
def strategies_command(strategy_dir: tuple[str, ...]) -> None:
    """The strategies MMATS can load: the examples and your folders."""
    from strategies.loader import StrategyLoader

    loader = StrategyLoader(strategy_dir)
    report = loader.reload_if_changed()
    rows = []
    for name in loader.names():
        cls = loader.get(name)
        params = ", ".join(f"{k}={v.default}" for k, v in cls.parameters.items())
        rows.append((name, cls.version, params, cls.description))
    click.echo(table(["name", "version", "parameters (defaults)", "description"], rows))
    # every file that did not load (the loader's first scan, made when it was built, found
    # them: the report of the second scan has only what changed since)
    errors = [*dict.fromkeys([*map(str, loader.errors.values()), *map(str, report.errors)])]
    for error in errors:
        click.echo(f"error: {printable(error)}", err=True)
    if errors:
        sys.exit(1)
