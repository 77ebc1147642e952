"""The queue the soak run's worker process serves."""

from __future__ import annotations

import os

from aqueue import Queue

queue = Queue(
    os.environ["AQUEUE_URL"],
    name=os.environ.get("AQUEUE_QUEUE", "soak"),
    result_ttl=float(os.environ.get("AQUEUE_RESULT_TTL", "30")),
)


@queue.task
async def noop() -> None:
    return None
