"""Request handlers that enqueue jobs and report on them, as a web app would.

They are plain async functions so that they fit any ASGI framework. With FastAPI:

    app = FastAPI(lifespan=lifespan)
    app.post("/emails")(create_email)
    app.get("/jobs/{job_id}")(job_status)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from examples.app import queue, send_email


@asynccontextmanager
async def lifespan(app: object) -> AsyncIterator[None]:
    async with queue:  # connect at start-up, release the connections at shutdown
        yield


async def create_email(to: str, subject: str) -> dict[str, str]:
    job = await send_email.enqueue(to, subject)
    return {"job_id": job.id}


async def job_status(job_id: str) -> dict[str, Any]:
    info = await queue.job(job_id).info()
    if info is None:
        return {"job_id": job_id, "state": "unknown"}
    return {
        "job_id": job_id,
        "state": info.state.value,
        "progress": info.progress,
        "result": info.result,
        "error": info.error and info.error["error"],
    }
