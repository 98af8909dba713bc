"""Migration 0004_13: a trader's cancel reaches the venue (trading.request_cancel), the
controls cancel open entries, and client order ids carry the database's tag.

Before it, `trading.cancel_order` (granted to mmats_api) marked an order working at a
venue cancelled in the ledger; the router archived its message and never told the venue,
which went on and filled it. Alpaca is answered at the HTTP level by `responses` with its
documented JSON (DELETE /v2/orders/{id}: 204, then the order as GET returns it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal

import psycopg
import pytest
import responses
from psycopg.types.json import Jsonb
from test_router import (
    ACTIVITIES,
    ALPACA,
    BY_CLIENT_ID,
    NOT_FOUND,
    OID,
    activity,
    alpaca_order,
    alpaca_routed,
    archived,
    calls,
    fills,
    in_flight_at_alpaca,
    instrument,
    manual,
    now_text,
    one,
    order_row,
    paper_account,
    positions,
    queued,
    reveal,
)

from db import migrate
from workers.runtime.router import Router


@pytest.fixture
def aapl(conn: psycopg.Connection) -> int:
    return instrument(conn, "AAPL", "stock", "187")


def as_api(conn: psycopg.Connection, query: str, *args: object) -> object:
    """One call as the controls' role (mmats_api), the way the CLI and psql users call."""
    conn.execute("SET ROLE mmats_api")
    try:
        return one(conn, query, *args)
    finally:
        conn.execute("RESET ROLE")


def request_cancel(conn: psycopg.Connection, ref: object, reason: str | None = None) -> dict:
    return as_api(conn, "SELECT trading.request_cancel(%s, %s)", str(ref), reason)  # type: ignore[return-value]


def limit_buy(conn: psycopg.Connection, account: str, symbol: str, qty: str,
              price: str) -> int:
    r = one(conn, "SELECT trading.place_manual_order(%s)", Jsonb({
        "account": account, "symbol": symbol, "side": "buy", "quantity": qty,
        "type": "limit", "limit_price": price}))
    assert r["status"] == "approved", r
    return int(r["order_id"])


def working_at_alpaca(conn: psycopg.Connection, http: responses.RequestsMock,
                      make_router: Callable[..., Router]) -> tuple[int, int, str, Router]:
    """An operator account routed to Alpaca with a market buy of 10 AAPL placed there and
    acknowledged (submitted): (account, order, client order id, router)."""
    acc = paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    http.post(f"{ALPACA}/orders", json=alpaca_order(coid, status="accepted"))
    router = make_router(alpaca_routed(acc, "alp"))
    assert router.drain() == 1
    assert order_row(conn, oid)["state"] == "submitted"
    return acc, oid, coid, router


def test_a_cancel_of_an_order_working_at_the_venue_is_sent_there(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    acc, oid, coid, router = working_at_alpaca(conn, http, make_router)

    r = request_cancel(conn, coid, "changed my mind")
    assert (r["status"], r["order_status"]) == ("cancel_requested", "submitted")
    o = order_row(conn, oid)
    assert o["state"] == "submitted" and o["cancel_requested_at"] is not None
    # asked twice: the same request, one message
    assert request_cancel(conn, oid)["status"] == "cancel_requested"
    assert [m["message"].get("cancel") for m in queued(conn)] == [None, True]

    http.delete(f"{ALPACA}/orders/{OID}", status=204)
    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(
        coid, status="canceled", canceled_at=now_text()))
    assert router.drain() == 1  # the cancel message (the order's own waits for its poll)

    assert len(calls(http, "DELETE", f"/orders/{OID}")) == 1
    o = order_row(conn, oid)
    assert (o["state"], o["reason"]) == ("cancelled", "cancelled at the venue as requested")
    assert fills(conn, acc) == [] and positions(conn, acc) == []
    reveal(conn)
    router.drain()  # the order's own message: the order is settled, archived
    assert queued(conn) == [] and len(archived(conn)) == 2
    assert len(calls(http, "DELETE")) == 1
    events = [r[0] for r in conn.execute(
        "SELECT event_type FROM audit.events WHERE entity_id = %s ORDER BY event_id",
        (str(oid),)).fetchall()]
    assert "order.cancel_requested" in events and events[-1] == "order.cancelled"


@pytest.mark.parametrize("status,answer", [
    # the order filled meanwhile: Alpaca refuses the DELETE
    (422, {"code": 42210000, "message": 'order is already in "filled" state'}),
    # the venue no longer knows the order (Binance says -2011 "Unknown order sent." of
    # one that has filled)
    (404, {"code": 40410000, "message": "order not found"}),
], ids=["already-filled", "not-found"])
def test_a_fill_that_beat_the_cancel_is_booked(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router], status: int, answer: dict[str, object]) -> None:
    """The venue refuses the cancel: the router reads the order again and applies its
    fill, instead of alarming on every poll; the ledger holds the position the venue
    holds."""
    acc, oid, coid, router = working_at_alpaca(conn, http, make_router)
    request_cancel(conn, oid)
    http.delete(f"{ALPACA}/orders/{OID}", status=status, json=answer)
    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(
        coid, status="filled", filled_qty="10", filled_avg_price="187.15",
        filled_at=now_text()))
    http.get(ACTIVITIES, json=[activity(1, "10", "10", "187.15")])
    router.drain()

    o = order_row(conn, oid)
    assert (o["state"], o["filled_quantity"]) == ("filled", Decimal(10))
    assert positions(conn, acc) == [(aapl, Decimal(10), Decimal("187.15"))]


def test_an_order_in_flight_the_venue_does_not_have_is_not_sent_again(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """The first POST was lost on the network (the order in flight, its fate unknown); the
    trader cancels; the venue's lookup by client id does not know it: the gate cancels it
    (CANCEL_REQUESTED) instead of placing it again."""
    _acc, oid, _coid, router = in_flight_at_alpaca(conn, http, make_router, max_retries=1)
    posts = len(calls(http, "POST"))

    assert request_cancel(conn, oid)["status"] == "cancel_requested"
    http.get(BY_CLIENT_ID, status=404, json=NOT_FOUND)
    reveal(conn)
    router.drain()

    assert len(calls(http, "POST")) == posts, "a cancelled order was sent again"
    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"]) == ("cancelled", "CANCEL_REQUESTED")
    reveal(conn)
    router.drain()
    assert queued(conn) == []


def test_an_order_found_in_flight_is_cancelled_at_the_venue(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    _acc, oid, coid, router = in_flight_at_alpaca(conn, http, make_router)
    request_cancel(conn, coid)
    # the POST had reached Alpaca after all
    http.get(BY_CLIENT_ID, json=alpaca_order(coid, status="new"))
    http.delete(f"{ALPACA}/orders/{OID}", status=204)
    http.get(f"{ALPACA}/orders/{OID}", json=alpaca_order(coid, status="canceled",
                                                         canceled_at=now_text()))
    reveal(conn)
    router.drain()

    assert len(calls(http, "DELETE", f"/orders/{OID}")) == 1
    o = order_row(conn, oid)
    assert (o["state"], o["broker_order_id"]) == ("cancelled", OID)


def test_the_controls_role_cannot_mark_an_order_cancelled_behind_the_venue(
        conn: psycopg.Connection, aapl: int) -> None:
    paper_account(conn, "alp")
    oid, _ = manual(conn, "alp", "AAPL", "10")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_api(conn, "SELECT trading.cancel_order(%s, 'behind its back')", str(oid))
    conn.execute("RESET ROLE")
    assert order_row(conn, oid)["state"] == "created"


def test_what_never_left_the_database_is_cancelled_at_once(
        conn: psycopg.Connection, aapl: int) -> None:
    acc = paper_account(conn, "alp")
    created, _ = manual(conn, "alp", "AAPL", "10")
    r = request_cancel(conn, created, "not now")
    assert (r["status"], r["previous"]) == ("cancelled", "created")
    assert order_row(conn, created)["reason"] == "not now"
    # the router's gate then finds it cancelled: answered as a cancel, no illegal change
    conn.execute("SET ROLE mmats_router")
    answer = one(conn, "SELECT trading.mark_in_flight(%s)", str(created))
    conn.execute("RESET ROLE")
    assert answer["status"] == "cancelled"
    # in the paper book (acknowledged there): the book is the ledger
    book, _ = manual(conn, "alp", "AAPL", "5")
    conn.execute("SELECT trading.acknowledge_order(%s, %s)",
                 (str(book), f"paper-{order_row(conn, book)['client_order_id']}"))
    assert request_cancel(conn, book)["status"] == "cancelled"
    assert request_cancel(conn, book)["status"] == "unchanged"
    # a message for the router was queued for neither
    assert all(not m["message"].get("cancel") for m in queued(conn))
    assert positions(conn, acc) == []


@pytest.mark.parametrize("reason, says", [
    ("two\nlines", "1 to 500 printable characters"),
    ("x" * 501, "1 to 500 printable characters"),
    ("", "1 to 500 printable characters"),
])
def test_a_cancel_s_reason_is_checked(conn: psycopg.Connection, aapl: int, reason: str,
                                      says: str) -> None:
    paper_account(conn, "alp")
    oid, _ = manual(conn, "alp", "AAPL", "10")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=says):
        request_cancel(conn, oid, reason)
    conn.execute("RESET ROLE")
    assert order_row(conn, oid)["state"] == "created"


def test_a_finished_order_has_nothing_to_cancel(conn: psycopg.Connection, aapl: int) -> None:
    paper_account(conn, "alp")
    oid, coid = manual(conn, "alp", "AAPL", "10")
    one(conn, "SELECT trading.apply_fill(%s)", Jsonb({
        "client_order_id": coid, "broker_fill_id": "f-1", "quantity": "10",
        "price": "187", "ts": now_text()}))
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match=f"order {coid} is filled: there is nothing left to cancel"):
        request_cancel(conn, oid)
    conn.execute("RESET ROLE")
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="unknown order 'nope'"):
        request_cancel(conn, "nope")


def _entries_and_a_position(conn: psycopg.Connection) -> tuple[int, int, int, int]:
    """A paper account holding 10 AAPL, with a resting buy limit on AAPL and one on MSFT
    in the paper book, and a created (not yet routed) buy limit on MSFT."""
    aapl = instrument(conn, "AAPL", "stock", "187")
    instrument(conn, "MSFT", "stock", "400")
    paper_account(conn, "alp", cash_=100_000)
    _, coid = manual(conn, "alp", "AAPL", "10")
    one(conn, "SELECT trading.apply_fill(%s)", Jsonb({
        "client_order_id": coid, "broker_fill_id": "f-1", "quantity": "10",
        "price": "187", "ts": now_text()}))
    a_limit = limit_buy(conn, "alp", "AAPL", "5", "150")
    m_limit = limit_buy(conn, "alp", "MSFT", "5", "350")
    for oid in (a_limit, m_limit):
        conn.execute("SELECT trading.acknowledge_order(%s, %s)",
                     (str(oid), f"paper-{order_row(conn, oid)['client_order_id']}"))
    m_created = limit_buy(conn, "alp", "MSFT", "1", "300")
    return aapl, a_limit, m_limit, m_created


def test_close_position_cancels_that_instrument_s_entries(conn: psycopg.Connection) -> None:
    _aapl, a_limit, m_limit, m_created = _entries_and_a_position(conn)
    r = as_api(conn, "SELECT trading.close_position('alp', 'AAPL')")
    assert r["cancelled_order_ids"] == [a_limit] and len(r["order_ids"]) == 1  # type: ignore[index]
    assert order_row(conn, a_limit)["state"] == "cancelled"
    assert order_row(conn, a_limit)["reason"] == "close_position: the position was closed"
    assert order_row(conn, m_limit)["state"] == "submitted"
    assert order_row(conn, m_created)["state"] == "created"


def test_close_all_and_a_hard_breaker_cancel_every_entry(conn: psycopg.Connection) -> None:
    _aapl, a_limit, m_limit, m_created = _entries_and_a_position(conn)
    r = as_api(conn, "SELECT trading.close_all('alp')")
    assert r["cancelled_order_ids"] == [a_limit, m_limit, m_created]  # type: ignore[index]
    (close,) = r["order_ids"]  # type: ignore[index]
    assert order_row(conn, close)["state"] == "created"  # the exit itself goes out
    assert {order_row(conn, o)["state"] for o in (a_limit, m_limit, m_created)} == {
        "cancelled"}

    entry = limit_buy(conn, "alp", "MSFT", "2", "340")
    as_api(conn, "SELECT risk.trip_breaker('alp', 'HARD', 'desk says stop')")
    o = order_row(conn, entry)
    assert (o["state"], o["reason"]) == ("cancelled", "breaker HARD: desk says stop")
    (details,) = [r[0] for r in conn.execute(
        "SELECT details FROM risk.events WHERE details ->> 'mode' = 'HARD'").fetchall()]
    assert details["cancelled_orders"] == [entry]


def test_soft_cancels_nothing(conn: psycopg.Connection) -> None:
    _aapl, a_limit, m_limit, m_created = _entries_and_a_position(conn)
    as_api(conn, "SELECT risk.trip_breaker('alp', 'SOFT', 'cool down')")
    assert [order_row(conn, o)["state"] for o in (a_limit, m_limit, m_created)] == [
        "submitted", "submitted", "created"]


def _exit_at_the_venue(conn: psycopg.Connection) -> tuple[int, int]:
    """A paper account routed to a venue, holding 10 AAPL, with a closing limit sell of 10
    working there (not in the paper book), whose cancel the trader has requested:
    (account, the exit's order id)."""
    instrument(conn, "AAPL", "stock", "187")
    acc = paper_account(conn, "alp", cash_=100_000)
    _, coid = manual(conn, "alp", "AAPL", "10")
    one(conn, "SELECT trading.apply_fill(%s)", Jsonb({
        "client_order_id": coid, "broker_fill_id": "f-1", "quantity": "10",
        "price": "187", "ts": now_text()}))
    r = one(conn, "SELECT trading.place_manual_order(%s)", Jsonb({
        "account": "alp", "symbol": "AAPL", "side": "sell", "quantity": "10",
        "type": "limit", "limit_price": "200"}))
    exit_ = int(r["order_id"])
    conn.execute("SELECT trading.acknowledge_order(%s, 'alpaca-1')", (str(exit_),))
    assert order_row(conn, exit_)["reduce_only"]
    assert request_cancel(conn, exit_)["status"] == "cancel_requested"
    return acc, exit_


def venue_cancelled(conn: psycopg.Connection, order_id: int) -> None:
    """The router records the venue's confirmation of the cancel."""
    conn.execute("SET ROLE mmats_router")
    try:
        one(conn, "SELECT trading.cancel_order(%s, 'cancelled at the venue as requested')",
            str(order_id))
    finally:
        conn.execute("RESET ROLE")


def open_closes(conn: psycopg.Connection, acc: int) -> list[tuple[object, ...]]:
    return [tuple(r) for r in conn.execute(
        "SELECT side::text, quantity, trigger::text FROM trading.orders WHERE account_id = %s"
        " AND reduce_only AND status IN ('created', 'in_flight', 'submitted', 'partially_filled')"
        " ORDER BY order_id", (acc,)).fetchall()]


def test_a_close_waits_for_an_exit_being_cancelled_then_closes(
        conn: psycopg.Connection) -> None:
    """The exit may still fill at the venue, so a second closing order now could sell 20
    of 10; a close marks it instead, and its confirmed cancel closes the position. Before,
    the close said 'no open position' and, once the cancel was confirmed, nothing closed
    the 10."""
    acc, exit_ = _exit_at_the_venue(conn)
    r = as_api(conn, "SELECT trading.close_position('alp', 'AAPL')")
    assert (r["order_ids"], r["waiting_order_ids"]) == ([], [exit_])  # type: ignore[index]
    assert order_row(conn, exit_)["close_requested_at"] is not None
    venue_cancelled(conn, exit_)
    assert order_row(conn, exit_)["state"] == "cancelled"
    assert open_closes(conn, acc) == [("sell", Decimal(10), "close")]


def test_hard_closes_again_what_an_exit_s_cancel_left_open(conn: psycopg.Connection) -> None:
    acc, exit_ = _exit_at_the_venue(conn)
    as_api(conn, "SELECT risk.trip_breaker('alp', 'HARD', 'desk says stop')")
    assert open_closes(conn, acc) == [("sell", Decimal(10), "manual")]  # the exit, still counted
    venue_cancelled(conn, exit_)
    assert open_closes(conn, acc) == [("sell", Decimal(10), "breaker")]
    # a closing order cannot be cancelled by hand while the breaker is HARD
    (close_id,) = [r[0] for r in conn.execute(
        "SELECT order_id FROM trading.orders WHERE account_id = %s AND trigger = 'breaker'",
        (acc,)).fetchall()]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                       match="whose breaker is HARD: it is not cancelled until"):
        request_cancel(conn, close_id)
    conn.execute("RESET ROLE")
    assert order_row(conn, close_id)["state"] == "created"


@pytest.mark.parametrize("breaker", [None, "SOFT", "FREEZE"])
def test_without_hard_or_a_close_the_trader_s_cancel_of_an_exit_stands(
        conn: psycopg.Connection, breaker: str | None) -> None:
    acc, exit_ = _exit_at_the_venue(conn)
    if breaker:
        as_api(conn, "SELECT risk.trip_breaker('alp', %s, 'checks')", breaker)
    venue_cancelled(conn, exit_)
    assert order_row(conn, exit_)["state"] == "cancelled"
    assert open_closes(conn, acc) == []


def test_a_running_backtest_s_account_is_not_controlled_by_hand(conn: psycopg.Connection,
                                                                aapl: int) -> None:
    """Cancelled, the order was still in the engine's book: the simulator filled it and
    the run failed on the ledger's refusal; a close, a manual order or a HARD trip put
    orders in the run that its engine never sent. A backtest account of no running run
    (one made by hand in psql, or a run that ended) is controlled as any other."""
    run = int(one(conn, "SELECT backtest.create_run('sma_crossover', '1.0.0', '{}', '{AAPL}',"
                        " '1m', '2024-01-01', '2024-01-02', 10000, 'USD')"))
    acc = f"bt-{run}"
    r = one(conn, "SELECT trading.submit_signal(%s)", Jsonb({  # the engine's own order
        "account": acc, "strategy": "sma_crossover", "version": "1.0.0", "symbol": "AAPL",
        "action": "buy", "size": 0.1, "ts": now_text(-1)}))
    assert r["status"] == "approved", r
    oid = int(r["order_id"])
    coid = order_row(conn, oid)["client_order_id"]
    orders_before = one(conn, "SELECT count(*) FROM trading.orders")
    refused = (f"account {acc} belongs to backtest run {run}, still running: "
               "its orders are the run's")
    for what, query, args in [
            (f"order {coid}", "SELECT trading.request_cancel(%s)", (str(oid),)),
            ("close_position AAPL", "SELECT trading.close_position(%s, 'AAPL')", (acc,)),
            ("close_all", "SELECT trading.close_all(%s)", (acc,)),
            ("a HARD breaker trip", "SELECT risk.trip_breaker(%s, 'HARD', 'by hand')", (acc,)),
            ("a manual order", "SELECT trading.place_manual_order(%s)", (Jsonb({
                "account": acc, "symbol": "AAPL", "side": "buy", "quantity": "10"}),))]:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState,
                           match=re.escape(f"{what}: {refused}")):
            as_api(conn, query, *args)
    assert order_row(conn, oid)["state"] == "created"
    assert one(conn, "SELECT count(*) FROM trading.orders") == orders_before
    assert one(conn, "SELECT risk.breaker_mode(account_id) FROM trading.accounts"
                     " WHERE name = %s", acc) == "OK"
    conn.execute("SELECT backtest.finish_run(%s, 'failed', NULL, NULL, 0.5, 'stopped', '{}')",
                 (run,))
    assert request_cancel(conn, oid)["status"] == "cancelled"
    manual(conn, acc, "AAPL", "10")
    paper_account(conn, "bt", environment="backtest")
    by_hand, _ = manual(conn, "bt", "AAPL", "10")
    assert request_cancel(conn, by_hand)["status"] == "cancelled"
    assert as_api(conn, "SELECT risk.trip_breaker('bt', 'SOFT', 'by hand')")["mode"] == "SOFT"


def test_client_order_ids_carry_the_database_s_tag(conn: psycopg.Connection,
                                                   aapl: int) -> None:
    acc = paper_account(conn, "alp")
    tag = one(conn, "SELECT tag FROM trading.installation")
    assert re.fullmatch(r"[0-9a-f]{8}", tag)
    _, coid = manual(conn, "alp", "AAPL", "1")
    r = one(conn, "SELECT trading.submit_signal(%s)", Jsonb({
        "account": "alp", "strategy": "alpha", "symbol": "AAPL", "action": "buy",
        "size": 0.1, "ts": now_text(-1)}))
    signal_coid = order_row(conn, r["order_id"])["client_order_id"]
    for made in (coid, signal_coid):
        assert re.fullmatch(rf"mm{acc}-\d+-{tag}", made), made
    with pytest.raises(psycopg.errors.InvalidParameterValue,
                       match="has the form of the ids MMATS gives its own orders"):
        one(conn, "SELECT trading.place_manual_order(%s)", Jsonb({
            "account": "alp", "symbol": "AAPL", "side": "buy", "quantity": "1",
            "client_order_id": f"mm{acc}-999-{tag}"}))


def test_two_databases_give_different_ids(conn: psycopg.Connection,
                                          empty_db_url: str) -> None:
    """Another database migrated on its own (tests' databases are clones of one
    template, so they share a tag) draws another tag."""
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as other:
        other_tag = one(other, "SELECT tag FROM trading.installation")
    assert other_tag != one(conn, "SELECT tag FROM trading.installation")



def test_a_lookup_finding_another_order_under_the_client_id_rejects_this_one(
        conn: psycopg.Connection, http: responses.RequestsMock, aapl: int,
        make_router: Callable[..., Router]) -> None:
    """A message read again (the first POST's answer was lost) looks the order up by its
    client id; Alpaca has another order under it (a sell of 3 MSFT, e.g. a manual id used
    twice): this order is rejected with CLIENT_ORDER_ID_CONFLICT, and none of that order's
    fills is booked for it."""
    acc, oid, coid, router = in_flight_at_alpaca(conn, http, make_router, max_retries=1)
    http.get(BY_CLIENT_ID, json=alpaca_order(coid, symbol="MSFT", side="sell", qty="3",
                                             status="filled", filled_qty="3",
                                             filled_avg_price="400", filled_at=now_text()))
    reveal(conn)
    router.drain()
    o = order_row(conn, oid)
    assert (o["state"], o["reason_code"]) == ("rejected", "CLIENT_ORDER_ID_CONFLICT")
    assert "is sell 3 MSFT" in o["reason"]
    assert fills(conn, acc) == [] and positions(conn, acc) == []


def test_hard_cancels_the_entries_an_account_left_at_a_venue_before_it_went_advisory(
        conn: psycopg.Connection, aapl: int) -> None:
    """Repeated rejections made the account advisory while a buy limit it had sent was
    working at its venue: HARD asks the venue to cancel it (and sends no close)."""
    acc = paper_account(conn, "alp")
    entry = limit_buy(conn, "alp", "AAPL", "5", "150")
    conn.execute("SELECT trading.acknowledge_order(%s, 'alpaca-7')", (str(entry),))
    conn.execute("SELECT trading.set_advisory('alp')")
    as_api(conn, "SELECT risk.trip_breaker('alp', 'HARD', 'desk says stop')")
    o = order_row(conn, entry)
    assert (o["state"], o["cancel_requested_at"] is not None) == ("submitted", True)
    assert [m["message"].get("cancel") for m in queued(conn)][-1] is True
    assert open_closes(conn, acc) == []
