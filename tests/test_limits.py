"""Risk limits as data: risk.set_limit validation, upsert with history and audit,
environment- and account-specific limits (risk.effective_limits and the gate itself),
risk.remove_limit, and who may change limits."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

TS = "2026-03-02T15:00:00Z"


def set_limit(conn: psycopg.Connection, limit_type: str, value: str, scope: str = "global",
              key: str | None = None, acct: str | None = None, env: str | None = None,
              params: dict[str, Any] | None = None) -> int:
    return conn.execute("SELECT risk.set_limit(%s, %s::numeric, %s, %s, %s, %s, %s)",
                        (limit_type, value, scope, key, acct, env, Jsonb(params or {}))
                        ).fetchone()[0]


def effective(conn: psycopg.Connection, account_id: int) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT scope::text, scope_key, limit_type, value, account_id, environment::text"
        " FROM risk.effective_limits(%s) ORDER BY limit_type, scope, scope_key",
        (account_id,)).fetchall()


@pytest.fixture
def market(conn: psycopg.Connection) -> Iterator[None]:
    """AAA at 100; accounts of 10 000 that buy fixed_quantity 1000 x size."""
    iid = conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES ('AAA', 'test', 'stock', 'AAA', 'USD', 0.01, 0.01, 0.01, 'XNYS')"
        " RETURNING instrument_id").fetchone()[0]
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1d', '2026-03-01T00:00:00Z', 100, 100, 100, 100, 1000)",
                 (iid,))
    yield


def make_account(conn: psycopg.Connection, name: str, env: str) -> int:
    mode = "advisory" if env == "live" else "operator"
    aid = conn.execute("SELECT trading.create_account(%s, %s, %s, 10000)",
                       (name, env, mode)).fetchone()[0]
    conn.execute("SELECT trading.assign_strategy(%s, 's1', 1, 'fixed_quantity',"
                 " '{\"quantity\": 1000}')", (name,))
    return aid


def buy(conn: psycopg.Connection, acct: str, size: str) -> dict[str, Any]:
    return conn.execute("SELECT trading.submit_signal(%s)", (Jsonb({
        "account": acct, "strategy": "s1", "symbol": "AAA", "action": "buy", "size": size,
        "ts": TS}),)).fetchone()[0]


# ------------------------------------------------------------------ validation

KNOWN = ("DAILY_LOSS, MAX_CORRELATION, MAX_DRAWDOWN, MAX_EXPOSURE, MAX_LEVERAGE, "
         "MAX_OPEN_POSITIONS, MAX_ORDER_VALUE, MAX_POSITION_SIZE, MAX_VOLATILITY, MIN_VOLUME, "
         "REQUIRE_STOP_LOSS, TRADING_HOURS")


def test_unknown_type_lists_the_known_ones(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        set_limit(conn, "MAX_FUN", "1")
    assert str(e.value).splitlines()[0] == f"unknown limit type 'MAX_FUN'; known: {KNOWN}"
    assert conn.execute("SELECT count(*) FROM risk.limits").fetchone()[0] == 0


def test_type_is_case_insensitive(conn: psycopg.Connection) -> None:
    lid = set_limit(conn, "max_position_size", "0.1")
    assert conn.execute("SELECT limit_type FROM risk.limits WHERE limit_id = %s",
                        (lid,)).fetchone()[0] == "MAX_POSITION_SIZE"


@pytest.mark.parametrize(("limit_type", "value", "message"), [
    ("MAX_POSITION_SIZE", "1.01", "MAX_POSITION_SIZE must be a fraction between 0 and 1, got 1.01"),
    ("MAX_EXPOSURE", "2", "MAX_EXPOSURE must be a fraction between 0 and 1, got 2"),
    ("MAX_POSITION_SIZE", "-0.1",
     "MAX_POSITION_SIZE must be a fraction between 0 and 1, got -0.1"),
    ("MAX_OPEN_POSITIONS", "-1", "MAX_OPEN_POSITIONS must be >= 0, got -1"),
    ("DAILY_LOSS", "-5", "DAILY_LOSS must be >= 0, got -5"),
    ("MAX_LEVERAGE", "NaN", "MAX_LEVERAGE must be >= 0, got NaN"),
])
def test_value_out_of_range_refused(conn: psycopg.Connection, limit_type: str, value: str,
                                    message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        set_limit(conn, limit_type, value)
    assert str(e.value).splitlines()[0] == message
    assert conn.execute("SELECT count(*) FROM risk.limits").fetchone()[0] == 0


def test_boundary_values_accepted(conn: psycopg.Connection) -> None:
    set_limit(conn, "MAX_POSITION_SIZE", "1")
    set_limit(conn, "MAX_EXPOSURE", "0")
    set_limit(conn, "MAX_LEVERAGE", "3")  # a ratio may exceed 1
    set_limit(conn, "DAILY_LOSS", "2500")  # an amount too
    assert conn.execute("SELECT limit_type, value FROM risk.limits ORDER BY 1").fetchall() == [
        ("DAILY_LOSS", 2500), ("MAX_EXPOSURE", 0), ("MAX_LEVERAGE", 3),
        ("MAX_POSITION_SIZE", 1)]


@pytest.mark.parametrize("key", ["bonds", "Crypto", None])
def test_market_scope_needs_a_known_market(conn: psycopg.Connection, key: str | None) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        set_limit(conn, "MAX_EXPOSURE", "0.4", "market", key)
    shown = "NULL" if key is None else f"'{key}'"
    assert str(e.value).splitlines()[0] == (
        f"a market limit needs scope_key crypto, forex or stock, got {shown}")
    assert conn.execute("SELECT count(*) FROM risk.limits").fetchone()[0] == 0


@pytest.mark.parametrize("market", ["crypto", "forex", "stock"])
def test_market_scope_accepted(conn: psycopg.Connection, market: str) -> None:
    lid = set_limit(conn, "MAX_EXPOSURE", "0.4", "market", market)
    assert conn.execute("SELECT scope::text, scope_key FROM risk.limits WHERE limit_id = %s",
                        (lid,)).fetchone() == ("market", market)


def test_bad_scope_refused(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match="scope must be global, market, strategy or symbol, got 'planet'"):
        set_limit(conn, "MAX_EXPOSURE", "0.4", "planet", "x")


@pytest.mark.parametrize(("scope", "key", "message"), [
    ("symbol", None, "a symbol limit needs a scope_key (the symbol)"),
    ("strategy", None, "a strategy limit needs a scope_key (the strategy name)"),
    ("global", "AAA", "a global limit takes no scope_key, got 'AAA'")])
def test_scope_key_presence_checked(conn: psycopg.Connection, scope: str,
                                    key: str | None, message: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        set_limit(conn, "MAX_EXPOSURE", "0.4", scope, key)
    assert str(e.value).splitlines()[0] == message
    assert conn.execute("SELECT count(*) FROM risk.limits").fetchone()[0] == 0


def test_symbol_key_upper_cased_and_unknown_account_refused(conn: psycopg.Connection) -> None:
    lid = set_limit(conn, "MAX_POSITION_SIZE", "0.1", "symbol", "btcusd")
    assert conn.execute("SELECT scope_key FROM risk.limits WHERE limit_id = %s",
                        (lid,)).fetchone()[0] == "BTCUSD"
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="unknown account 'ghost'"):
        set_limit(conn, "MAX_POSITION_SIZE", "0.1", acct="ghost")


def test_params_must_be_an_object(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match="limit params must be a JSON object"):
        conn.execute("SELECT risk.set_limit('MAX_VOLATILITY', 0.1, params => '[1]'::jsonb)")


@pytest.mark.parametrize(("limit_type", "params", "detail"), [
    ("TRADING_HOURS", {"tz": "Mars/Olympus"}, 'time zone "Mars/Olympus" not recognized'),
    ("TRADING_HOURS", {"start": "9h30"}, "invalid input syntax for type time"),
    ("TRADING_HOURS", {"end": "25:00"}, "out of range"),
    ("TRADING_HOURS", {"days": [0, 1]}, "days must be an array of ISO weekdays"),
    ("TRADING_HOURS", {"days": "weekdays"}, "days must be an array of ISO weekdays"),
    ("MAX_CORRELATION", {"timeframe": "1 day"}, "invalid input value for enum"),
    ("MAX_CORRELATION", {"lookback": 2}, "lookback must be a whole number >= 3"),
    ("MAX_VOLATILITY", {"period": "x"}, "invalid input syntax for type integer"),
    ("MAX_DRAWDOWN", {"mode": "OK"}, "mode must be SOFT, HARD or FREEZE"),
    ("DAILY_LOSS", {"mode": "gentle"}, "mode must be SOFT, HARD or FREEZE"),
    ("DAILY_LOSS", {"unit": "percent"}, "unit must be amount or fraction"),
])
def test_params_are_checked_when_set(conn: psycopg.Connection, limit_type: str,
                                     params: dict[str, Any], detail: str) -> None:
    """A bad parameter is refused at once, not at the first order or bar that reads it."""
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        set_limit(conn, limit_type, "0.1", params=params)
    assert str(e.value).startswith(f"{limit_type} params ")
    assert detail in str(e.value)
    assert conn.execute("SELECT count(*) FROM risk.limits").fetchone()[0] == 0


def test_bad_breaker_mode_would_have_broken_bar_inserts(conn: psycopg.Connection,
                                                        market: None) -> None:
    """Why the mode is checked up front: with a limit in force, the bars trigger reads it."""
    set_limit(conn, "MAX_DRAWDOWN", "0.01", params={"mode": "soft"})  # any case is fine
    make_account(conn, "acct", "paper")
    r = buy(conn, "acct", "0.01")
    conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "order_id": r["order_id"], "broker_fill_id": "f1", "quantity": "10", "price": "100",
        "ts": TS}),))
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) SELECT instrument_id, '1d', '2026-03-02', 100, 100, 50, 50, 1000"
                 " FROM market.instruments")  # equity 10 000 -> 9 500: drawdown 0.05
    assert conn.execute("SELECT mode::text FROM risk.breaker_state").fetchone()[0] == "SOFT"


def test_good_params_accepted(conn: psycopg.Connection) -> None:
    set_limit(conn, "TRADING_HOURS", "1", params={
        "days": [1, 2, 3, 4, 5], "start": "09:30", "end": "24:00", "tz": "America/New_York"})
    set_limit(conn, "MAX_CORRELATION", "0.8", params={"timeframe": "1h", "lookback": 50})
    set_limit(conn, "DAILY_LOSS", "0.02", params={"unit": "fraction", "mode": "FREEZE"})
    assert conn.execute("SELECT count(*) FROM risk.limits").fetchone()[0] == 3


# ------------------------------------------------------------------ upsert, history, audit


def test_upsert_changes_the_value_and_keeps_history(conn: psycopg.Connection) -> None:
    who = conn.execute("SELECT session_user").fetchone()[0]
    lid = set_limit(conn, "MAX_POSITION_SIZE", "0.10")
    assert set_limit(conn, "MAX_POSITION_SIZE", "0.20", params={"note": "wider"}) == lid
    assert conn.execute("SELECT count(*), max(value), max(updated_by) FROM risk.limits"
                        ).fetchone() == (1, Decimal("0.20"), who)
    hist = conn.execute(
        "SELECT operation, old_row->>'value', new_row->>'value', new_row->'params', changed_by"
        " FROM risk.limit_history WHERE limit_id = %s ORDER BY history_id", (lid,)).fetchall()
    assert hist == [("INSERT", None, "0.10", {}, who),
                    ("UPDATE", "0.10", "0.20", {"note": "wider"}, who)]


def test_set_limit_is_audited(conn: psycopg.Connection) -> None:
    conn.execute("SELECT trading.create_account('acct', 'paper', 'operator', 10000)")
    lid = set_limit(conn, "MAX_EXPOSURE", "0.4", "market", "crypto", acct="acct")
    rows = conn.execute(
        "SELECT entity, entity_id, payload FROM audit.events WHERE event_type = 'risk.limit_set'"
    ).fetchall()
    assert rows == [("risk.limits", str(lid), {
        "limit_type": "MAX_EXPOSURE", "value": 0.4, "scope": "market", "scope_key": "crypto",
        "account": "acct", "environment": None, "params": {}})]


def test_remove_limit(conn: psycopg.Connection) -> None:
    aid = conn.execute("SELECT trading.create_account('acct', 'paper', 'operator', 10000)"
                       ).fetchone()[0]
    lid = set_limit(conn, "MAX_LEVERAGE", "2")
    assert [r[2] for r in effective(conn, aid)] == ["MAX_LEVERAGE"]
    assert conn.execute("SELECT risk.remove_limit(%s)", (lid,)).fetchone()[0] is True
    assert effective(conn, aid) == []
    assert conn.execute("SELECT risk.remove_limit(%s)", (lid,)).fetchone()[0] is False
    assert conn.execute("SELECT operation, old_row->>'limit_type', new_row->>'limit_type'"
                        " FROM risk.limit_history WHERE limit_id = %s ORDER BY history_id",
                        (lid,)).fetchall() == [("INSERT", None, "MAX_LEVERAGE"),
                                               ("DELETE", "MAX_LEVERAGE", None)]
    assert conn.execute("SELECT count(*) FROM audit.events WHERE event_type ="
                        " 'risk.limit_removed' AND entity_id = %s", (str(lid),)).fetchone()[0] == 1


def test_removed_limit_no_longer_refuses(conn: psycopg.Connection, market: None) -> None:
    make_account(conn, "acct", "paper")
    lid = set_limit(conn, "MAX_POSITION_SIZE", "0.01")
    assert buy(conn, "acct", "0.002")["reason_code"] == "MAX_POSITION_SIZE"
    conn.execute("SELECT risk.remove_limit(%s)", (lid,))
    assert buy(conn, "acct", "0.002")["status"] == "approved"


# ------------------------------------------------------------------ who applies


def test_environment_and_account_specific_limits(conn: psycopg.Connection,
                                                 market: None) -> None:
    paper = make_account(conn, "acct", "paper")
    other = make_account(conn, "other", "paper")
    bt = make_account(conn, "bt", "backtest")
    live = make_account(conn, "real", "live")
    set_limit(conn, "MAX_POSITION_SIZE", "0.01", env="live")
    # live-only: not in force for the paper account, in force for the live one
    assert effective(conn, paper) == []
    assert effective(conn, live) == [("global", None, "MAX_POSITION_SIZE", Decimal("0.01"),
                                      None, "live")]
    assert buy(conn, "acct", "0.05")["status"] == "approved"  # 0.5 of equity: no limit
    conn.execute("SELECT trading.cancel_order(order_id::text) FROM trading.orders")

    set_limit(conn, "MAX_POSITION_SIZE", "0.10")                  # everyone
    set_limit(conn, "MAX_POSITION_SIZE", "0.05", env="paper")     # paper accounts
    set_limit(conn, "MAX_POSITION_SIZE", "0.02", acct="acct")     # this account
    row = ("global", None, "MAX_POSITION_SIZE")
    assert effective(conn, paper) == [(*row, Decimal("0.02"), paper, None)]
    assert effective(conn, other) == [(*row, Decimal("0.05"), None, "paper")]
    assert effective(conn, bt) == [(*row, Decimal("0.10"), None, None)]
    assert effective(conn, live) == [(*row, Decimal("0.01"), None, "live")]
    # and the gate applies the most specific one: a 0.03 position
    r = buy(conn, "acct", "0.003")
    assert (r["status"], r["reason"]) == (
        "rejected", "MAX_POSITION_SIZE: limit=0.02, requested=0.0300, scope=global")
    assert buy(conn, "other", "0.003")["status"] == "approved"
    r = buy(conn, "other", "0.0051")
    assert r["reason"] == "MAX_POSITION_SIZE: limit=0.05, requested=0.0510, scope=global"
    r = buy(conn, "bt", "0.0101")
    assert r["reason"] == "MAX_POSITION_SIZE: limit=0.10, requested=0.1010, scope=global"
    assert buy(conn, "bt", "0.01")["status"] == "approved"


def test_account_limit_for_another_environment_refused(conn: psycopg.Connection) -> None:
    """An account keeps its environment: a live limit on a paper account would never
    apply (it was stored and said "set"). Refused, nothing written; the account's own
    environment, or none, is taken."""
    a = conn.execute("SELECT trading.create_account('a', 'paper', 'operator', 10000)"
                     ).fetchone()[0]
    before = conn.execute("SELECT count(*) FROM risk.limits").fetchone()[0]
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match="a live limit for account a would never apply: it is a paper"
                             " account"):
        set_limit(conn, "MAX_LEVERAGE", "1", acct="a", env="live")
    assert conn.execute("SELECT count(*) FROM risk.limits").fetchone()[0] == before
    set_limit(conn, "MAX_LEVERAGE", "3", acct="a", env="paper")
    assert effective(conn, a) == [("global", None, "MAX_LEVERAGE", Decimal("3"), a, "paper")]
    set_limit(conn, "MAX_LEVERAGE", "2", acct="a")
    assert conn.execute("SELECT array_agg(environment::text ORDER BY environment NULLS FIRST)"
                        " FROM risk.limits WHERE account_id = %s", (a,)).fetchone()[0] == [
        None, "paper"]


def test_limits_of_different_scopes_all_in_force(conn: psycopg.Connection) -> None:
    a = conn.execute("SELECT trading.create_account('a', 'paper', 'operator', 10000)"
                     ).fetchone()[0]
    set_limit(conn, "MAX_EXPOSURE", "0.9")
    set_limit(conn, "MAX_EXPOSURE", "0.4", "market", "crypto")
    set_limit(conn, "MAX_EXPOSURE", "0.3", "symbol", "BTCUSD", acct="a")
    assert [(r[0], r[1], r[3]) for r in effective(conn, a)] == [
        ("global", None, Decimal("0.9")), ("market", "crypto", Decimal("0.4")),
        ("symbol", "BTCUSD", Decimal("0.3"))]


# ------------------------------------------------------------------ privileges


def test_strategy_role_cannot_change_limits(conn: psycopg.Connection) -> None:
    lid = set_limit(conn, "MAX_LEVERAGE", "2")
    conn.execute("SET ROLE mmats_strategy")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            set_limit(conn, "MAX_LEVERAGE", "5")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE risk.limits SET value = 5")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT risk.remove_limit(%s)", (lid,))
    finally:
        conn.execute("RESET ROLE")
    assert conn.execute("SELECT value FROM risk.limits").fetchall() == [(2,)]


def test_api_role_can_set_limits_but_not_write_the_table(conn: psycopg.Connection) -> None:
    conn.execute("SET ROLE mmats_api")
    try:
        lid = set_limit(conn, "MAX_LEVERAGE", "2")
        assert set_limit(conn, "MAX_LEVERAGE", "3") == lid
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE risk.limits SET value = 5")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM risk.limit_history")
    finally:
        conn.execute("RESET ROLE")
    assert conn.execute("SELECT value FROM risk.limits").fetchall() == [(3,)]
    assert conn.execute("SELECT count(*) FROM risk.limit_history").fetchone()[0] == 2
