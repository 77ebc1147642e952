"""Tasks and jobs (SPEC 2-3) on both brokers."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import gc
import math
import tracemalloc
import uuid
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from aqueue import (
    ConfigurationError,
    Job,
    JobExpired,
    JobInfo,
    JobNotFound,
    JobRevoked,
    JobState,
    PayloadTooLarge,
    Queue,
    ResultGroup,
    SerializationError,
    Signal,
    TaskError,
    current_job,
)
from aqueue import _jobs as jobs_module
from aqueue._background import Background
from aqueue.brokers import _redis as redis_broker_module


async def test_direct_call_runs_function_unchanged(queue: Queue) -> None:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    @queue.task
    def mul(a: int, b: int) -> int:
        return a * b

    assert await add(1, 2) == 3
    assert mul(3, 4) == 12
    assert await queue.jobs() == []  # nothing was enqueued


async def test_enqueue_and_result(queue: Queue) -> None:
    @queue.task
    async def add(a: int, b: int = 0) -> int:
        return a + b

    async with queue.worker(concurrency=4):
        job = await add.enqueue(1, b=2)
        assert await job.result(timeout=10) == 3
        assert await job.state() == JobState.SUCCEEDED
        # A handle from the id alone is interchangeable with the one enqueue returned.
        same = queue.job(job.id)
        assert same == job
        assert await same.result(timeout=1) == 3


async def test_waiters_get_their_own_outcomes_small_and_large(queue: Queue) -> None:
    # Outcomes reach waiting processes in the message that announces them, when small; a large
    # one is read from the record. Waiters on other jobs, and failures, are kept apart.
    @queue.task
    async def echo(text: str) -> str:
        if text == "boom":
            raise ValueError("boom")
        return text

    texts = [f"v{i}" for i in range(30)] + ["x" * 50_000, "boom"]
    async with queue.worker(concurrency=8):
        jobs = [await echo.enqueue(t) for t in texts]
        outcomes = await asyncio.gather(*(j.result(timeout=10) for j in jobs), return_exceptions=True)
        twice = await asyncio.gather(*(jobs[0].result(timeout=10) for _ in range(3)))
    assert outcomes[:-1] == texts[:-1]
    assert isinstance(outcomes[-1], TaskError)
    assert outcomes[-1].metadata["error"] == repr(ValueError("boom"))
    assert twice == ["v0"] * 3


async def test_plain_def_runs_in_a_worker_thread(queue: Queue) -> None:
    import threading

    main_thread = threading.get_ident()

    @queue.task
    def where() -> bool:
        return threading.get_ident() != main_thread

    async with queue.worker():
        assert await (await where.enqueue()).result(timeout=10) is True


async def test_rich_arguments_round_trip_as_json(queue: Queue) -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    @queue.task
    async def echo(*args: object, **kwargs: object) -> object:
        return [list(args), kwargs]

    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.UUID(int=7)
    async with queue.worker():
        job = await echo.enqueue(Point(1, 2), moment, ident, flag=True)
        value = await job.result(timeout=10)
    assert value == [[{"x": 1, "y": 2}, "2026-01-02T03:04:05+00:00", str(ident)], {"flag": True}]


async def test_dict_keys_that_are_not_strings_arrive_as_json_keys(queue: Queue) -> None:
    @queue.task
    async def echo(value: object) -> object:
        return value

    async with queue.worker():
        job = await echo.enqueue({1: "a", 2.5: {True: None}, None: [{3: 4}]})
        value = await job.result(timeout=10)
    assert value == {"1": "a", "2.5": {"true": None}, "null": [{"3": 4}]}


async def test_dict_keys_that_would_become_one_json_key_are_refused(queue: Queue) -> None:
    """1 and "1" are both written as the JSON key "1": read back, one would overwrite the other."""

    class Colour(enum.Enum):
        NONE = float("nan")  # written as its value: null

    @queue.task
    async def take(a: object, b: object = None) -> None:
        return None

    with pytest.raises(SerializationError, match=r"argument 0 .*1 and '1'.*\"1\""):
        await take.enqueue({1: "int", "1": "str"})
    with pytest.raises(SerializationError, match=r"argument 'b' .*True and 'true'"):
        await take.enqueue(1, b=[{"x": {True: 1, "true": 2}}])
    with pytest.raises(SerializationError, match=r"argument 0 .*key nan"):
        await take.enqueue({float("nan"): 1})
    with pytest.raises(SerializationError, match=r"argument 0 .*NaN"):
        await take.enqueue(Colour.NONE)
    assert await queue.jobs() == []

    @queue.task
    async def colliding() -> object:
        return {None: 1, "null": 2}

    async with queue.worker():
        with pytest.raises(TaskError, match="both become the JSON key") as caught:
            await (await colliding.enqueue()).result(timeout=10)
    assert caught.value.metadata["type"] == "SerializationError"


def test_held_payloads_cost_their_size_not_a_buffer() -> None:
    # A worker holds thousands of encoded results and a producer thousands of payloads at once.
    from aqueue._serialization import dumps, encode_call

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = [dumps(None) for _ in range(1000)]
        held += [encode_call("noop", (), {}, {}, 1 << 20) for _ in range(1000)]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(held) == 2000
    assert grown < 300_000  # about 100 bytes each; a 4 KiB buffer each would be 8 MB


@dataclasses.dataclass
class _WithExtra:
    x: float
    extra: dataclasses.InitVar[Any] = None

    def __post_init__(self, extra: Any) -> None:
        self.note = float("nan") if extra is None else extra  # beside the fields: orjson writes it


async def test_unserializable_argument_fails_at_enqueue_naming_it(queue: Queue) -> None:
    @queue.task
    async def take(a: object, b: object = None) -> None:
        return None

    with pytest.raises(SerializationError, match="argument 'b'"):
        await take.enqueue(1, b={1, 2})
    with pytest.raises(SerializationError, match="argument 0"):
        await take.enqueue(object())
    # JSON has no NaN or infinity: orjson would store null, and the task would get None.
    with pytest.raises(SerializationError, match=r"argument 'b'.*NaN"):
        await take.enqueue(1, b={"x": [1.0, float("nan")]})
    with pytest.raises(SerializationError, match=r"argument 0.*NaN"):
        await take.enqueue(float("-inf"))
    # orjson writes a dataclass's attributes, one set beside its fields too: that NaN went as null.
    with pytest.raises(SerializationError, match=r"argument 0.*NaN"):
        await take.enqueue(_WithExtra(1.0))
    with pytest.raises(SerializationError, match="both become the JSON key"):
        await take.enqueue(_WithExtra(1.0, extra={1: "a", "1": "b"}))
    assert await queue.jobs() == []
    await take.enqueue(None, b=[None, 1.5])  # a null of the caller's own is fine


async def test_payload_over_the_bound_is_refused(broker: object, queue_name: str) -> None:
    from aqueue.brokers import Broker

    assert isinstance(broker, Broker)
    small = Queue(broker=broker, name=queue_name, max_payload_size=1000)

    @small.task
    async def take(data: str) -> None:
        return None

    with pytest.raises(PayloadTooLarge, match="max_payload_size"):
        await take.enqueue("x" * 2000)
    await take.enqueue("x" * 100)
    assert len(await small.jobs()) == 1


async def test_a_map_names_the_item_it_cannot_store(broker: object, queue_name: str) -> None:
    # The error named the argument of the call, not which of the items it was.
    from aqueue.brokers import Broker

    assert isinstance(broker, Broker)
    small = Queue(broker=broker, name=queue_name, max_payload_size=100)

    @small.task
    async def f(x: object) -> None:
        return None

    with pytest.raises(SerializationError, match=r"^item 2 of 4: argument 0 of f \(set\)"):
        await f.map([1, 2, {3}, 4])
    with pytest.raises(PayloadTooLarge, match=r"^item 1 of 3: the arguments of f encode to 2\d\d bytes"):
        await f.map([1, "a" * 200, 3])
    with pytest.raises(SerializationError, match=r"^argument 0 of f \(set\)"):  # a lone call
        await f.enqueue({3})
    assert await small.jobs() == []


async def test_a_result_or_progress_over_the_bound_fails_and_an_error_is_cut(
    broker: object, queue_name: str
) -> None:
    # Results were unbounded: on Redis, one of hundreds of MiB had the worker's write of every
    # outcome beside it refused, for ever. An error quoting a big value is cut, not refused: the
    # failure must be stored.
    from aqueue.brokers import Broker

    assert isinstance(broker, Broker)
    small = Queue(broker=broker, name=queue_name, max_payload_size=1000)
    progress_refused: list[str] = []

    @small.task(retries=3)
    async def big() -> str:
        return "x" * 2000

    @small.task
    async def reports() -> str:
        try:
            await current_job().set_progress(1, message="y" * 2000)
        except PayloadTooLarge as exc:
            progress_refused.append(str(exc))
        return "x" * 900

    @small.task(retries=0)
    async def loud() -> None:
        raise ValueError("z" * 200_000)

    async with small.worker():
        job = await big.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
        assert caught.value.metadata["type"] == "PayloadTooLarge"
        assert caught.value.metadata["attempt"] == 1  # not retried: it would fail the same way
        assert "the result of big encodes to 2002 bytes, over the queue's max_payload_size of 1000" in (
            caught.value.metadata["error"])
        assert await (await reports.enqueue()).result(timeout=10) == "x" * 900
        with pytest.raises(TaskError) as caught:
            await (await loud.enqueue()).result(timeout=10)
    assert progress_refused == ["the progress encodes to 2036 bytes, over the queue's "
                                "max_payload_size of 1000 bytes"]
    error, trace = caught.value.metadata["error"], caught.value.metadata["traceback"]
    assert error.startswith("ValueError('zzz")
    assert error.endswith(f" [... {len(repr(ValueError('z' * 200_000))) - 65_536} characters cut]")
    assert len(error) < 65_600
    assert trace.startswith("Traceback (most recent call last):")
    assert trace.endswith(" characters cut]")
    assert len(trace) < 65_600
    with pytest.raises(ConfigurationError, match="max_payload_size is at most 536870912 bytes"):
        Queue(broker=broker, name=queue_name, max_payload_size=(512 << 20) + 1)


async def test_unserializable_result_fails_the_job_not_the_worker(queue: Queue) -> None:
    @queue.task(retries=3)
    async def bad() -> object:
        return {1, 2, 3}

    @queue.task
    async def good() -> int:
        return 1

    @queue.task
    async def infinite() -> list[float]:
        return [1.0, float("inf")]

    async with queue.worker():
        job = await bad.enqueue()
        with pytest.raises(TaskError) as caught:
            await job.result(timeout=10)
        assert caught.value.metadata["type"] == "SerializationError"
        assert caught.value.metadata["attempt"] == 1  # not retried: it would fail the same way
        assert await (await good.enqueue()).result(timeout=10) == 1
        with pytest.raises(TaskError, match="NaN"):  # not None, as orjson would have stored it
            await (await infinite.enqueue()).result(timeout=10)


async def test_job_ids_are_random_uuid4_hex(queue: Queue) -> None:
    @queue.task
    async def noop() -> None:
        return None

    jobs = [await noop.enqueue() for _ in range(3)] + list(await noop.map([() for _ in range(3)]))
    ids = [job.id for job in jobs]
    assert len(set(ids)) == len(ids)
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (job_id, 4, uuid.RFC_4122)


async def test_unknown_job_id_raises_at_once(queue: Queue) -> None:
    with anyio.fail_after(2):
        with pytest.raises(JobNotFound):
            await queue.job("no-such-job").result()
    assert await queue.job("no-such-job").state() is None
    assert await queue.job("no-such-job").info() is None


async def test_result_timeout_when_not_finished(queue: Queue) -> None:
    @queue.task
    async def later() -> None:
        return None

    job = await later.enqueue()  # no worker runs
    with pytest.raises(TimeoutError):
        await job.result(timeout=0.1)
    # Durations may be timedeltas wherever they may be seconds.
    with pytest.raises(TimeoutError):
        await job.result(timeout=timedelta(milliseconds=100))
    with pytest.raises(TimeoutError):
        await ResultGroup([job]).get(timeout=timedelta(milliseconds=100))
    with pytest.raises(TimeoutError):
        async for _ in ResultGroup([job]).as_completed(timeout=timedelta(milliseconds=100)):
            pass
    assert await job.state() == JobState.PENDING


def test_a_task_of_a_callable_without_a_name_needs_one_given(queue: Queue) -> None:
    # A functools.partial or a callable object: AttributeError '__name__'.
    def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(ConfigurationError, match="give one with name="):
        queue.task(functools.partial(add, 1))
    with pytest.raises(ConfigurationError, match=r"functools\.partial.*give one with name="):
        queue.task(queue.lock("l")(functools.partial(add, 1)))  # named "guarded", its wrapper's
    assert queue.task(name="add_one")(functools.partial(add, 1)).name == "add_one"
    with pytest.raises(ConfigurationError, match="a lambda has no name of its own"):
        queue.task(lambda x: x)  # every lambda is "<lambda>": a second was refused as a name taken
    assert queue.task(name="double")(lambda x: 2 * x).name == "double"


def test_a_class_is_no_task(queue: Queue) -> None:
    # Taken, its job's value was an instance, which failed to store as JSON at every run.
    class Report:
        def __init__(self, title: str) -> None:
            self.title = title

    with pytest.raises(ConfigurationError, match="not the class Report"):
        queue.task(Report)
    with pytest.raises(ConfigurationError, match="not the class Report"):
        queue.task(queue.lock("l")(Report))
    assert queue.tasks == {}


async def test_a_task_name_or_job_id_utf8_cannot_write_is_refused(queue: Queue) -> None:
    # Taken in memory; on Redis a UnicodeEncodeError at the first enqueue, or on reading the job.
    async def add(a: int, b: int) -> int:
        return a + b

    for name in ("surrogate\udcff", 5):
        with pytest.raises(ConfigurationError, match="a task's name is a non-empty string that "
                                                     "UTF-8 can write, got "):
            queue.task(name=name)(add)  # type: ignore[arg-type]
    assert queue.tasks == {}
    for job_id in ("surrogate\udcff", ""):
        with pytest.raises(ConfigurationError, match="a job id is a non-empty string that UTF-8 "
                                                     "can write, got "):
            queue.job(job_id)
    assert await queue.job("envoyé").info() is None


async def test_schedule_refuses_arguments_it_would_misread(queue: Queue) -> None:
    # "ab" ran add("a", "b"); a key that is not a string failed in the worker, at every retry.
    @queue.task
    async def add(a: int, b: int = 0) -> int:
        return a + b

    for args in ("ab", b"ab", {"a": 1}, 1, None):  # 1: TypeError "'int' object is not iterable"
        with pytest.raises(ConfigurationError, match="positional arguments as a tuple or list"):
            await add.schedule(args, delay=1)  # type: ignore[arg-type]
    for kwargs in ({1: 2}, [("a", 1)]):
        with pytest.raises(ConfigurationError, match="keyword arguments as a dict of names"):
            await add.schedule((1,), kwargs, delay=1)  # type: ignore[arg-type]
    assert await queue.jobs() == []
    assert await (await add.schedule(iter([1, 2]), delay=1)).state() == JobState.SCHEDULED


async def test_schedule_with_delay_and_eta(queue: Queue) -> None:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    delayed = await add.schedule((1, 2), delay=0.2)
    at = await add.schedule(kwargs={"a": 2, "b": 2}, eta=datetime.now(UTC) + timedelta(seconds=0.2))
    assert await delayed.state() == JobState.SCHEDULED
    assert await at.state() == JobState.SCHEDULED
    async with queue.worker():
        assert await delayed.result(timeout=10) == 3
        assert await at.result(timeout=10) == 4
    info = await delayed.info()
    assert info is not None
    assert info.started_at is not None
    assert info.enqueued_at is not None
    assert info.started_at - info.enqueued_at >= timedelta(seconds=0.2)


async def test_options_do_not_steal_keyword_names(queue: Queue) -> None:
    @queue.task
    async def echo(delay: int, key: str, priority: int) -> list[object]:
        return [delay, key, priority]

    async with queue.worker():
        job = await echo.options(priority=5).enqueue(delay=1, key="k", priority=2)
        assert await job.result(timeout=10) == [1, "k", 2]


async def test_arguments_the_function_cannot_take_are_refused_at_enqueue(queue: Queue) -> None:
    # Stored, such a job failed in the worker at every retry, then went to the dead letters; and
    # `send.enqueue(to, delay=5)` ran at once, `delay` taken for an argument of the task.
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    @queue.task
    def send(to: str, subject: str = "", *, cc: str | None = None) -> str:
        return to

    @queue.task
    async def anything(*args: object, **kwargs: object) -> int:
        return len(args) + len(kwargs)

    refused = [
        (lambda: add.enqueue(1), r"add\(\): missing a required argument: 'b'"),  # type: ignore[call-arg]
        (lambda: add.enqueue(1, 2, 3), "too many positional arguments"),  # type: ignore[call-arg]
        (lambda: add.options(priority=1).enqueue(1, 2, c=3), "unexpected keyword argument 'c'"),  # type: ignore[call-arg]
        (lambda: send.enqueue("a@b", delay=5),  # type: ignore[call-arg]
         r"delay= is an option of the call: send.options\(delay=...\).enqueue"),
        (lambda: send.enqueue("a@b", "hi", "cc@b"), "too many positional arguments"),  # type: ignore[call-arg]
        (lambda: add.schedule((1,), delay=5), "missing a required argument"),
        (lambda: add.map([(1, 2), (3,)]), r"item 1 of 2: add\(\): missing a required argument"),
    ]
    for enqueue, message in refused:
        with pytest.raises(ConfigurationError, match=message):
            await enqueue()
    assert await queue.jobs() == []  # nothing was stored
    async with queue.worker():
        taken = [await add.enqueue(1, b=2), await send.enqueue("a@b", cc="c@b"),
                 await anything.enqueue(1, 2, x=3), await add.options(delay=0.01).enqueue(2, 2)]
        assert [await job.result(timeout=10) for job in taken] == [3, "a@b", 3, 4]
    for enqueue, message in refused:  # a shape of call taken before lets no other through
        with pytest.raises(ConfigurationError, match=message):
            await enqueue()


async def test_a_task_under_a_decorator_of_the_users_takes_what_its_wrapper_takes(queue: Queue) -> None:
    # A functools.wraps decorator's signature is the function it wraps: its calls were refused
    # at enqueue for a parameter the wrapper fills in, or lacks.
    def inject(fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(*args: object, trace: object = None, **kwargs: object) -> object:
            return await fn("db", *args, **kwargs)
        return wrapper

    @queue.task
    @inject
    async def with_db(db: str, x: int) -> list[object]:
        return [db, x]

    async with queue.worker():
        assert await (await with_db.enqueue(1)).result(timeout=10) == ["db", 1]
        assert await (await with_db.enqueue(2, trace="t")).result(timeout=10) == ["db", 2]


async def test_idempotency_key_returns_the_live_job(queue: Queue) -> None:
    @queue.task
    async def send(to: str) -> str:
        return to

    first = await send.options(key="welcome:1").enqueue("a@example.com")
    again = await send.options(key="welcome:1").enqueue("a@example.com")
    assert again.id == first.id

    @queue.task
    async def other(to: str) -> str:
        return to

    # The key is the queue's (README): another task's enqueue under it finds the same live job.
    assert (await other.options(key="welcome:1").enqueue("b@example.com")).id == first.id
    async with queue.worker():
        assert await first.result(timeout=10) == "a@example.com"
    # Once finished, the key is free: a new job is made.
    fresh = await send.options(key="welcome:1").enqueue("a@example.com")
    assert fresh.id != first.id


async def test_an_idempotency_key_held_by_a_job_past_its_expiry_is_free(queue: Queue) -> None:
    # A job that never started and is past its expiry ends expired when met, never to run: the
    # key handed it back, and the work enqueued again never ran.
    @queue.task
    async def send(to: str) -> str:
        return to

    stale = await send.options(key="welcome:2", expires=datetime(2000, 1, 1, tzinfo=UTC)).enqueue("old")
    later = await send.options(key="welcome:2", delay=3600).enqueue("new")
    assert later.id != stale.id
    assert (await send.options(key="welcome:2").enqueue("again")).id == later.id  # live: found
    async with queue.worker():
        with pytest.raises(JobExpired):
            await stale.result(timeout=10)
    # The stale job's end leaves the key to the job that holds it now.
    assert (await send.options(key="welcome:2").enqueue("again")).id == later.id
    assert await later.state() == JobState.SCHEDULED


async def test_an_idempotency_key_held_by_a_job_revoked_before_a_worker_took_it_is_free(
    queue: Queue,
) -> None:
    # The revoked job ends revoked when met, never to run: the key handed it back, and the work
    # enqueued again never ran. One revoked while it runs runs on, and keeps its key.
    ran: list[str] = []
    started, go_on = anyio.Event(), anyio.Event()

    @queue.task
    async def send(to: str) -> str:
        ran.append(to)
        if to == "slow":
            started.set()
            await go_on.wait()
        return to

    revoked = await send.options(key="welcome:3").enqueue("old")
    assert await revoked.revoke()
    fresh = await send.options(key="welcome:3").enqueue("new")
    assert fresh.id != revoked.id
    async with queue.worker():
        assert await fresh.result(timeout=10) == "new"
        with pytest.raises(JobRevoked):
            await revoked.result(timeout=10)
        running = await send.options(key="welcome:4").enqueue("slow")
        with anyio.fail_after(10):
            await started.wait()
        assert await running.revoke()
        assert (await send.options(key="welcome:4").enqueue("again")).id == running.id
        go_on.set()
        assert await running.result(timeout=10) == "slow"
    assert ran == ["new", "slow"]


async def test_map_enqueues_in_bulk(queue: Queue) -> None:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with queue.worker():
        group = await add.map([(1, 2), (3, 4), (5, 6)])
        assert await group.get(timeout=10) == [3, 7, 11]
        single = await add.map([])
        assert await single.get(timeout=1) == []
    # A string made a job per character (as schedule() refuses it, so does map()); a dict, per key.
    for items in ("abc", b"abc", {"a": 1}):
        with pytest.raises(ConfigurationError, match="map\\(\\) takes a list of items"):
            await add.map(items)  # type: ignore[arg-type]
    assert len(await queue.jobs()) == 3
    # Finished: read at once, by `Job.result(timeout=0)` and by a group's read of its records,
    # which has half a second whatever the timeout (on Redis the whole group was cut off by its
    # deadline before any read).
    assert [await job.result(timeout=0) for job in group] == [3, 7, 11]
    assert await group.get(timeout=0) == [3, 7, 11]
    assert sorted([v async for v in group.as_completed(timeout=0)]) == [3, 7, 11]


async def test_as_completed_yields_every_value(queue: Queue) -> None:
    @queue.task
    async def nap(n: int) -> int:
        await anyio.sleep(n / 100)
        return n

    async with queue.worker():
        group = await nap.map([3, 1, 2])
        seen = [v async for v in group.as_completed(timeout=10)]
    assert sorted(seen) == [1, 2, 3]


async def test_as_completed_gives_ended_jobs_first_in_the_order_they_ended_and_waits_for_the_rest(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    @queue.task
    async def value(n: int) -> int:
        return n

    ended = []
    async with queue.worker():
        for n in (3, 1, 2):
            ended.append(await value.enqueue(n))
            assert await ended[-1].result(timeout=10) == n
    waited: list[str] = []
    wait = queue.broker.wait

    async def counted_wait(queue_name: str, job_id: str, timeout: float | None) -> Any:
        waited.append(job_id)
        return await wait(queue_name, job_id, timeout)

    monkeypatch.setattr(queue.broker, "wait", counted_wait)
    pending = await value.enqueue(4)  # no worker runs it
    async with aclosing(ResultGroup([pending, *reversed(ended)]).as_completed(timeout=0.1)) as values:
        assert [await anext(values) for _ in range(3)] == [3, 1, 2]
        with pytest.raises(TimeoutError):
            await anext(values)
    assert waited == [pending.id]


async def test_a_group_across_two_queues_gives_each_jobs_value_in_its_place(queue: Queue) -> None:
    other = Queue(broker=queue.broker, name=f"{queue.name}-other")

    @queue.task(name="double")
    async def double(n: int) -> int:
        return 2 * n

    @other.task(name="triple")
    async def triple(n: int) -> int:
        return 3 * n

    async with queue.worker(), other.worker():
        doubled = [await double.enqueue(n) for n in (1, 2)]
        tripled = [await triple.enqueue(n) for n in (1, 2)]
        group = ResultGroup([doubled[0], tripled[0], doubled[1], tripled[1], doubled[0]])
        assert await group.get(timeout=10) == [2, 3, 4, 6, 2]
        assert sorted([v async for v in group.as_completed(timeout=10)]) == [2, 2, 3, 4, 6]


async def test_as_completed_reads_the_errors_it_does_not_raise(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It raises the first error; the other failed jobs' waits were left unread, and asyncio
    # logged each as "Task exception was never retrieved".
    # The jobs fail once it waits for all three (a job that has ended is given from the read of
    # them all, with no wait of its own).
    waiting_for_all = anyio.Event()

    @queue.task
    async def fail(n: int) -> None:
        await waiting_for_all.wait()
        raise ValueError(n)

    waiters: list[Background[Any]] = []

    def kept(coro: Any) -> Background[Any]:
        waiters.append(Background(coro))
        if len(waiters) == 3:
            waiting_for_all.set()
        return waiters[-1]

    monkeypatch.setattr(jobs_module, "Background", kept)
    unretrieved: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context["message"]))
    try:
        async with queue.worker():
            group = await fail.map([1, 2, 3])
            with pytest.raises(TaskError):
                async for _ in group.as_completed(timeout=10):
                    pass
            for job in group:
                with pytest.raises(TaskError):
                    await job.result(timeout=10)
        assert len(waiters) == 3
        with anyio.fail_after(10):
            await asyncio.wait([w.task for w in waiters])
        waiters.clear()  # the last references: an unread error is logged as its task goes
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []


async def test_leaving_as_completed_ends_a_wait_that_swallowed_its_cancellation(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left early, as_completed cancels its waits on the jobs not heard of yet. Cancelled once,
    # a wait that lost the cancellation on the way (a redis-py call can, on 3.11) ran on for ever.
    @queue.task
    async def value(n: int) -> int:
        return n

    # The job it is left waiting for must not have ended when it begins: a job that has is given
    # from the read of them all, with no wait of its own.
    first, stuck = await value.enqueue(1), await value.options(delay=3600).enqueue(2)
    real_result = Job.result
    waiting, ended = anyio.Event(), anyio.Event()
    swallowed: list[str] = []

    async def result(self: Job[int], timeout: float | None = None) -> int:
        if self.id != stuck.id:
            return await real_result(self, timeout)
        waiting.set()
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            swallowed.append(self.id)
        try:
            await anyio.sleep_forever()
        finally:
            ended.set()

    monkeypatch.setattr(Job, "result", result)
    async with queue.worker():
        with anyio.fail_after(10):
            async with aclosing(ResultGroup([first, stuck]).as_completed()) as values:
                async for got in values:
                    assert got == 1
                    await waiting.wait()
                    break
    with anyio.move_on_after(5):
        await ended.wait()
    assert ended.is_set(), "the wait on the job not heard of still runs"
    assert swallowed == [stuck.id]


async def test_context_inside_a_running_job(queue: Queue) -> None:
    @queue.task(timeout=30)
    async def introspect() -> dict[str, object]:
        ctx = current_job()
        ctx.check_timeout()  # well before the deadline: no error
        for done, message in ((math.nan, None), (1, {"a set"})):  # NaN was stored as None
            with pytest.raises(SerializationError, match="the progress cannot be serialized as JSON"):
                await ctx.set_progress(done, 10, message)  # type: ignore[arg-type]
        await ctx.set_progress(5, 10, "halfway")
        remaining = ctx.time_remaining
        return {
            "id": ctx.id,
            "task": ctx.task_name,
            "attempt": ctx.attempt,
            "remaining_ok": remaining is not None and 0 < remaining <= 30,
            "deadline_aware": ctx.deadline is not None and ctx.deadline.tzinfo is not None,
        }

    async with queue.worker():
        job = await introspect.enqueue()
        value = await job.result(timeout=10)
    assert value == {"id": job.id, "task": introspect.name, "attempt": 1,
                     "remaining_ok": True, "deadline_aware": True}
    info = await job.info()
    assert info is not None
    assert info.progress == {"done": 5, "total": 10, "message": "halfway"}


async def test_the_deadline_a_job_reads_is_its_timeouts_after_slow_executing_handlers(
    queue: Queue,
) -> None:
    # It was reckoned before the EXECUTING handlers ran, the timeout's own clock after them:
    # check_timeout() and time_remaining ran ahead of the timeout by the handlers' time.
    @queue.on(Signal.EXECUTING)
    async def slow_handler(signal: Signal, job: object, exc: BaseException | None = None) -> None:
        await anyio.sleep(0.5)  # the handler's own time, the point of the test

    @queue.task(timeout=2)
    async def read_it() -> float:
        remaining = current_job().time_remaining
        assert remaining is not None
        return remaining

    async with queue.worker():
        remaining = await (await read_it.enqueue()).result(timeout=10)
    assert remaining > 1.7  # 1.5 when the handler's time counted


async def test_info_fields(queue: Queue) -> None:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with queue.worker() as worker:
        job = await add.enqueue(2, b=3)
        await job.result(timeout=10)
    info = await job.info()
    assert isinstance(info, JobInfo)
    assert (info.id, info.task, info.state) == (job.id, add.name, JobState.SUCCEEDED)
    assert (info.args, info.kwargs, info.attempt, info.result) == ([2], {"b": 3}, 1, 5)
    assert info.worker == worker.name
    assert info.error is None
    assert info.enqueued_at
    assert info.started_at
    assert info.finished_at
    assert info.enqueued_at <= info.started_at <= info.finished_at
    assert info.finished_at.tzinfo is not None


async def test_jobs_lists_newest_first_with_filters(queue: Queue) -> None:
    @queue.task
    async def a() -> None:
        return None

    @queue.task
    async def b() -> None:
        raise ValueError("no")

    first = await a.enqueue()
    second = await b.enqueue()
    third = await a.enqueue()
    listed = await queue.jobs()
    assert [i.id for i in listed] == [third.id, second.id, first.id]
    assert [i.id for i in await queue.jobs(task=a.name)] == [third.id, first.id]
    assert [i.id for i in await queue.jobs(limit=1)] == [third.id]
    async with queue.worker():
        await first.result(timeout=10)
        await third.result(timeout=10)
        with pytest.raises(TaskError):
            await second.result(timeout=10)
    assert [i.id for i in await queue.jobs(state="failed")] == [second.id]
    assert [i.id for i in await queue.jobs(state=JobState.SUCCEEDED)] == [third.id, first.id]


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "split-into-calls"])
async def test_jobs_lists_the_jobs_of_one_map_newest_first(
    queue: Queue, monkeypatch: pytest.MonkeyPatch, split: bool
) -> None:
    # One call stores them all at one time: they still list in the order they were enqueued. On
    # Redis, split into several script calls (of 500 jobs; 4 here) in pipelines (of 20 calls; 3
    # here), the calls' jobs listed interleaved.
    if split:
        monkeypatch.setattr(redis_broker_module, "ENQUEUE_CHUNK", 4)
        monkeypatch.setattr(redis_broker_module, "ENQUEUE_WINDOW", 3)

    @queue.task
    async def a(i: int) -> int:
        return i

    before = await a.enqueue(-1)
    group = await a.map([(i,) for i in range(30)])
    listed = [i.id for i in await queue.jobs(limit=50)]
    assert listed == [*(job.id for job in reversed(group.jobs)), before.id]
