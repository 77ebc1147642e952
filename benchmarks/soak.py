"""Soak: a million no-op jobs through one worker process, watching speed and memory over time.

    python -m benchmarks.soak [--jobs 1000000] [--result-ttl 30] [--quick]

A producer keeps a backlog of up to 50,000 jobs in front of one `aqueue run` worker (concurrency
100) on a private redis-server. Printed: jobs/s and worker RSS over the first and last tenth of the
run, and Redis memory when the last job finished and again once `result_ttl` has passed and the
worker has pruned what expired (finished entries leave the streams as they finish).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import redis.asyncio as aioredis

from aqueue import Queue
from aqueue.brokers._keys import Keys
from benchmarks._redis_server import private_redis

ROOT = Path(__file__).resolve().parent.parent
BACKLOG = 50_000
CHUNK = 10_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def soak(url: str, worker: subprocess.Popen[bytes], jobs: int, result_ttl: float) -> None:
    queue = Queue(url, name="soak")

    @queue.task(name="noop")
    async def noop() -> None:  # the producer's handle on the worker's task of that name
        return None

    client = aioredis.Redis.from_url(url)
    stream = Keys("soak").stream(0)
    samples: list[tuple[float, int, float]] = []  # time, jobs done, worker RSS MB
    enqueued = 0
    try:
        async with queue:
            start = time.perf_counter()
            while True:
                waiting = int(await client.xlen(stream))  # not yet finished (finished entries leave)
                done = enqueued - waiting
                samples.append((time.perf_counter() - start, done, rss_mb(worker.pid)))
                if done >= jobs:
                    break
                if enqueued < jobs and waiting < BACKLOG:
                    n = min(CHUNK, jobs - enqueued)
                    await noop.map([() for _ in range(n)])
                    enqueued += n
                else:
                    await anyio.sleep(0.5)  # sampling interval of the soak run itself
            finished_at = time.perf_counter() - start
            used_done = (await client.info("memory"))["used_memory"]
            keys_done = await client.dbsize()
            await anyio.sleep(result_ttl + 15)  # records expire; the worker prunes every 10 s
            used_later = (await client.info("memory"))["used_memory"]
            keys_later = await client.dbsize()
    finally:
        await client.aclose()

    def window(lo: float, hi: float) -> tuple[float, float]:
        part = [s for s in samples if lo <= s[1] / jobs <= hi]
        (t0, d0, _), (t1, d1, r1) = part[0], part[-1]
        return (d1 - d0) / max(t1 - t0, 1e-9), r1

    first_rate, first_rss = window(0.0, 0.1)
    last_rate, last_rss = window(0.9, 1.0)
    print(f"soak: {jobs:,} no-op jobs, one worker (concurrency 100), result_ttl {result_ttl:g} s")
    print(f"  total time                {finished_at:10.1f} s   ({jobs / finished_at:,.0f} jobs/s overall)")
    print(f"  jobs/s  first 10%         {first_rate:10,.0f}")
    print(f"  jobs/s  last 10%          {last_rate:10,.0f}")
    print(f"  worker RSS after 10%      {first_rss:10.1f} MB")
    print(f"  worker RSS at the end     {last_rss:10.1f} MB")
    print(f"  Redis memory when done    {used_done / 2**20:10.1f} MB   ({keys_done:,} keys)")
    print(f"  Redis memory after ttl    {used_later / 2**20:10.1f} MB   ({keys_later:,} keys)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--result-ttl", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="100,000 jobs")
    args = parser.parse_args()
    with private_redis() as url:
        env = {**os.environ, "AQUEUE_URL": url, "AQUEUE_QUEUE": "soak",
               "AQUEUE_RESULT_TTL": str(args.result_ttl)}
        worker = subprocess.Popen([sys.executable, "-m", "aqueue", "run", "benchmarks.soak_app:queue",
                                   "--concurrency", "100", "-q"], cwd=ROOT, env=env)
        try:
            anyio.run(soak, url, worker, 100_000 if args.quick else args.jobs, args.result_ttl)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)


if __name__ == "__main__":
    main()
