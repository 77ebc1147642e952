"""What one awaited enqueue is made of: W1's one-by-one column taken apart.

    python -m benchmarks.round_trip [--jobs 20000] [--awake]

For aqueue, a raw XADD and huey (when `python -m benchmarks.peers` has installed its venv), each
through its W1 driver on one private redis-server: the wall time of a round trip, the producer's CPU
(getrusage) and Redis's (INFO cpu, user and kernel) per enqueue. Then a one-byte round trip over
pipes between two processes on two cores and on one: what waking a process on another core costs
on this machine, whatever the queue. `--awake` keeps both cores busy with a loop at the lowest
priority (SCHED_IDLE) meanwhile, so that no wake-up finds a core asleep. Each library runs once per
round, after one unrecorded run that lets the fresh Redis grow its memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import redis

from benchmarks._redis_server import private_redis

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, ".peers")
WARM_UP = 500

# Run in the library's own interpreter: enqueue one by one through its driver, print CPU per job.
PRODUCER = """
import asyncio, json, resource, sys, time
from benchmarks.drivers import _common as c
import importlib
driver = importlib.import_module(f"benchmarks.drivers.{sys.argv[1]}_driver").Driver()
n, warm_up = int(sys.argv[2]), int(sys.argv[3])

async def main():
    await c.call(driver.open)
    try:
        for _ in range(warm_up):
            await c.call(driver.enqueue_one)
        print("ready", flush=True)
        sys.stdin.readline()
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(n):
            await c.call(driver.enqueue_one)
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await c.call(driver.close)
    print(json.dumps({"wall": wall, "user": after.ru_utime - before.ru_utime,
                      "sys": after.ru_stime - before.ru_stime}), flush=True)

asyncio.run(main())
"""


def interpreters() -> dict[str, str]:
    """Each library measured, with the Python it runs under."""
    own = os.path.join(PEERS, "aqueue", "bin", "python")
    found = {"aqueue": own if os.path.exists(own) else sys.executable}
    found["raw"] = found["aqueue"]
    huey = os.path.join(PEERS, "huey", "bin", "python")
    if os.path.exists(huey):
        found["huey"] = huey
    return found


def measure(lib: str, python: str, url: str, jobs: int) -> dict[str, float]:
    """Per enqueue, in µs: wall time, the producer's user and kernel CPU, Redis's."""
    client = redis.Redis.from_url(url)
    client.flushall()
    env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([python, "-c", PRODUCER, lib, str(jobs), str(WARM_UP)], cwd=ROOT, env=env,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"{lib}: the producer did not start")
    before = client.info("cpu")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    producer = json.loads(proc.stdout.readline())
    after = client.info("cpu")
    proc.wait()
    client.close()
    per_job = 1e6 / jobs
    return {
        "wall": producer["wall"] * per_job,
        "producer user": producer["user"] * per_job,
        "producer kernel": producer["sys"] * per_job,
        "redis user": (after["used_cpu_user"] - before["used_cpu_user"]) * per_job,
        "redis kernel": (after["used_cpu_sys"] - before["used_cpu_sys"]) * per_job,
    }


def pipe_round_trip(cores: tuple[int, int], rounds: int = 20_000) -> float:
    """µs per one-byte round trip between this process and a child, each pinned to its core."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {cores[1]})
        for _ in range(rounds + 100):
            os.read(to_child, 1)
            os.write(from_child, b"x")
        os._exit(0)
    os.sched_setaffinity(0, {cores[0]})
    try:
        for i in range(rounds + 100):
            if i == 100:
                start = time.perf_counter()
            os.write(from_parent, b"x")
            os.read(to_parent, 1)
        return (time.perf_counter() - start) / rounds * 1e6
    finally:
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)


@contextlib.contextmanager
def cores_kept_awake(enabled: bool) -> Iterator[None]:
    """A busy loop at SCHED_IDLE on every core: runs only when nothing else wants the core."""
    if not enabled:
        yield
        return
    code = "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True: pass"
    loops = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2, help="each library once per round")
    parser.add_argument("--awake", action="store_true", help="keep every core busy at SCHED_IDLE")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("needs two cores")
    columns = ["wall", "producer user", "producer kernel", "redis user", "redis kernel"]
    with private_redis() as url, cores_kept_awake(args.awake):
        print(f"one awaited enqueue, µs ({args.jobs:,} each{', cores kept awake' if args.awake else ''})")
        print(f"{'':8}" + "".join(f"{c:>17}" for c in columns))
        libs = interpreters()
        # A fresh Redis grows its memory on the first run: page faults that later runs never pay.
        measure("raw", libs["raw"], url, args.jobs)
        for _ in range(args.rounds):
            for lib, python in libs.items():
                row = measure(lib, python, url, args.jobs)
                print(f"{lib:8}" + "".join(f"{row[c]:17.1f}" for c in columns))
        print("\none-byte round trip over pipes, µs")
        print(f"  two cores  {pipe_round_trip((0, 1)):6.1f}")
        print(f"  one core   {pipe_round_trip((0, 0)):6.1f}")


if __name__ == "__main__":
    main()
