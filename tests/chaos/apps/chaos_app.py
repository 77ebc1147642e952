"""Tasks for the chaos suite, configured from the environment.

Every execution is recorded in a *probe* Redis (`CHAOS_PROBE_URL`, a server of its own that no fault
touches), under keys `chaos:<queue>:...` outside aqueue's `aqueue:` namespace, as
"job_id|attempt|pid|time": `starts` when a job body begins, `ends` when it completes, `interrupted`
when a shutdown cancels it.
"""

from __future__ import annotations

import os
import time

import anyio
import redis.asyncio as aioredis

from aqueue import Queue, current_job

URL = os.environ.get("AQUEUE_URL", "redis://127.0.0.1:1/0")
NAME = os.environ.get("AQUEUE_QUEUE", "default")
PROBE_URL = os.environ.get("CHAOS_PROBE_URL", URL)
LOCK_TTL = float(os.environ.get("CHAOS_LOCK_TTL", "2"))
HOLD_MS = float(os.environ.get("CHAOS_HOLD_MS", "5"))  # how long a lock holder stays inside

queue = Queue(URL, name=NAME, visibility_timeout=float(os.environ.get("AQUEUE_VISIBILITY", "60")),
              max_deliveries=int(os.environ.get("AQUEUE_MAX_DELIVERIES", "10")))
_probe: aioredis.Redis | None = None


def key(name: str) -> str:
    return f"chaos:{NAME}:{name}"


def probe() -> aioredis.Redis:
    global _probe
    if _probe is None:
        # No read or connect timeout (redis-py 8's defaults are 5 s each): scenario 5 blocks the
        # loop for 3 s at a time, twice in a row, and a job's probe call in flight then (a new
        # connection being made included) would fail the job itself.
        _probe = aioredis.Redis.from_url(PROBE_URL, socket_timeout=None, socket_connect_timeout=None)
    return _probe


def stamp() -> str:
    job = current_job()
    return f"{job.id}|{job.attempt}|{os.getpid()}|{time.time():.6f}"


async def record(kind: str) -> None:
    await probe().rpush(key(kind), stamp())


def expected_work(i: int, kind: str) -> int | None:
    """What `work` returns; None: it ends in the dead letters."""
    return None if kind == "doomed" else i * 2


@queue.task(name="work", retries=2)
async def work(i: int, kind: str, ms: int) -> int:
    """instant | sleep (ms) | flaky (fails its first attempt at once, then sleeps ms) | doomed
    (fails every attempt)."""
    await record("starts")
    if kind == "flaky" and current_job().attempt == 1:
        raise RuntimeError(f"flaky {i}: first attempt fails")
    if kind == "doomed":
        raise RuntimeError(f"doomed {i}")
    if kind in ("sleep", "flaky"):
        await anyio.sleep(ms / 1000)
    await record("ends")
    return i * 2


@queue.task(name="long")
async def long(i: int, seconds: float) -> int:
    """Runs `seconds`; a cancellation (shutdown) is recorded as `interrupted`."""
    await record("starts")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await record("interrupted")
        raise
    await record("ends")
    return i


@queue.task(name="block")
async def block(i: int, seconds: float) -> int:
    """Blocks the worker's event loop (a time.sleep in a coroutine)."""
    await record("starts")
    time.sleep(seconds)  # noqa: ASYNC251 - the fault under test
    await record("ends")
    return i


@queue.task(name="member")
async def member(c: int, n: int, ms: int) -> int:
    await record("starts")
    await anyio.sleep(ms / 1000)
    await record("ends")
    return c * 100 + n


@queue.task(name="gather")
async def gather(values: list[int], c: int) -> list[int]:
    await record("starts")
    await probe().rpush(key(f"callback:{c}"), stamp())
    await record("ends")
    return values


# Entering the critical section: count in, name the holder; leaving: the reverse. One step each.
_ENTER = """
local n = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], ARGV[1])
if n > 1 then redis.call('RPUSH', KEYS[3], n) end
return n
"""
_LEAVE = """
redis.call('DEL', KEYS[2])
return redis.call('DECR', KEYS[1])
"""


@queue.task(name="locked")
async def locked(i: int) -> int:
    await record("starts")
    client = probe()
    async with queue.lock("x", ttl=LOCK_TTL):
        await client.eval(_ENTER, 3, key("inside"), key("holder"), key("overlaps"), str(os.getpid()))
        await client.rpush(key("acquired"), f"{os.getpid()}|{time.time():.6f}")
        await anyio.sleep(HOLD_MS / 1000)
        await client.eval(_LEAVE, 2, key("inside"), key("holder"))
    await record("ends")
    return i
