"""Housekeeping jobs, each through its run-once entry point, and the runner that schedules
them (its own interval per job, a database outage ridden out)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import structlog

from tests.conftest import Daemon, action_payload, make_config, running, wait_for
from tests.pg_proxy import PgProxy, pg_proxy
from throttled import aio, metrics
from throttled.db.repository import DatabaseUnavailable
from throttled.housekeeping import (
    deadlines,
    expiry,
    maintain_once,
    rate_log,
    retention,
    runner,
    stale_claims,
)
from throttled.housekeeping.runner import HOUSEKEEPING, Job

PORTAL = 62515
LATER = {"queueName": "later", "startAt": "9999-11-30T00:00:00Z"}  # never released: stays pending


@pytest.fixture
def db(db_url: str) -> Any:
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


async def store(daemon: Daemon, n: int, fields: dict[str, Any] | None = None) -> list[str]:
    """n actions of one queue that is never released; their callback ids."""
    ids = []
    for _ in range(n):
        payload = action_payload(portal_id=PORTAL, input_fields=dict(fields or LATER))
        assert (await daemon.post_action(payload))[0] == 200
        ids.append(payload["callbackId"])
    return ids


def set_rows(db: Any, ids: list[str], assignments: str) -> None:
    db.execute(f"UPDATE actions SET {assignments} WHERE callback_id = ANY(%s)", (ids,))


def states(db: Any) -> dict[str, str]:
    return dict(db.execute("SELECT callback_id, state FROM actions").fetchall())


def spy(obj: Any, name: str) -> list[Any]:
    """Record what each call of obj.name returns."""
    results: list[Any] = []
    original = getattr(obj, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        results.append(result)
        return result

    setattr(obj, name, wrapper)
    return results


# -- retention ------------------------------------------------------------------------------


async def test_retention_deletes_only_old_rows_in_batches_of_batch_size(daemon_factory, db):
    async with daemon_factory(retention={"batch_size": 2, "days": 3.0}) as daemon:
        old = await store(daemon, 5)
        recent = await store(daemon, 2)
        pending = await store(daemon, 1)
        for cid, state in zip(old, ["done", "done", "failed", "expired", "expired"], strict=True):
            set_rows(db, [cid], f"state = '{state}', completed_at = now() - interval '4 days'")
        set_rows(db, recent[:1], "state = 'done', completed_at = now() - interval '2 days'")
        set_rows(db, recent[1:], "state = 'expired', completed_at = now() - interval '2 days'")
        db.execute(
            "INSERT INTO audit_log (at, actor, action, target)"
            " SELECT now() - interval '800 days', 'test', 'x', 't' FROM generate_series(1, 3)"
        )
        db.execute("INSERT INTO audit_log (actor, action, target) VALUES ('test', 'x', 'new')")
        batches = spy(daemon.runtime.repo, "delete_finished")
        counts = await retention.run_once(daemon.runtime)
        assert counts == {"actions": 5, "audit": 3, "oauth_states": 0}
        assert batches == [2, 2, 1]  # one short statement per batch, until a short one
        assert set(states(db)) == {*recent, *pending}
        assert db.execute("SELECT target FROM audit_log").fetchall() == [("new",)]


async def test_done_days_and_failed_days_override_retention_days(daemon_factory, db):
    sections = {"retention": {"days": 10.0, "done_days": 1.0}}
    async with daemon_factory(**sections) as daemon:
        done, failed = await store(daemon, 2)
        set_rows(db, [done], "state = 'done', completed_at = now() - interval '2 days'")
        set_rows(db, [failed], "state = 'failed', completed_at = now() - interval '2 days'")
        assert (await retention.run_once(daemon.runtime))["actions"] == 1
        assert set(states(db)) == {failed}


# -- expiry ---------------------------------------------------------------------------------


async def test_expiry_marks_overdue_pending_rows_expired(daemon_factory, db):
    async with daemon_factory(retention={"batch_size": 2}) as daemon:
        overdue = await store(daemon, 3)
        fine = await store(daemon, 1)
        set_rows(db, overdue, "deadline = now() - interval '1 second'")
        before = metrics.EXPIRED.values.get("", 0.0)
        batches = spy(daemon.runtime.repo, "expire_due")
        assert await expiry.run_once(daemon.runtime) == {"expired": 3}
        assert [len(b) for b in batches] == [2, 1]
        assert states(db) == {**dict.fromkeys(overdue, "expired"), fine[0]: "pending"}
        assert metrics.EXPIRED.values.get("", 0.0) == before + 3
        errors = db.execute("SELECT DISTINCT last_error FROM actions WHERE state = 'expired'")
        assert errors.fetchall() == [("block expired at HubSpot before it could be sent",)]


# -- stale claims ---------------------------------------------------------------------------


async def test_stale_claims_are_released_unless_held_or_recent(daemon_factory, db):
    async with daemon_factory() as daemon:
        runtime = daemon.runtime
        ids = await store(daemon, 4)
        [queue_id] = {r[0] for r in db.execute("SELECT queue_id FROM actions").fetchall()}
        handover = runtime.scheduler.handover
        assert handover is not None
        # (the portal's take-over resets the rows left claimed: claim them once it is over)
        await wait_for(
            lambda: (
                PORTAL in runtime.cluster.owned
                and not handover.taking(PORTAL)
                and queue_id in runtime.scheduler.queues
            )
        )
        queue = runtime.scheduler.queues[queue_id]
        rows = await runtime.repo.claim([queue_id], [4], datetime.now(UTC))
        by_id = {r.callback_id: r for r in rows}
        held, outcome, stale, fresh = (by_id[cid] for cid in ids)
        # One held by a sender (due in an hour), one with its outcome waiting for the result
        # writer, two in nobody's hands; all but `fresh` claimed long ago.
        runtime.dispatcher.put(queue, [held], time.time() + 3600)
        # (white box: an outcome the writer has not written yet; it is not woken for it)
        runtime.dispatcher.writer._pending.append(_done_outcome(outcome))
        assert {held.id, outcome.id} <= runtime.dispatcher.held_ids()
        set_rows(db, ids[:3], "claimed_at = now() - interval '1 hour'")
        with structlog.testing.capture_logs() as events:
            assert await stale_claims.run_once(runtime) == {"released": 1}
        assert states(db) == {
            stale.callback_id: "pending",
            held.callback_id: "claimed",
            outcome.callback_id: "claimed",  # (a release would have it sent twice)
            fresh.callback_id: "claimed",  # claimed under ten minutes ago
        }
        released = [e for e in events if e["event"] == "stale_claims_released"]
        assert [(e["rows"], e["queues"]) for e in released] == [(1, 1)]
        assert await stale_claims.run_once(runtime) == {"released": 0}


def _done_outcome(row: Any) -> Any:
    from throttled.drain.outcomes import Outcome

    return Outcome(done=[(row, time.time())])


# -- rate log -------------------------------------------------------------------------------


async def test_rate_log_pruning_keeps_what_a_window_can_see(daemon_factory, db):
    async with daemon_factory() as daemon:
        await store(daemon, 1, {"maxThroughput": "5", "timeUnit": "hours", **LATER})
        [queue_id] = {r[0] for r in db.execute("SELECT id FROM queues").fetchall()}
        for age in ("3 days", "2 hours", "1 minute"):
            db.execute(
                f"INSERT INTO queue_sends (queue_id, sent_at, n) VALUES (%s, now() - interval"
                f" '{age}', 1)",
                (queue_id,),
            )
        assert await rate_log.run_once(daemon.runtime) == {"pruned": 1}  # (kept a day at least)
        assert db.execute("SELECT count(*) FROM queue_sends").fetchone() == (2,)


async def test_an_overrides_long_window_keeps_its_sends_through_retention_and_pruning(
    daemon_factory, db
):
    """1 per 30 days by override (the stored policy says 5 per hour, and the queue is not
    tracked): a send 2 days old still counts, so neither job may delete it."""
    sections = {"retention": {"days": 0.5}}
    async with daemon_factory(**sections) as daemon:
        [sent] = await store(daemon, 1, {"maxThroughput": "5", "timeUnit": "hours", **LATER})
        [queue_id] = {r[0] for r in db.execute("SELECT id FROM queues").fetchall()}
        db.execute(
            'UPDATE queues SET override = \'{"max_throughput": 1, "time_period": 30,'
            ' "time_unit": "days"}\''
        )
        set_rows(
            db,
            [sent],
            "state = 'done', completed_at = now() - interval '2 days',"
            " sent_at = now() - interval '2 days'",
        )
        db.execute(
            "INSERT INTO queue_sends (queue_id, sent_at, n) VALUES (%s, now() - interval"
            " '2 days', 1)",
            (queue_id,),
        )
        daemon.runtime.scheduler.queues.clear()  # (as after a restart, with the queue idle)
        assert (await retention.run_once(daemon.runtime))["actions"] == 0
        assert await rate_log.run_once(daemon.runtime) == {"pruned": 0}
        assert set(states(db)) == {sent}


# -- deadlines ------------------------------------------------------------------------------


async def test_deadline_check_counts_queues_newly_at_risk_once(daemon_factory):
    async with daemon_factory(hubspot={"block_expiration": "PT10M"}) as daemon:
        await store(daemon, 3, {"maxThroughput": "1", "timeUnit": "hours", "queueName": "slow"})
        scheduler = daemon.runtime.scheduler
        await wait_for(lambda: len(scheduler.queues) == 1)
        assert await deadlines.run_once(daemon.runtime) == {"newly_at_risk": 1}
        assert len(scheduler.at_risk) == 1
        assert await deadlines.run_once(daemon.runtime) == {"newly_at_risk": 0}  # (still on)


async def test_maintain_once_runs_every_job_and_counts_what_they_did(daemon_factory, db):
    async with daemon_factory() as daemon:
        ids = await store(daemon, 2)
        set_rows(db, ids, "deadline = now() - interval '1 second'")
        before = HOUSEKEEPING.values.get("expiry.expired", 0.0)
        done = await maintain_once(daemon.runtime)
        assert list(done) == [
            "expiry",
            "stale_claims",
            "retention",
            "rate_log",
            "deadlines",
        ]
        assert done["expiry"] == {"expired": 2}
        assert HOUSEKEEPING.values.get("expiry.expired", 0.0) == before + 2
        assert list(await maintain_once(daemon.runtime, full=False)) == ["expiry"]


# -- the runner -----------------------------------------------------------------------------


async def test_each_job_runs_on_its_own_interval_and_a_failure_is_ridden_out(monkeypatch):
    monkeypatch.setattr(aio, "OUTAGE_FIRST_S", 0.02)
    runs = {"fast": 0, "slow": 0, "flaky": 0}

    def job(name: str, interval_s: float, fail_first: int = 0) -> Job:
        async def run_once(runtime: Any) -> dict[str, int]:
            runs[name] += 1
            if runs[name] <= fail_first:
                raise DatabaseUnavailable("connection refused")
            return {"did": 1}

        return Job(name=name, interval_s=interval_s, run_once=run_once)

    stop = asyncio.Event()
    jobs = [job("fast", 0.02), job("slow", 30.0), job("flaky", 0.02, fail_first=2)]
    with structlog.testing.capture_logs() as events:
        task = asyncio.create_task(runner.run(None, stop, jobs))  # type: ignore[arg-type]
        await wait_for(lambda: runs["fast"] >= 10 and runs["flaky"] >= 5)
        stop.set()
        await asyncio.wait_for(task, 5)
    assert runs["slow"] == 0  # first due 5 s after start
    warned = [e for e in events if e["event"] == "maintenance_failed"]
    assert [(e["loop"], e["job"]) for e in warned] == [("maintenance", "flaky")]  # one warning
    assert any(e["event"] == "database_outage_over" for e in events)


@contextlib.asynccontextmanager
async def behind_proxy(db_url: str, base_url: str, **sections: Any) -> AsyncIterator[Any]:
    async with pg_proxy(db_url) as proxy:
        cfg = make_config(proxy.url_for(db_url), base_url, **sections)
        async with running(cfg) as daemon:
            yield daemon, proxy


async def test_the_runner_survives_a_database_outage_and_resumes(db_url, fake_hubspot, db):
    sections = {"retention": {"expire_interval_s": 0.1}}
    async with behind_proxy(db_url, fake_hubspot.base_url, **sections) as (daemon, proxy):
        proxy: PgProxy
        ids = await store(daemon, 2)
        with structlog.testing.capture_logs() as events:
            proxy.cut()

            def failed() -> bool:
                return any(e["event"] == "maintenance_failed" for e in events)

            await wait_for(failed)
            set_rows(db, ids, "deadline = now() - interval '1 second'")  # (directly)
            await asyncio.sleep(0.3)  # several tries fail meanwhile: still one warning
            assert not daemon.task.done()
            proxy.restore()
            await wait_for(lambda: set(states(db).values()) == {"expired"}, 40)

            # (another loop may expire the rows first: the runner reports its own recovery on
            # its next successful pass, a moment later)
            def recovered() -> bool:
                over = [e for e in events if e["event"] == "database_outage_over"]
                return "maintenance" in {e["loop"] for e in over}

            await wait_for(recovered, 40)
        assert not daemon.task.done()
        warned = [e for e in events if e["event"] == "maintenance_failed"]
        assert len(warned) == 1
