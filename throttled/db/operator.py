"""The operator's queries (queue listings and steering, the change counter): a part of
Repository kept in its own module. Every value read is bounded as in queries.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from throttled.db.queries import _readable

CHANNEL = "throttled_changes"  # LISTEN/NOTIFY: what another instance changed

_QUEUE = f"""
SELECT q.id, left(q.key, 400) AS key, q.portal_id, q.policy, q.override, q.action_id, q.inputs,
       {_readable("q.paused_at", nullable=True)} AS paused_at, q.releasing,
       {_readable("q.created_at")} AS created_at, {_readable("q.updated_at")} AS updated_at
FROM queues q
"""

QUEUE_BY_ID = _QUEUE + "WHERE q.id = $1"
QUEUE_BY_KEY = _QUEUE + "WHERE q.key = $1"

# Queues for a listing: those of one portal, or all; the backlog comes from PENDING_STATS.
LIST_QUEUES = _QUEUE + "WHERE ($1::bigint IS NULL OR q.portal_id = $1)"

# Pending rows per queue, through the pending index (claimed rows are the senders': counted
# by the daemon from memory).
PENDING_STATS = f"""
SELECT queue_id, count(*)::int AS pending,
       count(*) FILTER (WHERE complete_as IS NOT NULL)::int AS released,
       {_readable("min(received_at)")} AS oldest_received,
       {_readable("min(deadline)")} AS oldest_deadline,
       {_readable("max(deadline)")} AS latest_deadline
FROM actions
WHERE state = 'pending' AND ($1::bigint[] IS NULL OR queue_id = ANY($1::bigint[]))
GROUP BY queue_id
"""

UNFINISHED_STATS = """
SELECT queue_id, count(*) FILTER (WHERE state = 'failed')::int AS failed,
       count(*) FILTER (WHERE state = 'expired')::int AS expired
FROM actions
WHERE state IN ('failed', 'expired') AND ($1::bigint[] IS NULL OR queue_id = ANY($1::bigint[]))
GROUP BY queue_id
"""

PAUSE = """
UPDATE queues SET paused_at = COALESCE(paused_at, now()), updated_at = now() WHERE id = $1
"""
RESUME = "UPDATE queues SET paused_at = NULL, updated_at = now() WHERE id = $1"
SET_OVERRIDE = "UPDATE queues SET override = $2, updated_at = now() WHERE id = $1"
SET_QUEUE_POLICY = "UPDATE queues SET policy = $2, updated_at = now() WHERE id = $1"

# Failed rows whose block has not expired go again, with a fresh count of attempts.
RETRY_FAILED = """
WITH r AS (
    UPDATE actions SET state = 'pending', not_before = NULL, attempts = 0, failures = 0,
        split_group = NULL, completed_at = NULL,
        last_error = left('retried by an operator after: ' || coalesce(last_error, ''), 500)
    WHERE queue_id = $1 AND state = 'failed' AND deadline > now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM r)::int AS retried,
       -- (the statement's snapshot is from before the update: every failed row)
       ((SELECT count(*) FROM actions WHERE queue_id = $1 AND state = 'failed')
        - (SELECT count(*) FROM r))::int AS left
"""

# Rows a sender held (claimed, unsent) join a release.
RELEASE_CLAIMED = """
UPDATE actions SET state = 'pending', complete_as = 'FAIL_CONTINUE', not_before = NULL
WHERE id = ANY($1::bigint[]) AND state = 'claimed'
"""

# Retried rows that were released stay released: the queue's release goes on.
RESUME_RELEASE = """
UPDATE queues q SET releasing = true WHERE q.id = $1 AND NOT q.releasing AND EXISTS (
    SELECT 1 FROM actions a
    WHERE a.queue_id = q.id AND a.state = 'pending' AND a.complete_as IS NOT NULL
)
"""

# Every pending row is released as FAIL_CONTINUE; the queue's release lane sends them.
FAIL_PENDING = """
WITH r AS (
    UPDATE actions SET complete_as = 'FAIL_CONTINUE', not_before = NULL
    WHERE queue_id = $1 AND state = 'pending' AND complete_as IS NULL
    RETURNING 1
), q AS (
    UPDATE queues SET releasing = true, updated_at = now() WHERE id = $1
)
SELECT count(*)::int AS released FROM r
"""

QUEUES_OF_ACTION = """
SELECT id, policy, inputs FROM queues WHERE portal_id = $1 AND action_id = $2 ORDER BY id
FOR UPDATE
"""

# The dashboard's recent failures: newest completion first, through one of the partial
# indexes on finished rows (actions_finished by time, or actions_unfinished_by_queue and a
# top-N sort when failures are few); the planner picks.
RECENT_FAILURES = f"""
SELECT left(a.callback_id, 255) AS callback_id, a.queue_id, left(q.key, 300) AS queue_key,
       a.portal_id, a.state, left(a.last_error, 500) AS last_error,
       {_readable("a.completed_at")} AS completed_at
FROM actions a LEFT JOIN queues q ON q.id = a.queue_id
WHERE a.state IN ('failed', 'expired') AND a.completed_at IS NOT NULL
ORDER BY a.completed_at DESC, a.id DESC LIMIT $1
"""

# Completions per minute over the last $1 minutes (the current one included, every minute
# present): a range scan of actions_finished. The minutes are the database's, as are the
# completion times.
_WINDOW = "date_trunc('minute', now()) - ($1::int - 1) * interval '1 minute'"
THROUGHPUT = f"""
WITH done AS (
    SELECT date_trunc('minute', completed_at) AS minute,
           count(*) FILTER (WHERE state = 'done')::int AS done,
           count(*) FILTER (WHERE state = 'failed')::int AS failed,
           count(*) FILTER (WHERE state = 'expired')::int AS expired
    FROM actions
    WHERE state IN ('done', 'failed', 'expired') AND completed_at >= {_WINDOW}
      AND completed_at < date_trunc('minute', now()) + interval '1 minute'
    GROUP BY 1
)
SELECT m.minute, coalesce(d.done, 0) AS done, coalesce(d.failed, 0) AS failed,
       coalesce(d.expired, 0) AS expired
FROM generate_series({_WINDOW}, date_trunc('minute', now()), interval '1 minute') AS m (minute)
LEFT JOIN done d ON d.minute = m.minute
ORDER BY m.minute
"""

# Actions completed (done) per queue over the same window: each queue's recent progress.
DONE_BY_QUEUE = f"""
SELECT queue_id, count(*)::int AS done FROM actions
WHERE state = 'done' AND completed_at >= {_WINDOW}
GROUP BY queue_id
"""

BUMP = "UPDATE change_counter SET version = version + 1 RETURNING version"
NOTIFY = "SELECT pg_notify($1, $2)"
CHANGE_VERSION = "SELECT version FROM change_counter"


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueDetail:
    """A queue's stored row, for operators."""

    id: int
    key: str
    portal_id: int
    policy: Any
    override: Any
    action_id: int | None
    inputs: Any
    paused_at: datetime | None
    releasing: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> QueueDetail:
        """Build from a _QUEUE row."""
        return cls(**dict(row))


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueStats:
    """A queue's rows that are not done: pending (released among them), failed, expired."""

    pending: int = 0
    released: int = 0
    oldest_received: datetime | None = None
    oldest_deadline: datetime | None = None
    latest_deadline: datetime | None = None
    failed: int = 0
    expired: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    """An action that finished without being completed: failed or expired."""

    callback_id: str
    queue_id: int
    queue_key: str | None
    portal_id: int
    state: str
    last_error: str | None
    completed_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Failure:
        """Build from a RECENT_FAILURES row."""
        return cls(**dict(row))


@dataclass(frozen=True, kw_only=True, slots=True)
class MinuteCount:
    """Completions in one minute, by how they ended."""

    minute: datetime
    done: int
    failed: int
    expired: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> MinuteCount:
        """Build from a THROUGHPUT row."""
        return cls(**dict(row))


class OperatorQueries:
    """Mixed into Repository: `_fetch` and `_execute` are its."""

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        raise NotImplementedError

    async def _execute(self, sql: str, *args: Any) -> str:
        raise NotImplementedError

    async def find_queue(self, ident: int | str) -> QueueDetail | None:
        """A queue by id, or by key."""
        sql = QUEUE_BY_ID if isinstance(ident, int) else QUEUE_BY_KEY
        rows = await self._fetch(sql, ident)
        return QueueDetail.from_row(rows[0]) if rows else None

    async def list_queues(self, portal_id: int | None) -> list[QueueDetail]:
        """Every queue (of one portal)."""
        return [QueueDetail.from_row(r) for r in await self._fetch(LIST_QUEUES, portal_id)]

    async def queue_stats(self, queue_ids: Sequence[int] | None) -> dict[int, QueueStats]:
        """Per queue (these, or every one that has any), rows not done."""
        ids = None if queue_ids is None else list(queue_ids)
        stats: dict[int, dict[str, Any]] = {}
        for row in await self._fetch(PENDING_STATS, ids):
            values = dict(row)
            stats[values.pop("queue_id")] = values
        for row in await self._fetch(UNFINISHED_STATS, ids):
            entry = stats.setdefault(row["queue_id"], {})
            entry.update(failed=row["failed"], expired=row["expired"])
        return {qid: QueueStats(**values) for qid, values in stats.items()}

    async def pause_queue(self, queue_id: int) -> None:
        """Hold a queue (kept across restarts)."""
        await self._execute(PAUSE, queue_id)

    async def resume_queue(self, queue_id: int) -> None:
        """End a hold."""
        await self._execute(RESUME, queue_id)

    async def set_override(self, queue_id: int, override: dict[str, Any] | None) -> None:
        """An operator's rate override (None removes it)."""
        await self._execute(SET_OVERRIDE, queue_id, override)

    async def set_queue_policy(self, queue_id: int, policy: dict[str, Any]) -> None:
        """A queue's policy re-resolved (its config changed)."""
        await self._execute(SET_QUEUE_POLICY, queue_id, policy)

    async def retry_failed(self, queue_id: int) -> tuple[int, int]:
        """Failed rows go back to pending: (retried, failed rows left: block expired)."""
        row = (await self._fetch(RETRY_FAILED, queue_id))[0]
        if row["retried"]:
            await self._execute(RESUME_RELEASE, queue_id)
        return row["retried"], row["left"]

    async def release_claimed(self, ids: Sequence[int]) -> int:
        """Claimed rows (taken back from a sender) join the release; how many."""
        status = await self._execute(RELEASE_CLAIMED, list(ids))
        return int(status.split()[-1])

    async def fail_pending(self, queue_id: int) -> int:
        """Release every pending row, to be completed FAIL_CONTINUE; how many."""
        return int((await self._fetch(FAIL_PENDING, queue_id))[0]["released"])

    async def queues_of_action(self, portal_id: int, action_id: int) -> list[asyncpg.Record]:
        """Queues whose latest intake came from this action definition (locked)."""
        return await self._fetch(QUEUES_OF_ACTION, portal_id, action_id)

    async def recent_failures(self, limit: int) -> list[Failure]:
        """The latest failed or expired actions, newest first."""
        return [Failure.from_row(r) for r in await self._fetch(RECENT_FAILURES, limit)]

    async def throughput(self, minutes: int) -> list[MinuteCount]:
        """Completions per minute over the last `minutes` (oldest first, every minute)."""
        return [MinuteCount.from_row(r) for r in await self._fetch(THROUGHPUT, minutes)]

    async def done_by_queue(self, minutes: int) -> dict[int, int]:
        """Actions completed per queue over the last `minutes`."""
        rows = await self._fetch(DONE_BY_QUEUE, minutes)
        return {r["queue_id"]: r["done"] for r in rows}

    async def announce(self, payload: dict[str, Any]) -> int:
        """Count a change and tell other instances (delivered at commit); the new version."""
        version = int((await self._fetch(BUMP))[0]["version"])
        text = json.dumps({"v": version, **payload}, separators=(",", ":"))
        if len(text) > 7000:  # NOTIFY's payload limit is 8000 bytes: "reload everything"
            text = json.dumps({"v": version, "all": True})
        await self._fetch(NOTIFY, CHANNEL, text)
        return version

    async def change_version(self) -> int:
        """The change counter (the backstop: another instance compares it)."""
        return int((await self._fetch(CHANGE_VERSION))[0]["version"])
