"""The audit chain: append-only, hash-chained, tamper-evident, safe under concurrency."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def record(conn: psycopg.Connection, event_type: str = "test.event", entity: str = "order",
           entity_id: str | None = "1", payload: object = None) -> int:
    row = conn.execute("SELECT audit.record(%s, %s, %s, %s)",
                       (event_type, entity, entity_id,
                        Jsonb(payload if payload is not None else {}))).fetchone()
    assert row is not None
    return int(row[0])


def problems(conn: psycopg.Connection) -> list[tuple[int, str]]:
    return [(int(r[0]) if r[0] is not None else -1, r[1])
            for r in conn.execute("SELECT event_id, problem FROM audit.verify_chain()")]


def events(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT event_id, prev_hash, hash, actor, event_type, entity, entity_id, "
                        "payload FROM audit.events ORDER BY event_id").fetchall()


def tamper(conn: psycopg.Connection, statement: str, params: tuple = ()) -> None:
    """Superuser tampering: the table's triggers disabled for one statement, then back on."""
    conn.execute("ALTER TABLE audit.events DISABLE TRIGGER USER")
    try:
        conn.execute(statement, params)
    finally:
        conn.execute("ALTER TABLE audit.events ENABLE TRIGGER USER")
    disabled = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = "
                            "'audit.events'::regclass AND NOT tgisinternal "
                            "AND tgenabled = 'D'").fetchone()
    assert disabled == (0,)


def run_cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MMATS_DATABASE_URL": db_url}
    env.pop("MMATS_DEBUG", None)
    return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", *args],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=60)


# ------------------------------------------------------------------ appending and chaining
def test_empty_chain_verifies(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT count(*) FROM audit.events").fetchone() == (0,)
    assert problems(conn) == []


def test_record_appends_and_chains(conn: psycopg.Connection) -> None:
    ids = [record(conn, payload={"n": i}) for i in range(5)]
    assert ids == sorted(ids)
    rows = events(conn)
    assert [r[0] for r in rows] == ids
    assert rows[0][1] is None  # the first event has no predecessor
    for prev, cur in itertools.pairwise(rows):
        assert cur[1] == prev[2], f"event {cur[0]} does not link to event {prev[0]}"
    assert all(len(r[2]) == 32 for r in rows)  # sha256
    assert len({bytes(r[2]) for r in rows}) == 5
    assert [r[7] for r in rows] == [{"n": i} for i in range(5)]
    assert all(r[3] == conn.info.user for r in rows)  # actor = session user
    head = conn.execute("SELECT last_event_id, last_hash FROM audit.chain_head").fetchone()
    assert head == (ids[-1], rows[-1][2])
    assert problems(conn) == []


def test_record_with_null_entity_id(conn: psycopg.Connection) -> None:
    # regression: the hash once used chr(0) for a NULL entity_id, which PostgreSQL refuses
    event_id = record(conn, entity="system", entity_id=None)
    assert conn.execute("SELECT entity_id FROM audit.events WHERE event_id = %s",
                        (event_id,)).fetchone() == (None,)
    record(conn, entity="system", entity_id="")
    assert problems(conn) == []


def test_null_and_empty_entity_id_hash_differently(conn: psycopg.Connection) -> None:
    a, b = conn.execute(
        "SELECT audit.event_hash(NULL, 1, '2026-01-01Z', 'u', 't', 'e', NULL, '{}'),"
        "       audit.event_hash(NULL, 1, '2026-01-01Z', 'u', 't', 'e', '', '{}')").fetchone()
    assert a != b


def test_fields_cannot_bleed_into_each_other(conn: psycopg.Connection) -> None:
    # regression: fields were joined with chr(31), so moving a chr(31) from entity into
    # entity_id gave the same hash
    a, b = conn.execute(
        "SELECT audit.event_hash(NULL, 1, '2026-01-01Z', 'u', 't', 'a' || chr(31) || 'b', 'c',"
        "                        '{}'),"
        "       audit.event_hash(NULL, 1, '2026-01-01Z', 'u', 't', 'a', 'b' || chr(31) || 'c',"
        "                        '{}')"
    ).fetchone()
    assert a != b


def test_direct_insert_cannot_forge_chain_fields(conn: psycopg.Connection) -> None:
    first = record(conn)
    conn.execute("INSERT INTO audit.events (event_id, ts, actor, event_type, entity, payload, "
                 "prev_hash, hash) VALUES (999999, '2000-01-01', 'mallory', 'forged.event', 'x', "
                 "'{}', '\\xdead', '\\xbeef')")
    row = conn.execute("SELECT event_id, ts > '2020-01-01', actor, prev_hash, hash "
                       "FROM audit.events WHERE event_type = 'forged.event'").fetchone()
    assert row is not None
    assert row[0] == first + 1
    assert row[1] is True
    assert row[2] == "mallory"  # an explicit actor is kept, the chain fields are not
    assert row[3] == events(conn)[0][2]
    assert bytes(row[4]) != b"\xbe\xef"
    assert problems(conn) == []


def test_bad_event_type_is_refused_and_chain_unchanged(conn: psycopg.Connection) -> None:
    record(conn)
    with pytest.raises(psycopg.errors.CheckViolation) as exc:
        record(conn, event_type="Bad Type")
    assert exc.value.diag.constraint_name == "audit_events_type_format"
    assert conn.execute("SELECT count(*) FROM audit.events").fetchone() == (1,)
    record(conn)
    assert problems(conn) == []


def test_rolled_back_event_leaves_chain_intact(db_url: str, conn: psycopg.Connection) -> None:
    record(conn)
    with psycopg.connect(db_url) as tx:
        record(tx)
        tx.rollback()
    second = record(conn)
    assert conn.execute("SELECT count(*) FROM audit.events").fetchone() == (2,)
    assert conn.execute("SELECT last_event_id FROM audit.chain_head").fetchone() == (second,)
    assert problems(conn) == []


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.characters(blacklist_categories=("Cs",),
                                            blacklist_characters="\x00"), max_size=8),
                      inner, max_size=4),
    max_leaves=12)
plain_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                     min_size=1, max_size=30)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.dictionaries(st.text(max_size=10).filter(lambda s: "\x00" not in s),
                               json_values, max_size=5),
       entity=plain_text, entity_id=st.none() | plain_text)
def test_random_payloads_round_trip_and_verify(conn: psycopg.Connection, payload: dict,
                                               entity: str, entity_id: str | None) -> None:
    event_id = record(conn, entity=entity, entity_id=entity_id, payload=payload)
    row = conn.execute("SELECT entity, entity_id, payload FROM audit.events WHERE event_id = %s",
                       (event_id,)).fetchone()
    assert row == (entity, entity_id, payload)
    assert problems(conn) == []


# ------------------------------------------------------------------ append-only
@pytest.mark.parametrize("role", [None, "mmats_owner"])
@pytest.mark.parametrize("statement", [
    "UPDATE audit.events SET payload = '{\"x\": 1}'",
    "DELETE FROM audit.events",
    "TRUNCATE audit.events",
])
def test_events_cannot_be_changed(conn: psycopg.Connection, role: str | None,
                                  statement: str) -> None:
    record(conn)
    record(conn)
    before = events(conn)
    if role:
        conn.execute(f"SET ROLE {role}")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            conn.execute(statement)
    finally:
        conn.execute("RESET ROLE")
    op = statement.split()[0]
    assert f"audit.events is append-only: {op} refused" in str(exc.value)
    assert exc.value.diag.sqlstate == "42501"
    assert "audit.record()" in (exc.value.diag.message_hint or "")
    assert events(conn) == before
    assert problems(conn) == []


# ------------------------------------------------------------------ tampering
def test_changed_payload_is_detected(conn: psycopg.Connection) -> None:
    ids = [record(conn, payload={"qty": i}) for i in range(5)]
    tamper(conn, "UPDATE audit.events SET payload = '{\"qty\": 100}' WHERE event_id = %s",
           (ids[2],))
    found = problems(conn)
    assert len(found) == 1
    assert found[0][0] == ids[2]
    assert "content does not match" in found[0][1]


@pytest.mark.parametrize("column,value", [
    ("actor", "'mallory'"), ("entity", "'account'"), ("entity_id", "NULL"),
    ("event_type", "'order.other'"), ("ts", "ts + interval '1 microsecond'"),
])
def test_changed_column_is_detected(conn: psycopg.Connection, column: str,
                                    value: str) -> None:
    ids = [record(conn) for _ in range(3)]
    tamper(conn, f"UPDATE audit.events SET {column} = {value} WHERE event_id = %s", (ids[1],))
    found = problems(conn)
    assert found and found[0][0] == ids[1]
    assert "content does not match" in found[0][1]


def test_shifted_field_boundary_is_detected(conn: psycopg.Connection) -> None:
    event_id = record(conn, entity="a\x1fb", entity_id="c")
    tamper(conn, "UPDATE audit.events SET entity = 'a', entity_id = 'b' || chr(31) || 'c' "
           "WHERE event_id = %s", (event_id,))
    assert problems(conn)[0][0] == event_id


def test_deleted_middle_event_is_detected(conn: psycopg.Connection) -> None:
    ids = [record(conn) for _ in range(5)]
    tamper(conn, "DELETE FROM audit.events WHERE event_id = %s", (ids[2],))
    found = problems(conn)
    assert len(found) == 1
    assert found[0][0] == ids[3]
    assert f"does not match the hash of event {ids[1]}" in found[0][1]


def test_deleted_first_event_is_detected(conn: psycopg.Connection) -> None:
    ids = [record(conn) for _ in range(3)]
    tamper(conn, "DELETE FROM audit.events WHERE event_id = %s", (ids[0],))
    found = problems(conn)
    assert found[0][0] == ids[1]
    assert "first event links to a predecessor that is missing" in found[0][1]


def test_deleted_last_event_is_detected(conn: psycopg.Connection) -> None:
    ids = [record(conn) for _ in range(4)]
    tamper(conn, "DELETE FROM audit.events WHERE event_id = %s", (ids[-1],))
    found = problems(conn)
    assert len(found) == 1
    assert found[0][0] == ids[-1]
    assert "chain head" in found[0][1]
    assert f"the last event is {ids[-2]}" in found[0][1]


def test_truncated_chain_is_detected(conn: psycopg.Connection) -> None:
    ids = [record(conn) for _ in range(3)]
    tamper(conn, "TRUNCATE audit.events")
    found = problems(conn)
    assert found and found[0][0] == ids[-1]
    assert "the last event is none" in found[0][1]


# ------------------------------------------------------------------ concurrency
def test_concurrent_appends_form_one_chain(db_url: str, conn: psycopg.Connection) -> None:
    threads_n, per_thread = 4, 50
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as c:
                barrier.wait(timeout=30)
                for i in range(per_thread):
                    record(c, entity="thread", entity_id=str(n), payload={"i": i})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    rows = events(conn)
    assert len(rows) == threads_n * per_thread
    ids = [r[0] for r in rows]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    for prev, cur in itertools.pairwise(rows):
        assert cur[1] == prev[2]
    for n in range(threads_n):  # each thread's events in its own order
        mine = [r[7]["i"] for r in rows if r[6] == str(n)]
        assert mine == list(range(per_thread))
    assert problems(conn) == []


# ------------------------------------------------------------------ the CLI
def test_cli_verify_intact(db_url: str, conn: psycopg.Connection) -> None:
    for i in range(3):
        record(conn, payload={"i": i})
    result = run_cli(db_url, "audit", "verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "audit chain intact: 3 events"
    assert "Traceback" not in result.stderr


def test_cli_verify_empty(db_url: str) -> None:
    result = run_cli(db_url, "audit", "verify")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "audit chain intact: 0 events"


def test_cli_verify_broken(db_url: str, conn: psycopg.Connection) -> None:
    ids = [record(conn) for _ in range(4)]
    tamper(conn, "UPDATE audit.events SET payload = '{\"forged\": true}' "
           "WHERE event_id = %s", (ids[1],))
    result = run_cli(db_url, "audit", "verify")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: audit chain broken at event {ids[1]}: ")
    assert "content does not match" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
