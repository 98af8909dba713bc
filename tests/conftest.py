"""Every test that touches data runs against a real PostgreSQL server.

By default the suite starts its own embedded server in a temporary folder, tuned for
speed (fsync, synchronous_commit and full_page_writes off); with MMATS_DATABASE_URL set
it uses that server instead. Either way one template database is migrated once per
session with the real migrations, and each test gets its own database cloned from it
(CREATE DATABASE ... TEMPLATE), because the code under test commits, locks across
connections and uses NOTIFY.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import responses
from psycopg import sql
from psycopg.conninfo import make_conninfo

from db import migrate
from db.connect import conninfo_to_uri
from db.runtime import EmbeddedServer
from workers.runtime.config import RouterConfig
from workers.runtime.router import RoutedAccount, Router

REPO = Path(__file__).resolve().parent.parent
TEST_SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


def url_for(base_url: str, dbname: str) -> str:
    return make_conninfo(base_url, dbname=dbname)


def as_uri(conninfo: str) -> str:
    """A postgresql:// URI for a conninfo string (the CLI and alembic take URIs)."""
    return conninfo_to_uri(conninfo)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A URL to the maintenance database of the server under test (superuser)."""
    external = os.environ.get("MMATS_DATABASE_URL")
    if external:
        yield url_for(external, "postgres")
        return
    home = Path(tempfile.mkdtemp(prefix="mmats-test-"))
    home.chmod(0o711)
    server = EmbeddedServer(home, settings=TEST_SERVER_SETTINGS, quiet=True)
    server.start()
    try:
        yield server.url("postgres")
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name = f"mmats_tpl_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate.upgrade(as_uri(url_for(server_url, name)))
    with psycopg.connect(url_for(server_url, name), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone():
            # TimescaleDB's background workers connect to every database that has the
            # extension; a template must have no other sessions to be cloned
            conn.execute("SELECT timescaledb_pre_restore()")
    with psycopg.connect(server_url, autocommit=True) as conn:
        # nobody may connect to the template any more (not even TimescaleDB's scheduler,
        # whose session would make CREATE DATABASE ... TEMPLATE fail)
        conn.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
            sql.Identifier(name)))
    try:
        yield name
    finally:
        _drop(server_url, name)


def clone_template(server_url: str, template: str, name: str) -> None:
    """CREATE DATABASE name TEMPLATE template, ending any session still on the template."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        for attempt in range(100):
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (template,))
            try:
                conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)))
                return
            except psycopg.errors.ObjectInUse:  # a terminated session not yet gone
                if attempt == 99:
                    raise
                time.sleep(0.1)


def _drop(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A postgresql:// URL (superuser) of a fresh, fully migrated database for this test."""
    name = f"mmats_t_{uuid.uuid4().hex[:12]}"
    clone_template(server_url, template_db, name)
    try:
        yield as_uri(url_for(server_url, name))
    finally:
        _drop(server_url, name)


@pytest.fixture(scope="module")
def mod_url(server_url: str, template_db: str) -> Iterator[str]:
    """One migrated database shared by a module's tests (each test makes its own rows)."""
    name = f"mmats_m_{uuid.uuid4().hex[:12]}"
    clone_template(server_url, template_db, name)
    try:
        yield as_uri(url_for(server_url, name))
    finally:
        _drop(server_url, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit superuser connection to this test's database."""
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def empty_db_url(server_url: str) -> Iterator[str]:
    """A URL of a fresh, empty (unmigrated) database."""
    name = f"mmats_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield as_uri(url_for(server_url, name))
    finally:
        _drop(server_url, name)


# ---------------------------------------------------------------- brokers and the router
@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    """Every HTTP request answered by `responses`: an unregistered URL raises
    ConnectionError, so nothing reaches the network (modules that must prove every
    registered answer was asked for define their own, assert_all_requests_are_fired)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def make_router(db_url: str) -> Iterator[Callable[..., Router]]:
    """Routers started on this test's database (a second one is a restarted
    router), polling fast; `config` overrides RouterConfig's fields."""
    made: list[Router] = []

    def make(*accounts: RoutedAccount, **config: Any) -> Router:
        settings = {"visibility_seconds": 1, "poll_ms": 20, "status_poll_seconds": 30.0,
                    **config}
        router = Router(db_url, {a.account_id: a for a in accounts},
                        config=RouterConfig(**settings))
        router.start()
        made.append(router)
        return router

    yield make
    for router in made:
        router.close()
        router.beat("stopped", force=True)  # also closes the error-reporting session


# ---------------------------------------------------------------- the command line
@pytest.fixture
def run(db_url: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`mmats ARGS...` as a user runs it (a subprocess, no standard input) on this test's
    database: the CompletedProcess, output captured as text."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MMATS_")},
           "MMATS_DATABASE_URL": db_url}

    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", *args],
                              env=env, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    return _run
