"""Scenario 3: connection cuts. A TCP proxy (tests/chaos/_support.Proxy, on 127.0.0.1) stands
between the workers and Redis and drops every open connection (both sides reset) a few times
under load. Workers must resume, no worker exits, nothing is lost.

Scaled to the time budget: 3,000 mixed jobs in 8 waves, 5 cuts about every 1.5 s, three workers,
visibility timeout 2 s.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from tests.chaos._support import (
    Proxy,
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

JOBS = 3000
WAVES = 8
CUTS = 5
CUT_EVERY = 1.5


async def test_workers_resume_after_every_connection_is_dropped(
    redis_under_test: RedisServer, workers: Workers, chaos_name: str
) -> None:
    started = time.monotonic()
    calls = mixed_calls(JOBS, seed=7, weights=[40, 45, 10, 5])
    expected: dict[str, Any] = {}
    dropped: list[int] = []
    with Proxy(redis_under_test.port) as proxy:
        workers.url = proxy.url
        pool = [workers.start(concurrency=50) for _ in range(3)]
        for w in pool:
            await w.started()
        async with client_queue(redis_under_test.url, chaos_name) as q:  # the producer: direct
            work = q.tasks["work"]

            async def produce() -> None:
                await enqueue_in_waves(work, calls, WAVES, CUT_EVERY * CUTS / WAVES, expected)

            async def cut_schedule() -> None:
                for _ in range(CUTS):
                    await anyio.sleep(CUT_EVERY)  # the fault schedule
                    dropped.append(await proxy.cut())

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(produce)
                    tg.start_soon(cut_schedule)
        await wait_final(redis_under_test.url, chaos_name, expected,
                         timeout=left(started))
        acc = await account(redis_under_test.url, workers.probe_url, chaos_name, expected)
        alive = [w.alive() for w in pool]
        codes = [await w.terminate() for w in pool]
        accepted = proxy.accepted
    problems = workers.problems()
    elapsed = time.monotonic() - started
    report_scenario("3 connection cuts", acc, f"cuts={len(dropped)} connections-dropped={sum(dropped)} "
                    f"connections-made={accepted} time={elapsed:.1f}s", problems)
    assert not acc.lost, acc.lost[:10]
    assert not acc.dead_unexpected, acc.dead_unexpected[:10]
    assert all(n > 0 for n in dropped), dropped
    assert alive == [True, True, True], "a worker exited"
    assert codes == [0, 0, 0]
