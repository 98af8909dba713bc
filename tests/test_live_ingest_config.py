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
