"""The fault proxy of the fault suite (tests/fault_proxy.py), against an echo server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.fault_proxy import FaultProxy, fault_proxy


@contextlib.asynccontextmanager
async def echo_behind_proxy() -> AsyncIterator[FaultProxy]:
    """An echo server on loopback, and a fault proxy in front of it."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        async with fault_proxy("127.0.0.1", server.sockets[0].getsockname()[1]) as proxy:
            yield proxy
    finally:
        server.close()
        await server.wait_closed()


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def echoed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def read_until_broken(reader: asyncio.StreamReader) -> bytes:
    """What arrives until the connection ends (EOF or reset)."""
    got = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(1 << 16), 5):
            got += chunk
    return got


async def test_without_a_fault_it_relays_both_ways():
    async with echo_behind_proxy() as proxy:
        reader, writer = await connect(proxy)
        assert await echoed(reader, writer, b"hello") == b"hello"
        assert await echoed(reader, writer, b"x" * 200_000) == b"x" * 200_000
        writer.close()
        assert proxy.accepted == 1


async def test_latency_holds_every_chunk():
    async with echo_behind_proxy() as proxy:
        reader, writer = await connect(proxy)
        proxy.latency(0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await echoed(reader, writer, b"ping") == b"ping"
        # (held once on the way there and once on the way back)
        assert loop.time() - started >= 0.4 - 0.02
        writer.close()


async def test_a_blackhole_keeps_connections_and_answers_nothing_until_healed():
    async with echo_behind_proxy() as proxy:
        reader, writer = await connect(proxy)
        proxy.blackhole()
        assert not proxy.up
        writer.write(b"lost")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.3)
        assert not reader.at_eof()  # (held open, not closed)
        late_reader, late_writer = await connect(proxy)  # a new one is accepted, and held too
        late_writer.write(b"lost too")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(late_reader.read(10), 0.3)
        proxy.heal()
        assert await echoed(reader, writer, b"back") == b"back"  # (what was swallowed is gone)
        writer.close()
        late_writer.close()


async def test_a_partition_holds_what_is_sent_until_healed_then_delivers_it():
    async with echo_behind_proxy() as proxy:
        reader, writer = await connect(proxy)
        proxy.partition()
        assert not proxy.up
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.3)
        proxy.heal()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
        writer.close()


async def test_a_reset_breaks_relayed_connections_and_refuses_new_ones():
    async with echo_behind_proxy() as proxy:
        reader, writer = await connect(proxy)
        assert await echoed(reader, writer, b"a") == b"a"
        proxy.reset()
        assert await read_until_broken(reader) == b""
        assert proxy.broken >= 1
        new_reader, _ = await connect(proxy)
        assert await read_until_broken(new_reader) == b""
        assert proxy.refused == 1
        proxy.heal()
        reader, writer = await connect(proxy)
        assert await echoed(reader, writer, b"b") == b"b"
        writer.close()


async def test_cut_after_n_bytes_passes_those_and_breaks_the_connection():
    async with echo_behind_proxy() as proxy:
        proxy.cut_after(1000)
        reader, writer = await connect(proxy)
        writer.write(b"y" * 600)
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(600), 5) == b"y" * 600
        writer.write(b"z" * 600)  # 400 of these fit, then the connection breaks
        got = await read_until_broken(reader)
        assert got == b"z" * len(got)
        assert len(got) <= 400
        assert proxy.broken == 1
