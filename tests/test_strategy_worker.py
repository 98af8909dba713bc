"""The strategy worker (workers/runtime/strategies.py) against a real database.

Each test drives a StrategyWorker in-process: bars are inserted as the owner (the bars
trigger NOTIFYs `mmats_bars` at commit), `step()` picks them up, and the assertions read
trading.signals, trading.orders, runtime.cursors and runtime.errors. User strategies are
written into a tmp folder, as a user would (see tests/test_strategies_loader.py).

Bars are one minute long and start at T0 + i minutes; bars 0..4 exist before a worker
starts (the history a new assignment does not replay), new bars are 5, 6, ...
"""

from __future__ import annotations

import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from workers.backtest.data import to_us
from workers.runtime.config import AccountConfig, RuntimeConfig, StrategyConfig
from workers.runtime.strategies import SeriesCache, StrategyWorker
from workers.runtime.supervisor import apply_config

T0 = datetime(2024, 1, 2, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
ONE_US = timedelta(microseconds=1)
HISTORY = range(5)  # bars stored before any worker starts


def ts(i: int) -> datetime:
    return T0 + i * MINUTE


def close_of(i: int) -> datetime:
    return ts(i) + MINUTE


# ---------------------------------------------------------------------------- strategies
STRATEGY = '''
from decimal import Decimal

from strategies.base import IStrategy


class Generated(IStrategy):
    name = "@NAME@"
    version = "@VERSION@"

    def __init__(self, params=None):
        super().__init__(params)
        self.calls = []

    def get_required_indicators(self):
        return @INDICATORS@

    def on_bar(self, context):
        seen = {}
        for s, md in context.data.items():
            hist = md.history["close"]
            seen[s] = {"len": len(md), "hist_len": len(hist), "bar_ts": md.bar.ts,
                       "close": md.bar.close, "hist_last": float(hist[-1]),
                       "ind": {k: md[k] for k in @INDICATORS@}}
        self.calls.append((context.now, seen))
@BODY@
'''

BUY_ALL = """
        return [self.signal(context, s, "buy", size=0.1, reasoning="@SAYS@")
                for s in sorted(context.data)]
"""


def write_strategy(folder: Path, name: str, body: str = BUY_ALL, *, says: str = "v1",
                   version: str = "1", indicators: Iterable[str] = (),
                   filename: str | None = None) -> Path:
    text = (STRATEGY.replace("@BODY@", textwrap.indent(textwrap.dedent(body).strip("\n"),
                                                          " " * 8))
            .replace("@NAME@", name).replace("@VERSION@", version)
            .replace("@INDICATORS@", repr(list(indicators))).replace("@SAYS@", says))
    path = folder / (filename or f"{name}.py")
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- database helpers
def scalar(conn: psycopg.Connection, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def add_instrument(conn: psycopg.Connection, symbol: str, venue: str = "binance") -> int:
    return scalar(conn, """
        INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,
                                        price_tick, quantity_step, min_quantity, calendar_id)
        VALUES (%s, %s, 'crypto', %s, 'USD', 0.01, 0.01, 0, 'CRYPTO_24X7')
        RETURNING instrument_id""", symbol, venue, symbol[:3])


def add_bars(conn: psycopg.Connection, bars: Iterable[tuple[int, int, str]]) -> None:
    """(instrument, i, close) rows, in ONE statement (one transaction, one NOTIFY each)."""
    rows = list(bars)
    values = ", ".join(["(%s, '1m', %s, %s, %s, %s, %s, 1)"] * len(rows))
    args: list[Any] = []
    for iid, i, close in rows:
        args += [iid, ts(i), close, close, close, close]
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 f" volume) VALUES {values}", args)


def signals(conn: psycopg.Connection, account: str, strategy: str | None = None,
            ) -> list[dict[str, Any]]:
    cur = conn.execute("""
        SELECT g.signal_id, g.ts, g.action::text, g.status::text, g.reasoning, i.symbol,
               s.name AS strategy, s.version, g.strategy_id, g.instrument_id
        FROM trading.signals g JOIN trading.accounts a USING (account_id)
        JOIN trading.strategies s USING (strategy_id)
        JOIN market.instruments i USING (instrument_id)
        WHERE a.name = %s AND (%s::text IS NULL OR s.name = %s)
        ORDER BY g.signal_id""", (account, strategy, strategy))
    assert cur.description is not None
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def errors(conn: psycopg.Connection, kind: str | None = None) -> list[dict[str, Any]]:
    cur = conn.execute("SELECT error_id, worker, kind, message, account_id FROM runtime.errors "
                       "WHERE %s::text IS NULL OR kind = %s ORDER BY error_id", (kind, kind))
    assert cur.description is not None
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def cursor_at(conn: psycopg.Connection, name: str) -> datetime | None:
    row = conn.execute("SELECT at FROM runtime.cursors WHERE name = %s", (name,)).fetchone()
    return None if row is None else row[0]


def account_id(conn: psycopg.Connection, name: str) -> int:
    return scalar(conn, "SELECT account_id FROM trading.accounts WHERE name = %s", name)


def setup(conn: psycopg.Connection, folder: Path, accounts: Iterable[AccountConfig],
          strategies: Iterable[StrategyConfig]) -> None:
    apply_config(conn, RuntimeConfig(accounts=tuple(accounts), strategies=tuple(strategies),
                                     strategy_dirs=(folder,)))


def paper(name: str, mode: str = "advisory") -> AccountConfig:
    return AccountConfig(name=name, environment="paper", mode=mode)


def entry(account: str, name: str, *symbols: str) -> StrategyConfig:
    return StrategyConfig(account=account, name=name, symbols=symbols or ("BTCUSD",),
                          timeframe="1m")


def pump(w: StrategyWorker, until: Callable[[], bool] | None = None,
         timeout: float = 5.0) -> None:
    """Step once, then until `until()` holds (or `timeout` passes); without `until`,
    until the worker has been quiet for a moment (a notification may come late on a
    busy machine)."""
    deadline = time.monotonic() + timeout
    w.step()
    if until is None:
        last, quiet_since = dict(w.counts), time.monotonic()
        while time.monotonic() - quiet_since < 0.15 and time.monotonic() < deadline:
            w.step()
            if w.counts != last:
                last, quiet_since = dict(w.counts), time.monotonic()
        return
    while not until() and time.monotonic() < deadline:
        w.step()
    assert until(), "the worker did not get there in time"


def strategy_of(w: StrategyWorker, cursor: str) -> Any:
    return next(a.strategy for a in w.assignments if a.cursor == cursor)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def owner(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def btc(owner: psycopg.Connection) -> int:
    iid = add_instrument(owner, "BTCUSD")
    add_bars(owner, [(iid, i, str(100 + i)) for i in HISTORY])
    return iid


@pytest.fixture
def eth(owner: psycopg.Connection) -> int:
    iid = add_instrument(owner, "ETHUSD")
    add_bars(owner, [(iid, i, str(50 + i)) for i in HISTORY])
    return iid


@pytest.fixture
def workers() -> Iterator[list[StrategyWorker]]:
    """Every worker a test makes, closed at the end whatever happens."""
    made: list[StrategyWorker] = []
    yield made
    for w in made:
        w.close()


@pytest.fixture
def make_worker(db_url: str, tmp_path: Path, workers: list[StrategyWorker],
                ) -> Callable[..., StrategyWorker]:
    def make(configs: Iterable[StrategyConfig], **options: Any) -> StrategyWorker:
        options.setdefault("poll_ms", 20)
        options.setdefault("paper_wait_seconds", 0.05)
        options.setdefault("reload_seconds", 3600.0)
        options.setdefault("bar_grace_seconds", 0.3)
        w = StrategyWorker(db_url, list(configs), strategy_dirs=[tmp_path], **options)
        workers.append(w)
        w.start()
        return w
    return make


# ---------------------------------------------------------------------------- 1. new bars only
def test_only_new_bars_reach_the_strategy_once_each_in_time_order(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder", "BTCUSD", "ETHUSD")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg])
    cursor = "strategy:adv:recorder:1m"
    # a new assignment starts after the last stored bar: the history is not replayed
    assert cursor_at(owner, cursor) == ts(4)
    pump(w)
    assert strategy_of(w, cursor).calls == []

    # ETH has no bar at 6; the rows come in one statement, out of time order
    add_bars(owner, [(btc, 7, "107"), (eth, 5, "55"), (btc, 5, "105"), (btc, 6, "106"),
                     (eth, 7, "57")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(7))
    calls = strategy_of(w, cursor).calls
    assert [(now, sorted(seen)) for now, seen in calls] == [
        (close_of(5), ["BTCUSD", "ETHUSD"]),
        (close_of(6), ["BTCUSD"]),
        (close_of(7), ["BTCUSD", "ETHUSD"]),
    ]
    assert calls[1][1]["BTCUSD"]["close"] == Decimal("106")
    assert calls[2][1]["ETHUSD"]["bar_ts"] == ts(7)

    # nothing new: no call; a bar backfilled before the cursor: no call either
    add_bars(owner, [(btc, -3, "97")])
    pump(w)
    pump(w)
    assert len(strategy_of(w, cursor).calls) == 3
    add_bars(owner, [(eth, 8, "58")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(8))
    pump(w)
    calls = strategy_of(w, cursor).calls
    assert [(now, sorted(seen)) for now, seen in calls[3:]] == [(close_of(8), ["ETHUSD"])]
    got = [(g["symbol"], g["ts"]) for g in signals(owner, "adv")]
    assert got == [("BTCUSD", close_of(5) - ONE_US), ("ETHUSD", close_of(5) - ONE_US),
                   ("BTCUSD", close_of(6) - ONE_US), ("BTCUSD", close_of(7) - ONE_US),
                   ("ETHUSD", close_of(7) - ONE_US), ("ETHUSD", close_of(8) - ONE_US)]
    assert w.counts["signals"] == 6


# ---------------------------------------------------------------------------- 2. the signal row
def test_advisory_signal_row(owner: psycopg.Connection, tmp_path: Path, btc: int,
                             make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder", says="because")
    cfg = entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg])
    add_bars(owner, [(btc, 5, "4321.123456789012345")])
    pump(w, lambda: len(signals(owner, "adv")) == 1)
    (g,) = signals(owner, "adv")
    assert g["ts"] == close_of(5) - ONE_US
    assert (g["action"], g["status"], g["symbol"], g["reasoning"]) == (
        "buy", "advisory", "BTCUSD", "because")
    assert (g["strategy"], g["version"]) == ("recorder", "1")
    assert g["instrument_id"] == btc
    assert scalar(owner, "SELECT count(*) FROM trading.orders") == 0
    assert scalar(owner, "SELECT count(*) FROM pgmq.q_orders") == 0
    assert cursor_at(owner, "strategy:adv:recorder:1m") == ts(5)
    assert errors(owner) == []


def test_operator_paper_signal_creates_a_queued_order_at_the_exact_close(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    cfg = entry("op", "recorder")
    setup(owner, tmp_path, [paper("op", "operator")], [cfg])
    w = make_worker([cfg])
    close = "4321.123456789012345"  # more digits than a float keeps
    assert str(float(close)) != close
    add_bars(owner, [(btc, 5, close)])
    pump(w, lambda: len(signals(owner, "op")) == 1)
    (g,) = signals(owner, "op")
    assert g["status"] == "approved" and g["ts"] == close_of(5) - ONE_US
    o = owner.execute("SELECT order_id, signal_id, status::text, side::text, reference_price, "
                      "quantity, account_id FROM trading.orders").fetchall()
    assert len(o) == 1
    order_id, signal_id, status, side, reference, quantity, acct = o[0]
    assert (signal_id, status, side, acct) == (g["signal_id"], "created", "buy",
                                               account_id(owner, "op"))
    assert reference == Decimal(close)  # the bar's exact close, not a float's
    # 10000 * 0.1 / 4321.12... = 0.231..., down to the step 0.01
    assert quantity == Decimal("0.23")
    queued = owner.execute("SELECT message FROM pgmq.q_orders").fetchall()
    assert [m[0]["order_id"] for m in queued] == [order_id]
    assert queued[0][0]["environment"] == "paper"


# ---------------------------------------------------------------------------- 3. restarts
LISTENER = """
from strategies.base import IStrategy


class Listener(IStrategy):
    name = "listener"
    version = "1"

    def __init__(self, params=None):
        super().__init__(params)
        self.told = []  # (what, order id), in the order the worker told them

    def get_required_indicators(self):
        return []

    def on_order_filled(self, event):
        self.told.append(("filled", event.order_id))

    def on_bar(self, context):
        self.told.append(("bar", context.now))
        held = "BTCUSD" in context.account.positions
        return [self.signal(context, "BTCUSD", "close" if held else "buy", size=0.1)]
"""


def test_fills_while_no_worker_ran_are_told_before_the_next_bar_and_none_twice(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """A strategy's resume point of events moves with its signals: a fill applied while
    its worker was down is told to the next worker before its first bar; a fill the
    first worker told is not told again."""
    (tmp_path / "listener.py").write_text(LISTENER)
    cfg = entry("op", "listener")
    setup(owner, tmp_path, [paper("op", "operator")], [cfg])
    cursor, paper_cursor = "strategy:op:listener:1m", f"paper:{btc}:1m"

    def bar(w: StrategyWorker, i: int) -> None:
        owner.execute("SELECT runtime.advance_cursor(%s, NULL, %s)", (paper_cursor, ts(i)))
        add_bars(owner, [(btc, i, str(100 + i))])
        pump(w, lambda: cursor_at(owner, cursor) == ts(i))

    def fill(order_id: int, i: int) -> None:
        owner.execute("SELECT trading.apply_fill(%s)", (Jsonb({
            "order_id": order_id, "broker_fill_id": f"b{order_id}", "quantity": str(qty(order_id)),
            "price": str(100 + i), "ts": ts(i).isoformat()}),))

    def qty(order_id: int) -> Decimal:
        return scalar(owner, "SELECT quantity FROM trading.orders WHERE order_id = %s", order_id)

    def orders() -> list[int]:
        return [r[0] for r in owner.execute("SELECT order_id FROM trading.orders "
                                            "ORDER BY order_id").fetchall()]

    first = make_worker([cfg])
    bar(first, 5)                       # buy -> order 1
    (buy,) = orders()
    fill(buy, 6)
    bar(first, 6)                       # told the buy's fill, then closes -> order 2
    _buy, close = orders()
    assert strategy_of(first, cursor).told == [("bar", close_of(5)), ("filled", buy),
                                                ("bar", close_of(6))]
    first.close()
    fill(close, 7)                      # filled while no worker runs

    second = make_worker([cfg])
    bar(second, 7)
    assert strategy_of(second, cursor).told == [("filled", close), ("bar", close_of(7))]
    assert errors(owner) == []


def test_a_restarted_worker_resumes_after_its_cursor(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    a, b = entry("a", "recorder"), entry("b", "recorder")
    setup(owner, tmp_path, [paper("a"), paper("b")], [a, b])
    first = make_worker([a])
    reference = make_worker([b])  # runs without interruption over the same bars
    ca, cb = "strategy:a:recorder:1m", "strategy:b:recorder:1m"

    add_bars(owner, [(btc, 5, "105")])
    pump(first, lambda: cursor_at(owner, ca) == ts(5))
    add_bars(owner, [(btc, 6, "106")])
    pump(first, lambda: cursor_at(owner, ca) == ts(6))
    first.close()
    # bars stored while no worker runs for a
    add_bars(owner, [(btc, 7, "107"), (btc, 8, "108")])
    pump(reference, lambda: cursor_at(owner, cb) == ts(8))

    second = make_worker([a])
    assert second.assignments[0].last == ts(6)
    pump(second, lambda: cursor_at(owner, ca) == ts(8))
    assert [now for now, _seen in strategy_of(second, ca).calls] == [close_of(7), close_of(8)]
    add_bars(owner, [(btc, 9, "109")])
    pump(second, lambda: cursor_at(owner, ca) == ts(9))
    pump(reference, lambda: cursor_at(owner, cb) == ts(9))
    pump(second)

    expected = [close_of(i) - ONE_US for i in range(5, 10)]
    got_a = [g["ts"] for g in signals(owner, "a")]
    got_b = [g["ts"] for g in signals(owner, "b")]
    assert got_a == expected  # none repeated, none skipped
    assert got_b == expected
    assert errors(owner) == []


class Killed(BaseException):
    """A worker process killed at that point: nothing of the open transaction is kept."""


def test_a_worker_killed_inside_a_bar_repeats_nothing_and_skips_nothing(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder", "BTCUSD", "ETHUSD")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    cursor = "strategy:adv:recorder:1m"
    first = make_worker([cfg])
    add_bars(owner, [(btc, 5, "105"), (eth, 5, "55")])
    pump(first, lambda: cursor_at(owner, cursor) == ts(5))

    submit, written = first._submit, []
    def dying(*args: Any) -> None:
        submit(*args)  # the bar's first signal is written, the second never is
        written.append(args[1].symbol)
        raise Killed
    first._submit = dying  # type: ignore[method-assign]
    add_bars(owner, [(btc, 6, "106"), (eth, 6, "56")])
    with pytest.raises(Killed):
        pump(first, lambda: False, timeout=5.0)  # steps until it dies inside the bar
    first.close()
    assert written == ["BTCUSD"]  # it died inside bar 6's transaction
    assert cursor_at(owner, cursor) == ts(5)
    assert len(signals(owner, "adv")) == 2

    second = make_worker([cfg])
    add_bars(owner, [(btc, 7, "107"), (eth, 7, "57")])
    pump(second, lambda: cursor_at(owner, cursor) == ts(7))
    got = [(g["symbol"], g["ts"]) for g in signals(owner, "adv")]
    assert got == [(s, close_of(i) - ONE_US) for i in (5, 6, 7) for s in ("BTCUSD", "ETHUSD")]


def test_a_refused_signal_rolls_back_the_whole_bar_and_the_worker_goes_on(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    # rogue trades BTCUSD only, but on the bar closing at 666 it also signals ETHUSD
    write_strategy(tmp_path, "rogue", """
        out = [self.signal(context, "BTCUSD", "buy", size=0.1)]
        if context.data["BTCUSD"].bar.close == Decimal("666"):
            out.append(self.signal(context, "ETHUSD", "buy", size=0.1))
        return out
    """)
    write_strategy(tmp_path, "recorder")
    rogue, other = entry("adv", "rogue"), entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [rogue, other])
    w = make_worker([rogue, other])
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: cursor_at(owner, "strategy:adv:recorder:1m") == ts(5))
    add_bars(owner, [(btc, 6, "666")])
    pump(w, lambda: cursor_at(owner, "strategy:adv:recorder:1m") == ts(6))
    add_bars(owner, [(btc, 7, "107")])
    pump(w, lambda: cursor_at(owner, "strategy:adv:recorder:1m") == ts(7))

    # bar 6 of rogue: its BTCUSD signal (submitted first) was rolled back with the refusal
    assert [g["ts"] for g in signals(owner, "adv", "rogue")] == [
        close_of(5) - ONE_US, close_of(7) - ONE_US]
    assert [g["ts"] for g in signals(owner, "adv", "recorder")] == [
        close_of(i) - ONE_US for i in (5, 6, 7)]
    (failed,) = errors(owner, "SIGNAL_FAILED")
    assert "rogue on adv" in failed["message"] and "'ETHUSD'" in failed["message"]
    assert "not one of its symbols" in failed["message"]
    assert failed["account_id"] == account_id(owner, "adv")
    assert failed["worker"] == "strategies"
    # the failed bar is behind the strategy: it is not retried on the next bars
    assert cursor_at(owner, "strategy:adv:rogue:1m") == ts(7)
    assert errors(owner, "STRATEGY_ERROR") == []


def test_a_resumed_entry_after_more_bars_than_the_cache_holds_skips_no_bar(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """20 bars stored while no worker ran, a cache of 6 (a worker down for ~42 hours on
    1m bars with the default 2,000): the cache drops no bar the entry has not run, the
    worker catches up in chunks of the cache's size, every bar reaches the strategy once,
    in order, with its warm-up and nothing after it."""
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    cursor = "strategy:adv:recorder:1m"
    make_worker([cfg]).close()
    assert cursor_at(owner, cursor) == ts(4)
    add_bars(owner, [(btc, i, str(100 + i)) for i in range(5, 25)])

    w = make_worker([cfg], history_bars=6)
    cache = w.caches[(btc, "1m")]
    assert cache.limit == 6
    pump(w, lambda: cursor_at(owner, cursor) == ts(24))
    assert [g["ts"] for g in signals(owner, "adv")] == [close_of(i) - ONE_US
                                                         for i in range(5, 25)]
    calls = strategy_of(w, cursor).calls
    assert [now for now, _seen in calls] == [close_of(i) for i in range(5, 25)]
    for now, seen in calls:
        i = int((now - MINUTE - T0) / MINUTE)
        md = seen["BTCUSD"]
        assert md["bar_ts"] == ts(i) and md["hist_last"] == 100 + i  # nothing after i
        assert md["len"] >= min(i + 1, 6)  # and the cache's bars before it
    assert len(cache.bars) <= 6 + 6 // 4 + 6  # read and dropped in chunks: memory bounded
    assert w.counts["bars"] == 20
    assert errors(owner) == []


def test_a_resumed_entry_sharing_a_cache_with_a_new_one_skips_no_bar(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """A new entry listed first shares its cache with an entry resuming 10 bars back: the
    cache is loaded from the oldest resume point of the entries reading it."""
    write_strategy(tmp_path, "echo")
    write_strategy(tmp_path, "recorder")
    new, old = entry("adv", "echo"), entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [new, old])
    cursor = "strategy:adv:recorder:1m"
    make_worker([old]).close()
    assert cursor_at(owner, cursor) == ts(4)
    add_bars(owner, [(btc, i, str(100 + i)) for i in range(5, 15)])  # stored while down

    w = make_worker([new, old], history_bars=3)
    pump(w, lambda: cursor_at(owner, cursor) == ts(14))
    assert [g["ts"] for g in signals(owner, "adv", "recorder")] == [
        close_of(i) - ONE_US for i in range(5, 15)]
    assert [now for now, _seen in strategy_of(w, cursor).calls] == [
        close_of(i) for i in range(5, 15)]
    assert signals(owner, "adv", "echo") == []  # new: it starts with the next bar
    add_bars(owner, [(btc, 15, "115")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(15))
    assert [g["ts"] for g in signals(owner, "adv", "echo")] == [close_of(15) - ONE_US]
    assert errors(owner) == []


def test_a_catch_up_in_chunks_keeps_the_bars_of_one_time_together_and_waits_for_none(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """Two symbols caught up in chunks: each chunk takes every bar closing up to the
    chunk's end, so a time is never split; ETH's gap at 9..12 across a chunk's end is a
    gap (its next bar is stored, only not read yet), not a bar to wait for."""
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder", "BTCUSD", "ETHUSD")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    cursor = "strategy:adv:recorder:1m"
    make_worker([cfg]).close()
    gap = range(9, 13)
    add_bars(owner, [(btc, i, str(100 + i)) for i in range(5, 25)]
             + [(eth, i, str(50 + i)) for i in range(5, 25) if i not in gap])

    w = make_worker([cfg], history_bars=6, bar_grace_seconds=30.0)
    pump(w, lambda: cursor_at(owner, cursor) == ts(24), timeout=10.0)  # no grace waited
    calls = strategy_of(w, cursor).calls
    assert [(now, sorted(seen)) for now, seen in calls] == [
        (close_of(i), ["BTCUSD"] if i in gap else ["BTCUSD", "ETHUSD"])
        for i in range(5, 25)]
    for now, seen in calls:
        i = int((now - MINUTE - T0) / MINUTE)
        assert seen["BTCUSD"]["hist_last"] == 100 + i
        if i not in gap:
            assert seen["ETHUSD"]["hist_last"] == 50 + i
    assert errors(owner) == []
    assert w.counts.get("late_bars", 0) == 0


# ---------------------------------------------------------------------------- 4. isolation
def test_a_raising_strategy_is_reported_capped_disabled_and_isolated(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "raiser", 'raise RuntimeError("boom at " + str(context.now))')
    write_strategy(tmp_path, "recorder")
    bad, good = entry("adv", "raiser"), entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [bad, good])
    w = make_worker([bad, good])
    for i in range(5, 13):  # 8 bars, one at a time
        add_bars(owner, [(btc, i, str(100 + i))])
        pump(w, lambda i=i: cursor_at(owner, "strategy:adv:recorder:1m") == ts(i))

    raiser = strategy_of(w, "strategy:adv:raiser:1m")
    # the guard disables it after 5 errors in a row: on_bar is not called after that
    assert len(raiser.calls) == 5
    assert w.guard.is_disabled(raiser)
    reported = errors(owner, "STRATEGY_ERROR")
    # the first three, then the one that disabled it: no flood
    assert len(reported) == 4, [e["message"] for e in reported]
    assert "raiser 1: RuntimeError: boom at" in reported[0]["message"]
    assert "(1 in a row)" in reported[0]["message"]
    assert "(5 in a row) -> strategy disabled" in reported[3]["message"]
    assert all(e["account_id"] == account_id(owner, "adv") for e in reported)
    assert w.counts["errors"] == 5
    assert signals(owner, "adv", "raiser") == []
    assert [g["ts"] for g in signals(owner, "adv", "recorder")] == [
        close_of(i) - ONE_US for i in range(5, 13)]
    assert cursor_at(owner, "strategy:adv:raiser:1m") == ts(12)


SLOW_FIRST = """
        import time
        if len(self.calls) == 1:  # the first call only: over its budget
            time.sleep(@SLEEP@)
        return [self.signal(context, s, "buy", size=0.1, reasoning="late" if len(self.calls) == 1
                            else "in time") for s in sorted(context.data)]
"""


def returned(w: StrategyWorker, strategy: Any, timeout: float = 5.0) -> None:
    """Until the strategy's call over its budget has returned."""
    deadline = time.monotonic() + timeout
    while w.guard.busy(strategy) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not w.guard.busy(strategy), "its call did not return"


def beats(owner: psycopg.Connection, name: str = "strategies") -> int:
    row = owner.execute("SELECT beats FROM runtime.workers WHERE name = %s", (name,)).fetchone()
    return 0 if row is None else int(row[0])


def test_a_slow_strategy_does_not_hold_back_another_market(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """Each on_bar call has a time budget: the slow one is skipped for its bar (its late
    signal never submitted, reported, the worker heartbeating while it waits), the other
    market's strategy gets its bar at once, and the slow one gets no bar until its call
    has returned — never two calls of one strategy at a time."""
    write_strategy(tmp_path, "slowpoke", SLOW_FIRST.replace("@SLEEP@", "1.0"))
    write_strategy(tmp_path, "quick")
    slow, fast = entry("adv", "slowpoke", "BTCUSD"), entry("adv2", "quick", "ETHUSD")
    setup(owner, tmp_path, [paper("adv"), paper("adv2")], [slow, fast])
    w = make_worker([slow, fast], strategy_timeout_seconds=0.2, heartbeat_seconds=0.02)
    w.state = "running"  # (as run() sets it once started)
    before = beats(owner)
    started = time.monotonic()
    add_bars(owner, [(btc, 5, "105"), (eth, 5, "55")])
    pump(w, lambda: len(signals(owner, "adv2")) == 1)
    assert time.monotonic() - started < 0.9, "ETHUSD's strategy waited for BTCUSD's"
    assert beats(owner) - before >= 3  # it kept heartbeating while it waited
    assert cursor_at(owner, "strategy:adv:slowpoke:1m") == ts(5)  # skipped for that bar
    (late,) = errors(owner, "STRATEGY_ERROR")
    assert late["message"] == ("slowpoke 1: StrategyTimeout: on_bar took longer than its "
                               "0.2 s budget: bar skipped (1 in a row)")
    assert late["account_id"] == account_id(owner, "adv")

    add_bars(owner, [(btc, 6, "106"), (eth, 6, "56")])  # slowpoke still runs bar 5
    pump(w, lambda: len(signals(owner, "adv2")) == 2)
    assert time.monotonic() - started < 0.9
    slowpoke = strategy_of(w, "strategy:adv:slowpoke:1m")
    assert [now for now, _seen in slowpoke.calls] == [close_of(5)]  # not called again
    busy = errors(owner, "STRATEGY_ERROR")[1]["message"]
    assert "still running from a call over its 0.2 s budget" in busy, busy
    assert "(2 in a row)" in busy

    returned(w, slowpoke)  # its call of bar 5 returns
    add_bars(owner, [(btc, 7, "107"), (eth, 7, "57")])
    pump(w, lambda: len(signals(owner, "adv")) == 1)
    assert [now for now, _seen in slowpoke.calls] == [close_of(5), close_of(7)]
    # its late signal of bar 5 is dropped; bar 7 is in time
    assert [(g["ts"], g["reasoning"]) for g in signals(owner, "adv")] == [
        (close_of(7) - ONE_US, "in time")]
    assert [g["ts"] for g in signals(owner, "adv2")] == [close_of(i) - ONE_US
                                                          for i in (5, 6, 7)]
    assert not w.guard.is_disabled(slowpoke) and w.counts["errors"] == 2


def test_a_strategy_over_its_budget_bar_after_bar_is_disabled(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """Calls over the budget, and bars skipped while the last one still runs, count as
    errors toward the disable after 5 in a row; no call ever overlaps another; a call
    over its budget can no longer read the ledger through the worker's session."""
    write_strategy(tmp_path, "stuck", """
        import time
        self.overlaps = getattr(self, "overlaps", 0) + getattr(self, "active", 0)
        self.active = 1
        try:
            time.sleep(0.25)
            self.reads = getattr(self, "reads", [])
            try:
                self.reads.append(context.account.cash)
            except RuntimeError as exc:
                self.reads.append(str(exc))
        finally:
            self.active = 0
        return [self.signal(context, "BTCUSD", "buy", size=0.1)]
    """)
    write_strategy(tmp_path, "recorder")
    bad, good = entry("adv", "stuck"), entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [bad, good])
    w = make_worker([bad, good], strategy_timeout_seconds=0.1)

    def ran(i: int) -> bool:
        return cursor_at(owner, "strategy:adv:recorder:1m") == ts(i)

    for i in range(5, 12):
        add_bars(owner, [(btc, i, str(100 + i))])
        pump(w, partial(ran, i))
    stuck = strategy_of(w, "strategy:adv:stuck:1m")
    assert w.guard.is_disabled(stuck)
    reported = [e["message"] for e in errors(owner, "STRATEGY_ERROR")]
    assert len(reported) == 4, reported  # the first three, then the one that disabled it
    assert all("StrategyTimeout" in m for m in reported)
    assert "(5 in a row) -> strategy disabled" in reported[3]
    returned(w, stuck)  # its last call
    assert stuck.overlaps == 0 and 1 <= len(stuck.calls) <= 5
    assert set(stuck.reads) == {"the bar's time budget is over: the ledger is no longer "
                                "readable from its context"}
    assert signals(owner, "adv", "stuck") == []
    assert cursor_at(owner, "strategy:adv:stuck:1m") == ts(11)
    assert len(signals(owner, "adv", "recorder")) == 7


# ---------------------------------------------------------------------------- 5. hot reload
def test_hot_reload_changes_behaviour_and_a_broken_edit_keeps_the_old_code(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    path = write_strategy(tmp_path, "echo", says="v1")
    cfg = entry("adv", "echo")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg])
    cursor = "strategy:adv:echo:1m"
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(5))

    write_strategy(tmp_path, "echo", says="v2")  # same name, same version
    w._reload()
    add_bars(owner, [(btc, 6, "106")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(6))

    path.write_text(path.read_text() + "\ndef broken(:\n")
    w._reload()
    (failed,) = errors(owner, "STRATEGY_LOAD_FAILED")
    assert str(path.resolve()) in failed["message"] and "syntax error" in failed["message"]
    add_bars(owner, [(btc, 7, "107")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(7))
    w._reload()  # a broken version is reported once
    assert len(errors(owner, "STRATEGY_LOAD_FAILED")) == 1

    assert [(g["ts"], g["reasoning"]) for g in signals(owner, "adv")] == [
        (close_of(5) - ONE_US, "v1"), (close_of(6) - ONE_US, "v2"),
        (close_of(7) - ONE_US, "v2")]
    assert len(w.assignments) == 1


def test_the_worker_reloads_by_itself_every_reload_seconds(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "echo", says="before")
    cfg = entry("adv", "echo")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg], reload_seconds=0.0)
    write_strategy(tmp_path, "echo", says="after")
    pump(w)  # no bar: only the reload
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: len(signals(owner, "adv")) == 1)
    assert [g["reasoning"] for g in signals(owner, "adv")] == ["after"]


# ---------------------------------------------------------------------------- 6. bad entries
def test_bad_configuration_entries_are_reported_and_the_others_run(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    good = entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [good])
    owner.execute("SELECT trading.create_account('bt', 'backtest', 'advisory', 10000)")
    owner.execute("SELECT trading.assign_strategy('bt', 'recorder')")
    bad = [entry("nobody", "recorder"), entry("adv", "recorder", "NOPE"),
           entry("bt", "recorder"), entry("adv", "no_such_strategy")]
    w = make_worker([*bad[:2], good, *bad[2:]])
    assert [a.account for a in w.assignments] == ["adv"]
    found = {e["message"]: e["account_id"] for e in errors(owner, "STRATEGY_SETUP_FAILED")
             if "nobody" not in e["message"]}  # (that one: its own test below)
    adv = account_id(owner, "adv")
    assert found == {
        "recorder on adv: symbol 'NOPE': unknown": adv,
        "recorder on bt: account bt is a backtest account": account_id(owner, "bt"),
        "no_such_strategy on adv: no strategy named 'no_such_strategy' (known: "
        "donchian_breakout, momentum_rotation, recorder, rsi_mean_reversion, "
        "sma_crossover)": adv,
    }
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: len(signals(owner, "adv")) == 1)
    assert signals(owner, "bt") == []
    assert cursor_at(owner, "strategy:bt:recorder:1m") is None


def test_an_entry_on_an_unknown_account_is_recorded(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    make_worker([entry("nobody", "recorder")])
    messages = [e["message"] for e in errors(owner, "STRATEGY_SETUP_FAILED")]
    assert messages == ["recorder on nobody: account 'nobody' does not exist (`mmats run` "
                        "creates the configured accounts)"]


# ---------------------------------------------------------------------------- 7. no look-ahead
def test_no_bar_after_t_is_visible_at_t_even_when_catching_up(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder", indicators=["SMA_3"])
    cfg = entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    cursor = "strategy:adv:recorder:1m"
    make_worker([cfg]).close()  # the assignment's cursor: after bar 4
    assert cursor_at(owner, cursor) == ts(4)
    closes = {i: Decimal(100 + i) + Decimal("0.25") * (i % 3) for i in range(5, 12)}
    add_bars(owner, [(btc, i, str(c)) for i, c in closes.items()])  # all stored at once

    w = make_worker([cfg])
    pump(w, lambda: cursor_at(owner, cursor) == ts(11))
    calls = strategy_of(w, cursor).calls
    assert [now for now, _seen in calls] == [close_of(i) for i in range(5, 12)]
    every = {i: Decimal(100 + i) for i in HISTORY} | closes
    for now, seen in calls:
        i = int((now - MINUTE - T0) / MINUTE)
        md = seen["BTCUSD"]
        assert md["bar_ts"] == ts(i) and md["close"] == closes[i]
        assert md["len"] == md["hist_len"] == i + 1  # bars 0..i, nothing after
        assert md["hist_last"] == float(closes[i])
        sma = sum(every[j] for j in (i - 2, i - 1, i)) / 3
        assert md["ind"]["SMA_3"] == pytest.approx(float(sma))


def test_series_cache_keeps_at_most_its_limit_and_stays_consistent(
        owner: psycopg.Connection, btc: int, db_url: str) -> None:
    add_bars(owner, [(btc, i, str(100 + i)) for i in range(5, 40)])
    with psycopg.connect(db_url) as c:
        cache = SeriesCache(btc, "BTCUSD", "1m", limit=8)
        cache.load(c, ts(3), 8)
        assert [b.ts for b in cache.bars] == [ts(i) for i in range(4)]
        assert cache.refresh(c) == 36
        n = len(cache.bars)
        assert 8 <= n <= 10
        assert cache.last == ts(39)
        assert list(cache.ts_us) == [to_us(b.ts) for b in cache.bars]
        assert cache.index(ts(39)) == n - 1 and cache.index(ts(0)) is None
        series = cache.series(())
        assert len(series) == n
        assert list(series.columns["close"]) == [float(b.close) for b in cache.bars]
        assert series.market_data(n - 1).bar.close == Decimal(139)
        assert cache.refresh(c) == 0


def test_series_cache_drops_no_bar_after_the_oldest_resume_point(
        owner: psycopg.Connection, btc: int, db_url: str) -> None:
    """Past its limit a cache drops its oldest bars, but never one after `keep_after` (an
    entry has not run it) nor the `limit` bars before it (its warm-up)."""
    add_bars(owner, [(btc, i, str(100 + i)) for i in range(5, 40)])
    with psycopg.connect(db_url) as c:
        cache = SeriesCache(btc, "BTCUSD", "1m", limit=8)
        cache.load(c, ts(19), 8)
        assert [b.ts for b in cache.bars] == [ts(i) for i in range(12, 20)]
        cache.keep_after = to_us(ts(19))  # the entry ran up to bar 19
        assert cache.refresh(c) == 20
        assert [b.ts for b in cache.bars] == [ts(i) for i in range(12, 40)]
        cache.keep_after = to_us(ts(35))  # it ran up to 35: 28..35 its warm-up
        cache.extend([(ts(40), Decimal(140), Decimal(140), Decimal(140), Decimal(140), 1)])
        assert [b.ts for b in cache.bars] == [ts(i) for i in range(28, 41)]
        assert list(cache.ts_us) == [to_us(b.ts) for b in cache.bars]
        assert list(cache.series(()).columns["close"]) == [float(b.close) for b in cache.bars]
        cache.keep_after = -1  # an entry that has run none of them
        cache.extend([(ts(41), Decimal(141), Decimal(141), Decimal(141), Decimal(141), 1)])
        assert len(cache.bars) == 14


# ---------------------------------------------------------------------------- 8. paper wait
def _paper_operator(owner: psycopg.Connection, tmp_path: Path,
                    make_worker: Callable[..., StrategyWorker], **options: Any,
                    ) -> StrategyWorker:
    write_strategy(tmp_path, "recorder")
    cfg = entry("op", "recorder")
    setup(owner, tmp_path, [paper("op", "operator")], [cfg])
    return make_worker([cfg], **options)


def late(owner: psycopg.Connection, i: int) -> list[dict[str, Any]]:
    return [e for e in errors(owner, "PAPER_BROKER_LATE")
            if f"the bar of {ts(i).isoformat()} " in e["message"]]


def test_paper_wait_gives_up_after_paper_wait_seconds(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    w = _paper_operator(owner, tmp_path, make_worker, paper_wait_seconds=0.3)
    cursor = "strategy:op:recorder:1m"
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(5))
    assert scalar(owner, "SELECT count(*) FROM trading.orders WHERE status = 'created'") == 1

    add_bars(owner, [(btc, 6, "106")])  # an open order and no router: wait, then go on
    start = time.monotonic()
    pump(w, lambda: cursor_at(owner, cursor) == ts(6))
    assert time.monotonic() - start >= 0.3
    (report,) = late(owner, 6)
    assert report["account_id"] == account_id(owner, "op")
    assert "after 0.3 s (is the router running?)" in report["message"]
    calls = strategy_of(w, cursor).calls
    assert [now for now, _seen in calls] == [close_of(5), close_of(6)]


def test_no_paper_wait_when_the_paper_cursor_covers_the_bar(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    w = _paper_operator(owner, tmp_path, make_worker, paper_wait_seconds=3.0)
    cursor, paper_cursor = "strategy:op:recorder:1m", f"paper:{btc}:1m"
    owner.execute("SELECT runtime.advance_cursor(%s, NULL, %s)", (paper_cursor, ts(5)))
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(5))
    assert scalar(owner, "SELECT count(*) FROM trading.orders WHERE status = 'created'") == 1

    # the paper broker has settled bar 6 already: no wait
    owner.execute("SELECT runtime.advance_cursor(%s, NULL, %s)", (paper_cursor, ts(6)))
    add_bars(owner, [(btc, 6, "106")])
    start = time.monotonic()
    pump(w, lambda: cursor_at(owner, cursor) == ts(6))
    assert time.monotonic() - start < 1.0

    # bar 7: the paper broker settles it while the worker waits; the wait ends then
    add_bars(owner, [(btc, 7, "107")])
    timer = threading.Timer(0.3, lambda: owner.execute(
        "SELECT runtime.advance_cursor(%s, NULL, %s)", (paper_cursor, ts(7))))
    start = time.monotonic()
    timer.start()
    try:
        pump(w, lambda: cursor_at(owner, cursor) == ts(7))
    finally:
        timer.join()
    assert 0.25 <= time.monotonic() - start < 2.5
    assert errors(owner, "PAPER_BROKER_LATE") == []
    assert len(strategy_of(w, cursor).calls) == 3


def test_an_advisory_paper_account_never_waits(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg], paper_wait_seconds=3.0)
    add_bars(owner, [(btc, i, str(100 + i)) for i in (5, 6, 7)])
    start = time.monotonic()
    pump(w, lambda: cursor_at(owner, "strategy:adv:recorder:1m") == ts(7))
    assert time.monotonic() - start < 1.5
    assert errors(owner, "PAPER_BROKER_LATE") == []
    assert len(signals(owner, "adv")) == 3


def test_paper_wait_for_an_instrument_whose_first_bars_came_after_the_start(
        owner: psycopg.Connection, tmp_path: Path,
        make_worker: Callable[..., StrategyWorker]) -> None:
    iid = add_instrument(owner, "BTCUSD")  # no bars yet
    w = _paper_operator(owner, tmp_path, make_worker, paper_wait_seconds=0.2)
    cursor = "strategy:op:recorder:1m"
    add_bars(owner, [(iid, 5, "105")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(5))
    assert scalar(owner, "SELECT count(*) FROM trading.orders WHERE status = 'created'") == 1
    add_bars(owner, [(iid, 6, "106")])  # an open order, no router
    pump(w, lambda: cursor_at(owner, cursor) == ts(6))
    assert len(late(owner, 6)) == 1


# ---------------------------------------------------------------------------- 9. the role
def test_the_worker_session_is_the_strategy_role(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg])
    assert w.conn is not None and w.listen is not None
    assert scalar(w.conn, "SELECT current_user") == "mmats_strategy"
    assert scalar(w.listen, "SELECT current_user") == "mmats_strategy"
    w.conn.rollback()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        w.conn.execute(
            "INSERT INTO trading.orders (account_id, instrument_id, client_order_id, side, "
            "order_type, quantity) VALUES (%s, %s, 'x1', 'buy', 'market', 1)",
            (account_id(owner, "adv"), btc))
    w.conn.rollback()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        w.conn.execute("UPDATE runtime.cursors SET at = now()")
    w.conn.rollback()
    # and it still works after the refusals
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: len(signals(owner, "adv")) == 1)
    assert scalar(owner, "SELECT count(*) FROM trading.orders") == 0


# ---------------------------------------------------------------------------- the account
def test_the_strategy_sees_the_ledger_and_only_its_own_positions(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "acct", """
        a = context.account
        self.calls.append(("account", a.cash, a.equity, a.currency, dict(a.positions)))
        return None
    """)
    write_strategy(tmp_path, "other")
    cfg = entry("op", "acct")
    setup(owner, tmp_path, [paper("op", "operator")], [cfg, entry("op", "other")])
    bought = {}
    for strategy, size, fill_id in (("acct", "0.5", "f1"), ("other", "0.2", "f2")):
        answer = scalar(owner, "SELECT trading.submit_signal(%s)", Jsonb({
            "account": "op", "strategy": strategy, "version": "1", "symbol": "BTCUSD",
            "action": "buy", "size": size, "ts": (close_of(4) - ONE_US).isoformat()}))
        assert answer["status"] == "approved", answer
        scalar(owner, "SELECT trading.apply_fill(%s)", Jsonb({
            "order_id": answer["order_id"], "broker_fill_id": fill_id,
            "quantity": str(answer["quantity"]), "price": "104",
            "ts": close_of(4).isoformat()}))
        bought[strategy] = Decimal(str(answer["quantity"]))
    # the paper broker is ahead: no wait
    owner.execute("SELECT runtime.advance_cursor(%s, NULL, %s)", (f"paper:{btc}:1m", ts(9)))
    w = make_worker([cfg])
    add_bars(owner, [(btc, 5, "110")])
    pump(w, lambda: cursor_at(owner, "strategy:op:acct:1m") == ts(5))
    assert errors(owner) == []
    seen = [c for c in strategy_of(w, "strategy:op:acct:1m").calls if c[0] == "account"]
    assert len(seen) == 1
    _tag, cash, equity, currency, positions = seen[0]
    ledger_cash, ledger_equity = owner.execute(
        "SELECT cash, equity FROM trading.account_equity(%s)",
        (account_id(owner, "op"),)).fetchone() or (None, None)
    assert (cash, equity, currency) == (ledger_cash, ledger_equity, "USD")
    assert cash < Decimal(10000)
    # the acct strategy's position only: the other strategy's is not its business
    assert list(positions) == ["BTCUSD"]
    assert bought["acct"] != bought["other"]
    assert positions["BTCUSD"].quantity == bought["acct"]
    assert positions["BTCUSD"].average_price == Decimal("104")


# ---------------------------------------------------------------------------- known bugs
def test_a_reloaded_strategy_gets_the_indicators_it_now_asks_for(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "echo", says="v1")
    cfg = entry("adv", "echo")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg])
    write_strategy(tmp_path, "echo", says="v2", indicators=["SMA_3"])
    w._reload()
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: cursor_at(owner, "strategy:adv:echo:1m") == ts(5))
    assert errors(owner, "STRATEGY_ERROR") == []
    assert [g["reasoning"] for g in signals(owner, "adv")] == ["v2"]


def test_a_new_assignment_next_to_a_resumed_one_starts_with_the_next_bar(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    write_strategy(tmp_path, "recorder")
    write_strategy(tmp_path, "echo")
    old, new = entry("adv", "recorder"), entry("adv", "echo")
    setup(owner, tmp_path, [paper("adv")], [old, new])
    make_worker([old]).close()  # recorder's cursor: bar 4
    add_bars(owner, [(btc, 5, "105"), (btc, 6, "106")])  # stored while no worker runs
    w = make_worker([old, new])
    pump(w, lambda: cursor_at(owner, "strategy:adv:recorder:1m") == ts(6))
    assert len(signals(owner, "adv", "recorder")) == 2  # catching up: right
    assert signals(owner, "adv", "echo") == []  # new: it starts with the next bar


def test_a_bar_of_the_same_time_arriving_a_moment_later_is_seen_with_the_others(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """Two feeds commit the bars of one minute a moment apart: the entry waits (within
    its grace) and its strategy sees both bars in one call, as a backtest shows them."""
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder", "BTCUSD", "ETHUSD")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg], bar_grace_seconds=30.0)
    cursor = "strategy:adv:recorder:1m"
    add_bars(owner, [(btc, 5, "105")])
    pump(w)
    assert strategy_of(w, cursor).calls == [] and cursor_at(owner, cursor) == ts(4)
    add_bars(owner, [(eth, 5, "55")])  # its feed is a moment slower
    pump(w, lambda: cursor_at(owner, cursor) == ts(5))
    assert [(now, sorted(seen)) for now, seen in strategy_of(w, cursor).calls] == [
        (close_of(5), ["BTCUSD", "ETHUSD"])]
    assert sorted((g["symbol"], g["ts"]) for g in signals(owner, "adv")) == [
        ("BTCUSD", close_of(5) - ONE_US), ("ETHUSD", close_of(5) - ONE_US)]
    assert errors(owner, "BAR_LATE") == []


def test_a_symbol_without_a_bar_holds_the_others_no_longer_than_the_grace(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """No ETH bar at 5 (nothing traded): BTC's bar runs alone once the grace is over;
    ETH, now behind, is not waited for at 6; its bar of 5 arriving after all is
    reported as late (BAR_LATE: the entry had waited for it) and reaches the strategy
    only as history; its bar of 6, also late, is only logged (it was not waited for)."""
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder", "BTCUSD", "ETHUSD")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg], bar_grace_seconds=0.5)
    cursor = "strategy:adv:recorder:1m"
    add_bars(owner, [(btc, 5, "105")])
    started = time.monotonic()
    pump(w, lambda: cursor_at(owner, cursor) == ts(5))
    assert time.monotonic() - started >= 0.5, "it ran before the grace was over"
    add_bars(owner, [(btc, 6, "106")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(6), timeout=0.45)  # no second grace
    assert [(now, sorted(seen)) for now, seen in strategy_of(w, cursor).calls] == [
        (close_of(5), ["BTCUSD"]), (close_of(6), ["BTCUSD"])]
    assert errors(owner, "BAR_LATE") == []
    add_bars(owner, [(eth, 5, "55")])
    pump(w)
    (late,) = errors(owner, "BAR_LATE")
    assert "ETHUSD 1m bar of 2024-01-02T00:05:00+00:00 arrived after" in late["message"]
    assert len(strategy_of(w, cursor).calls) == 2
    add_bars(owner, [(eth, 6, "56")])
    pump(w)
    assert len(errors(owner, "BAR_LATE")) == 1 and w.counts["late_bars"] == 2
    add_bars(owner, [(btc, 7, "107"), (eth, 7, "57")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(7))
    now, seen = strategy_of(w, cursor).calls[-1]
    assert now == close_of(7) and sorted(seen) == ["BTCUSD", "ETHUSD"]
    # ETH's history holds its late bars: 0-7, as BTC's
    assert (seen["ETHUSD"]["hist_len"], seen["BTCUSD"]["hist_len"]) == (8, 8)
    assert [g["symbol"] for g in signals(owner, "adv") if g["ts"] == close_of(5) - ONE_US] == [
        "BTCUSD"]


def test_a_symbol_whose_next_bar_is_already_here_is_not_waited_for(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """ETH's bar of 6 is stored with BTC's of 5: ETH has no bar at 5 (a gap), so 5 runs at
    once; 6 then waits for BTC's bar of 6."""
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder", "BTCUSD", "ETHUSD")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg], bar_grace_seconds=30.0)
    cursor = "strategy:adv:recorder:1m"
    add_bars(owner, [(btc, 5, "105"), (eth, 6, "56")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(5))
    pump(w)
    assert cursor_at(owner, cursor) == ts(5)
    add_bars(owner, [(btc, 6, "106")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(6))
    assert [(now, sorted(seen)) for now, seen in strategy_of(w, cursor).calls] == [
        (close_of(5), ["BTCUSD"]), (close_of(6), ["BTCUSD", "ETHUSD"])]


def test_a_second_entry_of_a_strategy_on_the_same_account_and_timeframe_is_refused(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """One resume point per strategy, account and timeframe: two entries would share it
    (a kill between them would skip bars), so the second is refused, the first runs."""
    write_strategy(tmp_path, "recorder")
    e1, e2 = entry("adv", "recorder", "BTCUSD"), entry("adv", "recorder", "ETHUSD")
    setup(owner, tmp_path, [paper("adv")], [e1])
    w = make_worker([e1, e2])
    assert [a.config for a in w.assignments] == [e1]
    refused = errors(owner, "STRATEGY_SETUP_FAILED")
    assert len(refused) == 1
    assert "a second entry for recorder" in refused[0]["message"]
    add_bars(owner, [(btc, 5, "105"), (eth, 5, "55")])
    pump(w)
    assert sorted(g["symbol"] for g in signals(owner, "adv")) == ["BTCUSD"]


# ---------------------------------------------------------------------------- on_timer
TIMED = """
    def timer_interval(self):
        from datetime import timedelta
        return timedelta(minutes=3)

    def on_timer(self, context):
        self.timers = getattr(self, "timers", []) + [context.now]
        return [self.signal(context, s, "buy", size=0.1, reasoning="timer")
                for s in sorted(context.data)]
"""


def timed_strategy(folder: Path, name: str, methods: str) -> None:
    """A strategy whose on_bar returns nothing, with `methods` added to its class."""
    path = write_strategy(folder, name, "return None")
    path.write_text(path.read_text() + methods)


def test_on_timer_runs_at_the_first_bar_close_of_each_period_across_a_restart(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """As a backtest runs it: after on_bar, at the first bar close of each new 3-minute
    period (00:06, 00:09: T0 is midnight), its signals recorded like on_bar's; the
    schedule goes on from the resume point after a restart, so no period runs twice."""
    timed_strategy(tmp_path, "timed", TIMED)
    cfg = entry("adv", "timed")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    cursor = "strategy:adv:timed:1m"
    w = make_worker([cfg])
    add_bars(owner, [(btc, 5, "105"), (btc, 6, "106")])  # closes 00:06, 00:07
    pump(w, lambda: cursor_at(owner, cursor) == ts(6))
    assert strategy_of(w, cursor).timers == [close_of(5)]
    w.close()
    w2 = make_worker([cfg])
    add_bars(owner, [(btc, 7, "107"), (btc, 8, "108"), (btc, 9, "109")])  # 00:08 .. 00:10
    pump(w2, lambda: cursor_at(owner, cursor) == ts(9))
    assert strategy_of(w2, cursor).timers == [close_of(8)]
    assert [(g["ts"], g["reasoning"], g["status"]) for g in signals(owner, "adv")] == [
        (close_of(5) - ONE_US, "timer", "advisory"), (close_of(8) - ONE_US, "timer", "advisory")]
    assert errors(owner) == []


def test_a_malformed_timer_interval_is_a_configuration_error_naming_the_strategy(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    timed_strategy(tmp_path, "badtimer", TIMED.replace("timedelta(minutes=3)", "'3m'"))
    write_strategy(tmp_path, "quick")
    bad, good = entry("adv", "badtimer"), entry("adv2", "quick")
    setup(owner, tmp_path, [paper("adv"), paper("adv2")], [bad, good])
    w = make_worker([bad, good])
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: len(signals(owner, "adv2")) == 1)
    messages = [e["message"] for e in errors(owner)]
    assert any("strategy badtimer: timer_interval() returned '3m'" in m for m in messages), \
        messages
    assert signals(owner, "adv") == []


# ---------------------------------------------------------------------------- news
NEWS = """
    def on_news_sentiment(self, event):
        self.news = getattr(self, "news", []) + [(event.headline, event.symbol, event.ts,
                                                  len(self.calls))]
"""


def add_news(conn: psycopg.Connection, instrument: int | None, at: datetime,
             headline: str) -> None:
    conn.execute("INSERT INTO market.news_sentiment (ts, instrument_id, score, source, headline)"
                 " VALUES (%s, %s, 0.5, 'test', %s)", (at, instrument, headline))


def test_news_is_told_before_its_bar_once_across_a_restart_and_late_news_next(
        owner: psycopg.Connection, tmp_path: Path, btc: int, eth: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """As a backtest tells it: the news of its symbols and the market's, known by a bar's
    close, before that bar's on_bar; none twice after a restart; a row stored after its
    time's bar ran is told before the next bar."""
    timed_strategy(tmp_path, "reader", NEWS)
    cfg = entry("adv", "reader", "BTCUSD")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    cursor = "strategy:adv:reader:1m"
    add_news(owner, btc, close_of(3), "old news")  # before the resume point (bar 4)
    w = make_worker([cfg])
    add_news(owner, btc, ts(5) + timedelta(seconds=20), "btc in bar 5")
    add_news(owner, None, close_of(5), "market at 5's close")
    add_news(owner, eth, close_of(5), "eth")  # not one of its symbols
    add_news(owner, btc, close_of(7), "btc at 7")
    add_bars(owner, [(btc, 5, "105"), (btc, 6, "106")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(6))
    first = strategy_of(w, cursor)
    # (the last field: on_bar calls before it was told)
    assert first.news == [("btc in bar 5", "BTCUSD", ts(5) + timedelta(seconds=20), 0),
                          ("market at 5's close", None, close_of(5), 0)]
    w.close()
    add_news(owner, btc, close_of(6) - timedelta(seconds=1), "late: bar 6 already ran")
    w2 = make_worker([cfg])
    add_bars(owner, [(btc, 7, "107")])
    pump(w2, lambda: cursor_at(owner, cursor) == ts(7))
    second = strategy_of(w2, cursor)
    assert [(h, n) for h, _s, _t, n in second.news] == [
        ("late: bar 6 already ran", 0), ("btc at 7", 0)]
    assert errors(owner) == []


def test_an_entry_whose_symbol_does_not_exist_yet_starts_once_it_does(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    """On a new database `mmats run` starts the strategy worker beside the ingest worker,
    which creates the instruments: an entry whose symbol is not there yet is tried again
    (it was dropped for the life of the process), reported once, and starts with the next
    bar stored after it resolves."""
    write_strategy(tmp_path, "recorder")
    cfg = entry("adv", "recorder", "SOLUSD")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg], setup_retry_seconds=0.05)
    for _ in range(5):
        pump(w)
    (failed,) = errors(owner, "STRATEGY_SETUP_FAILED")
    assert "symbol 'SOLUSD': unknown" in failed["message"]
    sol = add_instrument(owner, "SOLUSD")
    add_bars(owner, [(sol, 0, "20")])  # stored before the entry resolves: not replayed
    pump(w, lambda: any(a.cursor == "strategy:adv:recorder:1m" for a in w.assignments))
    add_bars(owner, [(sol, 1, "21")])
    pump(w, lambda: len(signals(owner, "adv")) == 1)
    assert [g["ts"] for g in signals(owner, "adv")] == [close_of(1) - ONE_US]
    assert len(errors(owner, "STRATEGY_SETUP_FAILED")) == 1


def test_a_bare_symbol_is_never_a_replay_session_s_copy(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    # every `mmats paper` copies its symbols onto venue replay<N>: a live entry naming
    # BTCUSD failed to start ("on several venues") after the first replay session
    copy = add_instrument(owner, "BTCUSD", "replay1")
    write_strategy(tmp_path, "recorder")
    cfg, named = entry("adv", "recorder"), entry("adv2", "recorder", "BTCUSD@replay1")
    setup(owner, tmp_path, [paper("adv"), paper("adv2")], [cfg, named])
    w = make_worker([cfg, named])
    pump(w, lambda: len(w.assignments) == 2)
    assert errors(owner, "STRATEGY_SETUP_FAILED") == []
    assert {a.cursor: [i[0] for i in a.instruments] for a in w.assignments} == {
        "strategy:adv:recorder:1m": [btc], "strategy:adv2:recorder:1m": [copy]}


def test_hot_reload_of_a_new_version_is_reported_not_silently_ignored(
        owner: psycopg.Connection, tmp_path: Path, btc: int,
        make_worker: Callable[..., StrategyWorker]) -> None:
    # an edit that bumps the version cannot run (that version is not assigned to the
    # account): the old code keeps running, and the worker says so
    write_strategy(tmp_path, "echo", says="v1")
    cfg = entry("adv", "echo")
    setup(owner, tmp_path, [paper("adv")], [cfg])
    w = make_worker([cfg])
    cursor = "strategy:adv:echo:1m"
    add_bars(owner, [(btc, 5, "105")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(5))
    write_strategy(tmp_path, "echo", says="v2", version="2")
    w._reload()
    add_bars(owner, [(btc, 6, "106")])
    pump(w, lambda: cursor_at(owner, cursor) == ts(6))
    assert [g["reasoning"] for g in signals(owner, "adv")] == ["v1", "v1"]
    (failed,) = errors(owner, "STRATEGY_LOAD_FAILED")
    assert "echo" in failed["message"] and "version 2" in failed["message"]
    assert "version 1" in failed["message"]
