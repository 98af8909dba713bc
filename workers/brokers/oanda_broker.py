"""OANDA v20 (forex and CFDs) behind the `Broker` contract, through oandapyV20.

OANDA speaks in signed integer-like unit strings (negative = sell), instruments spelled
`EUR_USD`, RFC 3339 times with nanoseconds and HTTP errors whose JSON body names the
reason (`errorCode`, `orderRejectTransaction.rejectReason`). This module converts all of
that to MMATS's `Decimal`/UTC/`EUR/USD` world and maps every failure onto one class of
`workers.brokers.errors`, so the router decides by class.

Idempotence: every order carries `clientExtensions.id = client_order_id`. OANDA refuses a
client id only while the first order is still *pending* (CLIENT_ORDER_ID_ALREADY_EXISTS);
a filled market order would not protect a re-sent request. So `place_order` first looks
the client id up (`GET .../orders/@{id}`) and returns the order found, and still handles the
duplicate rejection for the race between two senders.

Order bodies are built here rather than with `oandapyV20.contrib.requests`, whose
`PriceValue` goes through `float` and always writes five decimals (wrong for JPY pairs).

Cash movements outside fills come from the same transaction pages as fills:
DAILY_FINANCING (financing), TRANSFER_FUNDS (deposit, withdrawal or adjustment) and
DIVIDEND_ADJUSTMENT (dividend), each in the account's home currency under its transaction
id. An ORDER_FILL's commission goes with the fill; the financing it settles (what the
closed units accrued since the last DAILY_FINANCING) and its guaranteed execution fee
are movements of their own, `<transaction id>:financing` and `<transaction id>:gsl-fee`,
as the ledger's fill carries no such costs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, NoReturn, cast
from urllib.parse import parse_qs, quote, urlsplit

import oandapyV20
import requests
from oandapyV20.endpoints import accounts, orders, positions, transactions
from oandapyV20.endpoints.apirequest import APIRequest
from oandapyV20.exceptions import V20Error
from oandapyV20.oandapyV20 import TRADING_ENVIRONMENTS

from workers.brokers.base import (
    Balance,
    BrokerFill,
    BrokerOrder,
    BrokerPosition,
    BrokerStatus,
    CashKind,
    CashMovement,
    Endpoint,
    InstrumentRules,
    OrderRequest,
    Side,
    price_on_tick,
)
from workers.brokers.errors import (
    BackOff,
    BrokerError,
    EnvironmentMismatch,
    OrderNotFound,
    Reject,
    Retry,
    Stop,
)
from workers.runtime import log

VENUE = "oanda"
OandaEnvironment = Literal["practice", "live"]
# OANDA's practice accounts are the venue's own demo: MMATS calls that a paper endpoint
ENDPOINTS: dict[str, Endpoint] = {"practice": "paper", "live": "live"}
# (connect, read) seconds; the read timeout also ends a stream that sends nothing at all
DEFAULT_TIMEOUT = (10.0, 30.0)
RATE_LIMIT_WAIT = 1.0  # OANDA sends no Retry-After; its limits are per second
TRANSACTION_PAGE = 1000  # the most OANDA returns per transaction page
# transactions that move the balance outside a fill, and the field holding the amount (in
# the home currency, signed: negative debits the account); OANDA's TransactionFilter has no
# DIVIDEND_ADJUSTMENT, so cash movements are read from unfiltered pages
CASH_AMOUNT_FIELDS = {"DAILY_FINANCING": "financing", "TRANSFER_FUNDS": "amount",
                      "DIVIDEND_ADJUSTMENT": "dividendAdjustment"}
# costs an ORDER_FILL settles besides its commission: (field, kind, id suffix, sign). A
# fill's `financing` is signed as the account sees it; its guaranteedExecutionFee, like its
# commission, is a positive charge
FILL_CASH_FIELDS = (("financing", "financing", "financing", 1),
                    ("guaranteedExecutionFee", "fee", "gsl-fee", -1))
DESCRIPTION_LENGTH = 200  # what trading.cash_movements.description holds

DUPLICATE_CLIENT_ID = "CLIENT_ORDER_ID_ALREADY_EXISTS"
# order types that carry instrument and units (take-profit and stop-loss orders do not)
PLAIN_ORDER_TYPES = frozenset({"MARKET", "LIMIT", "STOP", "MARKET_IF_TOUCHED"})
EXPIRED_REASONS = frozenset({"TIME_IN_FORCE_EXPIRED"})
CLIENT_CANCEL_REASONS = frozenset({"CLIENT_REQUEST", "CLIENT_REQUEST_REPLACED"})
_BODY_TYPES = {"market": "MARKET", "limit": "LIMIT", "stop": "STOP"}
_MARKET_TIF = frozenset({"FOK", "IOC"})
_PENDING_TIF = {"GTC": "GTC", "DAY": "GFD", "GFD": "GFD", "IOC": "IOC", "FOK": "FOK"}

_log = log.get("brokers.oanda")


# ---------------------------------------------------------------- spelling and values

def to_instrument(symbol: str) -> str:
    """OANDA's spelling of an MMATS symbol: `EUR/USD` -> `EUR_USD`."""
    base, sep, quote_ccy = symbol.partition("/")
    if not sep or not base or not quote_ccy or "/" in quote_ccy or "_" in symbol:
        raise Reject(f"{symbol}: not a BASE/QUOTE symbol", venue=VENUE, code="INVALID_SYMBOL")
    return f"{base}_{quote_ccy}"


def to_symbol(instrument: str) -> str:
    """MMATS's spelling of an OANDA instrument: `EUR_USD` -> `EUR/USD`."""
    return instrument.replace("_", "/", 1)


def parse_time(value: str) -> datetime:
    """An aware UTC datetime from OANDA's RFC 3339 (nanoseconds, `Z`) or UNIX time text."""
    if value.replace(".", "", 1).isdigit():
        return datetime.fromtimestamp(float(value), UTC)
    return datetime.fromisoformat(value).astimezone(UTC)


def rfc3339(ts: datetime) -> str:
    """`ts` as the RFC 3339 text OANDA's `from`/`to` parameters take; naive times refused,
    since guessing a time zone would silently shift every bar and fill query."""
    if ts.tzinfo is None:
        raise Reject(f"naive datetime {ts.isoformat()}: pass an aware UTC time",
                     venue=VENUE, code="NAIVE_DATETIME")
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def decimal_text(value: Decimal) -> str:
    """Plain decimal text without exponent or trailing zeros (`1E+3` -> `1000`)."""
    return format(value.normalize(), "f")


def signed_units(side: Side, quantity: Decimal) -> str:
    """OANDA's units: the quantity, negative for a sell."""
    return decimal_text(quantity if side == "buy" else -quantity)


def side_of(units: Decimal) -> Side:
    return "buy" if units > 0 else "sell"


# ---------------------------------------------------------------- connection and errors

def credentials_token(credentials: Mapping[str, str]) -> str:
    """The access token, registered for redaction before anything can log it."""
    token = credentials.get("access_token")
    if not token:
        raise Stop("credentials lack access_token", venue=VENUE, code="CREDENTIALS_MISSING")
    log.register_secret(token)
    return token


def credentials_account(credentials: Mapping[str, str]) -> str:
    account = credentials.get("account_id")
    if not account:
        raise Stop("credentials lack account_id", venue=VENUE, code="CREDENTIALS_MISSING")
    return account


def connect(token: str, environment: str, api: oandapyV20.API | None) -> oandapyV20.API:
    """An API client for `environment`; a given client must point at the same one, so a
    practice adapter can never send through a live session or the reverse."""
    if environment not in TRADING_ENVIRONMENTS:
        raise Stop(f"unknown environment {environment!r}: use practice or live",
                   venue=VENUE, code="ENVIRONMENT_UNKNOWN")
    if api is None:
        return oandapyV20.API(access_token=token, environment=environment,
                              request_params={"timeout": DEFAULT_TIMEOUT})
    if api.environment != environment:
        raise EnvironmentMismatch(f"api client is for {api.environment}, adapter for "
                                  f"{environment}", venue=VENUE)
    return api


def error_detail(body: str) -> tuple[str | None, str, bool]:
    """(reason code, message, carries a reject transaction) from an OANDA error body."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None, " ".join(body.split())[:200], False
    if not isinstance(parsed, dict):
        return None, str(parsed)[:200], False
    reject = parsed.get("orderRejectTransaction") or {}
    code = parsed.get("errorCode") or reject.get("rejectReason")
    return code, str(parsed.get("errorMessage") or ""), bool(reject)


def translate_v20(err: V20Error, what: str, missing: type[BrokerError]) -> BrokerError:
    """The contract error for an HTTP error status from OANDA."""
    status = int(err.code)
    code, message, rejected = error_detail(str(err.msg))
    text = " ".join(part for part in (f"{what}: HTTP {status}", code, message) if part)
    if status == 429:
        return BackOff(text, venue=VENUE, retry_after=RATE_LIMIT_WAIT)
    if status >= 500:
        return Retry(text, venue=VENUE)
    if status in (401, 403):
        return Stop(text, venue=VENUE, code=code)
    if status == 404 and not rejected:
        return missing(text, venue=VENUE)
    return Reject(text, venue=VENUE, code=code or f"HTTP_{status}")


def translate(err: Exception, what: str, missing: type[BrokerError]) -> BrokerError:
    """The contract error for whatever the HTTP call raised."""
    if isinstance(err, V20Error):
        return translate_v20(err, what, missing)
    if isinstance(err, requests.Timeout):
        return Retry(f"{what}: timed out", venue=VENUE, code="TIMEOUT")
    if isinstance(err, requests.RequestException):
        return Retry(f"{what}: {type(err).__name__}", venue=VENUE)
    # an unexpected success status or a body that is not JSON (a proxy's HTML page)
    return Retry(f"{what}: unexpected response ({err})", venue=VENUE, code="BAD_RESPONSE")


def call(api: oandapyV20.API, request: APIRequest, what: str,
         missing: type[BrokerError] = OrderNotFound) -> dict[str, Any]:
    """Perform one request; every failure leaves as a `workers.brokers.errors` class."""
    try:
        return cast(dict[str, Any], api.request(request))
    except (V20Error, requests.RequestException, ValueError) as err:
        raise translate(err, what, missing) from err


@contextmanager
def response_shape(what: str) -> Iterator[None]:
    """Turn a response missing the fields we read into a Retry naming the call, instead of
    a KeyError the router cannot classify."""
    try:
        yield
    except (KeyError, TypeError, IndexError, InvalidOperation, ValueError) as err:
        raise Retry(f"{what}: unexpected response shape ({type(err).__name__}: {err})",
                    venue=VENUE, code="BAD_RESPONSE") from err


# ---------------------------------------------------------------- pure conversions

def order_body(order: OrderRequest, tick: Decimal | None = None) -> dict[str, Any]:
    """The OrderCreate body for `order`: signed units, Decimal prices as text (on the
    instrument's `tick` when given: base.price_on_tick), MMATS's client id as the client
    extension id."""
    kind = _BODY_TYPES.get(order.order_type)
    if kind is None:
        # OANDA has no stop-limit: a STOP with priceBound is cancelled, not rested, when the
        # bound is crossed, so mapping onto it would change the order's meaning
        refuse(order, "ORDER_TYPE_UNSUPPORTED", f"order type {order.order_type}")
    if order.quantity <= 0:
        refuse(order, "INVALID_QUANTITY", f"quantity {order.quantity}")
    body: dict[str, Any] = {
        "type": kind,
        "instrument": to_instrument(order.symbol),
        "units": signed_units(order.side, order.quantity),
        "timeInForce": time_in_force(order, kind),
        "positionFill": "REDUCE_ONLY" if order.reduce_only else "DEFAULT",
        "clientExtensions": {"id": order.client_order_id},
    }
    price = {"LIMIT": order.limit_price, "STOP": order.stop_price}.get(kind)
    if kind != "MARKET":
        if price is None or price <= 0:
            refuse(order, "PRICE_MISSING", f"{order.order_type} order without a price")
        if tick is not None:
            on_tick = price_on_tick(price, tick, order.side, order.order_type)
            if on_tick <= 0:
                refuse(order, "PRICE_PRECISION_EXCEEDED", f"price {price} is below the tick {tick}")
            price = on_tick
        body["price"] = decimal_text(price)
    return {"order": body}


def time_in_force(order: OrderRequest, kind: str) -> str:
    """OANDA's time in force: market orders take only FOK/IOC (FOK unless IOC asked)."""
    tif = order.time_in_force.upper()
    if kind == "MARKET":
        return tif if tif in _MARKET_TIF else "FOK"
    mapped = _PENDING_TIF.get(tif)
    if mapped is None:
        refuse(order, "TIME_IN_FORCE_UNSUPPORTED", f"time in force {order.time_in_force}")
    return mapped


def refuse(order: OrderRequest, code: str, problem: str) -> NoReturn:
    raise Reject(f"place_order {order.symbol}: {problem}", venue=VENUE, code=code)


def fill_from_transaction(tx: Mapping[str, Any], currency: str | None) -> BrokerFill:
    """A BrokerFill from an ORDER_FILL transaction. `price` is the fill's average price
    (`fullVWAP` where an account no longer sends the deprecated `price`); commission is
    charged in the account's home currency."""
    units = Decimal(tx["units"])
    return BrokerFill(
        fill_id=str(tx["id"]),
        broker_order_id=str(tx["orderID"]),
        client_order_id=tx.get("clientOrderID"),
        symbol=to_symbol(tx["instrument"]),
        side=side_of(units),
        quantity=abs(units),
        price=Decimal(tx.get("price") or tx["fullVWAP"]),
        commission=abs(Decimal(tx.get("commission") or "0")),
        commission_currency=currency,
        ts=parse_time(tx["time"]),
    )


def cash_from_transaction(tx: Mapping[str, Any], currency: str,
                          what: str) -> CashMovement | None:
    """The CashMovement of a DAILY_FINANCING, TRANSFER_FUNDS or DIVIDEND_ADJUSTMENT
    transaction; None for a zero amount. A missing id or a missing or non-numeric amount
    or time raises Retry (BAD_RESPONSE) naming the field and the transaction."""
    tx_type = str(tx["type"])
    tx_id = str(tx.get("id") or "").strip()
    if not tx_id:
        bad_response(what, f"{tx_type} transaction at {tx.get('time')!r} has no id")
    amount = decimal_field(tx, CASH_AMOUNT_FIELDS[tx_type], tx_id, what)
    if amount == 0:
        return None
    try:
        ts = parse_time(str(tx["time"]))
    except (KeyError, ValueError, OverflowError):
        bad_response(what, f"transaction {tx_id} ({tx_type}): time {tx.get('time')!r} is "
                           "not an RFC 3339 or UNIX time")
    kind, symbol, description = cash_meaning(tx, tx_type, amount)
    return CashMovement(movement_id=tx_id, kind=kind, amount=amount, currency=currency,
                        ts=ts, symbol=symbol, description=description[:DESCRIPTION_LENGTH])


def settles_costs(tx: Mapping[str, Any]) -> bool:
    """Whether an ORDER_FILL names a cost of FILL_CASH_FIELDS other than zero (one that
    is not a number counts: costs_of_fill refuses it, naming it)."""
    for field, *_ in FILL_CASH_FIELDS:
        raw = tx.get(field)
        if raw is None:
            continue
        try:
            if Decimal(str(raw)) != 0:
                return True
        except InvalidOperation:
            return True
    return False


def costs_of_fill(tx: Mapping[str, Any], currency: str, what: str) -> list[CashMovement]:
    """The financing and guaranteed execution fee an ORDER_FILL settles, each a movement
    under `<transaction id>:<suffix>` (FILL_CASH_FIELDS); none for zero amounts."""
    tx_id = str(tx.get("id") or "").strip()
    if not tx_id:
        bad_response(what, f"ORDER_FILL transaction at {tx.get('time')!r} has no id")
    out = []
    for field, kind, suffix, sign in FILL_CASH_FIELDS:
        if tx.get(field) is None:
            continue
        amount = sign * decimal_field(tx, field, tx_id, what)
        if amount == 0:
            continue
        try:
            ts = parse_time(str(tx["time"]))
        except (KeyError, ValueError, OverflowError):
            bad_response(what, f"transaction {tx_id} (ORDER_FILL): time {tx.get('time')!r} is "
                               "not an RFC 3339 or UNIX time")
        instrument = tx.get("instrument")
        out.append(CashMovement(
            movement_id=f"{tx_id}:{suffix}", kind=cast(CashKind, kind), amount=amount,
            currency=currency, ts=ts, symbol=to_symbol(str(instrument)) if instrument else None,
            description=f"ORDER_FILL {field}"))
    return out


def cash_meaning(tx: Mapping[str, Any], tx_type: str,
                 amount: Decimal) -> tuple[CashKind, str | None, str]:
    """(kind, MMATS symbol or None, description) of a cash transaction. Financing names
    its instrument only when a single position was financed; a transfer is a deposit or
    a withdrawal by its sign, unless OANDA calls it an account ADJUSTMENT."""
    if tx_type == "DAILY_FINANCING":
        involved = {pf.get("instrument") for pf in tx.get("positionFinancings") or []
                    if isinstance(pf, Mapping)}
        involved.discard(None)
        symbol = to_symbol(str(involved.pop())) if len(involved) == 1 else None
        mode = tx.get("accountFinancingMode")
        return "financing", symbol, f"{tx_type} {mode}" if mode else tx_type
    if tx_type == "DIVIDEND_ADJUSTMENT":
        instrument = tx.get("instrument")
        return "dividend", to_symbol(str(instrument)) if instrument else None, tx_type
    reason = tx.get("fundingReason")
    kind: CashKind = ("adjustment" if reason == "ADJUSTMENT"
                      else "deposit" if amount > 0 else "withdrawal")
    description = f"{tx_type} {reason}" if reason else tx_type
    if tx.get("comment"):
        description += ": " + " ".join(str(tx["comment"]).split())
    return kind, None, description


def decimal_field(tx: Mapping[str, Any], field: str, tx_id: str, what: str) -> Decimal:
    """`tx[field]` as an exact, finite Decimal, or Retry (BAD_RESPONSE) naming both."""
    raw = tx.get(field)
    try:
        value = Decimal(str(raw)) if isinstance(raw, str | int) else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        bad_response(what, f"transaction {tx_id} ({tx.get('type')}): {field} {raw!r} is not "
                           "a decimal number")
    return value


def bad_response(what: str, problem: str) -> NoReturn:
    """An answer OANDA should not have sent: the Retry that `response_shape` raises too."""
    raise Retry(f"{what}: {problem}", venue=VENUE, code="BAD_RESPONSE")


def state_status(state: str, filled: Decimal, quantity: Decimal,
                 cancel_reason: str | None) -> BrokerStatus:
    """MMATS's status for an OANDA order state. OANDA cancels what it refuses to execute
    (INSUFFICIENT_MARGIN, MARKET_HALTED, ...): such an order with nothing filled counts as
    rejected; one the client cancelled as cancelled; an IOC/FOK/GTD lapse as expired."""
    if state == "FILLED":
        return "filled" if filled >= quantity else "cancelled"
    if state != "CANCELLED":
        return "partially_filled" if filled > 0 else "submitted"
    if cancel_reason in EXPIRED_REASONS:
        return "expired"
    if filled > 0 or cancel_reason is None or cancel_reason in CLIENT_CANCEL_REASONS:
        return "cancelled"
    return "rejected"


def order_from_state(raw: Mapping[str, Any], fill: Mapping[str, Any] | None,
                     cancel: Mapping[str, Any] | None, currency: str | None) -> BrokerOrder:
    """A BrokerOrder from an order as `GET .../orders/{id}` shows it, plus its filling and
    cancelling transactions when it has them."""
    units = Decimal(raw["units"])
    fills = (fill_from_transaction(fill, currency),) if fill else ()
    filled = sum((f.quantity for f in fills), Decimal(0))
    reason = cancel.get("reason") if cancel else None
    return BrokerOrder(
        broker_order_id=str(raw["id"]),
        client_order_id=(raw.get("clientExtensions") or {}).get("id"),
        symbol=to_symbol(raw["instrument"]),
        side=side_of(units),
        quantity=abs(units),
        filled_quantity=filled,
        average_price=fills[0].price if fills else None,
        status=state_status(str(raw["state"]), filled, abs(units), reason),
        reason=reason,
        fills=fills,
        raw=dict(raw),
    )


def order_from_creation(response: Mapping[str, Any], order: OrderRequest,
                        currency: str | None) -> BrokerOrder:
    """A BrokerOrder from OrderCreate's 201 answer. A market order fills at once
    (orderFillTransaction); an order OANDA cancels on creation without any fill is a
    rejection and raises Reject with OANDA's reason as its code (an IOC/FOK lapse is an
    expired order, not a rejection)."""
    created = response["orderCreateTransaction"]
    order_id = str(created["id"])
    fill = related(response.get("orderFillTransaction"), order_id)
    cancel = related(response.get("orderCancelTransaction"), order_id)
    reason = cancel.get("reason") if cancel else None
    if cancel and not fill and reason not in EXPIRED_REASONS:
        raise Reject(f"place_order {order.symbol}: order {order_id} cancelled on create: "
                     f"{reason}", venue=VENUE, code=reason or "ORDER_CANCELLED")
    quantity = abs(Decimal(created["units"]))
    fills = (fill_from_transaction(fill, currency),) if fill else ()
    filled = sum((f.quantity for f in fills), Decimal(0))
    state = "CANCELLED" if cancel else ("FILLED" if filled >= quantity else "PENDING")
    return BrokerOrder(
        broker_order_id=order_id,
        client_order_id=order.client_order_id,
        symbol=order.symbol,
        side=order.side,
        quantity=quantity,
        filled_quantity=filled,
        average_price=fills[0].price if fills else None,
        status=state_status(state, filled, quantity, reason),
        reason=reason,
        fills=fills,
        raw=dict(response),
    )


def related(tx: Mapping[str, Any] | None, order_id: str) -> Mapping[str, Any] | None:
    """`tx` if it belongs to `order_id` (a replace answer also cancels the old order)."""
    if tx and str(tx.get("orderID")) == order_id:
        return tx
    return None


def position_from(raw: Mapping[str, Any]) -> BrokerPosition:
    """The net position of an OANDA position: long units plus (negative) short units, at
    the average price of the side that remains."""
    long_leg, short_leg = raw.get("long") or {}, raw.get("short") or {}
    net = Decimal(long_leg.get("units") or "0") + Decimal(short_leg.get("units") or "0")
    leg = long_leg if net > 0 else short_leg
    price = leg.get("averagePrice")
    return BrokerPosition(symbol=to_symbol(raw["instrument"]), quantity=net,
                          average_price=Decimal(price) if price else None)


def rules_from(raw: Mapping[str, Any]) -> InstrumentRules:
    """Instrument rules: units step from tradeUnitsPrecision, price tick from
    displayPrecision (one tenth of a pip for FX; pipLocation when no precision is given)."""
    precision = raw.get("displayPrecision")
    exponent = -int(precision) if precision is not None else int(raw["pipLocation"])
    return InstrumentRules(
        symbol=to_symbol(raw["name"]),
        quantity_step=Decimal(1).scaleb(-int(raw["tradeUnitsPrecision"])),
        min_quantity=Decimal(raw["minimumTradeSize"]),
        price_tick=Decimal(1).scaleb(exponent),
    )


def page_range(url: str) -> tuple[str, str]:
    """(from, to) transaction ids of one `pages` link of the transactions listing."""
    query = parse_qs(urlsplit(url).query)
    return query["from"][0], query["to"][0]


def order_specifier(broker_order_id: str | None, client_order_id: str | None) -> str:
    """OANDA's order specifier: the order id, or `@` and the client id."""
    if broker_order_id:
        return quote(broker_order_id, safe="")
    if client_order_id:
        return "@" + quote(client_order_id, safe="")
    raise OrderNotFound("order_status: neither broker_order_id nor client_order_id given",
                        venue=VENUE)


# ---------------------------------------------------------------- the adapter

class OandaBroker:
    """One OANDA v20 account, practice (api-fxpractice) or live (api-fxtrade)."""

    venue = VENUE

    def __init__(self, credentials: Mapping[str, str], endpoint: OandaEnvironment, *,
                 api: oandapyV20.API | None = None) -> None:
        token = credentials_token(credentials)
        self.account_id = credentials_account(credentials)
        self._api = connect(token, endpoint, api)
        self.environment: OandaEnvironment = endpoint
        self.endpoint: Endpoint = ENDPOINTS[endpoint]
        self.endpoint_url: str = TRADING_ENVIRONMENTS[endpoint]["api"]
        self._rules: dict[str, InstrumentRules] = {}
        self._currency: str | None = None

    # -- orders

    def place_order(self, order: OrderRequest) -> BrokerOrder:
        """Send `order` once: an order already known under its client id is returned
        instead of being placed again."""
        body = order_body(order)  # (refuses what OANDA would, before any request)
        if order.order_type != "market":
            # OANDA refuses a price finer than the instrument's: PRICE_PRECISION_EXCEEDED
            body = order_body(order, self.instrument_rules(order.symbol).price_tick)
        existing = self._find_by_client_id(order.client_order_id)
        if existing is not None:
            return self._existing(order, existing)
        currency = self._home_currency()
        what = f"place_order {order.symbol}"
        try:
            # a 404 without a reject transaction means the account itself is unknown
            response = self._call(orders.OrderCreate(self.account_id, data=body), what,
                                  missing=Stop)
        except Reject as err:
            if err.code != DUPLICATE_CLIENT_ID:
                raise
            return self._existing(order, self.order_status(
                client_order_id=order.client_order_id, symbol=order.symbol))
        with response_shape(what):
            return order_from_creation(response, order, currency)

    def _existing(self, order: OrderRequest, found: BrokerOrder) -> BrokerOrder:
        """The order a re-sent request's client id names, if it is the same order (symbol,
        side and size); another order under that id is refused, never taken for it."""
        if (found.symbol, found.side, found.quantity) != (order.symbol, order.side,
                                                          order.quantity):
            raise Reject(f"place_order {order.symbol}: client id {order.client_order_id} "
                         f"already names {found.side} {found.quantity} {found.symbol} order "
                         f"{found.broker_order_id}", venue=VENUE,
                         code="CLIENT_ORDER_ID_CONFLICT")
        log.event(_log, "oanda order already placed", client_order_id=order.client_order_id,
                  broker_order_id=found.broker_order_id, status=found.status)
        return found

    def cancel_order(self, broker_order_id: str, symbol: str) -> BrokerOrder:
        """Cancel a pending order. An order that can no longer be cancelled (filled,
        already cancelled) is reported as it stands; an unknown one raises OrderNotFound."""
        what = f"cancel_order {symbol} {broker_order_id}"
        try:
            self._call(orders.OrderCancel(self.account_id, broker_order_id), what)
        except (OrderNotFound, Reject):
            current = self.order_status(broker_order_id=broker_order_id, symbol=symbol)
            if current.status in ("submitted", "partially_filled"):
                raise
            return current
        return self.order_status(broker_order_id=broker_order_id, symbol=symbol)

    def order_status(self, *, broker_order_id: str | None = None,
                     client_order_id: str | None = None,
                     symbol: str | None = None) -> BrokerOrder:
        """One order by OANDA id or by MMATS client id, with its fill if it has one."""
        spec = order_specifier(broker_order_id, client_order_id)
        what = f"order_status {symbol or '-'} {spec}"
        response = self._call(orders.OrderDetails(self.account_id, spec), what)
        with response_shape(what):
            raw = response["order"]
            fill = self._transaction(raw.get("fillingTransactionID"), what)
            cancel = self._transaction(raw.get("cancellingTransactionID"), what)
            currency = self._home_currency() if fill else None
            return order_from_state(raw, fill, cancel, currency)

    def open_orders(self, symbol: str | None = None) -> Sequence[BrokerOrder]:
        """Pending entry orders (take-profit and stop-loss orders attached to trades are
        not MMATS orders and are left out)."""
        what = f"open_orders {symbol or 'all'}"
        response = self._call(orders.OrdersPending(self.account_id), what, missing=Stop)
        with response_shape(what):
            found = [order_from_state(raw, None, None, None) for raw in response["orders"]
                     if raw.get("type") in PLAIN_ORDER_TYPES]
        return [o for o in found if symbol is None or o.symbol == symbol]

    # -- fills

    def fills_since(self, since: datetime, symbol: str | None = None) -> Sequence[BrokerFill]:
        """Every fill at or after `since`, oldest first: the transactions listing for that
        time range names its id-range pages, and each page is read with TransactionIDRange."""
        what = f"fills_since {symbol or 'all'}"
        params = {"from": rfc3339(since), "type": "ORDER_FILL", "pageSize": TRANSACTION_PAGE}
        listing = self._call(transactions.TransactionList(self.account_id, params=params),
                             what, missing=Stop)
        found: list[BrokerFill] = []
        with response_shape(what):
            for page in listing.get("pages") or []:
                low, high = page_range(page)
                found.extend(self._fill_page(low, high, what))
        return [f for f in found if f.ts >= since and (symbol is None or f.symbol == symbol)]

    def fills_after(self, transaction_id: str,
                    symbol: str | None = None) -> tuple[Sequence[BrokerFill], str]:
        """Fills after transaction `transaction_id` and the id to resume from: a cursor for
        a reconciler that remembers where it stopped (TransactionsSinceID, paged)."""
        what = f"fills_after {symbol or 'all'} {transaction_id}"
        cursor, found = transaction_id, list[BrokerFill]()
        while True:
            request = transactions.TransactionsSinceID(self.account_id, params={"id": cursor})
            response = self._call(request, what, missing=Stop)
            with response_shape(what):
                batch = response["transactions"]
                last = str(response["lastTransactionID"])
                found.extend(self._fills_in(batch))
                cursor = str(batch[-1]["id"]) if batch else last
                done = not batch or int(cursor) >= int(last)
            if done:
                return self._only(found, symbol), last

    # -- cash

    def cash_movements_since(self, since: datetime) -> list[CashMovement]:
        """Cash movements outside fills at or after `since`, oldest first: financing,
        transfers and dividend adjustments from the same id-range pages as `fills_since`,
        read without a type filter (OANDA's filter names no DIVIDEND_ADJUSTMENT)."""
        what = "cash_movements_since"
        params = {"from": rfc3339(since), "pageSize": TRANSACTION_PAGE}
        listing = self._call(transactions.TransactionList(self.account_id, params=params),
                             what, missing=Stop)
        found: list[CashMovement] = []
        with response_shape(what):
            for page in listing.get("pages") or []:
                low, high = page_range(page)
                batch = self._id_range(low, high, what)
                cash = [tx for tx in batch if tx.get("type") in CASH_AMOUNT_FIELDS
                        or (tx.get("type") == "ORDER_FILL" and settles_costs(tx))]
                if not cash:
                    continue
                currency = self._home_currency()
                for tx in cash:
                    if tx["type"] == "ORDER_FILL":
                        found.extend(costs_of_fill(tx, currency, what))
                    elif (moved := cash_from_transaction(tx, currency, what)) is not None:
                        found.append(moved)
        return sorted((m for m in found if m.ts >= since), key=lambda m: m.ts)

    # -- account

    def positions(self) -> Sequence[BrokerPosition]:
        """Open positions, net and signed (short negative)."""
        what = "positions"
        response = self._call(positions.OpenPositions(self.account_id), what, missing=Stop)
        with response_shape(what):
            held = [position_from(raw) for raw in response["positions"]]
        return [p for p in held if p.quantity != 0]

    def balances(self) -> Sequence[Balance]:
        """The account's cash in its home currency: `balance` (realized, what the ledger
        holds) as total and `marginAvailable` as free. NAV, which adds unrealized P&L, is
        in the summary's raw answer but has no field in the contract."""
        summary = self._summary()
        with response_shape("balances"):
            return [Balance(currency=summary["currency"], total=Decimal(summary["balance"]),
                            free=Decimal(summary["marginAvailable"]))]

    def instrument_rules(self, symbol: str) -> InstrumentRules:
        """Lot step, minimum size and price tick of `symbol` (cached: they rarely change)."""
        if symbol not in self._rules:
            what = f"instrument_rules {symbol}"
            params = {"instruments": to_instrument(symbol)}
            response = self._call(accounts.AccountInstruments(self.account_id, params=params),
                                  what, missing=Stop)
            with response_shape(what):
                listed = [rules_from(raw) for raw in response["instruments"]]
            match = [r for r in listed if r.symbol == symbol]
            if not match:
                raise Reject(f"{what}: not tradeable on this account", venue=VENUE,
                             code="UNKNOWN_SYMBOL")
            self._rules[symbol] = match[0]
        return self._rules[symbol]

    # -- helpers

    def _call(self, request: APIRequest, what: str,
              missing: type[BrokerError] = OrderNotFound) -> dict[str, Any]:
        return call(self._api, request, what, missing)

    def _find_by_client_id(self, client_order_id: str) -> BrokerOrder | None:
        try:
            return self.order_status(client_order_id=client_order_id)
        except OrderNotFound:
            return None

    def _transaction(self, transaction_id: str | None, what: str) -> dict[str, Any] | None:
        if not transaction_id:
            return None
        request = transactions.TransactionDetails(self.account_id, transaction_id)
        return cast(dict[str, Any], self._call(request, what)["transaction"])

    def _fill_page(self, low: str, high: str, what: str) -> list[BrokerFill]:
        return self._fills_in(self._id_range(low, high, what, "ORDER_FILL"))

    def _id_range(self, low: str, high: str, what: str,
                  tx_type: str | None = None) -> list[dict[str, Any]]:
        """The transactions `low` to `high` (of `tx_type` only, if given)."""
        params = {"from": low, "to": high}
        if tx_type is not None:
            params["type"] = tx_type
        request = transactions.TransactionIDRange(self.account_id, params=params)
        return cast(list[dict[str, Any]], self._call(request, what, missing=Stop)["transactions"])

    def _fills_in(self, batch: Sequence[Mapping[str, Any]]) -> list[BrokerFill]:
        fills = [tx for tx in batch if tx.get("type") == "ORDER_FILL"]
        if not fills:
            return []
        currency = self._home_currency()
        return [fill_from_transaction(tx, currency) for tx in fills]

    @staticmethod
    def _only(fills: list[BrokerFill], symbol: str | None) -> list[BrokerFill]:
        return [f for f in fills if symbol is None or f.symbol == symbol]

    def _summary(self) -> dict[str, Any]:
        response = self._call(accounts.AccountSummary(self.account_id), "account summary",
                              missing=Stop)
        with response_shape("account summary"):
            summary = cast(dict[str, Any], response["account"])
            self._currency = str(summary["currency"])
        return summary

    def _home_currency(self) -> str:
        """The account's home currency, in which OANDA charges commission and financing."""
        if self._currency is None:
            self._summary()
        return cast(str, self._currency)
