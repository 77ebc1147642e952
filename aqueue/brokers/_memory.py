"""In-memory broker: the Redis broker's twin in one process, for tests and single-process use.

Every method is one await-free critical section, so it is atomic under asyncio, as each Redis
method is one Lua script. Only `receive`, `wait` and `lock_wait` await, and only on an event.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import anyio
import orjson
from anyio.lowlevel import RunVar

from aqueue._exceptions import DeliveryLimitExceeded
from aqueue._states import FINAL_STATES, JobState
from aqueue.brokers._base import (
    PRUNE_EVERY,
    BatchSpec,
    Broker,
    ChordSpec,
    Completion,
    Delivery,
    JobRecord,
    NewJob,
    Outcome,
    Template,
    WorkflowLinks,
    batch_callback_id,
    error_handler_id,
    rate_window_ms,
)

ARGS_HEAD = b'{"args":['
ERROR_HEAD = b'{"__aqueue_error__":'


def prepend_arg(payload: bytes, value: bytes) -> bytes:
    """Payloads are written by aqueue with "args" first: put a value in front of the arguments."""
    rest = payload[len(ARGS_HEAD):]
    return ARGS_HEAD + value + (rest if rest.startswith(b"]") else b"," + rest)


def error_marker(error: bytes | None) -> bytes:
    return ERROR_HEAD + (error or b"{}") + b"}"


_ENDING_NAMES = {"cancelled": "JobCancelled", "revoked": "JobRevoked", "expired": "JobExpired"}


def ending_error(job_id: str, state: str, attempt: int, reason: str | None = None) -> bytes:
    """The error that stands for a job that ended without one of its own (in its chord slot, in
    the pipeline steps it skipped, for its error handler): `TaskError` metadata with every key; a
    cancelled, revoked or expired job's names the ending as `job.result()` would, and a failed
    one's gives why it went to the dead letters (`reason`)."""
    kind = _ENDING_NAMES.get(state, "")
    error = f"{kind}('job {job_id} was {state}')" if kind else (reason or "failed")
    return _error_metadata(job_id, attempt, kind, error)


def _error_metadata(job_id: str, attempt: int, kind: str, error: str) -> bytes:
    """TaskError metadata for an error that ended a job without running it: no frames of its own."""
    return orjson.dumps({"error": error, "type": kind, "traceback": "", "job_id": job_id,
                         "attempt": attempt, "retries_left": 0})


_LOOP: RunVar[object] = RunVar("aqueue_memory_broker_loop")
K = TypeVar("K")


def _this_loop() -> object:
    """A marker of the running event loop, the same for its whole life."""
    marker = _LOOP.get(None)
    if marker is None:
        marker = object()
        _LOOP.set(marker)
    return marker


class _LoopEvent:
    """An `anyio.Event` with the event loop it belongs to. A broker can outlive a loop (a
    module-level queue in tests that each run their own loop), and an asyncio event bound to one
    loop cannot be awaited in another: an event of an earlier loop is replaced, never used."""

    __slots__ = ("ended", "event", "loop")

    def __init__(self) -> None:
        self.event, self.loop = anyio.Event(), _this_loop()
        self.ended: JobRecord | None = None  # a job's end, for those its `done` event wakes

    def live(self) -> bool:
        return self.loop is _this_loop()

    def set(self) -> None:
        if self.live():  # waiters of a finished loop are gone with it
            self.event.set()


def _event(events: dict[K, _LoopEvent], key: K) -> _LoopEvent:
    """The event of this loop under `key`, made (or remade) if needed."""
    event = events.get(key)
    if event is None or not event.live():
        event = events[key] = _LoopEvent()
    return event


@dataclass(slots=True)
class _Chord:
    size: int
    callback: str
    slots: dict[int, bytes] = field(default_factory=dict)
    base: bytes | None = None  # the callback's payload before the values: set as it fires
    expires_at: float | None = None  # fired with an error in a slot: kept as long as a record

    def values(self) -> bytes:
        """Every slot's value, in member order, as the callback's first argument (JSON)."""
        return b"[" + b",".join(self.slots[i] for i in range(self.size)) + b"]"


@dataclass(slots=True)
class _Batch:
    size: int
    callbacks: dict[str, Template]
    members: dict[str, str] = field(default_factory=dict)  # job id -> final state
    fired: set[str] = field(default_factory=set)
    expires_at: float | None = None  # kept by a skipped member, as long as its record



@dataclass(slots=True)
class _Queue:
    """The state of one queue name."""

    records: dict[str, JobRecord] = field(default_factory=dict)  # insertion order = enqueue order
    tokens: dict[str, int] = field(default_factory=dict)
    unstarted: set[str] = field(default_factory=set)
    """Jobs handed back that were delivered but never started: their expiry still holds."""
    deliveries: dict[str, int] = field(default_factory=dict)
    entries: dict[str, int] = field(default_factory=dict)
    """The job's live heap entry (its receipt); older heap entries for it are stale, skipped."""
    ready: list[tuple[int, int, str]] = field(default_factory=list)  # (-priority, entry, id)
    scheduled: list[tuple[float, int, str]] = field(default_factory=list)  # (eta, entry, id)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> consumer, renewed
    expiry: dict[str, float] = field(default_factory=dict)  # id -> epoch time the record goes
    dead: dict[str, None] = field(default_factory=dict)  # insertion order = order of death
    keys: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    done: dict[str, _LoopEvent] = field(default_factory=dict)  # set when the job ends
    wakeup: _LoopEvent | None = None  # set when a job becomes ready
    receivers: dict[str, anyio.CancelScope] = field(default_factory=dict)  # consumer -> receive
    cancel: set[str] = field(default_factory=set)  # running jobs with a cancel request
    cancel_listeners: list[Callable[[str], None]] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)  # jobs revoked one by one
    revoked_tasks: dict[str, tuple[bool, float | None]] = field(default_factory=dict)  # once, until
    ticks: dict[str, float] = field(default_factory=dict)  # periodic task -> last tick enqueued
    locks: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> token, deadline
    lock_released: dict[str, _LoopEvent] = field(default_factory=dict)
    rates: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)
    """(key, window length in ms) -> window, hits: two limits on one key with windows of different
    lengths count apart, as Redis counts each window under a key of its own."""
    links: dict[str, WorkflowLinks] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)  # jobs a workflow will activate
    skipped: set[str] = field(default_factory=set)  # pipeline steps skipped by a failed step
    fresh: dict[str, int] = field(default_factory=dict)
    """A chord callback given new values as it ran -> the first token to carry them (see
    `_fire_again`)."""
    pruned_at: float = 0.0  # epoch time of the last prune, a worker's or its own (`_prune_now_and_then`)
    chords: dict[str, _Chord] = field(default_factory=dict)
    batches: dict[str, _Batch] = field(default_factory=dict)


class MemoryBroker(Broker):
    """Jobs in dicts and heaps; leases timed with `time.monotonic()`.

    `result_ttl` is how long the record of a job that expires before it runs is kept (`finish`
    takes its own ttl; `receive` has none to pass).
    """

    url = "memory://"

    def __init__(self, *, result_ttl: float = 86_400.0) -> None:
        self._queues: dict[str, _Queue] = {}
        self._seq = itertools.count(1)
        self._result_ttl = result_ttl

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass  # the jobs stay: connecting again finds them, as with Redis

    # --- producing -------------------------------------------------------------------------------

    async def enqueue(
        self,
        queue: str,
        jobs: Sequence[NewJob],
        chords: Sequence[ChordSpec] = (),
        batches: Sequence[BatchSpec] = (),
    ) -> list[str]:
        q = self._queue(queue)
        now = time.time()
        self._prune_now_and_then(q, now)
        for c in chords:
            q.chords[c.id] = _Chord(c.size, c.callback)
        for b in batches:
            q.batches[b.id] = _Batch(b.size, b.callbacks())
        return [self._store(q, job, now) for job in jobs]

    def _live_key_holder(self, q: _Queue, key: str, now: float) -> str | None:
        """The live job an idempotency key names, if any (the key may outlive its job's end). A
        job past its expiry that never started is not: it ends expired when met, and never runs.
        Nor is one revoked that no worker holds: it ends revoked when met. One revoked while a
        worker holds it may be running, and runs on: it keeps the key."""
        holder = q.keys.get(key)
        rec = self._record(q, holder) if holder is not None else None
        if rec is None or rec.state in FINAL_STATES:
            return None
        if rec.expires is not None and rec.expires < now and self._never_started(q, rec.id):
            return None
        if rec.id in q.revoked and rec.id not in q.leases:
            return None
        return holder

    def _store(self, q: _Queue, job: NewJob, now: float) -> str:
        live = self._live_key_holder(q, job.key, now) if job.key is not None else None
        if live is not None:
            return live
        if self._record(q, job.id) is None:
            rec = JobRecord(id=job.id, task=job.task, state=JobState.PENDING.value,
                            payload=job.payload, priority=job.priority,
                            enqueued_at=job.enqueued_at or now, eta=job.eta,
                            expires=job.expires, key=job.key)
            q.records[job.id] = rec
            if job.links is not None:
                q.links[job.id] = job.links
            if job.links is not None and job.links.waiting:
                rec.state = JobState.SCHEDULED.value
                q.waiting.add(job.id)
            elif job.eta is not None and job.eta > (job.enqueued_at or now):
                # Judged at the producer's moment, as on Redis: a job the producer said it
                # scheduled (and signalled so) is scheduled, however soon its eta comes.
                self._schedule(q, rec, job.eta)
            else:
                self._make_ready(q, rec)
            if job.key is not None:
                q.keys[job.key] = job.id
        return job.id

    # --- consuming -------------------------------------------------------------------------------

    async def receive(
        self, queue: str, consumer: str, count: int,
        timeout: float,
        max_deliveries: int,
    ) -> list[Delivery]:
        q = self._queue(queue)
        with anyio.move_on_after(timeout) as scope:
            q.receivers[consumer] = scope  # for interrupt_receive
            try:
                while count > 0:
                    out: list[Delivery] = []
                    while q.ready and len(out) < count:
                        _, entry, job_id = heapq.heappop(q.ready)
                        rec = q.records.get(job_id)
                        if rec and q.entries.get(job_id) == entry and rec.state == "pending":
                            if d := self._deliver(q, rec, consumer, max_deliveries):
                                out.append(d)
                    if out:
                        return out
                    if q.wakeup is None or not q.wakeup.live():
                        q.wakeup = _LoopEvent()
                    # The only await: a cancel lands here, before any job is taken.
                    await q.wakeup.event.wait()
            finally:
                if q.receivers.get(consumer) is scope:
                    del q.receivers[consumer]
        return []

    async def claim(
        self, queue: str, consumer: str, job_id: str, max_deliveries: int
    ) -> Delivery | None:
        q = self._queue(queue)
        rec = self._record(q, job_id)
        if rec is None or rec.state != JobState.PENDING:
            return None
        return self._deliver(q, rec, consumer, max_deliveries)  # its heap entry is now stale

    async def forget_consumer(self, queue: str, consumer: str) -> None:
        self._queue(queue).receivers.pop(consumer, None)

    async def prune(self, queue: str, now: float, limit: int) -> int:
        return self._prune(self._queue(queue), now, limit)

    def _prune_now_and_then(self, q: _Queue, now: float) -> None:
        """Redis expires records itself; here only pruning drops them, and a process with no
        worker (immediate mode, a producer, rate limits alone) has none pruning: what it stores
        grew for good. Pruned here too, at most once per PRUNE_EVERY."""
        if now - q.pruned_at >= PRUNE_EVERY:
            self._prune(q, now, len(q.expiry))

    def _prune(self, q: _Queue, now: float, limit: int) -> int:
        q.pruned_at = now
        expired = [job_id for job_id, at in q.expiry.items() if at <= now][:limit]
        for job_id in expired:
            self._drop(q, job_id)
        for batch_id in [b for b, batch in q.batches.items()
                         if batch.expires_at is not None and batch.expires_at <= now]:
            del q.batches[batch_id]
        for chord_id in [c for c, chord in q.chords.items()
                         if chord.expires_at is not None and chord.expires_at <= now]:
            del q.chords[chord_id]
        for task in [task for task, (_, until) in q.revoked_tasks.items()
                     if until is not None and until <= now]:
            del q.revoked_tasks[task]
        # A rate limit's count goes with its window, as its Redis key expires (one per user's key
        # grew the dict for ever).
        for rate in [(key, per_ms) for (key, per_ms), (window, _) in q.rates.items()
                     if (window + 1) * per_ms <= now * 1000]:
            del q.rates[rate]
        # Heap entries of jobs taken out of turn (immediate mode claims its own, a cancel or a
        # revoke ends one waiting) wait for a receive to meet them: with none, they piled up.
        if len(q.ready) > 2 * len(q.entries) + 64:
            q.ready = [item for item in q.ready if q.entries.get(item[2]) == item[1]]
            heapq.heapify(q.ready)
        return len(expired)

    async def interrupt_receive(self, queue: str, consumer: str) -> bool:
        scope = self._queue(queue).receivers.pop(consumer, None)
        if scope is None or scope.cancel_called:
            return False
        scope.cancel()  # the receive returns [] as on timeout
        return True

    async def reclaim(
        self, queue: str, consumer: str, count: int, idle: float, max_deliveries: int
    ) -> list[Delivery]:
        q = self._queue(queue)
        cutoff = time.monotonic() - idle
        lapsed = [q.records[i] for i, (_, renewed) in q.leases.items() if renewed <= cutoff]
        # In the order receive hands jobs out, as Redis scans its bands.
        lapsed.sort(key=lambda r: (-r.priority, q.entries[r.id]))
        out: list[Delivery] = []
        for rec in lapsed:
            if len(out) >= count:
                break
            if d := self._deliver(q, rec, consumer, max_deliveries):
                out.append(d)
        return out

    async def recover(
        self, queue: str, consumer: str, held: Sequence[Delivery], max_deliveries: int
    ) -> list[Delivery]:
        q = self._queue(queue)
        known = {d.receipt: d.token for d in held}
        lost = [q.records[i] for i, (owner, _) in q.leases.items()
                if owner == consumer and known.get(str(q.entries[i])) != q.tokens[i]]
        lost.sort(key=lambda r: (-r.priority, q.entries[r.id]))
        now = time.monotonic()
        out: list[Delivery] = []
        for rec in lost:
            q.leases[rec.id] = (consumer, now)
            out.append(self._leased(q, rec, consumer, rec.started_at or time.time()))
        return out

    async def renew(self, queue: str, consumer: str, deliveries: Sequence[Delivery]) -> list[str]:
        q = self._queue(queue)
        lost: list[str] = []
        now = time.monotonic()
        for d in deliveries:
            # Held as Redis holds it: the same entry, leased to this consumer. A lease the consumer
            # took over from itself is still its own, under whichever of its deliveries.
            lease = q.leases.get(d.job_id)
            if lease is not None and lease[0] == consumer and str(q.entries.get(d.job_id)) == d.receipt:
                q.leases[d.job_id] = (consumer, now)
            else:
                lost.append(d.job_id)
        return lost

    async def finish(
        self, queue: str, completions: Sequence[Completion], result_ttl: float
    ) -> list[bool]:
        q = self._queue(queue)
        out: list[bool] = []
        for c in completions:
            holds = self._holds(q, c.delivery)
            outdated = c.delivery.token < q.fresh.get(c.delivery.job_id, 0)
            # A late success ends the job, but not once its payload changed since (see
            # `_late_success`, `_fire_again`).
            if not (holds or (self._late_success(q, c) and not outdated)):
                out.append(False)
                continue
            rec = q.records[c.delivery.job_id]
            if not holds:
                # A late success: the record names the run that ended the job, not the newer one.
                rec.started_at, rec.worker = c.delivery.leased_at, c.delivery.consumer
            del q.leases[rec.id]
            outcome, error, reason = c.outcome, c.error, c.reason
            if outcome not in (Outcome.SUCCEEDED, Outcome.CANCELLED) and rec.id in q.cancel:
                # A cancel asked for while it ran outlasts a failure that came before the job heard
                # of it: neither retried nor dead-lettered, it ends cancelled.
                outcome, error, reason = Outcome.CANCELLED, None, None
            if outcome in (Outcome.SUCCEEDED, Outcome.FAILED) and outdated:
                # A chord callback whose values changed while it ran (see `_fire_again`): it runs
                # again with them, and this run's end is not the job's (its steps, chord and
                # waiters wait for the next). A revoke or cancel asked for meanwhile stands.
                self._rearm(q, rec, asks_stand=True)
            elif outcome in (Outcome.RETRY, Outcome.DEFER):
                if error is not None:
                    rec.error = error
                rec.attempt += outcome == Outcome.RETRY
                rec.asked += outcome == Outcome.RETRY and c.asked
                rec.progress = None  # the next run starts over
                q.deliveries[rec.id] = 0
                if c.retry_at is not None and c.retry_at > c.finished_at:
                    self._schedule(q, rec, c.retry_at)
                else:
                    self._make_ready(q, rec)
            else:
                if outcome == Outcome.SUCCEEDED:
                    rec.result = c.result
                self._finalize(q, rec, outcome.value, c.finished_at, result_ttl, reason, error)
                if outcome == Outcome.SUCCEEDED:
                    for job_id, payload in c.activate:
                        self._activate(q, job_id, payload)
            out.append(True)
        return out

    async def release(
        self, queue: str, deliveries: Sequence[Delivery], *, unstarted: bool = False
    ) -> None:
        q = self._queue(queue)
        for d in deliveries:
            if self._holds(q, d):
                del q.leases[d.job_id]
                q.deliveries[d.job_id] -= 1  # a hand-back is not a failed delivery
                rec = q.records[d.job_id]
                if unstarted and d.expires is not None:
                    q.unstarted.add(rec.id)
                rec.started_at = rec.worker = rec.progress = None  # no one runs it now
                self._make_ready(q, rec)

    async def promote_due(self, queue: str, now: float, limit: int) -> float | None:
        q = self._queue(queue)
        promoted = 0
        while q.scheduled:
            eta, entry, job_id = q.scheduled[0]
            rec = q.records.get(job_id)
            live = rec is not None and q.entries.get(job_id) == entry
            if live and (eta > now or promoted >= limit):
                return eta
            heapq.heappop(q.scheduled)
            if rec is not None and live:
                self._make_ready(q, rec)
                promoted += 1
        return None

    # --- observing -------------------------------------------------------------------------------

    async def get(self, queue: str, job_id: str) -> JobRecord | None:
        rec = self._record(self._queue(queue), job_id)
        return replace(rec) if rec else None

    async def get_many(self, queue: str, job_ids: Sequence[str]) -> list[JobRecord | None]:
        q = self._queue(queue)
        return [replace(rec) if (rec := self._record(q, job_id)) else None for job_id in job_ids]

    async def get_states(self, queue: str, job_ids: Sequence[str]) -> list[str | None]:
        q = self._queue(queue)
        return [rec.state if (rec := self._record(q, job_id)) else None for job_id in job_ids]

    async def wait(
        self, queue: str, job_id: str,
        timeout: float | None,
    ) -> JobRecord | None:
        q = self._queue(queue)
        rec = self._record(q, job_id)
        if rec is None or rec.state in FINAL_STATES:
            return replace(rec) if rec else None
        done = _event(q.done, job_id)
        with anyio.move_on_after(timeout):  # None: no deadline
            await done.event.wait()
        if done.ended is not None:
            # The end it woke for, as Redis's message tells it: the job may be running again by
            # now (a chord's callback given a retried member's value at once).
            return replace(done.ended)
        if q.done.get(job_id) is done and done.event.statistics().tasks_waiting == 0:
            del q.done[job_id]  # the last waiter gave up: don't keep the event for ever
        rec = self._record(q, job_id)
        return replace(rec) if rec else None

    async def jobs(
        self, queue: str, state: str | None, task: str | None, limit: int
    ) -> list[JobRecord]:
        q = self._queue(queue)
        found = [
            rec for job_id in reversed(list(q.records))
            if (rec := self._record(q, job_id))
            and (state is None or rec.state == state) and (task is None or rec.task == task)
        ]
        # A stable sort keeps the later-enqueued of equal `enqueued_at` first.
        found.sort(key=lambda r: r.enqueued_at, reverse=True)
        return [replace(r) for r in found[: max(limit, 0)]]

    async def set_progress(self, queue: str, job_id: str, token: int, progress: bytes) -> bool:
        q = self._queue(queue)
        if q.tokens.get(job_id) != token or job_id not in q.leases:
            return False
        q.records[job_id].progress = progress
        return True

    # --- dead letters ----------------------------------------------------------------------------

    async def dead_letters(self, queue: str, limit: int) -> list[JobRecord]:
        q = self._queue(queue)
        newest_first = list(reversed(q.dead))[: max(limit, 0)]
        return [replace(q.records[job_id]) for job_id in newest_first]

    async def retry(self, queue: str, job_id: str, now: float) -> bool:
        q = self._queue(queue)
        if job_id not in q.dead:
            return False
        del q.dead[job_id]
        rec = q.records[job_id]
        if rec.key is not None and self._live_key_holder(q, rec.key, time.time()) is None:
            q.keys[rec.key] = job_id  # live again, it takes its key back
        self._rearm(q, rec)
        return True

    def _rearm(self, q: _Queue, rec: JobRecord, *, asks_stand: bool = False) -> None:
        """Ready again with a fresh attempt count: a dead letter retried, or a chord's callback run
        again with a retried member's new value. A revoke or cancel asked for while it ran last is
        spent, as running it again is asking it to; but not with `asks_stand` (a run again no one
        asked for): it is revoked or cancelled when met, as a retry is. As rearm in the Lua
        helpers."""
        job_id = rec.id
        q.dead.pop(job_id, None)
        q.expiry.pop(job_id, None)
        rec.attempt, rec.asked = 1, 0
        rec.result = rec.error = rec.dead_reason = rec.progress = rec.worker = None
        rec.started_at = rec.finished_at = None
        q.deliveries[job_id] = 0
        if not asks_stand:
            q.revoked.discard(job_id)
            q.cancel.discard(job_id)
        q.fresh.pop(job_id, None)
        self._make_ready(q, rec)
        self._uncount(q, job_id)
        # The steps its failure skipped wait for it again, so that its success runs them.
        links = q.links.get(job_id)
        following = links.next if links else None
        while following is not None and following in q.skipped:
            step = self._record(q, following)
            if step is None:  # its record expired (result_ttl), as on Redis
                break
            q.skipped.discard(following)
            step.state, step.error, step.finished_at = JobState.SCHEDULED.value, None, None
            q.expiry.pop(following, None)
            q.waiting.add(following)
            self._uncount(q, following)
            step_links = q.links.get(following)
            following = step_links.next if step_links else None

    def _uncount(self, q: _Queue, job_id: str) -> None:
        """Live again, a job is no longer counted as ended in its batch, nor in its chord while
        that has not fired (a fired chord's slot keeps the job's error, which its new value
        replaces): they wait for its new end, and the batch is kept until then (one kept by a
        skipped step lasted as long as the step's record, see `_settle_batch`). As `uncount` in
        the Lua helpers."""
        links = q.links.get(job_id)
        if links is None:
            return
        batch = self._batch(q, links.batch) if links.batch is not None else None
        if batch is not None:
            batch.members.pop(job_id, None)
            batch.expires_at = None
        chord = self._chord(q, links.chord) if links.chord is not None else None
        if chord is not None and chord.base is None and links.slot is not None:
            chord.slots.pop(links.slot, None)

    async def purge_dead_letters(self, queue: str) -> int:
        q = self._queue(queue)
        count = len(q.dead)
        for job_id in q.dead:
            self._drop(q, job_id)
        q.dead.clear()
        # The batches that only a dead letter kept (see _settle_batch) can change no more; one
        # whose member was retried does not count that member as ended (see _uncount).
        for batch_id, batch in list(q.batches.items()):
            if len(batch.members) == batch.size and batch.expires_at is None:
                del q.batches[batch_id]
        return count

    # --- the critical sections' parts (none awaits) ----------------------------------------------

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue()
        return q

    def _record(self, q: _Queue, job_id: str) -> JobRecord | None:
        """The live record; one whose time is up is dropped here (lazily, as Redis EXPIREs)."""
        expiry = q.expiry.get(job_id)
        if expiry is not None and time.time() >= expiry:
            self._drop(q, job_id)
        return q.records.get(job_id)

    def _drop(self, q: _Queue, job_id: str) -> None:
        for index in (q.records, q.tokens, q.deliveries, q.entries, q.leases, q.expiry, q.done):
            index.pop(job_id, None)
        q.cancel.discard(job_id)
        q.revoked.discard(job_id)
        q.unstarted.discard(job_id)
        q.links.pop(job_id, None)
        q.waiting.discard(job_id)
        q.skipped.discard(job_id)
        q.fresh.pop(job_id, None)

    def _holds(self, q: _Queue, d: Delivery) -> bool:
        """Whether `d` is the job's current lease (not stale, not ended)."""
        return d.job_id in q.leases and q.tokens.get(d.job_id) == d.token

    def _late_success(self, q: _Queue, c: Completion) -> bool:
        """Whether `c` is a success from an earlier delivery of the run still going on (the same
        entry, leased again since), which ends the job (see `Broker.finish`)."""
        d = c.delivery
        return (c.outcome == Outcome.SUCCEEDED and d.job_id in q.leases
                and str(q.entries.get(d.job_id)) == d.receipt)

    def _make_ready(self, q: _Queue, rec: JobRecord) -> None:
        rec.state = JobState.PENDING.value
        entry = q.entries[rec.id] = next(self._seq)
        heapq.heappush(q.ready, (-rec.priority, entry, rec.id))
        if q.wakeup is not None:
            q.wakeup.set()  # wakes every blocked receive; each then takes what it can
            q.wakeup = None

    def _schedule(self, q: _Queue, rec: JobRecord, eta: float) -> None:
        rec.state, rec.eta = JobState.SCHEDULED.value, eta
        entry = q.entries[rec.id] = next(self._seq)
        heapq.heappush(q.scheduled, (eta, entry, rec.id))

    def _deliver(
        self, q: _Queue, rec: JobRecord, consumer: str, max_deliveries: int
    ) -> Delivery:
        """Lease `rec` to `consumer`; or end it here, with a notice the worker reports: cancelled,
        revoked or expired, or failed when delivered too often (it goes to the dead letters)."""
        now = time.time()
        ended: str | None = None
        if rec.id in q.cancel:
            ended = JobState.CANCELLED.value
        elif rec.id in q.revoked or self._task_revoked(q, rec.task, now):
            ended = JobState.REVOKED.value
        elif rec.expires is not None and rec.expires < now and self._never_started(q, rec.id):
            # `expires` is about starting: a job that already started is never expired afterwards
            ended = JobState.EXPIRED.value
        if ended is not None:
            receipt = str(q.entries.get(rec.id, 0))
            self._finalize(q, rec, ended, now, self._result_ttl, None)
            return Delivery(job_id=rec.id, task=rec.task, payload=b"", attempt=rec.attempt,
                            token=0, priority=rec.priority, enqueued_at=rec.enqueued_at,
                            receipt=receipt, ended=ended, consumer=consumer, leased_at=now)
        deliveries = q.deliveries[rec.id] = q.deliveries.get(rec.id, 0) + 1
        if deliveries > max_deliveries:
            reason = (f"delivered {deliveries} times without finishing "
                      f"(max_deliveries={max_deliveries})")
            receipt = str(q.entries.get(rec.id, 0))
            error = _error_metadata(rec.id, rec.attempt, "DeliveryLimitExceeded",
                                    repr(DeliveryLimitExceeded(reason)))
            self._finalize(q, rec, JobState.FAILED.value, now, self._result_ttl, reason, error)
            return Delivery(job_id=rec.id, task=rec.task, payload=b"", attempt=rec.attempt,
                            token=0, priority=rec.priority, enqueued_at=rec.enqueued_at,
                            receipt=receipt, ended=JobState.FAILED.value, consumer=consumer,
                            leased_at=now)
        # Its expiry goes with it while it holds: a worker that would start it later hands it back.
        expires = rec.expires if self._never_started(q, rec.id) else None
        q.tokens[rec.id] = q.tokens.get(rec.id, 0) + 1
        q.unstarted.discard(rec.id)
        rec.state, rec.started_at, rec.worker = JobState.RUNNING.value, now, consumer
        if deliveries > 1:
            rec.progress = None  # its last worker died or went silent: this run starts over
        q.leases[rec.id] = (consumer, time.monotonic())
        return self._leased(q, rec, consumer, now, expires)

    @staticmethod
    def _never_started(q: _Queue, job_id: str) -> bool:
        """Never delivered, or handed back by workers that never started it."""
        return not q.tokens.get(job_id) or job_id in q.unstarted

    @staticmethod
    def _leased(
        q: _Queue, rec: JobRecord, consumer: str, leased_at: float, expires: float | None = None
    ) -> Delivery:
        """The delivery of `rec` under the lease `consumer` holds now (the job's newest token)."""
        return Delivery(job_id=rec.id, task=rec.task, payload=rec.payload, attempt=rec.attempt,
                        token=q.tokens[rec.id], priority=rec.priority, enqueued_at=rec.enqueued_at,
                        receipt=str(q.entries[rec.id]), consumer=consumer, leased_at=leased_at,
                        expires=expires, asked=rec.asked)

    def _finalize(
        self, q: _Queue, rec: JobRecord, state: str, finished_at: float, ttl: float,
        reason: str | None, error: bytes | None = None,
    ) -> None:
        """A final state: free the key, wake waiters; dead letters stay, other records expire.
        The record's error becomes the ending's own, `error` (its chord slot and skipped steps
        get it): an end that brings none leaves none of an earlier attempt's."""
        rec.state, rec.finished_at, rec.error = state, finished_at, error
        q.leases.pop(rec.id, None)
        q.entries.pop(rec.id, None)  # any heap entry left for it is now stale
        if rec.key is not None and q.keys.get(rec.key) == rec.id:
            del q.keys[rec.key]
        if state == JobState.FAILED:
            rec.dead_reason = reason
            rec.failures += 1  # a dead letter retried may fail again
            q.dead[rec.id] = None
        else:
            q.expiry[rec.id] = time.time() + ttl
        self._after_final(q, rec, state, finished_at, ttl)
        done = q.done.pop(rec.id, None)
        if done is not None:
            done.ended = replace(rec)
            done.set()

    # --- workflows: what ending a job means for the jobs around it --------------------------------

    def _activate(self, q: _Queue, job_id: str, payload: bytes | None) -> None:
        """A waiting job becomes ready (once), with a new payload if given."""
        if job_id not in q.waiting:
            return
        q.waiting.discard(job_id)
        rec = q.records[job_id]
        if payload:
            rec.payload = payload
        self._make_ready(q, rec)

    def _after_final(self, q: _Queue, rec: JobRecord, state: str, now: float, ttl: float) -> None:
        links = q.links.get(rec.id)
        if links is None:
            return
        # What stands for an end other than success, in the steps it skips and in its chord slot.
        error = rec.error
        if state != JobState.SUCCEEDED:
            error = error or ending_error(rec.id, state, rec.attempt, rec.dead_reason)
            if links.next is not None and links.next in q.waiting:
                # The rest of the pipeline is skipped; the last step carries the error to its chord.
                q.waiting.discard(links.next)
                skipped = q.records[links.next]
                # The error names the step that ended the pipeline (retry_failed retries that one).
                q.skipped.add(skipped.id)
                self._finalize(q, skipped, JobState.CANCELLED.value, now, ttl, None, error)
            if state == JobState.FAILED and links.on_error is not None:
                t = links.on_error
                # Each failure for good has its own handler: a retried dead letter may fail again.
                handler = NewJob(id=error_handler_id(rec.id, rec.failures), task=t.task,
                                 priority=t.priority, enqueued_at=now,
                                 payload=prepend_arg(t.payload, error_marker(error)))
                self._store(q, handler, now)
        if links.chord is not None and links.slot is not None:
            value = (rec.result or b"null") if state == JobState.SUCCEEDED else error_marker(error)
            self._chord_arrive(q, links.chord, links.slot, value, now, ttl)
        if links.batch is not None:
            self._batch_arrive(q, links.batch, rec.id, state, now, ttl)

    def _chord_arrive(
        self, q: _Queue, chord_id: str, slot: int, value: bytes, now: float, ttl: float
    ) -> None:
        chord = self._chord(q, chord_id)
        if chord is None:
            return
        old = chord.slots.get(slot)
        if old is not None and not old.startswith(ERROR_HEAD):
            return  # counted once; a value is final
        chord.slots[slot] = value  # a retried member may replace its error
        if chord.base is not None:
            # Fired before, with this member's error: the callback is given its value.
            if not value.startswith(ERROR_HEAD):
                self._fire_again(q, chord_id, chord, now, ttl)
            return
        if old is not None or len(chord.slots) < chord.size:
            return
        callback = q.records.get(chord.callback)
        if callback is None or not any(v.startswith(ERROR_HEAD) for v in chord.slots.values()):
            # Nothing a retry can change (or a callback cancelled or revoked while it waited, and
            # its record expired since): what fills the chord goes, as on Redis.
            del q.chords[chord_id]
        else:
            chord.base, chord.expires_at = callback.payload, now + ttl
        if callback is None:
            return
        self._activate(q, chord.callback, prepend_arg(callback.payload, chord.values()))

    def _fire_again(self, q: _Queue, chord_id: str, chord: _Chord, now: float, ttl: float) -> None:
        """A fired chord's callback given its values anew, a retried member having succeeded: one
        that ended succeeded or failed runs again with them; one that has not started (or waits
        for its retry) runs with them; one running now runs again with them once it ends
        succeeded or failed (`fresh`: the first token to carry them; see `finish`). One
        cancelled, revoked or expired is not run. The chord is kept while a slot holds an error.
        As refire in the Lua helpers."""
        assert chord.base is not None
        callback = self._record(q, chord.callback)
        if callback is not None:
            state = callback.state
            if state in (JobState.SUCCEEDED, JobState.FAILED):
                callback.payload = prepend_arg(chord.base, chord.values())
                self._rearm(q, callback)
            elif state in (JobState.PENDING, JobState.SCHEDULED, JobState.RUNNING):
                callback.payload = prepend_arg(chord.base, chord.values())
                if state == JobState.RUNNING:
                    q.fresh[callback.id] = q.tokens[callback.id] + 1
        if any(v.startswith(ERROR_HEAD) for v in chord.slots.values()):
            chord.expires_at = now + ttl
        else:
            del q.chords[chord_id]

    def _batch_arrive(
        self, q: _Queue, batch_id: str, job_id: str, state: str, now: float, ttl: float
    ) -> None:
        batch = self._batch(q, batch_id)
        if batch is None:
            return
        # The same end again (a retried member failed again) fires nothing (each callback fires
        # once), but the batch is settled anew.
        batch.members[job_id] = state
        if len(batch.members) < batch.size:
            return
        succeeded = sum(s == JobState.SUCCEEDED for s in batch.members.values())
        for kind in ("complete", "success" if succeeded == batch.size else "failure"):
            template = batch.callbacks.get(kind)
            if template is not None and kind not in batch.fired:
                batch.fired.add(kind)
                self._store(q, NewJob(id=batch_callback_id(batch_id, kind), task=template.task,
                                      payload=template.payload, priority=template.priority,
                                      enqueued_at=now), now)
        self._settle_batch(q, batch_id, batch, succeeded == batch.size, ttl)

    @staticmethod
    def _chord(q: _Queue, chord_id: str) -> _Chord | None:
        """The chord, while it is kept: one fired with an error in a slot lapses `ttl` after its
        last firing, gone at once as its Redis hash is (`prune` frees those nobody looks up)."""
        chord = q.chords.get(chord_id)
        if chord is not None and chord.expires_at is not None and chord.expires_at <= time.time():
            del q.chords[chord_id]
            return None
        return chord

    @staticmethod
    def _batch(q: _Queue, batch_id: str) -> _Batch | None:
        """The batch, while it is kept: one kept by a skipped member lapses with the member's
        record, gone at once as its Redis hash is (`prune` frees those nobody looks up)."""
        batch = q.batches.get(batch_id)
        if batch is not None and batch.expires_at is not None and batch.expires_at <= time.time():
            del q.batches[batch_id]
            return None
        return batch

    @staticmethod
    def _settle_batch(q: _Queue, batch_id: str, batch: _Batch, all_succeeded: bool, ttl: float) -> None:
        """A batch whose members have all ended is kept only while a retry can change it: while
        one of them is a dead letter (`purge_dead_letters` drops it), or was skipped after a
        pipeline step that is one, as long as the skipped step's record (`retry` re-arms the step
        and keeps the batch). As settle_batch in _common.lua."""
        batch.expires_at = None
        if not all_succeeded:
            if JobState.FAILED in batch.members.values():
                return
            if any(job_id in q.skipped for job_id in batch.members):
                batch.expires_at = time.time() + ttl
                return
        del q.batches[batch_id]

    def _task_revoked(self, q: _Queue, task: str, now: float) -> bool:
        """Whether the task is revoked now; a revocation for one job only is used up here."""
        revocation = q.revoked_tasks.get(task)
        if revocation is None:
            return False
        once, until = revocation
        if until is not None and until <= now:
            del q.revoked_tasks[task]
            return False
        if once:
            del q.revoked_tasks[task]
        return True

    def _lock_holder(self, q: _Queue, name: str) -> str | None:
        held = q.locks.get(name)
        if held is None:
            return None
        if held[1] <= time.monotonic():  # its ttl lapsed: free, as the Redis key expires
            del q.locks[name]
            self._wake_lock_waiters(q, name)
            return None
        return held[0]

    def _wake_lock_waiters(self, q: _Queue, name: str) -> None:
        released = q.lock_released.pop(name, None)
        if released is not None:
            released.set()

    # --- control ---------------------------------------------------------------------------------

    async def cancel(self, queue: str, job_id: str, now: float, result_ttl: float) -> str | None:
        q = self._queue(queue)
        rec = self._record(q, job_id)
        if rec is None or rec.state in FINAL_STATES:
            return None
        if rec.state == JobState.RUNNING:
            q.cancel.add(job_id)  # outlives the push: a redelivery ends the job
            for listener in list(q.cancel_listeners):
                listener(job_id)
            return "requested"
        q.waiting.discard(job_id)  # a pipeline step or chord callback: never activated now
        self._finalize(q, rec, JobState.CANCELLED.value, now, result_ttl, None)
        return JobState.CANCELLED.value

    async def listen_cancel(
        self, queue: str, on_request: Callable[[str], None], on_listening: Callable[[], None]
    ) -> None:
        q = self._queue(queue)
        q.cancel_listeners.append(on_request)
        on_listening()
        try:
            await anyio.sleep_forever()
        finally:
            q.cancel_listeners.remove(on_request)

    async def cancel_requested(self, queue: str, job_ids: Sequence[str]) -> list[str]:
        q = self._queue(queue)
        return [job_id for job_id in job_ids if job_id in q.cancel]

    async def revoke(self, queue: str, job_id: str, revoked: bool) -> bool:
        q = self._queue(queue)
        rec = self._record(q, job_id)
        if rec is None or rec.state in FINAL_STATES:
            return False
        if revoked:
            q.revoked.add(job_id)
        else:
            q.revoked.discard(job_id)
        return True

    async def revoke_task(self, queue: str, task: str, once: bool, until: float | None) -> None:
        self._queue(queue).revoked_tasks[task] = (once, until)

    async def restore_task(self, queue: str, task: str) -> bool:
        revocation = self._queue(queue).revoked_tasks.pop(task, None)
        return revocation is not None and (revocation[1] is None or revocation[1] > time.time())

    async def revoked(self, queue: str, job_id: str | None, task: str, now: float) -> bool:
        q = self._queue(queue)
        if job_id is not None and job_id in q.revoked:
            return True
        revocation = q.revoked_tasks.get(task)
        return revocation is not None and (revocation[1] is None or revocation[1] > now)

    async def enqueue_tick(self, queue: str, tick: float, job: NewJob) -> bool:
        q = self._queue(queue)
        last = q.ticks.get(job.task)
        if last is not None and last >= tick:
            return False
        q.ticks[job.task] = tick
        self._store(q, job, time.time())
        return True

    async def lock_acquire(self, queue: str, name: str, token: str, ttl: float) -> bool:
        q = self._queue(queue)
        if self._lock_holder(q, name) is not None:
            return False
        q.locks[name] = (token, time.monotonic() + ttl)
        return True

    async def lock_extend(self, queue: str, name: str, token: str, ttl: float) -> bool:
        q = self._queue(queue)
        if self._lock_holder(q, name) != token:
            return False
        q.locks[name] = (token, time.monotonic() + ttl)
        return True

    async def lock_release(self, queue: str, name: str, token: str) -> bool:
        q = self._queue(queue)
        if self._lock_holder(q, name) != token:
            return False
        del q.locks[name]
        self._wake_lock_waiters(q, name)
        return True

    async def lock_wait(self, queue: str, name: str, timeout: float | None) -> None:
        q = self._queue(queue)
        if self._lock_holder(q, name) is None:
            return
        released = _event(q.lock_released, name)
        wait = q.locks[name][1] - time.monotonic()  # a holder that dies frees it after its ttl
        if timeout is not None:
            wait = min(wait, timeout)
        with anyio.move_on_after(wait):
            await released.event.wait()

    async def rate_limit_hit(self, queue: str, key: str, limit: int, per: float) -> float:
        q = self._queue(queue)
        self._prune_now_and_then(q, time.time())
        per_ms = rate_window_ms(per)
        now = time.time() * 1000  # one process: its clock is the broker's
        window = math.floor(now / per_ms)
        current, hits = q.rates.get((key, per_ms), (window, 0))
        hits = hits + 1 if current == window else 1
        q.rates[key, per_ms] = (window, hits)
        return 0.0 if hits <= limit else max((window + 1) * per_ms - now, 1) / 1000
