"""US stock bars from Alpaca's market data API (alpaca-py's `StockHistoricalDataClient`).

alpaca-py pages GET /v2/stocks/bars itself, following `next_page_token` until it is null.
Alpaca's `end` is inclusive and its last bar may still be forming, so this feed trims the
answer to the contract: open times in [since, until), closed at `now`, oldest first.
A bar's period is [t, t + timeframe): a daily bar (stamped midnight New York time) counts as
closed at the next midnight, a weekly one seven days after its open, which is never early.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from alpaca.data.enums import DataFeed
from alpaca.data.historical.stock import StockHistoricalDataClient
from alpaca.data.models import BarSet
from alpaca.data.requests import StockBarsRequest
from alpaca.data.timeframe import TimeFrame, TimeFrameUnit

from workers.brokers.alpaca_broker import (
    VENUE,
    call_venue,
    credential_pair,
    dec0,
    parse_ts,
    prepare_client,
)
from workers.brokers.errors import Reject
from workers.feeds.base import TIMEFRAME_SECONDS, FeedBar

DEFAULT_TIMEOUT = 30.0
TIMEFRAMES = {
    "1m": (1, TimeFrameUnit.Minute), "5m": (5, TimeFrameUnit.Minute),
    "15m": (15, TimeFrameUnit.Minute), "1h": (1, TimeFrameUnit.Hour),
    "4h": (4, TimeFrameUnit.Hour), "1d": (1, TimeFrameUnit.Day), "1w": (1, TimeFrameUnit.Week),
}


def alpaca_timeframe(timeframe: str) -> TimeFrame:
    """Alpaca's TimeFrame for an MMATS timeframe (1m 5m 15m 1h 4h 1d 1w)."""
    if timeframe not in TIMEFRAMES:
        raise ValueError(f"{VENUE}: timeframe {timeframe!r} is not one of "
                         f"{', '.join(TIMEFRAMES)}")
    amount, unit = TIMEFRAMES[timeframe]
    return TimeFrame(amount, unit)


def _utc(ts: datetime, name: str) -> datetime:
    if ts.tzinfo is None:
        raise ValueError(f"{VENUE}: {name} must be an aware datetime, got naive {ts}")
    return ts.astimezone(UTC)


def _bar_rows(answer: Any, symbol: str) -> list[Any]:
    """The bars of `symbol` in get_stock_bars' answer: a dict of lists from a raw-data
    client, a BarSet from a model client."""
    data = answer.data if isinstance(answer, BarSet) else answer
    return list((data or {}).get(symbol) or [])


def _feed_bar(symbol: str, timeframe: str, row: Any) -> FeedBar:
    """A FeedBar from Alpaca's bar JSON (t o h l c v) or alpaca-py's Bar model."""
    if isinstance(row, Mapping):
        ts, o, h, low, c, v = (row[k] for k in ("t", "o", "h", "l", "c", "v"))
    else:
        ts, o, h, low, c, v = (row.timestamp, row.open, row.high, row.low, row.close,
                               row.volume)
    return FeedBar(symbol=symbol, timeframe=timeframe, ts=parse_ts(ts), open=dec0(o),
                   high=dec0(h), low=dec0(low), close=dec0(c), volume=dec0(v))


def closed_bars(bars: Iterable[FeedBar], step: timedelta, since: datetime,
                until: datetime | None, now: datetime) -> list[FeedBar]:
    """The bars opened in [since, until) whose period ended by `now`, oldest first, one per
    open time."""
    keep = {b.ts: b for b in bars
            if b.ts >= since and (until is None or b.ts < until) and b.ts + step <= now}
    return [keep[ts] for ts in sorted(keep)]


class AlpacaFeed:
    """Closed US stock bars from Alpaca; `feed` is "iex" (free) or "sip" (paid)."""

    venue = VENUE
    market = "stock"

    def __init__(self, credentials: Mapping[str, str], *,
                 client: StockHistoricalDataClient | None = None,
                 now: Callable[[], datetime] | None = None, feed: str = "iex",
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        key, secret = credential_pair(credentials)
        self._client = client or StockHistoricalDataClient(api_key=key, secret_key=secret,
                                                           raw_data=True)
        prepare_client(self._client, timeout)
        self._now = now or (lambda: datetime.now(UTC))
        self._feed = DataFeed(feed)

    def fetch_bars(self, symbol: str, timeframe: str, since: datetime,
                   until: datetime | None = None) -> Sequence[FeedBar]:
        tf = alpaca_timeframe(timeframe)
        since = _utc(since, "since")
        until = _utc(until, "until") if until is not None else None
        now = _utc(self._now(), "now")
        end = min(until, now) if until is not None else now
        if end <= since:
            return []
        query = StockBarsRequest(symbol_or_symbols=symbol, timeframe=tf, start=since, end=end,
                                 feed=self._feed)
        answer = call_venue(f"{timeframe} bars {symbol}",
                            lambda: self._client.get_stock_bars(query), not_found=Reject,
                            not_found_code="UNKNOWN_SYMBOL", invalid_code="INVALID_REQUEST")
        bars = [_feed_bar(symbol, timeframe, row) for row in _bar_rows(answer, symbol)]
        step = timedelta(seconds=TIMEFRAME_SECONDS[timeframe])
        return closed_bars(bars, step, since, until, now)
