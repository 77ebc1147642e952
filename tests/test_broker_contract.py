"""The Broker contract, checked through the Broker methods only, on every backend."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import orjson
import pytest

from aqueue.brokers._base import Broker, Completion, Delivery, JobRecord, NewJob, Outcome

MAX = 5  # max_deliveries where a test does not care


def new(job_id: str, *, task: str = "t", priority: int = 0, eta: float | None = None,
        expires: float | None = None, key: str | None = None, enqueued_at: float = 0.0) -> NewJob:
    return NewJob(id=job_id, task=task, payload=b"p-" + job_id.encode(), priority=priority,
                  eta=eta, expires=expires, key=key, enqueued_at=enqueued_at)


async def take(broker: Broker, queue: str, consumer: str = "w1", max_deliveries: int = MAX,
               count: int = 1) -> list[Delivery]:
    """Receive what is ready now (waits only briefly when nothing is)."""
    return await broker.receive(queue, consumer, count, 0.1, max_deliveries)


async def take_one(broker: Broker, queue: str, consumer: str = "w1",
                   max_deliveries: int = MAX) -> Delivery:
    [d] = await broker.receive(queue, consumer, 1, 5, max_deliveries)
    return d


def done(d: Delivery, outcome: Outcome = Outcome.SUCCEEDED, *, result: bytes | None = None,
         error: bytes | None = None, retry_at: float | None = None,
         reason: str | None = None) -> Completion:
    return Completion(delivery=d, outcome=outcome, finished_at=time.time(), result=result,
                      error=error, retry_at=retry_at, reason=reason)


async def record(broker: Broker, queue: str, job_id: str) -> JobRecord:
    rec = await broker.get(queue, job_id)
    assert rec is not None
    return rec


async def test_enqueue_stores_pending_and_scheduled(broker: Broker, queue_name: str) -> None:
    later = time.time() + 60
    ids = await broker.enqueue(queue_name, [new("a", priority=3), new("b", eta=later)])
    assert ids == ["a", "b"]
    a = await record(broker, queue_name, "a")
    assert (a.state, a.task, a.payload, a.priority, a.attempt) == ("pending", "t", b"p-a", 3, 1)
    assert (await record(broker, queue_name, "b")).state == "scheduled"
    assert await broker.get(queue_name, "nope") is None
    # An existing id replaces nothing.
    assert await broker.enqueue(queue_name, [NewJob(id="a", task="other", payload=b"x")]) == ["a"]
    assert (await record(broker, queue_name, "a")).payload == b"p-a"


async def test_get_many_reads_records_in_order_as_get_does(broker: Broker, queue_name: str) -> None:
    # More than one call's page on Redis, with unknown ids among them and an id given twice.
    ids = [f"j{i}" for i in range(450)]
    await broker.enqueue(queue_name, [new(job_id) for job_id in ids])
    [d] = await take(broker, queue_name)
    assert await broker.finish(queue_name, [done(d, result=b"42")], 60) == [True]
    asked = [*ids[:300], "nope", d.job_id, *ids[300:], "nope-2"]
    many = await broker.get_many(queue_name, asked)
    assert many == [await broker.get(queue_name, job_id) for job_id in asked]
    assert [r.id if r else None for r in many] == [*ids[:300], None, d.job_id, *ids[300:], None]
    assert many[301] is not None
    assert (many[301].state, many[301].result) == ("succeeded", b"42")
    # The interface's own version, which reads one by one, for brokers that do not override it.
    assert await Broker.get_many(broker, queue_name, asked[295:305]) == many[295:305]
    assert await broker.get_many(queue_name, []) == []


async def test_get_states_reads_states_in_order_as_get_does(
    broker: Broker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More than one call's page on Redis, with unknown ids among them and an id given twice; one
    # job running (a first delivery on Redis: its record still says pending), one ended, one due
    # later.
    ids = [f"j{i}" for i in range(1_050)]
    await broker.enqueue(queue_name, [new(job_id) for job_id in ids])
    await broker.enqueue(queue_name, [new("later", eta=time.time() + 60)])
    running, ended = await take(broker, queue_name, count=2)
    assert await broker.finish(queue_name, [done(ended, result=b"42")], 60) == [True]
    asked = [*ids[:999], "nope", running.job_id, ended.job_id, "later", *ids[999:], "nope-2"]
    states = await broker.get_states(queue_name, asked)
    assert states == [r.state if r else None for r in await broker.get_many(queue_name, asked)]
    assert states[999:1004] == [None, "running", "succeeded", "scheduled", "pending"]
    assert states[-1] is None
    # The interface's own version, which reads the records, for brokers that do not override it:
    # a chunk at a time through their get_many, never all of a long list in one call.
    chunks: list[int] = []
    read_many = broker.get_many

    async def counted(queue: str, job_ids: Sequence[str]) -> list[JobRecord | None]:
        chunks.append(len(job_ids))
        return await read_many(queue, job_ids)
    monkeypatch.setattr(broker, "get_many", counted)
    assert await Broker.get_states(broker, queue_name, asked) == states
    assert chunks == [200] * 5 + [len(asked) - 1_000]
    assert await broker.get_states(queue_name, []) == []


async def test_past_eta_is_ready_at_once(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a", eta=time.time() - 5)])
    assert (await record(broker, queue_name, "a")).state == "pending"
    assert [d.job_id for d in await take(broker, queue_name)] == ["a"]


async def test_an_eta_is_judged_by_when_the_job_was_enqueued(broker: Broker, queue_name: str) -> None:
    # Due by the time it is stored, but not when the producer made it (a delay of microseconds):
    # scheduled, as the producer said in its SCHEDULED signal; the next promotion makes it ready.
    now = time.time()
    await broker.enqueue(queue_name, [new("a", eta=now - 5, enqueued_at=now - 10)])
    assert (await record(broker, queue_name, "a")).state == "scheduled"
    await broker.promote_due(queue_name, time.time(), 10)
    assert [d.job_id for d in await take(broker, queue_name)] == ["a"]


async def test_queues_are_separate(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    assert await take(broker, queue_name + "-other") == []
    assert await broker.get(queue_name + "-other", "a") is None
    assert [d.job_id for d in await take(broker, queue_name)] == ["a"]


async def test_idempotency_key(broker: Broker, queue_name: str) -> None:
    assert await broker.enqueue(queue_name, [new("a", key="k")]) == ["a"]
    assert await broker.enqueue(queue_name, [new("b", key="k")]) == ["a"]
    assert await broker.get(queue_name, "b") is None
    d = await take_one(broker, queue_name)
    assert await broker.enqueue(queue_name, [new("c", key="k")]) == ["a"]  # running is live
    assert await broker.finish(queue_name, [done(d)], 60) == [True]
    assert await broker.enqueue(queue_name, [new("c", key="k")]) == ["c"]
    assert (await record(broker, queue_name, "c")).state == "pending"


async def test_priority_then_fifo(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("low1"), new("high1", priority=5), new("low2"),
                                      new("high2", priority=5), new("mid", priority=2)])
    order = [(await take_one(broker, queue_name)).job_id for _ in range(5)]
    assert order == ["high1", "high2", "mid", "low1", "low2"]


async def test_an_idle_receive_takes_the_highest_band_of_one_enqueue_first(
    broker: Broker, queue_name: str
) -> None:
    # A receive waiting when one call enqueues into several bands: on Redis its read is woken by
    # the first stream written to, band 0 here.
    await broker.enqueue(queue_name, [new("known", priority=5)])  # the band exists
    await take_one(broker, queue_name)
    got: list[Delivery] = []

    async def receiver() -> None:
        got.extend(await broker.receive(queue_name, "w1", 1, 30, MAX))

    with anyio.fail_after(5):  # well under the receive timeout
        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await anyio.wait_all_tasks_blocked()
            await broker.enqueue(queue_name, [new("low"), new("high1", priority=5),
                                              new("high2", priority=5)])
    assert [d.job_id for d in got] == ["high1"]
    assert [d.job_id for d in await take(broker, queue_name, count=5)] == ["high2", "low"]


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
async def test_a_receive_after_a_partial_one_keeps_each_band_in_order(
    broker: Broker, queue_name: str, keyed: bool
) -> None:
    # On Redis a receive that found fewer jobs than it asked for blocks on every band next time,
    # and a read finding several bands ready takes `count` of each: what it took past `count`
    # keeps its place in its band. A job with an idempotency key (a record that may hold rare
    # fields) went to the back of its band with every job handed back beside it.
    await broker.enqueue(queue_name, [new("x5", priority=5), new("x0")])
    assert [d.job_id for d in await take(broker, queue_name, count=3)] == ["x5", "x0"]
    await broker.enqueue(queue_name, [new(f"{c}0", key=f"k{c}" if keyed and c == "b" else None)
                                      for c in "abcde"]
                         + [new("f5", priority=5), new("g5", priority=5)])
    taken = await broker.receive(queue_name, "w1", 3, 5, MAX)
    assert [d.job_id for d in taken] == ["f5", "g5", "a0"]
    rest = await take(broker, queue_name, "w2", count=10)
    assert [d.job_id for d in rest] == ["b0", "c0", "d0", "e0"]


async def test_receive_returns_empty_on_timeout(broker: Broker, queue_name: str) -> None:
    with anyio.fail_after(5):
        assert await broker.receive(queue_name, "w1", 3, 0.05, MAX) == []


async def test_receive_wakes_when_a_job_arrives(broker: Broker, queue_name: str) -> None:
    got: list[Delivery] = []

    async def receiver() -> None:
        got.extend(await broker.receive(queue_name, "w1", 1, 30, MAX))

    with anyio.fail_after(5):  # well under the receive timeout: it must be woken
        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await anyio.wait_all_tasks_blocked()
            await broker.enqueue(queue_name, [new("a")])
    assert [d.job_id for d in got] == ["a"]


async def interrupt(broker: Broker, queue: str, consumer: str, returned: anyio.Event) -> None:
    """Interrupt `consumer`'s receive. It may still be on its way to blocking (a Redis round trip),
    or have returned by itself: try until one of the two happens."""
    await anyio.wait_all_tasks_blocked()
    while not await broker.interrupt_receive(queue, consumer):
        with anyio.move_on_after(0.01):
            await returned.wait()
        if returned.is_set():
            return


async def test_interrupt_receive_returns_empty(broker: Broker, queue_name: str) -> None:
    assert await broker.interrupt_receive(queue_name, "w1") is False  # none is waiting
    got: list[list[Delivery]] = []
    returned = anyio.Event()

    async def receiver() -> None:
        got.append(await broker.receive(queue_name, "w1", 1, 30, MAX))
        returned.set()

    with anyio.fail_after(5):  # well under the receive timeout
        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await interrupt(broker, queue_name, "w1", returned)
    assert got == [[]]
    assert await broker.interrupt_receive(queue_name, "w1") is False


async def test_interrupt_receive_loses_no_job(broker: Broker, queue_name: str) -> None:
    got: list[Delivery] = []
    returned = anyio.Event()

    async def receiver() -> None:
        got.extend(await broker.receive(queue_name, "w1", 1, 30, MAX))
        returned.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            await anyio.wait_all_tasks_blocked()
            await broker.enqueue(queue_name, [new("a")])
            await interrupt(broker, queue_name, "w1", returned)
    # Either the receive got the job or it is still there for the next one: never lost.
    delivered = got + await take(broker, queue_name)
    assert [d.job_id for d in delivered] == ["a"]


async def test_receive_leases_and_token_grows(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a", task="send")])
    d = await take_one(broker, queue_name, consumer="w1")
    assert (d.job_id, d.task, d.payload, d.attempt, d.priority) == ("a", "send", b"p-a", 1, 0)
    rec = await record(broker, queue_name, "a")
    assert (rec.state, rec.worker) == ("running", "w1")
    assert rec.started_at is not None
    assert await take(broker, queue_name) == []  # leased: not handed out twice
    await broker.release(queue_name, [d])
    d2 = await take_one(broker, queue_name, consumer="w2")
    assert d2.token > d.token
    assert (await record(broker, queue_name, "a")).worker == "w2"


async def test_finish_succeeded_and_wait(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name)
    assert await broker.finish(queue_name, [done(d, result=b"42")], 60) == [True]
    rec = await record(broker, queue_name, "a")
    assert (rec.state, rec.result) == ("succeeded", b"42")
    assert rec.finished_at is not None
    with anyio.fail_after(5):
        waited = await broker.wait(queue_name, "a", None)
    assert waited is not None
    assert (waited.state, waited.result) == ("succeeded", b"42")
    assert await broker.wait(queue_name, "nope", 10) is None
    assert await take(broker, queue_name) == []


async def test_final_records_expire_but_dead_letters_stay(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("ok"), new("bad")])
    d_ok, d_bad = await take_one(broker, queue_name), await take_one(broker, queue_name)
    await broker.finish(queue_name, [done(d_ok), done(d_bad, Outcome.FAILED, reason="r")], 1)
    assert (await record(broker, queue_name, "ok")).state == "succeeded"
    await anyio.sleep(1.5)  # lets the 1s result_ttl run out; no outcome is awaited here
    assert await broker.get(queue_name, "ok") is None
    assert await broker.wait(queue_name, "ok", 10) is None
    assert [r.id for r in await broker.jobs(queue_name, None, None, 10)] == ["bad"]
    assert [r.id for r in await broker.dead_letters(queue_name, 10)] == ["bad"]


async def test_wait_timeout_returns_current_record(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    with anyio.fail_after(5):
        rec = await broker.wait(queue_name, "a", 0.05)
    assert rec is not None
    assert rec.state == "pending"


async def test_concurrent_waiters_all_woken(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    seen: list[JobRecord | None] = []

    async def waiter() -> None:
        seen.append(await broker.wait(queue_name, "a", 30))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            d = await take_one(broker, queue_name)
            await broker.finish(queue_name, [done(d, result=b"r")], 60)
    assert [(r.state, r.result) if r else None for r in seen] == [("succeeded", b"r")] * 2


async def test_retry_outcome_schedules_next_attempt(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name)
    now = time.time()
    retry_at = now + 60
    assert await broker.finish(queue_name, [done(d, Outcome.RETRY, retry_at=retry_at,
                                                 error=b"oops")], 60) == [True]
    rec = await record(broker, queue_name, "a")
    assert (rec.state, rec.attempt, rec.error) == ("scheduled", 2, b"oops")
    assert await take(broker, queue_name) == []
    assert await broker.promote_due(queue_name, now, 100) == pytest.approx(retry_at)
    assert (await record(broker, queue_name, "a")).state == "scheduled"
    assert await broker.promote_due(queue_name, retry_at + 1, 100) is None
    assert (await record(broker, queue_name, "a")).state == "pending"
    d2 = await take_one(broker, queue_name)
    assert d2.attempt == 2
    # Without retry_at it is ready at once.
    await broker.finish(queue_name, [done(d2, Outcome.RETRY)], 60)
    assert (await take_one(broker, queue_name)).attempt == 3


async def test_a_retry_the_job_asked_for_is_counted_apart(broker: Broker, queue_name: str) -> None:
    # RetryTask uses none of the task's retries: its runs count in `attempt` and in `asked`, and
    # each delivery after them carries that count (the worker needs it to judge a retry).
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name)
    assert (d.attempt, d.asked) == (1, 0)
    retry = Completion(delivery=d, outcome=Outcome.RETRY, finished_at=time.time(), asked=True)
    assert await broker.finish(queue_name, [retry], 60) == [True]
    rec = await record(broker, queue_name, "a")
    assert (rec.state, rec.attempt, rec.asked) == ("pending", 2, 1)
    d = await take_one(broker, queue_name)
    assert (d.attempt, d.asked) == (2, 1)
    assert await broker.finish(queue_name, [done(d, Outcome.RETRY)], 60) == [True]
    assert ((rec := await record(broker, queue_name, "a")).attempt, rec.asked) == (3, 1)
    d = await take_one(broker, queue_name)
    assert (d.attempt, d.asked) == (3, 1)
    assert await broker.finish(queue_name, [done(d, Outcome.FAILED, reason="out")], 60) == [True]
    assert await broker.retry(queue_name, "a", time.time())  # from the dead letters: counted anew
    assert ((rec := await record(broker, queue_name, "a")).attempt, rec.asked) == (1, 0)


async def test_retry_outcome_resets_delivery_count(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    for attempt in (1, 2, 3):
        d = await take_one(broker, queue_name, max_deliveries=1)
        assert d.attempt == attempt
        assert await broker.finish(queue_name, [done(d, Outcome.RETRY)], 60) == [True]


async def test_promote_due_limit_and_next_eta(broker: Broker, queue_name: str) -> None:
    now = time.time()
    await broker.enqueue(queue_name, [new("a", eta=now + 10), new("b", eta=now + 20),
                                      new("c", eta=now + 30)])
    assert await broker.promote_due(queue_name, now, 100) == pytest.approx(now + 10)
    assert await broker.promote_due(queue_name, now + 25, 1) == pytest.approx(now + 20)
    assert [(await record(broker, queue_name, i)).state for i in "abc"] == [
        "pending", "scheduled", "scheduled"]
    assert await broker.promote_due(queue_name, now + 25, 100) == pytest.approx(now + 30)
    assert [d.job_id for d in await take(broker, queue_name, count=5)] == ["a", "b"]


async def test_jobs_due_at_one_time_become_ready_in_the_order_they_were_enqueued(
    broker: Broker, queue_name: str
) -> None:
    # On Redis they moved in the order of their ids (the scheduled set's order for equal times):
    # random ids, a random order. A batch that a limit cuts leaves its last time's jobs whole.
    eta = time.time() + 10
    for job_id in "edcba":
        await broker.enqueue(queue_name, [new(job_id, eta=eta)])
    await broker.enqueue(queue_name, [new("f", eta=eta - 5)])
    await broker.promote_due(queue_name, eta, 3)
    await broker.promote_due(queue_name, eta, 100)
    assert [d.job_id for d in await take(broker, queue_name, count=10)] == list("fedcba")


async def test_reclaim_and_renew(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    d1 = await take_one(broker, queue_name, consumer="w1")
    assert await broker.renew(queue_name, "w1", [d1]) == []
    assert await broker.reclaim(queue_name, "w2", 10, 60, MAX) == []  # renewed just now
    [d2] = await broker.reclaim(queue_name, "w2", 10, 0, MAX)
    assert (d2.job_id, d2.attempt) == ("a", 1)
    assert d2.token > d1.token
    assert (await record(broker, queue_name, "a")).worker == "w2"
    assert await broker.renew(queue_name, "w1", [d1]) == ["a"]
    assert await broker.renew(queue_name, "w2", [d2]) == []
    assert await broker.renew(queue_name, "w1", [d2]) == ["a"]  # w2's lease, not w1's
    assert await broker.reclaim(queue_name, "w3", 10, 60, MAX) == []
    # A consumer that takes its own job over (its lease lapsed) still holds the lease: renewing
    # it under the earlier delivery keeps it; only that delivery's outcome is stale.
    [d3] = await broker.reclaim(queue_name, "w2", 10, 0, MAX)
    assert await broker.renew(queue_name, "w2", [d2]) == []
    assert await broker.reclaim(queue_name, "w3", 10, 60, MAX) == []
    assert await broker.finish(queue_name, [done(d2, Outcome.RETRY)], 60) == [False]
    assert await broker.finish(queue_name, [done(d3)], 60) == [True]


async def test_recover_hands_over_again_what_a_lost_answer_leased(
    broker: Broker, queue_name: str
) -> None:
    # Answers that never reached their worker: a receive's and a reclaim's. Their jobs come back
    # to that consumer, under the leases it holds, and no delivery is counted twice. (On Redis,
    # "c" has an expiry, so its entry is plain: leased by the start script, not lean.)
    far = time.time() + 3600
    await broker.enqueue(queue_name, [new("a"), new("b", priority=1), new("c", expires=far)])
    known = await take_one(broker, queue_name)  # "b": the one w1 heard of
    lost = await take(broker, queue_name, count=2)
    assert await broker.recover(queue_name, "w2", [], MAX) == []  # w1's leases stay w1's
    again = await broker.recover(queue_name, "w1", [known], MAX)
    assert [(d.job_id, d.token, d.receipt, d.attempt, d.payload, d.consumer) for d in again] == [
        (d.job_id, d.token, d.receipt, d.attempt, d.payload, "w1") for d in lost]
    assert [d.job_id for d in again] == ["a", "c"]
    assert await broker.recover(queue_name, "w1", [known, *again], MAX) == []
    assert await broker.renew(queue_name, "w1", [known, *again]) == []
    # Counted once: a takeover with max_deliveries=2 is each job's second delivery, not its third.
    others = await broker.reclaim(queue_name, "w3", 3, 0, 2)
    assert [(d.job_id, d.ended) for d in others] == [("b", None), ("a", None), ("c", None)]
    assert await broker.finish(queue_name, [done(d) for d in others], 60) == [True] * 3
    # A takeover whose answer was lost: its lease, with the token it gave.
    await broker.enqueue(queue_name, [new("d")])
    await take_one(broker, queue_name, consumer="w4")
    [taken] = await broker.reclaim(queue_name, "w1", 1, 0, MAX)
    [back] = await broker.recover(queue_name, "w1", [], MAX)
    assert (back.job_id, back.token, back.receipt) == ("d", taken.token, taken.receipt)
    assert await broker.finish(queue_name, [done(back)], 60) == [True]
    assert (await record(broker, queue_name, "d")).state == "succeeded"


async def test_recover_hands_over_a_job_anew_that_its_own_lost_takeover_leased(
    broker: Broker, queue_name: str
) -> None:
    # The consumer's own reclaim took over a job it holds (its lease had lapsed), and the answer
    # was lost: the job comes back under the token that takeover gave it.
    await broker.enqueue(queue_name, [new("a")])
    d1 = await take_one(broker, queue_name)
    [d2] = await broker.reclaim(queue_name, "w1", 1, 0, MAX)
    [back] = await broker.recover(queue_name, "w1", [d1], MAX)
    assert (back.job_id, back.token, back.receipt) == ("a", d2.token, d1.receipt)
    assert await broker.recover(queue_name, "w1", [back], MAX) == []
    assert await broker.finish(queue_name, [done(back, Outcome.RETRY)], 60) == [True]
    assert (await record(broker, queue_name, "a")).attempt == 2


async def test_recover_hands_over_the_retries_a_job_asked_for(broker: Broker, queue_name: str) -> None:
    # A job at its second attempt, started by a receive whose answer was lost: the delivery
    # recovered carries the retries it asked for, as the receive's did (the worker judges the
    # job's retries by them).
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name)
    retry = Completion(delivery=d, outcome=Outcome.RETRY, finished_at=time.time(), asked=True)
    assert await broker.finish(queue_name, [retry], 60) == [True]
    lost = await take_one(broker, queue_name)
    [back] = await broker.recover(queue_name, "w1", [], MAX)
    assert (lost.attempt, lost.asked) == (2, 1)
    assert (back.job_id, back.token, back.attempt, back.asked) == ("a", lost.token, 2, 1)


async def test_renew_keeps_lease_from_reclaim(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a"), new("b")])
    [da, db] = [await take_one(broker, queue_name) for _ in range(2)]
    await anyio.sleep(0.5)  # ages both leases; no outcome is awaited here
    assert await broker.renew(queue_name, "w1", [da]) == []
    # Only the lease left unrenewed is older than 0.3s.
    assert [d.job_id for d in await broker.reclaim(queue_name, "w2", 10, 0.3, MAX)] == ["b"]
    assert await broker.renew(queue_name, "w1", [da, db]) == ["b"]


async def test_stale_token_changes_nothing(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    d1 = await take_one(broker, queue_name, consumer="w1")
    [d2] = await broker.reclaim(queue_name, "w2", 1, 0, MAX)
    stale = [done(d1, Outcome.FAILED, error=b"old", reason="old"), done(d1, Outcome.RETRY),
             done(d1, Outcome.DEFER), done(d1, Outcome.CANCELLED)]
    assert await broker.finish(queue_name, stale, 60) == [False] * 4
    assert await broker.set_progress(queue_name, "a", d1.token, b"old") is False
    await broker.release(queue_name, [d1])
    rec = await record(broker, queue_name, "a")
    assert (rec.state, rec.worker, rec.result, rec.progress) == ("running", "w2", None, None)
    assert await broker.finish(queue_name, [done(d2, result=b"new")], 60) == [True]
    assert (await record(broker, queue_name, "a")).result == b"new"


async def test_a_job_that_runs_again_starts_with_no_progress(broker: Broker, queue_name: str) -> None:
    # The last run's progress was read as the new run's until it said its own: after a retry
    # (at once or later), a rate limit's reschedule and a hand-back alike.
    await broker.enqueue(queue_name, [new("a")])
    for outcome, retry_at in ((Outcome.RETRY, None), (Outcome.DEFER, None), (Outcome.RETRY, time.time() - 1),
                              (None, None)):
        if retry_at is not None:
            assert await broker.promote_due(queue_name, time.time(), 10) is None
        d = await take_one(broker, queue_name)
        assert (await record(broker, queue_name, "a")).progress is None
        assert await broker.set_progress(queue_name, "a", d.token, b'{"done": 9}')
        assert (await record(broker, queue_name, "a")).progress == b'{"done": 9}'
        if outcome is None:
            await broker.release(queue_name, [d])
        else:
            assert await broker.finish(queue_name, [done(d, outcome, retry_at=retry_at)], 60) == [True]
    assert (await record(broker, queue_name, "a")).progress is None
    # A lean delivery's hand-back too (a job taken once, its record never written by a start).
    await broker.enqueue(queue_name, [new("b")])
    [d] = [x for x in await take(broker, queue_name, count=5) if x.job_id == "b"]
    assert await broker.set_progress(queue_name, "b", d.token, b'{"done": 1}')
    await broker.release(queue_name, [d])
    assert (await record(broker, queue_name, "b")).progress is None
    # And a delivery after a worker that died (its lease lapsed), from a lean one or not.
    other = queue_name + "-c"
    await broker.enqueue(other, [new("c")])
    d = await take_one(broker, other)
    for _ in range(2):
        assert await broker.set_progress(other, "c", d.token, b'{"done": 2}')
        [d] = await broker.reclaim(other, "w2", 1, 0, MAX)
        assert (await record(broker, other, "c")).progress is None


async def test_success_of_a_run_taken_over_ends_the_job(broker: Broker, queue_name: str) -> None:
    # w1's loop was blocked past its lease, w2 took the job over; w1's run then succeeds. The work
    # is done: it ends the job, and w2's lease and later outcome count for nothing.
    await broker.enqueue(queue_name, [new("a")])
    d1 = await take_one(broker, queue_name, consumer="w1")
    [d2] = await broker.reclaim(queue_name, "w2", 1, 0, MAX)
    assert await broker.finish(queue_name, [done(d1, result=b"first")], 60) == [True]
    rec = await record(broker, queue_name, "a")
    # The record names the run that did the work, not the one that took over.
    assert (rec.state, rec.result, rec.worker, rec.started_at) == ("succeeded", b"first", "w1", d1.leased_at)
    assert await broker.renew(queue_name, "w2", [d2]) == ["a"]
    assert await broker.reclaim(queue_name, "w3", 10, 0, MAX) == []
    assert await broker.finish(queue_name, [done(d2, result=b"second")], 60) == [False]
    assert (await record(broker, queue_name, "a")).result == b"first"
    # Taken over twice: the middle delivery's success ends the job as well (on Redis, the first
    # delivery is a lean one, the later ones are not).
    await broker.enqueue(queue_name, [new("c")])
    c1 = await take_one(broker, queue_name, consumer="w1")
    [c2] = await broker.reclaim(queue_name, "w2", 1, 0, MAX)
    [c3] = await broker.reclaim(queue_name, "w3", 1, 0, MAX)
    assert await broker.finish(queue_name, [done(c2, result=b"middle")], 60) == [True]
    assert await broker.finish(queue_name, [done(c1), done(c3)], 60) == [False, False]
    rec = await record(broker, queue_name, "c")
    assert (rec.result, rec.worker, rec.started_at) == (b"middle", "w2", c2.leased_at)
    # A success from an earlier run (before a retry) is stale: the job runs anew since.
    await broker.enqueue(queue_name, [new("b")])
    b1 = await take_one(broker, queue_name, consumer="w1")
    [b2] = await broker.reclaim(queue_name, "w2", 1, 0, MAX)
    assert await broker.finish(queue_name, [done(b2, Outcome.RETRY)], 60) == [True]
    b3 = await take_one(broker, queue_name, consumer="w2")
    assert b3.job_id == "b"
    assert await broker.finish(queue_name, [done(b1, result=b"old")], 60) == [False]
    assert await broker.finish(queue_name, [done(b3, result=b"new")], 60) == [True]
    assert (await record(broker, queue_name, "b")).result == b"new"


async def test_release_makes_ready_without_counting(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name, max_deliveries=1)
    await broker.release(queue_name, [d])
    assert (await record(broker, queue_name, "a")).state == "pending"
    d = await take_one(broker, queue_name, consumer="w2", max_deliveries=1)
    await broker.release(queue_name, [d])
    d = await take_one(broker, queue_name, max_deliveries=1)
    assert (d.job_id, d.attempt) == ("a", 1)


async def test_max_deliveries_dead_letters(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    await take_one(broker, queue_name, consumer="w1", max_deliveries=2)
    assert len(await broker.reclaim(queue_name, "w2", 1, 0, 2)) == 1
    # One delivery too many: not leased, dead-lettered, and told (a notice) for the worker to report.
    [notice] = await broker.reclaim(queue_name, "w3", 1, 0, 2)
    assert (notice.job_id, notice.ended, notice.payload) == ("a", "failed", b"")
    rec = await record(broker, queue_name, "a")
    assert rec.state == "failed"
    assert rec.finished_at is not None
    assert rec.dead_reason is not None
    assert rec.dead_reason == "delivered 3 times without finishing (max_deliveries=2)"
    # Its error is written down as any failure's, named by the class that stands for it.
    assert rec.error is not None
    assert orjson.loads(rec.error) == {
        "error": "DeliveryLimitExceeded('delivered 3 times without finishing (max_deliveries=2)')",
        "type": "DeliveryLimitExceeded", "traceback": "", "job_id": "a", "attempt": 1, "retries_left": 0}
    assert [r.id for r in await broker.dead_letters(queue_name, 10)] == ["a"]
    assert await take(broker, queue_name) == []
    assert await broker.reclaim(queue_name, "w4", 1, 0, 2) == []


async def test_expired_job_is_not_delivered(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a", expires=time.time() - 1), new("b")])
    taken = await take(broker, queue_name, count=5)
    assert [(d.job_id, d.ended) for d in taken] == [("a", "expired"), ("b", None)]
    rec = await record(broker, queue_name, "a")
    assert rec.state == "expired"
    assert rec.finished_at is not None
    with anyio.fail_after(5):
        waited = await broker.wait(queue_name, "a", None)
    assert waited is not None
    assert waited.state == "expired"
    assert await broker.dead_letters(queue_name, 10) == []


async def test_a_job_handed_back_unstarted_keeps_its_expiry(broker: Broker, queue_name: str) -> None:
    # A delivery carries the job's expiry while it holds; a job handed back started (a shutdown
    # stopped it) is never expired afterwards, one handed back unstarted still is.
    expires = time.time() + 1.0
    await broker.enqueue(queue_name, [new("a", expires=expires), new("b", expires=expires)])
    taken = await take(broker, queue_name, count=2)
    assert [(d.job_id, d.expires) for d in taken] == [("a", expires), ("b", expires)]
    await broker.release(queue_name, [taken[0]], unstarted=True)
    await broker.release(queue_name, [taken[1]])
    await anyio.sleep(expires - time.time() + 0.05)  # both are past their expiry now
    taken = await take(broker, queue_name, count=2)
    assert [(d.job_id, d.ended, d.expires) for d in taken] == [("a", "expired", None), ("b", None, None)]
    assert (await record(broker, queue_name, "a")).state == "expired"
    # "b" started before: handed back unstarted now, by a worker that never ran it, it runs still.
    await broker.release(queue_name, [taken[1]], unstarted=True)
    assert [(d.job_id, d.ended) for d in await take(broker, queue_name)] == [("b", None)]


async def test_failed_dead_letters_retry_and_purge(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name)
    await broker.finish(queue_name, [done(d, Outcome.RETRY, error=b"first")], 60)
    d = await take_one(broker, queue_name)
    assert d.attempt == 2
    assert await broker.finish(queue_name, [done(d, Outcome.FAILED, error=b"err",
                                                 reason="boom")], 60) == [True]
    [dead] = await broker.dead_letters(queue_name, 10)
    assert (dead.id, dead.state, dead.error, dead.dead_reason) == ("a", "failed", b"err", "boom")
    assert dead.finished_at is not None
    assert (await record(broker, queue_name, "a")).state == "failed"

    await broker.enqueue(queue_name, [new("b")])
    assert await broker.retry(queue_name, "b", time.time()) is False  # not a dead letter
    assert await broker.retry(queue_name, "a", time.time()) is True
    assert await broker.retry(queue_name, "a", time.time()) is False
    assert await broker.dead_letters(queue_name, 10) == []
    rec = await record(broker, queue_name, "a")
    assert (rec.state, rec.attempt, rec.error, rec.result, rec.dead_reason, rec.finished_at) == (
        "pending", 1, None, None, None, None)
    db = await take_one(broker, queue_name)  # b was ready before a came back
    da = await take_one(broker, queue_name)
    assert (db.job_id, da.job_id, da.attempt) == ("b", "a", 1)

    await broker.finish(queue_name, [done(db, Outcome.FAILED, reason="x")], 60)
    await broker.finish(queue_name, [done(da, Outcome.FAILED, reason="y")], 60)
    assert [r.id for r in await broker.dead_letters(queue_name, 10)] == ["a", "b"]
    assert [r.id for r in await broker.dead_letters(queue_name, 1)] == ["a"]
    assert await broker.purge_dead_letters(queue_name) == 2
    assert await broker.dead_letters(queue_name, 10) == []
    assert await broker.get(queue_name, "a") is None
    assert await broker.retry(queue_name, "a", time.time()) is False


async def test_jobs_of_one_call_list_in_its_order(broker: Broker, queue_name: str) -> None:
    # Ids whose sorted order is not the call's: what a zset would fall back on for equal scores.
    ids = ["m", "c", "x", "a", "q", "b"]
    now = time.time()
    await broker.enqueue(queue_name, [new(job_id, enqueued_at=now) for job_id in ids])
    assert [r.id for r in await broker.jobs(queue_name, None, None, 10)] == ids[::-1]
    assert [r.id for r in await broker.jobs(queue_name, None, None, 2)] == ["b", "q"]


async def test_retry_from_dead_letters_resets_delivery_count(
    broker: Broker, queue_name: str
) -> None:
    await broker.enqueue(queue_name, [new("a")])
    await take_one(broker, queue_name, max_deliveries=1)
    [dead] = await broker.reclaim(queue_name, "w2", 1, 0, 1)  # second delivery: dead
    assert dead.ended == "failed"
    assert await broker.retry(queue_name, "a", time.time()) is True
    assert (await take_one(broker, queue_name, max_deliveries=1)).job_id == "a"


async def test_jobs_filters_newest_first(broker: Broker, queue_name: str) -> None:
    for job_id, task in [("j1", "x"), ("j2", "y"), ("j3", "x"), ("j4", "y")]:
        await broker.enqueue(queue_name, [new(job_id, task=task, enqueued_at=time.time())])
    assert [r.id for r in await broker.jobs(queue_name, None, None, 10)] == ["j4", "j3", "j2", "j1"]
    assert [r.id for r in await broker.jobs(queue_name, None, None, 2)] == ["j4", "j3"]
    assert [r.id for r in await broker.jobs(queue_name, None, "x", 10)] == ["j3", "j1"]
    d = await take_one(broker, queue_name)  # j1
    assert [r.id for r in await broker.jobs(queue_name, "running", None, 10)] == [d.job_id]
    assert [r.id for r in await broker.jobs(queue_name, "pending", "y", 10)] == ["j4", "j2"]


async def test_set_progress(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    d1 = await take_one(broker, queue_name)
    assert await broker.set_progress(queue_name, "a", d1.token, b"50%") is True
    assert (await record(broker, queue_name, "a")).progress == b"50%"
    [d2] = await broker.reclaim(queue_name, "w2", 1, 0, MAX)
    assert await broker.set_progress(queue_name, "a", d1.token, b"stale") is False
    # The new delivery starts with none (its run starts over); the stale write changed nothing.
    assert (await record(broker, queue_name, "a")).progress is None
    assert await broker.set_progress(queue_name, "a", d2.token, b"60%") is True
    assert (await record(broker, queue_name, "a")).progress == b"60%"


async def test_returned_records_are_copies(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    rec = await record(broker, queue_name, "a")
    rec.state, rec.payload = "succeeded", b"changed"
    [listed] = await broker.jobs(queue_name, None, None, 10)
    listed.attempt = 99
    again = await record(broker, queue_name, "a")
    assert (again.state, again.payload, again.attempt) == ("pending", b"p-a", 1)


async def test_a_job_asked_to_cancel_while_running_ends_when_delivered_again(
    broker: Broker, queue_name: str
) -> None:
    # The request's push was missed and the lease lapsed: the next delivery ends it instead.
    await broker.enqueue(queue_name, [new("a")])
    await take_one(broker, queue_name, consumer="w1")
    assert await broker.cancel(queue_name, "a", time.time(), 60) == "requested"
    [d] = await broker.reclaim(queue_name, "w2", 10, 0, MAX)
    assert (d.job_id, d.ended) == ("a", "cancelled")
    assert (await record(broker, queue_name, "a")).state == "cancelled"


async def test_success_after_a_retry_clears_the_error(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name)
    assert await broker.finish(queue_name, [done(d, Outcome.RETRY, error=b"oops")], 60) == [True]
    assert (await record(broker, queue_name, "a")).error == b"oops"
    d = await take_one(broker, queue_name)
    assert await broker.finish(queue_name, [done(d, result=b"1")], 60) == [True]
    rec = await record(broker, queue_name, "a")
    assert (rec.state, rec.result, rec.error) == ("succeeded", b"1", None)


async def test_cancel_requested_names_the_running_jobs_asked_to_stop(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a"), new("b"), new("c")])
    assert len(await take(broker, queue_name, count=3)) == 3
    assert await broker.cancel(queue_name, "b", time.time(), 60) == "requested"
    assert await broker.cancel_requested(queue_name, ["a", "b", "c", "unknown"]) == ["b"]
    assert await broker.cancel_requested(queue_name, []) == []


async def test_a_record_tells_the_start_and_worker_of_its_delivery(broker: Broker, queue_name: str) -> None:
    await broker.enqueue(queue_name, [new("a"), new("b")])
    da = await take_one(broker, queue_name, consumer="w1")
    db = await take_one(broker, queue_name, consumer="w2")
    assert (da.consumer, db.consumer) == ("w1", "w2")
    for renewed in (False, True):
        if renewed:
            assert await broker.renew(queue_name, "w1", [da]) == []
        rec = await record(broker, queue_name, "a")
        assert (rec.state, rec.worker) == ("running", "w1")
        assert rec.started_at is not None
        assert abs(rec.started_at - da.leased_at) < 0.5  # Redis: told by the lease's age
    assert await broker.finish(queue_name, [done(db)], 60) == [True]
    rec = await record(broker, queue_name, "b")
    assert (rec.state, rec.worker, rec.started_at) == ("succeeded", "w2", db.leased_at)


async def test_every_delivery_of_a_job_carries_a_greater_token(broker: Broker, queue_name: str) -> None:
    # However the job comes back: handed back, retried, or taken over; the earlier tokens are stale.
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name)
    seen = [d]
    await broker.release(queue_name, [d])
    seen.append(d := await take_one(broker, queue_name))
    assert await broker.finish(queue_name, [done(d, Outcome.RETRY)], 60) == [True]
    seen.append(d := await take_one(broker, queue_name))
    [d] = await broker.reclaim(queue_name, "w2", 1, 0, MAX)
    seen.append(d)
    assert [s.job_id for s in seen] == ["a"] * 4
    assert [s.token for s in seen] == sorted({s.token for s in seen})
    assert await broker.set_progress(queue_name, "a", seen[0].token, b"x") is False
    # Successes of earlier runs (handed back, retried) and anything else stale change nothing.
    assert await broker.finish(queue_name, [done(s) for s in seen[:2]], 60) == [False] * 2
    assert await broker.finish(queue_name, [done(s, Outcome.RETRY) for s in seen[:3]], 60) == [False] * 3
    # A first delivery that ends in a retry: the next one's token is greater too.
    await broker.enqueue(queue_name, [new("b")])
    first = await take_one(broker, queue_name)
    assert first.job_id == "b"
    assert await broker.finish(queue_name, [done(first, Outcome.RETRY)], 60) == [True]
    again = await take_one(broker, queue_name)
    assert again.token > first.token
    assert await broker.finish(queue_name, [done(first)], 60) == [False]
    assert await broker.finish(queue_name, [done(again), done(d)], 60) == [True, True]


@pytest.mark.parametrize("outcome", [Outcome.RETRY, Outcome.DEFER, Outcome.FAILED])
async def test_a_cancel_asked_for_while_a_job_ran_outlasts_its_failure(
    broker: Broker, queue_name: str, outcome: Outcome
) -> None:
    # The job failed (or was rate limited) before its worker heard of the cancel: it is neither
    # retried nor dead-lettered, it ends cancelled at once, with no error of the attempt.
    await broker.enqueue(queue_name, [new("a")])
    d = await take_one(broker, queue_name)
    assert await broker.cancel(queue_name, "a", time.time(), 60) == "requested"
    failure = done(d, outcome, error=b"oops", retry_at=time.time() + 3600,
                   reason="failed after 1 attempt(s)" if outcome is Outcome.FAILED else None)
    assert await broker.finish(queue_name, [failure], 60) == [True]
    rec = await record(broker, queue_name, "a")
    assert (rec.state, rec.attempt, rec.error, rec.dead_reason) == ("cancelled", 1, None, None)
    assert await take(broker, queue_name) == []
    assert await broker.dead_letters(queue_name, 10) == []


async def test_an_end_without_an_error_of_its_own_keeps_none_of_an_earlier_attempt(
    broker: Broker, queue_name: str
) -> None:
    # Revoked as its retry is delivered, or dead-lettered for its deliveries: the first
    # attempt's error is not why it ended (the dead letter has its own, DeliveryLimitExceeded).
    await broker.enqueue(queue_name, [new("a"), new("b")])
    for job_id in ("a", "b"):
        d = await take_one(broker, queue_name)
        assert d.job_id == job_id
        assert await broker.finish(queue_name, [done(d, Outcome.RETRY, error=b"first")], 60) == [True]
    assert await broker.revoke(queue_name, "a", True)
    [ended] = await take(broker, queue_name, max_deliveries=1)
    assert (ended.job_id, ended.ended) == ("a", "revoked")
    assert await take(broker, queue_name, max_deliveries=1)  # b's second attempt, whose worker dies
    assert [d.ended for d in await broker.reclaim(queue_name, "w2", 1, 0, 1)] == ["failed"]  # one too many
    a, b = await record(broker, queue_name, "a"), await record(broker, queue_name, "b")
    assert (a.state, a.error) == ("revoked", None)
    assert b.state == "failed"
    assert b.error is not None
    assert orjson.loads(b.error)["type"] == "DeliveryLimitExceeded"
    assert "max_deliveries=1" in str(b.dead_reason)


async def test_a_dead_letter_retried_never_reuses_a_token_of_its_earlier_deliveries(
    broker: Broker, queue_name: str
) -> None:
    # Its first delivery's worker went silent and the job went to the dead letters at its next
    # delivery (max_deliveries=1); retried, its new delivery's token must be new, or the silent
    # worker's late failure would overwrite the new run.
    await broker.enqueue(queue_name, [new("a")])
    silent = await take_one(broker, queue_name, consumer="w1", max_deliveries=1)
    assert [d.ended for d in await broker.reclaim(queue_name, "w2", 1, 0, 1)] == ["failed"]
    assert (await record(broker, queue_name, "a")).state == "failed"
    assert await broker.retry(queue_name, "a", time.time())
    fresh = await take_one(broker, queue_name, consumer="w3", max_deliveries=1)
    assert fresh.token > silent.token
    assert await broker.finish(queue_name, [done(silent, Outcome.FAILED, error=b"late")], 60) == [False]
    assert await broker.finish(queue_name, [done(fresh, result=b"1")], 60) == [True]
    assert (await record(broker, queue_name, "a")).state == "succeeded"


async def test_a_job_handed_back_names_no_start_or_worker(broker: Broker, queue_name: str) -> None:
    # Pending again, no one runs it: its record says so, whichever delivery it came back from.
    await broker.enqueue(queue_name, [new("a")])
    for consumer in ("w1", "w2"):
        d = await take_one(broker, queue_name, consumer=consumer)
        assert (await record(broker, queue_name, "a")).worker == consumer
        await broker.release(queue_name, [d])
        rec = await record(broker, queue_name, "a")
        assert (rec.state, rec.started_at, rec.worker) == ("pending", None, None)
