"""The OAuth client against a token server that answers slowly, in pieces, or too much."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from throttled.hubspot.client import TokenError
from throttled.hubspot.oauth import OAuth

GRANT = {
    "access_token": "at-" + "x" * 290,  # HubSpot says to allow 300 characters
    "refresh_token": "rt-1",
    "expires_in": 1800,
    "hub_id": 62515,
    "scopes": ["automation", "oauth"],
}


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, dict[str, object]]]:
    """A token endpoint whose answer the test shapes: pieces, gaps between them, padding."""
    shape: dict[str, object] = {"pieces": 1, "gap_s": 0.0, "pad": 0, "chunked": True}

    async def token(request: web.Request) -> web.StreamResponse:
        body = json.dumps({**GRANT, "padding": "p" * int(shape["pad"])}).encode()  # type: ignore[call-overload]
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if not shape["chunked"]:
            response.content_length = len(body)
        await response.prepare(request)
        pieces = int(shape["pieces"])  # type: ignore[call-overload]
        step = -(-len(body) // pieces)
        for i in range(0, len(body), step):
            await response.write(body[i : i + step])
            await asyncio.sleep(float(shape["gap_s"]))  # type: ignore[arg-type]
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/oauth/v3/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", shape
    finally:
        await runner.cleanup()


def client(session: aiohttp.ClientSession, base: str) -> OAuth:
    return OAuth(
        session,
        api_base_url=base,
        client_id="c",
        client_secret="s",
        timeout_s=5.0,
        version="v3",
        paths={"token": "/oauth/v3/token", "token_info": "/x", "revoke": "/y"},
    )


@pytest.mark.parametrize(
    ("pieces", "gap_s", "chunked"), [(1, 0, False), (3, 0.05, True), (40, 0.005, False)]
)
async def test_an_answer_that_arrives_in_pieces_is_read_whole(server, pieces, gap_s, chunked):
    base, shape = server
    shape.update(pieces=pieces, gap_s=gap_s, chunked=chunked)
    async with aiohttp.ClientSession() as session:
        grant = await client(session, base).refresh("rt-1")
        exchanged = await client(session, base).exchange_code("code", "https://x.test/cb")
    assert grant.access_token == GRANT["access_token"]
    assert exchanged.hub_id == 62515
    assert exchanged.scopes == ("automation", "oauth")


@pytest.mark.parametrize("chunked", [True, False])
async def test_an_answer_beyond_a_mebibyte_is_refused_not_read(server, chunked):
    base, shape = server
    shape.update(pad=2 << 20, pieces=8, chunked=chunked)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TokenError, match="unexpected body"):
            await client(session, base).refresh("rt-1")
