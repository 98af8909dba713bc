"""OandaBroker against OANDA v20 at the HTTP level (`responses`), no network, no database.

Bodies follow the shapes oandapyV20 ships as example responses
(`oandapyV20/endpoints/responses/*.py`) and OANDA's v20 error bodies (`errorCode`,
`errorMessage`, `orderRejectTransaction`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import oandapyV20
import pytest
import requests
import responses

from workers.brokers.base import Broker, OrderRequest
from workers.brokers.errors import (
    BackOff,
    EnvironmentMismatch,
    OrderNotFound,
    Reject,
    Retry,
    Stop,
)
from workers.brokers.oanda_broker import OandaBroker, to_instrument, to_symbol
from workers.runtime.log import redact

FIXTURES = Path(__file__).parent / "fixtures" / "oanda"
ACCOUNT = "101-004-1435156-001"
TOKEN = "oanda-test-token-7f3a9c"
PRACTICE = f"https://api-fxpractice.oanda.com/v3/accounts/{ACCOUNT}"
LIVE = f"https://api-fxtrade.oanda.com/v3/accounts/{ACCOUNT}"
CREDENTIALS = {"account_id": ACCOUNT, "access_token": TOKEN}


def load(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def broker() -> OandaBroker:
    return OandaBroker(CREDENTIALS, "practice")


def summary(http: responses.RequestsMock, base: str = PRACTICE) -> None:
    http.get(f"{base}/summary", json=load("account_summary"))


def instruments(http: responses.RequestsMock) -> None:
    """The instruments endpoint: a limit or stop price goes out on the instrument's tick."""
    http.get(f"{PRACTICE}/instruments", json=load("account_instruments"))


def not_found(http: responses.RequestsMock, spec: str) -> None:
    http.get(f"{PRACTICE}/orders/{spec}", json=load("order_not_found"), status=404)


def posted(http: responses.RequestsMock) -> list[dict[str, Any]]:
    """The JSON bodies of the POST requests sent, in order."""
    bodies = [c.request.body for c in http.calls if c.request.method == "POST"]
    return [json.loads(b) for b in bodies if isinstance(b, bytes | str)]


def url_of(http: responses.RequestsMock, index: int) -> str:
    return str(http.calls[index].request.url)


def params_of(http: responses.RequestsMock, index: int) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url_of(http, index)).query))


def calls_to(http: responses.RequestsMock, path: str) -> list[int]:
    return [i for i in range(len(http.calls)) if path in urlsplit(url_of(http, i)).path]


def market_sell(cid: str = "cid-market-1", quantity: str = "1500") -> OrderRequest:
    return OrderRequest(client_order_id=cid, symbol="EUR/USD", side="sell",
                        quantity=Decimal(quantity))


# ---------------------------------------------------------------- construction

def test_the_adapter_satisfies_the_broker_contract(broker: OandaBroker) -> None:
    assert isinstance(broker, Broker)
    assert (broker.venue, broker.endpoint, broker.environment) == ("oanda", "paper", "practice")
    assert broker.endpoint_url == "https://api-fxpractice.oanda.com"


def test_the_access_token_is_redacted_from_logs() -> None:
    token = "redaction-probe-5d1e8b"  # used by no other test, so only this adapter registers it
    assert redact(f"Bearer {token}") == f"Bearer {token}"
    OandaBroker({"account_id": ACCOUNT, "access_token": token}, "practice")
    assert redact(f"Authorization: Bearer {token}") == "Authorization: Bearer ***"


@pytest.mark.parametrize("credentials", [{"account_id": ACCOUNT}, {"access_token": TOKEN}])
def test_missing_credentials_stop(credentials: dict[str, str]) -> None:
    with pytest.raises(Stop, match="oanda: credentials lack"):
        OandaBroker(credentials, "practice")


def test_a_client_for_another_environment_is_refused() -> None:
    live_api = oandapyV20.API(access_token=TOKEN, environment="live")
    with pytest.raises(EnvironmentMismatch, match="api client is for live"):
        OandaBroker(CREDENTIALS, "practice", api=live_api)


def test_an_unknown_environment_stops() -> None:
    with pytest.raises(Stop, match="unknown environment 'sandbox'"):
        OandaBroker(CREDENTIALS, "sandbox")  # type: ignore[arg-type]


@pytest.mark.parametrize(("environment", "host", "endpoint"), [
    ("practice", "https://api-fxpractice.oanda.com", "paper"),
    ("live", "https://api-fxtrade.oanda.com", "live"),
])
def test_each_environment_reaches_its_own_host(http: responses.RequestsMock, environment: str,
                                               host: str, endpoint: str) -> None:
    http.get(f"{host}/v3/accounts/{ACCOUNT}/openPositions", json=load("open_positions"))
    chosen = OandaBroker(CREDENTIALS, environment)  # type: ignore[arg-type]
    assert len(chosen.positions()) == 2
    assert chosen.endpoint == endpoint and chosen.endpoint_url == host
    assert url_of(http, 0).startswith(f"{host}/v3/accounts/{ACCOUNT}/")
    assert http.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_symbols_convert_both_ways() -> None:
    assert to_instrument("EUR/USD") == "EUR_USD"
    assert to_symbol("DE30_EUR") == "DE30/EUR"
    with pytest.raises(Reject) as info:
        to_instrument("EURUSD")
    assert info.value.code == "INVALID_SYMBOL"


# ---------------------------------------------------------------- placing orders

def test_a_market_order_sends_signed_units_and_its_client_id(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    not_found(http, "@cid-market-1")
    summary(http)
    http.post(f"{PRACTICE}/orders", json=load("order_create_market_filled"), status=201)
    broker.place_order(market_sell())
    assert posted(http) == [{"order": {
        "type": "MARKET", "instrument": "EUR_USD", "units": "-1500", "timeInForce": "FOK",
        "positionFill": "DEFAULT", "clientExtensions": {"id": "cid-market-1"}}}]


def test_a_market_order_filled_at_once_yields_its_fill(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    not_found(http, "@cid-market-1")
    summary(http)
    http.post(f"{PRACTICE}/orders", json=load("order_create_market_filled"), status=201)
    order = broker.place_order(market_sell())
    assert (order.broker_order_id, order.status, order.side) == ("6372", "filled", "sell")
    assert order.filled_quantity == Decimal("1500") and order.average_price == Decimal("1.08463")
    (fill,) = order.fills
    assert fill.price == Decimal("1.08463") and isinstance(fill.price, Decimal)
    assert (fill.fill_id, fill.broker_order_id, fill.client_order_id) == ("6373", "6372",
                                                                          "cid-market-1")
    assert (fill.symbol, fill.side, fill.quantity) == ("EUR/USD", "sell", Decimal("1500"))
    assert (fill.commission, fill.commission_currency) == (Decimal("0.1500"), "EUR")
    assert fill.ts == datetime(2024, 3, 13, 14, 2, 11, 254417, tzinfo=UTC)


@pytest.mark.parametrize(("request_", "expected"), [
    (OrderRequest("cid-limit-1", "EUR/USD", "buy", Decimal("2500"), "limit",
                  limit_price=Decimal("1.08450")),
     {"type": "LIMIT", "units": "2500", "price": "1.0845", "timeInForce": "GTC",
      "positionFill": "DEFAULT"}),
    (OrderRequest("cid-limit-1", "EUR/USD", "sell", Decimal("2500"), "stop",
                  stop_price=Decimal("1.07000"), time_in_force="DAY", reduce_only=True),
     {"type": "STOP", "units": "-2500", "price": "1.07", "timeInForce": "GFD",
      "positionFill": "REDUCE_ONLY"}),
    (OrderRequest("cid-limit-1", "EUR/USD", "buy", Decimal("2.5E+3"), time_in_force="IOC"),
     {"type": "MARKET", "units": "2500", "timeInForce": "IOC", "positionFill": "DEFAULT"}),
])
def test_order_types_map_onto_oanda_bodies(http: responses.RequestsMock, broker: OandaBroker,
                                           request_: OrderRequest,
                                           expected: dict[str, str]) -> None:
    not_found(http, "@cid-limit-1")
    summary(http)
    instruments(http)
    http.post(f"{PRACTICE}/orders", json=load("order_create_limit_pending"), status=201)
    order = broker.place_order(request_)
    (body,) = posted(http)
    assert body["order"] == {**expected, "instrument": "EUR_USD",
                             "clientExtensions": {"id": "cid-limit-1"}}
    assert (order.status, order.filled_quantity, order.fills) == ("submitted", Decimal(0), ())


@pytest.mark.parametrize(("side", "kind", "price", "sent"), [
    ("buy", "limit", "1.0845049", "1.0845"),    # a buy limit never pays more
    ("sell", "limit", "1.0845001", "1.08451"),   # a sell limit never takes less
    ("sell", "stop", "1.0700049", "1.07"),    # a stop goes to the nearest tick
    ("buy", "stop", "1.0700050", "1.07001"),
    ("buy", "limit", "1.08450", "1.0845"),       # on the tick: as written
])
def test_a_price_finer_than_the_instrument_goes_out_on_its_tick(
        http: responses.RequestsMock, broker: OandaBroker, side: str, kind: str, price: str,
        sent: str) -> None:
    # OANDA refuses a price with more decimals than the instrument's displayPrecision
    # (PRICE_PRECISION_EXCEEDED): EUR_USD's is 5
    not_found(http, "@cid-limit-1")
    summary(http)
    instruments(http)
    http.post(f"{PRACTICE}/orders", json=load("order_create_limit_pending"), status=201)
    prices = {"limit_price" if kind == "limit" else "stop_price": Decimal(price)}
    broker.place_order(OrderRequest("cid-limit-1", "EUR/USD", side, Decimal("2500"),  # type: ignore[arg-type]
                                    kind, **prices))  # type: ignore[arg-type]
    (body,) = posted(http)
    assert body["order"]["price"] == sent


def test_a_price_below_the_instruments_tick_is_refused_before_it_is_sent(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    not_found(http, "@cid-limit-1")
    summary(http)
    instruments(http)
    with pytest.raises(Reject, match=r"price 0\.000001 is below the tick 0\.00001") as info:
        broker.place_order(OrderRequest("cid-limit-1", "EUR/USD", "buy", Decimal("2500"),
                                        "limit", limit_price=Decimal("0.000001")))
    assert info.value.code == "PRICE_PRECISION_EXCEEDED"
    assert posted(http) == []


def test_a_stop_limit_order_is_refused_before_any_request(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    order = OrderRequest("cid-sl", "EUR/USD", "buy", Decimal("1000"), "stop_limit",
                         limit_price=Decimal("1.1"), stop_price=Decimal("1.09"))
    with pytest.raises(Reject) as info:
        broker.place_order(order)
    assert info.value.code == "ORDER_TYPE_UNSUPPORTED"
    assert len(http.calls) == 0


def test_a_limit_order_without_price_is_refused(broker: OandaBroker) -> None:
    with pytest.raises(Reject, match="oanda: place_order EUR/USD: limit order without a price"):
        broker.place_order(OrderRequest("cid-x", "EUR/USD", "buy", Decimal("1"), "limit"))


def test_cancel_on_create_is_a_rejection_with_oandas_reason(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    not_found(http, "@cid-huge-1")
    summary(http)
    http.post(f"{PRACTICE}/orders", json=load("order_create_cancelled_margin"), status=201)
    with pytest.raises(Reject) as info:
        broker.place_order(OrderRequest("cid-huge-1", "EUR/USD", "buy", Decimal("50000000")))
    assert info.value.code == "INSUFFICIENT_MARGIN"
    assert str(info.value) == ("oanda: place_order EUR/USD: order 6380 cancelled on create: "
                               "INSUFFICIENT_MARGIN")


def test_an_error_code_of_a_400_answer_is_the_rejection_code(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    not_found(http, "@cid-market-1")
    summary(http)
    http.post(f"{PRACTICE}/orders", json=load("order_reject_units_precision"), status=400)
    with pytest.raises(Reject) as info:
        broker.place_order(market_sell(quantity="100.5"))
    assert info.value.code == "UNITS_PRECISION_EXCEEDED"
    assert "place_order EUR/USD: HTTP 400 UNITS_PRECISION_EXCEEDED" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_reject_transaction_alone_names_the_code(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    body = load("order_reject_units_precision")
    del body["errorCode"]
    not_found(http, "@cid-market-1")
    summary(http)
    http.post(f"{PRACTICE}/orders", json=body, status=400)
    with pytest.raises(Reject) as info:
        broker.place_order(market_sell())
    assert info.value.code == "UNITS_PRECISION_EXCEEDED"


def test_a_404_create_with_a_reject_transaction_is_a_rejection_without_one_a_stop(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    not_found(http, "@cid-market-1")
    summary(http)
    refused = {"orderRejectTransaction": {"type": "MARKET_ORDER_REJECT",
                                          "rejectReason": "ACCOUNT_NOT_ACTIVE"},
               "lastTransactionID": "6400", "errorMessage": "Account is not active"}
    http.post(f"{PRACTICE}/orders", json=refused, status=404)
    http.post(f"{PRACTICE}/orders", json={"errorMessage": "Account does not exist"}, status=404)
    with pytest.raises(Reject) as info:
        broker.place_order(market_sell())
    assert info.value.code == "ACCOUNT_NOT_ACTIVE"
    with pytest.raises(Stop, match="place_order EUR/USD: HTTP 404 Account does not exist"):
        broker.place_order(market_sell())


# ---------------------------------------------------------------- idempotence

def test_a_resent_client_id_returns_the_existing_order_without_placing(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/orders/@cid-market-1", json=load("order_details_filled"))
    http.get(f"{PRACTICE}/transactions/6373", json=load("transaction_fill"))
    summary(http)
    order = broker.place_order(market_sell())
    assert (order.broker_order_id, order.status, order.client_order_id) == (
        "6372", "filled", "cid-market-1")
    assert [f.fill_id for f in order.fills] == ["6373"]
    assert posted(http) == []


def test_a_duplicate_client_id_rejection_looks_the_order_up(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    # the first lookup misses (another sender is placing it), the create is refused as a
    # duplicate, the second lookup finds the order the other sender placed
    not_found(http, "@cid-limit-1")
    http.get(f"{PRACTICE}/orders/@cid-limit-1", json=load("order_details_pending"))
    summary(http)
    instruments(http)
    http.post(f"{PRACTICE}/orders", json=load("order_reject_duplicate_client_id"), status=400)
    order = broker.place_order(OrderRequest("cid-limit-1", "EUR/USD", "buy", Decimal("2500"),
                                            "limit", limit_price=Decimal("1.0845")))
    assert (order.broker_order_id, order.status, order.quantity) == ("6390", "submitted",
                                                                     Decimal("2500"))
    assert len(posted(http)) == 1


@pytest.mark.parametrize(("side", "quantity", "symbol"), [
    ("buy", "1500", "EUR/USD"),    # the other side
    ("sell", "1000", "EUR/USD"),   # another size
    ("sell", "1500", "GBP/USD"),   # another instrument
])
def test_a_resent_client_id_naming_another_order_is_refused_not_taken_for_it(
        http: responses.RequestsMock, broker: OandaBroker, side: str, quantity: str,
        symbol: str) -> None:
    # OANDA holds order 6372 (sell 1500 EUR_USD) under cid-market-1: a request under the
    # same client id for anything else is not that order
    http.get(f"{PRACTICE}/orders/@cid-market-1", json=load("order_details_filled"))
    http.get(f"{PRACTICE}/transactions/6373", json=load("transaction_fill"))
    summary(http)
    request = OrderRequest("cid-market-1", symbol, side, Decimal(quantity))  # type: ignore[arg-type]
    with pytest.raises(Reject, match="already names sell 1500 EUR/USD order 6372") as info:
        broker.place_order(request)
    assert info.value.code == "CLIENT_ORDER_ID_CONFLICT"
    assert posted(http) == []
    # the same order, sent again with its size spelt differently, is still found
    again = broker.place_order(market_sell(quantity="1500.00"))
    assert again.broker_order_id == "6372"


def test_a_duplicate_client_id_rejection_naming_another_order_is_refused(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    # the lookup misses, the create is refused as a duplicate, and the order the id names
    # (a buy limit of 2500) is not the one asked for (a buy limit of 5000)
    not_found(http, "@cid-limit-1")
    http.get(f"{PRACTICE}/orders/@cid-limit-1", json=load("order_details_pending"))
    summary(http)
    instruments(http)
    http.post(f"{PRACTICE}/orders", json=load("order_reject_duplicate_client_id"), status=400)
    with pytest.raises(Reject, match="already names buy 2500 EUR/USD order 6390") as info:
        broker.place_order(OrderRequest("cid-limit-1", "EUR/USD", "buy", Decimal("5000"),
                                        "limit", limit_price=Decimal("1.0845")))
    assert info.value.code == "CLIENT_ORDER_ID_CONFLICT"
    assert len(posted(http)) == 1


# ---------------------------------------------------------------- error mapping

@pytest.mark.parametrize(("status", "error"), [
    (429, BackOff), (500, Retry), (502, Retry), (503, Retry), (401, Stop), (403, Stop),
    (404, OrderNotFound),
])
def test_http_statuses_map_onto_error_classes(http: responses.RequestsMock,
                                              broker: OandaBroker, status: int,
                                              error: type[Exception]) -> None:
    http.get(f"{PRACTICE}/orders/6372",
             json={"errorMessage": "simulated", "errorCode": None}, status=status)
    with pytest.raises(error) as info:
        broker.order_status(broker_order_id="6372", symbol="EUR/USD")
    assert type(info.value) is error
    assert str(info.value).startswith(f"oanda: order_status EUR/USD 6372: HTTP {status}")


def test_a_rate_limit_says_how_long_to_wait(http: responses.RequestsMock,
                                            broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/openPositions", json={"errorMessage": "Too many requests"}, status=429)
    with pytest.raises(BackOff) as info:
        broker.positions()
    assert info.value.retry_after is not None and info.value.retry_after > 0


def test_a_401_names_oandas_message(http: responses.RequestsMock, broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/summary", status=401,
             json={"errorMessage": "Insufficient authorization to perform request."})
    with pytest.raises(Stop, match=r"^oanda: account summary: HTTP 401 Insufficient auth"):
        broker.balances()


@pytest.mark.parametrize("failure", [requests.ConnectionError("connection reset"),
                                     requests.ReadTimeout("read timed out")])
def test_transport_failures_retry(http: responses.RequestsMock, broker: OandaBroker,
                                  failure: Exception) -> None:
    http.get(f"{PRACTICE}/openPositions", body=failure)
    with pytest.raises(Retry) as info:
        broker.positions()
    assert type(info.value) is Retry and str(info.value).startswith("oanda: positions: ")


def test_a_non_json_answer_retries(http: responses.RequestsMock, broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/openPositions", body="<html>gateway</html>", status=200)
    with pytest.raises(Retry) as info:
        broker.positions()
    assert info.value.code == "BAD_RESPONSE"


def test_a_404_on_an_account_call_stops(http: responses.RequestsMock,
                                        broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/openPositions", json={"errorMessage": "Account not found"},
             status=404)
    with pytest.raises(Stop):
        broker.positions()


# ---------------------------------------------------------------- order queries

def test_order_status_by_client_id_uses_the_at_specifier(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/orders/@cid-market-1", json=load("order_details_filled"))
    http.get(f"{PRACTICE}/transactions/6373", json=load("transaction_fill"))
    summary(http)
    order = broker.order_status(client_order_id="cid-market-1")
    assert url_of(http, 0) == f"{PRACTICE}/orders/@cid-market-1"
    assert (order.status, order.filled_quantity, order.average_price) == (
        "filled", Decimal("1500"), Decimal("1.08463"))


def test_an_unknown_order_is_not_found(http: responses.RequestsMock,
                                       broker: OandaBroker) -> None:
    not_found(http, "@nobody")
    with pytest.raises(OrderNotFound, match="order_status - @nobody: HTTP 404"):
        broker.order_status(client_order_id="nobody")


def test_cancel_returns_the_cancelled_order(http: responses.RequestsMock,
                                            broker: OandaBroker) -> None:
    http.put(f"{PRACTICE}/orders/6390/cancel", json=load("order_cancel"))
    http.get(f"{PRACTICE}/orders/6390", json=load("order_details_cancelled"))
    http.get(f"{PRACTICE}/transactions/6420", json=load("transaction_cancel"))
    order = broker.cancel_order("6390", "EUR/USD")
    assert (order.status, order.reason, order.filled_quantity) == ("cancelled",
                                                                   "CLIENT_REQUEST", Decimal(0))
    assert http.calls[0].request.method == "PUT"


def test_cancelling_a_filled_order_reports_it_filled(http: responses.RequestsMock,
                                                     broker: OandaBroker) -> None:
    http.put(f"{PRACTICE}/orders/6372/cancel", status=404, json={
        "orderCancelRejectTransaction": {"type": "ORDER_CANCEL_REJECT", "orderID": "6372",
                                         "rejectReason": "ORDER_DOESNT_EXIST"},
        "errorCode": "ORDER_DOESNT_EXIST", "errorMessage": "The order does not exist"})
    http.get(f"{PRACTICE}/orders/6372", json=load("order_details_filled"))
    http.get(f"{PRACTICE}/transactions/6373", json=load("transaction_fill"))
    summary(http)
    assert broker.cancel_order("6372", "EUR/USD").status == "filled"


def test_cancelling_an_unknown_order_is_not_found(http: responses.RequestsMock,
                                                  broker: OandaBroker) -> None:
    http.put(f"{PRACTICE}/orders/999/cancel", json=load("order_not_found"), status=404)
    not_found(http, "999")
    with pytest.raises(OrderNotFound):
        broker.cancel_order("999", "EUR/USD")


def test_open_orders_leave_out_orders_attached_to_trades(http: responses.RequestsMock,
                                                         broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/pendingOrders", json=load("orders_pending"))
    everything = broker.open_orders()
    assert [(o.broker_order_id, o.symbol, o.side) for o in everything] == [
        ("6390", "EUR/USD", "buy"), ("6392", "USD/JPY", "sell")]
    assert [o.broker_order_id for o in broker.open_orders("USD/JPY")] == ["6392"]


# ---------------------------------------------------------------- fills

def test_fills_since_pages_through_transaction_id_ranges(http: responses.RequestsMock,
                                                         broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/transactions", json=load("transactions_list"))
    http.get(f"{PRACTICE}/transactions/idrange", json=load("transactions_idrange_1"))
    http.get(f"{PRACTICE}/transactions/idrange", json=load("transactions_idrange_2"))
    summary(http)
    since = datetime(2024, 3, 13, tzinfo=UTC)
    fills = broker.fills_since(since)
    assert params_of(http, 0) == {"from": "2024-03-13T00:00:00.000000Z", "type": "ORDER_FILL",
                              "pageSize": "1000"}
    ranges = [params_of(http, i) for i in calls_to(http, "/idrange")]
    assert ranges == [{"from": "6300", "to": "6373", "type": "ORDER_FILL"},
                      {"from": "6374", "to": "6420", "type": "ORDER_FILL"}]
    # the fill stamped before `since` is left out; fullVWAP stands in for a missing price
    assert [(f.fill_id, f.symbol, f.side, f.quantity, f.price) for f in fills] == [
        ("6373", "EUR/USD", "sell", Decimal("1500"), Decimal("1.08463")),
        ("6402", "USD/JPY", "buy", Decimal("1000"), Decimal("150.012"))]


def test_fills_since_filters_by_symbol(http: responses.RequestsMock,
                                       broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/transactions", json=load("transactions_list"))
    http.get(f"{PRACTICE}/transactions/idrange", json=load("transactions_idrange_1"))
    http.get(f"{PRACTICE}/transactions/idrange", json=load("transactions_idrange_2"))
    summary(http)
    fills = broker.fills_since(datetime(2024, 3, 12, tzinfo=UTC), "USD/JPY")
    assert [f.fill_id for f in fills] == ["6301", "6402"]


def test_fills_after_follows_the_transaction_cursor(http: responses.RequestsMock,
                                                    broker: OandaBroker) -> None:
    first = load("transactions_idrange_1")
    first["lastTransactionID"] = "6402"
    first["transactions"].append({"type": "CLIENT_CONFIGURE", "id": "6390",
                                  "time": "2024-03-13T15:00:00.000000000Z"})
    second = load("transactions_idrange_2")
    second["lastTransactionID"] = "6402"
    http.get(f"{PRACTICE}/transactions/sinceid", json=first)
    http.get(f"{PRACTICE}/transactions/sinceid", json=second)
    summary(http)
    fills, cursor = broker.fills_after("6299")
    ids = [params_of(http, i)["id"] for i in calls_to(http, "/sinceid")]
    assert ids == ["6299", "6390"]
    assert [f.fill_id for f in fills] == ["6301", "6373", "6402"] and cursor == "6402"


def test_fills_need_an_aware_since(broker: OandaBroker) -> None:
    with pytest.raises(Reject) as info:
        broker.fills_since(datetime(2024, 3, 13))
    assert info.value.code == "NAIVE_DATETIME"


# ---------------------------------------------------------------- account

def test_positions_are_signed_short_negative(http: responses.RequestsMock,
                                             broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/openPositions", json=load("open_positions"))
    held = {p.symbol: p for p in broker.positions()}
    assert held["EUR/USD"].quantity == Decimal("-1500")
    assert held["EUR/USD"].average_price == Decimal("1.08463")
    assert held["USD/JPY"].quantity == Decimal("2500")
    assert held["USD/JPY"].average_price == Decimal("149.875")


def test_balances_come_from_the_account_summary(http: responses.RequestsMock,
                                                broker: OandaBroker) -> None:
    summary(http)
    (balance,) = broker.balances()
    assert (balance.currency, balance.total, balance.free) == (
        "EUR", Decimal("35454.4740"), Decimal("24872.9740"))


def test_instrument_rules_come_from_the_instruments_endpoint(http: responses.RequestsMock,
                                                             broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/instruments", json=load("account_instruments"))
    eur = broker.instrument_rules("EUR/USD")
    jpy = broker.instrument_rules("USD/JPY")
    dax = broker.instrument_rules("DE30/EUR")
    assert (eur.quantity_step, eur.min_quantity, eur.price_tick) == (
        Decimal("1"), Decimal("1"), Decimal("0.00001"))
    assert jpy.price_tick == Decimal("0.001")
    assert (dax.quantity_step, dax.min_quantity, dax.price_tick) == (
        Decimal("0.1"), Decimal("0.1"), Decimal("0.1"))
    assert params_of(http, 0) == {"instruments": "EUR_USD"}
    broker.instrument_rules("EUR/USD")
    assert len(http.calls) == 3  # cached: the second EUR/USD query asked nobody


def test_an_instrument_the_account_cannot_trade_is_refused(http: responses.RequestsMock,
                                                           broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/instruments", json={"instruments": [], "lastTransactionID": "1"})
    with pytest.raises(Reject) as info:
        broker.instrument_rules("XAU/USD")
    assert info.value.code == "UNKNOWN_SYMBOL"
    assert str(info.value) == "oanda: instrument_rules XAU/USD: not tradeable on this account"


# ---------------------------------------------------------------- cash movements

def idrange_page(low: int, high: int) -> str:
    return f"{PRACTICE}/transactions/idrange?from={low}&to={high}"


def listing(*pages: str) -> dict[str, Any]:
    """A transactions listing without type filter, shaped like oandapyV20's example."""
    return {"count": 12, "from": "2024-03-13T00:00:00.000000000Z", "lastTransactionID": "6520",
            "pageSize": 1000, "to": "2024-03-15T00:00:00.000000000Z", "pages": list(pages)}


def tx(tx_id: str | None, tx_type: str, time: str, **fields: Any) -> dict[str, Any]:
    """One transaction with OANDA's common fields (id, time, userID, accountID, batchID)."""
    common = {"type": tx_type, "time": time, "userID": 1435156, "accountID": ACCOUNT,
              "batchID": tx_id, **fields}
    return common if tx_id is None else {"id": tx_id, **common}


def fill(tx_id: str, time: str, **fields: Any) -> dict[str, Any]:
    """An ORDER_FILL charging commission (the fill's) and settling financing (a movement)."""
    return tx(tx_id, "ORDER_FILL", time, **{
        "orderID": str(int(tx_id) - 1), "instrument": "EUR_USD", "units": "-1500",
        "price": "1.08463", "financing": "-0.0250", "commission": "0.1500",
        "guaranteedExecutionFee": "0.0000", "pl": "12.5000",
        "reason": "MARKET_ORDER_TRADE_CLOSE", "accountBalance": "35466.8240", **fields})


FIRST_PAGE = [
    # booked the evening before `since`: the idrange page starts earlier than the time asked
    tx("6500", "DAILY_FINANCING", "2024-03-12T21:00:00.000000000Z", financing="-0.9000",
       accountBalance="35454.4740", accountFinancingMode="DAILY", positionFinancings=[]),
    fill("6501", "2024-03-13T09:30:00.000000000Z"),
    tx("6502", "DAILY_FINANCING", "2024-03-13T21:00:00.285982286Z", financing="-1.2345",
       accountBalance="35465.5895", accountFinancingMode="DAILY", positionFinancings=[
           {"instrument": "EUR_USD", "financing": "-1.2345",
            "openTradeFinancings": [{"tradeID": "6401", "financing": "-1.2345"}]}]),
    tx("6503", "TRANSFER_FUNDS", "2024-03-14T08:15:00.000000000Z", amount="5000.0000",
       fundingReason="CLIENT_FUNDING", comment="wire  from\nbank", accountBalance="40465.5895"),
]
SECOND_PAGE = [
    tx("6511", "DIVIDEND_ADJUSTMENT", "2024-03-14T13:30:00.000000000Z", instrument="DE30_EUR",
       dividendAdjustment="-0.8200", quoteDividendAdjustment="-0.8200",
       accountBalance="40464.7695",
       openTradeDividendAdjustments=[{"tradeID": "6390", "dividendAdjustment": "-0.8200",
                                      "quoteDividendAdjustment": "-0.8200"}]),
    tx("6512", "DAILY_FINANCING", "2024-03-14T21:00:00.000000000Z", financing="0.4321",
       accountBalance="40465.2016", positionFinancings=[
           {"instrument": "EUR_USD", "financing": "0.6000"},
           {"instrument": "USD_JPY", "financing": "-0.1679"}]),
    tx("6513", "DAILY_FINANCING", "2024-03-14T21:00:01.000000000Z", financing="0.0000",
       accountBalance="40465.2016", positionFinancings=[]),
    tx("6514", "TRANSFER_FUNDS", "2024-03-14T22:00:00.000000000Z", amount="-250.5000",
       fundingReason="CLIENT_FUNDING", accountBalance="40214.7016"),
    tx("6515", "TRANSFER_FUNDS", "2024-03-14T22:30:00.000000000Z", amount="-3.1000",
       fundingReason="ADJUSTMENT", accountBalance="40211.6016"),
    tx("6516", "TRANSFER_FUNDS_REJECT", "2024-03-14T22:45:00.000000000Z", amount="-1000000",
       fundingReason="CLIENT_FUNDING", rejectReason="INSUFFICIENT_FUNDS"),
    fill("6517", "2024-03-14T23:00:00.000000000Z", financing="0.0000",
         guaranteedExecutionFee="0.0500"),
]


def test_cash_movements_since_read_financing_transfers_and_dividends_page_by_page(
        http: responses.RequestsMock, broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/transactions",
             json=listing(idrange_page(6500, 6510), idrange_page(6511, 6520)))
    http.get(f"{PRACTICE}/transactions/idrange",
             json={"lastTransactionID": "6520", "transactions": FIRST_PAGE})
    http.get(f"{PRACTICE}/transactions/idrange",
             json={"lastTransactionID": "6520", "transactions": SECOND_PAGE})
    summary(http)
    moved = broker.cash_movements_since(datetime(2024, 3, 13, tzinfo=UTC))
    # no type filter: OANDA's TransactionFilter knows no DIVIDEND_ADJUSTMENT
    assert params_of(http, 0) == {"from": "2024-03-13T00:00:00.000000Z", "pageSize": "1000"}
    assert [params_of(http, i) for i in calls_to(http, "/idrange")] == [
        {"from": "6500", "to": "6510"}, {"from": "6511", "to": "6520"}]
    assert len(calls_to(http, "/summary")) == 1  # the home currency, asked once
    # the fills' commission (6501, 6517: the fill's own), the zero financing (6513, and
    # 6517's), the rejected transfer (6516) and the financing before `since` (6500) are
    # left out; what a fill settles besides its commission is a movement of its own
    assert [(m.movement_id, m.kind, m.amount, m.currency, m.symbol) for m in moved] == [
        ("6501:financing", "financing", Decimal("-0.0250"), "EUR", "EUR/USD"),
        ("6502", "financing", Decimal("-1.2345"), "EUR", "EUR/USD"),
        ("6503", "deposit", Decimal("5000.0000"), "EUR", None),
        ("6511", "dividend", Decimal("-0.8200"), "EUR", "DE30/EUR"),
        ("6512", "financing", Decimal("0.4321"), "EUR", None),  # two instruments: no symbol
        ("6514", "withdrawal", Decimal("-250.5000"), "EUR", None),
        ("6515", "adjustment", Decimal("-3.1000"), "EUR", None),
        ("6517:gsl-fee", "fee", Decimal("-0.0500"), "EUR", "EUR/USD"),
    ]
    assert all(isinstance(m.amount, Decimal) for m in moved)
    assert moved[1].ts == datetime(2024, 3, 13, 21, 0, 0, 285982, tzinfo=UTC)
    assert all(m.ts.utcoffset() == timedelta(0) for m in moved)
    assert [m.ts for m in moved] == sorted(m.ts for m in moved)
    assert [m.description for m in moved[:3]] == [
        "ORDER_FILL financing", "DAILY_FINANCING DAILY",
        "TRANSFER_FUNDS CLIENT_FUNDING: wire from bank"]


def test_cash_movements_leave_a_fills_commission_to_the_fill(http: responses.RequestsMock,
                                                             broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/transactions", json=listing(idrange_page(6500, 6510)))
    http.get(f"{PRACTICE}/transactions/idrange", json={
        "lastTransactionID": "6510",
        "transactions": [fill("6501", "2024-03-13T09:30:00.000000000Z", financing="0.0000"),
                         fill("6505", "2024-03-13T10:30:00.000000000Z", financing=None,
                              guaranteedExecutionFee=None)]})
    assert broker.cash_movements_since(datetime(2024, 3, 13, tzinfo=UTC)) == []
    assert calls_to(http, "/summary") == []  # nothing to price: the currency is not asked


def test_no_transactions_since_means_no_cash_movements(http: responses.RequestsMock,
                                                       broker: OandaBroker) -> None:
    http.get(f"{PRACTICE}/transactions", json=listing())
    assert broker.cash_movements_since(datetime(2024, 3, 13, tzinfo=UTC)) == []
    assert len(http.calls) == 1


@pytest.mark.parametrize(("bad", "message"), [
    (tx("6502", "DAILY_FINANCING", "2024-03-13T21:00:00.000000000Z", financing="-1,23"),
     "transaction 6502 (DAILY_FINANCING): financing '-1,23' is not a decimal number"),
    (tx("6503", "TRANSFER_FUNDS", "2024-03-14T08:15:00.000000000Z",
        fundingReason="CLIENT_FUNDING"),
     "transaction 6503 (TRANSFER_FUNDS): amount None is not a decimal number"),
    (tx("6511", "DIVIDEND_ADJUSTMENT", "2024-03-14T13:30:00.000000000Z",
        instrument="DE30_EUR", dividendAdjustment="NaN"),
     "transaction 6511 (DIVIDEND_ADJUSTMENT): dividendAdjustment 'NaN' is not a decimal number"),
    (tx(None, "DAILY_FINANCING", "2024-03-13T21:00:00.000000000Z", financing="-1.2345"),
     "DAILY_FINANCING transaction at '2024-03-13T21:00:00.000000000Z' has no id"),
    (tx("6504", "TRANSFER_FUNDS", "yesterday", amount="10"),
     "transaction 6504 (TRANSFER_FUNDS): time 'yesterday' is not an RFC 3339 or UNIX time"),
])
def test_a_malformed_cash_transaction_is_refused_naming_field_and_id(
        http: responses.RequestsMock, broker: OandaBroker, bad: dict[str, Any],
        message: str) -> None:
    http.get(f"{PRACTICE}/transactions", json=listing(idrange_page(6500, 6510)))
    http.get(f"{PRACTICE}/transactions/idrange",
             json={"lastTransactionID": "6510", "transactions": [bad]})
    summary(http)
    with pytest.raises(Retry) as info:
        broker.cash_movements_since(datetime(2024, 3, 13, tzinfo=UTC))
    assert info.value.code == "BAD_RESPONSE"
    assert str(info.value) == f"oanda: cash_movements_since: {message}"


def test_cash_movements_need_an_aware_since(broker: OandaBroker) -> None:
    with pytest.raises(Reject) as info:
        broker.cash_movements_since(datetime(2024, 3, 13))
    assert info.value.code == "NAIVE_DATETIME"
