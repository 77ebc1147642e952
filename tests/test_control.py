"""Control (SPEC 5) on both brokers: expiry, revoke, cancel, periodic, locks, rate limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from aqueue import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    JobCancelled,
    JobExpired,
    JobRevoked,
    JobState,
    LockTimeout,
    Queue,
    RateLimitExceeded,
    Signal,
    TaskError,
    crontab,
    current_job,
    every,
)
from aqueue import _outage as outage
from aqueue.brokers import Broker, JobRecord, MemoryBroker, RedisBroker


def recorder(queue: Queue, *signals: Signal) -> list[tuple[Signal, str]]:
    seen: list[tuple[Signal, str]] = []

    @queue.on(*signals)
    def record(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        seen.append((signal, getattr(job, "id", "")))

    return seen


async def test_expired_job_never_runs(queue: Queue) -> None:
    seen = recorder(queue, Signal.EXPIRED)
    ran: list[int] = []

    @queue.task
    async def work(n: int) -> None:
        ran.append(n)

    late = await work.options(expires=datetime.now(UTC) - timedelta(seconds=1)).enqueue(1)
    fresh = await work.options(expires=60).enqueue(2)
    async with queue.worker():
        await fresh.result(timeout=10)
        with pytest.raises(JobExpired):
            await late.result(timeout=10)
    assert ran == [2]
    assert await late.state() == JobState.EXPIRED
    assert seen == [(Signal.EXPIRED, late.id)]


async def test_revoke_and_restore_a_job(queue: Queue) -> None:
    seen = recorder(queue, Signal.REVOKED)

    @queue.task
    async def work(n: int) -> int:
        return n

    revoked = await work.enqueue(1)
    restored = await work.enqueue(2)
    assert await revoked.revoke() is True
    assert await restored.revoke() is True
    assert await restored.is_revoked() is True
    assert await restored.restore() is True
    assert await restored.is_revoked() is False
    async with queue.worker():
        assert await restored.result(timeout=10) == 2
        with pytest.raises(JobRevoked):
            await revoked.result(timeout=10)
    assert seen == [(Signal.REVOKED, revoked.id)]
    assert await revoked.revoke() is False  # final: nothing to revoke


@pytest.mark.parametrize("retries", [0, 1], ids=["dead-letter-retried", "retried-by-its-policy"])
async def test_a_job_revoked_while_it_runs_runs_on(queue: Queue, retries: int) -> None:
    started, go_on = anyio.Event(), anyio.Event()
    runs: list[int] = []

    @queue.task(retries=retries)
    async def flaky() -> str:
        runs.append(len(runs) + 1)
        if len(runs) == 1:
            started.set()
            await go_on.wait()
            raise ValueError("down")
        return "up"

    async with queue.worker():
        job = await flaky.enqueue()
        with anyio.fail_after(10):
            await started.wait()
        assert await job.revoke() is True  # too late for this run: it is running
        go_on.set()
        if retries:  # its retry is revoked when met
            with pytest.raises(JobRevoked):
                await job.result(timeout=10)
        else:
            with pytest.raises(TaskError):
                await job.result(timeout=10)
            assert await queue.retry(job.id) is True  # asks it to run again: the revoke is spent
            assert await job.result(timeout=10) == "up"
    assert runs == ([1] if retries else [1, 2])


async def test_a_retried_dead_letter_takes_its_idempotency_key_back(queue: Queue) -> None:
    @queue.task
    async def once() -> None:
        raise ValueError("down")

    job = await once.options(key="nightly").enqueue()
    async with queue.worker():
        with pytest.raises(TaskError):
            await job.result(timeout=10)
    assert (await once.options(key="nightly").enqueue()).id != job.id  # ended: the key was free
    await queue.purge_dead_letters()
    job = await once.options(key="daily").enqueue()
    async with queue.worker():
        with pytest.raises(TaskError):
            await job.result(timeout=10)
    assert await queue.retry(job.id) is True  # live again, no worker: it waits
    assert (await once.options(key="daily").enqueue()).id == job.id


async def test_revoke_a_task_for_good_once_and_until(queue: Queue) -> None:
    @queue.task
    async def work(n: int) -> int:
        return n

    await work.revoke(once=True)
    assert await work.is_revoked() is True
    first = await work.enqueue(1)
    second = await work.enqueue(2)
    async with queue.worker(concurrency=1):
        with pytest.raises(JobRevoked):
            await first.result(timeout=10)
        assert await second.result(timeout=10) == 2  # `once` was used up
        await work.revoke()
        third = await work.enqueue(3)
        with pytest.raises(JobRevoked):
            await third.result(timeout=10)
        assert await work.restore() is True
        assert await work.restore() is False
        assert await (await work.enqueue(4)).result(timeout=10) == 4
        await work.revoke(until=datetime.now(UTC) - timedelta(seconds=1))  # already over
        assert await work.is_revoked() is False
        assert await (await work.enqueue(5)).result(timeout=10) == 5
        await work.revoke(until=datetime.now(UTC) - timedelta(seconds=1))
        assert await work.restore() is False  # over: there was nothing to undo
    for once in (2, "yes", None):  # read each its own way by the two brokers before
        with pytest.raises(ConfigurationError, match="once must be True or False"):
            await work.revoke(once=once)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="until must be seconds, a timedelta or a datetime"):
        await work.revoke(until="tomorrow")  # type: ignore[arg-type]


async def test_revocations_hold_for_every_job_leased_at_once(queue: Queue) -> None:
    # One receive leases many jobs: a revocation for one job stops exactly one of them, a
    # revocation for good stops them all, and other tasks' jobs run.
    @queue.task
    async def work(n: int) -> int:
        return n

    @queue.task
    async def other(n: int) -> int:
        return n

    await work.revoke(once=True)
    once = [await work.enqueue(i) for i in range(5)]
    async with queue.worker(concurrency=20):
        outcomes = await asyncio.gather(*(j.result(timeout=10) for j in once), return_exceptions=True)
    assert sum(isinstance(o, JobRevoked) for o in outcomes) == 1
    assert all(o == i for i, o in enumerate(outcomes) if not isinstance(o, JobRevoked))

    await work.revoke()
    stopped = [await work.enqueue(i) for i in range(5)]
    running = [await other.enqueue(i) for i in range(5)]
    async with queue.worker(concurrency=20):
        for job in stopped:
            with pytest.raises(JobRevoked):
                await job.result(timeout=10)
        assert [await j.result(timeout=10) for j in running] == list(range(5))


async def test_cancel_waiting_jobs(queue: Queue) -> None:
    @queue.task
    async def work() -> None:
        raise AssertionError("a cancelled job never runs")

    pending = await work.enqueue()
    scheduled = await work.schedule(delay=0.1)
    assert await pending.cancel() is True
    assert await scheduled.cancel() is True
    async with queue.worker():
        with pytest.raises(JobCancelled):
            await pending.result(timeout=10)
        with pytest.raises(JobCancelled):
            await scheduled.result(timeout=10)
    assert await pending.state() == JobState.CANCELLED
    assert await pending.cancel() is False  # already final
    assert await queue.job("unknown").cancel() is False


async def test_cancel_a_running_job(queue: Queue) -> None:
    seen = recorder(queue, Signal.CANCELLED, Signal.RETRYING)
    started = anyio.Event()
    cleaned_up = anyio.Event()
    runs = 0

    @queue.task(retries=3)
    async def long_job() -> None:
        nonlocal runs
        runs += 1
        started.set()
        try:
            assert await current_job().cancelled() is False
            await anyio.sleep(60)
        finally:
            cleaned_up.set()

    async with queue.worker():
        job = await long_job.enqueue()
        with anyio.fail_after(10):
            await started.wait()
        asked = time.monotonic()
        assert await job.cancel() is True
        with anyio.fail_after(10):
            await cleaned_up.wait()
        assert time.monotonic() - asked < 1.0
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)
    assert runs == 1
    assert seen == [(Signal.CANCELLED, job.id)]
    assert await job.state() == JobState.CANCELLED


async def test_a_job_cancelled_while_its_executing_handlers_run_does_not_start(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checks before a job starts came before its EXECUTING handlers: a cancel heard while
    # they ran only cancelled its scope, and its code ran up to its first await.
    from aqueue._worker._executor import RunningJob

    ran: list[str] = []
    heard = anyio.Event()
    request_cancel = RunningJob.request_cancel

    def heard_too(self: RunningJob) -> None:
        request_cancel(self)
        heard.set()

    monkeypatch.setattr(RunningJob, "request_cancel", heard_too)

    @queue.on(Signal.EXECUTING)
    async def cancel_it(signal: Signal, job: Any, exc: BaseException | None = None) -> None:
        assert await queue.job(job.id).cancel() is True
        with anyio.fail_after(10):
            await heard.wait()  # by the worker running it

    @queue.task
    async def side_effect() -> None:
        ran.append("before its first await")
        await anyio.lowlevel.checkpoint()

    async with queue.worker():
        job = await side_effect.enqueue()
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)
    assert ran == []


async def test_a_job_whose_executing_handlers_run_past_its_expiry_still_runs(queue: Queue) -> None:
    # Its expiry is about starting, and it started with its EXECUTING: the checks made again once
    # the handlers were done handed it back, to end expired unrun.
    ran: list[str] = []

    @queue.on(Signal.EXECUTING)
    async def slow_handler(signal: Signal, job: Any, exc: BaseException | None = None) -> None:
        with anyio.fail_after(10):
            while time.time() <= expires_at:  # noqa: ASYNC110 - the clock has no event
                await anyio.sleep(0.01)

    @queue.task
    async def work() -> None:
        ran.append("ran")

    expires_at = time.time() + 0.3
    async with queue.worker():
        job = await work.options(expires=datetime.fromtimestamp(expires_at, UTC)).enqueue()
        assert await job.result(timeout=10) is None
    assert ran == ["ran"]


async def test_a_failure_that_a_cancel_overrides_is_told_cancelled(queue: Queue) -> None:
    # The job failed for good, and was asked to cancel before its failure was written: it ends
    # cancelled, not in the dead letters, and no CANCELLED came (only the failure's ERROR).
    seen = recorder(queue, Signal.ERROR, Signal.CANCELLED)
    told = anyio.Event()

    @queue.on(Signal.ERROR)
    async def cancel_it(signal: Signal, job: Any, exc: BaseException | None = None) -> None:
        assert await queue.job(job.id).cancel() is True  # it runs still: asked to cancel

    @queue.on(Signal.CANCELLED)
    def cancelled(signal: Signal, job: Any, exc: BaseException | None = None) -> None:
        told.set()

    @queue.task(retries=0)
    async def broken() -> None:
        raise ValueError("for good")

    async with queue.worker():
        job = await broken.enqueue()
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)
        with anyio.fail_after(10):
            await told.wait()
    assert seen == [(Signal.ERROR, job.id), (Signal.CANCELLED, job.id)]
    assert await queue.dead_letters() == []


async def test_a_job_cancelled_as_its_rate_limit_puts_it_off_is_told_cancelled_once(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker reads the record of a job it wrote to run again, to tell a cancel that outlasted
    # the run (CANCELLED) from the run again (SCHEDULED). A job put off by its rate limit keeps its
    # attempt, so a cancel() landing between the write and that read, which told CANCELLED itself,
    # was told CANCELLED a second time by the worker.
    seen = recorder(queue, Signal.CANCELLED, Signal.SCHEDULED)

    @queue.task
    @queue.rate_limit("scarce", limit=1, per=3600, retry=True)
    async def limited() -> None:
        return None

    async with queue.rate_limit("scarce", limit=1, per=3600):
        pass  # the window spent: the job is put off to the next
    broker = queue.broker
    reading = broker.get
    read = anyio.Event()
    job_id = ""

    async def cancelled_before_the_read(queue_name: str, wanted: str) -> JobRecord | None:
        record = await reading(queue_name, wanted)
        if wanted == job_id and record is not None and record.state == "scheduled" and not read.is_set():
            read.set()
            assert await queue.job(wanted).cancel() is True
            return await reading(queue_name, wanted)
        return record

    monkeypatch.setattr(broker, "get", cancelled_before_the_read)
    async with queue.worker():
        job_id = (await limited.enqueue()).id
        with anyio.fail_after(10):
            await read.wait()
    assert await queue.job(job_id).state() == JobState.CANCELLED
    # Told by cancel(), then the reschedule the worker wrote before it, told as it was read back.
    assert [signal for signal, _ in seen] == [Signal.CANCELLED, Signal.SCHEDULED], seen


async def test_a_worker_takes_jobs_only_once_it_listens_for_cancel_requests(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job started before its worker listens would miss a cancel request made meanwhile: it would
    # wait for the fallback check. Here the listener is held up for a while, with a job waiting:
    # the job must still start only after the worker listens.
    order: list[str] = []
    ran = anyio.Event()
    listen = queue.broker.listen_cancel

    async def slow_listen(name: str, on_request: Callable[[str], None],
                          on_listening: Callable[[], None]) -> None:
        with anyio.move_on_after(0.5):  # time enough for a worker that does not wait to run it
            await ran.wait()

        def listening() -> None:
            order.append("listening")
            on_listening()

        await listen(name, on_request, listening)

    monkeypatch.setattr(queue.broker, "listen_cancel", slow_listen)

    @queue.task
    async def work() -> None:
        order.append("ran")
        ran.set()

    job = await work.enqueue()
    async with queue.worker():
        await job.result(timeout=10)
    assert order[:2] == ["listening", "ran"]


async def test_cancel_request_survives_a_redelivery(queue: Queue) -> None:
    @queue.task
    async def work() -> None:
        raise AssertionError("a cancelled job never runs again")

    job = await work.enqueue()
    # Its worker dies while it runs; the cancel request is made in between.
    assert await queue.broker.receive(queue.name, "dead-worker", 1, 0, 10)
    assert await job.cancel() is True
    assert await job.state() == JobState.RUNNING
    async with queue.worker():
        with pytest.raises(JobCancelled):
            await job.result(timeout=15)


async def test_periodic_ticks_are_enqueued_once(broker: Broker, queue_name: str) -> None:
    queue = Queue(broker=broker, name=queue_name)
    runs: list[float] = []
    third = anyio.Event()

    @queue.periodic(every(seconds=1), name="beat")
    async def beat() -> None:
        runs.append(time.time())
        if len(runs) == 3:
            third.set()

    assert list(queue.schedules) == ["beat"]
    async with queue.worker(), queue.worker():  # two schedulers compete for each tick
        with anyio.fail_after(10):
            await third.wait()
    jobs = await queue.jobs(task="beat")
    seconds = [math.floor(j.enqueued_at.timestamp()) for j in jobs if j.enqueued_at]
    assert len(seconds) == len(set(seconds))  # never two jobs for one tick
    assert len(runs) <= len(jobs) <= len(runs) + 1  # a last tick may be enqueued, not yet run


async def test_tick_claim_is_atomic(broker: Broker, queue_name: str) -> None:
    from aqueue.brokers import NewJob

    def job(i: int) -> NewJob:
        return NewJob(id=f"j{i}", task="beat", payload=b'{"args":[],"kwargs":{}}', enqueued_at=time.time())

    assert await broker.enqueue_tick(queue_name, 100.0, job(1)) is True
    assert await broker.enqueue_tick(queue_name, 100.0, job(2)) is False
    assert await broker.enqueue_tick(queue_name, 99.0, job(3)) is False
    assert await broker.enqueue_tick(queue_name, 101.0, job(4)) is True
    assert [r.id for r in await broker.jobs(queue_name, None, None, 10)] == ["j4", "j1"]


async def test_lock_is_exclusive(queue: Queue) -> None:
    inside = 0
    peak = 0

    async def contend() -> None:
        nonlocal inside, peak
        for _ in range(5):
            async with queue.lock("shared", ttl=5):
                inside += 1
                peak = max(peak, inside)
                await anyio.lowlevel.checkpoint()  # let the others try while it is held
                inside -= 1

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(contend)
    assert peak == 1


async def test_lock_timeout_zero_and_prompt_wakeup(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    waiting = anyio.Event()
    release = anyio.Event()
    acquired = anyio.Event()
    broker_wait = queue.broker.lock_wait

    async def observed_wait(q: str, name: str, timeout: float | None) -> None:
        waiting.set()  # the waiter found the lock held and now blocks on it
        await broker_wait(q, name, timeout)

    monkeypatch.setattr(queue.broker, "lock_wait", observed_wait)

    held = anyio.Event()

    async def hold() -> None:
        async with queue.lock("door", ttl=30):
            held.set()
            await release.wait()

    async def wait_for_it() -> None:
        async with queue.lock("door", timeout=10):
            acquired.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        with anyio.fail_after(5):
            await held.wait()
        with pytest.raises(LockTimeout):
            async with queue.lock("door", timeout=0):
                pass
        tg.start_soon(wait_for_it)
        with anyio.fail_after(5):
            await waiting.wait()
        released_at = time.monotonic()
        release.set()
        with anyio.fail_after(5):
            await acquired.wait()
        woken_after = time.monotonic() - released_at
    assert woken_after < 0.5  # woken by the release, not by a polling loop


async def test_lock_released_on_error_and_cancel(queue: Queue) -> None:
    with pytest.raises(ValueError, match="inside"):
        async with queue.lock("l"):
            raise ValueError("inside")
    with anyio.move_on_after(0.1):
        async with queue.lock("l"):
            await anyio.sleep(10)
    async with queue.lock("l", timeout=0):
        pass  # free again both times


@pytest.mark.parametrize("timeout", [1e-9, 1e-6])
async def test_a_free_lock_is_taken_with_a_tiny_timeout(queue: Queue, timeout: float) -> None:
    # The timeout was spent before the wait for this process's turn began, and the lock was never
    # asked for: LockTimeout on a lock no one held. It makes the one try timeout=0 makes.
    async with queue.lock("free", timeout=timeout):
        with pytest.raises(LockTimeout):
            async with queue.lock("free", timeout=timeout):
                pass


async def test_lock_is_renewed_while_held(queue: Queue) -> None:
    async with queue.lock("long", ttl=timedelta(milliseconds=500)):
        await anyio.sleep(1.2)  # more than twice the ttl
        with pytest.raises(LockTimeout):
            async with queue.lock("long", timeout=0):
                pass


async def test_a_lock_whose_renewals_fail_for_a_while_is_kept_if_one_takes_in_its_ttl(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two renewals fail (the broker out of reach): the third is tried within the ttl, not a whole
    # ttl/3 after the second, at the lock's very end (where the lock was lost).
    broker = queue.broker
    extend = broker.lock_extend
    calls: list[bool] = []
    renewed = anyio.Event()

    async def extend_after_two_failures(queue_name: str, name: str, token: str, ttl: float) -> bool:
        if len(calls) < 2:
            calls.append(False)
            raise BrokerConnectionError("out of reach")
        calls.append(await extend(queue_name, name, token, ttl))
        renewed.set()
        return calls[-1]

    monkeypatch.setattr(broker, "lock_extend", extend_after_two_failures)
    async with queue.lock("flaky link", ttl=0.6):
        with anyio.fail_after(10):
            await renewed.wait()
        assert calls == [False, False, True]
        with pytest.raises(LockTimeout):
            async with queue.lock("flaky link", timeout=0):
                pass


async def held_until_said_lost(queue: Queue, name: str, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Hold the lock (ttl 0.3 s) until it is said lost; what was said of it."""
    caplog.set_level(logging.WARNING, logger="aqueue")
    async with queue.lock(name, ttl=0.3):
        with anyio.fail_after(10):
            while not any("was lost" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110 - a log line has no event
                await anyio.sleep(0.01)
    return [r.getMessage() for r in caplog.records if f"lock {name!r}" in r.getMessage()]


async def test_a_lock_whose_renewals_fail_for_its_whole_ttl_is_said_lost_once(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Tried again every ttl/10 with a warning each, for as long as the body ran, and never said
    # lost while the broker stayed out of reach.
    async def out_of_reach(queue_name: str, name: str, token: str, ttl: float) -> bool:
        raise BrokerConnectionError("out of reach")

    monkeypatch.setattr(queue.broker, "lock_extend", out_of_reach)
    said = await held_until_said_lost(queue, "gone", caplog)
    assert [m.split(":")[0] for m in said] == ["renewing lock 'gone' failed, trying again",
                                               "lock 'gone' was lost while held"]


async def test_a_lock_found_no_longer_held_does_not_blame_its_ttl_alone(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Its key wiped by a Redis restart (no persistence), the renewal found it gone: the log said
    # "its ttl ran out", which sent the reader looking at the ttl.
    async def gone(queue_name: str, name: str, token: str, ttl: float) -> bool:
        return False

    monkeypatch.setattr(queue.broker, "lock_extend", gone)
    [said] = await held_until_said_lost(queue, "wiped", caplog)
    assert said == ("lock 'wiped' was lost while held: it is no longer ours (its ttl ran out, or Redis "
                    "lost the key: a restart or a failover without it)")


async def test_a_cancelled_caller_does_not_take_a_lock(queue: Queue) -> None:
    # A free lock is taken without waiting for this process's turn: on the memory broker, whose
    # calls do not await, a caller cancelled already took it and ran its body.
    ran: list[str] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        async with queue.lock("free", timeout=5):
            ran.append("body")
    assert ran == []
    async with queue.lock("free", timeout=0):
        pass  # and it is free


async def test_lock_exit_ends_a_renewer_that_swallowed_its_cancellation(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A renewal under way when the holder leaves, in a call that swallows the cancellation sent to
    # it once (as a redis-py call can on Python 3.11): the renewer is cancelled again, and the exit
    # ends.
    broker = queue.broker
    renewing = anyio.Event()
    swallowed = []

    async def extend_swallowing_once(queue_name: str, name: str, token: str, ttl: float) -> bool:
        if swallowed:
            await anyio.sleep_forever()
        renewing.set()
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            swallowed.append(name)
        return True

    monkeypatch.setattr(broker, "lock_extend", extend_swallowing_once)
    left = anyio.Event()

    async def hold() -> None:
        async with queue.lock("sticky", ttl=0.3):
            await renewing.wait()
        left.set()

    # In a task of its own: the exit is shielded, so a hang there fails this test, not the run.
    holder = asyncio.get_running_loop().create_task(hold())
    with anyio.move_on_after(5):
        await left.wait()
    assert left.is_set(), "the lock's exit still waits for its renewer"
    await holder
    assert swallowed == ["sticky"]
    assert await broker.lock_acquire(queue.name, "sticky", "next", 1.0)  # released on the way out


async def test_dead_holders_lock_frees_after_ttl(queue: Queue) -> None:
    assert await queue.broker.lock_acquire(queue.name, "orphan", "dead-holder", 0.3)
    start = time.monotonic()
    async with queue.lock("orphan", timeout=timedelta(seconds=5)):
        waited = time.monotonic() - start
    assert 0.2 <= waited < 2
    assert await queue.broker.lock_release(queue.name, "orphan", "dead-holder") is False


async def test_lock_decorator_raises_task_locked_and_retries(queue: Queue) -> None:
    seen = recorder(queue, Signal.LOCKED)
    locked = anyio.Event()
    queue.on(Signal.LOCKED)(lambda signal, job, exc=None: locked.set())

    @queue.task(retries=5, retry_delay=0.2)
    @queue.lock("report")
    async def report() -> int:
        return current_job().attempt

    async with queue.worker():
        async with queue.lock("report"):
            job = await report.enqueue()
            with anyio.fail_after(10):
                await locked.wait()
        assert await job.result(timeout=10) >= 2
    assert seen[0] == (Signal.LOCKED, job.id)


async def test_a_guarded_task_called_directly_runs_as_it_is(queue: Queue) -> None:
    # Calling a task runs it here and now, unchanged: a plain def under a lock stays a plain call
    # (it returned a coroutine, though typed as returning its value), and no call takes the lock
    # or spends the rate limit; those guard its jobs.
    @queue.task
    @queue.lock("held")
    def plain(a: int, b: int) -> int:
        return a + b

    @queue.task
    @queue.rate_limit("spent", limit=1, per=3600)
    @queue.lock("held")
    async def coro(a: int, b: int) -> int:
        return a + b

    async with queue.lock("held", timeout=0):
        assert plain(1, 2) == 3
        assert [await coro(1, 2), await coro(2, 3)] == [3, 5]
    async with queue.worker():  # a job still runs under both guards
        assert await (await coro.enqueue(3, 4)).result(timeout=10) == 7
    with pytest.raises(RateLimitExceeded):  # spent by the job alone
        await queue.rate_limit("spent", limit=1, per=3600).hit()


async def test_a_guard_above_the_task_decorator_is_refused(queue: Queue) -> None:
    # Above @queue.task a lock or rate limit guarded the direct call alone: above @queue.periodic
    # every tick ran unguarded, without a word.
    with pytest.raises(ConfigurationError, match=r"goes below @queue\.task"):
        @queue.lock("nightly")
        @queue.periodic(every(hours=1))
        async def nightly() -> None:
            return None

    with pytest.raises(ConfigurationError, match=r"goes below @queue\.task"):
        @queue.rate_limit("api", limit=1, per=60)
        @queue.task
        async def call_api() -> None:
            return None


async def test_a_periodic_task_that_needs_arguments_is_refused(queue: Queue) -> None:
    # It was registered, then failed at every tick in the worker (TypeError).
    with pytest.raises(ConfigurationError, match="'report' needs some"):
        @queue.periodic(every(hours=1))
        @queue.lock("report")
        async def report(day: str) -> None:
            return None

    @queue.periodic(every(hours=1))
    async def optional(day: str = "today", *more: str) -> None:
        return None

    assert "optional" in queue.schedules


async def test_a_second_schedule_for_one_task_is_refused(queue: Queue) -> None:
    # The second replaced the first without a word: only its ticks ran.
    async def report() -> None:
        return None

    morning = crontab(minute="0", hour="9")
    queue.periodic(morning)(report)
    queue.periodic(crontab(minute="0", hour="9"))(report)  # the same again, as @queue.task allows
    with pytest.raises(ConfigurationError, match="'report' already runs on crontab"):
        queue.periodic(crontab(minute="30", hour="17"))(report)
    assert repr(queue.schedules["report"]) == repr(morning)
    queue.periodic(crontab(minute="30", hour="17"), name="evening_report")(report)  # named apart
    with pytest.raises(ConfigurationError, match="decorates a function, not the task"):
        @queue.periodic(every(hours=1))
        @queue.periodic(every(hours=2))
        async def stacked() -> None:
            return None


async def test_a_task_asking_again_for_a_lock_it_holds_is_refused(queue: Queue) -> None:
    # It waited for itself for ever (a job under @queue.lock taking its own lock again held its
    # runner and renewed the lock for good).
    ran: list[str] = []

    @queue.task(retries=0)
    @queue.lock("report")
    async def report() -> None:
        async with queue.lock("report"):
            ran.append("inner")

    with anyio.fail_after(5):
        async with queue.lock("shared"):
            with pytest.raises(RuntimeError, match="already held by this task"):
                async with queue.lock("shared"):
                    pass
            with pytest.raises(LockTimeout):  # with a timeout, it times out as before
                async with queue.lock("shared", timeout=0):
                    pass
            same_queue = Queue(broker=queue.broker, name=queue.name)  # another object, one queue
            with pytest.raises(RuntimeError, match="already held by this task"):
                async with same_queue.lock("shared"):
                    pass
            async with queue.lock("other"):  # another name is another lock
                pass
        async with queue.lock("shared", timeout=0):  # held no more once left
            pass
        async with queue.worker():
            with pytest.raises(TaskError, match="already held by this task"):
                await (await report.enqueue()).result(timeout=5)
    assert ran == []


async def test_a_lock_left_from_another_task_is_released(queue: Queue) -> None:
    # Entered in one task, left in another (a fixture's teardown, an exit stack closed elsewhere):
    # it raised KeyError and its renewer kept it held for as long as the process lived.
    lock = queue.lock("handover", ttl=30)
    entered = anyio.Event()

    async def enter() -> None:
        await lock.__aenter__()
        entered.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(enter)
        await entered.wait()
    await lock.__aexit__(None, None, None)
    async with queue.lock("handover", timeout=0):  # free at once, not after its ttl
        pass


async def test_a_waiter_cancelled_while_its_request_takes_the_lock_leaves_it_free(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelled after Redis took the lock for it but before the answer was read, the waiter left
    # the lock held by no one until its ttl ran out.
    broker = queue.broker
    taking = broker.lock_acquire
    taken, answered = anyio.Event(), anyio.Event()

    async def slow_answer(queue_name: str, name: str, token: str, ttl: float) -> bool:
        result = await taking(queue_name, name, token, ttl)
        taken.set()
        await answered.wait()  # the answer is on its way when the cancel comes
        return result

    monkeypatch.setattr(broker, "lock_acquire", slow_answer)
    entered = False
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            async def wait_for_the_lock() -> None:
                nonlocal entered
                async with queue.lock("contended", ttl=30):
                    entered = True
                    await anyio.sleep_forever()

            tg.start_soon(wait_for_the_lock)
            await taken.wait()
            tg.cancel_scope.cancel()
            answered.set()
    monkeypatch.setattr(broker, "lock_acquire", taking)
    async with queue.lock("contended", timeout=0):  # free at once, not after 30 s
        pass
    # Cut off in its request (a cancel is not held up by a slow broker): the body never began,
    # and what the request took was released by its token.
    assert not entered


async def test_a_release_hands_the_lock_on_without_every_waiter_asking_again(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every release woke every waiter of the process, and each asked the broker for the lock:
    # a hand-off cost a request per waiter (200 waiters: 28 ms each, a million requests).
    broker = queue.broker
    taking = broker.lock_acquire
    asked = 0

    async def counted(queue_name: str, name: str, token: str, ttl: float) -> bool:
        nonlocal asked
        asked += 1
        return await taking(queue_name, name, token, ttl)

    monkeypatch.setattr(broker, "lock_acquire", counted)
    held: list[int] = []
    inside = 0

    async def take(n: int) -> None:
        nonlocal inside
        async with queue.lock("hot", ttl=30):
            inside += 1
            assert inside == 1
            held.append(n)
            await anyio.lowlevel.checkpoint()
            inside -= 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:  # it ends once every waiter has had the lock
            async with queue.lock("hot", ttl=30):  # all of them wait
                for n in range(50):
                    tg.start_soon(take, n)
                await anyio.wait_all_tasks_blocked()
    assert sorted(held) == list(range(50))
    assert asked <= 3 * 51  # each waiter asks about twice, not once per release before its turn


async def test_a_broker_slow_to_answer_holds_a_lock_waiter_no_longer_than_its_timeout(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stalled Redis held `lock(timeout=0.5)` for its socket timeout, twice (8 s), and a waiter
    # whose request was cancelled until the broker answered: the request ran shielded.
    broker = queue.broker
    taking, releasing = broker.lock_acquire, broker.lock_release
    released: list[str] = []

    async def stalled(queue_name: str, name: str, token: str, ttl: float) -> bool:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def release(queue_name: str, name: str, token: str) -> bool:
        released.append(token)
        return await releasing(queue_name, name, token)

    monkeypatch.setattr(broker, "lock_acquire", stalled)
    monkeypatch.setattr(broker, "lock_release", release)
    started = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(LockTimeout, match="no answer from the broker in time"):
        async with queue.lock("slow", timeout=0.5):
            pass
    assert anyio.current_time() - started < 2  # its attempt gets ATTEMPT_WITHIN (1 s) at least
    assert len(released) == 1  # what the request may have taken is released by its token
    with anyio.fail_after(5):
        with anyio.move_on_after(0.2) as cut_off:  # a caller's cancel, with no timeout of its own
            async with queue.lock("slow"):
                pass
    assert cut_off.cancelled_caught
    assert len(released) == 2
    monkeypatch.setattr(broker, "lock_acquire", taking)
    async with queue.lock("slow", timeout=0):  # free
        pass


async def test_a_request_and_releases_that_hang_end_within_a_second_of_the_timeout(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request lost to a dropped connection, then one with no answer: their releases went one
    # after another, a second each.
    requests = 0

    async def lost_then_hangs(*args: object) -> bool:
        nonlocal requests
        requests += 1
        if requests == 1:
            raise BrokerConnectionError("Connection closed by server.")
        await anyio.sleep_forever()
        raise AssertionError("not reached")

    async def hangs(*args: object) -> bool:
        await anyio.sleep_forever()
        raise AssertionError("not reached")

    monkeypatch.setattr(queue.broker, "lock_acquire", lost_then_hangs)
    monkeypatch.setattr(queue.broker, "lock_release", hangs)
    started = anyio.current_time()
    with anyio.fail_after(5), pytest.raises(LockTimeout, match="no answer from the broker"):
        async with queue.lock("hung", timeout=0.5):
            pass
    # Its request gets ATTEMPT_WITHIN (1 s), and the releases of what both may have taken as much.
    assert anyio.current_time() - started < 2.5


async def test_a_wait_for_a_release_that_hangs_ends_at_the_timeout(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The subscribe and the read of the lock's ttl before the wait went unbounded: a Redis that
    # stopped answering held a waiter with timeout=1 for 10 s (two socket timeouts).
    async def hangs(queue_name: str, name: str, timeout: float | None) -> None:
        await anyio.sleep_forever()

    async with queue.lock("hung", ttl=30):
        monkeypatch.setattr(queue.broker, "lock_wait", hangs)
        with anyio.fail_after(5), pytest.raises(LockTimeout, match=r"not acquired within 0\.5s"):
            async with queue.lock("hung", timeout=0.5):
                pass


@pytest.mark.parametrize("blips", [1, 2])
async def test_what_a_request_lost_to_an_outage_took_is_released_once_the_broker_answers(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, blips: int
) -> None:
    # A request took the lock, its answer lost with the connection, and the release sent then was
    # lost too: the lock stayed held by that request, and its own waiter waited out the whole ttl.
    # With a second blip as it released it once the broker answered, it waited for a release.
    broker = queue.broker
    taking, releasing = broker.lock_acquire, broker.lock_release
    away = True
    requests = releases_lost = 0

    async def outage_then_back(queue_name: str, name: str, token: str, ttl: float) -> bool:
        nonlocal away, requests
        requests += 1
        if requests == 1:
            await taking(queue_name, name, token, ttl)  # it lands; its answer does not
        if requests <= 2:
            raise BrokerConnectionError("Connection closed by server.")
        away = False
        return await taking(queue_name, name, token, ttl)

    async def release(queue_name: str, name: str, token: str) -> bool:
        nonlocal releases_lost
        if away or releases_lost < blips - 1:
            releases_lost += not away
            raise BrokerConnectionError("Connection refused")
        return await releasing(queue_name, name, token)

    monkeypatch.setattr(broker, "lock_acquire", outage_then_back)
    monkeypatch.setattr(broker, "lock_release", release)
    with anyio.fail_after(5):  # not the ttl
        async with queue.lock("blip", ttl=30, timeout=20):
            pass
    # The third found it held by the first (and, with a second blip, so did the fourth), released
    # it, and the next took it.
    assert requests == 3 + blips
    async with queue.lock("blip", timeout=0):  # and it was released
        pass


@pytest.mark.parametrize("how", ["asyncio_cancel", "lost_answer"])
async def test_a_request_whose_answer_never_comes_leaves_the_lock_free(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The lock was taken in the broker, but its taker never heard so: cancelled by asyncio itself
    # (`wait_for`, `asyncio.timeout`: the shield stops only anyio's cancellations), or the answer
    # lost to a timeout. The lock stayed held by no one until its ttl ran out.
    broker = queue.broker
    taking = broker.lock_acquire

    tokens: list[str] = []

    async def answer_lost(queue_name: str, name: str, token: str, ttl: float) -> bool:
        tokens.append(token)
        await taking(queue_name, name, token, ttl)  # the first takes it
        if how == "lost_answer":
            raise BrokerConnectionError("Timeout reading from the server")
        await anyio.sleep_forever()
        raise AssertionError("not reached")

    monkeypatch.setattr(broker, "lock_acquire", answer_lost)
    # A lost answer is a lost connection, which the request rides through until the caller's
    # cancel; what its tries may have taken is released then.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.lock("contended", ttl=30).__aenter__(), 0.1)
    if how == "lost_answer":  # each try with a token of its own
        assert len(tokens) > 1
        assert len(set(tokens)) == len(tokens)
    monkeypatch.setattr(broker, "lock_acquire", taking)
    async with queue.lock("contended", timeout=0):  # free at once, not after 30 s
        pass


@pytest.mark.parametrize(
    ("ours", "lost_asks", "close_in"),
    [(True, 1, "release"), (False, 1, "release"), (True, 2, "release"), (True, 1, "answered request"),
     (True, 0, "answered request")],
    ids=["held_by_a_lost_request", "held_by_another", "two_lost_requests", "closed_while_asking",
         "taken_as_closed"],
)
async def test_a_close_during_the_release_of_lost_requests_ends_the_waiter(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, ours: bool, lost_asks: int, close_in: str
) -> None:
    # A close that landed while the waiter released what its lost requests may have taken ended it
    # only when none of them held the lock; when one did, the waiter asked again at once, on a
    # broker the request opened again behind the close. And a release was still sent after a close:
    # the next of two, or the first when the close came as the broker answered a request; a request
    # that took the lock as the queue closed entered the body, its release sent after the close.
    broker = queue.broker
    taking, releasing = broker.lock_acquire, broker.lock_release
    if not ours:
        assert await taking(queue.name, "contended", "another holder", 30.0)
    asks = releases = 0

    async def answers_lost(queue_name: str, name: str, token: str, ttl: float) -> bool:
        nonlocal asks
        asks += 1
        taken = await taking(queue_name, name, token, ttl)
        if asks <= lost_asks:
            raise BrokerConnectionError("Timeout reading from the server")
        if close_in == "answered request":
            await queue.close()
        return taken

    async def release_then_close(queue_name: str, name: str, token: str) -> bool:
        nonlocal releases
        releases += 1
        released = await releasing(queue_name, name, token)
        if close_in == "release":
            await queue.close()
        return released

    monkeypatch.setattr(broker, "lock_acquire", answers_lost)
    monkeypatch.setattr(broker, "lock_release", release_then_close)
    with anyio.fail_after(5), pytest.raises(BrokerError, match="closed while waiting for lock 'contended'"):
        async with queue.lock("contended", timeout=3):
            pytest.fail("the lock was taken")
    assert asks == lost_asks + 1  # none asked after the close
    assert releases == (1 if close_in == "release" else 0)  # nor released


async def test_a_release_failing_after_a_lost_answer_leaves_the_first_error_standing(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def answer_lost(queue_name: str, name: str, token: str, ttl: float) -> bool:
        raise BrokerConnectionError("Timeout reading from the server")

    async def release_breaks(queue_name: str, name: str, token: str) -> bool:
        raise RuntimeError("a broker of the user's that fails its own way")

    monkeypatch.setattr(queue.broker, "lock_acquire", answer_lost)
    monkeypatch.setattr(queue.broker, "lock_release", release_breaks)
    monkeypatch.setattr(outage, "RIDE_THROUGH", 0.2)  # how long it rides through lost answers
    with pytest.raises(BrokerConnectionError):
        async with queue.lock("contended"):
            pass


@pytest.mark.parametrize("failure", [BrokerConnectionError, RuntimeError])
async def test_a_failed_release_does_not_replace_how_the_body_ended(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    failure: type[Exception],
) -> None:
    # RuntimeError: a broker of the user's failing its own way replaced the body's error.
    async def unreachable(queue_name: str, name: str, token: str) -> bool:
        raise failure("connection refused")

    monkeypatch.setattr(queue.broker, "lock_release", unreachable)
    with pytest.raises(ValueError, match="the body's own"):
        async with queue.lock("flaky"):
            raise ValueError("the body's own")
    async with queue.lock("other"):
        pass  # its work done: a release that failed does not fail it
    releases = [r.getMessage() for r in caplog.records if "releasing lock" in r.getMessage()]
    assert len(releases) == 2
    assert "frees itself within 30.0s: connection refused" in releases[0]


async def test_two_rate_limits_on_one_key_count_apart(queue: Queue) -> None:
    # With windows of different lengths, the memory broker's count of one was reset by every hit
    # of the other: neither limited anything (Redis counts each window apart).
    narrow = queue.rate_limit("api", limit=2, per=3600)
    wide = queue.rate_limit("api", limit=100, per=7200)
    admitted = 0
    for _ in range(5):
        with contextlib.suppress(RateLimitExceeded):
            async with wide, narrow:
                admitted += 1
    assert admitted == 2


async def test_two_rate_limits_on_one_key_whose_windows_have_one_number_count_apart(queue: Queue) -> None:
    # Windows of 10,000,000,000 s and a second more both have the number 0 (until the year 2286):
    # Redis counted both limits under one key, and the second was refused at its first hit.
    first = queue.rate_limit("api", limit=1, per=1e10)
    second = queue.rate_limit("api", limit=1, per=1e10 + 1)
    async with first, second:
        pass
    with pytest.raises(RateLimitExceeded):
        async with second:
            pass


async def test_the_memory_brokers_rate_counts_go_with_their_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    # A count per key and window length: one per user's key grew the dict for ever, where Redis
    # expires each count's key.
    from aqueue.brokers import _memory

    now = time.time()  # the broker's clock stands still: no window may end between the hits
    monkeypatch.setattr(_memory, "time", SimpleNamespace(time=lambda: now, monotonic=time.monotonic))
    broker = MemoryBroker()
    queue = Queue(broker=broker)
    for user in range(3):
        async with queue.rate_limit(f"user:{user}", limit=5, per=60):
            pass
    counts = broker._queues[queue.name].rates
    await broker.prune(queue.name, now, 100)
    assert len(counts) == 3  # their windows run still
    await broker.prune(queue.name, now + 120, 100)
    assert counts == {}


async def test_lock_decorator_with_a_timeout_waits_that_long_for_the_lock(queue: Queue) -> None:
    # A holder that died keeps the lock for its last second of ttl: the job waits it out and runs
    # at its first attempt, where without its timeout it would fail at once (no retries).
    @queue.task(retries=0)
    @queue.lock("report", timeout=30)
    async def report() -> int:
        return current_job().attempt

    job = await report.enqueue()
    assert await queue.broker.lock_acquire(queue.name, "report", "dead-holder", 1.0)
    async with queue.worker():
        assert await job.result(timeout=10) == 1
    assert await queue.broker.lock_release(queue.name, "report", "dead-holder") is False


@pytest.mark.parametrize(("make", "message"), [
    (lambda q: q.lock("l", timeout="5"), "lock timeout"),
    (lambda q: q.lock("l", timeout=True), "lock timeout"),
    (lambda q: q.lock("l", timeout=math.nan), "lock timeout"),
    (lambda q: q.lock("l", timeout=math.inf), "lock timeout"),
    (lambda q: q.lock("l", timeout=-1), "lock timeout"),
    (lambda q: q.lock("l", ttl=math.inf), "lock ttl"),
    (lambda q: q.lock("l", ttl=0), "lock ttl"),
    (lambda q: q.rate_limit("r", limit=10, per=math.inf), "rate limit per"),
    (lambda q: q.rate_limit("r", limit=10, per=0), "rate limit per"),
    # Past what Redis keeps as an expiry: refused by Redis at every use, after the rate limit's
    # count was written (with no expiry).
    (lambda q: q.lock("l", ttl=1e17), "lock ttl must be at most 1e"),
    (lambda q: q.rate_limit("r", limit=10, per=1e17), "rate limit per must be at most 1e"),
    (lambda q: q.rate_limit("r", limit=1.5, per=1), "limit"),
    (lambda q: q.rate_limit("r", limit=True, per=1), "limit"),
    (lambda q: q.rate_limit("r", limit=0, per=1), "limit"),
    # 5 and "5" were one lock (or key) on Redis and two on memory; 0 was "a lock needs a name".
    (lambda q: q.lock(5), "a lock's name is a non-empty string that UTF-8 can write, got 5"),
    (lambda q: q.lock(0), "a lock's name is a non-empty string that UTF-8 can write, got 0"),
    (lambda q: q.lock(""), "a lock's name is a non-empty string that UTF-8 can write, got ''"),
    (lambda q: q.rate_limit(7, limit=1, per=1), "a rate limit's key is a non-empty string .* got 7"),
    (lambda q: q.rate_limit("", limit=1, per=1), "a rate limit's key is a non-empty string .* got ''"),
    # A path decoded with surrogateescape, say: taken in memory, a UnicodeEncodeError on Redis.
    (lambda q: q.lock("\udcff"), "a lock's name is a non-empty string that UTF-8 can write"),
    (lambda q: q.rate_limit("\udcff", limit=1, per=1), "a rate limit's key is a non-empty string"),
    # Bounded as payloads are: a 20 MiB key was stored, several times over.
    (lambda q: q.lock("é" * 513), r"a lock's name is at most 1024 bytes in UTF-8, got 1026 \(hash"),
    (lambda q: q.rate_limit("k" * 1025, limit=1, per=1), "a rate limit's key is at most 1024 bytes"),
    (lambda q: q.tasks["add"].options(key="k" * 1025), "an idempotency key is at most 1024 bytes"),
    (lambda q: q.task(name="t" * 1025)(len), "a task's name is at most 1024 bytes"),
    (lambda q: q.job("j" * 1025), "a job id is at most 1024 bytes"),
])
def test_lock_and_rate_limit_refuse_what_they_cannot_keep(
    queue: Queue, make: Callable[[Queue], object], message: str
) -> None:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(ConfigurationError, match=message):
        make(queue)


async def test_the_longest_lock_ttl_and_rate_limit_window_work(queue: Queue) -> None:
    async with queue.lock("long", ttl=1e15), queue.rate_limit("long", limit=1, per=1e15):
        pass
    async with queue.lock("é" * 512), queue.rate_limit("k" * 1024, limit=1, per=60):  # the longest names
        pass
    with pytest.raises(RateLimitExceeded):
        async with queue.rate_limit("long", limit=1, per=1e15):
            pass


async def test_result_refuses_a_timeout_that_is_not_a_duration(queue: Queue) -> None:
    for bad in ("2", True, math.nan):
        with pytest.raises(ConfigurationError, match="timeout"):
            await queue.job("any").result(timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("per", [4.03, 16.1, 0.5, 60])
async def test_rate_limit_windows_are_aligned_to_the_epoch(queue: Queue, per: float) -> None:
    # Windows were ceil(per * 1000) ms long on Redis: 16.1 s is 16100.000000000002 ms, counted as
    # 16,101, a grid that drifted from the epoch's, and a refused use waited for another window's end.
    async def clock() -> float:  # the one the broker counts by
        if isinstance(queue.broker, RedisBroker):
            seconds, micros = await queue.broker.client.time()
            return float(seconds + micros / 1e6)
        return time.time()

    for attempt in range(3):  # a window's edge may fall between the two reads of the clock
        limit = queue.rate_limit(f"api-{attempt}", limit=1, per=per)
        before = await clock()
        async with limit:
            pass
        try:
            async with limit:
                pass
        except RateLimitExceeded as exc:
            retry_after = exc.retry_after
        else:
            continue  # the second use fell in the next window
        after = await clock()
        window = math.floor(before / per)
        if math.floor(after / per) == window:
            break
    else:
        pytest.fail("a window's edge fell between the reads of the clock three times")
    edge = (window + 1) * per  # of the window both uses fell in (the broker counts whole ms)
    assert edge - after - 0.002 <= retry_after <= edge - before + 0.002


async def test_rate_limit_context_manager(queue: Queue) -> None:
    limit = queue.rate_limit("api", limit=3, per=timedelta(hours=1))
    for _ in range(3):
        async with limit:
            pass
    with pytest.raises(RateLimitExceeded) as caught:
        async with limit:
            pass
    assert 0 < caught.value.retry_after <= 3600


async def test_rate_limited_jobs_wait_for_the_next_window(queue: Queue) -> None:
    seen = recorder(queue, Signal.RATE_LIMITED)
    runs: list[tuple[float, int]] = []

    @queue.task
    @queue.rate_limit("sends", limit=2, per=1)
    async def send(n: int) -> int:
        runs.append((time.time(), current_job().attempt))
        return n

    async with queue.worker():
        group = await send.map(range(5))
        assert await group.get(timeout=20) == [0, 1, 2, 3, 4]
    windows = [math.floor(t) for t, _ in runs]
    assert max(windows.count(w) for w in windows) <= 2
    assert all(attempt == 1 for _, attempt in runs)  # rescheduled without using a retry
    assert seen


async def test_rate_limit_without_retry_waits_for_the_window_to_use_a_retry(queue: Queue) -> None:
    seen = recorder(queue, Signal.RATE_LIMITED, Signal.RETRYING)
    per = 10**6  # windows of 11 days, aligned to the epoch: this test stays within one
    next_window = (math.floor(time.time() / per) + 1) * per

    @queue.task(retries=2)
    @queue.rate_limit("strict-retry", limit=1, per=per, retry=False)
    async def once() -> int:
        return 1

    retrying = anyio.Event()
    queue.on(Signal.RETRYING)(lambda signal, job, exc=None: retrying.set())

    async with queue.worker(concurrency=1):
        assert await (await once.enqueue()).result(timeout=10) == 1
        job = await once.enqueue()
        with anyio.fail_after(10):
            await retrying.wait()
    # The worker has stopped: its outcomes are written.
    record = await queue.broker.get(queue.name, job.id)
    assert record is not None
    assert record.state == JobState.SCHEDULED
    assert record.eta is not None
    assert record.attempt == 2  # a retry of its own was used...
    assert record.eta >= next_window - 1  # ...not before the limit's next window
    assert seen == [(Signal.RATE_LIMITED, job.id), (Signal.RETRYING, job.id)]


async def test_rate_limit_without_retry_fails_by_policy(queue: Queue) -> None:
    @queue.task
    @queue.rate_limit("strict", limit=1, per=3600, retry=False)
    async def once() -> int:
        return 1

    async with queue.worker(concurrency=1):
        assert await (await once.enqueue()).result(timeout=10) == 1
        with pytest.raises(TaskError) as caught:
            await (await once.enqueue()).result(timeout=10)
    assert caught.value.metadata["type"] == "RateLimitExceeded"
