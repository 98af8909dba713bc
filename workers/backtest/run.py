"""run_backtest: load, replay, record; a run that fails is recorded as failed."""

from __future__ import annotations

import contextlib
import time

import psycopg
from psycopg.types.json import Jsonb

from db.queries import query
from workers.backtest.config import BacktestConfig
from workers.backtest.engine import Engine, Progress
from workers.backtest.results import record_results


def run_backtest(conn: psycopg.Connection, config: BacktestConfig, *,
                 progress: Progress | None = None) -> int:
    """Run a backtest on an autocommit connection (every step is its own transaction, so
    a long run never holds locks that live trading needs); returns the run id."""
    if not conn.autocommit:
        raise ValueError("run_backtest needs an autocommit connection")
    engine = Engine(conn, config, progress=progress)  # validates and loads; writes nothing
    started = time.perf_counter()
    try:
        engine.run()
        record_results(engine, time.perf_counter() - started)
    except BaseException as exc:
        if engine.run_id:
            _mark_failed(conn, engine.run_id, exc, time.perf_counter() - started)
        raise
    return engine.run_id


def _mark_failed(conn: psycopg.Connection, run: int, exc: BaseException, elapsed: float) -> None:
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    with contextlib.suppress(psycopg.Error):  # the original error is the one to report
        conn.execute(query("backtest_finish_run"), {
            "run": run, "status": "failed", "fingerprint": None, "bars": None,
            "elapsed": elapsed, "error": f"{type(exc).__name__}: {message}", "notes": Jsonb({})})
