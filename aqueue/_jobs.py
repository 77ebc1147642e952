"""Job handles, their recorded state, and groups of results."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import anyio

from aqueue._background import Background
from aqueue._exceptions import (
    BrokerConnectionError,
    JobCancelled,
    JobExpired,
    JobNotFound,
    JobRevoked,
    TaskError,
)
from aqueue._serialization import loads
from aqueue._signals import Signal, SignalJob
from aqueue._states import JobState
from aqueue._time import Seconds, timedelta_or_seconds, to_datetime

if TYPE_CHECKING:
    from aqueue._queue import Queue
    from aqueue.brokers import JobRecord

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A snapshot of a job's record. Times are timezone-aware UTC datetimes."""

    id: str
    task: str
    state: JobState
    args: list[Any]
    kwargs: dict[str, Any]
    attempt: int
    progress: dict[str, Any] | None
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    error: dict[str, Any] | None
    """The last error's metadata (as in `TaskError.metadata`), also while a retry waits."""
    worker: str | None
    dead_reason: str | None = None
    """Why the job is in the dead letters, when it is."""

    @classmethod
    def from_record(cls, record: JobRecord) -> JobInfo:
        try:
            call = loads(record.payload) if record.payload else {}
        except ValueError:
            call = {}  # an undecodable payload is still listed (it sits in the dead letters)
        if not isinstance(call, dict):
            call = {}
        args, kwargs = call.get("args"), call.get("kwargs")
        return cls(
            id=record.id,
            task=record.task,
            state=JobState(record.state),
            args=args if isinstance(args, list) else [],
            kwargs=kwargs if isinstance(kwargs, dict) else {},
            attempt=record.attempt,
            progress=loads(record.progress) if record.progress else None,
            enqueued_at=to_datetime(record.enqueued_at),
            started_at=to_datetime(record.started_at),
            finished_at=to_datetime(record.finished_at),
            result=loads(record.result) if record.result else None,
            error=loads(record.error) if record.error else None,
            worker=record.worker,
            dead_reason=record.dead_reason,
        )


def outcome(record: JobRecord) -> Any:
    """The value of a finished job, or the error that stands for its outcome."""
    state = record.state
    if state == JobState.SUCCEEDED:
        return loads(record.result) if record.result else None
    if state == JobState.FAILED:
        metadata = loads(record.error) if record.error else {}
        metadata.setdefault("job_id", record.id)
        metadata.setdefault("error", record.dead_reason or "failed")
        metadata.setdefault("type", "")
        metadata.setdefault("traceback", "")
        metadata.setdefault("attempt", record.attempt)
        metadata.setdefault("retries_left", 0)
        if record.dead_reason:
            metadata.setdefault("reason", record.dead_reason)
        raise TaskError(metadata)
    if state == JobState.CANCELLED:
        raise JobCancelled(f"job {record.id} was cancelled", job_id=record.id)
    if state == JobState.REVOKED:
        raise JobRevoked(f"job {record.id} was revoked", job_id=record.id)
    if state == JobState.EXPIRED:
        raise JobExpired(f"job {record.id} expired before it ran", job_id=record.id)
    raise AssertionError(f"job {record.id} is not finished ({state})")


class Job(Generic[R]):
    """A handle on one job. `queue.job(id)` and the handle `enqueue` returns are interchangeable."""

    __slots__ = ("id", "queue")

    def __init__(self, queue: Queue, job_id: str) -> None:
        self.queue = queue
        self.id = job_id

    def __repr__(self) -> str:
        return f"<Job {self.id} on {self.queue.name!r}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and (other.queue.name, other.id) == (self.queue.name, self.id)

    def __hash__(self) -> int:
        return hash((self.queue.name, self.id))

    async def result(self, timeout: Seconds | None = None) -> R:
        """The job's value, waiting up to `timeout` seconds (None: forever) for it to finish.

        Raises `TaskError` (failed), `JobCancelled`, `JobRevoked`, `JobExpired`, `JobNotFound`
        (unknown id: at once) or `TimeoutError` (not finished in time). A wait rides through Redis
        being out of reach for a while: `BrokerConnectionError` if it still is when the timeout
        passes (`TimeoutError` if Redis does not answer at all), or, with no timeout, once its
        tries have failed for 30 s in a row.
        """
        timeout = timedelta_or_seconds(timeout)
        record = await self.queue.broker.wait(self.queue.name, self.id, timeout)
        if record is None:
            raise JobNotFound(f"no job {self.id} on queue {self.queue.name!r}", job_id=self.id)
        if record.state not in _FINAL:
            raise TimeoutError(f"job {self.id} did not finish within {timeout}s ({record.state})")
        return cast(R, outcome(record))

    async def state(self) -> JobState | None:
        [state] = await self.queue.broker.get_states(self.queue.name, [self.id])
        return None if state is None else JobState(state)

    async def info(self) -> JobInfo | None:
        record = await self.queue.broker.get(self.queue.name, self.id)
        return None if record is None else JobInfo.from_record(record)

    async def cancel(self) -> bool:
        """Cancel the job: a waiting one never runs; a running one is stopped within a second (its
        cancel scope is cancelled, its cleanup runs) and ends `cancelled`, neither retried nor run
        again. False when the job is unknown or already finished."""
        queue = self.queue
        verdict = await queue.broker.cancel(queue.name, self.id, time.time(), queue.result_ttl)
        # Ended here, it never reaches a worker to say so (a running one's worker says it).
        if verdict == JobState.CANCELLED and queue.signals.wants(Signal.CANCELLED):
            record = await queue.broker.get(queue.name, self.id)
            await queue.signals.send(Signal.CANCELLED, SignalJob(self.id, record.task if record else ""))
        return verdict is not None

    async def revoke(self) -> bool:
        """Revoke the job: when a worker meets it, it ends `revoked` instead of running. A job
        already running runs on (`cancel()` stops it); a retry of it is revoked when met.
        False when the job is unknown or already finished."""
        return await self.queue.broker.revoke(self.queue.name, self.id, True)

    async def restore(self) -> bool:
        """Undo `revoke`: the job runs when met. False when unknown or already finished."""
        return await self.queue.broker.revoke(self.queue.name, self.id, False)

    async def is_revoked(self) -> bool:
        """Whether the job, or its whole task, is revoked."""
        record = await self.queue.broker.get(self.queue.name, self.id)
        task = record.task if record is not None else ""
        return await self.queue.broker.revoked(self.queue.name, self.id, task, time.time())


_FINAL = {s.value for s in JobState if s.is_final}
READ_CHUNK = 200  # records a group reads at a time
FIRST_READ_AT_LEAST = 0.5  # seconds a group's read of its records may take, whatever its timeout


class ResultGroup(Generic[R]):
    """Several jobs whose values are wanted together, in order."""

    def __init__(self, jobs: Sequence[Job[R]]) -> None:
        self.jobs: list[Job[R]] = list(jobs)

    def __repr__(self) -> str:
        where = f" on {self.jobs[0].queue.name!r}" if self.jobs else ""
        return f"<ResultGroup of {len(self.jobs)} job(s){where}>"

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job[R]]:
        return iter(self.jobs)

    def __getitem__(self, index: int) -> Job[R]:
        return self.jobs[index]

    async def get(self, timeout: Seconds | None = None) -> list[R]:
        """Every job's value in order; raises the first error met, like `Job.result`."""
        # Each job waits out what is left of the group's time, as `Job.result` waits: a job that
        # has finished is read even when no time is left.
        seconds = timedelta_or_seconds(timeout)
        deadline = None if seconds is None else anyio.current_time() + seconds
        values = []
        # The jobs that had ended give their outcomes from one read of a chunk of them at a time
        # (per queue, as its first job of the chunk comes: an error met before it is raised without
        # waiting for that queue's broker); only the others are waited for, or found missing, one
        # by one.
        for start in range(0, len(self.jobs), READ_CHUNK):
            jobs = self.jobs[start:start + READ_CHUNK]
            found: list[JobRecord | None] = [None] * len(jobs)
            unread = {id(queue): (queue, places) for queue, places in _by_queue(jobs)}
            for at, job in enumerate(jobs):
                if (queue_and_places := unread.pop(id(job.queue), None)) is not None:
                    left = _time_left(deadline)
                    await _read_at_once(found, jobs, *queue_and_places, left)
                record = found[at]
                if record is not None and record.state in _FINAL:
                    values.append(cast(R, outcome(record)))
                    continue
                left = _time_left(deadline)
                values.append(await job.result(timeout=left))
        return values

    async def as_completed(self, timeout: Seconds | None = None) -> AsyncIterator[R]:
        """Values in the order the jobs finish; raises the first error met."""
        # The jobs that had ended come first, from one read of them all, in the order they ended.
        # The others are waited for by tasks of their own, not a task group: a generator must not
        # yield inside a cancel scope.
        seconds = timedelta_or_seconds(timeout)
        deadline = None if seconds is None else anyio.current_time() + seconds
        records = await _records_at_once(self.jobs, seconds)
        ended = sorted((r for r in records if r is not None and r.state in _FINAL),
                       key=lambda r: r.finished_at or 0.0)
        left = _time_left(deadline)
        waiters = [Background(job.result(timeout=left))
                   for job, record in zip(self.jobs, records, strict=True)
                   if record is None or record.state not in _FINAL]
        del records  # (what is left of them is in `ended`)
        for waiter in waiters:  # once one error is raised, the others' are read here, not logged
            waiter.task.add_done_callback(_read_outcome)    # by asyncio as never retrieved
        try:
            for record in ended:
                yield cast(R, outcome(record))
            for next_done in asyncio.as_completed([waiter.task for waiter in waiters]):
                yield cast(R, await next_done)
        finally:
            for waiter in waiters:
                waiter.cancel()


async def _records_at_once(jobs: Sequence[Job[Any]], seconds: float | None) -> list[JobRecord | None]:
    """The jobs' records, each queue's read as `_read_at_once` reads it, all within one bound."""
    found: list[JobRecord | None] = [None] * len(jobs)
    with anyio.move_on_after(_read_bound(seconds)):
        for queue, places in _by_queue(jobs):
            await _read_at_once(found, jobs, queue, places, None)
    return found


async def _read_at_once(
    found: list[JobRecord | None], jobs: Sequence[Job[Any]], queue: Queue, places: list[int],
    seconds: float | None,
) -> None:
    """Into `found`, the records of `queue`'s jobs at `places`, as far as its broker answers
    within `seconds` (half a second at least: the time a wait takes to read a record once its
    timeout has passed). A job whose record was not read, its broker out of reach or slow, is then
    waited for on its own, as `Job.result` waits: within the time given, and riding through Redis
    out of reach."""
    with anyio.move_on_after(_read_bound(seconds)):
        with contextlib.suppress(BrokerConnectionError):
            await _read_records(found, jobs, queue, places)


def _read_bound(seconds: float | None) -> float | None:
    """What a group's read of its records may take: its time, half a second at least."""
    return None if seconds is None else max(seconds, FIRST_READ_AT_LEAST)


async def states_of(jobs: Sequence[Job[Any]]) -> list[JobState | None]:
    """The jobs' states as they stand, in order (None: no record), each queue's read together
    (a broker's `get_states`), without the rest of the records."""
    found: list[JobState | None] = [None] * len(jobs)
    for queue, places in _by_queue(jobs):
        states = await queue.broker.get_states(queue.name, [jobs[at].id for at in places])
        for at, state in zip(places, states, strict=True):
            found[at] = None if state is None else JobState(state)
    return found


def _by_queue(jobs: Sequence[Job[Any]]) -> Iterator[tuple[Queue, list[int]]]:
    """Each queue among the jobs, with the places of its jobs."""
    by_queue: dict[int, tuple[Queue, list[int]]] = {}
    for at, job in enumerate(jobs):
        by_queue.setdefault(id(job.queue), (job.queue, []))[1].append(at)
    return iter(by_queue.values())


async def _read_records(
    found: list[JobRecord | None], jobs: Sequence[Job[Any]], queue: Queue, places: list[int]
) -> None:
    """Into `found`, the records of the jobs at `places` (all of `queue`), a chunk at a time
    (a broker's `get_many`), each without its payload, which no caller reads: a chunk's payloads
    are all that is held at once."""
    for start in range(0, len(places), READ_CHUNK):
        chunk = places[start:start + READ_CHUNK]
        records = await queue.broker.get_many(queue.name, [jobs[at].id for at in chunk])
        for at, record in zip(chunk, records, strict=True):
            found[at] = None if record is None else replace(record, payload=b"")


def _time_left(deadline: float | None) -> float | None:
    """Seconds to an `anyio.current_time()` deadline, none below 0; None for none."""
    return None if deadline is None else max(0.0, deadline - anyio.current_time())


def _read_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
