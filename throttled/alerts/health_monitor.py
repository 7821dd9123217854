"""The health monitor: every `alerts.check_interval_s`, the conditions that hold now
(conditions.py) against those that held at the last check. A condition that starts sends
one `firing` alert; one that clears sends one `resolved`; one that goes on sends nothing.

The state is kept in memory only: after a restart a condition that still holds alerts once
again (health starts empty, so a portal's condition comes back with its first results).
That is a repeated alert, never a lost one: accepted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog

from throttled.aio import wait_event
from throttled.alerts.conditions import Condition, QueueSource, current
from throttled.alerts.webhook import Webhook
from throttled.health import Health

log = structlog.get_logger(__name__)

LOG_EACH = 20  # alerts of one check logged one by one; beyond, summed in one line


class HealthMonitor:
    """Turns conditions into start and clear alerts, de-duplicated by condition + subject."""

    def __init__(
        self,
        *,
        health: Health,
        queues: QueueSource,
        webhook: Webhook,
        error_rate_threshold: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._health = health
        self._queues = queues
        self._webhook = webhook
        self._threshold = error_rate_threshold
        self._clock = clock
        self.firing: dict[tuple[str, str], tuple[Condition, float]] = {}  # key → (it, since)

    async def run(self, stop: asyncio.Event, interval_s: float) -> None:
        """Check every `interval_s` until `stop`."""
        while not stop.is_set():
            await wait_event(stop, interval_s)
            if not stop.is_set():
                self.check()

    def check(self) -> list[dict[str, Any]]:
        """One check (run-once for tests): the alerts it sent, firing then resolved."""
        now = self._clock()
        holding = {c.key: c for c in current(self._health, self._queues, self._threshold)}
        alerts: list[dict[str, Any]] = []
        for key, condition in holding.items():
            since = self.firing[key][1] if key in self.firing else now
            if key not in self.firing:
                alerts.append(_payload(condition, "firing", now))
            self.firing[key] = (condition, since)  # (the newest details, for the resolve)
        for key in [k for k in self.firing if k not in holding]:
            condition, since = self.firing.pop(key)
            alerts.append(_payload(condition, "resolved", now, since=since))
        # Portal alerts before queue alerts: if the delivery queue fills in a storm, what is
        # dropped is the least important.
        alerts.sort(key=lambda a: a["alert"].startswith("queue_"))
        for alert in alerts:
            self._webhook.send(alert)
        self._webhook.flush_drops()
        self._log(alerts)
        return alerts

    @staticmethod
    def _log(alerts: list[dict[str, Any]]) -> None:
        """One line per alert while they are few; past LOG_EACH in one check, one line with
        the counts and a sample (a storm must not flood the journal)."""
        if len(alerts) <= LOG_EACH:
            for alert in alerts:
                fields = {k: alert[k] for k in ("alert", "subject", "details")}
                if alert["status"] == "firing":
                    log.warning("alert_firing", **fields)
                else:
                    log.info("alert_resolved", **fields)
            return
        counts: dict[str, int] = {}
        for alert in alerts:
            name = f"{alert['alert']}.{alert['status']}"
            counts[name] = counts.get(name, 0) + 1
        sample = [{k: a[k] for k in ("alert", "status", "subject")} for a in alerts[:LOG_EACH]]
        log.warning("alerts_changed", total=len(alerts), counts=counts, sample=sample)


def _payload(
    condition: Condition, status: str, now: float, *, since: float | None = None
) -> dict[str, Any]:
    details = dict(condition.details)
    text = f"[throttled] {condition.text}"
    if since is not None:
        details["firing_s"] = round(now - since, 1)
        text = f"[throttled] resolved: {condition.text}"
    return {
        "text": text,
        "alert": condition.alert,
        "status": status,
        "subject": condition.subject,
        "at": datetime.fromtimestamp(now, UTC).isoformat(),
        "details": details,
    }
