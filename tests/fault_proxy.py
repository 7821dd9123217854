"""A TCP fault proxy on loopback: it relays connections to one target (PostgreSQL, the fake
HubSpot) and breaks them on command, as a network or a server does when it fails.

toxiproxy cannot be installed on these machines and `tc netem` is not available, so the fault
suite (tests/faults/) puts this between throttled and what it talks to. The faults, each
applying to the connections already relayed and to new ones:

- `latency(s)`: every chunk is held `s` seconds before it is passed on (each direction keeps
  its order);
- `partition()`: connections are accepted and kept, and what is sent on them is held until
  the fault ends, then delivered (a network partition, as TCP sees one: the peer waits for
  an answer, and gets it once the network is back if it has not given up meanwhile);
- `blackhole()`: connections are accepted and kept, and nothing is passed on either way,
  ever (a hung server, or a middlebox that drops a flow: the peer waits until its own
  timeout);
- `reset()`: every relayed connection is reset (RST), and new ones are reset on arrival (the
  server or the host is down);
- `cut_after(n)`: a connection is reset after `n` bytes have gone to the target on it (a
  request that breaks part-way through);
- `heal()`: relay normally again (connections a fault broke stay broken).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Self

CHUNK = 1 << 16


@dataclass
class _Fault:
    latency_s: float = 0.0
    blackhole: bool = False
    partition: bool = False
    reset: bool = False
    cut_after: int | None = None  # bytes to the target per connection, then reset


class FaultProxy:
    """Relays loopback connections on `port` to `host:port` (a host starting with / is the
    directory of a Unix socket, as PostgreSQL's), with the faults above."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._fault = _Fault()
        self._healed = asyncio.Event()
        self.port = 0
        self.accepted = 0  # connections that arrived
        self.refused = 0  # connections reset on arrival
        self.broken = 0  # relayed connections a fault reset

    # -- the faults -------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether connections are relayed (no reset or blackhole in force)."""
        return not (self._fault.reset or self._fault.blackhole or self._fault.partition)

    def latency(self, seconds: float) -> None:
        """Hold every chunk `seconds` before passing it on."""
        self._fault.latency_s = max(0.0, seconds)

    def blackhole(self) -> None:
        """Keep every connection and pass nothing on."""
        self._fault.blackhole = True

    def partition(self) -> None:
        """Hold everything sent until healed."""
        self._fault.partition = True
        self._healed.clear()

    def reset(self) -> None:
        """Reset every relayed connection and every new one."""
        self._fault.reset = True
        for writer in list(self._open):
            self._abort(writer)
            self.broken += 1
        self._open.clear()

    def cut_after(self, n: int) -> None:
        """Reset each connection once `n` bytes have gone to the target on it."""
        self._fault.cut_after = max(0, n)

    def heal(self) -> None:
        """No fault: relay normally (what a partition held is delivered)."""
        self._fault = _Fault()
        self._healed.set()

    # -- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Reset everything, stop listening, and wait for every relay to end."""
        self.reset()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @staticmethod
    def _abort(writer: asyncio.StreamWriter) -> None:
        """Close with a RST (SO_LINGER 0), as a peer that went away does."""
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        try:
            await self._relay(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._fault.reset:
            self.refused += 1
            self._abort(writer)
            return
        try:
            host, port = self._target
            if host.startswith("/"):
                path = f"{host}/.s.PGSQL.{port}"
                up_reader, up_writer = await asyncio.open_unix_connection(path)
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            self._abort(writer)
            return
        pair = (writer, up_writer)
        if self._fault.reset:  # reset while connecting upstream
            for w in pair:
                self._abort(w)
            return
        self._open.update(pair)
        sent = [0]  # bytes to the target on this connection
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, pair, sent), self._pipe(up_reader, writer, pair, None)
            )
        finally:
            self._open.difference_update(pair)

    async def _pipe(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        sent: list[int] | None,
    ) -> None:
        """Copy bytes one way under the faults in force; when either side ends, end both."""
        try:
            while data := await source.read(CHUNK):
                while self._fault.partition:
                    await self._healed.wait()
                fault = self._fault
                if fault.latency_s:
                    await asyncio.sleep(fault.latency_s)
                    fault = self._fault  # (it may have changed meanwhile)
                if fault.reset:
                    break
                if fault.blackhole:
                    continue  # swallowed
                if sent is not None and fault.cut_after is not None:
                    room = fault.cut_after - sent[0]
                    if room < len(data):
                        if room > 0:
                            sink.write(data[:room])
                            await sink.drain()
                        self.broken += 1
                        break
                    sent[0] += len(data)
                sink.write(data)
                await sink.drain()
        except OSError:
            pass
        finally:
            for writer in pair:
                self._abort(writer)


@contextlib.asynccontextmanager
async def fault_proxy(host: str, port: int) -> AsyncIterator[FaultProxy]:
    """A started proxy in front of `host:port` (closed after the block)."""
    async with FaultProxy(host, port) as proxy:
        yield proxy
