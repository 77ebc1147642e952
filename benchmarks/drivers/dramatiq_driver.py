"""dramatiq (RedisBroker + Results middleware on RedisBackend).

The worker is `dramatiq benchmarks.drivers.dramatiq_driver --processes 1 [--threads N]` (one worker
process: dramatiq starts one per core by default). Actors are sync and run in worker threads.
"""

import os
import sys
import time

import dramatiq
from dramatiq import group
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from benchmarks.drivers import _common as c

broker = RedisBroker(url=c.redis_url())
broker.add_middleware(Results(backend=RedisBackend(url=c.redis_url())))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="noop")
def noop():
    c.record(time.time())


@dramatiq.actor(actor_name="nap")
def nap():
    start = time.time()
    time.sleep(c.NAP)
    c.record(start)


@dramatiq.actor(actor_name="echo", store_results=True)
def echo(x):
    return x


class Driver(c.Driver):
    def worker_cmd(self, concurrency, kind):
        cmd = [os.path.join(os.path.dirname(sys.executable), "dramatiq"), "benchmarks.drivers.dramatiq_driver",
               "--processes", "1"]
        return cmd + ([f"--threads={concurrency}"] if concurrency else []), {}

    def enqueue_one(self):
        noop.send()

    def enqueue_bulk(self, n, kind):
        actor = noop if kind == "noop" else nap
        group(actor.message() for _ in range(n)).run()

    def round_trip(self, i):
        return echo.send(i).get_result(block=True, timeout=10_000)
