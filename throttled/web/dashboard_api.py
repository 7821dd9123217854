"""What the dashboard reads besides queues and portals (admin token required): recent failures
(`GET /api/failures`) and completions per minute (`GET /api/throughput`)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from throttled.db.repository import DatabaseError
from throttled.web.services import SERVICES, error, storage_unavailable

FAILURES_DEFAULT, FAILURES_MAX = 20, 200
MINUTES_DEFAULT, MINUTES_MAX = 60, 1440  # (a day at most: a bounded range scan)
_DIGITS = re.compile(r"[0-9]{1,5}")


def _bounded(query: Any, name: str, default: int, largest: int) -> int | web.Response:
    """A query parameter that must be an integer 1..largest."""
    text = query.get(name, str(default))
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= largest:
        return error(400, f"invalid_{name}", f"{name} must be an integer 1..{largest}", field=name)
    return int(text)


async def list_failures(request: web.Request) -> web.Response:
    """GET /api/failures?limit=: the latest failed or expired actions, newest first."""
    limit = _bounded(request.query, "limit", FAILURES_DEFAULT, FAILURES_MAX)
    if isinstance(limit, web.Response):
        return limit
    services = request.app[SERVICES]
    try:
        rows = await services.repo.recent_failures(limit)
    except DatabaseError:
        return storage_unavailable(services)
    failures = [
        {
            "callback_id": r.callback_id,
            "queue_id": r.queue_id,
            "queue_key": r.queue_key,
            "portal_id": r.portal_id,
            "state": r.state,
            "last_error": r.last_error,
            "completed_at": r.completed_at.isoformat(),
        }
        for r in rows
    ]
    return web.json_response({"failures": failures})


async def throughput(request: web.Request) -> web.Response:
    """GET /api/throughput?minutes=: completions per minute (done, failed, expired), oldest
    first, and actions done per queue over the same minutes."""
    minutes = _bounded(request.query, "minutes", MINUTES_DEFAULT, MINUTES_MAX)
    if isinstance(minutes, web.Response):
        return minutes
    services = request.app[SERVICES]
    try:
        counts = await services.repo.throughput(minutes)
        by_queue = await services.repo.done_by_queue(minutes)
    except DatabaseError:
        return storage_unavailable(services)
    points = [
        {
            "t": int(c.minute.timestamp()),
            "done": c.done,
            "failed": c.failed,
            "expired": c.expired,
        }
        for c in counts
    ]
    done = [{"queue_id": qid, "done": n} for qid, n in sorted(by_queue.items())]
    return web.json_response({"minutes": minutes, "points": points, "done_by_queue": done})
