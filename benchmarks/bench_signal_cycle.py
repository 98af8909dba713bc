"""Benchmark: the backtest's signal cycle (submit_signal, then apply_fill of its order).

    python benchmarks/bench_signal_cycle.py [--bars N] [--warmup N] [--statements N]
        [--floor [--floor-cycles N]] [--json FILE]

The shape of a backtest's calls, without the engine: one backtest account in operator
mode (trading.create_account(..., 'backtest', 'operator', 10000, ...), taker fee 0.1 %),
one strategy sized by percent of equity, no risk limits, one instrument with N 1m bars
(default 3,000). On every bar the strategy alternates buy and close: a signal shaped
like the engine's (version, venue, price and size as strings, ts one microsecond before
the bar's close, reasoning, metadata), then the fill of the approved order at that price
with a commission, as the simulator would send it. One autocommit connection; each call
is its own transaction, as each backtest.step is.

Prints client latency (p50/p95/p99/mean, calls/s) of both calls, their server time per
call (pg_stat_user_functions with track_functions = 'all') and, below, every function
they reach with its calls per cycle and total and self time per call. With
--statements N it starts its own embedded server with pg_stat_statements preloaded
(track = all) and also prints the N statements (nested ones included) that take the
most time per cycle. Uses MMATS_DATABASE_URL if set (without --statements), like the
other benchmarks. Warm-up cycles are not counted.

With --floor it also measures the least any design that keeps these rows could cost on
this server: the rows the measured cycles wrote (inserted, updated or deleted, per table,
from pg_stat_user_tables), the cost of one bare row write from PL/pgSQL (an INSERT of a
narrow row into a table with a primary key only: no other index, no foreign key, no
trigger, no logic), and one round trip carrying a signal document to a function that does
nothing. floor per cycle = rows x bare write + one round trip (a backtest could send a
fill and the next signal in one call), and the floor for --floor-cycles cycles (default
54,736: the signals, each with its fill, of bench_backtest.py --bars 1000000).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scratchdb import FAST, fresh_database

from db import migrate
from db.connect import conninfo_to_uri
from db.runtime import EmbeddedServer

T_START = datetime(2025, 1, 6, 0, 0, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)


def random_walk(rng: random.Random, n: int, price: float) -> list[tuple]:
    rows = []
    for k in range(n):
        o = price
        c = max(1.0, o * (1 + rng.gauss(0, 0.001)))
        h = max(o, c) * (1 + abs(rng.gauss(0, 0.0005)))
        lo = min(o, c) * (1 - abs(rng.gauss(0, 0.0005)))
        rows.append((T_START + timedelta(minutes=k), round(o, 2), round(h, 2), round(lo, 2),
                     round(c, 2), 1 + rng.randint(0, 50)))
        price = c
    return rows


@contextmanager
def statements_database(home: Path) -> Iterator[str]:
    """A migrated scratch database on an embedded server with pg_stat_statements."""
    settings = FAST | {"shared_preload_libraries": "pg_stat_statements",
                       "pg_stat_statements.track": "all",
                       "pg_stat_statements.max": "10000"}
    server = EmbeddedServer(home / "pg", settings=settings, quiet=True)
    server.start()
    try:
        base = server.url("postgres")
        name = f"mmats_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(base, autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = conninfo_to_uri(make_conninfo(base, dbname=name))
        migrate.upgrade(url)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        yield url
    finally:
        server.stop()


def setup(conn: psycopg.Connection, rng: random.Random, n_bars: int) -> tuple[int, list[tuple]]:
    inst = conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES ('CYCUSDT', 'sim', 'crypto', 'CYC', 'USDT', 0.01, 0.00001, 0.00001,"
        " 'CRYPTO_24X7') RETURNING instrument_id").fetchone()[0]
    bars = random_walk(rng, n_bars, 40000.0)
    with conn.cursor().copy("COPY market.bars (instrument_id, timeframe, ts, open, high, low,"
                            " close, volume) FROM STDIN") as cp:
        for ts, o, h, lo, c, v in bars:
            cp.write_row((inst, "1m", ts, o, h, lo, c, v))
    conn.execute("SELECT trading.create_account('cycle', 'backtest', 'operator', 10000, 'USDT',"
                 " taker_fee => 0.001)")
    conn.execute("SELECT trading.assign_strategy('cycle', 'sma_cross', 1, 'percent_equity')")
    return inst, bars


def signal(action: str, bar: tuple) -> Jsonb:
    close_ts = bar[0] + timedelta(minutes=1)
    return Jsonb({"account": "cycle", "strategy": "sma_cross", "version": "1",
                  "symbol": "CYCUSDT", "venue": "sim", "action": action,
                  "size": "0.95" if action == "buy" else "1", "price": str(bar[4]),
                  "ts": (close_ts - ONE_US).isoformat(),
                  "reasoning": "fast SMA crossed the slow one", "metadata": {}})


def fill(order_id: int, seq: int, res: dict, bar: tuple) -> Jsonb:
    q = Decimal(str(res["quantity"]))
    price = Decimal(str(bar[4]))
    return Jsonb({"order_id": order_id, "broker_fill_id": f"sim-1-{order_id}-{seq}",
                  "quantity": str(q), "price": str(price),
                  "commission": str((q * price * Decimal("0.001")).quantize(Decimal("1e-8"))),
                  "liquidity": "taker", "ts": (bar[0] + timedelta(minutes=1)).isoformat()})


def run(conn: psycopg.Connection, bars: list[tuple], start: int, n: int,
        sig_t: list[float], fill_t: list[float], outcomes: dict[str, int]) -> int:
    """n cycles from bar `start`; returns the next bar index."""
    long_ = conn.execute("SELECT COALESCE(sum(quantity), 0) > 0 FROM trading.positions"
                         " p JOIN trading.accounts a USING (account_id)"
                         " WHERE a.name = 'cycle'").fetchone()[0]
    k = start
    for _ in range(n):
        bar = bars[k % len(bars)]
        k += 1
        action = "close" if long_ else "buy"
        t = time.perf_counter()
        res = conn.execute("SELECT trading.submit_signal(%s)", (signal(action, bar),)).fetchone()[0]
        sig_t.append(time.perf_counter() - t)
        key = res["status"]
        if key != "approved":
            key = f"{key}:{res['reason_code']}"
        outcomes[key] = outcomes.get(key, 0) + 1
        if res["status"] != "approved":
            continue
        doc = fill(res["order_id"], k, res, bar)
        t = time.perf_counter()
        conn.execute("SELECT trading.apply_fill(%s)", (doc,)).fetchone()
        fill_t.append(time.perf_counter() - t)
        long_ = action == "buy"
    return k


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summary(values_s: list[float], prefix: str) -> dict:
    ms = [v * 1000 for v in values_s]
    return {
        f"{prefix}_n": len(ms),
        f"{prefix}_p50_ms": round(pct(ms, 50), 3),
        f"{prefix}_p95_ms": round(pct(ms, 95), 3),
        f"{prefix}_p99_ms": round(pct(ms, 99), 3),
        f"{prefix}_mean_ms": round(statistics.fmean(ms), 3),
        f"{prefix}_per_s": round(len(ms) / sum(values_s)),
    }


def function_times(conn: psycopg.Connection, cycles: int) -> list[dict]:
    conn.execute("SELECT pg_stat_force_next_flush()")
    rows = conn.execute(
        "SELECT schemaname || '.' || funcname, calls, total_time, self_time"
        " FROM pg_stat_user_functions WHERE calls > 0 ORDER BY total_time DESC").fetchall()
    return [{"function": name, "calls_per_cycle": round(calls / cycles, 2),
             "total_ms_per_call": round(total / calls, 4),
             "self_ms_per_call": round(self_ / calls, 4),
             "total_ms_per_cycle": round(total / cycles, 4)}
            for name, calls, total, self_ in rows]


def top_statements(conn: psycopg.Connection, cycles: int, n: int) -> list[dict]:
    rows = conn.execute(
        "SELECT calls, total_exec_time, regexp_replace(query, '\\s+', ' ', 'g')"
        " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database"
        " WHERE datname = current_database()) AND toplevel IS false"
        " ORDER BY total_exec_time DESC LIMIT %s", (n,)).fetchall()
    return [{"ms_per_cycle": round(total / cycles, 4), "calls_per_cycle": round(calls / cycles, 2),
             "ms_per_call": round(total / calls, 4), "query": q[:160]}
            for calls, total, q in rows]


def rows_written(conn: psycopg.Connection) -> dict[str, int]:
    """Rows inserted, updated or deleted per table since pg_stat_reset()."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        "SELECT schemaname || '.' || relname, n_tup_ins + n_tup_upd + n_tup_del"
        " FROM pg_stat_user_tables WHERE n_tup_ins + n_tup_upd + n_tup_del > 0"
        " ORDER BY 2 DESC, 1").fetchall()
    return {name: int(n) for name, n in rows}


def bare_costs(conn: psycopg.Connection, doc: Jsonb, n: int = 20000) -> tuple[float, float]:
    """(us per bare row write from PL/pgSQL, us per round trip of `doc` to a no-op
    function), on a scratch schema dropped afterwards; the best of three runs each."""
    conn.execute("DROP SCHEMA IF EXISTS floor_probe CASCADE")
    conn.execute("CREATE SCHEMA floor_probe")
    try:
        conn.execute("CREATE TABLE floor_probe.t (id bigserial PRIMARY KEY, a bigint,"
                     " b numeric, c text, d timestamptz DEFAULT now())")
        conn.execute("CREATE FUNCTION floor_probe.write(k int) RETURNS void LANGUAGE plpgsql"
                     " AS $$ BEGIN INSERT INTO floor_probe.t (a, b, c) VALUES (k, 1.5, 'x');"
                     " END $$")
        conn.execute("CREATE FUNCTION floor_probe.nothing(k int) RETURNS void"
                     " LANGUAGE plpgsql AS $$ BEGIN END $$")
        conn.execute("CREATE FUNCTION floor_probe.noop(d jsonb) RETURNS jsonb"
                     " LANGUAGE plpgsql AS $$ BEGIN RETURN '{}'; END $$")

        def timed(fn: str) -> float:
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                conn.execute(f"SELECT count(floor_probe.{fn}(g)) FROM generate_series(1, %s) g",
                             (n,))
                best = min(best, time.perf_counter() - t)
            return best

        write_us = (timed("write") - timed("nothing")) / n * 1e6
        trips = max(1, n // 4)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(trips):
                conn.execute("SELECT floor_probe.noop(%s)", (doc,), prepare=True).fetchone()
            best = min(best, time.perf_counter() - t)
        return write_us, best / trips * 1e6
    finally:
        conn.execute("DROP SCHEMA floor_probe CASCADE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bars", type=int, default=3000, help="1m bars, one cycle each")
    ap.add_argument("--warmup", type=int, default=200, help="cycles before measuring")
    ap.add_argument("--statements", type=int, default=0, metavar="N",
                    help="own server with pg_stat_statements: print the N costliest statements")
    ap.add_argument("--floor", action="store_true",
                    help="also measure the floor: rows written per cycle x a bare row write"
                         " + one round trip")
    ap.add_argument("--floor-cycles", type=int, default=54736, metavar="N",
                    help="cycles to state the floor for (default: the 1,000,000-bar"
                         " backtest benchmark's 54,736)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    rng = random.Random(7)
    home = Path(tempfile.mkdtemp(prefix="mmats-bench-"))
    home.chmod(0o711)
    figures: dict = {"bars": args.bars, "warmup_cycles": args.warmup}
    sig_t: list[float] = []
    fill_t: list[float] = []
    outcomes: dict[str, int] = {}
    functions: list[dict] = []
    statements: list[dict] = []
    written: dict[str, int] = {}
    scratch = statements_database if args.statements else fresh_database
    try:
        with scratch(home) as url, psycopg.connect(url, autocommit=True) as conn:
            figures["server"] = conn.execute("SHOW server_version").fetchone()[0]
            figures["cpus"] = os.cpu_count()
            figures["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
            _, bars = setup(conn, rng, args.bars + args.warmup)
            k = run(conn, bars, 0, args.warmup, [], [], {})
            try:
                conn.execute("SET track_functions = 'all'")
                # the set-up's and warm-up's counts reach the shared statistics first
                conn.execute("SELECT pg_stat_force_next_flush()")
                conn.execute("SELECT 1")
                conn.execute("SELECT pg_stat_reset()")
                if args.statements:
                    conn.execute("SELECT pg_stat_statements_reset()")
                tracked = True
            except psycopg.Error:  # not a superuser on an external server
                tracked = False
            t = time.perf_counter()
            run(conn, bars, k, args.bars, sig_t, fill_t, outcomes)
            wall = time.perf_counter() - t
            figures |= summary(sig_t, "submit_signal") | summary(fill_t, "apply_fill")
            figures["submit_signal_outcomes"] = outcomes
            figures["cycles_per_s"] = round(args.bars / wall)
            if tracked:
                functions = function_times(conn, args.bars)
                for f in functions:
                    if f["function"] in ("trading.submit_signal", "trading.apply_fill"):
                        name = f["function"].split(".")[1]
                        figures[f"server_{name}_mean_ms"] = f["total_ms_per_call"]
            if args.statements:
                statements = top_statements(conn, args.bars, args.statements)
            if args.floor and tracked:
                written = rows_written(conn)
                write_us, trip_us = bare_costs(conn, signal("buy", bars[0]))
                rows = sum(written.values()) / args.bars
                floor_us = rows * write_us + trip_us
                figures |= {
                    "floor_rows_written_per_cycle": round(rows, 2),
                    "floor_bare_row_write_us": round(write_us, 2),
                    "floor_round_trip_us": round(trip_us, 2),
                    "floor_per_cycle_us": round(floor_us, 1),
                    "measured_per_cycle_us": round(wall / args.bars * 1e6, 1),
                    "floor_cycles": args.floor_cycles,
                    "floor_for_those_cycles_s": round(floor_us * args.floor_cycles / 1e6, 2),
                }
            figures["audit_chain_intact"] = conn.execute(
                "SELECT count(*) = 0 FROM audit.verify_chain()").fetchone()[0]
            figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    width = max(map(len, figures))
    for key, v in figures.items():
        print(f"{key:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool)
              else f"{key:<{width}}  {v}")
    if functions:
        print("\nserver time by function (ms; per call, and per cycle = one signal + its fill)")
        print(f"{'function':<36} {'calls/cycle':>11} {'total/call':>10} {'self/call':>10}"
              f" {'total/cycle':>11}")
        for f in functions:
            print(f"{f['function']:<36} {f['calls_per_cycle']:>11} {f['total_ms_per_call']:>10}"
                  f" {f['self_ms_per_call']:>10} {f['total_ms_per_cycle']:>11}")
    if written:
        print(f"\nrows written per cycle, by table ({args.bars:,} cycles)")
        for name, n in written.items():
            print(f"  {name:<34} {n / args.bars:>6.2f}")
    if statements:
        print("\ncostliest nested statements (ms per cycle, calls per cycle, ms per call)")
        for s in statements:
            print(f"{s['ms_per_cycle']:>8} {s['calls_per_cycle']:>6} {s['ms_per_call']:>8}  "
                  f"{s['query']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(
            figures | {"functions": functions, "statements": statements,
                       "rows_written": written}, indent=2,
            default=str) + "\n")


if __name__ == "__main__":
    main()
