"""The paper broker's time in force (workers/runtime/paper.py) against the real trading core.

Orders come from `trading.place_manual_order` with `time_in_force` IOC, FOK or GTD (with
`expire_at`), go through pgmq's `orders` queue into the paper book of a real `Router`, and
are settled on bars inserted into `market.bars`; nothing of the router, the broker or the
database is mocked. The bar every scenario starts from is T0 (it exists before the orders
are made, so an order's first eligible bar is T1, as for an order from bar T0 in a
backtest). Assertions are on rows: orders (status, reason), fills and positions.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from test_router import (
    COSTS,
    T0,
    T1,
    T2,
    add_bar,
    fills,
    instrument,
    one,
    order_row,
    paper_account,
    paper_routed,
    positions,
)

from workers.backtest.data import to_us
from workers.backtest.simulator import InstrumentRules, SimBar, SimFill
from workers.runtime.paper import PaperBroker, PaperInstrument, expires_on, tif_outcome
from workers.runtime.router import Router

T3 = T0 + timedelta(minutes=3)


def place(conn: psycopg.Connection, **spec: Any) -> int:
    """A manual order of paper1 on BTC/USD (a buy of 1 unless told): its order id."""
    r = one(conn, "SELECT trading.place_manual_order(%s)", Jsonb(
        {"account": "paper1", "symbol": "BTC/USD", "side": "buy", "quantity": "1", **spec}))
    assert r["status"] == "approved", r
    return int(r["order_id"])


def state(conn: psycopg.Connection, order_id: int) -> tuple[str, Decimal, str | None]:
    o = order_row(conn, order_id)
    return o["state"], o["filled_quantity"], o["reason"]


def got(conn: psycopg.Connection, acc: int) -> list[tuple[int, Decimal, Decimal, Any]]:
    return [(f["order_id"], f["quantity"], f["price"], f["ts"]) for f in fills(conn, acc)]


def bar_by_bar(conn: psycopg.Connection, router: Router, iid: int,
               *bars: tuple[Any, str, str, str, str]) -> None:
    """Each bar stored and settled before the next is stored, as a live feed does."""
    for ts, o, h, low, c in bars:
        add_bar(conn, iid, ts, o, h, low, c)
        router.settle_bars(iid, "1m", ts)


# ---------------------------------------------------------------------------- the repro
def test_paper_ioc_and_expired_gtd_limits_do_not_rest_and_fill_later(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """Found by review: the paper broker ignored time in force. An IOC limit its first bar
    does not reach rested, and a GTD limit rested past its expire_at; both filled at 90 at
    T3, two bars later. A GTC limit beside them is the contrast: it rests and fills."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    ioc = place(conn, type="limit", limit_price="90", time_in_force="IOC")
    gtd = place(conn, type="limit", limit_price="90", time_in_force="GTD",
                expire_at=(T1 + timedelta(seconds=30)).isoformat())
    gtc = place(conn, type="limit", limit_price="90")
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    bar_by_bar(conn, router, iid, (T1, "100", "101", "99", "100"),  # 90 not reached
               (T2, "95", "95", "95", "95"),                       # opens after expire_at
               (T3, "92", "92", "88", "89"))                       # 90 reached
    assert got(conn, acc) == [(gtc, Decimal(1), Decimal(90), T3)]
    status, filled, reason = state(conn, ioc)
    assert (status, filled) == ("cancelled", 0)
    assert reason is not None and reason.startswith("IOC_NOT_FILLED: not marketable on its "
                                                    f"first bar ({T1.isoformat()})"), reason
    assert state(conn, gtd) == ("expired", 0, "expired")
    assert state(conn, gtc)[:2] == ("filled", 1)


# ---------------------------------------------------------------------------- IOC
def test_ioc_limit_reached_on_its_first_bar_fills_there(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    ioc = place(conn, type="limit", limit_price="99", time_in_force="IOC")
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    bar_by_bar(conn, router, iid, (T1, "100", "101", "98", "100"),
               (T2, "97", "97", "97", "97"))
    assert got(conn, acc) == [(ioc, Decimal(1), Decimal(99), T1)]
    assert state(conn, ioc)[:2] == ("filled", 1)
    (f,) = fills(conn, acc)
    assert f["liquidity"] == "maker"


def test_ioc_market_order_short_of_cash_fills_what_its_bar_allows_and_cancels_the_rest(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    ioc = place(conn, quantity="99", time_in_force="IOC")  # 9,900 of 10,000 at T0's close
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    bar_by_bar(conn, router, iid, (T1, "105", "105", "105", "105"),
               (T2, "90", "90", "90", "90"))
    ((oid, qty, price, ts),) = got(conn, acc)
    assert (oid, price, ts) == (ioc, Decimal(105), T1)
    assert 90 < qty < 99  # 10,000 / (105 x 1.002) = 95.04...
    status, filled, reason = state(conn, ioc)
    assert (status, filled) == ("cancelled", qty)
    assert reason is not None and reason.startswith("INSUFFICIENT_CASH"), reason
    assert positions(conn, acc) == [(iid, qty, Decimal(105))]


def test_ioc_is_judged_on_its_first_eligible_bar_even_when_given_a_later_one(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """A settlement that starts after the order's first eligible bar (T1 stored, never
    settled) judges it on T1 all the same: not on T2, which reaches its limit."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    ioc = place(conn, type="limit", limit_price="90", time_in_force="IOC")
    routed = paper_routed(acc, "paper1", COSTS)
    make_router(routed).drain()
    add_bar(conn, iid, T1, "100", "101", "99", "100")
    add_bar(conn, iid, T2, "92", "92", "88", "89")
    t2 = conn.execute("SELECT ts, open, high, low, close, volume FROM market.bars"
                      " WHERE instrument_id = %s AND ts = %s", (iid, T2)).fetchone()
    assert t2 is not None
    inst = PaperInstrument(iid, "BTC/USD", "1m", InstrumentRules(Decimal("0.01"),
                                                                 Decimal("0.0001")), 60_000_000)
    broker = routed.broker
    assert isinstance(broker, PaperBroker)
    (outcome,) = broker.settle(conn, inst, [t2])
    assert (outcome.order_id, outcome.fill, outcome.expired) == (ioc, None, False)
    assert outcome.cancel is not None
    assert outcome.cancel.startswith(f"IOC_NOT_FILLED: not marketable on its first bar "
                                     f"({T1.isoformat()})"), outcome.cancel


# ---------------------------------------------------------------------------- FOK
def test_fok_fills_its_whole_quantity_on_its_first_bar_or_nothing(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    whole = place(conn, type="limit", limit_price="99", time_in_force="FOK")
    missed = place(conn, type="limit", limit_price="90", time_in_force="FOK")
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    bar_by_bar(conn, router, iid, (T1, "100", "101", "98", "100"),
               (T2, "89", "89", "89", "89"))
    assert got(conn, acc) == [(whole, Decimal(1), Decimal(99), T1)]
    assert state(conn, whole)[:2] == ("filled", 1)
    status, filled, reason = state(conn, missed)
    assert (status, filled) == ("cancelled", 0)
    assert reason is not None and reason.startswith("FOK_NOT_FILLED: not marketable"), reason


def test_fok_its_first_bar_cannot_fill_in_full_is_cancelled_whole(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """Where an IOC fills the affordable part, a FOK fills nothing."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    fok = place(conn, quantity="99", time_in_force="FOK")
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    bar_by_bar(conn, router, iid, (T1, "105", "105", "105", "105"),
               (T2, "90", "90", "90", "90"))
    assert got(conn, acc) == []
    status, filled, reason = state(conn, fok)
    assert (status, filled) == ("cancelled", 0)
    assert reason is not None and reason.startswith(
        f"FOK_NOT_FILLED: its first bar ({T1.isoformat()}) fills "), reason
    assert "of 99 (INSUFFICIENT_CASH" in reason, reason
    assert positions(conn, acc) == []


# ---------------------------------------------------------------------------- GTD
def test_gtd_fills_on_a_bar_opening_before_its_expiry_even_one_straddling_it(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """T2 opens 30 s before the expiry and closes 30 s after it: it may fill the order."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    gtd = place(conn, type="limit", limit_price="90", time_in_force="GTD",
                expire_at=(T2 + timedelta(seconds=30)).isoformat())
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    bar_by_bar(conn, router, iid, (T1, "100", "101", "99", "100"),
               (T2, "92", "92", "88", "89"))
    assert got(conn, acc) == [(gtd, Decimal(1), Decimal(90), T2)]
    assert state(conn, gtd)[:2] == ("filled", 1)


def test_gtd_expires_on_the_bar_opening_at_its_expiry_before_it_is_matched(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """A bar opening exactly at expire_at does not fill the order, though it reaches it;
    a catch-up (T2 and T3 stored, then settled together) expires it on T2 all the same."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    gtd = place(conn, type="limit", limit_price="90", time_in_force="GTD",
                expire_at=T2.isoformat())
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    bar_by_bar(conn, router, iid, (T1, "100", "101", "99", "100"))
    add_bar(conn, iid, T2, "92", "92", "88", "89")
    add_bar(conn, iid, T3, "85", "85", "85", "85")
    router.settle_bars(iid, "1m", T3)
    assert got(conn, acc) == []
    assert state(conn, gtd) == ("expired", 0, "expired")


# ---------------------------------------------------------------------------- the rule
def _bar(ts_us: int) -> SimBar:
    one_ = Decimal(1)
    return SimBar(ts_us, one_, one_, one_, one_, one_)


def test_the_rule_takes_only_the_simulator_s_types() -> None:
    """`tif_outcome` and `expires_on` are what a backtest would share."""
    bar = _bar(to_us(T1))
    full = SimFill(1, Decimal(2), Decimal(100), Decimal(0), "taker", bar.ts_us)
    part = SimFill(1, Decimal(1), Decimal(100), Decimal(0), "taker", bar.ts_us,
                   Decimal(1), "INSUFFICIENT_CASH: cash=100")
    for tif in ("GTC", "GTD"):
        assert tif_outcome(tif, Decimal(2), None, bar) == (None, None)  # rests
        assert tif_outcome(tif, Decimal(2), part, bar) == (part, None)
    assert tif_outcome("IOC", Decimal(2), full, bar) == (full, None)
    assert tif_outcome("IOC", Decimal(2), part, bar) == (part, None)  # the fill's reason
    assert tif_outcome("FOK", Decimal(2), full, bar) == (full, None)
    fill, reason = tif_outcome("FOK", Decimal(2), part, bar)
    assert fill is None and reason is not None and reason.startswith("FOK_NOT_FILLED")
    fill, reason = tif_outcome("IOC", Decimal(2), None, bar)
    assert fill is None and reason is not None and reason.startswith("IOC_NOT_FILLED")
    with pytest.raises(ValueError, match="DAY"):
        tif_outcome("DAY", Decimal(2), full, bar)
    at = to_us(T1 + timedelta(seconds=30))
    assert not expires_on(None, bar)
    assert not expires_on(at, bar)
    assert expires_on(at, _bar(at)) and expires_on(at, _bar(to_us(T2)))


def test_day_is_not_a_time_in_force_the_ledger_takes(conn: psycopg.Connection) -> None:
    instrument(conn, "BTC/USD", "crypto", "100")
    paper_account(conn, "paper1")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="GTC, IOC, FOK or GTD"):
        place(conn, time_in_force="DAY")


# ---------------------------------------------------------------------------- stop-limit
def test_a_stop_limit_triggered_without_filling_rests_as_a_limit(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """Found by review: a buy stop-limit (stop 105, limit 106) whose bar gapped over both
    (T1 opens 108, never back to 106) triggered and rested, as at a venue; the next bars
    were judged as if it had never triggered, so T2, trading at 104-105 below the stop,
    did not fill the resting limit at 106. It fills there at T2's open. The bars are
    settled one per call, so what T1 did is known from the stored bars."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    sl = place(conn, type="stop_limit", stop_price="105", limit_price="106")
    untouched = place(conn, type="stop_limit", stop_price="110", limit_price="111")
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    bar_by_bar(conn, router, iid, (T1, "108", "108.5", "107.5", "108"),  # triggered, rests
               (T2, "104.5", "104.8", "104", "104.2"))                   # below the stop
    assert got(conn, acc) == [(sl, Decimal(1), Decimal("104.5"), T2)]
    assert state(conn, sl)[:2] == ("filled", 1)
    (f,) = fills(conn, acc)
    assert f["liquidity"] == "maker"
    # a stop-limit whose stop no bar reached is still a stop: 104-108.5 never reach 110
    assert state(conn, untouched)[:2] == ("submitted", 0)


def test_a_stop_limit_reached_and_filled_later_in_one_catch_up(
        conn: psycopg.Connection, make_router: Callable[..., Router]) -> None:
    """The same when the router settles both bars at once (catching up after a pause)."""
    iid = instrument(conn, "BTC/USD", "crypto", "100")
    acc = paper_account(conn, "paper1")
    sl = place(conn, type="stop_limit", stop_price="105", limit_price="106")
    router = make_router(paper_routed(acc, "paper1", COSTS))
    router.drain()
    add_bar(conn, iid, T1, "108", "108.5", "107.5", "108")
    add_bar(conn, iid, T2, "104.5", "104.8", "104", "104.2")
    router.settle_bars(iid, "1m", T2)
    assert got(conn, acc) == [(sl, Decimal(1), Decimal("104.5"), T2)]
