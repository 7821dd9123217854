"""The supervisor: one coroutine per queue with work, spawned when it gains work.

Who owns what:
- The supervisor owns the set of queues it knows (`queues`: identity, policy, limiter,
  paused) and the set of running queue coroutines (their Signals). An idle queue has no
  coroutine and costs nothing but its entry.
- A queue's coroutine (queue_loop.drain_queue) owns its progress, as locals: when it wakes,
  what it claims, whether rows may wait out a backoff.
- The claimer owns the claim statements under way; a portal's sender owns the rows handed to
  it until they have gone out (the future put() returns); the result writer owns outcomes not
  yet written; the limiter is charged by the sender, at the send instant.

Every task runs in a TaskGroup: a queue coroutine that raises anything but a database error
(which it waits out) is a bug, and stops the daemon.

With several instances (throttled/cluster.py), a queue runs only on the instance that owns its
portal (`owns`). The cluster calls take_over() for portals it gains (their claimed rows left
behind are reset, their queues loaded with their rate log, their budget seeded) and let_go()
for portals it loses (their coroutines end, their rows go back, their requests under way are
answered and written first). Work stored here for a portal owned elsewhere is routed
(Cluster.route: acquired if nobody owns it, else its owner is told), and what others store for
portals owned here arrives through on_work(). Every `lease_s` the queues with work of the
portals owned here are looked at again, in case a notification was lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime
from typing import Protocol

import structlog

from throttled import rates
from throttled.aio import Outage, wait_event
from throttled.db.repository import ClaimedAction, DatabaseError, QueueRow, Repository
from throttled.drain.claimer import Claimer
from throttled.drain.dispatcher import Dispatcher
from throttled.drain.outcomes import shielded
from throttled.drain.queue_loop import Signals, drain_queue
from throttled.drain.releases import Releases
from throttled.queues import QueueLimiter, QueueState, safe_policy

log = structlog.get_logger(__name__)

NEW_QUEUE_SLACK_S = 5.0  # a database clock running ahead of ours
MAX_SEEDED_REQUESTS = 100_000  # a portal budget's requests read back at a take-over, in all


def _everywhere(portal_id: int) -> bool:
    return True


class Leases(Protocol):
    """What the supervisor uses of the portal leases (throttled.cluster.Cluster)."""

    @property
    def id(self) -> str: ...

    @property
    def lease_s(self) -> float: ...

    @property
    def owned(self) -> set[int]: ...

    async def route(self, work: Mapping[int, Collection[int]]) -> None: ...


class Supervisor:
    """Spawns, wakes, pauses and cancels queue coroutines."""

    def __init__(
        self,
        repo: Repository,
        dispatcher: Dispatcher,
        *,
        clock: Callable[[], float],
        lookahead_s: float,
        claim_ahead_s: float = 0.0,
        owns: Callable[[int], bool] = _everywhere,
        cluster: Leases | None = None,
    ) -> None:
        self._repo = repo
        self._dispatcher = dispatcher
        self.clock = clock
        self.lookahead_s = lookahead_s
        self.horizon_s = max(lookahead_s, claim_ahead_s)
        self.owns = owns
        self.claimer = Claimer(repo)
        self._releases = Releases(repo, self.claimer, dispatcher)
        self.queues: dict[int, QueueState] = {}
        self._releases.queues = self.queues
        self.at_risk: set[int] = set()  # queues whose backlog will outlive its deadline
        self._signals: dict[int, Signals] = {}  # queues with a coroutine (or about to)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unknown: set[int] = set()  # queue ids to load (and replay) before they run
        self._load_wake = asyncio.Event()
        self._started_at = clock()
        self._cluster = cluster
        self._elsewhere: dict[int, set[int]] = {}  # portal -> queues with work, owned elsewhere
        self._route_wake = asyncio.Event()
        self._rescan: set[int] = set()  # owned portals whose queues with work to look at again
        self._unfinished: dict[int, str | None] = {}  # portal -> previous owner, take-over failed
        self._owed: dict[int, int] = {}  # queue -> rows recovered, not yet counted as sent
        self._recover_all = True  # the first take-over resets every portal's claimed rows
        dispatcher.writer.on_retry = self.retry_at
        self.claimer.on_released = self.notify

    # -- what it knows ------------------------------------------------------------------------

    @property
    def releases(self) -> dict[int, QueueState]:
        """Queues with released rows (fail-pending) being completed."""
        return self._releases.releases

    @property
    def running(self) -> frozenset[int]:
        """The queues that have a coroutine now."""
        return frozenset(self._tasks)

    @property
    def active(self) -> int:
        """Queues with work (a coroutine running, or about to)."""
        return len(self._signals)

    def held_of(self, queue_id: int) -> int:
        """Rows of a queue its portal's sender holds."""
        queue = self.queues.get(queue_id)
        return 0 if queue is None else self._dispatcher.held_of(queue)

    # -- events (synchronous, cheap) ------------------------------------------------------------

    def notify(self, queue_ids: Iterable[int], changed: Iterable[QueueRow] = ()) -> None:
        """New rows were committed for these queues; `changed` are queue rows intake just
        created or re-resolved. A queue created by this process has no rate log to replay,
        so it runs at once (no database round trip before its first claim)."""
        for row in changed:
            if row.id in self.queues or (
                row.created_at.timestamp() >= self._started_at + NEW_QUEUE_SLACK_S
            ):
                self._track(row)
            else:
                self._unknown.add(row.id)  # existed before: replay its recent sends first
        for queue_id in queue_ids:
            queue = self.queues.get(queue_id)
            if queue is None:
                self._unknown.add(queue_id)
            else:
                self._kick(queue, urgent=True)
                self._note_elsewhere(queue)
        if self._unknown:
            self._load_wake.set()
        if self._elsewhere:
            self._route_wake.set()

    def on_work(self, queue_ids: list[int], portals: set[int]) -> None:
        """Another instance stored work for portals this one owns (Cluster.on_work): these
        queues, and every queue with work of `portals`."""
        if portals:
            self._rescan |= portals
            self._load_wake.set()
        if queue_ids:
            self.notify(queue_ids)

    def _note_elsewhere(self, queue: QueueState) -> None:
        """Work for a queue whose portal this instance does not own: to be routed."""
        if self._cluster is not None and not queue.paused and not self.owns(queue.portal_id):
            self._elsewhere.setdefault(queue.portal_id, set()).add(queue.id)

    def retry_at(self, queue: QueueState, at: float) -> None:
        """Rows went back to pending, claimable from `at` (the result writer wrote them)."""
        if queue.complete_as is not None:
            self._releases.wake()  # a release: it looks again
            return
        live = self.queues.get(queue.id)
        if live is not None:
            self._kick(live, held=True)

    def wake(self, queue_id: int) -> None:
        """Look at a queue again now (its policy changed, or it has new work)."""
        queue = self.queues.get(queue_id)
        if queue is not None:
            self._kick(queue)

    def pause(self, queue_id: int) -> list[ClaimedAction]:
        """Pause a queue: its coroutine ends, and the rows its sender held are returned,
        unsent and still claimed (the caller releases them)."""
        queue = self.queues.get(queue_id)
        if queue is None:
            return []
        queue.paused = True
        self._ring(queue_id)
        return self._dispatcher.recall(queue)

    def resume(self, queue_id: int) -> None:
        """Resume a paused queue."""
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.paused = False
            self._kick(queue, urgent=True, held=True)

    def cancel(self, queue_id: int) -> None:
        """End a queue's coroutine now (its claimed rows go back: see Claimer.claim)."""
        task = self._tasks.get(queue_id)
        if task is not None:
            task.cancel()

    def _ring(self, queue_id: int) -> None:
        signals = self._signals.get(queue_id)
        if signals is not None:
            signals.alarm.ring()

    def _kick(self, queue: QueueState, *, urgent: bool = False, held: bool = False) -> None:
        signals = self._signals.get(queue.id)
        if signals is not None:  # running: it looks again
            signals.more = True
            signals.held |= held
            signals.alarm.ring()
            return
        if queue.paused or self.stopped.done() or not self.owns(queue.portal_id):
            return
        signals = self._signals[queue.id] = Signals(urgent=urgent, held=held)
        if self._group is not None:  # (else run() spawns it)
            self._spawn(queue, signals)

    def _spawn(self, queue: QueueState, signals: Signals) -> None:
        assert self._group is not None
        self._tasks[queue.id] = self._group.create_task(
            self._drive(queue, signals), name=f"queue-{queue.id}"
        )

    async def _drive(self, queue: QueueState, signals: Signals) -> None:
        try:
            await drain_queue(queue, signals, self)
        finally:
            if self._signals.get(queue.id) is signals:
                del self._signals[queue.id]
                del self._tasks[queue.id]

    # -- what a queue's coroutine uses (queue_loop.Drain) ---------------------------------------

    def hand_over(
        self, queue: QueueState, rows: list[ClaimedAction], slot: float, *, urgent: bool
    ) -> asyncio.Future[None]:
        """Give claimed rows to the queue's portal's sender."""
        return self._dispatcher.put(queue, rows, slot, urgent=urgent)

    async def give_back(self, rows: list[ClaimedAction]) -> None:
        """Claimed rows that will not be sent go back to pending."""
        if rows:
            await shielded(self._repo.release([r.id for r in rows]))

    async def next_not_before(self, queue_id: int) -> datetime | None:
        """When a queue's first row in a retry backoff becomes claimable (None: none is).
        A backoff that ended between its claim and now is returned too (in the past)."""
        return (await self._repo.next_not_before([queue_id])).get(queue_id)

    # -- start-up and operator changes ------------------------------------------------------------

    async def recover(self) -> None:
        """Load active queues and the rate log, so a restart does not burst."""
        now = self.clock()
        recovered = await self._repo.recover_claimed()
        rows = await self._repo.active_queues()
        queues = [self._track(row) for row in rows]
        await self._replay(queues, now)
        for queue_id, n in recovered.items():
            # Claimed by a process that died: they may have gone out just before; count them now.
            if queue_id in self.queues:
                self.queues[queue_id].limiter.record(now, n)
        for queue in queues:
            self._kick(queue, held=True)
        log.info("scheduler_recovered", active_queues=len(rows), reclaimed=sum(recovered.values()))

    async def refresh(self, queue_ids: Iterable[int]) -> None:
        """Queue rows an operator changed (rate override, pause, released or retried rows):
        take them up at once. A paused queue's rows held in a sender go back to pending."""
        ids = list(queue_ids)
        recalled: list[ClaimedAction] = []
        unknown: list[int] = []
        for row in await self._repo.get_queues(ids):
            known = self.queues.get(row.id)
            if known is None:
                unknown.append(row.id)
                if row.releasing and self.owns(row.portal_id):
                    self._releases.start(row, None)
                continue
            was_paused = known.paused
            queue = self._track(row)
            if queue.paused:
                recalled += self.pause(queue.id)
            elif was_paused:
                self.resume(queue.id)
            else:
                self.wake(queue.id)
        await self.give_back(recalled)
        self.notify(unknown)

    def recall(self, queue_id: int) -> list[ClaimedAction]:
        """Take back the rows this queue's sender holds, unsent (they are still claimed:
        the caller marks them, or gives them back)."""
        queue = self.queues.get(queue_id)
        return [] if queue is None else self._dispatcher.recall(queue)

    def put_back(self, queue_id: int, rows: list[ClaimedAction]) -> None:
        """Rows recall() took, handed to the sender again (the change that wanted them
        failed)."""
        queue = self.queues.get(queue_id)
        if queue is not None and rows:
            self._dispatcher.put(queue, rows, self.clock())

    async def refresh_active(self) -> None:
        """Take up every queue with pending rows not known yet (another process wrote
        them: an import)."""
        rows = await self._repo.active_queues()
        self.notify([row.id for row in rows if row.id not in self.queues])

    async def refresh_releasing(self) -> None:
        """Take up every queue with released rows (another process released them)."""
        for row in await self._repo.releasing_queues():
            if self.owns(row.portal_id):
                self._releases.start(row, self.queues.get(row.id))

    def _track(self, row: QueueRow) -> QueueState:
        policy, fault = _safe_policy(row)
        queue = self.queues.get(row.id)
        if queue is None:
            queue = QueueState(
                id=row.id,
                key=row.key,
                portal_id=row.portal_id,
                limiter=QueueLimiter(policy, key=row.key),
                stored_policy=row.policy,
                override=row.override,
            )
            self.queues[row.id] = queue
        else:
            queue.stored_policy, queue.override = row.policy, row.override
            if policy is not None:
                queue.limiter.set_policy(policy)
        queue.paused, queue.releasing = row.paused, row.releasing
        if row.releasing and self.owns(row.portal_id):
            self._releases.start(row, queue)
        if fault is not None:
            queue.limiter.hold(fault)
        return queue

    async def _replay(self, queues: list[QueueState], now: float) -> None:
        """Queues first seen now may have sent recently (before a restart): replay their log."""
        longest = max((q.limiter.policy.period_s for q in queues), default=0.0)
        if not longest:
            return
        since = datetime.fromtimestamp(now - longest, UTC)
        by_id = {q.id: q for q in queues}
        for queue_id, sent_at, n in await self._repo.recent_sends_for(list(by_id), since):
            by_id[queue_id].limiter.record(sent_at.timestamp(), n)

    async def load_once(self) -> None:
        """Load the queues named by notifications but not known yet, replay their rate log,
        and run them; look again at the queues with work of the portals to rescan (the
        run-once step of the loader, for tests)."""
        if self._rescan:
            await self._rescan_once()
        ids, self._unknown = self._unknown, set()
        if not ids:
            return
        now = self.clock()
        fresh: list[QueueState] = []
        try:
            rows = await self._repo.get_queues(list(ids))
            fresh = [self._track(row) for row in rows if row.id not in self.queues]
            if fresh:
                await self._replay(fresh, now)
        except DatabaseError:
            # Asked again once the database answers. A queue whose rate log is not replayed
            # yet must not claim: it is forgotten until then.
            for queue in fresh:
                self.queues.pop(queue.id, None)
            self._unknown |= ids
            raise
        for row in rows:
            queue = self.queues[row.id]
            self._kick(queue, urgent=True)
            self._note_elsewhere(queue)
        if self._elsewhere:
            self._route_wake.set()

    async def _rescan_once(self) -> None:
        """Run the queues with work of the portals to rescan that have no coroutine."""
        portals, self._rescan = self._rescan, set()
        owned = sorted(p for p in portals if self.owns(p))
        if not owned:
            return
        try:
            rows = await self._repo.active_queues_of(owned)
        except DatabaseError:
            self._rescan |= portals
            raise
        self.notify([row.id for row in rows if row.id not in self._signals])

    async def _load(self, stop: asyncio.Event) -> None:
        outage = Outage("scheduler", "scheduler_db_error")
        loop = asyncio.get_running_loop()
        rescan_at = loop.time() + self._rescan_s
        while not stop.is_set():
            self._load_wake.clear()
            if self._cluster is not None and loop.time() >= rescan_at:
                self._rescan |= self._cluster.owned  # (a notification may have been lost)
                rescan_at = loop.time() + self._rescan_s
            try:
                await self.load_once()
            except DatabaseError as exc:
                await wait_event(stop, outage.failed(exc))
                continue
            outage.over()
            timeout = None if self._cluster is None else max(0.0, rescan_at - loop.time())
            await wait_event(self._load_wake, timeout, stop)

    @property
    def _rescan_s(self) -> float:
        return self._cluster.lease_s if self._cluster is not None else 0.0

    async def _route(self, stop: asyncio.Event) -> None:
        """Route the work stored here for portals owned elsewhere (Cluster.route); what is
        gathered when the stop comes is routed once more."""
        if self._cluster is None:
            return
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
                        return  # (their owners find them at their next look: see _load)
                    await wait_event(stop, outage.failed(exc, portals=len(work)))
                    continue
                outage.over()
            if stop.is_set():
                return
            await wait_event(self._route_wake, None, stop)

    # -- portals changing hands (the cluster's on_gained and on_lost) ----------------------------

    async def take_over(self, portals: set[int], previous: Mapping[int, str | None]) -> None:
        """Portals this instance now owns: reset the rows left claimed for them (by a previous
        owner that died, say; not those this process holds), counted as sent now; load their
        queues with work, with their rate log; seed their budget with the previous owner's
        recent requests; and run them. Idempotent (the cluster calls it again if it raised)."""
        ids = sorted(portals)
        for p in ids:
            self._unfinished.setdefault(p, previous.get(p))  # (a retry keeps the first's)
        before = {p: self._unfinished[p] for p in ids}
        me = self._cluster.id if self._cluster is not None else None
        # Portals another may have sent for since this instance last owned them (if ever):
        # what is known here of their queues and budget misses those sends.
        foreign = [p for p in ids if before[p] is None or before[p] != me]
        now = self.clock()
        if self._recover_all or any(owner is not None for owner in before.values()):
            held = sorted(self._dispatcher.held_ids())
            for queue_id, n in (await self._repo.recover_claimed_of(ids, held)).items():
                self._owed[queue_id] = self._owed.get(queue_id, 0) + n
        rows = await self._repo.active_queues_of(ids)
        self._forget_queues_of(set(foreign))
        fresh = [row.id for row in rows if row.id not in self.queues]
        queues = [self._track(row) for row in rows]
        await self._replay([self.queues[i] for i in fresh], now)
        requests = await self._recent_requests(foreign)
        # (nothing below awaits: it all happens, or, if the above raised, none of it)
        reclaimed = self._charge_owed(now)
        for portal_id, instants in requests.items():
            self._dispatcher.seed_budget(portal_id, instants)
        for queue in queues:
            self._kick(queue, held=True)
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

    async def let_go(self, portals: set[int]) -> None:
        """Portals this instance no longer owns: their coroutines end, the rows their senders
        hold go back to pending, and it returns once their requests under way are answered
        and written, so that the next owner never sends a row again that is in flight here."""
        queues = [q for q in self.queues.values() if q.portal_id in portals]
        for queue in queues:
            self._ring(queue.id)  # (each sees its portal is not ours, and ends)
        for queue_id, release in list(self._releases.releases.items()):
            if release.portal_id in portals:
                del self._releases.releases[queue_id]
        rows = self._dispatcher.recall_portals(portals)
        tasks = [t for q in queues if (t := self._tasks.get(q.id)) is not None]
        if tasks:
            await asyncio.wait(tasks)  # (rows a claim under way brings in go back with it)
        await self.give_back(rows)
        await self._dispatcher.settle_portals(portals)
        log.info("portals_let_go", portals=len(portals), returned=len(rows), queues=len(tasks))

    def _forget_queues_of(self, portals: set[int]) -> None:
        """Forget the idle queues of these portals: loaded again when they get work, with
        their rate log (a queue with a coroutine stays: its portal was ours all along)."""
        for queue_id in [q.id for q in self.queues.values() if q.portal_id in portals]:
            if queue_id not in self._signals:
                del self.queues[queue_id]

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
            queue = self.queues.get(queue_id)
            if queue is not None:
                queue.limiter.record(now, n)
        return sum(owed.values())

    # -- running ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run queue coroutines until stopped; then let them finish their step and end."""
        claims_stop = asyncio.Event()
        async with asyncio.TaskGroup() as services:
            services.create_task(self.claimer.run(claims_stop), name="claimer")
            services.create_task(self._releases.run(stop), name="releases")
            services.create_task(self._load(stop), name="queue-loader")
            services.create_task(self._route(stop), name="intake-router")
            try:
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    for queue_id, signals in list(self._signals.items()):
                        self._spawn(self.queues[queue_id], signals)
                    await stop.wait()
                    self._stop()
            finally:
                self._group = None
                self._stop()
                claims_stop.set()

    def _stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)
        for signals in self._signals.values():
            signals.alarm.ring()


def _safe_policy(row: QueueRow) -> tuple[rates.RatePolicy | None, str | None]:
    """(policy, None), or (None, why) when the stored policy cannot be read: that queue is
    held, never the daemon stopped. An unreadable override falls back to the stored policy."""
    policy, fault, override_error = safe_policy(row.policy, row.override)
    if override_error is not None:
        log.error("queue_override_invalid", queue=row.key, error=override_error)
    return policy, fault
