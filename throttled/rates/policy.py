"""Rate policies: the model (RatePolicy, PolicySpec), its limits and the value parsers.

Pure math: no I/O, no asyncio, no clock. Every instant is an argument. Limits and period
bounds are checked here, at intake and in a stored policy alike (see the Bounds in the
package docstring). Every parser raises ValueError only; anything else is a bug.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any, Literal

from throttled.rates.schedule import EPOCH, HORIZON, ReleaseSchedule, _zone, local_instant

Pacing = Literal["window", "even"]

MAX_LIMIT = 1_000_000
MAX_PERIOD_S = 366 * 86_400.0
MIN_PERIOD_S = 0.001
UNIT_SECONDS: Mapping[str, float] = {
    "second": 1.0,
    "seconds": 1.0,
    "minute": 60.0,
    "minutes": 60.0,
    "hour": 3_600.0,
    "hours": 3_600.0,
    "day": 86_400.0,
    "days": 86_400.0,
}
_PACINGS: Mapping[str, Pacing] = {"window": "window", "even": "even"}
_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_CLOCK = r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?"
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_MAX_NUMBER_TEXT = 40
_HOURS_RE = re.compile(rf"\s*{_CLOCK}\s*[-–]\s*{_CLOCK}\s*")


# --- message helpers ----------------------------------------------------------------------


def brief(value: object, limit: int = 60) -> str:
    """A value's repr for a message, cut short: it may come from anywhere (a huge int has
    no repr past 4,300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        return "an integer too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_count(count: float, unit: str) -> str:
    """'1 second', '2.5 minutes'."""
    text = str(int(count)) if count == int(count) else f"{count:g}"
    return f"{text} {unit}" + ("" if count == 1 else "s")


def _format_period(seconds: float) -> str:
    """A period in the largest unit that divides it evenly."""
    for unit, size in (("day", 86_400.0), ("hour", 3_600.0), ("minute", 60.0)):
        count = seconds / size
        if count >= 1 and count == int(count):
            return _format_count(count, unit)
    return _format_count(seconds, "second")


# --- policy model -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RatePolicy:
    """A queue's rate: limit sends per period_s, with pacing and an optional schedule."""

    limit: int
    period_s: float
    pacing: Pacing = "window"
    schedule: ReleaseSchedule | None = None

    def __post_init__(self) -> None:
        """Validate and normalise period_s to float."""
        limit = self.limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer 1..{MAX_LIMIT}, got {brief(limit)}")
        if isinstance(self.period_s, bool) or not isinstance(self.period_s, int | float):
            raise ValueError(f"period_s must be a number, got {brief(self.period_s)}")
        period = float(self.period_s)
        if not MIN_PERIOD_S <= period <= MAX_PERIOD_S:  # (False for NaN too)
            raise ValueError(
                f"period_s must be {MIN_PERIOD_S:g}..{MAX_PERIOD_S:g} seconds, got {brief(period)}"
            )
        object.__setattr__(self, "period_s", period)
        if self.pacing not in _PACINGS:
            raise ValueError(f"pacing must be 'window' or 'even', got {brief(self.pacing)}")

    def to_json(self) -> dict[str, Any]:
        """JSON-safe, stable representation (stored in a jsonb column)."""
        schedule = None if self.schedule is None else self.schedule.to_json()
        return {
            "limit": self.limit,
            "period_s": self.period_s,
            "pacing": self.pacing,
            "schedule": schedule,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RatePolicy:
        """Inverse of to_json; ValueError if malformed."""
        try:
            schedule = d.get("schedule")
            return cls(
                limit=d["limit"],
                period_s=d["period_s"],
                pacing=parse_pacing(d.get("pacing", "window")),
                schedule=None if schedule is None else ReleaseSchedule.from_json(schedule),
            )
        except (KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise ValueError(f"malformed rate policy {brief(d)}: {brief(exc)}") from None

    def describe(self) -> str:
        """Human-readable summary, e.g. '10 per 1 second, window'."""
        text = f"{self.limit} per {_format_period(self.period_s)}, {self.pacing}"
        if self.schedule is not None and not self.schedule.unrestricted:
            text += f", {self.schedule.describe()}"
        return text


@dataclass(frozen=True, kw_only=True)
class PolicySpec:
    """What one source (override, input fields, admin config, defaults) says; all optional."""

    limit: int | None = None
    period_s: float | None = None
    pacing: Pacing | None = None
    days: frozenset[int] | None = None
    hours: tuple[time, time] | None = None
    tz: str | None = None
    start_at: datetime | None = None


# --- value parsers (ValueError messages name the value, not the field) --------------------


def _number(value: Any) -> float | None:
    """A finite number from an int, a float or a plain decimal string (ASCII digits, at most
    40 characters: no '1_000', '²', 'inf' or hex); None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str):
        value = value.strip()
        if len(value) > _MAX_NUMBER_TEXT or not _NUMBER_RE.fullmatch(value):
            return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def parse_limit(value: Any) -> int:
    """A send limit: an integer 1..MAX_LIMIT (numeric strings accepted)."""
    number = _number(value)
    if number is None or number != int(number) or number < 1:
        raise ValueError(f"{brief(value)} is not a positive integer")
    if number > MAX_LIMIT:
        raise ValueError(f"{brief(value)} exceeds {MAX_LIMIT}")
    return int(number)


def parse_count(value: Any) -> float:
    """A period multiplier: a positive number."""
    number = _number(value)
    if number is None or number <= 0:
        raise ValueError(f"{brief(value)} is not a positive number")
    return number


def parse_unit(value: Any) -> float:
    """Seconds in a unit name (seconds, minutes, hours, days; singular too; any case)."""
    seconds = UNIT_SECONDS.get(value.strip().lower()) if isinstance(value, str) else None
    if seconds is None:
        raise ValueError(f"{brief(value)} is not a time unit (seconds, minutes, hours, days)")
    return seconds


def parse_pacing(value: Any) -> Pacing:
    """'window' or 'even' (any case)."""
    pacing = _PACINGS.get(value.strip().lower()) if isinstance(value, str) else None
    if pacing is None:
        raise ValueError(f"{brief(value)} is not a pacing (window, even)")
    return pacing


def _day_index(token: str) -> int:
    """0..6 for a day name or a prefix of at least three letters ('Mon', 'tues')."""
    lowered = token.lower()
    for index, name in enumerate(_DAY_NAMES):
        if len(lowered) >= 3 and name.startswith(lowered):
            return index
    raise ValueError(token)


def _day_token(token: str) -> set[int]:
    """The days of one token: a day name or a (wrapping) range like 'MON-FRI'."""
    first, dash, last = token.partition("-")
    a = _day_index(first)
    b = _day_index(last) if dash else a
    return {(a + i) % 7 for i in range((b - a) % 7 + 1)}


def parse_days(value: Any) -> frozenset[int]:
    """Weekdays from 'MON,TUE', 'Monday;Friday', 'MON-FRI' or a list of such strings."""
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    elif isinstance(value, str):
        text = value
    else:
        raise ValueError(f"{brief(value)} is not a list of days")
    tokens = re.split(r"[,;\s]+", re.sub(r"\s*[-–]\s*", "-", text.strip()))
    days: set[int] = set()
    for token in filter(None, tokens):
        try:
            days |= _day_token(token)
        except ValueError:
            raise ValueError(f"{brief(value)} has an unknown day {brief(token)}") from None
    if not days:
        raise ValueError(f"{brief(value)} names no days")
    return frozenset(days)


def _clock(hour: str, minute: str, second: str | None, *, end: bool) -> time:
    """A wall time from regex groups; '24:00' is accepted as an end (midnight)."""
    h, m, s = int(hour), int(minute), int(second or 0)
    if end and (h, m, s) == (24, 0, 0):
        return time(0)
    return time(h, m, s)


def parse_hours(value: Any) -> tuple[time, time]:
    """Daily hours 'HH:MM-HH:MM' (end exclusive; an end <= start ends the next day)."""
    match = _HOURS_RE.fullmatch(value) if isinstance(value, str) else None
    try:
        if match is None:
            raise ValueError
        groups = match.groups()
        return _clock(*groups[:3], end=False), _clock(*groups[3:], end=True)
    except ValueError:
        raise ValueError(f"{brief(value)} is not HH:MM-HH:MM") from None


def parse_timezone(value: Any) -> str:
    """A valid IANA zone name."""
    if not isinstance(value, str):
        raise ValueError(f"{brief(value)} is not an IANA time zone")
    name = value.strip()
    _zone(name)
    return name


def parse_start_at(value: Any, tz: str | None = None) -> datetime:
    """An ISO-8601 instant (or datetime/date) between 1970-01-01 and HORIZON; naive values
    are local to tz (default UTC)."""
    try:
        moment = _start_instant(value, tz)
    except OverflowError:  # a local time or offset that leaves the datetime range
        moment = None
    if moment is None or not EPOCH <= moment <= HORIZON:
        raise ValueError(
            f"{brief(value)} is not a date-time between {EPOCH.date()} and {HORIZON.date()}"
        ) from None
    return moment


def _start_instant(value: Any, tz: str | None) -> datetime:
    """The UTC instant of a start value (may raise OverflowError near the datetime range)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time(0))
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{brief(value)} is not an ISO-8601 date-time") from None
    else:
        raise ValueError(f"{brief(value)} is not an ISO-8601 date-time")
    if moment.tzinfo is None:
        return local_instant(moment.date(), moment.time(), _zone(tz or "UTC"))
    return moment.astimezone(UTC)
