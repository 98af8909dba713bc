"""The backtest report: HTML sections, escaping, decimation, PDF pages, atomic writes.

No database: every test builds a synthetic report dict (the shape the engine writes with
--json) and renders it.
"""

from __future__ import annotations

import copy
import math
import os
import re
import stat
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import matplotlib
import numpy as np
import pytest

from workers.backtest import report as rpt

START = datetime(2023, 11, 1, tzinfo=UTC)
HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = '"><img src=x onerror=alert(1)>'
SECTION_TITLES = (
    "Metrics", "By strategy", "By market", "Equity vs buy-and-hold", "Drawdown",
    "Monthly returns", "Prices and trades", "Trades", "Open positions at the end",
    "Walk-forward analysis", "Monte Carlo", "Assumptions", "Sanity check",
)


def iso(ts: datetime) -> str:
    return ts.isoformat()


def make_trades(n: int, closes: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """n closed trades over the 3,000-hour run at the given closes (or near 42,000);
    prices as Decimal strings, like the engine writes them."""
    symbols = list(closes) if closes else ["BTC/USDT", "ETH/USDT"]
    trades = []
    for i in range(n):
        hour = (i * 2_980) // max(n, 1)
        symbol = symbols[i % len(symbols)]
        close = closes[symbol] if closes else np.full(3_000, 42_000.0 + i)
        short = i % 3 == 2
        pnl = 12.5 if i % 2 == 0 else -7.25
        entry = START + timedelta(hours=hour)
        trades.append({
            "symbol": symbol, "side": "short" if short else "long", "quantity": "0.1",
            "entry_time": iso(entry), "entry_price": f"{close[hour]:.1f}",
            "exit_time": iso(entry + timedelta(hours=12)), "exit_price": f"{close[hour + 12]:.2f}",
            "pnl": str(pnl), "commission": "0.84",
            "strategy": "sma_crossover" if i % 2 == 0 else "rsi_revert",
        })
    return trades


def make_monthly() -> list[dict[str, Any]]:
    """14 months, 2023-11 to 2024-12: 2023-12 loses 2.5 %, 2024-01 gains 1.23 %."""
    rows = []
    for k in range(14):
        year, month = 2023 + (10 + k) // 12, (10 + k) % 12 + 1
        value = 0.01 * math.sin(k + 1)
        rows.append({"year": year, "month": month, "return": value})
    rows[1]["return"] = -0.025
    rows[2]["return"] = 0.0123
    return rows


def make_report(points: int = 3_000, trades: int = 40) -> dict[str, Any]:
    ts = [iso(START + timedelta(hours=h)) for h in range(points)]
    rng = np.random.default_rng(7)
    equity = 10_000 * np.cumprod(1 + rng.normal(0.0001, 0.002, points))
    peak = np.maximum.accumulate(equity)
    close = 42_000 * np.cumprod(1 + rng.normal(0, 0.003, points))
    closes = {"BTC/USDT": close, "ETH/USDT": close / 17}
    return {
        "run": {
            "run_id": 7, "name": "bt-7", "strategy": "sma_crossover", "version": "1.0.0",
            "params": {"fast": 10, "slow": 20}, "symbols": ["BTC/USDT", "ETH/USDT"],
            "timeframe": "1h", "start": ts[0], "end": ts[-1], "cash": "10000",
            "currency": "USDT", "commission": "0.001", "slippage": "bps:5", "spread": "0",
            "allow_short": True, "fingerprint": "9f2c" + "ab" * 30, "bars": points,
            "created_at": "2024-12-31T12:00:00+00:00", "elapsed_seconds": 1.23,
        },
        "assumptions": ["Market orders from a signal on bar t fill at bar t+1's open",
                        "Commission is charged on both legs"],
        "metrics": {
            "final_equity": 10234.5, "total_return": 0.0234, "cagr": 0.9,
            "annual_volatility": 0.3, "sharpe": 1.2, "sortino": 1.5, "calmar": 2.0,
            "max_drawdown": 0.12, "max_drawdown_duration": 273_600.0,
            "average_drawdown": 0.03, "win_rate": 0.45, "profit_factor": 1.3,
            "expectancy": 2.1, "trades": trades, "average_trade_duration": 3600.0,
            "best_trade": 120.0, "worst_trade": -80.0, "exposure_time": 0.5,
            "buy_and_hold_return": 0.05, "start": ts[0], "end": ts[-1], "sqn": None,
        },
        "by_strategy": {
            "sma_crossover": {"trades": 20, "win_rate": 1.0, "total_pnl": 250.0,
                              "profit_factor": None},
            "rsi_revert": {"trades": 20, "win_rate": 0.0, "total_pnl": "-145",
                           "profit_factor": 0.0},
        },
        "by_market": {"crypto": {"trades": 40, "win_rate": 0.5, "total_pnl": 105.0,
                                 "profit_factor": 1.72}},
        "equity": {"ts": ts, "equity": equity.tolist(),
                   "benchmark": (10_000 * close / close[0]).tolist(),
                   "drawdown": (1 - equity / peak).tolist()},
        "monthly_returns": make_monthly(),
        "prices": {s: {"ts": ts, "close": c.tolist()} for s, c in closes.items()},
        "trades": make_trades(trades, closes),
        "open_positions": [{"symbol": "BTC/USDT", "side": "long", "quantity": "0.1",
                            "average_price": "42000", "last_price": "42100",
                            "unrealized_pnl": "10"}],
        "sanity": [],
        "walk_forward": {
            "objective": "sharpe",
            "windows": [{"train_start": ts[0], "train_end": ts[999], "test_start": ts[1000],
                         "test_end": ts[1499], "params": {"fast": 10 + w, "slow": 20},
                         "train_score": 1.2, "test_return": 0.01, "test_sharpe": 0.8}
                        for w in range(3)],
            "stitched": {"ts": ts[1000:], "equity": equity[1000:].tolist()},
            "stability": {"fast": {"values": [10, 12, 10], "mode": 10, "changes": 2},
                          "slow": {"values": [20, 20, 20], "mode": 20, "changes": 0}},
        },
        "montecarlo": [{
            "method": "shuffle", "paths": 1000, "seed": 0, "trades": trades,
            "starting_cash": 10000.0, "ruin_level": 0.5,
            "final_return": {"p5": -0.05, "p25": 0.0, "p50": 0.02, "p75": 0.04, "p95": 0.08,
                             "mean": 0.021},
            "max_drawdown": {"p5": 0.03, "p25": 0.05, "p50": 0.08, "p75": 0.11, "p95": 0.17,
                             "mean": 0.085},
            "probability_of_ruin": 0.01,
        }],
    }


def minimal(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report[k] for k in ("run", "metrics", "equity")}


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return make_report()


@pytest.fixture(scope="module")
def page(report: dict[str, Any]) -> str:
    return rpt.render_html(report)


def section(html: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">.*?</section>', html, re.S)
    assert match, f"no section {anchor}"
    return match.group(0)


def pdf_page_count(data: bytes) -> int:
    return len(re.findall(rb"/Type\s*/Page\b(?!s)", data))


# --------------------------------------------------------------------------- HTML


def test_every_section_is_there_with_charts(page: str) -> None:
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page, title
    # equity, drawdown, two price charts, stitched walk-forward equity
    assert page.count("<svg") == 5
    assert "Sanity check passed" in page


def test_header_names_the_run(page: str) -> None:
    header = page[page.index("<header>"):page.index("</header>")]
    for text in ("sma_crossover 1.0.0", "BTC/USDT, ETH/USDT", "1h", "#7 bt-7",
                 "9f2c" + "ab" * 30, "2023-11-01 00:00 → 2024-03-04 23:00 UTC",
                 "fast=10, slow=20", "ran 1.23s"):
        assert text in header, text


def test_no_external_references_and_no_scripts(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    assert "@import" not in page
    # url() only for matplotlib's clip paths inside the same SVG
    assert all(ref.startswith("#") for ref in re.findall(r"url\(([^)]*)\)", page))
    links = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page, re.I)
    assert links, "the table of contents links to the sections"
    assert all(link.startswith("#") for link in links), links


def test_metrics_are_formatted(page: str) -> None:
    metrics = section(page, "metrics")
    expected = {"Total return": "2.34%", "Max drawdown": "12.00%", "Win rate": "45.00%",
                "Annual volatility": "30.00%", "Exposure time": "50.00%",
                "Final equity": "10,234.50", "Worst trade": "-80.00", "Sharpe": "1.20",
                "Max drawdown duration": "3d 4h", "Average trade duration": "1h",
                "CAGR": "90.00%", "Trades": "40", "Sqn": "—"}
    for name, value in expected.items():
        assert re.search(rf"<td>{re.escape(name)}</td><td class=\"num\">{re.escape(value)}</td>",
                         metrics), (name, value)


@pytest.mark.parametrize(("seconds", "text"), [
    (273_600, "3d 4h"), (86_400, "1d"), (90, "1m 30s"), (3_660, "1h 1m"), (45, "45s"),
    (0.25, "0.25s"), (1.234, "1.23s"), (-7_200, "-2h"),
])
def test_durations_are_human_readable(seconds: float, text: str) -> None:
    assert rpt.fmt_duration(seconds) == text


def test_numbers_as_strings_render_like_floats(report: dict[str, Any]) -> None:
    as_strings = copy.deepcopy(minimal(report))
    as_strings["metrics"] = {k: str(v) if isinstance(v, float) else v
                             for k, v in report["metrics"].items()}
    as_strings["equity"]["equity"] = [str(v) for v in report["equity"]["equity"]]
    floats_page = rpt.render_html(minimal(report))
    strings_page = rpt.render_html(as_strings)
    assert section(strings_page, "metrics") == section(floats_page, "metrics")
    assert section(strings_page, "equity") == section(floats_page, "equity")


def test_breakdown_tables(page: str) -> None:
    by_strategy = section(page, "by-strategy")
    assert "<td>rsi_revert</td>" in by_strategy and "-145.00" in by_strategy
    assert "100.00%" in by_strategy  # win rate 1.0
    assert "<td>crypto</td>" in section(page, "by-market")


def test_monthly_heatmap_cells(page: str) -> None:
    heat = section(page, "monthly")
    jan = re.search(r'<td class="([^"]*)" data-month="2024-01"[^>]*>([^<]*)</td>', heat)
    dec = re.search(r'<td class="([^"]*)" data-month="2023-12"[^>]*>([^<]*)</td>', heat)
    assert jan and dec
    assert jan.group(1).split()[0] == "pos" and jan.group(2) == "1.23%"
    assert dec.group(1).split()[0] == "neg" and dec.group(2) == "-2.50%"
    # years are rows: 2023 has Nov and Dec only, the other months are empty cells
    assert heat.count("<tr><th>2023</th>") == 1 and heat.count("<tr><th>2024</th>") == 1
    assert 'data-month="2023-10"' in heat and 'data-month="2023-11"' in heat
    row_2023 = re.search(r"<tr><th>2023</th>(.*?)</tr>", heat)
    assert row_2023 and row_2023.group(1).count('class="none"') == 10
    # the year total compounds the months
    months = [r["return"] for r in make_monthly() if r["year"] == 2023]
    total = (1 + months[0]) * (1 + months[1]) - 1
    year = re.search(r'data-year="2023"[^>]*>([^<]*)</td>', heat)
    assert year and year.group(1) == f"{total * 100:.2f}%"


def test_prices_have_a_chart_per_symbol_and_the_marker_legend(page: str) -> None:
    prices = section(page, "prices")
    assert "<h3>BTC/USDT</h3>" in prices and "<h3>ETH/USDT</h3>" in prices
    assert prices.count("<svg") == 2
    assert "▲ long entry" in prices and "▼ short entry" in prices


def test_trade_list_of_40_is_complete(report: dict[str, Any], page: str) -> None:
    trades = section(page, "trades")
    assert "40 closed trades" in trades and "in all" not in trades
    assert trades.count("<tr>") == 41  # header + 40
    first = report["trades"][0]
    # prices and quantities exactly as the engine wrote them (Decimal strings)
    assert f'<td class="num">{first["entry_price"]}</td>' in trades
    assert "2023-11-01 00:00" in trades and "2023-11-01 12:00" in trades
    assert '<span class="pos">12.50</span>' in trades and '<span class="neg">-7.25</span>' in trades


def test_trade_list_is_capped_with_a_note(report: dict[str, Any]) -> None:
    big = minimal(report) | {"trades": make_trades(1_200)}
    trades = section(rpt.render_html(big), "trades")
    assert "1,200 trades in all" in trades
    assert "The full list is in the JSON / the database" in trades
    assert "200 trades not shown" in trades
    assert trades.count("<tr>") == 1 + 1_000  # header + first 500 + last 500
    assert 'class="gap"' in trades


def test_no_closed_trades(report: dict[str, Any]) -> None:
    no_trades: tuple[list[Any] | None, ...] = ([], None)
    for trades in no_trades:
        page = rpt.render_html(minimal(report) | {"trades": trades})
        assert "no closed trades" in section(page, "trades")


def test_missing_sections_are_left_out(report: dict[str, Any]) -> None:
    page = rpt.render_html(minimal(report))
    for anchor in ("by-strategy", "by-market", "monthly", "prices", "positions",
                   "walk-forward", "montecarlo", "assumptions", "sanity"):
        assert f'id="{anchor}"' not in page, anchor
    for anchor in ("metrics", "equity", "drawdown", "trades"):
        assert f'id="{anchor}"' in page, anchor
    empty = minimal(report) | {"by_strategy": {}, "monthly_returns": [], "prices": {},
                               "walk_forward": None, "montecarlo": [], "open_positions": []}
    assert rpt.render_html(empty) == page


def test_benchmark_is_optional(report: dict[str, Any]) -> None:
    no_bench = copy.deepcopy(minimal(report))
    no_bench["equity"]["benchmark"] = None
    del no_bench["equity"]["drawdown"]  # then it is computed from the equity
    page = rpt.render_html(no_bench)
    assert "<h2>Equity</h2>" in page and "buy-and-hold</h2>" not in page
    assert 'id="drawdown"' in page


def test_sanity_warnings_are_listed(report: dict[str, Any]) -> None:
    page = rpt.render_html(minimal(report) | {"sanity": ["no trades in March", "equity < 0"]})
    sanity = section(page, "sanity")
    assert "2 warning(s)" in sanity and "passed" not in sanity
    assert "<li>equity &lt; 0</li>" in sanity


def test_walk_forward_and_monte_carlo(page: str) -> None:
    wf = section(page, "walk-forward")
    assert "objective: sharpe" in wf and "fast=12, slow=20" in wf
    assert "<td>10, 12, 10</td>" in wf and wf.count("<svg") == 1
    mc = section(page, "montecarlo")
    assert "Method: shuffle" in mc and "1,000 paths" in mc
    assert "ruined when its equity touches 50.00% of the starting cash" in mc
    assert "Probability of ruin: <strong>1.00%</strong>" in mc
    assert "-5.00%" in mc and "17.00%" in mc


def hostile_report(report: dict[str, Any]) -> dict[str, Any]:
    bad = copy.deepcopy(report)
    bad["run"]["params"] = {"fast": HOSTILE_SCRIPT, HOSTILE_IMG: 1}
    bad["run"]["symbols"] = [HOSTILE_IMG]
    bad["run"]["strategy"] = HOSTILE_SCRIPT
    bad["run"]["fingerprint"] = HOSTILE_IMG
    bad["by_strategy"] = {HOSTILE_SCRIPT: {"trades": 1, HOSTILE_IMG: HOSTILE_SCRIPT}}
    bad["prices"] = {HOSTILE_IMG: bad["prices"]["BTC/USDT"]}
    bad["trades"] = [t | {"symbol": HOSTILE_IMG, "strategy": HOSTILE_SCRIPT}
                     for t in bad["trades"]]
    bad["sanity"] = [HOSTILE_SCRIPT]
    bad["assumptions"] = [HOSTILE_IMG]
    bad["walk_forward"]["objective"] = HOSTILE_SCRIPT
    bad["walk_forward"]["stability"] = {HOSTILE_IMG: {"values": [HOSTILE_SCRIPT]}}
    bad["montecarlo"][0]["method"] = HOSTILE_IMG
    bad["metrics"]["note"] = HOSTILE_SCRIPT
    return bad


def test_data_text_is_escaped(report: dict[str, Any]) -> None:
    page = rpt.render_html(hostile_report(report))
    assert HOSTILE_SCRIPT not in page and HOSTILE_IMG not in page
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    # the price chart of the hostile symbol is still drawn, with its markers
    assert section(page, "prices").count("<svg") == 1
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        assert "alert" not in svg


def test_html_is_deterministic_and_leaves_matplotlib_settings_alone(
        report: dict[str, Any], page: str) -> None:
    before = dict(matplotlib.rcParams)
    assert rpt.render_html(report) == page
    assert dict(matplotlib.rcParams) == before


def test_a_long_series_is_drawn_decimated(report: dict[str, Any]) -> None:
    n = 200_000
    ts = [iso(START + timedelta(minutes=m)) for m in range(n)]
    equity = np.full(n, 10_000.0)
    equity[123_457] = 5_000.0  # one spike down that must stay visible
    big = minimal(report) | {"equity": {"ts": ts, "equity": equity.tolist(), "benchmark": None}}
    page = rpt.render_html(big)
    assert "200,000 points, drawn as at most 2,000" in page
    assert len(page.encode()) < 1_000_000


# --------------------------------------------------------------------------- decimation



def test_a_drawdown_without_a_stored_series_starts_from_the_cash() -> None:
    # as metrics.py measures it: the peak starts at the starting cash, so a loss from the
    # very first point is a drawdown (a walk-forward's stitched curve has no stored series)
    equity = {"equity": [9000, 9500, 8800, 9900]}
    assert rpt._drawdown_values(equity, "10000") == pytest.approx([0.1, 0.05, 0.12, 0.01])
    assert rpt._drawdown_values(equity) == pytest.approx([0, 0, 700 / 9500, 0])


def test_a_shuffle_says_its_paths_end_alike() -> None:
    base = {"paths": 100, "seed": 1, "trades": 5, "starting_cash": 10000, "ruin_level": 0.5}
    assert "every path ends at the same return" in rpt._mc_summary({**base, "method": "shuffle"})
    assert "same return" not in rpt._mc_summary({**base, "method": "bootstrap"})

def test_decimate_keeps_global_extremes_of_a_spiky_series() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(0, 1, 1_000_000)
    y[123_457], y[987_001] = -50.0, 60.0
    idx = rpt.decimate(y, 2_000)
    assert len(idx) <= 2_000
    assert 123_457 in idx and 987_001 in idx
    assert idx[0] == 0 and idx[-1] == len(y) - 1
    assert np.all(np.diff(idx) > 0)
    assert y[idx].min() == y.min() and y[idx].max() == y.max()


def test_decimate_short_series_and_nans() -> None:
    assert rpt.decimate([3.0, 1.0, 2.0]).tolist() == [0, 1, 2]
    y = np.sin(np.linspace(0, 50, 10_000))
    y[:3_000] = np.nan
    y[5_000] = 9.0
    idx = rpt.decimate(y, 100)
    assert 5_000 in idx and len(idx) <= 100
    with pytest.raises(ValueError, match="at least 4"):
        rpt.decimate(y, 3)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("key", ["run", "metrics", "equity"])
def test_missing_required_key(report: dict[str, Any], key: str, tmp_path: Path) -> None:
    broken = {k: v for k, v in minimal(report).items() if k != key}
    with pytest.raises(ValueError, match=f"missing required key '{key}'"):
        rpt.render_html(broken)
    with pytest.raises(ValueError, match=key):
        rpt.write_pdf(broken, tmp_path / "r.pdf")
    with pytest.raises(ValueError, match=key):
        rpt.write_html(broken, tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_required_key_of_the_wrong_type(report: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="'equity' must be an object"):
        rpt.render_html(minimal(report) | {"equity": [1, 2, 3]})


@pytest.mark.parametrize("writer", [rpt.write_html, rpt.write_pdf])
def test_folder_must_exist(report: dict[str, Any], tmp_path: Path,
                           writer: Callable[[Any, Any], Path]) -> None:
    target = tmp_path / "no-such-folder" / "report.out"
    with pytest.raises(ValueError, match="does not exist") as info:
        writer(minimal(report), target)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="is a folder"):
        writer(minimal(report), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- files


def test_write_html(report: dict[str, Any], page: str, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    assert rpt.write_html(report, str(target)) == target
    assert target.read_text(encoding="utf-8") == page
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_write_pdf_pages(report: dict[str, Any], tmp_path: Path) -> None:
    full, small = tmp_path / "full.pdf", tmp_path / "small.pdf"
    rpt.write_pdf(report, full)
    rpt.write_pdf(minimal(report), small)
    data = full.read_bytes()
    assert data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")
    # summary, breakdown/notes, equity+drawdown, monthly, 2 prices, walk-forward, Monte Carlo
    assert pdf_page_count(data) == 8 == len(rpt.pdf_pages(report))
    assert pdf_page_count(small.read_bytes()) == 2  # summary, equity+drawdown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pdf", "small.pdf"]


def test_pdf_is_deterministic(report: dict[str, Any], tmp_path: Path) -> None:
    rpt.write_pdf(report, tmp_path / "a.pdf")
    rpt.write_pdf(report, tmp_path / "b.pdf")
    assert (tmp_path / "a.pdf").read_bytes() == (tmp_path / "b.pdf").read_bytes()
    assert b"CreationDate" not in (tmp_path / "a.pdf").read_bytes()


def test_pdf_takes_hostile_and_mathtext_text(report: dict[str, Any], tmp_path: Path) -> None:
    bad = hostile_report(report)
    bad["run"]["strategy"] = r"$\undefinedmacro{$ and $x$"  # would crash mathtext
    bad["by_market"] = {"$\\frac{$": {"trades": 1}}
    target = rpt.write_pdf(bad, tmp_path / "bad.pdf")
    assert pdf_page_count(target.read_bytes()) == 7  # the hostile report has one symbol


def test_failed_pdf_leaves_the_old_file_and_no_temp_file(
        report: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.pdf"
    target.write_bytes(b"old report")

    def boom(*args: Any) -> Any:
        raise RuntimeError("rendering failed half-way")

    # the price pages come after the first pages are already written to the temp file
    monkeypatch.setattr(rpt, "_pdf_price", boom)
    with pytest.raises(RuntimeError, match="half-way"):
        rpt.write_pdf(report, target)
    assert target.read_bytes() == b"old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.pdf"]


def test_failed_write_removes_its_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "report.html"

    def half(fh: IO[bytes]) -> None:
        fh.write(b"<html>half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rpt.atomic_write(target, half)
    assert list(tmp_path.iterdir()) == []


def test_a_symbolic_link_is_followed_and_a_pipe_or_device_written_in_place(
        tmp_path: Path) -> None:
    """A rename over the target replaced a symbolic link with a file (the file it named
    unchanged) and a device or a named pipe with a file: --json /dev/full said 'written'
    and /dev/full became a JSON file."""
    def write(fh: IO[bytes]) -> None:
        fh.write(b'{"ok": 1}')

    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    rpt.atomic_write(link, write)
    assert link.is_symlink() and real.read_bytes() == b'{"ok": 1}'

    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(pipe.read_bytes()))
    reader.start()
    rpt.atomic_write(pipe, write)
    reader.join(5)
    assert got == [b'{"ok": 1}'] and stat.S_ISFIFO(pipe.stat().st_mode)

    # (a device takes the same path as the pipe: not tried here, a regression would
    # replace the machine's device with a file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "pipe.json", "real.json"]
