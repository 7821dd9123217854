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
    return max(1, len(queue.limiter.plan(slot, horizon_s + 1e-9, MAX_CLAIM_ROWS)))


async def drain_queue(queue: QueueState, signals: Signals, drain: Drain) -> None:
    """Claim the queue's rows as its limiter's slots come, hand them to its portal's sender
    and wait until they have gone out; return when none is left (or the queue is paused, its
    portal is not ours, or the daemon stops). Database errors are waited out, with backoff."""
    urgent = signals.urgent
    maybe_held = signals.held  # some rows may wait out a retry backoff
    alarm = signals.alarm
    while not drain.stopped.done() and not queue.paused and drain.owns(queue.portal_id):
        now = drain.clock()
        slot = queue.limiter.earliest(now)
        if slot == math.inf:
            return  # held (an unreadable policy), or closed for good: a change wakes it
        if slot - drain.lookahead_s > now:
            await alarm.sleep(slot - drain.lookahead_s - now)
            continue  # (rung or not, the slot is looked up again: the policy may have moved)
        want = wanted(queue, slot, drain.horizon_s)
        signals.more = False
        maybe_held |= signals.held
        signals.held = False
        try:
            rows = await drain.claimer.claim(queue, want, urgent=urgent)
        except DatabaseError:
            await _wait_out(drain, alarm, drain.claimer.retry_in)
            continue
        if queue.paused or not drain.owns(queue.portal_id):
            await drain.give_back(rows)  # paused (or the portal lost) while it claimed
            return
        if rows:  # then wait until they have gone out (or the stop)
            gone = drain.hand_over(queue, rows, slot, urgent=urgent)
            while not gone.done() and not drain.stopped.done():
                await alarm.until(gone)
        urgent = False
        if len(rows) >= want or signals.more:
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
