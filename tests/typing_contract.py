"""What a type checker sees of the public API, checked by `mypy tests/typing_contract.py` (CI).

Not run by pytest: each `assert_type` is a claim mypy checks, and each `type: ignore[...]` a call
mypy must refuse (`--strict` reports an ignore that is no longer needed).
"""

from __future__ import annotations

from typing import Any, assert_type

import aqueue
from aqueue import ChordResult, Job, ResultGroup, chord, group

queue = aqueue.Queue("memory://")


@queue.task
async def add(a: int, b: int) -> int:
    return a + b


@queue.task
def shout(text: str) -> str:
    return text.upper()


@queue.task
async def total(values: list[int]) -> float:
    return float(sum(values))


@queue.on(aqueue.Signal.ERROR)
async def on_error(signal: aqueue.Signal, job: Any, exc: BaseException | None = None) -> None:
    return None


async def tasks() -> None:
    assert_type(await add.enqueue(1, 2), Job[int])
    assert_type(await (await add.enqueue(1, 2)).result(), int)
    assert_type(await shout.enqueue("hi"), Job[str])
    assert_type(await add(1, 2), int)
    assert_type(shout("hi"), str)
    assert_type(await add.options(priority=5).enqueue(1, 2), Job[int])
    await add.enqueue("1", 2)  # type: ignore[arg-type]
    await add.enqueue(1)  # type: ignore[call-arg]
    add.s(1, c=3)  # type: ignore[call-arg]


async def groups() -> None:
    jobs = await add.map([(1, 2), (3, 4)])
    assert_type(jobs, ResultGroup[int])
    assert_type(jobs[0], Job[int])
    assert_type(jobs.jobs, list[Job[int]])
    for job in jobs:
        assert_type(job, Job[int])
    assert_type(await jobs.get(), list[int])
    assert_type(await queue.enqueue(add.s(1, 2)), ResultGroup[int])


async def chords() -> None:
    assert_type(await queue.enqueue(chord([add.s(1, 2)], total)), ChordResult[float])
    assert_type(await (await queue.enqueue(chord([add.s(1, 2)], total))).get(), float)
    assert_type(await queue.enqueue(group([add.s(1, 2)]).then(total)), ChordResult[float])
    assert_type(await queue.enqueue(chord([add.s(1, 2)], total.options(priority=1))), ChordResult[float])
    # Steps after the callback leave `get()` with the callback's value.
    assert_type(await queue.enqueue(chord([add.s(1, 2)], total).then(shout)), ChordResult[float])


async def handlers() -> None:
    # A handler decorated with @queue.on keeps its own signature: `exc` takes an exception.
    await on_error(aqueue.Signal.ERROR, None, "not an exception")  # type: ignore[arg-type]
