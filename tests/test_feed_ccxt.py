"""CcxtFeed against Binance's GET /api/v3/klines and OKX's v5 candles, mocked with `responses`.

Rows have the documented shapes (Binance: 12-field arrays with string prices, oldest first;
OKX: 9-field string arrays, newest first, with a `confirm` flag). The injected clock
decides which bar is still open; the injected sleep records the pauses between pages.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
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


@pytest.mark.parametrize("venue_lag, kept", [
    (timedelta(seconds=5), 2),    # the venue's clock 2 s before bar 2's close: still open
    (timedelta(seconds=3), 3),    # the venue at bar 2's close to the second: closed
    (timedelta(seconds=-30), 3),  # the venue ahead: this machine's clock decides
    (None, 3),                    # no Date header: this machine's clock decides
])
def test_a_bar_still_open_by_the_venues_clock_is_not_closed(
        http: responses.RequestsMock, venue_lag: timedelta | None, kept: int) -> None:
    """This machine's clock runs ahead of the venue's: 3 s past bar 2's close here, and
    the venue's HTTP Date says how far the venue is. A bar open at the venue is still
    forming there (part of its trades) and would be stored for good."""
    clock = Clock(T0 + 3 * MINUTE + timedelta(seconds=3))
    feed = binance_feed(http, clock)
    headers = {} if venue_lag is None else {
        "Date": format_datetime(clock.now - venue_lag, usegmt=True)}
    http.get(f"{BINANCE}/klines", json=[kline(0), kline(1), kline(2)], headers=headers)

    bars = feed.fetch_bars("BTC/USDT", "1m", T0)

    assert [b.ts for b in bars] == [T0 + i * MINUTE for i in range(kept)]


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


def test_empty_pages_are_stepped_over_up_to_now_and_no_further(
        http: responses.RequestsMock) -> None:
    clock = Clock(T0 + 3000 * MINUTE)  # the venue has no bars after the first 1000
    feed = binance_feed(http, clock)
    http.get(f"{BINANCE}/klines", json=[kline(i) for i in range(0, 1000)])
    http.get(f"{BINANCE}/klines", json=[kline(999)])  # only a bar already seen (ccxt drops it)

    bars = feed.fetch_bars("BTC/USDT", "1m", T0)

    # an empty page moves on by one page (a windowed venue may hold bars beyond it), but
    # never past now: the paging is bounded by the range asked for
    assert [q["startTime"] for q in ohlcv_calls(http, "/api/v3/klines")] == [
        str(ms(T0 + i * MINUTE)) for i in (0, 1000, 2000)]
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


# --- Coinbase: only the window [start, start + 300 bars] per call, no candle without trades

COINBASE = "https://api.coinbase.com"
COINBASE_CANDLES = "/api/v3/brokerage/market/products/BTC-USD/candles"


def coinbase_product(product_id: str, base: str, quote: str) -> dict[str, Any]:
    """One spot entry of GET /api/v3/brokerage/market/products."""
    return {"product_id": product_id, "price": "66780.12", "volume_24h": "10967.87",
            "base_increment": "0.00000001", "quote_increment": "0.01",
            "quote_min_size": "1", "quote_max_size": "150000000",
            "base_min_size": "0.00000001", "base_max_size": "3400", "base_name": base,
            "quote_name": quote, "is_disabled": False, "status": "online",
            "cancel_only": False, "limit_only": False, "post_only": False,
            "trading_disabled": False, "auction_mode": False, "product_type": "SPOT",
            "quote_currency_id": quote, "base_currency_id": base, "alias": "",
            "alias_to": [], "base_display_symbol": base, "quote_display_symbol": quote,
            "view_only": False, "price_increment": "0.01", "display_name": product_id,
            "product_venue": "CBE"}


def coinbase_feed(http: responses.RequestsMock, clock: Clock,
                  candles: dict[int, dict[str, str]]) -> CcxtFeed:
    """Coinbase's public products and currencies, and a candles endpoint that answers
    like Coinbase: the candles of [start, end] (seconds) that exist, newest first."""
    def products(request: Any) -> tuple[int, dict[str, str], str]:
        futures = parse_qs(urlsplit(request.url).query).get("product_type") == ["FUTURE"]
        listed = [] if futures else [coinbase_product("BTC-USD", "BTC", "USD")]
        return 200, {}, json.dumps({"products": listed, "num_products": len(listed)})

    def serve(request: Any) -> tuple[int, dict[str, str], str]:
        q = {k: v[0] for k, v in parse_qs(urlsplit(request.url).query).items()}
        lo, hi = int(q["start"]), int(q["end"])
        found = [c for s, c in sorted(candles.items(), reverse=True) if lo <= s <= hi]
        return 200, {}, json.dumps({"candles": found[:300]})

    http.add_callback(responses.GET, f"{COINBASE}/api/v3/brokerage/market/products",
                      callback=products)
    http.get(f"{COINBASE}/v2/currencies", json={"data": [
        {"id": "USD", "name": "US Dollar", "min_size": "0.01"}]})
    http.get(f"{COINBASE}/v2/currencies/crypto", json={"data": [
        {"asset_id": "5b71fc48-3dd3-540c-809b-f8c94d0e68b5", "code": "BTC", "name": "Bitcoin",
         "color": "#F7931A", "sort_index": 100, "exponent": 8, "type": "crypto",
         "address_regex": "^([13][a-km-zA-HJ-NP-Z1-9]{25,34})$"}]})
    http.get(f"{COINBASE}/v2/exchange-rates", json={"data": {"currency": "USD", "rates": {
        "BTC": "0.0000149745", "USD": "1.0"}}})
    http.add_callback(responses.GET, f"{COINBASE}{COINBASE_CANDLES}", callback=serve)
    return CcxtFeed("coinbase", now=lambda: clock.now, sleep=clock.sleep)


def coinbase_candle(i: int) -> tuple[int, dict[str, str]]:
    start = ms(T0 + i * MINUTE) // 1000
    return start, {"start": str(start), "low": "66000.5", "high": "66010.5",
                   "open": "66001.5", "close": "66005.5", "volume": "0.25"}


def test_an_empty_coinbase_window_does_not_end_the_paging(
        http: responses.RequestsMock) -> None:
    """Candles only from 06:40 on (none traded before, or the venue was down): the empty
    300-bar windows before them are stepped over, not taken for the end of the data."""
    clock = Clock(T0 + 600 * MINUTE + timedelta(seconds=10))
    feed = coinbase_feed(http, clock, dict(coinbase_candle(i) for i in range(400, 600)))
    assert feed.page_limit == 300

    bars = feed.fetch_bars("BTC/USD", "1m", T0)

    assert [b.ts for b in bars] == [T0 + i * MINUTE for i in range(400, 600)]
    assert bars[0].open == Decimal("66001.5") and bars[0].volume == Decimal("0.25")
    starts = [int(q["start"]) for q in ohlcv_calls(http, COINBASE_CANDLES)]
    assert starts[:2] == [ms(T0) // 1000, ms(T0 + 300 * MINUTE) // 1000]
    # a window that reaches `now` and is empty ends the paging: nothing is asked beyond it
    later = feed.fetch_bars("BTC/USD", "1m", T0 + 150 * MINUTE)
    assert len(later) == 200 and later[0].ts == T0 + 400 * MINUTE


def test_empty_windows_up_to_now_end_with_no_bars(http: responses.RequestsMock) -> None:
    clock = Clock(T0 + 700 * MINUTE)
    feed = coinbase_feed(http, clock, {})

    assert feed.fetch_bars("BTC/USD", "1m", T0) == []
    starts = [int(q["start"]) for q in ohlcv_calls(http, COINBASE_CANDLES)]
    assert starts == [ms(T0 + i * MINUTE) // 1000 for i in (0, 300, 600)]  # bounded by now


# --- malformed rows: refused alone, with one line; the rest of the page is returned

def test_a_kline_with_a_null_price_is_refused_alone(
        http: responses.RequestsMock, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(T0 + 10 * MINUTE)
    feed = binance_feed(http, clock)
    rows = [kline(i) for i in range(10)]
    rows[5][1] = None  # a null open
    rows[7][3] = "n/a"  # a low that is no number
    http.get(f"{BINANCE}/klines", json=rows)

    with caplog.at_level("WARNING", logger="mmats.feeds.ccxt"):
        bars = feed.fetch_bars("BTC/USDT", "1m", T0)
        again = feed.fetch_bars("BTC/USDT", "1m", T0)

    expected = [T0 + i * MINUTE for i in range(10) if i not in (5, 7)]
    assert [b.ts for b in bars] == expected and [b.ts for b in again] == expected
    lines = [r.getMessage() for r in caplog.records if r.name == "mmats.feeds.ccxt"]
    assert len(lines) == 2  # one line per bad row, not one per fetch that sees it
    assert lines[0].startswith("refused bar ccxt:binance BTC/USDT 1m 2024-06-10 00:05:00 UTC: ")
    assert "open" in lines[0] and "\n" not in lines[0]
    assert lines[1].startswith("refused bar ccxt:binance BTC/USDT 1m 2024-06-10 00:07:00 UTC: ")
    assert "low" in lines[1]
