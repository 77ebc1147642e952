"""What only the Redis broker has: its streams, scripts, keys and URLs."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis
import redis.asyncio
from redis._parsers.base import BaseParser

import aqueue
from aqueue import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    JobState,
    Queue,
    TaskError,
    current_job,
    every,
)
from aqueue._worker import _runner as runner_module
from aqueue.brokers import Completion, NewJob, Outcome, RedisBroker
from aqueue.brokers import _redis as redis_broker_module
from aqueue.brokers._keys import GROUP, Keys
from aqueue.brokers._notifier import Notifier
from aqueue.brokers._redis import _Reader, redact, waiting_name
from aqueue.brokers._scripts import NAMES, source
from tests.conftest import RedisServer, free_port, start_redis, wait_for_blocked_client

PAYLOAD = b'{"args":[],"kwargs":{},"options":{}}'


@pytest.fixture
async def redis_broker(redis_url: str) -> AsyncIterator[RedisBroker]:
    broker = RedisBroker(redis_url)
    try:
        yield broker
    finally:
        await broker.close()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain redis-py client, to look at (or tamper with) what the broker stored."""
    raw = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield raw
    finally:
        await raw.aclose()


def new_job(priority: int = 0, expires: float | None = None) -> NewJob:
    return NewJob(id=uuid.uuid4().hex, task="t", payload=PAYLOAD, priority=priority,
                  enqueued_at=time.time(), expires=expires)


def test_every_lua_script_loads(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    try:
        for name in NAMES:
            assert client.script_load(source(name))  # a syntax error fails here, not in a worker
    finally:
        client.close()


async def test_connections_name_aqueue_without_reading_package_metadata(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # redis-py 8 would read its own version from the installed packages' metadata (blocking file
    # reads) for every new connection; the broker hands it the version, and names itself.
    import redis.utils

    def no_metadata() -> str:
        raise AssertionError("a new connection read the package metadata")

    monkeypatch.setattr(redis.utils, "get_lib_version", no_metadata)
    broker = RedisBroker(redis_url)
    await broker.connect()
    try:
        await broker.client.ping()
        # What CLIENT SETINFO sends (Redis 7.2 and later show it in CLIENT LIST).
        driver = broker.client.connection_pool.connection_kwargs["driver_info"]
        assert driver.formatted_name == f"redis-py(aqueue_v{aqueue.__version__})"
        assert driver.lib_version == redis.__version__
    finally:
        await broker.close()


@pytest.mark.parametrize(("query", "options", "expected"), [
    ("", {}, 5.0),  # redis-py 8's default, which redis-py 7 (no timeout) does not have
    ("?socket_timeout=0.5", {}, 0.5),
    ("", {"socket_timeout": 0.25}, 0.25),
])
async def test_calls_and_connects_are_bounded_by_default_and_as_configured(
    redis_url: str, query: str, options: dict[str, Any], expected: float
) -> None:
    broker = RedisBroker(redis_url + query, **options)
    await broker.connect()
    try:
        await broker.client.ping()
        # What the broker hands redis-py (its own defaults differ between versions).
        kwargs = broker.client.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (expected, 5.0)
    finally:
        await broker.close()


@pytest.mark.parametrize("how", ["resp2", "resp3", "own client"])
async def test_an_idle_worker_takes_jobs_through_blocking_reads(
    redis_url: str, queue_name: str, how: str
) -> None:
    # The blocking read's reply is a list of streams in RESP2, a map in RESP3 (redis-py 8's
    # default); a client the caller made goes through redis-py's own parsing.
    client = None
    if how == "own client":
        client = redis.asyncio.Redis.from_url(redis_url)  # redis-py's own pool, not aqueue's
        queue = Queue(broker=RedisBroker(client=client), name=queue_name)
    else:
        queue = Queue(f"{redis_url}?protocol={how[-1]}", name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    try:
        async with queue.worker():
            assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
            # The worker is idle now: the next job reaches it through a blocking read.
            assert await (await add.enqueue(2, 3)).result(timeout=10) == 5
    finally:
        await queue.close()
        if client is not None:
            await client.aclose()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:pw@host:6380/1", "rediss://user:***@host:6380/1"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("unix:///run/redis.sock?password=pw&db=2", "unix:///run/redis.sock?password=***&db=2"),
        ("redis://u:pw@host/0?password=pw", "redis://u:***@host/0?password=***"),
    ],
)
def test_urls_are_shown_without_password(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert RedisBroker(url).url == shown


def test_a_database_that_is_not_a_number_is_refused() -> None:
    # redis-py would read "redis://host/abc" as database 0.
    with pytest.raises(ConfigurationError, match="database must be a number, got 'abc'"):
        Queue("redis://:pw@127.0.0.1:6379/abc")
    assert Queue("redis://127.0.0.1:6379/3").broker.url == "redis://127.0.0.1:6379/3"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cr#et9@myhost:6379/0", "redis://***"),
        ("redis://:s3cr/et9@myhost:6379/0", "redis://***"),
        ("redis://:s3cr?et9@myhost:6379/0", "redis://***"),
        ("redis://user:s3cr@x#et9@myhost/0", "redis://***"),
        ("unix://:s3cr/et9@/tmp/x.sock", "unix://***"),
        ("redis://myhost/0?password=s3cr#et9", "redis://myhost/0?password=***#***"),
    ],
)
def test_a_password_with_unencoded_reserved_characters_never_shows(url: str, shown: str) -> None:
    # urlsplit finds no user part past a "/", "?" or "#": redis-py would connect to a host or
    # database made of the password's end, and fail with it in its message.
    assert redact(url) == shown
    with pytest.raises(ConfigurationError, match="percent-encode the password") as refused:
        Queue(url)
    message = str(refused.value)
    assert message.startswith(f"{shown}: ")
    assert "s3cr" not in message
    assert "et9" not in message


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6433/0?foo=bar", "'foo' is not a connection option of a redis:// URL"),
        ("redis://127.0.0.1:6433/0?db=x", "db='x' is not a valid value"),
        ("redis://127.0.0.1:6433/0?socket_timeout=soon", "socket_timeout='soon' is not a valid value"),
        ("redis://127.0.0.1:abc/0", "the port must be a number from 0 to 65535"),
        ("redis://:s3cret@127.0.0.1:abc/0", "the port must be a number from 0 to 65535"),
        ("redis://127.0.0.1:99999/0", "the port must be a number from 0 to 65535"),
        ("REDIS://127.0.0.1:6433/abc", "the database must be a number, got 'abc'"),
        ("UNIX:///tmp/x.sock?foo=bar", "'foo' is not a connection option of a unix:// URL"),
        ("redis://127.0.0.1:6433/5?db=3", "two databases, /5 and ?db=3"),
        # redis-py took the one before the host, without a word.
        ("redis://:s3cret@h/0?password=et9", "two passwords, before the host and ?password="),
        ("redis://me@h/0?username=you", "two usernames, before the host and ?username="),
        # redis-py reads any word but its five false ones as true.
        ("redis://h/0?socket_keepalive=maybe", "socket_keepalive='maybe' is not a valid value"),
        *((url, "a unix:// URL takes the socket's absolute path after its '//' (unix:///tmp/redis.sock)")
          for url in ("unix://tmp/redis.sock", "unix://redis.sock", "unix://:s3cret@tmp/redis.sock")),
        # A password holding a "[", or an unencoded "&" (its end not named: it may be a secret).
        # Python's own words quoted the bracketed part, or the whole netloc.
        *((url, "not a valid URL (an unencoded '[', ']' or a character it may not hold: "
                "percent-encode them in a password, '[' and ']' as %5B and %5D)")
          for url in ("redis://:s3cr[et@h/0", "redis://:s3cr[et9]@h/0", "redis://:s3cr\uff20et9@h/0")),
        ("redis://h/0?password=s3cret&et9=x", "an option after the password is not a connection "
                                                "option (percent-encode '&' in a password as %26)"),
        # redis-py drops a field with no "=": the password was cut short at the "&".
        ("redis://h/0?password=s3cret&et9", "a field after the password has no value "
                                              "(percent-encode '&' in a password as %26)"),
        ("redis://h/0?socket_timeout", "the option 'socket_timeout' has no value"),
        # Values that parse, refused only by the connection (a BrokerConnectionError, which no
        # retry mends) or the pool (a ValueError from the first enqueue).
        ("redis://h/0?protocol=5", "protocol='5' is not a valid value (2 or 3)"),
        ("redis://h/0?max_connections=-5", "max_connections='-5' is not a valid value (at least 1)"),
        ("rediss://h/0?ssl_cert_reqs=bogus",
         "ssl_cert_reqs='bogus' is not a valid value (none, optional or required)"),
        ("redis://h/0?socket_timeout=-1", "socket_timeout='-1' is not a valid value (over 0 seconds)"),
        ("redis://h/0?socket_connect_timeout=0",
         "socket_connect_timeout='0' is not a valid value (over 0 seconds)"),
        ("redis://h/0?health_check_interval=-5",
         "health_check_interval='-5' is not a valid value (0 or more seconds)"),
        # A file that is not there failed each connection as if Redis could not be reached.
        ("rediss://h/0?ssl_ca_certs=/nonexistent/ca.pem",
         "ssl_ca_certs='/nonexistent/ca.pem' is not a valid value (a file that exists)"),
        ("rediss://h/0?ssl_certfile=client.pem",
         "ssl_certfile='client.pem' is not a valid value (a file that exists)"),
    ],
)
def test_a_bad_url_is_refused_when_the_queue_is_made(url: str, message: str) -> None:
    # Not at the first enqueue, with redis-py's TypeError or ValueError.
    with pytest.raises(ConfigurationError) as refused:
        Queue(url)
    assert str(refused.value) == f"{redact(url)}: {message}"
    assert "s3cr" not in str(refused.value)
    assert "et9" not in str(refused.value)


@pytest.mark.parametrize("url", ["unix://localhost/run/redis.sock", "unix://me:pw@/run/redis.sock",
                                 "redis://h/5?db=5", "redis://h/5?db=05", "redis://h?db=3",
                                 "redis://:pw@h/0?password=pw", "redis://:p%40w@h/0?password=p%40w",
                                 "redis://h/0?password=a%2541", "redis://:pw@h/0?username=alice",
                                 "redis://@h/0?username=alice", "redis://:@h/0?password=pw"])
def test_a_socket_path_after_localhost_or_one_database_said_twice_is_taken(url: str) -> None:
    assert Queue(url).broker.url.startswith(url.partition("://")[0])


@pytest.mark.parametrize("url", ["redis://h/0?password=s3cr@et9", "redis://h/0?client_name=me@x",
                                 "rediss://h/0?ssl_ca_certs={tmp}/a@b/ca.pem",
                                 "unix:///run/redis@main/redis.sock?db=1"])
def test_an_at_sign_in_a_query_value_or_a_socket_path_is_taken(url: str, tmp_path: Path) -> None:
    # redis-py reads these as written; only the log line is cautious (an "@" past the host could
    # be a password's).
    (tmp_path / "a@b").mkdir()
    (tmp_path / "a@b" / "ca.pem").write_text("")  # a file named in a URL must exist
    url = url.format(tmp=tmp_path)
    assert Queue(url).broker.url == url.partition("://")[0] + "://***"


@pytest.mark.parametrize(("options", "shown"), [
    ({"socket_timeout": 0}, "socket_timeout=0"), ({"socket_read_size": 0}, "socket_read_size=0"),
    ({"health_check_interval": -5}, "health_check_interval=-5"), ({"protocol": 5}, "protocol=5"),
])
def test_broker_options_that_cannot_work_are_refused_when_made(options: dict[str, object], shown: str) -> None:
    # Given to the broker rather than in the URL, they were taken, then failed every call.
    with pytest.raises(ConfigurationError, match=f"{shown} is not a valid value"):
        RedisBroker("redis://h/0", **options)
    RedisBroker("redis://h/0", socket_timeout=None, protocol=3, health_check_interval=0)


async def test_a_tls_url_to_a_port_without_tls_says_what_is_likely(
    redis_server: RedisServer, queue_name: str
) -> None:
    # The server waits for a request the TLS handshake never sends: the client saw a timeout alone.
    url = f"rediss://127.0.0.1:{redis_server.port}/0?socket_connect_timeout=0.2&ssl_cert_reqs=none"
    broker = RedisBroker(url)
    try:
        with pytest.raises(BrokerConnectionError, match=r"Timeout .* \(the URL is rediss://: does that "
                                                         r"port speak TLS\?\)"):
            await broker.enqueue(queue_name, [new_job()])
    finally:
        await broker.close()


def test_a_tls_file_given_to_the_broker_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"ssl_ca_certs='/nonexistent/ca\.pem' is not a valid value"):
        RedisBroker("rediss://h/0", ssl_ca_certs="/nonexistent/ca.pem")
    with pytest.raises(ConfigurationError, match=r"ssl_certfile=.* is not a valid value"):
        RedisBroker("rediss://h/0", ssl_certfile=tmp_path)  # a directory
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    # As str, bytes or a path, as redis-py takes it; "" is none given (the system's CAs).
    for given in (str(ca), os.fsencode(ca), ca, ""):
        RedisBroker("rediss://h/0", ssl_ca_certs=given, ssl_certfile=None)


def test_url_options_are_those_of_the_scheme(tmp_path: Path) -> None:
    # What redis-py's connection for the scheme takes: TLS options only with rediss://, no TCP
    # keepalive on a Unix socket; the pool's max_connections with any.
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    for url in (f"rediss://h:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false&ssl_ca_certs={ca}",
                "redis://h/0?password=pw&socket_timeout=2&max_connections=4&protocol=3&client_name=me",
                "redis://h/0?socket_keepalive=false", "unix:///tmp/x.sock?db=2&health_check_interval=5"):
        assert isinstance(Queue(url).broker, RedisBroker)
    for url, name in (("redis://h/0?ssl_ca_certs=ca.pem", "ssl_ca_certs"),
                      ("unix:///tmp/x.sock?socket_keepalive=true", "socket_keepalive"),
                      ("redis://h/0?timeout=5", "timeout")):  # BlockingConnectionPool's, not ours
        with pytest.raises(ConfigurationError, match=f"'{name}' is not a connection option"):
            Queue(url)


def test_url_schemes_pick_the_broker() -> None:
    assert isinstance(Queue("rediss://127.0.0.1:6380/0").broker, RedisBroker)
    assert isinstance(Queue("unix:///tmp/x.sock").broker, RedisBroker)
    with pytest.raises(ValueError, match=r"redis://, rediss://, unix:// or memory://, got 'amqp'$"):
        Queue("amqp://localhost")
    for ignored in ("memory://jobs", "memory://?x=1"):  # each was taken as memory:// alone
        with pytest.raises(ValueError, match=r"a memory:// URL takes nothing after its '//'"):
            Queue(ignored)
    # A mistyped scheme leaves no "://" to end it: the message showed the whole URL, password too.
    for typo in ("redis:/:s3cret@127.0.0.1:6379/0", "redis//:s3cret@host/0", "rediss:/user:s3cret@host",
                 "redis:/:s3://cret@host/0", "redis:/:s3cret@host/0?next=http://x"):
        with pytest.raises(ValueError, match=r"got no scheme$") as refused:
            Queue(typo)
        assert "s3cret" not in str(refused.value)


def test_keys_share_one_hash_tag() -> None:
    keys = Keys("emails")
    names = [keys.priorities, keys.scheduled, keys.index, keys.dead, keys.stream(5),
             keys.job("j"), keys.idempotency("k"), keys.done_channel("j")]
    assert all(name.startswith("aqueue:{emails}:") for name in names)
    with pytest.raises(ValueError, match="braces"):
        Keys("a{b}")


async def test_malformed_stream_entry_goes_to_dead_letters(redis_url: str, queue_name: str) -> None:
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def ok() -> int:
        return 1

    async with queue:
        await queue.broker.receive(queue.name, "setup", 1, 0, 10)  # creates the stream and group
        client = redis.asyncio.Redis.from_url(redis_url)
        keys = Keys(queue_name)
        junk = await client.xadd(keys.stream(0), {"garbage": "x"})
        await client.xadd(keys.stream(0), {"id": "no-such-record"})
        await client.xadd(keys.stream(0), {"id": b"\xff\xfe"})  # listing it failed every listing
        await client.aclose()
        async with queue.worker():
            assert await (await ok.enqueue()).result(timeout=10) == 1
        dead = {d.id: d for d in await queue.dead_letters()}
        listed = {record.id for record in await queue.jobs(state="failed")}
        with pytest.raises(TaskError) as caught:
            await queue.job("no-such-record").result(timeout=1)
    # Listed as every dead letter is (they were in dead_letters() alone); an id that is no UTF-8 is
    # not: a listing reads the record under the id's escaped name.
    assert listed == set(dead) - {"\\xff\\xfe"}
    assert dead[f"entry-{junk.decode()}"].dead_reason == "malformed stream entry: no job id"
    assert "no job record" in str(dead["no-such-record"].dead_reason)
    assert "no job record" in str(dead["\\xff\\xfe"].dead_reason)  # its bytes, escaped
    # A message that cannot be read as a job, named as the worker names a payload it cannot read.
    assert caught.value.metadata["type"] == "SerializationError"
    for record in dead.values():
        assert record.error is not None
        assert record.error["type"] == "SerializationError"
        assert record.error["error"] == f"SerializationError({record.dead_reason!r})"
        assert record.error["job_id"] == record.id  # bytes that are no UTF-8 escaped alike


@pytest.mark.parametrize("when", ["queued", "read-while-blocked"])
async def test_a_job_shaped_entry_aqueue_did_not_write_goes_to_dead_letters(
    redis_url: str, queue_name: str, when: str
) -> None:
    # Shaped as a new job's entry, but with a time that is no number or a task that is no UTF-8:
    # every receive failed on it, and the worker took no job again. A task named past ASCII,
    # which such a check must not turn away, still runs.
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def ok() -> int:
        return 1

    @queue.task(name="envoyé")
    async def accented() -> str:
        return "sent"

    bad = [{"id": "bad-time", "task": "ok", "payload": '{"args":[],"kwargs":{}}', "at": "soon"},
           {"id": "bad-task", "task": b"\xff\xfe", "payload": "{}", "at": "1"},
           {"id": "hex-time", "task": "ok", "payload": "{}", "at": "0x10"}]  # Lua reads it, Python not
    async with queue:
        await queue.broker.receive(queue.name, "setup", 1, 0, 10)  # creates the stream and group
        client = redis.asyncio.Redis.from_url(redis_url)
        if when == "queued":
            for fields in bad:
                await client.xadd(Keys(queue_name).stream(0), fields)  # type: ignore[arg-type]
        async with queue.worker():
            if when == "read-while-blocked":
                await wait_for_blocked_client(redis_url)
                for fields in bad:
                    await client.xadd(Keys(queue_name).stream(0), fields)  # type: ignore[arg-type]
            assert await (await ok.enqueue()).result(timeout=10) == 1
            assert await (await accented.enqueue()).result(timeout=10) == "sent"
        await client.aclose()
        dead = {d.id: d.dead_reason for d in await queue.dead_letters()}
    assert set(dead) == {"bad-time", "bad-task", "hex-time"}
    assert all("no job record" in str(reason) for reason in dead.values())


@pytest.mark.parametrize(("at", "task"), [
    ("nan", "ok"), ("inf", "ok"), ("1e3", "ok"), ("1_700_000_000", "ok"), (" 17 ", "ok"), ("17", "envoyé"),
])
async def test_an_entry_aqueue_did_not_write_is_not_run_by_a_busy_workers_lean_read(
    redis_url: str, queue_name: str, at: str, task: str
) -> None:
    # A busy worker reads without the script (`_read_lean`), and took as lean what float() and
    # decode() took, where the script's test (`lean_delivery`) wants decimal digits and ASCII:
    # an entry another writer made ran, with no record of it.
    queue = Queue(redis_url, name=queue_name)
    ran: list[str] = []
    gate, started = anyio.Event(), anyio.Event()

    @queue.task
    async def ok() -> int:
        ran.append(current_job().id)
        return 1

    @queue.task(name="envoyé")
    async def accented() -> None:
        ran.append(current_job().id)

    @queue.task
    async def hold() -> None:
        started.set()
        await gate.wait()

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with queue, queue.worker(concurrency=1):
            held = await hold.enqueue()
            with anyio.fail_after(10):
                await started.wait()  # it took 1 of the 1 it asked for: its next read is lean
            await client.xadd(Keys(queue_name).stream(0), {
                "id": "foreign", "task": task, "payload": '{"args":[],"kwargs":{}}', "at": at})
            gate.set()
            await held.result(timeout=10)
            assert await (await ok.enqueue()).result(timeout=10) == 1  # read after the entry
            dead = {d.id: d.dead_reason for d in await queue.dead_letters()}
    finally:
        await client.aclose()
    assert "foreign" not in ran
    assert "no job record" in str(dead.get("foreign"))


@pytest.mark.parametrize("revocation", ["garbage", "1|soon", "7|", "", "0|nan", "0|0x10"])
async def test_a_task_revocation_aqueue_did_not_write_stalls_no_worker(
    redis_url: str, queue_name: str, revocation: str
) -> None:
    # Read as "<once 0|1>|<until or empty>", another writer's value failed every receive that met
    # a job of the task (and the jobs read with it), is_revoked() and restore(), and pruning.
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    @queue.task
    async def other() -> str:
        return "ran"

    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with queue:
            await client.hset(Keys(queue_name).revoked_tasks, "add", revocation)
            assert not await add.is_revoked()
            async with queue.worker():
                assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
                assert await (await other.enqueue()).result(timeout=10) == "ran"
            assert not await client.hexists(Keys(queue_name).revoked_tasks, "add")  # dropped where met
            await client.hset(Keys(queue_name).revoked_tasks, "add", revocation)
            assert not await add.restore()
            await client.hset(Keys(queue_name).revoked_tasks, "other", revocation)
            await queue.broker.prune(queue.name, time.time(), 100)
            assert not await client.exists(Keys(queue_name).revoked_tasks)
    finally:
        await client.aclose()


def queue_that_adds(redis_url: str, queue_name: str) -> tuple[Queue, Any]:
    """A queue and its task `add`, for the tests of records another writer made."""
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    return queue, add


async def test_a_stored_job_whose_task_or_id_is_no_utf8_stalls_no_worker(
    redis_url: str, queue_name: str
) -> None:
    # Record and entry written as aqueue writes them, by another writer: a task name or id that
    # is no UTF-8 failed every receive (the job stayed leased, and failed the next one), so no
    # job ran again; listing the queue failed too.
    queue, add = queue_that_adds(redis_url, queue_name)
    keys = Keys(queue_name)
    client = redis.asyncio.Redis.from_url(redis_url)
    async with queue:
        await queue.broker.receive(queue.name, "setup", 1, 0, 10)  # creates the stream and group
        now, payload = repr(time.time()), b'{"args":[1,2],"kwargs":{}}'
        for job_id, task in [(b"bad-task", b"\xffadd"), (b"\xffbad-id", b"add")]:
            entry = await client.xadd(keys.stream(0), {b"id": job_id, b"task": task,
                                                        b"payload": payload, b"at": now})
            await client.hset(keys.prefix.encode() + b"job:" + job_id, mapping={
                b"state": b"pending", b"token": b"0", b"more": b"0", b"task": task,
                b"payload": payload, b"priority": b"0", b"attempt": b"1", b"enqueued_at": now,
                b"entry": entry})
            await client.zadd(keys.index, {job_id: float(now)})
        async with queue.worker():
            jobs = [await add.enqueue(n, n) for n in range(10)]
            assert [await job.result(timeout=10) for job in jobs] == [2 * n for n in range(10)]
            with anyio.fail_after(10):
                while await queue.job("bad-task").state() != JobState.FAILED:  # noqa: ASYNC110 - the worker's write, polled
                    await anyio.sleep(0.01)
        listed = {record.id: record.task for record in await queue.jobs()}
        [dead] = await queue.dead_letters()
    await client.aclose()
    assert listed["bad-task"] == "\\xffadd"
    assert (dead.id, dead.dead_reason) == ("bad-task", "unknown task '\\\\xffadd': not registered "
                                                       "on this worker")


@pytest.mark.parametrize(("field", "value"), [
    (b"expires", b"soon"), (b"deliveries", b"soon"), (b"token", b"0x10"), (b"attempt", b"1.5"),
    (b"enqueued_at", b"soon"), (b"enqueued_at", b"0x10"), (b"expires", b"nan"),
    (b"deliveries", b"99999999999999999999"),  # past what Lua's numbers count exactly
])
async def test_a_stored_job_whose_record_holds_no_number_where_one_is_read_stalls_no_worker(
    redis_url: str, queue_name: str, field: bytes, value: bytes
) -> None:
    # As above, its count or time unreadable (to Lua, or to the worker after it): the start
    # script or the worker's read of its reply failed every receive that met the job.
    queue, add = queue_that_adds(redis_url, queue_name)
    keys = Keys(queue_name)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with queue:
            await queue.broker.receive(queue.name, "setup", 1, 0, 10)  # creates the stream and group
            now, payload = repr(time.time()), b'{"args":[1,2],"kwargs":{}}'
            entry = await client.xadd(keys.stream(0), {b"id": b"bad-record"})  # a plain entry
            record = {b"state": b"pending", b"token": b"0", b"more": b"1", b"task": b"add",
                      b"payload": payload, b"priority": b"0", b"attempt": b"1", b"enqueued_at": now,
                      b"entry": entry, b"deliveries": b"0", field: value}
            await client.hset(keys.prefix.encode() + b"job:bad-record", mapping=record)  # type: ignore[arg-type]
            async with queue.worker():
                jobs = [await add.enqueue(n, n) for n in range(5)]
                assert [await job.result(timeout=10) for job in jobs] == [2 * n for n in range(5)]
            [dead] = await queue.dead_letters()
            assert [record.id for record in await queue.jobs(state="failed")] == ["bad-record"]
    finally:
        await client.aclose()
    assert dead.id == "bad-record"
    assert dead.dead_reason == f"unreadable job record for stream entry {entry.decode()}"


@pytest.mark.parametrize("ends", [b"soon", b"1.5"])
async def test_a_waited_on_job_whose_count_of_ends_is_no_integer_still_ends(
    redis_url: str, queue_name: str, ends: bytes
) -> None:
    # Another writer's count of the job's ends told to waiters: the script ending the job failed
    # on it, the outcome was never written, and the job went round until the dead letters; a
    # wait on it, registered after, read the job as unknown (JobNotFound).
    queue, add = queue_that_adds(redis_url, queue_name)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        async with queue:
            job = await add.schedule((1, 2), delay=3600)
            await client.hset(f"aqueue:{{{queue_name}}}:job:{job.id}", mapping={b"ends": ends})
            values: list[int] = []

            async def wait() -> None:
                values.append(await job.result(timeout=10))

            async with queue.worker(), anyio.create_task_group() as tg:
                tg.start_soon(wait)
                with anyio.fail_after(10):
                    while not await client.hget(f"aqueue:{{{queue_name}}}:job:{job.id}", "waiters"):  # noqa: ASYNC110 - the wait's registration, polled
                        await anyio.sleep(0.01)
                await queue.broker.promote_due(queue.name, time.time() + 7200, 10)
            assert values == [3]
            # Counted afresh from this end on, for the waiters of a later one (after a retry).
            assert await client.hget(f"aqueue:{{{queue_name}}}:job:{job.id}", "ends") == b"1"
    finally:
        await client.aclose()


@pytest.mark.parametrize("expires", ["soon", "nan"])
async def test_an_idempotency_key_whose_holder_has_an_unreadable_expiry_still_finds_it(
    redis_url: str, queue_name: str, expires: str
) -> None:
    # Another writer's value: reading it failed every enqueue under the key. The job stays the
    # key's holder; its start dead-letters it (the test above).
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def send(to: str) -> str:
        return to

    async with queue:
        first = await send.options(key="welcome:3", expires=60).enqueue("a")
        client = redis.asyncio.Redis.from_url(redis_url)
        await client.hset(Keys(queue_name).job(first.id), "expires", expires)
        await client.aclose()
        assert (await send.options(key="welcome:3").enqueue("b")).id == first.id


async def test_listings_read_records_a_page_at_a_time_whatever_the_limit(
    redis_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A limit of a million read the records in one call: with 200,000 jobs its reply took longer
    # than the socket_timeout, and the listing failed as "cannot reach Redis".
    monkeypatch.setattr(redis_broker_module, "LISTING_PAGE", 100, raising=False)
    queue = Queue(redis_url, name=queue_name)

    @queue.task(retries=0)
    async def fails(n: int) -> None:
        raise ValueError(n)

    read: list[int] = []
    records = queue.broker._records  # type: ignore[attr-defined]

    async def counted(name: str, ids: list[str], budget: int = 0) -> Any:
        read.append(len(ids))
        return await records(name, ids, budget)

    async with queue:
        jobs = await fails.map(range(250))
        async with queue.worker():
            with anyio.fail_after(10):
                for job in jobs:
                    with pytest.raises(TaskError):
                        await job.result(timeout=10)
        monkeypatch.setattr(queue.broker, "_records", counted)
        listed = await queue.jobs(state="failed", limit=1_000_000)
        dead = await queue.dead_letters(limit=1_000_000)
    assert sorted(record.id for record in listed) == sorted(job.id for job in jobs)
    assert sorted(record.id for record in dead) == sorted(job.id for job in jobs)
    assert max(read) == 100  # pages overlap at a score the last one ended on: its jobs skipped
    assert sum(read) == 250


@pytest.mark.parametrize(("entry", "action"), [("plain", "cancel"), ("lean", "cancel"), ("lean", "revoke")])
async def test_a_job_cancelled_or_revoked_while_its_entry_waits_to_be_taken_never_runs(
    redis_url: str, queue_name: str, entry: str, action: str
) -> None:
    # A blocking read took the job's entry (COUNT is per stream: one band more than asked), the
    # job was cancelled or revoked, and the take script handed the entry back. A plain entry's
    # job was made 'pending' again; a lean entry's job, which looks delivered, was only flagged,
    # and its entry went back in place, still lean: either way the next read ran it (a revoked job
    # to its end). Each step is a real read or script, in an order Redis allows.
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def work(n: str) -> str:
        return n

    keys = Keys(queue_name)
    waiting = waiting_name("w")
    async with queue:
        client = redis.asyncio.Redis.from_url(redis_url)
        if entry == "plain":
            target = await work.options(expires=600).enqueue("B")  # band 0, an entry with no copy
            await work.options(priority=5).enqueue("A")  # band 5, announced by an entry in band 0
            await client.xreadgroup(GROUP, waiting, {keys.stream(5): ">", keys.stream(0): ">"}, count=1)
            await client.xreadgroup(GROUP, "other", {keys.stream(0): ">"}, count=1)  # reads past it
        else:
            await work.options(priority=5).enqueue("A")
            target = await work.enqueue("B")  # band 0, a lean entry
            await client.xreadgroup(GROUP, waiting, {keys.stream(5): ">"}, count=1)
            await client.xreadgroup(GROUP, waiting, {keys.stream(0): ">"}, count=2)  # wake-up, B
        await client.aclose()
        assert await (target.cancel() if action == "cancel" else target.revoke())
        await queue.broker._run(queue.name, "take", ["w", waiting, 1])  # keeps A, hands B back
        taken = await queue.broker.receive(queue.name, "w2", 10, 0, 10)
        assert [d.job_id for d in taken if d.ended is None and d.job_id == target.id] == []
        assert await target.state() == (JobState.CANCELLED if action == "cancel" else JobState.REVOKED)


async def test_a_new_band_is_read_even_when_announced_beside_a_job(
    redis_broker: RedisBroker, queue_name: str
) -> None:
    # A consumer whose last receive came back short blocks on the bands it knows at once. A new
    # band is announced by a 'wake' entry in band 0; read together with a job, it must still be
    # learned. The take script reads the bands it sees above the one read: the new band's job
    # comes first, in the same receive.
    await redis_broker.enqueue(queue_name, [new_job(0)])
    assert len(await redis_broker.receive(queue_name, "c", 10, 1.0, 5)) == 1  # short: blocks next
    high, low = new_job(7), new_job(0)
    await redis_broker.enqueue(queue_name, [high, low])  # announces band 7, then a band-0 job
    taken = await redis_broker.receive(queue_name, "c", 10, 1.0, 5)
    assert [d.job_id for d in taken] == [high.id, low.id]
    assert redis_broker._bands[queue_name] == ["7", "0"]


async def test_two_processes_waiting_on_one_job_both_hear_it(redis_url: str, queue_name: str) -> None:
    # Each broker (each process) has its own inbox; a job's end is published to every inbox
    # that waits on it.
    producer = Queue(redis_url, name=queue_name)
    other = Queue(redis_url, name=queue_name)
    gate = anyio.Event()

    @producer.task
    async def slow() -> str:
        await gate.wait()
        return "done"

    async with producer, other, producer.worker():
        job = await slow.enqueue()
        async with anyio.create_task_group() as tg:
            seen: list[str] = []

            async def wait_on(queue: Queue) -> None:
                seen.append(await queue.job(job.id).result(timeout=10))

            tg.start_soon(wait_on, producer)
            tg.start_soon(wait_on, other)
            client = redis.asyncio.Redis.from_url(redis_url)
            try:
                with anyio.fail_after(10):  # polls Redis until both inboxes are on the record
                    while True:
                        waiters = await client.hget(Keys(queue_name).job(job.id), "waiters") or b""
                        if len(waiters.split()) == 2:
                            break
                        await anyio.sleep(0.01)
            finally:
                await client.aclose()
            gate.set()
    assert seen == ["done", "done"]


async def test_a_finish_never_trims_entries_not_yet_delivered(
    redis_broker: RedisBroker, queue_name: str
) -> None:
    # Immediate mode claims its own job's entry without reading the stream: its finish must not
    # trim the older entries no worker has read yet.
    older, claimed = new_job(), new_job()
    await redis_broker.enqueue(queue_name, [older])
    await redis_broker.enqueue(queue_name, [claimed])
    d = await redis_broker.claim(queue_name, "immediate", claimed.id, 5)
    assert d is not None
    await redis_broker.finish(queue_name, [Completion(d, Outcome.SUCCEEDED, time.time(), result=b"1")], 60)
    assert [x.job_id for x in await redis_broker.receive(queue_name, "w", 10, 0, 5)] == [older.id]


async def test_a_finish_mixing_claimed_and_read_entries_trims_nothing_undelivered(
    redis_broker: RedisBroker, queue_name: str
) -> None:
    # One batch ends a job read through the group and a claimed one, newer than an entry no
    # worker has read: the batch's one XACK cannot tell them apart, so nothing is trimmed.
    read, unread, claimed = new_job(), new_job(), new_job()
    for job in (read, unread, claimed):
        await redis_broker.enqueue(queue_name, [job])
    [d_read] = await redis_broker.receive(queue_name, "w", 1, 0, 5)
    d_claimed = await redis_broker.claim(queue_name, "immediate", claimed.id, 5)
    assert d_read.job_id == read.id
    assert d_claimed is not None
    done = [Completion(d, Outcome.SUCCEEDED, time.time(), result=b"1") for d in (d_read, d_claimed)]
    assert await redis_broker.finish(queue_name, done, 60) == [True, True]
    assert [x.job_id for x in await redis_broker.receive(queue_name, "w", 10, 0, 5)] == [unread.id]


async def test_immediate_mode_keeps_a_delayed_job_for_later_workers(redis_url: str, queue_name: str) -> None:
    queue = Queue(redis_url, name=queue_name, immediate=True)
    calls = 0

    @queue.task(retries=1, retry_delay=0.3)
    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("once")
        return "ok"

    @queue.task
    async def later() -> str:
        return "later"

    async with queue:
        delayed = await later.options(delay=0.1).enqueue()  # stored, not run here
        await flaky.enqueue()  # fails, waits, promotes the due delayed job, then runs again
        assert await delayed.state() == JobState.PENDING
        queue.immediate = False
        async with queue.worker():
            assert await delayed.result(timeout=5) == "later"


async def test_entries_behind_a_long_job_wait_for_its_end_up_to_a_bound(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A job still running holds the trim back. Entries that end after it wait for the trim that
    # follows its end (deleting each sooner costs Redis a scan), but only up to KEEP_BEHIND of
    # them: past that, each is deleted as it ends, so a long job does not hold them all.
    monkeypatch.setattr(aqueue.brokers._redis, "KEEP_BEHIND", 2)
    stream = Keys(queue_name).stream(0)
    await redis_broker.enqueue(queue_name, [new_job() for _ in range(4)])
    long, *rest = await redis_broker.receive(queue_name, "w", 10, 0, 5)
    lengths = []
    for d in rest:
        done = Completion(d, Outcome.SUCCEEDED, time.time(), result=b"1")
        assert await redis_broker.finish(queue_name, [done], 60) == [True]
        lengths.append(await client.xlen(stream))
    assert lengths == [4, 4, 3]
    await redis_broker.finish(queue_name, [Completion(long, Outcome.SUCCEEDED, time.time(), result=b"1")], 60)
    assert await client.xlen(stream) == 0


async def test_entries_behind_a_long_job_are_deleted_when_the_count_is_unknown(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # An entry deleted ahead of what the group read (a job cancelled while waiting) leaves Redis
    # unable to tell how many entries the group has yet to read, so how many ended ones wait: the
    # ones ending behind a long job are then deleted at once, as if past the bound.
    stream = Keys(queue_name).stream(0)
    *jobs, last = await redis_broker.enqueue(queue_name, [new_job() for _ in range(5)])
    assert await redis_broker.cancel(queue_name, last, time.time(), 60) is not None
    long, *rest = await redis_broker.receive(queue_name, "w", 4, 0, 5)
    assert [d.job_id for d in [long, *rest]] == jobs
    assert [g["lag"] for g in await client.xinfo_groups(stream)] == [None]
    done = [Completion(d, Outcome.SUCCEEDED, time.time(), result=b"1") for d in rest]
    assert await redis_broker.finish(queue_name, done, 60) == [True] * 3
    assert await client.xlen(stream) == 1
    await redis_broker.finish(queue_name, [Completion(long, Outcome.SUCCEEDED, time.time(), result=b"1")], 60)
    assert await client.xlen(stream) == 0


async def test_a_stream_that_lost_its_group_gets_it_back_without_running_ended_jobs_again(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # Destroyed by hand, the group left every read failing with NOGROUP for good: the queue stood
    # still. Given back, it reads from the start, where an ended job's entry may wait behind a
    # long one (see the tests above): that job must not run again. The long job, whose
    # delivery went with the group, is delivered again.
    stream = Keys(queue_name).stream(0)
    long_id, ended_id, *waiting = await redis_broker.enqueue(queue_name, [new_job() for _ in range(4)])
    long, ended = await redis_broker.receive(queue_name, "w", 2, 0, 5)
    assert (long.job_id, ended.job_id) == (long_id, ended_id)
    done = Completion(ended, Outcome.SUCCEEDED, time.time(), result=b"1")
    assert await redis_broker.finish(queue_name, [done], 60) == [True]
    assert await client.xlen(stream) == 4  # the ended job's entry waits behind the long one
    await client.xgroup_destroy(stream, GROUP)
    with pytest.raises(BrokerConnectionError, match="had lost its consumer group"):
        await redis_broker.receive(queue_name, "w", 10, 0, 5)
    again = await redis_broker.receive(queue_name, "w", 10, 0, 5)
    assert [d.job_id for d in again] == [long_id, *waiting]
    assert await client.xlen(stream) == 3


async def test_what_a_receive_leased_before_it_met_a_lost_group_is_recovered(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # The receive script leased band 5's job, then failed on band 0's missing group: Redis kept
    # the lease, the worker never heard of the job, and it was dead-lettered unrun at its
    # reclaim. Raised as an answer lost, it is taken in by the recover that follows.
    high, low = await redis_broker.enqueue(queue_name, [new_job(priority=5), new_job()])
    await client.xgroup_destroy(Keys(queue_name).stream(0), GROUP)
    with pytest.raises(BrokerConnectionError, match="had lost its consumer group"):
        await redis_broker.receive(queue_name, "w", 10, 0, 5)
    recovered = await redis_broker.recover(queue_name, "w", [], 5)
    assert [d.job_id for d in recovered] == [high]
    assert [d.job_id for d in await redis_broker.receive(queue_name, "w", 10, 0, 5)] == [low]


@pytest.mark.parametrize("loss", ["group destroyed", "stream deleted"])
async def test_a_blocked_worker_goes_on_when_its_stream_or_group_goes(
    redis_url: str, queue_name: str, loss: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Its blocked read fails (NOGROUP; UNBLOCKED for a stream deleted, which was logged as an
    # error): the worker reads again, and the group is made again.
    caplog.set_level(logging.WARNING, logger="aqueue")
    queue = Queue(redis_url, name=queue_name)
    admin = redis.asyncio.Redis.from_url(redis_url)
    stream = Keys(queue_name).stream(0)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    try:
        async with queue.worker():
            assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
            await wait_for_blocked_client(redis_url)
            if loss == "group destroyed":
                await admin.xgroup_destroy(stream, GROUP)
            else:
                await admin.delete(stream)
            assert await (await add.enqueue(2, 3)).result(timeout=10) == 5
    finally:
        await queue.close()
        await admin.aclose()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_finishing_a_claimed_job_keeps_the_entries_not_yet_delivered(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # Immediate mode claims its own job past older ready ones: finishing it trims the stream only
    # up to what the group has delivered, so the older entries still reach a worker.
    older, claimed = await redis_broker.enqueue(queue_name, [new_job(), new_job()])
    delivery = await redis_broker.claim(queue_name, "w", claimed, 5)
    assert delivery is not None
    done = Completion(delivery, Outcome.SUCCEEDED, time.time(), result=b"1")
    assert await redis_broker.finish(queue_name, [done], 60) == [True]
    assert await client.xlen(Keys(queue_name).stream(0)) == 1
    assert [d.job_id for d in await redis_broker.receive(queue_name, "w", 10, 0, 5)] == [older]


async def test_a_finished_batch_is_pruned_no_sooner_than_its_records_expire(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # A whole batch is listed under one second: the latest end plus the ttl, rounded up.
    await redis_broker.enqueue(queue_name, [new_job() for _ in range(3)])
    deliveries = await redis_broker.receive(queue_name, "w", 10, 0, 5)
    ends = [time.time() - 5, time.time() - 2.5, time.time()]
    done = [Completion(d, Outcome.SUCCEEDED, end, result=b"1")
            for d, end in zip(deliveries, ends, strict=True)]
    assert await redis_broker.finish(queue_name, done, 60.5) == [True] * 3
    prefix = Keys(queue_name).prefix
    second = math.ceil(ends[-1] + 60.5)
    assert await client.zrange(prefix + "expiring_at", 0, -1, withscores=True) == [
        (str(second).encode(), float(second))]
    listed = await client.lrange(f"{prefix}expiring:{second}", 0, -1)
    assert sorted(i.decode() for i in listed) == sorted(d.job_id for d in deliveries)
    for d in deliveries:
        assert 60_000 < await client.pttl(Keys(queue_name).job(d.job_id)) <= 61_000
    assert await redis_broker.prune(queue_name, ends[-1] + 60, 100) == 0
    assert await redis_broker.prune(queue_name, ends[-1] + 62, 100) == 3
    assert await client.zcard(Keys(queue_name).index) == 0
    assert not await client.exists(prefix + "expiring_at", f"{prefix}expiring:{second}")


async def test_a_task_asking_again_through_another_queue_object_for_a_lock_it_holds_is_refused(
    redis_url: str, queue_name: str
) -> None:
    # Each Queue made from a URL has a broker of its own: the check went by the broker object, and
    # the task waited for itself for ever.
    first, second = Queue(redis_url, name=queue_name), Queue(redis_url, name=queue_name)
    try:
        with anyio.fail_after(5):
            async with first.lock("shared"):
                with pytest.raises(RuntimeError, match="already held by this task"):
                    async with second.lock("shared"):
                        pass
    finally:
        await first.close()
        await second.close()


async def test_purged_dead_letters_leave_the_listing_index(
    redis_broker: RedisBroker, queue_name: str
) -> None:
    # Their records were deleted, their index entries left: nothing lists or prunes them after
    # (a dead letter never expires), so a queue that purges often grew its index for good.
    kept, dead = new_job(), [new_job(), new_job()]
    await redis_broker.enqueue(queue_name, [*dead, kept])
    taken = await redis_broker.receive(queue_name, "w", 2, 0, 5)
    await redis_broker.finish(queue_name, [Completion(d, Outcome.FAILED, time.time(), reason="x")
                                           for d in taken], 60)
    assert await redis_broker.purge_dead_letters(queue_name) == 2
    index = await redis_broker.client.zrange(Keys(queue_name).index, 0, -1)
    assert index == [kept.id.encode()]


async def test_a_lapsed_task_revocation_is_pruned_and_lean_deliveries_resume(
    redis_broker: RedisBroker, queue_name: str
) -> None:
    # Dropped only when a job of its task was met: while it stayed, every delivery of every task
    # took the slower path through the record (a lean one has token 1).
    await redis_broker.revoke_task(queue_name, "retired", False, time.time() + 1)
    await redis_broker.revoke_task(queue_name, "paused", False, None)
    await redis_broker.prune(queue_name, time.time(), 100)
    revoked = Keys(queue_name).revoked_tasks
    assert await redis_broker.client.hkeys(revoked) == [b"retired", b"paused"]  # none lapsed
    await redis_broker.prune(queue_name, time.time() + 2, 100)
    assert await redis_broker.client.hkeys(revoked) == [b"paused"]
    assert await redis_broker.restore_task(queue_name, "paused")
    await redis_broker.enqueue(queue_name, [new_job()])
    [d] = await redis_broker.receive(queue_name, "w", 1, 0, 5)
    assert d.token == 1


async def test_prune_forgets_consumers_that_hold_nothing_and_read_nothing_for_long(
    redis_broker: RedisBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker killed (not stopped) left its consumers in every band's group for good, emptied by
    # the takeover of its jobs.
    monkeypatch.setattr(aqueue.brokers._redis, "FORGET_CONSUMERS_AFTER", 0.05)
    await redis_broker.enqueue(queue_name, [new_job(), new_job()])
    [gone] = await redis_broker.receive(queue_name, "gone", 1, 0, 5)
    await redis_broker.receive(queue_name, "holding", 1, 0, 5)
    await redis_broker.finish(queue_name, [Completion(gone, Outcome.SUCCEEDED, time.time())], 60)
    stream = Keys(queue_name).stream(0)

    async def consumers() -> list[str]:
        return [c["name"].decode() for c in await redis_broker.client.xinfo_consumers(stream, GROUP)]

    with anyio.fail_after(5):
        while "gone" in await consumers():
            await redis_broker.prune(queue_name, time.time(), 100)
            await anyio.sleep(0.01)
    assert await consumers() == ["holding"]  # it holds a job: kept, however long idle
    await redis_broker.enqueue(queue_name, [new_job()])
    assert len(await redis_broker.receive(queue_name, "gone", 1, 0, 5)) == 1  # named again


async def test_prune_takes_at_most_its_limit_across_seconds(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    await redis_broker.enqueue(queue_name, [new_job() for _ in range(5)])
    deliveries = await redis_broker.receive(queue_name, "w", 10, 0, 5)
    now = time.time()
    for batch, end in ((deliveries[:2], now - 10), (deliveries[2:], now)):
        done = [Completion(d, Outcome.SUCCEEDED, end, result=b"1") for d in batch]
        assert await redis_broker.finish(queue_name, done, 60) == [True] * len(batch)
    assert await client.zcard(Keys(queue_name).prefix + "expiring_at") == 2
    assert await redis_broker.prune(queue_name, now + 61, 3) == 3  # one second's list and a part
    assert await redis_broker.prune(queue_name, now + 61, 3) == 2
    assert await redis_broker.prune(queue_name, now + 61, 3) == 0
    assert await client.zcard(Keys(queue_name).index) == 0


async def test_records_listed_by_an_earlier_release_are_still_pruned(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # Earlier releases listed each expiring record in the zset 'expiring', scored by its expiry.
    keys = Keys(queue_name)
    now = time.time()
    await client.zadd(keys.index, {"old-1": now - 100, "old-2": now - 90, "live": now})
    await client.zadd(keys.prefix + "expiring", {"old-1": now - 1, "old-2": now + 100})
    assert await redis_broker.prune(queue_name, now, 100) == 1
    assert await client.zrange(keys.index, 0, -1) == [b"old-2", b"live"]
    assert await redis_broker.prune(queue_name, now + 101, 100) == 1
    assert await client.zrange(keys.index, 0, -1) == [b"live"]
    assert not await client.exists(keys.prefix + "expiring")


async def read_then_fail_to_start(broker: RedisBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch,
                                  *, script_ran: bool) -> str:
    """Enqueue a job that consumer "w" gets from a blocking read, and cut the connection on its
    start script: before the script runs, or after (its answer lost). Returns the job's id. Its
    stream entry is plain (the job has an expiry): a lean one is leased with the read itself."""
    await broker.enqueue(queue_name, [new_job()])
    [first] = await broker.receive(queue_name, "w", 10, 0, 5)  # fewer than asked: drained
    assert await broker.finish(queue_name, [Completion(first, Outcome.SUCCEEDED, time.time())], 60) == [True]
    [job_id] = await broker.enqueue(queue_name, [new_job(expires=time.time() + 60)])
    real_run = broker._run

    async def cut_on_start(queue: str, name: str, args: list[object]) -> object:
        if name != "start":
            return await real_run(queue, name, args)
        monkeypatch.setattr(broker, "_run", real_run)
        if script_ran:
            await real_run(queue, name, args)
        raise BrokerConnectionError("connection cut")

    monkeypatch.setattr(broker, "_run", cut_on_start)
    with pytest.raises(BrokerConnectionError):
        await broker.receive(queue_name, "w", 10, 1.0, 5)  # drained: straight to the blocking read
    assert broker._run == real_run  # the read went through the start script
    return job_id


@pytest.mark.parametrize("script_ran", [False, True], ids=["start-not-run", "start-answer-lost"])
async def test_entries_read_but_not_started_go_to_the_next_receive(
    redis_broker: RedisBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch, script_ran: bool
) -> None:
    # They sit in the consumer's pending list, leased to nobody: without a second try they would
    # wait for the reclaim, a visibility timeout later.
    job_id = await read_then_fail_to_start(redis_broker, queue_name, monkeypatch, script_ran=script_ran)
    [delivery] = await redis_broker.receive(queue_name, "w", 10, 0, 5)
    assert delivery.job_id == job_id
    # The first start wrote token 1 to the record, so the second try's is 2.
    assert delivery.token == (2 if script_ran else 1)
    record = await redis_broker.get(queue_name, job_id)
    assert record is not None
    assert (record.state, record.worker) == ("running", "w")
    assert await redis_broker.receive(queue_name, "w", 10, 0, 5) == []  # started once only


async def test_entries_read_but_not_started_and_reclaimed_meanwhile_stay_with_the_new_owner(
    redis_broker: RedisBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = await read_then_fail_to_start(redis_broker, queue_name, monkeypatch, script_ran=False)
    [taken] = await redis_broker.reclaim(queue_name, "other", 10, 0, 5)
    assert taken.job_id == job_id
    assert await redis_broker.receive(queue_name, "w", 10, 0, 5) == []
    record = await redis_broker.get(queue_name, job_id)
    assert record is not None
    assert record.worker == "other"
    done = Completion(taken, Outcome.SUCCEEDED, time.time(), result=b"1")
    assert await redis_broker.finish(queue_name, [done], 60) == [True]  # its lease still holds


async def test_a_woken_listener_goes_on_before_the_next_message_is_read(redis_url: str) -> None:
    # The waiter on a job's outcome returns before the pub/sub reader sets up its next read.
    client = redis.asyncio.Redis.from_url(redis_url)
    notifier = Notifier(client)
    order: list[str] = []
    get_message = notifier._pubsub.get_message

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        order.append("read")
        message = await get_message(*args, **kwargs)
        if message is not None and message["type"] == "message":
            order.append("message")
        return message

    notifier._pubsub.get_message = recorded  # type: ignore[method-assign]
    try:
        async with notifier.listen("inbox") as heard:
            await client.publish("inbox", b"done")
            assert await heard.wait() == b"done"
            order.append("heard")
        assert order[order.index("message") + 1] == "heard", order
    finally:
        await notifier.close()
        await client.aclose()


async def test_result_after_a_failed_inbox_subscribe(redis_url: str, queue_name: str) -> None:
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def one() -> int:
        return 1

    async with queue:
        broker = queue.broker
        assert isinstance(broker, RedisBroker)
        notifier = broker._notifier
        assert notifier is not None
        real = notifier._pubsub.subscribe
        failures = [redis.exceptions.ConnectionError("Redis unreachable for a moment")]

        async def subscribe_failing_once(*channels: str) -> None:
            if failures:
                raise failures.pop()
            await real(*channels)

        notifier._pubsub.subscribe = subscribe_failing_once  # type: ignore[method-assign]
        job = await one.enqueue()
        # A lost connection, which the wait rides through: it subscribes again and waits its time.
        with pytest.raises(TimeoutError, match="did not finish"):
            await job.result(timeout=1)
        assert not failures
        async with queue.worker():
            with anyio.fail_after(5):
                assert await job.result(timeout=2) == 1


async def test_a_drained_consumer_learns_bands_announced_to_another(redis_url: str, queue_name: str) -> None:
    # A new band's 'wake' entry reaches one consumer only; the others learn of the band from the
    # next jobs they lease, even while every receive of theirs comes back short.
    b1, b2 = RedisBroker(redis_url), RedisBroker(redis_url)
    try:
        await b1.enqueue(queue_name, [new_job(0)])
        assert len(await b1.receive(queue_name, "c1", 10, 1.0, 5)) == 1
        await b2.enqueue(queue_name, [new_job(0)])
        assert len(await b2.receive(queue_name, "c2", 10, 1.0, 5)) == 1
        await b1.enqueue(queue_name, [new_job(5)])  # band 5 is new: its 'wake' entry
        await b1.receive(queue_name, "c1", 10, 1.0, 5)  # goes to c1, with the job
        await b1.enqueue(queue_name, [new_job(5), new_job(5)])
        seen = []
        for _ in range(3):
            await b1.enqueue(queue_name, [new_job(0)])
            seen.append([d.priority for d in await b2.receive(queue_name, "c2", 2, 1.0, 5)])
        assert [5, 5] in seen[:2], seen
    finally:
        await b1.close()
        await b2.close()


async def test_a_burst_of_calls_waits_for_connections(redis_url: str, queue_name: str) -> None:
    # 2,000 calls at once under the common limit of 1,024 open files: they share a bounded pool
    # and wait for a free connection, none fails.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    broker = RedisBroker(redis_url)
    try:
        await broker.connect()
        results = await asyncio.gather(*(broker.get(queue_name, f"j{i}") for i in range(2000)),
                                       return_exceptions=True)
        assert results == [None] * 2000
    finally:
        await broker.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_finished_entries_leave_the_stream(redis_url: str, queue_name: str) -> None:
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def noop() -> None:
        return None

    async with queue, queue.worker():
        await (await noop.map([() for _ in range(50)])).get(timeout=30)
        client = redis.asyncio.Redis.from_url(redis_url)
        stream = Keys(queue_name).stream(0)
        length = await client.xlen(stream)
        pending = await client.xpending(stream, GROUP)
        await client.aclose()
    assert length == 0
    assert pending["pending"] == 0


async def test_an_ended_job_frees_its_idempotency_key(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    key = Keys(queue_name).prefix + "key:k"
    await redis_broker.enqueue(queue_name, [NewJob(id="a", task="t", payload=PAYLOAD, key="k")])
    assert await client.get(key) == b"a"
    [d] = await redis_broker.receive(queue_name, "w", 1, 0, 5)
    assert await redis_broker.finish(queue_name, [Completion(d, Outcome.SUCCEEDED, time.time())], 60) == [True]
    assert await client.exists(key) == 0


async def test_records_without_the_more_flag_are_read_in_full(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # Records written before the `more` flag existed: their start and finish read every field.
    keys = Keys(queue_name)
    await redis_broker.enqueue(queue_name, [NewJob(id="a", task="t", payload=PAYLOAD, key="ka"),
                                            NewJob(id="b", task="t", payload=PAYLOAD, key="kb")])
    assert await redis_broker.revoke(queue_name, "b", True)
    for job_id in "ab":
        await client.hdel(keys.job(job_id), "more")
    deliveries = await redis_broker.receive(queue_name, "w", 2, 0, 5)
    assert [(d.job_id, d.ended) for d in deliveries] == [("a", None), ("b", "revoked")]
    completion = Completion(deliveries[0], Outcome.SUCCEEDED, time.time())
    assert await redis_broker.finish(queue_name, [completion], 60) == [True]
    assert await client.exists(keys.prefix + "key:ka", keys.prefix + "key:kb") == 0


async def test_entries_ended_before_they_ran_leave_the_stream_on_prune(
    redis_url: str, queue_name: str
) -> None:
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def noop() -> None:
        return None

    async with queue:
        client = redis.asyncio.Redis.from_url(redis_url)
        stream = Keys(queue_name).stream(0)
        try:
            # Cancelled while waiting: their entries leave the stream at once.
            cancelled = [await noop.enqueue() for _ in range(3)]
            for job in cancelled:
                assert await job.cancel() is True
            assert await client.xlen(stream) == 0
            # Expired by the time a worker meets them: it acks them without running anything.
            expired = [new_job(expires=time.time() - 1) for _ in range(3)]
            await queue.broker.enqueue(queue_name, expired)
            notices = await queue.broker.receive(queue_name, "w", 10, 0, 5)
            assert [d.ended for d in notices] == ["expired"] * 3
            assert await client.xlen(stream) == 3
            await queue.broker.prune(queue_name, time.time(), 100)
            assert await client.xlen(stream) == 0
        finally:
            await client.aclose()


@pytest.mark.parametrize("reply", [
    "READONLY You can't write against a read only replica.", "LOADING Redis is loading",
    "BUSY Redis is busy running a script", "TRYAGAIN Multiple keys request during rehashing",
    "MASTERDOWN Link with MASTER is down", "CLUSTERDOWN The cluster is down",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "NOREPLICAS Not enough good replicas to write.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
])
def test_a_failover_or_a_full_server_is_a_broker_connection_error(reply: str) -> None:
    # redis-py cuts the code from most of these messages (READONLY becomes ReadOnlyError("You
    # can't write...")): they were a plain BrokerError, and a worker dropped its outcomes.
    error = BaseParser.parse_error(reply)
    with pytest.raises(BrokerConnectionError, match=r"unavailable|cannot reach") as caught:
        RedisBroker("redis://127.0.0.1:1/0")._raise_translated(error)
    # Writes refused, reads answered: a worker's outage ends as a failed kind of call gets through.
    # The others refuse every call (a cancel check refused by a busy script, the only call that
    # failed, was never made again once the job ended: the outage never ended).
    assert caught.value.answered is reply.startswith(("READONLY", "OOM", "NOREPLICAS", "MISCONF"))


async def test_a_worker_says_once_that_redis_is_out_of_reach_and_once_that_it_is_back(
    queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Its fetch, cancel listener and scheduler each logged every failed call, several lines a
    # second for as long as Redis was down, and nothing said when it was back.
    server = start_redis()
    queue = Queue(server.url, name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    failed: set[str] = set()  # the services whose calls failed
    each_failed = anyio.Event()  # the fetch, the cancel listener and the scheduler

    class Failures(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("broker unreachable ("):
                failed.add(record.getMessage().partition("(")[2].partition(")")[0])
                if {"receiving jobs", "listening for cancel requests", "scheduling"} <= failed:
                    each_failed.set()

    handler = Failures()
    logging.getLogger("aqueue").addHandler(handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="aqueue"):
            async with queue, queue.worker():
                assert await (await add.enqueue(1, 1)).result(timeout=10) == 2
                server.stop()
                with anyio.fail_after(20):
                    await each_failed.wait()
                server.start()
                assert await (await add.enqueue(2, 2)).result(timeout=30) == 4
        said = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("broker ")]
        warned = [message for level, message in said if level >= logging.WARNING]
        assert len(said) > 3, said  # failures after the first, as debug lines
        assert len(warned) == 2, warned
        assert warned[0].startswith("broker unreachable (")
        assert warned[1].startswith("broker reachable again after ")
    finally:
        logging.getLogger("aqueue").removeHandler(handler)
        server.stop()


async def test_a_full_worker_says_redis_is_back_without_waiting_for_a_free_slot(queue_name: str) -> None:
    # Only its fetch said so, and a worker with no free slot does not fetch: "reachable again"
    # came when its job ended, with an outage as long as that.
    server = start_redis()
    queue = Queue(server.url, name=queue_name)
    started, finish = anyio.Event(), anyio.Event()
    out, back = anyio.Event(), anyio.Event()

    class Outage(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("broker unreachable ("):
                out.set()
            elif message.startswith("broker reachable again"):
                back.set()

    @queue.task
    async def hold() -> None:
        started.set()
        await finish.wait()

    handler = Outage()
    logging.getLogger("aqueue").addHandler(handler)
    try:
        async with queue, queue.worker(concurrency=1):
            await hold.enqueue()
            with anyio.fail_after(10):
                await started.wait()
            server.stop()
            with anyio.fail_after(10):
                await out.wait()
            server.start()
            with anyio.fail_after(10):
                await back.wait()  # while the job still holds the one slot
            finish.set()
    finally:
        logging.getLogger("aqueue").removeHandler(handler)
        server.stop()


@pytest.mark.parametrize("refusal", ["replica", "too few replicas"])
async def test_a_worker_keeps_an_outcome_through_a_failover(queue_name: str, refusal: str) -> None:
    # Its server turned replica while the job ran: the success's write was refused (READONLY),
    # the outcome dropped, and the job ran again once its lease lapsed. The same with writes
    # refused for want of replicas (NOREPLICAS).
    server = start_redis()
    admin = redis.asyncio.Redis.from_url(server.url)
    queue = Queue(server.url, name=queue_name)
    started, finish, refused = anyio.Event(), anyio.Event(), anyio.Event()
    runs = 0

    class Refusals(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "job outcome(s)" in record.getMessage():
                refused.set()

    @queue.task
    async def work() -> str:
        nonlocal runs
        runs += 1
        started.set()
        await finish.wait()
        return "done"

    handler = Refusals()
    logging.getLogger("aqueue").addHandler(handler)
    try:
        async with queue, queue.worker():
            job = await work.enqueue()
            with anyio.fail_after(10):
                await started.wait()
            if refusal == "replica":
                await admin.replicaof("127.0.0.1", str(free_port()))  # a master that is not there
            else:
                await admin.config_set("min-replicas-to-write", 1)  # and it has none
            finish.set()
            with anyio.fail_after(10):
                await refused.wait()
            if refusal == "replica":
                await admin.replicaof("NO", "ONE")
            else:
                await admin.config_set("min-replicas-to-write", 0)
            assert await job.result(timeout=10) == "done"
        assert runs == 1
    finally:
        logging.getLogger("aqueue").removeHandler(handler)
        await admin.aclose()
        server.stop()


async def test_a_pool_too_small_for_a_worker_serves_a_producer_and_refuses_a_worker(
    redis_url: str, queue_name: str
) -> None:
    # A worker holds three connections for good: with three at most, its jobs, results and locks
    # waited for ever, without a word.
    queue = Queue(f"{redis_url}?max_connections=3", name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with queue:
        job = await add.enqueue(1, 2)
        async with queue.lock("producers-lock"):
            assert await job.state() == JobState.PENDING
        with pytest.raises(ConfigurationError, match="max_connections=3 is too few for a worker, "
                                                     "which holds 3 for good: give it at least 4"):
            async with queue.worker():
                pass
    async with Queue(f"{redis_url}?max_connections=4", name=queue_name) as roomy:
        roomy.task(name=add.name)(add.fn)
        async with roomy.worker():
            assert await roomy.job(job.id).result(timeout=10) == 3


async def test_a_pool_of_one_connection_enqueues_and_refuses_to_wait(
    redis_url: str, queue_name: str
) -> None:
    # Waiting (on a job, or for a lock) listens on the process's inbox, which holds a connection
    # for good: with one in all, the wait's reads found none, for ever without a timeout.
    queue = Queue(f"{redis_url}?max_connections=1", name=queue_name)
    other = Queue(redis_url, name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with queue, other, other.lock("held"):
        job = await add.enqueue(1, 2)
        assert await job.state() == JobState.PENDING
        with anyio.fail_after(10):
            with pytest.raises(ConfigurationError, match="max_connections=1 is too few for "
                                                         f"waiting on job {job.id}: the inbox it "
                                                         "listens on holds 1 for good; give it "
                                                         "at least 2"):
                await job.result()
            with pytest.raises(ConfigurationError, match="max_connections=1 is too few for "
                                                         "waiting for lock 'held'"):
                async with queue.lock("held"):
                    pass
        async with queue.lock("free"):  # taken at once: nothing to wait for
            assert await job.state() == JobState.PENDING


async def test_workers_sharing_a_broker_are_counted_against_its_pool(
    redis_url: str, queue_name: str
) -> None:
    # Two workers on one broker share its inbox but each holds its own blocking read and cancel
    # listener: with five connections, two workers waited for ever on their calls.
    queue = Queue(f"{redis_url}?max_connections=5", name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with queue:
        async with queue.worker():
            with pytest.raises(ConfigurationError, match="max_connections=5 is too few for 2 "
                                                         "workers, which hold 5 for good: give "
                                                         "it at least 6"):
                async with queue.worker():
                    pass
            assert await (await add.enqueue(1, 2)).result(timeout=10) == 3
        async with queue.worker():  # the first one stopped: it is no longer counted
            assert await (await add.enqueue(2, 3)).result(timeout=10) == 5
    async with Queue(f"{redis_url}?max_connections=6", name=queue_name) as roomy:
        roomy_add = roomy.task(name=add.name)(add.fn)
        async with roomy.worker(), roomy.worker():
            jobs = await roomy_add.map((n, n) for n in range(50))
            assert await jobs.get(timeout=10) == [2 * n for n in range(50)]


@pytest.mark.parametrize("scheme", ["unix", "UNIX"])  # a scheme is read in any case
async def test_unix_socket_url(scheme: str) -> None:
    socket_path = Path(tempfile.mkdtemp(prefix="aqueue-sock-")) / "redis.sock"
    server = start_redis("--unixsocket", str(socket_path), "--unixsocketperm", "700")
    try:
        queue = Queue(f"{scheme}://{socket_path}", name="sock")

        @queue.task
        async def add(a: int, b: int) -> int:
            return a + b

        async with queue, queue.worker():
            assert await (await add.enqueue(2, 3)).result(timeout=10) == 5
    finally:
        server.stop()


async def test_clean_stop_leaves_no_consumer_and_prunes_index(redis_url: str, queue_name: str) -> None:

    queue = Queue(redis_url, name=queue_name, result_ttl=1)

    @queue.task
    async def noop() -> None:
        return None

    async with queue:
        async with queue.worker() as worker:
            await (await noop.enqueue()).result(timeout=10)
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            consumers = await client.xinfo_consumers(Keys(queue_name).stream(0), GROUP)
            names = [c["name"].decode() for c in consumers]
            assert worker.name not in names
            assert waiting_name(worker.name) not in names
            await anyio.sleep(2.1)  # lets the 1 s result_ttl run out (Redis expires keys itself)
            assert await client.zcard(Keys(queue_name).index) == 1
            assert await queue.broker.prune(queue_name, time.time(), 100) == 1
            assert await client.zcard(Keys(queue_name).index) == 0
            assert await queue.broker.prune(queue_name, time.time(), 100) == 0
        finally:
            await client.aclose()


async def test_a_worker_without_the_scheduler_prunes_too_and_as_it_starts(
    redis_url: str, queue_name: str
) -> None:
    # Only a worker running the scheduler pruned, and only 10 s after it started: with workers
    # run --no-scheduler, or each for a few seconds, every finished job left its index entries
    # in Redis for good.
    queue = Queue(redis_url, name=queue_name, result_ttl=1)
    client = redis.asyncio.Redis.from_url(redis_url)

    @queue.task
    async def noop() -> None:
        return None

    keys = Keys(queue_name)
    try:
        async with queue:
            async with queue.worker(scheduler=False):
                job = await noop.enqueue()
                await job.result(timeout=10)
            # Its index entry can go once the second its record expires in (listed, rounded up)
            # has passed.
            [(_, second)] = await client.zrange(keys.prefix + "expiring_at", 0, -1, withscores=True)
            with anyio.fail_after(10):
                while time.time() <= second:  # noqa: ASYNC110 - waiting for the clock itself
                    await anyio.sleep(0.05)
            assert not await client.exists(keys.job(job.id))
            assert await client.zcard(keys.index) == 1  # left behind
            async with queue.worker(scheduler=False):
                with anyio.fail_after(5):  # under PRUNE_EVERY: the pass as it starts
                    while await client.zcard(keys.index):  # noqa: ASYNC110 - another process's work
                        await anyio.sleep(0.02)
    finally:
        await client.aclose()


async def test_a_new_job_starts_from_its_stream_entry_alone(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # Its entry carries what the worker needs, so the first delivery neither reads nor writes the
    # record; an expiry (checked at the start) needs the record, so that job's entry is plain.
    lean, plain = new_job(), new_job(expires=time.time() + 60)
    await redis_broker.enqueue(queue_name, [lean, plain])
    keys = Keys(queue_name)
    entries = await client.xrange(keys.stream(0))
    assert [sorted(fields) for _, fields in entries] == [
        [b"at", b"id", b"payload", b"task"], [b"id"]]
    deliveries = await redis_broker.receive(queue_name, "w", 2, 0, 5)
    assert [(d.job_id, d.token) for d in deliveries] == [(lean.id, 1), (plain.id, 1)]
    assert await client.hmget(keys.job(lean.id), "state", "token", "started_at") == [b"pending", b"0", None]
    assert await client.hmget(keys.job(plain.id), "state", "token") == [b"running", b"1"]
    completions = [Completion(d, Outcome.SUCCEEDED, time.time(), result=b"1") for d in deliveries]
    assert await redis_broker.finish(queue_name, completions, 60) == [True, True]
    # The end writes what the start did not.
    assert await client.hmget(keys.job(lean.id), "state", "worker", "started_at") == [
        b"succeeded", b"w", repr(deliveries[0].leased_at).encode()]


async def test_a_plain_job_is_stored_as_the_general_script_stores_one(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # A job with no key, eta, expiry or link has a script of its own: it must write store_job's
    # record, field for field and in its order (the first fields are found soonest), and its entry.
    plain = new_job(priority=2)
    keyed = NewJob(id=uuid.uuid4().hex, task="t", payload=PAYLOAD, priority=2,
                   enqueued_at=plain.enqueued_at, key="k")
    await redis_broker.enqueue(queue_name, [plain])
    await redis_broker.enqueue(queue_name, [keyed])  # by enqueue.lua, for its key
    keys = Keys(queue_name)
    plain_record = await client.hgetall(keys.job(plain.id))
    keyed_record = await client.hgetall(keys.job(keyed.id))
    assert list(plain_record) == [name for name in keyed_record if name != b"key"]
    differing = {b"more", b"key", b"entry"}
    assert {n: v for n, v in plain_record.items() if n not in differing} == {
        n: v for n, v in keyed_record.items() if n not in differing}
    assert (plain_record[b"more"], keyed_record[b"more"]) == (b"0", b"1")
    entries = await client.xrange(keys.stream(2))
    assert [entry for entry, _ in entries] == [plain_record[b"entry"], keyed_record[b"entry"]]
    assert [{n: v for n, v in fields.items() if n != b"id"} for _, fields in entries] == [
        {b"task": b"t", b"payload": PAYLOAD, b"at": repr(plain.enqueued_at).encode()}] * 2


async def test_revoking_a_waiting_job_gives_it_a_plain_entry(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # A lean entry is not checked when met: the revoked job waits on a plain one, at the back.
    first, second = new_job(), new_job()
    await redis_broker.enqueue(queue_name, [first, second])
    assert await redis_broker.revoke(queue_name, first.id, True) is True
    entries = await client.xrange(Keys(queue_name).stream(0))
    assert [fields[b"id"].decode() for _, fields in entries] == [second.id, first.id]
    assert b"task" not in entries[1][1]
    deliveries = await redis_broker.receive(queue_name, "w", 2, 0, 5)
    assert [(d.job_id, d.ended) for d in deliveries] == [(second.id, None), (first.id, "revoked")]


def scripts_run(broker: RedisBroker, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the scripts the broker runs from now on, in order."""
    names: list[str] = []
    real_run = broker._run

    async def run(queue: str, name: str, args: list[object]) -> object:
        names.append(name)
        return await real_run(queue, name, args)

    monkeypatch.setattr(broker, "_run", run)
    return names


@pytest.mark.parametrize("protocol", [2, 3])
async def test_a_busy_consumer_reads_lean_entries_without_a_script(
    redis_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch, protocol: int
) -> None:
    # The MULTI's reply holds the read as a list of streams in RESP2, a map in RESP3.
    broker = RedisBroker(f"{redis_url}?protocol={protocol}")
    try:
        jobs = [new_job() for _ in range(3)]
        await broker.enqueue(queue_name, jobs[:1])
        assert len(await broker.receive(queue_name, "w", 1, 0, 5)) == 1  # the script: learns band 0
        await broker.enqueue(queue_name, jobs[1:])
        ran = scripts_run(broker, monkeypatch)
        deliveries = await broker.receive(queue_name, "w", 10, 0, 5)
        assert ran == []
        assert [(d.job_id, d.task, d.payload, d.attempt, d.token, d.priority, d.consumer)
                for d in deliveries] == [(j.id, "t", PAYLOAD, 1, 1, 0, "w") for j in jobs[1:]]
        for d in deliveries:
            record = await broker.get(queue_name, d.job_id)
            assert record is not None
            assert (record.state, record.worker, record.enqueued_at) == ("running", "w", d.enqueued_at)
    finally:
        await broker.close()


@pytest.mark.parametrize("idle", [False, True], ids=["busy-MULTI-read", "idle-blocking-read"])
async def test_a_consumer_leaves_entries_to_the_start_script_while_a_task_is_revoked(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str,
    monkeypatch: pytest.MonkeyPatch, idle: bool,
) -> None:
    if idle:
        await drained(redis_broker, queue_name)
    else:  # all it asked for: its next read is the MULTI
        await redis_broker.enqueue(queue_name, [new_job()])
        assert len(await redis_broker.receive(queue_name, "w", 1, 0, 5)) == 1
    await redis_broker.revoke_task(queue_name, "t", once=False, until=None)
    queued = new_job()
    await redis_broker.enqueue(queue_name, [queued])
    ran = scripts_run(redis_broker, monkeypatch)
    [notice] = await redis_broker.receive(queue_name, "w", 10, 1.0 if idle else 0, 5)
    assert (notice.job_id, notice.ended) == (queued.id, "revoked")
    assert ran == ["start"]
    # The idle consumer's read was the blocking one, made under its waiting name.
    assert (waiting_name("w") in await pending_by_consumer(client, queue_name)) is idle


async def test_a_busy_consumer_learns_a_new_band_and_reads_it_first(
    redis_broker: RedisBroker, redis_url: str, queue_name: str
) -> None:
    # Band 3 is made, and its wake-up in band 0 goes to another consumer: this one learns of the
    # band from its next read of band 0, and reads band 3 first in the same receive: what the read
    # took from band 0 goes back in its place (it ran first, the band read from the next receive).
    await redis_broker.enqueue(queue_name, [new_job()])
    assert len(await redis_broker.receive(queue_name, "w", 1, 0, 5)) == 1
    await redis_broker.enqueue(queue_name, [new_job(3)])
    other = RedisBroker(redis_url)  # another process
    try:
        assert [d.priority for d in await other.receive(queue_name, "other", 10, 0, 5)] == [3]
    finally:
        await other.close()
    low, high, later = new_job(0), new_job(3), new_job(0)
    await redis_broker.enqueue(queue_name, [low, high, later])
    assert [d.job_id for d in await redis_broker.receive(queue_name, "w", 1, 0, 5)] == [high.id]
    assert [d.job_id for d in await redis_broker.receive(queue_name, "w", 1, 0, 5)] == [low.id]
    assert [d.job_id for d in await redis_broker.receive(queue_name, "w", 1, 0, 5)] == [later.id]


async def test_a_busy_consumer_that_meets_a_new_band_takes_it_first_and_band_0_after_in_order(
    redis_broker: RedisBroker, queue_name: str
) -> None:
    # More asked for than the new band holds: the band-0 entries the read took come after, in
    # their order, each a first delivery still (lean, token 1).
    await redis_broker.enqueue(queue_name, [new_job()])
    assert len(await redis_broker.receive(queue_name, "w", 1, 0, 5)) == 1  # band 0 alone, learned
    low, high, later = new_job(0), new_job(3), new_job(0)
    await redis_broker.enqueue(queue_name, [low, high, later])
    taken = await redis_broker.receive(queue_name, "w", 10, 0, 5)
    assert [d.job_id for d in taken] == [high.id, low.id, later.id]
    assert [(d.token, d.attempt) for d in taken] == [(1, 1)] * 3


async def test_a_consumer_reads_the_bands_itself_before_it_reads_without_the_script(
    redis_broker: RedisBroker, redis_url: str, queue_name: str
) -> None:
    # A worker of the queue object knew band 0 alone; a band was made elsewhere since; a new
    # worker on that object read band 0 first from what the other had learned: its jobs ran
    # ahead of the higher band's, up to the new worker's concurrency of them.
    await redis_broker.enqueue(queue_name, [new_job()])
    assert len(await redis_broker.receive(queue_name, "first", 1, 0, 5)) == 1
    other = RedisBroker(redis_url)  # another process
    try:
        low, high = new_job(0), new_job(3)
        await other.enqueue(queue_name, [low, high])
    finally:
        await other.close()
    assert [d.job_id for d in await redis_broker.receive(queue_name, "second", 1, 0, 5)] == [high.id]


async def test_a_busy_consumer_recreates_a_stream_lost_with_the_servers_data(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    await redis_broker.enqueue(queue_name, [new_job()])
    assert len(await redis_broker.receive(queue_name, "w", 1, 0, 5)) == 1
    await client.flushdb()
    assert await redis_broker.receive(queue_name, "w", 10, 0, 5) == []  # the script made it again
    job = new_job()
    await redis_broker.enqueue(queue_name, [job])
    assert [d.job_id for d in await redis_broker.receive(queue_name, "w", 10, 0, 5)] == [job.id]


async def test_a_lease_redis_lost_with_its_data_is_lost_before_and_after_the_group_is_made_again(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # Renewing raised NOGROUP until a receive made the group again (a warning every
    # visibility_timeout / 3 from a worker too full to receive), then reported the job lost.
    await redis_broker.enqueue(queue_name, [new_job(), new_job()])
    mine = await redis_broker.receive(queue_name, "w", 2, 0, 5)
    await client.flushdb()
    ids = [d.job_id for d in mine]
    assert await redis_broker.renew(queue_name, "w", mine) == ids
    assert await redis_broker.receive(queue_name, "w", 10, 0, 5) == []  # the group made again
    assert await redis_broker.renew(queue_name, "w", mine) == ids


async def test_a_full_worker_whose_job_redis_lost_stops_it_once(
    redis_url: str, client: redis.asyncio.Redis, queue_name: str, caplog: pytest.LogCaptureFixture,
) -> None:
    # A restart without persistence, as FLUSHALL leaves it, under a worker with no free slot (so
    # that no receive makes the group again): its renewals failed with NOGROUP until the job
    # ended, a warning each time. A worker with a free slot stopped the job, its lease gone.
    queue = Queue(redis_url, name=queue_name, visibility_timeout=1)
    started, stopped = anyio.Event(), anyio.Event()

    @queue.task
    async def work() -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()

    caplog.set_level(logging.INFO, logger="aqueue")
    async with queue, queue.worker(concurrency=1):
        await work.enqueue()
        with anyio.fail_after(10):
            await started.wait()
        await client.flushall()
        with anyio.fail_after(10):
            await stopped.wait()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    said = [m for m in said if "lease" in m]
    assert len(said) == 1, said
    assert said[0].endswith("its lease is gone (another worker took the job over, or Redis lost its data): "
                            "stopping it here")


@pytest.mark.parametrize(("field", "value"), [
    ("attempt", b"x"), ("enqueued_at", b"nan?"), ("state", b"\xff"), ("state", b"weird"), ("state", None),
    ("failures", b"1.5"),
])
async def test_a_record_another_program_wrote_is_named_in_a_broker_error(
    redis_url: str, client: redis.asyncio.Redis, queue_name: str, field: str, value: bytes | None
) -> None:
    # One record with a field aqueue never writes so (None: without the field): the listing, the
    # dead letters and the job's info raised a bare ValueError (or UnicodeDecodeError) that named
    # nothing.
    queue = Queue(redis_url, name=queue_name)

    @queue.task
    async def add(a: int, b: int) -> int:
        return a + b

    async with queue:
        job = await add.enqueue(1, 2)
        if value is None:
            await client.hdel(Keys(queue_name).job(job.id), field)
        else:
            await client.hset(Keys(queue_name).job(job.id), field, value)
        named = f"job '{job.id}': its record on Redis is not one aqueue wrote"
        for call in (job.info(), queue.jobs()):
            with pytest.raises(BrokerError, match=named):
                await call
        # The job's state is read alone: only a state aqueue did not write is refused.
        if field == "state":
            with pytest.raises(BrokerError, match=named):
                await job.state()
        else:
            assert await job.state() == JobState.PENDING


async def test_a_retry_count_another_program_wrote_counts_as_none_asked(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # A delivery after a retry carries the record's `asked`; one that is no count of aqueue's
    # must not fail the receive that meets it (every worker's, for as long as the job waits).
    job = new_job()
    await redis_broker.enqueue(queue_name, [job])
    for asked in (True, False):
        [d] = await redis_broker.receive(queue_name, "w", 1, 0, 5)
        retry = Completion(d, Outcome.RETRY, time.time(), asked=asked)
        assert await redis_broker.finish(queue_name, [retry], 60) == [True]
    await client.hset(Keys(queue_name).job(job.id), "asked", "1.5")
    [d] = await redis_broker.receive(queue_name, "w", 1, 0, 5)
    assert (d.job_id, d.attempt, d.asked) == (job.id, 3, 0)


async def drained(broker: RedisBroker, queue_name: str, consumer: str = "w") -> None:
    """Make `consumer`'s next receive go straight to the blocking read: its last one came back
    short (a job is taken and finished here). The take script is loaded, as after any earlier
    blocking read on this server (on a fresh one, the first read loads it: see the flush test)."""
    await broker.enqueue(queue_name, [new_job()])
    await broker.client.script_load(source("take"))
    [first] = await broker.receive(queue_name, consumer, 10, 0, 5)
    assert await broker.finish(queue_name, [Completion(first, Outcome.SUCCEEDED, time.time())], 60) == [True]


async def pending_by_consumer(client: redis.asyncio.Redis, queue_name: str, band: int = 0) -> dict[str, int]:
    consumers = await client.xinfo_consumers(Keys(queue_name).stream(band), GROUP)
    return {c["name"].decode(): c["pending"] for c in consumers}


@pytest.mark.parametrize("protocol", [2, 3])
async def test_an_idle_consumer_is_handed_a_lean_job_by_its_read_alone(
    redis_url: str, client: redis.asyncio.Redis, queue_name: str, monkeypatch: pytest.MonkeyPatch,
    protocol: int,
) -> None:
    # The take script goes with the blocking read: no script runs after the read comes back.
    broker = RedisBroker(f"{redis_url}?protocol={protocol}")
    try:
        await drained(broker, queue_name)
        job = new_job()
        await broker.enqueue(queue_name, [job])
        ran = scripts_run(broker, monkeypatch)
        [delivery] = await broker.receive(queue_name, "w", 10, 1.0, 5)
        assert ran == []
        assert (delivery.job_id, delivery.token, delivery.payload, delivery.consumer) == (
            job.id, 1, PAYLOAD, "w")
        assert await pending_by_consumer(client, queue_name) == {"w": 1, waiting_name("w"): 0}
        record = await broker.get(queue_name, job.id)
        assert record is not None
        assert (record.state, record.worker) == ("running", "w")
    finally:
        await broker.close()


async def test_an_idle_consumers_take_script_is_loaded_again_after_a_flush(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the read took waits under the waiting name while the script is loaded and run again.
    await drained(redis_broker, queue_name)
    job = new_job()
    await redis_broker.enqueue(queue_name, [job])
    await client.script_flush()
    ran = scripts_run(redis_broker, monkeypatch)
    [delivery] = await redis_broker.receive(queue_name, "w", 10, 1.0, 5)
    assert (delivery.job_id, delivery.token) == (job.id, 1)
    assert ran == ["take"]
    assert await pending_by_consumer(client, queue_name) == {"w": 1, waiting_name("w"): 0}


async def test_an_idle_consumer_keeps_what_it_asked_for_and_hands_back_the_rest_in_place(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # XREADGROUP's COUNT is per stream: two bands can hand over twice what was asked.
    await redis_broker.enqueue(queue_name, [new_job(3)])
    [first] = await redis_broker.receive(queue_name, "w", 10, 0, 5)  # learns band 3; drained
    done = Completion(first, Outcome.SUCCEEDED, time.time())
    assert await redis_broker.finish(queue_name, [done], 60) == [True]
    high, low = [new_job(3), new_job(3)], [new_job(0), new_job(0)]
    await redis_broker.enqueue(queue_name, high + low)
    entries = [e for e, _ in await client.xrange(Keys(queue_name).stream(0))][-2:]
    taken = await redis_broker.receive(queue_name, "w", 2, 1.0, 5)
    assert [d.job_id for d in taken] == [j.id for j in high]
    assert await pending_by_consumer(client, queue_name, 0) == {"w": 0, waiting_name("w"): 0}
    [group] = await client.xinfo_groups(Keys(queue_name).stream(0))
    assert group["lag"] == 3  # the two jobs and a wake-up: still counted (see unread in _common.lua)
    # The rest are band 0's to read again, for any worker, as the entries they were.
    rest = await redis_broker.receive(queue_name, "other", 10, 0, 5)
    assert [(d.job_id, d.receipt.encode()) for d in rest] == list(
        zip([j.id for j in low], entries, strict=True))


async def test_entries_read_past_the_count_go_to_the_back_once_another_read_past_them(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # Handed back in place only while nothing after them was read: moving the group back then
    # would hand out again what another worker holds. Put back at the end instead, none lost.
    jobs = [new_job() for _ in range(4)]
    await redis_broker.enqueue(queue_name, jobs)
    stream, waiting = Keys(queue_name).stream(0), waiting_name("w")
    await client.xreadgroup(GROUP, waiting, {stream: ">"}, count=2)  # the first two
    await client.xreadgroup(GROUP, "other", {stream: ">"}, count=1)  # the third
    reply = await redis_broker._run(queue_name, "take", ["w", waiting, 1])
    assert [row[0].decode() for row in reply[2:]] == [jobs[0].id]
    assert await pending_by_consumer(client, queue_name) == {"w": 1, waiting_name("w"): 0, "other": 1}
    rest = await redis_broker.receive(queue_name, "x", 10, 0, 5)
    assert [d.job_id for d in rest] == [jobs[3].id, jobs[1].id]


async def redis_milliseconds(client: redis.asyncio.Redis) -> int:
    """Redis's clock, which stream ids are made from, in milliseconds."""
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def test_an_entry_handed_back_from_the_start_of_its_millisecond_leaves_its_band_working(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # Handed back in place, an entry with sequence 0 moves the group back to the greatest id of the
    # millisecond before ("<ms - 1>-18446744073709551615"). The trim after a finish added one to
    # that sequence as a Lua number and sent an id that is none ("...-1.844674407371e+19"): every
    # finish and prune on the band failed until a read took from it again.
    held, low, high = new_job(), new_job(), new_job(5)
    await redis_broker.enqueue(queue_name, [held])
    [delivery] = await redis_broker.receive(queue_name, "w", 1, 0, 5)
    stream = Keys(queue_name).stream(0)
    [(last, _)] = await client.xrevrange(stream, count=1)
    with anyio.fail_after(10):  # the next entry starts a millisecond of its own
        while await redis_milliseconds(client) <= int(last.split(b"-")[0]):  # noqa: ASYNC110 - Redis's clock
            await anyio.sleep(0.001)
    await redis_broker.enqueue(queue_name, [low])
    await redis_broker.enqueue(queue_name, [high])  # a new band: a wake-up entry after `low`
    waiting = waiting_name("other")
    [[_, [(entry, _)]]] = await client.xreadgroup(GROUP, waiting, {stream: ">"}, count=1)
    assert entry.endswith(b"-0")
    reply = await redis_broker._run(queue_name, "take", ["other", waiting, 1])
    assert [row[0].decode() for row in reply[2:]] == [high.id]  # and `low` handed back in place
    done = Completion(delivery, Outcome.SUCCEEDED, time.time())
    assert await redis_broker.finish(queue_name, [done], 60) == [True]
    assert await redis_broker.prune(queue_name, time.time(), 10) == 0
    assert (await client.xpending(stream, GROUP))["pending"] == 0  # `held` acked
    rest = await redis_broker.receive(queue_name, "x", 10, 0, 5)
    assert [d.job_id for d in rest] == [low.id]


@pytest.mark.parametrize("between_pages", ["enqueued", "pruned"])
async def test_jobs_that_come_or_go_while_the_listing_reads_it_move_none_across_a_page(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str,
    monkeypatch: pytest.MonkeyPatch, between_pages: str
) -> None:
    # The listing read the index a page at a time, by position: jobs enqueued between two pages
    # pushed some of the first page's into the second (listed twice), and index entries pruned
    # meanwhile pulled some of the second page's into the first (never listed).
    def job(task: str) -> NewJob:
        return NewJob(id=uuid.uuid4().hex, task=task, payload=PAYLOAD, enqueued_at=time.time())

    await redis_broker.enqueue(queue_name, [job(task) for _ in range(100) for task in ("a", "b")])
    real_records = redis_broker._records
    pages = 0

    async def records_then_change(queue: str, ids: Any, budget: int = 0) -> Any:
        nonlocal pages
        records = await real_records(queue, ids, budget)  # (a page of 150: one call)
        pages += 1
        if pages == 1 and between_pages == "enqueued":
            await redis_broker.enqueue(queue_name, [job("a") for _ in range(20)])
        elif pages == 1:  # as a prune in another process forgets expired records' entries
            await client.zremrangebyrank(Keys(queue_name).index, -20, -1)
        return records

    monkeypatch.setattr(redis_broker, "_records", records_then_change)
    listed = await redis_broker.jobs(queue_name, None, "a", 150)  # pages of 150 jobs
    assert pages >= 2
    assert len({r.id for r in listed}) == len(listed) == 100


async def receive_with_answer_cut(
    broker: RedisBroker, queue_name: str, consumer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocking receive whose read and take run, the connection cut before their answer comes."""
    real_call_many = _Reader.call_many

    async def answer_lost(self: _Reader, commands: tuple[tuple[Any, ...], ...], blocks: float) -> list[Any]:
        await real_call_many(self, commands, blocks)
        raise redis.exceptions.ConnectionError("connection cut")

    monkeypatch.setattr(_Reader, "call_many", answer_lost)
    with pytest.raises(BrokerConnectionError):
        await broker.receive(queue_name, consumer, 10, 1.0, 5)
    monkeypatch.setattr(_Reader, "call_many", real_call_many)


async def test_a_lean_job_whose_read_answer_is_lost_is_taken_over_after_its_lease(
    redis_broker: RedisBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection is cut after the read and its take ran: the job is leased to "w", which never
    # heard of it. It is not lost: once its lease lapses, the reclaim hands it to a worker.
    await drained(redis_broker, queue_name)
    job = new_job()
    await redis_broker.enqueue(queue_name, [job])
    await receive_with_answer_cut(redis_broker, queue_name, "w", monkeypatch)
    [taken] = await redis_broker.reclaim(queue_name, "other", 10, 0, 5)  # idle 0: lapsed at once
    assert (taken.job_id, taken.consumer) == (job.id, "other")


async def test_what_blocking_reads_leased_before_their_answers_were_lost_is_recovered_at_once(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read and its take ran, and the answer was cut on the way: the job is leased to "w". A read
    # ran, and the take after it did not: the job waits under the waiting name. `recover` hands
    # both to "w" now, rather than to whoever takes them over when their leases lapse.
    await drained(redis_broker, queue_name)
    first, second = new_job(), new_job()
    await redis_broker.enqueue(queue_name, [first])
    await receive_with_answer_cut(redis_broker, queue_name, "w", monkeypatch)
    await redis_broker.enqueue(queue_name, [second])
    await client.xreadgroup(GROUP, waiting_name("w"), {Keys(queue_name).stream(0): ">"}, count=10)
    back = await redis_broker.recover(queue_name, "w", [], 1)
    assert [(d.job_id, d.token) for d in back] == [(first.id, 1), (second.id, 1)]
    assert await pending_by_consumer(client, queue_name) == {"w": 2, waiting_name("w"): 0}
    ends = [Completion(d, Outcome.SUCCEEDED, time.time()) for d in back]
    assert await redis_broker.finish(queue_name, ends, 60) == [True, True]


async def test_recover_hands_out_no_job_that_has_ended(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # A finish that wrote a job's end and then failed before its acks ran (Redis does not undo a
    # script's writes) left the entry leased to a worker that had let the job go: a recover handed
    # it out again as a new job, and the job ran a second time.
    await drained(redis_broker, queue_name)
    job = new_job()
    await redis_broker.enqueue(queue_name, [job])
    assert len(await redis_broker.receive(queue_name, "w", 10, 0, 5)) == 1
    await client.hset(Keys(queue_name).job(job.id), "state", "succeeded")  # as such a finish leaves it
    assert await redis_broker.recover(queue_name, "w", [], 1) == []
    assert await pending_by_consumer(client, queue_name) == {"w": 0}  # and its entry let go


async def test_a_stopping_consumer_is_forgotten_under_both_its_names(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    await drained(redis_broker, queue_name)
    await redis_broker.enqueue(queue_name, [new_job()])
    [delivery] = await redis_broker.receive(queue_name, "w", 10, 1.0, 5)
    assert set(await pending_by_consumer(client, queue_name)) == {"w", waiting_name("w")}
    await redis_broker.forget_consumer(queue_name, "w")
    assert set(await pending_by_consumer(client, queue_name)) == {"w"}  # it still holds a job
    done = Completion(delivery, Outcome.SUCCEEDED, time.time())
    assert await redis_broker.finish(queue_name, [done], 60) == [True]
    await redis_broker.forget_consumer(queue_name, "w")
    assert await pending_by_consumer(client, queue_name) == {}


async def test_a_lock_waiter_told_pttl_0_waits_a_millisecond_not_the_recheck(
    redis_broker: RedisBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PTTL answers 0 in a key's last millisecond: read as "no ttl", the waiter slept the whole
    # 10 s re-check (a key's expiry publishes nothing to wake it).
    queue = Queue(broker=redis_broker, name=queue_name)
    assert await redis_broker.lock_acquire(queue_name, "P", "dead-holder", 0.05)
    await redis_broker.connect()

    async def last_millisecond(key: str) -> int:
        return 0

    monkeypatch.setattr(redis_broker.client, "pttl", last_millisecond)
    with anyio.fail_after(3):  # the lock expires 50 ms after it was taken
        async with queue.lock("P", timeout=30):
            pass


async def test_a_tick_far_ahead_of_redis_clock_is_refused_and_stops_no_other_tick(
    redis_broker: RedisBroker, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A scheduler on a host whose clock ran a day ahead recorded its tick as the task's latest:
    # every other scheduler's ticks were refused as past, and the task stopped for that day.
    now = time.time()
    fast = new_job()
    assert await redis_broker.enqueue_tick(queue_name, now + 86_400, fast) is False
    assert await redis_broker.get(queue_name, fast.id) is None
    assert "clock is wrong" in caplog.text
    on_time = new_job()
    assert await redis_broker.enqueue_tick(queue_name, math.floor(now), on_time) is True
    assert await redis_broker.get(queue_name, on_time.id) is not None


async def test_a_tick_ahead_of_redis_clock_waits_for_it_and_stops_no_other_tick(
    redis_broker: RedisBroker, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # A scheduler whose clock ran 20 s ahead took its ticks 20 s early and recorded them as the
    # task's latest: once it stopped, the other schedulers' ticks up to them looked past, and the
    # task ran none for 20 s.
    async def redis_clock() -> float:
        seconds, microseconds = await client.time()
        return seconds + microseconds / 1e6

    now = await redis_clock()
    early = new_job()
    assert await redis_broker.enqueue_tick(queue_name, now + 20, early) is None  # not yet
    assert await redis_broker.get(queue_name, early.id) is None
    assert await redis_broker.enqueue_tick(queue_name, now - 0.5, new_job()) is True  # not past
    assert await redis_broker.enqueue_tick(queue_name, await redis_clock() + 0.5, new_job()) is True
    soon = await redis_clock() + 1.3  # over a second ahead: taken once Redis's clock comes near
    with anyio.fail_after(5):
        while (taken := await redis_broker.enqueue_tick(queue_name, soon, new_job())) is None:  # noqa: ASYNC110 - Redis's clock
            await anyio.sleep(0.02)
    assert taken is True
    assert await redis_clock() >= soon - 1.0


async def test_a_worker_whose_clock_runs_ahead_takes_no_tick_before_its_time(
    redis_url: str, client: redis.asyncio.Redis, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scheduler's own clock, 2 s ahead: it asks for a tick until Redis's clock is within a
    # second of it, and the run starts then, not 2 s early.
    skew = 2.0

    real_time = time.time
    ahead = SimpleNamespace(time=lambda: real_time() + skew, monotonic=time.monotonic)

    class AheadDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> AheadDatetime:  # type: ignore[override]
            return datetime.now(tz) + timedelta(seconds=skew)  # type: ignore[return-value]

    monkeypatch.setattr(runner_module, "time", ahead)
    monkeypatch.setattr(runner_module, "datetime", AheadDatetime)
    queue = Queue(redis_url, name=queue_name)
    keys = Keys(queue_name)
    lead: list[float] = []  # how far the run's tick was ahead of Redis's clock as it ran
    ran = anyio.Event()

    @queue.periodic(every(seconds=1))
    async def beat() -> None:
        seconds, microseconds = await client.time()
        tick = float(await client.hget(keys.prefix + "ticks", "beat"))
        lead.append(tick - (seconds + microseconds / 1e6))
        ran.set()

    async with queue, queue.worker():
        with anyio.fail_after(15):
            await ran.wait()
    assert lead[0] <= 1.0, lead  # 2 s before its time, was it taken when asked


async def test_a_broker_on_the_callers_client_connects_again_after_close(
    client: redis.asyncio.Redis, queue_name: str
) -> None:
    # The close keeps a client the caller gave, and let its pub/sub go: the waits that came after
    # found none (AssertionError) where other calls went on.
    broker = RedisBroker(client=client)
    try:
        await broker.connect()
        await broker.close()
        with anyio.fail_after(5):
            assert await broker.wait(queue_name, "never-enqueued", 1.0) is None
            await broker.lock_wait(queue_name, "free", 1.0)  # free: at once
        assert await client.ping()  # the caller's client is the caller's to close
    finally:
        await broker.close()


@pytest.mark.parametrize("how", ["aqueue's pool", "own client"])
async def test_a_stop_reaches_a_read_on_a_connection_redis_closed_while_idle(
    redis_url: str, client: redis.asyncio.Redis, queue_name: str, how: str
) -> None:
    # Redis closed the reader's idle connection (a restart, CLIENT KILL, its `timeout`): the read
    # reopened it under a new CLIENT ID while a stop unblocked the old id, and missed the read
    # (after a restart, the old id may be another client's).
    own = redis.asyncio.Redis.from_url(redis_url) if how == "own client" else None
    broker = RedisBroker(client=own) if own is not None else RedisBroker(redis_url)

    async def receive_and_stop_it() -> None:
        got: list[list[Any]] = []
        returned = anyio.Event()

        async def receiver() -> None:
            got.append(await broker.receive(queue_name, "w1", 1, 30, 5))
            returned.set()

        with anyio.fail_after(5):  # well under the receive's 30 s: the stop must reach it
            async with anyio.create_task_group() as tg:
                tg.start_soon(receiver)
                await anyio.wait_all_tasks_blocked()
                # The read may still be on its way to Redis: tried until it is blocked there.
                while not await broker.interrupt_receive(queue_name, "w1"):
                    with anyio.move_on_after(0.01):
                        await returned.wait()
                    assert not returned.is_set(), "the receive ended by itself"
        assert got == [[]]

    try:
        await receive_and_stop_it()
        reader = broker._readers["w1"]
        connection: Any = reader.client.connection
        assert await client.client_kill_filter(_id=await reader.connection_id()) == 1
        with anyio.fail_after(5):
            while not connection._reader.at_eof():  # the event loop reads the close
                await anyio.lowlevel.checkpoint()
        await receive_and_stop_it()
    finally:
        await broker.close()
        if own is not None:
            await own.aclose()


async def test_a_close_cuts_off_a_blocked_read_and_hands_its_connection_back_once(
    redis_url: str, client: redis.asyncio.Redis, queue_name: str
) -> None:
    # On a client the caller gave, the close handed a reader's connection back while its blocking
    # read still waited on it: the read ran on to its end, the caller's next command took the
    # connection and failed (two readers on one socket), and the read's end handed it back again.
    own = redis.asyncio.Redis.from_url(redis_url)
    broker = RedisBroker(client=own)
    failed: list[Exception] = []

    async def receiver() -> None:
        try:
            await broker.receive(queue_name, "w1", 1, 30, 5)
        except Exception as exc:
            failed.append(exc)

    try:
        await broker.connect()
        with anyio.fail_after(5):  # well under the read's 30 s: the close must end it
            async with anyio.create_task_group() as tg:
                tg.start_soon(receiver)
                await wait_for_blocked_client(redis_url)
                await broker.close()
        assert [type(exc) for exc in failed] == [BrokerConnectionError]  # cut off, said as such
        assert not own.connection_pool._in_use_connections  # handed back, once
        assert await own.set(f"{queue_name}:after", "v")  # the caller's client goes on
    finally:
        await broker.close()
        await own.aclose()


@pytest.mark.parametrize("how", ["aqueue's pool", "own client"])
async def test_a_blocking_read_longer_than_the_socket_timeout_is_no_lost_connection(
    redis_url: str, queue_name: str, how: str
) -> None:
    # With a socket timeout under the worker's one-second block (a URL's `socket_timeout=0.5`,
    # set for a quick failover), every idle read raised "no reply from Redis within 0.5 s", and
    # an idle worker took Redis for gone, again and again.
    own = None
    if how == "own client":
        own = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5)
        broker = RedisBroker(client=own)
    else:
        broker = RedisBroker(f"{redis_url}?socket_timeout=0.5")
    try:
        with anyio.fail_after(5):
            for _ in range(2):  # the first runs the receive script, the second blocks
                assert await broker.receive(queue_name, "w1", 1, 1.0, 5) == []
    finally:
        await broker.close()
        if own is not None:
            await own.aclose()


async def test_rate_limit_windows_are_those_of_redis_clock_not_the_callers(
    redis_url: str, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows were counted on each caller's clock: a host whose clock ran an hour ahead counted
    # in a window of its own, and the limit let through twice as much (every worker counts in the
    # same window only if they share one clock: Redis's).
    queue = Queue(redis_url, name=queue_name)
    limit = queue.rate_limit("api", limit=1, per=3600)
    try:
        async with limit:
            pass
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this host's clock, an hour ahead
        with pytest.raises(aqueue.RateLimitExceeded) as refused:
            async with limit:
                pytest.fail("admitted by a window of this host's clock")
        monkeypatch.setattr(time, "time", real)
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            seconds, micros = await client.time()
        finally:
            await client.aclose()
        now = seconds + micros / 1e6
        # Until the next window of Redis's clock.
        assert refused.value.retry_after == pytest.approx((math.floor(now / 3600) + 1) * 3600 - now, abs=1)
    finally:
        await queue.close()


async def test_get_many_stops_each_call_at_a_budget_of_bytes(
    redis_broker: RedisBroker, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A call of 200 whole records held Redis while it copied them: 200 records of 1 MB took 740 ms,
    # every other client waiting (and a reply of 200 records of 7 MB outlasted the socket_timeout).
    monkeypatch.setattr(redis_broker_module, "RECORDS_BUDGET", 10_000)
    payload = b"x" * 4_000
    ids = [f"big-{i}" for i in range(20)]
    await redis_broker.enqueue(queue_name, [NewJob(id=job_id, task="t", payload=payload) for job_id in ids])
    pages: list[int] = []
    run = redis_broker._run

    async def counted(queue: str, name: str, args: Any) -> Any:
        reply = await run(queue, name, args)
        if name == "records":
            pages.append(len(reply))
        return reply

    monkeypatch.setattr(redis_broker, "_run", counted)
    records = await redis_broker.get_many(queue_name, [*ids, "unknown"])
    assert [r.id if r else None for r in records] == [*ids, None]
    assert all(r.payload == payload for r in records if r)
    assert pages == [3, 3, 3, 3, 3, 3, 3]  # three records of 4 KB reach 10 KB; the last page's third is none
    listed = await redis_broker.jobs(queue_name, None, None, 100)  # a listing reads its records so too
    assert sorted(r.id for r in listed) == sorted(ids)
    assert len(pages) == 14
