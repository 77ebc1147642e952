"""Wrapping a task's function with a step that runs first (a lock, a rate limit)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, ParamSpec, TypeVar

import anyio

P = ParamSpec("P")
R = TypeVar("R")


def around(
    fn: Callable[P, Any], guard: Callable[[], AbstractAsyncContextManager[Any]]
) -> Callable[P, Any]:
    """An async function running `fn` inside `guard()`; a plain `fn` still runs in a worker thread."""

    @functools.wraps(fn)
    async def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
        async with guard():
            if inspect.iscoroutinefunction(fn):
                return await fn(*args, **kwargs)
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

    return guarded
