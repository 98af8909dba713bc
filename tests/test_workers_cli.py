"""`mmats workers [--check N]`: the heartbeats, and the health check of the runtime service."""

from __future__ import annotations

import psycopg
import pytest
from click.testing import CliRunner

from api.cli_runtime import workers_command
from db.errors import MmatsError
from workers.runtime import log
from workers.runtime.worker import Worker


def _run(db_url: str, *args: str) -> tuple[object, str]:
    result = CliRunner().invoke(workers_command, list(args),
                                env={"MMATS_DATABASE_URL": db_url})
    return result.exception, result.output


def test_the_check_fails_without_workers_passes_when_they_beat_and_fails_when_stale(db_url):
    exc, out = _run(db_url, "--check", "60")
    assert isinstance(exc, MmatsError) and "no worker reported" in str(exc)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SET ROLE mmats_router")
        conn.execute("SELECT runtime.heartbeat('router', 'router', 'running', 42, 'h')")
        conn.execute("SELECT runtime.report_error('router', 'BROKER_RETRYING', 'still trying')")
    exc, out = _run(db_url, "--check", "60")
    assert exc is None, out
    assert "router" in out and "running" in out and "BROKER_RETRYING: still trying" in out
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE runtime.workers SET beat_at = now() - interval '5 minutes'")
    exc, _ = _run(db_url, "--check", "60")
    assert isinstance(exc, MmatsError) and "stale heartbeat: router" in str(exc)
    with psycopg.connect(db_url, autocommit=True) as conn:  # a stopped worker is not stale
        conn.execute("UPDATE runtime.workers SET state = 'stopped'")
    exc, _ = _run(db_url, "--check", "60")
    assert exc is None


@pytest.mark.parametrize("detail", ["[]", "\"text\""])
def test_a_heartbeat_needs_an_object_and_an_error_a_code(db_url, detail):
    with psycopg.connect(db_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="JSON object"):
            conn.execute(f"SELECT runtime.heartbeat('w', 'router', 'running', 1, 'h', '{detail}')")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="UPPER_SNAKE"):
            conn.execute("SELECT runtime.report_error('w', 'not a code', 'x')")
        assert conn.execute("SELECT count(*) FROM runtime.errors").fetchone() == (0,)


def test_a_reported_error_is_stored_and_shown_redacted(db_url):
    """Worker.report redacts the runtime.errors row (and so `mmats workers`, the audit
    event and the notifier's message) like the JSON log line, not just the log line."""
    secret, account_no = "LIVE-API-KEY-report-0123456789", "acct-7731-0042-report"
    log.register_secret(secret)
    log.register_secret(account_no)

    class Router(Worker):
        kind = "router"

    worker = Router(db_url, "router")
    worker.report("BROKER_ERROR", f"binance rejected key {secret}: invalid signature",
                  venue_error=f"apiKey={secret}", per_key={account_no: "denied"}, attempts=2)
    worker.beat("stopped", force=True, error=f"stopped on {secret}")
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT message, details FROM runtime.errors").fetchone()
        payload = conn.execute("SELECT payload::text FROM audit.events "
                               "WHERE event_type = 'worker.error'").fetchone()
        beat = conn.execute("SELECT detail::text FROM runtime.workers").fetchone()
    assert row == ("binance rejected key ***: invalid signature",
                   {"venue_error": "apiKey=***", "per_key": {"***": "denied"}, "attempts": 2})
    assert payload is not None and secret not in payload[0] and account_no not in payload[0]
    assert beat is not None and secret not in beat[0] and "stopped on ***" in beat[0]
    exc, out = _run(db_url)
    assert exc is None, out
    assert "BROKER_ERROR: binance rejected key ***: invalid signature" in out
    assert secret not in out and account_no not in out
