"""Login passwords of the MMATS service roles.

The schema creates ``mmats_strategy``, ``mmats_router``, ``mmats_api`` and
``mmats_readonly`` with LOGIN but no password, so nobody can sign in as them until an
administrator sets one (``mmats db set-password``; the docker-compose deployment does it
for ``mmats_readonly``, the role Grafana reads with).

``ALTER ROLE ... PASSWORD`` takes no bind parameters, so the value has to be part of
the statement text. To keep the plain password out of the server's statement log (and
out of ``pg_stat_activity``), it is hashed on the client into a SCRAM-SHA-256 verifier
by libpq (``PQencryptPasswordConn``, what psql's ``\\password`` does) and that verifier
is sent as a ``psycopg.sql.Literal``. The password itself is never logged or echoed.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from db.errors import MmatsError

# The roles a person or service may sign in as. mmats_owner is deliberately absent:
# it owns every object, and TimescaleDB runs background jobs as it; it needs no password.
LOGIN_ROLES: tuple[str, ...] = ("mmats_strategy", "mmats_router", "mmats_api", "mmats_readonly")

# libpq refuses nothing, but a password this short is a mistake, not a choice
MIN_PASSWORD_LENGTH = 8


class RoleError(MmatsError):
    """A role or password that MMATS refuses to set."""


def check_password(password: str) -> None:
    if not isinstance(password, str) or not password:
        raise RoleError("the password is empty")
    if "\x00" in password:
        raise RoleError("the password contains a NUL character, which PostgreSQL cannot store")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise RoleError(f"the password is too short: use at least {MIN_PASSWORD_LENGTH} "
                        "characters")


def set_login_password(conn: psycopg.Connection, role: str, password: str) -> None:
    """Set the login password of one MMATS service role.

    ``conn`` must belong to a superuser or a role with CREATEROLE (the migrating
    administrator). On a connection that is not in autocommit mode, the change takes
    effect when the caller commits.
    """
    if role not in LOGIN_ROLES:
        raise RoleError(f"refusing to set a password for {role!r}: only the MMATS login roles "
                        f"{', '.join(LOGIN_ROLES)} can be given one here")
    check_password(password)
    row = conn.execute("SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = %s",
                       (role,)).fetchone()
    if row is None:
        raise RoleError(f"role {role} does not exist on this server: run `mmats db upgrade` "
                        "first")
    if not row[0]:
        raise RoleError(f"role {role} has no LOGIN attribute; the schema creates it with LOGIN, "
                        "so someone changed it: ALTER ROLE ... LOGIN as an administrator")
    verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
    # one statement: it commits by itself on an autocommit connection, otherwise with
    # the caller's transaction
    conn.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
        sql.Identifier(role), sql.Literal(verifier.decode("ascii"))))
