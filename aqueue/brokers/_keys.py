"""Every Redis key and channel aqueue uses, in one place.

All keys of one queue share the hash tag `{name}`, so they live in one Redis Cluster slot and the Lua
scripts (which derive job keys from the prefix) stay valid on a cluster. Scripts receive the prefix
as KEYS[1] so that a cluster client routes them to that slot.
"""

from __future__ import annotations

GROUP = "workers"
"""The consumer group every worker of a queue reads through."""


class Keys:
    """Key names of one queue."""

    __slots__ = ("dead", "index", "prefix", "priorities", "revoked_tasks", "scheduled")

    def __init__(self, queue: str) -> None:
        if "{" in queue or "}" in queue:
            raise ValueError(f"queue name {queue!r} must not contain braces")
        self.prefix = f"aqueue:{{{queue}}}:"
        self.priorities = self.prefix + "priorities"  # zset: priority bands that have a stream
        self.scheduled = self.prefix + "scheduled"  # zset: job id -> eta
        self.index = self.prefix + "index"  # zset: job id -> enqueued_at, for listing
        self.dead = self.prefix + "dead"  # zset: job id -> when it died
        self.revoked_tasks = self.prefix + "revoked_tasks"  # hash: task -> "<once>|<until>"

    def stream(self, priority: int | str) -> str:
        """One stream per priority band in use."""
        return f"{self.prefix}stream:{priority}"

    def job(self, job_id: str) -> str:
        """A hash: the job's record."""
        return f"{self.prefix}job:{job_id}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}key:{key}"

    def lock(self, name: str) -> str:
        """A lock's key, and the channel its release is announced on."""
        return f"{self.prefix}lock:{name}"

    def done_channel(self, waiter: str) -> str:
        """A waiting process's inbox: the outcomes of the jobs it waits on are published here."""
        return f"{self.prefix}done:{waiter}"
