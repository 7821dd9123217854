"""The cluster's queries (instances and their portal leases, see throttled/cluster.py): a part
of Repository kept in its own module. Every lease instant is the database's now(), so that
instances whose clocks disagree agree on who owns a portal; a lease is valid while its
expires_at is ahead of now()."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from throttled.db.queries import _readable

CHANNEL = "throttled_cluster"  # LISTEN/NOTIFY: an instance joined, handed portals back, stopped

INSTANCE_RETENTION_S = 86_400.0  # an instance gone this long, holding no lease, is forgotten
MAX_CANDIDATES = 100_000  # portal ids a survey returns (they are all counted)
MAX_LISTED_INSTANCES = 1000
MAX_LISTED_PORTALS = 10_000  # per instance, in a listing (portal_count counts them all)


def _seconds(param: str) -> str:
    return f"{param}::float8 * interval '1 second'"


# At a process start: the instance's row (and the rows of instances long gone, which hold no
# lease, are dropped), and a notification so that the others hand it a share at once.
REGISTER = f"""
WITH pruned AS (
    DELETE FROM instances i
    WHERE i.heartbeat_at < now() - {_seconds("$3")}
      AND NOT EXISTS (SELECT 1 FROM portal_leases l WHERE l.instance_id = i.id)
)
INSERT INTO instances (id, name) VALUES ($1, $2)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL
RETURNING id, pg_notify($4, $5)
"""

# The heartbeat and the renewal of every lease this instance holds, in one statement: a lease
# not returned is no longer this instance's (another took it over once it expired). (An
# expired lease nobody took over is renewed too: nobody can have sent for its portal. An
# instance that beats is live, even if another took it for a crashed one and marked it
# stopped: only stop() stops its heartbeat.)
HEARTBEAT = f"""
WITH beat AS (
    INSERT INTO instances (id, name) VALUES ($1, $2)
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL
)
UPDATE portal_leases SET expires_at = now() + {_seconds("$3")}
WHERE instance_id = $1
RETURNING portal_id
"""

# What each heartbeat decides from: the live instances (a heartbeat within the lease, not
# stopped), how many portals are validly leased and by whom, and the portals nobody validly
# owns that need an owner: those with pending rows (queues, then the pending index: one probe
# per queue) and those whose lease expired (its owner died, perhaps with rows claimed; claimed
# rows have no index, see migration 0002, so they are found by their portal's lease).
SURVEY = f"""
WITH live AS (
    SELECT id FROM instances
    WHERE stopped_at IS NULL AND heartbeat_at > now() - {_seconds("$2")}
), held AS (
    SELECT instance_id, count(*)::int AS n FROM portal_leases
    WHERE expires_at > now()
    GROUP BY instance_id
), unowned AS (
    SELECT q.portal_id FROM queues q
    WHERE EXISTS (SELECT 1 FROM actions a WHERE a.queue_id = q.id AND a.state = 'pending')
      AND NOT EXISTS (
          SELECT 1 FROM portal_leases l WHERE l.portal_id = q.portal_id AND l.expires_at > now()
      )
    UNION
    SELECT portal_id FROM portal_leases WHERE expires_at <= now()
)
SELECT (SELECT count(*) FROM live)::int AS live,
       (SELECT coalesce(sum(n), 0) FROM held)::int AS leased,
       (SELECT min(coalesce(h.n, 0)) FROM live l LEFT JOIN held h ON h.instance_id = l.id
        WHERE l.id <> $1)::int AS fewest_other,
       (SELECT count(*) FROM unowned)::int AS unowned,
       ARRAY(SELECT portal_id FROM unowned LIMIT $3) AS candidates
"""

# Take the portals that nobody validly owns: no lease row yet, or an expired one (whose owner
# is returned as `previous`, read before the statement: a lease taken meanwhile by another is
# not updated, so not returned). Rows go in portal order, so that two instances acquiring
# overlapping sets wait for each other instead of deadlocking.
ACQUIRE = f"""
WITH wanted AS (
    SELECT DISTINCT unnest($2::bigint[]) AS portal_id
), previous AS (
    SELECT l.portal_id, l.instance_id FROM portal_leases l JOIN wanted w USING (portal_id)
)
INSERT INTO portal_leases AS l (portal_id, instance_id, expires_at)
SELECT portal_id, $1, now() + {_seconds("$3")} FROM wanted ORDER BY portal_id
ON CONFLICT (portal_id) DO UPDATE
    SET instance_id = EXCLUDED.instance_id, acquired_at = now(), expires_at = EXCLUDED.expires_at
    WHERE l.expires_at <= now()
RETURNING l.portal_id,
    (SELECT left(p.instance_id, 100) FROM previous p WHERE p.portal_id = l.portal_id) AS previous
"""

# Hand portals back at once (rebalancing): whoever listens takes them up without waiting for
# them to expire. (Identical notifications of one transaction are delivered once.)
RELEASE = """
WITH released AS (
    DELETE FROM portal_leases WHERE instance_id = $1 AND portal_id = ANY($2::bigint[])
    RETURNING portal_id
)
SELECT portal_id, pg_notify($3, $4) FROM released
"""

# A graceful stop: every lease handed back, the instance marked stopped, the others told.
STOP = """
WITH released AS (
    DELETE FROM portal_leases WHERE instance_id = $1 RETURNING portal_id
), stopped AS (
    UPDATE instances SET stopped_at = now() WHERE id = $1 RETURNING id
)
SELECT (SELECT count(*) FROM released)::int AS released, pg_notify($2, $3) FROM stopped
"""

# Other instances named `<prefix><something>` (hostname:pid) that hold a valid lease: at a
# start, those whose process is provably gone have their leases ended at once (see
# Cluster.start).
NAMED_HOLDERS = """
SELECT left(i.id, 100) AS id, left(i.name, 200) AS name FROM instances i
WHERE i.id <> $1 AND i.stopped_at IS NULL AND left(i.name, length($2)) = $2
  AND EXISTS (SELECT 1 FROM portal_leases l WHERE l.instance_id = i.id AND l.expires_at > now())
LIMIT $3
"""

# Instances known to be dead: marked stopped, their leases expired now (kept, so that whoever
# takes a portal over learns whose claims it inherits).
END_INSTANCES = """
WITH ended AS (
    UPDATE instances SET stopped_at = now()
    WHERE id = ANY($1::text[]) AND stopped_at IS NULL
    RETURNING id
), expired AS (
    UPDATE portal_leases SET expires_at = now()
    WHERE instance_id IN (SELECT id FROM ended) AND expires_at > now()
    RETURNING portal_id
)
SELECT (SELECT count(*) FROM expired)::int AS expired
"""

# Work arrived at one instance for portals others own: one notification, the owners act.
ANNOUNCE = "SELECT pg_notify($1, $2)"

OWNER_OF = """
SELECT portal_id, left(instance_id, 100) AS instance_id FROM portal_leases
WHERE portal_id = ANY($1::bigint[]) AND expires_at > now()
"""

LIST_INSTANCES = f"""
SELECT left(i.id, 100) AS id, left(i.name, 200) AS name,
       {_readable("i.started_at")} AS started_at, {_readable("i.heartbeat_at")} AS heartbeat_at,
       {_readable("i.stopped_at", nullable=True)} AS stopped_at,
       LEAST(GREATEST(extract(epoch FROM now() - i.heartbeat_at), 0), 1e9)::float8
           AS heartbeat_age_s,
       (i.stopped_at IS NULL AND i.heartbeat_at > now() - {_seconds("$1")}) AS live,
       ARRAY(
           SELECT l.portal_id FROM portal_leases l
           WHERE l.instance_id = i.id AND l.expires_at > now()
           ORDER BY l.portal_id LIMIT $2
       ) AS portals,
       (SELECT count(*) FROM portal_leases l
        WHERE l.instance_id = i.id AND l.expires_at > now())::int AS portal_count
FROM instances i
ORDER BY i.started_at, i.id
LIMIT $3
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class Survey:
    """What a heartbeat decides from (see SURVEY)."""

    live: int  # live instances, this one included
    leased: int  # portals validly leased, by anyone
    fewest_other: int | None  # the fewest portals another live instance holds (None: alone)
    unowned: int  # portals that need an owner
    candidates: tuple[int, ...]  # those portals (MAX_CANDIDATES at most)

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Survey:
        """Build from a SURVEY row."""
        values = dict(row)
        values["candidates"] = tuple(values["candidates"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True, slots=True)
class InstanceView:
    """One instance, for operators: its heartbeat and the portals it validly leases."""

    id: str
    name: str
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    heartbeat_age_s: float
    live: bool
    portals: tuple[int, ...]  # MAX_LISTED_PORTALS at most
    portal_count: int

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> InstanceView:
        """Build from a LIST_INSTANCES row."""
        values = dict(row)
        values["portals"] = tuple(values["portals"])
        return cls(**values)


def _payload(instance_id: str, event: str) -> str:
    return json.dumps({"instance": instance_id, "event": event}, separators=(",", ":"))


class ClusterQueries:
    """Mixed into Repository: `_fetch` and `_execute` are its."""

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        raise NotImplementedError

    async def _execute(self, sql: str, *args: Any) -> str:
        raise NotImplementedError

    async def register_instance(self, instance_id: str, name: str) -> None:
        """Record this instance as started (and tell the others)."""
        payload = _payload(instance_id, "joined")
        await self._fetch(REGISTER, instance_id, name, INSTANCE_RETENTION_S, CHANNEL, payload)

    async def heartbeat(self, instance_id: str, name: str, lease_s: float) -> set[int]:
        """Beat, and renew every lease this instance holds for `lease_s`; the portals whose
        lease is still this instance's (any other is lost)."""
        rows = await self._fetch(HEARTBEAT, instance_id, name, lease_s)
        return {r["portal_id"] for r in rows}

    async def survey(self, instance_id: str, lease_s: float) -> Survey:
        """Live instances, leased portals and the portals that need an owner."""
        row = (await self._fetch(SURVEY, instance_id, lease_s, MAX_CANDIDATES))[0]
        return Survey.from_row(row)

    async def acquire_portals(
        self, instance_id: str, portal_ids: Sequence[int], lease_s: float
    ) -> dict[int, str | None]:
        """Lease those of `portal_ids` nobody validly owns; each taken, with its previous
        owner (None: never leased, or handed back)."""
        rows = await self._fetch(ACQUIRE, instance_id, list(portal_ids), lease_s)
        return {r["portal_id"]: r["previous"] for r in rows}

    async def release_portals(self, instance_id: str, portal_ids: Sequence[int]) -> set[int]:
        """Hand these portals back at once (told to the others); those that were this
        instance's."""
        payload = _payload(instance_id, "released")
        rows = await self._fetch(RELEASE, instance_id, list(portal_ids), CHANNEL, payload)
        return {r["portal_id"] for r in rows}

    async def stop_instance(self, instance_id: str) -> int:
        """Hand every portal back and mark the instance stopped (told to the others); how
        many leases were handed back."""
        payload = _payload(instance_id, "stopped")
        rows = await self._fetch(STOP, instance_id, CHANNEL, payload)
        return int(rows[0]["released"]) if rows else 0

    async def named_holders(self, instance_id: str, prefix: str) -> dict[str, str]:
        """Other live-looking instances whose name starts with `prefix` and that hold a valid
        lease: id → name."""
        rows = await self._fetch(NAMED_HOLDERS, instance_id, prefix, MAX_LISTED_INSTANCES)
        return {r["id"]: r["name"] for r in rows}

    async def end_instances(self, instance_ids: Sequence[str]) -> int:
        """Mark these (dead) instances stopped and expire their leases now; how many leases."""
        rows = await self._fetch(END_INSTANCES, list(instance_ids))
        return int(rows[0]["expired"]) if rows else 0

    async def announce_work(self, payload: str) -> None:
        """Notify the other instances on the cluster's channel."""
        await self._fetch(ANNOUNCE, CHANNEL, payload)

    async def owner_of(self, portal_ids: Sequence[int]) -> dict[int, str]:
        """The instance that validly owns each of these portals (the others have none)."""
        rows = await self._fetch(OWNER_OF, list(portal_ids))
        return {r["portal_id"]: r["instance_id"] for r in rows}

    async def list_instances(self, lease_s: float) -> list[InstanceView]:
        """Every known instance, oldest first, with the portals it validly leases."""
        rows = await self._fetch(LIST_INSTANCES, lease_s, MAX_LISTED_PORTALS, MAX_LISTED_INSTANCES)
        return [InstanceView.from_row(r) for r in rows]
