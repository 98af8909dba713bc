"""The broker adapter contract every venue implements (paper, ccxt, Alpaca, OANDA).

Quantities and prices are `Decimal`, times are aware UTC `datetime`s, symbols are MMATS
symbols (`BTC/USDT`, `AAPL`, `EUR/USD`); an adapter converts to and from its venue's
spelling. Every order carries MMATS's `client_order_id`, so a request sent twice (a
re-delivered queue message) finds the first order instead of placing a second one.

Adapters raise only the classes of `workers.brokers.errors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal
from typing import Any, Literal, Protocol, runtime_checkable

Side = Literal["buy", "sell"]
OrderType = Literal["market", "limit", "stop", "stop_limit"]
# the venue's view of an order, mapped onto MMATS's order statuses
BrokerStatus = Literal["submitted", "partially_filled", "filled", "cancelled", "rejected",
                       "expired"]
Endpoint = Literal["paper", "testnet", "live"]
# what moved an account's cash outside any fill (trading.cash_kind)
CashKind = Literal["fee", "financing", "dividend", "interest", "deposit", "withdrawal",
                   "adjustment"]


@dataclass(frozen=True)
class OrderRequest:
    client_order_id: str
    symbol: str
    side: Side
    quantity: Decimal
    order_type: OrderType = "market"
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    time_in_force: str = "GTC"
    reduce_only: bool = False


@dataclass(frozen=True)
class BrokerFill:
    """One execution. `fill_id` is unique per venue account and stable across queries:
    the ledger's idempotence rests on it. `quantity` is this execution's own quantity,
    never a cumulative total."""

    fill_id: str
    broker_order_id: str
    client_order_id: str | None
    symbol: str
    side: Side
    quantity: Decimal
    price: Decimal
    commission: Decimal
    commission_currency: str | None
    ts: datetime
    liquidity: Literal["maker", "taker"] | None = None


@dataclass(frozen=True)
class BrokerOrder:
    broker_order_id: str
    client_order_id: str | None
    symbol: str
    side: Side
    quantity: Decimal
    filled_quantity: Decimal
    average_price: Decimal | None
    status: BrokerStatus
    reason: str | None = None
    fills: tuple[BrokerFill, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class BrokerPosition:
    symbol: str
    quantity: Decimal  # signed: negative is short
    average_price: Decimal | None


@dataclass(frozen=True)
class Balance:
    currency: str
    total: Decimal
    free: Decimal


@dataclass(frozen=True)
class CashMovement:
    """Cash the venue credited (amount > 0) or debited (amount < 0) outside any fill: a
    regulatory fee, overnight financing, a dividend, interest, a deposit or withdrawal.
    `movement_id` is unique per venue account and stable across queries: the ledger books
    each once (trading.book_cash is idempotent on it). `symbol` names the instrument the
    movement is about, where the venue says (a dividend's stock, a position's financing)."""

    movement_id: str
    kind: CashKind
    amount: Decimal
    currency: str
    ts: datetime
    symbol: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class InstrumentRules:
    symbol: str
    quantity_step: Decimal
    min_quantity: Decimal
    price_tick: Decimal
    min_notional: Decimal | None = None


@runtime_checkable
class Broker(Protocol):
    """What the router, the reconciler and `mmats` need from a venue."""

    venue: str
    endpoint: Endpoint

    def place_order(self, order: OrderRequest) -> BrokerOrder: ...

    def cancel_order(self, broker_order_id: str, symbol: str) -> BrokerOrder: ...

    def order_status(self, *, broker_order_id: str | None = None,
                     client_order_id: str | None = None,
                     symbol: str | None = None) -> BrokerOrder: ...

    def open_orders(self, symbol: str | None = None) -> Sequence[BrokerOrder]: ...

    def fills_since(self, since: datetime, symbol: str | None = None) -> Sequence[BrokerFill]:
        """Executions at or after `since`, oldest first, of `symbol` or of every market. A
        venue that lists them per market only refuses `symbol=None` with Reject code
        SYMBOL_REQUIRED before any request (the reconciler then asks market by market)."""
        ...

    def positions(self) -> Sequence[BrokerPosition]: ...

    def balances(self) -> Sequence[Balance]: ...

    def cash_movements_since(self, since: datetime) -> Sequence[CashMovement]:
        """Cash movements outside fills booked at or after `since`, oldest first (a venue
        that dates a movement by its day and books it later may return one dated
        earlier: the ledger books each movement_id once)."""
        ...

    def instrument_rules(self, symbol: str) -> InstrumentRules: ...


def round_to_step(quantity: Decimal, step: Decimal) -> Decimal:
    """`quantity` rounded down to a multiple of `step` (a venue's lot size)."""
    if step <= 0:
        return quantity
    return (quantity // step) * step


def price_on_tick(price: Decimal, tick: Decimal, side: str, kind: str) -> Decimal:
    """`price` on a multiple of the venue's `tick`, which refuses any other (Alpaca: "sub-penny
    increment does not fulfill minimum pricing criteria", OANDA: PRICE_PRECISION_EXCEEDED).
    A limit price is never made worse for the trader: a buy's rounded down, a sell's up. A
    stop price goes to the nearest tick: a trigger has no side that is always better (a sell
    stop moved up fires early, moved down lets the loss run). The ccxt adapter applies the
    same rules with the exchange's precision."""
    if tick <= 0 or price % tick == 0:
        return price  # (as the trader wrote it: 180.5 stays 180.5)
    if kind == "limit":
        rounding = ROUND_FLOOR if side == "buy" else ROUND_CEILING
    else:
        rounding = ROUND_HALF_UP
    return ((price / tick).to_integral_value(rounding=rounding) * tick).quantize(tick)
