"""huey (RedisHuey): the worker is `huey_consumer benchmarks.drivers.huey_driver.huey -k thread -w N`.

Sync only: jobs are enqueued from plain calls and I/O-bound jobs use time.sleep in worker threads.
"""

import os
import sys
import time

from huey import RedisHuey
from redis import ConnectionPool

from benchmarks.drivers import _common as c

# redis-py 8 caps a pool at 100 connections and huey holds one per worker thread: with more threads
# than that its workers fail with MaxConnectionsError, so a user running 500 threads raises the cap.
pool = ConnectionPool.from_url(c.redis_url(), max_connections=max(100, c.concurrency(1) + 10))
huey = RedisHuey("bench", connection_pool=pool)


@huey.task()
def noop():
    c.record(time.time())


@huey.task()
def nap():
    start = time.time()
    time.sleep(c.NAP)
    c.record(start)


@huey.task()
def echo(x):
    return x


class Driver(c.Driver):
    bulk_na = "no batch enqueue API (and a sync client: no gather)"

    def worker_cmd(self, concurrency, kind):
        cmd = [os.path.join(os.path.dirname(sys.executable), "huey_consumer"),
               "benchmarks.drivers.huey_driver.huey"]
        return cmd + (["-k", "thread", "-w", str(concurrency)] if concurrency else []), {
            "BENCH_CONCURRENCY": str(concurrency or "")}

    def enqueue_one(self):
        noop()

    def fill(self, n, kind):
        task = noop if kind == "noop" else nap
        for _ in range(n):
            task()

    def round_trip(self, i):
        # a blocking get polls the result store (from 50 ms, backing off) unless notify_result=True
        return echo(i).get(blocking=True, timeout=10)
