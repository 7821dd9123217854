"""`GET /api/actions/{callbackId}`: one action's state and history (admin token required)."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web

from throttled.db.repository import DatabaseError
from throttled.web.services import SERVICES, clip, error, storage_unavailable

MAX_CALLBACK_ID = 255  # (what intake accepts)


async def show_action(request: web.Request) -> web.Response:
    """GET /api/actions/{callbackId}: state, queue, attempts, last error, timestamps."""
    callback_id = request.match_info.get("callback_id", "")
    if not callback_id or len(callback_id) > MAX_CALLBACK_ID or not callback_id.isprintable():
        return error(
            400,
            "invalid_callback_id",
            f"callbackId must be 1..{MAX_CALLBACK_ID} printable characters",
            field="callbackId",
        )
    try:
        row = await request.app[SERVICES].repo.get_action(callback_id)
    except DatabaseError:
        return storage_unavailable(request.app[SERVICES])
    if row is None:
        return error(
            404, "action_not_found", f"no action with callbackId {clip(callback_id, 80)!r}"
        )
    body = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
    return web.json_response(body)
