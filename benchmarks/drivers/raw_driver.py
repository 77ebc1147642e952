"""The physical limit: redis-py asyncio + hiredis on bare Redis Streams, no queue logic at all.

Enqueue is XADD (awaited one at a time; pipelined 100 at a time). The "worker" is
`python -m benchmarks.drivers.raw_driver`: a loop of XREADGROUP COUNT 100 then XACK of what it read.
For sleeping jobs (W3) it is `python -m benchmarks.drivers.raw_driver nap CONCURRENCY`: CONCURRENCY
tasks take entries from a local queue and sleep; the loop keeps up to 100 entries read ahead of them
and acks those that ended with its next read. With jobs in hand when a slot frees, what is left is
mostly the event loop's own timers.
"""

import asyncio
import os
import sys
import time
import traceback
import uuid

import redis.asyncio as aioredis

from benchmarks.drivers import _common as c

STREAM, GROUP, BATCH = "raw:stream", "raw", 100


class Driver(c.Driver):
    def worker_cmd(self, concurrency, kind):
        cmd = [sys.executable, "-m", "benchmarks.drivers.raw_driver"]
        return ([*cmd, "nap", str(concurrency)] if kind == "nap" else cmd), {}

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


async def consume_naps(concurrency: int) -> None:
    r = aioredis.Redis.from_url(c.redis_url())
    me = uuid.uuid4().hex
    waiting: asyncio.Queue[bytes] = asyncio.Queue()
    ended: list[bytes] = []
    held = 0  # read, not yet ended (ended ones wait in `ended` for the next read's XACK)
    slot_freed = asyncio.Event()

    async def slot() -> None:
        nonlocal held
        while True:
            entry_id = await waiting.get()
            start = time.time()
            await asyncio.sleep(c.NAP)
            c.record(start)
            ended.append(entry_id)
            held -= 1
            slot_freed.set()

    def died(task: asyncio.Task[None]) -> None:
        # A slot that failed would hold its entry for ever: end the process, so the driver says the
        # worker died instead of waiting out its timeout.
        if not task.cancelled() and task.exception() is not None:
            traceback.print_exception(task.exception())
            os._exit(1)

    slots = [asyncio.create_task(slot()) for _ in range(concurrency)]
    for task in slots:
        task.add_done_callback(died)
    while True:
        want = concurrency + BATCH - held
        if want <= 0:
            slot_freed.clear()
            await slot_freed.wait()
            continue
        async with r.pipeline(transaction=False) as pipe:
            if ended:
                pipe.xack(STREAM, GROUP, *ended)
                ended = []
            pipe.xreadgroup(GROUP, me, {STREAM: ">"}, count=want, block=1000)
            reply = (await pipe.execute())[-1]
        for entry_id, _ in reply[0][1] if reply else ():
            held += 1
            waiting.put_nowait(entry_id)


if __name__ == "__main__":
    if sys.argv[1:2] == ["nap"]:
        asyncio.run(consume_naps(int(sys.argv[2])))
    else:
        asyncio.run(consume())
