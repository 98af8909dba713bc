"""Exponential backoff with jitter: how long a worker waits before it asks a venue again.

`BackoffPolicy` is the frozen configuration; `Backoff` is one caller's state (how many
failures in a row). The n-th consecutive failure (n = 0, 1, ...) waits a random time in
[(1 - jitter) * ceiling, ceiling] with ceiling = min(cap, base * multiplier ** n):
jitter = 1 is AWS's "full jitter", which spreads retries of many clients over the whole
window so they do not hammer a recovering venue in step; jitter = 0 is plain exponential.
A venue's own `retry_after` (a rate limit's Retry-After) is a floor, never shortened by
the jitter or the cap. A success resets the count, so the next fault starts small again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol


class RandomSource(Protocol):
    """What the policy needs of a random generator (`random.Random` fits)."""

    def random(self) -> float: ...


@dataclass(frozen=True)
class BackoffPolicy:
    """Seconds: `base` for the first retry, growing by `multiplier` up to `cap`."""

    base: float = 1.0
    cap: float = 300.0
    multiplier: float = 2.0
    jitter: float = 1.0  # fraction of the ceiling that is randomised: 1 = full jitter

    def __post_init__(self) -> None:
        if not (self.base > 0 and self.cap >= self.base):
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base} "
                             f"cap={self.cap}")
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"backoff jitter must be within 0..1, got {self.jitter}")

    def ceiling(self, attempt: int) -> float:
        """The longest wait after `attempt` earlier consecutive failures."""
        if attempt > 1000:  # multiplier ** attempt would overflow; the cap rules long ago
            return self.cap
        return min(self.cap, self.base * self.multiplier ** attempt)

    def bounds(self, attempt: int) -> tuple[float, float]:
        """(shortest, longest) wait for that attempt, before any retry_after floor."""
        top = self.ceiling(attempt)
        return top * (1 - self.jitter), top

    def start(self, rng: RandomSource | None = None) -> Backoff:
        """A fresh state for one caller (a feed's loop)."""
        return Backoff(self, rng if rng is not None else random.Random())


@dataclass
class Backoff:
    """One caller's consecutive failures; `next_delay` after a fault, `reset` after a success."""

    policy: BackoffPolicy
    rng: RandomSource = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        """Seconds to wait after one more failure (and count it)."""
        lo, hi = self.policy.bounds(self.attempts)
        self.attempts += 1
        delay = lo + (hi - lo) * self.rng.random()
        if retry_after is not None and retry_after > delay:
            delay = float(retry_after)
        return delay

    def reset(self) -> None:
        """A success: the next failure waits as little as the first one did."""
        self.attempts = 0
