"""The cluster for operators: `GET /api/cluster` lists the instances sharing the database, their
heartbeats and the portals each owns (from the database alone: any instance answers alike)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiohttp import web

from throttled.db.cluster import InstanceView
from throttled.db.repository import DatabaseError
from throttled.web.services import SERVICES, storage_unavailable


def cluster_view(instances: Sequence[InstanceView], lease_s: float) -> dict[str, Any]:
    """The answer of GET /api/cluster (and of `throttled cluster --json`)."""
    return {
        "lease_s": lease_s,
        "instances": [
            {
                "id": i.id,
                "name": i.name,
                "started_at": i.started_at.isoformat(),
                "heartbeat_at": i.heartbeat_at.isoformat(),
                "heartbeat_age_s": round(i.heartbeat_age_s, 3),
                "stopped_at": i.stopped_at.isoformat() if i.stopped_at else None,
                "live": i.live,
                "portals": list(i.portals),
                "portal_count": i.portal_count,
            }
            for i in instances
        ],
    }


async def show_cluster(request: web.Request) -> web.Response:
    """GET /api/cluster: every known instance, its heartbeat, and the portals it owns."""
    services = request.app[SERVICES]
    lease_s = services.config.cluster.lease_s
    try:
        instances = await services.repo.list_instances(lease_s)
    except DatabaseError:
        return storage_unavailable(services)
    return web.json_response(cluster_view(instances, lease_s))
