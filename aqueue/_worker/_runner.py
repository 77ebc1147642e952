"""The worker: one event loop running a fetcher, the jobs it hands out, and the services beside them.

    fetcher ──receive/reclaim──▶ runners (a job at a time, each in its own cancel scope)
            ──▶ completer ──finish──▶ broker
    lease renewer: renews every held lease in one call     scheduler: promotes due jobs
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from aqueue._background import Background
from aqueue._checks import check_count
from aqueue._exceptions import BrokerConnectionError, BrokerError
from aqueue._signals import Signal, SignalJob
from aqueue._states import JobState
from aqueue._tasks import NO_OPTIONS
from aqueue._threads import worker_threads
from aqueue._time import Seconds, seconds
from aqueue._worker._completer import Completer
from aqueue._worker._executor import (
    RunningJob,
    announce_written,
    dead,
    execute,
    one_line,
    report_ended,
    safe_repr,
    written_signal,
)
from aqueue._worker._unreachable import Unreachable
from aqueue.brokers import Completion, Delivery, Outcome
from aqueue.brokers._base import PRUNE_EVERY

if TYPE_CHECKING:
    from aqueue._context import JobContext
    from aqueue._queue import Queue

logger = logging.getLogger("aqueue")

RECEIVE_BATCH = 200  # jobs per receive at most: a bigger batch only holds more memory at once
# A job that ended holds its lease until its outcome is written. Beyond `concurrency`, a worker
# holds at most this many such leases: enough to receive while writes are under way, and a bound,
# so that a fetcher running ahead of the writes piles up neither leases nor memory.
WRITING_SLACK = RECEIVE_BATCH
# The fetcher's pause after a failed call to the broker, doubled after each until it takes.
FETCH_PAUSE_FIRST = 0.05
FETCH_PAUSE_MOST = 5.0
# Seconds `running()`'s exit waits past the shutdown timeout for a worker held up by anything but
# threads (a broker that does not answer), before it cancels the worker.
STOP_GRACE = 10.0
FETCH_BLOCK = 1.0  # seconds a receive waits for a job; bounds how long a stop request waits
SCHEDULER_TICK = 0.1  # a due job waits at most this long to become ready
EARLY_TICK_AGAIN = 0.25  # a periodic tick ahead of the broker's clock is asked for again after this
PROMOTE_BATCH = 1000
CANCEL_CHECK = 2.0  # how often to look for cancel requests whose push was missed
# Cancel requests heard for jobs not running here are kept, in case a lease is on its way: the push
# can come before the reply that leases the job (the cancel landed in between). At most this many;
# past it, those older than EARLY_CANCEL_AGE seconds go (all of them, if that leaves over half).
EARLY_CANCELS_KEPT = 1000
EARLY_CANCEL_AGE = 5.0
PRUNE_PAGE = 5000

def consumer_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


_UNSET = object()


def _running_on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread runs `loop`."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """Have `loop`'s thread call `fn`; nothing once the loop has closed (what ran on it ended)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


def _context_changed(clean: list[tuple[contextvars.ContextVar[object], object]]) -> bool:
    context = contextvars.copy_context()
    return len(context) != len(clean) or any(context.get(var, _UNSET) is not value for var, value in clean)


class _Started:
    """The task status `run` reports to: ends the wait in `running()` once the worker is up."""

    scope: anyio.CancelScope | None = None
    done = False

    def started(self, value: object = None) -> None:
        self.done = True
        if self.scope is not None:
            self.scope.cancel()


class Worker:
    """Runs a queue's jobs: up to `concurrency` at once, each in its own cancel scope. With
    `prefetch`, up to that many more jobs are received ahead, to start as slots free."""

    def __init__(
        self,
        queue: Queue,
        *,
        concurrency: int = 100,
        prefetch: int = 0,
        scheduler: bool = True,
        shutdown_timeout: Seconds = 30.0,
        name: str | None = None,
    ) -> None:
        check_count(concurrency, "concurrency")
        check_count(prefetch, "prefetch", minimum=0)
        self.queue = queue
        self.concurrency = concurrency
        # Jobs received ahead wait here, leased, for a slot: a slot that frees starts the next one
        # at once rather than after a receive's round trip, while another worker, idle maybe,
        # cannot take them. Off (0) by default.
        self.prefetch = prefetch
        self.scheduler = scheduler
        self.shutdown_timeout = seconds(shutdown_timeout, "shutdown_timeout")
        self.name = name or consumer_name()
        self.jobs_done = 0
        self._running: dict[str, RunningJob] = {}
        self._held: dict[str, Delivery] = {}  # leased until their outcome is written
        self._completing: dict[str, Completion] = {}  # ended, outcome not yet written
        # Outcomes whose signal handlers (COMPLETE, SCHEDULED, ENQUEUED: `written_signal`) wait
        # for the outcome to be written, and the task group that calls them (their own, so that a
        # stop waits for them).
        self._announced: dict[str, tuple[Signal, Any]] = {}
        self._announcements: TaskGroup | None = None
        self._handed_back: list[Delivery] = []  # stopped by the shutdown, to run again elsewhere
        self._more_handed_back = anyio.Event()  # for `_hand_back_as_they_stop`
        self._unstarted: list[Delivery] = []  # never started here: handed back as never delivered
        self._debug = False  # debug lines wanted (`aqueue run -v`), read as the worker starts
        self._stop_requested = False
        self._stop_at = 0.0  # time.monotonic() when stop() was called: the running jobs' grace starts
        self._stop_heard = anyio.Event()  # cuts short the fetcher's pause between failed calls
        self._unreachable = Unreachable()  # what is logged while the broker is out of reach
        self._wake_fetcher = anyio.Event()
        self._all_idle = anyio.Event()
        self._completer: Completer | None = None
        self._services: TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # while it runs
        self._stopper: asyncio.Task[None] | None = None  # a stop() called outside a task
        self._stop_acted = False  # stop()'s steps taken on the loop
        self._fetch_ended = anyio.Event()
        self._grace_over = False  # the running jobs' shutdown_timeout has passed (`_end_grace`)
        self._reclaim_done = anyio.Event()
        self._reclaim_done.set()
        self._answer_lost = False  # a receive or reclaim failed: it may have leased jobs even so
        self._early_cancels: dict[str, float] = {}  # job id: when its cancel request was heard
        # Jobs wait here for a runner. Runners are long-lived tasks: a busy worker does not pay for
        # a new task per job. When jobs wait, one runner is called at a time: an idle one woken,
        # or else a new one (up to `concurrency`); once it takes a job, it calls the next if more
        # wait. A runner whose job returns without waiting takes the next job itself, so jobs that
        # never wait do not fill the worker with idle tasks, however many batches arrive.
        self._ready: deque[RunningJob] = deque()
        self._idle_runners: list[asyncio.Event] = []
        self._runners = 0
        self._starting = 0
        self._runners_done = False
        self._jobs: TaskGroup | None = None
        self._new_scope: type[anyio.CancelScope] = anyio.CancelScope
        self._clean_context = contextvars.copy_context()  # taken anew when the worker starts

    def __repr__(self) -> str:
        return f"<Worker {self.name} on {self.queue!r}>"

    def _stopping(self) -> bool:
        return self._stop_requested

    def stop(self) -> None:
        """Stop taking jobs; running jobs get `shutdown_timeout` seconds, then are cancelled and
        handed back. A plain `def` job's thread cannot be stopped: it is waited for, however long
        it runs, and its job keeps its outcome. Callable from a task, a callback of the worker's
        event loop (a signal handler's) or another thread."""
        loop = self._loop
        if loop is not None and not _running_on(loop):
            _call_on(loop, self.stop)  # all of it the loop's own to do
            return
        if self._stop_requested:
            return
        self._stop_requested = True
        self._stop_at = time.monotonic()
        if loop is None:
            # Not started, or starting in another thread: run() sets its loop before it looks
            # for a request, so read again, one of the two acts on it.
            loop = self._loop
            if loop is None:
                return
            if not _running_on(loop):
                _call_on(loop, self._act_on_stop)
                return
        self._act_on_stop()

    def _act_on_stop(self) -> None:
        """stop()'s steps, on the worker's loop: in a task, or in a callback of the loop's."""
        services = self._services
        if services is None or self._stop_acted:
            return  # not running yet (run() acts as it starts), or over; or done already
        self._stop_acted = True
        self._stop_heard.set()
        self._wake_fetcher.set()
        if asyncio.current_task() is None:
            # A callback of the loop's (a signal handler's): anyio starts tasks from a task alone.
            async def from_a_task() -> None:
                if self._services is services:
                    self._start_stopping(services)

            # Held here: the loop holds a task weakly.
            self._stopper = asyncio.get_running_loop().create_task(from_a_task())
        else:
            self._start_stopping(services)

    def _start_stopping(self, services: TaskGroup) -> None:
        # Jobs received ahead that no runner has taken start no more: handed back at once, as never
        # started, for another worker to run (their release runs in the background). A runner
        # freed while the fetch still waits (a broker slow to answer) started them, only for the
        # grace's end to cut them off. From now on `_take` hands back what comes: none wait again.
        waiting, self._ready = self._ready, deque()
        for running in waiting:
            if self._running.get(running.delivery.job_id) is running:
                del self._running[running.delivery.job_id]
            self._let_go(running)
        services.start_soon(self._unblock_fetcher)
        # The running jobs' grace counts from the stop, not from the fetch's end: a broker slow to
        # answer (a stalled Redis) held the fetch, and every job with it, past the grace that an
        # orchestrator gives the process before it kills it.
        services.start_soon(self._grace_timer)

    def _grace_left(self) -> float:
        return max(0.0, self.shutdown_timeout - (time.monotonic() - self._stop_at))

    async def _grace_timer(self) -> None:
        await anyio.sleep(self._grace_left())
        self._end_grace()

    async def _unblock_fetcher(self) -> None:
        # The fetcher may be waiting in `receive`; end the wait without losing what it claims.
        # Retry briefly: the interrupt can land just before the wait begins.
        while not self._fetch_ended.is_set():
            try:
                await self.queue.broker.interrupt_receive(self.queue.name, self.name)
            except BrokerError:
                return  # the receive times out by itself
            with anyio.move_on_after(0.05):
                await self._fetch_ended.wait()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Worker]:
        """Run in the background of the current task; stop gracefully on exit, however the body
        ends (an error or a cancellation included): running jobs finish or are handed back."""
        # A task of its own rather than a task group around the body, so the body's own errors
        # reach the caller unwrapped and do not cancel the worker before it can stop gracefully.
        started = _Started()
        worker = Background(self.run(task_status=started))
        task = worker.task
        try:
            with anyio.CancelScope() as scope:
                started.scope = scope
                await asyncio.wait([task])  # returns only if `run` ends (fails) before it has started
        except BaseException:
            # The caller was cancelled while the worker started (a start-up deadline): it must not
            # run on unseen, nor hold the caller up. Not started yet, it has taken no job: its
            # start (a connect that hangs, say) is cancelled too; it stops as on any exit.
            if not started.done:
                worker.cancel()
            await self._stop_running(worker)
            if task.done() and not task.cancelled():
                task.exception()  # read: a failure to start is not what the caller asked about
            raise
        if task.done():
            task.result()  # raises why it failed to start
            raise RuntimeError("the worker stopped before it started")
        try:
            yield self
        finally:
            await self._stop_running(worker)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def _stop_running(self, worker: Background[None]) -> None:
        """Stop the worker `running()` started and wait for it: gracefully, and for as long as
        threads that cannot be stopped run; cancelled once anything else holds it up
        `STOP_GRACE` seconds past the shutdown timeout."""
        self.stop()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.shutdown_timeout + STOP_GRACE):
                await asyncio.wait([worker.task])
            # The coroutine jobs were interrupted once their shutdown_timeout had passed
            # (`_end_grace`): what runs on is threads. Before the fetcher's end, what holds the
            # worker up is something else (a broker call that never answers): cancelled, as below.
            if not worker.done() and self._running and self._fetch_ended.is_set():
                # Cancelled, the worker would wait for the threads all the same, but then neither
                # write their outcomes (their jobs would run again) nor hand back the jobs it
                # interrupted (they would wait for the visibility timeout).
                logger.warning("worker %s: still waiting for %d job(s) whose threads cannot be "
                               "stopped", self.name, len(self._running))
                if self._all_idle.is_set():
                    # Set before these jobs ran; one not set yet is `_wind_down`'s, and stays: a
                    # new one would leave it waiting out its timeout after the last job ended.
                    self._all_idle = anyio.Event()  # set once `_running` is empty
                idle = asyncio.ensure_future(self._all_idle.wait())
                await asyncio.wait([worker.task, idle], return_when=asyncio.FIRST_COMPLETED)
                idle.cancel()  # the worker ended first (it failed): nothing left to wait for
                with anyio.move_on_after(self.shutdown_timeout + STOP_GRACE):
                    await asyncio.wait([worker.task])
        if not worker.done():
            await worker.stop()

    async def run(self, *, task_status: TaskStatus[Worker] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until `stop()`, which stops gracefully. Cancelled, it stops as a kill does: running
        jobs are not handed back, unwritten outcomes are lost (their jobs run again); `running()`
        (`queue.worker()`) turns a cancellation into a graceful stop."""
        queue = self.queue
        self._loop = asyncio.get_running_loop()
        await queue.connect()
        # Counted while it runs: the broker refuses a worker more than its connections can serve.
        with queue.broker.serving_worker():
            logger.info(
                "worker %s: queue %r on %s, concurrency %d, tasks: %s",
                self.name, queue.name, queue.broker.url, self.concurrency,
                ", ".join(sorted(queue.tasks)) or "(none)",
            )
            self._completer = Completer(queue.broker, queue.name, queue.result_ttl, self._written,
                                        self._reclaim_settled, self._applied, self._unreachable)
            # The running backend's own scope class: `anyio.CancelScope()` looks the backend up on every
            # call, which costs more than all the rest of a no-op job's bookkeeping.
            self._new_scope = type(anyio.CancelScope())
            self._debug = logger.isEnabledFor(logging.DEBUG)  # once: a check per job costs more
            threads = worker_threads.set(anyio.CapacityLimiter(self.concurrency))
            self._clean_context = contextvars.copy_context()
            try:
                async with anyio.create_task_group() as services:
                    self._services = services
                    if self._stop_requested:  # stopped before it started, or as it started
                        self._act_on_stop()
                    services.start_soon(self._completer.run)
                    services.start_soon(self._renew_leases)
                    listen_tried = anyio.Event()
                    services.start_soon(self._listen_cancel, listen_tried)
                    services.start_soon(self._check_cancel)
                    if self.scheduler:
                        services.start_soon(self._schedule)
                    # Every worker prunes, a scheduler or not: with none pruning, each finished
                    # job left its index entries in Redis for good.
                    services.start_soon(self._prune)
                    # No job is taken before cancel requests are listened for: one made in between
                    # would wait for the fallback check.
                    await listen_tried.wait()
                    async with anyio.create_task_group() as announcements:
                        self._announcements = announcements
                        async with anyio.create_task_group() as jobs:
                            self._jobs = jobs
                            task_status.started(self)
                            try:
                                await self._fetch()
                            finally:
                                self._fetch_ended.set()
                            await self._wind_down()
                            self._end_runners()
                        self._jobs = None  # closed: a cancel heard from now on starts no job
                        await self._release(self._handed_back)
                        await self._release(self._unstarted, unstarted=True)
                        with anyio.move_on_after(max(self.shutdown_timeout, 1.0)):  # a broker that is gone
                            await self._completer.drained()
                        if self._completer.unwritten:
                            logger.warning("worker %s stopping: the outcomes of %d job(s) could not be "
                                           "written (their jobs run again once their leases lapse)",
                                           self.name, self._completer.unwritten)
                        self._announcements = None  # its handlers are waited for: no more come
                    services.cancel_scope.cancel()
            except Exception:
                # One of its services failed (a schedule of the user's, say) and it takes no more
                # jobs: said now, as whoever runs it in the background hears of it only at its exit.
                logger.exception("worker %s stopped: one of its services failed", self.name)
                raise
            finally:
                # Also when a service failed and ended the group: stop() must not start tasks in it.
                self._services = None
                worker_threads.reset(threads)
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            try:
                await queue.broker.forget_consumer(queue.name, self.name)
            except BrokerError as exc:
                logger.warning("could not remove consumer %s: %s", self.name, exc)
        logger.info("worker %s stopped after %d job run(s)", self.name, self.jobs_done)  # retries count

    # --- fetching --------------------------------------------------------------------------------

    async def _fetch(self) -> None:
        queue, broker = self.queue, self.queue.broker
        reclaim_every = max(1.0, queue.visibility_timeout / 4)
        next_reclaim = 0.0
        backoff = FETCH_PAUSE_FIRST
        failed_with = ""  # the last failure's repr, while calls fail: its traceback is told once
        while not self._stop_requested:
            taken_at_most = self.concurrency + self.prefetch
            free = min(taken_at_most - len(self._running),
                       taken_at_most + WRITING_SLACK - len(self._held), RECEIVE_BATCH)
            if free <= 0:
                self._wake_fetcher = anyio.Event()
                await self._wake_fetcher.wait()
                continue
            try:
                taken = 0
                if self._answer_lost:
                    taken = await self._recover()
                elif time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + reclaim_every
                    taken = await self._reclaim(free)
                if not taken:
                    deliveries = await broker.receive(queue.name, self.name, free, FETCH_BLOCK,
                                                      queue.max_deliveries)
                    await self._take(deliveries)
                    taken = len(deliveries)
                backoff, failed_with = FETCH_PAUSE_FIRST, ""
                self._unreachable.reached("receiving jobs")
            except Exception as exc:  # a broker error or a fault of aqueue's own: log it, never die of it
                self._answer_lost = True
                if isinstance(exc, BrokerConnectionError):
                    self._unreachable.failed("receiving jobs", exc)
                elif repr(exc) == failed_with:  # one that does not pass (a missing ACL right, say)
                    logger.error("receiving jobs failed again, retrying in %.2fs: %r", backoff, exc)
                else:
                    logger.exception("receiving jobs failed, retrying in %.2fs", backoff)
                    failed_with = repr(exc)
                with anyio.move_on_after(backoff):  # or until a stop
                    await self._stop_heard.wait()
                backoff = min(backoff * 2, FETCH_PAUSE_MOST)
                continue
            if 0 < taken < free:
                # The queue ran dry: the next receive will wait for jobs anyway, so the jobs just
                # received start first (a turn of the loop) rather than after it is sent, and the
                # outcomes of those that ended at once are sent first too (another turn).
                await anyio.lowlevel.checkpoint()
                if self._completer is not None and self._completer.woken:
                    await anyio.lowlevel.checkpoint()
        if self._answer_lost:  # stopping right after: those jobs are handed back with the rest
            try:
                await self._recover()
            except BrokerError as exc:
                logger.warning("could not look for jobs leased by a call whose answer was lost "
                               "(they return after the visibility timeout): %s", exc)

    async def _reclaim(self, free: int) -> int:
        """Take over lapsed leases; returns how many jobs came. Until those jobs are taken in, an
        outcome refused to this worker is not given up (see `_reclaim_settled`), nor after a
        failure until `_recover` has taken in what it may have leased."""
        queue = self.queue
        self._reclaim_done = anyio.Event()
        held = set(self._held)
        try:
            deliveries = await queue.broker.reclaim(queue.name, self.name, free,
                                                    queue.visibility_timeout, queue.max_deliveries)
            # The reclaim may have taken over a job of this worker's own (its lease lapsed while
            # the loop was blocked) whose success was then written, and applied, under the job's
            # earlier delivery: held then, neither running nor waiting to be written now, it is
            # done, not to be run again. (A refused outcome waits for this reply instead, see
            # `_reclaim_settled`, and is adopted.)
            deliveries = [d for d in deliveries if d.job_id not in held
                          or d.job_id in self._running or d.job_id in self._completing]
            for d in deliveries:
                logger.warning("job %s (%s) taken over from a silent worker",
                               one_line(d.job_id), one_line(d.task))
            await self._take(deliveries)
            self._reclaim_done.set()
            return len(deliveries)
        except BaseException as exc:
            # Failed, its answer may be lost: the recover that follows takes in what it leased,
            # then sets the event. Cancelled, no recover follows.
            if not isinstance(exc, Exception):
                self._reclaim_done.set()
            raise

    async def _recover(self) -> int:
        """Take in what a failed receive or reclaim may have leased to this worker before its
        answer was lost: left alone, those jobs would wait for their lease to lapse, and then
        count a delivery they never had. Returns how many jobs came."""
        queue = self.queue
        try:
            deliveries = await queue.broker.recover(
                queue.name, self.name, list(self._held.values()), queue.max_deliveries)
            self._answer_lost = False
            if deliveries:
                logger.warning("%d job(s) leased to this worker by a call whose answer was lost: "
                               "taken in now", len(deliveries))
            await self._take(deliveries)
            return len(deliveries)
        finally:
            self._reclaim_done.set()  # a lost reclaim's jobs are taken in (or it is given up)

    async def _reclaim_settled(self) -> None:
        """Wait for a reclaim under way to be taken in. An outcome refused while it was under way
        may have been refused to that very reclaim: the job's lease had lapsed (the event loop was
        blocked) and this worker took its own job over. Given up at once, the job would run a
        second time here when the reclaim's reply arrives; once the reply is in, `_adopt` has
        given the outcome the job's new delivery, and it is written under that."""
        await self._reclaim_done.wait()

    async def _take(self, deliveries: list[Delivery]) -> None:
        ended = []
        for d in deliveries:
            if d.ended is not None:  # the broker ended it (expired, revoked, cancelled, dead)
                ended.append(d)
                continue
            if self._adopt(d):
                continue
            self._held[d.job_id] = d
            if self._stop_requested:
                self._hand_back(d, started=False)
            else:
                running = RunningJob(d, self._new_scope, worker_stopping=self._stopping)
                self._running[d.job_id] = running
                self._ready.append(running)
                self._wake_runner()
        if self._early_cancels and self._services is not None:
            early = [d.job_id for d in deliveries if self._early_cancels.pop(d.job_id, None) is not None
                     and d.job_id in self._running]
            if early:  # the broker says whether each still stands (a retry makes one spent)
                self._services.start_soon(self._cancel_requested, early)
        # Said once every leased job is held: the handlers are the user's code, and may take
        # longer than a lease that nothing renews lasts.
        for d in ended:
            await report_ended(self.queue, d)

    # --- running ---------------------------------------------------------------------------------

    def _wake_runner(self) -> None:
        if self._starting:
            return  # a runner is on its way: it wakes the next one itself if more jobs wait
        if self._idle_runners:
            self._starting += 1
            self._idle_runners.pop().set()
        elif self._runners < self.concurrency:
            jobs = self._jobs
            assert jobs is not None
            self._runners += 1
            self._starting += 1
            # From the worker's own context, never from a runner whose job changed its context.
            self._clean_context.run(lambda: jobs.start_soon(self._runner, name="aqueue runner"))

    async def _runner(self) -> None:
        """Runs ready jobs one after another; waits while there are none, until the worker stops.
        Every job starts from the context the runner started with: a runner whose job set a context
        variable ends, and a fresh one takes its place."""
        self._starting -= 1
        clean = list(contextvars.copy_context().items())
        while True:
            while self._ready:
                running = self._ready.popleft()
                if self._ready:  # more jobs wait: another runner takes them if this job waits
                    self._wake_runner()
                await self._run_job(running)
                if _context_changed(clean):
                    self._runners -= 1
                    if self._ready:
                        self._wake_runner()
                    return
            if self._runners_done:
                return
            wake = asyncio.Event()  # the worker runs on asyncio; cheaper than anyio's wrapper
            self._idle_runners.append(wake)
            await wake.wait()
            self._starting -= 1  # whoever woke it counted it as on its way

    def _end_runners(self) -> None:
        self._runners_done = True
        idle, self._idle_runners = self._idle_runners, []
        self._starting += len(idle)
        for wake in idle:
            wake.set()

    async def _run_job(self, running: RunningJob) -> None:
        job_id = running.delivery.job_id
        began = time.monotonic() if self._debug else 0.0
        try:
            completion = await execute(self.queue, running)
        except Exception as exc:
            # A fault of aqueue's own, not of the task: into the dead letters with the reason,
            # so it is neither lost nor handed round for ever.
            logger.exception("job %s (%s): internal error", job_id, running.delivery.task)
            completion = await dead(self.queue, running.delivery, exc, f"internal error: {safe_repr(exc)}")
        finally:
            if self._running.get(job_id) is running:
                del self._running[job_id]
            self._wake_fetcher.set()
            if not self._running:
                self._all_idle.set()
        d = running.delivery  # the newest delivery, should the job have come back to us
        if self._debug:
            logger.debug("job %s (%s) attempt %d: %s in %.3fs", job_id, d.task, d.attempt,
                         completion.outcome if completion else "handed back", time.monotonic() - began)
        if completion is None:
            self._let_go(running)
        else:
            completion.delivery = d
            self._completing[d.job_id] = completion
            if (running.completed is not None or completion.outcome in (Outcome.RETRY, Outcome.FAILED)
                    or completion.retry_at is not None):  # else no signal waits for the write
                announced = written_signal(self.queue, running, completion)
                if announced is not None:
                    self._announced[d.job_id] = announced
            self.jobs_done += 1
            assert self._completer is not None
            self._completer.put(completion)

    def _adopt(self, d: Delivery) -> bool:
        """A job of our own came back to us (its lease lapsed while the event loop was blocked):
        if it still runs, it goes on under the new delivery; if it ended and its outcome waits to
        be written, the outcome is written under the new delivery. True if adopted."""
        running = self._running.get(d.job_id)
        completing = self._completing.get(d.job_id)
        if completing is not None and completing.delivery.receipt != d.receipt:
            # Not the same entry come back but the job made ready anew: by this outcome, written
            # with its reply not yet read (a retry with no delay), or by whoever took the job over
            # (the outcome is then refused). Either way the new delivery is a run of its own.
            del self._completing[d.job_id]
            completing = None
        if running is None and completing is None:
            return False
        if running is not None:
            if running.scope is None and d.expires is None:
                d.expires = running.delivery.expires  # it never started: its expiry holds on
            running.delivery = d
            if running.lost and running.scope is None:
                # Taken over while it waited for a slot (our renewals failed), and back with us: it
                # never started, so it runs here after all.
                running.lost, running.interrupted_at = False, math.inf
        if completing is not None:
            completing.delivery = d
        self._held[d.job_id] = d
        return True

    async def _complete_if_stored(self, c: Completion, context: JobContext) -> None:
        """Call the COMPLETE handlers of a success this worker's run stored after all (a retry
        refused is another worker's to tell of)."""
        try:
            record = await self.queue.broker.get(self.queue.name, c.delivery.job_id)
        except BrokerError as exc:
            logger.warning("job %s: could not read whether its success was stored, for its COMPLETE "
                           "handlers (not called): %s", c.delivery.job_id, exc)
            return
        if (record is not None and record.state == JobState.SUCCEEDED.value
                and record.worker == c.delivery.consumer):
            await self.queue.signals.send(Signal.COMPLETE, context)

    def _applied(self, completions: list[Completion]) -> None:
        """Call the handlers of the outcomes just written (`written_signal`)."""
        if not self._announced:  # no handlers: nothing to look up per job
            return
        for c in completions:
            announced = self._announced.pop(c.delivery.job_id, None)
            if announced is not None and self._announcements is not None:
                self._announcements.start_soon(announce_written, self.queue, c, announced)

    def _written(self, completions: list[Completion]) -> None:
        pending = self._announced
        for c in completions:
            job_id = c.delivery.job_id
            announced = pending.pop(job_id, None) if pending else None
            if (announced is not None and announced[0] is Signal.COMPLETE
                    and self._announcements is not None):
                # Refused, or not written: but a write whose reply was lost may have stored it
                # before the one that was refused.
                self._announcements.start_soon(self._complete_if_stored, c, announced[1])
            if self._completing.get(job_id) is c:
                del self._completing[job_id]
            if self._held.get(job_id) is c.delivery:
                del self._held[job_id]
        self._wake_fetcher.set()

    # --- stopping --------------------------------------------------------------------------------

    async def _wind_down(self) -> None:
        """Once the fetch has ended: wait out what is left of the running jobs' grace."""
        if not self._running or self._grace_over:
            return
        logger.info("worker %s stopping: waiting up to %.3gs for %d running job(s)",
                    self.name, self._grace_left(), len(self._running))
        self._all_idle = anyio.Event()
        with anyio.move_on_after(self._grace_left()):
            await self._all_idle.wait()
        self._end_grace()

    def _end_grace(self) -> None:
        """The running jobs' shutdown_timeout has passed: each is interrupted, to be handed back."""
        if self._grace_over:
            return
        self._grace_over = True
        if self._running and self._services is not None:
            self._services.start_soon(self._hand_back_as_they_stop)
        for running in list(self._running.values()):
            d = running.delivery
            task = self.queue.tasks.get(d.task)
            if task is not None and task.in_thread:
                logger.warning("job %s (%s) still running at shutdown, in a thread, which cannot be "
                               "stopped: waiting for it (it keeps its outcome, unless it lets "
                               "check_cancelled()'s exception out: then it is handed back)", d.job_id, d.task)
            else:
                logger.warning("job %s (%s) still running at shutdown: cancelling it to hand it back",
                               d.job_id, d.task)
            running.interrupt()

    async def _hand_back_as_they_stop(self) -> None:
        """Hand back each job the shutdown stopped as it stops, for another worker to run at once:
        the worker itself ends only after its last job, maybe a thread that cannot be stopped."""
        while True:
            await self._more_handed_back.wait()
            self._more_handed_back = anyio.Event()
            batch, self._handed_back = self._handed_back, []
            await self._release(batch)

    def _let_go(self, running: RunningJob) -> None:
        """A job that ends here with no outcome: another worker's now, or handed back."""
        d = running.delivery
        if running.lost:
            self._held.pop(d.job_id, None)  # another worker owns it now
        else:
            self._hand_back(d, started=running.scope is not None)

    def _hand_back(self, d: Delivery, *, started: bool) -> None:
        """Hand a job back: one the shutdown stopped with the shutdown's hand-backs; one that never
        started (the worker stops, or its expiry passed while it waited for a slot) at once, as
        never delivered, so that its expiry holds."""
        if started:
            self._handed_back.append(d)
            self._more_handed_back.set()
            return
        self._unstarted.append(d)
        # One release takes all that wait: one is on its way already if others wait.
        if len(self._unstarted) == 1 and self._services is not None:
            self._services.start_soon(self._release_unstarted)

    async def _release_unstarted(self) -> None:
        batch, self._unstarted = self._unstarted, []
        await self._release(batch, unstarted=True)

    async def _release(self, deliveries: list[Delivery], *, unstarted: bool = False) -> None:
        if not deliveries:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self.queue.broker.release(self.queue.name, deliveries, unstarted=unstarted)
            except BrokerError as exc:
                logger.warning("could not hand back %d job(s) (they return after the "
                               "visibility timeout): %s", len(deliveries), exc)
        for d in deliveries:
            self._held.pop(d.job_id, None)
        deliveries.clear()

    # --- services --------------------------------------------------------------------------------

    async def _renew_leases(self) -> None:
        queue = self.queue
        while True:
            await anyio.sleep(queue.visibility_timeout / 3)
            held = dict(self._held)
            if not held:
                continue
            try:
                lost = await queue.broker.renew(queue.name, self.name, list(held.values()))
                self._unreachable.reached("renewing leases")  # a full worker's fetch may not ask for a while
            except BrokerError as exc:
                self._unreachable.failed(f"renewing {len(held)} lease(s)", exc)
                continue
            for job_id in lost:
                renewed = held[job_id]
                if self._held.get(job_id) is not renewed or job_id in self._completing:
                    continue  # finished, or delivered anew, while the renewal was under way
                logger.warning("job %s: its lease is gone (another worker took the job over, or Redis "
                               "lost its data): stopping it here", job_id)
                del self._held[job_id]
                running = self._running.get(job_id)
                if running is not None and running.delivery is renewed:
                    running.abandon()

    async def _listen_cancel(self, tried: anyio.Event) -> None:
        """Cancel requests are pushed; a lost connection is listened on again after a pause.
        `tried` is set once listening, or once the first attempt failed (and said so)."""
        def listening() -> None:
            tried.set()
            self._unreachable.reached("listening for cancel requests")

        while True:
            try:
                await self.queue.broker.listen_cancel(self.queue.name, self._cancel_job, listening)
            except BrokerError as exc:
                tried.set()
                if isinstance(exc, BrokerConnectionError):
                    self._unreachable.failed("listening for cancel requests", exc)
                else:
                    logger.warning("listening for cancel requests failed, again in 1s: %s", exc)
                await anyio.sleep(1.0)

    async def _check_cancel(self) -> None:
        """The fallback for a cancel request whose push was missed (e.g. while reconnecting)."""
        while True:
            await anyio.sleep(CANCEL_CHECK)
            if self._running:
                await self._cancel_requested(list(self._running))

    async def _cancel_requested(self, job_ids: list[str]) -> None:
        """Cancel those of these jobs whose cancel the broker holds requested."""
        try:
            requested = await self.queue.broker.cancel_requested(self.queue.name, job_ids)
            self._unreachable.reached("checking for cancel requests")
        except BrokerError as exc:
            self._unreachable.failed("checking for cancel requests", exc)
            return
        for job_id in requested:
            self._cancel_job(job_id)

    def _cancel_job(self, job_id: str) -> None:
        running = self._running.get(job_id)
        if running is None:
            # Most are other workers' jobs; one may be on its way here, its cancel heard before
            # the reply that leases it: it would wait for the fallback check (`_take` asks).
            now = time.monotonic()
            if len(self._early_cancels) >= EARLY_CANCELS_KEPT:
                self._early_cancels = {j: t for j, t in self._early_cancels.items()
                                       if now - t < EARLY_CANCEL_AGE}
                # Room for half as many again before the next sweep; in a storm of cancels, the
                # fallback check has those dropped.
                if len(self._early_cancels) >= EARLY_CANCELS_KEPT // 2:
                    self._early_cancels.clear()
            self._early_cancels[job_id] = now
            return
        if not running.cancel_requested:
            logger.info("job %s (%s): cancel requested", job_id, running.delivery.task)
            running.request_cancel()
            if self._jobs is not None and running in self._ready:
                # Received ahead, it waits for a slot that a long job may hold: it ends cancelled
                # now, without its code running (`execute` sees the request first).
                self._ready.remove(running)
                jobs = self._jobs
                self._clean_context.run(lambda: jobs.start_soon(self._run_job, running))

    async def _schedule(self) -> None:
        """Promote due jobs and enqueue periodic ticks; every worker does it, the broker makes each
        step happen once."""
        queue = self.queue
        next_ticks = {name: tick for name in queue.schedules
                      if (tick := self._next_tick(name, datetime.now(UTC))) is not None}
        early: dict[str, float] = {}  # a tick ahead of the broker's clock: when to ask again
        while True:
            now = time.time()
            try:
                nxt = await queue.broker.promote_due(queue.name, now, PROMOTE_BATCH)
                self._unreachable.reached("scheduling")
                for name, tick in list(next_ticks.items()):
                    if tick.timestamp() <= now and early.get(name, 0.0) <= now:
                        if not await self._enqueue_tick(name, tick.timestamp(), now):
                            early[name] = now + EARLY_TICK_AGAIN  # this host's clock runs ahead
                            continue
                        early.pop(name, None)
                        # The next tick after now: ticks missed while down are not replayed.
                        following = self._next_tick(name, datetime.fromtimestamp(now, UTC))
                        if following is None:
                            del next_ticks[name]
                        else:
                            next_ticks[name] = following
            except BrokerError as exc:
                self._unreachable.failed("scheduling", exc)
                await anyio.sleep(1.0)
                continue
            wait = SCHEDULER_TICK if nxt is None else nxt - time.time()
            for name, tick in next_ticks.items():
                wait = min(wait, max(tick.timestamp(), early.get(name, 0.0)) - time.time())
            await anyio.sleep(min(max(wait, 0.0), SCHEDULER_TICK))

    def _next_tick(self, name: str, moment: datetime) -> datetime | None:
        """A periodic task's next tick; None if its schedule (a Schedule of the user's) failed:
        that task has no more ticks from this worker, and the worker runs on (it stopped, its
        running jobs left to their leases' end)."""
        try:
            return self.queue.schedules[name].next_after(moment)
        except Exception:
            logger.exception("periodic %s: its schedule failed; this worker runs it no more", name)
            return None

    async def _prune(self) -> None:
        """Forget what is left of expired records, a page per step until none are left: as the
        worker starts (one that runs for less than PRUNE_EVERY prunes too), then every PRUNE_EVERY."""
        while True:
            try:
                removed = PRUNE_PAGE
                while removed == PRUNE_PAGE:  # page by page until none are left
                    removed = await self.queue.broker.prune(self.queue.name, time.time(), PRUNE_PAGE)
                self._unreachable.reached("pruning expired records")
            except BrokerError as exc:
                self._unreachable.failed("pruning expired records", exc)
            await anyio.sleep(PRUNE_EVERY)

    async def _enqueue_tick(self, name: str, tick: float, now: float) -> bool:
        """False when the tick is ahead of the broker's clock: not yet."""
        queue = self.queue
        job = queue._new_job(queue.tasks[name], (), {}, NO_OPTIONS, now)
        enqueued = await queue.broker.enqueue_tick(queue.name, tick, job)
        if enqueued:
            logger.debug("periodic %s: tick %s enqueued as job %s", name, tick, job.id)
            if queue.signals.wants(Signal.ENQUEUED):
                await queue.signals.send(Signal.ENQUEUED, SignalJob(job.id, name))
        return enqueued is not None
