"""The notifier: audit events worth a human's attention, delivered to every channel.

It reads `audit.events` after its cursor (`runtime.cursors`), so it only ever sees what
was committed and can never hold up a trade: it runs in its own process or thread, and
trading never waits on it. The audit chain serialises its inserts (each takes the chain
head's row lock until commit), so event ids become visible in order and "after event N"
misses nothing.

Each channel has its own bounded queue, sender thread and cursor (`<cursor>:<channel>` in
`runtime.cursors`; the `<cursor>` row is the lowest of them): a slow or dead channel
delays only itself, and a restart repeats nothing to the healthy ones. A full queue stops
that channel's reading where it is (backpressure: nothing is dropped, the channel reads
on as it drains). A message is retried with exponential backoff; a refusal (HTTP 4xx but
429) is not retried; after `max_attempts` it is dropped for that channel and the outage is
recorded once with `runtime.report_error(kind='NOTIFY_FAILED')` (once per outage, not per
message: a dead bot must not flood the error table). A receiver's rate limit ("retry after
N s") pauses the channel that long and is not counted as an attempt. NOTIFY_FAILED errors
are never notified, so a failing channel cannot feed itself. A channel's cursor moves past
an event once it has delivered or given up its message (at every poll, and when the
notifier closes); after a crash the unsettled events are sent again (at least once),
never skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from typing import Any

import psycopg
from psycopg.types.json import Jsonb, set_json_loads

from db.errors import MmatsError
from workers.notify.channels import (
    PARSE_MODES,
    Channel,
    ChannelError,
    DiscordChannel,
    EmailChannel,
    Message,
    TelegramChannel,
    WebhookChannel,
)
from workers.runtime import log

ConnFactory = Callable[[], psycopg.Connection]
Sleep = Callable[[float], object]

# what `events = [...]` may name: a category, or one of the event types it covers
CATEGORIES: dict[str, tuple[str, ...]] = {
    "signal": ("signal.advisory",),
    "approved": ("signal.approved",),
    "order": ("order.created",),
    # not among the defaults: every cancellation is one, the gate's and the simulator's too
    "cancel": ("order.cancel_requested", "order.cancelled"),
    "fill": ("fill.applied",),
    "breaker": ("risk.breaker_tripped", "risk.breaker_reset"),
    "rejection": ("signal.rejected", "order.rejected"),
    "downgrade": ("account.downgraded",),
    "mismatch": ("reconcile.mismatch",),
    "error": ("worker.error",),
}
DEFAULT_CATEGORIES = ("signal", "fill", "breaker", "rejection", "downgrade", "mismatch",
                      "error")
EVENT_TYPES = frozenset(t for types in CATEGORIES.values() for t in types)
NOTIFY_FAILED = "NOTIFY_FAILED"
ENVIRONMENTS = ("paper", "live", "backtest")

_log = log.get("notify")


class NotifyConfigError(MmatsError):
    """The [notifications] configuration is invalid (the message names the key)."""


def resolve_events(names: Iterable[str], where: str = "events") -> frozenset[str]:
    """Audit event types for category names ("fill") and event types ("fill.applied")."""
    out: set[str] = set()
    for name in names:
        if isinstance(name, str) and name in CATEGORIES:
            out.update(CATEGORIES[name])
        elif isinstance(name, str) and name in EVENT_TYPES:
            out.add(name)
        else:
            raise NotifyConfigError(
                f"{where}: unknown event {name!r} (known: {', '.join(CATEGORIES)}, or an "
                "event type such as fill.applied)")
    return frozenset(out)


DEFAULT_EVENTS = resolve_events(DEFAULT_CATEGORIES)


@dataclass(frozen=True)
class Subscription:
    """A channel, the audit event types it wants, and (if not the notifier's) the size of
    its queue."""

    channel: Channel
    events: frozenset[str] = DEFAULT_EVENTS
    queue_size: int | None = None


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class AuditEvent:
    """An audit event with what it is about: the account, its environment, the symbol."""

    event_id: int
    ts: datetime
    event_type: str
    entity: str
    entity_id: str | None
    payload: Mapping[str, Any]
    account: str | None = None
    environment: str | None = None
    symbol: str | None = None
    strategy: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


def _ref(entity: str) -> str:
    return f"CASE WHEN e.entity = '{entity}' THEN e.entity_id::bigint END"


# Each audit event's account, found through its entity (the signal, fill, order, risk
# event or worker error it records); the CASE keeps other entities' ids from being cast.
_READ = f"""
SELECT e.event_id, e.ts, e.event_type, e.entity, e.entity_id, e.payload,
       a.name, a.environment::text, x.symbol, x.strategy, x.detail
FROM audit.events e
LEFT JOIN LATERAL (
    SELECT s.account_id, i.symbol, st.name AS strategy, jsonb_build_object(
               'action', s.action, 'size', s.size, 'confidence', s.confidence,
               'stop_loss', s.stop_loss, 'take_profit', s.take_profit,
               'trailing_stop', s.trailing_stop, 'reasoning', s.reasoning) AS detail
    FROM trading.signals s
    JOIN market.instruments i ON i.instrument_id = s.instrument_id
    JOIN trading.strategies st ON st.strategy_id = s.strategy_id
    WHERE s.signal_id = {_ref('trading.signals')}
    UNION ALL
    SELECT f.account_id, i.symbol, st.name, '{{}}'::jsonb
    FROM trading.fills f
    JOIN market.instruments i ON i.instrument_id = f.instrument_id
    LEFT JOIN trading.strategies st ON st.strategy_id = f.strategy_id
    WHERE f.fill_id = {_ref('trading.fills')}
    UNION ALL
    SELECT o.account_id, i.symbol, st.name, jsonb_build_object('order_type', o.order_type)
    FROM trading.orders o
    JOIN market.instruments i ON i.instrument_id = o.instrument_id
    LEFT JOIN trading.strategies st ON st.strategy_id = o.strategy_id
    WHERE o.order_id = {_ref('trading.orders')}
    UNION ALL
    SELECT ac.account_id, NULL, NULL, '{{}}'::jsonb FROM trading.accounts ac
    WHERE ac.account_id = {_ref('trading.accounts')}
    UNION ALL
    SELECT r.account_id, NULL, NULL, '{{}}'::jsonb FROM risk.events r
    WHERE r.event_id = {_ref('risk.events')}
    UNION ALL
    SELECT r.account_id, NULL, NULL, '{{}}'::jsonb FROM runtime.errors r
    WHERE r.error_id = {_ref('runtime.errors')}
    LIMIT 1
) x ON true
LEFT JOIN trading.accounts a ON a.account_id = x.account_id
WHERE e.event_id > %(after)s AND e.event_id <= %(upto)s AND e.event_type = ANY(%(types)s)
  AND NOT (e.event_type = 'worker.error' AND e.payload ->> 'kind' = '{NOTIFY_FAILED}')
  AND (a.environment IS NULL OR a.environment::text = ANY(%(environments)s))
ORDER BY e.event_id
LIMIT %(limit)s
"""


def _num(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _join(parts: Iterable[str | None]) -> str:
    return ", ".join(p for p in parts if p)


def _code_reason(code: Any, reason: Any) -> str:
    if code and reason:
        return f"{code}: {reason}"
    return str(code or reason or "no reason given")


def format_event(event: AuditEvent) -> Message:
    """The message for one audit event: a subject line and one paragraph that names the
    account and its environment."""
    p = event.payload
    d = event.detail
    env = event.environment or "unknown environment"
    who = f"Account {event.account} ({env})" if event.account else "MMATS"
    tag = f"[{(event.environment or '?').upper()}] {event.account}" if event.account else \
        "[MMATS]"
    symbol = event.symbol or "?"
    kind = event.event_type
    if kind.startswith("signal."):
        action = str(d.get("action") or "?").upper()
        what = f"{action} {symbol}" + (f" from strategy {event.strategy}" if event.strategy
                                       else "")
        extras = _join([f"size {_num(d['size'])}" if d.get("size") is not None else None,
                        f"confidence {_num(d['confidence'])}"
                        if d.get("confidence") is not None else None,
                        f"stop-loss {_num(d['stop_loss'])}"
                        if d.get("stop_loss") is not None else None,
                        f"take-profit {_num(d['take_profit'])}"
                        if d.get("take_profit") is not None else None])
        extras = f" ({extras})" if extras else ""
        if kind == "signal.advisory":
            subject = f"{tag}: advisory {action} {symbol}"
            reasoning = f" Reasoning: {d['reasoning']}." if d.get("reasoning") else ""
            text = (f"{who}: advisory signal {what}{extras}.{reasoning} Recorded only: an "
                    "advisory account places no orders.")
        elif kind == "signal.approved":
            subject = f"{tag}: {action} {symbol} approved"
            order = _join([f"order {p.get('order_id')}" if p.get("order_id") else None,
                           f"{p.get('side')} {_num(p.get('quantity'))}" if p.get("side")
                           else None,
                           f"at about {_num(p.get('reference_price'))}"
                           if p.get("reference_price") is not None else None])
            text = f"{who}: signal {what}{extras} approved" + (f": {order}." if order else ".")
        else:
            subject = f"{tag}: {action} {symbol} rejected"
            text = (f"{who}: signal {what}{extras} rejected by the risk gate: "
                    f"{_code_reason(p.get('reason_code'), p.get('reason'))}.")
    elif kind == "order.created":
        subject = f"{tag}: order {event.entity_id} {p.get('side')} {symbol}"
        how = _join([str(p.get("type") or d.get("order_type") or "market"),
                     f"reference price {_num(p['reference_price'])}"
                     if p.get("reference_price") is not None else None])
        text = (f"{who}: order {event.entity_id} created: {p.get('side')} "
                f"{_num(p.get('quantity'))} {symbol} ({how}).")
    elif kind == "order.rejected":
        subject = f"{tag}: order {event.entity_id} rejected"
        streak = p.get("consecutive_rejections")
        text = (f"{who}: order {event.entity_id} ({symbol}) rejected by the broker: "
                f"{_code_reason(p.get('reason_code'), p.get('reason'))}"
                + (f" ({streak} consecutive rejections)." if streak else "."))
    elif kind == "order.cancel_requested":
        subject = f"{tag}: cancel of order {event.entity_id} requested"
        text = (f"{who}: cancel of order {event.entity_id} ({symbol}, {p.get('status')}) "
                f"requested: {p.get('reason') or 'no reason given'}; the order stays open "
                "until its venue confirms.")
    elif kind == "order.cancelled":
        subject = f"{tag}: order {event.entity_id} cancelled"
        text = (f"{who}: order {event.entity_id} ({symbol}) cancelled (was {p.get('from')}): "
                f"{p.get('reason') or 'no reason given'}.")
    elif kind == "fill.applied":
        subject = f"{tag}: filled {p.get('side')} {_num(p.get('quantity'))} {symbol}"
        extras = _join([f"commission {_num(p['commission'])}"
                        if p.get("commission") is not None else None,
                        f"realized P&L {_num(p['realized_pnl'])}"
                        if p.get("realized_pnl") is not None else None])
        text = (f"{who}: filled {p.get('side')} {_num(p.get('quantity'))} {symbol} at "
                f"{_num(p.get('price'))} on order {p.get('order_id')}"
                + (f" ({extras})." if extras else "."))
    elif kind == "risk.breaker_tripped":
        subject = f"{tag}: circuit breaker {p.get('mode')}"
        closing = p.get("closing_orders") or []
        cancelled = p.get("cancelled_orders") or []
        done = _join([f"closing with {len(closing)} order(s)" if closing else None,
                      f"{len(cancelled)} entry order(s) cancelled" if cancelled else None])
        text = (f"{who}: circuit breaker tripped to {p.get('mode')} (was "
                f"{p.get('previous')}): {p.get('reason')}" + (f"; {done}." if done else "."))
    elif kind == "risk.breaker_reset":
        subject = f"{tag}: circuit breaker reset"
        text = f"{who}: circuit breaker reset to OK (was {p.get('previous')})."
    elif kind == "account.downgraded":
        subject = f"{tag}: downgraded to {p.get('to') or 'advisory'}"
        text = (f"{who}: switched to {p.get('to') or 'advisory'} mode ({p.get('reason')}): "
                "signals are recorded, no orders are placed.")
    elif kind == "reconcile.mismatch":
        subject = f"{tag}: reconciliation {p.get('kind')}"
        text = f"{who}: reconciliation mismatch {p.get('kind')}: {p.get('message')}."
    elif kind == "worker.error":
        subject = f"{tag}: {p.get('worker')} {p.get('kind')}"
        about = f" on account {event.account} ({env})" if event.account else ""
        text = f"Worker {p.get('worker')} reported {p.get('kind')}{about}: {p.get('message')}."
    else:
        subject = f"{tag}: {kind}"
        text = f"{who}: {kind} {json.dumps(dict(p), default=str, sort_keys=True)}."
    return Message(event=kind, subject=subject, text=text, account=event.account,
                   environment=event.environment, event_id=event.event_id,
                   ts=event.ts.astimezone(UTC).isoformat(), payload=dict(p))


# --------------------------------------------------------------------------- senders
@dataclass(frozen=True)
class _Item:
    event_id: int
    message: Message


class _Sender:
    """One channel: its queue and thread (retries, backoff, rate limits, giving up,
    reporting outages), how far it has read (`read_to`), what it holds (`pending`: queued
    or being sent) and its own cursor (`<cursor>:<channel name>`)."""

    def __init__(self, notifier: Notifier, subscription: Subscription, queue_size: int) -> None:
        self.notifier = notifier
        self.channel = subscription.channel
        self.events = subscription.events
        self.queue: queue.Queue[_Item | None] = queue.Queue(
            maxsize=subscription.queue_size or queue_size)
        self.cursor_name = f"{notifier.cursor_name}:{self.channel.name}"
        self.read_to = 0                  # every event up to here is queued, sent or not ours
        self.cursor: int | None = None    # the stored cursor (None: not stored yet)
        self.pending: set[int] = set()    # queued or being sent (under notifier._cond)
        self.delivered = 0
        self.dropped = 0
        self._failing = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"mmats-notify-{self.channel.name}")

    @property
    def name(self) -> str:
        return self.channel.name

    def room(self) -> int:
        """Free places in the queue (only the reader puts, so it can only grow meanwhile)."""
        return max(0, self.queue.maxsize - self.queue.qsize())

    def position(self) -> int:
        """How far this channel's cursor may go: before the first message it still holds,
        else as far as it has read."""
        with self.notifier._cond:
            return min(self.pending) - 1 if self.pending else self.read_to

    def take(self, events: Sequence[AuditEvent], end: int,
             messages: dict[int, Message]) -> bool:
        """Queue this channel's events of a read that covered everything up to `end`, as
        far as its queue has room: a full queue stops its reading there (backpressure,
        nothing dropped). True if it took all of them."""
        if self.notifier._closing.is_set():
            return False
        room = self.room()
        for event in events:
            if event.event_id <= self.read_to or event.event_type not in self.events:
                continue
            if room == 0:
                self.read_to = event.event_id - 1  # read again once the queue has room
                return False
            message = messages.get(event.event_id)
            if message is None:
                message = messages[event.event_id] = format_event(event)
            with self.notifier._cond:
                self.pending.add(event.event_id)
            self.queue.put_nowait(_Item(event.event_id, message))
            room -= 1
        self.read_to = max(self.read_to, end)
        return True

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None or self.notifier._closing.is_set():
                return  # unsettled: sent again after a restart
            if self._deliver(item) is None:
                return
            self.notifier._settle(self, item.event_id)

    def _delay(self, attempt: int, exc: BaseException) -> float:
        n = self.notifier
        delay = min(n.backoff_max, n.backoff * 2 ** (attempt - 1))
        asked = exc.retry_after if isinstance(exc, ChannelError) else None
        if asked is not None:  # the receiver's own wait, honoured in full
            delay = max(delay, min(asked, n.retry_after_max))
        return delay

    def _deliver(self, item: _Item) -> bool | None:
        """True: delivered; False: given up; None: the notifier is closing."""
        n = self.notifier
        error = "no attempt made"
        attempt = 0
        while attempt < n.max_attempts:
            try:
                self.channel.send(item.message)
            except Exception as exc:  # a channel's bug must not kill its thread
                error = log.redact(f"{type(exc).__name__}: {exc}" if not
                                   isinstance(exc, ChannelError) else str(exc))
                if isinstance(exc, ChannelError) and exc.rate_limited:
                    # "too many requests, wait N s": the whole channel waits that long
                    # (every message behind this one too); not an attempt
                    wait = max(min(exc.retry_after or 0.0, n.retry_after_max), n.backoff)
                    log.event(_log, "notification channel rate limited, pausing",
                              logging.WARNING, channel=self.name, event_id=item.event_id,
                              retry_in=wait, error=error)
                    n._sleep(wait)
                    if n._closing.is_set():
                        return None
                    continue
                attempt += 1
                if attempt >= n.max_attempts or (isinstance(exc, ChannelError)
                                                 and exc.permanent):
                    break  # a refusal (4xx) is not retried: the same request fails again
                delay = self._delay(attempt, exc)
                log.event(_log, "notification failed, retrying", logging.WARNING,
                          channel=self.name, event_id=item.event_id, attempt=attempt,
                          retry_in=delay, error=error)
                n._sleep(delay)
                if n._closing.is_set():
                    return None
                continue
            with self._lock:
                recovered = self._failing
                self._failing = False
                self.delivered += 1
            if recovered:
                log.event(_log, "notification channel recovered", channel=self.name,
                          dropped=self.dropped)
            return True
        self._give_up(item, error, attempt)
        return False

    def _give_up(self, item: _Item, error: str, attempts: int) -> None:
        with self._lock:
            self.dropped += 1
            first = not self._failing
            self._failing = True
        log.event(_log, "notification dropped", logging.ERROR, channel=self.name,
                  event_id=item.event_id, event_type=item.message.event, attempts=attempts,
                  error=error)
        if first:
            self.notifier._report_failure(self.channel, item, error, attempts)


# --------------------------------------------------------------------------- notifier
class Notifier:
    """Reads audit events after its cursors and delivers them to its channels.

    `channels` are Channels (sent the notifier's `events`) or Subscriptions (each with
    its own events). `sleep` waits between retries (inject a no-op in tests); by default
    it returns early when the notifier closes. Each channel has its own cursor
    (`<cursor_name>:<channel name>`), so a dead channel holds back only itself; the
    `cursor_name` cursor is the lowest of them. With no cursor stored yet, the notifier
    starts at the newest event (history is not replayed) unless `replay` is true; a
    channel without a cursor of its own starts where the shared cursor is when no channel
    has one yet (an upgrade from one shared cursor), else as a new channel. Only events of
    accounts in `environments` are sent (a backtest's thousands of fills are not news);
    events about no account (a feed's error) always are. A receiver's "too many
    requests, retry after N s" pauses its channel N s (at most `retry_after_max`), not
    counted as an attempt.
    """

    def __init__(self, conn_factory: ConnFactory, channels: Sequence[Channel | Subscription],
                 *, events: Iterable[str] = DEFAULT_CATEGORIES, cursor_name: str = "notifier",
                 worker: str = "notifier", poll_interval: float = 2.0,
                 sleep: Sleep | None = None, max_attempts: int = 5, backoff: float = 1.0,
                 backoff_max: float = 60.0, queue_size: int = 1000, batch_size: int = 500,
                 replay: bool = False, environments: Iterable[str] = ("paper", "live"),
                 retry_after_max: float = 3600.0) -> None:
        default = resolve_events(events)
        subs = [c if isinstance(c, Subscription) else Subscription(c, default)
                for c in channels]
        names = [s.channel.name for s in subs]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise NotifyConfigError(f"two notification channels are named {duplicate!r}")
        if max_attempts < 1 or queue_size < 1 or batch_size < 1:
            raise NotifyConfigError("max_attempts, queue_size and batch_size must be >= 1")
        too_long = next((n for n in names if len(f"{cursor_name}:{n}") > 200), None)
        if too_long is not None:
            raise NotifyConfigError(f"channel name {too_long[:40]!r}...: too long for its "
                                    "cursor (cursor and channel name: 200 characters)")
        self._conn_factory = conn_factory
        self.cursor_name = cursor_name
        self.worker = worker
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.retry_after_max = retry_after_max
        self.batch_size = batch_size
        self.replay = replay
        self.environments = tuple(environments)
        unknown = sorted(set(self.environments) - set(ENVIRONMENTS))
        if unknown:
            raise NotifyConfigError(f"environments: unknown environment {unknown[0]!r} "
                                    f"(known: {', '.join(ENVIRONMENTS)})")
        self._closing = threading.Event()
        self._sleep: Sleep = sleep if sleep is not None else self._closing.wait
        self._cond = threading.Condition()
        self._reading = threading.RLock()  # one reader at a time: it alone fills the queues
        self._senders = [_Sender(self, s, queue_size) for s in subs]
        self.events = frozenset(t for s in subs for t in s.events)
        self._read_to: int | None = None  # the furthest any channel has read
        self._cursor: int | None = None
        self._more = False
        self._started = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, conn_factory: ConnFactory, table: Mapping[str, Any], *,
                    env: Mapping[str, str] | None = None, **overrides: Any) -> Notifier:
        """A notifier for the [notifications] table of mmats.toml (secrets from `env`,
        os.environ by default); keyword arguments override the table's settings."""
        config = parse_config(table, env, sleep=overrides.get("sleep"))
        options: dict[str, Any] = {**config.options, **overrides}
        return cls(conn_factory, config.subscriptions, **options)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the sender threads (poll_once does it when needed)."""
        if not self._started:
            self._started = True
            for sender in self._senders:
                sender.thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the senders, then move each channel's cursor over what it delivered or
        gave up (a graceful stop repeats nothing); what they have not settled is sent
        again after a restart."""
        self._closing.set()
        with self._reading:  # after the poll in progress, if any
            for sender in self._senders:
                # a full queue: the sender checks _closing after its next message
                with contextlib.suppress(queue.Full):
                    sender.queue.put_nowait(None)
        for sender in self._senders:
            if sender.thread.is_alive():
                sender.thread.join(timeout)
        if self._read_to is None:
            return
        try:
            with self._reading, self._connect() as conn:
                self._advance(conn)
        except psycopg.Error as exc:  # a crash-like stop: at least once, never skipped
            log.event(_log, "cannot move the notifier's cursors at close", logging.ERROR,
                      error=log.redact(str(exc).splitlines()[0] if str(exc) else
                                       type(exc).__name__))

    def __enter__(self) -> Notifier:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll until `stop` is set (a database outage is logged and polled through)."""
        stop = stop or threading.Event()
        self.start()
        while not stop.is_set() and not self._closing.is_set():
            try:
                self.poll_once()
            except psycopg.Error as exc:
                log.event(_log, "notifier poll failed", logging.ERROR,
                          error=log.redact(str(exc).splitlines()[0] if str(exc) else
                                           type(exc).__name__))
                self._more = False
            if not self._more:
                stop.wait(self.poll_interval)

    # ------------------------------------------------------------------ polling
    def _connect(self) -> psycopg.Connection:
        conn = self._conn_factory()
        set_json_loads(partial(json.loads, parse_float=Decimal), conn)
        return conn

    def poll_once(self) -> int:
        """Read the next events of each channel whose queue has room, hand them to the
        queues and move the cursors over what is settled. Returns how many events were
        read."""
        self.start()
        with self._reading, self._connect() as conn:
            if self._read_to is None:
                self._position(conn)
            upto_row = conn.execute("SELECT COALESCE(max(event_id), 0) FROM audit.events"
                                    ).fetchone()
            upto = int(upto_row[0]) if upto_row else 0
            read = self._pump(conn, upto, self._senders)
            self._advance(conn)
        return read

    def _pump(self, conn: psycopg.Connection, upto: int, senders: Sequence[_Sender]) -> int:
        """Read for `senders` (those with room), each from where it stopped, up to event
        `upto`; channels at the same place share one read."""
        groups: dict[int, list[_Sender]] = {}
        for sender in senders:
            if sender.room() > 0 and sender.read_to < upto:
                groups.setdefault(sender.read_to, []).append(sender)
        seen: set[int] = set()
        more = False
        messages: dict[int, Message] = {}
        for after, group in sorted(groups.items()):
            types = sorted({t for s in group for t in s.events})
            rows = conn.execute(_READ, {"after": after, "upto": upto, "types": types,
                                        "environments": list(self.environments),
                                        "limit": self.batch_size}).fetchall() if types else []
            full = len(rows) == self.batch_size
            end = int(rows[-1][0]) if full else upto
            events = [AuditEvent(
                event_id=row[0], ts=row[1], event_type=row[2], entity=row[3],
                entity_id=row[4], payload=row[5] or {}, account=row[6], environment=row[7],
                symbol=row[8], strategy=row[9], detail=row[10] or {}) for row in rows]
            seen.update(e.event_id for e in events)
            for sender in group:
                took_all = sender.take(events, end, messages)
                more = more or (full and took_all)
            self._read_to = max(self._read_to or 0, end)
        self._more = more
        return len(seen)

    def _position(self, conn: psycopg.Connection) -> None:
        """Each channel's starting point: its own cursor; without one, the shared cursor
        when no channel has its own yet (one shared cursor before), else the newest event
        (or the first, with `replay`)."""
        names = [s.cursor_name for s in self._senders]
        stored = {name: int(seq) for name, seq in conn.execute(
            "SELECT name, seq FROM runtime.cursors WHERE name = ANY(%s) AND seq IS NOT NULL",
            ([self.cursor_name, *names],)).fetchall()}
        newest_row = conn.execute("SELECT COALESCE(max(event_id), 0) FROM audit.events"
                                  ).fetchone()
        newest = int(newest_row[0]) if newest_row else 0
        shared = stored.get(self.cursor_name)
        own = any(name in stored for name in names)
        fresh = 0 if self.replay else newest
        for sender in self._senders:
            if sender.cursor_name in stored:
                sender.cursor = sender.read_to = stored[sender.cursor_name]
            elif shared is not None and not own:
                sender.read_to = shared
            else:
                sender.read_to = fresh
        self._cursor = shared
        positions = [s.read_to for s in self._senders]
        self._read_to = max(positions) if positions else (shared if shared is not None
                                                          else fresh)

    def _settle(self, sender: _Sender, event_id: int) -> None:
        with self._cond:
            sender.pending.discard(event_id)
            self._cond.notify_all()

    def _advance(self, conn: psycopg.Connection) -> None:
        """Move each channel's cursor to its position, and the shared one to the lowest."""
        if self._read_to is None:
            return
        now = datetime.now(UTC)
        positions: list[int] = []
        for sender in self._senders:
            target = sender.position()
            if sender.cursor is None or target > sender.cursor:
                conn.execute("SELECT runtime.advance_cursor(%s, %s, %s)",
                             (sender.cursor_name, target, now))
                sender.cursor = target
            positions.append(sender.cursor)
        lowest = min(positions) if positions else self._read_to
        if self._cursor is None or lowest > self._cursor:
            conn.execute("SELECT runtime.advance_cursor(%s, %s, %s)",
                         (self.cursor_name, lowest, now))
            self._cursor = lowest

    def _behind(self) -> list[_Sender]:
        """Channels a full queue stopped before the furthest point read."""
        upto = self._read_to or 0
        return [s for s in self._senders if s.read_to < upto]

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every message read so far is delivered or given up (the channels a
        full queue held back are fed as their queues drain), then move the cursors.
        False if `timeout` (seconds) ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        done = False
        while True:
            behind = self._behind()
            if any(s.room() > 0 for s in behind) and self._read_to is not None:
                with self._reading, self._connect() as conn:
                    self._pump(conn, self._read_to, behind)
                behind = self._behind()
            with self._cond:
                done = not behind and not any(s.pending for s in self._senders)
            left = None if deadline is None else deadline - time.monotonic()
            if done or (left is not None and left <= 0):
                break
            with self._cond:
                self._cond.wait(0.05 if left is None else min(0.05, left))
        with self._reading, self._connect() as conn:
            self._advance(conn)
        return done

    @property
    def cursor(self) -> int | None:
        """The last event id every channel's stored cursor has passed (None before the
        first poll)."""
        return self._cursor

    def cursors(self) -> dict[str, int | None]:
        """Each channel's stored cursor (None before it is first stored)."""
        return {s.name: s.cursor for s in self._senders}

    def stats(self) -> dict[str, dict[str, int]]:
        """Per channel: messages delivered, dropped, waiting."""
        return {s.name: {"delivered": s.delivered, "dropped": s.dropped,
                         "queued": s.queue.qsize()} for s in self._senders}

    # ------------------------------------------------------------------ failures
    def _report_failure(self, channel: Channel, item: _Item, error: str, attempts: int) -> None:
        kind = getattr(channel, "kind", type(channel).__name__)
        text = (f"notification channel {channel.name} ({kind}) gave up on event "
                f"{item.event_id} ({item.message.event}) after {attempts} attempt(s): {error}"
                "; further failures are logged until it recovers")
        details = {"channel": channel.name, "channel_type": kind, "event_id": item.event_id,
                   "event_type": item.message.event, "attempts": attempts, "error": error}
        try:
            with self._conn_factory() as conn:
                conn.execute("SELECT runtime.report_error(%s, %s, %s, %s, %s)",
                             (self.worker, NOTIFY_FAILED, log.redact(text)[:2000],
                              item.message.account, Jsonb(log.redact_fields(details))))
        except psycopg.Error as exc:
            log.event(_log, "cannot record the notification failure", logging.ERROR,
                      channel=channel.name, error=log.redact(str(exc)))


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class NotifierConfig:
    """The parsed [notifications] table: subscriptions plus the Notifier's options."""

    subscriptions: tuple[Subscription, ...]
    options: Mapping[str, Any]


_TOP_KEYS = {"events", "channels", "poll_interval", "max_attempts", "backoff", "backoff_max",
             "queue_size", "batch_size", "cursor", "replay", "environments"}
_COMMON_KEYS = {"type", "name", "events", "timeout", "deadline", "queue_size"}
_CHANNEL_KEYS = {
    "telegram": {"chat_id", "token_env", "parse_mode"},
    "discord": {"webhook_env"},
    "webhook": {"url", "url_env", "secret_env", "signature_header"},
    "email": {"host", "port", "from", "to", "username", "password_env", "starttls", "ssl",
              "subject_prefix"},
}


def _number(table: Mapping[str, Any], key: str, where: str, default: float, *,
            integer: bool = False, minimum: float = 0.0) -> Any:
    value = table.get(key, default)
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or value < minimum:
        kind = "an integer" if integer else "a number"
        raise NotifyConfigError(f"{where}.{key}: must be {kind} >= {minimum:g}, got {value!r}")
    return value


def _text(table: Mapping[str, Any], key: str, where: str, default: str | None = None,
          *, required: bool = False) -> str | None:
    value = table.get(key, default)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise NotifyConfigError(f"{where}.{key}: " + ("is required" if key not in table
                                                      else f"must be text, got {value!r}"))
    return value


def _secret(table: Mapping[str, Any], key: str, where: str, env: Mapping[str, str],
            *, required: bool = True) -> str | None:
    var = _text(table, key, where, required=required)
    if var is None:
        return None
    value = env.get(var)
    if not value:
        raise NotifyConfigError(f"{where}.{key}: environment variable {var} is not set")
    log.register_secret(value)
    return value


def _events(table: Mapping[str, Any], where: str, default: frozenset[str]) -> frozenset[str]:
    if "events" not in table:
        return default
    names = table["events"]
    if not isinstance(names, list) or not names:
        raise NotifyConfigError(f"{where}.events: must be a non-empty list, e.g. "
                                '["fill", "breaker"]')
    return resolve_events(names, f"{where}.events")


def build_channel(spec: Mapping[str, Any], where: str, env: Mapping[str, str],
                  default_name: str, sleep: Sleep | None = None) -> Channel:
    """One channel from its [[notifications.channels]] table."""
    kind = spec.get("type")
    if kind not in _CHANNEL_KEYS:
        raise NotifyConfigError(f"{where}.type: must be one of {', '.join(_CHANNEL_KEYS)}, "
                                f"got {kind!r}")
    unknown = sorted(set(spec) - _COMMON_KEYS - _CHANNEL_KEYS[kind])
    if unknown:
        known = ", ".join(sorted(_COMMON_KEYS | _CHANNEL_KEYS[kind]))
        raise NotifyConfigError(f"{where}.{unknown[0]}: unknown key for a {kind} channel "
                                f"(known: {known})")
    name = _text(spec, "name", where, default_name) or default_name
    timeout = float(_number(spec, "timeout", where, 5.0, minimum=0.1))
    deadline = float(_number(spec, "deadline", where, max(30.0, timeout), minimum=timeout))
    if kind == "telegram":
        chat = spec.get("chat_id")
        if isinstance(chat, bool) or not isinstance(chat, str | int) or chat == "":
            raise NotifyConfigError(f"{where}.chat_id: " + (
                "is required" if chat is None else f"must be text or a number, got {chat!r}"))
        parse_mode = _text(spec, "parse_mode", where)
        if parse_mode not in (None, *PARSE_MODES):
            raise NotifyConfigError(f"{where}.parse_mode: must be HTML, MarkdownV2 or "
                                    f"Markdown, got {parse_mode!r}")
        token = _secret(spec, "token_env", where, env)
        assert token is not None
        return TelegramChannel(name, token, str(chat), parse_mode=parse_mode, timeout=timeout,
                               deadline=deadline)
    if kind == "discord":
        url = _secret(spec, "webhook_env", where, env)
        assert url is not None
        return DiscordChannel(name, url, timeout=timeout, sleep=sleep or time.sleep,
                              deadline=deadline)
    if kind == "webhook":
        if ("url" in spec) == ("url_env" in spec):
            raise NotifyConfigError(f"{where}.url: give exactly one of url and url_env "
                                    "(url_env when the URL holds a secret)")
        plain = _text(spec, "url", where)
        url = plain or _secret(spec, "url_env", where, env)
        assert url is not None
        if not url.startswith(("http://", "https://")):
            raise NotifyConfigError(f"{where}.{'url' if plain else 'url_env'}: must be an "
                                    "http:// or https:// URL")
        return WebhookChannel(name, url, secret=_secret(spec, "secret_env", where, env,
                                                        required=False),
                              signature_header=_text(spec, "signature_header", where,
                                                     "X-MMATS-Signature") or "",
                              timeout=timeout, url_is_secret=plain is None,
                              deadline=deadline)
    # email
    host = _text(spec, "host", where, required=True)
    starttls = spec.get("starttls", False)
    if not isinstance(starttls, bool):
        raise NotifyConfigError(f"{where}.starttls: must be true or false, got {starttls!r}")
    use_ssl = spec.get("ssl", False)
    if not isinstance(use_ssl, bool):
        raise NotifyConfigError(f"{where}.ssl: must be true or false, got {use_ssl!r}")
    if starttls and use_ssl:
        raise NotifyConfigError(f"{where}.ssl: give starttls = true (port 587) or ssl = true "
                                "(implicit TLS, port 465), not both")
    port = int(_number(spec, "port", where, 465 if use_ssl else 587 if starttls else 25,
                       integer=True, minimum=1))
    sender = _text(spec, "from", where, required=True)
    to = spec.get("to")
    recipients = [to] if isinstance(to, str) else to
    if not isinstance(recipients, list) or not recipients or not all(
            isinstance(r, str) and "@" in r for r in recipients):
        raise NotifyConfigError(f"{where}.to: must be an address or a list of addresses, "
                                f"got {to!r}")
    username = _text(spec, "username", where)
    password = _secret(spec, "password_env", where, env, required=False)
    if username and password is None:
        raise NotifyConfigError(f"{where}.password_env: is required with username")
    if username and not (starttls or use_ssl):
        raise NotifyConfigError(f"{where}.username: a login needs starttls = true or ssl = "
                                "true (the password would be sent in clear)")
    assert host is not None and sender is not None
    return EmailChannel(name, host, port, sender, recipients, username=username,
                        password=password, starttls=starttls, use_ssl=use_ssl,
                        timeout=timeout, deadline=deadline,
                        subject_prefix=_text(spec, "subject_prefix", where, "[MMATS]") or "")


def parse_config(table: Mapping[str, Any], env: Mapping[str, str] | None = None,
                 *, sleep: Sleep | None = None) -> NotifierConfig:
    """Parse the [notifications] table; errors are one line naming the bad key."""
    env = os.environ if env is None else env
    where = "notifications"
    if not isinstance(table, Mapping):
        raise NotifyConfigError(f"{where}: must be a table")
    unknown = sorted(set(table) - _TOP_KEYS)
    if unknown:
        raise NotifyConfigError(f"{where}.{unknown[0]}: unknown key (known: "
                                f"{', '.join(sorted(_TOP_KEYS))})")
    default_events = _events(table, where, DEFAULT_EVENTS)
    specs = table.get("channels", [])
    if not isinstance(specs, list) or not all(isinstance(s, Mapping) for s in specs):
        raise NotifyConfigError(f"{where}.channels: must be a list of tables "
                                "([[notifications.channels]])")
    types = [s.get("type") for s in specs]
    subs: list[Subscription] = []
    for i, spec in enumerate(specs):
        at = f"{where}.channels[{i}]"
        default_name = str(spec.get("type")) if types.count(spec.get("type")) == 1 else \
            f"{spec.get('type')}-{i + 1}"
        channel = build_channel(spec, at, env, default_name, sleep)
        if any(s.channel.name == channel.name for s in subs):
            raise NotifyConfigError(f"{at}.name: another channel is named {channel.name!r}")
        queue_size = _number(spec, "queue_size", at, 1, integer=True, minimum=1) \
            if "queue_size" in spec else None
        subs.append(Subscription(channel, _events(spec, at, default_events), queue_size))
    options: dict[str, Any] = {
        "poll_interval": float(_number(table, "poll_interval", where, 2.0, minimum=0.01)),
        "max_attempts": _number(table, "max_attempts", where, 5, integer=True, minimum=1),
        "backoff": float(_number(table, "backoff", where, 1.0)),
        "backoff_max": float(_number(table, "backoff_max", where, 60.0)),
        "queue_size": _number(table, "queue_size", where, 1000, integer=True, minimum=1),
        "batch_size": _number(table, "batch_size", where, 500, integer=True, minimum=1),
        "cursor_name": _text(table, "cursor", where, "notifier"),
    }
    replay = table.get("replay", False)
    if not isinstance(replay, bool):
        raise NotifyConfigError(f"{where}.replay: must be true or false, got {replay!r}")
    options["replay"] = replay
    if "environments" in table:
        envs = table["environments"]
        if not isinstance(envs, list) or not envs or not all(e in ENVIRONMENTS for e in envs):
            raise NotifyConfigError(f"{where}.environments: must be a non-empty list of "
                                    f"{', '.join(ENVIRONMENTS)}, got {envs!r}")
        options["environments"] = tuple(envs)
    if sleep is not None:
        options["sleep"] = sleep
    return NotifierConfig(tuple(subs), options)
