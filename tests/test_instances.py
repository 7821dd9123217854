"""Several `throttled serve` instances on one database (architecture.md, "Scaling out"),
against one fake HubSpot that answers 429 past its portal budget: two instances drain a
shared backlog with every queue's rate and every portal's budget holding on the fake's
receive log and no callback sent twice; a graceful stop hands its portals over at once; an
instance killed with SIGKILL mid-drain has its portals taken over within lease_s and a few
seconds, still without a burst."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import secrets
import signal
import time
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import (
    PORTAL_BUDGET,
    Daemon,
    action_payload,
    config_mapping,
    eventually,
    running,
    wait_for,
)
from tests.daemon_process import DaemonProcess, post_signed, query, write_config
from throttled import config as config_module
from throttled.config import Config
from throttled.db.cluster import CHANNEL
from throttled.db.repository import Repository
from throttled.hubspot.fake import FakeHubSpot, max_in_window

PORTALS = [7101, 7102, 7103, 7104]
RATE = 5  # per second, every queue
SENDER = {  # the daemons keep to the fake's budget (budgeted_hubspot)
    "portal_requests": PORTAL_BUDGET,
    "portal_interval_seconds": 1.0,
    "backoff_base_s": 0.2,
    "backoff_max_s": 1.0,
    # The fake timestamps a request when its handler runs, a little after the daemon sent it.
    "send_margin_ms": 50.0,
}
FIELDS = {"maxThroughput": str(RATE), "timeUnit": "seconds"}


def sections(lease_s: float) -> dict[str, dict[str, Any]]:
    """What every instance's config shares: the encryption key (the tokens are in the
    database), the sender's budget, the lease."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    return {
        "security": {"encryption_key": key},
        "sender": SENDER,
        "cluster": {"lease_s": lease_s},
    }


def instance_config(db_url: str, fake: FakeHubSpot, shared: dict[str, Any], name: str) -> Config:
    assert fake.base_url is not None
    raw = config_mapping(db_url, fake.base_url, **shared)
    raw["cluster"] = {**raw["cluster"], "instance_name": name}
    cfg = config_module.from_mapping(raw, source="(test)")
    config_module.validate(cfg)
    return cfg


@contextlib.asynccontextmanager
async def observer(url: str) -> AsyncIterator[Repository]:
    async with Repository.open(url, min_size=1, max_size=2) as repo:
        yield repo


async def connect(daemon: Daemon, fake: FakeHubSpot, portals: Iterable[int]) -> None:
    for portal_id in portals:
        await daemon.connect_portal(fake, portal_id)


def backlog(
    queues_per_portal: int,
    per_queue: int,
    *,
    portals: Iterable[int] = PORTALS,
    workflow: int = 900,
    fields: Mapping[str, str] = FIELDS,
) -> list[dict[str, Any]]:
    """Actions for each of `portals`, `queues_per_portal` queues (workflows `workflow`,
    `workflow` + 1, ...) of `per_queue` each, rated by `fields`."""
    return [
        action_payload(portal_id=p, workflow_id=workflow + q, input_fields=dict(fields))
        for p in portals
        for q in range(queues_per_portal)
        for _ in range(per_queue)
    ]


def queue_of(payload: dict[str, Any]) -> tuple[int, int]:
    return payload["origin"]["portalId"], payload["context"]["workflowId"]


def ids_of(payloads: list[dict[str, Any]]) -> list[str]:
    return [p["callbackId"] for p in payloads]


def done(fake: FakeHubSpot, payloads: list[dict[str, Any]]) -> int:
    """How many of these actions the fake has completed."""
    return sum(p["callbackId"] in fake.completed for p in payloads)


async def drained(fake: FakeHubSpot, payloads: list[dict[str, Any]], timeout: float = 60) -> None:
    """Wait until the fake has completed every one of these actions."""
    await wait_for(lambda: done(fake, payloads) == len(payloads), timeout=timeout)


def send_times(fake: FakeHubSpot) -> dict[str, list[float]]:
    """When each callback was sent: the arrival of every request that carried it."""
    sends: dict[str, list[float]] = {}
    for r in fake.received:
        for i in r.callback_ids:
            sends.setdefault(i, []).append(r.at)
    return sends


def check_sent_once(fake: FakeHubSpot, payloads: list[dict[str, Any]], *context: Any) -> None:
    """Each of these actions' callbacks was sent exactly once; a failure's message shows the
    requests that carried the others, and `context`."""
    sends = send_times(fake)
    wrong = [i for i in ids_of(payloads) if len(sends.get(i, [])) != 1]
    assert wrong == [], (wrong, log(fake, carrying=wrong), *context)


def check_the_wire(fake: FakeHubSpot, payloads: list[dict[str, Any]], *, once: bool) -> None:
    """Every queue's rate and every portal's budget held on the fake's receive log (no 429),
    everything was completed, and (if `once`) no callback was sent twice."""
    assert done(fake, payloads) == len(payloads)
    assert [r for r in fake.received if r.status == 429] == []
    if once:
        check_sent_once(fake, payloads)
    by_queue: dict[tuple[int, int], list[str]] = {}
    for p in payloads:
        by_queue.setdefault(queue_of(p), []).append(p["callbackId"])
    for queue, queue_ids in by_queue.items():
        assert max_in_window(fake.sends_for(queue_ids), 1.0) <= RATE, (queue, log(fake))
    for portal_id in PORTALS:
        requests = [r.at for r in fake.received if r.portal_id == portal_id]
        assert max_in_window(requests, 1.0) <= PORTAL_BUDGET, (portal_id, log(fake))


def log(fake: FakeHubSpot, carrying: Collection[str] | None = None) -> str:
    """The receive log (only the requests carrying one of these callbacks, if given), for a
    failure's message."""
    start = fake.received[0].at if fake.received else 0.0
    wanted = None if carrying is None else set(carrying)
    return "\n".join(
        f"{r.at - start:8.3f} portal={r.portal_id} status={r.status} n={len(r.callback_ids)}"
        for r in fake.received
        if wanted is None or not wanted.isdisjoint(r.callback_ids)
    )


async def post_all(daemons: list[Daemon], payloads: list[dict[str, Any]]) -> None:
    """Post each action to one of the instances in turn (any instance takes any portal's)."""
    for n, payload in enumerate(payloads):
        status, body = await daemons[n % len(daemons)].post_action(payload)
        assert status == 200, body


async def db_states(db_url: str, ids: list[str]) -> dict[str, int]:
    """How many of these actions the database has in each state."""
    rows = await query(
        db_url, "SELECT state, count(*) FROM actions WHERE callback_id = ANY(%s) GROUP BY 1", ids
    )
    return dict(rows)


async def settled_states(db_url: str, ids: list[str], timeout: float = 20) -> dict[str, int]:
    """db_states once every one of these actions is stored done, or at the timeout (for the
    failure's message): the result writer stores a batch a moment after HubSpot answered it,
    so a test that saw the fake complete everything must not read the states at once."""
    states: dict[str, int] = {}

    async def all_done() -> bool:
        nonlocal states
        states = await db_states(db_url, ids)
        return states == {"done": len(ids)}

    with contextlib.suppress(AssertionError):
        await eventually(all_done, timeout)
    return states


@contextlib.asynccontextmanager
async def draining(
    db_url: str,
    fake: FakeHubSpot,
    payloads: list[dict[str, Any]],
    *names: str,
    shared: dict[str, Any] | None = None,
    post_to: Collection[str] = (),
    until: int = 0,
) -> AsyncIterator[list[Daemon]]:
    """Instances `names` on one database (config `shared`, by default sections(lease_s=3.0)),
    started in this order and stopped in the reverse; `payloads` posted to the instances
    `post_to` in turn (by default the first), their portals connected at the first of those;
    yielded once `until` of them are completed."""
    shared = sections(lease_s=3.0) if shared is None else shared
    async with contextlib.AsyncExitStack() as stack:
        daemons = [
            await stack.enter_async_context(running(instance_config(db_url, fake, shared, name)))
            for name in names
        ]
        targets = [d for name, d in zip(names, daemons, strict=True) if name in post_to]
        targets = targets or daemons[:1]
        await connect(targets[0], fake, dict.fromkeys(queue_of(p)[0] for p in payloads))
        await post_all(targets, payloads)
        await wait_for(lambda: done(fake, payloads) >= until, timeout=30)
        yield daemons


async def test_two_instances_drain_a_shared_backlog_within_every_limit(db_url, budgeted_hubspot):
    payloads = backlog(queues_per_portal=3, per_queue=8)  # 96 actions, 24 per portal
    both = ("first", "second")
    async with draining(db_url, budgeted_hubspot, payloads, *both, post_to=both) as (a, b):
        await drained(budgeted_hubspot, payloads)
        owned_a, owned_b = a.runtime.cluster.owned, b.runtime.cluster.owned
    check_the_wire(budgeted_hubspot, payloads, once=True)
    # Both took a share (2 portals each), and no portal had two owners.
    assert (len(owned_a), len(owned_b)) == (2, 2), (owned_a, owned_b)
    assert owned_a | owned_b == set(PORTALS)


async def test_a_portal_s_queues_run_only_once_its_take_over_is_over(db_url, budgeted_hubspot):
    """Until a new owner has replayed a portal's rate log and seeded its budget with the
    previous owner's requests, nothing runs for it: work arriving meanwhile waits, then goes
    (sent earlier, it would count twice in the budget, or be sent past the queue's rate)."""
    portal = PORTALS[0]
    shared = sections(lease_s=30.0)
    shared["sender"] = {**SENDER, "portal_requests": 50, "portal_interval_seconds": 600}
    async with running(instance_config(db_url, budgeted_hubspot, shared, "one")) as one:
        await connect(one, budgeted_hubspot, [portal])
        repo = one.runtime.repo
        reading, gate = asyncio.Event(), asyncio.Event()
        read_requests = repo.recent_requests

        async def held(*args: Any) -> list[tuple[int, float]]:
            reading.set()
            await gate.wait()
            return await read_requests(*args)

        repo.recent_requests = held  # type: ignore[method-assign]
        (first,) = backlog(1, 1, portals=[portal], workflow=901)
        status, _ = await one.post_action(first)
        assert status == 200
        await asyncio.wait_for(reading.wait(), 20)  # the take-over is under way
        more = backlog(2, 1, portals=[portal], workflow=901)
        for payload in more:
            status, _ = await one.post_action(payload)  # (stored and notified)
            assert status == 200
        assert one.runtime.cluster.owns(portal)
        assert one.runtime.scheduler.running == frozenset()
        assert budgeted_hubspot.received == []
        gate.set()
        await drained(budgeted_hubspot, [first, *more], timeout=20)
        sender = one.runtime.dispatcher.sender(portal)
        assert sender is not None
        assert sender.budget_used == len(budgeted_hubspot.received)  # (none counted twice)
    check_the_wire(budgeted_hubspot, [first, *more], once=True)


async def test_a_stopping_instance_hands_its_portals_over_at_once(db_url, budgeted_hubspot):
    lease_s = 30.0  # a takeover that waited for the lease would come far too late
    shared = sections(lease_s=lease_s)
    portals = PORTALS[:2]
    payloads = backlog(queues_per_portal=2, per_queue=30, portals=portals)
    ids = ids_of(payloads)
    async with draining(db_url, budgeted_hubspot, payloads, "leaving", shared=shared) as (a,):
        # Alone, it takes every portal as their work arrives (not at its next heartbeat).
        await wait_for(lambda: a.runtime.cluster.owned == set(portals), timeout=lease_s / 6)
        async with running(instance_config(db_url, budgeted_hubspot, shared, "staying")) as b:
            # A second one joins: it is handed its share at once.
            await wait_for(lambda: len(b.runtime.cluster.owned) == 1, timeout=lease_s / 6)
            # Mid-drain (6 s of work at 5 per second per queue), the first one stops.
            await wait_for(lambda: len(send_times(budgeted_hubspot)) >= 20)
            assert not any(i in budgeted_hubspot.completed for i in ids[-5:])  # (work left on both)
            assert not any(i in budgeted_hubspot.completed for i in ids[25:30])
            await a.stop()
            await wait_for(lambda: b.runtime.cluster.owned == set(portals), timeout=lease_s / 6)
            await drained(budgeted_hubspot, payloads)
    # The new owner replayed the rate log and counted the old one's requests in its budget.
    check_the_wire(budgeted_hubspot, payloads, once=True)


async def test_intake_at_another_instance_wakes_the_owner_with_a_notification_per_batch(
    db_url, budgeted_hubspot
):
    shared = sections(lease_s=30.0)
    portal = PORTALS[0]
    start = datetime.fromtimestamp(time.time() + 3600, UTC).isoformat()
    later = {**FIELDS, "startAt": start}  # (the rows stay pending)
    first = backlog(1, 1, portals=[portal], workflow=76, fields=later)
    async with (
        draining(db_url, budgeted_hubspot, first, "one", "two", shared=shared) as (one, two),
        observer(db_url) as listener,
    ):
        # One of them takes it (the other's heartbeat may find it first).
        await wait_for(lambda: portal in one.runtime.cluster.owned | two.runtime.cluster.owned)
        a, b = (one, two) if portal in one.runtime.cluster.owned else (two, one)
        await wait_for(lambda: len(a.runtime.scheduler.running) == 1)
        (first_queue,) = a.runtime.scheduler.running

        notes: list[dict[str, Any]] = []

        def heard(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            notes.append(json.loads(payload))

        def queues_in(note: dict[str, Any]) -> list[int]:
            return note.get("work", {}).get(str(portal), [])

        conn = await listener.pool.acquire()
        await conn.add_listener(CHANNEL, heard)
        batches = b.runtime.ingest.batches
        payloads = backlog(1, 60, portals=[portal], workflow=77, fields=later)
        answers = await asyncio.gather(*(b.post_action(p) for p in payloads))
        assert [status for status, _ in answers] == [200] * len(payloads)
        # The owner was told, and runs the new queue; the other one runs none.
        await wait_for(lambda: len(a.runtime.scheduler.running) == 2)
        (queue_id,) = a.runtime.scheduler.running - {first_queue}
        assert not b.runtime.scheduler.running
        flushed = b.runtime.ingest.batches - batches
        # One more action at the other one, for a third queue: its notification comes after
        # every one sent for the 60 (it routes one batch after another, and notifications
        # arrive in commit order), so that none of those is still on its way once it is here.
        await post_all([b], backlog(1, 1, portals=[portal], workflow=78, fields=later))
        await wait_for(lambda: any(set(queues_in(n)) - {first_queue, queue_id} for n in notes))
        # (a notification for the first action may come too: routed after the owner took it)
        work = [n for n in notes if queue_id in queues_in(n)]
        assert 1 <= len(work) <= flushed, (notes, flushed)
        assert all(n["instance"] == b.runtime.cluster.id for n in work)
        await conn.remove_listener(CHANNEL, heard)
        await listener.pool.release(conn)
    assert done(budgeted_hubspot, payloads) == 0


@contextlib.asynccontextmanager
async def processes(
    tmp_path: Path, db_url: str, fake: FakeHubSpot, shared: dict[str, Any], names: list[str]
) -> AsyncIterator[list[DaemonProcess]]:
    """`throttled serve` children on one database and key, not started; killed on exit."""
    assert fake.base_url is not None
    made = []
    for name in names:
        (tmp_path / name).mkdir()
        config_path, url = write_config(
            tmp_path / name / "throttled.toml",
            db_url=db_url,
            api_base_url=fake.base_url,
            **{**shared, "cluster": {**shared["cluster"], "instance_name": name}},
            admin={"tokens": [{"id": "ops", "token": ADMIN_TOKEN}]},
        )
        made.append(DaemonProcess(config_path, url, tmp_path / name / "serve.log"))
    try:
        yield made
    finally:
        for proc in made:
            await proc.kill()


ADMIN_TOKEN = "instances-admin-token-0123456789abcdef"


async def owners(db_url: str) -> dict[int, str]:
    """Valid leases by the database's clock: portal -> instance name."""
    rows = await query(
        db_url,
        "SELECT l.portal_id, i.name FROM portal_leases l JOIN instances i"
        " ON i.id = l.instance_id WHERE l.expires_at > now()",
    )
    return {portal: name for portal, name in rows}


async def test_a_killed_instance_s_portals_are_taken_over_within_the_lease(
    tmp_path, db_url, budgeted_hubspot
):
    lease_s = 3.0
    shared = sections(lease_s=lease_s)
    names = ["doomed", "survivor"]
    async with processes(tmp_path, db_url, budgeted_hubspot, shared, names) as (a, b):
        for portal_id in PORTALS:
            token = f"refresh-{portal_id}-{secrets.token_hex(4)}"
            budgeted_hubspot.register_portal(portal_id, token)
            await a.connect_portal(portal_id, token)
        await a.start()
        await b.start()
        payloads = backlog(queues_per_portal=2, per_queue=25)  # 5 s of work per queue
        ids = ids_of(payloads)
        async with aiohttp.ClientSession() as session:
            for n, payload in enumerate(payloads):
                answer = await post_signed(session, (a, b)[n % 2].url, payload)
                assert answer.status == 200, answer

        async def both_own() -> bool:
            return set((await owners(db_url)).values()) == {"doomed", "survivor"}

        await eventually(both_own, timeout=30)
        await wait_for(lambda: len(send_times(budgeted_hubspot)) >= 20)
        doomed = {p for p, name in (await owners(db_url)).items() if name == "doomed"}
        assert doomed
        assert done(budgeted_hubspot, payloads) < len(payloads)
        a.send_signal(signal.SIGKILL)
        killed_at = time.time()
        assert await a.wait(30) == -signal.SIGKILL

        async def taken_over() -> bool:
            found = await owners(db_url)
            return all(found.get(p) == "survivor" for p in doomed)

        await eventually(taken_over, timeout=lease_s + 30)
        took_s = time.time() - killed_at
        print(f"takeover: {took_s:.2f} s after the kill")
        assert took_s <= lease_s + 3.0, (took_s, log(budgeted_hubspot))
        taken_at = time.time()
        # ... and the survivor sends for them.
        await wait_for(
            lambda: any(
                r.portal_id in doomed and r.at > taken_at for r in budgeted_hubspot.received
            )
        )
        await drained(budgeted_hubspot, payloads, timeout=90)
        b.send_signal(signal.SIGTERM)
        assert await b.wait(60) == 0, b.log_tail()

    # A request under way at the kill may have reached HubSpot unrecorded: its callbacks are
    # sent again, by the survivor, after the kill; nothing else is sent twice.
    twice = {i: at for i, at in send_times(budgeted_hubspot).items() if len(at) > 1}
    for callback_id, at in twice.items():
        assert len(at) == 2, (callback_id, at)
        assert at[0] <= killed_at < at[1], (callback_id, at)
    check_the_wire(budgeted_hubspot, payloads, once=False)
    assert await db_states(db_url, ids) == {"done": len(ids)}


async def test_a_request_is_over_before_its_portal_s_lease_can_expire(db_url, budgeted_hubspot):
    """HubSpot answers after 8 s and the client would wait 30; the lease is 3 s (renewed
    every second, so a request starts with at most 2.5 s of it left): the request is
    abandoned before the lease could expire, so that a next owner (after a partition, say)
    never sends the rows while it is under way. The row is retried like any timeout."""
    cfg = instance_config(db_url, budgeted_hubspot, sections(lease_s=3.0), "slow")
    hubspot = dataclasses.replace(cfg.hubspot, request_timeout_s=30.0)
    cfg = dataclasses.replace(cfg, hubspot=hubspot)
    budgeted_hubspot.delay_s = 8.0
    async with running(cfg) as daemon:
        await connect(daemon, budgeted_hubspot, PORTALS[:1])
        (payload,) = backlog(queues_per_portal=1, per_queue=1, portals=PORTALS[:1])
        await post_all([daemon], [payload])
        await wait_for(lambda: len(budgeted_hubspot.received) >= 1)
        # (when the fake answers the first)
        answered_at = budgeted_hubspot.received[0].at + budgeted_hubspot.delay_s

        async def attempts() -> list[tuple[Any, ...]]:
            return await query(
                db_url,
                "SELECT attempts, last_error FROM actions WHERE callback_id = %s",
                payload["callbackId"],
            )

        async def retried() -> bool:
            rows = await attempts()
            return bool(rows) and rows[0][0] >= 1

        await eventually(retried, timeout=30)
        assert time.time() < answered_at  # abandoned before HubSpot answered
        ((tries, error),) = await attempts()
        assert tries >= 1
        assert "Timeout" in (error or ""), error
        budgeted_hubspot.delay_s = 0.0
        await wait_for(lambda: payload["callbackId"] in budgeted_hubspot.completed)


async def test_a_hand_back_waits_for_requests_under_way_without_stopping_the_heartbeat(
    db_url, budgeted_hubspot
):
    """HubSpot takes 1.2 s to answer; the lease is 3 s (a heartbeat a second, a lease
    lapsing here a second early). When a second instance joins, the first hands one portal
    back only once its request under way is answered and written, and meanwhile goes on
    renewing the portal it keeps: that one never lapses."""
    shared = sections(lease_s=3.0)
    payloads = backlog(queues_per_portal=1, per_queue=40, portals=PORTALS[:2])
    budgeted_hubspot.delay_s = 1.2
    async with draining(db_url, budgeted_hubspot, payloads, "first", shared=shared) as (a,):
        await wait_for(lambda: a.runtime.cluster.owned == set(PORTALS[:2]))
        await wait_for(lambda: len(budgeted_hubspot.received) >= 2)
        lapsed: list[int] = []
        async with running(instance_config(db_url, budgeted_hubspot, shared, "second")) as b:
            while not b.runtime.cluster.owned:
                owned = a.runtime.cluster.owned
                if len(owned) < 1:
                    lapsed.append(len(owned))
                await asyncio.sleep(0.01)
            (handed,) = b.runtime.cluster.owned
            (kept,) = set(PORTALS[:2]) - {handed}
            # Two seconds more (two heartbeats): a watch for a lapse that must not happen,
            # which no event ends (this sleep only paces the samples).
            for _ in range(200):
                if not a.runtime.cluster.owns(kept):
                    lapsed.append(kept)
                await asyncio.sleep(0.01)
            assert lapsed == []
            assert a.runtime.cluster.owned == {kept}
            budgeted_hubspot.delay_s = 0.0
            await drained(budgeted_hubspot, payloads)
    check_the_wire(budgeted_hubspot, payloads, once=True)
