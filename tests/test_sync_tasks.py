"""Plain `def` tasks: their threads, and what a stop does to a job whose thread cannot be stopped."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import aqueue._worker._runner as runner_module
from aqueue import JobCancelled, JobState, LockTimeout, Queue, Signal, TaskError, current_job
from tests.conftest import wait_for_stop


async def _wait(event: threading.Event) -> None:
    assert await anyio.to_thread.run_sync(event.wait, 10), "the job's thread never got there"


async def test_a_timed_out_thread_is_waited_for_before_the_retry(queue: Queue) -> None:
    saw_stop, let_go = threading.Event(), threading.Event()
    second_start = anyio.Event()
    runs: list[tuple[str, int]] = []

    @queue.task(timeout=0.2, retries=1, retry_delay=0)
    def stuck() -> str:
        attempt = current_job().attempt
        runs.append(("start", attempt))
        if attempt == 2:
            anyio.from_thread.run_sync(second_start.set)
        if attempt == 1:
            wait_for_stop()
            saw_stop.set()
            let_go.wait(10)  # the thread runs on past its timeout until the test lets go
        runs.append(("end", attempt))
        return f"attempt {attempt}"

    async with queue.worker():
        job = await stuck.enqueue()
        await _wait(saw_stop)
        # Time in which a retry would start, were the job's lease let go with its timeout.
        with anyio.move_on_after(0.5):
            await second_start.wait()
        assert runs == [("start", 1)]
        assert await job.state() == JobState.RUNNING
        let_go.set()
        assert await job.result(timeout=10) == "attempt 2"
    assert runs == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]


async def test_a_timed_out_thread_ends_the_job_with_task_timeout(queue: Queue) -> None:
    @queue.task(timeout=0.2)
    def stuck() -> str:
        wait_for_stop()
        return "ran to its end"

    async with queue.worker():
        job = await stuck.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
    assert caught.value.metadata["type"] == "TaskTimeout"


async def test_shutdown_waits_for_a_thread_and_keeps_its_outcome(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    started, saw_stop = threading.Event(), threading.Event()
    interrupted: list[str] = []
    runs: list[int] = []

    @queue.task
    def long_job() -> str:
        runs.append(current_job().attempt)
        started.set()
        wait_for_stop()  # the shutdown's stop, once shutdown_timeout has passed
        saw_stop.set()
        return "finished"

    @queue.on(Signal.INTERRUPTED)
    def on_interrupt(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        interrupted.append(getattr(job, "id", ""))

    job = await long_job.enqueue()
    with caplog.at_level(logging.WARNING, logger="aqueue"):
        async with queue.worker(shutdown_timeout=0.1):
            await _wait(started)
    # Said as what happens to it: it was said "cancelling it to hand it back".
    assert f"job {job.id} (long_job) still running at shutdown, in a thread, which cannot be stopped: " \
           "waiting for it" in caplog.text
    assert "to hand it back" not in caplog.text
    assert saw_stop.is_set()
    assert await job.state() == JobState.SUCCEEDED  # not handed back: it would run twice
    assert await job.result(timeout=1) == "finished"
    assert interrupted == []
    assert runs == [1]


async def test_a_cancelled_thread_ends_the_job_cancelled(queue: Queue) -> None:
    started = threading.Event()

    @queue.task
    def long_job() -> str:
        started.set()
        wait_for_stop()
        return "ran to its end"

    async with queue.worker():
        job = await long_job.enqueue()
        await _wait(started)
        await job.cancel()
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)


async def test_each_running_sync_job_has_a_thread_up_to_the_concurrency(queue: Queue) -> None:
    jobs_at_once = 45  # anyio's default pool holds 40 threads
    everyone_in = threading.Barrier(jobs_at_once, timeout=10)

    @queue.task
    def meet() -> int:
        return everyone_in.wait()

    async with queue.worker(concurrency=50):
        group = await meet.map([() for _ in range(jobs_at_once)])
        assert sorted(await group.get(timeout=20)) == list(range(jobs_at_once))


async def test_a_lock_on_a_plain_def_keeps_its_timeout_and_is_held_until_the_thread_returns(
    queue: Queue,
) -> None:
    saw_stop, let_go = threading.Event(), threading.Event()

    @queue.task(timeout=0.2)
    @queue.lock("report")
    def report() -> str:
        wait_for_stop()
        saw_stop.set()
        let_go.wait(10)
        return "ran to its end"

    async with queue.worker():
        job = await report.enqueue()
        await _wait(saw_stop)
        with pytest.raises(LockTimeout):
            async with queue.lock("report", timeout=0):
                pass
        let_go.set()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
        async with queue.lock("report", timeout=0):  # released with the thread's return
            pass
    assert caught.value.metadata["type"] == "TaskTimeout"


async def test_a_thread_outlasting_the_stop_grace_keeps_its_outcome_and_the_rest_are_handed_back(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Cancelling the worker past its grace stopped no thread, but skipped writing the thread's
    # outcome (the job ran again) and handing back the coroutine job it had interrupted.
    monkeypatch.setattr(runner_module, "STOP_GRACE", 0.2)
    started, let_go = threading.Event(), threading.Event()
    sleeping = anyio.Event()
    runs: list[int] = []

    @queue.task
    def long_job() -> str:
        runs.append(current_job().attempt)
        started.set()
        let_go.wait(10)  # deaf to the stop: let go only once the grace has passed
        return "finished"

    @queue.task
    async def sleeper() -> None:
        sleeping.set()
        await anyio.sleep_forever()

    thread_job = await long_job.enqueue()
    coroutine_job = await sleeper.enqueue()

    async def let_go_past_the_grace() -> None:
        with anyio.fail_after(10):
            while "cannot be stopped" not in caplog.text:  # noqa: ASYNC110 - a log line, no event
                await anyio.sleep(0.01)
        # Time in which a worker cancelled past its grace gives up writing outcomes.
        await anyio.sleep(0.3)
        let_go.set()

    with caplog.at_level(logging.WARNING, logger="aqueue"):
        async with anyio.create_task_group() as tg:
            async with queue.worker(shutdown_timeout=0.1):
                await _wait(started)
                await sleeping.wait()
                tg.start_soon(let_go_past_the_grace)
    assert await thread_job.state() == JobState.SUCCEEDED
    assert await thread_job.result(timeout=1) == "finished"
    assert runs == [1]
    assert await coroutine_job.state() == JobState.PENDING  # handed back, not left to its lease


@pytest.mark.parametrize("guarded", [False, True], ids=["bare", "under_a_lock"])
async def test_an_async_function_behind_a_plain_wrapper_runs_to_its_value(
    queue: Queue, guarded: bool
) -> None:
    # The wrapper hides that it is async: run in a thread, it gave back a coroutine, and the job
    # failed for good ("the result (coroutine) cannot be serialized"), never awaited; under a
    # lock, the lock's wrapper handed that coroutine on.
    def logged(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)
        return wrapper

    @logged
    async def add(a: int, b: int) -> int:
        await anyio.lowlevel.checkpoint()
        return a + b

    task = queue.task(queue.lock("held")(add) if guarded else add)

    async with queue.worker():
        assert await (await task.enqueue(1, 2)).result(timeout=10) == 3


async def test_a_guarded_plain_function_called_outside_a_job_raises_its_keyboard_interrupt(
    queue: Queue,
) -> None:
    # A lock's decorator on a function of the caller's own: a KeyboardInterrupt its thread raises
    # comes as it is (inside a job, it fails the job alone), not wrapped in an aqueue type.
    @queue.lock("own")
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await interrupted()
