"""Loads the Lua scripts: one file per atomic operation, each prefixed with `_common.lua`.

`register_script` runs them by EVALSHA and reloads them on NOSCRIPT; scripts are addressed by their
content, so two releases of aqueue can share one Redis.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

NAMES = (
    "cancel",
    "claim",
    "enqueue",
    "finish",
    "forget",
    "lock_extend",
    "lock_release",
    "progress",
    "promote",
    "prune",
    "purge",
    "rate_limit",
    "receive",
    "reclaim",
    "release",
    "renew",
    "retry",
    "revoke",
    "start",
    "tick",
    "watch",
)


@cache
def source(name: str) -> str:
    """The full text of one script, common helpers included."""
    folder = resources.files("aqueue.brokers").joinpath("lua")
    common = folder.joinpath("_common.lua").read_text(encoding="utf-8")
    return common + "\n" + folder.joinpath(f"{name}.lua").read_text(encoding="utf-8")
