"""What a portal's completion requests are charged to their queues' limiters, and when.

A request is charged when it is built (at its instant + the send margin + how late requests
have been written lately), then moved to the instant its bytes go to the socket + the margin
(on_sent) if that is later, and, after a pause between that instant and the write, past the
write (on_written): the rate log keeps the instant it went out. A move costs a log update per
queue of the request; a request is written a few milliseconds after it is built when the loop
is busy, so the charge allows for that (a recent high of the delay, decaying, MAX_LATE_S at
most) and a move is the exception. (A later charge only delays the queue's next send by as
much: never a send sooner than its rate allows.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from throttled import metrics
from throttled.db.repository import ClaimedAction
from throttled.queues import QueueState

RECHECK_S = 0.005  # how often the sender looks again at a queue waiting for a write
MAX_LATE_S = 0.02  # the allowance for a request's write after its build, at most
LATE_DECAY = 0.98  # per request: the allowance comes down as writes come sooner again


class Charges:
    """One portal's requests not yet written, and the moving of their charges."""

    def __init__(
        self, clock: Callable[[], float], margin_s: float, on_written: Callable[[], None]
    ) -> None:
        self._clock = clock
        self._margin_s = margin_s
        self._late_s = 0.0  # a recent high of the delay from a request's build to its write
        self._on_written = on_written  # (the sender looks again at the queues it held back)
        self._unwritten: dict[int, int] = {}  # queue id -> its requests not written yet

    def charge(self, built_at: float) -> float:
        """The instant a request built at `built_at` is charged to its queues' limiters."""
        return built_at + self._margin_s + self._late_s

    def sent(
        self, rows: Sequence[tuple[QueueState, ClaimedAction]], built_at: float, charged: float
    ) -> float:
        """The request built at `built_at` is being written now: learn how late, and move the
        charge if the write is later than it allowed (see redate)."""
        self._learn(self._clock() - built_at)
        return self.redate(rows, charged, margin=self._margin_s)

    def landed(
        self, rows: Sequence[tuple[QueueState, ClaimedAction]], built_at: float, charged: float
    ) -> float:
        """The request built at `built_at` has been written (seen from the loop's next step,
        a bound on the write's instant): learn how late, and move the charge past it if it
        is later still (see redate)."""
        self._learn(self._clock() - built_at - self._margin_s)
        return self.redate(rows, charged, margin=0.0)

    def _learn(self, late: float) -> None:
        self._late_s = min(MAX_LATE_S, max(late, self._late_s * LATE_DECAY))

    def waiting(self, queue_id: int) -> bool:
        """Whether a request of this queue is built but not yet written."""
        return queue_id in self._unwritten

    def built(self, rows: Sequence[tuple[QueueState, ClaimedAction]]) -> set[int]:
        """A request of these rows was built: its queues wait for its write (written())."""
        queue_ids = {queue.id for queue, _ in rows}
        for queue_id in queue_ids:
            self._unwritten[queue_id] = self._unwritten.get(queue_id, 0) + 1
        return queue_ids

    def written(self, queue_ids: set[int]) -> None:
        """The request built() returned `queue_ids` for was written (or will never be: it
        failed first). Once per request: the set is emptied."""
        for queue_id in queue_ids:
            left = self._unwritten.pop(queue_id, 1) - 1
            if left > 0:
                self._unwritten[queue_id] = left
        if queue_ids:
            queue_ids.clear()
            self._on_written()

    def redate(
        self, rows: Sequence[tuple[QueueState, ClaimedAction]], charged: float, *, margin: float
    ) -> float:
        """The request's bytes go out now: move the limiters' charge from `charged` to now +
        `margin`, if that is later; return the charged instant, which is also what the rate
        log keeps."""
        new = self._clock() + margin
        if new > charged:
            counts: dict[int, int] = {}
            queues: dict[int, QueueState] = {}
            for queue, _ in rows:
                counts[queue.id] = counts.get(queue.id, 0) + 1
                queues[queue.id] = queue
            for queue_id, n in counts.items():
                queues[queue_id].limiter.move(charged, new, n)
            metrics.CHARGES_MOVED.inc()
            return new
        return charged
