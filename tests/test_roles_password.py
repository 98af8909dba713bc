"""Login passwords for the MMATS service roles (db/roles.py, `mmats db set-password`).

Roles are cluster-wide: each test restores the password the role had before it ran.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from api.cli_roles import set_password_command
from db.roles import LOGIN_ROLES, RoleError, set_login_password

PASSWORD = "correct horse 'battery\" staple; -- $$ \\ é"


@pytest.fixture
def restore_passwords(conn: psycopg.Connection) -> Iterator[None]:
    saved = dict(conn.execute(
        "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY(%s)",
        (list(LOGIN_ROLES),)).fetchall())
    yield
    for role, verifier in saved.items():
        if verifier is None:
            conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD NULL").format(
                psycopg.sql.Identifier(role)))
        else:
            conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                psycopg.sql.Identifier(role), psycopg.sql.Literal(verifier)))


def login_url(db_url: str, role: str, password: str) -> str:
    params = conninfo_to_dict(db_url)
    params.update(user=role, password=password, host="127.0.0.1")
    return make_conninfo(**params)


def test_readonly_logs_in_over_tcp_and_only_reads(
        conn: psycopg.Connection, db_url: str, restore_passwords: None) -> None:
    set_login_password(conn, "mmats_readonly", PASSWORD)
    stored = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'mmats_readonly'"
                          ).fetchone()
    assert stored is not None and stored[0].startswith("SCRAM-SHA-256$")
    assert PASSWORD not in stored[0]

    with psycopg.connect(login_url(db_url, "mmats_readonly", PASSWORD)) as ro:
        who = ro.execute("SELECT current_user, session_user").fetchone()
        assert who == ("mmats_readonly", "mmats_readonly")
        assert ro.execute("SELECT count(*) FROM market.bars").fetchone() == (0,)
        with pytest.raises(errors.InsufficientPrivilege):
            ro.execute("INSERT INTO market.bars (instrument_id, timeframe, ts, open, high, low, "
                       "close) VALUES (1, '1m', now(), 1, 1, 1, 1)")

    # a wrong password is refused wherever TCP logins authenticate by password, as on
    # the embedded server; a server named by MMATS_DATABASE_URL may trust local logins
    if conninfo_to_dict(db_url).get("password"):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(login_url(db_url, "mmats_readonly", PASSWORD + "x")).close()


def test_each_service_role_can_be_given_a_password(
        conn: psycopg.Connection, db_url: str, restore_passwords: None) -> None:
    for role in LOGIN_ROLES:
        set_login_password(conn, role, f"pw-for-{role}")
        with psycopg.connect(login_url(db_url, role, f"pw-for-{role}")) as c:
            assert c.execute("SELECT current_user").fetchone() == (role,)


@pytest.mark.parametrize("role", ["mmats_owner", "postgres", "MMATS_READONLY", "x; DROP ROLE y"])
def test_other_roles_are_refused(conn: psycopg.Connection, role: str) -> None:
    before = conn.execute("SELECT rolname, rolpassword FROM pg_authid ORDER BY 1").fetchall()
    with pytest.raises(RoleError, match="only the MMATS login roles"):
        set_login_password(conn, role, PASSWORD)
    assert conn.execute("SELECT rolname, rolpassword FROM pg_authid ORDER BY 1"
                        ).fetchall() == before


@pytest.mark.parametrize(("password", "message"), [
    ("", "empty"), ("short", "too short"), ("nul\x00inside-it", "NUL")])
def test_bad_passwords_are_refused(conn: psycopg.Connection, password: str, message: str) -> None:
    with pytest.raises(RoleError, match=message):
        set_login_password(conn, "mmats_readonly", password)


def test_server_only_ever_sees_a_verifier(
        conn: psycopg.Connection, db_url: str, restore_passwords: None) -> None:
    # pg_stat_activity keeps the last statement of an idle session: the text the server
    # received (and would log with log_statement=ddl) holds a SCRAM verifier, never the
    # plain password
    with psycopg.connect(db_url, autocommit=True) as admin:
        set_login_password(admin, "mmats_readonly", PASSWORD)
        row = conn.execute("SELECT query FROM pg_stat_activity WHERE pid = %s",
                           (admin.info.backend_pid,)).fetchone()
    assert row is not None
    assert row[0].startswith('ALTER ROLE "mmats_readonly" WITH LOGIN PASSWORD \'SCRAM-SHA-256$')
    assert "horse" not in row[0]


# --------------------------------------------------------------------------- CLI
def test_cli_sets_password_from_env(
        conn: psycopg.Connection, db_url: str, restore_passwords: None) -> None:
    runner = CliRunner()
    result = runner.invoke(
        set_password_command, ["mmats_readonly", "--password-env", "GRAFANA_DB_PW"],
        env={"MMATS_DATABASE_URL": db_url, "GRAFANA_DB_PW": PASSWORD})
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "login password of mmats_readonly set"
    assert PASSWORD not in result.output
    with psycopg.connect(login_url(db_url, "mmats_readonly", PASSWORD)) as ro:
        assert ro.execute("SELECT count(*) FROM market.instruments").fetchone() == (0,)


def test_cli_sets_password_from_stdin(
        conn: psycopg.Connection, db_url: str, restore_passwords: None) -> None:
    result = CliRunner().invoke(set_password_command, ["mmats_api", "--stdin"],
                                input="s3cret-from-stdin\n", env={"MMATS_DATABASE_URL": db_url})
    assert result.exit_code == 0, result.output
    assert "s3cret" not in result.output
    with psycopg.connect(login_url(db_url, "mmats_api", "s3cret-from-stdin")) as c:
        assert c.execute("SELECT current_user").fetchone() == ("mmats_api",)


def test_cli_refuses_bad_usage(db_url: str) -> None:
    runner = CliRunner()
    env = {"MMATS_DATABASE_URL": db_url}
    unknown = runner.invoke(set_password_command, ["mmats_owner", "--stdin"], input="x" * 12,
                            env=env)
    assert unknown.exit_code == 2
    assert "mmats_readonly" in unknown.output

    neither = runner.invoke(set_password_command, ["mmats_api"], env=env)
    assert neither.exit_code == 2 and "exactly one of" in neither.output

    both = runner.invoke(set_password_command, ["mmats_api", "--stdin", "--password-env", "X"],
                         input="y" * 12, env=env)
    assert both.exit_code == 2 and "exactly one of" in both.output

    unset = runner.invoke(set_password_command, ["mmats_api", "--password-env", "NO_SUCH_VAR"],
                          env={**env, "NO_SUCH_VAR": None})
    assert unset.exit_code == 1 and "NO_SUCH_VAR is not set" in unset.output

    short = runner.invoke(set_password_command, ["mmats_api", "--password-env", "PW"],
                          env={**env, "PW": "abc"})
    assert short.exit_code == 1 and "too short" in short.output and "abc" not in short.output
