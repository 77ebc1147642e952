"""Hostile input: whatever lands in a queue, the worker never crashes, never imports or evaluates
it, and every bad message ends in the dead letters with a reason."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aqueue import JobState, PayloadTooLarge, Queue, SerializationError
from aqueue.brokers import Broker, MemoryBroker, NewJob, RedisBroker
from tests.conftest import RedisServer

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(orjson.dumps),
    st.fixed_dictionaries({"args": json_values, "kwargs": json_values}).map(orjson.dumps),
    st.fixed_dictionaries({"args": st.lists(json_values, max_size=3),
                           "kwargs": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
                           "options": json_values}).map(orjson.dumps),
)
task_names = (
    st.sampled_from(["victim", "os.system", "builtins.eval", "subprocess.call", ""]) | st.text(max_size=30)
)


async def _throw(broker: Broker, messages: list[tuple[str, bytes]]) -> None:
    queue = Queue(broker=broker, name=f"hostile-{uuid.uuid4().hex[:8]}")

    @queue.task(name="victim")
    async def victim(*args: Any, **kwargs: Any) -> str:
        return "ran"

    jobs = [NewJob(id=uuid.uuid4().hex, task=task, payload=payload, enqueued_at=time.time())
            for task, payload in messages]
    async with queue:
        await broker.enqueue(queue.name, jobs)
        async with queue.worker() as worker:
            with anyio.fail_after(30):
                for job in jobs:
                    await broker.wait(queue.name, job.id, None)
            # The worker is alive and well: a good job still runs.
            assert await (await victim.enqueue(1, x=2)).result(timeout=10) == "ran"
        dead = {d.id: d for d in await queue.dead_letters(limit=1000)}
        for job in jobs:
            info = await queue.job(job.id).info()
            assert info is not None
            if info.state == JobState.SUCCEEDED:
                assert job.task == "victim"  # only a registered task ever runs
            else:
                assert info.state == JobState.FAILED
                assert dead[job.id].dead_reason  # with the reason
    assert worker.jobs_done >= 1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(task_names, payloads), min_size=1, max_size=15))
def test_random_messages_never_crash_the_worker_memory(messages: list[tuple[str, bytes]]) -> None:
    anyio.run(_throw, MemoryBroker(), messages)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(task_names, payloads), min_size=1, max_size=15))
def test_random_messages_never_crash_the_worker_redis(
    redis_server: RedisServer, messages: list[tuple[str, bytes]]
) -> None:
    async def run() -> None:
        broker = RedisBroker(redis_server.url)
        try:
            await _throw(broker, messages)
        finally:
            await broker.close()

    anyio.run(run)


async def test_dotted_paths_are_never_imported(queue: Queue, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    imported: list[str] = []
    real_import = importlib.import_module
    monkeypatch.setattr(
        importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a)
    )
    bad = [NewJob(id=uuid.uuid4().hex, task=name, payload=b'{"args":["echo pwned"],"kwargs":{}}',
                  enqueued_at=time.time()) for name in ("os.system", "builtins.eval", "pickle.loads")]
    await queue.broker.enqueue(queue.name, bad)
    async with queue.worker():
        with anyio.fail_after(10):
            for job in bad:
                await queue.broker.wait(queue.name, job.id, None)
    assert imported == []
    reasons = {d.id: d.dead_reason for d in await queue.dead_letters()}
    assert all("unknown task" in str(reasons[job.id]) for job in bad)


async def test_a_task_name_with_a_line_break_forges_no_log_line(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # Another writer's job, its task named with a line break: the dead letter's log line showed
    # it as it was, a line of the writer's choosing after it.
    forged = "x\n2026-01-01 INFO aqueue: user admin logged in"
    line = await _dead_letter_line(queue, caplog, forged)
    assert "\n" not in line
    assert repr(forged) in line


async def test_a_huge_job_id_of_a_known_task_is_dead_lettered_unrun(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # Another writer's job with a 1 MB id and a task the worker knows: it ran, and each line of
    # its failures and retries carried the whole id.
    @queue.task(retries=1)
    async def known() -> None:
        pytest.fail("ran under an id no producer of aqueue's can give")

    line = await _dead_letter_line(queue, caplog, "known", job_id="J" * 1_000_000)
    assert "a job id of 1000000 characters: at most 1024 bytes" in line
    assert max(len(r.getMessage()) for r in caplog.records) < 4_000


async def _dead_letter_line(
    queue: Queue, caplog: pytest.LogCaptureFixture, task: str, job_id: str | None = None
) -> str:
    """The log line of the dead letter that a job another writer stored under `task` makes."""
    caplog.set_level(logging.INFO, logger="aqueue")
    job = NewJob(id=job_id or uuid.uuid4().hex, task=task, payload=b'{"args":[],"kwargs":{}}',
                 enqueued_at=time.time())
    await queue.broker.enqueue(queue.name, [job])
    async with queue.worker():
        with anyio.fail_after(10):
            await queue.broker.wait(queue.name, job.id, None)
    [line] = [r.getMessage() for r in caplog.records if "sent to the dead letters" in r.getMessage()]
    return line


async def test_a_huge_task_name_is_cut_in_the_log_and_the_dead_letters_reason(
    queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # Another writer's job whose task name is 1 MB: its dead letter's log line and reason were
    # as long (twice, the reason quoting the name too). Our own names are at most 1,024 bytes.
    line = await _dead_letter_line(queue, caplog, "T" * 1_000_000)
    assert len(line) < 4_000
    assert "T" * 1024 + "[... 998976 characters cut]" in line
    [letter] = await queue.dead_letters()
    assert letter.dead_reason is not None
    assert len(letter.dead_reason) < 2_000
    assert letter.dead_reason.startswith("unknown task 'TTT")


async def test_hostile_arguments_fail_at_enqueue(queue: Queue) -> None:
    @queue.task
    async def take(*args: Any) -> None:
        return None

    nested: Any = []
    for _ in range(300):
        nested = [nested]
    with pytest.raises(SerializationError):
        await take.enqueue(nested)  # deeper than JSON encoding allows
    with pytest.raises(PayloadTooLarge):
        await take.enqueue(*range(200_000))  # a huge argument count is a huge payload
    with pytest.raises(SerializationError):
        await take.enqueue(2**70)  # beyond 64-bit integers
    with pytest.raises(SerializationError):
        await take.enqueue(lambda: None)
    assert await queue.jobs() == []
