"""Database errors, translated at one boundary into one clear line.

A refused write keeps its SQLSTATE and constraint name. Where the schema documents a
constraint (COMMENT ON CONSTRAINT), that human sentence is what the user reads. On
TimescaleDB a row lands in a chunk of a hypertable; the message then names the hypertable
(market.bars), not the chunk, and the chunk's copy of a constraint (``1_bars_pkey``) is
explained by the hypertable's.
"""

from __future__ import annotations

import re

import psycopg

_COMMENT_SQL = """
SELECT d.description
FROM pg_constraint c JOIN pg_description d ON d.objoid = c.oid
WHERE c.conname = %s AND (%s::text IS NULL OR c.conrelid = to_regclass(%s))
LIMIT 1
"""
_HYPERTABLE_OF_CHUNK = """
SELECT h.schema_name || '.' || h.table_name
FROM _timescaledb_catalog.chunk c JOIN _timescaledb_catalog.hypertable h ON h.id = c.hypertable_id
WHERE c.schema_name = %s AND c.table_name = %s
"""
_CHUNK_CONSTRAINT = re.compile(r"^\d+_")


class MmatsError(Exception):
    """An error the user can act on; its message is one line."""


def _lookup(url: str, query: str, params: tuple[object, ...]) -> str | None:
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute(query, params).fetchone()
            return str(row[0]) if row else None
    except psycopg.Error:
        return None


def constraint_comment(url: str, constraint: str, table: str | None) -> str | None:
    return _lookup(url, _COMMENT_SQL, (constraint, table, table))


def describe(exc: psycopg.Error, url: str | None = None) -> str:
    """One line: what was refused, where, why, and the SQLSTATE."""
    diag = exc.diag
    # the primary message whole: a value it quotes may hold a newline (shown escaped by
    # whoever prints it); str(exc) goes on with DETAIL and HINT lines, hence its first line
    primary = diag.message_primary or (str(exc).splitlines()[0] if str(exc)
                                       else type(exc).__name__)
    table = f"{diag.schema_name}.{diag.table_name}" if diag.table_name else None
    constraint = diag.constraint_name
    if url and diag.schema_name == "_timescaledb_internal" and diag.table_name:
        hypertable = _lookup(url, _HYPERTABLE_OF_CHUNK, (diag.schema_name, diag.table_name))
        if hypertable:
            primary = primary.replace(f'"{diag.table_name}"', f'"{hypertable}"')
            table = hypertable
            if constraint:
                constraint = _CHUNK_CONSTRAINT.sub("", constraint)
    parts = [primary]
    if constraint and url:
        comment = constraint_comment(url, constraint, table)
        if comment:
            parts.append(f"({comment})")
    if diag.message_hint:
        parts.append(f"hint: {diag.message_hint}")
    if diag.sqlstate:
        parts.append(f"[SQLSTATE {diag.sqlstate}]")
    return " ".join(parts)
