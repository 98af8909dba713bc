"""Plain aligned tables for the terminal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import click


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def echo_table(headers: Sequence[str], rows: Iterable[Sequence[object]], indent: str = "") -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for line in [list(headers), *cells]:
        click.echo(indent + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
