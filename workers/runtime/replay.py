"""The replay feed: stored bars played into the live pipeline as if they were arriving now.

A replay session gets its own venue (`replay<N>`): each replayed symbol is copied as an
instrument of that venue (same tick, step, minimum, currencies and calendar), its
warm-up bars are copied before the session starts, and then the replay worker inserts
the period's bars one time step at a time. Every insert goes through the bars trigger
(protection, mark-to-market, equity snapshots, NOTIFY), so the strategy worker, the
order queue, the router and the paper broker do exactly what they do on live data.

Lockstep: before the next time step the replay waits until the pipeline has settled the
last one: the paper broker has settled it (the fills at its open, the stops it fired)
and every strategy cursor of the session's accounts has reached it (their signals of
that bar are committed with the cursor, their orders queued). The orders need not be
read yet: the router drains the queue before it settles the next bar, so they fill at
its open whenever it arrives. `--speed N` then paces the steps at N times real time.
So a replay gives the same trades as `mmats backtest` on the same bars (the parity
test), however slow or fast the machine. The session is resumable: a killed
replay worker carries on from the last bar it inserted.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from db.errors import MmatsError
from workers.backtest.data import TIMEFRAME_US
from workers.runtime import log
from workers.runtime.worker import Worker

_COPY_BARS = """
INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close, volume)
SELECT m.target, b.timeframe, b.ts, b.open, b.high, b.low, b.close, b.volume
FROM market.bars b JOIN unnest(%(sources)s::bigint[], %(targets)s::bigint[]) AS m(source, target)
  ON b.instrument_id = m.source
WHERE b.timeframe = %(tf)s AND b.ts > %(after)s AND b.ts <= %(until)s
ORDER BY m.target, b.ts
ON CONFLICT DO NOTHING
"""


_ONE_US = timedelta(microseconds=1)


class ReplayError(MmatsError):
    """A replay that cannot run as asked."""


@dataclass(frozen=True)
class ReplaySession:
    """What `[replay]` of a session file says (written by `prepare`)."""

    session: int
    venue: str
    account: str
    timeframe: str
    start: datetime
    end: datetime
    speed: float | None  # None: as fast as the pipeline settles
    sources: tuple[int, ...]  # instrument ids of the stored bars
    targets: tuple[int, ...]  # their copies on the replay venue
    symbols: tuple[str, ...]
    accounts: tuple[str, ...] = ()  # every account whose strategies the replay waits for

    @property
    def waits_for(self) -> tuple[str, ...]:
        return self.accounts or (self.account,)

    def to_toml(self) -> str:
        speed = "\"max\"" if self.speed is None else repr(self.speed)
        return "\n".join([
            "[replay]",
            f"session = {self.session}",
            f"venue = \"{self.venue}\"",
            f"account = \"{self.account}\"",
            f"timeframe = \"{self.timeframe}\"",
            f"start = \"{self.start.isoformat()}\"",
            f"end = \"{self.end.isoformat()}\"",
            f"speed = {speed}",
            f"sources = {list(self.sources)}",
            f"targets = {list(self.targets)}",
            f"symbols = {_toml_list(self.symbols)}",
            f"accounts = {_toml_list(self.waits_for)}",
            ""])

    @classmethod
    def from_table(cls, t: dict[str, Any]) -> ReplaySession:
        try:
            speed = t["speed"]
            return cls(int(t["session"]), str(t["venue"]), str(t["account"]),
                       str(t["timeframe"]), datetime.fromisoformat(t["start"]),
                       datetime.fromisoformat(t["end"]),
                       None if speed == "max" else float(speed),
                       tuple(int(x) for x in t["sources"]), tuple(int(x) for x in t["targets"]),
                       tuple(str(x) for x in t["symbols"]),
                       tuple(str(x) for x in t.get("accounts", ())))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplayError(f"[replay] table is incomplete or malformed: {exc}") from None


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for v in values) + "]"


def load_session(path: Path) -> ReplaySession | None:
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    table = raw.get("replay")
    return None if table is None else ReplaySession.from_table(table)


def next_session(conn: psycopg.Connection) -> int:
    # (after the sessions' venues and accounts both: an account named paper-replay-N made
    # by hand was taken for session N's)
    row = conn.execute(
        "SELECT GREATEST((SELECT max(substring(venue FROM '^replay(\\d+)$')::int)"
        "                 FROM market.instruments WHERE venue ~ '^replay\\d+$'),"
        "                (SELECT max(substring(name FROM '^paper-replay-(\\d{1,9})$')::int)"
        "                 FROM trading.accounts WHERE name ~ '^paper-replay-\\d{1,9}$'), 0) + 1"
        ).fetchone()
    assert row is not None
    return int(row[0])


def copy_instruments(conn: psycopg.Connection, symbols: list[str],
                     venue: str) -> list[tuple[int, int, str]]:
    """(source id, replay id, symbol) for each symbol (`SYM` or `SYM@venue`)."""
    out = []
    for text in symbols:
        name, _, source_venue = text.strip().partition("@")
        rows = conn.execute(
            "SELECT instrument_id, venue FROM market.instruments WHERE symbol = %s "
            "AND (%s::text IS NULL OR venue = %s) AND venue !~ '^replay\\d+$'",
            (name.upper(), source_venue or None, source_venue or None)).fetchall()
        if not rows:
            raise ReplayError(f"unknown symbol {name!r}: import its bars first (mmats data import)")
        if len(rows) > 1:
            raise ReplayError(f"symbol {name!r} exists on several venues "
                              f"({', '.join(r[1] for r in rows)}): name one as {name}@VENUE")
        source = int(rows[0][0])
        row = conn.execute(
            "INSERT INTO market.instruments (symbol, venue, market, base_currency, "
            "quote_currency, contract_type, price_tick, quantity_step, min_quantity, "
            "calendar_id) SELECT symbol, %s, market, base_currency, quote_currency, "
            "contract_type, price_tick, quantity_step, min_quantity, calendar_id "
            "FROM market.instruments WHERE instrument_id = %s RETURNING instrument_id, symbol",
            (venue, source)).fetchone()
        assert row is not None
        out.append((source, int(row[0]), str(row[1])))
    return out


def copy_warmup(conn: psycopg.Connection, pairs: list[tuple[int, int, str]], timeframe: str,
                start: datetime, warmup_bars: int) -> datetime | None:
    """Copy each symbol's `warmup_bars` bars before `start`; returns the latest copied."""
    latest: datetime | None = None
    for source, target, _symbol in pairs:
        row = conn.execute(
            "SELECT min(ts), max(ts) FROM (SELECT ts FROM market.bars WHERE instrument_id = %s "
            "AND timeframe = %s AND ts < %s ORDER BY ts DESC LIMIT %s) x",
            (source, timeframe, start, max(warmup_bars, 0))).fetchone()
        if row is None or row[0] is None:
            continue
        conn.execute(_COPY_BARS, {"sources": [source], "targets": [target], "tf": timeframe,
                                  "after": row[0] - _ONE_US, "until": row[1]})
        latest = row[1] if latest is None else max(latest, row[1])
    return latest


class ReplayIngest(Worker):
    """The ingest worker of a replay session: inserts the period's bars in time steps."""

    kind = "ingest"

    def __init__(self, url: str, session: ReplaySession, *, name: str | None = None,
                 heartbeat_seconds: float = 5.0, settle_timeout: float = 60.0) -> None:
        super().__init__(url, name or f"replay{session.session}",
                         heartbeat_seconds=heartbeat_seconds)
        self.session = session
        self.settle_timeout = settle_timeout
        self.conn: psycopg.Connection | None = None
        self.listen: psycopg.Connection | None = None
        self.done = False
        self.steps = 0
        self._times: list[datetime] = []
        self._k = 0
        self._next_at = 0.0
        self.expected_cursors = 0

    def start(self) -> None:
        self.conn = psycopg.connect(self.url, autocommit=True, application_name="mmats-replay")
        self.listen = psycopg.connect(self.url, autocommit=True, application_name="mmats-replay")
        self.listen.execute("LISTEN mmats_cursor")
        s = self.session
        last = self._last_copied()
        rows = self.conn.execute(
            "SELECT DISTINCT ts FROM market.bars WHERE instrument_id = ANY(%s) AND timeframe = %s "
            "AND ts >= %s AND ts < %s AND ts > %s ORDER BY ts",
            (list(s.sources), s.timeframe, s.start, s.end,
             last if last is not None else datetime.min.replace(tzinfo=s.start.tzinfo))
        ).fetchall()
        self._times = [r[0] for r in rows]
        row = self.conn.execute(
            "SELECT count(*) FROM runtime.cursors WHERE split_part(name, ':', 1) = 'strategy' "
            "AND split_part(name, ':', 2) = ANY(%s)", (list(s.waits_for),)).fetchone()
        self.expected_cursors = int(row[0]) if row else 0
        if self.expected_cursors == 0:
            raise ReplayError(f"replay session {s.session}: no strategy resume point for "
                              f"{', '.join(s.waits_for)} (prepare the session first)")
        self.detail = {"session": s.session, "account": s.account, "left": len(self._times)}
        log.event(self.log, "replay started", session=s.session, account=s.account,
                  bars_left=len(self._times), speed=s.speed or "max")
        if last is not None:
            self._wait_settled(last)

    def close(self) -> None:
        for c in (self.conn, self.listen):
            if c is not None and not c.closed:
                c.close()

    def _last_copied(self) -> datetime | None:
        assert self.conn is not None
        row = self.conn.execute(
            "SELECT max(ts) FROM market.bars WHERE instrument_id = ANY(%s) AND timeframe = %s "
            "AND ts >= %s", (list(self.session.targets), self.session.timeframe,
                             self.session.start)).fetchone()
        return None if row is None else row[0]

    def step(self) -> None:
        assert self.conn is not None
        if self._k >= len(self._times):
            self.done = True
            self.stop()
            return
        s = self.session
        if s.speed is not None:
            wait = self._next_at - time.monotonic()
            if wait > 0 and self.stop_event.wait(wait):
                return
            self._next_at = time.monotonic() + TIMEFRAME_US[s.timeframe] / 1e6 / s.speed
        t = self._times[self._k]
        previous = self._times[self._k - 1] if self._k else t - _ONE_US
        args = {"sources": list(s.sources), "targets": list(s.targets), "tf": s.timeframe,
                "after": previous, "until": t}
        for attempt in range(1, 6):  # the bars trigger may meet the router on a lock
            try:
                self.conn.execute(_COPY_BARS, args)
                break
            except psycopg.errors.DeadlockDetected:
                if attempt == 5:
                    raise
                time.sleep(0.01 * attempt)
        self._k += 1
        self.steps += 1
        log.event(self.log, "bars inserted", bar=t.isoformat(),
                  inserted_at=datetime.now(UTC).isoformat())
        self.detail["left"] = len(self._times) - self._k
        self.detail["at"] = t.isoformat()
        self._wait_settled(t)

    def settled(self, t: datetime) -> bool:
        """The paper broker has settled bar `t` of every replayed instrument and every
        strategy of the session's accounts has seen it (the orders they sent on it may
        still wait in the queue: the router reads them before it settles the next bar)."""
        assert self.conn is not None
        accounts = list(self.session.waits_for)
        paper = [f"paper:{i}:{self.session.timeframe}" for i in self.session.targets]
        row = self.conn.execute(
            "SELECT (SELECT count(*) = %(n)s AND bool_and(c.at >= %(t)s) FROM runtime.cursors c "
            "        WHERE split_part(c.name, ':', 1) = 'strategy' "
            "          AND split_part(c.name, ':', 2) = ANY(%(acc)s)) "
            "   AND (SELECT count(*) = %(np)s AND bool_and(c.at >= %(t)s) FROM runtime.cursors c "
            "        WHERE c.name = ANY(%(paper)s))",
            {"t": t, "acc": accounts, "n": self.expected_cursors, "paper": paper,
             "np": len(paper)}).fetchone()
        return bool(row and row[0])

    def _wait_settled(self, t: datetime) -> None:
        started = time.monotonic()
        warned = started
        while not self.stop_event.is_set():
            if self.settled(t):
                return
            now = time.monotonic()
            if now - warned > 10:
                warned = now
                log.event(self.log, "waiting for the pipeline to settle", 30, bar=t.isoformat(),
                          waited=round(now - started, 1))
                self.beat("degraded", force=True, waiting_for=t.isoformat())
            # resume points and the queue announce their moves (mmats_cursor)
            assert self.listen is not None
            for _note in self.listen.notifies(timeout=0.02, stop_after=1):
                pass


def summary(conn: psycopg.Connection, account: str) -> dict[str, Any]:
    """Counts and the result of a session's account (for the CLI and the demo)."""
    row = conn.execute(
        "SELECT a.account_id, a.cash, e.equity, "
        "(SELECT count(*) FROM trading.signals s WHERE s.account_id = a.account_id), "
        "(SELECT count(*) FROM trading.orders o WHERE o.account_id = a.account_id), "
        "(SELECT count(*) FROM trading.fills f WHERE f.account_id = a.account_id), "
        "(SELECT count(*) FROM trading.trades t WHERE t.account_id = a.account_id) "
        "FROM trading.accounts a, trading.account_equity(a.account_id) e WHERE a.name = %s",
        (account,)).fetchone()
    if row is None:
        raise ReplayError(f"no account {account!r}")
    return {"account": account, "cash": Decimal(row[1]), "equity": Decimal(row[2]),
            "signals": row[3], "orders": row[4], "fills": row[5], "trades": row[6]}
