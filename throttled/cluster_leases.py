"""The state of this instance's portal leases and what the scheduler asks of them: which portals
it may send for now, how long a request may last, the suspension after a database loss, the
fair share. Leases is the base of Cluster (throttled/cluster.py, which describes the design
and keeps this state by heartbeat); the callback types (Gained, Lost, Work) and default_name
are here too.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

from throttled.config import MAX_INSTANCE_NAME
from throttled.db.repository import DatabaseUnavailable, Repository

log = structlog.get_logger(__name__)

Gained = Callable[[set[int], dict[int, str | None]], Awaitable[None]]
Lost = Callable[[set[int]], Awaitable[None]]
Work = Callable[[list[int], set[int]], None]
T = TypeVar("T")

SEND_SLACK_S = 0.5  # a request ends this long before its portal's lease can expire


async def _nothing_gained(portals: set[int], previous: dict[int, str | None]) -> None:
    """The default on_gained: nothing to set up."""


async def _nothing_lost(portals: set[int]) -> None:
    """The default on_lost: nothing to stop."""


def _no_work(queue_ids: list[int], portals: set[int]) -> None:
    """The default on_work: nobody to wake."""


def default_name() -> str:
    """hostname:pid, how an instance without cluster.instance_name is listed."""
    return f"{socket.gethostname()}:{os.getpid()}"[:MAX_INSTANCE_NAME]


class Leases:
    """This instance's portal leases as it reckons them locally (Cluster keeps them)."""

    def __init__(
        self,
        repo: Repository,
        *,
        lease_s: float,
        name: str = "",
        instance_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(lease_s) and lease_s > 0):
            raise ValueError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
        self.id = instance_id or secrets.token_hex(8)  # one per process start
        self.name = (name or default_name())[:MAX_INSTANCE_NAME]
        self.lease_s = lease_s
        self.interval_s = lease_s / 3  # between heartbeats
        self.margin_s = lease_s / 3  # a lease ends this much sooner here than in the database
        self.on_gained: Gained = _nothing_gained
        self.on_lost: Lost = _nothing_lost
        self.on_work: Work = _no_work
        self._repo = repo
        self._clock = clock
        self._until: dict[int, float] = {}  # portal -> the local instant its lease ends
        self._handed: dict[int, float] = {}  # portal -> when it was handed back (recently)
        self._calm_until = -math.inf  # no rebalancing before then (see _take)
        self._unreleased: set[int] = set()  # handed back here, not yet in the database
        self._settling: set[int] = set()  # being handed back: on_lost under way (leases kept)
        self._letting_go: set[asyncio.Task[None]] = set()  # those on_lost calls
        self._failed: list[asyncio.Task[None]] = []  # hand-backs that raised (not a DB error)
        self._live = 1  # live instances, and portals with work or leased, at the last survey
        self._total = 0
        self._counted: set[int] = set()  # portals that total counts (owned here, or candidates)
        self._registered = False
        self._lock = asyncio.Lock()  # one change of the leases at a time
        self._wake = asyncio.Event()  # another instance announced something
        self._halted = asyncio.Event()  # stop() was called
        self._suspended = False  # the database was lost: no request starts (see suspend)

    # -- what the scheduler asks ------------------------------------------------------------

    @property
    def owned(self) -> set[int]:
        """The portals this instance may send for now (by local reckoning)."""
        now = self._clock()
        return {p for p, until in self._until.items() if until > now}

    def owns(self, portal_id: int) -> bool:
        """Whether this instance may send for this portal now."""
        return self._until.get(portal_id, -math.inf) > self._clock()

    def lease_left(self, portal_id: int) -> float:
        """How long a request for this portal started now may last: until its lease may
        expire in the database (taken over then, its rows sent again by the next owner), less
        SEND_SLACK_S; 0 if this instance may not send for it now. A request must be over by
        then, answered or abandoned (see PortalSender)."""
        now = self._clock()
        until = self._until.get(portal_id, -math.inf)
        if until <= now or self._suspended:
            return 0.0
        return max(0.0, until + self.margin_s - SEND_SLACK_S - now)

    @property
    def suspended(self) -> bool:
        """Whether sending is suspended (the database was lost, the leases not renewed since)."""
        return self._suspended

    def suspend(self, why: str) -> None:
        """The database was lost: start no request (lease_left is 0) until a heartbeat renews
        the leases, and run one at once. A request answered now could not be recorded, and the
        next owner, once the leases expire, would send its rows again."""
        if not self._suspended:
            self._suspended = True
            log.warning("cluster_sending_suspended", instance=self.id, reason=why)
        self._wake.set()

    def fair_share(self, extra: int = 0) -> int:
        """Portals with work or leased (and `extra` more) per live instance, rounded up. (The
        portals taken here since the last survey count too: work that arrived meanwhile.)"""
        uncounted = sum(1 for p in self._until if p not in self._counted)
        return math.ceil((self._total + uncounted + extra) / self._live)

    async def _db(self, query: Coroutine[Any, Any, T]) -> T:
        """A query bounded in time: one that does not answer within a heartbeat is a failure
        (the leases must lapse here on time, not after the pool's command timeout)."""
        try:
            async with asyncio.timeout(max(self.interval_s, 1.0)):
                return await query
        except TimeoutError:
            raise DatabaseUnavailable("the database did not answer in time") from None
