"""`aqueue run module:queue`: a thin command line around `Worker`."""

from __future__ import annotations

import gc
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from types import FrameType

import anyio

from aqueue._argv import HELP, USAGE, RunArgs, UsageError, parse
from aqueue._exceptions import BrokerError, ConfigurationError
from aqueue._queue import Queue
from aqueue._worker import Worker

logger = logging.getLogger("aqueue")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process that Ctrl-C ended


class TargetError(Exception):
    """The `module:attribute` given on the command line does not name a Queue."""


def load_queue(target: str) -> Queue:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise TargetError(f"expected module:attribute (e.g. app:queue), got {target!r}")
    if module_name.startswith("."):  # import_module raises TypeError: it needs a package
        raise TargetError(f"{module_name!r} is a relative module name: name it from the top "
                          "(e.g. app.tasks:queue)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The target itself (or a package above it) is missing; a module it imports that is
        # missing is the app's own error, traceback and all.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise TargetError(f"cannot import module {module_name!r}: {exc}") from None
        raise
    if not hasattr(module, attribute):
        raise TargetError(f"module {module_name!r} has no attribute {attribute!r}")
    queue = getattr(module, attribute)
    if not isinstance(queue, Queue):
        kind = type(queue).__name__
        what = ("None" if queue is None else f"the class {queue.__name__}" if isinstance(queue, type)
                else f"{'an' if kind[:1] in 'AEIOUaeiou' else 'a'} {kind}")
        raise TargetError(f"{target} is {what}, not an aqueue.Queue")
    return queue


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"{USAGE}\naqueue: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args is None:
        print(HELP, end="")
        return 0
    if isinstance(args, str):  # VERSION
        from aqueue import __version__

        print(f"aqueue {__version__}")
        return 0
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    try:
        handler: logging.Handler = (
            logging.FileHandler(args.logfile) if args.logfile else logging.StreamHandler()
        )
    except OSError as exc:
        print(f"{USAGE}\naqueue: error: --logfile {args.logfile}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    try:
        return _run(args, handler, level)
    except KeyboardInterrupt:
        # Ctrl-C before the worker watches for signals (the app's import, a connect that hangs):
        # no job was taken yet, nothing to say but that.
        print("aqueue: interrupted while starting", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close()


def _where(exc: BaseException) -> str | None:
    """The line of the app's own code that led to `exc` ("app.py:12"): the last outside aqueue."""
    package = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not os.path.abspath(f.filename).startswith(package + os.sep) and "<frozen" not in f.filename]
    return f"{os.path.relpath(frames[-1].filename)}:{frames[-1].lineno}" if frames else None


def _run(args: RunArgs, handler: logging.Handler, level: int) -> int:
    try:
        queue = load_queue(args.target)
    except TargetError as exc:
        print(f"aqueue: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigurationError as exc:  # raised as the app was imported: a bad queue URL, say
        print(f"aqueue: {_where(exc) or args.target}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # aqueue's log goes to --logfile alone; else through the handlers of an app that set up
    # logging as it was imported (one of ours beside them would write each line twice); else to
    # stderr. The app's own loggers log where the app sends them.
    if args.logfile or not logging.getLogger().handlers:
        logger.addHandler(handler)
        logger.propagate = not args.logfile
    logger.setLevel(level)
    if queue.broker.url == "memory://":
        # Legit for a process that enqueues its own jobs (periodic tasks), but a web app's jobs,
        # enqueued in its own process, never reach this one: most likely a wrong URL.
        logger.warning("queue %r is on memory://: this worker runs only the jobs its own process "
                       "enqueues (its periodic tasks), never another process's; share a redis:// "
                       "URL with the processes that enqueue", queue.name)
    if not queue.tasks:  # most likely the modules that register them were not imported
        logger.warning("queue %r has no tasks registered: this worker sends every job it takes to the "
                       "dead letters as an unknown task (import the modules that define them where the "
                       "queue is made)", queue.name)
    worker = Worker(queue, concurrency=args.concurrency, prefetch=args.prefetch,
                    scheduler=not args.no_scheduler,
                    shutdown_timeout=args.shutdown_timeout)
    return anyio.run(_serve, worker)


async def _serve(worker: Worker) -> int:
    try:
        await worker.queue.connect()
    except BrokerError as exc:  # unreachable, or it refused us (a wrong password, say)
        print(f"aqueue: {exc}", file=sys.stderr)
        return 1
    try:
        worker.queue.broker.check_for_worker()
    except ConfigurationError as exc:  # a pool too small for a worker, say
        print(f"aqueue: {exc}", file=sys.stderr)
        await worker.queue.close()
        return EXIT_USAGE
    # What start-up made (modules, the app, connections) lives as long as the process: out of the
    # collector's sight, a full collection scans only what jobs make (measured: from 10-30 ms each,
    # stalling every job, down to a few ms).
    gc.freeze()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, worker)
        await worker.run()
        # Closed with the signals still watched: a second one, while a broker is slow to let go,
        # exits at once as the first said, where Python's own handler would raise in the close.
        await worker.queue.close()
        tg.cancel_scope.cancel()
    return 0


async def _watch_signals(worker: Worker) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        _count_signals(worker)
        async for _ in signals:  # the first; a second ends the process before the loop hears it
            worker.stop()


def _count_signals(worker: Worker) -> None:
    """Say the first signal, and exit at once on the second. The event loop hears a signal only
    when it runs: a job that blocks it (a `time.sleep` in an async task) kept a second signal from
    ending the process until it let go. Python runs this handler in the main thread between two
    bytecodes, the loop blocked or not; the loop still hears each signal as before (asyncio's
    wakeup fd is written beneath any Python handler), and stops the worker."""
    heard = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal heard
        heard += 1
        name = signal.Signals(signum).name
        if heard == 1:
            logger.warning("%s received: finishing running jobs for up to %ss, then cancelling "
                           "them, and waiting for threads of plain `def` jobs (send it again to "
                           "exit at once)", name, worker.shutdown_timeout)
            return
        try:
            logger.warning("%s received again: exiting at once; running jobs return after the "
                           "visibility timeout", name)
            logging.shutdown()
        finally:  # a log that cannot be written must not keep the process alive
            os._exit(128 + signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
        # As asyncio set it: a system call a signal interrupts is restarted, not failed with EINTR
        # (signal.signal would leave a C extension's blocking call in a job's thread to fail).
        signal.siginterrupt(signum, False)
