"""Enqueue N `add` jobs one by one from a process of its own; print their ids."""

from __future__ import annotations

import sys

import anyio

from tests.apps.worker_app import add, queue


async def main(count: int) -> None:
    async with queue:
        for i in range(count):
            job = await add.enqueue(i, i)
            print(job.id)


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]))
