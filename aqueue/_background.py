"""Helper tasks that can be stopped for sure.

A bare `Task.cancel()` is delivered once, and code on the way can lose it: on Python 3.11,
`asyncio.wait_for` returns as if nothing happened when a cancellation lands just as what it waits on
finishes (CPython issue 86296), and redis-py sends its commands through it (aqueue's connections no
longer do: `brokers/_pool.py`). The task then carries on, and whoever waits for it waits for ever. A
`Background` task runs its coroutine inside an anyio cancel scope instead: cancelled, anyio cancels
the task again at each wait until it is out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Generic, TypeVar

import anyio

T = TypeVar("T")


class Background(Generic[T]):
    """`coro` run as an asyncio task of its own: a plain task rather than a task group around the
    caller's code, for the places where the caller's body must not run inside a cancel scope
    (a context manager's body, a generator's), with errors reaching the caller unwrapped."""

    __slots__ = ("_scope", "task")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._scope = anyio.CancelScope()
        # Its value, or None when it was cancelled.
        self.task: asyncio.Task[T | None] = asyncio.get_running_loop().create_task(self._run(coro))

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T | None:
        with self._scope:
            return await coro
        return None

    def done(self) -> bool:
        return self.task.done()

    def cancel(self) -> None:
        """Cancel it, and again at each of its waits until it has ended; returns at once."""
        self._scope.cancel()

    async def stop(self) -> BaseException | None:
        """Cancel it and wait until it has ended; the caller's own cancellation does not cut the
        wait short (the task is out when this returns). Returns the error it ended with, if any."""
        self.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.wait([self.task])
        return None if self.task.cancelled() else self.task.exception()
