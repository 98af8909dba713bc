"""The embedded server and the `mmats db` commands, run as a user would run them.

Each test here gets its own MMATS_HOME (its own embedded server), so these tests do
real initdb / start / stop cycles, including after a crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from db import config as db_config
from db.runtime import EmbeddedServer

pytestmark = pytest.mark.slow


def mmats(*args: str, env: dict[str, str],
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", *args],
                          env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def home() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mmats-home-"))
    path.chmod(0o711)
    yield path / "home"
    server = EmbeddedServer(path / "home", quiet=True)
    if server.status().running:
        server.stop()
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def env(home: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MMATS_", "PG"))}
    return {**clean, "MMATS_HOME": str(home)}


def test_start_twice_reuses_the_running_server(home: Path, env: dict[str, str]) -> None:
    first = mmats("db", "start", env=env)
    assert first.returncode == 0, first.stderr
    assert "started" in first.stdout and "***" in first.stdout
    pid = EmbeddedServer(home).status().pid
    second = mmats("db", "start", env=env)
    assert second.returncode == 0 and "already running" in second.stdout
    assert EmbeddedServer(home).status().pid == pid
    status = mmats("db", "status", env=env)
    assert f"pid {pid}" in status.stdout and "run `mmats db upgrade`" in status.stdout


def test_upgrade_then_status_then_stop(home: Path, env: dict[str, str]) -> None:
    up = mmats("db", "upgrade", env=env)
    assert up.returncode == 0, up.stderr
    from db.migrate import migration_files

    assert up.stdout.startswith(f"applied {len(migration_files())} migration(s)")
    again = mmats("db", "upgrade", env=env)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert "(up to date)" in mmats("db", "status", env=env).stdout
    url = mmats("db", "url", "--show-password", env=env).stdout.strip()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM trading.order_transitions").fetchone() == (24,)
    psql = subprocess.run(
        [sys.executable, "-c", "from api.cli import main; main()", "db", "psql", "-X", "-A",
         "-t", "-c", "SELECT current_database()"], env=env, capture_output=True, text=True)
    assert psql.returncode == 0 and psql.stdout.strip() == "mmats"
    assert mmats("db", "stop", env=env).stdout.strip() == "embedded PostgreSQL stopped"
    assert "was not running" in mmats("db", "stop", env=env).stdout
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)


def test_restart_after_a_crash(home: Path) -> None:
    server = EmbeddedServer(home, quiet=True)
    url = server.start()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    pid = server.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.status().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.status().running
    assert (server.pgdata / "postmaster.pid").exists()  # the stale lock the crash left
    url = server.start()
    assert server.status().running and server.status().pid != pid
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)


def test_stale_pid_file_naming_a_live_unrelated_process(home: Path) -> None:
    # after a reboot the old postmaster's pid may belong to another process
    server = EmbeddedServer(home, quiet=True)
    server.start()
    server.stop()
    (server.pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{server.pgdata}\n")
    assert not server.status().running
    server.start()
    assert server.status().running and server.status().pid != os.getpid()


def test_concurrent_starts_start_one_server(home: Path) -> None:
    urls: list[str] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            urls.append(EmbeddedServer(home, quiet=True).start())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(urls)) == 1


def test_port_taken_by_someone_else_moves_the_server(home: Path) -> None:
    import socket

    server = EmbeddedServer(home, quiet=True)
    server.start()
    port = server.status().port
    server.stop()
    with socket.socket() as squatter:
        # the stopped server's sockets may linger in TIME_WAIT
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        url = server.start()
        assert server.status().port != port
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_data_folder_that_is_not_a_cluster_is_refused(home: Path, env: dict[str, str]) -> None:
    (home / "pgdata").mkdir(parents=True)
    (home / "pgdata" / "precious.txt").write_text("do not delete")
    result = mmats("db", "start", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no PG_VERSION" in lines[0]
    assert (home / "pgdata" / "precious.txt").read_text() == "do not delete"


def test_bad_database_url_is_one_line(env: dict[str, str]) -> None:
    result = mmats("db", "status", env={**env, "MMATS_DATABASE_URL": "mysql://x/y"})
    assert result.returncode == 1
    assert result.stderr.strip() == ("error: MMATS_DATABASE_URL must start with postgresql://, "
                                     "got 'mysql://x/y'")
    unreachable = mmats("db", "upgrade",
                        env={**env, "MMATS_DATABASE_URL": "postgresql://u:secret@127.0.0.1:1/x"})
    assert unreachable.returncode == 1
    assert "Traceback" not in unreachable.stderr and "secret" not in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1
    debug = mmats("--debug", "db", "status", env={**env, "MMATS_DATABASE_URL": "mysql://x/y"})
    assert "Traceback" in debug.stderr


PW = "TopSecretPW1"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:secret@127.0.0.1:1/x", "postgresql://u:***@127.0.0.1:1/x"),
    ("postgresql://postgres@127.0.0.1:5432/db", "postgresql://postgres@127.0.0.1:5432/db"),
    (f"postgresql://postgres@127.0.0.1:5432/db?password={PW}",
     "postgresql://postgres@127.0.0.1:5432/db?password=***"),
    (f"postgresql://postgres@h/db?sslmode=disable&password={PW}&application_name=a",
     "postgresql://postgres@h/db?sslmode=disable&password=***&application_name=a"),
    (f"postgres://postgres:{PW}@[::1", "postgres://postgres:***@[::1"),
    (f"postgresql://postgres:Top@{PW}@127.0.0.1:5432/db", "postgresql://postgres:***@127.0.0.1:5432/db"),
    (f"postgresql://postgres:a/{PW}@127.0.0.1:5432/db", "postgresql://postgres:***@127.0.0.1:5432/db"),
    (f"host=127.0.0.1 user=postgres password={PW} dbname=db",
     "host=127.0.0.1 user=postgres password=*** dbname=db"),
    (f"host=h password = 'Top {PW}' dbname=db", "host=h password = *** dbname=db"),
    ("mysql://x/y", "mysql://x/y"),
])
def test_redact_url_hides_every_spelling_of_a_password(url: str, shown: str) -> None:
    assert db_config.redact_url(url) == shown


def test_redact_text_hides_the_url_and_pieces_of_its_password() -> None:
    url = f"postgres://postgres:{PW}@[::1"
    libpq = f'end of string reached looking for "]" in IPv6 host address in URI: "{url}"'
    assert db_config.redact_text(libpq, url) == (
        'end of string reached looking for "]" in IPv6 host address in URI: '
        '"postgres://postgres:***@[::1"')
    at_url = f"postgresql://postgres:Top@{PW}@127.0.0.1:5432/db"
    resolver = f"failed to resolve host '{PW}@127.0.0.1': [Errno -2] Name or service not known"
    assert db_config.redact_text(resolver, at_url) == (
        "failed to resolve host '***@127.0.0.1': [Errno -2] Name or service not known")
    short = "postgresql://postgres:Top@abc@127.0.0.1:5432/db"  # short pieces: before an @
    assert db_config.redact_text("failed to resolve host 'abc@127.0.0.1', abc", short) == (
        "failed to resolve host '***@127.0.0.1', abc")


def test_redacting_a_very_long_text_is_linear() -> None:
    """Found by review: an error line quoting a long argument (`mmats close ACCOUNT` with
    a SYMBOL of 20,000 letters: 3.8 s; 100,000: over a minute) was redacted in quadratic
    time: the user:password@ patterns were tried from every letter of a long run, each
    try reading the run to its end. Each of these took over a minute (but the one whose
    200,000-letter scheme matched at its first letter); now well under a second."""
    letters = "A" * 200_000
    message = (f"unknown symbol '{letters}' on venue 'us': postgresql://u:{PW}@h/db "
               f"password={PW}")
    assert db_config.redact_passwords(message) == (
        f"unknown symbol '{letters}' on venue 'us': postgresql://u:***@h/db password=***")
    assert db_config.redact_passwords(f"{letters}://u:{PW}@h") == f"{letters}://u:***@h"
    assert db_config.redact_url(f"{letters} user:{PW}@h") == f"{letters} user:***@h"
    # a password runs to the last @ of its run: here there is none after the colons
    colons = "@" + "a:" * 100_000
    assert db_config.redact_url(colons) == colons
    assert db_config.redact_passwords(colons.replace(":", "://")) == colons.replace(":", "://")


@pytest.mark.parametrize(("url", "commands"), [
    (f"postgresql://postgres@127.0.0.1:1/x?password={PW}", [("db", "url")]),
    (f"postgres://postgres:{PW}@[::1",
     [("db", "url"), ("db", "status"), ("account", "list"), ("--debug", "account", "list")]),
    (f"host=127.0.0.1 user=postgres password={PW} dbname=x",
     [("db", "url"), ("db", "status"), ("account", "list"), ("--debug", "account", "list")]),
    (f"postgresql://postgres:Top@{PW}@127.0.0.1:1/x",
     [("db", "url"), ("db", "status"), ("account", "list"), ("--debug", "account", "list")]),
])
def test_no_command_prints_the_database_password(env: dict[str, str], url: str,
                                                 commands: list[tuple[str, ...]]) -> None:
    """Whatever the URL's spelling (password in the query, a key=value string, a URL that
    does not parse, an unencoded @ in the password), output and errors show *** and an
    error is one line with exit status 1, never a traceback (but with --debug)."""
    for args in commands:
        result = mmats(*args, env={**env, "MMATS_DATABASE_URL": url}, timeout=60)
        output = result.stdout + result.stderr
        assert PW not in output and "SecretPW" not in output, (args, output)
        assert "***" in output, (args, output)
        if "--debug" in args:
            assert "Traceback" in result.stderr
            continue
        assert "Traceback" not in result.stderr, (args, output)
        if result.returncode != 0:
            assert result.returncode == 1, (args, output)
            assert len(result.stderr.strip().splitlines()) == 1, (args, output)
            assert result.stderr.startswith("error: "), (args, output)


def test_useradd_is_found_outside_a_minimal_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root with PATH=/usr/bin:/bin (env -i, cron) has no sbin on PATH: the first start
    failed with FileNotFoundError 'useradd' in every test. The tool is looked up in the
    sbin folders too, and its absence is one clear line."""
    from db.runtime import ServerError, _system_tool
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    tool = sbin / "useradd"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert _system_tool("useradd", extra=(str(sbin),)) == str(tool)
    with pytest.raises(ServerError) as err:
        _system_tool("useradd", extra=(str(tmp_path / "nowhere"),))
    message = str(err.value)
    assert "\n" not in message and "useradd" in message and "mmats-pg" in message
