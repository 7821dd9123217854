"""What became of one completion request's rows, and the helpers that decide it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from throttled import metrics
from throttled.db.repository import ClaimedAction, Retry
from throttled.queues import QueueState

log = structlog.get_logger(__name__)

_R = TypeVar("_R")
Rows = Sequence[tuple[QueueState, ClaimedAction]]


@dataclass(slots=True)
class Outcome:
    """Rows of one request, with where they go next."""

    done: list[tuple[ClaimedAction, float]] = field(default_factory=list)
    retry: list[tuple[QueueState, Retry]] = field(default_factory=list)
    failed: list[tuple[ClaimedAction, str, float | None]] = field(default_factory=list)
    sends: list[tuple[int, float, int]] = field(default_factory=list)


async def shielded(write: Coroutine[Any, Any, _R]) -> _R:
    """Await a final database write that a cancellation must not cut short. If the caller
    is cancelled (a shutdown past its deadline), the write goes on, and its outcome is still
    collected, so a failure is logged by the write, never as 'exception never retrieved'."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_collect)
        raise


def _collect(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def utc(ts: float) -> datetime:
    """A POSIX instant as an aware datetime."""
    return datetime.fromtimestamp(ts, UTC)


# What a request's retried rows are counted as, by its status (others: "retry").
_RETRIED = {429: "rate_limited", 401: "unauthorized", 400: "bisected"}


def count(portal_id: int, status: int, outcome: Outcome) -> None:
    """Count a request's callbacks by portal and outcome (and a 429)."""
    portal = metrics.portal_label(portal_id)
    if status == 429:
        metrics.RATE_LIMITED.inc(portal=portal)
    for name, n in (
        ("completed", len(outcome.done)),
        ("rejected" if status == 400 else "failed", len(outcome.failed)),
        (_RETRIED.get(status, "retry"), len(outcome.retry)),
    ):
        if n:
            metrics.COMPLETIONS.inc(n, portal=portal, outcome=name)


def run_length(rows: Iterable[ClaimedAction], group: int | None) -> int:
    """How many leading rows belong to the request's split group."""
    n = 0
    for row in rows:
        if row.split_group != group:
            break
        n += 1
    return n


def sends(rows: Rows, at: float) -> list[tuple[int, float, int]]:
    """The rate-log entries of a request: (queue id, sent at, rows) per queue."""
    counts: dict[int, int] = {}
    for queue, _ in rows:
        if queue.complete_as is None:  # (a release is not held to, nor charged to, the rate)
            counts[queue.id] = counts.get(queue.id, 0) + 1
    return [(qid, at, n) for qid, n in counts.items()]


def retry_all(
    rows: Sequence[tuple[QueueState, ClaimedAction]],
    at: float,
    not_before: float,
    reason: str,
    *,
    counted: bool,
    sent: bool,
) -> Outcome:
    retries = [
        (
            q,
            Retry(
                id=r.id,
                not_before=utc(not_before),
                error=reason,
                counted=counted,
                split_group=r.split_group,
            ),
        )
        for q, r in rows
    ]
    return Outcome(retry=retries, sends=sends(rows, at) if sent else [])


def bisect(
    rows: Sequence[tuple[QueueState, ClaimedAction]],
    at: float,
    reason: str,
    new_group: Callable[[], int],
) -> Outcome:
    """A rejected batch is split in two; each half is retried on its own to find the bad rows."""
    half = len(rows) // 2
    outcome = Outcome(sends=sends(rows, at))
    for part in (rows[:half], rows[half:]):
        group = new_group()
        for q, r in part:
            outcome.retry.append(
                (
                    q,
                    Retry(
                        id=r.id,
                        not_before=None,
                        error=f"400 {reason}",
                        counted=False,
                        split_group=group,
                    ),
                )
            )
    log.info("batch_bisected", rows=len(rows), reason=reason)
    return outcome
