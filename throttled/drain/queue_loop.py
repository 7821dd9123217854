"""A queue's coroutine: its whole life while it has work, in one function.

The supervisor spawns it when the queue gains work and it returns when the queue has none
left (or is paused, or its portal is no longer this instance's). Its progress is its own
locals; what it shares with the supervisor is its Signals (a wake-up, and whether work came
in while it was busy).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from throttled.aio import Alarm
from throttled.db.repository import ClaimedAction, DatabaseError
from throttled.drain.claimer import Claimer
from throttled.queues import QueueState

MAX_CLAIM_ROWS = 1000  # rows per queue per claim
# Queue coroutines started (or kicked) per loop step when many start at once (ten thousand
# at start-up, a take-over): their first steps, all in one step, held the loop for 100 ms.
SPAWN_SLICE = 500


@dataclass(eq=False, slots=True)
class Signals:
    """What the supervisor tells a running queue coroutine."""

    alarm: Alarm = field(default_factory=Alarm)  # rung on new work, a change, or the stop
    more: bool = False  # work came in since its last claim was asked for
    held: bool = False  # rows of it went into a retry backoff since its last claim
    urgent: bool = False  # it woke from idle: its first claim takes the fast lane


class Drain(Protocol):
    """What a queue's coroutine uses of the supervisor."""

    clock: Callable[[], float]
    claimer: Claimer
    lookahead_s: float
    horizon_s: float
    stopped: asyncio.Future[None]

    def owns(self, portal_id: int) -> bool: ...

    def hand_over(
        self, queue: QueueState, rows: list[ClaimedAction], slot: float, *, urgent: bool
    ) -> asyncio.Future[None]: ...

    async def give_back(self, rows: list[ClaimedAction]) -> None: ...

    async def next_not_before(self, queue_id: int) -> datetime | None: ...


def wanted(queue: QueueState, slot: float, horizon_s: float) -> int:
    """Rows for the slots within the claim horizon (fewer, larger claims)."""
    return max(1, queue.limiter.count_within(slot, horizon_s + 1e-9, MAX_CLAIM_ROWS))


class _Handover:
    """A claim's answer, taken up as soon as it comes (a done-callback of the claim, before
    the coroutine wakes): its rows go to the portal's sender, and the coroutine, asleep since
    it asked, is woken once they have gone out (`gone`, the sender's future), or at once if
    none were handed over (none claimed, a database error, or paused meanwhile)."""

    __slots__ = ("alarm", "answered", "drain", "gone", "queue", "slot", "urgent")

    def __init__(self, queue: QueueState, alarm: Alarm, drain: Drain) -> None:
        self.queue = queue
        self.alarm = alarm
        self.drain = drain
        self.slot = 0.0
        self.urgent = False
        self.gone: asyncio.Future[None] | None = None
        self.answered = False  # this claim's answer was taken up (handed over, or not)

    def ask(self, n: int, slot: float, *, urgent: bool) -> asyncio.Future[list[ClaimedAction]]:
        """Ask for up to `n` rows, to go out from `slot`."""
        self.slot, self.urgent, self.gone, self.answered = slot, urgent, None, False
        claim = self.drain.claimer.claim(self.queue, n, urgent=urgent)
        claim.add_done_callback(self)
        return claim

    def __call__(self, claim: asyncio.Future[list[ClaimedAction]]) -> None:
        if self.answered or claim.cancelled():
            return
        self.answered = True
        if claim.exception() is None:
            queue, drain, rows = self.queue, self.drain, claim.result()
            if rows and not queue.paused and drain.owns(queue.portal_id):
                self.gone = drain.hand_over(queue, rows, self.slot, urgent=self.urgent)
                self.alarm.watch(self.gone)
                return
        self.alarm.ring()


async def drain_queue(queue: QueueState, signals: Signals, drain: Drain) -> None:
    """Claim the queue's rows as its limiter's slots come, hand them to its portal's sender
    and wait until they have gone out; return when none is left (or the queue is paused, its
    portal is not ours, or the daemon stops). Database errors are waited out, with backoff.

    A queue with a backlog costs one wake per claim: it asks, and sleeps while the answer
    goes to the sender without it, until its rows have gone; then, if its next slot is
    within the claim horizon, it claims again at once (the sender holds the rows to their
    slots), else it sleeps until the slot less the lookahead."""
    urgent = signals.urgent
    maybe_held = signals.held  # some rows may wait out a retry backoff
    alarm = signals.alarm
    handover = _Handover(queue, alarm, drain)
    ahead = drain.lookahead_s  # how long before its next slot it claims
    while not drain.stopped.done() and not queue.paused and drain.owns(queue.portal_id):
        now = drain.clock()
        slot = queue.limiter.earliest(now)
        if slot == math.inf:
            return  # held (an unreadable policy), or closed for good: a change wakes it
        if slot - ahead > now:
            ahead = drain.lookahead_s
            await alarm.sleep(slot - ahead - now)
            continue  # (rung or not, the slot is looked up again: the policy may have moved)
        ahead = drain.lookahead_s
        want = wanted(queue, slot, drain.horizon_s)
        signals.more = False
        maybe_held |= signals.held
        signals.held = False
        claim = handover.ask(want, slot, urgent=urgent)
        try:
            await alarm.sleep(None)  # (woken once its rows have gone, or rung)
            rows = await claim
            if not handover.answered:  # (rung, and woke before the claim's callback ran)
                claim.remove_done_callback(handover)
                handover(claim)
        except DatabaseError:
            await _wait_out(drain, alarm, drain.claimer.retry_in)
            continue
        except asyncio.CancelledError:
            claim.cancel()  # (if not answered yet, its rows go back: see Claimer.claim)
            raise
        gone = handover.gone
        if gone is None and rows:  # paused (or the portal lost) while it claimed
            await drain.give_back(rows)
            return
        while gone is not None and not gone.done() and not drain.stopped.done():
            await alarm.until(gone)
        urgent = False
        if len(rows) >= want or signals.more:
            ahead = max(drain.lookahead_s, drain.horizon_s)  # (its rows have gone: see above)
            continue
        if maybe_held or signals.held:
            try:
                at = await drain.next_not_before(queue.id)
            except DatabaseError:
                await _wait_out(drain, alarm, drain.claimer.retry_in)
                continue
            maybe_held = at is not None
            if at is not None:
                await alarm.sleep(at.timestamp() - drain.clock())
                continue
        if not signals.more and not signals.held:
            return


async def _wait_out(drain: Drain, alarm: Alarm, delay: float) -> None:
    """Sleep through a database failure's backoff; only the stop cuts it short (new work
    would only hammer a database that does not answer)."""
    until = drain.clock() + delay
    while not drain.stopped.done() and (left := until - drain.clock()) > 0:
        await alarm.sleep(left)
