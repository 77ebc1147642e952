"""Runs one delivery in its own cancel scope and says how it ended."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from aqueue._checks import MAX_NAME_BYTES
from aqueue._context import JobContext, _enter, _leave
from aqueue._exceptions import (
    BrokerError,
    CancelExecution,
    DeliveryLimitExceeded,
    PayloadTooLarge,
    RateLimitExceeded,
    RetryTask,
    SerializationError,
    TaskError,
    TaskLocked,
    TaskTimeout,
    UnknownTask,
)
from aqueue._serialization import ERROR_MARK, dumps, encode_call, encode_result, loads, marks_an_error
from aqueue._signals import ENDED_SIGNALS, Signal, SignalJob, Signals
from aqueue._states import JobState
from aqueue._tasks import TaskPolicy, policy_for_call
from aqueue._threads import RaisedInThread, run_in_thread
from aqueue.brokers import Completion, Delivery, Outcome

if TYPE_CHECKING:
    from aqueue._queue import Queue

# An operator reads of failures here; a job's own code hears of them through signals.
logger = logging.getLogger("aqueue")


@dataclass(eq=False)
class RunningJob:
    """A delivery being executed, with the cancel scope that can stop it."""

    delivery: Delivery
    new_scope: Callable[[], anyio.CancelScope] = anyio.CancelScope
    scope: anyio.CancelScope | None = None
    """Made as the job starts (`start_scope`): a scope costs about 0.5 KB (two sets), and a busy
    worker holds hundreds of jobs waiting for a runner."""
    interrupted_at: float = math.inf
    """When (anyio's clock) the worker's shutdown stopped it, which hands it back rather than
    failing it: a deadline that passed later is not why it stopped."""
    cancel_requested: bool = False
    """Set by `job.cancel()`: the job ends `cancelled`, neither retried nor run again."""
    lost: bool = False
    """Set when another worker took the job over: stop it here and write nothing."""
    completed: JobContext | None = None
    """A success with COMPLETE handlers: they are called once the success is written (as in
    Huey, whose handlers find the result stored)."""
    worker_stopping: Callable[[], bool] = lambda: False
    """Whether the worker that runs it is shutting down (`JobContext.stopping`)."""

    def start_scope(self) -> anyio.CancelScope:
        """The job's cancel scope; a stop asked for before the job started carries over to it."""
        scope = self.scope = self.new_scope()
        if self.interrupted_at < math.inf or self.cancel_requested:
            scope.cancel()
        return scope

    def _cancel(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    def interrupt(self) -> None:
        self.interrupted_at = min(self.interrupted_at, anyio.current_time())
        self._cancel()

    def abandon(self) -> None:
        self.lost = True
        self.interrupt()

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self._cancel()


def _task_cancelling() -> bool:
    """Whether someone asked to cancel the running task (anyio's scopes do it with `cancel()`)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _cancellations_only(exc: BaseException) -> bool:
    return isinstance(exc, BaseExceptionGroup) and exc.split(asyncio.CancelledError)[1] is None


def _utf8(text: str) -> str:
    """Text JSON can carry: a lone surrogate (from os.fsdecode, say) becomes an escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_repr(exc: BaseException) -> str:
    try:
        return _utf8(repr(exc))
    except Exception:  # a broken __repr__ must not cost us the job
        return f"<{type(exc).__name__} (repr failed)>"


# Characters of an error's repr, and of its traceback, kept in its record: an error that quotes a
# big value is stored in the write of hundreds of outcomes, as results are (bounded apart).
ERROR_TEXT_LIMIT = 65_536


def _cut(text: str) -> str:
    if len(text) <= ERROR_TEXT_LIMIT:
        return text
    return f"{text[:ERROR_TEXT_LIMIT]} [... {len(text) - ERROR_TEXT_LIMIT} characters cut]"


def _metadata(exc: BaseException, d: Delivery, retries_left: int) -> dict[str, Any]:
    try:
        trace = _utf8("".join(traceback.format_exception(exc)))
    except Exception:
        trace = ""
    return {
        "error": _cut(safe_repr(exc)),
        "type": type(exc).__name__,
        "traceback": _cut(trace),  # its frames come first, the message last
        "job_id": d.job_id,
        "attempt": d.attempt,
        "retries_left": retries_left,
    }


def _dead_metadata(d: Delivery, exc: BaseException) -> dict[str, Any]:
    """The metadata of an error that ended a job without running it: no frames of its own."""
    return {"error": _cut(safe_repr(exc)), "type": type(exc).__name__, "traceback": "",
            "job_id": d.job_id, "attempt": d.attempt, "retries_left": 0}


async def dead(queue: Queue, d: Delivery, exc: Exception, reason: str | None = None) -> Completion:
    """A delivery no worker can run (unknown task, undecodable payload), or one aqueue itself
    failed on: straight to the dead letters, an ERROR as any failure for good is. `exc` says
    why (with its traceback, if it was raised); the reason is its message unless given."""
    error = _metadata(exc, d, 0) if exc.__traceback__ is not None else _dead_metadata(d, exc)
    reason = reason or str(exc)
    logger.error("job %s (%s) sent to the dead letters: %s", one_line(d.job_id), one_line(d.task), reason)
    if queue.signals.wants(Signal.ERROR):
        await queue.signals.send(Signal.ERROR, SignalJob(d.job_id, d.task), TaskError(error))
    return Completion(d, Outcome.FAILED, time.time(), error=dumps(error), reason=reason)


def one_line(text: str) -> str:
    """An id or task name that another writer may have put in Redis, as a log line shows it: a
    line break in it would forge a log line of its own."""
    text = _cut_name(text)
    return text if text.isprintable() else repr(text)


def _cut_name(text: str) -> str:
    """An id or task name another writer put in Redis, as long as one of ours can be at most: its
    own length is the writer's (a 5 MB name made a 10 MB log line and dead letter reason)."""
    if len(text) <= MAX_NAME_BYTES:
        return text
    return f"{text[:MAX_NAME_BYTES]}[... {len(text) - MAX_NAME_BYTES} characters cut]"


async def report_ended(queue: Queue, d: Delivery) -> None:
    """Signal the end the broker gave a job instead of a lease (`d.ended`): dead-lettered past
    max_deliveries is an ERROR as any failure for good is."""
    signals = queue.signals
    if d.ended == Outcome.FAILED:
        logger.error("job %s (%s) sent to the dead letters: delivered max_deliveries (%d) times "
                     "without finishing", one_line(d.job_id), one_line(d.task), queue.max_deliveries)
        if signals.wants(Signal.ERROR):  # the broker wrote the error down (DeliveryLimitExceeded)
            record = await queue.broker.get(queue.name, d.job_id)
            error = loads(record.error) if record and record.error else _dead_metadata(d, DeliveryLimitExceeded(
                f"delivered too many times without finishing (max_deliveries={queue.max_deliveries})"))
            await signals.send(Signal.ERROR, SignalJob(d.job_id, d.task), TaskError(error))
    elif d.ended is not None and signals.wants(ENDED_SIGNALS[d.ended]):
        await signals.send(ENDED_SIGNALS[d.ended], SignalJob(d.job_id, d.task))


def written_signal(queue: Queue, running: RunningJob, c: Completion) -> tuple[Signal, Any] | None:
    """The signal to send once the outcome `c` is written (as in Huey, whose handlers find it
    stored), if it or what may stand in its place has handlers: COMPLETE for a success,
    SCHEDULED for a retry or a rate limit's reschedule that waits for its time, ENQUEUED for a
    retry at once (back on the queue, as Huey's requeue is); for these two, and for a failure
    (told as ERROR already), CANCELLED instead if the broker ends the job cancelled
    (`announce_written`)."""
    if running.completed is not None:
        return Signal.COMPLETE, running.completed
    if c.retry_at is not None:  # a RETRY or a DEFER
        signal = Signal.SCHEDULED
    elif c.outcome == Outcome.RETRY:
        signal = Signal.ENQUEUED
    elif c.outcome == Outcome.FAILED:
        signal = Signal.CANCELLED  # only if it is ended so: its failure has no signal of its own here
    else:
        return None
    wanted = queue.signals.wants(signal) or queue.signals.wants(Signal.CANCELLED)
    return (signal, SignalJob(c.delivery.job_id, c.delivery.task)) if wanted else None


async def announce_written(queue: Queue, c: Completion, announced: tuple[Signal, Any]) -> None:
    """The signal `written_signal` chose, once the outcome is written: COMPLETE as it is; SCHEDULED
    or ENQUEUED for a job written to run again, unless the broker ended it instead: a cancel asked
    for while it ran outlasts its retry or its failure (it ends `cancelled` as this completion
    finished, its attempt not counted), and is told as CANCELLED. A cancel that came after the
    write ended it later, and told CANCELLED itself."""
    signal, job = announced
    if signal is Signal.COMPLETE:
        await queue.signals.send(signal, job)
        return
    try:
        record = await queue.broker.get(queue.name, c.delivery.job_id)
    except BrokerError as exc:
        logger.warning("job %s: could not read whether it was retried or cancelled, for its %s "
                       "handlers (not called): %s", c.delivery.job_id, signal.name, exc)
        return
    if (record is not None and record.state == JobState.CANCELLED.value
            and record.attempt == c.delivery.attempt and record.finished_at == c.finished_at):
        if queue.signals.wants(Signal.CANCELLED):
            await queue.signals.send(Signal.CANCELLED, job)
        return
    if signal is not Signal.CANCELLED and queue.signals.wants(signal):  # a failure: it stands
        await queue.signals.send(signal, job)


async def execute(queue: Queue, running: RunningJob) -> Completion | None:
    """Run the job; return its completion, or None when it was interrupted (hand it back)."""
    d = running.delivery
    task = queue.tasks.get(d.task)
    if task is None:
        unknown = UnknownTask(f"unknown task {_cut_name(d.task)!r}: not registered on this worker")
        return await dead(queue, d, unknown)
    # Another writer's: an id aqueue would refuse; every line about the job would carry it. (Up
    # to a quarter of the bound in characters, it is within it: no encoding per job.)
    job_id = d.job_id
    if len(job_id) > MAX_NAME_BYTES // 4 and len(job_id.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return await dead(queue, d, SerializationError(f"a job id of {len(job_id)} characters: "
                                                       f"at most {MAX_NAME_BYTES} bytes"))
    if len(d.payload) > queue.max_payload_size:  # bounded where it is read, not only where written
        return await dead(queue, d, PayloadTooLarge(f"payload of {len(d.payload)} bytes over this "
                                                    f"worker's max_payload_size ({queue.max_payload_size})"))
    try:
        args, kwargs, overrides = decode_call(d.payload)
        policy = policy_for_call(task.policy, overrides)
    except (ValueError, TypeError, KeyError) as exc:
        return await dead(queue, d, SerializationError(f"undecodable payload: {exc!r}"))

    if overrides.get("wf_in") and args:
        args[0] = _errors_restored(args[0])
    deadline = time.time() + policy.timeout if policy.timeout else None
    context = JobContext(d.job_id, d.task, d.attempt, queue, d, deadline, overrides.get("batch_id"),
                         running.worker_stopping)
    signals = queue.signals
    if (stop := _stop_before_start(running)) is not None:
        return await _stopped_before_start(stop, running, context)
    if signals.wants(Signal.EXECUTING):
        await signals.send(Signal.EXECUTING, context)
        # Stopped while its handlers ran: its code must not run either. (Its expiry is about
        # starting, and the job started with its EXECUTING.)
        if (stop := _stop_before_start(running, expiry=False)) is not None:
            return await _stopped_before_start(stop, running, context)
    error: BaseException | None = None
    stopped_at: BaseException | None = None  # the cancellation, with the frames it came through
    value: Any = None
    scope = running.start_scope()
    with scope:
        if policy.timeout:
            scope.deadline = anyio.current_time() + policy.timeout
            # As the scope's, from now: the EXECUTING handlers above took time of their own.
            context._deadline = time.time() + policy.timeout
        token = _enter(context)
        try:
            if task.is_async:
                value = await task.fn(*args, **kwargs)
            else:
                value = await run_in_thread(task.fn, *args, **kwargs)
                if inspect.iscoroutine(value):  # an async function behind a plain wrapper
                    value = await value
        except (Exception, SystemExit) as exc:  # the job's failure, judged below
            # SystemExit too (`sys.exit()`, argparse's `parser.error()`): it is the job's to end,
            # not the worker's, nor the jobs' that run beside it. Cancellation passes through.
            error = exc.exc if isinstance(exc, RaisedInThread) else exc
        except asyncio.CancelledError as exc:
            # Raised by the job's own code (it awaited a future cancelled elsewhere): a failure
            # like any other. A cancellation of this task (its scope, or the worker's) goes on.
            if scope.cancel_called or _task_cancelling():
                stopped_at = exc
                raise
            error = exc
        except KeyboardInterrupt:
            raise  # Ctrl-C (asyncio raises the second one wherever the loop's thread is): not the job's
        except BaseException as exc:
            # Any other of the job's own (a library's BaseException subclass, a group holding one,
            # a GeneratorExit) fails it alone, as SystemExit does: raised on, it took the worker
            # down with the jobs beside it, and every worker that took the job again. (A
            # GeneratorExit also comes here when this coroutine is closed unfinished, as its
            # worker is gone: the failure it then records goes nowhere.) A group of nothing but
            # cancellations, as this task is cancelled, is the cancellation.
            if _cancellations_only(exc) and (scope.cancel_called or _task_cancelling()):
                raise
            error = exc
        finally:
            _leave(token)
    if scope.cancel_called:
        # Told to stop, a job either stops (its scope caught the cancellation) or runs to its end
        # anyway: a thread cannot be stopped (`aqueue._threads`), and a job's code may swallow the
        # cancellation. A job another worker took over is theirs: this one says nothing of it but
        # a success that came after all (the broker takes a late success). Otherwise a cancel or
        # a timeout stands either way, and over a shutdown that came after it; a shutdown hands
        # back a job that stopped, one that ran to its end keeps its outcome (it would run twice).
        if running.lost:
            if scope.cancelled_caught or error is not None:
                return None
        elif running.cancel_requested:
            return await _cancelled(signals, context, d)
        elif scope.deadline <= min(anyio.current_time(), running.interrupted_at):
            error = TaskTimeout(f"job {d.job_id} ({d.task}) timed out after {policy.timeout}s")
            error.__cause__ = stopped_at  # its traceback shows where the job was when stopped
        elif scope.cancelled_caught or (not task.in_thread and error is not None
                                        and running.interrupted_at < math.inf):
            # Stopped by the shutdown, or it turned the shutdown's cancellation into an error of
            # its own (a task group's cleanup that raised, a client that wraps it): handed back,
            # not failed, as a timeout turned into an error is still a timeout (above). A thread
            # never sees the cancellation: an error it raises is its own, and stands.
            await _interrupted(signals, context)
            return None
    if error is None:
        try:
            result = encode_result(value, d.task, queue.max_payload_size)
        except SerializationError as exc:  # retrying would give the same value: fail for good
            return await _fail(queue, context, policy, exc, retry=False)
        activate: tuple[tuple[str, bytes], ...] = ()
        following = overrides.get("next")
        if following:
            try:
                activate = ((following["id"], _next_payload(queue, d.task, value, following)),)
            except SerializationError as exc:  # the next step's arguments cannot be stored
                return await _fail(queue, context, policy, exc, retry=False)
        if signals.wants(Signal.COMPLETE):
            running.completed = context
        return Completion(d, Outcome.SUCCEEDED, time.time(), result=result, activate=activate)
    if isinstance(error, RateLimitExceeded):
        if signals.wants(Signal.RATE_LIMITED):
            await signals.send(Signal.RATE_LIMITED, context, error)
        if error.reschedule:  # run again in the next window, without using a retry
            now = time.time()
            return Completion(d, Outcome.DEFER, now, retry_at=now + error.retry_after)
    used = _retries_used(d)
    if isinstance(error, RetryTask):  # uses none of the task's retries, as in Huey
        # With no delay of its own, after the task's retry wait, as in Huey.
        wait = policy.retry_wait(d.attempt) if error.delay is None else error.delay
        return await _retry(queue, context, policy, error, wait, used)
    if isinstance(error, RateLimitExceeded):
        # retry=False: a retry of the task's own, but none before the window has passed (an
        # earlier one would find the limit still used up).
        return await _fail(queue, context, policy, error, retry=True, wait=error.retry_after, used=used)
    if isinstance(error, TaskLocked) and signals.wants(Signal.LOCKED):
        await signals.send(Signal.LOCKED, context, error)
    # Its deadline stopped it, or it stopped itself past it (`check_timeout()`).
    if isinstance(error, TaskTimeout) and signals.wants(Signal.TIMEOUT):
        await signals.send(Signal.TIMEOUT, context, error)
    if isinstance(error, CancelExecution):
        if error.retry or (error.retry is None and policy.retries > used):
            # With retry=True whatever the count, but after the policy's wait, as in Huey.
            return await _retry(queue, context, policy, error, policy.retry_wait(d.attempt), used)
        # As in Huey: out of retries (or told not to retry), the job is cancelled, not failed.
        if signals.wants(Signal.CANCELLED):
            await signals.send(Signal.CANCELLED, context, error)
        meta = _metadata(error, d, 0)
        return Completion(d, Outcome.CANCELLED, time.time(), error=dumps(meta))
    # As in Huey, an exception of the job's own is an ERROR each time, before its RETRYING; a
    # held lock has its LOCKED (a rate limit its RATE_LIMITED, above), and is an ERROR only when it
    # fails the job for good.
    own = not isinstance(error, TaskLocked)
    if own and signals.wants(Signal.ERROR):
        await signals.send(Signal.ERROR, context, error)
    return await _fail(queue, context, policy, error, retry=True, signalled=own, used=used)


async def _cancelled(signals: Signals, context: JobContext, d: Delivery) -> Completion:
    if signals.wants(Signal.CANCELLED):
        await signals.send(Signal.CANCELLED, context)
    return Completion(d, Outcome.CANCELLED, time.time())


async def _interrupted(signals: Signals, context: JobContext) -> None:
    """Handed back by the worker's shutdown, to run again elsewhere."""
    if signals.wants(Signal.INTERRUPTED):
        await signals.send(Signal.INTERRUPTED, context)


def _stop_before_start(running: RunningJob, *, expiry: bool = True) -> str | None:
    """What stops a job before its code starts (its code must not run, not even to its first
    await), if anything: a check without an await, as every job makes it."""
    if running.lost:
        return "lost"
    if running.cancel_requested:  # stands over a shutdown that came after it, as below
        return "cancelled"
    if running.interrupted_at < math.inf:
        return "interrupted"
    d = running.delivery
    if expiry and d.expires is not None and d.expires < time.time():
        return "expired"
    return None


async def _stopped_before_start(stop: str, running: RunningJob, context: JobContext) -> Completion | None:
    """The end of a job that `stop` (from `_stop_before_start`) kept from starting: its
    completion, or None to hand it back."""
    d, signals = running.delivery, context.queue.signals
    if stop == "cancelled":
        return await _cancelled(signals, context, d)
    if stop == "interrupted":  # the worker's shutdown: handed back
        await _interrupted(signals, context)
    elif stop == "expired":
        # Received before its expiry, it waited for a slot past it: handed back unstarted, for
        # the broker to end it expired, as a job not started by then.
        logger.info("job %s (%s): its expiry passed while it waited for a slot: handed back to "
                    "end expired", d.job_id, d.task)
    return None  # handed back; or, "lost", another worker's now


def decode_call(payload: bytes) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """A payload's arguments and options, as a job runs them; ValueError, TypeError or KeyError
    for one that cannot be read so (another writer's): its job is dead-lettered unrun."""
    call = loads(payload)
    args, kwargs, options = call["args"], call["kwargs"], call.get("options") or {}
    if not (isinstance(args, list) and isinstance(kwargs, dict) and isinstance(options, dict)):
        raise TypeError("args must be a list, kwargs and options objects")
    if options:
        check_links(options)
    return args, kwargs, options


def check_links(options: dict[str, Any]) -> None:
    """A payload's workflow options, checked before its code runs: another writer's malformed
    "next" failed the job only once it had run, as an error of aqueue's own."""
    following = options.get("next")
    if following is not None and not (
        isinstance(following, dict) and isinstance(following.get("id"), str)
        and isinstance(following.get("args"), list) and isinstance(following.get("kwargs"), dict)
        and isinstance(following.get("options"), dict)
    ):
        raise ValueError(f"options.next is no pipeline step: {following!r}")
    for name in ("batch_id", "chord_callback"):
        value = options.get(name)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"options.{name} is no job id: {value!r}")


def _next_payload(queue: Queue, task: str, value: Any, following: dict[str, Any]) -> bytes:
    """The next pipeline step's arguments: a tuple extends its *args, a dict updates its
    **kwargs, None passes nothing, any other value comes first."""
    args, kwargs = list(following["args"]), dict(following["kwargs"])
    if isinstance(value, tuple):
        args = [*value, *args]
    elif isinstance(value, dict):
        kwargs.update(value)
    elif value is not None:
        args = [value, *args]
    # The value passed encode_result's check, the step's own arguments the check at enqueue.
    return encode_call(f"the step after {task}", args, kwargs, following["options"],
                       queue.max_payload_size, checked=True)


def _errors_restored(value: Any) -> Any:
    """A chord callback's values or an error handler's first argument: errors come back as
    `TaskError`s."""
    if isinstance(value, list):
        return [_errors_restored(v) for v in value]
    if marks_an_error(value):
        metadata = value[ERROR_MARK]
        return TaskError(metadata if isinstance(metadata, dict) else {"error": str(metadata)})
    return value


def _retries_used(d: Delivery) -> int:
    """How many of the task's retries the job has used: its runs before this one, but for those
    that ended in a retry it asked for (`RetryTask`), which its delivery counts."""
    return d.attempt - 1 - d.asked


async def _retry(
    queue: Queue, context: JobContext, policy: TaskPolicy, error: BaseException,
    delay: float | None, used: int,
) -> Completion:
    d = context._delivery
    now = time.time()
    if queue.signals.wants(Signal.RETRYING):
        await queue.signals.send(Signal.RETRYING, context, error)
    meta = _metadata(error, d, max(0, policy.retries - used))
    asked = isinstance(error, RetryTask | CancelExecution)  # the job's own request, not a failure
    logger.log(logging.INFO if asked else logging.WARNING, "job %s (%s) attempt %d: %s; retried %s",
               d.job_id, d.task, d.attempt, meta["error"], f"in {delay:.3g}s" if delay else "at once")
    return Completion(d, Outcome.RETRY, now, error=dumps(meta), retry_at=now + delay if delay else None,
                      asked=isinstance(error, RetryTask))


async def _fail(
    queue: Queue, context: JobContext, policy: TaskPolicy, error: BaseException, *, retry: bool,
    wait: float = 0.0, signalled: bool = False, used: int = 0,
) -> Completion:
    """Retry by the task's policy (`used`: the retries used so far), waiting at least `wait`
    seconds, or fail for good (an ERROR unless `signalled` already)."""
    d = context._delivery
    if retry and policy.retries > used:
        return await _retry(queue, context, policy, error, max(policy.retry_wait(d.attempt), wait), used)
    if not signalled and queue.signals.wants(Signal.ERROR):
        await queue.signals.send(Signal.ERROR, context, error)
    meta = _metadata(error, d, 0)
    reason = f"failed after {d.attempt} attempt(s): {type(error).__name__}"
    logger.error("job %s (%s) %s\n%s", d.job_id, d.task, reason, meta["traceback"].rstrip())
    return Completion(d, Outcome.FAILED, time.time(), error=dumps(meta), reason=reason)
