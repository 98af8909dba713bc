"""`[[feeds]]` of mmats.toml made into the ingest worker `mmats run` starts: a ccxt feed
(Binance's public klines, answered at the HTTP level) fills market.bars."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import responses

from workers.runtime import config as rc
from workers.runtime.live_ingest import IngestWorker
from workers.runtime.supervisor import build_worker

FIXTURES = Path(__file__).parent / "fixtures" / "ccxt"
BINANCE = "https://api.binance.com/api/v3"


def kline(open_at: datetime, price: Decimal) -> list[object]:
    ms = int(open_at.timestamp() * 1000)
    return [ms, f"{price:.8f}", f"{price + 5:.8f}", f"{price - 5:.8f}", f"{price + 1:.8f}",
            "1.50000000", ms + 59_999, "1000.0", 10, "0.7", "500.0", "0"]


def test_a_ccxt_feed_from_the_configuration_stores_closed_bars(db_url: str) -> None:
    cfg = rc.parse(tomllib.loads(
        '[[feeds]]\nmarket = "crypto"\nvenue = "ccxt:binance"\nsymbols = ["BTC/USDT"]\n'
        'timeframes = ["1m"]\n'))
    worker = build_worker("ingest", cfg, db_url)
    assert isinstance(worker, IngestWorker)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    closed = [now - timedelta(minutes=k) for k in (3, 2, 1)]  # `now`'s bar is still open
    with responses.RequestsMock(assert_all_requests_are_fired=False) as http:
        http.get(f"{BINANCE}/exchangeInfo",
                 json=json.loads((FIXTURES / "binance_exchange_info.json").read_text()))
        page = [kline(t, Decimal("60000") + k) for k, t in enumerate([*closed, now])]
        http.get(f"{BINANCE}/klines", json=page)
        try:
            worker.ingest.run_once()
        finally:
            worker.ingest.close()
        assert any("/klines" in c.request.url for c in http.calls)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT b.ts, b.open, b.close FROM market.bars b JOIN market.instruments i "
            "USING (instrument_id) WHERE i.symbol = 'BTC/USDT' AND i.venue = 'binance' "
            "ORDER BY b.ts").fetchall()
    assert [r[0] for r in rows] == closed[-len(rows):] and rows, rows
    assert all(r[0] < now for r in rows)  # never the open bar
    assert rows[-1][1] == Decimal("60002") and rows[-1][2] == Decimal("60003")


def test_a_feed_needing_keys_without_a_credential_is_refused() -> None:
    cfg = rc.parse(tomllib.loads(
        '[[feeds]]\nmarket = "stock"\nvenue = "alpaca"\nsymbols = ["AAPL"]\n'
        'timeframes = ["1m"]\n'))
    with pytest.raises(rc.RuntimeConfigError, match="needs credential_account and credential"):
        build_worker("ingest", cfg, "postgresql://unused")


def test_two_entries_of_one_venue_share_its_feed_unless_they_disagree() -> None:
    """Two [[feeds]] of one venue (1m BTC and 1h ETH on Binance) feed their series through
    one connection; with another endpoint or key the first entry's series were silently
    served by the second's feed."""
    both = ('[[feeds]]\nmarket = "crypto"\nvenue = "ccxt:binance"\nsymbols = ["BTC/USDT"]\n'
            'timeframes = ["1m"]\n[[feeds]]\nmarket = "crypto"\nvenue = "ccxt:binance"\n'
            'symbols = ["ETH/USDT"]\ntimeframes = ["1h"]\n')
    worker = build_worker("ingest", rc.parse(tomllib.loads(both)), "postgresql://unused")
    assert isinstance(worker, IngestWorker)
    [group] = worker.ingest._groups
    assert sorted(s.sub.label for s in group.series) == ["binance:BTC/USDT 1m",
                                                         "binance:ETH/USDT 1h"]
    clash = both + 'endpoint = "testnet"\n'
    with pytest.raises(rc.RuntimeConfigError, match=r"^\[\[feeds\]\] #2: venue binance is "
                       r"already fed by \[\[feeds\]\] #1 with another endpoint or credential"):
        build_worker("ingest", rc.parse(tomllib.loads(clash)), "postgresql://unused")


OANDA_FEED = ('[[feeds]]\nmarket = "forex"\nvenue = "oanda"\nsymbols = ["EUR/USD"]\n'
              'timeframes = ["1m"]\ncredential_account = "{account}"\ncredential = "k"\n')


@pytest.fixture
def oanda_keys(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A paper account with OANDA practice keys, a live account with live keys (the
    database refuses live keys on a paper account and testnet keys on a live one)."""
    from workers import credentials

    key = credentials.generate_key()
    monkeypatch.setenv(credentials.ENV_VAR, key.encoded())
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name, environment, endpoint in (("paper-1", "paper", "testnet"),
                                            ("live-1", "live", "live")):
            conn.execute("SELECT trading.create_account(%s, %s)", (name, environment))
            credentials.store(conn, key, name, "k", "oanda", endpoint,
                              {"access_token": f"token-of-{name}", "account_id": "101-1"})
    return db_url


def test_a_paper_account_s_practice_token_is_never_sent_to_the_live_endpoint(
        oanda_keys: str) -> None:
    """An OANDA [[feeds]] entry naming a paper account's practice keys and no endpoint
    opened OANDA's LIVE environment with them (the entry's endpoint defaulted to live)."""
    from workers.runtime.live_ingest import _feed

    def feed(account: str, extra: str = "") -> object:
        cfg = rc.parse(tomllib.loads(OANDA_FEED.format(account=account) + extra))
        return _feed(oanda_keys, cfg.feeds[0])[0]

    assert feed("paper-1").environment == "practice"  # type: ignore[attr-defined]
    assert feed("paper-1", 'endpoint = "testnet"').environment == "practice"  # type: ignore[attr-defined]
    assert feed("live-1").environment == "live"  # type: ignore[attr-defined]
    with pytest.raises(rc.RuntimeConfigError, match=(
            r"^\[\[feeds\]\] #1 \(oanda\): endpoint 'live' may not use credential 'k' of paper "
            r"account paper-1 \(testnet keys\)")) as info:
        feed("paper-1", 'endpoint = "live"')
    assert "\n" not in str(info.value) and "token-of" not in str(info.value)
    # the ingest worker makes the same check (alpaca feeds too), naming the entry
    two = (FEED_BTC + OANDA_FEED.format(account="paper-1") + 'endpoint = "live"\n')
    with pytest.raises(rc.RuntimeConfigError, match=r"^\[\[feeds\]\] #2 \(oanda\): endpoint"):
        build_worker("ingest", rc.parse(tomllib.loads(two)), oanda_keys)
    alpaca = OANDA_FEED.format(account="paper-1").replace('"oanda"', '"alpaca"').replace(
        '"forex"', '"stock"') + 'endpoint = "live"\n'
    with pytest.raises(rc.RuntimeConfigError, match=r"^\[\[feeds\]\] #1 \(alpaca\): endpoint "
                       r"'live' may not use credential 'k' of paper account paper-1"):
        build_worker("ingest", rc.parse(tomllib.loads(alpaca)), oanda_keys)


FEED_BTC = ('[[feeds]]\nmarket = "crypto"\nvenue = "ccxt:binance"\nsymbols = ["BTC/USDT"]\n'
            'timeframes = ["1m"]\n')
