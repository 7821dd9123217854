"""The supervisor: one coroutine per queue with work, spawned when it gains work.

Who owns what:
- The supervisor owns the set of queues it knows (`queues`: identity, policy, limiter,
  paused) and the set of running queue coroutines (their Signals). An idle queue has no
  coroutine and costs nothing but its entry; `forget_idle` drops the entries of idle queues
  whose rate log no longer counts (work arriving for one loads it again from the database
  with its rate log, as at start). Not scheduled yet: see its docstring.
- A queue's coroutine (queue_loop.drain_queue) owns its progress, as locals: when it wakes,
  what it claims, whether rows may wait out a backoff.
- The claimer owns the claim statements under way; a portal's sender owns the rows handed to
  it until they have gone out (the future put() returns); the result writer owns outcomes not
  yet written; the limiter is charged by the sender, at the send instant.

Every task runs in a TaskGroup: a queue coroutine that raises anything but a database error
(which it waits out) is a bug, and stops the daemon.

With several instances (throttled/cluster.py), a queue runs only on the instance that owns its
portal (`owns`); what happens when a portal changes hands, and to work stored here for portals
owned elsewhere, is in drain/handover.py (`handover`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import structlog

from throttled import rates
from throttled.aio import Outage, in_steps, wait_event
from throttled.db.repository import (
    ClaimedAction,
    DatabaseError,
    DatabaseUnavailable,
    QueueRow,
    Repository,
)
from throttled.drain.claimer import Claimer
from throttled.drain.dispatcher import Dispatcher
from throttled.drain.handover import Handover, Leases
from throttled.drain.outcomes import shielded
from throttled.drain.queue_loop import SPAWN_SLICE, Signals, drain_queue
from throttled.drain.releases import Releases
from throttled.queues import QueueLimiter, QueueState, safe_policy

log = structlog.get_logger(__name__)

NEW_QUEUE_SLACK_S = 5.0  # a database clock running ahead of ours
FORGET_AFTER_S = 60.0  # an idle queue is forgotten this long after its rate log stops counting
FORGET_SLICE = 5_000  # queues looked at a loop step by forget_idle
MAX_LOAD_ATTEMPTS = 5  # a queue that cannot be loaded, tried this many times in a row


def _everywhere(portal_id: int) -> bool:
    return True


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
        self._load_failures: dict[int, int] = {}  # queue id -> loads that failed in a row
        self._load_wake = asyncio.Event()
        self._started_at = clock()
        self.handover = None if cluster is None else Handover(self, cluster, repo, dispatcher)
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

    def has_work(self, queue_id: int) -> bool:
        """Whether a queue has a coroutine (or is about to)."""
        return queue_id in self._signals

    async def forget_idle(self, now: float, after_s: float = FORGET_AFTER_S) -> int:
        """Forget the queues with nothing to do (no coroutine, no rows in a sender, not
        paused or releasing) whose last send left every window `after_s` ago, a slice a loop
        step; how many. Work for one later loads it again (notify: unknown), with its rate
        log from the database, which is then empty of it (or all but): the same state.
        Not run by housekeeping yet: run there, it once forgot a queue the deadline check had
        just reported at risk (its entry gone under `at_risk`), which is not understood."""
        quiet_at = now - after_s
        forgotten = 0
        async for queue in in_steps(list(self.queues.values()), FORGET_SLICE):
            if (
                queue.paused
                or queue.releasing
                or self.has_work(queue.id)
                or self._dispatcher.held_of(queue)
                or not queue.limiter.quiet_since(quiet_at)
                or self.queues.get(queue.id) is not queue  # (replaced meanwhile)
            ):
                continue
            del self.queues[queue.id]
            forgotten += 1
        return forgotten

    def task_of(self, queue_id: int) -> asyncio.Task[None] | None:
        """A queue's coroutine, if it has one now."""
        return self._tasks.get(queue_id)

    # -- events (synchronous, cheap) ------------------------------------------------------------

    def notify(self, queue_ids: Iterable[int], changed: Iterable[QueueRow] = ()) -> None:
        """New rows were committed for these queues; `changed` are queue rows intake just
        created or re-resolved. A queue created by this process has no rate log to replay,
        so it runs at once (no database round trip before its first claim)."""
        for row in changed:
            if row.id in self.queues or (
                row.created_at.timestamp() >= self._started_at + NEW_QUEUE_SLACK_S
            ):
                self.track(row)
            else:
                self._unknown.add(row.id)  # existed before: replay its recent sends first
        for queue_id in queue_ids:
            queue = self.queues.get(queue_id)
            if queue is None:
                self._unknown.add(queue_id)
            else:
                self.kick(queue, urgent=True)
                if self.handover is not None:
                    self.handover.note(queue)
        if self._unknown:
            self._load_wake.set()

    def retry_at(self, queue: QueueState, at: float) -> None:
        """Rows went back to pending, claimable from `at` (the result writer wrote them)."""
        if queue.complete_as is not None:
            self._releases.wake()  # a release: it looks again
            return
        live = self.queues.get(queue.id)
        if live is not None:
            self.kick(live, held=True)

    def wake(self, queue_id: int) -> None:
        """Look at a queue again now (its policy changed, or it has new work)."""
        queue = self.queues.get(queue_id)
        if queue is not None:
            self.kick(queue)

    def pause(self, queue_id: int) -> list[ClaimedAction]:
        """Pause a queue: its coroutine ends, and the rows its sender held are returned,
        unsent and still claimed (the caller releases them)."""
        queue = self.queues.get(queue_id)
        if queue is None:
            return []
        queue.paused = True
        self.ring(queue_id)
        return self._dispatcher.recall(queue)

    def resume(self, queue_id: int) -> None:
        """Resume a paused queue."""
        queue = self.queues.get(queue_id)
        if queue is not None:
            queue.paused = False
            self.kick(queue, urgent=True, held=True)

    def cancel(self, queue_id: int) -> None:
        """End a queue's coroutine now (its claimed rows go back: see Claimer.claim)."""
        task = self._tasks.get(queue_id)
        if task is not None:
            task.cancel()

    def ring(self, queue_id: int) -> None:
        """Wake a queue's coroutine, if it has one: it looks at its queue again (paused, its
        portal not owned here any more, the daemon stopping) before it goes on."""
        signals = self._signals.get(queue_id)
        if signals is not None:
            signals.alarm.ring()

    def kick(self, queue: QueueState, *, urgent: bool = False, held: bool = False) -> None:
        """A queue has (or may have) work: its coroutine looks again, or one is spawned (not
        for a paused queue, a portal owned elsewhere, or once stopped). `urgent`: its first
        claim takes the urgent lane; `held`: rows may be waiting out a backoff."""
        signals = self._signals.get(queue.id)
        if signals is not None:  # running: it looks again
            signals.more = True
            signals.held |= held
            signals.alarm.ring()
            return
        if queue.paused or self.stopped.done() or not self.owns(queue.portal_id):
            return
        if self.handover is not None and self.handover.defer(queue):
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
            queue = self.track(row)
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

    def track(self, row: QueueRow) -> QueueState:
        """Know a queue as its row says (identity, policy, override, paused, releasing)."""
        policy, fault = _safe_policy(row)
        queue = self.queues.get(row.id)
        if queue is None:
            queue = QueueState(
                id=row.id,
                key=row.key,
                portal_id=row.portal_id,
                limiter=QueueLimiter(policy, key=row.key),
                override=row.override,
            )
            self.queues[row.id] = queue
        else:
            queue.override = row.override
            if policy is not None:
                queue.limiter.set_policy(policy)
        queue.paused, queue.releasing = row.paused, row.releasing
        if row.releasing and self.owns(row.portal_id):
            self._releases.start(row, queue)
        if fault is not None:
            queue.limiter.hold(fault)
        return queue

    async def replay(self, queues: list[QueueState], now: float) -> None:
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
        and run them (the run-once step of the loader, for tests)."""
        ids, self._unknown = self._unknown, set()
        if not ids:
            return
        try:
            await self._load_queues(ids)
        except DatabaseUnavailable:
            self._unknown |= ids  # (asked again once the database answers)
            raise
        except DatabaseError as exc:
            if len(ids) == 1:
                self._load_failed(ids, exc)
                raise
            # One of them may not load (a statement error, not an outage): load them one by
            # one, so that it alone waits and the others run.
            failed: DatabaseError | None = None
            order = sorted(ids)
            for n, queue_id in enumerate(order):
                try:
                    await self._load_queues({queue_id})
                except DatabaseUnavailable:
                    self._unknown.update(order[n:])
                    raise
                except DatabaseError as one:
                    self._load_failed({queue_id}, one)
                    failed = one
            if failed is not None:
                raise failed from None
        for queue_id in ids:
            self._load_failures.pop(queue_id, None)

    def _load_failed(self, ids: set[int], exc: DatabaseError) -> None:
        """Queues that could not be loaded: asked again (after the loader's backoff), up to
        MAX_LOAD_ATTEMPTS times; then given up (the rescan of their portal's queues with
        work, every lease_s, brings them back)."""
        for queue_id in ids:
            n = self._load_failures[queue_id] = self._load_failures.get(queue_id, 0) + 1
            if n < MAX_LOAD_ATTEMPTS:
                self._unknown.add(queue_id)
            else:
                del self._load_failures[queue_id]
                log.error("queue_load_abandoned", queue_id=queue_id, attempts=n, error=str(exc))

    async def _load_queues(self, ids: set[int]) -> None:
        now = self.clock()
        fresh: list[QueueState] = []
        try:
            rows = await self._repo.get_queues(list(ids))
            fresh = [self.track(row) for row in rows if row.id not in self.queues]
            if fresh:
                await self.replay(fresh, now)
        except DatabaseError:
            # A queue whose rate log is not replayed yet must not claim: it is forgotten.
            for queue in fresh:
                self.queues.pop(queue.id, None)
            raise
        for row in rows:
            known = self.queues.get(row.id)
            if known is None:  # forgotten while this load awaited (another load's failure, a
                self._unknown.add(row.id)  # take-over's): loaded again, with its rate log
                self._load_wake.set()
                continue
            self.kick(known, urgent=True)
            if self.handover is not None:
                self.handover.note(known)

    async def _load(self, stop: asyncio.Event) -> None:
        outage = Outage("scheduler", "scheduler_db_error")
        while not stop.is_set():
            self._load_wake.clear()
            try:
                await self.load_once()
            except DatabaseError as exc:
                await wait_event(stop, outage.failed(exc))
                continue
            outage.over()
            await wait_event(self._load_wake, None, stop)

    # -- running ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run queue coroutines until stopped; then let them finish their step and end."""
        claims_stop = asyncio.Event()
        async with asyncio.TaskGroup() as services:
            services.create_task(self.claimer.run(claims_stop), name="claimer")
            services.create_task(self._releases.run(stop), name="releases")
            services.create_task(self._load(stop), name="queue-loader")
            if self.handover is not None:
                services.create_task(self.handover.route(stop), name="intake-router")
                services.create_task(self.handover.rescan(stop), name="portal-rescan")
            try:
                async with asyncio.TaskGroup() as group:
                    self._group = group
                    waiting = list(self._signals.items())
                    async for queue_id, signals in in_steps(waiting, SPAWN_SLICE):
                        if self._signals.get(queue_id) is signals and queue_id not in self._tasks:
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
