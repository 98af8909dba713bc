"""The supervisor's restarts: exponential backoff with jitter, reset after a healthy run.

The workers here are real child processes (a Python that exits at once); only the clock
the supervisor reads is a test's own, so hours of running take no time."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

from workers.runtime.supervisor import Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Crashing(Supervisor):
    """Each worker is a process that exits with status 3 at once."""

    def command(self, kind: str) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.exit(3)"]


def crash(sup: Supervisor, clock: Clock, *, ran: float) -> float:
    """Let the (only) worker run `ran` seconds of the test's clock, die, and be seen
    dead: returns the restart delay the supervisor chose, after restarting it."""
    child = next(iter(sup.children.values()))
    assert child.process is not None
    child.process.wait(30)
    clock.now += ran
    assert sup.poll()
    assert child.process is None  # waiting for its restart
    delay = child.next_start - clock.now
    clock.now = child.next_start
    sup.poll()  # restarted now
    assert child.process is not None
    return delay


def test_backoff_resets_after_a_healthy_run_and_is_jittered(tmp_path: Path) -> None:
    clock = Clock()
    sup = Crashing(tmp_path / "mmats.toml", ["router"], restart_base=0.5,
                   healthy_seconds=60.0, rng=random.Random(7), clock=clock)
    sup.start()
    try:
        # seven quick crashes in a row: the delay grows to the cap (30 s)
        quick = [crash(sup, clock, ran=1.0) for _ in range(8)]
        for n, delay in enumerate(quick):
            ceiling = min(30.0, 0.5 * 2 ** n)
            assert ceiling / 2 <= delay <= ceiling, (n, delay)
        assert quick[-1] >= 15.0
        # then it runs healthily for an hour before it crashes: it comes back quickly
        after_healthy = crash(sup, clock, ran=3600.0)
        assert 0.25 <= after_healthy <= 0.5
        assert sup.children["router"].restarts == 1
        # and grows again from there while it keeps crashing quickly
        assert 0.5 <= crash(sup, clock, ran=1.0) <= 1.0
    finally:
        sup.stop(timeout=5)


def test_restart_delays_are_jittered_not_all_the_full_backoff(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path / "mmats.toml", ["router"], restart_base=0.5,
                     rng=random.Random(1))
    at_cap = {round(sup.restart_delay(20), 6) for _ in range(50)}
    assert len(at_cap) > 40  # not one fixed wait for every crash
    assert all(15.0 <= d <= 30.0 for d in at_cap)
    first = [sup.restart_delay(1) for _ in range(50)]
    assert all(0.25 <= d <= 0.5 for d in first)


def test_a_worker_that_runs_long_on_the_real_clock_resets_too(tmp_path: Path) -> None:
    """The default clock: a run past `healthy_seconds` (here 0.2 s) resets the count."""
    sup = Crashing(tmp_path / "mmats.toml", ["router"], restart_base=0.01,
                   healthy_seconds=0.2, rng=random.Random(3))
    child = sup.children["router"]
    child.restarts = 9  # many crashes long ago
    sup.start()
    try:
        assert child.process is not None
        child.process.wait(30)
        time.sleep(0.3)
        sup.poll()
        assert child.restarts == 1
    finally:
        sup.stop(timeout=5)
