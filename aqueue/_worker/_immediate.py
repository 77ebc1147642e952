"""Immediate mode: `enqueue` runs its jobs to their end, retries included, before it returns."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from aqueue._states import FINAL_STATES
from aqueue._worker._executor import RunningJob, execute

if TYPE_CHECKING:
    from aqueue._jobs import Job
    from aqueue._queue import Queue

CONSUMER = "immediate"


async def run_immediately(queue: Queue, jobs: Sequence[Job[Any]]) -> None:
    broker, name = queue.broker, queue.name
    waiting = {job.id for job in jobs}
    idle_rounds = 0
    while waiting and idle_rounds < 2:
        deliveries = await broker.receive(name, CONSUMER, 100, 0, queue.max_deliveries)
        for d in deliveries:
            if d.ended:
                continue  # ended by the broker (expired, revoked, cancelled)
            completion = await execute(queue, RunningJob(d))
            if completion is not None:
                await broker.finish(name, [completion], queue.result_ttl)
        for job_id in list(waiting):
            record = await broker.get(name, job_id)
            if record is None or record.state in FINAL_STATES:
                waiting.discard(job_id)
        if waiting and not deliveries:
            # What is left waits for a retry delay: sleep until it is due, then promote it.
            nxt = await broker.promote_due(name, time.time(), 1000)
            idle_rounds = idle_rounds + 1 if nxt is None else 0
            if nxt is not None:
                await anyio.sleep(max(0.0, nxt - time.time()))
        else:
            idle_rounds = 0
