"""Regressions: what a careful review found breaking, on both brokers."""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import SimpleNamespace

import anyio
import pytest

from aqueue import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    JobState,
    Queue,
    RetryTask,
    Signal,
    TaskError,
    Worker,
    current_job,
)
from aqueue.brokers import Broker, Completion, Delivery, MemoryBroker, NewJob, RedisBroker


async def test_blocked_event_loop_does_not_run_a_job_twice(broker: Broker, queue_name: str) -> None:
    queue = Queue(broker=broker, name=queue_name, visibility_timeout=1)
    runs = 0

    @queue.task
    async def hog() -> int:
        nonlocal runs
        runs += 1
        time.sleep(1.6)  # blocks the whole event loop past the visibility timeout  # noqa: ASYNC251
        return runs

    @queue.task
    async def after() -> str:
        return "worker alive"

    async with queue.worker() as worker:
        job = await hog.enqueue()
        assert await job.result(timeout=20) == 1
        assert await (await after.enqueue()).result(timeout=10) == "worker alive"
    assert runs == 1
    assert worker.jobs_done == 2


async def test_unencodable_error_text_still_dead_letters(queue: Queue) -> None:
    @queue.task
    async def bad_bytes() -> None:
        raise ValueError("cannot parse " + b"\xff".decode("utf-8", "surrogateescape"))

    async with queue.worker():
        job = await bad_bytes.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
    assert "cannot parse" in caught.value.metadata["error"]
    assert [d.id for d in await queue.dead_letters()] == [job.id]


async def test_a_job_that_calls_sys_exit_fails_and_the_worker_and_its_other_jobs_go_on(queue: Queue) -> None:
    # SystemExit went through the worker's task groups: the worker ended, the job beside it was
    # cut off unrecorded, and every worker that took them over ended the same way.
    beside_started, exited = anyio.Event(), anyio.Event()
    handled: list[str] = []

    @queue.task
    async def beside() -> str:
        beside_started.set()
        await exited.wait()
        return "done"

    @queue.task
    def leave(code: int) -> None:  # argparse's parser.error() in a plain def, say
        sys.exit(code)

    @queue.task
    async def leave_async() -> None:
        raise SystemExit("bye")

    @queue.on(Signal.COMPLETE)
    def exits_too(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        handled.append(signal.value)
        sys.exit(3)  # logged as any failing handler is

    async with queue.worker():
        running = await beside.enqueue()
        with anyio.fail_after(10):
            await beside_started.wait()
        for job in (await leave.enqueue(2), await leave_async.enqueue()):
            with pytest.raises(TaskError) as caught:
                await job.result(timeout=10)
            assert caught.value.metadata["type"] == "SystemExit"
        exited.set()
        assert await running.result(timeout=10) == "done"
    assert handled == ["complete"]
    assert len(await queue.dead_letters()) == 2


class Abort(BaseException):
    """A library's own BaseException, as pytest's `Failed` or gevent's `Timeout` are."""


async def test_a_job_raising_any_base_exception_of_its_own_fails_alone(queue: Queue) -> None:
    # Anything but SystemExit and a cancellation went through the worker's task groups: the
    # worker ended, the job beside it was left running, and the job killed every worker again.
    # (A KeyboardInterrupt is let through: the second Ctrl-C, asyncio raises it in whatever runs;
    # but not one a job's thread raises, which is the job's own: signals reach the main thread.)
    beside_started, raised = anyio.Event(), anyio.Event()
    handled: list[str] = []

    @queue.task
    async def beside() -> str:
        beside_started.set()
        await raised.wait()
        return "done"

    @queue.task
    async def abort(kind: str) -> None:
        if kind == "group":
            raise BaseExceptionGroup("cleanup", [Abort("in a group"), ValueError("and more")])
        if kind == "generator exit":  # GeneratorExit too: none of this worker's closing
            raise GeneratorExit
        raise Abort(kind)

    @queue.task
    def abort_in_thread(kind: str) -> None:
        if kind == "generator exit":
            raise GeneratorExit
        if kind == "keyboard interrupt":
            raise KeyboardInterrupt
        raise Abort("in a thread")

    @queue.on(Signal.EXECUTING)
    def aborts_too(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        handled.append(signal.value)
        # Logged as any failing handler is.
        raise GeneratorExit if len(handled) % 2 else Abort("in a handler")

    async with queue.worker(concurrency=10):
        running = await beside.enqueue()
        with anyio.fail_after(10):
            await beside_started.wait()
        jobs = [await abort.enqueue("plain"), await abort.enqueue("group"),
                await abort.enqueue("generator exit"), await abort_in_thread.enqueue("abort"),
                await abort_in_thread.enqueue("generator exit"),
                await abort_in_thread.enqueue("keyboard interrupt")]
        kinds = ["Abort", "BaseExceptionGroup", "GeneratorExit", "Abort", "GeneratorExit",
                 "KeyboardInterrupt"]
        for job, kind in zip(jobs, kinds, strict=True):
            with pytest.raises(TaskError) as caught:
                await job.result(timeout=10)
            assert caught.value.metadata["type"] == kind
        raised.set()
        assert await running.result(timeout=10) == "done"
    assert len(handled) == 7
    assert len(await queue.dead_letters()) == 6


async def test_worker_block_error_still_stops_gracefully(queue: Queue) -> None:
    started = anyio.Event()

    @queue.task
    async def long_job() -> None:
        started.set()
        await anyio.sleep(60)

    async def run_and_fail() -> None:
        async with queue.worker(shutdown_timeout=0.1):
            with anyio.fail_after(10):
                await started.wait()
            raise RuntimeError("the body failed")

    job = await long_job.enqueue()
    with pytest.raises(RuntimeError, match="the body failed"):  # unwrapped, not an ExceptionGroup
        await run_and_fail()
    assert await job.state() == JobState.PENDING  # handed back, not left running


@pytest.mark.parametrize(("options", "message"), [
    ({"max_payload_size": "10"}, "max_payload_size must be a whole number"),
    ({"max_payload_size": True}, "max_payload_size must be a whole number"),
    ({"max_deliveries": 2.5}, "max_deliveries must be a whole number"),
    ({"max_deliveries": 0}, "max_deliveries must be a whole number"),
    ({"result_ttl": float("nan")}, "result_ttl must be >= 0"),
    ({"result_ttl": float("inf")}, "result_ttl must be at least 1 second, and finite"),
    ({"result_ttl": "abc"}, "result_ttl must be seconds or a timedelta"),
    ({"visibility_timeout": float("inf")}, "visibility_timeout must be at least 1 second"),
    # Redis refuses an expiry past 2**63 ms: the finish that stores the outcome failed, and the
    # job ran again and again.
    ({"result_ttl": 1e16}, r"result_ttl must be at most 1e\+15 seconds"),
    # Taken in memory, a UnicodeEncodeError at the first enqueue on Redis.
    ({"name": "\udcff"}, "a queue's name is a non-empty string that UTF-8 can write"),
    ({"name": ""}, "a queue's name is a non-empty string that UTF-8 can write"),
    ({"name": 5}, "a queue's name is a non-empty string that UTF-8 can write, got 5"),
    ({"name": "a{b}"}, "queue name 'a{b}' must be without braces"),
    ({"visibility_timeout": 1e16}, r"visibility_timeout must be at most 1e\+15 seconds"),
    ({"default_timeout": "x"}, "default_timeout must be seconds or a timedelta"),
    ({"default_timeout": -5}, "default_timeout must be >= 0"),
    ({"default_timeout": 0}, "default_timeout must be > 0"),
    ({"default_timeout": float("inf")}, "default_timeout must be > 0 and finite"),
    ({"immediate": "no"}, "immediate must be True or False, got 'no'"),
])
def test_bad_queue_options_fail_when_the_queue_is_made(options: dict[str, object], message: str) -> None:
    # Each was accepted before and failed later, or never: a TypeError at enqueue, nan as a ttl.
    with pytest.raises(ConfigurationError, match=message):
        Queue("memory://", **options)  # type: ignore[arg-type]


def test_a_generator_function_is_refused_as_a_task(queue: Queue) -> None:
    # Taken before: an async generator ran in a thread and every job failed in the worker, as
    # did a plain generator's, its value a generator that JSON cannot store.
    async def agen() -> AsyncIterator[int]:
        yield 1

    def gen() -> Iterator[int]:
        yield 1

    for fn in (agen, gen):
        with pytest.raises(ConfigurationError, match="is a generator function"):
            queue.task(fn)
    assert not queue.tasks


def test_a_task_is_refused_as_the_function_of_another(queue: Queue) -> None:
    # Taken before: the outer task was a plain one, its jobs running the inner task's direct
    # call in a worker thread, under a second name.
    @queue.task
    async def inner() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="decorates a function, not the task 'inner'"):
        queue.task(name="outer")(inner)
    assert list(queue.tasks) == ["inner"]


def test_bad_options_fail_at_once(queue: Queue) -> None:
    @queue.task
    async def work() -> None:
        return None

    with pytest.raises(ConfigurationError, match="priority"):
        work.options(priority=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="priority"):
        queue.task(priority="high")(work.fn)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="timeout"):
        work.options(timeout=0)
    with pytest.raises(ConfigurationError, match="timeout must be > 0"):  # was read as no timeout
        queue.task(timeout=0)(work.fn)
    # Infinity was taken: the deadline it made failed every job, or the enqueue blamed the arguments.
    with pytest.raises(ConfigurationError, match="timeout must be > 0 and finite"):
        work.options(timeout=math.inf)
    with pytest.raises(ConfigurationError, match="timeout must be > 0 and finite"):
        queue.task(timeout=math.inf)(work.fn)
    with pytest.raises(ConfigurationError, match="key"):
        work.options(key="")
    # Each of these was taken, then failed at every enqueue, or meant what nobody wrote.
    with pytest.raises(ConfigurationError, match="key is a non-empty string that UTF-8 can write, got 0"):
        work.options(key=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="key is a non-empty string that UTF-8 can write"):
        work.options(key="\udcff")  # a UnicodeEncodeError at enqueue on Redis, taken in memory
    with pytest.raises(ConfigurationError, match="eta must be a datetime"):  # 57 years ahead
        work.options(eta=time.time() + 60)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="delay must be seconds"):
        work.options(delay="5")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="expires must be seconds, a timedelta or a datetime"):
        work.options(expires="tomorrow")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="expires must be seconds, a timedelta or a datetime"):
        queue.task(expires="tomorrow")(work.fn)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="retries must be a whole number"):
        work.options(retries=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="retries must be a whole number"):
        queue.task(retries=True)(work.fn)  # type: ignore[call-overload]
    # Taken, then blamed on the task's arguments at enqueue: past what the payload's JSON holds.
    with pytest.raises(ConfigurationError, match="retries must be at most 1,000,000,000, got 18446744"):
        work.options(retries=2**64)
    with pytest.raises(ConfigurationError, match="retries must be at most 1,000,000,000"):
        queue.task(retries=10**9 + 1)(work.fn)
    work.options(retries=10**9)  # the most it takes
    for never in (math.inf, 1e300, 10**400):  # stored, they never ran (10**400: OverflowError)
        with pytest.raises(ConfigurationError, match="delay must be at most 1e\\+15 seconds"):
            work.options(delay=never)
    # NaN passed `< 1` and fired every retry at once; a string raised a bare TypeError.
    for backoff in (math.nan, math.inf, True, "2"):
        with pytest.raises(ConfigurationError, match="retry_backoff must be a finite number >= 1"):
            queue.task(retry_backoff=backoff)(work.fn)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="retry_delay must be a finite number"):
        queue.task(retry_delay=math.inf)(work.fn)  # type: ignore[call-overload]
    # Checked where it is raised, not in the worker as an internal error.
    for delay in ("10", -1, math.nan, math.inf, True):
        with pytest.raises(ConfigurationError, match="RetryTask's delay must be finite seconds"):
            RetryTask(delay=delay)  # type: ignore[arg-type]


async def test_bad_arguments_of_calls_fail_at_once(queue: Queue) -> None:
    @queue.task
    async def work() -> None:
        return None

    with pytest.raises(ConfigurationError, match="eta must be a datetime"):
        await work.schedule(eta=60)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unknown job state 'bogus'"):
        await queue.jobs(state="bogus")
    # Matched nothing, without a word; the task itself is taken for its name.
    with pytest.raises(ConfigurationError, match="task is a task or its name, got 5"):
        await queue.jobs(task=5)  # type: ignore[arg-type]
    job = await work.enqueue()
    assert [info.id for info in await queue.jobs(task=work)] == [job.id]
    assert [info.id for info in await queue.jobs(task="work")] == [job.id]
    # Each raised a bare TypeError, or on Redis a BrokerError that blamed Redis.
    for limit in (1.5, None, "3", math.inf, True, -1):
        with pytest.raises(ConfigurationError, match="limit must be a whole number >= 0"):
            await queue.jobs(limit=limit)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="limit must be a whole number >= 0"):
            await queue.dead_letters(limit=limit)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="a job id is a string, got None"):
        queue.job(None)  # type: ignore[arg-type]
    for job_id in ("", "x" * 1025):  # both answered False, as for a job that is no dead letter
        with pytest.raises(ConfigurationError, match="a job id is "):
            await queue.retry(job_id)
    with pytest.raises(ConfigurationError, match="concurrency must be a whole number"):
        async with queue.worker(concurrency=1.5):  # type: ignore[arg-type]
            pass
    assert [info.id for info in await queue.jobs()] == [job.id]


def test_default_task_name_is_the_function_name(queue: Queue) -> None:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    assert add.name == "add"
    with pytest.raises(ConfigurationError, match="a task's name is a non-empty string"):
        queue.task(name="")(add.fn)  # it was taken as no name: the function's
    with pytest.raises(ConfigurationError, match="already registered"):
        @queue.task
        async def add(a: int, b: int) -> int:  # a second task of the same name
            return a - b


async def test_a_worker_bounds_the_payloads_it_reads(broker: Broker, queue_name: str) -> None:
    # A producer with a larger bound (or none of aqueue's) wrote it: the worker's own bound holds.
    producer = Queue(broker=broker, name=queue_name, max_payload_size=1 << 20)
    worker_side = Queue(broker=broker, name=queue_name, max_payload_size=2_000)
    ran: list[int] = []
    for q in (producer, worker_side):
        @q.task(name="store")
        async def store(blob: str) -> int:
            ran.append(len(blob))
            return len(blob)

    big = await producer.tasks["store"].enqueue("x" * 5_000)
    small = await producer.tasks["store"].enqueue("x" * 10)
    async with worker_side.worker():
        assert await small.result(timeout=10) == 10
        with pytest.raises(TaskError, match="over this worker's max_payload_size") as caught:
            await big.result(timeout=10)
        assert caught.value.metadata["type"] == "PayloadTooLarge"
    assert ran == [10]
    assert [d.id for d in await worker_side.dead_letters()] == [big.id]


async def test_started_job_is_not_expired_on_redelivery(queue: Queue) -> None:
    @queue.task
    async def work() -> str:
        return "ran"

    job_id = "started-then-orphaned"
    await queue.broker.enqueue(queue.name, [NewJob(
        id=job_id, task="work", payload=b'{"args":[],"kwargs":{}}', expires=time.time() + 0.3,
        enqueued_at=time.time())])
    assert await queue.broker.receive(queue.name, "dead-worker", 1, 0, 10)  # started in time
    await anyio.sleep(0.4)  # lets its `expires` pass while it is running elsewhere
    async with queue.worker():
        assert await queue.job(job_id).result(timeout=15) == "ran"


async def test_many_waiters_and_busy_jobs_share_connections(queue: Queue) -> None:
    from aqueue import current_job

    @queue.task
    async def step(n: int) -> int:
        await current_job().set_progress(1, 1)
        return n

    async with queue.worker(concurrency=100):
        group = await step.map(range(300))
        seen = [v async for v in group.as_completed(timeout=60)]
    assert sorted(seen) == list(range(300))


async def test_a_client_that_cannot_serve_is_refused_as_the_broker_is_made(redis_url: str) -> None:
    # Refused at once, with what to do: at the first enqueue, a sync client failed with a bare
    # TypeError (a bool cannot be awaited), and a decoding client with a BrokerError.
    import redis
    import redis.asyncio as aioredis

    from aqueue import ConfigurationError
    from aqueue.brokers import RedisBroker

    decoding = aioredis.Redis.from_url(redis_url, decode_responses=True)
    sync_client = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ConfigurationError, match="decode_responses=False"):
            RedisBroker(client=decoding)
        sync_refused = r"takes a redis\.asyncio\.Redis client, got redis\.client\.Redis"
        with pytest.raises(ConfigurationError, match=sync_refused):
            RedisBroker(client=sync_client)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="decode_responses=False"):
            RedisBroker(redis_url, decode_responses=True)
        with pytest.raises(ConfigurationError, match="'decode_responses' is not a connection option"):
            RedisBroker(redis_url + "?decode_responses=True")
    finally:
        await decoding.aclose()
        sync_client.close()


async def test_lapsed_lease_found_behind_many_live_ones(broker: Broker, queue_name: str) -> None:
    payload = b'{"args":[],"kwargs":{}}'
    await broker.enqueue(queue_name, [NewJob(id=f"j{i:03}", task="t", payload=payload,
                                             enqueued_at=time.time()) for i in range(41)])
    live = await broker.receive(queue_name, "live", 40, 0, 10)
    dead = await broker.receive(queue_name, "dead", 1, 0, 10)
    assert len(live) == 40
    assert [d.job_id for d in dead] == ["j040"]
    await anyio.sleep(0.35)  # lets every lease age past the idle threshold below
    assert await broker.renew(queue_name, "live", live) == []
    taken = await broker.reclaim(queue_name, "rescuer", 1, 0.3, 10)
    assert [d.job_id for d in taken] == ["j040"]


async def _blocked_clients(broker: Broker) -> int:
    if not isinstance(broker, RedisBroker):
        return 0
    return int((await broker.client.info("clients"))["blocked_clients"])


async def test_blocking_receive_never_returns_more_than_count(broker: Broker, queue_name: str) -> None:
    payload = b'{"args":[],"kwargs":{}}'
    got: list[list[str]] = []

    async def receiver() -> None:
        got.append([d.job_id for d in await broker.receive(queue_name, "w", 1, 5, 10)])

    await broker.enqueue(queue_name, [NewJob(id="seed", task="t", payload=payload, priority=7,
                                             enqueued_at=time.time())])
    assert await broker.receive(queue_name, "w0", 1, 0, 10)  # band 7 exists now, and is empty
    blocked_before = await _blocked_clients(broker)
    async with anyio.create_task_group() as tg:
        tg.start_soon(receiver)
        # The jobs arrive while the receiver is blocked, so the blocking read is what returns them.
        with anyio.fail_after(10):
            if isinstance(broker, RedisBroker):
                while await _blocked_clients(broker) == blocked_before:  # noqa: ASYNC110 - in Redis
                    await anyio.sleep(0.005)
            else:
                await anyio.wait_all_tasks_blocked()
        await broker.enqueue(queue_name, [
            NewJob(id=f"b{p}", task="t", payload=payload, priority=p, enqueued_at=time.time())
            for p in (0, 7)
        ])
    assert len(got[0]) == 1
    rest = await broker.receive(queue_name, "w2", 10, 0, 10)
    assert sorted([*got[0], *(d.job_id for d in rest)]) == ["b0", "b7"]  # nothing lost


async def test_immediate_mode_runs_only_its_own_jobs(broker: Broker, queue_name: str) -> None:
    producer = Queue(broker=broker, name=queue_name)
    immediate = Queue(broker=broker, name=queue_name, immediate=True)

    @producer.task(name="report")
    async def report() -> None:
        return None

    @immediate.task(name="ping")
    async def ping() -> str:
        return "pong"

    other = await report.enqueue()
    own = await ping.enqueue()
    assert await own.result(timeout=0) == "pong"
    assert await producer.job(other.id).state() == JobState.PENDING  # left for a real worker


def test_a_broker_closed_in_one_event_loop_works_in_the_next(
    backend: str, request: pytest.FixtureRequest, queue_name: str
) -> None:
    # A module-level queue in an app's tests, each test on an event loop of its own, closed at the
    # end of each: what one loop leaves behind (a receive and a lock wait that timed out, a lock
    # still held, a job waiting) must not break the next.
    broker: Broker = (MemoryBroker() if backend == "memory"
                      else RedisBroker(request.getfixturevalue("redis_url")))
    payload = b'{"args":[],"kwargs":{}}'

    async def first() -> None:
        await broker.connect()
        assert await broker.receive(queue_name, "w", 10, 0.05, 10) == []
        assert await broker.lock_acquire(queue_name, "held", "holder", 30)
        await broker.lock_wait(queue_name, "held", 0.05)
        await broker.close()

    async def second() -> None:
        await broker.connect()
        assert await broker.receive(queue_name, "w", 10, 0.05, 10) == []
        await broker.lock_wait(queue_name, "held", 0.05)
        assert await broker.lock_release(queue_name, "held", "holder")
        await broker.enqueue(queue_name, [NewJob(id="j", task="t", payload=payload, enqueued_at=time.time())])
        assert [d.job_id for d in await broker.receive(queue_name, "w", 10, 1, 10)] == ["j"]
        await broker.close()

    anyio.run(first)
    anyio.run(second)


# Closing a Redis queue from the new loop lets the old loop's connections go unclosed (their
# transports belong to that loop), and Python warns of each when it is collected (README).
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_queue_left_open_in_an_ended_event_loop(
    backend: str, request: pytest.FixtureRequest, queue_name: str
) -> None:
    # The same queue, not closed before its loop ended. In memory nothing belongs to the loop.
    # Redis connections do: a clear error says what to do, and closing the queue lets it
    # connect again in the new loop.
    queue = Queue("memory://" if backend == "memory" else request.getfixturevalue("redis_url"),
                  name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async def first() -> None:
        async with queue.worker():
            assert await (await add.enqueue(1, 2)).result(timeout=10) == 3

    async def second() -> None:
        if backend == "redis":
            with pytest.raises(BrokerError, match="connected in another event loop"):
                await add.enqueue(2, 3)
            await queue.close()
        async with queue.worker():
            assert await (await add.enqueue(2, 3)).result(timeout=10) == 5
        await queue.close()

    anyio.run(first)
    anyio.run(second)
    gc.collect()  # what was let go of is collected here, while its warnings are ignored


class _HeldReclaim:
    """The worker's next reclaim takes its own leased jobs (as when they lapsed while its event loop
    was blocked), and its reply is held back until `answer` is set: an outcome of those jobs is
    written meanwhile, under the delivery the job ran as; `first_write` tells how it went."""

    def __init__(self, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.claimed = anyio.Event()
        self.answer = anyio.Event()
        self.answered = anyio.Event()
        self.written = anyio.Event()
        self.first_write: list[bool] = []
        real_reclaim, real_finish = broker.reclaim, broker.finish

        async def reclaim(queue: str, consumer: str, count: int, idle: float,
                          max_deliveries: int) -> list[Delivery]:
            if not self.armed:
                return await real_reclaim(queue, consumer, count, idle, max_deliveries)
            self.armed = False
            taken = await real_reclaim(queue, consumer, count, 0, max_deliveries)
            self.claimed.set()
            await self.answer.wait()
            self.answered.set()  # the worker takes the reply in before it next waits
            return taken

        async def finish(queue: str, completions: Sequence[Completion], ttl: float) -> list[bool]:
            applied = await real_finish(queue, completions, ttl)
            if not self.written.is_set():
                self.first_write = applied
                self.written.set()
            return applied

        monkeypatch.setattr(broker, "reclaim", reclaim)
        monkeypatch.setattr(broker, "finish", finish)


class _RetryReadyBeforeItsReply:
    """The first finish is applied, and its reply held back until the worker has received the
    job's next attempt (ready at once, with no retry delay): a worker busy elsewhere reads replies
    late. With `lose_reply`, the reply is then lost on the way (BrokerConnectionError), so the
    worker writes the same outcome again."""

    def __init__(self, broker: Broker, monkeypatch: pytest.MonkeyPatch, lose_reply: bool) -> None:
        self.next_attempt_received = anyio.Event()
        self.held = False
        real_receive, real_finish = broker.receive, broker.finish

        async def receive(queue: str, consumer: str, count: int, timeout: float,
                          max_deliveries: int) -> list[Delivery]:
            taken = await real_receive(queue, consumer, count, timeout, max_deliveries)
            if any(d.attempt == 2 for d in taken):
                self.next_attempt_received.set()
            return taken

        async def finish(queue: str, completions: Sequence[Completion], ttl: float) -> list[bool]:
            applied = await real_finish(queue, completions, ttl)
            if not self.held:
                self.held = True
                with anyio.fail_after(10):
                    await self.next_attempt_received.wait()
                if lose_reply:
                    raise BrokerConnectionError("reply lost")
            return applied

        monkeypatch.setattr(broker, "receive", receive)
        monkeypatch.setattr(broker, "finish", finish)


@pytest.mark.parametrize("lose_reply", [False, True], ids=["late-reply", "lost-reply"])
async def test_a_retry_received_before_the_reply_to_its_outcome_runs_as_the_next_attempt(
    broker: Broker, queue_name: str, monkeypatch: pytest.MonkeyPatch, lose_reply: bool
) -> None:
    # The worker took the new attempt for its own job come back, its outcome still to be written:
    # the attempt never ran and, no longer leased, waited for the visibility timeout (then went
    # round as "taken over from a silent worker"); with the reply lost, the retry written again
    # under the new delivery skipped an attempt.
    queue = Queue(broker=broker, name=queue_name, visibility_timeout=60)
    _RetryReadyBeforeItsReply(broker, monkeypatch, lose_reply)
    attempts: list[int] = []

    @queue.task(retries=2)
    async def flaky() -> int:
        attempts.append(current_job().attempt)
        if current_job().attempt == 1:
            raise ValueError("not yet")
        return current_job().attempt

    async with queue.worker():
        job = await flaky.enqueue()
        assert await job.result(timeout=10) == 2
    assert attempts == [1, 2]
    info = await job.info()
    assert info is not None
    assert info.attempt == 2


def lose_a_receive_answer(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
    before: Callable[[], Awaitable[None]] | None = None,
) -> anyio.Event:
    """The first receive that leases jobs loses its answer on the way: the broker acted, the worker
    hears BrokerConnectionError (after `before` ran). The event returned is set when it happened."""
    real_receive = broker.receive
    lost = anyio.Event()

    async def receive(queue: str, consumer: str, count: int, timeout: float,
                      max_deliveries: int) -> list[Delivery]:
        taken = await real_receive(queue, consumer, count, timeout, max_deliveries)
        if taken and not lost.is_set():
            if before is not None:
                await before()
            lost.set()
            raise BrokerConnectionError("answer lost")
        return taken

    monkeypatch.setattr(broker, "receive", receive)
    return lost


async def test_jobs_leased_by_a_receive_whose_answer_was_lost_run_at_once(
    broker: Broker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection dropped after the broker leased jobs to a receive, and the worker never heard
    # of them: they waited for their leases to lapse (a minute here), went round as "taken over
    # from a silent worker", and counted a delivery they never had (max_deliveries=1: dead).
    queue = Queue(broker=broker, name=queue_name, visibility_timeout=60, max_deliveries=1)
    lost = lose_a_receive_answer(broker, monkeypatch)

    @queue.task
    async def echo(x: int) -> int:
        return x

    jobs = [await echo.enqueue(i) for i in range(3)]
    async with queue.worker():
        assert [await job.result(timeout=10) for job in jobs] == [0, 1, 2]
    assert lost.is_set()


async def test_a_job_its_own_worker_took_over_with_the_answer_lost_keeps_its_outcome(
    broker: Broker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's reclaim took over a job it was running (its lease had lapsed), and the answer
    # was lost: the job's failure, refused under the delivery the worker knew, was dropped, and
    # the job ran its first attempt again once its lease lapsed once more.
    queue = Queue(broker=broker, name=queue_name, visibility_timeout=4)  # a reclaim every second
    real_reclaim = broker.reclaim
    started, taken_over = anyio.Event(), anyio.Event()

    async def reclaim(queue: str, consumer: str, count: int, idle: float,
                      max_deliveries: int) -> list[Delivery]:
        if not started.is_set() or taken_over.is_set():
            return await real_reclaim(queue, consumer, count, idle, max_deliveries)
        await real_reclaim(queue, consumer, count, 0, max_deliveries)  # as if lapsed
        taken_over.set()
        raise BrokerConnectionError("answer lost")

    monkeypatch.setattr(broker, "reclaim", reclaim)
    attempts: list[int] = []

    @queue.task(retries=1)
    async def flaky() -> int:
        attempts.append(current_job().attempt)
        if current_job().attempt == 1:
            started.set()
            await taken_over.wait()
            raise ValueError("first attempt")
        return current_job().attempt

    async with queue.worker():
        job = await flaky.enqueue()
        assert await job.result(timeout=10) == 2
    assert attempts == [1, 2]


async def test_a_worker_stopping_after_a_lost_answer_hands_back_what_it_leased(
    broker: Broker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopped while a receive's answer was being lost: the jobs it leased stayed with a worker that
    # was gone, until their leases lapsed (a minute here).
    queue = Queue(broker=broker, name=queue_name, visibility_timeout=60)
    real_receive = broker.receive
    started = anyio.Event()
    workers: list[Worker] = []

    async def stop_the_worker() -> None:
        await started.wait()
        workers[0].stop()

    lose_a_receive_answer(broker, monkeypatch, before=stop_the_worker)

    @queue.task
    async def echo(x: int) -> int:
        return x

    job = await echo.enqueue(7)
    async with queue.worker() as worker:
        workers.append(worker)
        started.set()
    assert worker.jobs_done == 0
    monkeypatch.setattr(broker, "receive", real_receive)
    async with queue.worker():
        assert await job.result(timeout=10) == 7


@pytest.mark.parametrize("fails", [False, True], ids=["success", "failure"])
async def test_outcome_of_a_job_the_worker_reclaimed_from_itself_is_written_not_run_again(
    broker: Broker, queue_name: str, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    queue = Queue(broker=broker, name=queue_name, visibility_timeout=1)
    held = _HeldReclaim(broker, monkeypatch)
    started, finish_now = anyio.Event(), anyio.Event()
    runs = 0

    @queue.task(retries=0)
    async def slow() -> int:
        nonlocal runs
        runs += 1
        started.set()
        await finish_now.wait()
        if fails:
            raise ValueError("for good")
        return runs

    async with queue.worker():
        job = await slow.enqueue()
        with anyio.fail_after(10):
            await started.wait()
            held.armed = True
            await held.claimed.wait()
            finish_now.set()
            await held.written.wait()  # before the reclaim is answered
        # A success ends the job under the delivery it ran as; a failure is refused under it, and
        # written again under the new delivery once the worker learns of it.
        assert held.first_write == [not fails]
        held.answer.set()
        with anyio.fail_after(10):
            await held.answered.wait()
        if fails:
            with pytest.raises(TaskError, match="for good"):
                await job.result(timeout=10)
            assert await job.state() == JobState.FAILED
        else:
            assert await job.result(timeout=10) == 1
    assert runs == 1


async def test_a_memory_queue_with_no_worker_prunes_what_it_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only a worker pruned the memory broker: in immediate mode, or a process that only rate
    # limits, every record, stale heap entry and rate count stayed for good.
    from aqueue.brokers import _memory

    monkeypatch.setattr(_memory, "PRUNE_EVERY", 0.0)  # at every call, rather than every 10 s
    # The broker's clock stands still while the hits are counted (a real one could cross a 0.5 s
    # window's end midway, pruning the first windows early), then steps past the records' expiry.
    clock = [time.time()]
    monkeypatch.setattr(_memory, "time", SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    broker = MemoryBroker()
    queue = Queue(broker=broker, result_ttl=1, immediate=True)

    @queue.task
    async def noop() -> None:
        return None

    first = [await noop.enqueue() for _ in range(100)]
    for n in range(100):  # windows that end before the records do, but not while they are counted
        await broker.rate_limit_hit(queue.name, f"user-{n}", 1, 0.5)
    state = broker._queue(queue.name)
    assert len(state.records) == 100
    assert len(state.rates) == 100
    clock[0] = max(state.expiry.values()) + 0.001
    last = await noop.enqueue()
    await broker.rate_limit_hit(queue.name, "user-new", 1, 0.5)
    assert not any(job.id in state.records for job in first)
    assert list(state.records) == [last.id]
    assert list(state.rates) == [("user-new", 500)]
    assert len(state.ready) <= 64  # the heap's stale entries of jobs claimed in immediate mode
