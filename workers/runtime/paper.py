"""The paper broker: the backtest simulator's fill rules applied to live bars.

Its order book is the ledger itself (a paper account's orders in status `submitted` or
`partially_filled`), so it survives any restart. It fills exactly as a backtest does:

- an order from a signal on bar t fills on the first bar that opens after the signal
  (bar t+1's open for a market order; limit and stop orders when touched, at their price
  or at the open when the bar gaps through), plus the configured latency;
- a protective order (stop-loss, take-profit, trailing stop, breakeven) fills on the bar
  that triggered it, at the level or at the open when the bar gapped through it;
- any other order (a manual or breaker close) fills at the next bar's open;
- buying cash limits the opening part of an order (the rest is cancelled with the reason);
- commission, spread and slippage are the account's `paper` settings;
- time in force (`trading.time_in_force`: GTC, IOC, FOK, GTD; there is no DAY, the schema
  refuses it): an IOC or FOK order is judged on its first eligible bar only (the first bar
  that may fill it under the rules above: bar t+1 for an order from bar t, whatever its
  type; a stop that bar does not touch is not marketable either). IOC fills what that bar
  allows and the rest is cancelled; FOK fills its whole quantity there or is cancelled.
  A GTD order may fill on any bar that opens before its `expire_at` (a bar straddling the
  expiry may fill it: the bar does not say when inside it a price traded); the first bar
  that opens at or after `expire_at` expires it instead of matching it
  (`trading.expire_order`, called by `settle` itself: the router books fills and
  cancels). The rule is `tif_outcome` and `expires_on`, which take only the simulator's
  types (a backtest can apply them as they are).

Fill ids are deterministic (`paper-<order>-<bar time>`), so settling a bar twice (after a
crash) applies nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import psycopg
import talib

from workers.backtest.data import from_us, to_us
from workers.backtest.simulator import (
    Costs,
    InstrumentRules,
    SimBar,
    SimFill,
    SimOrder,
    Simulator,
    Slippage,
)
from workers.runtime.config import PaperCosts

PROTECTIVE = frozenset({"stop_loss", "take_profit", "trailing_stop", "breakeven"})
_ZERO = Decimal(0)
_REDUCE_CAP = Decimal("Infinity")  # (an order that may open: no cap)

_OPEN_ORDERS = """
SELECT o.order_id, o.client_order_id, o.side::text, o.order_type::text, o.quantity,
       o.filled_quantity, o.limit_price, o.stop_price, o.reduce_only, o.trigger::text,
       o.trigger_price, s.ts AS signal_ts, o.created_at, o.position_leg::text, o.triggered_at,
       o.time_in_force::text, o.expire_at
FROM trading.orders o LEFT JOIN trading.signals s ON s.signal_id = o.signal_id
WHERE o.account_id = %(account)s AND o.instrument_id = %(instrument)s
  AND o.status IN ('submitted', 'partially_filled')
ORDER BY o.order_id
"""

_BARS_AFTER = """
SELECT ts, open, high, low, close, volume FROM market.bars
WHERE instrument_id = %(instrument)s AND timeframe = %(tf)s AND ts > %(after)s
  AND ts <= %(until)s
ORDER BY ts
"""

# whether a bar before `before` and after the order became fillable reached its stop: a
# stop-limit triggered there and, not filled, rests as a limit from then on
_STOP_REACHED = """
SELECT EXISTS (SELECT 1 FROM market.bars
               WHERE instrument_id = %(instrument)s AND timeframe = %(tf)s
                 AND ts > %(after)s AND ts < %(before)s
                 AND CASE WHEN %(side)s = 'buy' THEN high >= %(stop)s ELSE low <= %(stop)s END)
"""

_FIRST_BAR_AFTER = """
SELECT ts, open, high, low, close, volume FROM market.bars
WHERE instrument_id = %(instrument)s AND timeframe = %(tf)s AND ts > %(after)s
ORDER BY ts LIMIT 1
"""

_LATEST_BAR = """
SELECT ts, open, high, low, close, volume FROM market.bars
WHERE instrument_id = %(instrument)s AND timeframe = %(tf)s AND ts <= %(at)s
ORDER BY ts DESC LIMIT 1
"""

# the account's cash, what it holds of the instrument, and the instrument's quote currency
# with its rate to the account's (NULL when no bar gives one: the ledger then refuses the
# fill, naming the pair)
_BOOK = """
SELECT a.cash,
       (SELECT COALESCE(sum(CASE WHEN leg = 'short' THEN -quantity ELSE quantity END), 0)
        FROM trading.positions
        WHERE account_id = %(account)s AND instrument_id = %(instrument)s),
       i.quote_currency,
       CASE WHEN i.quote_currency = a.base_currency THEN 1
            ELSE trading.fx_rate(i.quote_currency, a.base_currency, %(at)s) END
FROM trading.accounts a, market.instruments i
WHERE a.account_id = %(account)s AND i.instrument_id = %(instrument)s
"""


# trading.time_in_force (the schema has no DAY: place_manual_order refuses it)
TIMES_IN_FORCE = frozenset({"GTC", "IOC", "FOK", "GTD"})
IMMEDIATE = frozenset({"IOC", "FOK"})  # judged on their first eligible bar only


def expires_on(expire_at_us: int | None, bar: SimBar) -> bool:
    """Whether a GTD order (its `expire_at` in epoch microseconds; None for the other
    times in force) expires on `bar` instead of being matched: the first bar that opens at
    or after `expire_at` cannot fill it. (A bar opening before it may, even one that closes
    after it: a bar does not say when inside it a price traded.)"""
    return expire_at_us is not None and bar.ts_us >= expire_at_us


def tif_outcome(tif: str, wanted: Decimal, fill: SimFill | None,
                bar: SimBar) -> tuple[SimFill | None, str | None]:
    """What time in force makes of an order's match on a bar: the fill to book (None:
    nothing) and why the rest is cancelled (None: it goes on resting, or the fill's own
    reason stands). `wanted` is the quantity the order still asks for; `fill` is what the
    simulator gives on `bar` (None: the bar does not reach its price). For IOC and FOK
    `bar` must be the order's first eligible bar: they are never judged on another."""
    if tif not in TIMES_IN_FORCE:
        raise ValueError(f"time in force {tif!r}: expected GTC, IOC, FOK or GTD")
    if tif not in IMMEDIATE:
        return fill, None
    when = from_us(bar.ts_us).isoformat()
    if fill is None or fill.quantity <= 0:
        cause = "not marketable" if fill is None else (fill.reason or "nothing fillable")
        return None, (f"{tif}_NOT_FILLED: {cause} on its first bar ({when}); "
                      f"{wanted} cancelled")
    if tif == "FOK" and fill.quantity < wanted:
        return None, (f"FOK_NOT_FILLED: its first bar ({when}) fills {fill.quantity} of "
                      f"{wanted} ({fill.reason or 'limited'}); all of it cancelled")
    # (an IOC filled in part: what kept the rest from filling, the cash or a reduce-only
    # cap, is why the rest is cancelled, as for any order)
    return fill, None


@dataclass(frozen=True)
class PaperInstrument:
    instrument_id: int
    symbol: str
    timeframe: str  # the bars the paper broker fills on
    rules: InstrumentRules
    tf_us: int


def costs_of(paper: PaperCosts) -> Costs:
    maker = paper.commission if paper.maker_fee is None else paper.maker_fee
    return Costs(taker_fee=paper.commission, maker_fee=maker,
                 slippage=Slippage.parse(paper.slippage), spread=paper.spread)


def sim_bar(row: tuple[Any, ...], atr: float | None = None) -> SimBar:
    ts, o, h, low, c, v = row
    return SimBar(to_us(ts), Decimal(o), Decimal(h), Decimal(low), Decimal(c), Decimal(v), atr)


@dataclass
class PaperFill:
    """What one order does on one bar: a fill (None when nothing could be bought), and
    the reason the rest is cancelled (None when nothing is)."""

    order_id: int
    client_order_id: str
    fill: SimFill | None
    opens: bool  # the fill opened or added to a position (protection is judged on its bar)
    cancel: str | None = None
    commission_currency: str | None = None  # the instrument's quote currency
    # a GTD order expired on this bar (already done by `settle`: nothing left to apply)
    expired: bool = False


    def payload(self) -> dict[str, Any]:
        f = self.fill
        assert f is not None
        return {"client_order_id": self.client_order_id,
                "broker_fill_id": f"paper-{self.order_id}-{f.ts_us}",
                "quantity": str(f.quantity), "price": str(f.price),
                "commission": str(f.commission), "liquidity": f.liquidity,
                "commission_currency": self.commission_currency,
                "ts": from_us(f.ts_us).isoformat()}


class PaperBroker:
    """Fills one paper account's orders on the bars of its instruments."""

    venue = "paper"
    endpoint = "paper"

    def __init__(self, account_id: int, account: str, costs: PaperCosts) -> None:
        self.account_id = account_id
        self.account = account
        self.settings = costs
        self.sim = Simulator(costs_of(costs))
        self.latency = timedelta(milliseconds=costs.latency_ms)
        # orders seen without a signal: the latest bar when they arrived (fill after it)
        self._seen_at: dict[int, datetime] = {}

    # ------------------------------------------------------------------ the book
    def open_orders(self, conn: psycopg.Connection, inst: PaperInstrument) -> list[tuple]:
        return conn.execute(_OPEN_ORDERS, {"account": self.account_id,
                                           "instrument": inst.instrument_id}).fetchall()

    def _ready_after(self, conn: psycopg.Connection, inst: PaperInstrument,
                     row: tuple[Any, ...]) -> datetime | None:
        """The time after which a bar may fill this order (None: the triggering bar)."""
        order_id, trigger, signal_ts = row[0], row[9], row[11]
        if trigger in PROTECTIVE:
            return None
        if signal_ts is not None:
            return signal_ts + self.latency
        seen = self._seen_at.get(order_id)
        if seen is None:
            latest = conn.execute(_LATEST_BAR, {"instrument": inst.instrument_id,
                                                "tf": inst.timeframe,
                                                "at": FAR_FUTURE}).fetchone()
            created = row[12]
            seen = latest[0] if latest else created
            period = timedelta(microseconds=inst.tf_us)
            if latest and created < seen + 3 * period:
                # a live feed (the order made while the bars were current): the first bar
                # that may fill it is the first to open at or after its creation (the
                # bar forming when it was made opened before it: its open is hindsight).
                # Its creation is in the ledger, so a restart that finds more bars
                # stored keeps it. (A replayed session's bars are older than any order
                # made now: the latest bar when the order was first seen is its time.)
                seen = created - timedelta(microseconds=1)
            self._seen_at[order_id] = seen
        return seen + self.latency

    def forget(self, order_id: int) -> None:
        """Drop the time recorded for an order whose outcome on a bar is booked (filled,
        cancelled): it is never judged again."""
        self._seen_at.pop(order_id, None)

    def ready_after(self, order_id: int) -> datetime | None:
        """The time after which a bar may fill an order without a signal, as this broker
        has recorded it (None: not seen yet): what _ready_after answers once it has."""
        seen = self._seen_at.get(order_id)
        return None if seen is None else seen + self.latency

    # ------------------------------------------------------------------ settling bars
    def settle(self, conn: psycopg.Connection, inst: PaperInstrument,
               bar_rows: list[tuple[Any, ...]]) -> list[PaperFill]:
        """What this account's open orders on `inst` do on the bars `bar_rows` (oldest
        first), in the order the caller must apply them through the ledger: each is judged
        with the cash and position the fills before it leave, so outcomes after one that
        is not applied are stale (the caller judges the bar again). The caller `forget`s
        an order once its outcome is booked; until then the order is timed as before
        (an order without a signal keeps the bar it was first seen after)."""
        out: list[PaperFill] = []
        orders = self.open_orders(conn, inst)
        if not orders or not bar_rows:
            return out
        # each order with the bars that may fill it (by index into bar_rows)
        given = len(bar_rows)
        bar_rows = list(bar_rows)  # (a protective order's firing bar may be added, older)
        ready: list[tuple[tuple[Any, ...], list[int], datetime | None]] = []
        for row in orders:
            after = self._ready_after(conn, inst, row)
            if after is None:
                ready.append((row, [self._firing_bar(conn, inst, row[14], bar_rows)], None))
            else:
                after_us = to_us(after)
                candidates = [k for k, r in enumerate(bar_rows[:given])
                              if to_us(r[0]) > after_us]
                if candidates and row[15] in IMMEDIATE:
                    # judged on its first eligible bar only (looked up and added when the
                    # bars given start after it)
                    candidates = [self._first_bar(conn, inst, after, bar_rows, candidates[0])]
                ready.append((row, candidates, after))
        if not any(candidates for _row, candidates, _after in ready):
            return out  # (an order from a signal on the latest bar waits for the next)
        latest = bar_rows[given - 1][0]
        atr = self._atr(conn, inst, latest) if self.sim.costs.slippage.kind == "atr" \
            else None
        bars = [sim_bar(r, atr) for r in bar_rows]
        cash, held, quote, fx = conn.execute(_BOOK, {  # type: ignore[misc]
            "account": self.account_id, "instrument": inst.instrument_id,
            "at": latest}).fetchone()
        # prices and the simulator's commission are in the quote currency, the cash in the
        # account's: a USD account trading USD/JPY pays yen converted at the rate
        cash, held = Decimal(cash), Decimal(held)
        fx = Decimal(1) if fx is None else Decimal(fx)
        for row, candidates, after in ready:
            tif, expire_at = row[15], row[16]
            expire_us = None if expire_at is None else to_us(expire_at)
            # a stop-limit whose stop an earlier bar reached is a limit order now
            stop_limit = row[3] == "stop_limit" and bool(candidates)
            triggered = (stop_limit and after is not None
                         and self._stop_reached(conn, inst, row, after,
                                                bar_rows[candidates[0]][0]))
            for k in candidates:
                bar = bars[k]
                if expires_on(expire_us, bar):
                    # (applied here: the router books only fills and cancels)
                    conn.execute("SELECT trading.expire_order(%s)", (row[1],))
                    out.append(PaperFill(row[0], row[1], None, False, expired=True))
                    self._seen_at.pop(row[0], None)
                    break
                order = self._sim_order(row, held)
                if triggered:
                    order = replace(order, order_type="limit")
                # (a reduce-only order on a net position may close what is held, no more;
                # one on a hedge leg is judged by the ledger, which knows the legs)
                cap = _REDUCE_CAP if not (order.reduce_only and row[13] == "net") else (
                    max(held, _ZERO) if order.side == "sell" else max(-held, _ZERO))
                if cap <= 0:
                    # a venue refuses a reduce-only order with nothing left to reduce
                    out.append(PaperFill(row[0], row[1], None, False,
                                         "REDUCE_ONLY_NOTHING_TO_CLOSE: the position it "
                                         "reduces is already closed"))
                    break
                wanted = order.quantity
                capped = order.quantity > cap
                if capped:
                    order = replace(order, quantity=cap)
                fill, cancel = tif_outcome(tif, wanted, self.sim.match(
                    order, bar, inst.rules, cash=cash, fx=fx), bar)
                if fill is None and cancel is None:
                    stop = order.stop_price
                    if stop_limit and not triggered and stop is not None:
                        # reached and resting beyond its limit: a limit order from now on
                        triggered = bar.high >= stop if order.side == "buy" else bar.low <= stop
                    continue
                if fill is None:  # (IOC or FOK: nothing fills, all of it is cancelled)
                    out.append(PaperFill(row[0], row[1], None, False, cancel))
                    break
                if cancel is None and fill.unfilled > 0:
                    cancel = fill.reason or "not enough cash"
                if capped and cancel is None:
                    cancel = (f"REDUCE_ONLY_CAPPED: only {cap} was left to close of "
                              f"{Decimal(row[4]) - Decimal(row[5])}")
                if fill.quantity > 0:
                    signed = fill.quantity if order.side == "buy" else -fill.quantity
                    cash -= (signed * fill.price + fill.commission) * fx
                    opens = (held == 0 or (held > 0) == (signed > 0)) and not order.reduce_only
                    held += signed
                    out.append(PaperFill(row[0], row[1], fill, opens, cancel, quote))
                else:
                    out.append(PaperFill(row[0], row[1], None, False, cancel))
                break
        return out

    def _stop_reached(self, conn: psycopg.Connection, inst: PaperInstrument,
                      row: tuple[Any, ...], after: datetime, before: datetime) -> bool:
        """Whether a stored bar after `after` and before `before` reached this stop-limit's
        stop (it triggered there: a venue keeps it as a limit order until it fills). From
        the stored bars, so a restarted router knows it too."""
        return bool(conn.execute(_STOP_REACHED, {  # type: ignore[index]
            "instrument": inst.instrument_id, "tf": inst.timeframe, "after": after,
            "before": before, "side": row[2], "stop": row[7]}).fetchone()[0])

    def _first_bar(self, conn: psycopg.Connection, inst: PaperInstrument, after: datetime,
                   bar_rows: list[tuple[Any, ...]], first_given: int) -> int:
        """The index in `bar_rows` of an order's first eligible bar (the first stored bar
        opening after `after`): `first_given` when it is that bar, else that older bar,
        looked up and added (the router settled no bar between)."""
        row = conn.execute(_FIRST_BAR_AFTER, {"instrument": inst.instrument_id,
                                              "tf": inst.timeframe, "after": after}).fetchone()
        if row is None or row[0] >= bar_rows[first_given][0]:
            return first_given
        for k, r in enumerate(bar_rows):
            if r[0] == row[0]:
                return k
        bar_rows.append(row)
        return len(bar_rows) - 1

    def _firing_bar(self, conn: psycopg.Connection, inst: PaperInstrument,
                    triggered_at: datetime | None, bar_rows: list[tuple[Any, ...]]) -> int:
        """The index in `bar_rows` of the bar a protective order fills on: the one whose
        prices fired it (the bar of this timeframe closing by its `triggered_at`), looked
        up and added when the router is settling later bars; the latest one when the
        order does not say (an order from before migration 0004_04)."""
        if triggered_at is None:
            return len(bar_rows) - 1
        span = timedelta(microseconds=inst.tf_us)
        for k, r in enumerate(bar_rows):
            if r[0] + span == triggered_at:
                return k
        row = conn.execute(_LATEST_BAR, {"instrument": inst.instrument_id, "tf": inst.timeframe,
                                         "at": triggered_at - span}).fetchone()
        if row is None:
            return len(bar_rows) - 1
        for k, r in enumerate(bar_rows):
            if r[0] == row[0]:
                return k
        bar_rows.append(row)
        return len(bar_rows) - 1

    def _sim_order(self, row: tuple[Any, ...], held: Decimal) -> SimOrder:
        (order_id, _coid, side, otype, qty, filled, limit, stop, reduce_only, trigger,
         trigger_price, *_rest) = row
        remaining = Decimal(qty) - Decimal(filled)
        protective = trigger in PROTECTIVE and trigger_price is not None
        closing = Decimal(0)
        if side == "buy" and held < 0 and not reduce_only:
            closing = min(remaining, -held)
        return SimOrder(int(order_id), side, "market" if protective else otype, remaining,
                        reduce_only=bool(reduce_only),
                        limit_price=None if limit is None else Decimal(limit),
                        stop_price=None if stop is None else Decimal(stop),
                        trigger_price=Decimal(trigger_price) if protective else None,
                        closing=closing)

    def _atr(self, conn: psycopg.Connection, inst: PaperInstrument, at: datetime) -> float | None:
        rows = conn.execute(
            "SELECT high, low, close FROM (SELECT ts, high, low, close FROM market.bars "
            "WHERE instrument_id = %s AND timeframe = %s AND ts < %s ORDER BY ts DESC LIMIT 60)"
            " x ORDER BY ts", (inst.instrument_id, inst.timeframe, at)).fetchall()
        if len(rows) < 15:
            return None
        h, low, c = (np.array([float(r[k]) for r in rows]) for k in range(3))
        value = float(talib.ATR(h, low, c, 14)[-1])
        return value if np.isfinite(value) else None


FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


def bars_after(conn: psycopg.Connection, inst: PaperInstrument, after: datetime | None,
               until: datetime = FAR_FUTURE) -> list[tuple[Any, ...]]:
    """The bars after `after` up to `until`; with no `after`, the latest bar only."""
    if after is None:
        row = conn.execute(_LATEST_BAR, {"instrument": inst.instrument_id, "tf": inst.timeframe,
                                         "at": until}).fetchone()
        return [row] if row else []
    return conn.execute(_BARS_AFTER, {"instrument": inst.instrument_id, "tf": inst.timeframe,
                                      "after": after, "until": until}).fetchall()
