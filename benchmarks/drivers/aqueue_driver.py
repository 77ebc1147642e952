"""aqueue: the worker is `python -m aqueue run benchmarks.drivers.aqueue_driver:queue`."""

import os
import sys
import time

import anyio

from aqueue import Queue
from benchmarks.drivers import _common as c

queue = Queue(c.redis_url())
# W3's jobs only wait: its worker reads as many jobs ahead of its free slots as it has slots
# (streaq's default). BENCH_PREFETCH=0: none, aqueue's default.
READ_AHEAD = os.environ.get("BENCH_PREFETCH") != "0"


@queue.task(name="noop")
async def noop() -> None:
    c.record(time.time())


@queue.task(name="nap")
async def nap() -> None:
    start = time.time()
    await anyio.sleep(c.NAP)
    c.record(start)


@queue.task(name="echo")
async def echo(x: int) -> int:
    return x


class Driver(c.Driver):
    def worker_cmd(self, concurrency, kind):
        cmd = [sys.executable, "-m", "aqueue", "run", "benchmarks.drivers.aqueue_driver:queue"]
        if kind == "nap" and READ_AHEAD and concurrency:
            cmd.append(f"--prefetch={concurrency}")
        return cmd + ([f"--concurrency={concurrency}"] if concurrency else []), {}

    async def open(self):
        await queue.connect()

    async def close(self):
        await queue.close()

    async def enqueue_one(self):
        await noop.enqueue()

    async def enqueue_bulk(self, n, kind):
        await (noop if kind == "noop" else nap).map([() for _ in range(n)])

    async def round_trip(self, i):
        return await (await echo.enqueue(i)).result(timeout=10)
