"""GET /api/actions/{callbackId}: one action's state, queue, attempts and timestamps."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import action_payload, wait_for

TOKEN = "actions-admin-token-0123456789abc"
ADMIN = {"admin": {"tokens": [{"id": "ops", "token": TOKEN}]}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_an_action_is_shown_with_its_history(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        payload = action_payload(portal_id=62515)
        cid = payload["callbackId"]
        assert (await daemon.post_action(payload))[0] == 200
        await wait_for(lambda: cid in fake_hubspot.completed)
        with psycopg.connect(db_url) as conn:
            await wait_for(
                lambda: conn.execute("SELECT state FROM actions").fetchone() == ("done",)
            )
        async with daemon.session.get(f"{daemon.url}/api/actions/{cid}", headers=AUTH) as resp:
            assert resp.status == 200
            shown = await resp.json()
        assert shown["callback_id"] == cid
        assert shown["state"] == "done"
        assert shown["queue_key"].startswith("queue:62515:")
        for key in ("received_at", "claimed_at", "sent_at", "completed_at", "deadline"):
            assert shown[key] is not None, key
        assert shown["received_at"] <= shown["sent_at"] <= shown["completed_at"] < shown["deadline"]
        async with daemon.session.get(f"{daemon.url}/api/actions/nope", headers=AUTH) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "action_not_found"
        async with daemon.session.get(f"{daemon.url}/api/actions/{cid}") as resp:
            assert resp.status == 401


@pytest.mark.parametrize("callback_id", ["x" * 256, "%00", "%1b%5b31m"])
async def test_a_callback_id_out_of_bounds_is_a_400(daemon_factory, callback_id):
    async with (
        daemon_factory(**ADMIN) as daemon,
        daemon.session.get(f"{daemon.url}/api/actions/{callback_id}", headers=AUTH) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["field"] == "callbackId"
