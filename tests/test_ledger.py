"""The ledger (migration 0002_05): trading.apply_fill and the order functions, against the
real database. Every expected number is worked out by hand in the test."""

from __future__ import annotations

import json
import re
from decimal import Decimal as D
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

T0 = "2026-01-05T10:00:00Z"
T1 = "2026-01-05T11:00:00Z"
T2 = "2026-01-05T12:00:00Z"
T3 = "2026-01-05T13:00:00Z"


# ----------------------------------------------------------------------------- helpers
def instrument(conn: psycopg.Connection, symbol: str, base: str, quote: str,
               market: str = "crypto", step: str = "0.001", calendar: str = "CRYPTO_24X7",
               venue: str = "test") -> int:
    return conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES (%s, %s, %s, %s, %s, 0.01, %s, 0, %s) RETURNING instrument_id",
        (symbol, venue, market, base, quote, step, calendar)).fetchone()[0]


def bar(conn: psycopg.Connection, iid: int, ts: str, close: str) -> None:
    conn.execute(
        "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)"
        " VALUES (%s, '1m', %s, %s, %s, %s, %s, 1)", (iid, ts, close, close, close, close))


def account(conn: psycopg.Connection, name: str, cash: str = "100000", env: str = "backtest",
            currency: str = "USD", position_mode: str = "oneway", allow_short: bool = False,
            aggregation: str = "independent") -> int:
    return conn.execute(
        "SELECT trading.create_account(%s, %s, 'operator', %s, %s, %s, %s, %s)",
        (name, env, D(cash), currency, position_mode, aggregation, allow_short)).fetchone()[0]


def order(conn: psycopg.Connection, acct: str, symbol: str, side: str, qty: str,
          **extra: Any) -> int:
    spec = {"account": acct, "symbol": symbol, "side": side, "quantity": qty, **extra}
    r = conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb(spec),)).fetchone()[0]
    assert r["status"] == "approved", r
    return r["order_id"]


def fill(conn: psycopg.Connection, order_id: int, bfid: str | None, qty: str, price: str,
         **extra: Any) -> dict:
    spec: dict[str, Any] = {"order_id": order_id, "quantity": qty, "price": price, **extra}
    if bfid is not None:
        spec["broker_fill_id"] = bfid
    return conn.execute("SELECT trading.apply_fill(%s)", (Jsonb(spec),)).fetchone()[0]


def one(conn: psycopg.Connection, q: str, *args: Any) -> Any:
    return conn.execute(q, args).fetchone()[0]


def cash(conn: psycopg.Connection, acct_id: int) -> D:
    return one(conn, "SELECT cash FROM trading.accounts WHERE account_id = %s", acct_id)


def position(conn: psycopg.Connection, acct_id: int, iid: int, leg: str = "net") -> dict:
    cur = conn.execute(
        "SELECT * FROM trading.positions WHERE account_id = %s AND instrument_id = %s"
        " AND leg = %s AND strategy_id IS NULL", (acct_id, iid, leg))
    names = [c.name for c in cur.description]
    row = cur.fetchone()
    assert row is not None, "no position row"
    return dict(zip(names, row, strict=True))


def order_row(conn: psycopg.Connection, oid: int) -> dict:
    cur = conn.execute("SELECT * FROM trading.orders WHERE order_id = %s", (oid,))
    names = [c.name for c in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def trades(conn: psycopg.Connection, acct_id: int) -> list[dict]:
    cur = conn.execute("SELECT * FROM trading.trades WHERE account_id = %s ORDER BY trade_id",
                       (acct_id,))
    names = [c.name for c in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


SNAPSHOT_TABLES = ["trading.accounts", "trading.positions", "trading.orders", "trading.fills",
                   "trading.trades", "risk.breaker_state", "risk.events", "trading.signals"]


def snapshot(conn: psycopg.Connection) -> dict[str, Any]:
    snap: dict[str, Any] = {}
    for t in SNAPSHOT_TABLES:
        snap[t] = conn.execute(
            f"SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY to_jsonb(x)::text), '[]')"
            f" FROM {t} x").fetchone()[0]
    snap["audit"] = one(conn, "SELECT count(*) FROM audit.events")
    snap["queue"] = one(conn, "SELECT count(*) FROM pgmq.q_orders")
    return snap


def refused(conn: psycopg.Connection, spec: dict, match: str) -> None:
    """apply_fill(spec) raises an error matching `match`, and no row anywhere changes."""
    before = snapshot(conn)
    with pytest.raises(psycopg.Error, match=match):
        conn.execute("SELECT trading.apply_fill(%s)", (Jsonb(spec),))
    assert snapshot(conn) == before


@pytest.fixture
def btc(conn: psycopg.Connection) -> int:
    iid = instrument(conn, "BTCUSD", "BTC", "USD")
    bar(conn, iid, "2026-01-05T09:00:00Z", "100")
    return iid


# ----------------------------------------------------------------------------- full fills
def test_full_buy_fill_moves_cash_position_order_and_fills(conn, btc):
    a = account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "10")
    r = fill(conn, oid, "f-1", "10", "100", commission="1", ts=T0, liquidity="taker")
    assert r["status"] == "applied" and r["order_status"] == "filled"
    assert D(str(r["position"])) == 10
    # 100000 - 10 x 100 - 1
    assert cash(conn, a) == D("98999")
    p = position(conn, a, btc)
    assert p["quantity"] == 10 and p["average_price"] == 100
    assert p["open_commission"] == 1 and p["commission_paid"] == 1 and p["realized_pnl"] == 0
    assert p["last_price"] == 100
    o = order_row(conn, oid)
    assert o["status"] == "filled" and o["filled_quantity"] == 10
    assert o["average_fill_price"] == 100
    f = conn.execute("SELECT order_id, broker_fill_id, side::text, quantity, price, commission,"
                     " commission_currency, liquidity, ts = %s::timestamptz"
                     " FROM trading.fills WHERE account_id = %s", (T0, a)).fetchall()
    assert f == [(oid, "f-1", "buy", D(10), D(100), D(1), "USD", "taker", True)]
    assert one(conn, "SELECT count(*) FROM audit.events WHERE event_type = 'fill.applied'"
                     " AND entity_id = %s", str(r["fill_id"])) == 1
    assert trades(conn, a) == []


def test_fill_by_client_order_id(conn, btc):
    a = account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "2", client_order_id="my-own-1")
    r = conn.execute("SELECT trading.apply_fill(%s)", (Jsonb(
        {"client_order_id": "my-own-1", "broker_fill_id": "x", "quantity": 2,
         "price": 50}),)).fetchone()[0]
    assert r["order_id"] == oid and r["order_status"] == "filled"
    assert cash(conn, a) == D("99900")


def legacy_client_id(conn: psycopg.Connection, order_id: int, client_order_id: str) -> None:
    """Give an order a client id of digits only, as one stored before place_manual_order
    refused them (the table allows them; the transition trigger, which keeps a client id
    fixed, is set aside for it)."""
    conn.execute("SET session_replication_role = replica")
    conn.execute("UPDATE trading.orders SET client_order_id = %s WHERE order_id = %s",
                 (client_order_id, order_id))
    conn.execute("SET session_replication_role = DEFAULT")


def test_a_reference_names_a_client_order_id_before_an_order_id(conn, btc):
    """A fill's client_order_id names the order of that client id, even one written like
    another order's id."""
    account(conn, "acc1")
    first = order(conn, "acc1", "BTCUSD", "buy", "1")
    second = order(conn, "acc1", "BTCUSD", "buy", "2")
    legacy_client_id(conn, second, str(first))
    r = conn.execute("SELECT trading.apply_fill(%s)", (Jsonb(
        {"client_order_id": str(first), "broker_fill_id": "c", "quantity": 2,
         "price": 50}),)).fetchone()[0]
    assert r["order_id"] == second and r["order_status"] == "filled"
    assert order_row(conn, first)["filled_quantity"] == 0


def test_partial_fills_weighted_average(conn, btc):
    a = account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "10")
    r = fill(conn, oid, "p1", "4", "100", commission="0.4")
    assert r["order_status"] == "partially_filled"
    o = order_row(conn, oid)
    assert o["status"] == "partially_filled" and o["filled_quantity"] == 4
    assert o["average_fill_price"] == 100
    r = fill(conn, oid, "p2", "6", "105", commission="0.6")
    assert r["order_status"] == "filled"
    o = order_row(conn, oid)
    # (4 x 100 + 6 x 105) / 10 = 1030 / 10 = 103
    assert o["status"] == "filled" and o["filled_quantity"] == 10
    assert o["average_fill_price"] == 103
    p = position(conn, a, btc)
    assert p["quantity"] == 10 and p["average_price"] == 103 and p["open_commission"] == 1
    # 100000 - 400 - 0.4 - 630 - 0.6
    assert cash(conn, a) == D("98969")


# ----------------------------------------------------------------------------- idempotency
def test_same_fill_twice_is_duplicate_and_changes_nothing(conn, btc):
    a = account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "10")
    first = fill(conn, oid, "dup-1", "4", "100", commission="0.5", ts=T0)
    before = snapshot(conn)
    again = fill(conn, oid, "dup-1", "4", "100", commission="0.5", ts=T0)
    assert again["status"] == "duplicate" and again["fill_id"] == first["fill_id"]
    assert again["order_status"] == "partially_filled"
    assert snapshot(conn) == before
    assert cash(conn, a) == D("99599.5")
    # also after the order is finished
    fill(conn, oid, "dup-2", "6", "100")
    before = snapshot(conn)
    assert fill(conn, oid, "dup-1", "4", "100", commission="0.5", ts=T0)["status"] == "duplicate"
    assert fill(conn, oid, "dup-2", "6", "100")["status"] == "duplicate"
    assert snapshot(conn) == before


@pytest.mark.parametrize("change", [{"quantity": "3"}, {"price": "101"},
                                    {"commission": "0.7"}, {"other_order": True}])
def test_same_broker_fill_id_with_other_values_refused(conn, btc, change):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "10")
    other = order(conn, "acc1", "BTCUSD", "buy", "10")
    fill(conn, oid, "same", "4", "100", commission="0.5")
    spec = {"order_id": oid, "broker_fill_id": "same", "quantity": "4", "price": "100",
            "commission": "0.5"}
    if change.pop("other_order", False):
        spec["order_id"] = other
    spec.update(change)
    refused(conn, spec, "already recorded|refusing different values")


# ----------------------------------------------------------------------- naming the order
def test_an_order_id_names_that_order_not_a_client_id_written_like_it(conn, btc):
    account(conn, "acc1")
    account(conn, "acc2")
    mine = order(conn, "acc1", "BTCUSD", "buy", "10")
    theirs = order(conn, "acc2", "BTCUSD", "buy", "10")
    # an order of another account whose client order id reads like my order's id
    legacy_client_id(conn, theirs, str(mine))
    assert fill(conn, mine, "by-id", "4", "100")["order_id"] == mine
    assert order_row(conn, mine)["filled_quantity"] == D(4)
    assert order_row(conn, theirs)["filled_quantity"] == D(0)


def test_a_fill_naming_two_orders_is_refused(conn, btc):
    account(conn, "acc1")
    a = order(conn, "acc1", "BTCUSD", "buy", "10")
    b = order(conn, "acc1", "BTCUSD", "buy", "10")
    coid_b = order_row(conn, b)["client_order_id"]
    base = {"broker_fill_id": "two", "quantity": "1", "price": "100"}
    refused(conn, {**base, "order_id": a, "client_order_id": coid_b},
            rf"fill.order_id {a} and fill.client_order_id '{coid_b}' name different orders")
    refused(conn, {**base, "order_id": "mm1-1"}, "fill.order_id must be a whole number")
    # both naming the same order is fine
    same = fill(conn, a, "two", "1", "100", client_order_id=order_row(conn, a)["client_order_id"])
    assert same["status"] == "applied" and same["order_id"] == a


# ----------------------------------------------------------------------------- refusals
def test_refusals_change_nothing(conn, btc):
    a = account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "10")
    fill(conn, oid, "ok-1", "4", "100")
    base = {"order_id": oid, "broker_fill_id": "new", "quantity": "1", "price": "100"}
    refused(conn, {**base, "order_id": 999999}, "unknown order")
    refused(conn, {**base, "order_id": None, "client_order_id": "nope"}, "unknown order")
    refused(conn, {**base, "quantity": "6.001"}, "exceeds the 6 remaining")
    refused(conn, {k: v for k, v in base.items() if k != "broker_fill_id"},
            "broker_fill_id is required")
    refused(conn, {**base, "broker_fill_id": ""}, "broker_fill_id is required")
    for bad in ["NaN", "0", "-1", "Infinity", "abc"]:
        refused(conn, {**base, "price": bad}, "fill.price must be")
    for bad in ["NaN", "0", "-2"]:
        refused(conn, {**base, "quantity": bad}, "fill.quantity must be")
    refused(conn, {**base, "commission": "-1"}, "fill.commission must be")
    refused(conn, {**base, "commission_currency": "EUR", "commission": "1"},
            "commission_currency EUR is neither")
    # the refused fills left the order open for a correct one
    assert fill(conn, oid, "new", "6", "100")["order_status"] == "filled"
    assert cash(conn, a) == D("99000")


def test_fill_on_cancelled_rejected_expired_order_refused(conn, btc):
    account(conn, "acc1")
    c = order(conn, "acc1", "BTCUSD", "buy", "1")
    r = order(conn, "acc1", "BTCUSD", "buy", "1")
    e = order(conn, "acc1", "BTCUSD", "buy", "1")
    conn.execute("SELECT trading.cancel_order(%s, 'changed my mind')", (str(c),))
    conn.execute("SELECT trading.reject_order(%s, 'INSUFFICIENT_FUNDS', 'no money')", (str(r),))
    conn.execute("SELECT trading.acknowledge_order(%s, 'B-e')", (str(e),))
    conn.execute("SELECT trading.expire_order(%s)", (str(e),))
    for oid, state in [(c, "cancelled"), (r, "rejected"), (e, "expired")]:
        refused(conn, {"order_id": oid, "broker_fill_id": f"z{oid}", "quantity": 1,
                       "price": 100}, f"is {state}: it takes no fills")


def test_fill_on_filled_order_refused(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "1")
    fill(conn, oid, "a", "1", "100")
    refused(conn, {"order_id": oid, "broker_fill_id": "b", "quantity": 1, "price": 100},
            "is filled: it takes no fills")


# ----------------------------------------------------------------------------- P&L
def test_reduction_realizes_pnl_and_writes_trade(conn, btc):
    a = account(conn, "acc1")
    buy = order(conn, "acc1", "BTCUSD", "buy", "10")
    fill(conn, buy, "b1", "10", "100", commission="1", ts=T0)
    sell = order(conn, "acc1", "BTCUSD", "sell", "10")
    assert order_row(conn, sell)["reduce_only"] is True
    r = fill(conn, sell, "s1", "10", "110", commission="1.1", ts=T1)
    # gross (110 - 100) x 10 = 100; commission 1 + 1.1 = 2.1; pnl 97.9
    assert D(str(r["realized_pnl"])) == D("97.9") and D(str(r["position"])) == 0
    (t,) = trades(conn, a)
    assert t["side"] == "long" and t["quantity"] == 10
    assert t["entry_price"] == 100 and t["exit_price"] == 110
    assert t["gross_pnl"] == 100 and t["commission"] == D("2.1") and t["pnl"] == D("97.9")
    assert t["entry_time"] == one(conn, "SELECT %s::timestamptz", T0)
    assert t["exit_time"] == one(conn, "SELECT %s::timestamptz", T1)
    assert t["exit_trigger"] == "manual" and t["strategy_id"] is None
    assert t["exit_fill_id"] == r["fill_id"]
    p = position(conn, a, btc)
    assert p["quantity"] == 0 and p["average_price"] is None and p["open_commission"] == 0
    assert p["realized_pnl"] == D("97.9") and p["commission_paid"] == D("2.1")
    # 100000 - 1000 - 1 + 1100 - 1.1
    assert cash(conn, a) == D("100097.9")


def test_partial_reduction_pro_rata_commission(conn, btc):
    a = account(conn, "acc1")
    fill(conn, order(conn, "acc1", "BTCUSD", "buy", "10"), "b1", "10", "100", commission="1",
         ts=T0)
    fill(conn, order(conn, "acc1", "BTCUSD", "sell", "4"), "s1", "4", "110", commission="0.44",
         ts=T1)
    (t,) = trades(conn, a)
    # gross (110 - 100) x 4 = 40; entry commission 1 x 4/10 = 0.4; exit 0.44; pnl 39.16
    assert (t["quantity"], t["gross_pnl"], t["commission"], t["pnl"]) == (
        4, 40, D("0.84"), D("39.16"))
    p = position(conn, a, btc)
    assert p["quantity"] == 6 and p["average_price"] == 100 and p["open_commission"] == D("0.6")
    assert p["opened_at"] == one(conn, "SELECT %s::timestamptz", T0)
    fill(conn, order(conn, "acc1", "BTCUSD", "sell", "6"), "s2", "6", "90", commission="0.54",
         ts=T2)
    t2 = trades(conn, a)[1]
    # gross (90 - 100) x 6 = -60; commission 0.6 + 0.54 = 1.14; pnl -61.14
    assert (t2["quantity"], t2["gross_pnl"], t2["commission"], t2["pnl"]) == (
        6, -60, D("1.14"), D("-61.14"))
    assert position(conn, a, btc)["realized_pnl"] == D("-21.98")
    # 100000 - 1000 - 1 + 440 - 0.44 + 540 - 0.54 = 99978.02 = 100000 + (-21.98)
    assert cash(conn, a) == D("99978.02")


def test_reversal_long_to_short(conn, btc):
    a = account(conn, "acc1", allow_short=True)
    fill(conn, order(conn, "acc1", "BTCUSD", "buy", "10"), "b1", "10", "100", commission="1",
         ts=T0)
    sell = order(conn, "acc1", "BTCUSD", "sell", "15")
    assert order_row(conn, sell)["reduce_only"] is False
    r = fill(conn, sell, "s1", "15", "110", commission="1.5", ts=T1)
    assert D(str(r["position"])) == -5
    (t,) = trades(conn, a)
    # closes 10: gross 100; commission 1 (entry) + 1.5 x 10/15 = 1 (exit) -> 2; pnl 98
    assert (t["side"], t["quantity"], t["gross_pnl"], t["commission"], t["pnl"]) == (
        "long", 10, 100, 2, 98)
    p = position(conn, a, btc)
    # the remaining 5 short open at 110 with 1.5 x 5/15 = 0.5 of entry commission
    assert p["quantity"] == -5 and p["average_price"] == 110 and p["open_commission"] == D("0.5")
    assert p["opened_at"] == one(conn, "SELECT %s::timestamptz", T1)
    # 100000 - 1000 - 1 + 1650 - 1.5
    assert cash(conn, a) == D("100647.5")
    # cover the short at 100: gross (110 - 100) x 5 = 50, commission 0.5 + 0.5, pnl 49
    fill(conn, order(conn, "acc1", "BTCUSD", "buy", "5"), "c1", "5", "100", commission="0.5",
         ts=T2)
    t2 = trades(conn, a)[1]
    assert (t2["side"], t2["quantity"], t2["entry_price"], t2["exit_price"], t2["gross_pnl"],
            t2["commission"], t2["pnl"]) == ("short", 5, 110, 100, 50, 1, 49)
    assert t2["entry_time"] == one(conn, "SELECT %s::timestamptz", T1)
    # 100647.5 - 500 - 0.5 = 100147 = 100000 + 98 + 49
    assert cash(conn, a) == D("100147")
    assert position(conn, a, btc)["realized_pnl"] == 147


def test_short_position_pnl(conn, btc):
    a = account(conn, "acc1", allow_short=True)
    r = fill(conn, order(conn, "acc1", "BTCUSD", "sell", "4"), "s1", "4", "100",
             commission="0.4", ts=T0)
    assert D(str(r["position"])) == -4
    # selling short credits the cash: 100000 + 400 - 0.4
    assert cash(conn, a) == D("100399.6")
    eq = conn.execute("SELECT cash, positions_value, equity FROM trading.account_equity(%s)",
                      (a,)).fetchone()
    assert eq == (D("100399.6"), D(-400), D("99999.6"))
    fill(conn, order(conn, "acc1", "BTCUSD", "buy", "4"), "b1", "4", "120", commission="0.48",
         ts=T1)
    (t,) = trades(conn, a)
    # gross (100 - 120) x 4 = -80; commission 0.4 + 0.48; pnl -80.88
    assert (t["side"], t["gross_pnl"], t["commission"], t["pnl"]) == (
        "short", -80, D("0.88"), D("-80.88"))
    assert cash(conn, a) == D("99919.12")


def test_short_refused_without_allow_short(conn, btc):
    account(conn, "acc1")
    r = conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb(
        {"account": "acc1", "symbol": "BTCUSD", "side": "sell", "quantity": 1}),)).fetchone()[0]
    assert r["status"] == "rejected" and r["reason_code"] == "SHORT_NOT_ALLOWED"
    assert one(conn, "SELECT count(*) FROM trading.orders") == 0


# ----------------------------------------------------------------------------- hedge mode
def test_hedge_mode_keeps_long_and_short_legs(conn, btc):
    a = account(conn, "hedge1", position_mode="hedge", allow_short=True)
    conn.execute("SELECT trading.assign_strategy('hedge1', 'hs', 1, 'fixed_quantity',"
                 " '{\"quantity\": 10}')")

    def signal(action: str) -> dict:
        return conn.execute("SELECT trading.submit_signal(%s)", (Jsonb(
            {"account": "hedge1", "strategy": "hs", "symbol": "BTCUSD", "action": action,
             "price": 100}),)).fetchone()[0]

    b = signal("buy")
    assert b["status"] == "approved", b
    fill(conn, b["order_id"], "h1", "10", "100", commission="1", ts=T0)
    s = signal("sell")
    assert s["status"] == "approved", s
    fill(conn, s["order_id"], "h2", "10", "104", commission="1", ts=T1)
    rows = conn.execute("SELECT leg::text, quantity, average_price FROM trading.positions"
                        " WHERE account_id = %s ORDER BY leg", (a,)).fetchall()
    assert rows == [("long", D(10), D(100)), ("short", D(10), D(104))]
    assert trades(conn, a) == []
    # 100000 - 1000 - 1 + 1040 - 1
    assert cash(conn, a) == D("100038")
    # close both legs: the long at 110 (+100 gross), the short at 110 (-60 gross)
    c = signal("close")
    assert c["status"] == "approved", c
    ids = [x for x in c["order_ids"]]
    assert len(ids) == 2
    for i, oid in enumerate(ids):
        o = order_row(conn, oid)
        fill(conn, oid, f"hc{i}", str(o["quantity"]), "110", commission="1", ts=T2)
    got = {t["side"]: (t["gross_pnl"], t["pnl"]) for t in trades(conn, a)}
    assert got == {"long": (D(100), D(98)), "short": (D(-60), D(-62))}
    assert conn.execute("SELECT leg::text, quantity FROM trading.positions WHERE account_id = %s"
                        " ORDER BY leg", (a,)).fetchall() == [("long", 0), ("short", 0)]
    # 100038 - 1100 - 1 + 1100 - 1 = 100036 = 100000 + 98 - 62
    assert cash(conn, a) == D("100036")


def equity(conn: psycopg.Connection, acct_id: int) -> D:
    return one(conn, "SELECT equity FROM trading.account_equity(%s)", acct_id)


def test_a_fill_marks_both_hedge_legs(conn, btc):
    """Long 10 at 100 and short 10 at 104, each with 1 of commission: flat at 104, so the
    equity is the cash, 100 038. Before 0004_07 the long leg kept its mark of 100
    (equity 99 998)."""
    a = account(conn, "hedge1", position_mode="hedge", allow_short=True)
    conn.execute("SELECT trading.assign_strategy('hedge1', 'hs', 1, 'fixed_quantity',"
                 " '{\"quantity\": 10}')")
    for action, fill_id, price, ts in (("buy", "h1", "100", T0), ("sell", "h2", "104", T1)):
        r = conn.execute("SELECT trading.submit_signal(%s)", (Jsonb(
            {"account": "hedge1", "strategy": "hs", "symbol": "BTCUSD", "action": action,
             "price": 100}),)).fetchone()[0]
        assert r["status"] == "approved", r
        fill(conn, r["order_id"], fill_id, "10", price, commission="1", ts=ts)
    assert conn.execute("SELECT leg::text, last_price FROM trading.positions WHERE"
                        " account_id = %s ORDER BY leg", (a,)).fetchall() == [
        ("long", D(104)), ("short", D(104))]
    assert (cash(conn, a), equity(conn, a)) == (D(100038), D(100038))


def test_a_fill_marks_the_other_strategies_rows_of_its_instrument(conn, btc):
    """Independent rows: A holds 10 at 100, then B buys 5 at 110: both rows are worth 110
    now: 98 450 cash + 15 x 110 = 100 100 (before 0004_07 A's row stayed at 100)."""
    a = account(conn, "ind1")
    for name, qty in (("sa", 10), ("sb", 5)):
        conn.execute("SELECT trading.assign_strategy('ind1', %s, 0.5, 'fixed_quantity', %s)",
                     (name, Jsonb({"quantity": qty})))

    def bought(strategy: str, qty: str, price: str, fill_id: str, ts: str) -> None:
        r = conn.execute("SELECT trading.submit_signal(%s)", (Jsonb({
            "account": "ind1", "strategy": strategy, "symbol": "BTCUSD", "action": "buy",
            "size": 1, "price": price, "ts": ts}),)).fetchone()[0]
        assert r["status"] == "approved", r
        fill(conn, r["order_id"], fill_id, qty, price, ts=ts)

    bought("sa", "10", "100", "a1", T0)
    bought("sb", "5", "110", "b1", T1)
    assert (cash(conn, a), equity(conn, a)) == (D(98450), D(100100))


def test_a_late_fill_does_not_overwrite_a_newer_mark(conn, btc):
    """A paper position of 10 marked at 120 by the 10:05 bar (its close, 10:06); a fill of
    1 more at 100, dated 10:00:30, arrives after: the rows stay at 120 (before 0004_07 the
    fill's 100 replaced the newer mark: equity 100 000 instead of 100 220)."""
    a = account(conn, "late1", env="paper")
    fill(conn, order(conn, "late1", "BTCUSD", "buy", "10"), "l1", "10", "100",
         ts="2026-01-05T10:00:00Z")
    late = order(conn, "late1", "BTCUSD", "buy", "1")
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1m', '2026-01-05T10:05:00Z', 120, 120, 120, 120, 1)",
                 (btc,))
    assert one(conn, "SELECT last_price FROM trading.positions WHERE account_id = %s", a) == 120
    fill(conn, late, "l2", "1", "100", ts="2026-01-05T10:00:30Z")
    assert one(conn, "SELECT last_price FROM trading.positions WHERE account_id = %s", a) == 120
    assert (cash(conn, a), equity(conn, a)) == (D(98900), D(100220))


@pytest.mark.parametrize(("fill_id", "shown"), [("a\nb", '"a\\nb"'), ("\u0001", '"\\u0001"'),
                                               (" x", '" x"'), ("x ", '"x "')])
def test_a_broker_fill_id_must_be_printable(conn, btc, fill_id, shown):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "1")
    refused(conn, {"order_id": oid, "broker_fill_id": fill_id, "quantity": 1, "price": 100},
            re.escape(f"fill.broker_fill_id must be printable characters, not starting or "
                      f"ending with a space, got {shown}"))


def test_liquidity_is_maker_or_taker_in_any_case(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "2")
    assert fill(conn, oid, "m1", "1", "100", liquidity="MAKER")["status"] == "applied"
    assert one(conn, "SELECT liquidity FROM trading.fills WHERE broker_fill_id = 'm1'") == "maker"
    refused(conn, {"order_id": oid, "broker_fill_id": "m2", "quantity": 1, "price": 100,
                   "liquidity": "market"},
            re.escape('fill.liquidity must be maker or taker, got "market"'))


def test_hedge_leg_cannot_go_past_zero(conn, btc):
    a = account(conn, "hedge1", position_mode="hedge", allow_short=True)
    fill(conn, order(conn, "hedge1", "BTCUSD", "buy", "2"), "h1", "2", "100")
    # a closing order of the long leg bigger than it (inserted directly: the functions
    # would not make one)
    oid = one(conn, "INSERT INTO trading.orders (account_id, instrument_id, client_order_id,"
                    " side, order_type, quantity, position_leg, reduce_only)"
                    " VALUES (%s, %s, 'leg-x', 'sell', 'market', 3, 'long', false)"
                    " RETURNING order_id", a, btc)
    refused(conn, {"order_id": oid, "broker_fill_id": "x", "quantity": 3, "price": 100},
            "past zero")


# ----------------------------------------------------------------------------- FX
@pytest.fixture
def jpy(conn):
    """BTCJPY quoted in JPY and the USDJPY pair (125 yen a dollar: 1 JPY = 0.008 USD)."""
    btcjpy = instrument(conn, "BTCJPY", "BTC", "JPY")
    usdjpy = instrument(conn, "USDJPY", "USD", "JPY", market="forex", calendar="FX_24X5")
    bar(conn, btcjpy, "2026-01-05T09:00:00Z", "1000000")
    bar(conn, usdjpy, "2026-01-05T09:00:00Z", "125")
    return btcjpy, usdjpy


def test_fx_cash_and_pnl_converted(conn, jpy):
    btcjpy, _ = jpy
    a = account(conn, "fx1")
    fill(conn, order(conn, "fx1", "BTCJPY", "buy", "0.1"), "j1", "0.1", "1000000",
         commission="1000", commission_currency="JPY", ts=T0)
    # 0.1 x 1,000,000 JPY = 100,000 JPY = 800 USD; commission 1000 JPY = 8 USD
    assert cash(conn, a) == D("99192")
    p = position(conn, a, btcjpy)
    assert p["average_price"] == 1000000 and p["open_commission"] == 8
    assert one(conn, "SELECT commission FROM trading.fills WHERE broker_fill_id = 'j1'") == 8
    fill(conn, order(conn, "fx1", "BTCJPY", "sell", "0.1"), "j2", "0.1", "1100000",
         commission="1100", commission_currency="JPY", ts=T1)
    # proceeds 110,000 JPY = 880 USD; commission 8.8 USD
    assert cash(conn, a) == D("100063.2")
    (t,) = trades(conn, a)
    # gross 10,000 JPY = 80 USD; pnl 80 - 8 - 8.8 = 63.2
    assert (t["gross_pnl"], t["commission"], t["pnl"]) == (80, D("16.8"), D("63.2"))


def test_fx_commission_in_base_currency(conn, jpy):
    a = account(conn, "fx1")
    fill(conn, order(conn, "fx1", "BTCJPY", "buy", "0.1"), "j1", "0.1", "1000000",
         commission="0.0001", commission_currency="BTC", ts=T0)
    # 0.0001 BTC x 1,000,000 JPY x 0.008 = 0.8 USD
    assert one(conn, "SELECT commission FROM trading.fills WHERE broker_fill_id = 'j1'") == D(
        "0.8")
    assert cash(conn, a) == D("99199.2")


def test_fx_pnl_includes_the_currency_move(conn, jpy):
    """Bought at 125 yen a dollar, sold at 100: the dollar account's realized P&L is what
    its cash gained (the trade's account-currency result), not the yen gain at today's rate."""
    _, usdjpy = jpy
    a = account(conn, "fx1")
    fill(conn, order(conn, "fx1", "BTCJPY", "buy", "0.1"), "j1", "0.1", "1000000", ts=T0)
    bar(conn, usdjpy, "2026-01-05T10:30:00Z", "100")
    fill(conn, order(conn, "fx1", "BTCJPY", "sell", "0.1"), "j2", "0.1", "1100000", ts=T1)
    # paid 100,000 JPY x 0.008 = 800 USD, received 110,000 JPY x 0.01 = 1100 USD
    assert cash(conn, a) == D("100300")
    (t,) = trades(conn, a)
    assert t["pnl"] == 300 and t["gross_pnl"] == 300


def test_fx_takes_the_latest_bar_of_either_direction_on_any_venue(conn):
    """JPY/USD listed on an old venue with one bar of 2020 (0.01), USD/JPY on a live one at
    125 this morning: a yen is 0.008 dollars now. Before 0004_07 the stale direct pair of
    the lower instrument id won. At a time before this morning's bar, 2020's is the latest."""
    old = instrument(conn, "JPYUSD", "JPY", "USD", market="forex", calendar="FX_24X5",
                     venue="old")
    bar(conn, old, "2020-01-02T00:00:00Z", "0.01")
    live = instrument(conn, "USDJPY", "USD", "JPY", market="forex", calendar="FX_24X5",
                      venue="live")
    bar(conn, live, "2026-01-05T09:00:00Z", "125")
    assert old < live
    rate = "SELECT trading.fx_rate('JPY', 'USD', %s)"
    assert one(conn, rate, "2026-01-05T10:00:00Z") == D("0.008")
    assert one(conn, rate, None) == D("0.008")
    assert one(conn, rate, "2025-06-01T00:00:00Z") == D("0.01")
    assert one(conn, "SELECT trading.fx_rate('USD', 'JPY', %s)", "2026-01-05T10:00:00Z") == 125
    # the same time on both: the direct pair
    bar(conn, old, "2026-01-05T09:00:00Z", "0.0081")
    assert one(conn, rate, "2026-01-05T10:00:00Z") == D("0.0081")
    assert one(conn, "SELECT trading.fx_rate('JPY', 'USD', %s)", "2019-01-01T00:00:00Z") is None


def test_fx_missing_rate_refused(conn):
    btcjpy = instrument(conn, "BTCJPY", "BTC", "JPY")
    bar(conn, btcjpy, "2026-01-05T09:00:00Z", "1000000")
    a = account(conn, "fx1")
    # the order is made directly (the risk gate would refuse it for the same reason)
    oid = one(conn, "INSERT INTO trading.orders (account_id, instrument_id, client_order_id,"
                    " side, order_type, quantity) VALUES (%s, %s, 'fx-o', 'buy', 'market', 1)"
                    " RETURNING order_id", a, btcjpy)
    refused(conn, {"order_id": oid, "broker_fill_id": "x", "quantity": 1, "price": 1000000},
            "no conversion rate from JPY to USD.*JPY/USD or USD/JPY")
    # a rate that exists only after the fill time does not count
    usdjpy = instrument(conn, "USDJPY", "USD", "JPY", market="forex", calendar="FX_24X5")
    bar(conn, usdjpy, "2026-01-05T12:00:00Z", "125")
    refused(conn, {"order_id": oid, "broker_fill_id": "x", "quantity": 1, "price": 1000000,
                   "ts": T0}, "no conversion rate from JPY to USD")
    assert fill(conn, oid, "x", "1", "1000000", ts=T2)["status"] == "applied"
    assert cash(conn, a) == D("92000")


# ----------------------------------------------------------------------------- order functions
def test_reject_order_and_rejection_streak_trips_soft_breaker(conn, btc):
    a = account(conn, "acc1")
    conn.execute("UPDATE trading.accounts SET max_consecutive_rejections = 3"
                 " WHERE account_id = %s", (a,))
    ids = [order(conn, "acc1", "BTCUSD", "buy", "1") for _ in range(4)]
    r = one(conn, "SELECT trading.reject_order(%s, 'insufficient_funds', 'broker says no')",
            str(ids[0]))
    assert r["status"] == "rejected" and r["consecutive_rejections"] == 1
    assert r["breaker_tripped"] is False
    o = order_row(conn, ids[0])
    assert (o["status"], o["reason_code"], o["reason"]) == (
        "rejected", "INSUFFICIENT_FUNDS", "broker says no")
    # rejecting twice changes nothing
    before = snapshot(conn)
    assert one(conn, "SELECT trading.reject_order(%s, 'X')", str(ids[0]))["status"] == (
        "already_rejected")
    assert snapshot(conn) == before
    one(conn, "SELECT trading.reject_order(%s, 'BROKER_DOWN')", str(ids[1]))
    assert one(conn, "SELECT mode::text FROM risk.breaker_state WHERE account_id = %s", a) == "OK"
    r = one(conn, "SELECT trading.reject_order(%s, 'BROKER_DOWN')", str(ids[2]))
    assert r["consecutive_rejections"] == 3 and r["breaker_tripped"] is True
    assert one(conn, "SELECT mode::text FROM risk.breaker_state WHERE account_id = %s",
               a) == "SOFT"
    assert one(conn, "SELECT mode::text FROM trading.accounts WHERE account_id = %s",
               a) == "advisory"
    ev = conn.execute("SELECT event_type, message FROM risk.events WHERE account_id = %s",
                      (a,)).fetchall()
    assert len(ev) == 1 and ev[0][0] == "REJECTION_STREAK"
    assert "3 consecutive order rejections (last: BROKER_DOWN)" in ev[0][1]
    assert one(conn, "SELECT count(*) FROM audit.events WHERE event_type ="
                     " 'account.downgraded' AND entity_id = %s", str(a)) == 1
    with pytest.raises(psycopg.Error, match="advisory mode"):
        order(conn, "acc1", "BTCUSD", "buy", "1")


def test_reject_order_bad_reason_code(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "1")
    before = snapshot(conn)
    with pytest.raises(psycopg.Error, match="UPPER_SNAKE"):
        conn.execute("SELECT trading.reject_order(%s, 'not ok!')", (str(oid),))
    assert snapshot(conn) == before


def test_a_fill_resets_the_rejection_streak(conn, btc):
    a = account(conn, "acc1")
    conn.execute("UPDATE trading.accounts SET max_consecutive_rejections = 3"
                 " WHERE account_id = %s", (a,))
    ids = [order(conn, "acc1", "BTCUSD", "buy", "1") for _ in range(5)]
    one(conn, "SELECT trading.reject_order(%s, 'NO')", str(ids[0]))
    one(conn, "SELECT trading.reject_order(%s, 'NO')", str(ids[1]))
    fill(conn, ids[2], "f", "1", "100")
    assert one(conn, "SELECT consecutive_rejections FROM trading.accounts"
                     " WHERE account_id = %s", a) == 0
    one(conn, "SELECT trading.reject_order(%s, 'NO')", str(ids[3]))
    r = one(conn, "SELECT trading.reject_order(%s, 'NO')", str(ids[4]))
    assert r["consecutive_rejections"] == 2 and r["breaker_tripped"] is False
    assert one(conn, "SELECT mode::text FROM risk.breaker_state WHERE account_id = %s", a) == "OK"
    assert one(conn, "SELECT mode::text FROM trading.accounts WHERE account_id = %s",
               a) == "operator"
    assert one(conn, "SELECT count(*) FROM risk.events WHERE account_id = %s", a) == 0


def test_cancel_twice_is_idempotent(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "3")
    fill(conn, oid, "f", "1", "100")
    r = one(conn, "SELECT trading.cancel_order(%s, 'enough')", str(oid))
    assert r["status"] == "cancelled" and r["previous"] == "partially_filled"
    o = order_row(conn, oid)
    assert (o["status"], o["filled_quantity"], o["reason"]) == ("cancelled", 1, "enough")
    before = snapshot(conn)
    r = one(conn, "SELECT trading.cancel_order(%s)", str(oid))
    assert r["status"] == "unchanged" and r["order_status"] == "cancelled"
    assert snapshot(conn) == before


def test_cancel_filled_order_refused(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "1")
    fill(conn, oid, "f", "1", "100")
    before = snapshot(conn)
    with pytest.raises(psycopg.Error, match="illegal order transition filled -> cancelled"):
        conn.execute("SELECT trading.cancel_order(%s)", (str(oid),))
    assert snapshot(conn) == before


def test_a_queued_order_the_account_may_no_longer_send_is_cancelled_at_the_gate(conn, btc):
    """trading.mark_in_flight (0004_07): an opening order queued before a SOFT breaker, or
    before the account went advisory, is cancelled instead of sent; an exit still goes
    under SOFT; under a FREEZE nothing goes, exits included. Before 0004_07 every queued
    order went out."""
    account(conn, "acc1")
    fill(conn, order(conn, "acc1", "BTCUSD", "buy", "2"), "f0", "2", "100")
    closing = one(conn, "SELECT trading.close_position('acc1', 'BTCUSD')")["order_ids"][0]
    # (after the close: close_position cancels the open entries, 0004_13)
    opening = order(conn, "acc1", "BTCUSD", "buy", "1")
    conn.execute("SELECT risk.trip_breaker('acc1', 'SOFT', 'daily loss near the limit')")

    def gate(oid: int) -> dict:
        return one(conn, "SELECT trading.mark_in_flight(%s)",
                   order_row(conn, oid)["client_order_id"])

    r = gate(opening)
    assert (r["status"], r["reason_code"]) == ("cancelled", "BREAKER_SOFT")
    assert r["reason"] == ("BREAKER_SOFT: account acc1 has its breaker at SOFT (daily loss "
                           "near the limit): the order was not sent")
    o = order_row(conn, opening)
    assert (o["status"], o["reason_code"], o["reason"]) == ("cancelled", "BREAKER_SOFT",
                                                            r["reason"])
    assert gate(closing)["status"] == "in_flight"  # an exit goes
    # advisory: an opening order made while operator stays home
    conn.execute("SELECT risk.reset_breaker('acc1', 'RESET acc1')")
    later = order(conn, "acc1", "BTCUSD", "buy", "1")
    conn.execute("SELECT trading.set_advisory('acc1', 'operator stepped away')")
    assert gate(later)["reason_code"] == "ACCOUNT_ADVISORY"
    # a FREEZE stops exits too
    conn.execute("UPDATE trading.accounts SET mode = 'operator' WHERE name = 'acc1'")
    acc1 = one(conn, "SELECT account_id FROM trading.accounts WHERE name = %s", "acc1")
    exit_ = reduce_only_row(conn, acc1, btc, "sell", 1)
    conn.execute("SELECT risk.trip_breaker('acc1', 'FREEZE', 'reconciliation mismatch')")
    r = gate(exit_)
    assert (r["status"], r["reason_code"]) == ("cancelled", "BREAKER_FREEZE")
    assert order_row(conn, exit_)["status"] == "cancelled"
    # an order acknowledged without being sent (the paper book's way) passes the same gate
    unsent = one(conn, "INSERT INTO trading.orders (account_id, instrument_id, client_order_id,"
                       " side, order_type, quantity) SELECT account_id, %s, 'unsent-1', 'buy',"
                       " 'market', 1 FROM trading.accounts WHERE name = 'acc1'"
                       " RETURNING order_id", btc)
    r = one(conn, "SELECT trading.acknowledge_order('unsent-1', 'paper-unsent-1')")
    assert (r["status"], r["reason_code"]) == ("cancelled", "BREAKER_FREEZE")
    assert order_row(conn, unsent)["broker_order_id"] is None
    types = [t for (t,) in conn.execute(
        "SELECT event_type FROM audit.events WHERE entity = 'trading.orders' AND entity_id = %s"
        " ORDER BY event_id", (str(opening),)).fetchall()]
    assert types == ["order.created", "order.cancelled"]


def test_mark_in_flight_and_acknowledge(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "2")
    coid = order_row(conn, oid)["client_order_id"]
    r = one(conn, "SELECT trading.mark_in_flight(%s)", coid)
    assert r["status"] == "in_flight" and r["previous"] == "created"
    o = order_row(conn, oid)
    assert o["status"] == "in_flight" and o["submitted_at"] is not None
    assert one(conn, "SELECT trading.mark_in_flight(%s)", coid)["status"] == "unchanged"
    r = one(conn, "SELECT trading.acknowledge_order(%s, 'BRK-77')", str(oid))
    assert r["status"] == "submitted" and r["previous"] == "in_flight"
    o2 = order_row(conn, oid)
    assert o2["status"] == "submitted" and o2["broker_order_id"] == "BRK-77"
    assert o2["submitted_at"] == o["submitted_at"]
    assert fill(conn, oid, "f1", "2", "100")["order_status"] == "filled"
    types = [t for (t,) in conn.execute(
        "SELECT event_type FROM audit.events WHERE entity = 'trading.orders' AND entity_id = %s"
        " ORDER BY event_id", (str(oid),)).fetchall()]
    assert types == ["order.created", "order.in_flight", "order.submitted"]


def reduce_only_row(conn, account: int, instrument: int, side: str, qty: int) -> int:
    """A reduce-only order row made directly (as the owner), beside the exits there are."""
    return one(conn, "INSERT INTO trading.orders (account_id, instrument_id, client_order_id,"
                     " side, order_type, quantity, reduce_only) VALUES (%s, %s,"
                     " 'ro-' || nextval('trading.orders_order_id_seq'), %s, 'market', %s, true)"
                     " RETURNING order_id", account, instrument, side, qty)


def test_reduce_only_fill_beyond_position_refused(conn, btc):
    a = account(conn, "acc1", allow_short=True)
    fill(conn, order(conn, "acc1", "BTCUSD", "buy", "5"), "b", "5", "100")
    s1 = order(conn, "acc1", "BTCUSD", "sell", "3")
    # (place_manual_order no longer makes a second exit beyond the position: 0004_11;
    # a broker's or an older release's order is what the ledger must still refuse)
    s2 = reduce_only_row(conn, a, btc, "sell", 3)
    assert order_row(conn, s1)["reduce_only"] and order_row(conn, s2)["reduce_only"]
    fill(conn, s1, "s1", "3", "100")
    refused(conn, {"order_id": s2, "broker_fill_id": "s2", "quantity": 3, "price": 100},
            "reduce-only order .* would open or reverse")
    assert fill(conn, s2, "s2", "2", "100")["order_status"] == "partially_filled"
    assert position(conn, a, btc)["quantity"] == 0
    refused(conn, {"order_id": s2, "broker_fill_id": "s3", "quantity": 1, "price": 100},
            "reduce-only order")


def _strategy_long(conn, acct: str, strategy: str, qty: str, bfid: str) -> int:
    conn.execute("SELECT trading.assign_strategy(%s, %s, 1, 'fixed_quantity', %s)",
                 (acct, strategy, Jsonb({"quantity": qty})))
    s = one(conn, "SELECT trading.submit_signal(%s)", Jsonb(
        {"account": acct, "strategy": strategy, "symbol": "BTCUSD", "action": "buy",
         "price": 100}))
    assert s["status"] == "approved", s
    fill(conn, s["order_id"], bfid, qty, "100", commission="0.4", ts=T0)
    return one(conn, "SELECT strategy_id FROM trading.strategies WHERE name = %s", strategy)


def test_manual_sell_reduces_strategy_positions(conn, btc):
    """Independent aggregation (the default): a manual sell of a long held by strategies is
    a reduce-only order (the order function and the risk gate net every row); its fill
    reduces the account's own row first, then the strategies' rows, oldest first. (It used
    to be refused by the ledger: the broker would have sold and the ledger not.)"""
    a = account(conn, "acc1")
    st1 = _strategy_long(conn, "acc1", "st1", "4", "b1")
    st2 = _strategy_long(conn, "acc1", "st2", "2", "b2")
    sell = order(conn, "acc1", "BTCUSD", "sell", "5")
    assert order_row(conn, sell)["reduce_only"] is True
    r = fill(conn, sell, "s", "5", "110", commission="0.5", ts=T1)
    assert r["status"] == "applied" and D(str(r["position"])) == 1
    rows = conn.execute("SELECT strategy_id, quantity, open_commission FROM trading.positions"
                        " WHERE account_id = %s ORDER BY position_id", (a,)).fetchall()
    # st2 keeps 1 of its 2 and half its 0.4 entry commission
    assert rows == [(st1, 0, 0), (st2, 1, D("0.2"))]
    got = [(t["strategy_id"], t["quantity"], t["gross_pnl"], t["commission"], t["pnl"],
            t["exit_trigger"]) for t in trades(conn, a)]
    # st1: 4 x 10 = 40 gross; commission 0.4 entry + 0.5 x 4/5 = 0.4 exit; pnl 39.2
    # st2: 1 x 10 = 10 gross; commission 0.2 entry + 0.1 exit; pnl 9.7
    assert got == [(st1, 4, 40, D("0.8"), D("39.2"), "manual"),
                   (st2, 1, 10, D("0.3"), D("9.7"), "manual")]
    # 100000 - 400.4 - 200.4 + 550 - 0.5
    assert cash(conn, a) == D("99948.7")
    # a reduce-only fill beyond what all the rows hold is refused, nothing changes
    extra = order(conn, "acc1", "BTCUSD", "sell", "1")
    other = reduce_only_row(conn, a, btc, "sell", 1)
    fill(conn, extra, "s2", "1", "110")
    refused(conn, {"order_id": other, "broker_fill_id": "s3", "quantity": 1, "price": 110},
            "reduce-only order .* would open or reverse")


def test_manual_order_on_own_rows_of_independent_account(conn, btc):
    """The account's own (manual) long is reduced by a manual sell, next to a strategy's."""
    a = account(conn, "acc1")
    conn.execute("SELECT trading.assign_strategy('acc1', 'st', 1, 'fixed_quantity',"
                 " '{\"quantity\": 4}')")
    s = one(conn, "SELECT trading.submit_signal(%s)", Jsonb(
        {"account": "acc1", "strategy": "st", "symbol": "BTCUSD", "action": "buy",
         "price": 100}))
    fill(conn, s["order_id"], "b", "4", "100", ts=T0)
    fill(conn, order(conn, "acc1", "BTCUSD", "buy", "2"), "m1", "2", "100", ts=T0)
    sell = order(conn, "acc1", "BTCUSD", "sell", "2")
    assert order_row(conn, sell)["reduce_only"] is True
    fill(conn, sell, "m2", "2", "105", ts=T1)
    rows = conn.execute("SELECT strategy_id IS NULL, quantity FROM trading.positions"
                        " WHERE account_id = %s ORDER BY 1", (a,)).fetchall()
    assert rows == [(False, 4), (True, 0)]
    assert [t["pnl"] for t in trades(conn, a)] == [10]
    # 100000 - 400 - 200 + 210
    assert cash(conn, a) == D("99610")


def test_duplicate_with_quote_currency_commission(conn, jpy):
    account(conn, "fx1")
    oid = order(conn, "fx1", "BTCJPY", "buy", "0.2")
    spec = {"order_id": oid, "broker_fill_id": "q1", "quantity": "0.1", "price": "1000000",
            "commission": "1000", "commission_currency": "JPY", "ts": T0}
    assert one(conn, "SELECT trading.apply_fill(%s)", Jsonb(spec))["status"] == "applied"
    before = snapshot(conn)
    assert one(conn, "SELECT trading.apply_fill(%s)", Jsonb(spec))["status"] == "duplicate"
    assert snapshot(conn) == before
    # 1000 JPY is 8 USD; the same 8 USD named in dollars is the same fill too
    same = {**spec, "commission": "8", "commission_currency": "USD"}
    assert one(conn, "SELECT trading.apply_fill(%s)", Jsonb(same))["status"] == "duplicate"
    refused(conn, {**spec, "commission": "1001"}, "refusing different values")


# ----------------------------------------------------------------------------- roles
def test_router_role_applies_fills_but_writes_no_table(conn, btc):
    a = account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "2")
    conn.execute("SET ROLE mmats_router")
    try:
        r = fill(conn, oid, "rt-1", "1", "100")
        assert r["status"] == "applied"
        for stmt in [
            "INSERT INTO trading.fills (account_id, order_id, instrument_id, broker_fill_id,"
            f" side, quantity, price, ts) VALUES ({a}, {oid}, {btc}, 'evil', 'buy', 1, 1, now())",
            f"INSERT INTO trading.positions (account_id, instrument_id) VALUES ({a}, {btc})",
            f"UPDATE trading.accounts SET cash = 1e9 WHERE account_id = {a}",
            f"UPDATE trading.positions SET quantity = 100 WHERE account_id = {a}",
            f"DELETE FROM trading.fills WHERE account_id = {a}",
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(stmt)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb(
                {"account": "acc1", "symbol": "BTCUSD", "side": "buy", "quantity": 1}),))
    finally:
        conn.execute("RESET ROLE")
    assert cash(conn, a) == D("99900")
    assert one(conn, "SELECT count(*) FROM trading.fills") == 1
    assert position(conn, a, btc)["quantity"] == 1


def test_strategy_role_cannot_apply_fills(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "2")
    conn.execute("SET ROLE mmats_strategy")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            fill(conn, oid, "x", "1", "100")
    finally:
        conn.execute("RESET ROLE")
    assert one(conn, "SELECT count(*) FROM trading.fills") == 0


def test_returned_json_is_well_formed(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "2")
    raw = one(conn, "SELECT trading.apply_fill(%s)::text", Jsonb(
        {"order_id": str(oid), "broker_fill_id": 7, "quantity": "2", "price": 100}))
    r = json.loads(raw)
    assert set(r) == {"status", "fill_id", "order_id", "order_status", "position",
                      "realized_pnl"}
    assert r["realized_pnl"] == 0


def test_replay_after_the_order_was_cancelled_is_a_duplicate(conn, btc):
    account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "3")
    fill(conn, oid, "f", "1", "100", commission="0.1")
    one(conn, "SELECT trading.cancel_order(%s)", str(oid))
    before = snapshot(conn)
    r = fill(conn, oid, "f", "1", "100", commission="0.1")
    assert r["status"] == "duplicate" and r["order_status"] == "cancelled"
    assert snapshot(conn) == before


def test_concurrent_same_fill_applied_once(db_url, conn, btc):
    """Two routers deliver the same broker fill at once: the account lock serialises them;
    the second sees the first's row and answers 'duplicate'."""
    import threading

    a = account(conn, "acc1")
    oid = order(conn, "acc1", "BTCUSD", "buy", "2")
    spec = Jsonb({"order_id": oid, "broker_fill_id": "race", "quantity": 2, "price": 100})
    results: list[Any] = []
    with psycopg.connect(db_url) as c1, psycopg.connect(db_url, autocommit=True) as c2:
        first = c1.execute("SELECT trading.apply_fill(%s)", (spec,)).fetchone()[0]

        def second() -> None:
            results.append(c2.execute("SELECT trading.apply_fill(%s)", (spec,)).fetchone()[0])

        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert t.is_alive()  # blocked on the account lock held by the first transaction
        c1.commit()
        t.join(10)
    assert first["status"] == "applied" and results[0]["status"] == "duplicate"
    assert one(conn, "SELECT count(*) FROM trading.fills") == 1
    assert cash(conn, a) == D("99800")
    assert position(conn, a, btc)["quantity"] == 2


@pytest.mark.parametrize(("ts", "says"), [
    ("9999-12-31T23:59:59Z", "more than a day after now, for its order"),
    ("0001-01-01T00:00:00Z", "more than a day before its order"),
])
def test_a_live_fill_dated_far_from_its_order_is_refused(conn, btc, ts, says):
    """A live broker's fill dated in 9999 or in year 1 (either made a trade held for minus
    3,652,058 days): refused, naming fill.ts; backtests and replays date fills in market
    time and are not judged so."""
    a = one(conn, "SELECT trading.create_account('live1', 'live', 'advisory', 100000)")
    oid = one(conn, "INSERT INTO trading.orders (account_id, instrument_id, client_order_id,"
                    " side, order_type, quantity) VALUES (%s, %s, 'lv-1', 'buy', 'market', 1)"
                    " RETURNING order_id", a, btc)
    refused(conn, {"order_id": oid, "broker_fill_id": "x", "quantity": 1, "price": 100,
                   "ts": ts}, r"^fill\.ts .* is " + re.escape(says))
    assert fill(conn, oid, "x", "1", "100")["status"] == "applied"  # now: fine
    b = account(conn, "bt1")
    assert b
    assert fill(conn, order(conn, "bt1", "BTCUSD", "buy", "1"), "y", "1", "100",
                ts="2001-01-01T00:00:00Z")["status"] == "applied"
