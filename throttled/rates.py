"""Rate policies, their sources, release schedules and the exact-rate limiter.

Pure math: no I/O, no asyncio, no clock. Every instant is an argument.

Float conventions (the limiter and its tests agree on them):

* A send recorded at ``e`` counts in the window ending at ``t`` iff ``t - T < e <= t``,
  evaluated in floating point exactly as written. The invariant is: for every ``t`` the
  count is at most N.
* Even pacing spaces sends so that ``t >= last + T / N``.

Schedule conventions (local wall times in the schedule's IANA zone):

* A day's window is the instant interval ``[start, end)``; ``end <= start`` means the window
  ends on the next day (22:00-06:00), and it belongs to the day it starts on. Equal start
  and end give a 24-hour window.
* A wall time skipped by a DST change (02:30 on a spring-forward day) maps to the first
  valid instant after the gap (03:00 EDT). A wall time that occurs twice (fall-back) means
  its first occurrence, so every day's window opens once and is one interval.

Bounds (every value is bounded where it enters, so that whatever is accepted can be
evaluated at every instant up to the end of year 9999):

* Schedules are evaluated up to HORIZON (9999-12-01 UTC): a days/hours schedule has no
  window after it (a queue whose next opening would be later never opens), and instants
  past it are never turned into dates. Instants before 1970 are taken as 1970.
* A start instant is accepted between 1970-01-01 and HORIZON; a limit is 1..MAX_LIMIT and
  a period MIN_PERIOD_S..MAX_PERIOD_S, at intake and in a stored policy alike.
* Every parser raises ValueError only; anything else is a bug.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo

Pacing = Literal["window", "even"]

_T = TypeVar("_T")

ALL_DAYS: frozenset[int] = frozenset(range(7))
MAX_LIMIT = 1_000_000
MAX_PERIOD_S = 366 * 86_400.0
MIN_PERIOD_S = 0.001
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
HORIZON = datetime(9999, 12, 1, tzinfo=UTC)
HORIZON_EPOCH = HORIZON.timestamp()
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
_DAY_ABBR = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_ONE_DAY = timedelta(days=1)
_WEEK_S = 7 * 86_400.0
_SCAN_DAYS = 16  # covers a full week plus a week whose window a DST gap erased
_CLOCK = r"([0-9]{1,2}):([0-9]{2})(?::([0-9]{2}))?"
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_MAX_NUMBER_TEXT = 40
_MAX_PLAN_STEPS = 64  # plan(): extra steps allowed beyond one per send (never expected)
_HOURS_RE = re.compile(rf"\s*{_CLOCK}\s*[-–]\s*{_CLOCK}\s*")


# --- time helpers -------------------------------------------------------------------------


def _zone(name: str) -> ZoneInfo:
    """The ZoneInfo for an IANA name; ValueError if unknown."""
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone") from None


def _as_utc(t: datetime) -> datetime:
    """An aware datetime converted to UTC; ValueError if naive."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{t.isoformat()} is naive; an aware datetime is required")
    return t.astimezone(UTC)


def _wall(epoch: float, zone: ZoneInfo) -> datetime:
    """The naive local wall time of an epoch instant."""
    return datetime.fromtimestamp(epoch, zone).replace(tzinfo=None)


def local_instant(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """UTC instant of a local wall time: first occurrence if repeated, gap end if skipped."""
    local = datetime.combine(day, clock.replace(tzinfo=None, fold=0), tzinfo=zone)
    instant = local.astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == local.replace(tzinfo=None):
        return instant
    return _gap_end(local, zone)


def _gap_end(local: datetime, zone: ZoneInfo) -> datetime:
    """The transition instant that skips over a nonexistent local time (bisection)."""
    wall = local.replace(tzinfo=None)
    a, b = local.replace(fold=0).timestamp(), local.replace(fold=1).timestamp()
    lo, hi = math.floor(min(a, b)), math.ceil(max(a, b))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(mid, zone) >= wall:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


def _utc_floor(epoch: float) -> datetime:
    """The UTC datetime at or just before an epoch instant (microsecond grid), within
    1970..HORIZON."""
    d = datetime.fromtimestamp(min(max(epoch, 0.0), HORIZON_EPOCH), UTC)
    return d - timedelta(microseconds=1) if d.timestamp() > epoch else d


def iso_instant(ts: float) -> str:
    """An instant as ISO-8601; 'never' past the schedule horizon (inf, NaN, year 9999)."""
    if not ts < HORIZON_EPOCH:
        return "never"
    return datetime.fromtimestamp(max(ts, 0.0), UTC).isoformat()


def brief(value: object, limit: int = 60) -> str:
    """A value's repr for a message, cut short: it may come from anywhere (a huge int has
    no repr past 4,300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        return "an integer too long to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_clock(clock: time) -> str:
    """HH:MM, or HH:MM:SS when seconds are set."""
    return clock.strftime("%H:%M:%S" if clock.second or clock.microsecond else "%H:%M")


def _format_days(days: frozenset[int]) -> str:
    """Weekdays as compact runs, e.g. 'Mon-Fri' or 'Mon,Wed'."""
    runs: list[list[int]] = []
    for day in sorted(days):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return ",".join(_run_text(run) for run in runs) or "no days"


def _run_text(run: list[int]) -> str:
    """One run of consecutive weekdays as text."""
    if len(run) == 1:
        return _DAY_ABBR[run[0]]
    return f"{_DAY_ABBR[run[0]]}-{_DAY_ABBR[run[-1]]}"


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
class ReleaseSchedule:
    """When a queue may release: weekdays, daily local hours in a zone, and a start instant."""

    days: frozenset[int] = ALL_DAYS
    start: time | None = None
    end: time | None = None
    tz: str = "UTC"
    start_at: datetime | None = None

    def __post_init__(self) -> None:
        """Validate and normalise (days to a frozenset, start_at to UTC)."""
        object.__setattr__(self, "days", frozenset(self.days))
        if not self.days <= ALL_DAYS:
            raise ValueError(f"days must be within 0..6 (Monday..Sunday), got {sorted(self.days)}")
        if (self.start is None) != (self.end is None):
            raise ValueError("start and end must be given together")
        if any(c is not None and c.tzinfo is not None for c in (self.start, self.end)):
            raise ValueError("start and end are local wall times without tzinfo")
        _zone(self.tz)
        if self.start_at is not None:
            object.__setattr__(self, "start_at", _as_utc(self.start_at))

    @property
    def always_open(self) -> bool:
        """True when days and hours restrict nothing (start_at may still hold release)."""
        return self.days == ALL_DAYS and (self.start is None or self.start == self.end)

    @property
    def unrestricted(self) -> bool:
        """True when the schedule never holds release at all."""
        return self.always_open and self.start_at is None

    def is_open(self, t: datetime) -> bool:
        """Whether release is allowed at instant t (aware)."""
        t = _as_utc(t)
        return self.next_open(t) == t

    def next_open(self, t: datetime) -> datetime | None:
        """Earliest instant >= t (aware) at which release is allowed, in UTC; None if never."""
        t = _as_utc(t)
        if self.start_at is not None and t < self.start_at:
            t = self.start_at
        if self.always_open:
            return t
        if t >= HORIZON:
            return None
        return next((max(s, t) for s, e in self._windows(t) if e > t), None)

    def next_close(self, t: datetime) -> datetime | None:
        """End of the open period containing t, or else the next one; None if always open."""
        opened = self.next_open(t)
        if opened is None or self.always_open:
            return None
        end = opened
        for s, e in self._windows(opened):
            if s > end:
                break
            end = max(end, e)
        return end

    def describe(self) -> str:
        """Human-readable summary, e.g. 'Mon-Fri 09:00-17:00 America/New_York'."""
        parts = [] if self.days == ALL_DAYS else [_format_days(self.days)]
        if self.start is not None and self.end is not None:
            parts.append(f"{_format_clock(self.start)}-{_format_clock(self.end)}")
        if parts:
            parts.append(self.tz)
        if self.start_at is not None:
            parts.append(f"from {self.start_at.isoformat()}")
        return " ".join(parts) or "always"

    def to_json(self) -> dict[str, Any]:
        """JSON-safe, stable representation."""
        return {
            "days": sorted(self.days),
            "start": None if self.start is None else self.start.isoformat(),
            "end": None if self.end is None else self.end.isoformat(),
            "tz": self.tz,
            "start_at": None if self.start_at is None else self.start_at.isoformat(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ReleaseSchedule:
        """Inverse of to_json; ValueError if malformed."""
        start, end, start_at = d.get("start"), d.get("end"), d.get("start_at")
        return cls(
            days=frozenset(int(day) for day in d.get("days", range(7))),
            start=None if start is None else time.fromisoformat(start),
            end=None if end is None else time.fromisoformat(end),
            tz=str(d.get("tz", "UTC")),
            start_at=None if start_at is None else datetime.fromisoformat(start_at),
        )

    def _windows(self, t: datetime) -> Iterator[tuple[datetime, datetime]]:
        """Open windows (UTC, ascending) of the days from the local day before t onwards,
        none starting after HORIZON (t is before it: every date here is representable)."""
        zone = ZoneInfo(self.tz)
        first = t.astimezone(zone).date() - _ONE_DAY
        for offset in range(_SCAN_DAYS):
            window = self._window(first + offset * _ONE_DAY, zone)
            if window is not None and window[0] >= HORIZON:
                return
            if window is not None:
                yield window

    def _window(self, day: date, zone: ZoneInfo) -> tuple[datetime, datetime] | None:
        """The UTC interval [start, end) of one local day's window, if it has one."""
        if day.weekday() not in self.days:
            return None
        if self.start is None or self.end is None:
            s, e = local_instant(day, time(0), zone), local_instant(day + _ONE_DAY, time(0), zone)
        else:
            end_day = day if self.end > self.start else day + _ONE_DAY
            s, e = local_instant(day, self.start, zone), local_instant(end_day, self.end, zone)
        return (s, e) if e > s else None


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


# --- sources ------------------------------------------------------------------------------

_INPUT_NAMES: Mapping[str, tuple[str, ...]] = {
    "limit": ("maxThroughput", "maxThroughPut"),
    "count": ("timePeriod", "time"),
    "unit": ("timeUnit", "period"),
    "pacing": ("pacing",),
    "days": ("releaseDays",),
    "hours": ("releaseHours",),
    "tz": ("timezone",),
    "start_at": ("startAt",),
}
_CONFIG_NAMES: Mapping[str, tuple[str, ...]] = {
    "limit": ("max_throughput",),
    "count": ("time_period",),
    "unit": ("time_unit",),
    "pacing": ("pacing",),
    "days": ("release_days",),
    "hours": ("release_hours",),
    "tz": ("timezone",),
    "start_at": ("start_at",),
}
SPEC_KEYS: frozenset[str] = frozenset(name for names in _CONFIG_NAMES.values() for name in names)
# Every inputFields name that can change a rate policy (callers cache on just these).
INPUT_KEYS: tuple[str, ...] = tuple(name for names in _INPUT_NAMES.values() for name in names)


def _absent(value: Any) -> bool:
    """None and blank strings count as not given."""
    return value is None or (isinstance(value, str) and not value.strip())


class _Reader:
    """Reads one source's fields; reports bad values as problems, or raises when strict."""

    def __init__(
        self,
        fields: Mapping[str, Any],
        names: Mapping[str, tuple[str, ...]],
        *,
        where: str,
        strict: bool,
    ) -> None:
        self.fields, self.names, self.where, self.strict = fields, names, where, strict
        self.problems: list[str] = []

    def find(self, key: str) -> tuple[str, Any] | None:
        """The first present (name, value) among a key's names."""
        for name in self.names[key]:
            if not _absent(self.fields.get(name)):
                return name, self.fields[name]
        return None

    def get(self, key: str, parse: Callable[[Any], _T]) -> _T | None:
        """The parsed value of a key, or None if absent or invalid (reported)."""
        found = self.find(key)
        if found is None:
            return None
        try:
            return parse(found[1])
        except (ValueError, OverflowError) as exc:  # (parsers raise ValueError only)
            self.report(found[0], str(exc))
            return None

    def report(self, name: str, message: str) -> None:
        """Record (or raise, when strict) a problem with one field."""
        text = f"{self.where}.{name}: {message}"
        if self.strict:
            raise ValueError(text)
        self.problems.append(text)


def _read_rate(r: _Reader) -> tuple[int | None, float | None]:
    """(limit, period_s) when the source gives a complete, valid rate; else (None, None)."""
    limit, count, unit = (
        r.get("limit", parse_limit),
        r.get("count", parse_count),
        r.get("unit", parse_unit),
    )
    _report_missing_rate_field(r)
    if limit is None or unit is None or (count is None and r.find("count") is not None):
        return None, None
    period = (count or 1.0) * unit
    if not MIN_PERIOD_S <= period <= MAX_PERIOD_S:
        name, value = r.find("count") or r.find("unit") or ("", None)
        r.report(name, f"{brief(value)} gives {period:g} s; a period is 0.001 s to 366 days")
        return None, None
    return limit, period


def _report_missing_rate_field(r: _Reader) -> None:
    """Report a half-given rate (e.g. a limit without a unit); it cannot be used."""
    given = [key for key in ("limit", "count", "unit") if r.find(key) is not None]
    missing = [key for key in ("limit", "unit") if key not in given]
    if given and missing:
        other = ", ".join(r.names[key][0] for key in given)
        r.report(r.names[missing[0]][0], f"missing (the rate needs it; {other} given)")


def _read_spec(r: _Reader) -> PolicySpec:
    """A PolicySpec from one source's fields."""
    limit, period_s = _read_rate(r)
    tz = r.get("tz", parse_timezone)
    return PolicySpec(
        limit=limit,
        period_s=period_s,
        pacing=r.get("pacing", parse_pacing),
        days=r.get("days", parse_days),
        hours=r.get("hours", parse_hours),
        tz=tz,
        start_at=r.get("start_at", lambda v: parse_start_at(v, tz)),
    )


def parse_input_fields(fields: Mapping[str, Any]) -> tuple[PolicySpec, list[str]]:
    """A HubSpot action's inputFields as a PolicySpec; invalid values are left out, reported."""
    reader = _Reader(fields, _INPUT_NAMES, where="inputFields", strict=False)
    return _read_spec(reader), reader.problems


def spec_from_mapping(d: Mapping[str, Any], *, where: str) -> PolicySpec:
    """A PolicySpec from snake_case config keys; ValueError naming ``where.key`` if invalid."""
    # Keys outside SPEC_KEYS are ignored: the caller owns the section and checks its keys.
    return _read_spec(_Reader(d, _CONFIG_NAMES, where=where, strict=True))


def _first(values: Iterator[_T | None]) -> _T | None:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def resolve(specs: Sequence[PolicySpec]) -> RatePolicy:
    """Combine sources, highest priority first, into a RatePolicy (first source wins)."""
    # The rate (limit and period together) comes from the first spec that has both; the
    # other fields each from the first spec that has them. A time zone alone restricts
    # nothing, so there is no schedule unless days, hours or start_at is set.
    rates = ((s.limit, s.period_s) for s in specs if s.limit is not None and s.period_s is not None)
    rate = next(rates, None)
    if rate is None:
        raise ValueError("no source gives a rate (limit and period)")
    days, hours = _first(s.days for s in specs), _first(s.hours for s in specs)
    start_at = _first(s.start_at for s in specs)
    schedule = None
    if days is not None or hours is not None or start_at is not None:
        schedule = ReleaseSchedule(
            days=ALL_DAYS if days is None else days,
            start=None if hours is None else hours[0],
            end=None if hours is None else hours[1],
            tz=_first(s.tz for s in specs) or "UTC",
            start_at=start_at,
        )
    pacing: Pacing = _first(s.pacing for s in specs) or "window"
    return RatePolicy(limit=rate[0], period_s=rate[1], pacing=pacing, schedule=schedule)


# --- limiter ------------------------------------------------------------------------------


class Limiter:
    """Exact-rate guard for one queue: at most N sends in every window (t - T, t]."""

    # Instants are epoch seconds (floats) and should be non-decreasing. An instant earlier
    # than the latest recorded send gets no allowance: sends are never placed behind the log,
    # because the windows they would join may already be full (or pruned).

    def __init__(self, policy: RatePolicy) -> None:
        self._log: deque[tuple[float, int]] = deque()  # (instant, sends), ascending
        self._total = 0  # sends in the log
        self._last = -math.inf  # latest instant ever recorded
        self.set_policy(policy)

    @property
    def policy(self) -> RatePolicy:
        """The current policy."""
        return self._policy

    def set_policy(self, policy: RatePolicy) -> None:
        """Change the rate; the log is kept (it only reaches back one old period)."""
        self._policy = policy
        self._limit, self._period = policy.limit, policy.period_s
        self._gap = policy.period_s / policy.limit
        self._even = policy.pacing == "even"
        schedule = policy.schedule
        self._schedule = None if schedule is None or schedule.unrestricted else schedule
        self._span_cache = (math.inf, math.inf, math.inf)  # (asked at, opens, closes)

    def record(self, at: float, n: int) -> None:
        """Log n sends dispatched at instant at."""
        if n < 0:
            raise ValueError(f"cannot record {n} sends")
        if n == 0:
            return
        log = self._log
        if not log or at > log[-1][0]:
            log.append((at, n))
        elif at == log[-1][0]:
            log[-1] = (at, log[-1][1] + n)
        else:
            self._insert(at, n)
        self._total += n
        self._last = max(self._last, at)
        self._prune()

    def move(self, old_at: float, new_at: float, n: int) -> None:
        """Re-date n sends recorded at old_at to the later instant new_at (they went out late)."""
        log = self._log
        i = bisect.bisect_left(log, old_at, key=lambda entry: entry[0])
        if i < len(log) and log[i][0] == old_at:
            taken = min(n, log[i][1])
            if taken == log[i][1]:
                del log[i]
            else:
                log[i] = (old_at, log[i][1] - taken)
            self._total -= taken
        self.record(max(new_at, old_at), n)

    def window_count(self, at: float) -> int:
        """Recorded sends in the window (at - T, at]."""
        cutoff, expired = at - self._period, 0
        for e, n in self._log:
            if e > cutoff:
                break
            expired += n
        return self._total - expired

    def allowance(self, at: float) -> int:
        """How many sends may be dispatched at instant at without breaking the invariant."""
        if at < self._last or not self._open(at):
            return 0
        room = self._limit - self.window_count(at)
        if room <= 0:
            return 0
        if self._even:
            return 1 if at >= self._last + self._gap else 0
        return room

    def earliest(self, at: float) -> float:
        """Earliest instant >= at with an allowance of at least 1; math.inf if never."""
        t = self._log_ready(max(at, self._last))
        if self._even:
            t = max(t, self._last + self._gap)
        return self._open_from(t)

    def plan(self, at: float, horizon_s: float, max_n: int) -> list[float]:
        """Dispatch instants in [at, at + horizon_s) for up to max_n sends (log untouched)."""
        sim, end, t = self._copy(), at + horizon_s, at
        out: list[float] = []
        for _ in range(max_n + _MAX_PLAN_STEPS):  # bounded: never a spin, whatever the floats
            if len(out) >= max_n:
                break
            t = sim.earliest(t)
            if t >= end:
                break
            k = min(sim.allowance(t), max_n - len(out))
            if k <= 0:  # defensive: never expected, but must not spin
                t = math.nextafter(t, math.inf)
                continue
            out.extend([t] * k)
            sim.record(t, k)
        return out

    def backlog_eta(self, at: float, backlog: int) -> float:
        """Estimated instant a backlog is fully sent, counting schedule gaps approximately."""
        # Busy time is (batches - 1) x T for window pacing, (backlog - 1) x T/N for even,
        # from the first release; it is laid over the schedule's open time, measured over
        # one week and repeated weekly. DST shifts and batches straddling a close, and log
        # entries expiring earlier than a full period, make this an estimate.
        if backlog <= 0:
            return at
        first = self.earliest(at)
        if first == math.inf:
            return math.inf
        if self._even:
            busy = (backlog - 1) * self._gap
        else:
            busy = math.ceil(max(backlog - self.allowance(first), 0) / self._limit) * self._period
        return self._spend_open_time(first, busy)

    # internals

    def _insert(self, at: float, n: int) -> None:
        """Insert an out-of-order record, keeping the log sorted."""
        log = self._log
        i = bisect.bisect_left(log, at, key=lambda entry: entry[0])
        if i < len(log) and log[i][0] == at:
            log[i] = (at, log[i][1] + n)
        else:
            log.insert(i, (at, n))

    def _prune(self) -> None:
        """Drop entries that no window at or after the latest send can contain."""
        log, cutoff = self._log, self._last - self._period
        while log and log[0][0] <= cutoff:
            self._total -= log.popleft()[1]

    @staticmethod
    def _expiry(e: float, period: float) -> float:
        """Smallest float t (near e + T) with t - T >= e, so the entry at e has left."""
        t = e + period
        while t - period < e:
            t = math.nextafter(t, math.inf)
        return t

    def _log_ready(self, t: float) -> float:
        """Earliest instant >= t at which the window holds fewer than N sends."""
        remaining = self._total
        for e, n in self._log:
            if remaining < self._limit:
                break
            if e > t - self._period:
                t = self._expiry(e, self._period)
            remaining -= n
        return t

    def _copy(self) -> Limiter:
        """An independent copy for planning."""
        clone = Limiter(self._policy)
        clone._log, clone._total, clone._last = deque(self._log), self._total, self._last
        clone._span_cache = self._span_cache
        return clone

    def _span(self, at: float) -> tuple[float, float]:
        """(opens, closes) of the open period containing at, or else the next one."""
        asked, lo, hi = self._span_cache
        if not asked <= at < hi:
            lo, hi = self._compute_span(at)
            self._span_cache = (at, lo, hi)
        return lo, hi

    def _compute_span(self, at: float) -> tuple[float, float]:
        """The schedule's open period at or after at, as epoch floats."""
        assert self._schedule is not None
        d = _utc_floor(at)
        opened = self._schedule.next_open(d)
        if opened is None:
            return math.inf, math.inf
        closed = self._schedule.next_close(opened)
        lo = min(at, opened.timestamp()) if opened == d else opened.timestamp()
        hi = math.inf if closed is None else closed.timestamp()
        return lo, max(hi, math.nextafter(max(at, lo), math.inf))

    def _open(self, at: float) -> bool:
        """Whether the schedule allows release at instant at."""
        if self._schedule is None:
            return True
        lo, hi = self._span(at)
        return lo <= at < hi

    def _open_from(self, t: float) -> float:
        """Earliest open instant >= t."""
        if self._schedule is None or t == math.inf:
            return t
        return max(t, self._span(t)[0])

    def _spend_open_time(self, start: float, busy: float) -> float:
        """The instant when `busy` seconds of open schedule time after start have passed."""
        if self._schedule is None or self._schedule.always_open:
            return start + busy
        weekly = self._open_seconds(start, start + _WEEK_S)
        if weekly <= 0:
            return math.inf
        weeks = max(math.ceil(busy / weekly) - 1, 0)
        if start + weeks * _WEEK_S > HORIZON_EPOCH - 2 * _WEEK_S:
            return start + busy * _WEEK_S / weekly
        t, left = start + weeks * _WEEK_S, busy - weeks * weekly
        for _ in range(4 * _SCAN_DAYS):
            lo, hi = self._compute_span(t)
            if lo == math.inf:
                return math.inf
            t = max(t, lo)
            if hi - t > left:  # a send due exactly at the close goes at the next opening
                return t + left
            left, t = left - (hi - t), hi
        return t + left

    def _open_seconds(self, start: float, end: float) -> float:
        """Open schedule time within [start, end)."""
        total, t = 0.0, start
        while t < end:
            lo, hi = self._compute_span(t)
            if lo >= end:
                break
            total += min(hi, end) - max(lo, t)
            t = hi
        return total
