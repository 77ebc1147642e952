"""A private redis-server for a benchmark run (never the one on 6379)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import redis


def start_redis(directory: str, *, wrapper: Sequence[str] = (),
                startup: float = 10) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server on a free port, keeping nothing on disk, up and answering: the process and
    its URL. `wrapper` goes before the command (valgrind, say), `startup` bounds the wait."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [*wrapper, binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", directory],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + startup
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.02)
    client.close()
    return process, f"redis://127.0.0.1:{port}/0"


@contextmanager
def private_redis() -> Iterator[str]:
    process, url = start_redis(tempfile.mkdtemp(prefix="aqueue-bench-"))
    try:
        yield url
    finally:
        process.terminate()
        process.wait()
