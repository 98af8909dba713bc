"""MMATS's sessions read and print times in UTC whatever the server's TimeZone or the
client's PGTZ say (with PGTZ=America/New_York, `mmats runs` printed a run of 2010-01-01
to 2010-04-01 as 2009-12-31 to 2010-03-31, unlabelled)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from db.connect import connect
from workers.runtime.worker import connect as worker_connect


@pytest.mark.parametrize("autocommit", [False, True])
def test_cli_and_worker_sessions_are_utc_under_another_pgtz(
        db_url: str, monkeypatch: pytest.MonkeyPatch, autocommit: bool) -> None:
    monkeypatch.setenv("PGTZ", "America/New_York")
    for conn in (connect(db_url, autocommit=autocommit),
                 worker_connect(db_url, "mmats_router", autocommit=autocommit)):
        with conn:
            assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
            ts = conn.execute("SELECT '2010-04-01 00:00+00'::timestamptz").fetchone()[0]
            assert ts.utcoffset() == timedelta(0) and ts == datetime(2010, 4, 1, tzinfo=UTC)
            assert ts.date().isoformat() == "2010-04-01"  # (what a CLI prints)
