"""Chaos suite: real worker processes (`python -m aqueue run tests.chaos.apps.chaos_app:queue`) against
private redis-servers, under injected faults: kill -9, Redis restarts, dropped and slowed connections,
a blocked event loop, SIGTERM under load.

    python -m pytest tests/chaos -q -m chaos -p no:randomly --durations=0

Each scenario ends with an accounting (every job succeeded with its expected value or is in the dead
letters with a reason) and prints its figures; they are gathered in a "chaos figures" section at the
end of the run. Jobs record each execution in a separate probe redis-server (keys `chaos:<queue>:*`).
Each module docstring says how its scenario was scaled down to the time budget (about 110 s for the
folder on 2 cores).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos._support import FIGURES, Workers
from tests.conftest import RedisServer, start_redis


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault-injection scenarios")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("chaos figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def probe_server() -> Iterator[RedisServer]:
    """Where jobs record their executions: a server no fault ever touches."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def chaos_name() -> str:
    return f"chaos-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def redis_under_test() -> Iterator[RedisServer]:
    """The queue's server, private to the test (a scenario that restarts Redis starts its own)."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def workers(probe_server: RedisServer, chaos_name: str, tmp_path: Path) -> Iterator[Workers]:
    """Worker processes of the test; set `workers.url` first. Any left running are killed."""
    pool = Workers(tmp_path, "", chaos_name, probe_server.url, visibility=2.0)
    yield pool
    pool.cleanup()
