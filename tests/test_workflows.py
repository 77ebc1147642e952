"""Workflows (SPEC 6) on both brokers: pipelines, groups, chords, batches; under retries and
redelivery, chords fire once and batches re-evaluate."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from aqueue import (
    BatchState,
    ChordResult,
    ConfigurationError,
    Job,
    JobCancelled,
    JobError,
    JobNotFound,
    JobState,
    Pipeline,
    Queue,
    ResultGroup,
    TaskError,
    chord,
    current_job,
    group,
)
from aqueue.brokers import (
    Broker,
    Completion,
    Delivery,
    JobRecord,
    MemoryBroker,
    Outcome,
    RedisBroker,
    error_handler_id,
)


def arithmetic(queue: Queue) -> Any:
    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    return add


def tagging(queue: Queue) -> tuple[Any, Any]:
    """An error handler and a task that each return the tag they are given."""
    @queue.task
    async def on_error(exc: TaskError, tag: str) -> str:
        return tag

    @queue.task
    async def tagged(tag: str) -> str:
        return tag

    return on_error, tagged


def flaky_task(queue: Queue) -> tuple[Any, list[bool]]:
    """A task that fails until the list it comes with holds something: a member to retry."""
    healthy: list[bool] = []

    @queue.task
    async def flaky(n: int) -> int:
        if not healthy:
            raise ConnectionError("upstream down")
        return n

    return flaky, healthy


def strict_sum_then_twice(queue: Queue) -> tuple[Any, Any]:
    """A chord callback that fails when a member's value is an error, and a step to follow it."""

    @queue.task
    async def strict(values: list[Any]) -> int:
        if any(isinstance(v, TaskError) for v in values):
            raise ValueError("a member failed")
        return sum(values)

    @queue.task
    async def twice(x: int) -> int:
        return 2 * x

    return strict, twice


def steady_task(queue: Queue) -> Any:
    """A task that gives back its argument: a chord member that always succeeds."""

    @queue.task
    async def steady(n: int) -> int:
        return n

    return steady


def errors_marked(values: list[Any]) -> list[Any]:
    """A chord callback's values as the tests compare them: each error as "E"."""
    return ["E" if isinstance(v, TaskError) else v for v in values]


def collecting_task(queue: Queue) -> tuple[Any, list[list[Any]]]:
    """A chord callback that gives back its values, and the values of each of its runs (errors
    marked), in a list."""
    calls: list[list[Any]] = []

    @queue.task
    async def collect(values: list[Any]) -> list[Any]:
        calls.append(errors_marked(values))
        return calls[-1]

    return collect, calls


async def test_pipeline_passes_each_value_on(queue: Queue) -> None:
    add = arithmetic(queue)
    async with queue.worker():
        res = await queue.enqueue(add.s(1, 2).then(add, 3).then(add, 4).then(add, 5))
        assert await res.get(timeout=10) == [3, 6, 10, 15]


async def test_tuples_extend_args_dicts_update_kwargs_none_passes_nothing(queue: Queue) -> None:
    @queue.task
    async def fib(a: int, b: int) -> tuple[int, int]:
        return b, a + b

    @queue.task
    async def as_kwargs(n: int) -> dict[str, int]:
        return {"x": n, "y": n * 2}

    @queue.task
    async def takes(x: int, y: int, z: int = 0) -> int:
        return x + y + z

    @queue.task
    async def nothing() -> None:
        return None

    @queue.task
    async def constant(value: str = "default") -> str:
        return value

    async with queue.worker():
        res = await queue.enqueue(fib.s(0, 1).then(fib).then(fib).then(fib).then(fib))
        assert await res.get(timeout=10) == [[1, 1], [1, 2], [2, 3], [3, 5], [5, 8]]
        res = await queue.enqueue(as_kwargs.s(1).then(takes, z=10))
        assert await res.get(timeout=10) == [{"x": 1, "y": 2}, 13]
        res = await queue.enqueue(nothing.s().then(constant))
        assert await res.get(timeout=10) == [None, "default"]


async def test_error_handler_gets_the_error_and_the_rest_is_skipped(queue: Queue) -> None:
    add = arithmetic(queue)
    handled: list[tuple[str, str]] = []
    done = anyio.Event()

    @queue.task
    async def boom(x: int) -> int:
        raise ValueError(f"boom {x}")

    @queue.task
    async def on_error(exc: TaskError, tag: str) -> None:
        handled.append((exc.metadata["type"], tag))
        done.set()

    async with queue.worker():
        res = await queue.enqueue(add.s(1, 1).then(boom).then(add, 1).error(on_error, "pipe"))
        with pytest.raises(TaskError, match="boom 2"):
            await res.get(timeout=10)
        with anyio.fail_after(10):
            await done.wait()
        assert await res[2].state() == JobState.CANCELLED  # skipped
        assert await res[0].result(timeout=1) == 2
    assert handled == [("ValueError", "pipe")]


async def test_group_of_mixed_tasks_and_as_completed(queue: Queue) -> None:
    add = arithmetic(queue)

    @queue.task
    def shout(word: str) -> str:
        return word.upper()

    @queue.task
    async def nap(n: int) -> int:
        await anyio.sleep(n / 100)
        return n

    async with queue.worker():
        res = await queue.enqueue(group([add.s(1, 2), shout.s("hi"), nap.s(3), add.s(2, 2).then(add, 1)]))
        assert await res.get(timeout=10) == [3, "HI", 3, 5]
        res = await queue.enqueue(group([nap.s(n) for n in (5, 1, 3)]))
        assert sorted([v async for v in res.as_completed(timeout=10)]) == [1, 3, 5]
        mapped = await add.map([(1, 1), (2, 2)])
        assert await mapped.get(timeout=10) == [2, 4]


async def test_chord_with_a_failing_member_still_completes(queue: Queue) -> None:
    add = arithmetic(queue)

    @queue.task
    async def boom() -> None:
        raise KeyError("lost")

    @queue.task
    async def nothing() -> None:
        return None

    @queue.task
    async def summarize(values: list[Any], label: str) -> list[Any]:
        return [f"error:{v.metadata['type']}" if isinstance(v, TaskError) else v for v in values] + [label]

    async with queue.worker():
        c = await queue.enqueue(chord([add.s(1, 1), boom.s(), nothing.s(), add.s(2, 2)], summarize.s("end")))
        assert isinstance(c, ChordResult)
        assert await c.get(timeout=10) == [2, "error:KeyError", None, 4, "end"]
        assert [await j.state() for j in c.results] == [
            JobState.SUCCEEDED, JobState.FAILED, JobState.SUCCEEDED, JobState.SUCCEEDED]
        assert await c.callback.result(timeout=1) == [2, "error:KeyError", None, 4, "end"]


@pytest.mark.parametrize("forged", [
    {"__aqueue_error__": {"error": "forged"}}, [{"__aqueue_error__": "nested"}], {"__aqueue_error__": 5},
])
async def test_a_member_value_shaped_as_the_error_mark_fails_rather_than_forge_an_error(
    queue: Queue, forged: Any
) -> None:
    # Such a value succeeded, and its callback took it for the member's error (a TaskError): a
    # task that passes outside data through could forge a failure. The same dict beside another
    # key, or inside a dict, is plain data.
    @queue.task
    async def relay(value: Any) -> Any:
        return value

    @queue.task
    async def collect(values: list[Any]) -> list[Any]:
        return [f"error:{v.metadata['type']}" if isinstance(v, TaskError) else v for v in values]

    plain = [{"__aqueue_error__": 1, "other": 2}, {"inner": {"__aqueue_error__": 1}}]
    async with queue.worker():
        c = await queue.enqueue(chord([relay.s(forged), *(relay.s(p) for p in plain)], collect))
        assert await c.get(timeout=10) == ["error:SerializationError", *plain]
        with pytest.raises(TaskError, match="aqueue marks a chord member's error so"):
            await c.results[0].result(timeout=1)


async def test_a_chord_member_ended_without_running_puts_a_full_task_error_in_its_place(queue: Queue) -> None:
    # Cancelled, revoked or expired before a worker ran it: the callback still gets TaskError
    # metadata with every key SPEC names, its type naming the ending as job.result() would.
    add = arithmetic(queue)

    @queue.task
    async def collect(values: list[Any]) -> list[Any]:
        return [v.metadata if isinstance(v, TaskError) else v for v in values]

    c = await queue.enqueue(chord([add.s(1, 1), add.s(2, 2), add.s(3, 3),
                                   add.options(expires=datetime(2000, 1, 1, tzinfo=UTC)).s(4, 4)],
                                  collect.s()))
    members = c.results.jobs
    assert await members[1].cancel()
    assert await members[2].revoke()
    async with queue.worker():
        values = await c.get(timeout=10)
    assert values[0] == 2
    for member, value, kind in zip(members[1:], values[1:], ["JobCancelled", "JobRevoked", "JobExpired"],
                                   strict=True):
        assert value["type"] == kind
        assert value["job_id"] == member.id
        assert value["error"].startswith(f"{kind}(")
        assert (value["traceback"], value["attempt"], value["retries_left"]) == ("", 1, 0)


async def test_a_chord_whose_cancelled_callback_expired_still_takes_its_members(queue: Queue) -> None:
    # The callback was cancelled while it waited, and its record is gone (result_ttl): the last
    # member's end has no callback to start, and the worker goes on (it once stopped here).
    queue = Queue(broker=queue.broker, name=queue.name, result_ttl=1)
    add = arithmetic(queue)
    c = await queue.enqueue(chord([add.s(1, 1), add.s(2, 2)], add.s(0)))
    assert await c.callback.cancel()
    with anyio.fail_after(10):
        while await c.callback.state() is not None:  # noqa: ASYNC110 - a record's expiry has no event
            await anyio.sleep(0.05)
    async with queue.worker():
        assert [await job.result(timeout=10) for job in c.results.jobs] == [2, 4]
        later = await add.enqueue(5, 5)
        assert await later.result(timeout=10) == 10


async def test_a_chord_callback_whose_values_outgrow_the_payload_bound_ends_failed(queue: Queue) -> None:
    # The members' values count toward the worker's max_payload_size (README): the chord still
    # completes, its callback dead-lettered with the reason, not left waiting.
    queue = Queue(broker=queue.broker, name=queue.name, max_payload_size=1000)

    @queue.task
    async def big() -> str:
        return "x" * 400

    @queue.task
    async def count(values: list[str]) -> int:
        return len(values)

    async with queue.worker():
        c = await queue.enqueue(chord([big.s(), big.s(), big.s()], count.s()))
        with pytest.raises(TaskError, match="max_payload_size"):
            await c.get(timeout=10)
    assert await c.callback.state() == JobState.FAILED


async def test_a_step_whose_value_outgrows_the_next_steps_payload_bound_names_that_step(
    queue: Queue,
) -> None:
    # The error named the step that ran ("the arguments of big"), not the step they were for.
    queue = Queue(broker=queue.broker, name=queue.name, max_payload_size=1000)

    @queue.task
    async def big() -> str:
        return "x" * 900  # within the bound itself (a result over it fails its own job)

    @queue.task
    async def step(value: str, extra: str) -> int:
        return len(value) + len(extra)

    async with queue.worker():
        res = await queue.enqueue(big.s().then(step, "y" * 200))
        with pytest.raises(TaskError, match="the arguments of the step after big encode to"):
            await res.get(timeout=10)


async def test_a_group_fed_into_a_task_is_a_chord_and_a_chord_takes_a_bare_task(queue: Queue) -> None:
    # Huey's guide: `group([...]).then(total)` is `chord([...], total)`, and a chord's callback may
    # be given as the task itself.
    add = arithmetic(queue)

    @queue.task
    async def total(values: list[int], bonus: int = 0) -> int:
        return sum(values) + bonus

    async with queue.worker():
        c = await queue.enqueue(group([add.s(i, 1) for i in range(4)]).then(total, bonus=100))
        assert isinstance(c, ChordResult)
        assert await c.get(timeout=10) == 110
        assert await c.results.get(timeout=10) == [1, 2, 3, 4]
        assert await (await queue.enqueue(chord([add.s(1, 1), add.s(2, 2)], total))).get(timeout=10) == 6


async def test_a_chord_of_no_members_runs_its_callback_at_once_with_no_values(queue: Queue) -> None:
    # A fan-out over an empty list (`chord([fetch.s(u) for u in urls], merge)` with no urls) is
    # no error: the callback runs with [], as the members' place holds, and its steps after it.
    add = arithmetic(queue)
    seen: list[tuple[list[int], str | None]] = []

    @queue.task
    async def total(values: list[int], bonus: int = 0) -> int:
        seen.append((values, current_job().batch_id))
        return sum(values) + bonus

    async with queue.worker():
        c = await queue.enqueue(chord([], total.s(bonus=5)))
        assert await c.get(timeout=10) == 5
        assert await c.results.get(timeout=10) == []
        assert len(c.results) == 0
        assert await (await queue.enqueue(group([]))).get(timeout=10) == []
        grouped = await queue.enqueue(group([]).then(total).then(add, 1))
        assert await grouped.pipeline_results.get(timeout=10) == [0, 1]
        assert await grouped.get(timeout=10) == 0
        nested = await queue.enqueue(chord([chord([], total.s()), add.s(1, 1)], total.s()))
        assert await nested.get(timeout=10) == 2  # the empty chord's member value is its callback's 0
        b = await queue.batch([chord([], total.s(bonus=1))])
        assert await b.members.get(timeout=10) == [1]
        assert (await b.state()).succeeded == 1
    assert ([], b.id) in seen  # in a batch through its chord, the callback names the batch
    with pytest.raises(ConfigurationError, match="delay and eta do not apply"):
        await queue.enqueue(chord([], total.options(delay=5).s()))
    # Refused as a chord with members refuses it: a fan-out's code meets both.
    with pytest.raises(ConfigurationError, match="an idempotency key is for a job that stands alone"):
        await queue.enqueue(chord([], total.options(key="totals").s()))


async def test_a_workflows_arguments_the_functions_cannot_take_are_refused_at_enqueue(queue: Queue) -> None:
    # What a step, member or callback is given beside the values its workflow puts first (a
    # chord's values, an error handler's exception); a later pipeline step's start with a value
    # not known yet, and are not judged.
    add = arithmetic(queue)

    on_error, report = tagging(queue)

    @queue.task
    async def merge(values: list[int], sep: str) -> str:
        return sep.join(map(str, values))

    refused = [
        (group([add.s(1, 1), add.s(1)]), "add\\(\\): missing a required argument: 'b'"),  # type: ignore[call-arg]
        (chord([add.s(1, 1)], merge.s("|", "x")), "too many positional arguments"),  # type: ignore[arg-type]
        (chord([add.s(1, 1)], merge), "merge\\(\\): missing a required argument: 'sep'"),
        (add.s(1, 1).error(on_error), "on_error\\(\\): missing a required argument: 'tag'"),
        (add.s(1).then(add, 1), "missing a required argument: 'b'"),  # type: ignore[call-arg]
    ]
    for workflow, message in refused:
        with pytest.raises(ConfigurationError, match=message):
            await queue.enqueue(workflow)
    with pytest.raises(ConfigurationError, match="tagged\\(\\): missing a required argument: 'tag'"):
        await queue.batch([add.s(1, 1)], on_success=report)
    assert await queue.jobs() == []  # nothing was stored
    async with queue.worker():
        c = await queue.enqueue(chord([add.s(1, 1), add.s(2, 2)], merge.s(sep="|")))  # type: ignore[call-arg]
        assert await c.get(timeout=10) == "2|4"
        steps = await queue.enqueue(add.s(1, 1).then(add, 1).error(on_error, "late"))
        assert await steps.get(timeout=10) == [2, 3]
        b = await queue.batch([add.s(1, 1)], on_success=report.s("done"))
        assert await b.members.get(timeout=10) == [2]  # its end made the callback's job
        assert await b.callback("success").result(timeout=10) == "done"


async def test_handles_and_workflows_say_what_they_are(queue: Queue) -> None:
    add = arithmetic(queue)
    name = repr(queue.name)
    configured = add.options(priority=5, retries=2)
    assert repr(configured) == f"<TaskCall add.options(priority=5, retries=2) on {name}>"
    assert repr(add.s(1, b=2).then(add, 3)) == "add.s(1, b=2) -> add.s(3)"
    res = await queue.enqueue(group([add.s(1, 1), add.s(2, 2)]))
    assert repr(res) == f"<ResultGroup of 2 job(s) on {name}>"
    assert repr(ResultGroup([])) == "<ResultGroup of 0 job(s)>"
    c = await queue.enqueue(chord([add.s(1, 1)], add.s(1)))
    assert repr(c) == f"<ChordResult of 1 member(s), callback {c.callback.id}>"
    b = await queue.batch([add.s(1, 1)])
    assert repr(b) == f"<Batch {b.id} of 1 member(s) on {name}>"


async def test_nested_chords_and_chords_of_pipelines(queue: Queue) -> None:
    add = arithmetic(queue)

    @queue.task
    async def total(values: list[Any]) -> int:
        return sum(v if isinstance(v, int) else total_of(v) for v in values)

    def total_of(values: list[Any]) -> int:
        return sum(values)

    async with queue.worker():
        inner = chord([add.s(1, 1), add.s(2, 2)], total.s())  # 6
        pipe = add.s(10, 10).then(add, 1)  # 21
        c = await queue.enqueue(chord([inner, pipe, add.s(0, 1)], total.s()))
        assert await c.get(timeout=10) == 6 + 21 + 1
        then = await queue.enqueue(chord([add.s(1, 2), add.s(3, 4)], total.s()).then(add, 100))
        assert await then.pipeline_results.get(timeout=10) == [10, 110]
        assert await then.get(timeout=1) == 10  # the callback's value, as in Huey


async def test_dynamic_fan_out_from_inside_a_task(queue: Queue) -> None:
    add = arithmetic(queue)

    @queue.task
    async def total(values: list[int]) -> int:
        return sum(values)

    @queue.task
    async def fan_out(n: int) -> str:
        c = await queue.enqueue(chord([add.s(i, i) for i in range(n)], total.s()))
        return c.callback.id

    async with queue.worker():
        callback_id = await (await fan_out.enqueue(5)).result(timeout=10)
        assert await queue.job(callback_id).result(timeout=10) == 20


async def test_redelivered_member_is_counted_once(broker: Broker, queue_name: str) -> None:
    queue = Queue(broker=broker, name=queue_name, visibility_timeout=1)
    add = arithmetic(queue)
    runs = Counter[int]()

    @queue.task
    async def slow(n: int) -> int:
        runs[n] += 1
        return n

    @queue.task
    async def total(values: list[int]) -> list[int]:
        return values

    c = await queue.enqueue(chord([slow.s(1), add.s(2, 0)], total.s()))
    # One member is taken by a worker that dies; it is delivered again after its lease lapses.
    taken = await broker.receive(queue_name, "dead-worker", 1, 0, 10)
    assert len(taken) == 1
    async with queue.worker():
        assert await c.get(timeout=20) == [1, 2]
    # The dead worker's stale report changes nothing.
    from aqueue.brokers import Completion, Outcome

    late = Completion(taken[0], Outcome.SUCCEEDED, 0.0, result=b"999")
    assert await broker.finish(queue_name, [late], 60) == [False]
    assert await c.callback.result(timeout=1) == [1, 2]


async def test_many_chords_with_random_failures_fire_exactly_once(queue: Queue) -> None:
    rng = random.Random(7)
    plan = {(c, m): rng.random() < 0.3 for c in range(200) for m in range(10)}  # fails at first?
    fired = Counter[int]()

    @queue.task(retries=2)
    async def member(c: int, m: int) -> int:
        if plan[(c, m)] and current_job().attempt == 1:
            raise RuntimeError("flaky")
        return m

    @queue.task
    async def callback(values: list[int], c: int) -> int:
        fired[c] += 1
        return sum(values)

    async with queue.worker(concurrency=200):
        chords = [await queue.enqueue(chord([member.s(c, m) for m in range(10)], callback.s(c)))
                  for c in range(200)]
        values = [await c.get(timeout=60) for c in chords]
    assert values == [45] * 200
    assert fired == Counter(dict.fromkeys(range(200), 1))


async def test_a_batch_stays_finished_once_its_members_records_expired(queue: Queue) -> None:
    # A loop waiting for `(await b.state()).finished` must end, even if it looks after result_ttl.
    queue = Queue(broker=queue.broker, name=queue.name, result_ttl=1)
    add = arithmetic(queue)
    async with queue.worker():
        b = await queue.batch([add.s(1, 1), add.s(2, 2)])
        assert await b.members.get(timeout=10) == [2, 4]
    assert await b.state() == BatchState(size=2, succeeded=2, failed=0, cancelled=0, unfinished=0)
    with anyio.fail_after(10):
        while any([await job.state() is not None for job in b.members]):  # noqa: ASYNC110 - a record's expiry has no event
            await anyio.sleep(0.05)
    state = await b.state()
    assert (state.finished, state.unfinished, state.succeeded) == (True, 0, 0)


async def test_a_group_and_a_batch_read_their_jobs_records_together(
    queue: Queue, monkeypatch: pytest.MonkeyPatch,
) -> None:
    add = arithmetic(queue)
    async with queue.worker(concurrency=50):
        res = await add.map([(i, i) for i in range(250)])
        b = await queue.batch([add.s(i, 1) for i in range(250)])
        with anyio.fail_after(10):
            for job in [*res, *b.members]:
                await queue.broker.wait(queue.name, job.id, None)
    calls: Counter[str] = Counter()

    def counted(name: str) -> None:
        method = getattr(queue.broker, name)

        async def call(*args: Any) -> Any:
            calls[name] += 1
            return await method(*args)
        monkeypatch.setattr(queue.broker, name, call)

    for name in ("get", "get_many", "get_states", "wait"):
        counted(name)
    assert await res.get(timeout=10) == [2 * i for i in range(250)]
    assert calls == {"get_many": 2}  # two reads (200 at a time): no job read, or waited for, on its own
    # A batch's state, and which members to retry, need only the members' states: one read each.
    assert await b.state() == BatchState(size=250, succeeded=250, failed=0, cancelled=0, unfinished=0)
    assert await b.retry_failed() == 0
    assert await res.jobs[0].state() == JobState.SUCCEEDED
    assert calls == {"get_many": 2, "get_states": 3}
    # Only a job that had not ended is waited for (or found missing), in its place.
    pending = await add.enqueue(1, 2)
    with pytest.raises(TimeoutError, match=pending.id):
        await ResultGroup([*res.jobs[:3], pending, *res.jobs[3:]]).get(timeout=0)
    with pytest.raises(JobNotFound):
        await ResultGroup([res.jobs[0], queue.job("never-enqueued")]).get(timeout=10)
    assert (calls["get_many"], calls["wait"]) == (4, 2)  # (a wait on Redis reads its record once more)


async def test_a_batch_that_succeeded_and_a_fired_chord_leave_no_bookkeeping(queue: Queue) -> None:
    # What the broker keeps to count a batch or fill a chord is freed once it can change nothing:
    # it was kept for ever, one hash (or entry) per batch.
    add = arithmetic(queue)

    @queue.task
    async def total(values: list[int]) -> int:
        return sum(values)

    async with queue.worker():
        batches = [await queue.batch([add.s(i, 1), add.s(i, 2)], on_success=add.s(0, 0)) for i in range(3)]
        for b in batches:
            await b.members.get(timeout=10)  # the last member's end creates the callback
            assert await b.callback("success").result(timeout=10) == 0
        assert await (await queue.enqueue(chord([add.s(1, 1)], total.s()))).get(timeout=10) == 2
    broker = queue.broker
    if isinstance(broker, MemoryBroker):
        q = broker._queues[queue.name]
        assert (q.batches, q.chords) == ({}, {})
    else:
        assert isinstance(broker, RedisBroker)
        assert [k async for k in broker.client.scan_iter(match=f"aqueue:{{{queue.name}}}:batch:*")] == []
        assert [k async for k in broker.client.scan_iter(match=f"aqueue:{{{queue.name}}}:chord:*")] == []


async def batch_kept(queue: Queue, batch_id: str) -> float | None:
    """How long the broker keeps what it counts a batch with: None if it keeps nothing, inf if it
    keeps it with no end, else the seconds left."""
    broker = queue.broker
    if isinstance(broker, MemoryBroker):
        batch = broker._queues[queue.name].batches.get(batch_id)
        if batch is None:
            return None
        return math.inf if batch.expires_at is None else batch.expires_at - time.time()
    assert isinstance(broker, RedisBroker)
    ttl = await broker.client.ttl(f"aqueue:{{{queue.name}}}:batch:{batch_id}")
    return None if ttl == -2 else math.inf if ttl == -1 else float(ttl)


async def test_a_re_armed_pipeline_step_stays_listed_while_its_record_is_kept(
    broker: Broker, queue_name: str
) -> None:
    # Skipped, the step was listed to leave the listing when its record would expire; re-armed by
    # a retry and ended again, its record was kept longer, but the earlier listing took it out of
    # queue.jobs() at that first second (on Redis: up to result_ttl early, a day by default).
    failing = True

    def tasks(queue: Queue) -> tuple[Any, Any]:
        @queue.task(name="first", retries=0)
        async def first() -> int:
            if failing:
                raise ValueError("first run fails")
            return 1

        @queue.task(name="second")
        async def second(x: int) -> int:
            return x + 1

        return first, second

    hour = Queue(broker=broker, name=queue_name, result_ttl=3600)
    first, _ = tasks(hour)
    steps = await hour.enqueue(first.s().then(hour.tasks["second"]))
    async with hour.worker():
        with pytest.raises(TaskError):
            await steps[0].result(timeout=10)
    assert await steps[1].state() == JobState.CANCELLED  # skipped: kept an hour
    failing = False
    day = Queue(broker=broker, name=queue_name, result_ttl=86400)  # the second end: kept a day
    tasks(day)
    assert await day.retry(steps[0].id)
    async with day.worker():
        assert await day.job(steps[1].id).result(timeout=10) == 2
    await broker.prune(queue_name, time.time() + 3601, 5000)  # past the hour's second
    assert await day.job(steps[1].id).info() is not None
    assert steps[1].id in [job.id for job in await day.jobs()]


async def test_a_batch_is_kept_only_while_a_retry_can_change_it(queue: Queue) -> None:
    # A batch whose members did not all succeed was kept for ever, one hash (or entry) each,
    # though only a dead letter's retry can change it.
    add = arithmetic(queue)
    failing = {1, 2, 3, 4}

    @queue.task
    async def flaky(n: int) -> int:
        if n in failing:
            raise ConnectionError("upstream down")
        return n

    cancelled = await queue.batch([add.s(1, 1), add.s(2, 2)], on_complete=add.s(0, 0))
    assert await cancelled.members[1].cancel()
    dead = await queue.batch([flaky.s(1), add.s(1, 1)], on_success=add.s(0, 1))
    purged = await queue.batch([flaky.s(2)])
    skipped = await queue.batch([flaky.s(3).then(add, 1)])
    rearmed = await queue.batch([flaky.s(4).then(add, 1)], on_success=add.s(0, 2))
    async with queue.worker():
        for b in (cancelled, dead, purged, skipped, rearmed):
            for member in b.members:  # its end is counted in the same step that reports it
                with contextlib.suppress(JobError):
                    await member.result(timeout=10)
        assert await cancelled.callback("complete").result(timeout=10) == 0
    assert await batch_kept(queue, cancelled.id) is None  # no member can come back
    for b in (dead, purged):
        assert await batch_kept(queue, b.id) == math.inf  # as long as its dead letter
    for b in (skipped, rearmed):  # as long as the skipped step's record (result_ttl: a day)
        assert 86_390 < (await batch_kept(queue, b.id) or 0) <= 86_400

    # Retried, a failed member keeps its batch through a purge of the dead letters until it ends;
    # a re-armed step keeps its batch with no end until it ends.
    assert await queue.retry(dead.members[0].id)
    assert await rearmed.retry_failed() == 1
    assert await batch_kept(queue, rearmed.id) == math.inf
    assert await queue.purge_dead_letters() == 2  # flaky(2), flaky(3)
    assert await batch_kept(queue, purged.id) is None
    assert await batch_kept(queue, dead.id) == math.inf
    failing.clear()
    async with queue.worker():
        assert await dead.members[0].result(timeout=10) == 1
        assert await rearmed.members[0].result(timeout=10) == 5
        assert await dead.callback("success").result(timeout=10) == 1
        assert await rearmed.callback("success").result(timeout=10) == 2
    assert await batch_kept(queue, dead.id) is None
    assert await batch_kept(queue, rearmed.id) is None


async def test_a_batch_member_ended_without_running_counts_as_not_succeeded(queue: Queue) -> None:
    # Cancelled, revoked or expired, it did not fail, but neither did it succeed: on_failure
    # fires (with on_complete), on_success does not; b.state() counts it apart from the failures.
    calls: list[str] = []
    both = anyio.Event()

    @queue.task
    async def member(n: int) -> int:
        return n

    @queue.task
    async def callback(kind: str) -> None:
        calls.append(kind)
        if len(calls) == 2:
            both.set()

    b = await queue.batch([member.s(1), member.s(2), member.s(3),
                           member.options(expires=datetime(2000, 1, 1, tzinfo=UTC)).s(4)],
                          on_success=callback.s("success"), on_failure=callback.s("failure"),
                          on_complete=callback.s("complete"))
    assert await b.members[1].cancel()
    assert await b.members[2].revoke()
    async with queue.worker():
        with anyio.fail_after(10):
            await both.wait()
    assert sorted(calls) == ["complete", "failure"]  # fired together, in the members' last step
    assert await b.callback("success").state() is None
    state = await b.state()
    assert (state.size, state.succeeded, state.failed, state.cancelled, state.finished) == (4, 1, 0, 1, True)
    assert (state.revoked, state.expired) == (1, 1)  # each member in one count: they were in none


async def test_batch_on_success_after_a_failed_member_is_retried(queue: Queue) -> None:
    healthy = False
    calls: list[tuple[str, str | None]] = []
    success = anyio.Event()
    complete = anyio.Event()

    @queue.task
    async def member(n: int) -> int:
        if n == 2 and not healthy:
            raise ConnectionError("upstream down")
        calls.append(("member", current_job().batch_id))
        return n

    @queue.task
    async def on_success(label: str) -> None:
        calls.append((f"success:{label}", current_job().batch_id))
        success.set()

    @queue.task
    async def on_failure() -> None:
        calls.append(("failure", current_job().batch_id))

    @queue.task
    async def on_complete() -> None:
        calls.append(("complete", current_job().batch_id))
        complete.set()

    async with queue.worker():
        b = await queue.batch([member.s(1), member.s(2), member.s(3)], on_success=on_success.s("all"),
                              on_failure=on_failure.s(), on_complete=on_complete.s())
        with anyio.fail_after(10):
            await complete.wait()
        await b.callback("failure").result(timeout=10)
        state = await b.state()
        assert (state.size, state.succeeded, state.failed, state.finished) == (3, 2, 1, True)
        healthy = True
        assert await b.retry_failed() == 1
        with anyio.fail_after(10):
            await success.wait()
        await b.callback("success").result(timeout=10)
        assert (await b.state()).succeeded == 3
        assert await b.retry_failed() == 0
    kinds = Counter(kind for kind, _ in calls)
    assert kinds == Counter({"member": 3, "complete": 1, "failure": 1, "success:all": 1})
    assert {batch_id for _, batch_id in calls} == {b.id}


async def test_retry_failed_reruns_a_pipeline_member_from_its_failed_step(queue: Queue) -> None:
    # The member's first step fails for good, so its last step is skipped (the member ends
    # cancelled) and on_failure fires; retry_failed runs the failed step again, its success runs
    # the skipped step, and the batch ends in on_success, once. With two such members, the first
    # re-armed one to end settled the batch while the other's re-armed step still waited (counted
    # as skipped, no longer marked so): the batch was deleted, and on_success never fired.
    healthy = False
    fired: list[str] = []
    failed, succeeded = anyio.Event(), anyio.Event()
    add = arithmetic(queue)

    @queue.task
    async def fetch() -> int:
        if not healthy:
            raise ConnectionError("upstream down")
        return 10

    @queue.task
    async def note(kind: str) -> None:
        fired.append(kind)
        (succeeded if kind == "success" else failed).set()

    async with queue.worker():
        b = await queue.batch([fetch.s().then(add, 1), add.s(1, 1), fetch.s().then(add, 2)],
                              on_success=note.s("success"), on_failure=note.s("failure"))
        with anyio.fail_after(10):
            await failed.wait()
        pipeline_ends = [b.members[0], b.members[2]]
        assert [await end.state() for end in pipeline_ends] == [JobState.CANCELLED] * 2
        healthy = True
        assert await b.retry_failed() == 2
        with anyio.fail_after(10):
            await succeeded.wait()
        assert [await end.result(timeout=10) for end in pipeline_ends] == [11, 12]
        assert (await b.state()).succeeded == 3
        assert await b.retry_failed() == 0
    assert fired == ["failure", "success"]


async def test_retry_failed_reruns_the_failed_members_of_a_chord_member(queue: Queue) -> None:
    # The chord's callback failed on a member's error, and the batch counts the callback's end.
    # retry_failed ran the callback again, with that error still among its values (it failed
    # again); it now runs the chord's failed member, whose success runs the callback again. A
    # member of the chord that is a pipeline is retried from its failed step.
    flaky, healthy = flaky_task(queue)
    strict, _ = strict_sum_then_twice(queue)
    add = arithmetic(queue)

    @queue.task
    async def mark(kind: str) -> str:
        return kind

    async with queue.worker():
        inner = chord([flaky.s(1), flaky.s(2).then(add, 10), add.s(1, 2)], strict.s())
        b = await queue.batch([inner, add.s(2, 2)], on_success=mark.s("ok"), on_failure=mark.s("fail"))
        with pytest.raises(TaskError, match="a member failed"):
            await b.members[0].result(timeout=10)
        assert await b.members[1].result(timeout=10) == 4
        assert await b.callback("failure").result(timeout=10) == "fail"
        dead = [d.id for d in await queue.dead_letters() if d.task.endswith("flaky")]
        assert len(dead) == 2
        healthy.append(True)
        assert await b.retry_failed() == 2
        # The two successes may reach the callback one by one: it may fail once more meanwhile.
        with anyio.fail_after(10):
            while await b.callback("success").state() is None:  # noqa: ASYNC110 - no event tells of it
                await anyio.sleep(0.01)
        assert await b.callback("success").result(timeout=10) == "ok"
        assert await b.members.get(timeout=10) == [1 + 12 + 3, 4]
        assert await b.retry_failed() == 0


async def test_skipped_steps_cancelled_steps_and_a_retry_around_pruning(queue: Queue) -> None:
    add = arithmetic(queue)

    @queue.task
    async def broken() -> int:
        raise ValueError("broken")

    # A waiting step cancelled by hand never runs, even when the step before it succeeds.
    kept = await queue.enqueue(add.s(1, 1).then(add, 2))
    assert await kept[1].cancel()
    # A step that ends without running (revoked) skips the rest, whose error names it.
    revoked = await queue.enqueue(add.s(2, 2).then(add, 3))
    assert await revoked[0].revoke()
    failing = await queue.enqueue(broken.s().then(add, 4))
    async with queue.worker():
        assert await kept[0].result(timeout=10) == 2
        with pytest.raises(JobCancelled):
            await failing[1].result(timeout=10)
        with pytest.raises(JobCancelled):
            await revoked[1].result(timeout=10)
    assert await kept[1].state() == JobState.CANCELLED
    info = await revoked[1].info()
    assert info is not None
    assert info.error is not None
    assert (info.error["job_id"], info.error["type"]) == (revoked[0].id, "JobRevoked")

    # Retried, the failed step re-arms the step it skipped; pruning (long after the skipped
    # step's record would have expired) leaves the re-armed step listed.
    assert await queue.retry(failing[0].id)
    assert await failing[1].state() == JobState.SCHEDULED
    await queue.broker.prune(queue.name, time.time() + 3 * 86400, 1000)
    assert failing[1].id in {info.id for info in await queue.jobs(limit=1000)}


async def test_a_member_retried_while_its_batch_or_chord_runs_is_waited_for(queue: Queue) -> None:
    # Retried from the dead letters while the others still ran, a member stayed counted as
    # failed: their ends fired on_complete and on_failure while it ran again (and its success then
    # on_success too), and a chord's callback got its old error.
    healthy = False
    rerunning, retried_may_end, others_may_end = anyio.Event(), anyio.Event(), anyio.Event()
    add = arithmetic(queue)

    @queue.task
    async def flaky(n: int) -> int:
        if not healthy:
            raise ConnectionError("upstream down")
        rerunning.set()
        await retried_may_end.wait()
        return n

    @queue.task
    async def slow(n: int) -> int:
        await others_may_end.wait()
        return n

    @queue.task
    async def collect(values: list[Any]) -> list[Any]:
        return values

    async with queue.worker(concurrency=10):
        b = await queue.batch([flaky.s(1), slow.s(2)], on_success=add.s(0, 1),
                              on_failure=add.s(0, 2), on_complete=add.s(0, 3))
        c = await queue.enqueue(chord([flaky.s(3), slow.s(4)], collect.s()))
        dead = [b.members[0], c.results.jobs[0]]
        for job in dead:
            with pytest.raises(TaskError):
                await job.result(timeout=10)
        healthy = True
        for job in dead:
            assert await queue.retry(job.id)
        with anyio.fail_after(10):
            await rerunning.wait()
        others_may_end.set()
        assert [await job.result(timeout=10) for job in (b.members[1], c.results.jobs[1])] == [2, 4]
        for kind in ("complete", "failure"):
            assert await b.callback(kind).state() is None  # not while a member runs
        retried_may_end.set()
        assert await c.get(timeout=10) == [3, 4]
        assert [await b.callback(kind).result(timeout=10) for kind in ("complete", "success")] == [3, 1]
        assert await b.callback("failure").state() is None


async def fired_with_two_errors(
    queue: Queue, flaky: Any, healthy: list[bool], callback: Any
) -> tuple[ChordResult[Any], Job[Any], Job[Any]]:
    """chord([steady 1, flaky 2, flaky 3], callback), once fired with the two flaky members'
    errors (a worker runs); and those two members, which succeed from now on."""
    steady = steady_task(queue)
    c = await queue.enqueue(chord([steady.s(1), flaky.s(2), flaky.s(3)], callback.s()))
    assert await c.get(timeout=10) == [1, "E", "E"]
    healthy.append(True)
    return c, c.results.jobs[1], c.results.jobs[2]


async def test_a_member_retried_after_its_chord_fired_runs_the_callback_again(queue: Queue) -> None:
    # queue.retry re-evaluates the chord a member belongs to: the callback had run with the
    # member's error in its place, and ran no more once the member succeeded.
    flaky, healthy = flaky_task(queue)
    collect, calls = collecting_task(queue)

    async with queue.worker():
        c, first, second = await fired_with_two_errors(queue, flaky, healthy, collect)
        assert await queue.retry(first.id)
        assert await first.result(timeout=10) == 2
        assert await c.get(timeout=10) == [1, 2, "E"]  # run again, with the new value
        assert await queue.retry(second.id)
        assert await second.result(timeout=10) == 3
        assert await c.get(timeout=10) == [1, 2, 3]
        info = await c.callback.info()
        assert info is not None
        assert info.attempt == 1
    assert calls == [[1, "E", "E"], [1, 2, "E"], [1, 2, 3]]


async def test_a_chord_callback_that_failed_runs_again_out_of_the_dead_letters_with_its_steps(
    queue: Queue,
) -> None:
    flaky, healthy = flaky_task(queue)
    strict, twice = strict_sum_then_twice(queue)

    async with queue.worker():
        c = await queue.enqueue(chord([flaky.s(1), flaky.s(2)], strict.s()).then(twice))
        assert isinstance(c, ChordResult)
        with pytest.raises(TaskError):
            await c.get(timeout=10)
        after = c.pipeline_results.jobs[1]
        assert await after.state() == JobState.CANCELLED  # skipped
        healthy.append(True)
        first, second = c.results.jobs
        assert await queue.retry(first.id)
        assert await first.result(timeout=10) == 1
        with pytest.raises(TaskError, match="a member failed"):  # run again, still with an error
            await c.callback.result(timeout=10)
        assert await queue.retry(second.id)
        assert await second.result(timeout=10) == 2
        assert await after.result(timeout=10) == 6
        assert await c.get(timeout=1) == 3
        assert c.callback.id not in {d.id for d in await queue.dead_letters()}


async def test_a_chord_whose_retried_member_fails_again_is_not_run_again(
    queue: Queue,
) -> None:
    calls: list[list[Any]] = []

    @queue.task
    async def broken() -> None:
        raise ConnectionError("upstream down")

    steady = steady_task(queue)

    @queue.task
    async def collect(values: list[Any]) -> int:
        calls.append(values)
        return len(calls)

    async with queue.worker():
        c = await queue.enqueue(chord([steady.s(1), broken.s()], collect.s()))
        assert await c.get(timeout=10) == 1
        member = c.results.jobs[1]
        assert await queue.retry(member.id)  # fails again: its slot keeps an error
        with pytest.raises(TaskError):
            await member.result(timeout=10)
        assert await c.get(timeout=1) == 1
        assert await c.callback.state() == JobState.SUCCEEDED
    assert len(calls) == 1


async def test_a_member_that_succeeds_while_the_callback_runs_again_runs_it_once_more(
    queue: Queue,
) -> None:
    # Two members retried together: the callback runs again with the first one's value, and the
    # second one succeeds meanwhile. The callback then runs once more, with both; it ended with
    # the second member's error for good, and no member was left to retry.
    flaky, healthy = flaky_task(queue)
    calls: list[list[Any]] = []
    entered, release = anyio.Event(), anyio.Event()

    @queue.task
    async def collect(values: list[Any]) -> list[Any]:
        calls.append(errors_marked(values))
        if len(calls) == 2:
            entered.set()
            await release.wait()
        return calls[-1]

    async with queue.worker():
        c, first, second = await fired_with_two_errors(queue, flaky, healthy, collect)
        assert await queue.retry(first.id)
        with anyio.fail_after(10):
            await entered.wait()
        assert await queue.retry(second.id)
        assert await second.result(timeout=10) == 3
        release.set()
        assert await c.get(timeout=10) == [1, 2, 3]  # the run with [1, 2, "E"] told no one
    assert calls == [[1, "E", "E"], [1, 2, "E"], [1, 2, 3]]
    assert await chords_kept(queue) == []  # no error stands: nothing a retry could change


async def chords_kept(queue: Queue) -> list[Any]:
    """What the broker keeps to fill chords with, in the queue."""
    broker = queue.broker
    if isinstance(broker, MemoryBroker):
        return list(broker._queues[queue.name].chords)
    assert isinstance(broker, RedisBroker)
    return [k async for k in broker.client.scan_iter(match=f"aqueue:{{{queue.name}}}:chord:*")]


async def test_a_member_that_succeeds_before_the_callback_starts_again_gives_it_its_value(
    queue: Queue,
) -> None:
    # The first retried member's success makes the callback ready to run again; the second one
    # succeeds before it starts: it starts with both values. The members are run by hand, as a
    # worker would, so that no worker starts the callback in between.
    c, calls = await a_chord_whose_two_members_failed(queue)
    first, second = c.results.jobs
    assert await queue.retry(first.id)
    assert await queue.retry(second.id)
    await succeed_by_hand(queue, first, b"1")
    await succeed_by_hand(queue, second, b"2")
    assert await c.callback.state() == JobState.PENDING
    async with queue.worker():
        assert await c.get(timeout=10) == [1, 2]
    assert calls == [["E", "E"], [1, 2]]


async def test_a_nested_callback_run_again_replaces_its_error_in_the_outer_chord(queue: Queue) -> None:
    # The inner callback failed on its member's error, and the outer chord got that error; the
    # member's retry runs the inner callback again, and its value re-evaluates the outer chord.
    flaky, healthy = flaky_task(queue)
    strict, _ = strict_sum_then_twice(queue)
    steady = steady_task(queue)
    collect, outer_calls = collecting_task(queue)

    async with queue.worker():
        inner = chord([flaky.s(1), steady.s(2)], strict.s())
        c = await queue.enqueue(chord([inner, steady.s(5)], collect.s()))
        assert await c.get(timeout=10) == ["E", 5]
        healthy.append(True)
        [member] = [d for d in await queue.dead_letters() if d.task.endswith("flaky")]
        assert await queue.retry(member.id)
        assert await queue.job(member.id).result(timeout=10) == 1
        assert await c.results.jobs[0].result(timeout=10) == 3  # the inner callback, run again
        assert await c.get(timeout=10) == [3, 5]
    assert outer_calls == [["E", 5], [3, 5]]


async def succeed_by_hand(queue: Queue, job: Job[Any], value: bytes) -> None:
    """Lease the job (the next one ready) and end it with `value`, as a worker would."""
    [d] = await queue.broker.receive(queue.name, "by-hand", 1, 0, queue.max_deliveries)
    assert d.job_id == job.id
    done = Completion(d, Outcome.SUCCEEDED, time.time(), result=value)
    assert await queue.broker.finish(queue.name, [done], 60) == [True]


async def a_chord_whose_two_members_failed(queue: Queue) -> tuple[ChordResult[Any], list[list[Any]]]:
    """A fired chord of two members that failed (its callback ended with both errors), and the
    values of each run of its callback; the members now succeed when retried."""
    flaky, healthy = flaky_task(queue)
    collect, calls = collecting_task(queue)
    async with queue.worker():
        c = await queue.enqueue(chord([flaky.s(1), flaky.s(2)], collect.s()))
        assert await c.get(timeout=10) == ["E", "E"]
    healthy.append(True)
    return c, calls


async def running_with_old_values(queue: Queue, c: ChordResult[Any], consumer: str) -> Delivery:
    """The chord's callback leased to `consumer` with the first member's value only: the second
    member, retried, has succeeded since, and given the callback new values."""
    first, second = c.results.jobs
    assert await queue.retry(first.id)
    await succeed_by_hand(queue, first, b"1")
    [running] = await queue.broker.receive(queue.name, consumer, 1, 0, queue.max_deliveries)
    assert await queue.retry(second.id)
    await succeed_by_hand(queue, second, b"2")
    return running


async def test_a_late_success_of_a_callback_run_with_old_values_does_not_end_it(queue: Queue) -> None:
    # The callback runs with the first retried member's value; the second one's success gives it
    # new values, and a second delivery (its first worker went silent) runs with them. The first
    # delivery's late success ended the job, with a value made from the old values, and the
    # second delivery's was refused.
    c, _ = await a_chord_whose_two_members_failed(queue)
    old = await running_with_old_values(queue, c, "silent")
    [new] = await queue.broker.reclaim(queue.name, "taker", 1, 0, queue.max_deliveries)
    assert (old.job_id, new.job_id) == (c.callback.id, c.callback.id)
    assert b"[[1,2]]" in new.payload.replace(b" ", b"")
    late = Completion(old, Outcome.SUCCEEDED, time.time(), result=b'"old"')
    assert await queue.broker.finish(queue.name, [late], 60) == [False]
    done = Completion(new, Outcome.SUCCEEDED, time.time(), result=b'"new"')
    assert await queue.broker.finish(queue.name, [done], 60) == [True]
    assert await c.get(timeout=1) == "new"


@pytest.mark.parametrize("ask", ["revoke", "cancel"])
async def test_a_callback_revoked_or_cancelled_as_it_ran_with_old_values_is_not_run_again(
    queue: Queue, ask: str
) -> None:
    # Its run with old values ends (its code did not hear of the cancel): it is run again with
    # the new ones, and that run is revoked or cancelled when met, as a retry would be. The
    # request was dropped, and the callback ran again.
    c, _ = await a_chord_whose_two_members_failed(queue)
    running = await running_with_old_values(queue, c, "runner")
    assert await (c.callback.revoke() if ask == "revoke" else c.callback.cancel())
    done = Completion(running, Outcome.SUCCEEDED, time.time(), result=b'"old"')
    assert await queue.broker.finish(queue.name, [done], 60) == [True]
    [met] = await queue.broker.receive(queue.name, "runner", 1, 0, queue.max_deliveries)
    assert (met.job_id, met.ended) == (c.callback.id, "revoked" if ask == "revoke" else "cancelled")
    assert await c.callback.state() == (JobState.REVOKED if ask == "revoke" else JobState.CANCELLED)


async def a_chord_failed_on_its_member(queue: Queue) -> tuple[ChordResult[Any], list[bool]]:
    """A fired chord of one member that failed, whose callback failed on its error; the member
    succeeds when retried once the list holds something."""
    flaky, healthy = flaky_task(queue)
    strict, _ = strict_sum_then_twice(queue)
    async with queue.worker():
        c = await queue.enqueue(chord([flaky.s(1)], strict.s()))
        with pytest.raises(TaskError, match="a member failed"):
            await c.get(timeout=10)
    return c, healthy


async def waiting_on(queue: Queue, job: Job[Any]) -> bool:
    """Whether a wait on the job's outcome is in place in the broker."""
    broker = queue.broker
    if isinstance(broker, MemoryBroker):
        done = broker._queues[queue.name].done.get(job.id)
        return done is not None and done.event.statistics().tasks_waiting > 0
    assert isinstance(broker, RedisBroker)
    return bool(await broker.client.hget(f"aqueue:{{{queue.name}}}:job:{job.id}", "waiters"))


async def test_a_waiter_gets_the_end_it_woke_for_though_the_job_runs_again_at_once(queue: Queue) -> None:
    # A chord's callback fails, and in the same write a retried member succeeds, which runs the
    # callback again at once: a waiter on the callback gets that failure, as the outcome message
    # tells it on Redis. The memory broker read the record again once woken, found it pending,
    # and raised TimeoutError long before the timeout.
    c, _ = await a_chord_failed_on_its_member(queue)
    member = c.results.jobs[0]
    assert await queue.retry(member.id)
    assert await queue.retry(c.callback.id)
    leased = await queue.broker.receive(queue.name, "by-hand", 2, 0, queue.max_deliveries)
    by_id = {d.job_id: d for d in leased}
    assert set(by_id) == {member.id, c.callback.id}
    seen: list[BaseException] = []

    async def wait() -> None:
        try:
            await c.get(timeout=10)
        except (TaskError, TimeoutError) as exc:
            seen.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        with anyio.fail_after(10):
            while not await waiting_on(queue, c.callback):  # noqa: ASYNC110 - no event tells of it
                await anyio.sleep(0.01)
        now = time.time()
        error = b'{"error": "ValueError()", "type": "ValueError", "traceback": ""}'
        assert await queue.broker.finish(queue.name, [
            Completion(by_id[c.callback.id], Outcome.FAILED, now, error=error, reason="failed"),
            Completion(by_id[member.id], Outcome.SUCCEEDED, now, result=b"1"),
        ], 60) == [True, True]
    [outcome] = seen
    assert isinstance(outcome, TaskError)
    assert outcome.metadata["type"] == "ValueError"
    assert await c.callback.state() == JobState.PENDING  # to run again with the member's value


async def chord_lapsed(queue: Queue, member: Job[Any]) -> bool:
    """Whether what fills the chord `member` belongs to has outlived the time it is kept for."""
    broker = queue.broker
    if isinstance(broker, MemoryBroker):
        q = broker._queues[queue.name]
        chord_id = q.links[member.id].chord
        assert chord_id is not None
        kept = q.chords.get(chord_id)  # looked at, not looked up: that would drop it
        return kept is None or (kept.expires_at is not None and kept.expires_at <= time.time())
    assert isinstance(broker, RedisBroker)
    prefix = f"aqueue:{{{queue.name}}}:"
    chord_id = await broker.client.hget(prefix + "job:" + member.id, "chord")
    return not await broker.client.exists(prefix + "chord:" + chord_id.decode())


async def test_a_member_retried_after_its_chord_lapsed_does_not_run_the_callback_again(
    broker: Broker, queue_name: str
) -> None:
    # What fills a fired chord is kept result_ttl from its firing; past that, a member's retry
    # has nothing to re-evaluate, on either broker (the memory broker ran the callback again).
    queue = Queue(broker=broker, name=queue_name, result_ttl=1)
    c, healthy = await a_chord_failed_on_its_member(queue)
    member = c.results.jobs[0]
    with anyio.fail_after(10):
        while not await chord_lapsed(queue, member):  # noqa: ASYNC110 - an expiry has no event
            await anyio.sleep(0.05)
    healthy.append(True)
    async with queue.worker():
        assert await queue.retry(member.id)
        assert await member.result(timeout=10) == 1
    assert await c.callback.state() == JobState.FAILED


async def test_a_chord_in_a_batch_names_the_batch_to_its_members(queue: Queue) -> None:
    # The chord is the batch member (its callback's end is counted); its members belong to the
    # batch through it, and current_job().batch_id names it inside them too.
    seen: list[tuple[str, str | None]] = []

    @queue.task
    async def part(n: int) -> int:
        seen.append(("part", current_job().batch_id))
        return n

    @queue.task
    async def total(values: list[int]) -> int:
        seen.append(("total", current_job().batch_id))
        return sum(values)

    async with queue.worker():
        b = await queue.batch([chord([part.s(1), part.s(2)], total.s()), part.s(3)])
        assert await b.members.get(timeout=10) == [3, 3]
        state = await b.state()
    assert (state.size, state.succeeded) == (2, 2)
    assert sorted(seen) == sorted([("part", b.id), ("part", b.id), ("total", b.id), ("part", b.id)])


async def test_an_error_handler_after_a_poison_message_gets_the_whole_error(
    broker: Broker, queue_name: str
) -> None:
    q = Queue(broker=broker, name=queue_name, visibility_timeout=1, max_deliveries=2)
    seen: list[dict[str, Any]] = []

    @q.task
    async def work() -> None:
        return None

    @q.task
    async def on_error(exc: TaskError) -> None:
        seen.append(exc.metadata)

    [job] = await q.enqueue(work.s().error(on_error))
    # Two deliveries to workers that die before finishing: the third is one too many.
    assert await broker.receive(q.name, "dead-1", 1, 0, q.max_deliveries)
    assert await broker.reclaim(q.name, "dead-2", 1, 0, q.max_deliveries)
    async with q.worker():
        with pytest.raises(TaskError, match="max_deliveries=2"):
            await job.result(timeout=15)
        await q.job(error_handler_id(job.id)).result(timeout=10)
    [metadata] = seen
    assert set(metadata) == {"error", "type", "traceback", "job_id", "attempt", "retries_left"}
    assert metadata["job_id"] == job.id
    assert "max_deliveries=2" in metadata["error"]


async def test_a_retried_dead_letter_that_fails_again_runs_its_error_handler_again(queue: Queue) -> None:
    add = arithmetic(queue)
    handled: list[tuple[str, str]] = []

    @queue.task
    async def boom(x: int) -> int:
        raise ValueError(f"boom {x}")

    @queue.task
    async def on_error(exc: TaskError, tag: str) -> str:
        handled.append((exc.metadata["error"], tag))
        return tag

    async with queue.worker():
        [job] = await queue.enqueue(boom.s(1).error(on_error, "lone"))
        steps = await queue.enqueue(add.s(1, 1).then(boom).error(on_error, "step"))
        for failed, tag in ((job, "lone"), (steps[1], "step")):
            for failure in (1, 2, 3):  # each failure for good has its own handler
                if failure > 1:
                    assert await queue.retry(failed.id)
                with pytest.raises(TaskError):
                    await failed.result(timeout=10)
                handler = queue.job(error_handler_id(failed.id, failure))
                assert await handler.result(timeout=10) == tag
    assert sorted(handled) == [("ValueError('boom 1')", "lone")] * 3 + [("ValueError('boom 2')", "step")] * 3
    assert error_handler_id(job.id, 1) == error_handler_id(job.id)


async def test_immediate_mode_retry_of_a_dead_letter_that_fails_again_runs_its_handler_again(
    queue: Queue,
) -> None:
    queue.immediate = True
    handled: list[str] = []

    @queue.task
    async def boom() -> None:
        raise ValueError("boom")

    @queue.task
    async def on_error(exc: TaskError) -> None:
        handled.append(exc.metadata["type"])

    [job] = await queue.enqueue(boom.s().error(on_error))
    assert handled == ["ValueError"]
    assert await queue.retry(job.id) is True
    assert handled == ["ValueError"] * 2
    assert await queue.job(error_handler_id(job.id, 2)).state() == JobState.SUCCEEDED


async def test_a_chord_member_cancelled_while_waiting_to_retry_puts_its_cancel_in_its_place(
    queue: Queue,
) -> None:
    # The error of its first attempt is not what ended it: the slot says cancelled, and the
    # record keeps no error of an attempt that did not end it.
    add = arithmetic(queue)

    @queue.task(retries=1, retry_delay=3600)
    async def flaky() -> None:
        raise KeyError("first attempt")

    @queue.task
    async def collect(values: list[Any]) -> list[Any]:
        return [v.metadata["type"] if isinstance(v, TaskError) else v for v in values]

    async with queue.worker():
        c = await queue.enqueue(chord([add.s(1, 1), flaky.s()], collect.s()))
        member = c.results.jobs[1]
        with anyio.fail_after(10):
            # Its first attempt failed once the broker holds it for its retry.
            while await member.state() != JobState.SCHEDULED:  # noqa: ASYNC110 - in the broker
                await anyio.sleep(0.01)
        assert await member.cancel()
        assert await c.get(timeout=10) == [2, "JobCancelled"]
        info = await member.info()
    assert info is not None
    assert (info.state, info.error) == (JobState.CANCELLED, None)


async def test_a_chord_member_cancelled_in_its_second_attempt_puts_its_cancel_in_its_place(
    queue: Queue,
) -> None:
    add = arithmetic(queue)
    second_attempt = anyio.Event()

    @queue.task(retries=1, retry_delay=0)
    async def flaky() -> None:
        if current_job().attempt == 1:
            raise KeyError("first attempt")
        second_attempt.set()
        await anyio.sleep_forever()

    @queue.task
    async def collect(values: list[Any]) -> list[Any]:
        return [v.metadata["type"] if isinstance(v, TaskError) else v for v in values]

    async with queue.worker():
        c = await queue.enqueue(chord([add.s(1, 1), flaky.s()], collect.s()))
        with anyio.fail_after(10):
            await second_attempt.wait()
        member = c.results.jobs[1]
        assert await member.cancel()
        assert await c.get(timeout=10) == [2, "JobCancelled"]
        info = await member.info()
    assert info is not None
    assert (info.state, info.error) == (JobState.CANCELLED, None)


async def test_error_handlers_and_batch_callbacks_keep_their_signatures_options(queue: Queue) -> None:
    add = arithmetic(queue)
    calls: list[str] = []

    @queue.task
    async def broken() -> None:
        raise ValueError("broken for good")

    @queue.task
    async def flaky(*args: object) -> str:  # a handler's first argument is the error
        name = str(args[-1])
        calls.append(name)
        if calls.count(name) == 1:
            raise RuntimeError("once")
        return name

    handled = await queue.enqueue(broken.s().error(flaky.options(retries=1, priority=3).s("handler")))
    b = await queue.batch([add.s(1, 1)], on_success=flaky.options(retries=1, priority=7).s("batch"))
    async with queue.worker():
        with pytest.raises(TaskError):
            await handled[0].result(timeout=10)  # its failure makes its handler
        assert await queue.job(error_handler_id(handled[0].id)).result(timeout=10) == "handler"
        assert await b.callback("success").result(timeout=10) == "batch"
    for job_id, priority in ((error_handler_id(handled[0].id), 3), (b.callback("success").id, 7)):
        record = await queue.broker.get(queue.name, job_id)
        assert record is not None
        assert (record.attempt, record.priority) == (2, priority)  # retried: retries=1 kept
    with pytest.raises(ConfigurationError, match="do not apply"):
        await queue.batch([add.s(1, 1)], on_complete=flaky.options(delay=5).s("late"))
    with pytest.raises(ConfigurationError, match="do not apply"):
        await queue.enqueue(broken.s().error(flaky.options(key="once").s("keyed")))
    with pytest.raises(ConfigurationError, match="of its own"):  # it would be dropped
        await queue.batch([add.s(1, 1)], on_failure=flaky.s("failure").error(flaky, "nested"))


async def test_a_tasks_options_copy_takes_a_tasks_place_in_a_workflow(queue: Queue) -> None:
    add = arithmetic(queue)

    @queue.task
    async def total(values: list[int], plus: int = 0) -> int:
        return sum(values) + plus

    on_error, finished = tagging(queue)

    @queue.task
    async def broken() -> None:
        raise ValueError("broken for good")

    pipe = await queue.enqueue(add.s(1, 2).then(add.options(priority=3), 10))
    chorded = await queue.enqueue(chord([add.s(1, 1), add.s(2, 2)], total.options(priority=4)))
    grouped = await queue.enqueue(group([add.s(3, 3)]).then(total.options(priority=5), plus=1))
    handled = await queue.enqueue(broken.s().error(on_error.options(priority=6), "handled"))
    b = await queue.batch([add.s(1, 1)], on_success=finished.options(priority=7).s("batch"))
    async with queue.worker():
        assert await pipe.get(timeout=10) == [3, 13]
        assert await chorded.get(timeout=10) == 6
        assert await grouped.get(timeout=10) == 7
        with pytest.raises(TaskError):
            await handled[0].result(timeout=10)
        assert await queue.job(error_handler_id(handled[0].id)).result(timeout=10) == "handled"
        assert await b.callback("success").result(timeout=10) == "batch"
    for job_id, priority in ((pipe[1].id, 3), (chorded.callback.id, 4), (grouped.callback.id, 5),
                             (error_handler_id(handled[0].id), 6), (b.callback("success").id, 7)):
        record = await queue.broker.get(queue.name, job_id)
        assert record is not None
        assert record.priority == priority  # the copy's options, not dropped
    with pytest.raises(ConfigurationError, match="wrap the one step in a list"):
        Pipeline(add.options(priority=1))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="wrap the one member in a list"):
        group(add.options(priority=1))  # type: ignore[arg-type]


async def test_an_idempotency_key_in_a_workflow_stands_alone(queue: Queue) -> None:
    add = arithmetic(queue)

    @queue.task
    async def total(values: list[int]) -> int:
        return sum(values)

    @queue.task
    async def on_error(exc: TaskError) -> None:
        return None

    live = await add.options(key="nightly").enqueue(1, 1)
    res = await queue.enqueue(group([add.options(key="nightly").s(1, 1), add.s(2, 2)]))
    assert res[0].id == live.id  # the handle names the live job the key found
    async with queue.worker():
        assert await res.get(timeout=10) == [2, 4]
    keyed = add.options(key="other").s(1, 1)
    # Linked jobs: the live job a key may return would not be linked to the workflow.
    for node in (keyed.then(add, 1), add.s(1, 1).then(add.options(key="k2").s(1)),
                 chord([keyed], total.s()), chord([add.s(1, 1)], total.options(key="k3").s()),
                 add.options(key="k4").s(1, 1).error(on_error)):
        with pytest.raises(ConfigurationError, match="key"):
            await queue.enqueue(node)
    with pytest.raises(ConfigurationError, match="key"):
        await queue.batch([keyed])
    assert len(await queue.jobs()) == 2  # the live job and the group's other: nothing else stored


async def test_a_delay_on_a_job_that_waits_in_a_workflow_is_refused(queue: Queue) -> None:
    # Such a job starts when the one before it ends: its delay was dropped (workers ran it at once,
    # immediate mode never ran it).
    add = arithmetic(queue)

    @queue.task
    async def total(values: list[int]) -> int:
        return sum(values)

    later = datetime(2100, 1, 1, tzinfo=UTC)
    for node in (add.s(1, 1).then(add.options(delay=3).s(1)),
                 add.s(1, 1).then(add, 1).then(add.options(eta=later).s(1)),
                 chord([add.s(1, 1)], total.options(delay=3).s()),
                 chord([add.s(1, 1)], total.s().then(add.options(delay=3).s(1)))):
        with pytest.raises(ConfigurationError, match="delay and eta do not apply"):
            await queue.enqueue(node)
    assert await queue.jobs() == []
    # The first step and chord members are jobs of their own: their delay stands.
    res = await queue.enqueue(chord([add.options(delay=600).s(1, 1)], total.s()))
    assert await res.results.jobs[0].state() == JobState.SCHEDULED


async def test_a_pipeline_longer_than_the_limit_is_refused_with_the_limit(queue: Queue) -> None:
    # Past ~127 steps orjson's nesting limit failed it as "arguments cannot be serialized".
    add = arithmetic(queue)
    longest = add.s(0, 0)
    for _ in range(99):
        longest = longest.then(add, 1)
    async with queue.worker():
        values = await (await queue.enqueue(longest)).get(timeout=30)
    assert (len(values), values[-1]) == (100, 99)
    with pytest.raises(ConfigurationError, match="a pipeline of 101 steps: at most 100"):
        await queue.enqueue(longest.then(add, 1))


async def test_immediate_mode_runs_the_live_job_a_workflow_key_found(queue: Queue) -> None:
    add = arithmetic(queue)
    live = await add.options(key="nightly").enqueue(1, 1)  # stored, not run: not immediate yet
    queue.immediate = True
    res = await queue.enqueue(group([add.options(key="nightly").s(1, 1), add.s(2, 2)]))
    assert res[0].id == live.id
    assert await live.state() == JobState.SUCCEEDED
    assert await res.get(timeout=5) == [2, 4]


async def test_immediate_mode_retry_runs_the_job_and_what_its_success_sets_going(queue: Queue) -> None:
    queue.immediate = True
    fixed: list[bool] = []
    handled: list[str] = []

    @queue.task
    async def fetch() -> int:
        if not fixed:
            raise ValueError("down")
        return 1

    @queue.task
    async def double(x: int) -> int:
        return 2 * x

    @queue.task
    async def note(kind: str) -> None:
        handled.append(kind)

    @queue.task
    async def broken(x: int) -> None:
        raise ValueError("broken for good")

    @queue.task
    async def on_error(exc: TaskError, step: str) -> None:
        handled.append(f"{step} failed")

    b = await queue.batch([fetch.s().then(double).then(double)], on_success=note.s("success"))
    res = await queue.enqueue(fetch.s().then(broken.s().error(on_error, "second step")))
    dead = {info.id for info in await queue.dead_letters()}
    assert len(dead) == 2  # the first step of each pipeline
    assert res[0].id in dead
    assert handled == []
    fixed.append(True)
    for job_id in sorted(dead):  # each runs here, with the steps after it and what they set going
        assert await queue.retry(job_id) is True
    assert [await job.result(timeout=0) for job in b.members] == [4]
    assert sorted(handled) == ["second step failed", "success"]


async def test_immediate_mode_retry_of_a_chord_member_runs_the_callbacks_again(queue: Queue) -> None:
    # A pipeline member ends with its last step, whose chord is the one re-evaluated. Nested, the
    # inner chord's callback runs again, and the outer chord keeps the value it was given (its
    # own member's retry runs its callback again).
    queue.immediate = True
    flaky, healthy = flaky_task(queue)

    @queue.task
    async def plus(n: int, more: int) -> int:
        return n + more

    @queue.task
    async def shown(values: list[Any]) -> list[Any]:
        return errors_marked(values)

    inner = chord([flaky.s(1), flaky.s(2).then(plus, 10)], shown.s())
    c = await queue.enqueue(chord([inner, flaky.s(3)], shown.s()))
    assert await c.get(timeout=0) == [["E", "E"], "E"]
    healthy.append(True)
    for info in sorted(await queue.dead_letters(), key=lambda d: d.args):
        assert await queue.retry(info.id) is True
    assert await c.results.jobs[0].result(timeout=0) == [1, 12]
    assert await c.get(timeout=0) == [["E", "E"], 3]


async def test_immediate_mode_retry_of_a_chord_member_runs_the_steps_its_callback_skipped(
    queue: Queue,
) -> None:
    queue.immediate = True
    flaky, healthy = flaky_task(queue)
    strict, twice = strict_sum_then_twice(queue)

    c = await queue.enqueue(chord([flaky.s(1)], strict.s()).then(twice))
    assert isinstance(c, ChordResult)
    after = c.pipeline_results.jobs[1]
    assert await after.state() == JobState.CANCELLED  # skipped
    healthy.append(True)
    assert await queue.retry(c.results.jobs[0].id) is True
    assert await after.result(timeout=0) == 2


async def test_immediate_mode_runs_a_whole_workflow_inside_enqueue(queue: Queue) -> None:
    # Every job a workflow sets going runs before enqueue returns: pipeline steps, a chord's
    # callback (stored before its members), an error handler, a batch's callbacks.
    queue.immediate = True
    add = arithmetic(queue)
    handled: list[str] = []

    @queue.task
    async def total(values: list[int]) -> int:
        return sum(values)

    @queue.task
    async def broken() -> None:
        raise ValueError("broken for good")

    @queue.task
    async def on_error(exc: TaskError) -> None:
        handled.append(exc.metadata["type"])

    @queue.task
    async def note(kind: str) -> None:
        handled.append(kind)

    res = await queue.enqueue(add.s(1, 2).then(add, 3).then(add, 4))
    assert [await job.state() for job in res] == [JobState.SUCCEEDED] * 3
    assert await res.get(timeout=5) == [3, 6, 10]

    c = await queue.enqueue(chord([add.s(i, i) for i in range(3)], total.s()))
    assert await c.callback.state() == JobState.SUCCEEDED
    assert await c.get(timeout=5) == 6

    await queue.enqueue(broken.s().error(on_error))
    assert handled == ["ValueError"]

    b = await queue.batch([add.s(1, 1), broken.s()], on_failure=note.s("failure"),
                          on_complete=note.s("complete"), on_success=note.s("success"))
    assert sorted(handled[1:]) == ["complete", "failure"]
    assert (await b.state()).unfinished == 0


async def test_a_chord_with_then_raises_its_failed_callbacks_own_error(queue: Queue) -> None:
    @queue.task
    async def member(n: int) -> int:
        return n

    @queue.task
    async def boom(values: list[int]) -> int:
        raise ValueError("callback failed")

    @queue.task
    async def after(total: int) -> int:
        return total

    async with queue.worker():
        c = await queue.enqueue(chord([member.s(1), member.s(2)], boom.s()).then(after))
        assert isinstance(c, ChordResult)
        with pytest.raises(TaskError) as caught:  # not the JobCancelled of the skipped step
            await c.get(timeout=10)
    assert caught.value.metadata["type"] == "ValueError"


async def test_then_and_error_leave_the_keywords_task_and_handler_to_the_task(queue: Queue) -> None:
    @queue.task
    async def first() -> None:
        return None

    @queue.task
    async def log(task: str = "", handler: str = "") -> str:
        return f"{task}/{handler}"

    async with queue.worker():
        res = await queue.enqueue(first.s().then(log, task="t", handler="h"))
        assert await res.get(timeout=10) == [None, "t/h"]
    handled = first.s().error(log, task="t", handler="h")
    assert handled.on_error is not None
    assert handled.on_error.kwargs == {"task": "t", "handler": "h"}


async def test_a_batch_takes_a_bare_task_as_its_callback(queue: Queue) -> None:
    done = anyio.Event()

    @queue.task
    async def member() -> None:
        return None

    @queue.task
    async def on_success() -> None:
        done.set()

    async with queue.worker():
        await queue.batch([member.s()], on_success=on_success)
        with anyio.fail_after(10):
            await done.wait()
    with pytest.raises(ConfigurationError, match="expected a task or a signature"):
        await queue.batch([member.s()], on_complete="on_success")  # type: ignore[arg-type]


async def test_a_workflow_refuses_a_task_of_another_queue(queue: Queue) -> None:
    other = Queue(broker=queue.broker, name=f"{queue.name}-other")

    @queue.task
    async def here(n: int) -> int:
        return n

    @other.task
    async def elsewhere(n: int) -> int:
        return n

    for workflow in (elsewhere.s(1), here.s(1).then(elsewhere), chord([here.s(1)], elsewhere.s()),
                     here.s(1).error(elsewhere)):
        with pytest.raises(ConfigurationError, match="is a task of queue"):
            await queue.enqueue(workflow)
    with pytest.raises(ConfigurationError, match="is a task of queue"):
        await queue.batch([here.s(1)], on_failure=elsewhere.s())
    assert await queue.jobs() == []  # nothing stored on the way


async def test_a_chords_error_handler_is_its_callbacks_and_a_steps_own_handler_is_kept(queue: Queue) -> None:
    add = arithmetic(queue)

    @queue.task
    async def total(values: list[int]) -> int:
        if sum(values) > 100:
            raise ValueError("too much")
        return sum(values)

    @queue.task
    async def boom(x: int) -> int:
        raise ValueError(f"boom {x}")

    @queue.task
    async def on_error(exc: TaskError, tag: str) -> str:
        return tag

    async def handled(job: Job[Any]) -> str | None:
        """The tag of the handler the job's failure created; None if it created none."""
        with pytest.raises(TaskError):
            await job.result(timeout=10)
        handler = queue.job(error_handler_id(job.id))
        # Created by the step that ended the job, or never.
        return await handler.result(timeout=10) if await handler.state() is not None else None

    async with queue.worker():
        # As in Huey: the handler is the callback's, not the steps `then()` adds after it.
        after = await queue.enqueue(chord([add.s(1, 2)], total.s()).then(boom).error(on_error, "chord"))
        assert await after.get(timeout=10) == 3
        assert await handled(after.pipeline_results[1]) is None
        failing = await queue.enqueue(chord([add.s(100, 2)], total.s()).then(boom).error(on_error, "chord"))
        assert await handled(failing.callback) == "chord"
        assert await failing.pipeline_results[1].state() == JobState.CANCELLED  # skipped
        # A pipeline-wide handler fills in the steps that have none of their own.
        own = await queue.enqueue(boom.s(1).error(on_error, "own").then(add, 1).error(on_error, "all"))
        assert await handled(own[0]) == "own"
        rest = await queue.enqueue(add.s(1, 1).error(on_error, "own").then(boom).error(on_error, "all"))
        assert await handled(rest[1]) == "all"
        members = await queue.enqueue(
            group([boom.s(3).error(on_error, "own"), boom.s(4)]).error(on_error, "all"))
        assert [await handled(job) for job in members] == ["own", "all"]
        inner = chord([add.s(100, 2)], total.s().error(on_error, "own"))
        chords = await queue.enqueue(group([inner, chord([add.s(100, 3)], total.s())]).error(on_error, "all"))
        assert [await handled(job) for job in chords] == ["own", "all"]


def test_workflows_refuse_what_is_not_a_list_of_steps_or_members(queue: Queue) -> None:
    add = arithmetic(queue)
    with pytest.raises(ConfigurationError, match="at least one step"):
        Pipeline([])
    with pytest.raises(ConfigurationError, match="wrap the one step in a list"):
        Pipeline(add.s(1, 1))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="expected a task or a signature"):
        Pipeline([add.s(1, 1), "add"])  # type: ignore[list-item]
    assert [step.task for step in Pipeline([add]).steps] == [add]  # a task is its signature
    with pytest.raises(ConfigurationError, match="at least one step"):
        chord([add.s(1, 1)], Pipeline([]))
    with pytest.raises(ConfigurationError, match="a group takes a list of members"):
        group(add.s(1, 1))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="a chord takes a list of members"):
        chord(add.s(1, 1), add)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"a group member is a signature .* not 'add'"):
        group([add.s(1, 1), "add"])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match=r"a chord member is a signature .* not <"):
        chord([add], add)  # type: ignore[list-item]
    # A member stands for one value: a group inside a group gave only its last member's.
    for make in (group, lambda members: chord(members, add)):
        with pytest.raises(ConfigurationError, match="not a group: list the group's members"):
            make([group([add.s(1, 1), add.s(2, 2)]), add.s(3, 3)])


async def test_a_batch_refuses_what_is_not_a_list_of_members(queue: Queue) -> None:
    add = arithmetic(queue)
    for lone in (add.s(1, 1), add.s(1, 1).then(add, 1), group([add.s(1, 1)])):
        with pytest.raises(ConfigurationError, match="a batch takes a list of members"):
            await queue.batch(lone)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"a batch member is .* not a group"):
        await queue.batch([group([add.s(1, 1)])])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="at least one member"):
        await queue.batch([])
    assert await queue.jobs() == []  # nothing was stored


async def test_a_waiting_steps_expiry_counts_from_when_its_workflow_is_due(queue: Queue) -> None:
    # Not from the enqueue: a later step's, from its first step's delay or eta; a chord
    # callback's, from the latest of its members' (a callback cannot be ready before then).
    add = arithmetic(queue)

    async def record(job: Job[Any]) -> JobRecord:
        found = await queue.broker.get(queue.name, job.id)
        assert found is not None
        return found

    steps = await queue.enqueue(add.options(delay=3600).s(1, 1).then(add.options(expires=60).s(1))
                                .then(add.options(expires=30).s(1)))
    first, second, third = [await record(job) for job in steps]
    assert first.eta == pytest.approx(first.enqueued_at + 3600, abs=1e-3)
    assert second.expires == pytest.approx(first.eta + 60, abs=1e-3)
    assert third.expires == pytest.approx(first.eta + 30, abs=1e-3)

    c = await queue.enqueue(chord([add.options(delay=100).s(1, 1), add.options(delay=200).s(2, 2).then(add, 1),
                                   chord([add.options(delay=300).s(3, 3)], add.options(expires=10).s(1))],
                                  add.options(expires=60).s(1)))
    enqueued = (await record(c.callback)).enqueued_at
    assert (await record(c.results[2])).expires == pytest.approx(enqueued + 300 + 10, abs=1e-3)
    assert (await record(c.callback)).expires == pytest.approx(enqueued + 300 + 60, abs=1e-3)

    # With no delay the workflow is due at its enqueue, as before.
    undelayed = await queue.enqueue(add.s(1, 1).then(add.options(expires=60).s(1)))
    second = await record(undelayed[1])
    assert second.expires == pytest.approx(second.enqueued_at + 60, abs=1e-3)
