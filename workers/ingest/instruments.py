"""Instruments an import refers to: validated names, derived currencies, defaults.

The instrument is created on first import; an existing one with another market is
refused, because its bars would be read with the wrong calendar and sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

import psycopg

from db.errors import MmatsError

MARKETS = ("crypto", "forex", "stock")
TIMEFRAMES = ("1m", "5m", "15m", "1h", "4h", "1d", "1w")
DEFAULT_VENUE = {"crypto": "crypto", "forex": "fx", "stock": "us"}
CALENDAR = {"crypto": "CRYPTO_24X7", "forex": "FX_24X5", "stock": "XNYS"}
# (price_tick, quantity_step, min_quantity)
DEFAULT_SIZES = {
    "crypto": (Decimal("0.01"), Decimal("0.00001"), Decimal("0.00001")),
    "forex": (Decimal("0.00001"), Decimal("1"), Decimal("1")),
    "stock": (Decimal("0.01"), Decimal("1"), Decimal("1")),
}
# forex pairs quoted in yen move in 0.001
JPY_TICK = Decimal("0.001")
QUOTE_SUFFIXES = ("USDT", "USDC", "USD", "EUR", "BTC", "ETH")

_SYMBOL_RE = re.compile(r"[A-Z0-9][A-Z0-9._:/-]{0,39}")
_VENUE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")
_CCY_RE = re.compile(r"[A-Z0-9]{2,12}")
_BASE_RE = re.compile(r"[A-Z0-9]{1,12}")  # a stock's ticker may be one letter (F, T)


class InstrumentError(MmatsError):
    """A symbol, venue or market an import cannot use."""


@dataclass(frozen=True)
class InstrumentSpec:
    symbol: str
    venue: str
    market: str
    venue_given: bool
    price_tick: Decimal
    quantity_step: Decimal
    min_quantity: Decimal
    calendar_id: str


def shown(value: str, limit: int = 60) -> str:
    """A user-supplied string made safe for a one-line message."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


def check_market(market: str) -> str:
    if market not in MARKETS:
        raise InstrumentError(f"unknown market {shown(market)}: use one of {', '.join(MARKETS)}")
    return market


def check_timeframe(timeframe: str) -> str:
    if timeframe not in TIMEFRAMES:
        raise InstrumentError(
            f"unknown timeframe {shown(timeframe)}: use one of {', '.join(TIMEFRAMES)}")
    return timeframe


def normalise_symbol(symbol: str) -> str:
    sym = symbol.strip().upper()
    if not _SYMBOL_RE.fullmatch(sym):
        raise InstrumentError(
            f"invalid symbol {shown(symbol)}: 1-40 characters, letters, digits and . _ : / -, "
            "starting with a letter or digit")
    return sym


def normalise_venue(venue: str) -> str:
    v = venue.strip().lower()
    if not _VENUE_RE.fullmatch(v):
        raise InstrumentError(
            f"invalid venue {shown(venue)}: 1-32 characters, lower-case letters, digits "
            "and . _ -, starting with a letter or digit")
    return v


def currencies(symbol: str, market: str) -> tuple[str, str]:
    """(base, quote) derived from a symbol such as BTC/USDT, BTCUSDT, EUR_USD or AAPL."""
    parts = [p for p in re.split(r"[/_:-]", symbol) if p]
    if market == "stock":
        base, quote = re.sub(r"[^A-Z0-9]", "", symbol), "USD"
    elif len(parts) == 2:
        base, quote = parts
    elif market == "forex" and re.fullmatch(r"[A-Z]{6}", symbol):
        base, quote = symbol[:3], symbol[3:]
    elif market == "crypto" and len(parts) == 1:
        suffix = next((q for q in QUOTE_SUFFIXES
                       if symbol.endswith(q) and len(symbol) > len(q)), None)
        if suffix is None:
            raise InstrumentError(
                f"cannot tell base and quote currency of {shown(symbol)}: write it as "
                f"BASE/QUOTE (known quote suffixes: {', '.join(QUOTE_SUFFIXES)})")
        base, quote = symbol[: -len(suffix)], suffix
    else:
        raise InstrumentError(
            f"cannot tell base and quote currency of {shown(symbol)}: write it as BASE/QUOTE")
    for ccy, pattern, size in ((base, _BASE_RE, "1-12"), (quote, _CCY_RE, "2-12")):
        if not pattern.fullmatch(ccy):
            raise InstrumentError(
                f"symbol {shown(symbol)} gives currency {shown(ccy)}, which is not {size} "
                "letters or digits")
    return base, quote


REPLAY_VENUE = re.compile(r"replay[0-9]+")


def spec_for(symbol: str, market: str, venue: str | None = None) -> InstrumentSpec:
    market = check_market(market)
    sym = normalise_symbol(symbol)
    ven = normalise_venue(venue) if venue is not None else DEFAULT_VENUE[market]
    if REPLAY_VENUE.fullmatch(ven):
        # (its bars were hidden as a session's copies, skipped as a backtest's source, and
        # the next replay session numbered after it)
        raise InstrumentError(f"venue {ven!r} is the form of a paper replay session's copies "
                         "(replay<N>): choose another")
    tick, step, minimum = DEFAULT_SIZES[market]
    if market == "forex" and sym.replace("/", "").replace("_", "").endswith("JPY"):
        tick = JPY_TICK
    return InstrumentSpec(sym, ven, market, venue is not None, tick, step, minimum,
                          CALENDAR[market])


_FIND = ("SELECT instrument_id, market::text FROM market.instruments "
         "WHERE venue = %s AND symbol = %s")
_ELSEWHERE = ("SELECT venue, market::text FROM market.instruments "
              "WHERE symbol = %s AND market <> %s::market.market_type ORDER BY venue LIMIT 1")
_CREATE = """
INSERT INTO market.instruments (symbol, venue, market, base_currency, quote_currency,
                                price_tick, quantity_step, min_quantity, calendar_id)
VALUES (%s, %s, %s::market.market_type, %s, %s, %s, %s, %s, %s)
ON CONFLICT ON CONSTRAINT instruments_venue_symbol_unique DO NOTHING
"""


def ensure_instrument(conn: psycopg.Connection, spec: InstrumentSpec) -> tuple[int, bool]:
    """(instrument_id, created). Refuses an existing instrument of another market."""
    row = conn.execute(_FIND, (spec.venue, spec.symbol)).fetchone()
    created = False
    if row is None and not spec.venue_given:
        other = conn.execute(_ELSEWHERE, (spec.symbol, spec.market)).fetchone()
        if other:
            raise InstrumentError(
                f"{spec.symbol} is already stored as a {other[1]} instrument (venue "
                f"{other[0]}), not {spec.market}: use --market {other[1]}, or name a --venue "
                "to create a separate instrument")
    if row is None:
        base, quote = currencies(spec.symbol, spec.market)
        cur = conn.execute(_CREATE, (spec.symbol, spec.venue, spec.market, base, quote,
                                     spec.price_tick, spec.quantity_step, spec.min_quantity,
                                     spec.calendar_id))
        created = cur.rowcount == 1
        row = conn.execute(_FIND, (spec.venue, spec.symbol)).fetchone()
    assert row is not None
    if row[1] != spec.market:
        raise InstrumentError(
            f"instrument {spec.symbol} on venue {spec.venue} already exists as a {row[1]} "
            f"instrument, not {spec.market}: use --market {row[1]} or another --venue")
    return int(row[0]), created
