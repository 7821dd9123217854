"""`throttled cluster`: the instances sharing the database, their heartbeats and the portals each
owns. It reads the database directly, so it works with every daemon down (what it then shows
is how they left it)."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from typing import Any

from throttled.cli_ops import _described
from throttled.cli_portals import _database, _dump, _load, _span, _table, _text

_CONFIG_HELP = "config file (default ./throttled.toml, then /etc/throttled/throttled.toml)"
SHOWN_PORTALS = 8  # portal ids a table row names (PORTALS counts them all)


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `cluster`."""
    p = sub.add_parser(
        "cluster",
        **_described(
            "the instances sharing the database: heartbeat, live or not, the portals each "
            "owns; the daemons may be down",
            ["throttled cluster", "throttled cluster --json"],
        ),
    )
    p.add_argument("--config", help=_CONFIG_HELP)
    p.add_argument(
        "--json", action="store_true", help='print the API\'s {"lease_s", "instances": [...]}'
    )
    p.set_defaults(func=_cluster, command="cluster")


def _cluster(args: argparse.Namespace) -> int:
    from throttled.web.cluster_api import cluster_view

    cfg = _load(args)
    lease_s = cfg.cluster.lease_s

    async def run() -> dict[str, Any]:
        async with _database(cfg) as repo:
            return cluster_view(await repo.list_instances(lease_s), lease_s)

    view = asyncio.run(run())
    if args.json:
        _dump(view)
        return 0
    if not view["instances"]:
        print("no instance has registered yet (each `throttled serve` does)")
        return 0
    print("\n".join(_table(_HEADERS, [_row(i) for i in view["instances"]], {5})))
    live = sum(1 for i in view["instances"] if i["live"])
    print(f"({live} live; a lease lasts {lease_s:g}s unrenewed)")
    return 0


_HEADERS = ["ID", "NAME", "STATE", "STARTED", "HEARTBEAT", "PORTALS", "OWNS"]


def _row(instance: dict[str, Any]) -> list[str]:
    started = datetime.fromisoformat(instance["started_at"]).astimezone(UTC)
    state = "live" if instance["live"] else "stopped" if instance["stopped_at"] else "gone"
    portals = [str(p) for p in instance["portals"][:SHOWN_PORTALS]]
    more = instance["portal_count"] - len(portals)
    owns = ",".join(portals) + (f",+{more}" if more > 0 else "")
    return [
        _text(instance["id"], 40),
        _text(instance["name"], 60),
        state,
        started.strftime("%Y-%m-%d %H:%M:%SZ"),
        f"{_span(instance['heartbeat_age_s'])} ago",
        str(instance["portal_count"]),
        owns or "-",
    ]
