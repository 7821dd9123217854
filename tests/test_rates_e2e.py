"""Exact rates end to end, checked on the fake HubSpot's receive log.

The first two tests run on the wall clock on purpose: they check the exact rate at the wire,
where the send margin has to absorb the real delivery jitter between the daemon's write and
the fake's timestamp. They assert only the rate invariant on those timestamps (no window
holds more than N; no gap shorter than T/N), never how long the drain took; their timeouts
only catch hangs. The others drive an injected ManualClock (the daemon's and the fake's), so
that what goes in which window is decided by the clock the test moves, not by the machine's
speed.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Daemon,
    ManualClock,
    action_payload,
    make_config,
    running,
    wait_for,
)
from throttled.hubspot.fake import FakeHubSpot, max_in_window

PORTAL = 62515
# Past the next window of a queue sending N a second, and its send margin.
STEP_S = 1.5


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
    # (no window of a second holds more than 5: so the 6th send after any send is at least a
    # window later, and 23 sends span at least 4 windows; no separate duration check)
    assert max_in_window(times, 1.0) <= 5


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
    # The even-pacing invariant at the wire: one every T/N, never a burst (10 % for the
    # delivery jitter between the daemon's write and the fake's timestamp).
    assert min(gaps) >= 0.125 * 0.9, gaps


@contextlib.asynccontextmanager
async def _on_manual_clock(
    db_url: str, clock: ManualClock
) -> AsyncIterator[tuple[FakeHubSpot, Daemon]]:
    """A fake HubSpot and a daemon that both read `clock` (the fake stamps arrivals by it)."""
    async with FakeHubSpot(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, clock=clock) as fake:
        assert fake.base_url is not None
        # No send margin: it absorbs delivery jitter on the wall clock, and here the fake
        # stamps by the same clock the daemon charges by (a margin would also put each charge
        # past the standing clock, so a queue could send only once per instant).
        cfg = make_config(db_url, fake.base_url, sender={"send_margin_ms": 0})
        async with running(cfg, clock=clock) as daemon:
            await daemon.connect_portal(fake, PORTAL)
            yield fake, daemon


async def test_queues_are_independent_and_named_queues_share_a_limit(db_url):
    clock = ManualClock()
    async with _on_manual_clock(db_url, clock) as (fake, daemon):
        shared = {"queueName": "shared", "maxThroughput": "3", "timeUnit": "seconds"}
        a = await _send(daemon, 5, shared, workflow_id=1)
        b = await _send(daemon, 5, shared, workflow_id=2)
        other = await _send(daemon, 5, {"maxThroughput": "5", "timeUnit": "seconds"}, workflow_id=3)
        # The clock stands still: each queue has one window. The other queue sends all 5 in
        # it (its own limit; held to the shared 3 it would wait for good), the shared queue
        # 3 of its 10.
        await wait_for(lambda: all(i in fake.completed for i in other))
        await wait_for(lambda: len(fake.sends_for(a + b)) >= 3)
        assert len(fake.sends_for(a + b)) == 3
        for sent in (6, 9, 10):  # then 3 more per window, as the clock moves
            clock.advance(STEP_S)
            await wait_for(lambda sent=sent: len(fake.sends_for(a + b)) >= sent)
        await wait_for(lambda: all(i in fake.completed for i in a + b))
    assert max_in_window(sorted(fake.sends_for(a + b)), 1.0) <= 3
    assert max_in_window(sorted(fake.sends_for(other)), 1.0) == 5  # its own limit, in one window
    assert len(fake.sends_for(a + b + other)) == 15  # each sent exactly once


async def test_start_time_holds_then_priority_orders_release(db_url):
    clock = ManualClock()
    # Ten minutes ahead: reached only when the test moves the clock, after every action is in.
    start_at = datetime.fromtimestamp(math.ceil(clock() + 600), UTC)
    fields = {
        "maxThroughput": "1",
        "timeUnit": "seconds",
        "startAt": start_at.isoformat(),
        "queueName": "prio",
    }
    priorities = [0, 5, 1, 9, 5, 2]
    async with _on_manual_clock(db_url, clock) as (fake, daemon):
        ids = []
        for p in priorities:
            ids += await _send(daemon, 1, {**fields, "priority": str(p)})
        supervisor = daemon.runtime.scheduler
        await wait_for(lambda: len(supervisor.queues) == 1)
        [queue_id] = supervisor.queues
        await wait_for(lambda: supervisor.has_work(queue_id))
        clock.advance_to(start_at.timestamp())
        supervisor.wake(queue_id)  # (asleep on a real timer until the start, ten minutes off)
        for sent in range(1, len(ids) + 1):  # one a second, as the clock moves
            await wait_for(lambda sent=sent: len(fake.received) >= sent)
            clock.advance(STEP_S)
        await wait_for(lambda: all(i in fake.completed for i in ids))
    # Nothing went before the start (a send then would carry an earlier stamp), then one per
    # request, highest priority first (ties in arrival order).
    assert min(r.at for r in fake.received) >= start_at.timestamp()
    order = [cid for r in fake.received for cid in r.callback_ids]
    assert [len(r.callback_ids) for r in fake.received] == [1] * len(ids)
    expected = [
        cid
        for _, _, cid in sorted(
            ((-p, n, cid) for n, (p, cid) in enumerate(zip(priorities, ids, strict=True)))
        )
    ]
    assert order == expected
