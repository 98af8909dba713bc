"""Database errors, translated at one boundary into one clear line.

A refused write keeps its SQLSTATE and constraint name. Where the schema documents a
constraint (COMMENT ON CONSTRAINT), that human sentence is what the user reads.
"""

from __future__ import annotations

import psycopg

_COMMENT_SQL = """
SELECT d.description
FROM pg_constraint c JOIN pg_description d ON d.objoid = c.oid
WHERE c.conname = %s AND (%s::text IS NULL OR c.conrelid = to_regclass(%s))
LIMIT 1
"""


class MmatsError(Exception):
    """An error the user can act on; its message is one line."""


def constraint_comment(url: str, constraint: str, table: str | None) -> str | None:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute(_COMMENT_SQL, (constraint, table, table)).fetchone()
            return str(row[0]) if row else None
    except psycopg.Error:
        return None


def describe(exc: psycopg.Error, url: str | None = None) -> str:
    """One line: what was refused, where, why, and the SQLSTATE."""
    diag = exc.diag
    primary = (diag.message_primary or str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
    parts = [primary]
    table = f"{diag.schema_name}.{diag.table_name}" if diag.table_name else None
    if diag.constraint_name and url:
        comment = constraint_comment(url, diag.constraint_name, table)
        if comment:
            parts.append(f"({comment})")
    if diag.message_hint:
        parts.append(f"hint: {diag.message_hint}")
    if diag.sqlstate:
        parts.append(f"[SQLSTATE {diag.sqlstate}]")
    return " ".join(parts)
