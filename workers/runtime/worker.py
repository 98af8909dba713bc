"""What every worker shares: a database session in its role, a stop event that SIGTERM
sets, a heartbeat row, and errors reported where a human (and the notifier) sees them."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from db.connect import utc
from workers.runtime import log

ROLES = {"strategies": "mmats_strategy", "router": "mmats_router",
         "reconciler": "mmats_router", "notifier": "mmats_api"}


def connect(url: str, role: str | None, *, autocommit: bool = True) -> psycopg.Connection:
    """A session that acts as `role` (the worker's database role), whatever user logged
    in: what the role may not do, the worker cannot do either."""
    conn = psycopg.connect(url, autocommit=autocommit, application_name="mmats-worker")
    utc(conn)
    if role:
        conn.execute(psycopg.sql.SQL("SET ROLE {}").format(psycopg.sql.Identifier(role)))
        if not autocommit:
            conn.commit()
    return conn


class Worker:
    """A loop that runs `step()` until stopped, beating its heart between steps."""

    kind = "worker"

    def __init__(self, url: str, name: str, *, heartbeat_seconds: float = 5.0) -> None:
        self.url = url
        # what libpq says about a bad URL can quote a piece of its password as a host name
        log.register_url(url)
        self.name = name
        self.heartbeat_seconds = heartbeat_seconds
        self.stop_event = threading.Event()
        self.log = log.get(name)
        self._last_beat = 0.0
        self._hb_conn: psycopg.Connection | None = None
        self.detail: dict[str, Any] = {}
        self.state = "starting"

    # ------------------------------------------------------------------ life
    def stop(self) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop after the step in progress."""
        def handler(signum: int, _frame: object) -> None:
            log.event(self.log, "stop requested", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, *, until: Callable[[], bool] | None = None) -> None:
        self.beat("starting", force=True)
        self.start()
        self.state = "running"
        log.event(self.log, f"{self.kind} worker running", worker_kind=self.kind)
        try:
            while not self.stop_event.is_set():
                self.step()
                self.beat(self.state)
                if until is not None and until():
                    break
        except Exception as exc:
            self.state = "failed"
            self.beat("failed", force=True, error=str(exc).splitlines()[0] if str(exc) else "")
            raise
        finally:
            self.close()
        self.beat("stopped", force=True)
        log.event(self.log, f"{self.kind} worker stopped")

    def start(self) -> None:
        """Open connections and catch up (overridden)."""

    def step(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release what `start` opened (overridden)."""

    # ------------------------------------------------------------------ heartbeat, errors
    def _hb(self) -> psycopg.Connection:
        if self._hb_conn is None or self._hb_conn.closed:
            self._hb_conn = connect(self.url, ROLES.get(self.kind, "mmats_router"))
        return self._hb_conn

    def beat(self, state: str, *, force: bool = False, **extra: Any) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < self.heartbeat_seconds:
            return
        self._last_beat = now
        args: tuple[Any, ...] = (state, os.getpid(), socket.gethostname()[:255],
                                 Jsonb(log.redact_fields({**self.detail, **extra})))
        if ROLES.get(self.kind) == "mmats_strategy":  # (it may not stand in for others)
            sql, args = "SELECT runtime.strategy_heartbeat(%s, %s, %s, %s, %s)", (self.name, *args)
        else:
            sql = "SELECT runtime.heartbeat(%s, %s, %s, %s, %s, %s)"
            args = (self.name, self.kind, *args)
        try:
            self._hb().execute(sql, args)
        except psycopg.Error as exc:  # a heartbeat never stops the work
            log.event(self.log, "heartbeat failed", 30, error=str(exc).splitlines()[0])
            self._hb_conn = None
        if state in ("stopped", "failed") and self._hb_conn is not None:
            self._hb_conn.close()
            self._hb_conn = None

    def report(self, kind: str, message: str, *, account: str | None = None,
               **details: Any) -> None:
        """An error worth a human's attention: logged, and a runtime.errors row (shown by
        `mmats workers` and the notifier), both redacted like the log."""
        log.event(self.log, message, 40, kind=kind, account=account, **details)
        try:
            self._hb().execute("SELECT runtime.report_error(%s, %s, %s, %s, %s)",
                               (self.name, kind, log.redact(message), account,
                                Jsonb(log.redact_fields(details))))
        except psycopg.Error as exc:
            log.event(self.log, "could not record the error", 40,
                      error=str(exc).splitlines()[0])
            self._hb_conn = None
