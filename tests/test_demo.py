"""`mmats demo`, the main job, as a user runs it (a subprocess) on a fresh database: twice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_imports_backtests_reports_and_repeats_identically(db_url: str,
                                                                 tmp_path: Path) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMATS_")},
           "MMATS_DATABASE_URL": db_url, "MMATS_HOME": str(tmp_path)}

    def demo() -> str:
        done = subprocess.run([sys.executable, "-c", "from api.cli import main; main()", "demo"],
                              env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        return done.stdout

    first = demo()
    runs = re.findall(r"^\s+run (\d+)\s+(\w+)\s.*?(\d+) trades", first, re.MULTILINE)
    assert [name for _, name, _ in runs] == ["sma_crossover", "rsi_mean_reversion",
                                            "donchian_breakout", "momentum_rotation"]
    assert all(int(trades) > 0 for _, _, trades in runs)
    reports = sorted(p.name for p in (tmp_path / "reports").glob("*.html"))
    assert len(reports) == 4 and all(Path(tmp_path / "reports" / r).stat().st_size > 10_000
                                     for r in reports)
    assert "identical to run" not in first
    # the replayed paper session: its signals, orders and fills as they happen, and the
    # same trades as a backtest of the same bars
    assert re.search(r"^\s+signal #\d+ 2024-01-02 \d\d:\d\d BTC/USDT buy -> approved$", first,
                     re.MULTILINE)
    assert re.search(r"^\s+fill\s+#\d+ 2024-01-02 ", first, re.MULTILINE)
    assert re.search(r"\(PAPER\): \d+ signals.*: the same trades$", first, re.MULTILINE)
    second = demo()
    assert "0 new" in second and second.count("identical to run") == 4
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("SELECT label, count(DISTINCT fingerprint), count(*) "
                            "FROM backtest.runs WHERE status = 'finished' GROUP BY 1 ORDER BY 1"
                            ).fetchall()
    assert rows == [("demo-donchian", 1, 2), ("demo-momentum", 1, 2),
                    ("demo-paper-parity", 1, 2), ("demo-rsi", 1, 2), ("demo-sma", 1, 2)]
    assert second.count(": the same trades") == 1
