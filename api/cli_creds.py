"""mmats creds …: broker credentials, encrypted under the master key (workers.credentials).

Secret values are never arguments (shell history, `ps`): they are prompted with hidden
input, read from named environment variables (``--from-env api_key=BINANCE_KEY``) or
read as one JSON object from stdin (``--stdin-json``). No command prints a secret; every
command names the account's environment, so a live key is never mistaken for a paper one.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import sys
import warnings
from collections import Counter
from collections.abc import Sequence

import click
import psycopg

from api.table import table
from db.connect import connect, database_url
from db.errors import MmatsError
from db.structured import loads_json
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
            raise MmatsError("--stdin-json reads every given field from stdin: do not combine "
                             "it with --field or --from-env")
        try:
            value = loads_json(sys.stdin.read())
        except ValueError as exc:  # (never the value: the message says only where)
            raise MmatsError(f"--stdin-json: stdin: {exc}") from None
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
            state = "is empty" if value == "" else "is not set"
            raise MmatsError(f"--from-env {name}={var}: environment variable {var} {state}")
        log.register_secret(value)
        secret[name] = value
    to_prompt = list(fields) if (fields or from_env) else list(default_fields)
    for name in to_prompt:
        creds.check_field_name(name)
        if name in secret or to_prompt.count(name) > 1:
            raise MmatsError(f"field {name} is given twice")
    piped = not sys.stdin.isatty()
    for name in to_prompt:
        try:
            with warnings.catch_warnings():  # piped in: no echo to hide, nothing to warn of
                warnings.simplefilter("ignore", getpass.GetPassWarning)
                value = click.prompt(name, hide_input=True)
        except click.exceptions.Abort:
            if not piped:
                raise  # Ctrl-C or Ctrl-D at the terminal
            raise MmatsError(f"--field {name}: standard input ended before its value (give "
                             "one line per field, or use --from-env or --stdin-json)") from None
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


def _field_changes(before: Sequence[str], given: Sequence[str], replace: bool) -> str:
    """'changed a; added b; kept c' (or 'removed c' with replace): names, never values."""
    parts = [("changed", sorted(f for f in given if f in before)),
             ("added", sorted(f for f in given if f not in before)),
             ("removed" if replace else "kept", sorted(f for f in before if f not in given))]
    return "; ".join(f"{what} {', '.join(names)}" for what, names in parts if names)


@creds_group.command("rotate")
@click.argument("account")
@click.argument("label")
@_secret_input
@click.option("--replace", is_flag=True,
              help="the given fields become the whole secret: fields not given are removed "
                   "(without it they keep their values)")
def creds_rotate(account: str, label: str, fields: tuple[str, ...], from_env: tuple[str, ...],
                 stdin_json: bool, replace: bool) -> None:
    """New values for some or all of a credential's fields; the others keep theirs
    (without options: prompt for every current field)."""
    key = creds.load_master_key()
    with connect(database_url(), autocommit=True) as conn:
        name, environment = creds.resolve_account(conn, account)
        existing = creds.get_info(conn, name, label)
        if existing is None:
            raise MmatsError(f"account {name} ({environment}) has no credential {label!r}")
        secret = _read_secret(fields, from_env, stdin_json, default_fields=existing.fields)
        info = creds.rotate_secret(conn, key, name, label, secret, replace=replace)
    click.echo(f"credential {info.label} of account {info.account} ({info.environment}) "
               f"rotated: {_field_changes(existing.fields, list(secret), replace)}; "
               f"{_summary(info)}")


def _env_rotation_instructions(old: creds.MasterKey, infos: Sequence[creds.CredentialInfo],
                               key_ids: Sequence[str]) -> str:
    stored = f"{len(infos)} credential(s)" + (f" ({_by_account(infos)})" if infos else "")
    others = [k for k in key_ids if k != old.key_id]
    now = (f"{stored} are encrypted under {old.key_id} now" if not others else
           f"{stored} are encrypted under {', '.join(key_ids)} now, not (only) under "
           f"{old.key_id}: step 2 needs {creds.ENV_VAR} set to the key they are under")
    return "\n".join([
        f"the master key {old.key_id} comes from {creds.ENV_VAR}, which mmats cannot rewrite;"
        " nothing was changed. To rotate it:",
        "  1. " + _MAKE_KEY.format(var="MMATS_NEW_MASTER_KEY")
        + "   # and keep that value in your secret manager",
        "  2. mmats creds rotate-key --new-key-env MMATS_NEW_MASTER_KEY   # one transaction; "
        "if interrupted, run it again",
        f"  3. set {creds.ENV_VAR} to that new value wherever MMATS runs, then unset "
        "MMATS_NEW_MASTER_KEY",
        now,
    ])


@creds_group.command("rotate-key")
@click.option("--new-key-env", "new_key_env", default=None, metavar="VAR",
              help="take the new master key from this environment variable "
                   f"(needed when the current one comes from {creds.ENV_VAR})")
def creds_rotate_key(new_key_env: str | None) -> None:
    """Re-encrypt every credential under a new master key, in one transaction.

    Run again after an interruption, it finishes the rotation (or says it is done).
    """
    current = creds.load_master_key()
    given: creds.MasterKey | None = None
    if new_key_env is not None:
        text = os.environ.get(new_key_env)
        if not text:
            raise MmatsError(f"--new-key-env {new_key_env}: environment variable "
                             f"{new_key_env} is not set")
        given = creds.parse_key(text, what=new_key_env, source=current.source)
    if current.source == "env":
        with connect(database_url(), autocommit=True) as conn:
            if given is None:
                click.echo(_env_rotation_instructions(current, creds.list_credentials(conn),
                                                      creds.stored_key_ids(conn)))
                return
            assert new_key_env is not None
            _rotate_in_env(conn, current, given, new_key_env)
        return
    with connect(database_url(), autocommit=True) as conn:
        _rotate_in_keyring(conn, current, given)


def _done(infos: Sequence[creds.CredentialInfo]) -> str:
    return f"{len(infos)} credential(s)" + (f" ({_by_account(infos)})" if infos else "")


def _rotate_in_env(conn: psycopg.Connection, current: creds.MasterKey, new: creds.MasterKey,
                   var: str) -> None:
    """Re-encrypt under `new` (from `var`); the user then moves MMATS_MASTER_KEY to it.

    Run again once the records are under `new` (an interrupted run, a lost output, or
    MMATS_MASTER_KEY already moved), it changes nothing and says what is left to do.
    """
    step3 = (f"now set {creds.ENV_VAR} to the value of {var} wherever MMATS runs (and unset "
             f"{var})")
    stored = creds.stored_key_ids(conn)
    if stored == [new.key_id]:
        left = (f"{creds.ENV_VAR} holds it already: unset {var}"
                if current.key_id == new.key_id else f"{step3}: the old key no longer "
                "decrypts them")
        click.echo(f"{_done(creds.list_credentials(conn))} are already encrypted under master "
                   f"key {new.key_id}: nothing to re-encrypt; {left}")
        return
    infos = creds.rotate_master_key(conn, current, new, also=(new,))
    click.echo(f"re-encrypted {_done(infos)} under master key {new.key_id} (was "
               f"{current.key_id}); {step3}: the old key no longer decrypts them")


_BACKUP = f"{creds.KEYRING_SERVICE}/{creds.KEYRING_PREVIOUS}"


def _rotate_in_keyring(conn: psycopg.Connection, current: creds.MasterKey,
                       given: creds.MasterKey | None) -> None:
    """Rotate with the keyring written before the commit, so that no crash loses a key.

    The key the records are under stays in the keyring until the commit has happened: as
    mmats/master-key-previous while mmats/master-key holds the new one. A run that finds the
    records under that backup (the previous run died between the keyring write and the
    commit) decrypts them with it and finishes the rotation, to the key the keyring already
    holds (or to `given`). A backup any record needs is never overwritten, and it is
    removed only after the commit, once no record needs it.
    """
    previous = creds.read_keyring_key(creds.KEYRING_PREVIOUS)
    if previous is not None and previous.key_id == current.key_id:
        previous = None  # a copy of the current key: not needed on its own
    stored = creds.stored_key_ids(conn)
    known = [current.key_id] + ([previous.key_id] if previous is not None else [])
    unknown = [k for k in stored if k not in known]
    if unknown:
        held = f"the OS keyring's key {current.key_id}" + (
            f" nor its backup {previous.key_id} ({_BACKUP})" if previous is not None else "")
        raise MmatsError(f"stored credentials are encrypted under master key {unknown[0]}, "
                         f"which is not {held}: nothing was changed; restore that key first "
                         f"({creds.ENV_VAR} or the keyring)")
    finishing = previous is not None and previous.key_id in stored
    if finishing:
        assert previous is not None
        old, new = previous, given or current
        if new.key_id != current.key_id and current.key_id in stored:
            raise MmatsError(f"stored credentials are under both {previous.key_id} "
                             f"({_BACKUP}) and {current.key_id}: run `mmats creds rotate-key` "
                             "without --new-key-env first, to finish the interrupted rotation")
    else:
        old, new = current, given or creds.generate_key()
    attempted = False
    try:
        with conn.transaction():
            # the records are locked and decrypted here: each is under `old` (or `current`)
            infos = creds.rotate_master_key(conn, old, new, also=(current,))
            if not finishing:
                # any backup there is needed by no record (none is under it): the key the
                # records are under takes its place before the keyring changes
                creds.save_keyring_key(old, creds.KEYRING_PREVIOUS)
            if new.key_id != current.key_id:
                attempted = True
                creds.save_keyring_key(new)
                back = creds.read_keyring_key()
                if back is None or back.key_id != new.key_id:
                    raise MmatsError("the OS keyring did not keep the new master key (read "
                                     "back failed): nothing was changed")
    except BaseException:
        _after_failed_rotation(conn, old, attempted)
        raise
    kept = _drop_backup_if_unneeded(conn)
    note = (f"; {_BACKUP} is kept: a credential is still encrypted under it (run "
            "`mmats creds rotate-key` again)") if kept else ""
    if finishing:
        click.echo(f"finished an interrupted rotation: re-encrypted {_done(infos)} under master "
                   f"key {new.key_id} (was {old.key_id}, kept as {_BACKUP} until now); the new "
                   f"key is the one in the OS keyring{note}")
    else:
        click.echo(f"re-encrypted {_done(infos)} under master key {new.key_id} (was "
                   f"{old.key_id}); the new key replaces the old one in the OS keyring{note}")


def _stored_key_ids(conn: psycopg.Connection) -> set[str] | None:
    """The key ids the records are under, from a fresh connection; None if it cannot say."""
    try:
        with connect(database_url(), autocommit=True) as fresh:
            return set(creds.stored_key_ids(fresh))
    except Exception:
        return None


def _after_failed_rotation(conn: psycopg.Connection, old: creds.MasterKey,
                           attempted: bool) -> None:
    """After a failed (rolled back, or perhaps committed) rotation: put `old` back as the
    keyring's key if the records are under it, then drop the backup if no record needs it.
    When the database cannot say (or the connection broke, perhaps in the COMMIT), both
    keys stay in the keyring for the next run."""
    if attempted:
        if conn.broken or conn.closed:
            return
        stored = _stored_key_ids(conn)
        if stored is None:
            return
        if stored <= {old.key_id}:
            with contextlib.suppress(MmatsError):  # if this fails, the backup is the way back
                creds.save_keyring_key(old)
    _drop_backup_if_unneeded(conn)


def _drop_backup_if_unneeded(conn: psycopg.Connection) -> bool:
    """Remove mmats/master-key-previous unless a record needs it; True if it is kept."""
    try:
        backup = creds.read_keyring_key(creds.KEYRING_PREVIOUS)
        if backup is None:
            return False
        current = creds.read_keyring_key()
    except MmatsError:
        return True
    if current is None or current.key_id != backup.key_id:
        stored = _stored_key_ids(conn)
        if stored is None or backup.key_id in stored:
            return True
    creds.delete_keyring_key(creds.KEYRING_PREVIOUS)
    return False


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
