"""Riding through a broker out of reach for a while (Redis restarting, a failover): a wait tries
again, after a pause that grows, rather than fail at the first lost connection."""

from __future__ import annotations

import random
import time

import anyio

# With no timeout of its own, a wait gives up once its tries have failed this long in a row
# (raising the lost connection's error).
RIDE_THROUGH = 30.0
RETRY_FIRST, RETRY_MOST = 0.05, 1.0


class OutOfReach:
    """How long a wait has been out of reach of its broker, and its pause before it tries again."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.backoff = RETRY_FIRST

    def reached(self) -> None:
        self.since, self.backoff = None, RETRY_FIRST

    def failed(self) -> float:
        """Count a failed try; returns how long tries have failed in a row (from the first)."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return now - self.since

    def for_too_long(self) -> bool:
        """A failed try, RIDE_THROUGH seconds or more after the first failure in a row."""
        return self.failed() >= RIDE_THROUGH

    async def pause(self, at_most: float = RETRY_MOST) -> None:
        # Spread out: hundreds of waits may be trying again at once.
        await anyio.sleep(min(self.backoff * random.uniform(0.5, 1.0), at_most))
        self.backoff = min(self.backoff * 2, RETRY_MOST)
