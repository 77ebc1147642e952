"""Conversions of the times users give (seconds, timedelta, datetime) to epoch seconds."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

from aqueue._exceptions import ConfigurationError

Seconds: TypeAlias = float | int | timedelta
When: TypeAlias = float | int | timedelta | datetime


def seconds(value: Seconds, what: str) -> float:
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:  # an int past a float's range: as far as a float goes
            result = math.inf if value > 0 else -math.inf
    else:  # "5" or True would pass float() and mean something nobody wrote
        raise ConfigurationError(f"{what} must be seconds or a timedelta, got {value!r}")
    if not result >= 0:  # NaN too
        raise ConfigurationError(f"{what} must be >= 0 seconds, got {value!r}")
    return result


def timedelta_or_seconds(value: Seconds | None, what: str = "a timeout") -> float | None:
    """A duration as seconds, None kept (no limit); unlike `seconds`, any sign passes."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    raise ConfigurationError(f"{what} must be seconds or a timedelta, got {value!r}")


# The longest lock ttl, rate-limit window, result ttl or visibility timeout: Redis refuses an
# expiry (or an idle time) past what its milliseconds hold (a signed 64-bit count: about 9e15
# seconds), and only when the key is written.
LONGEST = 1e15


def finite_seconds(value: Seconds, what: str) -> float:
    """A duration over zero and finite: a lock's ttl, a rate limit's window."""
    result = seconds(value, what)
    if not 0 < result < math.inf:
        raise ConfigurationError(f"{what} must be over 0 seconds and finite, got {value!r}")
    longest(what, result, value)
    return result


def longest(what: str, result: float, value: object) -> None:
    """Refuse a duration longer than `LONGEST`."""
    if result > LONGEST:
        raise ConfigurationError(f"{what} must be at most {LONGEST:.0e} seconds, got {value!r}")


def aware(moment: datetime) -> datetime:
    """Naive datetimes mean UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def epoch(value: When, now: float, what: str) -> float:
    """An absolute time (datetime) or one relative to `now` (seconds or timedelta)."""
    if isinstance(value, datetime):
        return aware(value).timestamp()
    if not isinstance(value, int | float | timedelta) or isinstance(value, bool):
        raise ConfigurationError(f"{what} must be seconds, a timedelta or a datetime, got {value!r}")
    return now + seconds(value, what)


def to_datetime(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)
