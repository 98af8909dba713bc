"""The reconciler against a real PostgreSQL ledger and the real broker adapters, whose
HTTP is answered by `responses` with bodies shaped like Alpaca's and OANDA's documented
JSON. Nothing of the adapters or of the reconciler is mocked: an unregistered URL fails
the request (responses raises ConnectionError), so each test also proves what was asked.

The ledger state is made the way the runtime makes it: orders from
`trading.place_manual_order` on an operator paper account, then `mark_in_flight` and
`acknowledge_order` as the router calls them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import ccxt
import psycopg
import pytest
import requests
import responses
from psycopg.types.json import Jsonb

from workers.brokers.alpaca_broker import AlpacaBroker
from workers.brokers.ccxt_broker import CcxtBroker, datetime_to_ms
from workers.brokers.oanda_broker import OandaBroker
from workers.runtime.config import AccountConfig, PaperCosts
from workers.runtime.paper import PaperBroker
from workers.runtime.reconciler import Reconciler
from workers.runtime.router import RoutedAccount

ALPACA = "https://paper-api.alpaca.markets/v2"
ALPACA_CREDS = {"api_key": "PKTEST4MMATS0001", "secret_key": "paper-secret-for-tests-0001"}
OID = "61e69015-8549-4bfd-b9c3-01e75843f47d"
OTHER_OID = "904837e3-3b76-47ec-b432-046db621571b"
OANDA_ACCOUNT = "101-004-1435156-001"
OANDA = f"https://api-fxpractice.oanda.com/v3/accounts/{OANDA_ACCOUNT}"
OANDA_CREDS = {"account_id": OANDA_ACCOUNT, "access_token": "oanda-test-token-7f3a9c"}


# ---------------------------------------------------------------------- vendor JSON
def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def recent(minutes: float = 1) -> str:
    """A time inside the reconciler's first 24-hour look-back."""
    return rfc3339(datetime.now(UTC) - timedelta(minutes=minutes))


def alpaca_order(**changes: Any) -> dict[str, Any]:
    """An Alpaca order object as GET /v2/orders returns it."""
    order: dict[str, Any] = {
        "id": OID, "client_order_id": "mmats-1", "created_at": recent(5),
        "updated_at": recent(4), "submitted_at": recent(5), "filled_at": None,
        "expired_at": None, "canceled_at": None, "failed_at": None, "replaced_at": None,
        "replaced_by": None, "replaces": None,
        "asset_id": "b0b6dd9d-8b9b-48a9-ba46-b9d54906e415", "symbol": "AAPL",
        "asset_class": "us_equity", "notional": None, "qty": "5", "filled_qty": "0",
        "filled_avg_price": None, "order_class": "simple", "order_type": "limit",
        "type": "limit", "side": "buy", "position_intent": "buy_to_open",
        "time_in_force": "gtc", "limit_price": "100", "stop_price": None,
        "status": "new", "extended_hours": False, "legs": None, "trail_percent": None,
        "trail_price": None, "hwm": None,
    }
    order.update(changes)
    return order


def alpaca_fill(n: int, *, qty: str, price: str = "100", order_id: str = OID,
                symbol: str = "AAPL", side: str = "buy", cum_qty: str | None = None,
                leaves_qty: str = "0") -> dict[str, Any]:
    """A FILL account activity as GET /v2/account/activities/FILL returns it."""
    return {"id": f"20240301150001{n:03d}::8efc7b9a-8b2b-4000-9955-{n:012d}",
            "activity_type": "FILL", "transaction_time": recent(2), "type": "fill"
            if leaves_qty == "0" else "partial_fill", "price": price, "qty": qty,
            "side": side, "symbol": symbol, "leaves_qty": leaves_qty, "order_id": order_id,
            "cum_qty": cum_qty or qty,
            "order_status": "filled" if leaves_qty == "0" else "partially_filled"}


def alpaca_position(symbol: str, qty: str, avg: str = "100") -> dict[str, Any]:
    side = "short" if qty.startswith("-") else "long"
    return {"asset_id": "b0b6dd9d-8b9b-48a9-ba46-b9d54906e415", "symbol": symbol,
            "exchange": "NASDAQ", "asset_class": "us_equity", "asset_marginable": True,
            "qty": qty, "qty_available": qty, "avg_entry_price": avg, "side": side,
            "market_value": "500", "cost_basis": "500", "unrealized_pl": "0",
            "unrealized_plpc": "0", "unrealized_intraday_pl": "0",
            "unrealized_intraday_plpc": "0", "current_price": avg, "lastday_price": avg,
            "change_today": "0"}


def alpaca_account(cash: str) -> dict[str, Any]:
    return {"id": "1d9eed04-be39-4e01-9b84-a48ac5bbafcf", "account_number": "PA123",
            "status": "ACTIVE", "crypto_status": "ACTIVE", "currency": "USD",
            "buying_power": cash, "regt_buying_power": cash, "daytrading_buying_power": "0",
            "non_marginable_buying_power": cash, "cash": cash, "accrued_fees": "0",
            "portfolio_value": cash, "pattern_day_trader": False, "trading_blocked": False,
            "transfers_blocked": False, "account_blocked": False,
            "created_at": "2023-01-01T18:20:20.272275Z", "multiplier": "1",
            "shorting_enabled": False, "equity": cash, "last_equity": cash}


def alpaca_cash(n: int, activity_type: str, net_amount: str, date: str,
                symbol: str | None = None, description: str = "") -> dict[str, Any]:
    """A non-trade account activity (a fee, a dividend ...) as GET /v2/account/activities
    returns it: dated by its day only."""
    return {"id": f"{date.replace('-', '')}000000000::5b1d3c9e-4a7f-4c1e-9d2b-{n:012d}",
            "activity_type": activity_type, "date": date, "net_amount": net_amount,
            "description": description, "status": "executed", "symbol": symbol,
            "qty": None, "per_share_amount": None}


def alpaca_answers(http: responses.RequestsMock, *, fills: list[dict[str, Any]] | None = None,
                   open_orders: list[dict[str, Any]] | None = None,
                   positions: list[dict[str, Any]] | None = None,
                   movements: list[dict[str, Any]] | None = None,
                   cash: str = "10000") -> None:
    """What one reconciliation of an Alpaca account asks: positions, the account, the
    open orders, the fill activities and the cash (non-trade) activities."""
    http.get(f"{ALPACA}/positions", json=positions or [])
    http.get(f"{ALPACA}/account", json=alpaca_account(cash))
    http.get(f"{ALPACA}/orders", json=open_orders or [])
    http.get(f"{ALPACA}/account/activities/FILL", json=fills or [])
    http.get(f"{ALPACA}/account/activities", json=movements or [])


def oanda_answers(http: responses.RequestsMock, *, balance: str = "100000.0000",
                  positions: list[dict[str, Any]] | None = None,
                  transactions: list[dict[str, Any]] | None = None) -> None:
    """What one reconciliation of an OANDA account asks: open positions, the account
    summary, pending orders, the ORDER_FILL transactions (here: none) and every
    transaction, for the cash movements (`transactions`: one id-range page of them)."""
    http.get(f"{OANDA}/openPositions", json={"positions": positions or [],
                                             "lastTransactionID": "6420"})
    http.get(f"{OANDA}/summary", json={"account": {
        "id": OANDA_ACCOUNT, "currency": "USD", "balance": balance, "NAV": balance,
        "marginAvailable": balance, "marginUsed": "0.0000", "unrealizedPL": "0.0000",
        "openTradeCount": 0, "openPositionCount": len(positions or []),
        "pendingOrderCount": 0, "lastTransactionID": "6420"}, "lastTransactionID": "6420"})
    http.get(f"{OANDA}/pendingOrders", json={"orders": [], "lastTransactionID": "6420"})
    http.get(f"{OANDA}/transactions", json={
        "count": 0, "from": recent(24 * 60), "to": recent(0), "pageSize": 1000,
        "type": ["ORDER_FILL"], "pages": [], "lastTransactionID": "6420"})
    txs = transactions or []
    http.get(f"{OANDA}/transactions", json={
        "count": len(txs), "from": recent(24 * 60), "to": recent(0), "pageSize": 1000,
        "pages": [f"{OANDA}/transactions/idrange?from=6400&to=6420"] if txs else [],
        "lastTransactionID": "6420"})
    if txs:
        http.get(f"{OANDA}/transactions/idrange",
                 json={"transactions": txs, "lastTransactionID": "6420"})


def oanda_long(units: str, price: str) -> dict[str, Any]:
    return {"instrument": "EUR_USD", "pl": "0.0000", "resettablePL": "0.0000",
            "unrealizedPL": "0.0000",
            "long": {"units": units, "averagePrice": price, "pl": "0.0000",
                     "resettablePL": "0.0000", "unrealizedPL": "0.0000",
                     "tradeIDs": ["6373"]},
            "short": {"units": "0", "pl": "0.0000", "resettablePL": "0.0000",
                      "unrealizedPL": "0.0000"}}


# ---------------------------------------------------------------------- the ledger
@dataclass
class Desk:
    """The test's ledger, written through the trading core's functions."""

    conn: psycopg.Connection
    url: str

    def account(self, name: str, cash: str = "10000", currency: str = "USD") -> int:
        row = self.conn.execute(
            "SELECT trading.create_account(name => %s, environment => 'paper', "
            "mode => 'operator', cash => %s, currency => %s)", (name, cash, currency)).fetchone()
        assert row is not None
        return int(row[0])

    def order(self, account: str, *, symbol: str = "AAPL", side: str = "buy",
              quantity: str = "5", price: str = "100", status: str = "submitted",
              broker_order_id: str | None = OID) -> str:
        """A manual limit order, taken as far as the router would have: its client id."""
        row = self.conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb({
            "account": account, "symbol": symbol, "side": side, "quantity": quantity,
            "type": "limit", "limit_price": price}),)).fetchone()
        assert row is not None and row[0]["status"] == "approved", row
        client = self.one("SELECT client_order_id FROM trading.orders WHERE order_id = %s",
                          row[0]["order_id"])
        if status in ("in_flight", "submitted"):
            self.conn.execute("SELECT trading.mark_in_flight(%s)", (client,))
        if status == "submitted":
            self.conn.execute("SELECT trading.acknowledge_order(%s, %s)",
                              (client, broker_order_id))
        return str(client)

    def one(self, query: str, *args: Any) -> Any:
        row = self.conn.execute(query, args).fetchone()
        assert row is not None
        return row[0]

    def events(self, kind: str | None = None) -> list[tuple[str, str, dict[str, Any]]]:
        return [(r[0], r[1], r[2]) for r in self.conn.execute(
            "SELECT event_type, message, details FROM risk.events WHERE severity = 'critical' "
            "AND (%s::text IS NULL OR event_type = %s) ORDER BY event_id",
            (kind, kind)).fetchall()]

    def errors(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self.conn.execute(
            "SELECT kind, message FROM runtime.errors ORDER BY error_id").fetchall()]

    def order_row(self, client: str) -> tuple[str, Decimal, str | None, str | None]:
        row = self.conn.execute("SELECT status::text, filled_quantity, reason_code, reason "
                                "FROM trading.orders WHERE client_order_id = %s",
                                (client,)).fetchone()
        assert row is not None
        return row[0], row[1], row[2], row[3]

    def position(self, account_id: int, symbol: str = "AAPL") -> Decimal:
        return Decimal(self.one(
            "SELECT COALESCE(sum(quantity), 0) FROM trading.positions p "
            "JOIN market.instruments i USING (instrument_id) "
            "WHERE p.account_id = %s AND i.symbol = %s", account_id, symbol))

    def breaker(self, account_id: int) -> str:
        return str(self.one("SELECT risk.breaker_mode(%s)::text", account_id))


@pytest.fixture
def desk(conn: psycopg.Connection, db_url: str) -> Desk:
    """AAPL (Alpaca) and EUR/USD (OANDA) instruments. The router's role may use the risk
    schema (migration 0004_01), where risk.report_mismatch lives."""
    conn.execute("""
        INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,
                                        price_tick, quantity_step, min_quantity, calendar_id)
        VALUES ('AAPL', 'alpaca', 'stock', 'AAPL', 'USD', 0.01, 1, 1, 'XNYS'),
               ('EUR/USD', 'oanda', 'forex', 'EUR', 'USD', 0.00001, 1, 1, 'FX_24X5')""")
    assert conn.execute(
        "SELECT has_schema_privilege('mmats_router', 'risk', 'USAGE')").fetchone() == (True,)
    return Desk(conn, db_url)


def routed(account_id: int, name: str, broker: Any, *, freeze: bool = False) -> RoutedAccount:
    kind = ("ccxt" if isinstance(broker, CcxtBroker)
            else "oanda" if isinstance(broker, OandaBroker) else "alpaca")
    return RoutedAccount(account_id, AccountConfig(
        name=name, environment="paper", mode="operator", broker=kind,
        exchange=getattr(broker, "exchange_id", None), endpoint="paper",
        credential=f"{kind}-paper", freeze_on_mismatch=freeze), broker)


@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    # every registered answer must be asked for: each test proves what the reconciler read
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def alpaca(desk: Desk) -> tuple[int, RoutedAccount]:
    account_id = desk.account("alp-1")
    return account_id, routed(account_id, "alp-1", AlpacaBroker(ALPACA_CREDS, "paper"))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The reconciler's log records (mmats loggers stop propagating once log.setup ran)."""
    logger = logging.getLogger("mmats")
    caplog.set_level(logging.INFO, logger="mmats")
    attach = not logger.propagate
    if attach:
        logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        if attach:
            logger.removeHandler(caplog.handler)


def reconciler(desk: Desk, *accounts: RoutedAccount, **options: Any) -> Reconciler:
    worker = Reconciler(desk.url, {a.account_id: a for a in accounts},
                        heartbeat_seconds=0.0, **options)
    worker.start()
    return worker


# ---------------------------------------------------------------------- (a) adoption
def test_a_fill_the_router_missed_is_adopted_once(desk: Desk, http: responses.RequestsMock,
                                                  alpaca: tuple[int, RoutedAccount]) -> None:
    """The router crashed between the fill and apply_fill: the order is still open at
    Alpaca (2 of 5 filled) and the fill activity names it by broker order id."""
    account_id, acc = alpaca
    client = desk.order("alp-1")
    alpaca_answers(http, fills=[alpaca_fill(1, qty="2", cum_qty="2", leaves_qty="3")],
                   open_orders=[alpaca_order(client_order_id=client, status="partially_filled",
                                             filled_qty="2", filled_avg_price="100")],
                   positions=[alpaca_position("AAPL", "2")], cash="9800")
    worker = reconciler(desk, acc)
    try:
        first = worker.reconcile_all()
        second = worker.reconcile_all()
    finally:
        worker.close()
    assert [(r.adopted, r.mismatches, r.skipped) for r in first] == [(1, [], None)]
    assert [(r.adopted, r.mismatches) for r in second] == [(0, [])]
    assert first[0].summary() == "reconciled alp-1: 1 fill adopted, 0 orders settled, " \
        "0 mismatches"
    assert desk.one("SELECT count(*) FROM trading.fills WHERE account_id = %s", account_id) == 1
    assert desk.one("SELECT broker_fill_id FROM trading.fills") == \
        alpaca_fill(1, qty="2")["id"]
    assert desk.order_row(client)[:2] == ("partially_filled", Decimal(2))
    assert desk.position(account_id) == 2
    assert desk.one("SELECT cash FROM trading.accounts WHERE account_id = %s", account_id) \
        == Decimal(9800)
    assert desk.events() == []
    assert desk.one("SELECT at FROM runtime.cursors WHERE name = 'reconcile:alp-1'") \
        == second[0].started_at


def test_an_order_filled_while_the_router_was_down_is_settled(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """In flight when the router died, never acknowledged: Alpaca knows it by client id,
    filled. The reconciler acknowledges it (recording Alpaca's id) and applies the fill."""
    account_id, acc = alpaca
    client = desk.order("alp-1", status="in_flight")
    alpaca_answers(http, fills=[alpaca_fill(1, qty="5", price="99.5")],
                   positions=[alpaca_position("AAPL", "5")], cash="9502.5")
    http.get(f"{ALPACA}/orders:by_client_order_id",
             json=alpaca_order(client_order_id=client, status="filled", filled_qty="5",
                               filled_avg_price="99.5", filled_at=recent(2)))
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert (run.adopted, run.settled, run.mismatches) == (1, 1, [])
    assert desk.order_row(client)[:2] == ("filled", Decimal(5))
    assert desk.one("SELECT broker_order_id FROM trading.orders WHERE client_order_id = %s",
                    client) == OID
    assert desk.position(account_id) == 5
    assert desk.events() == []


# ---------------------------------------------------------------------- (b) positions
@pytest.mark.parametrize("freeze", [False, True])
def test_an_extra_position_at_the_broker_is_a_mismatch(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount],
        freeze: bool) -> None:
    account_id, _ = alpaca
    acc = routed(account_id, "alp-1", AlpacaBroker(ALPACA_CREDS, "paper"), freeze=freeze)
    alpaca_answers(http, positions=[alpaca_position("AAPL", "10")])
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    (kind, message, details), *tripped = desk.events()
    assert kind == "POSITION_MISMATCH"
    assert message == "AAPL: the broker holds 10, the ledger 0 (difference 10, quantity step 1)"
    assert (details["broker"], details["ledger"], details["symbol"]) == ("10", "0", "AAPL")
    assert [m.kind for m in run.reported] == ["POSITION_MISMATCH"]
    assert desk.breaker(account_id) == ("FREEZE" if freeze else "OK")
    # the FREEZE is a risk event of its own, under the mismatch's code
    assert [(k, d["mode"], m.split(":")[0]) for k, m, d in tripped] == (
        [("POSITION_MISMATCH", "FREEZE", "breaker FREEZE on alp-1")] if freeze else [])


def test_less_than_a_quantity_step_is_rounding_not_a_mismatch(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    _, acc = alpaca
    alpaca_answers(http, positions=[alpaca_position("AAPL", "0.4")])
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert run.mismatches == [] and desk.events() == []


def test_a_short_at_the_broker_against_a_long_in_the_ledger(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """The ledger's quantity comes from its own fills (2 bought); Alpaca says short 3."""
    account_id, acc = alpaca
    client = desk.order("alp-1", quantity="2")
    desk.conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "client_order_id": client, "broker_fill_id": "earlier-1", "quantity": "2",
        "price": "100"}),))
    alpaca_answers(http, positions=[alpaca_position("AAPL", "-3")], cash="9800")
    worker = reconciler(desk, acc)
    try:
        worker.reconcile_all()
    finally:
        worker.close()
    [(_, _, details)] = desk.events("POSITION_MISMATCH")
    assert (details["broker"], details["ledger"], details["difference"]) == ("-3", "2", "-5")
    assert desk.position(account_id) == 2  # reported, never "corrected"


# ---------------------------------------------------------------------- (c) cash
@pytest.mark.parametrize(("cash", "event"), [
    ("9989.99", True), ("10010.01", True), ("9990", False), ("10005", False),
    ("10000.004", False)])
def test_cash_beyond_the_tolerance_is_a_mismatch(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount],
        cash: str, event: bool) -> None:
    """Default tolerance: the larger of 0.01 and 0.1 % of the ledger's cash (10 here)."""
    _, acc = alpaca
    alpaca_answers(http, cash=cash)
    worker = reconciler(desk, acc)
    try:
        worker.reconcile_all()
    finally:
        worker.close()
    found = desk.events("BALANCE_MISMATCH")
    if not event:
        assert found == []
        return
    [(_, message, details)] = found
    assert (details["broker"], details["ledger"], details["currency"]) == (cash, "10000", "USD")
    assert message.startswith(f"USD: the broker holds {cash}, the ledger 10000 (difference ")


def test_the_cash_tolerance_is_configurable(desk: Desk, http: responses.RequestsMock,
                                            alpaca: tuple[int, RoutedAccount]) -> None:
    _, acc = alpaca
    alpaca_answers(http, cash="10000.02")
    worker = reconciler(desk, acc, balance_tolerance=Decimal("0.01"),
                        balance_relative_tolerance=Decimal(0))
    try:
        worker.reconcile_all()
    finally:
        worker.close()
    [(_, _, details)] = desk.events("BALANCE_MISMATCH")
    assert (details["difference"], details["tolerance"]) == ("0.02", "0.01")


# ---------------------------------------------------------------------- cash movements
def test_alpacas_fees_and_dividends_are_booked_once_and_the_cash_agrees(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount],
        logs: pytest.LogCaptureFixture) -> None:
    """Today's REG/TAF fee and a dividend moved Alpaca's cash (10000 - 0.02 + 1.50): booked,
    the balance agrees to the cent. Yesterday's dividend is in the cash the account
    started with (it was created today): left alone. The second run books nothing."""
    account_id, acc = alpaca
    today = datetime.now(UTC).date()
    yesterday = (today - timedelta(days=1)).isoformat()
    fee = alpaca_cash(1, "FEE", "-0.02", today.isoformat(), "AAPL", "REG/TAF fee")
    div = alpaca_cash(2, "DIV", "1.5", today.isoformat(), "AAPL", "Cash DIV @ 0.3")
    old = alpaca_cash(3, "DIV", "7", yesterday, "AAPL")
    for _ in range(2):
        alpaca_answers(http, movements=[old, fee, div], cash="10001.48")
    worker = reconciler(desk, acc, balance_relative_tolerance=Decimal(0),
                        balance_tolerance=Decimal(0))
    try:
        first = worker.reconcile_all()
        second = worker.reconcile_all()
    finally:
        worker.close()
    assert [(r.booked, r.mismatches) for r in first] == [(2, [])]
    assert [(r.booked, r.mismatches) for r in second] == [(0, [])]
    assert first[0].summary() == ("reconciled alp-1: 0 fills adopted, 0 orders settled, "
                                  "2 cash movements booked, 0 mismatches")
    rows = desk.conn.execute(
        "SELECT kind::text, amount, currency, broker_ref, symbol, instrument_id IS NOT NULL,"
        " description FROM trading.cash_movements WHERE account_id = %s ORDER BY movement_id",
        (account_id,)).fetchall()
    assert rows == [
        ("fee", Decimal("-0.02"), "USD", fee["id"], "AAPL", True, "REG/TAF fee"),
        ("dividend", Decimal("1.5"), "USD", div["id"], "AAPL", True, "Cash DIV @ 0.3")]
    assert desk.one("SELECT cash FROM trading.accounts WHERE account_id = %s",
                    account_id) == Decimal("10001.48")
    assert desk.events() == []
    booked = [r for r in logs.records if r.getMessage() == "cash movement booked"]
    assert len(booked) == 2


def test_the_first_round_asks_for_cash_movements_since_the_account_was_created(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """The account was created five days before the reconciler first ran: its first round
    asks Alpaca for the activities since then (fills: the usual 24 hours), so a fee of
    four days ago is booked; the next round asks from its cursor less the overlap."""
    account_id, acc = alpaca
    created = datetime.now(UTC).replace(microsecond=0) - timedelta(days=5)
    desk.conn.execute("UPDATE trading.accounts SET created_at = %s WHERE account_id = %s",
                      (created, account_id))
    fee_day = (created + timedelta(days=1)).date().isoformat()
    for _ in range(2):
        alpaca_answers(http, movements=[alpaca_cash(1, "FEE", "-0.02", fee_day)],
                       cash="9999.98")
    worker = reconciler(desk, acc, balance_relative_tolerance=Decimal(0),
                        balance_tolerance=Decimal(0))
    try:
        first, = worker.reconcile_all()
        second, = worker.reconcile_all()
    finally:
        worker.close()
    asked = [c.request.params for c in http.calls
             if c.request.path_url.split("?")[0].endswith("/account/activities")]
    assert asked[0]["after"] == (created - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    after_cursor = first.started_at - timedelta(days=3) - timedelta(seconds=1)
    assert asked[1]["after"] == after_cursor.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (first.booked, first.mismatches, second.booked) == (1, [], 0)
    assert desk.one("SELECT cash FROM trading.accounts WHERE account_id = %s",
                    account_id) == Decimal("9999.98")


def test_without_booking_the_same_fee_is_a_balance_mismatch(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """What the booking prevents: the broker's cash lower by a fee the ledger never saw."""
    _, acc = alpaca
    alpaca_answers(http, cash="9999.98")
    worker = reconciler(desk, acc, balance_relative_tolerance=Decimal(0),
                        balance_tolerance=Decimal(0))
    try:
        worker.reconcile_all()
    finally:
        worker.close()
    [(_, _, details)] = desk.events("BALANCE_MISMATCH")
    assert (details["broker"], details["ledger"]) == ("9999.98", "10000")


def test_oandas_financing_is_booked_and_its_balance_agrees(
        desk: Desk, http: responses.RequestsMock) -> None:
    """A DAILY_FINANCING charge and the financing an ORDER_FILL settled, both since the
    account was created: booked in the account's currency (the summary's, read once), so
    the margin venue's balance agrees exactly."""
    account_id = desk.account("oan-1", cash="100000")
    acc = routed(account_id, "oan-1", OandaBroker(OANDA_CREDS, "practice"))
    txs = [
        {"id": "6410", "type": "DAILY_FINANCING", "time": recent(0), "accountID": OANDA_ACCOUNT,
         "userID": 1435156, "batchID": "6410", "financing": "-1.2345",
         "accountBalance": "99998.7655", "accountFinancingMode": "DAILY",
         "positionFinancings": [{"instrument": "EUR_USD", "financing": "-1.2345"}]},
        {"id": "6412", "type": "ORDER_FILL", "time": recent(0), "accountID": OANDA_ACCOUNT,
         "userID": 1435156, "batchID": "6411", "orderID": "6411", "instrument": "EUR_USD",
         "units": "0", "price": "1.08463", "financing": "-0.0100", "commission": "0.0000",
         "guaranteedExecutionFee": "0.0000", "pl": "0.0000", "reason": "MARKET_ORDER",
         "accountBalance": "99998.7555"},
    ]
    oanda_answers(http, balance="99998.7555", transactions=txs)
    worker = reconciler(desk, acc, balance_relative_tolerance=Decimal(0),
                        balance_tolerance=Decimal(0))
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert (run.booked, run.mismatches, run.skipped) == (2, [], None)
    assert desk.conn.execute(
        "SELECT kind::text, amount, broker_ref, symbol FROM trading.cash_movements"
        " ORDER BY movement_id").fetchall() == [
        ("financing", Decimal("-1.2345"), "6410", "EUR/USD"),
        ("financing", Decimal("-0.0100"), "6412:financing", "EUR/USD")]
    assert desk.one("SELECT cash FROM trading.accounts WHERE account_id = %s",
                    account_id) == Decimal("99998.7555")


def test_a_movement_the_ledger_refuses_is_reported_once(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """The broker's id was already booked (by hand) with another amount: the ledger keeps
    what it has, and the disagreement is a CASH_NOT_BOOKED event, reported once."""
    account_id, acc = alpaca
    fee = alpaca_cash(1, "FEE", "-0.02", datetime.now(UTC).date().isoformat(), "AAPL")
    desk.conn.execute("SELECT trading.book_cash(%s)", (Jsonb({
        "account": "alp-1", "kind": "fee", "amount": "-0.03", "broker_ref": fee["id"]}),))
    for _ in range(2):
        alpaca_answers(http, movements=[fee], cash="9999.97")
    worker = reconciler(desk, acc)
    try:
        runs = [worker.reconcile_all()[0] for _ in range(2)]
    finally:
        worker.close()
    assert [(r.booked, [m.kind for m in r.mismatches], len(r.reported)) for r in runs] == [
        (0, ["CASH_NOT_BOOKED"], 1), (0, ["CASH_NOT_BOOKED"], 0)]
    [(_, message, details)] = desk.events("CASH_NOT_BOOKED")
    assert message == (
        f"the ledger refused the broker's fee of -0.02 USD (movement {fee['id']}): "
        f"book_cash: broker_ref \"{fee['id']}\" of account alp-1 is already booked as "
        "fee -0.03 USD, not fee -0.02 USD")
    assert details["amount"] == "-0.02"
    assert desk.one("SELECT cash FROM trading.accounts WHERE account_id = %s",
                    account_id) == Decimal("9999.97")


def test_a_key_that_may_not_list_cash_movements_is_reported_once_and_the_round_goes_on(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """A trade-only key refused the activities listing (HTTP 403): the other checks still
    run (a position the ledger lacks is found), and the refusal is one error row, not one
    a round."""
    _, acc = alpaca
    for _ in range(2):
        http.get(f"{ALPACA}/positions", json=[alpaca_position("AAPL", "5")])
        http.get(f"{ALPACA}/account", json=alpaca_account("10000"))
        http.get(f"{ALPACA}/orders", json=[])
        http.get(f"{ALPACA}/account/activities/FILL", json=[])
        http.get(f"{ALPACA}/account/activities", status=403,
                 json={"code": 40310000, "message": "forbidden"})
    worker = reconciler(desk, acc)
    try:
        runs = [worker.reconcile_all()[0] for _ in range(2)]
    finally:
        worker.close()
    assert [(r.skipped, r.booked, [m.kind for m in r.mismatches]) for r in runs] == [
        (None, 0, ["POSITION_MISMATCH"]), (None, 0, ["POSITION_MISMATCH"])]
    [(kind, message)] = desk.errors()
    assert message.startswith("alp-1: the broker refused to list its cash movements (fees, "
                              "deposits, withdrawals), so they are not booked: alpaca: ")
    assert kind.isupper()
    assert [k for k, _, _ in desk.events()] == ["POSITION_MISMATCH"]


# ---------------------------------------------------------------------- (d) unknown orders
def test_an_order_open_at_the_broker_that_the_ledger_does_not_know(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    _, acc = alpaca
    alpaca_answers(http, open_orders=[alpaca_order(id=OTHER_OID, client_order_id="by-hand-7",
                                                   side="sell", qty="3")])
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    [(kind, message, details)] = desk.events()
    assert kind == "UNKNOWN_BROKER_ORDER"
    assert message == (f"sell 3 AAPL order {OTHER_OID} (client id by-hand-7) is open at "
                       "alpaca but is not in the ledger")
    assert (details["client_order_id"], details["ledger_status"]) == ("by-hand-7", None)
    assert run.summary() == "reconciled alp-1: 0 fills adopted, 0 orders settled, " \
        "1 mismatch (1 new)"


def test_an_order_the_ledger_holds_cancelled_but_the_broker_open(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    _, acc = alpaca
    client = desk.order("alp-1")
    desk.conn.execute("SELECT trading.cancel_order(%s, 'operator cancel')", (client,))
    alpaca_answers(http, open_orders=[alpaca_order(client_order_id=client)])
    worker = reconciler(desk, acc)
    try:
        worker.reconcile_all()
    finally:
        worker.close()
    [(_, message, details)] = desk.events("UNKNOWN_BROKER_ORDER")
    assert details["ledger_status"] == "cancelled"
    assert message.endswith("is open at alpaca but is cancelled in the ledger")


def test_a_fill_of_an_order_placed_outside_mmats(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    account_id, acc = alpaca
    alpaca_answers(http, fills=[alpaca_fill(7, qty="3", order_id=OTHER_OID)],
                   positions=[alpaca_position("AAPL", "3")], cash="9700")
    worker = reconciler(desk, acc)
    try:
        worker.reconcile_all()
        worker.reconcile_all()
    finally:
        worker.close()
    kinds = [e[0] for e in desk.events()]
    assert sorted(kinds) == ["BALANCE_MISMATCH", "POSITION_MISMATCH", "UNKNOWN_BROKER_FILL"]
    [(_, message, details)] = desk.events("UNKNOWN_BROKER_FILL")
    assert details["broker_order_id"] == OTHER_OID and details["quantity"] == "3"
    assert "is not an order of the ledger" in message
    assert desk.one("SELECT count(*) FROM trading.fills WHERE account_id = %s", account_id) == 0


# ---------------------------------------------------------------------- (e) cancelled
def test_an_order_cancelled_at_alpaca_is_cancelled_in_the_ledger(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """Partly filled (2 of 5), then cancelled at Alpaca: the fill first, then the cancel."""
    account_id, acc = alpaca
    client = desk.order("alp-1")
    alpaca_answers(http, fills=[alpaca_fill(1, qty="2", cum_qty="2", leaves_qty="3")],
                   positions=[alpaca_position("AAPL", "2")], cash="9800")
    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(
        client_order_id=client, status="canceled", filled_qty="2", filled_avg_price="100",
        canceled_at=recent(1)))
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert (run.adopted, run.settled, run.mismatches) == (1, 1, [])
    status, filled, _, reason = desk.order_row(client)
    assert (status, filled) == ("cancelled", Decimal(2))
    assert reason == "cancelled at alpaca (found by reconciliation)"
    assert desk.position(account_id) == 2


def test_an_order_cancelled_at_oanda_keeps_oandas_reason(
        desk: Desk, http: responses.RequestsMock) -> None:
    account_id = desk.account("oan-1", cash="100000")
    acc = routed(account_id, "oan-1", OandaBroker(OANDA_CREDS, "practice"))
    client = desk.order("oan-1", symbol="EUR/USD", quantity="2500", price="1.0845",
                        broker_order_id="6390")
    oanda_answers(http)
    http.get(f"{OANDA}/orders/6390", json={"order": {
        "id": "6390", "createTime": recent(10), "type": "LIMIT", "instrument": "EUR_USD",
        "units": "2500", "price": "1.08450", "timeInForce": "GTC",
        "positionFill": "DEFAULT", "triggerCondition": "DEFAULT",
        "partialFill": "DEFAULT_FILL", "state": "CANCELLED",
        "cancellingTransactionID": "6420", "cancelledTime": recent(1),
        "clientExtensions": {"id": client}}, "lastTransactionID": "6420"})
    http.get(f"{OANDA}/transactions/6420", json={"transaction": {
        "id": "6420", "type": "ORDER_CANCEL", "orderID": "6390", "clientOrderID": client,
        "reason": "CLIENT_REQUEST", "time": recent(1), "accountID": OANDA_ACCOUNT,
        "userID": 1435156, "batchID": "6420"}, "lastTransactionID": "6420"})
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert (run.settled, run.mismatches, run.skipped) == (1, [], None)
    assert desk.order_row(client)[::3] == ("cancelled", "CLIENT_REQUEST")


@pytest.mark.parametrize(("balance", "event"), [("100000.0000", False), ("99950.0000", True)])
def test_a_margin_venues_balance_is_compared_with_cash_plus_positions_at_cost(
        desk: Desk, http: responses.RequestsMock, balance: str, event: bool) -> None:
    """Buying 2500 EUR/USD at 1.0845 takes 2711.25 from the ledger's cash; OANDA's balance
    does not move (it is margin): cash + the position at cost is what must agree."""
    account_id = desk.account("oan-1", cash="100000")
    acc = routed(account_id, "oan-1", OandaBroker(OANDA_CREDS, "practice"))
    client = desk.order("oan-1", symbol="EUR/USD", quantity="2500", price="1.0845",
                        broker_order_id="6372")
    desk.conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "client_order_id": client, "broker_fill_id": "6373", "quantity": "2500",
        "price": "1.0845"}),))
    assert desk.one("SELECT cash FROM trading.accounts WHERE account_id = %s",
                    account_id) == Decimal("97288.7500")
    oanda_answers(http, balance=balance, positions=[oanda_long("2500", "1.08450")])
    worker = reconciler(desk, acc, balance_relative_tolerance=Decimal(0))
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert run.skipped is None
    found = desk.events()
    if not event:
        assert found == []
        return
    [(kind, message, details)] = found
    assert kind == "BALANCE_MISMATCH"
    assert (details["broker"], details["ledger"], details["basis"]) == (
        "99950", "100000", "cash + open positions at cost")
    assert message.endswith("; ledger cash + open positions at cost)")


# ---------------------------------------------------------------------- orders gone missing
def test_an_acknowledged_order_unknown_at_the_broker_is_reported_not_rejected(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    _, acc = alpaca
    client = desk.order("alp-1")
    alpaca_answers(http)
    http.get(f"{ALPACA}/orders/{OID}", status=404,
             json={"code": 40410000, "message": "order not found"})
    worker = reconciler(desk, acc, in_flight_timeout=timedelta(0))
    try:
        worker.reconcile_all()
    finally:
        worker.close()
    [(kind, message, details)] = desk.events()
    assert kind == "ORDER_MISSING_AT_BROKER"
    assert message.startswith(f"order {client} (AAPL) is submitted in the ledger but unknown "
                              "at alpaca")
    assert details["broker_order_id"] == OID
    assert desk.order_row(client)[0] == "submitted"


@pytest.mark.parametrize(("timeout", "status"), [(timedelta(0), "rejected"),
                                                 (timedelta(hours=1), "in_flight")])
def test_an_order_that_never_reached_the_broker(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount],
        timeout: timedelta, status: str) -> None:
    """In flight past the timeout and unknown at Alpaca: rejected ORDER_NOT_FOUND; younger
    than the timeout it is the router's (it may be placing it right now)."""
    _, acc = alpaca
    client = desk.order("alp-1", status="in_flight")
    alpaca_answers(http)
    http.get(f"{ALPACA}/orders:by_client_order_id", status=404,
             json={"code": 40410000, "message": "order not found"})
    worker = reconciler(desk, acc, in_flight_timeout=timeout)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    row = desk.order_row(client)
    assert row[0] == status
    if status == "rejected":
        assert row[2] == "ORDER_NOT_FOUND" and row[3] is not None
        assert row[3].startswith("never reached alpaca: unknown there after")
        assert run.settled == 1
    assert desk.events() == []


def test_an_order_that_never_reached_the_broker_whose_cancel_was_asked_is_cancelled(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """In flight past the timeout, unknown at Alpaca, and the trader asked to cancel it
    (trading.request_cancel): cancelled CANCEL_REQUESTED, as the router's gate cancels it.
    Before, it was rejected ORDER_NOT_FOUND, a rejection that counts toward the streak:
    here (a streak of one allowed) it tripped the breaker SOFT and made the account
    advisory."""
    account_id, acc = alpaca
    desk.conn.execute("UPDATE trading.accounts SET max_consecutive_rejections = 1 "
                      "WHERE account_id = %s", (account_id,))
    client = desk.order("alp-1", status="in_flight")
    asked = desk.one("SELECT trading.request_cancel(%s)", client)
    assert asked["status"] == "cancel_requested", asked
    alpaca_answers(http)
    http.get(f"{ALPACA}/orders:by_client_order_id", status=404,
             json={"code": 40410000, "message": "order not found"})
    worker = reconciler(desk, acc, in_flight_timeout=timedelta(0))
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    status, filled, code, reason = desk.order_row(client)
    assert (status, filled, code) == ("cancelled", 0, "CANCEL_REQUESTED")
    assert reason is not None and reason.startswith("CANCEL_REQUESTED: a cancel was requested")
    assert run.settled == 1 and run.mismatches == []
    assert desk.one("SELECT consecutive_rejections FROM trading.accounts WHERE account_id = %s",
                    account_id) == 0
    assert desk.one("SELECT mode::text FROM trading.accounts WHERE account_id = %s",
                    account_id) == "operator"
    assert desk.breaker(account_id) == "OK"
    assert desk.events() == [] and desk.errors() == []


def test_a_cancel_request_does_not_restart_the_in_flight_timeout(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """In flight for ten minutes, unknown at Alpaca; the trader's cancel request just now
    wrote to the row. Before, the timeout counted from that write (updated_at), and the
    order waited another timeout in flight; it counts from when the order went in flight."""
    _, acc = alpaca
    client = desk.order("alp-1", status="in_flight")
    desk.conn.execute("UPDATE trading.orders SET submitted_at = now() - interval '10 minutes'"
                      " WHERE client_order_id = %s", (client,))
    assert desk.one("SELECT trading.request_cancel(%s)", client)["status"] == "cancel_requested"
    alpaca_answers(http)
    http.get(f"{ALPACA}/orders:by_client_order_id", status=404,
             json={"code": 40410000, "message": "order not found"})
    worker = reconciler(desk, acc, in_flight_timeout=timedelta(minutes=5))
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    status, _filled, code, _reason = desk.order_row(client)
    assert (status, code) == ("cancelled", "CANCEL_REQUESTED")
    assert run.settled == 1


# ---------------------------------------------------------------------- (e') per-market fills
BINANCE = "https://api.binance.com/api/v3"
BINANCE_SAPI = "https://api.binance.com/sapi/v1"
BINANCE_CREDS = {"api_key": "test-binance-key-4f1c9a", "secret": "test-binance-secret-77d0e2"}
BINANCE_INFO = Path(__file__).parent / "fixtures" / "ccxt" / "binance_exchange_info.json"


def binance_ms(minutes: float) -> int:
    return int((datetime.now(UTC) - timedelta(minutes=minutes)).timestamp() * 1000)


def binance_account(**balances: str) -> dict[str, Any]:
    """GET /api/v3/account: `balances` are free amounts by asset."""
    return {"makerCommission": 10, "takerCommission": 10, "buyerCommission": 0,
            "sellerCommission": 0, "canTrade": True, "canWithdraw": True, "canDeposit": True,
            "brokered": False, "requireSelfTradePrevention": False, "preventSor": False,
            "updateTime": binance_ms(60), "accountType": "SPOT",
            "balances": [{"asset": a, "free": f, "locked": "0.00000000"}
                         for a, f in balances.items()],
            "permissions": ["SPOT"], "uid": 354937868}


def binance_order(**changes: Any) -> dict[str, Any]:
    """GET /api/v3/order: a BTCUSDT limit buy."""
    order = {"symbol": "BTCUSDT", "orderId": 28457, "orderListId": -1,
             "clientOrderId": "mm7-42", "price": "66800.00000000", "origQty": "0.00100000",
             "executedQty": "0.00000000", "cummulativeQuoteQty": "0.00000000",
             "status": "NEW", "timeInForce": "GTC", "type": "LIMIT", "side": "BUY",
             "stopPrice": "0.00000000", "icebergQty": "0.00000000", "time": binance_ms(5),
             "updateTime": binance_ms(2), "isWorking": True, "workingTime": binance_ms(5),
             "origQuoteOrderQty": "0.00000000", "selfTradePreventionMode": "EXPIRE_MAKER"}
    order.update(changes)
    return order


def binance_trade(trade_id: int, **changes: Any) -> dict[str, Any]:
    """One entry of GET /api/v3/myTrades."""
    trade = {"symbol": "BTCUSDT", "id": trade_id, "orderId": 28457, "orderListId": -1,
             "price": "66780.00000000", "qty": "0.00100000", "quoteQty": "66.78000000",
             "commission": "0.06678000", "commissionAsset": "USDT", "time": binance_ms(2),
             "isBuyer": True, "isMaker": True, "isBestMatch": True}
    trade.update(changes)
    return trade


def binance_answers(http: responses.RequestsMock, *, account: dict[str, Any],
                    trades: dict[str, Any]) -> None:
    """What one reconciliation of a Binance account asks: the markets, the account (for
    positions and balances), the open orders, GET /api/v3/myTrades once per market (each
    answered from `trades`, by Binance market id: a list, or an (HTTP status, error body)
    pair) and the deposit and withdrawal histories."""
    http.get(f"{BINANCE}/exchangeInfo", json=json.loads(BINANCE_INFO.read_text()))
    http.get(f"{BINANCE}/account", json=account)
    http.get(f"{BINANCE}/openOrders", json=[])

    def my_trades(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        symbol = parse_qs(urlsplit(str(request.url)).query)["symbol"][0]
        answer = trades.get(symbol, [])
        if isinstance(answer, tuple):
            return answer[0], {}, json.dumps(answer[1])
        return 200, {}, json.dumps(answer)

    http.add_callback(responses.GET, f"{BINANCE}/myTrades", callback=my_trades)
    http.get(f"{BINANCE_SAPI}/capital/deposit/hisrec", json=[])
    http.get(f"{BINANCE_SAPI}/capital/withdraw/history", json=[])


def trades_asked(http: responses.RequestsMock) -> list[dict[str, str]]:
    return [{k: v[0] for k, v in parse_qs(urlsplit(str(c.request.url)).query).items()}
            for c in http.calls if urlsplit(str(c.request.url)).path.endswith("/myTrades")]


@pytest.fixture
def binance(desk: Desk) -> tuple[int, RoutedAccount]:
    """A Binance spot account in USDT, and the BTC/USDT and ETH/USDT instruments."""
    desk.conn.execute("""
        INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,
                                        price_tick, quantity_step, min_quantity, calendar_id)
        VALUES ('BTC/USDT', 'binance', 'crypto', 'BTC', 'USDT', 0.01, 0.00001, 0.00001,
                'CRYPTO_24X7'),
               ('ETH/USDT', 'binance', 'crypto', 'ETH', 'USDT', 0.01, 0.0001, 0.0001,
                'CRYPTO_24X7')""")
    account_id = desk.account("bin-1", currency="USDT")
    broker = CcxtBroker("binance", dict(BINANCE_CREDS), "live",
                        exchange=ccxt.binance({"enableRateLimit": False}))
    return account_id, routed(account_id, "bin-1", broker)


def test_a_binance_account_is_reconciled_market_by_market(
        desk: Desk, http: responses.RequestsMock, binance: tuple[int, RoutedAccount]) -> None:
    """Binance lists trades per market only (fills_since without a symbol: SYMBOL_REQUIRED):
    each market the account is known to trade is asked in turn — BTC/USDT for the ledger's
    open order, ETH/USDT for the broker's holding. The order the router missed the fill of
    is settled with it, the ETH the ledger lacks is a mismatch, the cash agrees; each
    market's fills have a cursor of their own."""
    account_id, acc = binance
    client = desk.order("bin-1", symbol="BTC/USDT", quantity="0.001", price="66800",
                        broker_order_id="28457")
    binance_answers(http, account=binance_account(BTC="0.00100000", ETH="2.00000000",
                                                  USDT="9933.15322000"),
                    trades={"BTCUSDT": [binance_trade(3001)]})
    http.get(f"{BINANCE}/order", json=binance_order(
        status="FILLED", executedQty="0.00100000", cummulativeQuoteQty="66.78000000"))
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert (run.skipped, run.fills_unread, run.adopted, run.settled) == (None, {}, 1, 1)
    assert desk.order_row(client)[:2] == ("filled", Decimal("0.001"))
    assert desk.position(account_id, "BTC/USDT") == Decimal("0.001")
    assert [(m.kind, m.subject) for m in run.mismatches] == [
        ("POSITION_MISMATCH", "ETH/USDT:2")]
    assert {q["symbol"] for q in trades_asked(http)} == {"BTCUSDT", "ETHUSDT"}
    assert [r[0] for r in desk.conn.execute(
        "SELECT name FROM runtime.cursors WHERE name LIKE 'reconcile:bin-1%%' "
        "ORDER BY name").fetchall()] == [
        "reconcile:bin-1", "reconcile:bin-1:fills:BTC/USDT", "reconcile:bin-1:fills:ETH/USDT"]
    assert worker.state == "running"


def test_a_fill_of_another_market_with_the_same_order_number_is_not_adopted(
        desk: Desk, http: responses.RequestsMock, binance: tuple[int, RoutedAccount]) -> None:
    """Binance numbers orders per market: a manual ETH/USDT fill of order 28457 is not
    MMATS's BTC/USDT order 28457. Before, it was adopted into it: the BTC order filled at
    3,500 and the ledger held BTC bought at the price of ETH."""
    account_id, acc = binance
    client = desk.order("bin-1", symbol="BTC/USDT", quantity="0.001", price="66800",
                        broker_order_id="28457")
    binance_answers(http, account=binance_account(BTC="0", ETH="0.01000000",
                                                  USDT="9965.00000000"),
                    trades={"ETHUSDT": [binance_trade(9001, symbol="ETHUSDT", orderId=28457,
                                                      price="3500.00000000",
                                                      qty="0.01000000",
                                                      quoteQty="35.00000000")]})
    http.get(f"{BINANCE}/order", json=binance_order(status="NEW"))
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert run.adopted == 0
    assert desk.order_row(client)[:2] == ("submitted", Decimal(0))
    assert desk.position(account_id, "BTC/USDT") == Decimal(0)
    assert ("UNKNOWN_BROKER_FILL", "ETHUSDT:9001") in [(m.kind, m.subject)
                                                        for m in run.mismatches]


def test_a_market_seen_again_is_asked_from_its_own_cursor(
        desk: Desk, http: responses.RequestsMock, binance: tuple[int, RoutedAccount]) -> None:
    """A market already read is asked from its cursor minus the overlap; one seen for
    the first time (an order on ETH/USDT placed since) from the first look-back."""
    _, acc = binance
    binance_answers(http, account=binance_account(BTC="0.00100000", USDT="10000"),
                    trades={})
    worker = reconciler(desk, acc)
    try:
        first = worker.reconcile(acc)
        desk.order("bin-1", symbol="ETH/USDT", quantity="1", price="3000",
                   broker_order_id="9001")
        http.replace(responses.GET, f"{BINANCE}/openOrders", json=[binance_order(
            symbol="ETHUSDT", orderId=9001, clientOrderId="x", price="3000.00000000",
            origQty="1.00000000")])
        second = worker.reconcile(acc)
    finally:
        worker.close()
    assert (first.skipped, second.skipped) == (None, None)
    # (Binance answers a day per request: 24 hours back take two windows, sharing a ms)
    asked = [(q["symbol"], int(q["startTime"])) for q in trades_asked(http)]
    first_ms, second_ms = datetime_to_ms(first.started_at), datetime_to_ms(second.started_at)
    day, overlap = 86_400_000, 5 * 60_000
    assert asked == [("BTCUSDT", first_ms - day), ("BTCUSDT", first_ms - 1),  # first round
                     ("BTCUSDT", first_ms - overlap),  # its cursor minus the overlap
                     ("ETHUSDT", second_ms - day), ("ETHUSDT", second_ms - 1)]  # new market


def test_a_market_whose_fills_are_refused_is_reported_once_and_the_rest_compared(
        desk: Desk, http: responses.RequestsMock, binance: tuple[int, RoutedAccount]) -> None:
    """The fill history of one market refused (Binance -1121): reported once, not every
    round; the other markets, the positions and the cash are compared all the same. The
    order whose fills are in the history not read is left for a later round, and that
    market's cursor does not move."""
    _, acc = binance
    client = desk.order("bin-1", symbol="BTC/USDT", quantity="0.001", price="66800",
                        broker_order_id="28457")
    binance_answers(http, account=binance_account(BTC="0.00100000", ETH="2.00000000",
                                                  USDT="9933.15322000"),
                    trades={"BTCUSDT": (400, {"code": -1121, "msg": "Invalid symbol."})})
    http.get(f"{BINANCE}/order", json=binance_order(
        status="FILLED", executedQty="0.00100000", cummulativeQuoteQty="66.78000000"))
    worker = reconciler(desk, acc)
    try:
        runs = [worker.reconcile(acc), worker.reconcile(acc)]
        worker.reconcile_all()
    finally:
        worker.close()
    assert [(r.skipped, list(r.fills_unread), r.adopted, r.settled) for r in runs] == [
        (None, ["BTC/USDT"], 0, 0)] * 2
    assert desk.order_row(client)[:2] == ("submitted", Decimal(0))
    [(kind, message)] = desk.errors()
    assert kind == "UNKNOWN_SYMBOL"
    assert message.startswith("bin-1: the broker refused to list the fills of BTC/USDT")
    mismatches = {m.subject: m for m in runs[0].mismatches}
    assert set(mismatches) == {"BTC/USDT:0.001", "ETH/USDT:2", "USDT"}
    assert mismatches["BTC/USDT:0.001"].details["fills_unread"] is True
    assert "fills_unread" not in mismatches["ETH/USDT:2"].details
    assert "a missed fill may explain it" in mismatches["USDT"].message
    assert {r[0] for r in desk.conn.execute(
        "SELECT name FROM runtime.cursors WHERE name LIKE 'reconcile:bin-1%%'").fetchall()} \
        == {"reconcile:bin-1", "reconcile:bin-1:fills:ETH/USDT"}
    assert worker.state == "degraded"
    assert worker.detail["accounts"]["bin-1"]["fills_unread"] == ["BTC/USDT"]


def test_an_unavailable_fill_history_does_not_stop_the_position_and_cash_checks(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount],
        logs: pytest.LogCaptureFixture) -> None:
    """Alpaca's fill activities failing (HTTP 503): a warning, not an alarm; positions and
    cash are compared, and the account's cursor stays where it was, so the window is asked
    again next round."""
    _, acc = alpaca
    http.get(f"{ALPACA}/positions", json=[alpaca_position("AAPL", "5")])
    http.get(f"{ALPACA}/account", json=alpaca_account("10000"))
    http.get(f"{ALPACA}/orders", json=[])
    http.get(f"{ALPACA}/account/activities/FILL", status=503, body="upstream unavailable")
    http.get(f"{ALPACA}/account/activities", json=[])
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert (run.skipped, list(run.fills_unread)) == (None, [""])
    [mismatch] = run.mismatches
    assert (mismatch.kind, mismatch.details["fills_unread"]) == ("POSITION_MISMATCH", True)
    assert [e[0] for e in desk.events()] == ["POSITION_MISMATCH"]
    assert desk.errors() == []
    assert "fill history unavailable, positions and cash compared without it" in [
        r.getMessage() for r in logs.records if r.levelno == logging.WARNING]
    assert desk.one("SELECT count(*) FROM runtime.cursors WHERE name LIKE 'reconcile:%%'") == 0
    assert worker.state == "degraded"


# ---------------------------------------------------------------------- (f) broker errors
@pytest.mark.parametrize("failure", [
    {"status": 503, "body": "upstream unavailable"},
    {"body": requests.ConnectionError("connection refused")},
    {"status": 429, "body": "Too Many Requests", "headers": {"Retry-After": "3"}},
])
def test_an_unavailable_broker_skips_the_account_and_changes_nothing(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount],
        logs: pytest.LogCaptureFixture, failure: dict[str, Any]) -> None:
    account_id, acc = alpaca
    client = desk.order("alp-1")
    http.get(f"{ALPACA}/positions", **failure)
    worker = reconciler(desk, acc)
    try:
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert run.skipped is not None and run.skipped.startswith("broker unavailable: alpaca: ")
    assert [r.getMessage() for r in logs.records if r.levelno == logging.WARNING] == [
        "broker unavailable, account skipped this round"]
    assert desk.events() == [] and desk.errors() == []
    assert desk.order_row(client)[:2] == ("submitted", Decimal(0))
    assert desk.one("SELECT count(*) FROM trading.fills WHERE account_id = %s", account_id) == 0
    assert desk.one("SELECT count(*) FROM runtime.cursors WHERE name LIKE 'reconcile:%%'") == 0
    assert worker.state == "degraded"
    assert worker.detail["accounts"]["alp-1"]["status"] == "skipped"


def test_refused_credentials_are_reported_once_and_the_account_skipped(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    _, acc = alpaca
    http.get(f"{ALPACA}/positions", status=401,
             json={"code": 40110000, "message": "request is not authorized"})
    worker = reconciler(desk, acc)
    try:
        worker.reconcile_all()
        [run] = worker.reconcile_all()
    finally:
        worker.close()
    assert run.skipped is not None and "request is not authorized" in run.skipped
    [(kind, message)] = desk.errors()
    assert kind == "BROKER_AUTH"
    assert message.startswith("reconciliation of alp-1 skipped: alpaca: positions: request "
                              "is not authorized (HTTP 401")
    assert desk.events() == []


# ---------------------------------------------------------------------- (g) episodes
def test_the_same_mismatch_twice_is_one_event_until_it_comes_back(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    _, acc = alpaca
    extra = alpaca_position("AAPL", "10")
    http.get(f"{ALPACA}/positions", json=[extra])
    http.get(f"{ALPACA}/positions", json=[extra])
    http.get(f"{ALPACA}/positions", json=[])  # resolved
    http.get(f"{ALPACA}/positions", json=[extra])  # and back: a new episode
    http.get(f"{ALPACA}/account", json=alpaca_account("10000"))
    http.get(f"{ALPACA}/orders", json=[])
    http.get(f"{ALPACA}/account/activities/FILL", json=[])
    http.get(f"{ALPACA}/account/activities", json=[])
    worker = reconciler(desk, acc)
    try:
        runs = [worker.reconcile_all()[0] for _ in range(4)]
    finally:
        worker.close()
    assert [len(r.mismatches) for r in runs] == [1, 1, 0, 1]
    assert [len(r.reported) for r in runs] == [1, 0, 0, 1]
    assert len(desk.events("POSITION_MISMATCH")) == 2


def test_a_restarted_reconciler_does_not_report_the_same_mismatch_again(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """The whole worker life (run, start, step, heartbeat, close), twice: the second life
    reads the episode the first one reported back from its heartbeat."""
    _, acc = alpaca
    alpaca_answers(http, positions=[alpaca_position("AAPL", "10")])
    for _ in range(2):
        worker = Reconciler(desk.url, {acc.account_id: acc}, heartbeat_seconds=0.0)
        worker.run(until=lambda: True)
    assert len(desk.events("POSITION_MISMATCH")) == 1
    state, detail = desk.conn.execute(
        "SELECT state, detail FROM runtime.workers WHERE name = 'reconciler'").fetchone() \
        or (None, None)
    assert state == "stopped"
    entry = detail["accounts"]["alp-1"]
    assert entry["open"] == ["POSITION_MISMATCH:AAPL:10"]
    assert (entry["status"], entry["mismatches"], entry["reported"]) == ("ok", 1, 0)


def test_confirm_runs_waits_for_a_difference_to_persist(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    _, acc = alpaca
    alpaca_answers(http, positions=[alpaca_position("AAPL", "10")])
    worker = reconciler(desk, acc, confirm_runs=2)
    try:
        worker.reconcile_all()
        assert desk.events() == []
        worker.reconcile_all()
    finally:
        worker.close()
    assert len(desk.events("POSITION_MISMATCH")) == 1


def test_a_fill_the_router_applies_during_the_round_is_no_mismatch_and_no_freeze(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """The router applies a fill while the reconciler is between the broker's positions and
    cash (read before the fill) and the ledger's (read after): the two views are of
    different moments, not a disagreement. It was POSITION_MISMATCH and BALANCE_MISMATCH
    and, with freeze_on_mismatch, a FREEZE of the account, although broker and ledger
    agree in the next round."""
    account_id, _ = alpaca
    acc = routed(account_id, "alp-1", AlpacaBroker(ALPACA_CREDS, "paper"), freeze=True)
    client = desk.order("alp-1")  # buy 5 AAPL at 100, submitted
    fill = alpaca_fill(1, qty="5")

    def open_orders_while_the_router_applies_the_fill(
            _request: Any) -> tuple[int, dict[str, str], str]:
        if desk.order_row(client)[0] != "filled":  # the router, concurrently
            desk.conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
                "client_order_id": client, "broker_fill_id": fill["id"], "quantity": "5",
                "price": "100", "commission": "0", "ts": fill["transaction_time"]}),))
        return 200, {}, "[]"

    # the first round's answers were given just before the fill, the second's after it
    http.get(f"{ALPACA}/positions", json=[])
    http.get(f"{ALPACA}/positions", json=[alpaca_position("AAPL", "5")])
    http.get(f"{ALPACA}/account", json=alpaca_account("10000"))
    http.get(f"{ALPACA}/account", json=alpaca_account("9500"))
    http.add_callback(responses.GET, f"{ALPACA}/orders",
                      callback=open_orders_while_the_router_applies_the_fill)
    http.get(f"{ALPACA}/account/activities/FILL", json=[fill])
    http.get(f"{ALPACA}/account/activities", json=[])
    worker = reconciler(desk, acc)
    try:
        runs = [worker.reconcile_all()[0] for _ in range(2)]
    finally:
        worker.close()
    assert [(r.adopted, r.mismatches, r.skipped) for r in runs] == [(0, [], None)] * 2
    assert desk.position(account_id) == 5
    assert desk.events() == []
    assert desk.breaker(account_id) == "OK"


# ---------------------------------------------------------------------- scope and grants
def test_paper_accounts_are_not_reconciled(desk: Desk, http: responses.RequestsMock) -> None:
    account_id = desk.account("paper-1")
    acc = RoutedAccount(account_id, AccountConfig(name="paper-1", environment="paper"),
                        PaperBroker(account_id, "paper-1", PaperCosts()))
    worker = reconciler(desk, acc)
    try:
        assert worker.reconcile_all() == []
    finally:
        worker.close()
    assert len(http.calls) == 0


def test_without_the_risk_grant_a_mismatch_is_still_recorded_as_an_error(
        desk: Desk, http: responses.RequestsMock, alpaca: tuple[int, RoutedAccount]) -> None:
    """mmats_router may execute risk.report_mismatch, but without USAGE on the risk schema
    it cannot reach it: the mismatch then lands in runtime.errors, saying what is lost."""
    account_id, _ = alpaca
    acc = routed(account_id, "alp-1", AlpacaBroker(ALPACA_CREDS, "paper"), freeze=True)
    desk.conn.execute("REVOKE USAGE ON SCHEMA risk FROM mmats_router")
    alpaca_answers(http, positions=[alpaca_position("AAPL", "10")])
    worker = reconciler(desk, acc)
    try:
        worker.reconcile_all()
    finally:
        worker.close()
    assert desk.events() == []
    [(kind, message)] = desk.errors()
    assert kind == "POSITION_MISMATCH"
    assert "NOT recorded as a risk event, account NOT frozen: permission denied for schema " \
        "risk" in message
    assert desk.breaker(account_id) == "OK"
