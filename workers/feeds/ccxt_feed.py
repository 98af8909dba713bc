"""Closed crypto bars from any ccxt exchange, through its unified sync `fetch_ohlcv`.

`CcxtFeed.fetch_bars` pages forward from `since`: each call asks for the exchange's
per-call maximum (ccxt's `features`), the next page starts one bar after the newest bar
received, and paging stops when a page brings no bar not already seen, or once it has
passed `until` (or now). The bar still open at `now` is dropped, duplicates are dropped,
and only bars whose open time lies in [since, until) are returned, oldest first.

Markets are loaded once, with the broker's spot options (`SPOT_OPTIONS`).

Pacing: a feed that builds its own exchange turns ccxt's blocking limiter off and waits
`rateLimit` milliseconds (ccxt's minimum gap between two requests) between pages through
the injected `sleep`; an injected exchange whose `enableRateLimit` is on is left to
ccxt's own limiter. Errors are mapped like the broker's (`map_ccxt_error`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
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
from workers.feeds.base import TIMEFRAME_SECONDS, FeedBar

DEFAULT_PAGE_LIMIT = 500  # when ccxt does not say how many bars one call may return


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
        rows: dict[int, list[Any]] = {}
        cursor, first = start, True
        while cursor < end:
            if not first:
                self._pause()
            first = False
            page = self._page(symbol, timeframe, cursor)
            new = {int(r[0]): r for r in page if int(r[0]) not in rows}
            if not new:
                break
            rows.update(new)
            cursor = max(new) + step_ms
        closed = (r for ts, r in sorted(rows.items())
                  if start <= ts < end and ts + step_ms <= now_ms)
        return [self._bar(symbol, timeframe, r) for r in closed]

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

    @staticmethod
    def _bar(symbol: str, timeframe: str, row: list[Any]) -> FeedBar:
        ts, open_, high, low, close, volume = row[:6]
        return FeedBar(symbol=symbol, timeframe=timeframe, ts=ms_to_datetime(ts),
                       open=to_decimal(open_), high=to_decimal(high), low=to_decimal(low),
                       close=to_decimal(close),
                       volume=to_decimal(volume if volume is not None else 0))
