"""Loads the Lua scripts: one file per atomic operation, each prefixed with the helpers it uses
from `_common.lua`.

The broker runs them by EVALSHA and loads one on NOSCRIPT; scripts are addressed by their
content, so two releases of aqueue can load theirs side by side in one Redis (what each release
stores is another matter: see the record's `more` flag in README).

Redis runs a script's whole text on every call, so defining a helper costs each call that carries
it (a closure per function, a table per constant): a script carries only the helpers it names,
directly or through other helpers.
"""

from __future__ import annotations

import re
from importlib import resources

NAMES = (
    "cancel",
    "cancel_requested",
    "claim",
    "enqueue",
    "enqueue_plain",
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
    "records",
    "reclaim",
    "recover",
    "regroup",
    "release",
    "renew",
    "retry",
    "revoke",
    "start",
    "states",
    "take",
    "tick",
    "watch",
)

# What a top-level line of _common.lua defines: `local function f`, `local a, b = ...`, a forward
# declaration `local f`, or its later `f = function`.
_DEFINES = re.compile(
    r"^(?:local function (\w+)|local ([\w, ]+?)\s*(?:=|$)|(\w+) = function)", re.MULTILINE
)
_WORD = re.compile(r"[A-Za-z_]\w*")


def _code_words(text: str) -> set[str]:
    """The identifiers a piece of Lua uses, whole-line comments left out (a trailing comment stays:
    a name it mentions only brings a helper more, never one less)."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return set(_WORD.findall(code))


def _blocks(common: str) -> list[tuple[str, set[str]]]:
    """The helpers of _common.lua: blocks separated by blank lines, each with the names it defines."""
    blocks = []
    for block in re.split(r"\n\s*\n", common.strip()):
        names: set[str] = set()
        for match in _DEFINES.finditer(block):
            function, locals_, assigned = match.groups()
            for group in (function, locals_, assigned):
                if group:
                    names.update(n.strip() for n in group.split(","))
        blocks.append((block, names))
    return blocks


# Found once, at import: a worker makes a script's text on its first use, and looking the package
# up then would import by name in the middle of its work.
_FOLDER = resources.files("aqueue.brokers").joinpath("lua")


def source(name: str) -> str:
    """The full text of one script, with the common helpers it needs, in their order."""
    body = _FOLDER.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    blocks = _blocks(_FOLDER.joinpath("_common.lua").read_text(encoding="utf-8"))
    needed = _code_words(body)
    keep = [False] * len(blocks)
    changed = True
    while changed:  # a helper brings the helpers it names in turn
        changed = False
        for i, (text, names) in enumerate(blocks):
            if not keep[i] and (not names or names & needed):
                keep[i] = changed = True
                needed |= _code_words(text)
    kept = [text for (text, _), k in zip(blocks, keep, strict=True) if k]
    return "\n\n".join(kept) + "\n\n" + body
