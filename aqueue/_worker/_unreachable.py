"""What a worker logs while its broker is out of reach: a line as the outage starts, a reminder
now and then, and a line when it is back. Its services (the fetch, the cancel listener, the
scheduler, lease renewal, pruning) each meet the outage, and each logging every failed call
flooded the log with several lines a second and never said it was over."""

from __future__ import annotations

import logging
import time

from aqueue._exceptions import BrokerConnectionError

logger = logging.getLogger("aqueue")

REMIND_EVERY = 30.0  # seconds between the reminders that the broker is still out of reach
REASONS_TOLD = 4  # the most reasons told as they change during one outage


class Unreachable:
    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() of the outage's first failed call
        self._reminded = 0.0
        self._reasons: set[str] = set()  # told during this outage
        self._failing: set[str] = set()  # the services whose calls failed during this outage
        self._answered = False  # whether the broker answered some of them, refusing (see reached)

    def failed(self, what: str, exc: Exception) -> None:
        """A call of the service `what` (its first word names the service: "renewing 3
        lease(s)") failed: told as an outage if it could not reach the broker, else as a
        warning of its own."""
        if not isinstance(exc, BrokerConnectionError):
            logger.warning("%s failed: %s", what, exc)
            return
        now = time.monotonic()
        self._failing.add(_service(what))
        if exc.answered:
            self._answered = True
        # What went wrong, without the details after it: a connection closed, then refused, is
        # one reason ("cannot reach Redis at ..."), told once; refused credentials are another.
        reason = str(exc).partition(": ")[0]
        if self.since is None:
            self.since = self._reminded = now
            self._reasons = {reason}
            logger.warning("broker unreachable (%s): %s; trying again until it answers", what, exc)
        elif reason not in self._reasons and len(self._reasons) < REASONS_TOLD:
            # Told as it changes: refused credentials after a connection cut off (a password
            # changed while the worker ran) make an outage that waiting does not end.
            self._reasons.add(reason)
            logger.warning("broker still unreachable after %.0fs (%s), now: %s",
                           now - self.since, what, exc)
        elif now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            logger.warning("broker still unreachable after %.0fs (%s): %s", now - self.since, what, exc)
        else:
            logger.debug("broker unreachable (%s): %s", what, exc)

    def reached(self, what: str) -> None:
        """A call of the service `what` went through: the outage is over. But where the broker
        answered calls, refusing them (`BrokerConnectionError.answered`), only a call of a
        service that failed ends it: a Redis that answers reads and refuses writes (a replica, a
        full `maxmemory`) ended the outage at every read, and began another at the next write,
        a warning or two a second."""
        if self.since is not None and (not self._answered or _service(what) in self._failing):
            logger.warning("broker reachable again after %.1fs", time.monotonic() - self.since)
            self.since = None
            self._failing = set()
            self._answered = False


def _service(what: str) -> str:
    return what.split(" ", 1)[0]
