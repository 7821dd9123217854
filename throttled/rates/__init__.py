"""Rate policies, their sources, release schedules and the exact-rate limiter.

Pure math: no I/O, no asyncio, no clock. Every instant is an argument.

The modules, in the order a send meets them on its way out:

* ``policy``: RatePolicy and PolicySpec, the limits (MAX_LIMIT, MIN_PERIOD_S, MAX_PERIOD_S,
  UNIT_SECONDS), the value parsers (parse_limit .. parse_start_at) and ``brief``.
* ``sources``: where a policy comes from: inputFields and config keys read as PolicySpecs
  (parse_input_fields, spec_from_mapping, INPUT_KEYS, SPEC_KEYS) and ``resolve``.
* ``schedule``: ReleaseSchedule (days, hours, tz, start_at windows and the next opening or
  close), the bounds EPOCH and HORIZON, local_instant and iso_instant.
* ``limiter``: Limiter, the rate log and its window: record, move, allowance, earliest,
  plan and backlog_eta.

Every name is re-exported here: callers use ``rates.X``.

Bounds (every value is bounded where it enters, so that whatever is accepted can be
evaluated at every instant up to the end of year 9999):

* Schedules are evaluated up to HORIZON (9999-12-01 UTC): a days/hours schedule has no
  window after it (a queue whose next opening would be later never opens), and instants
  past it are never turned into dates. Instants before 1970 are taken as 1970.
* A start instant is accepted between 1970-01-01 and HORIZON; a limit is 1..MAX_LIMIT and
  a period MIN_PERIOD_S..MAX_PERIOD_S, at intake and in a stored policy alike.
* Every parser raises ValueError only; anything else is a bug.
"""

from throttled.rates.limiter import Limiter
from throttled.rates.policy import (
    MAX_LIMIT,
    MAX_PERIOD_S,
    MIN_PERIOD_S,
    UNIT_SECONDS,
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
from throttled.rates.schedule import (
    ALL_DAYS,
    EPOCH,
    HORIZON,
    HORIZON_EPOCH,
    ReleaseSchedule,
    iso_instant,
    local_instant,
)
from throttled.rates.sources import (
    _INPUT_NAMES,
    INPUT_KEYS,
    SPEC_KEYS,
    parse_input_fields,
    resolve,
    spec_from_mapping,
)

__all__ = [
    "ALL_DAYS",
    "EPOCH",
    "HORIZON",
    "HORIZON_EPOCH",
    "INPUT_KEYS",
    "MAX_LIMIT",
    "MAX_PERIOD_S",
    "MIN_PERIOD_S",
    "SPEC_KEYS",
    "UNIT_SECONDS",
    "_INPUT_NAMES",
    "Limiter",
    "Pacing",
    "PolicySpec",
    "RatePolicy",
    "ReleaseSchedule",
    "brief",
    "iso_instant",
    "local_instant",
    "parse_count",
    "parse_days",
    "parse_hours",
    "parse_input_fields",
    "parse_limit",
    "parse_pacing",
    "parse_start_at",
    "parse_timezone",
    "parse_unit",
    "resolve",
    "spec_from_mapping",
]
