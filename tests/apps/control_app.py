"""A queue for the cross-process control tests; what jobs observe is written to Redis."""

from __future__ import annotations

import os
from contextvars import ContextVar

import anyio
import redis.asyncio as aioredis

from aqueue import Queue, current_job, every

URL = os.environ.get("AQUEUE_URL", "redis://127.0.0.1:1/0")
NAME = os.environ.get("AQUEUE_QUEUE", "default")
queue = Queue(URL, name=NAME, visibility_timeout=float(os.environ.get("AQUEUE_VISIBILITY", "60")))
_client: aioredis.Redis | None = None


def probe(key: str) -> str:
    """Where the tests read what the jobs saw."""
    return f"probe:{NAME}:{key}"


async def redis() -> aioredis.Redis:
    global _client
    if _client is None:
        _client = aioredis.Redis.from_url(URL)
    return _client


@queue.periodic(every(seconds=1), name="beat")
async def beat() -> None:
    await (await redis()).rpush(probe("beats"), current_job().id)


@queue.task(name="exclusive")
async def exclusive() -> None:
    client = await redis()
    async with queue.lock("shared", ttl=10):
        if await client.incr(probe("inside")) > 1:
            await client.rpush(probe("overlaps"), current_job().id)
        await anyio.sleep(0.005)
        await client.decr(probe("inside"))


# Redis's clock just before and just after the rate limit counted each run of `limited`: the
# window it was counted in is theirs when both fall in one. The time the run is written down can
# be a window later (a slow round trip), where it would look like a sixth run.
_counted_within: ContextVar[str] = ContextVar("counted_within")
_rate_limit_hit = queue.broker.rate_limit_hit


async def _redis_time() -> float:
    seconds, micros = await (await redis()).time()
    return seconds + micros / 1e6


async def _noted_rate_limit_hit(queue_name: str, key: str, limit: int, per: float) -> float:
    before = await _redis_time()
    wait = await _rate_limit_hit(queue_name, key, limit, per)
    _counted_within.set(f"{before!r} {await _redis_time()!r}")  # the job's own context: its body reads it
    return wait


queue.broker.rate_limit_hit = _noted_rate_limit_hit  # type: ignore[method-assign]


@queue.task(name="limited")
@queue.rate_limit("five-per-second", limit=5, per=1)
async def limited() -> None:
    await (await redis()).rpush(probe("runs"), _counted_within.get())


@queue.task(name="long", retries=3)
async def long() -> None:
    client = await redis()
    await client.set(probe("started"), current_job().id)
    try:
        await anyio.sleep(60)
    finally:
        with anyio.move_on_after(5, shield=True):  # an await in a cancelled scope is cancelled again
            await client.set(probe("cleaned"), "1")


@queue.task(name="member")
async def member(n: int) -> int:
    await (await redis()).rpush(probe("member-starts"), n)
    await anyio.sleep(1.0)  # long enough that the kill lands while members run
    return n


@queue.task(name="gather")
async def gather(values: list[int]) -> list[int]:
    await (await redis()).rpush(probe("callbacks"), current_job().id)
    return values
