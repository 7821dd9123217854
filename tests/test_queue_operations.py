"""Queues for operators, end to end against the fake HubSpot: the listing, pause and resume
(across a restart), rate overrides, retry-failed, fail-pending, and configs that re-rate
queues already holding actions. The rate invariant is checked on the fake's receive log."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

import psycopg

from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Daemon,
    action_payload,
    make_config,
    running,
    wait_for,
)
from tests.test_rates import max_window_count
from throttled.hubspot.fake import FakeHubSpot

TOKEN = "queue-ops-admin-token-0123456789"
ADMIN = {"admin": {"tokens": [{"id": "ops", "token": TOKEN}]}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PORTAL = 62515


async def call(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with daemon.session.request(method, daemon.url + path, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def enqueue(daemon: Daemon, n: int, fields: dict[str, str], **kw: Any) -> list[str]:
    ids = []
    for _ in range(n):
        payload = action_payload(portal_id=PORTAL, input_fields=fields, **kw)
        status, body = await daemon.post_action(payload)
        assert status == 200, body
        ids.append(payload["callbackId"])
    return ids


def done(fake: Any, ids: list[str]) -> int:
    return sum(cid in fake.completed for cid in ids)


def key_path(key: str) -> str:
    return "/api/queues/" + urllib.parse.quote(key, safe="")


def audit_actions(db_url: str) -> list[tuple[str, str]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT actor, action FROM audit_log ORDER BY id").fetchall()


async def test_pause_holds_a_queue_across_a_restart_and_resume_drains_it(db_url, fake_hubspot):
    cfg = make_config(db_url, fake_hubspot.base_url, **ADMIN)
    fields = {"maxThroughput": "2", "timeUnit": "seconds"}
    async with running(cfg) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        ids = await enqueue(daemon, 10, fields)
        await wait_for(lambda: done(fake_hubspot, ids) >= 2)
        status, page = await call(daemon, "GET", f"/api/queues?portal_id={PORTAL}")
        assert status == 200, page
        (queue,) = page["queues"]
        status, paused = await call(daemon, "POST", key_path(queue["key"]) + "/pause")
        assert status == 200, paused
        assert (paused["queue"]["paused"], paused["queue"]["state"]) == (True, "paused")
        sent_when_paused = done(fake_hubspot, ids)
        await asyncio.sleep(1.5)  # (at 2 per second, three more would have gone)
        assert done(fake_hubspot, ids) == sent_when_paused
    async with running(cfg) as daemon:  # a restart keeps the pause
        await asyncio.sleep(1.5)
        assert done(fake_hubspot, ids) == sent_when_paused
        status, shown = await call(daemon, "GET", f"/api/queues/{queue['id']}")
        assert (status, shown["paused"]) == (200, True)
        assert shown["backlog"] == 10 - sent_when_paused
        status, resumed = await call(daemon, "POST", f"/api/queues/{queue['id']}/resume")
        assert (status, resumed["queue"]["paused"]) == (200, False)
        await wait_for(lambda: done(fake_hubspot, ids) == 10)
    assert max_window_count(fake_hubspot.sends_for(ids), 1.0) <= 2
    assert [a for _, a in audit_actions(db_url)] == ["queue.pause", "queue.resume"]
    assert {actor for actor, _ in audit_actions(db_url)} == {"ops"}


async def test_an_override_rates_the_queue_at_once_and_clearing_it_restores_the_rate(
    daemon_factory, fake_hubspot, db_url
):
    fields = {"maxThroughput": "1", "timeUnit": "minutes"}
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        ids = await enqueue(daemon, 8, fields)
        await wait_for(lambda: done(fake_hubspot, ids) == 1)
        (queue,) = (await call(daemon, "GET", "/api/queues"))[1]["queues"]
        assert queue["rate_sources"]["rate"] == "input_fields"
        assert (queue["rate"]["max_throughput"], queue["rate"]["time_unit"]) == (1, "minutes")
        # only the limit: the period (a minute) stays... then the unit too
        status, body = await call(
            daemon, "PUT", f"/api/queues/{queue['id']}/rate", {"max_throughput": "4"}
        )
        assert status == 200, body
        assert body["queue"]["rate"]["max_throughput"] == 4
        assert body["queue"]["rate"]["time_unit"] == "minutes"
        assert body["queue"]["rate_sources"]["rate"] == "override"
        await wait_for(lambda: done(fake_hubspot, ids) == 4)  # the minute's other three
        changed_at = asyncio.get_running_loop().time()
        status, body = await call(
            daemon,
            "PUT",
            f"/api/queues/{queue['id']}/rate",
            {"max_throughput": 2, "time_unit": "seconds"},
        )
        assert status == 200, body
        assert body["queue"]["rate"]["text"].startswith("2 per 1 second")
        await wait_for(lambda: done(fake_hubspot, ids) == 8)
        assert asyncio.get_running_loop().time() - changed_at < 30  # (not a minute per send)
        status, body = await call(daemon, "DELETE", f"/api/queues/{queue['id']}/rate")
        assert status == 200, body
        assert body["queue"]["override"] is None
        assert body["queue"]["rate_sources"]["rate"] == "input_fields"
        # bad overrides name their fields
        status, body = await call(
            daemon,
            "PUT",
            f"/api/queues/{queue['id']}/rate",
            {"max_throughput": 0, "pacing": "x", "y": 1},
        )
        assert status == 422
        assert {f["field"] for f in body["fields"]} == {"max_throughput", "pacing", "y"}
        assert (await call(daemon, "PUT", f"/api/queues/{queue['id']}/rate", {}))[0] == 422
    times = sorted(fake_hubspot.sends_for(ids))
    assert max_window_count(times[4:], 1.0) <= 2  # after the second override
    assert [a for _, a in audit_actions(db_url)] == [
        "queue.rate.set",
        "queue.rate.set",
        "queue.rate.clear",
    ]


async def test_retry_failed_sends_rejected_actions_again(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fields = {"maxThroughput": "10", "timeUnit": "seconds"}
        bad = await enqueue(daemon, 2, fields)
        fake_hubspot.reject_callbacks(bad)
        await wait_for(lambda: _states(db_url) == {"failed": 2})
        (queue,) = (await call(daemon, "GET", "/api/queues"))[1]["queues"]
        assert queue["failed"] == 2
        fake_hubspot._rejected.clear()  # HubSpot takes them now
        status, body = await call(daemon, "POST", f"/api/queues/{queue['id']}/retry-failed")
        assert status == 200, body
        assert (body["retried"], body["not_retried_block_expired"]) == (2, 0)
        await wait_for(lambda: done(fake_hubspot, bad) == 2)
        await wait_for(lambda: _states(db_url) == {"done": 2})
        status, again = await call(daemon, "POST", f"/api/queues/{queue['id']}/retry-failed")
        assert (status, again["retried"]) == (200, 0)
    assert [a for _, a in audit_actions(db_url)][-2:] == ["queue.retry_failed"] * 2


async def test_fail_pending_completes_every_pending_action_fail_continue_at_once(
    daemon_factory, fake_hubspot, db_url
):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        ids = await enqueue(daemon, 30, {"maxThroughput": "1", "timeUnit": "hours"})
        await wait_for(lambda: done(fake_hubspot, ids) == 1)
        (queue,) = (await call(daemon, "GET", "/api/queues"))[1]["queues"]
        path = key_path(queue["key"]) + "/fail-pending"
        for body in (None, {}, {"confirm": False}, {"confirm": "true"}, {"confirm": True, "x": 1}):
            status, answer = await call(daemon, "POST", path, body)
            assert status in (400, 422), (body, answer)
            assert answer["error"] in ("confirmation_required", "invalid_json")
        status, answer = await call(daemon, "POST", path, {"confirm": True})
        assert (status, answer["released"]) == (200, 29), answer
        await wait_for(lambda: done(fake_hubspot, ids) == 30)  # an hour's rate notwithstanding
        states = [fake_hubspot.completed[cid][1]["hs_execution_state"] for cid in ids]
        assert (states.count("SUCCESS"), states.count("FAIL_CONTINUE")) == (1, 29)
        # new actions of the queue keep its rate (and go SUCCESS)
        more = await enqueue(daemon, 2, {"maxThroughput": "1", "timeUnit": "hours"})
        await asyncio.sleep(1.0)
        assert done(fake_hubspot, more) == 0  # (the hour's one send is spent)
        status, shown = await call(daemon, "GET", f"/api/queues/{queue['id']}")
        assert (shown["backlog"], shown["state"]) == (2, "draining")
    with psycopg.connect(db_url) as conn:
        (released,) = conn.execute(
            "SELECT count(*) FROM actions WHERE complete_as = 'FAIL_CONTINUE' AND state = 'done'"
        ).fetchone()
    assert released == 29
    assert "queue.fail_pending" in [a for _, a in audit_actions(db_url)]


async def test_a_config_change_re_rates_actions_already_waiting(
    daemon_factory, fake_hubspot, db_url
):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        config = {
            "portal_id": PORTAL,
            "action_id": 1234567,
            "max_throughput": 1,
            "time_unit": "hours",
        }
        assert (await call(daemon, "POST", "/api/config", config))[0] == 200
        waiting = await enqueue(daemon, 6, {})
        # another action definition's queue, with the rate in its own input fields
        own = await enqueue(daemon, 3, {"maxThroughput": "1", "timeUnit": "hours"}, workflow_id=7)
        await wait_for(lambda: done(fake_hubspot, waiting) == 1 and done(fake_hubspot, own) == 1)
        page = (await call(daemon, "GET", "/api/queues?sort=id"))[1]["queues"]
        assert [q["rate_sources"]["rate"] for q in page] == ["config", "input_fields"]
        config.update(max_throughput=3, time_unit="seconds")
        assert (await call(daemon, "POST", "/api/config", config))[0] == 200
        await wait_for(lambda: done(fake_hubspot, waiting) == 6)
        await asyncio.sleep(0.5)
        assert done(fake_hubspot, own) == 1  # its input fields win over the config
        page = (await call(daemon, "GET", "/api/queues?sort=id"))[1]["queues"]
        assert page[0]["rate"]["text"].startswith("3 per 1 second")
        assert page[1]["rate"]["text"].startswith("1 per 1 hour")
    assert max_window_count(sorted(fake_hubspot.sends_for(waiting))[1:], 1.0) <= 3


async def test_the_listing_filters_sorts_and_pages(daemon_factory, fake_hubspot):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        for workflow, n in ((1, 3), (2, 5), (3, 1)):
            await enqueue(
                daemon, n, {"maxThroughput": "1", "timeUnit": "days"}, workflow_id=workflow
            )
        await wait_for(lambda: len(fake_hubspot.completed) == 3)
        status, page = await call(daemon, "GET", "/api/queues?sort=backlog&limit=2")
        assert status == 200, page
        assert [q["backlog"] for q in page["queues"]] == [4, 2]
        assert page["next_cursor"]
        status, rest = await call(
            daemon, "GET", f"/api/queues?sort=backlog&limit=2&cursor={page['next_cursor']}"
        )
        assert [q["backlog"] for q in rest["queues"]] == [0]
        assert rest["next_cursor"] is None
        assert rest["queues"][0]["state"] == "idle"
        view = page["queues"][0]
        assert view["drains_at"]
        assert view["next_send_at"]
        assert view["oldest_pending_age_s"] >= 0
        assert (view["at_risk"], view["beats_oldest_deadline"]) == (False, True)
        urgent = (await call(daemon, "GET", "/api/queues?sort=urgency"))[1]["queues"]
        assert [q["backlog"] for q in urgent] == [4, 2, 0]
        drafting = (await call(daemon, "GET", "/api/queues?state=draining"))[1]["queues"]
        assert len(drafting) == 2
        assert (await call(daemon, "GET", "/api/queues?at_risk=true"))[1]["queues"] == []
        assert (await call(daemon, "GET", "/api/queues?portal_id=1"))[1]["queues"] == []
        for query in ("state=x", "sort=x", "limit=0", "cursor=!!", "at_risk=1", "portal_id=-1"):
            status, body = await call(daemon, "GET", f"/api/queues?{query}")
            assert status == 400, (query, body)
            assert body["field"] == query.split("=")[0]
        for ident in ("0", "99999999", "nope", "queue:1:2:3:4", "9" * 30):
            status, body = await call(daemon, "GET", f"/api/queues/{ident}")
            assert (status, body["error"]) == (404, "queue_not_found"), ident


def _states(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM actions GROUP BY state").fetchall())


async def test_fail_pending_takes_back_the_rows_a_sender_holds(daemon_factory, fake_hubspot):
    # claimed far ahead: every row is in the sender, none pending, when fail-pending comes
    sender = {"claim_ahead_s": 30.0, "lookahead_s": 5.0}
    async with daemon_factory(**ADMIN, sender=sender) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        ids = await enqueue(daemon, 20, {"maxThroughput": "1", "timeUnit": "seconds"})
        await wait_for(lambda: done(fake_hubspot, ids) == 1)
        status, answer = await call(daemon, "POST", "/api/queues/1/fail-pending", {"confirm": True})
        assert status == 200, answer
        await wait_for(lambda: done(fake_hubspot, ids) == 20, timeout=10)
        states = [fake_hubspot.completed[cid][1]["hs_execution_state"] for cid in ids]
        assert states.count("FAIL_CONTINUE") == answer["released"] >= 17


async def test_retried_released_rows_are_released_again(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        ids = await enqueue(daemon, 4, {"maxThroughput": "1", "timeUnit": "days"})
        await wait_for(lambda: done(fake_hubspot, ids) == 1)
        rest = [cid for cid in ids if cid not in fake_hubspot.completed]
        fake_hubspot.reject_callbacks(rest)
        assert (await call(daemon, "POST", "/api/queues/1/fail-pending", {"confirm": True}))[
            0
        ] == 200
        await wait_for(lambda: _states(db_url) == {"done": 1, "failed": 3})
        await wait_for(lambda: not daemon.runtime.scheduler.releases)  # the release ended
        fake_hubspot._rejected.clear()
        status, body = await call(daemon, "POST", "/api/queues/1/retry-failed")
        assert (status, body["retried"]) == (200, 3)
        await wait_for(lambda: done(fake_hubspot, ids) == 4)
        assert {fake_hubspot.completed[cid][1]["hs_execution_state"] for cid in rest} == {
            "FAIL_CONTINUE"
        }


async def test_a_view_never_holds_the_queue_it_shows(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        ids = await enqueue(daemon, 12, {"maxThroughput": "4", "timeUnit": "seconds"})
        await wait_for(lambda: done(fake_hubspot, ids) >= 1)
        with psycopg.connect(db_url, autocommit=True) as conn:  # an override edited by hand
            conn.execute("""UPDATE queues SET override = '{"max_throughput": []}'""")
            conn.execute("UPDATE change_counter SET version = version + 1")
        for _ in range(3):
            status, page = await call(daemon, "GET", "/api/queues")
            assert status == 200, page
            assert page["queues"][0]["state"] != "held"
            await call(daemon, "GET", "/api/queues/1")
        await wait_for(lambda: done(fake_hubspot, ids) == 12)
        assert daemon.runtime.scheduler.queues[1].limiter.fault is None


async def test_odd_confirmations_keys_and_cursors_are_4xx(daemon_factory):
    async with daemon_factory(**ADMIN) as daemon:
        for confirm in (1, 1.0, "yes", None, [True]):
            status, body = await call(
                daemon, "POST", "/api/queues/1/fail-pending", {"confirm": confirm}
            )
            assert (status, body["error"]) == (422, "confirmation_required"), confirm
        for ident in ("queue:%00", "queue%3A%00x", "queue:%0A"):
            status, body = await call(daemon, "GET", f"/api/queues/{ident}")
            assert (status, body["error"]) == (404, "queue_not_found"), ident
        import base64

        for raw in (b"[NaN, 1]", b"[Infinity, 1]", b"[1e400, 1]", b"[1, -1]"):
            cursor = base64.urlsafe_b64encode(raw).decode()
            status, body = await call(daemon, "GET", f"/api/queues?cursor={cursor}")
            assert (status, body["field"]) == (400, "cursor"), raw
        good = base64.urlsafe_b64encode(b"[1, 2]").decode()
        status, _ = await call(daemon, "GET", f"/api/queues?cursor={good}garbage")
        assert status == 400


async def test_fail_pending_stays_within_the_portals_api_budget(db_url):
    """HubSpot allows this portal 3 requests a second: the release fills requests of 5 and
    never goes past it (the fake answers 429 to any request beyond its budget)."""
    fake = FakeHubSpot(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, portal_budget=(3, 1.0))
    await fake.start()
    try:
        sender = {"portal_requests": 3, "portal_interval_seconds": 1.0, "batch_size": 5}
        cfg = make_config(db_url, fake.base_url, **ADMIN, sender=sender)
        async with running(cfg) as daemon:
            await daemon.connect_portal(fake, PORTAL)
            ids = await enqueue(daemon, 41, {"maxThroughput": "1", "timeUnit": "days"})
            await wait_for(lambda: done(fake, ids) == 1)
            answer = await call(daemon, "POST", "/api/queues/1/fail-pending", {"confirm": True})
            assert answer[1]["released"] == 40
            await wait_for(lambda: done(fake, ids) == 41)
        assert [r.status for r in fake.received if r.status == 429] == []
        assert max_window_count([r.at for r in fake.received], 1.0) <= 3
        assert max(len(r.callback_ids) for r in fake.received) == 5
    finally:
        await fake.close()
