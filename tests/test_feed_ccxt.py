"""CcxtFeed against Binance's GET /api/v3/klines and OKX's v5 candles, mocked with `responses`.

Rows have the documented shapes (Binance: 12-field arrays with string prices, oldest first;
OKX: 9-field string arrays, newest first, with a `confirm` flag). The injected clock
decides which bar is still open; the injected sleep records the pauses between pages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from workers.brokers import errors
from workers.feeds.base import MarketDataFeed
from workers.feeds.ccxt_feed import CcxtFeed

FIXTURES = Path(__file__).parent / "fixtures" / "ccxt"
BINANCE = "https://api.binance.com/api/v3"
OKX = "https://www.okx.com/api/v5"
T0 = datetime(2024, 6, 10, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def kline(i: int) -> list[Any]:
    """Binance kline number `i` after T0: open time, OHLCV, close time, quote volume, ..."""
    open_ms = ms(T0 + i * MINUTE)
    price = Decimal("66000.01") + i
    return [open_ms, f"{price:.8f}", f"{price + 5:.8f}", f"{price - 5:.8f}",
            f"{price + 1:.8f}", "12.34567000", open_ms + 59_999, "814801.50000000", 421,
            "6.10000000", "402600.10000000", "0"]


def query(call: Any) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(call.request.url).query).items()}


def ohlcv_calls(http: responses.RequestsMock, path: str) -> list[dict[str, str]]:
    return [query(c) for c in http.calls if str(urlsplit(c.request.url).path).endswith(path)]


@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def binance_feed(http: responses.RequestsMock, clock: Clock) -> CcxtFeed:
    info = json.loads((FIXTURES / "binance_exchange_info.json").read_text())
    http.get(f"{BINANCE}/exchangeInfo", json=info)
    return CcxtFeed("binance", now=lambda: clock.now, sleep=clock.sleep)


def test_pages_forward_drops_the_open_bar_and_duplicates(http: responses.RequestsMock) -> None:
    clock = Clock(T0 + 2100 * MINUTE + timedelta(seconds=30))  # bar 2100 is still open
    feed = binance_feed(http, clock)
    http.get(f"{BINANCE}/klines", json=[kline(i) for i in range(0, 1000)])
    page2 = [kline(i) for i in range(999, 1999)]  # 999 again (ccxt drops it: before since)
    page2.insert(500, kline(1499))  # a bar sent twice
    http.get(f"{BINANCE}/klines", json=page2)
    http.get(f"{BINANCE}/klines", json=[kline(i) for i in range(1999, 2101)])

    bars = feed.fetch_bars("BTC/USDT", "1m", T0)

    asked = ohlcv_calls(http, "/api/v3/klines")
    assert [q["startTime"] for q in asked] == [str(ms(T0)), str(ms(T0 + 1000 * MINUTE)),
                                               str(ms(T0 + 1999 * MINUTE))]
    assert {(q["symbol"], q["interval"], q["limit"]) for q in asked} == {("BTCUSDT", "1m",
                                                                          "1000")}
    assert len(bars) == 2100
    assert [b.ts for b in bars] == [T0 + i * MINUTE for i in range(2100)]
    assert bars[-1].ts + MINUTE <= clock.now
    assert clock.sleeps == [0.05, 0.05]  # binance's rateLimit (50 ms) between pages


def test_bars_are_exact_decimals_in_mmats_units(http: responses.RequestsMock) -> None:
    clock = Clock(T0 + 2 * MINUTE)
    feed = binance_feed(http, clock)
    http.get(f"{BINANCE}/klines", json=[kline(0), kline(1)])

    first, second = feed.fetch_bars("BTC/USDT", "1m", T0)

    assert (first.symbol, first.timeframe, first.ts) == ("BTC/USDT", "1m", T0)
    assert first.open == Decimal("66000.01")
    assert first.high == Decimal("66005.01")
    assert first.low == Decimal("65995.01")
    assert first.close == Decimal("66001.01")
    assert first.volume == Decimal("12.34567")
    assert second.ts == T0 + MINUTE
    assert isinstance(feed, MarketDataFeed) and feed.market == "crypto"
    assert feed.venue == "ccxt:binance"


def test_until_is_exclusive_and_ends_the_paging(http: responses.RequestsMock) -> None:
    clock = Clock(T0 + timedelta(days=3))
    feed = binance_feed(http, clock)
    http.get(f"{BINANCE}/klines", json=[kline(i) for i in range(0, 1000)])
    http.get(f"{BINANCE}/klines", json=[kline(i) for i in range(1000, 2000)])
    since, until = T0 + 10 * MINUTE, T0 + 1500 * MINUTE

    bars = feed.fetch_bars("BTC/USDT", "1m", since, until)

    assert len(ohlcv_calls(http, "/api/v3/klines")) == 2
    assert bars[0].ts == since
    assert bars[-1].ts == until - MINUTE
    assert len(bars) == 1490


def test_paging_stops_when_a_page_adds_nothing(http: responses.RequestsMock) -> None:
    clock = Clock(T0 + timedelta(days=30))  # far ahead: the venue simply has no more bars
    feed = binance_feed(http, clock)
    http.get(f"{BINANCE}/klines", json=[kline(i) for i in range(0, 1000)])
    http.get(f"{BINANCE}/klines", json=[kline(999)])  # only a bar already seen

    bars = feed.fetch_bars("BTC/USDT", "1m", T0)

    assert len(ohlcv_calls(http, "/api/v3/klines")) == 2
    assert len(bars) == 1000


def test_okx_candles_through_the_unified_path(http: responses.RequestsMock) -> None:
    clock = Clock(T0 + 5 * MINUTE + timedelta(seconds=20))  # the 00:05 bar is open
    instruments = json.loads((FIXTURES / "okx_instruments_spot.json").read_text())
    http.get(f"{OKX}/public/instruments", json=instruments)

    def candle(i: int, confirm: str = "1") -> list[str]:
        price = Decimal("66000.1") + i
        return [str(ms(T0 + i * MINUTE)), str(price), str(price + 3), str(price - 3),
                str(price + 1), "1.25", "82501.2", "82501.2", confirm]

    newest_first = [candle(5, "0")] + [candle(i) for i in range(4, -1, -1)]
    http.get(f"{OKX}/market/history-candles", json={"code": "0", "msg": "",
                                                     "data": newest_first})
    feed = CcxtFeed("okx", now=lambda: clock.now, sleep=clock.sleep)

    bars = feed.fetch_bars("BTC/USDT", "1m", T0)

    (asked,) = ohlcv_calls(http, "/market/history-candles")
    assert (asked["instId"], asked["bar"], asked["limit"]) == ("BTC-USDT", "1m", "300")
    assert asked["before"] == str(ms(T0) - 1)
    assert [b.ts for b in bars] == [T0 + i * MINUTE for i in range(5)]
    assert bars[0].open == Decimal("66000.1") and bars[-1].close == Decimal("66005.1")
    assert feed.venue == "ccxt:okx"


@pytest.mark.parametrize(("status", "headers", "cls", "retry_after"), [
    (429, {"Retry-After": "30"}, errors.BackOff, 30.0),
    (503, {}, errors.Retry, None),
])
def test_venue_errors_map_like_the_broker(http: responses.RequestsMock, status: int,
                                          headers: dict[str, str],
                                          cls: type[errors.BrokerError],
                                          retry_after: float | None) -> None:
    feed = binance_feed(http, Clock(T0 + timedelta(days=1)))
    http.get(f"{BINANCE}/klines", status=status, headers=headers,
             json={"code": -1003, "msg": "Too much request weight used; current limit is "
                                         "6000 request weight per 1 MINUTE."}
             if status == 429 else {"code": -1008, "msg": "Server is currently overloaded "
                                                          "with other requests."})

    with pytest.raises(cls) as caught:
        feed.fetch_bars("BTC/USDT", "1m", T0)

    assert type(caught.value) is cls
    assert caught.value.retry_after == retry_after
    assert str(caught.value).startswith("ccxt:binance: fetch_bars BTC/USDT: ")


def test_an_unknown_symbol_is_a_reject(http: responses.RequestsMock) -> None:
    feed = binance_feed(http, Clock(T0 + timedelta(days=1)))

    with pytest.raises(errors.Reject) as caught:
        feed.fetch_bars("NOPE/USDT", "1m", T0)

    assert caught.value.code == "UNKNOWN_SYMBOL"
    assert "NOPE/USDT" in str(caught.value)


def test_an_unsupported_timeframe_is_refused_before_any_request(
        http: responses.RequestsMock) -> None:
    feed = binance_feed(http, Clock(T0 + timedelta(days=1)))

    with pytest.raises(errors.Reject) as caught:
        feed.fetch_bars("BTC/USDT", "3m", T0)

    assert caught.value.code == "UNSUPPORTED_TIMEFRAME"
    assert len(http.calls) == 0


def test_naive_times_are_refused(http: responses.RequestsMock) -> None:
    feed = binance_feed(http, Clock(T0 + timedelta(days=1)))

    with pytest.raises(ValueError, match="naive"):
        feed.fetch_bars("BTC/USDT", "1m", datetime(2024, 6, 10))
