"""Per-portal health from recent HubSpot API results, kept in memory.

`healthy | degraded | unhealthy`, from the last WINDOW results of completion requests (error
rate, average latency), the run of consecutive failures, the last token refresh and the
connection itself:

- unhealthy: not connected or disconnected; the last refresh failed (and none succeeded
  since); or UNHEALTHY_RUN consecutive failed requests.
- degraded: any failure in the current run; an error rate of DEGRADED_ERROR_RATE or more
  over the window; an average latency of DEGRADED_LATENCY_S or more; or the rolling
  rate-limit budget HubSpot reports (X-HubSpot-RateLimit-Remaining) below 10 %.
- healthy: otherwise, including a portal with no results yet.

An error is a request that got no answer, a 5xx, a 401 or a 403. A 429 is counted apart (the
sender paces itself by it) and a 400 for one callback is that callback's problem, not the
portal's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WINDOW = 100
UNHEALTHY_RUN = 5
DEGRADED_ERROR_RATE = 0.1
DEGRADED_LATENCY_S = 2.0


@dataclass(slots=True)
class PortalHealth:
    """One portal's recent results."""

    results: deque[tuple[bool, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    consecutive_failures: int = 0
    rate_limited: int = 0
    last_result_at: float | None = None
    last_refresh_ok: bool | None = None
    last_refresh_at: float | None = None
    last_refresh_error: str | None = None
    refresh_failures: int = 0  # consecutive
    disconnected: str | None = None  # the reason, while disconnected
    rate_limit: dict[str, int] = field(default_factory=dict)

    def state(self) -> str:
        """healthy, degraded or unhealthy (see the module's rules)."""
        if self.disconnected is not None or self.last_refresh_ok is False:
            return "unhealthy"
        if self.consecutive_failures >= UNHEALTHY_RUN:
            return "unhealthy"
        if self.consecutive_failures or self.error_rate() >= DEGRADED_ERROR_RATE:
            return "degraded"
        latency = self.average_latency_s()
        if latency is not None and latency >= DEGRADED_LATENCY_S:
            return "degraded"
        remaining, most = self.rate_limit.get("remaining"), self.rate_limit.get("max")
        if remaining is not None and most and remaining < most / 10:
            return "degraded"
        return "healthy"

    def error_rate(self) -> float:
        """Failed share of the window's requests (0 with none)."""
        if not self.results:
            return 0.0
        return sum(1 for ok, _ in self.results if not ok) / len(self.results)

    def average_latency_s(self) -> float | None:
        """Mean latency over the window, None with no requests."""
        if not self.results:
            return None
        return sum(latency for _, latency in self.results) / len(self.results)

    def snapshot(self) -> dict[str, Any]:
        """The health as JSON for the operator surface."""
        latency = self.average_latency_s()
        return {
            "state": self.state(),
            "requests": len(self.results),
            "error_rate": round(self.error_rate(), 4),
            "average_latency_ms": None if latency is None else round(latency * 1000, 1),
            "consecutive_failures": self.consecutive_failures,
            "rate_limited": self.rate_limited,
            "last_refresh_ok": self.last_refresh_ok,
            "last_refresh_error": self.last_refresh_error,
            "rate_limit": dict(self.rate_limit) or None,
        }


class Health:
    """Every portal's health, by portal id."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._portals: dict[int, PortalHealth] = {}

    def portal(self, portal_id: int) -> PortalHealth:
        """The portal's record (created empty)."""
        record = self._portals.get(portal_id)
        if record is None:
            record = self._portals[portal_id] = PortalHealth()
        return record

    def portals(self) -> list[tuple[int, PortalHealth]]:
        """Every portal with a record (the health monitor looks at each)."""
        return list(self._portals.items())

    def result(self, portal_id: int, status: int, latency_s: float, **rate: int | None) -> None:
        """One completion request's outcome (status 0: no answer) and rate-limit headers."""
        record = self.portal(portal_id)
        record.last_result_at = self._clock()
        for key, value in rate.items():
            if value is not None:
                record.rate_limit[key] = value
        if status == 429:
            record.rate_limited += 1
            return
        if status == 400:
            return
        ok = 200 <= status < 300
        record.results.append((ok, max(latency_s, 0.0)))
        record.consecutive_failures = 0 if ok else record.consecutive_failures + 1

    def refreshed(
        self, portal_id: int, *, ok: bool, latency_s: float, error: str | None = None
    ) -> None:
        """A token refresh's outcome."""
        record = self.portal(portal_id)
        record.last_refresh_ok = ok
        record.last_refresh_at = self._clock()
        record.refresh_failures = 0 if ok else record.refresh_failures + 1
        record.last_refresh_error = None if ok else (error or "")[:300]

    def connected(self, portal_id: int) -> None:
        """The portal was (re)connected: its past no longer counts."""
        self._portals[portal_id] = PortalHealth()

    def disconnected(self, portal_id: int, reason: str) -> None:
        """The portal lost its connection."""
        self.portal(portal_id).disconnected = reason[:300]
