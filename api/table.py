"""Aligned text tables for the terminal."""

from __future__ import annotations

from collections.abc import Sequence


def printable(value: object) -> str:
    """`value` as one line of text that is safe on a terminal: every control character
    (newlines, escape sequences, NUL) shown as its escape, e.g. \\n or \\x1b."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]],
          right: Sequence[int] = (), indent: str = "") -> str:
    """Rows as text with aligned columns (the columns in `right` aligned right)."""
    cells = [[printable(h) for h in headers]] + [
        ["" if v is None else printable(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append(indent + "  ".join(parts).rstrip())
        if n == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)
