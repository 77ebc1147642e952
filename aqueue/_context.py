"""The running job's context, reached from task code through `current_job()`."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aqueue._exceptions import AqueueError, TaskTimeout
from aqueue._serialization import encode_progress
from aqueue._time import to_datetime

if TYPE_CHECKING:
    from aqueue._queue import Queue
    from aqueue.brokers import Delivery

_current: ContextVar[JobContext | None] = ContextVar("aqueue_current_job", default=None)


@dataclass(eq=False)
class JobContext:
    """What a running task can learn about, and report on, its own job."""

    id: str
    task_name: str
    attempt: int
    queue: Queue = field(repr=False)
    _delivery: Delivery = field(repr=False)
    _deadline: float | None = field(default=None, repr=False)  # time.time() based
    batch_id: str | None = None
    """The batch this job is a member or a callback of."""
    _stopping: Callable[[], bool] = field(default=lambda: False, repr=False)

    @property
    def stopping(self) -> bool:
        """Whether its worker is shutting down (SIGINT/SIGTERM, `worker.stop()`): a long job may
        save its place and end early, in the grace the worker gives it (`--shutdown-timeout`),
        rather than be cancelled and handed back once that grace is out."""
        return self._stopping()

    @property
    def deadline(self) -> datetime | None:
        """When the job's timeout strikes (UTC), or None without a timeout."""
        return to_datetime(self._deadline)

    @property
    def time_remaining(self) -> float | None:
        """Seconds until the deadline (never negative), or None without a timeout."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.time())

    def check_timeout(self) -> None:
        """Raise `TaskTimeout` once past the deadline: for loops that rarely `await`."""
        if self._deadline is not None and time.time() >= self._deadline:
            raise TaskTimeout(f"job {self.id} ({self.task_name}) ran past its deadline")

    async def cancelled(self) -> bool:
        """Whether someone asked to cancel this job (for long jobs that check between steps)."""
        return bool(await self.queue.broker.cancel_requested(self.queue.name, [self.id]))

    async def set_progress(
        self, done: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Record progress, visible in `job.info().progress`."""
        progress = encode_progress(done, total, message, self.queue.max_payload_size)
        await self.queue.broker.set_progress(
            self.queue.name, self.id, self._delivery.token, progress
        )


def current_job() -> JobContext:
    """The context of the job running in this task; raises outside a job."""
    context = _current.get()
    if context is None:
        raise AqueueError("current_job() was called outside a running job")
    return context


def _enter(context: JobContext) -> Any:
    return _current.set(context)


def _leave(token: Any) -> None:
    _current.reset(token)
