"""The whole live path on the replay feed, each worker in its own process: parity with
`mmats backtest` on the same bars, and crash safety under SIGKILL.

ingest (replay) -> market.bars trigger -> strategy worker -> trading.submit_signal ->
pgmq orders -> router -> paper broker -> trading.apply_fill. Everything runs against a
real PostgreSQL (this test's own database) and real worker processes.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from api.cli_runtime import run_replay_session
from workers.backtest.config import BacktestConfig, parse_time
from workers.backtest.run import run_backtest
from workers.ingest.importer import import_file
from workers.ingest.samples import sample_datasets

pytestmark = pytest.mark.slow

START, END = "2024-01-02T00:00", "2024-01-02T10:00"
CRASH_END = "2024-01-04T00:00"  # long enough for several kills while it plays


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This test's database, with the sample BTC/USDT minute bars, as the workers see it."""
    sample = next(s for s in sample_datasets() if s.symbol == "BTC/USDT")
    with psycopg.connect(db_url, autocommit=True) as conn:
        import_file(conn, sample.path, symbol=sample.symbol, market=sample.market,
                    timeframe=sample.timeframe, venue=sample.venue)
    monkeypatch.setenv("MMATS_DATABASE_URL", db_url)
    monkeypatch.setenv("MMATS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MMATS_CONFIG", raising=False)
    yield db_url


def _trades(conn: psycopg.Connection, account: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT t.side, t.quantity, t.entry_time, t.entry_price, t.exit_time, t.exit_price, "
        "t.pnl, t.commission, t.exit_trigger::text FROM trading.trades t "
        "JOIN trading.accounts a USING (account_id) WHERE a.name = %s "
        "ORDER BY t.entry_time, t.trade_id", (account,)).fetchall()


def _backtest(conn: psycopg.Connection, strategy: str, params: dict[str, Any],
              commission: str, end: str = END) -> str:
    cfg = BacktestConfig(strategy=strategy, symbols=("BTC/USDT",), timeframe="1m",
                         start=parse_time(START, "from"), end=parse_time(end, "to"),
                         params=params, cash=Decimal(10000), commission=Decimal(commission))
    run_id = run_backtest(conn, cfg)
    return f"bt-{run_id}"


def _replay(strategy: str, params: dict[str, Any], commission: str, end: str = END,
            **kw: Any) -> dict[str, Any]:
    return run_replay_session(strategy=strategy, symbols=["BTC/USDT"], timeframe="1m",
                              start=parse_time(START, "from"), end=parse_time(end, "to"),
                              speed="max", params=params, cash=Decimal(10000),
                              commission=Decimal(commission), timeout=600, **kw)


@pytest.mark.parametrize(("strategy", "params"), [
    ("sma_crossover", {"fast": 10, "slow": 20}),
    # ATR stops: protective orders fired by the bars trigger and filled on the bar
    ("donchian_breakout", {"channel": 20, "exit_channel": 10, "trail_atr": 2}),
])
def test_a_replayed_paper_session_gives_the_backtest_s_trades(env, strategy, params):
    with psycopg.connect(env, autocommit=True) as conn:
        bt_account = _backtest(conn, strategy, params, "0.001")
        expected = _trades(conn, bt_account)
    result = _replay(strategy, params, "0.001")
    with psycopg.connect(env, autocommit=True) as conn:
        got = _trades(conn, result["account"])
        env_row = conn.execute("SELECT environment::text FROM trading.accounts WHERE name = %s",
                               (result["account"],)).fetchone()
    assert env_row == ("paper",)
    assert len(expected) >= 5, "the period must produce trades for the comparison to mean much"
    assert got == expected
    _readme_runtime_queries(env)


def _readme_runtime_queries(url: str) -> None:
    """The README's runtime queries run as the read-only role, and show the workers."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- runtime-queries -->", 1)[1].split("```sql", 1)[1]
    statements = [s.strip() for s in block.split("```", 1)[0].split(";") if s.strip()]
    assert len(statements) == 3
    with psycopg.connect(url) as conn:
        conn.execute("SET ROLE mmats_readonly")
        results = [conn.execute(st).fetchall() for st in statements]  # type: ignore[call-overload]
    assert {r[1] for r in results[0]} == {"ingest", "strategies", "router"}


def _invariants(conn: psycopg.Connection, account: str) -> None:
    """No order lost or duplicated, no fill applied twice, positions and cash equal the
    fold of the fills."""
    (acc_id, start_cash, cash) = conn.execute(
        "SELECT account_id, starting_cash, cash FROM trading.accounts WHERE name = %s",
        (account,)).fetchone()
    approved = conn.execute(
        "SELECT count(*) FROM trading.signals WHERE account_id = %s AND status = 'approved'",
        (acc_id,)).fetchone()[0]
    per_signal = conn.execute(
        "SELECT count(*), count(DISTINCT signal_id) FROM trading.orders "
        "WHERE account_id = %s AND signal_id IS NOT NULL", (acc_id,)).fetchone()
    assert per_signal == (approved, approved), "one order per approved signal, no more"
    assert conn.execute(
        "SELECT count(*) FROM trading.orders o WHERE o.account_id = %s AND o.filled_quantity <> "
        "(SELECT COALESCE(sum(f.quantity), 0) FROM trading.fills f WHERE f.order_id = o.order_id)",
        (acc_id,)).fetchone()[0] == 0
    dup = conn.execute("SELECT count(*) - count(DISTINCT broker_fill_id) FROM trading.fills "
                       "WHERE account_id = %s", (acc_id,)).fetchone()[0]
    assert dup == 0
    folded = conn.execute(
        "SELECT COALESCE(sum(CASE WHEN side = 'buy' THEN quantity ELSE -quantity END), 0), "
        "COALESCE(sum(CASE WHEN side = 'buy' THEN -quantity * price ELSE quantity * price END)"
        " - sum(commission), 0) FROM trading.fills WHERE account_id = %s", (acc_id,)).fetchone()
    held = conn.execute(
        "SELECT COALESCE(sum(CASE WHEN leg = 'short' THEN -quantity ELSE quantity END), 0) "
        "FROM trading.positions WHERE account_id = %s", (acc_id,)).fetchone()[0]
    assert held == folded[0]
    assert cash == start_cash + folded[1]
    # every queue message of the session was settled (archived), none left behind
    left = conn.execute("SELECT count(*) FROM pgmq.q_orders "
                        "WHERE (message ->> 'account_id')::bigint = %s", (acc_id,)).fetchone()[0]
    assert left == 0


def test_sigkilled_workers_lose_nothing_and_repeat_nothing(env):
    seed = int(os.environ.get("MMATS_CRASH_SEED", random.randrange(1_000_000)))
    rng = random.Random(seed)
    kills: list[str] = []
    plan = {"next": time.monotonic() + rng.uniform(1.0, 2.0)}

    def killer(sup: Any) -> None:
        if time.monotonic() < plan["next"] or len(kills) >= 8:
            return
        kind = rng.choice(["router", "strategies", "ingest"])
        child = sup.children[kind]
        if child.process is not None and child.process.poll() is None:
            child.process.send_signal(signal.SIGKILL)
            kills.append(kind)
        plan["next"] = time.monotonic() + rng.uniform(0.2, 1.2)

    with psycopg.connect(env, autocommit=True) as conn:
        bt_account = _backtest(conn, "sma_crossover", {"fast": 10, "slow": 20}, "0.001",
                               CRASH_END)
        expected = _trades(conn, bt_account)
    result = _replay("sma_crossover", {"fast": 10, "slow": 20}, "0.001", CRASH_END,
                     visibility_seconds=1, on_tick=killer, restart_base=0.1)
    note = f"seed {seed}, kills {kills}, restarts {result['restarts']}"
    assert len(kills) >= 3, f"the session ended before enough kills ({note})"
    with psycopg.connect(env, autocommit=True) as conn:
        _invariants(conn, result["account"])
        got = _trades(conn, result["account"])
    # lockstep and exactly-once resume points: the crashes change nothing at all
    assert got == expected, note


@pytest.mark.parametrize(("args", "message"), [
    (["--strategy", "nope"], "no strategy named 'nope'"),
    (["--strategy", "sma_crossover", "--speed", "-1"], "--speed must be a number from 0.001"),
    (["--strategy", "sma_crossover", "--params", "fast=abc"], "parameter fast must be int"),
    (["--strategy", "sma_crossover", "--cash", "NaN"], "--cash must be a finite number"),
    (["--strategy", "sma_crossover", "--symbol", "NOPE'; DROP TABLE x;--"],
     "unknown symbol \"NOPE'; DROP TABLE X;--\""),
])
def test_mmats_paper_refuses_bad_input_in_one_line_and_writes_nothing(env, args, message):
    import subprocess
    import sys

    base = ["--symbol", "BTC/USDT", "--from", START, "--to", END, "--quiet"]
    done = subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "paper",
                           "--feed", "replay", *base, *args], capture_output=True, text=True,
                          env=os.environ.copy(), stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: {done.stderr.strip()[7:]}"]
    assert message in done.stderr
    with psycopg.connect(env, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM market.instruments "
                            "WHERE venue ~ '^replay'").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM trading.accounts").fetchone() == (0,)
    assert not list((Path(os.environ["MMATS_HOME"]) / "sessions").glob("*.toml"))


HOOKED = '''
from decimal import Decimal
from strategies.base import IStrategy
from strategies.signal import TradeSignal


class FillWatcher(IStrategy):
    """Trades on what on_order_filled told it: out when the price falls 0.1 % below its
    own entry fill, or after 8 bars; back in 3 bars after its exit fill."""

    name = "fill_watcher"
    version = "1"

    def __init__(self, params=None):
        super().__init__(params)
        self.entry = None
        self.bars = 0
        self.fills = 0

    def get_required_indicators(self):
        return []

    def on_order_filled(self, event):
        self.fills += 1
        self.entry = event.price if event.side == "buy" else None
        self.bars = 0

    def on_bar(self, context):
        self.bars += 1
        md = context.data["BTC/USDT"]
        close = md.bar.close
        def sig(action):
            return TradeSignal(strategy=self.name, version=self.version, symbol="BTC/USDT",
                               action=action, ts=context.now, size=Decimal("0.5"),
                               reasoning=f"fills so far {self.fills}")
        if self.entry is None and self.bars >= 3:
            self.bars = -1000  # one entry order at a time: wait for its fill
            return sig("buy")
        if self.entry is not None and (close < self.entry * Decimal("0.999") or self.bars >= 8):
            self.bars = -1000
            return sig("close")
        return None
'''


def test_a_strategy_driven_by_its_fill_events_trades_the_same_in_paper_and_backtest(
        env, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "fill_watcher.py").write_text(HOOKED, encoding="utf-8")
    with psycopg.connect(env, autocommit=True) as conn:
        cfg = BacktestConfig(strategy="fill_watcher", symbols=("BTC/USDT",), timeframe="1m",
                             start=parse_time(START, "from"), end=parse_time(END, "to"),
                             cash=Decimal(10000), commission=Decimal("0.001"),
                             strategy_dirs=(folder,))
        expected = _trades(conn, f"bt-{run_backtest(conn, cfg)}")
    result = _replay("fill_watcher", {}, "0.001", strategy_dirs=(folder,))
    with psycopg.connect(env, autocommit=True) as conn:
        got = _trades(conn, result["account"])
    assert len(expected) >= 10
    assert got == expected
