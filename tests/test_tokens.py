"""OAuth tokens: encrypted at rest, refreshed ahead of expiry, one refresh at a time."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import psycopg

from tests.conftest import action_payload, wait_for
from throttled.tokens import token_aad


async def test_concurrent_callers_share_one_refresh(daemon_factory, fake_hubspot):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        tokens = daemon.runtime.dispatcher.tokens
        results = await asyncio.gather(*(tokens.access_token(62515) for _ in range(20)))
        assert len(set(results)) == 1
        grants = [r for r in fake_hubspot.token_requests if r["grant_type"] == "refresh_token"]
        assert len(grants) == 1


async def test_tokens_are_encrypted_at_rest(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        payload = action_payload()
        await daemon.post_action(payload)
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)
        plain = await daemon.runtime.dispatcher.tokens.access_token(62515)
    with psycopg.connect(db_url) as conn:
        refresh, access = conn.execute(
            "SELECT refresh_token, access_token FROM portals WHERE portal_id = 62515"
        ).fetchone()
    assert refresh.startswith("v1.")
    assert access.startswith("v1.")
    assert plain not in access
    assert "refresh-62515" not in refresh


async def test_a_stored_token_expiring_within_the_margin_is_refreshed_first(
    daemon_factory, fake_hubspot, db_url
):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        tokens = daemon.runtime.dispatcher.tokens
        stored = fake_hubspot.issue_token(62515)
        sealed = tokens.keyring.encrypt(stored, aad=token_aad(62515, "access"))
        with psycopg.connect(db_url) as conn:  # good for 200 s more: inside the 300 s margin
            conn.execute(
                "UPDATE portals SET access_token = %s,"
                " access_expires_at = now() + interval '200 seconds'",
                (sealed,),
            )
        token = await tokens.access_token(62515)
        assert token != stored
        grants = [r for r in fake_hubspot.token_requests if r["grant_type"] == "refresh_token"]
        assert len(grants) == 1


def test_log_lines_never_carry_secrets():
    # In a child process: structlog's configuration is global and cached.
    code = (
        "from throttled import logs; import structlog; logs.setup('info', 'json'); "
        "structlog.get_logger('t').info('event', access_token='at-123', refresh_token='rt-456',"
        " authorization='Bearer x', client_secret='cs-789', signature='sig', portal_id=1)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for secret in ("at-123", "rt-456", "Bearer x", "cs-789", '"sig"'):
        assert secret not in run.stderr
    assert '"portal_id": 1' in run.stderr
