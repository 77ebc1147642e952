"""Brokers: the abstract interface and its two implementations."""

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
)
from aqueue.brokers._memory import MemoryBroker
from aqueue.brokers._redis import RedisBroker

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
]
