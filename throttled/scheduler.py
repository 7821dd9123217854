"""The scheduler: decides when each active queue claims its next rows, and claims in bulk.

Idle queues cost nothing: a queue is tracked only while it may have claimable rows. Queues
that fall due together claim together, in one statement. A queue claims its next batch as
soon as the previous one has been dispatched and its limiter's next slot is within the
lookahead, so the rows are in memory when the slot opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import structlog

from throttled import rates
from throttled.aio import Outage, wait_event
from throttled.db.repository import ClaimedAction, DatabaseError, QueueRow, Repository
from throttled.queues import QueueLimiter, QueueState, release_of, safe_policy
from throttled.sender import Dispatcher, Hooks

log = structlog.get_logger(__name__)

CLAIM_CHUNK = 1000  # queues per claim statement: bounds how long one pass holds the loop
MAX_CLAIM_ROWS = 1000  # rows per queue per claim
GATHER_S = 0.002  # let queues that fall due together claim together
URGENT_CHUNK = 200  # queues per fast-lane claim
RELEASE_CHUNK = 500  # released rows (fail-pending) a queue hands its sender at a time
RELEASE_RECHECK_S = 1.0  # how often a release with rows in backoff looks again
FAIL_CONTINUE = "FAIL_CONTINUE"


class Scheduler(Hooks):
    """Tracks active queues in a timer heap and claims due ones in bulk."""

    def __init__(
        self,
        repo: Repository,
        dispatcher: Dispatcher,
        *,
        clock: Callable[[], float],
        lookahead_s: float,
        claim_ahead_s: float = 0.0,
    ) -> None:
        self._repo = repo
        self._dispatcher = dispatcher
        self._clock = clock
        self._lookahead_s = lookahead_s
        self._claim_ahead_s = claim_ahead_s
        # Two claim lanes: "bulk" claims backlog queues ahead of their slots; "urgent" claims
        # queues whose slot is already open (a new action on an idle queue), so those never
        # wait behind a large bulk claim.
        self._busy: dict[str, bool] = {"bulk": False, "urgent": False}
        self._fresh: dict[int, QueueState] = {}  # queues that just went from idle to active
        self._claim_tasks: set[asyncio.Task[None]] = set()
        self._claim_error: Exception | None = None  # re-raised by the loop
        self._unanswered: list[datetime] = []  # stamps of claims that raised (see _claim)
        self._last_stamp_us = 0
        self._outage = Outage("scheduler", "scheduler_db_error")
        self.queues: dict[int, QueueState] = {}
        self._heap: list[tuple[float, int, int]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._unknown: set[int] = set()
        self.claims = 0
        self._started_at = clock()
        self.at_risk: set[int] = set()  # queues whose backlog will outlive its deadline
        self.releases: dict[int, QueueState] = {}  # queue id -> its release (fail-pending)
        self._release_wake = asyncio.Event()
        dispatcher.hooks = self  # (its gauges are read by the daemon's Exporter)

    # -- events from ingest and the senders (synchronous, cheap) ----------------------------

    def notify(self, queue_ids: Iterable[int], changed: Iterable[QueueRow] = ()) -> None:
        """New rows were committed for these queues; `changed` are queue rows intake just
        created or re-resolved. A queue created by this process has no rate log to replay,
        so it is tracked at once (no database round trip before its first claim)."""
        now = self._clock()
        for row in changed:
            # (5 s of slack for a database clock running ahead of ours)
            if row.id in self.queues or row.created_at.timestamp() >= self._started_at + 5.0:
                self._track(row)
            else:
                self._unknown.add(row.id)  # existed before: replay its recent sends first
        for queue_id in queue_ids:
            queue = self.queues.get(queue_id)
            if queue is None:
                self._unknown.add(queue_id)
                continue
            queue.generation += 1
            if not queue.active and not queue.in_sender and not queue.claiming:
                self._fresh[queue.id] = queue  # was idle: its first claim takes the fast lane
            queue.active = True
            if not queue.in_sender:
                self._schedule(queue, self._claim_time(queue, now))
        self._wake.set()

    def dispatched(self, queue: QueueState) -> None:
        """The sender has sent everything it held for this queue: plan its next claim."""
        if queue.complete_as is not None:
            self._release_wake.set()
        elif queue.active:
            self._schedule(queue, self._claim_time(queue, self._clock()))
            self._wake.set()

    def retry_at(self, queue: QueueState, at: float) -> None:
        """Rows went back to pending, claimable from `at`."""
        if queue.complete_as is not None:  # a release: it looks again every second
            self._release_wake.set()
            return
        queue.held_until = at if queue.held_until is None else min(queue.held_until, at)
        queue.generation += 1
        queue.active = True
        self._schedule(queue, max(at, self._clock()))
        self._wake.set()

    # -- start-up ----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Load active queues and the rate log, so a restart does not burst."""
        now = self._clock()
        recovered = await self._repo.recover_claimed()
        rows = await self._repo.active_queues()
        for row in rows:
            queue = self._track(row)
            queue.active = True
            queue.held_until = now
        longest = max((q.limiter.policy.period_s for q in self.queues.values()), default=0.0)
        if longest:
            since = datetime.fromtimestamp(now - longest, UTC)
            for queue_id, sent_at, n in await self._repo.recent_sends(since):
                if queue_id in self.queues:
                    self.queues[queue_id].limiter.record(sent_at.timestamp(), n)
        for queue_id, n in recovered.items():
            # Claimed by a process that died: they may have gone out just before; count them now.
            if queue_id in self.queues:
                self.queues[queue_id].limiter.record(now, n)
        for queue in self.queues.values():
            self._schedule(queue, self._claim_time(queue, now))
        log.info("scheduler_recovered", active_queues=len(rows), reclaimed=sum(recovered.values()))

    # -- operator changes (this instance's, or another's through a notification) -----------

    async def refresh(self, queue_ids: Iterable[int]) -> None:
        """Queue rows an operator changed (rate override, pause, released or retried rows):
        take them up at once. A paused queue's rows held in a sender go back to pending."""
        ids = list(queue_ids)
        rows = await self._repo.get_queues(ids)
        recalled: list[int] = []
        for row in rows:
            if row.id in self.queues:
                queue = self._track(row)
                if queue.paused:
                    recalled += [r.id for r in self._dispatcher.recall(queue)]
            if row.releasing:
                self._start_release(row)
        if recalled:
            await self._repo.release(recalled)
        self.notify(ids)

    def recall(self, queue_id: int) -> list[ClaimedAction]:
        """Take back the rows this queue's sender holds, unsent (they are still claimed:
        the caller marks them, or gives them back)."""
        queue = self.queues.get(queue_id)
        return [] if queue is None else self._dispatcher.recall(queue)

    def give_back(self, queue_id: int, rows: list[ClaimedAction]) -> None:
        """Rows recall() took, handed to the sender again (the change that wanted them
        failed)."""
        queue = self.queues.get(queue_id)
        if queue is not None and rows:
            self._dispatcher.put(queue, rows, self._clock())

    async def refresh_active(self) -> None:
        """Track every queue with pending rows that is not tracked yet (rows written by
        another process: an import)."""
        rows = await self._repo.active_queues()
        self.notify([row.id for row in rows if row.id not in self.queues])

    async def refresh_releasing(self) -> None:
        """Take up every queue with released rows (another process released them)."""
        for row in await self._repo.releasing_queues():
            self._start_release(row)

    def _start_release(self, row: QueueRow) -> None:
        queue = self.queues.get(row.id)
        if row.id not in self.releases:
            owner = queue or QueueState(
                id=row.id,
                key=row.key,
                portal_id=row.portal_id,
                limiter=QueueLimiter(None, key=row.key),
                stored_policy=row.policy,
            )
            self.releases[row.id] = release_of(owner, FAIL_CONTINUE)
        self._release_wake.set()

    async def _release_loop(self, stop: asyncio.Event) -> None:
        """Hand released rows (fail-pending) to the senders, a chunk per queue at a time,
        until none is left; not held to the queue's rate or pause, only the portal's budget."""
        outage = Outage("release", "release_db_error")
        while not stop.is_set():
            self._release_wake.clear()
            try:
                await self._release_due()
            except DatabaseError as exc:
                await wait_event(stop, outage.failed(exc))
                continue
            outage.over()
            timeout = RELEASE_RECHECK_S if self.releases else None
            await wait_event(self._release_wake, timeout, stop)

    async def _release_due(self) -> None:
        if self._unanswered:
            await self._release_unanswered()
        for queue_id, release in list(self.releases.items()):
            if release.in_sender:
                continue
            stamp = self._stamp()
            try:
                rows = await self._repo.claim_released(queue_id, RELEASE_CHUNK, stamp)
            except DatabaseError:
                self._unanswered.append(stamp)
                raise
            if rows:
                self._dispatcher.put(release, rows, self._clock())
            elif await self._repo.end_release(queue_id):
                del self.releases[queue_id]
                if queue_id in self.queues:
                    self.queues[queue_id].releasing = False
                log.info("queue_release_done", queue=release.key, sent=release.sent)

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
        if row.releasing:
            self._start_release(row)
        if fault is not None:
            queue.limiter.hold(fault)
        return queue

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Claim due queues until stopped; up to `concurrent_claims` statements at once, so a
        new action on an idle queue never waits behind a large claim."""
        releases = asyncio.create_task(self._release_loop(stop), name="release")
        try:
            await self._loop(stop)
        finally:
            if not stop.is_set():  # the loop failed: the daemon stops (start-up recovers rows)
                releases.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await releases
            if self._claim_tasks:
                await asyncio.gather(*self._claim_tasks, return_exceptions=True)

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # Cleared before the pass, not after: a notify() that lands while the pass
            # awaits (loading new queues, say) keeps the event set, so it is not slept past.
            self._wake.clear()
            try:
                if self._claim_error is not None:
                    error, self._claim_error = self._claim_error, None
                    raise error
                await self._load_new()
                if self._start_due(self._clock()):
                    continue
            except DatabaseError as exc:  # the queues it concerned are tried again after
                await wait_event(stop, self._outage.failed(exc))
                continue
            timeout = self._heap[0][0] - self._clock() if self._heap else None
            if self._busy["bulk"]:
                timeout = None  # a new action (notify) or a finishing claim sets the wake event
            if timeout is None or timeout > 0:
                await wait_event(self._wake, timeout, stop)
            if not stop.is_set():
                await asyncio.sleep(GATHER_S)

    async def _load_new(self) -> None:
        ids = self._unknown
        if not ids:
            return
        self._unknown = set()
        now = self._clock()
        fresh: list[QueueRow] = []
        try:
            rows = await self._repo.get_queues(list(ids))
            fresh = [row for row in rows if row.id not in self.queues]
            for row in rows:
                queue = self._track(row)
                queue.generation += 1
                if not queue.active and not queue.in_sender and not queue.claiming:
                    self._fresh[queue.id] = queue
                queue.active = True
                if not queue.in_sender:
                    self._schedule(queue, self._claim_time(queue, now))
            if fresh:
                await self._replay_sends([self.queues[row.id] for row in fresh], now)
        except DatabaseError:
            # Asked again once the database answers, or their rows would wait for the next
            # action. A new queue whose rate log is not replayed yet must not claim: untracked.
            for row in fresh:
                self.queues.pop(row.id, None)
                self._fresh.pop(row.id, None)
            self._unknown |= ids
            raise
        self._outage.over()

    async def _replay_sends(self, queues: list[QueueState], now: float) -> None:
        """A queue first seen now may have sent recently (before a restart): replay its log."""
        longest = max(q.limiter.policy.period_s for q in queues)
        since = datetime.fromtimestamp(now - longest, UTC)
        for queue_id, sent_at, n in await self._repo.recent_sends_for(
            [q.id for q in queues], since
        ):
            self.queues[queue_id].limiter.record(sent_at.timestamp(), n)
        for queue in queues:
            if not queue.in_sender:
                self._schedule(queue, self._claim_time(queue, now))
                self._fresh[queue.id] = queue

    def _schedule(self, queue: QueueState, at: float) -> None:
        if at < queue.next_at:  # a later entry already in the heap is harmless: it re-checks
            queue.next_at = at
            heapq.heappush(self._heap, (at, next(self._seq), queue.id))

    def _claim_time(self, queue: QueueState, now: float) -> float:
        return queue.limiter.earliest(now) - self._lookahead_s

    def _pop_due(self, now: float, until: float, limit: int) -> list[tuple[QueueState, float, int]]:
        """Up to `limit` queues due by `until` with a slot within the lookahead."""
        due: dict[int, tuple[QueueState, float, int]] = {}
        while self._heap and self._heap[0][0] <= until and len(due) < limit:
            _, _, queue_id = heapq.heappop(self._heap)
            queue = self.queues.get(queue_id)
            if queue is None or queue_id in due:
                continue
            queue.next_at = float("inf")
            if not queue.active or queue.in_sender or queue.claiming or queue.paused:
                continue  # (a paused queue is scheduled again when it resumes)
            slot = queue.limiter.earliest(now)
            if slot - self._lookahead_s > now:
                if slot != float("inf"):
                    self._schedule(queue, slot - self._lookahead_s)
                continue
            want = self._wanted(queue, slot)
            if want > 0:
                due[queue_id] = (queue, slot, want)
        return list(due.values())

    def _wanted(self, queue: QueueState, slot: float) -> int:
        """Rows for the slots within the claim horizon (fewer, larger claims)."""
        horizon = max(self._lookahead_s, self._claim_ahead_s) + 1e-9
        planned = len(queue.limiter.plan(slot, horizon, MAX_CLAIM_ROWS))
        return max(1, planned)

    def _start_due(self, now: float) -> bool:
        """Start a claim in a free lane: queues that just woke up go first, in their own lane,
        so a new action on an idle queue never waits behind the backlog's claims."""
        if not self._busy["urgent"] and self._fresh:
            due = self._take_fresh(now)
            if due:
                self._start_claim(due, "urgent")
                return True
        if not self._busy["bulk"]:
            due = self._pop_due(now, now, CLAIM_CHUNK)
            if due:
                self._start_claim(due, "bulk")
                return True
        return False

    def _take_fresh(self, now: float) -> list[tuple[QueueState, float, int]]:
        due: list[tuple[QueueState, float, int]] = []
        while self._fresh and len(due) < URGENT_CHUNK:
            _, queue = self._fresh.popitem()
            if not queue.active or queue.in_sender or queue.claiming or queue.paused:
                continue
            slot = queue.limiter.earliest(now)
            if slot - self._lookahead_s <= now:
                due.append((queue, slot, self._wanted(queue, slot)))
        return due

    def _start_claim(self, due: list[tuple[QueueState, float, int]], lane: str) -> None:
        for queue, _, _ in due:
            queue.claiming = True
        self._busy[lane] = True
        task = asyncio.create_task(self._claim_task(due, lane), name=f"claim-{lane}")
        self._claim_tasks.add(task)
        task.add_done_callback(self._claim_tasks.discard)

    async def _claim_task(self, due: list[tuple[QueueState, float, int]], lane: str) -> None:
        try:
            await self._claim(due, urgent=lane == "urgent")
            self._outage.over()
        except DatabaseError as exc:
            self._claim_error = exc
            for queue, _, _ in due:  # try these again once the database answers
                self._schedule(queue, self._clock() + 1.0)
        except Exception as exc:  # a bug: stop the daemon (systemd restarts it) rather than hide it
            self._claim_error = exc
        finally:
            for queue, _, _ in due:
                queue.claiming = False
            self._busy[lane] = False
            self._wake.set()

    def _stamp(self) -> datetime:
        """A claim's unique claimed_at (microseconds, increasing in this process)."""
        now_us = int(time.time() * 1_000_000)
        self._last_stamp_us = max(now_us, self._last_stamp_us + 1)
        return datetime.fromtimestamp(self._last_stamp_us / 1_000_000, UTC)

    async def _release_unanswered(self) -> None:
        """Rows claimed by a statement whose answer was lost go back to pending (else they
        would stay claimed, unsent, until a restart or their deadline)."""
        stamps = list(self._unanswered)
        queue_ids = await self._repo.release_unanswered(stamps)
        del self._unanswered[: len(stamps)]
        if queue_ids:
            log.warning("unanswered_claims_released", rows=len(queue_ids), claims=len(stamps))
            self.notify(set(queue_ids))

    async def _claim(self, due: list[tuple[QueueState, float, int]], *, urgent: bool) -> None:
        if self._unanswered:
            await self._release_unanswered()
        for start in range(0, len(due), CLAIM_CHUNK):
            chunk = due[start : start + CLAIM_CHUNK]
            generations = {q.id: q.generation for q, _, _ in chunk}
            stamp = self._stamp()
            try:
                rows = await self._repo.claim(
                    [q.id for q, _, _ in chunk], [n for _, _, n in chunk], stamp
                )
            except DatabaseError:
                self._unanswered.append(stamp)  # it may have committed: look for it later
                raise
            self.claims += 1
            by_queue: dict[int, list[ClaimedAction]] = defaultdict(list)
            for row in rows:
                by_queue[row.queue_id].append(row)
            short: list[QueueState] = []
            paused = [r.id for q, _, _ in chunk if q.paused for r in by_queue.pop(q.id, ())]
            if paused:  # paused while the claim was under way: the rows wait, unsent
                await self._repo.release(paused)
            for queue, slot, want in chunk:
                if queue.paused:
                    continue
                got = sorted(by_queue.get(queue.id, ()), key=lambda r: (-r.priority, r.id))
                if got:
                    self._dispatcher.put(queue, got, slot, urgent=urgent)
                if len(got) < want and queue.generation == generations[queue.id]:
                    short.append(queue)
                elif not got:
                    self._schedule(queue, self._clock())
            await self._settle_short(short)

    async def _settle_short(self, short: list[QueueState]) -> None:
        """Queues that came back short are drained, unless rows wait out a retry backoff."""
        maybe_held = [q for q in short if q.held_until is not None]
        held = await self._repo.next_not_before([q.id for q in maybe_held]) if maybe_held else {}
        for queue in short:
            at = held.get(queue.id)
            queue.held_until = at.timestamp() if at is not None else None
            if at is not None:
                self._schedule(queue, max(at.timestamp(), self._clock()))
            else:
                queue.active = False


def _safe_policy(row: QueueRow) -> tuple[rates.RatePolicy | None, str | None]:
    """(policy, None), or (None, why) when the stored policy cannot be read: that queue is
    held, never the daemon stopped. An unreadable override falls back to the stored policy."""
    policy, fault, override_error = safe_policy(row.policy, row.override)
    if override_error is not None:
        log.error("queue_override_invalid", queue=row.key, error=override_error)
    return policy, fault
