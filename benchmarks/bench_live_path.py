"""Benchmark: the live path on the replay feed (issue #5), N strategies x M symbols.

    python benchmarks/bench_live_path.py [--bars N] [--symbols 10] [--strategies 5]
        [--speed max|X] [--seed N] [--fast-server] [--timeout S] [--stall S]
        [--profile DIR] [--keep] [--json FILE]

What runs: the whole live pipeline, each worker in its own process, exactly as
`mmats paper --feed replay` runs it (api/cli_runtime.py): `mmats worker ingest|strategies|
router --config SESSION.toml`, started and supervised by workers.runtime.supervisor.
Supervisor, logs in MMATS_HOME/logs/replay-<N>/. The ingest worker is the replay feed
(workers/runtime/replay.py, ReplayIngest): it inserts the stored bars one time step at a
time (one INSERT of every symbol's bar of that minute, through the bars trigger), logs
`{"msg": "bars inserted", "bar": ..., "inserted_at": ...}` and waits in lockstep until
every strategy of the session's accounts has seen the bar, the paper broker has settled
it and no order of theirs waits in the queue; at `--speed max` (the default) the next
step follows at once, so the replay runs as fast as the pipeline settles. One difference
from `mmats paper`: the ingest worker is started only once the router and the strategy
worker have logged "... worker running" (they LISTEN by then). Started together, the
first bar may be inserted before the router listens; its notification is then lost, the
paper broker never settles that bar and the replay waits for it forever.

Set-up (untimed): a temporary MMATS_HOME whose embedded server is started by
db.connect.database_url, the way `mmats` starts it (durable commits; `--fast-server`
starts it with the test suite's settings instead: fsync, synchronous_commit and
full_page_writes off), migrated; with MMATS_DATABASE_URL set, a fresh database on that
server instead (dropped afterwards). SYNTHETIC 1m bars (workers.ingest.synthetic.generate,
seed `--seed` + k for symbol k, no gaps) for SYN0/USDT, SYN1/USDT, ... are written as CSV
and imported with workers.ingest.importer.import_file: `--bars` bars per symbol to replay
plus the warm-up (the largest warm-up of the strategies + 50 bars). The session is
prepared as prepare_replay prepares one, for several accounts: the symbols are copied to
a new venue replay<N> (copy_instruments) with their warm-up bars (copy_warmup); one paper
account in operator mode per strategy entry (100,000 USDT, commission 0.001, no
slippage), each entry trading every symbol (SYM@replay<N>) on 1m; the session TOML is
written by this script with a [replay] table whose `accounts` lists every account (the
replay waits for all of them); apply_config creates the accounts and assignments; each
strategy's resume point and each instrument's paper cursor are set at the last warm-up
bar.

Measured:
- latency, from a bar's arrival (the replay step's `inserted_at`: the ingest process's
  UTC wall clock right after its autocommit INSERT of that minute's bars returned) to:
  the signal recorded (trading.signals.created_at of the signals of that bar: signal ts
  = the bar's close - 1 us), the order queued (the order's queue message, pgmq
  a_orders.enqueued_at, written in the signal's transaction; orders of a signal only),
  the order read by the router (a_orders.last_read_at, clock_timestamp() of the read),
  and the paper fill applied (the time of its fill.applied audit event, clock_timestamp()
  as the ledger recorded it, joined to the arrival of the fill's own bar: fill ts = that
  bar's open time, i.e. bar t+1 for an order of bar t's signal, the triggering bar for a
  stop). created_at is the server's now(): the start of the transaction that wrote the
  row (the strategy worker's transaction of that bar). A fill's own transaction may have
  begun before its bar arrived (the router taking the last bar's orders into the paper
  book when the next bar comes fills them on it), so its time is the event's. Both
  clocks are UTC; on a local server they are the same system clock (the offset measured
  with clock_timestamp() is printed).
  p50/p95/p99/max/mean in ms, and counts. Target (reported, not asserted): p95 bar ->
  fill applied <= 50 ms.
- the lockstep cycle: the time between two steps' inserted_at (insert + the pipeline
  settling + the replay's settle polling).
- throughput: bars inserted (steps x symbols) / wall time of the replay (from the ingest
  log's "replay started" to its "ingest worker stopped"). Target: >= 1,000 bars/s.
- each worker process (ingest, strategies, router; the pids the Supervisor started):
  CPU time (user + system) and RSS sampled with psutil every 0.2 s; CPU over the process's
  life and within the replay window (interpolated between samples), peak RSS (the largest
  sample and the kernel's VmHWM). Also the CPU of each worker's server backends (matched
  by client port in pg_stat_activity, when the server is local), of every server process,
  and of the whole machine (/proc/stat), to show where the time goes.

`--profile DIR` runs each worker under cProfile (stats in DIR/<kind>.prof, top functions
printed; times are then inflated and the JSON says "profiled": true).

`--functions` has the server count the time of every PL/pgSQL and SQL function
(track_functions, set on the benchmark's database; it needs a superuser and adds a little
to each call) and prints the heaviest ones per replay step, by their own time and with
what they call: where the server's share of a step goes.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import platform
import pstats
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import busy_cpu_s
from scratchdb import FAST

from db import migrate
from db.connect import conninfo_to_uri, database_url
from db.runtime import EmbeddedServer
from workers.runtime.supervisor import Supervisor

ROOT = Path(__file__).resolve().parent.parent
TIMEFRAME = "1m"
TF_US = 60_000_000
MARKET = "crypto"
SOURCE_VENUE = "crypto"  # the importer's default venue for crypto
START = "2024-03-01"
WARMUP_EXTRA = 50  # warm-up bars beyond the largest strategy warm-up
CASH = "100000"
COMMISSION = "0.001"
SAMPLE_S = 0.2
KINDS = ("ingest", "strategies", "router")
TARGET_P95_MS = 50.0
TARGET_BARS_PER_S = 1000.0
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# the strategy entries, one paper account each (the first --strategies of them)
STRATEGY_SET: tuple[tuple[str, dict[str, object]], ...] = (
    ("sma_crossover", {"fast": 10, "slow": 20, "size": 0.1}),
    ("rsi_mean_reversion", {"period": 14, "size": 0.1}),
    ("donchian_breakout", {"channel": 20, "exit_channel": 10, "size": 0.1}),
    ("momentum_rotation", {"lookback": 20, "top_n": 3, "rebalance_every": 5}),
    ("sma_crossover", {"fast": 5, "slow": 15, "size": 0.1}),
    ("rsi_mean_reversion", {"period": 7, "oversold": 25.0, "exit_level": 55.0, "size": 0.1}),
    ("donchian_breakout", {"channel": 10, "exit_channel": 5, "stop_atr": 1.5,
                           "trail_atr": 2.0, "size": 0.1}),
    ("momentum_rotation", {"lookback": 10, "top_n": 2, "rebalance_every": 3}),
    ("sma_crossover", {"fast": 20, "slow": 50, "size": 0.1}),
    ("rsi_mean_reversion", {"period": 21, "size": 0.1}),
)


class BenchError(RuntimeError):
    """The benchmark cannot go on (a worker keeps dying, the replay does not finish)."""


def us(ts: datetime) -> int:
    """UTC epoch microseconds, exact."""
    return (ts - EPOCH) // timedelta(microseconds=1)


# --------------------------------------------------------------------------- database
@dataclass
class Database:
    url: str
    kind: str  # "embedded" | "external"
    env: dict[str, str]  # what the workers need to find it


@contextmanager
def database(home: Path, *, fast: bool, keep: bool) -> Iterator[Database]:
    """A migrated database: MMATS_DATABASE_URL's server (a fresh database, dropped after
    unless kept), or the embedded server of the temporary MMATS_HOME `home`."""
    external = os.environ.get("MMATS_DATABASE_URL")
    if external:
        base = make_conninfo(external, dbname="postgres")
        name = f"mmats_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(base, autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = conninfo_to_uri(make_conninfo(base, dbname=name))
        try:
            migrate.upgrade(url)
            yield Database(url, "external", {"MMATS_DATABASE_URL": url})
        finally:
            if not keep:
                with psycopg.connect(base, autocommit=True) as c:
                    c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(name)))
        return
    os.environ["MMATS_HOME"] = str(home)
    server = EmbeddedServer(home, settings=FAST if fast else None, quiet=True)
    if fast:
        server.start()  # the tuned settings are written at initdb; then as `mmats` does
    url = database_url()
    try:
        migrate.upgrade(url)
        yield Database(url, "embedded", {"MMATS_HOME": str(home)})
    finally:
        server.stop()


def import_bars(conn: psycopg.Connection, folder: Path, symbols: list[str], total: int,
                seed: int) -> dict[str, Any]:
    """`total` SYNTHETIC contiguous 1m bars per symbol, written as CSV and imported."""
    from workers.ingest.importer import import_file
    from workers.ingest.synthetic import generate, write

    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    first: datetime | None = None
    last: datetime | None = None
    inserted = 0
    for k, symbol in enumerate(symbols):
        bars = generate(symbol, MARKET, timeframe=TIMEFRAME, start=START, bars=total,
                        seed=seed + k, gap_rate=0.0)
        path = write(bars, folder / f"{symbol.replace('/', '-')}_{TIMEFRAME}.csv")
        report = import_file(conn, path, symbol=symbol, market=MARKET, timeframe=TIMEFRAME)
        inserted += report.inserted
        assert report.first_ts is not None and report.last_ts is not None
        first = report.first_ts if first is None else max(first, report.first_ts)
        last = report.last_ts if last is None else min(last, report.last_ts)
    assert first is not None and last is not None
    return {"first": first, "last": last, "inserted": inserted,
            "seconds": time.perf_counter() - t}


# --------------------------------------------------------------------------- the session
@dataclass
class Session:
    path: Path
    number: int
    venue: str
    accounts: list[str]
    entries: list[tuple[str, dict[str, object]]]
    targets: list[int]
    start: datetime
    end: datetime
    warmup: int
    log_dir: Path


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def prepare_session(conn: psycopg.Connection, home: Path, symbols: list[str],
                    n_strategies: int, replay_bars: int, first: datetime,
                    speed: float | None, warmup: int) -> Session:
    """Instruments and warm-up on a new replay venue, the accounts, the session file, the
    assignments and the strategies' resume points (what prepare_replay does, x N)."""
    from strategies.loader import StrategyLoader
    from workers.runtime import config as runtime_config
    from workers.runtime.replay import ReplaySession, copy_instruments, copy_warmup, next_session
    from workers.runtime.supervisor import apply_config

    entries = list(STRATEGY_SET[:n_strategies])
    loader = StrategyLoader()
    loader.reload_if_changed()
    instances = [loader.create(name, params) for name, params in entries]
    start = first + timedelta(minutes=warmup)
    end = start + timedelta(minutes=replay_bars)
    n = next_session(conn)
    venue = f"replay{n}"
    with conn.transaction():
        pairs = copy_instruments(conn, [f"{s}@{SOURCE_VENUE}" for s in symbols], venue)
        last_warmup = copy_warmup(conn, pairs, TIMEFRAME, start, warmup)
        row = conn.execute("SELECT quote_currency FROM market.instruments "
                           "WHERE instrument_id = %s", (pairs[0][0],)).fetchone()
        assert row is not None
        currency = str(row[0])
    assert last_warmup is not None
    accounts = [f"bench-live-{n}-{k + 1}" for k in range(len(entries))]
    session = ReplaySession(n, venue, accounts[0], TIMEFRAME, start, end, speed,
                            tuple(p[0] for p in pairs), tuple(p[1] for p in pairs),
                            tuple(p[2] for p in pairs), tuple(accounts))
    symbols_toml = "[" + ", ".join(_toml(f"{p[2]}@{venue}") for p in pairs) + "]"
    lines = [f"# benchmarks/bench_live_path.py: replay session {n}, "
             f"{len(entries)} strategies x {len(pairs)} symbols",
             "[runtime]", "heartbeat_seconds = 1", "bar_grace_seconds = 0", "",
             "[router]", "visibility_seconds = 5", "poll_ms = 20", ""]
    for account, (name, params) in zip(accounts, entries, strict=True):
        lines += ["[[accounts]]", f"name = {_toml(account)}", 'environment = "paper"',
                  'mode = "operator"', f"cash = {_toml(CASH)}", f"currency = {_toml(currency)}",
                  'broker = "paper"', "allow_short = false",
                  "[accounts.paper]", f"commission = {_toml(COMMISSION)}",
                  'slippage = "none"', 'spread = "0"', "",
                  "[[strategies]]", f"account = {_toml(account)}", f"name = {_toml(name)}",
                  f"symbols = {symbols_toml}", f"timeframe = {_toml(TIMEFRAME)}",
                  "[strategies.params]", *[f"{k} = {_toml(v)}" for k, v in params.items()], ""]
    lines.append(session.to_toml())
    folder = home / "sessions"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"replay-{n}.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    apply_config(conn, runtime_config.load(path))
    for account, instance in zip(accounts, instances, strict=True):
        conn.execute("SELECT runtime.advance_cursor(%s, NULL, %s)",
                     (f"strategy:{account}:{type(instance).name}:{TIMEFRAME}", last_warmup))
    for target in session.targets:  # the paper broker has settled the warm-up
        conn.execute("SELECT runtime.advance_cursor(%s, NULL, %s)",
                     (f"paper:{target}:{TIMEFRAME}", last_warmup))
    return Session(path, n, venue, accounts, entries, [p[1] for p in pairs], start, end,
                   warmup, home / "logs" / f"replay-{n}")


# --------------------------------------------------------------------------- sampling
def _vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


@dataclass
class Track:
    """One process's CPU time and RSS over time."""

    label: str
    pid: int
    proc: psutil.Process
    created: float
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss_peak: int = 0
    hwm_kb: int = 0
    gone: bool = False

    @classmethod
    def of(cls, label: str, pid: int) -> Track | None:
        try:
            proc = psutil.Process(pid)
            return cls(label, pid, proc, proc.create_time())
        except psutil.Error:
            return None

    def sample(self, now: float) -> None:
        if self.gone:
            return
        try:
            with self.proc.oneshot():
                t = self.proc.cpu_times()
                rss = self.proc.memory_info().rss
        except psutil.Error:  # gone (a zombie still answers cpu_times)
            self.gone = True
            return
        self.times.append(now)
        self.cpu.append(t.user + t.system)
        self.rss_peak = max(self.rss_peak, rss)
        hwm = _vm_hwm_kb(self.pid)
        if hwm is not None:
            self.hwm_kb = max(self.hwm_kb, hwm)

    def cpu_at(self, t: float) -> float:
        """CPU seconds used by time t (linear between samples, 0 at the process start)."""
        if not self.times or t <= self.created:
            return 0.0
        xs = [self.created, *self.times]
        ys = [0.0, *self.cpu]
        return float(np.interp(t, xs, ys))

    @property
    def total_cpu(self) -> float:
        return self.cpu[-1] if self.cpu else 0.0


class Sampler:
    """Samples the workers, their server backends, the server and the machine."""

    def __init__(self, conn: psycopg.Connection, local_server: bool) -> None:
        self.conn = conn
        self.workers: dict[int, Track] = {}
        self.backends: dict[int, Track] = {}
        self.server: dict[int, Track] = {}
        self.machine: list[tuple[float, float]] = []
        self.calls = 0
        self.port = int(conn.info.port)
        self.postmaster: psutil.Process | None = None
        self.why_no_server = ""
        if local_server:
            try:
                me = psutil.Process(conn.info.backend_pid)
                parent = me.parent()
                if parent is not None and "postgres" in parent.name():
                    self.postmaster = parent
                else:
                    self.why_no_server = "the backend's parent is not a postgres process"
            except psutil.Error as exc:
                self.why_no_server = f"cannot read the server's processes: {exc}"
        else:
            self.why_no_server = "the server is not on this machine"

    def sample(self, workers: dict[str, int]) -> None:
        now = time.time()
        for kind, pid in workers.items():
            if pid not in self.workers:
                track = Track.of(kind, pid)
                if track is None:
                    continue
                self.workers[pid] = track
        for track in self.workers.values():
            track.sample(now)
        if self.postmaster is not None:
            if self.calls % 5 == 0:
                self._map_backends()
                self._find_server_processes()
            for track in self.server.values():
                track.sample(now)
        busy = busy_cpu_s()
        if busy is not None:
            self.machine.append((now, busy))
        self.calls += 1

    def _find_server_processes(self) -> None:
        assert self.postmaster is not None
        try:
            procs = [self.postmaster, *self.postmaster.children()]
        except psutil.Error:
            return
        for p in procs:
            if p.pid not in self.server:
                track = Track.of("postgres", p.pid)
                if track is not None:
                    self.server[p.pid] = track

    def _map_backends(self) -> None:
        """Which server backend serves which worker: the worker's local TCP ports to the
        server, matched with pg_stat_activity.client_port."""
        ports: dict[int, str] = {}
        for track in self.workers.values():
            if track.gone:
                continue
            try:
                for c in track.proc.net_connections(kind="tcp"):
                    if c.raddr and c.raddr.port == self.port:
                        ports[c.laddr.port] = track.label
            except psutil.Error:
                continue
        if not ports:
            return
        try:
            rows = self.conn.execute("SELECT pid, client_port FROM pg_stat_activity "
                                     "WHERE client_port = ANY(%s)", (list(ports),)).fetchall()
        except psycopg.Error:
            return
        for pid, port in rows:
            if pid not in self.backends:
                server = self.server.get(pid) or Track.of("postgres", pid)
                if server is not None:
                    self.server[pid] = server
                    self.backends[pid] = Track(ports[port], server.pid, server.proc,
                                               server.created, server.times, server.cpu)

    def machine_delta(self, t0: float, t1: float) -> float | None:
        if len(self.machine) < 2:
            return None
        xs = [m[0] for m in self.machine]
        ys = [m[1] for m in self.machine]
        return float(np.interp(t1, xs, ys) - np.interp(t0, xs, ys))


# --------------------------------------------------------------------------- running
class BenchSupervisor(Supervisor):
    """The runtime's Supervisor; with a profile folder, each worker runs under cProfile."""

    def __init__(self, *args: Any, profile_dir: Path | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.profile_dir = profile_dir

    def command(self, kind: str) -> list[str]:
        if self.profile_dir is None:
            return super().command(kind)
        out = self.profile_dir / f"{kind}.prof"
        code = f"import cProfile; from api.cli import main; cProfile.run('main()', {str(out)!r})"
        return [sys.executable, "-c", code, "worker", kind, "--config", str(self.config_file)]


def _count(path: Path, msg: str) -> int:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return 0
    return text.count(f'"msg": {json.dumps(msg)}')


def _logged(path: Path, msg: str) -> bool:
    """Whether a worker's log has a line with this message."""
    return _count(path, msg) > 0


def run_workers(session: Session, env: dict[str, str], sampler: Sampler, timeout: float,
                stall: float, profile_dir: Path | None) -> dict[str, Any]:
    """The three workers under the Supervisor until the replay worker exits 0."""
    sup = BenchSupervisor(session.path, list(KINDS), env=env, log_dir=session.log_dir,
                          finished=lambda kind, code: kind == "ingest" and code == 0,
                          profile_dir=profile_dir)
    started = time.time()
    pids: dict[str, list[int]] = {k: [] for k in KINDS}
    # The router and the strategy worker first, the replay once both LISTEN: a bar
    # inserted before the router listens is never settled by the paper broker, and the
    # replay would wait for its paper cursor forever.
    ingest = sup.children["ingest"]
    ingest.next_start = float("inf")
    for kind in KINDS:
        if kind != "ingest":
            sup.spawn(sup.children[kind])
    listening_s: float | None = None
    checked = progressed = started
    last_steps = -1
    try:
        while True:
            if listening_s is None and all(
                    _logged(session.log_dir / f"{k}.log", f"{k} worker running")
                    for k in KINDS if k != "ingest"):
                listening_s = time.time() - started
                ingest.next_start = 0.0
                sup.spawn(ingest)
            live = {k: c.process.pid for k, c in sup.children.items() if c.process is not None}
            for k, pid in live.items():
                if pid not in pids[k]:
                    pids[k].append(pid)
            sampler.sample(live)  # before poll(): an exited worker is still a zombie here
            sup.poll()
            if ingest.process is None and ingest.exit_codes and ingest.exit_codes[-1] == 0:
                break
            for child in sup.children.values():
                if child.restarts > 3:
                    raise BenchError(f"the {child.kind} worker keeps dying (exit codes "
                                     f"{child.exit_codes[-3:]}); its log: "
                                     f"{session.log_dir / (child.kind + '.log')}")
            now = time.time()
            if now - started > timeout:
                raise BenchError(f"the replay did not finish in {timeout:.0f} s; logs in "
                                 f"{session.log_dir}")
            if now - checked > 5:
                checked = now
                steps = _count(session.log_dir / "ingest.log", "bars inserted")
                if steps != last_steps:
                    last_steps, progressed = steps, now
                elif now - progressed > stall:
                    raise BenchError(f"the replay made no progress for {stall:.0f} s "
                                     f"({steps} steps played); logs in {session.log_dir}")
            time.sleep(max(SAMPLE_S - (time.time() - started) % SAMPLE_S, 0.01))
    finally:
        live = {k: c.process.pid for k, c in sup.children.items() if c.process is not None}
        sampler.sample(live)
        sup.stop()
    return {"started": started, "ended": time.time(), "pids": pids,
            "others_listening_after_s": None if listening_s is None else round(listening_s, 3),
            "restarts": {k: c.restarts for k, c in sup.children.items()},
            "exit_codes": {k: c.exit_codes for k, c in sup.children.items()}}


# --------------------------------------------------------------------------- the figures
def read_ingest_log(path: Path) -> dict[str, Any]:
    """Arrival of each bar (us -> inserted_at us), and the replay's start and end."""
    arrivals: dict[int, int] = {}
    started: float | None = None
    stopped: float | None = None
    waits = 0
    errors: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        msg = rec.get("msg")
        if msg == "bars inserted":
            arrivals[us(datetime.fromisoformat(rec["bar"]))] = us(
                datetime.fromisoformat(rec["inserted_at"]))
        elif msg == "replay started":
            started = started or datetime.fromisoformat(rec["ts"]).timestamp()
        elif msg == "ingest worker stopped":
            stopped = datetime.fromisoformat(rec["ts"]).timestamp()
        elif msg == "waiting for the pipeline to settle":
            waits += 1
        elif rec.get("level") in ("error", "critical"):
            errors.append(str(msg)[:200])
    return {"arrivals": arrivals, "started": started, "stopped": stopped,
            "settle_warnings": waits, "errors": errors}


def latency_stats(values_us: Sequence[int]) -> dict[str, Any]:
    if not values_us:
        return {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None,
                "mean_ms": None, "min_ms": None}
    a = np.asarray(values_us, dtype=np.float64) / 1000.0
    return {"count": len(a), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3),
            "max_ms": round(float(a.max()), 3), "mean_ms": round(float(a.mean()), 3),
            "min_ms": round(float(a.min()), 3)}


_SIGNALS = """
SELECT s.ts, s.created_at, s.status::text, s.action::text, COALESCE(s.reason_code, '')
FROM trading.signals s JOIN trading.accounts a USING (account_id) WHERE a.name = ANY(%s)
"""
_ORDERS = """
WITH q AS (
    SELECT (message ->> 'order_id')::bigint AS order_id, min(enqueued_at) AS enqueued_at,
           min(last_read_at) AS last_read_at, min(archived_at) AS archived_at
    FROM pgmq.a_orders GROUP BY 1)
SELECT o.order_id, o.trigger::text, o.status::text, o.created_at, s.ts, q.enqueued_at,
       q.last_read_at, q.archived_at
FROM trading.orders o JOIN trading.accounts a USING (account_id)
LEFT JOIN trading.signals s ON s.signal_id = o.signal_id
LEFT JOIN q ON q.order_id = o.order_id
WHERE a.name = ANY(%s)
"""
_FILLS = """
SELECT f.ts, e.ts, o.trigger::text, o.signal_id IS NOT NULL
FROM trading.fills f JOIN trading.orders o USING (order_id)
JOIN trading.accounts a ON a.account_id = f.account_id
JOIN audit.events e ON e.event_type = 'fill.applied' AND e.entity = 'trading.fills'
                   AND e.entity_id = f.fill_id::text
WHERE a.name = ANY(%s)
"""


def latencies(conn: psycopg.Connection, accounts: list[str],
              arrivals: dict[int, int]) -> dict[str, Any]:
    sig: list[int] = []
    statuses: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    unmatched = Counter[str]()
    for ts, created, status, action, reason in conn.execute(_SIGNALS, (accounts,)):
        statuses[status] += 1
        actions[action] += 1
        if reason:
            reasons[reason] += 1
        arrival = arrivals.get(us(ts) + 1 - TF_US)
        if arrival is None:
            unmatched["signals"] += 1
            continue
        sig.append(us(created) - arrival)
    queued: list[int] = []
    read: list[int] = []
    triggers: Counter[str] = Counter()
    order_status: Counter[str] = Counter()
    for (_oid, trigger, status, _created, sig_ts, enqueued, last_read,
         _archived) in conn.execute(_ORDERS, (accounts,)):
        triggers[trigger] += 1
        order_status[status] += 1
        if sig_ts is None:
            continue  # protective and other orders without a signal: see the fills
        arrival = arrivals.get(us(sig_ts) + 1 - TF_US)
        if arrival is None or enqueued is None:
            unmatched["orders"] += 1
            continue
        queued.append(us(enqueued) - arrival)
        if last_read is not None:
            read.append(us(last_read) - arrival)
    fills: list[int] = []
    fills_signal: list[int] = []
    fills_other: list[int] = []
    fill_triggers: Counter[str] = Counter()
    for ts, created, trigger, from_signal in conn.execute(_FILLS, (accounts,)):
        fill_triggers[trigger] += 1
        arrival = arrivals.get(us(ts))
        if arrival is None:
            unmatched["fills"] += 1
            continue
        d = us(created) - arrival
        fills.append(d)
        (fills_signal if from_signal else fills_other).append(d)
    return {
        "bar_to_signal_recorded": latency_stats(sig),
        "bar_to_order_queued": latency_stats(queued),
        "bar_to_order_read_by_router": latency_stats(read),
        "bar_to_fill_applied": latency_stats(fills),
        "bar_to_fill_applied_signal_orders": latency_stats(fills_signal),
        "bar_to_fill_applied_other_orders": latency_stats(fills_other),
        "signal_status": dict(statuses), "signal_action": dict(actions),
        "signal_reason_codes": dict(reasons.most_common(10)),
        "order_trigger": dict(triggers), "order_status": dict(order_status),
        "fill_trigger": dict(fill_triggers), "unmatched": dict(unmatched)}


def process_figures(sampler: Sampler, pids: dict[str, list[int]], t0: float,
                    t1: float) -> dict[str, Any]:
    wall = t1 - t0
    out: dict[str, Any] = {}
    for kind in KINDS:
        tracks = [sampler.workers[p] for p in pids[kind] if p in sampler.workers]
        backends = [b for b in sampler.backends.values() if b.label == kind]
        cpu_run = sum(t.total_cpu for t in tracks)
        cpu_replay = sum(t.cpu_at(t1) - t.cpu_at(t0) for t in tracks)
        be_replay = sum(b.cpu_at(t1) - b.cpu_at(t0) for b in backends)
        out[kind] = {
            "pids": [t.pid for t in tracks], "samples": sum(len(t.times) for t in tracks),
            "cpu_s_total": round(cpu_run, 3), "cpu_s_replay": round(cpu_replay, 3),
            "cpu_share_of_replay_wall": round(cpu_replay / wall, 3) if wall > 0 else None,
            "peak_rss_mb_sampled": round(max((t.rss_peak for t in tracks), default=0) / 2**20,
                                         1),
            "peak_rss_mb_vmhwm": round(max((t.hwm_kb for t in tracks), default=0) / 1024, 1),
            "backends": len(backends),
            "backend_cpu_s_replay": round(be_replay, 3) if backends else None}
    if sampler.server:
        srv = sum(t.cpu_at(t1) - t.cpu_at(t0) for t in sampler.server.values())
        out["postgres"] = {"processes": len(sampler.server), "cpu_s_replay": round(srv, 3),
                           "cpu_share_of_replay_wall": round(srv / wall, 3) if wall else None}
    busy = sampler.machine_delta(t0, t1)
    cores = os.cpu_count() or 1
    out["machine"] = {"cpu_s_replay": None if busy is None else round(busy, 3),
                      "core_s_available": round(cores * wall, 3),
                      "utilisation": None if busy is None or wall <= 0
                      else round(busy / (cores * wall), 3)}
    return out


def machine_info(conn: psycopg.Connection, db: Database) -> dict[str, Any]:
    model = ""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    settings = {}
    for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes",
                 "shared_buffers", "max_connections"):
        row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
        settings[name] = None if row is None else row[0]
    host = str(conninfo_to_dict(db.url).get("host", ""))
    return {"cpu_model": model or platform.processor() or "?",
            "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "postgres": settings, "server": db.kind, "server_host": host,
            "server_local": host.startswith("/") or host in ("localhost", "127.0.0.1", "::1")}


def clock_offset_ms(conn: psycopg.Connection) -> dict[str, float]:
    """The server's clock minus this process's (UTC both), from the fastest of 20 reads."""
    best: tuple[float, float] | None = None
    for _ in range(20):
        t0 = time.time()
        row = conn.execute("SELECT clock_timestamp()").fetchone()
        t1 = time.time()
        assert row is not None
        offset = row[0].timestamp() - (t0 + t1) / 2
        if best is None or t1 - t0 < best[1]:
            best = (offset, t1 - t0)
    assert best is not None
    return {"offset_ms": round(best[0] * 1000, 3), "uncertainty_ms": round(best[1] * 500, 3)}


def print_profiles(profile_dir: Path, n: int = 20) -> None:
    for kind in KINDS:
        path = profile_dir / f"{kind}.prof"
        if not path.is_file():
            print(f"\n--- no profile for the {kind} worker ({path}) ---")
            continue
        for key in ("tottime", "cumulative"):
            buf = io.StringIO()
            pstats.Stats(str(path), stream=buf).sort_stats(key).print_stats(n)
            print(f"\n--- {kind} worker, top {n} by {key} ({path}) ---")
            print("\n".join(buf.getvalue().splitlines()[4:]).rstrip())


# --------------------------------------------------------------------------- output
def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def print_report(fig: dict[str, Any]) -> None:
    m = fig["machine"]
    pg = m["postgres"]
    print(f"MMATS live path on the replay feed: {fig['strategies']} strategies x "
          f"{fig['symbols']} symbols, {fig['bars_per_symbol']:,} SYNTHETIC {TIMEFRAME} bars "
          f"per symbol (+{fig['warmup_bars']} warm-up), speed {fig['speed']}"
          + ("  [PROFILED: times inflated]" if fig["profiled"] else ""))
    print(f"command: {fig['command']}")
    print(f"machine: {m['logical_cores']} logical cores ({m['physical_cores']} physical), "
          f"{m['cpu_model']}, {m['memory_gb']} GB; Python {m['python']}")
    print(f"server:  PostgreSQL {pg['server_version']} ({m['server']}, {m['server_host']}), "
          f"fsync {pg['fsync']}, synchronous_commit {pg['synchronous_commit']}, "
          f"full_page_writes {pg['full_page_writes']}, shared_buffers {pg['shared_buffers']}")
    print("strategies: " + "; ".join(
        f"{a}: {n} {','.join(f'{k}={v}' for k, v in p.items())}"
        for a, (n, p) in zip(fig["accounts"], fig["strategy_entries"], strict=True)))
    c = fig["clock"]
    print(f"clocks: arrival = the ingest process's UTC wall clock after its INSERT returned; "
          f"created_at = the server's now() (UTC, start of the writing transaction), a fill's "
          f"the clock_timestamp() of its audit event; "
          f"server - local offset {c['offset_ms']:+.3f} ms (+/- {c['uncertainty_ms']:.3f})"
          + ("" if m["server_local"] else "  [REMOTE SERVER: clock skew adds in]"))
    print()
    lat = fig["latency"]
    print(f"{'latency from the bar arrival (ms)':<44} {'count':>7} {'p50':>8} {'p95':>8} "
          f"{'p99':>8} {'max':>8} {'mean':>8}")
    rows = [("bar -> signal recorded", lat["bar_to_signal_recorded"]),
            ("bar -> order queued", lat["bar_to_order_queued"]),
            ("bar -> order read by the router", lat["bar_to_order_read_by_router"]),
            ("bar -> paper fill applied (fill's own bar)", lat["bar_to_fill_applied"]),
            ("  of which orders of a signal (next open)", lat["bar_to_fill_applied_signal_orders"]),
            ("  of which protective / other orders", lat["bar_to_fill_applied_other_orders"]),
            ("lockstep cycle (step to step)", fig["cycle"])]
    for label, s in rows:
        print(f"{label:<44} {fmt(s['count']):>7} {fmt(s['p50_ms'], 2):>8} "
              f"{fmt(s['p95_ms'], 2):>8} {fmt(s['p99_ms'], 2):>8} {fmt(s['max_ms'], 2):>8} "
              f"{fmt(s['mean_ms'], 2):>8}")
    t = fig["throughput"]
    print(f"lockstep cycle, mean ms by tenth of the run: {fig['cycle']['mean_ms_by_tenth']}")
    print()
    print(f"throughput: {t['bars_inserted']:,} bars ({t['steps']:,} steps x {fig['symbols']} "
          f"symbols) in {t['replay_wall_s']:.2f} s = {t['bars_per_s']:,.0f} bars/s "
          f"({t['steps_per_s']:,.1f} steps/s); whole run incl. worker start-up "
          f"{t['run_wall_s']:.2f} s"
          + ("" if fig["speed"] == "max" else
             f"  [paced at {fig['speed']} x real time: the pacing sets the throughput]"))
    tg = fig["targets"]
    print(f"targets: p95 bar -> fill <= {TARGET_P95_MS:.0f} ms: "
          f"{'MET' if tg['p95_fill_met'] else 'NOT MET'} ({fmt(tg['p95_fill_ms'], 2)} ms); "
          f">= {TARGET_BARS_PER_S:,.0f} bars/s: {'MET' if tg['bars_per_s_met'] else 'NOT MET'} "
          f"({tg['bars_per_s']:,.0f} bars/s)")
    print()
    p = fig["processes"]
    print(f"{'process':<12} {'pid':>8} {'CPU s run':>10} {'CPU s replay':>13} {'% of wall':>10} "
          f"{'CPU ms/step':>12} {'peak RSS MB':>12} {'VmHWM MB':>9} {'backends CPU s':>15}")
    steps = max(t["steps"], 1)
    for kind in KINDS:
        w = p[kind]
        share = w["cpu_share_of_replay_wall"]
        print(f"{kind:<12} {','.join(map(str, w['pids'])):>8} {fmt(w['cpu_s_total'], 2):>10} "
              f"{fmt(w['cpu_s_replay'], 2):>13} "
              f"{fmt(None if share is None else 100 * share, 0):>10} "
              f"{fmt(1000 * w['cpu_s_replay'] / steps, 2):>12} "
              f"{fmt(w['peak_rss_mb_sampled']):>12} {fmt(w['peak_rss_mb_vmhwm']):>9} "
              f"{fmt(w['backend_cpu_s_replay'], 2):>15}")
    if "postgres" in p:
        s = p["postgres"]
        print(f"{'postgres':<12} {'all ' + str(s['processes']):>8} {'':>10} "
              f"{fmt(s['cpu_s_replay'], 2):>13} {fmt(100 * s['cpu_share_of_replay_wall'], 0):>10}"
              f" {fmt(1000 * s['cpu_s_replay'] / steps, 2):>12}")
    mm = p["machine"]
    print(f"{'machine':<12} {'':>8} {'':>10} {fmt(mm['cpu_s_replay'], 2):>13} "
          f"{fmt(None if mm['utilisation'] is None else 100 * mm['utilisation'], 0):>10}"
          f"   (% of all {m['logical_cores']} cores x the replay's wall time)")
    if fig.get("server_processes_note"):
        print(f"(server processes not sampled: {fig['server_processes_note']})")
    print()
    print(f"signals: {fig['latency']['signal_status']} {fig['latency']['signal_action']}")
    if fig["latency"]["signal_reason_codes"]:
        print(f"signal reason codes: {fig['latency']['signal_reason_codes']}")
    print(f"orders: {fig['latency']['order_status']} by trigger {fig['latency']['order_trigger']}"
          f"; fills by trigger {fig['latency']['fill_trigger']}")
    for s in fig["accounts_summary"]:
        print(f"  {s['account']:<18} {s['strategy']:<19} signals {s['signals']:>5}  orders "
              f"{s['orders']:>5}  fills {s['fills']:>5}  trades {s['trades']:>4}  equity "
              f"{s['equity']:>12,.2f}")
    sanity = fig["sanity"]
    problems = {k: v for k, v in sanity.items() if v}
    fns = fig.get("server_functions")
    if isinstance(fns, list):
        print("\nserver functions, heaviest by own time (track_functions adds to each call):")
        print(f"  {'function':<36} {'calls/step':>10} {'own ms/step':>12} "
              f"{'incl. ms/step':>14} {'own us/call':>12}")
        for f in fns:
            print(f"  {f['function']:<36} {f['calls_per_step']:>10} {f['self_ms_per_step']:>12} "
                  f"{f['total_ms_per_step']:>14} {f['self_us_per_call']:>12}")
    elif fns:
        print(f"\nserver functions: {fns}")
    print("sanity: " + (str(problems) if problems
                        else "no worker restart, no runtime error, every bar played"))


# --------------------------------------------------------------------------- main
def track_functions(conn: psycopg.Connection) -> bool:
    """Count every function's calls and time in this database from now on (the workers'
    sessions start after this, so they count too)."""
    try:
        name = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
        conn.execute(sql.SQL("ALTER DATABASE {} SET track_functions = 'all'").format(
            sql.Identifier(name)))
        conn.execute("SET track_functions = 'all'")
        conn.execute("SELECT pg_stat_reset()")
        return True
    except psycopg.Error:
        return False


def function_times(conn: psycopg.Connection, steps: int, top: int = 15) -> list[dict[str, Any]]:
    """The heaviest functions by their own time (without what they call), per step."""
    rows = conn.execute(
        "SELECT schemaname || '.' || funcname, calls, total_time, self_time "
        "FROM pg_stat_user_functions WHERE calls > 0 ORDER BY self_time DESC LIMIT %s",
        (top,)).fetchall()
    per = max(steps, 1)
    return [{"function": name, "calls_per_step": round(calls / per, 2),
             "self_ms_per_step": round(self_ms / per, 3),
             "total_ms_per_step": round(total_ms / per, 3),
             "self_us_per_call": round(1000 * self_ms / calls, 1)}
            for name, calls, total_ms, self_ms in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--bars", type=int, default=2000, help="bars replayed per symbol")
    ap.add_argument("--symbols", type=int, default=10)
    ap.add_argument("--strategies", type=int, default=5,
                    help=f"strategy entries, one paper account each (1..{len(STRATEGY_SET)})")
    ap.add_argument("--speed", default="max", help="max, or N times real time")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--fast-server", action="store_true",
                    help="embedded server with fsync, synchronous_commit and "
                         "full_page_writes off (as the tests and the other benchmarks)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds for the replay")
    ap.add_argument("--stall", type=float, default=120.0,
                    help="give up when no bar was played for this many seconds")
    ap.add_argument("--profile", metavar="DIR", help="run each worker under cProfile")
    ap.add_argument("--functions", action="store_true",
                    help="count the server's time per function (track_functions)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary MMATS_HOME (logs, session file, database)")
    ap.add_argument("--json", dest="json_path", help="write every figure to this file")
    args = ap.parse_args()
    if not 1 <= args.strategies <= len(STRATEGY_SET):
        ap.error(f"--strategies must be 1..{len(STRATEGY_SET)}")
    if not 1 <= args.symbols <= 100 or args.bars < 1:
        ap.error("--symbols must be 1..100 and --bars >= 1")
    speed: float | None = None
    if args.speed.strip().lower() != "max":
        try:
            speed = float(args.speed)
        except ValueError:
            ap.error("--speed must be max or a number > 0")
        if not speed > 0 or math.isinf(speed):
            ap.error("--speed must be max or a number > 0")
    profile_dir = Path(args.profile).resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)

    from strategies.loader import StrategyLoader
    from workers.runtime.replay import summary

    loader = StrategyLoader()
    loader.reload_if_changed()
    entries = list(STRATEGY_SET[:args.strategies])
    warmup = max(loader.create(n, p).warmup_bars() for n, p in entries) + WARMUP_EXTRA
    symbols = [f"SYN{k}/USDT" for k in range(args.symbols)]
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    home = Path(tempfile.mkdtemp(prefix="mmats-bench-live-"))
    home.chmod(0o711)  # the embedded server runs as another user when we are root
    figures: dict[str, Any] = {}
    try:
        with database(home, fast=args.fast_server, keep=args.keep) as db, \
                psycopg.connect(db.url, autocommit=True) as conn:
            info = machine_info(conn, db)
            data = import_bars(conn, home / "data", symbols, warmup + args.bars, args.seed)
            session = prepare_session(conn, home, symbols, args.strategies, args.bars,
                                      data["first"], speed, warmup)
            env = dict(os.environ)
            env.pop("MMATS_CONFIG", None)
            env.pop("MMATS_DATABASE_URL", None)
            env.update(db.env)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
            sampler = Sampler(conn, info["server_local"])
            tracked = args.functions and track_functions(conn)
            run = run_workers(session, env, sampler, args.timeout, args.stall, profile_dir)
            clock = clock_offset_ms(conn)
            log = read_ingest_log(session.log_dir / "ingest.log")
            arrivals: dict[int, int] = log["arrivals"]
            t0 = log["started"] or run["started"]
            t1 = log["stopped"] or run["ended"]
            lat = latencies(conn, session.accounts, arrivals)
            row = conn.execute("SELECT count(*) FROM market.bars WHERE instrument_id = ANY(%s) "
                               "AND timeframe = %s AND ts >= %s",
                               (session.targets, TIMEFRAME, session.start)).fetchone()
            bars_inserted = int(row[0]) if row else 0
            errors: dict[str, int] = dict(conn.execute(
                "SELECT kind, count(*) FROM runtime.errors GROUP BY kind").fetchall())
            accounts_summary = []
            for account, (name, _p) in zip(session.accounts, session.entries, strict=True):
                s = summary(conn, account)
                accounts_summary.append({**s, "strategy": name, "cash": float(s["cash"]),
                                         "equity": float(s["equity"])})
            procs = process_figures(sampler, run["pids"], t0, t1)
            functions = function_times(conn, len(arrivals)) if tracked else None
    finally:
        if args.keep:
            print(f"kept {home} (MMATS_HOME; session file and logs under it)", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)

    times = sorted(arrivals.values())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    cycle = latency_stats(gaps)
    # a cycle that grows along the run shows there (history, tables, caches)
    cycle["mean_ms_by_tenth"] = [round(float(np.mean(part)) / 1000, 2)
                                 for part in np.array_split(np.asarray(gaps, dtype=float), 10)
                                 if len(part)]
    wall = t1 - t0
    steps = len(arrivals)
    fill_p95 = lat["bar_to_fill_applied"]["p95_ms"]
    bars_per_s = bars_inserted / wall if wall > 0 else 0.0
    figures = {
        "benchmark": "bench_live_path", "command": command,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "profiled": profile_dir is not None, "speed": args.speed, "seed": args.seed,
        "strategies": args.strategies, "symbols": args.symbols,
        "bars_per_symbol": args.bars, "warmup_bars": warmup, "timeframe": TIMEFRAME,
        "strategy_entries": [[n, p] for n, p in session.entries],
        "accounts": session.accounts, "session": session.number, "venue": session.venue,
        "replay_start": session.start.isoformat(), "replay_end": session.end.isoformat(),
        "machine": info, "clock": clock,
        "data": {"bars_imported": data["inserted"], "import_s": round(data["seconds"], 2)},
        "latency": lat, "cycle": cycle,
        "throughput": {"bars_inserted": bars_inserted, "steps": steps,
                       "replay_wall_s": round(wall, 3), "bars_per_s": round(bars_per_s, 1),
                       "steps_per_s": round(steps / wall, 2) if wall > 0 else None,
                       "run_wall_s": round(run["ended"] - run["started"], 3)},
        "targets": {"p95_fill_ms": fill_p95,
                    "p95_fill_target_ms": TARGET_P95_MS,
                    "p95_fill_met": fill_p95 is not None and fill_p95 <= TARGET_P95_MS,
                    "bars_per_s": round(bars_per_s, 1),
                    "bars_per_s_target": TARGET_BARS_PER_S,
                    "bars_per_s_met": bars_per_s >= TARGET_BARS_PER_S},
        "processes": procs,
        "accounts_summary": accounts_summary,
        "sanity": {"worker_restarts": {k: v for k, v in run["restarts"].items() if v},
                   "runtime_errors": errors, "settle_warnings": log["settle_warnings"],
                   "ingest_log_errors": log["errors"][:10],
                   "steps_missing": args.bars - steps if steps < args.bars else 0,
                   "unmatched_rows": lat["unmatched"],
                   "no_fills": lat["bar_to_fill_applied"]["count"] == 0},
        "bench_process_cpu_s": round(time.process_time(), 2),
    }
    if sampler.why_no_server:
        figures["server_processes_note"] = sampler.why_no_server
    if args.functions:
        figures["server_functions"] = functions if functions is not None else (
            "not counted: setting track_functions needs a superuser")
    print_report(figures)
    if profile_dir is not None:
        print_profiles(profile_dir)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
