"""Every guarantee the core tables keep by themselves: each refusal names its constraint,
carries its SQLSTATE and (where the schema documents it) a human sentence, and leaves
nothing written. Boundary values: just inside passes, just outside is refused."""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal as D

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from db.errors import describe

CHECK, UNIQUE, FK, NOT_NULL = (psycopg.errors.CheckViolation, psycopg.errors.UniqueViolation,
                               psycopg.errors.ForeignKeyViolation,
                               psycopg.errors.NotNullViolation)
SQLSTATE = {CHECK: "23514", UNIQUE: "23505", FK: "23503", NOT_NULL: "23502"}
_seq = itertools.count(1)
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def uniq(prefix: str = "X") -> str:
    return f"{prefix}{next(_seq)}{uuid.uuid4().hex[:6].upper()}"


@pytest.fixture(scope="module")
def c(mod_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(mod_url, autocommit=True) as conn:
        yield conn


def insert(conn: psycopg.Connection, table: str, values: dict[str, object]) -> tuple:
    if table == "risk.limits" and isinstance(values.get("limit_type"), str):
        # limit types are a catalogue (risk.limit_types); these tests invent their own
        conn.execute("INSERT INTO risk.limit_types VALUES (%s, 'fraction', 'test') "
                     "ON CONFLICT DO NOTHING", (values["limit_type"],))
    cols = list(values)
    q = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING *").format(
        sql.SQL(table), sql.SQL(", ").join(map(sql.Identifier, cols)),
        sql.SQL(", ").join(sql.Placeholder() * len(cols)))
    row = conn.execute(q, [values[k] for k in cols]).fetchone()
    assert row is not None
    return row


def count(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.SQL(table))).fetchone()
    assert row is not None
    return int(row[0])


def refuse(conn: psycopg.Connection, url: str, table: str, values: dict[str, object],
           constraint: str | None, exc_type: type[psycopg.Error] = CHECK,
           comment: str | None = None, watch: tuple[str, ...] = ()) -> psycopg.Error:
    """The insert is refused by `constraint`, with its SQLSTATE, and nothing is written."""
    before = {t: count(conn, t) for t in (table, *watch)}
    with pytest.raises(exc_type) as info:
        insert(conn, table, values)
    err = info.value
    # on TimescaleDB the row lands in a chunk, whose copy of a constraint is "<n>_<name>"
    assert re.sub(r"^\d+_", "", err.diag.constraint_name or "") == (constraint or "")
    if exc_type in SQLSTATE:
        assert err.diag.sqlstate == SQLSTATE[exc_type]
    assert err.diag.message_primary
    text = describe(err, url)
    if comment:
        assert f"({comment})" in text
    assert f"[SQLSTATE {err.diag.sqlstate}]" in text
    assert {t: count(conn, t) for t in before} == before
    return err


# ------------------------------------------------------------------ row builders
def instrument_row(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "symbol": uniq("S"), "venue": "testvenue", "market": "crypto",
        "base_currency": "BTC", "quote_currency": "USDT", "price_tick": D("0.01"),
        "quantity_step": D("0.001"), "calendar_id": "CRYPTO_24X7"}
    row.update(kw)
    return row


def account_row(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {"name": uniq("acct"), "environment": "paper",
                              "base_currency": "USD", "starting_cash": D(1000), "cash": D(1000)}
    row.update(kw)
    return row


@pytest.fixture(scope="module")
def refs(c: psycopg.Connection) -> dict[str, int]:
    return {
        "instrument": insert(c, "market.instruments", instrument_row())[0],
        "account": insert(c, "trading.accounts", account_row())[0],
        "account2": insert(c, "trading.accounts", account_row())[0],
        "strategy": insert(c, "trading.strategies", {"name": "sc_strategy"})[0],
    }


def strategy_row(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {"name": uniq("strat")}
    row.update(kw)
    return row


def signal_row(refs: dict[str, int], **kw: object) -> dict[str, object]:
    row: dict[str, object] = {"account_id": refs["account"], "strategy_id": refs["strategy"],
                              "instrument_id": refs["instrument"], "ts": "2026-01-01Z",
                              "action": "buy"}
    row.update(kw)
    return row


def order_row(refs: dict[str, int], **kw: object) -> dict[str, object]:
    row: dict[str, object] = {"account_id": refs["account"], "instrument_id": refs["instrument"],
                              "client_order_id": uniq("co-"), "side": "buy",
                              "order_type": "market", "quantity": D(10)}
    row.update(kw)
    return row


def fill_row(c: psycopg.Connection, refs: dict[str, int], **kw: object) -> dict[str, object]:
    account = kw.get("account_id", refs["account"])
    order = insert(c, "trading.orders", order_row(refs, account_id=account))[0]
    row: dict[str, object] = {"account_id": account, "order_id": order,
                              "instrument_id": refs["instrument"], "broker_fill_id": uniq("F"),
                              "side": "buy", "quantity": D(1), "price": D(100),
                              "ts": "2026-01-01Z"}
    row.update(kw)
    return row


def position_row(refs: dict[str, int], **kw: object) -> dict[str, object]:
    account = insert(refs["_conn"], "trading.accounts", account_row())[0]  # type: ignore[arg-type]
    row: dict[str, object] = {"account_id": account, "instrument_id": refs["instrument"],
                              "quantity": D(1), "average_price": D(100)}
    row.update(kw)
    return row


def equity_row(refs: dict[str, int], **kw: object) -> dict[str, object]:
    row: dict[str, object] = {"account_id": refs["account"],
                              "ts": T0 + timedelta(seconds=next(_seq)),
                              "cash": D(60), "positions_value": D(40), "equity": D(100),
                              "peak_equity": D(120), "drawdown": D("0.1")}
    row.update(kw)
    return row


def limit_row(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {"scope": "global", "limit_type": uniq("MAX_"), "value": D("0.1")}
    row.update(kw)
    return row


@pytest.fixture
def r(c: psycopg.Connection, refs: dict[str, int]) -> dict[str, int]:
    return {**refs, "_conn": c}  # type: ignore[dict-item]


# ================================================================== market.instruments
HOSTILE = ["'; DROP TABLE x; --", "a b", "A B", "", " BTC", "BTC ", "BTC\n", "BTC\t",
           "ÄBC", "ＢＴＣ", "BTC€", "😀", "BTC;", "BTC'", 'BTC"', "BTC%", "BTC*", "BTC\\"]


@pytest.mark.parametrize("symbol", [*HOSTILE, "btc", "-BTC", ".BTC", "/BTC", "A" * 41,
                                    "BTC/usdt"])
def test_instrument_symbol_refused(c: psycopg.Connection, mod_url: str, symbol: str) -> None:
    refuse(c, mod_url, "market.instruments", instrument_row(symbol=symbol),
           "instruments_symbol_format",
           comment="a symbol is 1-40 characters: upper-case letters, digits and . _ : / -, "
                   "starting with a letter or digit")


@pytest.mark.parametrize("symbol", ["A", "7", "A" * 40, "BTC/USDT", "ES.F:CME-1_2", "0X-Y"])
def test_instrument_symbol_accepted(c: psycopg.Connection, symbol: str) -> None:
    row = insert(c, "market.instruments", instrument_row(symbol=symbol, venue=uniq("v").lower()))
    assert row[1] == symbol


@pytest.mark.parametrize("venue", [*HOSTILE, "Binance", "_x", "-x", "a" * 33, "bïnance",
                                   "a/b", "a:b"])
def test_instrument_venue_refused(c: psycopg.Connection, mod_url: str, venue: str) -> None:
    refuse(c, mod_url, "market.instruments", instrument_row(venue=venue),
           "instruments_venue_format",
           comment="a venue is 1-32 characters: lower-case letters, digits and . _ -")


@pytest.mark.parametrize("venue", ["a", "9", "a" * 32, "binance.us", "x-y_z"])
def test_instrument_venue_accepted(c: psycopg.Connection, venue: str) -> None:
    assert insert(c, "market.instruments", instrument_row(venue=venue))[2] == venue


@pytest.mark.parametrize("column", ["base_currency", "quote_currency"])
@pytest.mark.parametrize("value", [*HOSTILE, "usd", "A" * 13, "US-D", "US.D", "€UR"])
def test_instrument_currency_refused(c: psycopg.Connection, mod_url: str, column: str,
                                     value: str) -> None:
    refuse(c, mod_url, "market.instruments", instrument_row(**{column: value}),
           f"instruments_{column}_format")


def test_one_letter_base_accepted_but_not_quote(c: psycopg.Connection, mod_url: str) -> None:
    # Ford's ticker is F; no currency is one letter
    assert insert(c, "market.instruments", instrument_row(base_currency="F"))[4] == "F"
    refuse(c, mod_url, "market.instruments", instrument_row(quote_currency="U"),
           "instruments_quote_currency_format")


@pytest.mark.parametrize("value", ["US", "A" * 12, "USDT", "1INCH"])
def test_instrument_currency_accepted(c: psycopg.Connection, value: str) -> None:
    row = insert(c, "market.instruments", instrument_row(base_currency=value,
                                                         quote_currency=value))
    assert (row[4], row[5]) == (value, value)


@pytest.mark.parametrize("column,constraint", [
    ("price_tick", "instruments_price_tick_positive"),
    ("quantity_step", "instruments_quantity_step_positive"),
])
@pytest.mark.parametrize("value", ["0", "-0.00000001", "-1", "NaN", "Infinity", "-Infinity"])
def test_instrument_tick_step_refused(c: psycopg.Connection, mod_url: str, column: str,
                                      constraint: str, value: str) -> None:
    refuse(c, mod_url, "market.instruments", instrument_row(**{column: D(value)}), constraint)


@pytest.mark.parametrize("value", ["-0.00000001", "NaN", "Infinity"])
def test_instrument_min_quantity_refused(c: psycopg.Connection, mod_url: str,
                                         value: str) -> None:
    refuse(c, mod_url, "market.instruments", instrument_row(min_quantity=D(value)),
           "instruments_min_quantity_nonnegative")


def test_instrument_tick_step_boundaries(c: psycopg.Connection) -> None:
    row = insert(c, "market.instruments", instrument_row(
        price_tick=D("0.00000001"), quantity_step=D("1E-18"), min_quantity=D(0)))
    assert row[7] == D("0.00000001") and row[8] == D("1E-18")


@pytest.mark.parametrize("contract", ["linear", "inverse"])
def test_stock_must_be_spot(c: psycopg.Connection, mod_url: str, contract: str) -> None:
    refuse(c, mod_url, "market.instruments",
           instrument_row(market="stock", contract_type=contract, calendar_id="XNYS"),
           "instruments_stock_is_spot")
    # a crypto perpetual may be linear; a stock may be spot
    insert(c, "market.instruments", instrument_row(contract_type=contract))
    insert(c, "market.instruments", instrument_row(market="stock", calendar_id="XNYS"))


def test_instrument_venue_symbol_unique(c: psycopg.Connection, mod_url: str) -> None:
    symbol = uniq("DUP")
    insert(c, "market.instruments", instrument_row(symbol=symbol, venue="venue-a"))
    insert(c, "market.instruments", instrument_row(symbol=symbol, venue="venue-b"))
    refuse(c, mod_url, "market.instruments", instrument_row(symbol=symbol, venue="venue-a"),
           "instruments_venue_symbol_unique", UNIQUE,
           comment="an instrument with this symbol already exists on this venue")


def test_instrument_calendar_must_exist(c: psycopg.Connection, mod_url: str) -> None:
    refuse(c, mod_url, "market.instruments", instrument_row(calendar_id="NOPE"),
           "instruments_calendar_id_fkey", FK)


def test_instrument_market_enum(c: psycopg.Connection) -> None:
    before = count(c, "market.instruments")
    with pytest.raises(psycopg.errors.InvalidTextRepresentation,
                       match=r'invalid input value for enum market\.market_type: "bonds"'):
        insert(c, "market.instruments", instrument_row(market="bonds"))
    assert count(c, "market.instruments") == before


# ================================================================== market.bars
def bar(refs: dict[str, int], **kw: object) -> dict[str, object]:
    row: dict[str, object] = {"instrument_id": refs["instrument"], "timeframe": "1m",
                              "ts": T0 + timedelta(minutes=next(_seq)), "open": D(10),
                              "high": D(12), "low": D(9), "close": D(11), "volume": D(5)}
    row.update(kw)
    return row


BARS = "market.bars"


def test_bar_valid_and_boundaries(c: psycopg.Connection, r: dict[str, int]) -> None:
    # low == min(open, close), high == max(open, close), volume 0: just inside
    insert(c, BARS, bar(r, open=D(10), close=D(11), low=D(10), high=D(11), volume=D(0)))
    insert(c, BARS, bar(r, open=D(11), close=D(10), low=D(10), high=D(11)))
    insert(c, BARS, bar(r, open=D(5), close=D(5), low=D(5), high=D(5)))
    insert(c, BARS, bar(r, open=D("1E-12"), close=D("1E-12"), low=D("1E-12"), high=D("1E-12")))


@pytest.mark.parametrize("values", [
    {"open": D(0), "low": D(0)}, {"close": D(0), "low": D(0)}, {"low": D(0)},
    {"open": D(0), "high": D(0), "low": D(0), "close": D(0)},
    {"low": D("-0.0001")}, {"open": D(-1), "low": D(-1)},
])
def test_bar_prices_positive(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                             values: dict[str, D]) -> None:
    refuse(c, mod_url, BARS, bar(r, **values), "bars_prices_positive",
           comment="open, high, low and close must be > 0")


@pytest.mark.parametrize("values", [
    {"open": D(10), "close": D(11), "low": D("10.0000001")},
    {"open": D(11), "close": D(10), "low": D("10.0000001")},
    {"open": D(10), "close": D(10), "low": D(11), "high": D(12)},
])
def test_bar_low_above_open_or_close(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                     values: dict[str, D]) -> None:
    refuse(c, mod_url, BARS, bar(r, **values), "bars_low_le_open_close",
           comment="low must be <= open and <= close")


@pytest.mark.parametrize("values", [
    {"open": D(10), "close": D(11), "high": D("10.9999999")},
    {"open": D(11), "close": D(10), "high": D("10.9999999")},
    {"open": D(12), "close": D(12), "high": D(11), "low": D(9)},
])
def test_bar_high_below_open_or_close(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                      values: dict[str, D]) -> None:
    refuse(c, mod_url, BARS, bar(r, **values), "bars_high_ge_open_close",
           comment="high must be >= open and >= close")


@pytest.mark.parametrize("volume", [D("-0.00000001"), D(-1)])
def test_bar_volume_nonnegative(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                volume: D) -> None:
    refuse(c, mod_url, BARS, bar(r, volume=volume), "bars_volume_nonnegative",
           comment="volume must be >= 0")


# NaN sorts above every number in PostgreSQL: which check sees it first depends on the
# column (checks run in name order), but every one of them is refused.
@pytest.mark.parametrize("column,constraint", [
    ("open", "bars_high_ge_open_close"), ("high", "bars_no_nan"),
    ("low", "bars_low_le_open_close"), ("close", "bars_high_ge_open_close"),
    ("volume", "bars_no_nan"),
])
def test_bar_nan_refused(c: psycopg.Connection, mod_url: str, r: dict[str, int], column: str,
                         constraint: str) -> None:
    refuse(c, mod_url, BARS, bar(r, **{column: D("NaN")}), constraint)


def test_bar_all_nan_refused(c: psycopg.Connection, mod_url: str, r: dict[str, int]) -> None:
    nan = D("NaN")
    refuse(c, mod_url, BARS, bar(r, open=nan, high=nan, low=nan, close=nan, volume=nan),
           "bars_no_nan", comment="prices and volume must be finite numbers, not NaN or Infinity")


@pytest.mark.parametrize("values", [
    {"high": D("Infinity")}, {"volume": D("Infinity")},
    {"open": D("Infinity"), "high": D("Infinity"), "close": D("Infinity")},
])
def test_bar_infinity_refused(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                              values: dict[str, D]) -> None:
    refuse(c, mod_url, BARS, bar(r, **values), "bars_no_nan",
           comment="prices and volume must be finite numbers, not NaN or Infinity")


def test_bar_unique_per_instrument_timeframe_ts(c: psycopg.Connection, mod_url: str,
                                                r: dict[str, int]) -> None:
    first = bar(r)
    insert(c, BARS, first)
    insert(c, BARS, {**first, "timeframe": "5m"})  # another timeframe: another bar
    other = insert(c, "market.instruments", instrument_row())[0]
    insert(c, BARS, {**first, "instrument_id": other})
    refuse(c, mod_url, BARS, {**first, "close": D("11.5")}, "bars_pkey", UNIQUE,
           comment="a bar for this instrument, timeframe and time already exists")


@pytest.mark.parametrize("timeframe", ["2m", "1M", "1H", "", "1m; DROP TABLE x"])
def test_bar_unknown_timeframe(c: psycopg.Connection, r: dict[str, int], timeframe: str) -> None:
    before = count(c, BARS)
    with pytest.raises(psycopg.errors.InvalidTextRepresentation) as info:
        insert(c, BARS, bar(r, timeframe=timeframe))
    assert info.value.diag.sqlstate == "22P02"
    assert "invalid input value for enum market.timeframe" in str(info.value)
    assert count(c, BARS) == before


def test_bar_instrument_must_exist(c: psycopg.Connection, mod_url: str,
                                   r: dict[str, int]) -> None:
    refuse(c, mod_url, BARS, bar(r, instrument_id=999_999_999), "bars_instrument_id_fkey", FK)


@pytest.mark.parametrize("column", ["open", "high", "low", "close", "ts"])
def test_bar_not_null(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                      column: str) -> None:
    refuse(c, mod_url, BARS, bar(r, **{column: None}), None, NOT_NULL)


# ================================================================== trading.accounts
ACCOUNTS = "trading.accounts"


@pytest.mark.parametrize("name", ["", "a b", "'; DROP TABLE x; --", "_x", "-x", ".x",
                                  "a" * 65, "naïve", "acct/1", "acct\n"])
def test_account_name_refused(c: psycopg.Connection, mod_url: str, name: str) -> None:
    refuse(c, mod_url, ACCOUNTS, account_row(name=name), "accounts_name_format",
           comment="an account name is 1-64 characters: letters, digits and _ . -")


@pytest.mark.parametrize("name", ["a", "Z" * 64, "paper_1.main-x", "9lives"])
def test_account_name_accepted(c: psycopg.Connection, name: str) -> None:
    assert insert(c, ACCOUNTS, account_row(name=name))[1] == name


def test_account_name_unique(c: psycopg.Connection, mod_url: str) -> None:
    name = uniq("dup")
    insert(c, ACCOUNTS, account_row(name=name))
    refuse(c, mod_url, ACCOUNTS, account_row(name=name), "accounts_name_unique", UNIQUE,
           comment="an account with this name already exists")


@pytest.mark.parametrize("currency", ["usd", "U", "A" * 13, "US D", "'; DROP TABLE x; --"])
def test_account_currency_refused(c: psycopg.Connection, mod_url: str, currency: str) -> None:
    refuse(c, mod_url, ACCOUNTS, account_row(base_currency=currency), "accounts_currency_format")


@pytest.mark.parametrize("value", ["-0.01", "NaN", "Infinity"])
def test_account_starting_cash_refused(c: psycopg.Connection, mod_url: str, value: str) -> None:
    refuse(c, mod_url, ACCOUNTS, account_row(starting_cash=D(value)),
           "accounts_starting_cash_nonnegative")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_account_cash_must_be_a_number(c: psycopg.Connection, mod_url: str, value: str) -> None:
    refuse(c, mod_url, ACCOUNTS, account_row(cash=D(value)), "accounts_cash_is_number")


def test_account_cash_boundaries(c: psycopg.Connection) -> None:
    # zero starting cash is allowed; cash may go negative (fees, margin)
    row = insert(c, ACCOUNTS, account_row(starting_cash=D(0), cash=D("-12.5")))
    assert row[6] == D("-12.5")


# ================================================================== trading.strategies
STRATEGIES = "trading.strategies"


@pytest.mark.parametrize("name", ["", "1abc", "_abc", "a b", "a" * 65, "'; DROP TABLE x; --",
                                  "stratégie"])
def test_strategy_name_refused(c: psycopg.Connection, mod_url: str, name: str) -> None:
    refuse(c, mod_url, STRATEGIES, strategy_row(name=name), "strategies_name_format")


@pytest.mark.parametrize("version", ["", "-1", "1 0", "v" * 33])
def test_strategy_version_refused(c: psycopg.Connection, mod_url: str, version: str) -> None:
    refuse(c, mod_url, STRATEGIES, strategy_row(version=version), "strategies_version_format")


@pytest.mark.parametrize("parameters", ["[]", "1", '"x"', "null", "true"])
def test_strategy_parameters_object(c: psycopg.Connection, mod_url: str,
                                    parameters: str) -> None:
    refuse(c, mod_url, STRATEGIES, strategy_row(parameters=parameters),
           "strategies_parameters_object")


@pytest.mark.parametrize("column,value,constraint", [
    ("weight", D("-0.0001"), "strategies_weight_range"),
    ("weight", D("1000.0001"), "strategies_weight_range"),
    ("weight", D("NaN"), "strategies_weight_range"),
    ("priority", -1001, "strategies_priority_check"),
    ("priority", 1001, "strategies_priority_check"),
])
def test_strategy_range_refused(c: psycopg.Connection, mod_url: str, column: str,
                                value: object, constraint: str) -> None:
    refuse(c, mod_url, STRATEGIES, strategy_row(**{column: value}), constraint)


def test_strategy_boundaries_and_unique(c: psycopg.Connection, mod_url: str) -> None:
    name = "a" + "b" * 63
    insert(c, STRATEGIES, strategy_row(name=name, version="1.0+build-7", weight=D(0),
                                       priority=-1000, parameters='{"n": 1}'))
    insert(c, STRATEGIES, strategy_row(name=name, version="2", weight=D(1000), priority=1000))
    refuse(c, mod_url, STRATEGIES, strategy_row(name=name, version="2"),
           "strategies_name_version_unique", UNIQUE)


# ================================================================== trading.signals
SIGNALS = "trading.signals"


@pytest.mark.parametrize("column", ["size", "confidence"])
@pytest.mark.parametrize("value", ["-0.0000001", "1.0000001", "NaN", "Infinity", "2"])
def test_signal_fraction_refused(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                 column: str, value: str) -> None:
    refuse(c, mod_url, SIGNALS, signal_row(r, **{column: D(value)}),
           f"signals_{column}_fraction")


@pytest.mark.parametrize("value", [D(0), D(1), D("0.5"), None])
def test_signal_fraction_accepted(c: psycopg.Connection, r: dict[str, int], value: D) -> None:
    insert(c, SIGNALS, signal_row(r, size=value, confidence=value))


@pytest.mark.parametrize("column", ["stop_loss", "take_profit", "trailing_stop"])
@pytest.mark.parametrize("value", ["0", "-0.00000001", "NaN", "Infinity"])
def test_signal_price_positive_refused(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                       column: str, value: str) -> None:
    refuse(c, mod_url, SIGNALS, signal_row(r, **{column: D(value)}),
           f"signals_{column}_positive")


def test_signal_prices_just_above_zero(c: psycopg.Connection, r: dict[str, int]) -> None:
    tiny = D("0.00000001")
    insert(c, SIGNALS, signal_row(r, stop_loss=tiny, take_profit=tiny, trailing_stop=tiny))


def test_signal_reasoning_length(c: psycopg.Connection, mod_url: str, r: dict[str, int]) -> None:
    insert(c, SIGNALS, signal_row(r, reasoning="x" * 4000))
    insert(c, SIGNALS, signal_row(r, reasoning="é" * 4000))  # characters, not bytes
    refuse(c, mod_url, SIGNALS, signal_row(r, reasoning="x" * 4001), "signals_reasoning_length")


@pytest.mark.parametrize("metadata", ["[]", '"x"', "1", "null", "[{}]"])
def test_signal_metadata_object(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                metadata: str) -> None:
    refuse(c, mod_url, SIGNALS, signal_row(r, metadata=metadata), "signals_metadata_object")


@pytest.mark.parametrize("code", ["max_position", "1ABC", "_ABC", "A B", "A" * 65, "",
                                  "MAX-POSITION", "'; DROP TABLE x; --"])
def test_signal_reason_code_refused(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                    code: str) -> None:
    refuse(c, mod_url, SIGNALS, signal_row(r, reason_code=code), "signals_reason_code_format")


@pytest.mark.parametrize("code", ["MAX_POSITION_SIZE", "A", "A" * 64, "DAILY_LOSS_2"])
def test_signal_reason_code_accepted(c: psycopg.Connection, r: dict[str, int],
                                     code: str) -> None:
    insert(c, SIGNALS, signal_row(r, reason_code=code, metadata='{"k": [1, 2]}'))


def test_signal_references_must_exist(c: psycopg.Connection, mod_url: str,
                                      r: dict[str, int]) -> None:
    refuse(c, mod_url, SIGNALS, signal_row(r, strategy_id=999_999), "signals_strategy_id_fkey", FK)
    refuse(c, mod_url, SIGNALS, signal_row(r, account_id=999_999), "signals_account_id_fkey", FK)


# ================================================================== trading.orders
ORDERS = "trading.orders"
LIMIT_MSG = ("limit and stop_limit orders need a limit price; market and stop orders must not "
             "have one")
STOP_MSG = ("stop and stop_limit orders need a stop price; market and limit orders must not "
            "have one")


@pytest.mark.parametrize("kw,constraint,comment", [
    ({"order_type": "market", "limit_price": D(1)}, "orders_limit_price_required", LIMIT_MSG),
    ({"order_type": "limit"}, "orders_limit_price_required", LIMIT_MSG),
    ({"order_type": "stop_limit", "stop_price": D(1)}, "orders_limit_price_required", LIMIT_MSG),
    ({"order_type": "stop", "stop_price": D(1), "limit_price": D(1)},
     "orders_limit_price_required", LIMIT_MSG),
    ({"order_type": "stop"}, "orders_stop_price_required", STOP_MSG),
    ({"order_type": "stop_limit", "limit_price": D(1)}, "orders_stop_price_required", STOP_MSG),
    ({"order_type": "market", "stop_price": D(1)}, "orders_stop_price_required", STOP_MSG),
    ({"order_type": "limit", "limit_price": D(1), "stop_price": D(1)},
     "orders_stop_price_required", STOP_MSG),
])
def test_order_prices_by_type(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                              kw: dict[str, object], constraint: str, comment: str) -> None:
    refuse(c, mod_url, ORDERS, order_row(r, **kw), constraint, comment=comment)


@pytest.mark.parametrize("kw", [
    {"order_type": "market"},
    {"order_type": "limit", "limit_price": D("0.00000001")},
    {"order_type": "stop", "stop_price": D(1)},
    {"order_type": "stop_limit", "limit_price": D(1), "stop_price": D(2)},
])
def test_order_prices_by_type_accepted(c: psycopg.Connection, r: dict[str, int],
                                       kw: dict[str, object]) -> None:
    insert(c, ORDERS, order_row(r, **kw))


GTD_MSG = "a GTD order needs expire_at, and only a GTD order may have one"


@pytest.mark.parametrize("kw", [
    {"time_in_force": "GTD"},
    {"time_in_force": "GTC", "expire_at": "2030-01-01Z"},
    {"time_in_force": "IOC", "expire_at": "2030-01-01Z"},
])
def test_order_gtd_needs_expiry(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                kw: dict[str, object]) -> None:
    refuse(c, mod_url, ORDERS, order_row(r, **kw), "orders_gtd_needs_expiry", comment=GTD_MSG)


def test_order_gtd_with_expiry_accepted(c: psycopg.Connection, r: dict[str, int]) -> None:
    insert(c, ORDERS, order_row(r, time_in_force="GTD", expire_at="2030-01-01Z"))


FILLED_MSG = "the filled quantity must be between 0 and the order quantity"


@pytest.mark.parametrize("filled", [D("10.0000001"), D("-0.0000001"), D("NaN")])
def test_order_filled_within_quantity(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                      filled: D) -> None:
    refuse(c, mod_url, ORDERS, order_row(r, quantity=D(10), filled_quantity=filled),
           "orders_filled_within_quantity", comment=FILLED_MSG)


def test_order_filled_within_quantity_on_update(c: psycopg.Connection, mod_url: str,
                                                r: dict[str, int]) -> None:
    order_id = insert(c, ORDERS, order_row(r, quantity=D(10), filled_quantity=D(10)))[0]
    c.execute("UPDATE trading.orders SET status = 'submitted' WHERE order_id = %s", (order_id,))
    with pytest.raises(CHECK) as info:
        c.execute("UPDATE trading.orders SET status = 'partially_filled', "
                  "filled_quantity = 10.5 WHERE order_id = %s", (order_id,))
    assert info.value.diag.constraint_name == "orders_filled_within_quantity"
    assert f"({FILLED_MSG})" in describe(info.value, mod_url)
    assert c.execute("SELECT status::text, filled_quantity FROM trading.orders "
                     "WHERE order_id = %s", (order_id,)).fetchone() == ("submitted", D(10))


@pytest.mark.parametrize("column,value,constraint", [
    ("quantity", D(0), "orders_quantity_positive"),
    ("quantity", D("NaN"), "orders_quantity_positive"),
    ("quantity", D("Infinity"), "orders_quantity_positive"),
    ("broker_order_id", "", "orders_broker_order_id_length"),
    ("broker_order_id", "b" * 129, "orders_broker_order_id_length"),
    ("reason_code", "lower", "orders_reason_code_format"),
])
def test_order_column_refused(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                              column: str, value: object, constraint: str) -> None:
    refuse(c, mod_url, ORDERS, order_row(r, **{column: value}), constraint)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "0"])
def test_order_limit_price_positive(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                    value: str) -> None:
    refuse(c, mod_url, ORDERS, order_row(r, order_type="limit", limit_price=D(value)),
           "orders_limit_price_positive")


@pytest.mark.parametrize("coid", ["", "-abc", "_abc", "a b", "'; DROP TABLE x; --", "a" * 65,
                                  "ordér", "a.b", "a/b", "abc\n"])
def test_order_client_order_id_format(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                      coid: str) -> None:
    refuse(c, mod_url, ORDERS, order_row(r, client_order_id=coid),
           "orders_client_order_id_format")


def test_order_client_order_id_boundaries_and_unique(c: psycopg.Connection, mod_url: str,
                                                     r: dict[str, int]) -> None:
    coid = "Z" + uuid.uuid4().hex + "x" * 31  # 64 characters
    assert len(coid) == 64
    insert(c, ORDERS, order_row(r, client_order_id=coid))
    # unique across accounts, not only within one
    refuse(c, mod_url, ORDERS, order_row(r, client_order_id=coid, account_id=r["account2"]),
           "orders_client_order_id_unique", UNIQUE,
           comment="an order with this client order id already exists")


def test_order_broker_order_id_unique_per_account(c: psycopg.Connection, mod_url: str,
                                                  r: dict[str, int]) -> None:
    broker_id = uniq("B")
    insert(c, ORDERS, order_row(r, broker_order_id=broker_id))
    insert(c, ORDERS, order_row(r, broker_order_id=broker_id, account_id=r["account2"]))
    refuse(c, mod_url, ORDERS, order_row(r, broker_order_id=broker_id),
           "orders_broker_order_id_unique", UNIQUE)


# ================================================================== trading.fills
FILLS = "trading.fills"


def test_fill_broker_id_unique_per_account(c: psycopg.Connection, mod_url: str,
                                           r: dict[str, int]) -> None:
    broker_id = uniq("fill-")
    insert(c, FILLS, fill_row(c, r, broker_fill_id=broker_id))
    # the same broker fill id on another account is another fill
    insert(c, FILLS, fill_row(c, r, broker_fill_id=broker_id, account_id=r["account2"]))
    refuse(c, mod_url, FILLS, fill_row(c, r, broker_fill_id=broker_id),
           "fills_broker_fill_id_unique", UNIQUE,
           comment="this broker fill id was already recorded for this account")


@pytest.mark.parametrize("column,value,constraint", [
    ("quantity", D(0), "fills_quantity_positive"),
    ("quantity", D("NaN"), "fills_quantity_positive"),
    ("quantity", D("Infinity"), "fills_quantity_positive"),
    ("price", D(0), "fills_price_positive"),
    ("price", D("-0.01"), "fills_price_positive"),
    ("price", D("NaN"), "fills_price_positive"),
    ("price", D("Infinity"), "fills_price_positive"),
    ("commission", D("-0.00000001"), "fills_commission_nonnegative"),
    ("commission", D("NaN"), "fills_commission_nonnegative"),
    ("broker_fill_id", "", "fills_broker_fill_id_length"),
    ("broker_fill_id", "f" * 129, "fills_broker_fill_id_length"),
    ("liquidity", "both", "fills_liquidity_check"),
    ("commission_currency", "usd", "fills_commission_currency_check"),
])
def test_fill_column_refused(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                             column: str, value: object, constraint: str) -> None:
    row = fill_row(c, r, **{column: value})
    refuse(c, mod_url, FILLS, row, constraint)


def test_fill_boundaries(c: psycopg.Connection, r: dict[str, int]) -> None:
    insert(c, FILLS, fill_row(c, r, broker_fill_id="f" * 128, commission=D(0),
                              quantity=D("1E-18"), price=D("1E-12"), liquidity="maker",
                              commission_currency="BNB"))


def test_fill_order_must_exist(c: psycopg.Connection, mod_url: str, r: dict[str, int]) -> None:
    refuse(c, mod_url, FILLS, fill_row(c, r, order_id=999_999_999), "fills_order_id_fkey", FK)


# ================================================================== trading.positions
POSITIONS = "trading.positions"


@pytest.mark.parametrize("with_strategy", [False, True])
def test_position_unique_nulls_not_distinct(c: psycopg.Connection, mod_url: str,
                                            r: dict[str, int], with_strategy: bool) -> None:
    row = position_row(r, strategy_id=r["strategy"] if with_strategy else None)
    insert(c, POSITIONS, row)
    refuse(c, mod_url, POSITIONS, row, "positions_unique", UNIQUE)
    # another leg, or (for the netted row) a strategy's own row, is another position
    insert(c, POSITIONS, {**row, "leg": "long"})
    if not with_strategy:
        insert(c, POSITIONS, {**row, "strategy_id": r["strategy"]})


@pytest.mark.parametrize("leg", ["long", "short"])
def test_position_leg_sign(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                           leg: str) -> None:
    refuse(c, mod_url, POSITIONS, position_row(r, leg=leg, quantity=D("-0.00000001")),
           "positions_leg_sign")
    insert(c, POSITIONS, position_row(r, leg=leg, quantity=D(0), average_price=None))


def test_position_net_leg_may_be_short(c: psycopg.Connection, r: dict[str, int]) -> None:
    row = insert(c, POSITIONS, position_row(r, leg="net", quantity=D(-3)))
    assert row[5] == D(-3)


def test_position_open_needs_price(c: psycopg.Connection, mod_url: str,
                                   r: dict[str, int]) -> None:
    refuse(c, mod_url, POSITIONS, position_row(r, quantity=D(1), average_price=None),
           "positions_open_has_price")


@pytest.mark.parametrize("column,value,constraint", [
    ("quantity", D("NaN"), "positions_quantity_is_number"),
    ("quantity", D("Infinity"), "positions_quantity_is_number"),
    ("average_price", D(0), "positions_average_price_positive"),
    ("average_price", D("NaN"), "positions_average_price_positive"),
])
def test_position_numbers(c: psycopg.Connection, mod_url: str, r: dict[str, int], column: str,
                          value: D, constraint: str) -> None:
    refuse(c, mod_url, POSITIONS, position_row(r, **{column: value}), constraint)


# ================================================================== trading.equity_snapshots
EQUITY = "trading.equity_snapshots"


@pytest.mark.parametrize("kw", [
    {"equity": D("100.00000001")}, {"equity": D("99.99999999")},
    {"cash": D("NaN"), "positions_value": D(0), "equity": D("NaN")},
    {"cash": D("Infinity"), "positions_value": D(0), "equity": D("Infinity")},
])
def test_equity_is_cash_plus_positions(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                       kw: dict[str, D]) -> None:
    refuse(c, mod_url, EQUITY, equity_row(r, **kw), "equity_snapshots_sum")


@pytest.mark.parametrize("drawdown", [D("-0.00000001"), D("1.00000001"), D("NaN")])
def test_equity_drawdown_fraction(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                  drawdown: D) -> None:
    refuse(c, mod_url, EQUITY, equity_row(r, drawdown=drawdown),
           "equity_snapshots_drawdown_fraction")


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_equity_peak_is_a_number(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                 value: str) -> None:
    refuse(c, mod_url, EQUITY, equity_row(r, peak_equity=D(value)),
           "equity_snapshots_peak_is_number")


def test_equity_boundaries_and_unique(c: psycopg.Connection, mod_url: str,
                                      r: dict[str, int]) -> None:
    row = equity_row(r, drawdown=D(0))
    insert(c, EQUITY, row)
    insert(c, EQUITY, equity_row(r, drawdown=D(1), cash=D(-40), positions_value=D(40),
                                 equity=D(0)))
    refuse(c, mod_url, EQUITY, row, "equity_snapshots_pkey", UNIQUE)


# ================================================================== risk.limits
LIMITS = "risk.limits"
SCOPE_MSG = "a global limit has no scope key; market, strategy and symbol limits need one"


@pytest.mark.parametrize("scope,key", [("global", "crypto"), ("market", None),
                                       ("strategy", None), ("symbol", None)])
def test_limit_scope_key_required_iff_not_global(c: psycopg.Connection, mod_url: str,
                                                 scope: str, key: str | None) -> None:
    refuse(c, mod_url, LIMITS, limit_row(scope=scope, scope_key=key),
           "limits_scope_key_required", comment=SCOPE_MSG, watch=("risk.limit_history",))


@pytest.mark.parametrize("scope,key", [("global", None), ("market", "crypto"),
                                       ("strategy", "sma_cross"), ("symbol", "BTC/USDT")])
def test_limit_scope_key_accepted(c: psycopg.Connection, scope: str, key: str | None) -> None:
    insert(c, LIMITS, limit_row(scope=scope, scope_key=key))


@pytest.mark.parametrize("column,value,constraint", [
    ("scope_key", "", "limits_scope_key_length"),
    ("scope_key", "k" * 65, "limits_scope_key_length"),
    ("limit_type", "max_position", "limits_type_format"),
    ("limit_type", "'; DROP TABLE x; --", "limits_type_format"),
    ("value", D("NaN"), "limits_value_is_number"),
    ("value", D("Infinity"), "limits_value_is_number"),
    ("params", "[]", "limits_params_check"),
])
def test_limit_column_refused(c: psycopg.Connection, mod_url: str, column: str, value: object,
                              constraint: str) -> None:
    kw: dict[str, object] = {column: value}
    if column == "scope_key":
        kw["scope"] = "market"
    refuse(c, mod_url, LIMITS, limit_row(**kw), constraint, watch=("risk.limit_history",))


@pytest.mark.parametrize("account", [False, True])
def test_limit_unique_including_nulls(c: psycopg.Connection, mod_url: str, r: dict[str, int],
                                      account: bool) -> None:
    limit_type = uniq("MAX_")
    base = limit_row(limit_type=limit_type, account_id=r["account"] if account else None)
    insert(c, LIMITS, base)
    refuse(c, mod_url, LIMITS, {**base, "value": D("0.2")}, "limits_unique", UNIQUE,
           watch=("risk.limit_history",))
    # a different environment or scope key is a different limit (an account's limit may
    # name only the account's own environment: the fixture's account is a paper one)
    insert(c, LIMITS, {**base, "environment": "paper" if account else "live"})
    insert(c, LIMITS, {**base, "scope": "market", "scope_key": "crypto"})
    refuse(c, mod_url, LIMITS, {**base, "scope": "market", "scope_key": "crypto"},
           "limits_unique", UNIQUE)


def history(c: psycopg.Connection, limit_id: int) -> list[tuple]:
    return c.execute("SELECT operation, old_row, new_row, changed_by FROM risk.limit_history "
                     "WHERE limit_id = %s ORDER BY history_id", (limit_id,)).fetchall()


def test_limit_history_records_every_change(c: psycopg.Connection) -> None:
    user = c.execute("SELECT session_user").fetchone()[0]  # type: ignore[index]
    row = insert(c, LIMITS, limit_row(scope="symbol", scope_key="BTC/USDT", value=D("0.1")))
    limit_id = row[0]
    c.execute("UPDATE risk.limits SET value = 0.25 WHERE limit_id = %s", (limit_id,))
    c.execute("DELETE FROM risk.limits WHERE limit_id = %s", (limit_id,))
    h = history(c, limit_id)
    assert [e[0] for e in h] == ["INSERT", "UPDATE", "DELETE"]
    ins, upd, dele = h
    assert ins[1] is None and ins[2]["value"] == 0.1 and ins[2]["scope_key"] == "BTC/USDT"
    assert upd[1]["value"] == 0.1 and upd[2]["value"] == 0.25
    assert upd[1]["limit_id"] == upd[2]["limit_id"] == limit_id
    assert dele[1]["value"] == 0.25 and dele[2] is None
    assert all(e[3] == user for e in h)


def test_limit_history_records_who_under_set_role(c: psycopg.Connection) -> None:
    user = c.execute("SELECT session_user").fetchone()[0]  # type: ignore[index]
    limit_id = insert(c, LIMITS, limit_row())[0]
    c.execute("SET ROLE mmats_owner")
    try:
        c.execute("UPDATE risk.limits SET enabled = false WHERE limit_id = %s", (limit_id,))
    finally:
        c.execute("RESET ROLE")
    # session_user: the login that made the change, even through SET ROLE or a
    # SECURITY DEFINER function
    assert history(c, limit_id)[-1][0] == "UPDATE"
    assert history(c, limit_id)[-1][3] == user


def test_limit_history_not_written_for_refused_update(c: psycopg.Connection) -> None:
    limit_id = insert(c, LIMITS, limit_row())[0]
    before = history(c, limit_id)
    with pytest.raises(CHECK):
        c.execute("UPDATE risk.limits SET scope = 'market' WHERE limit_id = %s", (limit_id,))
    assert history(c, limit_id) == before


# ================================================================== properties
_prices = st.decimals(min_value=D("-1"), max_value=D("1000"), places=4, allow_nan=False,
                      allow_infinity=False) | st.sampled_from([D("NaN"), D("Infinity"), D(0)])


@settings(max_examples=150, deadline=None)
@given(o=_prices, h=_prices, lo=_prices, cl=_prices, v=_prices)
def test_bar_verdict_matches_the_rules(c: psycopg.Connection, refs: dict[str, int], o: D, h: D,
                                       lo: D, cl: D, v: D) -> None:
    values = (o, h, lo, cl, v)
    finite = all(x.is_finite() for x in values)
    valid = (finite and min(o, h, lo, cl) > 0 and v >= 0 and lo <= min(o, cl)
             and h >= max(o, cl))
    row = bar(refs, open=o, high=h, low=lo, close=cl, volume=v)
    before = count(c, BARS)
    try:
        insert(c, BARS, row)
        accepted = True
    except psycopg.errors.CheckViolation as exc:
        assert (exc.diag.constraint_name or "").startswith("bars_")
        accepted = False
    assert accepted == valid, row
    assert count(c, BARS) == before + (1 if accepted else 0)


_SYMBOL = re.compile(r"[A-Z0-9][A-Z0-9._:/-]{0,39}")


@settings(max_examples=150, deadline=None)
@given(symbol=st.text(alphabet=st.sampled_from("AZ09az._:/- '\n;é") | st.characters(
    blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=45))
def test_symbol_verdict_matches_the_pattern(c: psycopg.Connection, symbol: str) -> None:
    try:
        insert(c, "market.instruments", instrument_row(symbol=symbol, venue=uniq("p").lower()))
        accepted = True
    except psycopg.errors.CheckViolation as exc:
        assert exc.diag.constraint_name == "instruments_symbol_format"
        accepted = False
    assert accepted == bool(_SYMBOL.fullmatch(symbol)), repr(symbol)
