"""US stock bars from Alpaca's market data API (alpaca-py's `StockHistoricalDataClient`).

alpaca-py pages GET /v2/stocks/bars itself, following `next_page_token` until it is null.
Alpaca's `end` is inclusive and its last bar may still be forming, so this feed trims the
answer to the contract: open times in [since, until), closed at `now`, oldest first.
A bar's period is [t, t + timeframe): a daily bar (stamped midnight New York time) counts as
closed at the next midnight, a weekly one seven days after its open, which is never early.
A malformed bar (a missing or unreadable time, a null or non-numeric price) is refused alone
with one log line naming the venue, symbol, timeframe, bar time and problem; the other bars
are returned. A missing volume is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
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
    dec,
    parse_ts,
    prepare_client,
)
from workers.brokers.errors import Reject
from workers.feeds.base import TIMEFRAME_SECONDS, FeedBar, RefusedRows
from workers.runtime.log import get

log = get("feeds.alpaca")

DEFAULT_TIMEOUT = 30.0
REFUSED_MEMORY = 1000  # refused bars remembered, so a bad bar is logged once, not per fetch
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
    """A FeedBar from Alpaca's bar JSON (t o h l c v) or alpaca-py's Bar model; a missing
    price or time raises ValueError (a missing volume is 0)."""
    if isinstance(row, Mapping):
        ts, o, h, low, c, v = (row.get(k) for k in ("t", "o", "h", "l", "c", "v"))
    else:
        ts, o, h, low, c, v = (row.timestamp, row.open, row.high, row.low, row.close,
                               row.volume)
    if ts is None:
        raise ValueError("no time")
    values = {}
    for name, value in (("open", o), ("high", h), ("low", low), ("close", c), ("volume", v)):
        try:
            number = dec(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a number") from None
        if number is None and name != "volume":
            raise ValueError(f"{name} is missing (null)")
        values[name] = number if number is not None else Decimal(0)
    return FeedBar(symbol=symbol, timeframe=timeframe, ts=parse_ts(ts), **values)


def _row_time(row: Any) -> str:
    """The bar time of a row as a log line names it (its raw text if unreadable)."""
    raw = row.get("t") if isinstance(row, Mapping) else getattr(row, "timestamp", None)
    try:
        return f"{parse_ts(raw):%Y-%m-%d %H:%M:%S} UTC"
    except (TypeError, ValueError):
        return f"(time {raw!r})"[:80]


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
        self._refused = RefusedRows(VENUE, log, REFUSED_MEMORY)

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
        bars = [bar for row in _bar_rows(answer, symbol)
                if (bar := self._bar(symbol, timeframe, row)) is not None]
        step = timedelta(seconds=TIMEFRAME_SECONDS[timeframe])
        return closed_bars(bars, step, since, until, now)

    def _bar(self, symbol: str, timeframe: str, row: Any) -> FeedBar | None:
        """The FeedBar of one row, or None: a malformed row is refused alone, with one log
        line (not one per fetch that sees it again)."""
        try:
            return _feed_bar(symbol, timeframe, row)
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            problem = str(err).removeprefix(f"{VENUE}: ") or type(err).__name__
        self._refused.refuse(symbol, timeframe, _row_time(row), problem)
        return None
