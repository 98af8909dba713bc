"""`mmats backtest`, `runs`, `report`, `montecarlo`, run as a user runs them (subprocesses),
and the README's example queries against a real run."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from workers.ingest.importer import import_file
from workers.ingest.samples import sample_datasets

REPO = Path(__file__).resolve().parent.parent
BTC = ("--symbol", "BTC/USDT", "--timeframe", "1m", "--from", "2024-01-01",
       "--to", "2024-01-02")
TRADE_KEYS = {"symbol", "side", "quantity", "entry_time", "entry_price", "exit_time",
              "exit_price", "pnl", "commission", "strategy"}


@pytest.fixture(scope="module")
def btc_url(mod_url: str) -> str:
    with psycopg.connect(mod_url, autocommit=True) as conn:
        for ds in sample_datasets():
            if ds.symbol == "BTC/USDT":
                import_file(conn, ds.path, symbol=ds.symbol, market=ds.market,
                            timeframe=ds.timeframe, venue=ds.venue)
    return mod_url


@pytest.fixture
def run(btc_url: str):  # type: ignore[no-untyped-def]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMATS_")},
           "MMATS_DATABASE_URL": btc_url}

    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", *args],
                              env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, cwd=REPO)
    return _run


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def runs(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM backtest.runs").fetchone()
    assert row is not None
    return int(row[0])


def test_backtest_prints_the_run_and_writes_json_html(run, btc_url: str,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    html = tmp_path / "run.html"
    result = run("backtest", "--strategy", "sma_crossover", *BTC, "--commission", "0.001",
                 "--params", "fast=10,slow=20", "--json", str(out), "--html", str(html))
    assert result.returncode == 0, result.stderr
    match = re.search(r"^run (\d+) \(bt-\1\): sma_crossover 1\.0\.0 on BTC/USDT 1m", result.stdout,
                      re.MULTILINE)
    assert match, result.stdout
    run_id = int(match.group(1))
    assert "total return" in result.stdout and "replay: 100 %" in result.stderr
    data = json.loads(out.read_text())
    assert data["run_id"] == run_id
    for key in ("final_equity", "total_return", "sharpe", "max_drawdown", "trades"):
        assert key in data["metrics"], key
    assert data["metrics"]["trades"] == len(data["trades"]) > 0
    assert all(set(t) >= TRADE_KEYS for t in data["trades"])
    assert isinstance(data["open_positions"], list)
    assert data["sanity"] == []
    with psycopg.connect(btc_url) as conn:
        row = conn.execute("SELECT e.equity FROM backtest.runs r, "
                           "trading.account_equity(r.account_id) e WHERE r.run_id = %s",
                           (run_id,)).fetchone()
    assert row is not None
    assert abs(float(row[0]) - data["metrics"]["final_equity"]) < 1e-6
    text = html.read_text()
    assert "<svg" in text and "sma_crossover" in text


def test_the_same_backtest_twice_has_the_same_fingerprint(run, btc_url: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(2):
        assert run("backtest", "--quiet", "--strategy", "sma_crossover", *BTC,
                   "--label", "twice").returncode == 0
    with psycopg.connect(btc_url) as conn:
        prints = conn.execute("SELECT fingerprint FROM backtest.runs WHERE label = 'twice'"
                              ).fetchall()
    assert len(prints) == 2 and prints[0] == prints[1] and prints[0][0]


def test_readme_backtest_queries_run(run, btc_url: str) -> None:  # type: ignore[no-untyped-def]
    result = run("backtest", "--quiet", "--strategy", "sma_crossover", *BTC)
    assert result.returncode == 0, result.stderr
    run_id = re.search(r"^run (\d+)", result.stdout, re.MULTILINE).group(1)  # type: ignore[union-attr]
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- backtest-queries -->", 1)[1].split("```sql", 1)[1]
    block = block.split("```", 1)[0]
    statements = [s.strip() for s in block.replace("run_id = 1", f"run_id = {run_id}")
                  .split(";") if s.strip()]
    assert len(statements) >= 5
    with psycopg.connect(btc_url) as conn:
        conn.execute("SET ROLE mmats_readonly")
        for statement in statements:
            rows = conn.execute(statement).fetchall()  # type: ignore[call-overload]
            assert rows, statement


def test_report_pdf_montecarlo_and_runs(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("backtest", "--quiet", "--strategy", "sma_crossover", *BTC)
    run_id = re.search(r"^run (\d+)", result.stdout, re.MULTILINE).group(1)  # type: ignore[union-attr]
    mc = run("montecarlo", run_id, "--paths", "200", "--seed", "7")
    assert mc.returncode == 0, mc.stderr
    assert re.search(r"shuffle\s+200\s", mc.stdout) and re.search(r"bootstrap\s+200\s", mc.stdout)
    pdf, out = tmp_path / "r.pdf", tmp_path / "r.json"
    rep = run("report", run_id, "--pdf", str(pdf), "--json", str(out))
    assert rep.returncode == 0, rep.stderr
    assert pdf.read_bytes().startswith(b"%PDF")
    data: dict[str, Any] = json.loads(out.read_text())
    assert sorted(m["method"] for m in data["montecarlo"]) == ["bootstrap", "shuffle"]
    listed = run("runs")
    assert re.search(rf"^\s*{run_id}\s+sma_crossover\s+BTC/USDT\s+1m", listed.stdout, re.MULTILINE)


@pytest.mark.parametrize("args,fragment", [
    (("--symbol", "NOPE/USD", "--timeframe", "1m", "--from", "2024-01-01", "--to", "2024-01-02"),
     "unknown symbol 'NOPE/USD'"),
    (("--symbol", "BTC/USDT", "--timeframe", "1m", "--from", "2020-01-01", "--to", "2020-01-02"),
     "no 1m bars for BTC/USDT"),
    (("--symbol", "BTC/USDT", "--timeframe", "7m", "--from", "2024-01-01", "--to", "2024-01-02"),
     "--timeframe '7m'"),
    ((*BTC, "--cash", "NaN"), "--cash must be a finite number"),
    ((*BTC, "--cash", "-5"), "--cash must be a number > 0"),
    ((*BTC, "--from", "yesterday"), "--from 'yesterday' is not a date"),
    ((*BTC, "--params", "fast=30,slow=20"), "fast (30) must be below slow (20)"),
    ((*BTC, "--params", "speed=3"), "speed"),
    ((*BTC, "--slippage", "lots"), "slippage 'lots'"),
    ((*BTC, "--commission", "0.5"), "--commission must be a fraction below 0.1"),
    # bounds: a cash the trading core cannot hold used to fail late, naming fill.quantity,
    # and leave a failed run; a slippage without bound ran to 0 fills or -100 %
    ((*BTC, "--cash", "1e400"), "--cash '1e400' is out of range: it must be less than 10^18"),
    ((*BTC, "--cash", "1" * 400), "--cash '" + "1" * 40 + "...' is too long"),
    ((*BTC, "--slippage", "bps:20000"), "slippage 'bps:20000': at most bps:1000"),
    ((*BTC, "--slippage", "atr:1e400"), "slippage 'atr:1e400': at most atr:10"),
    # output files are checked before the run starts (nothing is stored)
    ((*BTC, "--html", "/proc/x.html"), "--html /proc/x.html: cannot create a file in /proc"),
    ((*BTC, "--json", "/nonexistent/dir/x.json"),
     "--json /nonexistent/dir/x.json: folder /nonexistent/dir does not exist"),
    ((*BTC, "--json", "/tmp"), "--json /tmp: it is a folder, not a file"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, btc_url: str, args: tuple[str, ...],  # type: ignore[no-untyped-def]
                                                  fragment: str) -> None:
    before = runs(btc_url)
    line = one_error_line(run("backtest", "--quiet", "--strategy", "sma_crossover", *args))
    assert fragment in line, line
    assert runs(btc_url) == before


def test_a_missing_strategy_folder_is_refused(run, btc_url: str) -> None:  # type: ignore[no-untyped-def]
    before = runs(btc_url)
    result = run("backtest", "--quiet", "--strategy", "sma_crossover", *BTC,
                 "--strategy-dir", "/nonexistent/strategies")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'/nonexistent/strategies' does not exist" in result.stderr
    assert runs(btc_url) == before


def test_report_output_that_cannot_be_written_is_one_line(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run("backtest", "--quiet", "--strategy", "sma_crossover", *BTC)
    run_id = re.search(r"^run (\d+)", result.stdout, re.MULTILINE).group(1)  # type: ignore[union-attr]
    line = one_error_line(run("report", run_id, "--html", "/proc/x.html"))
    assert "--html /proc/x.html: cannot create a file in /proc" in line
    line = one_error_line(run("report", run_id, "--pdf", str(tmp_path / "no" / "r.pdf")))
    assert f"folder {tmp_path / 'no'} does not exist" in line


def test_hostile_text_is_refused_or_stored_as_text(run, btc_url: str) -> None:  # type: ignore[no-untyped-def]
    hostile = "x'); DROP TABLE backtest.runs; --<script>"
    line = one_error_line(run("backtest", "--strategy", hostile, *BTC))
    assert "strategy" in line.lower()
    ok = run("backtest", "--quiet", "--strategy", "sma_crossover", *BTC, "--label", hostile)
    assert ok.returncode == 0, ok.stderr
    with psycopg.connect(btc_url) as conn:
        assert conn.execute("SELECT count(*) FROM backtest.runs WHERE label = %s",
                            (hostile,)).fetchone() == (1,)


def test_limits_file_applies_to_the_run_account(run, btc_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    limits = tmp_path / "limits.toml"
    limits.write_text('[[limit]]\ntype = "MAX_POSITION_SIZE"\nvalue = 0.1\n')
    result = run("backtest", "--quiet", "--strategy", "sma_crossover", *BTC,
                 "--limits", str(limits))
    assert result.returncode == 0, result.stderr
    run_id = int(re.search(r"^run (\d+)", result.stdout, re.MULTILINE).group(1))  # type: ignore[union-attr]
    with psycopg.connect(btc_url) as conn:
        codes = conn.execute(
            "SELECT g.reason_code, count(*) FROM trading.signals g JOIN backtest.runs r "
            "USING (account_id) WHERE r.run_id = %s AND g.status = 'rejected' GROUP BY 1",
            (run_id,)).fetchall()
    # every buy asks for the whole capital: the 10 % limit refuses each one
    assert [c for c, _ in codes] == ["MAX_POSITION_SIZE"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[[limit]]\nvalue = 1\n")
    line = one_error_line(run("backtest", "--strategy", "sma_crossover", *BTC,
                              "--limits", str(bad)))
    assert "limit 1: needs a type" in line


USER_STRATEGY = '''
from strategies import IStrategy


class S(IStrategy):
    name = {name!r}

    def get_required_indicators(self):
        return []

    def initialize(self, config):
        {init}

    def on_bar(self, context):
        {body}
'''


@pytest.mark.parametrize(("name", "init", "body", "says"), [
    ("init_raises", "raise RuntimeError('no API key configured')", "return None",
     "error: init_raises: initialize failed: RuntimeError: no API key configured"),
    ("my strategy", "pass", "return None", "error: no strategy named 'my strategy'"),
    ("exits_in_on_bar", "pass", "raise SystemExit(3)", None),
])
def test_a_misbehaving_user_strategy_is_one_error_line_or_a_recorded_error(
        run, tmp_path: Path, name: str, init: str, body: str, says: str | None) -> None:
    (tmp_path / "s.py").write_text(USER_STRATEGY.format(name=name, init=init, body=body))
    result = run("backtest", "--quiet", "--strategy", name, "--symbol", "BTC/USDT",
                 "--timeframe", "1m", "--from", "2024-01-01", "--to", "2024-01-01T01:00",
                 "--strategy-dir", str(tmp_path))
    if says is not None:
        assert one_error_line(result).startswith(says), result.stderr
        return
    # sys.exit in on_bar: the run completes, the error recorded like any other
    assert result.returncode == 0 and "Traceback" not in result.stderr, result
    assert re.search(r"^run \d+ ", result.stdout, re.MULTILINE), result.stdout
    assert "exits_in_on_bar 1.0.0: SystemExit: 3 (1 in a row)" in result.stdout + result.stderr


def test_the_readme_strategy_example_runs_and_trades_on_its_timer(
        run, btc_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    readme = (REPO / "README.md").read_text()
    code = readme.split("<!-- strategy-example -->", 1)[1].split("```python", 1)[1]
    (tmp_path / "hourly_dip.py").write_text(code.split("```", 1)[0])
    result = run("backtest", "--quiet", "--strategy", "hourly_dip", "--strategy-dir",
                 str(tmp_path), *BTC, "--label", "readme-example")
    assert result.returncode == 0, result.stderr
    with psycopg.connect(btc_url) as conn:
        stamps = [ts for (ts,) in conn.execute(
            "SELECT g.ts FROM trading.signals g JOIN backtest.runs r USING (account_id)"
            " WHERE r.label = 'readme-example' ORDER BY g.signal_id")]
        trades = conn.execute(
            "SELECT count(*) FROM backtest.trades t JOIN backtest.runs r USING (run_id)"
            " WHERE r.label = 'readme-example'").fetchone()
    # on_bar says nothing: every signal is the timer's, decided at the top of an hour
    assert stamps, "the example never signalled on this day of data"
    assert all((ts.minute, ts.second, ts.microsecond) == (59, 59, 999999) for ts in stamps)
    assert trades is not None and trades[0] >= 1


def test_mmats_strategies_names_every_file_that_did_not_load(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The loader scans its folders when it is built: the command's own second scan found
    nothing new, so a broken file printed nothing and the command exited 0."""
    (tmp_path / "broken.py").write_text("def oops(:\n")
    result = run("strategies", "--strategy-dir", str(tmp_path))
    assert result.returncode == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "broken.py" in lines[0] and "syntax error" in lines[0], result
    assert "sma_crossover" in result.stdout  # the examples are still listed


def test_report_and_montecarlo_of_a_run_not_finished_are_one_line(run, btc_url: str,  # type: ignore[no-untyped-def]
                                                                 tmp_path: Path) -> None:
    """A run still replaying, or one that failed, has no results: `report` printed a
    traceback (its summary formats the missing bar count), `report --html` wrote a report
    of nothing and `montecarlo` said 'no closed trades' as if the run had made none."""
    with psycopg.connect(btc_url, autocommit=True) as conn:
        make = ("SELECT backtest.create_run('sma_crossover', '1.0.0', '{}', '{BTC/USDT}', '1m',"
                " '2024-01-01', '2024-01-02', 10000, 'USDT')")
        (running,) = conn.execute(make).fetchone()  # type: ignore[misc]
        (failed,) = conn.execute(make).fetchone()  # type: ignore[misc]
        conn.execute("SELECT backtest.finish_run(%s, 'failed', NULL, NULL, 0.5, "
                     "'RuntimeError: boom', '{}')", (failed,))
    html = tmp_path / "r.html"
    for args in ((), ("--html", str(html)), ("--json", str(tmp_path / "r.json"))):
        line = one_error_line(run("report", str(running), *args))
        assert line == f"error: run {running} is still running: it has no results yet"
        line = one_error_line(run("report", str(failed), *args))
        assert line == (f"error: run {failed} failed (RuntimeError: boom): "
                        "it has no results to show")
    assert not html.exists() and not (tmp_path / "r.json").exists()
    line = one_error_line(run("montecarlo", str(running)))
    assert line == f"error: run {running} is still running: it has no results yet"
    line = one_error_line(run("montecarlo", str(failed)))
    assert "failed (RuntimeError: boom)" in line


def test_monthly_returns_put_a_midnight_close_in_the_month_it_ends(run, btc_url: str,  # type: ignore[no-untyped-def]
                                                                   tmp_path: Path) -> None:
    """The equity points are bar closes: the 1d bar of 31 March closes at 1 April 00:00.
    A first-quarter run showed an April cell in the heatmap (March's last bar's return),
    and March's return left that bar out."""
    with psycopg.connect(btc_url, autocommit=True) as conn:
        for ds in sample_datasets():
            if ds.symbol == "AAPL" and not conn.execute(
                    "SELECT 1 FROM market.instruments WHERE symbol = 'AAPL'").fetchone():
                import_file(conn, ds.path, symbol=ds.symbol, market=ds.market,
                            timeframe=ds.timeframe, venue=ds.venue)
    out = tmp_path / "q1.json"
    result = run("backtest", "--quiet", "--strategy", "sma_crossover", "--symbol", "AAPL",
                 "--timeframe", "1d", "--from", "2010-01-01", "--to", "2010-04-01",
                 "--params", "fast=3,slow=8", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    months = data["monthly_returns"]
    assert [(m["year"], m["month"]) for m in months] == [(2010, 1), (2010, 2), (2010, 3)]
    ts, equity = data["equity"]["ts"], data["equity"]["equity"]
    assert ts[-1] == "2010-04-01T00:00:00+00:00"  # the close of 31 March's bar
    # March: the run's last point against February's last (a close on 1 March or before)
    feb_end = max(i for i, t in enumerate(ts) if t <= "2010-03-01T00:00:00+00:00")
    assert months[2]["return"] == pytest.approx(equity[-1] / equity[feb_end] - 1, rel=1e-12)
    total = math.prod(1 + m["return"] for m in months) - 1
    assert total == pytest.approx(data["metrics"]["total_return"], rel=1e-9)


def test_report_of_a_walk_forward_not_finished_is_one_line(run, btc_url: str,  # type: ignore[no-untyped-def]
                                                           tmp_path: Path) -> None:
    """A running or failed walk-forward was written as a report with no metrics, no
    windows and a "Sanity check passed" banner, nothing saying it never finished."""
    with psycopg.connect(btc_url, autocommit=True) as conn:
        make = ("SELECT backtest.create_walk_forward('sma_crossover', '{BTC/USDT}', '1m', "
                "'2024-01-01', '2024-01-07', 'sharpe')")
        (running,) = conn.execute(make).fetchone()  # type: ignore[misc]
        (failed,) = conn.execute(make).fetchone()  # type: ignore[misc]
        conn.execute("SELECT backtest.finish_walk_forward(%s, 'failed', %s)", (failed, json.dumps(
            {"error": "BacktestError: window 1: no bars", "windows": [], "stitched": None})))
    html = tmp_path / "wf.html"
    line = one_error_line(run("report", "--walk-forward", str(running), "--html", str(html)))
    assert line == f"error: walk-forward {running} is still running: it has no results yet"
    line = one_error_line(run("report", "--walk-forward", str(failed), "--html", str(html)))
    assert line == (f"error: walk-forward {failed} failed (BacktestError: window 1: no bars): "
                    "it has no results to show")
    assert not html.exists()


def test_a_run_on_a_symbol_two_venues_list_reads_back_its_own_venue(run, btc_url: str,  # type: ignore[no-untyped-def]
                                                                     tmp_path: Path) -> None:
    """The run stored the symbol alone; its report looked the symbol up again and refused
    it ("exists on several venues"), after the run was stored: no JSON, exit 1, and no
    report or Monte Carlo for that run ever."""
    (ds,) = [d for d in sample_datasets() if d.symbol == "BTC/USDT"]
    with psycopg.connect(btc_url, autocommit=True) as conn:
        for venue in ("kraken", "okx"):
            import_file(conn, ds.path, symbol="XBT/USDT", market=ds.market,
                        timeframe=ds.timeframe, venue=venue)
    out = tmp_path / "run.json"
    result = run("backtest", "--quiet", "--strategy", "sma_crossover", "--symbol",
                 "XBT/USDT@kraken", *BTC[2:], "--json", str(out))
    assert result.returncode == 0, result.stderr
    run_id = json.loads(out.read_text())["run_id"]
    again = tmp_path / "again.json"
    assert run("report", str(run_id), "--json", str(again)).returncode == 0
    assert run("montecarlo", str(run_id), "--paths", "20").returncode == 0
    report = json.loads(again.read_text())
    assert report["metrics"] == json.loads(out.read_text())["metrics"]
    assert len(report["prices"]["XBT/USDT"]["close"]) > 0


def stored_rows(url: str) -> tuple[int, ...]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM backtest.runs), (SELECT count(*) FROM"
            " backtest.walk_forwards), (SELECT count(*) FROM trading.accounts),"
            " (SELECT count(*) FROM risk.limits), (SELECT count(*) FROM audit.events)").fetchone()
    assert row is not None
    return tuple(int(v) for v in row)


@pytest.mark.parametrize(("content", "args", "says"), [
    # a limit the trading core refuses was set after the run and its account were stored
    (b'[[limit]]\ntype = "MAX_DRAWDOWN"\nvalue = 5\n', (),
     "limit 1: MAX_DRAWDOWN must be a fraction between 0 and 1, got 5"),
    (b'[[limit]]\ntype = "MAX_OPEN_POSITIONS"\nvalue = 3\n[[limit]]\ntype = "NOSUCH"\n'
     b'value = 1\n', (), "limit 2: unknown limit type 'NOSUCH'"),
    (b'\xff\xfe[[limit]]', (), "not UTF-8 text (byte b'\\xff' at offset 0)"),  # a traceback
    (b'', ("--cash", "1e-16000"), "--cash '1e-16000' has more than 18 decimal places"),
])
@pytest.mark.parametrize("command", ["backtest", "walk-forward"])
def test_a_refused_limits_file_or_cash_stores_nothing(run, btc_url: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                      content, args, says, command) -> None:
    limits = tmp_path / "limits.toml"
    limits.write_bytes(content)
    before = stored_rows(btc_url)
    extra = ("--param", "fast=5:10:5") if command == "walk-forward" else ()
    line = one_error_line(run(command, "--strategy", "sma_crossover", "--symbol", "BTC/USDT",
                              "--timeframe", "1m", "--from", "2024-01-01", "--to",
                              "2024-01-07", "--limits", str(limits), *args, *extra))
    assert says in line, line
    if not args:
        assert f"--limits {limits}" in line, line
    assert stored_rows(btc_url) == before


@pytest.mark.parametrize(("args", "says"), [
    (("backtest", "--strategy", "x"),
     "error: Missing option '--symbol' (see `mmats backtest --help`)"),
    (("nosuch",), "error: No such command 'nosuch' (see `mmats --help`)"),
    (("runs", "--limit", "many"), "error: Invalid value for '--limit': 'many' is not a valid"),
])
def test_a_mistyped_command_is_one_error_line_with_status_2(run, args, says) -> None:  # type: ignore[no-untyped-def]
    # click's own usage block was three lines ("Usage: ...", "Try ...", "Error: ...")
    result = run(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(says), result.stderr
