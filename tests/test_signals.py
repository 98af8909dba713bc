"""trading.submit_signal against the real database: decisions, orders, pgmq, refusals, roles.

Numbers are chosen round (cash 10000, price 100, quantity_step 0.01) and every expected
quantity is worked out by hand in a comment next to the assertion.
"""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from assigned import ensure_assigned
from psycopg.types.json import Jsonb

BAR_TS = "2024-01-02T00:00:00Z"
TS = "2024-01-02T00:01:00Z"  # every signal's time: one minute after the bar


# ---------------------------------------------------------------------------- helpers
def scalar(conn: psycopg.Connection, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def add_instrument(conn: psycopg.Connection, symbol: str = "BTCUSD", venue: str = "binance",
                   base: str = "BTC", quote: str = "USD", step: str = "0.01",
                   min_qty: str = "0", market: str = "crypto") -> int:
    return scalar(conn, """
        INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,
                                        price_tick, quantity_step, min_quantity, calendar_id)
        VALUES (%s, %s, %s, %s, %s, 0.01, %s, %s, 'CRYPTO_24X7') RETURNING instrument_id""",
                  symbol, venue, market, base, quote, step, min_qty)


def add_bar(conn: psycopg.Connection, instrument: int, close: str, ts: str = BAR_TS) -> None:
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close)"
                 " VALUES (%s, '1m', %s, %s, %s, %s, %s)",
                 (instrument, ts, close, close, close, close))


def make_account(conn: psycopg.Connection, name: str = "acct", mode: str = "operator",
                 cash: int = 10000, allow_short: bool = False, taker_fee: str = "0",
                 environment: str = "backtest", aggregation: str = "independent") -> int:
    return scalar(conn, """
        SELECT trading.create_account(name => %s, environment => %s, mode => %s, cash => %s,
                                      aggregation => %s, allow_short => %s,
                                      taker_fee => %s::numeric)""",
                  name, environment, mode, cash, aggregation, allow_short, taker_fee)


def submit(conn: psycopg.Connection, **signal: Any) -> dict[str, Any]:
    body = {"account": "acct", "strategy": "alpha", "symbol": "BTCUSD", "ts": TS}
    body.update(signal)
    ensure_assigned(conn, body)
    return scalar(conn, "SELECT trading.submit_signal(%s)", Jsonb(body))


def fill(conn: psycopg.Connection, order_id: int, quantity: str, price: str,
         broker_fill_id: str) -> dict[str, Any]:
    return scalar(conn, "SELECT trading.apply_fill(%s)", Jsonb({
        "order_id": order_id, "broker_fill_id": broker_fill_id, "quantity": quantity,
        "price": price, "ts": TS}))


def order(conn: psycopg.Connection, order_id: int) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM trading.orders WHERE order_id = %s", (order_id,))
    row = cur.fetchone()
    assert row is not None
    assert cur.description is not None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def signal_row(conn: psycopg.Connection, signal_id: int) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM trading.signals WHERE signal_id = %s", (signal_id,))
    row = cur.fetchone()
    assert row is not None
    assert cur.description is not None
    return dict(zip([c.name for c in cur.description], row, strict=True))


def count(conn: psycopg.Connection, table: str) -> int:
    return scalar(conn, f"SELECT count(*) FROM {table}")


def position(conn: psycopg.Connection, account: int = 1, instrument: int = 1) -> Decimal:
    return scalar(conn, "SELECT COALESCE(sum(quantity), 0) FROM trading.positions"
                        " WHERE account_id = %s AND instrument_id = %s", account, instrument)


def chain_ok(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT * FROM audit.verify_chain()").fetchall() == []


@pytest.fixture
def btc(conn: psycopg.Connection) -> int:
    """BTCUSD with one bar closing at 100 (before any account exists: no protection fires)."""
    iid = add_instrument(conn)
    add_bar(conn, iid, "100")
    return iid


@pytest.fixture
def operator(conn: psycopg.Connection, btc: int) -> int:
    return make_account(conn)


# ---------------------------------------------------------------------------- advisory
def test_advisory_account_records_the_signal_and_sends_nothing(
        conn: psycopg.Connection, btc: int) -> None:
    acct = make_account(conn, mode="advisory")
    r = submit(conn, action="buy", size=0.5, stop_loss=90, confidence=0.7, reasoning="why")
    assert r["status"] == "advisory"
    assert r["order_id"] is None
    g = signal_row(conn, r["signal_id"])
    assert g["account_id"] == acct and g["instrument_id"] == btc
    assert g["action"] == "buy" and g["status"] == "advisory"
    assert g["size"] == Decimal("0.5") and g["stop_loss"] == Decimal("90")
    assert g["confidence"] == Decimal("0.7") and g["reasoning"] == "why"
    assert str(g["ts"].isoformat()).startswith("2024-01-02T00:01:00")
    assert g["strategy_id"] == scalar(conn, "SELECT strategy_id FROM trading.strategies"
                                            " WHERE name = 'alpha'")
    assert count(conn, "trading.orders") == 0
    assert count(conn, "pgmq.q_orders") == 0
    assert chain_ok(conn)


# ---------------------------------------------------------------------------- approved buy
def test_operator_buy_creates_one_order_and_one_queue_message(
        conn: psycopg.Connection, operator: int, btc: int) -> None:
    r = submit(conn, action="buy", size=0.5, stop_loss=90, take_profit=120)
    # percent_equity (default), allocation 1: 10000 * 1 * 0.5 = 5000 notional / 100 = 50
    assert r["status"] == "approved", r
    assert r["side"] == "buy" and Decimal(str(r["quantity"])) == 50
    assert Decimal(str(r["reference_price"])) == 100
    o = order(conn, r["order_id"])
    assert o["account_id"] == operator and o["instrument_id"] == btc
    assert o["side"] == "buy" and o["quantity"] == Decimal("50")
    assert o["status"] == "created" and o["order_type"] == "market"
    assert o["reduce_only"] is False and o["trigger"] == "signal"
    assert o["signal_id"] == r["signal_id"]
    assert o["strategy_id"] == scalar(conn, "SELECT strategy_id FROM trading.strategies"
                                            " WHERE name = 'alpha'")
    assert o["reference_price"] == Decimal("100")
    assert o["stop_loss"] == Decimal("90") and o["take_profit"] == Decimal("120")
    assert o["client_order_id"].startswith(f"mm{operator}-")
    assert signal_row(conn, r["signal_id"])["status"] == "approved"

    msgs = conn.execute("SELECT message FROM pgmq.q_orders").fetchall()
    assert len(msgs) == 1
    msg = msgs[0][0]
    assert msg["order_id"] == r["order_id"]
    assert msg["account_id"] == operator
    assert msg["client_order_id"] == o["client_order_id"]
    assert msg["environment"] == "backtest"


def test_hold_is_ignored(conn: psycopg.Connection, operator: int) -> None:
    r = submit(conn, action="hold")
    assert (r["status"], r["reason_code"], r["order_id"]) == ("ignored", "HOLD", None)
    assert signal_row(conn, r["signal_id"])["reason_code"] == "HOLD"
    assert count(conn, "trading.orders") == 0 and count(conn, "pgmq.q_orders") == 0


def test_action_is_case_insensitive(conn: psycopg.Connection, operator: int) -> None:
    assert submit(conn, action="HOLD")["reason_code"] == "HOLD"


def test_disabled_strategy_is_ignored(conn: psycopg.Connection, operator: int) -> None:
    conn.execute("INSERT INTO trading.strategies (name, enabled) VALUES ('alpha', false)")
    r = submit(conn, action="buy")
    assert (r["status"], r["reason_code"]) == ("ignored", "STRATEGY_DISABLED")
    assert "alpha" in r["reason"]
    assert count(conn, "trading.orders") == 0 and count(conn, "pgmq.q_orders") == 0


def test_second_buy_before_the_first_fills_is_already_at_target(
        conn: psycopg.Connection, operator: int) -> None:
    first = submit(conn, action="buy", size=0.5)
    assert first["status"] == "approved"
    # the open order for 50 counts toward the position: target 50, current 50
    again = submit(conn, action="buy", size=0.5)
    assert (again["status"], again["reason_code"]) == ("ignored", "ALREADY_AT_TARGET")
    assert count(conn, "trading.orders") == 1 and count(conn, "pgmq.q_orders") == 1
    # filled: the position itself is at the target
    fill(conn, first["order_id"], "50", "100", "f1")
    assert position(conn) == 50
    third = submit(conn, action="buy", size=0.5)
    assert (third["status"], third["reason_code"]) == ("ignored", "ALREADY_AT_TARGET")
    # a smaller target than held is also "already there" (buy never sells)
    smaller = submit(conn, action="buy", size=0.2)
    assert smaller["reason_code"] == "ALREADY_AT_TARGET"
    assert count(conn, "trading.orders") == 1


def test_buy_to_a_larger_target_buys_only_the_difference(
        conn: psycopg.Connection, operator: int) -> None:
    first = submit(conn, action="buy", size=0.2)
    # 10000 * 0.2 / 100 = 20
    assert Decimal(str(first["quantity"])) == 20
    fill(conn, first["order_id"], "20", "100", "f1")
    # equity still 10000 (cash 8000 + 20 * 100); target 10000 * 0.5 / 100 = 50; held 20
    second = submit(conn, action="buy", size=0.5)
    assert second["status"] == "approved", second
    assert order(conn, second["order_id"])["quantity"] == Decimal("30")


def test_buy_all_in_while_holding_uses_the_remaining_cash(
        conn: psycopg.Connection, operator: int) -> None:
    """The cash cap limits what the order buys, not the size of the whole position."""
    first = submit(conn, action="buy", size=0.5)
    fill(conn, first["order_id"], "50", "100", "f1")
    # equity 10000 (cash 5000 + 50 * 100): target 10000 * 1 / 100 = 100 units; held 50,
    # so the order buys 50, which costs 5000 = exactly the cash left
    second = submit(conn, action="buy", size=1)
    assert second["status"] == "approved", second
    assert order(conn, second["order_id"])["quantity"] == Decimal("50")


# ---------------------------------------------------------------------------- sell / close
def test_sell_on_long_only_account_closes_exactly_the_held_quantity(
        conn: psycopg.Connection, operator: int) -> None:
    buy = submit(conn, action="buy", size=0.37)
    # 10000 * 0.37 / 100 = 37
    fill(conn, buy["order_id"], "37", "100", "f1")
    sell = submit(conn, action="sell", size=0.1)  # the size does not matter: it closes
    assert sell["status"] == "approved", sell
    o = order(conn, sell["order_id"])
    assert (o["side"], o["quantity"], o["reduce_only"]) == ("sell", Decimal("37"), True)
    # a second sell while the closing order is open: nothing left to close
    again = submit(conn, action="sell")
    assert (again["status"], again["reason_code"]) == ("rejected", "SHORT_NOT_ALLOWED")
    fill(conn, sell["order_id"], "37", "100", "f2")
    assert position(conn) == 0


def test_sell_when_flat_on_long_only_is_short_not_allowed(
        conn: psycopg.Connection, operator: int) -> None:
    r = submit(conn, action="sell")
    assert (r["status"], r["reason_code"]) == ("rejected", "SHORT_NOT_ALLOWED")
    assert signal_row(conn, r["signal_id"])["status"] == "rejected"
    assert count(conn, "trading.orders") == 0 and count(conn, "pgmq.q_orders") == 0


def test_close_when_flat_is_no_position(conn: psycopg.Connection, operator: int) -> None:
    r = submit(conn, action="close")
    assert (r["status"], r["reason_code"]) == ("ignored", "NO_POSITION")
    assert count(conn, "trading.orders") == 0


def test_close_sends_a_reduce_only_order_for_the_position(
        conn: psycopg.Connection, operator: int) -> None:
    buy = submit(conn, action="buy", size=0.25)
    fill(conn, buy["order_id"], "25", "100", "f1")
    r = submit(conn, action="close")
    o = order(conn, r["order_id"])
    assert (o["side"], o["quantity"], o["reduce_only"]) == ("sell", Decimal("25"), True)
    # the closing order is open: a second close has nothing left to close
    assert submit(conn, action="close")["reason_code"] == "NO_POSITION"


def test_allow_short_reversal_sells_the_long_and_the_new_short(
        conn: psycopg.Connection, btc: int) -> None:
    make_account(conn, allow_short=True)
    buy = submit(conn, action="buy", size=0.1)
    # 10000 * 0.1 / 100 = 10
    fill(conn, buy["order_id"], "10", "100", "f1")
    sell = submit(conn, action="sell", size=0.2)
    # equity 10000 (cash 9000 + 10 * 100); short target 10000 * 0.2 / 100 = 20;
    # from +10 to -20: one sell order of 30, not reduce-only (it opens the short)
    assert sell["status"] == "approved", sell
    o = order(conn, sell["order_id"])
    assert (o["side"], o["quantity"], o["reduce_only"]) == ("sell", Decimal("30"), False)
    fill(conn, sell["order_id"], "30", "100", "f2")
    assert position(conn) == -20
    # already short 20: selling to the same target again does nothing
    assert submit(conn, action="sell", size=0.2)["reason_code"] == "ALREADY_AT_TARGET"


def test_allow_short_sell_from_flat_opens_a_short(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn, allow_short=True)
    r = submit(conn, action="sell", size=0.3)
    # 10000 * 0.3 / 100 = 30
    o = order(conn, r["order_id"])
    assert (o["side"], o["quantity"], o["reduce_only"]) == ("sell", Decimal("30"), False)


def test_allow_short_sell_sized_to_nothing_is_refused_cleanly(
        conn: psycopg.Connection, btc: int) -> None:
    make_account(conn, allow_short=True)
    # size 0: target 0, flat: there is nothing to sell; a decision, not a crash
    r = submit(conn, action="sell", size=0)
    assert (r["status"], r["reason_code"]) == ("rejected", "QUANTITY_BELOW_MINIMUM"), r
    assert r["order_id"] is None
    assert count(conn, "trading.orders") == 0
    # and a buy sized to nothing likewise
    b = submit(conn, action="buy", size=0)
    assert (b["status"], b["reason_code"]) == ("rejected", "QUANTITY_BELOW_MINIMUM")
    assert count(conn, "trading.orders") == 0
    # holding a long, a sell sized to nothing still means "target flat": it closes the long
    buy = submit(conn, action="buy", size=0.1)
    fill(conn, buy["order_id"], "10", "100", "f1")
    s = submit(conn, action="sell", size=0)
    o = order(conn, s["order_id"])
    assert (o["side"], o["quantity"], o["reduce_only"]) == ("sell", Decimal("10"), True)


def test_protection_fields_are_carried_to_the_order(
        conn: psycopg.Connection, operator: int) -> None:
    r = submit(conn, action="buy", size=0.1, stop_loss=95, take_profit=130, trailing_stop=4,
               metadata={"breakeven": 110, "note": "x"})
    o = order(conn, r["order_id"])
    assert (o["stop_loss"], o["take_profit"], o["trailing_stop"], o["breakeven"]) == \
        (Decimal("95"), Decimal("130"), Decimal("4"), Decimal("110"))
    g = signal_row(conn, r["signal_id"])
    assert (g["stop_loss"], g["take_profit"], g["trailing_stop"]) == \
        (Decimal("95"), Decimal("130"), Decimal("4"))
    assert g["metadata"] == {"breakeven": 110, "note": "x"}


def test_strategy_is_registered_on_first_use_with_its_version(
        conn: psycopg.Connection, operator: int) -> None:
    submit(conn, action="hold", strategy="newbie", version="2.1")
    submit(conn, action="hold", strategy="newbie", version="2.1")
    assert conn.execute("SELECT name, version FROM trading.strategies WHERE name = 'newbie'"
                        ).fetchall() == [("newbie", "2.1")]
    with pytest.raises(psycopg.Error, match="strategies_name_format"):
        submit(conn, action="hold", strategy="bad name; --")
    assert count(conn, "trading.signals") == 2


def test_concurrent_buys_send_one_order(db_url: str, conn: psycopg.Connection,
                                        operator: int) -> None:
    """The account row lock serialises decisions: 6 racers, one order, 5 at target."""
    n = 6
    barrier = threading.Barrier(n)
    results: list[Any] = []
    lock = threading.Lock()

    def race() -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            try:
                r: Any = submit(c, action="buy", size=0.5)
            except psycopg.Error as e:  # pragma: no cover - reported by the assertion
                r = e
            with lock:
                results.append(r)

    threads = [threading.Thread(target=race) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == n
    codes = sorted(r["reason_code"] or r["status"] for r in results)
    assert codes == ["ALREADY_AT_TARGET"] * (n - 1) + ["approved"]
    assert count(conn, "trading.orders") == 1 and count(conn, "pgmq.q_orders") == 1
    assert scalar(conn, "SELECT quantity FROM trading.orders") == 50
    assert count(conn, "trading.signals") == n
    assert chain_ok(conn)


# ---------------------------------------------------------------------------- hedge mode
def test_hedge_mode_buy_long_leg_sell_short_leg_close_both(
        conn: psycopg.Connection, btc: int) -> None:
    scalar(conn, "SELECT trading.create_account(name => 'acct', environment => 'backtest',"
                 " mode => 'operator', cash => 10000, position_mode => 'hedge',"
                 " allow_short => true)")
    b = submit(conn, action="buy", size=0.2)
    # 10000 * 0.2 / 100 = 20 on the long leg
    ob = order(conn, b["order_id"])
    assert (ob["side"], ob["quantity"], ob["position_leg"]) == ("buy", Decimal("20"), "long")
    fill(conn, b["order_id"], "20", "100", "f1")
    s = submit(conn, action="sell", size=0.1)
    # the short leg is its own: 10000 * 0.1 / 100 = 10, the long stays
    os_ = order(conn, s["order_id"])
    assert (os_["side"], os_["quantity"], os_["position_leg"], os_["reduce_only"]) == \
        ("sell", Decimal("10"), "short", False)
    fill(conn, s["order_id"], "10", "100", "f2")
    legs = conn.execute("SELECT leg, quantity FROM trading.positions ORDER BY leg").fetchall()
    assert legs == [("long", Decimal("20")), ("short", Decimal("10"))]
    # already at both targets
    assert submit(conn, action="buy", size=0.2)["reason_code"] == "ALREADY_AT_TARGET"
    assert submit(conn, action="sell", size=0.1)["reason_code"] == "ALREADY_AT_TARGET"
    c = submit(conn, action="close")
    assert c["status"] == "approved" and len(c["order_ids"]) == 2
    closing = conn.execute("SELECT side, quantity, position_leg, reduce_only FROM trading.orders"
                           " WHERE signal_id = %s ORDER BY order_id", (c["signal_id"],)).fetchall()
    assert closing == [("sell", Decimal("20"), "long", True), ("buy", Decimal("10"), "short", True)]
    # the closing orders are open: a second close has nothing left to close
    again = submit(conn, action="close")
    assert (again["status"], again["reason_code"]) == ("ignored", "NO_POSITION"), again
    assert count(conn, "trading.orders") == 4
    for i, oid in enumerate(c["order_ids"]):
        fill(conn, oid, str(closing[i][1]), "100", f"c{i}")
    assert scalar(conn, "SELECT sum(quantity) FROM trading.positions") == 0
    assert submit(conn, action="close")["reason_code"] == "NO_POSITION"


def test_hedge_close_with_a_partly_closed_leg_closes_the_rest(
        conn: psycopg.Connection, btc: int) -> None:
    scalar(conn, "SELECT trading.create_account(name => 'acct', environment => 'backtest',"
                 " mode => 'operator', cash => 10000, position_mode => 'hedge')")
    b = submit(conn, action="buy", size=0.3)
    fill(conn, b["order_id"], "30", "100", "f1")
    first = submit(conn, action="close")
    fill(conn, first["order_id"], "12", "100", "f2")  # 12 of 30 closed, 18 still on order
    assert submit(conn, action="close")["reason_code"] == "NO_POSITION"
    conn.execute("SELECT trading.cancel_order(%s, 'test')", (str(first["order_id"]),))
    # the rest of the order cancelled: 18 left to close
    again = submit(conn, action="close")
    assert order(conn, again["order_id"])["quantity"] == Decimal("18")


def test_hedge_mode_long_only_sell_closes_the_long_leg(
        conn: psycopg.Connection, btc: int) -> None:
    scalar(conn, "SELECT trading.create_account(name => 'acct', environment => 'backtest',"
                 " mode => 'operator', cash => 10000, position_mode => 'hedge')")
    flat = submit(conn, action="sell")
    assert (flat["status"], flat["reason_code"]) == ("rejected", "SHORT_NOT_ALLOWED")
    b = submit(conn, action="buy", size=0.25)
    fill(conn, b["order_id"], "25", "100", "f1")
    s = submit(conn, action="sell")
    assert s["status"] == "approved", s
    o = order(conn, s["order_id"])
    assert (o["side"], o["quantity"], o["position_leg"], o["reduce_only"]) == \
        ("sell", Decimal("25"), "long", True)
    assert submit(conn, action="sell")["reason_code"] == "SHORT_NOT_ALLOWED"  # on its way
    fill(conn, s["order_id"], "25", "100", "f2")
    assert conn.execute("SELECT leg, quantity FROM trading.positions").fetchall() == \
        [("long", Decimal("0"))]


def test_no_conversion_rate_is_rejected(conn: psycopg.Connection, operator: int) -> None:
    iid = add_instrument(conn, symbol="ETHEUR", base="ETH", quote="EUR")
    add_bar(conn, iid, "100")
    r = submit(conn, action="buy", symbol="ETHEUR")
    assert (r["status"], r["reason_code"]) == ("rejected", "NO_CONVERSION_RATE")
    assert "from=EUR" in r["reason"] and "to=USD" in r["reason"]
    assert count(conn, "trading.orders") == 0


# ---------------------------------------------------------------------------- price, minimum
def test_no_bar_and_no_price_is_rejected_no_price(
        conn: psycopg.Connection, operator: int) -> None:
    add_instrument(conn, symbol="ETHUSD", base="ETH")
    r = submit(conn, action="buy", symbol="ETHUSD")
    assert (r["status"], r["reason_code"]) == ("rejected", "NO_PRICE")
    assert "ETHUSD" in r["reason"]
    assert count(conn, "trading.orders") == 0


def test_bar_after_the_signal_time_is_not_used(
        conn: psycopg.Connection, operator: int, btc: int) -> None:
    r = submit(conn, action="buy", ts="2024-01-01T23:59:00Z")
    assert r["reason_code"] == "NO_PRICE"


def test_a_signal_price_above_the_market_sizes_the_order(
        conn: psycopg.Connection, operator: int) -> None:
    iid = add_instrument(conn, symbol="ETHUSD", base="ETH")
    add_bar(conn, iid, "200")
    r = submit(conn, action="buy", symbol="ETHUSD", price=250, size=0.5)
    # 10000 * 0.5 / 250 = 20 (the higher price: a smaller order)
    assert r["status"] == "approved", r
    o = order(conn, r["order_id"])
    assert o["instrument_id"] == iid
    assert (o["quantity"], o["reference_price"]) == (Decimal("20"), Decimal("250"))


def test_a_signal_price_below_the_market_is_not_used(
        conn: psycopg.Connection, operator: int) -> None:
    """A strategy's price never lowers the price an order is sized and checked at (0004_08):
    at price 1 for ETH trading at 200, size 0.5 asked for 5 000 ETH (a million dollars of
    an account's 10 000) and INSUFFICIENT_CASH, measured at 1, let it through."""
    iid = add_instrument(conn, symbol="ETHUSD", base="ETH")
    add_bar(conn, iid, "200")
    r = submit(conn, action="buy", symbol="ETHUSD", price=1, size=0.5)
    assert r["status"] == "approved", r
    o = order(conn, r["order_id"])
    # 10000 * 0.5 / 200 = 25, at the latest close
    assert (o["quantity"], o["reference_price"]) == (Decimal("25"), Decimal("200"))


def test_a_signal_price_without_a_bar_is_used(
        conn: psycopg.Connection, operator: int) -> None:
    add_instrument(conn, symbol="ETHUSD", base="ETH")
    r = submit(conn, action="buy", symbol="ETHUSD", price=250, size=0.5)
    assert r["status"] == "approved", r
    assert order(conn, r["order_id"])["quantity"] == Decimal("20")  # 10000 * 0.5 / 250


def test_quantity_below_minimum(conn: psycopg.Connection, operator: int) -> None:
    iid = add_instrument(conn, symbol="ETHUSD", base="ETH", min_qty="1")
    add_bar(conn, iid, "100")
    r = submit(conn, action="buy", symbol="ETHUSD", size=0.005)
    # 10000 * 0.005 / 100 = 0.5 < minimum 1
    assert (r["status"], r["reason_code"]) == ("rejected", "QUANTITY_BELOW_MINIMUM")
    assert "minimum=1" in r["reason"]
    assert count(conn, "trading.orders") == 0
    ok = submit(conn, action="buy", symbol="ETHUSD", size=0.01)
    # 10000 * 0.01 / 100 = 1 = the minimum: allowed
    assert ok["status"] == "approved" and order(conn, ok["order_id"])["quantity"] == 1


def test_top_up_below_minimum_is_refused_but_a_small_close_is_not(
        conn: psycopg.Connection, operator: int) -> None:
    iid = add_instrument(conn, symbol="ETHUSD", base="ETH", min_qty="1")
    add_bar(conn, iid, "100")
    b = submit(conn, action="buy", symbol="ETHUSD", size=0.1)
    # 10000 * 0.1 / 100 = 10
    fill(conn, b["order_id"], "10", "100", "f1")
    # target 10000 * 0.105 / 100 = 10.5: the order would be 0.5, under the minimum 1
    r = submit(conn, action="buy", symbol="ETHUSD", size=0.105)
    assert (r["status"], r["reason_code"]) == ("rejected", "QUANTITY_BELOW_MINIMUM"), r
    assert "quantity=0.5" in r["reason"]
    # target 10000 * 0.111 / 100 = 11.1: an order of 1.1 is fine
    ok = submit(conn, action="buy", symbol="ETHUSD", size=0.111)
    assert order(conn, ok["order_id"])["quantity"] == Decimal("1.1")
    fill(conn, ok["order_id"], "1.1", "100", "f2")
    # a close filled for 11 of 11.1, the rest cancelled, leaves 0.1; closing that 0.1
    # (below the minimum) is allowed
    first = submit(conn, action="close", symbol="ETHUSD")
    fill(conn, first["order_id"], "11", "100", "f3")
    conn.execute("SELECT trading.cancel_order(%s, 'test')", (str(first["order_id"]),))
    c = submit(conn, action="close", symbol="ETHUSD")
    assert order(conn, c["order_id"])["quantity"] == Decimal("0.1")


def test_account_by_id_and_symbol_case(conn: psycopg.Connection, operator: int) -> None:
    r = submit(conn, account=str(operator), symbol="btcusd", action="buy", size=0.1)
    assert r["status"] == "approved"
    assert order(conn, r["order_id"])["account_id"] == operator


def test_venue_disambiguates_a_symbol(conn: psycopg.Connection, operator: int, btc: int) -> None:
    other = add_instrument(conn, venue="kraken")
    add_bar(conn, other, "200")
    r = submit(conn, action="buy", venue="kraken", size=0.1)
    # 10000 * 0.1 / 200 = 5
    o = order(conn, r["order_id"])
    assert (o["instrument_id"], o["quantity"]) == (other, Decimal("5"))


# ---------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    ({"account": "nobody"}, "unknown account 'nobody'"),
    ({"symbol": "NOPE"}, "unknown symbol 'NOPE'"),
    ({"action": "jump"}, "signal.action must be buy, sell, close or hold"),
    ({"action": None}, "signal.action is required"),
    ({"size": 1.5}, "signal.size must be between 0 and 1"),
    ({"size": -0.1}, "signal.size must be between 0 and 1"),
    ({"size": "NaN"}, "signal.size must be a finite number"),
    ({"size": "Infinity"}, "signal.size must be a finite number"),
    ({"size": True}, "signal.size must be a number"),
    ({"size": "lots"}, "signal.size must be a number"),
    ({"stop_loss": 0}, "signal.stop_loss must be > 0"),
    ({"take_profit": -5}, "signal.take_profit must be > 0"),
    ({"trailing_stop": "NaN"}, "signal.trailing_stop must be a finite number"),
    ({"price": 0}, "signal.price must be > 0"),
    ({"confidence": 2}, "signal.confidence must be between 0 and 1"),
    ({"ts": "2024-01-02T00:01:00"}, "signal.ts must be an ISO 8601 time with a UTC offset"),
    ({"ts": "2024-13-45T00:00:00Z"}, "signal.ts is not a valid time"),
    ({"metadata": [1, 2]}, "signal.metadata must be a JSON object"),
    ({"metadata": "x"}, "signal.metadata must be a JSON object"),
    ({"metadata": {"breakeven": -1}}, "signal.metadata.breakeven must be > 0"),
    ({"reasoning": "x" * 4001}, "signal.reasoning is longer than 4000 characters"),
    ({"reasoning": {"a": 1}}, "signal.reasoning must be a string"),
    ({"strategy": None}, "a strategy name is required"),
]


@pytest.mark.parametrize(("change", "message"), BAD_INPUTS,
                         ids=[f"{next(iter(c))}={str(next(iter(c.values())))[:12]}"
                              for c, _ in BAD_INPUTS])
def test_bad_input_is_refused_with_a_clear_error_and_leaves_nothing(
        conn: psycopg.Connection, operator: int, change: dict[str, Any], message: str) -> None:
    body = {"account": "acct", "strategy": "newstrat", "symbol": "BTCUSD", "action": "buy",
            "ts": TS}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    before = (count(conn, "trading.signals"), count(conn, "trading.strategies"),
              count(conn, "audit.events"))
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT trading.submit_signal(%s)", (Jsonb(body),))
    assert message in str(e.value), str(e.value)
    # the call's transaction rolled back: no signal, no auto-registered strategy, no event
    assert (count(conn, "trading.signals"), count(conn, "trading.strategies"),
            count(conn, "audit.events")) == before
    assert count(conn, "trading.orders") == 0 and count(conn, "pgmq.q_orders") == 0


def test_symbol_on_two_venues_needs_the_venue(conn: psycopg.Connection, operator: int) -> None:
    add_instrument(conn, venue="kraken")
    with pytest.raises(psycopg.Error, match=r"exists on several venues \(binance, kraken\)"):
        submit(conn, action="buy")
    assert count(conn, "trading.signals") == 0


@pytest.mark.parametrize("body", [[1, 2], "buy", 3, None])
def test_signal_that_is_not_an_object_is_refused(
        conn: psycopg.Connection, operator: int, body: Any) -> None:
    with pytest.raises(psycopg.Error, match="a signal must be a JSON object"):
        conn.execute("SELECT trading.submit_signal(%s)",
                     (Jsonb(body) if body is not None else None,))
    assert count(conn, "trading.signals") == 0


def test_a_refused_call_inside_a_caller_transaction_rolls_back_everything(
        conn: psycopg.Connection, operator: int) -> None:
    with pytest.raises(psycopg.Error, match=r"signal\.confidence"), conn.transaction():
        submit(conn, action="buy", size=0.1)  # approved inside the transaction
        submit(conn, action="buy", confidence=2)
    assert count(conn, "trading.signals") == 0
    assert count(conn, "trading.orders") == 0 and count(conn, "pgmq.q_orders") == 0


# ---------------------------------------------------------------------------- hostile text
def test_hostile_strings_are_stored_verbatim(conn: psycopg.Connection, operator: int) -> None:
    reasoning = ("it's \"quoted\" '; DROP TABLE trading.signals; -- \\ back\\slash "
                 "日本語 ü 🚀 \x01\x07\x1b\t\r\n end")
    metadata = {"k'\"ey": "'; DROP TABLE trading.orders; --",
                "nested": {"u": "Ω≈ç√ \u202e rtl \x1f", "list": [1, "two", None, True]},
                "$1": "%s %(x)s {}"}
    r = submit(conn, action="hold", reasoning=reasoning, metadata=metadata)
    g = signal_row(conn, r["signal_id"])
    assert g["reasoning"] == reasoning
    assert g["metadata"] == metadata
    assert count(conn, "trading.orders") == 0  # the tables are all still there
    assert chain_ok(conn)


def test_reasoning_of_exactly_4000_characters_is_accepted(
        conn: psycopg.Connection, operator: int) -> None:
    r = submit(conn, action="hold", reasoning="é" * 4000)
    assert signal_row(conn, r["signal_id"])["reasoning"] == "é" * 4000


# ---------------------------------------------------------------------------- audit
def test_every_decision_writes_audit_events(conn: psycopg.Connection, operator: int) -> None:
    cases = [
        (dict(action="hold"), "signal.ignored"),
        (dict(action="sell"), "signal.rejected"),
        (dict(action="close"), "signal.ignored"),
        (dict(action="buy", size=0.1), "signal.approved"),
    ]
    for body, event in cases:
        r = submit(conn, **body)
        rows = conn.execute(
            "SELECT event_type, payload FROM audit.events WHERE entity = 'trading.signals'"
            " AND entity_id = %s", (str(r["signal_id"]),)).fetchall()
        assert [e for e, _ in rows] == [event], (body, rows)
        assert rows[0][1]["reason_code"] == r["reason_code"]
    oid = r["order_id"]
    created = conn.execute("SELECT payload FROM audit.events WHERE event_type = 'order.created'"
                           " AND entity_id = %s", (str(oid),)).fetchall()
    assert len(created) == 1
    assert created[0][0]["side"] == "buy" and Decimal(str(created[0][0]["quantity"])) == 10
    assert chain_ok(conn)


def test_advisory_decision_is_audited(conn: psycopg.Connection, btc: int) -> None:
    make_account(conn, mode="advisory")
    r = submit(conn, action="buy")
    assert scalar(conn, "SELECT count(*) FROM audit.events WHERE event_type = 'signal.advisory'"
                        " AND entity_id = %s", str(r["signal_id"])) == 1
    assert chain_ok(conn)


# ---------------------------------------------------------------------------- roles
def test_strategy_role_may_submit_signals_and_nothing_else(
        conn: psycopg.Connection, operator: int, btc: int) -> None:
    buy = submit(conn, action="buy", size=0.1)
    conn.execute("SET ROLE mmats_strategy")
    try:
        r = submit(conn, action="buy", size=0.2)
        assert r["status"] == "approved", r
        # it reads its decisions
        assert scalar(conn, "SELECT status FROM trading.signals WHERE signal_id = %s",
                      r["signal_id"]) == "approved"
        forbidden = [
            ("INSERT INTO trading.orders (account_id, instrument_id, client_order_id, side,"
             " order_type, quantity) VALUES (%s, %s, 'x1', 'buy', 'market', 1)",
             (operator, btc)),
            ("INSERT INTO trading.fills (account_id, order_id, instrument_id, broker_fill_id,"
             " side, quantity, price, commission, commission_currency, ts)"
             " VALUES (%s, %s, %s, 'b', 'buy', 1, 100, 0, 'USD', now())",
             (operator, buy["order_id"], btc)),
            ("INSERT INTO trading.positions (account_id, instrument_id, quantity, average_price)"
             " VALUES (%s, %s, 1, 100)", (operator, btc)),
            ("UPDATE trading.accounts SET cash = 1e9", ()),
            ("UPDATE trading.signals SET status = 'approved'", ()),
            ("SELECT risk.set_limit('MAX_POSITION_SIZE', 1)", ()),
            ("SELECT trading.assign_strategy('acct', 'alpha', 1, 'fixed_quantity')", ()),
            ("SELECT trading.create_account('x', 'backtest', 'operator', 1e9)", ()),
            ("SELECT trading.apply_fill(%s)", (Jsonb({"order_id": buy["order_id"],
                                                      "broker_fill_id": "r1",
                                                      "quantity": 1, "price": 100}),)),
            ("SELECT trading.place_manual_order(%s)", (Jsonb({"account": "acct"}),)),
            ("SELECT pgmq.send('orders', '{}'::jsonb)", ()),
        ]
        for statement, args in forbidden:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement, args)
    finally:
        conn.execute("RESET ROLE")
    assert count(conn, "trading.fills") == 0 and count(conn, "trading.positions") == 0
    assert count(conn, "trading.orders") == 2 and count(conn, "risk.limits") == 0
    assert scalar(conn, "SELECT cash FROM trading.accounts") == 10000
