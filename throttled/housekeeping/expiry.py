"""Expiry: pending actions past their block expiration become `expired` (HubSpot has given
up on them; sending them would be pointless). Rows claimed by a sender are the sender's: it
expires them itself (see sender.Dispatcher.expire)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from throttled import metrics
from throttled.housekeeping.runner import Counts, in_batches

if TYPE_CHECKING:
    from throttled.daemon import Runtime

log = structlog.get_logger(__name__)


async def run_once(runtime: Runtime) -> Counts:
    """Mark every overdue pending row expired, batch_size rows per statement."""
    size = runtime.config.retention.batch_size
    queues: set[int] = set()

    async def batch() -> int:
        expired = await runtime.repo.expire_due(size)
        queues.update(expired)
        return len(expired)

    total = await in_batches(batch, size)
    if total:
        metrics.EXPIRED.inc(total)
        log.warning("actions_expired", count=total, queues=len(queues))
    return {"expired": total}
