"""No secret reaches a log: a full `mmats run` (replayed paper session, a ccxt account on
its testnet with stored keys, the reconciler, a signed webhook notifier), then every log
line and every byte the processes printed is searched for each secret."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import pytest

from api.cli_runtime import prepare_replay
from workers import credentials
from workers.backtest.config import parse_time
from workers.ingest.importer import import_file
from workers.ingest.samples import sample_datasets
from workers.runtime import config as runtime_config
from workers.runtime.supervisor import apply_config

pytestmark = pytest.mark.slow

API_KEY = "AKtestkey0123456789abcdefXYZ"
API_SECRET = "s3cr3t-binance-testnet-0123456789abcdef"
WEBHOOK_SECRET = "whsec-9f8e7d6c5b4a39281706"


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Hook.received.append({"body": json.loads(body),
                               "signature": self.headers.get("X-MMATS-Signature")})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


def test_a_full_run_logs_no_secret(db_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    master = credentials.generate_key()
    master_text = master.encoded()
    env = {**os.environ, "MMATS_DATABASE_URL": db_url, "MMATS_HOME": str(home),
           "MMATS_MASTER_KEY": master_text, "MMATS_TEST_WEBHOOK_SECRET": WEBHOOK_SECRET,
           "CI": "true"}
    env.pop("MMATS_CONFIG", None)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.received = []

    sample = next(s for s in sample_datasets() if s.symbol == "BTC/USDT")
    with psycopg.connect(db_url, autocommit=True) as conn:
        import_file(conn, sample.path, symbol=sample.symbol, market=sample.market,
                    timeframe=sample.timeframe, venue=sample.venue)
        path = prepare_replay(
            conn, strategy="sma_crossover", symbols=["BTC/USDT"], timeframe="1m",
            start=parse_time("2024-01-02", "from"), end=parse_time("2024-01-02T08:00", "to"),
            speed="240", params={"fast": 10, "slow": 20}, cash=Decimal(10000),
            commission=Decimal("0.001"), slippage="none", spread=Decimal(0),
            allow_short=False, home=home)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(f"""
[[accounts]]
name = "bn-testnet"
environment = "paper"
mode = "advisory"
currency = "USDT"
broker = "ccxt"
exchange = "binance"
endpoint = "testnet"
credential = "bn"

[notifications]
events = ["fill", "signal"]
[[notifications.channels]]
type = "webhook"
url = "http://127.0.0.1:{server.server_address[1]}/hook"
secret_env = "MMATS_TEST_WEBHOOK_SECRET"
""")
        cfg = runtime_config.load(path)
        apply_config(conn, cfg)
        credentials.store(conn, master, "bn-testnet", "bn", "binance", "testnet",
                          {"api_key": API_KEY, "secret": API_SECRET})
        account = cfg.replay.account if cfg.replay else ""

    out = tmp_path / "run.out"
    with out.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", "from api.cli import main; main()",
                                 "run", "--config", str(path)], env=env, stdin=subprocess.DEVNULL,
                                stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            fills = 0
            while time.monotonic() < deadline:
                with psycopg.connect(db_url, autocommit=True) as conn:
                    fills = conn.execute(
                        "SELECT count(*) FROM trading.fills f JOIN trading.accounts a "
                        "USING (account_id) WHERE a.name = %s", (account,)).fetchone()[0]
                    reconciled = conn.execute(
                        "SELECT count(*) FROM runtime.workers WHERE kind = 'reconciler'"
                    ).fetchone()[0]
                if fills >= 4 and _Hook.received and reconciled:
                    break
                assert proc.poll() is None, out.read_text()[-3000:]
                time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            server.shutdown()
    assert fills >= 4, out.read_text()[-3000:]
    assert _Hook.received and all(r["signature"] for r in _Hook.received)

    logs = sorted((home / "logs").glob("*.log"))
    kinds = {p.stem for p in logs}
    assert {"ingest", "strategies", "router", "reconciler", "notifier"} <= kinds, kinds
    text = out.read_text(encoding="utf-8", errors="replace") + "".join(
        p.read_text(encoding="utf-8", errors="replace") for p in logs)
    assert "bn-testnet" in text or "binance" in text  # the keyed account was at work
    for secret in (API_KEY, API_SECRET, WEBHOOK_SECRET, master_text, master.key.hex()):
        assert secret not in text, f"a secret ({secret[:4]}...) is in the logs"
