"""Regression tests of issue [2/7]: no input or stored row may crash the daemon.

Each test here failed on the code before the fix: a far-future start that killed the
scheduler, stored rows that killed every restart, ids that gave 500, strings that gave 503,
a policy cache that confused True with 1, and a duplicate that rewrote its queue's policy.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from tests.conftest import action_payload, make_config, running, wait_for
from throttled import metrics, rates
from throttled.daemon import StartupError, maintain_once
from throttled.hubspot import client, oauth
from throttled.hubspot.action import PayloadError, parse
from throttled.intake import Intake
from throttled.queues import QueueLimiter

PORTAL = 62515
DAY = {"maxThroughput": "100", "timeUnit": "days"}


def _sql(db_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description else []


def _intake(clock: float = 1.8e9) -> Intake:
    return Intake(
        defaults=rates.PolicySpec(limit=5, period_s=1.0),
        block_expiration_s=7 * 86400.0,
        clock=lambda: clock,
    )


def _build(fields: dict[str, Any], intake: Intake | None = None) -> Any:
    body = json.dumps(action_payload(input_fields=fields)).encode()
    return (intake or _intake()).build(parse(body))


async def _completes(daemon: Any, fake: Any, **fields: Any) -> None:
    """A plain action goes all the way to HubSpot: scheduler and sender are alive."""
    payload = action_payload(portal_id=PORTAL, input_fields={"maxThroughput": "50", **fields})
    assert (await daemon.post_action(payload))[0] == 200
    await wait_for(lambda: payload["callbackId"] in fake.completed)
    assert not daemon.task.done()


# -- far-future schedules (defect 1) ---------------------------------------------------------

FAR = [
    {**DAY, "startAt": "9999-12-31T00:00:00Z", "releaseDays": "MON", "queueName": "a"},
    {**DAY, "startAt": "9999-11-29T00:00:00Z", "releaseDays": "MON", "queueName": "b"},
    {**DAY, "startAt": "9999-11-25T00:00:00Z", "releaseHours": "09:00-17:00", "queueName": "c"},
    {**DAY, "startAt": "9999-11-30T09:00:00-14:00", "timezone": "Etc/GMT+12", "queueName": "d"},
]


async def test_far_future_start_keeps_every_loop_alive_and_survives_restart(fake_hubspot, db_url):
    cfg = make_config(db_url, fake_hubspot.base_url)
    async with running(cfg) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        for fields in FAR:
            payload = action_payload(portal_id=PORTAL, input_fields=fields)
            assert (await daemon.post_action(payload))[0] == 200
        scheduler = daemon.runtime.scheduler
        await wait_for(lambda: len(scheduler.queues) == len(FAR))
        await maintain_once(daemon.runtime)  # check_deadlines -> backlog_eta over each
        await _completes(daemon, fake_hubspot)
    async with running(cfg) as again:  # recover() evaluates every stored policy
        await maintain_once(again.runtime)
        await _completes(again, fake_hubspot)
    # Held by their start (the first one's fell through: it waits for a Monday), not lost.
    pending = _sql(
        db_url, "SELECT a.state, q.key FROM actions a JOIN queues q ON q.id = a.queue_id"
    )
    held = {key.rsplit(":", 1)[1] for state, key in pending if state == "pending"}
    assert held >= {"b", "c", "d"}


@pytest.mark.parametrize(
    "start_at",
    [
        "9999-12-31T00:00:00Z",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:00:00-14:00",
        "9999-12-31T23:00",  # naive, local to the zone below
        "1969-12-31T23:59:59Z",
    ],
)
def test_a_start_outside_1970_to_the_horizon_falls_through(start_at: str) -> None:
    before = metrics.INPUT_PROBLEMS.values.get("", 0)
    fields = {**DAY, "startAt": start_at, "timezone": "America/New_York"}
    policy = rates.RatePolicy.from_json(_build(fields).policy)
    assert policy.schedule is None  # a time zone alone restricts nothing
    assert (policy.limit, policy.period_s) == (100, 86400.0)
    assert metrics.INPUT_PROBLEMS.values[""] == before + 1


def test_schedules_evaluate_at_the_end_of_time() -> None:
    end = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    for fields in FAR:
        spec, _problems = rates.parse_input_fields(fields)
        limiter = rates.Limiter(rates.resolve([spec]))
        for at in (1.8e9, rates.HORIZON_EPOCH - 1, end.timestamp(), 1e12):
            assert limiter.earliest(at) >= at
            assert 0 <= limiter.allowance(at) <= 100
            assert len(limiter.plan(at, 2.0, 1000)) <= 100
            assert limiter.backlog_eta(at, 5) >= at
        schedule = limiter.policy.schedule
        assert schedule is not None
        if fields["queueName"] in ("b", "c"):  # days or hours: no window past the horizon
            assert schedule.next_open(end) is None
            assert limiter.allowance(end.timestamp()) == 0
            assert limiter.earliest(end.timestamp()) == math.inf


# -- stored rows (defect 2 and the rule for stored policies) ---------------------------------


def _store_queue(db_url: str, key: str, policy: dict[str, Any], deadline: str) -> None:
    (queue_id,) = _sql(
        db_url,
        "INSERT INTO queues (key, portal_id, policy) VALUES (%s, %s, %s) RETURNING id",
        key,
        PORTAL,
        json.dumps(policy),
    )[0]
    _sql(
        db_url,
        "INSERT INTO actions (callback_id, queue_id, portal_id, deadline)"
        " VALUES (%s, %s, %s, %s::timestamptz)",
        f"stored-{key}",
        queue_id,
        PORTAL,
        deadline,
    )


async def test_a_stored_deadline_past_year_9999_is_sent_after_a_restart(fake_hubspot, db_url):
    # Written by a version that accepted block_expiration = "P3000000D": PostgreSQL holds it,
    # a Python datetime cannot.
    _store_queue(db_url, "queue:62515:named:far", {"limit": 5, "period_s": 1.0}, "20000-01-01")
    async with running(make_config(db_url, fake_hubspot.base_url)) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        await wait_for(lambda: "stored-queue:62515:named:far" in fake_hubspot.completed)
        await maintain_once(daemon.runtime)
        await _completes(daemon, fake_hubspot)


@pytest.mark.parametrize(
    "policy",
    [
        {"limit": "many", "period_s": 1.0},
        {"limit": 0, "period_s": 1.0},
        {"limit": 5, "period_s": 1e300},
        {"limit": 5, "period_s": 1.0, "schedule": {"days": [9], "tz": "UTC"}},
        {"limit": 5, "period_s": 1.0, "schedule": {"tz": "Mars/Olympus_Mons", "start": "09:00"}},
        {"limit": 5, "period_s": 1.0, "schedule": {"start_at": "not a date"}},
        {"nothing": "useful"},
    ],
)
async def test_an_unreadable_stored_policy_holds_its_queue_and_nothing_else(
    fake_hubspot, db_url, policy
):
    _store_queue(db_url, "queue:62515:named:poisoned", policy, "2100-01-01")
    _store_queue(db_url, "queue:62515:named:healthy", {"limit": 5, "period_s": 1.0}, "2100-01-01")
    errors = metrics.QUEUE_POLICY_ERRORS.values.get("", 0)
    async with running(make_config(db_url, fake_hubspot.base_url)) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        await wait_for(lambda: "stored-queue:62515:named:healthy" in fake_hubspot.completed)
        assert metrics.QUEUES_HELD.read() == 1.0
        assert metrics.QUEUE_POLICY_ERRORS.values[""] == errors + 1
        await maintain_once(daemon.runtime)
        assert "stored-queue:62515:named:poisoned" not in fake_hubspot.completed
        # A new action re-resolves the queue's policy: the hold ends, both rows go out.
        fresh = action_payload(portal_id=PORTAL, input_fields={**DAY, "queueName": "poisoned"})
        assert (await daemon.post_action(fresh))[0] == 200
        await wait_for(lambda: "stored-queue:62515:named:poisoned" in fake_hubspot.completed)
        await wait_for(lambda: fresh["callbackId"] in fake_hubspot.completed)
        assert metrics.QUEUES_HELD.read() == 0.0


def test_a_policy_that_raises_when_evaluated_holds_the_queue() -> None:
    good = rates.resolve([rates.PolicySpec(limit=2, period_s=1.0, days=frozenset({0}))])
    broken = rates.resolve([rates.PolicySpec(limit=2, period_s=1.0, days=frozenset({0}))])
    assert broken.schedule is not None
    object.__setattr__(broken.schedule, "tz", "No/Such_Zone")  # as if stored by a bug
    errors = metrics.QUEUE_POLICY_ERRORS.values.get("", 0)
    limiter = QueueLimiter(broken, key="queue:1:named:x")
    assert limiter.earliest(1.8e9) == math.inf
    assert limiter.fault is not None
    assert "No/Such_Zone" in limiter.fault
    assert limiter.allowance(1.8e9) == 0
    assert limiter.plan(1.8e9, 2.0, 10) == []
    assert limiter.backlog_eta(1.8e9, 3) == math.inf
    assert limiter.describe().startswith("held: ")
    assert metrics.QUEUE_POLICY_ERRORS.values[""] == errors + 1  # reported once
    limiter.set_policy(good)
    assert limiter.fault is None
    assert limiter.earliest(1.8e9) < math.inf


# -- ids, strings, the policy cache, duplicates (defects 3, 5, 6, 7) --------------------------


@pytest.mark.parametrize("value", ["²", "¹", "--5", "9" * 5000, "١٢", "5_0", " 0x10 ", "+-1"])
@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("origin", "portalId"),
        ("origin", "actionDefinitionId"),
        ("context", "workflowId"),
        ("origin.actionExecutionIndexIdentifier", "actionExecutionIndex"),
    ],
)
def test_an_id_that_is_not_plain_digits_is_400_naming_it(where: str, key: str, value: str) -> None:
    payload = action_payload()
    target = payload
    for part in where.split("."):
        target = target[part]
    target[key] = value
    with pytest.raises(PayloadError) as caught:
        parse(json.dumps(payload).encode())
    assert caught.value.field == f"{where}.{key}"


def test_numeric_id_strings_still_work() -> None:
    payload = action_payload()
    payload["origin"]["portalId"] = " 62515 "
    payload["context"]["workflowId"] = "9"
    request = parse(json.dumps(payload).encode())
    assert (request.portal_id, request.workflow_id) == (62515, 9)


@pytest.mark.parametrize("key", ["queueName", "timezone", "releaseDays", "startAt", "priority"])
async def test_a_long_stored_input_value_is_400_naming_it(daemon_factory, db_url, key):
    async with daemon_factory() as daemon:
        payload = action_payload(input_fields={**DAY, key: "x" * 3000})
        status, body = await daemon.post_action(payload)
        assert status == 400, body
        assert body["field"] == f"inputFields.{key}"
        ok = action_payload(input_fields={**DAY, key: "y" * 255} if key == "queueName" else DAY)
        assert (await daemon.post_action(ok))[0] == 200
    assert _sql(db_url, "SELECT callback_id FROM actions") == [(ok["callbackId"],)]


def test_the_policy_cache_tells_true_from_one() -> None:
    intake = _intake()
    first = _build({"maxThroughput": True, "timeUnit": "seconds"}, intake)
    second = _build({"maxThroughput": 1, "timeUnit": "seconds"}, intake)
    third = _build({"maxThroughput": 1.0, "timeUnit": "seconds"}, intake)
    assert first.policy["limit"] == 5  # a boolean is no rate: the defaults apply
    assert second.policy["limit"] == 1
    assert third.policy["limit"] == 1


def test_priority_is_a_plain_integer_or_zero() -> None:
    intake = _intake()
    assert [
        _build({"priority": value}, intake).priority
        for value in (7, "8", " -3 ", 2.0, 2.5, True, "²", "9" * 255, "1e3", 10**12)
    ] == [7, 8, -3, 2, 0, 0, 0, 0, 0, 1_000_000]


def test_a_boolean_names_no_queue() -> None:
    assert _build({"queueName": True}).queue_key.startswith("queue:62515:55555:")


def test_deadlines_are_clamped_to_the_horizon() -> None:
    late = _intake(clock=rates.HORIZON_EPOCH - 60)
    assert _build({}, late).deadline == rates.HORIZON_EPOCH


async def test_a_duplicate_has_no_side_effect_on_its_queue(daemon_factory, db_url):
    async with daemon_factory() as daemon:
        payload = action_payload(input_fields={**DAY, "queueName": "dup"})
        assert (await daemon.post_action(payload))[0] == 200
        redelivered = {**payload, "inputFields": {"maxThroughput": "1", "timeUnit": "hours"}}
        redelivered["inputFields"]["queueName"] = "dup"
        assert (await daemon.post_action(redelivered))[0] == 200
        moved = {**payload, "inputFields": {**DAY, "queueName": "elsewhere"}}
        assert (await daemon.post_action(moved))[0] == 200
    rows = _sql(db_url, "SELECT key, policy FROM queues ORDER BY id")
    assert [(key, policy["limit"], policy["period_s"]) for key, policy in rows] == [
        ("queue:62515:named:dup", 100, 86400.0)
    ]
    assert _sql(db_url, "SELECT count(*) FROM actions") == [(1,)]


# -- what HubSpot answers is outside input too -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0.5", 0.5),
        ("99999999999", 86400.0),
        ("²", None),
        ("inf", None),
        ("1e400", None),
        ("-5", None),
        ("nan", None),
        ("", None),
        ("Thu, 01 Jan 2027 00:00:10 GMT", 10.0),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
        ("Fri, 31 Dec 9999 23:59:59 GMT", 86400.0),
        ("Mon, 99 Foo 2027 25:61:61 GMT", None),
    ],
)
def test_retry_after_is_bounded(raw: str, seconds: float | None) -> None:
    now = datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert client.retry_after_s(raw, now) == seconds


def test_rate_limit_headers_and_bodies_that_are_not_numbers_are_ignored() -> None:
    headers = {"X-HubSpot-RateLimit-Interval-Milliseconds": "²", "Retry-After": "inf"}
    result = client._result(429, headers, "[" * 100_000)
    assert (result.rate_interval_s, result.retry_after_s, result.policy_name) == (None, None, None)
    assert client._result(429, {"X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}, "") == (
        client.CompletionResult(status=429, rate_interval_s=10.0)
    )


@pytest.mark.parametrize(
    "body",
    [
        '{"access_token": "a", "expires_in": Infinity}',
        '{"access_token": "a", "expires_in": 1e400}',
        '{"access_token": "a", "expires_in": NaN}',
        '{"access_token": "a", "expires_in": "1800"}',
        '{"access_token": "a b", "expires_in": 1800}',
        '{"access_token": "a\\r\\nX-Injected: 1", "expires_in": 1800}',
        '{"access_token": "' + "a" * 5000 + '", "expires_in": 1800}',
        '{"access_token": 7, "expires_in": 1800}',
        '{"expires_in": 1800}',
        "[" * 100_000,
        "",
    ],
)
def test_a_token_answer_out_of_bounds_is_a_token_error(body: str) -> None:
    with pytest.raises(client.TokenError):
        oauth._grant(200, oauth._json(body.encode()), "refresh", old_refresh="old")


@pytest.mark.parametrize(
    ("hub_id", "expected"),
    [
        (62515, 62515),
        ("62515", 62515),
        (float("inf"), None),
        ("²", None),
        (True, None),
        (0, None),
        (2**63, None),
        (-5, None),
        (None, None),
    ],
)
def test_a_hub_id_out_of_bounds_is_ignored(hub_id: object, expected: int | None) -> None:
    doc = {"access_token": "a", "refresh_token": "r", "expires_in": 1800, "hub_id": hub_id}
    assert oauth._grant(200, doc, "refresh", old_refresh=None).hub_id == expected


def test_token_lifetimes_are_bounded() -> None:
    long = oauth._grant(200, {"access_token": "a", "expires_in": 1e300}, "r", old_refresh="o")
    assert long.expires_in == client.MAX_TOKEN_LIFETIME_S
    short = oauth._grant(200, {"access_token": "a", "expires_in": -9}, "r", old_refresh="o")
    assert short.expires_in == 0


async def test_a_429_with_an_infinite_retry_after_does_not_stop_the_sender(
    daemon_factory, fake_hubspot
):
    async with daemon_factory(sender={"portal_interval_seconds": 1.0}) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fake_hubspot.fail_next(429, retry_after=math.inf)
        await _completes(daemon, fake_hubspot)


@pytest.mark.parametrize(
    "stored",
    [
        {"max_throughput": "lots", "time_unit": "seconds"},
        {"max_throughput": 5, "time_unit": "fortnights"},
        ["not", "an", "object"],
        {"start_at": "0001-01-01T00:00:00+14:00"},
    ],
)
async def test_an_unreadable_admin_config_row_is_skipped_at_start_up(
    daemon_factory, fake_hubspot, db_url, stored
):
    _sql(
        db_url,
        "INSERT INTO action_configs (portal_id, action_id, policy) VALUES (%s, %s, %s)",
        PORTAL,
        1234567,
        json.dumps(stored),
    )
    async with daemon_factory() as daemon:
        assert daemon.runtime.services.intake.action_configs == {}
        await daemon.connect_portal(fake_hubspot, PORTAL)
        await _completes(daemon, fake_hubspot)


DEEP = "[" * 3000 + "]" * 3000
HUGE = "9" * 5000
HAND_EDITED = [
    "UPDATE queues SET created_at = '20000-01-01' WHERE key LIKE '%poisoned'",
    "UPDATE queues SET created_at = '4713-01-01 BC' WHERE key LIKE '%poisoned'",
    "UPDATE queues SET created_at = 'infinity' WHERE key LIKE '%poisoned'",
    f"UPDATE queues SET override = '{{\"max_throughput\": {DEEP}}}' WHERE key LIKE '%poisoned'",
    f"UPDATE queues SET override = '{{\"max_throughput\": {HUGE}}}' WHERE key LIKE '%poisoned'",
    f"UPDATE queues SET policy = '{DEEP}' WHERE key LIKE '%poisoned'",
    "UPDATE actions SET not_before = 'infinity' WHERE callback_id LIKE '%poisoned'",
    "UPDATE actions SET not_before = '4713-01-01 BC' WHERE callback_id LIKE '%poisoned'",
    "UPDATE actions SET deadline = 'infinity' WHERE callback_id LIKE '%poisoned'",
    "UPDATE actions SET state = 'done', sent_at = '20000-01-01' WHERE callback_id LIKE '%poisoned'",
    "UPDATE portals SET access_token = 'x', access_expires_at = '20000-01-01'",
    "INSERT INTO queue_sends SELECT id, now() + interval '1 hour', -5 FROM queues"
    " WHERE key LIKE '%poisoned'",
    "UPDATE actions SET attempts = -2147483648, failures = -5 WHERE callback_id LIKE '%poisoned'",
]


@pytest.mark.parametrize("edit", HAND_EDITED, ids=range(len(HAND_EDITED)))
async def test_rows_edited_by_hand_never_stop_the_daemon(fake_hubspot, db_url, edit):
    _store_queue(db_url, "queue:62515:named:poisoned", {"limit": 5, "period_s": 1.0}, "2100-01-01")
    _store_queue(db_url, "queue:62515:named:healthy", {"limit": 5, "period_s": 1.0}, "2100-01-01")
    cfg = make_config(db_url, fake_hubspot.base_url)
    fake_hubspot.register_portal(PORTAL, "refresh-edited")
    async with running(cfg) as daemon:  # a first start stores the portal's tokens
        await daemon.runtime.dispatcher.tokens.connect(PORTAL, "refresh-edited")
        await wait_for(lambda: "stored-queue:62515:named:healthy" in fake_hubspot.completed)
    _sql(db_url, edit)
    _sql(db_url, "UPDATE actions SET state = 'pending' WHERE callback_id LIKE '%healthy'")
    fake_hubspot.completed.clear()
    async with running(cfg) as daemon:  # recovery, claims, maintenance over the edited rows
        await wait_for(lambda: "stored-queue:62515:named:healthy" in fake_hubspot.completed)
        await maintain_once(daemon.runtime)
        fresh = action_payload(portal_id=PORTAL, input_fields={**DAY, "queueName": "poisoned"})
        assert (await daemon.post_action(fresh))[0] == 200
        await _completes(daemon, fake_hubspot)
        await wait_for(lambda: fresh["callbackId"] in fake_hubspot.completed)


async def test_a_stored_failure_count_past_any_exponent_backs_off_at_most_the_cap(
    fake_hubspot, db_url
):
    _store_queue(db_url, "queue:62515:named:tried", {"limit": 5, "period_s": 1.0}, "2100-01-01")
    _sql(db_url, "UPDATE actions SET failures = 2147483647, attempts = 5")
    # (a hold every 1,000th failure: the next one, 1,000,001, is no hold, just the backoff)
    cfg = make_config(db_url, fake_hubspot.base_url, sender={"hold_after_failures": 1000})
    async with running(cfg) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fake_hubspot.fail_next(500)
        await wait_for(lambda: "stored-queue:62515:named:tried" in fake_hubspot.completed)
        assert not daemon.task.done()


async def test_a_refresh_token_that_cannot_be_decrypted_holds_its_portal_only(fake_hubspot, db_url):
    other = PORTAL + 1
    async with running(make_config(db_url, fake_hubspot.base_url)) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        await daemon.connect_portal(fake_hubspot, other)
        _sql(db_url, "UPDATE portals SET refresh_token = 'v1.garbage', access_token = NULL")
        daemon.runtime.dispatcher.tokens.invalidate(PORTAL)
        await daemon.runtime.dispatcher.tokens.connect(other, "refresh-other")
        fake_hubspot.register_portal(other, "refresh-other")
        held = action_payload(portal_id=PORTAL, input_fields={"maxThroughput": "5"})
        assert (await daemon.post_action(held))[0] == 200
        payload = action_payload(portal_id=other, input_fields={"maxThroughput": "5"})
        assert (await daemon.post_action(payload))[0] == 200
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)
        assert held["callbackId"] not in fake_hubspot.completed
        assert not daemon.task.done()
    assert _sql(db_url, "SELECT state FROM actions WHERE callback_id = %s", held["callbackId"]) == [
        ("pending",)
    ]


async def test_rows_claimed_ahead_expire_when_their_queue_stops_releasing(daemon_factory, db_url):
    # Claimed ahead (claim_ahead_s), then the queue's policy moves its start past the horizon
    # of the rows' deadlines: they are expired at their deadline, not kept claimed.
    async with daemon_factory(
        hubspot={"block_expiration": "PT3S"}, sender={"claim_ahead_s": 5.0}
    ) as daemon:
        fields = {"maxThroughput": "1", "timeUnit": "seconds", "queueName": "moved"}
        for _ in range(5):
            assert (await daemon.post_action(action_payload(input_fields=fields)))[0] == 200
        later = {**fields, "startAt": "9999-11-30T00:00:00Z"}
        assert (await daemon.post_action(action_payload(input_fields=later)))[0] == 200

        def states() -> set[str]:
            return {state for (state,) in _sql(db_url, "SELECT state FROM actions")}

        await wait_for(lambda: "claimed" not in states() and "pending" not in states())
        assert states() <= {"expired", "done"}


async def test_retention_keeps_the_rate_log_a_window_may_still_need(daemon_factory, db_url):
    async with daemon_factory(retention={"done_days": 0.0001}) as daemon:
        payload = action_payload(input_fields={"maxThroughput": "5", "timeUnit": "minutes"})
        assert (await daemon.post_action(payload))[0] == 200
        _sql(
            db_url,
            "UPDATE actions SET state = 'done', sent_at = now() - interval '30 seconds',"
            " completed_at = now() - interval '1 hour'",
        )
        await maintain_once(daemon.runtime)
    assert _sql(db_url, "SELECT count(*) FROM actions") == [(1,)]


async def test_the_block_expiration_is_answered_as_hubspot_documents_it(daemon_factory):
    async with daemon_factory(hubspot={"block_expiration": " p7d "}) as daemon:
        status, body = await daemon.post_action(action_payload())
        assert (status, body["outputFields"]["hs_expiration_duration"]) == (200, "P7D")


async def test_an_address_that_cannot_be_listened_on_is_one_startup_error(fake_hubspot, db_url):
    cfg = make_config(db_url, fake_hubspot.base_url, server={"host": "203.0.113.7"})
    with pytest.raises(StartupError, match=r"server\.host"):
        async with running(cfg):
            pass
