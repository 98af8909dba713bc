"""Numbers given as text (on the command line, in a limits file): the bounds the trading
core keeps on money, prices and quantities, checked before anything is written."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MAX_NUMBER = Decimal("1e18")  # the trading core's bound on money and quantities
MAX_NUMBER_LENGTH = 64
MAX_DECIMAL_PLACES = 18  # finer than any venue's step (ETH's wei is 1e-18)
# a number as written in ASCII (and NaN or Infinity, to be refused as not finite)
_WRITTEN = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_NAMED = re.compile(r"[+-]?(nan|snan|inf|infinity)", re.IGNORECASE)


def _shown(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_number(text: str, what: str, error: type[Exception] = ValueError) -> Decimal:
    """A finite number below 10^18 in size, with at most 18 decimal places, written in at
    most MAX_NUMBER_LENGTH characters; else `error` with one line naming `what`."""
    if len(text.strip()) > MAX_NUMBER_LENGTH:
        raise error(f"{what} {_shown(text)} is too long ({len(text):,} characters; a number "
                    f"has at most {MAX_NUMBER_LENGTH})")
    try:
        if not _WRITTEN.fullmatch(text.strip()) and not _NAMED.fullmatch(text.strip()):
            raise InvalidOperation  # (Decimal also reads "1_000" and Arabic-Indic digits)
        value = Decimal(text.strip())
    except InvalidOperation:
        raise error(f"{what} must be a number, got {_shown(text)}") from None
    if not value.is_finite():
        raise error(f"{what} must be a finite number, got {_shown(text)}")
    if abs(value) >= MAX_NUMBER:
        raise error(f"{what} {_shown(text)} is out of range: it must be less than 10^18 in size")
    exponent = value.normalize().as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_DECIMAL_PLACES:
        raise error(f"{what} {_shown(text)} has more than {MAX_DECIMAL_PLACES} decimal places")
    return value
