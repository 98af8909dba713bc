"""Benchmark: the trading core's hot paths (submit_signal, apply_fill, bar ingest).

    python benchmarks/bench_trading_core.py [--signals N] [--cycles N] [--bars N]
        [--batch N] [--without LIMIT_TYPE ...] [--json FILE]

Uses MMATS_DATABASE_URL if set (a fresh database is created on that server and dropped
afterwards); otherwise starts a temporary embedded server in a temp dir, tuned like the
tests (fsync, synchronous_commit and full_page_writes off). Paper operator accounts
(`bench`, and `bench2` for (d)), 10 symbols with 1m bar history, 5 strategies x 10
symbols on each, every risk rule type configured (generous values, so signals pass every
check but every check runs). With one autocommit connection it measures (a)-(c):

  (a) submit_signal latency and signals/s: each (strategy, symbol) pair alternates buy
      and close; every approved order is filled (untimed here) so that positions and
      open orders stay realistic (25-50 positions open);
  (b) apply_fill latency and fills/s: the fills of (a), timed on their own;
  (c) bar ingest (bars/s) through the market.bars AFTER INSERT trigger with 50 open
      positions under protection (stops, targets, trailing stops, breakeven far away),
      bars inserted by COPY in batches, 10 symbols per minute; and, for comparison, the
      same ingest with no position open (the trigger's probe only);
  (d) signal-and-fill cycles per second of wall time with one session on `bench`, then
      with one session per account at once (threads, one connection each): how the
      core scales across accounts on the machine's cores (one account's signals are
      serialised by its lock, which is what makes its limits race-free).

Targets: submit_signal p95 <= 2 ms and >= 2,000 signals/s; >= 20,000 bars/s with the
triggers active. Warm-up calls are not counted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scratchdb import fresh_database

SYMBOLS = [f"SYM{i}USD" for i in range(10)]
STRATEGIES = [  # name, sizing method, params, allocation
    ("st_pct", "percent_equity", {}, 0.2),
    ("st_qty", "fixed_quantity", {"quantity": 10}, 0.2),
    ("st_notional", "fixed_notional", {"amount": 1000}, 0.2),
    ("st_risk", "risk_per_trade", {"risk": 0.0001}, 0.2),
    ("st_vol", "volatility", {"risk": 0.00001, "period": 14, "timeframe": "1m"}, 0.2),
]
ACCOUNTS = ["bench", "bench2"]  # (a) uses the first; (d) one session per account
HISTORY = 300                                      # 1m bars per symbol before the start
T_START = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)   # first history bar
T_SIG = T_START + timedelta(minutes=HISTORY)       # signals are dated here
FILL_IDS = itertools.count(1)                      # broker fill ids, unique per run


def random_walk_bars(rng: random.Random, inst: int, start: datetime, n: int, price: float,
                     tf_minutes: int = 1) -> tuple[list[tuple], float]:
    rows = []
    for k in range(n):
        o = price
        c = max(1.0, o * (1 + rng.gauss(0, 0.001)))
        h = max(o, c) * (1 + abs(rng.gauss(0, 0.0005)))
        lo = min(o, c) * (1 - abs(rng.gauss(0, 0.0005)))
        rows.append((inst, "1m", start + timedelta(minutes=k * tf_minutes), round(o, 4),
                     round(h, 4), round(lo, 4), round(c, 4), 100 + rng.randint(0, 900)))
        price = c
    return rows, price


def copy_bars(conn: psycopg.Connection, rows: list[tuple]) -> None:
    with conn.cursor().copy("COPY market.bars (instrument_id, timeframe, ts, open, high, low,"
                            " close, volume) FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)


def setup(conn: psycopg.Connection, rng: random.Random,
          without: tuple[str, ...] = ()) -> tuple[dict[str, int], dict]:
    insts = {}
    last = {}
    for k, sym in enumerate(SYMBOLS):
        insts[sym] = conn.execute(
            "INSERT INTO market.instruments (symbol, venue, market, base_currency,"
            " quote_currency, price_tick, quantity_step, min_quantity, calendar_id)"
            " VALUES (%s, 'bench', 'crypto', %s, 'USD', 0.0001, 0.001, 0.001, 'CRYPTO_24X7')"
            " RETURNING instrument_id", (sym, sym[:-3])).fetchone()[0]
        rows, last[sym] = random_walk_bars(rng, insts[sym], T_START, HISTORY, 100.0 + 10 * k)
        copy_bars(conn, rows)
    for account in ACCOUNTS:
        conn.execute("SELECT trading.create_account(%s, 'paper', 'operator', 10000000)",
                     (account,))
        for name, method, params, alloc in STRATEGIES:
            conn.execute("SELECT trading.assign_strategy(%s, %s, %s::numeric, %s, %s)",
                         (account, name, alloc, method, Jsonb(params)))
    limits = [  # every rule type, generous: every check runs, none denies
        ("MAX_POSITION_SIZE", 0.5, "global", None, {}),
        ("MAX_POSITION_SIZE", 0.5, "symbol", "SYM0USD", {}),
        ("MAX_EXPOSURE", 1.0, "global", None, {}),
        ("MAX_EXPOSURE", 0.9, "market", "crypto", {}),
        ("MAX_EXPOSURE", 0.5, "strategy", "st_pct", {}),
        ("MAX_LEVERAGE", 5, "global", None, {}),
        ("MAX_OPEN_POSITIONS", 1000, "global", None, {}),
        ("MAX_OPEN_POSITIONS", 100, "symbol", "SYM1USD", {}),
        ("MAX_DRAWDOWN", 0.9, "global", None, {"mode": "SOFT"}),
        ("DAILY_LOSS", 1e9, "global", None, {"mode": "SOFT"}),
        ("MAX_CORRELATION", 1.0, "global", None, {"lookback": 30, "timeframe": "1m"}),
        ("TRADING_HOURS", 1, "global", None, {"days": [1, 2, 3, 4, 5, 6, 7], "tz": "UTC"}),
        ("MIN_VOLUME", 1, "global", None, {"timeframe": "1m"}),
        ("MAX_VOLATILITY", 1.0, "global", None, {"period": 14, "timeframe": "1m"}),
        ("REQUIRE_STOP_LOSS", 1, "global", None, {}),
        ("MAX_ORDER_VALUE", 1e9, "global", None, {}),
    ]
    for lt, value, scope, key, params in limits:
        if lt in without:
            continue
        conn.execute("SELECT risk.set_limit(%s, %s::numeric, %s, %s, params => %s)",
                     (lt, value, scope, key, Jsonb(params)))
    n_types = conn.execute("SELECT count(DISTINCT limit_type) FROM risk.limits").fetchone()[0]
    total_types = conn.execute("SELECT count(*) FROM risk.limit_types").fetchone()[0]
    assert n_types == total_types - len(set(without)), (n_types, total_types)
    return insts, last


def signal_for(strategy: str, sym: str, action: str, price: float,
               account: str = "bench") -> Jsonb:
    return Jsonb({
        "account": account, "strategy": strategy, "symbol": sym, "action": action,
        "ts": T_SIG.isoformat(), "size": 0.0005 if strategy == "st_pct" else 1,
        # protection far away: it must not fire during the bar ingest
        "stop_loss": round(price * 0.5, 4), "take_profit": round(price * 2, 4),
        "trailing_stop": round(price * 0.45, 4), "confidence": 0.7,
        "reasoning": "benchmark", "metadata": {"breakeven": round(price * 1.8, 4)}})


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


def run_signals(conn: psycopg.Connection, last: dict, n: int, warmup: int,
                account: str = "bench", latencies: list[float] | None = None) -> dict:
    """Alternate buy / close per (strategy, symbol); fill every approved order. Each
    measured submit_signal's seconds are also appended to `latencies` when given."""
    pairs = [(s[0], sym) for sym in SYMBOLS for s in STRATEGIES]
    held = set(conn.execute(
        "SELECT s.name, i.symbol FROM trading.positions p"
        " JOIN trading.strategies s USING (strategy_id) JOIN market.instruments i"
        " USING (instrument_id) JOIN trading.accounts a USING (account_id)"
        " WHERE p.quantity > 0 AND a.name = %s", (account,)).fetchall())
    long_ = {pair: pair in held for pair in pairs}
    sig_t: list[float] = []
    fill_t: list[float] = []
    statuses: dict[str, int] = {}
    for i in range(warmup + n):
        strategy, sym = pairs[i % len(pairs)]
        action = "close" if long_[(strategy, sym)] else "buy"
        doc = signal_for(strategy, sym, action, last[sym], account)
        t = time.perf_counter()
        r = conn.execute("SELECT trading.submit_signal(%s)", (doc,)).fetchone()[0]
        dt = time.perf_counter() - t
        key = r["status"] if r["status"] == "approved" else f"{r['status']}:{r['reason_code']}"
        if i >= warmup:
            sig_t.append(dt)
            statuses[key] = statuses.get(key, 0) + 1
        if r["status"] != "approved":
            continue
        f = Jsonb({"order_id": r["order_id"], "broker_fill_id": f"b{next(FILL_IDS)}",
                   "quantity": str(r["quantity"]), "price": str(r["reference_price"]),
                   "commission": "0.1", "ts": T_SIG.isoformat()})
        t = time.perf_counter()
        conn.execute("SELECT trading.apply_fill(%s)", (f,)).fetchone()
        dt = time.perf_counter() - t
        if i >= warmup:
            fill_t.append(dt)
        long_[(strategy, sym)] = action == "buy"
    out = summary(sig_t, "submit_signal") | summary(fill_t, "apply_fill")
    out["submit_signal_outcomes"] = statuses
    if latencies is not None:
        latencies.extend(sig_t)
    return out


def run_cycles(url: str, last: dict, n: int, accounts: list[str]) -> dict:
    """(d) signal-and-fill cycles per second of wall time, with one session (connection,
    thread) per account running at once, each alternating buy / close over the 5 x 10
    pairs and filling its orders, as in (a). Sessions of different accounts share no
    account lock; they still share the audit chain's head, the order queue and the
    server's two cores. (A signal and its fill per cycle: the wall time holds both.)"""
    conns = [psycopg.connect(url, autocommit=True) for _ in accounts]
    latencies: list[float] = []  # (list.extend is atomic under the GIL)
    barrier = threading.Barrier(len(accounts) + 1)

    def work(k: int) -> None:
        run_signals(conns[k], last, 200, 0, accounts[k])  # warm-up, not counted
        barrier.wait()
        run_signals(conns[k], last, n, 0, accounts[k], latencies)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(accounts))]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    for c in conns:
        c.close()
    tag = f"cycles_{len(accounts)}_sessions"
    out = {f"{tag}_{k}": v for k, v in summary(latencies, "submit_signal").items()
           if not k.endswith(("_per_s", "_n"))}
    out[f"{tag}_per_s"] = round(len(latencies) / wall)
    return out


def open_all(conn: psycopg.Connection, last: dict) -> int:
    """Open every (strategy, symbol) position that is flat; returns the open count."""
    for sym in SYMBOLS:
        for strategy, *_ in STRATEGIES:
            r = conn.execute("SELECT trading.submit_signal(%s)",
                             (signal_for(strategy, sym, "buy", last[sym]),)).fetchone()[0]
            if r["status"] == "approved":
                conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
                    "order_id": r["order_id"], "broker_fill_id": f"b{next(FILL_IDS)}",
                    "quantity": str(r["quantity"]), "price": str(r["reference_price"])}),))
    return conn.execute("SELECT count(*) FROM trading.positions WHERE quantity <> 0"
                        " AND stop_loss IS NOT NULL AND trailing_stop IS NOT NULL"
                        " AND take_profit IS NOT NULL AND breakeven IS NOT NULL").fetchone()[0]


def run_bars(conn: psycopg.Connection, rng: random.Random, insts: dict, last: dict,
             start: datetime, minutes: int, batch: int) -> tuple[float, int]:
    """Insert `minutes` 1m bars for every symbol (interleaved by minute) in COPY batches."""
    series = {}
    for sym in SYMBOLS:
        series[sym], last[sym] = random_walk_bars(rng, insts[sym], start, minutes, last[sym])
    rows = [series[sym][k] for k in range(minutes) for sym in SYMBOLS]
    t = time.perf_counter()
    for j in range(0, len(rows), batch):
        copy_bars(conn, rows[j:j + batch])
    return time.perf_counter() - t, len(rows)


def roundtrip_floor(conn: psycopg.Connection, n: int = 500) -> float:
    """p50 of `SELECT 1` in ms: the client/server round trip every call pays."""
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        conn.execute("SELECT 1").fetchone()
        ts.append(time.perf_counter() - t)
    return round(pct([v * 1000 for v in ts], 50), 3)


def server_side(conn: psycopg.Connection, names: tuple[str, ...]) -> dict:
    """Mean time per call inside the server (pg_stat_user_functions, track_functions)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    rows = conn.execute(
        "SELECT schemaname || '.' || funcname, sum(calls), sum(total_time) / sum(calls)"
        " FROM pg_stat_user_functions WHERE schemaname || '.' || funcname = ANY(%s)"
        " GROUP BY 1", (list(names),)).fetchall()
    return {f"server_{name.split('.')[1]}_mean_ms": round(float(ms), 3) for name, _, ms in rows}


def track_functions(conn: psycopg.Connection) -> bool:
    try:
        conn.execute("SET track_functions = 'all'")
        conn.execute("SELECT pg_stat_reset()")
        return True
    except psycopg.Error:  # not a superuser on an external server: client figures only
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--signals", type=int, default=5000, help="signals measured (a)")
    ap.add_argument("--warmup", type=int, default=200, help="signals before measuring")
    ap.add_argument("--cycles", type=int, default=3000,
                    help="signal-and-fill cycles per session (d)")
    ap.add_argument("--bars", type=int, default=1000, help="1m bars per symbol (c)")
    ap.add_argument("--batch", type=int, default=1000, help="rows per COPY (c)")
    ap.add_argument("--without", action="append", default=[], metavar="LIMIT_TYPE",
                    help="leave this rule type out (to measure what it costs); repeatable")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    rng = random.Random(42)
    home = Path(tempfile.mkdtemp(prefix="mmats-bench-"))
    home.chmod(0o711)
    figures: dict = {"signals": args.signals, "bars_per_symbol": args.bars,
                     "copy_batch": args.batch, "rules_left_out": args.without}
    try:
        with fresh_database(home) as url, psycopg.connect(url, autocommit=True) as conn:
            figures["server"] = conn.execute("SHOW server_version").fetchone()[0]
            figures["cpus"] = os.cpu_count()
            figures["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
            figures["roundtrip_select1_p50_ms"] = roundtrip_floor(conn)
            insts, last = setup(conn, rng, tuple(args.without))
            if args.warmup:  # warm-up (plans, caches), not counted
                run_signals(conn, last, args.warmup, 0)
            tracked = track_functions(conn)
            figures |= run_signals(conn, last, args.signals, 0)
            if tracked:
                figures |= server_side(conn, ("trading.submit_signal", "trading.apply_fill",
                                              "risk._check_order"))
            figures["orders_after_a"] = conn.execute(
                "SELECT count(*) FROM trading.orders").fetchone()[0]

            # (d) cycles per second of wall time, one session, then one per account
            for k in (1, len(ACCOUNTS)):
                figures |= run_cycles(url, last, args.cycles, ACCOUNTS[:k])

            # (c) with 50 protected positions
            figures["protected_positions"] = open_all(conn, last)
            t_bars = T_SIG + timedelta(minutes=1)
            tracked = track_functions(conn)
            secs, n = run_bars(conn, rng, insts, last, t_bars, args.bars, args.batch)
            if tracked:
                figures |= server_side(conn, ("market.bars_inserted", "trading.protect_bars",
                                              "trading.snapshot_equity"))
            figures["bars_with_positions"] = n
            figures["bars_with_positions_s"] = round(secs, 2)
            figures["bars_with_positions_per_s"] = round(n / secs)
            figures["protective_orders_fired"] = conn.execute(
                "SELECT count(*) FROM trading.orders WHERE trigger NOT IN ('signal', 'manual')"
            ).fetchone()[0]
            figures["equity_snapshots"] = conn.execute(
                "SELECT count(*) FROM trading.equity_snapshots").fetchone()[0]
            # the same ingest with no position open: the trigger's probe only
            conn.execute("UPDATE trading.positions SET quantity = 0, average_price = NULL")
            secs, n = run_bars(conn, rng, insts, last,
                               t_bars + timedelta(minutes=args.bars), args.bars, args.batch)
            figures["bars_no_positions_per_s"] = round(n / secs)
            figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    figures["targets"] = {
        "submit_signal_p95_le_2ms": figures["submit_signal_p95_ms"] <= 2,
        "signals_per_s_ge_2000": figures["submit_signal_per_s"] >= 2000,
        "bars_per_s_ge_20000": figures["bars_with_positions_per_s"] >= 20000,
    }
    width = max(map(len, figures))
    for k, v in figures.items():
        print(f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool)
              else f"{k:<{width}}  {v}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
