"""OandaFeed (candles, price stream) and PriceStreamWatchdog, at the HTTP level, no sleeping.

Candle and stream bodies follow the shapes oandapyV20 ships as example responses
(`_v3_instruments_instrument_candles`, `_v3_accounts_accountID_pricing_stream`); the
candle server below answers `from` + `count` the way OANDA does, from a synthetic series.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
from requests import PreparedRequest

from workers.brokers.errors import Reject, Retry, Stop
from workers.feeds.base import MarketDataFeed
from workers.feeds.oanda_feed import (
    GRANULARITIES,
    OandaFeed,
    PriceStreamWatchdog,
    PriceTick,
    forex_market_open,
    forex_week_open,
)

FIXTURES = Path(__file__).parent / "fixtures" / "oanda"
ACCOUNT = "101-004-1435156-001"
CREDENTIALS = {"account_id": ACCOUNT, "access_token": "oanda-feed-token-91b2"}
CANDLES = "https://api-fxpractice.oanda.com/v3/instruments/EUR_USD/candles"
STREAM = f"https://stream-fxpractice.oanda.com/v3/accounts/{ACCOUNT}/pricing/stream"
WEDNESDAY = datetime(2024, 3, 13, 14, 0, tzinfo=UTC)
SATURDAY = datetime(2024, 3, 16, 12, 0, tzinfo=UTC)
NOW = datetime(2024, 3, 13, 10, 17, 30, tzinfo=UTC)
FIRST = datetime(2024, 3, 13, 9, 30, tzinfo=UTC)  # the synthetic series' first candle
STEP = timedelta(minutes=5)


def oanda_time(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.000000000Z")


def candle(ts: datetime, n: int, *, complete: bool = True) -> dict[str, Any]:
    base = Decimal("1.09000") + Decimal(n) / 10000
    return {"complete": complete, "volume": 100 + n, "time": oanda_time(ts),
            "mid": {"o": str(base), "h": str(base + Decimal("0.0004")),
                    "l": str(base - Decimal("0.0003")), "c": str(base + Decimal("0.0001"))}}


def candle_server(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
    """M5 candles from FIRST up to the one in progress at NOW (incomplete), answering
    `from` + `count` like OANDA: the first `count` candles opening at or after `from`."""
    params = dict(parse_qsl(urlsplit(str(request.url)).query))
    start = datetime.fromisoformat(params["from"])
    series = [FIRST + i * STEP for i in range(int((NOW - FIRST) / STEP) + 1)]
    chosen = [ts for ts in series if ts >= start][: int(params["count"])]
    body = {"instrument": "EUR_USD", "granularity": params["granularity"],
            "candles": [candle(ts, series.index(ts), complete=ts + STEP <= NOW)
                        for ts in chosen]}
    return 200, {}, json.dumps(body)


def url_of(http: responses.RequestsMock, index: int) -> str:
    return str(http.calls[index].request.url)


def params_of(http: responses.RequestsMock, index: int) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url_of(http, index)).query))


def feed(page_size: int = 5000) -> OandaFeed:
    return OandaFeed(CREDENTIALS, "practice", now=lambda: NOW, page_size=page_size)


# ---------------------------------------------------------------- candles

def test_the_feed_satisfies_the_feed_contract() -> None:
    made = feed()
    assert isinstance(made, MarketDataFeed)
    assert (made.venue, made.market) == ("oanda", "forex")
    assert made.stream_url == "https://stream-fxpractice.oanda.com"


def test_candles_are_paged_by_from_and_count_and_the_open_candle_is_dropped(
        http: responses.RequestsMock) -> None:
    http.add_callback(responses.GET, CANDLES, callback=candle_server)
    bars = feed(page_size=3).fetch_bars("EUR/USD", "5m", FIRST)
    assert [b.ts for b in bars] == [FIRST + i * STEP for i in range(9)]  # 09:30 .. 10:10
    sent = [params_of(http, i) for i in range(len(http.calls))]
    assert [p["from"] for p in sent] == ["2024-03-13T09:30:00.000000Z",
                                         "2024-03-13T09:45:00.000000Z",
                                         "2024-03-13T10:00:00.000000Z",
                                         "2024-03-13T10:15:00.000000Z"]
    assert [p["count"] for p in sent] == ["3", "3", "3", "1"]


def test_candles_are_mid_prices_in_decimal_and_utc(http: responses.RequestsMock) -> None:
    http.add_callback(responses.GET, CANDLES, callback=candle_server)
    first = feed().fetch_bars("EUR/USD", "5m", FIRST)[0]
    assert (first.symbol, first.timeframe, first.ts) == ("EUR/USD", "5m", FIRST)
    assert (first.open, first.high, first.low, first.close, first.volume) == (
        Decimal("1.09000"), Decimal("1.09040"), Decimal("1.08970"), Decimal("1.09010"),
        Decimal(100))
    assert isinstance(first.close, Decimal) and first.ts.utcoffset() == timedelta(0)
    params = params_of(http, 0)
    assert (params["price"], params["granularity"], params["count"]) == ("M", "M5", "10")


def test_a_candle_oanda_still_calls_incomplete_is_dropped_even_if_its_time_is_up(
        http: responses.RequestsMock) -> None:
    # OANDA closes a candle on the next tick, not on the clock: trust its flag
    http.get(CANDLES, json={"instrument": "EUR_USD", "granularity": "M5", "candles": [
        candle(FIRST, 0), candle(FIRST + STEP, 1, complete=False)]})
    bars = feed().fetch_bars("EUR/USD", "5m", FIRST)
    assert [b.ts for b in bars] == [FIRST]
    assert len(http.calls) == 1  # nothing is asked beyond an incomplete candle


def test_until_is_exclusive_and_since_inclusive(http: responses.RequestsMock) -> None:
    http.add_callback(responses.GET, CANDLES, callback=candle_server)
    since, until = FIRST + STEP, FIRST + 5 * STEP
    bars = feed(page_size=3).fetch_bars("EUR/USD", "5m", since, until)
    assert [b.ts for b in bars] == [since, since + STEP, since + 2 * STEP, since + 3 * STEP]
    assert len(http.calls) == 2


def test_a_weekend_gap_keeps_until_exclusive(http: responses.RequestsMock) -> None:
    # the span holds 51 hourly slots but the market traded only a few of them, so OANDA's
    # `count` candles reach past `until`: those must be left out
    friday, sunday = datetime(2024, 3, 15, 19, tzinfo=UTC), datetime(2024, 3, 17, 21, tzinfo=UTC)
    hours = [friday, friday + timedelta(hours=1), sunday, sunday + timedelta(hours=1)]
    http.get(CANDLES, json={"instrument": "EUR_USD", "granularity": "H1",
                            "candles": [candle(ts, n) for n, ts in enumerate(hours)]})
    monday = OandaFeed(CREDENTIALS, "practice", now=lambda: datetime(2024, 3, 18, tzinfo=UTC))
    bars = monday.fetch_bars("EUR/USD", "1h", friday, sunday + timedelta(hours=1))
    assert [b.ts for b in bars] == hours[:3]
    assert params_of(http, 0)["count"] == "51" and len(http.calls) == 1


@pytest.mark.parametrize(("timeframe", "granularity"), [
    ("1m", "M1"), ("5m", "M5"), ("15m", "M15"), ("1h", "H1"), ("4h", "H4"), ("1d", "D"),
    ("1w", "W")])
def test_timeframes_map_onto_granularities_aligned_on_utc(
        http: responses.RequestsMock, timeframe: str, granularity: str) -> None:
    http.get(CANDLES, json={"instrument": "EUR_USD", "granularity": granularity,
                            "candles": []})
    assert feed().fetch_bars("EUR/USD", timeframe, NOW - timedelta(days=30)) == []
    params = params_of(http, 0)
    assert params["granularity"] == granularity == GRANULARITIES[timeframe]
    assert (params["dailyAlignment"], params["alignmentTimezone"],
            params["weeklyAlignment"]) == ("0", "UTC", "Monday")


def test_the_live_feed_reads_candles_from_the_live_host(http: responses.RequestsMock) -> None:
    http.get("https://api-fxtrade.oanda.com/v3/instruments/EUR_USD/candles",
             json={"instrument": "EUR_USD", "granularity": "H1", "candles": [
                 candle(datetime(2024, 3, 13, 8, tzinfo=UTC), 0)]})
    live = OandaFeed(CREDENTIALS, "live", now=lambda: NOW)
    bars = live.fetch_bars("EUR/USD", "1h", datetime(2024, 3, 13, 8, tzinfo=UTC))
    assert len(bars) == 1
    assert url_of(http, 0).startswith("https://api-fxtrade.oanda.com/")


def test_an_unknown_timeframe_and_a_naive_since_are_refused() -> None:
    with pytest.raises(Reject) as info:
        feed().fetch_bars("EUR/USD", "2h", FIRST)
    assert info.value.code == "INVALID_TIMEFRAME"
    with pytest.raises(Reject) as naive:
        feed().fetch_bars("EUR/USD", "5m", datetime(2024, 3, 13, 9, 30))
    assert naive.value.code == "NAIVE_DATETIME"


@pytest.mark.parametrize(("status", "error"), [(400, Reject), (503, Retry), (401, Stop)])
def test_candle_errors_map_onto_error_classes(http: responses.RequestsMock, status: int,
                                              error: type[Exception]) -> None:
    http.get(CANDLES, status=status, json={"errorMessage": "Invalid value specified for 'from'"})
    with pytest.raises(error, match=f"oanda: fetch_bars EUR/USD: HTTP {status}"):
        feed().fetch_bars("EUR/USD", "5m", FIRST)


def test_a_malformed_candle_is_refused_alone_and_the_paging_goes_on(
        http: responses.RequestsMock, caplog: pytest.LogCaptureFixture) -> None:
    """One candle without its open, one with a close that is no number: each is refused
    with one line naming it, and the other candles of the page (and the next page) come."""
    def server(request: PreparedRequest) -> tuple[int, dict[str, str], str]:
        status, headers, body = candle_server(request)
        answer = json.loads(body)
        for c in answer["candles"]:
            if c["time"] == oanda_time(FIRST + STEP):
                del c["mid"]["o"]
            if c["time"] == oanda_time(FIRST + 2 * STEP):
                c["mid"]["c"] = "1.09x"
        return status, headers, json.dumps(answer)

    http.add_callback(responses.GET, CANDLES, callback=server)
    with caplog.at_level("WARNING", logger="mmats.feeds.oanda"):
        paged = feed(page_size=3)
        bars = paged.fetch_bars("EUR/USD", "5m", FIRST)
        assert paged.fetch_bars("EUR/USD", "5m", FIRST) == bars

    series = [FIRST + i * STEP for i in range(int((NOW - FIRST) / STEP))]
    assert [b.ts for b in bars] == [t for t in series if t not in (FIRST + STEP,
                                                                   FIRST + 2 * STEP)]
    lines = [r.getMessage() for r in caplog.records if r.name == "mmats.feeds.oanda"]
    assert len(lines) == 2  # one line per bad candle, not one per fetch that sees it
    assert lines[0].startswith("refused bar oanda EUR/USD 5m 2024-03-13 09:35:00 UTC: "
                               "malformed candle (KeyError: 'o')")
    assert lines[1].startswith("refused bar oanda EUR/USD 5m 2024-03-13 09:40:00 UTC: "
                               "malformed candle (InvalidOperation")
    assert all("\n" not in line for line in lines)


# ---------------------------------------------------------------- market hours

@pytest.mark.parametrize(("at", "is_open"), [
    (datetime(2024, 3, 13, 12, 0, tzinfo=UTC), True),        # Wednesday
    (datetime(2024, 3, 15, 20, 59, 59, tzinfo=UTC), True),   # Friday, last second
    (datetime(2024, 3, 15, 21, 0, tzinfo=UTC), False),       # Friday close
    (datetime(2024, 3, 16, 12, 0, tzinfo=UTC), False),       # Saturday
    (datetime(2024, 3, 17, 20, 59, tzinfo=UTC), False),      # Sunday before the open
    (datetime(2024, 3, 17, 21, 0, tzinfo=UTC), True),        # Sunday open
    (datetime(2024, 3, 18, 0, 0, tzinfo=UTC), True),         # Monday
    # winter: New York is on standard time, the edges are at 22:00 UTC
    (datetime(2024, 1, 12, 21, 30, tzinfo=UTC), True),       # Friday, still open
    (datetime(2024, 1, 12, 22, 0, tzinfo=UTC), False),       # Friday close
    (datetime(2024, 1, 14, 21, 30, tzinfo=UTC), False),      # Sunday, not yet open
    (datetime(2024, 1, 14, 22, 0, tzinfo=UTC), True),        # Sunday open
    # the Sunday New York goes to summer time (2024-03-10, 02:00 local): 21:00 UTC
    (datetime(2024, 3, 10, 20, 59, tzinfo=UTC), False),
    (datetime(2024, 3, 10, 21, 0, tzinfo=UTC), True),
    # and back (2024-11-03): the Friday before closes at 21:00 UTC, that Sunday opens at 22:00
    (datetime(2024, 11, 1, 21, 0, tzinfo=UTC), False),
    (datetime(2024, 11, 3, 21, 30, tzinfo=UTC), False),
    (datetime(2024, 11, 3, 22, 0, tzinfo=UTC), True),
])
def test_the_forex_weekend_rule(at: datetime, is_open: bool) -> None:
    assert forex_market_open(at) is is_open


@pytest.mark.parametrize(("at", "week_open"), [
    (datetime(2024, 3, 13, 12, 0, tzinfo=UTC), datetime(2024, 3, 10, 21, 0, tzinfo=UTC)),
    (datetime(2024, 3, 17, 22, 0, tzinfo=UTC), datetime(2024, 3, 17, 21, 0, tzinfo=UTC)),
    (datetime(2024, 3, 17, 20, 0, tzinfo=UTC), datetime(2024, 3, 10, 21, 0, tzinfo=UTC)),
    (datetime(2024, 1, 17, 12, 0, tzinfo=UTC), datetime(2024, 1, 14, 22, 0, tzinfo=UTC)),
    (datetime(2024, 1, 14, 21, 59, tzinfo=UTC), datetime(2024, 1, 7, 22, 0, tzinfo=UTC)),
    (datetime(2024, 11, 3, 23, 0, tzinfo=UTC), datetime(2024, 11, 3, 22, 0, tzinfo=UTC)),
])
def test_the_week_opens_on_sunday_at_17_new_york(at: datetime, week_open: datetime) -> None:
    assert forex_week_open(at) == week_open


# ---------------------------------------------------------------- the watchdog

class ManualClock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


PRICE = {"type": "PRICE", "instrument": "EUR_USD"}
HEARTBEAT = {"type": "HEARTBEAT"}


def heartbeats(watchdog: PriceStreamWatchdog, clock: ManualClock, seconds: int) -> None:
    for _ in range(seconds // 5):
        clock.advance(5)
        watchdog.observe(HEARTBEAT)


def test_prices_keep_the_stream_ok() -> None:
    clock = ManualClock(WEDNESDAY)
    watchdog = PriceStreamWatchdog(stall_after=60, silent_after=20, clock=clock)
    for _ in range(30):
        clock.advance(5)
        watchdog.observe(PRICE)
    assert watchdog.state() == "ok" and not watchdog.stalled and not watchdog.silent


def test_heartbeats_without_prices_are_a_stall() -> None:
    clock = ManualClock(WEDNESDAY)
    watchdog = PriceStreamWatchdog(stall_after=60, silent_after=20, clock=clock)
    watchdog.observe(PRICE)
    heartbeats(watchdog, clock, 60)
    assert watchdog.state() == "ok"  # exactly 60 s is not more than 60 s
    heartbeats(watchdog, clock, 5)
    assert watchdog.stalled and not watchdog.silent


def test_nothing_at_all_is_silence_not_a_stall() -> None:
    clock = ManualClock(WEDNESDAY)
    watchdog = PriceStreamWatchdog(stall_after=60, silent_after=20, clock=clock)
    watchdog.observe(PRICE)
    clock.advance(21)
    assert watchdog.state() == "silent" and watchdog.silent and not watchdog.stalled


def test_silence_is_reported_even_on_a_weekend() -> None:
    clock = ManualClock(SATURDAY)
    watchdog = PriceStreamWatchdog(stall_after=60, silent_after=20, clock=clock)
    clock.advance(30)
    assert watchdog.state() == "silent"


def test_no_prices_while_the_market_is_closed_is_no_stall() -> None:
    clock = ManualClock(datetime(2024, 3, 15, 20, 59, tzinfo=UTC))  # Friday
    watchdog = PriceStreamWatchdog(stall_after=60, silent_after=20, clock=clock)
    watchdog.observe(PRICE)
    heartbeats(watchdog, clock, 3600)  # through the close into Friday night
    assert watchdog.state() == "closed" and not watchdog.stalled


def test_the_sunday_open_is_not_mistaken_for_a_stall() -> None:
    clock = ManualClock(datetime(2024, 3, 15, 20, 59, 55, tzinfo=UTC))  # Friday
    watchdog = PriceStreamWatchdog(stall_after=60, silent_after=20, clock=clock)
    watchdog.observe(PRICE)
    clock.at = datetime(2024, 3, 17, 21, 0, 30, tzinfo=UTC)  # Sunday, 30 s after the open
    watchdog.observe(HEARTBEAT)
    assert watchdog.state() == "ok"
    heartbeats(watchdog, clock, 35)
    assert watchdog.state() == "stalled"


# ---------------------------------------------------------------- the price stream

class MessageClock:
    """Each stream message arrives five seconds after the one before it."""

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.watchdog: PriceStreamWatchdog | None = None

    def __call__(self) -> datetime:
        received = self.watchdog.received if self.watchdog else 0
        return self.start + timedelta(seconds=5 * received)


def stream_watchdog(start: datetime) -> PriceStreamWatchdog:
    clock = MessageClock(start)
    clock.watchdog = PriceStreamWatchdog(stall_after=30, silent_after=20, clock=clock)
    return clock.watchdog


def ndjson(messages: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(m) + "\n" for m in messages)


def prices_then_heartbeats(count: int) -> str:
    messages = json.loads((FIXTURES / "pricing_stream_prices.json").read_text())
    return ndjson(messages + [{"type": "HEARTBEAT", "time": "2024-03-13T14:01:00.000000000Z"}]
                  * count)


def test_a_heartbeat_only_stall_raises_retry(http: responses.RequestsMock) -> None:
    http.get(STREAM, body=prices_then_heartbeats(20))
    ticks: list[PriceTick] = []
    watchdog = stream_watchdog(WEDNESDAY)
    with pytest.raises(Retry) as info:
        feed().stream_prices(["EUR/USD", "USD/JPY"], ticks.append, watchdog)
    assert info.value.code == "PRICE_STREAM_STALLED"
    assert str(info.value).startswith("oanda: stream_prices EUR/USD,USD/JPY: price stream "
                                      "stalled")
    # the last price was message 4 (at +20 s); message 11 (at +55 s) is 35 s later
    assert watchdog.received == 11
    assert [(t.symbol, t.bid, t.ask) for t in ticks] == [
        ("EUR/USD", Decimal("1.09177"), Decimal("1.09188")),
        ("USD/JPY", Decimal("149.295"), Decimal("149.312")),
        ("EUR/USD", Decimal("1.09178"), Decimal("1.09189"))]
    assert ticks[0].ts == datetime(2024, 3, 13, 14, 0, 0, 100000, tzinfo=UTC)
    assert params_of(http, 0) == {"instruments": "EUR_USD,USD_JPY"}


def test_an_ended_stream_raises_retry_to_reconnect(http: responses.RequestsMock) -> None:
    http.get(STREAM, body=prices_then_heartbeats(2))
    ticks: list[PriceTick] = []
    with pytest.raises(Retry) as info:
        feed().stream_prices(["EUR/USD"], ticks.append, stream_watchdog(WEDNESDAY))
    assert info.value.code == "PRICE_STREAM_ENDED" and len(ticks) == 3


def test_heartbeats_on_a_weekend_are_no_stall(http: responses.RequestsMock) -> None:
    http.get(STREAM, body=ndjson([{"type": "HEARTBEAT", "time": "2024-03-16T12:00:00Z"}] * 30))
    watchdog = stream_watchdog(SATURDAY)
    with pytest.raises(Retry) as info:
        feed().stream_prices(["EUR/USD"], lambda tick: None, watchdog)
    assert info.value.code == "PRICE_STREAM_ENDED" and watchdog.received == 30


def test_a_refused_stream_stops(http: responses.RequestsMock) -> None:
    http.get(STREAM, status=401, json={"errorMessage": "Insufficient authorization"})
    with pytest.raises(Stop, match="stream_prices EUR/USD: HTTP 401"):
        feed().stream_prices(["EUR/USD"], lambda tick: None, stream_watchdog(WEDNESDAY))


def test_a_broken_connection_retries(http: responses.RequestsMock) -> None:
    http.get(STREAM, body=requests.ConnectionError("connection reset by peer"))
    with pytest.raises(Retry) as info:
        feed().stream_prices(["EUR/USD"], lambda tick: None, stream_watchdog(WEDNESDAY))
    assert type(info.value) is Retry


def test_a_failing_price_callback_is_not_disguised_as_a_retry(
        http: responses.RequestsMock) -> None:
    http.get(STREAM, body=prices_then_heartbeats(2))

    def explode(tick: PriceTick) -> None:
        raise ValueError(f"strategy bug on {tick.symbol}")

    with pytest.raises(ValueError, match="strategy bug on EUR/USD"):
        feed().stream_prices(["EUR/USD"], explode, stream_watchdog(WEDNESDAY))


def test_streaming_needs_an_account() -> None:
    candles_only = OandaFeed({"access_token": "oanda-feed-token-91b2"}, "practice")
    with pytest.raises(Stop, match="credentials lack account_id"):
        candles_only.stream_prices(["EUR/USD"], lambda tick: None, PriceStreamWatchdog())
