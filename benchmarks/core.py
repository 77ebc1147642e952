"""aqueue's own hot paths on Redis and in memory: enqueue, drain, and enqueue-to-result latency.

    python benchmarks/core.py [--jobs 20000] [--latency-rounds 500] [--quick]

Producer and worker share one process and one event loop here (the peer comparison runs them in
separate processes). Redis is a private server started for the run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import anyio

from aqueue import Queue
from benchmarks._redis_server import private_redis


class Countdown:
    """Set once the expected number of no-op jobs has run."""

    def __init__(self) -> None:
        self.left = 0
        self.done = anyio.Event()

    def expect(self, n: int) -> anyio.Event:
        self.left, self.done = n, anyio.Event()
        return self.done

    def tick(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.done.set()


async def measure(url: str, jobs: int, rounds: int, concurrency: int) -> dict[str, float]:
    queue = Queue(url, name=f"bench-{uuid.uuid4().hex[:8]}")
    countdown = Countdown()

    @queue.task(name="noop")
    async def noop() -> None:
        countdown.tick()

    out: dict[str, float] = {}
    async with queue:
        start = time.perf_counter()
        for _ in range(jobs):
            await noop.enqueue()
        out["enqueue one-by-one /s"] = jobs / (time.perf_counter() - start)

        done = countdown.expect(jobs * 2)
        start = time.perf_counter()
        await noop.map([() for _ in range(jobs)])
        out["enqueue bulk (map) /s"] = jobs / (time.perf_counter() - start)

        async with queue.worker(concurrency=concurrency):
            start = time.perf_counter()
            await done.wait()
            out[f"drain (concurrency {concurrency}) /s"] = 2 * jobs / (time.perf_counter() - start)

            @queue.task(name="echo")
            async def echo(x: int) -> int:
                return x

            samples = []
            for i in range(rounds):
                t = time.perf_counter()
                job = await echo.enqueue(i)
                await job.result(timeout=10)
                samples.append((time.perf_counter() - t) * 1000)
        samples.sort()
        out["latency p50 ms"] = statistics.median(samples)
        out["latency p99 ms"] = samples[int(len(samples) * 0.99) - 1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency-rounds", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, 100 latency rounds")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.latency_rounds = 2_000, 100
    results: dict[str, dict[str, float]] = {}
    with private_redis() as url:
        for name, target in (("redis", url), ("memory", "memory://")):
            results[name] = anyio.run(measure, target, args.jobs, args.latency_rounds,
                                      args.concurrency)
    rows = list(results["redis"])
    print(f"aqueue core, {args.jobs} no-op jobs (drain: twice that), {args.latency_rounds} "
          "latency rounds, producer and worker in one process")
    print(f"{'':32}{'redis':>12}{'memory':>12}")
    for row in rows:
        print(f"{row:32}{results['redis'][row]:>12,.1f}{results['memory'][row]:>12,.1f}")


if __name__ == "__main__":
    main()
