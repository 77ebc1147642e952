"""Signals: hooks called at each step of a job's life. A handler's error is logged, never raised."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

logger = logging.getLogger("aqueue")

Handler = Callable[..., Awaitable[None] | None]


class Signal(StrEnum):
    ENQUEUED = "enqueued"
    SCHEDULED = "scheduled"
    EXECUTING = "executing"
    COMPLETE = "complete"
    ERROR = "error"
    RETRYING = "retrying"
    CANCELLED = "cancelled"
    REVOKED = "revoked"
    EXPIRED = "expired"
    LOCKED = "locked"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    INTERRUPTED = "interrupted"


# The signal of each end a broker gives a job that never ran (expired, revoked, cancelled).
ENDED_SIGNALS = {"expired": Signal.EXPIRED, "revoked": Signal.REVOKED, "cancelled": Signal.CANCELLED}


class Signals:
    """The handlers of one queue."""

    def __init__(self) -> None:
        self._handlers: dict[Signal, list[Handler]] = {}

    def connect(self, handler: Handler, signals: tuple[Signal, ...]) -> None:
        for signal in signals or tuple(Signal):
            self._handlers.setdefault(signal, []).append(handler)

    def wants(self, signal: Signal) -> bool:
        return signal in self._handlers

    async def send(self, signal: Signal, job: Any, exc: BaseException | None = None) -> None:
        for handler in self._handlers.get(signal, ()):
            try:
                outcome = handler(signal, job, exc)
                if inspect.isawaitable(outcome):
                    await outcome
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except BaseException:  # a handler's `sys.exit()` (or any of its own) ends no worker either
                logger.exception("signal handler %r failed on %s for job %s", handler, signal,
                                 getattr(job, "id", job))


class SignalJob:
    """What a signal handler receives for a job outside a running one: its id and task name."""

    __slots__ = ("id", "task_name")

    def __init__(self, job_id: str, task_name: str) -> None:
        self.id, self.task_name = job_id, task_name

    def __repr__(self) -> str:
        return f"<job {self.id} {self.task_name}>"
