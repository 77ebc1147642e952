"""`aqueue run`'s command line, as SPEC gives it, read without argparse."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import aqueue
from aqueue import _cli
from aqueue._argv import VERSION, RunArgs, UsageError, parse
from aqueue._cli import main
from aqueue._worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_specs() -> None:
    assert parse(["run", "app:queue"]) == RunArgs(
        "app:queue", concurrency=100, prefetch=0, shutdown_timeout=30.0, no_scheduler=False, verbose=False,
        quiet=False, logfile=None,
    )


@pytest.mark.parametrize(
    "words",
    [
        ["run", "app:queue", "--concurrency", "7", "--prefetch", "3", "--shutdown-timeout", "2.5",
         "--no-scheduler", "-v", "--logfile", "w.log"],
        ["run", "--concurrency=7", "--prefetch=3", "--shutdown-timeout=2.5", "--no-scheduler",
         "--verbose", "--logfile=w.log", "app:queue"],
        ["run", "--conc", "7", "--pre", "3", "--shut=2.5", "--no", "--verb", "--log", "w.log", "--",
         "app:queue"],
    ],
    ids=["spaced", "equals", "prefixes"],
)
def test_every_option_in_each_spelling(words: list[str]) -> None:
    assert parse(words) == RunArgs("app:queue", concurrency=7, prefetch=3, shutdown_timeout=2.5,
                                   no_scheduler=True, verbose=True, logfile="w.log")


def test_quiet() -> None:
    assert parse(["run", "-q", "app:queue"]) == RunArgs("app:queue", quiet=True)
    assert parse(["run", "app:queue", "--quiet"]) == RunArgs("app:queue", quiet=True)


@pytest.mark.parametrize("words", [["-h"], ["--help"], ["run", "-h"], ["run", "app:queue", "--help"]])
def test_help_is_asked(words: list[str]) -> None:
    assert parse(words) is None


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ([], "a command is required"),
        (["work", "app:queue"], "unknown command 'work'"),
        (["run"], "the queue to run is required"),
        (["run", "a:q", "b:q"], "one queue at a time"),
        (["run", "a:q", "--bogus"], "unknown option --bogus"),
        (["run", "a:q", "-x"], "unknown option -x"),
        (["run", "a:q", "--concurrency"], "--concurrency needs a value"),
        (["run", "a:q", "--concurrency", "lots"], "expected a whole number, got 'lots'"),
        (["run", "a:q", "--concurrency=0"], "--concurrency must be at least 1, got 0"),
        (["run", "a:q", "--prefetch", "-1"], "--prefetch must be at least 0, got -1"),
        (["run", "a:q", "--prefetch", "1.5"], "--prefetch: expected a whole number, got '1.5'"),
        (["run", "a:q", "--shutdown-timeout", "-1"], "must be 0 or more seconds"),
        (["run", "a:q", "--shutdown-timeout", "nan"], "must be 0 or more seconds"),
        (["run", "a:q", "--shutdown-timeout", "soon"], "expected a number of seconds"),
        (["run", "a:q", "--no-scheduler=yes"], "--no-scheduler takes no value"),
        (["run", "a:q", "-v", "-q"], "cannot be used together"),
        (["run", "a:q", "--logfile="], "--logfile needs a file name"),  # it logged to stderr
        (["run", "a:q", "--logfile", "-v"], "--logfile needs a value"),  # it wrote a file "-v"
        (["run", "a:q", "--concurrency", "--no-scheduler"], "--concurrency needs a value"),
    ],
)
def test_bad_command_lines_say_why(words: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(words)


def test_a_prefix_names_the_one_option_it_fits() -> None:
    assert parse(["run", "a:q", "--q"]) == RunArgs("a:q", quiet=True)
    assert parse(["run", "a:q", "--s", "1"]) == RunArgs("a:q", shutdown_timeout=1.0)
    with pytest.raises(UsageError, match="unknown option --x"):
        parse(["run", "a:q", "--x"])


def test_main_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "app:queue", "--concurrency", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: aqueue run module:queue")
    assert "aqueue: error: --concurrency must be at least 1, got 0" in err


def test_the_worker_runs_with_the_settings_given(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Worker] = []

    def serve(run: object, worker: Worker) -> int:
        served.append(worker)
        return 0

    monkeypatch.setattr(_cli.anyio, "run", serve)
    monkeypatch.syspath_prepend(str(ROOT))
    level = logging.getLogger("aqueue").level
    try:
        assert main(["run", "tests.apps.worker_app:queue", "--concurrency", "7", "--prefetch", "3",
                     "--shutdown-timeout", "2.5", "--no-scheduler", "-q"]) == 0
    finally:
        logging.getLogger("aqueue").setLevel(level)  # -q set it, for the tests that follow
    [worker] = served
    assert (worker.concurrency, worker.prefetch, worker.shutdown_timeout, worker.scheduler) == (
        7, 3, 2.5, False)


def test_help_lists_every_option_and_exits_0() -> None:
    done = subprocess.run([sys.executable, "-m", "aqueue", "run", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for option in ("--concurrency", "--prefetch", "--shutdown-timeout", "--no-scheduler", "--verbose",
                   "--quiet", "--logfile", "--help"):
        assert option in done.stdout


def test_version_is_shown_and_exits_0() -> None:
    assert parse(["--version"]) == VERSION
    done = subprocess.run([sys.executable, "-m", "aqueue", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"aqueue {aqueue.__version__}\n")


def test_the_worker_does_not_load_argparse() -> None:
    # argparse costs a worker about 0.4 MB for its whole life (see aqueue/_argv.py).
    code = "import sys, aqueue._cli; print('argparse' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "False", done.stderr
