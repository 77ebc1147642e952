"""JSON via orjson, with errors that name the value at fault. Nothing is ever pickled or eval-ed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from aqueue._exceptions import PayloadTooLarge, SerializationError

_OPTIONS = orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    # orjson (3.12+) returns bytes objects that keep at least a 4 KiB buffer, even for b"null":
    # a copy of the right size, so that thousands of held payloads and results do not cost 4 KiB each.
    return memoryview(orjson.dumps(value, option=_OPTIONS)).tobytes()


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def encode_call(
    task: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
    max_size: int,
) -> bytes:
    """The payload of one job. Fails here, at enqueue, never in the worker."""
    try:
        data = dumps({"args": list(args), "kwargs": dict(kwargs), "options": dict(options)})
    except TypeError as exc:
        raise _name_the_culprit(task, args, kwargs, exc) from None
    if len(data) > max_size:
        raise PayloadTooLarge(
            f"the arguments of {task} encode to {len(data)} bytes, over the queue's "
            f"max_payload_size of {max_size} bytes"
        )
    return data


def encode_result(value: Any) -> bytes:
    try:
        return dumps(value)
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
            dumps(value)
        except TypeError as inner:
            return SerializationError(
                f"{label} of {task} ({type(value).__name__}) cannot be serialized as JSON: {inner}"
            )
    return SerializationError(f"the arguments of {task} cannot be serialized as JSON: {exc}")
