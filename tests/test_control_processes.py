"""Control across worker processes on one Redis: ticks, locks, rate limits and cancels."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from aqueue import JobCancelled, JobState, Queue
from tests.apps import control_app
from tests.test_cli import poll_until

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.subprocess


@pytest.fixture
def two_workers(redis_url: str, queue_name: str, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {**os.environ, "AQUEUE_URL": redis_url, "AQUEUE_QUEUE": queue_name}
    procs = []
    for i in range(2):
        with (tmp_path / f"worker{i}.log").open("w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "aqueue", "run", "tests.apps.control_app:queue",
                 "--concurrency", "10"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log,
            ))
    deadline = time.monotonic() + 30
    for i in range(2):  # each has logged its start-up line: its signal handlers are in place
        while "concurrency 10" not in (tmp_path / f"worker{i}.log").read_text():
            assert time.monotonic() < deadline, "worker did not start"
            assert procs[i].poll() is None, (tmp_path / f"worker{i}.log").read_text()
            time.sleep(0.02)  # polling another process's log: nothing to wait on
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            assert p.wait(timeout=30) == 0
        finally:
            if p.poll() is None:
                p.kill()


def client_queue(url: str, name: str) -> Queue:
    q = Queue(url, name=name)
    for task in control_app.queue.tasks.values():
        q.task(name=task.name)(task.fn)
    return q


def probe(name: str, key: str) -> str:
    return f"probe:{name}:{key}"


async def test_each_periodic_tick_runs_once(
    redis_url: str, queue_name: str, two_workers: list[subprocess.Popen[bytes]]
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async def five_beats() -> bool:
            return int(await client.llen(probe(queue_name, "beats"))) >= 5

        started = time.time()
        await poll_until(five_beats, 20)
        elapsed = time.time() - started
        async with client_queue(redis_url, queue_name) as q:
            jobs = await q.jobs(task="beat", limit=100)
        beats = [b.decode() for b in await client.lrange(probe(queue_name, "beats"), 0, -1)]
    finally:
        await client.aclose()
    seconds = [math.floor(j.enqueued_at.timestamp()) for j in jobs if j.enqueued_at]
    assert len(seconds) == len(set(seconds))  # one job per tick, though two schedulers run
    assert len(beats) == len(set(beats))  # and each job ran once
    assert len(jobs) <= elapsed + 2


async def test_lock_is_never_held_twice_across_processes(
    redis_url: str, queue_name: str, two_workers: list[subprocess.Popen[bytes]]
) -> None:
    async with client_queue(redis_url, queue_name) as q:
        group = await q.tasks["exclusive"].map([() for _ in range(200)])  # type: ignore[attr-defined]
        await group.get(timeout=60)
    client = aioredis.Redis.from_url(redis_url)
    try:
        overlaps = await client.llen(probe(queue_name, "overlaps"))
    finally:
        await client.aclose()
    assert overlaps == 0


async def test_rate_limit_holds_across_workers(
    redis_url: str, queue_name: str, two_workers: list[subprocess.Popen[bytes]]
) -> None:
    async with client_queue(redis_url, queue_name) as q:
        group = await q.tasks["limited"].map([() for _ in range(15)])  # type: ignore[attr-defined]
        await group.get(timeout=60)
    client = aioredis.Redis.from_url(redis_url)
    try:
        runs = [r.decode().split() for r in await client.lrange(probe(queue_name, "runs"), 0, -1)]
    finally:
        await client.aclose()
    # Each run was counted in a window of 1 s on Redis's clock between the clock's reads just before
    # and just after the count (see control_app): the window of both, or, across an edge (where the
    # runs put off to the next window crowd), one of the two.
    spans = [(math.floor(float(before)), math.floor(float(after))) for before, after in runs]
    assert len(runs) == 15
    assert all(last - first <= 1 for first, last in spans)  # a round trip, not a whole window
    for window in {first for first, _ in spans}:
        assert sum(span == (window, window) for span in spans) <= 5, spans
        assert sum(first >= window and last <= window + 1 for first, last in spans) <= 10, spans


async def test_cancel_reaches_a_job_in_another_process(
    redis_url: str, queue_name: str, two_workers: list[subprocess.Popen[bytes]]
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with client_queue(redis_url, queue_name) as q:
            job = await q.tasks["long"].enqueue()  # type: ignore[attr-defined]

            async def started() -> bool:
                return await client.get(probe(queue_name, "started")) is not None

            await poll_until(started, 20)
            asked = time.monotonic()
            assert await job.cancel() is True
            with pytest.raises(JobCancelled):
                await job.result(timeout=10)
            assert time.monotonic() - asked < 1.5
            assert await job.state() == JobState.CANCELLED
            assert await client.get(probe(queue_name, "cleaned")) == b"1"
    finally:
        await client.aclose()
    assert all(p.poll() is None for p in two_workers)  # both still running


async def test_chord_fires_once_when_a_member_worker_is_killed(
    redis_url: str, queue_name: str, tmp_path: Path
) -> None:
    from aqueue import chord

    env = {**os.environ, "AQUEUE_URL": redis_url, "AQUEUE_QUEUE": queue_name, "AQUEUE_VISIBILITY": "1"}

    def start(i: int) -> subprocess.Popen[bytes]:
        with (tmp_path / f"w{i}.log").open("w") as log:
            return subprocess.Popen([sys.executable, "-m", "aqueue", "run", "tests.apps.control_app:queue",
                                     "--concurrency", "20"], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)

    client = aioredis.Redis.from_url(redis_url)
    victim = start(0)
    rescuer: subprocess.Popen[bytes] | None = None
    try:
        async with client_queue(redis_url, queue_name) as q:
            member, gather = q.tasks["member"], q.tasks["gather"]
            c = await q.enqueue(chord([member.s(n) for n in range(10)], gather.s()))  # type: ignore[attr-defined]

            async def members_running() -> bool:
                return int(await client.llen(probe(queue_name, "member-starts"))) >= 5

            await poll_until(members_running, 30)
            victim.kill()  # kill -9 while members run
            victim.wait(timeout=10)
            rescuer = start(1)
            assert await c.get(timeout=60) == list(range(10))
            callbacks = await client.lrange(probe(queue_name, "callbacks"), 0, -1)
            starts = [int(n) for n in await client.lrange(probe(queue_name, "member-starts"), 0, -1)]
    finally:
        await client.aclose()
        for p in (victim, rescuer):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
    assert len(callbacks) == 1  # the callback fired exactly once
    assert sorted(set(starts)) == list(range(10))
    assert len(starts) > 10  # some members did run twice (redelivered), yet each counted once
