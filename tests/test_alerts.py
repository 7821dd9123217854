"""Alerts: conditions from portal health and queue deadlines, one alert when a condition
starts and one when it clears, delivered to a real webhook receiver on loopback with retries,
a timeout, and the URL (a secret) never logged."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web

from tests.conftest import action_payload, make_config, wait_for
from throttled.alerts import HealthMonitor, Webhook
from throttled.alerts.conditions import MIN_REQUESTS
from throttled.crypto import KeyRing
from throttled.daemon import make_tokens
from throttled.db.repository import Repository
from throttled.health import UNHEALTHY_RUN, Health
from throttled.housekeeping import deadlines
from throttled.hubspot.client import TokenError
from throttled.hubspot.fake import FakeHubSpot
from throttled.queues import QueueState
from throttled.tokens import PortalNotConnected, Tokens

PORTAL = 62515
SECRET_PATH = "/services/T0000/B0000/" + "Zx9" * 8  # (what a Slack webhook's path looks like)


class Receiver:
    """A webhook receiver: answers each POST with the next planned status (200 when none is
    left), or hangs while `hang` is set."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.attempts: list[float] = []
        self.statuses: list[int] = []
        self.hang = False
        self.released = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(time.monotonic())
        body = await request.json()
        if self.hang:  # (the client has given up by the time it is released)
            await self.released.wait()
            return web.Response(status=504)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.bodies.append(body)
        return web.Response(status=status, text="ok" if status == 200 else "no")


@pytest.fixture
async def receiver(aiohttp_server: Any) -> AsyncIterator[tuple[Receiver, str]]:
    """A receiver on loopback and its (secret-looking) URL."""
    rec = Receiver()
    app = web.Application()
    app.router.add_post(SECRET_PATH, rec.handle)
    server = await aiohttp_server(app)
    try:
        yield rec, str(server.make_url(SECRET_PATH)) + "?token=qs3cret"
    finally:
        rec.released.set()


@contextlib.asynccontextmanager
async def delivering(webhook: Webhook) -> AsyncIterator[Webhook]:
    """The webhook's delivery task, for the life of the block."""
    stop = asyncio.Event()
    task = asyncio.create_task(webhook.run(stop))
    try:
        yield webhook
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


class Queues:
    """What the monitor reads of the scheduler."""

    def __init__(self) -> None:
        self.at_risk: set[int] = set()
        self.queues: dict[int, QueueState] = {}


def monitor_for(webhook: Webhook, health: Health | None = None, queues: Any = None) -> Any:
    return HealthMonitor(
        health=health or Health(),
        queues=queues or Queues(),
        webhook=webhook,
        error_rate_threshold=0.05,
    )


def fail(health: Health, n: int, portal_id: int = PORTAL) -> None:
    for _ in range(n):
        health.result(portal_id, 503, 0.01)


def alerts_of(sent: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["alert"], a["status"]) for a in sent]


# -- start / clear --------------------------------------------------------------------------


async def test_one_alert_when_a_condition_starts_and_one_when_it_clears(receiver):
    rec, url = receiver
    async with delivering(Webhook(url, timeout_s=5, max_attempts=3)) as webhook:
        health = Health()
        monitor = monitor_for(webhook, health)
        assert monitor.check() == []
        fail(health, UNHEALTHY_RUN)
        assert alerts_of(monitor.check()) == [("portal_unhealthy", "firing")]
        fail(health, 3)
        assert monitor.check() == []  # still on: nothing more
        assert monitor.check() == []
        health.connected(PORTAL)  # (reconnected: its past no longer counts)
        assert alerts_of(monitor.check()) == [("portal_unhealthy", "resolved")]
        assert monitor.check() == []
        await wait_for(lambda: len(rec.bodies) == 2)
    firing, resolved = rec.bodies
    assert firing["status"] == "firing"
    assert firing["subject"] == {"portal_id": PORTAL}
    assert firing["text"].startswith("[throttled] portal 62515 is unhealthy")  # (Slack's field)
    assert firing["details"]["consecutive_failures"] == UNHEALTHY_RUN
    assert datetime.fromisoformat(firing["at"]).tzinfo is not None
    assert resolved["status"] == "resolved"
    assert resolved["subject"] == firing["subject"]
    assert resolved["details"]["consecutive_failures"] == UNHEALTHY_RUN + 3  # (the last seen)
    assert "firing_s" in resolved["details"]
    assert set(firing) == {"text", "alert", "status", "subject", "at", "details"}


async def test_without_a_url_alerts_are_only_logged():
    webhook = Webhook("", timeout_s=1, max_attempts=1)
    health = Health()
    health.disconnected(PORTAL, "uninstalled")
    with structlog.testing.capture_logs() as events:
        async with delivering(webhook):
            assert alerts_of(monitor_for(webhook, health).check()) == [
                ("portal_disconnected", "firing")
            ]
    assert webhook.queued == 0
    assert [e["event"] for e in events] == ["alert_firing"]


# -- delivery -------------------------------------------------------------------------------


async def test_delivery_is_retried_with_backoff_after_a_500(receiver):
    rec, url = receiver
    rec.statuses = [500, 503]
    webhook = Webhook(url, timeout_s=5, max_attempts=5, backoff_base_s=0.1, backoff_max_s=1.0)
    async with delivering(webhook):
        webhook.send({"alert": "x", "status": "firing", "text": "x"})
        await wait_for(lambda: len(rec.bodies) == 1)
    assert len(rec.attempts) == 3
    first, second = (b - a for a, b in zip(rec.attempts, rec.attempts[1:], strict=False))
    assert first >= 0.05  # (base 0.1, jittered down to half at most) ...
    assert second >= 0.1  # ... then doubled
    assert (webhook.sent, webhook.failed) == (1, 0)


async def test_delivery_gives_up_after_max_attempts_and_at_once_on_a_4xx(receiver):
    rec, url = receiver
    rec.statuses = [500] * 3 + [404]
    webhook = Webhook(url, timeout_s=5, max_attempts=3, backoff_base_s=0.01)
    with structlog.testing.capture_logs() as events:
        async with delivering(webhook):
            webhook.send({"alert": "a", "status": "firing"})
            webhook.send({"alert": "b", "status": "firing"})
            await wait_for(lambda: webhook.failed == 2)
    assert len(rec.attempts) == 4  # three tries for a, one for b (404: no use retrying)
    gave_up = [(e["alert"], e["attempts"], e["error"]) for e in events if e["log_level"] == "error"]
    assert gave_up == [("a", 3, "HTTP 500"), ("b", 1, "HTTP 404")]


async def test_a_receiver_that_hangs_does_not_block_the_loop(receiver):
    rec, url = receiver
    rec.hang = True
    webhook = Webhook(url, timeout_s=0.3, max_attempts=2, backoff_base_s=0.01)
    health = Health()
    monitor = monitor_for(webhook, health)
    lags: list[float] = []

    async def tick() -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.01)
            lags.append(time.monotonic() - started - 0.01)

    ticker = asyncio.create_task(tick())
    try:
        with structlog.testing.capture_logs() as events:
            async with delivering(webhook):
                health.disconnected(PORTAL, "uninstalled")
                started = time.monotonic()
                assert len(monitor.check()) == 1  # (queued: returns at once)
                assert time.monotonic() - started < 0.05
                await wait_for(lambda: webhook.failed == 1)
                assert len(rec.attempts) == 2  # each attempt ended by the timeout
                rec.hang = False
                rec.released.set()
                health.connected(PORTAL)
                monitor.check()
                await wait_for(lambda: webhook.sent == 1)
    finally:
        ticker.cancel()
    assert max(lags) < 0.1
    [gave_up] = [e for e in events if e["event"] == "alert_delivery_failed"]
    assert gave_up["error"] == "no answer within 0.3 s"
    assert [b["status"] for b in rec.bodies] == ["resolved"]


async def test_a_shutdown_does_not_wait_for_a_hanging_receiver(receiver):
    rec, url = receiver
    rec.hang = True
    webhook = Webhook(url, timeout_s=30, max_attempts=5)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as events:
        task = asyncio.create_task(webhook.run(stop))
        webhook.send({"alert": "a", "status": "firing"})
        await wait_for(lambda: len(rec.attempts) == 1)
        stop.set()
        started = time.monotonic()
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 1.0
    assert [(e["event"], e["count"]) for e in events] == [("alerts_not_sent", 1)]


async def test_a_full_queue_drops_new_alerts_counted_in_one_log_line():
    webhook = Webhook("http://127.0.0.1:9/x", timeout_s=1, max_attempts=1, max_queued=2)
    with structlog.testing.capture_logs() as events:
        for name in ("a", "b", "c", "d", "e"):
            webhook.send({"alert": name, "status": "firing"})
        webhook.flush_drops()
        webhook.flush_drops()  # (nothing new: no second line)
    assert (webhook.queued, webhook.dropped) == (2, 3)
    assert [(e["event"], e["count"]) for e in events] == [("alerts_dropped", 3)]


async def test_the_webhook_url_never_appears_in_logs(receiver, unused_tcp_port):
    rec, url = receiver
    rec.statuses = [500, 404]
    refused = f"http://127.0.0.1:{unused_tcp_port}{SECRET_PATH}?token=qs3cret"
    with structlog.testing.capture_logs() as events:
        for target in (url, refused):
            webhook = Webhook(target, timeout_s=1, max_attempts=2, backoff_base_s=0.01)
            async with delivering(webhook):
                monitor = monitor_for(webhook)
                monitor._health.disconnected(PORTAL, "uninstalled")
                monitor.check()
                await wait_for(lambda w=webhook: w.failed == 1)
    text = repr(events)
    assert "alert_delivery_failed" in text
    assert "ClientConnectorError" in text or "Connect" in text  # (the refused one's reason)
    for secret in (SECRET_PATH, "Zx9Zx9", "qs3cret"):
        assert secret not in text
    assert webhook.where == "http://127.0.0.1/…"


# -- conditions -----------------------------------------------------------------------------


async def test_error_rate_past_the_threshold_alerts_and_clears():
    webhook = Webhook("", timeout_s=1, max_attempts=1)
    health = Health()
    monitor = monitor_for(webhook, health)
    health.result(PORTAL, 200, 0.01)
    fail(health, 1)
    assert monitor.check() == []  # 1 of 2 failed: too few requests to say
    for i in range(MIN_REQUESTS):
        health.result(PORTAL, 503 if i == 10 else 200, 0.01)
    assert alerts_of(monitor.check()) == [("error_rate", "firing")]  # 2 of 22: 9 %
    [(condition, _)] = monitor.firing.values()
    assert condition.details["threshold"] == 0.05
    for _ in range(30):
        health.result(PORTAL, 200, 0.01)
    assert alerts_of(monitor.check()) == [("error_rate", "resolved")]  # 2 of 52: under 5 %


@contextlib.asynccontextmanager
async def token_store(db_url: str, fake: FakeHubSpot) -> AsyncIterator[Tokens]:
    """A Tokens over its own pool and session, against the fake HubSpot."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    cfg = make_config(db_url, fake.base_url, security={"encryption_key": key})
    async with (
        Repository.open(db_url, min_size=1, max_size=4) as repo,
        aiohttp.ClientSession() as session,
    ):
        yield make_tokens(cfg, repo, session, KeyRing.from_texts(key), fake.base_url)


async def test_a_failed_token_refresh_alerts_and_clears_when_one_succeeds(db_url, fake_hubspot):
    fake_hubspot.register_portal(PORTAL, "rt-1")
    async with token_store(db_url, fake_hubspot) as tokens:
        await tokens.connect(PORTAL, "rt-1")
        monitor = monitor_for(Webhook("", timeout_s=1, max_attempts=1), tokens.health)
        fake_hubspot.fail_token_next(500)
        with pytest.raises(TokenError):
            await tokens.access_token(PORTAL)
        [alert] = monitor.check()
        assert (alert["alert"], alert["status"]) == ("token_refresh_failed", "firing")
        assert alert["details"]["failures"] == 1
        await tokens.access_token(PORTAL)
        assert alerts_of(monitor.check()) == [("token_refresh_failed", "resolved")]


async def test_a_disconnected_portal_alerts_as_disconnected_only(db_url, fake_hubspot):
    fake_hubspot.register_portal(PORTAL, "rt-1")
    async with token_store(db_url, fake_hubspot) as tokens:
        await tokens.connect(PORTAL, "rt-1")
        monitor = monitor_for(Webhook("", timeout_s=1, max_attempts=1), tokens.health)
        fake_hubspot.revoke_portal(PORTAL)  # uninstalled: the refresh is refused
        with pytest.raises(PortalNotConnected):
            await tokens.access_token(PORTAL)
        [alert] = monitor.check()  # (not also token_refresh_failed or portal_unhealthy)
        assert (alert["alert"], alert["subject"]) == ("portal_disconnected", {"portal_id": PORTAL})
        assert "refused the refresh token" in alert["details"]["reason"]
        fake_hubspot.register_portal(PORTAL, "rt-2")
        await tokens.connect(PORTAL, "rt-2")
        assert alerts_of(monitor.check()) == [("portal_disconnected", "resolved")]


async def test_a_queue_at_risk_alerts_once_and_clears(daemon_factory):
    async with daemon_factory(hubspot={"block_expiration": "PT10M"}) as daemon:
        slow = {"maxThroughput": "1", "timeUnit": "hours", "queueName": "slow"}
        for _ in range(3):
            assert (await daemon.post_action(action_payload(input_fields=slow)))[0] == 200
        scheduler = daemon.runtime.scheduler
        await wait_for(lambda: len(scheduler.queues) == 1)
        monitor = monitor_for(Webhook("", timeout_s=1, max_attempts=1), queues=scheduler)
        await deadlines.run_once(daemon.runtime)
        [alert] = monitor.check()
        assert (alert["alert"], alert["status"]) == ("queue_at_risk", "firing")
        assert alert["subject"]["queue"] == "queue:62515:named:slow"
        await deadlines.run_once(daemon.runtime)
        assert monitor.check() == []
        scheduler.at_risk = set()  # (as the next deadline check finds it drained)
        assert alerts_of(monitor.check()) == [("queue_at_risk", "resolved")]


async def test_the_daemon_checks_health_and_posts_alerts(receiver, daemon_factory):
    rec, url = receiver
    alerts = {"webhook_url": url, "check_interval_s": 1.0, "timeout_s": 2.0}
    with structlog.testing.capture_logs() as events:
        async with daemon_factory(alerts=alerts) as daemon:
            health: Health = daemon.runtime.dispatcher.tokens.health
            health.disconnected(PORTAL, "uninstalled")
            await wait_for(lambda: len(rec.bodies) == 1)
            health.connected(PORTAL)
            await wait_for(lambda: len(rec.bodies) == 2)
    assert [(b["alert"], b["status"]) for b in rec.bodies] == [
        ("portal_disconnected", "firing"),
        ("portal_disconnected", "resolved"),
    ]
    assert "qs3cret" not in repr(events)
    assert SECRET_PATH not in repr(events)
