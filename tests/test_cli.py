"""The worker as users run it: `aqueue run module:queue` in processes of its own, against Redis."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from aqueue import BrokerConnectionError, Job, JobState, Queue, _cli
from aqueue._cli import main
from tests.apps import logging_app
from tests.conftest import RedisServer, free_port, start_redis

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.worker_app:queue"
LOGGING_APP = "tests.apps.logging_app:queue"

pytestmark = pytest.mark.subprocess


class WorkerProcess:
    def __init__(self, url: str, queue_name: str, *flags: str, visibility: float = 60, app: str = APP,
                 env: dict[str, str] | None = None) -> None:
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"aqueue-worker-{queue_name}-{time.time_ns()}.log"
        env = {**os.environ, "AQUEUE_URL": url, "AQUEUE_QUEUE": queue_name,
               "AQUEUE_VISIBILITY": str(visibility), **(env or {})}
        with self.log.open("w") as stderr:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "aqueue", "run", app, *flags],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            )

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=40)


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        if w.process.poll() is None:
            w.process.kill()
            w.process.wait()


async def poll_until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll an async predicate with a deadline (for state in another process: nothing to wait on)."""
    with anyio.fail_after(timeout):
        while not await predicate():  # noqa: ASYNC110 - the state lives in another process
            await anyio.sleep(0.02)


async def code_runs(job: Job[Any]) -> bool:
    """Whether the job's own code has begun (the worker app's `nap` reports progress first): a
    record reads `running` from its delivery on, a little before the worker takes the job in."""
    info = await job.info()
    return info is not None and info.progress is not None


def client_queue(url: str, name: str) -> Queue:
    from tests.apps import worker_app

    q = Queue(url, name=name)
    for task in worker_app.queue.tasks.values():  # the worker's tasks, under the same names
        q.task(name=task.name)(task.fn)
    return q


async def test_jobs_enqueued_by_another_process_all_complete(
    redis_url: str, queue_name: str, workers: list[WorkerProcess]
) -> None:
    workers.append(WorkerProcess(redis_url, queue_name))
    env = {**os.environ, "AQUEUE_URL": redis_url, "AQUEUE_QUEUE": queue_name}
    with anyio.fail_after(60):
        produced = await anyio.run_process(
            [sys.executable, "-m", "tests.apps.produce", "1000"], cwd=ROOT, env=env, check=True
        )
    ids = produced.stdout.decode().split()
    assert len(ids) == 1000
    async with client_queue(redis_url, queue_name) as q:
        with anyio.fail_after(60):
            values = [await q.job(job_id).result() for job_id in ids]
    assert values == [i + i for i in range(1000)]
    assert workers[0].stop() == 0


async def test_kill_9_mid_job_loses_nothing(
    redis_url: str, queue_name: str, workers: list[WorkerProcess]
) -> None:
    first = WorkerProcess(redis_url, queue_name, "--concurrency", "10", visibility=1)
    workers.append(first)
    async with client_queue(redis_url, queue_name) as q:
        nap = q.tasks["nap"]
        jobs = [await nap.enqueue(0.5, i) for i in range(30)]

        async def some_running() -> bool:
            return any([await j.state() == JobState.RUNNING for j in jobs])

        await poll_until(some_running, 30)
        first.process.kill()  # kill -9: no chance to hand anything back
        assert first.process.wait(timeout=10) == -signal.SIGKILL
        workers.append(WorkerProcess(redis_url, queue_name, "--concurrency", "10", visibility=1))
        with anyio.fail_after(60):
            values = [await j.result() for j in jobs]
    assert values == list(range(30))
    assert workers[1].stop() == 0


async def test_sigterm_lets_the_running_job_finish(
    redis_url: str, queue_name: str, workers: list[WorkerProcess]
) -> None:
    worker = WorkerProcess(redis_url, queue_name, "--shutdown-timeout", "10")
    workers.append(worker)
    async with client_queue(redis_url, queue_name) as q:
        job = await q.tasks["nap"].enqueue(1.0, 7)

        await poll_until(lambda: code_runs(job), 30)
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=12) == 0
        assert time.monotonic() - started < 10 + 2
        assert await job.state() == JobState.SUCCEEDED
        assert await job.result(timeout=1) == 7


async def test_worker_carries_on_after_redis_restarts(
    queue_name: str, workers: list[WorkerProcess]
) -> None:
    server: RedisServer = start_redis()
    try:
        workers.append(WorkerProcess(server.url, queue_name))
        async with client_queue(server.url, queue_name) as q:
            assert await (await q.tasks["add"].enqueue(1, 1)).result(timeout=30) == 2
        server.stop()
        server.start()  # same port, empty: the worker must find its way back
        async with client_queue(server.url, queue_name) as q:
            assert await (await q.tasks["add"].enqueue(2, 2)).result(timeout=60) == 4
        assert workers[0].process.poll() is None
        assert workers[0].stop() == 0
        assert "broker unreachable" in workers[0].output()
    finally:
        server.stop()


async def test_password_url_works_and_never_shows(
    queue_name: str, workers: list[WorkerProcess]
) -> None:
    server = start_redis("--requirepass", "s3cret-pw")
    try:
        url = f"redis://:s3cret-pw@127.0.0.1:{server.port}/0"
        worker = WorkerProcess(url, queue_name)
        workers.append(worker)
        async with client_queue(url, queue_name) as q:
            assert await (await q.tasks["add"].enqueue(3, 4)).result(timeout=30) == 7
        assert worker.stop() == 0
        log = worker.output()
        assert f"redis://:***@127.0.0.1:{server.port}/0" in log
        assert "s3cret-pw" not in log
        # A wrong password: a clear error, still without the password.
        bad = WorkerProcess(f"redis://:wrong-pw@127.0.0.1:{server.port}/0", queue_name)
        workers.append(bad)
        assert bad.process.wait(timeout=30) == 1
        assert "refused the credentials" in bad.output()  # not "cannot reach": retrying won't help
        assert "Traceback" not in bad.output()
        assert "wrong-pw" not in bad.output()
    finally:
        server.stop()


TLS_PASSWORD = "s3cret-tls"
# What a server certificate needs to be taken for 127.0.0.1 by Python's checks, strict ones included.
SERVER_EXTENSIONS = """subjectAltName=IP:127.0.0.1,DNS:localhost
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
authorityKeyIdentifier=keyid
subjectKeyIdentifier=hash
"""


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """A redis-server with a password that takes TLS on a port of its own, its certificate signed
    by a CA of the test's own: that port, and the CA's certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not installed: the TLS tests cannot make certificates "
                    "(apt-get install openssl)")
    directory = tmp_path_factory.mktemp("tls")
    (directory / "server.ext").write_text(SERVER_EXTENSIONS)
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (["req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
                  "-subj", "/CN=aqueue test CA"],
                 ["req", *new_key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
                 ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                  "-out", "server.crt", "-days", "2", "-extfile", "server.ext"]):
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)
    tls_port = free_port()
    server = start_redis("--requirepass", TLS_PASSWORD, "--tls-port", str(tls_port),
                         "--tls-cert-file", str(directory / "server.crt"),
                         "--tls-key-file", str(directory / "server.key"),
                         "--tls-ca-cert-file", str(directory / "ca.crt"), "--tls-auth-clients", "no")
    yield tls_port, directory / "ca.crt"
    server.stop()


async def test_a_tls_url_with_a_password_works_and_never_shows(
    tls_redis: tuple[int, Path], queue_name: str, workers: list[WorkerProcess]
) -> None:
    # What a managed Redis asks for: rediss://, a password, the provider's CA.
    port, ca = tls_redis
    url = f"rediss://:{TLS_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    worker = WorkerProcess(url, queue_name)
    workers.append(worker)
    async with client_queue(url, queue_name) as q:
        # A result waited on (pushed on a subscription) and a lock, over TLS too.
        assert await (await q.tasks["add"].enqueue(3, 4)).result(timeout=30) == 7
        async with q.lock("over-tls", ttl=5):
            assert await q.tasks["add"].map([(1, 1), (2, 2)]) is not None
    assert worker.stop() == 0
    log = worker.output()
    assert f"rediss://:***@127.0.0.1:{port}/0" in log
    assert TLS_PASSWORD not in log
    # The port speaks TLS alone (the above was TLS), and a server certificate no CA given vouches
    # for is refused with the reason.
    for plain_or_untrusted, reason in (
        (f"redis://:{TLS_PASSWORD}@127.0.0.1:{port}/0", "cannot reach Redis"),
        (f"rediss://:{TLS_PASSWORD}@127.0.0.1:{port}/0", "certificate verify failed"),
    ):
        q = client_queue(plain_or_untrusted, queue_name)
        try:
            with pytest.raises(BrokerConnectionError, match=reason) as refused:
                await q.tasks["add"].enqueue(1, 1)
        finally:
            await q.close()
        assert TLS_PASSWORD not in str(refused.value)


async def test_a_worker_on_memory_says_it_runs_only_its_own_jobs(
    queue_name: str, workers: list[WorkerProcess]
) -> None:
    # A process's memory:// queue is its own: a web app's jobs never reach this worker.
    worker = WorkerProcess("memory://", queue_name)
    workers.append(worker)

    async def started() -> bool:  # the worker's own start-up line comes after the warning
        return ", concurrency " in worker.output()

    await poll_until(started, timeout=30)
    [line] = [line for line in worker.output().splitlines() if "is on memory://" in line]
    assert "WARNING" in line
    assert "never another process's" in line
    assert worker.process.poll() is None  # it runs all the same (periodic tasks may be its work)


async def run_speak(worker: WorkerProcess, redis_url: str, queue_name: str) -> None:
    """Run the logging app's task through the worker, then stop the worker (its log complete)."""
    async with Queue(redis_url, name=queue_name) as q:
        q.task(name="speak")(logging_app.speak.fn)
        await (await q.tasks["speak"].enqueue()).result(timeout=30)
    assert worker.stop() == 0


async def test_an_app_that_sets_up_logging_gets_each_line_once_through_its_own_handlers(
    redis_url: str, queue_name: str, workers: list[WorkerProcess]
) -> None:
    # A handler of the worker's beside the app's wrote every line of aqueue's twice.
    worker = WorkerProcess(redis_url, queue_name, app=LOGGING_APP, env={"AQUEUE_APP_LOGGING": "root"})
    workers.append(worker)
    await run_speak(worker, redis_url, queue_name)
    lines = worker.output().splitlines()
    [start] = [line for line in lines if ", concurrency " in line]
    assert start.startswith("APP INFO aqueue: worker ")
    assert [line for line in lines if "the task speaks" in line] == ["APP WARNING app: the task speaks"]


@pytest.mark.parametrize("app_logging", ["named", "root"])
async def test_a_logfile_takes_aqueues_lines_alone_and_the_apps_go_where_it_sends_them(
    redis_url: str, queue_name: str, workers: list[WorkerProcess], tmp_path: Path, app_logging: str
) -> None:
    logfile = tmp_path / "worker.log"
    worker = WorkerProcess(redis_url, queue_name, "--logfile", str(logfile), app=LOGGING_APP,
                           env={"AQUEUE_APP_LOGGING": app_logging})
    workers.append(worker)
    await run_speak(worker, redis_url, queue_name)
    written, output = logfile.read_text(), worker.output()
    assert ", concurrency " in written
    assert ", concurrency " not in output  # the file, not the app's handlers too
    assert "the task speaks" not in written
    assert [line for line in output.splitlines() if "the task speaks" in line] == [
        "APP WARNING app: the task speaks"]  # once, however the app set up logging


def test_unreachable_redis_at_start_is_one_line_and_exit_1(queue_name: str) -> None:
    port = __import__("tests.conftest", fromlist=["free_port"]).free_port()
    env = {**os.environ, "AQUEUE_URL": f"redis://127.0.0.1:{port}/0", "AQUEUE_QUEUE": queue_name}
    done = subprocess.run([sys.executable, "-m", "aqueue", "run", APP], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if "aqueue:" in line]
    assert len(lines) == 1
    assert f"127.0.0.1:{port}" in lines[0]
    assert "Traceback" not in done.stderr


def test_a_bad_queue_url_is_one_line_and_exit_2(queue_name: str) -> None:
    app_lines = (ROOT / "tests" / "apps" / "worker_app.py").read_text().splitlines()
    where = f"{os.path.join('tests', 'apps', 'worker_app.py')}:{app_lines.index('queue = Queue(') + 1}"
    # The app makes its queue as it is imported: the URL is refused there, before any connection.
    env = {**os.environ, "AQUEUE_URL": "redis://:s3cr#et9@127.0.0.1:6379/0", "AQUEUE_QUEUE": queue_name}
    done = subprocess.run([sys.executable, "-m", "aqueue", "run", APP], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [  # the app's line that made the queue
        f"aqueue: {where}: redis://***: percent-encode the password ('@', '#', '?', "
        "'/' as %40, %23, %3F, %2F): as written, a part of it would be read as the host, database "
        "or query"
    ]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuchmodule:queue", "cannot import module 'nosuchmodule'"),
        ("tests.apps.worker_app:missing", "has no attribute 'missing'"),
        ("tests.apps.worker_app:add", "is an AsyncTask, not an aqueue.Queue"),  # "a AsyncTask"
        ("tests.apps.worker_app:__name__", "is a str, not an aqueue.Queue"),
        ("tests.apps:__doc__", "tests.apps:__doc__ is None, not an aqueue.Queue"),  # "has no attribute"
        (".worker_app:queue", "'.worker_app' is a relative module name"),  # a TypeError's traceback
        ("tests.apps.worker_app:Queue", "is the class Queue, not an aqueue.Queue"),  # "a type"
        ("no-colon", "expected module:attribute"),
    ],
)
def test_bad_target_exits_2(target: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", target]) == 2
    assert message in capsys.readouterr().err


def test_a_queue_with_no_tasks_is_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Its tasks' modules never imported, it started without a word, and sent every job it took to
    # the dead letters as an unknown task. It still runs (SPEC: such a job is dead-lettered, the
    # worker keeps running).
    (tmp_path / "app_bare.py").write_text("from aqueue import Queue\nqueue = Queue('memory://')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    served: list[object] = []
    monkeypatch.setattr(_cli.anyio, "run", lambda run, worker: served.append(worker) or 0)
    with caplog.at_level(logging.WARNING, logger="aqueue"):
        assert main(["run", "app_bare:queue"]) == 0
    assert len(served) == 1
    assert "queue 'default' has no tasks registered: this worker sends every job it takes to the dead " \
           "letters as an unknown task" in caplog.text


def test_an_app_whose_own_import_is_missing_shows_that_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `app_sx` imports a missing `app_s`: not a bad target, but the app's error (it was reported
    # as "cannot import module 'app_sx'", the name being a prefix of it, and the traceback hidden).
    (tmp_path / "app_sx.py").write_text("import app_s\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="'app_s'"):
        main(["run", "app_sx:queue"])


def test_ctrl_c_while_starting_exits_130_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-C during a slow import (here: at once) printed a KeyboardInterrupt's traceback.
    (tmp_path / "app_ki.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["run", "app_ki:queue"]) == 130
    assert capsys.readouterr().err == "aqueue: interrupted while starting\n"


@pytest.mark.parametrize("logfile", ["/nonexistent-dir/aqueue.log", "."])  # no folder; a folder
def test_a_logfile_that_cannot_be_opened_exits_2(
    logfile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "tests.apps.worker_app:queue", f"--logfile={logfile}"]) == 2
    err = capsys.readouterr().err
    assert f"--logfile {logfile}" in err
    assert "Traceback" not in err


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "aqueue", "run", "nosuchmodule:queue"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "cannot import module" in done.stderr


async def test_a_second_signal_while_the_queue_closes_exits_at_once(
    redis_url: str, queue_name: str, workers: list[WorkerProcess]
) -> None:
    # Signals went unwatched once the worker had stopped: a second Ctrl-C while the queue closed
    # raised KeyboardInterrupt there, a traceback, instead of the exit at once the first promised.
    worker = WorkerProcess(redis_url, queue_name, env={"AQUEUE_SLOW_CLOSE": "1"})
    workers.append(worker)
    async with client_queue(redis_url, queue_name) as q:
        job = await q.tasks["add"].enqueue(1, 2)
        assert await job.result(timeout=30) == 3  # the worker runs
    worker.process.send_signal(signal.SIGINT)

    async def closing() -> bool:
        return "closing the queue" in worker.output()

    await poll_until(closing, 30)
    worker.process.send_signal(signal.SIGINT)
    assert worker.process.wait(timeout=10) == 128 + signal.SIGINT
    assert "SIGINT received again: exiting at once" in worker.output()
    assert "Traceback" not in worker.output()


@pytest.mark.parametrize("blocks_loop", [False, True], ids=["free-loop", "blocked-loop"])
async def test_second_signal_exits_at_once(
    redis_url: str, queue_name: str, workers: list[WorkerProcess], blocks_loop: bool
) -> None:
    # With a job blocking the event loop, the loop heard the signals only once the job let go.
    worker = WorkerProcess(redis_url, queue_name, "--shutdown-timeout", "30")
    workers.append(worker)
    async with client_queue(redis_url, queue_name) as q:
        job = await (q.tasks["block_loop"].enqueue(30.0) if blocks_loop
                     else q.tasks["nap"].enqueue(30.0, 1))

        async def first_signal_heard() -> bool:
            return "send it again to exit at once" in worker.output()

        await poll_until(lambda: code_runs(job), 30)
        worker.process.send_signal(signal.SIGTERM)
        await poll_until(first_signal_heard, 10)  # two at once are one to the process
        started = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=5) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 3
        assert "SIGTERM received again: exiting at once" in worker.output()
        # Not handed back: it returns after the visibility timeout, as for a crash.
        assert await job.state() == JobState.RUNNING
