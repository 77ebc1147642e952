"""Every example runs, so README never drifts from the code."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from aqueue import JobState

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_on_memory() -> None:
    done = subprocess.run([sys.executable, "examples/quickstart.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "add(1, 2) -> 3" in out
    assert "fetched https://example.com on attempt 3" in out
    assert "add.map -> [0, 2, 4, 6, 8]" in out
    assert "too_slow failed: TaskTimeout" in out
    assert out.rstrip().endswith("done")


async def test_app_and_web_handlers(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AQUEUE_URL", redis_url)
    for name in ("examples.web", "examples.app"):
        sys.modules.pop(name, None)
    web = importlib.import_module("examples.web")
    app = importlib.import_module("examples.app")
    async with web.lifespan(None), app.queue.worker():
        created = await web.create_email("a@example.com", "Welcome")
        await app.queue.job(created["job_id"]).result(timeout=30)
        status = await web.job_status(created["job_id"])
        assert status["state"] == JobState.SUCCEEDED.value
        assert status["result"] == {"to": "a@example.com", "subject": "Welcome", "status": "sent"}
        assert status["progress"] == {"done": 1, "total": 1, "message": "sent"}
        assert (await web.job_status("nope"))["state"] == "unknown"
    with anyio.fail_after(5):
        assert await app.add(1, 2) == 3  # a direct call needs no queue
