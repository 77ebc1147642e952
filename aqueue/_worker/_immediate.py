"""Immediate mode: `enqueue` runs its jobs to their end, retries included, before it returns, and
with them whatever they set going: the next pipeline step, a chord's callback, an error handler,
a batch's callbacks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from aqueue._states import JobState
from aqueue._worker._executor import (
    RunningJob,
    announce_written,
    check_links,
    decode_call,
    execute,
    report_ended,
    written_signal,
)
from aqueue.brokers._base import BATCH_CALLBACK_KINDS, batch_callback_id, error_handler_id

if TYPE_CHECKING:
    from aqueue._queue import Queue
    from aqueue.brokers._base import JobRecord

CONSUMER = "immediate"


async def run_immediately(queue: Queue, job_ids: Sequence[str], later: Sequence[str] = ()) -> None:
    """Run exactly these jobs here, each to its end (waiting out retry delays). A job that waits
    on a workflow runs once another has activated it; `later` are ids the broker may create as
    these jobs end (error handlers, batch callbacks), run if they appear. Other jobs of the queue
    are left alone."""
    may_appear = set(later)
    left = [*job_ids, *later]
    while left:
        # Each pass runs every job that is ready; one that ran nothing leaves the rest waiting
        # on something outside these jobs (a delay, another producer's job), which is not ours.
        waiting = [job_id for job_id in left if not await _run(queue, job_id, job_id in may_appear)]
        if len(waiting) == len(left):
            return
        left = waiting


def retry_follow_ups(record: JobRecord) -> tuple[list[str], str | None, list[str]]:
    """For a dead letter retried in immediate mode, from its record: the pipeline steps after it
    (its success runs them again); the callback of the chord whose member it ends (the chord's
    re-evaluation runs it again if it ran before); and the jobs its end or theirs may create
    (error handlers, its batch's callbacks)."""
    job_id = record.id
    options = _workflow_options(record.payload)
    steps: list[str] = []
    callback = options.get("chord_callback")
    following = options.get("next")
    while following:
        steps.append(following["id"])
        step_options = _checked(following["options"])
        callback = step_options.get("chord_callback")
        following = step_options.get("next")
    # Its next failure's handler; the skipped steps after it have not failed yet.
    may_appear = [error_handler_id(job_id, record.failures + 1), *map(error_handler_id, steps)]
    batch = options.get("batch_id")
    if batch:
        may_appear += [batch_callback_id(batch, kind) for kind in BATCH_CALLBACK_KINDS]
    return steps, callback, may_appear


def _workflow_options(payload: bytes) -> dict[str, Any]:
    """A payload's options, as `execute` reads them. Another writer's malformed payload (the
    dead letter retried may be one) sets nothing going: its job is dead-lettered again as it
    runs, before its code runs."""
    try:
        return decode_call(payload)[2]
    except (ValueError, TypeError, KeyError):
        return {}


def _checked(options: Any) -> dict[str, Any]:
    """`options` if its workflow links are well formed, else none."""
    if not isinstance(options, dict):
        return {}
    try:
        check_links(options)
    except ValueError:
        return {}
    return options


async def _run(queue: Queue, job_id: str, may_appear: bool) -> bool:
    """Run the job to its end if it is ready. False while it waits on a workflow (or, if it may
    appear, does not exist yet); True once it is done with here."""
    broker, name = queue.broker, queue.name
    promoted = ran = False
    while True:
        d = await broker.claim(name, CONSUMER, job_id, queue.max_deliveries)
        if d is None:
            record = await broker.get(name, job_id)
            if record is None:
                return not may_appear
            if record.state != JobState.SCHEDULED:
                return True  # finished, or not ours to run
            if record.eta is None:
                return False  # waits on a workflow
            now = time.time()
            if record.eta > now:
                if not ran:
                    # Delayed by whoever stored it (an idempotency key found it): a delayed job
                    # is stored, not run, here.
                    return True
                await anyio.sleep(record.eta - now)  # a retry's delay
                continue
            if promoted:
                return False  # due and promoted, yet not ready: it waits on a workflow
            await broker.promote_due(name, now, 1000)
            promoted = True
            continue
        promoted, ran = False, True
        if d.ended:  # ended by the broker (expired, revoked, cancelled, dead): said as a worker says it
            await report_ended(queue, d)
            return True
        ended = False
        try:
            running = RunningJob(d)
            completion = await execute(queue, running)
            ended = True
        finally:
            if not ended:
                # The caller was cancelled (a request's deadline, say): the job goes back to the
                # queue, as a stopping worker's does, rather than stay leased to no one.
                with anyio.move_on_after(5, shield=True):
                    await broker.release(name, [d])
        if completion is None:
            # Its expiry passed as it was claimed (the one way `execute` returns None here): the
            # next claim ends it expired.
            with anyio.CancelScope(shield=True):
                await broker.release(name, [d], unstarted=True)
            continue
        with anyio.CancelScope(shield=True):  # its end is written whatever comes now
            [written] = await broker.finish(name, [completion], queue.result_ttl)
        announced = written_signal(queue, running, completion) if written else None
        if announced is not None:
            await announce_written(queue, completion, announced)
