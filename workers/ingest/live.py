"""Live market data into market.bars: a backfill at start, then a poll after every bar.

`LiveIngest` serves `Subscription`s (symbol, market, venue, timeframe) from feeds keyed by
venue or by market (the venue wins). Subscriptions served by the same feed form a *feed
group*, which runs in its own thread on its own connection: a feed that fails, stalls or
is stopped never holds up another one, and each group keeps its own timeframes (1m crypto
beside 1h forex).

One poll of a subscription:

1. reads the last stored bar from market.bars, so after any error or reconnect the next
   fetch starts right after it and the gap fills itself;
2. fetches from the next bar (or `backfill_from`, or the latest closed bar when nothing is
   stored) up to now, page by page as the feed returns them; validates every bar (a bad
   one is refused with one log line and never written, a still-open one is never
   written, so strategies only ever see closed bars; a row the feed cannot even read is
   refused by the feed, with the same kind of line) and writes the rest in batches of one
   INSERT each, so the bars trigger (stops, marks, NOTIFY mmats_bars) runs once a batch;
3. checks the range it wrote for missing bars, within the market's sessions
   (calendars.py: NYSE, forex 24x5, crypto 24x7), asks the feed once more for each
   missing range, and reports what is still missing (runtime.report_error kind GAP);
4. flags a feed that answers but brings no new closed bar for more than
   `stale_after_bars` expected bars (FEED_STALE, once per episode; a closed market
   expects no bars, so a forex weekend or an NYSE holiday is never stale).

Retry / BackOff from a feed (the transport) and database errors back the whole group off
exponentially (full jitter, never less than `retry_after`): the rest of that pass is
skipped. A Stop (authentication, environment) stops that group only and is reported. A
Reject concerns one series (an unsupported timeframe, an unknown or delisted symbol): it
disables that series until a restart, reported once, like an instrument that cannot be
resolved, and the group's other series go on. Anything else is reported (once per
episode) and backs off that series only: the other series of the group are still polled
in the same pass. The writes use the owner's connection: writing bars is this worker's
job. `run()` is the real loop (one thread per group, waiting on an Event so that
`stop()` ends it promptly); `run_once()` and `poll()` drive the same steps
deterministically with an injected clock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from db.errors import MmatsError
from workers.brokers.errors import Reject, Retry, Stop
from workers.feeds.base import MAX_VALUE, TIMEFRAME_SECONDS, FeedBar, MarketDataFeed, misalignment
from workers.ingest.backoff import Backoff, BackoffPolicy, RandomSource
from workers.ingest.calendars import in_session, sessions
from workers.ingest.gaps import GapRange, missing_bars
from workers.ingest.instruments import (
    InstrumentSpec,
    check_timeframe,
    ensure_instrument,
    spec_for,
)
from workers.runtime.log import event, get, redact, redact_fields

log = get("ingest.live")

ConnFactory = Callable[[], psycopg.Connection]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NEW_YORK = ZoneInfo("America/New_York")
US = timedelta(microseconds=1)
# Looking this far around a bar always finds a trading session (the longest closure the
# calendars know is a week), so every "next expected bar" question has an answer.
HORIZON = timedelta(days=14)
BATCH_SIZE = 5000
MAX_PAGES = 1000  # per poll: a long backfill goes on at the next poll, after a heartbeat
MAX_GAP_REFETCH = 20  # missing ranges asked for again per poll; the rest are just reported
REPORT_RETRIES_AFTER = 5  # transient failures in a row before a human hears of them
REFUSED_MEMORY = 1000  # refused bars remembered, so a bad bar is logged once, not per poll
_NAME_RE = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Subscription:
    """One bar series to keep current: `symbol` as the feed spells it."""

    symbol: str
    market: str  # crypto | forex | stock
    venue: str
    timeframe: str  # 1m 5m 15m 1h 4h 1d 1w
    # with nothing stored, the series starts this many bars before its latest closed one
    # (the history a strategy warms up on); backfill_from, when given, wins
    history_bars: int = 0

    @property
    def label(self) -> str:
        return f"{self.venue}:{self.symbol} {self.timeframe}"


@dataclass(frozen=True)
class PollResult:
    """What one poll of one subscription did (`state`: ok, stale, retrying, failed,
    stopped, disabled)."""

    subscription: Subscription
    state: str
    fetched: int = 0
    inserted: int = 0
    refused: int = 0
    missing: int = 0  # bars still missing after the gap re-request
    last_bar: datetime | None = None
    retry_in: float | None = None  # seconds until the feed is asked again
    error: str | None = None


# ------------------------------------------------------------------------------ bar checks

def _us(ts: datetime) -> int:
    return (ts - EPOCH) // US


def _dt(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(us))


def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).isoformat() if ts is not None else None


def _value_problem(bar: FeedBar) -> str | None:
    for name in ("open", "high", "low", "close", "volume"):
        value = getattr(bar, name)
        if isinstance(value, bool) or not isinstance(value, Decimal | int):
            return f"{name} is {type(value).__name__} {value!r}, not a Decimal"
        if not Decimal(value).is_finite():
            return f"{name} is {value}, not a finite number"
        if abs(Decimal(value)) >= MAX_VALUE:
            return f"{name} {value} is out of range (10^18 or more)"
    if min(bar.open, bar.high, bar.low, bar.close) <= 0:
        return (f"prices must be > 0 (open={bar.open} high={bar.high} low={bar.low} "
                f"close={bar.close})")
    if bar.high < max(bar.open, bar.close):
        return f"high {bar.high} is below max(open {bar.open}, close {bar.close})"
    if bar.low > min(bar.open, bar.close):
        return f"low {bar.low} is above min(open {bar.open}, close {bar.close})"
    if bar.volume < 0:
        return f"volume {bar.volume} is negative"
    return None


def bar_problem(bar: FeedBar, symbols: Collection[str], timeframe: str,
                now: datetime) -> str | None:
    """Why `bar` must not be written for this series at `now`, or None if it may be."""
    if bar.timeframe != timeframe:
        return f"timeframe {bar.timeframe!r}, expected {timeframe}"
    if str(bar.symbol).strip().upper() not in {s.upper() for s in symbols}:
        return f"symbol {bar.symbol!r}, expected {' or '.join(sorted(set(symbols)))}"
    if not isinstance(bar.ts, datetime) or bar.ts.utcoffset() is None:
        return f"time {bar.ts!r} has no time zone"
    problem = _value_problem(bar) or misalignment(bar.ts, timeframe)
    if problem:
        return problem
    closes = bar.ts + timedelta(seconds=TIMEFRAME_SECONDS[timeframe])
    if bar.ts > now:
        return f"opens in the future (now {now.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)"
    if closes > now:
        return f"still open (closes at {closes.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)"
    return None


# ------------------------------------------------------------------------------ calendars

def expected_bars(calendar_id: str, step_us: int, first_us: int, last_us: int,
                  closed: frozenset[date] = frozenset(),
                  early: dict[date, time] | None = None) -> np.ndarray:
    """Open times first, first + step, ... <= last (UTC microseconds) of the bars that
    overlap a trading session: the bars a market is expected to produce."""
    if last_us < first_us:
        return np.empty(0, dtype=np.int64)
    grid = np.arange(first_us, last_us + 1, step_us, dtype=np.int64)
    if calendar_id == "CRYPTO_24X7":
        return grid
    opens, closes = sessions(calendar_id, first_us, last_us + step_us, early, closed)
    return grid[in_session(grid, step_us, opens, closes)]


def _anchored(ref: datetime, step: timedelta, at: datetime) -> datetime:
    """The first of ref, ref + step, ... that is not before `at`."""
    if at <= ref:
        return ref
    return ref + step * -(-(at - ref) // step)


_HOLIDAYS = "SELECT calendar_id, day, early_close FROM market.calendar_holidays"


def _load_holidays(conn: psycopg.Connection
                   ) -> tuple[dict[str, frozenset[date]], dict[str, dict[date, time]]]:
    """Full-day closures and early closes stored beyond the calendars' own rules."""
    closed: dict[str, set[date]] = {}
    early: dict[str, dict[date, time]] = {}
    for calendar_id, day, early_close in conn.execute(_HOLIDAYS).fetchall():
        if early_close is None:
            closed.setdefault(calendar_id, set()).add(day)
        else:
            early.setdefault(calendar_id, {})[day] = early_close
    return {k: frozenset(v) for k, v in closed.items()}, early


# ------------------------------------------------------------------------------ state

@dataclass(eq=False)
class _Series:
    """The ingest state of one subscription (touched by its group's thread only)."""

    sub: Subscription
    spec: InstrumentSpec
    step: timedelta
    instrument_id: int | None = None
    last_bar: datetime | None = None
    origin: datetime | None = None  # where the series starts when nothing is stored
    polled_at: datetime | None = None
    next_expected: datetime | None = None  # the next bar the market should produce
    more: bool = False  # the last poll stopped at the page limit: go on at once
    gap_from: datetime | None = None  # a gap check not yet done (a poll failed midway)
    stale: bool = False
    disabled: str | None = None
    failures: int = 0  # polls of this series failed in a row (not the transport's faults)
    retry_at: datetime | None = None  # when a failing series is polled again
    error: str | None = None
    reported: str | None = None  # the error already reported in this episode
    refused: dict[tuple[str, str], None] = field(default_factory=dict)

    @classmethod
    def of(cls, sub: Subscription) -> _Series:
        spec = spec_for(sub.symbol, sub.market, sub.venue)
        check_timeframe(sub.timeframe)
        return cls(sub, spec, timedelta(seconds=TIMEFRAME_SECONDS[sub.timeframe]))

    @property
    def ref(self) -> datetime | None:
        """The first bar not stored yet."""
        return self.last_bar + self.step if self.last_bar is not None else self.origin

    def status(self) -> dict[str, Any]:
        state = ("disabled" if self.disabled else "retrying" if self.failures
                 else "stale" if self.stale else "ok" if self.polled_at else "waiting")
        return {"state": state, "last_bar": _iso(self.last_bar),
                "polled_at": _iso(self.polled_at), "error": self.disabled or self.error}


@dataclass(eq=False)
class _Group:
    """Subscriptions served by one feed: one thread, one connection, one backoff."""

    key: str
    feed: MarketDataFeed
    backoff: Backoff
    series: list[_Series] = field(default_factory=list)
    conn: psycopg.Connection | None = None
    retry_at: datetime | None = None
    failures: int = 0
    last_error: str | None = None
    reported: str | None = None  # the error already reported in this episode
    stopped: str | None = None
    closed: dict[str, frozenset[date]] = field(default_factory=dict)
    early: dict[str, dict[date, time]] = field(default_factory=dict)

    @property
    def venue(self) -> str:
        return str(getattr(self.feed, "venue", self.key))

    @property
    def state(self) -> str:
        if self.stopped:
            return "stopped"
        if self.failures or any(s.failures for s in self.series):
            return "retrying"
        return "stale" if any(s.stale for s in self.series) else "running"

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "venue": self.venue, "error": self.last_error or
                self.stopped, "retry_at": _iso(self.retry_at), "failures": self.failures,
                "series": {s.sub.label: s.status() for s in self.series}}


@dataclass
class _Tally:
    fetched: int = 0
    inserted: int = 0
    refused: int = 0
    more: bool = False


# ------------------------------------------------------------------------------ SQL

_LAST = ("SELECT max(ts) FROM market.bars "
         "WHERE instrument_id = %s AND timeframe = %s::market.timeframe")
# the same lock as the file importer, so the two never race for one instrument's bars
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('mmats.import.bars'), %s::int)"
# one statement per batch: the bars trigger sees the whole batch at once
_INSERT = """
INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)
SELECT %s::bigint, %s::market.timeframe, u.ts, u.o, u.h, u.l, u.c, u.v
FROM unnest(%s::timestamptz[], %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[],
            %s::numeric[]) AS u(ts, o, h, l, c, v)
ON CONFLICT (instrument_id, timeframe, ts) DO NOTHING
"""
_TIMES = """
COPY (SELECT (extract(epoch FROM ts) * 1000000)::int8 FROM market.bars
      WHERE instrument_id = {} AND timeframe = {} AND ts BETWEEN {} AND {} ORDER BY ts)
TO STDOUT
"""
_HEARTBEAT = "SELECT runtime.heartbeat(%s, 'ingest', %s, %s, %s, %s)"
_REPORT = "SELECT runtime.report_error(%s, %s, %s, NULL, %s)"


def _group_feeds(feeds: Mapping[str, MarketDataFeed], subscriptions: Iterable[Subscription],
                 policy: BackoffPolicy, rng: RandomSource | None) -> list[_Group]:
    """One group per feed object, in the order subscriptions name them."""
    groups: dict[int, _Group] = {}
    seen: set[Subscription] = set()
    for sub in subscriptions:
        if sub in seen:
            raise ValueError(f"subscription {sub.label} ({sub.market}) is given twice")
        seen.add(sub)
        key = sub.venue if sub.venue in feeds else sub.market
        if key not in feeds:
            raise ValueError(f"no feed for {sub.label}: give one keyed {sub.venue!r} (venue) "
                             f"or {sub.market!r} (market); feeds are keyed {sorted(feeds)}")
        feed = feeds[key]
        if getattr(feed, "market", sub.market) != sub.market:
            raise ValueError(f"{sub.label} is a {sub.market} subscription, but feed {key!r} "
                             f"serves the {feed.market} market")
        group = groups.setdefault(id(feed), _Group(key, feed, policy.start(rng)))
        group.series.append(_Series.of(sub))
    return list(groups.values())


# ------------------------------------------------------------------------------ the worker

class LiveIngest:
    """Keeps market.bars current for `subscriptions` from `feeds` (see the module doc).

    `url_or_conn_factory`: a database URL (owner or superuser) or a callable returning a
    new psycopg connection; every feed group opens its own. `feeds`: keyed by venue or
    market. `now`/`sleep`/`rng`: the clock, the real loop's wait (default: an Event, so
    `stop()` interrupts it) and the jitter source. `backfill_from`: where a series with
    nothing stored starts (default: its latest closed bar). `grace`: seconds after a
    bar's close before it is asked for.
    """

    def __init__(self, url_or_conn_factory: str | ConnFactory,
                 feeds: Mapping[str, MarketDataFeed], subscriptions: Iterable[Subscription],
                 *, now: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], object] | None = None,
                 rng: RandomSource | None = None, backfill_from: datetime | None = None,
                 stale_after_bars: int = 3, name: str = "ingest",
                 backoff: BackoffPolicy | None = None, grace: float = 2.0,
                 batch_size: int = BATCH_SIZE, heartbeat_every: float = 15.0) -> None:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"worker name {name!r}: lower-case letters, digits and _ . : -, "
                             "starting with a letter, at most 64 characters")
        if stale_after_bars < 1 or batch_size < 1:
            raise ValueError("stale_after_bars and batch_size must be at least 1")
        if backfill_from is not None and backfill_from.utcoffset() is None:
            raise ValueError("backfill_from must be an aware (UTC) datetime")
        self.name = name
        self._connect_to = url_or_conn_factory
        self._now = now
        self._sleep = sleep
        self._backfill_from = backfill_from
        self._stale_after = stale_after_bars
        self._grace = timedelta(seconds=grace)
        self._batch = batch_size
        self._heartbeat_every = heartbeat_every
        self._stop = threading.Event()
        self._groups = _group_feeds(feeds, subscriptions, backoff or BackoffPolicy(), rng)
        if not self._groups:
            raise ValueError("LiveIngest needs at least one subscription")
        self._beat_conn: psycopg.Connection | None = None

    # -------------------------------------------------------------- public entries

    def run_once(self) -> list[PollResult]:
        """One pass over every group in the calling thread: polls the subscriptions that
        are due at `now()` (skipping groups that back off or are stopped), then sends one
        heartbeat. Deterministic under an injected clock."""
        results: list[PollResult] = []
        for group in self._groups:
            results += self._pass(group)
        self._beat_main(self.state())
        return results

    def poll(self, subscription: Subscription) -> PollResult:
        """Poll one subscription now, whether due or backing off (not if stopped)."""
        group, series = self._find(subscription)
        if group.stopped:
            return PollResult(subscription, "stopped", error=group.stopped)
        return self._attempt(group, series)

    def run(self) -> None:
        """The real loop: one thread per feed group, until `stop()` (or every feed has
        stopped). Heartbeats 'starting', then each loop, then 'stopped'."""
        self._beat_main("starting")
        threads = [threading.Thread(target=self._loop, args=(g,), daemon=True,
                                    name=f"{self.name}:{g.key}") for g in self._groups]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():  # short joins: signal handlers run in between
                    thread.join(0.2)
        finally:  # also on KeyboardInterrupt: end the other loops before leaving
            self.stop()
            for thread in threads:
                thread.join(5)
            self._beat_main("failed" if self.state() == "failed" else "stopped")
            self.close()

    def stop(self) -> None:
        """End every loop promptly (safe from a signal handler or another thread)."""
        self._stop.set()

    def close(self) -> None:
        """Close the connections run_once / poll opened."""
        for group in self._groups:
            self._drop_connection(group)
        if self._beat_conn is not None:
            self._beat_conn.close()
            self._beat_conn = None

    def state(self) -> str:
        """The worker's heartbeat state: running, degraded (a feed retrying, stale,
        stopped or a series disabled) or failed (every feed stopped)."""
        if all(g.stopped for g in self._groups):
            return "failed"
        if any(g.state != "running" or any(s.disabled for s in g.series)
               for g in self._groups):
            return "degraded"
        return "running"

    def detail(self) -> dict[str, Any]:
        """The heartbeat's detail: every feed's state and each series' last bar."""
        return {"feeds": {g.key: g.status() for g in self._groups}}

    def __enter__(self) -> LiveIngest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close()

    # -------------------------------------------------------------- the loop

    def _loop(self, group: _Group) -> None:
        """A group's thread: pass, heartbeat, wait for the next bar (or the backoff)."""
        try:
            while not self._stop.is_set() and not group.stopped:
                try:
                    self._pass(group)
                    self._beat(group)
                except Exception as exc:  # never let one feed's surprise end its thread
                    log.error(f"{group.key}: ingest loop error: {exc}", exc_info=exc)
                if not group.stopped:
                    self._wait(self._delay(group))
        finally:
            self._drop_connection(group)

    def _wait(self, seconds: float) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            self._stop.wait(seconds)

    def _delay(self, group: _Group) -> float:
        """Seconds until this group has something to do (at most one heartbeat period)."""
        now = self._now()
        if group.retry_at is not None:
            target = group.retry_at
        else:
            dues = [d for s in group.series if (d := self._due_at(s)) is not None]
            target = min(dues) if dues else now + timedelta(seconds=self._heartbeat_every)
        return min(max((target - now).total_seconds(), 0.0), self._heartbeat_every)

    def _due_at(self, s: _Series) -> datetime | None:
        """When a series should be polled next: after the next expected bar closes (plus
        the grace), and while it is late, every quarter bar (at most every minute)."""
        if s.disabled:
            return None
        if s.retry_at is not None:  # failing: polled again once its own backoff is over
            return s.retry_at
        if s.polled_at is None or s.more:
            return EPOCH
        closes = (s.next_expected + s.step + self._grace if s.next_expected is not None
                  else s.polled_at + HORIZON)
        return max(closes, s.polled_at + min(s.step / 4, timedelta(seconds=60)))

    def _pass(self, group: _Group) -> list[PollResult]:
        if group.stopped:
            return []
        now = self._now()
        if group.retry_at is not None and now < group.retry_at:
            return []
        results = []
        for s in group.series:
            due = self._due_at(s)
            if due is None or due > now:
                continue
            results.append(self._attempt(group, s))
            if group.stopped or group.retry_at is not None:
                break  # the feed or the database is in trouble: back off the whole group
        return results

    def _find(self, sub: Subscription) -> tuple[_Group, _Series]:
        for group in self._groups:
            for s in group.series:
                if s.sub == sub:
                    return group, s
        raise KeyError(f"not subscribed: {sub.label} ({sub.market})")

    # -------------------------------------------------------------- one poll

    def _attempt(self, group: _Group, s: _Series) -> PollResult:
        """A poll with its errors turned into backoff, stop or report."""
        try:
            result = self._poll(group, s)
        except Retry as exc:  # BackOff too: its retry_after is honoured
            return self._failed(group, s, exc, "FEED_UNAVAILABLE", transient=True)
        except Stop as exc:
            return self._stop_group(group, s, exc)
        except Reject as exc:
            return self._disable(group, s, exc)
        except psycopg.Error as exc:
            self._drop_connection(group)
            return self._failed(group, s, exc, "INGEST_DB_ERROR", transient=False)
        except Exception as exc:
            return self._series_failed(group, s, exc)
        self._recovered(group)
        self._series_recovered(group, s)
        return result

    def _poll(self, group: _Group, s: _Series) -> PollResult:
        conn = self._connection(group)
        if s.disabled or not self._resolve(group, conn, s):
            return PollResult(s.sub, "disabled", error=s.disabled)
        now = self._now()
        last = self._last_stored(conn, s)
        since = self._since(group, s, last, now)
        pending = s.gap_from is not None
        if s.gap_from is None:
            s.gap_from = last if last is not None else since
        tally = self._fetch_range(group, conn, s, since, now)
        missing = 0
        if tally.inserted or pending:
            missing = self._check_gaps(group, conn, s, s.gap_from, now, tally)
        s.gap_from = None
        s.last_bar = self._last_stored(conn, s)
        self._watch_stale(group, s, tally.inserted, now)
        s.polled_at, s.more = now, tally.more
        s.next_expected = self._next_expected(group, s, now)
        return PollResult(s.sub, "stale" if s.stale else "ok", tally.fetched, tally.inserted,
                          tally.refused, missing, s.last_bar)

    def _since(self, group: _Group, s: _Series, last: datetime | None,
               now: datetime) -> datetime:
        """Where the fetch starts: the bar after the last stored one, else the origin."""
        if last is not None:
            return last + s.step
        if s.origin is None:
            s.origin = self._backfill_from or self._history_start(group, s, now)
        return s.origin

    def _history_start(self, group: _Group, s: _Series, now: datetime) -> datetime:
        """The open of the bar `history_bars` trading bars before the latest closed one
        (the market's sessions counted: a weekend or a night holds none)."""
        latest = _dt(_us(now) // (s.step // US) * (s.step // US)) - s.step
        want = s.sub.history_bars + 1
        span = s.step * s.sub.history_bars
        for _ in range(16):  # (doubled 16 times, a span covers any closed period)
            expected = self._expected(group, s, latest - span, latest)
            if len(expected) >= want:
                return _dt(int(expected[-want]))
            span *= 2
        return latest - span

    def _fetch_range(self, group: _Group, conn: psycopg.Connection, s: _Series,
                     since: datetime, now: datetime) -> _Tally:
        """Fetch and write [since, now) page by page, until the feed has nothing newer."""
        tally = _Tally()
        for _ in range(MAX_PAGES):
            if self._stop.is_set():
                tally.more = True
                return tally
            bars = group.feed.fetch_bars(s.sub.symbol, s.sub.timeframe, since, now)
            newest = self._take(group, conn, s, bars, since, None, now, tally)
            if newest is None or newest < since:
                return tally
            since = newest + s.step
            if since + s.step > now:  # no further bar can have closed
                return tally
        tally.more = True
        return tally

    def _take(self, group: _Group, conn: psycopg.Connection, s: _Series,
              bars: Sequence[FeedBar], lo: datetime, hi: datetime | None, now: datetime,
              tally: _Tally) -> datetime | None:
        """Validate and write the bars of [lo, hi); the newest open time seen there."""
        tally.fetched += len(bars)
        good: dict[datetime, FeedBar] = {}
        newest: datetime | None = None
        for bar in bars:
            aware = isinstance(bar.ts, datetime) and bar.ts.utcoffset() is not None
            if aware and (bar.ts < lo or (hi is not None and bar.ts >= hi)):
                continue  # outside the range asked for (stored already, or not yet due)
            if aware:
                newest = bar.ts if newest is None else max(newest, bar.ts)
            problem = bar_problem(bar, (s.sub.symbol, s.spec.symbol), s.sub.timeframe, now)
            if problem:
                tally.refused += 1
                self._refuse(group, s, bar, problem)
            else:
                good.setdefault(bar.ts, bar)
        tally.inserted += self._write(conn, s, [good[t] for t in sorted(good)])
        return newest

    def _refuse(self, group: _Group, s: _Series, bar: FeedBar, problem: str) -> None:
        """One log line per refused bar (not one per poll that sees it again)."""
        ts = (f"{bar.ts.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
              if isinstance(bar.ts, datetime) and bar.ts.utcoffset() is not None
              else repr(bar.ts))
        key = (ts, problem.split(" (")[0])  # "in the future (now ...)" is one problem
        if key in s.refused:
            return
        s.refused[key] = None
        if len(s.refused) > REFUSED_MEMORY:
            del s.refused[next(iter(s.refused))]
        event(log, f"refused bar {group.venue} {s.sub.symbol} {s.sub.timeframe} {ts}: "
              f"{problem}", logging.WARNING, venue=group.venue, symbol=s.sub.symbol,
              timeframe=s.sub.timeframe, bar_ts=ts, problem=problem)

    def _write(self, conn: psycopg.Connection, s: _Series, bars: list[FeedBar]) -> int:
        """Insert in batches, one INSERT (and one commit) each; the rows actually new."""
        inserted = 0
        for lo in range(0, len(bars), self._batch):
            chunk = bars[lo:lo + self._batch]
            cols = ([b.ts for b in chunk],
                    *([Decimal(getattr(b, c)) for b in chunk]
                      for c in ("open", "high", "low", "close", "volume")))
            with conn.transaction():
                conn.execute(_LOCK, (s.instrument_id,))
                cur = conn.execute(_INSERT, (s.instrument_id, s.sub.timeframe, *cols))
                inserted += max(cur.rowcount, 0)
        return inserted

    # -------------------------------------------------------------- gaps and stalls

    def _check_gaps(self, group: _Group, conn: psycopg.Connection, s: _Series,
                    lo: datetime, now: datetime, tally: _Tally) -> int:
        """Ask once more for the bars missing in [lo, last stored]; report what is still
        missing. Returns how many bars are still missing."""
        hi = self._last_stored(conn, s)
        if hi is None or hi <= lo:
            return 0
        ranges = self._missing(group, conn, s, lo, hi)
        if not ranges:
            return 0
        for r in ranges[:MAX_GAP_REFETCH]:
            until = r.end + s.step
            bars = group.feed.fetch_bars(s.sub.symbol, s.sub.timeframe, r.start, until)
            self._take(group, conn, s, bars, r.start, until, now, tally)
        still = self._missing(group, conn, s, lo, hi)
        if still:
            self._report_gap(group, s, still)
        return sum(r.count for r in still)

    def _missing(self, group: _Group, conn: psycopg.Connection, s: _Series, lo: datetime,
                 hi: datetime) -> list[GapRange]:
        cal = s.spec.calendar_id
        return missing_bars(self._stored_times(conn, s, lo, hi), s.sub.timeframe, cal,
                            group.closed.get(cal, frozenset()), group.early.get(cal))

    def _report_gap(self, group: _Group, s: _Series, ranges: list[GapRange]) -> None:
        count = sum(r.count for r in ranges)
        first = ranges[0]
        more = f" and {len(ranges) - 1} more ranges" if len(ranges) > 1 else ""
        message = (f"{s.sub.label}: {count} bars still missing after asking the feed again: "
                   f"{first.start:%Y-%m-%d %H:%M} .. {first.end:%Y-%m-%d %H:%M} UTC "
                   f"({first.count} bars){more}")
        event(log, message, logging.WARNING, venue=group.venue, symbol=s.sub.symbol,
              timeframe=s.sub.timeframe, missing=count)
        self._report(group, "GAP", message, {
            "venue": group.venue, "symbol": s.spec.symbol, "timeframe": s.sub.timeframe,
            "missing": count, "ranges": [{"start": _iso(r.start), "end": _iso(r.end),
                                          "count": r.count} for r in ranges[:50]]})

    def _watch_stale(self, group: _Group, s: _Series, inserted: int, now: datetime) -> None:
        """Flag a series whose market expected more than `stale_after_bars` bars that did
        not come (once per episode); clear it when bars flow again."""
        if inserted:
            if s.stale:
                s.stale = False
                event(log, f"{s.sub.label}: bars flowing again (last {_iso(s.last_bar)})",
                      logging.INFO, venue=group.venue, symbol=s.sub.symbol,
                      timeframe=s.sub.timeframe)
            return
        ref = s.ref
        if s.stale or ref is None:
            return
        late = self._expected_closed(group, s, ref, now)
        if late <= self._stale_after:
            return
        s.stale = True
        message = (f"{s.sub.label}: feed answers but brought no new closed bar for {late} "
                   f"expected bars (last stored {_iso(s.last_bar) or 'none'})")
        event(log, message, logging.WARNING, venue=group.venue, symbol=s.sub.symbol,
              timeframe=s.sub.timeframe, late_bars=late)
        self._report(group, "FEED_STALE", message, {
            "venue": group.venue, "symbol": s.spec.symbol, "timeframe": s.sub.timeframe,
            "last_bar": _iso(s.last_bar), "late_bars": late})

    def _window(self, s: _Series) -> timedelta:
        return max(HORIZON, s.step * (self._stale_after + 2))

    def _expected(self, group: _Group, s: _Series, first: datetime,
                  last: datetime) -> np.ndarray:
        cal = s.spec.calendar_id
        return expected_bars(cal, s.step // US, _us(first), _us(last),
                             group.closed.get(cal, frozenset()), group.early.get(cal))

    def _expected_closed(self, group: _Group, s: _Series, ref: datetime,
                         now: datetime) -> int:
        """How many bars from `ref` on the market should have closed by `now` (counted
        over a recent window only: enough to tell more than stale_after_bars)."""
        last_open = now - s.step
        if ref > last_open:
            return 0
        first = _anchored(ref, s.step, now - self._window(s))
        return len(self._expected(group, s, first, last_open))

    def _next_expected(self, group: _Group, s: _Series, now: datetime) -> datetime | None:
        ref = s.ref
        if ref is None:
            return None
        first = _anchored(ref, s.step, now - self._window(s))
        grid = self._expected(group, s, first, max(now, first) + HORIZON)
        return _dt(int(grid[0])) if len(grid) else None

    # -------------------------------------------------------------- database

    def _connect(self) -> psycopg.Connection:
        if isinstance(self._connect_to, str):
            conn = psycopg.connect(self._connect_to, autocommit=True, connect_timeout=10,
                                   application_name=f"mmats-{self.name}")
        else:
            conn = self._connect_to()
            conn.autocommit = True
        conn.execute("SET timezone TO 'UTC'")
        return conn

    def _connection(self, group: _Group) -> psycopg.Connection:
        """The group's connection, (re)opened if needed, with the stored holidays."""
        conn = group.conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._drop_connection(group)
        conn = self._connect()
        group.closed, group.early = _load_holidays(conn)
        group.conn = conn
        return conn

    def _drop_connection(self, group: _Group) -> None:
        conn, group.conn = group.conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _resolve(self, group: _Group, conn: psycopg.Connection, s: _Series) -> bool:
        """Find (or create) the series' instrument; a refused one disables the series."""
        if s.instrument_id is not None:
            return True
        try:
            with conn.transaction():
                s.instrument_id, created = ensure_instrument(conn, s.spec)
        except MmatsError as exc:
            s.disabled = str(exc)
            event(log, f"{s.sub.label}: disabled: {exc}", logging.ERROR)
            self._report(group, "INGEST_CONFIG", f"{s.sub.label}: {exc}",
                         {"venue": group.venue, "symbol": s.sub.symbol})
            return False
        if created:
            event(log, f"{s.sub.label}: created instrument {s.instrument_id}", logging.INFO)
        return True

    def _last_stored(self, conn: psycopg.Connection, s: _Series) -> datetime | None:
        row = conn.execute(_LAST, (s.instrument_id, s.sub.timeframe)).fetchone()
        return row[0] if row else None

    def _stored_times(self, conn: psycopg.Connection, s: _Series, lo: datetime,
                      hi: datetime) -> np.ndarray:
        stmt = sql.SQL(_TIMES).format(sql.Literal(s.instrument_id),
                                      sql.Literal(s.sub.timeframe), sql.Literal(lo),
                                      sql.Literal(hi))
        buf = bytearray()
        with conn.cursor() as cur, cur.copy(stmt) as copy:
            for block in copy:
                buf += block
        return np.array(bytes(buf).split(), dtype="S24").astype(np.int64)

    def _report(self, group: _Group, kind: str, message: str,
                details: dict[str, Any]) -> None:
        """runtime.report_error, never raising: a failed report is logged instead."""
        try:
            conn = self._connection(group)
            conn.execute(_REPORT, (self.name, kind, redact(message)[:2000],
                                   Jsonb(redact_fields(details))))
        except Exception as exc:
            event(log, f"could not report {kind} ({message}): {exc}", logging.ERROR)

    def _beat(self, group: _Group) -> None:
        """A heartbeat on the group's own connection (its thread's)."""
        try:
            self._send_beat(self._connection(group), self.state())
        except Exception as exc:
            self._drop_connection(group)
            event(log, f"heartbeat failed: {exc}", logging.WARNING)

    def _beat_main(self, state: str) -> None:
        """A heartbeat from the calling thread (run_once, run's start and end)."""
        try:
            if self._beat_conn is None or self._beat_conn.closed or self._beat_conn.broken:
                self._beat_conn = self._connect()
            self._send_beat(self._beat_conn, state)
        except Exception as exc:
            event(log, f"heartbeat failed: {exc}", logging.WARNING)

    def _send_beat(self, conn: psycopg.Connection, state: str) -> None:
        conn.execute(_HEARTBEAT, (self.name, state, os.getpid(), socket.gethostname(),
                                  Jsonb(self.detail())))

    # -------------------------------------------------------------- errors

    def _failed(self, group: _Group, s: _Series, exc: Exception, kind: str, *,
                transient: bool) -> PollResult:
        """Back the group off; report once per episode (a transient fault only once it
        has lasted REPORT_RETRIES_AFTER attempts)."""
        retry_after = getattr(exc, "retry_after", None)
        delay = group.backoff.next_delay(retry_after)
        group.failures += 1
        group.retry_at = self._now() + timedelta(seconds=delay)
        text = redact(f"{type(exc).__name__}: {exc}")
        group.last_error = text
        message = f"{group.key}: {s.sub.label}: {text}; retrying in {delay:.1f}s"
        fields = {"venue": group.venue, "attempt": group.failures, "retry_in": delay}
        if transient:
            event(log, message, logging.WARNING, **fields)
        else:
            log.error(message, exc_info=exc, extra={"fields": fields})
        report = (group.failures == REPORT_RETRIES_AFTER if transient
                  else group.reported != text)
        if report:
            group.reported = text
            self._report(group, kind, message, {**fields, "symbol": s.sub.symbol,
                                                 "timeframe": s.sub.timeframe})
        return PollResult(s.sub, "retrying" if transient else "failed", retry_in=delay,
                          error=text)

    def _recovered(self, group: _Group) -> None:
        if group.failures:
            event(log, f"{group.key}: feed answering again after {group.failures} failed "
                  "attempts", logging.INFO, venue=group.venue)
        group.failures, group.retry_at = 0, None
        group.last_error = group.reported = None
        group.backoff.reset()

    def _series_failed(self, group: _Group, s: _Series, exc: Exception) -> PollResult:
        """A failure of one series that is not the transport's: back off that series
        alone (the group's other series go on); report once per episode."""
        backoff = Backoff(group.backoff.policy, group.backoff.rng, s.failures)
        delay = backoff.next_delay(getattr(exc, "retry_after", None))
        s.failures += 1
        s.retry_at = self._now() + timedelta(seconds=delay)
        text = redact(f"{type(exc).__name__}: {exc}")
        s.error = text
        message = f"{group.key}: {s.sub.label}: {text}; retrying this series in {delay:.1f}s"
        fields = {"venue": group.venue, "symbol": s.sub.symbol, "timeframe": s.sub.timeframe,
                  "attempt": s.failures, "retry_in": delay}
        log.error(message, exc_info=exc, extra={"fields": fields})
        if s.reported != text:
            s.reported = text
            self._report(group, "INGEST_ERROR", message, fields)
        return PollResult(s.sub, "failed", retry_in=delay, error=text)

    def _series_recovered(self, group: _Group, s: _Series) -> None:
        if s.failures:
            event(log, f"{group.key}: {s.sub.label}: polled again after {s.failures} failed "
                  "attempts", logging.INFO, venue=group.venue, symbol=s.sub.symbol,
                  timeframe=s.sub.timeframe)
        s.failures, s.retry_at, s.error, s.reported = 0, None, None, None

    def _disable(self, group: _Group, s: _Series, exc: Reject) -> PollResult:
        """A Reject concerns this series only: disable it (reported once); the group's
        other series go on."""
        text = redact(str(exc))
        s.disabled = text
        s.failures, s.retry_at, s.error, s.reported = 0, None, None, None
        message = (f"{s.sub.label}: disabled ({exc.code}): {text}; no more bars for this "
                   f"series until the worker is restarted (the other series of feed "
                   f"{group.key} go on)")
        event(log, message, logging.ERROR, venue=group.venue, symbol=s.sub.symbol,
              timeframe=s.sub.timeframe, code=exc.code)
        self._report(group, "FEED_REJECTED", message, {
            "venue": group.venue, "symbol": s.sub.symbol, "timeframe": s.sub.timeframe,
            "code": exc.code})
        return PollResult(s.sub, "disabled", error=text)

    def _stop_group(self, group: _Group, s: _Series, exc: Stop) -> PollResult:
        """Stop (authentication, environment): this feed is done until a restart; the
        other feeds go on."""
        text = redact(str(exc))
        group.stopped = text
        labels = [x.sub.label for x in group.series]
        message = (f"feed {group.key} stopped ({exc.code}): {text}; no more bars for "
                   f"{', '.join(labels)} until the worker is restarted")
        event(log, message, logging.ERROR, venue=group.venue, code=exc.code)
        self._report(group, "FEED_STOPPED", message, {
            "venue": group.venue, "code": exc.code, "subscriptions": labels})
        return PollResult(s.sub, "stopped", error=text)


def stop_on_signals(ingest: LiveIngest,
                    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
                    ) -> None:
    """Make SIGTERM / SIGINT end `ingest.run()` promptly (call from the main thread)."""
    for sig in signals:
        signal.signal(sig, lambda _signum, _frame: ingest.stop())
