"""Structured JSON logs for workers, with secrets redacted.

Every line is one JSON object: `ts` (UTC, ISO 8601), `level`, `worker`, `event`, the
message, and any `extra` fields. Secret values are redacted wherever they appear, in the
message, in fields and in tracebacks: credentials register themselves with
`register_secret` the moment they are decrypted, and keys that name secrets (`api_key`,
`secret`, `password`, `token`, ...) are masked whatever their value.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

REDACTED = "***"
_SECRET_KEYS = re.compile(r"(secret|password|passphrase|token|api[_-]?key|private[_-]?key|"
                          r"authorization|master[_-]?key)", re.IGNORECASE)
# URLs with a password (postgresql://user:pw@host)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://[^:/@\s]+:)[^@\s]+@", re.IGNORECASE)

_lock = threading.Lock()
_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Redact `value` from every log line from now on (values shorter than 4 are ignored:
    they would redact ordinary words)."""
    if value and len(value) >= 4:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _URL_PASSWORD.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def redact_value(key: str, value: Any) -> Any:
    if _SECRET_KEYS.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(key, v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "worker": self.worker,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line[key] = redact_value(key, value)
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str, ensure_ascii=False)


def setup(worker: str, *, level: str = "INFO", stream: TextIO | None = None,
          file: str | None = None) -> logging.Logger:
    """Route the `mmats` loggers to JSON lines on `stream` (stderr) and, if given, `file`."""
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
