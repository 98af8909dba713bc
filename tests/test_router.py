"""The order router (workers/runtime/router.py) against the real trading core.

Every test drives a `Router` in-process on a fresh migrated database: real orders come
from `trading.submit_signal` / `trading.place_manual_order` through pgmq's `orders`
queue, and the router settles them with the real broker adapters. Alpaca and OANDA are
answered at the HTTP level by `responses` with the vendors' documented JSON (an
unregistered URL fails the request, so every test also proves which calls were made);
nothing of the router, the adapters or the database is mocked. Assertions are on rows:
orders, fills, positions, cash, risk events, runtime errors and the queue tables.

A "crash" between recording an outcome and archiving its message is produced by the
database itself: EXECUTE on the archive (or delay) function is revoked from the router's
role, so the router's call fails after the ledger holds the outcome, exactly as if the
process had died there.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

import psycopg
import pytest
import requests
import responses
from hypothesis import given
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from workers.backtest.data import to_us
from workers.brokers import errors
from workers.brokers.alpaca_broker import AlpacaBroker
from workers.brokers.oanda_broker import OandaBroker
from workers.ingest.instruments import ensure_instrument, spec_for
from workers.runtime.config import AccountConfig, PaperCosts
from workers.runtime.paper import PaperBroker
from workers.runtime.router import RoutedAccount, Router, backoff_seconds, check_environment

T0 = datetime(2024, 1, 2, tzinfo=UTC)  # the bar every scenario starts from
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)
SIGNAL_TS = T1 - timedelta(microseconds=1)  # a signal on bar T0, as the strategy worker dates it

ALPACA = "https://paper-api.alpaca.markets/v2"
BY_CLIENT_ID = f"{ALPACA}/orders:by_client_order_id"
ACTIVITIES = f"{ALPACA}/account/activities/FILL"
PAPER_KEY, LIVE_KEY, SECRET = "PKTEST4MMATS0001", "AKTEST4MMATS0001", "secret-for-tests-0001"
OID = "61e69015-8549-4bfd-b9c3-01e75843f47d"
OTHER_OID = "904837e3-3b76-47ec-b432-046db621571b"
NOT_FOUND = {"code": 40410000, "message": "order not found"}

OANDA_FIXTURES = Path(__file__).parent / "fixtures" / "oanda"
OANDA_ACCOUNT = "101-004-1435156-001"
OANDA = f"https://api-fxpractice.oanda.com/v3/accounts/{OANDA_ACCOUNT}"
OANDA_CREDENTIALS = {"account_id": OANDA_ACCOUNT, "access_token": "oanda-router-token-1b2c"}


# ---------------------------------------------------------------------------- database
def one(conn: psycopg.Connection, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def dicts(conn: psycopg.Connection, query: str, *args: Any) -> list[dict[str, Any]]:
    cur = conn.execute(query, args)
    assert cur.description is not None
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def order_row(conn: psycopg.Connection, order_id: int) -> dict[str, Any]:
    (row,) = dicts(conn, "SELECT *, status::text AS state FROM trading.orders"
                         " WHERE order_id = %s", order_id)
    return row


def fills(conn: psycopg.Connection, account_id: int) -> list[dict[str, Any]]:
    return dicts(conn, "SELECT order_id, broker_fill_id, quantity, price, commission,"
                       " commission_currency, liquidity, ts FROM trading.fills"
                       " WHERE account_id = %s ORDER BY fill_id", account_id)


def positions(conn: psycopg.Connection, account_id: int) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT instrument_id, quantity, average_price FROM trading.positions"
                        " WHERE account_id = %s AND quantity <> 0 ORDER BY position_id",
                        (account_id,)).fetchall()


def cash(conn: psycopg.Connection, account_id: int) -> Decimal:
    return Decimal(one(conn, "SELECT cash FROM trading.accounts WHERE account_id = %s",
                       account_id))


def queued(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """The orders queue: `wait` is how many seconds until a message is visible again."""
    return dicts(conn, "SELECT msg_id, read_ct, message,"
                       " extract(epoch FROM vt - clock_timestamp())::float8 AS wait"
                       " FROM pgmq.q_orders ORDER BY msg_id")


def archived(conn: psycopg.Connection) -> list[dict[str, Any]]:
    return dicts(conn, "SELECT msg_id, read_ct, message FROM pgmq.a_orders ORDER BY msg_id")


def reveal(conn: psycopg.Connection) -> None:
    """Every queued message visible now (what a visibility timeout ends in)."""
    conn.execute("SELECT trading.delay_order_message(msg_id, 0) FROM pgmq.q_orders")


def errors_of(conn: psycopg.Connection, kind: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT message FROM runtime.errors WHERE kind = %s"
                                       " ORDER BY error_id", (kind,)).fetchall()]


def ledger(conn: psycopg.Connection) -> dict[str, Any]:
    """Everything a settlement could change, to compare before and after."""
    out: dict[str, Any] = {}
    for table in ("trading.accounts", "trading.orders", "trading.fills", "trading.positions",
                  "trading.trades", "risk.events", "pgmq.q_orders", "pgmq.a_orders"):
        out[table] = one(conn, f"SELECT coalesce(jsonb_agg(to_jsonb(x) ORDER BY"
                               f" to_jsonb(x)::text), '[]') FROM {table} x")
    out["audit"] = one(conn, "SELECT count(*) FROM audit.events")
    return out


def instrument(conn: psycopg.Connection, symbol: str, market: str, close: str) -> int:
    iid, created = ensure_instrument(conn, spec_for(symbol, market))
    assert created
    add_bar(conn, iid, T0, close, close, close, close)
    return iid


def add_bar(conn: psycopg.Connection, iid: int, ts: datetime, o: str, h: str, low: str,
            c: str) -> None:
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1m', %s, %s, %s, %s, %s, 1000)",
                 (iid, ts, o, h, low, c))


def paper_account(conn: psycopg.Connection, name: str, environment: str = "paper",
                  cash_: int = 10000) -> int:
    acc = int(one(conn, "SELECT trading.create_account(%s, %s, 'operator', %s)",
                  name, environment, cash_))
    # the strategy these tests signal as, given the account's capital (the defaults)
    conn.execute("SELECT trading.assign_strategy(%s, 'alpha')", (name,))
    return acc


def live_account(conn: psycopg.Connection, name: str) -> int:
    """A live account in operator mode, the two-step way (it needs live credentials)."""
    acc = int(one(conn, "SELECT trading.create_account(%s, 'live', 'advisory', 10000)", name))
    conn.execute("INSERT INTO trading.credentials (account_id, venue, label, is_live, endpoint)"
                 " VALUES (%s, 'alpaca', 'main', true, 'live')", (acc,))
    token = one(conn, "SELECT trading.request_operator_mode(%s)", name)
    conn.execute("SELECT trading.confirm_operator_mode(%s, %s)", (name, token))
    return acc


def manual(conn: psycopg.Connection, account: str, symbol: str, quantity: str,
           side: str = "buy") -> tuple[int, str]:
    """A manual market order: (order id, client order id)."""
    r = one(conn, "SELECT trading.place_manual_order(%s)", Jsonb(
        {"account": account, "symbol": symbol, "side": side, "quantity": quantity}))
    assert r["status"] == "approved", r
    return int(r["order_id"]), order_row(conn, r["order_id"])["client_order_id"]


# ---------------------------------------------------------------------------- venues
def now_text(offset_seconds: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_seconds)).isoformat().replace(
        "+00:00", "Z")


def alpaca_order(client_order_id: str, **changes: Any) -> dict[str, Any]:
    """An Alpaca order object as GET/POST /v2/orders return it."""
    order: dict[str, Any] = {
        "id": OID, "client_order_id": client_order_id, "created_at": now_text(),
        "updated_at": now_text(), "submitted_at": now_text(), "filled_at": None,
        "expired_at": None, "canceled_at": None, "failed_at": None, "replaced_at": None,
        "replaced_by": None, "replaces": None,
        "asset_id": "b0b6dd9d-8b9b-48a9-ba46-b9d54906e415", "symbol": "AAPL",
        "asset_class": "us_equity", "notional": None, "qty": "10", "filled_qty": "0",
        "filled_avg_price": None, "order_class": "simple", "order_type": "market",
        "type": "market", "side": "buy", "position_intent": "buy_to_open",
        "time_in_force": "gtc", "limit_price": None, "stop_price": None,
        "status": "accepted", "extended_hours": False, "legs": None, "trail_percent": None,
        "trail_price": None, "hwm": None,
    }
    order.update(changes)
    return order


def activity(n: int, qty: str, cum_qty: str, price: str, *, order_id: str = OID,
             symbol: str = "AAPL", leaves_qty: str = "0") -> dict[str, Any]:
    """A FILL account activity as GET /v2/account/activities/FILL returns it."""
    return {"id": f"20240301150001{n:03d}::8efc7b9a-8b2b-4000-9955-{n:012d}",
            "activity_type": "FILL", "transaction_time": now_text(),
            "type": "fill" if leaves_qty == "0" else "partial_fill", "price": price,
            "qty": qty, "side": "buy", "symbol": symbol, "leaves_qty": leaves_qty,
            "order_id": order_id, "cum_qty": cum_qty,
            "order_status": "filled" if leaves_qty == "0" else "partially_filled"}


def alpaca_routed(account_id: int, name: str, *, environment: str = "paper",
                  endpoint: str = "paper", credential_endpoint: str | None = None
                  ) -> RoutedAccount:
    key = LIVE_KEY if endpoint == "live" else PAPER_KEY
    broker = AlpacaBroker({"api_key": key, "secret_key": SECRET}, endpoint)  # type: ignore[arg-type]
    config = AccountConfig(name=name, environment=environment, mode="operator",
                           broker="alpaca", endpoint=endpoint, credential="main")
    return RoutedAccount(account_id, config, broker, credential_endpoint or endpoint)


def paper_routed(account_id: int, name: str, costs: PaperCosts) -> RoutedAccount:
    config = AccountConfig(name=name, environment="paper", mode="operator", costs=costs)
    return RoutedAccount(account_id, config, PaperBroker(account_id, name, costs), "paper")


def calls(http: responses.RequestsMock, method: str, path_end: str = "") -> list[Any]:
    return [c for c in http.calls if c.request.method == method
            and urlsplit(c.request.url).path.endswith(path_end)]


def sent(call: Any) -> dict[str, Any]:
    return dict(json.loads(call.request.body))


class Crash:
    """Makes the router fail when it calls `trading.<signature>`, as if it died there:
    EXECUTE is revoked from its role until `restore()` (or the end of the test)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.revoked: list[str] = []

    def at(self, signature: str) -> None:
        self.conn.execute(f"REVOKE EXECUTE ON FUNCTION trading.{signature} FROM mmats_router")
        self.revoked.append(signature)

    def restore(self) -> None:
        while self.revoked:
            self.conn.execute(f"GRANT EXECUTE ON FUNCTION trading.{self.revoked.pop()}"
                              " TO mmats_router")


@pytest.fixture
def crash(conn: psycopg.Connection) -> Iterator[Crash]:
    c = Crash(conn)
    yield c
    c.restore()


# ---------------------------------------------------------------------------- 1. paper
COSTS = PaperCosts(commission=Decimal("0.002"))


def paper_signal(conn: psycopg.Connection) -> tuple[int, int, int, str]:
    """BTC/USD with a bar at T0, an operator paper account and its approved buy signal on
    that bar: (instrument, account, order id, client order id)."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    r = one(conn, "SELECT trading.submit_signal(%s)", Jsonb({
        "account": "paper1", "strategy": "alpha", "symbol": "BTC/USD", "action": "buy",
        "size": 0.5, "ts": SIGNAL_TS.isoformat()}))
    assert r["status"] == "approved", r
    # percent_equity: 10000 * 0.5 = 5000 at 100 -> 50
    assert Decimal(str(r["quantity"])) == 50
    return iid, acc, int(r["order_id"]), order_row(conn, r["order_id"])["client_order_id"]


def test_paper_order_is_acknowledged_archived_and_filled_at_the_next_bars_open(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    iid, acc, oid, coid = paper_signal(conn)
    (msg,) = queued(conn)
    assert msg["message"]["environment"] == "paper" and msg["message"]["order_id"] == oid
    router = make_router(paper_routed(acc, "paper1", COSTS))

    assert router.drain() == 1
    o = order_row(conn, oid)
    assert (o["state"], o["broker_order_id"]) == ("submitted", f"paper-{coid}")
    assert queued(conn) == []
    assert [(m["msg_id"], m["message"]["order_id"]) for m in archived(conn)] == [
        (msg["msg_id"], oid)]
    assert fills(conn, acc) == []  # the bar of the signal itself fills nothing

    add_bar(conn, iid, T1, "101", "103", "99", "102")
    router.settle_bars(iid, "1m", T1)

    # 50 at T1's open (101, no spread or slippage); commission 50 * 101 * 0.002 = 10.1
    (f,) = fills(conn, acc)
    assert f["broker_fill_id"] == f"paper-{oid}-{to_us(T1)}"
    assert (f["order_id"], f["quantity"], f["price"]) == (oid, Decimal(50), Decimal(101))
    assert (f["commission"], f["liquidity"], f["ts"]) == (Decimal("10.1"), "taker", T1)
    o = order_row(conn, oid)
    assert (o["state"], o["filled_quantity"], o["average_fill_price"]) == (
        "filled", Decimal(50), Decimal(101))
    assert positions(conn, acc) == [(iid, Decimal(50), Decimal(101))]
    assert cash(conn, acc) == Decimal("4939.9")  # 10000 - 5050 - 10.1
    assert one(conn, "SELECT at FROM runtime.cursors WHERE name = %s",
               f"paper:{iid}:1m") == T1

    # the same bar again, by this router and by a restarted one: nothing changes
    before = ledger(conn)
    router.settle_bars(iid, "1m", T1)
    make_router(paper_routed(acc, "paper1", COSTS)).settle_bars(iid, "1m", T1)
    assert ledger(conn) == before
    # and the fill itself, sent again under its deterministic id, is a duplicate
    again = one(conn, "SELECT trading.apply_fill(%s)", Jsonb({
        "client_order_id": coid, "broker_fill_id": f"paper-{oid}-{to_us(T1)}",
        "quantity": "50", "price": "101", "commission": "10.1", "ts": T1.isoformat()}))
    assert again["status"] == "duplicate"
    assert ledger(conn) == before


def test_paper_fill_follows_the_bar_notification_through_step(
        conn: psycopg.Connection, db_url: str, make_router: Callable[..., Router]) -> None:
    iid, acc, oid, _coid = paper_signal(conn)
    router = make_router(paper_routed(acc, "paper1", COSTS), poll_ms=200)
    router.step()  # routes the order; no new bar yet
    assert order_row(conn, oid)["state"] == "submitted"
    with psycopg.connect(db_url, autocommit=True) as owner:
        owner.execute("SET ROLE mmats_owner")
        add_bar(owner, iid, T1, "99.5", "100", "98", "99")
    router.step()  # the NOTIFY of the new bar wakes it
    (f,) = fills(conn, acc)
    assert (f["quantity"], f["price"], f["ts"]) == (Decimal(50), Decimal("99.5"), T1)
    assert order_row(conn, oid)["state"] == "filled"
    assert router.counts["fills"] == 1


def test_paper_bars_arriving_together_fill_on_the_first_one(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    iid, acc, oid, _coid = paper_signal(conn)
    router = make_router(paper_routed(acc, "paper1", COSTS), poll_ms=200)
    router.step()
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1m', %s, 101, 101, 101, 101, 1),"
                 " (%s, '1m', %s, 105, 105, 105, 105, 1)", (iid, T1, iid, T2))
    router.step()
    (f,) = fills(conn, acc)
    assert (f["price"], f["ts"]) == (Decimal(101), T1), "a backtest fills at T1's open"
    assert order_row(conn, oid)["state"] == "filled"


def test_a_stop_fired_while_the_router_was_behind_fills_on_the_bar_that_fired_it(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """The router falls behind: a bar through the stop (T2) and a recovered bar (T3) both
    arrive before it reads the stop's message. The stop fills on T2, as a backtest fills
    it, not on the latest bar."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    r = one(conn, "SELECT trading.submit_signal(%s)", Jsonb({
        "account": "paper1", "strategy": "alpha", "symbol": "BTC/USD", "action": "buy",
        "size": 0.5, "stop_loss": 95, "ts": SIGNAL_TS.isoformat()}))
    assert r["status"] == "approved", r
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    add_bar(conn, iid, T1, "100", "101", "99", "100")
    router.settle_bars(iid, "1m", T1)  # long 50 at 100
    t3 = T2 + timedelta(minutes=1)
    add_bar(conn, iid, T2, "99", "99", "94", "96")      # through the stop at 95
    add_bar(conn, iid, t3, "100", "102", "100", "101")  # back above it
    (stop,) = [o for o in dicts(conn, "SELECT order_id, trigger::text, trigger_price,"
                                      " triggered_at FROM trading.orders ORDER BY order_id")
               if o["trigger"] == "stop_loss"]
    assert (stop["trigger_price"], stop["triggered_at"]) == (Decimal(95), t3)

    router.drain()
    router.settle_bars(iid, "1m", t3)

    exit_fill = fills(conn, acc)[-1]
    assert (exit_fill["order_id"], exit_fill["price"], exit_fill["ts"]) == (
        stop["order_id"], Decimal(95), T2)
    assert exit_fill["broker_fill_id"] == f"paper-{stop['order_id']}-{to_us(T2)}"
    assert one(conn, "SELECT exit_time FROM trading.trades WHERE account_id = %s", acc) == T2
    assert positions(conn, acc) == []


def test_an_order_queued_before_two_bars_fills_at_the_first_bars_open(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """The router is down while the signal of bar T0 is queued and bars T1 and T2 are
    stored. The restarted router takes the order into the paper book before it settles
    the pending bars: it fills at T1's open, as a backtest fills it, not at the open of
    the latest bar (T2)."""
    iid, acc, oid, _coid = paper_signal(conn)
    add_bar(conn, iid, T1, "101", "101", "101", "101")
    add_bar(conn, iid, T2, "105", "105", "105", "105")
    router = make_router(paper_routed(acc, "paper1", COSTS), poll_ms=20)
    router.step()
    router.step()
    (f,) = fills(conn, acc)
    assert (f["order_id"], f["price"], f["ts"]) == (oid, Decimal(101), T1), \
        "a backtest fills at T1's open"
    assert f["broker_fill_id"] == f"paper-{oid}-{to_us(T1)}"
    assert order_row(conn, oid)["state"] == "filled"
    assert positions(conn, acc) == [(iid, Decimal(50), Decimal(101))]
    assert queued(conn) == []


def _buy_with_stop(conn: psycopg.Connection) -> tuple[int, int, int]:
    """BTC/USD at 100 (bar T0), paper1 and its approved buy on bar T0 with a stop at 95:
    (instrument, account, order id)."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    r = one(conn, "SELECT trading.submit_signal(%s)", Jsonb({
        "account": "paper1", "strategy": "alpha", "symbol": "BTC/USD", "action": "buy",
        "size": 0.5, "stop_loss": 95, "ts": SIGNAL_TS.isoformat()}))
    assert r["status"] == "approved", r
    return iid, acc, int(r["order_id"])


def _stopped_out_on_t2(conn: psycopg.Connection, acc: int, entry: int) -> None:
    """What a backtest of these bars gives: long 50 at T1's open (100), stopped out at 95
    on T2, the bar through the stop; nothing held on T3 and nothing left in the queue."""
    got = [(f["price"], f["ts"]) for f in fills(conn, acc)]
    assert got == [(Decimal(100), T1), (Decimal(95), T2)], got
    (stop,) = dicts(conn, "SELECT order_id, triggered_at, status::text AS state"
                          " FROM trading.orders WHERE account_id = %s"
                          " AND trigger = 'stop_loss'", acc)
    assert (stop["triggered_at"], stop["state"]) == (T2 + timedelta(minutes=1), "filled")
    assert [f["order_id"] for f in fills(conn, acc)] == [entry, stop["order_id"]]
    assert fills(conn, acc)[-1]["broker_fill_id"] == f"paper-{stop['order_id']}-{to_us(T2)}"
    assert one(conn, "SELECT exit_time FROM trading.trades WHERE account_id = %s", acc) == T2
    assert positions(conn, acc) == []
    assert queued(conn) == []


def test_a_stop_hit_on_a_later_bar_of_a_catch_up_fires_on_that_bar(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """The order is in the paper book; the router falls behind and T1 (which fills the
    entry), T2 (through the stop) and T3 are stored before it settles them. The bars
    trigger judged T2 when it was stored, before the position existed: the router judges
    the new position on the bars after its fill and fills the stop on T2. Before, only
    the bar of the fill was judged, and the stop never fired."""
    iid, acc, entry = _buy_with_stop(conn)
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()  # in the paper book, nothing filled
    t3 = T2 + timedelta(minutes=1)
    add_bar(conn, iid, T1, "100", "101", "99", "100")   # the entry at 100
    add_bar(conn, iid, T2, "99", "99", "94", "96")      # through the stop at 95
    add_bar(conn, iid, t3, "100", "102", "100", "101")  # back above it
    router.settle_bars(iid, "1m", t3)
    _stopped_out_on_t2(conn, acc, entry)
    assert one(conn, "SELECT at FROM runtime.cursors WHERE name = %s",
               f"paper:{iid}:1m") == t3

    # the same bars again, by this router and by a restarted one: nothing changes
    before = ledger(conn)
    router.settle_bars(iid, "1m", t3)
    make_router(paper_routed(acc, "paper1", COSTS)).settle_bars(iid, "1m", t3)
    assert ledger(conn) == before


def test_an_order_queued_while_behind_is_stopped_out_on_a_later_bar_of_the_catch_up(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """Both at once: the router is down while the order is queued and T1, T2 and T3 are
    stored. Taking the order into the paper book settles it on T1 (the entry) and judges
    its stop on T2 and T3, in that one transaction: the stop fills on T2."""
    iid, acc, entry = _buy_with_stop(conn)
    add_bar(conn, iid, T1, "100", "101", "99", "100")
    add_bar(conn, iid, T2, "99", "99", "94", "96")
    add_bar(conn, iid, T2 + timedelta(minutes=1), "100", "102", "100", "101")
    router = make_router(paper_routed(acc, "paper1", COSTS), poll_ms=20)
    router.step()
    router.step()
    _stopped_out_on_t2(conn, acc, entry)


def _second_exit(conn: psycopg.Connection, like: int, coid: str) -> int:
    """A second reduce-only order just like order `like`, queued: the state the race
    between a strategy's close and a bar's stop used to leave (fixed in 0004_03); built
    directly, as only the owner can."""
    oid = one(conn, """
        INSERT INTO trading.orders (account_id, instrument_id, strategy_id, client_order_id,
            side, order_type, quantity, reduce_only, position_leg, trigger, trigger_price,
            reference_price)
        SELECT account_id, instrument_id, strategy_id, %s, side, 'market', quantity, true,
               position_leg, 'stop_loss', reference_price, reference_price
        FROM trading.orders WHERE order_id = %s RETURNING order_id""", coid, like)
    conn.execute("SELECT pgmq.send('orders', jsonb_build_object('order_id', %s::bigint, "
                 "'account_id', account_id, 'environment', 'paper', 'client_order_id', %s::text))"
                 " FROM trading.orders WHERE order_id = %s", (oid, coid, oid))
    return int(oid)


def test_a_second_exit_for_a_closed_position_is_cancelled_and_the_router_goes_on(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    iid, acc, oid, _coid = paper_signal(conn)
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    add_bar(conn, iid, T1, "101", "103", "99", "102")
    router.settle_bars(iid, "1m", T1)  # long 50
    close = one(conn, "SELECT trading.submit_signal(%s)", Jsonb({
        "account": "paper1", "strategy": "alpha", "symbol": "BTC/USD", "action": "close",
        "ts": (T2 - timedelta(microseconds=1)).isoformat()}))
    assert close["status"] == "approved"
    extra = _second_exit(conn, close["order_id"], "extra-exit-1")
    assert router.drain() == 2  # the stop fills on its bar (T1) as it enters the book
    assert order_row(conn, extra)["state"] == "filled"
    add_bar(conn, iid, T2, "104", "104", "104", "104")
    router.settle_bars(iid, "1m", T2)  # the close's turn: nothing is left to close

    o = order_row(conn, close["order_id"])
    assert (o["state"], o["filled_quantity"]) == ("cancelled", 0)
    assert o["reason"].startswith("REDUCE_ONLY_NOTHING_TO_CLOSE: ")
    assert positions(conn, acc) == []
    assert [f["order_id"] for f in fills(conn, acc)] == [oid, extra]
    assert errors_of(conn, "PAPER_FILL_REFUSED") == []  # the paper broker saw it coming


def test_a_paper_fill_the_ledger_refuses_cancels_its_order_and_is_reported(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """The safety net behind the paper broker: a fill it computes that the ledger will not
    take (here: more than the order has left) cancels that order with the ledger's reason
    and reports it, inside the caller's transaction, which goes on."""
    from workers.backtest.simulator import SimFill
    from workers.runtime.paper import PaperFill

    _iid, acc, oid, coid = paper_signal(conn)
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    too_much = PaperFill(oid, coid, SimFill(oid, Decimal(60), Decimal(101), Decimal(0),
                                            "taker", to_us(T1)), True)
    with conn.transaction():
        applied = router._apply_paper_fill(router.accounts[acc], too_much)
        conn.execute("SELECT 1")  # the transaction is still usable
    assert applied is False
    o = order_row(conn, oid)
    assert o["state"] == "cancelled"
    assert o["reason"].startswith("PAPER_FILL_REFUSED: fill quantity 60 exceeds the "
                                  "50.00000 remaining on order")
    (reported,) = errors_of(conn, "PAPER_FILL_REFUSED")
    assert f"order {coid} cancelled" in reported
    assert fills(conn, acc) == []


class CancelledWhileSettling(PaperBroker):
    """A paper broker during whose settlement of a bar a trader cancels an order: the
    trader's `trading.request_cancel` commits (on another connection) after the broker
    read the book, before the router applies the bar's fills."""

    def __init__(self, trader: psycopg.Connection, *args: Any) -> None:
        super().__init__(*args)
        self.trader = trader
        self.cancel: str | None = None  # the client order id to cancel on the next read

    def open_orders(self, conn: psycopg.Connection, inst: Any) -> list[tuple[Any, ...]]:
        rows = super().open_orders(conn, inst)
        if self.cancel is not None:
            answer = one(self.trader, "SELECT trading.request_cancel(%s)", self.cancel)
            assert answer["status"] == "cancelled", answer
            self.cancel = None
        return rows


def _two_buy_limits(conn: psycopg.Connection) -> tuple[int, int, tuple[int, str], tuple[int, str]]:
    """BTC/USD at 100 (bar T0), an operator paper account and two manual buy limits of 50
    at 90 on it, made now (a replayed session: T1 is their first bar); then a fee of 4000
    booked: the 6000 left of its 10000 buys one (4509 with commission) and a part of the
    other. (instrument, account, A, B)."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    made = []
    for _ in range(2):
        r = one(conn, "SELECT trading.place_manual_order(%s)", Jsonb(
            {"account": "paper1", "symbol": "BTC/USD", "side": "buy", "quantity": "50",
             "type": "limit", "limit_price": "90"}))
        assert r["status"] == "approved", r
        made.append((int(r["order_id"]), order_row(conn, r["order_id"])["client_order_id"]))
    one(conn, "SELECT trading.book_cash(%s)", Jsonb(
        {"account": "paper1", "kind": "fee", "amount": "-4000", "broker_ref": "fee-1"}))
    assert cash(conn, acc) == 6000
    return iid, acc, made[0], made[1]


def test_a_paper_order_cancelled_while_its_bar_settles_leaves_the_others_to_fill(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """Found by review: A's cancel lands between the paper broker's read of the book and
    the fills. Before, A's refused fill ("order ... is cancelled: it takes no fills") was
    reported as PAPER_FILL_REFUSED and the rest of the bar was dropped: B, whose limit
    the bar reached, did not fill on it. Now A is skipped quietly and the bar is judged
    again without A: B fills in full (judged with A's fill in it, cash bought 16 of 50)."""
    iid, acc, (a, a_coid), (b, _b_coid) = _two_buy_limits(conn)
    broker = CancelledWhileSettling(conn, acc, "paper1", COSTS)
    router = make_router(RoutedAccount(acc, AccountConfig(
        name="paper1", environment="paper", mode="operator", costs=COSTS), broker, "paper"))
    router.drain()
    assert [order_row(conn, o)["state"] for o in (a, b)] == ["submitted", "submitted"]
    add_bar(conn, iid, T1, "95", "96", "88", "92")  # reaches both limits
    broker.cancel = a_coid
    router.settle_bars(iid, "1m", T1)

    assert broker.cancel is None  # (the cancel did land in between)
    o = order_row(conn, a)
    assert (o["state"], o["filled_quantity"], o["reason"]) == ("cancelled", 0, "cancel requested")
    (f,) = fills(conn, acc)
    assert (f["order_id"], f["quantity"], f["price"], f["ts"]) == (b, Decimal(50), Decimal(90), T1)
    assert order_row(conn, b)["state"] == "filled"
    assert cash(conn, acc) == Decimal(1491)  # 6000 - 4500 - 9
    assert runtime_errors(conn) == []


def test_a_paper_fill_the_ledger_refuses_leaves_the_others_of_its_bar_to_fill(
        conn: psycopg.Connection, make_router: Callable[..., Router],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fill the ledger refuses (here: A's, made more than A has left) still cancels A
    and is reported; the bar is judged again without it, and B fills on it in full
    (before, the rest of the bar was dropped: B did not fill on it)."""
    from workers.runtime.paper import PaperFill

    iid, acc, (a, _a_coid), (b, _b_coid) = _two_buy_limits(conn)
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    add_bar(conn, iid, T1, "95", "96", "88", "92")
    settle = PaperBroker.settle

    def too_much_for_a(self: PaperBroker, *args: Any) -> list[PaperFill]:
        out = settle(self, *args)
        for outcome in out:
            if outcome.order_id == a and outcome.fill is not None:
                outcome.fill = replace(outcome.fill, quantity=Decimal(51))
        return out

    monkeypatch.setattr(PaperBroker, "settle", too_much_for_a)
    router.settle_bars(iid, "1m", T1)

    o = order_row(conn, a)
    assert (o["state"], o["filled_quantity"]) == ("cancelled", 0)
    assert o["reason"].startswith("PAPER_FILL_REFUSED: fill quantity 51 exceeds the ")
    (reported,) = errors_of(conn, "PAPER_FILL_REFUSED")
    assert f"order {o['client_order_id']} cancelled" in reported
    (f,) = fills(conn, acc)
    assert (f["order_id"], f["quantity"], f["price"], f["ts"]) == (b, Decimal(50), Decimal(90), T1)
    assert order_row(conn, b)["state"] == "filled"


def test_a_manual_limit_in_a_replayed_session_fills_on_its_first_next_bar(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """A replayed session: the bars are historic, the manual order is made now (its
    created_at is wall-clock, long after T0). The paper broker takes T0, the latest bar
    when the order entered the paper book, as its time, so T1 is its first eligible bar;
    the router passed T1 over (it started after created_at) and the GTC limit at 99 that
    T1 reached filled on T2 at 97."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    r = one(conn, "SELECT trading.place_manual_order(%s)", Jsonb(
        {"account": "paper1", "symbol": "BTC/USD", "side": "buy", "quantity": "1",
         "type": "limit", "limit_price": "99"}))
    assert r["status"] == "approved", r
    oid = int(r["order_id"])
    assert order_row(conn, oid)["created_at"] > T2 + timedelta(days=1)
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    assert order_row(conn, oid)["state"] == "submitted"
    for ts, o, h, low, c in ((T1, "100", "101", "98", "100"), (T2, "97", "97", "97", "97")):
        add_bar(conn, iid, ts, o, h, low, c)
        router.settle_bars(iid, "1m", ts)
    (f,) = fills(conn, acc)
    assert (f["order_id"], f["price"], f["ts"]) == (oid, Decimal(99), T1), \
        "its first eligible bar (T1) reached 99"
    assert order_row(conn, oid)["state"] == "filled"


# ---------------------------------------------------------------------------- Alpaca
@pytest.fixture
def aapl(conn: psycopg.Connection) -> int:
    return instrument(conn, "AAPL", "stock", "187")


def test_an_order_placed_while_the_ledger_cancelled_it_is_cancelled_at_the_venue(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """Router A's POST is on its way when the trader cancels and router B, whose lookup by
    client id finds nothing yet, cancels the order in the ledger. A's POST then succeeds.
    Before: acknowledge_order's answer ({"status": "cancelled"}) was not read, the order
    stayed live at Alpaca, unwatched, and no DELETE was ever sent."""
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    events: list[str] = []
    a = make_router(alpaca_routed(acc, "alp"))
    a.on_event = lambda what, _fields: events.append(what)
    b = make_router(alpaca_routed(acc, "alp"))

    def post(_request: Any) -> tuple[int, dict[str, str], str]:
        r = conn.execute("SELECT trading.request_cancel(%s)", (coid,)).fetchone()[0]
        assert r["status"] == "cancel_requested", r
        b.drain()
        assert order_row(conn, oid)["state"] == "cancelled"
        return (200, {}, json.dumps(alpaca_order(coid, status="accepted")))
    http.add_callback(responses.POST, f"{ALPACA}/orders", callback=post)
    http.delete(f"{ALPACA}/orders/{OID}", status=204)
    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(coid, status="canceled"))
    a.drain()
    assert len(calls(http, "POST")) == 1 and len(calls(http, "DELETE")) == 1
    assert "order.cancelled_at_venue" in events and "order.acknowledged" not in events
    assert order_row(conn, oid)["state"] == "cancelled"
    assert queued(conn) == []


def test_alpaca_order_is_placed_then_filled_on_a_later_status_poll(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", json=alpaca_order(coid, status="accepted"))
    router = make_router(alpaca_routed(acc, "alp"))

    assert router.drain() == 1
    (post,) = calls(http, "POST")
    assert sent(post) == {"symbol": "AAPL", "qty": "10", "side": "buy", "type": "market",
                          "time_in_force": "gtc", "client_order_id": coid}
    o = order_row(conn, oid)
    assert (o["state"], o["broker_order_id"], o["filled_quantity"]) == (
        "submitted", OID, Decimal(0))
    (msg,) = queued(conn)  # not archived: the order is still working at the venue
    assert msg["read_ct"] == 1 and 25 < msg["wait"] <= 30  # the next status poll
    assert archived(conn) == [] and fills(conn, acc) == []

    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(
        coid, status="filled", filled_qty="10", filled_avg_price="187.15",
        filled_at=now_text()))
    http.get(ACTIVITIES, json=[
        activity(1, "3", "3", "187.10", order_id=OTHER_OID),  # another order's execution
        activity(2, "10", "10", "187.15")])
    reveal(conn)
    assert router.drain() == 1

    assert len(calls(http, "POST")) == 1
    (f,) = fills(conn, acc)
    assert (f["order_id"], f["broker_fill_id"]) == (oid, activity(2, "10", "10", "1")["id"])
    assert (f["quantity"], f["price"], f["commission"]) == (Decimal(10), Decimal("187.15"),
                                                            Decimal(0))
    o = order_row(conn, oid)
    assert (o["state"], o["filled_quantity"], o["average_fill_price"]) == (
        "filled", Decimal(10), Decimal("187.15"))
    assert positions(conn, acc) == [(aapl, Decimal(10), Decimal("187.15"))]
    assert cash(conn, acc) == Decimal("8128.50")  # 10000 - 10 * 187.15
    assert queued(conn) == [] and [m["msg_id"] for m in archived(conn)] == [msg["msg_id"]]


def test_a_broker_fill_the_ledger_refuses_is_reported_and_its_message_waits(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """The venue reports an execution of 12 on an order of 10: the ledger refuses it; the
    router says so (LEDGER_REFUSED_FILL), keeps the message for a later look, and goes on
    with the next message instead of dying on this one."""
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    other, other_coid = manual(conn, "alp", "AAPL", "5")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", json=alpaca_order(coid, status="accepted"))
    router = make_router(alpaca_routed(acc, "alp"))
    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(
        coid, status="filled", filled_qty="12", filled_avg_price="187.15",
        filled_at=now_text()))
    http.get(ACTIVITIES, json=[activity(2, "12", "12", "187.15")])
    http.post(f"{ALPACA}/orders", json=alpaca_order(other_coid, status="accepted",
                                                   id=OTHER_OID, qty="5"))
    assert router.drain() == 2  # both placed
    reveal(conn)
    router.drain()  # the first one's status: the refused fill; the second still works

    (reported,) = errors_of(conn, "LEDGER_REFUSED_FILL")
    assert f"order {coid} (AAPL): the broker reports what the ledger refuses: " in reported
    assert "exceeds the 10" in reported
    assert fills(conn, acc) == []
    assert order_row(conn, oid)["state"] == "submitted"
    waiting = {m["message"]["order_id"]: m["wait"] for m in queued(conn)}
    assert waiting[oid] > 25  # looked at again later, not at once
    assert order_row(conn, other)["state"] == "submitted"


def test_a_network_error_on_place_keeps_the_order_in_flight_and_is_never_placed_twice(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    # the order reached Alpaca, but the answer was lost
    http.post(f"{ALPACA}/orders", body=requests.ConnectionError("connection reset by peer"))
    router = make_router(alpaca_routed(acc, "alp"))

    router.drain()
    posts = len(calls(http, "POST"))
    (msg,) = queued(conn)
    assert msg["read_ct"] == posts >= 1  # every attempt is one read of the message
    assert msg["wait"] > 0  # delayed, with backoff
    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"], o["broker_order_id"]) == ("in_flight", None, None)
    assert one(conn, "SELECT consecutive_rejections FROM trading.accounts"
                     " WHERE account_id = %s", acc) == 0
    assert archived(conn) == [] and router.counts["retries"] == posts

    # redelivered: the lookup by client id finds the order, which has filled meanwhile
    http.replace(responses.GET, BY_CLIENT_ID, json=alpaca_order(
        coid, status="filled", filled_qty="10", filled_avg_price="187.2",
        filled_at=now_text()))
    http.get(ACTIVITIES, json=[activity(1, "10", "10", "187.2")])
    reveal(conn)
    assert router.drain() == 1

    assert len(calls(http, "POST")) == posts, "the order was sent again"
    lookups = calls(http, "GET", "/orders:by_client_order_id")
    assert len(lookups) >= 1
    assert all(c.request.params == {"client_order_id": coid} for c in lookups)
    (f,) = fills(conn, acc)
    assert (f["quantity"], f["price"]) == (Decimal(10), Decimal("187.2"))
    o = order_row(conn, oid)
    assert (o["state"], o["broker_order_id"]) == ("filled", OID)
    assert positions(conn, acc) == [(aapl, Decimal(10), Decimal("187.2"))]
    assert queued(conn) == [] and len(archived(conn)) == 1


def in_flight_at_alpaca(conn: psycopg.Connection, http: responses.RequestsMock,
                        make_router: Callable[..., Router],
                        **router_args: Any) -> tuple[int, int, str, Router]:
    """An operator account routed to Alpaca with a market buy of 10 AAPL whose POST was
    lost on the network: the order in flight, its fate unknown (it may have reached
    Alpaca). (account, order, client order id, router)."""
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.post(f"{ALPACA}/orders", body=requests.ConnectionError("connection reset by peer"))
    router = make_router(alpaca_routed(acc, "alp"), **router_args)
    router.drain()
    assert order_row(conn, oid)["state"] == "in_flight"
    return acc, oid, coid, router


def test_an_auth_failure_on_the_lookup_of_an_order_in_flight_does_not_reject_it(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    _acc, oid, _coid, router = in_flight_at_alpaca(conn, http, make_router)
    # the key was rotated meanwhile: the venue answers the lookup with 401
    http.get(BY_CLIENT_ID, status=401,
             json={"code": 40110000, "message": "request is not authorized"})
    reveal(conn)
    router.drain()
    assert len(errors_of(conn, "BROKER_AUTH")) >= 1  # the alarm is raised either way
    assert order_row(conn, oid)["state"] == "in_flight", "its fate at the venue is unknown"


def test_redelivery_after_a_crash_before_archiving_changes_nothing(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router], crash: Crash) -> None:
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", json=alpaca_order(
        coid, status="filled", filled_qty="10", filled_avg_price="187.3",
        filled_at=now_text()))
    http.get(ACTIVITIES, json=[activity(1, "10", "10", "187.3")])
    crash.at("archive_order_message(bigint)")
    first = make_router(alpaca_routed(acc, "alp"))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        first.drain()  # dies after acknowledge and the fill, before the archive
    first.close()
    assert order_row(conn, oid)["state"] == "filled" and len(fills(conn, acc)) == 1
    (msg,) = queued(conn)
    assert msg["read_ct"] == 1
    crash.restore()
    before_calls = len(http.calls)
    before = {k: v for k, v in ledger(conn).items() if not k.startswith("pgmq")}

    reveal(conn)  # the visibility timeout ran out
    restarted = make_router(alpaca_routed(acc, "alp"))
    assert restarted.drain() == 1

    assert len(http.calls) == before_calls  # a filled order needs no broker call
    after = ledger(conn)
    assert {k: v for k, v in after.items() if k not in ("pgmq.q_orders", "pgmq.a_orders",
                                                        "audit")} == {
        k: v for k, v in before.items() if k != "audit"}
    assert len(fills(conn, acc)) == 1
    assert positions(conn, acc) == [(aapl, Decimal(10), Decimal("187.3"))]
    assert cash(conn, acc) == Decimal("8127")  # 10000 - 1873
    assert queued(conn) == [] and [m["read_ct"] for m in archived(conn)] == [2]


def test_redelivery_after_a_crash_on_a_partial_fill_applies_only_the_new_fill(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router], crash: Crash) -> None:
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", json=alpaca_order(
        coid, status="partially_filled", filled_qty="4", filled_avg_price="187"))
    http.get(ACTIVITIES, json=[activity(1, "4", "4", "187", leaves_qty="6")])
    crash.at("delay_order_message(bigint, numeric)")
    first = make_router(alpaca_routed(acc, "alp"))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        first.drain()  # dies after acknowledge and the first fill, before the delay
    first.close()
    o = order_row(conn, oid)
    assert (o["state"], o["filled_quantity"], o["broker_order_id"]) == (
        "partially_filled", Decimal(4), OID)
    crash.restore()

    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(
        coid, status="filled", filled_qty="10", filled_avg_price="187.6",
        filled_at=now_text()))
    http.replace(responses.GET, ACTIVITIES, json=[
        activity(1, "4", "4", "187", leaves_qty="6"), activity(2, "6", "10", "188")])
    reveal(conn)
    assert make_router(alpaca_routed(acc, "alp")).drain() == 1

    assert len(calls(http, "POST")) == 1
    assert [(f["quantity"], f["price"]) for f in fills(conn, acc)] == [
        (Decimal(4), Decimal(187)), (Decimal(6), Decimal(188))]
    o = order_row(conn, oid)
    assert (o["state"], o["filled_quantity"], o["average_fill_price"]) == (
        "filled", Decimal(10), Decimal("187.6"))
    assert positions(conn, acc) == [(aapl, Decimal(10), Decimal("187.6"))]
    assert cash(conn, acc) == Decimal("8124")  # 10000 - 4 * 187 - 6 * 188
    assert queued(conn) == [] and len(archived(conn)) == 1


def test_a_rate_limit_delays_the_message_at_least_retry_after(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    acc = paper_account(conn, "alp")
    oid, _coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", status=429, headers={"Retry-After": "7"},
              json={"code": 42910000, "message": "rate limit exceeded"})
    router = make_router(alpaca_routed(acc, "alp"))

    assert router.drain() == 1
    (msg,) = queued(conn)
    # backoff for a first attempt is at most 0.5 s: Retry-After's 7 s win
    assert msg["read_ct"] == 1 and 6.0 < msg["wait"] <= 7.0
    assert len(calls(http, "POST")) == 1
    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"]) == ("in_flight", None)
    assert archived(conn) == [] and router.counts == {"orders": 0, "fills": 0, "rejected": 0,
                                                      "retries": 1, "cancelled": 0}


def test_a_retry_after_beyond_a_day_does_not_kill_the_router(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    acc = paper_account(conn, "alp")
    oid, _coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", status=429, headers={"Retry-After": "172800"},
              json={"code": 42910000, "message": "rate limit exceeded"})
    router = make_router(alpaca_routed(acc, "alp"))
    assert router.drain() == 1  # trading.delay_order_message takes at most 86400 s
    (msg,) = queued(conn)
    assert 86000 < msg["wait"] <= 86400
    assert order_row(conn, oid)["state"] == "in_flight"


def test_a_permanent_refusal_rejects_and_a_streak_downgrades_the_account(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    acc = paper_account(conn, "alp")
    conn.execute("UPDATE trading.accounts SET max_consecutive_rejections = 3"
                 " WHERE account_id = %s", (acc,))
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", status=403,
              json={"code": 40310000, "message": "insufficient buying power"})
    router = make_router(alpaca_routed(acc, "alp"))
    first = [manual(conn, "alp", "AAPL", "10") for _ in range(2)]

    assert router.drain() == 2
    for oid, coid in first:
        o = order_row(conn, oid)
        assert (o["state"], o["reason_code"]) == ("rejected", "INSUFFICIENT_FUNDS")
        assert o["reason"] == (f"alpaca: market order {coid} buy 10 AAPL: insufficient buying"
                               " power (HTTP 403, code 40310000)")
    assert one(conn, "SELECT mode::text FROM trading.accounts WHERE account_id = %s",
               acc) == "operator"
    assert one(conn, "SELECT count(*) FROM risk.events WHERE account_id = %s", acc) == 0

    third, _ = manual(conn, "alp", "AAPL", "10")
    assert router.drain() == 1
    assert order_row(conn, third)["state"] == "rejected"
    assert len(calls(http, "POST")) == 3  # each refusal was final: no order sent twice
    assert dicts(conn, "SELECT mode::text, consecutive_rejections FROM trading.accounts"
                       " WHERE account_id = %s", acc) == [
        {"mode": "advisory", "consecutive_rejections": 3}]
    assert one(conn, "SELECT mode::text FROM risk.breaker_state WHERE account_id = %s",
               acc) == "SOFT"
    (event,) = dicts(conn, "SELECT severity::text, event_type, message FROM risk.events"
                           " WHERE account_id = %s", acc)
    assert event["event_type"] == "REJECTION_STREAK" and "INSUFFICIENT_FUNDS" in event["message"]
    assert len(errors_of(conn, "ACCOUNT_DOWNGRADED")) == 1
    assert router.counts["rejected"] == 3
    assert queued(conn) == [] and len(archived(conn)) == 3
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="advisory mode"):
        manual(conn, "alp", "AAPL", "1")


@pytest.mark.parametrize(("environment", "endpoint", "keys", "says"), [
    ("paper", "live", "live",
     "account acct is a paper account: its orders may not go to the live endpoint of alpaca"),
    ("live", "live", "testnet", "account acct: testnet keys may not trade on a live endpoint"),
    ("live", "paper", "paper",
     "account acct is live but its broker points at the paper endpoint"),
])
def test_an_order_for_the_wrong_environment_is_rejected_before_any_request(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router], environment: str, endpoint: str, keys: str,
        says: str) -> None:
    acc = live_account(conn, "acct") if environment == "live" else paper_account(conn, "acct")
    oid, _coid = manual(conn, "acct", "AAPL", "10")
    router = make_router(alpaca_routed(acc, "acct", environment=environment, endpoint=endpoint,
                                       credential_endpoint=keys))

    assert router.drain() == 1
    assert len(http.calls) == 0
    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"], o["reason"]) == ("rejected", "ENVIRONMENT_MISMATCH",
                                                           says)
    assert o["submitted_at"] is None  # never marked in flight
    assert one(conn, "SELECT count(*) FROM audit.events WHERE entity_id = %s"
                     " AND event_type = 'order.in_flight'", str(oid)) == 0
    (reported,) = errors_of(conn, "ENVIRONMENT_MISMATCH")
    assert says in reported
    assert queued(conn) == [] and len(archived(conn)) == 1


# ---------------------------------------------------------------------------- OANDA
def test_oanda_market_order_filled_in_the_create_response(
        conn: psycopg.Connection, http: responses.RequestsMock,
        make_router: Callable[..., Router]) -> None:
    iid = instrument(conn, "EUR/USD", "forex", "1.0846")
    acc = paper_account(conn, "fx")
    oid, coid = manual(conn, "fx", "EUR/USD", "1500")
    created = json.loads((OANDA_FIXTURES / "order_create_market_filled.json").read_text())
    created["orderCreateTransaction"].update(units="1500", clientExtensions={"id": coid})
    created["orderFillTransaction"].update(units="1500", clientOrderID=coid,
                                           tradeOpened={"tradeID": "6373", "units": "1500"})
    http.get(f"{OANDA}/orders/@{coid}", status=404, json=json.loads(
        (OANDA_FIXTURES / "order_not_found.json").read_text()))
    http.get(f"{OANDA}/summary", json=json.loads(
        (OANDA_FIXTURES / "account_summary.json").read_text()))  # home currency EUR
    http.post(f"{OANDA}/orders", status=201, json=created)
    config = AccountConfig(name="fx", environment="paper", mode="operator", broker="oanda",
                           endpoint="paper", credential="main")
    router = make_router(RoutedAccount(acc, config, OandaBroker(OANDA_CREDENTIALS, "practice"),
                                       "paper"))

    assert router.drain() == 1
    (post,) = calls(http, "POST")
    assert sent(post) == {"order": {
        "type": "MARKET", "instrument": "EUR_USD", "units": "1500", "timeInForce": "FOK",
        "positionFill": "DEFAULT", "clientExtensions": {"id": coid}}}
    (f,) = fills(conn, acc)
    assert (f["broker_fill_id"], f["quantity"]) == ("6373", Decimal(1500))
    assert f["price"] == Decimal("1.08463")
    assert str(f["price"]) == "1.08463"  # exactly the venue's text, no float on the way
    # 0.1500 EUR of commission is 0.1500 * 1.08463 USD in this USD account
    assert (f["commission"], f["commission_currency"]) == (Decimal("0.1626945"), "USD")
    assert f["ts"] == datetime(2024, 3, 13, 14, 2, 11, 254417, tzinfo=UTC)
    o = order_row(conn, oid)
    assert (o["state"], o["broker_order_id"], o["average_fill_price"]) == (
        "filled", "6372", Decimal("1.08463"))
    assert positions(conn, acc) == [(iid, Decimal(1500), Decimal("1.08463"))]
    assert cash(conn, acc) == Decimal("8372.8923055")  # 10000 - 1626.945 - 0.1626945
    assert queued(conn) == [] and len(archived(conn)) == 1


# ---------------------------------------------------------------------------- backtests
def test_backtest_orders_in_the_queue_are_never_read(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    instrument(conn, "BTC/USD", "crypto", "100")
    bt = paper_account(conn, "bt", environment="backtest")
    paper = paper_account(conn, "pp")
    bt_order, _ = manual(conn, "bt", "BTC/USD", "1")
    paper_order, _ = manual(conn, "pp", "BTC/USD", "1")
    router = make_router(paper_routed(bt, "bt", COSTS), paper_routed(paper, "pp", COSTS))

    assert router.drain() == 1
    (left,) = queued(conn)
    assert left["message"]["order_id"] == bt_order and left["message"]["environment"] == (
        "backtest")
    assert left["read_ct"] == 0
    assert order_row(conn, bt_order)["state"] == "created"
    assert [m["message"]["order_id"] for m in archived(conn)] == [paper_order]
    # not for any account, whoever asks
    assert one(conn, "SELECT count(*) FROM trading.read_orders(1, 1000, NULL)") == 0
    assert one(conn, "SELECT count(*) FROM trading.read_orders(1, 1000, %s)", [bt]) == 0
    assert queued(conn)[0]["read_ct"] == 0


# ---------------------------------------------------------------------------- broker reports
def test_a_fill_not_yet_in_the_activity_history_keeps_the_message(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", json=alpaca_order(
        coid, status="filled", filled_qty="10", filled_avg_price="187.3",
        filled_at=now_text()))
    http.get(ACTIVITIES, json=[])  # Alpaca's activities lag its order status
    router = make_router(alpaca_routed(acc, "alp"))
    router.drain()
    assert order_row(conn, oid)["state"] == "submitted" and fills(conn, acc) == []
    assert len(queued(conn)) == 1, "the only message that could settle the order is gone"


# ---------------------------------------------------------------------------- broker errors
UNAUTHORIZED = {"code": 40110000, "message": "request is not authorized"}
MALFORMED = {"code": 40010001, "message": "request is malformed"}


def runtime_errors(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in conn.execute("SELECT kind, message FROM runtime.errors"
                                               " ORDER BY error_id").fetchall()]


def one_sent_one_queued(conn: psycopg.Connection, http: responses.RequestsMock,
                        make_router: Callable[..., Router]) -> tuple[Router, int, int, str, int]:
    """Two Alpaca accounts: alp's order sent (accepted), then alp2's queued, its place
    answered. Returns the router, alp's account id, its order id and client id, and
    alp2's order id."""
    acc = paper_account(conn, "alp")
    acc2 = paper_account(conn, "alp2")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", json=alpaca_order(coid, status="accepted"))
    router = make_router(alpaca_routed(acc, "alp"), alpaca_routed(acc2, "alp2"))
    assert router.drain() == 1
    oid2, coid2 = manual(conn, "alp2", "AAPL", "5")
    http.replace(responses.POST, f"{ALPACA}/orders",
                 json=alpaca_order(coid2, status="accepted", id=OTHER_OID, qty="5"))
    return router, acc, oid, coid, oid2


@pytest.mark.parametrize(("answer", "alarm"), [
    ({"body": requests.ConnectionError("read timed out")}, None),
    ({"status": 401, "json": UNAUTHORIZED}, "BROKER_AUTH"),
    ({"status": 403, "json": {"code": 40310000, "message": "forbidden"}}, "BROKER_AUTH"),
])
def test_a_broker_error_on_the_fill_history_waits_and_the_other_accounts_go_on(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router], answer: dict[str, Any], alarm: str | None) -> None:
    """The venue reports the order filled, and the fill history (GET activities, called
    while settling) fails: the message waits with backoff, the order is neither rejected
    nor finished without its fill, and the next account's order is sent in the same
    drain. Once the history answers, the order settles."""
    router, acc, oid, coid, oid2 = one_sent_one_queued(conn, http, make_router)
    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(
        coid, status="filled", filled_qty="10", filled_avg_price="187.15",
        filled_at=now_text()))
    http.get(ACTIVITIES, **answer)
    reveal(conn)

    assert router.drain() == 2  # nothing escaped: both messages handled
    assert len(calls(http, "GET", "/activities/FILL")) == 1
    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"], o["filled_quantity"]) == ("submitted", None, 0)
    assert fills(conn, acc) == []
    waiting = {m["message"]["order_id"]: m for m in queued(conn)}
    assert waiting[oid]["read_ct"] == 2 and waiting[oid]["wait"] > 0
    assert order_row(conn, oid2)["state"] == "submitted"  # the other account went on
    assert len(calls(http, "POST")) == 2
    assert archived(conn) == []
    assert one(conn, "SELECT consecutive_rejections FROM trading.accounts"
                     " WHERE account_id = %s", acc) == 0
    if alarm is None:
        assert router.counts["retries"] == 1 and runtime_errors(conn) == []
    else:
        (kind, message), = runtime_errors(conn)
        assert kind == alarm and f"order {coid} (AAPL) is submitted" in message
        assert router.counts["retries"] == 0

    http.replace(responses.GET, ACTIVITIES, json=[activity(1, "10", "10", "187.15")])
    reveal(conn)
    router.drain()
    o = order_row(conn, oid)
    assert (o["state"], o["filled_quantity"]) == ("filled", Decimal(10))
    assert [m["message"]["order_id"] for m in archived(conn)] == [oid]


@pytest.mark.parametrize("partial", [False, True], ids=["submitted", "partially_filled"])
@pytest.mark.parametrize(("status", "body", "alarm"), [
    (401, UNAUTHORIZED, "BROKER_AUTH"),  # the key was rotated
    (400, MALFORMED, "INVALID_ORDER"),
    (404, NOT_FOUND, "ORDER_NOT_FOUND"),
])
def test_a_refused_status_poll_never_rejects_a_working_order(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router], partial: bool, status: int,
        body: dict[str, Any], alarm: str) -> None:
    """Only the venue's refusal of the order itself rejects it. A working order's status
    poll answered 401, 400 or 404 says nothing of its fate: alarm (once, however many
    polls fail in a row), wait with backoff, and go on with the other accounts; on a
    partially filled order (which the ledger may not reject) the router used to die on
    every start."""
    acc = paper_account(conn, "alp")
    acc2 = paper_account(conn, "alp2")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    if partial:
        http.post(f"{ALPACA}/orders", json=alpaca_order(
            coid, status="partially_filled", filled_qty="4", filled_avg_price="187"))
        http.get(ACTIVITIES, json=[activity(1, "4", "4", "187", leaves_qty="6")])
    else:
        http.post(f"{ALPACA}/orders", json=alpaca_order(coid, status="accepted"))
    router = make_router(alpaca_routed(acc, "alp"), alpaca_routed(acc2, "alp2"))
    router.drain()
    state = "partially_filled" if partial else "submitted"
    assert order_row(conn, oid)["state"] == state
    http.get(f"{ALPACA}/orders/{OID}", status=status, json=body)
    oid2, coid2 = manual(conn, "alp2", "AAPL", "5")  # another account's order, behind it
    http.replace(responses.POST, f"{ALPACA}/orders",
                 json=alpaca_order(coid2, status="accepted", id=OTHER_OID, qty="5"))

    for attempt in (2, 3):
        reveal(conn)
        assert router.drain() >= 1
        o = order_row(conn, oid)
        assert (o["state"], o["reason_code"]) == (state, None)
        (msg,) = [m for m in queued(conn) if m["message"]["order_id"] == oid]
        assert msg["read_ct"] == attempt and msg["wait"] > 0
    assert len(calls(http, "GET", f"/orders/{OID}")) == 2
    assert order_row(conn, oid2)["state"] == "submitted"
    (kind, message), = runtime_errors(conn)  # one alarm for the episode
    assert kind == alarm and f"order {coid} (AAPL) is {state}" in message
    assert one(conn, "SELECT consecutive_rejections FROM trading.accounts"
                     " WHERE account_id = %s", acc) == 0
    assert router.counts["rejected"] == 0

    # the venue answers again: the order settles as it would have
    http.replace(responses.GET, f"{ALPACA}/orders/{OID}", json=alpaca_order(
        coid, status="filled", filled_qty="10", filled_avg_price="187.6",
        filled_at=now_text()))
    http.upsert(responses.GET, ACTIVITIES, json=[
        activity(1, "4", "4", "187", leaves_qty="6"), activity(2, "6", "10", "188")])
    reveal(conn)
    router.drain()
    o = order_row(conn, oid)
    assert (o["state"], o["filled_quantity"]) == ("filled", Decimal(10))
    assert oid in [m["message"]["order_id"] for m in archived(conn)]


@pytest.mark.parametrize(("status", "body", "alarm"), [
    (400, MALFORMED, "INVALID_ORDER"),
    (403, {"code": 40310000, "message": "forbidden"}, "BROKER_AUTH"),
])
def test_a_refused_lookup_of_an_order_in_flight_alarms_and_waits(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router], status: int, body: dict[str, Any],
        alarm: str) -> None:
    _acc, oid, coid, router = in_flight_at_alpaca(conn, http, make_router)
    posts = len(calls(http, "POST"))
    http.get(BY_CLIENT_ID, status=status, json=body)
    reveal(conn)
    router.drain()

    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"]) == ("in_flight", None)
    assert len(calls(http, "POST")) == posts  # not sent again while its fate is unknown
    (msg,) = queued(conn)
    assert msg["wait"] > 0 and archived(conn) == []
    (kind, message), = runtime_errors(conn)
    assert kind == alarm and f"order {coid} (AAPL) is in_flight" in message


def test_a_refusal_of_the_place_after_a_lookup_rejects_with_the_brokers_reason(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """In flight, unknown to the venue (404 on the lookup), placed again, and refused:
    that refusal answers place_order, and rejects the order."""
    _acc, oid, coid, router = in_flight_at_alpaca(conn, http, make_router)
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.replace(responses.POST, f"{ALPACA}/orders", status=403,
                 json={"code": 40310000, "message": "insufficient buying power"})
    reveal(conn)
    router.drain()

    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"]) == ("rejected", "INSUFFICIENT_FUNDS")
    assert o["reason"] == (f"alpaca: market order {coid} buy 10 AAPL: insufficient buying"
                           " power (HTTP 403, code 40310000)")
    assert queued(conn) == [] and len(archived(conn)) == 1


# ---------------------------------------------------------------------------- rate limits
def _alpaca_echo(request: Any) -> tuple[int, dict[str, str], str]:
    """POST /v2/orders accepting whatever order it is sent, each under its own id."""
    body = json.loads(request.body)
    return 200, {}, json.dumps(alpaca_order(body["client_order_id"], id=str(uuid4()),
                                            qty=body["qty"]))


def test_a_rate_limit_holds_every_message_for_the_venue_until_retry_after(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """A 429 with Retry-After on one order holds the venue: the next orders for it wait
    unsent (still created, not even in flight) until then, while another venue's order
    goes at once. After the Retry-After, all of them go."""
    instrument(conn, "EUR/USD", "forex", "1.0846")
    acc = paper_account(conn, "alp")
    acc2 = paper_account(conn, "alp2")  # another account on the same venue
    fx = paper_account(conn, "fx")
    first = [manual(conn, "alp", "AAPL", "10"), manual(conn, "alp", "AAPL", "5")]
    other = manual(conn, "alp2", "AAPL", "5")
    fx_oid, fx_coid = manual(conn, "fx", "EUR/USD", "1500")
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", status=429, headers={"Retry-After": "1"},
              json={"code": 42910000, "message": "rate limit exceeded"})
    created = json.loads((OANDA_FIXTURES / "order_create_market_filled.json").read_text())
    created["orderCreateTransaction"].update(units="1500", clientExtensions={"id": fx_coid})
    created["orderFillTransaction"].update(units="1500", clientOrderID=fx_coid,
                                           tradeOpened={"tradeID": "6373", "units": "1500"})
    http.get(f"{OANDA}/orders/@{fx_coid}", status=404, json=json.loads(
        (OANDA_FIXTURES / "order_not_found.json").read_text()))
    http.get(f"{OANDA}/summary", json=json.loads(
        (OANDA_FIXTURES / "account_summary.json").read_text()))
    http.post(f"{OANDA}/orders", status=201, json=created)
    config = AccountConfig(name="fx", environment="paper", mode="operator", broker="oanda",
                           endpoint="paper", credential="main")
    router = make_router(alpaca_routed(acc, "alp"), alpaca_routed(acc2, "alp2"),
                         RoutedAccount(fx, config, OandaBroker(OANDA_CREDENTIALS, "practice"),
                                       "paper"))

    assert router.drain() == 4
    assert len(calls(http, "POST", "/v2/orders")) == 1  # the 429, and nothing after it
    assert order_row(conn, fx_oid)["state"] == "filled"  # OANDA went on
    waits = {m["message"]["order_id"]: m["wait"] for m in queued(conn)}
    assert set(waits) == {first[0][0], first[1][0], other[0]}
    assert all(0.5 < w <= 1.0 for w in waits.values()), waits
    assert order_row(conn, first[0][0])["state"] == "in_flight"
    assert [order_row(conn, o)["state"] for o, _ in (first[1], other)] == ["created"] * 2
    assert router.counts["retries"] == 1

    time.sleep(1.05)  # the venue's Retry-After is over
    http.remove(responses.POST, f"{ALPACA}/orders")  # the 429 is gone
    http.add_callback(responses.POST, f"{ALPACA}/orders", callback=_alpaca_echo)
    reveal(conn)
    assert router.drain() == 3
    assert len(calls(http, "POST", "/v2/orders")) == 4
    assert [order_row(conn, o)["state"] for o, _ in (*first, other)] == ["submitted"] * 3


# ---------------------------------------------------------------------------- the gate
def test_a_freeze_tripped_while_an_order_is_queued_cancels_it_unsent(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    acc = paper_account(conn, "alp")
    oid, _coid = manual(conn, "alp", "AAPL", "10")
    conn.execute("SELECT risk.trip_breaker('alp', 'FREEZE', 'operator pressed the kill switch')")
    router = make_router(alpaca_routed(acc, "alp"))
    seen: list[tuple[str, dict[str, Any]]] = []
    router.on_event = lambda what, fields: seen.append((what, fields))

    assert router.drain() == 1
    assert len(http.calls) == 0  # nothing reached Alpaca
    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"]) == ("cancelled", "BREAKER_FREEZE")
    assert "FREEZE" in o["reason"]
    assert queued(conn) == [] and [m["message"]["order_id"] for m in archived(conn)] == [oid]
    assert [(what, f["order_id"], f["code"]) for what, f in seen] == [
        ("order.cancelled", oid, "BREAKER_FREEZE")]
    assert router.counts["cancelled"] == 1 and router.counts["rejected"] == 0
    assert one(conn, "SELECT count(*) FROM audit.events WHERE entity_id = %s"
                     " AND event_type = 'order.in_flight'", str(oid)) == 0


def test_orders_queued_before_a_rejection_streak_are_cancelled_unsent(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """Two refusals trip the breaker (SOFT) and downgrade the account: the two orders
    queued behind them are not sent."""
    acc = paper_account(conn, "alp")
    conn.execute("UPDATE trading.accounts SET max_consecutive_rejections = 2"
                 " WHERE account_id = %s", (acc,))
    orders = [manual(conn, "alp", "AAPL", "10") for _ in range(4)]
    http.post(f"{ALPACA}/orders", status=403,
              json={"code": 40310000, "message": "insufficient buying power"})
    router = make_router(alpaca_routed(acc, "alp"))

    assert router.drain() == 4
    assert len(calls(http, "POST")) == 2
    assert [(order_row(conn, o)["state"], order_row(conn, o)["reason_code"])
            for o, _ in orders] == [("rejected", "INSUFFICIENT_FUNDS")] * 2 + [
        ("cancelled", "BREAKER_SOFT")] * 2
    assert queued(conn) == [] and len(archived(conn)) == 4
    assert router.counts["cancelled"] == 2 and router.counts["rejected"] == 2


def test_a_paper_order_queued_before_a_freeze_is_cancelled_and_never_filled(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    iid, acc, oid, _coid = paper_signal(conn)
    conn.execute("SELECT risk.trip_breaker('paper1', 'FREEZE', 'operator pressed the kill"
                 " switch')")
    router = make_router(paper_routed(acc, "paper1", COSTS))

    assert router.drain() == 1
    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"], o["broker_order_id"]) == (
        "cancelled", "BREAKER_FREEZE", None)
    assert queued(conn) == [] and [m["message"]["order_id"] for m in archived(conn)] == [oid]
    add_bar(conn, iid, T1, "101", "103", "99", "102")
    router.settle_bars(iid, "1m", T1)
    assert fills(conn, acc) == [] and positions(conn, acc) == []
    assert router.counts["cancelled"] == 1


# ---------------------------------------------------------------------------- pure parts
def test_check_environment_accepts_matching_environments() -> None:
    paper = alpaca_routed(1, "p")
    check_environment(paper, "paper")
    live = alpaca_routed(2, "l", environment="live", endpoint="live")
    check_environment(live, "live")
    costs = PaperCosts()
    check_environment(paper_routed(3, "pp", costs), "paper")
    with pytest.raises(errors.EnvironmentMismatch, match="is live but its broker points at "
                                                         "the paper endpoint"):
        check_environment(paper_routed(3, "pp", costs), "live")


# attempts up to 1000 (over 16 hours of retries at the 60 s cap); beyond that, see the
# overflow test below
@given(attempt=st.integers(min_value=0, max_value=1000), seed=st.integers(0, 2**32),
       minimum=st.none() | st.floats(min_value=0, max_value=3600))
def test_backoff_stays_within_its_bounds(attempt: int, seed: int,
                                         minimum: float | None) -> None:
    delay = backoff_seconds(attempt, base=0.5, cap=60.0, minimum=minimum,
                            rng=random.Random(seed))
    window = min(60.0, 0.5 * 2 ** min(max(attempt - 1, 0), 16))
    assert max(window / 2, minimum or 0.0) <= delay <= max(window, minimum or 0.0)


@given(attempt=st.integers(min_value=1, max_value=1000), seed=st.integers(0, 2**32))
def test_backoff_grows_with_the_attempt(attempt: int, seed: int) -> None:
    # the same draw of jitter scales a window that doubles up to the cap; the draw moves
    # the delay within the window's upper half
    now = backoff_seconds(attempt, rng=random.Random(seed))
    later = backoff_seconds(attempt + 1, rng=random.Random(seed))
    assert now <= later
    first = random.Random(seed).random()
    assert later == pytest.approx((1 + first) / 2 * min(60.0, 0.5 * 2 ** min(attempt, 16)))


def test_backoff_honours_the_venues_minimum() -> None:
    assert backoff_seconds(1, minimum=7.0, rng=random.Random(1)) == 7.0
    assert backoff_seconds(30, minimum=0.001, rng=random.Random(1)) > 0.001  # jitter wins
    windows = [max(backoff_seconds(n, rng=random.Random(s)) for s in range(200))
               for n in (1, 2, 3, 4, 8)]
    assert windows == sorted(windows) and 0.45 < windows[0] <= 0.5 and 55 < windows[-1] <= 60
    assert min(backoff_seconds(1, rng=random.Random(s)) for s in range(200)) >= 0.25


def test_backoff_after_many_attempts_is_the_cap_not_an_overflow() -> None:
    delays = [backoff_seconds(n, rng=random.Random(n)) for n in (1025, 5000, 10**6)]
    assert all(0 <= d <= 60 for d in delays)


def test_an_unexpected_error_in_one_message_is_kept_to_it(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """A broker answer the adapter cannot read (here a status whose filled quantity is not
    a number) raised past the router's error mapping and stopped the worker. It is now
    reported as a ROUTER_ERROR, the message waits with backoff, and the next account's
    order is sent in the same drain."""
    router, _acc, oid, coid, oid2 = one_sent_one_queued(conn, http, make_router)
    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(
        coid, status="partially_filled", filled_qty="ten", filled_avg_price="187.15"))
    reveal(conn)

    assert router.drain() == 2
    assert order_row(conn, oid)["state"] == "submitted"
    assert order_row(conn, oid2)["state"] == "submitted"  # the other account went on
    (kind, message), = runtime_errors(conn)
    assert kind == "ROUTER_ERROR", message
    assert message.startswith("queue message ") and f"(order {oid})" in message
    waiting = {m["message"]["order_id"]: m for m in queued(conn)}
    assert waiting[oid]["wait"] > 0


def test_a_paper_fill_of_a_pair_quoted_in_another_currency_pays_in_the_accounts(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """A USD paper account buys USD/JPY at 150 yen: the paper broker checks the cash at the
    rate (1/150) and sends its commission in yen for the ledger to convert. Before, it
    took 150 yen for 150 dollars: 66 of the 4,999 units approved were filled, the rest
    cancelled for INSUFFICIENT_CASH, and 0.2 % of the yen price was booked in dollars."""
    iid = instrument(conn, "USD/JPY", "forex", "150")
    acc = paper_account(conn, "fx1")
    r = one(conn, "SELECT trading.submit_signal(%s)", Jsonb({
        "account": "fx1", "strategy": "alpha", "symbol": "USD/JPY", "action": "buy",
        "size": 0.5, "ts": SIGNAL_TS.isoformat()}))
    assert (r["status"], r["quantity"]) == ("approved", 4999)
    router = make_router(paper_routed(acc, "fx1", PaperCosts(commission=Decimal("0.002"))))
    router.drain()
    add_bar(conn, iid, T1, "150", "150", "150", "150")
    router.settle_bars(iid, "1m", T1)
    o = order_row(conn, r["order_id"])
    assert (o["state"], o["filled_quantity"]) == ("filled", 4999)
    (f,) = fills(conn, acc)
    # 4,999 x 150 x 0.002 = 1,499.7 yen = 9.998 dollars
    assert (f["price"], f["commission_currency"], round(f["commission"], 6)) == (
        150, "USD", Decimal("9.998"))
    # 10,000 - 4,999 - 9.998 (the rate is 1/150 to 12 places)
    assert round(cash(conn, acc), 6) == Decimal("4991.002")


def test_a_paper_order_another_router_took_meanwhile_is_left_to_it(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """Router A reads a paper message and a live one; its venue call for the live one
    outlasts the visibility timeout, and router B takes the paper order into the paper
    book meanwhile. A then skips it (before, acknowledging it again raised "illegal order
    transition" and A died, its batch rolled back)."""
    iid, pacc, poid, _pcoid = paper_signal(conn)
    add_bar(conn, iid, T1, "101", "103", "99", "102")
    lacc = paper_account(conn, "alp")
    loid, lcoid = manual(conn, "alp", "AAPL", "10")
    b = make_router(paper_routed(pacc, "paper1", COSTS))

    def slow_venue(request: Any) -> tuple[int, dict[str, str], str]:
        conn.execute("SELECT trading.delay_order_message(msg_id, 0) FROM pgmq.q_orders"
                     " WHERE (message->>'order_id')::bigint = %s", (poid,))
        b.drain()
        return (200, {}, json.dumps(alpaca_order(lcoid, status="accepted")))

    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.add_callback("POST", f"{ALPACA}/orders", callback=slow_venue)
    a = make_router(paper_routed(pacc, "paper1", COSTS), alpaca_routed(lacc, "alp"))
    assert a.drain() == 2
    assert order_row(conn, poid)["state"] == "filled"
    assert len(fills(conn, pacc)) == 1  # filled once, by B
    assert order_row(conn, loid)["state"] == "submitted"
    # the paper message is archived; the live one waits for its next status poll
    assert [m["message"]["order_id"] for m in queued(conn)] == [loid]


def test_a_manual_paper_order_on_a_live_feed_fills_at_the_first_open_after_it(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """Bars arrive as they close. An order made 30 s into the bar that is forming fills at
    the open of the next one, the first price after it: before, it filled at the open of
    the forming bar, a price from before the order existed (with daily bars, up to a day
    of hindsight)."""
    t1 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    t0 = t1 - timedelta(minutes=1)
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    add_bar(conn, iid, t0, "100", "100", "100", "100")
    acc = paper_account(conn, "paper1")
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.settle_bars(iid, "1m", t0)
    oid, _coid = manual(conn, "paper1", "BTC/USD", "1")
    conn.execute("UPDATE trading.orders SET created_at = %s WHERE order_id = %s",
                 (t1 + timedelta(seconds=30), oid))
    router.drain()
    add_bar(conn, iid, t1, "100", "130", "100", "130")  # the bar the order was made in
    router.settle_bars(iid, "1m", t1)
    assert fills(conn, acc) == []
    add_bar(conn, iid, t1 + timedelta(minutes=1), "131", "132", "129", "130")
    router.settle_bars(iid, "1m", t1 + timedelta(minutes=1))
    (f,) = fills(conn, acc)
    assert (f["price"], f["ts"]) == (Decimal(131), t1 + timedelta(minutes=1))


def test_a_restarted_router_fills_a_manual_order_at_the_first_open_after_it(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """The router that took the order into the paper book dies; two bars are stored
    before the next one starts. It fills the order at the open of the first bar after
    the order's creation, as the first would have, not after the latest bar it finds."""
    t1 = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    t0 = t1 - timedelta(minutes=1)
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    add_bar(conn, iid, t0, "100", "100", "100", "100")
    acc = paper_account(conn, "paper1")
    first = make_router(paper_routed(acc, "paper1", COSTS))
    first.settle_bars(iid, "1m", t0)
    oid, _coid = manual(conn, "paper1", "BTC/USD", "1")
    conn.execute("UPDATE trading.orders SET created_at = %s WHERE order_id = %s",
                 (t1 + timedelta(seconds=30), oid))
    first.drain()
    first.close()
    add_bar(conn, iid, t1, "100", "130", "100", "130")
    add_bar(conn, iid, t1 + timedelta(minutes=1), "131", "132", "129", "130")
    add_bar(conn, iid, t1 + timedelta(minutes=2), "140", "141", "139", "140")
    restarted = make_router(paper_routed(acc, "paper1", COSTS))
    restarted.settle_bars(iid, "1m", t1 + timedelta(minutes=2))
    (f,) = fills(conn, acc)
    assert (f["price"], f["ts"]) == (Decimal(131), t1 + timedelta(minutes=1))


# ---------------------------------------------------------------------------- re-gating
# An order in flight that never reached its venue, when the account's breaker trips or
# the account is downgraded before the router's next attempt (found by review): the retry
# placed it all the same, after a FREEZE too, because `trading.mark_in_flight` judges only
# orders not yet in flight (and the router could not read the breaker before 0004_12).
# Alpaca is answered at the HTTP level (`responses`), the ledger is
# the real database (helpers and fixtures from test_router).
def lost_first_attempt(conn: psycopg.Connection, http: responses.RequestsMock,
                       make_router: Callable[..., Router], side: str = "buy"
                       ) -> tuple[Router, int, int, str]:
    """An Alpaca order whose first POST never reached the venue (connection refused): it
    stays in flight, its message delayed. (router, account, order id, client id)"""
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10", side)
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    http.post(f"{ALPACA}/orders", body=requests.ConnectionError("connection refused"))
    router = make_router(alpaca_routed(acc, "alp"))
    router.drain()
    assert order_row(conn, oid)["state"] == "in_flight"
    # the venue is reachable again
    http.replace(responses.POST, f"{ALPACA}/orders", json=alpaca_order(
        coid, side=side, status="filled", filled_qty="10", filled_avg_price="187.3",
        filled_at=now_text()))
    http.get(ACTIVITIES, json=[activity(1, "10", "10", "187.3")])
    return router, acc, oid, coid


@pytest.mark.parametrize(("trip", "code"), [
    ("SELECT risk.trip_breaker('alp', 'FREEZE', 'kill switch')", "BREAKER_FREEZE"),
    ("SELECT risk.trip_breaker('alp', 'SOFT', 'operator')", "BREAKER_SOFT"),
    ("SELECT trading.set_advisory('alp')", "ACCOUNT_ADVISORY"),
])
def test_an_order_in_flight_not_at_the_venue_is_not_sent_again_once_the_gate_closed(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router], trip: str, code: str) -> None:
    router, acc, oid, _coid = lost_first_attempt(conn, http, make_router)
    posts = len(calls(http, "POST"))
    conn.execute(trip)
    reveal(conn)
    router.drain()
    assert len(calls(http, "POST")) == posts, "the order was sent after the gate closed"
    o = order_row(conn, oid)
    assert o["state"] == "cancelled" and o["reason"].startswith(code), o
    assert fills(conn, acc) == []
    assert queued(conn) == [] and [m["message"]["order_id"] for m in archived(conn)] == [oid]
    assert router.counts["cancelled"] == 1 and router.counts["rejected"] == 0


def test_an_order_in_flight_is_placed_again_while_the_gate_is_open(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    router, acc, oid, _coid = lost_first_attempt(conn, http, make_router)
    reveal(conn)
    router.drain()
    o = order_row(conn, oid)
    assert o["state"] == "filled"
    assert len(fills(conn, acc)) == 1 and queued(conn) == []


def test_an_order_the_venue_finished_short_of_its_quantity_has_the_rest_cancelled(
        conn: psycopg.Connection, http: responses.RequestsMock,
        make_router: Callable[..., Router]) -> None:
    """The venue's lot step (Binance LOT_SIZE 0.00001) is coarser than the ledger's (a
    filter changed since the instrument was stored): a buy of 0.0012399 goes out as
    0.00123 and is reported FILLED. Before, the order stayed partially_filled for ever,
    its message archived, the 0.0000099 left counted as an open entry by the gate."""
    import test_broker_ccxt as tc

    from workers.brokers.ccxt_broker import CcxtBroker

    iid = instrument(conn, "BTC/USDT", "crypto", "66780")
    conn.execute("UPDATE market.instruments SET quantity_step = 0.0000001,"
                 " min_quantity = 0.0000001 WHERE instrument_id = %s", (iid,))
    acc = int(one(conn, "SELECT trading.create_account('bin', 'paper', 'operator', 10000,"
                        " 'USDT')"))
    oid, coid = manual(conn, "bin", "BTC/USDT", "0.0012399")
    now_ms = int(time.time() * 1000)
    http.get(f"{tc.BINANCE_TEST}/exchangeInfo", json=tc.fixture("binance_exchange_info.json"))
    http.post(f"{tc.BINANCE_TEST}/order", json={
        "symbol": "BTCUSDT", "orderId": 28457, "orderListId": -1, "clientOrderId": coid,
        "transactTime": now_ms, "price": "0", "origQty": "0.00123000",
        "executedQty": "0.00123000", "cummulativeQuoteQty": "82.1394", "status": "FILLED",
        "timeInForce": "GTC", "type": "MARKET", "side": "BUY", "workingTime": now_ms,
        "fills": [{"price": "66780", "qty": "0.00123", "commission": "0.08",
                   "commissionAsset": "USDT", "tradeId": 3001}]})
    broker = CcxtBroker("binance", dict(tc.CREDS), "testnet")
    broker.exchange.enableRateLimit = False
    cfg = AccountConfig(name="bin", environment="paper", mode="operator", broker="ccxt",
                        exchange="binance", endpoint="testnet", credential="main")
    make_router(RoutedAccount(acc, cfg, broker, "testnet")).drain()
    assert tc.sent(tc.calls_to(http, "/api/v3/order")[0])["quantity"] == "0.00123"
    row = order_row(conn, oid)
    assert (row["state"], row["filled_quantity"]) == ("cancelled", Decimal("0.00123"))
    assert row["reason"] == ("the venue filled 0.00123 of 0.0012399 and finished the order "
                             "(its quantity step)")
    assert queued(conn) == []
