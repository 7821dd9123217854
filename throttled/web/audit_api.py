"""`GET /api/audit`: the audit log of admin changes, newest first (admin token required)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from throttled.db.repository import DatabaseError, readable_json
from throttled.web.services import SERVICES, error, storage_unavailable

PAGE_DEFAULT, PAGE_MAX = 100, 1000
_DIGITS = re.compile(r"[0-9]{1,19}")


async def list_audit(request: web.Request) -> web.Response:
    """GET /api/audit?target=&limit=&cursor=: entries newest first; `cursor` is the
    `next_cursor` of the previous page."""
    query = request.query
    limit_text = query.get("limit", str(PAGE_DEFAULT))
    if not _DIGITS.fullmatch(limit_text) or not 1 <= int(limit_text) <= PAGE_MAX:
        return error(400, "invalid_limit", f"limit must be an integer 1..{PAGE_MAX}", field="limit")
    cursor = query.get("cursor")
    if cursor is not None and (not _DIGITS.fullmatch(cursor) or int(cursor) > 2**63 - 1):
        return error(400, "invalid_cursor", "cursor is not one this API gave", field="cursor")
    target = query.get("target")
    if target is not None and (len(target) > 300 or not target.isprintable()):
        return error(400, "invalid_target", "target must be printable, at most 300", field="target")
    limit = int(limit_text)
    try:
        rows = await request.app[SERVICES].repo.list_audit(
            target, None if cursor is None else int(cursor), limit + 1
        )
    except DatabaseError:
        return storage_unavailable(request.app[SERVICES])
    page = rows[:limit]
    entries: list[dict[str, Any]] = [
        {
            **row,
            "at": row["at"].isoformat(),
            "before": readable_json(row["before"]),
            "after": readable_json(row["after"]),
        }
        for row in page
    ]
    next_cursor = str(page[-1]["id"]) if len(rows) > limit else None
    return web.json_response({"entries": entries, "next_cursor": next_cursor})
