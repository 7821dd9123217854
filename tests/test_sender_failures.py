"""End to end: how the senders handle HubSpot's failures (401, 429, 5xx, 400, expiry).

Every test runs the real daemon against a real PostgreSQL and the fake HubSpot on loopback,
and checks three records that must agree: what the fake received, what it completed, and
the `actions` rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import action_payload, wait_for
from throttled.drain.claimer import Claimer
from throttled.hubspot.fake import FakeHubSpot, Received
from throttled.queues import QueueState

PORTAL = 62515
EXPIRED_ERROR = "block expired at HubSpot before it could be sent"

# Fast retries; a hold long enough never to end within a test.
SENDER = {
    "backoff_base_s": 0.05,
    "backoff_max_s": 0.2,
    "max_attempts": 4,
    "hold_after_failures": 3,
    "hold_s": 3600,
}
FAST_QUEUE = {"maxThroughput": "100", "timeUnit": "seconds"}
# Retries here finish well within a second; this only bounds a hang (generous: a loaded
# machine, and bisection takes four rounds of retries).
RETRY_WAIT_S = 30.0


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """One autocommit connection to the test database, rows as dicts."""
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        yield conn


def rows(db: psycopg.Connection[dict[str, Any]], ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The actions rows of these callback ids, by callback id."""
    found = db.execute(
        "SELECT id, queue_id, callback_id, state, attempts, failures, last_error, not_before,"
        " extract(epoch FROM not_before)::float8 AS not_before_ts"
        " FROM actions WHERE callback_id = ANY(%s)",
        (list(ids),),
    ).fetchall()
    return {r["callback_id"]: r for r in found}


def states(db: psycopg.Connection[dict[str, Any]], ids: Iterable[str]) -> dict[str, str]:
    return {cid: r["state"] for cid, r in rows(db, ids).items()}


def requests_for(fake: FakeHubSpot, callback_id: str) -> list[Received]:
    """The callbacks requests that carried this callback id, in arrival order."""
    return [r for r in fake.received if callback_id in r.callback_ids]


def refresh_grants(fake: FakeHubSpot) -> int:
    return sum(1 for f in fake.token_requests if f.get("grant_type") == "refresh_token")


def payloads(n: int, input_fields: dict[str, str] = FAST_QUEUE) -> list[dict[str, Any]]:
    """n actions of one queue (same portal, workflow, action definition and index)."""
    return [action_payload(portal_id=PORTAL, input_fields=dict(input_fields)) for _ in range(n)]


async def post_all(daemon: Any, batch: list[dict[str, Any]]) -> None:
    """POST the actions concurrently; every one must be accepted with BLOCK."""
    results = await asyncio.gather(*(daemon.post_action(p) for p in batch))
    for status, body in results:
        assert status == 200, body
        assert body["outputFields"]["hs_execution_state"] == "BLOCK"


def ids_of(batch: list[dict[str, Any]]) -> list[str]:
    return [p["callbackId"] for p in batch]


async def post_in_one_request(
    daemon: Any, db: psycopg.Connection[dict[str, Any]], batch: list[dict[str, Any]], queue_of: str
) -> None:
    """POST actions of one queue (the queue of the stored action `queue_of`) so that they go
    out in one request: the queue is paused meanwhile (as an operator pauses it, so that no
    coroutine claims for it, whatever intake re-reads of its row), and once every one is
    committed, resumed: its first claim takes them all."""
    steering = daemon.runtime.services.steering
    queue = await steering.find_queue(str(rows(db, [queue_of])[queue_of]["queue_id"]))
    await steering.pause("test", queue, True)
    try:
        await post_all(daemon, batch)
    finally:
        await steering.pause("test", queue, False)


async def warm_up(daemon: Any, fake: FakeHubSpot, **kw: Any) -> str:
    """One action sent and completed: its queue exists (see post_in_one_request)."""
    action = action_payload(portal_id=PORTAL, input_fields=dict(FAST_QUEUE), **kw)
    await post_all(daemon, [action])
    await wait_for(lambda: action["callbackId"] in fake.completed)
    return str(action["callbackId"])


def watch_retries(daemon: Any, seen: Callable[[QueueState, float], None]) -> None:
    """Call `seen(queue, not_before)` for each retry the result writer has just written,
    before the daemon is told (so before anything can claim the row again)."""
    writer = daemon.runtime.dispatcher.writer
    told = writer.on_retry

    def on_retry(queue: QueueState, at: float) -> None:
        seen(queue, at)
        told(queue, at)

    writer.on_retry = on_retry


async def claimable(daemon: Any, queue_id: int) -> list[str]:
    """The callback ids a claim of this queue would get now (the claimer's run-once step, on
    a claimer of the test's own); any rows it got go straight back to pending."""
    claimer = Claimer(daemon.runtime.repo)
    asked = claimer.claim(daemon.runtime.scheduler.queues[queue_id], 1000)
    await claimer.claim_once()
    got = asked.result()
    if got:
        await daemon.runtime.repo.release([r.id for r in got])
    return [r.callback_id for r in got]


def held_by_daemon(daemon: Any, row_id: int) -> bool:
    """Whether the daemon still holds the row (in a sender, a request, an unwritten outcome)."""
    return row_id in daemon.runtime.dispatcher.held_ids()


# -- 401 ------------------------------------------------------------------------------------


async def test_401_refreshes_the_token_then_completes(daemon_factory, fake_hubspot, db):
    async with daemon_factory(sender=SENDER) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        [first] = payloads(1)
        await post_all(daemon, [first])
        await wait_for(lambda: first["callbackId"] in fake_hubspot.completed)
        assert refresh_grants(fake_hubspot) == 1
        assert fake_hubspot.received[-1].status == 204

        fake_hubspot.expire_tokens()
        later = payloads(3)
        later_ids = ids_of(later)
        await post_in_one_request(daemon, db, later, queue_of=first["callbackId"])
        await wait_for(
            lambda: all(cid in fake_hubspot.completed for cid in later_ids), RETRY_WAIT_S
        )
        await wait_for(lambda: set(states(db, later_ids).values()) == {"done"})

        # The first request after the expiry (all three, one batch) was refused: stale token...
        after = fake_hubspot.received[1:]
        assert after[0].status == 401
        assert sorted(after[0].callback_ids) == sorted(later_ids)
        # ...the daemon refreshed exactly once more, and everything went through after that.
        assert refresh_grants(fake_hubspot) == 2
        assert [r.status for r in after[1:]] == [204] * (len(after) - 1)
        for cid in later_ids:
            assert [r.status for r in requests_for(fake_hubspot, cid)][-1] == 204
            assert fake_hubspot.completed[cid][1] == {"hs_execution_state": "SUCCESS"}

    left = db.execute("SELECT count(*) AS n FROM actions WHERE state <> 'done'").fetchone()
    assert left == {"n": 0}


# -- 429 ------------------------------------------------------------------------------------


async def test_429_waits_retry_after_then_resends_without_counting(
    daemon_factory, fake_hubspot, db
):
    retry_after = 0.5
    written: list[dict[str, dict[str, Any]]] = []  # the rows as the 429's retry left them
    not_before: list[float] = []
    async with daemon_factory(sender=SENDER) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        warm = await warm_up(daemon, fake_hubspot)
        fake_hubspot.fail_next(429, retry_after=retry_after)
        batch = payloads(3)
        ids = ids_of(batch)

        def seen(queue: QueueState, at: float) -> None:
            # Read at once, synchronously: the loop (and so the daemon) waits meanwhile, so
            # this is the state between the 429 and the resend, whatever the machine's speed.
            not_before.append(at)
            if not written:
                written.append(rows(db, ids))

        watch_retries(daemon, seen)
        await post_in_one_request(daemon, db, batch, queue_of=warm)
        await wait_for(lambda: all(cid in fake_hubspot.completed for cid in ids), RETRY_WAIT_S)
        await wait_for(lambda: set(states(db, ids).values()) == {"done"})

    limited, *resent = fake_hubspot.received[1:]  # (after the warm-up's request)
    assert limited.status == 429
    assert sorted(limited.callback_ids) == sorted(ids)
    # Between the 429 and the resend the rows waited as pending, claimable only from
    # Retry-After past the 429, and the 429 cost them neither an attempt nor a failure.
    [between] = written
    assert sorted(between) == sorted(ids)
    assert len(not_before) == len(ids)
    for r in between.values():
        assert r["state"] == "pending", r
        assert (r["last_error"] or "").startswith("429"), r
        assert (r["attempts"], r["failures"]) == (0, 0), r
        assert r["not_before_ts"] >= limited.at + retry_after, r
    assert resent, "nothing was resent after the 429"
    assert all(r.status == 204 for r in resent)
    assert sorted(c for r in resent for c in r.callback_ids) == sorted(ids)
    # Retry-After was honoured: nothing went again before the rows' not_before (the fake
    # stamps arrivals by the wall clock the daemon and the database read too).
    assert min(r.at for r in resent) >= max(not_before)
    for cid, r in rows(db, ids).items():
        # One attempt: the successful one. The 429 cost no attempt and no failure.
        assert (r["state"], r["attempts"], r["failures"]) == ("done", 1, 0), cid
        assert r["last_error"] is None


# -- 5xx ------------------------------------------------------------------------------------


async def test_5xx_is_retried_with_backoff_then_completed(daemon_factory, fake_hubspot, db):
    # Backoffs long enough to tell apart from the retry path's own latency (tens of ms).
    sender = {**SENDER, "backoff_base_s": 0.2, "backoff_max_s": 1.0}
    not_before: list[float] = []
    async with daemon_factory(sender=sender) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        watch_retries(daemon, lambda queue, at: not_before.append(at))
        fake_hubspot.fail_next(503, count=2)
        [action] = payloads(1)
        cid = action["callbackId"]
        await post_all(daemon, [action])
        await wait_for(lambda: cid in fake_hubspot.completed, RETRY_WAIT_S)
        await wait_for(lambda: states(db, [cid]) == {cid: "done"})

    sent = requests_for(fake_hubspot, cid)
    assert [r.status for r in sent] == [503, 503, 204]
    assert len(fake_hubspot.received) == 3
    # Exponential backoff with full jitter: failure n waits in [cap_n / 2, cap_n],
    # cap_n = base * 2 ** (n - 1). Each retry is stored claimable no earlier than that
    # past its failure (the daemon judged the 503 after the fake stamped it), and the next
    # attempt did not go before it: order, by the one wall clock the daemon, the database
    # and the fake read, not a measured gap.
    assert len(not_before) == 2, not_before
    for failure, (failed, again, at) in enumerate(
        zip(sent[:-1], sent[1:], not_before, strict=True), start=1
    ):
        assert at - failed.at >= 0.2 * 2 ** (failure - 1) / 2, (failure, at - failed.at)
        assert again.at >= at, (failure, again.at - at)
    row = rows(db, [cid])[cid]
    assert (row["attempts"], row["failures"], row["last_error"]) == (3, 0, None)


async def test_rows_of_one_failed_request_are_all_resent(daemon_factory, fake_hubspot, db):
    # Each row of a failed request gets its own jittered backoff, so the rows fall due at
    # different instants; every one of them must still be claimed and resent. (Regression: a
    # row falling due between a short claim and the scheduler's NEXT_NOT_BEFORE query was
    # left pending for good, its queue idle.) Whether a row falls into that window is chance,
    # so: several rounds, each in a queue of its own (new intake re-arms only its own queue).
    async with daemon_factory(sender=SENDER) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        for round_no in range(6):
            workflow_id = 70_000 + round_no
            warm = await warm_up(daemon, fake_hubspot, workflow_id=workflow_id)
            fake_hubspot.fail_next(503)
            batch = [
                action_payload(
                    portal_id=PORTAL, workflow_id=workflow_id, input_fields=dict(FAST_QUEUE)
                )
                for _ in range(12)
            ]
            ids = ids_of(batch)
            seen = len(fake_hubspot.received)
            await post_in_one_request(daemon, db, batch, queue_of=warm)
            await wait_for(
                lambda ids=ids: all(cid in fake_hubspot.completed for cid in ids), RETRY_WAIT_S
            )
            first = fake_hubspot.received[seen]
            assert (first.status, sorted(first.callback_ids)) == (503, sorted(ids))
            for cid in ids:
                assert [r.status for r in requests_for(fake_hubspot, cid)] == [503, 204], cid
            await wait_for(lambda ids=ids: set(states(db, ids).values()) == {"done"})


async def test_repeated_5xx_holds_the_action(daemon_factory, fake_hubspot, db):
    async with daemon_factory(sender=SENDER) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fake_hubspot.fail_next(503, count=3)
        [action] = payloads(1)
        cid = action["callbackId"]
        await post_all(daemon, [action])
        await wait_for(lambda: rows(db, [cid])[cid]["failures"] >= 3, RETRY_WAIT_S)
        held = rows(db, [cid])[cid]
        assert held["state"] == "pending"
        assert (held["attempts"], held["failures"]) == (3, 3)
        assert held["last_error"].startswith("503"), held["last_error"]
        # Held for hold_s from the third failure (not a backoff of a fraction of a second):
        # the daemon judged the 503 a moment after the fake stamped it.
        third = requests_for(fake_hubspot, cid)[2]
        held_for = held["not_before_ts"] - third.at
        assert SENDER["hold_s"] <= held_for < SENDER["hold_s"] + 60, held_for

        # The queue still works (the faults are used up), but the held action stays put: the
        # probe's claim (all the queue's due rows, oldest first) left it, the daemon holds it
        # nowhere, and a claim of the queue now (its run-once step) does not get it.
        [probe] = payloads(1)
        await post_all(daemon, [probe])
        await wait_for(lambda: probe["callbackId"] in fake_hubspot.completed)
        assert not held_by_daemon(daemon, held["id"])
        assert await claimable(daemon, held["queue_id"]) == []

        assert [r.status for r in requests_for(fake_hubspot, cid)] == [503, 503, 503]
        assert cid not in fake_hubspot.completed
        assert rows(db, [cid])[cid]["state"] == "pending"
        assert rows(db, [cid])[cid]["failures"] == 3


async def test_max_attempts_fails_the_action(daemon_factory, fake_hubspot, db):
    sender = {**SENDER, "max_attempts": 3, "hold_after_failures": 100}
    async with daemon_factory(sender=sender) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        fake_hubspot.fail_next(500, count=10)
        [action] = payloads(1)
        cid = action["callbackId"]
        await post_all(daemon, [action])
        await wait_for(lambda: states(db, [cid]) == {cid: "failed"}, RETRY_WAIT_S)
        # Nothing left that could send it again: the daemon holds it nowhere (no sender, no
        # request under way, no outcome unwritten) and a failed row is never claimed. (The
        # daemon's graceful stop below settles every request, so the fake's log is complete.)
        row_id = rows(db, [cid])[cid]["id"]
        await wait_for(lambda: not held_by_daemon(daemon, row_id))
        assert await claimable(daemon, rows(db, [cid])[cid]["queue_id"]) == []

    assert [r.status for r in requests_for(fake_hubspot, cid)] == [500, 500, 500]
    assert len(fake_hubspot.received) == 3
    assert cid not in fake_hubspot.completed
    row = rows(db, [cid])[cid]
    assert row["state"] == "failed"
    assert row["attempts"] == 3
    assert "3 attempts" in row["last_error"], row["last_error"]
    assert "500" in row["last_error"], row["last_error"]
    assert "Injected failure (500)" in row["last_error"], row["last_error"]


# -- 400: bisection -------------------------------------------------------------------------


async def test_rejected_callback_is_isolated_by_bisection(daemon_factory, fake_hubspot, db):
    batch = payloads(8)
    ids = ids_of(batch)
    bad = ids[2]
    good = [cid for cid in ids if cid != bad]
    fake_hubspot.reject_callbacks({bad})
    async with daemon_factory(sender=SENDER) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        warm = await warm_up(daemon, fake_hubspot)
        await post_in_one_request(daemon, db, batch, queue_of=warm)
        await wait_for(
            lambda: (
                set(states(db, ids).values()) <= {"done", "failed"}
                and len(states(db, ids)) == len(ids)
            ),
            RETRY_WAIT_S,
        )

    final = rows(db, ids)
    assert final[bad]["state"] == "failed"
    assert f"Callback {bad} cannot be completed" in final[bad]["last_error"]
    assert final[bad]["last_error"].startswith("400")
    for cid in good:
        assert final[cid]["state"] == "done", (cid, final[cid])
        assert cid in fake_hubspot.completed
    assert bad not in fake_hubspot.completed

    received = fake_hubspot.received[1:]  # (after the warm-up's request)
    # One request with all eight first, refused because of the bad one...
    assert sorted(received[0].callback_ids) == sorted(ids)
    assert received[0].status == 400
    # ...then halves: the bad one's requests shrink 8 → 4 → 2 → 1, each refused.
    bad_sends = requests_for(fake_hubspot, bad)
    assert [len(r.callback_ids) for r in bad_sends] == [8, 4, 2, 1]
    assert all(r.status == 400 for r in bad_sends)
    # Every later request is smaller; each good callback is completed by exactly one 204.
    assert all(len(r.callback_ids) < 8 for r in received[1:])
    completions = [c for r in received if r.status == 204 for c in r.callback_ids]
    assert sorted(completions) == sorted(good)
    assert len(received) == 7


# -- expiry ---------------------------------------------------------------------------------


async def test_blocks_expire_before_a_slow_queue_sends_them(daemon_factory, fake_hubspot, db):
    slow = {"maxThroughput": "1", "timeUnit": "hours"}
    async with daemon_factory(
        sender=SENDER, hubspot={"block_expiration": "PT1S"}, retention={"interval_s": 1.0}
    ) as daemon:
        await daemon.connect_portal(fake_hubspot, PORTAL)
        batch = payloads(3, slow)
        ids = ids_of(batch)
        for p in batch:  # in order: the first takes the hour's only slot
            status, body = await daemon.post_action(p)
            assert status == 200
            assert body["outputFields"]["hs_expiration_duration"] == "PT1S"
        await wait_for(lambda: ids[0] in fake_hubspot.completed)
        await wait_for(
            lambda: states(db, ids) == {ids[0]: "done", ids[1]: "expired", ids[2]: "expired"},
            timeout=30,
        )

    final = rows(db, ids)
    for cid in ids[1:]:
        assert final[cid]["last_error"] == EXPIRED_ERROR
        assert requests_for(fake_hubspot, cid) == []
        assert cid not in fake_hubspot.completed
    assert [r.callback_ids for r in fake_hubspot.received] == [(ids[0],)]
