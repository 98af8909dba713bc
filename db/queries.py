"""Named queries from db/sql/queries.sql (``-- name: <name>`` blocks)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import LiteralString, cast

QUERIES_FILE = Path(__file__).parent / "sql" / "queries.sql"
_NAME = re.compile(r"^-- name: ([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@cache
def _load() -> dict[str, str]:
    text = QUERIES_FILE.read_text()
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{QUERIES_FILE}: query {name!r} is defined twice")
        queries[name] = body.strip()
    return queries


def query(name: str) -> LiteralString:
    try:
        return cast(LiteralString, _load()[name])
    except KeyError:
        raise KeyError(f"no query named {name!r} in {QUERIES_FILE}") from None
