"""Grafana provisioning: the data source, the dashboard provider, and every dashboard query.

Every panel's rawSql and every template variable's query is expanded the way Grafana's
PostgreSQL data source expands it (macros, $__interval, template variables) and run
against a real migrated database as mmats_readonly, after a little data was inserted
as the superuser. A query that errors, that needs a privilege the readonly role lacks,
or that finds nothing in that data fails the test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("**/*.json"))
DATASOURCE_UID = "mmats"
DATASOURCE_TYPE = "grafana-postgresql-datasource"

TIME_FROM = "2020-01-01T00:00:00Z"
TIME_TO = "2030-01-01T00:00:00Z"
INTERVAL = "1h"  # what Grafana would put for $__interval


# --------------------------------------------------------------------------- loading
def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # collapsed rows hold their panels


@dataclass(frozen=True)
class Query:
    dashboard: str
    where: str
    sql: str


def panel_queries(dashboard: dict[str, Any]) -> list[Query]:
    out = []
    for panel in all_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("rawSql"):
                out.append(Query(dashboard["uid"], f"panel {panel.get('title')!r} "
                                 f"target {target.get('refId')}", target["rawSql"]))
    return out


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, dict):  # newer Grafana stores an object
        query = query.get("rawSql") or query.get("query")
    assert isinstance(query, str) and query.strip(), f"variable {variable.get('name')} has no SQL"
    return query


def query_variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]


# --------------------------------------------------------------------------- macros
_INTERVAL_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def interval_seconds(text: str) -> int:
    match = re.fullmatch(r"\s*'?(\d+)(ms|s|m|h|d|w)'?\s*", text)
    assert match, f"cannot read the interval {text!r}"
    return int(int(match.group(1)) * _INTERVAL_UNITS[match.group(2)])


def _split_args(text: str) -> list[str]:
    args, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        current += ch
    if current.strip():
        args.append(current.strip())
    return args


def expand_macros(sql: str, timescaledb: bool) -> str:
    """What Grafana's PostgreSQL data source sends for sql, given the test's time range."""
    sql = sql.replace("$__interval_ms", str(interval_seconds(INTERVAL) * 1000))
    sql = sql.replace("$__interval", INTERVAL)

    def bucket(args: list[str]) -> str:
        assert len(args) in (2, 3), f"$__timeGroup takes (column, interval[, fill]): {args}"
        seconds = interval_seconds(args[1])
        if timescaledb:
            return f"time_bucket('{seconds}s', {args[0]})"
        return f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"

    expanders = {
        "timeFilter": lambda a: f"{a[0]} BETWEEN '{TIME_FROM}' AND '{TIME_TO}'",
        "timeFrom": lambda a: f"'{TIME_FROM}'",
        "timeTo": lambda a: f"'{TIME_TO}'",
        "time": lambda a: f'{a[0]} AS "time"',
        "timeEpoch": lambda a: f'extract(epoch from {a[0]}) AS "time"',
        "timeGroup": bucket,
        "timeGroupAlias": lambda a: bucket(a) + ' AS "time"',
        "unixEpochFilter": lambda a: (f"{a[0]} >= {_epoch(TIME_FROM)} AND "
                                      f"{a[0]} <= {_epoch(TIME_TO)}"),
    }

    pattern = re.compile(r"\$__(\w+)\(")
    while (match := pattern.search(sql)) is not None:
        name = match.group(1)
        if name not in expanders:
            raise AssertionError(f"macro $__{name} is not known to this test")
        depth, end = 1, match.end()
        while depth:
            assert end < len(sql), f"unbalanced parentheses after $__{name}"
            depth += {"(": 1, ")": -1}.get(sql[end], 0)
            end += 1
        args = _split_args(sql[match.end():end - 1])
        sql = sql[:match.start()] + expanders[name](args) + sql[end:]
    assert "$__" not in sql, f"an unexpanded Grafana macro is left in:\n{sql}"
    return sql


def _epoch(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())


def substitute_variables(sql: str, values: dict[str, str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name not in values:
            raise AssertionError(f"unknown template variable ${name}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$([A-Za-z_]\w*)", repl, sql)


def to_sql(sql: str, values: dict[str, str], timescaledb: bool) -> str:
    return substitute_variables(expand_macros(sql, timescaledb), values)


# --------------------------------------------------------------------------- structure
def test_there_are_dashboards() -> None:
    titles = {load_dashboard(p)["title"] for p in DASHBOARDS}
    assert {"MMATS — Market data", "MMATS — Trading & risk", "MMATS — Backtests",
            "MMATS — Runtime"} <= titles


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = load_dashboard(path)
    assert dashboard.get("uid") and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard.get("title")
    assert "id" not in dashboard or dashboard["id"] is None, "provisioned dashboards carry no id"
    panels = list(all_panels(dashboard.get("panels", [])))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel.get("type") == "row":
            continue
        where = f"{path.name}: panel {panel.get('title')!r}"
        assert panel.get("title"), where
        assert panel.get("gridPos"), where
        ds = panel.get("datasource")
        assert isinstance(ds, dict) and ds.get("uid") == DATASOURCE_UID, where
        assert ds.get("type") == DATASOURCE_TYPE, where
        assert panel.get("targets"), f"{where} has no query"
        for target in panel["targets"]:
            assert target.get("rawSql", "").strip(), f"{where}: target without rawSql"
            assert target.get("format") in ("table", "time_series"), where
            tds = target.get("datasource", ds)
            assert tds.get("uid") == DATASOURCE_UID, where
    for variable in query_variables(dashboard):
        assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]
        variable_query(variable)


def test_dashboard_uids_are_unique() -> None:
    uids = [load_dashboard(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_datasource_provisioning() -> None:
    files = sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml"))
    assert files
    doc = yaml.safe_load(files[0].read_text())
    assert doc["apiVersion"] == 1
    (ds,) = doc["datasources"]
    assert ds["uid"] == DATASOURCE_UID
    assert ds["type"] == DATASOURCE_TYPE
    assert ds["user"] == "mmats_readonly"
    assert ds["url"] == "db:5432"  # the compose service
    assert ds["jsonData"]["database"] == "mmats"
    assert ds["jsonData"]["timescaledb"] is True
    assert ds["jsonData"]["sslmode"] in ("disable", "require", "verify-ca", "verify-full")
    assert isinstance(ds["jsonData"]["postgresVersion"], int)
    password = ds["secureJsonData"]["password"]
    assert password in ("$__env{MMATS_READONLY_PASSWORD}", "${MMATS_READONLY_PASSWORD}"), \
        "the password must come from the environment, never the file"
    assert "password" not in ds.get("jsonData", {})


def test_dashboard_provider_points_at_the_mounted_folder() -> None:
    files = sorted((GRAFANA / "provisioning" / "dashboards").glob("*.y*ml"))
    assert files
    doc = yaml.safe_load(files[0].read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        source, target, *_ = volume.split(":") if isinstance(volume, str) else (
            volume["source"], volume["target"])
        mounts[target] = source
    assert mounts.get(path) == "./grafana/dashboards", (path, mounts)
    assert mounts.get("/etc/grafana/provisioning") == "./grafana/provisioning"


# --------------------------------------------------------------------------- queries
def seed(conn: psycopg.Connection) -> None:
    """A little of everything the dashboards show, written as the superuser."""
    (instrument_id,) = conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency, "
        "price_tick, quantity_step, calendar_id) VALUES ('BTC/USDT', 'binance', 'crypto', "
        "'BTC', 'USDT', 0.01, 0.0001, 'CRYPTO_24X7') RETURNING instrument_id").fetchone()
    conn.execute(
        "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume) "
        "SELECT %s, tf::market.timeframe, timestamptz '2025-01-01' + n * step, "
        "       100 + n, 102 + n, 99 + n, 101 + n, 5 "
        "FROM generate_series(0, 9) n, (VALUES ('1m', interval '1 minute'), "
        "                                      ('1h', interval '1 hour')) v(tf, step)",
        (instrument_id,))
    (import_id,) = conn.execute(
        "INSERT INTO market.imports (instrument_id, timeframe, file_name, file_sha256, rows_read, "
        "rows_inserted, rows_unchanged, rows_quarantined, first_ts, last_ts) VALUES "
        "(%s, '1m', 'btc.csv', repeat('ab', 32), 11, 10, 0, 1, '2025-01-01', "
        "'2025-01-01 00:09') RETURNING import_id", (instrument_id,)).fetchone()
    conn.execute("INSERT INTO market.bar_quarantine (import_id, row_number, raw, reason) "
                 "VALUES (%s, 7, '{\"close\": \"-1\"}', 'close must be > 0')", (import_id,))

    (account_id,) = conn.execute(
        "INSERT INTO trading.accounts (name, environment, base_currency, starting_cash, cash) "
        "VALUES ('paper-1', 'paper', 'USDT', 10000, 9899) RETURNING account_id").fetchone()
    (strategy_id,) = conn.execute(
        "INSERT INTO trading.strategies (name) VALUES ('sma_cross') RETURNING strategy_id"
    ).fetchone()
    conn.execute(
        "INSERT INTO trading.equity_snapshots (account_id, ts, cash, positions_value, equity, "
        "peak_equity, drawdown) VALUES (%s, '2025-01-01 00:00', 10000, 0, 10000, 10000, 0), "
        "(%s, '2025-01-01 01:00', 9899, 110, 10009, 10009, 0), "
        "(%s, '2025-01-01 02:00', 9899, 100, 9999, 10009, 0.001)",
        (account_id, account_id, account_id))
    conn.execute(
        "INSERT INTO trading.orders (account_id, instrument_id, strategy_id, client_order_id, "
        "side, order_type, quantity) VALUES (%s, %s, %s, 'c-1', 'buy', 'market', 1)",
        (account_id, instrument_id, strategy_id))
    conn.execute(
        "INSERT INTO trading.positions (account_id, instrument_id, strategy_id, quantity, "
        "average_price, last_price, opened_at) VALUES (%s, %s, %s, 1, 101, 110, "
        "'2025-01-01 00:05')", (account_id, instrument_id, strategy_id))
    conn.execute("INSERT INTO risk.breaker_state (account_id, mode, reason, tripped_at, "
                 "tripped_by) VALUES (%s, 'SOFT', 'DAILY_LOSS: limit=0.02', now(), 'test')",
                 (account_id,))
    conn.execute("INSERT INTO risk.events (account_id, severity, event_type, message) VALUES "
                 "(%s, 'warning', 'BREAKER_SOFT', 'daily loss over the soft limit')",
                 (account_id,))
    conn.execute("SELECT trading.book_cash('{\"account\": \"paper-1\", \"kind\": \"fee\", "
                 "\"amount\": \"-0.5\", \"broker_ref\": \"fee-1\", "
                 "\"ts\": \"2025-01-01T01:30:00Z\"}')")
    conn.execute("SELECT audit.record('order.created', 'order', 'c-1', '{}')")
    conn.execute("SELECT runtime.heartbeat('router', 'router', 'running', 42, 'host-1', "
                 "'{\"counts\": {\"fills\": 3}}')")
    conn.execute("SELECT runtime.report_error('router', 'BROKER_RETRYING', 'still trying', "
                 "'paper-1')")
    seed_backtest(conn, instrument_id)


def seed_backtest(conn: psycopg.Connection, instrument_id: int) -> None:
    """One finished backtest run with a closed trade, its curve, metrics and Monte Carlo,
    made through the backtest functions as the engine makes them."""
    (run,) = conn.execute(
        "SELECT backtest.create_run('sma_cross', '1.0.0', '{}', ARRAY['BTC/USDT'], '1m', "
        "'2025-01-01', '2025-01-01 00:10', 10000, 'USDT')").fetchone()
    opened = conn.execute("SELECT backtest.step(%s, %s)", (run, json.dumps([
        {"op": "signal", "strategy": "sma_cross", "version": "1.0.0", "symbol": "BTC/USDT",
         "action": "buy", "size": "0.5", "price": "101", "ts": "2025-01-01T00:00:59Z"}]))
    ).fetchone()[0]
    (order,) = opened["orders"]
    conn.execute("SELECT backtest.step(%s, %s)", (run, json.dumps([
        {"op": "fill", "order_id": order["order_id"], "broker_fill_id": "f1",
         "quantity": str(order["quantity"]), "price": "101", "ts": "2025-01-01T00:01:00Z"},
        {"op": "signal", "strategy": "sma_cross", "version": "1.0.0", "symbol": "BTC/USDT",
         "action": "close", "price": "105", "ts": "2025-01-01T00:04:59Z"}])))
    (closing,) = conn.execute(
        "SELECT order_id FROM trading.orders WHERE reduce_only AND status = 'created'"
    ).fetchone()
    conn.execute("SELECT backtest.step(%s, %s)", (run, json.dumps([
        {"op": "fill", "order_id": closing, "broker_fill_id": "f2",
         "quantity": str(order["quantity"]), "price": "105", "ts": "2025-01-01T00:05:00Z"}])))
    conn.execute("SELECT backtest.record_equity(%s, ARRAY['2025-01-01 00:01', '2025-01-01 00:02']"
                 "::timestamptz[], '{10000, 10100}', '{10000, 10050}', '{0, 0}', '{t, f}')",
                 (run,))
    conn.execute("SELECT backtest.record_metrics(%s, %s)", (run, json.dumps({
        "run": {"total_return": 0.01, "sharpe": 1.5, "max_drawdown": 0.02, "trades": 1,
                "buy_and_hold_return": 0.005},
        "strategy": {"sma_cross": {"trades": 1, "win_rate": 1.0, "total_pnl": 100}}})))
    result = {"final_return": {"p5": 0.01, "p50": 0.01, "p95": 0.01},
              "max_drawdown": {"p95": 0.0}, "probability_of_ruin": 0}
    conn.execute("SELECT backtest.record_montecarlo(%s, 'shuffle', 100, 0, 0.5, %s)",
                 (run, json.dumps(result)))
    conn.execute("SELECT backtest.finish_run(%s, 'finished', repeat('a', 64), 10, 0.1)", (run,))


def has_timescaledb(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_extension "
                        "WHERE extname = 'timescaledb')").fetchone() == (True,)


def run_as_readonly(conn: psycopg.Connection, sql: str) -> list[tuple[Any, ...]]:
    with conn.transaction():
        conn.execute("SET LOCAL ROLE mmats_readonly")
        conn.execute("SET LOCAL statement_timeout = '10s'")
        rows = conn.execute(sql.encode()).fetchall()
    return rows


def resolve_variables(conn: psycopg.Connection, dashboard: dict[str, Any],
                      timescaledb: bool, problems: list[str]) -> dict[str, str]:
    """Each variable takes the first value its query returns (in order: later variables
    may use earlier ones), as Grafana does on load."""
    values: dict[str, str] = {}
    for variable in query_variables(dashboard):
        where = f"{dashboard['uid']}: variable ${variable['name']}"
        try:
            sql = to_sql(variable_query(variable), values, timescaledb)
            with conn.transaction():
                conn.execute("SET LOCAL ROLE mmats_readonly")
                cur = conn.execute(sql.encode())
                names = [c.name for c in cur.description or []]
                rows = cur.fetchall()
        except (psycopg.Error, AssertionError) as exc:
            problems.append(f"{where}: {type(exc).__name__}: {exc}")
            values[variable["name"]] = "?"
            continue
        if not rows:
            problems.append(f"{where}: no value in the test data")
            values[variable["name"]] = "?"
            continue
        column = names.index("__value") if "__value" in names else 0
        values[variable["name"]] = str(rows[0][column])
    return values


def test_every_dashboard_query_runs_as_readonly(conn: psycopg.Connection) -> None:
    seed(conn)
    timescaledb = has_timescaledb(conn)
    problems: list[str] = []
    ran = 0
    for path in DASHBOARDS:
        dashboard = load_dashboard(path)
        values = resolve_variables(conn, dashboard, timescaledb, problems)
        for query in panel_queries(dashboard):
            where = f"{path.name}: {query.where}"
            try:
                sql = to_sql(query.sql, values, timescaledb)
                rows = run_as_readonly(conn, sql)
            except psycopg.Error as exc:
                problems.append(f"{where}: {exc.diag.sqlstate} {exc}")
                continue
            except AssertionError as exc:
                problems.append(f"{where}: {exc}")
                continue
            ran += 1
            if not rows:
                problems.append(f"{where}: returned no rows for the test data")
    assert not problems, "\n".join(problems)
    assert ran >= 10


def test_readonly_role_lack_of_privilege_is_caught(conn: psycopg.Connection) -> None:
    # the harness itself: a query on something mmats_readonly may not read must fail
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        run_as_readonly(conn, "SELECT * FROM pgmq.meta")


def test_macro_expansion() -> None:
    sql = ("SELECT $__timeGroupAlias(b.ts, $__interval), $__timeGroup(ts, 5m, previous) "
           "WHERE $__timeFilter(b.ts) AND t > $__timeFrom() AND t < $__timeTo() "
           "AND s = '$symbol' AND x = ${tf}")
    out = to_sql(sql, {"symbol": "BTC/USDT", "tf": "'1m'"}, timescaledb=False)
    assert out == (
        'SELECT floor(extract(epoch from b.ts)/3600)*3600 AS "time", '
        "floor(extract(epoch from ts)/300)*300 "
        f"WHERE b.ts BETWEEN '{TIME_FROM}' AND '{TIME_TO}' AND t > '{TIME_FROM}' "
        f"AND t < '{TIME_TO}' AND s = 'BTC/USDT' AND x = '1m'")
    assert to_sql("$__timeGroup(ts, 1h)", {}, timescaledb=True) == "time_bucket('3600s', ts)"
    with pytest.raises(AssertionError, match="not known"):
        expand_macros("SELECT $__unknownMacro(x)", False)
    with pytest.raises(AssertionError, match="unknown template variable"):
        substitute_variables("SELECT '$nope'", {})


def test_orders_on_their_way_show_a_pending_cancel(conn: psycopg.Connection) -> None:
    """An order whose cancel the venue has yet to confirm is still open; the panel says the
    cancel was requested (before, it looked like any other working order)."""
    seed(conn)
    conn.execute("UPDATE trading.orders SET cancel_requested_at = now() "
                 "WHERE client_order_id = 'c-1'")
    dashboard = load_dashboard(GRAFANA / "dashboards" / "mmats-runtime.json")
    (query,) = [q for q in panel_queries(dashboard)
                if "Orders on their way" in q.where and "o.order_id" in q.sql]
    cur_sql = to_sql(query.sql, {}, has_timescaledb(conn))
    with conn.transaction():
        conn.execute("SET LOCAL ROLE mmats_readonly")
        cur = conn.execute(cur_sql.encode())
        names = [c.name for c in cur.description or []]
        rows = cur.fetchall()
    assert [r[names.index("status")] for r in rows] == ["created (cancel requested)"]
