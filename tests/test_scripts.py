"""How the Lua scripts are put together: each carries the common helpers it uses, no others."""

from __future__ import annotations

import redis.asyncio as aioredis

from aqueue.brokers._scripts import NAMES, _blocks, source


def defined_in(script: str) -> set[str]:
    return {name for text, names in _blocks(script) for name in names}


def test_a_script_carries_the_helpers_it_uses_and_theirs() -> None:
    enqueue = defined_in(source("enqueue"))
    # store_job is named by enqueue.lua; make_ready only by store_job; ensure_stream by make_ready
    assert {"store_job", "make_ready", "ensure_stream", "job_key", "stream_key"} <= enqueue
    assert not {"finalize", "start", "after_final", "chord_arrive"} & enqueue
    assert "local function" not in source("lock_release")  # it uses no helper at all


def test_a_forward_declared_helper_comes_with_its_definition() -> None:
    finish = source("finish")
    assert "local finalize\n" in finish
    assert "finalize = function(" in finish
    assert finish.index("local finalize\n") < finish.index("finalize = function(")


async def test_every_script_compiles_on_redis(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        for name in NAMES:
            assert len(await client.script_load(source(name))) == 40, name
    finally:
        await client.aclose()
