"""Exact rates end to end, checked on the fake HubSpot's receive log."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime

from tests.conftest import action_payload, wait_for
from throttled.hubspot.fake import max_in_window


async def _send(daemon, n: int, fields: dict[str, str], **kw) -> list[str]:
    ids = []
    for i in range(n):
        payload = action_payload(input_fields=dict(fields), **kw)
        status, _ = await daemon.post_action(payload)
        assert status == 200, i
        ids.append(payload["callbackId"])
    return ids


async def test_window_pacing_never_exceeds_the_limit(daemon_factory, fake_hubspot):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        ids = await _send(daemon, 23, {"maxThroughput": "5", "timeUnit": "seconds"})
        await wait_for(lambda: all(i in fake_hubspot.completed for i in ids), timeout=30)
    times = sorted(fake_hubspot.sends_for(ids))
    assert len(times) == 23  # each sent exactly once
    assert max_in_window(times, 1.0) <= 5
    # 23 at 5 per second need at least 4 full windows after the first send
    assert times[-1] - times[0] >= 4.0


async def test_even_pacing_spreads_sends(daemon_factory, fake_hubspot):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        ids = await _send(
            daemon, 10, {"maxThroughput": "8", "timeUnit": "seconds", "pacing": "even"}
        )
        await wait_for(lambda: all(i in fake_hubspot.completed for i in ids), timeout=30)
    times = sorted(fake_hubspot.sends_for(ids))
    assert max_in_window(times, 1.0) <= 8
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.125 * 0.9, gaps  # one every T/N, not a burst


async def test_queues_are_independent_and_named_queues_share_a_limit(daemon_factory, fake_hubspot):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        shared = {"queueName": "shared", "maxThroughput": "3", "timeUnit": "seconds"}
        a = await _send(daemon, 5, shared, workflow_id=1)
        b = await _send(daemon, 5, shared, workflow_id=2)
        other = await _send(daemon, 5, {"maxThroughput": "5", "timeUnit": "seconds"}, workflow_id=3)
        everything = a + b + other
        await wait_for(lambda: all(i in fake_hubspot.completed for i in everything), timeout=30)
    assert max_in_window(sorted(fake_hubspot.sends_for(a + b)), 1.0) <= 3
    other_times = sorted(fake_hubspot.sends_for(other))
    assert other_times[-1] - other_times[0] < 1.0  # its own limit (5), not the shared one


async def test_start_time_holds_then_priority_orders_release(daemon_factory, fake_hubspot):
    start_at = datetime.fromtimestamp(time.time() + 1.5, UTC)
    fields = {
        "maxThroughput": "1",
        "timeUnit": "seconds",
        "startAt": start_at.isoformat(),
        "queueName": "prio",
    }
    priorities = [0, 5, 1, 9, 5, 2]
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        ids = []
        for p in priorities:
            ids += await _send(daemon, 1, {**fields, "priority": str(p)})
        await wait_for(lambda: all(i in fake_hubspot.completed for i in ids), timeout=30)
    arrival = {cid: fake_hubspot.sends_for([cid])[0] for cid in ids}
    assert min(arrival.values()) >= start_at.timestamp()
    order = sorted(ids, key=lambda cid: arrival[cid])
    expected = [
        cid
        for _, _, cid in sorted(
            ((-p, n, cid) for n, (p, cid) in enumerate(zip(priorities, ids, strict=True)))
        )
    ]
    assert order == expected
