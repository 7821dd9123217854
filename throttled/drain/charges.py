"""What a portal's completion requests are charged to their queues' limiters, and when.

A request is charged when it is built (at its instant + the send margin), then moved to the
instant its bytes go to the socket (on_sent) and, after a pause between that instant and the
write, past the write (on_written): the rate log keeps the instant it went out. Until a
request is written, its queues get no other request: one built meanwhile (its charge an
instant that a late write overtakes) could otherwise go out within a window of this one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from throttled.db.repository import ClaimedAction
from throttled.queues import QueueState

RECHECK_S = 0.005  # how often the sender looks again at a queue waiting for a write


class Charges:
    """One portal's requests not yet written, and the moving of their charges."""

    def __init__(
        self, clock: Callable[[], float], margin_s: float, on_written: Callable[[], None]
    ) -> None:
        self._clock = clock
        self._margin_s = margin_s
        self._on_written = on_written  # (the sender looks again at the queues it held back)
        self._unwritten: dict[int, int] = {}  # queue id -> its requests not written yet

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
        self,
        rows: Sequence[tuple[QueueState, ClaimedAction]],
        charged: float,
        *,
        margin: float | None = None,
    ) -> float:
        """Move the limiters' charge from `charged` (+ the send margin) to now + `margin`,
        if that is later; return the charged instant, which is also what the rate log keeps."""
        old = charged + self._margin_s
        new = self._clock() + (self._margin_s if margin is None else margin)
        if new > old:
            counts: dict[int, int] = {}
            queues: dict[int, QueueState] = {}
            for queue, _ in rows:
                counts[queue.id] = counts.get(queue.id, 0) + 1
                queues[queue.id] = queue
            for queue_id, n in counts.items():
                queues[queue_id].limiter.move(old, new, n)
        return max(old, new)
