"""mmats walk-forward: parameter search on rolling training windows, judged out of sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click

from api.cli_backtest import backtest_options, build_config, check_output, write_json
from api.table import table
from db.connect import connect, database_url
from db.errors import MmatsError

if TYPE_CHECKING:
    from workers.backtest.walkforward import Event


def _ret(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 100:+.2f} %"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 100:.2f} %"


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _day(text: str) -> str:
    """2024-02-01T00:00:00+00:00 -> 2024-02-01; 2024-02-01T08:00:00+00:00 -> 2024-02-01 08:00."""
    date, _, time = text.partition("T")
    time = time[:5]
    return date if time in ("", "00:00") else f"{date} {time}"


def _params(params: Mapping[str, Any], varying: Sequence[str]) -> str:
    shown = [n for n in params if n in varying] or list(params)
    return " ".join(f"{n}={params[n]}" for n in shown)


def _varying(grid: Mapping[str, Sequence[Any]]) -> list[str]:
    return [name for name, values in grid.items() if len(values) > 1]


class _Printer:
    """One line per finished window on stdout; notes too; training progress on stderr."""

    def __init__(self, objective: str, varying: list[str], quiet: bool) -> None:
        self.objective = objective
        self.varying = varying
        self.quiet = quiet

    def __call__(self, event: Event) -> None:
        if event.kind == "plan":
            click.echo(f"walk-forward: {event.message}")
        elif event.kind == "note":
            click.echo(f"  note: {event.message}")
        elif event.kind == "train" and not self.quiet:
            w = event.window
            assert w is not None
            if event.done == event.total or event.done % 10 == 0:
                click.echo(f"  window {w.number}: trained {event.done}/{event.total}", err=True)
        elif event.kind == "window":
            r = event.result
            assert r is not None
            d = r.to_dict()
            click.echo(
                f"  window {event.done}/{event.total}: train {_day(d['train_start'])} to "
                f"{_day(d['train_end'])}, {_params(r.params, self.varying)}, "
                f"train {self.objective} {_num(r.train_score)}; test {_day(d['test_start'])} "
                f"to {_day(d['test_end'])}: return {_ret(d['test_return'])}, "
                f"sharpe {_num(d['test_sharpe'])} (run {r.test_run_id})")


SUMMARY = (("total_return", "total return", _ret), ("cagr", "CAGR", _ret),
           ("sharpe", "Sharpe", _num), ("sortino", "Sortino", _num),
           ("max_drawdown", "max drawdown", _pct), ("trades", "trades", str),
           ("win_rate", "win rate", _pct), ("buy_and_hold_return", "buy & hold", _ret))


def print_result(result: Mapping[str, Any]) -> None:
    stitched = result.get("stitched") or {}
    m = stitched.get("metrics") or {}
    windows = result.get("windows") or []
    if windows:
        click.echo(f"out-of-sample {_day(windows[0]['test_start'])} to "
                   f"{_day(windows[-1]['test_end'])} ({len(windows)} windows, stitched): "
                   f"final equity {float(m.get('final_equity') or 0):,.2f} from "
                   f"{float(result.get('cash') or 0):,.2f}")
    rows = [(label, "-" if m.get(key) is None else fmt(m[key])) for key, label, fmt in SUMMARY]
    click.echo(table(["metric", "value"], rows, right=[1], indent="  "))
    stability = result.get("stability") or {}
    varying = _varying((result.get("settings") or {}).get("grid") or {}) or list(stability)
    rows2 = [(name, ", ".join(str(v) for v in s["values"]), s["mode"], s["changes"])
             for name, s in stability.items() if name in varying]
    if rows2:
        click.echo("parameter stability:")
        click.echo(table(["parameter", "chosen per window", "most often", "changes"], rows2,
                         right=[3], indent="  "))


@click.command("walk-forward")
@backtest_options
@click.option("--train-share", default=0.7, show_default=True, type=float,
              help="training share of each window: train / (train + test)")
@click.option("--step", default="monthly", show_default=True,
              type=click.Choice(["monthly", "quarterly"]), help="length of a test window")
@click.option("--anchored", is_flag=True, help="every training span starts at --from")
@click.option("--objective", default="sharpe", show_default=True,
              help="run metric to optimise on the training windows (maximised; drawdowns, "
              "volatility and commission minimised)")
@click.option("--method", default="grid", show_default=True,
              type=click.Choice(["grid", "random"]), help="parameter search")
@click.option("--samples", default=None, type=int, help="candidates for --method random")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the sampling")
@click.option("--param", "params", multiple=True, metavar="NAME=LO:HI:STEP|NAME=V1,V2,...",
              help="candidates of a parameter (repeat; the others keep their defaults; "
                   "NAME=* takes the strategy's own search space)")
@click.option("--max-candidates", default=50, show_default=True, type=int,
              help="at most this many parameter sets per window (sampled, seeded)")
@click.option("--json", "json_file", default=None, help="write the whole result here")
@click.option("--quiet", is_flag=True, help="no training progress on stderr")
def walk_forward_command(train_share: float, step: str, anchored: bool, objective: str,
                         method: str, samples: int | None, seed: int, params: tuple[str, ...],
                         max_candidates: int, json_file: str | None, quiet: bool,
                         **options: Any) -> None:
    """Walk-forward optimisation: search parameters on each training window, trade the
    best on the window after it, and report the stitched out-of-sample result."""
    from strategies.loader import StrategyLoader, StrategyLoadError
    from workers.backtest.config import BacktestError
    from workers.backtest.simulator import SimulatorError
    from workers.backtest.walkforward import (
        load_walk_forward,
        parse_param_ranges,
        run_walk_forward,
        search_grid,
    )

    config = build_config(params=None, **options)
    check_output("--json", json_file)
    strategy = config.strategy
    try:
        ranges = parse_param_ranges(params)
        try:
            cls = StrategyLoader(config.strategy_dirs).get(strategy)
        except StrategyLoadError as exc:
            raise BacktestError(str(exc)) from None
        printer = _Printer(objective, _varying(search_grid(cls, ranges)), quiet)
        with connect(database_url(), autocommit=True) as conn:
            wf_id = run_walk_forward(
                conn, config, train_share=train_share, step=step, anchored=anchored,
                objective=objective, method=method, samples=samples, seed=seed,
                param_ranges=ranges, max_candidates=max_candidates, progress=printer)
            result = load_walk_forward(conn, wf_id)
    except (BacktestError, SimulatorError) as exc:
        raise MmatsError(str(exc)) from None
    print_result(result)
    if json_file:
        write_json(result, json_file)
        click.echo(f"  JSON written to {json_file}")
    click.echo(f"  query it: SELECT * FROM backtest.walk_forward_windows "
               f"WHERE walk_forward_id = {wf_id};")
