"""A request's charge: the instant its queues' limiters count it at is the instant stored as
its send (the rate log a restart or a take-over replays), whatever happens between its build
and its write (throttled/drain/charges.py)."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.conftest import ManualClock, action_payload, wait_for
from throttled.drain.charges import MAX_LATE_S

PORTAL = 62515


async def test_the_charge_fixed_at_build_is_the_one_stored(daemon_factory, fake_hubspot, db_url):
    """The allowance for late writes moves between requests (each write teaches it): a
    request built before another's write is learned must keep the charge its limiters
    recorded. (It took the newer allowance when its task started: it stored a send 20 ms
    later than its limiter counted, and its queue's next send came 20 ms early at the wire.)"""
    clock = ManualClock()
    async with daemon_factory(clock=clock) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        sender = daemon.runtime.dispatcher._sender(PORTAL)  # (made now, to be paused first)
        sender.pause(clock() + 3600)  # (its own loop sends nothing: this test builds)
        payload = action_payload(
            portal_id=PORTAL, input_fields={"maxThroughput": "1", "timeUnit": "seconds"}
        )
        assert (await daemon.post_action(payload))[0] == 200
        await wait_for(lambda: sender.held == 1)
        [queue] = [q for q in daemon.runtime.scheduler.queues.values() if q.portal_id == PORTAL]

        assert sender._send_one(await sender._token())  # built: charged to its limiter now
        sender._charges._late_s = MAX_LATE_S  # (another request's late write, learned now)
        await sender.settle()
        next_slot = queue.limiter.earliest(clock())
        await wait_for(lambda: _sent_at(db_url, payload["callbackId"]) is not None)
        stored = _sent_at(db_url, payload["callbackId"])
    assert set(fake_hubspot.completed) == {payload["callbackId"]}
    assert stored is not None
    assert abs(next_slot - (stored + 1.0)) < 1e-5, (next_slot, stored)


def _sent_at(db_url: str, callback_id: str) -> Any:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM sent_at)::float8 FROM actions WHERE callback_id = %s",
            (callback_id,),
        ).fetchone()
    return None if row is None else row[0]
