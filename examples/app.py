"""A queue on Redis, run by `aqueue run examples.app:queue`.

The URL comes from AQUEUE_URL (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import os

import anyio

from aqueue import Queue, current_job

queue = Queue(os.environ.get("AQUEUE_URL", "redis://127.0.0.1:6379/0"), name="examples")


@queue.task(retries=3, retry_delay=1.0, retry_backoff=2.0, timeout=30)
async def send_email(to: str, subject: str) -> dict[str, str]:
    ctx = current_job()
    await ctx.set_progress(0, 1, "connecting")
    await anyio.sleep(0.05)  # stands for the SMTP conversation
    await ctx.set_progress(1, 1, "sent")
    return {"to": to, "subject": subject, "status": "sent"}


@queue.task
async def add(a: int, b: int) -> int:
    return a + b
