"""Scenario 5: a blocked event loop. A task blocks its worker's event loop with
`time.sleep(visibility_timeout * 1.5)`, so nothing in that worker (lease renewal included) runs
meanwhile; async jobs of 1.5 s run beside it.

- One worker: when the loop comes back, the worker finds its own lapsed leases and keeps running
  those jobs; none may run twice, none is lost.
- Two workers: the other worker may take the blocked worker's lapsed jobs over and run them too.
  aqueue cannot prevent that (nothing runs in a blocked loop), so the duplicates are only reported.
  What must hold: every job succeeds with its value, the blocking one included (the first success
  of any of a job's runs ends it: refused, a job that blocks would be taken over back and forth,
  and the jobs taken over with it, until the dead letters); no worker crashes; both exit 0 on
  SIGTERM.

Scaled to the time budget: visibility timeout 2 s, blocks of 3 s; one worker: 2 blocking jobs and
30 async jobs; two workers: 1 blocking job, 20 async jobs and max_deliveries=4 (instead of 10, so a
job handed back and forth would reach the dead letters, and fail the test, within the budget).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.chaos._support import Workers, account, client_queue, report_scenario, wait_final
from tests.conftest import RedisServer

pytestmark = pytest.mark.chaos

VISIBILITY = 2.0


async def run(redis: RedisServer, workers: Workers, name: str, count: int, blocking: int, async_jobs: int,
              **options: Any) -> tuple[Any, list[bool], list[int]]:
    workers.url = redis.url
    pool = [workers.start(concurrency=20, visibility=VISIBILITY, **options) for _ in range(count)]
    for w in pool:
        await w.started()
    expected: dict[str, Any] = {}
    async with client_queue(redis.url, name) as q:
        for i in range(blocking):
            job = await q.tasks["block"].enqueue(i, VISIBILITY * 1.5)
            expected[job.id] = i
        group = await q.tasks["long"].map([(100 + i, 1.5) for i in range(async_jobs)])
        expected.update({job.id: 100 + i for i, job in enumerate(group.jobs)})
    await wait_final(redis.url, name, expected, timeout=30)
    acc = await account(redis.url, workers.probe_url, name, expected)
    alive = [w.alive() for w in pool]
    codes = [await w.terminate() for w in pool]
    return acc, alive, codes


async def test_one_worker_whose_loop_blocks_runs_nothing_twice(
    redis_under_test: RedisServer, workers: Workers, chaos_name: str
) -> None:
    started = time.monotonic()
    acc, alive, codes = await run(redis_under_test, workers, chaos_name, 1, 2, 30)
    report_scenario("5a blocked loop, 1 worker", acc,
                    f"blocking-jobs=2 block={VISIBILITY * 1.5}s visibility={VISIBILITY}s "
                    f"exit={codes} time={time.monotonic() - started:.1f}s", workers.problems())
    assert not acc.lost, acc.lost[:10]
    assert not acc.dead_unexpected, acc.dead_unexpected[:10]
    assert acc.ran_more_than_once == 0, (
        f"{acc.ran_more_than_once} job(s) ran again in their own, live worker: {acc.dup_while_alive[:3]}")
    assert alive == [True]
    assert codes == [0]


async def test_two_workers_report_what_a_blocked_loop_runs_twice(
    redis_under_test: RedisServer, workers: Workers, chaos_name: str
) -> None:
    started = time.monotonic()
    acc, alive, codes = await run(redis_under_test, workers, chaos_name, 2, 1, 20,
                                  env={"AQUEUE_MAX_DELIVERIES": "4"})
    report_scenario("5b blocked loop, 2 workers", acc,
                    f"blocking-jobs=1 block={VISIBILITY * 1.5}s visibility={VISIBILITY}s "
                    f"exit={codes} time={time.monotonic() - started:.1f}s", workers.problems())
    assert not acc.lost, acc.lost[:10]
    assert not acc.dead_unexpected, acc.dead_unexpected[:10]
    assert acc.succeeded == 21
    assert alive == [True, True], "a worker crashed"
    assert codes == [0, 0]
