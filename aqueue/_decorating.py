"""Wrapping a task's function with a step that runs first (a lock, a rate limit)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ParamSpec, TypeVar

from aqueue._exceptions import ConfigurationError
from aqueue._tasks import Task
from aqueue._threads import run_in_thread

P = ParamSpec("P")
R = TypeVar("R")


def around(
    fn: Callable[P, Any], guard: Callable[[], AbstractAsyncContextManager[Any]]
) -> Callable[P, Any]:
    """An async function running `fn` inside `guard()`; a plain `fn` still runs in a worker thread,
    and the guard (a lock) is held until that thread returns."""
    if isinstance(fn, Task):
        # Above it, it would guard the direct call alone: the jobs would run unguarded.
        raise ConfigurationError(f"a lock or rate limit decorator goes below @queue.task (or "
                                 f"@queue.periodic), on the function itself: {fn!r} is a task")

    @functools.wraps(fn)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
        async with guard():
            if inspect.iscoroutinefunction(fn):
                return await fn(*args, **kwargs)
            value = await run_in_thread(fn, *args, **kwargs)
            if inspect.iscoroutine(value):  # an async function behind a plain wrapper
                value = await value
            return value

    guarded.__aqueue_guarded__ = fn  # type: ignore[attr-defined]  # see aqueue._tasks.unguarded
    return guarded
