"""The OAuth install flow against the fake HubSpot, in both OAuth dialects (v1 and v3)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest

from tests.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Daemon,
    action_payload,
    make_config,
    running,
    wait_for,
)
from tests.daemon_process import free_port
from throttled.daemon import maintain_once
from throttled.hubspot.fake import Consent, FakeHubSpot
from throttled.web import oauth

PORTAL = 4242


@pytest.fixture(params=["v1", "v3"])
def oauth_version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def installer(
    db_url: str, fake: FakeHubSpot, version: str, **sections: dict[str, Any]
) -> AsyncIterator[Daemon]:
    """A daemon whose install flow goes to the fake (consent page and API on one server)."""
    port = free_port()
    server = {"port": port, "public_url": f"http://127.0.0.1:{port}", **sections.pop("server", {})}
    hubspot = {
        "auth_base_url": fake.base_url,
        "oauth_version": version,
        **sections.pop("hubspot", {}),
    }
    cfg = make_config(db_url, fake.base_url, server=server, hubspot=hubspot, **sections)
    async with running(cfg) as daemon:
        yield daemon


async def install(daemon: Daemon) -> tuple[int, str]:
    """Follow every redirect from /api/oauth/authorize; the final (status, page)."""
    async with daemon.session.get(daemon.url + "/api/oauth/authorize") as resp:
        return resp.status, await resp.text()


async def consent_redirect(daemon: Daemon) -> str:
    """Run the flow up to HubSpot's redirect back: the callback URL (code and state in it)."""
    async with daemon.session.get(
        daemon.url + "/api/oauth/authorize", allow_redirects=False
    ) as resp:
        assert resp.status == 302
        to_hubspot = resp.headers["Location"]
    async with daemon.session.get(to_hubspot, allow_redirects=False) as resp:
        assert resp.status == 302
        return resp.headers["Location"]


async def head_of(daemon: Daemon, path: str) -> tuple[int, Any]:
    """The status and headers of one request, redirects not followed."""
    async with daemon.session.get(daemon.url + path, allow_redirects=False) as resp:
        return resp.status, resp.headers


async def follow(daemon: Daemon, path: str) -> tuple[int, Any, str]:
    """Status, headers and text at the end of the redirects."""
    async with daemon.session.get(daemon.url + path) as resp:
        return resp.status, resp.headers, await resp.text()


async def get(daemon: Daemon, url: str) -> tuple[int, str]:
    async with daemon.session.get(url, allow_redirects=False) as resp:
        return resp.status, await resp.text()


def portal_rows(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT portal_id, status, scopes, refresh_token, access_token FROM portals"
        ).fetchall()


def code_exchanges(fake: FakeHubSpot) -> list[dict[str, str]]:
    return [r for r in fake.token_requests if r.get("grant_type") == "authorization_code"]


async def test_the_full_flow_connects_the_portal_and_its_actions_complete(
    db_url, fake_hubspot, oauth_version
):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    async with installer(db_url, fake_hubspot, oauth_version) as daemon:
        status, text = await install(daemon)
        assert status == 200, text
        assert f"Portal {PORTAL}" in text
        assert "connected" in text
        # what went to HubSpot's consent page
        (asked,) = fake_hubspot.authorize_requests
        assert asked["client_id"] == CLIENT_ID
        assert asked["redirect_uri"] == daemon.url + "/api/oauth/callback"
        assert asked["scope"] == "automation oauth"
        assert len(asked["state"]) >= 40
        # the code was exchanged with the same redirect_uri, in the configured dialect
        (exchange,) = code_exchanges(fake_hubspot)
        assert exchange["redirect_uri"] == asked["redirect_uri"]
        assert exchange["client_secret"] == CLIENT_SECRET
        assert fake_hubspot.token_paths[-1] == f"/oauth/{oauth_version}/token"
        ((portal, state, scopes, refresh, access),) = portal_rows(db_url)
        assert (portal, state) == (PORTAL, "connected")
        assert "automation" in scopes
        assert refresh.startswith("v1.")
        assert access.startswith("v1.")
        # the stored token completes an action without a refresh
        payload = action_payload(portal_id=PORTAL)
        assert (await daemon.post_action(payload))[0] == 200
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)
        refreshes = [r for r in fake_hubspot.token_requests if r["grant_type"] == "refresh_token"]
        assert refreshes == []


async def test_optional_scopes_are_requested_when_configured(db_url, fake_hubspot):
    hubspot = {"optional_scopes": "crm.objects.contacts.read"}
    async with installer(db_url, fake_hubspot, "v3", hubspot=hubspot) as daemon:
        status, headers = await head_of(daemon, "/api/oauth/authorize")
    assert status == 302
    location = headers["Location"]
    assert headers["Cache-Control"] == "no-store"
    query = parse_qs(urlsplit(location).query)
    assert query["optional_scope"] == ["crm.objects.contacts.read"]
    assert query["scope"] == ["automation oauth"]
    assert "%20" in location  # spaces as %20, as HubSpot's own examples


@pytest.mark.parametrize(
    "case", ["missing_state", "missing_code", "unknown", "reused", "expired", "forged", "repeated"]
)
async def test_a_bad_state_is_a_400_page_and_nothing_is_stored(
    db_url, fake_hubspot, oauth_version, case
):
    async with installer(db_url, fake_hubspot, oauth_version) as daemon:
        callback = await consent_redirect(daemon)
        query = parse_qs(urlsplit(callback).query)
        code, state = query["code"][0], query["state"][0]
        base = daemon.url + "/api/oauth/callback"
        if case == "missing_state":
            url = f"{base}?code={code}"
        elif case == "missing_code":
            url = f"{base}?state={state}"
        elif case == "unknown":
            url = f"{base}?code={code}&state={secrets.token_urlsafe(32)}"
        elif case == "forged":  # a state's look, but a character changed
            url = f"{base}?code={code}&state={state[:-1]}{'A' if state[-1] != 'A' else 'B'}"
        elif case == "repeated":
            url = f"{callback}&state={state}"
        elif case == "expired":
            with psycopg.connect(db_url) as conn:
                conn.execute("UPDATE oauth_states SET expires_at = now() - interval '1 second'")
            url = callback
        else:  # reused: the first use connects, the second is refused
            assert (await get(daemon, callback))[0] == 200
            with psycopg.connect(db_url) as conn:
                conn.execute("DELETE FROM portals")
            exchanges_before = len(code_exchanges(fake_hubspot))
            status, text = await get(daemon, callback)
            assert status == 400
            assert "already used" in text
            assert len(code_exchanges(fake_hubspot)) == exchanges_before
            assert portal_rows(db_url) == []
            return
        status, text = await get(daemon, url)
        assert status == 400, text
        assert text.startswith("<!doctype html>")
        assert portal_rows(db_url) == []
        assert code_exchanges(fake_hubspot) == []
        if case == "expired":
            assert "expired" in text
            with psycopg.connect(db_url) as conn:  # and it is gone: single use either way
                assert conn.execute("SELECT count(*) FROM oauth_states").fetchone() == (0,)


async def test_a_declined_install_gets_a_clear_page(db_url, fake_hubspot, oauth_version):
    fake_hubspot.consent = Consent(portal_id=PORTAL, decline=True)
    async with installer(db_url, fake_hubspot, oauth_version) as daemon:
        status, text = await install(daemon)
        assert status == 400
        assert "not connected" in text
        assert "access_denied" in text
        assert portal_rows(db_url) == []
        # values from the query are escaped, and the state was spent
        hostile = "<script>alert(1)</script>"
        status, text = await get(
            daemon, f"{daemon.url}/api/oauth/callback?error={hostile}&error_description={hostile}"
        )
        assert status == 400
        assert "<script>" not in text
        assert "&lt;script&gt;" in text
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM oauth_states").fetchone() == (0,)


async def test_an_install_without_the_automation_scope_is_refused(
    db_url, fake_hubspot, oauth_version
):
    fake_hubspot.consent = Consent(portal_id=PORTAL, granted=("oauth", "crm.objects.contacts.read"))
    async with installer(db_url, fake_hubspot, oauth_version) as daemon:
        status, text = await install(daemon)
    assert status == 403
    assert "automation" in text
    assert "crm.objects.contacts.read" in text
    assert portal_rows(db_url) == []
    assert len(fake_hubspot.revoked) == 1  # the useless refresh token was handed back


async def test_reinstalling_replaces_the_tokens_and_reconnects(db_url, fake_hubspot, oauth_version):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    async with installer(
        db_url, fake_hubspot, oauth_version, sender={"disconnected_retry_s": 3600.0}
    ) as daemon:
        assert (await install(daemon))[0] == 200
        ((_, _, _, first_refresh, first_access),) = portal_rows(db_url)
        tokens = daemon.runtime.dispatcher.tokens
        await tokens.disconnect(PORTAL, "test")
        payload = action_payload(portal_id=PORTAL)
        assert (await daemon.post_action(payload))[0] == 200
        with psycopg.connect(db_url) as conn:  # the action waits for the connection
            await wait_for(
                lambda: (
                    conn.execute("SELECT last_error LIKE 'waiting for%' FROM actions").fetchone()
                    == (True,)
                )
            )
        assert payload["callbackId"] not in fake_hubspot.completed
        assert (await install(daemon))[0] == 200  # reinstall: wakes it (not an hour later)
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)
        ((_, state, _, refresh, access),) = portal_rows(db_url)
        assert state == "connected"
        assert refresh != first_refresh
        assert access != first_access
        with psycopg.connect(db_url) as conn:  # the wait cost it nothing
            await wait_for(
                lambda: conn.execute("SELECT state FROM actions").fetchone() == ("done",)
            )
            assert conn.execute("SELECT failures FROM actions").fetchone() == (0,)


async def test_authorize_without_a_public_url_names_the_keys_to_set(db_url, fake_hubspot):
    cfg = make_config(db_url, fake_hubspot.base_url)
    async with running(cfg) as daemon:
        status, text = await get(daemon, daemon.url + "/api/oauth/authorize")
    assert status == 503
    assert "server.public_url" in text
    assert "hubspot.redirect_uri" in text


async def test_live_states_are_capped_per_client_and_in_all_exactly(
    db_url, fake_hubspot, monkeypatch
):
    monkeypatch.setattr(oauth, "MAX_CLIENT_STATES", 4)
    monkeypatch.setattr(oauth, "MAX_LIVE_STATES", 6)

    async def authorize(daemon: Daemon, forwarded: str) -> int:
        headers = {"X-Forwarded-For": f"203.0.113.9, {forwarded}"}
        async with daemon.session.get(
            daemon.url + "/api/oauth/authorize", allow_redirects=False, headers=headers
        ) as resp:
            return resp.status

    server = {"trust_forwarded_for": True}
    async with installer(db_url, fake_hubspot, "v3", server=server) as daemon:
        # one client, all at once: exactly its cap gets through
        first = await asyncio.gather(*(authorize(daemon, "198.51.100.1") for _ in range(10)))
        assert sorted(first) == [302] * 4 + [429] * 6
        # the same IPv6 /64 is one client; another /64 is another
        assert await authorize(daemon, "2001:db8:0:1::1") == 302
        assert await authorize(daemon, "2001:db8:0:1::2") == 302
        assert await authorize(daemon, "2001:db8:0:2::1") == 503  # 6 in all
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM oauth_states").fetchone() == (6,)
            conn.execute("UPDATE oauth_states SET expires_at = now() - interval '1 second'")
        assert await authorize(daemon, "198.51.100.1") == 302  # expired ones no longer count
        await maintain_once(daemon.runtime)
        with psycopg.connect(db_url) as conn:  # and maintenance deletes them
            assert conn.execute("SELECT count(*) FROM oauth_states").fetchone() == (1,)


async def test_forwarded_for_is_ignored_unless_trusted(db_url, fake_hubspot, monkeypatch):
    monkeypatch.setattr(oauth, "MAX_CLIENT_STATES", 2)
    async with installer(db_url, fake_hubspot, "v3") as daemon:
        statuses = []
        for n in range(3):  # a new "client" each time, by a header anyone can send
            async with daemon.session.get(
                daemon.url + "/api/oauth/authorize",
                allow_redirects=False,
                headers={"X-Forwarded-For": f"198.51.100.{n}"},
            ) as resp:
                statuses.append(resp.status)
    assert statuses == [302, 302, 429]


async def test_a_hubspot_outage_during_the_exchange_is_a_502_page(db_url, fake_hubspot):
    async with installer(db_url, fake_hubspot, "v3") as daemon:
        callback = await consent_redirect(daemon)
        fake_hubspot.fail_token_next(503)
        status, text = await get(daemon, callback)
    assert status == 502
    assert "could not be reached" in text
    assert portal_rows(db_url) == []


async def test_the_pages_are_self_contained(db_url, fake_hubspot):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    async with installer(db_url, fake_hubspot, "v3") as daemon:
        status, headers, text = await follow(daemon, "/api/oauth/authorize")
    assert status == 200
    assert "src=" not in text
    assert "href=" not in text
    assert "<link" not in text
    assert headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]


async def test_the_callback_needs_no_admin_token_and_ignores_one(db_url, fake_hubspot):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    async with installer(
        db_url, fake_hubspot, "v3", admin={"tokens": [{"id": "a", "token": "x" * 32}]}
    ) as daemon:
        status, _ = await install(daemon)
    assert status == 200


async def test_mock_mode_installs_against_the_built_in_fake(db_url, tmp_path):
    port = free_port()
    cfg = make_config(
        db_url,
        "http://127.0.0.1:1",  # (unused: mock mode serves its own)
        server={"port": port},
        hubspot={"mock": True, "client_id": "", "client_secret": "dev.placeholder.not.a.secret"},
        database={"url": db_url, "data_dir": str(tmp_path)},
    )
    async with running(cfg) as daemon:
        status, _, text = await follow(daemon, "/api/oauth/authorize")
    assert status == 200, text
    assert portal_rows(db_url)[0][1] == "connected"


async def test_head_neither_stores_nor_spends_a_state(db_url, fake_hubspot):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    async with installer(db_url, fake_hubspot, "v3") as daemon:
        callback = await consent_redirect(daemon)
        for url in (daemon.url + "/api/oauth/authorize", callback):
            async with daemon.session.head(url, allow_redirects=False) as resp:
                assert resp.status == 405
        with psycopg.connect(db_url) as conn:
            assert conn.execute("SELECT count(*) FROM oauth_states").fetchone() == (1,)
        assert (await get(daemon, callback))[0] == 200


async def test_an_install_naming_no_portal_is_refused_and_its_tokens_given_back(
    db_url, fake_hubspot
):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    fake_hubspot.token_names_portal = False  # a token response without hub_id ...
    fake_hubspot.introspect_minimal = True  # ... and introspection says only {"active": true}
    async with installer(db_url, fake_hubspot, "v3") as daemon:
        status, text = await install(daemon)
    assert status == 502
    assert "which portal" in text
    assert portal_rows(db_url) == []
    assert len(fake_hubspot.revoked) == 1


async def test_a_token_response_without_hub_id_is_completed_by_token_info(
    db_url, fake_hubspot, oauth_version
):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    fake_hubspot.token_names_portal = False
    async with installer(db_url, fake_hubspot, oauth_version) as daemon:
        status, text = await install(daemon)
    assert status == 200, text
    assert portal_rows(db_url)[0][:2] == (PORTAL, "connected")
