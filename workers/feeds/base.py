"""The market-data feed contract: closed bars, in time order, in MMATS's units.

A feed answers `fetch_bars(symbol, timeframe, since, until)` with the bars whose open time
lies in [since, until), oldest first, paging through the venue's limits itself. Only
*closed* bars are returned: a bar whose period has not ended at `now` is left out, so a
strategy never sees a bar that may still change. Prices and volumes are `Decimal`, times
aware UTC. Feeds raise the classes of `workers.brokers.errors` (`Retry`, `BackOff`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol, runtime_checkable


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
