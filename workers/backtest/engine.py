"""The backtest engine: stored bars, in time order, through the strategy and the trading
core's own functions.

The database is called when state changes, not on every bar. Per bar the engine
  1. fills the orders waiting for this bar (the simulator's rules) - a fill that needs
     no new protection decision is sent with the next step, otherwise at once;
  2. asks `protect_bars` to judge the bars since the last mark when a position's stop,
     target, trailing stop or breakeven could have been touched on this bar (a
     conservative check in Python decides when to ask; the database decides what fires),
     and fills the protective orders it creates on this bar;
  3. tells the strategy the news sentiment stored up to the bar's close (if it has an
     `on_news_sentiment`), calls it (its account view reads the ledger only if the
     strategy looks), then its `on_timer` when this is the first bar close of a new
     timer period;
  4. submits its signals through `trading.submit_signal`, after marking the held
     positions to this bar so that sizing sees the current equity.
Each call is `backtest.step(run, ops)`: one transaction, one round trip.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from functools import partial
from types import MappingProxyType
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb, set_json_loads

from db.errors import describe
from db.queries import query
from strategies.base import IStrategy, TimerIntervalError, check_timer_interval, timer_due
from strategies.events import NewsSentiment, OrderFilled, OrderRejected
from strategies.isolation import StrategyGuard
from strategies.loader import StrategyLoader, StrategyLoadError
from strategies.market import AccountState, Environment, PositionState, StrategyContext
from strategies.params import ParamError
from strategies.signal import TradeSignal
from workers.backtest.config import BacktestConfig, BacktestError, LimitSpec
from workers.backtest.data import SymbolData, from_us, instrument, load_symbol, to_us
from workers.backtest.simulator import SimFill, SimOrder, Simulator

log = logging.getLogger("mmats.backtest")
Progress = Callable[[int, int], None]
_PROTECTIVE = frozenset({"stop_loss", "take_profit", "trailing_stop", "breakeven"})
_ONE_US = 1
# steps after which the ledger's statistics are refreshed (see backtest.refresh_statistics)
_ANALYZE_AT = frozenset({200, 2_000, 20_000})


@dataclass(slots=True)
class _Watch:
    """A held position as the last step reported it, with what the engine needs to know
    when protect_bars must look (floats: only a trigger for asking, never a decision)."""

    quantity: Decimal
    average_price: Decimal
    stop: float | None  # the highest stop (long) it could have: stop, breakeven, trailing
    take_profit: float | None
    trailing: float | None
    best: float | None  # best price since the last mark (trail anchor)

    @property
    def is_long(self) -> bool:
        return self.quantity > 0

    @property
    def protected(self) -> bool:
        return self.stop is not None or self.take_profit is not None or self.trailing is not None


@dataclass
class RunCounts:
    bars: int = 0
    steps: int = 0
    signals: int = 0
    approved: int = 0
    rejected: int = 0
    ignored: int = 0
    fills: int = 0
    protective_orders: int = 0
    strategy_errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the engine's own consistency checks


def check_limits(conn: psycopg.Connection, limits: Iterable[LimitSpec]) -> None:
    """Each limit set as the trading core sets it, in a transaction rolled back: a
    refusal (an unknown type, a value out of its range) names the limit and where it was
    given, before a run, an account or a walk-forward is stored."""
    limits = list(limits)
    if not limits:
        return
    with conn.transaction(force_rollback=True):
        for lim in limits:
            try:
                with conn.transaction():
                    conn.execute(query("backtest_set_limit"), {
                        "type": lim.limit_type, "value": lim.value, "scope": lim.scope,
                        "key": lim.key, "account": None, "params": Jsonb(dict(lim.params))})
            except psycopg.Error as exc:
                raise BacktestError(f"{lim.where}: {describe(exc)}") from None


def _f(value: Any) -> float | None:
    return None if value is None else float(value)


class Engine:
    def __init__(self, conn: psycopg.Connection, config: BacktestConfig, *,
                 progress: Progress | None = None) -> None:
        self.conn = conn
        self.config = config
        self.progress = progress
        set_json_loads(partial(json.loads, parse_float=Decimal), conn)
        self.strategy = self._load_strategy()
        self.symbols = [self._load(s) for s in config.symbols]
        self.by_id = {sd.inst.instrument_id: k for k, sd in enumerate(self.symbols)}
        self.by_symbol = {sd.symbol: k for k, sd in enumerate(self.symbols)}
        self.currency = self._currency()
        self.sims = [Simulator(config.costs_for(sd.symbol, sd.inst.venue)) for sd in self.symbols]
        self.guard = StrategyGuard()
        self._params = MappingProxyType(dict(self.strategy.params))
        self.counts = RunCounts()
        self.run_id = 0
        self.account = ""
        self.cash = config.cash
        self.positions: dict[int, _Watch] = {}
        self.breaker = "OK"  # the account's, as the ledger last said
        self.pending: dict[int, list[SimOrder]] = {k: [] for k in range(len(self.symbols))}
        self.deferred: list[dict[str, Any]] = []  # fills and cancels for the next step
        self.deferred_symbols: set[int] = set()  # the symbols they move
        self.deferred_qty: dict[int, Decimal] = {}  # and by how much
        self.current = [-1] * len(self.symbols)  # the latest bar index seen per symbol
        self.mark_from = [0] * len(self.symbols)  # first bar not yet given to protect_bars
        self.order_signal: dict[int, int | None] = {}
        self.protected_orders: set[int] = set()  # orders whose fill brings protection
        self.fill_seq = 0
        self.mark_every_bar = False
        self._account_cache: tuple[int, AccountState] | None = None
        self._now_us = 0
        # the bar close before the period's first (the latest warm-up bar's): the timer's
        # first period is the one that bar closes in, as for a strategy worker resuming
        warm = [int(sd.close_us[sd.first - 1]) for sd in self.symbols if sd.first > 0]
        self._prev_close_us: int | None = max(warm) if warm else None
        self.news = self._load_news()
        self._news_next = 0

    # ------------------------------------------------------------------ set-up
    def _load_strategy(self) -> IStrategy:
        loader = StrategyLoader(self.config.strategy_dirs)
        loader.reload_if_changed()
        try:
            strategy = loader.create(self.config.strategy, self.config.params)
        except (StrategyLoadError, ParamError) as exc:
            # every file the loader refused (reported by whichever load first met it)
            errors = "; ".join(loader.errors.values())
            raise BacktestError(f"{exc}{' (' + errors + ')' if errors else ''}") from None
        try:
            strategy.initialize({"environment": Environment.BACKTEST.value,
                                 "symbols": list(self.config.symbols),
                                 "timeframe": self.config.timeframe})
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the strategy's own code, sys.exit too: one line
            lines = str(exc).strip().splitlines()
            raise BacktestError(
                f"{self.config.strategy}: initialize failed: {type(exc).__name__}: "
                f"{lines[0] if lines else '(no message)'}") from None
        try:
            self.timer = check_timer_interval(strategy)
        except TimerIntervalError as exc:
            raise BacktestError(str(exc)) from None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # raised by the strategy's own timer_interval
            lines = str(exc).strip().splitlines()
            raise BacktestError(
                f"{self.config.strategy}: timer_interval failed: {type(exc).__name__}: "
                f"{lines[0] if lines else '(no message)'}") from None
        return strategy

    def _load_news(self) -> list[tuple[int, NewsSentiment]]:
        """The period's news about the run's symbols or the whole market, in time order
        (none is read for a strategy without on_news_sentiment)."""
        if type(self.strategy).on_news_sentiment is IStrategy.on_news_sentiment:
            return []
        rows = self.conn.execute(
            "SELECT n.ts, i.symbol, n.score, n.source, n.headline, n.extra"
            " FROM market.news_sentiment n LEFT JOIN market.instruments i USING (instrument_id)"
            " WHERE (n.instrument_id = ANY(%s) OR n.instrument_id IS NULL)"
            " AND n.ts >= %s AND n.ts < %s ORDER BY n.ts, n.news_id",
            ([sd.inst.instrument_id for sd in self.symbols], self.config.start,
             self.config.end)).fetchall()
        return [(to_us(ts), NewsSentiment(symbol=symbol, score=float(score), source=source,
                                          ts=ts, headline=headline, extra=extra))
                for ts, symbol, score, source, headline, extra in rows]

    def _load(self, symbol: str) -> SymbolData:
        inst = instrument(self.conn, symbol)
        warmup = self.strategy.warmup_bars() if self.config.warmup else 0
        sd = load_symbol(self.conn, inst, self.config.timeframe, self.config.start,
                         self.config.end, warmup)
        sd.build_series(self.strategy.get_required_indicators())
        return sd

    def _currency(self) -> str:
        quotes = {sd.inst.quote_currency for sd in self.symbols}
        currency = (self.config.currency or self.symbols[0].inst.quote_currency).upper()
        foreign = sorted(f"{sd.symbol} ({sd.inst.quote_currency})" for sd in self.symbols
                         if sd.inst.quote_currency != currency)
        if foreign:
            raise BacktestError(
                f"every symbol of a run must be quoted in the account currency {currency}; "
                f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not "
                f"(run them separately, or pass --currency; quotes seen: "
                f"{', '.join(sorted(quotes))})")
        return currency

    def _create_run(self) -> None:
        check_limits(self.conn, self.config.limits)
        cls = type(self.strategy)
        row = self.conn.execute(query("backtest_create_run"), {
            "strategy": cls.name, "version": cls.version,
            "params": Jsonb(self.strategy.params), "symbols": [s.symbol for s in self.symbols],
            "timeframe": self.config.timeframe, "start": self.config.start,
            "end": self.config.end, "cash": self.config.cash, "currency": self.currency,
            # each symbol's venue beside it: a report reads the run's instruments back
            # even when another venue lists the same symbol (then or later)
            "settings": Jsonb(self.config.settings()
                              | {"venues": [sd.inst.venue for sd in self.symbols]}),
            "label": self.config.label,
            "walk_forward_id": self.config.walk_forward_id}).fetchone()
        assert row is not None
        self.run_id = int(row[0])
        self.account = f"bt-{self.run_id}"
        for lim in self.config.limits:
            self.conn.execute(query("backtest_set_limit"), {
                "type": lim.limit_type, "value": lim.value, "scope": lim.scope, "key": lim.key,
                "account": self.account, "params": Jsonb(dict(lim.params))})
        # drawdown and daily-loss limits are judged on equity snapshots: with one in force
        # (the run's own, or one set for every account or every backtest) every bar on
        # which a position is held is marked, as the bars trigger does for paper and live
        row = self.conn.execute(query("backtest_equity_limits"), {"run": self.run_id}).fetchone()
        self.mark_every_bar = bool(row and row[0])

    # ------------------------------------------------------------------ the run
    def run(self) -> int:
        """Replay the period; returns the run id (the run is finished by the caller)."""
        self._create_run()
        started = time.perf_counter()
        total = self._timeline_length()
        every = max(total // 100, 1)
        for n, (t_us, members) in enumerate(self._timeline(), 1):
            self._bar_group(t_us, members)
            if self.progress is not None and (n % every == 0 or n == total):
                self.progress(n, total)
        self._finish_period()
        self.counts.bars = sum(len(sd) - sd.first for sd in self.symbols)
        log.debug("run %s replayed in %.2f s", self.run_id, time.perf_counter() - started)
        return self.run_id

    def _timeline_length(self) -> int:
        if len(self.symbols) == 1:
            sd = self.symbols[0]
            return len(sd) - sd.first
        return len(np.unique(np.concatenate([sd.close_us[sd.first:] for sd in self.symbols])))

    def _timeline(self) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """(close time, [(symbol index, bar index), ...]) in time order."""
        if len(self.symbols) == 1:
            sd = self.symbols[0]
            close = sd.close_us
            for i in range(sd.first, len(sd)):
                yield int(close[i]), [(0, i)]
            return
        times = np.concatenate([sd.close_us[sd.first:] for sd in self.symbols])
        keys = np.concatenate([np.full(len(sd) - sd.first, k)
                               for k, sd in enumerate(self.symbols)])
        index = np.concatenate([np.arange(sd.first, len(sd)) for sd in self.symbols])
        order = np.lexsort((keys, times))
        times, keys, index = times[order], keys[order], index[order]
        bounds = [0, *(np.flatnonzero(np.diff(times)) + 1).tolist(), len(times)]
        for a, b in itertools.pairwise(bounds):
            yield int(times[a]), [(int(keys[j]), int(index[j])) for j in range(a, b)]

    def _bar_group(self, t_us: int, members: list[tuple[int, int]]) -> None:
        self._now_us = t_us
        for k, i in members:
            self.current[k] = i
            if self.pending[k]:
                self._fill_pending(k, i)
            watch = self.positions.get(k)
            if watch is not None and watch.protected:
                self._watch(k, i, watch)
            if self.mark_every_bar and (k in self.positions or k in self.deferred_symbols):
                self._send([k])
        signals = self._call_strategy(t_us, members)
        if signals:
            self._submit(signals)

    # ------------------------------------------------------------------ fills
    def _fill_pending(self, k: int, i: int) -> None:
        sd = self.symbols[k]
        bar = sd.sim_bar(i)
        waiting: list[SimOrder] = []
        sync = False
        for order in self.pending[k]:
            held = self._held(k)
            if order.side == "buy" and held < 0 and not order.reduce_only:
                # the part that buys back the short always fills; cash limits the rest
                order = replace(order, closing=min(order.quantity, -held))
            fill = self.sims[k].match(order, bar, sd.inst.rules, cash=self.cash)
            if fill is None:
                waiting.append(order)
                continue
            self._queue_fill(k, order, fill)
            # the watch needs the ledger's answer before it can judge this bar
            watch = self.positions.get(k)
            sync = sync or (watch is not None and watch.protected)
            sync = sync or order.order_id in self.protected_orders
            self.protected_orders.discard(order.order_id)
        self.pending[k] = waiting
        if sync:
            self._flush()

    def _queue_fill(self, k: int, order: SimOrder, fill: SimFill) -> None:
        sd = self.symbols[k]
        if fill.quantity > 0:
            self.fill_seq += 1
            self.deferred.append({
                "op": "fill", "order_id": order.order_id,
                "broker_fill_id": f"sim-{self.run_id}-{order.order_id}-{self.fill_seq}",
                "quantity": str(fill.quantity), "price": str(fill.price),
                "commission": str(fill.commission), "liquidity": fill.liquidity,
                "ts": from_us(fill.ts_us).isoformat()})
            self.deferred_symbols.add(k)
            signed = fill.quantity if order.side == "buy" else -fill.quantity
            self.deferred_qty[k] = self.deferred_qty.get(k, Decimal(0)) + signed
            self.cash -= signed * fill.price + fill.commission
            self.counts.fills += 1
            self._account_cache = None
            self._event(self.strategy.on_order_filled, OrderFilled(
                order_id=order.order_id, symbol=sd.symbol, side=order.side,
                quantity=fill.quantity, price=fill.price, commission=fill.commission,
                ts=from_us(fill.ts_us), signal_id=self.order_signal.get(order.order_id)))
        if fill.unfilled > 0:
            self.deferred.append({"op": "cancel", "order_id": order.order_id,
                                  "reason": fill.reason or "cancelled by the simulator"})
            self._event(self.strategy.on_order_rejected, OrderRejected(
                symbol=sd.symbol, reason_code="INSUFFICIENT_CASH", reason=fill.reason,
                ts=from_us(fill.ts_us), signal_id=self.order_signal.get(order.order_id),
                order_id=order.order_id))

    def _held(self, k: int) -> Decimal:
        """The signed position, fills not yet sent included."""
        watch = self.positions.get(k)
        return (watch.quantity if watch is not None else Decimal(0)) + self.deferred_qty.get(k, 0)

    # ------------------------------------------------------------------ protection
    def _watch(self, k: int, i: int, w: _Watch) -> None:
        sd = self.symbols[k]
        high, low = float(sd.high[i]), float(sd.low[i])
        eps = float(sd.inst.rules.price_tick) / 2
        stop = w.stop
        if w.trailing is not None and w.best is not None:
            trail = w.best - w.trailing if w.is_long else w.best + w.trailing
            stop = trail if stop is None else (max(stop, trail) if w.is_long else min(stop, trail))
        if w.is_long:
            touched = (stop is not None and low <= stop + eps) or (
                w.take_profit is not None and high >= w.take_profit - eps)
        else:
            touched = (stop is not None and high >= stop - eps) or (
                w.take_profit is not None and low <= w.take_profit + eps)
        if touched:
            self._send([k])
        elif w.best is not None:
            w.best = max(w.best, high) if w.is_long else min(w.best, low)

    def _protect_op(self, k: int, i: int) -> dict[str, Any] | None:
        sd = self.symbols[k]
        start = self.mark_from[k]
        if i < start:
            return None
        self.mark_from[k] = i + 1
        return {"op": "protect", "instrument_id": sd.inst.instrument_id,
                "timeframe": sd.timeframe, "from": from_us(int(sd.ts_us[start])).isoformat(),
                "to": from_us(int(sd.ts_us[i])).isoformat(), "_range": (start, i)}

    def _send(self, marks: Iterable[int], ops: Iterable[dict[str, Any]] = ()) -> None:
        """One step: the fills and signals that wait, protect_bars of the symbols in
        `marks` up to their current bar (marks, equity snapshot, protection), then `ops`;
        the protective orders it creates fill on the bar that touched them."""
        todo = self._take_deferred()
        ranges: dict[int, tuple[int, int]] = {}
        for k in marks:
            op = self._protect_op(k, self.current[k])
            if op is not None:
                ranges[k] = op["_range"]
                todo.append(op)
        todo += ops
        if todo:
            answer = self._step(todo)
            if ranges:
                self._settle_protective(answer, ranges)

    def _settle_protective(self, answer: dict[str, Any],
                           ranges: dict[int, tuple[int, int]]) -> None:
        """Fill the protective orders a step created, on the bar that touched them."""
        fired = False
        for o in answer["orders"]:
            if o["trigger"] not in _PROTECTIVE:
                continue
            k = self.by_id[o["instrument_id"]]
            i = self._firing_bar(k, o, ranges[k])
            order = SimOrder(int(o["order_id"]), o["side"], "market", Decimal(o["quantity"]),
                             reduce_only=True, trigger_price=Decimal(o["trigger_price"]))
            fill = self.sims[k].match(order, self.symbols[k].sim_bar(i),
                                      self.symbols[k].inst.rules, cash=self.cash)
            assert fill is not None
            self.counts.protective_orders += 1
            self._queue_fill(k, order, fill)
            fired = True
        if fired:
            self._flush()

    def _firing_bar(self, k: int, order: dict[str, Any], span: tuple[int, int]) -> int:
        """The bar of the protect range `span` whose prices fired a protective order: the
        one closing at the order's triggered_at (set by the ledger when it fired)."""
        fired = order.get("triggered_at")
        sd = self.symbols[k]
        start, end = span
        if fired is not None:
            close_us = to_us(datetime.fromisoformat(fired))
            i = start + int(np.searchsorted(sd.close_us[start:end + 1], close_us))
            if i <= end and int(sd.close_us[i]) == close_us:
                return i
        first, last = (from_us(int(sd.ts_us[j])).isoformat() for j in (start, end))
        raise BacktestError(
            f"protective order {order['order_id']} on {sd.symbol}: no bar from {first} to "
            f"{last} closes at its triggered_at ({fired}), the bar that fired it")

    # ------------------------------------------------------------------ strategy
    def _call_strategy(self, t_us: int, members: list[tuple[int, int]]) -> list[TradeSignal]:
        news, k = self.news, self._news_next
        while k < len(news) and news[k][0] <= t_us:  # known by the bar's close
            self._event(self.strategy.on_news_sentiment, news[k][1])
            k += 1
        self._news_next = k
        data = {}
        for k, i in members:
            series = self.symbols[k].series
            assert series is not None
            data[self.symbols[k].symbol] = series.market_data(i)
        context = StrategyContext(Environment.BACKTEST, from_us(t_us), data, self._account_state,
                                  self._params, log)
        result = self.guard.run_isolated(self.strategy, context)
        if result.error is not None:
            self._strategy_error(str(result.error))
        signals = result.signals
        previous, self._prev_close_us = self._prev_close_us, t_us
        if timer_due(self.timer, None if previous is None else from_us(previous),
                     from_us(t_us)):
            timed = self.guard.run_isolated(self.strategy, context, call=self.strategy.on_timer)
            if timed.error is not None:
                self._strategy_error(str(timed.error))
            signals = signals + timed.signals
        return signals

    def _strategy_error(self, text: str) -> None:
        if len(self.counts.strategy_errors) < 100:
            self.counts.strategy_errors.append(text.splitlines()[0] if text else "error")

    def _event(self, hook: Callable[[Any], None], event: object) -> None:
        try:
            hook(event)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a strategy's callback (sys.exit too) must not stop the run
            self._strategy_error(f"{type(exc).__name__} in {hook.__name__}: {exc}")

    def _account_state(self) -> AccountState:
        """The ledger as of now (sending the fills it has not seen yet first)."""
        if self.deferred:
            self._flush()
        cached = self._account_cache
        if cached is not None and cached[0] == self._now_us:
            return cached[1]
        positions = {}
        value = Decimal(0)
        for k, w in self.positions.items():
            sd = self.symbols[k]
            close = sd.price(3, self.current[k]) if self.current[k] >= 0 else w.average_price
            value += w.quantity * close
            positions[sd.symbol] = PositionState(w.quantity, w.average_price,
                                                 w.quantity * (close - w.average_price))
        state = AccountState(cash=self.cash, equity=self.cash + value, currency=self.currency,
                             positions=positions)
        self._account_cache = (self._now_us, state)
        return state

    # ------------------------------------------------------------------ signals
    def _submit(self, signals: list[TradeSignal]) -> None:
        self.counts.signals += len(signals)
        if all(self._no_op(sig) for sig in signals):
            # a close with nothing held or ordered, or a hold: the ledger's answer is known
            # (ignored), so the signal is recorded with the next step, not a step of its own
            self.deferred += [{**self._signal_op(sig), "_deferred": True} for sig in signals]
            return
        # marks make the ledger's equity current for sizing: only entries are sized (a
        # close is the held quantity; protection never waits for a signal: see _watch)
        sizing = any(sig.action in ("buy", "sell") for sig in signals)
        self._send(self._held_symbols() if sizing else [],
                   [self._signal_op(sig) for sig in signals])

    def _held_symbols(self) -> list[int]:
        return sorted(set(self.positions) | self.deferred_symbols)

    def _no_op(self, sig: TradeSignal) -> bool:
        if sig.action == "hold":
            return True
        k = self.by_symbol.get(sig.symbol.upper())
        return (sig.action == "close" and k is not None and self._held(k) == 0
                and not self.pending[k])

    def _signal_op(self, sig: TradeSignal) -> dict[str, Any]:
        k = self.by_symbol.get(sig.symbol.upper())
        if k is None:
            raise BacktestError(
                f"strategy {sig.strategy} signalled {sig.symbol!r}, which is not a symbol of "
                f"this run ({', '.join(self.by_symbol)})")
        sd = self.symbols[k]
        payload = sig.to_dict()
        payload["op"] = "signal"
        payload["_signal"] = sig
        payload["venue"] = sd.inst.venue
        last = self._last_closed(k)
        if "price" not in payload and last is not None:
            payload["price"] = str(sd.price(3, last))
        # one microsecond before the close: every "at or before" lookup in the database
        # then sees the bar just closed and never the next one, which is already stored
        payload["ts"] = from_us(self._now_us - _ONE_US).isoformat()
        return payload

    def _last_closed(self, k: int) -> int | None:
        """The latest bar of symbol k closed by now (a warm-up bar before its first bar in
        the period), or None: then the database finds no price either (NO_PRICE)."""
        if self.current[k] >= 0:
            return self.current[k]
        sd = self.symbols[k]
        before = int(np.searchsorted(sd.close_us, self._now_us, side="right")) - 1
        return before if before >= 0 else None

    def _signal_result(self, sig: TradeSignal, res: dict[str, Any],
                       created: dict[int, dict[str, Any]], deferred: bool = False) -> None:
        status = res.get("status")
        if deferred and status != "ignored" and len(self.counts.warnings) < 100:
            # the engine held it back as a no-op: its view of the position was wrong
            self.counts.warnings.append(
                f"a {sig.action} signal for {sig.symbol} at {sig.ts.isoformat()} held back as "
                f"a no-op was {status} by the ledger ({res.get('reason_code')})")
        if status == "approved":
            self.counts.approved += 1
            ids = res.get("order_ids") or [res["order_id"]]
            for oid in ids:
                o = created[int(oid)]
                k = self.by_id[o["instrument_id"]]
                self.order_signal[int(oid)] = res.get("signal_id")
                self.pending[k].append(SimOrder(
                    int(oid), o["side"], o["order_type"], Decimal(o["quantity"]),
                    reduce_only=bool(o["reduce_only"]),
                    limit_price=None if o["limit_price"] is None else Decimal(o["limit_price"]),
                    stop_price=None if o["stop_price"] is None else Decimal(o["stop_price"])))
                if any(o.get(x) is not None for x in
                       ("stop_loss", "take_profit", "trailing_stop", "breakeven")):
                    self.protected_orders.add(int(oid))
        elif status == "rejected":
            self.counts.rejected += 1
            self._event(self.strategy.on_order_rejected, OrderRejected(
                symbol=sig.symbol, reason_code=str(res.get("reason_code") or "REJECTED"),
                reason=str(res.get("reason") or ""), ts=from_us(self._now_us),
                signal_id=res.get("signal_id")))
        else:
            self.counts.ignored += 1

    # ------------------------------------------------------------------ steps
    def _take_deferred(self) -> list[dict[str, Any]]:
        ops, self.deferred = self.deferred, []
        self.deferred_symbols = set()
        self.deferred_qty = {}
        return ops

    def _flush(self) -> None:
        if self.deferred:
            self._step(self._take_deferred())

    def _step(self, ops: list[dict[str, Any]]) -> dict[str, Any]:
        sent = [{k: v for k, v in op.items() if not k.startswith("_")} for op in ops]
        row = self.conn.execute(query("backtest_step"),
                                {"run": self.run_id, "ops": Jsonb(sent)}).fetchone()
        assert row is not None
        answer: dict[str, Any] = row[0]
        self.counts.steps += 1
        if self.counts.steps in _ANALYZE_AT:
            self.conn.execute(query("backtest_refresh_statistics"))
        self._apply_state(answer["account"])
        breaker = str(answer["account"].get("breaker") or "OK")
        if breaker != self.breaker:
            self.breaker = breaker
            if breaker == "HARD":
                self._drop_cancelled()
        created = {int(o["order_id"]): o for o in answer["orders"]}
        for op, res in zip(ops, answer["results"], strict=True):
            if "_signal" in op:
                self._signal_result(op["_signal"], res, created, bool(op.get("_deferred")))
        for o in answer["orders"]:
            if o["trigger"] not in _PROTECTIVE and o["trigger"] != "signal":
                # the breaker's closing orders (and any other the ledger made on its own)
                # go out as market orders at the next bar's open
                k = self.by_id[o["instrument_id"]]
                self.pending[k].append(SimOrder(int(o["order_id"]), o["side"], "market",
                                                Decimal(o["quantity"]),
                                                reduce_only=bool(o["reduce_only"])))
        return answer

    def _drop_cancelled(self) -> None:
        """Forget the pending orders the ledger cancelled on its own (a HARD breaker
        cancels the open entries): they never fill."""
        still_open = {int(r[0]) for r in self.conn.execute(query("backtest_open_orders"),
                                                           {"run": self.run_id})}
        for k, orders in self.pending.items():
            self.pending[k] = [o for o in orders if o.order_id in still_open]

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.cash = Decimal(state["cash"])
        self._account_cache = None
        held: dict[int, _Watch] = {}
        for p in state["positions"]:
            k = self.by_id[p["instrument_id"]]
            qty = Decimal(p["quantity"])
            old = self.positions.get(k)
            avg = Decimal(p["average_price"])
            stop = _f(p["stop_loss"])
            if p["breakeven"] is not None:
                # breakeven may move the stop to the entry price: watch the higher level
                entry = float(avg)
                stop = entry if stop is None else (
                    max(stop, entry) if qty > 0 else min(stop, entry))
            anchor = _f(p["trail_anchor"])
            same_side = old is not None and (old.quantity > 0) == (qty > 0)
            if old is not None and same_side and old.best is not None and anchor is not None:
                anchor = max(anchor, old.best) if qty > 0 else min(anchor, old.best)
            held[k] = _Watch(qty, avg, stop, _f(p["take_profit"]), _f(p["trailing_stop"]),
                             anchor)
            if old is None:
                # a new position: protect_bars judges it from the bar it was filled on
                self.mark_from[k] = max(self.current[k], 0)
        self.positions = held

    # ------------------------------------------------------------------ the end
    def _finish_period(self) -> None:
        """Send what is left, mark every position to its last close and cancel the
        orders that never got a bar to fill on."""
        self._send(self._held_symbols())
        open_orders = [r[0] for r in self.conn.execute(query("backtest_open_orders"),
                                                       {"run": self.run_id})]
        if open_orders:
            self._step([{"op": "cancel", "order_id": oid,
                         "reason": "the backtest ended before the order could fill"}
                        for oid in open_orders])


__all__ = ["Engine", "RunCounts"]
