"""Checks of the counts users give, shared by the options that take one."""

from __future__ import annotations

from aqueue._exceptions import ConfigurationError


def check_count(value: object, what: str) -> None:
    """A whole number >= 1: not 1.5, and not True, which Python counts as 1."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigurationError(f"{what} must be a whole number >= 1, got {value!r}")


def check_retries(value: object) -> None:
    """A whole number >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigurationError(f"retries must be a whole number >= 0, got {value!r}")
