"""JSON via orjson, with errors that name the value at fault. Nothing is ever pickled or eval-ed."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any

import orjson

from aqueue._exceptions import PayloadTooLarge, SerializationError


def dumps(value: Any) -> bytes:
    try:
        data = orjson.dumps(value)
    except TypeError:  # a dict key that is not a str, most likely
        data = _dumps_other_keys(value)
    # orjson (3.12+) returns bytes objects that keep at least a 4 KiB buffer, even for b"null":
    # a copy of the right size, so that thousands of held payloads and results do not cost 4 KiB each.
    return memoryview(data).tobytes()


def _dumps_other_keys(value: Any) -> bytes:
    """Dict keys that are not str become JSON's string keys (1 becomes "1"). Two keys of one dict
    that become the same one (1 and "1") are refused: read back, one would overwrite the other."""
    data = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    _check_keys(value)
    return data


def _json_key(key: Any) -> bytes:
    return orjson.dumps({key: 0}, option=orjson.OPT_NON_STR_KEYS)[1:-3]


def _check_keys(value: Any) -> None:
    if isinstance(value, dict):
        if not all(type(k) is str for k in value):
            seen: dict[bytes, Any] = {}
            for key in value:
                if isinstance(key, float) and not math.isfinite(key):
                    raise TypeError(f"a dict key {key!r} has no JSON form (it would arrive as 'null')")
                json_key = _json_key(key)
                if json_key in seen:
                    raise TypeError(f"dict keys {seen[json_key]!r} and {key!r} both become the JSON key "
                                    f"{json_key.decode()} (one would overwrite the other)")
                seen[json_key] = key
        values: Any = value.values()
    elif isinstance(value, list | tuple):
        values = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        values = _written_attributes(value)
    else:
        return
    for item in values:
        _check_keys(item)


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
    if isinstance(value, Enum):  # written as its value
        return _finite(value.value)
    if isinstance(value, list | tuple):
        return all(map(_finite, value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(map(_finite, _written_attributes(value)))
    return True


def _written_attributes(instance: Any) -> list[Any]:
    """The values orjson writes of a dataclass instance, those whose names do not start with "_":
    of its `__dict__` (an attribute set beside the fields included), or of its fields where it
    has none (slots)."""
    attributes = getattr(instance, "__dict__", None)
    if attributes is None:
        attributes = {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}
    return [v for k, v in attributes.items() if not k.startswith("_")]


def loads(data: bytes | str) -> Any:
    return orjson.loads(data)


def _within(data: bytes, max_size: int, what: str) -> bytes:
    """`data`, if no bigger than the queue's bound; `what` says what it is ("... encodes")."""
    if len(data) > max_size:
        raise PayloadTooLarge(f"{what} to {len(data)} bytes, over the queue's max_payload_size "
                              f"of {max_size} bytes")
    return data


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
    return _within(data, max_size, f"the arguments of {task} encode")


# How a chord member's error is told to its callback (and an error handler its error), among
# values: a dict of this one key, itself or in lists (see `_errors_restored` in the executor).
ERROR_MARK = "__aqueue_error__"
_ERROR_MARK_JSON = b'"__aqueue_error__"'


def marks_an_error(value: Any) -> bool:
    if isinstance(value, list):
        return any(marks_an_error(v) for v in value)
    return isinstance(value, dict) and len(value) == 1 and ERROR_MARK in value


def encode_result(value: Any, task: str, max_size: int) -> bytes:
    """A job's value as stored: bounded as its arguments are (stored in one write with hundreds
    of others, a result of hundreds of MiB had Redis drop the worker's connection, every time)."""
    if value is None:  # what most tasks return
        return b"null"
    try:
        data = _dumps_exact(value)
    except TypeError as exc:
        raise SerializationError(
            f"the result ({type(value).__name__}) cannot be serialized as JSON: {exc}"
        ) from None
    if _ERROR_MARK_JSON in data and marks_an_error(loads(data)):
        # A chord's callback would take it for a member's error: a value that passes outside
        # data through would forge one.
        raise SerializationError(f"the result of {task} is, or holds in lists, a dict whose one key is "
                                 f"{ERROR_MARK!r}: aqueue marks a chord member's error so")
    return _within(data, max_size, f"the result of {task} encodes")


def encode_progress(done: float, total: float | None, message: str | None, max_size: int) -> bytes:
    try:
        data = _dumps_exact({"done": done, "total": total, "message": message})
    except TypeError as exc:
        raise SerializationError(f"the progress cannot be serialized as JSON: {exc}") from None
    return _within(data, max_size, "the progress encodes")


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
