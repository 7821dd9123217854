"""A TCP proxy on loopback in front of PostgreSQL, which a test cuts to make the database
unreachable for whoever connects through it (and only for them), then restores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class PgProxy:
    """Relays connections to `host:port`. Cut: every relayed connection is closed, and new ones
    are closed as soon as they are accepted, as when the server or the network is down."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)  # a host starting with / is a Unix socket directory
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.up = True
        self.refused = 0  # connections closed on arrival while cut
        self.port = 0

    def url_for(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Close every relayed connection and refuse new ones."""
        self.up = False
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    def restore(self) -> None:
        """Relay new connections again."""
        self.up = True

    async def close(self) -> None:
        """Cut, stop listening, and wait for every relay to end."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._relay_connection(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _relay_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if not self.up:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            host, port = self._target
            if host.startswith("/"):  # (the embedded PostgreSQL listens on a Unix socket)
                path = f"{host}/.s.PGSQL.{port}"
                up_reader, up_writer = await asyncio.open_unix_connection(path)
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        if not self.up:  # cut while connecting upstream
            for w in pair:
                w.transport.abort()
            return
        self._open.update(pair)
        await asyncio.gather(_pipe(reader, up_writer, pair), _pipe(up_reader, writer, pair))
        self._open.difference_update(pair)


async def _pipe(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
) -> None:
    """Copy bytes one way; when either side ends, end both."""
    try:
        while data := await source.read(1 << 16):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        for writer in pair:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def pg_proxy(url: str) -> AsyncIterator[PgProxy]:
    """A started proxy in front of the server of `url` (closed after the block)."""
    parts = urlsplit(url)
    socket_dir = dict(parse_qsl(parts.query)).get("host", "")  # ?host=/dir: a Unix socket
    host = socket_dir if socket_dir.startswith("/") else parts.hostname or "127.0.0.1"
    proxy = PgProxy(host, parts.port or 5432)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
