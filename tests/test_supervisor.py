"""The supervisor's shape: one coroutine per queue with work, and only while it has work;
pause, resume, wake and cancel; a crashing queue coroutine stops the daemon; queues that
fall due together claim in one statement. Against a real PostgreSQL and the fake HubSpot."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import action_payload, wait_for
from tests.test_queue_operations import ADMIN, call, done, enqueue, key_path
from throttled import rates
from throttled.db.repository import Repository
from throttled.drain import queue_loop
from throttled.drain.claimer import ANSWER_SLICE, Claimer
from throttled.drain.supervisor import FORGET_AFTER_S
from throttled.queues import QueueLimiter, QueueState

PORTAL = 62515


def add_backlog(db_url: str, queues: int, per_queue: int, policy: rates.RatePolicy) -> list[int]:
    """Queues of PORTAL with pending rows, written behind any daemon's back."""
    ids = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n in range(queues):
            (queue_id,) = conn.execute(
                "INSERT INTO queues (key, portal_id, policy) VALUES (%s, %s, %s) RETURNING id",
                (f"queue:{PORTAL}:1:{n}:0", PORTAL, Jsonb(policy.to_json())),
            ).fetchone()
            conn.execute(
                "INSERT INTO actions (callback_id, queue_id, portal_id, deadline)"
                " SELECT 'cb-' || %s || '-' || g, %s, %s, now() + interval '1 day'"
                " FROM generate_series(1, %s) g",
                (queue_id, queue_id, PORTAL, per_queue),
            )
            ids.append(queue_id)
    return ids


def states(db_url: str, queue_id: int) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM actions WHERE queue_id = %s GROUP BY state", (queue_id,)
        ).fetchall()
    return dict(rows)


async def test_a_queue_has_a_coroutine_only_while_it_has_work(daemon_factory, fake_hubspot):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        supervisor = daemon.runtime.scheduler
        assert supervisor.running == frozenset()  # nothing to do: no coroutine at all
        ids = await enqueue(daemon, 3, {"maxThroughput": "2", "timeUnit": "seconds"})
        await wait_for(lambda: len(supervisor.running) == 1)
        (queue_id,) = supervisor.running
        assert supervisor.queues[queue_id].portal_id == PORTAL
        await wait_for(lambda: done(fake_hubspot, ids) == 3)
        await wait_for(lambda: not supervisor.running)  # drained: its coroutine is gone
        assert supervisor.active == 0
        assert queue_id in supervisor.queues  # (still known: its limiter remembers the sends)
        more = await enqueue(daemon, 1, {"maxThroughput": "2", "timeUnit": "seconds"})
        await wait_for(lambda: done(fake_hubspot, more) == 1)
        await wait_for(lambda: not supervisor.running)


async def test_pause_ends_the_coroutine_and_resume_starts_it_again(
    daemon_factory, fake_hubspot, db_url
):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        supervisor = daemon.runtime.scheduler
        ids = await enqueue(daemon, 6, {"maxThroughput": "1", "timeUnit": "seconds"})
        await wait_for(lambda: done(fake_hubspot, ids) >= 1)
        (queue_id,) = supervisor.running
        key = supervisor.queues[queue_id].key
        status, body = await call(daemon, "POST", key_path(key) + "/pause")
        assert status == 200, body
        await wait_for(lambda: queue_id not in supervisor.running)
        sent = done(fake_hubspot, ids)
        assert states(db_url, queue_id).get("claimed", 0) == 0
        await asyncio.sleep(1.5)  # (a window in which a running queue would have sent)
        assert done(fake_hubspot, ids) == sent
        assert not supervisor.running
        status, body = await call(daemon, "POST", key_path(key) + "/resume")
        assert status == 200, body
        await wait_for(lambda: queue_id in supervisor.running or done(fake_hubspot, ids) > sent)
        await wait_for(lambda: done(fake_hubspot, ids) == 6)
        await wait_for(lambda: not supervisor.running)


async def test_a_rate_change_wakes_a_sleeping_queue(daemon_factory, fake_hubspot):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        supervisor = daemon.runtime.scheduler
        ids = await enqueue(daemon, 3, {"maxThroughput": "1", "timeUnit": "hours"})
        await wait_for(lambda: done(fake_hubspot, ids) == 1)
        (queue_id,) = supervisor.running  # asleep until its next slot, an hour away
        key = supervisor.queues[queue_id].key
        body = {"max_throughput": "20", "time_unit": "seconds"}
        status, answer = await call(daemon, "PUT", key_path(key) + "/rate", body)
        assert status == 200, answer
        await wait_for(lambda: done(fake_hubspot, ids) == 3)  # woken: not an hour later


async def test_a_cancelled_queue_coroutine_loses_nothing(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        supervisor = daemon.runtime.scheduler
        ids = await enqueue(daemon, 3, {"maxThroughput": "1", "timeUnit": "hours"})
        await wait_for(lambda: done(fake_hubspot, ids) == 1)
        (queue_id,) = supervisor.running
        supervisor.cancel(queue_id)
        await wait_for(lambda: queue_id not in supervisor.running)
        assert states(db_url, queue_id) == {"done": 1, "pending": 2}
        supervisor.wake(queue_id)  # work is still there: a wake starts it again
        await wait_for(lambda: queue_id in supervisor.running)
        assert not daemon.task.done()


async def test_a_crashing_queue_coroutine_stops_the_daemon(
    daemon_factory, fake_hubspot, monkeypatch
):
    def broken(queue: QueueState, slot: float, horizon_s: float) -> int:
        raise RuntimeError("a bug in a queue coroutine")

    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        monkeypatch.setattr(queue_loop, "wanted", broken)  # (fault injection: a bug)
        status, _ = await daemon.post_action(action_payload(portal_id=PORTAL))
        assert status == 200
        await asyncio.wait_for(asyncio.wait([daemon.task]), 30)
        error = daemon.task.exception()
        assert error is not None
        assert "a bug in a queue coroutine" in repr(_leaves(error))


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [error]


def _states(queue_ids: list[int], policy: rates.RatePolicy) -> list[QueueState]:
    """In-memory state for queues of PORTAL under one policy (a claimer on its own)."""
    return [
        QueueState(
            id=qid,
            key=f"q{qid}",
            portal_id=PORTAL,
            limiter=QueueLimiter(policy, key=f"q{qid}"),
        )
        for qid in queue_ids
    ]


async def test_queues_due_together_claim_in_one_statement(db_url):
    policy = rates.RatePolicy(limit=1, period_s=10.0)
    queue_ids = add_backlog(db_url, 40, 2, policy)
    async with Repository.open(db_url, min_size=1, max_size=2) as repo:
        claimer = Claimer(repo)
        queues = _states(queue_ids, policy)
        asks = [claimer.claim(q, 1) for q in queues]
        assert await claimer.claim_once() == 40
        assert claimer.claims == 1
        got = [f.result() for f in asks]
    assert [[r.queue_id for r in rows] for rows in got] == [[qid] for qid in queue_ids]
    with psycopg.connect(db_url) as conn:
        (stamps,) = conn.execute(
            "SELECT count(DISTINCT claimed_at) FROM actions WHERE state = 'claimed'"
        ).fetchone()
    assert stamps == 1


async def test_a_large_claim_is_answered_a_slice_a_step_and_a_cancel_leaves_none_unanswered(
    db_url,
):
    """One statement for 250 queues; its answers go out ANSWER_SLICE a loop step (a
    thousand hand-overs in one step would hold the loop). Cancelled between slices (the
    daemon stopping), the claimer still hands every ask its rows: none is left claimed in
    nobody's hands."""
    policy = rates.RatePolicy(limit=1, period_s=10.0)
    queue_ids = add_backlog(db_url, 250, 1, policy)
    async with Repository.open(db_url, min_size=1, max_size=2) as repo:
        claimer = Claimer(repo)
        queues = _states(queue_ids, policy)
        asks = [claimer.claim(q, 1) for q in queues]
        task = asyncio.create_task(claimer.claim_once())
        seen: list[int] = []

        def first_answered(_: object) -> None:  # (the step after the first slice's)
            seen.append(sum(f.done() for f in asks))
            task.cancel()

        asks[0].add_done_callback(first_answered)
        with pytest.raises(asyncio.CancelledError):
            await task
    assert seen == [ANSWER_SLICE]
    assert claimer.claims == 1
    assert sorted(r.queue_id for f in asks for r in f.result()) == sorted(queue_ids)


async def test_backlogged_queues_found_at_start_claim_together(
    daemon_factory, fake_hubspot, db_url
):
    policy = rates.RatePolicy(limit=1, period_s=30.0)
    queue_ids = add_backlog(db_url, 30, 3, policy)
    started = datetime.now(UTC)
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        supervisor = daemon.runtime.scheduler
        await wait_for(lambda: supervisor.running == frozenset(queue_ids))
        with psycopg.connect(db_url) as conn:
            await wait_for(lambda: _first_sends(conn, started) == 30)
            (stamps,) = conn.execute(
                "SELECT count(DISTINCT claimed_at) FROM actions WHERE claimed_at >= %s",
                (started,),
            ).fetchone()
        assert stamps == 1  # 30 coroutines woke together: one claim statement


def _first_sends(conn: psycopg.Connection[Any], since: datetime) -> int:
    (n,) = conn.execute(
        "SELECT count(DISTINCT queue_id) FROM actions WHERE claimed_at >= %s", (since,)
    ).fetchone()
    return int(n)


async def test_a_queue_held_by_its_policy_has_no_coroutine(daemon_factory, db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        (queue_id,) = conn.execute(
            "INSERT INTO queues (key, portal_id, policy) VALUES ('held', %s, %s) RETURNING id",
            (PORTAL, Jsonb({"limit": "not a number"})),
        ).fetchone()
        conn.execute(
            "INSERT INTO actions (callback_id, queue_id, portal_id, deadline)"
            " VALUES ('cb-held', %s, %s, now() + interval '1 day')",
            (queue_id, PORTAL),
        )
    async with daemon_factory() as daemon:
        supervisor = daemon.runtime.scheduler
        assert supervisor.queues[queue_id].limiter.fault is not None
        await wait_for(lambda: queue_id not in supervisor.running)
        assert states(db_url, queue_id) == {"pending": 1}
        assert not daemon.task.done()


async def test_a_queue_that_cannot_be_loaded_does_not_hold_up_the_others(
    daemon_factory, fake_hubspot, db_url
):
    # An id the database rejects (beyond bigint: a DataError, not an outage) notified
    # together with queues written behind the daemon's back: they load and drain all the
    # same; the bad one is tried a few times (after the loader's backoff), then given up.
    policy = rates.RatePolicy(limit=50, period_s=1.0)
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        supervisor = daemon.runtime.scheduler
        # (the portal is taken up first: its take-over loads its queues itself)
        [first] = await enqueue(daemon, 1, {"maxThroughput": "50", "timeUnit": "seconds"})
        await wait_for(lambda: first in fake_hubspot.completed)
        queue_ids = add_backlog(db_url, queues=3, per_queue=4, policy=policy)
        bad = 10**20
        supervisor.notify([bad, *queue_ids])
        await wait_for(lambda: all(states(db_url, q) == {"done": 4} for q in queue_ids))
        await wait_for(
            lambda: bad not in supervisor._unknown and bad not in supervisor._load_failures,
            timeout=60,
        )
        assert bad not in supervisor.queues
        assert not daemon.task.done()


async def test_an_idle_queue_is_forgotten_once_its_log_stops_counting_and_loaded_again_with_it(
    daemon_factory, fake_hubspot
):
    fields = {"maxThroughput": "3", "timeUnit": "minutes"}
    async with daemon_factory() as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        supervisor = daemon.runtime.scheduler
        ids = await enqueue(daemon, 2, fields)  # both go at once, within the minute's three
        await wait_for(lambda: done(fake_hubspot, ids) == 2)
        await wait_for(lambda: not supervisor.running)  # (it asked for three, got two: idle)
        (queue_id,) = supervisor.queues
        now = supervisor.clock()
        assert await supervisor.forget_idle(now) == 0  # its sends count for a minute yet
        assert queue_id in supervisor.queues
        # As if the minute and the grace had passed: forgotten (and the memory with it).
        assert await supervisor.forget_idle(now + 60.0 + FORGET_AFTER_S) == 1
        assert supervisor.queues == {}
        # Work for it again, within the real minute: it is loaded with its rate log from the
        # database, which holds the two sends, so of two more only one may go now.
        more = await enqueue(daemon, 2, fields)
        await wait_for(lambda: done(fake_hubspot, more) == 1)
        assert supervisor.queues[queue_id].limiter.window_count(supervisor.clock()) == 3
        await asyncio.sleep(1.0)  # (ample for a send that was not held back)
        assert done(fake_hubspot, more) == 1
        assert supervisor.running == frozenset({queue_id})  # sleeping until the slot


async def test_a_queue_with_work_or_paused_is_never_forgotten(daemon_factory, fake_hubspot):
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        supervisor = daemon.runtime.scheduler
        ids = await enqueue(daemon, 3, {"maxThroughput": "1", "timeUnit": "minutes"})
        await wait_for(lambda: done(fake_hubspot, ids) == 1)
        (queue_id,) = supervisor.queues
        far = supervisor.clock() + 86_400.0
        assert await supervisor.forget_idle(far) == 0  # a coroutine waits for its slot
        key = supervisor.queues[queue_id].key
        status, _ = await call(daemon, "POST", key_path(key) + "/pause")
        assert status == 200
        await wait_for(lambda: not supervisor.running)
        assert await supervisor.forget_idle(far) == 0  # paused: kept
        assert queue_id in supervisor.queues
