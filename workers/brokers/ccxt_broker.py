"""Crypto spot trading through ccxt's unified sync API (binance, bybit, okx, coinbase, kraken).

One `CcxtBroker` speaks for one exchange account. It calls only ccxt's unified methods
(`create_order`, `fetch_order`, `fetch_my_trades`, `fetch_balance`, ...); the few
exchange-specific settings it needs are the small tables below, each entry saying why.

Choices a caller should know:

- Errors: every ccxt exception becomes exactly one class of `workers.brokers.errors` through
  `ERROR_MAP`, read top to bottom. ccxt's classes nest (`RateLimitExceeded` is a
  `NetworkError`, `OrderNotFound` an `InvalidOrder`, `BadSymbol` a `BadRequest`), so the
  table lists every subclass before its parents. A refusal that came with an HTTP 5xx is a
  Retry whatever ccxt called it: the venue failed and the outcome is unknown.
- Idempotence: MMATS's `client_order_id` travels with every order. When the venue answers
  "duplicate client order id", the order already placed is looked up and returned. Binance
  only refuses a duplicate while the first order is still open: a re-delivered request for
  an order that has already filled must be checked with `order_status(client_order_id=...)`
  before it is sent again.
- Client order id spelling: MMATS ids (`mm12-345`) are sent as they are wherever the venue
  accepts them; where it does not (OKX takes letters and digits only, Kraken 18
  characters), a stable 32-hex digest of the id is sent instead (`venue_client_id`).
- Sizes: quantities are cut down to the market's amount step; limit prices go to the
  market's tick never past the trader's limit (a buy's down, a sell's up), stop prices to
  the nearest tick as the venue rounds them; an order under the venue's minimum quantity
  or notional is refused before any request is sent. The notional of a market order is
  left to the venue (no price is known). Coinbase market buys are refused: ccxt can only
  size them in quote currency.
- Venues that list orders and trades per market (Binance) need a symbol for
  `fills_since` and `order_status`; without one the call is refused (SYMBOL_REQUIRED),
  before any request is sent (the reconciler then asks market by market).
- Fill ids are `<venue market id>:<trade id>`: Binance and OKX number trades per market,
  while the ledger needs fill ids unique per account.
- Spot has no positions: `positions()` reports each non-zero balance of a non-cash currency
  as a long position in that currency against the first quote currency of
  `QUOTE_PREFERENCE` the venue lists (`BTC/USDT`), with no average price (spot venues keep
  no cost basis). Cash currencies (`CASH_CURRENCIES`) are balances, not positions.
- Cash movements outside fills are the deposits and withdrawals of cash currencies
  (`cash_movements_since`, from ccxt's `fetch_deposits` / `fetch_withdrawals`): finished
  ones only, a withdrawal's fee as a movement of its own; a coin deposited is a position.
  Spot fees come with the fills. Coinbase's transfers, and those of Binance's testnet and
  OKX's demo trading, are not read (`TRANSFERS_NOT_READ`): there a deposit shows as a
  BALANCE_MISMATCH, booked by hand (`mmats account book`). The API key needs to read the
  funding history (Kraken: Funds permissions - Query, and for withdrawals Withdraw or
  Data - Query ledger entries; Bybit: the master UID's key): a refusal is a Stop.
  OKX and Bybit credit deposits to, and pay withdrawals from, the funding account by
  default, and Binance may use its funding wallet: until moved to or from the trading
  account (a transfer, not listed), such a movement shows as a BALANCE_MISMATCH.
- Money is `Decimal` (ccxt's floats and strings go through `Decimal(str(x))`), times are
  aware UTC.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar

import ccxt

from workers.brokers import errors
from workers.brokers.base import (
    Balance,
    BrokerFill,
    BrokerOrder,
    BrokerPosition,
    BrokerStatus,
    CashMovement,
    InstrumentRules,
    OrderRequest,
)
from workers.runtime.log import register_secret

T = TypeVar("T")
TransferKind = Literal["deposit", "withdrawal"]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# ccxt exception -> (MMATS class, reason code); the first matching row wins, so a class is
# listed before every class it derives from (tests/test_broker_ccxt.py checks the order).
ERROR_MAP: tuple[tuple[type[Exception], type[errors.BrokerError], str], ...] = (
    (ccxt.OrderNotFound, errors.OrderNotFound, "ORDER_NOT_FOUND"),
    (ccxt.DuplicateOrderId, errors.Reject, "DUPLICATE_CLIENT_ORDER_ID"),
    (ccxt.InsufficientFunds, errors.Reject, "INSUFFICIENT_FUNDS"),
    (ccxt.BadSymbol, errors.Reject, "UNKNOWN_SYMBOL"),
    (ccxt.InvalidOrder, errors.Reject, "INVALID_ORDER"),
    (ccxt.BadRequest, errors.Reject, "BAD_REQUEST"),
    (ccxt.MarketClosed, errors.Reject, "MARKET_CLOSED"),
    (ccxt.RestrictedLocation, errors.Stop, "RESTRICTED_LOCATION"),
    (ccxt.ManualInteractionNeeded, errors.Stop, "MANUAL_INTERACTION_NEEDED"),
    (ccxt.OperationRejected, errors.Reject, "OPERATION_REJECTED"),
    (ccxt.AccountSuspended, errors.Stop, "ACCOUNT_SUSPENDED"),
    (ccxt.PermissionDenied, errors.Stop, "PERMISSION_DENIED"),
    (ccxt.AuthenticationError, errors.Stop, "AUTHENTICATION_FAILED"),
    (ccxt.RateLimitExceeded, errors.BackOff, "RATE_LIMITED"),
    (ccxt.DDoSProtection, errors.BackOff, "DDOS_PROTECTION"),
    (ccxt.OnMaintenance, errors.Retry, "VENUE_MAINTENANCE"),
    (ccxt.ExchangeNotAvailable, errors.Retry, "VENUE_UNAVAILABLE"),
    (ccxt.RequestTimeout, errors.Retry, "TIMEOUT"),
    (ccxt.InvalidNonce, errors.Retry, "INVALID_NONCE"),
    (ccxt.NetworkError, errors.Retry, "NETWORK_ERROR"),
    (ccxt.OperationFailed, errors.Retry, "OPERATION_FAILED"),
    (ccxt.NotSupported, errors.Reject, "NOT_SUPPORTED"),
    (ccxt.ArgumentsRequired, errors.Reject, "ARGUMENTS_REQUIRED"),
    (ccxt.ExchangeError, errors.Reject, "VENUE_ERROR"),
    (ccxt.BaseError, errors.Retry, "VENUE_ERROR"),
)

# ccxt options that keep each exchange to spot and skip what a spot account never needs
# (derivative and margin market lists, the currency list Binance fetches with keys).
SPOT_OPTIONS: dict[str, dict[str, Any]] = {
    "binance": {"defaultType": "spot", "fetchMarkets": {"types": ["spot"]},
                "fetchCurrencies": False, "fetchMargins": False,
                "warnOnFetchOpenOrdersWithoutSymbol": False},
    "bybit": {"defaultType": "spot", "fetchMarkets": {"types": ["spot"]}},
    "okx": {"defaultType": "spot", "fetchMarkets": {"types": ["spot"]}},
}

# Client order ids each venue accepts; others are sent as a digest (see venue_client_id).
CLIENT_ID_RULES: dict[str, re.Pattern[str]] = {
    "binance": re.compile(r"[.A-Za-z0-9:/_-]{1,36}"),
    "bybit": re.compile(r"[A-Za-z0-9_-]{1,36}"),
    "okx": re.compile(r"[A-Za-z0-9]{1,32}"),
    "kraken": re.compile(r"[A-Za-z0-9_-]{1,18}"),
}

# How venues say "that client order id is taken" (lower case; matched in ccxt's message,
# which carries the venue's body): Binance -2010, Bybit 110072 / 170141, OKX 51016.
DUPLICATE_MARKERS = ("duplicate order sent", "orderlinkedid is duplicate",
                     "duplicate clientorderid", "duplicated clordid", "duplicate clordid")

# Venues whose unified fetch_order finds an order by client id (`clientOrderId` param);
# elsewhere the open and closed orders are searched.
FETCH_ORDER_BY_CLIENT_ID = frozenset({"binance", "okx"})
# ... and the param that makes that search a query for the one id, where the venue takes
# one: its order lists answer only their newest entries (Bybit 20, Kraken 50), and Kraken
# refuses a taken cl_ord_id only while the first order is open, so an order searched for
# among the newest alone would be placed again once older.
CLIENT_ID_FILTER = {"bybit": "orderLinkId", "kraken": "clientOrderId"}
# Venues where ccxt's fetch_order refuses to run (Bybit's unified accounts: ArgumentsRequired,
# it sees only the last 500 orders): an order is looked up by `orderId` in the open, then
# the closed and cancelled orders.
FETCH_ORDER_BY_SEARCH = frozenset({"bybit"})

# How venues page "my trades since T". Most answer with the NEWEST trades of the window
# asked for (OKX's fills history, Bybit's and Coinbase's execution lists, Kraken's trades
# history), so paging forward from a full page's newest trade would skip the older ones:
# fills_since walks such a window back with `until` instead. Only the venues known to
# answer oldest first page forward alone; walking back an oldest-first venue costs one
# request that brings nothing, so an unknown venue is walked back too.
OLDEST_FIRST = frozenset({"binance"})

# Trades per page where ccxt does not say (its `features`) or a venue sends fewer than
# asked: a page that is short because of the venue's own cap would end the search early.
TRADES_PAGE = {"kraken": 50}

# A venue whose trade history answers at most N days per request (ccxt's `untilDays`:
# Binance 1, Bybit 7) is asked window by window from `since` to now, so that a quiet
# window (no trade in it) does not end the search before the windows after it.
_DAY_MS = 86_400_000
_WINDOW_DAYS_MAX = 3650  # (a larger untilDays is no real limit)

# Params that size a spot market buy in base currency: OKX reads `sz` as quote currency to
# spend unless tgtCcy=base_ccy (ccxt defaults to base_ccy today; pinned here regardless).
MARKET_BUY_PARAMS: dict[str, dict[str, Any]] = {"okx": {"tgtCcy": "base_ccy"}}
# ccxt sizes Coinbase market buys in quote currency only: refused rather than mis-sized.
NO_BASE_SIZED_MARKET_BUY = frozenset({"coinbase"})

QUOTE_PREFERENCE = ("USDT", "USDC", "USD", "EUR")
CASH_CURRENCIES = frozenset({*QUOTE_PREFERENCE, "FDUSD", "BUSD", "DAI", "TUSD", "GBP", "JPY"})

# --- deposits and withdrawals (cash_movements_since) ---
# Venues whose deposits and withdrawals are not read (none is returned; each shows as the
# reconciler's BALANCE_MISMATCH, booked by hand), and why.
TRANSFERS_NOT_READ: dict[str, str] = {
    "coinbase": "ccxt lists Coinbase transfers per account only (an account id, or a currency "
                "looked up in the account list), from v2 endpoints that hold fiat only and "
                "take no time filter; stablecoin sends are only in an account's whole "
                "transaction list, where ccxt calls every entry, trades too, a deposit or a "
                "withdrawal by its sign",
}
# ... and on the venue's testnet or demo account only.
TRANSFERS_NOT_READ_IN_SANDBOX: dict[str, str] = {
    "binance": "the spot testnet has no wallet (sapi) endpoints: ccxt raises NotSupported",
    "okx": "demo trading serves every endpoint but the deposit and withdrawal ones",
}

# How far one request may reach: Binance answers startTime..endTime of 90 days at most
# (ccxt asks since + 90 days itself), Bybit "less than 30 days", judged by the second.
# The history from `since` to now is asked window by window; elsewhere in one go.
TRANSFERS_WINDOW_MS = {"binance": 90 * _DAY_MS, "bybit": 30 * _DAY_MS - 1000}

# Records one answer holds at most (the limit asked for where ccxt sends one): a full
# answer means there may be more. Kraken answers 25 without its cursor, and ccxt sends it
# no limit; none is passed there, as ccxt's own cut of a longer answer keeps the oldest.
TRANSFERS_PAGE = {"binance": 1000, "bybit": 50, "okx": 100, "kraken": 25}
TRANSFERS_LIMIT_NOT_SENT = frozenset({"kraken"})
# Venues paged with `offset` within a window (Binance: ccxt drops `until` from its
# withdrawal query). The others answer newest first (OKX, Bybit, Kraken): a full answer is
# walked back with `until` from its oldest record, that millisecond included.
TRANSFERS_BY_OFFSET = frozenset({"binance"})

# Venue params: Bybit lists on-chain withdrawals only unless asked for all (withdrawType 2,
# transfers to other Bybit accounts too).
TRANSFER_PARAMS: dict[tuple[str, str], dict[str, Any]] = {
    ("bybit", "withdrawal"): {"withdrawType": 2},
}

# A transfer's fee charged in a cash currency is a movement of its own (`<movement id>:fee`,
# kind fee): ccxt's `amount` is what was sent or credited, the fee apart. What each venue's
# answer says, as ccxt parses it:
# - binance: a withdrawal's `amount` is what left for the address, `transactionFee` is
#   charged on top (the examples ccxt quotes only add up so: 20 USDT for a 20 USDT fee);
#   crypto deposit records carry no fee.
# - bybit: a withdrawal's `amount` is what the address receives (the default feeType 0 of
#   /v5/asset/withdraw/create), `withdrawFee` on top; a deposit's `depositFee` (rarely set)
#   is taken as charged apart too (not documented either way).
# - okx: "Withdrawal fee is not included in withdrawal amount" (POST /api/v5/asset/
#   withdrawal); ccxt gives deposits a fee of 0.
# - kraken: its ledger moves a balance by `amount`, then by `fee` (balance = old ± amount -
#   fee), deposits and withdrawals alike.
# - coinbase (not read): ccxt's amount of a fiat withdrawal is its `subtotal`, fee included.
# Kinds whose ccxt amount already includes the fee (no fee movement):
FEE_IN_AMOUNT = frozenset({("coinbase", "withdrawal")})
_DESCRIPTION_LENGTH = 200

CREDENTIAL_KEYS = {"apiKey": "apiKey", "api_key": "apiKey", "key": "apiKey",
                   "secret": "secret", "api_secret": "secret", "password": "password",
                   "passphrase": "password", "uid": "uid", "privateKey": "privateKey",
                   "walletAddress": "walletAddress"}


# --- conversions shared with the feed -------------------------------------------------


def to_decimal(value: Any) -> Decimal:
    """`value` (a ccxt float, int or string) as an exact Decimal, via its shortest text."""
    try:
        return Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"not a number: {value!r}") from exc


def optional_decimal(value: Any) -> Decimal | None:
    return None if value is None or value == "" else to_decimal(value)


def ms_to_datetime(ms: int | float) -> datetime:
    """A ccxt millisecond timestamp as an aware UTC datetime (exact, no float seconds)."""
    return _EPOCH + timedelta(milliseconds=int(ms))


def datetime_to_ms(ts: datetime) -> int:
    """An aware datetime as ccxt's millisecond timestamp; naive times are refused."""
    if ts.tzinfo is None:
        raise ValueError(f"naive datetime {ts.isoformat()}: pass an aware UTC time")
    return (ts - _EPOCH) // timedelta(milliseconds=1)


# --- errors ----------------------------------------------------------------------------


def venue_message(exc: Exception, exchange_id: str) -> str:
    """The venue's own words from a ccxt exception, on one line.

    ccxt writes `"<exchange id> <body or message>"`; a JSON body is reduced to its message
    field (`msg`, `retMsg`, `message`, ...), and the rest is kept as it is.
    """
    text = str(exc).strip()
    if text.startswith(exchange_id + " "):
        text = text[len(exchange_id) + 1:]
    text = _message_from_json(text)
    return " ".join(text.split()) or type(exc).__name__


def _message_from_json(text: str) -> str:
    start = text.find("{")
    if start < 0:
        return text
    try:
        body = json.loads(text[start:])
    except ValueError:
        return text
    if not isinstance(body, dict):
        return text
    data = body.get("data")  # OKX: the per-order message says more than the envelope's
    if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("sMsg"):
        return str(data[0]["sMsg"])
    for key in ("msg", "retMsg", "message", "error_message", "error"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value:
            return "; ".join(str(v) for v in value)
    return text


def retry_after_seconds(headers: Mapping[str, Any] | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date), else None."""
    if not headers:
        return None
    value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(str(value))
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def map_ccxt_error(exc: Exception, *, venue: str, exchange: Any, action: str,
                   symbol: str | None = None,
                   http_status: int | None = None) -> errors.BrokerError:
    """The MMATS error for a ccxt exception: one line naming the action, symbol and problem
    with the venue's message; BackOff carries the Retry-After of the response, if any.

    A refusal that came with an HTTP 5xx status is a Retry: the venue failed, and the
    outcome of the request is unknown (ccxt classes unknown venue codes, such as Binance's
    -1008 "server busy" on a 503, as a plain ExchangeError).
    """
    cls, code = next(((c, k) for e, c, k in ERROR_MAP if isinstance(exc, e)),
                     (errors.Retry, "VENUE_ERROR"))
    if http_status is not None and http_status >= 500 and cls is errors.Reject:
        cls, code = errors.Retry, "VENUE_UNAVAILABLE"
    where = f"{action} {symbol}" if symbol else action
    problem = code.lower().replace("_", " ")
    message = f"{where}: {problem}: {venue_message(exc, exchange.id)}"
    retry_after = None
    if cls is errors.BackOff:
        retry_after = retry_after_seconds(getattr(exchange, "last_response_headers", None))
    return cls(message, venue=venue, code=code, retry_after=retry_after)


class HttpStatusProbe:
    """The HTTP status of the exchange's latest response, recorded by a `requests` response
    hook on ccxt's session (ccxt's exceptions do not carry it). `reset()` before each call
    so that a status is never read from an earlier request."""

    def __init__(self, exchange: Any) -> None:
        self.status: int | None = None
        session = getattr(exchange, "session", None)
        if session is not None:
            session.hooks.setdefault("response", []).append(self._record)

    def _record(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self.status = getattr(response, "status_code", None)

    def reset(self) -> None:
        self.status = None


def is_duplicate_client_id(exc: Exception) -> bool:
    """Whether the venue refused an order because its client order id is already used."""
    if isinstance(exc, ccxt.DuplicateOrderId):
        return True
    text = str(exc).lower()
    return any(marker in text for marker in DUPLICATE_MARKERS)


def venue_client_id(exchange_id: str, client_order_id: str) -> str:
    """The client order id as sent to the venue: MMATS's own where the venue accepts it,
    else a stable 32-hex digest (valid on every venue: OKX, Kraken's short UUID, ...)."""
    rule = CLIENT_ID_RULES.get(exchange_id)
    if rule is None or rule.fullmatch(client_order_id):
        return client_order_id
    return hashlib.blake2b(client_order_id.encode(), digest_size=16).hexdigest()


# --- building the exchange ----------------------------------------------------------------


def build_exchange(exchange_id: str, venue: str, config: dict[str, Any] | None = None) -> Any:
    """A new ccxt sync exchange by id; an unknown id stops the account (a configuration fault)."""
    exchange_class = getattr(ccxt, exchange_id, None)
    if not (isinstance(exchange_class, type) and issubclass(exchange_class, ccxt.Exchange)):
        raise errors.Stop(f"ccxt has no exchange {exchange_id!r}", venue=venue,
                          code="UNKNOWN_VENUE")
    return exchange_class(config or {})


def api_base_url(exchange: Any) -> str:
    """The base URL the exchange's trading (private) API calls go to, hostname filled in."""
    api = exchange.urls.get("api")
    url: Any = api
    if isinstance(api, dict):
        url = next((api[k] for k in ("private", "rest", "spot", "public") if k in api),
                   next((v for v in api.values() if isinstance(v, str)), ""))
    return str(exchange.implode_hostname(url)) if isinstance(url, str) else ""


def _ccxt_credentials(credentials: Mapping[str, str], venue: str) -> dict[str, str]:
    """Credentials under ccxt's attribute names, each value registered for log redaction."""
    out: dict[str, str] = {}
    for key, value in credentials.items():
        register_secret(value)
        attribute = CREDENTIAL_KEYS.get(key)
        if attribute is None:
            raise errors.Stop(f"unknown credential field {key!r} (expected one of "
                              f"{', '.join(sorted(set(CREDENTIAL_KEYS)))})", venue=venue,
                              code="BAD_CREDENTIALS")
        out[attribute] = value
    return out


# --- the broker ---------------------------------------------------------------------------


class CcxtBroker:
    """The Broker contract for one crypto spot account on one ccxt exchange.

    `credentials` use ccxt's names or MMATS's (`api_key`, `secret`, `password` or
    `passphrase`, ...); every value is registered for log redaction. `options` are ccxt
    exchange options, merged over `SPOT_OPTIONS`. `exchange` (a ccxt sync exchange) may be
    given to share an instance; it is configured here like a new one: spot options,
    credentials, sandbox mode. A new exchange keeps ccxt's own rate limiter on.
    """

    def __init__(self, exchange_id: str, credentials: dict[str, str] | None,
                 endpoint: Literal["testnet", "live"], *, exchange: ccxt.Exchange | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.venue = f"ccxt:{exchange_id}"
        self.exchange_id = exchange_id
        self.endpoint: Literal["testnet", "live"] = endpoint
        if endpoint not in ("testnet", "live"):
            raise errors.EnvironmentMismatch(
                f"endpoint {endpoint!r} is not served by ccxt: use 'testnet' or 'live'",
                venue=self.venue)
        self._exchange = exchange if exchange is not None else build_exchange(
            exchange_id, self.venue, {"enableRateLimit": True})
        self._exchange.options = self._exchange.deep_extend(
            self._exchange.options, SPOT_OPTIONS.get(exchange_id, {}), options or {})
        for attribute, value in _ccxt_credentials(credentials or {}, self.venue).items():
            setattr(self._exchange, attribute, value)
        self._http = HttpStatusProbe(self._exchange)
        self._select_endpoint()

    # -- environment --

    @property
    def exchange(self) -> Any:
        """The ccxt exchange behind this broker (for inspection; do not reconfigure it)."""
        return self._exchange

    @property
    def endpoint_url(self) -> str:
        """The API base URL actually targeted, to check it is a live or a test URL. OKX's
        demo trading shares the live host (a header selects it): see `is_sandbox`."""
        return api_base_url(self._exchange)

    @property
    def is_sandbox(self) -> bool:
        return bool(getattr(self._exchange, "isSandboxModeEnabled", False))

    def _select_endpoint(self) -> None:
        """Sandbox mode for testnet (refused where the exchange has none); a live broker
        refuses an exchange already switched to its sandbox."""
        if self.endpoint == "live":
            if self.is_sandbox:
                raise errors.EnvironmentMismatch(
                    f"live endpoint requested but the exchange is in sandbox mode "
                    f"({self.endpoint_url})", venue=self.venue)
            return
        if self.is_sandbox:
            return
        if not self._exchange.urls.get("test"):
            raise errors.EnvironmentMismatch(
                f"{self.exchange_id} has no testnet in ccxt: refusing to trade against "
                f"{self.endpoint_url}", venue=self.venue)
        try:
            self._exchange.set_sandbox_mode(True)
        except ccxt.NotSupported as exc:
            raise errors.EnvironmentMismatch(
                f"{self.exchange_id} has no testnet in ccxt: {exc}", venue=self.venue) from exc

    # -- plumbing --

    def _call(self, action: str, symbol: str | None, fn: Callable[[], T]) -> T:
        """Run one ccxt call, translating its exceptions into MMATS errors."""
        self._http.reset()
        try:
            return fn()
        except ccxt.BaseError as exc:
            raise self._error(exc, action, symbol) from exc

    def _error(self, exc: Exception, action: str, symbol: str | None) -> errors.BrokerError:
        return map_ccxt_error(exc, venue=self.venue, exchange=self._exchange, action=action,
                              symbol=symbol, http_status=self._http.status)

    def _market(self, symbol: str, action: str) -> dict[str, Any]:
        """The ccxt market for an MMATS symbol, loading the markets once."""
        def load() -> dict[str, Any]:
            self._exchange.load_markets()
            return dict(self._exchange.market(symbol))
        return self._call(action, symbol, load)

    def _requires_symbol(self, method: str) -> bool:
        features = (getattr(self._exchange, "features", None) or {}).get("spot") or {}
        return bool((features.get(method) or {}).get("symbolRequired"))

    def _page_limit(self, method: str, default: int) -> int:
        features = (getattr(self._exchange, "features", None) or {}).get("spot") or {}
        return int((features.get(method) or {}).get("limit") or default)

    def _refuse(self, action: str, symbol: str | None, code: str, problem: str) -> errors.Reject:
        where = f"{action} {symbol}" if symbol else action
        return errors.Reject(f"{where}: {problem}", venue=self.venue, code=code)

    def _need_symbol(self, method: str, action: str, symbol: str | None) -> None:
        if symbol is None and self._requires_symbol(method):
            raise self._refuse(action, None, "SYMBOL_REQUIRED",
                               f"{self.exchange_id} answers {method} per market: pass a symbol")

    # -- rules and sizing --

    def instrument_rules(self, symbol: str) -> InstrumentRules:
        """Lot step, minimum quantity, price tick and minimum notional from the ccxt market."""
        market = self._market(symbol, "instrument_rules")
        mode = self._exchange.precisionMode
        step = precision_step(market["precision"].get("amount"), mode)
        tick = precision_step(market["precision"].get("price"), mode)
        limits = market.get("limits") or {}
        min_qty = optional_decimal((limits.get("amount") or {}).get("min"))
        min_cost = optional_decimal((limits.get("cost") or {}).get("min"))
        return InstrumentRules(symbol=symbol, quantity_step=step,
                               min_quantity=min_qty if min_qty else step, price_tick=tick,
                               min_notional=min_cost if min_cost else None)

    def _sized(self, order: OrderRequest) -> tuple[Decimal, Decimal | None, Decimal | None]:
        """(quantity, limit price, stop price) cut to the market's precision, or a Reject
        when the order is malformed or under the venue minimum: nothing has been sent yet."""
        self._check_shape(order)
        symbol = order.symbol
        rules = self.instrument_rules(symbol)
        quantity = self._amount(symbol, order.quantity)
        if quantity <= 0 or quantity < rules.min_quantity:
            raise self._refuse("place_order", symbol, "BELOW_MIN_QUANTITY",
                               f"quantity {order.quantity} (rounded to {quantity}) is under "
                               f"the venue minimum {rules.min_quantity}")
        has_limit = order.order_type in ("limit", "stop_limit")
        has_stop = order.order_type in ("stop", "stop_limit")
        limit = self._limit_price(symbol, order.side, order.limit_price) \
            if has_limit and order.limit_price else None
        stop = self._price(symbol, order.stop_price) if has_stop and order.stop_price else None
        reference = limit if limit is not None else stop
        if rules.min_notional is not None and reference is not None \
                and quantity * reference < rules.min_notional:
            raise self._refuse("place_order", symbol, "BELOW_MIN_NOTIONAL",
                               f"notional {quantity * reference} ({quantity} x {reference}) is "
                               f"under the venue minimum {rules.min_notional}")
        return quantity, limit, stop

    def _check_shape(self, order: OrderRequest) -> None:
        """Refuse an order that no venue could take: a non-positive size, a missing price."""
        problem = None
        if order.quantity <= 0:
            problem = f"quantity {order.quantity} is not positive"
        elif order.order_type in ("limit", "stop_limit") and not order.limit_price:
            problem = f"a {order.order_type} order needs a positive limit price"
        elif order.order_type in ("stop", "stop_limit") and not order.stop_price:
            problem = f"a {order.order_type} order needs a positive stop price"
        if problem:
            raise self._refuse("place_order", order.symbol, "INVALID_ORDER", problem)

    def _amount(self, symbol: str, quantity: Decimal) -> Decimal:
        """`quantity` truncated to the market's amount precision (0 when below one step)."""
        try:
            return to_decimal(self._exchange.amount_to_precision(symbol, str(quantity)))
        except ccxt.InvalidOrder:
            return Decimal(0)  # ccxt refuses amounts that truncate to zero

    def _limit_price(self, symbol: str, side: str, price: Decimal) -> Decimal:
        """A limit price on the market's tick, never worse than the trader's: a buy's
        rounded down, a sell's up (ccxt's price_to_precision rounds to the nearest)."""
        mode = self._exchange.precisionMode
        precision = self._market(symbol, "place_order")["precision"].get("price")
        rounding = ROUND_FLOOR if side == "buy" else ROUND_CEILING
        if mode == ccxt.SIGNIFICANT_DIGITS and precision:
            exponent = price.adjusted() - int(precision) + 1
            price = price.quantize(Decimal(1).scaleb(exponent), rounding=rounding)
        else:
            tick = precision_step(precision, mode)
            if tick > 0:
                price = (price / tick).to_integral_value(rounding=rounding) * tick
        return self._price(symbol, price)  # (on the tick now: the venue's spelling of it)

    def _price(self, symbol: str, price: Decimal) -> Decimal:
        """`price` rounded to the market's tick as the venue rounds it (to the nearest).
        Stop prices are rounded so: a trigger has no side that is always better for the
        trader (a sell stop moved up fires early, moved down it lets the loss run), so no
        side rule is imposed on it; limit prices go through `_limit_price`."""
        return self._call("place_order", symbol,
                          lambda: to_decimal(self._exchange.price_to_precision(symbol,
                                                                               str(price))))

    # -- orders --

    def place_order(self, order: OrderRequest) -> BrokerOrder:
        """Send `order` with MMATS's client id; a duplicate client id returns the order the
        venue already has under that id."""
        if order.side == "buy" and order.order_type in ("market", "stop") \
                and self.exchange_id in NO_BASE_SIZED_MARKET_BUY:
            raise self._refuse("place_order", order.symbol, "UNSUPPORTED_ORDER",
                               f"{self.exchange_id} market buys are sized in quote currency "
                               f"through ccxt: use a limit order")
        quantity, limit, stop = self._sized(order)
        cid = venue_client_id(self.exchange_id, order.client_order_id)
        ccxt_type = "limit" if order.order_type in ("limit", "stop_limit") else "market"
        params = self._order_params(order, cid, stop)
        self._http.reset()
        try:
            created = self._exchange.create_order(
                order.symbol, ccxt_type, order.side, float(quantity),
                float(limit) if limit is not None else None, params)
        except ccxt.BaseError as exc:
            if is_duplicate_client_id(exc):
                return self._existing(order, quantity)
            raise self._error(exc, "place_order", order.symbol) from exc
        placed = self._to_order(created, fallback=order, quantity=quantity)
        return _with_client_id(placed, order.client_order_id)

    def _existing(self, order: OrderRequest, quantity: Decimal) -> BrokerOrder:
        """The order a re-sent request's client id names, if it is the same order (symbol,
        side and the size as sent); another order under that id is refused, never taken
        for it."""
        found = self._by_client_id(order.client_order_id, order.symbol, "place_order")
        if (found.symbol, found.side, found.quantity) != (order.symbol, order.side, quantity):
            raise self._refuse("place_order", order.symbol, "CLIENT_ORDER_ID_CONFLICT",
                               f"client id {order.client_order_id} already names {found.side} "
                               f"{found.quantity} {found.symbol} order {found.broker_order_id}")
        return found

    def _order_params(self, order: OrderRequest, cid: str,
                      stop: Decimal | None) -> dict[str, Any]:
        """Unified ccxt params: client id, a non-default time in force, the trigger price."""
        params: dict[str, Any] = {"clientOrderId": cid}
        if order.order_type in ("limit", "stop_limit") and order.time_in_force != "GTC":
            params["timeInForce"] = order.time_in_force
        if stop is not None:
            params["triggerPrice"] = float(stop)
        if order.side == "buy" and order.order_type in ("market", "stop"):
            params.update(MARKET_BUY_PARAMS.get(self.exchange_id, {}))
        return params

    def cancel_order(self, broker_order_id: str, symbol: str) -> BrokerOrder:
        """Cancel one order; venues that answer with ids only are asked for the order."""
        self._market(symbol, "cancel_order")
        cancelled = self._call("cancel_order", symbol,
                               lambda: self._exchange.cancel_order(broker_order_id, symbol))
        if not cancelled or cancelled.get("status") is None:
            return self.order_status(broker_order_id=broker_order_id, symbol=symbol)
        return self._to_order(cancelled)

    def order_status(self, *, broker_order_id: str | None = None,
                     client_order_id: str | None = None,
                     symbol: str | None = None) -> BrokerOrder:
        """One order, by the venue's id or else by MMATS's client id."""
        if broker_order_id is None and client_order_id is None:
            raise self._refuse("order_status", symbol, "INVALID_REQUEST",
                               "name a broker_order_id or a client_order_id")
        self._need_symbol("fetchOrder", "order_status", symbol)
        if symbol is not None:
            self._market(symbol, "order_status")
        if broker_order_id is None and client_order_id is not None:
            return self._by_client_id(client_order_id, symbol, "order_status")
        if self.exchange_id in FETCH_ORDER_BY_SEARCH:
            return self._to_order(self._search_orders(
                {"orderId": broker_order_id}, "id", str(broker_order_id), symbol,
                "order_status"))
        fetched = self._call("order_status", symbol,
                             lambda: self._exchange.fetch_order(broker_order_id, symbol))
        return self._to_order(fetched)

    def _by_client_id(self, client_order_id: str, symbol: str | None,
                      action: str) -> BrokerOrder:
        """The venue's order under MMATS's client id (OrderNotFound when there is none)."""
        cid = venue_client_id(self.exchange_id, client_order_id)
        if self.exchange_id in FETCH_ORDER_BY_CLIENT_ID:
            found = self._call(action, symbol, lambda: self._exchange.fetch_order(
                None, symbol, {"clientOrderId": cid}))
        else:
            found = self._search_client_id(cid, symbol, action)
        result = self._to_order(found)
        return _with_client_id(result, client_order_id)

    def _search_client_id(self, cid: str, symbol: str | None, action: str) -> dict[str, Any]:
        key = CLIENT_ID_FILTER.get(self.exchange_id)
        return self._search_orders({key: cid} if key else {}, "clientOrderId", cid, symbol,
                                   action)

    def _search_orders(self, query: dict[str, Any], field: str, value: str,
                       symbol: str | None, action: str) -> dict[str, Any]:
        """The order whose ccxt `field` is `value`, from the open orders, then the closed
        and cancelled ones, each list asked with the venue's filter `query`."""
        has = self._exchange.has
        # closed orders: filled ones and cancelled ones (ccxt's fetch_closed_orders lists
        # filled orders only on Bybit and Coinbase; a cancelled one may have fills)
        methods = ["fetch_open_orders"]
        if has.get("fetchCanceledAndClosedOrders") is True:
            methods.append("fetch_canceled_and_closed_orders")
        else:
            methods += [m for m, h in (("fetch_closed_orders", "fetchClosedOrders"),
                                       ("fetch_canceled_orders", "fetchCanceledOrders"))
                        if has.get(h)]
        def lister(method: str) -> Callable[[], list[dict[str, Any]]]:
            return lambda: getattr(self._exchange, method)(symbol, None, None, dict(query))

        for fetch in map(lister, methods):
            for candidate in self._call(action, symbol, fetch):
                if str(candidate.get(field)) == value:
                    return candidate
        where = f"{action} {symbol}" if symbol else action
        what = "client id" if field == "clientOrderId" else field
        raise errors.OrderNotFound(f"{where}: no order with {what} {value}", venue=self.venue)

    def open_orders(self, symbol: str | None = None) -> Sequence[BrokerOrder]:
        if symbol is not None:
            self._market(symbol, "open_orders")
        else:
            self._call("open_orders", None, self._exchange.load_markets)
        found = self._call("open_orders", symbol, lambda: self._exchange.fetch_open_orders(symbol))
        return [self._to_order(o) for o in found]

    # -- fills --

    def fills_since(self, since: datetime, symbol: str | None = None) -> Sequence[BrokerFill]:
        """Every execution at or after `since`, oldest first, each once: window by window
        where the venue limits how far one request may reach, each window paged forward
        (and walked back where the venue answers with its newest trades first)."""
        start = datetime_to_ms(since)
        self._need_symbol("fetchMyTrades", "fills_since", symbol)
        if symbol is not None:
            self._market(symbol, "fills_since")
        else:
            self._call("fills_since", None, self._exchange.load_markets)
        limit = TRADES_PAGE.get(self.exchange_id) or self._page_limit("fetchMyTrades", 100)
        fills: dict[str, BrokerFill] = {}
        window = self._trades_window_ms()
        # (both ends inclusive: a window is at most `window` ms long)
        for lo, hi in self._windows(start, None if window is None else window - 1):
            self._fills_forward(symbol, lo, hi, limit, since, fills)
        return sorted(fills.values(), key=lambda f: (f.ts, f.fill_id))

    def _windows(self, start_ms: int, span_ms: int | None) -> Iterator[tuple[int, int | None]]:
        """[lo, hi] windows of `span_ms` from `start_ms` up to now, one after the other
        (sharing a millisecond: nothing falls between); one open-ended window when the
        venue sets no limit (`span_ms` None)."""
        if span_ms is None:
            yield start_ms, None
            return
        now = int(self._exchange.milliseconds())
        lo = start_ms
        while True:
            hi = lo + span_ms
            yield lo, hi
            if hi >= now:
                return
            lo = hi

    def _trades_window_ms(self) -> int | None:
        features = (getattr(self._exchange, "features", None) or {}).get("spot") or {}
        days = (features.get("fetchMyTrades") or {}).get("untilDays")
        return int(days) * _DAY_MS if days and 0 < days < _WINDOW_DAYS_MAX else None

    def _fills_forward(self, symbol: str | None, start_ms: int, end_ms: int | None,
                       limit: int, since: datetime, fills: dict[str, BrokerFill]) -> None:
        """The trades of [start_ms, end_ms] (no end: up to now), paging forward from the
        newest trade of each full page, dropping those already seen."""
        cursor = start_ms
        until = None if end_ms is None else end_ms + 1
        while True:
            page = [self._to_fill(t)
                    for t in self._trades_page(symbol, cursor, limit, until_ms=until)]
            new = [f for f in page if f.fill_id not in fills]
            fills.update((f.fill_id, f) for f in new if f.ts >= since)
            if not new or len(page) < limit:
                return
            if self.exchange_id not in OLDEST_FIRST:
                # the page may be the window's newest trades: walk back from its oldest one
                self._fills_before(symbol, cursor, min(datetime_to_ms(f.ts) for f in page),
                                   limit, since, fills)
            cursor = max(datetime_to_ms(f.ts) for f in new)

    def _fills_before(self, symbol: str | None, start_ms: int, upper_ms: int, limit: int,
                      since: datetime, fills: dict[str, BrokerFill]) -> None:
        """Pages of a venue that answers with the newest trades of a window: each asks
        for the trades from `start_ms` up to the oldest one seen so far (that millisecond
        included: several trades may share it), until a page is short or brings nothing
        new."""
        while True:
            page = [self._to_fill(t)
                    for t in self._trades_page(symbol, start_ms, limit, until_ms=upper_ms + 1)]
            new = [f for f in page if f.fill_id not in fills]
            fills.update((f.fill_id, f) for f in new if f.ts >= since)
            if not new or len(page) < limit:
                return
            upper_ms = min(datetime_to_ms(f.ts) for f in page)

    def _trades_page(self, symbol: str | None, since_ms: int, limit: int, *,
                     until_ms: int | None = None) -> list[dict[str, Any]]:
        params = {} if until_ms is None else {"until": until_ms}
        return self._call("fills_since", symbol,
                          lambda: self._exchange.fetch_my_trades(symbol, since_ms, limit,
                                                                 params))

    def _to_fill(self, trade: Mapping[str, Any], *, client_order_id: str | None = None,
                 fallback_ms: int | None = None) -> BrokerFill:
        """A ccxt trade as a BrokerFill: its own amount, its fee, `<market id>:<trade id>`."""
        symbol = str(trade["symbol"])
        market_id = ((self._exchange.markets or {}).get(symbol) or {}).get("id") or symbol
        timestamp = trade.get("timestamp") or fallback_ms
        if timestamp is None:  # a malformed answer, like ccxt's BadResponse: ask again
            raise errors.Retry(f"trade {trade.get('id')} on {symbol} came without a time",
                               venue=self.venue, code="BAD_RESPONSE")
        trade_id = trade.get("id") or (f"{trade.get('order')}-{timestamp}-"
                                       f"{trade.get('amount')}-{trade.get('price')}")
        cost, currency = _fee(trade)
        liquidity = trade.get("takerOrMaker")
        return BrokerFill(
            fill_id=f"{market_id}:{trade_id}", broker_order_id=str(trade.get("order") or ""),
            client_order_id=client_order_id, symbol=symbol, side=trade["side"],
            quantity=to_decimal(trade["amount"]), price=to_decimal(trade["price"]),
            commission=cost, commission_currency=currency, ts=ms_to_datetime(timestamp),
            liquidity=liquidity if liquidity in ("maker", "taker") else None)

    # -- account --

    def balances(self) -> Sequence[Balance]:
        """Every currency with a non-zero total or free amount, from fetch_balance."""
        raw = self._call("balances", None, self._exchange.fetch_balance)
        totals, free = raw.get("total") or {}, raw.get("free") or {}
        out = []
        for currency in sorted(totals):
            total = optional_decimal(totals[currency]) or Decimal(0)
            available = optional_decimal(free.get(currency))
            available = total if available is None else available
            if total or available:
                out.append(Balance(currency=currency, total=total, free=available))
        return out

    def cash_movements_since(self, since: datetime) -> Sequence[CashMovement]:
        """Deposits and withdrawals of cash currencies (CASH_CURRENCIES) at or after
        `since`, oldest first, from ccxt's fetch_deposits and fetch_withdrawals: only the
        finished ones (ccxt status 'ok'), `deposit:<venue id>` credited and
        `withdrawal:<venue id>` debited (the two kinds' ids may collide), and a fee
        charged in a cash currency as `<movement id>:fee` (see FEE_IN_AMOUNT). A coin
        deposited or withdrawn is a position, which the reconciler compares as one; spot
        trading fees come with the fills.

        The history is asked window by window where the venue limits how far one request
        reaches (TRANSFERS_WINDOW_MS), each window paged until an answer is short or
        brings nothing new. Venues of TRANSFERS_NOT_READ (and of
        TRANSFERS_NOT_READ_IN_SANDBOX, on their sandbox) are not asked: none is returned.
        A record without an id or a time, or with an amount that is not a number, is a
        malformed answer (Retry, BAD_RESPONSE). ccxt itself drops records without a time
        from an answer to a query with `since`."""
        start = datetime_to_ms(since)
        if self.transfers_not_read() is not None:
            return ()
        found: dict[tuple[TransferKind, str], Mapping[str, Any]] = {}
        kinds: tuple[tuple[TransferKind, str], ...] = (("deposit", "fetchDeposits"),
                                                        ("withdrawal", "fetchWithdrawals"))
        for kind, method in kinds:
            if not self._exchange.has.get(method):
                continue
            for lo, hi in self._windows(start, TRANSFERS_WINDOW_MS.get(self.exchange_id)):
                self._transfers_in(kind, lo, hi, found)
        movements = [m for (kind, _), tx in found.items() for m in self._to_movements(kind, tx)]
        return sorted(movements, key=lambda m: (m.ts, m.movement_id))

    def transfers_not_read(self) -> str | None:
        """Why this account's deposits and withdrawals are not read, or None if they are."""
        if self.exchange_id in TRANSFERS_NOT_READ:
            return TRANSFERS_NOT_READ[self.exchange_id]
        if self.is_sandbox and self.exchange_id in TRANSFERS_NOT_READ_IN_SANDBOX:
            return TRANSFERS_NOT_READ_IN_SANDBOX[self.exchange_id]
        return None

    def _transfers_in(self, kind: TransferKind, start_ms: int, end_ms: int | None,
                      found: dict[tuple[TransferKind, str], Mapping[str, Any]]) -> None:
        """The deposits or withdrawals of [start_ms, end_ms] (no end: up to now) into
        `found` by (kind, venue id): one answer, and more while an answer is full and
        brings records not seen yet (by offset, or walking back from its oldest record)."""
        size = TRANSFERS_PAGE.get(self.exchange_id, 100)
        limit = None if self.exchange_id in TRANSFERS_LIMIT_NOT_SENT else size
        params = dict(TRANSFER_PARAMS.get((self.exchange_id, kind), {}))
        until, offset = end_ms, 0
        while True:
            page = self._transfers_page(kind, start_ms, limit, params, until, offset)
            oldest, new = None, 0
            for tx in page:
                key = (kind, _transfer_id(tx, kind, self.venue))
                ms = _transfer_ms(tx, kind, key[1], self.venue)
                oldest = ms if oldest is None else min(oldest, ms)
                if key not in found:
                    found[key] = tx
                    new += 1
            if not new or len(page) < size or oldest is None:
                return
            if self.exchange_id in TRANSFERS_BY_OFFSET:
                offset += len(page)
            else:
                until = oldest + 1  # (several records may share that millisecond)

    def _transfers_page(self, kind: TransferKind, since_ms: int, limit: int | None,
                        params: Mapping[str, Any], until_ms: int | None,
                        offset: int) -> list[dict[str, Any]]:
        query = dict(params)
        if until_ms is not None:
            query["until"] = until_ms
        if offset:
            query["offset"] = offset
        fetch = (self._exchange.fetch_deposits if kind == "deposit"
                 else self._exchange.fetch_withdrawals)
        return list(self._call("cash_movements_since", None,
                               lambda: fetch(None, since_ms, limit, query)))

    def _to_movements(self, kind: TransferKind, tx: Mapping[str, Any]) -> list[CashMovement]:
        """The cash movements of one ccxt transaction: its amount, signed by its kind, and
        its fee, where each is in a cash currency, not zero, and the transaction is
        finished (`id` and `timestamp` are checked already)."""
        if tx.get("status") != "ok":
            return []
        tx_id = str(tx["id"])
        movement_id = f"{kind}:{tx_id}"
        ts = ms_to_datetime(tx["timestamp"])
        currency = tx.get("currency")
        out: list[CashMovement] = []
        if currency in CASH_CURRENCIES:
            amount = abs(_transfer_amount(tx, kind, tx_id, self.venue))
            if amount:
                out.append(CashMovement(
                    movement_id=movement_id, kind=kind,
                    amount=amount if kind == "deposit" else -amount, currency=str(currency),
                    ts=ts, description=_transfer_description(kind, tx)))
        fee = tx.get("fee") or {}
        cost = _finite_or_none(fee.get("cost"))
        fee_currency = fee.get("currency") or currency
        if cost and fee_currency in CASH_CURRENCIES \
                and (self.exchange_id, kind) not in FEE_IN_AMOUNT:
            out.append(CashMovement(
                movement_id=f"{movement_id}:fee", kind="fee", amount=-abs(cost),
                currency=str(fee_currency), ts=ts,
                description=f"fee of {kind} {tx_id}"[:_DESCRIPTION_LENGTH]))
        return out

    def positions(self) -> Sequence[BrokerPosition]:
        """Spot holdings as long positions: each non-cash currency with a non-zero balance,
        against the first quote of QUOTE_PREFERENCE the venue lists (module docstring)."""
        held = [b for b in self.balances() if b.currency not in CASH_CURRENCIES and b.total]
        if held:
            self._call("positions", None, self._exchange.load_markets)
        return [BrokerPosition(symbol=self._position_symbol(b.currency), quantity=b.total,
                               average_price=None) for b in held]

    def _position_symbol(self, currency: str) -> str:
        markets = self._exchange.markets or {}
        return next((f"{currency}/{q}" for q in QUOTE_PREFERENCE if f"{currency}/{q}" in markets),
                    f"{currency}/{QUOTE_PREFERENCE[0]}")

    # -- mapping --

    def _to_order(self, raw: Mapping[str, Any], *, fallback: OrderRequest | None = None,
                  quantity: Decimal | None = None) -> BrokerOrder:
        """A ccxt order as a BrokerOrder; what a terse venue answer leaves out is taken from
        the request that was sent (`fallback`)."""
        amount = optional_decimal(raw.get("amount"))
        filled = optional_decimal(raw.get("filled")) or Decimal(0)
        average = optional_decimal(raw.get("average"))
        if average is None and filled:
            cost = optional_decimal(raw.get("cost"))
            average = cost / filled if cost else None
        status = broker_status(raw.get("status"), filled)
        reason = _reason(raw) if status in ("rejected", "expired") else None
        if status == "filled" and amount is not None and filled < amount:
            # closed with a remainder that will never fill: ccxt calls Bybit's
            # PartiallyFilledCanceled (a market order out of liquidity) 'closed'
            status = "cancelled"
            reason = _reason(raw) or f"closed with {filled} of {amount} filled"
        client_id = raw.get("clientOrderId") or (fallback.client_order_id if fallback else None)
        fills = tuple(self._to_fill(t, client_order_id=client_id,
                                    fallback_ms=raw.get("timestamp"))
                      for t in raw.get("trades") or () if t.get("amount"))
        info = raw.get("info")
        return BrokerOrder(
            broker_order_id=str(raw.get("id")),
            client_order_id=client_id,
            symbol=str(raw.get("symbol") or (fallback.symbol if fallback else "")),
            side=raw.get("side") or (fallback.side if fallback else "buy"),
            quantity=amount if amount is not None else (quantity or Decimal(0)),
            filled_quantity=filled, average_price=average, status=status,
            reason=reason, fills=fills, raw=dict(info) if isinstance(info, dict) else {})


def precision_step(precision: Any, mode: int) -> Decimal:
    """A ccxt market precision as a step: itself in TICK_SIZE mode, 10^-n in DECIMAL_PLACES
    mode, 0 ("no fixed step") in SIGNIFICANT_DIGITS mode or when the venue gives none."""
    if precision is None:
        return Decimal(0)
    if mode == ccxt.TICK_SIZE:
        return to_decimal(precision)
    if mode == ccxt.DECIMAL_PLACES:
        return Decimal(1).scaleb(-int(precision))
    return Decimal(0)


def broker_status(status: str | None, filled: Decimal) -> BrokerStatus:
    """ccxt's order status (open, closed, canceled, expired, rejected) in MMATS's terms."""
    if status == "closed":
        return "filled"
    if status in ("canceled", "cancelled"):
        return "cancelled"
    if status == "expired":
        return "expired"
    if status == "rejected":
        return "rejected"
    return "partially_filled" if filled > 0 else "submitted"


def _fee(trade: Mapping[str, Any]) -> tuple[Decimal, str | None]:
    """A trade's commission and its currency (the first fee's currency when there are several)."""
    fees = [trade["fee"]] if trade.get("fee") else list(trade.get("fees") or [])
    fees = [f for f in fees if f and f.get("cost") is not None]
    if not fees:
        return Decimal(0), None
    currency = fees[0].get("currency")
    total = sum((to_decimal(f["cost"]) for f in fees if f.get("currency") == currency),
                Decimal(0))
    return total, currency


def _transfer_id(tx: Mapping[str, Any], kind: str, venue: str) -> str:
    """A ccxt transaction's venue id, or Retry (BAD_RESPONSE) for one without."""
    tx_id = tx.get("id")
    if tx_id is None or not str(tx_id).strip():
        raise _bad_transfer(venue, f"a {kind} of {tx.get('currency')} dated "
                                   f"{tx.get('datetime')} has no id")
    return str(tx_id).strip()


def _transfer_ms(tx: Mapping[str, Any], kind: str, tx_id: str, venue: str) -> int:
    """A ccxt transaction's time (ms), or Retry (BAD_RESPONSE) for one without."""
    timestamp = tx.get("timestamp")
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
        raise _bad_transfer(venue, f"{kind} {tx_id} ({tx.get('currency')}) has no time "
                                   f"(timestamp {timestamp!r})")
    return int(timestamp)


def _transfer_amount(tx: Mapping[str, Any], kind: str, tx_id: str, venue: str) -> Decimal:
    """A ccxt transaction's amount as a finite Decimal, or Retry (BAD_RESPONSE) naming the
    venue's own value (ccxt turns one that is not a number into None)."""
    amount = _finite_or_none(tx.get("amount"))
    if amount is None:
        info = tx.get("info")
        raw = tx.get("amount")
        if isinstance(info, Mapping):
            raw = next((info[k] for k in ("amount", "amt", "vol") if k in info), raw)
        shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:37] + "..."
        raise _bad_transfer(venue, f"{kind} {tx_id} ({tx.get('currency')}): amount {shown} "
                                   "is not a number")
    return amount


def _finite_or_none(value: Any) -> Decimal | None:
    """`value` as a finite Decimal; None when missing, not a number, infinite or NaN."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        number = to_decimal(value)
    except ValueError:
        return None
    return number if number.is_finite() else None


def _bad_transfer(venue: str, problem: str) -> errors.Retry:
    """A malformed deposit or withdrawal record, like ccxt's BadResponse: ask again."""
    text = " ".join(f"cash_movements_since: {problem}".split())
    return errors.Retry(text, venue=venue, code="BAD_RESPONSE")


def _transfer_description(kind: str, tx: Mapping[str, Any]) -> str:
    """`deposit on TRC20, tx 0b03...`: the network and on-chain id, where ccxt gives them."""
    text = kind
    if tx.get("network"):
        text += f" on {tx['network']}"
    if tx.get("internal"):
        text += " (internal transfer)"
    if tx.get("txid") and tx.get("txid") != tx.get("id"):
        text += f", tx {tx['txid']}"
    return " ".join(text.split())[:_DESCRIPTION_LENGTH]


def _reason(raw: Mapping[str, Any]) -> str | None:
    info = raw.get("info")
    if not isinstance(info, dict):
        return None
    for key in ("rejectReason", "reason", "cancelReason", "failure_reason", "sMsg"):
        if info.get(key):
            return str(info[key])
    return None


def _with_client_id(order: BrokerOrder, client_order_id: str) -> BrokerOrder:
    """`order` and its fills labelled with MMATS's client id (the venue may hold a digest)."""
    fills = tuple(replace(f, client_order_id=client_order_id) for f in order.fills)
    return replace(order, client_order_id=client_order_id, fills=fills)
