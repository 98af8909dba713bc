"""Pins for fixes in the trading core found after the first test pass: bulk imports judge
bar protection once over all their bars; lookups by name or number survive generic plans;
protection on the wrong side is refused; hedge manual orders name their leg; an unsent
order can expire."""

from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path

import psycopg
import pytest
from assigned import ensure_assigned
from psycopg.types.json import Jsonb
from test_protection import T0, M, add_account, add_instrument, bar, exits, fill, open_position

from workers.ingest.importer import import_file


@pytest.fixture
def paper(conn: psycopg.Connection) -> tuple[int, int]:
    return add_account(conn, "P"), add_instrument(conn)


def test_bulk_import_through_a_stop_creates_one_closing_order(conn, paper, tmp_path: Path):
    # a paper position with a stop at 95; a file of bars whose third bar dips to 94
    _, inst = paper
    open_position(conn, "P", "BTCUSD", stop_loss=95)
    bar(conn, inst, T0, 100, 101, 99, 100)
    csv = tmp_path / "bars.csv"
    csv.write_text("timestamp,open,high,low,close,volume\n" + "".join(
        f"{(T0 + i * M).isoformat()},{o},{h},{lo},{c},1\n" for i, (o, h, lo, c) in
        enumerate([(100, 101, 99, 100), (100, 100, 97, 98), (98, 98, 94, 95),
                   (95, 96, 90, 91)], start=1)))
    report = import_file(conn, csv, symbol="BTCUSD", market="crypto", timeframe="1m",
                         venue="test")
    assert report.inserted == 4
    # replayed in time order: the stop fires on the third bar, at the stop, exactly once
    assert exits(conn) == [("sell", D(10), True, "stop_loss", D(95), "market")]
    marked = conn.execute("SELECT last_price, marked_at FROM trading.positions "
                          "WHERE quantity <> 0").fetchone()
    assert marked == (D(91), T0 + 5 * M)


def test_bulk_import_with_nobody_holding_replays_nothing(conn, paper, tmp_path: Path):
    _, inst = paper
    csv = tmp_path / "bars.csv"
    csv.write_text("timestamp,open,high,low,close,volume\n"
                   f"{T0.isoformat()},100,101,99,100,1\n")
    import_file(conn, csv, symbol="BTCUSD", market="crypto", timeframe="1m", venue="test")
    assert conn.execute("SELECT count(*) FROM market.bars WHERE instrument_id = %s",
                        (inst,)).fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM trading.equity_snapshots").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM trading.orders").fetchone() == (0,)


def test_lookups_by_name_and_number_under_generic_plans(conn, paper):
    acc, _ = paper
    conn.execute("SET plan_cache_mode = force_generic_plan")
    oid = open_position(conn, "P", "BTCUSD")
    assert conn.execute("SELECT (trading._account(%s)).name", (str(acc),)).fetchone() == ("P",)
    assert conn.execute("SELECT (trading._account('P')).account_id").fetchone() == (acc,)
    client = conn.execute("SELECT client_order_id FROM trading.orders WHERE order_id = %s",
                          (oid,)).fetchone()[0]
    # the order by its number and by its client order id; both answer "duplicate"
    for ref in (str(oid), client):
        key = "order_id" if ref.isdigit() else "client_order_id"
        r = conn.execute("SELECT trading.apply_fill(%s)", (Jsonb({
            key: ref, "broker_fill_id": f"f-{oid}", "quantity": "10", "price": "100"}),)
        ).fetchone()[0]
        assert r["status"] == "duplicate"
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="unknown account 'nobody'"):
        conn.execute("SELECT trading._account('nobody')")


def test_a_new_fill_never_reads_the_account_s_earlier_fills(conn, paper):
    """A plan made while trading.fills was empty (generic plans from the first call, as a
    long-lived router caches them) must not read every earlier fill of the account to
    tell a new fill from a repeat (migration 0004_05)."""
    conn.execute("SET plan_cache_mode = force_generic_plan")

    def index_reads() -> tuple[int, int]:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return conn.execute(
            "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes"
            " WHERE indexrelname = 'fills_account_fill_idx'").fetchone()

    before = index_reads()
    for k in range(15):  # 30 fills on one account: 15 round trips
        oid = open_position(conn, "P", "BTCUSD", strategy=f"s{k}")
        close = conn.execute("SELECT trading.submit_signal(%s)", (Jsonb({
            "account": "P", "strategy": f"s{k}", "symbol": "BTCUSD", "action": "close",
            "price": 100}),)).fetchone()[0]
        assert fill(conn, close["order_id"], f"x-{oid}", 10, 100)["status"] == "applied"
    assert conn.execute("SELECT count(*) FROM trading.fills").fetchone() == (30,)
    assert index_reads() == before
    # and a repeat is still found and changes nothing
    assert fill(conn, oid, f"f-{oid}", 10, 100)["status"] == "duplicate"
    assert conn.execute("SELECT count(*) FROM trading.fills").fetchone() == (30,)


@pytest.mark.parametrize("action,protection", [
    ("buy", {"stop_loss": 105}), ("buy", {"take_profit": 95}),
    ("sell", {"stop_loss": 95}), ("sell", {"take_profit": 105})])
def test_protection_on_the_wrong_side_is_refused(conn, action, protection):
    add_account(conn, "S", allow_short=True)
    add_instrument(conn)
    ensure_assigned(conn, {"account": "S", "strategy": "s"})
    r = conn.execute("SELECT trading.submit_signal(%s)", (Jsonb({
        "account": "S", "strategy": "s", "symbol": "BTCUSD", "action": action, "price": 100,
        "size": "0.1", **protection}),)).fetchone()[0]
    assert (r["status"], r["reason_code"]) == ("rejected", "INVALID_PROTECTION")
    assert r["reason"].startswith("INVALID_PROTECTION: side=")
    assert conn.execute("SELECT count(*) FROM trading.orders").fetchone() == (0,)


def test_hedge_manual_orders_name_their_leg(conn):
    conn.execute("SELECT trading.create_account('H', 'paper', 'operator', 100000, "
                 "position_mode => 'hedge', allow_short => true)")
    inst = add_instrument(conn)
    bar(conn, inst, T0, 100, 100, 100, 100)

    def manual(side: str, **extra: object) -> int:
        r = conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb({
            "account": "H", "symbol": "BTCUSD", "side": side, "quantity": "5", **extra}),)
        ).fetchone()[0]
        assert r["status"] == "approved", r
        return int(r["order_id"])

    long_entry = manual("buy")
    fill(conn, long_entry, "l1", 5, 100)
    legs = conn.execute("SELECT order_id, position_leg::text, reduce_only FROM trading.orders "
                        "ORDER BY order_id").fetchall()
    assert legs == [(long_entry, "long", False)]
    # with the long leg open, close_position sends one exit for it, none twice
    first = conn.execute("SELECT trading.close_position('H', 'BTCUSD')").fetchone()[0]
    again = conn.execute("SELECT trading.close_position('H', 'BTCUSD')").fetchone()[0]
    assert len(first["order_ids"]) == 1 and again["order_ids"] == []


def test_an_unsent_order_can_expire(conn, paper):
    _, inst = paper
    bar(conn, inst, T0, 100, 100, 100, 100)
    r = conn.execute("SELECT trading.place_manual_order(%s)", (Jsonb({
        "account": "P", "symbol": "BTCUSD", "side": "buy", "quantity": "1", "type": "limit",
        "limit_price": "90", "time_in_force": "GTD",
        "expire_at": (T0 + M).isoformat()}),)).fetchone()[0]
    assert conn.execute("SELECT trading.expire_order(%s)", (str(r["order_id"]),)
                        ).fetchone()[0]["status"] == "expired"
    assert conn.execute("SELECT status::text FROM trading.orders").fetchone() == ("expired",)


def test_correlation_cache_follows_new_bars(conn):
    # two instruments whose returns move together over 4 bars, then one diverges
    a, b = add_instrument(conn, "AAAUSD"), add_instrument(conn, "BBBUSD")
    for i, (pa, pb) in enumerate([(100, 50), (101, 51), (103, 52), (102, 51)]):
        bar(conn, a, T0 + i * M, pa, pa, pa, pa)
        bar(conn, b, T0 + i * M, pb, pb, pb, pb)
    corr = "SELECT risk.return_correlation(%s, %s, '1m', 3, NULL)"
    first = conn.execute(corr, (a, b)).fetchone()[0]
    assert first > D("0.9")
    # answered from the cache while no new bar arrives (same value, one cache row)
    assert conn.execute(corr, (b, a)).fetchone()[0] == first
    assert conn.execute("SELECT count(*), min(b_ts) FROM risk.correlation_cache"
                        ).fetchone() == (1, T0 + 3 * M)
    # a new bar on either side invalidates it
    bar(conn, a, T0 + 4 * M, 110, 110, 110, 110)
    bar(conn, b, T0 + 4 * M, 45, 45, 45, 45)
    second = conn.execute(corr, (a, b)).fetchone()[0]
    assert second < first
    assert conn.execute("SELECT a_ts, b_ts, value FROM risk.correlation_cache").fetchone() == (
        T0 + 4 * M, T0 + 4 * M, second)
