"""Whether the event loop keeps time: a tiny task wakes twice a second and measures how late
it woke (the loop lag). /healthz reports it and /metrics counts it in a histogram; a loop
stuck for good cannot answer /healthz at all, which is why systemd's watchdog (sdnotify) is
the real guard against that."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from throttled import metrics
from throttled.aio import wait_event

TICK_S = 0.5
STALE_S = 10.0  # no tick for this long: the loop was stalled (it answers again only now)


class LoopMonitor:
    """The loop's lag, measured by run(); `clock` is the loop's (monotonic) time."""

    def __init__(self, clock: Callable[[], float], *, tick_s: float = TICK_S) -> None:
        self._clock = clock
        self.tick_s = tick_s
        self.last_tick = clock()
        self.lag_s = 0.0  # of the last tick
        self.max_lag_s = 0.0  # since start

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until `stop`."""
        while not stop.is_set():
            due = self._clock() + self.tick_s
            await wait_event(stop, self.tick_s)
            self.tick(max(0.0, self._clock() - due))

    def tick(self, lag_s: float) -> None:
        """One tick, `lag_s` late."""
        self.last_tick = self._clock()
        self.lag_s = lag_s
        metrics.LOOP_LAG.observe(lag_s)
        self.max_lag_s = max(self.max_lag_s, lag_s)

    def snapshot(self, stale_s: float = STALE_S) -> tuple[bool, dict[str, Any]]:
        """(alive, details): alive unless the last tick is older than `stale_s`."""
        since = self._clock() - self.last_tick
        return since <= stale_s, {
            "loop_lag_ms": round(self.lag_s * 1000, 1),
            "loop_max_lag_ms": round(self.max_lag_s * 1000, 1),
            "last_tick_s_ago": round(since, 3),
        }
