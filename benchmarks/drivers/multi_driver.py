"""Not a queue: aqueue's one-by-one enqueue with its Lua script swapped out, for `benchmarks.round_trip`.

Everything aqueue's `noop.enqueue()` does runs as it is, up to the call of enqueue_plain.lua; that call
becomes the same writes (EXISTS on the record, XADD of the lean stream entry, HSET of the record, ZADD
to the index) sent as one MULTI/EXEC on the same pooled connection. The row shows what one awaited
enqueue would cost if it needed no script. It cannot replace the script: the record must name its
stream entry, whose id only the XADD's reply gives, and the EXISTS guard decides nothing inside a
transaction. Here the record names a made-up entry, and no worker reads these jobs.
"""

from typing import Any

from aqueue import Queue
from aqueue.brokers import RedisBroker
from benchmarks.drivers import _common as c


class ScriptlessBroker(RedisBroker):
    async def _run(self, queue: str, name: str, args: Any) -> Any:
        if name != "enqueue_plain" or len(args) != 6:  # a single plain job only
            return await super()._run(queue, name, args)
        await self._ready()
        now, _, job, task, payload, priority = args
        keys = self._key(queue)
        record = keys.prefix + "job:" + job
        return await self.client.connection_pool.call_many(
            ("MULTI",),
            ("EXISTS", record),
            ("XADD", keys.stream(priority), "NOMKSTREAM", "*",
             "id", job, "task", task, "payload", payload, "at", now),
            ("HSET", record, "state", "pending", "token", "0", "more", "0", "task", task,
             "payload", payload, "priority", priority, "attempt", "1", "enqueued_at", now,
             "entry", "0-1"),
            ("ZADD", keys.index, int(float(now) * 1e6), job),
            ("EXEC",),
        )


queue = Queue(broker=ScriptlessBroker(c.redis_url()))


@queue.task(name="noop")
async def noop() -> None:
    pass


class Driver(c.Driver):
    async def open(self):
        await queue.connect()
        await noop.enqueue()  # through the script: makes the band's stream and its group

    async def close(self):
        await queue.close()

    async def enqueue_one(self):
        await noop.enqueue()
