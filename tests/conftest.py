"""Shared fixtures: a private redis-server for the session, and brokers/queues on both backends."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import redis
import redis.asyncio

from aqueue import Queue
from aqueue.brokers import Broker, MemoryBroker, RedisBroker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server process of the tests' own."""

    port: int
    process: subprocess.Popen[bytes]
    dir: Path
    extra: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def start(self) -> None:
        """(Re)start on the same port."""
        self.process = _spawn(self.port, self.dir, self.extra)


def _spawn(port: int, directory: Path, extra: tuple[str, ...]) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: the Redis tests cannot run (apt-get install redis-server)")
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory), *extra]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, password=_password(extra))
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server on port {port} did not start")
            time.sleep(0.02)  # waiting for a process to start listening: nothing to wait on
        finally:
            client.close()
    return process


def _password(extra: tuple[str, ...]) -> str | None:
    if "--requirepass" in extra:
        return extra[extra.index("--requirepass") + 1]
    return None


def start_redis(*extra: str) -> RedisServer:
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="aqueue-redis-"))
    return RedisServer(port=port, process=_spawn(port, directory, extra), dir=directory, extra=extra)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def broker(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    b: Broker
    if backend == "memory":
        b = MemoryBroker()
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        b = RedisBroker(server.url)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def queue_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _no_proxy_env() -> Iterator[None]:
    # Subprocess tests inherit the environment; make sure the project is importable from them.
    root = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root if not old else f"{root}{os.pathsep}{old}"
    yield
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


@pytest.fixture
async def queue(broker: Broker, queue_name: str) -> AsyncIterator[Queue]:
    """A queue with a fresh name on each backend; short visibility timeout for redelivery tests."""
    q = Queue(broker=broker, name=queue_name, visibility_timeout=2)
    return q


async def drained(queue: Queue, job_ids: list[str], timeout: float = 10) -> None:
    """Wait (without sleeping) until every job reached a final state."""
    with anyio.fail_after(timeout):
        for job_id in job_ids:
            await queue.broker.wait(queue.name, job_id, None)


def wait_for_stop(*, raise_it: bool = False) -> None:
    """In a job's thread: poll for the stop, as a long loop of sync code would, and return (or
    let the cancellation out) once it comes."""
    while True:
        try:
            anyio.from_thread.check_cancelled()
        except asyncio.CancelledError:  # what check_cancelled raises on asyncio
            if raise_it:
                raise
            return
        time.sleep(0.005)


async def wait_for_blocked_client(redis_url: str) -> None:
    """Until a client of the server is blocked in a command (polled, under a deadline)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        with anyio.fail_after(10):
            while True:
                if (await client.info("clients"))["blocked_clients"]:
                    return
                await anyio.sleep(0.01)
    finally:
        await client.aclose()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    """Under CI nothing may skip: a skipped Redis test would hide a broken broker."""
    skipped = terminalreporter.stats.get("skipped", [])
    if os.environ.get("CI") and skipped:
        terminalreporter.write_line(f"CI: {len(skipped)} test(s) skipped; failing the run", red=True)
        terminalreporter._session.exitstatus = pytest.ExitCode.TESTS_FAILED
