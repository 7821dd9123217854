"""Token lifecycle: refresh ahead of expiry, one refresh across instances, disconnection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import psycopg
import pytest

from tests.conftest import CLIENT_ID, CLIENT_SECRET, action_payload, make_config, wait_for
from throttled.crypto import KeyRing
from throttled.daemon import make_tokens
from throttled.db.repository import Repository
from throttled.hubspot.client import TokenError
from throttled.hubspot.fake import FakeHubSpot
from throttled.tokens import PortalNotConnected, Tokens, token_aad

PORTAL = 62515


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        import time

        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["v1", "v3"])
def oauth_version(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def token_store(
    db_url: str, fake: FakeHubSpot, version: str, clock: Any = None, key: str | None = None
) -> AsyncIterator[Tokens]:
    """A Tokens over its own pool and HTTP session, as one daemon instance has."""
    key = key or base64.b64encode(secrets.token_bytes(32)).decode()
    cfg = make_config(
        db_url, fake.base_url, hubspot={"oauth_version": version}, security={"encryption_key": key}
    )
    async with (
        Repository.open(db_url, min_size=1, max_size=4) as repo,
        aiohttp.ClientSession() as session,
    ):
        yield make_tokens(
            cfg, repo, session, KeyRing.from_texts(key), fake.base_url, clock or Clock()
        )


def refresh_requests(fake: FakeHubSpot) -> list[dict[str, str]]:
    return [r for r in fake.token_requests if r.get("grant_type") == "refresh_token"]


async def test_refresh_happens_ahead_of_expiry_by_the_margin(db_url, fake_hubspot, oauth_version):
    clock = Clock()
    fake_hubspot.register_portal(PORTAL, "rt-1")
    async with token_store(db_url, fake_hubspot, oauth_version, clock) as tokens:
        await tokens.connect(PORTAL, "rt-1")
        first = await tokens.access_token(PORTAL)
        assert len(refresh_requests(fake_hubspot)) == 1
        # HubSpot's tokens last 1,800 s; the margin is 300 s: good until 1,500 s from now
        clock.now += 1499
        assert await tokens.access_token(PORTAL) == first
        assert len(refresh_requests(fake_hubspot)) == 1
        clock.now += 2
        second = await tokens.access_token(PORTAL)
        assert second != first
        assert len(refresh_requests(fake_hubspot)) == 2


async def test_two_instances_refreshing_at_once_make_one_token_request(
    db_url, fake_hubspot, oauth_version
):
    fake_hubspot.register_portal(PORTAL, "rt-1")
    fake_hubspot.token_delay_s = 0.5  # both ask while the first refresh is under way
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    async with (
        token_store(db_url, fake_hubspot, oauth_version, key=key) as one,
        token_store(db_url, fake_hubspot, oauth_version, key=key) as two,
    ):
        await one.connect(PORTAL, "rt-1")
        results = await asyncio.gather(*(t.access_token(PORTAL) for t in (one, two, one, two, two)))
    assert len(set(results)) == 1
    assert len(refresh_requests(fake_hubspot)) == 1


async def test_the_refresh_token_hubspot_returns_is_kept(db_url, fake_hubspot, oauth_version):
    clock = Clock()
    fake_hubspot.register_portal(PORTAL, "rt-old")
    fake_hubspot.rotate_refresh_tokens = True
    async with token_store(db_url, fake_hubspot, oauth_version, clock) as tokens:
        await tokens.connect(PORTAL, "rt-old")
        await tokens.access_token(PORTAL)
        clock.now += 1600
        await tokens.access_token(PORTAL)
    first, second = refresh_requests(fake_hubspot)
    assert first["refresh_token"] == "rt-old"
    assert second["refresh_token"] != "rt-old"  # the one the first refresh returned


async def test_invalid_grant_disconnects_the_portal_with_the_reason(
    db_url, fake_hubspot, oauth_version
):
    fake_hubspot.register_portal(PORTAL, "rt-1")
    async with token_store(db_url, fake_hubspot, oauth_version) as tokens:
        await tokens.connect(PORTAL, "rt-1")
        fake_hubspot.revoke_portal(PORTAL)  # the app was uninstalled
        with pytest.raises(PortalNotConnected) as raised:
            await tokens.access_token(PORTAL)
        assert "refused the refresh token" in raised.value.reason
        requests = len(fake_hubspot.token_requests)
        with pytest.raises(PortalNotConnected):  # no request per call while disconnected
            await tokens.access_token(PORTAL)
        assert len(fake_hubspot.token_requests) == requests
        assert tokens.health.portal(PORTAL).state() == "unhealthy"
    with psycopg.connect(db_url) as conn:
        status, reason, refresh = conn.execute(
            "SELECT status, disconnected_reason, refresh_token FROM portals"
        ).fetchone()
    assert status == "disconnected"
    assert "invalid_grant" in reason or "BAD_REFRESH_TOKEN" in reason
    assert refresh is None


async def test_other_refresh_failures_are_retried_and_keep_the_connection(
    db_url, fake_hubspot, oauth_version
):
    fake_hubspot.register_portal(PORTAL, "rt-1")
    async with token_store(db_url, fake_hubspot, oauth_version) as tokens:
        await tokens.connect(PORTAL, "rt-1")
        fake_hubspot.fail_token_next(503)
        with pytest.raises(TokenError):
            await tokens.access_token(PORTAL)
        with psycopg.connect(db_url) as conn:
            status, error = conn.execute(
                "SELECT status, last_refresh_error FROM portals"
            ).fetchone()
        assert status == "connected"
        assert "503" in error
        assert await tokens.access_token(PORTAL)  # the next call refreshes
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT last_refresh_error FROM portals").fetchone() == (None,)


async def test_a_disconnected_portals_actions_wait_uncounted_then_drain(
    daemon_factory, fake_hubspot, db_url
):
    async with daemon_factory(sender={"disconnected_retry_s": 0.2}) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fake_hubspot.revoke_portal(PORTAL)
        fake_hubspot.expire_tokens()
        daemon.runtime.dispatcher.tokens.invalidate(PORTAL)
        payloads = [action_payload(portal_id=PORTAL) for _ in range(3)]
        for p in payloads:
            assert (await daemon.post_action(p))[0] == 200
        with psycopg.connect(db_url) as conn:

            def waited() -> bool:
                rows = conn.execute("SELECT state, attempts, last_error FROM actions").fetchall()
                return all(
                    s in ("pending", "claimed") and a == 0 and (e or "").startswith("waiting")
                    for s, a, e in rows
                )

            await wait_for(waited)
            await asyncio.sleep(1.0)  # several rounds of waiting: still not counted
            assert waited()
            assert conn.execute("SELECT status FROM portals").fetchone() == ("disconnected",)
        assert not any(p["callbackId"] in fake_hubspot.completed for p in payloads)
        await daemon.connect_portal(fake_hubspot, PORTAL)  # connected again
        await wait_for(lambda: all(p["callbackId"] in fake_hubspot.completed for p in payloads))


async def test_an_action_for_a_portal_never_connected_is_kept(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory(sender={"disconnected_retry_s": 0.2}) as daemon:
        payload = action_payload(portal_id=777)
        assert (await daemon.post_action(payload))[0] == 200
        with psycopg.connect(db_url) as conn:
            await wait_for(
                lambda: conn.execute("SELECT last_error FROM actions").fetchone()[0] is not None
            )
            state, attempts, error = conn.execute(
                "SELECT state, attempts, last_error FROM actions"
            ).fetchone()
        assert (state, attempts) == ("pending", 0)
        assert "not connected" in error
        await daemon.connect_portal(fake_hubspot, 777)
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)


async def test_a_ciphertext_copied_to_another_portal_does_not_decrypt(db_url, fake_hubspot):
    fake_hubspot.register_portal(1, "rt-one")
    fake_hubspot.register_portal(2, "rt-two")
    async with token_store(db_url, fake_hubspot, "v3") as tokens:
        await tokens.connect(1, "rt-one")
        await tokens.connect(2, "rt-two")
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "UPDATE portals SET refresh_token = (SELECT refresh_token FROM portals"
                " WHERE portal_id = 1) WHERE portal_id = 2"
            )
        from throttled.crypto import CryptoError

        with pytest.raises(CryptoError):
            await tokens.access_token(2)
        assert await tokens.access_token(1)
        row = await tokens._repo.get_portal(1)
        assert row is not None
        assert row.refresh_token is not None
        assert tokens.keyring.decrypt(row.refresh_token, aad=token_aad(1, "refresh")) == "rt-one"
        with pytest.raises(CryptoError):
            tokens.keyring.decrypt(row.refresh_token, aad=token_aad(1, "access"))


@pytest.mark.parametrize(
    "key",
    [
        "",  # missing
        base64.b64encode(secrets.token_bytes(16)).decode(),  # short
        "not base64 at all!",  # malformed
        base64.b64encode(secrets.token_bytes(33)).decode(),  # long
    ],
)
def test_a_missing_short_or_malformed_key_is_refused_with_how_to_make_one(key):
    from throttled import config as config_module
    from throttled.daemon import StartupError, keyring_for

    raw = {"security": {"encryption_key": key}, "hubspot": {"client_secret": "s"}}

    def start() -> None:
        cfg = config_module.from_mapping(raw)
        config_module.validate(cfg)
        keyring_for(cfg)

    with pytest.raises((config_module.ConfigError, StartupError)) as raised:
        start()
    message = str(raised.value)
    assert "security.encryption_key" in message
    assert "throttled keys generate" in message
    if key:
        assert key not in message


async def test_a_disconnect_elsewhere_stops_this_instance_within_the_recheck(db_url, fake_hubspot):
    from throttled.tokens import RECHECK_S

    clock = Clock()
    fake_hubspot.register_portal(PORTAL, "rt-1")
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    async with (
        token_store(db_url, fake_hubspot, "v3", clock, key=key) as here,
        token_store(db_url, fake_hubspot, "v3", clock, key=key) as there,
    ):
        await here.connect(PORTAL, "rt-1")
        token = await here.access_token(PORTAL)
        await there.disconnect(PORTAL, "by the CLI")
        assert await here.access_token(PORTAL) == token  # (cached, taken on trust) ...
        clock.now += RECHECK_S + 1
        with pytest.raises(PortalNotConnected, match="by the CLI"):  # ... for a while only
            await here.access_token(PORTAL)


async def test_an_uninstall_seen_as_401_costs_the_actions_no_attempt(
    daemon_factory, fake_hubspot, db_url
):
    # max_attempts = 1: a single counted failure would fail the actions for good
    sender = {"disconnected_retry_s": 0.2, "max_attempts": 1, "backoff_base_s": 0.05}
    async with daemon_factory(sender=sender) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        await daemon.runtime.dispatcher.tokens.access_token(PORTAL)  # cached, then revoked:
        fake_hubspot.revoke_portal(PORTAL, access_tokens=True)  # the next send gets a 401
        payloads = [action_payload(portal_id=PORTAL) for _ in range(20)]
        for p in payloads:
            assert (await daemon.post_action(p))[0] == 200
        with psycopg.connect(db_url) as conn:

            def rows() -> list[tuple[str, int, int, str]]:
                return conn.execute(
                    "SELECT state, attempts, failures, coalesce(last_error, '') FROM actions"
                ).fetchall()

            await wait_for(lambda: all(e.startswith("waiting") for *_, e in rows()))
            assert {(s, a, f) for s, a, f, _ in rows()} <= {("pending", 0, 0), ("claimed", 0, 0)}
        await daemon.connect_portal(fake_hubspot, PORTAL)
        await wait_for(lambda: all(p["callbackId"] in fake_hubspot.completed for p in payloads))


async def test_a_token_shorter_lived_than_the_margin_is_not_refreshed_at_every_call(db_url):
    async with FakeHubSpot(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, token_ttl_s=120
    ) as fake:
        fake.register_portal(PORTAL, "rt-1")
        cfg_clock = Clock()
        async with token_store(db_url, fake, "v3", cfg_clock) as tokens:
            await tokens.connect(PORTAL, "rt-1")
            first = await tokens.access_token(PORTAL)  # margin 300 s > the 120 s lifetime
            for _ in range(5):
                assert await tokens.access_token(PORTAL) == first
            assert len(refresh_requests(fake)) == 1
            cfg_clock.now += 61  # past half its life: refreshed
            assert await tokens.access_token(PORTAL) != first
            assert len(refresh_requests(fake)) == 2


async def test_a_portal_connected_or_disconnected_elsewhere_is_taken_up_at_once(
    daemon_factory, fake_hubspot, db_url
):
    """The CLI (another process) connects a portal: the daemon's waiting actions go at once,
    not at its recheck (sender.disconnected_retry_s, 300 s here); it disconnects it: the
    daemon stops using the token it holds at once."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    sections = {"sender": {"disconnected_retry_s": 300.0}, "security": {"encryption_key": key}}
    async with (
        daemon_factory(**sections) as daemon,
        token_store(db_url, fake_hubspot, "v3", key=key) as elsewhere,
    ):
        fake_hubspot.register_portal(PORTAL, "rt-1")
        first = action_payload(portal_id=PORTAL)
        assert (await daemon.post_action(first))[0] == 200  # never connected: it waits
        with psycopg.connect(db_url, autocommit=True) as conn:

            def waiting(callback_id: str) -> bool:
                row = conn.execute(
                    "SELECT state, last_error FROM actions WHERE callback_id = %s", (callback_id,)
                ).fetchone()
                return (
                    row is not None and row[0] == "pending" and (row[1] or "").startswith("waiting")
                )

            await wait_for(lambda: waiting(first["callbackId"]))
            await elsewhere.connect(PORTAL, "rt-1")
            await wait_for(lambda: first["callbackId"] in fake_hubspot.completed)
            applied = daemon.runtime.watcher.applied
            await elsewhere.disconnect(PORTAL, "by the CLI", revoke=False)
            await wait_for(lambda: daemon.runtime.watcher.applied > applied)
            second = action_payload(portal_id=PORTAL)
            assert (await daemon.post_action(second))[0] == 200
            await wait_for(lambda: waiting(second["callbackId"]))
            assert second["callbackId"] not in fake_hubspot.completed
