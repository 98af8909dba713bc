"""The simulated broker: how an order fills on a bar (backtests; the paper broker later).

Rules (the README's "Simulated broker" section quotes them):

- A market order created at the close of bar t fills at bar t+1's open.
- A protective order (stop-loss, take-profit, trailing stop, breakeven) that the database
  fired inside a bar fills at its trigger price, which the database already moved to the
  open when the bar gapped through the level.
- A limit order fills when the bar touches its price: at the limit, or at the open when
  the bar opens through it (a better price). A stop order fills when the bar touches the
  stop: at the stop, or at the open when the bar gaps through it (a worse price).
  A stop-limit becomes a limit at its limit price once the stop is touched: within the
  limit there, it trades at once at that price (taker); beyond it, it rests (maker).
- Costs: the spread (a fraction of the price; half of it on each side: the bar's prices
  are mid prices), then slippage against the trader (fixed basis points, a fraction of
  the ATR, or volume impact: coefficient x order quantity / bar volume, capped at 10 %);
  the price is then rounded
  to the instrument's tick against the trader. Commission is a fraction of the notional:
  maker for a resting limit's fills, taker for everything else. A limit order trades
  at the quote, a buy at the ask (the bar's prices plus half the spread), a sell at the
  bid: it fills when that quote reaches its limit, at the limit or better, never beyond
  it, and takes no slippage.
- Cash: a buy that opens or adds exposure never needs more cash than exists; if the fill
  price left too little, the affordable part (rounded down to the quantity step) fills
  and the rest is cancelled. Orders that close or reduce a position always fill in full,
  and so does the closing part of a reversal (`SimOrder.closing`): only what opens the
  other side is limited by the cash left after it.

Everything is exact (Decimal); floats enter only as the ATR (a model of volatility).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Literal

Side = Literal["buy", "sell"]
OrderType = Literal["market", "limit", "stop", "stop_limit"]

_ZERO = Decimal(0)
_BPS = Decimal("0.0001")
_MAX_IMPACT = Decimal("0.1")


# the largest slippage each model takes: beyond these a backtest only measures its costs
_SLIPPAGE_LIMITS = {
    "bps": (Decimal(1000), "1000 basis points, 10 % of the price"),
    "atr": (Decimal(10), "10 times the ATR"),
    "volume": (Decimal(100), "a coefficient of 100; the impact is capped at 10 % anyway"),
}


class SimulatorError(ValueError):
    """A cost model or order the simulator cannot take; the message is one line. A
    refused cost names its `field` (taker_fee, maker_fee, spread) and says the rest in
    `detail`, so a caller can name the option the user gave instead."""

    def __init__(self, message: str, field: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SimBar:
    ts_us: int  # open time, UTC epoch microseconds
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    atr: float | None = None  # the ATR known at the previous close (no look-ahead)


@dataclass(frozen=True, slots=True)
class SimOrder:
    order_id: int
    side: Side
    order_type: OrderType
    quantity: Decimal
    reduce_only: bool = False
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    trigger_price: Decimal | None = None  # a protective order fired inside a bar
    # the part that closes a position (a buy reversing a short first buys it back): it
    # always fills; only the rest, which opens exposure, needs the cash
    closing: Decimal = _ZERO


@dataclass(frozen=True, slots=True)
class InstrumentRules:
    price_tick: Decimal
    quantity_step: Decimal
    min_quantity: Decimal = _ZERO


@dataclass(frozen=True, slots=True)
class Slippage:
    """`none`, `bps:N` (basis points), `atr:F` (fraction of the ATR), `volume:K`."""

    kind: Literal["none", "bps", "atr", "volume"] = "none"
    value: Decimal = _ZERO

    @classmethod
    def parse(cls, text: str | None) -> Slippage:
        if text is None or text.strip() in ("", "none", "0"):
            return cls()
        kind, sep, raw = text.strip().partition(":")
        if not sep or kind not in ("bps", "atr", "volume"):
            raise SimulatorError(
                f"slippage {text!r}: expected none, bps:N, atr:F or volume:K (e.g. bps:5)")
        shown = repr(text if len(text) <= 40 else text[:40] + "...")
        try:
            value = Decimal(raw) if len(raw) <= 64 else Decimal("x")
        except ArithmeticError:
            raise SimulatorError(f"slippage {shown}: {raw[:40]!r} is not a number") from None
        if not value.is_finite() or value < 0:
            raise SimulatorError(f"slippage {shown}: the value must be a number >= 0")
        limit, unit = _SLIPPAGE_LIMITS[kind]
        if value > limit:
            raise SimulatorError(f"slippage {shown}: at most {kind}:{limit} ({unit})")
        return cls(kind, value)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.value}"

    def amount(self, price: Decimal, quantity: Decimal, bar: SimBar) -> Decimal:
        """The price move against the trader, before rounding."""
        if self.kind == "bps":
            return price * self.value * _BPS
        if self.kind == "atr":
            if bar.atr is None or not math.isfinite(bar.atr):
                return _ZERO  # no volatility estimate yet (the first bars)
            return Decimal(repr(bar.atr)) * self.value
        if self.kind == "volume":
            if bar.volume <= 0:
                return price * _MAX_IMPACT
            return price * min(self.value * quantity / bar.volume, _MAX_IMPACT)
        return _ZERO


@dataclass(frozen=True, slots=True)
class Costs:
    taker_fee: Decimal = _ZERO
    maker_fee: Decimal = _ZERO
    slippage: Slippage = field(default_factory=Slippage)
    spread: Decimal = _ZERO  # a fraction of the price, the whole bid-ask width

    def __post_init__(self) -> None:
        for name in ("taker_fee", "maker_fee", "spread"):
            value = getattr(self, name)
            detail = ""
            if not value.is_finite() or not value < Decimal("0.1"):
                detail = f"must be a fraction below 0.1, got {value}"
            elif value < 0:  # the ledger books no negative commission: a rebate would be lost
                detail = (f"must not be negative, got {value}"
                          + (" (maker rebates are not modelled)" if name == "maker_fee" else ""))
            if detail:
                raise SimulatorError(f"{name} {detail}", field=name, detail=detail)


@dataclass(frozen=True, slots=True)
class SimFill:
    order_id: int
    quantity: Decimal
    price: Decimal
    commission: Decimal
    liquidity: Literal["maker", "taker"]
    ts_us: int
    unfilled: Decimal = _ZERO  # cancelled for lack of cash
    reason: str = ""


def touched_price(order: SimOrder, bar: SimBar) -> tuple[Decimal, bool] | None:
    """The raw price at which `order` trades on `bar` and whether it is a maker fill;
    None when the bar does not reach it."""
    if order.trigger_price is not None:
        return order.trigger_price, False
    if order.order_type == "market":
        return bar.open, False
    if order.order_type == "limit":
        assert order.limit_price is not None
        return _limit_fill(order.side, order.limit_price, bar)
    assert order.stop_price is not None
    stop = order.stop_price
    if order.side == "buy":
        if bar.high < stop:
            return None
        triggered_at = max(bar.open, stop)
    else:
        if bar.low > stop:
            return None
        triggered_at = min(bar.open, stop)
    if order.order_type == "stop":
        return triggered_at, False
    assert order.limit_price is not None
    # a stop-limit becomes a limit once triggered, judged on the same bar from the trigger:
    # marketable there, it trades at once at the trigger (taker); beyond its limit, it rests
    # and fills at the limit (maker) if the bar comes back to it
    lim = order.limit_price
    if order.side == "buy":
        if triggered_at <= lim:
            return triggered_at, False
        return (lim, True) if bar.low <= lim else None
    if triggered_at >= lim:
        return triggered_at, False
    return (lim, True) if bar.high >= lim else None


def _quote_bar(bar: SimBar, side: Side, spread: Decimal) -> SimBar:
    """The prices `side` trades at on `bar`: the ask (a buy), the bid (a sell)."""
    k = 1 + spread / 2 if side == "buy" else 1 - spread / 2
    return replace(bar, open=bar.open * k, high=bar.high * k, low=bar.low * k,
                   close=bar.close * k)


def _limit_fill(side: Side, limit: Decimal, bar: SimBar) -> tuple[Decimal, bool] | None:
    if side == "buy":
        if bar.low > limit:
            return None
        return min(bar.open, limit), True
    if bar.high < limit:
        return None
    return max(bar.open, limit), True


def _round_to_tick(price: Decimal, tick: Decimal, side: Side) -> Decimal:
    """Round against the trader: buys up, sells down (never below one tick)."""
    steps = (price / tick).to_integral_value(ROUND_CEILING if side == "buy" else ROUND_FLOOR)
    return max(steps, Decimal(1)) * tick


def round_down(quantity: Decimal, step: Decimal) -> Decimal:
    if quantity <= 0:
        return _ZERO
    return (quantity / step).to_integral_value(ROUND_FLOOR) * step


class Simulator:
    def __init__(self, costs: Costs) -> None:
        self.costs = costs

    def fill_price(self, order: SimOrder, raw: Decimal, maker: bool, bar: SimBar,
                   rules: InstrumentRules) -> Decimal:
        """The raw price with spread and slippage against the trader, on the tick."""
        direction = 1 if order.side == "buy" else -1
        cost = raw * self.costs.spread / 2
        if not maker:  # a resting limit order takes no slippage
            cost += self.costs.slippage.amount(raw, order.quantity, bar)
        return _round_to_tick(raw + direction * cost, rules.price_tick, order.side)

    def match(self, order: SimOrder, bar: SimBar, rules: InstrumentRules, *,
              cash: Decimal, fx: Decimal = Decimal(1)) -> SimFill | None:
        """The fill of `order` on `bar`, or None when the bar does not reach its price.

        `cash` is the account's cash before the fill (in the account currency); `fx`
        converts the instrument's quote currency into it."""
        # a limit order trades against the quote: a buy's ask (half the spread above the
        # bar's prices), a sell's bid; it fills when that quote reaches the limit, never
        # beyond it (a buy limit at 97 on a bar whose low is 97 is not reached when the ask
        # is 97.10)
        quoted = order.order_type == "limit" and order.trigger_price is None \
            and bool(self.costs.spread)
        touched = touched_price(
            order, _quote_bar(bar, order.side, self.costs.spread) if quoted else bar)
        if touched is None:
            return None
        raw, maker = touched
        if quoted:
            assert order.limit_price is not None  # (the tick never takes it past the limit)
            price = _round_to_tick(raw, rules.price_tick, order.side)
            price = (min(price, order.limit_price) if order.side == "buy"
                     else max(price, order.limit_price))
        else:
            price = self.fill_price(order, raw, maker, bar, rules)
        fee = self.costs.maker_fee if maker else self.costs.taker_fee
        quantity = order.quantity
        unfilled = _ZERO
        reason = ""
        if order.side == "buy" and not order.reduce_only:
            unit = price * fx * (1 + max(fee, _ZERO))
            closing = min(max(order.closing, _ZERO), quantity)
            # what the cash left after buying back the closing part affords
            opening = round_down(max(cash - closing * unit, _ZERO) / unit, rules.quantity_step)
            if closing + opening < quantity:
                enough = opening >= max(rules.min_quantity, rules.quantity_step)
                quantity = closing + (opening if enough else _ZERO)
                unfilled = order.quantity - quantity
                reason = (f"INSUFFICIENT_CASH: cash={cash}, price={price}, "
                          f"ordered={order.quantity}, affordable={quantity}")
        commission = (quantity * price * fee).quantize(Decimal("1e-12")) if fee > 0 else _ZERO
        return SimFill(order.order_id, quantity, price, commission,
                       "maker" if maker else "taker", bar.ts_us, unfilled, reason)
