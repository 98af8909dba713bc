"""Walk-forward optimisation: windows, candidates, and whole walk-forwards against the
real database (every candidate and every test window is a real backtest run)."""

from __future__ import annotations

import itertools
import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from api.cli_walkforward import walk_forward_command
from db.errors import MmatsError
from strategies.examples.sma_crossover import SmaCrossover
from workers.backtest import walkforward as wf
from workers.backtest.config import BacktestConfig, BacktestError
from workers.backtest.walkforward import (
    Event,
    generate_candidates,
    load_walk_forward,
    parse_param_range,
    parse_param_ranges,
    run_walk_forward,
    search_grid,
    stability,
    windows,
)
from workers.ingest.importer import import_file
from workers.ingest.synthetic import generate, write

SYMBOL = "BTC/USDT"
START = datetime(2024, 1, 1, tzinfo=UTC)
END = datetime(2024, 4, 15, tzinfo=UTC)  # 3 monthly windows at share 0.5: Feb, Mar, Apr 1-15
GRID = {"fast": [5, 10], "slow": [20, 40]}


def utc(year: int, month: int, day: int, hour: int = 0) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


# --------------------------------------------------------------------------- windows
def _is_boundary(ts: datetime, months: int) -> bool:
    return (ts.day, ts.hour, ts.minute, ts.second, ts.microsecond) == (1, 0, 0, 0, 0) and (
        (ts.month - 1) % months == 0)


def _next_boundary(ts: datetime, months: int) -> datetime:
    index = ts.year * 12 + ts.month - 1 + months
    return utc(index // 12, index % 12 + 1, 1)


@settings(max_examples=300, deadline=None)
# the first training span may fit exactly: Apr 2000 x 3 = 90 days back to the start, Jan 2
@example(start=datetime(2000, 1, 2, tzinfo=UTC), days=120.0, share=0.75, step="monthly",
         anchored=False)
@given(start=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2030, 1, 1),
                          timezones=st.just(UTC)),
       days=st.floats(min_value=1, max_value=2000),
       share=st.floats(min_value=0.05, max_value=0.95),
       step=st.sampled_from(["monthly", "quarterly"]), anchored=st.booleans())
def test_windows_never_train_on_test_data(start: datetime, days: float, share: float,
                                          step: str, anchored: bool) -> None:
    end = start + timedelta(days=days)
    months = wf.STEPS[step]
    try:
        plan = windows(start, end, train_share=share, step=step, anchored=anchored)
    except BacktestError as exc:
        message = str(exc)
        assert "\n" not in message and "too short" in message and "--to must be at least" in message
        bound = datetime.fromisoformat(message.split("at least ")[1].split(" (")[0])
        bound = bound.replace(tzinfo=UTC)
        assert bound > end
        assert windows(start, bound, train_share=share, step=step, anchored=anchored)
        return
    assert plan and [w.number for w in plan] == list(range(1, len(plan) + 1))
    ratio = share / (1 - share)
    for k, w in enumerate(plan):
        assert w.train_end == w.test_start  # training ends where testing begins
        assert start <= w.train_start < w.train_end <= w.test_start < w.test_end <= end
        assert _is_boundary(w.test_start, months)
        if k + 1 < len(plan):  # a full calendar step, then the next one starts
            assert w.test_end == _next_boundary(w.test_start, months)
            assert w.test_end == plan[k + 1].test_start
        if anchored:
            assert w.train_start == start
        elif w.train_start > start:  # train / (train + test) = share (within a second)
            assert abs(w.train.total_seconds() - ratio * w.test.total_seconds()) <= 1
        else:  # a span that would reach before the data starts at the data (shorter)
            assert w.train.total_seconds() <= ratio * w.test.total_seconds() + 1
            # never the first window, which is chosen to fit (it may fit exactly, from start)
            assert k > 0 or abs(w.train.total_seconds() - ratio * w.test.total_seconds()) <= 1
    assert plan[-1].test_end == end  # the test windows tile the rest of the period
    # test windows are disjoint and ordered (with exact ratios a 31-day month after a
    # 28-day one may train from a little earlier than the window before: no leak either)
    for a, b in itertools.pairwise(plan):
        assert a.test_end <= b.test_start and a.test_start < b.test_start
    # the first test window is the earliest one whose training span fits after start
    earlier = _next_boundary(plan[0].test_start, -months)
    if earlier > start:
        test = min(_next_boundary(earlier, months), end) - earlier
        assert earlier - timedelta(seconds=round(test.total_seconds() * ratio)) < start


def test_windows_examples() -> None:
    plan = windows(START, utc(2024, 6, 15))  # 70/30: a month of test after ~2.33 months
    assert [(w.train_start, w.test_start, w.test_end) for w in plan] == [
        (utc(2024, 1, 22), utc(2024, 4, 1), utc(2024, 5, 1)),
        (utc(2024, 2, 18, 16), utc(2024, 5, 1), utc(2024, 6, 1)),
        (utc(2024, 4, 29, 8), utc(2024, 6, 1), utc(2024, 6, 15))]  # clipped at the end
    quarterly = windows(utc(2023, 1, 1), utc(2025, 1, 1), step="quarterly", anchored=True)
    assert [w.test_start.month for w in quarterly] == [10, 1, 4, 7, 10]
    assert {w.train_start for w in quarterly} == {utc(2023, 1, 1)}
    assert windows(START, END, train_share=0.5)[0].train_start == utc(2024, 1, 3)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"train_share": 0}, "--train-share must be a fraction between 0 and 1"),
    ({"train_share": 1}, "--train-share must be a fraction between 0 and 1"),
    ({"train_share": 1.5}, "--train-share must be a fraction between 0 and 1"),
    ({"train_share": math.nan}, "--train-share must be a fraction between 0 and 1"),
    ({"step": "weekly"}, "--step 'weekly': expected one of monthly, quarterly"),
    ({"end": START}, "must be after --from"),
    ({"end": utc(2024, 3, 1)}, "too short for one monthly walk-forward window at train share "
                               "0.7: the first test month would be 2024-04-01 to 2024-05-01"),
    ({"start": datetime(2024, 1, 1)}, "start must be timezone-aware"),
])
def test_windows_refuses_bad_input(kwargs: dict[str, Any], fragment: str) -> None:
    args = {"start": START, "end": utc(2025, 1, 1), **kwargs}
    with pytest.raises(ValueError) as err:
        windows(args.pop("start"), args.pop("end"), **args)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- candidates
@pytest.mark.parametrize("text,expected", [
    ("fast=5:20:5", ("fast", [5, 10, 15, 20])),
    ("fast=5:22:5", ("fast", [5, 10, 15, 20])),
    ("size=0.1:0.3:0.1", ("size", [0.1, 0.2, 0.3])),
    ("slow=20,30,50", ("slow", [20, 30, 50])),
    (" slow = 30 ", ("slow", [30])),
    ("allow_short=true,false,true", ("allow_short", [True, False])),
    ("size=*", ("size", "*")),
])
def test_parse_param_range(text: str, expected: tuple[str, Any]) -> None:
    assert parse_param_range(text) == expected


@pytest.mark.parametrize("text,fragment", [
    ("fast", "expected name=low:high:step or name=v1,v2,..."),
    ("fast=", "expected name=low:high:step"),
    ("=5", "expected name=low:high:step"),
    ("2fast=5", "'2fast' is not a parameter name"),
    ("fast=5:20", "a range is low:high:step"),
    ("fast=a:b:1", "'a' is not a number"),
    ("fast=20:5:1", "low 20 is above high 5"),
    ("fast=1:5:0", "the step must be positive"),
    ("fast=0:1e9:1", "more than 10,000"),
    ("fast=1,,2", "an empty value in the list"),
    ("fast=1,nan", "is not a finite number"),
    ("fast=NaN:5:1", "--param 'fast=NaN:5:1': 'NaN' is not a finite number"),
    ("fast=1:inf:1", "--param 'fast=1:inf:1': 'inf' is not a finite number"),
])
def test_parse_param_range_refuses(text: str, fragment: str) -> None:
    with pytest.raises(BacktestError) as err:
        parse_param_range(text)
    message = str(err.value)
    assert message.startswith("--param ") and fragment in message and "\n" not in message


def test_parse_param_ranges_once_each() -> None:
    assert parse_param_ranges(["fast=5:10:5", "slow=20"]) == {"fast": [5, 10], "slow": [20]}
    with pytest.raises(BacktestError, match="--param fast given twice"):
        parse_param_ranges(["fast=5", "fast=6"])


def test_search_grid() -> None:
    grid = search_grid(SmaCrossover, {"fast": [5, 10, 20], "slow": [10, 20]})
    # ranges given: the other parameters keep their defaults
    assert grid == {"fast": [5, 10, 20], "slow": [10, 20], "allow_short": [False], "size": [1.0]}
    own = search_grid(SmaCrossover)
    assert own == {k: list(v) for k, v in SmaCrossover.search_space().items()}
    assert search_grid(SmaCrossover, {"size": "*"})["size"] == own["size"]
    assert search_grid(SmaCrossover, {"size": [1]})["size"] == [1.0]  # coerced like the spec
    assert search_grid(SmaCrossover, None, {"fast": 7})["fast"] == [7]  # fixed by the config
    with pytest.raises(BacktestError, match=r"--param speed: sma_crossover has no parameter "
                                            r"speed \(known: fast, slow, allow_short, size\)"):
        search_grid(SmaCrossover, {"speed": [1]})
    with pytest.raises(BacktestError, match="--param fast: parameter fast must be >= 1, got 0"):
        search_grid(SmaCrossover, {"fast": [0, 5]})
    with pytest.raises(BacktestError, match="parameter allow_short must be bool"):
        search_grid(SmaCrossover, {"allow_short": [1]})


def test_grid_skips_and_counts_refused_combinations() -> None:
    grid = search_grid(SmaCrossover, {"fast": [5, 10, 20], "slow": [10, 20]})
    cands = generate_candidates(SmaCrossover, grid)
    assert [(c["fast"], c["slow"]) for c in cands.candidates] == [(5, 10), (5, 20), (10, 20)]
    assert (cands.grid_size, cands.refused, cands.sampled) == (6, 3, False)
    assert "fast (10) must be below slow (10)" in str(cands.first_refusal)
    assert all(c["allow_short"] is False and c["size"] == 1.0 for c in cands.candidates)
    with pytest.raises(BacktestError, match="refused every one of the 1 parameter combinations"):
        generate_candidates(SmaCrossover, search_grid(SmaCrossover, {"fast": [30], "slow": [20]}))


def test_grid_larger_than_the_cap_is_sampled_with_a_note() -> None:
    grid = search_grid(SmaCrossover, {"fast": "*", "slow": "*"})  # 50 x 60 values
    cands = generate_candidates(SmaCrossover, grid, max_candidates=20, seed=3)
    assert len(cands.candidates) == 20 and cands.sampled
    assert cands.notes == [f"the grid has {3000 - cands.refused:,} valid combinations, more "
                           "than --max-candidates 20: trying a random sample of 20 (seed 3)"]
    pairs = [(int(c["fast"]), int(c["slow"])) for c in cands.candidates]
    assert len(set(pairs)) == 20 and all(f < s for f, s in pairs)
    assert pairs == sorted(pairs)  # kept in grid order
    again = generate_candidates(SmaCrossover, grid, max_candidates=20, seed=3)
    assert again.candidates == cands.candidates  # seeded
    other = generate_candidates(SmaCrossover, grid, max_candidates=20, seed=4)
    assert other.candidates != cands.candidates


def test_random_method_samples_without_replacement() -> None:
    grid = search_grid(SmaCrossover, {"fast": [5, 10, 15, 20, 25, 30], "slow": [10, 20, 30, 40]})
    every = generate_candidates(SmaCrossover, grid).candidates
    a = generate_candidates(SmaCrossover, grid, method="random", samples=6, seed=1)
    assert len(a.candidates) == 6 and a.sampled and a.notes == []
    assert all(c in every for c in a.candidates)
    assert len({tuple(c.items()) for c in a.candidates}) == 6
    assert generate_candidates(SmaCrossover, grid, method="random", samples=6,
                               seed=1).candidates == a.candidates
    capped = generate_candidates(SmaCrossover, grid, method="random", samples=10,
                                 max_candidates=4)
    assert len(capped.candidates) == 4
    assert capped.notes[0] == "--samples 10 is more than --max-candidates 4: trying 4"
    few = generate_candidates(SmaCrossover, grid, method="random", samples=99, max_candidates=99)
    assert few.candidates == every and "only 15 valid combinations" in few.notes[0]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"method": "annealing"}, "--method 'annealing'"),
        ({"max_candidates": 0}, "--max-candidates must be at least 1"),
        ({"samples": 3}, "--samples applies to --method random only"),
        ({"method": "random", "samples": 0}, "--samples must be at least")]
    for kwargs, fragment in bad:
        with pytest.raises(BacktestError, match=fragment):
            generate_candidates(SmaCrossover, grid, **kwargs)


def test_huge_grid_is_sampled_without_enumerating(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wf, "ENUMERATE_LIMIT", 100)
    grid = search_grid(SmaCrossover)  # 60,000 combinations
    cands = generate_candidates(SmaCrossover, grid, max_candidates=30, seed=5)
    assert len(cands.candidates) == 30 and cands.sampled
    assert "60,000 combinations, too many to try" in cands.notes[0]
    assert len({tuple(c.items()) for c in cands.candidates}) == 30
    assert all(int(c["fast"]) < int(c["slow"]) for c in cands.candidates)
    assert (cands.refused > 0) == (cands.first_refusal is not None)


def test_stability_and_objectives() -> None:
    s = stability([{"fast": 10, "slow": 20}, {"fast": 12, "slow": 20}, {"fast": 10, "slow": 20}])
    assert s == {"fast": {"values": [10, 12, 10], "mode": 10, "changes": 2},
                 "slow": {"values": [20, 20, 20], "mode": 20, "changes": 0}}
    assert stability([{"a": 1}, {"a": 2}])["a"]["mode"] == 1  # first among equals
    assert {"sharpe", "total_return", "calmar", "sortino", "profit_factor",
            "max_drawdown", "win_rate", "final_equity"} <= wf.objectives()
    assert "start" not in wf.objectives()
    with pytest.raises(BacktestError, match="--objective 'luck': expected a run metric"):
        wf.check_objective("luck")


# --------------------------------------------------------------------------- database
@pytest.fixture
def bars(conn: psycopg.Connection, tmp_path: Path) -> psycopg.Connection:
    """2,600 SYNTHETIC 1h bars of BTC/USDT from 2024-01-01 (until about 2024-04-18)."""
    data = generate(SYMBOL, "crypto", timeframe="1h", start="2024-01-01", bars=2600, seed=11)
    import_file(conn, write(data, tmp_path / "btc.csv"), symbol=SYMBOL, market="crypto",
                timeframe="1h")
    return conn


def config(**kwargs: Any) -> BacktestConfig:
    return BacktestConfig(**{"strategy": "sma_crossover", "symbols": (SYMBOL,),
                             "timeframe": "1h", "start": START, "end": END,
                             "commission": Decimal("0.001"), **kwargs})


def test_walk_forward_end_to_end(bars: psycopg.Connection) -> None:
    conn = bars
    events: list[Event] = []
    wf_id = run_walk_forward(conn, config(), train_share=0.5, param_ranges=GRID,
                             progress=events.append)
    status, objective, result = conn.execute(
        "SELECT status::text, objective, result::text FROM backtest.walk_forwards "
        "WHERE walk_forward_id = %s", (wf_id,)).fetchone()  # type: ignore[misc]
    assert (status, objective) == ("finished", "sharpe")
    res = json.loads(result)
    assert set(res) >= {"objective", "windows", "stitched", "stability"}
    assert [e.kind for e in events].count("window") == 3
    assert [e.kind for e in events].count("train") == 12

    runs = conn.execute(
        "SELECT run_id, label, params::text, start_ts, end_ts, starting_cash, status::text "
        "FROM backtest.runs WHERE walk_forward_id = %s ORDER BY run_id", (wf_id,)).fetchall()
    assert len(runs) == 3 * 4 + 3 and {r[6] for r in runs} == {"finished"}
    rows = conn.execute(
        "SELECT window_no, train_start, train_end, test_start, test_end, params::text, "
        "train_score, candidates, test_run_id FROM backtest.walk_forward_windows "
        "WHERE walk_forward_id = %s ORDER BY window_no", (wf_id,)).fetchall()
    plan = windows(START, END, train_share=0.5)
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        (w.train_start, w.train_end, w.test_start, w.test_end) for w in plan]
    assert [r[4] for r in rows] == [utc(2024, 3, 1), utc(2024, 4, 1), END]

    previous_final: Decimal | None = None
    for n, (no, tr_s, tr_e, te_s, te_e, params, score, cands, test_run) in enumerate(rows, 1):
        assert no == n and cands == 4
        train = [r for r in runs if r[1] == f"wf{wf_id} w{n} train"]
        assert len(train) == 4 and {(r[3], r[4]) for r in train} == {(tr_s, tr_e)}
        assert sorted((json.loads(r[2])["fast"], json.loads(r[2])["slow"]) for r in train) == [
            (5, 20), (5, 40), (10, 20), (10, 40)]
        # the chosen params are the argmax of the objective among this window's training
        # runs, read from backtest.metrics (a missing value counts as -inf; ties: first run)
        best = conn.execute(
            "SELECT r.run_id, r.params::text, m.value FROM backtest.runs r "
            "LEFT JOIN backtest.metrics m ON m.run_id = r.run_id AND m.scope = 'run' "
            "AND m.metric = 'sharpe' WHERE r.run_id = ANY(%s) "
            "ORDER BY m.value DESC NULLS LAST, r.run_id LIMIT 1",
            ([r[0] for r in train],)).fetchone()
        assert best is not None
        assert json.loads(params) == json.loads(best[1])
        assert score == (None if best[2] is None else pytest.approx(float(best[2])))
        test = next(r for r in runs if r[0] == test_run)
        assert test[1] == f"wf{wf_id} w{n} test" and (test[3], test[4]) == (te_s, te_e)
        assert json.loads(test[2]) == json.loads(params)
        assert tr_e <= te_s  # nothing of the test window was seen in training
        # each test run starts with the cash the previous one ended with (exactly)
        assert test[5] == (Decimal(10000) if previous_final is None else previous_final)
        previous_final = conn.execute(
            "SELECT e.equity FROM backtest.runs r, trading.account_equity(r.account_id) e "
            "WHERE r.run_id = %s", (test_run,)).fetchone()[0]  # type: ignore[index]

    # the stitched curve starts at the cash, is continuous across windows, ends at the end
    stitched = res["stitched"]
    assert stitched["ts"][0] == plan[0].test_start.isoformat()
    assert stitched["equity"][0] == 10000
    ts = [datetime.fromisoformat(t) for t in stitched["ts"]]
    assert ts == sorted(set(ts)) and ts[-1] <= END
    assert stitched["equity"][-1] == pytest.approx(float(previous_final))  # type: ignore[arg-type]
    m = stitched["metrics"]
    assert m["total_return"] == pytest.approx(float(previous_final) / 10000 - 1)  # type: ignore[arg-type]
    assert m["windows"] == 3 and m["max_drawdown"] >= 0 and "sharpe" in m
    test_trades = conn.execute(
        "SELECT count(*) FROM backtest.trades WHERE run_id = ANY(%s)",
        ([r[8] for r in rows],)).fetchone()[0]  # type: ignore[index]
    assert m["trades"] == test_trades
    # the test runs' fees, also of positions they left open
    run_fees = conn.execute(
        "SELECT sum(value) FROM backtest.metrics WHERE scope = 'run' AND metric = "
        "'total_commission' AND run_id = ANY(%s)", ([r[8] for r in rows],)).fetchone()[0]  # type: ignore[index]
    assert m["total_commission"] == pytest.approx(float(run_fees)) and run_fees > 0
    for a, b in itertools.pairwise(rows):  # the last point of one test run is the
        last = conn.execute("SELECT equity FROM backtest.equity WHERE run_id = %s "  # next's cash
                            "ORDER BY ts DESC LIMIT 1", (a[8],)).fetchone()[0]  # type: ignore[index]
        first = conn.execute("SELECT equity FROM backtest.equity WHERE run_id = %s "
                             "ORDER BY ts LIMIT 1", (b[8],)).fetchone()[0]  # type: ignore[index]
        assert float(first) == pytest.approx(float(last))

    assert [w["params"] for w in res["windows"]] == [json.loads(r[5]) for r in rows]
    assert [w["test_run_id"] for w in res["windows"]] == [r[8] for r in rows]
    assert res["stability"]["fast"]["values"] == [json.loads(r[5])["fast"] for r in rows]
    assert res["stability"]["allow_short"] == {"values": [False] * 3, "mode": False,
                                               "changes": 0}
    ret = conn.execute("SELECT value FROM backtest.metrics WHERE run_id = %s AND scope = 'run' "
                       "AND metric = 'total_return'", (rows[0][8],)).fetchone()
    assert res["windows"][0]["test_return"] == pytest.approx(float(ret[0]))  # type: ignore[index]
    loaded = load_walk_forward(conn, wf_id)
    assert loaded["status"] == "finished"
    assert [list(w["params"]) for w in loaded["windows"]] == [
        ["fast", "slow", "allow_short", "size"]] * 3  # the strategy's order, not jsonb's
    assert [w["test_run_id"] for w in loaded["windows"]] == [r[8] for r in rows]
    assert list(loaded["stability"]) == ["fast", "slow", "allow_short", "size"]
    assert loaded["settings"]["grid"]["fast"] == [5, 10]
    with pytest.raises(LookupError, match="unknown walk-forward 999"):
        load_walk_forward(conn, 999)


def test_a_drawdown_objective_picks_the_least_drawdown(bars: psycopg.Connection) -> None:
    conn = bars
    assert "max_drawdown" in wf.MINIMISED and "sharpe" not in wf.MINIMISED
    wf_id = run_walk_forward(conn, config(), train_share=0.5, param_ranges=GRID,
                             objective="max_drawdown")
    rows = conn.execute(
        "SELECT window_no, params::text, train_score FROM backtest.walk_forward_windows "
        "WHERE walk_forward_id = %s ORDER BY window_no", (wf_id,)).fetchall()
    assert len(rows) == 3
    spread = 0
    for no, params, score in rows:
        train = conn.execute(
            "SELECT r.params::text, m.value FROM backtest.runs r JOIN backtest.metrics m "
            "ON m.run_id = r.run_id AND m.scope = 'run' AND m.metric = 'max_drawdown' "
            "WHERE r.walk_forward_id = %s AND r.label = %s ORDER BY m.value, r.run_id",
            (wf_id, f"wf{wf_id} w{no} train")).fetchall()
        assert len(train) == 4
        # the least drawdown of the window's training runs (ties: the first run)
        assert json.loads(params) == json.loads(train[0][0])
        assert score == pytest.approx(float(train[0][1]))
        spread += train[0][1] != train[-1][1]
    assert spread > 0  # the candidates' drawdowns differ, so the choice was a real one



def test_the_walk_forward_report_carries_its_test_runs_sanity_notes(
        bars: psycopg.Connection) -> None:
    """The report of a walk-forward lists each test window's sanity warnings (it said
    "passed" whatever its runs' checks had found)."""
    from workers.backtest.results import walk_forward_report

    conn = bars
    wf_id = run_walk_forward(conn, config(), train_share=0.5, param_ranges={"fast": [5],
                                                                             "slow": [20]})
    tests = conn.execute("SELECT window_no, test_run_id FROM backtest.walk_forward_windows"
                         " WHERE walk_forward_id = %s ORDER BY window_no", (wf_id,)).fetchall()
    assert walk_forward_report(conn, wf_id)["sanity"] == []
    no, run = tests[1]
    conn.execute("UPDATE backtest.runs SET notes = jsonb_set(notes, '{sanity}', %s)"
                 " WHERE run_id = %s", (Jsonb(["equity below zero at 2024-03-05"]), run))
    assert walk_forward_report(conn, wf_id)["sanity"] == [
        f"window {no}: equity below zero at 2024-03-05"]

def test_a_failure_marks_the_walk_forward_failed(bars: psycopg.Connection) -> None:
    class Stop(Exception):
        pass

    seen: list[dict[str, Any]] = []

    def progress(event: Event) -> None:
        if event.kind == "train" and event.window is not None and event.window.number == 2:
            # while it runs, what is recorded so far can be read back
            (wf_id,) = bars.execute("SELECT max(walk_forward_id) FROM backtest.walk_forwards"
                                    ).fetchone()  # type: ignore[misc]
            seen.append(load_walk_forward(bars, wf_id))
            raise Stop("stopped by the test")

    with pytest.raises(Stop):
        run_walk_forward(bars, config(), train_share=0.5,
                         param_ranges={"fast": [5], "slow": [20]}, progress=progress)
    running = seen[0]
    assert running["status"] == "running" and running["stitched"] is None
    assert [w["window"] for w in running["windows"]] == [1]
    assert list(running["windows"][0]["params"]) == ["fast", "slow", "allow_short", "size"]
    assert running["stability"]["fast"] == {"values": [5], "mode": 5, "changes": 0}
    wf_id, status, result = bars.execute(
        "SELECT walk_forward_id, status::text, result::text FROM backtest.walk_forwards"
    ).fetchone()  # type: ignore[misc]
    assert status == "failed"
    assert json.loads(result)["error"] == "Stop: stopped by the test"
    failed = load_walk_forward(bars, wf_id)
    assert failed["status"] == "failed" and failed["finished_at"] is not None
    assert [w["test_run_id"] for w in failed["windows"]] == [
        w["test_run_id"] for w in running["windows"]]
    # the training run that was under way when it stopped finished normally; the
    # interrupted walk-forward's window 2 has no row
    assert bars.execute("SELECT count(*) FROM backtest.walk_forward_windows").fetchone() == (1,)


def test_bad_input_writes_nothing(bars: psycopg.Connection, db_url: str) -> None:
    conn = bars
    cases: list[tuple[dict[str, Any], str]] = [
        ({"objective": "luck"}, "--objective 'luck'"),
        ({"param_ranges": {"fast": [30], "slow": [20]}}, "refused every one"),
        ({"param_ranges": {"speed": [1]}}, "has no parameter speed"),
        ({"train_share": 1.0}, "--train-share"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(BacktestError, match=fragment):
            run_walk_forward(conn, config(), **{"train_share": 0.5, **kwargs})
    with pytest.raises(BacktestError, match="no 1h bars of BTC/USDT in the first test window"):
        run_walk_forward(conn, config(start=utc(2025, 1, 1), end=utc(2025, 6, 1)))
    with pytest.raises(BacktestError, match="unknown symbol 'ETH/USDT'"):
        run_walk_forward(conn, config(symbols=("ETH/USDT",)), train_share=0.5)
    with pytest.raises(ValueError, match="autocommit"), \
            psycopg.connect(db_url) as plain:
        run_walk_forward(plain, config())
    for table in ("walk_forwards", "walk_forward_windows", "runs"):
        assert conn.execute(f"SELECT count(*) FROM backtest.{table}").fetchone() == (0,)

    # a period running past the data: the windows without test bars are dropped (noted)
    notes: list[str] = []

    class Seen(Exception):
        pass

    def progress(event: Event) -> None:
        if event.kind == "note":
            notes.append(event.message)
        if event.kind == "train":
            raise Seen

    with pytest.raises(Seen):
        run_walk_forward(conn, config(end=utc(2024, 7, 1)), train_share=0.5,
                         param_ranges=GRID, progress=progress)
    assert notes == ["windows 4-5 dropped: no 1h bars of BTC/USDT from 2024-05-01 on"]


# --------------------------------------------------------------------------- CLI
def test_cli(bars: psycopg.Connection, db_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"MMATS_DATABASE_URL": db_url, "MMATS_CONFIG": ""}
    out = tmp_path / "wf.json"
    args = ["--strategy", "sma_crossover", "--symbol", "btc/usdt", "--timeframe", "1h",
            "--from", "2024-01-01", "--to", "2024-04-15", "--train-share", "0.5",
            "--param", "fast=5:10:5", "--param", "slow=20", "--commission", "0.001",
            "--json", str(out)]
    result = runner.invoke(walk_forward_command, args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.stdout.splitlines()
    assert lines[0] == "walk-forward: 3 window(s), 2 candidate(s) each: 9 backtest runs"
    window_lines = [x for x in lines if x.startswith("  window ")]
    assert len(window_lines) == 3
    assert window_lines[0].startswith("  window 1/3: train 2024-01-03 to 2024-02-01, fast=")
    assert "test 2024-04-01 to 2024-04-15: return " in window_lines[2]
    assert any(x.startswith("out-of-sample 2024-02-01 to 2024-04-15 (3 windows, stitched)")
               for x in lines)
    assert "parameter stability:" in lines
    assert any(x.split()[:1] == ["fast"] for x in lines)  # a row of the stability table
    data = json.loads(out.read_text())
    assert data["status"] == "finished" and len(data["windows"]) == 3
    assert data["stitched"]["equity"][0] == 10000

    for bad, fragment in [
        (["--param", "fast=5:10"], "--param 'fast=5:10': a range is low:high:step"),
        (["--param", "fast=5", "--param", "fast=6"], "--param fast given twice"),
        (["--objective", "luck"], "--objective 'luck'"),
        (["--train-share", "1.2"], "--train-share must be a fraction"),
        (["--to", "2024-02-01"], "too short for one monthly walk-forward window"),
        (["--slippage", "bogus"], "slippage 'bogus'"),
        (["--strategy", "nope"], "no strategy named 'nope'"),
    ]:
        result = runner.invoke(walk_forward_command, args[:args.index("--param")] + bad,
                               env=env)
        assert isinstance(result.exception, MmatsError), (bad, result.output, result.exception)
        message = str(result.exception)
        assert fragment in message and "\n" not in message, (bad, message)


def test_a_window_whose_only_bar_closes_after_its_end_has_no_bars(
        conn: psycopg.Connection) -> None:
    # weekly bars open on Mondays; the last test window, 2024-06-01 to 06-05, holds only
    # the opening of the bar of Mon 06-03, which closes 06-10 (prices after --to): a run
    # replays no such bar, so the window has no test bars and is dropped up front
    conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES ('WKUSD', 'test', 'crypto', 'WK', 'USD', 0.01, 0.001, 0, 'CRYPTO_24X7')")
    inst = conn.execute(
        "SELECT instrument_id FROM market.instruments WHERE symbol = 'WKUSD'").fetchone()[0]  # type: ignore[index]
    first = datetime(2024, 1, 1, tzinfo=UTC)
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
            " volume) VALUES (%s, '1w', %s, 100, 100, 100, 100, 1000)",
            [(inst, first + timedelta(weeks=k)) for k in range(23)])  # to the bar of 06-03
    cfg = config(symbols=("WKUSD",), timeframe="1w", start=utc(2024, 2, 1),
                 end=utc(2024, 6, 5))
    plan = windows(cfg.start, cfg.end, train_share=0.5)
    assert plan[-1].test_start == utc(2024, 6, 1)
    kept, notes, markets = wf._check_bars(conn, cfg, plan)
    assert kept == plan[:-1] and markets == ["crypto"]
    assert notes == [f"window {plan[-1].number} dropped: no 1w bars of WKUSD from 2024-06-01 on"]
