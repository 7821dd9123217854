"""A request's charge: the instant its queues' limiters count it at is the instant stored as
its send (the rate log a restart or a take-over replays), whatever happens between its build
and its write (throttled/drain/charges.py)."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.conftest import ManualClock, action_payload, wait_for
from throttled import metrics
from throttled.drain.charges import MAX_LATE_S

PORTAL = 62515


async def test_the_charge_fixed_at_build_is_the_one_stored(daemon_factory, fake_hubspot, db_url):
    """The allowance for late writes moves between requests (each write teaches it): a
    request built before another's write is learned must keep the charge its limiters
    recorded. (It took the newer allowance when its task started: it stored a send 20 ms
    later than its limiter counted, and its queue's next send came 20 ms early at the wire.)"""
    clock = ManualClock()
    async with daemon_factory(clock=clock) as daemon:
        queue, sender, callback_id = await _one_held(daemon, fake_hubspot, clock)
        assert sender._send_one(await sender._token())  # built: charged to its limiter now
        sender._charges._late_s = MAX_LATE_S  # (another request's late write, learned now)
        await sender.settle()
        next_slot = queue.limiter.earliest(clock())
        stored = await _stored(db_url, callback_id)
    assert set(fake_hubspot.completed) == {callback_id}
    assert abs(next_slot - (stored + 1.0)) < 1e-5, (next_slot, stored)


async def test_a_request_written_late_moves_its_charge_past_the_write(
    daemon_factory, fake_hubspot, db_url
):
    """Written 50 ms after its build (a stalled loop), past the send margin: its charge
    moves to the write + the margin, in its limiter and in what is stored, and is counted."""
    clock = ManualClock()
    async with daemon_factory(clock=clock) as daemon:
        queue, sender, callback_id = await _one_held(daemon, fake_hubspot, clock)
        moved = metrics.CHARGES_MOVED.value()
        built = clock()
        assert sender._send_one(await sender._token())
        clock.advance(0.05)  # (its task starts, and writes, 50 ms after the build)
        await sender.settle()
        next_slot = queue.limiter.earliest(clock())
        stored = await _stored(db_url, callback_id)
        margin = daemon.runtime.dispatcher.margin_s
    assert metrics.CHARGES_MOVED.value() == moved + 1
    assert stored >= built + 0.05 + margin - 1e-6, (stored, built)
    assert abs(next_slot - (stored + 1.0)) < 1e-5, (next_slot, stored)


async def _one_held(daemon: Any, fake: Any, clock: ManualClock) -> tuple[Any, Any, str]:
    """One action of a 1-per-second queue, held by its portal's sender, which is paused (its
    own loop sends nothing: the test builds the request)."""
    await daemon.connect_portal(fake, PORTAL)
    sender = daemon.runtime.dispatcher._sender(PORTAL)  # (made now, to be paused first)
    sender.pause(clock() + 3600)
    payload = action_payload(
        portal_id=PORTAL, input_fields={"maxThroughput": "1", "timeUnit": "seconds"}
    )
    assert (await daemon.post_action(payload))[0] == 200
    await wait_for(lambda: sender.held == 1)
    [queue] = [q for q in daemon.runtime.scheduler.queues.values() if q.portal_id == PORTAL]
    return queue, sender, payload["callbackId"]


async def _stored(db_url: str, callback_id: str) -> float:
    """The row's stored send instant, once the result writer has written it."""
    await wait_for(lambda: _sent_at(db_url, callback_id) is not None)
    stored = _sent_at(db_url, callback_id)
    assert stored is not None
    return float(stored)


def _sent_at(db_url: str, callback_id: str) -> Any:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM sent_at)::float8 FROM actions WHERE callback_id = %s",
            (callback_id,),
        ).fetchone()
    return None if row is None else row[0]
