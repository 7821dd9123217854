"""Fault 8: slow and stuck client connections (slowloris-style; bounded in count and time,
loopback only) do not stop other requests from being served, and a stuck body is cut off
after server.body_timeout_s."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.conftest import action_payload
from tests.daemon_process import post_signed
from tests.faults.conftest import Daemons, connect, scale, tries
from throttled.hubspot.fake import FakeHubSpot

PORTAL = 62515
BODY_TIMEOUT_S = 2.0
ANSWER_WITHIN_S = 10.0  # generous: it only tells "served" from "stuck behind the others"

HEAD = (
    "POST /api/hubspot/action HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    "Content-Type: application/json\r\nContent-Length: 4000\r\n"
)


async def trickle(host: str, port: int, until: float) -> None:
    """Send a request's headers a byte at a time, slowly, until `until`."""
    with contextlib.suppress(OSError):
        _, writer = await asyncio.open_connection(host, port)
        try:
            for ch in (HEAD * 50).encode():
                if time.monotonic() > until:
                    break
                writer.write(bytes([ch]))
                await writer.drain()
                await asyncio.sleep(0.2)
        finally:
            writer.close()


async def stuck_body(host: str, port: int, until: float) -> bool:
    """Send whole headers and a few bytes of the body, then nothing: whether the server
    closed the connection before `until`."""
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    try:
        writer.write((HEAD + "\r\n").encode() + b'{"callbackId": ')
        await writer.drain()
        await asyncio.wait_for(reader.read(1), max(0.1, until - time.monotonic()))
        return True  # an answer (408), or the close
    except TimeoutError:
        return False
    except OSError:
        return True  # reset by the server
    finally:
        writer.close()


async def silent(host: str, port: int, until: float) -> None:
    """Connect and say nothing until `until`."""
    with contextlib.suppress(OSError):
        _, writer = await asyncio.open_connection(host, port)
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        writer.close()


@pytest.mark.timeout(scale(120, 300))
async def test_slow_and_stuck_clients_do_not_stop_other_requests(
    daemons: Daemons, fake_hubspot: FakeHubSpot, record: Any
) -> None:
    per_kind = tries(60, 300)
    hold_s = scale(6.0, 30.0)
    daemon = daemons(server={"body_timeout_s": BODY_TIMEOUT_S})
    await connect(daemon, fake_hubspot, PORTAL)
    await daemon.start()
    url = urlsplit(daemon.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    until = time.monotonic() + hold_s
    slow = [asyncio.create_task(trickle(host, port, until)) for _ in range(per_kind)]
    slow += [asyncio.create_task(silent(host, port, until)) for _ in range(per_kind)]
    stuck = [asyncio.create_task(stuck_body(host, port, until)) for _ in range(per_kind)]
    await asyncio.sleep(1.0)  # all of them open

    answered: list[float] = []
    statuses: list[int | None] = []
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until - 1.0:
            started = time.monotonic()
            outcome = await asyncio.wait_for(
                post_signed(session, daemon.url, action_payload(portal_id=PORTAL)),
                ANSWER_WITHIN_S,
            )
            statuses.append(outcome.status)
            answered.append(time.monotonic() - started)
            async with session.get(daemon.url + "/healthz") as resp:
                statuses.append(resp.status)
    cut_off = await asyncio.gather(*stuck)
    await asyncio.gather(*slow)
    record.update(
        fault="slow and stuck clients",
        slow_connections=2 * per_kind,
        stuck_bodies=per_kind,
        stuck_bodies_cut_off=sum(cut_off),
        requests_served=len(statuses),
        worst_answer_s=round(max(answered), 3),
    )
    assert statuses, record
    assert set(statuses) == {200}, statuses
    assert all(cut_off), record  # each stuck body was ended by the server, not by us
    assert daemon.running
