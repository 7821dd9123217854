"""Alerts: the health monitor (health_monitor.py, over conditions.py) and the webhook that
delivers its alerts (webhook.py), run together by `watch()` as the daemon's `alerts` task."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from throttled.alerts.health_monitor import HealthMonitor
from throttled.alerts.webhook import Webhook
from throttled.config import AlertsConfig

if TYPE_CHECKING:
    from throttled.daemon import Runtime

__all__ = ["HealthMonitor", "Webhook", "watch", "webhook_for"]


def webhook_for(config: AlertsConfig) -> Webhook:
    """The configured webhook (the only place its URL is revealed)."""
    return Webhook(
        config.webhook_url.reveal(), timeout_s=config.timeout_s, max_attempts=config.max_attempts
    )


async def watch(runtime: Runtime, stop: asyncio.Event) -> None:
    """Check health on the configured interval and deliver the alerts, until `stop`."""
    config = runtime.config.alerts
    webhook = webhook_for(config)
    monitor = HealthMonitor(
        health=runtime.dispatcher.tokens.health,
        queues=runtime.scheduler,
        webhook=webhook,
        error_rate_threshold=config.error_rate_threshold,
    )
    async with asyncio.TaskGroup() as tg:
        tg.create_task(webhook.run(stop), name="alert-delivery")
        tg.create_task(monitor.run(stop, config.check_interval_s), name="health-monitor")
