"""The conditions the health monitor alerts on, read from memory (never the database).

Per portal, from its health (throttled/health.py), one condition for its state, the most
specific that applies:

- `portal_disconnected`: no connection (never connected, or HubSpot refused its refresh
  token, or an operator disconnected it);
- `token_refresh_failed`: the last token refresh failed (and none succeeded since);
- `portal_unhealthy`: unhealthy otherwise (a run of failed completion requests);

and, apart, `error_rate`: the failed share of its last completion requests (at least
MIN_REQUESTS of them) passes `alerts.error_rate_threshold`.

Per queue: `queue_at_risk`, its backlog will not drain before its block expiration (the
scheduler's `at_risk` set, which housekeeping's deadline job computes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from throttled.health import Health, PortalHealth
from throttled.queues import QueueState

MIN_REQUESTS = 20  # an error rate over fewer requests says little


class QueueSource(Protocol):
    """What the monitor reads of the scheduler."""

    at_risk: set[int]
    queues: dict[int, QueueState]


@dataclass(frozen=True, kw_only=True)
class Condition:
    """A condition that holds now, for one subject (a portal, a queue)."""

    alert: str
    subject: dict[str, Any]
    text: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """What de-duplicates alerts: the condition and its subject."""
        return self.alert, json.dumps(self.subject, sort_keys=True)


def current(health: Health, queues: QueueSource, error_rate_threshold: float) -> list[Condition]:
    """Every condition that holds now."""
    found: list[Condition] = []
    for portal_id, record in health.portals():
        found.extend(_portal(portal_id, record, error_rate_threshold))
    found.extend(_queues(queues))
    return found


def _portal(portal_id: int, record: PortalHealth, threshold: float) -> Iterator[Condition]:
    subject = {"portal_id": portal_id}
    if record.disconnected is not None:
        yield Condition(
            alert="portal_disconnected",
            subject=subject,
            text=f"portal {portal_id} is disconnected: {record.disconnected}",
            details={"reason": record.disconnected},
        )
    elif record.last_refresh_ok is False:
        yield Condition(
            alert="token_refresh_failed",
            subject=subject,
            text=f"portal {portal_id}: token refresh failed: {record.last_refresh_error}",
            details={"error": record.last_refresh_error, "failures": record.refresh_failures},
        )
    elif record.state() == "unhealthy":
        yield Condition(
            alert="portal_unhealthy",
            subject=subject,
            text=(
                f"portal {portal_id} is unhealthy: {record.consecutive_failures} completion "
                "requests failed in a row"
            ),
            details=_numbers(record),
        )
    rate = record.error_rate()
    if len(record.results) >= MIN_REQUESTS and rate > threshold:
        yield Condition(
            alert="error_rate",
            subject=subject,
            text=(
                f"portal {portal_id}: {rate:.1%} of its last {len(record.results)} completion "
                f"requests failed (threshold {threshold:.1%})"
            ),
            details={**_numbers(record), "threshold": threshold},
        )


def _numbers(record: PortalHealth) -> dict[str, Any]:
    return {
        "error_rate": round(record.error_rate(), 4),
        "requests": len(record.results),
        "consecutive_failures": record.consecutive_failures,
    }


def _queues(source: QueueSource) -> Iterator[Condition]:
    for queue_id in sorted(source.at_risk):
        queue = source.queues.get(queue_id)
        if queue is None:
            continue
        yield Condition(
            alert="queue_at_risk",
            subject={"queue_id": queue_id, "queue": queue.key, "portal_id": queue.portal_id},
            text=(
                f"queue {queue.key}: its backlog will not drain before its block expiration "
                f"({queue.limiter.describe()})"
            ),
            details={"rate": queue.limiter.describe()},
        )
