"""A portal's request budget: HubSpot's sliding-window limit per portal, with a soft pace."""

from __future__ import annotations

import bisect
import math


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

    def used(self, now: float) -> int:
        """Requests the budget counts at `now`: answered within the interval, or in flight."""
        self.hard_earliest(now)  # (forgets those answered before the interval)
        return len(self._log) + len(self._open)

    def spend(self, at: float) -> None:
        """A request goes at `at`: it holds a place until settled."""
        self._open.append(at)
        self._last_sent = max(self._last_sent, at)

    def settle(self, sent_at: float, answered_at: float) -> None:
        """The request sent at `sent_at` was answered (or given up) at `answered_at`."""
        if sent_at in self._open:
            self._open.remove(sent_at)
        bisect.insort(self._log, max(sent_at, answered_at))
