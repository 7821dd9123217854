"""The dispatcher: owns the portal senders (one task each, in its TaskGroup), the result
writer and the expiry of rows found past their deadline while claimed. With several
instances it sends only for the portals this one owns (`lease_left`), and lets go of a portal by
taking its rows back and waiting until its requests under way are answered and written."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import Callable, Iterable, Sequence

import structlog

from throttled import metrics
from throttled.aio import Outage, wait_event
from throttled.config import SenderConfig
from throttled.db.repository import ClaimedAction, DatabaseError, Repository
from throttled.drain.outcomes import shielded
from throttled.drain.portal_sender import PortalSender
from throttled.drain.result_writer import ResultWriter
from throttled.hubspot.client import HubSpotClient
from throttled.queues import QueueState
from throttled.tokens import Tokens

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
SETTLE_POLL_S = 0.005  # while the writer's own write of a portal's outcomes is under way


def _always(portal_id: int) -> float:
    return math.inf


class Dispatcher:
    """Owns the portal senders and the result writer."""

    def __init__(
        self,
        *,
        repo: Repository,
        client: HubSpotClient,
        tokens: Tokens,
        config: SenderConfig,
        clock: Clock,
        margin_s: float = 0.002,
        lease_left: Callable[[int], float] = _always,
    ) -> None:
        self.repo = repo
        self.client = client
        self.tokens = tokens
        self.config = config
        self.clock = clock
        self.margin_s = margin_s
        # How long a request for a portal may last from now (0: not this instance's to send).
        self.lease_left = lease_left
        self.writer = ResultWriter(repo)
        self.seq = itertools.count()
        self._senders: dict[int, PortalSender] = {}
        self._group = itertools.count(random.randrange(1 << 40))
        self._tg: asyncio.TaskGroup | None = None
        self._stop: asyncio.Event | None = None
        self._expired: list[ClaimedAction] = []
        self._expiring: list[ClaimedAction] = []  # being marked expired
        self._seeds: dict[int, list[float]] = {}  # budget instants for senders not made yet

    def new_group(self) -> int:
        """A fresh split-group id."""
        return next(self._group)

    def backoff(self, failures: int) -> float:
        """Exponential backoff with full jitter."""
        # (failures comes from a stored row: the exponent is capped before it is computed)
        doubling = 2.0 ** min(max(failures - 1, 0), 64)
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * doubling)
        return random.uniform(cap / 2, cap)

    def put(
        self, queue: QueueState, rows: Sequence[ClaimedAction], at: float, *, urgent: bool = False
    ) -> asyncio.Future[None]:
        """Hand claimed rows to their portal's sender; the future is done once it holds none
        of them any more."""
        return self._sender(queue.portal_id).put(queue, rows, at, urgent=urgent)

    def held_of(self, queue: QueueState) -> int:
        """Rows of one queue waiting in its portal's sender."""
        sender = self._senders.get(queue.portal_id)
        return 0 if sender is None else sender.held_of(queue)

    def sender(self, portal_id: int) -> PortalSender | None:
        """A portal's sender, if it has one (for tests that step it)."""
        return self._senders.get(portal_id)

    def recall(self, queue: QueueState) -> list[ClaimedAction]:
        """Take back the rows a sender holds for this queue, unsent (it was paused)."""
        sender = self._senders.get(queue.portal_id)
        return [] if sender is None else sender.recall(queue)

    def recall_portals(self, portals: Iterable[int]) -> list[ClaimedAction]:
        """Take back every row the senders of these portals hold, unsent (still claimed: the
        caller gives them back). Requests under way are not touched (see settle_portals)."""
        return [r for p in portals if (s := self._senders.get(p)) for r in s.drain_rows()]

    async def settle_portals(self, portals: Iterable[int]) -> None:
        """Wait until the requests under way for these portals are answered and their
        outcomes written (DatabaseError if a write fails: they are kept for the next try)."""
        senders = [s for p in portals if (s := self._senders.get(p)) is not None]
        ids = {i for s in senders for i in s.held_ids()}
        for sender in senders:
            await sender.settle()
        while ids & self.writer.held_ids():
            await self.writer.flush()
            if ids & self.writer.held_ids():  # (the writer's own write of them is under way)
                await asyncio.sleep(SETTLE_POLL_S)

    def seed_budget(self, portal_id: int, instants: Iterable[float]) -> None:
        """Requests sent for a portal by its previous owner (answered at these instants, by
        this clock) count in its budget here, so the per-portal limit holds across a
        handover."""
        at = sorted(instants)
        if not at:
            return
        sender = self._senders.get(portal_id)
        if sender is None:
            self._seeds.setdefault(portal_id, []).extend(at)
            return
        sender.seed(at)

    def expire(self, rows: list[ClaimedAction]) -> None:
        """Rows whose block expired while claimed: never sent."""
        self._expired.extend(rows)

    def _sender(self, portal_id: int) -> PortalSender:
        sender = self._senders.get(portal_id)
        if sender is None:
            if self._tg is None or self._stop is None:
                raise RuntimeError("dispatcher not running")
            sender = self._senders[portal_id] = PortalSender(portal_id, self)
            self.seed_budget(portal_id, self._seeds.pop(portal_id, ()))
            self._tg.create_task(sender.run(self._stop), name=f"portal-sender-{portal_id}")
        return sender

    @property
    def held(self) -> int:
        """Rows waiting in all senders."""
        return sum(s.held for s in self._senders.values())

    def held_ids(self) -> set[int]:
        """Every claimed row this process holds: in a sender, in a request under way, or with
        an outcome not written yet. (Taken synchronously: nothing moves meanwhile.)"""
        ids = self.writer.held_ids()
        for sender in self._senders.values():
            ids.update(sender.held_ids())
        ids.update(r.id for r in (*self._expired, *self._expiring))
        return ids

    async def run(self, stop: asyncio.Event, writer_stop: asyncio.Event) -> None:
        """Run senders until `stop`, then release unsent rows; the writer until `writer_stop`."""
        async with asyncio.TaskGroup() as outer:
            outer.create_task(self.writer.run(writer_stop), name="result-writer")
            outer.create_task(self._expire_loop(writer_stop), name="claimed-expiry")
            async with asyncio.TaskGroup() as tg:
                self._tg, self._stop = tg, stop
                await stop.wait()
            unsent = [r.id for s in self._senders.values() for r in s.drain_rows()]
            if unsent:
                await shielded(self.repo.release(unsent))
            await shielded(self.writer.flush())
            log.info("senders_stopped", released=len(unsent))
        expired, self._expired = self._expired, []  # (found since the expiry loop's last pass)
        if expired:
            try:
                await shielded(self.repo.mark_expired([r.id for r in expired]))
            except DatabaseError as exc:  # (left claimed: whoever takes the portal resets them)
                log.warning("claimed_expiry_failed", rows=len(expired), error=str(exc))

    async def _expire_loop(self, stop: asyncio.Event) -> None:
        """Mark expired the rows the senders found past their deadline, about once a second.
        Through a database outage they are kept, and written once it answers again."""
        outage = Outage("claimed-expiry", "claimed_expiry_failed")
        delay = 1.0
        while not stop.is_set():
            await wait_event(stop, delay)
            delay = 1.0
            rows, self._expired = self._expired, []
            if not rows:
                continue
            self._expiring = rows
            try:
                await shielded(self.repo.mark_expired([r.id for r in rows]))
            except DatabaseError as exc:
                self._expired[:0] = rows
                delay = outage.failed(exc, rows=len(rows))
                continue
            finally:
                self._expiring = []
            outage.over()
            metrics.EXPIRED.inc(len(rows))
