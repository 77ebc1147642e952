"""When periodic tasks are due: cron expressions and fixed intervals. Pure time maths, no I/O.

Every schedule answers one question, ``next_after(moment)``: the first tick strictly after
``moment``, as an aware UTC datetime. Ticks depend only on the schedule and the clock, never on
when a process started, so every scheduler process computes the same ticks without talking to
the others.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from calendar import monthrange
from datetime import MAXYEAR, UTC, date, datetime, timedelta
from typing import Self

__all__ = ["Schedule", "crontab", "every"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)

# The rarest satisfiable cron date is 29 February, and the Gregorian calendar can go 8 years
# without one (2096 -> 2104). Searching 8 years ahead therefore finds every tick that exists, so
# "no tick within the bound" really means "never" (e.g. 30 February).
_SEARCH_YEARS = 8

# One comma-separated part of a field: "*", "*/n", "m", "m-n" or "m-n/s".
_PART = re.compile(r"(?:(\*)|(\d+)(?:-(\d+))?)(?:/(\d+))?", re.ASCII)


def _as_utc(moment: datetime) -> datetime:
    """Naive datetimes are taken to be UTC; aware ones are converted."""
    if not isinstance(moment, datetime):  # a date or a string failed later, on a missing attribute
        raise TypeError(f"a schedule takes a datetime, got {moment!r}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


class Schedule(ABC):
    """When a periodic task is due."""

    __slots__ = ()

    @abstractmethod
    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after ``moment`` (naive means UTC), as an aware UTC datetime."""


class every(Schedule):
    """A fixed interval, with ticks aligned to the Unix epoch (tick k is at epoch + k * interval).

    ``every(seconds=30)``, ``every(hours=1, minutes=30)`` or ``every(timedelta(days=1))``.
    """

    __slots__ = ("interval",)

    interval: timedelta

    def __init__(
        self,
        seconds: float | timedelta = 0,
        minutes: float = 0,
        hours: float = 0,
        days: float = 0,
    ) -> None:
        for unit, value in (("seconds", seconds), ("minutes", minutes), ("hours", hours), ("days", days)):
            if isinstance(value, timedelta) and unit == "seconds":
                continue
            # True would be 1, "5" fail at a worker's first tick, infinity overflow a timedelta.
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"every: {unit} must be a finite number, got {value!r}")
        try:  # past what a timedelta holds (999,999,999 days)
            rest = timedelta(minutes=minutes, hours=hours, days=days)
            first = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
            interval = first + rest
        except OverflowError:
            raise ValueError(f"every: the interval is too long, got seconds={seconds!r}, "
                             f"minutes={minutes!r}, hours={hours!r}, days={days!r}") from None
        if interval <= timedelta(0):
            raise ValueError(f"every: the interval must be positive, got {interval!r}")
        self.interval = interval
        try:  # refused now rather than stopping a worker's scheduler at its first use
            self.next_after(datetime.now(UTC))
        except OverflowError:
            raise ValueError(f"every: the interval is too long to have a next tick, got {interval!r}") from None

    def next_after(self, moment: datetime) -> datetime:
        # Whole microseconds keep the arithmetic exact; floor division also handles pre-epoch
        # moments, and "+ 1" makes a moment exactly on a tick move on to the next one.
        step = self.interval // _MICROSECOND
        elapsed = (_as_utc(moment) - _EPOCH) // _MICROSECOND
        return _EPOCH + (elapsed // step + 1) * step * _MICROSECOND

    def __repr__(self) -> str:
        seconds = self.interval.total_seconds()
        return f"every(seconds={int(seconds) if seconds.is_integer() else seconds})"


class crontab(Schedule):
    """A classic five-field cron expression, evaluated in UTC.

    Each field takes ``*``, ``*/n``, ``m``, ``m-n``, ``m-n/s`` and comma lists of these, e.g.
    ``"1,5-10,*/15"``. ``day_of_week`` runs 0-6 from Sunday, and 7 is Sunday too.
    A malformed field raises ``ValueError`` here, not when the schedule is first used.
    """

    __slots__ = ("_day_or_weekday", "_spec", "days", "days_of_week", "hours", "minutes", "months")

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    days_of_week: tuple[int, ...]

    def __init__(
        self,
        minute: str | int = "*",
        hour: str | int = "*",
        day: str | int = "*",
        month: str | int = "*",
        day_of_week: str | int = "*",
    ) -> None:
        self._spec = tuple(str(value) for value in (minute, hour, day, month, day_of_week))
        self.minutes = _parse_field("minute", minute, 0, 59)
        self.hours = _parse_field("hour", hour, 0, 23)
        self.days = _parse_field("day", day, 1, 31)
        self.months = _parse_field("month", month, 1, 12)
        # 7 is an alias for Sunday (0), as in most crons.
        self.days_of_week = tuple(
            sorted({value % 7 for value in _parse_field("day_of_week", day_of_week, 0, 7)})
        )
        # Classic cron: when both day fields are restricted, a date matching either is enough.
        # "Restricted" is judged on the values, so "*/1" or "0-6" behave exactly like "*".
        self._day_or_weekday = len(self.days) < 31 and len(self.days_of_week) < 7
        # Without the weekdays to fall back on, the days must exist in one of the months (the 29th
        # of February does, in leap years): "30 February" would build and never tick.
        longest = max(monthrange(2000, month)[1] for month in self.months)  # 2000: a leap year
        if not self._day_or_weekday and self.days[0] > longest:
            raise ValueError(f"crontab day={day!r} never falls in month={month!r}")

    @classmethod
    def daily(cls) -> Self:
        """Every day at midnight UTC."""
        return cls(minute="0", hour="0")

    @classmethod
    def hourly(cls) -> Self:
        """Every hour on the hour."""
        return cls(minute="0")

    def __call__(self, moment: datetime) -> bool:
        """Whether the minute containing ``moment`` (naive means UTC) is a tick."""
        moment = _as_utc(moment)
        return (
            moment.minute in self.minutes
            and moment.hour in self.hours
            and moment.month in self.months
            and self._day_matches(moment.date())
        )

    def _day_matches(self, day: date) -> bool:
        on_day = day.day in self.days
        on_weekday = day.isoweekday() % 7 in self.days_of_week  # isoweekday: Monday 1 .. Sunday 7
        return (on_day or on_weekday) if self._day_or_weekday else (on_day and on_weekday)

    def next_after(self, moment: datetime) -> datetime:
        # Walk the calendar field by field, visiting only allowed months, then matching days, then
        # allowed hours and minutes, so a rare schedule costs a few hundred steps, not millions.
        start = _as_utc(moment).replace(second=0, microsecond=0) + timedelta(minutes=1)
        last_year = min(start.year + _SEARCH_YEARS, MAXYEAR)
        for year in range(start.year, last_year + 1):
            for month in self.months:
                if (year, month) < (start.year, start.month):
                    continue
                for day_number in range(1, monthrange(year, month)[1] + 1):
                    day = date(year, month, day_number)
                    if day < start.date() or not self._day_matches(day):
                        continue
                    for hour in self.hours:
                        for minute in self.minutes:
                            tick = datetime(year, month, day_number, hour, minute, tzinfo=UTC)
                            if tick >= start:
                                return tick
        raise ValueError(
            f"{self!r} has no tick within {_SEARCH_YEARS} years after {moment.isoformat()}"
        )

    def __repr__(self) -> str:
        names = ("minute", "hour", "day", "month", "day_of_week")
        pairs = zip(names, self._spec, strict=True)
        fields = ", ".join(f"{name}={value!r}" for name, value in pairs)
        return f"crontab({fields})"


def _parse_field(name: str, spec: str | int, low: int, high: int) -> tuple[int, ...]:
    """The sorted values a cron field allows, or ValueError naming the field."""
    text = str(spec).strip()
    if not text:
        raise ValueError(f"crontab {name}: the field is empty")
    values: set[int] = set()
    for part in text.split(","):
        match = _PART.fullmatch(part.strip())
        if match is None:
            raise ValueError(
                f"crontab {name}: cannot parse {part!r}; expected *, */n, m, m-n or m-n/s,"
                " or a comma-separated list of these"
            )
        star, first, last, step_text = match.groups()
        if star:
            start, stop = low, high
        else:
            if step_text is not None and last is None:
                raise ValueError(f"crontab {name}: {part!r} has a step but no range (use m-n/s)")
            start = int(first)
            stop = start if last is None else int(last)
            for value in (start, stop):
                if not low <= value <= high:
                    raise ValueError(
                        f"crontab {name}: {value} in {part!r} is out of range {low}-{high}"
                    )
            if start > stop:
                raise ValueError(f"crontab {name}: range {part!r} runs backwards")
        step = 1 if step_text is None else int(step_text)
        if step == 0:
            raise ValueError(f"crontab {name}: step 0 in {part!r}")
        values.update(range(start, stop + 1, step))
    return tuple(sorted(values))
