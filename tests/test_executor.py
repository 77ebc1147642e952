"""A job told to stop: before it starts (its cancel scope is made only as it starts, and the stop
asked for before then must reach it), and while a thread, which cannot be stopped, runs it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from aqueue import Queue, Signal
from aqueue._serialization import encode_call
from aqueue._worker._executor import RunningJob, execute
from aqueue.brokers import Completion, Delivery, Outcome
from tests.conftest import wait_for_stop


def _delivered(task: str, job_id: str) -> RunningJob:
    """A delivery of `task`, called with no arguments, as a worker holds it."""
    payload = encode_call(task, [], {}, {}, 1 << 20)
    return RunningJob(Delivery(job_id=job_id, task=task, payload=payload, attempt=1, token=1,
                               priority=0, enqueued_at=time.time(), receipt=f"0-{job_id}"))


async def _execute_while(
    queue: Queue, running: RunningJob, stops: Callable[[], Awaitable[None]]
) -> Completion | None:
    """Execute the job in the background while `stops` tells it to stop; its completion."""
    completions: list[Completion | None] = []

    async def run() -> None:
        completions.append(await execute(queue, running))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await stops()
    [completion] = completions
    return completion


def _waiting_job(queue: Queue, ran: list[str]) -> RunningJob:
    @queue.task(name="steps")
    async def steps() -> str:
        ran.append("started")  # what runs of it before a cancelled scope could strike
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
    assert ran == ["started", "past the checkpoint"]


async def test_a_cancel_asked_before_the_start_ends_it_cancelled(queue: Queue) -> None:
    # Not a line of the job runs (it ran up to its first await), and no EXECUTING is said.
    ran: list[str] = []
    executing: list[str] = []

    @queue.on(Signal.EXECUTING)
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        executing.append(getattr(job, "id", ""))

    running = _waiting_job(queue, ran)
    running.request_cancel()
    completion = await execute(queue, running)
    assert completion is not None
    assert completion.outcome is Outcome.CANCELLED
    assert ran == []
    assert executing == []


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


@pytest.mark.parametrize(("stops", "raise_it", "outcome"), [
    (["interrupt"], False, Outcome.SUCCEEDED),  # a shutdown: handed back, it would run twice
    (["interrupt"], True, None),  # it stopped: handed back
    (["abandon"], False, Outcome.SUCCEEDED),  # taken over: a success still ends the job
    (["abandon"], True, None),  # taken over, and it stopped: nothing to say here
    (["timeout", "abandon"], False, Outcome.SUCCEEDED),  # not this worker's timeout to report now
    (["request_cancel"], False, Outcome.CANCELLED),
    (["request_cancel"], True, Outcome.CANCELLED),
    (["timeout"], False, Outcome.FAILED),
    (["timeout", "interrupt"], False, Outcome.FAILED),  # the timeout came first: it stands
    (["request_cancel", "interrupt"], False, Outcome.CANCELLED),
])
async def test_a_thread_told_to_stop(
    queue: Queue, stops: list[str], raise_it: bool, outcome: Outcome | None
) -> None:
    started, saw_stop, go_on = threading.Event(), threading.Event(), threading.Event()

    @queue.task(name="blocking", timeout=0.05 if stops[0] == "timeout" else None)
    def blocking() -> str:
        started.set()
        try:
            wait_for_stop(raise_it=raise_it)
        finally:
            saw_stop.set()
        go_on.wait(10)  # runs on after its stop until the test has made the later stops
        return "ran to its end"

    running = _delivered("blocking", "j2")

    async def stop_it() -> None:
        assert await anyio.to_thread.run_sync(started.wait, 10)
        for n, stop in enumerate(stops):
            if stop != "timeout":
                getattr(running, stop)()
            if n == 0:
                assert await anyio.to_thread.run_sync(saw_stop.wait, 10)
        go_on.set()

    completion = await _execute_while(queue, running, stop_it)
    if outcome is None:
        assert completion is None
        return
    assert completion is not None
    assert completion.outcome is outcome
    if outcome is Outcome.SUCCEEDED:
        assert completion.result == b'"ran to its end"'
    if outcome is Outcome.FAILED:
        assert completion.error is not None
        assert b'"type":"TaskTimeout"' in completion.error


async def test_an_async_job_that_swallows_its_timeout_still_times_out(queue: Queue) -> None:
    @queue.task(name="stubborn", timeout=0.05)
    async def stubborn() -> str:
        try:
            await anyio.sleep(10)
        except asyncio.CancelledError:
            pass  # swallowed: the job returns as if nothing happened
        return "finished anyway"

    running = _delivered("stubborn", "j3")
    with anyio.fail_after(10):
        completion = await execute(queue, running)
    assert completion is not None
    assert completion.outcome is Outcome.FAILED
    assert completion.error is not None
    assert b'"type":"TaskTimeout"' in completion.error


async def test_a_job_stopped_by_a_shutdown_is_handed_back_though_its_cleanup_outlasts_its_deadline(
    queue: Queue,
) -> None:
    # The shutdown came first: that is why it stopped, not the deadline its cleanup ran past.
    started, cleaned = anyio.Event(), anyio.Event()

    @queue.task(name="slow_cleanup", timeout=1.0)  # the stop below lands well before it
    async def slow_cleanup() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(1.2)  # a cleanup that must run past the job's deadline
            cleaned.set()

    running = _delivered("slow_cleanup", "j4")

    async def shut_down() -> None:
        await started.wait()
        running.interrupt()

    completion = await _execute_while(queue, running, shut_down)
    assert cleaned.is_set()
    assert completion is None


async def test_a_job_that_turns_the_shutdowns_cancel_into_an_error_is_handed_back(queue: Queue) -> None:
    # It was judged a failure of its own: with no retries left, a plain SIGTERM dead-lettered it.
    started = anyio.Event()

    @queue.task(name="wrapping", retries=0)
    async def wrapping() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            raise ConnectionError("connection reset while closing") from None

    running = _delivered("wrapping", "j5")

    async def shut_down() -> None:
        await started.wait()
        running.interrupt()

    assert await _execute_while(queue, running, shut_down) is None


@pytest.mark.parametrize("guarded", [False, True], ids=["bare", "under_a_lock"])
async def test_a_thread_that_fails_of_its_own_during_the_shutdown_keeps_its_failure(
    queue: Queue, guarded: bool
) -> None:
    # A thread never sees the shutdown's cancellation: its error is its own, and a job handed
    # back for it would run twice. Under a lock the task's function is the lock's async wrapper,
    # and the job was taken for a coroutine's.
    started = threading.Event()

    def failing_thread() -> None:
        started.set()
        wait_for_stop()  # returns once the worker has asked it to stop
        raise ValueError("its own failure")

    queue.task(name="failing_thread", retries=0)(
        queue.lock("held")(failing_thread) if guarded else failing_thread)
    running = _delivered("failing_thread", "j6")

    async def shut_down() -> None:
        assert await anyio.to_thread.run_sync(started.wait, 10)
        running.interrupt()

    completion = await _execute_while(queue, running, shut_down)
    assert completion is not None
    assert completion.outcome is Outcome.FAILED


async def test_a_cancel_before_the_start_stands_over_a_shutdown_after_it(queue: Queue) -> None:
    ran: list[str] = []
    running = _waiting_job(queue, ran)
    running.request_cancel()
    running.interrupt()
    completion = await execute(queue, running)
    assert completion is not None
    assert completion.outcome is Outcome.CANCELLED
    assert ran == []

