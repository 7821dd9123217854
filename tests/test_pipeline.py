"""End to end: signed request in → committed row → completion at the fake HubSpot."""

from __future__ import annotations

import psycopg

from tests.conftest import action_payload, wait_for


async def test_signed_action_is_stored_then_completed(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        payload = action_payload(input_fields={"maxThroughput": "5", "timeUnit": "seconds"})
        status, body = await daemon.post_action(payload)
        assert status == 200
        assert body == {
            "outputFields": {"hs_execution_state": "BLOCK", "hs_expiration_duration": "P7D"}
        }
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)
        _, fields = fake_hubspot.completed[payload["callbackId"]]
        assert fields == {"hs_execution_state": "SUCCESS"}
        await wait_for(lambda: _state(db_url, payload["callbackId"]) == "done")


def _state(db_url: str, callback_id: str) -> str | None:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT state FROM actions WHERE callback_id = %s", (callback_id,)
        ).fetchone()
    return row[0] if row else None
