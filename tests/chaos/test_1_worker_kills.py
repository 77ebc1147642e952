"""Scenario 1: worker kills. Jobs of mixed kinds (instant, 10-200 ms sleeps, failing once then
retried, failing for good with retries=2) run on three workers, one of which is `kill -9`-ed and
restarted again and again. Nothing may be lost.

Scaled to the time budget: 5,000 jobs as in the issue, but 8 kills about every 1.5 s instead of
10 every 2 s (the jobs are enqueued in 10 waves while the kills go on, so every kill lands on a busy
worker); visibility timeout 2 s.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from tests.chaos._support import (
    Workers,
    account,
    client_queue,
    enqueue_in_waves,
    left,
    mixed_calls,
    report_scenario,
    wait_final,
)
from tests.conftest import RedisServer

pytestmark = pytest.mark.chaos

JOBS = 5000
WAVES = 10
KILLS = 8
KILL_EVERY = 1.5
CONCURRENCY = 50


async def test_kill_9_and_restart_every_1_5s_loses_nothing(
    redis_under_test: RedisServer, workers: Workers, chaos_name: str
) -> None:
    started = time.monotonic()
    workers.url = redis_under_test.url
    pool = [workers.start(concurrency=CONCURRENCY) for _ in range(3)]
    for w in pool:
        await w.started()
    calls = mixed_calls(JOBS, seed=20240501, weights=[35, 50, 10, 5])
    expected: dict[str, Any] = {}
    kills = 0
    async with client_queue(redis_under_test.url, chaos_name) as q:
        work = q.tasks["work"]

        async def produce() -> None:
            await enqueue_in_waves(work, calls, WAVES, KILL_EVERY * KILLS / WAVES, expected)

        async def kill_schedule() -> None:
            nonlocal kills
            for _ in range(KILLS):
                await anyio.sleep(KILL_EVERY)  # the fault schedule
                pool[0].kill()
                kills += 1
                pool[0] = workers.start(concurrency=CONCURRENCY)
                await pool[0].started()

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(produce)
                tg.start_soon(kill_schedule)
    await wait_final(redis_under_test.url, chaos_name, expected, timeout=left(started))
    acc = await account(redis_under_test.url, workers.probe_url, chaos_name, expected, workers.killed())
    problems = workers.problems()
    assert all(w.alive() for w in pool), "a worker that was not killed exited"
    codes = [await w.terminate() for w in pool]
    elapsed = time.monotonic() - started
    report_scenario("1 worker kills", acc, f"kills={kills} restarts={kills} time={elapsed:.1f}s", problems)
    assert not acc.lost, acc.lost[:10]
    assert not acc.dead_unexpected, acc.dead_unexpected[:10]
    assert kills == KILLS
    assert codes == [0, 0, 0]
