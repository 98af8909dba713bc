"""Encrypted broker credentials (workers.credentials) and `mmats creds`, on a real database.

The database holds only ciphertext; these tests tamper with it directly (as the superuser)
to prove that a changed byte, a ciphertext moved to another record or a wrong key is
refused, and that a master-key rotation is all or nothing.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import keyring
import keyring.backend
import keyring.backends.fail
import keyring.errors
import psycopg
import pytest
from click.testing import CliRunner, Result

from api.cli_creds import creds_group
from db.errors import MmatsError
from workers import credentials as creds
from workers.runtime import log

SECRET = {"api_key": "AKIA-test-4f9c2e", "secret": "s3cr3t-Zq8Lw0pX", "passphrase": "pp-7781"}


# ---------------------------------------------------------------------------- helpers
class MemoryKeyring(keyring.backend.KeyringBackend):
    """An OS keyring stand-in (the test machine has no keyring service)."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.entries[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.entries.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("not found")


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(creds.ENV_VAR, raising=False)


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def no_keyring() -> Iterator[None]:
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())
    yield
    keyring.set_keyring(previous)


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The workers' JSON log, captured; the `mmats` logger is put back as it was after."""
    root = logging.getLogger("mmats")
    saved = (list(root.handlers), root.propagate, root.level)
    stream = io.StringIO()
    log.setup("test", level="DEBUG", stream=stream)
    yield stream
    root.handlers[:], root.propagate = saved[0], saved[1]
    root.setLevel(saved[2])


@pytest.fixture
def accounts(conn: psycopg.Connection) -> None:
    for name, env in (("alpha", "paper"), ("beta", "paper"), ("omega", "live"),
                      ("bt", "backtest")):
        conn.execute("SELECT trading.create_account(%s, %s)", (name, env))


@pytest.fixture
def key() -> creds.MasterKey:
    return creds.generate_key()


def secret_rows(conn: psycopg.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT s.credential_id, s.key_id, s.nonce, s.ciphertext, c.fields, c.rotated_at "
        "FROM runtime.credential_secrets s JOIN trading.credentials c USING (credential_id) "
        "ORDER BY 1").fetchall()


def invoke(db_url: str, *args: str, input: str | None = None,
           env: dict[str, str | None] | None = None) -> Result:
    runner = CliRunner()
    return runner.invoke(creds_group, list(args), input=input,
                         env={"MMATS_DATABASE_URL": db_url, **(env or {})})


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


# ---------------------------------------------------------------------------- encryption
def test_round_trip_stores_only_ciphertext(conn: psycopg.Connection, accounts: None,
                                           key: creds.MasterKey) -> None:
    info = creds.store(conn, key, "alpha", "binance-main", "binance", "testnet", SECRET)
    assert (info.account, info.environment, info.endpoint) == ("alpha", "paper", "testnet")
    assert info.fields == ("api_key", "passphrase", "secret")
    assert info.key_id == key.key_id and info.rotated_at is None
    assert creds.load(conn, key, "alpha", "binance-main") == SECRET
    [(_, key_id, nonce, sealed, fields, _)] = secret_rows(conn)
    assert key_id == key.key_id and len(nonce) == 12
    assert fields == ["api_key", "passphrase", "secret"]
    for value in SECRET.values():
        assert value.encode() not in bytes(sealed)
    assert key.encoded() not in key.key_id and key.key.hex()[:16] not in key.key_id
    # the same secret stored twice gets a fresh nonce
    creds.store(conn, key, "beta", "binance-main", "binance", "testnet", SECRET)
    nonces = {bytes(r[2]) for r in secret_rows(conn)}
    assert len(nonces) == 2


@pytest.mark.parametrize("column", ["ciphertext", "nonce"])
def test_tampered_record_is_refused(conn: psycopg.Connection, accounts: None,
                                    key: creds.MasterKey, column: str) -> None:
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    # flip every bit of one byte (an overwrite could write the value already there)
    conn.execute(f"UPDATE runtime.credential_secrets SET {column} = "
                 f"set_byte({column}, 2, get_byte({column}, 2) # 255)")
    with pytest.raises(MmatsError, match=r"^cannot decrypt credential main of account alpha: "
                                         r"wrong master key or tampered record$"):
        creds.load(conn, key, "alpha", "main")


def test_ciphertext_moved_to_another_record_is_refused(conn: psycopg.Connection,
                                                       accounts: None,
                                                       key: creds.MasterKey) -> None:
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    creds.store(conn, key, "beta", "main", "binance", "testnet", {"api_key": "beta-key-0001"})
    # beta's record now carries alpha's (valid) ciphertext: the associated data differs
    conn.execute("""
        UPDATE runtime.credential_secrets t SET nonce = s.nonce, ciphertext = s.ciphertext
        FROM runtime.credential_secrets s, trading.credentials cs, trading.credentials ct,
             trading.accounts a, trading.accounts b
        WHERE cs.credential_id = s.credential_id AND cs.account_id = a.account_id
          AND a.name = 'alpha' AND ct.credential_id = t.credential_id
          AND ct.account_id = b.account_id AND b.name = 'beta'""")
    assert creds.load(conn, key, "alpha", "main") == SECRET
    with pytest.raises(MmatsError, match="cannot decrypt credential main of account beta"):
        creds.load(conn, key, "beta", "main")


def test_changed_metadata_is_refused(conn: psycopg.Connection, accounts: None,
                                     key: creds.MasterKey) -> None:
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    conn.execute("UPDATE trading.credentials SET venue = 'kraken'")
    with pytest.raises(MmatsError, match="tampered record"):
        creds.load(conn, key, "alpha", "main")


def test_wrong_master_key_is_named(conn: psycopg.Connection, accounts: None,
                                   key: creds.MasterKey) -> None:
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    other = creds.generate_key()
    with pytest.raises(MmatsError) as caught:
        creds.load(conn, other, "alpha", "main")
    message = str(caught.value)
    assert f"encrypted under master key {key.key_id}" in message
    assert f"is {other.key_id}" in message and "\n" not in message
    # a key_id forged to match the wrong key still cannot decrypt
    conn.execute("UPDATE runtime.credential_secrets SET key_id = %s", (other.key_id,))
    with pytest.raises(MmatsError, match="wrong master key or tampered record"):
        creds.load(conn, other, "alpha", "main")


def test_store_refuses_a_second_master_key(conn: psycopg.Connection, accounts: None,
                                           key: creds.MasterKey) -> None:
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    with pytest.raises(MmatsError, match=f"encrypted under master key {key.key_id}"):
        creds.store(conn, creds.generate_key(), "beta", "main", "binance", "testnet", SECRET)
    assert len(secret_rows(conn)) == 1


# ---------------------------------------------------------------------------- master key
def test_master_key_from_env_base64_or_hex() -> None:
    raw = bytes(range(32))
    from_b64 = creds.load_master_key({creds.ENV_VAR: base64.b64encode(raw).decode()})
    from_hex = creds.load_master_key({creds.ENV_VAR: raw.hex()})
    from_url = creds.load_master_key({creds.ENV_VAR: base64.urlsafe_b64encode(raw).decode()})
    assert from_b64.key == from_hex.key == from_url.key == raw
    assert from_b64.source == "env" and from_b64.key_id == from_hex.key_id
    assert raw.hex() not in repr(from_b64)


@pytest.mark.parametrize("value,why", [
    ("hunter2-hunter2", "characters that are neither"),
    (base64.b64encode(bytes(16)).decode(), "decodes to 16 bytes"),
    ("ab" * 31 + "a", "characters that are neither"),
    ("zz" * 32, "decodes to 48 bytes"),  # valid base64, but 48 bytes
    ("ab" * 32 + "!", "characters that are neither"),
])
def test_malformed_env_key_is_refused(value: str, why: str) -> None:
    with pytest.raises(MmatsError) as caught:
        creds.load_master_key({creds.ENV_VAR: value})
    message = str(caught.value)
    assert message.startswith("MMATS_MASTER_KEY must be a 32-byte key as base64")
    assert why in message and value not in message


def test_no_master_key_anywhere(no_keyring: None) -> None:
    with pytest.raises(MmatsError) as caught:
        creds.load_master_key({})
    assert "mmats creds init-key" in str(caught.value)
    assert "MMATS_MASTER_KEY" in str(caught.value)


def test_master_key_from_keyring(memory_keyring: MemoryKeyring) -> None:
    key = creds.generate_key()
    memory_keyring.set_password("mmats", "master-key", key.encoded())
    loaded = creds.load_master_key({})
    assert loaded.key == key.key and loaded.source == "keyring"
    env_key = creds.generate_key()  # the environment wins over the keyring
    assert creds.load_master_key({creds.ENV_VAR: env_key.encoded()}).key == env_key.key


# ---------------------------------------------------------------------------- database rules
@pytest.mark.parametrize("account,endpoint,fragment", [
    ("alpha", "live", "is a paper account: live keys are refused"),
    ("omega", "testnet", "is live: it takes live keys only"),
    ("bt", "paper", "is a backtest account"),
])
def test_database_refuses_keys_for_the_wrong_environment(
        conn: psycopg.Connection, accounts: None, key: creds.MasterKey, account: str,
        endpoint: str, fragment: str) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=fragment):
        creds.store(conn, key, account, "main", "binance", endpoint, SECRET)
    assert secret_rows(conn) == []
    assert conn.execute("SELECT count(*) FROM trading.credentials").fetchone() == (0,)


def test_live_keys_on_a_live_account(conn: psycopg.Connection, accounts: None,
                                     key: creds.MasterKey) -> None:
    info = creds.store(conn, key, "omega", "main", "binance", "live", SECRET)
    assert (info.environment, info.endpoint) == ("live", "live")


def test_rotation_keeps_the_record_and_sets_rotated_at(conn: psycopg.Connection,
                                                        accounts: None,
                                                        key: creds.MasterKey) -> None:
    first = creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    [(cid, _, nonce, _, _, rotated)] = secret_rows(conn)
    assert rotated is None
    new = {"api_key": "AKIA-rotated-0002", "secret": "rotated-secret-0002"}
    after = creds.rotate_secret(conn, key, "alpha", "main", new, replace=True)
    [(cid2, _, nonce2, _, fields, rotated2)] = secret_rows(conn)
    assert cid2 == cid and rotated2 is not None and nonce2 != nonce
    assert fields == ["api_key", "secret"] and after.fields == ("api_key", "secret")
    assert after.created_at == first.created_at and after.updated_at >= first.updated_at
    assert creds.load(conn, key, "alpha", "main") == new
    events = conn.execute("SELECT event_type FROM audit.events WHERE entity = "
                          "'trading.credentials' ORDER BY event_id").fetchall()
    assert events == [("credential.set",), ("credential.rotated",)]


def test_store_and_rotate_refuse_the_wrong_existence(conn: psycopg.Connection, accounts: None,
                                                     key: creds.MasterKey) -> None:
    with pytest.raises(MmatsError, match="account alpha \\(paper\\) has no credential 'main'"):
        creds.rotate_secret(conn, key, "alpha", "main", SECRET)
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    with pytest.raises(MmatsError, match="already has credential main: use `mmats creds "
                                         "rotate alpha main`"):
        creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    with pytest.raises(MmatsError, match="unknown account 'nobody'"):
        creds.store(conn, key, "nobody", "main", "binance", "testnet", SECRET)
    with pytest.raises(MmatsError, match="field name 'API-KEY'"):
        creds.store(conn, key, "beta", "main", "binance", "testnet", {"API-KEY": "x" * 8})
    creds.remove(conn, "alpha", "main")
    assert creds.list_credentials(conn) == []
    with pytest.raises(MmatsError, match="has no credential 'main'"):
        creds.remove(conn, "alpha", "main")


# ---------------------------------------------------------------------------- master-key rotation
def store_three(conn: psycopg.Connection, key: creds.MasterKey) -> None:
    creds.store(conn, key, "alpha", "a1", "binance", "testnet", SECRET)
    creds.store(conn, key, "alpha", "a2", "kraken", "paper", {"api_key": "kraken-key-0001"})
    creds.store(conn, key, "omega", "o1", "binance", "live", {"api_key": "live-key-00001",
                                                              "secret": "live-secret-0001"})


def test_rotate_master_key_re_encrypts_everything(conn: psycopg.Connection, accounts: None,
                                                  key: creds.MasterKey) -> None:
    store_three(conn, key)
    before = {r[0]: r for r in secret_rows(conn)}
    plain = {lab: creds.load(conn, key, acc, lab)
             for acc, lab in (("alpha", "a1"), ("alpha", "a2"), ("omega", "o1"))}
    new = creds.generate_key()
    infos = creds.rotate_master_key(conn, key, new)
    assert {i.key_id for i in infos} == {new.key_id} and len(infos) == 3
    after = secret_rows(conn)
    assert {r[0] for r in after} == set(before)  # the same records
    for row in after:
        assert row[1] == new.key_id and bytes(row[2]) != bytes(before[row[0]][2])
    for acc, lab in (("alpha", "a1"), ("alpha", "a2"), ("omega", "o1")):
        assert creds.load(conn, new, acc, lab) == plain[lab]
        with pytest.raises(MmatsError, match=f"encrypted under master key {new.key_id}"):
            creds.load(conn, key, acc, lab)
    with pytest.raises(MmatsError, match="same as the current one"):
        creds.rotate_master_key(conn, new, new)


def test_rotate_master_key_failing_midway_changes_nothing(conn: psycopg.Connection,
                                                          accounts: None,
                                                          key: creds.MasterKey) -> None:
    store_three(conn, key)
    # the last record cannot be decrypted: the first two have been rewritten by then
    conn.execute("UPDATE runtime.credential_secrets SET ciphertext = set_byte(ciphertext, 0, "
                 "get_byte(ciphertext, 0) # 255) WHERE credential_id = "
                 "(SELECT max(credential_id) FROM runtime.credential_secrets)")
    before = secret_rows(conn)
    with pytest.raises(MmatsError, match="cannot decrypt credential o1 of account omega"):
        creds.rotate_master_key(conn, key, creds.generate_key())
    assert secret_rows(conn) == before
    assert creds.load(conn, key, "alpha", "a1") == SECRET


def test_rotate_master_key_refused_write_changes_nothing(conn: psycopg.Connection,
                                                         accounts: None,
                                                         key: creds.MasterKey) -> None:
    store_three(conn, key)
    # the database refuses the second record's write (after the first one succeeded)
    conn.execute("""
        CREATE FUNCTION pg_temp.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.credential_id = (SELECT min(credential_id) + 1
                                    FROM runtime.credential_secrets) THEN
                RAISE EXCEPTION 'disk full (simulated)';
            END IF;
            RETURN NEW;
        END $$""")
    conn.execute("CREATE TRIGGER refuse BEFORE UPDATE ON runtime.credential_secrets "
                 "FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse()")
    before = secret_rows(conn)
    audit_before = conn.execute("SELECT count(*) FROM audit.events").fetchone()
    with pytest.raises(psycopg.errors.RaiseException, match="disk full"):
        creds.rotate_master_key(conn, key, creds.generate_key())
    assert secret_rows(conn) == before
    assert conn.execute("SELECT count(*) FROM audit.events").fetchone() == audit_before
    assert creds.load(conn, key, "omega", "o1")["api_key"] == "live-key-00001"


# ---------------------------------------------------------------------------- logs
def test_secrets_never_reach_the_logs(conn: psycopg.Connection, accounts: None,
                                      key: creds.MasterKey, json_log: io.StringIO,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    creds.list_credentials(conn)
    # a fresh process knows no secret until it loads one: load must register them
    monkeypatch.setattr(log, "_secrets", set())
    values = creds.load(conn, key, "alpha", "main")
    logger = log.get("broker")
    logger.error("auth failed for key %s with secret %s", values["api_key"], values["secret"])
    log.event(logger, "retrying", note=f"passphrase {values['passphrase']}")
    key_loaded = creds.parse_key(key.encoded())
    logger.warning("key is %s", key_loaded.encoded())
    text = json_log.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert any(line["msg"] == "credential stored" for line in lines)
    assert "auth failed for key *** with secret ***" in text
    for value in [*SECRET.values(), key.encoded()]:
        assert value not in text


# ---------------------------------------------------------------------------- the CLI
def test_cli_set_list_rm(db_url: str, conn: psycopg.Connection, accounts: None,
                         key: creds.MasterKey) -> None:
    env: dict[str, str | None] = {creds.ENV_VAR: key.encoded()}
    out = ok(invoke(db_url, "set", "alpha", "binance-main", "--venue", "binance",
                    "--endpoint", "testnet", "--field", "api_key", "--field", "secret",
                    input=f"{SECRET['api_key']}\n{SECRET['secret']}\n", env=env))
    assert "credential binance-main stored for account alpha (paper)" in out
    assert f"master key {key.key_id}" in out
    assert creds.load(conn, key, "alpha", "binance-main") == {
        "api_key": SECRET["api_key"], "secret": SECRET["secret"]}
    listed = ok(invoke(db_url, "list", env=env))
    lines = listed.splitlines()
    assert lines[0].split() == ["account", "environment", "label", "venue", "endpoint",
                                "fields", "key_id", "updated", "(UTC)", "rotated", "(UTC)"]
    assert lines[2].split()[:7] == ["alpha", "paper", "binance-main", "binance", "testnet",
                                    "api_key,secret", key.key_id]
    assert "no credentials for account beta (paper)" in ok(
        invoke(db_url, "list", "--account", "beta", env=env))
    for value in SECRET.values():
        assert value not in out and value not in listed
    removed = ok(invoke(db_url, "rm", "alpha", "binance-main", env=env))
    assert removed.startswith("credential binance-main of account alpha (paper) removed")
    assert "no credentials" in ok(invoke(db_url, "list", env=env))


def test_cli_from_env_and_stdin_json(db_url: str, conn: psycopg.Connection, accounts: None,
                                     key: creds.MasterKey) -> None:
    env: dict[str, str | None] = {creds.ENV_VAR: key.encoded(), "X_KEY": "env-key-123456",
                                  "X_SECRET": "env-secret-654321"}
    out = ok(invoke(db_url, "set", "omega", "live-1", "--venue", "alpaca", "--endpoint", "live",
                    "--from-env", "api_key=X_KEY", "--from-env", "secret=X_SECRET", env=env))
    assert "account omega (live)" in out and "env-secret-654321" not in out
    assert creds.load(conn, key, "omega", "live-1") == {"api_key": "env-key-123456",
                                                        "secret": "env-secret-654321"}
    out = ok(invoke(db_url, "set", "beta", "k", "--venue", "kraken", "--endpoint", "paper",
                    "--stdin-json", input=json.dumps({"api_key": "json-key-7777"}), env=env))
    assert "account beta (paper)" in out
    assert creds.load(conn, key, "beta", "k") == {"api_key": "json-key-7777"}
    missing = invoke(db_url, "set", "alpha", "m", "--venue", "binance", "--endpoint", "testnet",
                     "--from-env", "api_key=NOT_SET_ANYWHERE", env=env)
    assert isinstance(missing.exception, MmatsError)
    assert "environment variable NOT_SET_ANYWHERE is not set" in str(missing.exception)
    bad = invoke(db_url, "set", "alpha", "m", "--venue", "binance", "--endpoint", "testnet",
                 "--stdin-json", input='{"api_key": "secret-not-echoed"', env=env)
    assert isinstance(bad.exception, MmatsError)
    assert "not valid JSON" in str(bad.exception)
    assert "secret-not-echoed" not in str(bad.exception)


def test_cli_refusals(db_url: str, conn: psycopg.Connection, accounts: None,
                      key: creds.MasterKey) -> None:
    env: dict[str, str | None] = {creds.ENV_VAR: key.encoded()}
    live_on_paper = invoke(db_url, "set", "alpha", "main", "--venue", "binance",
                           "--endpoint", "live", "--field", "api_key", input="k-0001\n",
                           env=env)
    assert isinstance(live_on_paper.exception, psycopg.errors.InvalidParameterValue)
    assert "live keys are refused" in str(live_on_paper.exception)
    no_key = invoke(db_url, "set", "alpha", "main", "--venue", "binance", "--endpoint",
                    "testnet", "--field", "api_key", input="k-0001\n",
                    env={creds.ENV_VAR: "not-a-key"})
    assert isinstance(no_key.exception, MmatsError)
    assert str(no_key.exception).startswith("MMATS_MASTER_KEY must be a 32-byte key")
    # stdin at its end: "aborted", exit 130, as if Ctrl-C had been pressed
    ended = invoke(db_url, "set", "alpha", "main", "--venue", "binance", "--endpoint",
                   "testnet", "--field", "api_key", "--field", "secret", input="k-0001\n",
                   env=env)
    assert isinstance(ended.exception, MmatsError), (ended.output, ended.exception)
    assert str(ended.exception).startswith(
        "--field secret: standard input ended before its value")
    empty = invoke(db_url, "set", "alpha", "main", "--venue", "binance", "--endpoint",
                   "testnet", "--from-env", "api_key=MMATS_TEST_EMPTY", env={
                       **env, "MMATS_TEST_EMPTY": ""})
    assert str(empty.exception) == ("--from-env api_key=MMATS_TEST_EMPTY: environment "
                                    "variable MMATS_TEST_EMPTY is empty")
    assert secret_rows(conn) == []


def test_cli_rotate_prompts_for_the_current_fields(db_url: str, conn: psycopg.Connection,
                                                   accounts: None,
                                                   key: creds.MasterKey) -> None:
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    env: dict[str, str | None] = {creds.ENV_VAR: key.encoded()}
    out = ok(invoke(db_url, "rotate", "alpha", "main", input="n-key-1\nn-pass-1\nn-secret-1\n",
                    env=env))
    assert "api_key" in out and "n-secret-1" not in out  # prompted, not echoed
    assert "credential main of account alpha (paper) rotated" in out
    assert creds.load(conn, key, "alpha", "main") == {"api_key": "n-key-1",
                                                      "passphrase": "n-pass-1",
                                                      "secret": "n-secret-1"}
    [row] = ok(invoke(db_url, "list", env=env)).splitlines()[2:]
    assert len(row.split()) == 11  # the rotated column is filled in (date and time)


def test_cli_rotate_key_in_the_keyring(db_url: str, conn: psycopg.Connection, accounts: None,
                                       memory_keyring: MemoryKeyring) -> None:
    ok(invoke(db_url, "init-key"))
    old = creds.read_keyring_key()
    assert old is not None
    store_three(conn, old)
    out = ok(invoke(db_url, "rotate-key"))
    new = creds.read_keyring_key()
    assert new is not None and new.key_id != old.key_id
    assert f"re-encrypted 3 credential(s) (alpha (paper): 2, omega (live): 1) under master " \
           f"key {new.key_id} (was {old.key_id})" in out
    assert creds.load(conn, new, "omega", "o1")["secret"] == "live-secret-0001"
    with pytest.raises(MmatsError, match="encrypted under master key"):
        creds.load(conn, old, "omega", "o1")
    assert ("mmats", creds.KEYRING_PREVIOUS) not in memory_keyring.entries
    assert old.encoded() not in out and new.encoded() not in out


def test_cli_rotate_key_keeps_the_old_key_when_the_keyring_fails(
        db_url: str, conn: psycopg.Connection, accounts: None,
        memory_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    ok(invoke(db_url, "init-key"))
    old = creds.read_keyring_key()
    assert old is not None
    store_three(conn, old)
    before = secret_rows(conn)
    real_set = memory_keyring.set_password

    def refuse_new_key(service: str, username: str, password: str) -> None:
        if username == creds.KEYRING_USERNAME:
            raise keyring.errors.PasswordSetError("locked keyring")
        real_set(service, username, password)

    monkeypatch.setattr(memory_keyring, "set_password", refuse_new_key)
    result = invoke(db_url, "rotate-key")
    assert isinstance(result.exception, MmatsError)
    assert "cannot store the master key in the OS keyring" in str(result.exception)
    assert secret_rows(conn) == before
    current = creds.read_keyring_key()
    assert current is not None and current.key_id == old.key_id
    assert ("mmats", creds.KEYRING_PREVIOUS) not in memory_keyring.entries
    assert creds.load(conn, old, "alpha", "a1") == SECRET


def test_cli_rotate_key_from_the_environment(db_url: str, conn: psycopg.Connection,
                                             accounts: None, key: creds.MasterKey) -> None:
    store_three(conn, key)
    before = secret_rows(conn)
    env: dict[str, str | None] = {creds.ENV_VAR: key.encoded()}
    told = ok(invoke(db_url, "rotate-key", env=env))
    assert "comes from MMATS_MASTER_KEY, which mmats cannot rewrite; nothing was changed" in told
    assert "--new-key-env MMATS_NEW_MASTER_KEY" in told
    assert "alpha (paper): 2, omega (live): 1" in told
    assert secret_rows(conn) == before
    new = creds.generate_key()
    out = ok(invoke(db_url, "rotate-key", "--new-key-env", "NEW_KEY",
                    env={**env, "NEW_KEY": new.key.hex()}))
    assert f"under master key {new.key_id}" in out and "now set MMATS_MASTER_KEY" in out
    assert creds.load(conn, new, "alpha", "a2") == {"api_key": "kraken-key-0001"}
    bad = invoke(db_url, "rotate-key", "--new-key-env", "NEW_KEY",
                 env={creds.ENV_VAR: new.encoded(), "NEW_KEY": "short"})
    assert isinstance(bad.exception, MmatsError)
    assert str(bad.exception).startswith("NEW_KEY must be a 32-byte key")


def test_cli_init_key(db_url: str, conn: psycopg.Connection, accounts: None,
                      memory_keyring: MemoryKeyring) -> None:
    out = ok(invoke(db_url, "init-key"))
    stored = memory_keyring.entries[("mmats", "master-key")]
    key = creds.parse_key(stored)
    assert f"master key {key.key_id} generated and stored in the OS keyring" in out
    assert stored not in out
    again = invoke(db_url, "init-key")
    assert isinstance(again.exception, MmatsError)
    assert f"already holds master key {key.key_id}" in str(again.exception)
    # credentials under a key that is gone: a new key would not open them
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    memory_keyring.entries.clear()
    refused = invoke(db_url, "init-key")
    assert isinstance(refused.exception, MmatsError)
    assert f"encrypted under master key {key.key_id}" in str(refused.exception)
    assert memory_keyring.entries == {}


def test_cli_init_key_without_a_keyring(db_url: str, no_keyring: None) -> None:
    out = ok(invoke(db_url, "init-key"))
    assert "no usable OS keyring" in out
    assert 'export MMATS_MASTER_KEY="$(openssl rand -base64 32)"' in out


def test_cli_rotate_key_puts_the_old_key_back_when_the_commit_fails(
        db_url: str, conn: psycopg.Connection, accounts: None,
        memory_keyring: MemoryKeyring) -> None:
    ok(invoke(db_url, "init-key"))
    old = creds.read_keyring_key()
    assert old is not None
    store_three(conn, old)
    before = secret_rows(conn)
    # a deferred trigger: the re-encryption succeeds, the new key is written to the
    # keyring, and then COMMIT fails
    conn.execute("""
        CREATE FUNCTION public.fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'commit refused (simulated)'; END $$""")
    conn.execute("CREATE CONSTRAINT TRIGGER fail_at_commit AFTER UPDATE ON "
                 "runtime.credential_secrets DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                 "EXECUTE FUNCTION public.fail_at_commit()")
    result = invoke(db_url, "rotate-key")
    assert isinstance(result.exception, psycopg.errors.RaiseException)
    assert secret_rows(conn) == before
    current = creds.read_keyring_key()
    assert current is not None and current.key_id == old.key_id
    assert ("mmats", creds.KEYRING_PREVIOUS) not in memory_keyring.entries
    assert creds.load(conn, old, "omega", "o1")["api_key"] == "live-key-00001"


def test_cli_rotate_some_fields_keeps_the_others(db_url: str, conn: psycopg.Connection,
                                                 accounts: None,
                                                 key: creds.MasterKey) -> None:
    creds.store(conn, key, "alpha", "main", "binance", "testnet", SECRET)
    env: dict[str, str | None] = {creds.ENV_VAR: key.encoded(), "NEWK": "new-key-000111"}
    out = ok(invoke(db_url, "rotate", "alpha", "main", "--from-env", "api_key=NEWK", env=env))
    assert "rotated: changed api_key; kept passphrase, secret;" in out
    assert "fields api_key, passphrase, secret" in out and "new-key-000111" not in out
    assert creds.load(conn, key, "alpha", "main") == {**SECRET, "api_key": "new-key-000111"}
    # a field the credential did not have is added, the others still kept
    out = ok(invoke(db_url, "rotate", "alpha", "main", "--stdin-json",
                    input=json.dumps({"secret": "new-secret-222", "extra": "x-333"}), env=env))
    assert "rotated: changed secret; added extra; kept api_key, passphrase;" in out
    assert creds.load(conn, key, "alpha", "main") == {
        "api_key": "new-key-000111", "secret": "new-secret-222",
        "passphrase": SECRET["passphrase"], "extra": "x-333"}
    # replacing the whole field set is explicit
    out = ok(invoke(db_url, "rotate", "alpha", "main", "--replace", "--from-env",
                    "api_key=NEWK", env=env))
    assert "rotated: changed api_key; removed extra, passphrase, secret;" in out
    assert creds.load(conn, key, "alpha", "main") == {"api_key": "new-key-000111"}
    [row] = ok(invoke(db_url, "list", env=env)).splitlines()[2:]
    assert row.split()[5] == "api_key"


class Killed(BaseException):
    """The process is killed (SIGKILL): no handler, no cleanup of it runs."""


class CrashingKeyring(MemoryKeyring):
    """A keyring whose process is killed just before or just after its `kill_at`-th write
    (set or delete); once killed, it does nothing more (each call raises Killed again)."""

    def __init__(self) -> None:
        super().__init__()
        self.kill_at: tuple[str, int] | None = None
        self.writes = 0
        self.dead = False

    def arm(self, when: tuple[str, int] | None) -> None:
        self.kill_at, self.writes, self.dead = when, 0, False

    def _write(self, apply: Any) -> None:
        if self.dead:
            raise Killed
        self.writes += 1
        if self.kill_at == ("before", self.writes):
            self.dead = True
            raise Killed
        apply()
        if self.kill_at == ("after", self.writes):
            self.dead = True
            raise Killed

    def get_password(self, service: str, username: str) -> str | None:
        if self.dead:
            raise Killed
        return super().get_password(service, username)

    def set_password(self, service: str, username: str, password: str) -> None:
        self._write(lambda: MemoryKeyring.set_password(self, service, username, password))

    def delete_password(self, service: str, username: str) -> None:
        self._write(lambda: MemoryKeyring.delete_password(self, service, username))


@pytest.fixture
def crashing_keyring() -> Iterator[CrashingKeyring]:
    previous = keyring.get_keyring()
    backend = CrashingKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def keyring_key_ids(backend: MemoryKeyring) -> set[str]:
    return {creds.parse_key(v).key_id for (service, _), v in backend.entries.items()
            if service == "mmats"}


def test_cli_rotate_key_killed_before_the_commit_then_retried(
        db_url: str, conn: psycopg.Connection, accounts: None,
        crashing_keyring: CrashingKeyring) -> None:
    """The reviewer's sequence: killed right after the new key is written to the keyring
    (the database still under the old key), then `rotate-key` again."""
    ok(invoke(db_url, "init-key"))
    old = creds.read_keyring_key()
    assert old is not None
    store_three(conn, old)
    before = secret_rows(conn)
    crashing_keyring.arm(("after", 2))  # 1: the backup of the old key, 2: the new key
    with pytest.raises(Killed):
        invoke(db_url, "rotate-key")
    assert secret_rows(conn) == before
    crashed = creds.parse_key(crashing_keyring.entries[("mmats", creds.KEYRING_USERNAME)])
    assert crashed.key_id != old.key_id
    assert crashing_keyring.entries[("mmats", creds.KEYRING_PREVIOUS)] == old.encoded()
    crashing_keyring.arm(None)  # a new process
    # the other commands name what happened and how to finish it
    refused = invoke(db_url, "rotate", "alpha", "a2", "--from-env", "api_key=X",
                     env={"X": "k-1234"})
    assert isinstance(refused.exception, MmatsError)
    assert "interrupted `mmats creds rotate-key`" in str(refused.exception)
    out = ok(invoke(db_url, "rotate-key"))
    assert "finished an interrupted rotation" in out
    assert f"under master key {crashed.key_id} (was {old.key_id}," in out
    assert len(out.splitlines()) == 1
    assert old.encoded() not in out and crashed.encoded() not in out
    current = creds.read_keyring_key()
    assert current is not None and current.key_id == crashed.key_id
    assert creds.stored_key_ids(conn) == [current.key_id]
    assert creds.load(conn, current, "omega", "o1")["secret"] == "live-secret-0001"
    assert creds.load(conn, current, "alpha", "a1") == SECRET
    assert ("mmats", creds.KEYRING_PREVIOUS) not in crashing_keyring.entries


_KILL_POINTS = [None, ("after", 1), ("after", 2), ("before", 2), ("before", 3),
                ("after", 3)]


def _kill_id(when: tuple[str, int] | None) -> str:
    return "no-kill" if when is None else f"kill-{when[0]}-write-{when[1]}"


@pytest.mark.parametrize("second", _KILL_POINTS, ids=_kill_id)
@pytest.mark.parametrize("first", _KILL_POINTS[1:], ids=_kill_id)
def test_cli_rotate_key_no_kill_and_retry_loses_a_key(
        db_url: str, conn: psycopg.Connection, accounts: None,
        crashing_keyring: CrashingKeyring, first: tuple[str, int],
        second: tuple[str, int] | None) -> None:
    """Killed at any keyring write (before or after it; the commit sits between the new
    key's write and the backup's removal), killed again in the retry, then run once more:
    every stored record's key is in the keyring throughout, and at the end the records
    are under the keyring's key and the backup is gone."""
    ok(invoke(db_url, "init-key"))
    old = creds.read_keyring_key()
    assert old is not None
    store_three(conn, old)
    crashing_keyring.arm(first)
    with pytest.raises(Killed):
        invoke(db_url, "rotate-key")
    assert set(creds.stored_key_ids(conn)) <= keyring_key_ids(crashing_keyring)
    for when in (second, None):
        crashing_keyring.arm(when)
        with contextlib.suppress(Killed):
            invoke(db_url, "rotate-key")
        assert set(creds.stored_key_ids(conn)) <= keyring_key_ids(crashing_keyring), when
    crashing_keyring.arm(None)
    current = creds.read_keyring_key()
    assert current is not None
    assert creds.stored_key_ids(conn) == [current.key_id]
    assert creds.load(conn, current, "alpha", "a1") == SECRET
    assert ("mmats", creds.KEYRING_PREVIOUS) not in crashing_keyring.entries


def test_cli_rotate_key_refuses_records_under_an_unknown_key(
        db_url: str, conn: psycopg.Connection, accounts: None,
        memory_keyring: MemoryKeyring) -> None:
    lost = creds.generate_key()
    store_three(conn, lost)
    mine = creds.generate_key()
    other = creds.generate_key()
    memory_keyring.set_password("mmats", creds.KEYRING_USERNAME, mine.encoded())
    memory_keyring.set_password("mmats", creds.KEYRING_PREVIOUS, other.encoded())
    before = secret_rows(conn)
    result = invoke(db_url, "rotate-key")
    assert isinstance(result.exception, MmatsError)
    assert f"encrypted under master key {lost.key_id}" in str(result.exception)
    assert "\n" not in str(result.exception)
    assert secret_rows(conn) == before
    assert memory_keyring.entries == {("mmats", creds.KEYRING_USERNAME): mine.encoded(),
                                      ("mmats", creds.KEYRING_PREVIOUS): other.encoded()}


def test_cli_rotate_key_from_the_environment_run_again(db_url: str, conn: psycopg.Connection,
                                                       accounts: None,
                                                       key: creds.MasterKey) -> None:
    """Step 2 of the instructions run again (its output lost, say): it is done already,
    and step 3 is still what to do."""
    store_three(conn, key)
    new = creds.generate_key()
    env: dict[str, str | None] = {creds.ENV_VAR: key.encoded(),
                                  "MMATS_NEW_MASTER_KEY": new.encoded()}
    ok(invoke(db_url, "rotate-key", "--new-key-env", "MMATS_NEW_MASTER_KEY", env=env))
    again = ok(invoke(db_url, "rotate-key", "--new-key-env", "MMATS_NEW_MASTER_KEY", env=env))
    assert f"already encrypted under master key {new.key_id}" in again
    assert "now set MMATS_MASTER_KEY to the value of MMATS_NEW_MASTER_KEY" in again
    assert len(again.splitlines()) == 1
    assert creds.stored_key_ids(conn) == [new.key_id]
    told = ok(invoke(db_url, "rotate-key", env={creds.ENV_VAR: key.encoded()}))
    assert f"are encrypted under {new.key_id} now, not (only) under {key.key_id}" in told
    # step 3 done, step 2 run once more: nothing to do
    done = ok(invoke(db_url, "rotate-key", "--new-key-env", "MMATS_NEW_MASTER_KEY",
                     env={**env, creds.ENV_VAR: new.encoded()}))
    assert f"already encrypted under master key {new.key_id}" in done
    assert creds.load(conn, new, "omega", "o1")["api_key"] == "live-key-00001"


def test_cli_rotate_key_interrupted_right_after_the_keyring_write(
        db_url: str, conn: psycopg.Connection, accounts: None,
        memory_keyring: MemoryKeyring, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C just after the new key reached the keyring, before the commit: the handlers
    run, the transaction rolls back, and the keyring's key is the old one again."""
    ok(invoke(db_url, "init-key"))
    old = creds.read_keyring_key()
    assert old is not None
    store_three(conn, old)
    before = secret_rows(conn)
    real_save = creds.save_keyring_key
    interrupted: list[str] = []

    def save_then_interrupt(key: creds.MasterKey,
                            username: str = creds.KEYRING_USERNAME) -> None:
        real_save(key, username)
        if username == creds.KEYRING_USERNAME and not interrupted:
            interrupted.append(key.key_id)
            raise KeyboardInterrupt

    monkeypatch.setattr(creds, "save_keyring_key", save_then_interrupt)
    result = invoke(db_url, "rotate-key")
    assert result.exit_code != 0 and interrupted and interrupted[0] != old.key_id
    assert secret_rows(conn) == before
    current = creds.read_keyring_key()
    assert current is not None and current.key_id == old.key_id
    assert ("mmats", creds.KEYRING_PREVIOUS) not in memory_keyring.entries
    assert creds.load(conn, current, "alpha", "a1") == SECRET
