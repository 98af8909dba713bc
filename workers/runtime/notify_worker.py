"""The notifier of `mmats run`: `[notifications]` delivered from the audit chain."""

from __future__ import annotations

import psycopg

from workers.notify import Notifier
from workers.runtime.config import RuntimeConfig, RuntimeConfigError
from workers.runtime.worker import Worker, connect


class NotifierWorker(Worker):
    kind = "notifier"

    def __init__(self, url: str, notifier: Notifier, *, name: str = "notifier",
                 heartbeat_seconds: float = 5.0) -> None:
        super().__init__(url, name, heartbeat_seconds=heartbeat_seconds)
        self.notifier = notifier

    def start(self) -> None:
        self.notifier.start()

    def step(self) -> None:
        try:
            self.notifier.poll_once()
        except psycopg.Error as exc:  # an outage is polled through
            self.report("NOTIFIER_POLL_FAILED", str(exc).splitlines()[0])
        self.stop_event.wait(self.notifier.poll_interval)

    def close(self) -> None:
        self.notifier.close()


def build_notifier(url: str, config: RuntimeConfig, *, name: str = "notifier") -> Worker:
    table = dict(config.notifications)
    if not table.get("channels"):
        raise RuntimeConfigError("no [[notifications.channels]] configured")
    notifier = Notifier.from_config(lambda: connect(url, "mmats_api"), table)
    return NotifierWorker(url, notifier, name=name, heartbeat_seconds=config.heartbeat_seconds)
