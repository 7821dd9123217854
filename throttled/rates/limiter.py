"""The exact-rate limiter: a queue's rate log, its allowance, earliest send and plan.

Pure math: no I/O, no asyncio, no clock. Every instant is an argument.

Float conventions (the limiter and its tests agree on them):

* A send recorded at ``e`` counts in the window ending at ``t`` iff ``t - T < e <= t``,
  evaluated in floating point exactly as written. The invariant is: for every ``t`` the
  count is at most N.
* Even pacing spaces sends so that ``t >= last + T / N``.
"""

from __future__ import annotations

import bisect
import math
from collections import deque

from throttled.rates.policy import RatePolicy
from throttled.rates.schedule import _SCAN_DAYS, HORIZON_EPOCH, _utc_floor

_WEEK_S = 7 * 86_400.0
# A log this long becomes a deque (dropping its oldest entries costs O(1), not a move of the
# rest); shorter, a list, which costs a tenth of a deque's memory (760 bytes even when empty):
# most queues hold a few entries, and a daemon knows a hundred thousand queues.
_DEQUE_AT = 64

_Log = list[tuple[float, int]] | deque[tuple[float, int]]
_MAX_PLAN_STEPS = 64  # plan(): extra steps allowed beyond one per send (never expected)


# --- limiter ------------------------------------------------------------------------------


def _steps(span: float, step: float) -> int:
    """Instants a, a + step, a + 2 step, ... before a + span (an instant within float noise
    of the end counts as at it: out, as plan()'s nudged instants are)."""
    return 0 if span <= 0 else max(1, math.ceil(span / step - 1e-9))


class Limiter:
    """Exact-rate guard for one queue: at most N sends in every window (t - T, t]."""

    __slots__ = (
        "_even",
        "_gap",
        "_last",
        "_limit",
        "_log",
        "_period",
        "_policy",
        "_schedule",
        "_span_cache",
        "_total",
    )

    # Instants are epoch seconds (floats) and should be non-decreasing. An instant earlier
    # than the latest recorded send gets no allowance: sends are never placed behind the log,
    # because the windows they would join may already be full (or pruned).

    def __init__(self, policy: RatePolicy) -> None:
        self._log: _Log = []  # (instant, sends), ascending
        self._total = 0  # sends in the log
        self._last = -math.inf  # latest instant ever recorded
        self.set_policy(policy)

    @property
    def policy(self) -> RatePolicy:
        """The current policy."""
        return self._policy

    def set_policy(self, policy: RatePolicy) -> None:
        """Change the rate; the log is kept (it only reaches back one old period)."""
        self._policy = policy
        self._limit, self._period = policy.limit, policy.period_s
        self._gap = policy.period_s / policy.limit
        self._even = policy.pacing == "even"
        schedule = policy.schedule
        self._schedule = None if schedule is None or schedule.unrestricted else schedule
        self._span_cache = (math.inf, math.inf, math.inf)  # (asked at, opens, closes)

    def record(self, at: float, n: int) -> None:
        """Log n sends dispatched at instant at."""
        if n < 0:
            raise ValueError(f"cannot record {n} sends")
        if n == 0:
            return
        log = self._log
        if not log or at > log[-1][0]:
            log.append((at, n))
            if type(log) is list and len(log) > _DEQUE_AT:
                self._log = deque(log)
        elif at == log[-1][0]:
            log[-1] = (at, log[-1][1] + n)
        else:
            self._insert(at, n)
        self._total += n
        self._last = max(self._last, at)
        self._prune()

    def move(self, old_at: float, new_at: float, n: int) -> None:
        """Re-date n sends recorded at old_at to the later instant new_at (they went out late)."""
        log = self._log
        if log and log[-1] == (old_at, n) and new_at > old_at:  # (the latest, as a rule)
            log[-1] = (new_at, n)
            self._last = max(self._last, new_at)
            self._prune()
            return
        i = bisect.bisect_left(log, old_at, key=lambda entry: entry[0])
        if i < len(log) and log[i][0] == old_at:
            taken = min(n, log[i][1])
            if taken == log[i][1]:
                del log[i]
            else:
                log[i] = (old_at, log[i][1] - taken)
            self._total -= taken
        self.record(max(new_at, old_at), n)

    def quiet_since(self, at: float) -> bool:
        """Whether no send it recorded can count in any window ending at or after `at` (its
        log could be dropped and the queue forgotten: nothing of it constrains a send)."""
        return self._last <= at - self._period

    def window_count(self, at: float) -> int:
        """Recorded sends in the window (at - T, at]."""
        cutoff, expired = at - self._period, 0
        for e, n in self._log:
            if e > cutoff:
                break
            expired += n
        return self._total - expired

    def allowance(self, at: float) -> int:
        """How many sends may be dispatched at instant at without breaking the invariant."""
        if at < self._last or not self._open(at):
            return 0
        room = self._limit - self.window_count(at)
        if room <= 0:
            return 0
        if self._even:
            return 1 if at >= self._last + self._gap else 0
        return room

    def earliest(self, at: float) -> float:
        """Earliest instant >= at with an allowance of at least 1; math.inf if never."""
        t = self._log_ready(max(at, self._last))
        if self._even:
            t = max(t, self._last + self._gap)
        return self._open_from(t)

    def plan(self, at: float, horizon_s: float, max_n: int) -> list[float]:
        """Dispatch instants in [at, at + horizon_s) for up to max_n sends (log untouched)."""
        sim, end, t = self._copy(), at + horizon_s, at
        out: list[float] = []
        for _ in range(max_n + _MAX_PLAN_STEPS):  # bounded: never a spin, whatever the floats
            if len(out) >= max_n:
                break
            t = sim.earliest(t)
            if t >= end:
                break
            k = min(sim.allowance(t), max_n - len(out))
            if k <= 0:  # defensive: never expected, but must not spin
                t = math.nextafter(t, math.inf)
                continue
            out.extend([t] * k)
            sim.record(t, k)
        return out

    def count_within(self, at: float, horizon_s: float, max_n: int) -> int:
        """How many sends plan() would place in [at, at + horizon_s) (up to max_n), without
        its simulation when no schedule restricts the queue: each unit of the window's room
        (free at the earliest send, or once a logged send leaves the window) is used again one
        period later. Exact but for float nudges at a window's edge (a claim's size, not a
        limit: the limiter still decides every send)."""
        if self._schedule is not None:
            return len(self.plan(at, horizon_s, max_n))
        first = self.earliest(at)
        end = at + horizon_s
        if first >= end or max_n <= 0:
            return 0
        if self._even:
            return min(max_n, _steps(end - first, self._gap))
        period = self._period
        count = (self._limit - self.window_count(first)) * _steps(end - first, period)
        cutoff = first - period
        for e, n in self._log:
            if count >= max_n:
                break
            free = e + period  # (this entry's sends leave the window, their room reused)
            if e > cutoff and free < end:
                count += n * _steps(end - free, period)
        return min(max_n, count)

    def backlog_eta(self, at: float, backlog: int) -> float:
        """Estimated instant a backlog is fully sent, counting schedule gaps approximately."""
        # Busy time is (batches - 1) x T for window pacing, (backlog - 1) x T/N for even,
        # from the first release; it is laid over the schedule's open time, measured over
        # one week and repeated weekly. DST shifts and batches straddling a close, and log
        # entries expiring earlier than a full period, make this an estimate.
        if backlog <= 0:
            return at
        first = self.earliest(at)
        if first == math.inf:
            return math.inf
        if self._even:
            busy = (backlog - 1) * self._gap
        else:
            busy = math.ceil(max(backlog - self.allowance(first), 0) / self._limit) * self._period
        return self._spend_open_time(first, busy)

    # internals

    def _insert(self, at: float, n: int) -> None:
        """Insert an out-of-order record, keeping the log sorted."""
        log = self._log
        i = bisect.bisect_left(log, at, key=lambda entry: entry[0])
        if i < len(log) and log[i][0] == at:
            log[i] = (at, log[i][1] + n)
        else:
            log.insert(i, (at, n))

    def _prune(self) -> None:
        """Drop entries that no window at or after the latest send can contain."""
        log, cutoff = self._log, self._last - self._period
        if isinstance(log, deque):
            while log and log[0][0] <= cutoff:
                self._total -= log.popleft()[1]
            return
        k = 0
        while k < len(log) and log[k][0] <= cutoff:
            self._total -= log[k][1]
            k += 1
        if k:
            del log[:k]

    @staticmethod
    def _expiry(e: float, period: float) -> float:
        """Smallest float t (near e + T) with t - T >= e, so the entry at e has left."""
        t = e + period
        while t - period < e:
            t = math.nextafter(t, math.inf)
        return t

    def _log_ready(self, t: float) -> float:
        """Earliest instant >= t at which the window holds fewer than N sends."""
        remaining = self._total
        for e, n in self._log:
            if remaining < self._limit:
                break
            if e > t - self._period:
                t = self._expiry(e, self._period)
            remaining -= n
        return t

    def _copy(self) -> Limiter:
        """An independent copy for planning."""
        clone = Limiter(self._policy)
        clone._log, clone._total, clone._last = self._log.copy(), self._total, self._last
        clone._span_cache = self._span_cache
        return clone

    def _span(self, at: float) -> tuple[float, float]:
        """(opens, closes) of the open period containing at, or else the next one."""
        asked, lo, hi = self._span_cache
        if not asked <= at < hi:
            lo, hi = self._compute_span(at)
            self._span_cache = (at, lo, hi)
        return lo, hi

    def _compute_span(self, at: float) -> tuple[float, float]:
        """The schedule's open period at or after at, as epoch floats."""
        assert self._schedule is not None
        d = _utc_floor(at)
        opened = self._schedule.next_open(d)
        if opened is None:
            return math.inf, math.inf
        closed = self._schedule.next_close(opened)
        lo = min(at, opened.timestamp()) if opened == d else opened.timestamp()
        hi = math.inf if closed is None else closed.timestamp()
        return lo, max(hi, math.nextafter(max(at, lo), math.inf))

    def _open(self, at: float) -> bool:
        """Whether the schedule allows release at instant at."""
        if self._schedule is None:
            return True
        lo, hi = self._span(at)
        return lo <= at < hi

    def _open_from(self, t: float) -> float:
        """Earliest open instant >= t."""
        if self._schedule is None or t == math.inf:
            return t
        return max(t, self._span(t)[0])

    def _spend_open_time(self, start: float, busy: float) -> float:
        """The instant when `busy` seconds of open schedule time after start have passed."""
        if self._schedule is None or self._schedule.always_open:
            return start + busy
        weekly = self._open_seconds(start, start + _WEEK_S)
        if weekly <= 0:
            return math.inf
        weeks = max(math.ceil(busy / weekly) - 1, 0)
        if start + weeks * _WEEK_S > HORIZON_EPOCH - 2 * _WEEK_S:
            return start + busy * _WEEK_S / weekly
        t, left = start + weeks * _WEEK_S, busy - weeks * weekly
        for _ in range(4 * _SCAN_DAYS):
            lo, hi = self._compute_span(t)
            if lo == math.inf:
                return math.inf
            t = max(t, lo)
            if hi - t > left:  # a send due exactly at the close goes at the next opening
                return t + left
            left, t = left - (hi - t), hi
        return t + left

    def _open_seconds(self, start: float, end: float) -> float:
        """Open schedule time within [start, end)."""
        total, t = 0.0, start
        while t < end:
            lo, hi = self._compute_span(t)
            if lo >= end:
                break
            total += min(hi, end) - max(lo, t)
            t = hi
        return total
