"""``mmats db set-password ROLE``: give an MMATS service role a login password.

The password never comes from the command line (it would sit in the shell history and
in ``ps``): it is read from an environment variable named with ``--password-env`` or
from the first line of standard input with ``--stdin``. It is never printed.

The CLI attaches this command to the ``db`` group as ``set_password_command``.
"""

from __future__ import annotations

import os
import sys

import click

from db.connect import connect, database_url
from db.roles import LOGIN_ROLES, RoleError, set_login_password


def _read_password(password_env: str | None, stdin: bool) -> str:
    if (password_env is None) == (not stdin):
        raise click.UsageError("give exactly one of --password-env VAR and --stdin")
    if password_env is not None:
        value = os.environ.get(password_env)
        if value is None:
            raise click.ClickException(f"environment variable {password_env} is not set")
        if value == "":
            raise click.ClickException(f"environment variable {password_env} is empty")
        return value
    line = sys.stdin.readline()
    if not line:
        raise click.ClickException("no password on standard input")
    return line.rstrip("\r\n")


@click.command("set-password")
@click.argument("role", type=click.Choice(LOGIN_ROLES))
@click.option("--password-env", "password_env", metavar="VAR",
              help="Read the password from the environment variable VAR.")
@click.option("--stdin", "stdin", is_flag=True,
              help="Read the password from the first line of standard input.")
def set_password(role: str, password_env: str | None, stdin: bool) -> None:
    """Set the login password of ROLE (an MMATS service role).

    Connects as the configured administrator (MMATS_DATABASE_URL, or the embedded
    server's superuser). Example, for Grafana:

        mmats db set-password mmats_readonly --password-env MMATS_READONLY_PASSWORD
    """
    password = _read_password(password_env, stdin)
    try:
        with connect(database_url(), autocommit=True) as conn:
            set_login_password(conn, role, password)
    except RoleError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"login password of {role} set")


set_password_command = set_password
