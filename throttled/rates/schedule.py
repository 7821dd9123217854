"""Release schedules: when a queue may release (weekdays, daily local hours, start instant).

Pure math: no I/O, no asyncio, no clock. Every instant is an argument.

Schedule conventions (local wall times in the schedule's IANA zone):

* A day's window is the instant interval ``[start, end)``; ``end <= start`` means the window
  ends on the next day (22:00-06:00), and it belongs to the day it starts on. Equal start
  and end give a 24-hour window.
* A wall time skipped by a DST change (02:30 on a spring-forward day) maps to the first
  valid instant after the gap (03:00 EDT). A wall time that occurs twice (fall-back) means
  its first occurrence, so every day's window opens once and is one interval.

Instants are bounded by HORIZON (see the Bounds in the package docstring).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

ALL_DAYS: frozenset[int] = frozenset(range(7))
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
HORIZON = datetime(9999, 12, 1, tzinfo=UTC)
HORIZON_EPOCH = HORIZON.timestamp()
_DAY_ABBR = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_ONE_DAY = timedelta(days=1)
_SCAN_DAYS = 16  # covers a full week plus a week whose window a DST gap erased


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


# --- release schedule ---------------------------------------------------------------------


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
