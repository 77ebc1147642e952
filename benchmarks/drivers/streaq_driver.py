"""streaq: the worker is `streaq run benchmarks.drivers.streaq_driver:worker` (concurrency from the env)."""

import os
import sys
import time
from contextlib import AsyncExitStack

import anyio
from streaq import Worker

from benchmarks.drivers import _common as c

worker = Worker(redis_url=c.redis_url(), concurrency=c.concurrency(16))  # streaq's default is 16


@worker.task
async def noop() -> None:
    c.record(time.time())


@worker.task
async def nap() -> None:
    start = time.time()
    await anyio.sleep(c.NAP)
    c.record(start)


@worker.task
async def echo(x: int) -> int:
    return x


class Driver(c.Driver):
    def worker_cmd(self, concurrency, kind):
        cmd = [os.path.join(os.path.dirname(sys.executable), "streaq"), "run",
               "benchmarks.drivers.streaq_driver:worker"]
        return cmd, {"BENCH_CONCURRENCY": str(concurrency or "")}

    async def open(self):
        self.stack = AsyncExitStack()
        await self.stack.enter_async_context(worker)

    async def close(self):
        await self.stack.aclose()

    async def enqueue_one(self):
        await noop.enqueue()

    async def enqueue_bulk(self, n, kind):
        task = noop if kind == "noop" else nap
        await worker.enqueue_many([task.enqueue() for _ in range(n)])

    async def round_trip(self, i):
        return (await (await echo.enqueue(i)).result(timeout=10)).result
