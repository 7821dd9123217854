"""Stale claims: rows left `claimed` that nobody will send or release go back to pending.

A claimed row is normally in this process's hands: waiting in a portal sender for its slot
(possibly for a long time: until its deadline, when its queue is held), in a request under
way, or sent with its outcome not written yet (kept through a database outage). Releasing
such a row would send it twice. Rows can be left behind, though: by a process that crashed
(start-up recovery releases those, but only at start), or when a release of rows this
process dropped (a queue paused mid-claim, say) failed with the database.

The rule: a row is released when it is claimed, was claimed more than STALE_AFTER_S ago, and
is not among the rows the dispatcher holds (`Dispatcher.held_ids()`, which covers senders,
requests under way, unwritten outcomes and rows being marked expired). The age bound covers
the short hand-offs in which a claimed row is in nobody's set: from a claim statement to the
sender, and while an operator change has taken rows back from a sender (those run under the
steering lock, which this job holds too). Each hand-off lasts at most a statement or two (the
pool's command timeout is 60 s); ten minutes is far beyond that.

Only rows of the portals this instance owns (its portal leases, throttled/cluster.py) are
looked at: another live instance's claimed rows are in its hands, not stale. (Rows left
claimed by an instance that died are reset by whoever takes its portals over: see
Handover.take_over in drain/handover.py.) Released rows are charged to their queue's rate as
sent now (they may have gone out before a crash), so a release never bursts.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from throttled.housekeeping.runner import Counts, in_batches

if TYPE_CHECKING:
    from throttled.daemon import Runtime

log = structlog.get_logger(__name__)

STALE_AFTER_S = 600.0


async def run_once(runtime: Runtime, *, stale_after_s: float = STALE_AFTER_S) -> Counts:
    """Release the stale claims (see the module's rule)."""
    size = runtime.config.retention.batch_size
    before = datetime.now(UTC) - timedelta(seconds=stale_after_s)
    released: dict[int, int] = {}

    portals = sorted(runtime.cluster.owned)
    if not portals:
        return {"released": 0}

    async def batch() -> int:
        found = await runtime.repo.release_stale_claims(before, held, size, portals)
        for queue_id, n in found.items():
            released[queue_id] = released.get(queue_id, 0) + n
        return sum(found.values())

    async with runtime.services.steering.lock:  # (no operator change has rows in its hands)
        held = sorted(runtime.dispatcher.held_ids())
        total = await in_batches(batch, size)
    if total:
        _charge(runtime, released)
        log.warning("stale_claims_released", rows=total, queues=len(released))
    return {"released": total}


def _charge(runtime: Runtime, released: dict[int, int]) -> None:
    """Count the rows as sent now, and have the scheduler claim them again."""
    now = runtime.services.clock()
    for queue_id, n in released.items():
        queue = runtime.scheduler.queues.get(queue_id)
        if queue is not None:
            queue.limiter.record(now, n)
    runtime.scheduler.notify(list(released))
