"""Scenario 2: Redis restarts. Redis runs with `--appendonly yes --appendfsync always` and is
restarted twice under load (SIGTERM, down for a second, started again on the same port with the
same --dir so the AOF is reloaded). A producer process enqueues one job at a time throughout and
retries an enqueue that raised; workers reconnect and carry on. Every job whose enqueue returned
must be accounted for.

Scaled to the time budget: 1,500 jobs enqueued over 8 s, two restarts 1 s down each, two workers,
visibility timeout 3 s.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import anyio
import pytest

from tests.chaos._support import DEAD, ROOT, Workers, account, left, report_scenario, wait_final
from tests.conftest import start_redis

pytestmark = pytest.mark.chaos

JOBS = 1500
PRODUCE_SECONDS = 8.0
DOWN = 1.0


async def test_workers_and_producer_carry_on_across_two_redis_restarts(
    workers: Workers, chaos_name: str
) -> None:
    started = time.monotonic()
    server = start_redis("--appendonly", "yes", "--appendfsync", "always")
    try:
        workers.url = server.url
        pool = [workers.start(concurrency=50, visibility=3.0) for _ in range(2)]
        for w in pool:
            await w.started()
        env = {**os.environ, "AQUEUE_URL": server.url, "AQUEUE_QUEUE": chaos_name,
               "CHAOS_PROBE_URL": workers.probe_url, "PYTHONPATH": str(ROOT)}
        restarts = 0
        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                producer: dict[str, Any] = {}

                async def produce() -> None:
                    producer["done"] = await anyio.run_process(
                        [sys.executable, "-m", "tests.chaos.apps.producer", str(JOBS), str(PRODUCE_SECONDS)],
                        cwd=ROOT, env=env, check=False)

                tg.start_soon(produce)
                for pause in (2.0, 2.5):
                    await anyio.sleep(pause)  # the fault schedule
                    await anyio.to_thread.run_sync(server.stop)
                    await anyio.sleep(DOWN)
                    await anyio.to_thread.run_sync(server.start)
                    restarts += 1
        done = producer["done"]
        assert done.returncode == 0, done.stderr.decode()
        expected: dict[str, Any] = {}
        for line in done.stdout.decode().split("\n"):
            if line:
                job_id, i, kind, _ms = line.split()
                expected[job_id] = DEAD if kind == "doomed" else int(i) * 2
        assert len(expected) == JOBS
        await wait_final(server.url, chaos_name, expected, timeout=left(started, 42))
        acc = await account(server.url, workers.probe_url, chaos_name, expected, workers.killed())
        problems = workers.problems()
        alive = [w.alive() for w in pool]
        codes = [await w.terminate() for w in pool]
        reconnected = ["broker unreachable" in w.output() for w in pool]
    finally:
        server.stop()
    elapsed = time.monotonic() - started
    failed_enqueues = done.stderr.decode().strip().splitlines()[-1]
    report_scenario("2 redis restarts", acc,
                    f"restarts={restarts} ({failed_enqueues}) time={elapsed:.1f}s", problems)
    assert not acc.lost, acc.lost[:10]
    assert not acc.dead_unexpected, acc.dead_unexpected[:10]
    assert alive == [True, True]
    assert codes == [0, 0]
    assert all(reconnected), "the workers never noticed the restarts"
