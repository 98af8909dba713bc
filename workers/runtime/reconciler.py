"""The reconciler: each real broker's view of an account compared with the ledger.

The router settles orders as the broker answers them; the reconciler catches what it
missed (a crash between a fill and `apply_fill`, a cancel the venue decided on its own)
and raises the alarm on what nobody can explain (an order or a fill placed outside
MMATS, a position or a cash balance that differs). At start-up, then every
`interval_seconds`, for every account whose broker is real (a paper account's book *is*
the ledger, so it is skipped):

1. **Orders open in the ledger** (in flight, submitted, partially filled) that the
   broker does not list as open are looked up one by one and settled as the router
   would: acknowledged, their missing fills applied, then cancelled / expired / rejected
   with the broker's reason. An order in flight for longer than `in_flight_timeout`
   that the broker does not know never reached it: it is rejected with ORDER_NOT_FOUND,
   or cancelled (CANCEL_REQUESTED, as the router's gate cancels it) when the trader had
   asked to cancel it (`trading.request_cancel`).
   One the broker acknowledged once and no longer knows is ORDER_MISSING_AT_BROKER.
2. **Fills** since the last reconciliation (a cursor `reconcile:<account>` in
   runtime.cursors, minus an overlap for executions a venue publishes late; 24 hours
   back the first time): a fill the ledger lacks for an order it knows (by client order
   id, else broker order id) is *adopted* through `trading.apply_fill`, idempotent on the
   broker's fill id; a fill of an order the ledger does not know is UNKNOWN_BROKER_FILL.
   A venue that lists fills per market only (Binance: `fills_since` without a symbol is
   refused with SYMBOL_REQUIRED, before any request) is asked market by market: the
   markets of the ledger's open orders, of its orders changed in the window and of its
   positions, and those of the broker's positions and open orders, each from a cursor of
   its own (`reconcile:<account>:fills:<symbol>`; a market seen for the first time is
   searched `first_lookback` back). A fill history the broker does not give (a market
   refused, the venue unavailable) is left out of the round: a refusal is reported once
   per episode, an unavailable venue is a warning; the comparison goes on without it
   (its position and cash differences say so), an order whose missing fills are in it
   is settled in a later round, and its cursor does not move.
   **Cash movements** over the same window (a longer overlap, `movement_overlap`, as a
   venue may date a fee by its trade day and post it later; the first time, back to the
   account's creation, at most `first_movement_lookback`): fees, financing,
   dividends, interest, deposits and withdrawals the broker booked outside any fill
   are *booked* through `trading.book_cash`, idempotent on the broker's id for each,
   before cash is compared. One dated before the account was created in MMATS is left
   alone (the cash it started with already held it; a movement a venue dates by its
   day only, at midnight UTC, is booked from the creation day on); one the ledger
   refuses is CASH_NOT_BOOKED. A key that may not list them (Stop) is reported once
   and the round goes on without them.
3. **Orders open at the broker** that the ledger does not know, or holds as finished:
   UNKNOWN_BROKER_ORDER.
4. **Positions**: the ledger's net quantity per symbol (every strategy's rows summed)
   against the broker's; a difference of at least one quantity step is
   POSITION_MISMATCH (with `freeze_on_mismatch` the account's breaker goes to FREEZE).
5. **Cash**: the ledger's cash against the broker's balance in the account currency;
   a difference beyond the tolerance — the larger of `balance_tolerance` (absolute) and
   `balance_relative_tolerance` times the ledger's cash — is BALANCE_MISMATCH. The ledger
   pays for a position out of cash; a margin venue (OANDA: `margin_venues`) does not, its
   balance moves only with realized P&L and costs, so there the ledger's cash *plus its
   open positions at cost* is what the balance is compared with.
   The ledger is also read before the broker is asked: a broker answer that agrees with
   the ledger of then is no mismatch (a fill landed between the two reads).

Every mismatch becomes a critical risk event through `risk.report_mismatch`, *once per
episode*: it is reported when first seen (or seen `confirm_runs` times in a row, for
positions and cash, to ride out a fill landing between two broker reports) and again
only after it has gone away and come back. The episodes reported survive a restart: they
are kept in the worker's heartbeat detail, which the next run reads back.

The reconciler never sends anything to a venue (it only reads it) and writes only
through the trading core's functions. A broker that is unavailable (Retry, BackOff)
skips the account for this round with a warning; one that refuses the credentials
(Stop) is reported, once per episode, and skipped. Nothing is written for a skipped
account, and its cursor does not move. (A failing fill history alone does not skip the
account: see 2.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from workers.brokers import errors
from workers.brokers.base import (
    Balance,
    Broker,
    BrokerFill,
    BrokerOrder,
    BrokerPosition,
    CashMovement,
)
from workers.runtime import log
from workers.runtime.paper import PaperBroker
from workers.runtime.router import RoutedAccount
from workers.runtime.worker import Worker, connect

OPEN_STATUSES = ("in_flight", "submitted", "partially_filled")
TERMINAL_STATUSES = frozenset({"filled", "cancelled", "rejected", "expired"})
# mismatches that describe a state (they persist until someone fixes them) and need the
# confirmation of `confirm_runs` consecutive runs before they are reported
CONFIRMED_KINDS = frozenset({"POSITION_MISMATCH", "BALANCE_MISMATCH"})
# mismatches about one past execution rather than a state: they leave the fill window,
# they are not "resolved"
EVENT_KINDS = frozenset({"UNKNOWN_BROKER_FILL", "FILL_NOT_APPLIED", "CASH_NOT_BOOKED"})
FREEZING_KINDS = frozenset({"POSITION_MISMATCH"})
# venues whose balance does not pay for positions (CFD / margin accounts)
MARGIN_VENUES = frozenset({"oanda"})

_LEDGER_ORDERS = """
SELECT o.order_id, o.client_order_id, o.broker_order_id, o.status::text, o.quantity,
       o.filled_quantity, i.symbol, o.created_at,
       extract(epoch FROM now() - CASE WHEN o.status = 'in_flight'
                                       THEN COALESCE(o.submitted_at, o.updated_at)
                                       ELSE o.updated_at END)::float8,
       o.cancel_requested_at
FROM trading.orders o JOIN market.instruments i USING (instrument_id)
WHERE o.account_id = %(account)s
  AND (o.status = ANY(%(open)s) OR o.client_order_id = ANY(%(clients)s)
       OR o.broker_order_id = ANY(%(brokers)s))
ORDER BY o.order_id
"""
_KNOWN_FILLS = """
SELECT broker_fill_id FROM trading.fills
WHERE account_id = %s AND broker_fill_id = ANY(%s)
"""
_KNOWN_MOVEMENTS = """
SELECT broker_ref, kind::text, amount, currency FROM trading.cash_movements
WHERE account_id = %s AND broker_ref = ANY(%s)
"""
_LEDGER_POSITIONS = """
SELECT i.symbol, sum(CASE WHEN p.leg = 'short' THEN -p.quantity ELSE p.quantity END),
       max(i.quantity_step)
FROM trading.positions p JOIN market.instruments i USING (instrument_id)
WHERE p.account_id = %s
GROUP BY i.symbol
"""
# the markets whose fills a venue that lists them per market (Binance) is asked for: those
# of the account's open orders, of the orders changed in the fill window (a fill of an
# order the ledger knows is on its instrument) and of its positions
_FILL_SYMBOLS = """
SELECT i.symbol FROM trading.orders o JOIN market.instruments i USING (instrument_id)
WHERE o.account_id = %(account)s AND (o.status = ANY(%(open)s) OR o.updated_at >= %(since)s)
UNION
SELECT i.symbol FROM trading.positions p JOIN market.instruments i USING (instrument_id)
WHERE p.account_id = %(account)s AND p.quantity <> 0
"""
_STEPS = """
SELECT symbol, max(quantity_step) FROM market.instruments WHERE symbol = ANY(%s) GROUP BY symbol
"""
_ACCOUNT = """
SELECT a.cash, a.base_currency,
       COALESCE((SELECT sum(CASE WHEN p.leg = 'short' THEN -p.quantity ELSE p.quantity END
                            * COALESCE(p.average_cost, p.average_price))
                 FROM trading.positions p WHERE p.account_id = a.account_id
                   AND p.quantity <> 0), 0)
FROM trading.accounts a WHERE a.account_id = %s
"""


@dataclass
class LedgerOrder:
    """An order as the ledger holds it (what reconciliation needs of it)."""

    order_id: int
    client_order_id: str
    broker_order_id: str | None
    status: str
    quantity: Decimal
    filled_quantity: Decimal
    symbol: str
    created_at: datetime
    # since its last status change; in flight: since it first went in flight (a cancel
    # request or any other write to the row does not restart the in-flight timeout)
    age_seconds: float
    cancel_requested_at: datetime | None = None  # the trader asked to cancel it

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES


@dataclass(frozen=True)
class Mismatch:
    """One disagreement between the broker and the ledger. `subject` makes it distinct
    (a symbol and its difference, an order id, a fill id): the same kind and subject seen
    again is the same episode and is not reported twice."""

    kind: str
    subject: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject}"


@dataclass
class AccountRun:
    """What one reconciliation of one account found and did."""

    account: str
    started_at: datetime
    adopted: int = 0  # broker fills the ledger lacked, applied now
    settled: int = 0  # ledger orders finished now (filled, cancelled, expired, rejected)
    booked: int = 0  # broker cash movements (fees, financing, ...) booked now
    mismatches: list[Mismatch] = field(default_factory=list)  # seen in this run
    reported: list[Mismatch] = field(default_factory=list)  # of which reported now
    skipped: str | None = None  # why the account was not reconciled this round
    # fill histories that could not be read this round, by symbol ("" = the account's
    # whole history), with the broker's error; the rest of the comparison went on
    fills_unread: dict[str, str] = field(default_factory=dict)
    # the per-market fill cursors read up to this round's start (advanced if it completes)
    fill_cursors: list[str] = field(default_factory=list)

    def unread(self, symbol: str) -> bool:
        """Whether `symbol`'s fills could not be read this round."""
        return "" in self.fills_unread or symbol in self.fills_unread

    def summary(self) -> str:
        if self.skipped is not None:
            return f"reconciliation of {self.account} skipped: {self.skipped}"
        new = f" ({len(self.reported)} new)" if self.mismatches else ""
        booked = f"{_count(self.booked, 'cash movement')} booked, " if self.booked else ""
        unread = ""
        if self.fills_unread:
            unread = (", fills not read" if "" in self.fills_unread else
                      f", fills of {', '.join(sorted(self.fills_unread))} not read")
        return (f"reconciled {self.account}: {_count(self.adopted, 'fill')} adopted, "
                f"{_count(self.settled, 'order')} settled, {booked}"
                f"{_count(len(self.mismatches), 'mismatch', 'mismatches')}{new}{unread}")


@dataclass
class _Episode:
    seen: int = 0
    reported: bool = False


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _plain(value: Decimal) -> str:
    """A Decimal as plain text for details and messages (`1E+1` -> `10`)."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _before(ts: datetime, created_at: datetime) -> bool:
    """Whether a movement at `ts` came before an account created at `created_at`; a
    movement dated by its day only (midnight UTC) counts from the creation day on."""
    if ts.astimezone(UTC).time() == datetime.min.time():
        return ts.astimezone(UTC).date() < created_at.astimezone(UTC).date()
    return ts < created_at


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _ledger_refusal(exc: psycopg.Error) -> bool:
    """The trading core refused a call (bad value, a check, its own RAISE) — not a lost
    connection or a missing grant, which must stop the worker loudly."""
    state = exc.sqlstate or ""
    return state[:2] in ("22", "23", "P0")


class Reconciler(Worker):
    """Compares each real broker account with the ledger every `interval_seconds`."""

    kind = "reconciler"

    def __init__(self, url: str, accounts: Mapping[int, RoutedAccount], *,
                 name: str = "reconciler", heartbeat_seconds: float = 5.0,
                 interval_seconds: float = 60.0,
                 first_lookback: timedelta = timedelta(hours=24),
                 fill_overlap: timedelta = timedelta(minutes=5),
                 movement_overlap: timedelta = timedelta(days=3),
                 first_movement_lookback: timedelta = timedelta(days=90),
                 in_flight_timeout: timedelta = timedelta(minutes=10),
                 balance_tolerance: Decimal = Decimal("0.01"),
                 balance_relative_tolerance: Decimal = Decimal("0.001"),
                 confirm_runs: int = 1,
                 margin_venues: Iterable[str] = MARGIN_VENUES,
                 clock: Callable[[], datetime] | None = None) -> None:
        super().__init__(url, name, heartbeat_seconds=heartbeat_seconds)
        if interval_seconds <= 0 or confirm_runs < 1:
            raise ValueError("interval_seconds must be > 0 and confirm_runs >= 1")
        self.accounts = dict(accounts)
        self.interval_seconds = interval_seconds
        self.first_lookback = first_lookback
        self.fill_overlap = fill_overlap
        self.movement_overlap = movement_overlap
        self.first_movement_lookback = first_movement_lookback
        self.in_flight_timeout = in_flight_timeout
        self.balance_tolerance = balance_tolerance
        self.balance_relative_tolerance = balance_relative_tolerance
        self.confirm_runs = confirm_runs
        self.margin_venues = frozenset(margin_venues)
        self.clock = clock or (lambda: datetime.now(UTC))
        self.conn: psycopg.Connection | None = None
        self._next_run = 0.0
        self._episodes: dict[int, dict[str, _Episode]] = {}
        self._broker_alarms: dict[int, set[str]] = {}
        self._movements_refused: set[int] = set()  # accounts whose key may not list them
        self._fill_alarms: dict[int, set[str]] = {}  # fill histories refused, reported
        self._status: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ life
    @property
    def real_accounts(self) -> list[RoutedAccount]:
        """The accounts with a real broker, by id (paper accounts have nothing to compare)."""
        return [a for _, a in sorted(self.accounts.items())
                if not isinstance(a.broker, PaperBroker)]

    def run(self, *, until: Callable[[], bool] | None = None) -> None:
        """Read back the episodes a previous run reported, then loop (Worker.run)."""
        self.restore()
        super().run(until=until)

    def start(self) -> None:
        self.conn = connect(self.url, "mmats_router")
        self._next_run = 0.0  # the first step reconciles at once
        self._update_detail()

    def close(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.close()

    def step(self) -> None:
        """Reconcile when due; otherwise wait (at most a heartbeat) for the next round."""
        now = time.monotonic()
        if now >= self._next_run:
            self._next_run = now + self.interval_seconds
            self.reconcile_all()
            return
        self.stop_event.wait(min(self._next_run - now, max(self.heartbeat_seconds, 0.1)))

    def restore(self) -> None:
        """The mismatch episodes already reported, from this worker's last heartbeat
        detail, so a restart does not report them again."""
        try:
            row = self._hb().execute("SELECT detail FROM runtime.workers WHERE name = %s",
                                     (self.name,)).fetchone()
        except psycopg.Error as exc:
            log.event(self.log, "could not read the previous run's episodes", 30,
                      error=_first_line(exc))
            return
        saved = (row[0] if row else {}) or {}
        by_name = {a.config.name: a.account_id for a in self.real_accounts}
        for name, status in (saved.get("accounts") or {}).items():
            if name not in by_name or not isinstance(status, dict):
                continue
            episodes = self._episodes.setdefault(by_name[name], {})
            for key in status.get("open") or []:
                episodes[str(key)] = _Episode(seen=self.confirm_runs, reported=True)
            self._status[name] = {k: v for k, v in status.items()}

    # ------------------------------------------------------------------ a round
    def reconcile_all(self) -> list[AccountRun]:
        """One round over every real broker account; the heartbeat detail says how each
        went."""
        runs = [self.reconcile(account) for account in self.real_accounts]
        self.state = "degraded" if any(r.skipped or r.fills_unread for r in runs) \
            else "running"
        self._update_detail()
        return runs

    def reconcile(self, routed: RoutedAccount) -> AccountRun:
        """Reconcile one account: settle, adopt, compare, report. Broker errors skip it."""
        broker = routed.broker
        name = routed.config.name
        run = AccountRun(name, self.clock())
        if isinstance(broker, PaperBroker):
            run.skipped = "a paper account: its book is the ledger"
            return run
        try:
            self._reconcile(routed, broker, run)
        except errors.Retry as exc:  # and BackOff: try again next round
            run.skipped = f"broker unavailable: {exc}"
            log.event(self.log, "broker unavailable, account skipped this round", 30,
                      account=name, code=exc.code, error=str(exc))
        except errors.BrokerError as exc:  # Stop (credentials, permissions) and the rest
            run.skipped = f"{exc.code}: {exc}"
            alarms = self._broker_alarms.setdefault(routed.account_id, set())
            if exc.code not in alarms:
                alarms.add(exc.code)
                self.report(exc.code, f"reconciliation of {name} skipped: {exc}", account=name)
            else:
                log.event(self.log, "broker still refusing, account skipped", 30,
                          account=name, code=exc.code, error=str(exc))
        else:
            self._broker_alarms.pop(routed.account_id, None)
            if "" not in run.fills_unread:  # (else the fill window is asked again)
                self._advance_cursor(name, run.started_at)
            for cursor in run.fill_cursors:
                self._advance_named_cursor(cursor, run.started_at)
        self._record(routed, run)
        return run

    def _reconcile(self, routed: RoutedAccount, broker: Broker, run: AccountRun) -> None:
        """The comparison proper. The account's whole picture at the broker (positions,
        cash, open orders, fills) is read before anything is written, so a broker that
        fails there changes nothing. Only step 1's per-order look-ups (an order's status,
        an older order's fills) come later; a failure among them ends the round too, and
        what was settled before it is the broker's own word."""
        account_id = routed.account_id
        cursor = self._cursor(run.account)
        row = self._c.execute("SELECT created_at FROM trading.accounts WHERE account_id = %s",
                              (account_id,)).fetchone()
        assert row is not None  # (accounts are never deleted)
        created_at: datetime = row[0]
        since = (run.started_at - self.first_lookback if cursor is None
                 else cursor - self.fill_overlap)
        margin = broker.venue in self.margin_venues
        # the ledger as it was before the broker was asked: a fill the router (or this
        # round) applies between the broker's answers and the ledger's read below makes
        # the two views of different moments, which is no disagreement
        before = self._ledger_positions(account_id)[0], self._ledger_cash(account_id, margin)[0]
        positions = broker.positions()
        balances = broker.balances()
        open_at_broker = broker.open_orders()
        fills = self._fills(routed, broker, run, since, positions, open_at_broker)
        movements = self._movements(routed, broker, run, cursor, created_at)
        found: list[Mismatch] = []

        orders = self._ledger_orders(account_id, fills, open_at_broker)
        self._settle_ledger_orders(broker, run, orders, open_at_broker, fills, found)
        orders = self._ledger_orders(account_id, fills, open_at_broker)  # after settling
        self._adopt_fills(account_id, run, orders, fills, found)
        self._book_movements(account_id, run, movements, created_at, found)
        found.extend(self._unknown_broker_orders(orders, open_at_broker, broker.venue))
        found.extend(self._position_mismatches(account_id, positions, before[0]))
        found.extend(self._balance_mismatches(account_id, balances, margin=margin,
                                              before=before[1]))
        run.mismatches = [self._with_fills_unread(run, m) for m in found]
        self._report_new(routed, run)

    @staticmethod
    def _with_fills_unread(run: AccountRun, mismatch: Mismatch) -> Mismatch:
        """A position or cash difference seen while fills it may come from were not read
        says so (a fill adopted next round may explain it). The episode is the same."""
        if mismatch.kind == "POSITION_MISMATCH":
            unread = run.unread(str(mismatch.details.get("symbol")))
        elif mismatch.kind == "BALANCE_MISMATCH":
            unread = bool(run.fills_unread)
        else:
            unread = False
        if not unread:
            return mismatch
        return replace(mismatch, message=f"{mismatch.message}; the fill history could not be "
                       "read this round, a missed fill may explain it",
                       details={**mismatch.details, "fills_unread": True})

    # ------------------------------------------------------------------ 0. fill history
    def _fills(self, routed: RoutedAccount, broker: Broker, run: AccountRun, since: datetime,
               positions: Sequence[BrokerPosition],
               open_at_broker: Sequence[BrokerOrder]) -> list[BrokerFill]:
        """The broker's fills of the window, oldest first. A venue that lists them per
        market only (Binance: SYMBOL_REQUIRED, refused before any request) is asked market
        by market (`_fills_by_symbol`). A history the broker does not give is left out and
        said (`_fills_failed`): the positions and the cash are compared all the same."""
        try:
            fills = list(broker.fills_since(since))
        except errors.BrokerError as exc:
            if exc.code != "SYMBOL_REQUIRED":
                self._fills_failed(routed, run, {"": exc})
                return []
        else:
            self._fills_failed(routed, run, {})
            return fills
        return self._fills_by_symbol(routed, broker, run, since, positions, open_at_broker)

    def _fills_by_symbol(self, routed: RoutedAccount, broker: Broker, run: AccountRun,
                         since: datetime, positions: Sequence[BrokerPosition],
                         open_at_broker: Sequence[BrokerOrder]) -> list[BrokerFill]:
        """The fills of every market the account is known to trade: the ledger's open
        orders, orders changed since `since` and positions, the broker's positions and
        open orders. Each market has its own cursor (`reconcile:<account>:<symbol>`), so
        one seen for the first time is searched `first_lookback` back, and one whose
        history failed is asked again from where it was last read. An unavailable broker
        (Retry, BackOff) ends the search for this round; a market refused is left out."""
        rows = self._c.execute(_FILL_SYMBOLS, {"account": routed.account_id,
                                               "open": list(OPEN_STATUSES),
                                               "since": since}).fetchall()
        symbols = sorted({str(r[0]) for r in rows} | {p.symbol for p in positions}
                         | {o.symbol for o in open_at_broker if o.symbol})
        found: dict[str, BrokerFill] = {}
        failed: dict[str, errors.BrokerError] = {}
        for i, symbol in enumerate(symbols):
            name = self._fill_cursor_name(run.account, symbol)
            at = self._named_cursor(name)
            start = (run.started_at - self.first_lookback if at is None
                     else at - self.fill_overlap)
            try:
                fills = broker.fills_since(start, symbol)
            except errors.Retry as exc:  # (and BackOff): the other markets would fail too
                failed.update((rest, exc) for rest in symbols[i:])
                break
            except errors.BrokerError as exc:
                failed[symbol] = exc
                continue
            found.update((f.fill_id, f) for f in fills)
            run.fill_cursors.append(name)
        self._fills_failed(routed, run, failed)
        return sorted(found.values(), key=lambda f: (f.ts, f.fill_id))

    def _fills_failed(self, routed: RoutedAccount, run: AccountRun,
                      failed: Mapping[str, errors.BrokerError]) -> None:
        """Note the fill histories not read (by symbol, "" for the whole account's). An
        unavailable broker is a warning; a refusal is reported once per episode (until
        that history is read again)."""
        run.fills_unread = {symbol: f"{exc.code}: {exc}" for symbol, exc in failed.items()}
        alarms = self._fill_alarms.setdefault(routed.account_id, set())
        current: set[str] = set()
        transient = sorted(s or "(all)" for s, e in failed.items()
                           if isinstance(e, errors.Retry))
        if transient:
            first = next(e for e in failed.values() if isinstance(e, errors.Retry))
            log.event(self.log, "fill history unavailable, positions and cash compared "
                      "without it", 30, account=run.account, symbols=transient,
                      code=first.code, error=str(first))
        for symbol, exc in sorted(failed.items()):
            if isinstance(exc, errors.Retry):
                continue
            key = f"{symbol}:{exc.code}"
            current.add(key)
            if key not in alarms:
                what = f"the fills of {symbol}" if symbol else "its fills"
                self.report(exc.code, f"{run.account}: the broker refused to list {what}, so "
                            f"missed fills are not adopted (positions and cash are still "
                            f"compared): {exc}", account=run.account, symbol=symbol or None)
        # an episode ends once that history is read again (a Retry keeps it open)
        self._fill_alarms[routed.account_id] = current | {
            k for k in alarms if k.rsplit(":", 1)[0] in failed}

    # ------------------------------------------------------------------ 1. ledger orders
    def _settle_ledger_orders(self, broker: Broker, run: AccountRun,
                              orders: Sequence[LedgerOrder],
                              open_at_broker: Sequence[BrokerOrder],
                              fills: Sequence[BrokerFill], found: list[Mismatch]) -> None:
        """Orders the ledger holds open: acknowledged if the broker lists them open,
        otherwise looked up and settled with the broker's answer."""
        listed = {o.client_order_id: o for o in open_at_broker if o.client_order_id}
        listed_ids = {o.broker_order_id: o for o in open_at_broker}
        for order in orders:
            if not order.is_open:
                continue
            at_broker = listed.get(order.client_order_id) or (
                listed_ids.get(order.broker_order_id) if order.broker_order_id else None)
            if at_broker is not None:
                if order.status == "in_flight":
                    self._ledger_call(found, order, "acknowledge_order", order.client_order_id,
                                      at_broker.broker_order_id)
                continue
            try:
                answer = broker.order_status(broker_order_id=order.broker_order_id,
                                             client_order_id=order.client_order_id,
                                             symbol=order.symbol)
            except errors.OrderNotFound as exc:
                self._not_at_broker(broker, run, order, exc, found)
                continue
            self._settle(broker, run, order, answer, fills, found)

    def _not_at_broker(self, broker: Broker, run: AccountRun, order: LedgerOrder,
                       exc: errors.OrderNotFound, found: list[Mismatch]) -> None:
        if order.status == "in_flight":
            if order.age_seconds < self.in_flight_timeout.total_seconds():
                return  # the router may be placing it right now
            if order.cancel_requested_at is not None:
                self._cancel_requested(broker, run, order, found)
                return
            reason = (f"never reached {broker.venue}: unknown there after "
                      f"{order.age_seconds:.0f} s in flight (reconciliation)")
            if self._ledger_call(found, order, "reject_order", order.client_order_id,
                                 "ORDER_NOT_FOUND", reason[:500]):
                run.settled += 1
                log.event(self.log, "order rejected: never reached the broker", 30,
                          account=run.account, client_order_id=order.client_order_id,
                          symbol=order.symbol, reason=reason)
            return
        found.append(Mismatch(
            "ORDER_MISSING_AT_BROKER", order.client_order_id,
            f"order {order.client_order_id} ({order.symbol}) is {order.status} in the ledger "
            f"but unknown at {broker.venue}: {exc}",
            {"client_order_id": order.client_order_id,
             "broker_order_id": order.broker_order_id, "ledger_status": order.status,
             "symbol": order.symbol, "venue": broker.venue}))

    def _cancel_requested(self, broker: Broker, run: AccountRun, order: LedgerOrder,
                          found: list[Mismatch]) -> None:
        """An order in flight that never reached its venue, whose cancel the trader asked
        for: cancelled (CANCEL_REQUESTED), not rejected, as the router cancels such an
        order (`trading.mark_in_flight`: the gate lets no order whose cancel was requested
        go again). A rejection would count toward the account's consecutive rejections,
        whose streak trips the breaker and downgrades the account."""
        if not self._ledger_call(found, order, "mark_in_flight", order.client_order_id):
            return
        _filled, order.status = self._order_state(order.order_id)
        if order.status == "cancelled":
            run.settled += 1
            log.event(self.log, "order cancelled as requested: it never reached the broker",
                      account=run.account, client_order_id=order.client_order_id,
                      symbol=order.symbol, venue=broker.venue)

    def _settle(self, broker: Broker, run: AccountRun, order: LedgerOrder,
                answer: BrokerOrder, fills: Sequence[BrokerFill],
                found: list[Mismatch]) -> None:
        """Settle `order` as the router would with the broker's `answer`: acknowledge,
        apply the fills the ledger lacks, then finish it with the broker's status."""
        if order.status == "in_flight":
            if not self._ledger_call(found, order, "acknowledge_order", order.client_order_id,
                                     answer.broker_order_id):
                return
            order.broker_order_id = answer.broker_order_id
        filled = order.filled_quantity
        if answer.filled_quantity > filled and not answer.fills and run.unread(order.symbol):
            # its executions are in the history that could not be read: next round
            log.event(self.log, "order left for the next round: its fills could not be read",
                      30, account=run.account, client_order_id=order.client_order_id,
                      symbol=order.symbol, broker_status=answer.status)
            return
        if answer.filled_quantity > filled:
            for fill in self._fills_of(broker, order, answer, fills):
                self._adopt(run, order, fill, found)
            filled, order.status = self._order_state(order.order_id)
        if answer.filled_quantity > filled:
            # finishing the order now would shut out the fills still missing
            found.append(Mismatch(
                "MISSING_BROKER_FILLS", order.client_order_id,
                f"order {order.client_order_id} ({order.symbol}): {broker.venue} reports "
                f"{_plain(answer.filled_quantity)} filled, the ledger "
                f"{_plain(filled)}, and the missing executions were not found",
                {"client_order_id": order.client_order_id,
                 "broker_order_id": answer.broker_order_id, "symbol": order.symbol,
                 "broker_filled": _plain(answer.filled_quantity),
                 "ledger_filled": _plain(filled), "broker_status": answer.status}))
            return
        if order.status == "filled":
            run.settled += 1
            return
        done = None
        if answer.status == "cancelled":
            done = self._ledger_call(found, order, "cancel_order", order.client_order_id,
                                     (answer.reason or f"cancelled at {broker.venue} "
                                      "(found by reconciliation)")[:500])
        elif answer.status == "expired":
            done = self._ledger_call(found, order, "expire_order", order.client_order_id)
        elif answer.status == "rejected":
            done = self._ledger_call(found, order, "reject_order", order.client_order_id,
                                     "BROKER_REJECTED",
                                     (answer.reason or f"rejected by {broker.venue}")[:500])
        if done:
            run.settled += 1
            log.event(self.log, f"order {answer.status} at the broker, settled",
                      account=run.account, client_order_id=order.client_order_id,
                      symbol=order.symbol, reason=answer.reason)

    def _fills_of(self, broker: Broker, order: LedgerOrder, answer: BrokerOrder,
                  fills: Sequence[BrokerFill]) -> list[BrokerFill]:
        """The executions of `order`: on the answer (OANDA), in this round's fill report,
        or else in the venue's history since the order was created (Alpaca reports only
        cumulative quantities on the order)."""
        known = {r[0] for r in self._c.execute(
            "SELECT broker_fill_id FROM trading.fills WHERE order_id = %s",
            (order.order_id,)).fetchall()}
        if answer.fills:
            return [f for f in answer.fills if f.fill_id not in known]
        mine = [f for f in fills
                if f.broker_order_id == answer.broker_order_id and f.fill_id not in known]
        if order.filled_quantity + sum((f.quantity for f in mine), Decimal(0)) \
                >= answer.filled_quantity:
            return mine
        since = order.created_at - timedelta(minutes=5)
        return [f for f in broker.fills_since(since, order.symbol)
                if f.broker_order_id == answer.broker_order_id and f.fill_id not in known]

    # ------------------------------------------------------------------ 2. fills
    def _adopt_fills(self, account_id: int, run: AccountRun, orders: Sequence[LedgerOrder],
                     fills: Sequence[BrokerFill], found: list[Mismatch]) -> None:
        """Apply the broker's fills the ledger lacks; name those of unknown orders."""
        if not fills:
            return
        known = {r[0] for r in self._c.execute(
            _KNOWN_FILLS, (account_id, [f.fill_id for f in fills])).fetchall()}
        by_client = {o.client_order_id: o for o in orders}
        # by the venue's order id within one market: Binance numbers orders per market, so
        # a manual ETH/USDT fill of order 28457 is not MMATS's BTC/USDT order 28457
        by_broker = {(o.broker_order_id, o.symbol): o for o in orders if o.broker_order_id}
        for fill in fills:
            if fill.fill_id in known:
                continue
            order = (by_client.get(fill.client_order_id) if fill.client_order_id else None) \
                or by_broker.get((fill.broker_order_id, fill.symbol))
            if order is None:
                found.append(Mismatch(
                    "UNKNOWN_BROKER_FILL", fill.fill_id,
                    f"{fill.side} {_plain(fill.quantity)} {fill.symbol} at {_plain(fill.price)} "
                    f"(fill {fill.fill_id}, order {fill.broker_order_id}) is not an order of "
                    "the ledger: placed outside MMATS?",
                    self._fill_details(fill)))
                continue
            self._adopt(run, order, fill, found)
            known.add(fill.fill_id)

    def _adopt(self, run: AccountRun, order: LedgerOrder, fill: BrokerFill,
               found: list[Mismatch]) -> bool:
        """`trading.apply_fill` with the broker's fill id: True if the ledger holds the
        fill now (applied, or already there)."""
        payload = {"client_order_id": order.client_order_id, "broker_fill_id": fill.fill_id,
                   "quantity": str(fill.quantity), "price": str(fill.price),
                   "commission": str(fill.commission),
                   "commission_currency": fill.commission_currency,
                   "liquidity": fill.liquidity, "ts": fill.ts.isoformat()}
        try:
            row = self._c.execute("SELECT trading.apply_fill(%s)", (Jsonb(payload),)).fetchone()
        except psycopg.Error as exc:
            if not _ledger_refusal(exc):
                raise
            found.append(Mismatch(
                "FILL_NOT_APPLIED", fill.fill_id,
                f"the ledger refused {fill.side} {_plain(fill.quantity)} {fill.symbol} at "
                f"{_plain(fill.price)} (fill {fill.fill_id}) for order {order.client_order_id}, "
                f"{order.status} in the ledger: {_first_line(exc)}",
                {**self._fill_details(fill), "client_order_id": order.client_order_id,
                 "ledger_status": order.status, "error": _first_line(exc)}))
            return False
        result: dict[str, Any] = row[0] if row else {}
        if result.get("status") == "applied":
            run.adopted += 1
            log.event(self.log, "fill adopted", account=run.account,
                      client_order_id=order.client_order_id, fill_id=fill.fill_id,
                      symbol=fill.symbol, side=fill.side, quantity=_plain(fill.quantity),
                      price=_plain(fill.price))
        return True

    def _movements(self, routed: RoutedAccount, broker: Broker, run: AccountRun,
                   cursor: datetime | None, created_at: datetime) -> list[CashMovement]:
        """The broker's cash movements of the window. A key that may not read them (a
        trade-only key without the venue's funds-query permission: Stop) leaves them out
        and is reported once; the rest of the comparison runs, and what they moved shows
        as a BALANCE_MISMATCH. An unavailable broker (Retry) skips the round as usual.
        The first round reaches back to the account's creation (at most
        `first_movement_lookback`): a fee charged before the reconciler first ran is in
        the broker's cash and not in the ledger's."""
        since = (max(created_at, run.started_at - self.first_movement_lookback)
                 if cursor is None else cursor - self.movement_overlap)
        try:
            found = list(broker.cash_movements_since(since))
        except errors.Stop as exc:
            if routed.account_id not in self._movements_refused:
                self._movements_refused.add(routed.account_id)
                self.report(exc.code, f"{run.account}: the broker refused to list its cash "
                            f"movements (fees, deposits, withdrawals), so they are not "
                            f"booked: {exc}", account=run.account)
            return []
        self._movements_refused.discard(routed.account_id)
        return found

    def _book_movements(self, account_id: int, run: AccountRun,
                        movements: Sequence[CashMovement], created_at: datetime,
                        found: list[Mismatch]) -> None:
        """Book the broker's cash movements the ledger lacks through trading.book_cash
        (idempotent on the broker's id: a repeat changes nothing); those dated before the
        account existed in MMATS are in its starting cash already."""
        if not movements:
            return
        # the ones already booked as the broker reports them (each round sees the
        # overlap again): skipped without a call; one booked otherwise is refused below
        known = {(r[0], r[1], Decimal(r[2]), r[3]) for r in self._c.execute(
            _KNOWN_MOVEMENTS, (account_id, [m.movement_id for m in movements])).fetchall()}
        for m in movements:
            if (m.movement_id, m.kind, m.amount, m.currency.upper()) in known:
                continue
            if _before(m.ts, created_at):
                continue
            payload = {"account": run.account, "kind": m.kind, "amount": str(m.amount),
                       "currency": m.currency, "broker_ref": m.movement_id,
                       "ts": m.ts.isoformat(), "symbol": m.symbol,
                       "description": m.description}
            try:
                row = self._c.execute("SELECT trading.book_cash(%s)",
                                      (Jsonb(payload),)).fetchone()
            except psycopg.Error as exc:
                if not _ledger_refusal(exc):
                    raise
                found.append(Mismatch(
                    "CASH_NOT_BOOKED", m.movement_id,
                    f"the ledger refused the broker's {m.kind} of {_plain(m.amount)} "
                    f"{m.currency} (movement {m.movement_id}): {_first_line(exc)}",
                    {"movement_id": m.movement_id, "kind": m.kind, "amount": _plain(m.amount),
                     "currency": m.currency, "ts": m.ts.isoformat(),
                     "error": _first_line(exc)}))
                continue
            if row is not None and row[0]["status"] == "booked":
                run.booked += 1
                log.event(self.log, "cash movement booked", account=run.account,
                          movement_id=m.movement_id, kind=m.kind, amount=_plain(m.amount),
                          currency=m.currency, symbol=m.symbol)

    @staticmethod
    def _fill_details(fill: BrokerFill) -> dict[str, Any]:
        return {"fill_id": fill.fill_id, "broker_order_id": fill.broker_order_id,
                "client_order_id": fill.client_order_id, "symbol": fill.symbol,
                "side": fill.side, "quantity": _plain(fill.quantity),
                "price": _plain(fill.price), "ts": fill.ts.isoformat()}

    # ------------------------------------------------------------------ 3. broker orders
    @staticmethod
    def _unknown_broker_orders(orders: Sequence[LedgerOrder],
                               open_at_broker: Sequence[BrokerOrder],
                               venue: str) -> list[Mismatch]:
        by_client = {o.client_order_id: o for o in orders}
        by_broker = {o.broker_order_id: o for o in orders if o.broker_order_id}
        out = []
        for b in open_at_broker:
            order = (by_client.get(b.client_order_id) if b.client_order_id else None) \
                or by_broker.get(b.broker_order_id)
            if order is not None and order.status not in TERMINAL_STATUSES:
                continue
            where = "is not in the ledger" if order is None else \
                f"is {order.status} in the ledger"
            out.append(Mismatch(
                "UNKNOWN_BROKER_ORDER", b.broker_order_id,
                f"{b.side} {_plain(b.quantity)} {b.symbol} order {b.broker_order_id} "
                f"(client id {b.client_order_id or '-'}) is open at {venue} but {where}",
                {"broker_order_id": b.broker_order_id, "client_order_id": b.client_order_id,
                 "symbol": b.symbol, "side": b.side, "quantity": _plain(b.quantity),
                 "filled_quantity": _plain(b.filled_quantity), "broker_status": b.status,
                 "ledger_status": None if order is None else order.status}))
        return out

    # ------------------------------------------------------------------ 4. positions
    def _ledger_positions(self, account_id: int
                          ) -> tuple[dict[str, Decimal], dict[str, Decimal]]:
        """The ledger's net quantity and quantity step per symbol."""
        ledger: dict[str, Decimal] = {}
        steps: dict[str, Decimal] = {}
        for symbol, quantity, step in self._c.execute(_LEDGER_POSITIONS,
                                                      (account_id,)).fetchall():
            ledger[symbol] = Decimal(quantity)
            steps[symbol] = Decimal(step)
        return ledger, steps

    def _position_mismatches(self, account_id: int, positions: Iterable[BrokerPosition],
                             before: Mapping[str, Decimal] | None = None) -> list[Mismatch]:
        """`before`: the ledger's quantities read before the broker's positions; a broker
        quantity that agrees with them is no mismatch (a fill landed in between)."""
        ledger, steps = self._ledger_positions(account_id)
        broker: dict[str, Decimal] = {}
        for p in positions:
            broker[p.symbol] = broker.get(p.symbol, Decimal(0)) + p.quantity
        missing = sorted(set(broker) - set(steps))
        if missing:
            steps.update({s: Decimal(q) for s, q in self._c.execute(_STEPS,
                                                                    (missing,)).fetchall()})
        out = []
        for symbol in sorted(set(ledger) | set(broker)):
            held, booked = broker.get(symbol, Decimal(0)), ledger.get(symbol, Decimal(0))
            step = steps.get(symbol, Decimal(0))
            difference = held - booked
            if difference == 0 or (step > 0 and abs(difference) < step):
                continue  # less than one lot: rounding, not a position
            if before is not None:
                earlier = held - before.get(symbol, Decimal(0))
                if earlier == 0 or (step > 0 and abs(earlier) < step):
                    continue  # the broker's answer is of the ledger before a fill
            out.append(Mismatch(
                "POSITION_MISMATCH", f"{symbol}:{_plain(difference)}",
                f"{symbol}: the broker holds {_plain(held)}, the ledger {_plain(booked)} "
                f"(difference {_plain(difference)}, quantity step {_plain(step)})",
                {"symbol": symbol, "broker": _plain(held), "ledger": _plain(booked),
                 "difference": _plain(difference), "quantity_step": _plain(step)}))
        return out

    # ------------------------------------------------------------------ 5. cash
    def _ledger_cash(self, account_id: int, margin: bool) -> tuple[Decimal, str, str]:
        """(what the broker's balance is compared with, the account currency, its basis)"""
        row = self._c.execute(_ACCOUNT, (account_id,)).fetchone()
        assert row is not None, f"account {account_id} is not in the ledger"
        cash, currency, at_cost = Decimal(row[0]), str(row[1]), Decimal(row[2])
        if margin and at_cost != 0:
            return cash + at_cost, currency, "cash + open positions at cost"
        return cash, currency, "cash"

    def _balance_mismatches(self, account_id: int, balances: Sequence[Balance], *,
                            margin: bool, before: Decimal | None = None) -> list[Mismatch]:
        """`before`: the ledger's cash read before the broker's balances; a balance that
        agrees with it is no mismatch (a fill landed in between)."""
        cash, currency, basis = self._ledger_cash(account_id, margin)
        at_broker = [b for b in balances if b.currency.upper() == currency]
        if not at_broker:
            return [Mismatch(
                "BALANCE_MISMATCH", f"{currency}:missing",
                f"{currency}: the ledger holds {_plain(cash)}, the broker reports no "
                f"{currency} balance (only {', '.join(b.currency for b in balances) or 'none'})",
                {"currency": currency, "broker": None, "ledger": _plain(cash),
                 "basis": basis})]
        total = sum((b.total for b in at_broker), Decimal(0))
        difference = total - cash
        tolerance = max(self.balance_tolerance, self.balance_relative_tolerance * abs(cash))
        if abs(difference) <= tolerance or (before is not None
                                            and abs(total - before) <= tolerance):
            return []
        return [Mismatch(
            "BALANCE_MISMATCH", currency,
            f"{currency}: the broker holds {_plain(total)}, the ledger {_plain(cash)} "
            f"(difference {_plain(difference)}, tolerance {_plain(tolerance)}"
            + ("" if basis == "cash" else f"; ledger {basis}") + ")",
            {"currency": currency, "broker": _plain(total), "ledger": _plain(cash),
             "difference": _plain(difference), "tolerance": _plain(tolerance),
             "basis": basis})]

    # ------------------------------------------------------------------ reporting
    def _report_new(self, routed: RoutedAccount, run: AccountRun) -> None:
        """Report what is new this episode; forget what has gone away."""
        episodes = self._episodes.setdefault(routed.account_id, {})
        current = {m.key: m for m in run.mismatches}
        for key in sorted(set(episodes) - set(current)):
            if episodes.pop(key).reported and key.split(":", 1)[0] not in EVENT_KINDS:
                log.event(self.log, "mismatch resolved", account=run.account, mismatch=key)
        for key, mismatch in current.items():
            episode = episodes.setdefault(key, _Episode())
            episode.seen += 1
            needed = self.confirm_runs if mismatch.kind in CONFIRMED_KINDS else 1
            if episode.reported or episode.seen < needed:
                continue
            self._report_mismatch(routed, mismatch)
            episode.reported = True
            run.reported.append(mismatch)

    def _report_mismatch(self, routed: RoutedAccount, mismatch: Mismatch) -> None:
        """A critical risk event (and the FREEZE the account's configuration asks for)."""
        name = routed.config.name
        freeze = routed.config.freeze_on_mismatch and mismatch.kind in FREEZING_KINDS
        try:
            self._c.execute("SELECT risk.report_mismatch(%s, %s, %s, %s, %s)",
                            (name, mismatch.kind, mismatch.message[:2000],
                             Jsonb(mismatch.details), freeze))
        except psycopg.errors.InsufficientPrivilege as exc:
            # the role may not reach risk.report_mismatch (a missing grant): say so where
            # people look, rather than lose the mismatch
            self.report(mismatch.kind, f"{name}: {mismatch.message} (NOT recorded as a risk "
                        f"event{', account NOT frozen' if freeze else ''}: "
                        f"{_first_line(exc)})", account=name, mismatch=mismatch.details)
            return
        log.event(self.log, "mismatch reported", 40, account=name, mismatch=mismatch.kind,
                  text=mismatch.message, frozen=freeze, details=mismatch.details)

    def _record(self, routed: RoutedAccount, run: AccountRun) -> None:
        """The run's one-line summary, and the account's entry of the heartbeat detail."""
        if run.skipped is None:
            log.event(self.log, run.summary(), account=run.account, adopted=run.adopted,
                      settled=run.settled, booked=run.booked, mismatches=len(run.mismatches),
                      reported=len(run.reported))
        previous = self._status.get(run.account, {})
        episodes = self._episodes.get(routed.account_id, {})
        self._status[run.account] = {
            "last_run": run.started_at.isoformat(),
            "status": "skipped" if run.skipped else "ok",
            "error": run.skipped,
            "last_ok": run.started_at.isoformat() if run.skipped is None
            else previous.get("last_ok"),
            "adopted": run.adopted, "settled": run.settled, "booked": run.booked,
            "mismatches": len(run.mismatches), "reported": len(run.reported),
            "open": sorted(k for k, e in episodes.items() if e.reported),
            "fills_unread": sorted(s or "*" for s in run.fills_unread),
        }

    def _update_detail(self) -> None:
        self.detail = {"interval_seconds": self.interval_seconds,
                       "accounts": {k: dict(v) for k, v in sorted(self._status.items())}}

    # ------------------------------------------------------------------ ledger access
    @property
    def _c(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.url, "mmats_router")
        return self.conn

    def _cursor(self, account: str) -> datetime | None:
        """When the account was last reconciled (None: never)."""
        return self._named_cursor(f"reconcile:{account}")

    def _advance_cursor(self, account: str, at: datetime) -> None:
        self._advance_named_cursor(f"reconcile:{account}", at)

    @staticmethod
    def _fill_cursor_name(account: str, symbol: str) -> str:
        """The cursor of one market's fills, for a venue that lists them per market."""
        return f"reconcile:{account}:fills:{symbol}"[:200]

    def _named_cursor(self, name: str) -> datetime | None:
        row = self._c.execute("SELECT at FROM runtime.cursors WHERE name = %s",
                              (name,)).fetchone()
        return None if row is None else row[0]

    def _advance_named_cursor(self, name: str, at: datetime) -> None:
        self._c.execute("SELECT runtime.advance_cursor(%s, NULL, %s)", (name, at))

    def _ledger_orders(self, account_id: int, fills: Sequence[BrokerFill],
                       open_at_broker: Sequence[BrokerOrder]) -> list[LedgerOrder]:
        """The account's open orders, and every order a broker fill or open order names."""
        clients = sorted({f.client_order_id for f in fills if f.client_order_id}
                         | {o.client_order_id for o in open_at_broker if o.client_order_id})
        brokers = sorted({f.broker_order_id for f in fills}
                         | {o.broker_order_id for o in open_at_broker})
        rows = self._c.execute(_LEDGER_ORDERS, {"account": account_id,
                                                "open": list(OPEN_STATUSES),
                                                "clients": clients,
                                                "brokers": brokers}).fetchall()
        return [LedgerOrder(int(r[0]), r[1], r[2], r[3], Decimal(r[4]), Decimal(r[5]), r[6],
                            r[7], float(r[8]), r[9]) for r in rows]

    def _order_state(self, order_id: int) -> tuple[Decimal, str]:
        row = self._c.execute("SELECT filled_quantity, status::text FROM trading.orders "
                              "WHERE order_id = %s", (order_id,)).fetchone()
        assert row is not None
        return Decimal(row[0]), str(row[1])

    def _ledger_call(self, found: list[Mismatch], order: LedgerOrder, function: str,
                     *args: Any) -> bool:
        """`trading.<function>(args)` for `order`; a refusal is a LEDGER_REFUSED mismatch
        (the broker says one thing, the ledger will not record it)."""
        placeholders = ", ".join(["%s"] * len(args))
        try:
            self._c.execute(f"SELECT trading.{function}({placeholders})", args)
        except psycopg.Error as exc:
            if not _ledger_refusal(exc):
                raise
            found.append(Mismatch(
                "LEDGER_REFUSED", f"{order.client_order_id}:{function}",
                f"order {order.client_order_id} ({order.symbol}, {order.status} in the "
                f"ledger): trading.{function} refused: {_first_line(exc)}",
                {"client_order_id": order.client_order_id, "function": function,
                 "ledger_status": order.status, "error": _first_line(exc)}))
            return False
        return True
