"""Housekeeping: the jobs that keep the database tidy, one module each, run by `runner`.

- `expiry`: pending actions past their block expiration become `expired`.
- `stale_claims`: claimed rows no sender of this process holds, left by a crash or a lost
  release, go back to pending.
- `retention`: done, failed and expired actions, the audit log and unfinished OAuth installs
  are deleted after their retention, in small batches.
- `rate_log`: rate-log entries no queue's window can still see are pruned.
- `deadlines`: queues whose backlog will not drain before its block expiration (the
  scheduler's `at_risk`, which the health monitor alerts on).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from throttled.config import Config
from throttled.housekeeping import deadlines, expiry, rate_log, retention, runner, stale_claims
from throttled.housekeeping.runner import Counts, Job

if TYPE_CHECKING:
    from throttled.daemon import Runtime


def default_jobs(config: Config) -> list[Job]:
    """The daemon's jobs with their configured intervals, in the order a full pass runs them."""
    r = config.retention
    return [
        Job(name="expiry", interval_s=r.expire_interval_s, run_once=expiry.run_once),
        Job(
            name="stale_claims", interval_s=r.stale_claim_interval_s, run_once=stale_claims.run_once
        ),
        Job(name="retention", interval_s=r.interval_s, run_once=retention.run_once),
        Job(name="rate_log", interval_s=r.prune_interval_s, run_once=rate_log.run_once),
        Job(name="deadlines", interval_s=r.deadline_interval_s, run_once=deadlines.run_once),
    ]


async def run(runtime: Runtime, stop: asyncio.Event) -> None:
    """Run every job on its own interval until `stop` (the daemon's `maintenance` task)."""
    await runner.run(runtime, stop, default_jobs(runtime.config))


async def maintain_once(runtime: Runtime, *, full: bool = True) -> dict[str, Counts]:
    """One pass, job by job (tests call it): expiry only, or with `full` every job. Returns
    each job's counts."""
    jobs = default_jobs(runtime.config)
    return {job.name: await runner.run_job(job, runtime) for job in (jobs if full else jobs[:1])}
