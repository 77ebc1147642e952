"""aqueue side by side with its peers, and with bare Redis Streams as the physical limit.

    python -m benchmarks.peers                  # everything, 3 runs each; writes benchmarks/RESULTS.md
    python -m benchmarks.peers --quick          # N / 10, to check the harness
    python -m benchmarks.peers --only aqueue,arq

Each library is installed from PyPI into its own virtualenv under benchmarks/.peers/<name>/ and its
workloads run there, as `python -m benchmarks.drivers <lib> <workload>` (benchmarks/drivers/), which
starts the library's own worker processes and prints one JSON line of measurements. Redis is a private
server for the run, flushed before every run. A partial run (--quick, --only) writes
benchmarks/.peers/RESULTS-partial.md instead of RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from benchmarks._redis_server import private_redis
from benchmarks.drivers._common import session_pids

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, ".peers")

N_JOBS, N_IO, N_ROUNDS = 20_000, 5_000, 500
IO_CONCURRENCY = 500
LATENCY_CAP = 10.0  # seconds of W4 round trips at most (polling peers take up to 0.5 s a round)
SLOW_RUN = 40.0  # a peer's run that took longer than this is not repeated: keeps the whole run near 30 min
RUN_TIMEOUT = 240.0  # a driver still running after this is killed, with its workers


@dataclass
class Lib:
    name: str
    packages: list[str]  # pip install arguments, into the library's own venv
    dists: list[str]  # distributions whose versions are reported
    tuned: int | None  # concurrency of the "tuned" W2 and W5 workers (threads, slots or async jobs)
    venv: str = ""  # defaults to the name
    overrides: dict[str, int] = field(default_factory=dict)  # cell -> job count, when N is impractical
    note: str = ""
    driver: str = ""  # benchmarks/drivers/<driver>_driver.py; defaults to the name
    cells: tuple[str, ...] | None = None  # the cells it runs; None: all
    env: dict[str, str] = field(default_factory=dict)  # for its driver and workers
    peer: bool = True  # counted among the peers that aqueue is measured against

    def __post_init__(self) -> None:
        self.venv = self.venv or self.name
        self.driver = self.driver or self.name


# The tuned concurrency of each library is the best of a small sweep on this 2-core machine (see RESULTS.md).
# Notes say what a user of that library runs into; they go into RESULTS.md.
LIBS = [
    # The same packages as aqueue's, so whichever of the two runs first fills the shared venv.
    # No queue logic: nothing to tune (W2 default), no results (W4).
    Lib("raw", ["-e", ROOT, "hiredis"], ["redis", "hiredis"], None, venv="aqueue",
        cells=("W1", "W2t", "W3", "W5"), peer=False,
        note="the limit: redis-py asyncio + hiredis, bare XADD / XREADGROUP COUNT 100 + XACK, no queue "
             "logic; in W3, 500 tasks that sleep, fed from entries read up to 100 ahead of them."),
    Lib("aqueue", ["-e", ROOT, "hiredis"], ["aqueue", "redis", "hiredis", "anyio"], 500, peer=False,
        note="this working tree, installed editable and byte-compiled before the run (as pip compiles "
             "a package it installs); W3 with `--prefetch 500`, as many jobs read ahead as it has slots "
             "(streaq's default; dramatiq and celery read ahead by default too)."),
    Lib("aqueue-p0", ["-e", ROOT, "hiredis"], ["aqueue", "redis", "hiredis", "anyio"], 500,
        venv="aqueue", driver="aqueue", cells=("W3",), peer=False, env={"BENCH_PREFETCH": "0"},
        note="aqueue again, W3 only, without `--prefetch` (its default): a worker that receives no "
             "more jobs than it has free slots; not a peer."),
    # redis-py 8 loads more modules of its own than 7 at import (its keyspace and maintenance
    # notifications among them); saq caps redis-py below 8. The same aqueue on redis-py 7 tells the
    # two apart in the RSS columns.
    Lib("aqueue-r7", ["-e", ROOT, "hiredis", "redis<8"], ["aqueue", "redis", "hiredis", "anyio"], 500,
        venv="aqueue-redis7", driver="aqueue", cells=("W2t", "W4"), peer=False,
        note="aqueue again, on redis-py 7 (below 8, as saq's `redis` extra caps it): W2 tuned and W4 "
             "only, for the memory a worker takes on each client version (its other cells are for "
             "comparison); not a peer."),
    Lib("arq", ["arq", "hiredis"], ["arq", "redis", "hiredis"], 500,
        note="the worker polls the queue every 0.5 s when idle and `job.result()` polls every 0.5 s "
             "(poll_delay); max_jobs defaults to 10; every job is logged at INFO by default."),
    Lib("saq", ["saq[redis,hiredis]", "typing_extensions"], ["saq", "redis", "hiredis"], 100,
        note="0.26.4 imports typing_extensions without declaring it; its `redis` extra caps redis-py "
             "below 8 (with redis-py 8 its worker fails at concurrency 500: MaxConnectionsError); W4 "
             "uses `job.refresh(until_complete=...)` (pub/sub), since `Queue.apply` polls every 0.5 s; a "
             "listener that never returns keeps saq's subscription up between two jobs (without it, a "
             "job that ends while saq subscribes again is missed: W4 timed out every few hundred jobs), "
             "and the wait is cut into 1 s turns that each read the job again (refresh reads, then "
             "listens: a job ending in between was still missed once in ~1,500 round trips)."),
    Lib("streaq", ["streaq"], ["streaq", "coredis"], 100,
        note="on coredis (its own compiled parser; hiredis does not apply); every job is logged at INFO; "
             "W1 bulk is `Worker.enqueue_many`."),
    Lib("taskiq", ["taskiq", "taskiq-redis", "hiredis"], ["taskiq", "taskiq-redis", "redis", "hiredis"], 500,
        note="RedisStreamBroker + RedisAsyncResultBackend; `taskiq worker` starts 2 processes unless "
             "`--workers 1`; `wait_result()` polls every 0.2 s; every job is logged at INFO."),
    Lib("huey", ["huey", "redis", "hiredis"], ["huey", "redis", "hiredis"], 4,
        note="sync; RedisHuey; a blocking `result.get()` polls (50 ms, backing off) unless "
             "notify_result=True; with redis-py 8 (pools capped at 100) 500 threads need max_connections "
             "raised, else MaxConnectionsError and stalled jobs."),
    Lib("rq", ["rq", "hiredis"], ["rq", "redis", "hiredis"], 1, overrides={"W2d": N_JOBS // 10},
        note="sync; the default worker forks a work horse per job, so W2 default runs on N/10 jobs; "
             "W1 bulk is `Queue.enqueue_many` (one pipeline)."),
    Lib("dramatiq", ["dramatiq[redis]", "hiredis"], ["dramatiq", "redis", "hiredis"], 16,
        note="sync actors in worker threads; Results middleware on RedisBackend; W1 bulk is "
             "`group(...).run()`; one worker process (`--processes 1`; the default is one per core)."),
    Lib("celery", ["celery[redis]", "hiredis"], ["celery", "kombu", "redis", "hiredis"], 4,
        note="Redis as broker and result backend; prefork (one child per core) by default, threads for "
             "W3; W1 bulk is `group(...).apply_async()`."),
]

# cell -> (driver workload, concurrency: "default" | "tuned" | "io", worker processes)
CELLS = {
    "W1": ("enqueue", None, 1),
    "W2d": ("drain", "default", 1),
    "W2t": ("drain", "tuned", 1),
    "W3": ("io", "io", 1),
    "W4": ("latency", "default", 1),
    "W5": ("drain", "tuned", 2),
}

# column title, cell, measurement, whether higher is better
COLUMNS = [
    ("W1 1-by-1/s", "W1", "one", True),
    ("W1 bulk/s", "W1", "bulk", True),
    ("W2 dflt/s", "W2d", "rate", True),
    ("W2 tuned/s", "W2t", "rate", True),
    ("W2 RSS MB", "W2t", "rss_mb", False),
    ("W3 s", "W3", "seconds", False),
    ("W4 p50 ms", "W4", "p50", False),
    ("W4 p99 ms", "W4", "p99", False),
    ("W5 2proc/s", "W5", "rate", True),
]


# --- installing ------------------------------------------------------------------------------------------


def ensure_venv(lib: Lib) -> str | None:
    """Create and fill the library's venv unless already done with the same packages. None, or why not."""
    path = os.path.join(PEERS, lib.venv)
    marker = os.path.join(path, ".bench-installed")
    spec = json.dumps(lib.packages)
    if not lib.packages or (os.path.exists(marker) and open(marker).read() == spec):
        return None if os.path.exists(os.path.join(path, "bin", "python")) else f"venv {lib.venv} missing"
    print(f"installing {lib.name} into {path} ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", path], check=True, capture_output=True, timeout=120)
        pip = subprocess.run([os.path.join(path, "bin", "pip"), "install", "-q", *lib.packages],
                             capture_output=True, text=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"install failed: {exc}"
    if pip.returncode != 0:
        lines = [ln for ln in pip.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        return "pip install failed: " + (lines[-1] if lines else f"exit {pip.returncode}")
    with open(marker, "w") as f:
        f.write(spec)
    return None


def byte_compile(lib: Lib) -> None:
    """Write the .pyc of this tree (aqueue and the drivers), as pip does for a package it installs.
    The peers come from PyPI compiled at install time, while aqueue is installed editable from this
    tree: with PYTHONDONTWRITEBYTECODE set, its worker would compile every module at start and count
    the compiler's memory in its RSS. The drivers are compiled for every library alike."""
    subprocess.run([venv_python(lib), "-m", "compileall", "-q", "-x", r"[/\\]\.peers[/\\]",
                    os.path.join(ROOT, "aqueue"), os.path.join(ROOT, "benchmarks")],
                   check=True, capture_output=True, timeout=300)


def versions(lib: Lib) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "print(json.dumps({d: m.version(d) for d in sys.argv[1:]}))")
    out = subprocess.run([venv_python(lib), "-c", code, *lib.dists], capture_output=True, text=True,
                         timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def venv_python(lib: Lib) -> str:
    return os.path.join(PEERS, lib.venv, "bin", "python")


# --- running ---------------------------------------------------------------------------------------------


def run_driver(lib: Lib, cell: str, url: str, scale: int, workdir: str) -> dict[str, Any]:
    workload, conc_kind, procs = CELLS[cell]
    n = {"W1": N_JOBS, "W3": N_IO, "W4": N_ROUNDS}.get(cell, N_JOBS)
    n = lib.overrides.get(cell, n) // scale
    args = [workload, f"--n={n}", f"--procs={procs}", f"--workdir={workdir}",
            f"--cap={LATENCY_CAP}", f"--timeout={RUN_TIMEOUT - 60}"]
    conc = {"tuned": lib.tuned, "io": IO_CONCURRENCY}.get(conc_kind or "")
    if conc:
        args.append(f"--concurrency={conc}")
    env = {**os.environ, "BENCH_REDIS_URL": url, "PYTHONPATH": ROOT,
           "BENCH_PIDS": os.path.join(workdir, "pids"), **lib.env}
    cmd = [venv_python(lib), "-m", "benchmarks.drivers", lib.driver, *args]
    with open(os.path.join(workdir, "driver.log"), "wb") as log:
        # its own session: on a timeout the driver goes with everything it started
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"no answer within {RUN_TIMEOUT:.0f}s"}
        finally:
            kill_listed_workers(os.path.join(workdir, "pids"))
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("BENCH-RESULT ")]
    if not lines:
        tail = open(os.path.join(workdir, "driver.log"), errors="replace").read().strip().splitlines()
        return {"error": f"driver exited {proc.returncode}: " + (tail[-1] if tail else "no output")}
    result: dict[str, Any] = json.loads(lines[-1].split(" ", 1)[1])
    result["n"] = n
    return result


def kill_listed_workers(pids_file: str) -> None:
    """A driver that died or hung may leave its worker sessions behind: end what is left of them, by pid,
    and only processes running from a benchmark venv (a listed pid may since have been reused)."""
    if not os.path.exists(pids_file):
        return
    for sid in open(pids_file).read().split():
        for pid in session_pids(int(sid)):
            with contextlib.suppress(OSError):
                if PEERS.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    os.kill(pid, signal.SIGKILL)


@dataclass
class Outcome:
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    na: str | None = None
    n: int = 0
    cmd: list[str] | None = None


def run_once(lib: Lib, cell: str, rep: int, outcome: Outcome, url: str, scale: int, base: str) -> bool:
    """One run of one workload, added to `outcome`; returns whether the library should run it again."""
    workdir = tempfile.mkdtemp(prefix=f"{lib.name}-{cell}-{rep}-", dir=base)
    started = time.monotonic()
    result = run_driver(lib, cell, url, scale, workdir)
    took = time.monotonic() - started
    if "error" in result:
        outcome.errors.append(f"run {rep + 1}: {result['error']}")
    elif "na" in result:
        outcome.na = result["na"]
    else:
        outcome.runs.append(result)
        outcome.n, outcome.cmd = result["n"], result.get("cmd")
    shown = result.get("error") or result.get("na") or {
        k: round(v, 2) for k, v in result.items() if isinstance(v, float)}
    print(f"  {lib.name:9} {cell:4} run {rep + 1}: {took:5.1f}s  {shown}", flush=True)
    capped = cell == "W4" and result.get("rounds", 0) < result["n"] if "n" in result else False
    # a first run that fails means the setup is broken: no point in repeating it
    # Libraries that are not peers (raw, aqueue, aqueue-r7) are always repeated: their runs take
    # seconds, so one that took long was disturbed, and is the one that most needs the others beside
    # it (aqueue's W1 once ran alone, at 15.3 s instead of 9 s).
    slow = took > SLOW_RUN and lib.peer
    return not ((outcome.errors and not outcome.runs) or outcome.na or slow or capped)


def measure(libs: list[Lib], url: str, reps: int, scale: int, base: str) -> dict[str, dict[str, Outcome]]:
    """Each workload's runs go round the libraries, one run each per round: a spell when the machine
    is slower (its other tenants) then falls on one run of each library, not on every run of one,
    and each library's median comes from three spells. Every other round goes the other way round, so
    that a library run last in one round is run first in the next: a machine whose speed drifts during
    a round favours no library's place in the order."""
    client = redis.Redis.from_url(url)
    outcomes: dict[str, dict[str, Outcome]] = {lib.name: {} for lib in libs}
    done: set[tuple[str, str]] = set()  # (library, cell) runs no more
    for rep in range(reps):
        in_order = libs if rep % 2 == 0 else libs[::-1]
        for cell in CELLS:
            for lib in in_order:
                if (lib.cells is not None and cell not in lib.cells) or (lib.name, cell) in done:
                    continue
                client.flushall()
                outcome = outcomes[lib.name].setdefault(cell, Outcome())
                if not run_once(lib, cell, rep, outcome, url, scale, base):
                    done.add((lib.name, cell))
    client.close()
    return outcomes


# --- reporting -------------------------------------------------------------------------------------------


def fmt(value: float, key: str, scale: float | None = None) -> str:
    """`scale`: the largest value shown beside this one, so a median and its range share a unit."""
    if key in ("one", "bulk", "rate"):  # jobs/s
        top = max(value, scale or 0)
        return f"{value:,.0f}" if top < 10_000 else f"{value / 1000:.1f}k" if top < 100_000 else \
            f"{value / 1000:.0f}k"
    return f"{value:.1f}" if key == "rss_mb" or value >= 100 else f"{value:.2f}"


class Footnotes:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"


def medians(results: dict[str, dict[str, Outcome]], lib: str, cell: str, key: str) -> float | None:
    outcome = results.get(lib, {}).get(cell)
    values = [r[key] for r in outcome.runs if key in r] if outcome else []
    return statistics.median(values) if values else None


def table(results: dict[str, dict[str, Outcome]], failed: dict[str, str], notes: Footnotes,
          scale: int, reps: int) -> str:
    width, first = 14, 11
    header = f"{'':{first}}" + "".join(f"{title:>{width}}" for title, *_ in COLUMNS)
    lines = [header, "-" * len(header)]
    for lib in LIBS:
        if lib.name not in results and lib.name not in failed:
            continue
        if lib.name in failed:
            lines.append(f"{lib.name:{first}}" + f"{'failed ' + notes.mark(failed[lib.name]):>{width}}")
            continue
        top, bottom = [], []
        for _title, cell, key, _higher in COLUMNS:
            outcome = results[lib.name].get(cell)
            values = [r[key] for r in outcome.runs if key in r] if outcome else []
            if outcome is None:
                top.append("—")
                bottom.append("")
            elif outcome.errors and not values:
                top.append("failed" + notes.mark(f"{lib.name} {cell} failed, {'; '.join(outcome.errors)}"))
                bottom.append("")
            elif outcome.na or not values:
                reason = outcome.na or next((r[key + "_na"] for r in outcome.runs if key + "_na" in r), "")
                top.append("n/a" + notes.mark(f"{lib.name}: {reason}"))
                bottom.append("")
            else:
                mark = ""
                expected = {"W1": N_JOBS, "W3": N_IO, "W4": N_ROUNDS}.get(cell, N_JOBS) // scale
                capped = cell == "W4" and outcome.runs[0]["rounds"] < expected
                if capped:
                    mark += notes.mark(f"{lib.name} W4: one run, {LATENCY_CAP:.0f} s cap reached after "
                                       f"{outcome.runs[0]['rounds']} round trips (of {expected})")
                elif outcome.n != expected:
                    mark += notes.mark(f"{lib.name} {cell}: measured on {outcome.n:,} jobs, not {expected:,}")
                if warm := sum(r.get("warmup_failures", 0) for r in outcome.runs):
                    mark += notes.mark(f"{lib.name} W4: the first (uncounted) round trip failed {warm} time(s) "
                                       "and was tried again")
                if outcome.errors:  # the runs that worked are shown; the others are named
                    mark += notes.mark(f"{lib.name} {cell}: {len(outcome.errors)} of "
                                       f"{len(outcome.errors) + len(values)} runs failed, "
                                       f"{'; '.join(outcome.errors)}")
                elif len(values) == 1 and reps > 1 and not capped:
                    mark += notes.mark(f"one run only: a run took over {SLOW_RUN:.0f} s, or hit the W4 cap")
                big = max(values)
                top.append(fmt(statistics.median(values), key, big) + mark)
                bottom.append(f"{fmt(min(values), key, big)}-{fmt(big, key)}" if len(values) > 1 else "")
        lines.append(f"{lib.name:{first}}" + "".join(f"{v:>{width}}" for v in top))
        if any(bottom):
            lines.append(f"{'  min-max':{first}}" + "".join(f"{v:>{width}}" for v in bottom))
    peers = [lib.name for lib in LIBS if lib.peer]
    if "aqueue" in results:
        best_names, ratios, raw_ratios = [], [], []
        for _title, cell, key, higher in COLUMNS:
            ours = medians(results, "aqueue", cell, key)
            theirs = [(v, p) for p in peers if (v := medians(results, p, cell, key)) is not None]
            raw = medians(results, "raw", cell, key)
            if ours is None or not theirs:
                best_names.append("")
                ratios.append("")
            else:
                value, name = max(theirs) if higher else min(theirs)
                best_names.append(name)
                ratios.append(f"{ours / value:.2f}")
            raw_ratios.append(f"{ours / raw:.2f}" if ours is not None and raw else "")
        lines.append("-" * len(header))
        lines.append(f"{'best peer':{first}}" + "".join(f"{v:>{width}}" for v in best_names))
        lines.append(f"{'aq/best':{first}}" + "".join(f"{v:>{width}}" for v in ratios))
        lines.append(f"{'aq/raw':{first}}" + "".join(f"{v:>{width}}" for v in raw_ratios))
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's name, with its family and model where /proc/cpuinfo gives them: a virtual machine's
    name is often the vendor's line alone ("AMD EPYC"), shared by CPUs of very different speed."""
    info: dict[str, str] = {}
    for ln in open("/proc/cpuinfo"):
        key, _, value = ln.partition(":")
        info.setdefault(key.strip(), value.strip())
    name = info.get("model name") or platform.processor()
    if "cpu family" in info and "model" in info:
        return f"{name} (family {info['cpu family']}, model {info['model']})"
    return name


def machine() -> str:
    cpu = cpu_model()
    mem_kb = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    server_version = next((w.split("=")[1] for w in server if w.startswith("v=")), "?")
    return (f"{os.cpu_count()} cores, {cpu}, {mem_kb / 2**20:.0f} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}, redis-server {server_version} (--save '' --appendonly no)")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()


def git_state() -> str:
    dirty = _git("status", "--porcelain", "aqueue")
    return f"{_git('rev-parse', '--short', 'HEAD')}{' + uncommitted changes in aqueue/' if dirty else ''}"


def aqueue_tree() -> str:
    """What the run measures: aqueue/ as committed, and any change to it not committed."""
    return _git("rev-parse", "HEAD:aqueue") + _git("diff", "HEAD", "--", "aqueue")


def git_change(at_start: str, tree_at_start: str) -> str:
    now = git_state()
    if now == at_start:
        return ""
    if aqueue_tree() == tree_at_start:
        return f", {now} at the end (commits during the run left aqueue/ as it was)"
    return f", {now} at the end (aqueue/ changed during the run)"


def per_job_us(results: dict[str, dict[str, Outcome]], lib: str, cell: str, key: str) -> float | None:
    """CPU time per job in microseconds (cores kept busy / jobs per second), median of the runs."""
    outcome = results.get(lib, {}).get(cell)
    values = [r[key] / r["rate"] * 1e6 for r in outcome.runs if key in r and r.get("rate")] if outcome else []
    return statistics.median(values) if values else None


CPU = ("worker_cpu", "redis_cpu")


def pair(results: dict[str, dict[str, Outcome]], lib: str, cell: str,
         value: Callable[[dict[str, dict[str, Outcome]], str, str, str], float | None],
         keys: tuple[str, str], spec: str) -> str | None:
    """Two measurements of a cell side by side, "a / b" (workers / Redis, say); None if either is
    missing."""
    a, b = (value(results, lib, cell, k) for k in keys)
    return None if a is None or b is None else f"{a:{spec}} / {b:{spec}}"


def cpu_table(results: dict[str, dict[str, Outcome]]) -> str:
    """Cores kept busy during the drains, and CPU time per job (medians): what saturates when a
    second worker is added."""
    rows = []
    for lib in LIBS:
        cells = [pair(results, lib.name, cell, medians, CPU, ".2f") for cell in ("W2t", "W5")]
        cells += [pair(results, lib.name, cell, per_job_us, CPU, ",.1f") for cell in ("W2t", "W5")]
        cells.append(pair(results, lib.name, "W5", medians, ("idle_cores", "stolen_cores"), ".2f"))
        cells += [pair(results, lib.name, cell, medians, ("worker_waiting", "redis_waiting"), ".2f")
                  for cell in ("W2t", "W5")]
        if any(c is not None for c in cells):
            cells = [c or "—" for c in cells]
            rows.append(f"| {lib.name} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    return ("## CPU during the drains\n\nFrom the first job to the last: cores kept busy, and CPU time "
            "per job in microseconds; workers / Redis (medians; the machine has 2 cores, shared with "
            "the producer's idle process). A second worker can only help where one worker, not Redis, "
            "is what saturates, and while the two cores have time to spare. Then the machine's cores "
            "left idle / taken by the hypervisor (steal) during W5, in all; and, in the last two "
            "columns, the cores that the workers / Redis waited for, ready to run while others held both cores "
            "(/proc/PID/schedstat): what the drain would have used had the machine more cores. Redis "
            "waiting is every worker waiting longer for its replies.\n\n"
            "| library | cores, W2 tuned (1 worker) | cores, W5 (2 workers) | µs/job, W2 tuned | "
            "µs/job, W5 | W5: idle / stolen cores | waited for, W2 tuned | waited for, W5 |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(rows) + "\n")


def io_cpu_table(results: dict[str, dict[str, Outcome]]) -> str:
    """Cores kept busy in W3, and CPU time per job (medians): where the jobs only wait, what each
    job costs the worker's loop is what spreads its waves (and delays the next wave's start)."""
    rows = []
    for lib in LIBS:
        cores = pair(results, lib.name, "W3", medians, CPU, ".2f")
        per_job = pair(results, lib.name, "W3", per_job_us, CPU, ",.1f")
        if cores and per_job:
            rows.append(f"| {lib.name} | {cores} | {per_job} |")
    if not rows:
        return ""
    return ("## CPU in W3\n\nFrom the first job's start to the last one's end, the worker running 500 jobs "
            "at a time that only sleep: cores kept busy, and CPU time per job in microseconds; worker / "
            "Redis (medians). Each job that ends frees a slot for the next, so the more a job costs the "
            "worker's loop, the later each wave's last slots are refilled.\n\n"
            "| library | cores, W3 | µs/job, W3 |\n| --- | --- | --- |\n" + "\n".join(rows) + "\n")


def memory_table(results: dict[str, dict[str, Outcome]]) -> str:
    """Each worker's peak RSS with one job at a time (W4) and at its tuned concurrency (W2): what
    its imports hold, and what running many jobs adds."""
    rows = []
    for lib in LIBS:
        one, many = medians(results, lib.name, "W4", "rss_mb"), medians(results, lib.name, "W2t", "rss_mb")
        if one is None or many is None:
            continue
        rows.append(f"| {lib.name} | {one:.1f} | {many:.1f} | {many - one:+.1f} |")
    if not rows:
        return ""
    return ("## Worker memory\n\nPeak RSS in MB (medians) of the worker process: in W4, which never has "
            "more than one job at a time (default settings: mostly what the worker imported), and in "
            "W2 at the tuned concurrency. Processes are summed where a library forks (celery, rq). The "
            "redis-py a library installs weighs in the first column: each library's is in the versions "
            "below (arq pins it below 6, saq below 8; aqueue-r7 is aqueue on redis-py 7).\n\n"
            "| library | RSS, W4 (one job at a time) | RSS, W2 tuned | added by the drain |\n"
            "| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")


def shorten(cmd: list[str] | None) -> str:
    if not cmd:
        return ""
    text = re.sub(r"redis://127\.0\.0\.1:\d+/0", "$REDIS_URL", shlex.join(cmd).replace(PEERS + "/", ".peers/"))
    return text.replace(".peers/aqueue/bin/python -m aqueue", "python -m aqueue")


def report(results: dict[str, dict[str, Outcome]], failed: dict[str, str], lib_versions: dict[str, Any],
           args: argparse.Namespace, scale: int, elapsed: float, command: str) -> tuple[str, str]:
    notes = Footnotes()
    body = table(results, failed, notes, scale, args.reps)
    printed = body + "\n\n" + "\n".join(f"[{i}] {t}" for i, t in enumerate(notes.texts, 1))
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    *others, last = [f"{lib.name}'s" for lib in LIBS if not lib.peer]
    always_repeated = f"{', '.join(others)} and {last}" if others else last
    versions_md = "\n".join(
        f"| {lib.name} | {', '.join(f'{k} {v}' for k, v in lib_versions.get(lib.name, {}).items())} | "
        f"{'`pip install ' + shlex.join(lib.packages) + '`' if lib.packages else 'the aqueue venv'} | "
        f"{lib.note} |"
        for lib in LIBS if lib.name in results or lib.name in failed)
    commands = []
    for lib in LIBS:
        for cell, label in (("W2d", "default"), ("W2t", "tuned"), ("W3", "W3")):
            outcome = results.get(lib.name, {}).get(cell)
            if outcome and outcome.cmd:
                commands.append(f"- {lib.name} {label}: `{shorten(outcome.cmd)}`")
    md = f"""# aqueue and its peers

Written by `python -m benchmarks.peers` (benchmarks/peers.py); do not edit by hand.

- Date: {date}; total run time {elapsed / 60:.1f} min; 1-min load average at the start
  {args.load:.2f} (nothing else is stopped for the run: other work on the machine adds noise)
- Command: `{command}`
- aqueue: {args.git_start} at the start of the run{git_change(args.git_start, args.tree_start)}
- Machine: {machine()}
- Each workload ran {args.reps} times per library, in rounds that run it once for every library in
  turn, every other round in the reverse order (a slower spell of the machine falls on one run of each,
  and no library keeps its place in a round); FLUSHALL before each run; a peer's
  run that took over {SLOW_RUN:.0f} s was not repeated (marked in the footnotes); {always_repeated}
  always were.
  Job counts: W1/W2/W5 {N_JOBS // scale:,}, W3 {N_IO // scale:,}, W4 {N_ROUNDS // scale:,} round trips
  (at most {LATENCY_CAP:.0f} s of them).

## Workloads

- **W1 enqueue**: no-op jobs from one async producer, one by one awaiting each, then in bulk (aqueue
  `task.map`, else the library's batch API, else `asyncio.gather` 100 at a time). Sync-only libraries
  (huey, rq, dramatiq, celery) are called as they are. Jobs per second.
- **W2 drain**: the jobs are queued first, then one worker process is started with the library's own
  command; time from the first job's start to the last job's end (each job appends its start and end
  times to a file: one `write`, no round trip), so process start is excluded. Default settings, then
  the tuned concurrency. RSS: peak (VmHWM) of the tuned worker, summed over its processes.
- **W3 I/O-bound**: {N_IO // scale:,} jobs that each sleep {0.05} s (`anyio.sleep` in aqueue and
  streaq, which run on anyio; `asyncio.sleep` in the other async libraries; `time.sleep` in worker
  threads for sync libraries), one worker at concurrency {IO_CONCURRENCY}; drain time in seconds,
  ideal {N_IO // scale * 0.05 / IO_CONCURRENCY:.2f} s. aqueue's worker reads up to {IO_CONCURRENCY} jobs
  ahead of its free slots (`--prefetch {IO_CONCURRENCY}`); streaq's, dramatiq's and celery's read ahead
  by default.
- **W4 latency**: enqueue one job and await its result, in a row, with an idle worker (default
  settings) in its own process; p50 and p99 in ms.
- **W5 scale**: W2 with 2 worker processes of the tuned setting (1 process = "W2 tuned"). The
  drain is timed from the moment both workers have started a job (the later one's first start),
  over the jobs started from then on, so neither worker's start-up counts; the run logs give the
  whole window's rate and the gap between the two first starts beside it.
- **raw**: the physical limit: redis-py asyncio + hiredis on the same Redis, awaited XADD one at a
  time (W1 1-by-1), XADD pipelined 100 at a time (W1 bulk), XREADGROUP COUNT 100 + XACK (W2, W5);
  in W3, {IO_CONCURRENCY} asyncio tasks that take entries from a local queue and sleep, the loop reading
  up to 100 entries ahead of them and acking those that ended with its next read: with a job in hand
  whenever a slot frees, what is left between W3 and its ideal is mostly the event loop's own timers.
- **aqueue-r7**: aqueue again, the same tree, in a venv with redis-py below 8 (saq's cap); W2 tuned and
  W4 only: it is there for the memory a worker takes on each client version (its other cells are
  for comparison). Not a peer.
- **aqueue-p0**: aqueue again, W3 only, without `--prefetch` (its default): a freed slot waits for
  the worker's next receive. Not a peer.

Cells are the median of the runs and, below, min-max. The last rows: the best peer per column
(raw, aqueue-r7 and aqueue-p0 excluded), aqueue's median divided by it, and by raw. Throughput:
above 1 is aqueue faster; RSS, seconds and latency: below 1 is aqueue better.

## Results

```
{printed}
```

{cpu_table(results)}
{io_cpu_table(results)}
{memory_table(results)}
## Versions

| library | versions | install | notes |
| --- | --- | --- | --- |
{versions_md}

## Worker commands (.peers/<lib> is the library's venv; cwd /work/main)

{chr(10).join(commands)}

The tuned concurrency of each library was the best of a short sweep of W2 on this machine (5,000 and
20,000 jobs, 2 runs each): async libraries 100 to 1000 jobs at once, thread pools 1 to 64 threads,
celery prefork 2 to 8 processes and a 4 to 100 thread pool. rq has no concurrency setting: its "tuned"
worker is SimpleWorker (no fork per job). W3 runs every library at concurrency {IO_CONCURRENCY}
(threads for the sync ones).
"""
    return printed, md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N / 10 everywhere")
    parser.add_argument("--only", help="comma-separated libraries (raw, aqueue, arq, saq, ...)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    names = [lib.name for lib in LIBS]
    chosen = args.only.split(",") if args.only else names
    if unknown := set(chosen) - set(names):
        parser.error(f"unknown libraries: {', '.join(sorted(unknown))} (known: {', '.join(names)})")
    scale = 10 if args.quick else 1
    command = "python -m benchmarks.peers" + "".join(f" {a}" for a in sys.argv[1:])
    started, load_at_start, args.git_start = time.monotonic(), os.getloadavg()[0], git_state()
    args.tree_start = aqueue_tree()
    os.makedirs(PEERS, exist_ok=True)
    failed: dict[str, str] = {}
    lib_versions: dict[str, Any] = {}
    base = tempfile.mkdtemp(prefix="aqueue-peers-")
    print(f"run logs: {base}", flush=True)
    ready = []
    for lib in LIBS:
        if lib.name not in chosen:
            continue
        if problem := ensure_venv(lib):
            failed[lib.name] = f"{lib.name}: {problem}"
            print(f"  {lib.name}: {problem}", flush=True)
            continue
        byte_compile(lib)
        lib_versions[lib.name] = versions(lib)
        ready.append(lib)
    with private_redis() as url:
        results = measure(ready, url, args.reps, scale, base)
    elapsed = time.monotonic() - started
    args.load = load_at_start
    printed, md = report(results, failed, lib_versions, args, scale, elapsed, command)
    print()
    print(printed)
    partial = args.quick or args.only or args.reps != 3
    out = os.path.join(PEERS, "RESULTS-partial.md") if partial else os.path.join(HERE, "RESULTS.md")
    with open(out, "w") as f:
        f.write(md)
    print(f"\nwritten to {os.path.relpath(out, ROOT)} in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
