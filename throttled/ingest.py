"""Group commit: handlers hand over rows, flushers write each gathered batch in one statement."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from throttled import metrics
from throttled.db.repository import (
    DatabaseError,
    DatabaseUnavailable,
    NewAction,
    QueueRow,
    Repository,
)

log = structlog.get_logger(__name__)

ABANDON_GRACE_S = 2.0  # a commit cancelled at the shutdown timeout may still answer this long


class Overloaded(Exception):
    """The ingest buffer is full; answer 429 and let HubSpot retry."""


class Stopping(Exception):
    """The daemon is shutting down; answer 503 and let HubSpot retry."""


class _Item:
    __slots__ = ("action", "done")

    def __init__(self, action: NewAction, done: asyncio.Future[None]) -> None:
        self.action = action
        self.done = done


class Ingest:
    """Buffers accepted actions and commits them in batches; each submitter waits for COMMIT."""

    def __init__(
        self,
        repo: Repository,
        *,
        batch_max: int,
        max_pending: int,
        flushers: int,
        linger_s: float = 0.0,
        overlap_s: float = 0.0,
        commit_timeout_s: float | None = None,
        on_stored: Callable[[set[int], list[QueueRow]], None] = lambda _ids, _changed: None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._repo = repo
        self._batch_max = batch_max
        self._max_pending = max_pending
        self._flushers = flushers
        self._linger_s = linger_s
        self._overlap_s = overlap_s
        self._commit_timeout_s = commit_timeout_s
        self._in_flight = 0  # group commits under way
        self._started = 0.0  # when the latest of them began (by its clock)
        self._on_stored = on_stored
        self._clock = clock  # (the overlap's: the loop's time, unless a test's)
        self._items: list[_Item] = []
        self._wake = asyncio.Event()
        self._closed = False
        # queue key -> (id, policy, rate inputs, action definition) as last stored
        self._queue_ids: dict[str, tuple[int, object, object, int | None]] = {}
        self.batches = 0
        self.rows = 0

    @property
    def pending(self) -> int:
        """Rows waiting for a flush."""
        return len(self._items)

    async def submit(self, action: NewAction) -> None:
        """Return once the action's row is committed; raise Overloaded, Stopping or DB errors.
        Past the commit timeout (a database that takes statements and answers nothing, say)
        raise DatabaseUnavailable: the row is dropped if no commit has taken it yet, and may
        still be stored if one has (HubSpot's retry is then a duplicate, answered as one)."""
        if self._closed:
            raise Stopping()
        if len(self._items) >= self._max_pending:
            raise Overloaded()
        item = _Item(action, asyncio.get_running_loop().create_future())
        self._items.append(item)
        self._wake.set()
        # Cancelled (client gone)? The row is still committed; HubSpot's retry gets a duplicate.
        if self._commit_timeout_s is None:
            await item.done
            return
        try:
            await asyncio.wait_for(asyncio.shield(item.done), self._commit_timeout_s)
        except TimeoutError:
            with contextlib.suppress(ValueError):
                self._items.remove(item)  # (not taken by a commit yet: never written)
            metrics.INGEST_TIMEOUTS.inc()
            raise DatabaseUnavailable(
                f"no commit within {self._commit_timeout_s:g} s (ingest.commit_timeout_s)"
            ) from None

    async def run(self, stop: asyncio.Event) -> None:
        """Run the flushers until `stop`, then commit whatever is buffered."""
        async with asyncio.TaskGroup() as tg:
            for n in range(self._flushers):
                tg.create_task(self._flusher(stop), name=f"ingest-flusher-{n}")
            await stop.wait()
            self._closed = True
            self._wake.set()

    async def _flusher(self, stop: asyncio.Event) -> None:
        # Each flusher keeps one connection between batches, taken again after an outage.
        writer: Repository | None = None
        clock = self._clock or asyncio.get_running_loop().time
        try:
            while True:
                if not self._items:
                    if self._closed:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if self._linger_s and len(self._items) < self._batch_max and not self._closed:
                    await asyncio.sleep(self._linger_s)
                wait = self._join_wait(clock())
                if wait > 0:
                    await asyncio.sleep(wait)  # (at most overlap_s: 100 ms)
                    continue  # it may have finished, and its flusher taken the rows
                batch = self._items[: self._batch_max]
                del self._items[: self._batch_max]
                self._in_flight += 1
                self._started = clock()
                commit = asyncio.ensure_future(self._commit(writer, batch))
                try:
                    writer = await asyncio.shield(commit)
                except asyncio.CancelledError:
                    writer = await self._abandon(commit, batch)
                    raise
                finally:
                    self._in_flight -= 1
        finally:
            if writer is not None:
                await writer.give_back()

    async def _abandon(
        self, commit: asyncio.Future[Repository | None], batch: list[_Item]
    ) -> Repository | None:
        """Cancelled mid-commit (stopping past the shutdown timeout): give the commit a moment
        to answer its submitters; past it, answer them 503 (nothing was acknowledged) and drop
        its connection, which is in the middle of a statement (the pool's close ends it).
        The connection to give back, if the commit ended."""
        await asyncio.wait([commit], timeout=ABANDON_GRACE_S)
        if not commit.done():
            commit.cancel()
            _settle(batch, Stopping())
            return None
        if commit.cancelled() or commit.exception() is not None:
            return None
        return commit.result()

    def _join_wait(self, now: float) -> float:
        """How long to wait before a commit beside one under way (<= 0: start now). One joins
        in only once the other has taken overlap_s: under load the rows gathered meanwhile
        make one bigger batch (less work per row, in Python and in PostgreSQL) instead of
        several small ones, while a slow commit cannot hold the next one back for longer."""
        if not self._in_flight or len(self._items) >= self._batch_max or self._closed:
            return 0.0
        return self._started + self._overlap_s - now

    async def _commit(self, writer: Repository | None, batch: list[_Item]) -> Repository | None:
        """Store a batch over the flusher's own connection and settle its submitters; return
        the connection to keep (None after an outage). One held from before that turns out
        broken (ended by the server while idle, say) is replaced and the batch sent once
        more: both statements are idempotent, so rows that did commit are not doubled."""
        attempts = 1 if writer is None else 2
        for attempt in range(attempts):
            try:
                writer = writer or await self._repo.hold()
                ok = await self._flush(writer, batch)
            except DatabaseError as exc:  # hold(): any; _flush(): only DatabaseUnavailable
                if writer is not None:
                    await writer.give_back()  # the pool replaces a broken one
                    writer = None
                if isinstance(exc, DatabaseUnavailable) and attempt + 1 < attempts:
                    continue
                log.warning("ingest_flush_failed", rows=len(batch), error=str(exc))
                _settle(batch, exc)
                return None
            if not ok:
                await writer.give_back()  # after a crash it may be in any state
                return None
            return writer
        return None

    async def _flush(self, writer: Repository, batch: list[_Item]) -> bool:
        """Store a batch and settle its submitters (raise DatabaseUnavailable on an outage,
        leaving those not yet settled); False if it crashed."""
        started = time.perf_counter()
        try:
            queue_ids, changed = await self._store(writer, [i.action for i in batch])
        except DatabaseUnavailable:
            raise
        except DatabaseError as exc:
            if len(batch) > 1:
                return await self._flush_one_by_one(writer, batch)
            log.warning("ingest_flush_failed", rows=len(batch), error=str(exc))
            _settle(batch, exc)
            return True
        except Exception as exc:  # never leave a submitter waiting forever
            log.exception("ingest_flush_crashed", rows=len(batch))
            _settle(batch, DatabaseError(f"{type(exc).__name__}: {exc}"))
            return False
        metrics.INGEST_COMMIT.observe(time.perf_counter() - started)
        metrics.INGEST_BATCH.observe(len(batch))
        self.batches += 1
        self.rows += len(batch)
        _settle(batch, None)
        self._on_stored(queue_ids, changed)
        return True

    async def _flush_one_by_one(self, writer: Repository, batch: list[_Item]) -> bool:
        """A statement error (not an outage) isolates the bad row instead of failing the batch."""
        ok = True
        for item in batch:  # every one, even after a crash: none may be left waiting
            ok = await self._flush(writer, [item]) and ok
        return ok

    async def _store(
        self, writer: Repository, actions: list[NewAction]
    ) -> tuple[set[int], list[QueueRow]]:
        stale = self._stale(actions)
        if stale:  # a redelivered action must not re-resolve its queue: no side effect at all
            known = await writer.stored_callbacks([a.callback_id for a in actions])
            if known:
                actions = [a for a in actions if a.callback_id not in known]
                stale = self._stale(actions)
        changed: list[QueueRow] = []
        if stale:
            fresh = await writer.upsert_queues(
                list(stale),
                [a.portal_id for a in stale.values()],
                [a.policy for a in stale.values()],
                [a.action_id for a in stale.values()],
                [a.rate_inputs for a in stale.values()],
            )
            for row in fresh:
                action = stale[row.key]
                self._queue_ids[row.key] = (
                    row.id,
                    action.policy,
                    action.rate_inputs,
                    action.action_id,
                )
                changed.append(row)
        ids = [self._queue_ids[a.queue_key][0] for a in actions]
        if actions:
            await writer.insert_actions(actions, ids)
        return set(ids), changed

    def _stale(self, actions: list[NewAction]) -> dict[str, NewAction]:
        """Per queue key, the batch's last action whose queue is new or whose policy (or
        what it was resolved from: inputs, action definition) changed. The same policy object
        means the same inputs: intake hands out one per distinct set of rate fields."""
        return {
            a.queue_key: a
            for a in actions
            if (cached := self._queue_ids.get(a.queue_key)) is None
            or cached[3] != a.action_id
            or (cached[1] is not a.policy and (cached[1] != a.policy or cached[2] != a.rate_inputs))
        }


def _settle(batch: list[_Item], exc: BaseException | None) -> None:
    for item in batch:
        if item.done.done():
            continue
        if exc is None:
            item.done.set_result(None)
        else:
            item.done.set_exception(exc)
