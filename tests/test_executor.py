"""A job stopped while it waits for a runner: its cancel scope is made only as it starts, and the
stop asked for before then must reach it."""

from __future__ import annotations

import time

import anyio
import pytest

from aqueue import Queue
from aqueue._serialization import encode_call
from aqueue._worker._executor import RunningJob, execute
from aqueue.brokers import Delivery, Outcome


def _waiting_job(queue: Queue, ran: list[str]) -> RunningJob:
    @queue.task(name="steps")
    async def steps() -> str:
        await anyio.lowlevel.checkpoint()  # where a cancelled scope strikes
        ran.append("past the checkpoint")
        return "done"

    payload = encode_call("steps", [], {}, {}, 1 << 20)
    delivery = Delivery(job_id="j1", task="steps", payload=payload, attempt=1, token=1, priority=0,
                        enqueued_at=time.time(), receipt="0-1")
    running = RunningJob(delivery)
    assert running.scope is None  # none yet: the job has not started
    return running


async def test_a_job_runs_when_nothing_stops_it(queue: Queue) -> None:
    ran: list[str] = []
    completion = await execute(queue, _waiting_job(queue, ran))
    assert completion is not None
    assert completion.outcome is Outcome.SUCCEEDED
    assert ran == ["past the checkpoint"]


async def test_a_cancel_asked_before_the_start_ends_it_cancelled(queue: Queue) -> None:
    ran: list[str] = []
    running = _waiting_job(queue, ran)
    running.request_cancel()
    completion = await execute(queue, running)
    assert completion is not None
    assert completion.outcome is Outcome.CANCELLED
    assert ran == []


@pytest.mark.parametrize("stop", ["interrupt", "abandon"])
async def test_a_shutdown_before_the_start_hands_it_back(queue: Queue, stop: str) -> None:
    ran: list[str] = []
    running = _waiting_job(queue, ran)
    getattr(running, stop)()
    assert await execute(queue, running) is None
    assert ran == []
