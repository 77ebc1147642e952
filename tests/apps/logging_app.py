"""A worker app that logs from its task, and sets up logging itself as it is imported, as many
apps do: the root logger's (AQUEUE_APP_LOGGING=root) or its own logger's (=named)."""

from __future__ import annotations

import logging
import os

from aqueue import Queue

if os.environ.get("AQUEUE_APP_LOGGING") == "root":
    logging.basicConfig(level=logging.INFO, format="APP %(levelname)s %(name)s: %(message)s")
elif os.environ.get("AQUEUE_APP_LOGGING") == "named":
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("APP %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("app").addHandler(handler)

queue = Queue(os.environ.get("AQUEUE_URL", "redis://127.0.0.1:1/0"),
              name=os.environ.get("AQUEUE_QUEUE", "default"))


@queue.task(name="speak")
async def speak() -> None:
    logging.getLogger("app").warning("the task speaks")
