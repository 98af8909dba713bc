"""AlpacaFeed at the HTTP level: `responses` answers GET /v2/stocks/bars with Alpaca's JSON."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from workers.brokers.errors import BackOff, BrokerError, Reject, Retry, Stop
from workers.feeds.alpaca_feed import AlpacaFeed
from workers.feeds.base import FeedBar, MarketDataFeed
from workers.runtime.log import redact

BARS = "https://data.alpaca.markets/v2/stocks/bars"
CREDS = {"api_key": "AKFEEDTEST000001", "secret_key": "feed-secret-for-tests-01"}
NOW = datetime(2024, 3, 1, 15, 3, 30, tzinfo=UTC)


def bar_json(ts: str, o: float, h: float, low: float, c: float, v: int) -> dict[str, Any]:
    """One bar as Alpaca sends it: t o h l c v, plus trade count n and vwap vw."""
    return {"t": ts, "o": o, "h": h, "l": low, "c": c, "v": v, "n": 42, "vw": (h + low) / 2}


def page(bars: list[dict[str, Any]], token: str | None) -> dict[str, Any]:
    return {"bars": {"AAPL": bars} if bars else {}, "next_page_token": token}


def params(call: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(call.request.url).query)


@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=True) as mock:
        yield mock


@pytest.fixture
def feed() -> AlpacaFeed:
    return AlpacaFeed(CREDS, now=lambda: NOW)


def test_is_a_stock_feed_and_registers_its_secrets(feed: AlpacaFeed) -> None:
    assert isinstance(feed, MarketDataFeed)
    assert (feed.venue, feed.market) == ("alpaca", "stock")
    assert redact(f"{CREDS['api_key']}/{CREDS['secret_key']}") == "***/***"


def test_bars_are_paged_and_the_open_bar_dropped(http: responses.RequestsMock,
                                                 feed: AlpacaFeed) -> None:
    http.get(BARS, json=page([bar_json("2024-03-01T15:00:00Z", 187.15, 187.4, 187.01, 187.3, 1200),
                              bar_json("2024-03-01T15:01:00Z", 187.3, 187.5, 187.2, 187.45, 800)],
                             "QUFQTHxNfDIwMjQtMDMtMDFUMTU6MDE6MDBa"))
    http.get(BARS, json=page([bar_json("2024-03-01T15:02:00Z", 187.45, 187.6, 187.4, 187.55, 950),
                              bar_json("2024-03-01T15:03:00Z", 187.55, 187.7, 187.5, 187.6, 90)],
                             None))
    bars = feed.fetch_bars("AAPL", "1m", datetime(2024, 3, 1, 15, 0, tzinfo=UTC))
    assert len(http.calls) == 2
    first, second = params(http.calls[0]), params(http.calls[1])
    assert (first["symbols"], first["timeframe"], first["feed"]) == (["AAPL"], ["1Min"], ["iex"])
    assert "page_token" not in first
    assert second["page_token"] == ["QUFQTHxNfDIwMjQtMDMtMDFUMTU6MDE6MDBa"]
    assert [b.ts.minute for b in bars] == [0, 1, 2]  # 15:03 is still open at 15:03:30
    assert bars[0] == FeedBar("AAPL", "1m", datetime(2024, 3, 1, 15, 0, tzinfo=UTC),
                              Decimal("187.15"), Decimal("187.4"), Decimal("187.01"),
                              Decimal("187.3"), Decimal("1200"))
    assert all(b.ts.tzinfo == UTC for b in bars)


def test_until_is_exclusive_though_alpacas_end_is_not(http: responses.RequestsMock,
                                                      feed: AlpacaFeed) -> None:
    http.get(BARS, json=page([bar_json("2024-03-01T14:00:00Z", 1, 2, 0.5, 1.5, 10),
                              bar_json("2024-03-01T14:05:00Z", 1.5, 2, 1, 1.2, 11),
                              bar_json("2024-03-01T14:10:00Z", 1.2, 1.3, 1, 1.1, 12)], None))
    since = datetime(2024, 3, 1, 14, 0, tzinfo=UTC)
    until = datetime(2024, 3, 1, 14, 10, tzinfo=UTC)
    bars = feed.fetch_bars("AAPL", "5m", since, until)
    sent = params(http.calls[0])
    assert sent["timeframe"] == ["5Min"]
    assert datetime.fromisoformat(sent["start"][0]) == since
    assert datetime.fromisoformat(sent["end"][0]) == until
    assert [b.ts for b in bars] == [since, since + timedelta(minutes=5)]


def test_bars_come_back_oldest_first_once_each(http: responses.RequestsMock,
                                               feed: AlpacaFeed) -> None:
    http.get(BARS, json=page([bar_json("2024-03-01T14:15:00Z", 3, 3, 3, 3, 3),
                              bar_json("2024-03-01T14:00:00Z", 1, 1, 1, 1, 1),
                              bar_json("2024-03-01T14:15:00Z", 3, 3, 3, 3, 3)], None))
    bars = feed.fetch_bars("AAPL", "15m", datetime(2024, 3, 1, 14, 0, tzinfo=UTC))
    assert [(b.ts.minute, b.close) for b in bars] == [(0, Decimal(1)), (15, Decimal(3))]


@pytest.mark.parametrize(("timeframe", "alpaca"), [("1h", "1Hour"), ("4h", "4Hour"),
                                                    ("1d", "1Day"), ("1w", "1Week")])
def test_timeframes_map_to_alpacas(http: responses.RequestsMock, feed: AlpacaFeed,
                                   timeframe: str, alpaca: str) -> None:
    http.get(BARS, json=page([], None))
    assert feed.fetch_bars("AAPL", timeframe, datetime(2024, 1, 1, tzinfo=UTC)) == []
    assert params(http.calls[0])["timeframe"] == [alpaca]


def test_a_daily_bar_is_closed_only_when_its_day_is_over(http: responses.RequestsMock) -> None:
    evening = datetime(2024, 3, 1, 22, 0, tzinfo=UTC)  # 17:00 in New York
    days = [bar_json("2024-02-29T05:00:00Z", 180, 182, 179, 181, 9_000_000),
            bar_json("2024-03-01T05:00:00Z", 181, 183, 180, 182, 8_000_000)]
    http.get(BARS, json=page(days, None))
    feed = AlpacaFeed(CREDS, now=lambda: evening, feed="sip")
    bars = feed.fetch_bars("AAPL", "1d", datetime(2024, 2, 29, tzinfo=UTC))
    assert params(http.calls[0])["feed"] == ["sip"]
    assert [b.ts.day for b in bars] == [29]
    assert bars[0].volume == Decimal("9000000")


def test_nothing_is_asked_for_a_range_in_the_future(http: responses.RequestsMock,
                                                    feed: AlpacaFeed) -> None:
    assert feed.fetch_bars("AAPL", "1m", NOW + timedelta(hours=1)) == []
    assert len(http.calls) == 0


@pytest.mark.parametrize(("args", "problem"), [
    (("AAPL", "2m", datetime(2024, 3, 1, tzinfo=UTC)), "timeframe '2m' is not one of"),
    (("AAPL", "1m", datetime(2024, 3, 1)), "since must be an aware datetime"),
])
def test_bad_arguments_are_refused(feed: AlpacaFeed, args: tuple[Any, ...],
                                   problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        feed.fetch_bars(*args)


@pytest.mark.parametrize(("response", "error", "text"), [
    ({"status": 429, "json": {"message": "too many requests."}, "headers": {"Retry-After": "3"}},
     BackOff, "too many requests."),
    ({"status": 500, "body": "internal server error"}, Retry, "HTTP 500"),
    ({"body": requests.ConnectionError("connection reset by peer")}, Retry, "ConnectionError"),
    ({"status": 401, "json": {"message": "unauthorized."}}, Stop, "unauthorized."),
    ({"status": 403, "json": {"message": "subscription does not permit querying recent SIP data"}},
     Stop, "subscription does not permit"),
    ({"status": 422, "json": {"code": 42210000, "message": "invalid symbol: A@PL"}}, Reject,
     "invalid symbol"),
])
def test_errors_map_to_what_the_caller_should_do(http: responses.RequestsMock, feed: AlpacaFeed,
                                                 response: dict[str, Any],
                                                 error: type[BrokerError], text: str) -> None:
    http.get(BARS, **response)
    with pytest.raises(error, match=text) as caught:
        feed.fetch_bars("AAPL", "1m", datetime(2024, 3, 1, 15, 0, tzinfo=UTC))
    assert str(caught.value).startswith("alpaca: 1m bars AAPL: ")
    assert len(http.calls) == 1
    if error is BackOff:
        assert caught.value.retry_after == 3.0
    if error is Reject:
        assert caught.value.code == "INVALID_REQUEST"


def test_a_malformed_bar_is_refused_alone_with_one_line(
        http: responses.RequestsMock, feed: AlpacaFeed,
        caplog: pytest.LogCaptureFixture) -> None:
    rows = [bar_json(f"2024-03-01T14:{m:02d}:00Z", 187.1, 187.4, 187.0, 187.3, 100)
            for m in range(5)]
    rows[1]["o"] = None  # a null open
    rows[3]["h"] = "n/a"  # a high that is no number
    http.get(BARS, json=page(rows, None))
    http.get(BARS, json=page(rows, None))
    since = datetime(2024, 3, 1, 14, 0, tzinfo=UTC)

    with caplog.at_level("WARNING", logger="mmats.feeds.alpaca"):
        bars = feed.fetch_bars("AAPL", "1m", since)
        assert feed.fetch_bars("AAPL", "1m", since) == bars

    assert [b.ts.minute for b in bars] == [0, 2, 4]
    assert bars[0].open == Decimal("187.1")
    lines = [r.getMessage() for r in caplog.records if r.name == "mmats.feeds.alpaca"]
    line = "refused bar alpaca AAPL 1m 2024-03-01 14:0{}:00 UTC: {}"
    assert lines == [line.format(1, "open is missing (null)"),
                     line.format(3, "high 'n/a' is not a number")]
