"""OANDA v20 market data: closed mid-price candles, and a price stream that notices stalls.

Bars come from InstrumentsCandles with `price=M` (mid), aligned on UTC midnight and Monday
like MMATS's own buckets (OANDA aligns days on 17:00 New York by default), paged by
`from` + `count`, incomplete candles dropped. A malformed candle (no mid prices, a value
that is no number, an unreadable time) is refused alone with one log line naming the
venue, symbol, timeframe, candle time and problem; the other candles are returned.

OANDA sends prices and account transactions on separate streams, and a price stream is
known to stall while its HEARTBEAT lines keep arriving (LEAN #4045): the connection looks
healthy and nothing ever times out. `PriceStreamWatchdog` is the pure logic that tells a
stalled stream (heartbeats, no PRICE for too long while the market is open) from a silent
one (nothing at all) and from a closed market (the forex weekend); `OandaFeed.stream_prices`
raises Retry on either fault so its caller reconnects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import numpy as np
import oandapyV20
import requests
from oandapyV20.endpoints import instruments, pricing
from oandapyV20.exceptions import V20Error
from oandapyV20.oandapyV20 import TRADING_ENVIRONMENTS

from workers.backtest.data import from_us, to_us
from workers.brokers.errors import Reject, Retry, Stop
from workers.brokers.oanda_broker import (
    VENUE,
    OandaEnvironment,
    call,
    connect,
    credentials_account,
    credentials_token,
    parse_time,
    response_shape,
    rfc3339,
    to_instrument,
    to_symbol,
    translate,
)
from workers.feeds.base import TIMEFRAME_SECONDS, FeedBar, RefusedRows
from workers.ingest.calendars import sessions
from workers.runtime.log import get

log = get("feeds.oanda")

GRANULARITIES = {"1m": "M1", "5m": "M5", "15m": "M15", "1h": "H1", "4h": "H4", "1d": "D",
                 "1w": "W"}
MAX_CANDLES = 5000  # OANDA's limit on `count`
REFUSED_MEMORY = 1000  # refused candles remembered, so a bad one is logged once, not per fetch
# MMATS buckets bars from a Monday at 00:00 UTC (date_bin origin 2000-01-03)
ALIGNMENT = {"dailyAlignment": 0, "alignmentTimezone": "UTC", "weeklyAlignment": "Monday"}

Clock = Callable[[], datetime]
StreamState = Literal["ok", "stalled", "silent", "closed"]

def utc_now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- market hours

def forex_market_open(at: datetime) -> bool:
    """Whether the forex market trades at `at`: the FX_24X5 calendar's week, Sunday 17:00
    to Friday 17:00 New York time (the edge moves with New York's daylight saving time)."""
    us = to_us(at)
    opens, closes = sessions("FX_24X5", us, us)
    i = int(np.searchsorted(closes, us, side="right"))
    return i < len(opens) and int(opens[i]) <= us


def forex_week_open(at: datetime) -> datetime:
    """When the FX_24X5 week that `at` falls in (or the last one, on a weekend) began."""
    us = to_us(at)
    opens, _closes = sessions("FX_24X5", us, us)
    return from_us(int(opens[int(np.searchsorted(opens, us, side="right")) - 1]))


# ---------------------------------------------------------------- the watchdog

class PriceStreamWatchdog:
    """Judges a pricing stream from the messages it is fed, by an injectable clock.

    - `silent`: no message at all (not even a HEARTBEAT) for more than `silent_after`
      seconds since the last one (or since `reset`).
    - `closed`: the forex market is shut, so an absence of prices is expected.
    - `stalled`: messages still arrive but no PRICE has for more than `stall_after`
      seconds of open market (counted from the last price, the last `reset`, or the week's
      open, whichever is latest, so the Sunday open does not look like a stall).
    - `ok` otherwise.
    """

    def __init__(self, *, stall_after: float = 60.0, silent_after: float = 20.0,
                 clock: Clock | None = None) -> None:
        self.stall_after = timedelta(seconds=stall_after)
        self.silent_after = timedelta(seconds=silent_after)
        self._clock = clock or utc_now
        self.received = 0
        self.reset()

    def reset(self) -> None:
        """Start judging afresh (a new connection)."""
        self.started = self._clock()
        self.last_message: datetime | None = None
        self.last_price: datetime | None = None

    def observe(self, message: Mapping[str, Any]) -> None:
        """Record one stream message (a PRICE or a HEARTBEAT dict) as arrived now."""
        self.received += 1
        now = self._clock()
        self.last_message = now
        if message.get("type") == "PRICE":
            self.last_price = now

    def state(self) -> StreamState:
        now = self._clock()
        if now - (self.last_message or self.started) > self.silent_after:
            return "silent"
        if not forex_market_open(now):
            return "closed"
        quiet_since = max(self.last_price or self.started, self.started, forex_week_open(now))
        return "stalled" if now - quiet_since > self.stall_after else "ok"

    @property
    def stalled(self) -> bool:
        return self.state() == "stalled"

    @property
    def silent(self) -> bool:
        return self.state() == "silent"


# ---------------------------------------------------------------- prices

@dataclass(frozen=True)
class PriceTick:
    """Top of book from one PRICE message."""

    symbol: str
    bid: Decimal
    ask: Decimal
    ts: datetime
    tradeable: bool


def tick_from(message: Mapping[str, Any]) -> PriceTick:
    """A PriceTick from a pricing-stream PRICE message (best bid and ask of the ladder)."""
    bids, asks = message.get("bids") or [], message.get("asks") or []
    bid = bids[0]["price"] if bids else message["closeoutBid"]
    ask = asks[0]["price"] if asks else message["closeoutAsk"]
    tradeable = message.get("tradeable", message.get("status") == "tradeable")
    return PriceTick(symbol=to_symbol(message["instrument"]), bid=Decimal(bid),
                     ask=Decimal(ask), ts=parse_time(message["time"]), tradeable=bool(tradeable))


def bar_from(candle: Mapping[str, Any], symbol: str, timeframe: str) -> FeedBar:
    mid = candle["mid"]
    return FeedBar(symbol=symbol, timeframe=timeframe, ts=parse_time(candle["time"]),
                   open=Decimal(mid["o"]), high=Decimal(mid["h"]), low=Decimal(mid["l"]),
                   close=Decimal(mid["c"]), volume=Decimal(candle["volume"]))


# ---------------------------------------------------------------- the feed

class OandaFeed:
    """Candles and streamed prices of one OANDA environment (practice or live)."""

    venue = VENUE
    market = "forex"

    def __init__(self, credentials: Mapping[str, str], endpoint: OandaEnvironment, *,
                 api: oandapyV20.API | None = None, now: Clock | None = None,
                 page_size: int = MAX_CANDLES) -> None:
        token = credentials_token(credentials)
        self._api = connect(token, endpoint, api)
        self._credentials = dict(credentials)
        self._now = now or utc_now
        self.page_size = max(1, min(page_size, MAX_CANDLES))
        self.environment: OandaEnvironment = endpoint
        self.endpoint_url: str = TRADING_ENVIRONMENTS[endpoint]["api"]
        self.stream_url: str = TRADING_ENVIRONMENTS[endpoint]["stream"]
        self._refused = RefusedRows(VENUE, log, REFUSED_MEMORY)

    def fetch_bars(self, symbol: str, timeframe: str, since: datetime,
                   until: datetime | None = None) -> Sequence[FeedBar]:
        """Closed mid bars opening in [since, until), oldest first, paged by `count`."""
        granularity = GRANULARITIES.get(timeframe)
        if granularity is None:
            raise Reject(f"fetch_bars {symbol}: unknown timeframe {timeframe!r}", venue=VENUE,
                         code="INVALID_TIMEFRAME")
        for bound in (since, until):
            if bound is not None:
                rfc3339(bound)  # refuses a naive time before it meets an aware one
        step = timedelta(seconds=TIMEFRAME_SECONDS[timeframe])
        now = self._now()
        end = min(until, now) if until is not None else now
        bars: list[FeedBar] = []
        cursor = since
        while cursor < end:
            count = min(self.page_size, math.ceil((end - cursor) / step))
            candles = self._candles(symbol, granularity, cursor, count)
            bars.extend(self._closed(candles, symbol, timeframe, since, end, now))
            if len(candles) < count or not all(_complete(c) for c in candles):
                break  # reached the present: nothing closed lies beyond
            with response_shape(f"fetch_bars {symbol}"):  # not one readable time: no page
                newest = max(t for c in candles if (t := _time(c)) is not None)
            if newest + step <= cursor:
                break  # a page that does not move on (its last candle unreadable)
            cursor = newest + step
        return bars

    def stream_prices(self, symbols: Sequence[str], on_price: Callable[[PriceTick], None],
                      watchdog: PriceStreamWatchdog) -> None:
        """Hand each streamed price of `symbols` to `on_price` until the stream fails.

        Never returns normally: a stalled or silent stream (judged by `watchdog` after each
        message), an ended stream and any transport error all raise Retry, so the caller
        reconnects. A stream that sends nothing at all is also ended by the client's read
        timeout."""
        names = ",".join(to_instrument(s) for s in symbols)
        what = f"stream_prices {','.join(symbols)}"
        request = pricing.PricingStream(self._account(), params={"instruments": names})
        watchdog.reset()
        messages = self._api.request(request)
        try:
            for message in guarded(messages, what):
                watchdog.observe(message)
                if message.get("type") == "PRICE":
                    with response_shape(what):
                        tick = tick_from(message)
                    on_price(tick)
                state = watchdog.state()
                if state in ("stalled", "silent"):
                    raise Retry(f"{what}: price stream {state} (last price "
                                f"{stamp(watchdog.last_price)}, {watchdog.received} messages)",
                                venue=VENUE, code=f"PRICE_STREAM_{state.upper()}")
        finally:
            messages.close()
        raise Retry(f"{what}: price stream ended", venue=VENUE, code="PRICE_STREAM_ENDED")

    def _account(self) -> str:
        return credentials_account(self._credentials)

    def _candles(self, symbol: str, granularity: str, start: datetime,
                 count: int) -> list[dict[str, Any]]:
        params = {"price": "M", "granularity": granularity, "from": rfc3339(start),
                  "count": count, **ALIGNMENT}
        request = instruments.InstrumentsCandles(to_instrument(symbol), params=params)
        response = call(self._api, request, f"fetch_bars {symbol}", missing=Reject)
        with response_shape(f"fetch_bars {symbol}"):
            return list(response["candles"])

    def _closed(self, candles: Sequence[Any], symbol: str, timeframe: str,
                since: datetime, end: datetime, now: datetime) -> list[FeedBar]:
        """The complete candles opening in [since, end) whose period has ended at `now`; a
        malformed one is refused alone."""
        step = timedelta(seconds=TIMEFRAME_SECONDS[timeframe])
        bars = []
        for c in candles:
            if not _complete(c):
                continue
            try:
                bar = bar_from(c, symbol, timeframe)
            except (KeyError, TypeError, IndexError, AttributeError, InvalidOperation,
                    ValueError) as err:
                self._refuse(c, symbol, timeframe, err)
                continue
            if since <= bar.ts < end and bar.ts + step <= now:
                bars.append(bar)
        return bars

    def _refuse(self, candle: Any, symbol: str, timeframe: str, err: Exception) -> None:
        """One log line per refused candle (not one per fetch that sees it again)."""
        ts = _time(candle)
        when = f"{ts:%Y-%m-%d %H:%M:%S} UTC" if ts is not None else "(no readable time)"
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        problem = f"malformed candle ({detail}): {candle!r}"[:300]
        self._refused.refuse(symbol, timeframe, when, problem, key=detail)


def _complete(candle: Any) -> bool:
    return isinstance(candle, Mapping) and bool(candle.get("complete"))


def _time(candle: Any) -> datetime | None:
    """A candle's open time, or None if it has no readable one."""
    try:
        return parse_time(candle["time"])
    except (KeyError, TypeError, IndexError, AttributeError, ValueError):
        return None


def stamp(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ") if ts else "none"


def guarded(messages: Iterator[dict[str, Any]], what: str) -> Iterator[dict[str, Any]]:
    """`messages` with transport failures translated: only reading the stream is guarded,
    so an exception raised by a price callback passes through unchanged."""
    while True:
        try:
            message = next(messages)
        except StopIteration:
            return
        except (V20Error, requests.RequestException, ValueError) as err:
            raise translate(err, what, Stop) from err
        yield message
