"""Operator changes made elsewhere (another instance, the CLI) reach this daemon: at once by
LISTEN/NOTIFY, and within `admin.change_check_s` by polling the change counter, should a
notification be lost (the listening connection broke, say)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import asyncpg
import structlog

from throttled.aio import Outage, wait_event
from throttled.db.operator import CHANNEL
from throttled.db.repository import DatabaseError, Repository, translate_errors
from throttled.steering import Steering

log = structlog.get_logger(__name__)

MAX_BACKLOG = 1000  # notifications kept before "reload everything" replaces them


class ChangeWatcher:
    """Takes up changes announced by other processes."""

    def __init__(self, repo: Repository, steering: Steering, *, check_s: float) -> None:
        self._repo = repo
        self._steering = steering
        self._check_s = check_s
        self._inbox: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self.version: int | None = None  # the change counter as last taken up
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Listen and poll until stopped; through an outage, try again."""
        outage = Outage("changes", "change_watch_failed")
        while not stop.is_set():
            try:
                await self._listen(stop, outage)
            except DatabaseError as exc:
                await wait_event(stop, outage.failed(exc))

    async def _listen(self, stop: asyncio.Event, outage: Outage) -> None:
        with translate_errors():
            conn = await self._repo.pool.acquire()
        try:
            with translate_errors():
                await conn.add_listener(CHANNEL, self._received)
            try:
                await self._catch_up()  # (what changed while nobody listened)
                outage.over()  # listening again: a later loss backs off from the start
                await self._loop(stop, conn)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.remove_listener(CHANNEL, self._received), 2.0)
        finally:
            with contextlib.suppress(Exception):
                await self._repo.pool.release(conn)

    async def _loop(self, stop: asyncio.Event, conn: Any) -> None:
        while not stop.is_set():
            self._wake.clear()
            try:
                closed = conn.is_closed()
            except asyncpg.InterfaceError:  # (a proxy the pool took back after a loss)
                closed = True
            if closed:
                raise DatabaseError("the listening connection was lost")
            inbox, self._inbox = self._inbox, []
            for change in inbox:
                await self._apply(change)
            if not inbox:
                await self._catch_up()
            await wait_event(self._wake, self._check_s, stop)

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        if not isinstance(payload, str):
            payload = ""
        try:
            change = json.loads(payload) if len(payload) <= 8000 else {"all": True}
        except ValueError:
            change = {"all": True}
        if not isinstance(change, dict) or len(self._inbox) >= MAX_BACKLOG:
            self._inbox = [{"all": True}]
        else:
            self._inbox.append(change)
        self._wake.set()

    async def _apply(self, change: dict[str, Any]) -> None:
        version = change.get("v")
        if type(version) is int and self.version is not None and version <= self.version:
            return  # already taken up (by a catch-up)
        if type(version) is int and version in self._steering.own_versions:
            self._steering.own_versions.discard(version)  # this instance's own: taken up
        else:
            await self._steering.apply(change)
        self.applied += 1
        if type(version) is int and self.version is not None and version == self.version + 1:
            self.version = version  # in order: the counter need not be read again

    async def _catch_up(self) -> None:
        """The backstop: if the counter moved past what was taken up, reload everything."""
        version = await self._repo.change_version()
        if self.version is not None and version != self.version:
            log.info("changes_reloaded", since=self.version, version=version)
            await self._steering.reload_all()
            self.applied += 1
        self.version = version
