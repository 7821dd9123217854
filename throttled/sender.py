"""Portal senders: batch due callbacks into completion requests within each portal's API budget.

The queue's limiter is checked and charged here, at the instant a request is built, so the
exact-rate invariant holds at send time whatever the scheduler planned.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from throttled import metrics
from throttled.aio import Outage, wait_event
from throttled.config import SenderConfig
from throttled.crypto import CryptoError
from throttled.db.repository import ClaimedAction, DatabaseError, Repository, Retry
from throttled.hubspot.client import CompletionResult, HubSpotClient, TokenError
from throttled.queues import QueueState
from throttled.tokens import WAITING_FOR_CONNECTION, PortalNotConnected, Tokens

log = structlog.get_logger(__name__)

Clock = Callable[[], float]
_R = TypeVar("_R")


@dataclass(eq=False, slots=True)
class _Batch:
    queue: QueueState
    rows: deque[ClaimedAction]
    due: float  # the instant the rows were claimed for (for the scheduler-lag histogram)


@dataclass(slots=True)
class _Outcome:
    """Rows of one request, with where they go next."""

    done: list[tuple[ClaimedAction, float]] = field(default_factory=list)
    retry: list[tuple[QueueState, Retry]] = field(default_factory=list)
    failed: list[tuple[ClaimedAction, str, float | None]] = field(default_factory=list)
    sends: list[tuple[int, float, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _NoToken:
    """No access token could be had: the rows wait `delay_s` and are not counted as sent."""

    delay_s: float
    reason: str


class Hooks:
    """What the senders tell the scheduler (set by the scheduler; no-ops by default)."""

    def dispatched(self, queue: QueueState) -> None:
        """All the rows the sender held for this queue have gone out."""

    def retry_at(self, queue: QueueState, at: float) -> None:
        """Rows of this queue are pending again and claimable from `at`."""


async def shielded(write: Coroutine[Any, Any, _R]) -> _R:
    """Await a final database write that a cancellation must not cut short. If the caller
    is cancelled (a shutdown past its deadline), the write goes on, and its outcome is still
    collected, so a failure is logged by the write, never as 'exception never retrieved'."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_collect)
        raise


def _collect(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _first_deadline(batch: _Batch) -> float:
    """The earliest deadline among a batch's rows."""
    return min(r.deadline.timestamp() for r in batch.rows)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class ResultWriter:
    """Collects request outcomes and writes them in few statements (group commit for results)."""

    def __init__(
        self, repo: Repository, hooks: Callable[[], Hooks], *, interval_s: float = 0.02
    ) -> None:
        self._repo = repo
        self._hooks = hooks  # looked up at each flush: the scheduler installs itself later
        self._interval_s = interval_s
        self._pending: list[_Outcome] = []
        self._writing: Sequence[_Outcome] = ()  # taken by the write under way
        self._wake = asyncio.Event()

    def held_ids(self) -> set[int]:
        """The rows whose outcome is not written yet (still claimed in the database)."""
        ids: set[int] = set()
        for o in (*self._pending, *self._writing):
            ids.update(r.id for r, _ in o.done)
            ids.update(rt.id for _, rt in o.retry)
            ids.update(r.id for r, _, _ in o.failed)
        return ids

    def add(self, outcome: _Outcome) -> None:
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

    async def _write(self, outcomes: Sequence[_Outcome]) -> None:
        """Three statements; each part written is removed from the outcomes at once, so that
        after a failure the next try writes only the rest (a retry written twice would put
        back to pending a row claimed again in between: sent twice)."""
        done = [(r.id, _utc(at)) for o in outcomes for r, at in o.done]
        if done:
            await self._repo.mark_done([d[0] for d in done], [d[1] for d in done])
            for o in outcomes:
                o.done = []
        retried = [(queue, rt) for o in outcomes for queue, rt in o.retry]
        sends = [(q, _utc(at), n) for o in outcomes for q, at, n in o.sends]
        if retried or sends:
            await self._repo.mark_retry([rt for _, rt in retried], sends)
            for o in outcomes:
                o.retry, o.sends = [], []
            for queue, retry in retried:
                at = retry.not_before.timestamp() if retry.not_before else 0.0
                self._hooks().retry_at(queue, at)
        failed = [
            (r.id, why, _utc(at) if at else None) for o in outcomes for r, why, at in o.failed
        ]
        if failed:
            await self._repo.mark_failed(
                [f[0] for f in failed], [f[1] for f in failed], [f[2] for f in failed]
            )
            for o in outcomes:
                o.failed = []


class Budget:
    """A sliding-window request budget (HubSpot's per-portal limit), with a soft pace.

    The hard limit is never exceeded. Below it, a request that is not full goes at once while
    less than half the budget is spent; beyond that, partial requests are spaced further and
    further apart as the window fills, so they wait to gather more callbacks and the rest of
    the budget stays free for full requests and for queues waking from idle.

    HubSpot counts a request when it arrives: some time after it was sent, before its answer
    came. So a request in flight takes its place in the budget until it is answered (it may
    arrive at any moment), and then counts from its answer's instant (settle), the latest
    HubSpot can have counted it at. However unevenly the network delays requests, HubSpot
    never sees more than `limit` in a window.
    """

    def __init__(self, limit: int, interval_s: float) -> None:
        self.limit = limit
        self.interval_s = interval_s
        self._log: list[float] = []  # answered requests: answer instants, in order
        self._open: list[float] = []  # requests in flight: when each was sent
        self._last_sent = -math.inf

    def hard_earliest(self, now: float) -> float:
        """When the budget allows the next request at all (never, until one in flight is
        answered, when those in flight fill it)."""
        expired = bisect.bisect_right(self._log, now - self.interval_s)
        if expired:
            del self._log[:expired]
        free = self.limit - len(self._open)
        if free <= 0:
            return math.inf
        if len(self._log) >= free:
            return self._log[-free] + self.interval_s
        return now

    def earliest(self, now: float) -> float:
        """When the next partial request may go: at once below half the budget; beyond
        that, spaced interval/limit x used/(limit - used) after the previous one."""
        hard = self.hard_earliest(now)
        used = len(self._log) + len(self._open)
        if hard > now or used * 2 < self.limit:
            return hard
        gap = self.interval_s / self.limit * used / (self.limit - used)
        return max(now, self._last_sent + gap)  # (the pace is between sends)

    def spend(self, at: float) -> None:
        """A request goes at `at`: it holds a place until settled."""
        self._open.append(at)
        self._last_sent = max(self._last_sent, at)

    def settle(self, sent_at: float, answered_at: float) -> None:
        """The request sent at `sent_at` was answered (or given up) at `answered_at`."""
        if sent_at in self._open:
            self._open.remove(sent_at)
        bisect.insort(self._log, max(sent_at, answered_at))


AUTH_RETRIES = 3  # different access tokens refused (401) in a row before a 401 counts


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
        self._refused_token: str | None = None  # the last token HubSpot answered 401 to
        self._refused_tokens = 0  # different tokens refused in a row
        self._wake = asyncio.Event()
        self._in_flight = asyncio.Semaphore(dispatcher.config.max_in_flight)
        self._tasks: dict[asyncio.Task[None], list[ClaimedAction]] = {}  # sends in flight

    @property
    def held(self) -> int:
        """Rows waiting here."""
        return sum(len(b.rows) for _, _, b in self._heap) + sum(
            len(b.rows) for _, b in self._urgent
        )

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
    ) -> None:
        """Hand over claimed rows of one queue, to go out no earlier than `at`. Urgent rows
        (a queue waking from idle) go in the next request, without waiting for it to fill."""
        queue.in_sender += len(rows)
        batch = _Batch(queue, deque(rows), at)
        if urgent:
            self._urgent.append((at, batch))
            self._wake.set()
        else:
            self._push(batch, at)

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
                await self._in_flight.acquire()
                # The token first: the send instant is charged only once nothing can delay it.
                token = await self._token()
                if not self._send_one(token):
                    self._in_flight.release()
        finally:
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
        queue.in_sender -= len(rows)
        return rows

    def drain_rows(self) -> list[ClaimedAction]:
        """Remove and return every row still held (on shutdown, to release them)."""
        batches = [b for _, _, b in self._heap] + [b for _, b in self._urgent]
        rows = [r for b in batches for r in b.rows]
        for b in batches:
            b.queue.in_sender -= len(b.rows)
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
        rows, expired = self._fill(at)
        if expired:
            self._d.expire(expired)
        if not rows:
            return False
        if isinstance(token, _NoToken):
            self._d.writer.add(
                _retry_all(rows, at, at + token.delay_s, token.reason, counted=False, sent=False)
            )
            return False
        self._budget.spend(at)
        task = asyncio.create_task(self._send(rows, at, token), name=f"send-{self.portal_id}")
        self._tasks[task] = [r for _, r in rows]
        task.add_done_callback(self._sent)
        return True

    def _fill(
        self, at: float
    ) -> tuple[list[tuple[QueueState, ClaimedAction]], list[ClaimedAction]]:
        """Take due rows, queue by queue, as far as each limiter allows at `at`."""
        room = self._d.config.batch_size
        taken: list[tuple[QueueState, ClaimedAction]] = []
        expired: list[ClaimedAction] = []
        group: int | None = None
        state: str | None = None  # one completion state per request
        skipped: list[tuple[float, _Batch]] = []
        margin = self._d.margin_s
        if self._urgent:  # rows of queues waking from idle go first, then the rest by due time
            urgent = [(due, b) for due, b in self._urgent if due <= at]
            self._urgent = [(due, b) for due, b in self._urgent if due > at]
            for _, batch in reversed(urgent):
                heapq.heappush(self._heap, (-math.inf, next(self._d.seq), batch))
        while self._heap and self._heap[0][0] <= at and room > 0:
            due, _, batch = heapq.heappop(self._heap)
            queue = batch.queue
            expired.extend(_pop_expired(batch, at))
            if not batch.rows:
                self._settled(queue, 0)
                continue
            if not taken:
                group, state = batch.rows[0].split_group, queue.complete_as
            if batch.rows[0].split_group != group or queue.complete_as != state:
                skipped.append((due, batch))
                continue
            n = min(queue.limiter.allowance(at), room, _run_length(batch.rows, group))
            for _ in range(n):
                taken.append((queue, batch.rows.popleft()))
            if n:
                # Charged a little late: a safety margin for delivery jitter on the way out.
                queue.limiter.record(at + margin, n)
                room -= n
                metrics.SCHEDULER_LAG.observe(at - batch.due)
            self._settled(queue, n)
            if batch.rows:
                again = at if n and room == 0 else queue.limiter.earliest(at)
                # Never later than the first row's deadline: held rows (a policy that moved
                # later, a queue held) are then expired, not kept claimed past it.
                skipped.append((min(again, _first_deadline(batch)), batch))
        for due, batch in skipped:
            self._push(batch, due)
        return taken, expired

    def _settled(self, queue: QueueState, n: int) -> None:
        queue.in_sender -= n
        queue.sent += n
        if queue.in_sender == 0:
            self._d.hooks.dispatched(queue)

    async def _send(
        self, rows: list[tuple[QueueState, ClaimedAction]], at: float, token: str
    ) -> None:
        try:
            outcome = await self._attempt(rows, at, token)
            self._d.writer.add(outcome)
        except Exception:  # a bug here must not lose rows: release them for a later claim
            log.exception("send_failed_unexpectedly", portal_id=self.portal_id, rows=len(rows))
            portal = metrics.portal_label(self.portal_id)
            metrics.COMPLETIONS.inc(len(rows), portal=portal, outcome="error")
            self._d.writer.add(
                _retry_all(rows, at, self._d.clock(), "internal error", counted=False, sent=False)
            )
        finally:
            self._budget.settle(at, self._d.clock())  # (HubSpot counted it by now, if at all)
            self._in_flight.release()
            self._wake.set()

    async def _attempt(
        self, rows: list[tuple[QueueState, ClaimedAction]], at: float, token: str
    ) -> _Outcome:
        d = self._d
        state = rows[0][0].complete_as or "SUCCESS"  # (_fill puts one state in a request)
        body = d.client.completion_body([r.callback_id for _, r in rows], state)
        sent = [at + d.margin_s]  # the instant charged to the limiters, and stored

        def on_sent() -> None:
            sent[0] = self._redate(rows, at)

        def on_written() -> None:
            # Normally well within the margin; after a pause (a garbage collection between
            # the first instant and the write) the charge moves to an instant past the write.
            sent[0] = self._redate(rows, sent[0] - d.margin_s, margin=0.0)

        started = time.monotonic()
        result = await d.client.complete_batch(token, body, on_sent, on_written)
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
        outcome = self._judge(rows, sent[0], result, token)
        _count(self.portal_id, result.status, outcome)
        return outcome

    def _redate(
        self,
        rows: list[tuple[QueueState, ClaimedAction]],
        charged: float,
        *,
        margin: float | None = None,
    ) -> float:
        """Move the limiters' charge from `charged` (+ the send margin) to now + `margin`,
        if that is later; return the charged instant, which is also what the rate log keeps."""
        now = self._d.clock()
        old = charged + self._d.margin_s
        new = now + (self._d.margin_s if margin is None else margin)
        if new > old:
            counts: dict[int, int] = {}
            queues: dict[int, QueueState] = {}
            for queue, _ in rows:
                counts[queue.id] = counts.get(queue.id, 0) + 1
                queues[queue.id] = queue
            for queue_id, n in counts.items():
                queues[queue_id].limiter.move(old, new, n)
        return max(old, new)

    def _judge(
        self,
        rows: list[tuple[QueueState, ClaimedAction]],
        at: float,
        result: CompletionResult,
        token: str,
    ) -> _Outcome:
        d = self._d
        now = d.clock()
        if result.ok:
            metrics.COMPLETED.inc(len(rows))
            self._refused_tokens = 0
            return _Outcome(done=[(r, at) for _, r in rows])
        if result.status == 429:
            wait = next(
                w
                for w in (
                    result.retry_after_s,
                    result.rate_interval_s,
                    d.config.portal_interval_seconds,
                )
                if w is not None
            )
            self.pause(now + wait)
            log.warning(
                "rate_limited", portal_id=self.portal_id, wait_s=wait, policy=result.policy_name
            )
            return _retry_all(
                rows, at, now + wait, f"429 {result.message}", counted=False, sent=True
            )
        if result.status == 401:
            # The token, not the actions: retried uncounted with a new one (whose refresh
            # may find the portal disconnected, and then they wait). Only when HubSpot has
            # refused AUTH_RETRIES different tokens in a row does a 401 count as a failure.
            d.tokens.invalidate(self.portal_id)
            if token != self._refused_token:
                self._refused_token = token
                self._refused_tokens += 1
            if self._refused_tokens <= AUTH_RETRIES:
                wait = d.backoff(self._refused_tokens)
                return _retry_all(
                    rows, at, now + wait, f"401 {result.message}", counted=False, sent=True
                )
        if result.status == 400 and len(rows) > 1:
            return _bisect(rows, at, result.message, d.new_group)
        if result.status == 400:
            _, row = rows[0]
            log.warning(
                "callback_rejected",
                portal_id=self.portal_id,
                callback_id=row.callback_id,
                error=result.message,
            )
            # The row's own sent_at keeps this send in the rate log.
            return _Outcome(failed=[(row, f"400 {result.message}", at)])
        reason = f"{result.status or 'network'} {result.message}".strip()
        return self._failure(rows, at, now, reason)

    def _failure(
        self, rows: list[tuple[QueueState, ClaimedAction]], at: float, now: float, reason: str
    ) -> _Outcome:
        d = self._d
        outcome = _Outcome(sends=_sends(rows, at))
        for queue, row in rows:
            if row.attempts + 1 >= d.config.max_attempts:
                outcome.failed.append(
                    (row, f"gave up after {row.attempts + 1} attempts: {reason}", None)
                )
                continue
            failures = row.failures + 1
            hold = failures % d.config.hold_after_failures == 0
            delay = d.config.hold_s if hold else d.backoff(failures)
            outcome.retry.append(
                (
                    queue,
                    Retry(
                        id=row.id,
                        not_before=_utc(now + delay),
                        error=reason,
                        counted=True,
                        split_group=row.split_group,
                    ),
                )
            )
        log.warning("send_failed", portal_id=self.portal_id, rows=len(rows), reason=reason)
        return outcome


# What a request's retried rows are counted as, by its status (others: "retry").
_RETRIED = {429: "rate_limited", 401: "unauthorized", 400: "bisected"}


def _count(portal_id: int, status: int, outcome: _Outcome) -> None:
    """Count a request's callbacks by portal and outcome (and a 429)."""
    portal = metrics.portal_label(portal_id)
    if status == 429:
        metrics.RATE_LIMITED.inc(portal=portal)
    for name, n in (
        ("completed", len(outcome.done)),
        ("rejected" if status == 400 else "failed", len(outcome.failed)),
        (_RETRIED.get(status, "retry"), len(outcome.retry)),
    ):
        if n:
            metrics.COMPLETIONS.inc(n, portal=portal, outcome=name)


def _run_length(rows: deque[ClaimedAction], group: int | None) -> int:
    """How many leading rows belong to the request's split group."""
    n = 0
    for row in rows:
        if row.split_group != group:
            break
        n += 1
    return n


def _pop_expired(batch: _Batch, at: float) -> list[ClaimedAction]:
    """Remove rows whose HubSpot block has expired: sending them is pointless."""
    if all(r.deadline.timestamp() > at for r in batch.rows):
        return []
    keep = deque(r for r in batch.rows if r.deadline.timestamp() > at)
    gone = [r for r in batch.rows if r.deadline.timestamp() <= at]
    batch.rows = keep
    batch.queue.in_sender -= len(gone)
    return gone


def _sends(
    rows: Sequence[tuple[QueueState, ClaimedAction]], at: float
) -> list[tuple[int, float, int]]:
    counts: dict[int, int] = {}
    for queue, _ in rows:
        if queue.complete_as is None:  # (a release is not held to, nor charged to, the rate)
            counts[queue.id] = counts.get(queue.id, 0) + 1
    return [(qid, at, n) for qid, n in counts.items()]


def _retry_all(
    rows: Sequence[tuple[QueueState, ClaimedAction]],
    at: float,
    not_before: float,
    reason: str,
    *,
    counted: bool,
    sent: bool,
) -> _Outcome:
    retries = [
        (
            q,
            Retry(
                id=r.id,
                not_before=_utc(not_before),
                error=reason,
                counted=counted,
                split_group=r.split_group,
            ),
        )
        for q, r in rows
    ]
    return _Outcome(retry=retries, sends=_sends(rows, at) if sent else [])


def _bisect(
    rows: Sequence[tuple[QueueState, ClaimedAction]],
    at: float,
    reason: str,
    new_group: Callable[[], int],
) -> _Outcome:
    """A rejected batch is split in two; each half is retried on its own to find the bad rows."""
    half = len(rows) // 2
    outcome = _Outcome(sends=_sends(rows, at))
    for part in (rows[:half], rows[half:]):
        group = new_group()
        for q, r in part:
            outcome.retry.append(
                (
                    q,
                    Retry(
                        id=r.id,
                        not_before=None,
                        error=f"400 {reason}",
                        counted=False,
                        split_group=group,
                    ),
                )
            )
    log.info("batch_bisected", rows=len(rows), reason=reason)
    return outcome


class Dispatcher:
    """Owns the portal senders and the result writer."""

    def __init__(
        self,
        *,
        repo: Repository,
        client: HubSpotClient,
        tokens: Tokens,
        config: SenderConfig,
        clock: Clock,
        hooks: Hooks | None = None,
        margin_s: float = 0.002,
    ) -> None:
        self.repo = repo
        self.client = client
        self.tokens = tokens
        self.config = config
        self.clock = clock
        self.hooks = hooks or Hooks()
        self.margin_s = margin_s
        self.writer = ResultWriter(repo, lambda: self.hooks)
        self.seq = itertools.count()
        self._senders: dict[int, PortalSender] = {}
        self._group = itertools.count(random.randrange(1 << 40))
        self._tg: asyncio.TaskGroup | None = None
        self._stop: asyncio.Event | None = None
        self._expired: list[ClaimedAction] = []
        self._expiring: list[ClaimedAction] = []  # being marked expired

    def new_group(self) -> int:
        """A fresh split-group id."""
        return next(self._group)

    def backoff(self, failures: int) -> float:
        """Exponential backoff with full jitter."""
        # (failures comes from a stored row: the exponent is capped before it is computed)
        doubling = 2.0 ** min(max(failures - 1, 0), 64)
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * doubling)
        return random.uniform(cap / 2, cap)

    def put(
        self, queue: QueueState, rows: Sequence[ClaimedAction], at: float, *, urgent: bool = False
    ) -> None:
        """Hand claimed rows to their portal's sender."""
        self._sender(queue.portal_id).put(queue, rows, at, urgent=urgent)

    def recall(self, queue: QueueState) -> list[ClaimedAction]:
        """Take back the rows a sender holds for this queue, unsent (it was paused)."""
        sender = self._senders.get(queue.portal_id)
        return [] if sender is None else sender.recall(queue)

    def expire(self, rows: list[ClaimedAction]) -> None:
        """Rows whose block expired while claimed: never sent."""
        self._expired.extend(rows)

    def _sender(self, portal_id: int) -> PortalSender:
        sender = self._senders.get(portal_id)
        if sender is None:
            if self._tg is None or self._stop is None:
                raise RuntimeError("dispatcher not running")
            sender = self._senders[portal_id] = PortalSender(portal_id, self)
            self._tg.create_task(sender.run(self._stop), name=f"portal-sender-{portal_id}")
        return sender

    @property
    def held(self) -> int:
        """Rows waiting in all senders."""
        return sum(s.held for s in self._senders.values())

    def held_ids(self) -> set[int]:
        """Every claimed row this process holds: in a sender, in a request under way, or with
        an outcome not written yet. (Taken synchronously: nothing moves meanwhile.)"""
        ids = self.writer.held_ids()
        for sender in self._senders.values():
            ids.update(sender.held_ids())
        ids.update(r.id for r in (*self._expired, *self._expiring))
        return ids

    async def run(self, stop: asyncio.Event, writer_stop: asyncio.Event) -> None:
        """Run senders until `stop`, then release unsent rows; the writer until `writer_stop`."""
        async with asyncio.TaskGroup() as outer:
            outer.create_task(self.writer.run(writer_stop), name="result-writer")
            outer.create_task(self._expire_loop(writer_stop), name="claimed-expiry")
            async with asyncio.TaskGroup() as tg:
                self._tg, self._stop = tg, stop
                await stop.wait()
            unsent = [r.id for s in self._senders.values() for r in s.drain_rows()]
            if unsent:
                await shielded(self.repo.release(unsent))
            await shielded(self.writer.flush())
            log.info("senders_stopped", released=len(unsent))

    async def _expire_loop(self, stop: asyncio.Event) -> None:
        """Mark expired the rows the senders found past their deadline, about once a second.
        Through a database outage they are kept, and written once it answers again."""
        outage = Outage("claimed-expiry", "claimed_expiry_failed")
        delay = 1.0
        while not stop.is_set():
            await wait_event(stop, delay)
            delay = 1.0
            rows, self._expired = self._expired, []
            if not rows:
                continue
            self._expiring = rows
            try:
                await shielded(self.repo.mark_expired([r.id for r in rows]))
            except DatabaseError as exc:
                self._expired[:0] = rows
                delay = outage.failed(exc, rows=len(rows))
                continue
            finally:
                self._expiring = []
            outage.over()
            metrics.EXPIRED.inc(len(rows))
