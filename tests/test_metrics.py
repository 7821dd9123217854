"""GET /metrics (prometheus-client): the exposition parses and keeps today's names, every
metric moves when its event happens, two daemons in one process keep their own readings,
portal labels are bounded, and a scrape answers from memory while the database is down."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon, action_payload, make_config, running, wait_for
from tests.pg_proxy import pg_proxy
from throttled import metrics
from throttled.db.repository import Backlog
from throttled.hubspot.fake import FakeHubSpot

PORTAL = 62515
IDLE = 62516  # never connected: its actions stay pending

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# The exposition before prometheus-client (names and types), which must not change.
TODAY = {
    "throttled_actions_accepted_total": "counter",
    "throttled_actions_rejected_total": "counter",
    "throttled_callbacks_completed_total": "counter",
    "throttled_actions_expired_total": "counter",
    "throttled_hubspot_requests_total": "counter",
    "throttled_input_field_problems_total": "counter",
    "throttled_ingest_pending": "gauge",
    "throttled_sender_held": "gauge",
    "throttled_active_queues": "gauge",
    "throttled_gc_pause_seconds_total": "counter",
    "throttled_gc_longest_pause_seconds": "gauge",
    "throttled_queue_policy_errors_total": "counter",
    "throttled_queues_held_by_policy": "gauge",
    "throttled_queues_past_deadline": "gauge",
}
NEW = {
    "throttled_actions_received_total": "counter",
    "throttled_completions_total": "counter",
    "throttled_hubspot_rate_limited_total": "counter",
    "throttled_hubspot_request_duration_seconds": "histogram",
    "throttled_token_refreshes_total": "counter",
    "throttled_ingest_batch_size": "histogram",
    "throttled_ingest_commit_seconds": "histogram",
    "throttled_scheduler_lag_seconds": "histogram",
    "throttled_event_loop_lag_seconds": "histogram",
    "throttled_portal_actions": "gauge",
    "throttled_portal_actions_age_seconds": "gauge",
    "throttled_hubspot_rate_limit_remaining": "gauge",
    "throttled_request_charges_moved_total": "counter",
    "throttled_ingest_commit_timeouts_total": "counter",
}


def parse(text: str) -> Samples:
    """Every sample, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for n, labels in samples if n == name}


async def scrape_text(daemon: Daemon) -> str:
    async with daemon.session.get(daemon.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def scrape(daemon: Daemon) -> Samples:
    return parse(await scrape_text(daemon))


async def until(daemon: Daemon, check: Callable[[Samples], bool]) -> Samples:
    """Scrape until `check` holds (counters move when the sender judges a request, a moment
    after the fake HubSpot saw it)."""
    deadline = time.monotonic() + 20
    while True:
        samples = await scrape(daemon)
        if check(samples):
            return samples
        assert time.monotonic() < deadline, "metric did not move"
        await asyncio.sleep(0.02)


@pytest.fixture
def fresh_portal_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Portal labels from scratch: earlier tests in this process used some of the 1000."""
    monkeypatch.setattr(metrics, "portal_label", metrics.PortalLabels())


async def test_exposition_parses_and_keeps_todays_names(daemon_factory):
    async with daemon_factory() as daemon:
        text = await scrape_text(daemon)
        async with daemon.session.head(daemon.url + "/metrics") as resp:
            assert resp.status == 200
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    for name, kind in {**TODAY, **NEW}.items():
        assert types.get(name) == kind, name
    samples = parse(text)  # (raises on anything that is not the text format)
    names = {name for name, _ in samples}
    assert not [n for n in names if n.endswith("_created")]
    for standard in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_gc_objects_collected_total",
        "python_gc_collections_total",
        "python_info",
    ):
        assert standard in names, standard
    assert value(samples, "throttled_ingest_pending") == 0.0
    assert ("throttled_input_field_problems_total", ()) in samples  # unlabelled: 0 shown


async def test_openmetrics_when_asked(daemon_factory):
    async with daemon_factory() as daemon:
        headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with daemon.session.get(daemon.url + "/metrics", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).rstrip().endswith("# EOF")


async def test_each_metric_moves_with_its_event(daemon_factory, fake_hubspot, fresh_portal_labels):
    async with daemon_factory() as daemon:
        before = await scrape(daemon)
        await daemon.connect_portal(fake_hubspot, PORTAL)
        payload = action_payload(portal_id=PORTAL)
        assert (await daemon.post_action(payload))[0] == 200
        assert (await daemon.post_action(action_payload(portal_id=IDLE)))[0] == 200
        assert (await daemon.post_action(action_payload(), secret="wrong"))[0] == 401
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)
        exporter = daemon.runtime.exporter
        # Once the sent row is written done (the result writer, a moment later): the
        # refreshed backlog shows only the idle portal's row.
        for _ in range(1000):
            await exporter.refresh_backlog()
            if PORTAL not in exporter.backlog:
                break
            await asyncio.sleep(0.02)

        def moved(samples: Samples, name: str, **labels: str) -> float:
            return value(samples, name, **labels) - value(before, name, **labels)

        after = await until(
            daemon,
            lambda s: (
                moved(s, "throttled_completions_total", portal=str(PORTAL), outcome="completed")
                and moved(s, "throttled_event_loop_lag_seconds_count") >= 1
            ),
        )
    assert moved(after, "throttled_actions_received_total", result="accepted") == 2
    assert moved(after, "throttled_actions_accepted_total") == 2
    assert moved(after, "throttled_actions_received_total", result="invalid_signature") == 1
    assert moved(after, "throttled_actions_rejected_total", reason="invalid_signature") == 1
    assert moved(after, "throttled_ingest_batch_size_sum") == 2
    assert moved(after, "throttled_ingest_batch_size_count") in (1, 2)
    assert moved(after, "throttled_ingest_commit_seconds_count") in (1, 2)
    assert moved(after, "throttled_callbacks_completed_total") == 1
    assert moved(after, "throttled_hubspot_requests_total", status="204") == 1
    complete = {"endpoint": "complete", "status": "204"}
    assert moved(after, "throttled_hubspot_request_duration_seconds_count", **complete) == 1
    assert moved(after, "throttled_hubspot_request_duration_seconds_sum", **complete) > 0
    refresh = {"endpoint": "token_refresh", "status": "200"}
    assert moved(after, "throttled_hubspot_request_duration_seconds_count", **refresh) == 1
    assert moved(after, "throttled_token_refreshes_total", outcome="ok") == 1
    assert moved(after, "throttled_scheduler_lag_seconds_count") >= 1
    assert moved(after, "throttled_completions_total", portal=str(IDLE), outcome="completed") == 0
    # Gauges: this daemon's state, from memory.
    assert value(after, "throttled_portal_actions", portal=str(IDLE), state="pending") == 1
    assert value(after, "throttled_portal_actions", portal=str(PORTAL), state="pending") == 0
    assert 0 <= value(after, "throttled_portal_actions_age_seconds") < 10
    remaining = (
        "throttled_hubspot_rate_limit_remaining",
        (("portal", str(PORTAL)), ("window", "interval")),
    )
    assert after[remaining] > 0
    assert value(after, "throttled_active_queues") >= 1  # the idle portal's queue


async def test_429s_and_token_refresh_failures_are_counted(
    daemon_factory, fake_hubspot: FakeHubSpot, fresh_portal_labels
):
    bad = 62599
    async with daemon_factory() as daemon:
        before = await scrape(daemon)
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fake_hubspot.fail_next(429, retry_after=0.2)
        payload = action_payload(portal_id=PORTAL)
        assert (await daemon.post_action(payload))[0] == 200
        # A refresh token HubSpot does not know: the refresh is refused, the portal revoked.
        await daemon.runtime.dispatcher.tokens.connect(bad, "refresh-nobody-knows")
        assert (await daemon.post_action(action_payload(portal_id=bad)))[0] == 200

        def moved(samples: Samples, name: str, **labels: str) -> float:
            return value(samples, name, **labels) - value(before, name, **labels)

        p = str(PORTAL)
        after = await until(
            daemon,
            lambda s: (
                moved(s, "throttled_completions_total", portal=p, outcome="completed")
                and moved(s, "throttled_token_refreshes_total", outcome="revoked")
            ),
        )
    assert moved(after, "throttled_hubspot_rate_limited_total", portal=p) == 1
    assert moved(after, "throttled_completions_total", portal=p, outcome="rate_limited") == 1
    assert moved(after, "throttled_hubspot_requests_total", status="429") == 1
    limited = {"endpoint": "complete", "status": "429"}
    assert moved(after, "throttled_hubspot_request_duration_seconds_count", **limited) == 1
    assert moved(after, "throttled_token_refreshes_total", outcome="revoked") == 1
    refused = {"endpoint": "token_refresh", "status": "400"}
    assert moved(after, "throttled_hubspot_request_duration_seconds_count", **refused) == 1


async def test_two_daemons_in_one_process_keep_their_own_readings(db_url, fake_hubspot):
    config = make_config(db_url, fake_hubspot.base_url)
    async with running(config) as a, running(config) as b:
        assert a.runtime.exporter.registry is not b.runtime.exporter.registry
        await wait_for(
            lambda: None not in (a.runtime.exporter.backlog_at, b.runtime.exporter.backlog_at)
        )
        a.runtime.exporter.backlog = {77: Backlog(pending=5, failed=1)}
        a.runtime.scheduler.at_risk = {1, 2, 3}
        seen_a, seen_b = await scrape(a), await scrape(b)
    assert value(seen_a, "throttled_portal_actions", portal="77", state="pending") == 5
    assert value(seen_a, "throttled_portal_actions", portal="77", state="failed") == 1
    assert label_values(seen_b, "throttled_portal_actions", "portal") == set()
    assert value(seen_a, "throttled_queues_past_deadline") == 3
    assert value(seen_b, "throttled_queues_past_deadline") == 0
    for seen in (seen_a, seen_b):  # each registry has its own process collector
        assert value(seen, "process_resident_memory_bytes") > 0


def test_portal_labels_are_bounded_and_stable():
    label = metrics.PortalLabels(limit=2)
    assert [label(p) for p in (5, 6, 7, 5, 8, 6)] == ["5", "6", "other", "5", "other", "6"]
    listed, rest = metrics.top_portals({1: 3, 2: 9, 3: 1, 4: 9}, key=float, limit=2)
    assert listed == [(2, 9), (4, 9)]
    assert sorted(rest) == [1, 3]


async def test_a_huge_install_exports_a_bounded_number_of_portals(daemon_factory):
    n = 3 * metrics.MAX_PORTALS
    async with daemon_factory() as daemon:
        exporter = daemon.runtime.exporter
        await wait_for(lambda: exporter.backlog_at is not None)
        exporter.backlog = {pid: Backlog(pending=pid % 50, expired=1) for pid in range(1, n + 1)}
        health = daemon.runtime.dispatcher.tokens.health
        for pid in range(1, n + 1):
            health.result(pid, 204, 0.01, remaining=pid, max=10 * n)
        samples = await scrape(daemon)
    portals = label_values(samples, "throttled_portal_actions", "portal")
    assert len(portals) == metrics.MAX_PORTALS + 1
    assert "other" in portals
    total = sum(
        v
        for (name, labels), v in samples.items()
        if name == "throttled_portal_actions" and ("state", "pending") in labels
    )
    assert total == sum(pid % 50 for pid in range(1, n + 1))  # the rest is summed, not lost
    assert (
        value(samples, "throttled_portal_actions", portal="other", state="expired")
        == n - metrics.MAX_PORTALS
    )
    limits = label_values(samples, "throttled_hubspot_rate_limit_remaining", "portal")
    assert len(limits) == metrics.MAX_PORTALS + 1
    assert "1" in limits  # the portals with least left are listed
    assert str(n) not in limits
    other = value(
        samples, "throttled_hubspot_rate_limit_remaining", portal="other", window="interval"
    )
    assert other == metrics.MAX_PORTALS + 1  # the lowest of the rest


async def test_completions_by_portal_stay_bounded(daemon_factory, fake_hubspot, monkeypatch):
    monkeypatch.setattr(metrics, "portal_label", metrics.PortalLabels(limit=1))
    portals = [63001, 63002, 63003]
    async with daemon_factory() as daemon:
        before = await scrape(daemon)
        payloads = []
        for pid in portals:
            await daemon.connect_portal(fake_hubspot, pid)
            payloads.append(action_payload(portal_id=pid))
            assert (await daemon.post_action(payloads[-1]))[0] == 200
        await wait_for(lambda: all(p["callbackId"] in fake_hubspot.completed for p in payloads))

        def moved(samples: Samples, portal: str) -> float:
            name, outcome = "throttled_completions_total", "completed"
            return value(samples, name, portal=portal, outcome=outcome) - value(
                before, name, portal=portal, outcome=outcome
            )

        after = await until(
            daemon, lambda s: sum(moved(s, str(p)) for p in portals) + moved(s, "other") == 3
        )
    assert sum(moved(after, str(p)) for p in portals) == 1  # the first one seen
    assert moved(after, "other") == 2


async def test_a_scrape_needs_no_database(db_url, fake_hubspot):
    async with pg_proxy(db_url) as proxy:
        config = make_config(
            proxy.url_for(db_url), fake_hubspot.base_url, database={"connect_timeout_s": 10.0}
        )
        async with running(config) as daemon:
            exporter = daemon.runtime.exporter
            await wait_for(lambda: exporter.backlog_at is not None)
            exporter.backlog = {5: Backlog(pending=2)}
            proxy.cut()
            try:
                async with daemon.session.get(daemon.url + "/readyz") as resp:
                    assert resp.status == 503  # the database really is out of reach
                started = time.monotonic()
                samples = await scrape(daemon)
                elapsed = time.monotonic() - started
            finally:
                proxy.restore()
    assert elapsed < 2.0  # (a query would wait for the 10 s connect timeout)
    assert value(samples, "throttled_portal_actions", portal="5", state="pending") == 2


def test_the_call_site_api_is_kept(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(metrics, "_INSTRUMENTS", dict(metrics._INSTRUMENTS))
    monkeypatch.setattr(metrics, "_GAUGES", dict(metrics._GAUGES))
    widgets = metrics.Counter("throttled_test_widgets_total", "Widgets made.", "kind")
    plain = metrics.Counter("throttled_test_plain", "A name without _total.")
    widgets.inc()
    widgets.inc(2, kind="a")
    widgets.inc(kind="b")
    plain.inc(3)
    gauge = metrics.Gauge("throttled_test_level", "A level.")
    gauge.read = lambda: 4.5
    broken = metrics.Gauge("throttled_test_broken", "Raises when read.")

    def fail() -> float:
        raise RuntimeError("a bug")

    broken.read = fail
    samples = parse(metrics.render())
    assert value(samples, "throttled_test_widgets_total", kind="") == 1
    assert value(samples, "throttled_test_widgets_total", kind="a") == 2
    assert widgets.values == {"": 1, "a": 2, "b": 1}
    assert widgets.value(kind="a") == 2
    assert plain.name == "throttled_test_plain_total"
    assert value(samples, "throttled_test_plain_total") == 3
    assert value(samples, "throttled_test_level") == 4.5
    assert math.isnan(value(samples, "throttled_test_broken"))  # one broken gauge, not the scrape


def test_histogram_times_a_block():
    before = metrics.INGEST_COMMIT.count()
    with metrics.INGEST_COMMIT.time():
        pass
    assert metrics.INGEST_COMMIT.count() == before + 1
