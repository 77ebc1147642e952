"""A job told to stop: before it starts (its cancel scope is made only as it starts, and the stop
asked for before then must reach it), and while a thread, which cannot be stopped, runs it."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import pytest

from aqueue import Queue, Signal
from aqueue._serialization import encode_call
from aqueue._worker._executor import RunningJob, execute
from aqueue.brokers import Completion, Delivery, Outcome


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


@pytest.mark.parametrize(("stop", "signalled"), [("interrupt", True), ("abandon", False)])
async def test_only_a_shutdown_signals_interrupted(queue: Queue, stop: str, signalled: bool) -> None:
    interrupted: list[str] = []

    @queue.on(Signal.INTERRUPTED)
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        interrupted.append(getattr(job, "id", ""))

    running = _waiting_job(queue, [])
    getattr(running, stop)()  # a shutdown, or another worker took the job over
    assert await execute(queue, running) is None
    assert interrupted == (["j1"] if signalled else [])


@pytest.mark.parametrize(("stop", "outcome"), [
    ("interrupt", Outcome.SUCCEEDED),  # a shutdown: handed back, it would run twice
    ("abandon", Outcome.SUCCEEDED),  # taken over: a success still ends the job
    ("request_cancel", Outcome.CANCELLED),
])
async def test_a_thread_that_runs_on_after_its_stop(queue: Queue, stop: str, outcome: Outcome) -> None:
    started = threading.Event()

    @queue.task(name="blocking")
    def blocking() -> str:
        started.set()
        while True:  # sync code that looks for its stop now and then
            try:
                anyio.from_thread.check_cancelled()
            except asyncio.CancelledError:  # what check_cancelled raises on asyncio
                return "ran to its end"
            time.sleep(0.005)

    payload = encode_call("blocking", [], {}, {}, 1 << 20)
    running = RunningJob(Delivery(job_id="j2", task="blocking", payload=payload, attempt=1, token=1,
                                  priority=0, enqueued_at=time.time(), receipt="0-2"))
    completions: list[Completion | None] = []

    async def run() -> None:
        completions.append(await execute(queue, running))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            assert await anyio.to_thread.run_sync(started.wait, 10)
            getattr(running, stop)()
    [completion] = completions
    assert completion is not None
    assert completion.outcome is outcome
    if outcome is Outcome.SUCCEEDED:
        assert completion.result == b'"ran to its end"'
