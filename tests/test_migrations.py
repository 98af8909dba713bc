"""The schema file and the migrations build the same database; upgrades are idempotent."""

from __future__ import annotations

import re
import subprocess

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from db import migrate
from db.runtime import pg_bin_dir

# data that migrations seed and that must match too (volatile columns left out)
SEEDED = {
    "market.calendars": "SELECT * FROM market.calendars ORDER BY 1",
    "trading.order_transitions": "SELECT * FROM trading.order_transitions ORDER BY 1, 2",
    "audit.chain_head": "SELECT * FROM audit.chain_head",
    "pgmq.meta": "SELECT queue_name, is_partitioned, is_unlogged FROM pgmq.meta ORDER BY 1",
    "alembic_version": "SELECT * FROM public.alembic_version",
}


def schema_dump(url: str) -> str:
    params = conninfo_to_dict(url)
    env = {"PGPASSWORD": str(params.get("password", "")), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [str(pg_bin_dir() / "pg_dump"), "--schema-only", "-h",
         str(params.get("host", "127.0.0.1")), "-p", str(params.get("port", 5432)), "-U",
         str(params.get("user", "postgres")), str(params["dbname"])],
        capture_output=True, text=True, env=env, check=True).stdout
    # pg_dump >= 17.6 brackets the dump with a random \restrict key; some server builds
    # stamp every column with a per-object pg_attver option
    return "\n".join(line for line in out.splitlines()
                     if not re.match(r"^\\(un)?restrict ", line)
                     and "SET (pg_attver=" not in line)


def seeded_rows(url: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(url) as conn:
        return {name: conn.execute(query).fetchall() for name, query in SEEDED.items()}


def test_schema_file_equals_replayed_migrations(db_url: str, empty_db_url: str) -> None:
    # db_url was built by replaying every migration (alembic); empty_db_url from schema.sql
    migrate.build_from_schema(empty_db_url)
    from_migrations, from_schema = schema_dump(db_url), schema_dump(empty_db_url)
    assert "CREATE TABLE market.bars" in from_migrations
    assert from_schema == from_migrations
    assert seeded_rows(empty_db_url) == seeded_rows(db_url)


def test_upgrade_twice_changes_nothing(empty_db_url: str) -> None:
    first = migrate.upgrade(empty_db_url)
    assert first.before is None
    assert first.applied == [p.name[:7] for p in migrate.migration_files()]
    dump = schema_dump(empty_db_url)
    second = migrate.upgrade(empty_db_url)
    assert second.applied == []
    assert second.after == first.after == migrate.head_revision()
    assert schema_dump(empty_db_url) == dump


def test_upgrade_on_schema_built_database_is_a_no_op(empty_db_url: str) -> None:
    migrate.build_from_schema(empty_db_url)
    assert migrate.upgrade(empty_db_url).applied == []


@pytest.mark.parametrize("path", migrate.migration_files(), ids=lambda p: p.name)
def test_migration_file_names_carry_order_and_phase(path) -> None:  # type: ignore[no-untyped-def]
    assert migrate.MIGRATION_NAME.match(path.name), (
        f"{path.name}: expected <version>_<nn>_<pre|post>_<description>.sql")
    revision_file = migrate.ALEMBIC_DIR / "versions" / (path.stem + ".py")
    assert revision_file.is_file(), f"no alembic revision runs {path.name}"
    assert f'run_migration_file("{path.name}")' in revision_file.read_text()


def test_every_alembic_revision_runs_a_migration_file() -> None:
    revisions = sorted(p.stem for p in (migrate.ALEMBIC_DIR / "versions").glob("*.py"))
    assert revisions == [p.stem for p in migrate.migration_files()]


def test_failed_migration_leaves_nothing_half_written(empty_db_url: str) -> None:
    # a migration that fails halfway is rolled back whole: the objects it created before
    # the failure do not exist and the version stays where it was
    migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        for schema in ("market", "trading", "risk", "audit"):
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {schema} AUTHORIZATION mmats_owner")
        conn.execute("UPDATE public.alembic_version SET version_num = '0001_02'")
    # 0001_03 creates types and the market, trading and risk tables, then fails on
    # ml.models, which still exists
    with pytest.raises(migrate.MigrationError, match="already exists"):
        migrate.upgrade(empty_db_url)
    with psycopg.connect(empty_db_url) as conn:
        assert conn.execute("SELECT version_num FROM public.alembic_version").fetchone() == (
            "0001_02",)
        assert conn.execute("SELECT to_regtype('trading.environment'), "
                            "to_regclass('market.instruments')").fetchone() == (None, None)
