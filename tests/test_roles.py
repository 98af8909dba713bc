"""Roles and privileges: nobody but mmats_owner writes a table directly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

from db import migrate

ROLES = ["mmats_owner", "mmats_strategy", "mmats_router", "mmats_api", "mmats_readonly"]
APP_SCHEMAS = ["market", "trading", "risk", "ml", "audit"]
OWNED_SCHEMAS = [*APP_SCHEMAS, "pgmq"]


@pytest.fixture(scope="module")
def mconn(mod_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(mod_url, autocommit=True) as c:
        # one row in the tables the write attempts aim at, so UPDATE/DELETE have a target
        c.execute("INSERT INTO trading.accounts (name, environment, base_currency, "
                  "starting_cash, cash) VALUES ('roles', 'paper', 'USD', 1, 1)")
        c.execute("INSERT INTO market.instruments (symbol, venue, market, base_currency, "
                  "quote_currency, price_tick, quantity_step, calendar_id) VALUES "
                  "('BTC/USDT', 'binance', 'crypto', 'BTC', 'USDT', 0.01, 0.001, 'CRYPTO_24X7')")
        c.execute("INSERT INTO market.bars SELECT instrument_id, '1m', '2026-01-01Z', 1, 2, 1, "
                  "1, 5 FROM market.instruments")
        c.execute("SELECT audit.record('roles.setup', 'test', NULL, '{}')")
        yield c


@contextmanager
def as_role(conn: psycopg.Connection, role: str) -> Iterator[psycopg.Connection]:
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
    try:
        yield conn
    finally:
        conn.execute("RESET ROLE")
    row = conn.execute("SELECT current_user").fetchone()
    assert row is not None and row[0] == conn.info.user


def tables(conn: psycopg.Connection, schemas: list[str], kinds: str = "rp") -> list[str]:
    rows = conn.execute(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = ANY(%s) AND c.relkind = ANY(%s) AND NOT c.relispartition "
        "ORDER BY 1", (schemas, list(kinds))).fetchall()
    return [r[0] for r in rows]


def first_column(conn: psycopg.Connection, table: str) -> str:
    row = conn.execute("SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = "
                       "%s::regclass AND attnum > 0 AND NOT attisdropped AND attidentity = '' "
                       "AND attgenerated = '' ORDER BY attnum "
                       "LIMIT 1", (table,)).fetchone()
    assert row is not None
    return str(row[0])


def write_statements(conn: psycopg.Connection, table: str) -> list[str]:
    col = first_column(conn, table)
    return [f"INSERT INTO {table} DEFAULT VALUES",
            f"UPDATE {table} SET {col} = {col}",
            f"DELETE FROM {table}",
            f"TRUNCATE {table}"]


def refused(conn: psycopg.Connection, statement: str, *params: object) -> bool:
    try:
        conn.execute(statement, params or None)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def count_rows(conn: psycopg.Connection) -> dict[str, int]:
    counts = {}
    for t in tables(conn, APP_SCHEMAS):
        row = conn.execute(f"SELECT count(*) FROM {t}").fetchone()
        assert row is not None
        counts[t] = int(row[0])
    return counts


# ------------------------------------------------------------------ the roles
def test_roles_exist_with_safe_attributes(mconn: psycopg.Connection) -> None:
    rows = mconn.execute(
        "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolcanlogin, "
        "rolpassword IS NULL FROM pg_authid WHERE rolname = ANY(%s) ORDER BY rolname",
        (ROLES,)).fetchall()
    assert sorted(r[0] for r in rows) == sorted(ROLES)
    for name, superuser, createrole, createdb, bypassrls, login, no_password in rows:
        assert not (superuser or createrole or createdb or bypassrls), name
        assert login, name  # LOGIN, but no password: nobody signs in until one is set
        assert no_password, name


def test_only_owner_may_create_in_app_schemas(mconn: psycopg.Connection) -> None:
    for schema in [*OWNED_SCHEMAS, "public"]:
        for role in ROLES[1:]:
            assert not mconn.execute("SELECT has_schema_privilege(%s, %s, 'CREATE')",
                                     (role, schema)).fetchone()[0], (role, schema)
    for schema in OWNED_SCHEMAS:
        assert mconn.execute("SELECT has_schema_privilege('mmats_owner', %s, 'CREATE')",
                             (schema,)).fetchone()[0]


# ------------------------------------------------------------------ ownership
def test_everything_is_owned_by_mmats_owner(mconn: psycopg.Connection) -> None:
    schemas = mconn.execute("SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace "
                            "WHERE nspname = ANY(%s)", (OWNED_SCHEMAS,)).fetchall()
    assert sorted(schemas) == sorted((s, "mmats_owner") for s in OWNED_SCHEMAS)
    relations = mconn.execute(
        "SELECT c.relkind, quote_ident(n.nspname) || '.' || quote_ident(c.relname), "
        "pg_get_userbyid(c.relowner) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = ANY(%s)", (OWNED_SCHEMAS,)).fetchall()
    kinds = {r[0] for r in relations}
    assert {"r", "v", "S"} <= kinds  # tables, views, sequences
    # the bar aggregates: materialized views, or continuous aggregates (views) on TimescaleDB
    timescale = mconn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
                              ).fetchone()
    assert timescale or "m" in kinds
    assert [r for r in relations if r[2] != "mmats_owner"] == []
    functions = mconn.execute(
        "SELECT p.oid::regprocedure::text, pg_get_userbyid(p.proowner) FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = ANY(%s)",
        (OWNED_SCHEMAS,)).fetchall()
    assert len(functions) > 10
    assert [f for f in functions if f[1] != "mmats_owner"] == []
    types = mconn.execute(
        "SELECT t.typname, pg_get_userbyid(t.typowner) FROM pg_type t "
        "JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = ANY(%s)",
        (OWNED_SCHEMAS,)).fetchall()
    assert [t for t in types if t[1] != "mmats_owner"] == []


def test_no_function_is_executable_by_public(mconn: psycopg.Connection) -> None:
    by_has = mconn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = ANY(%s) AND has_function_privilege('public', p.oid, 'EXECUTE')",
        (OWNED_SCHEMAS,)).fetchall()
    assert by_has == []
    by_acl = mconn.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = ANY(%s) AND (p.proacl IS NULL OR EXISTS ("
        "  SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))",
        (OWNED_SCHEMAS,)).fetchall()
    assert by_acl == []  # a NULL acl would mean the default: PUBLIC may execute


def test_no_table_or_sequence_privilege_for_public(mconn: psycopg.Connection) -> None:
    rows = mconn.execute(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p', 'v', 'm', 'S') "
        "AND EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = 0)",
        (OWNED_SCHEMAS,)).fetchall()
    assert rows == []


def test_security_definer_functions_pin_search_path(mconn: psycopg.Connection) -> None:
    rows = mconn.execute(
        "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = ANY(%s) AND p.prosecdef", (APP_SCHEMAS,)).fetchall()
    assert rows, "expected SECURITY DEFINER functions (audit.record, audit.verify_chain)"
    for name, config in rows:
        assert config and any(c.startswith("search_path=") for c in config), name


def test_functions_without_a_pinned_search_path_are_the_owners_alone(
        mconn: psycopg.Connection) -> None:
    """A function that runs in its caller's search path (no search_path setting of its
    own) is never SECURITY DEFINER and, unless it is plain SQL (inlined into the caller's
    plan), may be executed by mmats_owner alone: another role reaches it only through a
    SECURITY DEFINER function, whose pinned path it then runs in."""
    schemas = [*APP_SCHEMAS, "backtest", "runtime"]
    free = mconn.execute(
        "SELECT p.oid::regprocedure::text, l.lanname, p.prosecdef,"
        " ARRAY(SELECT DISTINCT r.rolname FROM aclexplode(COALESCE(p.proacl,"
        "        acldefault('f', p.proowner))) a"
        "       LEFT JOIN pg_roles r ON r.oid = a.grantee"
        "       WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner)"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " JOIN pg_language l ON l.oid = p.prolang"
        " WHERE n.nspname = ANY(%s) AND NOT EXISTS ("
        "   SELECT 1 FROM unnest(COALESCE(p.proconfig, '{}')) c WHERE c LIKE 'search_path=%%')",
        (schemas,)).fetchall()
    names = {name for name, _lang, _definer, _others in free}
    # the hot internal helpers are among them (migration 0004_06), so the check has rows
    assert {"trading._num(jsonb,text,text,numeric,numeric,boolean)",
            "trading._locked_order(text)", "audit.chain_event()"} <= names
    for name, lang, definer, others in free:
        assert not definer, name
        if lang != "sql":
            assert others == [], f"{name} runs in its caller's search path; executable by {others}"


def test_owner_can_write_positive_control(mconn: psycopg.Connection) -> None:
    # the write attempts below are not refused for some unrelated reason: the owner may run them
    with as_role(mconn, "mmats_owner"):
        for stmt in write_statements(mconn, "market.bars")[1:2]:
            assert not refused(mconn, stmt)
        mconn.execute("UPDATE trading.accounts SET cash = cash WHERE name = 'roles'")


# ------------------------------------------------------------------ strategy
def test_strategy_reads_market_data(mconn: psycopg.Connection) -> None:
    with as_role(mconn, "mmats_strategy"):
        assert mconn.execute("SELECT count(*) FROM market.bars").fetchone() == (1,)
        assert mconn.execute("SELECT count(*) FROM market.instruments").fetchone() == (1,)
        assert mconn.execute("SELECT count(*) FROM trading.strategies").fetchone() is not None
        assert mconn.execute("SELECT market.timeframe_interval('1h')").fetchone() is not None


@pytest.mark.parametrize("table", ["market.bars", "market.instruments", "trading.orders",
                                   "trading.fills", "trading.positions", "trading.signals",
                                   "trading.accounts", "risk.limits", "audit.events",
                                   "audit.chain_head", "market.news_sentiment"])
def test_strategy_cannot_write(mconn: psycopg.Connection, table: str) -> None:
    before = count_rows(mconn)
    stmts = write_statements(mconn, table)
    with as_role(mconn, "mmats_strategy"):
        for stmt in stmts:
            assert refused(mconn, stmt), f"mmats_strategy may run: {stmt}"
    assert count_rows(mconn) == before


@pytest.mark.parametrize("role", ["mmats_strategy", "mmats_router", "mmats_api",
                                  "mmats_readonly"])
def test_only_owner_may_call_audit_record(mconn: psycopg.Connection, role: str) -> None:
    before = mconn.execute("SELECT count(*) FROM audit.events").fetchone()
    with as_role(mconn, role):
        assert refused(mconn, "SELECT audit.record('x.y', 'e', NULL, '{}')")
        assert refused(mconn, "SELECT market.refresh_bar_aggregates()")
        assert refused(mconn, "SELECT pgmq.send('orders', '{}'::jsonb)")
    assert mconn.execute("SELECT count(*) FROM audit.events").fetchone() == before


@pytest.mark.parametrize("role", ["mmats_strategy", "mmats_router", "mmats_api",
                                  "mmats_readonly"])
def test_every_role_granted_breaker_mode_can_call_it(mconn: psycopg.Connection,
                                                      role: str) -> None:
    """risk.breaker_mode reads risk.breaker_state with its caller's rights: before 0004_12
    the strategy and router roles were granted the function and refused the table."""
    acc = mconn.execute("SELECT trading.create_account('brk_' || %s, 'paper', 'operator',"
                        " 1000)", (role,)).fetchone()[0]
    mconn.execute("SELECT risk.trip_breaker('brk_' || %s, 'SOFT', 'test')", (role,))
    with as_role(mconn, role):
        assert mconn.execute("SELECT risk.breaker_mode(%s)::text",
                             (acc,)).fetchone() == ("SOFT",)


def test_strategy_cannot_read_the_ledger(mconn: psycopg.Connection) -> None:
    # it may read the account state its context is built from (accounts, positions,
    # its signals), not the order book, the fills, the limits or the audit log
    with as_role(mconn, "mmats_strategy"):
        for table in ["trading.orders", "trading.fills", "risk.limits", "audit.events"]:
            assert refused(mconn, f"SELECT 1 FROM {table} LIMIT 1"), table


# ------------------------------------------------------------------ router
def test_router_reads_what_it_routes(mconn: psycopg.Connection) -> None:
    with as_role(mconn, "mmats_router"):
        for table in ["trading.orders", "trading.accounts", "market.instruments"]:
            assert mconn.execute(f"SELECT count(*) FROM {table}").fetchone() is not None


@pytest.mark.parametrize("table", ["trading.orders", "trading.fills", "trading.positions",
                                   "trading.accounts", "risk.limits"])
def test_router_cannot_write_directly(mconn: psycopg.Connection, table: str) -> None:
    before = count_rows(mconn)
    stmts = write_statements(mconn, table)
    with as_role(mconn, "mmats_router"):
        for stmt in stmts:
            assert refused(mconn, stmt), f"mmats_router may run: {stmt}"
    assert count_rows(mconn) == before


# ------------------------------------------------------------------ readonly and api
@pytest.mark.parametrize("role", ["mmats_readonly", "mmats_api"])
def test_reader_can_read_every_table(mconn: psycopg.Connection, role: str) -> None:
    everything = tables(mconn, APP_SCHEMAS, "rpvm")
    assert "market.bar_coverage" in everything and "market.bars_1h" in everything
    for view in tables(mconn, APP_SCHEMAS, "m"):
        mconn.execute(f"REFRESH MATERIALIZED VIEW {view}")
    with as_role(mconn, role):
        for t in everything:
            assert mconn.execute(f"SELECT count(*) FROM {t}").fetchone() is not None, t
        assert mconn.execute("SELECT count(*) FROM audit.verify_chain()").fetchone() == (0,)


@pytest.mark.parametrize("role", ["mmats_readonly", "mmats_api"])
def test_reader_can_write_nothing(mconn: psycopg.Connection, role: str) -> None:
    targets = tables(mconn, APP_SCHEMAS)
    assert len(targets) >= 15
    plan = {t: write_statements(mconn, t) for t in targets}
    before = count_rows(mconn)
    allowed = []
    with as_role(mconn, role):
        for stmts in plan.values():
            for stmt in stmts:
                if not refused(mconn, stmt):
                    allowed.append(stmt)
        for view in tables(mconn, APP_SCHEMAS, "m"):
            if not refused(mconn, f"REFRESH MATERIALIZED VIEW {view}"):
                allowed.append(f"REFRESH {view}")
        for seq in tables(mconn, OWNED_SCHEMAS, "S"):
            if not refused(mconn, "SELECT nextval(%s)", seq):
                allowed.append(f"nextval {seq}")
    assert allowed == []
    assert count_rows(mconn) == before


@pytest.mark.parametrize("role", ROLES[1:])
def test_no_role_but_owner_has_write_privileges(mconn: psycopg.Connection, role: str) -> None:
    rows = mconn.execute(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), p.priv FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) AS p(priv) "
        "WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') "
        "AND has_table_privilege(%s, c.oid, p.priv)", (OWNED_SCHEMAS, role)).fetchall()
    assert rows == []


# ------------------------------------------------------------------ migrations
SNAPSHOT_QUERIES = [
    "SELECT rolname, rolsuper, rolcanlogin, rolcreaterole FROM pg_roles "
    "WHERE rolname LIKE 'mmats%' ORDER BY 1",
    "SELECT n.nspname, c.relname, c.relkind, pg_get_userbyid(c.relowner), c.relacl::text "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname IN ('market', 'trading', 'risk', 'ml', 'audit', 'pgmq', 'public') "
    "ORDER BY 1, 2",
    "SELECT p.oid::regprocedure::text, pg_get_userbyid(p.proowner), p.proacl::text, p.prosrc "
    "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
    "WHERE n.nspname IN ('market', 'trading', 'risk', 'ml', 'audit', 'pgmq') ORDER BY 1",
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE connamespace::regnamespace::text IN ('market', 'trading', 'risk', 'ml', 'audit') "
    "ORDER BY 1, 2",
    "SELECT tgrelid::regclass::text, tgname, tgenabled FROM pg_trigger WHERE NOT tgisinternal "
    "ORDER BY 1, 2",
    "SELECT nspname, nspacl::text FROM pg_namespace ORDER BY 1",
    "SELECT defaclrole::regrole::text, defaclnamespace, defaclobjtype, defaclacl::text "
    "FROM pg_default_acl ORDER BY 1, 2, 3",
    "SELECT datacl::text FROM pg_database WHERE datname = current_database()",
    "SELECT * FROM trading.order_transitions ORDER BY 1, 2",
    "SELECT calendar_id FROM market.calendars ORDER BY 1",
    "SELECT queue_name FROM pgmq.meta ORDER BY 1",
    "SELECT version_num FROM public.alembic_version",
]


def snapshot(url: str) -> list[list[tuple]]:
    with psycopg.connect(url) as c:
        return [c.execute(q).fetchall() for q in SNAPSHOT_QUERIES]


def test_upgrade_twice_changes_nothing(db_url: str) -> None:
    before = snapshot(db_url)
    result = migrate.upgrade(db_url)
    assert result.applied == []
    assert result.before == result.after == migrate.head_revision()
    assert snapshot(db_url) == before


def test_fresh_migration_with_existing_roles(empty_db_url: str, db_url: str) -> None:
    # the roles are cluster-wide and already exist: migrating another database reuses them
    result = migrate.upgrade(empty_db_url)
    assert result.before is None
    assert result.after == migrate.head_revision()
    assert len(result.applied) == len(migrate.migration_files())
    again = migrate.upgrade(empty_db_url)
    assert again.applied == []
    fresh, reference = snapshot(empty_db_url), snapshot(db_url)
    # pg_default_acl names database-specific oids, and CREATE DATABASE ... TEMPLATE (how the
    # test databases are made) does not copy the database's own ACL: compare the rest
    skip = {6, 7}
    assert [s for i, s in enumerate(fresh) if i not in skip] == \
        [s for i, s in enumerate(reference) if i not in skip]
    with psycopg.connect(empty_db_url) as c:
        acl = {(r[0], r[1]) for r in c.execute(
            "SELECT a.grantee::regrole::text, a.privilege_type FROM pg_database d, "
            "aclexplode(d.datacl) a WHERE d.datname = current_database() AND a.grantee <> 0")}
        public = {r[0] for r in c.execute(
            "SELECT a.privilege_type FROM pg_database d, aclexplode(d.datacl) a "
            "WHERE d.datname = current_database() AND a.grantee = 0")}
    assert "CREATE" not in public
    assert ("mmats_owner", "CREATE") in acl
    for role in ROLES:
        assert (role, "CONNECT") in acl and (role, "TEMPORARY") in acl
    assert not [r for r in acl if r[1] == "CREATE" and r[0] in ROLES[1:]]
