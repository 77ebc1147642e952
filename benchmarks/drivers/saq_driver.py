"""saq: the worker is `saq benchmarks.drivers.saq_driver.settings` (concurrency from the env)."""

import asyncio
import os
import sys
import time

from saq import Queue

from benchmarks.drivers import _common as c

queue = Queue.from_url(c.redis_url())


async def noop(ctx):
    c.record(time.time())


async def nap(ctx):
    start = time.time()
    await asyncio.sleep(c.NAP)
    c.record(start)


async def echo(ctx, *, x):
    return x


settings = {"queue": queue, "functions": [noop, nap, echo], "concurrency": c.concurrency(10)}  # default 10


class Driver(c.Driver):
    # saq has no batch enqueue (`Queue.map` enqueues with gather, then waits for the results)

    def worker_cmd(self, concurrency, kind):
        cmd = [os.path.join(os.path.dirname(sys.executable), "saq"), "benchmarks.drivers.saq_driver.settings"]
        return cmd, {"BENCH_CONCURRENCY": str(concurrency or "")}

    async def open(self):
        await queue.connect()
        # saq's pub/sub listener stops when its last waiter leaves and subscribes again for the
        # next: a job that ends during that PSUBSCRIBE is missed, and its waiter times out (W4
        # waits one job at a time, so it hit this every few hundred jobs). A listener that never
        # returns keeps the subscription up, as concurrent waiters do in an application.
        self._keepalive = asyncio.create_task(queue.listen(["bench-keepalive"], lambda *_: False, None))

    async def close(self):
        self._keepalive.cancel()
        await queue.disconnect()

    async def enqueue_one(self):
        await queue.enqueue("noop")

    async def enqueue_bulk(self, n, kind):
        await c.gather_chunks(lambda: queue.enqueue(kind), n)

    async def round_trip(self, i):
        # Job.refresh(until_complete=...) waits on pub/sub; Queue.apply would poll every 0.5 s.
        # refresh() reads the job, then starts listening: a job that ends in between is missed
        # (seen once in ~1,500 round trips even with the subscription kept up), so the wait is
        # cut into 1 s turns, each of which reads the job again, as a careful user would.
        job = await queue.enqueue("echo", x=i)
        async with asyncio.timeout(10):
            while not job.completed:
                try:
                    await job.refresh(until_complete=1)
                except TimeoutError:
                    pass
        return job.result
