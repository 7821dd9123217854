"""Deadline checks: queues whose backlog will not drain before the newest action's block
expiration, at the queue's rate. They are the scheduler's `at_risk` set (the
`throttled_queues_past_deadline` gauge, the queue listing's `at_risk`, and the health
monitor's `queue_at_risk` alert)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from throttled import rates
from throttled.housekeeping.runner import Counts

if TYPE_CHECKING:
    from throttled.daemon import Runtime

log = structlog.get_logger(__name__)


async def run_once(runtime: Runtime) -> Counts:
    """Recompute the at-risk set; warn about the queues new in it."""
    now = time.time()
    at_risk: set[int] = set()
    newly: list[dict[str, object]] = []
    for n, (queue_id, pending, latest_deadline) in enumerate(await runtime.repo.pending_by_queue()):
        if n % 100 == 99:
            await asyncio.sleep(0)  # a schedule's estimate costs ~1 ms: let the loop breathe
        queue = runtime.scheduler.queues.get(queue_id)
        if queue is None:
            continue
        eta = queue.limiter.backlog_eta(now, pending)
        if eta > latest_deadline.timestamp():
            at_risk.add(queue_id)
            if queue_id not in runtime.scheduler.at_risk:
                newly.append(
                    {
                        "queue": queue.key,
                        "pending": pending,
                        "drains_at": rates.iso_instant(eta),
                        "deadline": latest_deadline.isoformat(),
                        "rate": queue.limiter.describe(),
                    }
                )
    runtime.scheduler.at_risk = at_risk
    # One line per check, whatever the number of queues: a sample names the worst cases.
    if newly:
        log.warning(
            "queue_backlog_past_deadline",
            queues=len(newly),
            at_risk_total=len(at_risk),
            sample=newly[:5],
        )
    return {"newly_at_risk": len(newly)}
