"""What one awaited enqueue is made of: W1's one-by-one column taken apart.

    python -m benchmarks.round_trip [--jobs 20000] [--rounds 2] [--awake]

For aqueue, a raw XADD and huey (when `python -m benchmarks.peers` has installed its venv), each
through its W1 driver on one private redis-server, and "multi", aqueue's writes sent without its
script (one MULTI/EXEC of the same commands; benchmarks/drivers/multi_driver.py, not a queue): the
wall time of a round trip, the producer's CPU (getrusage) and Redis's (INFO cpu, user and kernel) per
enqueue. Then a one-byte round trip over pipes between two processes on two cores and on one: what
waking a process on another core costs on this machine, whatever the queue. `--awake` keeps every
core busy with a loop at the lowest priority (SCHED_IDLE) meanwhile, so that no wake-up finds a core
asleep. Each library runs once per round, after one unrecorded run of the raw XADD that lets the
fresh Redis grow its memory.
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
from benchmarks.peers import LIBS, ROOT, venv_python

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
        print(json.dumps({"wall": wall, "user": after.ru_utime - before.ru_utime,
                          "sys": after.ru_stime - before.ru_stime}), flush=True)
        sys.stdin.readline()  # closed only once Redis's CPU has been read
    finally:
        await c.call(driver.close)

asyncio.run(main())
"""


def interpreters() -> dict[str, tuple[str, str]]:
    """Each library measured, with the Python it runs under (its benchmark venv, else, for aqueue and
    raw, which need nothing but this tree, this interpreter; huey only from its venv) and its driver."""
    libs = {lib.name: lib for lib in LIBS}
    found = {}
    for name in ("aqueue", "raw", "huey"):
        python = venv_python(libs[name])
        if os.path.exists(python):
            found[name] = (python, libs[name].driver)
        elif name != "huey":
            found[name] = (sys.executable, libs[name].driver)
    # aqueue's writes without its script, as one MULTI/EXEC (benchmarks/drivers/multi_driver.py)
    found["multi"] = (found["aqueue"][0], "multi")
    return found


def measure(lib: str, python: str, driver: str, url: str, jobs: int) -> dict[str, float]:
    """Per enqueue, in µs: wall time, the producer's user and kernel CPU, Redis's."""
    client = redis.Redis.from_url(url)
    client.flushall()
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": path}
    proc = subprocess.Popen([python, "-c", PRODUCER, driver, str(jobs), str(WARM_UP)], cwd=ROOT, env=env,
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{lib}: the producer did not start")
        before = client.info("cpu")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        after = client.info("cpu")
        if not line:
            raise SystemExit(f"{lib}: the producer failed")
        producer = json.loads(line)
    finally:
        proc.stdin.close()  # lets the producer close its connection and exit
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
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


def pipe_round_trip(cores: tuple[int, int], rounds: int = 20_000, warm_up: int = 100) -> float:
    """µs per one-byte round trip between this process and a child, each pinned to its core."""
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The child never returns into the caller's code (its cleanup is the parent's to run).
        try:
            os.close(from_parent)
            os.close(to_parent)
            os.sched_setaffinity(0, {cores[1]})
            while os.read(to_child, 1):  # until the parent closes its end
                os.write(from_child, b"x")
        finally:
            os._exit(0)
    os.close(to_child)
    os.close(from_child)
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cores[0]})
        for _ in range(warm_up):
            os.write(from_parent, b"x")
            os.read(to_parent, 1)
        start = time.perf_counter()
        for _ in range(rounds):
            os.write(from_parent, b"x")
            os.read(to_parent, 1)
        return (time.perf_counter() - start) / rounds * 1e6
    finally:
        os.sched_setaffinity(0, mask)
        os.close(from_parent)
        os.close(to_parent)
        os.waitpid(pid, 0)


@contextlib.contextmanager
def cores_kept_awake(enabled: bool) -> Iterator[None]:
    """A busy loop at SCHED_IDLE on every core: runs only when nothing else wants the core."""
    if not enabled:
        yield
        return
    code = "import os; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True: pass"
    loops = [subprocess.Popen([sys.executable, "-c", code]) for _ in os.sched_getaffinity(0)]
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
    if args.jobs < 1 or args.rounds < 1:
        parser.error("--jobs and --rounds must be at least 1")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("needs two cores")
    columns = ["wall", "producer user", "producer kernel", "redis user", "redis kernel"]
    with private_redis() as url, cores_kept_awake(args.awake):
        print(f"one awaited enqueue, µs ({args.jobs:,} each{', cores kept awake' if args.awake else ''})")
        print(f"{'':8}" + "".join(f"{c:>17}" for c in columns))
        libs = interpreters()
        # A fresh Redis grows its memory on the first run: page faults that later runs never pay.
        measure("raw", *libs["raw"], url, args.jobs)
        for _ in range(args.rounds):
            for lib, (python, driver) in libs.items():
                row = measure(lib, python, driver, url, args.jobs)
                print(f"{lib:8}" + "".join(f"{row[c]:17.1f}" for c in columns))
        print("\none-byte round trip over pipes, µs")
        print(f"  two cores  {pipe_round_trip((cores[0], cores[1])):6.1f}")
        print(f"  one core   {pipe_round_trip((cores[0], cores[0])):6.1f}")


if __name__ == "__main__":
    main()
