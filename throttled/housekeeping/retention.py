"""Retention: finished actions, the audit log and unfinished OAuth installs are deleted once
they are old enough, in batches of `retention.batch_size` rows, each its own short statement
(no long lock on the table).

Done actions go after `retention.done_days`, failed and expired ones after
`retention.failed_days` (both default to `retention.days`, 30). A sent row is also the rate
log: none is deleted while a queue's window may still count it, whatever the configuration
says (a restart would forget the send, and burst).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from throttled.housekeeping.rate_log import longest_window
from throttled.housekeeping.runner import Counts, in_batches

if TYPE_CHECKING:
    from throttled.daemon import Runtime


async def run_once(runtime: Runtime) -> Counts:
    """Delete what is past its retention."""
    repo, retention = runtime.repo, runtime.config.retention
    size = retention.batch_size
    now = datetime.now(UTC)
    window = timedelta(seconds=await longest_window(runtime))
    done_before = now - max(timedelta(days=retention.done_after_days()), window)
    failed_before = now - max(timedelta(days=retention.failed_after_days()), window)
    audit_before = now - timedelta(days=retention.audit_days)
    actions = await in_batches(lambda: repo.delete_finished(done_before, failed_before, size), size)
    audit = await in_batches(lambda: repo.delete_old_audit(audit_before, size), size)
    states = await repo.delete_expired_oauth_states(now)  # (installs started, never finished)
    return {"actions": actions, "audit": audit, "oauth_states": states}
