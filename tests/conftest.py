"""Shared fixtures: a real PostgreSQL (a migrated template copied per test), a fake HubSpot
on loopback, and a running daemon wired to both."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import psycopg
import pytest

from throttled import config as config_module
from throttled.config import Config
from throttled.daemon import Runtime, serve
from throttled.db import migrate
from throttled.db.embedded import start_blocking, stop_blocking
from throttled.hubspot.fake import FakeHubSpot
from throttled.hubspot.signature import sign_headers

CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret-" + secrets.token_hex(8)


def with_database(url: str, name: str) -> str:
    """The same server URL with another database name."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """THROTTLED_TEST_DATABASE_URL, or an embedded PostgreSQL for the session (stopped after)."""
    url = os.environ.get("THROTTLED_TEST_DATABASE_URL")
    if url:
        yield url
        return
    root = Path(os.environ.get("THROTTLED_TEST_EMBEDDED_DIR", "/tmp/throttled-test-pg"))
    server, embedded = start_blocking(str(root))
    yield embedded
    stop_blocking(server)


@pytest.fixture(scope="session")
def template_db(pg_server_url: str) -> Iterator[str]:
    """A migrated database that every test copies."""
    name = f"throttled_tpl_{os.getpid()}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    migrate.apply(with_database(pg_server_url, name))
    yield name
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_server_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"throttled_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def serving_fake(**options: Any) -> AsyncIterator[FakeHubSpot]:
    """A fake HubSpot on loopback that knows this suite's app; `options` go to FakeHubSpot."""
    fake = FakeHubSpot(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **options)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def fake_hubspot() -> AsyncIterator[FakeHubSpot]:
    """A fake HubSpot on loopback."""
    async with serving_fake() as fake:
        yield fake


PORTAL_BUDGET = 4  # requests per portal per second that budgeted_hubspot answers (then 429)


@pytest.fixture
async def budgeted_hubspot() -> AsyncIterator[FakeHubSpot]:
    """A fake HubSpot on loopback that answers 429 to a portal's requests past PORTAL_BUDGET
    a second, as HubSpot does past a portal's API budget (tests/test_instances*.py)."""
    async with serving_fake(portal_budget=(PORTAL_BUDGET, 1)) as fake:
        yield fake


def config_mapping(
    db_url: str, api_base_url: str, **sections: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The test configuration as TOML-shaped sections; `sections` override keys."""
    raw: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout_s": 15.0},
        "database": {"url": db_url, "pool_min": 2, "pool_max": 8},
        "hubspot": {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "api_base_url": api_base_url,
            "request_timeout_s": 5.0,
        },
        "security": {"encryption_key": base64.b64encode(secrets.token_bytes(32)).decode()},
        "sender": {"backoff_base_s": 0.2, "backoff_max_s": 1.0},
        "logging": {"level": "warning", "format": "console"},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def make_config(db_url: str, api_base_url: str, **sections: dict[str, Any]) -> Config:
    """A validated test Config; `sections` override keys per section."""
    raw = config_mapping(db_url, api_base_url, **sections)
    cfg = config_module.from_mapping(raw, source="(test)")
    config_module.validate(cfg)
    return cfg


class Daemon:
    """A daemon running in this event loop, with helpers to talk to it."""

    def __init__(self, runtime: Runtime, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        self.runtime = runtime
        self.stop_event = stop
        self.task = task
        self.session = aiohttp.ClientSession()

    @property
    def url(self) -> str:
        return self.runtime.url

    async def post_action(
        self, payload: dict[str, Any] | bytes, *, secret: str = CLIENT_SECRET, **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        """POST a signed action; return (status, JSON body)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        url = self.url + "/api/hubspot/action"
        headers = {"Content-Type": "application/json"}
        headers.update(sign_headers(secret, "POST", url, body, version=kw.pop("version", "v2")))
        headers.update(kw.pop("headers", {}))
        async with self.session.post(url, data=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def connect_portal(self, fake: FakeHubSpot, portal_id: int) -> None:
        """Give the daemon a refresh token the fake knows."""
        token = f"refresh-{portal_id}-{secrets.token_hex(4)}"
        fake.register_portal(portal_id, token)
        await self.runtime.dispatcher.tokens.connect(portal_id, token)

    async def stop(self) -> None:
        self.stop_event.set()
        try:
            await asyncio.wait_for(self.task, 30)
        finally:
            await self.session.close()


@contextlib.asynccontextmanager
async def running(cfg: Config, **kw: Any) -> AsyncIterator[Daemon]:
    """Start `serve()` and wait until it is ready."""
    stop = asyncio.Event()
    ready: asyncio.Future[Runtime] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, on_ready=ready.set_result, **kw))
    done, _ = await asyncio.wait([ready, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    daemon = Daemon(ready.result(), stop, task)
    try:
        yield daemon
    finally:
        if not daemon.task.done():
            await daemon.stop()
        else:
            await daemon.session.close()


@pytest.fixture
def daemon_factory(
    db_url: str, fake_hubspot: FakeHubSpot
) -> Callable[..., contextlib.AbstractAsyncContextManager[Daemon]]:
    """running(make_config(...)) with this test's database and fake HubSpot; `clock` (a
    ManualClock, say) is the daemon's injected clock."""

    def factory(
        *, clock: Callable[[], float] | None = None, **sections: dict[str, Any]
    ) -> contextlib.AbstractAsyncContextManager[Daemon]:
        cfg = make_config(db_url, fake_hubspot.base_url, **sections)
        return running(cfg) if clock is None else running(cfg, clock=clock)

    return factory


_counter = iter(range(1, 10**9))


def action_payload(
    *,
    portal_id: int = 62515,
    workflow_id: int = 55555,
    action_id: int = 1234567,
    callback_id: str | None = None,
    input_fields: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """A realistic custom-action request body."""
    n = next(_counter)
    return {
        "callbackId": callback_id or f"ap-{portal_id}-{uuid.uuid4().int % 10**9}-{n}-0",
        "origin": {
            "portalId": portal_id,
            "actionDefinitionId": action_id,
            "actionDefinitionVersion": 1,
            "actionExecutionIndexIdentifier": {"enrollmentId": n, "actionExecutionIndex": index},
        },
        "context": {"source": "WORKFLOWS", "workflowId": workflow_id},
        "object": {"objectId": n, "objectType": "CONTACT"},
        "inputFields": input_fields if input_fields is not None else {},
    }


async def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll a condition (generous timeout: it only catches hangs)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within timeout")
        await asyncio.sleep(0.02)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    """Poll an async condition (a database query, say); the timeout only catches hangs."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within timeout")
        await asyncio.sleep(0.02)


class ManualClock:
    """A wall clock (epoch seconds) that stands still until the test moves it.

    Given to serve(clock=...) (and to the fake HubSpot, for its timestamps), it decides when
    the daemon's limiters, budgets and start times open: nothing that waits for an instant
    goes before the test has advanced the clock past it, however slow the machine. (The
    loops still sleep on real timers, computed from this clock: after an advance they notice
    within their own delay, at most a slot or two.) A send is charged the send margin past
    its instant, which a standing clock never reaches: a queue that must send twice at one
    instant needs sender.send_margin_ms = 0. The database keeps its own clock: retry
    backoffs (not_before <= now()) and block expiry do not follow this one."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (never back)."""
        assert seconds >= 0, seconds
        self.now += seconds

    def advance_to(self, instant: float) -> None:
        """Move the clock to `instant`, if that is later."""
        self.now = max(self.now, instant)
