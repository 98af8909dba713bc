"""Exact numbers at the boundary: floats from indicator math become Decimals here."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

Number = Decimal | int | float | str


def to_decimal(value: Number, field: str) -> Decimal:
    """`value` as a finite Decimal; floats go through their shortest repr (0.1 -> 0.1)."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | float | str):
        raise TypeError(f"{field} must be a number, got {type(value).__name__} {value!r}")
    try:
        result = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{field} must be a number, got {value!r}") from None
    if not result.is_finite():
        raise ValueError(f"{field} must be a finite number, got {value!r}")
    return result
