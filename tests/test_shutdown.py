"""Shutdown honours `server.shutdown_timeout_s`, and a request body that stops arriving is
answered 408 after `server.body_timeout_s` instead of holding its handler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import action_payload, wait_for
from tests.daemon_process import DaemonProcess, started_daemon
from throttled.hubspot.fake import FakeHubSpot

SHUTDOWN_TIMEOUT_S = 3.0
SLACK_S = 5.0  # generous: it only catches aiohttp's 60 s default or a hang


def _count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM actions").fetchone()
    assert row is not None
    return int(row[0])


@contextlib.asynccontextmanager
async def _half_sent(port: int) -> AsyncIterator[asyncio.StreamReader]:
    """A connection that sent the headers and 1 byte of a 100-byte body, and no more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /api/hubspot/action HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        await writer.drain()
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _response(
    reader: asyncio.StreamReader, timeout: float
) -> tuple[int, dict[str, str], Any]:
    """Status, headers (lower-case names) and JSON body of the next response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body)


@pytest.fixture
async def daemon(
    tmp_path: Path, db_url: str, fake_hubspot: FakeHubSpot
) -> AsyncIterator[DaemonProcess]:
    assert fake_hubspot.base_url is not None
    async with started_daemon(
        tmp_path,
        db_url=db_url,
        api_base_url=fake_hubspot.base_url,
        server={"shutdown_timeout_s": SHUTDOWN_TIMEOUT_S, "body_timeout_s": 60.0},
    ) as proc:
        yield proc


async def test_sigterm_with_a_half_sent_request_exits_within_the_shutdown_timeout(daemon):
    port = int(daemon.url.rsplit(":", 1)[1])
    async with _half_sent(port) as reader:
        await asyncio.sleep(0.2)  # its handler is now waiting for the rest of the body
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert await daemon.wait(SHUTDOWN_TIMEOUT_S + SLACK_S) == 0
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT_S + SLACK_S
        await asyncio.wait_for(reader.read(), SLACK_S)  # the connection is closed
    assert "shutdown_complete" in [e["event"] for e in daemon.events()]


async def test_stop_with_a_half_sent_request_ends_serve_in_time(daemon_factory):
    server = {"shutdown_timeout_s": 1.0, "body_timeout_s": 60.0}
    async with daemon_factory(server=server) as d, _half_sent(d.runtime.port) as reader:
        await asyncio.sleep(0.2)
        started = time.monotonic()
        d.stop_event.set()
        await asyncio.wait_for(asyncio.shield(d.task), 1.0 + SLACK_S)
        assert time.monotonic() - started < 1.0 + SLACK_S
        await asyncio.wait_for(reader.read(), SLACK_S)  # the connection is closed


async def test_stop_with_a_send_stuck_at_hubspot_ends_serve_in_time(daemon_factory, fake_hubspot):
    sections = {
        "server": {"shutdown_timeout_s": 1.0},
        "hubspot": {"request_timeout_s": 60.0},
        "defaults": {"max_throughput": 100, "time_unit": "seconds"},
    }
    async with daemon_factory(**sections) as d:
        await d.connect_portal(fake_hubspot, 62515)
        fake_hubspot.delay_s = 60.0  # the completion request hangs
        status, _ = await d.post_action(action_payload())
        assert status == 200
        await wait_for(lambda: len(fake_hubspot.received) >= 1)  # the send is at HubSpot
        started = time.monotonic()
        d.stop_event.set()
        await asyncio.wait_for(asyncio.shield(d.task), 1.0 + SLACK_S)
        assert time.monotonic() - started < 1.0 + SLACK_S
        fake_hubspot.delay_s = 0.0


async def test_a_stalled_body_gets_408_while_other_requests_are_served(daemon_factory, db_url):
    async with daemon_factory(server={"body_timeout_s": 0.5}) as d:
        started = time.monotonic()
        async with _half_sent(d.runtime.port) as reader:
            status, _ = await d.post_action(action_payload())  # served meanwhile
            assert status == 200
            status, headers, body = await _response(reader, SLACK_S)
        assert (status, body["error"]) == (408, "body_timeout")
        assert "0.5 s" in body["message"]
        assert headers["connection"] == "close"
        assert time.monotonic() - started < SLACK_S
        assert _count(db_url) == 1
