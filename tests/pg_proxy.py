"""A fault proxy on loopback in front of PostgreSQL, which a test cuts to make the database
unreachable for whoever connects through it (and only for them), then restores."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.fault_proxy import FaultProxy


class PgProxy(FaultProxy):
    """Relays connections to a PostgreSQL server. Cut: every relayed connection is reset, and
    new ones are reset as soon as they are accepted, as when the server or the network is
    down."""

    def url_for(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))

    def cut(self) -> None:
        """Reset every relayed connection and refuse new ones."""
        self.reset()

    def restore(self) -> None:
        """Relay new connections again."""
        self.heal()


@contextlib.asynccontextmanager
async def pg_proxy(url: str) -> AsyncIterator[PgProxy]:
    """A started proxy in front of the server of `url` (closed after the block)."""
    parts = urlsplit(url)
    socket_dir = dict(parse_qsl(parts.query)).get("host", "")  # ?host=/dir: a Unix socket
    host = socket_dir if socket_dir.startswith("/") else parts.hostname or "127.0.0.1"
    async with PgProxy(host, parts.port or 5432) as proxy:
        yield proxy
