"""The strategy worker: wakes on new bars, runs each assigned strategy isolated, and
submits its signals as the strategy role.

Each `[[strategies]]` entry (a strategy, its account, its symbols and timeframe) keeps a
resume point in `runtime.cursors` (`strategy:<account>:<name>:<timeframe>`): the time of
the last bar it has seen. The signals of a bar and the cursor's move are one transaction,
so a worker killed at any moment repeats no signal and skips no bar when it restarts.

Strategies see exactly what a backtest shows them: the bars from the first bar loaded
(warm-up included) up to the bar just closed, indicators computed over that series, the
decision time at the bar's close. A signal is stamped one microsecond before the close,
with the close as its reference price — as the backtest engine stamps it — so the same
bars give the same orders. For a paper account the worker first waits until the paper
broker has settled the bar (the fills at its open), as a backtest fills before it calls
the strategy.

Bars stored while no worker ran are caught up from the oldest resume point of the
entries reading each series, in chunks of the series' history size: however many there
are, no bar is skipped and memory stays bounded. Each on_bar call runs on the strategy's
own thread with a time budget ([runtime] strategy_timeout_seconds): a call over it is
skipped for its bar (whatever it returns later is dropped), reported as a strategy error and counted
toward the disable; the strategy gets no bar, and is told no event, until that call has
returned, so a slow or stuck strategy holds back neither the others nor the heartbeat.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from psycopg.types.json import Jsonb, set_json_loads

from strategies.base import IStrategy, check_timer_interval, timer_due
from strategies.events import NewsSentiment, OrderFilled, OrderRejected
from strategies.indicators import parse_indicator
from strategies.isolation import StrategyGuard
from strategies.loader import StrategyLoader
from strategies.market import (
    AccountState,
    Bar,
    Environment,
    MarketData,
    PositionState,
    StrategyContext,
)
from strategies.series import COLUMNS, BarSeries
from strategies.signal import TradeSignal
from workers.backtest.data import TIMEFRAME_US, from_us, to_us
from workers.runtime import log
from workers.runtime.config import StrategyConfig
from workers.runtime.worker import Worker, connect

_ONE_US = timedelta(microseconds=1)
# each on_bar call's time budget: a call over it is skipped for its bar (its late result
# dropped), reported as a strategy error and counted toward the disable after repeated
# errors; the strategy gets no bar until that call returns. The default of
# [runtime] strategy_timeout_seconds (workers.runtime.config).
STRATEGY_TIMEOUT_SECONDS = 10.0
IDLE = psycopg.pq.TransactionStatus.IDLE
_ACCOUNT = """
SELECT e.cash, e.equity, p.symbols, p.quantities, p.average_prices, p.last_prices
FROM trading.account_equity(%(account)s) e,
     LATERAL (SELECT array_agg(i.symbol ORDER BY p.position_id) AS symbols,
                     array_agg(CASE WHEN p.leg = 'short' THEN -p.quantity ELSE p.quantity END
                               ORDER BY p.position_id) AS quantities,
                     array_agg(p.average_price ORDER BY p.position_id) AS average_prices,
                     array_agg(p.last_price ORDER BY p.position_id) AS last_prices
              FROM trading.positions p JOIN market.instruments i USING (instrument_id)
              WHERE p.account_id = %(account)s AND p.quantity <> 0
                AND (p.strategy_id IS NULL OR p.strategy_id = %(strategy)s)) p
"""
_BARS = """
SELECT ts, open, high, low, close, volume FROM market.bars
WHERE instrument_id = %(instrument)s AND timeframe = %(tf)s AND ts > %(after)s
ORDER BY ts
"""
_HISTORY = """
SELECT ts, open, high, low, close, volume FROM (
    SELECT ts, open, high, low, close, volume FROM market.bars
    WHERE instrument_id = %(instrument)s AND timeframe = %(tf)s AND ts <= %(until)s
    ORDER BY ts DESC LIMIT %(n)s) x
ORDER BY ts
"""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SeriesCache:
    """One instrument's bars of one timeframe, as exact Bars and float columns, grown as
    bars arrive (about `limit` kept: the oldest are dropped in chunks, but never a bar
    after `keep_after` — the oldest resume point of the entries reading the cache — nor
    the `limit` bars before it, their warm-up: no entry loses a bar it has not run)."""

    def __init__(self, instrument_id: int, symbol: str, timeframe: str, limit: int,
                 tick: Decimal | None = None) -> None:
        self.instrument_id = instrument_id
        # prices on the tick become floats as tick counts x tick, exactly as the backtest
        # engine makes them (workers/backtest/data.py): the same bars give the same
        # indicator values to the last bit, so the same signals
        self.tick = tick if tick is not None and tick > 0 else None
        self._tick_f = float(self.tick) if self.tick is not None else 0.0
        self.symbol = symbol
        self.timeframe = timeframe
        self.limit = limit
        self.bars: list[Bar] = []
        # the oldest resume point (microseconds) of the entries reading this cache, set
        # by the worker before each refresh (-1: an entry has run none of them yet);
        # None: no entry pins any bar
        self.keep_after: int | None = None
        # a capped refresh left bars of this series in the database after the last one
        # held (they come with the next chunk): the series is not at its end
        self.ahead = False
        self._ts = np.empty(1024, dtype=np.int64)
        self._cols = np.empty((5, 1024), dtype=np.float64)
        self._n = 0
        self._series: BarSeries | None = None
        self._series_key: tuple[int, int, tuple[str, ...]] | None = None
        # the indicators of every strategy reading this cache: computed together, once
        # per bar, and each strategy shown only its own (as a backtest shows them)
        self.wanted: tuple[str, ...] = ()
        self._views: dict[tuple[str, ...], tuple[dict[str, Any], tuple[str, ...]]] = {}
        self._asked: set[tuple[str, ...]] = set()

    @property
    def ts_us(self) -> npt.NDArray[np.int64]:
        return self._ts[:self._n]

    @property
    def last(self) -> datetime | None:
        return self.bars[-1].ts if self.bars else None

    def load(self, conn: psycopg.Connection, until: datetime, n: int) -> None:
        rows = conn.execute(_HISTORY, {"instrument": self.instrument_id, "tf": self.timeframe,
                                       "until": until, "n": n}).fetchall()
        self._extend(rows)

    def refresh(self, conn: psycopg.Connection) -> int:
        after = self.last or _EPOCH
        rows = conn.execute(_BARS, {"instrument": self.instrument_id, "tf": self.timeframe,
                                    "after": after}).fetchall()
        self._extend(rows)
        return len(rows)

    def extend(self, rows: list[tuple[Any, ...]]) -> None:
        """Append bars newer than the last one held, oldest first."""
        self._extend(rows)

    def _extend(self, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        need = self._n + len(rows)
        if need > self._ts.shape[0]:
            cap = max(need, 2 * self._ts.shape[0])
            ts = np.empty(cap, dtype=np.int64)
            ts[:self._n] = self._ts[:self._n]
            cols = np.empty((5, cap), dtype=np.float64)
            cols[:, :self._n] = self._cols[:, :self._n]
            self._ts, self._cols = ts, cols
        for k, (ts_, o, h, low, c, v) in enumerate(rows, self._n):
            self.bars.append(Bar(ts=ts_, open=o, high=h, low=low, close=c, volume=v))
            self._ts[k] = to_us(ts_)
            self._cols[:, k] = (self._float(o), self._float(h), self._float(low),
                                self._float(c), float(v))
        self._n = need
        chunk = max(self.limit // 4, 1)
        if self._n > self.limit + chunk:
            drop = self._n - self.limit
            if self.keep_after is not None:
                # the first bar an entry has not run yet, and its warm-up, stay
                first = int(np.searchsorted(self._ts[:self._n], self.keep_after, side="right"))
                drop = min(drop, first - self.limit)
            if drop >= chunk:
                self._drop(drop)
        self._series = None

    def _drop(self, drop: int) -> None:
        """The oldest `drop` bars out, into new buffers: the arrays and the list a
        strategy was shown are never written below their length (a strategy still
        running from a bar over its time budget sees no later bar there)."""
        n = self._n - drop
        cap = max(1024, 2 * n)
        ts = np.empty(cap, dtype=np.int64)
        ts[:n] = self._ts[drop:self._n]
        cols = np.empty((5, cap), dtype=np.float64)
        cols[:, :n] = self._cols[:, drop:self._n]
        self._ts, self._cols = ts, cols
        self.bars = self.bars[drop:]
        self._n = n

    def _float(self, price: Decimal) -> float:
        if self.tick is not None:
            ticks = price / self.tick
            if ticks == ticks.to_integral_value():
                return float(int(ticks)) * self._tick_f
        return float(price)

    def index(self, ts: datetime) -> int | None:
        us = to_us(ts)
        i = int(np.searchsorted(self.ts_us, us))
        return i if i < self._n and self._ts[i] == us else None

    def want(self, indicators: Iterable[str]) -> None:
        """Add a strategy's indicators to those computed over this cache."""
        merged = tuple(dict.fromkeys((*self.wanted, *indicators)))
        if merged != self.wanted:
            self.wanted = merged
            self._series = None

    def series(self, indicators: tuple[str, ...] | None = None) -> BarSeries:
        """Indicators over every bar held (never past the last one): `indicators`, or
        every wanted one."""
        names = self.wanted if indicators is None else indicators
        key = (self._n, int(self._ts[self._n - 1]) if self._n else 0, names)
        if self._series is None or self._series_key != key:
            n = self._n
            columns = {name: self._cols[k, :n] for k, name in enumerate(COLUMNS)}
            self._series = BarSeries.from_columns(self.symbol, columns, self.bars.__getitem__,
                                                  names)
            self._series_key = key
            self._views = {}
        return self._series

    def market_data(self, indicators: tuple[str, ...], i: int) -> MarketData:
        """Bar i as a strategy asking for `indicators` sees it: the prices and its own
        indicators only, the values computed once for every strategy of the cache."""
        if indicators not in self._asked:
            self._asked.add(indicators)
            self.want(indicators)
        full = self.series()
        view = self._views.get(indicators)
        if view is None:
            keys = tuple(dict.fromkeys(k for name in indicators
                                       for k in parse_indicator(name).keys))
            columns = {c: full.columns[c] for c in (*COLUMNS, *keys)}
            view = self._views[indicators] = (columns, keys)
        columns, keys = view
        bar_at = self.bars.__getitem__
        return MarketData.at(self.symbol, columns, i, keys, lambda: bar_at(i))


class _Gate:
    """Open while the worker waits for one on_bar call."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


@dataclass
class Assignment:
    """One strategy on one account, its symbols and timeframe, resolved."""

    config: StrategyConfig
    account_id: int
    account: str
    environment: str
    aggregation: str
    currency: str
    strategy: IStrategy
    strategy_id: int
    instruments: list[tuple[int, str, str]]  # (instrument id, symbol, venue)
    cursor: str
    last: datetime | None = None
    indicators: tuple[str, ...] = ()
    errors: int = 0
    paper_tf: dict[int, str] = field(default_factory=dict)  # the paper broker's, once known
    resumed: datetime | None = None  # `last` when this worker took the entry up
    last_fill: int = 0  # the strategy's events told so far (on_order_filled / _rejected)
    last_change: datetime | None = None
    timer: timedelta | None = None  # its timer_interval() (on_timer), checked
    # the news told so far (on_news_sentiment): every row up to `news_at`, and every row
    # stored by then (ids up to `news_seq`); a row stored later is told with the next bar
    news_at: datetime | None = None
    news_seq: int = 0

    @property
    def tf_us(self) -> int:
        return TIMEFRAME_US[self.config.timeframe]

    @property
    def events_cursor(self) -> str:
        """Its resume point of events: seq = the last fill told, at = the last refusal."""
        return "events" + self.cursor[len("strategy"):]

    @property
    def news_cursor(self) -> str:
        """Its resume point of news: at = told up to this time, seq = the last row stored
        by then."""
        return "news" + self.cursor[len("strategy"):]

    @property
    def wants_news(self) -> bool:
        return type(self.strategy).on_news_sentiment is not IStrategy.on_news_sentiment


class StrategyWorker(Worker):
    kind = "strategies"

    def __init__(self, url: str, strategies: Iterable[StrategyConfig], *,
                 strategy_dirs: Iterable[Any] = (), name: str = "strategies",
                 heartbeat_seconds: float = 5.0, history_bars: int = 2000,
                 paper_wait_seconds: float = 15.0, poll_ms: int = 100,
                 bar_grace_seconds: float = 3.0,
                 reload_seconds: float = 2.0,
                 setup_retry_seconds: float = 10.0,
                 strategy_timeout_seconds: float = STRATEGY_TIMEOUT_SECONDS) -> None:
        super().__init__(url, name, heartbeat_seconds=heartbeat_seconds)
        self.configs = list(strategies)
        self.loader = StrategyLoader(list(strategy_dirs))
        self.guard = StrategyGuard()
        if not strategy_timeout_seconds > 0:
            raise ValueError("strategy_timeout_seconds must be > 0, got "
                             f"{strategy_timeout_seconds}")
        self.strategy_timeout_seconds = strategy_timeout_seconds
        # a strategy's on_bar runs on a thread of its own (its time budget): it reads the
        # ledger through the worker's session only while the worker waits for it
        self._ledger_lock = threading.Lock()
        self.history_bars = history_bars
        self.paper_wait_seconds = paper_wait_seconds
        # how long an entry with several symbols waits for a symbol's bar of time t once
        # another symbol's bar of t is here (their feeds may commit a moment apart)
        self.bar_grace_seconds = bar_grace_seconds
        self._grace: dict[tuple[str, int], float] = {}  # (entry, bar time): first seen
        self._given_up: set[tuple[str, int, int]] = set()  # (entry, instrument, bar time)
        self.poll_ms = poll_ms
        self.reload_seconds = reload_seconds
        self.assignments: list[Assignment] = []
        self.caches: dict[tuple[int, str], SeriesCache] = {}
        self.conn: psycopg.Connection | None = None
        self.listen: psycopg.Connection | None = None
        self._dirty: set[tuple[int, str]] = set()
        # caches whose refresh was capped at a chunk (a long catch-up): refreshed again
        # once the chunk's bars have run
        self._backlog: set[tuple[int, str]] = set()
        self._settled: dict[str, datetime] = {}  # paper resume points last seen
        self._last_reload = 0.0
        # entries whose setup failed (an unknown symbol, account or strategy), tried again
        # every setup_retry_seconds; each failure is reported once per message
        self._unresolved: list[StrategyConfig] = []
        self._setup_errors: dict[int, str] = {}
        self._last_setup = time.monotonic()
        self.setup_retry_seconds = setup_retry_seconds
        self.counts = {"bars": 0, "signals": 0, "errors": 0}

    # ------------------------------------------------------------------ life
    def start(self) -> None:
        self.conn = connect(self.url, "mmats_strategy", autocommit=False)
        set_json_loads(partial(json.loads, parse_float=Decimal), self.conn)
        self.listen = connect(self.url, "mmats_strategy")
        self.listen.execute("LISTEN mmats_bars")
        self.listen.execute("LISTEN mmats_cursor")  # the paper broker settled a bar
        report = self.loader.reload_if_changed()
        for error in report.errors:
            self.report("STRATEGY_LOAD_FAILED", str(error))
        seen: set[tuple[str, str, str]] = set()
        for cfg in self.configs:
            key = (cfg.account, cfg.name, cfg.timeframe)
            if key in seen:  # one resume point per strategy, account and timeframe
                self._setup_failed(cfg, ValueError(
                    f"a second entry for {cfg.name} {cfg.timeframe} on {cfg.account}: give "
                    "one entry all its symbols"))
                continue
            try:
                self.assignments.append(self._resolve(cfg))
                seen.add(key)
            except Exception as exc:  # one bad entry must not stop the others
                self._setup_failed(cfg, exc)
                # (tried again: its symbols may be created by the ingest worker, which
                # starts beside this one on a new database, or its account by `mmats run`)
                self._unresolved.append(cfg)
        self._load_caches()
        self.conn.commit()
        self._dirty = set(self.caches)  # catch up on bars stored while no worker ran
        self.detail = {"assignments": [a.cursor for a in self.assignments]}

    def _setup_failed(self, cfg: StrategyConfig, exc: BaseException) -> None:
        self._rollback()
        message = f"{cfg.name} on {cfg.account}: {str(exc).splitlines()[0]}"
        if self._setup_errors.get(id(cfg)) == message:
            return  # (said already: a retry that fails the same way says nothing new)
        self._setup_errors[id(cfg)] = message
        known = self._c.execute("SELECT 1 FROM trading.accounts WHERE name = %s",
                                (cfg.account,)).fetchone() is not None
        self.report("STRATEGY_SETUP_FAILED", message, account=cfg.account if known else None)
        self._c.commit()

    def _rollback(self) -> None:
        if self._c.info.transaction_status != IDLE:
            self._c.rollback()

    def _retry_setup(self) -> None:
        """The entries whose setup failed, tried again: one that resolves now starts
        from the next bar stored, as a new entry does."""
        for cfg in list(self._unresolved):
            if any((a.account, a.config.name, a.config.timeframe)
                   == (cfg.account, cfg.name, cfg.timeframe) for a in self.assignments):
                self._unresolved.remove(cfg)  # (another entry for it is set up: said at start)
                continue
            known_keys = set(self.caches)
            try:
                a = self._resolve(cfg)
            except Exception as exc:
                self._setup_failed(cfg, exc)
                continue
            for iid, _s, _v in a.instruments:
                key = (iid, a.config.timeframe)
                if key not in known_keys:
                    cache = self.caches[key]
                    cache.load(self._c, a.last if a.last is not None
                               else datetime.now().astimezone(), cache.limit)
                self._dirty.add(key)
            self._c.commit()
            self.assignments.append(a)
            self._unresolved.remove(cfg)
            self._setup_errors.pop(id(cfg), None)
            self.detail["assignments"] = [x.cursor for x in self.assignments]
            log.event(self.log, "strategy entry set up", strategy=cfg.name, account=cfg.account)

    def close(self) -> None:
        for c in (self.conn, self.listen, self._hb_conn):
            if c is not None and not c.closed:
                c.close()

    def _resolve(self, cfg: StrategyConfig) -> Assignment:
        c = self._c
        row = c.execute("SELECT account_id, name, environment::text, aggregation::text, "
                        "base_currency FROM trading.accounts WHERE name = %s",
                        (cfg.account,)).fetchone()
        if row is None:
            raise ValueError(f"account {cfg.account!r} does not exist (`mmats run` creates "
                             "the configured accounts)")
        account_id, account, environment, aggregation, currency = row
        if environment == "backtest":
            raise ValueError(f"account {account} is a backtest account")
        strategy = self.loader.create(cfg.name, dict(cfg.params))
        strategy.initialize({"environment": environment, "symbols": list(cfg.symbols),
                             "timeframe": cfg.timeframe})
        timer = check_timer_interval(strategy)
        cls = type(strategy)
        srow = c.execute("SELECT strategy_id FROM trading.strategies WHERE name = %s "
                         "AND version = %s", (cls.name, cls.version)).fetchone()
        if srow is None:
            raise ValueError(f"strategy {cls.name} {cls.version} is not assigned to {account}")
        instruments = []
        ticks: dict[int, Decimal] = {}
        for symbol in cfg.symbols:
            name, _, venue = symbol.partition("@")
            rows = c.execute("SELECT instrument_id, symbol, venue, price_tick "
                             "FROM market.instruments "
                             "WHERE symbol = %s AND (venue = %s OR (%s::text IS NULL"
                             " AND venue !~ '^replay[0-9]+$'))",  # a replay copy when named
                             (name, venue or None, venue or None)).fetchall()
            if len(rows) != 1:
                problem = ("unknown" if not rows
                           else "on several venues; name one as SYMBOL@VENUE")
                raise ValueError(f"symbol {symbol!r}: {problem}")
            instruments.append(rows[0][:3])
            ticks[int(rows[0][0])] = rows[0][3]
        cursor = f"strategy:{account}:{cls.name}:{cfg.timeframe}"
        crow = c.execute("SELECT at FROM runtime.cursors WHERE name = %s", (cursor,)).fetchone()
        a = Assignment(cfg, account_id, account, environment, aggregation, currency, strategy,
                       int(srow[0]), instruments, cursor,
                       crow[0] if crow else None, tuple(strategy.get_required_indicators()),
                       timer=timer)
        # the events told so far: from where the last worker left off (its resume point
        # of events, moved with each step's signals), so that fills and refusals while no
        # worker ran are told before the next bar; a new entry starts from now
        erow = c.execute("SELECT seq, at FROM runtime.cursors WHERE name = %s",
                         (a.events_cursor,)).fetchone()
        if erow is None:
            erow = c.execute("SELECT (SELECT COALESCE(max(id), 0) FROM trading.strategy_events("
                             "%s, %s, 0, 'infinity') WHERE kind = 'fill'), now()",
                             (account_id, a.strategy_id)).fetchone()
        assert erow is not None
        a.last_fill, a.last_change = int(erow[0] or 0), erow[1]
        # the caches are loaded once every entry is resolved (start): from the oldest
        # resume point of the entries sharing each one
        limit = max(self.history_bars, max(strategy.warmup_bars(), 1) * 3)
        for iid, symbol, _venue in instruments:
            key = (iid, cfg.timeframe)
            if key not in self.caches:
                self.caches[key] = SeriesCache(iid, symbol, cfg.timeframe, limit, ticks.get(iid))
            else:
                self.caches[key].limit = max(self.caches[key].limit, limit)
        if a.last is None:  # a new assignment starts with the next bar stored from now on
            row = c.execute("SELECT max(ts) FROM market.bars WHERE instrument_id = ANY(%s) "
                            "AND timeframe = %s", ([i[0] for i in instruments],
                                                   cfg.timeframe)).fetchone()
            last = row[0] if row else None
            a.last = last
            if last is not None:
                c.execute("SELECT runtime.advance_strategy_cursor(%s, NULL, %s)", (cursor, last))
        # the news told so far: from the last worker's resume point of news; a new entry
        # from its resume point of bars on (the news of the bars it has seen are old news)
        nrow = c.execute("SELECT seq, at FROM runtime.cursors WHERE name = %s",
                         (a.news_cursor,)).fetchone()
        if nrow is None:
            nrow = c.execute("SELECT (SELECT COALESCE(max(news_id), 0) FROM "
                             "market.news_sentiment), COALESCE(%s::timestamptz + %s, now())",
                             (a.last, timedelta(microseconds=a.tf_us))).fetchone()
        assert nrow is not None
        a.news_seq, a.news_at = int(nrow[0] or 0), nrow[1]
        a.resumed = a.last
        return a

    def _load_caches(self) -> None:
        """Each cache's history up to the oldest resume point of the entries reading it
        (a new entry's is the last bar stored): the bars after it come with the first
        refreshes, so an entry that resumes further back than another one sharing the
        cache loses none of them."""
        until: dict[tuple[int, str], datetime] = {}
        now = datetime.now().astimezone()
        for a in self.assignments:
            for iid, _s, _v in a.instruments:
                key = (iid, a.config.timeframe)
                at = a.last if a.last is not None else now
                until[key] = min(until.get(key, at), at)
        for key in list(self.caches):
            if key not in until:  # only an entry that failed its setup read it
                del self.caches[key]
                continue
            cache = self.caches[key]
            cache.load(self._c, until[key], cache.limit)

    @property
    def _c(self) -> psycopg.Connection:
        assert self.conn is not None
        return self.conn

    # ------------------------------------------------------------------ the loop
    def step(self) -> None:
        assert self.listen is not None
        # (a catch-up in chunks goes on without waiting, unless an entry waits its grace:
        # then no further chunk is held in memory until that wait is over)
        wait = 0.0 if self._backlog and not self._grace else self.poll_ms / 1000
        for note in self.listen.notifies(timeout=wait, stop_after=1):
            self._note(note.channel, note.payload)
        for note in self.listen.notifies(timeout=0.0, stop_after=1000):
            self._note(note.channel, note.payload)
        if self._grace and min(self._grace.values()) + self.bar_grace_seconds <= time.monotonic():
            # a bar time some entry waits on: its grace is over, run it without the rest
            waiting = {k[0] for k in self._grace}
            for a in self.assignments:
                if a.cursor in waiting:
                    self._dirty.update((iid, a.config.timeframe) for iid, _s, _v in a.instruments)
        if self._backlog and not self._grace:
            self._dirty |= self._backlog
            self._backlog = set()
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            self.process(dirty)
        if time.monotonic() - self._last_reload > self.reload_seconds:
            self._last_reload = time.monotonic()
            self._reload()
        if self._unresolved and time.monotonic() - self._last_setup > self.setup_retry_seconds:
            self._last_setup = time.monotonic()
            self._retry_setup()
        self.detail["counts"] = dict(self.counts)

    def _note(self, channel: str, payload: str) -> None:
        if channel != "mmats_bars":
            return
        try:
            data = json.loads(payload)
            key = (int(data["instrument_id"]), str(data["timeframe"]))
        except (ValueError, KeyError, TypeError):
            return
        if key in self.caches:
            self._dirty.add(key)

    def _reload(self) -> None:
        report = self.loader.reload_if_changed()
        for error in report.errors:
            self.report("STRATEGY_LOAD_FAILED", str(error))
        changed = set(getattr(report, "loaded", []) or [])
        if not report.changed:
            return
        for a in self.assignments:
            name = a.config.name
            if changed and name not in changed:
                continue
            try:
                fresh = self.loader.create(name, dict(a.config.params))
                fresh.initialize({"environment": a.environment, "symbols": list(a.config.symbols),
                                  "timeframe": a.config.timeframe})
                timer = check_timer_interval(fresh)
            except Exception as exc:
                self.report("STRATEGY_LOAD_FAILED", f"{name}: {str(exc).splitlines()[0]}")
                continue
            if type(fresh).version == type(a.strategy).version:
                a.strategy = fresh
                a.timer = timer
                a.indicators = tuple(fresh.get_required_indicators())
                a.errors = 0
                warmup = max(fresh.warmup_bars(), 1) * 3
                for iid, _s, _v in a.instruments:
                    cache = self.caches[(iid, a.config.timeframe)]
                    cache.limit = max(cache.limit, warmup)
                self.guard.enable(fresh)
                log.event(self.log, "strategy reloaded", strategy=name, account=a.account)
            else:  # that version is not the one assigned: the old code keeps running
                self.report("STRATEGY_LOAD_FAILED",
                            f"{name} on {a.account}: the edited file is version "
                            f"{type(fresh).version}, the account runs version "
                            f"{type(a.strategy).version}: the edit is not loaded (the old "
                            "code keeps running; assign the new version and restart, e.g. "
                            "`mmats run`)", account=a.account)

    def process(self, dirty: set[tuple[int, str]]) -> None:
        """Run the strategies over every bar that arrived, in time order: the entries
        whose bars close at the same time run as one step (one paper wait, one read of
        their events, one transaction for their signals and resume points)."""
        self.counts["bars"] += self._refresh(sorted(dirty))
        self._c.commit()
        steps: dict[int, list[tuple[Assignment, int]]] = {}
        for a in self.assignments:
            if not any((iid, a.config.timeframe) in dirty for iid, _s, _v in a.instruments):
                continue
            for t_us in self._ready(a, self._times(a)):
                steps.setdefault(t_us + a.tf_us, []).append((a, t_us))
        for close_us in sorted(steps):
            if self.stop_event.is_set():
                return
            self._run_step(steps[close_us])

    def _refresh(self, keys: list[tuple[int, str]]) -> int:
        """The new bars of every cache in `keys`, in one query, at most a chunk of each
        cache's `limit` bars: when one has more, every cache takes only the bars closing
        up to the close of that one's last bar of the chunk (the steps of those closes are
        complete, the ones after wait for the next chunk), and those left behind are
        marked `ahead` and refreshed again once these have run (`_backlog`). No cache
        drops a bar that an entry reading it has not run yet (`keep_after`)."""
        caches = [self.caches[k] for k in keys]
        if not caches:
            return 0
        pins: dict[tuple[int, str], int] = {}
        for a in self.assignments:
            at = to_us(a.last) if a.last is not None else -1
            for iid, _s, _v in a.instruments:
                key = (iid, a.config.timeframe)
                pins[key] = min(pins.get(key, at), at)
        chunks = [max(c.limit, 1) for c in caches]
        rows = self._c.execute(
            "SELECT k.n, b.ts, b.open, b.high, b.low, b.close, b.volume "
            "FROM unnest(%s::bigint[], %s::market.timeframe[], %s::timestamptz[], %s::int[]) "
            "  WITH ORDINALITY AS k(i, tf, after, lim, n), "
            "LATERAL (SELECT ts, open, high, low, close, volume FROM market.bars "
            "         WHERE instrument_id = k.i AND timeframe = k.tf AND ts > k.after "
            "         ORDER BY ts LIMIT k.lim + 1) b "
            "ORDER BY k.n, b.ts",
            ([k[0] for k in keys], [k[1] for k in keys], [c.last or _EPOCH for c in caches],
             chunks)).fetchall()
        grouped: list[list[tuple[Any, ...]]] = [[] for _ in keys]
        for row in rows:
            grouped[int(row[0]) - 1].append(row[1:])
        # the close up to which every cache is complete: that of the last bar of a chunk
        # of a cache with more bars than a chunk
        horizon = min((to_us(new[chunk - 1][0]) + TIMEFRAME_US[key[1]]
                       for key, new, chunk in zip(keys, grouped, chunks, strict=True)
                       if len(new) > chunk), default=None)
        added = 0
        for key, cache, new in zip(keys, caches, grouped, strict=True):
            if horizon is not None:
                tf_us = TIMEFRAME_US[key[1]]
                kept = [r for r in new if to_us(r[0]) + tf_us <= horizon]
                cache.ahead = len(kept) < len(new)
                if cache.ahead:
                    self._backlog.add(key)
                new = kept
            else:
                cache.ahead = False
            cache.keep_after = pins.get(key)
            cache.extend(new)
            added += len(new)
            if new:
                self._late(key, cache, new)
        return added

    def _late(self, key: tuple[int, str], cache: SeriesCache,
              rows: list[tuple[Any, ...]]) -> None:
        """Say so when bars arrive for times an entry has already run: that strategy
        never sees them as current (they are in its history). An error (BAR_LATE) when
        the entry had waited its grace for that bar; a log line when the symbol was
        already behind (a market just opening, a feed catching up), which is expected."""
        for a in self.assignments:
            if (a.last is None or a.config.timeframe != key[1]
                    or not any(iid == key[0] for iid, _s, _v in a.instruments)):
                continue
            late = [r[0] for r in rows if r[0] <= a.last
                    and (a.resumed is None or r[0] > a.resumed)]
            for bar_ts in late:
                self.counts["late_bars"] = self.counts.get("late_bars", 0) + 1
                text = (f"{a.config.name} on {a.account}: the {cache.symbol} {key[1]} bar of "
                        f"{bar_ts.isoformat()} arrived after the entry ran that time")
                waited = (a.cursor, key[0], to_us(bar_ts))
                if waited in self._given_up:
                    self._given_up.discard(waited)
                    self.report("BAR_LATE", f"{text} (grace {self.bar_grace_seconds:g} s); "
                                "the strategy sees it only in its history", account=a.account)
                else:
                    log.event(self.log, f"{text}; the symbol was behind, so the entry did not "
                              "wait for it", 30, account=a.account)

    def _times(self, a: Assignment) -> list[int]:
        after = to_us(a.last) if a.last is not None else -1
        times: set[int] = set()
        for iid, _s, _v in a.instruments:
            cache = self.caches[(iid, a.config.timeframe)]
            ts = cache.ts_us
            times.update(int(t) for t in ts[np.searchsorted(ts, after, side="right"):])
        return sorted(times)

    def _ready(self, a: Assignment, times: list[int]) -> list[int]:
        """The bar times an entry may run now. With several symbols, time t waits (up to
        the grace) for each symbol that is current (it had the entry's last bar) but has
        no bar at t yet and nothing later: the bars of one time often commit a moment
        apart, and a backtest shows them together. A symbol with a later bar has none at
        t (a gap); one that was already behind is not waited for. Once t runs, a bar of
        t that arrives after it is too late for the strategy (reported in _refresh)."""
        if len(a.instruments) < 2 or not times:
            return times
        prev = to_us(a.last) if a.last is not None else None
        now = time.monotonic()
        out = []
        for t in times:
            missing = []
            for iid, _s, _v in a.instruments:
                cache = self.caches[(iid, a.config.timeframe)]
                ts = cache.ts_us
                if (not len(ts) or ts[-1] > t or cache.ahead or prev is None
                        or ts[-1] < prev):
                    continue  # a later bar (t is a gap for it), or not current
                k = int(np.searchsorted(ts, t))
                if k < len(ts) and ts[k] == t:
                    continue
                missing.append(iid)
            key = (a.cursor, t)
            if missing:
                first = self._grace.setdefault(key, now)
                if now - first < self.bar_grace_seconds:
                    break  # t, and every later time, waits
                # t runs without them: a bar of t from one of them is late (BAR_LATE)
                if len(self._given_up) > 100_000:  # (bars that never came: forget them)
                    self._given_up.clear()
                self._given_up.update((a.cursor, iid, t) for iid in missing)
            self._grace.pop(key, None)
            out.append(t)
        return out

    def _run_step(self, entries: list[tuple[Assignment, int]]) -> None:
        """The bars closing at one time, for every entry that has one: their market data
        (bars and indicators need nothing of the ledger: made while the paper broker
        still settles the bar), then wait for the paper broker, tell each strategy its
        events, run each one isolated, then record all their signals and resume points
        in one transaction."""
        prepared = []
        for a, t_us in entries:
            bar_ts = from_us(t_us)
            members = []
            for iid, symbol, venue in a.instruments:
                cache = self.caches[(iid, a.config.timeframe)]
                i = cache.index(bar_ts)
                if i is not None:
                    members.append((iid, symbol, venue, cache, i))
            data = {symbol: cache.market_data(a.indicators, i)
                    for _iid, symbol, _venue, cache, i in members}
            prepared.append((a, t_us, members, data))
        for a, t_us, members, _data in prepared:
            if a.environment == "paper":
                self._wait_for_paper(a, [m[0] for m in members], from_us(t_us))
        # (a strategy still running from a call over its budget is told nothing: it is
        # never called concurrently with itself; its events wait for a later bar)
        told = [a for a, _t, _m, _d in prepared if not self.guard.busy(a.strategy)]
        self._deliver_events(told)
        told_ids = {id(a) for a in told}
        for a, t_us, _m, _d in prepared:
            if id(a) in told_ids and a.wants_news:
                self._deliver_news(a, from_us(t_us + a.tf_us))
        decided = []
        for a, t_us, members, data in prepared:
            close = from_us(t_us + a.tf_us)
            gate = _Gate()
            context = StrategyContext(Environment(a.environment), close, data,
                                      partial(self._account_state, a, gate),
                                      dict(a.strategy.params), self.log)
            result = self.guard.run_isolated(
                a.strategy, context, timeout=self.strategy_timeout_seconds,
                waiting=lambda: self.beat(self.state), tick=min(self.heartbeat_seconds, 1.0))
            results = [result]
            # its timer, as a backtest runs it: after on_bar, on the first bar close of a
            # new period (not while on_bar still runs over its budget: it would be refused)
            if not result.timed_out and timer_due(
                    a.timer, None if a.last is None else a.last + timedelta(microseconds=a.tf_us),
                    close):
                results.append(self.guard.run_isolated(
                    a.strategy, context, call=a.strategy.on_timer,
                    timeout=self.strategy_timeout_seconds,
                    waiting=lambda: self.beat(self.state),
                    tick=min(self.heartbeat_seconds, 1.0)))
            with self._ledger_lock:  # a call over its budget reads the ledger no more
                gate.open = False
            signals = []
            for r in results:
                signals += r.signals
                if r.error is not None:
                    self.counts["errors"] += 1
                    a.errors += 1
                    if a.errors <= 3 or r.error.disabled:
                        self.report("STRATEGY_ERROR", str(r.error), account=a.account)
            decided.append((a, from_us(t_us), close, {m[1]: m for m in members}, signals))
        if self._c.info.transaction_status != IDLE:
            self._c.commit()  # (reads only so far)
        try:
            refused = self._record(decided)
        except psycopg.Error:
            # one entry's signals failed (their transaction is gone): record each entry
            # on its own, so that only the failing one loses its bar
            self._c.rollback()
            refused = []
            for item in decided:
                refused.extend(self._record_alone(item))
        for a, _bar_ts, _close, _members, _signals in decided:
            a.last = _bar_ts
        for a, event in refused:  # after the commit: a retried transaction tells it once
            self._hook(a, a.strategy.on_order_rejected, event)

    def _record(self, decided: list[tuple[Any, ...]]) -> list[tuple[Assignment, OrderRejected]]:
        """Every entry's signals of the step and their resume points, one transaction
        (sent again when the server broke a lock cycle with the router)."""
        for attempt in range(1, 6):
            try:
                refused: list[tuple[Assignment, OrderRejected]] = []
                # the accounts that signal, all locked first and in id order, as every
                # writer of the ledger takes them (before any audit event locks the chain
                # head): a step that signals on several accounts never waits in a cycle
                signalling = sorted({d[0].account_id for d in decided if d[4]})
                if len(signalling) > 1:
                    self._c.execute("SELECT trading.lock_accounts(%s)", (signalling,))
                for a, _bar_ts, close, members, signals in sorted(
                        decided, key=lambda d: d[0].account_id):
                    refused.extend((a, r) for r in self._submit_all(a, signals, members, close))
                self._advance([(d[0], d[1]) for d in decided])
                self._c.commit()
                return refused
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                # nothing of the transaction was kept: send it again
                self._c.rollback()
                if attempt == 5:
                    raise
                time.sleep(0.005 * attempt)
        raise AssertionError("unreachable")

    def _record_alone(self, item: tuple[Any, ...]) -> list[tuple[Assignment, OrderRejected]]:
        a, bar_ts, close, _members, _signals = item
        try:
            refused = self._record([item])
        except psycopg.Error as exc:
            self._c.rollback()
            refused = []  # rolled back with the bar: nothing was refused
            self.report("SIGNAL_FAILED", f"{a.config.name} on {a.account} at {close.isoformat()}: "
                        f"{str(exc).splitlines()[0]}", account=a.account)
            self._advance([(a, bar_ts)])
            self._c.commit()
        return refused

    def _advance(self, moves: list[tuple[Assignment, datetime]]) -> None:
        """Each entry's resume point to its bar, and its resume point of events to what
        it has been told (one statement, in the step's transaction)."""
        names: list[str] = []
        seqs: list[int | None] = []
        ats: list[datetime | None] = []
        for a, bar_ts in moves:
            names += [a.cursor, a.events_cursor]
            seqs += [None, a.last_fill]
            ats += [bar_ts, a.last_change]
            if a.wants_news:
                names.append(a.news_cursor)
                seqs.append(a.news_seq)
                ats.append(a.news_at)
        self._c.execute("SELECT runtime.advance_strategy_cursor(n, s, t) FROM unnest(%s::text[], "
                        "%s::bigint[], %s::timestamptz[]) AS x(n, s, t)", (names, seqs, ats))

    def _submit_all(self, a: Assignment, signals: list[TradeSignal], members: dict[str, Any],
                    close: datetime) -> list[OrderRejected]:
        refused = []
        for sig in signals:
            answer = self._submit(a, sig, members, close)
            if answer.get("status") == "rejected":
                refused.append(OrderRejected(
                    symbol=sig.symbol, reason_code=str(answer.get("reason_code") or "REJECTED"),
                    reason=str(answer.get("reason") or ""), ts=close,
                    signal_id=answer.get("signal_id")))
        return refused

    def _deliver_events(self, entries: list[Assignment]) -> None:
        """Each strategy's fills and refused or cancelled orders since it was last told,
        before it sees the bar (as a backtest calls on_order_filled when it fills): one
        query for every entry of the step."""
        if not entries:
            return
        rows = self._c.execute(
            "SELECT x.k, e.kind, e.id, e.order_id, e.symbol, e.side, e.quantity, e.price, "
            "e.commission, e.ts, e.signal_id, e.reason_code, e.reason "
            "FROM unnest(%s::int[], %s::bigint[], %s::bigint[], %s::bigint[], "
            "            %s::timestamptz[]) AS x(k, account, strategy, after_fill, after_change),"
            " LATERAL trading.strategy_events(x.account, x.strategy, x.after_fill, "
            "                                 x.after_change) e "
            "ORDER BY x.k, e.ts, e.kind, e.id",
            (list(range(len(entries))), [a.account_id for a in entries],
             [a.strategy_id for a in entries], [a.last_fill for a in entries],
             [a.last_change for a in entries])).fetchall()
        for (k, kind, id_, order_id, symbol, side, qty, price, commission, ts, signal_id, code,
             reason) in rows:
            a = entries[k]
            if kind == "fill":
                a.last_fill = max(a.last_fill, int(id_))
                self._hook(a, a.strategy.on_order_filled, OrderFilled(
                    order_id=int(order_id), symbol=symbol, side=side, quantity=qty,
                    price=price, commission=commission, ts=ts, signal_id=signal_id))
            else:
                a.last_change = ts if a.last_change is None else max(a.last_change, ts)
                self._hook(a, a.strategy.on_order_rejected, OrderRejected(
                    symbol=symbol, reason_code=str(code), reason=str(reason or ""), ts=ts,
                    signal_id=signal_id, order_id=int(order_id)))

    def _deliver_news(self, a: Assignment, close: datetime) -> None:
        """The news about its symbols or the whole market known by the bar's close and
        not told yet, in time order, before it sees the bar (as a backtest tells them)."""
        rows = self._c.execute(
            "WITH top AS (SELECT COALESCE(max(news_id), 0) AS m FROM market.news_sentiment) "
            "SELECT top.m, n.ts, i.symbol, n.score, n.source, n.headline, n.extra "
            "FROM top LEFT JOIN LATERAL (SELECT * FROM market.news_sentiment x "
            "  WHERE (x.instrument_id = ANY(%(ids)s) OR x.instrument_id IS NULL) "
            "    AND x.ts <= %(close)s AND (x.ts > %(at)s OR x.news_id > %(seq)s)) n ON true "
            "LEFT JOIN market.instruments i ON i.instrument_id = n.instrument_id "
            "ORDER BY n.ts, n.news_id",
            {"ids": [iid for iid, _s, _v in a.instruments], "close": close,
             "at": a.news_at or datetime.min.replace(tzinfo=UTC), "seq": a.news_seq},
        ).fetchall()
        for _top, ts, symbol, score, source, headline, extra in rows:
            if ts is not None:
                self._hook(a, a.strategy.on_news_sentiment, NewsSentiment(
                    symbol=symbol, score=float(score), source=source, ts=ts,
                    headline=headline, extra=extra))
        a.news_at = close if a.news_at is None else max(a.news_at, close)
        a.news_seq = max(a.news_seq, int(rows[0][0]) if rows else 0)

    def _hook(self, a: Assignment, hook: Any, event: object) -> None:
        try:
            hook(event)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a callback (sys.exit too) must not stop the others
            self.counts["errors"] += 1
            a.errors += 1
            if a.errors <= 3:
                self.report("STRATEGY_ERROR", f"{type(a.strategy).name}: {type(exc).__name__} "
                            f"in {getattr(hook, '__name__', 'hook')}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}",
                            account=a.account)

    def _submit(self, a: Assignment, sig: TradeSignal, members: dict[str, Any],
                close: datetime) -> dict[str, Any]:
        payload = sig.to_dict()
        payload["account"] = a.account
        member = members.get(sig.symbol.upper())
        if member is None:  # a symbol of the assignment without a bar now, or another one
            known = {s: (iid, s, v) for iid, s, v in a.instruments}
            if sig.symbol.upper() not in known:
                raise psycopg.errors.InvalidParameterValue(
                    f"strategy {sig.strategy} signalled {sig.symbol!r}, which is not one of its "
                    f"symbols ({', '.join(known)})")
            payload["venue"] = known[sig.symbol.upper()][2]
        else:
            _iid, _symbol, venue, cache, i = member
            payload["venue"] = venue
            payload.setdefault("price", str(cache.bars[i].close))
        payload["ts"] = (close - _ONE_US).isoformat()
        row = self._c.execute("SELECT trading.submit_signal(%s)", (Jsonb(payload),)).fetchone()
        self.counts["signals"] += 1
        answer = row[0] if row else {}
        log.event(self.log, "signal", account=a.account, environment=a.environment,
                  strategy=sig.strategy, symbol=sig.symbol, action=sig.action,
                  status=answer.get("status"), reason_code=answer.get("reason_code"),
                  order_id=answer.get("order_id"), bar=close.isoformat())
        return answer

    def _wait_for_paper(self, a: Assignment, instruments: list[int], bar_ts: datetime) -> None:
        """Until the paper broker (the router) has settled this bar of the instruments:
        the fills at its open and the protective orders it fired reach the ledger before
        the strategy sees the bar, as in a backtest. An advisory account has no orders:
        no wait. The router announces each move of its resume points (mmats_cursor)."""
        names = []
        for iid in instruments:
            if iid not in a.paper_tf:  # the bars the paper broker fills on
                row = self._c.execute("SELECT market.finest_timeframe(%s)::text",
                                      (iid,)).fetchone()
                if row and row[0]:
                    a.paper_tf[iid] = row[0]
            if a.paper_tf.get(iid) == a.config.timeframe:
                names.append(f"paper:{iid}:{a.config.timeframe}")
        # (resume points only move forward: one seen past the bar needs no second look,
        # so the entries of a step that share instruments wait once)
        names = [n for n in names if n not in self._settled or self._settled[n] < bar_ts]
        if not names:
            return
        deadline = time.monotonic() + self.paper_wait_seconds
        while True:
            row = self._c.execute(
                "SELECT (SELECT mode::text FROM trading.accounts WHERE account_id = %s), "
                "c.names, c.ats FROM (SELECT array_agg(name ORDER BY name) AS names, "
                "array_agg(at ORDER BY name) AS ats FROM runtime.cursors "
                "WHERE name = ANY(%s)) c",
                (a.account_id, names)).fetchone()
            assert row is not None
            for name, at in zip(row[1] or (), row[2] or (), strict=True):
                self._settled[name] = at
            if row[0] != "operator" or all(self._settled.get(n, _EPOCH) >= bar_ts
                                           for n in names):
                return
            if time.monotonic() > deadline:
                self.report("PAPER_BROKER_LATE",
                            f"{a.account}: the paper broker has not settled the bar of "
                            f"{bar_ts.isoformat()} after {self.paper_wait_seconds} s "
                            "(is the router running?)", account=a.account)
                return
            self._listen_once(0.01)

    def _listen_once(self, timeout: float) -> None:
        """Wait for any notification (keeping the bar ones for later)."""
        assert self.listen is not None
        for note in self.listen.notifies(timeout=timeout, stop_after=1):
            self._note(note.channel, note.payload)

    def _account_state(self, a: Assignment, gate: _Gate) -> AccountState:
        """The ledger's view of the account now, in one query. Nothing of the step is
        written yet when a strategy asks, so a failure here (the strategy's error) is
        rolled back without loss. Only while the worker waits for the call (`gate`): a
        call over its time budget no longer shares the worker's session."""
        with self._ledger_lock:
            if not gate.open:
                raise RuntimeError("the bar's time budget is over: the ledger is no longer "
                                   "readable from its context")
            try:
                row = self._c.execute(_ACCOUNT, {"account": a.account_id,
                                                 "strategy": a.strategy_id}).fetchone()
            except psycopg.Error:
                self._c.rollback()
                raise
        if row is None:
            return AccountState(cash=Decimal(0), equity=Decimal(0), currency=a.currency,
                                positions={})
        cash, equity, symbols, quantities, averages, lasts = row
        positions = {}
        for symbol, qty, avg, last in zip(symbols or (), quantities or (), averages or (),
                                          lasts or (), strict=True):
            mark = last if last is not None else avg
            positions[symbol] = PositionState(qty, avg, qty * (mark - avg))
        return AccountState(cash=cash, equity=equity, currency=a.currency, positions=positions)
