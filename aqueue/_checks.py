"""Checks of the counts users give, shared by the options that take one."""

from __future__ import annotations

import math

from aqueue._exceptions import ConfigurationError


def check_count(value: object, what: str, minimum: int = 1) -> None:
    """A whole number >= `minimum`: not 1.5, and not True, which Python counts as 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigurationError(f"{what} must be a whole number >= {minimum}, got {value!r}")


def finite_at_least(value: object, least: float) -> bool:
    """A real number, finite and >= `least`: not NaN (which fails every comparison), not a
    string, and not True, which Python counts as 1."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and least <= value < math.inf)
