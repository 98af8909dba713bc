"""After the replay: the equity curve, metrics, sanity check and fingerprint of a run,
recorded as rows; and the report of a run read back from those rows.

The equity curve is computed from the ledger's fills and the bars (cash + marked
positions at every bar close, float arithmetic for analysis); its last point is checked
against the ledger's exact equity. What the JSON export and the HTML report show is read
back from the database, so it is what psql and Grafana see.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from db.queries import query
from workers.backtest.data import instrument
from workers.backtest.engine import Engine
from workers.backtest.metrics import (
    EPOCH,
    EquityCurve,
    TradeRecord,
    compute_metrics,
    drawdown_series,
    grouped_trade_metrics,
    max_return_bound,
    monthly_returns,
    periods_per_year,
    sanity_check,
)

PRICE_POINTS = 20_000  # closes per symbol in a report (charts decimate further)
ASSUMPTIONS = (
    "A market order from a signal on bar t fills at bar t+1's open.",
    "Stop-loss, take-profit, trailing stop and breakeven are judged by the database on each "
    "bar (stop first when both are inside one bar) and fill at their level, or at the open "
    "when the bar gapped through it.",
    "Limit orders fill at their price when touched (at the open if it opens through them); "
    "stop orders at the stop (at the open when gapping through).",
    "Signals are sized by the database (percent of equity by default), rounded down to the "
    "quantity step after reserving the commission; a buy never needs more cash than exists: "
    "the affordable part fills and the rest is cancelled.",
    "A reversal is one order: it closes the position and opens the other side, sized from "
    "the equity the close frees.",
    "Positions still open at the end are marked to the last close and reported as open, "
    "not as closed trades.",
    "Signals are decided at the bar's close and stamped one microsecond before it, so "
    "the database's 'at or before' lookups never see the next bar.",
)


# --------------------------------------------------------------------------- curve
def equity_curve(engine: Engine, fills: Sequence[tuple[Any, ...]]) -> EquityCurve:
    """Equity at every bar close of the period, from the fills and the closes."""
    symbols = engine.symbols
    times = np.unique(np.concatenate([sd.close_us[sd.first:] for sd in symbols]))
    fill_ts = np.array([f[0] for f in fills], dtype=np.int64)
    order = np.argsort(fill_ts, kind="stable")
    cash_delta = np.array([-float(f[2]) * float(f[3]) - float(f[4]) for f in fills])
    cash_after = float(engine.config.cash) + np.cumsum(cash_delta[order]) if len(fills) else None
    before = np.searchsorted(fill_ts[order], times, side="left")  # fills before each close
    cash = np.full(len(times), float(engine.config.cash))
    if cash_after is not None:
        has = before > 0
        cash[has] = cash_after[before[has] - 1]
    value = np.zeros(len(times))
    exposed = np.zeros(len(times), dtype=bool)
    bench = np.zeros(len(times))
    share = float(engine.config.cash) / len(symbols)
    for sd in symbols:
        mine = [j for j in order if fills[j][1] == sd.inst.instrument_id]
        idx = np.searchsorted(sd.close_us, times, side="right") - 1
        close = np.where(idx >= 0, sd.close[np.maximum(idx, 0)], 0.0)
        if mine:
            ts_k = fill_ts[mine]
            # summed exactly: a float sum of 36.96303 + 36.17686 - 73.13989 is 1.4e-14,
            # which showed the closed position exposed to the end of the run
            qty_after = np.array([float(q) for q in itertools.accumulate(
                Decimal(fills[j][2]) for j in mine)])
            n = np.searchsorted(ts_k, times, side="left")
            qty = np.where(n > 0, qty_after[np.maximum(n - 1, 0)], 0.0)
            value += qty * close
            exposed |= qty != 0
        started = idx >= sd.first
        units = share / float(sd.open[sd.first])
        bench += np.where(started, units * close, share)
    return EquityCurve(times=times, equity=cash + value, exposure=exposed, benchmark=bench)


def trade_records(conn: psycopg.Connection, run: int) -> list[TradeRecord]:
    """A run's closed trades, for the metrics."""
    return [TradeRecord(symbol=r[0], market=r[1], strategy=r[2] or "", side=r[3], quantity=r[4],
                        entry_time=r[5], entry_price=r[6], exit_time=r[7], exit_price=r[8],
                        pnl=r[9], commission=r[10])
            for r in conn.execute(query("backtest_trades"), {"run": run})]


def fingerprint(trades: Sequence[TradeRecord], open_positions: Sequence[Sequence[Any]],
                final_equity: Decimal) -> str:
    """SHA-256 of the canonical trade list, open positions and final equity."""
    h = hashlib.sha256()
    for t in trades:
        h.update(json.dumps([t.symbol, t.strategy, t.side, str(t.quantity),
                             t.entry_time.isoformat(), str(t.entry_price),
                             t.exit_time.isoformat(), str(t.exit_price), str(t.pnl),
                             str(t.commission)]).encode())
    for p in open_positions:
        h.update(json.dumps([str(x) for x in p]).encode())
    h.update(str(final_equity).encode())
    return h.hexdigest()


def sample_indices(n: int, limit: int, keep: Sequence[int]) -> np.ndarray:
    """At most `limit` evenly spread indices of n points, always with those in `keep`."""
    if n <= limit:
        return np.arange(n)
    picked = np.linspace(0, n - 1, limit - len(keep)).astype(np.int64)
    return np.unique(np.concatenate([picked, np.asarray(keep, dtype=np.int64)]))


def clean_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Non-finite floats as None (JSON and numeric columns take no NaN)."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v)
            for k, v in metrics.items()}


def _array(values: Sequence[object]) -> str:
    """A PostgreSQL array literal of numbers or t/f (no quoting needed for either)."""
    return "{" + ",".join(map(str, values)) + "}"


def record_results(engine: Engine, elapsed: float) -> None:
    """Compute and store the curve, metrics, sanity check and fingerprint; finish the run."""
    conn, run, cfg = engine.conn, engine.run_id, engine.config
    fills = conn.execute(query("backtest_fills"), {"run": run}).fetchall()
    curve = equity_curve(engine, fills)
    trades = trade_records(conn, run)
    opened = conn.execute(query("backtest_open_positions"), {"run": run}).fetchall()
    state = conn.execute(query("backtest_final_state"), {"run": run}).fetchone()
    assert state is not None
    cash, final, _ = state
    markets = {sd.inst.market for sd in engine.symbols}
    metrics = clean_metrics(compute_metrics(curve, trades, starting_cash=float(cfg.cash),
                                     periods_per_year=periods_per_year(markets, cfg.timeframe)))
    metrics["final_equity"] = float(final)
    metrics["final_cash"] = float(cash)
    metrics["open_positions"] = len(opened)
    # every fill's, also the entries of positions still open (the trades' sum leaves them
    # out; the per-group figures stay the closed trades')
    metrics["total_commission"] = float(sum((Decimal(f[4]) for f in fills), Decimal(0)))
    bound = 1.0
    for sd in engine.symbols:
        bound *= 1 + max_return_bound(sd.high[sd.first:], sd.low[sd.first:])
    warnings = sanity_check(curve, trades, starting_cash=float(cfg.cash),
                            leverage_allowed=cfg.allow_short, price_bound=bound - 1)
    gap = abs(float(curve.equity[-1]) - float(final))
    if gap > 1e-6 * max(1.0, abs(float(final))):
        warnings.append(f"the equity curve ends at {curve.equity[-1]:.6f} but the ledger says "
                        f"{final}: the curve and the ledger disagree")
    warnings += engine.counts.warnings
    drawdown = drawdown_series(curve.equity, starting_cash=float(cfg.cash))
    keep = [int(np.argmax(drawdown)), int(np.argmin(curve.equity)), int(np.argmax(curve.equity))]
    pick = sample_indices(len(curve.times), cfg.equity_points, keep)
    assert curve.benchmark is not None
    conn.execute(query("backtest_record_equity"), {
        "run": run, "ts": _array(curve.times[pick].tolist()),
        "equity": _array(np.round(curve.equity[pick], 8).tolist()),
        "benchmark": _array(np.round(curve.benchmark[pick], 8).tolist()),
        "drawdown": _array(np.minimum(drawdown[pick], 1e6).tolist()),
        "exposed": _array(["t" if x else "f" for x in curve.exposure[pick].tolist()])})
    grouped = {by: {k: clean_metrics(v) for k, v in grouped_trade_metrics(trades, by).items()}
               for by in ("strategy", "market", "symbol")}
    conn.execute(query("backtest_record_metrics"), {"run": run, "metrics": Jsonb(
        {"run": {k: v for k, v in metrics.items() if not isinstance(v, str)}, **grouped})})
    c = engine.counts
    notes = {"signals": c.signals, "approved": c.approved, "rejected": c.rejected,
             "ignored": c.ignored, "fills": c.fills, "protective_orders": c.protective_orders,
             "steps": c.steps, "sanity": warnings, "strategy_errors": c.strategy_errors,
             "curve_points": len(curve.times), "stored_points": len(pick)}
    conn.execute(query("backtest_finish_run"), {
        "run": run, "status": "finished", "fingerprint": fingerprint(trades, opened, final),
        "bars": c.bars, "elapsed": elapsed, "error": None, "notes": Jsonb(notes)})


# --------------------------------------------------------------------------- report
def jsonable(value: Any) -> Any:
    """Decimals as strings, times as ISO-8601, non-finite floats as None."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _number(value: Decimal | None) -> float | int | None:
    if value is None:
        return None
    return int(value) if value == value.to_integral_value() and abs(value) < 2**53 else float(value)


def load_report(conn: psycopg.Connection, run_id: int) -> dict[str, Any]:
    """A run as the JSON export and the report show it, read from the database."""
    row = conn.execute(query("backtest_run"), {"run": run_id}).fetchone()
    if row is None:
        raise LookupError(f"unknown backtest run {run_id} (`mmats runs` lists them)")
    (run, _acct, strategy, version, params, symbols, timeframe, start, end, cash, currency,
     settings, label, wf, status, bars, fp, error, notes, created, finished, elapsed) = row
    metrics: dict[str, Any] = {}
    groups: dict[str, dict[str, dict[str, Any]]] = {"strategy": {}, "market": {}, "symbol": {}}
    for scope, key, name, value in conn.execute(query("backtest_metrics"), {"run": run}):
        target = metrics if scope == "run" else groups[scope].setdefault(key, {})
        target[name] = _number(value)
    eq = conn.execute(query("backtest_equity"), {"run": run}).fetchall()
    equity = {"ts": [r[0].isoformat() for r in eq], "equity": [float(r[1]) for r in eq],
              "benchmark": [None if r[2] is None else float(r[2]) for r in eq],
              "drawdown": [float(r[3]) for r in eq]}
    if eq:
        metrics.setdefault("start", eq[0][0].isoformat())
        metrics.setdefault("end", eq[-1][0].isoformat())
        # the points are bar closes: a close at midnight ends the day and month before it
        # (2024-02-01 00:00 is January's last equity, not February's first), so each point
        # is dated one microsecond before its close for the calendar grouping
        us = timedelta(microseconds=1)
        curve = EquityCurve(times=np.array([(r[0] - EPOCH) // us - 1 for r in eq]),
                            equity=np.array(equity["equity"]),
                            exposure=np.array([r[4] for r in eq], dtype=bool))
        months = monthly_returns(curve, float(cash))
    else:
        months = []
    prices = {}
    venues = (settings or {}).get("venues") or []
    for k, sym in enumerate(symbols):
        # the venue the run traded on (runs of before it was stored: the symbol alone)
        inst = instrument(conn, f"{sym}@{venues[k]}" if k < len(venues) else sym)
        rows = conn.execute(query("backtest_prices"), {
            "instrument": inst.instrument_id, "timeframe": timeframe, "start": start, "end": end,
            "points": PRICE_POINTS}).fetchall()
        prices[sym] = {"ts": [r[0].isoformat() for r in rows], "close": [float(r[1]) for r in rows]}
    trades = [dict(zip(("symbol", "market", "strategy", "side", "quantity", "entry_time",
                        "entry_price", "exit_time", "exit_price", "pnl", "commission",
                        "exit_trigger"), r, strict=True))
              for r in conn.execute(query("backtest_trades"), {"run": run})]
    opened = [dict(zip(("symbol", "market", "strategy", "side", "quantity", "average_price",
                        "last_price", "unrealized_pnl"), r, strict=True))
              for r in conn.execute(query("backtest_open_positions"), {"run": run})]
    mc = [r[0] for r in conn.execute(query("backtest_montecarlo"), {"run": run})]
    report = {
        "run_id": run,
        "run": {"run_id": run, "name": f"bt-{run}", "strategy": strategy, "version": version,
                "params": params, "symbols": symbols, "timeframe": timeframe, "start": start,
                "end": end, "cash": cash, "currency": currency,
                "commission": settings.get("taker_fee"), "maker_fee": settings.get("maker_fee"),
                "slippage": settings.get("slippage"), "spread": settings.get("spread"),
                "allow_short": settings.get("allow_short"), "limits": settings.get("limits"),
                "fingerprint": fp, "bars": bars, "status": status, "error": error,
                "label": label, "walk_forward_id": wf, "created_at": created,
                "finished_at": finished, "elapsed_seconds": elapsed,
                "counts": {k: v for k, v in notes.items() if isinstance(v, int)}},
        "assumptions": [*ASSUMPTIONS,
            f"Commission: {settings.get('taker_fee')} of the notional per side (taker), "
            f"{settings.get('maker_fee')} (maker); slippage: {settings.get('slippage')}; "
            f"spread: {settings.get('spread') or 0}."],
        "metrics": metrics,
        "by_strategy": groups["strategy"],
        "by_market": groups["market"],
        "by_symbol": groups["symbol"],
        "equity": equity,
        "monthly_returns": months,
        "prices": prices,
        "trades": trades,
        "open_positions": opened,
        "sanity": notes.get("sanity", []),
        "strategy_errors": notes.get("strategy_errors", []),
        "walk_forward": _walk_forward(conn, wf) if wf is not None else None,
        "montecarlo": mc or None,
    }
    return jsonable(report)  # type: ignore[no-any-return]


def _walk_forward(conn: psycopg.Connection, wf_id: int) -> dict[str, Any]:
    from workers.backtest.walkforward import load_walk_forward

    return load_walk_forward(conn, wf_id)


def walk_forward_report(conn: psycopg.Connection, wf_id: int) -> dict[str, Any]:
    """A report of a walk-forward: its stitched out-of-sample curve and metrics as the
    run, the windows, chosen parameters and their stability in the walk-forward section."""
    wf = _walk_forward(conn, wf_id)
    stitched = wf.get("stitched") or {}
    settings = wf.get("settings") or {}
    costs = settings.get("backtest") or {}
    trades: list[Any] = []
    sanity: list[str] = []
    for w in wf["windows"]:  # the out-of-sample trades and sanity notes, window by window
        if w.get("test_run_id") is not None:
            row = conn.execute("SELECT notes FROM backtest.runs WHERE run_id = %s",
                               (w["test_run_id"],)).fetchone()
            notes = (row[0] if row else None) or {}
            sanity += [f"window {w.get('window')}: {n}" for n in notes.get("sanity", [])]
            trades += [dict(zip(("symbol", "market", "strategy", "side", "quantity",
                                 "entry_time", "entry_price", "exit_time", "exit_price", "pnl",
                                 "commission", "exit_trigger"), r, strict=True))
                       for r in conn.execute(query("backtest_trades"), {"run": w["test_run_id"]})]
    equity = {"ts": stitched.get("ts", []), "equity": stitched.get("equity", []),
              "benchmark": None, "drawdown": None}
    run = {"run_id": f"wf{wf_id}", "name": f"walk-forward {wf_id}",
           "strategy": wf["strategy"], "version": settings.get("version", ""),
           "params": {"objective": wf.get("objective"), "windows": len(wf["windows"])},
           "symbols": wf["symbols"], "timeframe": wf["timeframe"], "start": wf["start"],
           "end": wf["end"], "cash": settings.get("cash"), "currency": settings.get("currency"),
           "commission": costs.get("taker_fee"), "maker_fee": costs.get("maker_fee"),
           "slippage": costs.get("slippage"), "spread": costs.get("spread") or "0",
           "allow_short": costs.get("allow_short"), "fingerprint": "", "bars": None,
           "status": wf.get("status"), "created_at": wf.get("created_at"),
           "elapsed_seconds": None}
    return jsonable({
        "run_id": None, "run": run,
        "assumptions": [*ASSUMPTIONS, "Out of sample: each test window is traded with the "
                        "parameters that scored best on the training span before it, starting "
                        "with the equity the previous test window ended with."],
        "metrics": stitched.get("metrics", {}), "equity": equity, "walk_forward": wf,
        "sanity": sanity, "trades": trades, "open_positions": [], "montecarlo": None})  # type: ignore[no-any-return]

