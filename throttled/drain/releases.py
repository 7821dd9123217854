"""The release lane: rows an operator released (fail-pending) go to the senders as
FAIL_CONTINUE completions, a chunk per queue at a time, until none is left. Not held to the
queue's rate or pause, only to the portal's budget, and not charged to the rate log."""

from __future__ import annotations

import asyncio

import structlog

from throttled.aio import Outage, wait_event
from throttled.db.repository import DatabaseError, QueueRow, Repository
from throttled.drain.claimer import Claimer
from throttled.drain.dispatcher import Dispatcher
from throttled.queues import QueueLimiter, QueueState, release_of

log = structlog.get_logger(__name__)

RELEASE_CHUNK = 500  # released rows a queue hands its sender at a time
RELEASE_RECHECK_S = 1.0  # how often a release with rows in backoff looks again
FAIL_CONTINUE = "FAIL_CONTINUE"


class Releases:
    """Queues with released rows, each carried by its own release state."""

    def __init__(self, repo: Repository, claimer: Claimer, dispatcher: Dispatcher) -> None:
        self._repo = repo
        self._claimer = claimer
        self._dispatcher = dispatcher
        self.releases: dict[int, QueueState] = {}  # queue id -> its release's state
        self._held: dict[int, asyncio.Future[None]] = {}  # a chunk its sender still holds
        self._wake = asyncio.Event()
        self.queues: dict[int, QueueState] = {}  # the supervisor's (told when one is done)

    def start(self, row: QueueRow, queue: QueueState | None) -> None:
        """A queue has released rows: carry them (once per queue)."""
        if row.id not in self.releases:
            owner = queue or QueueState(
                id=row.id,
                key=row.key,
                portal_id=row.portal_id,
                limiter=QueueLimiter(None, key=row.key),
            )
            self.releases[row.id] = release_of(owner, FAIL_CONTINUE)
        self._wake.set()

    def wake(self) -> None:
        """Look again now (a released row went back to pending)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Hand released rows to the senders until stopped."""
        outage = Outage("release", "release_db_error")
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.release_once()
            except DatabaseError as exc:
                await wait_event(stop, outage.failed(exc))
                continue
            outage.over()
            timeout = RELEASE_RECHECK_S if self.releases else None
            await wait_event(self._wake, timeout, stop)

    async def release_once(self) -> None:
        """One pass over the releases (the run-once step, for tests)."""
        await self._claimer.release_unanswered()
        for queue_id, release in list(self.releases.items()):
            held = self._held.get(queue_id)
            if held is not None and not held.done():
                continue
            stamp = self._claimer.stamp()
            try:
                rows = await self._repo.claim_released(queue_id, RELEASE_CHUNK, stamp)
            except DatabaseError:
                self._claimer.unanswered(stamp)
                raise
            if rows:
                gone = self._dispatcher.put(release, rows, self._dispatcher.clock())
                gone.add_done_callback(lambda _: self._wake.set())
                self._held[queue_id] = gone
            elif await self._repo.end_release(queue_id):
                del self.releases[queue_id]
                self._held.pop(queue_id, None)
                queue = self.queues.get(queue_id)
                if queue is not None:
                    queue.releasing = False
                log.info("queue_release_done", queue=release.key, sent=release.sent)
