"""Fault 7: two instances on one database, one of them killed with `kill -9` at random
moments, again and again (and started again): each time its portals are taken over by the
other, the backlog drains, every queue's rate and every portal's budget hold at the wire
(re-sends included), and nothing is lost. An action is sent twice only when its request was
in flight at a kill."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually
from tests.daemon_process import DaemonProcess, post_signed
from tests.faults.conftest import scale, tries
from tests.test_instances import (
    PORTALS,
    RATE,
    backlog,
    check_the_wire,
    done,
    drained,
    ids_of,
    owners,
    processes,
    sections,
    send_times,
    settled_states,
)
from throttled.hubspot.fake import FakeHubSpot

LEASE_S = 3.0  # (the least cluster.lease_s allows)


@pytest.mark.timeout(scale(240, 900))
async def test_one_of_two_instances_killed_again_and_again_loses_nothing(
    tmp_path: Path, db_url: str, budgeted_hubspot: FakeHubSpot, rng: random.Random, record: Any
) -> None:
    fake = budgeted_hubspot
    kills = tries(2, 10)
    names = ["i1", "i2"]
    # About 5 s a kill (a random wait, the take-over, the restart) of work for every queue.
    payloads = backlog(queues_per_portal=2, per_queue=RATE * 5 * kills + 20, workflow=970)
    ids = ids_of(payloads)
    killed: list[float] = []
    took: list[float] = []
    async with processes(tmp_path, db_url, fake, sections(lease_s=LEASE_S), names) as procs:
        by_name = dict(zip(names, procs, strict=True))
        for portal_id in PORTALS:
            token = f"refresh-{portal_id}-{rng.randrange(10**9)}"
            fake.register_portal(portal_id, token)
            await procs[0].connect_portal(portal_id, token)
        for proc in procs:
            await proc.start()
        async with aiohttp.ClientSession() as session:
            for n, payload in enumerate(payloads):
                answer = await post_signed(session, procs[n % 2].url, payload)
                assert answer.status == 200, answer

        for _ in range(kills):
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            name = rng.choice(names)
            victim = by_name[name]
            survivor = next(p for n, p in by_name.items() if n != name)
            victim.send_signal(signal.SIGKILL)
            killed_at = time.time()
            killed.append(killed_at)
            assert await victim.wait(30) == -signal.SIGKILL

            async def survivor_owns_all(n: str = name) -> bool:
                return set((await owners(db_url)).values()) == {"i1", "i2"} - {n}

            await eventually(survivor_owns_all, timeout=LEASE_S + 30)
            took.append(round(time.time() - killed_at, 2))
            assert survivor.running
            await victim.start()
        assert done(fake, payloads) < len(payloads), "drained before the last kill"
        await drained(fake, payloads, timeout=scale(120, 300))
        states = await settled_states(db_url, ids)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [await proc.wait(60) for proc in procs]

    twice = {i: sorted(at) for i, at in send_times(fake).items() if len(at) > 1}
    unexplained = {
        i: at
        for i, at in twice.items()
        if not all(any(a <= k < b for k in killed) for a, b in itertools.pairwise(at))
    }
    record.update(
        fault="2 instances, one killed with kill -9",
        kills=kills,
        actions=len(ids),
        lost=len(ids) - done(fake, payloads),
        take_over_s=took,
        sent_twice=len(twice),
        sent_twice_unexplained=len(unexplained),
        states=states,
    )
    assert codes == [0, 0], [DaemonProcess.log_tail(p) for p in procs]
    assert states == {"done": len(ids)}, states
    assert unexplained == {}, unexplained
    assert all(t <= LEASE_S + 5.0 for t in took), took
    check_the_wire(fake, payloads, once=False)
