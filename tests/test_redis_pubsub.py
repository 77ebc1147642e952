"""Waiting on outcomes when the Redis pub/sub connection misbehaves: a SUBSCRIBE refused, a
connection that stops answering without closing."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis.asyncio

from aqueue import (
    BrokerConnectionError,
    BrokerError,
    Job,
    JobCancelled,
    JobState,
    LockTimeout,
    Queue,
    ResultGroup,
    TaskError,
    every,
)
from aqueue import _outage as outage
from aqueue.brokers import Completion, Outcome, RedisBroker
from aqueue.brokers import _notifier as notifier_module
from aqueue.brokers import _redis as redis_module
from aqueue.brokers._keys import GROUP, Keys
from tests.conftest import start_redis


class FreezingProxy:
    """A TCP proxy to Redis that can stop forwarding on one connection while keeping it open: the
    other end hears nothing, and no close either (a failover behind a virtual address, a flow a
    load balancer dropped). Or it can cut every connection and take no new one for a while, as
    Redis restarting does, its data kept."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen: dict[int, asyncio.Event] = {}  # per client-side port
        self.port = 0
        self.is_cut = False
        self.refused = 0  # connections closed as they came, while cut
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self, client_port: int) -> None:
        self.frozen[client_port].set()

    def cut(self) -> None:
        """Close every connection, and each new one as it comes, until `mend()`."""
        self.is_cut = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def mend(self) -> None:
        self.is_cut = False

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.refused += 1
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
        frozen = self.frozen[writer.get_extra_info("peername")[1]] = asyncio.Event()
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(source, sink, frozen))
            self._tasks.add(task)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, frozen: asyncio.Event) -> None:
        try:
            while data := await source.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # holds the connection open, silent
                sink.write(data)
                await sink.drain()
        finally:
            sink.close()


@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[FreezingProxy]:
    proxy = FreezingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    yield proxy
    await proxy.close()


def pubsub_port(broker: RedisBroker) -> int:
    """The client-side port of the broker's pub/sub connection."""
    assert broker._notifier is not None
    connection = broker._notifier._pubsub.connection
    assert connection is not None
    return int(connection._writer.get_extra_info("sockname")[1])  # type: ignore[union-attr]


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def idle_queue(redis_url: str, queue_name: str) -> AsyncIterator[Queue]:
    """A queue with the task `two`, and no worker: what it enqueues stays pending."""
    queue = Queue(redis_url, name=queue_name)
    queue.task(name="two")(two)
    yield queue
    await queue.close()


@asynccontextmanager
async def once_waited_on(
    admin: redis.asyncio.Redis, queue_name: str, job_id: str, then: Callable[[], Awaitable[object]]
) -> AsyncIterator[None]:
    """For the body (which waits on the job): `then` runs as soon as a process has registered on
    the job's record to hear of its end."""

    async def act() -> None:
        record = f"aqueue:{{{queue_name}}}:job:{job_id}"
        with anyio.fail_after(10):
            while not await admin.hget(record, "waiters"):  # noqa: ASYNC110 - state in Redis
                await anyio.sleep(0.01)
        await then()

    async with anyio.create_task_group() as tg:
        tg.start_soon(act)
        yield


async def until_lock_waited_on(admin: redis.asyncio.Redis, queue_name: str, name: str) -> None:
    """Until a process listens for the release of lock `name` (a waiter waits on the broker)."""
    channel = f"aqueue:{{{queue_name}}}:lock:{name}"
    with anyio.fail_after(10):
        while (await admin.pubsub_numsub(channel))[0][1] == 0:  # noqa: ASYNC110 - state in Redis
            await anyio.sleep(0.01)


async def test_the_acl_commands_readme_lists_serve_a_worker_and_a_producer(
    redis_url: str, queue_name: str, admin: redis.asyncio.Redis
) -> None:
    # The narrow list README gives (it lacked lists, PING, MULTI and EXEC: connecting, a busy
    # worker's read and every outcome's write were refused; then TIME and sets: rate limits,
    # periodic ticks, purging dead letters and a batch kept for its dead letter).
    user = f"u{uuid.uuid4().hex[:8]}"
    await admin.execute_command(
        "ACL", "SETUSER", user, "on", ">pw", "~aqueue:*", "&aqueue:*", "+@stream", "+@hash", "+@set",
        "+@sortedset", "+@list", "+@string", "+@keyspace", "+@pubsub", "+evalsha", "+script|load",
        "+time", "+ping", "+multi", "+exec", "+client|id", "+client|unblock")
    queue = Queue(f"redis://{user}:pw@{redis_url.split('://', 1)[1]}", name=queue_name)
    runs: list[int] = []
    started, ticked = anyio.Event(), anyio.Event()

    @queue.periodic(every(seconds=0.25))
    async def tick() -> None:
        ticked.set()

    @queue.task
    async def fails() -> None:
        raise ValueError("for good")

    @queue.task(retries=1)
    async def add(a: int, b: int) -> int:
        runs.append(a)
        if len(runs) == 1:
            raise ValueError("retried once")
        return a + b

    @queue.task
    async def waits() -> None:
        started.set()
        await anyio.sleep_forever()

    try:
        async with queue, queue.worker():
            assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
            assert await (await add.options(delay=0.05).enqueue(2, 2)).result(timeout=10) == 4
            assert await (await add.map([(3, 3), (4, 4)])).get(timeout=10) == [6, 8]
            async with queue.lock("guarded", ttl=5):
                with pytest.raises(LockTimeout):
                    async with queue.lock("guarded", timeout=0.05):  # waits on its release
                        pass
            job = await waits.enqueue()
            with anyio.fail_after(10):
                await started.wait()
            assert await job.cancel()
            with pytest.raises(JobCancelled):
                await job.result(timeout=10)
            assert [record.task for record in await queue.jobs(task="add")] == ["add"] * 4
            async with queue.rate_limit("smtp", limit=1, per=60):
                pass
            batch = await queue.batch([fails.s(), add.s(5, 5)], on_complete=add.s(6, 6))
            with pytest.raises(TaskError):
                await batch.members[0].result(timeout=10)
            assert await batch.members[1].result(timeout=10) == 10
            assert await batch.callback("complete").result(timeout=10) == 12
            with anyio.fail_after(10):
                await ticked.wait()
        assert await queue.purge_dead_letters() == 1
    finally:
        await queue.close()
        await admin.execute_command("ACL", "DELUSER", user)


async def test_a_refused_subscribe_fails_the_wait_and_the_next_wait_subscribes_again(
    redis_url: str, queue_name: str, admin: redis.asyncio.Redis
) -> None:
    # An ACL user without channel rights: Redis answers the inbox's SUBSCRIBE with an error.
    # The pub/sub reader used to end on it, and every later wait of the process hang.
    user = f"u{uuid.uuid4().hex[:8]}"
    await admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~aqueue:*", "+@all", "resetchannels")
    worker_queue = Queue(redis_url, name=queue_name)
    queue = Queue(f"redis://{user}:pw@{redis_url.split('://', 1)[1]}", name=queue_name)
    for q in (worker_queue, queue):
        q.task(name="two")(two)
    try:
        async with worker_queue.worker():
            job = await queue.tasks["two"].enqueue()
            with anyio.fail_after(5):
                with pytest.raises(BrokerError, match="no permissions"):
                    await job.result(timeout=30)
            await admin.execute_command("ACL", "SETUSER", user, "&aqueue:*")  # as README says
            with anyio.fail_after(5):
                assert await job.result(timeout=30) == 2
    finally:
        await queue.close()
        await worker_queue.close()
        await admin.execute_command("ACL", "DELUSER", user)


async def two() -> int:
    return 2


@pytest.fixture
def answer_within(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(notifier_module, "ANSWER_WITHIN", 0.3)
    return 0.3


async def test_a_subscribe_on_a_connection_that_answers_nothing_moves_to_a_new_one(
    redis_url: str, queue_name: str, proxy: FreezingProxy, answer_within: float
) -> None:
    # Its SUBSCRIBE went into a silent connection: no confirmation ever came, and the wait hung
    # until TCP keepalive gave up on the connection (hours).
    broker = RedisBroker(f"redis://127.0.0.1:{proxy.port}/0")
    first, second = (Queue(broker=broker, name=f"{queue_name}-{i}") for i in (1, 2))
    worker_first, worker_second = (Queue(redis_url, name=q.name) for q in (first, second))
    for q in (first, second, worker_first, worker_second):
        q.task(name="two")(two)
    try:
        async with worker_first.worker(), worker_second.worker():
            with anyio.fail_after(10):
                assert await (await first.tasks["two"].enqueue()).result() == 2  # subscribed
            job = await second.tasks["two"].enqueue()
            proxy.freeze(pubsub_port(broker))
            with anyio.fail_after(10 * answer_within):
                assert await job.result() == 2  # a new inbox: subscribed on a new connection
    finally:
        await broker.close()
        await worker_first.close()
        await worker_second.close()


async def test_a_subscription_on_a_connection_that_answers_nothing_moves_to_a_new_one(
    redis_url: str, queue_name: str, proxy: FreezingProxy, answer_within: float,
    admin: redis.asyncio.Redis,
) -> None:
    # Subscribed already, its outcome published into a silent connection: the waiter heard of it
    # only when it read the job again, RECHECK (10 s) later.
    queue = Queue(f"redis://127.0.0.1:{proxy.port}/0", name=queue_name)
    worker_queue = Queue(redis_url, name=queue_name)
    go = anyio.Event()

    async def gated() -> int:
        await go.wait()
        return 2

    queue.task(name="gated")(gated)
    worker_queue.task(name="gated")(gated)

    async def end_it() -> None:
        go.set()

    try:
        async with worker_queue.worker():
            go.set()
            with anyio.fail_after(10):
                assert await (await queue.tasks["gated"].enqueue()).result() == 2  # subscribed
            go = anyio.Event()
            assert isinstance(queue.broker, RedisBroker)
            proxy.freeze(pubsub_port(queue.broker))
            job = await queue.tasks["gated"].enqueue()
            async with once_waited_on(admin, queue_name, job.id, end_it):
                with anyio.fail_after(10 * answer_within):
                    assert await job.result() == 2
    finally:
        await queue.close()
        await worker_queue.close()


async def test_a_wait_whose_last_read_gets_no_reply_ends_at_its_timeout(
    idle_queue: Queue, queue_name: str, admin: redis.asyncio.Redis
) -> None:
    # Redis paused as the timeout passed: the read of the record as it stands waited for Redis
    # (up to its socket_timeout, then failing with a connection error) past the caller's timeout.
    async def pause() -> None:
        await admin.execute_command("CLIENT", "PAUSE", 2000, "ALL")

    job = await idle_queue.tasks["two"].enqueue()  # no worker: it stays pending
    async with once_waited_on(admin, queue_name, job.id, pause):
        with anyio.fail_after(1.5), pytest.raises(TimeoutError, match="no reply from Redis"):
            await job.result(timeout=0.5)
    with anyio.fail_after(10):
        await admin.ping()  # answered once the pause is over


async def test_a_subscribe_racing_the_clients_own_reconnect_is_a_lost_connection(
    idle_queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As Redis came back from a restart, waits re-subscribing raced redis-py's reader making the
    # lost connection again: two reads at once on one stream, and about half of 200 waits raised
    # asyncio's RuntimeError ("read() called while another coroutine is already waiting for
    # incoming data") out of `job.result()`.
    job = await idle_queue.tasks["two"].enqueue()  # no worker: it stays pending
    with pytest.raises(TimeoutError):
        await job.result(timeout=0.05)  # the notifier is up
    assert isinstance(idle_queue.broker, RedisBroker)
    notifier = idle_queue.broker._notifier
    assert notifier is not None
    pubsub = notifier._pubsub
    subscribe = pubsub.subscribe
    raced = False

    async def racing_subscribe(*channels: str) -> None:
        nonlocal raced
        if not raced:
            raced = True
            raise RuntimeError("read() called while another coroutine is already waiting for incoming data")
        await subscribe(*channels)

    monkeypatch.setattr(pubsub, "subscribe", racing_subscribe)
    notifier._release_all()  # as for a lost connection: the next wait subscribes again
    # A lost connection, which the wait rides through: it subscribes again and waits its time.
    with anyio.fail_after(5), pytest.raises(TimeoutError, match="did not finish"):
        await job.result(timeout=0.5)
    assert raced
    with pytest.raises(TimeoutError):  # the next wait subscribes on a connection made afresh
        await job.result(timeout=0.05)
    async with idle_queue.worker():
        assert await job.result(timeout=10) == 2


@pytest.fixture
async def cut_off_queue(
    redis_url: str, queue_name: str, proxy: FreezingProxy
) -> AsyncIterator[tuple[Queue, Queue]]:
    """A queue that reaches Redis through the proxy (cut it to put Redis out of its reach), and a
    queue of the same name that reaches Redis directly, for the worker; both with the task `two`."""
    through = Queue(f"redis://127.0.0.1:{proxy.port}/0", name=queue_name)
    direct = Queue(redis_url, name=queue_name)
    for q in (through, direct):
        q.task(name="two")(two)
    yield through, direct
    proxy.mend()
    await through.close()
    await direct.close()


async def test_waits_ride_through_redis_being_out_of_reach_for_a_while(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, queue_name: str, admin: redis.asyncio.Redis
) -> None:
    # Redis restarting, a failover: every wait in progress raised BrokerConnectionError at once (198
    # of 200 `job.result()` calls for a 50 ms outage), failing every request that waited in a web
    # app, though the jobs ran on.
    queue, _ = cut_off_queue
    job = await queue.tasks["two"].enqueue()  # no worker yet: it stays pending
    results = await waits_across_an_outage(job, 50, 20, cut_off_queue, proxy, queue_name, admin)
    assert results == [2] * 50


async def waits_across_an_outage(
    job: Job[int], waits: int, refusals: int, cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy,
    queue_name: str, admin: redis.asyncio.Redis,
) -> list[int]:
    """What `waits` waits on the job (pending, no worker) get when Redis goes out of their reach
    once they wait, until it has refused `refusals` connections, and a worker then runs the job."""
    results: list[int] = []

    async def wait() -> None:
        results.append(await job.result(timeout=30))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            async with once_waited_on(admin, queue_name, job.id, lambda: anyio.lowlevel.checkpoint()):
                for _ in range(waits):
                    tg.start_soon(wait)
            proxy.cut()
            while proxy.refused < refusals:  # noqa: ASYNC110 - the waits try again, and are refused
                await anyio.sleep(0.01)
            proxy.mend()
            async with cut_off_queue[1].worker():
                while len(results) < waits:  # noqa: ASYNC110 - the waits end as the job does
                    await anyio.sleep(0.01)
    return results


async def test_a_groups_get_and_as_completed_ride_through_redis_out_of_reach_as_job_waits_do(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy,
) -> None:
    # Their read of every record at once failed at once (BrokerConnectionError) while Redis was
    # out of reach, where each job's own wait rides through.
    queue, direct = cut_off_queue
    group = ResultGroup([await queue.tasks["two"].enqueue() for _ in range(3)])
    proxy.cut()
    results: list[list[int]] = []

    async def get() -> None:
        results.append(await group.get(timeout=30))

    async def as_completed() -> None:
        results.append([value async for value in group.as_completed(timeout=30)])

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(get)
            tg.start_soon(as_completed)
            while proxy.refused < 4:  # noqa: ASYNC110 - the calls try again, and are refused
                await anyio.sleep(0.01)
            proxy.mend()
            async with direct.worker():
                while len(results) < 2:  # noqa: ASYNC110 - they end as the jobs do
                    await anyio.sleep(0.01)
    assert results == [[2, 2, 2]] * 2


async def test_a_groups_get_gives_up_its_read_of_a_silent_redis_within_its_timeout(queue_name: str) -> None:
    # A Redis that holds its connections without a word: the read of every record at once waited
    # for the connection's socket_timeout (5 s), past the group's timeout.
    server = start_redis()
    queue = Queue(server.url, name=queue_name)
    queue.task(name="two")(two)
    try:
        group = ResultGroup([await queue.tasks["two"].enqueue() for _ in range(3)])
        server.process.send_signal(signal.SIGSTOP)
        try:
            with anyio.fail_after(3), pytest.raises(TimeoutError):
                await group.get(timeout=0.2)
        finally:
            server.process.send_signal(signal.SIGCONT)
    finally:
        await queue.close()
        server.stop()


async def test_a_groups_error_met_before_a_silent_brokers_jobs_is_raised_without_waiting_for_it(
    redis_url: str, queue_name: str
) -> None:
    # A group across two brokers, the second holding its connections without a word: the error of
    # the first job, on the first broker, came only once the second's read gave up (5 s).
    server = start_redis()
    here, there = Queue(redis_url, name=queue_name), Queue(server.url, name=queue_name)

    @here.task(name="fails", retries=0)
    async def fails() -> None:
        raise ValueError("no")

    there.task(name="two")(two)
    try:
        failed = await fails.enqueue()
        async with here.worker():
            with pytest.raises(TaskError):
                await failed.result(timeout=10)
        group = ResultGroup([failed, await there.tasks["two"].enqueue()])
        server.process.send_signal(signal.SIGSTOP)
        try:
            with anyio.fail_after(2), pytest.raises(TaskError):
                await group.get()
        finally:
            server.process.send_signal(signal.SIGCONT)
    finally:
        await here.close()
        await there.close()
        server.stop()


async def test_every_wait_pauses_before_it_tries_again_not_only_the_one_whose_call_failed(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, queue_name: str, admin: redis.asyncio.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The waits share one subscription: when its SUBSCRIBE failed, the one wait that sent it paused,
    # and the others, told the connection was lost, listened again at once: with 100 waits, 28,714
    # subscribes in 3 s of outage and the event loop kept busy all along.
    queue, _ = cut_off_queue
    job = await queue.tasks["two"].enqueue()
    pauses = listens = 0
    pause = outage.OutOfReach.pause

    async def counted_pause(self: outage.OutOfReach, at_most: float = outage.RETRY_MOST) -> None:
        nonlocal pauses
        pauses += 1
        await pause(self, at_most)

    monkeypatch.setattr(outage.OutOfReach, "pause", counted_pause)
    await queue.connect()
    assert isinstance(queue.broker, RedisBroker)
    notifier = queue.broker._notifier
    assert notifier is not None
    listen = notifier.listen

    def counted_listen(*args: Any, **kwargs: Any) -> Any:
        nonlocal listens
        listens += 1
        return listen(*args, **kwargs)

    monkeypatch.setattr(notifier, "listen", counted_listen)
    results = await waits_across_an_outage(job, 20, 10, cut_off_queue, proxy, queue_name, admin)
    assert results == [2] * 20
    # Each wait listened once, then once more after each of its pauses.
    assert listens <= pauses + 20, (listens, pauses)


async def test_waits_without_a_timeout_give_up_on_a_redis_that_stops_answering(
    queue_name: str, answer_within: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Redis that holds its connections without a word (a stopped process, a frozen host): a
    # subscribe whose confirmation does not come is a lost connection, told to every wait, but the
    # time out of reach was counted only by the wait that sent it, a different one each time: 50
    # waits with no timeout went on for over 40 s where they were to give up after 3.
    monkeypatch.setattr(outage, "RIDE_THROUGH", 0.5)
    server = start_redis()
    queue = Queue(f"{server.url}?socket_timeout=1", name=queue_name)
    queue.task(name="two")(two)
    outcomes: list[str] = []

    async def wait(job_id: str) -> None:
        try:
            await queue.job(job_id).result()
        except BrokerConnectionError:
            outcomes.append("gave up")

    try:
        job = await queue.tasks["two"].enqueue()
        with pytest.raises(TimeoutError):
            await job.result(timeout=0.05)  # subscribed: the waits below share it
        server.process.send_signal(signal.SIGSTOP)
        try:
            with anyio.fail_after(6):
                async with anyio.create_task_group() as tg:
                    for _ in range(20):
                        tg.start_soon(wait, job.id)
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert outcomes == ["gave up"] * 20
    finally:
        await queue.close()
        server.stop()


@pytest.mark.parametrize("timeout", [0.5, None])
async def test_a_wait_out_of_reach_of_redis_tries_again_then_gives_up(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, monkeypatch: pytest.MonkeyPatch,
    timeout: float | None,
) -> None:
    # Until its timeout passes; with none, until its tries have failed for RIDE_THROUGH s in a row.
    monkeypatch.setattr(outage, "RIDE_THROUGH", 0.3)
    queue, _ = cut_off_queue
    job = await queue.tasks["two"].enqueue()
    proxy.cut()
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(BrokerConnectionError, match="cannot reach Redis"):
        await job.result(timeout=timeout)
    assert time.monotonic() - started >= (timeout or 0.3)  # not at once
    assert proxy.refused > 1  # tried again


async def test_a_lock_waiter_rides_through_redis_being_out_of_reach_for_a_while(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, queue_name: str, admin: redis.asyncio.Redis
) -> None:
    # The waiter raised BrokerConnectionError at once, its lock never taken.
    queue, holder_queue = cut_off_queue
    got = anyio.Event()

    async def waiter() -> None:
        async with queue.lock("guarded", timeout=30):
            got.set()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            async with holder_queue.lock("guarded", ttl=30):
                tg.start_soon(waiter)
                await until_lock_waited_on(admin, queue_name, "guarded")
                proxy.cut()
                while proxy.refused < 5:  # noqa: ASYNC110 - the waiter tries again, and is refused
                    await anyio.sleep(0.01)
                proxy.mend()
            await got.wait()  # at the release, long before the ttl


async def test_a_lock_request_out_of_reach_of_redis_tries_again_until_its_timeout(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, _ = cut_off_queue
    await queue.connect()
    proxy.cut()
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(BrokerConnectionError, match="cannot reach Redis"):
        async with queue.lock("guarded", timeout=0.5):
            pass
    assert time.monotonic() - started >= 0.5  # not at once
    assert proxy.refused > 1  # tried again
    refused = proxy.refused
    with pytest.raises(BrokerConnectionError):  # timeout=0: one try
        async with queue.lock("guarded", timeout=0):
            pass
    monkeypatch.setattr(outage, "RIDE_THROUGH", 0.3)
    with anyio.fail_after(5), pytest.raises(BrokerConnectionError):  # no timeout: for a while
        async with queue.lock("guarded"):
            pass
    assert proxy.refused > refused + 2


async def lined_up_through_an_outage(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, queue_name: str, admin: redis.asyncio.Redis,
    first: float | None, behind: list[float | None],
) -> list[tuple[float | None, str]]:
    """Waiters for a lock held elsewhere, lined up in this process (with timeout `first` at the
    front, the one that asks Redis, and `behind` after it), as every connection to Redis is cut:
    each one's timeout and how it ended, in the order they ended."""
    queue, holder_queue = cut_off_queue
    ended: list[tuple[float | None, str]] = []

    async def waiter(timeout: float | None) -> None:
        try:
            async with queue.lock("guarded", timeout=timeout):
                ended.append((timeout, "took it"))
        except BrokerConnectionError as exc:
            ended.append((timeout, str(exc)))

    async with holder_queue.lock("guarded", ttl=30), anyio.create_task_group() as tg:
        tg.start_soon(waiter, first)
        await until_lock_waited_on(admin, queue_name, "guarded")
        for timeout in behind:
            tg.start_soon(waiter, timeout)
        proxy.cut()
    return ended


async def test_lock_waiters_lined_up_in_a_process_give_up_together_when_redis_stays_away(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, queue_name: str, admin: redis.asyncio.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only the first waiter of a process asks the broker; each next one, its turn come, counted its
    # time out of reach afresh: the tenth gave up after ten times as long (k x 30 s). And a waiter
    # whose timeout passed in the line said LockTimeout ("not acquired"), not that Redis was away.
    monkeypatch.setattr(outage, "RIDE_THROUGH", 0.3)
    with anyio.fail_after(2.5):  # ten one after another took over 3 s
        behind: list[float | None] = [*[None] * 9, 0.5]
        ended = await lined_up_through_an_outage(cut_off_queue, proxy, queue_name, admin, None, behind)
    assert [("out of reach" in why or "cannot reach" in why) for _, why in ended] == [True] * 11, ended


async def test_a_lock_waiter_with_no_timeout_gives_up_in_its_time_behind_one_with_a_longer_timeout(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, queue_name: str, admin: redis.asyncio.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Lined up behind a waiter whose timeout is longer than RIDE_THROUGH, a waiter with no timeout
    # waited out that timeout before its turn came and it could give up.
    monkeypatch.setattr(outage, "RIDE_THROUGH", 0.3)
    with anyio.fail_after(10):
        ended = await lined_up_through_an_outage(cut_off_queue, proxy, queue_name, admin, 3.0, [None])
    assert [timeout for timeout, _ in ended] == [None, 3.0], ended
    assert "out of reach for 0.3s" in ended[0][1]


@pytest.mark.parametrize("what", ["result", "lock"])
async def test_closing_the_queue_ends_a_wait_that_rides_through_an_outage(
    cut_off_queue: tuple[Queue, Queue], proxy: FreezingProxy, what: str
) -> None:
    # A lock waiter went on through the close, taking the lock later on a broker it opened again.
    queue, _ = cut_off_queue
    job = await queue.tasks["two"].enqueue()
    proxy.cut()

    async def close_once_refused() -> None:
        while proxy.refused < 2:  # noqa: ASYNC110 - the wait tries again, and is refused
            await anyio.sleep(0.01)
        await queue.close()

    async def wait() -> None:
        if what == "result":
            await job.result()
        else:
            async with queue.lock("guarded"):
                pass

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(close_once_refused)
            with pytest.raises(BrokerError, match=r"closed while waiting (on job|for lock)"):
                await wait()
    assert isinstance(queue.broker, RedisBroker)
    assert queue.broker._client is None  # not opened again


async def test_a_reader_racing_the_clients_own_reconnect_drops_the_connection(
    redis_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same race met by the reader: it stopped without a word, the lock waiter stayed
    # subscribed on a connection nobody read, and got the lock only when its ttl ran out.
    queue = Queue(redis_url, name=queue_name)
    try:
        await queue.connect()
        assert isinstance(queue.broker, RedisBroker)
        notifier = queue.broker._notifier
        assert notifier is not None
        reading = notifier._pubsub.get_message
        raced = anyio.Event()

        async def racing_read(*args: Any, **kwargs: Any) -> Any:
            if notifier._channels and not raced.is_set():  # once the waiter listens
                raced.set()
                raise RuntimeError("read() called while another coroutine is already waiting for incoming data")
            return await reading(*args, **kwargs)

        monkeypatch.setattr(notifier._pubsub, "get_message", racing_read)
        got = anyio.Event()

        async def waiter() -> None:
            async with queue.lock("raced", timeout=20):
                got.set()

        async with anyio.create_task_group() as tg:
            async with queue.lock("raced", ttl=30):
                tg.start_soon(waiter)
                with anyio.fail_after(10):
                    await raced.wait()
            with anyio.fail_after(2):  # at the release (it waited for a check 5 s on, or the ttl)
                await got.wait()
    finally:
        await queue.close()


async def test_the_reader_stops_when_the_connection_is_lost_and_a_later_wait_starts_it(
    queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # With Redis gone it reconnected ten times a second, each time logging the loss, for as long
    # as Redis stayed away, whether anyone waited or not.
    server = start_redis()
    queue = Queue(server.url, name=queue_name)
    queue.task(name="two")(two)
    try:
        async with queue.worker():
            with anyio.fail_after(10):
                assert await (await queue.tasks["two"].enqueue()).result() == 2
        assert isinstance(queue.broker, RedisBroker)
        notifier = queue.broker._notifier
        assert notifier is not None
        assert notifier._reader is not None
        reader = notifier._reader.task
        server.kill()
        with anyio.fail_after(10):
            await reader  # it ends, having logged the loss once
        assert notifier._reader is None
        assert [r.message for r in caplog.records].count(
            "pub/sub connection lost, listeners re-subscribe: Connection closed by server."
        ) <= 1
        server.start()
        async with queue.worker():
            with anyio.fail_after(10):
                assert await (await queue.tasks["two"].enqueue()).result() == 2
    finally:
        await queue.close()
        server.stop()


async def test_closing_the_queue_ends_its_waits_and_keeps_it_closed(
    idle_queue: Queue, queue_name: str, admin: redis.asyncio.Redis
) -> None:
    # The waiter was not told: it waited on until its next read of the job (10 s), which opened
    # the broker again, and its connections, behind the close.
    job = await idle_queue.tasks["two"].enqueue()  # no worker: it stays pending
    async with once_waited_on(admin, queue_name, job.id, idle_queue.close):
        with anyio.fail_after(5), pytest.raises(BrokerError, match="closed while waiting on job"):
            await job.result()
    assert isinstance(idle_queue.broker, RedisBroker)
    assert idle_queue.broker._client is None  # not opened again


@pytest.mark.parametrize("turns", [0, 1, 2, 3, 5, 8, 13])
async def test_a_close_anywhere_in_a_wait_ends_it_and_keeps_the_queue_closed(
    idle_queue: Queue, turns: int
) -> None:
    # The close lands after so many turns of the loop: in the wait's subscribe, with its watch in
    # flight, or while it listens. It raised the lost connection, or RuntimeError, and its watch
    # connected the queue again behind the close; or (on redis-py 7.2) a connection being made for
    # the wait opened after the close and was left open.
    job = await idle_queue.tasks["two"].enqueue()

    async def close_later() -> None:
        for _ in range(turns):
            await anyio.lowlevel.checkpoint()
        await idle_queue.close()

    async with anyio.create_task_group() as tg:
        tg.start_soon(close_later)
        with anyio.fail_after(5), pytest.raises(BrokerError, match="closed while waiting on job"):
            await job.result()
    assert isinstance(idle_queue.broker, RedisBroker)
    assert idle_queue.broker._client is None


@pytest.mark.parametrize("call", ["result", "info"])
async def test_a_call_made_while_the_close_runs_leaves_the_queue_whole(idle_queue: Queue, call: str) -> None:
    # A request came while the app closed the queue: it connected again on the client being
    # closed, and kept that pub/sub; every later wait on a result or a lock then failed ("the
    # connection pool is closed") until the queue was closed again.
    job = await idle_queue.tasks["two"].enqueue()
    with pytest.raises(TimeoutError):
        await job.result(timeout=0.05)  # its pub/sub connection is up
    async with anyio.create_task_group() as tg:
        tg.start_soon(idle_queue.close)
        await anyio.lowlevel.checkpoint()  # the close has begun, and waits on its connections
        with anyio.fail_after(5):
            if call == "result":
                with pytest.raises(TimeoutError):  # a call of its own: it connects afresh
                    await job.result(timeout=0.2)
            else:
                assert (await job.info()) is not None
    # Waits made later work: on a result, and on a lock another holds.
    with pytest.raises(TimeoutError):
        await job.result(timeout=0.05)
    async with idle_queue.lock("held", ttl=5):
        with pytest.raises(LockTimeout):
            async with idle_queue.lock("held", ttl=5, timeout=0.05):
                pass
    async with idle_queue.worker():
        assert await job.result(timeout=10) == 2


@pytest.mark.parametrize("wait", ["job", "lock"])
async def test_a_close_while_a_waits_pubsub_connection_comes_leaves_nothing_subscribed(
    redis_url: str, queue_name: str, wait: str
) -> None:
    # On a client the caller gave, whose pool the close leaves open, the pub/sub connection a wait
    # was taking came after the close: it subscribed, stayed taken from the caller's pool, and a
    # reader the close had stopped started again on it.
    client = redis.asyncio.Redis.from_url(redis_url)
    broker = RedisBroker(client=client)
    pool = client.connection_pool
    taking, go_on = anyio.Event(), anyio.Event()
    take = pool.get_connection

    async def held_take(*args: object, **kwargs: object) -> object:
        taking.set()
        await go_on.wait()
        return await take(*args, **kwargs)

    try:
        await broker.connect()
        await broker.lock_acquire(queue_name, "held", "token", 30)
        notifier = broker._notifier
        pool.get_connection = held_take  # type: ignore[method-assign]
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                waiting = (broker.wait(queue_name, "some-job", None) if wait == "job"
                           else broker.lock_wait(queue_name, "held", None))
                with anyio.fail_after(5), pytest.raises(BrokerError, match="was closed while"):
                    await waiting

            tg.start_soon(waiter)
            await taking.wait()
            await broker.close()
            go_on.set()
        pool.get_connection = take  # type: ignore[method-assign]
        assert [c for c in await client.client_list() if c["sub"] != "0"] == []
        assert not pool._in_use_connections
        assert notifier is not None
        assert notifier._reader is None  # no reader started again
    finally:
        await broker.close()
        await client.aclose()


async def test_a_job_keeps_only_the_newest_waiting_processes(
    idle_queue: Queue, queue_name: str, admin: redis.asyncio.Redis
) -> None:
    # A process that stopped waiting (a timeout, a cancel) stayed on the record: a job waited on by
    # short-lived processes grew one inbox per process, each published to when it ended.
    job = await idle_queue.tasks["two"].enqueue()
    assert isinstance(idle_queue.broker, RedisBroker)
    inboxes = [f"{i:016x}" for i in range(100)]
    for inbox in inboxes:
        assert await idle_queue.broker._run(queue_name, "watch", [job.id, inbox]) == 0
    waiters = await admin.hget(f"aqueue:{{{queue_name}}}:job:{job.id}", "waiters")
    assert waiters is not None
    assert waiters.decode().split() == inboxes[-64:]


class FailingGetMessage:
    """Stands in for the pub/sub connection's get_message: once armed, the next call raises what
    redis-py raised from a connection torn down while it reconnected."""

    def __init__(self, real: Callable[..., Awaitable[object]]) -> None:
        self.real, self.armed = real, False

    async def __call__(self, *args: object, **kwargs: object) -> object:
        if self.armed:
            self.armed = False
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        return await self.real(*args, **kwargs)


class SwallowingGetMessage:
    """Stands in for the pub/sub connection's get_message: once armed, the next call waits, loses
    the first cancellation sent to it (as a redis-py call can on Python 3.11), and waits on."""

    def __init__(self, real: Callable[..., Awaitable[object]]) -> None:
        self.real, self.armed = real, False
        self.waiting = anyio.Event()
        self.swallowed = 0

    async def __call__(self, *args: object, **kwargs: object) -> object:
        if not self.armed:
            return await self.real(*args, **kwargs)
        self.armed = False
        self.waiting.set()
        try:
            await anyio.sleep_forever()
        except asyncio.CancelledError:
            self.swallowed += 1
        await anyio.sleep_forever()


def with_stalling_reads(
    admin: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> tuple[notifier_module.Notifier, SwallowingGetMessage]:
    """A notifier whose reads go through a `SwallowingGetMessage` (not armed yet)."""
    notifier = notifier_module.Notifier(admin)
    stalling = SwallowingGetMessage(notifier._pubsub.get_message)
    monkeypatch.setattr(notifier._pubsub, "get_message", stalling)
    return notifier, stalling


async def failing_unsubscribe(*channels: str) -> None:
    """Stands in for the pub/sub connection's unsubscribe: raises what redis-py raised from a
    connection torn down while it reconnected."""
    raise AttributeError("'NoneType' object has no attribute 'writelines'")


async def stall_reader(admin: redis.asyncio.Redis, channel: str, stalling: SwallowingGetMessage) -> None:
    """The reader's next read is the stand-in's (a message brings it round at once)."""
    stalling.armed = True
    await admin.publish(channel, b"first")
    with anyio.fail_after(10):
        await stalling.waiting.wait()


async def hears_anew(notifier: notifier_module.Notifier, admin: redis.asyncio.Redis, channel: str) -> None:
    """Listening on the channel again works: a message published then is heard."""
    async with notifier.listen(channel) as heard:
        await admin.publish(channel, b"again")
        with anyio.fail_after(10):
            assert await heard.wait() == b"again"


async def test_an_unexpected_error_in_the_reader_wakes_the_listeners_to_listen_again(
    admin: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reader used to end on an exception it did not name, the channel still counted as
    # subscribed: every later wait on it heard nothing until its own re-check.
    notifier = notifier_module.Notifier(admin)
    failing = FailingGetMessage(notifier._pubsub.get_message)
    monkeypatch.setattr(notifier._pubsub, "get_message", failing)
    channel = f"c{uuid.uuid4().hex}"
    try:
        async with notifier.listen(channel) as heard:
            failing.armed = True  # the reader's next read, after the message below
            await admin.publish(channel, b"first")
            with anyio.fail_after(10):
                assert await heard.wait() == b"first"
                assert await heard.wait() is None
            assert heard.lost
        await hears_anew(notifier, admin, channel)
    finally:
        await notifier.close()


async def test_an_unexpected_error_unsubscribing_drops_the_connection(
    admin: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = notifier_module.Notifier(admin)
    channel = f"c{uuid.uuid4().hex}"

    try:
        async with notifier.listen(channel):
            monkeypatch.setattr(notifier._pubsub, "unsubscribe", failing_unsubscribe)
        assert notifier._unsubscriber is not None
        unsubscriber = notifier._unsubscriber.task
        with anyio.fail_after(10):
            await asyncio.gather(unsubscriber, return_exceptions=True)
        assert unsubscriber.exception() is None
        assert notifier._pubsub.connection is None or not notifier._pubsub.connection.is_connected
        monkeypatch.undo()
        await hears_anew(notifier, admin, channel)
    finally:
        await notifier.close()


@pytest.mark.parametrize("released_by", ["a lost connection", "a refused SUBSCRIBE"])
async def test_a_subscribe_waiting_its_turn_sends_nothing_once_its_channel_is_released(
    admin: redis.asyncio.Redis, released_by: str
) -> None:
    # A listen whose SUBSCRIBE waited behind another pub/sub command (a drop's disconnect, say)
    # while the notifier forgot its channels sent it afterwards, for a channel no longer tracked:
    # subscribed for good, every message on it read and thrown away.
    notifier = notifier_module.Notifier(admin)
    channel = f"c{uuid.uuid4().hex}"
    refusal = redis.exceptions.ResponseError("NOPERM no permissions to access a channel")
    outcome: list[object] = []

    async def listen() -> None:
        try:
            async with notifier.listen(channel) as heard:
                outcome.append(await heard.wait())
        except redis.exceptions.ResponseError as exc:
            outcome.append(exc)

    try:
        async with anyio.create_task_group() as tg:
            async with notifier._commands:  # another command's turn
                tg.start_soon(listen)
                with anyio.fail_after(10):
                    while channel not in notifier._channels:
                        await anyio.lowlevel.checkpoint()
                assert notifier._channels[channel].sent == 1  # its SUBSCRIBE waits for the turn
                if released_by == "a lost connection":
                    notifier._lost(ConnectionError("the connection is gone"))
                else:
                    notifier._refused(refusal)
        assert outcome == ([None] if released_by == "a lost connection" else [refusal])
        assert not notifier._pubsub.channels
        assert await admin.pubsub_numsub(channel) == [(channel.encode(), 0)]
        await hears_anew(notifier, admin, channel)
    finally:
        await notifier.close()


async def test_closing_ends_a_reader_that_swallowed_its_cancellation(
    admin: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The close cancelled the reader once and waited for it: a read that lost the cancellation
    # left the close waiting for ever.
    notifier, stalling = with_stalling_reads(admin, monkeypatch)
    channel = f"c{uuid.uuid4().hex}"
    async with notifier.listen(channel):
        await stall_reader(admin, channel, stalling)
    # In a task of its own: the close's wait is shielded, so a hang fails this test, not the run.
    closing = asyncio.get_running_loop().create_task(notifier.close())
    with anyio.move_on_after(5):
        await asyncio.wait([closing])
    assert closing.done(), "the close still waits for its reader"
    closing.result()
    assert stalling.swallowed == 1


async def test_dropping_the_connection_ends_a_reader_that_swallowed_its_cancellation(
    admin: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unsubscribe that fails drops the connection, stopping the reader first: cancelled once,
    # a reader that lost the cancellation left the drop (and every later unsubscribe) waiting.
    notifier, stalling = with_stalling_reads(admin, monkeypatch)
    channel = f"c{uuid.uuid4().hex}"

    try:
        async with notifier.listen(channel):
            await stall_reader(admin, channel, stalling)
            monkeypatch.setattr(notifier._pubsub, "unsubscribe", failing_unsubscribe)
        assert notifier._unsubscriber is not None
        unsubscriber = notifier._unsubscriber.task
        with anyio.move_on_after(5):
            await asyncio.wait([unsubscriber])
        assert unsubscriber.done(), "the drop still waits for the reader"
        assert unsubscriber.exception() is None
        assert stalling.swallowed == 1
        assert notifier._reader is None
        monkeypatch.undo()
        await hears_anew(notifier, admin, channel)
    finally:
        await notifier.close()


async def test_a_wait_whose_call_the_close_cuts_off_says_it_was_closed(
    idle_queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() takes the connections from under a call in flight: the wait raised the lost
    # connection ("cannot reach Redis") rather than the close.
    job = await idle_queue.tasks["two"].enqueue()
    broker = idle_queue.broker
    assert isinstance(broker, RedisBroker)
    pool = broker.client.connection_pool
    real_call = pool.call
    watch = broker._sha("watch")

    async def call_cut_off_by_close(*args: object) -> object:
        if args[:2] == ("EVALSHA", watch):
            await idle_queue.close()
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        return await real_call(*args)

    monkeypatch.setattr(pool, "call", call_cut_off_by_close)
    with anyio.fail_after(5), pytest.raises(BrokerError, match="closed while waiting on job"):
        await job.result()
    assert broker._client is None  # not opened again


async def test_a_lock_wait_whose_call_the_close_cuts_off_says_it_was_closed(
    idle_queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = idle_queue.broker
    assert isinstance(broker, RedisBroker)
    assert await broker.lock_acquire(idle_queue.name, "held", "other", 30.0)
    client = broker.client

    async def pttl_cut_off_by_close(key: str) -> int:
        await idle_queue.close()
        raise redis.exceptions.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(client, "pttl", pttl_cut_off_by_close)
    with anyio.fail_after(5), pytest.raises(BrokerError, match="closed while waiting for lock 'held'"):
        async with idle_queue.lock("held", timeout=10):
            pytest.fail("the lock was taken")
    assert broker._client is None


async def test_the_cancel_listener_reads_within_the_socket_timeout(
    redis_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # redis-py 7 bounds a blocking pub/sub read by the connection's socket timeout (8 does not):
    # a read for ever failed there as a lost connection every 5 s of quiet, and a cancel published
    # while the worker listened again waited for the fallback check. Stood in for here: a read
    # asked to wait longer than the socket timeout fails at once.
    real_get_message = redis.asyncio.client.PubSub.get_message

    async def bounded(self: redis.asyncio.client.PubSub, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout", args[1] if len(args) > 1 else 0.0)
        if timeout is None or timeout > 5.0:
            raise redis.exceptions.TimeoutError("Timeout reading (a read past the socket timeout)")
        return await real_get_message(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.client.PubSub, "get_message", bounded)
    queue = Queue(redis_url, name=queue_name)
    started = anyio.Event()

    @queue.task
    async def wait_for_cancel() -> None:
        started.set()
        await anyio.sleep_forever()

    with caplog.at_level(logging.WARNING, logger="aqueue"):
        async with queue, queue.worker():
            job = await wait_for_cancel.enqueue()
            with anyio.fail_after(10):
                await started.wait()
            assert await job.cancel()
            with pytest.raises(JobCancelled):
                await job.result(timeout=10)
    assert "listening for cancel requests" not in caplog.text  # neither failed nor out of reach


@pytest.fixture
async def channelless_url(redis_url: str, admin: redis.asyncio.Redis) -> AsyncIterator[str]:
    """The URL of an ACL user with the keys but no channel rights (README says it needs them)."""
    user = f"u{uuid.uuid4().hex[:8]}"
    await admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~aqueue:*", "+@all", "resetchannels")
    yield f"redis://{user}:pw@{redis_url.split('://', 1)[1]}"
    await admin.execute_command("ACL", "DELUSER", user)


async def test_a_worker_without_channel_rights_still_ends_a_job_someone_waits_on(
    redis_url: str, queue_name: str, admin: redis.asyncio.Redis, channelless_url: str
) -> None:
    # The finish script's message to the waiter was refused (NOPERM) and ended the script half
    # way: the outcomes before it written, nothing acked, and the jobs ran again after their lease.
    runs: list[int] = []
    release = anyio.Event()
    worker_queue, queue = Queue(channelless_url, name=queue_name), Queue(redis_url, name=queue_name)

    @worker_queue.task(name="once")
    async def once() -> int:
        runs.append(1)
        await release.wait()
        return 2

    queue.task(name="once")(two)
    try:
        async with worker_queue.worker():
            job = await queue.tasks["once"].enqueue()
            async with anyio.create_task_group() as tg:
                tg.start_soon(job.result)  # waits on, told of the end or not
                async with once_waited_on(admin, queue_name, job.id, then=_set(release)):
                    with anyio.fail_after(5):
                        while await job.state() != JobState.SUCCEEDED:  # noqa: ASYNC110 - in Redis
                            await anyio.sleep(0.01)
                        # and its entry acked: left pending, the job would run again
                        stream = Keys(queue_name).stream(0)
                        while (await admin.xpending(stream, GROUP))["pending"]:  # noqa: ASYNC110
                            await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        assert runs == [1]
    finally:
        await queue.close()
        await worker_queue.close()


async def test_a_client_without_channel_rights_cancels_and_releases_a_lock(
    redis_url: str, queue_name: str, channelless_url: str
) -> None:
    # The cancel flag was set, then its message refused: the caller got BrokerError for a cancel
    # that took. A lock's release was refused likewise, and the lock stayed held for its ttl.
    started = anyio.Event()
    worker_queue, queue = Queue(redis_url, name=queue_name), Queue(channelless_url, name=queue_name)

    @worker_queue.task(name="forever")
    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    queue.task(name="forever")(two)
    try:
        async with worker_queue.worker():
            job = await queue.tasks["forever"].enqueue()
            await started.wait()
            assert await job.cancel()
            with anyio.fail_after(10):  # the worker checks for cancels it was not told of
                while await job.state() != JobState.CANCELLED:  # noqa: ASYNC110 - state in Redis
                    await anyio.sleep(0.01)
        async with queue.lock("shared", ttl=30):
            pass
        async with queue.lock("shared", timeout=0):  # free at once, not after 30 s
            pass
    finally:
        await queue.close()
        await worker_queue.close()


def _set(event: anyio.Event) -> Callable[[], Awaitable[None]]:
    async def set_it() -> None:
        event.set()
    return set_it


async def test_a_retried_jobs_result_is_not_the_message_of_its_earlier_end(
    redis_url: str, queue_name: str
) -> None:
    # A wait registers on the job and is told its end by a message; one that timed out stays
    # registered. The job failed for good and was retried from the dead letters elsewhere, the
    # failure's message not yet read here: the next wait took it for its own, and result() raised
    # the failure of before the retry (SPEC: after a retry, the new value; no stale cache).
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def work() -> int:
        return 42

    job = await work.enqueue()
    async with queue:
        with pytest.raises(TimeoutError):
            await job.result(timeout=0.05)  # registered as a waiter: the end is told here

        def fail_then_retry() -> None:  # another process, as it were: a loop of its own
            async def run() -> None:
                other = RedisBroker(redis_url)
                await other.connect()
                try:
                    [d] = await other.receive(queue_name, "w", 1, 0, 10)
                    failed = Completion(d, Outcome.FAILED, time.time(), reason="boom")
                    await other.finish(queue_name, [failed], 60)
                    assert await other.retry(queue_name, job.id, time.time())
                finally:
                    await other.close()
            anyio.run(run)

        thread = threading.Thread(target=fail_then_retry)
        thread.start()
        thread.join()  # holds this loop: the failure's message waits unread on the inbox's socket
        with pytest.raises(TimeoutError):
            await job.result(timeout=0.5)  # it waits for the run the retry asked for
        assert await job.state() == JobState.PENDING
        async with queue.worker():
            assert await job.result(timeout=10) == 42


async def test_a_first_result_keeps_its_timeout_against_a_redis_that_does_not_answer() -> None:
    # A queue connects on first use (a web process's first request): that connect was made
    # before the wait's timeout began, and held result(timeout=0.5) for its 5 s socket timeout.
    listener = socket.socket()  # accepts connections (the backlog), never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    queue = Queue(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError), anyio.fail_after(20):
            await queue.job("some-id").result(timeout=0.5)
        assert time.monotonic() - start < 3  # the timeout, then one last read of at most 0.5 s
    finally:
        with anyio.move_on_after(1):
            await queue.close()
        listener.close()


async def test_a_first_result_rides_through_a_refused_connection_until_its_timeout() -> None:
    # As a wait on a queue that had connected does (Redis restarting): it gave up at once.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    queue = Queue(f"redis://127.0.0.1:{port}/0")
    try:
        start = time.monotonic()
        with pytest.raises(BrokerConnectionError), anyio.fail_after(10):
            await queue.job("some-id").result(timeout=1.0)
        assert time.monotonic() - start >= 1.0
    finally:
        await queue.close()


async def test_bytes_that_are_no_utf8_on_the_cancel_channel_stop_no_worker(
    redis_url: str, queue_name: str, admin: redis.asyncio.Redis
) -> None:
    # Anyone who may publish on the queue's channels stopped every worker of it ("one of its
    # services failed": the listener's decode raised), their jobs left running.
    queue = Queue(redis_url, name=queue_name)
    started = anyio.Event()

    @queue.task
    async def waits() -> None:
        started.set()
        await anyio.sleep_forever()

    @queue.task
    async def two() -> int:
        return 2

    async with queue, queue.worker():
        job = await waits.enqueue()
        with anyio.fail_after(10):
            await started.wait()
        assert await admin.publish(Keys(queue_name).prefix + "cancel", b"\xff\xfe") == 1
        assert await (await two.enqueue()).result(timeout=10) == 2
        assert await job.cancel()
        with pytest.raises(JobCancelled):
            await job.result(timeout=10)


async def test_bytes_that_are_no_utf8_on_a_result_inbox_deafen_no_wait(
    redis_url: str, queue_name: str, admin: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read while a wait listened, they ended the process's pub/sub reader: that wait and every
    # later one heard its job's end only when it read the job again (RECHECK).
    monkeypatch.setattr(redis_module, "RECHECK", 3600.0)  # heard by its message, or not in time
    queue = Queue(redis_url, name=queue_name)
    gate = anyio.Event()
    values: list[int] = []

    @queue.task
    async def gated() -> int:
        await gate.wait()
        return 2

    async def wait_for(job: Job[int]) -> None:
        with anyio.fail_after(10):  # no timeout of its own: no last read at one
            values.append(await job.result())

    async with queue, queue.worker():
        job = await gated.enqueue()
        async with anyio.create_task_group() as waits:
            waits.start_soon(wait_for, job)
            with anyio.fail_after(10):  # until the wait is registered on the job
                while not await admin.hget(Keys(queue_name).job(job.id), "waiters"):  # noqa: ASYNC110 - state in Redis
                    await anyio.sleep(0.01)
            assert isinstance(queue.broker, RedisBroker)
            inbox = Keys(queue_name).done_channel(queue.broker._inbox)
            assert await admin.publish(inbox, b"\xff\n") == 1
            assert await admin.publish(inbox, job.id.encode() + b"\nnot a count\nsucceeded\n1\n3\n") == 1
            gate.set()
        later = await gated.enqueue()
        with anyio.fail_after(10):
            assert await later.result() == 2
    assert values == [2]


async def test_a_close_during_a_first_waits_pause_is_said_as_the_close(monkeypatch: pytest.MonkeyPatch) -> None:
    # The wait connects within its timeout; refused, it pauses. A close() in that pause left it a
    # broker with no pub/sub: a bare AssertionError, where any other wait says the close.
    paused, go_on = anyio.Event(), anyio.Event()

    async def pause(self: outage.OutOfReach, at_most: float = 1.0) -> None:
        paused.set()
        await go_on.wait()

    monkeypatch.setattr(outage.OutOfReach, "pause", pause)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    queue = Queue(f"redis://127.0.0.1:{port}/0")
    raised: list[BaseException] = []

    async def wait() -> None:
        try:
            await queue.job("some-id").result()
        except BrokerError as exc:
            raised.append(exc)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as waits:
            waits.start_soon(wait)
            await paused.wait()
            await queue.close()
            go_on.set()
    assert [str(exc) for exc in raised] == [
        f"RedisBroker redis://127.0.0.1:{port}/0 was closed while waiting on job some-id"]


def test_an_outcome_message_says_which_end_it_tells() -> None:
    # "id ends" on its first line: a wait takes only the ends after it registered, and a message
    # that says no end (an earlier aqueue's worker: "id") is left to the wait's own read of the
    # job, as an earlier aqueue's wait leaves the new one to its recheck (it routes by the line).
    message = b"j 2\nsucceeded\n1\n3\n"
    heard = redis_module._outcome_record("j", message, 1)
    assert heard is not None
    assert (heard.state, heard.result) == ("succeeded", b"3")
    assert redis_module._outcome_record("j", message, 2) is None
    assert redis_module._outcome_record("j", b"j\nsucceeded\n1\n3\n", 0) is None
    assert redis_module._outcome_record("j", b"j 2\nsucceeded", 0) is None  # too big to carry
