"""The audit log: every change through the admin API and the install flow, newest first."""

from __future__ import annotations

from typing import Any

import psycopg

from tests.conftest import Daemon
from throttled.daemon import maintain_once

TOKEN = "audit-admin-token-0123456789abcdef"
ADMIN = {"admin": {"tokens": [{"id": "ops-1", "token": TOKEN}]}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def call(daemon: Daemon, method: str, path: str, body: Any = None):
    async with daemon.session.request(method, daemon.url + path, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_config_changes_and_a_disconnect_are_recorded_with_who_and_what(
    daemon_factory, fake_hubspot
):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        first = {"portal_id": 1, "action_id": 2, "max_throughput": 5}
        assert (await call(daemon, "POST", "/api/config", first))[0] == 200
        assert (await call(daemon, "POST", "/api/config", {**first, "max_throughput": 9}))[0] == 200
        assert (await call(daemon, "DELETE", "/api/config/1/2"))[0] == 200
        assert (await call(daemon, "DELETE", "/api/portals/62515/connection"))[0] == 200
        status, body = await call(daemon, "GET", "/api/audit")
        assert status == 200
        entries = body["entries"]
        assert [(e["action"], e["target"], e["actor"]) for e in entries] == [
            ("portal.disconnect", "portal:62515", "ops-1"),
            ("config.delete", "config:1:2", "ops-1"),
            ("config.set", "config:1:2", "ops-1"),
            ("config.set", "config:1:2", "ops-1"),
        ]
        assert entries[2]["before"]["max_throughput"] == 5
        assert entries[2]["after"]["max_throughput"] == 9
        assert entries[3]["before"] is None
        assert entries[1]["after"] is None
        status, only = await call(daemon, "GET", "/api/audit?target=portal:62515")
        assert [e["action"] for e in only["entries"]] == ["portal.disconnect"]
        assert TOKEN not in str(body)


async def test_the_audit_is_paginated_and_bounded_in_time(daemon_factory, db_url):
    async with daemon_factory(**ADMIN, retention={"audit_days": 1.0}) as daemon:
        for n in range(1, 8):
            body = {"portal_id": 1, "action_id": n, "max_throughput": 1}
            assert (await call(daemon, "POST", "/api/config", body))[0] == 200
        seen, cursor = [], None
        while True:
            path = "/api/audit?limit=3" + (f"&cursor={cursor}" if cursor else "")
            status, page = await call(daemon, "GET", path)
            assert status == 200
            seen += [e["target"] for e in page["entries"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [f"config:1:{n}" for n in range(7, 0, -1)]
        for bad in ("limit=0", "limit=x", "cursor=-1", "cursor=99999999999999999999"):
            assert (await call(daemon, "GET", f"/api/audit?{bad}"))[0] == 400
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "UPDATE audit_log SET at = now() - interval '2 days' WHERE target = 'config:1:1'"
            )
            conn.execute(
                "INSERT INTO audit_log (actor, action, target, before) VALUES"
                " ('x', 'y', 'z', (SELECT repeat('[', 5000) || repeat(']', 5000))::jsonb)"
            )
        await maintain_once(daemon.runtime)
        status, page = await call(daemon, "GET", "/api/audit?limit=1000")
        assert status == 200
        targets = [e["target"] for e in page["entries"]]
        assert "config:1:1" not in targets  # older than audit_days: deleted
        assert len(targets) == 7
        assert set(page["entries"][0]["before"]) == {"unreadable"}  # (a row Python cannot read)


async def test_an_install_is_recorded_by_the_oauth_actor(db_url, fake_hubspot):
    from tests.test_oauth_flow import install, installer
    from throttled.hubspot.fake import Consent

    fake_hubspot.consent = Consent(portal_id=4242)
    async with installer(db_url, fake_hubspot, "v3", **ADMIN) as daemon:
        assert (await install(daemon))[0] == 200
        status, body = await call(daemon, "GET", "/api/audit?target=portal:4242")
    assert status == 200
    (entry,) = body["entries"]
    assert (entry["actor"], entry["action"], entry["before"]) == ("oauth", "portal.install", None)
    assert "automation" in entry["after"]["scopes"]
