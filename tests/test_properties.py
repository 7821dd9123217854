"""Property tests of the bound rule (issue [2/7]): every rate policy and deadline that intake
accepts can be stored, read back and evaluated at every instant from 1970 to year 9999.

The input space is the whole of the rate fields (valid values, edge values and hostile ones)
and `hubspot.block_expiration`. Each accepted action goes through the real path: the body is
parsed (`action.parse`), built by `Intake`, stored by the repository's own statements in a
real PostgreSQL, claimed back, and its policy evaluated by the limiter and the schedule.
Hypothesis drives a sync test; the module keeps one event loop and one pool for all examples.
"""

from __future__ import annotations

import asyncio
import math
import os
import uuid
import zoneinfo
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import with_database
from throttled import config as config_module
from throttled import rates
from throttled.config import ConfigError
from throttled.db.repository import QueueRow, Repository
from throttled.drain.supervisor import _safe_policy
from throttled.hubspot.action import PayloadError, parse
from throttled.intake import Intake
from throttled.queues import QueueLimiter

CI = bool(os.environ.get("CI"))
EXAMPLES = int(os.environ.get("THROTTLED_PROPERTY_EXAMPLES", "150" if CI else "300"))
END = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()  # the last instant asked
PROFILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=CI,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ------------------------------------------------------------------------------

_ZONES = sorted(zoneinfo.available_timezones())
_hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(min_size=250, max_size=300),
    st.sampled_from(
        ["", " ", "²", "١٢", "--5", "5_000", "0x10", "1e400", "-0", "nan", "inf", "9" * 5000]
    ),
)
_hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    _hostile_text,
)
_offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: timezone(timedelta(minutes=m))
)
_moments = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.none() | _offsets
)
_edge_start = st.sampled_from(
    [
        "9999-12-31T00:00:00Z",
        "9999-12-25T00:00:00Z",
        "9999-11-30T23:59:59Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:00:00-14:00",
        "9999-12-31T23:00",
        "1970-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
    ]
)
_clock = st.integers(0, 24).flatmap(lambda h: st.integers(0, 59).map(lambda m: f"{h:02d}:{m:02d}"))
_hours = st.tuples(_clock, _clock).map(lambda p: f"{p[0]}-{p[1]}")
_day = st.sampled_from(["MON", "tue", "Wednesday", "thu", "FRI", "sat", "Sun"])
_days = st.one_of(
    st.lists(_day, min_size=1, max_size=7).map(",".join),
    st.tuples(_day, _day).map(lambda p: f"{p[0]}-{p[1]}"),
    st.lists(_day, min_size=1, max_size=3),
)


def _field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly valid values, often hostile ones."""
    return st.one_of(valid, valid, _hostile)


RATE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "maxThroughput": _field(
        st.integers(1, 10**6) | st.integers(1, 10**6).map(str) | st.sampled_from([0, 10**6 + 1])
    ),
    "timePeriod": _field(
        st.floats(min_value=1e-6, max_value=1e6) | st.integers(1, 400).map(str) | st.just(0.0005)
    ),
    "timeUnit": _field(st.sampled_from(["seconds", "minute", "Hours", " days ", "day", "weeks"])),
    "pacing": _field(st.sampled_from(["window", "even", "EVEN", "spread"])),
    "releaseDays": _field(_days),
    "releaseHours": _field(_hours | st.sampled_from(["24:00-24:00", "23:59:59-00:00"])),
    "timezone": _field(
        st.sampled_from(_ZONES)
        | st.sampled_from(["Etc/GMT+14", "Pacific/Kiritimati", "../../etc/passwd", "x" * 300])
    ),
    "startAt": _field(_edge_start | _moments.map(datetime.isoformat)),
    "priority": _field(st.integers(-(10**9), 10**9) | st.integers(-100, 100).map(str)),
    "queueName": _field(st.text(min_size=1, max_size=300)),
}
_input_fields = st.fixed_dictionaries({}, optional=RATE_FIELDS)
_iso_durations = st.one_of(
    st.integers(1, 365).map(lambda d: f"P{d}D"),
    st.integers(1, 365 * 86400).map(lambda s: f"PT{s}S"),
    st.tuples(st.integers(0, 10**7), st.sampled_from("WD")).map(lambda p: f"P{p[0]}{p[1]}"),
    st.tuples(st.integers(0, 10**9), st.sampled_from("HMS")).map(lambda p: f"PT{p[0]}{p[1]}"),
    st.sampled_from(["P7D", "P365D", "P366D", "PT0S", "P99999999999999999999D", "P", "7 days"]),
    st.text(max_size=30),
)
_instants = st.floats(min_value=0.0, max_value=END)


def _body(fields: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "callbackId": f"prop-{uuid.uuid4().hex}",
            "origin": {"portalId": 62515, "actionDefinitionId": 7},
            "context": {"workflowId": 9},
            "inputFields": fields,
        }
    )


# -- the rule, pure ----------------------------------------------------------------------------


def _evaluate(policy: rates.RatePolicy, instants: list[float]) -> None:
    """Every evaluation the daemon makes, at each instant: nothing raises, answers are sane."""
    limiter = rates.Limiter(policy)
    for at in sorted(instants):
        earliest = limiter.earliest(at)
        assert earliest == math.inf or earliest >= at
        allowance = limiter.allowance(at)
        assert 0 <= allowance <= policy.limit
        planned = limiter.plan(at, 2.0, 1000)
        assert planned == sorted(planned)
        assert all(at <= t < at + 2.0 for t in planned)
        eta = limiter.backlog_eta(at, 10_000)
        assert eta == math.inf or eta >= at
        if allowance:
            limiter.record(at, min(allowance, 3))
    schedule = policy.schedule
    if schedule is not None:
        for at in instants:
            moment = datetime.fromtimestamp(at, UTC)
            opened = schedule.next_open(moment)
            assert opened is None or opened >= moment
            schedule.next_close(moment)
            schedule.is_open(moment)
        schedule.describe()
    policy.describe()


@PROFILE
@given(fields=_input_fields, instants=st.lists(_instants, min_size=1, max_size=6))
def test_every_accepted_rate_combination_evaluates_everywhere(
    fields: dict[str, Any], instants: list[float]
) -> None:
    spec, problems = rates.parse_input_fields(fields)
    assert all(p.startswith("inputFields.") for p in problems)
    policy = rates.resolve([spec, rates.PolicySpec(limit=10, period_s=1.0)])
    assert rates.RatePolicy.from_json(orjson.loads(orjson.dumps(policy.to_json()))) == policy
    _evaluate(policy, instants)


@PROFILE
@given(
    stored=st.recursive(
        _hostile, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c), max_leaves=8
    )
)
def test_a_stored_policy_of_any_shape_never_raises(stored: Any) -> None:
    """A queue row edited by hand or left by an older version: held, never a crash."""
    policy = stored if isinstance(stored, dict) else {"limit": stored, "period_s": stored}
    row = QueueRow(id=1, key="q", portal_id=1, policy=policy, override=None, created_at=_NOW)
    parsed, fault = _safe_policy(row)
    assert (parsed is None) != (fault is None)
    limiter = QueueLimiter(parsed, key="q")
    if fault is not None:
        limiter.hold(fault)
    for at in (0.0, 1.8e9, END):
        limiter.earliest(at)
        limiter.allowance(at)
        limiter.plan(at, 2.0, 100)
        limiter.backlog_eta(at, 10)
    limiter.describe()


_NOW = datetime(2026, 12, 1, tzinfo=UTC)


# -- the rule, through PostgreSQL ----------------------------------------------------------------


@pytest.fixture(scope="module")
def stored_repo(pg_server_url: str, template_db: str) -> Iterator[tuple[asyncio.Runner, Any]]:
    """One database, loop and pool for every example of the module."""
    name = f"throttled_prop_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    runner = asyncio.Runner()
    opened = Repository.open(with_database(pg_server_url, name), min_size=1, max_size=2)
    repo = runner.run(opened.__aenter__())
    try:
        yield runner, repo
    finally:
        runner.run(opened.__aexit__(None, None, None))
        runner.close()
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _expiration(text: str) -> float | None:
    """Seconds of a block_expiration that the config accepts, else None."""
    raw = {"hubspot": {"block_expiration": text, "client_secret": "x"}}
    try:
        cfg = config_module.from_mapping(raw)
        config_module.validate(cfg)
    except ConfigError as exc:
        refused = str(exc)
    else:
        return cfg.block_expiration_s()
    assert "hubspot.block_expiration" in refused
    return None


async def _round_trip(repo: Repository, action: Any) -> tuple[QueueRow, datetime]:
    """Store the action with the repository's own statements; read its queue and row back."""
    (queue,) = await repo.upsert_queues([action.queue_key], [action.portal_id], [action.policy])
    await repo.insert_actions([action], [queue.id])
    (read,) = await repo.get_queues([queue.id])
    deadline = await repo.pool.fetchval(
        "SELECT deadline FROM actions WHERE callback_id = $1",  # as stored: no clamp on read
        action.callback_id,
    )
    return read, deadline


@PROFILE
@given(
    fields=_input_fields,
    expiration=_iso_durations,
    clock=_instants,
    instants=st.lists(_instants, min_size=1, max_size=4),
)
def test_accepted_actions_round_trip_through_postgresql_and_evaluate(
    stored_repo: tuple[asyncio.Runner, Repository],
    fields: dict[str, Any],
    expiration: str,
    clock: float,
    instants: list[float],
) -> None:
    runner, repo = stored_repo
    seconds = _expiration(expiration)
    if seconds is None:
        event("block_expiration refused")
        return  # refused by check-config: never reaches intake
    assert 0 < seconds <= 365 * 86_400
    assert math.isfinite(seconds)
    intake = Intake(
        defaults=rates.PolicySpec(limit=10, period_s=1.0),
        block_expiration_s=seconds,
        clock=lambda: clock,
    )
    try:
        action = intake.build(parse(_body(fields)))
    except PayloadError as exc:
        field = exc.field
    else:
        field = None
    if field is not None:
        assert field.partition(".")[0] == "inputFields"  # a 400 naming the field
        event("400")
        return
    assert -(10**6) <= action.priority <= 10**6
    event("stored")
    queue, deadline = runner.run(_round_trip(repo, action))
    assert queue.policy == action.policy
    assert deadline.timestamp() == pytest.approx(action.deadline, abs=1e-3)  # (µs, float)
    assert deadline.year <= 9999
    _evaluate(rates.RatePolicy.from_json(queue.policy), [*instants, action.deadline])
