"""Brokers: the abstract interface and its two implementations.

The implementations load on first use (PEP 562): a Redis worker never loads the memory broker, and
a process on the memory broker never loads redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aqueue._lazy import lazy_attributes
from aqueue.brokers._base import (
    BatchSpec,
    Broker,
    ChordSpec,
    Completion,
    Delivery,
    JobRecord,
    NewJob,
    Outcome,
    Template,
    WorkflowLinks,
    batch_callback_id,
    error_handler_id,
)

if TYPE_CHECKING:
    from aqueue.brokers._memory import MemoryBroker
    from aqueue.brokers._redis import RedisBroker

_LAZY = {"MemoryBroker": "aqueue.brokers._memory", "RedisBroker": "aqueue.brokers._redis"}

__all__ = [
    "BatchSpec",
    "Broker",
    "ChordSpec",
    "Completion",
    "Delivery",
    "JobRecord",
    "MemoryBroker",
    "NewJob",
    "Outcome",
    "RedisBroker",
    "Template",
    "WorkflowLinks",
    "batch_callback_id",
    "error_handler_id",
]


if not TYPE_CHECKING:  # type checkers see the imports above; an unknown name stays an error to them
    __getattr__, __dir__ = lazy_attributes(globals(), _LAZY)
