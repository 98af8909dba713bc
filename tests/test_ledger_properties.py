"""Ledger invariants under random sequences of orders, fills and bars (hypothesis).

Each example runs in a fresh paper account (a unique name in the same test database): manual
orders filled in one or two parts at random prices and commissions on 1-3 instruments,
reversals included (the account may go short), and bars that mark the positions. After each
step the test reads the rows back and checks, in exact decimals (the third instrument is
quoted in yen in the dollar account, converted at USDJPY bars that move at random):

- equity (trading.account_equity) = cash + sum(quantity x last_price x rate now) of the rows;
- cash = starting cash - sum(signed fill notional x its rate) - sum(commissions) of the fills;
- each position's quantity = the signed sum of its fills;
- sum(trades.pnl) + unrealized = equity - starting cash, where unrealized =
  sum(quantity x (last_price x rate now - average_cost) - open_commission), average_cost
  being the average entry price in dollars (average_price when quoted in dollars);
- re-applying any earlier fill returns 'duplicate' and changes nothing.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

SYMBOLS = ["AAAUSD", "BBBUSD", "JJJJPY"]
# yen a dollar -> dollars a yen, by hand (rates whose inverse is exact)
USDJPY = {D(100): D("0.01"), D(125): D("0.008"), D(160): D("0.00625"), D(80): D("0.0125"),
          D(200): D("0.005"), D(250): D("0.004")}
START = D("1000000")
# average prices and pro-rata commissions are numeric divisions (rounded to 16+ significant
# digits by PostgreSQL), so the P&L identity holds to that precision, not to the last digit
PNL_TOLERANCE = D("1e-9")

_counter = itertools.count(1)
_minutes = itertools.count(0)


def _instruments(conn: psycopg.Connection) -> dict[str, int]:
    ids: dict[str, int] = {}
    for sym in [*SYMBOLS, "USDJPY"]:
        row = conn.execute("SELECT instrument_id FROM market.instruments WHERE symbol = %s",
                           (sym,)).fetchone()
        if row is None:
            row = conn.execute(
                "INSERT INTO market.instruments (symbol, venue, market, base_currency,"
                " quote_currency, price_tick, quantity_step, min_quantity, calendar_id)"
                " VALUES (%s, 'prop', 'crypto', %s, %s, 0.01, 0.1, 0, 'CRYPTO_24X7')"
                " RETURNING instrument_id", (sym, sym[:3], sym[3:])).fetchone()
            _bar(conn, row[0], D(125) if sym == "USDJPY" else D(100))
        ids[sym] = row[0]
    return ids


def _bar(conn: psycopg.Connection, iid: int, close: D) -> None:
    minute = next(_minutes)
    conn.execute(
        "INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close)"
        " VALUES (%s, '1m', timestamptz '2026-02-01 00:00Z' + %s * interval '1 minute',"
        " %s, %s, %s, %s)", (iid, minute, close, close, close, close))


def _account_state(conn: psycopg.Connection, acct: int) -> Any:
    """Every row of the account (for 'nothing changed')."""
    return conn.execute(
        "SELECT (SELECT to_jsonb(a) FROM trading.accounts a WHERE a.account_id = %(a)s),"
        " (SELECT jsonb_agg(to_jsonb(p) ORDER BY p.position_id) FROM trading.positions p"
        "   WHERE p.account_id = %(a)s),"
        " (SELECT jsonb_agg(to_jsonb(o) ORDER BY o.order_id) FROM trading.orders o"
        "   WHERE o.account_id = %(a)s),"
        " (SELECT jsonb_agg(to_jsonb(f) ORDER BY f.fill_id) FROM trading.fills f"
        "   WHERE f.account_id = %(a)s),"
        " (SELECT jsonb_agg(to_jsonb(t) ORDER BY t.trade_id) FROM trading.trades t"
        "   WHERE t.account_id = %(a)s),"
        " (SELECT count(*) FROM audit.events)", {"a": acct}).fetchone()


def _check_invariants(conn: psycopg.Connection, acct: int, jpy: int, rate_now: D,
                      fill_rate: dict[str, D]) -> None:
    cash = conn.execute("SELECT cash FROM trading.accounts WHERE account_id = %s",
                        (acct,)).fetchone()[0]
    fills = conn.execute(
        "SELECT instrument_id, side::text, quantity, price, commission, broker_fill_id"
        " FROM trading.fills WHERE account_id = %s", (acct,)).fetchall()
    expected_cash = START
    fold: dict[int, D] = {}
    for iid, side, q, price, commission, bfid in fills:
        signed = q if side == "buy" else -q
        expected_cash -= signed * price * fill_rate[bfid] + commission
        fold[iid] = fold.get(iid, D(0)) + signed
    assert cash == expected_cash

    positions = conn.execute(
        "SELECT instrument_id, leg::text, quantity, average_price, average_cost, last_price,"
        " open_commission FROM trading.positions WHERE account_id = %s", (acct,)).fetchall()
    value = D(0)
    unrealized = D(0)
    held = {}
    for iid, leg, q, avg, cost, last, open_comm in positions:
        assert leg == "net"
        held[iid] = q
        rate = rate_now if iid == jpy else 1
        if q != 0:
            value += q * last * rate
            unrealized += q * (last * rate - cost) - open_comm
            if iid != jpy:
                assert cost == avg
        else:
            assert avg is None and cost is None and open_comm == 0
    assert {k: v for k, v in held.items() if v != 0} == {k: v for k, v in fold.items() if v != 0}
    assert set(held) == set(fold)

    eq_cash, eq_value, eq = conn.execute(
        "SELECT cash, positions_value, equity FROM trading.account_equity(%s)",
        (acct,)).fetchone()
    assert eq_cash == cash and eq_value == value and eq == cash + value

    realized = conn.execute("SELECT coalesce(sum(pnl), 0) FROM trading.trades"
                            " WHERE account_id = %s", (acct,)).fetchone()[0]
    assert abs(realized + unrealized - (eq - START)) <= PNL_TOLERANCE, (
        realized, unrealized, eq - START)
    # the positions' realized P&L is the sum of their trades
    per_pos = conn.execute("SELECT coalesce(sum(realized_pnl), 0) FROM trading.positions"
                           " WHERE account_id = %s", (acct,)).fetchone()[0]
    assert per_pos == realized


prices = st.integers(min_value=100, max_value=30000).map(lambda c: D(c) / 100)
quantities = st.integers(min_value=1, max_value=60).map(lambda n: D(n) / 10)
commissions = st.integers(min_value=0, max_value=500).map(lambda c: D(c) / 100)

trade_step = st.tuples(
    st.just("trade"), st.integers(0, 2), st.sampled_from(["buy", "sell"]), quantities,
    st.integers(0, 100), prices, prices, commissions, commissions)
bar_step = st.tuples(st.just("bar"), st.integers(0, 2), prices)
fx_step = st.tuples(st.just("fx"), st.sampled_from(sorted(USDJPY)))
replay_step = st.tuples(st.just("replay"), st.integers(0, 10_000))
steps = st.lists(st.one_of(trade_step, trade_step, bar_step, replay_step, fx_step),
                 min_size=1, max_size=12)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n_instruments=st.integers(1, 3), plan=steps)
def test_ledger_invariants(conn: psycopg.Connection, n_instruments: int,
                           plan: list[tuple]) -> None:
    ids = _instruments(conn)
    symbols = SYMBOLS[:n_instruments]
    name = f"prop{next(_counter)}"
    acct = conn.execute(
        "SELECT trading.create_account(%s, 'paper', 'operator', %s, 'USD', 'oneway',"
        " 'independent', true)", (name, START)).fetchone()[0]
    applied: list[dict] = []
    rate_now = USDJPY[conn.execute(
        "SELECT close FROM market.bars WHERE instrument_id = %s ORDER BY ts DESC LIMIT 1",
        (ids["USDJPY"],)).fetchone()[0]]
    fill_rate: dict[str, D] = {}
    for step in plan:
        kind = step[0]
        if kind == "trade":
            _, k, side, qty, split_pct, p1, p2, c1, c2 = step
            sym = symbols[k % len(symbols)]
            r = conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb(
                {"account": name, "symbol": sym, "side": side, "quantity": str(qty)}),)
                ).fetchone()[0]
            assert r["status"] == "approved", r
            first = (qty * split_pct / 100).quantize(D("0.1"))
            parts = [(first, p1, c1), (qty - first, p2, c2)]
            for q, price, comm in parts:
                if q <= 0:
                    continue
                # dated on the bars' clock: the next bar closes after it, so it marks it
                at = datetime(2026, 2, 1, tzinfo=UTC) + timedelta(minutes=next(_minutes))
                spec = {"order_id": r["order_id"], "broker_fill_id": f"{name}-{len(applied)}",
                        "quantity": str(q), "price": str(price), "commission": str(comm),
                        "ts": at.isoformat()}
                res = conn.execute("SELECT trading.apply_fill(%s)", (Jsonb(spec),)).fetchone()[0]
                assert res["status"] == "applied", res
                applied.append(spec)
                fill_rate[spec["broker_fill_id"]] = rate_now if sym == "JJJJPY" else D(1)
            status = conn.execute("SELECT status::text, filled_quantity FROM trading.orders"
                                  " WHERE order_id = %s", (r["order_id"],)).fetchone()
            assert status == ("filled", qty)
        elif kind == "bar":
            _, k, close = step
            _bar(conn, ids[symbols[k % len(symbols)]], close)
            # the bar marked every open position of the instrument at its close
            marked = conn.execute(
                "SELECT count(*) FILTER (WHERE last_price <> %s) FROM trading.positions"
                " WHERE account_id = %s AND instrument_id = %s AND quantity <> 0",
                (close, acct, ids[symbols[k % len(symbols)]])).fetchone()[0]
            assert marked == 0
        elif kind == "fx":
            _bar(conn, ids["USDJPY"], step[1])
            rate_now = USDJPY[step[1]]
        else:
            if not applied:
                continue
            spec = applied[step[1] % len(applied)]
            before = _account_state(conn, acct)
            res = conn.execute("SELECT trading.apply_fill(%s)", (Jsonb(spec),)).fetchone()[0]
            assert res["status"] == "duplicate"
            assert _account_state(conn, acct) == before
        _check_invariants(conn, acct, ids["JJJJPY"], rate_now, fill_rate)
