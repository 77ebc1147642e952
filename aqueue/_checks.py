"""Checks of the counts users give, shared by the options that take one."""

from __future__ import annotations

import math

from aqueue._exceptions import ConfigurationError


def check_count(value: object, what: str, minimum: int = 1, maximum: int | None = None) -> None:
    """A whole number >= `minimum` (and <= `maximum`): not 1.5, and not True, which Python
    counts as 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigurationError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{what} must be at most {maximum:,}, got {value!r}")


MAX_NAME_BYTES = 1024


def check_name(value: object, what: str) -> None:
    """A non-empty string that UTF-8 can write (Redis keys are bytes): 5 and "5" would be one
    name on Redis and two in memory, and a lone surrogate fails on Redis alone. Bounded as
    payloads are: a name is stored in keys, records and entries, several times over."""
    if isinstance(value, str) and value:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            pass
        else:
            if size <= MAX_NAME_BYTES:
                return
            raise ConfigurationError(f"{what} is at most {MAX_NAME_BYTES} bytes in UTF-8, got "
                                     f"{size} (hash a longer one)")
    raise ConfigurationError(f"{what} is a non-empty string that UTF-8 can write, got {value!r}")


def finite_at_least(value: object, least: float) -> bool:
    """A real number, finite and >= `least`: not NaN (which fails every comparison), not a
    string, and not True, which Python counts as 1."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and least <= value < math.inf)
