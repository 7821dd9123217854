"""The portals operator surface (admin token required): list, show, test, disconnect."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from throttled.db.repository import Backlog, DatabaseError, PortalRow
from throttled.web.admin import actor, portal_id, portal_view
from throttled.web.services import SERVICES, Services, error, storage_unavailable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _storage(handler: Handler) -> Handler:
    """A database that fails answers 503, not 500."""

    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except DatabaseError:
            return storage_unavailable(request.app[SERVICES])

    run.__name__ = run.__qualname__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


async def _find(services: Services, pid: int) -> PortalRow | None:
    return await services.repo.find_portal(pid)


def _bad_id(request: web.Request) -> web.Response:
    shown = request.match_info.get("id", "")[:40]
    return error(400, "invalid_portal_id", f"portal id must be an integer 1..2^63-1, got {shown!r}")


def _unknown(pid: int) -> web.Response:
    return error(404, "portal_not_found", f"portal {pid} is not connected and has no actions")


@_storage
async def list_portals(request: web.Request) -> web.Response:
    """GET /api/portals: every known portal."""
    services = request.app[SERVICES]
    rows = await services.repo.list_portals()
    backlog = await services.repo.portal_backlog()
    views = [portal_view(r, backlog.get(r.portal_id, Backlog()), services.tokens) for r in rows]
    return web.json_response({"portals": views})


@_storage
async def show_portal(request: web.Request) -> web.Response:
    """GET /api/portals/{id}: one portal."""
    services = request.app[SERVICES]
    pid = portal_id(request)
    if pid is None:
        return _bad_id(request)
    row = await _find(services, pid)
    if row is None:
        return _unknown(pid)
    backlog = (await services.repo.portal_backlog(pid)).get(pid, Backlog())
    return web.json_response(portal_view(row, backlog, services.tokens))


@_storage
async def test_portal(request: web.Request) -> web.Response:
    """POST /api/portals/{id}/test: token-info for a fresh token, with its latency."""
    services = request.app[SERVICES]
    pid = portal_id(request)
    if pid is None:
        return _bad_id(request)
    if await _find(services, pid) is None:
        return _unknown(pid)
    result = await services.tokens.test(pid)
    return web.json_response(result.as_json(pid))


@_storage
async def disconnect_portal(request: web.Request) -> web.Response:
    """DELETE /api/portals/{id}/connection: revoke at HubSpot, drop the tokens; actions wait."""
    services = request.app[SERVICES]
    pid = portal_id(request)
    if pid is None:
        return _bad_id(request)
    row = await services.repo.get_portal(pid)
    if row is None:
        return _unknown(pid)
    revoked = await services.tokens.disconnect(pid, "disconnected by an operator")
    await services.repo.add_audit(
        actor(request),
        "portal.disconnect",
        f"portal:{pid}",
        {"connection": row.status},
        {"connection": "disconnected", "revoked": revoked},
    )
    return web.json_response({"portal_id": pid, "connection": "disconnected", "revoked": revoked})
