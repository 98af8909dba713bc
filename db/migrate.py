"""Build the database: alembic revisions that each run one named ``.sql`` file.

``db/sql/migrations/`` holds the immutable, ordered migrations
(``<version>_<nn>_<pre|post>_<description>.sql``); ``db/sql/schema.sql`` is the
current state. ``tests/test_migrations.py`` proves that the two build the same database.

A line ``-- mmats:include-pgmq`` in a SQL file stands for the pgmq SQL bundled with
the pinned ``pgmq`` package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

SQL_DIR = Path(__file__).parent / "sql"
MIGRATIONS_DIR = SQL_DIR / "migrations"
SCHEMA_FILE = SQL_DIR / "schema.sql"
ALEMBIC_DIR = Path(__file__).parent / "alembic"
MIGRATION_NAME = re.compile(
    r"^(?P<version>\d{4})_(?P<nn>\d{2})_(?P<phase>pre|post)_[a-z0-9_]+\.sql$")
PGMQ_DIRECTIVE = "-- mmats:include-pgmq"
# serialises concurrent `mmats db upgrade` runs against one database
MIGRATION_LOCK_KEY = 0x4D4D415453  # "MMATS"


class MigrationError(RuntimeError):
    """A migration failed; the transaction that ran it was rolled back."""


def migration_files() -> list[Path]:
    return sorted(MIGRATIONS_DIR.glob("*.sql"))


def expand_sql(text: str) -> str:
    if PGMQ_DIRECTIVE not in text:
        return text
    from pgmq.install import get_embedded_install_sql

    return text.replace(PGMQ_DIRECTIVE, get_embedded_install_sql())


def run_migration_file(name: str) -> None:
    """Called from an alembic revision: run one migration file on alembic's connection."""
    from alembic import op

    dbapi = op.get_bind().connection.dbapi_connection
    assert isinstance(dbapi, psycopg.Connection)
    with dbapi.cursor() as cur:
        # no parameters: psycopg sends the file as is, several statements at once
        cur.execute(expand_sql((MIGRATIONS_DIR / name).read_text()).encode())
        # files SET LOCAL ROLE mmats_owner; alembic then writes its version table
        cur.execute("RESET ROLE")


def _alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(ALEMBIC_DIR))
    cfg.attributes["url"] = url
    return cfg


def sqlalchemy_url(url: str) -> str:
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)


@dataclass(frozen=True)
class UpgradeResult:
    before: str | None
    after: str
    applied: list[str]


def current_revision(url: str) -> str | None:
    with psycopg.connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('public.alembic_version')").fetchone()
        if not exists or exists[0] is None:
            return None
        row = conn.execute("SELECT version_num FROM public.alembic_version").fetchone()
        return row[0] if row else None


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config("")).get_current_head()
    assert head is not None
    return head


def upgrade(url: str) -> UpgradeResult:
    """Apply every pending migration, each in its own transaction. Idempotent."""
    from alembic import command
    from alembic.script import ScriptDirectory

    before = current_revision(url)
    cfg = _alembic_config(url)
    try:
        command.upgrade(cfg, "head")
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise MigrationError(f"migration failed: {str(cause).splitlines()[0]}") from exc
    after = current_revision(url)
    assert after is not None
    script = ScriptDirectory.from_config(cfg)
    applied = [rev.revision for rev in script.iterate_revisions(after, before)]
    return UpgradeResult(before, after, list(reversed(applied)))


def build_from_schema(url: str) -> None:
    """Build a database from schema.sql alone and stamp it at the head revision."""
    with psycopg.connect(url) as conn:
        conn.execute(expand_sql(SCHEMA_FILE.read_text()).encode())
        conn.execute("RESET ROLE")
        conn.execute("CREATE TABLE public.alembic_version (version_num varchar(32) NOT NULL "
                     "CONSTRAINT alembic_version_pkc PRIMARY KEY)")
        conn.execute("INSERT INTO public.alembic_version VALUES (%s)", (head_revision(),))
