"""The error tree.

    AqueueError
    ├── ConfigurationError          bad arguments to the public API
    ├── SerializationError          a value JSON cannot carry (at enqueue), a message a worker cannot decode
    │   └── PayloadTooLarge         over the queue's payload bound (or the worker's)
    ├── BrokerError                 the broker failed (Redis errors are translated once, at its boundary)
    │   └── BrokerConnectionError   the broker cannot be reached
    ├── TaskTimeout                 a job ran past its deadline (not a TimeoutError: it is retried)
    ├── TaskLocked                  a task's lock is held elsewhere
    ├── LockTimeout                 `queue.lock()` could not be acquired in time
    ├── UnknownTask                 a job names a task the worker has not registered (dead-lettered)
    ├── DeliveryLimitExceeded       a job delivered max_deliveries times without finishing (dead-lettered)
    ├── RateLimitExceeded           over a rate limit
    └── JobError                    about one job's outcome
        ├── JobNotFound
        ├── TaskError               the task failed for good; `.metadata` says how
        ├── JobCancelled
        ├── JobRevoked
        └── JobExpired

`RetryTask` and `CancelExecution` are control flow raised by task code, so they stand outside the root:
a handler catching `AqueueError` never swallows them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any


class AqueueError(Exception):
    """Root of every error aqueue raises."""


class ConfigurationError(AqueueError, ValueError):
    """An argument to the public API is invalid."""


class SerializationError(AqueueError, TypeError):
    """A value cannot be carried as JSON."""


class PayloadTooLarge(SerializationError):
    """An encoded payload is over the queue's `max_payload_size`."""


class BrokerError(AqueueError):
    """The broker failed to carry out an operation."""


class BrokerConnectionError(BrokerError, ConnectionError):
    """The broker cannot be reached."""

    answered = False
    """The broker answered, refusing this call for now, and answers others meanwhile: Redis
    refusing writes and answering reads (a read-only replica, a full `maxmemory`, too few
    replicas, a failed save)."""


class TaskTimeout(AqueueError):
    """A job ran past its deadline."""


class TaskLocked(AqueueError):
    """A task's lock is held by another job."""


class LockTimeout(AqueueError):
    """A lock could not be acquired within its timeout."""


class UnknownTask(AqueueError, LookupError):
    """A job names a task the worker has not registered: it goes to the dead letters unrun.
    Met as the `type` of the `TaskError` its `job.result()` raises."""


class DeliveryLimitExceeded(AqueueError):
    """A job was delivered `max_deliveries` times without finishing (each worker that took it
    died or lost it): it goes to the dead letters. Met as the `type` of the `TaskError` its
    `job.result()` raises."""


class RateLimitExceeded(AqueueError):
    """A rate limit is used up for the current window."""

    def __init__(self, key: str, retry_after: float, reschedule: bool = False) -> None:
        super().__init__(f"rate limit {key!r} exceeded; retry after {retry_after:.3f}s")
        self.key = key
        self.retry_after = retry_after
        self.reschedule = reschedule
        """Inside a job: run it again in the next window, without using a retry."""

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt by its arguments, not from its message
        return type(self), (self.key, self.retry_after, self.reschedule), vars(self)


class JobError(AqueueError):
    """About one job's outcome."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id

    def __reduce__(self) -> tuple[Any, ...]:  # a copy or a pickle keeps the job id
        return type(self), (str(self), self.job_id), vars(self)


class JobNotFound(JobError):
    """No job with this id exists (never enqueued, or its record expired)."""


class TaskError(JobError):
    """The task failed for good.

    `metadata` holds `error` (repr of the exception), `type` (its class name), `traceback` (text),
    `job_id`, `attempt` and `retries_left`.
    """

    def __init__(self, metadata: dict[str, Any]) -> None:
        super().__init__(f"{metadata.get('error')}", job_id=metadata.get("job_id"))
        self.metadata = metadata

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.metadata,), vars(self)


class JobCancelled(JobError):
    """The job was cancelled."""


class JobRevoked(JobError):
    """The job was revoked before it ran."""


class JobExpired(JobError):
    """The job was not started before its expiry."""


class RetryTask(Exception):
    """Raise in a task to run it again after `delay` seconds (None: the task's retry wait, as in
    Huey), whatever its retry count."""

    def __init__(self, delay: float | timedelta | None = None) -> None:
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        from aqueue._checks import finite_at_least  # imports this module

        if delay is not None and not finite_at_least(delay, 0):
            raise ConfigurationError(
                f"RetryTask's delay must be finite seconds >= 0 or a timedelta, got {delay!r}")
        super().__init__(f"retry requested (delay={delay})")
        self.delay = delay

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.delay,), vars(self)


class CancelExecution(Exception):
    """Raise in a task to stop it.

    `retry=None` retries while the task has retries left, `True` retries regardless, `False` never
    retries; a job that is not retried ends `cancelled` (not `failed`).
    """

    def __init__(self, retry: bool | None = None) -> None:
        super().__init__(f"execution cancelled (retry={retry})")
        self.retry = retry

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.retry,), vars(self)
