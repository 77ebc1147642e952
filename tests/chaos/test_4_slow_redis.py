"""Scenario 4: slow Redis. The proxy between the workers and Redis holds every reply (data flowing
server→client) for 50 ms. Jobs run longer than the visibility timeout, so only lease renewal keeps
them from being taken over: no job may run twice while its worker is alive, nothing is lost.
Short jobs (instant, and jobs failing their first attempt, then retried at once for 300 ms) run
beside them as traffic.

Scaled to the time budget: 90 long jobs of 2.5-4 s (visibility timeout 2 s) and 600 short ones on
three workers of concurrency 30.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from tests.chaos._support import Proxy, Workers, account, client_queue, report_scenario, wait_final
from tests.conftest import RedisServer

pytestmark = pytest.mark.chaos

LONG_JOBS = 90
SHORT_JOBS = 600
DELAY = 0.05
VISIBILITY = 2.0


async def test_leases_are_renewed_through_a_slow_link(
    redis_under_test: RedisServer, workers: Workers, chaos_name: str
) -> None:
    started = time.monotonic()
    rng = random.Random(4)
    expected: dict[str, Any] = {}
    with Proxy(redis_under_test.port, delay=DELAY) as proxy:
        workers.url = proxy.url
        pool = [workers.start(concurrency=30, visibility=VISIBILITY) for _ in range(3)]
        for w in pool:
            await w.started()
        async with client_queue(redis_under_test.url, chaos_name) as q:  # the producer: direct
            longs = [(i, round(rng.uniform(1.25, 2.0) * VISIBILITY, 2)) for i in range(LONG_JOBS)]
            group = await q.tasks["long"].map(longs)
            expected.update({job.id: i for job, (i, _s) in zip(group.jobs, longs, strict=True)})
            shorts = [(i, rng.choice(["instant", "flaky"]), 300) for i in range(SHORT_JOBS)]
            group = await q.tasks["work"].map(shorts)
            expected.update({job.id: i * 2 for job, (i, _k, _ms) in zip(group.jobs, shorts, strict=True)})
        await wait_final(redis_under_test.url, chaos_name, expected, timeout=35)
        acc = await account(redis_under_test.url, workers.probe_url, chaos_name, expected)
        alive = [w.alive() for w in pool]
        codes = [await w.terminate() for w in pool]
    lapses = sum(w.output().count("lease lost") for w in workers.all)
    takeovers = sum(w.output().count("taken over") for w in workers.all)
    elapsed = time.monotonic() - started
    report_scenario("4 slow redis", acc, f"delay={DELAY * 1000:.0f}ms lease-lost-warnings={lapses} "
                    f"takeovers={takeovers} time={elapsed:.1f}s", workers.problems())
    assert not acc.lost, acc.lost[:10]
    assert not acc.dead_unexpected, acc.dead_unexpected[:10]
    assert not acc.dup_while_alive, acc.dup_while_alive[:10]
    assert acc.ran_more_than_once == 0
    assert alive == [True, True, True]
    assert codes == [0, 0, 0]
