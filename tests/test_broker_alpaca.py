"""AlpacaBroker at the HTTP level: `responses` answers with Alpaca's documented JSON.

Nothing of the adapter or of alpaca-py is mocked; an unregistered URL fails the request
(responses raises ConnectionError), so every test also proves which host was called.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from alpaca.trading.client import TradingClient

from workers.brokers.alpaca_broker import AlpacaBroker, fills_from_snapshots
from workers.brokers.base import Balance, Broker, BrokerPosition, CashMovement, OrderRequest
from workers.brokers.errors import (
    BackOff,
    EnvironmentMismatch,
    OrderNotFound,
    Reject,
    Retry,
    Stop,
)
from workers.runtime.log import redact

PAPER = "https://paper-api.alpaca.markets/v2"
LIVE = "https://api.alpaca.markets/v2"
KEY, SECRET = "PKTEST4MMATS0001", "paper-secret-for-tests-0001"
LIVE_KEY = "AKTEST4MMATS0001"
CREDS = {"api_key": KEY, "secret_key": SECRET}
OID = "61e69015-8549-4bfd-b9c3-01e75843f47d"
OTHER_OID = "904837e3-3b76-47ec-b432-046db621571b"


def order_json(**changes: Any) -> dict[str, Any]:
    """An Alpaca order object as GET/POST /v2/orders return it."""
    order: dict[str, Any] = {
        "id": OID, "client_order_id": "mmats-42",
        "created_at": "2024-03-01T15:00:00.123456Z", "updated_at": "2024-03-01T15:00:00.2Z",
        "submitted_at": "2024-03-01T15:00:00.120001Z", "filled_at": None,
        "expired_at": None, "canceled_at": None, "failed_at": None, "replaced_at": None,
        "replaced_by": None, "replaces": None,
        "asset_id": "b0b6dd9d-8b9b-48a9-ba46-b9d54906e415", "symbol": "AAPL",
        "asset_class": "us_equity", "notional": None, "qty": "10", "filled_qty": "0",
        "filled_avg_price": None, "order_class": "simple", "order_type": "market",
        "type": "market", "side": "buy", "position_intent": "buy_to_open",
        "time_in_force": "day", "limit_price": None, "stop_price": None,
        "status": "accepted", "extended_hours": False, "legs": None, "trail_percent": None,
        "trail_price": None, "hwm": None,
    }
    order.update(changes)
    return order


def activity_json(n: int, *, qty: str = "1", cum_qty: str = "1", leaves_qty: str = "0",
                  price: str = "187.15", order_id: str = OID, symbol: str = "AAPL",
                  ts: str = "2024-03-01T15:00:01.5Z", kind: str = "fill") -> dict[str, Any]:
    """A FILL account activity as GET /v2/account/activities/FILL returns it."""
    return {"id": f"20240301150001{n:03d}::8efc7b9a-8b2b-4000-9955-{n:012d}",
            "activity_type": "FILL", "transaction_time": ts, "type": kind, "price": price,
            "qty": qty, "side": "buy", "symbol": symbol, "leaves_qty": leaves_qty,
            "order_id": order_id, "cum_qty": cum_qty,
            "order_status": "filled" if leaves_qty == "0" else "partially_filled"}


def error(status: int, code: int | None, message: str) -> dict[str, Any]:
    body: dict[str, Any] = {"message": message}
    if code is not None:
        body["code"] = code
    return {"status": status, "json": body}


@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def broker() -> AlpacaBroker:
    return AlpacaBroker(CREDS, "paper")


def market(**changes: Any) -> OrderRequest:
    fields: dict[str, Any] = {"client_order_id": "mmats-42", "symbol": "AAPL", "side": "buy",
                              "quantity": Decimal("10"), "time_in_force": "DAY"}
    fields.update(changes)
    return OrderRequest(**fields)


def sent_json(call: Any) -> dict[str, Any]:
    return dict(json.loads(call.request.body))


def query(call: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(call.request.url).query)


# ------------------------------------------------------------------ construction

def test_is_a_broker_and_registers_its_secrets(broker: AlpacaBroker) -> None:
    assert isinstance(broker, Broker)
    assert (broker.venue, broker.endpoint) == ("alpaca", "paper")
    assert redact(f"key={KEY} secret={SECRET}") == "key=*** secret=***"


@pytest.mark.parametrize(("endpoint", "key", "base"), [("paper", KEY, PAPER),
                                                        ("live", LIVE_KEY, LIVE)])
def test_paper_and_live_reach_their_own_base_url(http: responses.RequestsMock, endpoint: Any,
                                                 key: str, base: str) -> None:
    http.get(f"{base}/account", json={"id": "1d9eed04-be39-4e01-9b84-a48ac5bbafcf",
                                      "account_number": "PA123", "status": "ACTIVE",
                                      "currency": "USD", "cash": "1", "buying_power": "2"})
    broker = AlpacaBroker({"api_key": key, "secret_key": SECRET}, endpoint)
    broker.balances()
    assert broker.endpoint_url == base.removesuffix("/v2")
    request = http.calls[0].request
    assert request.url == f"{base}/account"
    assert request.headers["APCA-API-KEY-ID"] == key
    assert request.headers["APCA-API-SECRET-KEY"] == SECRET
    assert getattr(request, "req_kwargs", {})["timeout"] == 10.0  # alpaca-py sets none


def test_no_testnet_at_alpaca() -> None:
    with pytest.raises(EnvironmentMismatch, match="alpaca: no 'testnet' endpoint"):
        AlpacaBroker(CREDS, "testnet")  # type: ignore[arg-type]


@pytest.mark.parametrize(("key", "endpoint"), [(KEY, "live"), (LIVE_KEY, "paper")])
def test_a_key_of_the_other_environment_is_refused(key: str, endpoint: Any) -> None:
    with pytest.raises(EnvironmentMismatch, match=f"cannot trade on the {endpoint} endpoint"):
        AlpacaBroker({"api_key": key, "secret_key": SECRET}, endpoint)


def test_an_injected_client_must_point_at_the_accounts_endpoint() -> None:
    paper_client = TradingClient("CKNEUTRAL0001", SECRET, paper=True, raw_data=True)
    with pytest.raises(EnvironmentMismatch, match="live account's client points at "
                                                  "https://paper-api"):
        AlpacaBroker({"api_key": "CKNEUTRAL0001", "secret_key": SECRET}, "live",
                     client=paper_client)


def test_an_injected_client_with_a_proxy_url_is_used(http: responses.RequestsMock) -> None:
    client = TradingClient(KEY, SECRET, raw_data=True, url_override="https://alpaca.proxy.test")
    http.get("https://alpaca.proxy.test/v2/positions", json=[])
    broker = AlpacaBroker(CREDS, "paper", client=client)
    assert broker.positions() == []
    assert broker.endpoint_url == "https://alpaca.proxy.test"


def test_missing_credentials_stop() -> None:
    with pytest.raises(Stop, match="alpaca: credentials need") as caught:
        AlpacaBroker({"api_key": KEY}, "paper")
    assert caught.value.code == "MISSING_CREDENTIALS"


# ------------------------------------------------------------------ placing orders

def test_market_order_posts_alpacas_json_with_string_quantity(
        http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    http.post(f"{PAPER}/orders", json=order_json(status="pending_new"))
    placed = broker.place_order(market())
    assert sent_json(http.calls[0]) == {"symbol": "AAPL", "qty": "10", "side": "buy",
                                        "type": "market", "time_in_force": "day",
                                        "client_order_id": "mmats-42"}
    assert placed.broker_order_id == OID
    assert placed.client_order_id == "mmats-42"
    assert (placed.status, placed.quantity, placed.filled_quantity) == (
        "submitted", Decimal("10"), Decimal("0"))
    assert placed.average_price is None


@pytest.mark.parametrize(("changes", "expected"), [
    ({"order_type": "limit", "limit_price": Decimal("187.25"), "time_in_force": "GTC"},
     {"type": "limit", "limit_price": "187.25", "time_in_force": "gtc"}),
    ({"order_type": "stop", "stop_price": Decimal("180.5"), "time_in_force": "ioc"},
     {"type": "stop", "stop_price": "180.5", "time_in_force": "ioc"}),
    ({"order_type": "stop_limit", "stop_price": Decimal("180"), "limit_price": Decimal("179.9"),
      "time_in_force": "FOK", "side": "sell"},
     {"type": "stop_limit", "stop_price": "180", "limit_price": "179.9",
      "time_in_force": "fok", "side": "sell"}),
    ({"quantity": Decimal("0.123456789"), "time_in_force": "day"},
     {"qty": "0.123456789", "type": "market"}),
    # Alpaca refuses a sub-penny price from $1 ("sub-penny increment does not fulfill
    # minimum pricing criteria"): a limit is never made worse, a stop goes to the nearest
    ({"order_type": "limit", "limit_price": Decimal("187.455")}, {"limit_price": "187.45"}),
    ({"order_type": "limit", "limit_price": Decimal("187.451"), "side": "sell"},
     {"limit_price": "187.46"}),
    ({"order_type": "stop", "stop_price": Decimal("180.125"), "side": "sell"},
     {"stop_price": "180.13"}),
    ({"order_type": "stop_limit", "stop_price": Decimal("180.1249"),
      "limit_price": Decimal("180.0999"), "side": "sell"},
     {"stop_price": "180.12", "limit_price": "180.10"}),
    # below $1 the tick is $0.0001; a sell rounded up to $1 goes out in cents
    ({"order_type": "limit", "limit_price": Decimal("0.123456")}, {"limit_price": "0.1234"}),
    ({"order_type": "limit", "limit_price": Decimal("0.99995"), "side": "sell"},
     {"limit_price": "1.00"}),
])
def test_order_types_and_time_in_force_reach_alpaca(
        http: responses.RequestsMock, broker: AlpacaBroker, changes: dict[str, Any],
        expected: dict[str, str]) -> None:
    http.post(f"{PAPER}/orders", json=order_json())
    broker.place_order(market(**changes))
    body = sent_json(http.calls[0])
    assert {k: body[k] for k in expected} == expected
    assert body["client_order_id"] == "mmats-42"
    unused = {"limit_price", "stop_price"} - set(expected)
    assert not unused & set(body), "a price the order type does not use was sent"


@pytest.mark.parametrize(("changes", "problem"), [
    ({"order_type": "limit", "limit_price": Decimal("0.00001")},
     "limit_price 0.00001 is below the tick 0.0001"),
    ({"order_type": "limit"}, "a limit order needs a positive limit_price"),
    ({"order_type": "stop_limit", "stop_price": Decimal("1")}, "needs a positive limit_price"),
    ({"quantity": Decimal("0")}, "quantity must be positive"),
    ({"time_in_force": "GTD"}, "time in force 'GTD' is not one of"),
])
def test_an_impossible_order_is_rejected_before_sending(
        http: responses.RequestsMock, broker: AlpacaBroker, changes: dict[str, Any],
        problem: str) -> None:
    with pytest.raises(Reject, match=problem) as caught:
        broker.place_order(market(**changes))
    assert caught.value.code == "INVALID_ORDER"
    assert "AAPL" in str(caught.value)
    assert len(http.calls) == 0


def test_a_resent_client_order_id_returns_the_existing_order(
        http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    http.post(f"{PAPER}/orders", **error(422, 40010001, "client_order_id must be unique"))
    http.get(f"{PAPER}/orders:by_client_order_id",
             json=order_json(status="partially_filled", filled_qty="4",
                             filled_avg_price="187.1"))
    found = broker.place_order(market())
    assert len(http.calls) == 2
    assert query(http.calls[1]) == {"client_order_id": ["mmats-42"]}
    assert found.broker_order_id == OID
    assert (found.status, found.filled_quantity, found.average_price) == (
        "partially_filled", Decimal("4"), Decimal("187.1"))


def test_a_client_order_id_naming_another_order_is_a_conflict(
        http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    http.post(f"{PAPER}/orders", **error(422, 40010001, "client_order_id must be unique"))
    http.get(f"{PAPER}/orders:by_client_order_id", json=order_json(qty="5", side="sell"))
    with pytest.raises(Reject, match="already names sell 5 AAPL") as caught:
        broker.place_order(market())
    assert caught.value.code == "CLIENT_ORDER_ID_CONFLICT"


@pytest.mark.parametrize(("status", "body", "code"), [
    (403, {"code": 40310000, "message": "insufficient buying power"}, "INSUFFICIENT_FUNDS"),
    (403, {"available": "0", "code": 40310000, "existing_qty": "0", "held_for_orders": "0",
           "message": "insufficient qty available for order (requested: 10, available: 0)",
           "symbol": "AAPL"}, "INSUFFICIENT_QUANTITY"),
    (422, {"code": 40010001, "message": "qty must be > 0"}, "INVALID_ORDER"),
    (422, {"code": 42210000, "message": "asset \"AAPL\" cannot be sold short"},
     "NOT_SHORTABLE"),
])
def test_refusals_reject_with_a_code_and_alpacas_message(
        http: responses.RequestsMock, broker: AlpacaBroker, status: int, body: dict[str, Any],
        code: str) -> None:
    http.post(f"{PAPER}/orders", status=status, json=body)
    with pytest.raises(Reject) as caught:
        broker.place_order(market())
    assert caught.value.code == code
    text = str(caught.value)
    assert text.startswith("alpaca: market order mmats-42 buy 10 AAPL: ")
    assert body["message"] in text and f"HTTP {status}" in text
    assert "\n" not in text


# ------------------------------------------------------------------ transient and fatal errors

def test_rate_limit_backs_off_with_retry_after_and_no_hidden_retry(
        http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    http.post(f"{PAPER}/orders", status=429, headers={"Retry-After": "7"},
              json={"code": 42910000, "message": "rate limit exceeded"})
    with pytest.raises(BackOff, match="rate limit exceeded") as caught:
        broker.place_order(market())
    assert caught.value.retry_after == 7.0
    assert len(http.calls) == 1  # alpaca-py would have slept 3 s and sent it again


def test_rate_limit_without_retry_after_uses_alpacas_reset_time(
        http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    reset = int(time.time()) + 60
    http.get(f"{PAPER}/positions", status=429, body="Too Many Requests",
             headers={"X-RateLimit-Limit": "200", "X-RateLimit-Remaining": "0",
                      "X-RateLimit-Reset": str(reset)})
    with pytest.raises(BackOff, match="positions: Too Many Requests") as caught:
        broker.positions()
    assert caught.value.retry_after is not None and 50 < caught.value.retry_after <= 60


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_retry_once_each(http: responses.RequestsMock, broker: AlpacaBroker,
                                       status: int) -> None:
    http.get(f"{PAPER}/account", status=status, body="upstream unavailable")
    with pytest.raises(Retry) as caught:
        broker.balances()
    assert not isinstance(caught.value, BackOff)
    assert f"HTTP {status}" in str(caught.value)
    assert len(http.calls) == 1


@pytest.mark.parametrize("failure", [requests.ConnectionError("connection refused"),
                                     requests.ReadTimeout("read timed out")])
def test_network_failures_retry(http: responses.RequestsMock, broker: AlpacaBroker,
                                failure: Exception) -> None:
    http.post(f"{PAPER}/orders", body=failure)
    with pytest.raises(Retry, match=f"AAPL: {type(failure).__name__}") as caught:
        broker.place_order(market())
    assert caught.value.code == "BROKER_UNAVAILABLE"


@pytest.mark.parametrize(("status", "body"), [
    (401, {"code": 40110000, "message": "request is not authorized"}),
    (403, {"message": "forbidden."}),
])
def test_authentication_failures_stop(http: responses.RequestsMock, broker: AlpacaBroker,
                                      status: int, body: dict[str, Any]) -> None:
    http.post(f"{PAPER}/orders", status=status, json=body)
    with pytest.raises(Stop, match=body["message"]) as caught:
        broker.place_order(market())
    assert caught.value.code == "BROKER_AUTH"


# ------------------------------------------------------------------ order status, cancel

def test_unknown_order_is_order_not_found(http: responses.RequestsMock,
                                          broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/orders/{OID}", **error(404, 40410000, "order not found"))
    with pytest.raises(OrderNotFound, match=f"AAPL {OID}: order not found"):
        broker.order_status(broker_order_id=OID, symbol="AAPL")


def test_a_non_uuid_order_id_is_not_found_without_asking(
        http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    with pytest.raises(OrderNotFound, match="not an Alpaca order id"):
        broker.order_status(broker_order_id="12345")
    assert len(http.calls) == 0


def test_status_by_client_order_id(http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/orders:by_client_order_id", json=order_json(status="new"))
    order = broker.order_status(client_order_id="mmats-42")
    assert query(http.calls[0]) == {"client_order_id": ["mmats-42"]}
    assert (order.broker_order_id, order.status) == (OID, "submitted")


@pytest.mark.parametrize(("alpaca", "filled", "expected"), [
    ("new", "0", "submitted"), ("pending_new", "0", "submitted"),
    ("partially_filled", "3", "partially_filled"), ("filled", "10", "filled"),
    ("canceled", "4", "cancelled"), ("expired", "0", "expired"),
    ("rejected", "0", "rejected"), ("pending_cancel", "2", "partially_filled"),
    ("done_for_day", "0", "submitted"), ("replaced", "0", "cancelled"),
    ("a_status_alpaca_adds_later", "0", "submitted"),
])
def test_alpaca_statuses_map_to_mmats_statuses(http: responses.RequestsMock,
                                               broker: AlpacaBroker, alpaca: str, filled: str,
                                               expected: str) -> None:
    http.get(f"{PAPER}/orders/{OID}",
             json=order_json(status=alpaca, filled_qty=filled,
                             filled_avg_price="187.5" if filled != "0" else None,
                             replaced_by=OTHER_OID if alpaca == "replaced" else None))
    order = broker.order_status(broker_order_id=OID)
    assert order.status == expected
    assert order.filled_quantity == Decimal(filled)
    if alpaca == "replaced":
        assert order.reason == f"replaced by order {OTHER_OID}"


def test_cancel_reports_the_order_after_the_request(http: responses.RequestsMock,
                                                    broker: AlpacaBroker) -> None:
    http.delete(f"{PAPER}/orders/{OID}", status=204)
    http.get(f"{PAPER}/orders/{OID}", json=order_json(status="canceled", filled_qty="2",
                                                      filled_avg_price="187"))
    order = broker.cancel_order(OID, "AAPL")
    assert [c.request.method for c in http.calls] == ["DELETE", "GET"]
    assert (order.status, order.filled_quantity) == ("cancelled", Decimal("2"))


@pytest.mark.parametrize(("alpaca", "filled", "expected"), [
    ("filled", "10", "filled"), ("canceled", "4", "cancelled"), ("expired", "0", "expired"),
    ("rejected", "0", "rejected"), ("pending_cancel", "4", "partially_filled"),
    ("done_for_day", "4", "partially_filled"),
])
def test_cancelling_a_finished_order_reports_it_as_it_is(
        http: responses.RequestsMock, broker: AlpacaBroker, alpaca: str, filled: str,
        expected: str) -> None:
    """Alpaca refuses DELETE /v2/orders/{id} of a finished order with HTTP 422
    {"code": 42210000, "message": "order is already in \"filled\" state"}: the order is
    read again and reported in its state, not as an error."""
    http.delete(f"{PAPER}/orders/{OID}",
                **error(422, 42210000, f'order is already in "{alpaca}" state'))
    http.get(f"{PAPER}/orders/{OID}", json=order_json(
        status=alpaca, filled_qty=filled, filled_avg_price="187.2" if filled != "0" else None))
    order = broker.cancel_order(OID, "AAPL")
    assert [c.request.method for c in http.calls] == ["DELETE", "GET"]
    assert (order.status, order.filled_quantity) == (expected, Decimal(filled))


def test_a_refused_cancel_of_a_live_order_is_a_reject(http: responses.RequestsMock,
                                                      broker: AlpacaBroker) -> None:
    """The same 422 code for an order still working (here: being replaced) is no report of
    a finished order: the refusal is raised."""
    http.delete(f"{PAPER}/orders/{OID}",
                **error(422, 42210000, 'order is already in "pending_replace" state'))
    http.get(f"{PAPER}/orders/{OID}", json=order_json(status="pending_replace"))
    with pytest.raises(Reject, match=r"order is already in .pending_replace. state") as caught:
        broker.cancel_order(OID, "AAPL")
    assert caught.value.code == "ORDER_NOT_CANCELABLE"


def test_cancelling_an_unknown_order_is_order_not_found(http: responses.RequestsMock,
                                                        broker: AlpacaBroker) -> None:
    http.delete(f"{PAPER}/orders/{OID}", **error(404, 40410000, "order not found"))
    with pytest.raises(OrderNotFound, match=f"cancel AAPL order {OID}: order not found"):
        broker.cancel_order(OID, "AAPL")


def test_open_orders_asks_for_open_ones_of_the_symbol(http: responses.RequestsMock,
                                                      broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/orders", json=[
        order_json(), order_json(id=OTHER_OID, client_order_id="mmats-43", side="sell",
                                 type="limit", order_type="limit", limit_price="190",
                                 status="partially_filled", filled_qty="1",
                                 filled_avg_price="190")])
    orders = broker.open_orders("AAPL")
    assert query(http.calls[0]) == {"status": ["open"], "limit": ["500"], "symbols": ["AAPL"]}
    assert [(o.client_order_id, o.side, o.status) for o in orders] == [
        ("mmats-42", "buy", "submitted"), ("mmats-43", "sell", "partially_filled")]


# ------------------------------------------------------------------ fills: the cumulative quirk

def test_successive_order_snapshots_give_per_fill_deltas(http: responses.RequestsMock,
                                                         broker: AlpacaBroker) -> None:
    """Alpaca reports filled_qty 10, 30, 100 cumulatively: the fills are 10, 20 and 70,
    each priced from the change in filled_qty * filled_avg_price."""
    snapshots = [
        order_json(qty="100", status="partially_filled", filled_qty="10",
                   filled_avg_price="100.00", updated_at="2024-03-01T15:00:01Z"),
        order_json(qty="100", status="partially_filled", filled_qty="30",
                   filled_avg_price="100.20", updated_at="2024-03-01T15:00:02Z"),
        order_json(qty="100", status="filled", filled_qty="100", filled_avg_price="100.48",
                   updated_at="2024-03-01T15:00:03.5Z", filled_at="2024-03-01T15:00:03Z"),
    ]
    for snapshot in snapshots:
        http.get(f"{PAPER}/orders/{OID}", json=snapshot)
    seen = [broker.order_status(broker_order_id=OID).raw for _ in snapshots]
    fills = fills_from_snapshots([*seen, seen[1]])  # a late, repeated snapshot adds nothing
    assert [f.quantity for f in fills] == [Decimal("10"), Decimal("20"), Decimal("70")]
    assert [f.price for f in fills] == [Decimal("100.00"), Decimal("100.30"),
                                        Decimal("100.60")]
    assert [f.fill_id for f in fills] == [f"{OID}:10", f"{OID}:30", f"{OID}:100"]
    assert sum(f.quantity * f.price for f in fills) == Decimal("100") * Decimal("100.48")
    assert fills[2].ts == datetime(2024, 3, 1, 15, 0, 3, tzinfo=UTC)
    assert {(f.symbol, f.side, f.client_order_id) for f in fills} == {("AAPL", "buy",
                                                                       "mmats-42")}


def test_snapshot_fills_start_from_what_is_already_known() -> None:
    later = order_json(filled_qty="100", filled_avg_price="100.48", status="filled")
    fills = fills_from_snapshots([later], known={OID: (Decimal("30"), Decimal("100.20"))})
    assert [(f.fill_id, f.quantity, f.price) for f in fills] == [
        (f"{OID}:100", Decimal("70"), Decimal("100.60"))]


def test_fill_activities_give_each_executions_own_quantity(http: responses.RequestsMock,
                                                           broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/account/activities/FILL", json=[
        activity_json(1, qty="10", cum_qty="10", leaves_qty="90", price="100.00",
                      kind="partial_fill", ts="2024-03-01T15:00:01Z"),
        activity_json(2, qty="20", cum_qty="30", leaves_qty="70", price="100.30",
                      kind="partial_fill", ts="2024-03-01T15:00:02Z"),
        activity_json(3, qty="70", cum_qty="100", leaves_qty="0", price="100.60",
                      ts="2024-03-01T15:00:03.123456789Z"),
    ])
    fills = broker.fills_since(datetime(2024, 3, 1, 15, 0, tzinfo=UTC))
    assert query(http.calls[0]) == {"after": ["2024-03-01T14:59:59Z"], "direction": ["asc"],
                                    "page_size": ["100"]}
    assert [f.quantity for f in fills] == [Decimal("10"), Decimal("20"), Decimal("70")]
    assert [f.price for f in fills] == [Decimal("100.00"), Decimal("100.30"), Decimal("100.60")]
    assert fills[0].fill_id == "20240301150001001::8efc7b9a-8b2b-4000-9955-000000000001"
    assert {f.broker_order_id for f in fills} == {OID}
    assert fills[2].ts == datetime(2024, 3, 1, 15, 0, 3, 123456, tzinfo=UTC)
    assert (fills[0].commission, fills[0].commission_currency) == (Decimal(0), "USD")


def test_fill_activities_are_paged_by_the_last_id(http: responses.RequestsMock,
                                                  broker: AlpacaBroker) -> None:
    first = [activity_json(n) for n in range(100)]
    http.get(f"{PAPER}/account/activities/FILL", json=first)
    http.get(f"{PAPER}/account/activities/FILL", json=[activity_json(100)])
    fills = broker.fills_since(datetime(2024, 3, 1, 15, 0, tzinfo=UTC))
    assert len(fills) == 101
    assert "page_token" not in query(http.calls[0])
    assert query(http.calls[1])["page_token"] == [first[-1]["id"]]
    assert len({f.fill_id for f in fills}) == 101


def test_fills_since_keeps_the_symbol_and_drops_earlier_ones(http: responses.RequestsMock,
                                                             broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/account/activities/FILL", json=[
        activity_json(1, ts="2024-03-01T15:00:00.5Z"),  # asked a second early, then dropped
        activity_json(2, ts="2024-03-01T15:00:02Z", symbol="MSFT", order_id=OTHER_OID),
        activity_json(3, ts="2024-03-01T15:00:03Z"),
    ])
    fills = broker.fills_since(datetime(2024, 3, 1, 15, 0, 1, tzinfo=UTC), symbol="AAPL")
    assert [f.fill_id[-2:] for f in fills] == ["03"]


# ------------------------------------------------------------------ cash outside fills

CASH_TYPES = ["FEE", "PTC", "DIV", "DIVCGL", "DIVCGS", "DIVNRA", "DIVROC", "DIVTXEX", "DIVTW",
              "INT", "INTNRA", "INTTW", "CSD", "CSW", "JNLC"]
SINCE = datetime(2024, 3, 1, 15, 0, tzinfo=UTC)


def nta_json(n: int, activity_type: str = "FEE", net_amount: Any = "-0.02", *,
             day: str = "2024-03-01", **changes: Any) -> dict[str, Any]:
    """A non-trade activity as GET /v2/account/activities returns it."""
    activity: dict[str, Any] = {
        "id": f"20240301000000{n:03d}::6e4bb2a1-0c5e-4a3f-9d7e-{n:012d}",
        "activity_type": activity_type, "date": day, "net_amount": net_amount,
        "description": "", "status": "executed", "symbol": None, "qty": None,
        "per_share_amount": None}
    activity.update(changes)
    return activity


def test_cash_movements_ask_for_the_cash_types_in_one_paged_request(
        http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    first = [nta_json(n, "FEE", "-0.01") for n in range(100)]
    http.get(f"{PAPER}/account/activities", json=first)
    http.get(f"{PAPER}/account/activities", json=[nta_json(100, "DIV", "1.02", day="2024-03-02",
                                                           symbol="T")])
    movements = broker.cash_movements_since(SINCE)
    asked = query(http.calls[0])
    assert asked.pop("activity_types")[0].split(",") == CASH_TYPES
    assert asked == {"after": ["2024-03-01T14:59:59Z"], "direction": ["asc"],
                     "page_size": ["100"]}
    second = query(http.calls[1])
    assert second["page_token"] == [first[-1]["id"]]
    assert second["activity_types"][0].split(",") == CASH_TYPES
    assert (second["after"], second["direction"]) == (["2024-03-01T14:59:59Z"], ["asc"])
    assert len(movements) == 101
    assert len({m.movement_id for m in movements}) == 101
    assert movements[0].movement_id == first[0]["id"]
    assert (movements[-1].kind, movements[-1].amount, movements[-1].symbol) == (
        "dividend", Decimal("1.02"), "T")
    assert sum(m.amount for m in movements) == Decimal("0.02")  # 100 x -0.01 + 1.02, exactly


def test_cash_activity_types_map_to_kinds_with_exact_signed_amounts(
        http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    long_text = "Cash dividend " + "x" * 300
    http.get(f"{PAPER}/account/activities", json=[
        nta_json(1, "FEE", "-0.02", description="REG/TAF fee", symbol="AAPL"),
        nta_json(2, "PTC", "-0.0031", description="pass-through charge"),
        nta_json(3, "DIV", "1.020", symbol="T", qty="2", per_share_amount="0.51",
                 description=long_text),
        nta_json(4, "DIVTW", "-0.15", symbol="T", description="dividend tax withheld"),
        nta_json(5, "DIVROC", "0.3", symbol="O"),
        nta_json(6, "INT", "0.87"),
        nta_json(7, "INTTW", "-0.09"),
        nta_json(8, "CSD", "10000"),
        nta_json(9, "CSW", "-2500.5"),
        nta_json(10, "JNLC", "125.00", description="cash journal in"),
        nta_json(11, "JNLC", "-40", description="cash journal out"),
        nta_json(12, "DIVNRA", 0.5, status="correct"),  # a JSON number, its literal kept
    ])
    movements = broker.cash_movements_since(SINCE)
    assert [(m.kind, m.amount) for m in movements] == [
        ("fee", Decimal("-0.02")), ("fee", Decimal("-0.0031")),
        ("dividend", Decimal("1.020")), ("dividend", Decimal("-0.15")),
        ("dividend", Decimal("0.3")), ("interest", Decimal("0.87")),
        ("interest", Decimal("-0.09")), ("deposit", Decimal("10000")),
        ("withdrawal", Decimal("-2500.5")), ("deposit", Decimal("125.00")),
        ("withdrawal", Decimal("-40")), ("dividend", Decimal("0.5"))]
    assert all(type(m.amount) is Decimal for m in movements)
    assert movements[0] == CashMovement(
        movement_id="20240301000000001::6e4bb2a1-0c5e-4a3f-9d7e-000000000001", kind="fee",
        amount=Decimal("-0.02"), currency="USD", ts=datetime(2024, 3, 1, tzinfo=UTC),
        symbol="AAPL", description="REG/TAF fee")
    assert {m.currency for m in movements} == {"USD"}
    assert {m.ts for m in movements} == {datetime(2024, 3, 1, tzinfo=UTC)}
    assert movements[2].description == long_text[:200]
    assert (movements[5].symbol, movements[5].description) == (None, None)


def test_cancelled_zero_and_unknown_activities_are_skipped(http: responses.RequestsMock,
                                                          broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/account/activities", json=[
        nta_json(1, "FEE", "-0.02", status="canceled"),
        nta_json(2, "DIV", "0", symbol="T"),
        nta_json(3, "JNLC", "0.00"),
        nta_json(4, "SPLIT", "12.5", symbol="NVDA"),  # not a type asked for: ignored
        activity_json(5),  # a FILL, were one to come back
        nta_json(6, "CSD", "100", status=None),  # no status: booked
    ])
    movements = broker.cash_movements_since(SINCE)
    assert [(m.movement_id[-2:], m.kind, m.amount) for m in movements] == [
        ("06", "deposit", Decimal("100"))]


def test_cash_movements_are_utc_and_oldest_first(http: responses.RequestsMock,
                                                 broker: AlpacaBroker) -> None:
    """Alpaca lists by booking time; a movement's ts is its created_at if it has one, else
    midnight UTC of its date, and the result is sorted by ts."""
    http.get(f"{PAPER}/account/activities", json=[
        nta_json(1, "INT", "0.5", day="2024-03-04", created_at="2024-03-04T09:30:00-05:00"),
        nta_json(2, "FEE", "-0.01", day="2024-03-01"),  # booked later, for an earlier trade
        nta_json(3, "CSD", "50", day="2024-03-01", created_at="2024-03-01T14:59:59.5Z"),
        nta_json(4, "DIV", "2", day="2024-03-03", created_at="2024-03-03T12:00:00.123456Z"),
    ])
    movements = broker.cash_movements_since(SINCE)
    # 3 was booked in the second asked for early, before `since`: dropped
    assert [m.movement_id[-2:] for m in movements] == ["02", "04", "01"]
    assert [m.ts for m in movements] == [datetime(2024, 3, 1, tzinfo=UTC),
                                        datetime(2024, 3, 3, 12, 0, 0, 123456, tzinfo=UTC),
                                        datetime(2024, 3, 4, 14, 30, tzinfo=UTC)]
    assert all(m.ts.utcoffset() is not None and m.ts.tzinfo == UTC for m in movements)


@pytest.mark.parametrize("net_amount", ["n/a", None, "", "NaN", [1]])
def test_a_malformed_net_amount_is_a_bad_response(http: responses.RequestsMock,
                                                  broker: AlpacaBroker, net_amount: Any) -> None:
    bad = nta_json(2, "DIV", net_amount, symbol="T")
    http.get(f"{PAPER}/account/activities", json=[nta_json(1), bad])
    with pytest.raises(Retry) as caught:
        broker.cash_movements_since(SINCE)
    assert caught.value.code == "BAD_RESPONSE"
    text = str(caught.value)
    assert text.startswith("alpaca: cash movements since 2024-03-01T14:59:59Z: ")
    assert f"activity {bad['id']} has net_amount {net_amount!r}, not a number" in text
    assert "\n" not in text


def test_a_cash_activity_without_an_id_is_a_bad_response(http: responses.RequestsMock,
                                                         broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/account/activities", json=[nta_json(1, "FEE", "-0.02", id=None)])
    with pytest.raises(Retry, match="a FEE activity dated 2024-03-01 has no id") as caught:
        broker.cash_movements_since(SINCE)
    assert caught.value.code == "BAD_RESPONSE"


def test_a_cash_activity_with_a_bad_date_is_a_bad_response(http: responses.RequestsMock,
                                                           broker: AlpacaBroker) -> None:
    bad = nta_json(1, "FEE", "-0.02", day="yesterday")
    http.get(f"{PAPER}/account/activities", json=[bad])
    with pytest.raises(Retry, match=f"activity {bad['id']} has date 'yesterday', not a date"):
        broker.cash_movements_since(SINCE)


def test_cash_movement_errors_map_like_every_other_request(http: responses.RequestsMock,
                                                           broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/account/activities", status=429, headers={"Retry-After": "3"},
             json={"code": 42910000, "message": "rate limit exceeded"})
    with pytest.raises(BackOff, match=r"cash movements since .*: rate limit exceeded") as caught:
        broker.cash_movements_since(SINCE)
    assert caught.value.retry_after == 3.0
    assert len(http.calls) == 1


# ------------------------------------------------------------------ account

def position_json(symbol: str, qty: str, side: str, avg: str) -> dict[str, Any]:
    return {"asset_id": "b0b6dd9d-8b9b-48a9-ba46-b9d54906e415", "symbol": symbol,
            "exchange": "NASDAQ", "asset_class": "us_equity", "asset_marginable": True,
            "qty": qty, "qty_available": qty, "avg_entry_price": avg, "side": side,
            "market_value": "1871.5", "cost_basis": "1850", "unrealized_pl": "21.5",
            "unrealized_plpc": "0.0116", "unrealized_intraday_pl": "3.1",
            "unrealized_intraday_plpc": "0.0017", "current_price": "187.15",
            "lastday_price": "186.84", "change_today": "0.0017"}


def test_positions_are_signed(http: responses.RequestsMock, broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/positions", json=[position_json("AAPL", "10", "long", "185.00"),
                                         position_json("TSLA", "-5", "short", "201.333"),
                                         position_json("F", "3", "short", "12.1")])
    assert broker.positions() == [
        BrokerPosition("AAPL", Decimal("10"), Decimal("185.00")),
        BrokerPosition("TSLA", Decimal("-5"), Decimal("201.333")),
        BrokerPosition("F", Decimal("-3"), Decimal("12.1")),
    ]


def test_balances_are_exact_decimals(http: responses.RequestsMock,
                                     broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/account", json={
        "id": "1d9eed04-be39-4e01-9b84-a48ac5bbafcf", "account_number": "PALPACA_123",
        "status": "ACTIVE", "crypto_status": "ACTIVE", "currency": "USD",
        "buying_power": "245432.61", "regt_buying_power": "245432.61",
        "daytrading_buying_power": "0", "non_marginable_buying_power": "122086.5",
        "cash": "122086.50", "accrued_fees": "0", "portfolio_value": "123346.11",
        "pattern_day_trader": False, "trading_blocked": False, "transfers_blocked": False,
        "account_blocked": False, "created_at": "2023-01-01T18:20:20.272275Z",
        "multiplier": "2", "shorting_enabled": True, "equity": "123346.11",
        "last_equity": "122011.09751111286868"})
    assert broker.balances() == [Balance("USD", Decimal("122086.50"), Decimal("245432.61"))]


def asset_json(symbol: str = "AAPL", **changes: Any) -> dict[str, Any]:
    asset: dict[str, Any] = {
        "id": "b0b6dd9d-8b9b-48a9-ba46-b9d54906e415", "class": "us_equity",
        "exchange": "NASDAQ", "symbol": symbol, "name": "Apple Inc. Common Stock",
        "status": "active", "tradable": True, "marginable": True, "shortable": True,
        "easy_to_borrow": True, "fractionable": True, "maintenance_margin_requirement": 30,
        "attributes": ["fractional_eh_enabled", "has_options"]}
    asset.update(changes)
    return asset


def test_rules_of_a_fractionable_stock(http: responses.RequestsMock,
                                       broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/assets/AAPL", json=asset_json())
    rules = broker.instrument_rules("AAPL")
    assert (rules.quantity_step, rules.min_quantity) == (Decimal("1e-9"), Decimal("1e-9"))
    assert (rules.price_tick, rules.min_notional) == (Decimal("0.01"), Decimal("1"))


def test_rules_of_a_whole_share_penny_stock(http: responses.RequestsMock,
                                            broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/assets/SNDL", json=asset_json("SNDL", fractionable=False))
    rules = broker.instrument_rules("SNDL", reference_price=Decimal("0.4"))
    assert (rules.quantity_step, rules.min_quantity) == (Decimal(1), Decimal(1))
    assert (rules.price_tick, rules.min_notional) == (Decimal("0.0001"), None)


def test_rules_of_an_unknown_symbol_reject(http: responses.RequestsMock,
                                           broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/assets/ZZZZ", **error(404, 40410000, "asset not found"))
    with pytest.raises(Reject, match="asset ZZZZ: asset not found") as caught:
        broker.instrument_rules("ZZZZ")
    assert caught.value.code == "UNKNOWN_SYMBOL"


def test_rules_of_an_inactive_asset_reject(http: responses.RequestsMock,
                                           broker: AlpacaBroker) -> None:
    http.get(f"{PAPER}/assets/OLD", json=asset_json("OLD", status="inactive", tradable=False))
    with pytest.raises(Reject, match="asset OLD: not tradable") as caught:
        broker.instrument_rules("OLD")
    assert caught.value.code == "INSTRUMENT_NOT_TRADABLE"


@pytest.mark.parametrize("message", ["cannot open a long buy while a short sell order is open",
                                     "cannot open a short sell while a long buy order is open"])
def test_an_opposite_side_order_refusal_rejects_the_order_not_the_account(
        http: responses.RequestsMock, broker: AlpacaBroker, message: str) -> None:
    """Alpaca refuses one order (HTTP 403, code 40310000) while an order of the other side
    is open for the symbol. That is a refusal of this order, like insufficient buying
    power: a Stop would stop the whole account over it."""
    http.post(f"{PAPER}/orders", status=403, json={"code": 40310000, "message": message})
    with pytest.raises(Reject) as caught:
        broker.place_order(market())
    assert not isinstance(caught.value, Stop)
    assert caught.value.code == "OPPOSITE_SIDE_ORDER_OPEN"
    assert message in str(caught.value)


def test_a_short_sale_fill_activity_is_a_sell(http: responses.RequestsMock,
                                              broker: AlpacaBroker) -> None:
    """FILL activities of a short sale say side `sell_short` (Alpaca's user-docs #139);
    a BrokerFill's side is buy or sell."""
    short = activity_json(1, qty="3", cum_qty="3")
    short["side"] = "sell_short"
    http.get(f"{PAPER}/account/activities/FILL", json=[short])
    fills = broker.fills_since(datetime(2024, 3, 1, 15, 0, tzinfo=UTC))
    assert [(f.side, f.quantity) for f in fills] == [("sell", Decimal("3"))]
