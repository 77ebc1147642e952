"""Immediate mode: `enqueue` runs its jobs to their end, retries included, before it returns."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from aqueue._states import JobState
from aqueue._worker._executor import RunningJob, execute

if TYPE_CHECKING:
    from aqueue._jobs import Job
    from aqueue._queue import Queue

CONSUMER = "immediate"


async def run_immediately(queue: Queue, jobs: Sequence[Job[Any]]) -> None:
    """Run exactly these jobs here, one after another, each to its end (waiting out retry
    delays); other jobs of the queue are left alone."""
    broker, name = queue.broker, queue.name
    for job in jobs:
        while True:
            d = await broker.claim(name, CONSUMER, job.id, queue.max_deliveries)
            if d is None:
                record = await broker.get(name, job.id)
                if record is None or record.state != JobState.SCHEDULED or record.eta is None:
                    break  # finished, or not ours to run
                await anyio.sleep(max(0.0, record.eta - time.time()))  # a retry's delay
                await broker.promote_due(name, time.time(), 1000)
                continue
            if d.ended:
                break  # ended by the broker (expired, revoked, cancelled)
            completion = await execute(queue, RunningJob(d))
            if completion is not None:
                await broker.finish(name, [completion], queue.result_ttl)
