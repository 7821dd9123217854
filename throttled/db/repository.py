"""The one class that talks to PostgreSQL. Driver errors become our own exceptions here."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from throttled.db import queries as q
from throttled.db.cluster import ClusterQueries
from throttled.db.operator import OperatorQueries


class DatabaseError(Exception):
    """A database operation failed."""


class DatabaseUnavailable(DatabaseError):
    """PostgreSQL cannot be reached (connection refused, lost, or the pool is exhausted)."""


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    # "database is not currently accepting connections" (55000), raised while connecting
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,
    # a pooled connection the server killed, handed out before its EOF (asyncpg#1069)
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.ConnectionFailureError,
)


@contextlib.contextmanager
def translate_errors() -> Any:
    """Map driver exceptions to DatabaseUnavailable / DatabaseError."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"{type(exc).__name__}: {exc}") from exc


# Not frozen: one is built per request, and a frozen __init__ (object.__setattr__ per
# field) costs about a microsecond more. Never mutated.
@dataclass(kw_only=True, slots=True)
class NewAction:
    """An action accepted at intake, before it is stored. `input_fields` holds JSON values as
    parse() returns them (finite numbers: a NaN would be written as null)."""

    callback_id: str
    queue_key: str
    portal_id: int
    priority: int
    deadline: float  # Unix time, seconds
    policy: dict[str, Any]
    workflow_id: int | None
    object_type: str | None
    object_id: str | None
    input_fields: dict[str, Any]
    action_id: int | None = None  # the action definition (a config's key, with the portal)
    rate_inputs: dict[str, Any] | None = None  # the rate fields the policy was resolved from


# Not frozen: one is built per claimed row, and a frozen __init__ costs 1.5 us more. Never
# mutated (hashable by its fields, as a frozen one would be).
@dataclass(slots=True, unsafe_hash=True)
class ClaimedAction:
    """A row reserved by this process for sending."""

    id: int
    callback_id: str
    queue_id: int
    portal_id: int
    priority: int
    deadline: datetime
    attempts: int
    failures: int
    split_group: int | None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> ClaimedAction:
        """Build from a CLAIM row."""
        return cls(**dict(row))

    @classmethod
    def from_rows(cls, rows: list[asyncpg.Record]) -> list[ClaimedAction]:
        """Build from CLAIM rows: positionally when the columns are the fields in order (a
        thousand rows an answer: 1 us a row less than by name), else by name."""
        if rows and tuple(rows[0].keys()) == _CLAIMED_FIELDS:
            return [cls(*row) for row in rows]
        return [cls.from_row(row) for row in rows]


_CLAIMED_FIELDS = tuple(f.name for f in fields(ClaimedAction))


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueRow:
    """A queue's identity and stored rate policy."""

    id: int
    key: str
    portal_id: int
    policy: dict[str, Any]
    override: dict[str, Any] | None
    created_at: datetime
    paused: bool = False  # an operator holds it: nothing is claimed
    releasing: bool = False  # rows an operator released (fail-pending) wait to be completed

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> QueueRow:
        """Build from a queues row."""
        return cls(**dict(row))


@dataclass(frozen=True, kw_only=True, slots=True)
class PortalRow:
    """A portal's connection: its stored (encrypted) OAuth tokens and what is known of it."""

    portal_id: int
    refresh_token: str | None
    access_token: str | None
    access_expires_at: datetime | None
    status: str = "connected"
    disconnected_reason: str | None = None
    disconnected_at: datetime | None = None
    scopes: tuple[str, ...] = ()
    hub_domain: str | None = None
    last_refresh_at: datetime | None = None
    last_refresh_error: str | None = None
    connected_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> PortalRow:
        """Build from a portals row."""
        values = dict(row)
        scopes = values.get("scopes") or ()
        values["scopes"] = tuple(s for s in scopes if isinstance(s, str))
        return cls(**values)

    @property
    def connected(self) -> bool:
        """Connected, with a refresh token to get access tokens from."""
        return self.status == "connected" and self.refresh_token is not None


@dataclass(frozen=True, kw_only=True, slots=True)
class Backlog:
    """A portal's actions that are not done."""

    pending: int = 0
    failed: int = 0
    expired: int = 0


class LockedPortal:
    """A portal's row, locked for the life of the block (see Repository.locked_portal)."""

    def __init__(self, conn: Any, portal_id: int, row: PortalRow | None) -> None:
        self._conn = conn
        self.portal_id = portal_id
        self.row = row

    async def save_tokens(self, refresh: str, access: str, expires_at: datetime) -> None:
        """Store a refreshed token pair (encrypted), still under the lock."""
        with translate_errors():
            await self._conn.execute(q.SAVE_TOKENS, self.portal_id, refresh, access, expires_at)

    async def disconnect(self, reason: str) -> None:
        """Mark the portal disconnected (its tokens are dropped), still under the lock."""
        with translate_errors():
            await self._conn.execute(q.DISCONNECT_PORTAL, self.portal_id, reason)

    async def record_error(self, error: str) -> None:
        """Note a failed refresh, still under the lock."""
        with translate_errors():
            await self._conn.execute(q.RECORD_REFRESH_ERROR, self.portal_id, error)


@dataclass(frozen=True, kw_only=True, slots=True)
class Retry:
    """A claimed row going back to pending."""

    id: int
    not_before: datetime | None
    error: str | None
    counted: bool
    split_group: int | None


class Unreadable:
    """A stored JSON value Python cannot read (nested too deep, a number with thousands of
    digits): decoded as this marker instead of failing the whole statement, so that the one
    row it sits in is held (a policy) or ignored, never a query that fails forever."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unreadable({self.reason!r})"


def readable_json(value: Any) -> Any:
    """A stored JSON value as it is answered: one Python could not read is marked so."""
    return {"unreadable": value.reason} if isinstance(value, Unreadable) else value


def _decode_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Unreadable(f"{type(exc).__name__}: {str(exc)[:100]}")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind, encoder=json.dumps, decoder=_decode_json, schema="pg_catalog"
        )


def asyncpg_dsn(url: str) -> str:
    """Accept SQLAlchemy/yoyo-style schemes too."""
    for prefix in ("postgresql+psycopg://", "postgresql+asyncpg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


async def _keep_session(conn: asyncpg.Connection) -> None:
    """On release, asyncpg's default reset sends RESET ALL, CLOSE ALL, UNLISTEN * and
    pg_advisory_unlock_all(): a round trip per statement. throttled changes no session state
    (no settings, cursors, LISTEN or advisory locks), so there is nothing to reset; an open
    transaction is still rolled back by the pool itself."""


class Repository(OperatorQueries, ClusterQueries):
    """All queries throttled issues, over one asyncpg pool (or one connection of it: held)."""

    def __init__(
        self, pool: asyncpg.Pool, conn: asyncpg.pool.PoolConnectionProxy | None = None
    ) -> None:
        self.pool = pool
        self._conn = conn

    async def hold(self) -> Repository:
        """The same queries over one connection taken from the pool, for a caller that runs
        statements back to back (a group-commit flusher): no acquire and release around each
        one. give_back() returns it."""
        with translate_errors():
            return Repository(self.pool, await self.pool.acquire())

    async def give_back(self) -> None:
        """Give a held connection back to the pool (a broken one is replaced by the pool)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(DatabaseError), translate_errors():
                await self.pool.release(conn)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout: float = 5.0,
        command_timeout: float = 60.0,
    ) -> AsyncIterator[Repository]:
        """Open a pool for the life of the block."""
        with translate_errors():
            pool = await asyncpg.create_pool(
                asyncpg_dsn(url),
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                command_timeout=command_timeout,
                init=_init_connection,
                reset=_keep_session,
            )
        try:
            yield cls(pool)
        finally:
            # close() waits for every connection to come back; a lost one must not hang the
            # stop (on a timeout asyncpg terminates the rest).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pool.close(), 10.0)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Repository]:
        """The same queries in one transaction, for the life of the block."""
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                yield Repository(self.pool, conn)

    async def _execute(self, sql: str, *args: Any) -> str:
        with translate_errors():
            target = self.pool if self._conn is None else self._conn
            return str(await target.execute(sql, *args))

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        with translate_errors():
            target = self.pool if self._conn is None else self._conn
            return list(await target.fetch(sql, *args))

    async def ping(self) -> None:
        """Raise DatabaseUnavailable unless a trivial query succeeds."""
        await self._fetch(q.PING)

    # -- intake -----------------------------------------------------------------------------

    async def upsert_queues(
        self,
        keys: Sequence[str],
        portals: Sequence[int],
        policies: Sequence[dict[str, Any]],
        action_ids: Sequence[int | None] | None = None,
        inputs: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[QueueRow]:
        """Create or update queues, with what each policy was resolved from; their rows."""
        none = [None] * len(keys)
        rows = await self._fetch(
            q.UPSERT_QUEUES, keys, portals, policies, action_ids or none, inputs or none
        )
        return [QueueRow.from_row(r) for r in rows]

    async def stored_callbacks(self, callback_ids: Sequence[str]) -> set[str]:
        """Which of these callback ids are already stored."""
        rows = await self._fetch(q.STORED_CALLBACKS, callback_ids)
        return {r["callback_id"] for r in rows}

    async def insert_actions(self, actions: Sequence[NewAction], queue_ids: Sequence[int]) -> None:
        """Store actions in one statement; duplicates (same callback_id) are ignored."""
        rows = [
            (
                a.callback_id,
                queue_id,
                a.portal_id,
                a.priority,
                a.deadline,
                a.workflow_id,
                a.object_type,
                a.object_id,
                a.input_fields,
            )
            for a, queue_id in zip(actions, queue_ids, strict=True)
        ]
        try:
            doc = orjson.dumps(rows).decode()  # one document: see q.INSERT_ACTIONS
        except orjson.JSONEncodeError as exc:  # a lone surrogate, an integer past 64 bits
            raise DatabaseError(f"not storable as JSON: {exc}") from None
        await self._execute(q.INSERT_ACTIONS, doc)

    # -- scheduling -------------------------------------------------------------------------

    async def claim(
        self, queue_ids: Sequence[int], limits: Sequence[int], stamp: datetime
    ) -> list[ClaimedAction]:
        """Reserve up to limits[i] due rows of queue_ids[i], all queues in one statement.
        `stamp` (unique per claim) is stored as their claimed_at: see release_unanswered."""
        return ClaimedAction.from_rows(await self._fetch(q.CLAIM, queue_ids, limits, stamp))

    async def claim_released(
        self, queue_id: int, limit: int, stamp: datetime
    ) -> list[ClaimedAction]:
        """Claim rows an operator released (fail-pending), regardless of the queue's rate."""
        rows = await self._fetch(q.CLAIM_RELEASED, queue_id, limit, stamp)
        return ClaimedAction.from_rows(rows)

    async def releasing_queues(self) -> list[QueueRow]:
        """Queues with released rows (fail-pending) to complete."""
        return [QueueRow.from_row(r) for r in await self._fetch(q.RELEASING_QUEUES)]

    async def end_release(self, queue_id: int) -> bool:
        """Mark a queue's release over if no released row is left; whether it is over."""
        return bool(await self._fetch(q.END_RELEASE, queue_id))

    async def release_unanswered(self, stamps: Sequence[datetime]) -> list[int]:
        """Put back to pending the rows of claims that raised (they may have committed, the
        answer lost with the connection); returns their queue ids, one per row."""
        return [r["queue_id"] for r in await self._fetch(q.RELEASE_UNANSWERED, list(stamps))]

    async def next_not_before(self, queue_ids: Sequence[int]) -> dict[int, datetime]:
        """For queues with held-back rows: when the first becomes claimable."""
        rows = await self._fetch(q.NEXT_NOT_BEFORE, queue_ids)
        return {r["queue_id"]: r["at"] for r in rows}

    async def active_queues(self) -> list[QueueRow]:
        """Queues that have pending rows."""
        return [QueueRow.from_row(r) for r in await self._fetch(q.ACTIVE_QUEUES)]

    async def active_queues_of(self, portal_ids: Sequence[int]) -> list[QueueRow]:
        """Queues of these portals that have pending rows."""
        rows = await self._fetch(q.ACTIVE_QUEUES_OF, list(portal_ids))
        return [QueueRow.from_row(r) for r in rows]

    async def get_queues(self, ids: Sequence[int]) -> list[QueueRow]:
        """Queues by id."""
        return [QueueRow.from_row(r) for r in await self._fetch(q.GET_QUEUES, ids)]

    # -- results ----------------------------------------------------------------------------

    async def mark_done(self, ids: Sequence[int], sent_at: Sequence[datetime]) -> None:
        """Completed at HubSpot (204)."""
        await self._execute(q.MARK_DONE, ids, sent_at)

    async def mark_retry(
        self, retries: Sequence[Retry], sends: Sequence[tuple[int, datetime, int]] = ()
    ) -> None:
        """Back to pending with backoff; the failed sends are kept in the rate log."""
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    q.MARK_RETRY,
                    [r.id for r in retries],
                    [r.not_before for r in retries],
                    [r.error for r in retries],
                    [int(r.counted) for r in retries],
                    [r.split_group for r in retries],
                )
                if sends:
                    await conn.execute(
                        q.INSERT_SENDS,
                        [s[0] for s in sends],
                        [s[1] for s in sends],
                        [s[2] for s in sends],
                    )

    async def mark_failed(
        self, ids: Sequence[int], errors: Sequence[str], sent_at: Sequence[datetime | None]
    ) -> None:
        """Terminal failure with a reason an operator can read."""
        await self._execute(q.MARK_FAILED, ids, errors, sent_at)

    async def mark_expired(self, ids: Sequence[int]) -> None:
        """Claimed rows whose block expired before they could be sent."""
        await self._execute(q.MARK_EXPIRED_CLAIMED, ids)

    async def release(self, ids: Sequence[int]) -> None:
        """Claimed rows that were never sent go back to pending."""
        await self._execute(q.RELEASE, ids)

    # -- recovery and maintenance -----------------------------------------------------------

    async def recover_claimed_of(
        self, portal_ids: Sequence[int], held: Sequence[int]
    ) -> dict[int, int]:
        """Release the rows left claimed for these portals, except those in `held`; return
        queue_id → count."""
        rows = await self._fetch(q.RECOVER_CLAIMED_OF, list(portal_ids), list(held))
        return {r["queue_id"]: r["n"] for r in rows}

    async def recent_requests(
        self, portal_ids: Sequence[int], within_s: float, limit: int
    ) -> list[tuple[int, float]]:
        """(portal_id, age in seconds) of each completion request of these portals answered
        within the last `within_s` seconds (`limit` at most)."""
        rows = await self._fetch(q.RECENT_REQUESTS, list(portal_ids), within_s, limit)
        return [(r["portal_id"], r["age_s"]) for r in rows]

    async def recent_sends(self, since: datetime) -> list[tuple[int, datetime, int]]:
        """The rate log: (queue_id, sent_at, n) for sends after `since`."""
        rows = await self._fetch(q.RECENT_SENDS, since)
        return [(r["queue_id"], r["sent_at"], r["n"]) for r in rows]

    async def recent_sends_for(
        self, queue_ids: Sequence[int], since: datetime
    ) -> list[tuple[int, datetime, int]]:
        """The rate log of some queues only."""
        rows = await self._fetch(q.RECENT_SENDS_FOR, since, queue_ids)
        return [(r["queue_id"], r["sent_at"], r["n"]) for r in rows]

    async def expire_due(self, limit: int) -> list[int]:
        """Mark pending rows past their deadline expired; return their queue ids."""
        return [r["queue_id"] for r in await self._fetch(q.EXPIRE_DUE, limit)]

    async def prune_sends(self, before: datetime) -> int:
        """Forget rate-log entries no window can still see; how many."""
        status = await self._execute(q.PRUNE_SENDS, before)
        return int(status.split()[-1])

    async def release_stale_claims(
        self, before: datetime, held: Sequence[int], limit: int, portals: Sequence[int]
    ) -> dict[int, int]:
        """Up to `limit` claimed rows of these portals, claimed before `before` and not in
        `held`, back to pending; return queue_id → count."""
        rows = await self._fetch(q.RELEASE_STALE_CLAIMS, before, list(held), limit, list(portals))
        return {r["queue_id"]: r["n"] for r in rows}

    async def delete_finished(
        self, done_before: datetime, failed_before: datetime, limit: int
    ) -> int:
        """Retention: delete up to `limit` finished rows older than the cut-offs."""
        status = await self._execute(q.DELETE_FINISHED, done_before, failed_before, limit)
        return int(status.split()[-1])

    # -- portals ----------------------------------------------------------------------------

    async def get_portal(self, portal_id: int) -> PortalRow | None:
        """A portal's row, or None if it was never connected."""
        rows = await self._fetch(q.GET_PORTAL, portal_id)
        return PortalRow.from_row(rows[0]) if rows else None

    async def list_portals(self) -> list[PortalRow]:
        """Every portal with a row, then those that only have actions (never connected)."""
        rows = [PortalRow.from_row(r) for r in await self._fetch(q.LIST_PORTALS)]
        unconnected = await self._fetch(q.UNCONNECTED_PORTALS)
        return rows + [
            PortalRow(
                portal_id=r["portal_id"],
                refresh_token=None,
                access_token=None,
                access_expires_at=None,
                status="not_connected",
            )
            for r in unconnected
        ]

    async def find_portal(self, portal_id: int) -> PortalRow | None:
        """The portal's row; one with actions but never connected is known too (status
        'not_connected'); None for a portal throttled has never heard of."""
        row = await self.get_portal(portal_id)
        if row is not None:
            return row
        if not (await self._fetch(q.HAS_ACTIONS, portal_id))[0]["known"]:
            return None
        return PortalRow(
            portal_id=portal_id,
            refresh_token=None,
            access_token=None,
            access_expires_at=None,
            status="not_connected",
        )

    @contextlib.asynccontextmanager
    async def locked_portal(
        self, portal_id: int, *, lock_timeout_s: float
    ) -> AsyncIterator[LockedPortal]:
        """The portal's row locked (FOR UPDATE) in a transaction for the life of the block:
        whoever holds it is the only one, in any instance, refreshing its tokens. Waiting for
        the lock longer than `lock_timeout_s` raises DatabaseError."""
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(lock_timeout_s * 1000)}")
                rows = await conn.fetch(q.LOCK_PORTAL, portal_id)
                yield LockedPortal(conn, portal_id, PortalRow.from_row(rows[0]) if rows else None)

    async def set_refresh_token(self, portal_id: int, encrypted: str) -> None:
        """Connect a portal with a refresh token only (or replace its connection)."""
        await self._execute(q.UPSERT_REFRESH_TOKEN, portal_id, encrypted)

    async def connect_portal(
        self,
        portal_id: int,
        *,
        refresh: str,
        access: str,
        expires_at: datetime,
        scopes: Sequence[str],
        hub_domain: str | None,
    ) -> None:
        """Store an install's tokens (encrypted) and grants in one statement; reconnects."""
        await self._execute(
            q.CONNECT_PORTAL, portal_id, refresh, access, expires_at, list(scopes), hub_domain
        )

    async def save_tokens(
        self, portal_id: int, refresh: str, access: str, expires_at: datetime
    ) -> None:
        """Store a refreshed token pair (encrypted)."""
        await self._execute(q.SAVE_TOKENS, portal_id, refresh, access, expires_at)

    async def set_portal_details(
        self, portal_id: int, scopes: Sequence[str], hub_domain: str | None
    ) -> None:
        """What token-info said the portal granted."""
        await self._execute(q.SET_PORTAL_DETAILS, portal_id, list(scopes), hub_domain)

    async def disconnect_portal(self, portal_id: int, reason: str) -> None:
        """Drop a portal's tokens and mark it disconnected; its actions wait."""
        await self._execute(q.DISCONNECT_PORTAL, portal_id, reason)

    async def wake_portal(self, portal_id: int, marker: str) -> set[int]:
        """Rows of this portal waiting for its connection (last_error starts with `marker`)
        become due now; returns their queues."""
        return {r["queue_id"] for r in await self._fetch(q.WAKE_PORTAL, portal_id, marker)}

    async def portal_backlog(self, portal_id: int | None = None) -> dict[int, Backlog]:
        """Pending (claimed included), failed and expired actions per portal."""
        rows = await self._fetch(q.PORTAL_BACKLOG, portal_id)
        return {
            r["portal_id"]: Backlog(pending=r["pending"], failed=r["failed"], expired=r["expired"])
            for r in rows
        }

    async def reencrypt_batch(
        self, after: int | None, limit: int, convert: Any
    ) -> tuple[int | None, int]:
        """Re-encrypt one batch of portals (ids > `after`; None: from the first) in one
        transaction: `convert(row)`
        returns the new (refresh, access) or None to leave a row as it is. Returns (last
        portal id seen, rows changed); last id None when there are no more."""
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(q.PORTAL_CIPHERTEXTS, after, limit)
                changed = 0
                for row in rows:
                    new = convert(row)
                    if new is not None:
                        await conn.execute(q.REENCRYPT_PORTAL, row["portal_id"], *new)
                        changed += 1
        return (rows[-1]["portal_id"] if rows else None), changed

    # -- OAuth install flow -----------------------------------------------------------------

    async def add_oauth_state(
        self,
        digest: bytes,
        redirect_uri: str,
        *,
        client: bytes,
        expires_at: datetime,
        now: datetime,
        limits: tuple[int, int],
    ) -> str | None:
        """Store an install's state (its hash). Refused, with the reason ('client' or 'all'),
        when `limits` (per client, in all) states are live already."""
        per_client, in_all = limits
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(q.LOCK_OAUTH_STATES)
                (counts,) = await conn.fetch(q.LIVE_OAUTH_STATES, client, now)
                if counts["mine"] >= per_client:
                    return "client"
                if counts["live"] >= in_all:
                    return "all"
                await conn.execute(q.INSERT_OAUTH_STATE, digest, redirect_uri, client, expires_at)
        return None

    async def take_oauth_state(self, digest: bytes) -> tuple[str, datetime] | None:
        """Remove a state and return its (redirect_uri, expires_at); None if unknown."""
        rows = await self._fetch(q.TAKE_OAUTH_STATE, digest)
        return (rows[0]["redirect_uri"], rows[0]["expires_at"]) if rows else None

    async def delete_expired_oauth_states(self, now: datetime) -> int:
        """Retention for states never used."""
        status = await self._execute(q.DELETE_EXPIRED_OAUTH_STATES, now)
        return int(status.split()[-1])

    # -- configuration and stats ------------------------------------------------------------

    async def action_configs(self) -> dict[tuple[int, int], dict[str, Any]]:
        """All (portal_id, action_id) rate configs."""
        rows = await self._fetch(q.ALL_ACTION_CONFIGS)
        return {(r["portal_id"], r["action_id"]): r["policy"] for r in rows}

    async def set_action_config(
        self, portal_id: int, action_id: int, policy: dict[str, Any]
    ) -> None:
        """Create or replace one (portal, action definition) rate config."""
        await self._execute(q.SET_ACTION_CONFIG, portal_id, action_id, policy)

    async def get_action_config(self, portal_id: int, action_id: int) -> Any:
        """One stored config's policy (as stored: may be anything), or None."""
        rows = await self._fetch(q.GET_ACTION_CONFIG, portal_id, action_id)
        return rows[0]["policy"] if rows else None

    async def delete_action_config(self, portal_id: int, action_id: int) -> bool:
        """Delete one config; whether there was one."""
        return bool(await self._fetch(q.DELETE_ACTION_CONFIG, portal_id, action_id))

    async def list_action_configs(
        self, after: tuple[int, int] | None, limit: int
    ) -> list[tuple[int, int, Any]]:
        """Configs after (portal, action), in that order."""
        portal, action = after if after is not None else (None, None)
        rows = await self._fetch(q.LIST_ACTION_CONFIGS, portal, action, limit)
        return [(r["portal_id"], r["action_id"], r["policy"]) for r in rows]

    async def longest_period(self) -> float:
        """The longest rate window of any queue, seconds (0 if none): of the stored policies,
        and of the effective policies of queues an operator overrode (an override of 1 per
        30 days keeps its sends counted for 30 days, tracked or not)."""
        from throttled.queues import safe_policy

        rows = await self._fetch(q.LONGEST_PERIOD)
        longest = float(rows[0]["longest"] or 0.0)
        for row in await self._fetch(q.OVERRIDDEN_QUEUES):
            policy, _, _ = safe_policy(row["policy"], row["override"])
            if policy is not None:
                longest = max(longest, policy.period_s)
        return longest

    async def pending_by_queue(self) -> list[tuple[int, int, datetime]]:
        """(queue_id, pending rows, latest deadline) for every queue with a backlog."""
        rows = await self._fetch(q.PENDING_BY_QUEUE)
        return [(r["queue_id"], r["pending"], r["latest_deadline"]) for r in rows]

    # -- audit log --------------------------------------------------------------------------

    async def add_audit(
        self, actor: str, action: str, target: str, before: Any = None, after: Any = None
    ) -> None:
        """Record one change (never a secret: callers pass configs and states, not tokens)."""
        await self._execute(q.ADD_AUDIT, actor[:100], action[:100], target[:300], before, after)

    async def list_audit(
        self, target: str | None, before_id: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Audit entries, newest first (of one target, if given), older than `before_id`."""
        rows = await self._fetch(q.LIST_AUDIT, target, before_id, limit)
        return [dict(r) for r in rows]

    async def delete_old_audit(self, before: datetime, limit: int) -> int:
        """Retention: delete up to `limit` entries older than `before`."""
        status = await self._execute(q.DELETE_OLD_AUDIT, before, limit)
        return int(status.split()[-1])

    async def get_action(self, callback_id: str) -> dict[str, Any] | None:
        """One action by its callbackId, for operators; None if unknown."""
        rows = await self._fetch(q.GET_ACTION, callback_id)
        return dict(rows[0]) if rows else None
