"""What the chaos scenarios share: worker processes, a TCP proxy that can cut or slow connections,
waiting for jobs (by polling the state another process writes, with a deadline) and the accounting."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from aqueue import Queue
from aqueue.brokers._keys import Keys
from tests.chaos.apps import chaos_app
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.chaos.apps.chaos_app:queue"
FINAL = {b"succeeded", b"failed", b"cancelled", b"revoked", b"expired"}

FIGURES: list[str] = []
"""One line per scenario, printed at the end of the run (conftest.pytest_terminal_summary)."""


def left(started: float, budget: float = 40.0) -> float:
    """What is left of a test's time budget (at least 5 s) for waiting on its jobs."""
    return max(5.0, budget - (time.monotonic() - started))


def report(line: str) -> None:
    print(line)
    FIGURES.append(line)


def report_scenario(title: str, acc: Accounting | None, extra: str, problems: Sequence[str] = ()) -> None:
    """The scenario's figures, then the duplicates under live workers and suspicious log lines."""
    report(f"[{title}] {acc.line() + ' ' if acc else ''}{extra}")
    if acc is not None:
        for line in acc.dup_while_alive[:5]:
            report(f"    ran twice under a live worker: {line}")
        for job_id, why in acc.lost[:5]:
            report(f"    LOST {job_id}: {why}")
        for job_id, why in acc.dead_unexpected[:5]:
            report(f"    unexpected dead letter {job_id}: {why}")
    for line in problems[:10]:
        report(f"    log: {line}")


# --- worker processes ------------------------------------------------------------------------------


class WorkerProcess:
    """`python -m aqueue run tests.chaos.apps.chaos_app:queue` with its log in a file."""

    def __init__(self, log: Path, url: str, name: str, probe_url: str, *, visibility: float,
                 concurrency: int = 50, shutdown_timeout: float | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log = log
        self.concurrency = concurrency
        environ = {**os.environ, "AQUEUE_URL": url, "AQUEUE_QUEUE": name, "CHAOS_PROBE_URL": probe_url,
                   "AQUEUE_VISIBILITY": str(visibility), **(env or {})}
        environ["PYTHONPATH"] = str(ROOT)
        flags = ["--concurrency", str(concurrency)]
        if shutdown_timeout is not None:
            flags += ["--shutdown-timeout", str(shutdown_timeout)]
        with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen([sys.executable, "-m", "aqueue", "run", APP, *flags],
                                            cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=stderr)
        self.pid = self.process.pid
        self.killed_at: float | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    async def started(self, timeout: float = 20) -> None:
        """Its start-up line is logged: connected, signal handlers in place."""
        with anyio.fail_after(timeout):
            while f"concurrency {self.concurrency}" not in self.output():
                assert self.alive(), f"worker exited {self.process.returncode}:\n{self.output()}"
                await anyio.sleep(0.02)

    def kill(self) -> None:
        """kill -9: no chance to hand anything back."""
        self.killed_at = time.time()
        self.process.kill()
        self.process.wait(timeout=10)

    async def terminate(self, timeout: float = 40) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(timeout):
            while self.process.poll() is None:  # noqa: ASYNC110 - another process
                await anyio.sleep(0.02)
        return self.process.returncode

    def problems(self) -> list[str]:
        """Log lines that point at a fault of aqueue's own rather than at the injected one."""
        lines = self.output().splitlines()
        return [line for line in lines
                if "Traceback" in line or "internal error" in line or " ERROR " in line
                or "CRITICAL" in line]


class Workers:
    """The worker processes of one test; whatever is left running is killed at the end."""

    def __init__(self, tmp: Path, url: str, name: str, probe_url: str, **defaults: Any) -> None:
        self.tmp, self.url, self.name, self.probe_url, self.defaults = tmp, url, name, probe_url, defaults
        self.all: list[WorkerProcess] = []

    def start(self, **options: Any) -> WorkerProcess:
        opts = {**self.defaults, **options}
        w = WorkerProcess(self.tmp / f"worker-{len(self.all)}.log", opts.pop("url", self.url), self.name,
                          self.probe_url, **opts)
        self.all.append(w)
        return w

    def killed(self) -> dict[int, float]:
        """pid -> when it was killed, for the workers killed so far."""
        return {w.pid: w.killed_at for w in self.all if w.killed_at is not None}

    def problems(self) -> list[str]:
        return [f"[worker pid {w.pid}] {line}" for w in self.all for line in w.problems()]

    def cleanup(self) -> None:
        for w in self.all:
            if w.alive():
                w.process.kill()
            w.process.wait(timeout=10)


def client_queue(url: str, name: str) -> Queue:
    """A producer's queue with the worker's tasks under their names."""
    q = Queue(url, name=name)
    for task in chaos_app.queue.tasks.values():
        q.task(name=task.name)(task.fn)
    return q


# --- a TCP proxy between the workers and Redis -------------------------------------------------------


class Proxy:
    """Forwards 127.0.0.1:port to Redis on its own event loop in a thread. `cut()` drops every open
    connection (both sides reset); `delay` holds data flowing server→client that many seconds."""

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.delay = delay
        self.accepted = 0
        self.cuts = 0
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="chaos-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> Proxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        self.accepted += 1
        pair = (client_w, server_w)
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pump(client_r, server_w, 0.0),
                                 self._pump(server_r, client_w, self.delay), return_exceptions=True)
        finally:
            self._conns.discard(pair)
            client_w.transport.abort()
            server_w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            if delay <= 0:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                return
            # Delayed: each chunk leaves `delay` seconds after it arrived, in order, without
            # limiting throughput (replies pipelined behind one another are all delayed once).
            held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

            async def send() -> None:
                while True:
                    due, data = await held.get()
                    if not data:
                        return
                    wait = due - self._loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    writer.write(data)
                    await writer.drain()

            sender = asyncio.ensure_future(send())
            try:
                while data := await reader.read(65536):
                    held.put_nowait((self._loop.time() + delay, data))
                held.put_nowait((0.0, b""))
                await sender
            finally:
                sender.cancel()
        finally:
            writer.transport.abort()  # one side gone: so is the other

    async def _cut(self) -> int:
        conns = list(self._conns)
        for client_w, server_w in conns:
            client_w.transport.abort()
            server_w.transport.abort()
        return len(conns)

    async def cut(self) -> int:
        """Drop every open connection now; returns how many."""
        self.cuts += 1
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._cut(), self._loop))

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()


# --- waiting and accounting --------------------------------------------------------------------------


async def states(client: aioredis.Redis, name: str, ids: list[str]) -> list[bytes | None]:
    keys = Keys(name)
    async with client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(keys.job(job_id), "state")
        return await pipe.execute()


async def wait_final(url: str, name: str, ids: Iterable[str], timeout: float) -> None:
    """Poll (the state lives in other processes) until every job is final, with a deadline; on
    timeout, fail naming what is left."""
    remaining = list(ids)
    client = aioredis.Redis.from_url(url)
    try:
        with anyio.move_on_after(timeout):
            while remaining:
                try:
                    found = await states(client, name, remaining)
                except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
                    await anyio.sleep(0.1)  # the server is restarting: poll again
                    continue
                remaining = [i for i, s in zip(remaining, found, strict=True) if s not in FINAL]
                if remaining:
                    await anyio.sleep(0.1)
        if remaining:
            found = await states(client, name, remaining)
            left = collections.Counter((s or b"(no record)").decode() for s in found)
            sample = await client.hgetall(Keys(name).job(remaining[0]))
            raise AssertionError(f"{len(remaining)} job(s) not final after {timeout}s: {dict(left)}; "
                                 f"e.g. {remaining[0]}: {sample}")
    finally:
        await client.aclose()


@dataclass
class Execution:
    job: str
    attempt: int
    pid: int
    at: float


def parse(raw: Sequence[bytes | str]) -> list[Execution]:
    out = []
    for line in raw:
        text = line.decode() if isinstance(line, bytes) else line
        job, attempt, pid, at = text.split("|")
        out.append(Execution(job, int(attempt), int(pid), float(at)))
    return out


@dataclass
class Accounting:
    total: int = 0
    succeeded: int = 0
    dead_expected: int = 0
    dead_unexpected: list[tuple[str, str]] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    ran_more_than_once: int = 0
    """Jobs with an attempt whose body started more than once (redelivered)."""
    completed_more_than_once: int = 0
    """Jobs with an attempt whose body ran to its end more than once."""
    dup_while_alive: list[str] = field(default_factory=list)
    """Starts of an attempt that had already started in a worker that was alive, not killed (nor
    interrupted by a shutdown) at the time: the lease lapsed under a live worker."""

    def line(self) -> str:
        return (f"jobs={self.total} succeeded={self.succeeded} dead(expected)={self.dead_expected} "
                f"dead(unexpected)={len(self.dead_unexpected)} lost={len(self.lost)} "
                f"ran-more-than-once={self.ran_more_than_once} "
                f"completed-more-than-once={self.completed_more_than_once} "
                f"dup-while-worker-alive={len(self.dup_while_alive)}")


DEAD = object()
"""Expected outcome of a job meant to end in the dead letters."""


async def account(url: str, probe_url: str, name: str, expected: dict[str, Any],
                  killed: Mapping[int, float] | None = None) -> Accounting:
    """Every job must have succeeded with exactly its expected value or be in the dead letters with a
    reason; executions are counted from the probe records."""
    acc = Accounting(total=len(expected))
    async with client_queue(url, name) as q:
        dead = {info.id: info for info in await q.dead_letters(limit=len(expected) + 10_000)}
        ids = list(expected)
        infos: list[Any] = []
        for chunk in range(0, len(ids), 100):
            infos += await asyncio.gather(*(q.job(i).info() for i in ids[chunk:chunk + 100]))
    for job_id, info in zip(ids, infos, strict=True):
        want = expected[job_id]
        if info is None:
            acc.lost.append((job_id, "no record"))
        elif info.state == "succeeded":
            if want is DEAD or info.result != want:
                acc.lost.append((job_id, f"succeeded with {info.result!r}, expected {want!r}"))
            else:
                acc.succeeded += 1
        elif info.state == "failed":
            if job_id not in dead or not dead[job_id].dead_reason:
                acc.lost.append((job_id, f"failed, not in the dead letters with a reason "
                                         f"(reason {info.dead_reason!r})"))
            elif want is DEAD:
                acc.dead_expected += 1
            else:
                acc.dead_unexpected.append((job_id, str(info.dead_reason)))
        else:
            acc.lost.append((job_id, f"state {info.state}"))

    probe = aioredis.Redis.from_url(probe_url)
    try:
        starts = parse(await probe.lrange(f"chaos:{name}:starts", 0, -1))
        ends = parse(await probe.lrange(f"chaos:{name}:ends", 0, -1))
        interrupted = parse(await probe.lrange(f"chaos:{name}:interrupted", 0, -1))
    finally:
        await probe.aclose()
    killed = killed or {}
    stopped = {(e.job, e.attempt, e.pid) for e in interrupted}
    by_attempt: dict[tuple[str, int], list[Execution]] = collections.defaultdict(list)
    for e in sorted(starts, key=lambda e: e.at):
        by_attempt[(e.job, e.attempt)].append(e)
    redelivered: set[str] = set()
    for (job, attempt), runs in by_attempt.items():
        if len(runs) > 1:
            redelivered.add(job)
        for later in runs[1:]:
            earlier = [r for r in runs if r.at < later.at]
            # Legitimate if every earlier run was killed (before this start) or interrupted.
            excused = all(
                (r.pid in killed and killed[r.pid] <= later.at + 0.5)
                or (r.job, r.attempt, r.pid) in stopped
                for r in earlier
            )
            if not excused:
                history = sorted((e for e in [*starts, *ends] if e.job == job), key=lambda e: e.at)
                acc.dup_while_alive.append(
                    f"{job} attempt {attempt}: " + ", ".join(
                        f"{'start' if e in starts else 'end'} #{e.attempt} {e.at:.3f} pid {e.pid}"
                        for e in history))
                break
    acc.ran_more_than_once = len(redelivered)
    done = collections.Counter((e.job, e.attempt) for e in ends)
    acc.completed_more_than_once = len({job for (job, _), n in done.items() if n > 1})
    return acc


def mixed_calls(count: int, seed: int, weights: Sequence[int]) -> list[tuple[int, str, int]]:
    """`work` calls: instant, sleeping 10-200 ms, flaky (retried) or doomed, drawn with `weights`."""
    rng = random.Random(seed)
    kinds = rng.choices(["instant", "sleep", "flaky", "doomed"], weights=weights, k=count)
    return [(i, kind, rng.randint(10, 200)) for i, kind in enumerate(kinds)]


async def enqueue_in_waves(
    work: Any, calls: list[tuple[int, str, int]], waves: int, pause: float, expected: dict[str, Any]
) -> None:
    """Enqueue `calls` in `waves` bulk groups `pause` seconds apart (load while faults happen),
    recording what each job must end with."""
    per = len(calls) // waves
    for wave in range(waves):
        chunk = calls[wave * per:(wave + 1) * per]
        group = await work.map(chunk)
        for job, (i, kind, _ms) in zip(group.jobs, chunk, strict=True):
            expected[job.id] = DEAD if kind == "doomed" else i * 2
        await anyio.sleep(pause)
