"""Plain `def` tasks run in worker threads, from a pool as large as the worker's concurrency.

A thread cannot be stopped. A job told to stop (its timeout, `job.cancel()`, the worker's shutdown)
while its thread runs keeps its lease until the thread returns: were it retried or handed back at
once, a second run could start while the first still goes on. The thread can see the stop through
`anyio.from_thread.check_cancelled()`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from functools import partial
from typing import ParamSpec, TypeVar

import anyio

from aqueue._context import _current

P = ParamSpec("P")
R = TypeVar("R")

worker_threads: ContextVar[anyio.CapacityLimiter | None] = ContextVar(
    "aqueue_worker_threads", default=None
)
"""The running worker's pool; unset outside a worker, where anyio's default pool serves. anyio's
default holds 40 threads: a worker running more sync jobs at once would have the rest wait for
a thread while their timeouts ran."""


class _Raised:
    """A GeneratorExit or KeyboardInterrupt that a thread raised, carried back as a value. Raised
    out of the future the loop awaits, Python takes a GeneratorExit for the awaiting coroutine's
    own closing: that coroutine then fails at its next await ("coroutine ignored GeneratorExit"),
    the job's worker with it."""

    __slots__ = ("exc",)

    def __init__(self, exc: GeneratorExit | KeyboardInterrupt) -> None:
        self.exc = exc


class RaisedInThread(Exception):
    """A KeyboardInterrupt that a job's thread raised: the job's own, as a signal's reaches the
    main thread alone. Carried as an Exception, it fails the job alone; raised on as it is, it
    was taken for Ctrl-C and stopped the worker, the jobs beside it stranded. `exc` is it."""

    def __init__(self, exc: KeyboardInterrupt) -> None:
        super().__init__(repr(exc))
        self.exc = exc


def _in_a_job() -> bool:
    return _current.get() is not None  # the job running in this task, if any


def _carried(call: Callable[[], R]) -> R | _Raised:
    try:
        return call()
    except (GeneratorExit, KeyboardInterrupt) as exc:
        return _Raised(exc)


async def run_in_thread(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Run `fn` in a worker thread and wait for it to return, even once its job is told to stop.
    Inside a job, a KeyboardInterrupt the thread raises comes as `RaisedInThread`; elsewhere (a
    lock's decorator on a function of the caller's own) as it is."""
    outcome = await anyio.to_thread.run_sync(
        partial(_carried, partial(fn, *args, **kwargs)), limiter=worker_threads.get()
    )
    if isinstance(outcome, _Raised):
        if isinstance(outcome.exc, KeyboardInterrupt) and _in_a_job():
            raise RaisedInThread(outcome.exc)
        raise outcome.exc  # here, in the coroutine's own frame, it is an exception like any other
    return outcome
