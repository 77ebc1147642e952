"""How the Lua scripts are put together: each carries the common helpers it uses, no others."""

from __future__ import annotations

from importlib import resources

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


async def test_stream_ids_compare_as_ms_then_seq(redis_url: str) -> None:
    # id_after compares same-shaped ids as strings and parses the others.
    common = (resources.files("aqueue.brokers") / "lua" / "_common.lua").read_text(encoding="utf-8")
    [helper] = [text for text, names in _blocks(common) if "id_after" in names]
    script = helper + "\nreturn id_after(ARGV[1], ARGV[2]) and 1 or 0"
    cases = {
        ("1700000000000-10", "1700000000000-9"): 1,  # the longer seq is not smaller
        ("1700000000000-9", "1700000000000-10"): 0,
        ("1700000000001-0", "1700000000000-0"): 1,
        ("1700000000000-12", "1700000000000-21"): 0,  # one length, dash at one place
        ("1700000000000-21", "1700000000000-12"): 1,
        ("1700000000000-5", "1700000000000-5"): 0,
        ("999-1", "1000-0"): 0,  # one length, dash elsewhere
        ("1000-0", "999-1"): 1,
        ("10-123", "100-12"): 0,
        ("100-12", "10-123"): 1,
    }
    client = aioredis.Redis.from_url(redis_url)
    try:
        for (a, b), after in cases.items():
            assert await client.eval(script, 1, "aqueue:{t}:", a, b) == after, (a, b)
    finally:
        await client.aclose()
