"""The sources of a rate policy: input fields and config keys read as PolicySpecs, and
resolve(), which combines them (highest priority first) into one RatePolicy.

A bad value is named as ``where.key``: reported for inputFields, raised (ValueError) for
config keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from throttled.rates.policy import (
    MAX_PERIOD_S,
    MIN_PERIOD_S,
    Pacing,
    PolicySpec,
    RatePolicy,
    brief,
    parse_count,
    parse_days,
    parse_hours,
    parse_limit,
    parse_pacing,
    parse_start_at,
    parse_timezone,
    parse_unit,
)
from throttled.rates.schedule import ALL_DAYS, ReleaseSchedule

_T = TypeVar("_T")


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
