"""The cluster's LISTEN/NOTIFY channel as an instance hears it: the listener (a base of Cluster,
throttled/cluster.py) that wakes the heartbeat on the others' announcements and passes work
notifications on to on_work, and the work notifications' format: built by Cluster.route()
(work_payload), parsed here (queue and portal ids bounded to a bigint, decimal_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Collection, Mapping
from typing import Any

import asyncpg

from throttled.aio import Outage, wait_event
from throttled.cluster_leases import Leases
from throttled.db.cluster import CHANNEL
from throttled.db.repository import DatabaseError, DatabaseUnavailable, translate_errors

MAX_ID = 2**63 - 1  # a bigint: an id from a notification beyond it is no queue's
MAX_PAYLOAD = 7000  # characters of a work notification (PostgreSQL's limit is 8000 bytes)


class Listener(Leases):
    """Portal leases that hear the other instances' announcements (Cluster runs _listen)."""

    async def _listen(self, stop: asyncio.Event) -> None:
        outage = Outage("cluster_listen", "cluster_listen_failed")
        while not (stop.is_set() or self._halted.is_set()):
            try:
                await self._listening(stop, outage)
            except DatabaseError as exc:
                await wait_event(stop, outage.failed(exc), self._halted)

    async def _listening(self, stop: asyncio.Event, outage: Outage) -> None:
        with translate_errors():
            conn = await self._repo.pool.acquire()
        lost = asyncio.Event()

        def terminated(_conn: Any) -> None:
            lost.set()
            if not (stop.is_set() or self._halted.is_set()):
                self.suspend("the listening connection was lost")

        try:
            with translate_errors():
                conn.add_termination_listener(terminated)
                await conn.add_listener(CHANNEL, self._received)
            try:
                outage.over()
                self._wake.set()  # (what was announced while nobody listened)
                while not (stop.is_set() or self._halted.is_set()):
                    if lost.is_set() or _closed(conn):
                        raise DatabaseUnavailable("the listening connection was lost")
                    await wait_event(self._halted, self.interval_s, stop, lost)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.remove_listener(CHANNEL, self._received), 2.0)
        finally:
            with contextlib.suppress(Exception):
                conn.remove_termination_listener(terminated)
            with contextlib.suppress(Exception):
                await self._repo.pool.release(conn)

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: object) -> None:
        try:
            doc = json.loads(payload) if isinstance(payload, str) else None
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            self._wake.set()  # (someone's: look again)
        elif doc.get("instance") == self.id:
            return
        elif doc.get("event") == "work":
            self._work(doc)  # (no heartbeat for it: that would be a survey per batch)
        else:
            self._wake.set()

    def _work(self, doc: dict[str, Any]) -> None:
        """Another instance stored work for portals: pass on what is for portals owned here."""
        queue_ids: list[int] = []
        work = doc.get("work")
        if isinstance(work, dict):
            for key, ids in work.items():
                portal = decimal_id(key)
                if portal is not None and self.owns(portal) and isinstance(ids, list):
                    queue_ids += [i for i in ids if type(i) is int and 0 < i <= MAX_ID]
        named = doc.get("portals")
        whole = (
            {p for p in named if type(p) is int and 0 < p <= MAX_ID}
            if isinstance(named, list)
            else set()
        )
        whole = self.owned if doc.get("all") is True else whole & self.owned
        if queue_ids or whole:
            self.on_work(queue_ids, whole)
        if doc.get("wake") is True:
            self._wake.set()  # portals were left without an owner: take them if there is room


def work_payload(instance_id: str, work: Mapping[int, Collection[int]], *, wake: bool) -> str:
    """A work notification: queue ids by portal; if that is too long, the portals alone; if
    that is too, every portal (the owners look at all theirs)."""
    base: dict[str, Any] = {"instance": instance_id, "event": "work"}
    if wake:
        base["wake"] = True
    bodies: list[dict[str, Any]] = [
        {"work": {str(p): sorted(work[p]) for p in sorted(work)}},
        {"portals": sorted(work)},
    ]
    for body in bodies:
        text = json.dumps(base | body, separators=(",", ":"))
        if len(text) <= MAX_PAYLOAD:
            return text
    return json.dumps(base | {"all": True}, separators=(",", ":"))


def decimal_id(text: object) -> int | None:
    """A portal id as a JSON object key (decimal digits), else None."""
    if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) <= 19:
        return int(text)
    return None


def _closed(conn: Any) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:  # (a proxy the pool took back after a loss)
        return True
