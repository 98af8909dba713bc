"""A scratch database for a benchmark: on MMATS_DATABASE_URL's server if set, else on a
temporary embedded server tuned for speed (like the test suite's); migrated; dropped after."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from db import migrate
from db.connect import conninfo_to_uri
from db.runtime import EmbeddedServer

FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@contextmanager
def fresh_database(home: Path) -> Iterator[str]:
    external = os.environ.get("MMATS_DATABASE_URL")
    server = None
    if external:
        base = make_conninfo(external, dbname="postgres")
    else:
        server = EmbeddedServer(home / "pg", settings=FAST, quiet=True)
        server.start()
        base = server.url("postgres")
    name = f"mmats_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = conninfo_to_uri(make_conninfo(base, dbname=name))
        migrate.upgrade(url)
        yield url
    finally:
        with psycopg.connect(base, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
        if server is not None:
            server.stop()
