"""A portal's sender: its claimed rows in, completion requests out, within its budget.

The queue's limiter is checked and charged here, at the instant a request is built, so the
exact-rate invariant holds at send time whatever the supervisor planned. The sender owns
the rows it holds: a queue's coroutine hands them over with put() and waits on the future
it returns, which is done once none of them is held here any more.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from throttled import metrics
from throttled.aio import wait_event
from throttled.crypto import CryptoError
from throttled.db.repository import ClaimedAction, DatabaseError
from throttled.drain.budget import Budget
from throttled.drain.charges import RECHECK_S, Charges
from throttled.drain.judge import Judge
from throttled.drain.outcomes import Outcome, count, retry_all, run_length
from throttled.hubspot.client import TokenError
from throttled.queues import QueueState
from throttled.tokens import WAITING_FOR_CONNECTION, PortalNotConnected

if TYPE_CHECKING:
    from throttled.drain.dispatcher import Dispatcher

log = structlog.get_logger(__name__)

MIN_REQUEST_S = 1.0  # a request is not started with less of its portal's lease left


@dataclass(eq=False, slots=True)
class _Batch:
    queue: QueueState
    rows: deque[ClaimedAction]
    due: float  # the instant the rows were claimed for (for the scheduler-lag histogram)
    gone: asyncio.Future[None]  # done once no row is left here
    deadline: float  # no row's deadline is earlier (the earliest, or one already gone)


@dataclass(frozen=True, slots=True)
class _NoToken:
    """No access token could be had: the rows wait `delay_s` and are not counted as sent."""

    delay_s: float
    reason: str


def _emptied(batch: _Batch) -> None:
    if not batch.gone.done():
        batch.gone.set_result(None)


def _first_deadline(rows: Iterable[ClaimedAction]) -> float:
    """The earliest deadline among rows (inf: none)."""
    first = min((r.deadline for r in rows), default=None)  # (one timestamp(), not one a row)
    return math.inf if first is None else first.timestamp()


def _pop_expired(batch: _Batch, at: float) -> list[ClaimedAction]:
    """Remove rows whose HubSpot block has expired: sending them is pointless."""
    if batch.deadline > at:  # (the common case: no row's deadline is near)
        return []
    gone = [r for r in batch.rows if r.deadline.timestamp() <= at]
    if gone:
        batch.rows = deque(r for r in batch.rows if r.deadline.timestamp() > at)
    batch.deadline = _first_deadline(batch.rows)
    return gone


class PortalSender:
    """One portal: due rows in, completion requests out, within the portal's budget."""

    def __init__(self, portal_id: int, dispatcher: Dispatcher) -> None:
        self.portal_id = portal_id
        self._d = dispatcher
        self._heap: list[tuple[float, int, _Batch]] = []
        # Rows of queues that just woke from idle: they skip the soft pace (not the budget).
        self._urgent: list[tuple[float, _Batch]] = []
        self._budget = Budget(
            dispatcher.config.portal_requests, dispatcher.config.portal_interval_seconds
        )
        self._paused_until = 0.0
        self._judge = Judge(portal_id, dispatcher, self.pause)  # what an answer means
        self._wake = asyncio.Event()
        self._in_flight = asyncio.Semaphore(dispatcher.config.max_in_flight)
        self._tasks: dict[asyncio.Task[None], list[ClaimedAction]] = {}  # sends in flight
        self._charges = Charges(dispatcher.clock, dispatcher.margin_s, self._wake.set)

    @property
    def held(self) -> int:
        """Rows waiting here."""
        return sum(len(b.rows) for _, _, b in self._heap) + sum(
            len(b.rows) for _, b in self._urgent
        )

    @property
    def budget_used(self) -> int:
        """Requests for this portal its budget counts now (see Budget.used)."""
        return self._budget.used(self._d.clock())

    def seed(self, answered: Iterable[float]) -> None:
        """Requests sent by another instance, answered at these instants (this clock's):
        they count in the budget as if sent here."""
        for at in answered:
            self._budget.settle(at, at)

    def held_ids(self) -> Iterator[int]:
        """The rows held here or in a request under way."""
        for batch in [b for _, _, b in self._heap] + [b for _, b in self._urgent]:
            yield from (r.id for r in batch.rows)
        for rows in self._tasks.values():
            yield from (r.id for r in rows)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)  # (its outcome went to the writer before it ended)

    def put(
        self, queue: QueueState, rows: Sequence[ClaimedAction], at: float, *, urgent: bool = False
    ) -> asyncio.Future[None]:
        """Hand over claimed rows of one queue, to go out no earlier than `at`; the future is
        done once none of them is held here any more (sent, expired, recalled or released).
        Urgent rows (a queue waking from idle) go in the next request, without waiting for
        it to fill."""
        future = asyncio.get_running_loop().create_future()
        batch = _Batch(queue, deque(rows), at, future, _first_deadline(rows))
        if urgent:
            self._urgent.append((at, batch))
            self._wake.set()
        else:
            self._push(batch, at)
        if not rows:
            _emptied(batch)
        return batch.gone

    def held_of(self, queue: QueueState) -> int:
        """Rows of one queue waiting here."""
        batches = [b for _, _, b in self._heap] + [b for _, b in self._urgent]
        return sum(len(b.rows) for b in batches if b.queue is queue)

    def _push(self, batch: _Batch, at: float) -> None:
        heapq.heappush(self._heap, (at, next(self._d.seq), batch))
        self._wake.set()

    def pause(self, until: float) -> None:
        """Stop sending until `until` (HubSpot said 429)."""
        self._paused_until = max(self._paused_until, until)

    async def run(self, stop: asyncio.Event) -> None:
        """Send until stopped; then wait for in-flight requests."""
        try:
            while not stop.is_set():
                start = self._next_start(self._d.clock())
                if start is None or start > self._d.clock():
                    self._wake.clear()
                    timeout = None if start is None else start - self._d.clock()
                    await wait_event(self._wake, timeout, stop)
                    continue
                await self.send_next()
        finally:
            await self.settle()

    async def send_next(self) -> bool:
        """Send one request if one may go now (by the injected clock); whether one went.
        (The run-once step of run(), for tests that drive the clock.)"""
        start = self._next_start(self._d.clock())
        if start is None or start > self._d.clock():
            return False
        await self._in_flight.acquire()
        # The token first: the send instant is charged only once nothing can delay it.
        token = await self._token()
        if self._send_one(token):
            return True
        self._in_flight.release()
        return False

    async def settle(self) -> None:
        """Wait for the requests under way to be answered and their outcomes handed over."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _next_start(self, now: float) -> float | None:
        """When the next request may go (None: nothing held). Urgent rows and full requests
        need only the hard budget; a partial request also waits for the soft pace."""
        due = min(
            (self._heap[0][0] if self._heap else math.inf),
            min((at for at, _ in self._urgent), default=math.inf),
        )
        if due == math.inf:
            return None
        start = max(due, self._paused_until, self._budget.hard_earliest(now))
        if start > now:
            return start
        soft = self._budget.earliest(now)
        if soft <= now or any(at <= now for at, _ in self._urgent):
            return now
        ready, next_due = self._ready(now, self._d.config.batch_size)
        if ready >= self._d.config.batch_size:
            return now
        return min(soft, next_due)

    def _ready(self, now: float, need: int) -> tuple[int, float]:
        """Rows that could go at `now` (counting up to `need`), and when the next batch that
        is not yet due falls due."""
        n = 0
        next_due = math.inf
        for at, _, batch in self._heap:
            if at > now:
                next_due = min(next_due, at)
                continue
            allowed = batch.queue.limiter.allowance(now)
            if not allowed:  # held back by its own limiter: due again when that opens
                next_due = min(next_due, batch.queue.limiter.earliest(now))
                continue
            n += min(len(batch.rows), allowed)
            if n >= need:
                return n, now
        return n, next_due

    def recall(self, queue: QueueState) -> list[ClaimedAction]:
        """Remove and return the rows held here for one queue (it was paused)."""
        mine = [b for _, _, b in self._heap if b.queue is queue]
        mine += [b for _, b in self._urgent if b.queue is queue]
        if not mine:
            return []
        self._heap = [e for e in self._heap if e[2].queue is not queue]
        heapq.heapify(self._heap)
        self._urgent = [e for e in self._urgent if e[1].queue is not queue]
        rows = [r for b in mine for r in b.rows]
        for b in mine:
            b.rows.clear()
            _emptied(b)
        return rows

    def drain_rows(self) -> list[ClaimedAction]:
        """Remove and return every row still held (on shutdown, to release them)."""
        batches = [b for _, _, b in self._heap] + [b for _, b in self._urgent]
        rows = [r for b in batches for r in b.rows]
        for b in batches:
            b.rows.clear()
            _emptied(b)
        self._heap.clear()
        self._urgent.clear()
        return rows

    async def _token(self) -> str | _NoToken:
        try:
            return await self._d.tokens.access_token(self.portal_id)
        except PortalNotConnected as exc:  # its rows wait, uncounted, until it is connected
            log.debug("portal_not_connected", portal_id=self.portal_id, reason=exc.reason)
            return _NoToken(
                self._d.config.disconnected_retry_s, f"{WAITING_FOR_CONNECTION}: {exc.reason}"
            )
        except (TokenError, DatabaseError) as exc:  # backoff grows with the failed refreshes
            failures = self._d.tokens.health.portal(self.portal_id).refresh_failures
            return _NoToken(self._d.backoff(max(failures, 1)), f"token: {exc}")
        except CryptoError as exc:  # a stored token the key ring cannot open (rotated away?)
            log.error("portal_token_unreadable", portal_id=self.portal_id, error=str(exc))
            return _NoToken(60.0, "stored token cannot be decrypted")

    def _send_one(self, token: str | _NoToken) -> bool:
        at = self._d.clock()
        # The instant the request is charged to its queues' limiters, and stored as sent:
        # fixed here, once (the allowance for late writes moves between requests).
        charge = self._charges.charge(at)
        rows, expired = self._fill(at, charge)
        if expired:
            self._d.expire(expired)
        if not rows:
            return False
        if self._d.lease_left(self.portal_id) < MIN_REQUEST_S:  # the lease lapsed here (or
            # is about to): another instance may take the portal and send them
            self._d.writer.add(
                retry_all(rows, at, at, "portal lease lapsed", counted=False, sent=False)
            )
            return False
        if isinstance(token, _NoToken):
            self._d.writer.add(
                retry_all(rows, at, at + token.delay_s, token.reason, counted=False, sent=False)
            )
            return False
        self._budget.spend(at)
        send = self._send(rows, at, charge, token, self._charges.built(rows))
        task = asyncio.create_task(send, name=f"send-{self.portal_id}")
        self._tasks[task] = [r for _, r in rows]
        task.add_done_callback(self._sent)
        return True

    def _fill(
        self, at: float, charge: float
    ) -> tuple[list[tuple[QueueState, ClaimedAction]], list[ClaimedAction]]:
        """Take due rows, queue by queue, as far as each limiter allows at `at`; record
        them in their limiters as sent at `charge`."""
        room = self._d.config.batch_size
        taken: list[tuple[QueueState, ClaimedAction]] = []
        expired: list[ClaimedAction] = []
        group: int | None = None
        state: str | None = None  # one completion state per request
        skipped: list[tuple[float, _Batch]] = []
        if self._urgent:  # rows of queues waking from idle go first, then the rest by due time
            urgent = [(due, b) for due, b in self._urgent if due <= at]
            self._urgent = [(due, b) for due, b in self._urgent if due > at]
            for _, batch in reversed(urgent):
                heapq.heappush(self._heap, (-math.inf, next(self._d.seq), batch))
        while self._heap and self._heap[0][0] <= at and room > 0:
            due, _, batch = heapq.heappop(self._heap)
            queue = batch.queue
            if self._charges.waiting(queue.id):  # (a request of its is not written yet)
                skipped.append((at + RECHECK_S, batch))
                continue
            expired.extend(_pop_expired(batch, at))
            if not batch.rows:
                _emptied(batch)
                continue
            if not taken:
                group, state = batch.rows[0].split_group, queue.complete_as
            if batch.rows[0].split_group != group or queue.complete_as != state:
                skipped.append((due, batch))
                continue
            n = min(queue.limiter.allowance(at), room, run_length(batch.rows, group))
            for _ in range(n):
                taken.append((queue, batch.rows.popleft()))
            if n:
                # Charged a little late: a safety margin for delivery jitter on the way out.
                queue.limiter.record(charge, n)
                room -= n
                metrics.SCHEDULER_LAG.observe(at - batch.due)
            queue.sent += n
            if not batch.rows:
                _emptied(batch)
            else:
                again = at if n and room == 0 else queue.limiter.earliest(at)
                # Never later than the first row's deadline: held rows (a policy that moved
                # later, a queue held) are then expired, not kept claimed past it.
                skipped.append((min(again, batch.deadline), batch))
        for due, batch in skipped:
            self._push(batch, due)
        return taken, expired

    async def _send(
        self,
        rows: list[tuple[QueueState, ClaimedAction]],
        at: float,
        charge: float,
        token: str,
        unwritten: set[int],
    ) -> None:
        try:
            outcome = await self._attempt(rows, at, charge, token, unwritten)
            self._d.writer.add(outcome)
        except Exception:  # a bug here must not lose rows: release them for a later claim
            log.exception("send_failed_unexpectedly", portal_id=self.portal_id, rows=len(rows))
            portal = metrics.portal_label(self.portal_id)
            metrics.COMPLETIONS.inc(len(rows), portal=portal, outcome="error")
            self._d.writer.add(
                retry_all(rows, at, self._d.clock(), "internal error", counted=False, sent=False)
            )
        finally:
            self._charges.written(unwritten)  # (if it never was: it failed before)
            self._budget.settle(at, self._d.clock())  # (HubSpot counted it by now, if at all)
            self._in_flight.release()
            self._wake.set()

    async def _attempt(
        self,
        rows: list[tuple[QueueState, ClaimedAction]],
        at: float,
        charge: float,
        token: str,
        unwritten: set[int],
    ) -> Outcome:
        d = self._d
        state = rows[0][0].complete_as or "SUCCESS"  # (_fill puts one state in a request)
        body = d.client.completion_body([r.callback_id for _, r in rows], state)
        sent = [charge]  # the instant charged to the limiters (moved if written later), stored

        def on_sent() -> None:
            sent[0] = self._charges.sent(rows, at, sent[0])
            self._charges.written(unwritten)

        def on_written() -> None:
            # Normally well within the margin; after a pause (a garbage collection between
            # the first instant and the write) the charge moves to an instant past the write.
            sent[0] = self._charges.landed(rows, at, sent[0])

        started = time.monotonic()
        # A request is over before its portal's lease can expire in the database (abandoned
        # if need be: a timeout, retried like any other), so that no next owner sends its rows
        # while it is under way.
        timeout_s = d.lease_left(self.portal_id)
        result = await d.client.complete_batch(token, body, on_sent, on_written, timeout_s)
        latency = time.monotonic() - started
        d.tokens.health.result(
            self.portal_id,
            result.status,
            latency,
            max=result.rate_max,
            remaining=result.rate_remaining,
            daily=result.daily_max,
            daily_remaining=result.daily_remaining,
        )
        metrics.REQUESTS.inc(status=str(result.status))
        metrics.HUBSPOT_LATENCY.observe(latency, endpoint="complete", status=str(result.status))
        outcome = self._judge.judge(rows, sent[0], result, token)
        count(self.portal_id, result.status, outcome)
        return outcome
