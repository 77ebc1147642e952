"""aqueue: an asyncio-native task queue on Redis Streams.

What a worker may never need loads on first use (PEP 562): the workflows, the periodic schedules,
locks, rate limits and each broker implementation.
"""

from typing import TYPE_CHECKING

from aqueue._context import JobContext, current_job
from aqueue._exceptions import (
    AqueueError,
    BrokerConnectionError,
    BrokerError,
    CancelExecution,
    ConfigurationError,
    DeliveryLimitExceeded,
    JobCancelled,
    JobError,
    JobExpired,
    JobNotFound,
    JobRevoked,
    LockTimeout,
    PayloadTooLarge,
    RateLimitExceeded,
    RetryTask,
    SerializationError,
    TaskError,
    TaskLocked,
    TaskTimeout,
    UnknownTask,
)
from aqueue._jobs import Job, JobInfo, ResultGroup
from aqueue._lazy import lazy_attributes
from aqueue._queue import Queue
from aqueue._signals import Signal
from aqueue._states import JobState
from aqueue._tasks import AsyncTask, SyncTask, Task, TaskCall
from aqueue._worker import Worker
from aqueue.brokers import Broker

if TYPE_CHECKING:
    from aqueue._locks import Lock
    from aqueue._periodic import Schedule, crontab, every
    from aqueue._ratelimit import RateLimit
    from aqueue._workflows import (
        Batch,
        BatchState,
        Chord,
        ChordResult,
        Group,
        Pipeline,
        Signature,
        chord,
        group,
    )
    from aqueue.brokers import MemoryBroker, RedisBroker

_LAZY = {
    **dict.fromkeys(("Schedule", "crontab", "every"), "aqueue._periodic"),
    **dict.fromkeys(("Batch", "BatchState", "Chord", "ChordResult", "Group", "Pipeline", "Signature",
                     "chord", "group"), "aqueue._workflows"),
    **dict.fromkeys(("MemoryBroker", "RedisBroker"), "aqueue.brokers"),
    "Lock": "aqueue._locks",
    "RateLimit": "aqueue._ratelimit",
}

__version__ = "0.1.0"

__all__ = [
    "AqueueError",
    "AsyncTask",
    "Batch",
    "BatchState",
    "Broker",
    "BrokerConnectionError",
    "BrokerError",
    "CancelExecution",
    "Chord",
    "ChordResult",
    "ConfigurationError",
    "DeliveryLimitExceeded",
    "Group",
    "Job",
    "JobCancelled",
    "JobContext",
    "JobError",
    "JobExpired",
    "JobInfo",
    "JobNotFound",
    "JobRevoked",
    "JobState",
    "Lock",
    "LockTimeout",
    "MemoryBroker",
    "PayloadTooLarge",
    "Pipeline",
    "Queue",
    "RateLimit",
    "RateLimitExceeded",
    "RedisBroker",
    "ResultGroup",
    "RetryTask",
    "Schedule",
    "SerializationError",
    "Signal",
    "Signature",
    "SyncTask",
    "Task",
    "TaskCall",
    "TaskError",
    "TaskLocked",
    "TaskTimeout",
    "UnknownTask",
    "Worker",
    "chord",
    "crontab",
    "current_job",
    "every",
    "group",
]


if not TYPE_CHECKING:  # type checkers see the imports above; an unknown name stays an error to them
    __getattr__, __dir__ = lazy_attributes(globals(), _LAZY)
