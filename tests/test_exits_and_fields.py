"""Migration 0004_11: exits never exceed what is held; a HARD breaker closes what fills
after it; the SQL API refuses what it does not understand. Each case was reproduced on
0004_10 first (its comment says what happened there)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
OPEN = ("created", "in_flight", "submitted", "partially_filled")


def one(conn: psycopg.Connection, sql: str, *args: Any) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture
def btc(conn: psycopg.Connection) -> int:
    iid = one(conn, "INSERT INTO market.instruments (symbol, venue, market, base_currency,"
                    " quote_currency, price_tick, quantity_step, min_quantity, calendar_id)"
                    " VALUES ('BTCUSD', 'test', 'crypto', 'BTC', 'USD', 0.01, 0.001, 0,"
                    " 'CRYPTO_24X7') RETURNING instrument_id")
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1m', %s, 100, 100, 100, 100, 1000)", (iid, T0))
    return iid


def account(conn: psycopg.Connection, name: str = "p", env: str = "paper", *,
            short: bool = False, aggregation: str = "independent") -> int:
    aid = one(conn, "SELECT trading.create_account(name => %s, environment => %s,"
                    " mode => %s, cash => 100000, currency => 'USD',"
                    " allow_short => %s, aggregation => %s)", name, env,
              "advisory" if env == "live" else "operator", short, aggregation)
    # (a live account is made operator in two confirmed steps; as the owner here, at once)
    conn.execute("UPDATE trading.accounts SET mode = 'operator' WHERE account_id = %s", (aid,))
    return aid


def manual(conn: psycopg.Connection, side: str, qty: str, **more: Any) -> dict[str, Any]:
    return one(conn, "SELECT trading.place_manual_order(%s)", Jsonb(
        {"account": "p", "symbol": "BTCUSD", "side": side, "quantity": qty, **more}))


def signal(conn: psycopg.Connection, action: str, strategy: str = "st", **more: Any
           ) -> dict[str, Any]:
    return one(conn, "SELECT trading.submit_signal(%s)", Jsonb(
        {"account": "p", "strategy": strategy, "symbol": "BTCUSD", "action": action,
         "ts": (T0 + timedelta(minutes=1)).isoformat(), **more}))


def fill(conn: psycopg.Connection, order_id: int, qty: str, ref: str,
         price: str = "100") -> dict[str, Any]:
    return one(conn, "SELECT trading.apply_fill(%s)", Jsonb(
        {"order_id": order_id, "broker_fill_id": ref, "quantity": qty, "price": price,
         "ts": (T0 + timedelta(minutes=1)).isoformat()}))


def open_exits(conn: psycopg.Connection) -> D:
    return one(conn, "SELECT COALESCE(sum(quantity - filled_quantity), 0) FROM trading.orders"
                     " WHERE reduce_only AND status = ANY(%s)", list(OPEN))


def held(conn: psycopg.Connection) -> D:
    return one(conn, "SELECT COALESCE(sum(CASE WHEN leg = 'short' THEN -quantity"
                     " ELSE quantity END), 0) FROM trading.positions")


def long_10(conn: psycopg.Connection, strategy: str | None = None) -> None:
    """A long of 10 held by the account's own row (or by `strategy`'s)."""
    if strategy is None:
        r = manual(conn, "buy", "10")
    else:
        conn.execute("SELECT trading.assign_strategy('p', %s, 1, 'fixed_quantity',"
                     " '{\"quantity\": 10}')", (strategy,))
        r = signal(conn, "buy", strategy)
    assert r["status"] == "approved", r
    assert fill(conn, r["order_id"], "10", f"entry-{strategy}")["status"] == "applied"


# ---------------------------------------------------------------- exits on their way
def test_a_manual_sell_beside_a_stop_on_its_way_does_not_sell_twice(conn, btc):
    """0004_10: a bar through the stop sent a sell of 10; the manual sell of 10 after it was
    approved as reduce-only too (20 to sell of 10 held); the ledger then refused the second
    fill, while a broker without reduce-only orders sold short."""
    account(conn)
    long_10(conn)
    conn.execute("UPDATE trading.positions SET stop_loss = 95")
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close,"
                 " volume) VALUES (%s, '1m', %s, 100, 100, 90, 92, 1000)",
                 (btc, T0 + timedelta(minutes=1)))
    assert open_exits(conn) == 10
    r = manual(conn, "sell", "10")
    assert (r["status"], r["reason_code"]) == ("rejected", "SHORT_NOT_ALLOWED"), r
    assert "exits on their way=10" in r["reason"]
    assert open_exits(conn) == 10
    with pytest.raises(psycopg.errors.CheckViolation, match="would open 10"):
        manual(conn, "sell", "10", reduce_only=True)


def test_two_manual_sells_of_the_whole_position_make_one_exit(conn, btc):
    account(conn, short=True)
    long_10(conn)
    first, second = manual(conn, "sell", "10"), manual(conn, "sell", "10")
    assert first["status"] == second["status"] == "approved"
    rows = conn.execute("SELECT reduce_only, quantity FROM trading.orders WHERE order_id IN"
                        " (%s, %s) ORDER BY order_id", (first["order_id"], second["order_id"])
                        ).fetchall()
    # the second one would open a short of 10: an opening order, checked as one
    assert rows == [(True, 10), (False, 10)]
    assert open_exits(conn) == 10


def test_a_strategy_close_counts_a_manual_exit_that_reaches_its_row(conn, btc):
    """Independent account, the strategy's row holds 10, the account's own row nothing: a
    manual sell of 10 books to the strategy's row; the strategy's close sent 10 more."""
    account(conn)
    long_10(conn, "st")
    assert manual(conn, "sell", "10")["status"] == "approved"
    r = signal(conn, "close", "st")
    assert (r["status"], r["reason_code"]) == ("ignored", "NO_POSITION"), r
    assert open_exits(conn) == 10


def test_a_manual_exit_smaller_than_the_account_row_leaves_the_strategy_its_close(conn, btc):
    account(conn)
    long_10(conn)            # the account's own row: 10
    long_10(conn, "st")      # the strategy's row: 10
    assert manual(conn, "sell", "4")["status"] == "approved"  # within the account's row
    r = signal(conn, "close", "st")
    assert r["status"] == "approved", r
    assert one(conn, "SELECT quantity FROM trading.orders WHERE order_id = %s",
               r["order_id"]) == 10
    assert open_exits(conn) == 14


def test_racing_manual_sells_never_exceed_the_position(conn, db_url, btc):
    account(conn, short=False)
    long_10(conn)
    barrier = threading.Barrier(2)
    answers: list[dict[str, Any]] = []

    def sell() -> None:
        with psycopg.connect(db_url, autocommit=True) as c:
            barrier.wait()
            answers.append(one(c, "SELECT trading.place_manual_order(%s)", Jsonb(
                {"account": "p", "symbol": "BTCUSD", "side": "sell", "quantity": "10"})))

    threads = [threading.Thread(target=sell) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(a["status"] for a in answers) == ["approved", "rejected"]
    assert open_exits(conn) == 10


# ---------------------------------------------------------------- HARD and a late fill
def test_an_entry_filled_after_a_hard_trip_is_closed_at_once(conn, btc):
    """0004_10: the entry on its way when HARD tripped filled afterwards and stayed open."""
    account(conn)
    entry = manual(conn, "buy", "5")
    assert one(conn, "SELECT trading.mark_in_flight(%s)", str(entry["order_id"]))[
        "status"] == "in_flight"
    conn.execute("SELECT risk.trip_breaker('p', 'HARD', 'drawdown')")
    r = fill(conn, entry["order_id"], "5", "late")
    assert r["status"] == "applied" and len(r["breaker_orders"]) == 1, r
    o = conn.execute("SELECT side::text, quantity, reduce_only, trigger::text FROM trading.orders"
                     " WHERE order_id = %s", (r["breaker_orders"][0],)).fetchone()
    assert o == ("sell", 5, True, "breaker")
    # the fill of that close leaves nothing open: nothing more is sent
    c = fill(conn, r["breaker_orders"][0], "5", "close")
    assert c["status"] == "applied" and c["breaker_orders"] == [], c
    assert held(conn) == 0 and open_exits(conn) == 0


def test_a_fill_with_no_breaker_sends_nothing_more(conn, btc):
    account(conn)
    r = fill(conn, manual(conn, "buy", "5")["order_id"], "5", "f")
    assert "breaker_orders" not in r


# ---------------------------------------------------------------- assignment and fields
def test_an_unassigned_strategy_is_refused_not_given_the_capital(conn, btc):
    """0004_10: a misspelt strategy was sized with the whole account (allocation 1)."""
    account(conn)
    conn.execute("SELECT trading.assign_strategy('p', 'st', 0.1)")
    r = signal(conn, "buy", "sst")
    assert (r["status"], r["reason_code"]) == ("rejected", "STRATEGY_NOT_ASSIGNED"), r
    assert "strategy=sst" in r["reason"] and "account=p" in r["reason"]
    assert one(conn, "SELECT status::text FROM trading.signals WHERE signal_id = %s",
               r["signal_id"]) == "rejected"
    assert one(conn, "SELECT count(*) FROM trading.orders") == 0


@pytest.mark.parametrize("call, doc, says", [
    ("submit_signal", {"account": "p", "strategy": "st", "symbol": "BTCUSD", "action": "buy",
                       "stoploss": 90, "sizee": 0.1},
     'signal: unknown field(s) "sizee", "stoploss" (known: account, strategy'),
    ("place_manual_order", {"account": "p", "symbol": "BTCUSD", "side": "buy", "quantity": 1,
                            "trailing_stop": 5},
     'order: unknown field(s) "trailing_stop"'),
    ("apply_fill", {"order_id": 1, "broker_fill_id": "x", "quantity": 1, "price": 100,
                    "comission": 1},
     'fill: unknown field(s) "comission"'),
    ("book_cash", {"account": "p", "kind": "deposit", "amount": 5, "broker_ref": "r",
                   "\u001b]0;x": 1},
     'book_cash: unknown field(s) "?]0;x"'),
])
def test_unknown_fields_are_refused_by_name(conn, btc, call, doc, says):
    account(conn)
    conn.execute("SELECT trading.assign_strategy('p', 'st')")
    before = one(conn, "SELECT count(*) FROM audit.events")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        conn.execute(f"SELECT trading.{call}(%s)", (Jsonb(doc),))
    assert says in str(err.value).splitlines()[0], str(err.value)
    assert one(conn, "SELECT count(*) FROM audit.events") == before


def test_a_buy_stop_below_the_market_is_checked_at_the_market(conn, btc):
    """0004_10: priced at its stop of 0.01, a buy of 10 000 BTC passed every value limit
    and the cash check; it fills at the market at once."""
    account(conn)
    conn.execute("SELECT risk.set_limit('MAX_ORDER_VALUE', 5000, account => 'p')")
    r = manual(conn, "buy", "1000", type="stop", stop_price="0.01")
    assert (r["status"], r["reason_code"]) == ("rejected", "MAX_ORDER_VALUE"), r
    # a buy limit is priced at its limit: it never pays more
    assert manual(conn, "buy", "10", type="limit", limit_price="50")["status"] == "approved"


@pytest.mark.parametrize("more, says", [
    ({"type": "limit"}, "order.limit_price is required for a limit order"),
    ({"type": "stop"}, "order.stop_price is required for a stop order"),
    ({"time_in_force": "GTD"}, "order.expire_at is required for a GTD order"),
    ({"reduce_only": "maybe"}, 'order.reduce_only must be true or false, got "maybe"'),
    ({"client_order_id": "mm1-99"}, "has the form of the ids MMATS gives its own orders"),
])
def test_a_manual_order_s_fields_are_named_when_wrong(conn, btc, more, says):
    account(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=says):
        manual(conn, "buy", "1", **more)


def test_a_live_gtd_order_must_expire_in_the_future(conn, btc):
    account(conn, "p", "live")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="is not in the future"):
        manual(conn, "buy", "1", type="limit", limit_price="90", time_in_force="GTD",
               expire_at="2000-01-01T00:00:00Z")


def test_a_paper_signal_from_the_future_is_refused(conn, btc):
    account(conn)
    conn.execute("SELECT trading.assign_strategy('p', 'st')")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="is in the future"):
        signal(conn, "buy", ts="9999-12-31T00:00:00Z")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="metadata must be at most"):
        signal(conn, "buy", metadata={"x": "y" * 20000})


# ---------------------------------------------------------------- cash
def test_a_paper_withdrawal_cannot_take_cash_promised_to_an_approved_buy(conn, btc):
    """0004_10: the buy was approved, the withdrawal booked anyway, cash -50 at the fill."""
    account(conn)
    conn.execute("SELECT trading.book_cash(%s)", (Jsonb(
        {"account": "p", "kind": "withdrawal", "amount": "-99850", "broker_ref": "w0"}),))
    assert one(conn, "SELECT cash FROM trading.accounts") == 150
    assert manual(conn, "buy", "1")["status"] == "approved"  # 100 of the 150 promised
    with pytest.raises(psycopg.errors.CheckViolation, match="more than its available cash 50"):
        conn.execute("SELECT trading.book_cash(%s)", (Jsonb(
            {"account": "p", "kind": "withdrawal", "amount": "-100", "broker_ref": "w1"}),))
    r = one(conn, "SELECT trading.book_cash(%s)", Jsonb(
        {"account": "p", "kind": "withdrawal", "amount": "-50", "broker_ref": "w2"}))
    assert r["status"] == "booked"


# ---------------------------------------------------------------- limits that cannot apply
@pytest.mark.parametrize("call, says", [
    ("risk.set_limit('MAX_OPEN_POSITIONS', 2.5, account => 'p')",
     "MAX_OPEN_POSITIONS counts positions: a whole number, got 2.5"),
    ("risk.set_limit('DAILY_LOSS', 500, params => '{\"unit\": \"fraction\"}', account => 'p')",
     "DAILY_LOSS as a fraction must be between 0 and 1, got 500"),
    ("risk.set_limit('TRADING_HOURS', 1, params => '{\"strat\": \"09:00\"}', account => 'p')",
     'TRADING_HOURS params: unknown field(s) "strat"'),
    ("risk.set_limit('MAX_ORDER_VALUE', 1e400, account => 'p')", "must be less than 10^18"),
])
def test_a_limit_that_could_never_apply_is_refused(conn, btc, call, says):
    """0004_10 stored each of these; none would ever have refused an order as meant."""
    account(conn)
    before = one(conn, "SELECT count(*) FROM risk.limits")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        conn.execute(f"SELECT {call}")
    assert says in str(err.value).splitlines()[0], str(err.value)
    assert one(conn, "SELECT count(*) FROM risk.limits") == before


def test_a_limit_on_a_symbol_nothing_is_called_yet_is_kept_with_a_warning(conn, btc):
    account(conn)
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    conn.execute("SELECT risk.set_limit('MAX_EXPOSURE', 0.2, 'symbol', 'BTCUSDT', account => 'p')")
    assert notices == ["no instrument is called 'BTCUSDT' yet: this MAX_EXPOSURE limit applies "
                       "to none until one is"]
    conn.execute("SELECT risk.set_limit('MAX_EXPOSURE', 0.2, 'symbol', 'btcusd', account => 'p')")
    assert len(notices) == 1  # a symbol that exists: nothing to say
    assert one(conn, "SELECT count(*) FROM risk.limits WHERE scope = 'symbol'") == 2
