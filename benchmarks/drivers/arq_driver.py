"""arq: the worker is `arq benchmarks.drivers.arq_driver.WorkerSettings` (max_jobs from the env)."""

import asyncio
import os
import sys
import time
from typing import ClassVar

from arq import create_pool
from arq.connections import RedisSettings

from benchmarks.drivers import _common as c


async def noop(ctx):
    c.record(time.time())


async def nap(ctx):
    start = time.time()
    await asyncio.sleep(c.NAP)
    c.record(start)


async def echo(ctx, x):
    return x


class WorkerSettings:
    functions: ClassVar = [noop, nap, echo]
    redis_settings = RedisSettings.from_dsn(c.redis_url())
    max_jobs = c.concurrency(10)  # arq's default is 10


class Driver(c.Driver):
    bulk_na = None  # no batch API: asyncio.gather, 100 at a time

    def worker_cmd(self, concurrency, kind):
        cmd = [os.path.join(os.path.dirname(sys.executable), "arq"),
               "benchmarks.drivers.arq_driver.WorkerSettings"]
        return cmd, {"BENCH_CONCURRENCY": str(concurrency or "")}

    async def open(self):
        self.pool = await create_pool(WorkerSettings.redis_settings)

    async def close(self):
        await self.pool.aclose()

    async def enqueue_one(self):
        await self.pool.enqueue_job("noop")

    async def enqueue_bulk(self, n, kind):
        await c.gather_chunks(lambda: self.pool.enqueue_job(kind), n)

    async def round_trip(self, i):
        return await (await self.pool.enqueue_job("echo", i)).result(timeout=10)
