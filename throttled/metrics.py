"""Prometheus metrics (prometheus-client): process-wide counters and histograms, and one
registry per HTTP app that adds its own daemon's gauges, read from memory at scrape time.

Call sites keep a small API: `COUNTER.inc()`, `.inc(n)`, `.inc(label="...")`,
`HISTOGRAM.observe(seconds)`, and `GAUGE.read = lambda: ...`. Nothing here does I/O when
scraped: a gauge is a callable over in-memory state (a value that needs the database is
cached by the exporter's periodic job, see throttled/exporter.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.context_managers import Timer
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

log = structlog.get_logger(__name__)

# Every counter and histogram would also export a `_created` series: half the series, and
# no dashboard here reads them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

MAX_PORTALS = 1000  # portals with their own label value; the rest share OTHER
OTHER = "other"

Reading = Callable[[], float]
_K = TypeVar("_K")


def _zero() -> float:
    return 0.0


class Counter:
    """A monotonically increasing count (process-wide), optionally split by labels. A name
    without `_total` gets it appended, as Prometheus names counters."""

    def __init__(self, name: str, help_text: str, label: str | Sequence[str] | None = None) -> None:
        self.labelnames: tuple[str, ...] = (
            (label,) if isinstance(label, str) else tuple(label or ())
        )
        self.label = self.labelnames[0] if self.labelnames else None
        self.help = help_text
        self.name = name if name.endswith("_total") else name + "_total"
        self._metric = prometheus_client.Counter(name, help_text, self.labelnames, registry=None)
        _register(self.name, self._metric)

    def inc(self, amount: float = 1, **labels: str) -> None:
        """Add to the count (a label not given counts as "")."""
        if self.labelnames:
            self._metric.labels(*(labels.get(n, "") for n in self.labelnames)).inc(amount)
        else:
            self._metric.inc(amount)

    def value(self, **labels: str) -> float:
        """The count for these label values (0 if never counted)."""
        want = {n: labels.get(n, "") for n in self.labelnames}
        return sum(s.value for s in _samples(self._metric, "_total") if s.labels == want)

    @property
    def values(self) -> dict[str, float]:
        """Counts by the first label's value ("" without labels), as the tests read them."""
        out: dict[str, float] = {}
        for s in _samples(self._metric, "_total"):
            key = s.labels.get(self.label, "") if self.label else ""
            out[key] = out.get(key, 0.0) + s.value
        return out


class Histogram:
    """A distribution (process-wide), optionally split by labels. Time an `async def` with
    `with HISTOGRAM.time():` inside it, or observe a duration measured by hand."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labels)
        self._metric = prometheus_client.Histogram(
            name, help_text, self.labelnames, registry=None, buckets=buckets
        )
        _register(name, self._metric)

    def observe(self, value: float, **labels: str) -> None:
        """Count one observation."""
        self._child(labels).observe(value)

    def time(self, **labels: str) -> Timer:
        """A context manager that observes the seconds its block took."""
        return self._child(labels).time()

    def count(self, **labels: str) -> float:
        """How many observations so far (tests)."""
        want = {n: labels.get(n, "") for n in self.labelnames}
        return sum(s.value for s in _samples(self._metric, "_count") if s.labels == want)

    def _child(self, labels: Mapping[str, str]) -> prometheus_client.Histogram:
        if not self.labelnames:
            return self._metric
        return self._metric.labels(*(labels.get(n, "") for n in self.labelnames))


class Gauge:
    """A value read at scrape time. Each app's registry reads the callable its daemon bound
    (Readings.bind); `read` is the process-wide one: the last daemon started (there is one in
    production), or whatever a caller assigned."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name = name
        self.help = help_text
        self.read: Reading = _zero
        _GAUGES[name] = self


_INSTRUMENTS: dict[str, prometheus_client.Counter | prometheus_client.Histogram] = {}
_GAUGES: dict[str, Gauge] = {}


def _register(name: str, metric: prometheus_client.Counter | prometheus_client.Histogram) -> None:
    # By name: a second metric of the same name replaces the first (exported once).
    _INSTRUMENTS[name] = metric


def _samples(
    metric: prometheus_client.Counter | prometheus_client.Histogram, suffix: str
) -> Iterator[Sample]:
    for family in metric.collect():
        yield from (s for s in family.samples if s.name.endswith(suffix))


class _Instruments:
    """Collects the process-wide counters and histograms into an app's registry."""

    def collect(self) -> Iterator[Metric]:
        for metric in list(_INSTRUMENTS.values()):
            yield from metric.collect()


Families = Callable[[], Iterable[Metric]]


class Readings:
    """One daemon's scrape-time values: its gauges' callables and labelled families built
    from memory. A callable that raises is reported as NaN (and logged), not as a failed
    scrape."""

    def __init__(self) -> None:
        self._reads: dict[Gauge, Reading] = {}
        self._families: list[Families] = []

    def bind(self, gauge: Gauge, read: Reading) -> None:
        """Read `gauge` from `read` in this app (and process-wide, see Gauge)."""
        self._reads[gauge] = read
        gauge.read = read

    def add(self, families: Families) -> None:
        """Yield these families at every scrape."""
        self._families.append(families)

    def collect(self) -> Iterator[Metric]:
        for gauge in list(_GAUGES.values()):
            yield GaugeMetricFamily(gauge.name, gauge.help, value=self._read(gauge))
        for families in self._families:
            try:
                yield from families()
            except Exception:  # a bug in one family must not blind the whole scrape
                log.exception("metrics_family_failed", families=getattr(families, "__name__", ""))

    def _read(self, gauge: Gauge) -> float:
        try:
            return float(self._reads.get(gauge, gauge.read)())
        except Exception:
            log.exception("metrics_gauge_failed", gauge=gauge.name)
            return math.nan


_INSTRUMENT_COLLECTOR = _Instruments()


def app_registry(readings: Readings | None = None) -> CollectorRegistry:
    """A registry for one app: the shared counters and histograms, the daemon's readings, and
    the standard process, GC and platform collectors."""
    registry = CollectorRegistry()
    registry.register(_INSTRUMENT_COLLECTOR)
    registry.register(readings or Readings())
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry | None = None) -> str:
    """The Prometheus text format of `registry` (default: one without daemon readings)."""
    return prometheus_client.generate_latest(registry or app_registry()).decode()


# -- bounded portal labels ---------------------------------------------------------------------


class PortalLabels:
    """Portal ids as a counter's label values: the first `limit` portals seen keep their own
    for the life of the process (a counter's series must not move), the rest share OTHER."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = MAX_PORTALS if limit is None else limit
        self._known: set[int] = set()

    def __call__(self, portal_id: int) -> str:
        if portal_id in self._known:
            return str(portal_id)
        if len(self._known) < self.limit:
            self._known.add(portal_id)
            return str(portal_id)
        return OTHER


portal_label = PortalLabels()


def top_portals(
    values: Mapping[int, _K], key: Callable[[_K], float], limit: int | None = None
) -> tuple[list[tuple[int, _K]], list[_K]]:
    """For a gauge by portal: the `limit` (MAX_PORTALS) portals with the highest key, and the
    rest's values (to be folded into one OTHER series)."""
    limit = MAX_PORTALS if limit is None else limit
    ranked = sorted(values.items(), key=lambda item: (-key(item[1]), item[0]))
    return ranked[:limit], [v for _, v in ranked[limit:]]


# -- the metrics -------------------------------------------------------------------------------

ACCEPTED = Counter("throttled_actions_accepted_total", "Actions stored and answered BLOCK.")
REJECTED = Counter(
    "throttled_actions_rejected_total", "Action requests refused, by reason.", "reason"
)
RECEIVED = Counter(
    "throttled_actions_received_total",
    "Action requests answered, by result: accepted, or the error code of the refusal.",
    "result",
)
COMPLETED = Counter("throttled_callbacks_completed_total", "Callbacks HubSpot accepted (204).")
COMPLETIONS = Counter(
    "throttled_completions_total",
    "Callbacks in completion requests, by portal and outcome (completed, rejected, failed, "
    "retry, rate_limited, unauthorized, bisected, error).",
    ("portal", "outcome"),
)
EXPIRED = Counter("throttled_actions_expired_total", "Actions whose block expired before sending.")
REQUESTS = Counter(
    "throttled_hubspot_requests_total", "Completion requests by HTTP status.", "status"
)
RATE_LIMITED = Counter(
    "throttled_hubspot_rate_limited_total",
    "Completion requests HubSpot answered 429, by portal.",
    "portal",
)
HUBSPOT_LATENCY = Histogram(
    "throttled_hubspot_request_duration_seconds",
    "HubSpot API request latency, by endpoint and HTTP status (0: no answer).",
    ("endpoint", "status"),
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
TOKEN_REFRESHES = Counter(
    "throttled_token_refreshes_total",
    "Access-token refreshes, by outcome (ok, revoked, refused, failed).",
    "outcome",
)
INPUT_PROBLEMS = Counter(
    "throttled_input_field_problems_total", "Invalid rate input fields (fell through)."
)
INGEST_BATCH = Histogram(
    "throttled_ingest_batch_size",
    "Actions per group commit.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
INGEST_TIMEOUTS = Counter(
    "throttled_ingest_commit_timeouts_total",
    "Actions answered 503 because no commit stored them within ingest.commit_timeout_s.",
)
INGEST_COMMIT = Histogram(
    "throttled_ingest_commit_seconds",
    "Time to store one group commit.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
SCHEDULER_LAG = Histogram(
    "throttled_scheduler_lag_seconds",
    "How late rows went out after the instant they were claimed for (one observation per "
    "queue's share of a request).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
LOOP_LAG = Histogram(
    "throttled_event_loop_lag_seconds",
    "How late the event loop ran a timer (a 0.5 s sleep's overshoot).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
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
CHARGES_MOVED = Counter(
    "throttled_request_charges_moved_total",
    "Completion requests written later than their charge allowed (the send margin and the "
    "late-write allowance): their queues' limiters re-dated them, at a cost per queue.",
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
