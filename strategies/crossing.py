"""Crossing tests between two series of a MarketData (indicator keys or price columns)."""

from __future__ import annotations

import math

from strategies.market import MarketData


def _pair(md: MarketData, key: str, bars_ago: int) -> float:
    return md.previous(key, bars_ago) if bars_ago else md[key]


def _level(md: MarketData, key: str | float, bars_ago: int) -> float:
    return float(key) if not isinstance(key, str) else _pair(md, key, bars_ago)


def crossed_above(md: MarketData, a: str, b: str | float) -> bool:
    """True on the bar where `a` goes from <= `b` (previous bar) to > `b` (this bar)."""
    now_a, now_b = _pair(md, a, 0), _level(md, b, 0)
    was_a, was_b = _pair(md, a, 1), _level(md, b, 1)
    if any(math.isnan(v) for v in (now_a, now_b, was_a, was_b)):
        return False
    return was_a <= was_b and now_a > now_b


def crossed_below(md: MarketData, a: str, b: str | float) -> bool:
    """True on the bar where `a` goes from >= `b` (previous bar) to < `b` (this bar)."""
    now_a, now_b = _pair(md, a, 0), _level(md, b, 0)
    was_a, was_b = _pair(md, a, 1), _level(md, b, 1)
    if any(math.isnan(v) for v in (now_a, now_b, was_a, was_b)):
        return False
    return was_a >= was_b and now_a < now_b
