"""Alpaca (US stocks) behind the `Broker` contract, through alpaca-py's `TradingClient`.

Alpaca's quirks, and how this adapter handles them:

- Order objects and trade-update events report `filled_qty` *cumulatively*, with a running
  `filled_avg_price`. A fill is the difference between two snapshots, never a snapshot:
  `fills_from_snapshots` derives each increment's quantity and price (from the change in
  filled_qty * avg_price). `fills_since` reads the account activities endpoint instead,
  whose FILL activities carry their own per-execution `qty` (and a `cum_qty` we ignore).
- Cash that moves outside fills (regulatory fees, dividends, interest, deposits, withdrawals,
  cash journals) comes from the same endpoint's non-trade activities, asked for by type in one
  paged request (`cash_movements_since`). They carry a signed `net_amount` and a plain `date`
  (a fee is often booked the day after its trade); Alpaca's `after` filters on when the
  activity was booked, so the date-stamped ones it returns are kept even if dated earlier.
- `client_order_id` must be unique per account: a re-sent order gets HTTP 422 "client_order_id
  must be unique", so `place_order` fetches the order that id already names and returns it.
- alpaca-py's request models hold quantities and prices as floats; orders are posted as
  Alpaca's documented JSON, with decimal strings, so a `Decimal` reaches the venue exactly.
  The client runs with `raw_data=True`, so responses are Alpaca's JSON, parsed here into
  `Decimal`s without alpaca-py's models (which reject statuses they do not know yet).
- alpaca-py retries 429 and 504 itself (3 times, `time.sleep(3)` each) before raising, and
  sets no HTTP timeout. The adapter turns both off / on (`prepare_client`), so one request
  is one HTTP call and the router's own policy (`Retry`, `BackOff` with Retry-After) decides.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any, Literal, TypeVar, cast
from uuid import UUID

import requests
from alpaca.common.exceptions import APIError
from alpaca.common.rest import RESTClient
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import QueryOrderStatus
from alpaca.trading.requests import GetOrdersRequest
from pydantic import BaseModel
from requests.adapters import HTTPAdapter

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

VENUE = "alpaca"
ENDPOINT_URLS = {"paper": "https://paper-api.alpaca.markets", "live": "https://api.alpaca.markets"}
KEY_FIELDS = ("api_key", "key_id", "api_key_id")
SECRET_FIELDS = ("secret_key", "api_secret", "secret")
# Alpaca key ids start with PK (paper) or AK (live); other prefixes are not judged
_KEY_PREFIX_ENDPOINT = {"PK": "paper", "AK": "live"}
DEFAULT_TIMEOUT = 10.0

TIME_IN_FORCE = {"GTC": "gtc", "DAY": "day", "IOC": "ioc", "FOK": "fok", "OPG": "opg",
                 "CLS": "cls"}
_PRICES_NEEDED = {"market": (), "limit": ("limit_price",), "stop": ("stop_price",),
                  "stop_limit": ("limit_price", "stop_price")}
MAX_CLIENT_ORDER_ID = 128
# Alpaca statuses that end an order; every other one is live: submitted or partially filled
_FINAL_STATUS: dict[str, BrokerStatus] = {"filled": "filled", "canceled": "cancelled",
                                          "expired": "expired", "rejected": "rejected",
                                          "replaced": "cancelled"}
# Alpaca's messages for refusals of one order (403 or 422), by substring, to reason codes
_REJECT_REASONS = (
    ("client_order_id must be unique", "DUPLICATE_CLIENT_ORDER_ID"),
    ("buying power", "INSUFFICIENT_FUNDS"),
    ("insufficient qty", "INSUFFICIENT_QUANTITY"),
    ("pattern day trad", "PDT_PROTECTION"),
    ("not shortable", "NOT_SHORTABLE"),
    ("cannot be sold short", "NOT_SHORTABLE"),
    ("not tradable", "INSTRUMENT_NOT_TRADABLE"),
    ("wash trade", "WASH_TRADE"),
    # 403 code 40310000 while an order of the other side is open for the symbol
    ("cannot open a long buy while", "OPPOSITE_SIDE_ORDER_OPEN"),
    ("cannot open a short sell while", "OPPOSITE_SIDE_ORDER_OPEN"),
    ("not cancelable", "ORDER_NOT_CANCELABLE"),
    # DELETE /v2/orders/{id} of a finished order: 422 {"code": 42210000, "message":
    # "order is already in \"filled\" state"} (42210000 is reused for other refusals)
    ("order is already in", "ORDER_NOT_CANCELABLE"),
)
# Alpaca statuses in which a cancel can no longer change an order: the final ones, a
# cancel already under way (pending_cancel) and an order done for the day. Refused a
# cancel (HTTP 422), an order found in one of them is reported as it is.
_NOT_CANCELABLE_STATUSES = frozenset({*_FINAL_STATUS, "pending_cancel", "done_for_day"})
ACTIVITY_PAGE_SIZE = 100  # Alpaca's maximum
# The non-trade activity types that move cash, by MMATS cash kind; only these are asked for.
# JNLC (a cash journal) is a deposit or a withdrawal by the sign of its amount (None here).
CASH_ACTIVITY_KINDS: dict[str, CashKind | None] = {
    "FEE": "fee", "PTC": "fee",  # regulatory (REG/TAF) fees, pass-through charges
    "DIV": "dividend", "DIVCGL": "dividend", "DIVCGS": "dividend", "DIVNRA": "dividend",
    "DIVROC": "dividend", "DIVTXEX": "dividend", "DIVTW": "dividend",  # DIVTW: tax withheld
    "INT": "interest", "INTNRA": "interest", "INTTW": "interest",
    "CSD": "deposit", "CSW": "withdrawal", "JNLC": None,
}
# a non-trade activity's status, where it has one: canceled ones moved no cash
_BOOKED_STATUSES = frozenset({"executed", "correct"})
MAX_DESCRIPTION = 200
OPEN_ORDERS_LIMIT = 500   # Alpaca's maximum per request
FRACTIONAL_STEP = Decimal("0.000000001")  # fractional shares go to 9 decimals
FRACTIONAL_MIN_NOTIONAL = Decimal("1")     # and a fractional order is at least $1
PENNY, SUB_PENNY = Decimal("0.01"), Decimal("0.0001")  # Reg NMS ticks, above and below $1
PRICE_DIGITS = Decimal("0.000001")  # an increment's price, from Alpaca's rounded averages

T = TypeVar("T")
_log = log.get("brokers.alpaca")


# ------------------------------------------------------------------ shared with AlpacaFeed

def credential_pair(credentials: Mapping[str, str]) -> tuple[str, str]:
    """The (key id, secret) in `credentials`, both registered for redaction at once."""
    key = next((credentials[f] for f in KEY_FIELDS if credentials.get(f)), "")
    secret = next((credentials[f] for f in SECRET_FIELDS if credentials.get(f)), "")
    log.register_secret(key)
    log.register_secret(secret)
    if not key or not secret:
        raise Stop("credentials need an api_key and a secret_key", venue=VENUE,
                   code="MISSING_CREDENTIALS")
    return key, secret


class _TimeoutAdapter(HTTPAdapter):
    """An HTTP adapter that gives every request a timeout (alpaca-py sets none, so a
    silent connection would hang the router forever)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: float | tuple[float | None, float | None] | None = None,
             verify: bool | str = True, cert: str | tuple[str, str] | None = None,
             proxies: dict[str, str] | None = None) -> requests.Response:
        return super().send(request, stream=stream,
                            timeout=self.timeout if timeout is None else timeout,
                            verify=verify, cert=cert, proxies=proxies)


def prepare_client(client: RESTClient, timeout: float) -> None:
    """Make one SDK call one HTTP request with a timeout: no hidden retries and sleeps.

    alpaca-py's constructors do not expose its retry settings, which live in `_retry`;
    with 0 the first 429/504 raises `APIError`, which `translate_api_error` maps."""
    client._retry = 0
    session = getattr(client, "_session", None)
    if isinstance(session, requests.Session):
        session.mount("https://", _TimeoutAdapter(timeout))


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_detail(err: APIError) -> tuple[Any, str]:
    """Alpaca's error `code` (None if absent) and message; the raw text if it is not JSON."""
    text = str(err)
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body.get("code"), one_line(str(body.get("message") or text))
    return None, one_line(text) or "no message"


def _retry_after(err: APIError, now: float | None = None) -> float | None:
    """Seconds to wait, from Retry-After or Alpaca's X-RateLimit-Reset (epoch seconds)."""
    response = err.response
    headers = response.headers if response is not None else {}
    try:
        if headers.get("Retry-After") is not None:
            return max(0.0, float(headers["Retry-After"]))
        if headers.get("X-RateLimit-Reset") is not None:
            now = time.time() if now is None else now
            return max(0.0, float(headers["X-RateLimit-Reset"]) - now)
    except ValueError:
        return None
    return None


def _reject_reason(message: str) -> str | None:
    lowered = message.lower()
    return next((code for text, code in _REJECT_REASONS if text in lowered), None)


def translate_api_error(err: APIError, what: str, *,
                        not_found: type[BrokerError] = OrderNotFound,
                        not_found_code: str | None = None,
                        invalid_code: str = "INVALID_ORDER") -> BrokerError:
    """The `errors` class for an Alpaca HTTP error, its message one line naming `what`.

    429 backs off; 5xx (and no status) retries; a known refusal of one request (403/422
    "insufficient buying power", ...) rejects with its code; other 401/403 stop the account;
    404 is `not_found`; other 4xx reject with `invalid_code`."""
    status = err.status_code
    code, message = _error_detail(err)
    text = f"{what}: {message} (HTTP {status}" + (f", code {code})" if code else ")")
    if status == 429:
        return BackOff(text, venue=VENUE, retry_after=_retry_after(err))
    if status is None or status >= 500 or status == 408:
        return Retry(text, venue=VENUE)
    reason = _reject_reason(message)
    if reason and status in (400, 403, 422):
        return Reject(text, venue=VENUE, code=reason)
    if status in (401, 403):
        return Stop(text, venue=VENUE)
    if status == 404:
        return not_found(text, venue=VENUE, code=not_found_code)
    return Reject(text, venue=VENUE, code=invalid_code)


def call_venue(what: str, request: Callable[[], T], *,
               not_found: type[BrokerError] = OrderNotFound,
               not_found_code: str | None = None,
               invalid_code: str = "INVALID_ORDER") -> T:
    """Run one SDK call; any HTTP or network failure leaves as an `errors` class."""
    try:
        return request()
    except APIError as err:
        raise translate_api_error(err, what, not_found=not_found, not_found_code=not_found_code,
                                  invalid_code=invalid_code) from err
    except requests.RequestException as err:  # connection refused, timeout, bad JSON
        raise Retry(f"{what}: {type(err).__name__}: {one_line(str(err))}", venue=VENUE) from err


def dec(value: Any) -> Decimal | None:
    """A JSON number or numeric string as `Decimal` (floats through their shortest repr,
    which is the literal Alpaca sent); None and "" are None."""
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation as err:
        raise ValueError(f"alpaca: {value!r} is not a number") from err


def dec0(value: Any) -> Decimal:
    return dec(value) or Decimal(0)


def parse_ts(value: Any) -> datetime:
    """An Alpaca RFC 3339 timestamp (nanoseconds are truncated) as an aware UTC datetime."""
    ts = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def as_json(value: Any) -> Any:
    """An SDK answer as JSON data: raw clients give it already, model clients a model."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return value


def _dec_str(value: Decimal) -> str:
    """A `Decimal` as Alpaca's plain decimal string (never exponent notation)."""
    return format(value, "f")


# ------------------------------------------------------------------ orders and fills

def _order_problem(order: OrderRequest) -> str | None:
    """Why Alpaca would refuse `order` outright, or None: checked before sending."""
    if not order.client_order_id or len(order.client_order_id) > MAX_CLIENT_ORDER_ID:
        return f"client_order_id must be 1 to {MAX_CLIENT_ORDER_ID} characters"
    if order.quantity <= 0:
        return f"quantity must be positive, got {order.quantity}"
    if order.time_in_force.upper() not in TIME_IN_FORCE:
        return f"time in force {order.time_in_force!r} is not one of {', '.join(TIME_IN_FORCE)}"
    if order.order_type not in _PRICES_NEEDED:
        return f"order type {order.order_type!r} is not supported"
    for name in _PRICES_NEEDED[order.order_type]:
        price = getattr(order, name)
        if price is None or price <= 0:
            return f"a {order.order_type} order needs a positive {name}"
    return None


def order_body(order: OrderRequest) -> dict[str, str]:
    """The JSON Alpaca's POST /v2/orders takes for `order`, or `Reject` (INVALID_ORDER).

    Alpaca equities have no reduce-only flag: `reduce_only` is not sent (a sell beyond the
    position opens a short unless the account has shorting disabled)."""
    problem = _order_problem(order)
    if problem:
        raise Reject(f"{_describe(order)}: {problem}", venue=VENUE, code="INVALID_ORDER")
    body = {"symbol": order.symbol, "qty": _dec_str(order.quantity), "side": order.side,
            "type": order.order_type, "time_in_force": TIME_IN_FORCE[order.time_in_force.upper()],
            "client_order_id": order.client_order_id}
    for name in _PRICES_NEEDED[order.order_type]:
        price = getattr(order, name)
        kind = "limit" if name == "limit_price" else "stop"
        on_tick = price_on_tick(price, price_tick(price), order.side, kind)
        if on_tick <= 0:
            raise Reject(f"{_describe(order)}: {name} {price} is below the tick "
                         f"{price_tick(price)}", venue=VENUE, code="INVALID_ORDER")
        if on_tick != price and on_tick >= 1:  # (a sell just under $1 rounded up: 1.00)
            on_tick = on_tick.quantize(PENNY)
        body[name] = _dec_str(on_tick)
    return body


def _describe(order: OrderRequest) -> str:
    return (f"{order.order_type} order {order.client_order_id} {order.side} {order.quantity} "
            f"{order.symbol}")


def broker_status(status: str, filled: Decimal) -> BrokerStatus:
    """MMATS's status for an Alpaca order status. pending_cancel, done_for_day, held, ...
    are still live, as is any status Alpaca adds later."""
    if status in _FINAL_STATUS:
        return _FINAL_STATUS[status]
    return "partially_filled" if filled > 0 else "submitted"


def order_from_json(raw: Mapping[str, Any]) -> BrokerOrder:
    """A BrokerOrder from an Alpaca order object. `fills` stays empty: an order carries only
    cumulative totals (see `fills_from_snapshots`, `AlpacaBroker.fills_since`)."""
    filled = dec0(raw.get("filled_qty"))
    status = str(raw.get("status", ""))
    reason = f"replaced by order {raw.get('replaced_by')}" if status == "replaced" else None
    return BrokerOrder(
        broker_order_id=str(raw["id"]), client_order_id=raw.get("client_order_id"),
        symbol=str(raw.get("symbol", "")), side=cast(Side, raw.get("side")),
        quantity=dec0(raw.get("qty")), filled_quantity=filled,
        average_price=dec(raw.get("filled_avg_price")), status=broker_status(status, filled),
        reason=reason, raw=dict(raw))


def fill_from_activity(activity: Mapping[str, Any]) -> BrokerFill:
    """A BrokerFill from a FILL account activity: its own `qty`, never `cum_qty`. Alpaca
    equities charge no commission on the fill (regulatory fees are separate FEE
    activities); an activity does not carry the client order id."""
    return BrokerFill(
        fill_id=str(activity["id"]), broker_order_id=str(activity["order_id"]),
        client_order_id=None, symbol=str(activity["symbol"]),
        # a short sale's FILL activity says side "sell_short"
        side="sell" if activity["side"] == "sell_short" else cast(Side, activity["side"]),
        quantity=dec0(activity["qty"]),
        price=dec0(activity["price"]), commission=Decimal(0), commission_currency="USD",
        ts=parse_ts(activity["transaction_time"]))


def _bad_response(what: str, problem: str) -> Retry:
    """A malformed answer from Alpaca, as the other adapters report one: ask again later."""
    return Retry(one_line(f"{what}: {problem}"), venue=VENUE, code="BAD_RESPONSE")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _activity_ts(activity: Mapping[str, Any], activity_id: str, what: str) -> datetime:
    """When a non-trade activity happened: its own timestamp where Alpaca gives one
    (`created_at`), else midnight UTC of its `date`."""
    field_name = "created_at" if activity.get("created_at") else "date"
    value = activity.get(field_name)
    try:
        if field_name == "created_at":
            return parse_ts(value)
        day = date.fromisoformat(str(value)[:10]) if value else None
    except (TypeError, ValueError):
        day = None
    if day is None:
        raise _bad_response(what, f"activity {activity_id} has {field_name} {_shown(value)}, "
                                  "not a date")
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def cash_movement_from_activity(activity: Mapping[str, Any],
                                what: str = "cash movements") -> CashMovement | None:
    """A CashMovement from a non-trade activity, or None for one that moved no cash: a type
    not in CASH_ACTIVITY_KINDS, a status other than executed/correct, a zero amount. A
    missing id or a `net_amount` that is not a number is a malformed answer (`Retry` with
    code BAD_RESPONSE) naming the field and the activity."""
    activity_id = str(activity.get("id") or "")
    if not activity_id:
        raise _bad_response(what, f"a {activity.get('activity_type') or 'non-trade'} activity "
                                  f"dated {activity.get('date')} has no id")
    activity_type = activity.get("activity_type")
    if not activity_type:
        raise _bad_response(what, f"activity {activity_id} has no activity_type")
    activity_type = str(activity_type).upper()
    if activity_type not in CASH_ACTIVITY_KINDS:
        return None
    status = activity.get("status")
    if status and str(status).lower() not in _BOOKED_STATUSES:
        return None
    raw_amount = activity.get("net_amount")
    try:
        amount = dec(raw_amount)
    except ValueError:
        amount = None
    if amount is None or not amount.is_finite():
        raise _bad_response(what, f"activity {activity_id} has net_amount {_shown(raw_amount)}, "
                                  "not a number")
    if amount == 0:
        return None
    kind = CASH_ACTIVITY_KINDS[activity_type] or ("deposit" if amount > 0 else "withdrawal")
    description = one_line(str(activity.get("description") or ""))[:MAX_DESCRIPTION]
    return CashMovement(
        movement_id=activity_id, kind=kind, amount=amount, currency="USD",
        ts=_activity_ts(activity, activity_id, what),
        symbol=str(activity["symbol"]) if activity.get("symbol") else None,
        description=description or None)


def _snapshot_fill(raw: Mapping[str, Any], prev_qty: Decimal, prev_notional: Decimal,
                   qty: Decimal, notional: Decimal) -> BrokerFill:
    """The execution between two snapshots: quantity and price of the increment only."""
    price = ((notional - prev_notional) / (qty - prev_qty)).quantize(PRICE_DIGITS)
    stamp = raw.get("filled_at") or raw.get("updated_at") or raw.get("submitted_at")
    return BrokerFill(
        fill_id=f"{raw['id']}:{_dec_str(qty.normalize())}", broker_order_id=str(raw["id"]),
        client_order_id=raw.get("client_order_id"), symbol=str(raw.get("symbol", "")),
        side=cast(Side, raw.get("side")), quantity=qty - prev_qty, price=price,
        commission=Decimal(0), commission_currency="USD", ts=parse_ts(stamp))


def fills_from_snapshots(snapshots: Iterable[Mapping[str, Any]], *,
                         known: Mapping[str, tuple[Decimal, Decimal | None]] | None = None
                         ) -> list[BrokerFill]:
    """Per-fill deltas from successive Alpaca order snapshots (cumulative `filled_qty` and
    `filled_avg_price`, as in GET /v2/orders or trade-update events).

    Each fill is the growth of `filled_qty` since the order's previous snapshot, priced by
    the growth of filled_qty * filled_avg_price; its id, `{order_id}:{cum_qty}`, is the same
    whenever the same snapshot is seen again. A snapshot that does not grow the quantity (a
    repeat, a late one) yields nothing. `known` gives, per order id, the (cum_qty, avg_price)
    already accounted for, so a restarted reader does not report old fills again."""
    seen = {oid: (qty, qty * (avg or 0)) for oid, (qty, avg) in (known or {}).items()}
    fills: list[BrokerFill] = []
    for raw in snapshots:
        oid = str(raw["id"])
        qty = dec0(raw.get("filled_qty"))
        notional = qty * dec0(raw.get("filled_avg_price"))
        prev_qty, prev_notional = seen.get(oid, (Decimal(0), Decimal(0)))
        if qty <= prev_qty:
            continue
        fills.append(_snapshot_fill(raw, prev_qty, prev_notional, qty, notional))
        seen[oid] = (qty, notional)
    return fills


def price_tick(price: Decimal | None) -> Decimal:
    """The US equity price increment: $0.0001 below $1, $0.01 from $1 (Reg NMS rule 612)."""
    return SUB_PENNY if price is not None and price < 1 else PENNY


def rules_from_asset(asset: Mapping[str, Any],
                     reference_price: Decimal | None = None) -> InstrumentRules:
    """Order-size rules for an Alpaca asset: fractionable shares step by 1e-9 with a $1
    minimum order, others by whole shares; the asset's own increments win if it has any."""
    fractionable = bool(asset.get("fractionable"))
    step = dec(asset.get("min_trade_increment")) or (FRACTIONAL_STEP if fractionable
                                                     else Decimal(1))
    return InstrumentRules(
        symbol=str(asset["symbol"]), quantity_step=step,
        min_quantity=dec(asset.get("min_order_size")) or step,
        price_tick=dec(asset.get("price_increment")) or price_tick(reference_price),
        min_notional=FRACTIONAL_MIN_NOTIONAL if fractionable else None)


def position_from_json(raw: Mapping[str, Any]) -> BrokerPosition:
    """A signed position: short is negative whether Alpaca sends "-5" or "5" with side short."""
    qty = abs(dec0(raw.get("qty")))
    return BrokerPosition(symbol=str(raw["symbol"]),
                          quantity=-qty if raw.get("side") == "short" else qty,
                          average_price=dec(raw.get("avg_entry_price")))


def _base_url(client: RESTClient) -> str | None:
    base = getattr(client, "_base_url", None)
    if isinstance(base, Enum):
        base = base.value
    return str(base) if base else None


def _check_environment(key: str, endpoint: str, client: RESTClient) -> None:
    """Refuse a paper key on the live endpoint (and the reverse), and a client pointed at
    the other endpoint than the account's."""
    key_endpoint = _KEY_PREFIX_ENDPOINT.get(key[:2])
    if key_endpoint and key_endpoint != endpoint:
        raise EnvironmentMismatch(f"a {key_endpoint} key cannot trade on the {endpoint} "
                                  f"endpoint {ENDPOINT_URLS[endpoint]}", venue=VENUE)
    url = _base_url(client)
    if url in ENDPOINT_URLS.values() and url != ENDPOINT_URLS[endpoint]:
        raise EnvironmentMismatch(f"the {endpoint} account's client points at {url}",
                                  venue=VENUE)


def _after(since: datetime) -> str:
    """Alpaca's `after` for activities at or after `since`: it takes whole seconds and may
    be exclusive, so it asks from a second earlier (callers drop what is before `since`)."""
    return (since - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _order_uuid(broker_order_id: str, what: str) -> UUID:
    """Alpaca order ids are UUIDs; anything else names no order there."""
    try:
        return UUID(str(broker_order_id))
    except ValueError as err:
        raise OrderNotFound(f"{what}: not an Alpaca order id", venue=VENUE) from err


class AlpacaBroker:
    """The Alpaca trading API (paper or live) for US stocks, as a `Broker`.

    Symbols are Alpaca's own (`AAPL`, `BRK.B`); quantities and prices are `Decimal`."""

    venue = VENUE

    def __init__(self, credentials: Mapping[str, str], endpoint: Literal["paper", "live"], *,
                 client: TradingClient | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        if endpoint not in ENDPOINT_URLS:
            raise EnvironmentMismatch(f"no {endpoint!r} endpoint: Alpaca has paper and live",
                                      venue=VENUE)
        key, secret = credential_pair(credentials)
        self.endpoint: Endpoint = endpoint
        self._client = client or TradingClient(api_key=key, secret_key=secret,
                                               paper=endpoint == "paper", raw_data=True)
        _check_environment(key, endpoint, self._client)
        prepare_client(self._client, timeout)
        self.endpoint_url = _base_url(self._client) or ENDPOINT_URLS[endpoint]

    # -- orders

    def place_order(self, order: OrderRequest) -> BrokerOrder:
        """Submit `order`; if Alpaca already has its client_order_id, return that order."""
        body = order_body(order)
        try:
            raw = as_json(call_venue(_describe(order),
                                     lambda: self._client.post("/orders", body)))
        except Reject as err:
            if err.code != "DUPLICATE_CLIENT_ORDER_ID":
                raise
            return self._existing(order)
        return order_from_json(raw)

    def _existing(self, order: OrderRequest) -> BrokerOrder:
        """The order a re-sent request's client_order_id names, if it is the same order."""
        found = self._by_client_id(order.client_order_id)
        if (found.symbol, found.side, found.quantity) != (order.symbol, order.side,
                                                          order.quantity):
            raise Reject(f"{_describe(order)}: client_order_id already names {found.side} "
                         f"{found.quantity} {found.symbol} order {found.broker_order_id}",
                         venue=VENUE, code="CLIENT_ORDER_ID_CONFLICT")
        log.event(_log, "order already at alpaca", client_order_id=order.client_order_id,
                  broker_order_id=found.broker_order_id, symbol=order.symbol)
        return found

    def cancel_order(self, broker_order_id: str, symbol: str) -> BrokerOrder:
        """Ask Alpaca to cancel, then report the order as it is. Cancelling is asynchronous
        there (pending_cancel reads as still live). A cancel Alpaca refuses (HTTP 422, e.g.
        'order is already in "filled" state') is answered by reading the order again: one
        that a cancel can no longer change (filled, canceled, expired, rejected, replaced,
        done_for_day, or already pending_cancel) is reported as it is rather than as an
        error; otherwise the refusal is raised."""
        what = f"cancel {symbol} order {broker_order_id}"
        order_id = _order_uuid(broker_order_id, what)
        try:
            call_venue(what, lambda: self._client.cancel_order_by_id(order_id))
        except Reject as err:
            status = getattr(err.__cause__, "status_code", None)
            if status != 422 and err.code != "ORDER_NOT_CANCELABLE":
                raise
            current = self._by_id(broker_order_id, symbol)
            if str(current.raw.get("status", "")) not in _NOT_CANCELABLE_STATUSES:
                raise
            return current
        return self._by_id(broker_order_id, symbol)

    def order_status(self, *, broker_order_id: str | None = None,
                     client_order_id: str | None = None,
                     symbol: str | None = None) -> BrokerOrder:
        if broker_order_id:
            return self._by_id(broker_order_id, symbol)
        if client_order_id:
            return self._by_client_id(client_order_id)
        raise ValueError("alpaca: order_status needs a broker_order_id or a client_order_id")

    def _by_id(self, broker_order_id: str, symbol: str | None) -> BrokerOrder:
        what = f"status of {symbol or 'order'} {broker_order_id}"
        order_id = _order_uuid(broker_order_id, what)
        return order_from_json(as_json(
            call_venue(what, lambda: self._client.get_order_by_id(order_id))))

    def _by_client_id(self, client_order_id: str) -> BrokerOrder:
        what = f"status of order with client id {client_order_id}"
        return order_from_json(as_json(
            call_venue(what, lambda: self._client.get_order_by_client_id(client_order_id))))

    def open_orders(self, symbol: str | None = None) -> Sequence[BrokerOrder]:
        """Open orders (at most Alpaca's 500 per request), for `symbol` or all."""
        query = GetOrdersRequest(status=QueryOrderStatus.OPEN, limit=OPEN_ORDERS_LIMIT,
                                 symbols=[symbol] if symbol else None)
        raws = call_venue(f"open orders {symbol or '(all symbols)'}",
                          lambda: self._client.get_orders(query))
        return [order_from_json(raw) for raw in as_json(raws)]

    # -- fills

    def fills_since(self, since: datetime, symbol: str | None = None) -> Sequence[BrokerFill]:
        """Executions at or after `since`, oldest first, from GET /v2/account/activities/FILL,
        paged by the last activity id. Each is one execution with its own `qty`."""
        since = parse_ts(since)
        fills = [fill_from_activity(a) for a in self._fill_activities(since)]
        return [f for f in fills if f.ts >= since and (symbol is None or f.symbol == symbol)]

    def _fill_activities(self, since: datetime) -> list[Mapping[str, Any]]:
        after = _after(since)
        return self._activities("/account/activities/FILL", f"fills since {after}",
                                {"after": after})

    def _activities(self, path: str, what: str,
                    params: Mapping[str, Any]) -> list[Mapping[str, Any]]:
        """Every activity GET `path` answers for `params`, oldest first: a full page is
        followed by the one after its last activity's id (`page_token`)."""
        query: dict[str, Any] = {**params, "direction": "asc", "page_size": ACTIVITY_PAGE_SIZE}
        out: list[Mapping[str, Any]] = []
        while True:
            page = call_venue(what, lambda: self._client.get(path, dict(query))) or []
            if not isinstance(page, list) or not all(isinstance(a, Mapping) for a in page):
                raise _bad_response(what, f"expected a list of activities, got "
                                          f"{_shown(page)}")
            out.extend(page)
            if len(page) < ACTIVITY_PAGE_SIZE:
                return out
            last = page[-1].get("id")
            if not last:
                raise _bad_response(what, "the last activity of a full page has no id")
            if last == query.get("page_token"):
                return out
            query["page_token"] = last

    # -- cash outside fills

    def cash_movements_since(self, since: datetime) -> list[CashMovement]:
        """Fees, dividends, interest, deposits, withdrawals and cash journals Alpaca booked
        at or after `since`, oldest first, from GET /v2/account/activities with the types of
        CASH_ACTIVITY_KINDS (one paged request). Canceled and zero activities are left out.

        Alpaca's `after` is the booking time; a movement without a finer timestamp is
        stamped midnight UTC of its `date`, which can be the day before it was booked (a
        fee for yesterday's trade), so such a one is kept even when its `ts` is before
        `since`: `movement_id` (Alpaca's activity id) lets the ledger book it once."""
        since = parse_ts(since)
        after = _after(since)
        what = f"cash movements since {after}"
        activities = self._activities("/account/activities", what, {
            "activity_types": ",".join(CASH_ACTIVITY_KINDS), "after": after})
        movements = []
        for activity in activities:
            movement = cash_movement_from_activity(activity, what)
            if movement is None or (activity.get("created_at") and movement.ts < since):
                continue  # moved no cash, or in the second asked for early
            movements.append(movement)
        return sorted(movements, key=lambda m: m.ts)  # stable: Alpaca's order within a ts

    # -- account

    def positions(self) -> Sequence[BrokerPosition]:
        raws = call_venue("positions", self._client.get_all_positions)
        return [position_from_json(raw) for raw in as_json(raws)]

    def balances(self) -> Sequence[Balance]:
        """The account's cash (total) and buying power (free), in the account currency."""
        raw = as_json(call_venue("account balances", self._client.get_account))
        return [Balance(currency=str(raw.get("currency") or "USD"), total=dec0(raw.get("cash")),
                        free=dec0(raw.get("buying_power")))]

    def instrument_rules(self, symbol: str,
                         reference_price: Decimal | None = None) -> InstrumentRules:
        """Size rules from the Alpaca asset. The price tick depends on the price: pass
        `reference_price` for a stock under $1 (else the $0.01 tick is assumed)."""
        what = f"asset {symbol}"
        asset = as_json(call_venue(what, lambda: self._client.get_asset(symbol),
                                   not_found=Reject, not_found_code="UNKNOWN_SYMBOL"))
        if not asset.get("tradable") or asset.get("status") != "active":
            raise Reject(f"{what}: not tradable at Alpaca (status {asset.get('status')})",
                         venue=VENUE, code="INSTRUMENT_NOT_TRADABLE")
        return rules_from_asset(asset, reference_price)
