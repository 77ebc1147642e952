"""Periodic schedules: cron parsing and matching, next_after, epoch-aligned intervals."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from aqueue._periodic import Schedule, crontab, every

PARIS_WINTER = timezone(timedelta(hours=1))
THIRTEENTH_OR_FRIDAY = crontab(minute="0", hour="0", day="13", day_of_week="5")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# --- crontab matching -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "moment", "expected"),
    [
        ({}, datetime(2026, 1, 1, 13, 37), True),
        ({"minute": "*/5"}, datetime(2026, 1, 1, 0, 10), True),
        ({"minute": "*/5"}, datetime(2026, 1, 1, 0, 11), False),
        ({"minute": "7"}, datetime(2026, 1, 1, 3, 7), True),
        ({"minute": "7"}, datetime(2026, 1, 1, 3, 8), False),
        ({"minute": 7}, datetime(2026, 1, 1, 3, 7), True),
        ({"hour": "9-17"}, datetime(2026, 1, 1, 9, 0), True),
        ({"hour": "9-17"}, datetime(2026, 1, 1, 17, 59), True),
        ({"hour": "9-17"}, datetime(2026, 1, 1, 18, 0), False),
        ({"minute": "10-30/10"}, datetime(2026, 1, 1, 0, 20), True),
        ({"minute": "10-30/10"}, datetime(2026, 1, 1, 0, 25), False),
        ({"minute": "10-30/10"}, datetime(2026, 1, 1, 0, 40), False),
        ({"month": "1,6"}, datetime(2026, 6, 15), True),
        ({"month": "1,6"}, datetime(2026, 7, 15), False),
        ({"minute": "1,5-10,*/15"}, datetime(2026, 1, 1, 0, 1), True),
        ({"minute": "1,5-10,*/15"}, datetime(2026, 1, 1, 0, 7), True),
        ({"minute": "1,5-10,*/15"}, datetime(2026, 1, 1, 0, 45), True),
        ({"minute": "1,5-10,*/15"}, datetime(2026, 1, 1, 0, 2), False),
        ({"minute": "1,5-10,*/15"}, datetime(2026, 1, 1, 0, 11), False),
        ({"minute": "0"}, datetime(2026, 1, 1, 0, 0, 59, 999999), True),  # seconds don't matter
        ({"day_of_week": "1-5"}, datetime(2026, 1, 2), True),  # a Friday
        ({"day_of_week": "1-5"}, datetime(2026, 1, 3), False),  # a Saturday
        ({"day_of_week": "0"}, datetime(2026, 1, 4), True),  # a Sunday
        ({"day_of_week": "7"}, datetime(2026, 1, 4), True),  # 7 is Sunday too
        ({"day_of_week": "5-7"}, datetime(2026, 1, 4), True),
        ({"day_of_week": "5-7"}, datetime(2026, 1, 5), False),  # a Monday
    ],
)
def test_crontab_matching(fields: dict[str, Any], moment: datetime, expected: bool) -> None:
    assert crontab(**fields)(moment) is expected


def test_daily_and_hourly() -> None:
    assert crontab.daily()(datetime(2026, 3, 9, 0, 0))
    assert not crontab.daily()(datetime(2026, 3, 9, 1, 0))
    assert not crontab.daily()(datetime(2026, 3, 9, 0, 1))
    assert crontab.hourly()(datetime(2026, 3, 9, 14, 0))
    assert not crontab.hourly()(datetime(2026, 3, 9, 14, 30))


def test_day_and_weekday_both_restricted_match_either() -> None:
    # 13th of the month OR a Friday.
    schedule = THIRTEENTH_OR_FRIDAY
    assert schedule(datetime(2026, 1, 13))  # a Tuesday, but the 13th
    assert schedule(datetime(2026, 1, 2))  # the 2nd, but a Friday
    assert not schedule(datetime(2026, 1, 3))  # neither


def test_only_one_day_field_restricted_must_match_both() -> None:
    assert not crontab(day="13")(datetime(2026, 1, 2))  # Friday doesn't help
    assert crontab(day="13")(datetime(2026, 1, 13))
    assert not crontab(day_of_week="5")(datetime(2026, 1, 13))  # the 13th doesn't help
    # A field covering its whole range counts as unrestricted, just like "*".
    assert not crontab(day="13", day_of_week="0-6")(datetime(2026, 1, 2))
    assert not crontab(day="*/1", day_of_week="5")(datetime(2026, 1, 13))


def test_aware_datetimes_are_converted_to_utc() -> None:
    schedule = crontab(minute="0", hour="12")
    assert schedule(datetime(2026, 1, 1, 13, 0, tzinfo=PARIS_WINTER))  # 12:00 UTC
    assert not schedule(datetime(2026, 1, 1, 12, 0, tzinfo=PARIS_WINTER))  # 11:00 UTC
    # The conversion can change the date, and so the weekday.
    friday = crontab(day_of_week="5")
    assert friday(datetime(2026, 1, 3, 0, 30, tzinfo=PARIS_WINTER))  # Fri 23:30 UTC


@pytest.mark.parametrize("moment", ["2026-01-01T00:00", date(2026, 1, 1), 1767225600.0])
def test_a_schedule_asked_about_a_non_datetime_says_so(moment: Any) -> None:
    with pytest.raises(TypeError, match="a schedule takes a datetime"):
        crontab(minute="0")(moment)
    for schedule in (crontab(minute="0"), every(seconds=10)):
        with pytest.raises(TypeError, match="a schedule takes a datetime"):
            schedule.next_after(moment)


# --- crontab parsing errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("minute", "60"),
        ("minute", "abc"),
        ("minute", "*/0"),
        ("minute", ""),
        ("minute", "  "),
        ("minute", "30-10"),
        ("minute", "1,,2"),
        ("minute", "1,"),
        ("minute", "5/2"),
        ("minute", "-1"),
        ("minute", "1.5"),
        ("hour", "24"),
        ("hour", "x"),
        ("hour", "0-23/0"),
        ("hour", ""),
        ("hour", "12-1"),
        ("day", "0"),
        ("day", "32"),
        ("day", "first"),
        ("day", "*/0"),
        ("day", ""),
        ("day", "20-10"),
        ("month", "0"),
        ("month", "13"),
        ("month", "jan"),
        ("month", "1-12/0"),
        ("month", ""),
        ("month", "12-1"),
        ("day_of_week", "8"),
        ("day_of_week", "mon"),
        ("day_of_week", "*/0"),
        ("day_of_week", ""),
        ("day_of_week", "6-1"),
        ("day_of_week", "\u0663"),  # ARABIC-INDIC DIGIT THREE: a digit, but not an ASCII one
    ],
)
def test_malformed_field_raises_when_built(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=rf"crontab {field}\b"):
        crontab(**{field: value})


# --- crontab.next_after -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "moment", "expected"),
    [
        # Within the hour, and strictly after a moment that is itself a tick.
        (crontab(minute="*/15"), utc(2026, 5, 5, 10, 0), utc(2026, 5, 5, 10, 15)),
        (crontab(minute="*/15"), utc(2026, 5, 5, 10, 14, 59), utc(2026, 5, 5, 10, 15)),
        (crontab(), utc(2026, 5, 5, 10, 0, 0, 1), utc(2026, 5, 5, 10, 1)),
        # Across the hour, day, month and year.
        (crontab(minute="5"), utc(2026, 5, 5, 10, 30), utc(2026, 5, 5, 11, 5)),
        (crontab.daily(), utc(2026, 5, 5, 0, 0), utc(2026, 5, 6)),
        (crontab.daily(), utc(2026, 1, 31, 12, 0), utc(2026, 2, 1)),
        (
            crontab(minute="30", hour="23", day="31"),
            utc(2026, 1, 31, 23, 30),
            utc(2026, 3, 31, 23, 30),
        ),
        (crontab.daily(), utc(2026, 12, 31, 23, 59), utc(2027, 1, 1)),
        (crontab(minute="0", hour="0", day="1", month="1"), utc(2026, 1, 1), utc(2027, 1, 1)),
        (crontab.hourly(), utc(2026, 12, 31, 23, 0), utc(2027, 1, 1, 0, 0)),
        # Weekdays and the OR rule.
        (crontab(minute="0", hour="9", day_of_week="1"), utc(2026, 1, 1), utc(2026, 1, 5, 9, 0)),
        (THIRTEENTH_OR_FRIDAY, utc(2026, 1, 3), utc(2026, 1, 9)),
        (THIRTEENTH_OR_FRIDAY, utc(2026, 1, 9), utc(2026, 1, 13)),
        # Only the day of month restricted: the 13th of each month, whatever the weekday.
        (crontab(minute="0", hour="0", day="13"), utc(2026, 1, 13), utc(2026, 2, 13)),
        # Leap days, including the eight-year gap over 2100, which is not a leap year.
        (crontab(minute="0", hour="0", day="29", month="2"), utc(2026, 3, 1), utc(2028, 2, 29)),
        (crontab(minute="0", hour="0", day="29", month="2"), utc(2028, 2, 29), utc(2032, 2, 29)),
        (crontab(minute="0", hour="0", day="29", month="2"), utc(2097, 1, 1), utc(2104, 2, 29)),
    ],
)
def test_crontab_next_after(schedule: crontab, moment: datetime, expected: datetime) -> None:
    tick = schedule.next_after(moment)
    assert tick == expected
    assert tick.tzinfo is UTC
    assert schedule(tick)


def test_crontab_next_after_naive_means_utc() -> None:
    tick = crontab(minute="0").next_after(datetime(2026, 5, 5, 10, 30))
    assert tick == utc(2026, 5, 5, 11, 0)
    assert tick.tzinfo is UTC


def test_crontab_next_after_aware_non_utc() -> None:
    # 00:30 in UTC+1 is 23:30 UTC the day before; the next UTC midnight is an hour later.
    tick = crontab.daily().next_after(datetime(2026, 1, 2, 0, 30, tzinfo=PARIS_WINTER))
    assert tick == utc(2026, 1, 2)
    assert tick.tzinfo is UTC


def test_crontab_next_after_agrees_with_minute_by_minute_search() -> None:
    schedules = [
        crontab(minute="1,5-10,*/15", hour="*/7"),
        crontab(minute="59", hour="23", day_of_week="6,0"),
        crontab(minute="0", hour="12", day="1,15", day_of_week="3"),
        crontab(minute="30", day="28-31"),
    ]
    for schedule in schedules:
        moment = utc(2026, 2, 20, 17, 3, 30)
        for _ in range(25):
            tick = schedule.next_after(moment)
            probe = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
            while not schedule(probe):
                probe += timedelta(minutes=1)
            assert tick == probe, schedule
            moment = tick


def test_crontab_that_can_never_tick_raises_when_built() -> None:
    # Built, it would pass every check and then stop the worker's scheduler at its first use.
    with pytest.raises(ValueError, match="never falls"):
        crontab(minute="0", hour="0", day="30", month="2")
    with pytest.raises(ValueError, match="never falls"):
        crontab(day="31", month="4,6,9,11")
    assert crontab(day="29", month="2").next_after(utc(2026, 1, 1)) == utc(2028, 2, 29)
    assert crontab(day="31", month="4,5").next_after(utc(2026, 1, 1)) == utc(2026, 5, 31)
    # With a weekday beside it, either day field is enough (cron's rule): the Mondays of February.
    assert crontab(day="30", month="2", day_of_week="1").next_after(utc(2026, 1, 1)) == utc(2026, 2, 2)


def test_crontab_without_a_tick_before_the_last_year_raises() -> None:
    with pytest.raises(ValueError, match="no tick"):
        crontab(day="29", month="2").next_after(utc(9999, 3, 1))


# --- every --------------------------------------------------------------------------------------


def test_every_ticks_are_aligned_to_the_epoch_and_strictly_after() -> None:
    schedule = every(seconds=10)
    assert schedule.next_after(utc(2026, 1, 1, 0, 0, 3)) == utc(2026, 1, 1, 0, 0, 10)
    assert schedule.next_after(utc(2026, 1, 1, 0, 0, 10)) == utc(2026, 1, 1, 0, 0, 20)
    assert schedule.next_after(utc(2026, 1, 1, 0, 0, 9, 999999)) == utc(2026, 1, 1, 0, 0, 10)
    tick = schedule.next_after(utc(2026, 1, 1, 0, 0, 10))
    assert tick.tzinfo is UTC


def test_every_odd_interval_is_aligned_to_the_epoch() -> None:
    epoch = utc(1970, 1, 1)
    schedule = every(seconds=7)
    tick = schedule.next_after(utc(2026, 7, 4, 12, 34, 56))
    assert (tick - epoch) % timedelta(seconds=7) == timedelta(0)
    assert timedelta(0) < tick - utc(2026, 7, 4, 12, 34, 56) <= timedelta(seconds=7)


def test_every_units_add_up() -> None:
    assert every(minutes=1, seconds=30).interval == timedelta(seconds=90)
    assert every(hours=1, minutes=30).interval == timedelta(minutes=90)
    assert every(timedelta(days=1)).interval == timedelta(days=1)
    assert every(days=1).next_after(utc(2026, 5, 5, 13, 0)) == utc(2026, 5, 6)
    assert every(seconds=0.25).next_after(utc(2026, 1, 1, 0, 0, 0, 300000)) == utc(
        2026, 1, 1, 0, 0, 0, 500000
    )


def test_every_naive_and_aware_inputs() -> None:
    schedule = every(hours=1)
    assert schedule.next_after(datetime(2026, 1, 1, 10, 30)) == utc(2026, 1, 1, 11, 0)
    # 10:30 in UTC+1 is 09:30 UTC.
    tick = schedule.next_after(datetime(2026, 1, 1, 10, 30, tzinfo=PARIS_WINTER))
    assert tick == utc(2026, 1, 1, 10, 0)
    assert tick.tzinfo is UTC


def test_every_before_the_epoch() -> None:
    assert every(seconds=10).next_after(utc(1969, 12, 31, 23, 59, 55)) == utc(1970, 1, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: every(0),
        lambda: every(),
        lambda: every(timedelta(0)),
        lambda: every(seconds=-5),
        lambda: every(minutes=1, seconds=-60),
        lambda: every(seconds=1e-9),  # rounds to zero microseconds
    ],
)
def test_every_needs_a_positive_interval(make: Any) -> None:
    with pytest.raises(ValueError, match="positive"):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: every(seconds=True),  # was every(seconds=1)
        lambda: every(minutes=float("inf")),  # was OverflowError
        lambda: every(hours=float("nan")),
        lambda: every(seconds="5"),  # type: ignore[arg-type]
        lambda: every(days=timedelta(days=1)),  # type: ignore[arg-type]  # a timedelta goes first
    ],
)
def test_every_needs_finite_numbers(make: Any) -> None:
    with pytest.raises(ValueError, match="must be a finite number"):
        make()


def test_every_refuses_an_interval_with_no_next_tick() -> None:
    # Its first tick would fall past the year 9999: refused when built, not at the scheduler's
    # first use of it.
    with pytest.raises(ValueError, match="too long"):
        every(days=3_000_000)
    # Past what a timedelta holds: OverflowError, where every other bad interval is a ValueError.
    with pytest.raises(ValueError, match="too long"):
        every(days=1e9)
    with pytest.raises(ValueError, match="too long"):
        every(seconds=1e17)
    assert every(days=36_500).next_after(datetime(2026, 1, 1, tzinfo=UTC)).year > 2026


# --- the common interface -----------------------------------------------------------------------


def test_schedule_is_abstract_and_shared() -> None:
    with pytest.raises(TypeError):
        Schedule()  # type: ignore[abstract]
    assert isinstance(every(seconds=1), Schedule)
    assert isinstance(crontab(), Schedule)


def test_reprs() -> None:
    assert repr(every(seconds=10)) == "every(seconds=10)"
    assert repr(every(minutes=1, seconds=0.5)) == "every(seconds=60.5)"
    assert repr(crontab.hourly()) == (
        "crontab(minute='0', hour='*', day='*', month='*', day_of_week='*')"
    )
