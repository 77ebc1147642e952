"""taskiq + taskiq-redis (RedisStreamBroker, RedisAsyncResultBackend, as in taskiq-redis' README).

The worker is `taskiq worker benchmarks.drivers.taskiq_driver:broker --workers 1`.
"""

import asyncio
import os
import sys
import time

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from benchmarks.drivers import _common as c

broker = RedisStreamBroker(url=c.redis_url()).with_result_backend(
    RedisAsyncResultBackend(redis_url=c.redis_url())
)


@broker.task(task_name="noop")
async def noop() -> None:
    c.record(time.time())


@broker.task(task_name="nap")
async def nap() -> None:
    start = time.time()
    await asyncio.sleep(c.NAP)
    c.record(start)


@broker.task(task_name="echo")
async def echo(x: int) -> int:
    return x


class Driver(c.Driver):
    # no batch API: asyncio.gather, 100 at a time

    def worker_cmd(self, concurrency, kind):
        # `--workers 1`: taskiq starts 2 worker processes by default; this benchmark runs one
        cmd = [os.path.join(os.path.dirname(sys.executable), "taskiq"), "worker",
               "benchmarks.drivers.taskiq_driver:broker", "--workers", "1"]
        return cmd + ([f"--max-async-tasks={concurrency}"] if concurrency else []), {}

    async def open(self):
        await broker.startup()  # creates the consumer group, so jobs queued before a worker starts are seen

    async def close(self):
        await broker.shutdown()

    async def enqueue_one(self):
        await noop.kiq()

    async def enqueue_bulk(self, n, kind):
        task = noop if kind == "noop" else nap
        await c.gather_chunks(task.kiq, n)

    async def round_trip(self, i):
        # wait_result() polls the result backend every 0.2 s by default (check_interval)
        return (await (await echo.kiq(i)).wait_result(timeout=10)).return_value
