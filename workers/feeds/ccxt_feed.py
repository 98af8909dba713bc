"""Closed crypto bars from any ccxt exchange, through its unified sync `fetch_ohlcv`.

`CcxtFeed.fetch_bars` pages forward from `since`: each call asks for the exchange's
per-call maximum (ccxt's `features`), the next page starts one bar after the newest bar
received, and paging stops when a page brings only bars already seen, or once it has
passed `until` (or now). An empty page does not end the paging while the range goes on
beyond the window it covered: Coinbase and OKX answer only the window [since, since +
limit bars] and omit candles without trades, so a quiet night, an outage or a backfill
from before the listing is an empty window, and the next page starts one window later.
The bar still open at `now` is dropped, duplicates are dropped, and only bars whose open
time lies in [since, until) are returned, oldest first. `now` is the earlier of this
machine's clock and the venue's (the HTTP `Date` header of the newest page, to the second,
where the venue sends one): a clock running ahead of the venue's would otherwise take the
bar still forming at the venue for closed, store it with part of its trades, and keep it
(a stored bar is never replaced).

A malformed row (no open time, a null or non-numeric price, too few fields) is refused
alone with one log line naming the venue, symbol, timeframe, bar time and problem; the
other bars of the page are returned.

Markets are loaded once, with the broker's spot options (`SPOT_OPTIONS`).

Pacing: a feed that builds its own exchange turns ccxt's blocking limiter off and waits
`rateLimit` milliseconds (ccxt's minimum gap between two requests) between pages through
the injected `sleep`; an injected exchange whose `enableRateLimit` is on is left to
ccxt's own limiter. Errors are mapped like the broker's (`map_ccxt_error`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from email.utils import parsedate_to_datetime
from typing import Any

import ccxt

from workers.brokers import errors
from workers.brokers.ccxt_broker import (
    SPOT_OPTIONS,
    HttpStatusProbe,
    build_exchange,
    datetime_to_ms,
    map_ccxt_error,
    ms_to_datetime,
    to_decimal,
)
from workers.feeds.base import TIMEFRAME_SECONDS, FeedBar, RefusedRows
from workers.runtime.log import get

log = get("feeds.ccxt")

DEFAULT_PAGE_LIMIT = 500  # when ccxt does not say how many bars one call may return
REFUSED_MEMORY = 1000  # refused rows remembered, so a bad row is logged once, not per fetch
_FIELDS = ("open", "high", "low", "close", "volume")


class CcxtFeed:
    """The MarketDataFeed contract for one ccxt exchange (public market data, no keys)."""

    market = "crypto"

    def __init__(self, exchange_id: str, *, exchange: ccxt.Exchange | None = None,
                 now: Callable[[], datetime] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.venue = f"ccxt:{exchange_id}"
        self.exchange_id = exchange_id
        self._exchange = exchange if exchange is not None else build_exchange(
            exchange_id, self.venue, {"enableRateLimit": False})
        self._exchange.options = self._exchange.deep_extend(self._exchange.options,
                                                            SPOT_OPTIONS.get(exchange_id, {}))
        self._now = now or (lambda: datetime.now(UTC))
        self._sleep = sleep
        self._http = HttpStatusProbe(self._exchange)
        self._refused = RefusedRows(self.venue, log, REFUSED_MEMORY)

    @property
    def exchange(self) -> Any:
        return self._exchange

    @property
    def page_limit(self) -> int:
        """How many bars one fetch_ohlcv call asks for: the exchange's documented maximum."""
        features = (getattr(self._exchange, "features", None) or {}).get("spot") or {}
        return int((features.get("fetchOHLCV") or {}).get("limit") or DEFAULT_PAGE_LIMIT)

    def fetch_bars(self, symbol: str, timeframe: str, since: datetime,
                   until: datetime | None = None) -> Sequence[FeedBar]:
        """Closed bars of `symbol` opening in [since, until), oldest first."""
        step_ms = self._timeframe_ms(symbol, timeframe)
        start, now_ms = datetime_to_ms(since), datetime_to_ms(self._now())
        end = min(datetime_to_ms(until), now_ms) if until is not None else now_ms
        self._call(symbol, self._exchange.load_markets)
        window = self.page_limit * step_ms  # the span one page covers at most
        rows: dict[int, list[Any]] = {}
        cursor, first = start, True
        while cursor < end:
            if not first:
                self._pause()
            first = False
            page = self._page(symbol, timeframe, cursor)
            stamped = [(ts, r) for r in page
                       if (ts := self._open_ms(symbol, timeframe, r)) is not None]
            new = {ts: r for ts, r in stamped if ts not in rows}
            if new:
                rows.update(new)
                cursor = max(new) + step_ms
            elif stamped or cursor + window >= end:
                break  # only bars already seen, or the window reached the end: no more
            else:  # an empty window (no trades, an outage, before the listing): go on
                cursor += window
        # (the venue's clock, where it says: a bar still open there is not closed)
        venue_ms = venue_clock_ms(getattr(self._exchange, "last_response_headers", None))
        closed_by = min(now_ms, venue_ms) if venue_ms is not None else now_ms
        closed = (r for ts, r in sorted(rows.items())
                  if start <= ts < end and ts + step_ms <= closed_by)
        return [bar for r in closed if (bar := self._bar(symbol, timeframe, r)) is not None]

    def _timeframe_ms(self, symbol: str, timeframe: str) -> int:
        """The bar length in ms; a timeframe MMATS or the exchange does not know is refused."""
        offered = getattr(self._exchange, "timeframes", None) or {}
        if timeframe not in TIMEFRAME_SECONDS or (offered and timeframe not in offered):
            raise errors.Reject(f"fetch_bars {symbol}: timeframe {timeframe!r} is not offered "
                                f"(MMATS: {', '.join(TIMEFRAME_SECONDS)})", venue=self.venue,
                                code="UNSUPPORTED_TIMEFRAME")
        return TIMEFRAME_SECONDS[timeframe] * 1000

    def _page(self, symbol: str, timeframe: str, since_ms: int) -> list[list[Any]]:
        limit = self.page_limit
        return self._call(symbol, lambda: self._exchange.fetch_ohlcv(symbol, timeframe,
                                                                     since_ms, limit))

    def _pause(self) -> None:
        """Wait ccxt's `rateLimit` between pages unless ccxt's own limiter already does."""
        if not getattr(self._exchange, "enableRateLimit", False):
            self._sleep(float(self._exchange.rateLimit) / 1000.0)

    def _call(self, symbol: str, fn: Callable[[], Any]) -> Any:
        self._http.reset()
        try:
            return fn()
        except ccxt.BaseError as exc:
            raise map_ccxt_error(exc, venue=self.venue, exchange=self._exchange,
                                 action="fetch_bars", symbol=symbol,
                                 http_status=self._http.status) from exc

    def _open_ms(self, symbol: str, timeframe: str, row: Any) -> int | None:
        """The row's open time in ms, or None (refused with one line) if it has none."""
        try:
            ts = row[0]
            if isinstance(ts, bool):
                raise TypeError
            return int(ts)
        except (TypeError, ValueError, OverflowError, IndexError, KeyError):
            self._refuse(symbol, timeframe, f"row {row!r}"[:120], "no valid open time")
            return None

    def _bar(self, symbol: str, timeframe: str, row: list[Any]) -> FeedBar | None:
        """The FeedBar of a row, or None (refused with one line) if a value is missing or
        not a number; a missing volume is 0."""
        ts = ms_to_datetime(int(row[0]))
        when = f"{ts:%Y-%m-%d %H:%M:%S} UTC"
        if len(row) < 6:
            self._refuse(symbol, timeframe, when, f"{len(row)} fields, expected 6 "
                         f"(time, open, high, low, close, volume): {row!r}"[:200])
            return None
        values: dict[str, Decimal] = {}
        for name, value in zip(_FIELDS, row[1:6], strict=True):
            if value is None and name == "volume":
                value = 0
            if value is None:
                self._refuse(symbol, timeframe, when, f"{name} is missing (null)")
                return None
            try:
                values[name] = to_decimal(value)
            except ValueError:
                self._refuse(symbol, timeframe, when, f"{name} {value!r} is not a number"[:200])
                return None
        return FeedBar(symbol=symbol, timeframe=timeframe, ts=ts, **values)

    def _refuse(self, symbol: str, timeframe: str, when: str, problem: str) -> None:
        self._refused.refuse(symbol, timeframe, when, problem)


def venue_clock_ms(headers: Mapping[str, str] | None) -> int | None:
    """The venue's time from an HTTP response's `Date` header (whole seconds, so never
    later than the venue's clock), in ms; None without a readable one."""
    if not headers:
        return None
    try:
        value = headers.get("Date") or headers.get("date")
        if not value:
            return None
        at = parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError, AttributeError):
        return None
    if at.tzinfo is None:  # (RFC 7231 dates are GMT; "-0000" parses naive)
        at = at.replace(tzinfo=UTC)
    return datetime_to_ms(at)
