"""Rate policies, sources, release schedules and the exact-rate limiter (pure, no clock)."""

from __future__ import annotations

import collections
import json
import math
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from throttled.rates import (
    ALL_DAYS,
    SPEC_KEYS,
    Limiter,
    Pacing,
    PolicySpec,
    RatePolicy,
    ReleaseSchedule,
    parse_input_fields,
    resolve,
    spec_from_mapping,
)

NY = "America/New_York"
DEFAULTS = PolicySpec(limit=1, period_s=1.0)
FALLBACK = PolicySpec(
    limit=7,
    period_s=70.0,
    pacing="even",
    days=frozenset({6}),
    hours=(time(1), time(2)),
    tz="Europe/Paris",
    start_at=datetime(2030, 1, 1, tzinfo=UTC),
)
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    """An aware UTC datetime."""
    return datetime(year, month, day, hour, minute, sec, tzinfo=UTC)


def max_window_count(sends: list[float], period: float) -> int:
    """Brute force: the largest number of sends e with t - T < e <= t, over send instants t."""
    assert sends == sorted(sends)
    best = 0
    for i, t in enumerate(sends):
        if i + 1 < len(sends) and sends[i + 1] == t:
            continue  # count each instant once, at its last send
        j = i
        while j >= 0 and sends[j] > t - period:
            j -= 1
        best = max(best, i - j)
    return best


# --- input fields -------------------------------------------------------------------------


def test_input_fields_full() -> None:
    fields = {
        "maxThroughput": "10",
        "timePeriod": "2",
        "timeUnit": "Minutes",
        "pacing": "Even",
        "releaseDays": "MON,TUE,WED,THU,FRI",
        "releaseHours": "09:00-17:00",
        "timezone": NY,
        "startAt": "2026-03-09T09:30:00",
        "queueName": "ignored",
    }
    spec, problems = parse_input_fields(fields)
    assert problems == []
    assert spec == PolicySpec(
        limit=10,
        period_s=120.0,
        pacing="even",
        days=frozenset(range(5)),
        hours=(time(9), time(17)),
        tz=NY,
        start_at=utc(2026, 3, 9, 13, 30),  # naive, read in America/New_York (EDT)
    )


def test_input_field_aliases_and_numbers() -> None:
    spec, problems = parse_input_fields({"maxThroughPut": 500, "time": 1.5, "period": "hour"})
    assert problems == []
    assert (spec.limit, spec.period_s) == (500, 5_400.0)


def test_canonical_name_wins_over_alias() -> None:
    spec, _ = parse_input_fields({"maxThroughput": "3", "maxThroughPut": "9", "timeUnit": "day"})
    assert (spec.limit, spec.period_s) == (3, 86_400.0)


def test_time_period_defaults_to_one() -> None:
    spec, problems = parse_input_fields({"maxThroughput": "10", "timeUnit": "seconds"})
    assert problems == []
    assert (spec.limit, spec.period_s) == (10, 1.0)


@pytest.mark.parametrize(
    ("unit", "seconds"),
    [
        ("second", 1),
        ("Seconds", 1),
        ("MINUTE", 60),
        ("minutes", 60),
        ("hour", 3600),
        (" Hours ", 3600),
        ("day", 86400),
        ("DAYS", 86400),
    ],
)
def test_units(unit: str, seconds: float) -> None:
    spec, problems = parse_input_fields({"maxThroughput": 1, "timeUnit": unit})
    assert problems == []
    assert spec.period_s == seconds


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("MON,TUE,WED,THU,FRI", {0, 1, 2, 3, 4}),
        ("mon-fri", {0, 1, 2, 3, 4}),
        ("Mon - Wed, Sat", {0, 1, 2, 5}),
        ("Monday, friday", {0, 4}),
        ("tues;THURS", {1, 3}),
        ("FRI-MON", {4, 5, 6, 0}),
        ("sun", {6}),
    ],
)
def test_release_days(text: str, days: set[int]) -> None:
    spec, problems = parse_input_fields({"releaseDays": text})
    assert problems == []
    assert spec.days == frozenset(days)


@pytest.mark.parametrize(
    ("text", "hours"),
    [
        ("09:00-17:00", (time(9), time(17))),
        ("9:00 - 17:30", (time(9), time(17, 30))),
        ("22:00-06:00", (time(22), time(6))),
        ("09:00-24:00", (time(9), time(0))),
        ("08:15:30–09:00", (time(8, 15, 30), time(9))),
    ],
)
def test_release_hours(text: str, hours: tuple[time, time]) -> None:
    spec, problems = parse_input_fields({"releaseHours": text})
    assert problems == []
    assert spec.hours == hours


@pytest.mark.parametrize(
    ("fields", "start_at"),
    [
        ({"startAt": "2026-03-09T09:30:00Z"}, utc(2026, 3, 9, 9, 30)),
        ({"startAt": "2026-03-09T09:30:00+02:00"}, utc(2026, 3, 9, 7, 30)),
        ({"startAt": "2026-03-09T09:30"}, utc(2026, 3, 9, 9, 30)),
        ({"startAt": "2026-03-09", "timezone": NY}, utc(2026, 3, 9, 4)),
        ({"startAt": "2026-03-08T02:30", "timezone": NY}, utc(2026, 3, 8, 7)),  # skipped
        ({"startAt": "2026-03-09T09:30", "timezone": "Nope/Zone"}, utc(2026, 3, 9, 9, 30)),
    ],
)
def test_input_start_at(fields: dict[str, str], start_at: datetime) -> None:
    spec, _ = parse_input_fields(fields)
    assert spec.start_at == start_at


def test_empty_strings_are_absent() -> None:
    names = ["maxThroughput", "timePeriod", "timeUnit", "pacing", "releaseDays"]
    names += ["releaseHours", "timezone", "startAt"]
    spec, problems = parse_input_fields(dict.fromkeys(names, "  "))
    assert (spec, problems) == (PolicySpec(), [])


INVALID: list[tuple[dict[str, Any], str, str]] = [
    (
        {"maxThroughput": "ten", "timeUnit": "seconds"},
        "maxThroughput",
        "'ten' is not a positive integer",
    ),
    ({"maxThroughput": "0", "timeUnit": "seconds"}, "maxThroughput", "'0'"),
    ({"maxThroughput": -3, "timeUnit": "seconds"}, "maxThroughput", "-3"),
    ({"maxThroughput": "2.5", "timeUnit": "seconds"}, "maxThroughput", "'2.5'"),
    ({"maxThroughput": "1000001", "timeUnit": "seconds"}, "maxThroughput", "exceeds 1000000"),
    ({"maxThroughput": True, "timeUnit": "seconds"}, "maxThroughput", "True"),
    ({"maxThroughPut": "many", "timeUnit": "seconds"}, "maxThroughPut", "'many'"),
    ({"maxThroughput": 5, "timePeriod": "0", "timeUnit": "days"}, "timePeriod", "'0'"),
    ({"maxThroughput": 5, "timePeriod": "-1", "timeUnit": "days"}, "timePeriod", "'-1'"),
    ({"maxThroughput": 5, "timePeriod": "abc", "timeUnit": "days"}, "timePeriod", "'abc'"),
    ({"maxThroughput": 5, "timePeriod": "nan", "timeUnit": "days"}, "timePeriod", "'nan'"),
    ({"maxThroughput": 5, "time": "inf", "timeUnit": "days"}, "time", "'inf'"),
    ({"maxThroughput": 5, "timePeriod": 367, "timeUnit": "days"}, "timePeriod", "366 days"),
    ({"maxThroughput": 5, "timeUnit": "weeks"}, "timeUnit", "'weeks' is not a time unit"),
    ({"maxThroughput": 5, "period": "fortnight"}, "period", "'fortnight'"),
    ({"maxThroughput": 5, "timeUnit": 60}, "timeUnit", "60"),
    ({"maxThroughput": 5}, "timeUnit", "missing"),
    ({"timeUnit": "hours"}, "maxThroughput", "missing"),
    ({"pacing": "fast"}, "pacing", "'fast' is not a pacing"),
    ({"releaseDays": "MON,FUNDAY"}, "releaseDays", "unknown day 'FUNDAY'"),
    ({"releaseDays": "M"}, "releaseDays", "unknown day 'M'"),
    ({"releaseDays": "MON-"}, "releaseDays", "'MON-'"),
    ({"releaseDays": ","}, "releaseDays", "names no days"),
    ({"releaseDays": 5}, "releaseDays", "5"),
    ({"releaseHours": "9-17"}, "releaseHours", "'9-17' is not HH:MM-HH:MM"),
    ({"releaseHours": "25:00-26:00"}, "releaseHours", "'25:00-26:00'"),
    ({"releaseHours": "09:60-10:00"}, "releaseHours", "'09:60-10:00'"),
    ({"releaseHours": "24:00-01:00"}, "releaseHours", "'24:00-01:00'"),
    ({"releaseHours": 9}, "releaseHours", "9"),
    ({"timezone": "Mars/Base"}, "timezone", "'Mars/Base' is not an IANA time zone"),
    ({"timezone": "../../etc/passwd"}, "timezone", "passwd"),
    ({"timezone": 42}, "timezone", "42"),
    ({"startAt": "tomorrow"}, "startAt", "'tomorrow' is not an ISO-8601 date-time"),
    ({"startAt": "2026-13-01"}, "startAt", "'2026-13-01'"),
    ({"startAt": 1700000000}, "startAt", "1700000000"),
]


@pytest.mark.parametrize(("fields", "name", "message"), INVALID)
def test_invalid_input_field_is_reported_and_falls_through(
    fields: dict[str, Any], name: str, message: str
) -> None:
    spec, problems = parse_input_fields(fields)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"inputFields.{name}: ")
    assert message in problems[0]
    policy = resolve([spec, FALLBACK, DEFAULTS])
    assert policy == resolve([FALLBACK, DEFAULTS])


def test_one_bad_field_keeps_the_good_ones() -> None:
    spec, problems = parse_input_fields(
        {"maxThroughput": "4", "timeUnit": "minute", "releaseDays": "XYZ", "pacing": "even"}
    )
    assert problems == ["inputFields.releaseDays: 'XYZ' has an unknown day 'XYZ'"]
    policy = resolve([spec, FALLBACK])
    assert (policy.limit, policy.period_s, policy.pacing) == (4, 60.0, "even")
    assert policy.schedule is not None
    assert policy.schedule.days == FALLBACK.days


# --- config mappings ----------------------------------------------------------------------


def test_spec_from_mapping() -> None:
    spec = spec_from_mapping(
        {
            "max_throughput": 100,
            "time_period": 10,
            "time_unit": "seconds",
            "pacing": "window",
            "release_days": ["MON", "WED"],
            "release_hours": "08:00-18:00",
            "timezone": "Europe/Berlin",
            "start_at": datetime(2026, 1, 5, 8, 0),  # TOML local date-time: naive
            "other_setting": True,
        },
        where="defaults",
    )
    assert spec == PolicySpec(
        limit=100,
        period_s=10.0,
        pacing="window",
        days=frozenset({0, 2}),
        hours=(time(8), time(18)),
        tz="Europe/Berlin",
        start_at=utc(2026, 1, 5, 7),
    )
    assert "max_throughput" in SPEC_KEYS


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"max_throughput": "ten", "time_unit": "s"}, "cfg.max_throughput: 'ten'"),
        ({"max_throughput": 1, "time_unit": "weeks"}, "cfg.time_unit: 'weeks'"),
        ({"max_throughput": 1}, "cfg.time_unit: missing"),
        ({"time_period": 2}, "cfg.max_throughput: missing"),
        ({"timezone": "Nowhere/Land"}, "cfg.timezone: 'Nowhere/Land'"),
        ({"release_hours": "9-5"}, "cfg.release_hours: '9-5'"),
        ({"start_at": "soon"}, "cfg.start_at: 'soon'"),
    ],
)
def test_spec_from_mapping_errors_are_fatal(d: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec_from_mapping(d, where="cfg")


def test_spec_from_mapping_date_value() -> None:
    spec = spec_from_mapping({"start_at": date(2026, 6, 1), "timezone": NY}, where="cfg")
    assert spec.start_at == utc(2026, 6, 1, 4)


# --- resolve ------------------------------------------------------------------------------


def test_resolve_priority() -> None:
    override = PolicySpec(limit=1, period_s=60.0)
    inputs = PolicySpec(limit=10, period_s=1.0, pacing="even", hours=(time(9), time(17)))
    admin = PolicySpec(limit=50, period_s=1.0, days=frozenset({0}), tz=NY)
    defaults = PolicySpec(limit=100, period_s=1.0, pacing="window", tz="UTC")
    policy = resolve([override, inputs, admin, defaults])
    assert policy == RatePolicy(
        limit=1,
        period_s=60.0,
        pacing="even",
        schedule=ReleaseSchedule(days=frozenset({0}), start=time(9), end=time(17), tz=NY),
    )
    assert resolve([PolicySpec(), inputs, defaults]).limit == 10


def test_resolve_rate_needs_both_fields() -> None:
    half = PolicySpec(limit=5)
    assert resolve([half, PolicySpec(period_s=3.0), DEFAULTS]) == RatePolicy(limit=1, period_s=1)


def test_resolve_defaults() -> None:
    policy = resolve([PolicySpec(), DEFAULTS])
    assert policy == RatePolicy(limit=1, period_s=1.0, pacing="window", schedule=None)
    only_tz = resolve([PolicySpec(tz=NY), DEFAULTS])
    assert only_tz.schedule is None
    days = resolve([PolicySpec(days=frozenset({5})), DEFAULTS])
    assert days.schedule == ReleaseSchedule(days=frozenset({5}), tz="UTC")


def test_resolve_without_rate() -> None:
    with pytest.raises(ValueError, match="no source gives a rate"):
        resolve([PolicySpec(pacing="even")])


# --- RatePolicy ---------------------------------------------------------------------------


def test_policy_json_round_trip() -> None:
    schedule = ReleaseSchedule(
        days=frozenset({0, 1, 2, 3, 4}),
        start=time(9),
        end=time(17),
        tz=NY,
        start_at=datetime(2026, 3, 9, 9, tzinfo=timezone(timedelta(hours=-4))),
    )
    policy = RatePolicy(limit=10, period_s=1, pacing="even", schedule=schedule)
    data = json.loads(json.dumps(policy.to_json()))
    assert data == {
        "limit": 10,
        "period_s": 1.0,
        "pacing": "even",
        "schedule": {
            "days": [0, 1, 2, 3, 4],
            "start": "09:00:00",
            "end": "17:00:00",
            "tz": NY,
            "start_at": "2026-03-09T13:00:00+00:00",
        },
    }
    assert RatePolicy.from_json(data) == policy
    plain = RatePolicy(limit=3, period_s=2.5)
    assert RatePolicy.from_json(json.loads(json.dumps(plain.to_json()))) == plain


@pytest.mark.parametrize(
    ("policy", "text"),
    [
        (RatePolicy(limit=10, period_s=1), "10 per 1 second, window"),
        (RatePolicy(limit=500, period_s=3600, pacing="even"), "500 per 1 hour, even"),
        (RatePolicy(limit=2, period_s=90), "2 per 90 seconds"),
        (RatePolicy(limit=2, period_s=0.5), "2 per 0.5 seconds"),
        (RatePolicy(limit=1, period_s=172800), "1 per 2 days"),
        (
            RatePolicy(
                limit=5,
                period_s=60,
                schedule=ReleaseSchedule(
                    days=frozenset(range(5)), start=time(9), end=time(17), tz=NY
                ),
            ),
            "5 per 1 minute, window, Mon-Fri 09:00-17:00 America/New_York",
        ),
    ],
)
def test_describe(policy: RatePolicy, text: str) -> None:
    assert policy.describe().startswith(text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit": 0, "period_s": 1},
        {"limit": True, "period_s": 1},
        {"limit": 1, "period_s": 0},
        {"limit": 1, "period_s": math.inf},
        {"limit": 1, "period_s": 1, "pacing": "fast"},
    ],
)
def test_policy_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"limit|period_s|pacing"):
        RatePolicy(**kwargs)


def test_from_json_malformed() -> None:
    with pytest.raises(ValueError, match="malformed"):
        RatePolicy.from_json({"period_s": 1})


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="IANA"):
        ReleaseSchedule(tz="Nope/Nope")
    with pytest.raises(ValueError, match="together"):
        ReleaseSchedule(start=time(9))
    with pytest.raises(ValueError, match=r"0\.\.6"):
        ReleaseSchedule(days=frozenset({7}))
    with pytest.raises(ValueError, match="naive"):
        ReleaseSchedule(start_at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        ReleaseSchedule().next_open(datetime(2026, 1, 1))


# --- schedules ----------------------------------------------------------------------------

OFFICE_NY = ReleaseSchedule(days=frozenset(range(5)), start=time(9), end=time(17), tz=NY)


def test_next_open_across_day_boundary() -> None:
    daily = ReleaseSchedule(start=time(9), end=time(17))
    assert daily.next_open(utc(2026, 5, 5, 18)) == utc(2026, 5, 6, 9)
    assert daily.next_open(utc(2026, 5, 5, 8, 59)) == utc(2026, 5, 5, 9)
    assert daily.next_open(utc(2026, 5, 5, 12)) == utc(2026, 5, 5, 12)
    assert daily.next_close(utc(2026, 5, 5, 12)) == utc(2026, 5, 5, 17)
    assert daily.next_close(utc(2026, 5, 5, 18)) == utc(2026, 5, 6, 17)
    assert not daily.is_open(utc(2026, 5, 5, 17))  # end is exclusive
    assert daily.is_open(utc(2026, 5, 5, 16, 59, 59))


def test_next_open_across_weekend() -> None:
    # Friday 2026-05-08 18:00 EDT -> Monday 2026-05-11 09:00 EDT
    assert OFFICE_NY.next_open(utc(2026, 5, 8, 22)) == utc(2026, 5, 11, 13)
    assert OFFICE_NY.next_open(utc(2026, 5, 9, 15)) == utc(2026, 5, 11, 13)
    assert not OFFICE_NY.is_open(utc(2026, 5, 9, 15))


def test_overnight_window_belongs_to_its_start_day() -> None:
    nights = ReleaseSchedule(days=frozenset(range(5)), start=time(22), end=time(6), tz="UTC")
    assert nights.is_open(utc(2026, 5, 8, 23))  # Friday night
    assert nights.is_open(utc(2026, 5, 9, 5, 59))  # Saturday morning: Friday's window
    assert nights.next_close(utc(2026, 5, 9, 1)) == utc(2026, 5, 9, 6)
    assert not nights.is_open(utc(2026, 5, 9, 23))  # Saturday night
    assert not nights.is_open(utc(2026, 5, 11, 3))  # Monday morning: Sunday's window
    assert nights.next_open(utc(2026, 5, 9, 7)) == utc(2026, 5, 11, 22)
    assert nights.next_open(utc(2026, 5, 11, 5)) == utc(2026, 5, 11, 22)


def test_days_only_schedule_closes_at_end_of_run() -> None:
    weekdays = ReleaseSchedule(days=frozenset(range(5)), tz=NY)
    assert weekdays.next_open(utc(2026, 5, 9, 12)) == utc(2026, 5, 11, 4)
    assert weekdays.next_close(utc(2026, 5, 12, 12)) == utc(2026, 5, 16, 4)


def test_spring_forward_regular_hours() -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT; 09:00 local moves from 14:00 to 13:00 UTC.
    daily = ReleaseSchedule(start=time(9), end=time(17), tz=NY)
    assert daily.next_open(utc(2026, 3, 7, 23)) == utc(2026, 3, 8, 13)
    assert daily.next_close(utc(2026, 3, 8, 13)) == utc(2026, 3, 8, 21)
    assert daily.next_open(utc(2026, 3, 6, 0)) == utc(2026, 3, 6, 14)
    assert OFFICE_NY.next_open(utc(2026, 3, 6, 22)) == utc(2026, 3, 9, 13)


def test_spring_forward_start_in_gap_uses_first_valid_instant() -> None:
    early = ReleaseSchedule(start=time(2, 30), end=time(4), tz=NY)
    assert early.next_open(utc(2026, 3, 8, 5)) == utc(2026, 3, 8, 7)  # 03:00 EDT
    assert early.next_close(utc(2026, 3, 8, 5)) == utc(2026, 3, 8, 8)  # 04:00 EDT
    assert early.next_open(utc(2026, 3, 7, 5)) == utc(2026, 3, 7, 7, 30)  # 02:30 EST
    assert early.next_open(utc(2026, 3, 8, 9)) == utc(2026, 3, 9, 6, 30)  # 02:30 EDT


def test_spring_forward_window_inside_gap_is_skipped() -> None:
    inside = ReleaseSchedule(start=time(2), end=time(2, 45), tz=NY)
    assert inside.next_open(utc(2026, 3, 8, 5)) == utc(2026, 3, 9, 6)  # Mar 9 02:00 EDT


def test_fall_back_repeated_hour_opens_once() -> None:
    # 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:00-01:30 happens twice on the clock.
    short = ReleaseSchedule(start=time(1), end=time(1, 30), tz=NY)
    assert short.next_open(utc(2026, 11, 1, 4)) == utc(2026, 11, 1, 5)  # 01:00 EDT
    assert short.next_close(utc(2026, 11, 1, 4)) == utc(2026, 11, 1, 5, 30)
    assert short.is_open(utc(2026, 11, 1, 5, 15))
    assert not short.is_open(utc(2026, 11, 1, 6, 15))  # 01:15 EST, the repeat
    assert short.next_open(utc(2026, 11, 1, 6)) == utc(2026, 11, 2, 6)  # Nov 2 01:00 EST


def test_fall_back_overnight_window_is_one_interval() -> None:
    nights = ReleaseSchedule(start=time(22), end=time(6), tz=NY)
    assert nights.next_open(utc(2026, 10, 31, 20)) == utc(2026, 11, 1, 2)  # 22:00 EDT
    assert nights.next_close(utc(2026, 11, 1, 2)) == utc(2026, 11, 1, 11)  # 06:00 EST
    assert OFFICE_NY.next_open(utc(2026, 10, 30, 22)) == utc(2026, 11, 2, 14)


def test_schedule_start_at() -> None:
    later = ReleaseSchedule(start_at=utc(2026, 4, 1, 12))
    assert later.next_open(utc(2026, 3, 1)) == utc(2026, 4, 1, 12)
    assert later.next_close(utc(2026, 3, 1)) is None
    assert not later.is_open(utc(2026, 4, 1, 11, 59))
    assert later.is_open(utc(2026, 4, 1, 12))
    office = ReleaseSchedule(start=time(9), end=time(17), start_at=utc(2026, 4, 1, 20))
    assert office.next_open(utc(2026, 3, 1)) == utc(2026, 4, 2, 9)
    mid = ReleaseSchedule(start=time(9), end=time(17), start_at=utc(2026, 4, 1, 10))
    assert mid.next_open(utc(2026, 4, 1, 9)) == utc(2026, 4, 1, 10)
    assert mid.next_close(utc(2026, 4, 1, 9)) == utc(2026, 4, 1, 17)


def test_never_and_always() -> None:
    never = ReleaseSchedule(days=frozenset())
    assert never.next_open(utc(2026, 1, 1)) is None
    assert never.next_close(utc(2026, 1, 1)) is None
    always = ReleaseSchedule(tz=NY)
    assert always.next_open(utc(2026, 1, 1)) == utc(2026, 1, 1)
    assert always.next_close(utc(2026, 1, 1)) is None
    full = ReleaseSchedule(start=time(0), end=time(0), days=ALL_DAYS)
    assert full.next_close(utc(2026, 1, 1)) is None


schedules = st.builds(
    ReleaseSchedule,
    days=st.frozensets(st.integers(0, 6), min_size=1),
    start=st.times().map(lambda t: t.replace(microsecond=0)),
    end=st.times().map(lambda t: t.replace(microsecond=0)),
    tz=st.sampled_from([NY, "UTC", "Europe/London", "Australia/Lord_Howe", "Asia/Kolkata"]),
)
instants = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
)


@FAST
@given(schedule=schedules, t=instants, fractions=st.lists(st.floats(0, 0.999), max_size=8))
def test_schedule_open_close_consistent(
    schedule: ReleaseSchedule, t: datetime, fractions: list[float]
) -> None:
    opened, closed = schedule.next_open(t), schedule.next_close(t)
    assert opened is not None
    if schedule.always_open:
        assert (opened, closed) == (t, None)
        return
    assert closed is not None
    assert t <= opened < closed
    assert schedule.is_open(opened)
    assert not schedule.is_open(closed)
    for f in fractions:
        if (before := t + (opened - t) * f) < opened:
            assert not schedule.is_open(before)
        if (inside := opened + (closed - opened) * f) < closed:
            assert schedule.is_open(inside)


# --- limiter: examples --------------------------------------------------------------------


def test_window_limiter_basics() -> None:
    limiter = Limiter(RatePolicy(limit=3, period_s=10))
    assert limiter.allowance(100.0) == 3
    limiter.record(100.0, 2)
    assert limiter.allowance(100.0) == 1
    limiter.record(100.0, 1)
    assert limiter.allowance(105.0) == 0
    assert limiter.earliest(105.0) == 110.0
    assert limiter.allowance(110.0) == 3
    assert limiter.window_count(109.0) == 3


def test_even_limiter_spacing() -> None:
    limiter = Limiter(RatePolicy(limit=4, period_s=1, pacing="even"))
    assert limiter.allowance(0.0) == 1
    limiter.record(0.0, 1)
    assert limiter.allowance(0.1) == 0
    assert limiter.earliest(0.1) == 0.25
    assert limiter.plan(0.0, 1.0, 10) == [0.25, 0.5, 0.75]
    assert limiter.window_count(0.0) == 1  # plan does not touch the log


def test_stale_instant_gets_nothing_and_out_of_order_records_count() -> None:
    limiter = Limiter(RatePolicy(limit=5, period_s=10))
    limiter.record(50.0, 1)
    limiter.record(45.0, 2)  # recorded late
    limiter.record(39.0, 1)  # recorded late and already outside every future window
    assert limiter.allowance(47.0) == 0
    assert limiter.earliest(47.0) == 50.0
    assert limiter.window_count(50.0) == 3
    assert limiter.allowance(50.0) == 2
    assert limiter.earliest(50.0) == 50.0


def test_set_policy_keeps_log() -> None:
    limiter = Limiter(RatePolicy(limit=10, period_s=60))
    limiter.record(0.0, 6)
    limiter.set_policy(RatePolicy(limit=5, period_s=60))
    assert limiter.policy.limit == 5
    assert limiter.allowance(1.0) == 0
    assert limiter.earliest(1.0) == 60.0


def test_log_is_pruned() -> None:
    limiter = Limiter(RatePolicy(limit=10, period_s=1, pacing="even"))
    t = 0.0
    for _ in range(10_000):
        t = limiter.earliest(t)
        limiter.record(t, limiter.allowance(t))
    assert len(limiter._log) <= 11
    assert limiter.window_count(t) <= 10


def test_plan_window_batches() -> None:
    limiter = Limiter(RatePolicy(limit=3, period_s=10))
    limiter.record(0.0, 1)
    limiter.record(5.0, 1)
    assert limiter.plan(6.0, 30.0, 8) == [6.0, 10.0, 15.0, 16.0, 20.0, 25.0, 26.0, 30.0]
    assert limiter.plan(6.0, 30.0, 2) == [6.0, 10.0]
    assert limiter.plan(6.0, 3.0, 8) == [6.0]


def test_limiter_with_schedule() -> None:
    schedule = ReleaseSchedule(start=time(9), end=time(17), start_at=utc(2026, 5, 5, 12))
    limiter = Limiter(RatePolicy(limit=2, period_s=3600, schedule=schedule))
    before = utc(2026, 5, 5, 1).timestamp()
    assert limiter.allowance(before) == 0
    assert limiter.earliest(before) == utc(2026, 5, 5, 12).timestamp()
    evening = utc(2026, 5, 5, 16, 30).timestamp()
    limiter.record(evening, 2)
    assert limiter.earliest(evening) == utc(2026, 5, 6, 9).timestamp()
    hours = [utc(2026, 5, 6, h).timestamp() for h in (9, 9, 10, 10, 11)]
    assert limiter.plan(evening, 86_400, 5) == hours
    never = Limiter(RatePolicy(limit=1, period_s=1, schedule=ReleaseSchedule(days=frozenset())))
    assert never.earliest(0.0) == math.inf
    assert never.plan(0.0, 1e6, 3) == []
    assert never.backlog_eta(0.0, 3) == math.inf


def test_backlog_eta() -> None:
    window = Limiter(RatePolicy(limit=10, period_s=60))
    assert window.backlog_eta(0.0, 0) == 0.0
    assert window.backlog_eta(0.0, 10) == 0.0
    assert window.backlog_eta(0.0, 35) == 180.0  # 10 now, then 3 more batches
    even = Limiter(RatePolicy(limit=5, period_s=10, pacing="even"))
    assert even.backlog_eta(0.0, 5) == 8.0
    office = ReleaseSchedule(start=time(9), end=time(17))  # 8 open hours a day
    hourly = Limiter(RatePolicy(limit=1, period_s=3600, pacing="even", schedule=office))
    start = utc(2026, 5, 5, 9).timestamp()
    assert hourly.backlog_eta(start, 9) == utc(2026, 5, 6, 9).timestamp()
    assert hourly.backlog_eta(start, 8 * 30 + 1) == utc(2026, 6, 4, 9).timestamp()


# --- limiter: properties ------------------------------------------------------------------

policies = st.builds(
    RatePolicy,
    limit=st.integers(1, 50),
    period_s=st.floats(0.05, 5000),
    pacing=st.sampled_from(["window", "even"]),
)
starts = st.sampled_from([0.0, 12_345.678, 1.7e9])
steps = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(0, 0.3), st.floats(0, 2.5)),  # extra delay x T
        st.integers(0, 60),  # work arriving
    ),
    min_size=1,
    max_size=150,
)


def drive(limiter: Limiter, start: float, plan: list[tuple[float, int]]) -> list[float]:
    """Simulate a scheduler: wait for earliest, maybe late, then send what is allowed."""
    period, now, backlog, sends = limiter.policy.period_s, start, 0, []
    for delay, arriving in plan:
        backlog += arriving
        if backlog == 0:
            now += delay * period
            continue
        ready = limiter.earliest(now)
        assert ready >= now
        now = ready + delay * period
        allowed = limiter.allowance(now)
        assert allowed >= 1 or delay > 0
        k = min(allowed, backlog)
        limiter.record(now, k)
        sends.extend([now] * k)
        backlog -= k
    return sends


@FAST
@given(policy=policies, start=starts, plan=steps)
def test_driver_never_breaks_invariant(
    policy: RatePolicy, start: float, plan: list[tuple[float, int]]
) -> None:
    sends = drive(Limiter(policy), start, plan)
    assert max_window_count(sends, policy.period_s) <= policy.limit


@settings(max_examples=40, deadline=None)
@given(
    limit=st.integers(1, 50),
    period=st.floats(0.05, 5000),
    pacing=st.sampled_from(["window", "even"]),
    start=starts,
)
def test_backlog_runs_at_full_rate(limit: int, period: float, pacing: Pacing, start: float) -> None:
    policy = RatePolicy(limit=limit, period_s=period, pacing=pacing)
    limiter, periods, now, sends = Limiter(policy), 200, start, []
    end = start + periods * period
    while now < end:
        now = limiter.earliest(now)
        k = limiter.allowance(now)
        limiter.record(now, k)
        sends.extend([now] * k)
    achieved = sum(1 for s in sends if s < end)
    assert achieved >= 0.99 * periods * limit
    assert max_window_count(sends, period) <= limit


@FAST
@given(
    policy=policies,
    start=starts,
    history=steps,
    gap=st.floats(0, 2),
    horizon=st.floats(0, 20),
    max_n=st.integers(0, 300),
)
def test_plan_recorded_as_is_keeps_invariant(
    policy: RatePolicy,
    start: float,
    history: list[tuple[float, int]],
    gap: float,
    horizon: float,
    max_n: int,
) -> None:
    limiter = Limiter(policy)
    sends = drive(limiter, start, history)
    at = (sends[-1] if sends else start) + gap * policy.period_s
    before = (limiter.window_count(at), limiter.earliest(at))
    planned = limiter.plan(at, horizon * policy.period_s, max_n)
    assert (limiter.window_count(at), limiter.earliest(at)) == before
    assert planned == sorted(planned)
    assert len(planned) <= max_n
    assert all(at <= p < at + horizon * policy.period_s for p in planned)
    if planned:
        assert planned[0] == limiter.earliest(at)
    for p in planned:
        assert limiter.allowance(p) >= 1
        limiter.record(p, 1)
    assert max_window_count(sends + planned, policy.period_s) <= policy.limit


@settings(max_examples=20, deadline=None)
@given(
    limit=st.integers(1, 20),
    period=st.floats(60, 20_000),
    pacing=st.sampled_from(["window", "even"]),
    schedule=schedules,
    t=instants,
)
def test_scheduled_sends_only_when_open(
    limit: int, period: float, pacing: Pacing, schedule: ReleaseSchedule, t: datetime
) -> None:
    limiter = Limiter(RatePolicy(limit=limit, period_s=period, pacing=pacing, schedule=schedule))
    sends = drive(limiter, t.timestamp(), [(0.0, 5)] * 40)
    assume(sends)
    for s in sorted(set(sends)):
        assert schedule.is_open(datetime.fromtimestamp(s, UTC).replace(microsecond=0))
    assert max_window_count(sends, period) <= limit


def test_move_redates_sends_and_keeps_the_window() -> None:
    limiter = Limiter(RatePolicy(limit=2, period_s=1.0))
    limiter.record(10.0, 2)
    assert limiter.allowance(11.0) == 2
    limiter.move(10.0, 10.4, 2)  # they really went out 0.4 s late
    assert limiter.allowance(11.0) == 0
    assert limiter.earliest(11.0) >= 11.4
    assert limiter.allowance(11.39) == 0
    assert limiter.allowance(11.41) == 2
    limiter.record(12.0, 1)
    limiter.move(12.0, 12.2, 5)  # more than recorded there: all of it moves, never lost
    assert limiter.window_count(12.2) == 5


@FAST
@given(policy=policies, start=starts, plan=steps, delay=st.floats(0, 2))
def test_moving_the_latest_sends_is_recording_them_later(
    policy: RatePolicy, start: float, plan: list[tuple[float, int]], delay: float
) -> None:
    """move() of the latest entry (the common case: a request written late) leaves the
    limiter as if those sends had been recorded at the later instant in the first place."""
    moved, direct = Limiter(policy), Limiter(policy)
    sends = drive(moved, start, plan)
    assume(sends)
    last = sends[-1]
    n = sends.count(last)
    for at in sorted(set(sends[:-n])):
        direct.record(at, sends.count(at))
    later = last + delay * policy.period_s
    moved.move(last, later, n)
    direct.record(later, n)
    for t in (later, later + policy.period_s / 2, later + policy.period_s):
        assert moved.window_count(t) == direct.window_count(t)
        assert moved.allowance(t) == direct.allowance(t)
        assert moved.earliest(t) == direct.earliest(t)


@FAST
@given(
    policy=policies,
    start=starts,
    plan=steps,
    later=st.floats(0, 3),
    horizon=st.floats(0, 8),
    max_n=st.sampled_from([1, 7, 1000]),
)
def test_count_within_is_what_plan_places(
    policy: RatePolicy,
    start: float,
    plan: list[tuple[float, int]],
    later: float,
    horizon: float,
    max_n: int,
) -> None:
    """count_within (a claim's size, without plan's simulation) counts the sends plan() would
    place: the same figure, give or take one at a window's float edge."""
    limiter = Limiter(policy)
    sends = drive(limiter, start, plan)
    at = (sends[-1] if sends else start) + later * policy.period_s
    span = horizon * policy.period_s
    planned = len(limiter.plan(at, span, max_n))
    assert abs(limiter.count_within(at, span, max_n) - planned) <= 1


@pytest.mark.parametrize("pacing", ["window", "even"])
def test_a_log_that_outgrows_a_list_counts_exactly_as_before(pacing: str) -> None:
    """A short log is a list and a long one a deque (memory): across the change, and
    while either is pruned, every window holds what a brute-force count says."""
    policy = RatePolicy(limit=100, period_s=10.0, pacing=pacing)
    limiter = Limiter(policy)
    sent: list[float] = []
    at = 1_000.0
    for _ in range(400):  # past _DEQUE_AT entries, then pruned down and grown again
        at = limiter.earliest(at)
        limiter.record(at, 1)
        sent.append(at)
        for t in (at, at + 3.7, at + 10.0):
            assert limiter.window_count(t) == sum(1 for e in sent if t - 10.0 < e <= t)
        at += 0.01 if len(sent) < 200 else 0.2
    assert isinstance(limiter._log, collections.deque)  # (it did outgrow the list)
    copy = limiter._copy()
    assert copy.window_count(at) == limiter.window_count(at)
    assert copy.earliest(at) == limiter.earliest(at)
