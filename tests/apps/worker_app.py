"""A queue for the subprocess tests, configured from the environment."""

from __future__ import annotations

import os
import sys
import time

import anyio

from aqueue import Queue, current_job

queue = Queue(
    os.environ.get("AQUEUE_URL", "redis://127.0.0.1:1/0"),
    name=os.environ.get("AQUEUE_QUEUE", "default"),
    visibility_timeout=float(os.environ.get("AQUEUE_VISIBILITY", "60")),
)


@queue.task(name="add")
async def add(a: int, b: int) -> int:
    return a + b


@queue.task(name="nap")
async def nap(seconds: float, tag: int = 0) -> int:
    # Progress says the job's code runs: a record reads `running` from its delivery on, a little
    # before the worker has taken the job in.
    await current_job().set_progress(0)
    await anyio.sleep(seconds)
    return tag


@queue.task(name="block_loop")
async def block_loop(seconds: float) -> None:
    # A mistake a real app makes: blocking the event loop (time.sleep in an async task).
    await current_job().set_progress(0)
    time.sleep(seconds)  # noqa: ASYNC251 - the block is the point


if os.environ.get("AQUEUE_SLOW_CLOSE"):
    # A broker slow to let go as the worker exits: the queue's close says so, then takes its time.
    _close = queue.close

    async def _slow_close() -> None:
        print("closing the queue", file=sys.stderr, flush=True)
        await anyio.sleep(30)
        await _close()

    queue.close = _slow_close  # type: ignore[method-assign]
