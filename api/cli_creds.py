"""mmats creds …: broker credentials, encrypted under the master key (workers.credentials).

Secret values are never arguments (shell history, `ps`): they are prompted with hidden
input, read from named environment variables (``--from-env api_key=BINANCE_KEY``) or
read as one JSON object from stdin (``--stdin-json``). No command prints a secret; every
command names the account's environment, so a live key is never mistaken for a paper one.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence

import click
import psycopg

from api.table import table
from db.connect import connect, database_url
from db.errors import MmatsError
from workers import credentials as creds
from workers.runtime import log

_MAKE_KEY = 'export {var}="$(openssl rand -base64 32)"'


def _secret_input(func: click.decorators.FC) -> click.decorators.FC:
    options = [
        click.option("--field", "fields", multiple=True, metavar="NAME",
                     help="a secret field to prompt for (hidden input), e.g. api_key"),
        click.option("--from-env", "from_env", multiple=True, metavar="NAME=ENVVAR",
                     help="take field NAME from environment variable ENVVAR"),
        click.option("--stdin-json", is_flag=True,
                     help='read the fields as one JSON object from stdin: {"api_key": "..."}'),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _read_secret(fields: Sequence[str], from_env: Sequence[str], stdin_json: bool,
                 default_fields: Sequence[str] = ()) -> dict[str, str]:
    """The secret fields from the chosen source; no message here ever holds a value."""
    if stdin_json:
        if fields or from_env:
            raise MmatsError("--stdin-json reads the whole secret: do not combine it with "
                             "--field or --from-env")
        try:
            value = json.loads(sys.stdin.read())
        except json.JSONDecodeError as exc:
            raise MmatsError(f"--stdin-json: stdin is not valid JSON (line {exc.lineno}, "
                             f"column {exc.colno})") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise MmatsError('--stdin-json needs a JSON object of text values, e.g. '
                             '{"api_key": "...", "secret": "..."}')
        for name in value:
            creds.check_field_name(name)
        return {str(k): v for k, v in value.items()}
    secret: dict[str, str] = {}
    for pair in from_env:
        name, sep, var = pair.partition("=")
        if not sep or not name or not var:
            raise MmatsError(f"--from-env takes NAME=ENVVAR, got {pair!r}")
        creds.check_field_name(name)
        if name in secret:
            raise MmatsError(f"field {name} is given twice")
        value = os.environ.get(var)
        if not value:
            raise MmatsError(f"--from-env {name}={var}: environment variable {var} is not set")
        log.register_secret(value)
        secret[name] = value
    to_prompt = list(fields) if (fields or from_env) else list(default_fields)
    for name in to_prompt:
        creds.check_field_name(name)
        if name in secret or to_prompt.count(name) > 1:
            raise MmatsError(f"field {name} is given twice")
    for name in to_prompt:
        value = click.prompt(name, hide_input=True)
        log.register_secret(value)
        secret[name] = value
    if not secret:
        raise MmatsError("no secret given: use --field NAME (prompted), --from-env "
                         "NAME=ENVVAR or --stdin-json")
    return secret


def _when(value: object) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M}"


def _summary(info: creds.CredentialInfo) -> str:
    return (f"venue {info.venue}, endpoint {info.endpoint}, fields {', '.join(info.fields)}, "
            f"master key {info.key_id}")


def _by_account(infos: Sequence[creds.CredentialInfo]) -> str:
    counts = Counter((i.account, i.environment) for i in infos)
    return ", ".join(f"{a} ({e}): {n}" for (a, e), n in sorted(counts.items()))


@click.group("creds")
def creds_group() -> None:
    """Broker credentials: stored encrypted (AES-256-GCM) under the master key."""


@creds_group.command("set")
@click.argument("account")
@click.argument("label")
@click.option("--venue", required=True, help="the broker or exchange, e.g. binance, alpaca")
@click.option("--endpoint", required=True, type=click.Choice(list(creds.ENDPOINTS)),
              help="which of the venue's endpoints these keys are for")
@_secret_input
def creds_set(account: str, label: str, venue: str, endpoint: str, fields: tuple[str, ...],
              from_env: tuple[str, ...], stdin_json: bool) -> None:
    """Store a new credential for ACCOUNT under LABEL."""
    key = creds.load_master_key()
    with connect(database_url(), autocommit=True) as conn:
        name, environment = creds.resolve_account(conn, account)
        if creds.get_info(conn, name, label) is not None:
            raise MmatsError(f"account {name} ({environment}) already has credential {label}: "
                             f"use `mmats creds rotate {name} {label}` for new values")
        secret = _read_secret(fields, from_env, stdin_json)
        info = creds.store(conn, key, name, label, venue, endpoint, secret)
    click.echo(f"credential {info.label} stored for account {info.account} "
               f"({info.environment}): {_summary(info)}")


@creds_group.command("list")
@click.option("--account", default=None, help="only this account's credentials")
def creds_list(account: str | None) -> None:
    """Credentials and what they are for (never their values)."""
    with connect(database_url(), autocommit=True) as conn:
        infos = creds.list_credentials(conn, account)
        where = ""
        if account is not None:
            name, environment = creds.resolve_account(conn, account)
            where = f" for account {name} ({environment})"
    if not infos:
        click.echo(f"no credentials{where} (store one with `mmats creds set`)")
        return
    rows = [(i.account, i.environment, i.label, i.venue, i.endpoint, ",".join(i.fields),
             i.key_id, _when(i.updated_at), _when(i.rotated_at)) for i in infos]
    click.echo(table(("account", "environment", "label", "venue", "endpoint", "fields",
                      "key_id", "updated (UTC)", "rotated (UTC)"), rows))


@creds_group.command("rm")
@click.argument("account")
@click.argument("label")
def creds_rm(account: str, label: str) -> None:
    """Remove a credential (its metadata and its encrypted secret)."""
    with connect(database_url(), autocommit=True) as conn:
        info = creds.remove(conn, account, label)
    click.echo(f"credential {info.label} of account {info.account} ({info.environment}) "
               f"removed (venue {info.venue}, endpoint {info.endpoint})")


@creds_group.command("rotate")
@click.argument("account")
@click.argument("label")
@_secret_input
def creds_rotate(account: str, label: str, fields: tuple[str, ...], from_env: tuple[str, ...],
                 stdin_json: bool) -> None:
    """New values for a credential (without options: prompt for its current fields)."""
    key = creds.load_master_key()
    with connect(database_url(), autocommit=True) as conn:
        name, environment = creds.resolve_account(conn, account)
        existing = creds.get_info(conn, name, label)
        if existing is None:
            raise MmatsError(f"account {name} ({environment}) has no credential {label!r}")
        secret = _read_secret(fields, from_env, stdin_json, default_fields=existing.fields)
        info = creds.rotate_secret(conn, key, name, label, secret)
    click.echo(f"credential {info.label} of account {info.account} ({info.environment}) "
               f"rotated: {_summary(info)}")


def _env_rotation_instructions(old: creds.MasterKey, infos: Sequence[creds.CredentialInfo]
                               ) -> str:
    stored = f"{len(infos)} credential(s)" + (f" ({_by_account(infos)})" if infos else "")
    return "\n".join([
        f"the master key {old.key_id} comes from {creds.ENV_VAR}, which mmats cannot rewrite;"
        " nothing was changed. To rotate it:",
        "  1. " + _MAKE_KEY.format(var="MMATS_NEW_MASTER_KEY"),
        "  2. mmats creds rotate-key --new-key-env MMATS_NEW_MASTER_KEY",
        f"  3. set {creds.ENV_VAR} to that new value wherever MMATS runs, then unset "
        "MMATS_NEW_MASTER_KEY",
        f"{stored} are encrypted under {old.key_id} now",
    ])


@creds_group.command("rotate-key")
@click.option("--new-key-env", "new_key_env", default=None, metavar="VAR",
              help="take the new master key from this environment variable "
                   f"(needed when the current one comes from {creds.ENV_VAR})")
def creds_rotate_key(new_key_env: str | None) -> None:
    """Re-encrypt every credential under a new master key, in one transaction."""
    old = creds.load_master_key()
    if new_key_env is not None:
        text = os.environ.get(new_key_env)
        if not text:
            raise MmatsError(f"--new-key-env {new_key_env}: environment variable "
                             f"{new_key_env} is not set")
        new = creds.parse_key(text, what=new_key_env, source=old.source)
    elif old.source == "env":
        with connect(database_url(), autocommit=True) as conn:
            infos = creds.list_credentials(conn)
        click.echo(_env_rotation_instructions(old, infos))
        return
    else:
        new = creds.generate_key()
    with connect(database_url(), autocommit=True) as conn:
        if old.source == "keyring":
            infos = _rotate_in_keyring(conn, old, new)
            where = "the new key replaces the old one in the OS keyring"
        else:
            infos = creds.rotate_master_key(conn, old, new)
            where = (f"now set {creds.ENV_VAR} to the value of {new_key_env} wherever MMATS "
                     f"runs (and unset {new_key_env}): the old key no longer decrypts them")
    done = f" ({_by_account(infos)})" if infos else ""
    click.echo(f"re-encrypted {len(infos)} credential(s){done} under master key {new.key_id} "
               f"(was {old.key_id}); {where}")


def _rotate_in_keyring(conn: psycopg.Connection, old: creds.MasterKey,
                       new: creds.MasterKey) -> list[creds.CredentialInfo]:
    """Rotate with the keyring written before the commit, and put back if the commit fails.

    The old key is kept as mmats/master-key-previous until the commit has happened, so a
    process killed in between leaves a key that still opens the records.
    """
    creds.save_keyring_key(old, creds.KEYRING_PREVIOUS)
    wrote = False
    try:
        with conn.transaction():
            infos = creds.rotate_master_key(conn, old, new)
            creds.save_keyring_key(new)
            wrote = True
    except BaseException:
        if wrote:
            creds.save_keyring_key(old)  # if this fails too, the backup is the way back
        creds.delete_keyring_key(creds.KEYRING_PREVIOUS)
        raise
    creds.delete_keyring_key(creds.KEYRING_PREVIOUS)
    return infos


@creds_group.command("init-key")
def creds_init_key() -> None:
    """Generate the master key into the OS keyring (or say how to set MMATS_MASTER_KEY)."""
    if os.environ.get(creds.ENV_VAR):
        key = creds.parse_key(os.environ[creds.ENV_VAR])
        click.echo(f"{creds.ENV_VAR} is set (master key {key.key_id}): it is the key in use, "
                   "no keyring key is needed")
        return
    existing = creds.read_keyring_key()
    if existing is not None:
        raise MmatsError(f"the OS keyring already holds master key {existing.key_id}: "
                         "use `mmats creds rotate-key` to replace it")
    with connect(database_url(), autocommit=True) as conn:
        stored = creds.stored_key_ids(conn)
    if stored:
        raise MmatsError(f"stored credentials are encrypted under master key {stored[0]}, "
                         "which a new key cannot open: restore that key (keyring or "
                         f"{creds.ENV_VAR}) or remove them with `mmats creds rm`")
    key = creds.generate_key()
    try:
        creds.save_keyring_key(key)
    except MmatsError as exc:
        click.echo(f"{exc}\nno usable OS keyring: set {creds.ENV_VAR} instead, e.g.\n  "
                   + _MAKE_KEY.format(var=creds.ENV_VAR)
                   + "\nand keep it in your secret manager: stored credentials cannot be "
                     "read without it")
        return
    back = creds.read_keyring_key()
    if back is None or back.key_id != key.key_id:
        raise MmatsError("the OS keyring did not keep the master key (read back failed)")
    click.echo(f"master key {key.key_id} generated and stored in the OS keyring as "
               f"{creds.KEYRING_SERVICE}/{creds.KEYRING_USERNAME}")
