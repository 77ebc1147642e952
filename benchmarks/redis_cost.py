"""What a job costs Redis, in CPU instructions: enqueue (one by one and by `map`), receive and
finish, each measured alone, beside a raw XADD awaited one at a time (W1's floor); and W4's chain
of one job alone (a waiter registered, received alone, finished alone: what an idle worker does),
phase by phase and then whole, one job after another.

    python -m benchmarks.redis_cost [--jobs 4000]

Redis runs under valgrind's callgrind (`apt-get install valgrind`), which counts the instructions
it executes instead of timing them: the same code gives the same count whatever else the machine
is doing, so a change to a Lua script can be judged by a few percent. Instrumentation is switched
on only around each phase. Jobs are no-ops, handled in batches of the worker's size; the figure is
Redis's whole work per job in that phase (reading the request, the script, the reply).

Redis serves every worker from one thread: fewer instructions per job is more workers before Redis
is what saturates, and more of a small machine's cores left to them (W5 in RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from aqueue import Queue
from aqueue._worker._runner import RECEIVE_BATCH
from aqueue.brokers import Broker, Completion, Delivery, Outcome, RedisBroker
from benchmarks._redis_server import start_redis

QUEUE = "cost"


class CountedRedis:
    """A private redis-server under callgrind, instrumented only between `start` and `stop`."""

    def __init__(self) -> None:
        for tool in ("valgrind", "callgrind_control"):
            if shutil.which(tool) is None:
                raise SystemExit(f"{tool} is not installed (apt-get install valgrind)")
        self.dir = Path(tempfile.mkdtemp(prefix="aqueue-cost-"))
        self.process, self.url = start_redis(
            str(self.dir), startup=60,  # valgrind starts slowly
            wrapper=["valgrind", "--tool=callgrind", "--instr-atstart=no",
                     f"--callgrind-out-file={self.dir}/callgrind.out"],
        )
        self.dumps = 0

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.process.pid)], check=True,
                       capture_output=True)

    def start(self) -> None:
        self._control("--zero")
        self._control("--instr=on")

    def stop(self) -> int:
        """Instructions executed since `start`."""
        self._control("--instr=off")
        self._control("--dump")
        self.dumps += 1
        dump = self.dir / f"callgrind.out.{self.dumps}"
        totals = re.search(r"^totals:\s+(\d+)", dump.read_text(), re.MULTILINE)
        if totals is None:
            raise SystemExit(f"no totals in {dump}")
        return int(totals.group(1))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def measure(server: CountedRedis, jobs: int) -> dict[str, float]:
    queue = Queue(server.url, name=QUEUE)

    @queue.task(name="noop")
    async def noop() -> None:
        return None

    async with queue:
        broker = queue.broker
        # Warm up: scripts loaded, stream and group made, one job through.
        await noop.enqueue()
        warm = await broker.receive(QUEUE, "warm", 1, 0.0, 10)
        await broker.finish(QUEUE, [Completion(warm[0], Outcome.SUCCEEDED, time.time(), b"null")],
                            queue.result_ttl)

        server.start()
        for _ in range(jobs):
            await noop.enqueue()
        one_by_one = server.stop()

        server.start()
        await noop.map([() for _ in range(jobs)])
        enqueue = server.stop()

        server.start()
        deliveries = []
        while len(deliveries) < 2 * jobs:
            deliveries += await broker.receive(QUEUE, "worker", RECEIVE_BATCH, 0.0, 10)
        receive = server.stop()

        batches = [deliveries[i:i + RECEIVE_BATCH] for i in range(0, 2 * jobs, RECEIVE_BATCH)]
        server.start()
        await finish_all(broker, batches, queue.result_ttl)
        finish = server.stop()

        # Two workers: each batch ends while the other worker's older batch is still pending, as
        # in W5, so its entries cannot be trimmed off the stream's head and are deleted as they are.
        await noop.map([() for _ in range(jobs)])
        batches = []
        while sum(map(len, batches)) < jobs:
            batches.append(await broker.receive(QUEUE, f"worker-{len(batches) % 2}", RECEIVE_BATCH,
                                                0.0, 10))
        swapped = [batches[j ^ 1] if j ^ 1 < len(batches) else batches[j] for j in range(len(batches))]
        server.start()
        await finish_all(broker, swapped, queue.result_ttl)
        finish_two = server.stop()

        # W4's chain, one job at a time: a waiter registers on the job (`result()`), the job is
        # received alone and finished alone, and its finish publishes the outcome to the waiter.
        assert isinstance(broker, RedisBroker)
        rounds = min(jobs, 500)
        ids = [(await noop.enqueue()).id for _ in range(rounds)]
        server.start()
        for job_id in ids:
            await broker._run(QUEUE, "watch", [job_id, broker._inbox])
        watch = server.stop()
        server.start()
        alone = [(await broker.receive(QUEUE, "worker", 1, 0.0, 10))[0] for _ in ids]
        receive_one = server.stop()
        server.start()
        await finish_all(broker, [[d] for d in alone], queue.result_ttl)
        finish_one = server.stop()
        # The phases above each ran over all the rounds' jobs, so the stream held up to `rounds`
        # entries, which the finishes' trims walk. An idle worker's stream holds one: the whole
        # chain, one job after another, is what W4 costs Redis.
        server.start()
        for _ in range(rounds):
            job_id = (await noop.enqueue()).id
            await broker._run(QUEUE, "watch", [job_id, broker._inbox])
            await finish_all(broker, [await broker.receive(QUEUE, "worker", 1, 0.0, 10)], queue.result_ttl)
        chain = server.stop()

        # The floor one enqueue is measured against: W1's raw producer, one XADD awaited at a time.
        server.start()
        for _ in range(jobs):
            await broker.client.xadd("raw", {"t": "noop"})
        raw = server.stop()
    return {"enqueue (one by one)": one_by_one / jobs, "enqueue (map)": enqueue / jobs,
            "receive": receive / (2 * jobs), "finish": finish / (2 * jobs),
            "finish (two workers)": finish_two / jobs, "W4: watch": watch / rounds,
            "W4: receive alone": receive_one / rounds, "W4: finish alone": finish_one / rounds,
            "W4: one job's chain": chain / rounds,
            "raw XADD": raw / jobs}


async def finish_all(broker: Broker, batches: list[list[Delivery]], ttl: float) -> None:
    for batch in batches:
        now = time.time()
        done = [Completion(d, Outcome.SUCCEEDED, now, b"null") for d in batch]
        if not all(await broker.finish(QUEUE, done, ttl)):
            raise SystemExit("a finish was refused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4000)
    args = parser.parse_args()
    server = CountedRedis()
    try:
        per_job = asyncio.run(measure(server, args.jobs))
    finally:
        server.close()
    print(f"Redis instructions per job ({args.jobs:,} no-op jobs, batches of {RECEIVE_BATCH})")
    for phase, count in per_job.items():
        print(f"  {phase:<22} {count:>9,.0f}")
    print(f"  {'receive + finish':<22} {per_job['receive'] + per_job['finish']:>9,.0f}")


if __name__ == "__main__":
    main()
