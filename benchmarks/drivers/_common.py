"""What every driver shares: the job probe, worker processes, and the workloads themselves.

Stdlib only: this module is imported inside each library's own virtualenv, and by its worker processes.
A driver module (`<lib>_driver.py`) defines the library's tasks plus a `Driver` subclass with a few
hooks (enqueue one, enqueue a batch, fill the queue, one round trip, the worker command line).
Hooks may be sync or async: sync-only libraries are called as they are, from the same loop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAP = 0.05  # seconds each I/O-bound job sleeps


def redis_url() -> str:
    # Set by the harness to its private server; there is deliberately no default (never port 6379).
    url = os.environ.get("BENCH_REDIS_URL")
    if not url:
        raise SystemExit("BENCH_REDIS_URL is not set: run benchmarks through `python -m benchmarks.peers`")
    return url


def concurrency(default: int) -> int:
    """The worker's concurrency for libraries that only take it in code (BENCH_CONCURRENCY)."""
    return int(os.environ.get("BENCH_CONCURRENCY") or default)


# --- the probe: each job appends "start end" to a file --------------------------------------------------
# One O_APPEND write per job: no network round trip, atomic for short lines across threads and
# processes, and it survives fork-per-job workers (the fd is reopened in each new pid).

_probe: tuple[int, int, int] | None = None  # (pid, fd, session)


def record(start: float, jobs: int = 1) -> None:
    """Record `jobs` jobs that started at `start` and end now (jobs > 1: a batch, one write), with
    the session of the worker that ran them (each worker has its own; what it forks shares it)."""
    global _probe
    if _probe is None or _probe[0] != os.getpid():
        fd = os.open(os.environ["BENCH_PROBE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _probe = (os.getpid(), fd, os.getsid(0))
    os.write(_probe[1], b"%.6f %.6f %d\n" % (start, time.time(), _probe[2]) * jobs)


@dataclass
class Drain:
    """What the probe file says of a drain."""

    first: float  # the first job's start
    last: float  # the last job's end
    all_started: float  # when the last of the workers started its first job
    after_all_started: int  # jobs that started from then on
    workers: int  # workers that ran a job


def wait_for_jobs(path: str, n: int, timeout: float, workers: list[subprocess.Popen[bytes]],
                  on_all_started: Callable[[], None] | None = None) -> Drain:
    """Block until n jobs have recorded themselves. `on_all_started` is called once every worker
    has run a job (or, should one never, once all n are done)."""
    deadline = time.monotonic() + timeout
    seen, offset, partial = 0, 0, b""
    sessions: set[bytes] = set()
    while seen < n:
        if os.path.exists(path):
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            seen += len(lines)
            if on_all_started is not None:
                sessions.update(line.rsplit(b" ", 1)[1] for line in lines)
                if len(sessions) >= len(workers):
                    on_all_started()
                    on_all_started = None
        dead = [w for w in workers if w.poll() is not None]
        if dead:
            raise RuntimeError(f"worker exited with code {dead[0].returncode} after {seen}/{n} jobs")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timeout after {timeout:.0f}s with {seen}/{n} jobs done")
        time.sleep(0.01)
    if on_all_started is not None:
        on_all_started()
    starts, ends, firsts = [], [], {}
    with open(path, "rb") as f:
        for line in f:
            s, e, session = line.split()
            start = float(s)
            starts.append(start)
            ends.append(float(e))
            firsts[session] = min(firsts.get(session, start), start)
    all_started = max(firsts.values())
    return Drain(min(starts), max(ends), all_started, sum(1 for s in starts if s >= all_started),
                 len(firsts))


# --- worker processes ------------------------------------------------------------------------------------


def start_workers(cmd: list[str], procs: int, env: dict[str, str], log: str) -> list[subprocess.Popen[bytes]]:
    """Each worker in its own session, so its whole process tree can be measured and killed by pid."""
    pids_file = os.environ.get("BENCH_PIDS")
    workers = []
    with open(log, "ab") as out:
        for _ in range(procs):
            w = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            workers.append(w)
            if pids_file:  # the harness kills what is listed here if this driver dies first
                with open(pids_file, "a") as f:
                    f.write(f"{w.pid}\n")
    return workers


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of stat: the session id
                pids.append(int(entry))
    return pids


def peak_rss_mb(workers: list[subprocess.Popen[bytes]]) -> float:
    """Sum of VmHWM over every process of the workers' sessions (forked children included)."""
    total_kb = 0
    for w in workers:
        for pid in session_pids(w.pid):
            try:
                with open(f"/proc/{pid}/status") as f:
                    total_kb += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
            except (OSError, StopIteration):
                continue
    return total_kb / 1024


def redis_pid() -> int | None:
    """The benchmark Redis's pid (INFO server; it runs on this machine), to measure its CPU."""
    parts = urlsplit(redis_url())
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=5) as sock:
            sock.sendall(b"INFO server\r\n")
            reply = b""
            while b"process_id:" not in reply or not reply.endswith(b"\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return None
    for line in reply.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":")[1])
    return None


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (children that exited not included)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat
    return total / os.sysconf("SC_CLK_TCK")


def run_delay(pids: list[int]) -> float:
    """Seconds these processes have spent ready to run but waiting for a core (the second field of
    /proc/PID/schedstat, in ns): the cores they wanted beyond what the machine gave them."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def machine_ticks() -> tuple[int, int, int]:
    """The whole machine's CPU ticks so far (/proc/stat): all, idle (iowait included), stolen by
    the hypervisor."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return user + nice + system + idle + iowait + irq + softirq + steal, idle + iowait, steal


class _Sample(NamedTuple):
    """Counters read at one moment; a measurement is the difference of two."""

    at: float  # time.monotonic()
    worker_cpu: float  # seconds
    redis_cpu: float
    ticks: tuple[int, int, int]  # see machine_ticks
    worker_delay: float  # seconds waited for a core (see run_delay)
    redis_delay: float


class CpuMeter:
    """Cores kept busy by the workers and by Redis, from the first job seen to the last; the
    machine's cores left idle or stolen by the hypervisor meanwhile (what else could have run);
    and the cores the workers and Redis waited for, ready to run while others ran (what more cores
    would have given them)."""

    def __init__(self, workers: list[subprocess.Popen[bytes]]) -> None:
        self.workers, self.redis = workers, redis_pid()
        self.start: _Sample | None = None

    def _sample(self) -> _Sample:
        pids = [pid for w in self.workers for pid in session_pids(w.pid)]
        redis_ = [self.redis] if self.redis else []
        return _Sample(time.monotonic(), cpu_seconds(pids), cpu_seconds(redis_), machine_ticks(),
                       run_delay(pids), run_delay(redis_))

    def begin(self) -> None:
        self.start = self._sample()

    def result(self) -> dict[str, float]:
        start = self.start
        if start is None or self.redis is None:
            return {}
        end = self._sample()
        wall = end.at - start.at
        if wall < 0.2:  # too short for clock ticks of 10 ms to say anything
            return {}
        ticks = [b - a for a, b in zip(start.ticks, end.ticks, strict=True)]
        cores = os.cpu_count() or 1
        return {"worker_cpu": (end.worker_cpu - start.worker_cpu) / wall,
                "redis_cpu": (end.redis_cpu - start.redis_cpu) / wall,
                "idle_cores": cores * ticks[1] / ticks[0] if ticks[0] else 0.0,
                "stolen_cores": cores * ticks[2] / ticks[0] if ticks[0] else 0.0,
                "worker_waiting": (end.worker_delay - start.worker_delay) / wall,
                "redis_waiting": (end.redis_delay - start.redis_delay) / wall}


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    # Measurements are taken already: SIGKILL the whole session, no graceful shutdown to wait for.
    for w in workers:
        try:
            os.killpg(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for w in workers:
        w.wait(timeout=10)


# --- the driver interface and the workloads --------------------------------------------------------------


async def call(hook: Callable[..., Any], *args: Any) -> Any:
    result = hook(*args)
    return await result if inspect.isawaitable(result) else result


class Driver:
    """One library. Subclasses set the hooks; `bulk_na` says why a library has no batch enqueue."""

    bulk_na: str | None = None
    io_na: str | None = None

    def worker_cmd(self, concurrency: int | None, kind: str) -> tuple[list[str], dict[str, str]]:
        """Command line and extra environment of one worker process (concurrency None = default)."""
        raise NotImplementedError

    def open(self) -> Awaitable[None] | None:
        return None

    def close(self) -> Awaitable[None] | None:
        return None

    def enqueue_one(self) -> Any:
        """Enqueue one no-op job."""
        raise NotImplementedError

    def enqueue_bulk(self, n: int, kind: str) -> Any:
        """Enqueue n jobs of `kind` ("noop" or "nap") with the library's batch API."""
        raise NotImplementedError

    def fill(self, n: int, kind: str) -> Any:
        """Queue n jobs before a worker starts (not timed): the fastest way the library offers."""
        return self.enqueue_bulk(n, kind)

    def round_trip(self, i: int) -> Any:
        """Enqueue echo(i) and wait for its result (10 s at most)."""
        raise NotImplementedError


async def gather_chunks(enqueue: Callable[[], Awaitable[Any]], n: int, size: int = 100) -> None:
    """Bulk enqueue for libraries without a batch API: `size` enqueues in flight at a time."""
    for done in range(0, n, size):
        await asyncio.gather(*(enqueue() for _ in range(min(size, n - done))))


async def w_enqueue(d: Driver, n: int) -> dict[str, Any]:
    await call(d.open)
    try:
        start = time.perf_counter()
        for _ in range(n):
            await call(d.enqueue_one)
        out: dict[str, Any] = {"one": n / (time.perf_counter() - start)}
        if d.bulk_na:
            out["bulk_na"] = d.bulk_na
        else:
            start = time.perf_counter()
            await call(d.enqueue_bulk, n, "noop")
            out["bulk"] = n / (time.perf_counter() - start)
    finally:
        await call(d.close)
    return out


async def w_drain(d: Driver, n: int, conc: int | None, procs: int, kind: str, timeout: float,
                  workdir: str) -> dict[str, Any]:
    if kind == "nap" and d.io_na:
        return {"na": d.io_na}
    await call(d.open)
    try:
        await call(d.fill, n, kind)
    finally:
        await call(d.close)
    probe = os.path.join(workdir, "probe")
    cmd, env = d.worker_cmd(conc, kind)
    env = {**env, "BENCH_PROBE": probe}
    workers = start_workers(cmd, procs, env, os.path.join(workdir, "worker.log"))
    meter = CpuMeter(workers)
    try:
        drain = wait_for_jobs(probe, n, timeout, workers, meter.begin)
        rss = peak_rss_mb(workers)
        cpu = meter.result()
    finally:
        stop_workers(workers)
    shown = [f"{k}={v}" for k, v in env.items() if k == "BENCH_CONCURRENCY" and v] + cmd
    out = {"seconds": drain.last - drain.first, "rate": n / (drain.last - drain.first),
           "rss_mb": rss, **cpu, "cmd": shown}
    if procs > 1:
        # A worker's start-up is no part of the drain: with several, the rate counts from the moment
        # the last of them started its first job (what came before is out of the CPU meter's window
        # too). The whole window's rate is kept beside it.
        out["whole_rate"], out["skew"] = out["rate"], drain.all_started - drain.first
        out["workers_with_jobs"] = drain.workers
        if drain.workers == procs and drain.last > drain.all_started:
            out["rate"] = drain.after_all_started / (drain.last - drain.all_started)
    return out


async def w_latency(d: Driver, rounds: int, cap: float, workdir: str) -> dict[str, Any]:
    cmd, env = d.worker_cmd(None, "echo")
    workers = start_workers(cmd, 1, env, os.path.join(workdir, "worker.log"))
    try:
        await call(d.open)
        try:
            # The first round trip waits out the worker's start-up; it is not counted. It may be
            # tried again (a job finishing while the worker starts must not fail the whole run).
            warmup_failures = 0
            while True:
                try:
                    async with asyncio.timeout(30):  # (in this task: some clients are task-bound)
                        await call(d.round_trip, -1)
                    break
                except Exception:
                    warmup_failures += 1
                    if warmup_failures == 3:
                        raise
            samples = []
            stop_at = time.monotonic() + cap
            for i in range(rounds):
                t = time.perf_counter()
                try:
                    async with asyncio.timeout(15):
                        value = await call(d.round_trip, i)
                except Exception as exc:
                    raise RuntimeError(f"round trip {i + 1} of {rounds}: {type(exc).__name__} {exc}") from exc
                if value != i:
                    raise RuntimeError(f"round trip {i + 1} returned {value!r}, not {i}")
                samples.append((time.perf_counter() - t) * 1000)
                if time.monotonic() > stop_at:
                    break
        finally:
            await call(d.close)
        rss = peak_rss_mb(workers)  # a worker that never had more than one job at a time
    finally:
        stop_workers(workers)
    samples.sort()
    return {"p50": statistics.median(samples), "p99": samples[max(0, int(len(samples) * 0.99) - 1)],
            "rounds": len(samples), "warmup_failures": warmup_failures, "rss_mb": rss}


def run(d: Driver, argv: list[str]) -> None:
    """`python -m benchmarks.drivers LIB WORKLOAD [options]`: prints one `BENCH-RESULT {json}` line."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["enqueue", "drain", "io", "latency"])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=150)
    parser.add_argument("--cap", type=float, default=20, help="seconds at most for the latency rounds")
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    try:
        if args.workload == "enqueue":
            coro = w_enqueue(d, args.n)
        elif args.workload == "latency":
            coro = w_latency(d, args.n, args.cap, args.workdir)
        else:
            kind = "noop" if args.workload == "drain" else "nap"
            coro = w_drain(d, args.n, args.concurrency, args.procs, kind, args.timeout, args.workdir)
        out = asyncio.run(coro)
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print("BENCH-RESULT " + json.dumps(out), flush=True)
    sys.stdout.flush()
