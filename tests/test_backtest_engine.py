"""The backtest engine end to end against the real database (no mocks).

Each test creates its own instrument and bars in SQL, writes a tiny scripted strategy
into a temporary folder (loaded by name through BacktestConfig.strategy_dirs), runs
workers.backtest.run.run_backtest and checks the ledger's rows (trading.fills, orders,
trades) and load_report() against values worked out by hand from the simulator's rules
and the README. Bars are 1-minute bars from T0; bar i opens at T0 + i min and closes at
T0 + (i + 1) min, which is also the `context.now` of the strategy call on it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from workers.backtest.config import BacktestConfig, BacktestError, LimitSpec
from workers.backtest.results import load_report
from workers.backtest.run import run_backtest
from workers.backtest.simulator import Slippage

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)  # a Monday
M = timedelta(minutes=1)
_ids = itertools.count(1)

# The scripted strategy: PLAN maps the number of the on_bar call (0-based, shifted by the
# `shift` parameter) to what to return; every call is logged to LOG (one JSON line).
STRATEGY_BODY = '''
import json

from strategies import IStrategy, ParamSpec, TradeSignal


class Scripted(IStrategy):
    name = NAME
    parameters = {"shift": ParamSpec(0, minimum=0)}

    def __init__(self, params=None):
        super().__init__(params)
        self.calls = 0

    def get_required_indicators(self):
        return []

    def on_bar(self, context):
        n = self.calls
        self.calls += 1
        seen = {}
        for symbol, md in context.data.items():
            seen[symbol] = {"len": len(md), "last": repr(float(md.close[-1])),
                            "close": str(md.bar.close), "ts": md.bar.ts.isoformat()}
        with open(LOG, "a") as f:
            f.write(json.dumps({"n": n, "now": context.now.isoformat(), "data": seen}) + "\\n")
        out = []
        for symbol, action, kw in PLAN.get(n - self.params["shift"], []):
            if action == "raise":
                raise ValueError(f"boom on call {n}")
            if action == "exit":
                raise SystemExit(3)
            if action == "foreign":  # signed with another strategy's name
                out.append(TradeSignal(strategy="sma_crossover", version=self.version,
                                       symbol=symbol, action="buy", ts=context.now))
                continue
            out.append(self.signal(context, symbol, action, **kw))
        return out or None
'''


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def conn(mod_url: str) -> Iterator[psycopg.Connection]:
    """One autocommit connection to the module's database (each test makes its own rows:
    its own instrument, strategy name and run)."""
    with psycopg.connect(mod_url, autocommit=True) as c:
        yield c


def scalar(conn: psycopg.Connection, sql: str, *args: Any) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


def add_instrument(conn: psycopg.Connection, step: str = "0.001", min_qty: str = "0",
                   tick: str = "0.01") -> str:
    """A new USD-quoted crypto instrument with a unique symbol; returns the symbol."""
    n = next(_ids)
    symbol = f"T{n}USD"
    conn.execute(
        "INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,"
        " price_tick, quantity_step, min_quantity, calendar_id)"
        " VALUES (%s, 'test', 'crypto', %s, 'USD', %s, %s, %s, 'CRYPTO_24X7')",
        (symbol, f"T{n}", tick, step, min_qty))
    return symbol


def add_bars(conn: psycopg.Connection, symbol: str, rows: Sequence[Sequence[Any]],
             t0: datetime = T0, every: timedelta = M, volume: int = 1000) -> None:
    """Bars (open, high, low, close) at t0, t0 + every, ..."""
    inst = scalar(conn, "SELECT instrument_id FROM market.instruments WHERE symbol = %s", symbol)
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)"
            " VALUES (%s, '1m', %s, %s, %s, %s, %s, %s)",
            [(inst, t0 + k * every, *map(str, r), volume) for k, r in enumerate(rows)])


def flat(price: Any, n: int) -> list[tuple[Any, Any, Any, Any]]:
    """n bars that do not move: open = high = low = close = price."""
    return [(price, price, price, price)] * n


class Script:
    """A scripted strategy file in a temporary folder, and what it logged."""

    def __init__(self, folder: Path, plan: dict[int, list[tuple[str, str, dict[str, Any]]]]):
        self.folder = folder
        self.name = f"scripted_{next(_ids)}"
        self.log = folder / f"{self.name}.jsonl"
        head = f"NAME = {self.name!r}\nLOG = {str(self.log)!r}\nPLAN = {plan!r}\n"
        (folder / f"{self.name}.py").write_text(head + STRATEGY_BODY)

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def config(self, symbols: Sequence[str], bars: int, **kw: Any) -> BacktestConfig:
        """A 1m run over the first `bars` bars from T0 (or from kw['start'])."""
        start = kw.pop("start", T0)
        return BacktestConfig(strategy=self.name, symbols=tuple(symbols), timeframe="1m",
                              start=start, end=start + bars * M,
                              strategy_dirs=(self.folder,), **kw)


def run(conn: psycopg.Connection, cfg: BacktestConfig) -> int:
    return run_backtest(conn, cfg)


def fills(conn: psycopg.Connection, run_id: int) -> list[tuple[Any, ...]]:
    """(side, quantity, price, commission, ts) of the run's fills in order."""
    return conn.execute(
        "SELECT f.side::text, f.quantity, f.price, f.commission, f.ts FROM trading.fills f"
        " JOIN backtest.runs r USING (account_id) WHERE r.run_id = %s ORDER BY f.fill_id",
        (run_id,)).fetchall()


def orders(conn: psycopg.Connection, run_id: int) -> list[tuple[Any, ...]]:
    """(side, quantity, filled_quantity, status, trigger, reduce_only, reason) in order."""
    return conn.execute(
        "SELECT o.side::text, o.quantity, o.filled_quantity, o.status::text, o.trigger::text,"
        " o.reduce_only, o.reason FROM trading.orders o"
        " JOIN backtest.runs r USING (account_id) WHERE r.run_id = %s ORDER BY o.order_id",
        (run_id,)).fetchall()


def trades(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    """(side, quantity, entry_time, entry_price, exit_time, exit_price, pnl, exit_trigger)."""
    return [(t["side"], D(t["quantity"]), t["entry_time"], D(t["entry_price"]), t["exit_time"],
             D(t["exit_price"]), D(t["pnl"]), t["exit_trigger"]) for t in report["trades"]]


def at(k: int) -> str:
    """The ISO time of bar k's open (what load_report prints for a fill at that bar)."""
    return (T0 + k * M).isoformat()


def counts(conn: psycopg.Connection) -> tuple[int, int, int]:
    return conn.execute(
        "SELECT (SELECT count(*) FROM backtest.runs), (SELECT count(*) FROM trading.accounts),"
        " (SELECT count(*) FROM trading.orders)").fetchone()  # type: ignore[return-value]


# ----------------------------------------------------------------------------- fills


def test_a_market_order_from_bar_t_fills_at_the_open_of_bar_t_plus_1(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 101, 99, 100), (102, 103, 101, 102), (103, 104, 102, 103),
                         (104, 105, 103, 104)])
    # half of the equity on bar 0's close (100): 0.5 x 10000 / 100 = 50
    script = Script(tmp_path, {0: [(sym, "buy", {"size": "0.5"})]})
    run_id = run(conn, script.config([sym], 4))
    # filled on bar 1: at its open 102, stamped with its open time T0 + 1 min
    assert fills(conn, run_id) == [("buy", D(50), D(102), D(0), T0 + M)]
    assert orders(conn, run_id) == [("buy", D(50), D(50), "filled", "signal", False, None)]
    report = load_report(conn, run_id)
    # cash 10000 - 50 x 102 = 4900; marked at the last close 104: 4900 + 5200 = 10100
    assert report["metrics"]["final_equity"] == 10100
    assert report["run"]["status"] == "finished"


def test_percent_of_equity_sizing_and_a_partial_fill_for_lack_of_cash(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (101, 102, 100, 101), (101, 101, 101, 101)])
    script = Script(tmp_path, {0: [(sym, "buy", {})]})
    run_id = run(conn, script.config([sym], 3, commission=D("0.001")))
    # sized by submit_signal at bar 0's close: 10000 / (100 x 1.001) = 99.9000999
    # -> 99.900 (quantity step 0.001). Bar 1 opens at 101: the cash affords only
    # 10000 / (101 x 1.001) = 98.91090... -> 98.910; the other 0.990 is cancelled.
    assert orders(conn, run_id) == [
        ("buy", D("99.9"), D("98.91"), "cancelled", "signal", False,
         "INSUFFICIENT_CASH: cash=10000, price=101.00, ordered=99.900, affordable=98.910")]
    # commission 98.91 x 101 x 0.001 = 9.989910
    assert fills(conn, run_id) == [("buy", D("98.91"), D(101), D("9.98991"), T0 + M)]
    # cash 10000 - 9989.91 - 9.98991 = 0.10009: never negative
    assert scalar(conn, "SELECT a.cash FROM trading.accounts a JOIN backtest.runs r"
                        " USING (account_id) WHERE r.run_id = %s", run_id) == D("0.10009")
    report = load_report(conn, run_id)
    assert report["sanity"] == []
    assert report["run"]["counts"]["fills"] == 1


def test_costs_on_engine_fills(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (102, 103, 101, 102), (104, 105, 103, 104),
                         (104, 104, 104, 104)])
    script = Script(tmp_path, {0: [(sym, "buy", {"size": "0.5"})], 1: [(sym, "close", {})]})
    run_id = run(conn, script.config([sym], 4, commission=D("0.001"), spread={"*": D("0.001")},
                                     slippage=Slippage.parse("bps:10")))
    # sized at bar 0's close: 0.5 x 10000 / (100 x 1.001) = 49.95004995 -> 49.950
    # buy at bar 1's open 102 + half spread 0.051 + 10 bps 0.102 = 102.153 -> 102.16 (up);
    #   commission 49.95 x 102.16 x 0.001 = 5.102892
    # sell at bar 2's open 104 - 0.052 - 0.104 = 103.844 -> 103.84 (down);
    #   commission 49.95 x 103.84 x 0.001 = 5.186808
    assert fills(conn, run_id) == [
        ("buy", D("49.95"), D("102.16"), D("5.102892"), T0 + M),
        ("sell", D("49.95"), D("103.84"), D("5.186808"), T0 + 2 * M)]
    report = load_report(conn, run_id)
    # pnl 49.95 x 1.68 - 5.102892 - 5.186808 = 83.916 - 10.2897 = 73.6263
    assert trades(report) == [("long", D("49.95"), at(1), D("102.16"), at(2), D("103.84"),
                               D("73.6263"), "signal")]
    assert D(str(report["metrics"]["final_equity"])) == D("10073.6263")
    assert report["sanity"] == []


# ----------------------------------------------------------------------------- protection


@pytest.mark.parametrize(("entry_bar", "stop_bar", "exit_bar", "exit_price"), [
    # bar 2's low 94 goes through the stop 95: out at the stop
    ((100, 101, 99, 100), (99, 100, 94, 96), 2, D(95)),
    # bar 2 gaps down to open at 93, below the stop: out at the open
    ((100, 101, 99, 100), (93, 94, 92, 93), 2, D(93)),
    # the entry bar itself (opened at 100) falls to 94: out on that bar, at the stop
    ((100, 101, 94, 96), (96, 97, 95, 96), 1, D(95)),
])
def test_a_stop_loss_fires_at_the_stop_or_at_a_gap_open(conn, tmp_path, entry_bar, stop_bar,
                                                        exit_bar, exit_price):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), entry_bar, stop_bar, (96, 97, 95, 96)])
    script = Script(tmp_path, {0: [(sym, "buy", {"stop_loss": "95"})]})
    run_id = run(conn, script.config([sym], 4))
    report = load_report(conn, run_id)
    # 10000 / 100 = 100 bought at bar 1's open 100, sold at the exit: pnl 100 x (exit - 100)
    assert trades(report) == [("long", D(100), at(1), D(100), at(exit_bar), exit_price,
                               100 * (exit_price - 100), "stop_loss")]
    assert [o[3:6] for o in orders(conn, run_id)] == [("filled", "signal", False),
                                                      ("filled", "stop_loss", True)]
    assert report["open_positions"] == []
    assert report["metrics"]["final_equity"] == 100 * exit_price
    assert report["sanity"] == []


def test_a_short_stop_loss(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 101, 99, 100), (101, 106, 100, 104),
                         (104, 104, 104, 104)])
    script = Script(tmp_path, {0: [(sym, "sell", {"stop_loss": "105"})]})
    run_id = run(conn, script.config([sym], 4, allow_short=True))
    report = load_report(conn, run_id)
    # short 10000 / 100 = 100 at bar 1's open 100; bar 2's high 106 reaches the stop 105:
    # bought back (reduce-only, no cash check) at 105, pnl 100 x (100 - 105) = -500
    assert trades(report) == [("short", D(100), at(1), D(100), at(2), D(105), D(-500),
                               "stop_loss")]
    assert [o[:6] for o in orders(conn, run_id)] == [
        ("sell", D(100), D(100), "filled", "signal", False),
        ("buy", D(100), D(100), "filled", "stop_loss", True)]
    # cash 10000 + 10000 - 10500
    assert report["metrics"]["final_equity"] == 9500


def test_stop_and_target_inside_one_bar_the_stop_wins(conn, tmp_path):
    sym = add_instrument(conn)
    # bar 2 reaches both the target 110 (high 111) and the stop 95 (low 94)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 101, 99, 100), (100, 111, 94, 100),
                         (100, 100, 100, 100)])
    script = Script(tmp_path, {0: [(sym, "buy", {"stop_loss": "95", "take_profit": "110"})]})
    report = load_report(conn, run(conn, script.config([sym], 4)))
    assert trades(report) == [("long", D(100), at(1), D(100), at(2), D(95), D(-500),
                               "stop_loss")]


@pytest.mark.parametrize(("target_bar", "exit_price"), [
    # bar 2's high 112 reaches the target 110: out at the target
    ((101, 112, 100, 111), D(110)),
    # bar 2 gaps up to open at 113, above the target: out at the (better) open
    ((113, 115, 112, 114), D(113)),
])
def test_a_take_profit(conn, tmp_path, target_bar, exit_price):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 101, 99, 100), target_bar,
                         (111, 111, 111, 111)])
    script = Script(tmp_path, {0: [(sym, "buy", {"take_profit": "110"})]})
    report = load_report(conn, run(conn, script.config([sym], 4)))
    assert trades(report) == [("long", D(100), at(1), D(100), at(2), exit_price,
                               100 * (exit_price - 100), "take_profit")]
    # nothing held afterwards: final equity = 100 x exit price
    assert report["metrics"]["final_equity"] == 100 * exit_price


def test_a_trailing_stop_follows_the_highs_and_fires(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [
        (100, 100, 100, 100),   # 0: buy signal at the close 100, trailing distance 5
        (100, 104, 99, 103),    # 1: filled at the open 100; stop 100 - 5 = 95 (low 99: no)
        (106, 110, 105, 109),   # 2: stop from the earlier high 104: 99 (low 105: no)
        (108, 108, 104, 104),   # 3: stop from the high 110: 105; the low 104 fires it
        (104, 104, 104, 104),
    ])
    script = Script(tmp_path, {0: [(sym, "buy", {"trailing_stop": "5"})]})
    report = load_report(conn, run(conn, script.config([sym], 5)))
    # out at 105 (bar 3 opened at 108, above it: no gap); pnl 100 x 5 = 500
    assert trades(report) == [("long", D(100), at(1), D(100), at(3), D(105), D(500),
                               "trailing_stop")]


def test_a_trailing_stop_exit_price_and_trigger(conn, tmp_path):
    """The trailing-stop scenario's price and trigger (the test above checks its bar):
    the stop moved up with the highs and fired at 105, not at the entry stop 95."""
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 104, 99, 103), (106, 110, 105, 109),
                         (108, 108, 104, 104), (104, 104, 104, 104)])
    script = Script(tmp_path, {0: [(sym, "buy", {"trailing_stop": "5"})]})
    report = load_report(conn, run(conn, script.config([sym], 5)))
    [(side, qty, entry, entry_price, _exit_time, exit_price, pnl, trigger)] = trades(report)
    assert (side, qty, entry, entry_price, exit_price, pnl, trigger) == (
        "long", D(100), at(1), D(100), D(105), D(500), "trailing_stop")
    assert report["metrics"]["final_equity"] == 10500


def test_a_trailing_stop_that_gaps_fills_at_the_open_of_the_bar_that_fired_it(conn, tmp_path):
    """A trailing stop that the price gaps through fills at the open of the bar that fired
    it: the bar the ledger names as the order's triggered_at (its close), which the engine
    looks up to fill the order."""
    sym = add_instrument(conn)
    add_bars(conn, sym, [
        (100, 100, 100, 100),   # 0: buy signal at the close 100, trailing distance 5
        (100, 104, 99, 103),    # 1: filled at the open 100; stop 95 (low 99: no)
        (106, 110, 105, 109),   # 2: stop from the earlier high 104: 99 (its low 105: no)
        (102, 103, 101, 102),   # 3: stop from the high 110: 105; opens at 102, below it
        (102, 102, 102, 102),
    ])
    script = Script(tmp_path, {0: [(sym, "buy", {"trailing_stop": "5"})]})
    run_id = run(conn, script.config([sym], 5))
    report = load_report(conn, run_id)
    # out at bar 3's open 102 (a gap through the stop 105): pnl 100 x 2 = 200
    assert trades(report) == [("long", D(100), at(1), D(100), at(3), D(102), D(200),
                               "trailing_stop")]
    fired = conn.execute(
        "SELECT o.triggered_at, f.ts FROM trading.orders o JOIN trading.fills f USING (order_id)"
        " JOIN backtest.runs r ON r.account_id = o.account_id"
        " WHERE r.run_id = %s AND o.trigger = 'trailing_stop'", (run_id,)).fetchall()
    assert fired == [(T0 + 4 * M, T0 + 3 * M)]  # fired by bar 3 (closing at 4), filled on it


def breaker(conn: psycopg.Connection, run_id: int) -> tuple[str, str | None]:
    return conn.execute(
        "SELECT b.mode::text, b.reason FROM risk.breaker_state b"
        " JOIN backtest.runs r USING (account_id) WHERE r.run_id = %s",
        (run_id,)).fetchone()  # type: ignore[return-value]


def test_a_drawdown_breaker_closes_the_position_at_the_next_open(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [*flat(100, 3), *flat(80, 4)])
    # buy on bar 0, then 'hold' on every bar: each signal step marks the held position to
    # the bar just closed (and snapshots the equity, which judges MAX_DRAWDOWN)
    plan = {0: [(sym, "buy", {})], **{n: [(sym, "hold", {})] for n in range(1, 7)}}
    script = Script(tmp_path, plan)
    run_id = run(conn, script.config([sym], 7, limits=(LimitSpec("MAX_DRAWDOWN", D("0.1")),)))
    report = load_report(conn, run_id)
    # 100 bought at 100 on bar 1; bar 3 closes at 80: drawdown 2000 / 10000 = 20 % >= 10 %
    assert breaker(conn, run_id) == ("HARD", "MAX_DRAWDOWN: limit=0.1, drawdown=0.2000")
    # HARD sends a closing order at bar 3's close; like every market order created at a
    # close it fills at the next bar's open: bar 4, 80
    assert trades(report) == [("long", D(100), at(1), D(100), at(4), D(80), D(-2000),
                               "breaker")]
    assert report["open_positions"] == []


def test_a_drawdown_at_a_bar_close_between_signals_trips_the_breaker(conn, tmp_path):
    sym = add_instrument(conn)
    # bar 3 closes at 80 (20 % down), bar 4 recovers to 100
    add_bars(conn, sym, [*flat(100, 3), (100, 100, 80, 80), *flat(100, 3)])
    script = Script(tmp_path, {0: [(sym, "buy", {})]})
    run_id = run(conn, script.config([sym], 7, limits=(LimitSpec("MAX_DRAWDOWN", D("0.1")),)))
    # paper or live trading of the same bars (one bar at a time) trips it at bar 3's close
    assert breaker(conn, run_id) == ("HARD", "MAX_DRAWDOWN: limit=0.1, drawdown=0.2000")


def test_an_entry_a_hard_breaker_cancelled_never_fills(conn, tmp_path):
    """Migration 0004_13: a HARD breaker cancels the open entries. An entry the strategy
    sent on the bar whose close trips the breaker (on another symbol, whose protection the
    step judges after the signals) is cancelled by the ledger; the engine drops it instead
    of filling it at the next open (the ledger would refuse a fill of a cancelled order)."""
    a, b = add_instrument(conn), add_instrument(conn)
    add_bars(conn, a, [*flat(100, 3), *flat(50, 4)])
    add_bars(conn, b, flat(10, 7))
    plan = {0: [(a, "buy", {"size": "0.5"})],
            **{n: [(a, "hold", {}), (b, "buy", {"size": "0.5"})] for n in range(2, 7)}}
    script = Script(tmp_path, plan)
    run_id = run(conn, script.config([a, b], 7,
                                     limits=(LimitSpec("MAX_DRAWDOWN", D("0.1")),)))
    assert breaker(conn, run_id)[0] == "HARD"
    states = conn.execute(
        "SELECT i.symbol, o.side::text, o.status::text, o.trigger::text, o.reason"
        " FROM trading.orders o JOIN backtest.runs r ON r.account_id = o.account_id"
        " JOIN market.instruments i USING (instrument_id)"
        " WHERE r.run_id = %s ORDER BY o.order_id", (run_id,)).fetchall()
    # b's first buy was still waiting for its fill when a's fall to 50 tripped HARD; b's
    # later buys were refused by the breaker (no order)
    assert [s[:4] for s in states] == [(a, "buy", "filled", "signal"),
                                       (b, "buy", "cancelled", "signal"),
                                       (a, "sell", "filled", "breaker")]
    assert states[1][4].startswith("breaker HARD: MAX_DRAWDOWN")
    assert all(p["symbol"] != b for p in load_report(conn, run_id)["open_positions"])


# ----------------------------------------------------------------------------- reversal, end


def test_a_reversal_is_one_order_that_closes_the_long_and_opens_the_short(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 110, 100, 110), (110, 120, 110, 120),
                         (120, 120, 115, 115), (115, 115, 110, 110)])
    script = Script(tmp_path, {0: [(sym, "buy", {})], 2: [(sym, "sell", {})]})
    run_id = run(conn, script.config([sym], 5, allow_short=True))
    # buy 10000 / 100 = 100 at bar 1's open 100. At bar 2's close 120 the position is
    # marked to 120: equity 12000 -> a short of 12000 / 120 = 100, so one sell of
    # 100 + 100 = 200, filled at bar 3's open 120
    assert [o[:5] for o in orders(conn, run_id)] == [
        ("buy", D(100), D(100), "filled", "signal"), ("sell", D(200), D(200), "filled", "signal")]
    assert fills(conn, run_id) == [("buy", D(100), D(100), D(0), T0 + M),
                                   ("sell", D(200), D(120), D(0), T0 + 3 * M)]
    report = load_report(conn, run_id)
    assert trades(report) == [("long", D(100), at(1), D(100), at(3), D(120), D(2000), "signal")]
    # the short 100 at 120 is open at the end, marked at the last close 110: +1000
    [pos] = report["open_positions"]
    assert (pos["side"], D(pos["quantity"]), D(pos["average_price"]), D(pos["last_price"]),
            D(pos["unrealized_pnl"])) == ("short", D(100), D(120), D(110), D(1000))
    # cash 0 + 200 x 120 = 24000, less the short marked at 110: 24000 - 11000 = 13000
    assert report["metrics"]["final_equity"] == 13000
    assert report["sanity"] == []


def test_a_reversal_closes_the_whole_short_even_when_cash_is_short(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 190, 100, 190), (210, 210, 200, 205),
                         (205, 205, 205, 205)])
    script = Script(tmp_path, {0: [(sym, "sell", {})], 1: [(sym, "buy", {})]})
    run_id = run(conn, script.config([sym], 4, allow_short=True))
    # short 10000 / 100 = 100 at bar 1's open 100: cash 20000. At bar 1's close 190 the
    # equity is 20000 - 19000 = 1000: long 1000 / 190 = 5.263, one buy of 105.263.
    # Bar 2 opens at 210: buying back the 100 short costs 21000 and always fills (it
    # closes); nothing is left for the 5.263 that would open a long: cancelled
    assert [o[:4] for o in orders(conn, run_id)] == [
        ("sell", D(100), D(100), "filled"), ("buy", D("105.263"), D(100), "cancelled")]
    report = load_report(conn, run_id)
    assert trades(report) == [("short", D(100), at(1), D(100), at(2), D(210), D(-11000),
                               "signal")]
    assert report["open_positions"] == []  # not a short of 4.762 left over
    assert report["metrics"]["final_equity"] == -1000


def test_a_position_open_at_the_end_is_reported_open_not_as_a_trade(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 101, 99, 100), (100, 103, 100, 102),
                         (102, 104, 101, 103)])
    # bought on bar 0 (a stop far below that never fires), never sold; the close signal
    # on the last bar gets no bar to fill on
    script = Script(tmp_path, {0: [(sym, "buy", {"size": "0.5", "stop_loss": "50"})],
                               3: [(sym, "close", {})]})
    run_id = run(conn, script.config([sym], 4, commission=D("0.001")))
    report = load_report(conn, run_id)
    assert report["trades"] == []
    assert [o[:4] + o[6:] for o in orders(conn, run_id)] == [
        ("buy", D("49.95"), D("49.95"), "filled", None),
        ("sell", D("49.95"), D(0), "cancelled", "the backtest ended before the order could fill")]
    # 0.5 x 10000 / (100 x 1.001) = 49.95004995 -> 49.950 at bar 1's open 100
    [pos] = report["open_positions"]
    assert pos["symbol"] == sym and pos["strategy"] == script.name
    # marked at the last close 103: unrealized 49.95 x 3 = 149.85
    assert (pos["side"], D(pos["quantity"]), D(pos["average_price"]), D(pos["last_price"]),
            D(pos["unrealized_pnl"])) == ("long", D("49.95"), D(100), D(103), D("149.85"))
    assert report["metrics"]["open_positions"] == 1
    # cash 10000 - 4995 - 4.995 = 5000.005; + 49.95 x 103 = 5144.85 -> 10144.855
    assert D(str(report["metrics"]["final_equity"])) == D("10144.855")
    # the entry's commission was paid, though no trade is closed
    assert report["metrics"]["total_commission"] == 4.995


# ----------------------------------------------------------------------------- determinism


def test_identical_runs_have_identical_fingerprints_and_trades(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 101, 99, 101), (101, 103, 100, 102),
                         (102, 102, 96, 97), (97, 99, 97, 98), (98, 99, 97, 99)])
    script = Script(tmp_path, {0: [(sym, "buy", {"stop_loss": "96.5"})],
                               3: [(sym, "buy", {})]})
    cfg = script.config([sym], 6, commission=D("0.001"), spread={"*": D("0.0002")})
    first, second = run(conn, cfg), run(conn, cfg)
    shifted = run(conn, script.config([sym], 6, commission=D("0.001"),
                                      spread={"*": D("0.0002")}, params={"shift": 1}))
    prints = {r: scalar(conn, "SELECT fingerprint FROM backtest.runs WHERE run_id = %s", r)
              for r in (first, second, shifted)}
    a, b, c = (load_report(conn, r) for r in (first, second, shifted))
    assert len(a["trades"]) == 1 and len(a["open_positions"]) == 1
    assert a["trades"] == b["trades"] and a["open_positions"] == b["open_positions"]
    assert prints[first] == prints[second]
    assert a["run"]["fingerprint"] == prints[first]
    # shift=1: every signal one bar later -> other fills, another fingerprint
    assert c["trades"] != a["trades"]
    assert prints[shifted] != prints[first]


# ----------------------------------------------------------------------------- what it sees


def test_the_strategy_sees_only_the_bars_up_to_the_current_one(conn, tmp_path):
    sym = add_instrument(conn)
    closes = [100 + k for k in range(12)]
    add_bars(conn, sym, [(c, c + 1, c - 1, c) for c in closes])
    # the run is bars 2..9; bars 0 and 1 are the warm-up (warmup_bars() = 0 + 2), and
    # bars 10 and 11 lie after its end
    script = Script(tmp_path, {})
    run(conn, script.config([sym], 8, start=T0 + 2 * M))
    calls = script.calls()
    stored = conn.execute(
        "SELECT b.ts, b.close FROM market.bars b JOIN market.instruments i USING (instrument_id)"
        " WHERE i.symbol = %s ORDER BY b.ts", (sym,)).fetchall()
    assert len(calls) == 8
    for n, call in enumerate(calls):
        k = n + 2  # the bar this call decides on
        ts, close = stored[k]
        assert call["now"] == (ts + M).isoformat()  # the bar's close time
        seen = call["data"][sym]
        assert seen["len"] == k + 1  # the warm-up and every bar up to this one, no more
        assert seen["ts"] == ts.isoformat()
        assert D(seen["close"]) == close
        assert float(seen["last"]) == float(close)


def test_a_strategy_that_always_raises_is_disabled_after_five_errors(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 10))
    script = Script(tmp_path, {n: [(sym, "raise", {})] for n in range(10)})
    run_id = run(conn, script.config([sym], 10))
    report = load_report(conn, run_id)
    assert report["run"]["status"] == "finished"
    errors = report["strategy_errors"]
    # 5 errors in a row, then the guard stops calling it: 5 calls for 10 bars
    assert len(script.calls()) == 5
    assert errors == [
        f"{script.name} 1.0.0: ValueError: boom on call {n} ({n + 1} in a row)"
        + (" -> strategy disabled" if n == 4 else "") for n in range(5)]
    assert report["trades"] == [] and report["metrics"]["final_equity"] == 10000


@pytest.mark.parametrize("warm_up", [True, False])
def test_a_signal_for_a_symbol_not_yet_traded_is_not_sized_from_the_future(conn, tmp_path,
                                                                          warm_up):
    a, b = add_instrument(conn), add_instrument(conn)
    add_bars(conn, a, flat(100, 6))  # A: minutes 0..5
    if warm_up:
        add_bars(conn, b, flat(40, 1), t0=T0 - M)  # B: one bar before the period
    # B in the period: minutes 2..5, the last one closing at 80
    add_bars(conn, b, [*flat(50, 3), (80, 80, 80, 80)], t0=T0 + 2 * M)
    # call 0 (minute 0, only A has a bar): buy B with half the equity
    script = Script(tmp_path, {0: [(b, "buy", {"size": "0.5"})]})
    run_id = run(conn, script.config([a, b], 6))
    signal = conn.execute(
        "SELECT g.status::text, g.reason_code, o.reference_price, o.quantity"
        " FROM trading.signals g JOIN backtest.runs r USING (account_id)"
        " LEFT JOIN trading.orders o ON o.signal_id = g.signal_id WHERE r.run_id = %s",
        (run_id,)).fetchone()
    if warm_up:
        # B's latest close at minute 0's close is the warm-up bar's 40: 0.5 x 10000 / 40
        # = 125, filled at B's next open (minute 2) at 50
        assert signal == ("approved", None, D(40), D(125))
        assert fills(conn, run_id) == [("buy", D(125), D(50), D(0), T0 + 2 * M)]
    else:
        # no bar of B at or before the signal: nothing to size with (what submit_signal
        # answers when it has no price), not the last close 80 of the period
        assert signal == ("rejected", "NO_PRICE", None, None)
        assert fills(conn, run_id) == []


def test_sys_exit_or_a_foreign_signal_in_on_bar_is_a_strategy_error(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 4))
    script = Script(tmp_path, {0: [(sym, "exit", {})], 1: [(sym, "foreign", {})],
                               2: [(sym, "buy", {})]})
    run_id = run(conn, script.config([sym], 4))
    report = load_report(conn, run_id)
    assert report["run"]["status"] == "finished"
    assert report["strategy_errors"] == [
        f"{script.name} 1.0.0: SystemExit: 3 (1 in a row)",
        f"{script.name} 1.0.0: SignalError: on_bar returned a signal of sma_crossover 1.0.0, "
        f"not of {script.name} 1.0.0: refused (make it with self.signal) (2 in a row)"]
    assert len(script.calls()) == 4
    # only its own signal reached the trading core
    assert scalar(conn, "SELECT array_agg(s.name) FROM trading.signals g JOIN backtest.runs r"
                  " USING (account_id) JOIN trading.strategies s USING (strategy_id)"
                  " WHERE r.run_id = %s", run_id) == [script.name]



def test_sys_exit_in_on_order_filled_is_a_strategy_error(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 4))
    script = Script(tmp_path, {0: [(sym, "buy", {})]})
    path = tmp_path / f"{script.name}.py"
    path.write_text(path.read_text().replace(
        "    def on_bar(self, context):",
        "    def on_order_filled(self, event):\n        raise SystemExit(4)\n\n"
        "    def on_bar(self, context):", 1))
    run_id = run(conn, script.config([sym], 4))
    report = load_report(conn, run_id)
    assert report["run"]["status"] == "finished"
    assert [e for e in report["strategy_errors"] if "on_order_filled" in e], report
    assert len(script.calls()) == 4

# ----------------------------------------------------------------------------- bad input


def test_a_strategy_whose_initialize_raises_is_a_one_line_error(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 3))
    script = Script(tmp_path, {})
    (tmp_path / f"{script.name}.py").write_text(
        (tmp_path / f"{script.name}.py").read_text()
        + "\n    def initialize(self, config):\n"
          "        raise RuntimeError('no API key configured\\nsecond line')\n")
    before = counts(conn)
    with pytest.raises(BacktestError) as err:
        run(conn, script.config([sym], 3))
    assert str(err.value) == (
        f"{script.name}: initialize failed: RuntimeError: no API key configured")
    assert counts(conn) == before  # no run, no account, no order



def test_bad_input_is_a_one_line_error_and_writes_nothing(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 3))
    script = Script(tmp_path, {})
    before = counts(conn)
    cases = [
        (script.config(["NOSUCH"], 3), "unknown symbol 'NOSUCH'"),
        (script.config([sym], 3, start=T0 + timedelta(days=1)),
         f"no 1m bars for {sym} from 2026-03-03 10:00 to 2026-03-03 10:03 UTC"
         " (stored: 2026-03-02 10:00 to 2026-03-02 10:02)"),
        (BacktestConfig(strategy="no_such_strategy", symbols=(sym,), timeframe="1m", start=T0,
                        end=T0 + 3 * M, strategy_dirs=(tmp_path,)),
         "no strategy named 'no_such_strategy'"),
        (script.config([sym], 3, params={"speed": 3}), "unknown parameter(s) speed"),
        (script.config([sym], 3, params={"shift": "two"}),
         "parameter shift must be int, got 'two'"),
        (script.config([sym], 3, params={"shift": -1}), "parameter shift must be >= 0, got -1"),
    ]
    for cfg, says in cases:
        with pytest.raises(BacktestError) as err:
            run(conn, cfg)
        assert says in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    assert counts(conn) == before  # no run, no account, no order


@pytest.mark.parametrize(("kw", "says"), [
    ({"timeframe": "2m"}, "--timeframe '2m': expected one of"),
    ({"end": T0}, "must be after --from"),
    ({"cash": D(0)}, "--cash must be a number > 0, got 0"),
    ({"symbols": ()}, "a backtest needs at least one --symbol"),
    ({"commission": D("0.5")}, "--commission must be a fraction below 0.1, got 0.5"),
    # a spread for a symbol the run does not trade was stored as applied and never charged
    ({"spread": {"A-USD": D("0.01")}}, "--spread names A-USD, which is not a symbol of the "
     "run (A)"),
    ({"symbols": ("A@x",), "spread": {"A@Y": D("0.01")}}, "--spread names A@Y, which is not"),
    ({"spread": {"A": D("0.5")}}, "spread"),
])
def test_bad_configuration_is_refused_before_anything_runs(kw, says):
    args: dict[str, Any] = {"strategy": "x", "symbols": ("A",), "timeframe": "1m", "start": T0,
                            "end": T0 + M, **kw}
    with pytest.raises(BacktestError) as err:
        BacktestConfig(**args)
    assert says in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- ledger


def test_the_ledger_agrees_with_the_equity_curve(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, [(100, 100, 100, 100), (100, 102, 99, 101), (101, 104, 100, 103),
                         (103, 103, 100, 101), (101, 102, 98, 99), (99, 101, 99, 100),
                         (100, 100, 97, 98), (98, 99, 96, 97)])
    # round trip with costs, then a new position left open
    script = Script(tmp_path, {0: [(sym, "buy", {})], 2: [(sym, "close", {})],
                               4: [(sym, "buy", {"size": "0.5"})]})
    run_id = run(conn, script.config([sym], 8, commission=D("0.001"),
                                     slippage=Slippage.parse("bps:10")))
    # sized at 100: 10000 / 100.1 = 99.900; bar 1 opens at 100, + 10 bps = 100.1, where the
    # cash affords 10000 / (100.1 x 1.001) = 99.8003 -> 99.800 (the 0.1 left is cancelled);
    # commission 99.8 x 100.1 x 0.001 = 9.98998 -> cash 0.03002.
    # closed at bar 3's open 103 - 0.103 = 102.897 -> 102.89; commission 10.268422
    # -> cash 0.03002 + 10268.422 - 10.268422 = 10258.183598 (pnl 258.183598).
    # Half of that at bar 4's close 99: 5129.091799 / (99 x 1.001) = 51.757, filled at
    # bar 5's open 99 + 0.099 = 99.099 -> 99.10; commission 5.1291187
    # -> cash 5123.9357793; marked at the last close 97: + 5020.429 = 10144.3647793
    assert fills(conn, run_id) == [
        ("buy", D("99.8"), D("100.1"), D("9.98998"), T0 + M),
        ("sell", D("99.8"), D("102.89"), D("10.268422"), T0 + 3 * M),
        ("buy", D("51.757"), D("99.10"), D("5.1291187"), T0 + 5 * M)]
    report = load_report(conn, run_id)
    assert trades(report) == [("long", D("99.8"), at(1), D("100.1"), at(3), D("102.89"),
                               D("258.183598"), "signal")]
    assert report["sanity"] == []
    equity = scalar(conn, "SELECT e.equity FROM backtest.runs r,"
                          " LATERAL trading.account_equity(r.account_id) e WHERE r.run_id = %s",
                    run_id)
    assert equity == D("10144.3647793")
    assert D(str(report["metrics"]["final_equity"])) == equity
    # the curve (floats, from the fills and the closes) ends where the ledger does
    assert report["equity"]["equity"][-1] == pytest.approx(float(equity), abs=1e-6)
    assert report["metrics"]["final_cash"] == pytest.approx(5123.9357793, abs=1e-9)
    assert len(report["open_positions"]) == 1


def test_backtest_step_refuses_an_order_of_another_account(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 3))
    n = next(_ids)
    conn.execute("SELECT trading.create_account(%s, 'paper', 'operator', 10000)", (f"p{n}",))
    conn.execute("SELECT trading.assign_strategy(%s, %s)", (f"p{n}", f"other_{n}"))
    answer = scalar(conn, "SELECT trading.submit_signal(%s)", Jsonb({
        "account": f"p{n}", "strategy": f"other_{n}", "symbol": sym, "action": "buy",
        "size": "0.1", "ts": (T0 + 3 * M).isoformat()}))
    assert answer["status"] == "approved", answer
    foreign = answer["order_id"]
    run_id = scalar(conn, "SELECT backtest.create_run(%s, '1.0.0', '{}', %s, '1m', %s, %s,"
                          " 10000, 'USD')", f"probe_{n}", [sym], T0, T0 + 3 * M)
    for op in ({"op": "fill", "order_id": foreign, "broker_fill_id": f"x-{n}", "quantity": "1",
                "price": "100", "ts": T0.isoformat()},
               {"op": "cancel", "order_id": foreign, "reason": "mine now"}):
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT backtest.step(%s, %s)", (run_id, Jsonb([op])))
        assert f"order {foreign} is not an order of run {run_id}" in str(err.value)
    # the other account's order is untouched
    assert conn.execute("SELECT status::text, filled_quantity FROM trading.orders"
                        " WHERE order_id = %s", (foreign,)).fetchone() == ("created", 0)


def test_a_failed_run_is_recorded_as_failed_with_its_error(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 4))
    script = Script(tmp_path, {1: [("ELSEWHERE", "buy", {})]})
    before = scalar(conn, "SELECT COALESCE(max(run_id), 0) FROM backtest.runs")
    with pytest.raises(BacktestError) as err:
        run(conn, script.config([sym], 4))
    message = (f"strategy {script.name} signalled 'ELSEWHERE', which is not a symbol of this"
               f" run ({sym})")
    assert str(err.value) == message
    status, error, fingerprint = conn.execute(
        "SELECT status::text, error, fingerprint FROM backtest.runs WHERE run_id > %s",
        (before,)).fetchone()
    assert (status, error, fingerprint) == ("failed", f"BacktestError: {message}", None)


# ----------------------------------------------------------------------------- two symbols


def test_two_symbols_are_replayed_in_time_order_and_both_trade(conn, tmp_path):
    a, b = add_instrument(conn), add_instrument(conn)
    # A has a bar every minute 0..7; B at minutes 1, 3, 4, 5 and 7 only
    add_bars(conn, a, [(100, 100, 100, 100)] * 8)
    b_minutes = (1, 3, 4, 5, 7)
    for k in b_minutes:
        add_bars(conn, b, [(50, 50, 50, 50)], t0=T0 + k * M)
    # call 0 is minute 0 (A only): A half the equity; call 1 is minute 1 (A and B): B
    # a quarter of it
    script = Script(tmp_path, {0: [(a, "buy", {"size": "0.5"})],
                               1: [(b, "buy", {"size": "0.25"})]})
    run_id = run(conn, script.config([a, b], 8))
    seen = [(c["now"], sorted(c["data"])) for c in script.calls()]
    assert seen == [((T0 + (k + 1) * M).isoformat(), sorted([a, b] if k in b_minutes else [a]))
                    for k in range(8)]
    # A: 0.5 x 10000 / 100 = 50 at minute 1's open; B: 0.25 x 10000 / 50 = 50 at the open
    # of B's next bar, minute 3 (B has no bar at minute 2)
    assert fills(conn, run_id) == [("buy", D(50), D(100), D(0), T0 + M),
                                   ("buy", D(50), D(50), D(0), T0 + 3 * M)]
    report = load_report(conn, run_id)
    assert sorted(p["symbol"] for p in report["open_positions"]) == sorted([a, b])
    assert report["sanity"] == []
    assert report["metrics"]["final_equity"] == 10000


def test_a_position_added_to_and_closed_is_flat_after_its_close(conn, tmp_path):
    # 12.34567 + 57.75433 - 70.1 is 1.4e-14 in floats: the closed position stayed exposed
    # (and in the curve's value) to the end of the run
    sym = add_instrument(conn, step="0.00001")
    add_bars(conn, sym, flat(100, 10))
    script = Script(tmp_path, {0: [(sym, "buy", {"size": "0.1234567"})],
                               2: [(sym, "buy", {"size": "0.701"})], 4: [(sym, "close", {})]})
    run_id = run(conn, script.config([sym], 10))
    assert [f[:2] for f in fills(conn, run_id)] == [
        ("buy", D("12.34567")), ("buy", D("57.75433")), ("sell", D("70.1"))]
    report = load_report(conn, run_id)
    # held from bar 1's open (filled then) to bar 5's open: exposed at the closes of bars 1-4
    exposed = [r[0] for r in conn.execute(
        "SELECT exposed FROM backtest.equity WHERE run_id = %s ORDER BY ts", (run_id,))]
    assert exposed == [False] + [True] * 4 + [False] * 5
    assert report["metrics"]["exposure_time"] == 0.4


def test_a_spread_given_for_symbol_at_venue_is_charged(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 4))
    script = Script(tmp_path, {0: [(sym, "buy", {"size": "0.5"})]})
    # the symbol as --symbol takes it when a name is on several venues
    run_id = run(conn, script.config([f"{sym}@test"], 4, spread={f"{sym}@TEST": D("0.01")}))
    # bought at bar 1's open 100 + half the spread 0.5
    assert [f[2] for f in fills(conn, run_id)] == [D("100.50")]


# ----------------------------------------------------------------------------- on_timer
TIMER_HOOKS = '''
    def timer_interval(self):
        from datetime import timedelta
        return TIMER

    def on_timer(self, context):
        n = sum(1 for line in open(LOG) if '"timer"' in line) if os.path.exists(LOG) else 0
        with open(LOG, "a") as f:
            f.write(json.dumps({"timer": n, "now": context.now.isoformat(),
                                "symbols": sorted(context.data)}) + "\\n")
        for symbol, action, kw in TIMER_PLAN.get(n, []):
            return self.signal(context, symbol, action, **kw)
        return None

    def on_bar(self, context):'''


def timer_script(folder: Path, interval: str, plan: dict[int, Any]) -> Script:
    script = Script(folder, {})
    path = folder / f"{script.name}.py"
    text = path.read_text().replace("import json\n", "import json\nimport os\n", 1)
    text = text.replace("    def on_bar(self, context):", TIMER_HOOKS, 1)
    path.write_text(f"from datetime import timedelta\nTIMER = {interval}\n"
                    f"TIMER_PLAN = {plan!r}\n" + text)
    return script


def timer_calls(script: Script) -> list[dict[str, Any]]:
    return [c for c in script.calls() if "timer" in c]


def test_on_timer_runs_at_the_first_bar_close_of_each_period_and_its_signals_trade(
        conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 40))  # closes 10:01 .. 10:40
    script = timer_script(tmp_path, "timedelta(minutes=15)",
                          {0: [(sym, "buy", {})], 1: [(sym, "close", {})]})
    run_id = run(conn, script.config([sym], 40))
    # 10:15 and 10:30 begin new quarter hours; the first bar (10:01) has no bar before it
    assert [c["now"] for c in timer_calls(script)] == [
        (T0 + 15 * M).isoformat(), (T0 + 30 * M).isoformat()]
    # after on_bar of the same bar: the bar's on_bar line comes first in the log
    lines = script.calls()
    k = next(i for i, c in enumerate(lines) if "timer" in c)
    assert lines[k - 1]["now"] == lines[k]["now"] and "n" in lines[k - 1]
    # a timer's market order fills at the next bar's open, like one of on_bar's
    assert [(side, ts) for side, _q, _p, _c, ts in fills(conn, run_id)] == [
        ("buy", T0 + 15 * M), ("sell", T0 + 30 * M)]
    assert load_report(conn, run_id)["strategy_errors"] == []


def test_on_timer_runs_once_after_a_gap_of_several_periods(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 10))  # closes 10:01 .. 10:10
    add_bars(conn, sym, flat(100, 10), t0=T0 + 50 * M)  # closes 10:51 .. 11:00
    script = timer_script(tmp_path, "timedelta(minutes=15)", {})
    run(conn, script.config([sym], 60))
    # 10:15, 10:30 and 10:45 passed in the gap: one call, at the first bar after it; then 11:00
    assert [c["now"] for c in timer_calls(script)] == [
        (T0 + 51 * M).isoformat(), (T0 + 60 * M).isoformat()]


def test_the_timer_counts_from_the_last_warm_up_bar(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 20), t0=T0 - 5 * M)  # warm-up closes up to 10:00
    script = timer_script(tmp_path, "timedelta(minutes=1)", {})
    run(conn, script.config([sym], 3))
    # the period's first bar (close 10:01) begins a new minute after the warm-up's 10:00
    assert [c["now"] for c in timer_calls(script)] == [
        (T0 + k * M).isoformat() for k in (1, 2, 3)]


@pytest.mark.parametrize("interval, says", [
    ("5", "timer_interval() returned 5, expected None or a positive timedelta"),
    ("timedelta(0)", "timer_interval() returned datetime.timedelta(0), expected None"),
    ("timedelta(milliseconds=1500)", "expected None or a positive timedelta of whole seconds"),
])
def test_a_malformed_timer_interval_is_a_one_line_error_before_anything_runs(
        conn, tmp_path, interval, says):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 3))
    script = timer_script(tmp_path, interval, {})
    before = counts(conn)
    with pytest.raises(BacktestError) as err:
        run(conn, script.config([sym], 3))
    assert says in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"strategy {script.name}: ")
    assert counts(conn) == before


def test_an_on_timer_that_raises_is_a_strategy_error_and_the_run_goes_on(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 5))
    script = timer_script(tmp_path, "timedelta(minutes=1)", {})
    path = tmp_path / f"{script.name}.py"
    path.write_text(path.read_text().replace(
        "    def on_timer(self, context):\n",
        "    def on_timer(self, context):\n        raise KeyError('no quote')\n", 1))
    run_id = run(conn, script.config([sym], 5))
    report = load_report(conn, run_id)
    assert report["run"]["status"] == "finished"
    assert len([e for e in report["strategy_errors"] if "KeyError" in e]) == 4, report
    assert len(script.calls()) == 5  # every on_bar still ran


# ----------------------------------------------------------------------------- news
NEWS_HOOK = '''
    def on_news_sentiment(self, event):
        with open(LOG, "a") as f:
            f.write(json.dumps({"news": event.headline, "symbol": event.symbol,
                                "score": event.score, "ts": event.ts.isoformat()}) + "\\n")
        if event.score < -0.5:
            raise RuntimeError("panic")

    def on_bar(self, context):'''


def add_news(conn: psycopg.Connection, symbol: str | None, ts: datetime, score: str,
             headline: str) -> None:
    conn.execute("INSERT INTO market.news_sentiment (ts, instrument_id, score, source, headline)"
                 " VALUES (%s, (SELECT instrument_id FROM market.instruments WHERE symbol = %s),"
                 " %s, 'test', %s)", (ts, symbol, score, headline))


def test_news_is_told_before_the_on_bar_of_the_first_bar_closing_at_or_after_it(
        conn, tmp_path):
    sym, other = add_instrument(conn), add_instrument(conn)
    add_bars(conn, sym, flat(100, 5))  # closes 10:01 .. 10:05
    add_news(conn, sym, T0 - M, "0.9", "before the period")
    add_news(conn, sym, T0 + 2 * M + timedelta(seconds=30), "0.4", "mid bar")
    add_news(conn, None, T0 + 3 * M, "-0.1", "market-wide, at a close")
    add_news(conn, other, T0 + 3 * M, "0.2", "another symbol")
    add_news(conn, sym, T0 + 4 * M, "-0.8", "raises")
    add_news(conn, sym, T0 + 10 * M, "0.3", "after the period")
    script = Script(tmp_path, {})
    path = tmp_path / f"{script.name}.py"
    path.write_text(path.read_text().replace("    def on_bar(self, context):", NEWS_HOOK, 1))
    run_id = run(conn, script.config([sym], 5))
    told = [(c.get("news"), c.get("now")) for c in script.calls()]
    assert told == [
        (None, (T0 + M).isoformat()), (None, (T0 + 2 * M).isoformat()),
        ("mid bar", None), ("market-wide, at a close", None), (None, (T0 + 3 * M).isoformat()),
        ("raises", None), (None, (T0 + 4 * M).isoformat()), (None, (T0 + 5 * M).isoformat())]
    symbols = [c["symbol"] for c in script.calls() if "news" in c]
    assert symbols == [sym, None, sym]
    report = load_report(conn, run_id)
    assert report["run"]["status"] == "finished"
    assert [e for e in report["strategy_errors"] if "panic" in e], report


def test_a_strategy_without_a_news_hook_reads_no_news(conn, tmp_path):
    sym = add_instrument(conn)
    add_bars(conn, sym, flat(100, 3))
    add_news(conn, sym, T0 + M, "0.5", "ignored")
    script = Script(tmp_path, {})
    from workers.backtest.engine import Engine
    engine = Engine(conn, script.config([sym], 3))
    assert engine.news == []


def test_a_bar_closing_after_the_end_is_not_replayed(conn, tmp_path):
    # weekly bars open on Mondays: the one opening Mon 2024-01-29 closes Mon 02-05, after
    # --to 2024-02-01 (exclusive). Its prices are of February: a run to February (and a
    # walk-forward's training span ending where a monthly test window starts) must not see it
    sym = add_instrument(conn)
    inst = scalar(conn, "SELECT instrument_id FROM market.instruments WHERE symbol = %s", sym)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    week = timedelta(weeks=1)
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
            " volume) VALUES (%s, '1w', %s, %s, %s, %s, %s, 1000)",
            [(inst, t0 + k * week, *[100 + 10 * k] * 4) for k in range(6)])
    script = Script(tmp_path, {})
    end = datetime(2024, 2, 1, tzinfo=UTC)
    cfg = BacktestConfig(strategy=script.name, symbols=(sym,), timeframe="1w", start=t0,
                         end=end, strategy_dirs=(script.folder,))
    report = load_report(conn, run(conn, cfg))
    # the strategy is called at the closes Jan 8, 15, 22 and 29, never on Feb 5
    assert [c["now"] for c in script.calls()] == [
        (t0 + k * week).isoformat() for k in range(1, 5)]
    assert report["equity"]["ts"][-1] == (t0 + 4 * week).isoformat()
    assert report["run"]["bars"] == 4
    # bought and held from the first open 100 to the last close by the end, 130
    assert report["metrics"]["buy_and_hold_return"] == pytest.approx(0.3)
    # a period in which no bar closes is refused, not run on the straddling bar
    short = BacktestConfig(strategy=script.name, symbols=(sym,), timeframe="1w",
                           start=t0 + 4 * week, end=end, strategy_dirs=(script.folder,))
    with pytest.raises(BacktestError, match="closes by 2024-02-01"):
        run(conn, short)
