"""Benchmark: the backtest engine on N SYNTHETIC 1m bars, against backtesting.py.

    python benchmarks/bench_backtest.py [--bars N] [--fast 10 --slow 20] [--commission 0.001]
        [--cash 10000] [--skip-reference] [--functions] [--profile FILE] [--json FILE]

Uses MMATS_DATABASE_URL if set (a fresh database is created on that server and dropped
afterwards); otherwise starts a temporary embedded server in a temp dir, tuned like the
tests (fsync, synchronous_commit and full_page_writes off).

Untimed set-up, in a child process (so that its memory is not counted below): N SYNTHETIC
1m BTC/USDT bars (workers.ingest.synthetic.generate with seed 42 and gap_rate=0, so both
engines see the same contiguous bars; written as generate_file writes them) are written to
a CSV and imported with workers.ingest.importer.import_file.

MMATS: `sma_crossover` (fast/slow, long-only, all the capital) over every bar, on a fresh
autocommit connection. The phases are the pieces run_backtest calls, timed one by one
(wall clock): Engine(conn, config) (load: strategy, bars, indicators), engine.run() (the
replay) and record_results(engine, elapsed) (curve, metrics, fingerprint); their sum is
run_backtest's time. For each phase it also reports the time spent inside
Connection.execute (psycopg adapting the parameters, the round trip and the server's
work: "db_wait"; decoding the rows is Python time), this process's CPU time and, when
the server runs on this machine, the CPU time of the run's PostgreSQL backend
(/proc/<pg_backend_pid()>/stat); and the replay's execute() times by tenth of the run
(a step that gets slower as the run's history grows shows there). Memory: the peak RSS
of this process (ru_maxrss) and the backend's VmHWM (peak RSS, which counts the shared
buffers it touched) when the server is local. load_report (the read-back that the JSON
export and the HTML report use) is timed on its own, outside the total. `--functions`
sets track_functions = 'all' on the run's connection (superuser) and prints the server
functions by self time (pg_stat_user_functions); it slows the steps by ~10-30 %.

Reference, in a child process (its own peak RSS: VmHWM, because in a child ru_maxrss
also counts the parent's RSS at the fork): backtesting.py
(`pip install backtesting`) with the same rules on the same bars: SMA(fast)/SMA(slow),
a cross up buys with all the equity (`self.buy()`, only when not long: MMATS's `buy` means
"be long"), a cross down closes (`self.position.close()`); the crossing tests are those of
strategies/crossing.py (previous <=, current >); commission the same fraction per side,
same cash, trade_on_close=False (fills at the next open), exclusive_orders=False (the
strategy closes explicitly; long-only). backtesting.py trades whole units only, so it runs
as backtesting.lib.FractionalBacktest with fractional_unit = the instrument's quantity
step (0.00001 BTC for the importer's crypto instruments), which sizes exactly like MMATS:
floor(equity / (price x (1 + fee))) steps. The SMAs are TA-Lib's over the same float
closes MMATS builds (ticks x tick), precomputed as data columns (FractionalBacktest
scales OHLCV only), so that both engines take the same decisions even on exact ties;
computing two SMAs costs a few milliseconds either way. Timed: the construction and
run() (which includes its statistics). The trade lists are compared one by one.

`--profile FILE` runs the MMATS phases under cProfile (times are then inflated; the JSON
says "profiled": true), writes the stats to FILE and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import busy_cpu_s
from scratchdb import fresh_database

ROOT = Path(__file__).resolve().parent.parent
SYMBOL = "BTC/USDT"
MARKET = "crypto"
SEED = 42
START = "2024-01-01"


def maxrss_mb() -> float:
    """Peak RSS of this process (ru_maxrss, KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def own_peak_rss_mb() -> float:
    """Peak RSS of this process's own memory since exec (VmHWM). In a child, ru_maxrss
    also counts the parent's RSS at the fork (Linux keeps it across execve)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return maxrss_mb()


# --------------------------------------------------------------------------- child: bars
def prepare(args: argparse.Namespace) -> None:
    """Generate the SYNTHETIC bars, write the CSV, import it (all untimed by the parent)."""
    from workers.ingest.importer import import_file
    from workers.ingest.synthetic import generate, write

    t = time.perf_counter()
    bars = generate(SYMBOL, MARKET, timeframe="1m", start=START, bars=args.bars, seed=SEED,
                    gap_rate=0.0)
    write(bars, args.csv)
    gen_s = time.perf_counter() - t
    ts = bars.frame["timestamp"]
    with psycopg.connect(args.url, autocommit=True) as conn:
        rep = import_file(conn, args.csv, symbol=SYMBOL, market=MARKET, timeframe="1m")
    Path(args.out).write_text(json.dumps({
        "rows": rep.rows_read, "inserted": rep.inserted, "missing": len(bars.missing_us),
        "first_ts": ts.iloc[0].isoformat(), "last_ts": ts.iloc[-1].isoformat(),
        "generate_s": gen_s, "import_s": rep.seconds["total"]}))


# --------------------------------------------------------------------------- child: reference
def reference(args: argparse.Namespace) -> None:
    """backtesting.py on the CSV's bars; figures and trades as JSON to args.out."""
    import pandas as pd
    import talib

    t = time.perf_counter()
    import backtesting
    from backtesting import Strategy
    from backtesting.lib import FractionalBacktest
    import_s = time.perf_counter() - t

    t = time.perf_counter()
    raw = pd.read_csv(args.csv)
    tick = float(Decimal(args.tick))
    cols = {}
    for src, dst in (("open", "Open"), ("high", "High"), ("low", "Low"), ("close", "Close")):
        # the floats MMATS builds: integer ticks x tick (workers/backtest/data.py)
        ticks = np.rint(raw[src].to_numpy(np.float64) / tick).astype(np.int64)
        cols[dst] = ticks.astype(np.float64) * tick
    cols["Volume"] = raw["volume"].to_numpy(np.float64)
    cols["SmaFast"] = talib.SMA(cols["Close"], args.fast)
    cols["SmaSlow"] = talib.SMA(cols["Close"], args.slow)
    index = pd.DatetimeIndex(pd.to_datetime(raw["timestamp"], utc=True).dt.tz_localize(None),
                             name="ts")
    data = pd.DataFrame(cols, index=index)
    prep_s = time.perf_counter() - t
    rss_data = own_peak_rss_mb()

    class SmaCross(Strategy):
        def init(self) -> None:
            self.sma_fast = self.I(np.asarray, self.data.SmaFast, name="SMA_fast", overlay=False)
            self.sma_slow = self.I(np.asarray, self.data.SmaSlow, name="SMA_slow", overlay=False)
            self.ups = 0
            self.downs = 0

        def next(self) -> None:
            f, s = self.sma_fast, self.sma_slow
            if f[-2] <= s[-2] and f[-1] > s[-1]:  # crossed_above
                self.ups += 1
                if not self.position.is_long:
                    self.buy()
            elif f[-2] >= s[-2] and f[-1] < s[-1]:  # crossed_below
                self.downs += 1
                if self.position:
                    self.position.close()

    caught: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t = time.perf_counter()
        bt = FractionalBacktest(data, SmaCross, cash=args.cash, commission=args.commission,
                                trade_on_close=False, exclusive_orders=False, hedging=False,
                                finalize_trades=False, fractional_unit=float(Decimal(args.step)))
        construct_s = time.perf_counter() - t
        t, cpu0, all0 = time.perf_counter(), time.process_time(), busy_cpu_s()
        stats = bt.run()
        run_s = time.perf_counter() - t
        cpu, all1 = time.process_time() - cpu0, busy_cpu_s()
        other = None if all0 is None or all1 is None else max(all1 - all0 - cpu, 0.0)
        for w in seen:
            text = str(w.message).split("\n")[0]
            caught.append(text[:120])
    strategy = stats["_strategy"]
    trades = stats["_trades"]
    step = float(Decimal(args.step))
    out_trades = [
        [int(pd.Timestamp(e).value // 1000), int(pd.Timestamp(x).value // 1000),
         round(float(q) / step), float(ep), float(xp), float(pnl)]
        for e, x, q, ep, xp, pnl in zip(trades["EntryTime"], trades["ExitTime"], trades["Size"],
                                        trades["EntryPrice"], trades["ExitPrice"],
                                        trades["PnL"], strict=True)]
    kinds: dict[str, int] = {}
    for text in caught:  # e.g. "time=#: Broker canceled the relative-sized order ..."
        key = re.sub(r"[0-9][0-9.,]*", "#", text)[:90]
        kinds[key] = kinds.get(key, 0) + 1
    Path(args.out).write_text(json.dumps({
        "version": backtesting.__version__, "import_s": import_s, "prepare_s": prep_s,
        "construct_s": construct_s, "run_s": run_s, "other_cpu_s": other, "bars": len(data),
        "signals": strategy.ups + strategy.downs, "crosses_up": strategy.ups,
        "crosses_down": strategy.downs, "trades": int(stats["# Trades"]),
        "open_trades": len(strategy.trades),
        "final_equity": float(stats["Equity Final [$]"]),
        "return_pct": float(stats["Return [%]"]),
        "peak_rss_mb_after_data": rss_data, "peak_rss_mb": own_peak_rss_mb(),
        "warnings": kinds, "close_sum": float(cols["Close"].sum()), "trade_list": out_trades}))


# --------------------------------------------------------------------------- MMATS side
class _DbTimer:
    seconds = 0.0
    calls = 0
    samples: list[float] | None = None  # each call's time, while the replay runs


class TimedConnection(psycopg.Connection):  # type: ignore[type-arg]
    """A Connection that adds the time spent in execute() (send, server, receive: not the
    decoding of rows, which fetch*() does) to _DbTimer. About 0.3 us per call."""

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return super().execute(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t
            _DbTimer.seconds += dt
            _DbTimer.calls += 1
            if _DbTimer.samples is not None:
                _DbTimer.samples.append(dt)


class Backend:
    """The run connection's server process, when it is on this machine."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.pid = conn.info.backend_pid
        host = conn.info.host or ""
        proc = Path(f"/proc/{self.pid}")
        local = host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")
        try:
            comm = (proc / "comm").read_text().strip()
        except OSError:
            comm = ""
        self.local = local and comm.startswith("postgres")
        self.why = "" if self.local else (
            f"backend pid {self.pid} on {host!r} is not a local postgres process")
        self.tick = os.sysconf("SC_CLK_TCK")

    def cpu_s(self) -> float | None:
        if not self.local:
            return None
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def memory_mb(self) -> dict[str, float]:
        if not self.local:
            return {}
        out = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssShmem"):
                    out[key] = round(int(value.split()[0]) / 1024, 1)
        except OSError:
            pass
        return out


class Phase:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.figures: dict[str, dict[str, float | None]] = {}

    def run(self, name: str, fn: Any) -> Any:
        db0, calls0 = _DbTimer.seconds, _DbTimer.calls
        cpu0, be0, all0 = time.process_time(), self.backend.cpu_s(), busy_cpu_s()
        t = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t
        cpu = time.process_time() - cpu0
        be1, all1 = self.backend.cpu_s(), busy_cpu_s()
        backend = None if be0 is None or be1 is None else be1 - be0
        self.figures[name] = {
            "wall_s": wall, "db_wait_s": _DbTimer.seconds - db0,
            "db_calls": _DbTimer.calls - calls0, "python_cpu_s": cpu, "backend_cpu_s": backend,
            # CPU that neither this process nor its backend used: other load on the machine
            "other_cpu_s": None if all0 is None or all1 is None or backend is None
            else max(all1 - all0 - cpu - backend, 0.0)}
        return result


def run_mmats(url: str, args: argparse.Namespace, start: datetime, end: datetime,
              profiler: cProfile.Profile | None) -> tuple[dict[str, Any], dict[str, Any]]:
    from workers.backtest.config import BacktestConfig
    from workers.backtest.engine import Engine
    from workers.backtest.results import load_report, record_results

    rss_before = maxrss_mb()
    with TimedConnection.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT price_tick, quantity_step, min_quantity FROM "
                           "market.instruments WHERE symbol = %s", (SYMBOL,)).fetchone()
        assert row is not None
        tick, step, min_qty = row
        backend = Backend(conn)
        config = BacktestConfig(
            strategy="sma_crossover", symbols=(SYMBOL,), timeframe="1m", start=start, end=end,
            params={"fast": args.fast, "slow": args.slow}, cash=Decimal(str(args.cash)),
            commission=Decimal(str(args.commission)), label="bench_backtest")
        functions_note = ""
        if args.functions:
            try:
                conn.execute("SET track_functions = 'all'")
            except psycopg.Error as exc:
                functions_note = f"track_functions not set: {str(exc).splitlines()[0]}"
        phases = Phase(backend)
        if profiler is not None:
            profiler.enable()
        # run_backtest(conn, config) is these three calls (workers/backtest/run.py)
        engine = phases.run("load", lambda: Engine(conn, config))
        started = time.perf_counter()
        _DbTimer.samples = []
        phases.run("replay", engine.run)
        step_times, _DbTimer.samples = _DbTimer.samples, None
        phases.run("record", lambda: record_results(engine, time.perf_counter() - started))
        if profiler is not None:
            profiler.disable()
        rss_run = maxrss_mb()
        backend_mem = backend.memory_mb()
        functions: list[dict[str, Any]] = []
        if args.functions and not functions_note:
            conn.execute("SELECT pg_stat_force_next_flush()")
            functions = [
                {"function": f"{r[0]}.{r[1]}", "calls": r[2], "total_ms": round(r[3], 1),
                 "self_ms": round(r[4], 1), "self_ms_per_call": round(r[4] / max(r[2], 1), 4)}
                for r in conn.execute(
                    "SELECT schemaname, funcname, calls, total_time, self_time "
                    "FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT 25")]
        report = phases.run("load_report", lambda: load_report(conn, engine.run_id))
        c = engine.counts
        sd = engine.symbols[0]
    m = report["metrics"]
    mm = {
        "run_id": engine.run_id, "price_tick": str(tick), "quantity_step": str(step),
        "min_quantity": str(min_qty), "phases": phases.figures,
        "bars": c.bars, "signals": c.signals, "approved": c.approved, "rejected": c.rejected,
        "ignored": c.ignored, "fills": c.fills, "protective_orders": c.protective_orders,
        "steps": c.steps, "strategy_errors": len(c.strategy_errors),
        "trades": len(report["trades"]), "open_positions": len(report["open_positions"]),
        "open_quantity": sum(Decimal(p["quantity"]) for p in report["open_positions"]),
        "final_equity": m.get("final_equity"), "total_return": m.get("total_return"),
        "sanity": report["sanity"], "status": report["run"]["status"],
        "peak_rss_mb_before": rss_before, "peak_rss_mb": rss_run,
        "backend_pid": backend.pid, "backend_memory_mb": backend_mem,
        "backend_note": backend.why, "close_sum": float(sd.close[sd.first:].sum()),
        "step_times": step_times, "functions": functions, "functions_note": functions_note}
    return mm, report


def _us(iso: str) -> int:
    ts = datetime.fromisoformat(iso)
    return int((ts - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))


def compare_trades(report: dict[str, Any], ref: dict[str, Any], step: Decimal) -> dict[str, Any]:
    mine = [(_us(t["entry_time"]), _us(t["exit_time"]), int(Decimal(t["quantity"]) / step))
            for t in report["trades"]]
    theirs = [tuple(t[:3]) for t in ref["trade_list"]]
    same = 0
    first = None
    for a, b in zip(mine, theirs, strict=False):
        if a == b:
            same += 1
        elif first is None:
            first = {"n": same + 1, "mmats": a, "backtesting": b}
    if first is None and len(mine) != len(theirs):
        n = min(len(mine), len(theirs))
        first = {"n": n + 1, "mmats": mine[n] if n < len(mine) else None,
                 "backtesting": theirs[n] if n < len(theirs) else None}
    pnl_mine = [float(t["pnl"]) for t in report["trades"]]
    pnl_theirs = [t[5] for t in ref["trade_list"]]
    diffs = [abs(a - b) for a, b in zip(pnl_mine, pnl_theirs, strict=False)]
    return {"identical_prefix": same, "first_difference": first,
            "max_abs_pnl_diff": max(diffs) if diffs else 0.0}


def code_info() -> dict[str, Any]:
    """Which code ran: the checkout, its commit and the uncommitted changes to the engine,
    the trading core's SQL and the strategies (another engineer may be editing them)."""
    import workers.backtest.engine as engine_module

    info: dict[str, Any] = {"engine_file": engine_module.__file__}
    try:
        info["commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
            capture_output=True, text=True).stdout.strip()
        info["uncommitted"] = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "db", "workers",
             "strategies"], check=True, capture_output=True, text=True).stdout.split("\n")
        info["uncommitted"] = [line.strip() for line in info["uncommitted"] if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None  # not a git checkout (e.g. a `git archive` copy)
    return info


# --------------------------------------------------------------------------- main
def child(worker: str, **kw: Any) -> dict[str, Any]:
    out = Path(kw["out"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.3g}" if v and abs(v) < 0.01 else f"{v:,.{digits}f}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bars", type=int, default=1_000_000)
    ap.add_argument("--fast", type=int, default=10)
    ap.add_argument("--slow", type=int, default=20)
    ap.add_argument("--commission", type=float, default=0.001)
    ap.add_argument("--cash", type=float, default=10_000)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--profile", help="cProfile the MMATS phases; stats to this file")
    ap.add_argument("--functions", action="store_true",
                    help="track_functions=all on the run's connection; report the server "
                         "functions by self time (pg_stat_user_functions)")
    ap.add_argument("--json", dest="json_path")
    # internal: the child processes
    ap.add_argument("--worker", choices=("prepare", "reference"), help=argparse.SUPPRESS)
    for name in ("csv", "url", "out", "tick", "step", "seed"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "prepare":
        prepare(args)
        return
    if args.worker == "reference":
        reference(args)
        return
    if args.slow <= args.fast:
        ap.error("--slow must be above --fast")

    home = Path(tempfile.mkdtemp(prefix="mmats-bench-"))
    home.chmod(0o711)
    profiler = cProfile.Profile() if args.profile else None
    try:
        csv = home / "BTC-USDT_1m.csv"
        with fresh_database(home) as url:
            prep = child("prepare", csv=csv, url=url, bars=args.bars, out=home / "prep.json")
            start = datetime.fromisoformat(prep["first_ts"])
            end = datetime.fromisoformat(prep["last_ts"]) + timedelta(minutes=1)
            mm, report = run_mmats(url, args, start, end, profiler)
        ref = None
        if not args.skip_reference:
            ref = child("reference", csv=csv, out=home / "ref.json", fast=args.fast,
                        slow=args.slow, commission=args.commission, cash=args.cash,
                        tick=mm["price_tick"], step=mm["quantity_step"])
    finally:
        shutil.rmtree(home, ignore_errors=True)

    ph = mm["phases"]
    total = sum(ph[p]["wall_s"] for p in ("load", "replay", "record"))
    db_total = sum(ph[p]["db_wait_s"] for p in ("load", "replay", "record"))
    be = [ph[p]["backend_cpu_s"] for p in ("load", "replay", "record")]
    figures: dict[str, Any] = {
        "bars": args.bars, "fast": args.fast, "slow": args.slow,
        "commission": args.commission, "cash": args.cash, "seed": SEED,
        "profiled": profiler is not None, "code": code_info(),
        "generate_s": round(prep["generate_s"], 2), "import_s": round(prep["import_s"], 2),
        "quantity_step": mm["quantity_step"], "price_tick": mm["price_tick"],
    }
    for p in ("load", "replay", "record", "load_report"):
        f = ph[p]
        figures[f"mmats_{p}_s"] = round(f["wall_s"], 3)
        figures[f"mmats_{p}_db_wait_s"] = round(f["db_wait_s"], 3)
        figures[f"mmats_{p}_db_calls"] = f["db_calls"]
        figures[f"mmats_{p}_python_cpu_s"] = round(f["python_cpu_s"], 3)
        figures[f"mmats_{p}_backend_cpu_s"] = (None if f["backend_cpu_s"] is None
                                               else round(f["backend_cpu_s"], 2))
    other = [ph[p]["other_cpu_s"] for p in ("load", "replay", "record")]
    figures.update({
        "mmats_total_s": round(total, 3),
        # > a few % of mmats_total_s: something else ran on the machine (figures disturbed)
        "other_cpu_during_mmats_s": None if None in other else round(sum(other), 2),  # type: ignore[arg-type]
        "mmats_bars_per_s": round(mm["bars"] / total),
        "mmats_replay_bars_per_s": round(mm["bars"] / ph["replay"]["wall_s"]),
        "mmats_db_wait_share": round(db_total / total, 3),
        "mmats_backend_cpu_s": None if None in be else round(sum(be), 2),  # type: ignore[arg-type]
        "mmats_step_mean_ms": round(1000 * ph["replay"]["db_wait_s"] / max(mm["steps"], 1), 3),
        "mmats_python_per_bar_us": round(
            1e6 * (ph["replay"]["wall_s"] - ph["replay"]["db_wait_s"]) / mm["bars"], 2),
    })
    for k in ("bars", "signals", "approved", "rejected", "ignored", "fills",
              "protective_orders", "steps", "strategy_errors", "trades", "open_positions",
              "final_equity", "total_return", "status", "peak_rss_mb_before", "peak_rss_mb",
              "backend_pid"):
        figures[f"mmats_{k}"] = mm[k]
    steps = np.array(mm["step_times"]) * 1000  # every execute() of the replay, in ms
    if len(steps):
        tenth = max(len(steps) // 10, 1)
        figures.update({
            "mmats_step_p50_ms": round(float(np.percentile(steps, 50)), 3),
            "mmats_step_p95_ms": round(float(np.percentile(steps, 95)), 3),
            "mmats_step_first_tenth_mean_ms": round(float(steps[:tenth].mean()), 3),
            "mmats_step_last_tenth_mean_ms": round(float(steps[-tenth:].mean()), 3),
            "mmats_step_mean_ms_by_tenth": [round(float(part.mean()), 2) for part in
                                            np.array_split(steps, 10) if len(part)]})
    figures["mmats_open_quantity"] = str(mm["open_quantity"])
    figures["mmats_sanity_warnings"] = len(mm["sanity"])
    for k, v in mm["backend_memory_mb"].items():
        figures[f"mmats_backend_{k}_mb"] = v
    if args.functions:
        figures["server_functions_by_self_time"] = mm["functions"] or mm["functions_note"]
    if mm["backend_note"]:
        figures["mmats_backend_note"] = mm["backend_note"]
    if ref is not None:
        ref_total = ref["construct_s"] + ref["run_s"]
        figures.update({
            "backtesting_version": ref["version"],
            "ref_import_module_s": round(ref["import_s"], 3),
            "ref_prepare_data_s": round(ref["prepare_s"], 3),
            "ref_construct_s": round(ref["construct_s"], 3),
            "ref_run_s": round(ref["run_s"], 3),
            "ref_total_s": round(ref_total, 3),
            "other_cpu_during_ref_run_s": (None if ref["other_cpu_s"] is None
                                           else round(ref["other_cpu_s"], 2)),
            "ref_bars_per_s": round(ref["bars"] / ref_total),
            "ref_bars": ref["bars"], "ref_signals": ref["signals"],
            "ref_trades": ref["trades"], "ref_open_trades": ref["open_trades"],
            "ref_final_equity": round(ref["final_equity"], 6),
            "ref_peak_rss_mb": ref["peak_rss_mb"],
            "ref_warnings": ref["warnings"],
            "same_bars": abs(ref["close_sum"] - mm["close_sum"]) <= 1e-9 * abs(mm["close_sum"])
            and ref["bars"] == mm["bars"],
            "ratio_total_mmats_over_ref": round(total / ref_total, 2),
            "ratio_replay_over_ref_run": round(ph["replay"]["wall_s"] / ref["run_s"], 2),
            "final_equity_diff": (None if mm["final_equity"] is None else
                                  round(mm["final_equity"] - ref["final_equity"], 9)),
        })
        cmp = compare_trades(report, ref, Decimal(mm["quantity_step"]))
        figures["trades_identical_prefix"] = cmp["identical_prefix"]
        figures["trades_first_difference"] = cmp["first_difference"]
        figures["trades_max_abs_pnl_diff"] = cmp["max_abs_pnl_diff"]

    rows = [
        ("load / construct (s)", figures["mmats_load_s"], figures.get("ref_construct_s")),
        ("replay / run (s)", figures["mmats_replay_s"], figures.get("ref_run_s")),
        ("record results (s)", figures["mmats_record_s"], None),
        ("total (s)", figures["mmats_total_s"], figures.get("ref_total_s")),
        ("bars/s (total)", figures["mmats_bars_per_s"], figures.get("ref_bars_per_s")),
        ("signals", mm["signals"], figures.get("ref_signals")),
        ("closed trades", mm["trades"], figures.get("ref_trades")),
        ("open at the end", mm["open_positions"], figures.get("ref_open_trades")),
        ("final equity", mm["final_equity"], figures.get("ref_final_equity")),
        ("peak RSS, this process (MB)", mm["peak_rss_mb"], figures.get("ref_peak_rss_mb")),
    ]
    print(f"{args.bars:,} SYNTHETIC 1m bars, sma_crossover {args.fast}/{args.slow}, "
          f"commission {args.commission}, cash {args.cash:,.0f}"
          + ("  [PROFILED: times inflated]" if profiler else ""))
    print(f"{'':<30} {'MMATS':>16} {'backtesting.py':>16}")
    for label, a, b in rows:
        print(f"{label:<30} {fmt(a, 3 if 's)' in label else 2):>16} "
              f"{fmt(b, 3 if 's)' in label else 2):>16}")
    if ref is not None:
        print(f"ratio MMATS / backtesting.py: total {figures['ratio_total_mmats_over_ref']}x, "
              f"replay vs run {figures['ratio_replay_over_ref_run']}x")
    print()
    width = max(map(len, figures))
    for k, v in figures.items():
        if k == "server_functions_by_self_time" and isinstance(v, list):
            continue
        print(f"{k:<{width}}  {fmt(v, 3) if isinstance(v, float) else fmt(v)}")
    if isinstance(figures.get("server_functions_by_self_time"), list):
        print("\n--- server functions by self time (pg_stat_user_functions) ---")
        print(f"{'function':<44} {'calls':>8} {'total ms':>10} {'self ms':>10} {'self/call':>10}")
        for f in figures["server_functions_by_self_time"]:
            print(f"{f['function']:<44} {f['calls']:>8,} {f['total_ms']:>10,.1f} "
                  f"{f['self_ms']:>10,.1f} {f['self_ms_per_call']:>10.4f}")
    if profiler is not None:
        profiler.dump_stats(args.profile)
        for key, n in (("cumulative", 40), ("tottime", 25)):
            buf = io.StringIO()
            pstats.Stats(profiler, stream=buf).sort_stats(key).print_stats(n)
            print(f"\n--- profile, top {n} by {key} ---")
            print("\n".join(buf.getvalue().splitlines()[4:]))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
