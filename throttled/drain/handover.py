"""Portals changing hands between instances (throttled/cluster.py): what the supervisor does
when this instance gains or loses a portal's lease, and with work stored here for portals
owned elsewhere.

- take_over() (the cluster's on_gained): the rows left claimed for the portals (by a previous
  owner that died, say) go back to pending and count as sent now; their queues with work are
  loaded with their rate log; their budget is seeded with the previous owner's recent
  requests; their coroutines start.
- let_go() (on_lost): their coroutines end, the rows their senders hold go back to pending,
  and it returns once their requests under way are answered and written, so that the next
  owner never sends a row that is in flight here.
- Work stored here for a portal owned elsewhere is routed (Cluster.route: taken if nobody
  owns it, else its owner is told, one notification per batch routed); what the others store
  for portals owned here comes in through on_work(). Every lease_s the queues with work of
  the portals owned here are looked at again, in case a notification was lost.

Who owns what: the cluster owns the leases; this module owns the work waiting to be routed
and the portals whose take-over is unfinished; the supervisor still owns its queues and
their coroutines (this module asks it to track, replay, run and end them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Protocol

import structlog

from throttled.aio import Outage, in_steps, wait_event
from throttled.db.repository import DatabaseError, Repository
from throttled.drain.dispatcher import Dispatcher
from throttled.drain.queue_loop import SPAWN_SLICE
from throttled.queues import QueueState

if TYPE_CHECKING:
    from throttled.drain.supervisor import Supervisor

log = structlog.get_logger(__name__)

MAX_SEEDED_REQUESTS = 100_000  # a portal budget's requests read back at a take-over, in all


class Leases(Protocol):
    """What the supervisor uses of the portal leases (throttled.cluster.Cluster)."""

    @property
    def id(self) -> str: ...

    @property
    def lease_s(self) -> float: ...

    @property
    def owned(self) -> set[int]: ...

    def owns(self, portal_id: int) -> bool: ...

    async def route(self, work: Mapping[int, Collection[int]]) -> None: ...


class Handover:
    """The supervisor's side of the portal leases."""

    def __init__(
        self, supervisor: Supervisor, cluster: Leases, repo: Repository, dispatcher: Dispatcher
    ) -> None:
        self._sup = supervisor
        self._cluster = cluster
        self._repo = repo
        self._dispatcher = dispatcher
        self._elsewhere: dict[int, set[int]] = {}  # portal -> queues with work, owned elsewhere
        self._route_wake = asyncio.Event()
        self._rescan: set[int] = set()  # owned portals whose queues with work to look at again
        self._rescan_wake = asyncio.Event()
        self._unfinished: dict[int, str | None] = {}  # portal -> previous owner, take-over failed
        self._taking: set[int] = set()  # portals whose take-over is under way: nothing runs yet
        self._deferred: set[int] = set()  # queues that gained work meanwhile
        self._owed: dict[int, int] = {}  # queue -> rows recovered, not yet counted as sent
        self._recover_all = True  # the first take-over resets every portal's claimed rows

    # -- work for portals owned elsewhere, and the others' work for ours ----------------------

    def note(self, queue: QueueState) -> None:
        """A queue has work: if its portal is owned elsewhere (or by nobody), route it."""
        if not queue.paused and not self._cluster.owns(queue.portal_id):
            self._elsewhere.setdefault(queue.portal_id, set()).add(queue.id)
            self._route_wake.set()

    def taking(self, portal_id: int) -> bool:
        """Whether the portal's take-over is under way (its claimed rows may be reset)."""
        return portal_id in self._taking

    def defer(self, queue: QueueState) -> bool:
        """Whether a queue that gains work must wait: its portal's take-over is under way
        (its rate log not replayed, its budget not seeded yet); it runs once that is over."""
        if queue.portal_id not in self._taking:
            return False
        self._deferred.add(queue.id)
        return True

    def on_work(self, queue_ids: list[int], portals: set[int]) -> None:
        """Another instance stored work for portals this one owns (Cluster.on_work): these
        queues, and every queue with work of `portals`."""
        if portals:
            self._rescan |= portals
            self._rescan_wake.set()
        if queue_ids:
            self._sup.notify(queue_ids)

    async def route(self, stop: asyncio.Event) -> None:
        """Route the work stored here for portals owned elsewhere (Cluster.route); what is
        gathered when the stop comes is routed once more."""
        outage = Outage("intake-router", "intake_route_failed")
        while True:
            self._route_wake.clear()
            if self._elsewhere:
                work, self._elsewhere = self._elsewhere, {}
                try:
                    await self._cluster.route(work)
                except DatabaseError as exc:
                    for portal, queue_ids in work.items():
                        self._elsewhere.setdefault(portal, set()).update(queue_ids)
                    if stop.is_set():
                        log.warning("intake_route_dropped", portals=len(work), error=str(exc))
                        return  # (their owners find them at their next look: see rescan)
                    await wait_event(stop, outage.failed(exc, portals=len(work)))
                    continue
                outage.over()
            if stop.is_set():
                return
            await wait_event(self._route_wake, None, stop)

    async def rescan_once(self) -> None:
        """Run the queues with work of the portals to rescan that have no coroutine."""
        portals, self._rescan = self._rescan, set()
        owned = sorted(p for p in portals if self._cluster.owns(p))
        if not owned:
            return
        try:
            rows = await self._repo.active_queues_of(owned)
        except DatabaseError:
            self._rescan |= portals
            raise
        self._sup.notify([row.id for row in rows if not self._sup.has_work(row.id)])

    async def rescan(self, stop: asyncio.Event) -> None:
        """Look again at the owned portals' queues with work every lease_s (a notification
        may have been lost), and at once at those another instance names."""
        outage = Outage("portal-rescan", "scheduler_db_error")
        loop = asyncio.get_running_loop()
        rescan_at = loop.time() + self._cluster.lease_s
        while not stop.is_set():
            self._rescan_wake.clear()
            if loop.time() >= rescan_at:
                self._rescan |= self._cluster.owned
                rescan_at = loop.time() + self._cluster.lease_s
            try:
                await self.rescan_once()
            except DatabaseError as exc:
                await wait_event(stop, outage.failed(exc))
                continue
            outage.over()
            await wait_event(self._rescan_wake, max(0.0, rescan_at - loop.time()), stop)

    # -- portals changing hands (the cluster's on_gained and on_lost) ----------------------------

    async def take_over(self, portals: set[int], previous: Mapping[int, str | None]) -> None:
        """Portals this instance now owns: reset the rows left claimed for them (not those
        this process holds), counted as sent now; load their queues with work, with their rate
        log; seed their budget with the previous owner's recent requests; and run them.
        Idempotent (the cluster calls it again if it raised)."""
        ids = sorted(portals)
        self._taking.update(ids)
        try:
            await self._take_over(ids, previous)
        finally:
            self._taking.difference_update(ids)
            self._run_deferred(set(ids))

    async def _take_over(self, ids: list[int], previous: Mapping[int, str | None]) -> None:
        sup = self._sup
        for p in ids:
            self._unfinished.setdefault(p, previous.get(p))  # (a retry keeps the first's)
        before = {p: self._unfinished[p] for p in ids}
        # Portals another may have sent for since this instance last owned them (if ever):
        # what is known here of their queues and budget misses those sends.
        foreign = [p for p in ids if before[p] != self._cluster.id]
        now = sup.clock()
        if self._recover_all or any(owner is not None for owner in before.values()):
            held = sorted(self._dispatcher.held_ids())
            for queue_id, n in (await self._repo.recover_claimed_of(ids, held)).items():
                self._owed[queue_id] = self._owed.get(queue_id, 0) + n
        rows = await self._repo.active_queues_of(ids)
        self._forget_queues_of(set(foreign))
        fresh = [row.id for row in rows if row.id not in sup.queues]
        queues = [sup.track(row) for row in rows]
        await sup.replay([sup.queues[i] for i in fresh], now)
        requests = await self._recent_requests(foreign)
        # (nothing below awaits: it all happens, or, if the above raised, none of it)
        reclaimed = self._charge_owed(now)
        for portal_id, instants in requests.items():
            self._dispatcher.seed_budget(portal_id, instants)
        self._taking.difference_update(ids)
        for p in ids:
            del self._unfinished[p]
        self._recover_all = False
        log.info(
            "portals_taken_over",
            portals=len(ids),
            active_queues=len(rows),
            reclaimed=reclaimed,
            seeded_requests=sum(len(v) for v in requests.values()),
        )
        async for queue in in_steps(queues, SPAWN_SLICE):  # (work that comes now runs at once)
            sup.kick(queue, held=True)

    def _run_deferred(self, portals: set[int]) -> None:
        """The queues of these portals that gained work during their take-over: run here
        (or routed to the owner, if the take-over failed), loaded first if forgotten."""
        sup = self._sup
        waiting = [
            queue_id
            for queue_id in self._deferred
            if (queue := sup.queues.get(queue_id)) is None or queue.portal_id in portals
        ]
        if not waiting:
            return
        self._deferred.difference_update(waiting)
        unknown = []
        for queue_id in waiting:
            queue = sup.queues.get(queue_id)
            if queue is None:
                unknown.append(queue_id)
            else:
                sup.kick(queue, urgent=True, held=True)
                self.note(queue)
        sup.notify(unknown)

    async def let_go(self, portals: set[int]) -> None:
        """Portals this instance no longer owns: their coroutines end, the rows their senders
        hold go back to pending, and it returns once their requests under way are answered
        and written."""
        sup = self._sup
        queues = [q for q in sup.queues.values() if q.portal_id in portals]
        for queue in queues:
            sup.ring(queue.id)  # (each sees its portal is not ours, and ends)
        for queue_id, release in list(sup.releases.items()):
            if release.portal_id in portals:
                del sup.releases[queue_id]
        rows = self._dispatcher.recall_portals(portals)
        tasks = [t for q in queues if (t := sup.task_of(q.id)) is not None]
        if tasks:
            await asyncio.wait(tasks)  # (rows a claim under way brings in go back with it)
        await sup.give_back(rows)
        await self._dispatcher.settle_portals(portals)
        log.info("portals_let_go", portals=len(portals), returned=len(rows), queues=len(tasks))

    def _forget_queues_of(self, portals: set[int]) -> None:
        """Forget the idle queues of these portals: loaded again when they get work, with
        their rate log (a queue with a coroutine stays: its portal was ours all along)."""
        queues = self._sup.queues
        for queue_id in [q.id for q in queues.values() if q.portal_id in portals]:
            if not self._sup.has_work(queue_id):
                del queues[queue_id]

    async def _recent_requests(self, portals: list[int]) -> dict[int, list[float]]:
        """The requests of these portals in the last budget interval, as instants by this
        process's clock (see RECENT_REQUESTS)."""
        if not portals:
            return {}
        config = self._dispatcher.config
        limit = min(MAX_SEEDED_REQUESTS, config.portal_requests * len(portals))
        found = await self._repo.recent_requests(portals, config.portal_interval_seconds, limit)
        now = self._dispatcher.clock()
        requests: dict[int, list[float]] = {}
        for portal_id, age_s in found:
            requests.setdefault(portal_id, []).append(now - age_s)
        return requests

    def _charge_owed(self, now: float) -> int:
        """Rows recovered from a claim left behind may have gone out just before: each counts
        as sent now in its queue's limiter (the queues not known here: loaded later, with
        their rate log)."""
        owed, self._owed = self._owed, {}
        for queue_id, n in owed.items():
            queue = self._sup.queues.get(queue_id)
            if queue is not None:
                queue.limiter.record(now, n)
        return sum(owed.values())
