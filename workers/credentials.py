"""Broker credentials, encrypted at rest with AES-256-GCM under one master key.

The database never sees a plaintext secret: `trading.set_credential` receives the record's
metadata (account, label, venue, endpoint, field names) plus `key_id`, a 96-bit random
nonce and the ciphertext of the secret fields serialised as JSON. The associated data
binds a ciphertext to its record (account, label, venue, endpoint), so a ciphertext copied
onto another record, or a record whose venue or endpoint was changed, fails to decrypt.

The master key (32 bytes) comes from ``MMATS_MASTER_KEY`` (base64 or hex) or else from the
OS keyring (service ``mmats``, username ``master-key``). `key_id` is a fingerprint of the
key (a truncated SHA-256, never the key), stored with each record so a wrong key is named
as such instead of failing as "tampered".

Every function takes the caller's psycopg connection and writes only through the SQL
functions (`trading.set_credential`, `trading.remove_credential`); each call is one
transaction (a savepoint inside the caller's own transaction, if one is open). Reading
secrets needs the owner or `mmats_router` (only they may read `runtime.credential_secrets`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import keyring
import keyring.errors
import psycopg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from db.errors import MmatsError
from workers.runtime import log

ENV_VAR = "MMATS_MASTER_KEY"
KEYRING_SERVICE = "mmats"
KEYRING_USERNAME = "master-key"
# kept only while `rotate-key` runs: if the process dies between writing the new key and
# the commit, the key the database still needs is here (and the next `rotate-key` reads it
# back to finish the rotation); it is removed only once no stored record needs it
KEYRING_PREVIOUS = "master-key-previous"
ENDPOINTS = ("paper", "testnet", "live")
Endpoint = Literal["paper", "testnet", "live"]
KeySource = Literal["env", "keyring", "given"]

_FIELD = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_NONCE_BYTES = 12
_MAX_CIPHERTEXT = 65536
_KEY_HINT = ("run `mmats creds init-key` (OS keyring) or set MMATS_MASTER_KEY to 32 random "
             "bytes, base64 or hex (e.g. `openssl rand -base64 32`)")

_log = log.get("credentials")


# --------------------------------------------------------------------------- master key
@dataclass(frozen=True)
class MasterKey:
    """A 32-byte AES-256 key and where it came from; `repr` never shows the key."""

    key: bytes = field(repr=False)
    source: KeySource = "given"

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise MmatsError(f"a master key is 32 bytes, got {len(self.key)}")
        log.register_secret(self.encoded())
        log.register_secret(self.key.hex())

    @property
    def key_id(self) -> str:
        """A short fingerprint that names the key in records, messages and logs."""
        return "mk-" + hashlib.sha256(b"mmats-master-key-id\0" + self.key).hexdigest()[:16]

    def encoded(self) -> str:
        """The key as standard base64 (how the keyring and MMATS_MASTER_KEY hold it)."""
        return base64.b64encode(self.key).decode("ascii")

    @property
    def where(self) -> str:
        return {"env": ENV_VAR, "keyring": "the OS keyring", "given": "the caller"}[self.source]


def generate_key() -> MasterKey:
    """A fresh random master key (not stored anywhere yet)."""
    return MasterKey(AESGCM.generate_key(bit_length=256), "given")


def parse_key(text: str, *, what: str = ENV_VAR, source: KeySource = "env") -> MasterKey:
    """A master key from its text: 64 hex digits or base64 of exactly 32 bytes.

    The message of a refusal says what was wrong, never the value.
    """
    value = text.strip()
    log.register_secret(value)
    raw: bytes | None = None
    if re.fullmatch(r"[0-9A-Fa-f]{64}", value):
        raw = bytes.fromhex(value)
    else:
        for altchars in (None, b"-_"):  # standard or URL-safe base64
            try:
                raw = base64.b64decode(value.encode("ascii"), altchars=altchars, validate=True)
                break
            except (binascii.Error, ValueError, UnicodeEncodeError):
                continue
    shape = "a 32-byte key as base64 (44 characters) or hex (64 characters)"
    if raw is None:
        raise MmatsError(f"{what} must be {shape}; got {len(value)} characters that are "
                         "neither")
    if len(raw) != 32:
        raise MmatsError(f"{what} must be {shape}; it decodes to {len(raw)} bytes")
    return MasterKey(raw, source)


def read_keyring_key(username: str = KEYRING_USERNAME) -> MasterKey | None:
    """The master key kept in the OS keyring, or None (no key, or no usable backend)."""
    try:
        stored = keyring.get_password(KEYRING_SERVICE, username)
    except keyring.errors.NoKeyringError:
        return None
    except keyring.errors.KeyringError as exc:  # locked, denied: say so, do not guess
        raise MmatsError(f"cannot read the master key from the OS keyring "
                         f"({type(exc).__name__}: {log.redact(str(exc))})") from None
    if not stored:
        return None
    return parse_key(stored, what=f"the keyring entry {KEYRING_SERVICE}/{username}",
                     source="keyring")


def save_keyring_key(key: MasterKey, username: str = KEYRING_USERNAME) -> None:
    """Store `key` in the OS keyring; MmatsError if no keyring backend works."""
    try:
        keyring.set_password(KEYRING_SERVICE, username, key.encoded())
    except keyring.errors.KeyringError as exc:
        raise MmatsError(f"cannot store the master key in the OS keyring "
                         f"({type(exc).__name__}: {log.redact(str(exc))})") from None


def delete_keyring_key(username: str) -> None:
    """Forget a keyring entry (nothing if it is not there)."""
    with contextlib.suppress(keyring.errors.KeyringError):
        keyring.delete_password(KEYRING_SERVICE, username)


def interrupted_rotation_hint(key_id: str | None) -> str:
    """A note for messages when `key_id` is the keyring's backup of an interrupted
    `rotate-key` (the records are still under it), else ''."""
    try:
        previous = read_keyring_key(KEYRING_PREVIOUS)
    except Exception:  # only a hint: a keyring that cannot say gives none
        return ""
    if previous is None or previous.key_id != key_id:
        return ""
    return (f" (the OS keyring keeps that key as {KEYRING_SERVICE}/{KEYRING_PREVIOUS}: an "
            "interrupted `mmats creds rotate-key`; run it again to finish it)")


def load_master_key(env: Mapping[str, str] | None = None) -> MasterKey:
    """The master key: MMATS_MASTER_KEY if set, else the OS keyring, else MmatsError."""
    env = os.environ if env is None else env
    text = env.get(ENV_VAR)
    if text:
        return parse_key(text)
    key = read_keyring_key()
    if key is None:
        raise MmatsError(f"no master key for credentials: {_KEY_HINT}")
    return key


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CredentialInfo:
    """What a credential is (never what it holds)."""

    account: str
    environment: str
    label: str
    venue: str
    endpoint: str
    fields: tuple[str, ...]
    key_id: str | None
    created_at: datetime
    updated_at: datetime
    rotated_at: datetime | None


def associated_data(account: str, label: str, venue: str, endpoint: str) -> bytes:
    """The record's identity, authenticated with its ciphertext (names cannot hold ':')."""
    return f"mmats-credential:v1:{account}:{label}:{venue}:{endpoint}".encode()


def check_field_name(name: object) -> str:
    """`name` if it may name a secret field (what trading.credentials.fields accepts)."""
    if not isinstance(name, str) or not _FIELD.match(name):
        raise MmatsError(f"field name {name!r} must be 1-32 characters: a-z, 0-9 and _, "
                         "starting with a letter")
    return name


def _plaintext(secret: Mapping[str, str]) -> tuple[bytes, list[str]]:
    if not secret:
        raise MmatsError("a credential needs at least one field (e.g. api_key, secret)")
    for name, value in secret.items():
        check_field_name(name)
        if not isinstance(value, str) or not value:
            raise MmatsError(f"field {name} needs a non-empty text value")
        log.register_secret(value)
    return json.dumps(dict(secret), sort_keys=True).encode(), sorted(secret)


def encrypt(key: MasterKey, secret: Mapping[str, str], account: str, label: str, venue: str,
            endpoint: str) -> tuple[bytes, bytes]:
    """(nonce, ciphertext) of `secret` under `key`, bound to the record's identity."""
    plain, _ = _plaintext(secret)
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(key.key).encrypt(nonce, plain, associated_data(account, label, venue,
                                                                   endpoint))
    if len(sealed) > _MAX_CIPHERTEXT:
        raise MmatsError(f"a credential's secret may be at most {_MAX_CIPHERTEXT - 16} bytes")
    return nonce, sealed


def decrypt(key: MasterKey, key_id: str, nonce: bytes, ciphertext: bytes, account: str,
            label: str, venue: str, endpoint: str) -> dict[str, str]:
    """The secret fields of one record; MmatsError for a wrong key or a tampered record."""
    what = f"credential {label} of account {account}"
    if key_id != key.key_id:
        raise MmatsError(f"{what} is encrypted under master key {key_id}, but the master key "
                         f"from {key.where} is {key.key_id}{interrupted_rotation_hint(key_id)}")
    try:
        plain = AESGCM(key.key).decrypt(bytes(nonce), bytes(ciphertext),
                                        associated_data(account, label, venue, endpoint))
    except (InvalidTag, ValueError):
        raise MmatsError(f"cannot decrypt {what}: wrong master key or tampered record") from None
    values = json.loads(plain)
    if not isinstance(values, dict):
        raise MmatsError(f"cannot decrypt {what}: wrong master key or tampered record")
    out = {str(k): str(v) for k, v in values.items()}
    for value in out.values():
        log.register_secret(value)
    return out


_SELECT = """
SELECT a.name, a.environment::text, c.label, c.venue, c.endpoint, c.fields, s.key_id,
       c.created_at, c.updated_at, c.rotated_at
FROM trading.credentials c
JOIN trading.accounts a USING (account_id)
LEFT JOIN runtime.credential_secrets s USING (credential_id)
"""


def resolve_account(conn: psycopg.Connection, ref: str) -> tuple[str, str]:
    """(name, environment) of an account given by name or number."""
    row = conn.execute("SELECT name, environment::text FROM trading.accounts WHERE name = %s",
                       (ref,)).fetchone()
    if row is None and re.fullmatch(r"\d{1,18}", ref):
        row = conn.execute("SELECT name, environment::text FROM trading.accounts "
                           "WHERE account_id = %s", (int(ref),)).fetchone()
    if row is None:
        raise MmatsError(f"unknown account {ref!r} (create it with `mmats account create`)")
    return str(row[0]), str(row[1])


def _info(row: Sequence[Any]) -> CredentialInfo:
    return CredentialInfo(account=row[0], environment=row[1], label=row[2], venue=row[3],
                          endpoint=row[4], fields=tuple(row[5]), key_id=row[6],
                          created_at=row[7], updated_at=row[8], rotated_at=row[9])


def list_credentials(conn: psycopg.Connection, account: str | None = None
                     ) -> list[CredentialInfo]:
    """Every credential's metadata (of one account, if given), by account and label."""
    if account is None:
        rows = conn.execute(_SELECT + "ORDER BY a.name, c.label").fetchall()
    else:
        name, _ = resolve_account(conn, account)
        rows = conn.execute(_SELECT + "WHERE a.name = %s ORDER BY c.label", (name,)).fetchall()
    return [_info(r) for r in rows]


def get_info(conn: psycopg.Connection, account: str, label: str) -> CredentialInfo | None:
    """One credential's metadata, or None."""
    name, _ = resolve_account(conn, account)
    row = conn.execute(_SELECT + "WHERE a.name = %s AND c.label = %s", (name, label)).fetchone()
    return _info(row) if row else None


def stored_key_ids(conn: psycopg.Connection) -> list[str]:
    """The master keys (key_id) the stored secrets are encrypted under (normally one)."""
    rows = conn.execute("SELECT DISTINCT key_id FROM runtime.credential_secrets ORDER BY 1")
    return [str(r[0]) for r in rows.fetchall()]


def _check_one_key(conn: psycopg.Connection, key: MasterKey) -> None:
    # every record shares one master key: a second key would make half the secrets
    # unreadable to whoever holds the first
    others = [k for k in stored_key_ids(conn) if k != key.key_id]
    if others:
        hint = interrupted_rotation_hint(others[0])
        raise MmatsError(f"stored credentials are encrypted under master key {others[0]}, but "
                         f"the key from {key.where} is {key.key_id}"
                         + (hint or ": use that key (or `mmats creds rotate-key` with it)"))


def _write(conn: psycopg.Connection, key: MasterKey, account: str, label: str, venue: str,
           endpoint: str, secret: Mapping[str, str]) -> None:
    _, fields = _plaintext(secret)
    nonce, sealed = encrypt(key, secret, account, label, venue, endpoint)
    conn.execute("SELECT trading.set_credential(%s, %s, %s, %s, %s, %s, %s, %s)",
                 (account, label, venue, endpoint, fields, key.key_id, nonce, sealed))


def store(conn: psycopg.Connection, key: MasterKey, account: str, label: str, venue: str,
          endpoint: str, secret: Mapping[str, str]) -> CredentialInfo:
    """Store a new credential (an existing label is refused: use `rotate_secret`).

    The database refuses live keys on a paper account, paper or testnet keys on a live
    account, and any keys on a backtest account.
    """
    if endpoint not in ENDPOINTS:
        raise MmatsError(f"endpoint must be paper, testnet or live, got {endpoint!r}")
    with conn.transaction():
        name, _ = resolve_account(conn, account)
        existing = get_info(conn, name, label)
        if existing is not None:
            raise MmatsError(f"account {name} ({existing.environment}) already has credential "
                             f"{label}: use `mmats creds rotate {name} {label}` for new values")
        _check_one_key(conn, key)
        _write(conn, key, name, label, venue, endpoint, secret)
        info = get_info(conn, name, label)
    assert info is not None
    log.event(_log, "credential stored", account=name, environment=info.environment,
              label=label, venue=venue, endpoint=endpoint, fields=list(info.fields),
              key_id=key.key_id)
    return info


def rotate_secret(conn: psycopg.Connection, key: MasterKey, account: str, label: str,
                  secret: Mapping[str, str], *, replace: bool = False) -> CredentialInfo:
    """New values for one credential (same record, same venue and endpoint; rotated_at is
    set).

    The fields in `secret` get their new values and the credential's other fields keep
    theirs (decrypted under `key`); with `replace`, `secret` becomes the whole secret and
    the fields it does not name are removed.
    """
    with conn.transaction():
        name, environment = resolve_account(conn, account)
        existing = get_info(conn, name, label)
        if existing is None:
            raise MmatsError(f"account {name} ({environment}) has no credential {label!r}")
        _check_one_key(conn, key)
        values = dict(secret)
        if not replace and set(existing.fields) - set(secret):
            row = conn.execute(_SECRET + "WHERE a.name = %s AND c.label = %s FOR UPDATE OF c, s",
                               (name, label)).fetchone()
            if row is None:
                raise MmatsError(f"credential {label} of account {name} ({environment}) has no "
                                 "stored secret to keep fields from: give every field, or "
                                 "replace the whole secret")
            acc, lab, venue, endpoint, key_id, nonce, sealed = row
            values = {**decrypt(key, key_id, nonce, sealed, acc, lab, venue, endpoint),
                      **secret}
        _write(conn, key, name, label, existing.venue, existing.endpoint, values)
        info = get_info(conn, name, label)
    assert info is not None
    log.event(_log, "credential rotated", account=name, environment=environment, label=label,
              fields=list(info.fields), changed=sorted(secret), key_id=key.key_id)
    return info


_SECRET = """
SELECT a.name, c.label, c.venue, c.endpoint, s.key_id, s.nonce, s.ciphertext
FROM trading.credentials c
JOIN trading.accounts a USING (account_id)
JOIN runtime.credential_secrets s USING (credential_id)
"""


def load(conn: psycopg.Connection, key: MasterKey, account: str, label: str) -> dict[str, str]:
    """The secret fields of one credential (each value registered for log redaction)."""
    name, environment = resolve_account(conn, account)
    row = conn.execute(_SECRET + "WHERE a.name = %s AND c.label = %s", (name, label)).fetchone()
    if row is None:
        raise MmatsError(f"account {name} ({environment}) has no credential {label!r}")
    acc, lab, venue, endpoint, key_id, nonce, sealed = row
    return decrypt(key, key_id, nonce, sealed, acc, lab, venue, endpoint)


def remove(conn: psycopg.Connection, account: str, label: str) -> CredentialInfo:
    """Delete a credential and its secret; returns what it was."""
    with conn.transaction():
        name, environment = resolve_account(conn, account)
        info = get_info(conn, name, label)
        if info is None:
            raise MmatsError(f"account {name} ({environment}) has no credential {label!r}")
        conn.execute("SELECT trading.remove_credential(%s, %s)", (name, label))
    log.event(_log, "credential removed", account=name, environment=environment, label=label)
    return info


def rotate_master_key(conn: psycopg.Connection, old: MasterKey, new: MasterKey, *,
                      also: Sequence[MasterKey] = ()) -> list[CredentialInfo]:
    """Re-encrypt every credential under `new`, in one transaction.

    Each record is decrypted with `old` (or with the key of `also` its key_id names: an
    interrupted rotation being finished) and stored again through `trading.set_credential`;
    any failure (a record under another key, a tampered record, a refused write) rolls
    every record back. The records are locked first, so no credential stored meanwhile is
    left under the old key.
    """
    if old.key_id == new.key_id:
        raise MmatsError("the new master key is the same as the current one")
    keys = {k.key_id: k for k in also}
    keys[old.key_id] = old
    with conn.transaction():
        rows = conn.execute(_SECRET + "ORDER BY c.credential_id FOR UPDATE OF c, s").fetchall()
        for acc, label, venue, endpoint, key_id, nonce, sealed in rows:
            secret = decrypt(keys.get(key_id, old), key_id, nonce, sealed, acc, label, venue,
                             endpoint)
            _write(conn, new, acc, label, venue, endpoint, secret)
        infos = list_credentials(conn)
    log.event(_log, "master key rotated", old_key_id=old.key_id, new_key_id=new.key_id,
              credentials=len(rows))
    return infos
