"""Idle queues: a queue with nothing to do whose rate log no longer counts is forgotten, so
memory holds the queues in use, not every queue ever seen (Supervisor.forget_idle)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from throttled.housekeeping.runner import Counts

if TYPE_CHECKING:
    from throttled.daemon import Runtime

INTERVAL_S = 60.0


async def run_once(runtime: Runtime) -> Counts:
    """Forget the idle queues (no database work: the supervisor's own state)."""
    scheduler = runtime.scheduler
    return {"forgotten": await scheduler.forget_idle(scheduler.clock())}
