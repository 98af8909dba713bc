"""Settings: one TOML file plus ``MMATS_*`` environment variables (the variables win).

The file is ``mmats.toml`` in the working directory, or the path in ``MMATS_CONFIG``.
Secrets never belong here: a database URL with a password should come from the
environment, and it is never printed with its password (see ``redact_url``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote


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


DATABASE_KEYS = ("home", "url")  # the keys of the file's [database] table


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {str(exc).splitlines()[0]}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} "
                          f"at offset {exc.start}): a TOML file is UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror or exc}") from exc


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
        unknown = sorted(set(section) - set(DATABASE_KEYS))
        if unknown:
            raise ConfigError(f"{config_path}: unknown key {', '.join(map(repr, unknown))} in "
                              f"[database] (known: {', '.join(DATABASE_KEYS)})")
        file_values = section
    elif env.get("MMATS_CONFIG"):
        if config_path.is_dir():
            raise ConfigError(f"MMATS_CONFIG names {config_path}, which is a folder, not a "
                              "TOML file")
        raise ConfigError(f"MMATS_CONFIG names {config_path}, which does not exist")

    home_value = env.get("MMATS_HOME") or file_values.get("home") or ".mmats"
    url_value = env.get("MMATS_DATABASE_URL") or file_values.get("url") or None
    if not isinstance(home_value, str):
        raise ConfigError("database.home must be a string")
    if url_value is not None and not isinstance(url_value, str):
        raise ConfigError("database.url must be a string")
    if url_value is not None and not url_value.startswith(("postgresql://", "postgres://")):
        hint = ""
        if not _SCHEME.match(url_value) and "=" in url_value:
            hint = " (a key=value connection string: write it as a postgresql:// URL)"
        raise ConfigError(
            f"MMATS_DATABASE_URL must start with postgresql://, got {redact_url(url_value)!r}"
            f"{hint}"
        )
    return Settings(home=Path(home_value).expanduser().resolve(), database_url=url_value,
                    config_file=config_file)


_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# password=... in a URL's query string (up to & or #)
_QUERY_PASSWORD = re.compile(r"(?P<key>(?:^|[?&;])(?:ssl)?password=)[^&#]*", re.IGNORECASE)
# password=... in a libpq key=value string: a quoted value or a word (backslash escapes)
_DSN_PASSWORD = re.compile(r"(?P<key>(?<![\w.-])(?:ssl)?password\s*=\s*)"
                           r"(?P<value>'(?:[^'\\]|\\.)*'?|(?:\\.|\S)*)", re.IGNORECASE)
# the same in a message, where the value ends at a quote too
_TEXT_PASSWORD = re.compile(r"(?P<key>(?<![\w.-])(?:ssl)?password\s*=\s*)[^\s'\"&]*",
                            re.IGNORECASE)
# user:password@ anywhere (a URL without a scheme, a URL inside a message): up to the last @.
# Applied by `_mask_userinfo`, in linear time. The user starts a run of the characters a
# user may have (from inside a run the match would be the same, found later: trying every
# position of a long run made it quadratic); a scheme before it is kept as it is.
_USERINFO = re.compile(r"(?P<user>(?<![^\s:/@'\"])[^\s:/@'\"]++:(?!//))[^\s'\"]*@",
                       re.IGNORECASE)
# the same in a message: only in a URL (scheme://user:password@). The match starts a run of
# scheme characters: the scheme starts at its first letter (the digits, +, . or - before it
# are kept as they are)
_URL_USERINFO = re.compile(r"(?<![a-z0-9+.-])(?P<user>[0-9+.-]*+[a-z][a-z0-9+.-]*+://"
                           r"[^\s:/@'\"]++:)[^\s'\"]*@", re.IGNORECASE)
# where a user:password@ can be: a run without a space or a quote (its password runs to the
# run's last @, so there is one at most in each)
_WORD = re.compile(r"[^\s'\"]+")
_MASK = "***"
_MIN_FREE_LENGTH = 4  # shorter pieces are redacted only where they cannot be a word


def _mask_userinfo(pattern: re.Pattern[str], text: str) -> str:
    """`text` with the password of `pattern`'s user:password@ masked (`_USERINFO`,
    `_URL_USERINFO`), in time linear in its length: each run without a space or a quote
    is searched up to its last @ only (where such a match ends), once."""
    def word(m: re.Match[str]) -> str:
        run = m.group(0)
        at = run.rfind("@")
        if at < 0:
            return run
        head = pattern.sub(lambda u: u.group("user") + _MASK + "@", run[:at + 1], count=1)
        return head + run[at + 1:]
    return _WORD.sub(word, text)


def _split_url(url: str) -> tuple[str, str, str]:
    """(scheme://, userinfo, the rest) of a URL, by text alone (no parsing that can fail).
    The userinfo runs to the *last* @ before the query, so a password with an unencoded @
    (or /) is all userinfo; with no @ before the query, to the last @ after it (a
    password with an unencoded ?)."""
    scheme = _SCHEME.match(url)
    assert scheme is not None
    rest = url[scheme.end():]
    query = rest.find("?")
    at = rest.rfind("@", 0, query) if query >= 0 else rest.rfind("@")
    if at < 0 and query >= 0:
        at = rest.rfind("@")
    if at < 0:
        return scheme.group(0), "", rest
    return scheme.group(0), rest[:at], rest[at:]


def redact_url(url: str) -> str:
    """The URL (or libpq key=value string) with any password replaced by ``***``: in the
    user info (``user:pw@``, even with an unencoded @ in the password), in a
    ``password=`` query parameter, and in a ``password=`` key of a key=value string.
    Never raises: a URL that does not parse is redacted as text."""
    if not _SCHEME.match(url):
        text = _DSN_PASSWORD.sub(lambda m: m.group("key") + _MASK, url)
        return _mask_userinfo(_USERINFO, text)
    scheme, userinfo, rest = _split_url(url)
    user, colon, password = userinfo.partition(":")
    if colon and password:
        userinfo = f"{user}:{_MASK}"
    return scheme + userinfo + _QUERY_PASSWORD.sub(lambda m: m.group("key") + _MASK, rest)


def url_secrets(url: str) -> list[str]:
    """Every piece of `url` that is (part of) its password, as written and decoded: the
    whole password, and the pieces either side of each unencoded @ in it (a parser that
    stops at the first @ reads the rest as the host name, and names it in its errors)."""
    found: list[str] = []
    if _SCHEME.match(url):
        _scheme, userinfo, rest = _split_url(url)
        _user, colon, password = userinfo.partition(":")
        if colon and password:
            found.append(password)
            pieces = password.split("@")
            for i in range(1, len(pieces)):
                found.append("@".join(pieces[:i]))
                found.append("@".join(pieces[i:]))
        for m in _QUERY_PASSWORD.finditer(rest):
            found.append(m.group(0)[len(m.group("key")):])
    else:
        for m in _DSN_PASSWORD.finditer(url):
            value = m.group("value")
            found.append(value)
            unquoted = value[1:-1] if len(value) > 1 and value[0] == value[-1] == "'" else value
            found.append(re.sub(r"\\(.)", r"\1", unquoted.lstrip("'")))
    found += [unquote(f) for f in found]
    unique = {f for f in found if f}
    return sorted(unique, key=len, reverse=True)


class TextRedactor:
    """`redact_text` for a fixed set of URLs, prepared once (each URL's redacted form and
    the pieces of its password, the short pieces' patterns compiled): a worker formats
    every log line through one, so the URLs are not parsed again for every string."""

    def __init__(self, urls: Iterable[str | None] = ()) -> None:
        self._steps: list[tuple[str, str, re.Pattern[str] | None]] = []
        for url in sorted({u for u in urls if u}, key=len, reverse=True):
            self._steps.append((url, redact_url(url), None))
            for secret in url_secrets(url):
                if len(secret) >= _MIN_FREE_LENGTH:
                    self._steps.append((secret, _MASK, None))
                else:  # a short piece only where it stands quoted, or before an @
                    self._steps.append((secret, _MASK, re.compile(
                        r"(?<=[\"'])" + re.escape(secret) + r"(?=[\"'])|"
                        + re.escape(secret) + r"(?=@)")))

    def __call__(self, text: str) -> str:
        for piece, replacement, pattern in self._steps:
            if piece in text:  # a piece not in the text is nothing to replace
                text = text.replace(piece, replacement) if pattern is None else (
                    pattern.sub(replacement, text))
        return redact_passwords(text)


def redact_text(text: str, *urls: str | None) -> str:
    """`text` (an error message, a traceback) with each of `urls` and every piece of their
    passwords replaced: what a driver or libpq says about a bad URL can quote the URL, or
    a piece of its password as a host name."""
    return TextRedactor(urls)(text)


def redact_passwords(text: str) -> str:
    """`text` with every password=... and the password of every scheme://user:pw@ masked."""
    if "=" in text:  # each pattern needs its character: most text has neither
        text = _TEXT_PASSWORD.sub(lambda m: m.group("key") + _MASK, text)
    return _mask_userinfo(_URL_USERINFO, text) if "@" in text else text
