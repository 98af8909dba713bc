"""CcxtBroker against the venues' HTTP APIs, mocked at the `requests` level (`responses`).

Responses have the shapes of the exchanges' documented JSON (Binance spot REST
`/api/v3/...`, OKX v5, Bybit v5, Kraken REST `/0/...`, Coinbase Advanced Trade
`/api/v3/brokerage/...`); nothing of the adapter or of ccxt
is patched, and no test touches the network: a request nobody registered fails as a ConnectionError.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import ccxt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from workers.brokers import errors
from workers.brokers.base import Broker, BrokerPosition, OrderRequest
from workers.brokers.ccxt_broker import (
    ERROR_MAP,
    CcxtBroker,
    datetime_to_ms,
    map_ccxt_error,
    ms_to_datetime,
    precision_step,
    venue_client_id,
)
from workers.runtime.log import redact

FIXTURES = Path(__file__).parent / "fixtures" / "ccxt"
BINANCE = "https://api.binance.com/api/v3"
BINANCE_TEST = "https://testnet.binance.vision/api/v3"
OKX = "https://www.okx.com/api/v5"
CREDS = {"api_key": "test-binance-key-4f1c9a", "secret": "test-binance-secret-77d0e2"}
OKX_CREDS = {"api_key": "test-okx-key-1b2c", "secret": "test-okx-secret-3d4e",
             "password": "test-okx-pass-5f6a"}
T_ORDER = 1718000000123  # 2024-06-10T06:13:20.123Z


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def sent(call: Any) -> dict[str, str]:
    """The parameters a venue received: the query string and a form-encoded body merged."""
    params = {k: v[0] for k, v in parse_qs(urlsplit(call.request.url).query).items()}
    body = call.request.body
    if body:
        text = body.decode() if isinstance(body, bytes) else body
        if not text.lstrip().startswith(("[", "{")):
            params.update({k: v[0] for k, v in parse_qs(text).items()})
    return params


def request_call(request: Any) -> Any:
    """A request seen by a `responses` callback, in the shape `sent` reads."""
    return type("Call", (), {"request": request})()


def json_body(call: Any) -> Any:
    body = call.request.body
    return json.loads(body.decode() if isinstance(body, bytes) else body)


def calls_to(http: responses.RequestsMock, path: str) -> list[Any]:
    return [c for c in http.calls if str(urlsplit(c.request.url).path).endswith(path)]


@pytest.fixture
def binance(http: responses.RequestsMock) -> CcxtBroker:
    """A live Binance broker whose markets come from a mocked GET /api/v3/exchangeInfo."""
    http.get(f"{BINANCE}/exchangeInfo", json=fixture("binance_exchange_info.json"))
    return CcxtBroker("binance", dict(CREDS), "live",
                      exchange=ccxt.binance({"enableRateLimit": False}))


@pytest.fixture
def okx(http: responses.RequestsMock) -> CcxtBroker:
    http.get(f"{OKX}/public/instruments", json=fixture("okx_instruments_spot.json"))
    http.get(f"{OKX}/asset/currencies", json=fixture("okx_asset_currencies.json"))
    return CcxtBroker("okx", dict(OKX_CREDS), "live", exchange=ccxt.okx({"enableRateLimit": False}))


def binance_order(**overrides: Any) -> dict[str, Any]:
    """A Binance spot order as GET /api/v3/order documents it."""
    order = {"symbol": "BTCUSDT", "orderId": 28457, "orderListId": -1,
             "clientOrderId": "mm7-42", "price": "64000.13000000", "origQty": "0.00123000",
             "executedQty": "0.00000000", "cummulativeQuoteQty": "0.00000000",
             "status": "NEW", "timeInForce": "GTC", "type": "LIMIT", "side": "SELL",
             "stopPrice": "0.00000000", "icebergQty": "0.00000000", "time": T_ORDER,
             "updateTime": T_ORDER, "isWorking": True, "workingTime": T_ORDER,
             "origQuoteOrderQty": "0.00000000", "selfTradePreventionMode": "EXPIRE_MAKER"}
    order.update(overrides)
    return order


def binance_error(code: int, msg: str) -> dict[str, Any]:
    return {"code": code, "msg": msg}


MARKET_BUY = OrderRequest(client_order_id="mm7-42", symbol="BTC/USDT", side="buy",
                          quantity=Decimal("0.0012399"))


# --- placing orders ---------------------------------------------------------------------


def test_market_order_sends_venue_symbol_truncated_quantity_and_client_id(
        http: responses.RequestsMock, binance: CcxtBroker) -> None:
    full = {"symbol": "BTCUSDT", "orderId": 28457, "orderListId": -1, "clientOrderId": "mm7-42",
            "transactTime": T_ORDER, "price": "0.00000000", "origQty": "0.00123000",
            "executedQty": "0.00123000", "origQuoteOrderQty": "0.00000000",
            "cummulativeQuoteQty": "82.14170000", "status": "FILLED", "timeInForce": "GTC",
            "type": "MARKET", "side": "BUY", "workingTime": T_ORDER,
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "fills": [{"price": "66780.00000000", "qty": "0.00100000",
                       "commission": "0.00000100", "commissionAsset": "BTC", "tradeId": 3001},
                      {"price": "66790.00000000", "qty": "0.00023000",
                       "commission": "0.00000023", "commissionAsset": "BTC", "tradeId": 3002}]}
    http.post(f"{BINANCE}/order", json=full)

    placed = binance.place_order(MARKET_BUY)

    (call,) = calls_to(http, "/api/v3/order")
    body = sent(call)
    assert call.request.method == "POST"
    assert body["symbol"] == "BTCUSDT"
    assert body["side"] == "BUY"
    assert body["type"] == "MARKET"
    assert body["quantity"] == "0.00123"  # 0.0012399 cut down to the 0.00001 step
    assert body["newClientOrderId"] == "mm7-42"
    assert "price" not in body and "timeInForce" not in body
    assert placed.broker_order_id == "28457"
    assert placed.client_order_id == "mm7-42"
    assert placed.status == "filled"
    assert placed.filled_quantity == Decimal("0.00123")
    assert placed.average_price is not None
    assert abs(placed.average_price - Decimal("82.1417") / Decimal("0.00123")) < Decimal("0.01")
    assert [f.fill_id for f in placed.fills] == ["BTCUSDT:3001", "BTCUSDT:3002"]
    assert [f.quantity for f in placed.fills] == [Decimal("0.001"), Decimal("0.00023")]
    assert [f.commission for f in placed.fills] == [Decimal("0.000001"), Decimal("2.3E-7")]
    assert {f.commission_currency for f in placed.fills} == {"BTC"}
    assert all(f.client_order_id == "mm7-42" and f.ts.tzinfo is not None for f in placed.fills)


@pytest.mark.parametrize(("time_in_force", "expected"), [("GTC", "GTC"), ("IOC", "IOC")])
def test_limit_order_rounds_price_to_tick_and_sends_time_in_force(
        http: responses.RequestsMock, binance: CcxtBroker, time_in_force: str,
        expected: str) -> None:
    http.post(f"{BINANCE}/order", json=binance_order(transactTime=T_ORDER, fills=[],
                                                     timeInForce=expected))
    order = OrderRequest(client_order_id="mm7-42", symbol="BTC/USDT", side="sell",
                         quantity=Decimal("0.0012345"), order_type="limit",
                         limit_price=Decimal("64000.129"), time_in_force=time_in_force)

    placed = binance.place_order(order)

    body = sent(calls_to(http, "/api/v3/order")[0])
    assert (body["type"], body["side"]) == ("LIMIT", "SELL")
    assert body["quantity"] == "0.00123"
    assert body["price"] == "64000.13"
    assert body["timeInForce"] == expected
    assert placed.status == "submitted"
    assert placed.filled_quantity == Decimal(0)
    assert placed.quantity == Decimal("0.00123")


@pytest.mark.parametrize(("side", "limit", "expected"), [
    ("buy", "64000.125", "64000.12"), ("buy", "64000.129", "64000.12"),
    ("buy", "64000.12", "64000.12"), ("sell", "64000.121", "64000.13"),
    ("sell", "64000.125", "64000.13"), ("sell", "64000.12", "64000.12"),
])
def test_a_limit_price_is_rounded_to_the_tick_never_past_the_traders_limit(
        http: responses.RequestsMock, binance: CcxtBroker, side: Literal["buy", "sell"],
        limit: str, expected: str) -> None:
    """BTCUSDT ticks by 0.01: a buy limit goes down to the tick, a sell limit up (rounding
    to the nearest would send a buy of 64000.125 at 64000.13, above its limit)."""
    http.post(f"{BINANCE}/order", json=binance_order(side=side.upper(), transactTime=T_ORDER,
                                                     fills=[]))
    binance.place_order(OrderRequest(client_order_id="mm7-42", symbol="BTC/USDT", side=side,
                                     quantity=Decimal("0.00123"), order_type="limit",
                                     limit_price=Decimal(limit)))

    (call,) = calls_to(http, "/api/v3/order")
    assert (sent(call)["side"], sent(call)["price"]) == (side.upper(), expected)


def test_stop_limit_order_sends_trigger_and_limit_prices(http: responses.RequestsMock,
                                                         binance: CcxtBroker) -> None:
    http.post(f"{BINANCE}/order", json=binance_order(
        orderId=28460, clientOrderId="mm7-44", type="STOP_LOSS_LIMIT", price="59000.00000000",
        stopPrice="59100.01000000", origQty="0.00100000", transactTime=T_ORDER, fills=[]))
    order = OrderRequest("mm7-44", "BTC/USDT", "sell", Decimal("0.001"), "stop_limit",
                         limit_price=Decimal("59000.001"), stop_price=Decimal("59100.009"))

    placed = binance.place_order(order)

    body = sent(calls_to(http, "/api/v3/order")[0])
    assert body["type"] == "STOP_LOSS_LIMIT"
    # the sell limit goes up to the tick (never under the trader's limit); the stop to the
    # nearest tick, as the venue rounds it
    assert (body["price"], body["stopPrice"]) == ("59000.01", "59100.01")
    assert body["quantity"] == "0.001"
    assert (placed.broker_order_id, placed.status) == ("28460", "submitted")


def test_duplicate_client_order_id_returns_the_existing_order(
        http: responses.RequestsMock, binance: CcxtBroker) -> None:
    http.post(f"{BINANCE}/order", status=400, json=binance_error(-2010, "Duplicate order sent."))
    http.get(f"{BINANCE}/order", json=binance_order(status="PARTIALLY_FILLED", side="BUY",
                                                    type="MARKET", executedQty="0.00050000",
                                                    cummulativeQuoteQty="32000.06500000"))

    found = binance.place_order(MARKET_BUY)

    assert len([c for c in calls_to(http, "/api/v3/order") if c.request.method == "POST"]) == 1
    (lookup,) = [c for c in calls_to(http, "/api/v3/order") if c.request.method == "GET"]
    assert sent(lookup)["origClientOrderId"] == "mm7-42"
    assert sent(lookup)["symbol"] == "BTCUSDT"
    assert found.broker_order_id == "28457"
    assert found.client_order_id == "mm7-42"
    assert found.status == "partially_filled"
    assert found.filled_quantity == Decimal("0.0005")


@pytest.mark.parametrize("other", [{"side": "SELL"}, {"origQty": "0.00200000"},
                                   {"symbol": "ETHUSDT"}])
def test_a_duplicate_client_order_id_naming_another_order_is_refused(
        http: responses.RequestsMock, binance: CcxtBroker, other: dict[str, str]) -> None:
    """Binance already holds mm7-42 for another order (another side, size or market): it is
    refused, never taken for this one (whose fills would be booked from it)."""
    http.post(f"{BINANCE}/order", status=400, json=binance_error(-2010, "Duplicate order sent."))
    http.get(f"{BINANCE}/order", json=binance_order(**{"side": "BUY", "type": "MARKET", **other}))
    with pytest.raises(errors.Reject, match="client id mm7-42 already names") as refused:
        binance.place_order(MARKET_BUY)
    assert refused.value.code == "CLIENT_ORDER_ID_CONFLICT"


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "msg", "expected"), [
    (-2010, "Account has insufficient balance for requested action.", "INSUFFICIENT_FUNDS"),
    (-1121, "Invalid symbol.", "UNKNOWN_SYMBOL"),
    (-1013, "Filter failure: LOT_SIZE", "INVALID_ORDER"),
    (-2010, "Order would immediately match and take.", "INVALID_ORDER"),
])
def test_venue_rejections_are_rejects_with_the_venue_message(
        http: responses.RequestsMock, binance: CcxtBroker, code: int, msg: str,
        expected: str) -> None:
    http.post(f"{BINANCE}/order", status=400, json=binance_error(code, msg))

    with pytest.raises(errors.Reject) as caught:
        binance.place_order(MARKET_BUY)

    text = str(caught.value)
    assert caught.value.code == expected
    assert caught.value.venue == "ccxt:binance"
    assert text.startswith("ccxt:binance: place_order BTC/USDT: ")
    assert msg in text
    assert "\n" not in text


@pytest.mark.parametrize(("status", "headers", "retry_after"), [
    (429, {"Retry-After": "7"}, 7.0),
    (418, {"Retry-After": "120"}, 120.0),
    (429, {}, None),
])
def test_rate_limits_back_off_with_the_retry_after_header(
        http: responses.RequestsMock, binance: CcxtBroker, status: int,
        headers: dict[str, str], retry_after: float | None) -> None:
    http.post(f"{BINANCE}/order", status=status, headers=headers, json=binance_error(
        -1003, "Too much request weight used; current limit is 6000 request weight per 1 "
               "MINUTE. Please use WebSocket Streams for live updates to avoid polling the API."))

    with pytest.raises(errors.BackOff) as caught:
        binance.place_order(MARKET_BUY)

    assert caught.value.retry_after == retry_after
    assert "Too much request weight used" in str(caught.value)


@pytest.mark.parametrize(("response", "code"), [
    ({"status": 503, "json": binance_error(-1008, "Server is currently overloaded with other "
                                                  "requests. Please try again in a few minutes.")},
     "OPERATION_FAILED"),
    # a code ccxt does not classify is a plain ExchangeError: the 5xx status makes it a Retry
    ({"status": 503, "json": binance_error(-1034, "Too many concurrent connections; current "
                                                  "limit is '10'.")}, "VENUE_UNAVAILABLE"),
    ({"status": 500, "json": binance_error(-1001, "Internal error; unable to process your "
                                                  "request. Please try again.")},
     "OPERATION_FAILED"),
    ({"status": 502, "body": "<html><body><h1>502 Bad Gateway</h1></body></html>",
      "content_type": "text/html"}, "VENUE_UNAVAILABLE"),
    ({"body": requests.exceptions.ReadTimeout("Read timed out. (read timeout=10)")}, "TIMEOUT"),
    ({"body": requests.exceptions.ConnectionError("Connection reset by peer")},
     "NETWORK_ERROR"),
])
def test_server_faults_and_network_errors_are_retries(
        http: responses.RequestsMock, binance: CcxtBroker, response: dict[str, Any],
        code: str) -> None:
    http.post(f"{BINANCE}/order", **response)

    with pytest.raises(errors.Retry) as caught:
        binance.place_order(MARKET_BUY)

    assert not isinstance(caught.value, errors.BackOff)
    assert caught.value.code == code
    assert "place_order BTC/USDT" in str(caught.value)


@pytest.mark.parametrize(("status", "code", "msg"), [
    (401, -2015, "Invalid API-key, IP, or permissions for action."),
    (401, -2014, "API-key format invalid."),
    (400, -1022, "Signature for this request is not valid."),
])
def test_bad_credentials_stop_the_account(http: responses.RequestsMock, binance: CcxtBroker,
                                          status: int, code: int, msg: str) -> None:
    http.get(f"{BINANCE}/account", status=status, json=binance_error(code, msg))

    with pytest.raises(errors.Stop) as caught:
        binance.balances()

    assert caught.value.code == "AUTHENTICATION_FAILED"
    assert msg in str(caught.value)
    assert CREDS["secret"] not in str(caught.value)


def test_error_map_lists_every_subclass_before_its_parents() -> None:
    for i, (earlier, _, _) in enumerate(ERROR_MAP):
        for later, _, _ in ERROR_MAP[i + 1:]:
            assert not issubclass(later, earlier), f"{later.__name__} is shadowed by " \
                                                   f"{earlier.__name__}"


@pytest.mark.parametrize(("exc", "cls", "code"), [
    (ccxt.RateLimitExceeded, errors.BackOff, "RATE_LIMITED"),  # a NetworkError subclass
    (ccxt.DDoSProtection, errors.BackOff, "DDOS_PROTECTION"),
    (ccxt.RequestTimeout, errors.Retry, "TIMEOUT"),
    (ccxt.OnMaintenance, errors.Retry, "VENUE_MAINTENANCE"),  # an ExchangeNotAvailable
    (ccxt.ExchangeNotAvailable, errors.Retry, "VENUE_UNAVAILABLE"),
    (ccxt.NetworkError, errors.Retry, "NETWORK_ERROR"),
    (ccxt.OrderNotFound, errors.OrderNotFound, "ORDER_NOT_FOUND"),  # an InvalidOrder
    (ccxt.InvalidOrder, errors.Reject, "INVALID_ORDER"),
    (ccxt.InsufficientFunds, errors.Reject, "INSUFFICIENT_FUNDS"),
    (ccxt.BadSymbol, errors.Reject, "UNKNOWN_SYMBOL"),  # a BadRequest
    (ccxt.BadRequest, errors.Reject, "BAD_REQUEST"),
    (ccxt.AccountSuspended, errors.Stop, "ACCOUNT_SUSPENDED"),  # an AuthenticationError
    (ccxt.PermissionDenied, errors.Stop, "PERMISSION_DENIED"),
    (ccxt.AuthenticationError, errors.Stop, "AUTHENTICATION_FAILED"),
])
def test_each_ccxt_error_maps_to_its_most_specific_class(
        exc: type[Exception], cls: type[errors.BrokerError], code: str) -> None:
    mapped = map_ccxt_error(exc("binance something happened"), venue="ccxt:binance",
                            exchange=ccxt.binance(), action="place_order", symbol="BTC/USDT")

    assert type(mapped) is cls
    assert mapped.code == code
    assert str(mapped) == (f"ccxt:binance: place_order BTC/USDT: "
                           f"{code.lower().replace('_', ' ')}: something happened")


# --- sizes ------------------------------------------------------------------------------


def test_instrument_rules_come_from_the_market_filters(binance: CcxtBroker) -> None:
    rules = binance.instrument_rules("BTC/USDT")

    assert rules.quantity_step == Decimal("0.00001")
    assert rules.min_quantity == Decimal("0.00001")
    assert rules.price_tick == Decimal("0.01")
    assert rules.min_notional == Decimal("5")


@pytest.mark.parametrize(("precision", "mode", "step"), [
    (0.00001, ccxt.TICK_SIZE, Decimal("0.00001")),
    ("0.5", ccxt.TICK_SIZE, Decimal("0.5")),
    (5, ccxt.DECIMAL_PLACES, Decimal("0.00001")),
    (0, ccxt.DECIMAL_PLACES, Decimal("1")),
    (5, ccxt.SIGNIFICANT_DIGITS, Decimal(0)),
    (None, ccxt.TICK_SIZE, Decimal(0)),
])
def test_precision_becomes_a_step_in_every_precision_mode(precision: Any, mode: int,
                                                          step: Decimal) -> None:
    assert precision_step(precision, mode) == step


@pytest.mark.parametrize(("order", "code"), [
    (OrderRequest("mm7-50", "BTC/USDT", "buy", Decimal("0.000004")), "BELOW_MIN_QUANTITY"),
    (OrderRequest("mm7-51", "ETH/USDT", "sell", Decimal("0.00005")), "BELOW_MIN_QUANTITY"),
    (OrderRequest("mm7-52", "BTC/USDT", "buy", Decimal("0.0001"), "limit",
                  limit_price=Decimal("40000")), "BELOW_MIN_NOTIONAL"),
    (OrderRequest("mm7-53", "BTC/USDT", "buy", Decimal("0.001"), "limit"), "INVALID_ORDER"),
])
def test_orders_under_the_venue_minimum_are_refused_before_sending(
        http: responses.RequestsMock, binance: CcxtBroker, order: OrderRequest,
        code: str) -> None:
    with pytest.raises(errors.Reject) as caught:
        binance.place_order(order)

    assert caught.value.code == code
    assert order.symbol in str(caught.value)
    # at most the market list was read: no order request left
    assert {urlsplit(c.request.url).path for c in http.calls} <= {"/api/v3/exchangeInfo"}
    assert calls_to(http, "/api/v3/order") == []


def test_coinbase_market_buys_are_refused_rather_than_sized_in_quote_currency(
        http: responses.RequestsMock) -> None:
    broker = CcxtBroker("coinbase", {"api_key": "organizations/x/apiKeys/y",
                                     "secret": "coinbase-test-secret"}, "live",
                        exchange=ccxt.coinbase({"enableRateLimit": False}))

    with pytest.raises(errors.Reject) as caught:
        broker.place_order(MARKET_BUY)

    assert caught.value.code == "UNSUPPORTED_ORDER"
    assert len(http.calls) == 0


# --- order queries ----------------------------------------------------------------------


def test_order_status_by_broker_id(http: responses.RequestsMock, binance: CcxtBroker) -> None:
    http.get(f"{BINANCE}/order", json=binance_order(status="FILLED", executedQty="0.00123000",
                                                    cummulativeQuoteQty="78.72015990"))

    order = binance.order_status(broker_order_id="28457", symbol="BTC/USDT")

    assert sent(calls_to(http, "/api/v3/order")[0])["orderId"] == "28457"
    assert order.status == "filled"
    assert order.average_price == Decimal("78.7201599") / Decimal("0.00123")


def test_unknown_order_is_order_not_found(http: responses.RequestsMock,
                                          binance: CcxtBroker) -> None:
    http.get(f"{BINANCE}/order", status=400, json=binance_error(-2013, "Order does not exist."))

    with pytest.raises(errors.OrderNotFound) as caught:
        binance.order_status(client_order_id="mm7-99", symbol="BTC/USDT")

    assert "Order does not exist." in str(caught.value)
    assert sent(calls_to(http, "/api/v3/order")[0])["origClientOrderId"] == "mm7-99"


def test_cancel_order(http: responses.RequestsMock, binance: CcxtBroker) -> None:
    http.delete(f"{BINANCE}/order", json={
        "symbol": "BTCUSDT", "origClientOrderId": "mm7-42", "orderId": 28457, "orderListId": -1,
        "clientOrderId": "cancelMyOrder1", "transactTime": T_ORDER, "price": "64000.13000000",
        "origQty": "0.00123000", "executedQty": "0.00000000",
        "cummulativeQuoteQty": "0.00000000", "status": "CANCELED", "timeInForce": "GTC",
        "type": "LIMIT", "side": "SELL", "selfTradePreventionMode": "EXPIRE_MAKER"})

    cancelled = binance.cancel_order("28457", "BTC/USDT")

    (call,) = calls_to(http, "/api/v3/order")
    assert call.request.method == "DELETE"
    assert sent(call)["orderId"] == "28457" and sent(call)["symbol"] == "BTCUSDT"
    assert cancelled.status == "cancelled"


def test_cancelling_a_gone_order_is_order_not_found(http: responses.RequestsMock,
                                                    binance: CcxtBroker) -> None:
    http.delete(f"{BINANCE}/order", status=400, json=binance_error(-2011, "Unknown order sent."))

    with pytest.raises(errors.OrderNotFound, match="Unknown order sent"):
        binance.cancel_order("28457", "BTC/USDT")


def test_open_orders(http: responses.RequestsMock, binance: CcxtBroker) -> None:
    http.get(f"{BINANCE}/openOrders", json=[binance_order()])

    (order,) = binance.open_orders("BTC/USDT")

    assert sent(calls_to(http, "/api/v3/openOrders")[0])["symbol"] == "BTCUSDT"
    assert (order.broker_order_id, order.symbol, order.side) == ("28457", "BTC/USDT", "sell")
    assert (order.quantity, order.status) == (Decimal("0.00123"), "submitted")


# --- fills ------------------------------------------------------------------------------


def binance_trade(trade_id: int, time_ms: int, **overrides: Any) -> dict[str, Any]:
    """One entry of GET /api/v3/myTrades."""
    trade = {"symbol": "BTCUSDT", "id": trade_id, "orderId": 28457, "orderListId": -1,
             "price": "66780.00000000", "qty": "0.00100000", "quoteQty": "66.78000000",
             "commission": "0.00000100", "commissionAsset": "BTC", "time": time_ms,
             "isBuyer": True, "isMaker": False, "isBestMatch": True}
    trade.update(overrides)
    return trade


def recent(hours: int = 6) -> datetime:
    """A `since` a few hours ago, to the millisecond: Binance answers a day per request,
    so a search from further back takes a request per day up to now."""
    now = datetime.now(UTC)
    return (now - timedelta(hours=hours)).replace(microsecond=now.microsecond // 1000 * 1000)


def test_fills_carry_their_own_quantity_fee_and_id(http: responses.RequestsMock,
                                                   binance: CcxtBroker) -> None:
    since = recent()
    start = datetime_to_ms(since)
    http.get(f"{BINANCE}/myTrades", json=[
        binance_trade(3001, start + 123),
        binance_trade(3002, start + 128, qty="0.00023000", price="66790.00000000",
                      commission="0.00361234", commissionAsset="BNB", isBuyer=False,
                      isMaker=True)])

    first, second = binance.fills_since(since, "BTC/USDT")

    query = sent(calls_to(http, "/api/v3/myTrades")[0])
    assert query["symbol"] == "BTCUSDT"
    assert query["startTime"] == str(start)
    assert (first.fill_id, second.fill_id) == ("BTCUSDT:3001", "BTCUSDT:3002")
    assert (first.side, second.side) == ("buy", "sell")
    assert second.quantity == Decimal("0.00023")
    assert second.price == Decimal("66790")
    assert second.commission == Decimal("0.00361234")
    assert second.commission_currency == "BNB"
    assert (first.liquidity, second.liquidity) == ("taker", "maker")
    assert first.broker_order_id == "28457"
    assert first.ts == since + timedelta(milliseconds=123)


def test_fills_page_forward_without_duplicates(http: responses.RequestsMock,
                                               binance: CcxtBroker) -> None:
    since = recent()
    start = datetime_to_ms(since)
    page1 = [binance_trade(i, start + i * 1000) for i in range(1, 1001)]  # a full page (1000)
    page2 = [page1[-1], binance_trade(1001, start + 1_001_000),
             binance_trade(1002, start + 1_002_000)]
    http.get(f"{BINANCE}/myTrades", json=page1)
    http.get(f"{BINANCE}/myTrades", json=page2)

    fills = binance.fills_since(since, "BTC/USDT")

    asked = [sent(c) for c in calls_to(http, "/api/v3/myTrades")]
    assert [q["startTime"] for q in asked] == [str(start), str(start + 1_000_000)]
    assert {q["limit"] for q in asked} == {"1000"}
    assert len(fills) == 1002
    assert len({f.fill_id for f in fills}) == 1002
    assert fills[0].fill_id == "BTCUSDT:1" and fills[-1].fill_id == "BTCUSDT:1002"
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(fills))


def test_binance_fills_are_asked_a_day_at_a_time_past_a_quiet_day(
        http: responses.RequestsMock, binance: CcxtBroker) -> None:
    """Binance answers at most 24 hours per request (oldest first). From 60 hours back,
    with trades on the first and the third day only, every window is asked in turn: the
    empty day in between does not end the search."""
    since = recent(60)
    start = datetime_to_ms(since)
    day = 86_400_000
    history = [binance_trade(i, start + i * 60_000) for i in range(1, 4)] + \
              [binance_trade(100 + i, start + 2 * day + i * 60_000) for i in range(1, 4)]

    def my_trades(request: Any) -> tuple[int, dict[str, str], str]:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        lo, hi = int(q["startTime"]), int(q["endTime"])
        if hi - lo > day:
            return 400, {}, json.dumps(binance_error(
                -1127, "More than 24 hours between startTime and endTime."))
        found = [t for t in history if lo <= int(t["time"]) <= hi][:int(q["limit"])]
        return 200, {}, json.dumps(found)

    http.add_callback(responses.GET, f"{BINANCE}/myTrades", callback=my_trades)

    fills = binance.fills_since(since, "BTC/USDT")

    assert [f.fill_id for f in fills] == [f"BTCUSDT:{i}" for i in (1, 2, 3, 101, 102, 103)]
    windows = [(int(sent(c)["startTime"]), int(sent(c)["endTime"]))
               for c in calls_to(http, "/api/v3/myTrades")]
    assert len(windows) == 3  # 60 hours: three windows of a day, none asked twice
    assert windows[0][0] == start and windows[-1][1] >= datetime_to_ms(datetime.now(UTC))
    assert all(b[0] <= a[1] for a, b in itertools.pairwise(windows))  # no gap between


def test_fills_without_symbol_are_refused_where_the_venue_lists_trades_per_market(
        http: responses.RequestsMock, binance: CcxtBroker) -> None:
    with pytest.raises(errors.Reject) as caught:
        binance.fills_since(datetime(2024, 6, 10, tzinfo=UTC))

    assert caught.value.code == "SYMBOL_REQUIRED"
    assert len(http.calls) == 0


def test_naive_since_is_refused(binance: CcxtBroker) -> None:
    with pytest.raises(ValueError, match="naive"):
        binance.fills_since(datetime(2024, 6, 10), "BTC/USDT")


# --- account ----------------------------------------------------------------------------


ACCOUNT = {
    "makerCommission": 10, "takerCommission": 10, "buyerCommission": 0, "sellerCommission": 0,
    "commissionRates": {"maker": "0.00100000", "taker": "0.00100000", "buyer": "0.00000000",
                        "seller": "0.00000000"},
    "canTrade": True, "canWithdraw": True, "canDeposit": True, "brokered": False,
    "requireSelfTradePrevention": False, "preventSor": False, "updateTime": T_ORDER,
    "accountType": "SPOT",
    "balances": [{"asset": "BTC", "free": "0.50000000", "locked": "0.10000000"},
                 {"asset": "ETH", "free": "2.00000000", "locked": "0.00000000"},
                 {"asset": "LTC", "free": "0.00000000", "locked": "0.00000000"},
                 {"asset": "USDT", "free": "1000.50000000", "locked": "250.00000000"}],
    "permissions": ["SPOT"], "uid": 354937868}


def test_balances_are_decimal_totals_and_free_amounts(http: responses.RequestsMock,
                                                      binance: CcxtBroker) -> None:
    http.get(f"{BINANCE}/account", json=ACCOUNT)

    balances = {b.currency: b for b in binance.balances()}

    assert set(balances) == {"BTC", "ETH", "USDT"}  # LTC is empty
    assert balances["BTC"].total == Decimal("0.6")
    assert balances["BTC"].free == Decimal("0.5")
    assert balances["USDT"].total == Decimal("1250.5")
    assert balances["USDT"].free == Decimal("1000.5")


def test_spot_positions_are_non_cash_balances(http: responses.RequestsMock,
                                              binance: CcxtBroker) -> None:
    http.get(f"{BINANCE}/account", json=ACCOUNT)

    positions = binance.positions()

    assert positions == [BrokerPosition("BTC/USDT", Decimal("0.6"), None),
                         BrokerPosition("ETH/USDT", Decimal("2"), None)]


# --- environment and credentials --------------------------------------------------------


def test_testnet_trades_against_the_sandbox_url(http: responses.RequestsMock) -> None:
    http.get(f"{BINANCE_TEST}/exchangeInfo", json=fixture("binance_exchange_info.json"))
    http.post(f"{BINANCE_TEST}/order", json=binance_order(type="MARKET", side="BUY",
                                                          transactTime=T_ORDER, fills=[]))
    broker = CcxtBroker("binance", dict(CREDS), "testnet")
    broker.exchange.enableRateLimit = False  # no waiting between the two mocked calls

    broker.place_order(MARKET_BUY)

    assert broker.endpoint_url == BINANCE_TEST
    assert broker.is_sandbox
    assert {urlsplit(c.request.url).netloc for c in http.calls} == {"testnet.binance.vision"}
    assert calls_to(http, "/api/v3/order")[0].request.url.startswith(f"{BINANCE_TEST}/order")


def test_live_targets_the_live_url(binance: CcxtBroker) -> None:
    assert binance.endpoint_url == BINANCE
    assert not binance.is_sandbox
    assert isinstance(binance, Broker)


@pytest.mark.parametrize(("exchange_id", "endpoint", "url", "sandbox"), [
    ("bybit", "live", "https://api.bybit.com", False),
    ("bybit", "testnet", "https://api-testnet.bybit.com", True),
    ("okx", "testnet", "https://www.okx.com", True),  # demo trading: same host, a header
    ("kraken", "live", "https://api.kraken.com", False),
    ("coinbase", "live", "https://api.coinbase.com", False),
])
def test_endpoint_url_names_the_targeted_api(http: responses.RequestsMock, exchange_id: str,
                                             endpoint: Any, url: str, sandbox: bool) -> None:
    broker = CcxtBroker(exchange_id, None, endpoint)

    assert broker.endpoint_url == url
    assert broker.is_sandbox is sandbox
    assert broker.venue == f"ccxt:{exchange_id}"
    if exchange_id == "okx" and sandbox:
        assert broker.exchange.headers["x-simulated-trading"] == "1"
    assert len(http.calls) == 0


@pytest.mark.parametrize("exchange_id", ["kraken", "coinbase"])
def test_testnet_is_refused_where_ccxt_has_no_sandbox(http: responses.RequestsMock,
                                                      exchange_id: str) -> None:
    with pytest.raises(errors.EnvironmentMismatch, match=exchange_id):
        CcxtBroker(exchange_id, None, "testnet")

    assert len(http.calls) == 0


def test_live_refuses_an_exchange_in_sandbox_mode() -> None:
    exchange = ccxt.binance()
    exchange.set_sandbox_mode(True)

    with pytest.raises(errors.EnvironmentMismatch, match="sandbox"):
        CcxtBroker("binance", dict(CREDS), "live", exchange=exchange)


def test_credentials_reach_ccxt_and_are_redacted_from_logs() -> None:
    creds = {"api_key": "redact-me-key-93ab", "secret": "redact-me-secret-1f2e"}

    broker = CcxtBroker("binance", creds, "live")

    assert broker.exchange.apiKey == creds["api_key"]
    assert broker.exchange.secret == creds["secret"]
    assert redact(f"signing with {creds['secret']} for {creds['api_key']}") == \
        "signing with *** for ***"


def test_an_unknown_credential_field_stops_without_echoing_its_value() -> None:
    with pytest.raises(errors.Stop) as caught:
        CcxtBroker("binance", {"api_kee": "typo-value-1234"}, "live")

    assert caught.value.code == "BAD_CREDENTIALS"
    assert "api_kee" in str(caught.value)
    assert "typo-value-1234" not in str(caught.value)


def test_an_unknown_exchange_stops() -> None:
    with pytest.raises(errors.Stop, match="no exchange 'notanexchange'"):
        CcxtBroker("notanexchange", None, "live")


# --- the unified path on a second exchange: OKX -----------------------------------------


def okx_fill(trade_id: int, ts_ms: int) -> dict[str, Any]:
    """One entry of GET /api/v5/trade/fills-history (the fields OKX documents)."""
    return {"instType": "SPOT", "instId": "BTC-USDT", "tradeId": str(trade_id),
            "ordId": "312269865356374016", "clOrdId": "", "billId": str(9_000_000 + trade_id),
            "tag": "", "fillPx": "66780.1", "fillSz": "0.001", "side": "buy",
            "posSide": "net", "execType": "T", "feeCcy": "BTC", "fee": "-0.000001",
            "ts": str(ts_ms), "fillTime": str(ts_ms)}


def test_okx_fills_are_all_found_though_it_answers_with_the_newest_first(
        http: responses.RequestsMock, okx: CcxtBroker) -> None:
    """250 fills after `since`: OKX answers a window [begin, end) with its newest 100, so
    fills_since walks back with `end` until it has them all, once each, oldest first."""
    since = datetime(2024, 6, 10, tzinfo=UTC)
    start = int(since.timestamp() * 1000)
    history = [okx_fill(i, start + i * 1000) for i in range(1, 251)]
    history.append(okx_fill(9999, start - 5000))  # before `since`: never returned

    def fills_history(request: Any) -> tuple[int, dict[str, str], str]:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        begin, end = int(q.get("begin", 0)), int(q.get("end", 2**62))
        window = [t for t in history if begin <= int(t["ts"]) < end]
        window.sort(key=lambda t: -int(t["ts"]))  # newest first, as OKX pages
        limit = int(q.get("limit", 100))
        return 200, {}, json.dumps({"code": "0", "msg": "", "data": window[:limit]})

    http.add_callback(responses.GET, f"{OKX}/trade/fills-history", callback=fills_history)

    fills = okx.fills_since(since, "BTC/USDT")

    assert [f.fill_id for f in fills] == [f"BTC-USDT:{i}" for i in range(1, 251)]
    asked = [(sent(c)["begin"], sent(c).get("end")) for c in calls_to(http, "/trade/fills-history")]
    # the newest 100, then back from the oldest seen (its millisecond included: the pages
    # overlap by that trade) twice,
    # then forward from the newest: nothing new
    assert asked == [(str(start), None), (str(start), str(start + 151_001)),
                     (str(start), str(start + 52_001)), (str(start + 250_000), None)]


def test_okx_fills_under_one_page_take_one_request(http: responses.RequestsMock,
                                                    okx: CcxtBroker) -> None:
    since = datetime(2024, 6, 10, tzinfo=UTC)
    start = int(since.timestamp() * 1000)
    http.get(f"{OKX}/trade/fills-history", json={"code": "0", "msg": "", "data": [
        okx_fill(2, start + 2000), okx_fill(1, start + 1000)]})

    fills = okx.fills_since(since, "BTC/USDT")

    assert [f.fill_id for f in fills] == ["BTC-USDT:1", "BTC-USDT:2"]
    assert len(calls_to(http, "/trade/fills-history")) == 1
    assert "end" not in sent(calls_to(http, "/trade/fills-history")[0])



# --- Bybit: a week per request, newest first ---------------------------------------------

BYBIT = "https://api.bybit.com/v5"


@pytest.fixture
def bybit(http: responses.RequestsMock) -> CcxtBroker:
    """A live Bybit broker (spot markets only) from GET /v5/market/instruments-info."""
    http.get(f"{BYBIT}/market/instruments-info", json=fixture("bybit_instruments_spot.json"))
    http.get(f"{BYBIT}/asset/coin/query-info", json={
        "retCode": 0, "retMsg": "", "result": {"rows": []}, "retExtInfo": {}, "time": 1})
    return CcxtBroker("bybit", {"api_key": "test-bybit-key-7a1b", "secret": "test-bybit-sec-2c3d"},
                      "live", exchange=ccxt.bybit({"enableRateLimit": False, "options": {
                          "fetchMarkets": {"types": ["spot"]}}}))


def bybit_execution(exec_id: int, ts_ms: int) -> dict[str, Any]:
    """One entry of GET /v5/execution/list (the fields Bybit documents for spot)."""
    return {"symbol": "BTCUSDT", "orderType": "Market", "underlyingPrice": "",
            "orderLinkId": "mm7-42", "orderId": "1672956721392788736", "stopOrderType": "",
            "execTime": str(ts_ms), "feeCurrency": "BTC", "createType": "", "feeRate": "0.001",
            "tradeIv": "", "blockTradeId": "", "markPrice": "", "execPrice": "66780.1",
            "markIv": "", "orderQty": "0.001", "orderPrice": "0", "execValue": "66.7801",
            "closedSize": "", "execType": "Trade", "seq": 4688002127 + exec_id, "side": "Buy",
            "indexPrice": "", "leavesQty": "0", "isMaker": False, "execFee": "0.000001",
            "execId": str(exec_id), "marketUnit": "", "execQty": "0.001"}


def test_bybit_fills_are_all_found_week_by_week_and_newest_first(
        http: responses.RequestsMock, bybit: CcxtBroker) -> None:
    """Bybit answers at most 7 days per request, newest first, 100 at most. From 15 days
    back: 3 executions in the first days, none for a week, 150 in the last two days. Every
    week is asked, each full page is walked back, and each execution comes once."""
    since = recent(15 * 24)
    start = datetime_to_ms(since)
    week = 7 * 86_400_000
    history = [bybit_execution(i, start + i * 3_600_000) for i in range(1, 4)] + \
              [bybit_execution(1000 + i, start + 13 * 86_400_000 + i * 60_000)
               for i in range(1, 151)]

    def execution_list(request: Any) -> tuple[int, dict[str, str], str]:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        lo = int(q["startTime"])
        hi = int(q.get("endTime", lo + week))
        if hi - lo > week:
            return 200, {}, json.dumps({"retCode": 10001, "retMsg": "The time range between "
                                        "startTime and endTime cannot exceed 7 days.",
                                        "result": {}, "retExtInfo": {}, "time": 1})
        window = sorted((t for t in history if lo <= int(t["execTime"]) <= hi),
                        key=lambda t: -int(t["execTime"]))[:int(q.get("limit", 50))]
        return 200, {}, json.dumps({"retCode": 0, "retMsg": "OK", "result": {
            "nextPageCursor": "", "category": "spot", "list": window},
            "retExtInfo": {}, "time": 1})

    http.add_callback(responses.GET, f"{BYBIT}/execution/list", callback=execution_list)

    fills = bybit.fills_since(since, "BTC/USDT")

    expected = [f"BTCUSDT:{i}" for i in (1, 2, 3, *range(1001, 1151))]
    assert [f.fill_id for f in fills] == expected
    asked = [sent(c) for c in calls_to(http, "/v5/execution/list")]
    assert all(int(q["endTime"]) - int(q["startTime"]) <= week for q in asked)
    assert {q["limit"] for q in asked} == {"100"}
    day, minute = 86_400_000, 60_000
    # week 1; week 2 (its newest 100), walked back from the oldest of those (that
    # millisecond included), then forward from the newest: nothing more; week 3
    assert [(int(q["startTime"]) - start, int(q["endTime"]) - start) for q in asked] == [
        (0, week), (week - 1, 2 * week - 1), (week - 1, 13 * day + 51 * minute + 1),
        (13 * day + 150 * minute, 2 * week - 1), (2 * week - 2, 3 * week - 2)]


# --- Kraken: 50 trades per answer, newest first ------------------------------------------

KRAKEN = "https://api.kraken.com/0"


@pytest.fixture
def kraken(http: responses.RequestsMock) -> CcxtBroker:
    http.get(f"{KRAKEN}/public/Assets", json=fixture("kraken_assets.json"))
    http.get(f"{KRAKEN}/public/AssetPairs", json=fixture("kraken_asset_pairs.json"))
    return CcxtBroker("kraken", {"api_key": "test-kraken-key-4e5f",
                                 "secret": "dGVzdC1rcmFrZW4tc2VjcmV0LTZhN2I="},
                      "live", exchange=ccxt.kraken({"enableRateLimit": False}))


def test_kraken_fills_are_all_found_though_it_answers_50_newest_first(
        http: responses.RequestsMock, kraken: CcxtBroker) -> None:
    """POST /0/private/TradesHistory answers the 50 newest trades after `start` (seconds,
    exclusive) up to `end` (inclusive). 120 trades: fills_since takes Kraken's page as
    full at 50, not at ccxt's default of 100, and walks back until it has them all."""
    since = recent()
    start = datetime_to_ms(since)
    history = {f"T{i:05d}-AAAAA-BBBBBB": start + i * 10_000 for i in range(1, 121)}

    def trades_history(request: Any) -> tuple[int, dict[str, str], str]:
        form = sent(request_call(request))
        lo, hi = float(form.get("start", 0)), float(form.get("end", 2**40))
        window = sorted(((tid, ms) for tid, ms in history.items() if lo < ms / 1000 <= hi),
                        key=lambda x: -x[1])
        trades = {tid: {"ordertxid": "OQCLML-BW3P3-BUCMWZ", "postxid": "TKH2SE-M7IF5-CFI7LT",
                        "pair": "XXBTZUSD", "time": ms / 1000, "type": "buy",
                        "ordertype": "limit", "price": "30010.0", "cost": "600.2",
                        "fee": "0.96", "vol": "0.02", "margin": "0.0", "misc": "",
                        "trade_id": 40274859 + k, "maker": True}
                  for k, (tid, ms) in enumerate(window[:50])}
        return 200, {}, json.dumps({"error": [], "result": {"trades": trades,
                                                             "count": len(window)}})

    http.add_callback(responses.POST, f"{KRAKEN}/private/TradesHistory",
                      callback=trades_history)

    fills = kraken.fills_since(since, "BTC/USD")

    assert [f.fill_id for f in fills] == [f"XXBTZUSD:T{i:05d}-AAAAA-BBBBBB"
                                          for i in range(1, 121)]
    assert fills[0].commission == Decimal("0.96") and fills[0].liquidity == "maker"
    assert len(calls_to(http, "/private/TradesHistory")) == 4


# --- Coinbase (Advanced Trade): 3000 fills per answer, newest first ---------------------

COINBASE = "https://api.coinbase.com"
COINBASE_FILLS = "/api/v3/brokerage/orders/historical/fills"
# A CDP API key: its name, and an EC P-256 private key that signs each request's JWT (ES256).
COINBASE_KEY_NAME = "organizations/0d7f3c2a-5b1e-4c8d/apiKeys/9a6b4e21-7c3f-4d0a"
COINBASE_KEY_PEM = ec.generate_private_key(ec.SECP256R1()).private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption()).decode()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def coinbase_product(product_id: str, base: str, quote: str) -> dict[str, Any]:
    """One entry of GET /api/v3/brokerage/market/products (a spot product)."""
    return {"product_id": product_id, "price": "66780.12", "price_percentage_change_24h": "1.2",
            "volume_24h": "10967.87426597", "volume_percentage_change_24h": "-3.4",
            "base_increment": "0.00000001", "quote_increment": "0.01", "quote_min_size": "1",
            "quote_max_size": "150000000", "base_min_size": "0.00000001",
            "base_max_size": "3400", "base_name": base, "quote_name": quote,
            "watched": False, "is_disabled": False, "new": False, "status": "online",
            "cancel_only": False, "limit_only": False, "post_only": False,
            "trading_disabled": False, "auction_mode": False, "product_type": "SPOT",
            "quote_currency_id": quote, "base_currency_id": base,
            "fcm_trading_session_details": None, "mid_market_price": "", "alias": "",
            "alias_to": [], "base_display_symbol": base, "quote_display_symbol": quote,
            "view_only": False, "price_increment": "0.01", "display_name": product_id,
            "product_venue": "CBE"}


@pytest.fixture
def coinbase(http: responses.RequestsMock) -> CcxtBroker:
    """A live Coinbase broker with a CDP key. ccxt loads its markets from the Advanced Trade
    products (spot, then futures: none here) and the fee tier, and its currencies from the
    v2 currencies and exchange rates."""
    def products(request: Any) -> tuple[int, dict[str, str], str]:
        futures = parse_qs(urlsplit(request.url).query).get("product_type") == ["FUTURE"]
        listed = [] if futures else [coinbase_product("BTC-USD", "BTC", "USD"),
                                     coinbase_product("ETH-USD", "ETH", "USD")]
        return 200, {}, json.dumps({"products": listed, "num_products": len(listed)})

    http.add_callback(responses.GET, f"{COINBASE}/api/v3/brokerage/market/products",
                      callback=products)
    http.get(f"{COINBASE}/api/v3/brokerage/transaction_summary", json={
        "total_volume": 0, "total_fees": 0, "fee_tier": {
            "pricing_tier": "Advanced 1", "usd_from": "0", "usd_to": "1000",
            "taker_fee_rate": "0.006", "maker_fee_rate": "0.004"},
        "margin_rate": None, "goods_and_services_tax": None,
        "advanced_trade_only_volume": 0, "advanced_trade_only_fees": 0,
        "coinbase_pro_volume": 0, "coinbase_pro_fees": 0})
    http.get(f"{COINBASE}/v2/currencies", json={"data": [
        {"id": "USD", "name": "US Dollar", "min_size": "0.01"}]})
    http.get(f"{COINBASE}/v2/currencies/crypto", json={"data": [
        {"asset_id": "5b71fc48-3dd3-540c-809b-f8c94d0e68b5", "code": "BTC", "name": "Bitcoin",
         "color": "#F7931A", "sort_index": 100, "exponent": 8, "type": "crypto",
         "address_regex": "^([13][a-km-zA-HJ-NP-Z1-9]{25,34})$"},
        {"asset_id": "d85dce9b-5b73-5c3c-8978-522ce1d1c1b4", "code": "ETH", "name": "Ethereum",
         "color": "#627EEA", "sort_index": 102, "exponent": 8, "type": "crypto",
         "address_regex": "^(?:0x)?[0-9a-fA-F]{40}$"}]})
    http.get(f"{COINBASE}/v2/exchange-rates", json={"data": {"currency": "USD", "rates": {
        "BTC": "0.0000149745", "ETH": "0.000287", "USD": "1.0"}}})
    return CcxtBroker("coinbase", {"api_key": COINBASE_KEY_NAME, "secret": COINBASE_KEY_PEM},
                      "live", exchange=ccxt.coinbase({"enableRateLimit": False}))


def rfc3339_ns(ns: int) -> str:
    """A time in nanoseconds since the epoch as Coinbase writes fill times (9 digits)."""
    seconds, fraction = divmod(ns, 10**9)
    return f"{datetime.fromtimestamp(seconds, UTC):%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"


def coinbase_trade_id(n: int) -> str:
    """A UUID like Coinbase's trade ids, in the order of `n` (as the fills are numbered)."""
    return f"{n:08x}-bbbe-4a1e-9c2f-5d3e6a7b8c9d"


def coinbase_fill(n: int, ns: int) -> dict[str, Any]:
    """One entry of GET /api/v3/brokerage/orders/historical/fills (the documented fields).
    Prices, sizes and commissions differ fill by fill; odd fills are taker sells."""
    price = Decimal(6_600_000 + n) / 100
    size = Decimal(n) / 10**8
    return {"entry_id": hashlib.sha256(f"entry-{n}".encode()).hexdigest(),
            "trade_id": coinbase_trade_id(n),
            "order_id": f"813a53c5-3e39-47bb-863d-{n % 7:012d}",
            "trade_time": rfc3339_ns(ns), "trade_type": "FILL", "price": str(price),
            "size": str(size), "commission": str(price * size * Decimal("0.004")),
            "product_id": "BTC-USD", "sequence_timestamp": rfc3339_ns(ns + 1_143_000),
            "liquidity_indicator": "TAKER" if n % 2 else "MAKER", "size_in_quote": False,
            "user_id": "3f1c2d4e-5a6b-5c7d-8e9f-0a1b2c3d4e5f", "side": "SELL" if n % 2 else "BUY",
            "retail_portfolio_id": "4444-444444-4444444"}


def rfc3339_to_ns(text: str) -> int:
    return (datetime.fromisoformat(text) - _EPOCH) // timedelta(microseconds=1) * 1000


def serve_coinbase_fills(http: responses.RequestsMock, history: list[dict[str, Any]]) -> None:
    """GET .../orders/historical/fills as Coinbase answers it: the fills of the product
    traded at or after start_sequence_timestamp and before end_sequence_timestamp (both
    documented as bounds on the trade time), newest first, `limit` at most, with a cursor
    to the next (older) page when there is one."""
    def fills(request: Any) -> tuple[int, dict[str, str], str]:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        lo = rfc3339_to_ns(q["start_sequence_timestamp"])
        hi = rfc3339_to_ns(q["end_sequence_timestamp"]) if "end_sequence_timestamp" in q \
            else 2**80
        window = sorted((f for f in history if f["product_id"] == q["product_id"]
                         and lo <= rfc3339_to_ns(f["trade_time"]) < hi),
                        key=lambda f: rfc3339_to_ns(f["trade_time"]), reverse=True)
        limit = int(q["limit"])
        return 200, {}, json.dumps({"fills": window[:limit],
                                    "cursor": "789100" if len(window) > limit else ""})

    http.add_callback(responses.GET, f"{COINBASE}{COINBASE_FILLS}", callback=fills)


COINBASE_SINCE = datetime(2024, 6, 10, tzinfo=UTC)
COINBASE_START = datetime_to_ms(COINBASE_SINCE)


def coinbase_history(count: int, shared_ms_with: int | None = None) -> dict[int, int]:
    """Fill number -> trade time (ns): a fill a second from COINBASE_SINCE, each some way
    into its millisecond. With `shared_ms_with`, that fill and its two neighbours trade in
    one millisecond."""
    times = {n: (COINBASE_START + n * 1000) * 10**6 + n * 7_919_333 % 999_000_000
             for n in range(1, count + 1)}
    if shared_ms_with is not None:
        ms = times[shared_ms_with] // 10**6
        for k, n in enumerate((shared_ms_with - 1, shared_ms_with, shared_ms_with + 1)):
            times[n] = ms * 10**6 + 100_000 + 300_000 * k
    return times


def coinbase_asked(http: responses.RequestsMock) -> list[dict[str, str]]:
    return [sent(c) for c in calls_to(http, COINBASE_FILLS)]


def test_coinbase_fills_are_all_found_though_it_answers_3000_newest_first(
        http: responses.RequestsMock, coinbase: CcxtBroker) -> None:
    """7000 BTC-USD fills after `since` (and one ETH-USD fill, one before `since`):
    Coinbase answers with the newest 3000 (ccxt's page), so fills_since walks back over
    two more pages. Fills 4000-4002 trade in one millisecond, the oldest of the first
    page's: the walk back asks up to that millisecond included, and finds 4000."""
    times = coinbase_history(7000, shared_ms_with=4001)
    history = [coinbase_fill(n, ns) for n, ns in times.items()]
    history.append(coinbase_fill(9_999, (COINBASE_START - 5000) * 10**6))  # before `since`
    history.append({**coinbase_fill(8_888, times[5000] + 1), "product_id": "ETH-USD"})
    serve_coinbase_fills(http, history)

    fills = coinbase.fills_since(COINBASE_SINCE, "BTC/USD")

    assert [f.fill_id for f in fills] == [f"BTC-USD:{coinbase_trade_id(n)}"
                                          for n in range(1, 7001)]
    for fill, n in zip(fills, range(1, 7001), strict=True):
        raw = history[n - 1]
        assert fill.symbol == "BTC/USD"
        assert fill.side == ("sell" if n % 2 else "buy")
        assert fill.liquidity == ("taker" if n % 2 else "maker")
        assert fill.quantity == Decimal(raw["size"]) == Decimal(n) / 10**8
        assert fill.price == Decimal(raw["price"]) == Decimal(6_600_000 + n) / 100
        assert fill.commission == Decimal(raw["commission"])
        assert fill.commission_currency == "USD"
        assert fill.broker_order_id == raw["order_id"]
        # the trade time, to ccxt's millisecond, aware UTC
        assert fill.ts == _EPOCH + timedelta(milliseconds=times[n] // 10**6)
        assert fill.ts.tzinfo is UTC
    assert fills[3].quantity == Decimal("0.00000004") and fills[3].price == Decimal("66000.04")
    assert fills[3].commission == Decimal("0.0000105600064")
    assert fills[3999].ts == fills[4000].ts == fills[4001].ts
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(fills))
    assert len(coinbase_asked(http)) == 4


def test_coinbase_fills_requests_name_the_product_the_time_bounds_and_the_page_size(
        http: responses.RequestsMock, coinbase: CcxtBroker) -> None:
    """What fills_since and ccxt send for the 7000 fills: the product id, limit 3000 (the
    page ccxt declares for Coinbase), start_sequence_timestamp at `since`, and for each
    walk back end_sequence_timestamp one millisecond past the oldest fill seen (ISO 8601,
    milliseconds, UTC); no cursor (the walk goes by time), a JWT of the CDP key each time.
    Then one request forward from the newest fill, which brings nothing new."""
    times = coinbase_history(7000, shared_ms_with=4001)
    serve_coinbase_fills(http, [coinbase_fill(n, ns) for n, ns in times.items()])

    coinbase.fills_since(COINBASE_SINCE, "BTC/USD")

    def iso_ms(n: int, plus_ms: int = 0) -> str:  # the millisecond fill `n` traded in
        at = _EPOCH + timedelta(milliseconds=times[n] // 10**6 + plus_ms)
        return f"{at:%Y-%m-%dT%H:%M:%S}.{at.microsecond // 1000:03d}Z"

    page = {"product_id": "BTC-USD", "limit": "3000"}
    assert iso_ms(4001) == "2024-06-10T01:06:41.716Z"
    assert coinbase_asked(http) == [
        {**page, "start_sequence_timestamp": "2024-06-10T00:00:00.000Z"},
        # fills 4001-7000; back from 4001's millisecond (4000 and 4002 share it)
        {**page, "start_sequence_timestamp": "2024-06-10T00:00:00.000Z",
         "end_sequence_timestamp": "2024-06-10T01:06:41.717Z"},
        # fills 1003-4002; back from 1003's millisecond
        {**page, "start_sequence_timestamp": "2024-06-10T00:00:00.000Z",
         "end_sequence_timestamp": iso_ms(1003, plus_ms=1)},
        # fills 1-1003, a short page; then forward from the newest fill (7000)
        {**page, "start_sequence_timestamp": iso_ms(7000)},
    ]
    assert iso_ms(1003, plus_ms=1) == "2024-06-10T00:16:43.951Z"
    assert iso_ms(7000) == "2024-06-10T01:56:40.490Z"
    for call in calls_to(http, COINBASE_FILLS):
        assert call.request.method == "GET"
        assert call.request.headers["Authorization"].startswith("Bearer ey")


def test_coinbase_walk_back_ends_at_a_short_page(http: responses.RequestsMock,
                                                 coinbase: CcxtBroker) -> None:
    """3400 fills: the newest 3000 are a full page, so fills_since walks back once; that
    answer (fills 1-401) is short, which ends the walk: no request reaches further back,
    and the one request forward from the newest fill brings nothing new."""
    times = coinbase_history(3400)
    serve_coinbase_fills(http, [coinbase_fill(n, ns) for n, ns in times.items()])

    fills = coinbase.fills_since(COINBASE_SINCE, "BTC/USD")

    assert [f.fill_id for f in fills] == [f"BTC-USD:{coinbase_trade_id(n)}"
                                          for n in range(1, 3401)]
    assert fills[0].ts == COINBASE_SINCE + timedelta(seconds=1, milliseconds=7)
    assert fills[0].quantity == Decimal("0.00000001") and fills[0].side == "sell"
    page = {"product_id": "BTC-USD", "limit": "3000"}
    assert coinbase_asked(http) == [
        {**page, "start_sequence_timestamp": "2024-06-10T00:00:00.000Z"},
        {**page, "start_sequence_timestamp": "2024-06-10T00:00:00.000Z",
         "end_sequence_timestamp": "2024-06-10T00:06:41.179Z"},  # fill 401's ms, + 1 ms
        {**page, "start_sequence_timestamp": "2024-06-10T00:56:40.951Z"},  # fill 3400's ms
    ]


def okx_ack(cid: str, code: str = "0", msg: str = "Order placed") -> dict[str, Any]:
    """POST /api/v5/trade/batch-orders (ccxt sends single orders through the batch path)."""
    return {"code": "0" if code == "0" else "1", "msg": "" if code == "0" else
            "All operations failed", "data": [{"clOrdId": cid, "ordId":
                                               "312269865356374016" if code == "0" else "",
                                               "tag": "", "ts": "1718000000123",
                                               "sCode": code, "sMsg": msg}],
            "inTime": "1718000000121000", "outTime": "1718000000124000"}


def test_okx_orders_go_through_the_same_unified_path(http: responses.RequestsMock,
                                                     okx: CcxtBroker) -> None:
    cid_buy, cid_sell = venue_client_id("okx", "mm7-42"), venue_client_id("okx", "mm7-43")
    http.post(f"{OKX}/trade/batch-orders", json=okx_ack(cid_buy))
    http.post(f"{OKX}/trade/batch-orders", json=okx_ack(cid_sell))

    bought = okx.place_order(MARKET_BUY)
    sold = okx.place_order(OrderRequest("mm7-43", "BTC/USDT", "sell", Decimal("0.0012399"),
                                        "limit", limit_price=Decimal("64000.06")))

    (buy,), (sell,) = (json_body(c) for c in calls_to(http, "/trade/batch-orders"))
    assert buy == {"instId": "BTC-USDT", "side": "buy", "ordType": "market", "sz": "0.0012399",
                   "tdMode": "cash", "tgtCcy": "base_ccy", "clOrdId": cid_buy}
    assert sell["ordType"] == "limit" and sell["side"] == "sell"
    assert sell["px"] == "64000.1"  # the 0.1 tick
    assert sell["clOrdId"] == cid_sell
    assert re.fullmatch(r"[0-9a-f]{32}", cid_buy) and cid_buy != cid_sell
    assert (bought.broker_order_id, bought.client_order_id) == ("312269865356374016", "mm7-42")
    assert (bought.status, bought.quantity) == ("submitted", Decimal("0.0012399"))
    assert sold.client_order_id == "mm7-43"


def test_okx_duplicate_clordid_returns_the_existing_order(http: responses.RequestsMock,
                                                          okx: CcxtBroker) -> None:
    cid = venue_client_id("okx", "mm7-42")
    http.post(f"{OKX}/trade/batch-orders", json=okx_ack(cid, "51016", "Duplicated clOrdId"))
    http.get(f"{OKX}/trade/order", json={"code": "0", "msg": "", "data": [{
        "accFillSz": "0.0012399", "algoClOrdId": "", "algoId": "", "attachAlgoClOrdId": "",
        "attachAlgoOrds": [], "avgPx": "66780.1", "cTime": "1718000000123",
        "cancelSource": "", "cancelSourceReason": "", "category": "normal", "ccy": "",
        "clOrdId": cid, "fee": "-0.0000012399", "feeCcy": "BTC", "fillPx": "66780.1",
        "fillSz": "0.0012399", "fillTime": "1718000000200", "instId": "BTC-USDT",
        "instType": "SPOT", "isTpLimit": "false", "lever": "", "linkedAlgoOrd": {"algoId": ""},
        "ordId": "312269865356374016", "ordType": "market", "pnl": "0", "posSide": "net",
        "px": "", "pxType": "", "pxUsd": "", "pxVol": "", "quickMgnType": "", "rebate": "0",
        "rebateCcy": "USDT", "reduceOnly": "false", "side": "buy", "slOrdPx": "",
        "slTriggerPx": "", "slTriggerPxType": "", "source": "", "state": "filled", "stpId": "",
        "stpMode": "cancel_maker", "sz": "0.0012399", "tag": "", "tdMode": "cash",
        "tgtCcy": "base_ccy", "tpOrdPx": "", "tpTriggerPx": "", "tpTriggerPxType": "",
        "tradeId": "123456", "uTime": "1718000000200"}]})

    found = okx.place_order(MARKET_BUY)

    lookup = sent(calls_to(http, "/trade/order")[0])
    assert lookup == {"instId": "BTC-USDT", "clOrdId": cid}
    assert found.client_order_id == "mm7-42"
    assert found.status == "filled"
    assert found.filled_quantity == Decimal("0.0012399")
    assert found.average_price == Decimal("66780.1")


def test_okx_rejection_carries_the_order_message(http: responses.RequestsMock,
                                                 okx: CcxtBroker) -> None:
    http.post(f"{OKX}/trade/batch-orders", json=okx_ack(
        venue_client_id("okx", "mm7-42"), "51008",
        "Order failed. Insufficient USDT balance in account."))

    with pytest.raises(errors.Reject) as caught:
        okx.place_order(MARKET_BUY)

    assert caught.value.code == "INSUFFICIENT_FUNDS"
    assert str(caught.value).endswith("Order failed. Insufficient USDT balance in account.")


# --- client ids -------------------------------------------------------------------------


def test_client_ids_are_kept_where_valid_and_digested_where_not() -> None:
    assert venue_client_id("binance", "mm7-42") == "mm7-42"
    assert venue_client_id("bybit", "mm7-42") == "mm7-42"
    assert venue_client_id("okx", "mm742") == "mm742"
    digest = venue_client_id("okx", "mm7-42")
    assert re.fullmatch(r"[0-9a-f]{32}", digest)
    assert digest == venue_client_id("okx", "mm7-42")  # stable across processes
    assert venue_client_id("kraken", "mm7-42") == "mm7-42"
    assert len(venue_client_id("kraken", "mm123456-7890123456")) == 32
    assert venue_client_id("binance", "m" * 40) != "m" * 40


def test_times_are_aware_utc() -> None:
    ts = ms_to_datetime(T_ORDER)
    assert ts.utcoffset() == timedelta(0)
    assert datetime_to_ms(ts) == T_ORDER


# --- deposits and withdrawals (cash_movements_since) -------------------------------------

BINANCE_SAPI = "https://api.binance.com/sapi/v1"
DAY_MS = 86_400_000


def binance_deposit(dep_id: str, coin: str, amount: str, insert_ms: int,
                    status: int = 1) -> dict[str, Any]:
    """One entry of GET /sapi/v1/capital/deposit/hisrec (the fields Binance documents)."""
    return {"id": dep_id, "amount": amount, "coin": coin, "network": "BSC", "status": status,
            "address": "0xc9c923c87347ca0f3451d6d308ce84f691b9f501", "addressTag": "",
            "txId": f"0x{dep_id}e1f", "insertTime": insert_ms, "completeTime": insert_ms + 5000,
            "transferType": 0, "confirmTimes": "15/15", "unlockConfirm": 0, "walletType": 0}


def binance_withdrawal(wd_id: str, coin: str, amount: str, fee: str, apply_s: int,
                       status: int = 6, transfer_type: int = 0) -> dict[str, Any]:
    """One entry of GET /sapi/v1/capital/withdraw/history (applyTime is UTC, to the second)."""
    apply = datetime.fromtimestamp(apply_s, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return {"id": wd_id, "amount": amount, "transactionFee": fee, "coin": coin, "status": status,
            "address": "0x94df8b352de7f46f64b01d3666bf6e936e44ce60",
            "txId": f"0x{wd_id}77d0", "applyTime": apply, "network": "ETH",
            "transferType": transfer_type, "info": "", "confirmNo": 12, "walletType": 0,
            "txKey": "", "completeTime": apply}


def movement_rows(movements: Any) -> list[tuple[str, str, Decimal, str, datetime]]:
    return [(m.movement_id, m.kind, m.amount, m.currency, m.ts) for m in movements]


def test_binance_deposits_and_withdrawals_of_cash_become_movements(
        http: responses.RequestsMock, binance: CcxtBroker) -> None:
    """Cash deposits credit, withdrawals debit, a withdrawal's fee is a movement of its own;
    a coin deposited or withdrawn, a pending deposit and a cancelled withdrawal are left out,
    and the movements come oldest first."""
    since = recent()
    start = datetime_to_ms(since)
    sec = start // 1000
    http.get(f"{BINANCE_SAPI}/capital/deposit/hisrec", json=[
        binance_deposit("769800519366885376", "USDT", "4500.12345678", start + 60_000),
        binance_deposit("769800519366885377", "BTC", "0.01844487", start + 90_000),
        binance_deposit("769800519366885378", "USDC", "100.00000000", start + 95_000, status=0),
        binance_deposit("769800519366885379", "FDUSD", "250.00000000", start + 300_000,
                        status=6),  # credited, not yet withdrawable: on the balance already
    ])
    http.get(f"{BINANCE_SAPI}/capital/withdraw/history", json=[
        binance_withdrawal("b6ae22b3aa844210a7041aee7589627c", "USDT", "8.91000000", "0.004",
                           sec + 180),
        binance_withdrawal("9a67628b16ba4988ae20d329333f16bc", "USDT", "51", "1", sec + 200,
                           status=1),  # cancelled
        binance_withdrawal("69e53ad305124b96b43668ceab158a18", "ETH", "0.5", "0.0012",
                           sec + 240),
        binance_withdrawal("a7cdc0afbfa44a48bd225c9ece958fe2", "USDT", "20", "0", sec + 600,
                           transfer_type=1),  # to another Binance account: no fee
    ])

    movements = binance.cash_movements_since(since)

    at = ms_to_datetime
    assert movement_rows(movements) == [
        ("deposit:769800519366885376", "deposit", Decimal("4500.12345678"), "USDT",
         at(start + 60_000)),
        ("withdrawal:b6ae22b3aa844210a7041aee7589627c", "withdrawal", Decimal("-8.91"), "USDT",
         at((sec + 180) * 1000)),
        ("withdrawal:b6ae22b3aa844210a7041aee7589627c:fee", "fee", Decimal("-0.004"), "USDT",
         at((sec + 180) * 1000)),
        ("deposit:769800519366885379", "deposit", Decimal("250"), "FDUSD", at(start + 300_000)),
        ("withdrawal:a7cdc0afbfa44a48bd225c9ece958fe2", "withdrawal", Decimal("-20"), "USDT",
         at((sec + 600) * 1000)),
    ]
    assert all(m.ts.tzinfo is not None and m.symbol is None for m in movements)
    assert movements[0].description == "deposit on BEP20, tx 0x769800519366885376e1f"
    assert movements[4].description is not None and "internal transfer" in movements[4].description
    (deposits,) = calls_to(http, "/sapi/v1/capital/deposit/hisrec")
    (withdrawals,) = calls_to(http, "/sapi/v1/capital/withdraw/history")
    for call in (deposits, withdrawals):
        query = sent(call)
        assert query["startTime"] == str(start)
        assert query["endTime"] == str(start + 90 * DAY_MS)  # Binance's 90-day cap
        assert query["limit"] == "1000"
        assert "coin" not in query and "offset" not in query
        assert call.request.headers["X-MBX-APIKEY"] == CREDS["api_key"]


def test_binance_transfers_are_asked_90_days_at_a_time_and_paged_by_offset(
        http: responses.RequestsMock, binance: CcxtBroker) -> None:
    """100 days back: two windows of 90 days. The first holds 1003 deposits, more than an
    answer's 1000, so it is asked again from offset 1000; the second holds two."""
    since = recent(100 * 24)
    start = datetime_to_ms(since)
    history = [binance_deposit(str(10_000 + i), "USDT", "1.5", start + i * 1000)
               for i in range(1003)]
    history += [binance_deposit(str(20_000 + i), "USDT", "2", start + 95 * DAY_MS + i)
                for i in range(2)]

    def hisrec(request: Any) -> tuple[int, dict[str, str], str]:
        q = sent(request_call(request))
        lo, hi = int(q["startTime"]), int(q["endTime"])
        if hi - lo > 90 * DAY_MS:
            return 400, {}, json.dumps(binance_error(-1127, "More than 90 days between "
                                                            "startTime and endTime."))
        window = sorted((d for d in history if lo <= d["insertTime"] <= hi),
                        key=lambda d: -d["insertTime"])  # newest first, as Binance answers
        offset, limit = int(q.get("offset", 0)), int(q["limit"])
        return 200, {}, json.dumps(window[offset:offset + limit])

    http.add_callback(responses.GET, f"{BINANCE_SAPI}/capital/deposit/hisrec", callback=hisrec)
    http.get(f"{BINANCE_SAPI}/capital/withdraw/history", json=[])

    movements = binance.cash_movements_since(since)

    assert len(movements) == 1005
    assert len({m.movement_id for m in movements}) == 1005
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(movements))
    asked = [(int(sent(c)["startTime"]) - start, sent(c).get("offset"))
             for c in calls_to(http, "/capital/deposit/hisrec")]
    assert asked == [(0, None), (0, "1000"), (90 * DAY_MS, None)]
    assert [int(sent(c)["startTime"]) - start
            for c in calls_to(http, "/capital/withdraw/history")] == [0, 90 * DAY_MS]


def bybit_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"retCode": 0, "retMsg": "success", "result": {"rows": rows, "nextPageCursor": ""},
            "retExtInfo": {}, "time": 1672191992512}


def bybit_deposit(dep_id: str, coin: str, amount: str, success_ms: int,
                  status: int = 3) -> dict[str, Any]:
    """One row of GET /v5/asset/deposit/query-record (status 3: success)."""
    return {"id": dep_id, "coin": coin, "chain": "TRX", "amount": amount,
            "txID": f"0b038ea12fa1575e2d{dep_id}", "status": status,
            "toAddress": "TC6NCAC5WSVCCiaD3kWZXyW91ZKKhLm53b", "tag": "", "depositFee": "",
            "successAt": str(success_ms), "confirmations": "100", "txIndex": "0",
            "blockHash": "0000000002ac3b1064aee94bca1bd0b58c4c09c65813b084b87a2063d961129e",
            "batchReleaseLimit": "-1", "depositType": "0", "fromAddress": ""}


def bybit_withdrawal(wd_id: str, coin: str, amount: str, fee: str, create_ms: int,
                     status: str = "success", withdraw_type: int = 0) -> dict[str, Any]:
    """One row of GET /v5/asset/withdraw/query-record."""
    return {"coin": coin, "chain": "internalAddressChain" if withdraw_type else "TRX",
            "amount": amount, "txID": "" if withdraw_type else f"de5ea0a2f2e59dc9{wd_id}",
            "status": status, "toAddress": "999805" if withdraw_type else
            "TQdmFKUoe1Lk2iwZuwRJEHJreTUBoN3BAw", "tag": "", "withdrawFee": fee,
            "createTime": str(create_ms), "updateTime": str(create_ms + 60_000),
            "withdrawId": wd_id, "withdrawType": withdraw_type}


def test_bybit_deposits_and_withdrawals_of_cash_become_movements(
        http: responses.RequestsMock, bybit: CcxtBroker) -> None:
    """A deposit and a withdrawal may share an id (9976 here): the kind prefix keeps the
    movement ids apart. Withdrawals are asked for on-chain and off-chain alike."""
    since = recent()
    start = datetime_to_ms(since)
    http.get(f"{BYBIT}/asset/deposit/query-record", json=bybit_rows([
        bybit_deposit("9976", "USDT", "1000.5", start + 60_000),
        bybit_deposit("9980", "USDC", "300", start + 70_000, status=1),  # to be confirmed
        bybit_deposit("9981", "ETH", "1.25", start + 80_000),
    ]))
    http.get(f"{BYBIT}/asset/withdraw/query-record", json=bybit_rows([
        bybit_withdrawal("9978", "USDT", "40", "1", start + 200_000, status="SecurityCheck"),
        bybit_withdrawal("9977", "USDT", "12.34", "1", start + 180_000, status="CancelByUser"),
        bybit_withdrawal("13310", "USDT", "20.1234", "0", start + 150_000, withdraw_type=1),
        bybit_withdrawal("9976", "USDT", "77", "1", start + 120_000),
    ]))

    movements = bybit.cash_movements_since(since)

    at = ms_to_datetime
    assert movement_rows(movements) == [
        ("deposit:9976", "deposit", Decimal("1000.5"), "USDT", at(start + 60_000)),
        ("withdrawal:9976", "withdrawal", Decimal("-77"), "USDT", at(start + 120_000)),
        ("withdrawal:9976:fee", "fee", Decimal("-1"), "USDT", at(start + 120_000)),
        ("withdrawal:13310", "withdrawal", Decimal("-20.1234"), "USDT", at(start + 150_000)),
    ]
    (deposits,) = calls_to(http, "/v5/asset/deposit/query-record")
    (withdrawals,) = calls_to(http, "/v5/asset/withdraw/query-record")
    for call in (deposits, withdrawals):
        query = sent(call)
        assert query["startTime"] == str(start)
        assert query["endTime"] == str(start + 30 * DAY_MS - 1000)  # under Bybit's 30 days
        assert query["limit"] == "50"
        assert "coin" not in query and "cursor" not in query
    assert sent(withdrawals)["withdrawType"] == "2"  # on-chain and off-chain
    assert "withdrawType" not in sent(deposits)


def okx_answer(data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"code": "0", "msg": "", "data": data}


def okx_deposit(dep_id: str, ccy: str, amt: str, ts_ms: int, state: str = "2") -> dict[str, Any]:
    """One entry of GET /api/v5/asset/deposit-history (state 2: deposit successful)."""
    return {"actualDepBlkConfirm": "20", "amt": amt, "areaCodeFrom": "", "ccy": ccy,
            "chain": f"{ccy}-TRC20", "depId": dep_id, "from": "", "fromWdId": "",
            "state": state, "to": "TN4hGjVXMzy5nnFQ3Vm6g9b4N1aGizqs", "ts": str(ts_ms),
            "txId": f"fee235b3e812{dep_id}857d36bb0426917f0df1802"}


def okx_withdrawal(wd_id: str, ccy: str, amt: str, fee: str, ts_ms: int,
                   state: str = "2") -> dict[str, Any]:
    """One entry of GET /api/v5/asset/withdrawal-history (state 2: success)."""
    return {"note": "", "chain": f"{ccy}-TRC20", "fee": fee, "feeCcy": ccy, "ccy": ccy,
            "clientId": "", "toAddrType": "1", "amt": amt,
            "txId": f"00cff6ec7fa7c7d7{wd_id}", "from": "156****359", "areaCodeFrom": "86",
            "to": "TEY6qjnKDyyq5jDc3DJizWLCdUySrpQ4yp", "areaCodeTo": "", "state": state,
            "ts": str(ts_ms), "nonTradableAsset": False, "wdId": wd_id}


def test_okx_deposits_and_withdrawals_of_cash_become_movements(
        http: responses.RequestsMock, okx: CcxtBroker) -> None:
    """OKX answers newest first; its fee is not in `amt` (a movement of its own). A deposit
    credited but not yet successful (state 1), cancelled and failed withdrawals and a coin
    withdrawn (with its coin fee) are left out."""
    since = recent()
    start = datetime_to_ms(since)
    http.get(f"{OKX}/asset/deposit-history", json=okx_answer([
        okx_deposit("88120735", "BTC", "0.01044408", start + 90_000),
        okx_deposit("88120734", "USDC", "80", start + 75_000, state="1"),
        okx_deposit("88120733", "USDT", "1500.25", start + 60_000),
    ]))
    http.get(f"{OKX}/asset/withdrawal-history", json=okx_answer([
        okx_withdrawal("25147044", "ETH", "0.029809", "0.007", start + 190_000),
        okx_withdrawal("25147043", "USDT", "10", "0.8", start + 170_000, state="-1"),
        okx_withdrawal("25147042", "USDT", "12", "0.8", start + 150_000, state="-2"),
        okx_withdrawal("25147041", "USDT", "54.561", "0.8", start + 120_000),
    ]))

    movements = okx.cash_movements_since(since)

    at = ms_to_datetime
    assert movement_rows(movements) == [
        ("deposit:88120733", "deposit", Decimal("1500.25"), "USDT", at(start + 60_000)),
        ("withdrawal:25147041", "withdrawal", Decimal("-54.561"), "USDT", at(start + 120_000)),
        ("withdrawal:25147041:fee", "fee", Decimal("-0.8"), "USDT", at(start + 120_000)),
    ]
    assert movements[1].description == ("withdrawal on TRC20, tx 00cff6ec7fa7c7d725147041")
    for path in ("/asset/deposit-history", "/asset/withdrawal-history"):
        (call,) = calls_to(http, path)
        query = sent(call)
        assert query == {"before": str(start - 1), "limit": "100"}  # no `after`: up to now


def test_okx_transfers_are_walked_back_from_a_full_answer(http: responses.RequestsMock,
                                                          okx: CcxtBroker) -> None:
    """130 deposits: OKX answers the newest 100, so the history is asked again for those
    before the oldest of them (`after`, that millisecond included), and each comes once."""
    since = recent()
    start = datetime_to_ms(since)
    history = [okx_deposit(str(5000 + i), "USDT", "10", start + i * 1000) for i in range(1, 131)]

    def deposit_history(request: Any) -> tuple[int, dict[str, str], str]:
        q = sent(request_call(request))
        before, after = int(q.get("before", -1)), int(q.get("after", 2**62))
        window = sorted((d for d in history if before < int(d["ts"]) < after),
                        key=lambda d: -int(d["ts"]))[:int(q.get("limit", 100))]
        return 200, {}, json.dumps(okx_answer(window))

    http.add_callback(responses.GET, f"{OKX}/asset/deposit-history", callback=deposit_history)
    http.get(f"{OKX}/asset/withdrawal-history", json=okx_answer([]))

    movements = okx.cash_movements_since(since)

    assert [m.movement_id for m in movements] == [f"deposit:{5000 + i}" for i in range(1, 131)]
    assert [sent(c).get("after") for c in calls_to(http, "/asset/deposit-history")] == [
        None, str(start + 31_000 + 1)]


def test_kraken_fiat_transfers_and_their_fees_become_movements(
        http: responses.RequestsMock, kraken: CcxtBroker) -> None:
    """Kraken names USD ZUSD; its ledger takes a transfer's fee apart from its amount, for
    deposits too. ccxt asks for every asset (none named) and sends Kraken no limit."""
    since = recent()
    start = datetime_to_ms(since)
    sec = start // 1000 + 1

    def kraken_transfer(refid: str, asset: str, amount: str, fee: str, time_s: int,
                        status: str = "Success") -> dict[str, Any]:
        return {"method": "Bank Frick (SWIFT)", "aclass": "currency", "asset": asset,
                "refid": refid, "txid": f"{refid}-TX", "info": "BANKCODEXXX",
                "amount": amount, "fee": fee, "time": time_s, "status": status}

    http.post(f"{KRAKEN}/private/DepositStatus", json={"error": [], "result": [
        kraken_transfer("FTQcuak-V6Za8qrWnhzTx67yYHz8Tg", "ZUSD", "5000.0000", "5.0000",
                        sec + 60),
        kraken_transfer("FTQcuak-V6Za8qrWnhzTx67yYHz8Th", "ZUSD", "700.0000", "0.0000",
                        sec + 70, status="Settled"),  # not final yet
        kraken_transfer("FTQcuak-V6Za8qrWnhzTx67yYHz8Ti", "XXBT", "0.1000000000",
                        "0.0000000000", sec + 80),
    ]})
    http.post(f"{KRAKEN}/private/WithdrawStatus", json={"error": [], "result": [
        kraken_transfer("FTQcuak-A6Za8qrWnhzTx67yYHz8Tj", "ZUSD", "1995.0000", "5.0000",
                        sec + 120),
    ]})

    movements = kraken.cash_movements_since(since)

    at = ms_to_datetime
    assert movement_rows(movements) == [
        ("deposit:FTQcuak-V6Za8qrWnhzTx67yYHz8Tg", "deposit", Decimal("5000"), "USD",
         at((sec + 60) * 1000)),
        ("deposit:FTQcuak-V6Za8qrWnhzTx67yYHz8Tg:fee", "fee", Decimal("-5"), "USD",
         at((sec + 60) * 1000)),
        ("withdrawal:FTQcuak-A6Za8qrWnhzTx67yYHz8Tj", "withdrawal", Decimal("-1995"), "USD",
         at((sec + 120) * 1000)),
        ("withdrawal:FTQcuak-A6Za8qrWnhzTx67yYHz8Tj:fee", "fee", Decimal("-5"), "USD",
         at((sec + 120) * 1000)),
    ]
    for path in ("/private/DepositStatus", "/private/WithdrawStatus"):
        (call,) = calls_to(http, path)
        form = sent(call)
        assert Decimal(form["start"]) == Decimal(start) / 1000
        assert "asset" not in form and "limit" not in form and "cursor" not in form


@pytest.mark.parametrize(("record", "problem"), [
    ({"amount": "12,5"}, "deposit 769800519366885376 (USDT): amount '12,5' is not a number"),
    ({"amount": None}, "deposit 769800519366885376 (USDT): amount None is not a number"),
    ({"id": None}, "a deposit of USDT dated "),
])
def test_a_malformed_transfer_is_refused_naming_the_field_and_the_record(
        http: responses.RequestsMock, binance: CcxtBroker, record: dict[str, Any],
        problem: str) -> None:
    since = recent()
    deposit = binance_deposit("769800519366885376", "USDT", "4500", datetime_to_ms(since) + 1)
    deposit.update(record)
    if deposit["id"] is None:
        del deposit["id"]
    http.get(f"{BINANCE_SAPI}/capital/deposit/hisrec", json=[deposit])
    http.get(f"{BINANCE_SAPI}/capital/withdraw/history", json=[])

    with pytest.raises(errors.Retry) as caught:
        binance.cash_movements_since(since)

    text = str(caught.value)
    assert caught.value.code == "BAD_RESPONSE"
    assert text.startswith(f"ccxt:binance: cash_movements_since: {problem}")
    assert "\n" not in text
    if record.get("id", "") is None:
        assert text.endswith("has no id")


def test_transfer_history_errors_go_through_the_error_map(http: responses.RequestsMock,
                                                          binance: CcxtBroker) -> None:
    http.get(f"{BINANCE_SAPI}/capital/deposit/hisrec", status=401, json=binance_error(
        -2015, "Invalid API-key, IP, or permissions for action."))

    with pytest.raises(errors.Stop) as caught:
        binance.cash_movements_since(recent())

    assert caught.value.code == "AUTHENTICATION_FAILED"
    assert str(caught.value).startswith("ccxt:binance: cash_movements_since: ")


@pytest.mark.parametrize(("exchange_id", "endpoint", "reason"), [
    ("coinbase", "live", "per account only"),
    ("binance", "testnet", "no wallet (sapi) endpoints"),
    ("okx", "testnet", "demo trading"),
])
def test_transfers_are_not_read_where_ccxt_cannot_list_them(
        http: responses.RequestsMock, exchange_id: str, endpoint: Any, reason: str) -> None:
    """Coinbase (ccxt lists its transfers per account, fiat only), Binance's testnet (no
    sapi) and OKX's demo trading (no deposit endpoints): nothing is returned, and nothing
    is asked; a deposit there shows as the reconciler's BALANCE_MISMATCH."""
    broker = CcxtBroker(exchange_id, {"api_key": "k-1a2b", "secret": "s-3c4d"}, endpoint)

    assert broker.cash_movements_since(recent()) == ()
    assert reason in (broker.transfers_not_read() or "")
    assert len(http.calls) == 0


# --- finding an order by client id where the venue has no fetch-by-client-id ------------


def kraken_order(txid: int, cl_ord_id: str | None, status: str = "closed") -> dict[str, Any]:
    """One order of POST /0/private/ClosedOrders (or OpenOrders), as Kraken documents it."""
    return {"refid": None, "userref": None, "cl_ord_id": cl_ord_id, "status": status,
            "reason": None, "opentm": 1718000000.1 + txid, "closetm": 1718000001.2 + txid,
            "starttm": 0, "expiretm": 0,
            "descr": {"pair": "XBTUSD", "type": "buy", "ordertype": "limit",
                      "price": "30010.0", "price2": "0", "leverage": "none",
                      "order": "buy 0.02000000 XBTUSD @ limit 30010.0", "close": ""},
            "vol": "0.02000000", "vol_exec": "0.02000000" if status == "closed" else "0",
            "cost": "600.20000", "fee": "0.96000", "price": "30010.0",
            "stopprice": "0.00000", "limitprice": "0.00000", "misc": "", "oflags": "fciq"}


def test_kraken_order_status_by_client_id_finds_an_order_older_than_the_last_50(
        http: responses.RequestsMock, kraken: CcxtBroker) -> None:
    """Kraken enforces cl_ord_id uniqueness over OPEN orders only, and ClosedOrders answers
    the 50 newest closed orders. A re-delivered order that filled 60 orders ago must still
    be found by its client id (ClosedOrders takes a cl_ord_id filter): reporting it
    OrderNotFound makes the router place it a second time."""
    history = {f"O{i:05d}-AAAAA-BBBBBB": kraken_order(i, f"other-{i}") for i in range(1, 60)}
    history["OQCLML-BW3P3-BUCMWZ"] = kraken_order(0, "mm7-42")

    def orders_endpoint(request: Any) -> tuple[int, dict[str, str], str]:
        form = sent(request_call(request))
        wanted = form.get("cl_ord_id")
        found = {k: v for k, v in history.items() if wanted in (None, v["cl_ord_id"])}
        newest = dict(sorted(found.items(), key=lambda kv: -kv[1]["closetm"])[:50])
        key = "open" if request.url.endswith("/OpenOrders") else "closed"
        if key == "open":
            newest = {}
        return 200, {}, json.dumps({"error": [], "result": {key: newest,
                                                             "count": len(found)}})

    http.add_callback(responses.POST, f"{KRAKEN}/private/OpenOrders", callback=orders_endpoint)
    http.add_callback(responses.POST, f"{KRAKEN}/private/ClosedOrders",
                      callback=orders_endpoint)

    order = kraken.order_status(client_order_id="mm7-42", symbol="BTC/USD")

    assert order.broker_order_id == "OQCLML-BW3P3-BUCMWZ"
    assert order.status == "filled" and order.filled_quantity == Decimal("0.02")
    assert order.client_order_id == "mm7-42"


def bybit_order(order_id: str, link_id: str, status: str, created_ms: int) -> dict[str, Any]:
    """One order of GET /v5/order/history (or /v5/order/realtime), spot, as Bybit documents."""
    filled = {"Filled": "0.002", "PartiallyFilledCanceled": "0.001"}.get(status, "0")
    return {"orderId": order_id, "orderLinkId": link_id, "blockTradeId": "",
            "symbol": "BTCUSDT", "price": "66000", "qty": "0.002", "side": "Buy",
            "isLeverage": "0", "positionIdx": 0, "orderStatus": status,
            "cancelType": "CancelByUser" if "Cancel" in status else "UNKNOWN",
            "rejectReason": "EC_NoError", "avgPrice": "66000" if filled != "0" else "",
            "leavesQty": "0", "leavesValue": "0", "cumExecQty": filled,
            "cumExecValue": str(Decimal(filled) * 66000), "cumExecFee": "0.000001",
            "timeInForce": "GTC", "orderType": "Limit", "stopOrderType": "", "orderIv": "",
            "triggerPrice": "0.00", "takeProfit": "0.00", "stopLoss": "0.00",
            "tpTriggerBy": "", "slTriggerBy": "", "triggerDirection": 0,
            "triggerBy": "", "lastPriceOnCreated": "", "reduceOnly": False,
            "closeOnTrigger": False, "smpType": "None", "smpGroup": 0, "smpOrderId": "",
            "tpslMode": "", "tpLimitPrice": "", "slLimitPrice": "", "placeType": "",
            "createdTime": str(created_ms), "updatedTime": str(created_ms + 500)}


def test_bybit_order_status_by_client_id_finds_any_closed_order(
        http: responses.RequestsMock, bybit: CcxtBroker) -> None:
    """GET /v5/order/history answers 20 orders unless asked for more, newest first, and
    takes orderLinkId and orderStatus filters. An order that was partly filled and then
    cancelled, or one that filled before the last 20 fills, must be found by its client
    id; OrderNotFound would make the router place it again."""
    history = [bybit_order(f"17{i:08d}", f"other-{i}", "Filled", T_ORDER + i * 1000)
               for i in range(1, 30)]
    history.append(bybit_order("1672217748277652", "mm7-42", "PartiallyFilledCanceled",
                               T_ORDER))
    history.append(bybit_order("1672217748277653", "mm7-43", "Filled", T_ORDER + 1))

    def order_list(request: Any) -> tuple[int, dict[str, str], str]:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        found = [] if request.url.split("?")[0].endswith("/realtime") else [
            o for o in history if q.get("orderLinkId") in (None, o["orderLinkId"])
            and q.get("orderStatus") in (None, o["orderStatus"])]
        found = sorted(found, key=lambda o: -int(o["createdTime"]))[:int(q.get("limit", 20))]
        return 200, {}, json.dumps({"retCode": 0, "retMsg": "OK", "result": {
            "nextPageCursor": "", "category": "spot", "list": found},
            "retExtInfo": {}, "time": 1})

    http.add_callback(responses.GET, f"{BYBIT}/order/realtime", callback=order_list)
    http.add_callback(responses.GET, f"{BYBIT}/order/history", callback=order_list)

    cancelled = bybit.order_status(client_order_id="mm7-42", symbol="BTC/USDT")
    filled = bybit.order_status(client_order_id="mm7-43", symbol="BTC/USDT")

    assert cancelled.broker_order_id == "1672217748277652"
    assert cancelled.status == "cancelled" and cancelled.filled_quantity == Decimal("0.001")
    assert filled.broker_order_id == "1672217748277653" and filled.status == "filled"
    assert filled.filled_quantity == Decimal("0.002")


def test_bybit_order_status_by_broker_id_on_a_unified_account(
        http: responses.RequestsMock, bybit: CcxtBroker) -> None:
    """The router polls an order by the venue's id. On a Bybit unified account ccxt's
    fetch_order refuses to run (ArgumentsRequired: it sees only the last 500 orders)
    unless told otherwise; the order is then looked up in the open, then the closed
    orders by orderId. A partly filled order Bybit cancelled (PartiallyFilledCanceled,
    which ccxt calls 'closed') is cancelled with its fill, not filled."""
    http.get(f"{BYBIT}/user/query-api", json={"retCode": 0, "retMsg": "", "result": {
        "id": "13770661", "note": "mmats", "apiKey": "test-bybit-key-7a1b", "readOnly": 0,
        "secret": "", "permissions": {"Spot": ["SpotTrade"], "Wallet": ["AccountTransfer"]},
        "ips": ["*"], "type": 1, "deadlineDay": 83, "expiredAt": "2024-09-01T00:00:00Z",
        "createdAt": "2024-06-09T10:00:00Z", "unified": 0, "uta": 1, "userID": 24617703,
        "inviterID": 0, "vipLevel": "No VIP", "mktMakerLevel": "0", "affiliateID": 0,
        "rsaPublicKey": "", "isMaster": True, "parentUid": "0", "kycLevel": "LEVEL_DEFAULT",
        "kycRegion": ""}, "retExtInfo": {}, "time": 1})
    http.get(f"{BYBIT}/account/info", json={"retCode": 0, "retMsg": "OK", "result": {
        "marginMode": "REGULAR_MARGIN", "updatedTime": "1697078946000",
        "unifiedMarginStatus": 6, "dcpStatus": "OFF", "timeWindow": 10, "smpGroup": 0,
        "isMasterTrader": False, "spotHedgingStatus": "OFF"}, "retExtInfo": {}, "time": 1})
    order = bybit_order("1672217748277652", "mm7-42", "PartiallyFilledCanceled", T_ORDER)

    def order_list(request: Any) -> tuple[int, dict[str, str], str]:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        found = [] if request.url.split("?")[0].endswith("/realtime") else [
            o for o in [order] if q.get("orderId") in (None, o["orderId"])]
        return 200, {}, json.dumps({"retCode": 0, "retMsg": "OK", "result": {
            "nextPageCursor": "", "category": "spot", "list": found},
            "retExtInfo": {}, "time": 1})

    http.add_callback(responses.GET, f"{BYBIT}/order/realtime", callback=order_list)
    http.add_callback(responses.GET, f"{BYBIT}/order/history", callback=order_list)

    found = bybit.order_status(broker_order_id="1672217748277652", symbol="BTC/USDT")

    assert found.broker_order_id == "1672217748277652" and found.client_order_id == "mm7-42"
    assert found.status == "cancelled" and found.filled_quantity == Decimal("0.001")
    assert found.quantity == Decimal("0.002")
