"""The ``mmats`` command line.

Errors reach the user as one line on stderr (exit status 1, or 2 for bad usage); the
stack trace only with ``--debug`` (or MMATS_DEBUG=1).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import NoReturn

import click
import psycopg

from api.table import printable
from db.config import ConfigError, load_settings, redact_text, redact_url
from db.connect import connect, database_url, embedded_server
from db.errors import MmatsError, describe
from db.migrate import MigrationError
from db.runtime import ServerError


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("MMATS_DEBUG") == "1"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show stack traces on errors.")
def cli(debug: bool) -> None:
    """MMATS: multi-market automated trading, with PostgreSQL as the trading core."""


# --------------------------------------------------------------------------- db
@cli.group("db")
def db_group() -> None:
    """The database server: start, stop, status, url, psql, upgrade."""


@db_group.command("start")
def db_start() -> None:
    """Start the embedded server (or report the configured external one)."""
    settings = load_settings()
    if settings.database_url:
        click.echo(f"MMATS_DATABASE_URL is set: using {redact_url(settings.database_url)} "
                   "(no embedded server to start)")
        return
    server = embedded_server(settings)
    was_running = server.status().running
    url = server.start()
    state = "already running" if was_running else "started"
    click.echo(f"embedded PostgreSQL {state}: {redact_url(url)} (data in {server.pgdata})")


@db_group.command("stop")
def db_stop() -> None:
    """Stop the embedded server."""
    settings = load_settings()
    if settings.database_url:
        raise MmatsError("MMATS_DATABASE_URL is set: MMATS does not stop an external server")
    stopped = embedded_server(settings).stop()
    click.echo("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")


@db_group.command("status")
def db_status() -> None:
    """Show whether the server runs and which schema revision the database is at."""
    from db.migrate import current_revision, head_revision

    settings = load_settings()
    if settings.database_url:
        url = settings.database_url
        click.echo(f"server: external {redact_url(url)}")
    else:
        st = embedded_server(settings).status()
        if not st.initialized:
            click.echo(f"server: embedded, not initialised (would live in {st.pgdata})")
            return
        click.echo(f"server: embedded, {'running' if st.running else 'stopped'}, "
                   f"pid {st.pid or '-'}, port {st.port}, data {st.pgdata}")
        if not st.running:
            return
        url = embedded_server(settings).url()
    with connect(url) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        tsdb = conn.execute(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'").fetchone()
    revision = current_revision(url)
    head = head_revision()
    click.echo(f"postgresql {version[0] if version else '?'}, timescaledb "
               f"{tsdb[0] if tsdb else 'not installed (plain PostgreSQL tables and views)'}")
    if revision == head:
        click.echo(f"schema: {revision} (up to date)")
    else:
        click.echo(f"schema: {revision or 'empty'}; head is {head}: run `mmats db upgrade`")


@db_group.command("url")
@click.option("--show-password", is_flag=True, help="Print the password instead of ***.")
def db_url_cmd(show_password: bool) -> None:
    """Print the database URL (the password hidden unless asked)."""
    url = database_url(start=False) if load_settings().database_url else database_url()
    click.echo(url if show_password else redact_url(url))


@db_group.command("psql", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def db_psql(args: tuple[str, ...]) -> NoReturn:
    """Open psql on the database (extra arguments go to psql)."""
    import shutil
    from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

    from db.runtime import pg_bin_dir

    url = database_url()
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError as exc:
        raise MmatsError(f"MMATS_DATABASE_URL is not a valid URL ({exc}): "
                         f"{redact_url(url)}") from None
    env = dict(os.environ)
    # the password goes to psql in PGPASSWORD, never on its command line (ps shows that)
    if password:
        env["PGPASSWORD"] = unquote(password)
        parts = parts._replace(netloc=parts.netloc.replace(f":{password}@", "@"))
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in query):
        env["PGPASSWORD"] = next(value for key, value in query if key == "password")
        parts = parts._replace(query=urlencode([(k, v) for k, v in query if k != "password"]))
    url = urlunsplit(parts)
    psql = str(pg_bin_dir() / "psql")
    if not os.path.exists(psql):
        psql = shutil.which("psql") or psql
    os.execve(psql, [psql, url, *args], env)


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations (idempotent: a second run changes nothing)."""
    from db.migrate import upgrade

    url = database_url()
    result = upgrade(url)
    if result.applied:
        click.echo(f"applied {len(result.applied)} migration(s): {', '.join(result.applied)}; "
                   f"schema now at {result.after}")
    else:
        click.echo(f"schema already at {result.after}: nothing to do")


# --------------------------------------------------------------------------- audit
@cli.group("audit")
def audit_group() -> None:
    """The append-only audit chain."""


@audit_group.command("verify")
def audit_verify() -> None:
    """Walk the hash chain and name the first event that does not match."""
    with connect(database_url()) as conn:
        count = conn.execute("SELECT count(*) FROM audit.events").fetchone()
        bad = conn.execute("SELECT event_id, problem FROM audit.verify_chain()").fetchone()
    if bad:
        raise MmatsError(f"audit chain broken at event {bad[0]}: {bad[1]}")
    click.echo(f"audit chain intact: {count[0] if count else 0} events")


def _register_subcommands() -> None:
    from api import (
        cli_backtest,
        cli_creds,
        cli_data,
        cli_roles,
        cli_runtime,
        cli_trading,
        cli_walkforward,
        demo,
    )

    db_group.add_command(cli_roles.set_password_command)
    cli.add_command(cli_data.data_group)
    cli.add_command(cli_trading.account_group)
    cli.add_command(cli_trading.risk_group)
    cli.add_command(cli_trading.orders_group)
    cli.add_command(cli_trading.positions_command)
    cli.add_command(cli_trading.close_command)
    cli.add_command(demo.demo)
    for command in (cli_backtest.backtest_command, cli_backtest.runs_command,
                    cli_backtest.report_command, cli_backtest.montecarlo_command,
                    cli_backtest.strategies_command, cli_walkforward.walk_forward_command,
                    cli_runtime.run_command, cli_runtime.worker_command,
                    cli_runtime.workers_command, cli_runtime.paper_command,
                    cli_creds.creds_group):
        cli.add_command(command)


def main(argv: list[str] | None = None) -> NoReturn:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        _register_subcommands()
        cli.main(args=argv, prog_name="mmats", standalone_mode=False)
        sys.exit(0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        # one line too, like every refusal (click's own is a usage block and "Error:"):
        # what was wrong, and where to read how the command is typed; exit status 2
        message = " ".join(exc.format_message().split())
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            message = f"{message.rstrip('.')} (see `{exc.ctx.command_path} --help`)"
        click.echo(f"error: {printable(message)}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except (MmatsError, ConfigError, ServerError, MigrationError) as exc:
        _fail(str(exc), debug)
    except ValueError as exc:
        # a backtest's one-line refusal (BacktestError), wherever it comes from (the demo
        # runs backtests too); any other ValueError is a bug: its traceback
        from workers.backtest.config import BacktestError
        if not isinstance(exc, BacktestError):
            raise
        _fail(str(exc), debug)
    except psycopg.Error as exc:
        try:
            url = database_url(start=False)
        except Exception:
            url = None
        message = describe(exc, url)
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName
                      | psycopg.errors.UndefinedFunction):
            message += " (is the database migrated? run `mmats db upgrade`)"
        _fail(message, debug)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def _known_urls() -> list[str]:
    """The database URLs an error may quote (the variable as set, the configured one)."""
    urls = [os.environ.get("MMATS_DATABASE_URL") or ""]
    with contextlib.suppress(Exception):  # no configured URL: the variable is all there is
        urls.append(database_url(start=False))
    return [u for u in urls if u]


def _fail(message: str, debug: bool) -> NoReturn:
    """One line on stderr, exit status 1; neither the line nor the --debug trace shows a
    database password (libpq and the driver quote a bad URL, or a piece of its password
    as a host name). Control characters in the message (a newline, a terminal escape
    sequence from a name or a file) are shown as escapes, e.g. \\x1b."""
    urls = _known_urls()
    if debug:
        click.echo(redact_text(traceback.format_exc(), *urls).rstrip("\n"), err=True)
    click.echo(f"error: {printable(redact_text(message, *urls))}", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
