"""The Redis broker's pool: its lean call keeps what redis-py's command wrappers are for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis
import redis.asyncio as aioredis

from aqueue import Queue, group
from aqueue.brokers import NewJob, RedisBroker, _pool, _redis
from aqueue.brokers._keys import Keys
from aqueue.brokers._pool import WaitingPool
from aqueue.brokers._redis import ENQUEUE_CHUNK
from aqueue.brokers._scripts import source
from tests.conftest import start_redis, wait_for_blocked_client


@pytest.fixture(params=["hiredis", "python"])
def packer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every call is tried with hiredis's packer and with redis-py's own."""
    if request.param == "python":
        monkeypatch.setattr(_pool, "_hiredis_pack", None)
    else:
        assert _pool._hiredis_pack is not None, "hiredis is a test dependency"
    return str(request.param)


@pytest.fixture
async def pool(redis_url: str, packer: str) -> AsyncIterator[WaitingPool]:
    pool = WaitingPool.from_url(redis_url, max_connections=1)
    yield pool
    await pool.aclose()


async def test_replies_come_back_as_redis_py_gives_them(pool: WaitingPool, queue_name: str) -> None:
    assert await pool.call("ECHO", "é") == "é".encode()
    assert await pool.call("SET", f"{queue_name}:n", 1.5) == b"OK"
    assert await pool.call("GET", f"{queue_name}:n") == b"1.5"
    assert await pool.call("EVAL", "return {1, 'a', {2}}", 0) == [1, b"a", [2]]


async def test_the_commands_of_one_call_go_out_in_one_write(pool: WaitingPool, queue_name: str) -> None:
    """A write per command would be a send, and a packet, each, and Redis might wake for the first
    alone (the worker's receive is five commands)."""
    assert await pool.call("PING") in (b"PONG", True)
    conn = await pool.get_connection()
    await pool.release(conn)
    sent: list[bytes] = []
    writer = conn._writer
    real_write, real_writelines = writer.write, writer.writelines

    def write(data: bytes) -> None:
        sent.append(bytes(data))
        real_write(data)

    def writelines(data: list[bytes]) -> None:
        sent.append(b"".join(data))
        real_writelines(data)

    writer.write, writer.writelines = write, writelines
    key = f"{queue_name}:n"
    replies = await pool.call_many(("MULTI",), ("INCR", key), ("INCR", key), ("EXEC",))
    assert replies == [b"OK", b"QUEUED", b"QUEUED", [1, 2]]
    assert len(sent) == 1
    assert sent[0].startswith(b"*1\r\n$5\r\nMULTI")
    assert sent[0].count(b"INCR") == 2


async def test_an_error_reply_is_raised_and_the_connection_stays(pool: WaitingPool) -> None:
    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        await pool.call("NOSUCHCOMMAND")
    with pytest.raises(redis.exceptions.NoScriptError):
        await pool.call("EVALSHA", "0" * 40, 0)
    conn = await pool.get_connection()
    await pool.release(conn)
    assert conn.is_connected  # an error reply is a whole reply: nothing is left unread
    assert await pool.call("ECHO", "after") == b"after"


async def test_a_connection_killed_under_the_pool_is_made_anew(
    pool: WaitingPool, redis_url: str
) -> None:
    first = await pool.call("CLIENT", "ID")
    admin = aioredis.Redis.from_url(redis_url)
    try:
        assert await admin.client_kill_filter(_id=first) == 1
    finally:
        await admin.aclose()
    # The pool sees the closed socket when handing the connection out, or the call sees it fail;
    # either way no call after it uses the dead connection.
    try:
        second = await pool.call("CLIENT", "ID")
    except redis.exceptions.ConnectionError:
        second = await pool.call("CLIENT", "ID")
    assert second != first


async def test_a_connection_redis_closed_in_the_pool_is_opened_again_before_use() -> None:
    # After a restart of Redis, each connection the pool held failed the first call it was taken
    # for ("Connection closed by server"): redis-py 8 hands them out unprobed.
    server = start_redis()
    pool = WaitingPool.from_url(server.url, max_connections=1)
    client = aioredis.Redis.from_pool(pool)
    try:
        for take in (pool.call, client.execute_command):  # the lean call, redis-py's own
            assert await take("SET", "k", "v")
            [held] = pool._available_connections
            server.kill()
            server.start()
            # Until the loop has read the old connection's close, as a running app's loop does
            # long before its next call.
            with anyio.fail_after(5):
                while not held._reader.at_eof():  # the event loop reads it
                    await anyio.lowlevel.checkpoint()
            assert await take("GET", "k") is None  # a new server: the first call goes through
    finally:
        await client.aclose()
        server.stop()


async def test_a_call_cancelled_before_its_reply_drops_its_connection(
    pool: WaitingPool, redis_url: str, queue_name: str
) -> None:
    first = await pool.call("CLIENT", "ID")
    async with anyio.create_task_group() as tg:

        async def blocked_pop() -> None:
            await pool.call("BLPOP", f"{queue_name}:list", 0)

        tg.start_soon(blocked_pop)
        await wait_for_blocked_client(redis_url)
        tg.cancel_scope.cancel()
    # The BLPOP's reply would come on that connection, after this push: it must never be read
    # as the reply of a later call.
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await admin.rpush(f"{queue_name}:list", "late")
        assert await pool.call("ECHO", "mine") == b"mine"
        assert await pool.call("CLIENT", "ID") != first
    finally:
        await admin.aclose()


async def test_socket_timeout_bounds_a_call(redis_url: str, packer: str, queue_name: str) -> None:
    pool = WaitingPool.from_url(redis_url, max_connections=1, socket_timeout=0.2)
    try:
        first = await pool.call("CLIENT", "ID")
        with anyio.fail_after(10), pytest.raises(redis.exceptions.TimeoutError):
            await pool.call("BLPOP", f"{queue_name}:never", 0)
        assert await pool.call("CLIENT", "ID") != first  # a fresh connection
    finally:
        await pool.aclose()


async def test_scripts_are_loaded_again_after_a_flush(redis_url: str, queue_name: str) -> None:
    broker = RedisBroker(redis_url)
    await broker.connect()
    try:
        await broker.client.script_flush()
        assert await broker.get(queue_name, "nope") is None
        assert await broker.prune(queue_name, 0.0, 10) == 0
        # An enqueue of several chunks sends them in one pipeline: after a flush, sent again.
        await broker.client.script_flush()
        jobs = [NewJob(id=f"j{i}", task="t", payload=b"{}") for i in range(ENQUEUE_CHUNK + 1)]
        assert await broker.enqueue(queue_name, jobs) == [j.id for j in jobs]
        assert await broker.client.xlen(Keys(queue_name).stream(0)) == len(jobs)
    finally:
        await broker.close()


async def test_a_big_enqueue_goes_out_in_windows_of_chunks(
    redis_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3 jobs a chunk, 2 chunks a pipeline: 14 jobs take 5 chunks in 3 pipelines.
    monkeypatch.setattr(_redis, "ENQUEUE_CHUNK", 3)
    monkeypatch.setattr(_redis, "ENQUEUE_WINDOW", 2)
    broker = RedisBroker(redis_url)
    await broker.connect()
    await broker.client.script_load(source("enqueue_plain"))  # loaded, as after any enqueue here
    flusher = redis.Redis.from_url(redis_url)
    pipelines = 0
    make_pipeline = broker.client.pipeline

    def counted(**options: object) -> object:
        nonlocal pipelines
        pipelines += 1
        if pipelines == 2:  # Redis loses its scripts between two windows: the second loads again
            flusher.script_flush()
        return make_pipeline(**options)  # type: ignore[arg-type]

    monkeypatch.setattr(broker.client, "pipeline", counted)
    try:
        jobs = [NewJob(id=f"j{i}", task="t", payload=b"{}") for i in range(14)]
        assert await broker.enqueue(queue_name, jobs) == [j.id for j in jobs]
        assert pipelines == 4  # the second window was sent twice
        entries = await broker.client.xrange(Keys(queue_name).stream(0))
        assert [fields[b"id"] for _, fields in entries] == [j.id.encode() for j in jobs]
    finally:
        flusher.close()
        await broker.close()


async def test_a_busy_pool_that_redis_answers_keeps_its_waiters_however_long_they_wait(
    redis_url: str, packer: str, queue_name: str
) -> None:
    # A wait for a place bounded by the socket timeout failed the callers of a healthy Redis whose
    # queue of callers was long (44,000 of a burst of 50,000 enqueues after a script flush), said
    # as Redis out of reach: the callers past the bound wait for as long as the queue is.
    pool = WaitingPool.from_url(redis_url, max_connections=1, socket_timeout=0.2)
    replies: list[object] = []

    async def answered_soon() -> None:  # a blocking read's timeout: about 0.1 s in Redis's cron
        replies.append(await pool.call("BLPOP", f"{queue_name}:never", 0.02))

    try:
        started = anyio.current_time()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(answered_soon)
        assert replies == [None] * 6
        assert anyio.current_time() - started > 0.4  # the last waited over twice the timeout
    finally:
        await pool.aclose()


async def test_calls_share_connections_and_hand_each_back(redis_url: str, packer: str) -> None:
    pool = WaitingPool.from_url(redis_url, max_connections=4)
    try:
        for _ in range(20):
            assert await pool.call("PING") == b"PONG"
        assert len(pool._available_connections) == 1  # one at a time: one connection
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(pool.call, "PING")
        assert 1 <= len(pool._available_connections) <= 4  # the bound holds under concurrency
        assert not pool._in_use_connections
        conn = pool._available_connections[-1]
        conn._should_reconnect = True  # as a maintenance notice would mark it
        await pool.call("PING")
        assert not conn.should_reconnect()  # handed back through a reconnect
        assert conn in pool._available_connections
    finally:
        await pool.aclose()


@pytest.mark.parametrize("take", ["call", "get_connection"])
async def test_a_connection_being_made_as_its_pool_closes_ends_closed(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, take: str
) -> None:
    # The close found no socket yet on a connection being made: it opened after the close, held by
    # a call the close had ended, and was never closed. `call` is the lean call; `get_connection`
    # is how redis-py's commands and its pub/sub take a connection.
    pool = WaitingPool.from_url(redis_url, max_connections=1)
    connecting, go_on = anyio.Event(), anyio.Event()
    real_connect = pool.connection_class._connect

    async def held_connect(conn: Any) -> None:
        connecting.set()
        await go_on.wait()
        await real_connect(conn)

    monkeypatch.setattr(pool.connection_class, "_connect", held_connect)

    async def use() -> None:
        attempt = pool.call("PING") if take == "call" else pool.get_connection()
        with pytest.raises(redis.ConnectionError, match="closed while the connection was made"):
            await attempt

    async with anyio.create_task_group() as tg:
        tg.start_soon(use)
        await connecting.wait()
        await pool.aclose()
        go_on.set()
    [conn] = pool._available_connections
    assert not conn.is_connected
    assert not pool._in_use_connections
    with pytest.raises(redis.ConnectionError, match="pool is closed"):
        await pool.call("PING")  # and none is made after the close


async def test_a_connect_that_failed_gives_its_place_back_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py's get_connection hands a connection that failed to connect back through `release`,
    # which gave its place back; the pool then gave it back again. Each failed connect (Redis
    # away, say) raised the bound by one, until callers got "Too many connections" for waiting.
    pool = WaitingPool.from_url(redis_url, max_connections=1)
    real_connect = pool.connection_class._connect
    refusals = 3

    async def refusing_connect(conn: Any) -> None:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise ConnectionRefusedError(111, "Connection refused")
        await real_connect(conn)

    monkeypatch.setattr(pool.connection_class, "_connect", refusing_connect)
    try:
        for _ in range(3):
            with pytest.raises(redis.ConnectionError, match="refused"):
                await pool.get_connection()
        held = await pool.get_connection()
        assert pool._free.locked()  # the bound holds: the next caller waits for this one
        await pool.release(held)
        assert not pool._free.locked()
    finally:
        await pool.aclose()


@pytest.mark.parametrize("step", ["reconnect", "re-auth"])
async def test_a_call_cut_off_as_it_hands_its_connection_back_leaves_it_in_the_pool_closed(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    # The hand-back's steps (the reconnect a maintenance notice asks for, the re-auth a new token
    # asks for) ran on a connection in neither list, or already free: cut off there, it was lost
    # to the pool with its socket open, or left free with a re-auth's reply still to come.
    pool = WaitingPool.from_url(redis_url, max_connections=1)
    handing_back = anyio.Event()

    async def held(**kwargs: Any) -> None:
        handing_back.set()
        await anyio.sleep_forever()

    try:
        await pool.call("PING")
        [conn] = pool._available_connections
        if step == "reconnect":
            conn._should_reconnect = True  # as a maintenance notice would mark it
            real_disconnect = conn.disconnect

            async def held_disconnect(nowait: bool = False, **kwargs: Any) -> None:
                if not nowait:
                    await held()
                await real_disconnect(nowait=nowait, **kwargs)

            monkeypatch.setattr(conn, "disconnect", held_disconnect)
        else:
            monkeypatch.setattr(conn, "re_auth", held)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.call, "PING")
            with anyio.fail_after(10):
                await handing_back.wait()
            assert conn in pool._in_use_connections  # where a close reaches it
            tg.cancel_scope.cancel()
        assert pool._available_connections == [conn]
        assert not pool._in_use_connections
        assert not conn.is_connected
        assert not pool._free.locked()
        monkeypatch.undo()
        assert await pool.call("PING") == b"PONG"
    finally:
        monkeypatch.undo()
        await pool.aclose()


async def test_a_hand_back_that_fails_leaves_the_calls_reply_standing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The call had run, and the hand-back's failure took the place of its reply: a caller told an
    # enqueue failed would enqueue it again.
    pool = WaitingPool.from_url(redis_url, max_connections=1)

    async def failing_re_auth() -> None:
        raise redis.ConnectionError("re-auth refused")

    try:
        await pool.call("PING")
        [conn] = pool._available_connections
        monkeypatch.setattr(conn, "re_auth", failing_re_auth)
        assert await pool.call("ECHO", "ran") == b"ran"
        assert pool._available_connections == [conn]
        assert not conn.is_connected  # reconnects on its next use
        assert "re-auth refused" in caplog.text
        monkeypatch.undo()
        assert await pool.call("PING") == b"PONG"
    finally:
        monkeypatch.undo()
        await pool.aclose()


@pytest.mark.parametrize("when", ["command", "handshake"])
async def test_a_cancellation_that_lands_as_a_send_ends_is_not_lost(redis_url: str, when: str) -> None:
    # redis-py bounds a send by the socket timeout through `asyncio.wait_for`, which on Python 3.11
    # returns as if nothing happened when a cancellation lands after the send has finished but
    # before the waiting task resumes (CPython issue 86296): the task ran on, uncancelled. Here the
    # send itself asks for the cancellation, so that it lands at that moment every time.
    pool = WaitingPool.from_url(redis_url, max_connections=1, socket_timeout=5.0)
    conn: Any = pool.make_connection()  # type: ignore[no-untyped-call]
    if when == "command":
        await conn.connect()
    real_send = conn._send_packed_command
    asked: list[str] = []

    async def send_then_cancel(command: Any) -> None:
        await real_send(command)
        if not asked:
            asked.append(when)
            asyncio.get_running_loop().call_soon(sender.cancel)

    conn._send_packed_command = send_then_cancel

    async def send() -> None:
        if when == "command":
            await conn.send_command("PING")
        else:
            await conn.connect()  # HELLO and CLIENT SETINFO go out, each waiting for its reply
        await asyncio.Event().wait()  # never set: only the cancellation ends this

    sender = asyncio.get_running_loop().create_task(send())
    try:
        with anyio.move_on_after(5):
            await asyncio.wait([sender])
        assert sender.done(), "the cancellation was lost: the task ran on"
        assert sender.cancelled()
        assert asked == [when]
    finally:
        sender.cancel()
        await conn.disconnect()
        await pool.aclose()


async def test_a_pipeline_spanning_chunks_is_stored_whole_before_any_step_runs(
    redis_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 jobs a chunk, a chunk a pipeline: the 3 steps of one pipeline would take two. Were the
    # first chunk stored alone, its second step could end before the third step is stored: the
    # step that starts it would find nothing, and the third would wait for ever.
    monkeypatch.setattr(_redis, "ENQUEUE_CHUNK", 2)
    monkeypatch.setattr(_redis, "ENQUEUE_WINDOW", 1)
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    assert isinstance(queue.broker, RedisBroker)
    send_window = queue.broker._enqueue_pipelined
    windows = 0

    async def first_window_runs_first(queue_name: str, script: str, chunks: Any, first: int) -> Any:
        nonlocal windows
        replies = await send_window(queue_name, script, chunks, first)  # NoScriptError: sent again
        windows += 1
        if windows == 1:  # the next window waits until the first one's last job has ended
            assert await queue.job(chunks[-1][-1].id).result(timeout=10) == 3
        return replies

    monkeypatch.setattr(queue.broker, "_enqueue_pipelined", first_window_runs_first)
    try:
        async with queue.worker():
            results = await queue.enqueue(group([add.s(1, 1).then(add, 1).then(add, 1)]))
            assert await results.get(timeout=10) == [4]
    finally:
        await queue.close()
