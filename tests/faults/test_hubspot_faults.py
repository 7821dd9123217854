"""Faults 4 and 5: HubSpot failing, then healthy.

4. 500s and then timeouts (the fault proxy in front of the fake swallowing requests) for a
   while: nothing lost, no action failed early, and after the recovery neither a queue's rate
   nor the portal's budget is exceeded at the wire (no catch-up burst).
5. 429s, with and without Retry-After, TEN_SECONDLY_ROLLING bodies: no permanent failure and
   the budget respected; a DAILY 429 holds the portal far longer (sender.daily_limit_wait_s).

The daemon is a real process; the fake HubSpot answers on the test's loop and keeps a portal
budget (429 past PORTAL_BUDGET requests a second), which the daemon is configured to keep to.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from tests.conftest import PORTAL_BUDGET, action_payload, wait_for
from tests.daemon_process import DaemonProcess, post_signed, query
from tests.fault_proxy import fault_proxy
from tests.faults.conftest import Daemons, connect, scale
from throttled.hubspot.fake import FakeHubSpot, max_in_window

PORTAL = 62515
RATE = 3  # per second, each queue (two queues: within the portal's budget of 4 requests/s)
QUEUES = 2
SENDER = {
    "portal_requests": PORTAL_BUDGET,
    "portal_interval_seconds": 1.0,
    # Production's shape, compressed: backoff doubling from 0.5 s to 4 s, a hold of 5 s
    # every third failure of a row, ten attempts.
    "backoff_base_s": 0.5,
    "backoff_max_s": 4.0,
    "hold_s": 5.0,
}


def backlog(per_queue: int) -> list[dict[str, Any]]:
    fields = {"maxThroughput": str(RATE), "timeUnit": "seconds"}
    return [
        action_payload(portal_id=PORTAL, workflow_id=82000 + q, input_fields=fields)
        for _ in range(per_queue)
        for q in range(QUEUES)
    ]


async def post_all(daemon: DaemonProcess, payloads: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as session:
        posted = await asyncio.gather(*(post_signed(session, daemon.url, p) for p in payloads))
    assert [o.status for o in posted] == [200] * len(payloads)


def wire(fake: FakeHubSpot, payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """The rate and budget checks on the fake's receive log (every request that arrived,
    answered or failed: each one counts against the rate and the budget)."""
    per_queue: dict[int, list[float]] = {}
    queue_of = {p["callbackId"]: p["context"]["workflowId"] for p in payloads}
    for r in fake.received:
        for callback_id in r.callback_ids:
            if callback_id in queue_of:
                per_queue.setdefault(queue_of[callback_id], []).append(r.at)
    requests = [r.at for r in fake.received if r.portal_id == PORTAL]
    return {
        "queue_max_per_s": max(max_in_window(t, 1.0) for t in per_queue.values()),
        "portal_max_requests_per_s": max_in_window(requests, 1.0),
        "statuses": dict(Counter(r.status for r in fake.received)),
    }


async def states(db_url: str, payloads: list[dict[str, Any]]) -> dict[str, int]:
    ids = [p["callbackId"] for p in payloads]
    rows = await query(
        db_url, "SELECT state, count(*) FROM actions WHERE callback_id = ANY(%s) GROUP BY 1", ids
    )
    return dict(rows)


async def stop(daemon: DaemonProcess) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait(60) == 0, daemon.log_tail()


@pytest.mark.timeout(scale(150, 400))
async def test_hubspot_500s_then_timeouts_lose_nothing_and_burst_nothing_after(
    daemons: Daemons, budgeted_hubspot: FakeHubSpot, db_url: str, record: Any
) -> None:
    fake = budgeted_hubspot
    outage_s = scale(6, 60)
    payloads = backlog(per_queue=int(RATE * (outage_s + 6)))
    ids = [p["callbackId"] for p in payloads]
    assert fake.base_url is not None
    port = int(fake.base_url.rsplit(":", 1)[1].split("/")[0])
    async with fault_proxy("127.0.0.1", port) as proxy:
        daemon = daemons(
            api_base_url=f"http://127.0.0.1:{proxy.port}",
            sender=SENDER,
            hubspot={"request_timeout_s": 2.0},
        )
        await connect(daemon, fake, PORTAL)
        await daemon.start()
        await post_all(daemon, payloads)
        await wait_for(lambda: len(fake.completed) >= 4, timeout=30)  # draining
        fake.fail_all(500)
        await asyncio.sleep(outage_s / 2)
        fake.fail_all(None)
        proxy.blackhole()  # requests go out and nothing comes back: the client times out
        await asyncio.sleep(outage_s / 2)
        proxy.heal()
        healed_at = time.time()
        await wait_for(lambda: set(ids) <= fake.completed.keys(), timeout=scale(120, 300))
        await stop(daemon)
    after = [r for r in fake.received if r.at >= healed_at]
    record.update(
        fault=f"HubSpot 500s {outage_s / 2:g} s then timeouts {outage_s / 2:g} s",
        actions=len(ids),
        lost=len(set(ids) - fake.completed.keys()),
        failed_500=sum(1 for r in fake.received if r.status == 500),
        connections_through_proxy=proxy.accepted,
        states=await states(db_url, payloads),
        **wire(fake, payloads),
        requests_after_recovery=len(after),
    )
    assert record["states"] == {"done": len(ids)}, record  # nothing failed, nothing left
    assert record["queue_max_per_s"] <= RATE, record
    assert record["portal_max_requests_per_s"] <= PORTAL_BUDGET, record
    assert 429 not in record["statuses"], record


@pytest.mark.timeout(scale(150, 400))
async def test_hubspot_429s_with_and_without_retry_after_fail_nothing(
    daemons: Daemons, budgeted_hubspot: FakeHubSpot, db_url: str, record: Any
) -> None:
    fake = budgeted_hubspot
    phase_s = scale(2, 20)
    payloads = backlog(per_queue=int(RATE * (3 * phase_s + 20)))
    ids = [p["callbackId"] for p in payloads]
    daemon = daemons(api_base_url=fake.base_url, sender=SENDER)
    await connect(daemon, fake, PORTAL)
    await daemon.start()
    await post_all(daemon, payloads)
    await wait_for(lambda: len(fake.completed) >= 4, timeout=30)
    fake.fail_all(429, retry_after=1.0, policy_name="TEN_SECONDLY_ROLLING")
    await asyncio.sleep(phase_s)
    fake.fail_all(429, policy_name="TEN_SECONDLY_ROLLING")  # no Retry-After: the headers'
    await asyncio.sleep(phase_s)  # burst window (1 s here) is waited out
    fake.fail_all(429, policy_name="SECONDLY")
    await asyncio.sleep(phase_s)
    fake.fail_all(None)
    await wait_for(lambda: set(ids) <= fake.completed.keys(), timeout=scale(120, 300))
    await stop(daemon)
    attempts = await query(
        db_url,
        "SELECT max(attempts), max(failures) FROM actions WHERE callback_id = ANY(%s)",
        ids,
    )
    record.update(
        fault=f"HubSpot 429s for {3 * phase_s:g} s (Retry-After 1 s, none, SECONDLY)",
        actions=len(ids),
        lost=len(set(ids) - fake.completed.keys()),
        answered_429=sum(1 for r in fake.received if r.status == 429),
        states=await states(db_url, payloads),
        max_attempts_failures=list(attempts[0]),
        **wire(fake, payloads),
    )
    assert record["states"] == {"done": len(ids)}, record
    assert record["max_attempts_failures"] == [1, 0], record  # a 429 costs no attempt
    assert record["queue_max_per_s"] <= RATE, record
    assert record["portal_max_requests_per_s"] <= PORTAL_BUDGET, record


async def test_a_daily_429_holds_the_portal_far_longer(
    daemons: Daemons, budgeted_hubspot: FakeHubSpot, db_url: str, record: Any
) -> None:
    fake = budgeted_hubspot
    daily_wait_s = 120.0
    payloads = backlog(per_queue=30)
    daemon = daemons(
        api_base_url=fake.base_url, sender={**SENDER, "daily_limit_wait_s": daily_wait_s}
    )
    await connect(daemon, fake, PORTAL)
    await daemon.start()
    await post_all(daemon, payloads)
    await wait_for(lambda: len(fake.completed) >= 2, timeout=30)
    fake.fail_next(429, policy_name="DAILY")
    await wait_for(lambda: any(r.status == 429 for r in fake.received), timeout=30)
    limited_at = next(r.at for r in fake.received if r.status == 429)
    await asyncio.sleep(3.0)  # a TEN_SECONDLY 429 here would have been resent by now
    later = [r for r in fake.received if r.at > limited_at and r.portal_id == PORTAL]
    rows = await query(
        db_url,
        "SELECT min(extract(epoch FROM not_before)), max(failures), count(*) FROM actions"
        " WHERE state = 'pending' AND last_error LIKE '429%%'",
    )
    await stop(daemon)
    (not_before, failures, held) = rows[0]
    record.update(
        fault="HubSpot 429 DAILY",
        requests_in_3_s_after=len(later),
        rows_held=int(held),
        held_for_s=round(float(not_before) - limited_at, 1),
        failures=failures,
        states=await states(db_url, payloads),
    )
    assert later == [], record
    assert int(held) > 0, record
    assert float(not_before) >= limited_at + daily_wait_s - 1, record
    assert failures == 0, record
    assert "failed" not in record["states"], record


@pytest.mark.timeout(scale(120, 300))
async def test_expired_tokens_a_revoked_portal_and_a_rejected_callback_mid_drain(
    daemons: Daemons, fake_hubspot: FakeHubSpot, db_url: str, record: Any
) -> None:
    """Fault 6. Mid-drain: every access token expires (401: refreshed, resent, uncounted);
    one callback of a batch is rejected (400: that one fails with HubSpot's reason, the rest
    of its batch is delivered); a second portal's app is uninstalled (its refresh token
    refused: the portal is disconnected and its actions wait, uncounted, until it is
    connected again, then drain)."""
    fake = fake_hubspot
    other = PORTAL + 1
    fields = {"maxThroughput": "20", "timeUnit": "seconds"}
    first = [
        action_payload(portal_id=PORTAL, workflow_id=83000, input_fields=fields) for _ in range(60)
    ]
    second = [
        action_payload(portal_id=other, workflow_id=83001, input_fields=fields) for _ in range(60)
    ]
    rejected = first[40]["callbackId"]
    fake.reject_callbacks([rejected])
    daemon = daemons()
    await connect(daemon, fake, PORTAL)
    await connect(daemon, fake, other)
    await daemon.start()
    await post_all(daemon, first[:20] + second[:20])
    await wait_for(lambda: len(fake.completed) >= 20, timeout=30)
    fake.expire_tokens()
    fake.revoke_portal(other, access_tokens=True)
    await post_all(daemon, first[20:] + second[20:])
    first_ids = {p["callbackId"] for p in first}
    await wait_for(lambda: first_ids - {rejected} <= fake.completed.keys(), timeout=60)
    await asyncio.sleep(2.0)  # the disconnected portal's actions keep waiting meanwhile
    waiting = await states(db_url, [p for p in second if p["callbackId"] not in fake.completed])
    await connect(daemon, fake, other)  # reconnected (a new refresh token)
    second_ids = {p["callbackId"] for p in second}
    await wait_for(lambda: second_ids <= fake.completed.keys(), timeout=60)
    await stop(daemon)
    [(state, error)] = await query(
        db_url, "SELECT state, last_error FROM actions WHERE callback_id = %s", rejected
    )
    attempts = await query(
        db_url,
        "SELECT max(attempts), max(failures) FROM actions WHERE callback_id = ANY(%s)"
        " AND state = 'done'",
        sorted(first_ids | second_ids),
    )
    record.update(
        fault="expired tokens, a revoked portal, a rejected callback",
        actions=len(first) + len(second),
        lost=len((first_ids | second_ids) - {rejected} - fake.completed.keys()),
        rejected_state=state,
        waiting_while_disconnected=waiting,
        answered_401=sum(1 for r in fake.received if r.status == 401),
        max_attempts_failures=list(attempts[0]),
        states=await states(db_url, first + second),
    )
    assert record["lost"] == 0, record
    assert state == "failed", record
    assert "400" in (error or ""), error
    assert set(waiting) <= {"pending"}, waiting  # (nothing failed for a disconnection)
    assert record["states"] == {"done": len(first) + len(second) - 1, "failed": 1}, record
    assert record["max_attempts_failures"] == [1, 0], record  # 401s cost no attempt
