"""aqueue in one process: a producer and a worker on the in-memory broker, no server needed.

Run it: python examples/quickstart.py
"""

from __future__ import annotations

import anyio

from aqueue import Queue, Signal, TaskError, current_job

queue = Queue("memory://")


@queue.task
async def add(a: int, b: int) -> int:
    return a + b


@queue.task(retries=2, retry_delay=0.1)
async def flaky_fetch(url: str) -> str:
    attempt = current_job().attempt
    if attempt < 3:
        raise ConnectionError(f"{url} did not answer (attempt {attempt})")
    return f"fetched {url} on attempt {attempt}"


@queue.task(timeout=0.2)
async def too_slow() -> None:
    await anyio.sleep(10)


@queue.task
def resize(width: int, height: int) -> list[int]:  # plain functions run in a worker thread
    return [width // 2, height // 2]


@queue.on(Signal.RETRYING)
def show_retry(signal: Signal, job: object, exc: BaseException | None = None) -> None:
    print(f"  retrying {getattr(job, 'task_name', '')}: {exc}")


async def main() -> None:
    async with queue, queue.worker(concurrency=10):
        job = await add.enqueue(1, 2)
        print(f"add(1, 2) -> {await job.result(timeout=5)}")

        job = await flaky_fetch.enqueue("https://example.com")
        print(f"flaky_fetch -> {await job.result(timeout=5)}")

        print(f"resize -> {await (await resize.enqueue(640, 480)).result(timeout=5)}")

        group = await add.map([(i, i) for i in range(5)])
        print(f"add.map -> {await group.get(timeout=5)}")

        later = await add.schedule((20, 22), delay=0.3)
        print(f"scheduled job is {await later.state()}; after its delay -> "
              f"{await later.result(timeout=5)}")

        try:
            await (await too_slow.enqueue()).result(timeout=5)
        except TaskError as exc:
            print(f"too_slow failed: {exc.metadata['type']} after attempt {exc.metadata['attempt']}")

        info = await job.info()
        assert info is not None
        print(f"info: {info.task} {info.state} attempt={info.attempt} worker={info.worker}")
    print("done")


if __name__ == "__main__":
    anyio.run(main)
