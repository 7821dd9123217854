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
from collections import Counter
from typing import Any

import pytest

from tests.conftest import CLIENT_ID, CLIENT_SECRET, Daemon, action_payload, running, wait_for
from tests.pg_proxy import pg_proxy
from tests.test_instances import (
    BUDGET,
    FIELDS,
    PORTALS,
    check_the_wire,
    connect,
    instance_config,
    observer,
    post_all,
    sections,
)
from throttled import config as config_module
from throttled.config import ConfigError
from throttled.db.cluster import CHANNEL
from throttled.hubspot.fake import FakeHubSpot, max_in_window

TOKEN = "hostile-admin-token-0123456789abcdef"
ADMIN = {"tokens": [{"id": "ops", "token": TOKEN}]}
AUTH = {"Authorization": f"Bearer {TOKEN}"}

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
async def fake():
    fake = FakeHubSpot(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, portal_budget=(BUDGET, 1))
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def admin_sections(lease_s: float, **cluster: Any) -> dict[str, Any]:
    """sections() with an admin token (and more cluster keys)."""
    shared = sections(lease_s=lease_s)
    shared["admin"] = dict(ADMIN)
    shared["cluster"] = {**shared["cluster"], **cluster}
    return shared


async def call(daemon: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with daemon.session.request(method, daemon.url + path, json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def notify(db_url: str, payload: str) -> None:
    async with observer(db_url) as repo:
        await repo.pool.execute("SELECT pg_notify($1, $2)", CHANNEL, payload)


async def db_states(db_url: str, ids: list[str]) -> dict[str, int]:
    async with observer(db_url) as repo:
        rows = await repo.pool.fetch(
            "SELECT state, count(*)::int AS n FROM actions WHERE callback_id = ANY($1) GROUP BY 1",
            ids,
        )
    return {r["state"]: r["n"] for r in rows}


async def bounded(coro: Any, timeout: float) -> Any:
    return await asyncio.wait_for(coro, timeout)


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


async def test_garbage_notifications_never_crash_an_instance(db_url, fake):
    """Every payload above, sent on the cluster's channel while an instance owns a portal and
    drains it: the instance keeps running, keeps its portal and drains what comes after."""
    shared = sections(lease_s=3.0)
    portal = PORTALS[0]
    async with running(instance_config(db_url, fake, shared, "target")) as a:
        await connect(a, fake, [portal])
        first = [action_payload(portal_id=portal, workflow_id=901, input_fields=dict(FIELDS))]
        await post_all([a], first)
        await wait_for(lambda: first[0]["callbackId"] in fake.completed, timeout=30)
        for payload in GARBAGE:
            await notify(db_url, payload)
        await asyncio.sleep(1.5)
        assert not a.task.done(), a.task
        assert a.runtime.cluster.owns(portal)
        later = [
            action_payload(portal_id=portal, workflow_id=902, input_fields=dict(FIELDS))
            for _ in range(5)
        ]
        await post_all([a], later)
        ids = [p["callbackId"] for p in later]
        await wait_for(lambda: all(i in fake.completed for i in ids), timeout=30)
        assert not a.task.done()


async def test_a_forged_work_notification_with_an_out_of_range_queue_id_does_not_poison_the_loader(
    db_url, fake
):
    """FAILS (defect): a forged work notification naming a portal the instance owns and a
    queue id beyond bigint (`{"event":"work","work":{"7101":[99999999999999999999]}}`) goes
    to Supervisor.notify, into `_unknown`; the loader's get_queues() then fails with a
    DataError (a DatabaseError) on every try, and load_once puts the id back each time. From
    then on no queue this instance has not loaded yet ever runs here: work stored at another
    instance for a new queue of the owned portal stays pending forever."""
    shared = sections(lease_s=3.0)
    portal = PORTALS[0]
    async with (
        running(instance_config(db_url, fake, shared, "owner")) as a,
        running(instance_config(db_url, fake, shared, "other")) as b,
    ):
        await connect(a, fake, [portal])
        first = [action_payload(portal_id=portal, workflow_id=911, input_fields=dict(FIELDS))]
        await post_all([a], first)
        await wait_for(lambda: first[0]["callbackId"] in fake.completed, timeout=30)
        owner, other = (a, b) if a.runtime.cluster.owns(portal) else (b, a)
        assert owner.runtime.cluster.owns(portal)
        await notify(db_url, json.dumps({"event": "work", "work": {str(portal): [10**20]}}))
        await asyncio.sleep(0.5)
        # New work for a queue the owner has never seen, stored at the other instance.
        later = [
            action_payload(portal_id=portal, workflow_id=912, input_fields=dict(FIELDS))
            for _ in range(3)
        ]
        await post_all([other], later)
        ids = [p["callbackId"] for p in later]
        try:
            await wait_for(lambda: all(i in fake.completed for i in ids), timeout=15)
        except AssertionError:
            raise AssertionError(
                f"work for a new queue never ran after the forged notification; "
                f"owner's unknown queues: {sorted(owner.runtime.scheduler._unknown)}; "
                f"db: {await db_states(db_url, ids)}"
            ) from None


async def test_a_notification_storm_does_not_make_leases_flap(db_url, fake):
    """Hundreds of `wake` notifications (each makes the others run a heartbeat at once): two
    instances still hold two portals each, never one portal both, and nothing is sent twice."""
    shared = sections(lease_s=3.0)
    async with (
        running(instance_config(db_url, fake, shared, "s1")) as a,
        running(instance_config(db_url, fake, shared, "s2")) as b,
    ):
        await connect(a, fake, PORTALS)
        payloads = [
            action_payload(portal_id=p, workflow_id=920, input_fields=dict(FIELDS))
            for p in PORTALS
            for _ in range(10)
        ]
        await post_all([a, b], payloads)
        overlaps: list[set[int]] = []

        async def watch() -> None:
            while True:
                both = a.runtime.cluster.owned & b.runtime.cluster.owned
                if both:
                    overlaps.append(both)
                await asyncio.sleep(0.003)

        watcher = asyncio.create_task(watch())
        try:
            async with observer(db_url) as repo:
                for n in range(300):
                    await repo.pool.execute(
                        "SELECT pg_notify($1, $2)",
                        CHANNEL,
                        json.dumps({"event": "released", "instance": f"ghost-{n}"}),
                    )
            ids = [p["callbackId"] for p in payloads]
            await wait_for(lambda: all(i in fake.completed for i in ids), timeout=60)
        finally:
            watcher.cancel()
        assert not a.task.done()
        assert not b.task.done()
        assert overlaps == []
    check_the_wire(fake, payloads, once=True)


# -- a database outage at an instance that owns portals and sends ---------------------------


@pytest.mark.xfail(
    strict=True,
    reason="known, open: requests started after the owner's database went away, answered by"
    " HubSpot but not recorded, are sent again by the next owner once they are over",
)
async def test_an_outage_at_the_owner_sends_nothing_twice(db_url, fake):
    """Instance `cut` reaches PostgreSQL through a proxy, `direct` does not. Both drain a
    backlog; the proxy is cut. `cut`'s leases must lapse here before they expire in the
    database (it stops sending first), `direct` takes its portals over, and once the proxy is
    restored everything is completed with no callback sent twice and every limit held."""
    lease_s = 3.0
    shared = sections(lease_s=lease_s)
    payloads = [
        action_payload(portal_id=p, workflow_id=930 + q, input_fields=dict(FIELDS))
        for p in PORTALS
        for q in range(2)
        for _ in range(25)
    ]
    ids = [p["callbackId"] for p in payloads]
    async with pg_proxy(db_url) as proxy:
        cfg_cut = instance_config(proxy.url_for(db_url), fake, shared, "cut")
        async with (
            running(cfg_cut) as a,
            running(instance_config(db_url, fake, shared, "direct")) as b,
        ):
            await connect(b, fake, PORTALS)
            await post_all([a, b], payloads)
            await wait_for(lambda: a.runtime.cluster.owned and b.runtime.cluster.owned, 30)
            await wait_for(lambda: len({i for r in fake.received for i in r.callback_ids}) >= 20)
            doomed = set(a.runtime.cluster.owned)
            lapsed_at: dict[int, float] = {}
            taken_at: dict[int, float] = {}

            async def watch() -> None:
                while True:
                    now = time.time()
                    for p in doomed:
                        if p not in lapsed_at and not a.runtime.cluster.owns(p):
                            lapsed_at[p] = now
                        if p not in taken_at and b.runtime.cluster.owns(p):
                            taken_at[p] = now
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            cut_at = time.time()
            proxy.cut()
            try:
                await wait_for(lambda: all(p in taken_at for p in doomed), lease_s + 15)
                await asyncio.sleep(2.0)
            finally:
                proxy.restore()
            try:
                await wait_for(lambda: all(i in fake.completed for i in ids), timeout=90)
            finally:
                watcher.cancel()
            assert all(lapsed_at[p] < taken_at[p] for p in doomed), (lapsed_at, taken_at)
            states = await db_states(db_url, ids)
            await wait_for(lambda: True)
    sends: dict[str, list[float]] = {}
    for r in fake.received:
        for i in r.callback_ids:
            sends.setdefault(i, []).append(r.at)
    twice = {i: [round(t - cut_at, 3) for t in at] for i, at in sends.items() if len(at) > 1}
    assert twice == {}, (
        f"{len(twice)} callbacks sent twice (instants relative to the cut): "
        f"{dict(list(twice.items())[:10])}; lapsed {lapsed_at} taken {taken_at} cut {cut_at}"
    )
    check_the_wire(fake, payloads, once=True)
    assert states.get("done", 0) == len(ids), states


# -- operator actions at an instance that does not own the queue's portal ---------------------


@contextlib.asynccontextmanager
async def owner_and_other(db_url: str, fake: FakeHubSpot, shared: dict[str, Any]) -> Any:
    """Two instances; the portal PORTALS[0] is owned by the first one returned."""
    async with (
        running(instance_config(db_url, fake, shared, "ops-1")) as a,
        running(instance_config(db_url, fake, shared, "ops-2")) as b,
    ):
        await connect(a, fake, PORTALS[:1])
        yield a, b


def pick(a: Daemon, b: Daemon, portal: int) -> tuple[Daemon, Daemon]:
    return (a, b) if a.runtime.cluster.owns(portal) else (b, a)


@pytest.mark.parametrize(
    "at",
    [
        "owner",
        pytest.param(
            "other",
            marks=pytest.mark.xfail(
                strict=True,
                reason="known, open: fail-pending at a non-owner does not take back the rows"
                " the owner's sender holds",
            ),
        ),
    ],
)
async def test_fail_pending_at_a_non_owner_takes_the_rows_the_owner_holds(db_url, fake, at):
    """Known defect for at=other (at=owner is the control): on one instance, fail-pending
    takes back the rows its sender holds (claimed ahead) and completes them FAIL_CONTINUE at
    once (test_queue_operations). Sent to the instance that does not own the portal, it
    releases only the pending rows: the rows the owner holds claimed keep going out SUCCESS
    at the queue's rate."""
    shared = admin_sections(3.0)
    shared["sender"] = {**shared["sender"], "claim_ahead_s": 30.0, "lookahead_s": 5.0}
    portal = PORTALS[0]
    fields = {"maxThroughput": "1", "timeUnit": "seconds"}
    async with owner_and_other(db_url, fake, shared) as (a, b):
        payloads = [
            action_payload(portal_id=portal, workflow_id=940, input_fields=fields)
            for _ in range(20)
        ]
        await post_all([a], payloads)
        ids = [p["callbackId"] for p in payloads]
        await wait_for(lambda: any(i in fake.completed for i in ids), timeout=30)
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
        await wait_for(lambda: all(i in fake.completed for i in ids), timeout=40)
        states = [fake.completed[cid][1]["hs_execution_state"] for cid in ids]
        assert states.count("FAIL_CONTINUE") >= 17, (states.count("FAIL_CONTINUE"), answer)


async def test_pause_and_override_at_a_non_owner_take_effect_at_the_owner(db_url, fake):
    """Pause sent to the instance that does not own the portal: the owner stops sending
    within a moment; resume there: it drains again; a rate override there: the owner
    rates the queue at once."""
    shared = admin_sections(3.0)
    portal = PORTALS[0]
    fields = {"maxThroughput": "2", "timeUnit": "seconds"}
    async with owner_and_other(db_url, fake, shared) as (a, b):
        payloads = [
            action_payload(portal_id=portal, workflow_id=950, input_fields=fields)
            for _ in range(40)
        ]
        await post_all([a], payloads)
        ids = [p["callbackId"] for p in payloads]
        await wait_for(lambda: sum(i in fake.completed for i in ids) >= 2, timeout=30)
        owner, other = pick(a, b, portal)
        (queue,) = (await call(other, "GET", f"/api/queues?portal_id={portal}"))[1]["queues"]
        status, body = await call(other, "POST", f"/api/queues/{queue['id']}/pause")
        assert status == 200, body
        await asyncio.sleep(0.5)  # (the owner hears of it by NOTIFY)
        frozen = sum(i in fake.completed for i in ids)
        await asyncio.sleep(2.0)
        assert sum(i in fake.completed for i in ids) == frozen
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
        await wait_for(lambda: all(i in fake.completed for i in ids), timeout=30)
        # The override (20 a second) is applied: some second after the resume holds more
        # sends than the old rate (2) allows.
        after = [t for t in fake.sends_for(ids) if t > resumed_at]
        assert max_in_window(after, 1.0) > 2, after
        assert not owner.task.done()
        assert not other.task.done()
    assert [r for r in fake.received if r.status == 429] == []
    sends = Counter(i for r in fake.received for i in r.callback_ids)
    assert [i for i in ids if sends[i] != 1] == []


# -- cluster config values at the edges ----------------------------------------------------------


ODD_NAMES = [
    "x" * 100,  # the maximum
    "é" * 100,  # 100 characters, 200 bytes
    "🚀" * 100,  # 400 bytes
    "\u202eevil",
    " ",
]


@pytest.mark.parametrize("name", ODD_NAMES, ids=lambda n: repr(n)[:20])
async def test_odd_instance_names_start_and_are_listed_verbatim(db_url, fake, name):
    cfg = instance_config(db_url, fake, admin_sections(3.0), name)
    async with running(cfg) as a:
        status, view = await call(a, "GET", "/api/cluster")
        assert status == 200, view
        (me,) = view["instances"]
        assert me["name"] == name
        assert me["live"] is True
        await connect(a, fake, PORTALS[:1])
        (payload,) = [action_payload(portal_id=PORTALS[0], input_fields=dict(FIELDS))]
        await post_all([a], [payload])
        await wait_for(lambda: payload["callbackId"] in fake.completed, timeout=30)


@pytest.mark.parametrize("name", ["a\x00b", "tab\there", "new\nline", "\x1b[31mred"])
def test_an_instance_name_with_control_characters_is_a_config_error(db_url, fake, name):
    with pytest.raises(ConfigError, match="instance_name"):
        instance_config(db_url, fake, sections(3.0), name)


@pytest.mark.parametrize("lease_s", [2.99, 0, -1, 600.01, float("nan"), float("inf")])
def test_lease_s_outside_3_to_600_is_rejected(db_url, fake, lease_s):
    raw = {
        "database": {"url": db_url},
        "cluster": {"lease_s": lease_s},
    }

    def load() -> None:
        config_module.validate(config_module.from_mapping(raw, source="(test)"))

    with pytest.raises(ConfigError):
        load()


async def test_lease_s_600_takes_a_portal_at_once_and_a_graceful_stop_hands_it_over(db_url, fake):
    """With the longest lease (heartbeat every 200 s), work still starts at once, and a
    graceful stop hands the portal over at once (not after 600 s)."""
    shared = sections(lease_s=600.0)
    portal = PORTALS[0]
    payloads = [
        action_payload(portal_id=portal, workflow_id=960, input_fields=dict(FIELDS))
        for _ in range(30)
    ]
    ids = [p["callbackId"] for p in payloads]
    async with running(instance_config(db_url, fake, shared, "long-b")) as b:
        async with running(instance_config(db_url, fake, shared, "long-a")) as a:
            await connect(a, fake, [portal])
            await post_all([a], payloads)
            await wait_for(lambda: sum(i in fake.completed for i in ids) >= 3, timeout=20)
            owner = a if a.runtime.cluster.owns(portal) else b
            if owner is b:
                pytest.skip("the other instance took the portal first")
        # a stopped: b has it within seconds
        await wait_for(lambda: b.runtime.cluster.owns(portal), timeout=10)
        await wait_for(lambda: all(i in fake.completed for i in ids), timeout=30)
    check_the_wire(fake, payloads, once=True)


def dead_pid() -> int:
    """A pid that no process has now (one that just exited)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, 0)
        pytest.skip("the pid was reused at once")
    return proc.pid


@pytest.mark.parametrize("suffix", [":8080", ":1", f":{os.getpid()}"])
def test_a_configured_name_that_looks_like_hostname_pid_is_a_config_error(db_url, fake, suffix):
    """The default name, hostname:pid, is what a start on the same host checks against its
    process table to end a crashed instance's leases at once: a configured name of that
    form (a live instance taken for a dead one) is refused."""
    with pytest.raises(ConfigError, match="instance_name"):
        instance_config(db_url, fake, admin_sections(3.0), socket.gethostname() + suffix)


# -- churn ----------------------------------------------------------------------------------------


async def test_rapid_start_stop_churn_of_three_instances(db_url, fake):
    """Three instances started and stopped (gracefully) over and over while a backlog drains:
    every action completed once, every queue's rate and portal's budget held, no portal
    owned by two at once, nothing left claimed or pending."""
    shared = sections(lease_s=3.0)
    payloads = [
        action_payload(portal_id=p, workflow_id=980 + q, input_fields=dict(FIELDS))
        for p in PORTALS
        for q in range(2)
        for _ in range(20)
    ]
    ids = [p["callbackId"] for p in payloads]
    stacks: dict[str, contextlib.AsyncExitStack] = {}
    daemons: dict[str, Daemon] = {}
    overlaps: list[str] = []
    events: list[tuple[float, str]] = []

    async def up(name: str) -> None:
        stack = contextlib.AsyncExitStack()
        daemons[name] = await stack.enter_async_context(
            running(instance_config(db_url, fake, shared, name))
        )
        stacks[name] = stack

    async def down(name: str) -> None:
        stack = stacks.pop(name)
        events.append((time.time(), f"{name} stopping"))
        await bounded(stack.aclose(), 40)
        daemons.pop(name)
        seen.pop(name, None)
        events.append((time.time(), f"{name} stopped"))

    seen: dict[str, set[int]] = {}

    async def watch() -> None:
        while True:
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
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        await up("c1")
        await connect(daemons["c1"], fake, PORTALS)
        await post_all([daemons["c1"]], payloads)
        plan = ["+c2", "+c3", "-c1", "+c1", "-c2", "-c3", "+c2", "-c1", "+c3", "+c1", "-c2"]
        for step in plan:
            await asyncio.sleep(0.7)
            name = step[1:]
            await (up(name) if step[0] == "+" else down(name))
        await wait_for(lambda: all(i in fake.completed for i in ids), timeout=90)
        states = await db_states(db_url, ids)
    finally:
        watcher.cancel()
        for name in list(stacks):
            await down(name)
    assert overlaps == [], overlaps[:5]
    assert states == {"done": len(ids)}, states
    sends = Counter(i for r in fake.received for i in r.callback_ids)
    twice = [i for i in ids if sends[i] != 1]
    start = fake.received[0].at
    detail = [
        (round(r.at - start, 3), r.portal_id, r.status, len(r.callback_ids))
        for r in fake.received
        if set(r.callback_ids) & set(twice)
    ]
    timeline = [(round(t - start, 3), e) for t, e in events]
    assert twice == [], (twice, detail, timeline)
    check_the_wire(fake, payloads, once=True)


async def test_a_lone_instance_taking_portals_as_work_arrives_sends_nothing_twice(db_url, fake):
    """One instance, just started: work for four portals arrives, and it takes each portal
    as its work is routed (acquire, per intake batch). No callback may go out twice."""
    shared = sections(lease_s=3.0)
    payloads = [
        action_payload(portal_id=p, workflow_id=990 + q, input_fields=dict(FIELDS))
        for p in PORTALS
        for q in range(2)
        for _ in range(10)
    ]
    ids = [p["callbackId"] for p in payloads]
    async with running(instance_config(db_url, fake, shared, "alone")) as a:
        await connect(a, fake, PORTALS)
        await post_all([a], payloads)
        await wait_for(lambda: all(i in fake.completed for i in ids), timeout=60)
        async with observer(db_url) as repo:
            rows = await repo.pool.fetch(
                "SELECT callback_id, attempts, last_error FROM actions WHERE attempts > 0"
            )
        retried = {r["callback_id"]: (r["attempts"], r["last_error"]) for r in rows}
    sends = Counter(i for r in fake.received for i in r.callback_ids)
    twice = [i for i in ids if sends[i] != 1]
    start = fake.received[0].at
    detail = [
        (round(r.at - start, 3), r.portal_id, r.status, len(r.callback_ids))
        for r in fake.received
        if set(r.callback_ids) & set(twice)
    ]
    assert twice == [], (twice, detail, {i: retried.get(i) for i in twice})
    check_the_wire(fake, payloads, once=True)
