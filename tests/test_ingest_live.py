"""The live ingest worker against the real database, fed by a deterministic in-memory feed.

`ListFeed` implements the MarketDataFeed protocol over a list of bars and a controllable
clock (the same clock the worker reads), and raises Retry / BackOff / Stop on demand or
withholds bars to simulate a stall. The vendor adapters are tested elsewhere, at the HTTP
level; here the subject is what the worker writes to market.bars, reports to
runtime.errors and says in runtime.workers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import threading
import time as wall
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from workers.brokers.errors import (
    BackOff,
    BrokerError,
    EnvironmentMismatch,
    Reject,
    Retry,
    Stop,
)
from workers.feeds.base import TIMEFRAME_SECONDS, FeedBar, MarketDataFeed
from workers.ingest.backoff import Backoff, BackoffPolicy
from workers.ingest.live import LiveIngest, Subscription, bar_problem, misalignment, stop_on_signals

MIN = timedelta(minutes=1)
BTC = Subscription("BTC/USDT", "crypto", "binance", "1m")
EUR = Subscription("EUR_USD", "forex", "oanda", "1m")
EUR_1H = Subscription("EUR_USD", "forex", "oanda", "1h")
AAPL = Subscription("AAPL", "stock", "alpaca", "1m")
WED = datetime(2025, 7, 9, tzinfo=UTC)  # an ordinary Wednesday, every market open at 10:00


def at(day: datetime, hh: int, mm: int, ss: int = 0) -> datetime:
    return day.replace(hour=hh, minute=mm, second=ss)


class Clock:
    """A clock the test moves by hand; the worker and the feed both read it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_bars(sub: Subscription, start: datetime, n: int, base: str = "100.00",
              symbol: str | None = None) -> list[FeedBar]:
    """n consecutive valid bars with exact two- and three-decimal values."""
    step = timedelta(seconds=TIMEFRAME_SECONDS[sub.timeframe])
    out = []
    for i in range(n):
        o = Decimal(base) + Decimal(i).scaleb(-2)
        c = o + Decimal("0.05")
        out.append(FeedBar(symbol or sub.symbol, sub.timeframe, start + i * step, o,
                           c + Decimal("0.10"), o - Decimal("0.07"), c, Decimal(f"{i}.125")))
    return out


class ListFeed:
    """A MarketDataFeed over a list of bars, answering as of `clock()`.

    honest: keep to the contract (open times in [since, until), closed bars only); a
    dishonest feed returns every bar from `since` on, open or in the future.
    page: at most this many bars per answer. errors: raised one per call, in order.
    down: raised on every call while set. failing: raised on every call for that symbol
    (one series in trouble). hidden_once: bars left out of the first answer that would
    contain them (a venue that skips bars now and then).
    """

    def __init__(self, venue: str, market: str, clock: Clock, bars: Sequence[FeedBar] = (),
                 *, page: int | None = None, honest: bool = True) -> None:
        self.venue = venue
        self.market = market
        self.clock = clock
        self.bars = list(bars)
        self.page = page
        self.honest = honest
        self.errors: list[Exception] = []
        self.down: Exception | None = None
        self.failing: dict[str, Exception] = {}
        self.hidden_once: set[datetime] = set()
        self.calls: list[tuple[str, str, datetime, datetime | None]] = []

    def fetch_bars(self, symbol: str, timeframe: str, since: datetime,
                   until: datetime | None = None) -> Sequence[FeedBar]:
        self.calls.append((symbol, timeframe, since, until))
        if self.errors:
            raise self.errors.pop(0)
        if self.down is not None:
            raise self.down
        if symbol in self.failing:
            raise self.failing[symbol]
        step = timedelta(seconds=TIMEFRAME_SECONDS[timeframe])
        out = [b for b in sorted(self.bars, key=lambda b: b.ts)
               if b.symbol == symbol and b.timeframe == timeframe and b.ts >= since
               and (not self.honest or ((until is None or b.ts < until)
                                        and b.ts + step <= self.clock()))]
        out = out[:self.page] if self.page else out
        hidden = [b for b in out if b.ts in self.hidden_once]
        self.hidden_once -= {b.ts for b in hidden}
        return [b for b in out if b not in hidden]


# ------------------------------------------------------------------------------ helpers

@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """The worker's log records (a handler of our own: the mmats logger may not propagate)."""
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record)

    logger = logging.getLogger("mmats.ingest.live")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(level)


def messages(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records]


def stored(url: str, sub: Subscription) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT b.ts, b.open, b.high, b.low, b.close, b.volume FROM market.bars b "
            "JOIN market.instruments i USING (instrument_id) "
            "WHERE i.venue = %s AND i.symbol = %s AND b.timeframe = %s::market.timeframe "
            "ORDER BY b.ts", (sub.venue, sub.symbol.upper(), sub.timeframe)).fetchall()


def stored_ts(url: str, sub: Subscription) -> list[datetime]:
    return [row[0] for row in stored(url, sub)]


def as_rows(bars: Sequence[FeedBar]) -> list[tuple[Any, ...]]:
    """Bars as market.bars rows, values as exact strings (scale included)."""
    return [(b.ts, str(b.open), str(b.high), str(b.low), str(b.close), str(b.volume))
            for b in bars]


def as_str(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(r[0], *(str(v) for v in r[1:])) for r in rows]


def errors(url: str, kind: str) -> list[tuple[str, dict[str, Any]]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT message, details FROM runtime.errors WHERE kind = %s "
                            "ORDER BY error_id", (kind,)).fetchall()


def worker(url: str, name: str = "ingest") -> tuple[Any, ...] | None:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT kind, state, pid, beats, detail FROM runtime.workers "
                            "WHERE name = %s", (name,)).fetchone()


def minutes(start: datetime, n: int) -> list[datetime]:
    return [start + i * MIN for i in range(n)]


def ingest_for(url: str, feeds: dict[str, Any], subs: Sequence[Subscription], clock: Clock,
               **kw: Any) -> LiveIngest:
    kw.setdefault("rng", random.Random(7))
    return LiveIngest(url, feeds, subs, now=clock, **kw)


# ------------------------------------------------------------------------------ backoff

def test_backoff_grows_exponentially_within_jitter_bounds_and_honours_retry_after() -> None:
    policy = BackoffPolicy(base=1.0, cap=30.0, multiplier=2.0, jitter=1.0)

    class Top:  # the largest draw: the delay is the ceiling itself
        def random(self) -> float:
            return 1.0

    top = policy.start(Top())
    assert [top.next_delay() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    seeded = policy.start(random.Random(11))
    for attempt in range(12):
        assert 0 <= seeded.next_delay() <= min(30.0, 2.0 ** attempt)
    assert seeded.next_delay(retry_after=45.0) == 45.0  # a floor, above even the cap
    seeded.reset()
    assert seeded.attempts == 0 and seeded.next_delay() <= 1.0

    half = Backoff(BackoffPolicy(base=2.0, cap=100.0, multiplier=3.0, jitter=0.5),
                   random.Random(5))
    for attempt in range(6):
        lo, hi = half.policy.bounds(attempt)
        assert (lo, hi) == (min(100.0, 2.0 * 3 ** attempt) / 2, min(100.0, 2.0 * 3 ** attempt))
        assert lo <= half.next_delay() <= hi
    assert BackoffPolicy(jitter=0.0).start(random.Random(1)).next_delay() == 1.0
    for bad in ({"base": 0}, {"base": 5, "cap": 1}, {"multiplier": 0.5}, {"jitter": 1.5}):
        with pytest.raises(ValueError):
            BackoffPolicy(**bad)


def test_bar_alignment_rules() -> None:
    assert misalignment(at(WED, 10, 0), "1m") is None
    assert "30s past" in (misalignment(at(WED, 10, 0, 30), "1m") or "")
    assert misalignment(at(WED, 10, 5), "1h") is not None
    assert misalignment(at(WED, 0, 0), "1d") is None  # UTC midnight
    assert misalignment(at(WED, 4, 0), "1d") is None  # New York midnight (EDT)
    assert misalignment(at(WED, 21, 0), "1d") is None  # 17:00 New York: the forex day
    assert misalignment(at(WED, 13, 0), "1d") is not None
    monday = datetime(2025, 7, 7, tzinfo=UTC)
    assert misalignment(monday, "1w") is None and misalignment(WED, "1w") is not None
    sunday_forex = datetime(2025, 7, 6, 21, 0, tzinfo=UTC)  # 17:00 New York (EDT)
    assert misalignment(sunday_forex, "1w") is None
    assert "17:00 New York on a Sunday" in (misalignment(WED, "1w") or "")


def test_a_price_or_volume_no_market_has_is_refused() -> None:
    def bar(**values: str) -> FeedBar:
        v = {"open": "100", "high": "101", "low": "99", "close": "100", "volume": "5"} | values
        return FeedBar(BTC.symbol, "1m", at(WED, 9, 50), *(Decimal(v[k]) for k in
                       ("open", "high", "low", "close", "volume")))

    now = at(WED, 10, 0)
    assert bar_problem(bar(), [BTC.symbol], "1m", now) is None
    assert bar_problem(bar(high="999999999999999999.9"), [BTC.symbol], "1m", now) is None
    assert bar_problem(bar(high="1e18"), [BTC.symbol], "1m", now) == (
        "high 1E+18 is out of range (10^18 or more)")
    assert bar_problem(bar(volume="1e400"), [BTC.symbol], "1m", now) == (
        "volume 1E+400 is out of range (10^18 or more)")


# ------------------------------------------------------------------------------ backfill

def test_backfill_from_nothing_then_from_the_last_stored_bar(db_url: str) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    history = make_bars(BTC, at(WED, 9, 0), 65, base="42000.10")
    feed = ListFeed("binance", "crypto", clock, history, page=25)
    assert isinstance(feed, MarketDataFeed)
    with ingest_for(db_url, {"binance": feed}, [BTC], clock,
                    backfill_from=at(WED, 9, 0)) as ingest:
        [result] = ingest.run_once()
    assert (result.state, result.fetched, result.inserted, result.refused) == ("ok", 60, 60, 0)
    assert [c[2] for c in feed.calls] == [at(WED, 9, 0), at(WED, 9, 25), at(WED, 9, 50)]
    assert as_str(stored(db_url, BTC)) == as_rows(history[:60])  # exact Decimals, scale too
    assert stored(db_url, BTC)[0][1] == Decimal("42000.10")

    # a restart five minutes later: the fetch starts right after the last stored bar
    clock.now = at(WED, 10, 5, 5)
    feed.calls.clear()
    feed.honest = False  # ... even if the venue sends overlapping bars again
    feed.bars = history[50:65]
    with ingest_for(db_url, {"binance": feed}, [BTC], clock,
                    backfill_from=at(WED, 9, 0)) as ingest:
        [result] = ingest.run_once()
    assert feed.calls[0][2] == at(WED, 10, 0)
    assert result.inserted == 5 and result.last_bar == at(WED, 10, 4)
    assert stored_ts(db_url, BTC) == minutes(at(WED, 9, 0), 65)  # nothing doubled or skipped
    assert as_str(stored(db_url, BTC)) == as_rows(history)


def test_the_still_open_bar_is_never_written(db_url: str,
                                             records: list[logging.LogRecord]) -> None:
    clock = Clock(at(WED, 10, 0, 30))
    feed = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 55), 6),
                    honest=False)  # this venue also sends the bar that is still forming
    provisional = feed.bars[-1]
    assert provisional.ts == at(WED, 10, 0)
    with ingest_for(db_url, {"binance": feed}, [BTC], clock,
                    backfill_from=at(WED, 9, 55)) as ingest:
        [result] = ingest.run_once()
        assert result.inserted == 5 and result.refused == 1
        assert stored_ts(db_url, BTC)[-1] == at(WED, 9, 59)
        assert any("10:00:00 UTC: still open" in m for m in messages(records))
        # once it has closed, its final values are written
        final = FeedBar(BTC.symbol, "1m", provisional.ts, provisional.open,
                        provisional.high + 1, provisional.low, provisional.close + 1,
                        Decimal("9.5"))
        feed.bars[-1] = final
        clock.now = at(WED, 10, 1, 3)
        [result] = ingest.run_once()
    assert result.inserted == 1
    assert as_str(stored(db_url, BTC)[-1:]) == as_rows([final])


def test_invalid_bars_are_refused_with_one_line_and_the_rest_written(
        db_url: str, records: list[logging.LogRecord]) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    good = make_bars(BTC, at(WED, 9, 50), 10)
    nan = FeedBar(BTC.symbol, "1m", at(WED, 9, 52), Decimal("100"), Decimal("101"),
                  Decimal("99"), Decimal("NaN"), Decimal("1"))
    inverted = FeedBar(BTC.symbol, "1m", at(WED, 9, 55), Decimal("100"), Decimal("98"),
                       Decimal("99"), Decimal("100"), Decimal("1"))
    future = FeedBar(BTC.symbol, "1m", at(WED, 10, 30), Decimal("100"), Decimal("101"),
                     Decimal("99"), Decimal("100"), Decimal("1"))
    misaligned = FeedBar(BTC.symbol, "1m", at(WED, 9, 57, 30), Decimal("100"),
                         Decimal("101"), Decimal("99"), Decimal("100"), Decimal("1"))
    bad = [nan, inverted, future, misaligned]
    bars = [b for b in good if b.ts not in (nan.ts, inverted.ts)] + bad
    feed = ListFeed("binance", "crypto", clock, bars, honest=False)
    with ingest_for(db_url, {"binance": feed}, [BTC], clock,
                    backfill_from=at(WED, 9, 50)) as ingest:
        [result] = ingest.run_once()
        assert result.refused == 4 + 2  # and the two bad ones again, when their gap is retried
        assert stored_ts(db_url, BTC) == [b.ts for b in good if b.ts not in (nan.ts,
                                                                           inverted.ts)]
        refusals = [m for m in messages(records) if m.startswith("refused bar")]
        assert len(refusals) == 4  # one line per bad bar, not one per sighting
        for line, (when, problem) in zip(sorted(refusals), sorted([
                ("09:52:00", "close is NaN, not a finite number"),
                ("09:55:00", "high 98 is below max(open 100, close 100)"),
                ("09:57:30", "not aligned to 1m (30s past the boundary)"),
                ("10:30:00", "opens in the future")]), strict=True):
            assert line.startswith(f"refused bar binance BTC/USDT 1m 2025-07-09 {when} UTC: ")
            assert problem in line and "\n" not in line
        # the two slots the bad bars should have filled are a gap the feed cannot fill
        [(message, details)] = errors(db_url, "GAP")
        assert details["missing"] == 2 and "BTC/USDT" in message
        assert [r["start"][11:16] for r in details["ranges"]] == ["09:52", "09:55"]
        clock.now = at(WED, 10, 1, 5)
        ingest.run_once()
    assert len([m for m in messages(records) if m.startswith("refused bar")]) == 4


def test_a_skipped_bar_is_asked_for_once_more_and_a_lasting_hole_is_reported(
        db_url: str) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    bars = make_bars(BTC, at(WED, 9, 0), 60)
    feed = ListFeed("binance", "crypto", clock, [b for b in bars if b.ts != at(WED, 9, 40)])
    feed.hidden_once = {at(WED, 9, 20), at(WED, 9, 21), at(WED, 9, 22)}
    with ingest_for(db_url, {"binance": feed}, [BTC], clock,
                    backfill_from=at(WED, 9, 0)) as ingest:
        [result] = ingest.run_once()
    assert result.inserted == 59 and result.missing == 1
    assert stored_ts(db_url, BTC) == [t for t in minutes(at(WED, 9, 0), 60)
                                      if t != at(WED, 9, 40)]
    assert [c[2:] for c in feed.calls[1:]] == [(at(WED, 9, 20), at(WED, 9, 23)),
                                              (at(WED, 9, 40), at(WED, 9, 41))]
    [(message, details)] = errors(db_url, "GAP")
    assert details["ranges"] == [{"start": "2025-07-09T09:40:00+00:00",
                                  "end": "2025-07-09T09:40:00+00:00", "count": 1}]
    assert "1 bars still missing" in message


# ------------------------------------------------------------------------------ failures

def test_a_disconnect_then_recovery_backfills_the_gap_exactly(
        db_url: str, records: list[logging.LogRecord]) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    feed = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 50), 10))
    with ingest_for(db_url, {"binance": feed}, [BTC], clock, backfill_from=at(WED, 9, 50),
                    backoff=BackoffPolicy(base=1.0, cap=30.0), name="ingest-gap") as ingest:
        assert ingest.run_once()[0].inserted == 10
        feed.down = Retry("connection reset by peer", venue="binance")
        states = []
        for minute in range(1, 11):
            clock.now = at(WED, 10, minute, 5)
            feed.bars = make_bars(BTC, at(WED, 9, 50), 10 + minute)  # the venue moves on
            states += [r.state for r in ingest.run_once()]
        assert states == ["retrying"] * 10
        assert len(stored_ts(db_url, BTC)) == 10
        assert worker(db_url, "ingest-gap")[1] == "degraded"  # type: ignore[index]
        assert len(errors(db_url, "FEED_UNAVAILABLE")) == 1  # once per episode

        feed.down = None
        clock.now = at(WED, 10, 12, 5)
        feed.bars = make_bars(BTC, at(WED, 9, 50), 22)
        [result] = ingest.run_once()
    assert feed.calls[-1][2] == at(WED, 10, 0)  # from the last stored bar
    assert (result.state, result.inserted, result.missing) == ("ok", 12, 0)
    assert as_str(stored(db_url, BTC)) == as_rows(make_bars(BTC, at(WED, 9, 50), 22))
    assert worker(db_url, "ingest-gap")[1] == "running"  # type: ignore[index]
    assert any("answering again after 10 failed attempts" in m for m in messages(records))


def test_backoff_delays_in_the_worker_grow_and_honour_retry_after(db_url: str) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    feed = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 59), 1))
    policy = BackoffPolicy(base=1.0, cap=60.0)
    feed.errors = [Retry("timeout"), Retry("timeout"), Retry("502"),
                   BackOff("rate limited", retry_after=120.0), Retry("timeout")]
    with ingest_for(db_url, {"binance": feed}, [BTC], clock, backoff=policy,
                    rng=random.Random(3)) as ingest:
        delays = []
        for _ in range(5):
            result = ingest.poll(BTC)
            assert result.state == "retrying" and result.retry_in is not None
            delays.append(result.retry_in)
        for attempt in (0, 1, 2, 4):
            lo, hi = policy.bounds(attempt)
            assert lo <= delays[attempt] <= hi
        assert delays[3] >= 120.0
        assert ingest.run_once() == []  # backing off: the feed is not asked before retry_at
        clock.now += timedelta(seconds=delays[4] + 0.001)
        [result] = ingest.run_once()
        assert result.state == "ok" and result.inserted == 1
        feed.errors = [Retry("timeout")]
        clock.now = at(WED, 10, 1, 5)
        assert (ingest.poll(BTC).retry_in or 99) <= policy.bounds(0)[1]  # reset by success


def test_a_retry_backs_off_every_series_of_that_feed_together(db_url: str) -> None:
    eth = Subscription("ETH/USDT", "crypto", "binance", "1m")
    clock = Clock(at(WED, 10, 0, 5))
    feed = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 59), 1)
                    + make_bars(eth, at(WED, 9, 59), 1, "2500"))
    feed.errors = [Retry("503 service unavailable")]
    with ingest_for(db_url, {"binance": feed}, [BTC, eth], clock,
                    backoff=BackoffPolicy(base=1.0, cap=1.0)) as ingest:
        assert [(r.subscription, r.state) for r in ingest.run_once()] == [(BTC, "retrying")]
        assert len(feed.calls) == 1  # the venue is not asked again for ETH at once
        clock.now += timedelta(seconds=2)
        assert [(r.subscription, r.inserted) for r in ingest.run_once()] == [(BTC, 1), (eth, 1)]


@pytest.mark.parametrize("fault", [Stop("invalid API key", venue="binance"),
                                   EnvironmentMismatch("testnet key, live endpoint",
                                                       venue="binance")])
def test_a_stopped_feed_stops_its_market_only(db_url: str, fault: BrokerError) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    crypto = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 55), 5))
    forex = ListFeed("oanda", "forex", clock, make_bars(EUR_1H, at(WED, 6, 0), 4, "1.10000"))
    crypto.errors = [fault]
    with ingest_for(db_url, {"crypto": crypto, "oanda": forex}, [BTC, EUR_1H], clock,
                    backfill_from=at(WED, 6, 0)) as ingest:
        results = {r.subscription: r for r in ingest.run_once()}
        assert results[BTC].state == "stopped" and results[EUR_1H].inserted == 4
        [(message, details)] = errors(db_url, "FEED_STOPPED")
        assert details["code"] == fault.code and "binance:BTC/USDT 1m" in message
        for hour in (11, 12):
            clock.now = at(WED, hour, 0, 5)
            forex.bars = make_bars(EUR_1H, at(WED, 6, 0), hour - 6, "1.10000")
            crypto.bars = make_bars(BTC, at(WED, 9, 55), 5 + 60 * (hour - 10))
            assert [r.subscription for r in ingest.run_once()] == [EUR_1H]
        assert ingest.poll(BTC).state == "stopped"
    assert len(crypto.calls) == 1 and stored_ts(db_url, BTC) == []
    assert stored_ts(db_url, EUR_1H) == [at(WED, h, 0) for h in range(6, 12)]
    kind, state, _, _, detail = worker(db_url)  # type: ignore[misc]
    assert (kind, state) == ("ingest", "degraded")
    assert detail["feeds"]["crypto"]["state"] == "stopped"
    assert detail["feeds"]["oanda"]["series"]["oanda:EUR_USD 1h"]["last_bar"] == \
        "2025-07-09T11:00:00+00:00"


ETH = Subscription("ETH/USDT", "crypto", "binance", "1m")


@pytest.mark.parametrize("fault", [
    Reject("fetch_bars BTC/USDT: unknown symbol: Invalid symbol.", venue="ccxt:binance",
           code="UNKNOWN_SYMBOL"),
    Reject("fetch_bars BTC/USDT: timeframe '1m' is not offered", venue="ccxt:binance",
           code="UNSUPPORTED_TIMEFRAME")])
def test_a_rejected_series_is_disabled_and_the_others_of_its_feed_go_on(
        db_url: str, fault: Reject) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    feed = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 55), 5)
                    + make_bars(ETH, at(WED, 9, 55), 5, "2500"))
    feed.failing[BTC.symbol] = fault  # a delisted pair, or a timeframe the venue lacks
    with ingest_for(db_url, {"binance": feed}, [BTC, ETH], clock,
                    backfill_from=at(WED, 9, 55)) as ingest:
        assert [(r.subscription, r.state, r.inserted) for r in ingest.run_once()] == [
            (BTC, "disabled", 0), (ETH, "ok", 5)]
        for minute in (1, 2):
            clock.now = at(WED, 10, minute, 5)
            feed.bars += make_bars(ETH, at(WED, 10, minute - 1), 1, "2600")
            assert [(r.subscription, r.inserted) for r in ingest.run_once()] == [(ETH, 1)]
        assert ingest.poll(BTC).state == "disabled"
        _, state, _, _, detail = worker(db_url)  # type: ignore[misc]
    assert len([c for c in feed.calls if c[0] == BTC.symbol]) == 1  # asked once, not again
    assert stored_ts(db_url, ETH) == minutes(at(WED, 9, 55), 7)
    [(message, details)] = errors(db_url, "FEED_REJECTED")  # reported once
    assert "binance:BTC/USDT 1m: disabled" in message and fault.code in message
    assert details["code"] == fault.code and details["symbol"] == "BTC/USDT"
    assert errors(db_url, "FEED_STOPPED") == []
    assert state == "degraded"
    assert detail["feeds"]["binance"]["state"] == "running"
    assert detail["feeds"]["binance"]["series"]["binance:BTC/USDT 1m"]["state"] == "disabled"


def test_a_failure_of_one_series_does_not_hold_up_the_others(
        db_url: str, records: list[logging.LogRecord]) -> None:
    """Not the transport's fault (an adapter's surprise on one symbol): that series backs
    off alone, reported once, and the next series of the group is polled in the same
    pass, and every pass after it."""
    clock = Clock(at(WED, 10, 0, 5))
    feed = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 55), 5)
                    + make_bars(ETH, at(WED, 9, 55), 5, "2500"))
    feed.failing[BTC.symbol] = ValueError("not a number: None")
    with ingest_for(db_url, {"binance": feed}, [BTC, ETH], clock, backfill_from=at(WED, 9, 55),
                    backoff=BackoffPolicy(base=30.0, cap=30.0, jitter=0.0)) as ingest:
        [btc, eth] = ingest.run_once()
        assert (btc.subscription, btc.state, btc.retry_in) == (BTC, "failed", 30.0)
        assert (eth.subscription, eth.state, eth.inserted) == (ETH, "ok", 5)
        clock.now = at(WED, 10, 0, 20)  # BTC's own backoff is not over: not asked again
        assert ingest.run_once() == []
        clock.now = at(WED, 10, 1, 5)
        feed.bars += make_bars(ETH, at(WED, 10, 0), 1, "2600")
        assert [(r.subscription, r.state) for r in ingest.run_once()] == [
            (BTC, "failed"), (ETH, "ok")]
        _, state, _, _, detail = worker(db_url)  # type: ignore[misc]
        assert state == "degraded"
        assert detail["feeds"]["binance"]["series"]["binance:BTC/USDT 1m"]["state"] == \
            "retrying"
        del feed.failing[BTC.symbol]
        clock.now = at(WED, 10, 2, 5)
        results = {r.subscription: r for r in ingest.run_once()}
        assert (results[BTC].state, results[BTC].inserted) == ("ok", 5)
        assert worker(db_url)[1] == "running"  # type: ignore[index]
    assert stored_ts(db_url, ETH) == minutes(at(WED, 9, 55), 6)
    [(message, details)] = errors(db_url, "INGEST_ERROR")  # once per episode
    assert "binance:BTC/USDT 1m" in message and "not a number" in message
    assert details["symbol"] == "BTC/USDT"
    assert any("polled again after 2 failed attempts" in m for m in messages(records))


def test_a_null_ccxt_candle_is_refused_alone_and_the_venue_goes_on(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """End to end, Binance served over HTTP: one BTC candle with a null open is refused
    with one line; the other BTC bars and every ETH bar are written."""
    from pathlib import Path

    import responses

    from workers.feeds.ccxt_feed import CcxtFeed

    fixtures = Path(__file__).parent / "fixtures" / "ccxt"
    clock = Clock(at(WED, 10, 10, 30))

    def klines(request: Any) -> tuple[int, dict[str, str], str]:
        q = dict(p.split("=", 1) for p in request.url.split("?", 1)[1].split("&"))
        since, rows = int(q["startTime"]), []
        for i in range(10):
            ts = int((at(WED, 10, 0) + i * MIN).timestamp() * 1000)
            price = 100 + i
            open_ = None if (q["symbol"] == "BTCUSDT" and i == 5) else f"{price}.0"
            if ts >= since:
                rows.append([ts, open_, f"{price + 2}.0", f"{price - 1}.0", f"{price}.5",
                             "1.0", ts + 59_999, "100.0", 10, "0.5", "50.0", "0"])
        return 200, {}, json.dumps(rows)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as http:
        http.get("https://api.binance.com/api/v3/exchangeInfo",
                 json=json.loads((fixtures / "binance_exchange_info.json").read_text()))
        http.add_callback(responses.GET, "https://api.binance.com/api/v3/klines",
                          callback=klines)
        feed = CcxtFeed("binance", now=clock, sleep=lambda s: None)
        with caplog.at_level(logging.WARNING, logger="mmats.feeds.ccxt"), ingest_for(
                db_url, {"binance": feed}, [BTC, ETH], clock,
                backfill_from=at(WED, 10, 0)) as ingest:
            results = ingest.run_once()
            clock.now += timedelta(seconds=6)
            ingest.run_once()
    assert [(r.subscription, r.state, r.inserted) for r in results] == [
        (BTC, "ok", 9), (ETH, "ok", 10)]
    assert stored_ts(db_url, BTC) == [t for t in minutes(at(WED, 10, 0), 10)
                                      if t != at(WED, 10, 5)]
    assert stored_ts(db_url, ETH) == minutes(at(WED, 10, 0), 10)
    refused = [r.getMessage() for r in caplog.records if r.name == "mmats.feeds.ccxt"]
    assert refused == ["refused bar ccxt:binance BTC/USDT 1m 2025-07-09 10:05:00 UTC: "
                       "open is missing (null)"]  # one line, though asked for again
    [(_, details)] = errors(db_url, "GAP")  # the hole it leaves is reported
    assert details["ranges"][0]["start"] == "2025-07-09T10:05:00+00:00"


# ------------------------------------------------------------------------------ stalls

def test_a_stalled_feed_is_flagged_once_and_cleared_when_bars_flow(
        db_url: str, records: list[logging.LogRecord]) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    feed = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 50), 10))
    with ingest_for(db_url, {"binance": feed}, [BTC], clock, backfill_from=at(WED, 9, 50),
                    stale_after_bars=3) as ingest:
        ingest.run_once()
        states = []
        for minute in range(1, 7):  # the feed answers, but with nothing new
            clock.now = at(WED, 10, minute, 5)
            states += [r.state for r in ingest.run_once()]
        assert states == ["ok", "ok", "ok", "stale", "stale", "stale"]
        [(message, details)] = errors(db_url, "FEED_STALE")
        assert details["late_bars"] == 4 and details["timeframe"] == "1m"
        assert "binance:BTC/USDT 1m" in message and "no new closed bar" in message
        _, state, _, _, detail = worker(db_url)  # type: ignore[misc]
        assert state == "degraded"
        assert detail["feeds"]["binance"]["series"]["binance:BTC/USDT 1m"]["state"] == "stale"

        clock.now = at(WED, 10, 7, 5)
        feed.bars = make_bars(BTC, at(WED, 9, 50), 17)
        [result] = ingest.run_once()
    assert (result.state, result.inserted) == ("ok", 7)
    assert worker(db_url)[1] == "running"  # type: ignore[index]
    assert any("bars flowing again" in m for m in messages(records))
    assert len(errors(db_url, "FEED_STALE")) == 1


def test_no_stale_alarm_over_a_forex_weekend(db_url: str) -> None:
    friday = datetime(2025, 7, 11, tzinfo=UTC)  # New York summer time: closes 21:00 UTC
    clock = Clock(at(friday, 21, 0, 5))
    feed = ListFeed("oanda", "forex", clock, make_bars(EUR, at(friday, 20, 50), 10, "1.1"))
    with ingest_for(db_url, {"oanda": feed}, [EUR], clock,
                    backfill_from=at(friday, 20, 50)) as ingest:
        assert ingest.run_once()[0].inserted == 10
        for when in (at(friday, 22, 0, 5), at(friday + timedelta(days=1), 12, 0, 5),
                     at(friday + timedelta(days=2), 20, 59, 30)):
            clock.now = when
            assert ingest.run_once() == []  # closed: nothing is due, nothing is asked for
            assert ingest.poll(EUR).state == "ok"  # and asked anyway, it is not stale
            assert worker(db_url)[1] == "running"  # type: ignore[index]
        assert errors(db_url, "FEED_STALE") == []
        clock.now = at(friday + timedelta(days=2), 21, 10, 5)  # open again, and no bars
        assert ingest.run_once()[0].state == "stale"
    assert len(errors(db_url, "FEED_STALE")) == 1


def test_no_stale_alarm_or_gap_over_an_nyse_holiday(db_url: str) -> None:
    thursday = datetime(2025, 4, 17, tzinfo=UTC)  # Good Friday follows; then the weekend
    monday = thursday + timedelta(days=4)
    clock = Clock(at(thursday, 20, 0, 5))
    feed = ListFeed("alpaca", "stock", clock, make_bars(AAPL, at(thursday, 19, 30), 30, "196"))
    with ingest_for(db_url, {"alpaca": feed}, [AAPL], clock,
                    backfill_from=at(thursday, 19, 30)) as ingest:
        assert ingest.run_once()[0].inserted == 30
        for when in (at(thursday, 23, 0), at(thursday + timedelta(days=1), 15, 0, 5),
                     at(thursday + timedelta(days=2), 15, 0, 5), at(monday, 13, 29, 5)):
            clock.now = when
            assert ingest.run_once() == []
            assert ingest.poll(AAPL).state == "ok"
        clock.now = at(monday, 13, 35, 5)
        feed.bars += make_bars(AAPL, at(monday, 13, 30), 5, "197")
        [result] = ingest.run_once()
        assert (result.state, result.inserted, result.missing) == ("ok", 5, 0)
        assert errors(db_url, "FEED_STALE") == [] and errors(db_url, "GAP") == []
        clock.now = at(monday, 13, 40, 5)  # in session, and the feed has gone quiet
        assert ingest.run_once()[0].state == "stale"
    assert len(errors(db_url, "FEED_STALE")) == 1


def test_a_new_series_starts_with_its_history_counted_in_trading_bars(db_url: str) -> None:
    """history_bars (the [[feeds]] setting): a series with nothing stored fetches that many
    bars before its latest closed one, counted in the market's sessions: on a Monday
    morning an NYSE series' history is the previous Thursday's close (Good Friday)."""
    thursday = datetime(2025, 4, 17, tzinfo=UTC)
    monday = thursday + timedelta(days=4)
    clock = Clock(at(monday, 13, 33, 5))  # 09:33 New York: bars 09:30-09:32 closed
    aapl = Subscription("AAPL", "stock", "alpaca", "1m", history_bars=6)
    btc = Subscription("BTC/USDT", "crypto", "binance", "1m", history_bars=6)
    stock = ListFeed("alpaca", "stock", clock, make_bars(aapl, at(thursday, 19, 30), 30, "196")
                     + make_bars(aapl, at(monday, 13, 30), 3, "197"))
    crypto = ListFeed("binance", "crypto", clock, make_bars(btc, at(monday, 13, 0), 33))
    with ingest_for(db_url, {"alpaca": stock, "binance": crypto}, [aapl, btc],
                    clock) as ingest:
        ingest.run_once()
    # the 3 bars of Monday and 4 of Thursday's last minutes: 6 before the latest, and it
    assert stored_ts(db_url, aapl) == [at(thursday, 19, m) for m in range(56, 60)] + [
        at(monday, 13, m) for m in range(30, 33)]
    assert stored_ts(db_url, btc) == [at(monday, 13, m) for m in range(26, 33)]
    assert errors(db_url, "GAP") == []


# ------------------------------------------------------------------------------ plumbing

def test_each_batch_is_one_insert_and_notifies_listeners(db_url: str) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    feed = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 53), 7))
    with psycopg.connect(db_url, autocommit=True) as listener:
        listener.execute("LISTEN mmats_bars")
        with ingest_for(db_url, {"binance": feed}, [BTC], clock, batch_size=3,
                        backfill_from=at(WED, 9, 53)) as ingest:
            assert ingest.run_once()[0].inserted == 7
        got = [json.loads(n.payload) for n in listener.notifies(timeout=5, stop_after=3)]
        instrument_id = listener.execute(
            "SELECT instrument_id FROM market.instruments WHERE venue = 'binance' "
            "AND symbol = 'BTC/USDT'").fetchone()[0]  # type: ignore[index]
    assert [(g["instrument_id"], g["timeframe"], g["n"]) for g in got] == [
        (instrument_id, "1m", 3), (instrument_id, "1m", 3), (instrument_id, "1m", 1)]
    assert datetime.fromisoformat(got[0]["first"]) == at(WED, 9, 53)
    assert datetime.fromisoformat(got[-1]["last"]) == at(WED, 9, 59)


def test_heartbeats_name_every_feed_and_its_last_bar(db_url: str) -> None:
    clock = Clock(at(WED, 10, 0, 5))
    crypto = ListFeed("binance", "crypto", clock, make_bars(BTC, at(WED, 9, 58), 2))
    forex = ListFeed("oanda", "forex", clock, make_bars(EUR_1H, at(WED, 8, 0), 2, "1.1"))
    with ingest_for(db_url, {"binance": crypto, "forex": forex}, [BTC, EUR_1H], clock,
                    backfill_from=at(WED, 8, 0), name="ingest-hb") as ingest:
        ingest.run_once()
        kind, state, pid, beats, detail = worker(db_url, "ingest-hb")  # type: ignore[misc]
        assert (kind, state, pid) == ("ingest", "running", os.getpid())
        assert detail["feeds"]["binance"]["series"]["binance:BTC/USDT 1m"]["last_bar"] == \
            "2025-07-09T09:59:00+00:00"
        assert detail["feeds"]["forex"]["series"]["oanda:EUR_USD 1h"]["last_bar"] == \
            "2025-07-09T09:00:00+00:00"
        ingest.run_once()
        assert worker(db_url, "ingest-hb")[3] == beats + 1  # type: ignore[index]


def test_run_isolates_feeds_in_threads_and_sigterm_ends_it_within_a_second(
        db_url: str) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    start = now - 10 * MIN
    good = ListFeed("binance", "crypto", lambda: datetime.now(UTC),  # type: ignore[arg-type]
                    make_bars(BTC, start, 10))
    broken = ListFeed("alpaca", "stock", lambda: datetime.now(UTC))  # type: ignore[arg-type]
    broken.down = RuntimeError("adapter bug")  # not a broker error: a surprise
    ingest = LiveIngest(db_url, {"binance": good, "alpaca": broken}, [AAPL, BTC],
                        backfill_from=start, name="ingest-loop",
                        backoff=BackoffPolicy(base=0.05, cap=0.2), rng=random.Random(1))
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=ingest.run)
    try:
        stop_on_signals(ingest)
        thread.start()
        deadline = wall.monotonic() + 15
        while wall.monotonic() < deadline and not (
                len(stored_ts(db_url, BTC)) == 10 and len(broken.calls) >= 3):
            wall.sleep(0.05)
        assert stored_ts(db_url, BTC) == minutes(start, 10)  # despite the other feed's errors
        assert len(broken.calls) >= 3  # that one is retried, in its own thread
        _, state, _, _, detail = worker(db_url, "ingest-loop")  # type: ignore[misc]
        assert state == "degraded" and detail["feeds"]["alpaca"]["state"] == "retrying"
        t0 = wall.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        thread.join(2)
        assert not thread.is_alive() and wall.monotonic() - t0 < 1.0
    finally:
        ingest.stop()
        thread.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert worker(db_url, "ingest-loop")[1] == "stopped"  # type: ignore[index]
    [(message, _)] = errors(db_url, "INGEST_ERROR")  # reported once, not once per retry
    assert "adapter bug" in message
