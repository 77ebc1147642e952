"""The physical limit: redis-py asyncio + hiredis on bare Redis Streams, no queue logic at all.

Enqueue is XADD (awaited one at a time; pipelined 100 at a time). The "worker" is
`python -m benchmarks.drivers.raw_driver`: a loop of XREADGROUP COUNT 100 then XACK of what it read.
"""

import asyncio
import sys
import time
import uuid

import redis.asyncio as aioredis

from benchmarks.drivers import _common as c

STREAM, GROUP, BATCH = "raw:stream", "raw", 100


class Driver(c.Driver):
    io_na = "no queue logic: a job cannot sleep"

    def worker_cmd(self, concurrency, kind):
        return [sys.executable, "-m", "benchmarks.drivers.raw_driver"], {}

    async def open(self):
        self.r = aioredis.Redis.from_url(c.redis_url())

    async def close(self):
        await self.r.aclose()

    async def enqueue_one(self):
        await self.r.xadd(STREAM, {"t": "noop"})

    async def enqueue_bulk(self, n, kind):
        for done in range(0, n, BATCH):
            async with self.r.pipeline(transaction=False) as pipe:
                for _ in range(min(BATCH, n - done)):
                    pipe.xadd(STREAM, {"t": kind})
                await pipe.execute()

    async def fill(self, n, kind):
        await self.enqueue_bulk(n, kind)
        await self.r.xgroup_create(STREAM, GROUP, id="0")

    def round_trip(self, i):
        raise NotImplementedError("no queue logic: no results")


async def consume() -> None:
    r = aioredis.Redis.from_url(c.redis_url())
    me = uuid.uuid4().hex
    while True:
        reply = await r.xreadgroup(GROUP, me, {STREAM: ">"}, count=BATCH, block=1000)
        if not reply:
            continue
        start = time.time()
        ids = [entry_id for entry_id, _ in reply[0][1]]
        await r.xack(STREAM, GROUP, *ids)
        c.record(start, len(ids))


if __name__ == "__main__":
    asyncio.run(consume())
