"""A database outage ends no background loop: each rides it out, and its work resumes after.

The daemon runs against the real PostgreSQL through a TCP proxy on loopback (tests/pg_proxy.py).
Cutting the proxy is the outage: every connection is closed and new ones are refused. Nothing
of throttled is mocked. Each test waits until the loops concerned have logged their failure
(so the outage really reached them), restores the proxy, then checks the outcome in the
`actions` rows and at the fake HubSpot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import structlog

from tests.conftest import Daemon, action_payload, make_config, running, wait_for
from tests.pg_proxy import PgProxy, pg_proxy
from throttled.db.repository import ClaimedAction, QueueRow, Repository
from throttled.hubspot.action import parse
from throttled.hubspot.fake import FakeHubSpot

PORTAL = 62515
OUTAGE_WAIT_S = 20.0  # generous bounds: they only catch hangs
RESUME_WAIT_S = 30.0
EXPIRED_ERROR = "block expired at HubSpot before it could be sent"

Events = list[dict[str, Any]]


@pytest.fixture
async def proxy(db_url: str) -> AsyncIterator[PgProxy]:
    """A proxy in front of the test database's server."""
    async with pg_proxy(db_url) as p:
        yield p


@pytest.fixture
def behind_proxy(
    db_url: str, proxy: PgProxy, fake_hubspot: FakeHubSpot
) -> Callable[..., contextlib.AbstractAsyncContextManager[Daemon]]:
    """A running daemon whose database URL goes through the proxy."""

    def factory(**sections: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[Daemon]:
        return running(make_config(proxy.url_for(db_url), fake_hubspot.base_url, **sections))

    return factory


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A direct connection to the test database (not through the proxy)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


def states(db: psycopg.Connection[Any], callback_ids: Iterable[str]) -> dict[str, str]:
    """callback id → state."""
    found = db.execute(
        "SELECT callback_id, state FROM actions WHERE callback_id = ANY(%s)",
        (list(callback_ids),),
    ).fetchall()
    return dict(found)


def failed_loops(events: Events) -> set[str]:
    """The loops that logged a database failure."""
    return {e["loop"] for e in events if e["log_level"] == "warning" and "loop" in e}


def recovered_loops(events: Events) -> set[str]:
    """The loops that logged the end of their outage."""
    return {e["loop"] for e in events if e["event"] == "database_outage_over"}


async def until(
    daemon: Daemon, predicate: Callable[[], bool], timeout: float = OUTAGE_WAIT_S
) -> None:
    """wait_for(predicate), failing at once if the daemon stops meanwhile."""

    def check() -> bool:
        if daemon.task.done():
            error = None if daemon.task.cancelled() else daemon.task.exception()
            raise AssertionError(f"the daemon stopped: {error!r}")
        return predicate()

    await wait_for(check, timeout)


def ids_of(payloads: Iterable[dict[str, Any]]) -> list[str]:
    return [p["callbackId"] for p in payloads]


async def post_all(daemon: Daemon, payloads: list[dict[str, Any]]) -> None:
    """POST the actions concurrently; every one must be accepted."""
    answers = await asyncio.gather(*(daemon.post_action(p) for p in payloads))
    assert [status for status, _ in answers] == [200] * len(payloads), answers


async def store_directly(
    daemon: Daemon, repo: Repository, payloads: list[dict[str, Any]]
) -> QueueRow:
    """Store actions of one queue behind the daemon's back (as another instance would);
    return their queue."""
    intake = daemon.runtime.services.intake
    actions = [intake.build(parse(json.dumps(p).encode())) for p in payloads]
    first = actions[0]
    [queue] = await repo.upsert_queues([first.queue_key], [first.portal_id], [first.policy])
    await repo.insert_actions(actions, [queue.id] * len(actions))
    return queue


async def test_every_loop_rides_out_an_outage_and_the_work_resumes(
    behind_proxy, proxy, fake_hubspot, db
):
    # One claim per slot (no claiming ahead), so the scheduler claims during the outage;
    # maintenance every second; the first completion answered after the outage began, so the
    # result writer meets it too.
    async with behind_proxy(
        sender={"claim_ahead_s": 0.0, "lookahead_s": 0.05}, retention={"interval_s": 1}
    ) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fields = {"maxThroughput": "1", "timeUnit": "seconds", "queueName": "outage"}
        before = [action_payload(portal_id=PORTAL, input_fields=dict(fields)) for _ in range(3)]
        ids = ids_of(before)
        fake_hubspot.delay_s = 1.0
        with structlog.testing.capture_logs() as events:
            await post_all(daemon, before)
            await until(daemon, lambda: any(i in fake_hubspot.completed for i in ids))
            proxy.cut()

            status, body = await daemon.post_action(action_payload(portal_id=PORTAL))
            assert (status, body["error"]) == (503, "database_unavailable")
            # (the cluster's listener sees its connection closed at once, and stops sending
            # until a heartbeat renews the leases: one runs at once, and fails)
            loops = {"claimer", "result-writer", "maintenance", "cluster", "cluster_listen"}
            await until(daemon, lambda: loops <= failed_loops(events), OUTAGE_WAIT_S)
            assert not daemon.task.done(), "the daemon stopped during the outage"

            fake_hubspot.delay_s = 0.0
            proxy.restore()
            await until(daemon, lambda: set(ids) <= fake_hubspot.completed.keys(), RESUME_WAIT_S)
            await until(
                daemon, lambda: states(db, ids) == dict.fromkeys(ids, "done"), RESUME_WAIT_S
            )
            after = action_payload(portal_id=PORTAL)
            assert (await daemon.post_action(after))[0] == 200
            await until(
                daemon, lambda: after["callbackId"] in fake_hubspot.completed, RESUME_WAIT_S
            )
            await until(daemon, lambda: loops <= recovered_loops(events), RESUME_WAIT_S)
        assert not daemon.task.done(), "the daemon stopped after the outage"
        # One warning per loop for the whole outage, however many tries it took.
        warned = [e["loop"] for e in events if e["log_level"] == "warning" and "loop" in e]
        assert sorted(warned) == sorted(loops), warned
        # Each was sent once: the one answered during the outage was not sent again.
        assert len(fake_hubspot.sends_for(ids)) == len(ids)
    # (running() awaited the daemon's task at the end of the block: it stopped cleanly)


async def test_rows_whose_deadline_passes_during_an_outage_end_expired(
    behind_proxy, proxy, fake_hubspot, db
):
    # 1 per 10 s, claimed 30 s ahead: the first row goes at once, the other two are claimed and
    # wait in the sender for their slots. Their block expires during the outage: the sender
    # drops them, and they must be marked expired once the database is back (the claimed-
    # expiry loop). A row of a queue that has not started is pending when its deadline passes:
    # maintenance expires it.
    async with behind_proxy(
        hubspot={"block_expiration": "PT4S"},
        sender={"claim_ahead_s": 30.0},
        ingest={"linger_ms": 200, "flushers": 1},
        retention={"interval_s": 1},
    ) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fields = {"maxThroughput": "1", "timePeriod": "10", "timeUnit": "seconds"}
        claimed = [action_payload(portal_id=PORTAL, input_fields=dict(fields)) for _ in range(3)]
        later = {"queueName": "not-started", "startAt": "9999-11-30T00:00:00Z"}
        pending = action_payload(portal_id=PORTAL, input_fields=later)
        await post_all(daemon, [*claimed, pending])
        ids = ids_of(claimed)
        await until(
            daemon,
            lambda: sorted(states(db, ids).values()) == ["claimed", "claimed", "done"],
            OUTAGE_WAIT_S,
        )
        with structlog.testing.capture_logs() as events:
            proxy.cut()
            loops = {"claimed-expiry", "maintenance"}
            await until(daemon, lambda: loops <= failed_loops(events), OUTAGE_WAIT_S)
            assert not daemon.task.done(), "the daemon stopped during the outage"
            proxy.restore()
            everything = [*ids, pending["callbackId"]]
            await until(
                daemon,
                lambda: sorted(states(db, everything).values()) == ["done"] + ["expired"] * 3,
                RESUME_WAIT_S,
            )
        assert not daemon.task.done(), "the daemon stopped after the outage"
        errors = db.execute(
            "SELECT DISTINCT last_error FROM actions WHERE state = 'expired'"
        ).fetchall()
        assert errors == [(EXPIRED_ERROR,)]
        done = {cid for cid, state in states(db, everything).items() if state == "done"}
        assert fake_hubspot.completed.keys() & set(everything) == done


async def test_rows_handed_to_expire_during_an_outage_are_marked_expired_after_it(
    behind_proxy, proxy, db_url, db
):
    async with behind_proxy() as daemon, Repository.open(db_url, min_size=1, max_size=2) as repo:
        payloads = [
            action_payload(portal_id=PORTAL, input_fields={"queueName": "expire"}) for _ in range(3)
        ]
        queue = await store_directly(daemon, repo, payloads)
        rows: list[ClaimedAction] = await repo.claim([queue.id], [len(payloads)], datetime.now(UTC))
        assert len(rows) == len(payloads)
        with structlog.testing.capture_logs() as events:
            proxy.cut()
            daemon.runtime.dispatcher.expire(rows)
            await until(daemon, lambda: "claimed-expiry" in failed_loops(events), OUTAGE_WAIT_S)
            assert not daemon.task.done(), "the daemon stopped during the outage"
            proxy.restore()
            ids = ids_of(payloads)
            await until(
                daemon, lambda: states(db, ids) == dict.fromkeys(ids, "expired"), RESUME_WAIT_S
            )
            await until(daemon, lambda: "claimed-expiry" in recovered_loops(events), RESUME_WAIT_S)
        assert not daemon.task.done()


async def test_a_queue_notified_during_an_outage_is_claimed_after_it(
    behind_proxy, proxy, fake_hubspot, db_url
):
    # New rows of a queue this process does not track yet (stored by another instance, say):
    # the scheduler must look the queue up, and an outage at that moment must not make it
    # forget the queue (its rows would wait for the next action, or for a restart).
    async with behind_proxy() as daemon, Repository.open(db_url, min_size=1, max_size=2) as repo:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        payloads = [
            action_payload(portal_id=PORTAL, input_fields={"queueName": "elsewhere"})
            for _ in range(2)
        ]
        queue = await store_directly(daemon, repo, payloads)
        with structlog.testing.capture_logs() as events:
            proxy.cut()
            daemon.runtime.scheduler.notify([queue.id])
            await until(daemon, lambda: "scheduler" in failed_loops(events), OUTAGE_WAIT_S)
            proxy.restore()
            ids = ids_of(payloads)
            await until(daemon, lambda: set(ids) <= fake_hubspot.completed.keys(), RESUME_WAIT_S)
        assert not daemon.task.done()


SLOW_CLAIM = """
CREATE TABLE slow_claim ();
CREATE FUNCTION slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM slow_claim) THEN
    DELETE FROM slow_claim;
    PERFORM pg_sleep(2);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER slow_claim AFTER UPDATE ON actions FOR EACH ROW
  WHEN (OLD.state = 'pending' AND NEW.state = 'claimed')  -- (a claim, nothing else)
  EXECUTE FUNCTION slow_claim();
"""


async def test_rows_of_a_claim_whose_answer_was_lost_are_released_and_sent(
    behind_proxy, proxy, fake_hubspot, db
):
    # The claim statement commits, but the connection breaks before its answer arrives: the
    # rows are claimed in the database and held by nobody.
    async with behind_proxy() as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        # (off the loop: CREATE TRIGGER waits for the daemon's transactions on actions, and
        # they can only end while the loop runs)
        await asyncio.to_thread(db.execute, SLOW_CLAIM)
        db.execute("INSERT INTO slow_claim DEFAULT VALUES")
        payload = action_payload(portal_id=PORTAL)
        assert (await daemon.post_action(payload))[0] == 200

        def sleeping() -> bool:
            (n,) = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
            ).fetchone()
            return n > 0

        await until(daemon, sleeping)
        proxy.cut()  # while the claim sleeps in its trigger: its answer will be lost
        # The sleep ending is not the commit (the backend commits a moment later), so wait for
        # the row's state; nothing but that claim can write it while the proxy is cut.
        claimed = {payload["callbackId"]: "claimed"}
        await until(daemon, lambda: states(db, [payload["callbackId"]]) == claimed)
        proxy.restore()
        await until(daemon, lambda: payload["callbackId"] in fake_hubspot.completed, RESUME_WAIT_S)
