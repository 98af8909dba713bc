"""The market-data feed contract: closed bars, in time order, in MMATS's units.

A feed answers `fetch_bars(symbol, timeframe, since, until)` with the bars whose open time
lies in [since, until), oldest first, paging through the venue's limits itself. Only
*closed* bars are returned: a bar whose period has not ended at `now` is left out, so a
strategy never sees a bar that may still change. Prices and volumes are `Decimal`, times
aware UTC. Feeds raise the classes of `workers.brokers.errors` (`Retry`, `BackOff`, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Protocol, runtime_checkable
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class FeedBar:
    symbol: str
    timeframe: str  # one of market.timeframe: 1m 5m 15m 1h 4h 1d 1w
    ts: datetime    # the bar's open time, UTC
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal


@runtime_checkable
class MarketDataFeed(Protocol):
    venue: str
    market: str  # crypto | stock | forex

    def fetch_bars(self, symbol: str, timeframe: str, since: datetime,
                   until: datetime | None = None) -> Sequence[FeedBar]: ...


TIMEFRAME_SECONDS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14400,
                     "1d": 86400, "1w": 604800}

# no price or volume of a real market reaches it (the trading core refuses such numbers too)
MAX_VALUE = Decimal("1e18")

_NEW_YORK = ZoneInfo("America/New_York")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _day_aligned(ts: datetime, weekly: bool) -> bool:
    """Daily bars open at UTC midnight (ccxt, OANDA here), New York midnight (Alpaca) or
    17:00 New York (the forex day); weekly ones at midnight on a Monday, or at 17:00 New
    York on a Sunday (the forex week)."""
    utc, ny = ts.astimezone(UTC), ts.astimezone(_NEW_YORK)
    anchors = [(utc, time(0), 0), (ny, time(0), 0), (ny, time(17), 6)]
    return any(t.timetz().replace(tzinfo=None) == at and (not weekly or t.weekday() == wd)
               for t, at, wd in anchors)


def misalignment(ts: datetime, timeframe: str) -> str | None:
    """Why `ts` (aware) is not the open time of a `timeframe` bar, or None. Intraday bars
    open on multiples of their length from midnight UTC."""
    if timeframe in ("1d", "1w"):
        if _day_aligned(ts, timeframe == "1w"):
            return None
        when = ("midnight UTC or New York on a Monday, or 17:00 New York on a Sunday"
                if timeframe == "1w" else "midnight UTC or New York, or 17:00 New York")
        return f"not aligned to {timeframe} (a {timeframe} bar opens at {when})"
    step_us = TIMEFRAME_SECONDS[timeframe] * 1_000_000
    off = ((ts - _EPOCH) // _US) % step_us
    return None if off == 0 else f"not aligned to {timeframe} ({off / 1e6:g}s past the boundary)"



class RefusedRows:
    """A feed's log of the rows it could not read: one WARNING line per row (naming the
    venue, symbol, timeframe, bar time and problem), not one per fetch that sees it
    again; the latest `memory` rows are remembered."""

    def __init__(self, venue: str, log: logging.Logger, memory: int = 1000) -> None:
        self.venue, self.log, self.memory = venue, log, memory
        self._seen: dict[tuple[str, str, str, str], None] = {}

    def refuse(self, symbol: str, timeframe: str, when: str, problem: str,
               key: str | None = None) -> None:
        """`key`: what makes the row the same row again (default: the problem)."""
        seen = (symbol, timeframe, when, problem if key is None else key)
        if seen in self._seen:
            return
        self._seen[seen] = None
        if len(self._seen) > self.memory:
            del self._seen[next(iter(self._seen))]
        from workers.runtime.log import event  # (the feeds' contract stays import-light)

        event(self.log, f"refused bar {self.venue} {symbol} {timeframe} {when}: {problem}"[:300],
              logging.WARNING, venue=self.venue, symbol=symbol, timeframe=timeframe,
              bar_ts=when, problem=problem)
