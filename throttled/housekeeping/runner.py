"""The housekeeping runner: every job on its own interval, in one task, riding out outages.

Each job is a module with `run_once(runtime) -> counts` (what it did: rows expired, deleted,
released...). The runner logs a line for a run that did something and adds the counts to
`throttled_housekeeping_total{what="job.count"}`. A database outage is one outage for all the
jobs (they share the database): one warning when it starts, longer and longer waits (up to
30 s) between tries, one line when it is over. The task keeps the name `maintenance`, and the
warning `maintenance_failed`, that it had before the jobs got their own modules, so log
queries and alerts built on them keep working.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from throttled import metrics
from throttled.aio import Outage, wait_event
from throttled.db.repository import DatabaseError

if TYPE_CHECKING:
    from throttled.daemon import Runtime

log = structlog.get_logger(__name__)

Counts = dict[str, int]
RunOnce = Callable[["Runtime"], Awaitable[Counts]]

FIRST_RUN_MAX_S = 5.0  # a job first runs this long after start at most (sooner if its interval is)
MAX_BATCHES = 200  # statements per job run: a huge backlog is worked off over several runs

HOUSEKEEPING = metrics.Counter(
    "throttled_housekeeping_total",
    "What housekeeping did (rows expired, deleted, pruned or released), by job.count.",
    "what",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    """One housekeeping job and how often it runs."""

    name: str
    interval_s: float
    run_once: RunOnce


async def in_batches(step: Callable[[], Awaitable[int]], size: int) -> int:
    """Run `step` (one short statement, at most `size` rows) until a batch comes back short,
    or MAX_BATCHES; return the rows in all."""
    total = 0
    for _ in range(MAX_BATCHES):
        n = await step()
        total += n
        if n < size:
            break
    return total


async def run_job(job: Job, runtime: Runtime) -> Counts:
    """Run a job once; log and count what it did. DatabaseError propagates."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    counts = await job.run_once(runtime)
    for key, n in counts.items():
        if n:
            HOUSEKEEPING.inc(n, what=f"{job.name}.{key}")
    seconds = round(loop.time() - started, 3)
    if any(counts.values()):
        log.info("housekeeping_done", job=job.name, seconds=seconds, **counts)
    else:
        log.debug("housekeeping_done", job=job.name, seconds=seconds)
    return counts


async def run(runtime: Runtime, stop: asyncio.Event, jobs: list[Job]) -> None:
    """Run the jobs, each on its own interval, until `stop`."""
    loop = asyncio.get_running_loop()
    outage = Outage("maintenance", "maintenance_failed")
    start = loop.time()
    due = {job.name: start + min(FIRST_RUN_MAX_S, job.interval_s) for job in jobs}
    failing: str | None = None  # the job that failed last, in the outage under way
    while not stop.is_set():
        now = loop.time()
        ready = [job for job in jobs if due[job.name] <= now]
        if not ready:
            await wait_event(stop, min(due.values()) - now)
            continue
        for job in ready:
            if stop.is_set():
                return
            try:
                await run_job(job, runtime)
            except DatabaseError as exc:
                retry_at = loop.time() + outage.failed(exc, job=job.name)
                due = {name: max(at, retry_at) for name, at in due.items()}
                failing = job.name
                break
            # The outage is over once the job that failed last succeeds (another job that
            # succeeds meanwhile does not prove that one can: it would only warn again).
            if failing in (None, job.name):
                outage.over()
                failing = None
            due[job.name] = loop.time() + job.interval_s
