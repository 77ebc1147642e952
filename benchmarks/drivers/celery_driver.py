"""celery (Redis as broker and result backend): the worker is
`celery -A benchmarks.drivers.celery_driver worker` (prefork, one child per core by default).
"""

import os
import sys
import time

from celery import Celery, group

from benchmarks.drivers import _common as c

app = Celery("bench", broker=c.redis_url(), backend=c.redis_url())


@app.task(name="noop")
def noop():
    c.record(time.time())


@app.task(name="nap")
def nap():
    start = time.time()
    time.sleep(c.NAP)
    c.record(start)


@app.task(name="echo")
def echo(x):
    return x


class Driver(c.Driver):
    def worker_cmd(self, concurrency, kind):
        cmd = [os.path.join(os.path.dirname(sys.executable), "celery"),
               "-A", "benchmarks.drivers.celery_driver", "worker"]
        if concurrency and kind == "nap":  # I/O-bound jobs: a pool of threads, not of processes
            cmd.append("--pool=threads")
        return cmd + ([f"--concurrency={concurrency}"] if concurrency else []), {}

    def enqueue_one(self):
        noop.delay()

    def enqueue_bulk(self, n, kind):
        task = noop if kind == "noop" else nap
        group(task.s() for _ in range(n)).apply_async()

    def round_trip(self, i):
        return echo.delay(i).get(timeout=10)
