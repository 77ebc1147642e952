"""The worker (SPEC 4) on both brokers: retries, timeouts, cancellation, concurrency, leases."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import anyio
import orjson
import pytest

import aqueue._worker._runner as runner_module
from aqueue import (
    BrokerConnectionError,
    CancelExecution,
    ConfigurationError,
    DeliveryLimitExceeded,
    Job,
    JobCancelled,
    JobExpired,
    JobState,
    Queue,
    RetryTask,
    Schedule,
    Signal,
    TaskError,
    UnknownTask,
    Worker,
    current_job,
)
from aqueue._context import JobContext
from aqueue._tasks import TaskPolicy
from aqueue._threads import worker_threads
from aqueue._time import LONGEST
from aqueue._worker import _runner
from aqueue._worker import _unreachable as unreachable_module
from aqueue.brokers import Broker, Completion, NewJob


class Breaking(Schedule):
    """Due at once, then broken: a schedule of the user's own that raises."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls = 0

    def next_after(self, moment: datetime) -> datetime:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("schedule broke")
        return moment


async def interrupt_not_heard(*args: Any, **kwargs: Any) -> bool:
    """In place of the broker's `interrupt_receive`: a receive that a stop cannot cut short."""
    return False


async def a_service_that_breaks(self: Worker) -> None:
    """In place of one of a worker's services (which fail only by a defect of aqueue's own)."""
    raise RuntimeError("service broke")


def worker_tasks() -> list[asyncio.Task[object]]:
    """The tasks running a worker (`Worker.run`) in this loop."""
    return [t for t in asyncio.all_tasks() if "Worker.run" in repr(t.get_coro())]


async def test_retries_wait_with_backoff_then_succeed(queue: Queue) -> None:
    starts: list[float] = []

    @queue.task(retries=2, retry_delay=0.05, retry_backoff=2.0)
    async def flaky() -> int:
        starts.append(time.monotonic())
        if current_job().attempt < 3:
            raise ValueError("not yet")
        return current_job().attempt

    async with queue.worker():
        job = await flaky.enqueue()
        assert await job.result(timeout=10) == 3
    assert starts[1] - starts[0] >= 0.05
    assert starts[2] - starts[1] >= 0.1
    info = await job.info()
    assert info is not None
    assert info.attempt == 3
    assert info.error is None


async def test_spent_retries_fail_with_metadata_and_dead_letter(queue: Queue) -> None:
    @queue.task(retries=1)
    async def broken() -> None:
        raise ValueError("broken for good")

    async with queue.worker():
        job = await broken.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
    meta = caught.value.metadata
    assert meta["error"] == repr(ValueError("broken for good"))
    assert meta["type"] == "ValueError"
    assert "broken for good" in meta["traceback"]
    assert "Traceback" in meta["traceback"]
    assert (meta["job_id"], meta["attempt"], meta["retries_left"]) == (job.id, 2, 0)
    dead = await queue.dead_letters()
    assert [d.id for d in dead] == [job.id]
    assert dead[0].dead_reason is not None
    assert "ValueError" in dead[0].dead_reason


async def test_retry_task_retries_regardless_of_count(queue: Queue) -> None:
    @queue.task(retries=0)
    async def again() -> int:
        if current_job().attempt == 1:
            raise RetryTask(delay=timedelta(milliseconds=50))
        return current_job().attempt

    async with queue.worker():
        assert await (await again.enqueue()).result(timeout=10) == 2


async def test_retry_task_uses_none_of_the_tasks_retries(queue: Queue) -> None:
    # As in Huey: the runs that asked for their retry leave the task's retries as they were, and
    # its backoff too. retries=2: two asked retries, then two failures retried, then a success.
    attempts: list[int] = []
    retries_left: list[int] = []

    @queue.task(retries=2, retry_delay=0.01, retry_backoff=1)
    async def flaky() -> int:
        attempt = current_job().attempt
        attempts.append(attempt)
        if attempt <= 2:
            raise RetryTask()
        if attempt <= 4:
            raise ValueError("transient")
        return attempt

    async with queue.worker():
        job = await flaky.enqueue()
        assert await job.result(timeout=10) == 5
        failing = await flaky.options(retries=1).enqueue()
        with pytest.raises(TaskError) as caught:  # 2 asked, 1 retried failure, then out of retries
            await failing.result(timeout=10)
        retries_left.append(caught.value.metadata["retries_left"])
        assert caught.value.metadata["attempt"] == 4
        assert await queue.retry(failing.id)  # from the dead letters: a fresh count, asked ones too
        with pytest.raises(TaskError) as again:
            await failing.result(timeout=10)
    assert attempts == [1, 2, 3, 4, 5, 1, 2, 3, 4, 1, 2, 3, 4]
    assert retries_left == [0]
    assert again.value.metadata["attempt"] == 4


async def test_a_retried_failure_is_judged_without_reading_the_jobs_record(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # How many retries a job has used comes with its delivery: each failure after the first read
    # the whole record (payload included), a round trip and a connection for every one at once.
    reads: list[str] = []
    read = queue.broker.get

    async def counted(name: str, job_id: str) -> object:
        reads.append(job_id)
        return await read(name, job_id)
    monkeypatch.setattr(queue.broker, "get", counted)

    @queue.task(retries=3, retry_delay=0.01, retry_backoff=1)
    async def flaky() -> int:
        attempt = current_job().attempt
        if attempt == 1:
            raise RetryTask(delay=0)  # asked: uses none of the three
        if attempt <= 4:
            raise ValueError("transient")
        return attempt

    async with queue.worker():
        job = await flaky.enqueue()
        assert await job.result(timeout=10) == 5
    assert reads == []


async def test_retry_task_without_a_delay_waits_the_tasks_retry_wait(queue: Queue) -> None:
    # As in Huey, where RetryTask() waits the task's retry_delay: it was retried at once.
    scheduled = anyio.Event()

    @queue.task(retry_delay=3600, retry_backoff=2)
    async def later() -> None:
        raise RetryTask()

    @queue.on(Signal.SCHEDULED)
    def written(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        scheduled.set()

    async with queue.worker():
        before = time.time()
        job = await later.enqueue()
        with anyio.fail_after(10):
            await scheduled.wait()
    assert await job.state() == JobState.SCHEDULED
    record = await queue.broker.get(queue.name, job.id)
    assert record is not None
    assert record.eta is not None
    assert before + 3600 <= record.eta <= time.time() + 3600


async def test_a_backoff_grown_past_a_floats_range_still_retries(queue: Queue) -> None:
    # retry_delay * retry_backoff ** 2 is past what a float holds: it raised OverflowError, and
    # the job went to the dead letters as an internal error instead of being retried.
    retried = anyio.Event()

    @queue.task(retries=1, retry_delay=1, retry_backoff=1e300)
    async def flaky() -> None:
        if current_job().attempt <= 2:
            raise RetryTask(delay=0)  # counts an attempt, uses no retry
        raise ValueError("transient")

    @queue.on(Signal.SCHEDULED)
    def scheduled(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        retried.set()

    async with queue.worker():
        job = await flaky.enqueue()
        before = time.time()
        with anyio.fail_after(10):
            await retried.wait()
    record = await queue.broker.get(queue.name, job.id)
    assert record is not None
    assert record.eta is not None
    assert (record.state, record.attempt) == ("scheduled", 4)  # its next attempt, far off
    assert before + LONGEST <= record.eta <= time.time() + LONGEST
    assert await queue.dead_letters() == []


def test_a_backoff_of_whole_numbers_past_a_floats_range_is_the_longest_wait() -> None:
    # As ints, retry_delay * retry_backoff ** n was exact: float() of it raised past 2**1024, and
    # an attempt number in the millions took seconds to raise.
    policy = TaskPolicy(retries=1, retry_delay=1, retry_backoff=2)
    assert (policy.retry_wait(3), policy.retry_wait(1100), policy.retry_wait(10**8)) == (4.0, LONGEST, LONGEST)


async def test_cancel_execution(queue: Queue) -> None:
    @queue.task(retries=3)
    async def stop_for_good() -> None:
        raise CancelExecution(retry=False)

    starts: list[float] = []

    @queue.task(retries=0, retry_delay=0.2)
    async def stop_and_retry() -> int:
        starts.append(time.monotonic())
        if current_job().attempt == 1:
            raise CancelExecution(retry=True)  # whatever the count: after the retry delay
        return current_job().attempt

    @queue.task(retries=0)
    async def stop_by_policy() -> None:
        raise CancelExecution()

    @queue.task(retries=1)
    async def stop_after_its_retry() -> None:
        raise CancelExecution()

    async with queue.worker():
        cancelled = await stop_for_good.enqueue()
        with pytest.raises(JobCancelled):
            await cancelled.result(timeout=10)
        assert await cancelled.state() == JobState.CANCELLED
        assert await (await stop_and_retry.enqueue()).result(timeout=10) == 2
        assert starts[1] - starts[0] >= 0.2  # it was retried at once
        # Out of retries, CancelExecution() cancels the job rather than failing it (as in Huey).
        by_policy = await stop_by_policy.enqueue()
        with pytest.raises(JobCancelled):
            await by_policy.result(timeout=10)
        retried = await stop_after_its_retry.enqueue()
        with pytest.raises(JobCancelled):
            await retried.result(timeout=10)
        info = await retried.info()
        assert info is not None
        assert info.attempt == 2
        assert await queue.dead_letters() == []


async def test_a_cancel_heard_before_the_reply_that_leases_the_job_still_lands(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The request's push can outrun the reply that leases the job (the cancel landed between the
    # lease and the reply): the worker dropped it, and the job ran on until the fallback check.
    monkeypatch.setattr(_runner, "CANCEL_CHECK", 3600.0)  # no fallback in this test's time
    heard = anyio.Event()

    @queue.task
    async def endless() -> None:
        await anyio.sleep(3600)

    job = await endless.enqueue()
    cancel_job = Worker._cancel_job

    def hearing(worker: Worker, job_id: str) -> None:
        cancel_job(worker, job_id)
        if job_id == job.id:
            heard.set()

    receive = queue.broker.receive

    async def cancelled_as_it_is_leased(*args: Any, **kwargs: Any) -> list[Any]:
        deliveries = await receive(*args, **kwargs)
        if any(d.job_id == job.id for d in deliveries):
            assert await job.cancel()
            with anyio.fail_after(10):
                await heard.wait()  # heard before the worker has the reply
        return deliveries

    monkeypatch.setattr(Worker, "_cancel_job", hearing)
    monkeypatch.setattr(queue.broker, "receive", cancelled_as_it_is_leased)
    async with queue.worker():
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)


@pytest.mark.parametrize("shielded", [True, False])
async def test_timeout_cancels_cooperatively_and_is_retried(queue: Queue, shielded: bool) -> None:
    # Its finally blocks run. In a cancelled scope every await is cancelled again, so cleanup that
    # awaits shields itself (README).
    entered: list[int] = []
    cleaned: list[int] = []

    @queue.task(timeout=0.2, retries=1)
    async def slow() -> None:
        try:
            await anyio.sleep(30)
        finally:
            entered.append(current_job().attempt)
            with anyio.move_on_after(5, shield=shielded):
                await anyio.sleep(0.01)  # closing a connection, say
                cleaned.append(current_job().attempt)

    async with queue.worker():
        job = await slow.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
    assert caught.value.metadata["type"] == "TaskTimeout"
    assert caught.value.metadata["attempt"] == 2
    assert entered == [1, 2]
    assert cleaned == ([1, 2] if shielded else [])


async def test_a_timeouts_traceback_shows_where_the_job_was(queue: Queue) -> None:
    # It held a TaskTimeout's message alone: nothing said which await the job was stuck on.
    async def waits_on_a_slow_service() -> None:
        await anyio.sleep(30)

    @queue.task(timeout=0.1)
    async def slow() -> None:
        await waits_on_a_slow_service()

    async with queue.worker():
        job = await slow.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
    trace = caught.value.metadata["traceback"]
    assert "in waits_on_a_slow_service" in trace
    assert trace.rstrip().endswith(f"TaskTimeout: job {job.id} (slow) timed out after 0.1s")


async def test_per_call_timeout_and_retries_override(queue: Queue) -> None:
    @queue.task(retries=5)
    async def slow() -> None:
        await anyio.sleep(30)

    async with queue.worker():
        job = await slow.options(timeout=0.1, retries=0).enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
    assert caught.value.metadata["attempt"] == 1


async def test_concurrency_is_bounded(queue: Queue) -> None:
    running = 0
    peak = 0
    gate = anyio.Event()

    @queue.task
    async def hold() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 5:
            gate.set()
        await gate.wait()
        running -= 1

    async with queue.worker(concurrency=5):
        group = await hold.map([() for _ in range(20)])
        await group.get(timeout=10)
    assert peak == 5


async def test_coroutine_jobs_run_concurrently(queue: Queue) -> None:
    arrived = 0
    everyone = anyio.Event()

    @queue.task
    async def meet() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == 10:
            everyone.set()
        await everyone.wait()  # completes only if all ten run at once

    async with queue.worker(concurrency=10):
        await (await meet.map([() for _ in range(10)])).get(timeout=10)


async def test_jobs_that_never_wait_share_few_runners(queue: Queue) -> None:
    # A runner whose job returns without waiting takes the next job itself: 2,000 such jobs under
    # concurrency 100 need a few runner tasks, not one each (each costs memory while it idles),
    # nor one more for each of the twenty or more batches they are received in.
    @queue.task
    async def noop() -> None:
        return None

    async with queue.worker(concurrency=100) as worker:
        await (await noop.map([() for _ in range(2000)])).get(timeout=60)
        runners = worker._runners
    assert 1 <= runners <= 10, runners


async def test_leases_held_stay_bounded_while_outcomes_wait(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job that ended holds its lease until its outcome is written: while the writes are held
    # up, the worker takes no more jobs than its concurrency plus the writing slack (it piles up
    # neither leases nor the memory they take).
    monkeypatch.setattr(_runner, "WRITING_SLACK", 3)

    ran, eight_ran = 0, anyio.Event()

    @queue.task
    async def noop() -> None:
        nonlocal ran
        ran += 1
        if ran == 8:
            eight_ran.set()

    writes_may_go, first_write = anyio.Event(), anyio.Event()
    finish = queue.broker.finish

    async def held_up_finish(*args: object, **kwargs: object) -> list[bool]:
        first_write.set()
        await writes_may_go.wait()
        return await finish(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(queue.broker, "finish", held_up_finish)
    group = await noop.map([() for _ in range(30)])
    async with queue.worker(concurrency=5) as worker:
        try:
            with anyio.fail_after(10):
                await first_write.wait()
                await eight_ran.wait()
            # The fetcher got its chance: it waits for a write now, not for a job to end.
            await anyio.wait_all_tasks_blocked()
            assert ran == 8
            assert len(worker._completing) == 8  # every leased job has ended, none is written
            assert len(await queue.jobs(state="running")) == 8
            assert len(worker._held) == 8
        finally:
            writes_may_go.set()
        assert await group.get(timeout=30) == [None] * 30


def holding(queue: Queue, *, only_first: bool = False) -> tuple[Any, list[int], anyio.Event, anyio.Event]:
    """A task `hold(i)` that notes each start, then waits for `release` (with `only_first`, job 0
    alone waits): with one slot, the jobs received after the first wait for it. Returns the task,
    the starts, an event set by the first start, and `release`."""
    started: list[int] = []
    first_started, release = anyio.Event(), anyio.Event()

    @queue.task
    async def hold(i: int) -> int:
        started.append(i)
        first_started.set()
        if i == 0 or not only_first:
            await release.wait()
        return i

    return hold, started, first_started, release


@pytest.mark.parametrize("prefetch", [0, 2])
async def test_a_worker_receives_up_to_prefetch_jobs_ahead_of_its_free_slots(
    queue: Queue, prefetch: int
) -> None:
    hold, started, first_started, release = holding(queue)

    group = await hold.map([(i,) for i in range(5)])
    async with queue.worker(concurrency=1, prefetch=prefetch) as worker:
        with anyio.fail_after(10):
            await first_started.wait()  # the jobs of its receive are all held by now
        await anyio.wait_all_tasks_blocked()  # the fetcher had its chance to take more
        assert len(worker._held) == 1 + prefetch
        assert started == [0]  # those received ahead wait for the slot
        release.set()
        assert await group.get(timeout=10) == [0, 1, 2, 3, 4]
    assert started == [0, 1, 2, 3, 4]


async def test_a_job_received_ahead_is_cancelled_without_waiting_for_a_slot(queue: Queue) -> None:
    hold, started, first_started, release = holding(queue)

    running = await hold.enqueue(0)
    waiting = await hold.enqueue(1)
    async with queue.worker(concurrency=1, prefetch=1) as worker:
        with anyio.fail_after(10):
            await first_started.wait()
        assert waiting.id in worker._held  # received with the first, ahead of a free slot
        assert await waiting.cancel()
        with pytest.raises(JobCancelled):
            await waiting.result(timeout=10)  # while the job that holds the one slot runs on
        assert started == [0]
        release.set()
        assert await running.result(timeout=10) == 0
    assert started == [0]


async def test_a_stop_hands_back_the_jobs_received_ahead_at_once_without_running_them(
    queue: Queue,
) -> None:
    hold, started, first_started, release = holding(queue, only_first=True)

    jobs = [await hold.enqueue(i) for i in range(3)]
    async with queue.worker(concurrency=1, prefetch=2, shutdown_timeout=60) as worker:
        with anyio.fail_after(10):
            await first_started.wait()
        assert len(worker._held) == 3  # received with the first, ahead of a free slot
        worker.stop()
        # Another worker runs them while the first job still holds the stopping worker, which
        # renews its lease, as it would have renewed theirs had it not handed them back.
        async with queue.worker(concurrency=2) as other:
            assert [await job.result(timeout=10) for job in jobs[1:]] == [1, 2]
        for job in jobs[1:]:
            info = await job.info()
            assert info is not None
            assert (info.worker, info.attempt) == (other.name, 1)
        assert started == [0, 1, 2]
        release.set()
    assert await jobs[0].result(timeout=10) == 0
    assert started == [0, 1, 2]


async def first_then_short_lived(hold: Any) -> tuple[Job[int], Job[int], float]:
    """Job 0, then job 1 expiring a second from now (received ahead behind job 0, in time), and
    when it expires."""
    running = await hold.enqueue(0)
    expires_at = time.time() + 1.0
    short = await hold.options(expires=datetime.fromtimestamp(expires_at, UTC)).enqueue(1)
    return running, short, expires_at


async def test_a_job_that_waited_for_a_slot_past_its_expiry_ends_expired_unrun(queue: Queue) -> None:
    # Received before its expiry, it is not started after it ("a job not started by then ends
    # expired"): the worker hands it back unstarted and the broker ends it.
    hold, ran, first_started, release = holding(queue)

    running, short, expires_at = await first_then_short_lived(hold)
    async with queue.worker(concurrency=1, prefetch=1) as worker:
        with anyio.fail_after(10):
            await first_started.wait()
        assert short.id in worker._held  # received with the first, before its expiry
        await anyio.sleep(expires_at - time.time() + 0.05)  # its expiry passes while it waits
        release.set()
        assert await running.result(timeout=10) == 0
        with pytest.raises(JobExpired):
            await short.result(timeout=10)
    assert ran == [0]


async def test_a_job_received_ahead_and_handed_back_at_a_stop_keeps_its_expiry(queue: Queue) -> None:
    hold, ran, first_started, release = holding(queue)

    running, short, expires_at = await first_then_short_lived(hold)
    async with queue.worker(concurrency=1, prefetch=1) as worker:
        with anyio.fail_after(10):
            await first_started.wait()
        assert short.id in worker._held
        worker.stop()  # hands it back unstarted while the first job runs on
        release.set()
    assert await running.result(timeout=10) == 0
    await anyio.sleep(max(0.0, expires_at - time.time()) + 0.05)  # its expiry passes, unstarted
    async with queue.worker():
        with pytest.raises(JobExpired):
            await short.result(timeout=10)
    assert ran == [0]


async def test_a_waiting_job_given_up_then_taken_back_runs_here(queue: Queue) -> None:
    # Given up while it waited for a slot (a renewal found its lease gone), then leased to this
    # worker again: it never started, so it runs here; it was dropped, to wait out another lease.
    hold, _, first_started, release = holding(queue)

    running = await hold.enqueue(0)
    waiting = await hold.options(expires=3600).enqueue(1)
    async with queue.worker(concurrency=1, prefetch=1) as worker:
        with anyio.fail_after(10):
            await first_started.wait()
        worker._running[waiting.id].abandon()  # as `_renew_leases` does for a lease gone
        del worker._held[waiting.id]
        # Its lease lapsed, and this worker's reclaim takes it back (the running job's too).
        taken = await queue.broker.reclaim(queue.name, worker.name, 2, 0, queue.max_deliveries)
        assert sorted(d.job_id for d in taken) == sorted([running.id, waiting.id])
        await worker._take(taken)
        assert worker._held[waiting.id] is worker._running[waiting.id].delivery
        assert not worker._running[waiting.id].lost  # it runs here, under its new lease
        # Leased a second time, the broker counts it as started; it never did: its expiry holds.
        assert worker._running[waiting.id].delivery.expires is not None
        release.set()
        assert [await running.result(timeout=10), await waiting.result(timeout=10)] == [0, 1]


async def test_prefetch_is_a_whole_number_of_zero_or_more(queue: Queue) -> None:
    for prefetch in (-1, 1.5, True, None, "2"):
        with pytest.raises(ConfigurationError, match="prefetch must be a whole number >= 0"):
            async with queue.worker(prefetch=prefetch):  # type: ignore[arg-type]
                pass
        with pytest.raises(ConfigurationError, match="prefetch must be a whole number >= 0"):
            Worker(queue, prefetch=prefetch)  # type: ignore[arg-type]


async def test_each_job_starts_from_a_clean_context(queue: Queue) -> None:
    # Jobs share long-lived runner tasks: a context variable one job sets must not reach the next.
    tag: contextvars.ContextVar[int] = contextvars.ContextVar("tag")

    @queue.task
    async def mark(i: int) -> int | None:
        seen = tag.get(None)
        tag.set(i)
        return seen

    async with queue.worker(concurrency=1):
        group = await mark.map([(i,) for i in range(20)])
        assert await group.get(timeout=10) == [None] * 20


async def test_no_context_leaks_through_a_runner_that_replaced_another(queue: Queue) -> None:
    tag: contextvars.ContextVar[str] = contextvars.ContextVar("tag")

    @queue.task
    async def setter() -> None:
        tag.set("leaked")

    @queue.task
    async def reader() -> str | None:
        return tag.get(None)

    seen: list[str | None] = []
    async with queue.worker(concurrency=4):
        for _ in range(20):
            await (await setter.map([() for _ in range(6)])).get(timeout=5)
            seen += await (await reader.map([() for _ in range(4)])).get(timeout=5)
    assert set(seen) == {None}


async def test_higher_priority_runs_first(queue: Queue) -> None:
    order: list[str] = []

    @queue.task
    async def record(label: str) -> None:
        order.append(label)

    @queue.task(priority=5)
    async def urgent(label: str) -> None:
        order.append(label)

    await record.enqueue("low-1")
    await record.enqueue("low-2")
    await urgent.enqueue("mid")
    await record.options(priority=10).enqueue("high")
    lowest = await record.options(priority=-1).enqueue("lowest")
    await record.enqueue("last")
    async with queue.worker(concurrency=1):
        await lowest.result(timeout=10)
    assert order == ["high", "mid", "low-1", "low-2", "last", "lowest"]


async def test_a_priority_first_used_while_the_worker_is_busy_runs_first(queue: Queue) -> None:
    # On Redis the band was learned by the receive that took the next band-0 job, which ran
    # first: "low-1", "high", "low-2".
    order: list[str] = []
    started, release = anyio.Event(), anyio.Event()

    @queue.task
    async def blocker() -> None:
        started.set()
        await release.wait()

    @queue.task
    async def record(label: str) -> None:
        order.append(label)

    async with queue.worker(concurrency=1):
        # The worker has read band 0 alone, as a busy one does.
        await (await record.enqueue("warm-up")).result(timeout=10)
        await blocker.enqueue()
        with anyio.fail_after(10):
            await started.wait()
        await record.enqueue("low-1")
        await record.enqueue("low-2")
        last = await record.options(priority=9).enqueue("high")
        await record.options(priority=9).enqueue("high-2")
        release.set()
        await (await record.enqueue("low-3")).result(timeout=10)
        await last.result(timeout=10)
    assert order == ["warm-up", "high", "high-2", "low-1", "low-2", "low-3"]


async def test_unknown_task_goes_to_dead_letters(broker: Broker, queue_name: str) -> None:
    producer = Queue(broker=broker, name=queue_name)
    worker_side = Queue(broker=broker, name=queue_name)

    @producer.task(name="ghost")
    async def ghost() -> None:
        return None

    @worker_side.task
    async def known() -> int:
        return 1

    errors: list[tuple[str, str, str]] = []

    @worker_side.on(Signal.ERROR)  # a failure for good like any other
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        assert isinstance(exc, TaskError)
        errors.append((getattr(job, "task_name", ""), exc.metadata["type"], exc.metadata["error"]))

    async with worker_side.worker():
        job = await ghost.enqueue()
        with pytest.raises(TaskError, match="unknown task 'ghost'") as caught:
            await worker_side.job(job.id).result(timeout=10)
        assert await (await known.enqueue()).result(timeout=10) == 1  # still running
    dead = await worker_side.dead_letters()
    assert dead[0].id == job.id
    assert dead[0].dead_reason == "unknown task 'ghost': not registered on this worker"
    # The error is named as any other's: its class (an aqueue one) and repr.
    error = UnknownTask("unknown task 'ghost': not registered on this worker")
    await assert_named_alike(error, "ghost", errors, caught.value, job)


async def assert_named_alike(
    error: Exception, task: str, errors: list[tuple[str, str, str]], raised: TaskError, job: Job[Any]
) -> None:
    """The dead letter's error is named by its class and repr alike in the one ERROR signal
    (`errors`: task, type, error), in what `job.result()` raised, and in the job's info."""
    kind, text = type(error).__name__, repr(error)
    assert errors == [(task, kind, text)]
    assert (raised.metadata["type"], raised.metadata["error"]) == (kind, text)
    info = await job.info()
    assert info is not None
    assert info.error is not None
    assert (info.error["type"], info.error["error"]) == (kind, text)


async def test_an_internal_error_goes_to_the_dead_letters_with_its_traceback(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fault of aqueue's own while running a job: dead-lettered (not lost, not handed round for
    # ever), named by its exception as any error is, with the frames that raised it.
    @queue.task
    async def fine() -> int:
        return 1

    async def broken(queue: Queue, running: object) -> None:
        raise KeyError("oops")

    monkeypatch.setattr(_runner, "execute", broken)
    async with queue.worker():
        job = await fine.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
    metadata = caught.value.metadata
    assert (metadata["type"], metadata["error"]) == ("KeyError", "KeyError('oops')")
    assert metadata["reason"] == "internal error: KeyError('oops')"
    assert "in broken" in metadata["traceback"]
    assert [d.id for d in await queue.dead_letters()] == [job.id]


async def test_undecodable_payload_goes_to_dead_letters(queue: Queue) -> None:
    @queue.task(name="victim")
    async def victim() -> int:
        return 1

    bad = [NewJob(id=uuid.uuid4().hex, task="victim", payload=p, enqueued_at=time.time())
           for p in (b"\xff\x00 not json", b"[1, 2]", b'{"args": 5, "kwargs": {}}')]
    await queue.broker.enqueue(queue.name, bad)
    async with queue.worker():
        for new in bad:
            with pytest.raises(TaskError, match="undecodable payload") as caught:
                await queue.job(new.id).result(timeout=10)
            assert caught.value.metadata["type"] == "SerializationError"
        assert await (await victim.enqueue()).result(timeout=10) == 1
    assert {d.id for d in await queue.dead_letters()} == {b.id for b in bad}


def victim_task(queue: Queue) -> list[int]:
    """The task "victim", which another writer's payloads name; its runs are noted in the list."""
    ran: list[int] = []

    @queue.task(name="victim")
    async def victim() -> int:
        ran.append(1)
        return 1

    return ran


async def dead_lettered_victim(queue: Queue, payload: bytes) -> tuple[NewJob, TaskError]:
    """Another writer's job of "victim" with this payload, and its error, once a worker has
    dead-lettered it as undecodable."""
    bad = NewJob(id=uuid.uuid4().hex, task="victim", payload=payload, enqueued_at=time.time())
    await queue.broker.enqueue(queue.name, [bad])
    async with queue.worker():
        with pytest.raises(TaskError, match="undecodable payload") as caught:
            await queue.job(bad.id).result(timeout=10)
    return bad, caught.value


@pytest.mark.parametrize("options", [
    {"next": 5}, {"next": {"id": "x"}}, {"next": {"id": 1, "args": [], "kwargs": {}, "options": {}}},
    {"retries": "3"}, {"retries": -1}, {"retries": True}, {"timeout": "5"}, {"timeout": -1},
    {"batch_id": 7},
], ids=repr)
async def test_a_payload_whose_options_are_malformed_is_dead_lettered_before_its_code_runs(
    queue: Queue, options: dict[str, Any]
) -> None:
    # Another writer's payload: its task ran, and only then did a malformed "next" fail the job,
    # as an internal error; a batch id that is no string reached the job's context.
    ran = victim_task(queue)
    payload = b'{"args": [], "kwargs": {}, "options": ' + orjson.dumps(options) + b"}"
    _, error = await dead_lettered_victim(queue, payload)
    assert error.metadata["type"] == "SerializationError"
    assert ran == []


@pytest.mark.parametrize("payload", [
    b"\xff\x00 not json", b"[1, 2]", b'{"args": [], "kwargs": {}, "options": {"next": 5}}',
    b'{"args": [], "kwargs": {}, "options": {"chord_callback": 7}}',
], ids=repr)
async def test_immediate_mode_retry_of_an_undecodable_dead_letter_dead_letters_it_again(
    queue: Queue, payload: bytes
) -> None:
    # queue.retry read the payload for what the job sets going once the broker had made it ready
    # again: a payload it could not read raised there, and the job was left pending, never run.
    ran = victim_task(queue)
    bad, _ = await dead_lettered_victim(queue, payload)
    queue.immediate = True
    assert await queue.retry(bad.id)
    assert await queue.job(bad.id).state() == JobState.FAILED
    assert [d.id for d in await queue.dead_letters()] == [bad.id]
    assert ran == []


async def test_a_job_sees_its_worker_stopping_and_may_end_in_its_grace(queue: Queue) -> None:
    # A long job that works in steps can save its place and end once its worker is told to stop,
    # rather than be cancelled and handed back when the grace is out.
    started = anyio.Event()
    seen: list[bool] = []

    @queue.task
    async def in_steps() -> str:
        context = current_job()
        seen.append(context.stopping)
        started.set()
        while not context.stopping:  # noqa: ASYNC110 - a step of its work, then a look at the flag
            await anyio.sleep(0.01)
        return "saved its place"

    async with queue.worker(shutdown_timeout=60):
        job = await in_steps.enqueue()
        with anyio.fail_after(10):
            await started.wait()
    # The worker's exit asked it to stop: the job ended in its grace, long before 60 s were out.
    assert await job.result(timeout=0) == "saved its place"
    assert seen == [False]


async def test_dead_letter_retry_runs_again(queue: Queue) -> None:
    fail = True

    @queue.task
    async def sometimes() -> str:
        if fail:
            raise ValueError("down")
        return "up"

    async with queue.worker():
        job = await sometimes.enqueue()
        with pytest.raises(TaskError):
            await job.result(timeout=10)
        fail = False
        assert await queue.retry(job.id) is True
        assert await job.result(timeout=10) == "up"
        assert await queue.retry(job.id) is False  # no longer a dead letter
    assert await queue.dead_letters() == []


async def test_shutdown_hands_running_jobs_back(queue: Queue, caplog: pytest.LogCaptureFixture) -> None:
    started = anyio.Event()
    cleaned_up = anyio.Event()
    interrupted: list[str] = []

    @queue.task
    async def long_job() -> str:
        if current_job().attempt == 1 and not started.is_set():
            started.set()
            try:
                await anyio.sleep(60)
            finally:
                cleaned_up.set()
        return "second run"

    @queue.on(Signal.INTERRUPTED)
    def on_interrupt(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        interrupted.append(getattr(job, "id", ""))

    job = await long_job.enqueue()
    with caplog.at_level(logging.WARNING, logger="aqueue"):
        async with queue.worker(shutdown_timeout=0.1):
            with anyio.fail_after(10):
                await started.wait()
    assert f"job {job.id} (long_job) still running at shutdown: cancelling it to hand it back" in caplog.text
    assert cleaned_up.is_set()
    assert interrupted == [job.id]
    assert await job.state() == JobState.PENDING
    async with queue.worker():
        assert await job.result(timeout=10) == "second run"
    info = await job.info()
    assert info is not None
    assert info.attempt == 1


async def test_a_stopped_job_is_handed_back_while_a_thread_is_still_waited_for(queue: Queue) -> None:
    # It was handed back only once the worker's last job ended: a plain `def` job's thread, which
    # cannot be stopped, held it (its lease renewed) for as long as it ran.
    thread_started, let_thread_end = threading.Event(), threading.Event()
    started = anyio.Event()

    @queue.task
    def blocking() -> str:
        thread_started.set()
        let_thread_end.wait(30)
        return "thread"

    @queue.task
    async def waits() -> None:
        started.set()
        await anyio.sleep_forever()

    try:
        async with queue.worker(concurrency=2, shutdown_timeout=0.05) as worker:
            in_thread, stopped = await blocking.enqueue(), await waits.enqueue()
            with anyio.fail_after(10):
                await started.wait()
                await anyio.to_thread.run_sync(thread_started.wait, 10)
                worker.stop()
                while await stopped.state() != JobState.PENDING:  # noqa: ASYNC110 - the release, polled
                    await anyio.sleep(0.01)
            assert await in_thread.state() == JobState.RUNNING
            let_thread_end.set()
    finally:
        let_thread_end.set()
    assert await in_thread.result(timeout=10) == "thread"
    assert await stopped.state() == JobState.PENDING


async def test_a_stop_whose_fetch_ends_late_still_interrupts_jobs_when_their_grace_ends(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The running jobs' shutdown_timeout started only once the fetch had ended: a broker slow to
    # answer (a stalled Redis) held every job, and the stop, past the grace an orchestrator gives
    # the process before it kills it. It counts from the stop now: the job is interrupted, and
    # handed back, while the fetch still waits.
    monkeypatch.setattr(runner_module, "STOP_GRACE", 5.0)
    started, stopping, interrupted = anyio.Event(), anyio.Event(), anyio.Event()
    order: list[str] = []
    real_receive = queue.broker.receive

    async def late_once_stopped(*args: Any, **kwargs: Any) -> list[Any]:
        if not started.is_set():
            return await real_receive(*args, **kwargs)
        await stopping.wait()
        await interrupted.wait()  # the broker answers only once the job was interrupted
        order.append("fetch ended")
        return []

    @queue.task
    async def endless() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            order.append("interrupted")
            interrupted.set()

    monkeypatch.setattr(queue.broker, "receive", late_once_stopped)
    monkeypatch.setattr(queue.broker, "interrupt_receive", interrupt_not_heard)
    job = await endless.enqueue()
    with anyio.fail_after(10):
        async with queue.worker(shutdown_timeout=0.2):
            await started.wait()
            stopping.set()
    assert order == ["interrupted", "fetch ended"]
    assert await job.state() == JobState.PENDING  # handed back, for another worker to run


async def test_a_job_received_ahead_does_not_start_after_a_stop_while_the_fetch_waits(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Handed back only once the fetch had ended: a runner freed meanwhile (a broker slow to
    # answer) started it after the stop.
    started: list[str] = []
    first_running, finish, stopping = anyio.Event(), anyio.Event(), anyio.Event()
    real_receive = queue.broker.receive

    calls = 0

    async def late_once_stopped(*args: Any, **kwargs: Any) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 1:  # both jobs
            return await real_receive(*args, **kwargs)
        await stopping.wait()
        await first.result(timeout=10)  # the runner has moved on from the first job
        return []

    @queue.task
    async def step(name: str) -> None:
        started.append(name)
        if name == "first":
            first_running.set()
            await finish.wait()

    first = await step.enqueue("first")
    ahead = await step.enqueue("ahead")
    monkeypatch.setattr(queue.broker, "receive", late_once_stopped)
    monkeypatch.setattr(queue.broker, "interrupt_receive", interrupt_not_heard)
    with anyio.fail_after(10):
        async with queue.worker(concurrency=1, prefetch=2) as worker:  # room left: it reads on
            await first_running.wait()
            worker.stop()
            stopping.set()
            finish.set()
    assert started == ["first"]
    assert await ahead.state() == JobState.PENDING


async def test_a_failure_of_the_fetch_that_repeats_logs_its_traceback_once(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # One that does not pass (a missing ACL right) logged its whole traceback every few seconds.
    caplog.set_level(logging.ERROR, logger="aqueue")
    real_receive = queue.broker.receive
    failures = 0

    async def broken_three_times(*args: Any, **kwargs: Any) -> list[Any]:
        nonlocal failures
        if failures < 3:
            failures += 1
            raise RuntimeError("receive broke")
        return await real_receive(*args, **kwargs)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    monkeypatch.setattr(queue.broker, "receive", broken_three_times)
    async with queue.worker():
        assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
    told = [r for r in caplog.records if r.getMessage().startswith("receiving jobs failed")]
    assert [r.exc_info is not None for r in told] == [True, False, False]
    assert told[1].getMessage() == ("receiving jobs failed again, retrying in 0.10s: "
                                    "RuntimeError('receive broke')")


async def test_a_stop_cuts_short_the_fetchers_pause_after_a_failed_call(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pause (up to 5 s) ended only by its own clock: the stop waited for it.
    monkeypatch.setattr(runner_module, "FETCH_PAUSE_FIRST", 60.0)
    failed = anyio.Event()

    async def unreachable(*args: Any, **kwargs: Any) -> list[Any]:
        failed.set()
        raise BrokerConnectionError("cannot reach the broker")

    monkeypatch.setattr(queue.broker, "receive", unreachable)
    began = anyio.current_time()
    async with queue.worker():  # its stop is shielded: a deadline here would not end it
        with anyio.fail_after(10):
            await failed.wait()
    assert anyio.current_time() - began < 30  # not the 60 s pause


async def test_a_debug_log_says_how_each_run_of_a_job_ended(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # `aqueue run -v` added nothing: no line of the package was at debug level but a tick's.
    caplog.set_level(logging.DEBUG, logger="aqueue")

    @queue.task(retries=1, retry_delay=0)
    async def once_wrong() -> str:
        if current_job().attempt == 1:
            raise ValueError("not yet")
        return "ok"

    async with queue.worker():
        job = await once_wrong.enqueue()
        assert await job.result(timeout=10) == "ok"
    ends = [r.getMessage() for r in caplog.records
            if r.levelno == logging.DEBUG and r.getMessage().startswith(f"job {job.id}")]
    assert [line.rsplit(" in ", 1)[0] for line in ends] == [
        f"job {job.id} (once_wrong) attempt 1: retry", f"job {job.id} (once_wrong) attempt 2: succeeded"]


async def test_job_of_a_dead_worker_is_redelivered(queue: Queue) -> None:
    @queue.task
    async def work() -> str:
        return current_job().id

    job = await work.enqueue()
    # A worker that takes the job and dies: it never renews nor finishes.
    taken = await queue.broker.receive(queue.name, "dead-worker", 1, 0, queue.max_deliveries)
    assert [d.job_id for d in taken] == [job.id]
    assert await job.state() == JobState.RUNNING
    async with queue.worker():
        assert await job.result(timeout=15) == job.id


async def test_running_job_lease_is_renewed(broker: Broker, queue_name: str) -> None:
    q = Queue(broker=broker, name=queue_name, visibility_timeout=1)
    runs = 0

    @q.task
    async def long_job() -> int:
        nonlocal runs
        runs += 1
        await anyio.sleep(2.5)  # well past the visibility timeout
        return runs

    job = await long_job.enqueue()
    async with q.worker(), q.worker():  # a second worker would take a lapsed lease
        assert await job.result(timeout=15) == 1
    assert runs == 1


async def test_poison_message_goes_to_dead_letters(broker: Broker, queue_name: str) -> None:
    q = Queue(broker=broker, name=queue_name, visibility_timeout=1, max_deliveries=2)

    @q.task
    async def work() -> None:
        return None

    errors: list[tuple[str, str, str]] = []
    errored = anyio.Event()

    @q.on(Signal.ERROR)  # the worker that met it past max_deliveries says so
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        assert isinstance(exc, TaskError)
        errors.append((getattr(job, "task_name", ""), exc.metadata["type"], exc.metadata["error"]))
        errored.set()

    job = await work.enqueue()
    # Two deliveries to workers that die before finishing.
    assert await broker.receive(q.name, "dead-1", 1, 0, q.max_deliveries)
    assert await broker.reclaim(q.name, "dead-2", 1, 0, q.max_deliveries)
    async with q.worker():
        with pytest.raises(TaskError, match="max_deliveries=2") as caught:
            await job.result(timeout=15)
        with anyio.fail_after(10):
            await errored.wait()
    dead = await q.dead_letters()
    assert [d.id for d in dead] == [job.id]
    # Named as any error is: the class (an aqueue one) and its repr, in the signal, the result
    # and the job's info alike.
    error = DeliveryLimitExceeded("delivered 3 times without finishing (max_deliveries=2)")
    await assert_named_alike(error, "work", errors, caught.value, job)


async def test_signals_reach_sync_and_async_handlers(queue: Queue) -> None:
    seen: list[tuple[Signal, str]] = []

    @queue.on(Signal.ENQUEUED, Signal.EXECUTING, Signal.COMPLETE)
    def sync_handler(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        seen.append((signal, getattr(job, "task_name", "")))

    @queue.on(Signal.RETRYING, Signal.ERROR)
    async def async_handler(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        seen.append((signal, type(exc).__name__))

    @queue.on(Signal.COMPLETE)
    def broken_handler(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        raise RuntimeError("a handler's error is logged, not raised")

    @queue.task(name="ok")
    async def ok() -> None:
        return None

    @queue.task(name="bad", retries=1)
    async def bad() -> None:
        raise KeyError("x")

    async with queue.worker():
        await (await ok.enqueue()).result(timeout=10)
        with pytest.raises(TaskError):
            await (await bad.enqueue()).result(timeout=10)
    # COMPLETE comes once the success is written: a caller's wait may end before it.
    assert [e for e in seen if e[1] == "ok"] == [(Signal.ENQUEUED, "ok"), (Signal.EXECUTING, "ok"),
                                                 (Signal.COMPLETE, "ok")]
    assert (Signal.RETRYING, "KeyError") in seen
    assert (Signal.ERROR, "KeyError") in seen


@pytest.mark.parametrize("immediate", [False, True], ids=["worker", "immediate"])
async def test_a_complete_handler_finds_the_result_stored(queue: Queue, immediate: bool) -> None:
    # As in Huey. Sent before the success was written, a handler read the job still running, and
    # its wait for the result waited for the write that the handler itself held up.
    found: list[tuple[JobState | None, int]] = []
    handled = anyio.Event()

    @queue.on(Signal.COMPLETE)
    async def read_it(signal: Signal, job: JobContext, exc: BaseException | None = None) -> None:
        stored = queue.job(job.id)
        found.append((await stored.state(), await stored.result(timeout=5)))
        handled.set()

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    if immediate:
        queue.immediate = True
        await add.enqueue(1, 2)
    else:
        async with queue.worker():
            assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
            with anyio.fail_after(10):
                await handled.wait()
    assert found == [(JobState.SUCCEEDED, 3)]


async def test_a_retry_or_reschedule_that_waits_is_scheduled_once_written(queue: Queue) -> None:
    # As in Huey, whose retry with a delay is added to the schedule (SCHEDULED): none was sent,
    # for a retry, a RetryTask with a delay or a rate limit's reschedule. A retry at once waits
    # for no schedule.
    seen: list[tuple[str, JobState | None]] = []
    scheduled = anyio.Event()

    @queue.on(Signal.SCHEDULED)
    async def read_it(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        job_id = getattr(job, "id", "")
        seen.append((job_id, await queue.job(job_id).state()))
        if len(seen) == 3:
            scheduled.set()

    @queue.task(retries=1, retry_delay=3600)
    async def flaky() -> None:
        raise ValueError("not yet")

    @queue.task
    async def asks() -> None:
        raise RetryTask(delay=3600)

    @queue.task
    @queue.rate_limit("scarce", limit=1, per=3600, retry=True)
    async def limited() -> None:
        return None

    runs = 0

    @queue.task(retries=1)
    async def once_more() -> int:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ValueError("again at once")
        return runs

    async with queue.worker():
        waiting = [(await flaky.enqueue()).id, (await asks.enqueue()).id]
        # One of the two spends the window; the other waits for the next.
        limited_ids = {(await limited.enqueue()).id, (await limited.enqueue()).id}
        assert await (await once_more.enqueue()).result(timeout=10) == 2
        with anyio.fail_after(10):
            await scheduled.wait()
    assert all(state == JobState.SCHEDULED for _, state in seen)
    ids = {job_id for job_id, _ in seen}
    assert len(seen) == 3
    assert set(waiting) < ids
    assert len(ids & limited_ids) == 1


async def test_a_retry_at_once_is_enqueued_again_once_written(queue: Queue) -> None:
    # As in Huey, whose retry without a delay is put back on the queue (ENQUEUED): none was sent.
    seen: list[tuple[str, int]] = []

    @queue.on(Signal.ENQUEUED)
    async def read_it(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        job_id = getattr(job, "id", "")
        info = await queue.job(job_id).info()
        seen.append((job_id, info.attempt if info else 0))

    runs = 0

    @queue.task(retries=2)
    async def twice_more() -> int:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise ValueError("again at once")
        return runs

    async with queue.worker():
        job = await twice_more.enqueue()
        assert await job.result(timeout=10) == 3
    # At the enqueue, then at each retry once it was written: its record names the new attempt, or
    # a later one: the worker may run the job again before the handler's read is answered.
    assert [job_id for job_id, _ in seen] == [job.id] * 3
    assert all(attempt >= n for n, (_, attempt) in enumerate(seen, 1)), seen

    seen.clear()
    runs = 0
    queue.immediate = True
    job = await twice_more.enqueue()  # runs each attempt before it returns
    assert await job.result(timeout=10) == 3
    assert seen == [(job.id, 1), (job.id, 2), (job.id, 3)]


@pytest.mark.parametrize("immediate", [False, True], ids=["worker", "immediate"])
@pytest.mark.parametrize("listened", [(Signal.ENQUEUED, Signal.CANCELLED), (Signal.CANCELLED,)],
                         ids=["enqueued_and_cancelled", "cancelled_only"])
async def test_a_retry_the_broker_turns_into_a_cancel_is_told_as_cancelled(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, immediate: bool, listened: tuple[Signal, ...]
) -> None:
    # The job failed as a cancel of it was asked for, before its worker heard of the cancel: the
    # broker ends it cancelled rather than retry it. ENQUEUED was sent for the retry that never
    # was, and no CANCELLED (in immediate mode too, where `enqueue` runs the job); with no
    # handler for ENQUEUED, nothing at all.
    async def deaf(queue_name: str, on_request: object, on_listening: Callable[[], None]) -> None:
        on_listening()  # the pushed requests never come: only the worker's own check hears one
        await anyio.sleep_forever()

    monkeypatch.setattr(queue.broker, "listen_cancel", deaf)
    seen: list[Signal] = []
    told = anyio.Event()

    @queue.on(*listened)
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        seen.append(signal)
        if signal is Signal.CANCELLED:
            told.set()

    asked: list[bool] = []

    @queue.task(retries=2)
    async def doomed() -> None:
        asked.append(await queue.job(current_job().id).cancel())
        raise ValueError("failed as it was being cancelled")

    async with contextlib.AsyncExitStack() as stack:
        if immediate:
            queue.immediate = True
        else:
            await stack.enter_async_context(queue.worker())
        job = await doomed.enqueue()
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)
        with anyio.fail_after(10):
            await told.wait()
    assert asked == [True]  # the cancel was taken, for a job running
    assert seen == [*listened]  # ENQUEUED at the enqueue, then CANCELLED


async def test_an_immediate_retry_that_waits_is_scheduled_once_written(queue: Queue) -> None:
    seen: list[tuple[str, JobState | None]] = []

    @queue.on(Signal.SCHEDULED)
    async def read_it(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        job_id = getattr(job, "id", "")
        seen.append((job_id, await queue.job(job_id).state()))

    @queue.task(retries=1, retry_delay=0.01)
    async def flaky() -> None:
        raise ValueError("not yet")

    queue.immediate = True
    job = await flaky.enqueue()  # runs, waits out the delay, runs again and fails for good
    assert seen == [(job.id, JobState.SCHEDULED)]
    assert await job.state() == JobState.FAILED


async def test_complete_comes_when_the_reply_to_the_stored_success_was_lost(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The success is stored, its reply lost: written again, it is refused (the job has ended),
    # and its handlers were never called.
    completed: list[str] = []
    handled = anyio.Event()

    @queue.on(Signal.COMPLETE)
    def seen(signal: Signal, job: JobContext, exc: BaseException | None = None) -> None:
        completed.append(job.id)
        handled.set()

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    finish = queue.broker.finish
    calls = 0

    async def reply_lost_once(name: str, completions: list[Completion], ttl: float) -> list[bool]:
        nonlocal calls
        calls += 1
        applied = await finish(name, completions, ttl)
        if calls == 1:
            raise BrokerConnectionError("no reply from Redis (the test's)")
        return applied

    monkeypatch.setattr(queue.broker, "finish", reply_lost_once)
    async with queue.worker():
        job = await add.enqueue(1, 2)
        assert await job.result(timeout=10) == 3
        with anyio.fail_after(10):
            await handled.wait()
    assert calls == 2
    assert completed == [job.id]


@pytest.mark.parametrize("swallows", [False, True], ids=["cancellable", "swallows-once"])
async def test_a_worker_cancelled_while_it_connects_stops_at_once(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, swallows: bool
) -> None:
    # It has taken no job yet: nothing to wait for (it waited for the whole start-up, up to its
    # shutdown_timeout + 10 s, when the broker did not answer). A connect that loses the
    # cancellation sent to it once (a redis-py call can, on Python 3.11) is cancelled again.
    connecting = anyio.Event()
    swallowed: list[bool] = []

    async def stuck_connect() -> None:
        connecting.set()
        if swallows:
            try:
                await anyio.sleep_forever()
            except asyncio.CancelledError:
                swallowed.append(True)
        await anyio.sleep_forever()

    async def start() -> None:
        async with queue.worker():
            pytest.fail("the body of a worker whose start was cancelled ran")

    monkeypatch.setattr(queue, "connect", stuck_connect)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start)
            await connecting.wait()
            tg.cancel_scope.cancel()
    assert worker_tasks() == []
    assert swallowed == ([True] if swallows else [])


@pytest.mark.parametrize("how", ["deadline", "check_timeout"])
async def test_a_job_that_times_out_signals_timeout(queue: Queue, how: str) -> None:
    seen: list[tuple[Signal, str]] = []

    @queue.on(Signal.TIMEOUT, Signal.ERROR)
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        seen.append((signal, type(exc).__name__))

    @queue.task(timeout=0.1)
    async def slow() -> None:
        if how == "deadline":
            await anyio.sleep(10)
        while True:  # a loop that never awaits: it looks for its deadline itself
            current_job().check_timeout()

    async with queue.worker():
        with pytest.raises(TaskError, match="TaskTimeout"):
            await (await slow.enqueue()).result(timeout=10)
    assert seen == [(Signal.TIMEOUT, "TaskTimeout"), (Signal.ERROR, "TaskTimeout")]


async def test_every_failure_of_a_job_signals_error_before_retrying(queue: Queue) -> None:
    # As in Huey: ERROR for each exception the job raises, RETRYING after it when it is retried;
    # a held lock is LOCKED, an ERROR only when it fails the job for good.
    seen: list[tuple[Signal, str, str]] = []

    @queue.on(Signal.ERROR, Signal.RETRYING, Signal.LOCKED)
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        seen.append((signal, getattr(job, "task_name", ""), type(exc).__name__))

    @queue.task(retries=1, retry_delay=0)
    async def flaky() -> None:
        raise KeyError("x")

    @queue.task(retries=1, retry_delay=0)
    @queue.lock("busy")
    async def locked() -> None:
        return None

    async with queue.worker():
        with pytest.raises(TaskError):
            await (await flaky.enqueue()).result(timeout=10)
        async with queue.lock("busy"):
            with pytest.raises(TaskError, match="TaskLocked"):
                await (await locked.enqueue()).result(timeout=10)
    assert seen == [
        (Signal.ERROR, "flaky", "KeyError"), (Signal.RETRYING, "flaky", "KeyError"),
        (Signal.ERROR, "flaky", "KeyError"),
        (Signal.LOCKED, "locked", "TaskLocked"), (Signal.RETRYING, "locked", "TaskLocked"),
        (Signal.LOCKED, "locked", "TaskLocked"), (Signal.ERROR, "locked", "TaskLocked"),
    ]


async def test_a_job_that_never_reaches_a_worker_still_signals_its_end(queue: Queue) -> None:
    # Cancelled while it waits, it is ended where it was cancelled; in immediate mode, a job the
    # broker ends (expired here) is said as a worker says it.
    seen: list[tuple[Signal, str]] = []

    @queue.on(Signal.CANCELLED, Signal.EXPIRED)
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        seen.append((signal, getattr(job, "task_name", "")))

    @queue.task
    async def nap() -> None:
        return None

    job = await nap.options(delay=60).enqueue()
    assert await job.cancel()
    assert await job.cancel() is False  # ended already: nothing more to say
    queue.immediate = True
    old = await nap.options(expires=datetime(2000, 1, 1, tzinfo=UTC)).enqueue()
    assert await old.state() == JobState.EXPIRED
    assert seen == [(Signal.CANCELLED, "nap"), (Signal.EXPIRED, "nap")]


async def test_the_jobs_beside_one_the_broker_ended_start_before_its_signal_is_handled(
    queue: Queue,
) -> None:
    # The jobs of a batch after one the broker ended waited, not yet held, for its signal's
    # handlers: their leases went unrenewed, and a handler slower than the visibility timeout let
    # another worker take them over and run them too.
    handled, started = anyio.Event(), anyio.Event()

    @queue.on(Signal.EXPIRED)
    async def slow(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        await handled.wait()

    @queue.task
    async def mark() -> None:
        started.set()

    await mark.options(expires=datetime(2000, 1, 1, tzinfo=UTC)).enqueue()
    job = await mark.enqueue()
    async with queue.worker(concurrency=10):  # both come in its first receive
        with anyio.fail_after(10):
            await started.wait()  # while the handler still runs
        handled.set()
        assert await job.result(timeout=10) is None


async def test_a_periodic_task_whose_schedule_fails_stops_ticking_and_the_worker_runs_on(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # A Schedule of the user's that raised took the whole worker down, its running jobs left to
    # their leases' end, as a kill -9 would.
    caplog.set_level(logging.ERROR, logger="aqueue")
    ticked = anyio.Event()

    @queue.periodic(Breaking())
    async def tick() -> None:
        ticked.set()

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with queue.worker():
        with anyio.fail_after(10):
            await ticked.wait()  # its one tick, due at once
            while not any("its schedule failed" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110 - a log line has no event
                await anyio.sleep(0.01)
        assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
    [failed] = [r for r in caplog.records if "its schedule failed" in r.getMessage()]
    assert failed.getMessage() == "periodic tick: its schedule failed; this worker runs it no more"
    assert "schedule broke" in caplog.text  # its traceback


async def test_a_worker_whose_service_failed_raises_why_and_stops_quietly(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Worker, "_check_cancel", a_service_that_breaks)
    worker = Worker(queue)
    with pytest.raises(BaseExceptionGroup) as caught:
        with anyio.fail_after(10):
            await worker.run()
    assert caught.value.subgroup(RuntimeError) is not None
    assert "service broke" in repr(caught.value.subgroup(RuntimeError))
    worker.stop()  # nothing left to stop: no error of its own to hide the first one
    assert worker_threads.get() is None  # its thread pool was the worker's alone


@pytest.mark.parametrize("caller", ["loop callback", "thread"])
async def test_stop_called_from_a_loop_callback_or_another_thread_stops_gracefully(
    queue: Queue, caller: str
) -> None:
    # `loop.add_signal_handler(SIGTERM, worker.stop)`, or a thread's `call_soon_threadsafe`: stop()
    # ran outside a task, where anyio starts none: it raised in the callback, and the jobs
    # received ahead were neither started nor handed back (left `running` until their lease lapsed).
    started, release = anyio.Event(), anyio.Event()

    @queue.task
    async def hold() -> str:
        started.set()
        await release.wait()
        return "held"

    @queue.task
    async def later() -> None:
        return None

    worker = Worker(queue, concurrency=1, prefetch=5, shutdown_timeout=30)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        held = await hold.enqueue()
        waiting = await later.map([() for _ in range(5)])
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(10):
                await started.wait()
            if caller == "thread":
                await anyio.to_thread.run_sync(worker.stop)
            else:
                loop.call_soon(worker.stop)
            with anyio.fail_after(10):
                await worker._stop_heard.wait()  # the stop has landed on the loop
            release.set()
    finally:
        loop.set_exception_handler(None)
    assert errors == []
    assert await held.result(timeout=1) == "held"
    assert [await job.state() for job in waiting] == [JobState.PENDING] * 5  # handed back


async def test_a_worker_stopped_from_another_thread_before_it_runs_takes_no_job(queue: Queue) -> None:
    @queue.task
    async def never() -> None:
        pytest.fail("ran after its worker was stopped")

    job = await never.enqueue()
    worker = Worker(queue)
    await anyio.to_thread.run_sync(worker.stop)
    with anyio.fail_after(10):
        await worker.run()
    assert await job.state() == JobState.PENDING


async def test_a_stopping_worker_says_which_outcomes_it_could_not_write(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Redis out of reach as the worker stops: it gives up its outcomes after the grace, and said
    # nothing of them; their jobs ran again elsewhere, with no line to tell why.
    async def unreachable(*args: Any) -> list[bool]:
        raise BrokerConnectionError("cannot reach Redis: Connection refused")

    ran = anyio.Event()

    @queue.task
    async def quick() -> None:
        ran.set()

    caplog.set_level(logging.WARNING, logger="aqueue")
    async with queue.worker(shutdown_timeout=0):
        monkeypatch.setattr(type(queue.broker), "finish", unreachable)
        await quick.enqueue()
        with anyio.fail_after(10):
            await ran.wait()
    said = [r.getMessage() for r in caplog.records if "could not be written" in r.getMessage()]
    assert len(said) == 1, caplog.text
    assert "the outcomes of 1 job(s) could not be written" in said[0]


async def test_a_worker_whose_start_is_cancelled_does_not_run_on(queue: Queue) -> None:
    # A start-up deadline, or a fixture timing out, while the worker connects and starts.
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with queue.worker():
            pytest.fail("the body of a worker whose start was cancelled ran")
    assert scope.cancelled_caught
    assert worker_tasks() == []


async def test_a_worker_in_the_background_says_at_once_that_a_service_failed(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Worker, "_check_cancel", a_service_that_breaks)
    said = anyio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "services failed" in record.getMessage() and record.exc_info:
                said.set()

    async def run_until_said() -> None:
        async with queue.worker():
            with anyio.fail_after(10):
                await said.wait()  # while the body runs, not only when it exits

    watch = Watch()
    logging.getLogger("aqueue").addHandler(watch)
    try:
        with pytest.raises(BaseExceptionGroup):
            await run_until_said()
    finally:
        logging.getLogger("aqueue").removeHandler(watch)


async def test_enqueue_signals_name_only_what_was_stored(queue: Queue) -> None:
    seen: list[tuple[Signal, str]] = []

    @queue.on(Signal.ENQUEUED, Signal.SCHEDULED)
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        seen.append((signal, getattr(job, "id", "")))

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    first = await add.options(key="once").enqueue(1, 2)
    again = await add.options(key="once").enqueue(1, 2)  # the live job's handle: nothing stored
    assert again.id == first.id
    steps = await queue.enqueue(add.s(1, 1).then(add, 1))
    later = await queue.enqueue(add.options(delay=60).s(2, 2))
    assert seen == [(Signal.ENQUEUED, first.id), (Signal.ENQUEUED, steps.jobs[0].id),
                    (Signal.ENQUEUED, steps.jobs[1].id), (Signal.SCHEDULED, later[0].id)]


def test_queue_on_rejects_what_is_not_a_signal(queue: Queue) -> None:
    def handler(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        pass

    with pytest.raises(ConfigurationError, match=r"@queue.on\(\)"):
        queue.on(handler)  # type: ignore[arg-type]  # `@queue.on` without parentheses
    with pytest.raises(ConfigurationError, match="unknown signal 'compleet'"):
        queue.on("compleet")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="decorates a handler"):
        queue.on(Signal.ERROR)("not callable")  # type: ignore[arg-type]
    assert queue.on("complete")(handler) is handler  # type: ignore[arg-type]  # a Signal's value
    assert queue.signals.wants(Signal.COMPLETE)
    assert not queue.signals.wants(Signal.ERROR)


def test_queue_on_refuses_a_handler_that_cannot_take_signal_job_and_exc(queue: Queue) -> None:
    def two(signal: Signal, job: object) -> None:
        pass

    def three_without_default(signal: Signal, job: object, exc: BaseException | None) -> None:
        pass

    async def any_args(*args: object) -> None:
        pass

    with pytest.raises(ConfigurationError, match="handler\\(signal, job, exc\\)"):
        queue.on(Signal.COMPLETE)(two)  # type: ignore[arg-type]
    assert not queue.signals.wants(Signal.COMPLETE)
    assert queue.on(Signal.ERROR)(three_without_default) is three_without_default
    assert queue.on()(any_args) is any_args
    assert queue.on(Signal.ERROR)(print) is print  # a builtin: called as it is


async def test_immediate_mode_hands_back_the_job_of_a_cancelled_enqueue(queue: Queue) -> None:
    # The caller's deadline (a web request's, say) cancels the job under way: it goes back to the
    # queue for a worker, instead of staying `running` with nobody to run it (nor to reclaim it).
    started, proceed = anyio.Event(), anyio.Event()

    @queue.task
    async def slow() -> str:
        started.set()
        await proceed.wait()
        return "done"

    queue.immediate = True
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow.enqueue)
            await started.wait()
            tg.cancel_scope.cancel()
    [info] = await queue.jobs()
    assert (info.state, info.worker, info.started_at) == (JobState.PENDING, None, None)
    queue.immediate = False
    proceed.set()
    async with queue.worker():
        assert await queue.job(info.id).result(timeout=10) == "done"


async def test_immediate_mode_ends_expired_a_job_whose_expiry_passed_as_it_was_claimed(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Claimed before its expiry, it is not started after it: handed back and claimed again, it
    # ends expired. It stayed leased to nobody, its enqueue returned as if it had run.
    ran: list[str] = []

    @queue.task
    async def work() -> None:
        ran.append("ran")

    expires_at = time.time() + 1.0
    claim = queue.broker.claim

    async def claimed_just_before_its_expiry(*args: Any, **kwargs: Any) -> Any:
        d = await claim(*args, **kwargs)
        if d is not None and d.ended is None:
            await anyio.sleep(expires_at - time.time() + 0.05)  # its expiry passes meanwhile
        return d

    monkeypatch.setattr(queue.broker, "claim", claimed_just_before_its_expiry)
    queue.immediate = True
    job = await work.options(expires=datetime.fromtimestamp(expires_at, UTC)).enqueue()
    with pytest.raises(JobExpired):
        await job.result(timeout=10)
    assert ran == []


async def test_immediate_mode_leaves_a_delayed_job_an_idempotency_key_finds(queue: Queue) -> None:
    # The key found the delayed job, and the enqueue waited out its delay (an hour here) to run it:
    # a delayed job is stored, not run, in immediate mode.
    ran: list[int] = []

    @queue.task
    async def note(n: int) -> None:
        ran.append(n)

    queue.immediate = True
    delayed = await note.options(key="nightly", delay=3600).enqueue(1)
    with anyio.fail_after(10):
        again = await note.options(key="nightly").enqueue(1)
    assert again.id == delayed.id
    assert (await again.state(), ran) == (JobState.SCHEDULED, [])
    await note.options(key="other").enqueue(2)  # a job of its own still runs in the enqueue
    assert ran == [2]


async def test_immediate_mode_runs_inside_enqueue(queue: Queue) -> None:
    queue.immediate = True
    calls = 0

    @queue.task(retries=1)
    async def add(a: int, b: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("first attempt fails")
        return a + b

    job = await add.enqueue(1, 2)
    assert await job.state() == JobState.SUCCEEDED
    assert await job.result(timeout=0) == 3
    later = await add.schedule((1, 1), delay=60)
    assert await later.state() == JobState.SCHEDULED  # stored, not run


async def test_a_job_raising_cancelled_error_itself_fails_and_the_worker_goes_on(queue: Queue) -> None:
    # CancelledError raised by the task's own code (a future cancelled elsewhere, say), not by a
    # cancel scope of the worker's: the job fails like any error; the worker keeps running.
    @queue.task(retries=1)
    async def self_cancelling() -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with queue.worker():
        job = await self_cancelling.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
        assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
    assert caught.value.metadata["type"] == "CancelledError"
    assert caught.value.metadata["attempt"] == 2  # retried like any error
    assert await job.state() == JobState.FAILED


async def test_an_idle_worker_starts_a_job_before_it_waits_for_more(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # When the queue ran dry, the next receive would only wait: the job just received starts
    # first, rather than after that receive is sent.
    order: list[str] = []
    receive = queue.broker.receive

    async def recorded_receive(*args: object, **kwargs: object) -> list[object]:
        order.append("receive>")
        try:
            return await receive(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            order.append("receive<")

    @queue.task
    async def mark() -> None:
        order.append("run")

    monkeypatch.setattr(queue.broker, "receive", recorded_receive)
    async with queue.worker():
        await (await mark.enqueue()).result(timeout=10)
    run = order.index("run")
    assert order[run - 1] == "receive<", order


async def test_an_idle_worker_sends_an_outcome_before_it_waits_for_more(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job that ends at once: its outcome is on its way before the next (waiting) receive is
    # sent, which would only delay it.
    order: list[str] = []
    receive, finish = queue.broker.receive, queue.broker.finish

    async def recorded_receive(*args: object, **kwargs: object) -> list[object]:
        order.append("receive")
        return await receive(*args, **kwargs)  # type: ignore[arg-type]

    async def recorded_finish(*args: object, **kwargs: object) -> list[bool]:
        order.append("finish")
        return await finish(*args, **kwargs)  # type: ignore[arg-type]

    @queue.task
    async def mark() -> None:
        order.append("run")

    monkeypatch.setattr(queue.broker, "receive", recorded_receive)
    monkeypatch.setattr(queue.broker, "finish", recorded_finish)
    async with queue.worker():
        await (await mark.enqueue()).result(timeout=10)
    run = order.index("run")
    assert order[run + 1:run + 3] == ["finish", "receive"], order


async def test_failures_and_retries_are_logged_for_the_operator(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker whose every job failed said nothing of it, -v or not.
    @queue.task(retries=1, retry_delay=0)
    async def flaky() -> None:
        raise ValueError("upstream said no")

    with caplog.at_level(logging.INFO, logger="aqueue"):
        async with queue.worker():
            job = await flaky.enqueue()
            with pytest.raises(TaskError):
                await job.result(timeout=10)
    mine = [r for r in caplog.records if job.id in r.getMessage()]
    assert [r.levelno for r in mine] == [logging.WARNING, logging.ERROR]
    assert "attempt 1: ValueError('upstream said no'); retried at once" in mine[0].getMessage()
    failed = mine[1].getMessage()
    assert "failed after 2 attempt(s): ValueError" in failed
    assert 'raise ValueError("upstream said no")' in failed  # the traceback


def _outage_on_a_clock(monkeypatch: pytest.MonkeyPatch) -> tuple[unreachable_module.Unreachable, list[float]]:
    """An outage tracker and the clock it reads (set `clock[0]` to move it)."""
    clock = [100.0]
    monkeypatch.setattr(unreachable_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    return unreachable_module.Unreachable(), clock


def test_an_outage_is_told_as_it_starts_every_30s_while_it_lasts_and_as_it_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    outage, clock = _outage_on_a_clock(monkeypatch)
    lost = BrokerConnectionError("cannot reach Redis")
    with caplog.at_level(logging.DEBUG, logger="aqueue"):
        for at in (100.0, 100.5, 129.9, 130.0, 131.0, 160.0):
            clock[0] = at
            outage.failed("scheduling", lost)
        clock[0] = 165.25
        outage.reached("scheduling")
        outage.reached("scheduling")  # no outage: nothing to tell
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "broker unreachable (scheduling): cannot reach Redis; trying again until it answers"),
        ("DEBUG", "broker unreachable (scheduling): cannot reach Redis"),
        ("DEBUG", "broker unreachable (scheduling): cannot reach Redis"),
        ("WARNING", "broker still unreachable after 30s (scheduling): cannot reach Redis"),
        ("DEBUG", "broker unreachable (scheduling): cannot reach Redis"),
        ("WARNING", "broker still unreachable after 60s (scheduling): cannot reach Redis"),
        ("WARNING", "broker reachable again after 65.2s"),
    ]


def test_an_outage_of_refusals_ends_when_a_service_that_failed_gets_through(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A Redis that answers reads and refuses writes (a replica, a full maxmemory): each read
    # ended the outage and the next write began another, a warning or two a second.
    outage, clock = _outage_on_a_clock(monkeypatch)
    readonly = BrokerConnectionError("Redis is unavailable: READONLY You can't write against a read "
                                     "only replica.")
    readonly.answered = True  # as the Redis broker marks a refusal
    with caplog.at_level(logging.WARNING, logger="aqueue"):
        for at in (100.0, 100.5, 101.0):
            clock[0] = at
            outage.failed("writing 3 job outcome(s)", readonly)
            outage.failed("renewing 3 lease(s)", readonly)
            outage.reached("checking for cancel requests")  # a read: it never failed
            outage.reached("listening for cancel requests")
        clock[0] = 104.0
        outage.reached("renewing leases")  # a service that failed, through again: it is over
        # Out of reach, not refusing: any call that gets through ends it, though the one that
        # failed (a cancel check, made only while jobs run) may not be made again for long.
        outage.failed("checking for cancel requests", BrokerConnectionError("cannot reach Redis: refused"))
        clock[0] = 105.0
        outage.reached("receiving jobs")
    assert [r.getMessage() for r in caplog.records] == [
        "broker unreachable (writing 3 job outcome(s)): Redis is unavailable: READONLY You can't write "
        "against a read only replica.; trying again until it answers",
        "broker reachable again after 4.0s",
        "broker unreachable (checking for cancel requests): cannot reach Redis: refused; trying again until "
        "it answers",
        "broker reachable again after 1.0s",
    ]


def test_an_outage_whose_reason_changes_tells_the_new_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A password changed while the worker runs: its connections are cut, then every reconnect is
    # refused. The refusal, which waiting does not end, is told as it comes, not 30 s later.
    outage, clock = _outage_on_a_clock(monkeypatch)
    closed = BrokerConnectionError("cannot reach Redis: Connection closed by server.")
    down = BrokerConnectionError("cannot reach Redis: Connect call failed")  # the same reason
    refused = BrokerConnectionError("Redis refused the credentials: invalid password")
    with caplog.at_level(logging.DEBUG, logger="aqueue"):
        for at, exc in ((100.0, closed), (100.2, down), (100.5, refused), (101.0, refused), (101.5, closed)):
            clock[0] = at
            outage.failed("receiving jobs", exc)
        for n in range(unreachable_module.REASONS_TOLD + 2):  # reasons that keep changing
            outage.failed("receiving jobs", BrokerConnectionError(f"reason {n}"))
        clock[0] = 102.0
        outage.reached("receiving jobs")
        outage.failed("receiving jobs", refused)  # a new outage tells its reasons afresh
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "broker unreachable (receiving jobs): cannot reach Redis: Connection closed by server.; "
                    "trying again until it answers"),
        ("DEBUG", "broker unreachable (receiving jobs): cannot reach Redis: Connect call failed"),
        ("WARNING", "broker still unreachable after 0s (receiving jobs), now: Redis refused the credentials: "
                    "invalid password"),
        ("DEBUG", "broker unreachable (receiving jobs): Redis refused the credentials: invalid password"),
        ("DEBUG", "broker unreachable (receiving jobs): cannot reach Redis: Connection closed by server."),
        ("WARNING", "broker still unreachable after 2s (receiving jobs), now: reason 0"),
        ("WARNING", "broker still unreachable after 2s (receiving jobs), now: reason 1"),
        *[("DEBUG", f"broker unreachable (receiving jobs): reason {n}")
          for n in range(2, unreachable_module.REASONS_TOLD + 2)],
        ("WARNING", "broker reachable again after 2.0s"),
        ("WARNING", "broker unreachable (receiving jobs): Redis refused the credentials: invalid password; "
                    "trying again until it answers"),
    ]
