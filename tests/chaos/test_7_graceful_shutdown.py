"""Scenario 7: graceful shutdown under load. SIGTERM to a worker running 100 jobs while more wait:
it must stop taking jobs at once, let running jobs finish for `--shutdown-timeout` seconds, hand
back the rest (ready again at once: none left `running`), and exit 0 within the shutdown timeout
+ 2 s. A second worker then runs what was handed back and what waited, long before the visibility
timeout (60 s) would have returned anything. Every job ends once with its value; no job body runs
to its end twice.

Scaled to the time budget: 100 running jobs (60 of 0.3-1.5 s, 40 of 5 s), 50 more waiting,
--shutdown-timeout 2.
"""

from __future__ import annotations

import collections
import random
import signal
import time
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from tests.chaos._support import Workers, account, client_queue, parse, report_scenario, states, wait_final
from tests.conftest import RedisServer

pytestmark = pytest.mark.chaos

SHUTDOWN_TIMEOUT = 2.0
RUNNING = 100
WAITING = 50


async def test_sigterm_under_load_finishes_or_hands_back_every_running_job(
    redis_under_test: RedisServer, workers: Workers, chaos_name: str
) -> None:
    started = time.monotonic()
    workers.url = redis_under_test.url
    rng = random.Random(77)
    first = workers.start(concurrency=RUNNING, visibility=60.0, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await first.started()
    durations = [round(rng.uniform(0.3, 1.5), 2) for _ in range(60)] + [5.0] * 40
    rng.shuffle(durations)
    durations += [round(rng.uniform(0.3, 1.5), 2) for _ in range(WAITING)]
    starts_key = f"chaos:{chaos_name}:starts"
    probe = aioredis.Redis.from_url(workers.probe_url)
    direct = aioredis.Redis.from_url(redis_under_test.url)
    try:
        async with client_queue(redis_under_test.url, chaos_name) as q:
            group = await q.tasks["long"].map([(i, s) for i, s in enumerate(durations)])
        expected: dict[str, Any] = {job.id: i for i, job in enumerate(group.jobs)}
        ids = list(expected)

        with anyio.fail_after(20):  # the worker has 100 jobs running
            while await probe.llen(starts_key) < RUNNING:  # noqa: ASYNC110 - another process
                await anyio.sleep(0.01)
        sigterm = time.time()
        first.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(SHUTDOWN_TIMEOUT + 10):
            while first.alive():  # noqa: ASYNC110 - another process
                await anyio.sleep(0.01)
        exited_after = time.time() - sigterm
        code = first.process.returncode
        after_exit = collections.Counter((s or b"?").decode() for s in await states(direct, chaos_name, ids))
        runs = parse(await probe.lrange(starts_key, 0, -1))
        interrupted = parse(await probe.lrange(f"chaos:{chaos_name}:interrupted", 0, -1))
        late_starts = [r for r in runs if r.at > sigterm + 0.25]
        running_at_sigterm = len([r for r in runs if r.at <= sigterm])

        second = workers.start(concurrency=RUNNING, visibility=60.0)
        await second.started()
        await wait_final(redis_under_test.url, chaos_name, expected, timeout=20)
        acc = await account(redis_under_test.url, workers.probe_url, chaos_name, expected)
        second_code = await second.terminate()
    finally:
        await probe.aclose()
        await direct.aclose()
    elapsed = time.monotonic() - started
    report_scenario(
        "7 graceful shutdown", acc,
        f"running-at-sigterm~{running_at_sigterm} started-after-sigterm={len(late_starts)} "
        f"interrupted={len(interrupted)} states-after-exit={dict(after_exit)} "
        f"exit={code} after {exited_after:.2f}s (limit {SHUTDOWN_TIMEOUT + 2}s) time={elapsed:.1f}s",
        workers.problems())
    assert code == 0
    assert exited_after <= SHUTDOWN_TIMEOUT + 2
    assert not late_starts, f"{len(late_starts)} job(s) started after SIGTERM"
    assert "running" not in after_exit, "running jobs were neither finished nor handed back"
    assert after_exit["pending"] == len(ids) - after_exit["succeeded"]
    assert len(interrupted) == 40  # the 5 s jobs, cut at the shutdown timeout and handed back
    assert not acc.lost, acc.lost[:10]
    assert not acc.dead_unexpected, acc.dead_unexpected[:10]
    assert acc.completed_more_than_once == 0
    assert second_code == 0
