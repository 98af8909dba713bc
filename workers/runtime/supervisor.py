"""`mmats run`: the configured accounts and strategies made real, then each worker in its
own process, restarted with backoff when it dies, stopped gracefully on SIGTERM.

`build_worker` is also what `mmats worker KIND` runs: each worker can run alone.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from strategies.loader import StrategyLoader
from workers.ingest.backoff import BackoffPolicy
from workers.runtime import log
from workers.runtime.config import RuntimeConfig, RuntimeConfigError
from workers.runtime.paper import PaperBroker
from workers.runtime.router import RoutedAccount, Router
from workers.runtime.strategies import StrategyWorker
from workers.runtime.worker import Worker

KINDS = ("ingest", "strategies", "router", "reconciler", "notifier")


# ---------------------------------------------------------------------- set-up
def _known_symbol(conn: psycopg.Connection, config: RuntimeConfig, symbol: str) -> str | None:
    """Why a strategy's symbol cannot be traded, or None: it is in market.instruments
    (once: a bare symbol on several venues must name one; a replay session's copy, venue
    replay<N>, counts only when named), or a [[feeds]] entry of this
    configuration will store it (its instrument is created by the ingest worker)."""
    from workers.runtime.live_ingest import _venue

    name, _, venue = symbol.partition("@")
    rows = conn.execute("SELECT venue FROM market.instruments WHERE symbol = %s "
                        "AND (venue = %s OR (%s::text IS NULL AND venue !~ '^replay[0-9]+$'))",
                        (name, venue or None, venue or None)).fetchall()
    if len(rows) > 1:
        return (f"symbol {symbol!r} is on several venues ({', '.join(sorted(r[0] for r in rows))})"
                "; name one as SYMBOL@VENUE")
    if rows or any(name in {s.upper() for s in feed.symbols} and venue in ("", _venue(feed))
                   for feed in config.feeds):
        return None
    return (f"symbol {symbol!r} is not in market.instruments and no [[feeds]] entry "
            "provides it (import its bars or add it to a feed)")


def check_config(conn: psycopg.Connection, config: RuntimeConfig, *, symbols: bool = True,
                 notifications: bool = True) -> list[type[Any]]:
    """What `apply_config` and the workers will need, resolved and checked against the
    database without writing anything: the strategies and their parameters, the existing
    accounts' environments and (unless told not to) the strategies' symbols and the
    [notifications] table (with the secrets' environment variables of this process, which
    the workers inherit). Returns the strategy classes, one per [[strategies]] entry.
    Errors are one line naming the entry."""
    from strategies.loader import StrategyLoadError
    from strategies.params import ParamError

    loader = StrategyLoader(list(config.strategy_dirs))
    report = loader.reload_if_changed()
    if report.errors:
        raise RuntimeConfigError(str(report.errors[0]))
    classes: list[type[Any]] = []
    for n, cfg in enumerate(config.strategies, 1):
        where = f"[[strategies]] #{n} ({cfg.name} on {cfg.account})"
        try:
            cls = loader.get(cfg.name)
            cls(dict(cfg.params))  # unknown or out-of-range parameters fail here
        except (StrategyLoadError, ParamError) as exc:
            broken = "" if cfg.name in loader.names() or not loader.errors else (
                f"; a strategy file did not load: {next(iter(loader.errors.values()))}")
            raise RuntimeConfigError(f"{where}: {exc}{broken}") from None
        except Exception as exc:  # a user strategy's own check of its parameters
            first = (str(exc).splitlines() or [""])[0]
            raise RuntimeConfigError(f"{where}: {type(exc).__name__}: {first}") from None
        for symbol in cfg.symbols if symbols else ():
            problem = _known_symbol(conn, config, symbol)
            if problem:
                raise RuntimeConfigError(f"{where}: {problem}")
        classes.append(cls)
    for acc in config.accounts:
        row = conn.execute("SELECT environment::text, base_currency FROM trading.accounts "
                           "WHERE name = %s", (acc.name,)).fetchone()
        if row is not None and row[0] != acc.environment:
            raise RuntimeConfigError(
                f"[[accounts]] {acc.name}: the account exists as a {row[0]} account, the "
                f"configuration says {acc.environment}")
        if row is not None and row[1] != acc.currency:  # (it never changes)
            raise RuntimeConfigError(
                f"[[accounts]] {acc.name}: the account exists in {row[1]}, the configuration "
                f"says {acc.currency}")
    if notifications and config.notifications:
        from workers.notify.notifier import NotifyConfigError, parse_config

        try:
            parse_config(dict(config.notifications))
        except NotifyConfigError as exc:
            raise RuntimeConfigError(f"[notifications]: {exc}") from None
    return classes


def apply_config(conn: psycopg.Connection, config: RuntimeConfig, *, symbols: bool = False,
                 notifications: bool = False) -> list[str]:
    """Create the configured accounts that do not exist and assign the strategies (as
    the owner: run before the workers start). Everything is checked first
    (`check_config`; `mmats run` checks the symbols and notifications too) and written in
    one transaction: on any error nothing is written. Returns what it did, one line each."""
    classes = check_config(conn, config, symbols=symbols, notifications=notifications)
    done: list[str] = []
    with conn.transaction():
        for acc in config.accounts:
            row = conn.execute("SELECT mode::text FROM trading.accounts WHERE name = %s",
                               (acc.name,)).fetchone()
            if row is not None:
                if row[0] != acc.mode:  # (switched with mmats account operator|advisory)
                    done.append(f"account {acc.name} exists in {row[0]} mode: the "
                                f"configuration's {acc.mode} is not applied (`mmats account "
                                f"{acc.mode} {acc.name}` switches it)")
                continue
            fee = acc.costs.commission if acc.broker == "paper" else 0
            maker = acc.costs.maker_fee if acc.costs.maker_fee is not None else fee
            conn.execute("SELECT trading.create_account(%s, %s, %s, %s, %s, "
                         "allow_short => %s, taker_fee => %s, maker_fee => %s)",
                         (acc.name, acc.environment, acc.mode, acc.cash, acc.currency,
                          acc.allow_short, fee, maker))
            done.append(f"account {acc.name} created ({acc.environment}, {acc.mode}, "
                        f"{acc.cash} {acc.currency})")
        for cfg, cls in zip(config.strategies, classes, strict=True):
            conn.execute("SELECT trading._strategy(%s, %s)", (cls.name, cls.version))
            conn.execute("SELECT trading.assign_strategy(%s, %s, %s, %s, %s)",
                         (cfg.account, cls.name, cfg.allocation, cfg.sizing_method,
                          Jsonb(dict(cfg.sizing_params))))
            done.append(f"strategy {cls.name} {cls.version} on {cfg.account}: "
                        f"{', '.join(cfg.symbols)} {cfg.timeframe}")
    return done


def routed_accounts(conn: psycopg.Connection, config: RuntimeConfig,
                    broker_factory: Callable[..., Any] | None = None) -> dict[int, RoutedAccount]:
    out: dict[int, RoutedAccount] = {}
    for acc in config.accounts:
        row = conn.execute("SELECT account_id FROM trading.accounts WHERE name = %s",
                           (acc.name,)).fetchone()
        if row is None:
            raise RuntimeConfigError(f"account {acc.name} does not exist: run `mmats run` (it "
                                     "creates the configured accounts) or `mmats account create`")
        account_id = int(row[0])
        if acc.broker == "paper":
            out[account_id] = RoutedAccount(account_id, acc, PaperBroker(account_id, acc.name,
                                                                         acc.costs))
            continue
        if broker_factory is None:
            from workers.brokers.factory import make_broker

            broker_factory = make_broker
        broker, credential_endpoint = broker_factory(conn, acc)
        out[account_id] = RoutedAccount(account_id, acc, broker, credential_endpoint)
    return out


def build_worker(kind: str, config: RuntimeConfig, url: str, *,
                 name: str | None = None) -> Worker:
    """The worker of `kind` for this configuration (what `mmats worker KIND` runs)."""
    hb = config.heartbeat_seconds
    if kind == "strategies":
        if not config.strategies:
            raise RuntimeConfigError("no [[strategies]] configured: the strategy worker has "
                                     "nothing to run")
        return StrategyWorker(url, config.strategies, strategy_dirs=config.strategy_dirs,
                              name=name or "strategies", heartbeat_seconds=hb,
                              bar_grace_seconds=config.bar_grace_seconds,
                              strategy_timeout_seconds=config.strategy_timeout_seconds)
    if kind == "router":
        with psycopg.connect(url, autocommit=True) as conn:
            accounts = routed_accounts(conn, config)
        return Router(url, accounts, config=config.router, name=name or "router",
                      heartbeat_seconds=hb)
    if kind == "ingest":
        replay = config.replay
        if replay is not None:
            from workers.runtime.replay import ReplayIngest

            return ReplayIngest(url, replay, name=name, heartbeat_seconds=hb)
        from workers.runtime.live_ingest import build_live_ingest

        return build_live_ingest(url, config, name=name or "ingest")
    if kind == "reconciler":
        from workers.runtime.reconciler import Reconciler

        with psycopg.connect(url, autocommit=True) as conn:
            accounts = routed_accounts(conn, config)
        return Reconciler(url, accounts, name=name or "reconciler", heartbeat_seconds=hb)
    if kind == "notifier":
        from workers.runtime.notify_worker import build_notifier

        return build_notifier(url, config, name=name or "notifier")
    raise RuntimeConfigError(f"unknown worker {kind!r}: expected one of {', '.join(KINDS)}")


def kinds_for(config: RuntimeConfig) -> list[str]:
    """The workers a configuration needs."""
    kinds = []
    if config.feeds or config.replay is not None:
        kinds.append("ingest")
    if config.strategies:
        kinds.append("strategies")
    if any(a.mode == "operator" or a.broker != "paper" for a in config.accounts):
        kinds.append("router")
    if any(a.broker != "paper" for a in config.accounts):
        kinds.append("reconciler")
    if config.notifications.get("channels"):
        kinds.append("notifier")
    return kinds


# ---------------------------------------------------------------------- supervision
@dataclass
class Child:
    kind: str
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0  # consecutive crashes: reset once a worker has run healthily
    next_start: float = 0.0
    started_at: float = 0.0
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Runs each worker as `mmats worker KIND --config FILE` and keeps it running."""

    def __init__(self, config_file: Path, kinds: Sequence[str], *,
                 env: dict[str, str] | None = None, log_dir: Path | None = None,
                 restart: bool = True, finished: Callable[[str, int], bool] | None = None,
                 restart_base: float = 0.5, restart_cap: float = 30.0,
                 healthy_seconds: float = 60.0, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config_file = config_file
        self.children = {k: Child(k) for k in kinds}
        self.env = dict(os.environ if env is None else env)
        self.log_dir = log_dir
        self.restart = restart
        self.finished = finished  # (kind, exit code) -> True: it is done, do not restart
        # half of each restart's window is randomised (as the router's retries), so
        # workers that crashed together do not come back in step
        self.backoff = BackoffPolicy(base=restart_base, cap=max(restart_cap, restart_base),
                                     jitter=0.5)
        self.healthy_seconds = healthy_seconds  # a run this long resets the backoff
        self.rng = rng or random.Random()
        self.clock = clock
        self.stop_event = threading.Event()
        self.log = log.get("supervisor")
        self._logs: list[Any] = []

    def command(self, kind: str) -> list[str]:
        return [sys.executable, "-c", "from api.cli import main; main()", "worker", kind,
                "--config", str(self.config_file)]

    def spawn(self, child: Child) -> None:
        out: Any = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = (self.log_dir / f"{child.kind}.log").open("ab")
            self._logs.append(out)
        child.process = subprocess.Popen(self.command(child.kind), env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        child.started_at = self.clock()
        log.event(self.log, "worker started", worker_kind=child.kind, pid=child.process.pid,
                  restarts=child.restarts)

    def start(self) -> None:
        for child in self.children.values():
            self.spawn(child)

    def poll(self) -> bool:
        """Restart what died; True while any worker runs (or will be restarted)."""
        alive = False
        now = self.clock()
        for child in self.children.values():
            p = child.process
            if p is not None and p.poll() is None:
                alive = True
                continue
            if p is not None:
                code = int(p.returncode)
                child.exit_codes.append(code)
                child.process = None
                done = self.finished is not None and self.finished(child.kind, code)
                if done or not self.restart or self.stop_event.is_set():
                    log.event(self.log, "worker ended", worker_kind=child.kind, code=code)
                    child.next_start = float("inf")
                    continue
                if now - child.started_at >= self.healthy_seconds:
                    child.restarts = 0  # it ran healthily: this crash starts small again
                child.restarts += 1
                delay = self.restart_delay(child.restarts)
                child.next_start = now + delay
                log.event(self.log, "worker died, restarting", 40, worker_kind=child.kind,
                          code=code, delay=delay)
            if child.next_start != float("inf"):
                alive = True
                if now >= child.next_start and not self.stop_event.is_set():
                    self.spawn(child)
        return alive

    def restart_delay(self, restarts: int) -> float:
        """Seconds before the restart after `restarts` consecutive crashes: exponential
        from `restart_base` up to the cap, the upper half of each window at random."""
        lo, hi = self.backoff.bounds(max(restarts - 1, 0))
        return lo + (hi - lo) * self.rng.random()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to every worker, SIGKILL to those still running after `timeout`."""
        self.stop_event.set()
        for child in self.children.values():
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in self.children.values():
            p = child.process
            if p is None:
                continue
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fh in self._logs:
            fh.close()

    def run(self) -> None:
        self.start()
        try:
            while not self.stop_event.wait(0.2):
                if not self.poll():
                    break
        finally:
            self.stop()
