"""Enqueue `work` jobs one by one from a process of its own, at a steady pace, through faults.

Usage: python -m tests.chaos.apps.producer COUNT SECONDS. Prints "id i kind ms" for every enqueue
that returned (only those are owed an outcome); an enqueue that raised is retried as a new job.
"""

from __future__ import annotations

import sys
import time

import anyio

from aqueue import BrokerError
from tests.chaos.apps.chaos_app import queue, work

KINDS = ("instant", "sleep", "sleep", "flaky", "doomed")


async def main(count: int, seconds: float) -> None:
    failures = 0
    started = time.monotonic()
    async with queue:
        for i in range(count):
            kind = KINDS[i % len(KINDS)]
            ms = 10 + (i * 37) % 90
            while True:
                try:
                    job = await work.enqueue(i, kind, ms)
                    break
                except BrokerError as exc:
                    failures += 1
                    if failures % 20 == 1:
                        print(f"producer: enqueue failed ({failures}): {exc}", file=sys.stderr, flush=True)
                    await anyio.sleep(0.05)
            print(job.id, i, kind, ms, flush=True)
            ahead = started + seconds * (i + 1) / count - time.monotonic()
            if ahead > 0:
                await anyio.sleep(ahead)
    print(f"producer: done, {failures} failed enqueue(s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]), float(sys.argv[2]))
