"""JSON via orjson, with errors that name the value at fault. Nothing is ever pickled or eval-ed."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from aqueue._exceptions import PayloadTooLarge, SerializationError

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    # orjson (3.12+) returns bytes objects that keep at least a 4 KiB buffer, even for b"null":
    # a copy of the right size, so that thousands of held payloads and results do not cost 4 KiB each.
    return memoryview(orjson.dumps(value, option=_OPTIONS)).tobytes()


def _dumps_exact(value: Any) -> bytes:
    """`dumps` for what a task is given or returns: orjson writes NaN and infinity as null, which
    would reach the task (or the caller) as None. Only a payload holding a null is searched
    (`find`: `b"null" in data` takes four times as long on a small payload)."""
    data = dumps(value)
    if data.find(b"null") >= 0 and not _finite(value):
        raise TypeError("NaN and infinity have no JSON form (they would arrive as None)")
    return data


_PLAIN = frozenset({str, int, bool, type(None)})


def _finite(value: Any) -> bool:
    if type(value) in _PLAIN:  # most values are: told apart at the least cost
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    if isinstance(value, list | tuple):
        return all(map(_finite, value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_finite(getattr(value, f.name)) for f in dataclasses.fields(value))
    return True


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def encode_call(
    task: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
    max_size: int,
    *,
    checked: bool = False,
) -> bytes:
    """The payload of one job. Fails here, at enqueue, never in the worker. `checked`: every
    float in it was found finite already (a pipeline step's value and arguments)."""
    call = {"args": list(args), "kwargs": dict(kwargs), "options": dict(options)}
    try:
        data = dumps(call) if checked else _dumps_exact(call)
    except TypeError as exc:
        raise _name_the_culprit(task, args, kwargs, exc) from None
    if len(data) > max_size:
        raise PayloadTooLarge(
            f"the arguments of {task} encode to {len(data)} bytes, over the queue's "
            f"max_payload_size of {max_size} bytes"
        )
    return data


def encode_result(value: Any) -> bytes:
    if value is None:  # what most tasks return
        return b"null"
    try:
        return _dumps_exact(value)
    except TypeError as exc:
        raise SerializationError(
            f"the result ({type(value).__name__}) cannot be serialized as JSON: {exc}"
        ) from None


def _name_the_culprit(
    task: str, args: Sequence[Any], kwargs: Mapping[str, Any], exc: TypeError
) -> SerializationError:
    named: list[tuple[str, Any]] = [(f"argument {i}", a) for i, a in enumerate(args)]
    named += [(f"argument {k!r}", v) for k, v in kwargs.items()]
    for label, value in named:
        try:
            _dumps_exact(value)
        except TypeError as inner:
            return SerializationError(
                f"{label} of {task} ({type(value).__name__}) cannot be serialized as JSON: {inner}"
            )
    return SerializationError(f"the arguments of {task} cannot be serialized as JSON: {exc}")
