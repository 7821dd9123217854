"""The result writer: request outcomes gathered and written in few statements (group commit
for results)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from throttled.aio import Outage, wait_event
from throttled.db.repository import DatabaseError, DatabaseUnavailable, Repository
from throttled.drain.outcomes import Outcome, shielded, utc
from throttled.queues import QueueState


def _ignore(queue: QueueState, at: float) -> None:
    """No one to tell (a writer on its own, in a test)."""


def _nothing() -> None:
    """No one to tell."""


class ResultWriter:
    """Collects request outcomes and writes them in few statements (group commit for results)."""

    def __init__(self, repo: Repository, *, interval_s: float = 0.02) -> None:
        self._repo = repo
        # Told of each retry once it is written (the supervisor wakes the row's queue then).
        self.on_retry: Callable[[QueueState, float], None] = _ignore
        # Told when a write finds the database unreachable (the cluster stops sending then).
        self.on_unavailable: Callable[[], None] = _nothing
        self._interval_s = interval_s
        self._pending: list[Outcome] = []
        self._writing: Sequence[Outcome] = ()  # taken by the write under way
        self._wake = asyncio.Event()

    def held_ids(self) -> set[int]:
        """The rows whose outcome is not written yet (still claimed in the database)."""
        ids: set[int] = set()
        for o in (*self._pending, *self._writing):
            ids.update(r.id for r, _ in o.done)
            ids.update(rt.id for _, rt in o.retry)
            ids.update(r.id for r, _, _ in o.failed)
        return ids

    def add(self, outcome: Outcome) -> None:
        """Queue an outcome for the next write."""
        self._pending.append(outcome)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Write outcomes until stopped (the dispatcher writes the rest). Through a database
        outage the outcomes are kept, and written once it answers again."""
        outage = Outage("result-writer", "result_write_failed")
        while not stop.is_set():
            self._wake.clear()
            if not self._pending:
                await wait_event(self._wake, None, stop)
                continue
            try:
                await shielded(self.flush())
            except DatabaseError as exc:
                if isinstance(exc, DatabaseUnavailable):
                    self.on_unavailable()
                await wait_event(stop, outage.failed(exc, outcomes=len(self._pending)))
                continue
            outage.over()
            await wait_event(stop, self._interval_s)

    async def flush(self) -> None:
        """Write everything gathered so far; keep it for the next try if the database fails."""
        outcomes, self._pending = self._pending, []
        if not outcomes:
            return
        self._writing = outcomes
        try:
            await self._write(outcomes)
        except DatabaseError:
            self._pending[:0] = outcomes
            raise
        finally:
            self._writing = ()

    async def _write(self, outcomes: Sequence[Outcome]) -> None:
        """Three statements; each part written is removed from the outcomes at once, so that
        after a failure the next try writes only the rest (a retry written twice would put
        back to pending a row claimed again in between: sent twice)."""
        done = [(r.id, utc(at)) for o in outcomes for r, at in o.done]
        if done:
            await self._repo.mark_done([d[0] for d in done], [d[1] for d in done])
            for o in outcomes:
                o.done = []
        retried = [(queue, rt) for o in outcomes for queue, rt in o.retry]
        sends = [(q, utc(at), n) for o in outcomes for q, at, n in o.sends]
        if retried or sends:
            await self._repo.mark_retry([rt for _, rt in retried], sends)
            for o in outcomes:
                o.retry, o.sends = [], []
            for queue, retry in retried:
                at = retry.not_before.timestamp() if retry.not_before else 0.0
                self.on_retry(queue, at)
        failed = [(r.id, why, utc(at) if at else None) for o in outcomes for r, why, at in o.failed]
        if failed:
            await self._repo.mark_failed(
                [f[0] for f in failed], [f[1] for f in failed], [f[2] for f in failed]
            )
            for o in outcomes:
                o.failed = []
