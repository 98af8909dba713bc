"""Signal aggregation of trading.submit_signal: independent, priority, consensus, weighted.

BTCUSD at 100, cash 10000, percent_equity sizing (size 0.5 -> 50 units). Account settings
(consensus_share, weighted_threshold, aggregation_window) are set with UPDATE as superuser.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

BAR_TS = "2024-01-02T00:00:00Z"


def ts(minute: int) -> str:
    """Signal times: minutes after 01:00 on the bar's day."""
    return f"2024-01-02T{1 + minute // 60:02d}:{minute % 60:02d}:00Z"


def scalar(conn: psycopg.Connection, query: str, *args: Any) -> Any:
    row = conn.execute(query, args).fetchone()
    assert row is not None
    return row[0]


def setup(conn: psycopg.Connection, aggregation: str, allow_short: bool = False,
          window: str = "1 hour") -> int:
    iid = scalar(conn, """
        INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,
                                        price_tick, quantity_step, min_quantity, calendar_id)
        VALUES ('BTCUSD', 'binance', 'crypto', 'BTC', 'USD', 0.01, 0.01, 0, 'CRYPTO_24X7')
        RETURNING instrument_id""")
    conn.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, close)"
                 " VALUES (%s, '1m', %s, 100, 100, 100, 100)", (iid, BAR_TS))
    acct = scalar(conn, "SELECT trading.create_account(name => 'acct', environment => 'backtest',"
                        " mode => 'operator', cash => 10000, aggregation => %s,"
                        " allow_short => %s)", aggregation, allow_short)
    conn.execute("UPDATE trading.accounts SET aggregation_window = %s::interval", (window,))
    return acct


def assign(conn: psycopg.Connection, strategy: str, priority: int | None = None,
           weight: str | None = None) -> int:
    conn.execute("SELECT trading.assign_strategy('acct', %s, priority => %s,"
                 " weight => %s::numeric)", (strategy, priority, weight))
    return scalar(conn, "SELECT strategy_id FROM trading.strategies WHERE name = %s", strategy)


def submit(conn: psycopg.Connection, strategy: str, action: str, minute: int,
           **extra: Any) -> dict[str, Any]:
    body = {"account": "acct", "strategy": strategy, "symbol": "BTCUSD", "action": action,
            "ts": ts(minute), "size": 0.5, **extra}
    return scalar(conn, "SELECT trading.submit_signal(%s)", Jsonb(body))


def order(conn: psycopg.Connection, order_id: int) -> tuple[Any, ...]:
    row = conn.execute("SELECT strategy_id, side, quantity, reduce_only, signal_id"
                       " FROM trading.orders WHERE order_id = %s", (order_id,)).fetchone()
    assert row is not None
    return tuple(row)


def fill(conn: psycopg.Connection, order_id: int, quantity: str, fid: str) -> None:
    conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
        "order_id": order_id, "broker_fill_id": fid, "quantity": quantity, "price": "100",
        "ts": ts(0)}),))


def orders(conn: psycopg.Connection) -> int:
    return scalar(conn, "SELECT count(*) FROM trading.orders")


# ---------------------------------------------------------------------------- independent
def test_independent_strategies_keep_their_own_positions(conn: psycopg.Connection) -> None:
    acct = setup(conn, "independent")
    a, b = assign(conn, "alpha"), assign(conn, "beta")
    ra = submit(conn, "alpha", "buy", 0, size=0.3)
    # 10000 * 0.3 / 100 = 30
    assert order(conn, ra["order_id"])[:3] == (a, "buy", Decimal("30"))
    fill(conn, ra["order_id"], "30", "fa")
    rb = submit(conn, "beta", "buy", 1, size=0.2)
    # equity 10000 (cash 7000 + 30 * 100): 10000 * 0.2 / 100 = 20; beta's own position is 0
    assert order(conn, rb["order_id"])[:3] == (b, "buy", Decimal("20"))
    fill(conn, rb["order_id"], "20", "fb")
    rows = conn.execute("SELECT strategy_id, quantity FROM trading.positions"
                        " WHERE account_id = %s ORDER BY strategy_id", (acct,)).fetchall()
    assert rows == [(a, Decimal("30")), (b, Decimal("20"))]
    # alpha's sell (long-only) closes alpha's 30, not the account's 50
    sa = submit(conn, "alpha", "sell", 2)
    assert order(conn, sa["order_id"])[:4] == (a, "sell", Decimal("30"), True)
    # beta is at its target; alpha's pending exit does not make beta buy
    assert submit(conn, "beta", "buy", 3, size=0.2)["reason_code"] == "ALREADY_AT_TARGET"
    # alpha's open closing order counts: a close has nothing left to close
    assert submit(conn, "alpha", "close", 4)["reason_code"] == "NO_POSITION"
    fill(conn, sa["order_id"], "30", "fa2")
    rows = conn.execute("SELECT strategy_id, quantity FROM trading.positions"
                        " WHERE account_id = %s ORDER BY strategy_id", (acct,)).fetchall()
    assert rows == [(a, Decimal("0")), (b, Decimal("20"))]


def test_independent_open_orders_count_per_strategy(conn: psycopg.Connection) -> None:
    setup(conn, "independent")
    a, b = assign(conn, "alpha"), assign(conn, "beta")
    submit(conn, "alpha", "buy", 0, size=0.3)  # 30 open
    # beta's target 10000 * 0.2 / 100 = 20 is its own; alpha's open order does not count,
    # and 20 <= (10000 - 3000 reserved) / 100
    rb = submit(conn, "beta", "buy", 1, size=0.2)
    assert rb["status"] == "approved"
    assert order(conn, rb["order_id"])[:3] == (b, "buy", Decimal("20"))
    assert submit(conn, "alpha", "buy", 2, size=0.3)["reason_code"] == "ALREADY_AT_TARGET"
    assert scalar(conn, "SELECT array_agg(strategy_id ORDER BY order_id) FROM trading.orders") \
        == [a, b]


# ---------------------------------------------------------------------------- priority
def test_priority_higher_opposite_signal_outranks_the_lower(conn: psycopg.Connection) -> None:
    setup(conn, "priority")
    hi = assign(conn, "hi", priority=10)
    assign(conn, "lo", priority=1)
    rh = submit(conn, "hi", "buy", 0)
    assert rh["status"] == "approved"
    assert order(conn, rh["order_id"])[:3] == (hi, "buy", Decimal("50"))
    fill(conn, rh["order_id"], "50", "f1")
    rl = submit(conn, "lo", "sell", 30)
    assert (rl["status"], rl["reason_code"], rl["order_id"]) == ("ignored", "OUTRANKED", None)
    assert "by=hi" in rl["reason"] and "priority=10" in rl["reason"]
    assert "own_priority=1" in rl["reason"]
    assert orders(conn) == 1
    assert scalar(conn, "SELECT reason_code FROM trading.signals WHERE signal_id = %s",
                  rl["signal_id"]) == "OUTRANKED"
    # the same low-priority sell once hi's buy is outside the 1-hour window: it executes
    # (long-only: it closes the 50 held)
    late = submit(conn, "lo", "sell", 61)
    assert late["status"] == "approved", late
    assert order(conn, late["order_id"])[1:4] == ("sell", Decimal("50"), True)


def test_priority_lower_signal_does_not_outrank_a_higher_one(conn: psycopg.Connection) -> None:
    setup(conn, "priority", allow_short=True)
    assign(conn, "hi", priority=10)
    lo = assign(conn, "lo", priority=1)
    rl = submit(conn, "lo", "buy", 0)
    assert rl["status"] == "approved"
    rh = submit(conn, "hi", "sell", 1)
    assert rh["status"] == "approved", rh
    hi = scalar(conn, "SELECT strategy_id FROM trading.strategies WHERE name = 'hi'")
    # net position: +50 ordered by lo; hi's short target -50: sell 100
    assert order(conn, rh["order_id"])[:3] == (hi, "sell", Decimal("100"))
    # and now lo's buy again is outranked by hi's sell
    again = submit(conn, "lo", "buy", 2)
    assert again["reason_code"] == "OUTRANKED"
    assert lo != hi


def test_priority_equal_or_same_direction_is_not_outranked(conn: psycopg.Connection) -> None:
    setup(conn, "priority")
    assign(conn, "hi", priority=10)
    assign(conn, "peer", priority=10)
    assign(conn, "lo", priority=1)
    rh = submit(conn, "hi", "buy", 0, size=0.2)
    fill(conn, rh["order_id"], "20", "f1")
    # same direction from a lower priority: no conflict (a bigger target: buys 30 more)
    rl = submit(conn, "lo", "buy", 1)
    assert rl["status"] == "approved", rl
    assert order(conn, rl["order_id"])[1:3] == ("buy", Decimal("30"))
    fill(conn, rl["order_id"], "30", "f2")
    # opposite from an equal priority: not outranked (closes the 50)
    rp = submit(conn, "peer", "sell", 2)
    assert rp["status"] == "approved", rp
    assert order(conn, rp["order_id"])[1:4] == ("sell", Decimal("50"), True)


# ---------------------------------------------------------------------------- consensus
def test_consensus_one_of_three_is_not_enough_two_is(conn: psycopg.Connection) -> None:
    setup(conn, "consensus")
    conn.execute("UPDATE trading.accounts SET consensus_share = 0.5")
    assign(conn, "a")
    b = assign(conn, "b")
    assign(conn, "c")
    r1 = submit(conn, "a", "buy", 0)
    # 1 of 3 agree: 0.33 <= 0.5
    assert (r1["status"], r1["reason_code"]) == ("ignored", "CONSENSUS_NOT_REACHED")
    assert "agree=1" in r1["reason"] and "of=3" in r1["reason"]
    assert orders(conn) == 0
    # c disagrees: still 1 buy of 3 (c's sell: 1 of 3 too)
    r2 = submit(conn, "c", "sell", 1)
    assert r2["reason_code"] == "CONSENSUS_NOT_REACHED"
    # b agrees with a: 2 of 3 = 0.67 > 0.5 -> b's signal executes
    r3 = submit(conn, "b", "buy", 2)
    assert r3["status"] == "approved", r3
    assert order(conn, r3["order_id"])[:3] == (b, "buy", Decimal("50"))
    assert orders(conn) == 1


def test_only_the_strategies_the_account_trades_vote(conn: psycopg.Connection) -> None:
    # 0004_13: the signal of a strategy not assigned to the account (recorded, rejected
    # STRATEGY_NOT_ASSIGNED) was a vote: 2 of 3 agreed, under the share of 0.7
    setup(conn, "consensus")
    conn.execute("UPDATE trading.accounts SET consensus_share = 0.7")
    assign(conn, "a")
    assign(conn, "b")
    stray = submit(conn, "stray", "sell", 0)
    assert (stray["status"], stray["reason_code"]) == ("rejected", "STRATEGY_NOT_ASSIGNED")
    assert submit(conn, "a", "buy", 1)["reason_code"] == "CONSENSUS_NOT_REACHED"
    r = submit(conn, "b", "buy", 2)
    assert r["status"] == "approved", r


def test_an_unassigned_strategy_does_not_outrank(conn: psycopg.Connection) -> None:
    # 0004_13: a strategy of priority 100 elsewhere, not assigned here, outranked "lo"
    setup(conn, "priority")
    conn.execute("SELECT trading.create_account(name => 'other', environment => 'backtest',"
                 " mode => 'operator', cash => 10000)")
    conn.execute("SELECT trading.assign_strategy('other', 'big', priority => 100)")
    assign(conn, "lo", priority=1)
    assert submit(conn, "big", "sell", 0)["reason_code"] == "STRATEGY_NOT_ASSIGNED"
    r = submit(conn, "lo", "buy", 1)
    assert r["status"] == "approved", r


def test_consensus_votes_outside_the_window_do_not_count(conn: psycopg.Connection) -> None:
    setup(conn, "consensus")
    for s in ("a", "b", "c"):
        assign(conn, s)
    submit(conn, "a", "buy", 0)
    # a's buy is 61 minutes old: only b's own vote is in the window: 1 of 3
    r = submit(conn, "b", "buy", 61)
    assert r["reason_code"] == "CONSENSUS_NOT_REACHED"
    assert submit(conn, "c", "buy", 62)["status"] == "approved"  # b and c: 2 of 3


def test_consensus_latest_signal_of_a_strategy_is_its_vote(conn: psycopg.Connection) -> None:
    setup(conn, "consensus")
    for s in ("a", "b", "c"):
        assign(conn, s)
    submit(conn, "a", "buy", 0)
    submit(conn, "a", "sell", 1)  # a changed its mind
    r = submit(conn, "b", "buy", 2)
    assert r["reason_code"] == "CONSENSUS_NOT_REACHED"  # b alone buys: 1 of 3


def test_consensus_share_is_a_strict_threshold(conn: psycopg.Connection) -> None:
    setup(conn, "consensus")
    conn.execute("UPDATE trading.accounts SET consensus_share = 0.5")
    for s in ("a", "b", "c", "d"):
        assign(conn, s)
    submit(conn, "a", "buy", 0)
    r = submit(conn, "b", "buy", 1)
    assert r["reason_code"] == "CONSENSUS_NOT_REACHED"  # 2 of 4 = 0.5, not more than 0.5
    assert "agree=2" in r["reason"] and "of=4" in r["reason"]
    assert submit(conn, "c", "buy", 2)["status"] == "approved"  # 3 of 4


# ---------------------------------------------------------------------------- weighted
def test_weighted_score_just_under_and_just_over_the_threshold(
        conn: psycopg.Connection) -> None:
    setup(conn, "weighted")
    conn.execute("UPDATE trading.accounts SET weighted_threshold = 0.5")
    a = assign(conn, "a", weight="3")
    assign(conn, "b", weight="1")
    r1 = submit(conn, "b", "buy", 0, confidence=0.4)
    # only b: 1 * 0.4 / 1 = 0.4 <= 0.5
    assert (r1["status"], r1["reason_code"]) == ("ignored", "WEIGHTED_BELOW_THRESHOLD")
    assert "score=0.4" in r1["reason"]
    r2 = submit(conn, "a", "buy", 1, confidence=0.52)
    # (3 * 0.52 + 1 * 0.4) / (3 + 1) = (1.56 + 0.4) / 4 = 0.49 <= 0.5: just under
    assert r2["reason_code"] == "WEIGHTED_BELOW_THRESHOLD"
    assert "score=0.4900" in r2["reason"]
    assert orders(conn) == 0
    r3 = submit(conn, "a", "buy", 2, confidence=0.54)
    # a's latest vote: (3 * 0.54 + 0.4) / 4 = (1.62 + 0.4) / 4 = 0.505 > 0.5: just over
    assert r3["status"] == "approved", r3
    assert order(conn, r3["order_id"])[:3] == (a, "buy", Decimal("50"))


def test_weighted_opposite_votes_cancel(conn: psycopg.Connection) -> None:
    setup(conn, "weighted", allow_short=True)
    conn.execute("UPDATE trading.accounts SET weighted_threshold = 0.3")
    assign(conn, "a", weight="3")
    b = assign(conn, "b", weight="1")
    assign(conn, "c", weight="1")
    r1 = submit(conn, "a", "buy", 0)  # confidence defaults to 1: score 3 * 1 / 3 = 1
    assert r1["status"] == "approved"
    # b sells: (3 - 1) / 4 = 0.5: a buy-leaning score, a sell is refused
    r2 = submit(conn, "b", "sell", 1)
    assert r2["reason_code"] == "WEIGHTED_BELOW_THRESHOLD"
    # c sells too: (3 - 1 - 1) / 5 = 0.2: no side above 0.3
    r3 = submit(conn, "c", "sell", 2)
    assert r3["reason_code"] == "WEIGHTED_BELOW_THRESHOLD"
    assert "score=0.2000" in r3["reason"]
    # a turns to sell with confidence 0.5: (-1.5 - 1 - 1) / 5 = -0.7 < -0.3: it executes;
    # net +50 on order -> short target 10000 * 0.5 / 100 = 50: sell 100
    r4 = submit(conn, "a", "sell", 3, confidence=0.5)
    assert r4["status"] == "approved", r4
    assert order(conn, r4["order_id"])[1:3] == ("sell", Decimal("100"))
    # b's sell now passes the vote but the one net position is already at -50
    r5 = submit(conn, "b", "sell", 4)
    assert (r5["status"], r5["reason_code"]) == ("ignored", "ALREADY_AT_TARGET")
    # with a's vote leaning sell, b's buy is refused by the score
    r6 = submit(conn, "b", "buy", 5)
    assert r6["reason_code"] == "WEIGHTED_BELOW_THRESHOLD"
    assert orders(conn) == 2 and b > 0


@pytest.mark.parametrize("aggregation", ["priority", "consensus", "weighted"])
def test_aggregated_accounts_net_one_position(conn: psycopg.Connection, aggregation: str) -> None:
    setup(conn, aggregation)
    conn.execute("UPDATE trading.accounts SET consensus_share = 0, weighted_threshold = 0")
    assign(conn, "a")
    r = submit(conn, "a", "buy", 0)
    assert r["status"] == "approved", r
    fill(conn, r["order_id"], "50", "f1")
    rows = conn.execute("SELECT strategy_id, quantity, entry_strategy_id"
                        " FROM trading.positions").fetchall()
    a = scalar(conn, "SELECT strategy_id FROM trading.strategies WHERE name = 'a'")
    assert rows == [(None, Decimal("50"), a)]
