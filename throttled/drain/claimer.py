"""The claimer: queue coroutines that fall due together claim together, in one statement
(group commit, for claims).

A coroutine asks for `n` rows of its queue and awaits the future claim() returns. Asks
gather for a couple of milliseconds and go out as one statement, each future resolved with
its queue's rows. Two lanes, each with at most one statement under way: "bulk" for queues
with a backlog, and "urgent" (no gathering) for a queue's first claim after it woke from
idle, so the first action on an idle queue never waits behind a large bulk claim.

A statement that raised may have committed with its answer lost: its stamp is kept, and the
rows claimed under it go back to pending before the next claim (release_unanswered).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from throttled.aio import Outage, wait_event
from throttled.db.repository import ClaimedAction, DatabaseError, Repository
from throttled.drain.outcomes import shielded
from throttled.queues import QueueState

log = structlog.get_logger(__name__)

CLAIM_CHUNK = 1000  # queues per bulk statement: bounds how long one answer holds the loop
URGENT_CHUNK = 200  # queues per urgent statement
GATHER_S = 0.002  # let queues that fall due together claim together
ANSWER_SLICE = 100  # asks answered per loop step: each wakes a queue coroutine's hand-over


@dataclass(eq=False, slots=True)
class _Ask:
    queue: QueueState
    n: int
    rows: asyncio.Future[list[ClaimedAction]]


class _Lane:
    def __init__(self, name: str, chunk: int, gather_s: float) -> None:
        self.name = name
        self.chunk = chunk
        self.gather_s = gather_s
        self.asks: list[_Ask] = []
        self.wake = asyncio.Event()


def _claim_order(row: ClaimedAction) -> tuple[int, int]:
    return (-row.priority, row.id)


def _answer(asks: list[_Ask], by_queue: dict[int, list[ClaimedAction]]) -> list[int]:
    """Resolve these asks with their rows; the ids of rows whose asker is gone."""
    orphans: list[int] = []
    for ask in asks:
        got = by_queue.get(ask.queue.id) or []
        if len(got) > 1:
            got.sort(key=_claim_order)
        if ask.rows.done():  # its asker was cancelled while the statement ran
            orphans += [r.id for r in got]
        else:
            ask.rows.set_result(got)
    return orphans


def _ignore(queue_ids: Iterable[int]) -> None:
    """No one to tell (a claimer on its own, in a test)."""


class Claimer:
    """Claims rows for queue coroutines, many queues per statement."""

    def __init__(self, repo: Repository, *, gather_s: float = GATHER_S) -> None:
        self._repo = repo
        self._lanes = {
            "bulk": _Lane("bulk", CLAIM_CHUNK, gather_s),
            "urgent": _Lane("urgent", URGENT_CHUNK, 0.0),
        }
        self._unanswered: list[datetime] = []  # stamps of statements that raised
        self._last_stamp_us = 0
        self._outage = Outage("claimer", "scheduler_db_error")
        self.retry_in = 1.0  # how long an ask that failed waits (the outage's backoff)
        self.claims = 0  # statements answered
        # Told of queues whose rows went back to pending (an unanswered claim's).
        self.on_released: Callable[[Iterable[int]], None] = _ignore

    def claim(
        self, queue: QueueState, n: int, *, urgent: bool = False
    ) -> asyncio.Future[list[ClaimedAction]]:
        """Ask for up to `n` due rows of `queue`, by priority then age. The future raises
        DatabaseError if the statement failed (then wait `retry_in` before asking again). If
        the asker is cancelled while waiting, the rows claimed for it go back to pending."""
        rows: asyncio.Future[list[ClaimedAction]] = asyncio.get_running_loop().create_future()
        lane = self._lanes["urgent" if urgent else "bulk"]
        lane.asks.append(_Ask(queue, max(1, n), rows))
        lane.wake.set()
        return rows

    @property
    def asking(self) -> int:
        """Asks not answered yet."""
        return sum(len(lane.asks) for lane in self._lanes.values())

    async def run(self, stop: asyncio.Event) -> None:
        """Answer asks until stopped; asks left then get no rows."""
        try:
            async with asyncio.TaskGroup() as tg:
                for lane in self._lanes.values():
                    tg.create_task(self._run_lane(lane, stop), name=f"claim-{lane.name}")
        finally:
            for lane in self._lanes.values():
                for ask in lane.asks:
                    if not ask.rows.done():
                        ask.rows.set_result([])
                lane.asks.clear()

    async def _run_lane(self, lane: _Lane, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not lane.asks:
                lane.wake.clear()
                await wait_event(lane.wake, None, stop)
                continue
            if lane.gather_s:
                await asyncio.sleep(lane.gather_s)
            await self.claim_once(lane.name)

    async def claim_once(self, lane_name: str = "bulk") -> int:
        """Answer a lane's asks now, in statements of up to its chunk; how many asks were
        answered (the run-once step, for tests). A database error is handed to the asks."""
        lane = self._lanes[lane_name]
        answered = 0
        while lane.asks:
            asks, lane.asks = lane.asks[: lane.chunk], lane.asks[lane.chunk :]
            asks = [a for a in asks if not a.rows.done()]  # (an asker cancelled meanwhile)
            if not asks:
                continue
            try:
                await self._claim(asks)
            except DatabaseError as exc:
                self.retry_in = self._outage.failed(exc, queues=len(asks))
                for ask in asks:
                    if not ask.rows.done():
                        ask.rows.set_exception(exc)
                        ask.rows.exception()  # (retrieved: the asker may be gone)
                return answered
            self._outage.over()
            answered += len(asks)
        return answered

    def stamp(self) -> datetime:
        """A claim's unique claimed_at (microseconds, increasing in this process)."""
        now_us = int(time.time() * 1_000_000)
        self._last_stamp_us = max(now_us, self._last_stamp_us + 1)
        return datetime.fromtimestamp(self._last_stamp_us / 1_000_000, UTC)

    def unanswered(self, stamp: datetime) -> None:
        """A statement stamped `stamp` raised: it may have committed. Its rows go back to
        pending before the next claim."""
        self._unanswered.append(stamp)

    async def release_unanswered(self) -> None:
        """Rows claimed by a statement whose answer was lost go back to pending (else they
        would stay claimed, unsent, until a restart or their deadline)."""
        if not self._unanswered:
            return
        stamps = list(self._unanswered)
        queue_ids = await self._repo.release_unanswered(stamps)
        del self._unanswered[: len(stamps)]
        if queue_ids:
            log.warning("unanswered_claims_released", rows=len(queue_ids), claims=len(stamps))
            self.on_released(set(queue_ids))

    async def _claim(self, asks: list[_Ask]) -> None:
        await self.release_unanswered()
        stamp = self.stamp()
        try:
            rows = await self._repo.claim([a.queue.id for a in asks], [a.n for a in asks], stamp)
        except DatabaseError:
            self.unanswered(stamp)
            raise
        self.claims += 1
        by_queue: dict[int, list[ClaimedAction]] = defaultdict(list)
        for row in rows:
            by_queue[row.queue_id].append(row)
        orphans: list[int] = []
        answered = 0
        try:
            # A slice of the asks per loop step: each answer's hand-over runs in the next
            # step, and a thousand of them in one step would hold the loop (intake, the
            # senders' timers) for tens of milliseconds.
            while answered < len(asks):
                if answered:
                    await asyncio.sleep(0)
                part = asks[answered : answered + ANSWER_SLICE]
                answered += len(part)
                orphans += _answer(part, by_queue)
        finally:
            orphans += _answer(asks[answered:], by_queue)  # (cancelled: none left unheld)
        if orphans:
            try:
                await shielded(self._repo.release(orphans))
            except DatabaseError as exc:  # they stay claimed: the stale-claim job frees them
                log.warning("orphan_claims_not_released", rows=len(orphans), error=str(exc))
