"""Rate-log pruning: entries of `queue_sends` (failed sends, which count against a queue's
rate) that no queue's window can still see are deleted. Sent actions are the rest of the rate
log; `retention` keeps them for as long as a window may count them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from throttled.housekeeping.runner import Counts

if TYPE_CHECKING:
    from throttled.daemon import Runtime

MIN_WINDOW_S = 86_400.0  # kept at least a day, whatever the policies


async def longest_window(runtime: Runtime) -> float:
    """The longest rate window any queue may have, stored or tracked (seconds)."""
    queues = runtime.scheduler.queues.values()
    tracked = max((q.limiter.policy.period_s for q in queues), default=0.0)  # (before an await)
    return max(await runtime.repo.longest_period(), tracked, MIN_WINDOW_S)


async def run_once(runtime: Runtime) -> Counts:
    """Delete the entries older than the longest window (one statement: the table holds
    failed sends only, and is indexed by time)."""
    before = datetime.now(UTC) - timedelta(seconds=await longest_window(runtime))
    return {"pruned": await runtime.repo.prune_sends(before)}
