"""Prometheus text-format metrics: a few counters and gauges, no dependency."""

from __future__ import annotations

import time
from collections.abc import Callable


class Counter:
    """A monotonically increasing count, optionally split by one label."""

    def __init__(self, name: str, help_text: str, label: str | None = None) -> None:
        self.name = name
        self.help = help_text
        self.label = label
        self.values: dict[str, float] = {}
        REGISTRY.append(self)

    def inc(self, amount: float = 1, **labels: str) -> None:
        """Add to the count."""
        key = labels.get(self.label, "") if self.label else ""
        self.values[key] = self.values.get(key, 0) + amount

    def render(self) -> list[str]:
        """Exposition lines."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values:
            lines.append(f"{self.name} 0" if not self.label else "")
        for key, value in sorted(self.values.items()):
            labels = f'{{{self.label}="{key}"}}' if self.label else ""
            lines.append(f"{self.name}{labels} {value:g}")
        return [line for line in lines if line]


class Gauge:
    """A value read at scrape time."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.read: Callable[[], float] = lambda: 0.0
        REGISTRY.append(self)

    def render(self) -> list[str]:
        """Exposition lines."""
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {self.read():g}",
        ]


REGISTRY: list[Counter | Gauge] = []

ACCEPTED = Counter("throttled_actions_accepted_total", "Actions stored and answered BLOCK.")
REJECTED = Counter(
    "throttled_actions_rejected_total", "Action requests refused, by reason.", "reason"
)
COMPLETED = Counter("throttled_callbacks_completed_total", "Callbacks HubSpot accepted (204).")
EXPIRED = Counter("throttled_actions_expired_total", "Actions whose block expired before sending.")
REQUESTS = Counter(
    "throttled_hubspot_requests_total", "Completion requests by HTTP status.", "status"
)
INPUT_PROBLEMS = Counter(
    "throttled_input_field_problems_total", "Invalid rate input fields (fell through)."
)
INGEST_PENDING = Gauge("throttled_ingest_pending", "Actions waiting for a group commit.")
SENDER_HELD = Gauge("throttled_sender_held", "Claimed actions waiting in portal senders.")
ACTIVE_QUEUES = Gauge("throttled_active_queues", "Queues with work the scheduler tracks.")
GC_PAUSE = Counter(
    "throttled_gc_pause_seconds_total",
    "Time the event loop stood still in garbage collection, by generation.",
    "generation",
)
GC_LONGEST_PAUSE = Gauge(
    "throttled_gc_longest_pause_seconds", "Longest single garbage-collection pause so far."
)
QUEUE_POLICY_ERRORS = Counter(
    "throttled_queue_policy_errors_total",
    "Queues held because their stored rate policy could not be evaluated.",
)
QUEUES_HELD = Gauge(
    "throttled_queues_held_by_policy", "Queues held now: their policy cannot be evaluated."
)
QUEUES_AT_RISK = Gauge(
    "throttled_queues_past_deadline", "Queues whose backlog will not drain before its deadline."
)


def render() -> str:
    """All metrics in Prometheus text format."""
    return "\n".join(line for metric in REGISTRY for line in metric.render()) + "\n"


class GcTimer:
    """Times garbage collections (a gc.callbacks entry): every pause stalls the event loop."""

    def __init__(self) -> None:
        self._started = 0.0
        self.longest = 0.0
        GC_LONGEST_PAUSE.read = lambda: self.longest

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.longest = max(self.longest, pause)
        GC_PAUSE.inc(pause, generation=str(info["generation"]))
