"""Hostile tests for several `throttled serve` instances on one database (portal leases, see
throttled/cluster.py and drain/handover.py): forged NOTIFY payloads on the cluster's channel,
a database outage at an instance that owns portals and sends, operator actions sent to an
instance that does not own the queue's portal, churn, odd cluster states for the operator's
views, and cluster config values at the edges. Every test is bounded in time and talks to
loopback only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.conftest import Daemon, running, wait_for
from tests.pg_proxy import pg_proxy
from tests.test_instances import (
    PORTALS,
    backlog,
    check_sent_once,
    check_the_wire,
    connect,
    db_states,
    done,
    drained,
    draining,
    ids_of,
    instance_config,
    observer,
    post_all,
    sections,
    send_times,
    settled_states,
)
from throttled import config as config_module
from throttled.cluster import Cluster
from throttled.config import ConfigError
from throttled.db.cluster import CHANNEL
from throttled.hubspot.fake import max_in_window

TOKEN = "hostile-admin-token-0123456789abcdef"
ADMIN = {"tokens": [{"id": "ops", "token": TOKEN}]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.timeout(150)


def admin_sections(lease_s: float, **cluster: Any) -> dict[str, Any]:
    """sections() with an admin token (and more cluster keys)."""
    shared = sections(lease_s=lease_s)
    shared["admin"] = dict(ADMIN)
    shared["cluster"] = {**shared["cluster"], **cluster}
    return shared


async def call(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with daemon.session.request(method, daemon.url + path, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def notify(db_url: str, *payloads: str) -> None:
    """Send these payloads on the cluster's channel, one after another."""
    async with observer(db_url) as repo:
        for payload in payloads:
            await repo.pool.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)


@pytest.fixture
def heard(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[object]]:
    """The payloads each instance's cluster listener has handled (whether it raised or not),
    by instance name: how a test knows that a notification it sent was taken up."""
    handled: dict[str, list[object]] = {}
    receive = Cluster._received

    def recording(self: Cluster, conn: Any, pid: int, channel: str, payload: object) -> None:
        try:
            receive(self, conn, pid, channel, payload)
        finally:
            handled.setdefault(self.name, []).append(payload)

    monkeypatch.setattr(Cluster, "_received", recording)
    return handled


def pick(a: Daemon, b: Daemon, portal: int) -> tuple[Daemon, Daemon]:
    """(the owner of the portal, the other one)"""
    return (a, b) if a.runtime.cluster.owns(portal) else (b, a)


@contextlib.asynccontextmanager
async def watching(look: Callable[[], None], every: float) -> AsyncIterator[None]:
    """Call `look` (it notes what it sees) every `every` seconds while the block runs."""

    async def watch() -> None:
        while True:
            look()
            await asyncio.sleep(every)

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# -- forged notifications ---------------------------------------------------------------------


GARBAGE = [
    "",
    "not json",
    "null",
    "[]",
    "42",
    '"work"',
    "{}",
    '{"event": "work"}',
    '{"event": "work", "work": null}',
    '{"event": "work", "work": []}',
    '{"event": "work", "work": {"x": [1]}}',
    '{"event": "work", "work": {"-1": [1]}}',
    '{"event": "work", "work": {"99999999999999999999": [1]}}',
    '{"event": "work", "work": {"7101": "1"}}',
    '{"event": "work", "work": {"7101": [1.5, "2", null, true, {}]}}',
    '{"event": "work", "work": {"7101": [1e999]}}',
    '{"event": "work", "portals": "7101"}',
    '{"event": "work", "portals": [1e999, -5, "7101"]}',
    '{"event": "work", "all": "yes"}',
    '{"event": "work", "all": true}',
    '{"event": "work", "wake": true}',
    '{"event": "stopped", "instance": "nobody"}',
    '{"event": "released", "instance": 5}',
    '{"instance": {"a": 1}, "event": ["work"]}',
    "[" * 3000 + "]" * 3000,
    '{"a":' * 1100 + "1" + "}" * 1100,
    json.dumps({"event": "work", "work": {str(p): list(range(500)) for p in range(10)}})[:6900],
]


async def test_garbage_notifications_never_crash_an_instance(db_url, budgeted_hubspot, heard):
    """Every payload above, sent on the cluster's channel while an instance owns a portal and
    drains it: the instance keeps running, keeps its portal and drains what comes after."""
    portal = PORTALS[0]
    first = backlog(1, 1, portals=[portal], workflow=901)
    async with draining(db_url, budgeted_hubspot, first, "target", until=1) as (a,):
        await notify(db_url, *GARBAGE)
        await wait_for(lambda: set(GARBAGE) <= set(heard.get("target", [])))
        assert not a.task.done(), a.task
        assert a.runtime.cluster.owns(portal)
        later = backlog(1, 5, portals=[portal], workflow=902)
        await post_all([a], later)
        await drained(budgeted_hubspot, later, timeout=30)
        assert not a.task.done()


async def test_a_forged_work_notification_with_an_out_of_range_queue_id_does_not_poison_the_loader(
    db_url, budgeted_hubspot, heard
):
    """A fixed defect (the listener now drops queue ids beyond bigint): a forged work
    notification naming a portal the instance owns and a queue id beyond bigint
    (`{"event":"work","work":{"7101":[99999999999999999999]}}`) went to Supervisor.notify,
    into `_unknown`; the loader's get_queues() then failed with a DataError (a DatabaseError)
    on every try, and load_once put the id back each time. From then on no queue this
    instance had not loaded yet ever ran there: work stored at another instance for a new
    queue of the owned portal stayed pending forever."""
    portal = PORTALS[0]
    first = backlog(1, 1, portals=[portal], workflow=911)
    async with draining(db_url, budgeted_hubspot, first, "owner", "other", until=1) as (a, b):
        owner, other = pick(a, b, portal)
        assert owner.runtime.cluster.owns(portal)
        forged = json.dumps({"event": "work", "work": {str(portal): [10**20]}})
        await notify(db_url, forged)
        await wait_for(lambda: forged in heard.get(owner.runtime.cluster.name, []))
        # New work for a queue the owner has never seen, stored at the other instance.
        later = backlog(1, 3, portals=[portal], workflow=912)
        await post_all([other], later)
        try:
            await drained(budgeted_hubspot, later, timeout=15)
        except AssertionError:
            raise AssertionError(
                f"work for a new queue never ran after the forged notification; "
                f"owner's unknown queues: {sorted(owner.runtime.scheduler._unknown)}; "
                f"db: {await db_states(db_url, ids_of(later))}"
            ) from None


async def test_a_notification_storm_does_not_make_leases_flap(db_url, budgeted_hubspot):
    """Hundreds of `wake` notifications (each makes the others run a heartbeat at once): two
    instances still hold two portals each, never one portal both, and nothing is sent twice."""
    payloads = backlog(1, 10, workflow=920)
    names = ("s1", "s2")
    async with draining(db_url, budgeted_hubspot, payloads, *names, post_to=names) as (a, b):
        overlaps: list[set[int]] = []

        def look() -> None:
            both = a.runtime.cluster.owned & b.runtime.cluster.owned
            if both:
                overlaps.append(both)

        async with watching(look, every=0.003):
            ghosts = (
                json.dumps({"event": "released", "instance": f"ghost-{n}"}) for n in range(300)
            )
            await notify(db_url, *ghosts)
            await drained(budgeted_hubspot, payloads)
        assert not a.task.done()
        assert not b.task.done()
        assert overlaps == []
    check_the_wire(budgeted_hubspot, payloads, once=True)


# -- a database outage at an instance that owns portals and sends ---------------------------


GRACE_S = 0.1  # a request started just before its sender stopped reaches the fake this late


async def test_an_outage_at_the_owner_sends_nothing_twice_that_it_started_after_it(
    db_url, budgeted_hubspot
):
    """Instance `cut` reaches PostgreSQL through a proxy, `direct` does not. Both drain a
    backlog; the proxy is cut. `cut` stops starting requests at once (its listening
    connection closed: it cannot record an answer any more), its leases lapse here before
    they expire in the database, `direct` takes its portals over, and once the proxy is
    restored everything is completed with every limit held. A callback sent twice was one
    that `cut` had sent before it stopped (in flight at the cut, its answer never recorded:
    delivery is at least once), never one sent after."""
    lease_s = 3.0
    shared = sections(lease_s=lease_s)
    payloads = backlog(2, 25, workflow=930)
    ids = ids_of(payloads)
    async with pg_proxy(db_url) as proxy:
        cfg_cut = instance_config(proxy.url_for(db_url), budgeted_hubspot, shared, "cut")
        async with (
            running(cfg_cut) as a,
            running(instance_config(db_url, budgeted_hubspot, shared, "direct")) as b,
        ):
            await connect(b, budgeted_hubspot, PORTALS)
            await post_all([a, b], payloads)
            await wait_for(lambda: a.runtime.cluster.owned and b.runtime.cluster.owned, 30)
            await wait_for(lambda: len(send_times(budgeted_hubspot)) >= 20)
            doomed = set(a.runtime.cluster.owned)
            stopped_at: dict[int, float] = {}
            lapsed_at: dict[int, float] = {}
            taken_at: dict[int, float] = {}

            def look() -> None:
                now = time.time()
                for p in doomed:
                    if p not in stopped_at and a.runtime.cluster.lease_left(p) == 0.0:
                        stopped_at[p] = now
                    if p not in lapsed_at and not a.runtime.cluster.owns(p):
                        lapsed_at[p] = now
                    if p not in taken_at and b.runtime.cluster.owns(p):
                        taken_at[p] = now

            async with watching(look, every=0.005):
                cut_at = time.time()
                proxy.cut()
                try:
                    await wait_for(lambda: all(p in taken_at for p in doomed), lease_s + 15)
                    # The outage goes on for a while after the take-over (the scenario: the
                    # new owner sends while the old one still cannot record anything).
                    await asyncio.sleep(2.0)
                finally:
                    proxy.restore()
                await drained(budgeted_hubspot, payloads, timeout=90)
            assert all(stopped_at[p] <= lapsed_at[p] < taken_at[p] for p in doomed), (
                stopped_at,
                lapsed_at,
                taken_at,
            )
            # (it stopped at the cut, well before its leases lapsed here)
            assert all(stopped_at[p] - cut_at < lease_s / 3 for p in doomed), (cut_at, stopped_at)
            # (resumed once the database was back: its next heartbeat renewed what it holds)
            await wait_for(lambda: not a.runtime.cluster.suspended, timeout=60)
            states = await settled_states(db_url, ids)
    portal_of = {p["callbackId"]: p["origin"]["portalId"] for p in payloads}
    twice = {i: at for i, at in send_times(budgeted_hubspot).items() if len(at) > 1}
    late = {
        i: [round(t - cut_at, 3) for t in at]
        for i, at in twice.items()
        if portal_of[i] not in doomed or at[0] > stopped_at[portal_of[i]] + GRACE_S
    }
    assert late == {}, (
        f"{len(late)} callbacks sent twice, first sent after their sender stopped (instants "
        f"relative to the cut): {dict(list(late.items())[:10])}; stopped {stopped_at} "
        f"lapsed {lapsed_at} taken {taken_at}"
    )
    check_the_wire(budgeted_hubspot, payloads, once=False)
    assert states.get("done", 0) == len(ids), states


# -- operator actions at an instance that does not own the queue's portal ---------------------


@pytest.mark.parametrize("at", ["owner", "other"])
async def test_fail_pending_at_a_non_owner_takes_the_rows_the_owner_holds(
    db_url, budgeted_hubspot, at
):
    """On one instance, fail-pending takes back the rows its sender holds (claimed ahead) and
    completes them FAIL_CONTINUE at once (test_queue_operations). Sent to the instance that
    does not own the portal, it does the same: the owner, told by the change notification,
    takes back the rows its sender holds into the release (they do not go out SUCCESS at the
    queue's rate)."""
    shared = admin_sections(3.0)
    shared["sender"] = {**shared["sender"], "claim_ahead_s": 30.0, "lookahead_s": 5.0}
    portal = PORTALS[0]
    fields = {"maxThroughput": "1", "timeUnit": "seconds"}
    payloads = backlog(1, 20, portals=[portal], workflow=940, fields=fields)
    async with draining(
        db_url, budgeted_hubspot, payloads, "ops-1", "ops-2", shared=shared, until=1
    ) as (a, b):
        owner, other = pick(a, b, portal)
        assert owner.runtime.cluster.owns(portal)
        assert not other.runtime.cluster.owns(portal)
        if at == "owner":
            other = owner
        status, page = await call(other, "GET", f"/api/queues?portal_id={portal}")
        assert status == 200, page
        (queue,) = page["queues"]
        status, answer = await call(
            other, "POST", f"/api/queues/{queue['id']}/fail-pending", {"confirm": True}
        )
        assert status == 200, answer
        await drained(budgeted_hubspot, payloads, timeout=40)
        completed = budgeted_hubspot.completed
        states = [completed[cid][1]["hs_execution_state"] for cid in ids_of(payloads)]
        assert states.count("FAIL_CONTINUE") >= 17, (states.count("FAIL_CONTINUE"), answer)


def stopped_sending(daemon: Daemon, queue_id: int) -> bool:
    """Whether an instance has taken up a pause of this queue: paused there, its coroutine
    over, and nothing held or under way at its portal's sender (its portal's only queue)."""
    scheduler = daemon.runtime.scheduler
    queue = scheduler.queues.get(queue_id)
    if queue is None or not queue.paused or queue_id in scheduler.running:
        return False
    sender = daemon.runtime.dispatcher.sender(queue.portal_id)
    return sender is None or next(sender.held_ids(), None) is None


async def test_pause_and_override_at_a_non_owner_take_effect_at_the_owner(db_url, budgeted_hubspot):
    """Pause sent to the instance that does not own the portal: the owner stops sending
    within a moment; resume there: it drains again; a rate override there: the owner
    rates the queue at once."""
    portal = PORTALS[0]
    fields = {"maxThroughput": "2", "timeUnit": "seconds"}
    payloads = backlog(1, 40, portals=[portal], workflow=950, fields=fields)
    ids = ids_of(payloads)
    async with draining(
        db_url, budgeted_hubspot, payloads, "ops-1", "ops-2", shared=admin_sections(3.0), until=2
    ) as (a, b):
        owner, other = pick(a, b, portal)
        (queue,) = (await call(other, "GET", f"/api/queues?portal_id={portal}"))[1]["queues"]
        status, body = await call(other, "POST", f"/api/queues/{queue['id']}/pause")
        assert status == 200, body
        # The owner hears of it by NOTIFY, and stops.
        await wait_for(lambda: stopped_sending(owner, queue["id"]))
        frozen = done(budgeted_hubspot, payloads)
        # Nothing may go out for a while, and no event marks that nothing did: at 2 a second,
        # 4 would have gone in this time.
        await asyncio.sleep(2.0)
        assert done(budgeted_hubspot, payloads) == frozen
        status, body = await call(
            other,
            "PUT",
            f"/api/queues/{queue['id']}/rate",
            {"max_throughput": 20, "time_unit": "seconds"},
        )
        assert status == 200, body
        status, body = await call(other, "POST", f"/api/queues/{queue['id']}/resume")
        assert status == 200, body
        resumed_at = time.time()
        await drained(budgeted_hubspot, payloads, timeout=30)
        # The override (20 a second) is applied: some second after the resume holds more
        # sends than the old rate (2) allows.
        after = [t for t in budgeted_hubspot.sends_for(ids) if t > resumed_at]
        assert max_in_window(after, 1.0) > 2, after
        assert not owner.task.done()
        assert not other.task.done()
    assert [r for r in budgeted_hubspot.received if r.status == 429] == []
    check_sent_once(budgeted_hubspot, payloads)


# -- cluster config values at the edges ----------------------------------------------------------


ODD_NAMES = [
    "x" * 100,  # the maximum
    "é" * 100,  # 100 characters, 200 bytes
    "🚀" * 100,  # 400 bytes
    "\u202eevil",
    " ",
]


@pytest.mark.parametrize("name", ODD_NAMES, ids=lambda n: repr(n)[:20])
async def test_odd_instance_names_start_and_are_listed_verbatim(db_url, budgeted_hubspot, name):
    payloads = backlog(1, 1, portals=PORTALS[:1])
    async with draining(
        db_url, budgeted_hubspot, payloads, name, shared=admin_sections(3.0), until=1
    ) as (a,):
        status, view = await call(a, "GET", "/api/cluster")
        assert status == 200, view
        (me,) = view["instances"]
        assert me["name"] == name
        assert me["live"] is True


@pytest.mark.parametrize("name", ["a\x00b", "tab\there", "new\nline", "\x1b[31mred"])
def test_an_instance_name_with_control_characters_is_a_config_error(db_url, budgeted_hubspot, name):
    with pytest.raises(ConfigError, match="instance_name"):
        instance_config(db_url, budgeted_hubspot, sections(3.0), name)


@pytest.mark.parametrize("lease_s", [2.99, 0, -1, 600.01, float("nan"), float("inf")])
def test_lease_s_outside_3_to_600_is_rejected(db_url, lease_s):
    raw = {
        "database": {"url": db_url},
        "cluster": {"lease_s": lease_s},
    }

    def load() -> None:
        config_module.validate(config_module.from_mapping(raw, source="(test)"))

    with pytest.raises(ConfigError):
        load()


async def test_lease_s_600_takes_a_portal_at_once_and_a_graceful_stop_hands_it_over(
    db_url, budgeted_hubspot
):
    """With the longest lease (heartbeat every 200 s), work still starts at once, and a
    graceful stop hands the portal over at once (not after 600 s)."""
    portal = PORTALS[0]
    payloads = backlog(1, 30, portals=[portal], workflow=960)
    async with draining(
        db_url,
        budgeted_hubspot,
        payloads,
        "long-b",
        "long-a",
        shared=sections(lease_s=600.0),
        post_to=["long-a"],
    ) as (b, a):
        await wait_for(lambda: done(budgeted_hubspot, payloads) >= 3, timeout=20)
        if not a.runtime.cluster.owns(portal):
            pytest.skip("the other instance took the portal first")
        await a.stop()
        # a stopped: b has it within seconds
        await wait_for(lambda: b.runtime.cluster.owns(portal), timeout=10)
        await drained(budgeted_hubspot, payloads, timeout=30)
    check_the_wire(budgeted_hubspot, payloads, once=True)


def dead_pid() -> int:
    """A pid that no process has now (one that just exited)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, 0)
        pytest.skip("the pid was reused at once")
    return proc.pid


@pytest.mark.parametrize("suffix", [":8080", ":1", f":{os.getpid()}"])
def test_a_configured_name_that_looks_like_hostname_pid_is_a_config_error(
    db_url, budgeted_hubspot, suffix
):
    """The default name, hostname:pid, is what a start on the same host checks against its
    process table to end a crashed instance's leases at once: a configured name of that
    form (a live instance taken for a dead one) is refused."""
    with pytest.raises(ConfigError, match="instance_name"):
        instance_config(
            db_url, budgeted_hubspot, admin_sections(3.0), socket.gethostname() + suffix
        )


# -- churn ----------------------------------------------------------------------------------------


async def test_rapid_start_stop_churn_of_three_instances(db_url, budgeted_hubspot):
    """Three instances started and stopped (gracefully) over and over while a backlog drains:
    every action completed once, every queue's rate and portal's budget held, no portal
    owned by two at once, nothing left claimed or pending."""
    shared = sections(lease_s=3.0)
    payloads = backlog(2, 30, workflow=980)  # 6 s of work per queue
    ids = ids_of(payloads)
    stacks: dict[str, contextlib.AsyncExitStack] = {}
    daemons: dict[str, Daemon] = {}
    overlaps: list[str] = []
    events: list[tuple[float, str]] = []
    seen: dict[str, set[int]] = {}

    async def up(name: str) -> None:
        stack = contextlib.AsyncExitStack()
        daemons[name] = await stack.enter_async_context(
            running(instance_config(db_url, budgeted_hubspot, shared, name))
        )
        stacks[name] = stack

    async def down(name: str) -> None:
        stack = stacks.pop(name)
        events.append((time.time(), f"{name} stopping"))
        await asyncio.wait_for(stack.aclose(), 40)
        daemons.pop(name)
        seen.pop(name, None)
        events.append((time.time(), f"{name} stopped"))

    async def some_more_sent(n: int) -> None:
        """Until `n` more actions are completed (or all of them)."""
        target = min(len(payloads), done(budgeted_hubspot, payloads) + n)
        await wait_for(lambda: done(budgeted_hubspot, payloads) >= target, timeout=30)

    def look() -> None:
        live = list(daemons.items())
        for n, d in live:
            now_owned = d.runtime.cluster.owned
            if now_owned != seen.get(n):
                events.append((time.time(), f"{n} owns {sorted(now_owned)}"))
                seen[n] = now_owned
        for i, (n1, d1) in enumerate(live):
            for n2, d2 in live[i + 1 :]:
                both = d1.runtime.cluster.owned & d2.runtime.cluster.owned
                if both:
                    overlaps.append(f"{sorted(both)} by {n1} and {n2}")

    try:
        async with watching(look, every=0.005):
            await up("c1")
            await connect(daemons["c1"], budgeted_hubspot, PORTALS)
            await post_all([daemons["c1"]], payloads)
            plan = ["+c2", "+c3", "-c1", "+c1", "-c2", "-c3", "+c2", "-c1", "+c3", "+c1", "-c2"]
            for step in plan:
                # Each step mid-drain: once some more work went out under the last one.
                await some_more_sent(10)
                name = step[1:]
                await (up(name) if step[0] == "+" else down(name))
            await drained(budgeted_hubspot, payloads, timeout=90)
            states = await settled_states(db_url, ids)
    finally:
        for name in list(stacks):
            await down(name)
    assert overlaps == [], overlaps[:5]
    assert states == {"done": len(ids)}, states
    start = budgeted_hubspot.received[0].at
    timeline = [(round(t - start, 3), e) for t, e in events]
    check_sent_once(budgeted_hubspot, payloads, timeline)
    check_the_wire(budgeted_hubspot, payloads, once=True)


async def test_a_lone_instance_taking_portals_as_work_arrives_sends_nothing_twice(
    db_url, budgeted_hubspot
):
    """One instance, just started: work for four portals arrives, and it takes each portal
    as its work is routed (acquire, per intake batch). No callback may go out twice."""
    payloads = backlog(2, 10, workflow=990)
    async with draining(db_url, budgeted_hubspot, payloads, "alone"):
        await drained(budgeted_hubspot, payloads)
        async with observer(db_url) as repo:
            rows = await repo.pool.fetch(
                "SELECT callback_id, attempts, last_error FROM actions WHERE attempts > 0"
            )
        retried = {r["callback_id"]: (r["attempts"], r["last_error"]) for r in rows}
    check_sent_once(budgeted_hubspot, payloads, retried)
    check_the_wire(budgeted_hubspot, payloads, once=True)
