"""What one daemon's /metrics shows beside the process-wide counters: its parts' state read
at scrape time, a per-portal backlog that a periodic query keeps in memory (a scrape never
waits on the database), the portals' rate-limit budget, and the event loop's lag."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from throttled import metrics
from throttled.aio import Outage, wait_event
from throttled.db.repository import Backlog, DatabaseError, Repository
from throttled.drain.dispatcher import Dispatcher
from throttled.drain.supervisor import Supervisor
from throttled.health import Health
from throttled.ingest import Ingest

BACKLOG_EVERY_S = 30.0  # the per-portal backlog query: one GROUP BY over the unfinished rows
_WINDOWS = (("interval", "remaining"), ("daily", "daily_remaining"))  # (label, Health key)


class Exporter:
    """One daemon's metrics registry, and the loop that keeps its cached values fresh."""

    def __init__(
        self,
        *,
        repo: Repository,
        scheduler: Supervisor,
        dispatcher: Dispatcher,
        ingest: Ingest,
        health: Health,
        backlog_every_s: float = BACKLOG_EVERY_S,
    ) -> None:
        self._repo = repo
        self._health = health
        self._backlog_every_s = backlog_every_s
        self.backlog: dict[int, Backlog] = {}
        self.backlog_at: float | None = None  # (monotonic) of the last refresh
        s = scheduler
        readings = metrics.Readings()
        readings.bind(metrics.INGEST_PENDING, lambda: float(ingest.pending))
        readings.bind(metrics.SENDER_HELD, lambda: float(dispatcher.held))
        readings.bind(metrics.ACTIVE_QUEUES, lambda: float(s.active))
        readings.bind(metrics.QUEUES_AT_RISK, lambda: float(len(s.at_risk)))
        readings.bind(
            metrics.QUEUES_HELD,
            lambda: float(sum(q.limiter.fault is not None for q in s.queues.values())),
        )
        readings.add(self.backlog_families)
        readings.add(self.rate_limit_families)
        self.registry: CollectorRegistry = metrics.app_registry(readings)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh the backlog until `stop`; a backlog query under way then is abandoned (it
        only reads). (The loop's lag is measured by liveness.LoopMonitor.)"""
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(self._backlog_loop(stop), name="portal-backlog")
            await stop.wait()
            task.cancel()

    async def refresh_backlog(self) -> None:
        """Read the per-portal backlog once (the loop's step; tests call it)."""
        self.backlog = await self._repo.portal_backlog()
        self.backlog_at = time.monotonic()

    async def _backlog_loop(self, stop: asyncio.Event) -> None:
        outage = Outage("portal-backlog", "portal_backlog_failed")
        delay = 0.0
        while True:
            await wait_event(stop, delay)
            if stop.is_set():
                return
            try:
                await self.refresh_backlog()
            except DatabaseError as exc:  # the cached values stay (their age shows it)
                delay = max(self._backlog_every_s, outage.failed(exc))
                continue
            outage.over()
            delay = self._backlog_every_s

    def backlog_families(self) -> Iterator[Metric]:
        """Unfinished actions per portal and state, from the last refresh: the MAX_PORTALS
        portals with the most, the rest summed as portal="other"."""
        family = GaugeMetricFamily(
            "throttled_portal_actions",
            "Actions not done, per portal and state (pending includes claimed), as of the "
            f"last refresh (every {self._backlog_every_s:g} s); past {metrics.MAX_PORTALS} "
            'portals, the ones with fewest are summed as portal="other".',
            labels=("portal", "state"),
        )
        listed, rest = metrics.top_portals(
            self.backlog, key=lambda b: b.pending + b.failed + b.expired
        )
        for portal_id, b in listed:
            _add_backlog(family, str(portal_id), b)
        if rest:
            total = Backlog(
                pending=sum(b.pending for b in rest),
                failed=sum(b.failed for b in rest),
                expired=sum(b.expired for b in rest),
            )
            _add_backlog(family, metrics.OTHER, total)
        yield family
        age = math.nan if self.backlog_at is None else time.monotonic() - self.backlog_at
        yield GaugeMetricFamily(
            "throttled_portal_actions_age_seconds",
            "Seconds since throttled_portal_actions was refreshed (NaN: not yet).",
            value=age,
        )

    def rate_limit_families(self) -> Iterator[Metric]:
        """What HubSpot last said is left of each portal's rolling and daily request limits:
        the MAX_PORTALS portals with least left, the lowest of the rest as portal="other"."""
        family = GaugeMetricFamily(
            "throttled_hubspot_rate_limit_remaining",
            "Requests left in the portal's HubSpot limit (X-HubSpot-RateLimit-Remaining, "
            "-Daily-Remaining), by window (interval, daily), as of its last completion request.",
            labels=("portal", "window"),
        )
        portals = self._health.portals()
        for window, key in _WINDOWS:
            left = {pid: h.rate_limit[key] for pid, h in portals if key in h.rate_limit}
            listed, rest = metrics.top_portals(left, key=lambda n: -n)
            for portal_id, n in listed:
                family.add_metric([str(portal_id), window], n)
            if rest:
                family.add_metric([metrics.OTHER, window], min(rest))
        yield family


def _add_backlog(family: GaugeMetricFamily, portal: str, backlog: Backlog) -> None:
    family.add_metric([portal, "pending"], backlog.pending)
    family.add_metric([portal, "failed"], backlog.failed)
    family.add_metric([portal, "expired"], backlog.expired)
