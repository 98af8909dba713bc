"""Structured JSON logs for workers, with secrets redacted.

Every line is one JSON object: `ts` (UTC, ISO 8601), `level`, `worker`, `event`, the
message, and any `extra` fields. Secret values are redacted wherever they appear, in the
message, in fields and in tracebacks: credentials register themselves with
`register_secret` the moment they are decrypted, every worker registers its database URL
with `register_url` (its password, and the pieces of it a driver can quote as a host name
when the password holds an unencoded @), and keys that name secrets (`api_key`, `secret`,
`password`, `token`, ...) are masked whatever their value.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from db.config import ConfigError, TextRedactor, load_settings, redact_passwords

REDACTED = "***"
_SECRET_KEYS = re.compile(r"(secret|password|passphrase|token|api[_-]?key|private[_-]?key|"
                          r"authorization|master[_-]?key)", re.IGNORECASE)
_lock = threading.Lock()
_secrets: set[str] = set()
_urls: set[str] = set()
# what `redact` applies, prepared at each registration: (the URLs' redactor, the secrets
# longest first); a log line redacts a dozen strings, each must not parse the URLs again
_prepared: tuple[TextRedactor, tuple[str, ...]] = (TextRedactor(), ())


def _prepare() -> None:  # under _lock
    global _prepared
    _prepared = (TextRedactor(_urls), tuple(sorted(_secrets, key=len, reverse=True)))


def register_secret(value: str | None) -> None:
    """Redact `value` from every log line from now on (values shorter than 4 are ignored:
    they would redact ordinary words)."""
    if value and len(value) >= 4:
        with _lock:
            if value not in _secrets:
                _secrets.add(value)
                _prepare()


def register_url(url: str | None) -> None:
    """Redact `url` (a database URL) and every piece of its password from every log line
    from now on: libpq names a password's tail as the host when the password holds an
    unencoded @ ("failed to resolve host 'tail@127.0.0.1'"). Short pieces are redacted
    only where they cannot be an ordinary word (quoted, or before an @)."""
    if url:
        with _lock:
            if url not in _urls:
                _urls.add(url)
                _prepare()


def redact(text: str) -> str:
    urls, secrets = _prepared
    text = urls(text)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    # and passwords in URLs (up to the last @: a password may hold one) and password=...
    return redact_passwords(text)


def redact_value(key: str, value: Any) -> Any:
    """`value` (of a field named `key`) fit to log or store: strings redacted, containers
    walked (dict keys redacted too), numbers as they are, anything else (an exception,
    bytes, a Decimal, ...) as its redacted ``str()``, so no value reaches JSON unredacted."""
    if _SECRET_KEYS.search(key) and value is not None and not (
            isinstance(value, str) and value == ""):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):  # a number stays one, unless it is a secret
        return value if redact(str(value)) == str(value) else redact(str(value))
    if isinstance(value, dict):
        return {redact(str(k)): redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(key, v) for v in value]
    try:
        text = str(value)
    except Exception:  # a broken __str__ must not break logging
        text = f"<unprintable {type(value).__name__}>"
    return redact(text)


def redact_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Structured fields (a log line's, an error row's details) with keys and values
    redacted."""
    return {redact(str(k)): redact_value(str(k), v) for k, v in fields.items()}


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        # a record goes to each handler (stderr and the log file): format it once
        done = record.__dict__.get("_mmats_line")
        if done is not None and done[0] == self.worker:
            return done[1]
        text = self._format(record)
        record.__dict__["_mmats_line"] = (self.worker, text)
        return text

    def _format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "worker": self.worker,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(redact_fields(fields))
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)


def _configured_database_url() -> str | None:
    try:
        return load_settings().database_url
    except (ConfigError, ValueError, OSError):  # reported where the URL is used
        return None


def setup(worker: str, *, level: str = "INFO", stream: TextIO | None = None,
          file: str | None = None, database_url: str | None = None) -> logging.Logger:
    """Route the `mmats` loggers to JSON lines on `stream` (stderr) and, if given, `file`.
    The database URL (`database_url`, else the configured one: MMATS_DATABASE_URL or
    mmats.toml) is registered for redaction first (`register_url`)."""
    register_url(database_url or _configured_database_url())
    root = logging.getLogger("mmats")
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if file:
        handlers.append(logging.FileHandler(file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(JsonFormatter(worker))
        root.addHandler(handler)
    root.propagate = False
    return root


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"mmats.{name}")


def event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `msg` with structured `fields` (redacted like the message)."""
    logger.log(level, msg, extra={"fields": fields})
