"""No plaintext token in the database or in the logs, after every token-handling path ran."""

from __future__ import annotations

import secrets

import aiohttp
import psycopg
import pytest

from tests.conftest import CLIENT_SECRET, action_payload, wait_for
from tests.daemon_process import post_signed, started_daemon
from throttled.hubspot.fake import Consent, FakeHubSpot

ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(24)


def every_stored_value(db_url: str) -> str:
    """Every row of every table of ours, as text (what a dump would hold)."""
    with psycopg.connect(db_url) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
        ]
        parts = []
        for table in tables:
            for (row,) in conn.execute(f'SELECT t::text FROM "{table}" t').fetchall():
                parts.append(row)
    return "\n".join(parts)


def issued_secrets(fake: FakeHubSpot) -> set[str]:
    """Every token and code the fake handed out or was sent (its books are the only record)."""
    values: set[str] = set(fake._tokens) | set(fake._refresh_tokens)  # (test double's state)
    for form in fake.token_requests:
        values.update(v for k, v in form.items() if k in ("code", "refresh_token"))
    for query in fake.authorize_requests:
        values.add(query["state"])
    return {v for v in values if len(v) >= 8}


@pytest.mark.parametrize("version", ["v1", "v3"])
async def test_no_plaintext_token_in_the_database_or_the_logs(
    tmp_path, db_url, fake_hubspot, version
):
    fake_hubspot.consent = Consent(portal_id=62515)
    sections = {
        "hubspot": {"auth_base_url": fake_hubspot.base_url, "oauth_version": version},
        "admin": {"tokens": [{"id": "ops", "token": ADMIN_TOKEN}]},
        "logging": {"level": "debug"},
        "sender": {"disconnected_retry_s": 0.2},
    }
    async with (
        started_daemon(
            tmp_path, db_url=db_url, api_base_url=fake_hubspot.base_url, **sections
        ) as proc,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(proc.url + "/api/oauth/authorize") as resp:  # install
            assert resp.status == 200, await resp.text()
        payload = action_payload(portal_id=62515)
        assert (await post_signed(session, proc.url, payload)).status == 200
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        for method, path in [
            ("GET", "/api/portals"),
            ("POST", "/api/portals/62515/test"),
            ("GET", "/api/portals/62515"),
        ]:
            async with session.request(method, proc.url + path, headers=auth) as resp:
                assert resp.status == 200
        async with session.get(proc.url + "/api/portals", headers={"Authorization": "Bearer no"}):
            pass
        fake_hubspot.expire_tokens()  # the next send gets a 401 and refreshes
        second = action_payload(portal_id=62515)
        assert (await post_signed(session, proc.url, second)).status == 200
        await wait_for(lambda: second["callbackId"] in fake_hubspot.completed)
        async with session.delete(proc.url + "/api/portals/62515/connection", headers=auth) as resp:
            assert resp.status == 200
        logs = proc.log_tail(10_000_000)
    stored = every_stored_value(db_url)
    values = issued_secrets(fake_hubspot)
    assert len(values) >= 4
    for value in [*values, ADMIN_TOKEN, CLIENT_SECRET]:
        assert value not in stored, "a plaintext secret is stored"
        assert value not in logs, "a secret is in the logs"
    assert '"token_id": "ops"' in logs  # the admin token is logged by its id
    assert "token_refreshed" in logs
