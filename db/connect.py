"""Which server MMATS talks to, and connections to it."""

from __future__ import annotations

import psycopg

from db.config import Settings, load_settings
from db.runtime import EmbeddedServer


def embedded_server(settings: Settings) -> EmbeddedServer:
    return EmbeddedServer(settings.home)


def database_url(settings: Settings | None = None, *, start: bool = True) -> str:
    """MMATS_DATABASE_URL if set; otherwise the embedded server's (started if needed)."""
    settings = settings or load_settings()
    if settings.database_url:
        return settings.database_url
    server = embedded_server(settings)
    return server.start() if start else server.url()


def connect(url: str, **kwargs: object) -> psycopg.Connection:
    """A session whose times are UTC, whatever the server's TimeZone or PGTZ say (a server
    in New York printed `mmats runs` dates of the day before, unlabelled)."""
    conn = psycopg.connect(url, application_name="mmats", **kwargs)  # type: ignore[arg-type]
    utc(conn)
    return conn


def utc(conn: psycopg.Connection) -> None:
    """Set the session's time zone to UTC (committed, so it holds outside a transaction)."""
    conn.execute("SET TIME ZONE 'UTC'")
    if not conn.autocommit:
        conn.commit()


def conninfo_to_uri(conninfo: str) -> str:
    """A postgresql:// URI for a libpq conninfo string (alembic and the CLI take URIs)."""
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    d = conninfo_to_dict(conninfo)
    auth = quote(str(d.get("user", "postgres")), safe="")
    if d.get("password"):
        auth += ":" + quote(str(d["password"]), safe="")
    return f"postgresql://{auth}@{d.get('host', '127.0.0.1')}:{d.get('port', '5432')}/{d['dbname']}"
