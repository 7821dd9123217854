"""Durability: an acknowledged action is never lost (SIGTERM under load, kill -9, restart
without a burst), and a database outage is answered 503 + Retry-After, never 200 or 500."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psycopg
import pytest

from tests.conftest import (
    CLIENT_SECRET,
    action_payload,
    eventually,
    make_config,
    running,
    wait_for,
)
from tests.daemon_process import (
    DaemonProcess,
    Outcome,
    fire,
    post_signed,
    query,
    stored_callback_ids,
    write_config,
)
from throttled.db.repository import DatabaseUnavailable, Repository
from throttled.hubspot.fake import FakeHubSpot, max_in_window
from throttled.hubspot.signature import sign_headers

PORTAL = 62515
SLOW_DEFAULTS = {"max_throughput": 5, "time_unit": "seconds"}  # far below the offered load
SHUTDOWN_TIMEOUT_S = 15.0
SEND_MARGIN_MS = 50.0
EXIT_WAIT_S = SHUTDOWN_TIMEOUT_S + 45.0  # only catches hangs


@pytest.fixture
async def daemon_process(
    tmp_path: Path, db_url: str, fake_hubspot: FakeHubSpot
) -> AsyncIterator[Callable[[], DaemonProcess]]:
    """Make `throttled serve` children on one config (same DB, same key); kill leftovers."""
    assert fake_hubspot.base_url is not None
    config_path, public_url = write_config(
        tmp_path / "throttled.toml",
        db_url=db_url,
        api_base_url=fake_hubspot.base_url,
        defaults=SLOW_DEFAULTS,
        server={"shutdown_timeout_s": SHUTDOWN_TIMEOUT_S},
        # The fake timestamps a completion when its handler runs on the test's loop, a little
        # after the child wrote it: a margin well above that keeps the checks about bursts.
        sender={"send_margin_ms": SEND_MARGIN_MS},
    )
    made: list[DaemonProcess] = []
    runs = itertools.count(1)

    def make() -> DaemonProcess:
        proc = DaemonProcess(config_path, public_url, tmp_path / f"serve-{next(runs)}.log")
        made.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in made:
            await proc.kill()


async def _connect(daemon: DaemonProcess, fake: FakeHubSpot) -> None:
    token = f"refresh-{PORTAL}-{secrets.token_hex(4)}"
    fake.register_portal(PORTAL, token)
    await daemon.connect_portal(PORTAL, token)


def _summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "connection_error"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _event_time(daemon: DaemonProcess, event: str) -> float:
    """The wall-clock time of the daemon's first `event` log line."""
    found = [e for e in daemon.events() if e.get("event") == event]
    assert found, f"no {event!r} in the daemon log:\n{daemon.log_tail()}"
    return datetime.fromisoformat(found[0]["timestamp"]).timestamp()


async def _stored_at_least(db_url: str, n: int, *, workflow_id: int | None = None) -> bool:
    """Whether at least `n` actions (of this workflow, if given) are stored."""
    sql = "SELECT count(*) FROM actions WHERE %s::bigint IS NULL OR workflow_id = %s"
    [(stored,)] = await query(db_url, sql, workflow_id, workflow_id)
    return int(stored) >= n


async def _assert_acknowledged_are_stored(db_url: str, outcomes: list[Outcome]) -> None:
    acknowledged = [o.callback_id for o in outcomes if o.status == 200]
    stored = await stored_callback_ids(db_url, acknowledged)
    lost = sorted(set(acknowledged) - stored)
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged actions lost: {lost[:5]}"


def _assert_no_unexpected_answers(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        assert o.status in (200, 503, None), o
        if o.status == 503:
            assert o.retry_after, o
            assert isinstance(o.body, dict), o
            assert o.body.get("error"), o
        if o.status == 200:
            assert o.body["outputFields"]["hs_execution_state"] == "BLOCK", o


async def test_sigterm_under_load_loses_no_acknowledged_action(
    daemon_process, fake_hubspot, db_url
):
    daemon = daemon_process()
    await _connect(daemon, fake_hubspot)
    await daemon.start()

    done = threading.Event()
    load = asyncio.create_task(
        fire(daemon.url, lambda: action_payload(portal_id=PORTAL), done, concurrency=20)
    )
    # SIGTERM once the load is well under way (actions acknowledged, and still coming).
    await eventually(lambda: _stored_at_least(db_url, 100), timeout=60)
    assert not load.done()
    daemon.send_signal(signal.SIGTERM)
    try:
        code = await daemon.wait(EXIT_WAIT_S)  # keep firing until the process is gone
    finally:
        done.set()
        outcomes = await load

    log = daemon.log_tail()
    assert code == 0, f"exit code {code}:\n{log}"
    events = {e.get("event") for e in daemon.events()}
    assert "shutdown_complete" in events, log
    assert "shutdown_timeout" not in events, log

    summary = _summary(outcomes)
    assert summary.get("200", 0) > 0, summary
    _assert_no_unexpected_answers(outcomes)
    await _assert_acknowledged_are_stored(db_url, outcomes)

    # Once shutdown began, nothing is acknowledged: 503 + Retry-After, or connection refused.
    stopped_at = _event_time(daemon, "shutdown_started")
    after = [o for o in outcomes if o.started > stopped_at]
    assert after, summary
    assert all(o.status in (503, None) for o in after), [o for o in after if o.status == 200]
    assert all(o.body.get("error") == "stopping" for o in after if o.status == 503), after

    claimed = await query(db_url, "SELECT count(*) FROM actions WHERE state = 'claimed'")
    assert claimed[0][0] == 0
    pending = await query(db_url, "SELECT count(*) FROM actions WHERE state = 'pending'")
    assert pending[0][0] > 0  # the slow default rate left a backlog behind


async def test_kill_9_then_restart_completes_backlog_without_burst(
    daemon_process, fake_hubspot, db_url
):
    first = daemon_process()
    await _connect(first, fake_hubspot)
    await first.start()

    # A small backlog in a 2-per-second queue, still draining when the process is killed.
    limited = [
        action_payload(
            portal_id=PORTAL,
            workflow_id=70001,
            input_fields={"maxThroughput": "2", "timeUnit": "seconds"},
        )
        for _ in range(12)
    ]
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(post_signed(session, first.url, p) for p in limited))
    assert [a.status for a in answers] == [200] * len(limited), answers
    limited_ids = [p["callbackId"] for p in limited]

    done = threading.Event()
    load = asyncio.create_task(
        fire(first.url, lambda: action_payload(portal_id=PORTAL), done, concurrency=20)
    )
    # Kill once the load is under way (actions acknowledged, and still coming), right after
    # a completion of the limited queue reached the fake, so the restarted process would be
    # inside that send's window if it ignored what the first one sent.
    await eventually(lambda: _stored_at_least(db_url, 50, workflow_id=55555), timeout=60)
    seen = len(fake_hubspot.sends_for(limited_ids))
    await wait_for(lambda: len(fake_hubspot.sends_for(limited_ids)) > seen, timeout=30)
    assert not load.done()
    first.send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        code = await first.wait(EXIT_WAIT_S)
    finally:
        done.set()
        outcomes = await load
    assert code == -signal.SIGKILL
    sent_before = len(fake_hubspot.sends_for(limited_ids))

    # Same database, same config, started at once.
    second = daemon_process()
    await second.start()
    ready_at = time.time()

    summary = _summary(outcomes)
    assert summary.get("200", 0) > 0, summary
    _assert_no_unexpected_answers(outcomes)
    await _assert_acknowledged_are_stored(db_url, outcomes)  # intake alone writes rows
    assert sent_before < len(limited_ids)  # the kill landed mid-backlog

    await wait_for(lambda: all(c in fake_hubspot.completed for c in limited_ids), timeout=90)

    times = fake_hubspot.sends_for(limited_ids)  # both runs, re-sends included
    why = _send_log(fake_hubspot, limited_ids, killed_at, ready_at)
    assert max_in_window(times, 1.0) <= 2, why
    for callback_id in limited_ids:
        assert fake_hubspot.completed[callback_id][1] == {"hs_execution_state": "SUCCESS"}

    second.send_signal(signal.SIGTERM)
    assert await second.wait(EXIT_WAIT_S) == 0, second.log_tail()
    states = await query(
        db_url,
        "SELECT state, count(*) FROM actions WHERE callback_id = ANY(%s) GROUP BY 1",
        limited_ids,
    )
    assert dict(states) == {"done": len(limited_ids)}


def _send_log(fake: FakeHubSpot, callback_ids: list[str], killed_at: float, ready_at: float) -> str:
    """The fake's callbacks requests for these ids, timed from the kill (for failures)."""
    wanted = set(callback_ids)
    lines = [
        f"{r.at - killed_at:+.4f}s status={r.status} ids={sorted(wanted & set(r.callback_ids))}"
        for r in fake.received
        if wanted & set(r.callback_ids)
    ]
    return (
        f"sends relative to SIGKILL (restarted daemon ready at {ready_at - killed_at:+.3f}s):\n"
        + "\n".join(lines)
    )


# -- restart: the rate log carries over ----------------------------------------------------


def _queue(daemon: Any, workflow_id: int) -> Any:
    """The daemon's in-memory state for the queue of `workflow_id` (default action/index)."""
    key = f"queue:{PORTAL}:{workflow_id}:1234567:0"
    found = [q for q in daemon.runtime.scheduler.queues.values() if q.key == key]
    assert found, f"queue {key} not tracked"
    return found[0]


def _per_minute(workflow_id: int) -> dict[str, Any]:
    return action_payload(
        portal_id=PORTAL,
        workflow_id=workflow_id,
        input_fields={"maxThroughput": "2", "timeUnit": "minutes"},
    )


async def test_restart_keeps_the_send_margin(fake_hubspot, db_url):
    cfg = make_config(db_url, fake_hubspot.base_url, sender={"send_margin_ms": SEND_MARGIN_MS})
    payloads = [_per_minute(70003) for _ in range(3)]
    ids = [p["callbackId"] for p in payloads]
    async with running(cfg) as first:
        await first.connect_portal(fake_hubspot, PORTAL)
        for payload in payloads:
            assert (await first.post_action(payload))[0] == 200
        await wait_for(lambda: sum(i in fake_hubspot.completed for i in ids) == 2)
        expected = _queue(first, 70003).limiter.earliest(time.time())
    async with running(cfg) as second:  # the third action is still pending
        got = _queue(second, 70003).limiter.earliest(time.time())
    assert got >= expected - 1e-4, (
        f"the restarted daemon may send the next action {expected - got:.4f}s earlier "
        "than the daemon it replaced"
    )


async def test_restart_keeps_the_rate_log_of_a_drained_queue(fake_hubspot, db_url):
    cfg = make_config(db_url, fake_hubspot.base_url)
    payloads = [_per_minute(70004) for _ in range(2)]
    async with running(cfg) as first:
        await first.connect_portal(fake_hubspot, PORTAL)
        for payload in payloads:
            assert (await first.post_action(payload))[0] == 200
        await wait_for(lambda: all(p["callbackId"] in fake_hubspot.completed for p in payloads))
        expected = _queue(first, 70004).limiter.earliest(time.time())
    late = _per_minute(70004)
    async with running(cfg) as second:  # the queue has nothing pending at start-up
        assert (await second.post_action(late))[0] == 200
        # Either it goes at once (the window forgotten), or the queue is loaded with its rate
        # log replayed, and its limiter, which the sender checks at the send instant, holds
        # it to the window of the two sends before the restart.
        supervisor = second.runtime.scheduler

        def holds_it() -> bool:
            queues = [q for q in supervisor.queues.values() if q.key.endswith(":70004:1234567:0")]
            return bool(queues) and queues[0].limiter.earliest(time.time()) >= expected - 1e-4

        await wait_for(lambda: late["callbackId"] in fake_hubspot.completed or holds_it())
    # (stopped gracefully: every request it sent is answered, so in the fake's log)
    assert late["callbackId"] not in fake_hubspot.completed, "sent inside the window"
    times = fake_hubspot.sends_for([p["callbackId"] for p in [*payloads, late]])
    assert max_in_window(times, 60.0) <= 2, sorted(t - times[0] for t in times)


# -- database outage -------------------------------------------------------------------------


def _admin(admin_url: str, *statements: tuple[str, tuple[Any, ...]]) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for sql, params in statements:
            admin.execute(sql, params)


def _end_connections(admin_url: str, name: str) -> list[int]:
    """Have the server end every connection to `name`; the ended backends' pids."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchall()
    return [pid for pid, ended in rows if ended]


def _ended(admin_url: str, pids: list[int]) -> bool:
    """Whether these backends are gone: out of pg_stat_activity and, when the server runs on
    this host, their processes exited (so their sockets are closed: the FATAL message and
    the EOF are on our side)."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        (left,) = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone()
    return left == 0 and not any(Path(f"/proc/{pid}").exists() for pid in pids)


async def _connections_ended(admin_url: str, name: str) -> None:
    """End every connection to `name` and wait until the server has closed them all."""
    pids = await asyncio.to_thread(_end_connections, admin_url, name)
    await eventually(lambda: asyncio.to_thread(_ended, admin_url, pids))


@contextlib.asynccontextmanager
async def _database_unreachable(admin_url: str, name: str) -> AsyncIterator[None]:
    """Refuse new connections to `name` and end the existing ones; re-allow on exit."""
    await asyncio.to_thread(
        _admin, admin_url, (f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false', ())
    )
    try:
        await _connections_ended(admin_url, name)  # the outage is under way: then the action
        yield
    finally:
        await asyncio.to_thread(
            _admin, admin_url, (f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true', ())
        )


async def _post(daemon: Any, payload: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    body = json.dumps(payload).encode()
    url = daemon.url + "/api/hubspot/action"
    headers = {"Content-Type": "application/json"}
    headers.update(sign_headers(CLIENT_SECRET, "POST", url, body))
    async with daemon.session.post(
        url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
    ) as resp:
        return resp.status, dict(resp.headers), await resp.json(content_type=None)


async def _settled_daemon(daemon: Any, fake: FakeHubSpot) -> None:
    """One action stored and completed: the pool is warm, the queue known, the loops idle."""
    await daemon.connect_portal(fake, PORTAL)
    first = action_payload(portal_id=PORTAL)
    status, _, body = await _post(daemon, first)
    assert status == 200, body
    await wait_for(lambda: first["callbackId"] in fake.completed)


async def test_database_unreachable_answers_503(
    daemon_factory, fake_hubspot, db_url, pg_server_url
):
    name = urlsplit(db_url).path.lstrip("/")
    async with daemon_factory() as daemon:
        await _settled_daemon(daemon, fake_hubspot)

        async with _database_unreachable(pg_server_url, name):
            # A queue the daemon has seen (insert only) and a new one (upsert first).
            for payload in (
                action_payload(portal_id=PORTAL),
                action_payload(portal_id=PORTAL, workflow_id=70002),
            ):
                status, headers, body = await _post(daemon, payload)
                assert status == 503, (status, body)
                assert int(headers["Retry-After"]) > 0
                assert body["error"] == "database_unavailable", body
                assert body["message"], body
            async with daemon.session.get(daemon.url + "/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "database_unavailable"
            assert not daemon.task.done(), "the daemon stopped during the outage"

        payload = action_payload(portal_id=PORTAL)
        status, _, body = await _post(daemon, payload)
        assert status == 200, body
        assert await stored_callback_ids(db_url, [payload["callbackId"]]) == {payload["callbackId"]}
        async with daemon.session.get(daemon.url + "/readyz") as resp:
            assert resp.status == 200
        assert not daemon.task.done(), "the daemon stopped after the outage"


async def test_intake_connection_ended_while_idle_costs_no_503(
    daemon_factory, fake_hubspot, db_url, pg_server_url
):
    name = urlsplit(db_url).path.lstrip("/")
    # One flusher: the action below goes over the connection it has held since the first.
    async with daemon_factory(ingest={"flushers": 1}) as daemon:
        await _settled_daemon(daemon, fake_hubspot)
        # The server ends them all (a restart, an idle timeout), and has closed them.
        await _connections_ended(pg_server_url, name)
        payload = action_payload(portal_id=PORTAL)
        status, _, body = await _post(daemon, payload)
        assert status == 200, body
        assert await stored_callback_ids(db_url, [payload["callbackId"]]) == {payload["callbackId"]}
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed)
        assert not daemon.task.done()


async def test_terminated_idle_connection_is_database_unavailable(db_url, pg_server_url):
    name = urlsplit(db_url).path.lstrip("/")
    async with Repository.open(db_url, min_size=2, max_size=2) as repo:
        await repo.ping()
        # Block this loop while the server ends every connection, so each socket holds the
        # FATAL message and the EOF; then let exactly one loop pass run: it delivers the
        # FATAL (data_received) but the EOF only comes on the next pass.
        # (Blocking on purpose: polled here, not awaited, so the loop does not run.)
        pids = _end_connections(pg_server_url, name)
        deadline = time.monotonic() + 20.0  # only catches hangs
        while not _ended(pg_server_url, pids):
            assert time.monotonic() < deadline, "the server did not end the connections"
            time.sleep(0.01)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        with pytest.raises(DatabaseUnavailable):
            await repo.ping()
