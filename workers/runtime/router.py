"""The order router: drains pgmq's `orders` queue to each account's broker and settles
every order through the trading core's functions.

One message is one order. The router
1. reads it with a visibility timeout (`trading.read_orders`): if the router dies, the
   message comes back after the timeout and the next router carries on;
2. marks the order in flight (`trading.mark_in_flight`, the gate every order passes on
   its way to a broker; a paper order passes it as it is acknowledged into the paper
   book): an order the account may no longer send (its breaker tripped, or it was
   downgraded to advisory, after the order was queued) is cancelled there instead, and
   the router archives its message without sending it. Then it places the order with
   MMATS's client order id — a message delivered twice finds the first order at the
   broker instead of placing another;
3. records the broker's answer (`acknowledge_order`, `apply_fill`, `reject_order`,
   `cancel_order`) and archives the message only after the database holds the outcome.

A trader's cancel of an order at its venue (`trading.request_cancel`) marks the order
cancel-requested and queues a message for it: the router asks the venue to cancel
(`cancel_order`, after looking up an order still in flight) and records the answer, the
cancellation or the fills that came first; an order in flight that the venue does not have
is never sent again (the gate cancels it, CANCEL_REQUESTED). An order in the paper book
(broker id `paper-...`) is cancelled by the ledger at once: that book is the ledger.

A network error never marks an order failed: it stays in flight, the message is retried
with backoff, and the broker's own report (looked up by client order id) settles it.
Only the venue's refusal of `place_order` rejects the order, with the broker's reason;
the ledger counts consecutive rejections and downgrades the account to advisory past its
limit. The same errors answering a query about an order that may be at the venue (a
lookup, a status poll, the fill history: a key rotated away, a 4xx, an order the venue
says it does not know) raise the alarm, once per episode, and the message is retried with
backoff; an order the venue does not know is placed again only while it is in flight
(the reconciler rejects one still unknown after its in-flight timeout). A rate limit
(BackOff) holds every message for that venue (one endpoint of it) until its Retry-After
— none is sent there meanwhile — while the other venues go on. A broker error of one
message never stops the router: the other accounts' orders go on.

Paper accounts are filled by `workers.runtime.paper.PaperBroker` on new bars (LISTEN
mmats_bars); after settling a bar the router advances `paper:<instrument>:<timeframe>`,
which the strategy worker waits for, so fills at a bar's open reach the ledger before any
strategy sees that bar — the order a backtest keeps.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from workers.backtest.data import TIMEFRAME_US, plain
from workers.backtest.simulator import InstrumentRules
from workers.brokers import errors
from workers.brokers.base import Broker, BrokerFill, BrokerOrder, OrderRequest
from workers.ingest.backoff import BackoffPolicy
from workers.runtime import log
from workers.runtime.config import AccountConfig, RouterConfig
from workers.runtime.paper import PaperBroker, PaperFill, PaperInstrument, bars_after
from workers.runtime.worker import Worker, connect

_ORDER = """
SELECT o.order_id, o.account_id, o.client_order_id, o.broker_order_id, o.side::text,
       o.order_type::text, o.time_in_force::text, o.quantity, o.limit_price, o.stop_price,
       o.reduce_only, o.status::text, o.filled_quantity, o.trigger::text, i.instrument_id,
       i.symbol, i.venue, a.name, a.environment::text, o.created_at, o.cancel_requested_at
FROM trading.orders o JOIN market.instruments i USING (instrument_id)
JOIN trading.accounts a ON a.account_id = o.account_id
WHERE o.order_id = %s
"""
_ORDERS = _ORDER.replace("WHERE o.order_id = %s", "WHERE o.order_id = ANY(%s)")
_TERMINAL = frozenset({"filled", "cancelled", "rejected", "expired"})
# what the ledger's functions raise when they refuse a call's content (bad data, a broken
# rule: classes 22, 23 and 0A), as opposed to a lost connection or a cancelled statement
_REFUSED = (psycopg.errors.DataError, psycopg.errors.IntegrityError,
            psycopg.errors.FeatureNotSupported)
IDLE = psycopg.pq.TransactionStatus.IDLE


@dataclass
class Order:
    order_id: int
    account_id: int
    client_order_id: str
    broker_order_id: str | None
    side: str
    order_type: str
    time_in_force: str
    quantity: Decimal
    limit_price: Decimal | None
    stop_price: Decimal | None
    reduce_only: bool
    status: str
    filled_quantity: Decimal
    trigger: str
    instrument_id: int
    symbol: str
    venue: str
    account: str
    environment: str
    created_at: datetime
    cancel_requested_at: datetime | None = None  # trading.request_cancel: ask the venue

    def request(self) -> OrderRequest:
        return OrderRequest(self.client_order_id, self.symbol, self.side,  # type: ignore[arg-type]
                            self.quantity - self.filled_quantity,
                            self.order_type,  # type: ignore[arg-type]
                            self.limit_price, self.stop_price, self.time_in_force,
                            self.reduce_only)


@dataclass
class RoutedAccount:
    account_id: int
    config: AccountConfig
    broker: Broker | PaperBroker
    credential_endpoint: str | None = None  # where the stored keys belong


def check_environment(account: RoutedAccount, environment: str) -> None:
    """Refuse, and say which, an order that would reach a live endpoint from a non-live
    account or with testnet keys (or a live account's order sent anywhere but live)."""
    endpoint = getattr(account.broker, "endpoint", "paper")
    name = account.config.name
    if endpoint == "live" and environment != "live":
        raise errors.EnvironmentMismatch(
            f"account {name} is a {environment} account: its orders may not go to the live "
            f"endpoint of {getattr(account.broker, 'venue', '?')}")
    if endpoint == "live" and account.credential_endpoint not in (None, "live"):
        raise errors.EnvironmentMismatch(
            f"account {name}: {account.credential_endpoint} keys may not trade on a live "
            "endpoint")
    if environment == "live" and endpoint != "live":
        raise errors.EnvironmentMismatch(
            f"account {name} is live but its broker points at the {endpoint} endpoint")


def backoff_seconds(attempt: int, *, base: float = 0.5, cap: float = 60.0,
                    minimum: float | None = None, rng: random.Random | None = None) -> float:
    """The ingest worker's backoff policy for a message's `attempt`th read, with half of
    the window randomised: a retry never comes sooner than half its window (full jitter
    could redeliver at once, within the same drain); `minimum` is the venue's Retry-After."""
    lo, hi = BackoffPolicy(base=base, cap=cap, jitter=0.5).bounds(max(attempt - 1, 0))
    delay = lo + (hi - lo) * (rng or random).random()
    return max(delay, minimum or 0.0)


class _GateClosed(Exception):
    """An order in flight that the venue does not have, whose account may no longer send
    it (its breaker, or its downgrade, since it first went out): cancelled, not placed."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(str(result.get("reason")))
        self.result = result


class _PlaceRefused(Exception):
    """The venue's refusal of `place_order` (a Stop or a Reject): the only broker answer
    that rejects an order (the same errors from a query say nothing of its fate)."""

    def __init__(self, error: errors.BrokerError) -> None:
        super().__init__(str(error))
        self.error = error


def _venue_key(routed: RoutedAccount) -> tuple[str, str]:
    """What a venue's rate limit applies to: the venue at one endpoint."""
    return routed.broker.venue, routed.broker.endpoint


def _venue(routed: RoutedAccount) -> Broker:
    """A real venue's adapter (paper orders never reach a broker call)."""
    assert not isinstance(routed.broker, PaperBroker)
    return routed.broker


class Router(Worker):
    kind = "router"

    def __init__(self, url: str, accounts: Mapping[int, RoutedAccount], *,
                 config: RouterConfig | None = None, name: str = "router",
                 heartbeat_seconds: float = 5.0,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        super().__init__(url, name, heartbeat_seconds=heartbeat_seconds)
        self.accounts = dict(accounts)
        self.config = config or RouterConfig()
        self.on_event = on_event
        self.conn: psycopg.Connection | None = None
        self.listen: psycopg.Connection | None = None
        self._instruments: dict[int, PaperInstrument | None] = {}
        self._pending_bars: dict[tuple[int, str], datetime] = {}
        self.counts = {"orders": 0, "fills": 0, "rejected": 0, "retries": 0, "cancelled": 0}
        # a venue that answered BackOff: time.monotonic() until which nothing is sent to it
        self._blocked: dict[tuple[str, str], float] = {}
        # orders whose broker refuses to answer for them (a query): the code reported
        self._alarmed: dict[int, str] = {}
        self._last_catch_up = time.monotonic()

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self.conn = connect(self.url, "mmats_router")
        self.listen = connect(self.url, "mmats_router")
        self.listen.execute("LISTEN mmats_bars")
        self.listen.execute("LISTEN mmats_orders")  # a routable order was queued
        self.detail = {"accounts": sorted(a.config.name for a in self.accounts.values())}
        self._catch_up()

    def close(self) -> None:
        for c in (self.conn, self.listen, self._hb_conn):
            if c is not None and not c.closed:
                c.close()

    @property
    def _paper(self) -> list[RoutedAccount]:
        return [a for a in self.accounts.values() if isinstance(a.broker, PaperBroker)]

    def step(self) -> None:
        self._wait_for_bars(self.config.poll_ms / 1000)
        if time.monotonic() - self._last_catch_up > 2.0:  # a notification may be lost
            self._last_catch_up = time.monotonic()
            self._catch_up()
        self.drain()
        if self._pending_bars:
            bars, self._pending_bars = self._pending_bars, {}
            self.settle_many(bars)
        self.detail["counts"] = dict(self.counts)

    def _wait_for_bars(self, timeout: float) -> None:
        assert self.listen is not None
        for note in self.listen.notifies(timeout=timeout, stop_after=1):
            self._note(note.channel, note.payload)
        # anything else already delivered
        for note in self.listen.notifies(timeout=0.0, stop_after=1000):
            self._note(note.channel, note.payload)

    def _note(self, channel: str, payload: str) -> None:
        """A bar notification (mmats_orders only wakes the loop: it drains the queue)."""
        if channel != "mmats_bars" or not self._paper:
            return
        try:
            data = json.loads(payload)
            key = (int(data["instrument_id"]), str(data["timeframe"]))
            last = datetime.fromisoformat(data["last"])
        except (ValueError, KeyError, TypeError):
            log.event(self.log, "ignored a malformed bar notification", 30, payload=payload[:200])
            return
        if key not in self._pending_bars or last > self._pending_bars[key]:
            self._pending_bars[key] = last

    # ------------------------------------------------------------------ the queue
    def drain(self) -> int:
        """Handle every visible message of this router's accounts; returns how many."""
        assert self.conn is not None
        handled = 0
        ids = sorted(self.accounts)
        while not self.stop_event.is_set():
            rows = self._exec(
                "SELECT msg_id, read_ct, message FROM trading.read_orders(%s, %s, %s)",
                (self.config.visibility_seconds, self.config.batch, ids)).fetchall()
            if not rows:
                break
            # the paper accounts' orders in one read (a live order is read when handled)
            orders = self._orders([int(m.get("order_id", 0)) for _i, _n, m in rows
                                   if self._for_paper(m)])
            paper = []
            for msg_id, read_ct, message in rows:
                handled += 1
                order = orders.get(int(message.get("order_id", 0)))
                routed = None if order is None else self.accounts.get(order.account_id)
                if (order is not None and routed is not None
                        and isinstance(routed.broker, PaperBroker)
                        and order.status in ("created", "in_flight")):
                    paper.append((routed, order, int(msg_id)))
                else:  # (read again when handled: a venue call may come before it)
                    self._handle_isolated(int(msg_id), int(read_ct), message)
            if paper:
                self._accept_paper_many(paper)
        return handled

    def _orders(self, order_ids: list[int]) -> dict[int, Order]:
        if not order_ids:
            return {}
        rows = self._c.execute(_ORDERS, (order_ids,)).fetchall()
        return {int(r[0]): Order(*r) for r in rows}

    def _for_paper(self, message: dict[str, Any]) -> bool:
        """Whether a queue message names one of this router's paper accounts."""
        try:
            routed = self.accounts.get(int(message.get("account_id", 0)))
        except (TypeError, ValueError):
            return False
        return routed is not None and isinstance(routed.broker, PaperBroker)

    def _archive(self, msg_id: int) -> None:
        assert self.conn is not None
        self._exec("SELECT trading.archive_order_message(%s)", (msg_id,))

    def _delay(self, msg_id: int, seconds: float) -> None:
        assert self.conn is not None
        # a venue's Retry-After beyond a day is taken as a day: the message comes back
        self._exec("SELECT trading.delay_order_message(%s, %s)",
                   (msg_id, Decimal(str(round(min(max(seconds, 0.0), 86400.0), 3)))))

    def _order(self, order_id: int) -> Order | None:
        assert self.conn is not None
        row = self.conn.execute(_ORDER, (order_id,)).fetchone()
        return None if row is None else Order(*row)

    def _handle_isolated(self, msg_id: int, read_ct: int, message: dict[str, Any]) -> None:
        """`handle`, with anything it did not expect (an adapter's bug, a malformed answer
        it did not map) kept to this message: reported, the message delayed with backoff,
        the other accounts' orders go on. A database error still ends the worker (a lost
        connection, a missing grant: the supervisor restarts it, loudly); the ledger's own
        refusals are handled in `handle`."""
        try:
            self.handle(msg_id, read_ct, message)
        except psycopg.Error:
            raise
        except Exception as exc:  # isolation is the point
            if self._c.info.transaction_status != IDLE:
                self._c.rollback()
            text = " ".join(str(exc).split()) or type(exc).__name__
            self.report("ROUTER_ERROR", f"queue message {msg_id} (order "
                        f"{message.get('order_id')}): {type(exc).__name__}: {text}")
            self._delay(msg_id, backoff_seconds(read_ct, base=5.0, cap=300.0))

    def handle(self, msg_id: int, read_ct: int, message: dict[str, Any]) -> None:
        order_id = int(message.get("order_id", 0))
        order = self._order(order_id)
        if order is None:
            self.report("ORDER_UNKNOWN", f"queue message {msg_id} names unknown order {order_id}")
            self._archive(msg_id)
            return
        routed = self.accounts.get(order.account_id)
        if routed is None:  # not ours (read_orders filters; a config change mid-flight)
            self._delay(msg_id, 5)
            return
        if order.status in _TERMINAL:
            self._alarmed.pop(order.order_id, None)
            self._archive(msg_id)
            return
        if isinstance(routed.broker, PaperBroker):
            if order.status in ("created", "in_flight"):
                self._accept_paper_many([(routed, order, msg_id)])
            else:  # already in the paper book (the ledger): the bars fill it from there
                self._archive(msg_id)
            return
        venue = _venue_key(routed)
        wait = self._blocked.get(venue, 0.0) - time.monotonic()
        if wait > 0:  # the venue asked us to slow down: nothing is sent to it until then
            log.event(self.log, "venue rate-limited, message held", 20, order=order.order_id,
                      account=order.account, venue=venue[0], delay=round(wait, 3))
            self._delay(msg_id, wait)
            return
        # a message seen before (or an order already in flight) may have reached the
        # venue: look it up by client order id before placing it
        lookup = order.status == "in_flight" or read_ct > 1
        # an order in flight when read passed the gate on an earlier delivery: one the
        # venue turns out not to have is placed again only if the gate would pass it now
        regate = order.status == "in_flight"
        if order.status == "created":
            try:
                check_environment(routed, order.environment)
            except errors.EnvironmentMismatch as exc:
                self._reject(order, exc)
                self._archive(msg_id)
                return
            if not self._mark_in_flight(order, msg_id):
                return
        try:
            if order.status == "in_flight":
                answer = self._find_or_place(routed, order, lookup=lookup, regate=regate)
                if order.cancel_requested_at is not None and answer.status not in _TERMINAL:
                    answer = self._cancel_at_venue(routed, order, answer.broker_order_id)
            elif order.cancel_requested_at is not None and order.broker_order_id is not None:
                answer = self._cancel_at_venue(routed, order, order.broker_order_id)
            else:
                answer = self._status(routed, order)
            self._settle(routed, order, answer, msg_id)
        except _GateClosed as gate:
            self._alarmed.pop(order.order_id, None)
            self._cancelled(order, gate.result)
            self._archive(msg_id)
        except _PlaceRefused as refused:  # the venue would not take the order
            self._alarmed.pop(order.order_id, None)
            self._reject(order, refused.error)
            self._archive(msg_id)
        except errors.Retry as exc:
            self.counts["retries"] += 1
            delay = backoff_seconds(read_ct, minimum=exc.retry_after)
            if isinstance(exc, errors.BackOff):  # every message for this venue waits too
                until = time.monotonic() + min(delay, 86400.0)
                self._blocked[venue] = max(self._blocked.get(venue, 0.0), until)
            if read_ct >= self.config.max_retries and read_ct % self.config.max_retries == 0:
                self.report("BROKER_RETRYING",
                            f"order {order.client_order_id} ({order.symbol}): {read_ct} attempts "
                            f"so far, still {order.status}: {exc}", account=order.account)
            log.event(self.log, "broker unavailable, will retry", 30, order=order.order_id,
                      account=order.account, attempt=read_ct, delay=round(delay, 3),
                      error=str(exc))
            self._delay(msg_id, delay)
        except errors.BrokerError as exc:  # Stop, Reject, OrderNotFound: not a place
            # a query (a lookup, a status poll, the fill history) of an order that may be
            # at the venue: rejecting it would make the ledger refuse its fills (or, once
            # partly filled, be refused itself). Alarm once per episode and look again
            if self._alarmed.get(order.order_id) != exc.code:
                self._alarmed[order.order_id] = exc.code
                self.report(exc.code, f"order {order.client_order_id} ({order.symbol}) is "
                            f"{order.status} and its broker does not answer for it: {exc}",
                            account=order.account)
            self._delay(msg_id, backoff_seconds(read_ct, base=5.0, cap=300.0))
        except _REFUSED as exc:
            # the ledger refuses what the broker reports (a fill it cannot take): a human
            # must look, the other accounts go on, and the message comes back later
            if self._c.info.transaction_status != IDLE:
                self._c.rollback()
            self.report("LEDGER_REFUSED_FILL",
                        f"order {order.client_order_id} ({order.symbol}): the broker reports "
                        f"what the ledger refuses: {str(exc).splitlines()[0]}",
                        account=order.account)
            self._delay(msg_id, backoff_seconds(read_ct, base=30.0, cap=900.0,
                                                minimum=self.config.status_poll_seconds))
        else:
            self._alarmed.pop(order.order_id, None)

    def _mark_in_flight(self, order: Order, msg_id: int) -> bool:
        """Let the order go to its broker (True), unless the ledger's gate cancelled it
        (the account's breaker, or its downgrade to advisory, since it was queued): then
        the message is archived and the cancel said (False)."""
        result = self._call("mark_in_flight", order.client_order_id)
        if isinstance(result, dict) and result.get("status") == "cancelled":
            self._cancelled(order, result)
            self._archive(msg_id)
            return False
        order.status = "in_flight"
        self._emit("order.sent", order)
        return True

    def _cancelled(self, order: Order, result: Mapping[str, Any]) -> None:
        """An order `trading.mark_in_flight` cancelled instead of letting it go."""
        self.counts["cancelled"] += 1
        order.status = "cancelled"
        self._emit("order.cancelled", order, code=result.get("reason_code"),
                   reason=str(result.get("reason") or "")[:500])

    def _accept_paper_many(self, batch: list[tuple[RoutedAccount, Order, int]]) -> None:
        """Paper orders enter the paper book (the ledger) in one transaction: each
        acknowledged (`trading.acknowledge_order` passes an order never sent through the
        gate, which may cancel it), then each account's orders on each instrument settled
        bar by bar on the bars that may fill them (`_accepted_bars`: an order queued while
        the router was behind fills on the first bar after its signal, as in a backtest,
        not on the latest one; a protective order fills on the bar that fired it), the
        messages archived. No broker call lies between, so nothing is gained by committing
        each step, and a crash leaves the messages to be read again."""
        accepted = []
        for routed, order, msg_id in batch:
            try:
                check_environment(routed, order.environment)
            except errors.EnvironmentMismatch as exc:
                self._reject(order, exc)
                self._archive(msg_id)
                continue
            accepted.append((routed, order, msg_id))
        if not accepted:
            return
        # accounts in id order, as every writer of the ledger locks them
        accepted.sort(key=lambda x: x[0].account_id)
        for attempt in range(1, 6):
            cancelled: list[tuple[Order, dict[str, Any]]] = []
            booked = []
            try:
                with self._c.transaction():
                    # every account of the batch first (in id order), before any audit
                    # event locks the chain head: a bar insert holding one of them and
                    # wanting the chain head would otherwise wait for us as we wait for it
                    self._c.execute("SELECT trading.lock_accounts(%s)",
                                    (sorted({r.account_id for r, _o, _m in accepted}),))
                    # the orders as they are now that their accounts are locked: another
                    # router may have taken one into the paper book since it was read
                    # (this one's venue calls outlasted the visibility timeout)
                    still = {r[0] for r in self._c.execute(
                        "SELECT order_id FROM trading.orders WHERE order_id = ANY(%s)"
                        " AND status IN ('created', 'in_flight')",
                        ([o.order_id for _r, o, _m in accepted],)).fetchall()}
                    for routed, order, msg in accepted:
                        if order.order_id not in still:
                            continue  # settled by the other router: its message archived
                        # created -> submitted directly: with no broker call between, the
                        # order is never in flight (its fate is known in this transaction).
                        # The acknowledgement of an order never sent passes the gate every
                        # order passes on its way to a broker (the breaker, the downgrade)
                        answer = self._call("acknowledge_order", order.client_order_id,
                                            f"paper-{order.client_order_id}")
                        if isinstance(answer, dict) and answer.get("status") == "cancelled":
                            cancelled.append((order, answer))
                            continue
                        booked.append((routed, order, msg))
                    settled: set[tuple[int, int]] = set()
                    window: dict[int, list[tuple[Any, ...]]] = {}
                    for routed, order, _msg in booked:
                        key = (routed.account_id, order.instrument_id)
                        inst = self._instrument(order.instrument_id)
                        if inst is None or key in settled:
                            continue
                        settled.add(key)
                        if inst.instrument_id not in window:
                            window[inst.instrument_id] = self._accepted_bars(inst, [
                                o.order_id for _r, o, _m in booked
                                if o.instrument_id == inst.instrument_id])
                        self._settle_paper(routed, inst, window[inst.instrument_id])
                    self._c.execute("SELECT trading.archive_order_message(m) "
                                    "FROM unnest(%s::bigint[]) AS m",
                                    ([msg for _r, _o, msg in accepted],))
                break
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if attempt == 5:
                    raise
                time.sleep(0.005 * attempt * random.random())
        for order, gate in cancelled:
            self._cancelled(order, gate)
        for _routed, order, _msg in booked:
            self._emit("order.acknowledged", order,
                       broker_order_id=f"paper-{order.client_order_id}")

    def _find_or_place(self, routed: RoutedAccount, order: Order, *,
                       lookup: bool = True, regate: bool = False) -> BrokerOrder:
        """The order at the broker: found by its client id (a message delivered again
        after a crash or a timeout), or placed now. With `regate` (an order that went in
        flight on an earlier delivery) one the broker does not have is placed again only
        if the ledger's gate lets it go again (`trading.mark_in_flight`)."""
        broker = _venue(routed)
        if lookup:
            try:
                found = broker.order_status(client_order_id=order.client_order_id,
                                            symbol=order.symbol)
            except errors.OrderNotFound:
                pass
            else:
                # a venue rounds a size down, never up; another order under this client
                # id (a manual id reused, another database) is refused, never taken for it
                if (found.symbol, found.side) != (order.symbol, order.side) \
                        or found.quantity > order.quantity:
                    raise _PlaceRefused(errors.Reject(
                        f"order {order.client_order_id}: the venue's order under this client "
                        f"id is {found.side} {found.quantity} {found.symbol} "
                        f"({found.broker_order_id}), not this order's {order.side} "
                        f"{order.quantity} {order.symbol}", venue=order.venue,
                        code="CLIENT_ORDER_ID_CONFLICT"))
                return found
            if regate:  # sent again: the ledger's gate judges it again (mark_in_flight)
                result = self._call("mark_in_flight", order.client_order_id)
                if isinstance(result, dict) and result.get("status") == "cancelled":
                    raise _GateClosed(result)
        try:
            return broker.place_order(order.request())
        except (errors.Stop, errors.Reject) as exc:
            raise _PlaceRefused(exc) from exc

    def _cancel_at_venue(self, routed: RoutedAccount, order: Order,
                         broker_order_id: str) -> BrokerOrder:
        """trading.request_cancel: the venue cancels the order, or says what happened to it
        first. A venue that refuses to cancel an order it has finished (Binance answers a
        filled one with -2011 "Unknown order sent.") is asked for the order instead, so the
        fills that beat the cancel are booked; a network error is retried as any."""
        venue = _venue(routed)
        try:
            return venue.cancel_order(broker_order_id, order.symbol)
        except (errors.OrderNotFound, errors.Reject):
            return venue.order_status(broker_order_id=broker_order_id,
                                      client_order_id=order.client_order_id,
                                      symbol=order.symbol)

    def _status(self, routed: RoutedAccount, order: Order) -> BrokerOrder:
        return _venue(routed).order_status(broker_order_id=order.broker_order_id,
                                   client_order_id=order.client_order_id, symbol=order.symbol)

    def _settle(self, routed: RoutedAccount, order: Order, answer: BrokerOrder,
                msg_id: int) -> None:
        if order.status == "in_flight":
            ack = self._call("acknowledge_order", order.client_order_id, answer.broker_order_id)
            if isinstance(ack, dict) and ack.get("status") == "cancelled":
                # the ledger cancelled it while this placed it (a cancel whose venue lookup
                # came before the venue knew the order, the reconciler's in-flight timeout):
                # the venue's order is cancelled too, never left live and unwatched
                self._cancel_placed(routed, order, answer, msg_id)
                return
            order.status = "submitted"
            self._emit("order.acknowledged", order, broker_order_id=answer.broker_order_id)
        fills = list(answer.fills)
        if not fills and answer.filled_quantity > order.filled_quantity:
            # venues that report cumulative quantities on the order (Alpaca): the
            # executions themselves come from the venue's fill history
            since = order.created_at - timedelta(minutes=5)
            fills = [f for f in _venue(routed).fills_since(since, order.symbol)
                     if f.broker_order_id == answer.broker_order_id]
        for fill in fills:
            self._apply_broker_fill(order, fill)
        recorded = self._order(order.order_id)
        missing = recorded is None or answer.filled_quantity > recorded.filled_quantity
        if answer.status == "cancelled" and not missing:
            self._call("cancel_order", order.client_order_id, answer.reason or (
                "cancelled at the venue as requested" if order.cancel_requested_at is not None
                else "cancelled by the broker"))
        elif answer.status == "expired" and not missing:
            self._call("expire_order", order.client_order_id)
        elif answer.status == "filled" and not missing and recorded is not None \
                and recorded.filled_quantity < recorded.quantity:
            # the venue filled less than the ledger's order (its lot step rounded the
            # quantity down): the rest is cancelled, not left open for ever as an entry
            self._call("cancel_order", order.client_order_id,
                       f"the venue filled {recorded.filled_quantity} of {recorded.quantity} and "
                       "finished the order (its quantity step)")
        elif answer.status == "rejected":
            self._reject(order, errors.Reject(answer.reason or "rejected by the broker"))
        if answer.status in _TERMINAL and not missing:
            self._archive(msg_id)
        else:
            # still working, or the venue has not listed every execution it reported:
            # look again later (a cancelled order's late fills are still applied)
            self._delay(msg_id, self.config.status_poll_seconds)

    def _cancel_placed(self, routed: RoutedAccount, order: Order, answer: BrokerOrder,
                       msg_id: int) -> None:
        """An order placed after the ledger cancelled it: cancelled at the venue, and
        reported (a fill that beat the cancel is the venue's, refused by the ledger: the
        reconciler flags it)."""
        outcome = answer
        if answer.status not in _TERMINAL:
            try:
                outcome = self._cancel_at_venue(routed, order, answer.broker_order_id)
            except errors.BrokerError as exc:
                self.report("CANCELLED_ORDER_LIVE",
                            f"order {order.client_order_id} ({order.symbol}) was placed as "
                            f"{answer.broker_order_id} after the ledger cancelled it, and the "
                            f"venue's cancel failed: {exc} (cancel it at the venue)",
                            account=order.account)
                self._archive(msg_id)
                return
        self._emit("order.cancelled_at_venue", order, broker_order_id=answer.broker_order_id,
                   venue_status=outcome.status)
        if outcome.filled_quantity > 0:
            self.report("CANCELLED_ORDER_FILLED",
                        f"order {order.client_order_id} ({order.symbol}) was placed as "
                        f"{answer.broker_order_id} after the ledger cancelled it and filled "
                        f"{outcome.filled_quantity} at the venue before its cancel",
                        account=order.account)
        self._archive(msg_id)

    def _reject(self, order: Order, exc: errors.BrokerError) -> None:
        self.counts["rejected"] += 1
        result = self._call("reject_order", order.client_order_id, exc.code, str(exc)[:500])
        self._emit("order.rejected", order, code=exc.code, reason=str(exc)[:500])
        if isinstance(exc, errors.Stop):
            self.report(exc.code, f"order {order.client_order_id} ({order.symbol}) refused: "
                        f"{exc}", account=order.account)
        if isinstance(result, dict) and result.get("breaker_tripped"):
            self.report("ACCOUNT_DOWNGRADED", f"account {order.account}: repeated rejections "
                        "tripped the breaker; the account is advisory now", account=order.account)

    # ------------------------------------------------------------------ ledger calls
    @property
    def _c(self) -> psycopg.Connection:
        assert self.conn is not None
        return self.conn

    def _exec(self, query: str, args: Any = None) -> psycopg.Cursor[Any]:
        """One statement (one transaction: the session autocommits), tried again when the
        server broke a deadlock or a serialization conflict by cancelling it: every
        ledger call the router makes is safe to repeat."""
        for attempt in range(1, 6):
            try:
                return self._c.execute(query, args)  # type: ignore[arg-type]
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                if attempt == 5 or self._c.info.transaction_status != IDLE:
                    raise  # inside a transaction block: its owner repeats the whole of it
                log.event(self.log, "ledger call retried", 30, attempt=attempt,
                          error=str(exc).splitlines()[0])
                time.sleep(0.005 * attempt * random.random())
        raise AssertionError("unreachable")

    def _call(self, function: str, *args: Any) -> Any:
        placeholders = ", ".join(["%s"] * len(args))
        row = self._exec(f"SELECT trading.{function}({placeholders})", args).fetchone()
        return None if row is None else row[0]

    def _apply(self, payload: dict[str, Any]) -> dict[str, Any]:
        row = self._exec("SELECT trading.apply_fill(%s)", (Jsonb(payload),)).fetchone()
        assert row is not None
        result: dict[str, Any] = row[0]
        if result.get("status") == "applied":
            self.counts["fills"] += 1
        return result

    def _apply_broker_fill(self, order: Order, fill: BrokerFill) -> None:
        result = self._apply({
            "client_order_id": order.client_order_id, "broker_fill_id": fill.fill_id,
            "quantity": str(fill.quantity), "price": str(fill.price),
            "commission": str(fill.commission), "commission_currency": fill.commission_currency,
            "liquidity": fill.liquidity, "ts": fill.ts.isoformat()})
        if result.get("status") == "applied":
            self._emit("fill.applied", order, quantity=str(fill.quantity), price=str(fill.price))

    def _emit(self, what: str, order: Order, **extra: Any) -> None:
        fields = {"order_id": order.order_id, "account": order.account,
                  "environment": order.environment, "symbol": order.symbol,
                  "side": order.side, "quantity": str(order.quantity), **extra}
        log.event(self.log, what, **fields)
        if self.on_event is not None:
            self.on_event(what, fields)

    # ------------------------------------------------------------------ paper fills
    def _instrument(self, instrument_id: int) -> PaperInstrument | None:
        if instrument_id not in self._instruments:
            # the paper broker fills on the bars the trading core prices with
            row = self._c.execute(
                "SELECT i.symbol, i.price_tick, i.quantity_step, i.min_quantity, "
                "market.finest_timeframe(i.instrument_id)::text "
                "FROM market.instruments i WHERE i.instrument_id = %s",
                (instrument_id,)).fetchone()
            if row is None or row[4] is None:
                return None
            self._instruments[instrument_id] = PaperInstrument(
                instrument_id, row[0], row[4],
                InstrumentRules(plain(row[1]), plain(row[2]), plain(row[3])),
                TIMEFRAME_US[row[4]])
        return self._instruments[instrument_id]

    def settle_bars(self, instrument_id: int, timeframe: str, last: datetime) -> None:
        """Fill the paper orders the new bars of an instrument reach, then say so."""
        self.settle_many({(instrument_id, timeframe): last})

    def settle_many(self, bars: dict[tuple[int, str], datetime]) -> None:
        """Settle the new bars of several instruments: fill the paper orders they reach
        (only the accounts with orders open on an instrument are looked at), fill the
        protective orders they fired, then advance every instrument's resume point in
        one statement (which tells the waiting strategy workers)."""
        todo = {}
        for (instrument_id, timeframe), last in sorted(bars.items()):
            inst = self._instrument(instrument_id)
            if inst is not None and inst.timeframe == timeframe:
                todo[f"paper:{instrument_id}:{timeframe}"] = (inst, last)
        if not todo:
            return
        cursors: dict[str, datetime] = dict(self._c.execute(
            "SELECT name, at FROM runtime.cursors WHERE name = ANY(%s)",
            (list(todo),)).fetchall())
        by_id = {a.account_id: a for a in self._paper}
        open_pairs = self._c.execute(
            "SELECT DISTINCT instrument_id, account_id FROM trading.orders "
            "WHERE account_id = ANY(%s) AND instrument_id = ANY(%s) "
            "AND status IN ('submitted', 'partially_filled') ORDER BY 1, 2",
            (list(by_id), [inst.instrument_id for inst, _ in todo.values()])).fetchall()
        accounts: dict[int, list[RoutedAccount]] = {}
        for instrument_id, account_id in open_pairs:
            accounts.setdefault(int(instrument_id), []).append(by_id[int(account_id)])
        for name, (inst, last) in todo.items():
            holders = accounts.get(inst.instrument_id)
            if not holders:
                continue
            after = cursors.get(name) or self._first_needed(inst)
            rows = bars_after(self._c, inst, after, last)
            for routed in holders:
                self._settle_paper(routed, inst, rows)
        self.drain()  # protective orders the bars (or the fills) fired fill on them
        self._exec("SELECT runtime.advance_cursor(n, NULL, t) "
                   "FROM unnest(%s::text[], %s::timestamptz[]) AS x(n, t)",
                   (list(todo), [last for _inst, last in todo.values()]))

    def _settle_paper(self, routed: RoutedAccount, inst: PaperInstrument,
                      rows: list[tuple[Any, ...]]) -> None:
        """Settle an account's paper orders bar by bar, as a backtest does: fills, cancels
        of what cash could not buy, then protection. The bars trigger judged each bar
        when it was stored, with the positions held then: from the bar of a fill on,
        `trading.on_bar` judges this account's positions again on every bar of the batch
        (a position opened on one bar of a catch-up has its stop judged on the later
        ones; since 0004_09 a position is judged only on bars closing after its mark or
        its opening fill, so a bar already judged is not judged twice), and the
        protective orders it fires fill on the bar that fired them before the next bar."""
        judging = False
        for bar_row in rows:
            judging = self._settle_bar(routed, inst, bar_row) or judging
            if judging and self._protect_paper(routed, inst, bar_row):
                self._settle_bar(routed, inst, bar_row)  # the exits it fired fill on it

    def _settle_bar(self, routed: RoutedAccount, inst: PaperInstrument,
                    bar_row: tuple[Any, ...]) -> bool:
        """What an account's open paper orders do on one bar; True when a fill was
        applied (a position was opened or changed on it).

        The paper broker judges the orders of an instrument one after the other, each with
        the cash and the position the fills before it left. A fill that is not applied
        (its order finished since the book was read: a trader's cancel in between; or the
        ledger refused it) makes the outcomes after it wrong (a buy limited by cash that
        fill was to spend, a reduce-only capped by a position it was to open), so they are
        dropped and the bar is judged again from the ledger as it is now: the orders still
        open fill on this bar as they would have without that one. Each order is settled
        once per bar (an order judged again is skipped: its outcome is booked already)."""
        broker = routed.broker
        assert isinstance(broker, PaperBroker)
        filled = False
        settled: set[int] = set()
        outcomes = broker.settle(self._c, inst, [bar_row])
        while outcomes:
            stale = False
            for outcome in outcomes:
                settled.add(outcome.order_id)
                broker.forget(outcome.order_id)  # (settled on this bar: its time is done)
                if outcome.fill is not None and not self._apply_paper_fill(routed, outcome):
                    stale = True  # (the rest of this bar was judged with that fill in it)
                    break
                filled = filled or outcome.fill is not None
                if outcome.cancel is not None:
                    self._call("cancel_order", outcome.client_order_id, outcome.cancel[:500])
            outcomes = [o for o in broker.settle(self._c, inst, [bar_row])
                        if o.order_id not in settled] if stale else []
        return filled

    def _protect_paper(self, routed: RoutedAccount, inst: PaperInstrument,
                       bar_row: tuple[Any, ...]) -> bool:
        """`trading.on_bar` for this account's positions on one bar, and the protective
        orders it fires taken into the paper book in the same transaction (no other
        router can take them from the queue meanwhile; their messages are archived when
        read, the orders settled by then). True when it fired any."""
        ts, o, h, low, c, _v = bar_row
        inside = self._c.info.transaction_status != IDLE
        for attempt in range(1, 6):
            booked: list[Order] = []
            cancelled: list[tuple[Order, dict[str, Any]]] = []
            try:
                with self._c.transaction():
                    row = self._c.execute(
                        "SELECT trading.on_bar(%s, %s, %s, %s, %s, %s, %s, %s)",
                        (inst.instrument_id, inst.timeframe, ts, o, h, low, c,
                         routed.account_id)).fetchone()
                    fired = [int(i) for i in (row[0] if row and row[0] else [])]
                    orders = self._orders(fired)
                    for order_id in fired:
                        order = orders.get(order_id)
                        if order is None or order.status != "created":
                            continue
                        answer = self._call("acknowledge_order", order.client_order_id,
                                            f"paper-{order.client_order_id}")
                        if isinstance(answer, dict) and answer.get("status") == "cancelled":
                            cancelled.append((order, answer))
                        else:
                            order.status = "submitted"
                            booked.append(order)
                break
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                if inside or attempt == 5:
                    raise  # inside a transaction block: its owner repeats the whole of it
                time.sleep(0.005 * attempt * random.random())
        for order, gate in cancelled:
            self._cancelled(order, gate)
        for order in booked:
            self._emit("order.acknowledged", order,
                       broker_order_id=f"paper-{order.client_order_id}")
        return bool(booked)

    def _apply_paper_fill(self, routed: RoutedAccount, fill: PaperFill) -> bool:
        """Apply a paper fill; False when it is not applied. An order finished since the
        paper broker read the book (cancelled by a trader meanwhile, `trading.request_cancel`)
        takes no fill, and nothing is wrong: skipped, said in the log only. Any other
        refusal of the ledger cancels the order with the ledger's reason (it could never
        be filled as it is) and is reported: one order's refusal must not stop the router
        for every account."""
        inside = self._c.info.transaction_status != IDLE
        try:
            if inside:  # a savepoint: the refusal must not abort the caller's transaction
                with self._c.transaction():
                    result = self._apply(fill.payload())
            else:
                result = self._apply(fill.payload())
        except _REFUSED as exc:
            reason = str(exc).splitlines()[0]
            row = self._c.execute("SELECT status::text FROM trading.orders WHERE order_id = %s",
                                  (fill.order_id,)).fetchone()
            if row is not None and row[0] in _TERMINAL:
                log.event(self.log, "paper fill skipped: the order is finished", 20,
                          account=routed.config.name, environment="paper",
                          order_id=fill.order_id, status=row[0])
                return False
            self._call("cancel_order", fill.client_order_id,
                       f"PAPER_FILL_REFUSED: {reason}"[:500])
            self.report("PAPER_FILL_REFUSED", f"{routed.config.name}: order "
                        f"{fill.client_order_id} cancelled, the ledger refused its paper fill: "
                        f"{reason}", account=routed.config.name)
            return False
        if result.get("status") == "applied" and fill.fill is not None:
            log.event(self.log, "fill.applied", account=routed.config.name,
                      environment="paper", order_id=fill.order_id,
                      quantity=str(fill.fill.quantity), price=str(fill.fill.price))
            if self.on_event is not None:
                self.on_event("fill.applied", {"account": routed.config.name,
                                               "order_id": fill.order_id,
                                               "quantity": str(fill.fill.quantity),
                                               "price": str(fill.fill.price)})
        return True

    def _accepted_bars(self, inst: PaperInstrument,
                       order_ids: list[int]) -> list[tuple[Any, ...]]:
        """The bars on which orders just taken into the paper book are settled: those
        after the paper resume point (or, with none, `_first_needed`), or after the
        earliest of the orders' signals (creations) when that is older, as `settle_many`
        settles them: an order queued while the router was behind fills on the first bar
        after its signal, not on the latest one. The latest bar at least, so an order
        no bar fills yet is seen while it is the latest (`PaperBroker._ready_after`)."""
        row = self._c.execute(
            "SELECT (SELECT at FROM runtime.cursors WHERE name = %s), "
            "min(COALESCE(s.ts, o.created_at)) FROM trading.orders o "
            "LEFT JOIN trading.signals s ON s.signal_id = o.signal_id "
            "WHERE o.order_id = ANY(%s)",
            (f"paper:{inst.instrument_id}:{inst.timeframe}", order_ids)).fetchone()
        resume, first = row if row is not None else (None, None)
        after = resume or self._first_needed(inst)
        if first is not None:
            first -= timedelta(microseconds=1)
            after = first if after is None else min(after, first)
        rows = [] if after is None else bars_after(self._c, inst, after)
        return rows or bars_after(self._c, inst, None)

    def _first_needed(self, inst: PaperInstrument) -> datetime | None:
        """With no resume point yet: just before the oldest open paper order's time (the
        bars after it may fill it), or None (the latest bar only). An order with no
        signal is timed as its paper broker times it (`PaperBroker._ready_after`): in a
        replayed session, by the latest bar when it entered the paper book, older than
        its creation (wall-clock now); the bar after that one may fill it."""
        brokers = {a.account_id: a.broker for a in self._paper}
        rows = self._c.execute(
            "SELECT o.order_id, o.account_id, COALESCE(s.ts, o.created_at), s.ts IS NULL "
            "FROM trading.orders o "
            "LEFT JOIN trading.signals s ON s.signal_id = o.signal_id "
            "WHERE o.account_id = ANY(%s) AND o.instrument_id = %s "
            "AND o.status IN ('submitted', 'partially_filled')",
            (list(brokers), inst.instrument_id)).fetchall()
        first = None
        for order_id, account_id, at, unsignalled in rows:
            at -= timedelta(microseconds=1)
            broker = brokers.get(int(account_id))
            if unsignalled and isinstance(broker, PaperBroker):
                ready = broker.ready_after(int(order_id))
                if ready is not None:
                    at = min(at, ready)
            first = at if first is None else min(first, at)
        return first

    def _catch_up(self) -> None:
        """Settle the bars no notification told us about: those stored while no router
        ran (or before this one listened), behind a paper resume point or an open order."""
        if not self._paper:
            return
        ids = [a.account_id for a in self._paper]
        rows = self._c.execute(
            "SELECT split_part(c.name, ':', 2)::bigint, split_part(c.name, ':', 3) "
            "FROM runtime.cursors c WHERE c.name ~ '^paper:[0-9]+:[0-9a-z]+$' "
            "AND c.at < (SELECT max(b.ts) FROM market.bars b "
            "            WHERE b.instrument_id = split_part(c.name, ':', 2)::bigint "
            "              AND b.timeframe::text = split_part(c.name, ':', 3)) "
            "UNION SELECT DISTINCT o.instrument_id, NULL FROM trading.orders o "
            "WHERE o.account_id = ANY(%s) AND o.status IN ('submitted', 'partially_filled')",
            (ids,)).fetchall()
        for instrument_id, _tf in rows:
            inst = self._instrument(int(instrument_id))
            if inst is None:
                continue
            last = self._c.execute(
                "SELECT max(ts) FROM market.bars WHERE instrument_id = %s AND timeframe = %s",
                (inst.instrument_id, inst.timeframe)).fetchone()
            if last and last[0] is not None:
                key = (inst.instrument_id, inst.timeframe)
                if key not in self._pending_bars or last[0] > self._pending_bars[key]:
                    self._pending_bars[key] = last[0]


