"""rq: the worker is `rq worker -u URL` (forks a work horse per job); tuned: SimpleWorker (no fork).

rq runs one job at a time per worker process: it has no concurrency setting to tune.
"""

import os
import sys
import time

from redis import Redis
from rq import Queue

from benchmarks.drivers import _common as c

queue = Queue("default", connection=Redis.from_url(c.redis_url()))


def noop():
    c.record(time.time())


def nap():
    start = time.time()
    time.sleep(c.NAP)
    c.record(start)


def echo(x):
    return x


class Driver(c.Driver):
    io_na = "one job at a time per worker process (no threads or async concurrency)"

    def worker_cmd(self, concurrency, kind):
        cmd = [os.path.join(os.path.dirname(sys.executable), "rq"), "worker", "-u", c.redis_url()]
        # "tuned" (any concurrency asked for): SimpleWorker runs jobs in the worker, no fork per job
        return cmd + (["-w", "rq.worker.SimpleWorker"] if concurrency else []), {}

    def enqueue_one(self):
        queue.enqueue(noop)

    def enqueue_bulk(self, n, kind):
        fn = noop if kind == "noop" else nap
        queue.enqueue_many([Queue.prepare_data(fn) for _ in range(n)])

    def round_trip(self, i):
        return queue.enqueue(echo, i).latest_result(timeout=10).return_value
