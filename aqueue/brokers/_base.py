"""The broker interface: the atomic domain operations every queue feature is built from.

A broker stores opaque payloads plus the few fields it indexes; serialization lives above it. Every
method is one atomic step (one Lua script on Redis, one await-free critical section in memory), so
several workers calling it at once cannot interleave inside it.

Every method takes the queue name first: one broker instance can serve several queues, and several
`Queue` objects given the same broker share its jobs, as several processes share one Redis.
Times are epoch seconds (`float`), read from the caller's clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum


@dataclass(slots=True, frozen=True)
class NewJob:
    """A job as a producer hands it over."""

    id: str
    task: str
    payload: bytes
    priority: int = 0
    eta: float | None = None
    """When it may run (epoch seconds); None, or a time already past, means at once."""
    expires: float | None = None
    """A job not started by then ends `expired` instead of running."""
    key: str | None = None
    """Idempotency key: while a job enqueued with this key is live, enqueue returns that job's id."""
    enqueued_at: float = 0.0
    links: WorkflowLinks | None = None
    """Its place in a workflow, if any."""


@dataclass(slots=True, frozen=True)
class Template:
    """A job to create later (an error handler, a batch callback): its task, payload, priority."""

    task: str
    payload: bytes
    priority: int = 0


def error_handler_id(job_id: str, failure: int = 1) -> str:
    """The id a broker gives the error handler it creates when `job_id` fails for good the
    `failure`-th time (a dead letter retried may fail again, and its handler runs again)."""
    return f"{job_id}:error" if failure == 1 else f"{job_id}:error:{failure}"


def rate_window_ms(per: float) -> int:
    """A rate limit's window, in whole milliseconds (at least one): the length both brokers count
    in. Rounded, not ceiled: 16.1 s is 16100.000000000002 ms, and a window 1 ms longer would drift
    away from the epoch's."""
    return max(1, round(per * 1000))


BATCH_CALLBACK_KINDS = ("success", "failure", "complete")
PRUNE_EVERY = 10.0  # seconds between two prunes of expired records' leftovers (`Broker.prune`)
STATES_BY_RECORDS = 200  # records the default `Broker.get_states` reads at a time


def batch_callback_id(batch_id: str, kind: str) -> str:
    """The id a broker gives a batch's callback of `kind` ("success", "failure", "complete")."""
    return f"{batch_id}:{kind}"


@dataclass(slots=True, frozen=True)
class WorkflowLinks:
    """How a job is tied to others. The broker acts on them when the job reaches a final state."""

    waiting: bool = False
    """Neither ready nor scheduled: a pipeline step or chord callback, activated by a workflow."""
    chord: str | None = None
    slot: int | None = None
    """Its value (or error) fills this slot of the chord; the last to arrive fires the callback."""
    batch: str | None = None
    next: str | None = None
    """The next pipeline step: skipped (ends `cancelled`, with this job's error) if this one
    does not succeed."""
    on_error: Template | None = None
    """Created, with the error as its first argument, if this job fails for good."""


@dataclass(slots=True, frozen=True)
class ChordSpec:
    id: str
    size: int
    callback: str
    """A waiting job, activated with the member values in order as its first argument."""


@dataclass(slots=True, frozen=True)
class BatchSpec:
    id: str
    size: int
    on_success: Template | None = None
    on_failure: Template | None = None
    on_complete: Template | None = None

    def callbacks(self) -> dict[str, Template]:
        """The callbacks it has, by kind (`BATCH_CALLBACK_KINDS`)."""
        templates = (self.on_success, self.on_failure, self.on_complete)
        return {kind: t for kind, t in zip(BATCH_CALLBACK_KINDS, templates, strict=True) if t is not None}


@dataclass(slots=True)
class JobRecord:
    """Everything the broker keeps about one job."""

    id: str
    task: str
    state: str
    payload: bytes
    priority: int = 0
    attempt: int = 1
    enqueued_at: float = 0.0
    eta: float | None = None
    expires: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    result: bytes | None = None
    error: bytes | None = None
    progress: bytes | None = None
    key: str | None = None
    dead_reason: str | None = None
    failures: int = 0
    """How often it has failed for good: a dead letter retried may fail again."""
    asked: int = 0
    """How many of its runs ended in a retry the job asked for (`RetryTask`), which uses up none
    of its task's retries."""


@dataclass(slots=True)
class Delivery:
    """One hand-over of a job to a worker, leased to it until finished, released or lost."""

    job_id: str
    task: str
    payload: bytes
    attempt: int
    """1-based; grows by one with each retry (not with a redelivery)."""
    token: int
    """Fencing token: grows with every delivery of the job. Operations carrying a stale token
    (the job was since delivered again) change nothing, but for a success (`Broker.finish`)."""
    priority: int
    enqueued_at: float
    receipt: str
    """The broker's own handle for this delivery (on Redis, the stream entry id)."""
    ended: str | None = None
    """Set when the broker ended the job instead of leasing it (`expired`, `revoked`, `cancelled`,
    or `failed`: dead-lettered past max_deliveries): the worker only reports it; it holds no lease."""
    consumer: str = ""
    """Whom it was handed to."""
    leased_at: float = 0.0
    """When it was handed over (epoch seconds): the job's start, as its record tells it."""
    expires: float | None = None
    """The job's `expires` (epoch seconds) while it holds: set only when no delivery before this
    one started the job. A worker that would start it later (it waited for a slot) hands it back
    unstarted instead, to end expired."""
    asked: int = 0
    """Of the job's runs before this one, those that ended in a retry it asked for (`RetryTask`),
    which use none of the task's retries: the record's `asked`."""


class Outcome(StrEnum):
    """How a delivery ends."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # for good: the job also enters the dead letters with `reason`
    CANCELLED = "cancelled"
    RETRY = "retry"  # attempt + 1, ready again at `retry_at`
    DEFER = "defer"  # ready again at `retry_at`, attempt unchanged (a rate limit, not a failure)


@dataclass(slots=True)
class Completion:
    """What a worker reports when a delivery ends."""

    delivery: Delivery
    outcome: Outcome
    finished_at: float
    result: bytes | None = None
    error: bytes | None = None
    retry_at: float | None = None
    reason: str | None = None
    """Why a failed job is in the dead letters."""
    activate: tuple[tuple[str, bytes], ...] = ()
    """With a success: waiting jobs to make ready, with their payloads (the next pipeline step,
    its arguments built from this job's value), in the same atomic step."""
    asked: bool = False
    """With a RETRY: the job asked for it (`RetryTask`); it uses none of the task's retries."""


class Broker(ABC):
    """Abstract async broker. `MemoryBroker` and `RedisBroker` are the two shipped implementations."""

    url: str = ""
    """Where the broker lives, for log lines: never carries a password."""

    def check_for_worker(self) -> None:  # noqa: B027 - most brokers need no check
        """Raise `ConfigurationError` if, as connected, it cannot serve one worker more than those
        running on it (`serving_worker`)."""

    _workers = 0
    """Workers running on this broker (`serving_worker`), for `check_for_worker`."""

    @contextmanager
    def serving_worker(self) -> Iterator[None]:
        """Held by a worker while it runs on this broker; checks first (`check_for_worker`)."""
        self.check_for_worker()
        self._workers += 1
        try:
            yield
        finally:
            self._workers -= 1

    @abstractmethod
    async def connect(self) -> None:
        """Open connections. Idempotent. Raises `BrokerConnectionError` when unreachable."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent; the broker may connect again afterwards."""

    def _data_home(self) -> object:
        """What tells apart, in this process, where the broker keeps its data: the same for two
        broker objects on one store (a lock held through one is held through the other)."""
        return self

    # --- producing -------------------------------------------------------------------------------

    @abstractmethod
    async def enqueue(
        self,
        queue: str,
        jobs: Sequence[NewJob],
        chords: Sequence[ChordSpec] = (),
        batches: Sequence[BatchSpec] = (),
    ) -> list[str]:
        """Store each job and make it ready (state `pending`) or scheduled (`scheduled`, when its
        eta is in the future, or while it waits on a workflow). Each job is one atomic step; the
        list is not one transaction, except that a call with chords or batches stores them and
        all its jobs in one atomic step.

        Whenever a job reaches a final state (finished, cancelled, expired, revoked, dead), the
        broker applies its `WorkflowLinks` in the same atomic step: chord slots (each member
        counted once), batch counts and callbacks (each fired once, as `batch_callback_id`),
        skipping the rest of a pipeline, creating the error handler (as `error_handler_id`; the
        record's `failures` grows by one with each failure for good, before the handler is made).

        Returns the id under which each job lives: its own, or, when its idempotency key names a
        job that is still live (not in a final state), that job's id, and nothing is stored.
        Enqueueing an id that already exists replaces nothing and returns the id.
        """

    # --- consuming -------------------------------------------------------------------------------

    @abstractmethod
    async def receive(
        self, queue: str, consumer: str, count: int, timeout: float, max_deliveries: int
    ) -> list[Delivery]:
        """Lease up to `count` ready jobs to `consumer`, highest priority first, then oldest first.

        Waits up to `timeout` seconds for the first job (no busy polling), returns at once when
        some are ready. Each returned job is now `running`: `started_at`, `worker = consumer` set,
        its token grown by one, its delivery count grown by one. A job whose delivery count would
        pass `max_deliveries` is not leased: it ends `failed` in the dead letters with the reason,
        its error a `DeliveryLimitExceeded` (TaskError metadata, as a worker writes one).
        A job past its `expires` ends `expired`, a revoked job (its own flag, or its task revoked)
        ends `revoked`, one asked to cancel ends `cancelled`: each of these is returned with
        `ended` set and no lease, so the worker can report it. Returns [] on timeout.
        """

    @abstractmethod
    async def claim(
        self, queue: str, consumer: str, job_id: str, max_deliveries: int
    ) -> Delivery | None:
        """Lease this one job if it is ready (`pending`), as `receive` would; None otherwise.
        Immediate mode runs the jobs its enqueue stored with it, and the live job an idempotency
        key found in one's place (no worker may be there to run it); never another job."""

    @abstractmethod
    async def forget_consumer(self, queue: str, consumer: str) -> None:
        """A worker stopped cleanly: drop what the broker keeps for `consumer` (a consumer that
        still holds leases is kept, so they can be taken over)."""

    @abstractmethod
    async def prune(self, queue: str, now: float, limit: int) -> int:
        """Forget what is left of up to `limit` records that expired by `now` (their entries in
        the listing index), and task revocations that lapsed by then (on Redis, also consumers
        that hold nothing and have read nothing for an hour). Returns how many records; fewer
        than `limit` means none are left."""

    @abstractmethod
    async def interrupt_receive(self, queue: str, consumer: str) -> bool:
        """Make a `receive` of `consumer` that is waiting return now, as if its timeout passed,
        without losing any job. True if one was waiting; a no-op (False) otherwise."""

    @abstractmethod
    async def reclaim(
        self, queue: str, consumer: str, count: int, idle: float, max_deliveries: int
    ) -> list[Delivery]:
        """Take over up to `count` leased jobs whose lease has not been renewed for `idle` seconds
        (their worker died) and lease them to `consumer`, exactly as `receive` would. Never waits."""

    @abstractmethod
    async def recover(
        self, queue: str, consumer: str, held: Sequence[Delivery], max_deliveries: int
    ) -> list[Delivery]:
        """Hand `consumer` again every job leased to it that `held` does not name with the
        job's newest token: a `receive` or `reclaim` whose answer was lost (the connection
        dropped after the broker acted) leased jobs its worker never heard of, or took over one
        it holds under an older token. Each comes under the lease the consumer holds (its newest
        token; no delivery counted again; the lease renewed), all of them, however many. Where
        the broker cannot tell that call's lease from a fresh one (a job it had not yet started;
        on Redis, a lean delivery while some task is revoked), the job is leased as `receive`
        would lease it, and may come ended, as a notice. Never waits."""

    @abstractmethod
    async def renew(self, queue: str, consumer: str, deliveries: Sequence[Delivery]) -> list[str]:
        """Renew the leases of these deliveries held by `consumer`, all in one step.

        Returns the ids of jobs whose lease `consumer` no longer holds (it lapsed and another
        worker took the job over, or the job was finished elsewhere): their lease is not touched.
        """

    @abstractmethod
    async def finish(
        self, queue: str, completions: Sequence[Completion], result_ttl: float
    ) -> list[bool]:
        """End each delivery as its completion says, each in one atomic step: drop the lease and
        the ready entry, store the outcome, wake anyone waiting on the job.

        - SUCCEEDED / CANCELLED / FAILED: final; `finished_at`, `result` / `error` stored; the
          idempotency key is freed. SUCCEEDED and CANCELLED records expire after `result_ttl`
          seconds. FAILED puts the job in the dead letters with `reason`; its record is kept
          until it is retried or purged.
        - RETRY: `attempt` + 1, delivery count reset; `scheduled` until `retry_at`, or
          `pending` at once when `retry_at` is None or past (with `asked`, the record's `asked`
          + 1 too). DEFER: the same, attempt unchanged.

        Returns, for each, whether it applied. A completion whose token is stale (the job has been
        delivered again since) changes nothing and gives False: the newer delivery owns the job.
        Except a SUCCEEDED one from an earlier delivery of the run still going on (same receipt,
        the job still `running`): its worker was alive but silent (a blocked event loop) while
        another took the job over, and the work is done, so it ends the job and the newer
        delivery's lease with it. Refused, it would hand the job round until the dead letters.
        """

    @abstractmethod
    async def release(
        self, queue: str, deliveries: Sequence[Delivery], *, unstarted: bool = False
    ) -> None:
        """Hand leased jobs back unfinished (a worker shutting down): each is `pending` again and
        ready at once for any worker; its delivery count is lowered by one, because a hand-back is
        not a failed delivery. Stale tokens are ignored. `unstarted`: the jobs' code never ran
        (they waited for a slot): the `expires` a delivery carries (`Delivery.expires`: none for a
        job that started before) holds on as for a job never delivered, where a job that started
        is never expired afterwards."""

    @abstractmethod
    async def promote_due(self, queue: str, now: float, limit: int) -> float | None:
        """Make up to `limit` scheduled jobs whose eta is <= `now` ready (`pending`).

        Returns the eta of the earliest job still scheduled, or None when none is. Safe to call
        from many workers at once: each job is promoted once.
        """

    # --- observing -------------------------------------------------------------------------------

    @abstractmethod
    async def get(self, queue: str, job_id: str) -> JobRecord | None:
        """The job's record, or None when unknown (never enqueued, or expired)."""

    async def get_many(self, queue: str, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Each job's record as `get` gives it, in the order of `job_ids`. A broker that can read
        many records in one round trip overrides this; this one reads them one by one."""
        return [await self.get(queue, job_id) for job_id in job_ids]

    async def get_states(self, queue: str, job_ids: Sequence[str]) -> list[str | None]:
        """Each job's state as `get` gives it (None: no record), in the order of `job_ids`. A
        broker that can read states without the rest of the records (payloads, results) overrides
        this; this one reads the records through `get_many`, a chunk at a time, so that no more
        than a chunk's payloads are held at once."""
        states: list[str | None] = []
        for start in range(0, len(job_ids), STATES_BY_RECORDS):
            records = await self.get_many(queue, job_ids[start:start + STATES_BY_RECORDS])
            states += [None if r is None else r.state for r in records]
        return states

    @abstractmethod
    async def wait(self, queue: str, job_id: str, timeout: float | None) -> JobRecord | None:
        """Wait, without polling, until the job is in a final state, and return its record.
        Once final, the record may hold only the outcome (state, attempt, result, error,
        dead_reason): what `job.result()` reads.

        Returns None at once when the job is unknown. When `timeout` (seconds; None waits forever)
        passes first, returns the record as it stands then (not final), or raises TimeoutError
        when the record cannot be read promptly then either.
        """

    @abstractmethod
    async def jobs(
        self, queue: str, state: str | None, task: str | None, limit: int
    ) -> list[JobRecord]:
        """Up to `limit` records, newest enqueued first, filtered by state and task when given."""

    @abstractmethod
    async def set_progress(self, queue: str, job_id: str, token: int, progress: bytes) -> bool:
        """Store a running job's progress. False (and nothing stored) when the token is stale.
        A retry, a reschedule (`finish`), a hand-back (`release`) and a delivery after one that
        lapsed clear it: the next run starts over."""

    # --- dead letters ----------------------------------------------------------------------------

    @abstractmethod
    async def dead_letters(self, queue: str, limit: int) -> list[JobRecord]:
        """Up to `limit` dead-lettered records, newest first. Dead letters do not expire."""

    @abstractmethod
    async def retry(self, queue: str, job_id: str, now: float) -> bool:
        """Take a job out of the dead letters and make it ready again with a fresh attempt count
        (attempt 1, delivery count 0, result and error cleared). A revoke or cancel asked for
        while it ran is cleared; it takes its idempotency key back unless a live job holds it.
        The pipeline steps its failure skipped (still kept) wait again for it, so that its
        success runs them. False when it is not a dead letter."""

    @abstractmethod
    async def purge_dead_letters(self, queue: str) -> int:
        """Delete every dead-lettered job and its record. Returns how many."""

    # --- control ---------------------------------------------------------------------------------

    @abstractmethod
    async def cancel(self, queue: str, job_id: str, now: float, result_ttl: float) -> str | None:
        """Cancel a job. A `pending` or `scheduled` job ends `cancelled` at once and never runs
        ("cancelled"). A `running` one is marked and its worker told through `listen_cancel`
        ("requested"): the worker ends it `cancelled`. None when unknown or already final."""

    @abstractmethod
    async def listen_cancel(
        self, queue: str, on_request: Callable[[str], None], on_listening: Callable[[], None]
    ) -> None:
        """Until cancelled, call `on_request(job_id)` for each cancel request of a running job, as
        it is made (pushed, not polled). `on_listening()` is called once requests made from then
        on will reach it (again after a reconnection). Requests made while not listening are not
        replayed: `cancel_requested` is the fallback check."""

    @abstractmethod
    async def cancel_requested(self, queue: str, job_ids: Sequence[str]) -> list[str]:
        """Which of these jobs have a cancel request pending."""

    @abstractmethod
    async def revoke(self, queue: str, job_id: str, revoked: bool) -> bool:
        """Set (or, with False, clear) a job's revoked flag; a revoked job that a worker meets ends
        `revoked` instead of running. False when the job is unknown or final."""

    @abstractmethod
    async def revoke_task(
        self, queue: str, task: str, once: bool, until: float | None
    ) -> None:
        """Revoke every job of `task` that a worker meets: all of them until restored, or until
        `until`, or (`once`) only the next one met."""

    @abstractmethod
    async def restore_task(self, queue: str, task: str) -> bool:
        """Undo `revoke_task`. False when the task was not revoked (or its `until` had passed)."""

    @abstractmethod
    async def revoked(self, queue: str, job_id: str | None, task: str, now: float) -> bool:
        """Whether the job (when given) or its task is revoked at `now`."""

    @abstractmethod
    async def enqueue_tick(self, queue: str, tick: float, job: NewJob) -> bool | None:
        """Enqueue a periodic task's job for `tick` unless a job for this task and a tick at or
        after it was enqueued already: however many schedulers call it, each tick is enqueued
        once. True when this call enqueued it; None when `tick` is ahead of the broker's clock
        (the caller's runs ahead): not yet, ask again shortly."""

    @abstractmethod
    async def lock_acquire(self, queue: str, name: str, token: str, ttl: float) -> bool:
        """Take the lock for `token` for `ttl` seconds if it is free (or its ttl lapsed)."""

    @abstractmethod
    async def lock_extend(self, queue: str, name: str, token: str, ttl: float) -> bool:
        """Extend the lock to `ttl` seconds from now, only if `token` holds it."""

    @abstractmethod
    async def lock_release(self, queue: str, name: str, token: str) -> bool:
        """Free the lock, only if `token` holds it, and wake its waiters."""

    @abstractmethod
    async def lock_wait(self, queue: str, name: str, timeout: float | None) -> None:
        """Wait, without polling, until the lock is released, its ttl lapses, or `timeout` passes
        (None: no limit). Returns at once when the lock is free."""

    @abstractmethod
    async def rate_limit_hit(self, queue: str, key: str, limit: int, per: float) -> float:
        """Count one hit in the current window of `per` seconds (windows aligned to the epoch) of
        the broker's own clock, so that callers whose clocks differ count in the same window.
        Returns 0 when admitted (at most `limit` are per window), else the seconds until the next
        window."""
