"""No piece of the database password reaches a worker's log: libpq, given a password with
an unencoded @, reads its tail as the host name and says so ("failed to resolve host
'tail@127.0.0.1'"). Every worker registers its database URL for redaction when it is
built, and `log.setup` registers the configured one (MMATS_DATABASE_URL)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import psycopg
import pytest

from workers.notify import Notifier
from workers.runtime import log
from workers.runtime.notify_worker import NotifierWorker
from workers.runtime.worker import Worker

# nothing listens on port 1; the host part libpq reads is "<tail>@127.0.0.1"
TAIL = "ss-secret-word-7f3a"


def url(tail: str) -> str:
    return f"postgresql://mmats:pa@{tail}@127.0.0.1:1/mmats?connect_timeout=2"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger("mmats")
    saved = (list(root.handlers), root.propagate, root.level)
    stream = io.StringIO()
    log.setup("test", level="DEBUG", stream=stream)
    yield stream
    root.handlers[:], root.propagate = saved[0], saved[1]
    root.setLevel(saved[2])


@pytest.mark.parametrize("kind", ["worker", "notifier"])
def test_a_worker_never_logs_a_piece_of_its_database_password(
        kind: str, json_log: io.StringIO) -> None:
    tail = f"{TAIL}-{kind}"
    worker: Worker
    if kind == "notifier":
        worker = NotifierWorker(url(tail), Notifier(lambda: psycopg.connect(url(tail)), []))
    else:
        worker = Worker(url(tail), "ingest")
    worker.beat("starting", force=True)  # libpq cannot connect: "heartbeat failed"
    worker.report("FEED_STALE", "no bars for 5m")  # nor record the error
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    errors = [line["error"] for line in lines if "error" in line]
    assert len(errors) == 2 and all("failed to resolve host '***@127.0.0.1'" in e
                                    for e in errors), errors
    assert tail not in json_log.getvalue()


def test_log_setup_registers_the_configured_database_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tail = f"{TAIL}-setup"
    monkeypatch.setenv("MMATS_DATABASE_URL", url(tail))
    root = logging.getLogger("mmats")
    saved = (list(root.handlers), root.propagate, root.level)
    stream = io.StringIO()
    try:
        log.setup("supervisor", stream=stream)
        log.event(log.get("supervisor"), "worker exited",
                  error=f"failed to resolve host '{tail}@127.0.0.1'")
    finally:
        root.handlers[:], root.propagate = saved[0], saved[1]
        root.setLevel(saved[2])
    assert tail not in stream.getvalue()
    assert "failed to resolve host '***@127.0.0.1'" in stream.getvalue()
    # short pieces are redacted only where they cannot be a word: quoted, or before an @
    assert log.redact("pa, a word; 'pa' quoted") == "pa, a word; '***' quoted"


def test_a_secret_registered_between_lines_is_redacted_from_the_next_in_every_handler(
        tmp_path) -> None:
    # the redaction is prepared at each registration, and a record is formatted once for
    # both of a worker's handlers (stderr and its log file)
    root = logging.getLogger("mmats")
    saved = (list(root.handlers), root.propagate, root.level)
    stream, file = io.StringIO(), tmp_path / "worker.log"
    secret = "kx-9f8e7d6c5b4a-between-lines"
    try:
        log.setup("router", stream=stream, file=str(file))
        logger = log.get("router")
        log.event(logger, "before", detail=f"key {secret}")
        log.register_secret(secret)
        log.event(logger, "after", detail=f"key {secret}", **{f"k {secret}": 1})
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.propagate = saved[0], saved[1]
        root.setLevel(saved[2])
    for text in (stream.getvalue(), file.read_text(encoding="utf-8")):
        before, after = (json.loads(line) for line in text.splitlines())
        assert before["detail"] == f"key {secret}"  # not yet a secret when it was logged
        assert after["detail"] == "key ***" and after["k ***"] == 1 and secret not in str(after)
