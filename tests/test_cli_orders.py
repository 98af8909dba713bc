"""`mmats orders`, `mmats orders cancel`, `mmats positions` and `mmats close`, run as a user
runs them (subprocesses) against this test's database (migration 0004_13's
trading.request_cancel, close_position and close_all)."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from test_cli_trading import one_error_line

from workers.ingest.instruments import ensure_instrument, spec_for

T0 = datetime(2024, 1, 2, tzinfo=UTC)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result
    assert result.stderr == "", result.stderr
    return result.stdout


# ------------------------------------------------------------------------- set-up
def one(conn: psycopg.Connection, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def instrument(conn: psycopg.Connection, symbol: str, close: str) -> int:
    iid, created = ensure_instrument(conn, spec_for(symbol, "stock"))
    assert created
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1m', %s, %s, %s, %s, %s, 1000)",
                 (iid, T0, close, close, close, close))
    return iid


def account(conn: psycopg.Connection, name: str, cash: int = 100_000) -> int:
    return int(one(conn, "SELECT trading.create_account(%s, 'paper', 'operator', %s)",
                   name, cash))


def order(conn: psycopg.Connection, acc: str, symbol: str, qty: str,
          limit: str | None = None, side: str = "buy") -> tuple[int, str]:
    """A manual order (a limit order when `limit` is given): (order id, client order id)."""
    spec: dict[str, Any] = {"account": acc, "symbol": symbol, "side": side, "quantity": qty}
    if limit is not None:
        spec |= {"type": "limit", "limit_price": limit}
    r = one(conn, "SELECT trading.place_manual_order(%s)", Jsonb(spec))
    assert r["status"] == "approved", r
    oid = int(r["order_id"])
    return oid, one(conn, "SELECT client_order_id FROM trading.orders WHERE order_id = %s", oid)


def fill(conn: psycopg.Connection, coid: str, qty: str, price: str, fill_id: str) -> None:
    one(conn, "SELECT trading.apply_fill(%s)", Jsonb({
        "client_order_id": coid, "broker_fill_id": fill_id, "quantity": qty, "price": price,
        "ts": datetime.now(UTC).isoformat()}))


def at_venue(conn: psycopg.Connection, oid: int, broker_id: str) -> None:
    """The order acknowledged by its broker: a paper-... id is the paper book's."""
    conn.execute("SELECT trading.acknowledge_order(%s, %s)", (str(oid), broker_id))


def status(conn: psycopg.Connection, oid: int) -> tuple[str, bool]:
    row = conn.execute("SELECT status::text, cancel_requested_at IS NOT NULL FROM trading.orders"
                       " WHERE order_id = %s", (oid,)).fetchone()
    assert row is not None
    return row[0], row[1]


def body(listing: str) -> list[list[str]]:
    """A table's rows (after its header and rule), split on runs of 2+ spaces."""
    lines = listing.splitlines()
    assert set(lines[1].replace(" ", "")) == {"-"}, listing
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]


# ------------------------------------------------------------------------- orders
def test_orders_lists_the_latest_first_and_filters(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    instrument(conn, "AAPL", "187")
    instrument(conn, "MSFT", "400")
    account(conn, "alp")
    account(conn, "bet")
    filled, filled_coid = order(conn, "alp", "AAPL", "10")
    fill(conn, filled_coid, "10", "187", "f-1")
    resting, resting_coid = order(conn, "alp", "MSFT", "5", limit="350.50")
    working, working_coid = order(conn, "bet", "AAPL", "2", limit="150")
    at_venue(conn, working, "alpaca-77")
    assert one(conn, "SELECT trading.request_cancel(%s)", str(working))["status"] == (
        "cancel_requested")

    listed = ok(run("orders"))
    header = re.split(r"\s{2,}", listed.splitlines()[0].strip())
    assert header == ["id", "account", "symbol", "side", "type", "quantity", "filled", "limit",
                      "stop", "status", "trigger", "client order id", "created (UTC)"]
    rows = body(listed)
    assert [r[0] for r in rows] == [str(working), str(resting), str(filled)]  # newest first
    assert rows[0][1:11] == ["bet", "AAPL", "buy", "limit", "2", "0", "150",
                             "cancel requested", "manual", working_coid]
    assert rows[1][1:11] == ["alp", "MSFT", "buy", "limit", "5", "0", "350.5", "created",
                             "manual", resting_coid]
    assert rows[2][1:10] == ["alp", "AAPL", "buy", "market", "10", "10", "filled", "manual",
                             filled_coid]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[0][-1])

    assert [r[0] for r in body(ok(run("orders", "--open")))] == [str(working), str(resting)]
    assert [r[0] for r in body(ok(run("orders", "--account", "alp")))] == [
        str(resting), str(filled)]
    assert [r[0] for r in body(ok(run("orders", "--account", "alp", "--open")))] == [
        str(resting)]
    assert [r[0] for r in body(ok(run("orders", "--limit", "1")))] == [str(working)]
    assert ok(run("orders", "--account", "bet", "--open", "--limit", "5")).count("\n") == 3
    account(conn, "empty")
    assert ok(run("orders", "--account", "empty", "--open")) == "no open orders on empty\n"
    assert one_error_line(run("orders", "--account", "nobody")) == (
        "error: unknown account 'nobody' (see `mmats account list`)")


def test_stored_text_in_the_listing_is_escaped(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    """A client order id and a symbol with a newline and a terminal escape sequence (written
    before the formats were checked, or by hand in psql) stay on their row, escaped."""
    instrument(conn, "AAPL", "187")
    account(conn, "alp")
    oid, _ = order(conn, "alp", "AAPL", "1")
    conn.execute("ALTER TABLE trading.orders DROP CONSTRAINT orders_client_order_id_format")
    conn.execute("ALTER TABLE market.instruments DROP CONSTRAINT instruments_symbol_format")
    conn.execute("SET session_replication_role = replica")  # (the ledger's own triggers)
    conn.execute("UPDATE trading.orders SET client_order_id = %s WHERE order_id = %s",
                 ("x\n999  alp  FAKE\x1b[2J", oid))
    conn.execute("RESET session_replication_role")
    conn.execute("UPDATE market.instruments SET symbol = %s", ("AAPL\r\x1b]0;pwned\x07",))
    listed = ok(run("orders"))
    assert "\x1b" not in listed and "\r" not in listed and "\x07" not in listed
    lines = listed.splitlines()
    assert len(lines) == 3  # the header, its rule, the one order
    assert body(listed)[0][:4] == [str(oid), "alp", "AAPL\\r\\x1b]0;pwned\\x07", "buy"]
    assert "x\\n999  alp  FAKE\\x1b[2J" in lines[2]
    shown = ok(run("positions"))
    assert shown == "no open positions\n"


# ------------------------------------------------------------------------- cancel
def test_cancel_a_created_order(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    instrument(conn, "AAPL", "187")
    account(conn, "alp")
    oid, _ = order(conn, "alp", "AAPL", "10", limit="150")
    other, other_coid = order(conn, "alp", "AAPL", "3", limit="140")
    assert ok(run("orders", "cancel", str(oid), "--reason", "changed my mind")) == (
        f"order {oid} cancelled (was created)\n")
    row = conn.execute("SELECT status::text, reason FROM trading.orders WHERE order_id = %s",
                       (oid,)).fetchone()
    assert row == ("cancelled", "changed my mind")
    assert status(conn, other) == ("created", False)  # only that one
    assert ok(run("orders", "cancel", str(oid))) == f"order {oid} was already cancelled\n"
    # by its client order id
    assert ok(run("orders", "cancel", other_coid)) == f"order {other} cancelled (was created)\n"
    assert status(conn, other) == ("cancelled", False)
    assert ok(run("orders", "--open")) == "no open orders\n"


def test_cancel_of_an_order_at_its_venue_is_requested(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    instrument(conn, "AAPL", "187")
    account(conn, "alp")
    oid, _ = order(conn, "alp", "AAPL", "10", limit="150")
    at_venue(conn, oid, "alpaca-1")
    assert ok(run("orders", "cancel", str(oid))) == (
        f"order {oid}: cancel requested; the router asks its venue to cancel it, and it "
        "stays submitted until the venue confirms\n")
    assert status(conn, oid) == ("submitted", True)
    assert one(conn, "SELECT count(*) FROM pgmq.q_orders WHERE message ->> 'cancel' = 'true'"
                     " AND (message ->> 'order_id')::bigint = %s", oid) == 1
    assert body(ok(run("orders", "--open")))[0][8] == "cancel requested"


def test_cancel_refusals_are_one_line(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    instrument(conn, "AAPL", "187")
    account(conn, "alp")
    done, done_coid = order(conn, "alp", "AAPL", "10")
    fill(conn, done_coid, "10", "187", "f-1")
    line = one_error_line(run("orders", "cancel", str(done)))
    assert line.startswith(f"error: order {done_coid} is filled: there is nothing left to "
                           "cancel"), line
    assert "55000" in line
    assert status(conn, done) == ("filled", False)

    assert one_error_line(run("orders", "cancel", "nope")).startswith(
        "error: unknown order 'nope'")
    assert one_error_line(run("orders", "cancel", "999999")).startswith(
        "error: unknown order '999999'")
    # a value the database quotes, holding a newline: shown escaped, the line whole (it
    # was cut at the newline, its quote left open, its SQLSTATE lost)
    line = one_error_line(run("orders", "cancel", "NOPE\nerror: fake"))
    assert line.startswith("error: unknown order 'NOPE\\nerror: fake'"), line
    assert line.endswith("[SQLSTATE 23503]"), line

    oid, _ = order(conn, "alp", "AAPL", "1", limit="100")
    line = one_error_line(run("orders", "cancel", str(oid), "--reason",
                              "oops\nerror: order 1 cancelled"))
    assert "a cancel's reason must be 1 to 500 printable characters" in line
    assert status(conn, oid) == ("created", False)
    usage = run("orders", "cancel")
    assert usage.returncode == 2 and "Missing argument 'ORDER'" in usage.stderr


def test_long_arguments_are_shortened_in_the_error_line(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    """Found by review: the error line quoted the whole argument (`mmats close ACCOUNT`
    with a SYMBOL of 20,000 letters), and took seconds to redact."""
    instrument(conn, "AAPL", "187")
    account(conn, "alp")
    letters = "Q" * 20_000
    cut = f"'{'Q' * 40}...'"
    for args, says in [
            (("close", "alp", letters), f"error: unknown symbol {cut} hint: import its bars"),
            (("close", "alp", "AAPL", "--venue", letters),
             f"error: unknown symbol 'AAPL' on venue {cut} hint: "),
            (("close", letters, "AAPL"), f"error: unknown account {cut} hint: "),
            (("close", letters, "--all", "--yes"), f"error: unknown account {cut} hint: "),
            (("orders", "cancel", letters), f"error: unknown order {cut} [SQLSTATE 23503]"),
            (("orders", "cancel", "it's \\" + letters),
             f"error: unknown order \"it's \\\\{'Q' * 34}...\" [SQLSTATE 23503]")]:
        line = one_error_line(run(*args))
        assert line.startswith(says), (args[:2], line[:300])
        assert len(line) < 250, (args[:2], line[:300])
    assert conn.execute("SELECT count(*) FROM trading.orders").fetchone() == (0,)


# ------------------------------------------------------------------------- positions
def test_positions_after_a_fill(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    instrument(conn, "AAPL", "187")
    account(conn, "alp")
    account(conn, "bet")
    assert ok(run("positions")) == "no open positions\n"
    _, coid = order(conn, "alp", "AAPL", "10")
    fill(conn, coid, "10", "187", "f-1")
    conn.execute("UPDATE trading.positions SET last_price = 190.5, stop_loss = 180")
    listed = ok(run("positions"))
    header = re.split(r"\s{2,}", listed.splitlines()[0].strip())
    assert header == ["account", "symbol", "leg", "strategy", "quantity", "avg price",
                      "last price", "unrealised P&L", "ccy", "stop loss", "take profit"]
    (row,) = body(listed)
    # (the strategy column is empty: a manual order's position is the account's own)
    assert row == ["alp", "AAPL", "net", "10", "187", "190.5", "35.00", "USD", "180"]
    assert body(ok(run("positions", "--account", "alp"))) == [row]
    assert ok(run("positions", "--account", "bet")) == "no open positions on bet\n"
    assert one_error_line(run("positions", "--account", "nobody")) == (
        "error: unknown account 'nobody' (see `mmats account list`)")


# ------------------------------------------------------------------------- close
def _book(conn: psycopg.Connection) -> dict[str, int]:
    """alp holds 10 AAPL and 4 MSFT, with a created buy limit on AAPL, one on MSFT in the
    paper book, and one on MSFT working at a venue."""
    instrument(conn, "AAPL", "187")
    instrument(conn, "MSFT", "400")
    account(conn, "alp")
    for symbol, qty, price in (("AAPL", "10", "187"), ("MSFT", "4", "400")):
        _, coid = order(conn, "alp", symbol, qty)
        fill(conn, coid, qty, price, f"f-{symbol}")
    a_entry, _ = order(conn, "alp", "AAPL", "5", limit="150")
    m_paper, m_coid = order(conn, "alp", "MSFT", "1", limit="350")
    at_venue(conn, m_paper, f"paper-{m_coid}")
    m_venue, _ = order(conn, "alp", "MSFT", "2", limit="340")
    at_venue(conn, m_venue, "alpaca-9")
    return {"a_entry": a_entry, "m_paper": m_paper, "m_venue": m_venue}


def closing_orders(conn: psycopg.Connection) -> list[tuple[int, str, str, str]]:
    return [(r[0], r[1], r[2], f"{r[3].normalize():f}") for r in conn.execute(
        "SELECT o.order_id, i.symbol, o.side::text, o.quantity FROM trading.orders o "
        "JOIN market.instruments i USING (instrument_id) WHERE o.trigger = 'close' "
        "ORDER BY o.order_id").fetchall()]


def test_close_one_position_then_all(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    ids = _book(conn)
    out = ok(run("close", "alp", "AAPL"))
    ((aapl_close, *rest),) = closing_orders(conn)
    assert rest == ["AAPL", "sell", "10"]
    assert out == (f"alp AAPL: closing order {aapl_close}\n"
                   f"alp AAPL: cancelled entry order {ids['a_entry']}\n")
    assert status(conn, ids["a_entry"]) == ("cancelled", False)
    assert status(conn, ids["m_paper"]) == ("submitted", False)  # another instrument's
    assert status(conn, ids["m_venue"]) == ("submitted", False)

    # closing everything asks first; with no terminal it says what it needs, and does nothing
    line = one_error_line(run("close", "alp", "--all"))
    assert line == "error: closing every position of 'alp' needs --yes"
    assert len(closing_orders(conn)) == 1
    assert status(conn, ids["m_paper"]) == ("submitted", False)

    out = ok(run("close", "alp", "--all", "--yes"))
    closes = closing_orders(conn)
    assert len(closes) == 2 and closes[0][0] == aapl_close  # AAPL's close was pending already
    msft_close = closes[1][0]
    assert closes[1][1:] == ("MSFT", "sell", "4")
    assert out == (f"alp: closing order {msft_close}\n"
                   f"alp: cancelled entry order {ids['m_paper']}\n"
                   f"alp: cancel requested for entry order {ids['m_venue']} "
                   "(open until the venue confirms)\n")
    assert status(conn, ids["m_paper"]) == ("cancelled", False)
    assert status(conn, ids["m_venue"]) == ("submitted", True)

    # nothing left to do: said so
    again = ok(run("close", "alp", "--all", "--yes"))
    assert again == ("alp: no open position, no closing order\n"
                     f"alp: cancel requested for entry order {ids['m_venue']} "
                     "(open until the venue confirms)\n")
    assert len(closing_orders(conn)) == 2
    assert one_error_line(run("close", "nobody", "AAPL")).startswith(
        "error: unknown account 'nobody'")


@pytest.mark.parametrize("args,says", [
    (("close", "alp"), "give either SYMBOL or --all (exactly one)"),
    (("close", "alp", "AAPL", "--all"), "give either SYMBOL or --all (exactly one)"),
    (("close", "alp", "AAPL", "--all", "--yes"), "give either SYMBOL or --all (exactly one)"),
    (("close", "alp", "--all", "--venue", "us", "--yes"), "--venue goes with SYMBOL"),
])
def test_close_needs_a_symbol_or_all(run, conn: psycopg.Connection, args: tuple[str, ...],  # type: ignore[no-untyped-def]
                                     says: str) -> None:
    ids = _book(conn)
    r = run(*args)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr and says in r.stderr
    assert closing_orders(conn) == []
    assert [status(conn, i) for i in ids.values()] == [
        ("created", False), ("submitted", False), ("submitted", False)]


def test_close_says_it_waits_for_an_exit_being_cancelled(run, conn: psycopg.Connection) -> None:  # type: ignore[no-untyped-def]
    """Before, it said 'no open position, no closing order' of a position of 10."""
    from test_cancels import _exit_at_the_venue
    _acc, exit_ = _exit_at_the_venue(conn)
    out = ok(run("close", "alp", "AAPL"))
    assert out == (f"alp AAPL: closing order {exit_} being cancelled at the venue: the "
                   "position is closed again once the venue confirms\n"
                   "alp AAPL: no open entry orders to cancel\n")
