"""The deployment files, checked offline: docker-compose.yml, the Dockerfile, the env example.

There is no Docker engine in CI, so nothing is built or started here. The compose file
is parsed with PyYAML and its variables are interpolated the way compose does
(${VAR}, ${VAR:-default}, ${VAR:?error}); `docker compose config` is used as well when
that client command is available.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / "deploy" / "env.example"
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE", re.IGNORECASE)
VAR_REF = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>\w+)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (enough of it for this file); $$ is a literal $."""
    def repl(m: re.Match[str]) -> str:
        if m.group("bare"):
            return env.get(m.group("bare"), "")
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        value = env.get(name)
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise ValueError(f"required variable {name} is missing a value: {arg}")
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        return value or ""

    parts = text.split("$$")
    return "$".join(VAR_REF.sub(repl, part) for part in parts)


def interpolate_all(node: Any, env: dict[str, str]) -> Any:
    """Compose interpolates the parsed values (never the comments)."""
    if isinstance(node, dict):
        return {k: interpolate_all(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_all(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def example_env() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def filled_env() -> dict[str, str]:
    return {k: v or f"test-value-for-{k.lower()}" for k, v in example_env().items()}


# --------------------------------------------------------------------------- compose
def test_services_present(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {"db", "migrate", "grafana"}
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        assert "healthcheck" in service or service.get("restart") == "no", (
            f"{name}: a long-running service needs a healthcheck")


def test_db_service(compose: dict[str, Any]) -> None:
    db = compose["services"]["db"]
    image, _, tag = db["image"].partition(":")
    assert image == "timescale/timescaledb"
    assert re.fullmatch(r"2\.\d+\.\d+-pg17|latest-pg17", tag), tag
    env = env_of(db)
    assert env["POSTGRES_DB"] == "mmats"
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert env.get("TZ") == "UTC"
    assert "timezone=UTC" in db.get("command", [])
    data = "/var/lib/postgresql/data"
    assert env.get("PGDATA", data) == data
    mounts = [v.split(":") for v in db["volumes"]]
    (source,) = [m[0] for m in mounts if m[1] == data]
    assert source in compose["volumes"], "the data lives in a named volume"
    test = db["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    for port in db.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), "the database is published on localhost only"


def test_migrate_service(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert migrate["build"]["context"] == "."
    assert migrate["restart"] == "no"  # a string: YAML's bare `no` would be false
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    env = env_of(migrate)
    url = env["MMATS_DATABASE_URL"]
    assert re.fullmatch(r"postgresql://postgres@db:5432/mmats", url), "no password in the URL"
    assert env["PGPASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert env["MMATS_READONLY_PASSWORD"].startswith("${MMATS_READONLY_PASSWORD:?")
    script = " ".join(migrate["command"])
    steps = [shlex.split(step) for step in script.split("&&")]
    assert steps[0] == ["mmats", "db", "upgrade"]
    assert steps[1] == ["mmats", "db", "set-password", "mmats_readonly",
                        "--password-env", "MMATS_READONLY_PASSWORD"]
    assert migrate["entrypoint"][:2] == ["/bin/sh", "-ec"], "a failing step fails the service"


def test_grafana_service(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    image, _, tag = grafana["image"].partition(":")
    assert image in ("grafana/grafana", "grafana/grafana-oss")
    assert tag and tag != "latest", "pin Grafana: the dashboards are written for one schema"
    assert grafana["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    env = env_of(grafana)
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["MMATS_READONLY_PASSWORD"].startswith("${MMATS_READONLY_PASSWORD:?")
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
    assert mounts["/etc/grafana/provisioning"] == ("./grafana/provisioning", ["ro"])
    dashboards = [t for t, (s, _) in mounts.items() if s == "./grafana/dashboards"]
    assert len(dashboards) == 1 and mounts[dashboards[0]][1] == ["ro"]
    assert mounts["/var/lib/grafana"][0] in compose["volumes"]
    for source, _ in mounts.values():
        if source.startswith("./"):
            assert (REPO / source).is_dir(), source
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home.startswith(dashboards[0] + "/")
        assert (REPO / "grafana" / "dashboards" / home[len(dashboards[0]) + 1:]).is_file()
    assert any(str(p).endswith(":3000") for p in grafana["ports"])
    test = grafana["healthcheck"]["test"]
    assert "/api/health" in (test if isinstance(test, str) else " ".join(test))


def test_no_literal_secrets(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in env_of(service).items():
            if SECRET_KEY.search(key):
                # required (${VAR:?message}), or optional with no default (${VAR:-})
                assert re.fullmatch(r"\$\{\w+(:\?[^}]*|:-)?\}", value), (
                    f"{name}.{key} must come from the environment, as ${{VAR:?message}}")
            assert not re.search(r"://[^/@\s]*:[^/@\s]*@", value), f"{name}.{key}: password in URL"
    text = COMPOSE_FILE.read_text()
    literal = re.search(r"(?i)password\s*[=:]\s*[\"']?(?!\$)\w", text)
    assert literal is None, f"a literal password: {literal.group(0) if literal else ''}"


def test_every_variable_is_in_the_env_example(compose: dict[str, Any]) -> None:
    used = {m.group("name") or m.group("bare")
            for value in strings(compose) for m in VAR_REF.finditer(value.replace("$$", ""))}
    documented = example_env()
    assert used <= set(documented), f"missing in deploy/env.example: {used - set(documented)}"
    for key, value in documented.items():
        if SECRET_KEY.search(key) and not key.endswith("_USER"):
            assert value == "", f"deploy/env.example must not carry a value for {key}"


def test_interpolation_requires_the_secrets(compose: dict[str, Any]) -> None:
    resolved = interpolate_all(compose, filled_env())
    assert env_of(resolved["services"]["db"])["POSTGRES_PASSWORD"] == \
        "test-value-for-postgres_password"
    assert resolved["services"]["grafana"]["ports"] == ["3000:3000"]
    for secret in ("POSTGRES_PASSWORD", "MMATS_READONLY_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        env = filled_env()
        del env[secret]
        with pytest.raises(ValueError, match=secret):
            interpolate_all(compose, env)
    # the runtime service's key (profile "trading") must not stop a plain `up`: compose
    # interpolates every service, whatever its profile
    env = filled_env()
    del env["MMATS_MASTER_KEY"]
    assert env_of(interpolate_all(compose, env)["services"]["runtime"])["MMATS_MASTER_KEY"] == ""


def test_docker_compose_config_if_available(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True,
                                    check=False).returncode != 0:
        pytest.skip("the `docker compose` client plugin is not installed")
    env = {**os.environ, **filled_env()}
    result = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
                            capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def test_dockerfile_base_and_install() -> None:
    stage = final_stage()
    base = stage[0][1].split()[0]
    assert re.fullmatch(r"python:3\.1[12]-slim(-\w+)?", base), base
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert re.search(r"pip (install|wheel)\b.*\s\.(\s|$)", runs), "the project itself is built"
    assert any(word == "RUN" and "pip install" in rest for word, rest in stage)


def test_dockerfile_runs_as_non_root() -> None:
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users, "the final stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_entrypoint_is_mmats() -> None:
    import json

    entrypoints = [rest for word, rest in final_stage() if word == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["mmats"]


def test_dockerignore_keeps_secrets_out() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".env", ".git", ".mmats", "tests"} <= patterns


# --------------------------------------------------------------------------- CLI wiring
def test_set_password_command_is_exported() -> None:
    from api.cli_roles import set_password_command

    assert set_password_command.name == "set-password"


def test_migrate_commands_exist_in_the_cli(compose: dict[str, Any]) -> None:
    import click

    from api import cli

    cli._register_subcommands()
    script = " ".join(compose["services"]["migrate"]["command"])
    for step in script.split("&&"):
        words = shlex.split(step)
        assert words[0] == "mmats"
        command: click.Command = cli.cli
        for word in words[1:]:
            if word.startswith("-") or not isinstance(command, click.Group):
                break
            sub = command.commands.get(word)
            if sub is None:
                if word == "set-password":
                    pytest.skip("`mmats db set-password` is not attached to the CLI yet "
                                "(api/cli.py: db_group.add_command(set_password_command))")
                pytest.fail(f"`{step.strip()}`: no command {word!r}")
            command = sub


# --------------------------------------------------------------------------- migrate run
@pytest.mark.slow
def test_migrate_command_runs_as_compose_runs_it(empty_db_url: str, compose: dict[str, Any]
                                                 ) -> None:
    """The migrate service's script, run by /bin/sh with its environment as compose
    builds it (password in PGPASSWORD, not in the URL) against an empty database; twice,
    as every `docker compose up` does. Afterwards mmats_readonly signs in over TCP."""
    import sys

    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    migrate = compose["services"]["migrate"]
    params = conninfo_to_dict(empty_db_url)
    url = (f"postgresql://{params['user']}@{params['host']}:{params['port']}/"
           f"{params['dbname']}")
    readonly_password = "grafana-reads-0123456789"
    env = {**os.environ, "MMATS_DATABASE_URL": url, "PGPASSWORD": str(params.get("password", "")),
           "MMATS_READONLY_PASSWORD": readonly_password,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MMATS_CONFIG", None)

    with psycopg.connect(empty_db_url, autocommit=True) as admin:
        saved = admin.execute("SELECT rolpassword FROM pg_authid "
                              "WHERE rolname = 'mmats_readonly'").fetchone()
    try:
        outputs = []
        for _ in range(2):
            result = subprocess.run([*migrate["entrypoint"], *migrate["command"]], env=env,
                                    capture_output=True, text=True, timeout=300, check=False)
            assert result.returncode == 0, result.stderr
            assert readonly_password not in result.stdout + result.stderr
            assert str(params["password"]) not in result.stdout + result.stderr
            outputs.append(result.stdout)
        assert "applied" in outputs[0]
        assert "nothing to do" in outputs[1]
        assert outputs[1].rstrip().endswith("login password of mmats_readonly set")
        ro = make_conninfo(empty_db_url, user="mmats_readonly", password=readonly_password)
        with psycopg.connect(ro) as c:
            assert c.execute("SELECT count(*) FROM market.bar_coverage").fetchone() == (0,)
    finally:
        with psycopg.connect(empty_db_url, autocommit=True) as admin:
            if saved is None or saved[0] is None:
                admin.execute("ALTER ROLE mmats_readonly PASSWORD NULL")
            else:
                admin.execute(sql.SQL("ALTER ROLE mmats_readonly PASSWORD {}").format(
                    sql.Literal(saved[0])))
