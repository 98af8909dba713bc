"""JSON and TOML written by a user (a --param, a secret on stdin, a limits or runtime
file), read so that anything wrong is a one-line ValueError, never a traceback: nesting
deep enough to exhaust the parser's recursion, integers longer than Python converts,
NaN and Infinity (no JSON the database reads), TOML dates and times (no JSON at all)."""

from __future__ import annotations

import datetime as dt
import json
import math
import tomllib
from typing import Any

MAX_DEPTH = 64  # far more than any limit's params or any configuration needs


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (give a finite number)")


def loads_json(text: str) -> Any:
    """`text` as JSON, strict: ValueError naming the problem (and where, for syntax)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, line {exc.lineno}, column {exc.colno})"
                         ) from None
    except RecursionError:
        raise ValueError(f"nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as exc:  # (an integer of more digits than Python converts, NaN)
        raise ValueError(str(exc).splitlines()[0]) from None
    check_depth(value)
    return value


def loads_toml(text: str) -> dict[str, Any]:
    """`text` as TOML: ValueError naming the problem."""
    try:
        value = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ValueError(f"nested too deeply (at most {MAX_DEPTH} levels)") from None
    check_depth(value)
    return value


def check_depth(value: Any, depth: int = 0) -> None:
    """ValueError when `value` nests lists and tables deeper than MAX_DEPTH."""
    if depth > MAX_DEPTH:
        raise ValueError(f"nested too deeply (at most {MAX_DEPTH} levels)")
    if isinstance(value, dict):
        for item in value.values():
            check_depth(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            check_depth(item, depth + 1)


def json_values(value: Any, where: str, *, nul: bool = True) -> None:
    """ValueError when `value` (read from TOML) holds what JSON cannot: a date or a time
    (TOML's unquoted 09:30:00 or 1979-05-27), or a float that is not finite; or a NUL
    character, which neither a path nor the database takes (unless not `nul`: a strategy's
    parameters may hold any text)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if nul and "\x00" in key:
                raise ValueError(f"{where}: a key contains a NUL character")
            json_values(item, f"{where}.{key}", nul=nul)
    elif isinstance(value, list):
        for n, item in enumerate(value, 1):
            json_values(item, f"{where}[{n}]", nul=nul)
    elif isinstance(value, dt.date | dt.time):  # (datetime is a date)
        raise ValueError(f"{where} is a TOML {type(value).__name__}, which is not stored: "
                         f'write it as text ("{value}")')
    elif nul and isinstance(value, str) and "\x00" in value:  # (no path or database text has one)
        raise ValueError(f"{where} contains a NUL character")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}")
