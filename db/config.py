"""Settings: one TOML file plus ``MMATS_*`` environment variables (the variables win).

The file is ``mmats.toml`` in the working directory, or the path in ``MMATS_CONFIG``.
Secrets never belong here: a database URL with a password should come from the
environment, and it is never printed with its password (see ``redact_url``).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


class ConfigError(ValueError):
    """The configuration file or an MMATS_* variable is invalid."""


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str | None
    config_file: Path | None

    @property
    def embedded(self) -> bool:
        return self.database_url is None


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def load_settings(env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    config_path = Path(env["MMATS_CONFIG"]) if env.get("MMATS_CONFIG") else Path("mmats.toml")
    file_values: dict[str, object] = {}
    config_file: Path | None = None
    if config_path.is_file():
        config_file = config_path.resolve()
        raw = _read_toml(config_path)
        section = raw.get("database", {})
        if not isinstance(section, dict):
            raise ConfigError(f"{config_path}: [database] must be a table")
        file_values = section
    elif env.get("MMATS_CONFIG"):
        raise ConfigError(f"MMATS_CONFIG names {config_path}, which does not exist")

    home_value = env.get("MMATS_HOME") or file_values.get("home") or ".mmats"
    url_value = env.get("MMATS_DATABASE_URL") or file_values.get("url") or None
    if not isinstance(home_value, str):
        raise ConfigError("database.home must be a string")
    if url_value is not None and not isinstance(url_value, str):
        raise ConfigError("database.url must be a string")
    if url_value is not None and not url_value.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"MMATS_DATABASE_URL must start with postgresql://, got {redact_url(url_value)!r}"
        )
    return Settings(home=Path(home_value).expanduser().resolve(), database_url=url_value,
                    config_file=config_file)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
