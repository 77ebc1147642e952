"""Brokers: the abstract interface and its two implementations."""

from aqueue.brokers._base import Broker, Completion, Delivery, JobRecord, NewJob, Outcome
from aqueue.brokers._memory import MemoryBroker
from aqueue.brokers._redis import RedisBroker

__all__ = [
    "Broker",
    "Completion",
    "Delivery",
    "JobRecord",
    "MemoryBroker",
    "NewJob",
    "Outcome",
    "RedisBroker",
]
