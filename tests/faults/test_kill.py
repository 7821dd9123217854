"""Faults 1 and 2: `kill -9` of the daemon at random moments, during ingest and during drain.

1. Under ingest load: every callbackId that got a 200 is in the database afterwards.
2. During a drain: after the restarts every stored action is completed at the fake HubSpot;
   an action is sent twice only when its first request was in flight at a kill (its answer
   died with the process), and no queue's window is exceeded at the wire, re-sends included.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import threading
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from tests.conftest import action_payload, eventually, wait_for
from tests.daemon_process import DaemonProcess, Outcome, fire, post_signed, query
from tests.faults.conftest import Daemons, connect, scale, tries
from throttled.hubspot.fake import FakeHubSpot, max_in_window

PORTAL = 62515
EXIT_WAIT_S = 60.0  # only catches hangs
RATE = 5  # per second, each drain queue
QUEUES = 4


def answers(outcomes: list[Outcome]) -> Counter[str]:
    return Counter(str(o.status) if o.status is not None else "no answer" for o in outcomes)


async def stored_count(db_url: str) -> int:
    [(n,)] = await query(db_url, "SELECT count(*) FROM actions")
    return int(n)


async def kill(daemon: DaemonProcess) -> float:
    """SIGKILL the daemon; when it was sent."""
    daemon.send_signal(signal.SIGKILL)
    killed_at = time.time()
    assert await daemon.wait(EXIT_WAIT_S) == -signal.SIGKILL
    return killed_at


@pytest.mark.timeout(scale(240, 900))
async def test_kill_9_during_ingest_loses_no_acknowledged_action(
    daemons: Daemons, fake_hubspot: FakeHubSpot, db_url: str, rng: random.Random, record: Any
) -> None:
    kills = tries(2, 20)
    outcomes: list[Outcome] = []
    for k in range(kills):
        daemon = daemons()
        if k == 0:
            await connect(daemon, fake_hubspot, PORTAL)
        await daemon.start()
        before = await stored_count(db_url)
        stop = threading.Event()
        load = asyncio.create_task(
            fire(daemon.url, lambda: action_payload(portal_id=PORTAL), stop, concurrency=20)
        )
        try:
            # Once the load is under way (rows being stored), at a random moment within it.
            await eventually(lambda b=before: _more_stored(db_url, b), timeout=60)
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            await kill(daemon)
        finally:
            stop.set()
            outcomes += await load
    acknowledged = {o.callback_id for o in outcomes if o.status == 200}
    [(stored,)] = await query(
        db_url,
        "SELECT count(*) FROM actions WHERE callback_id = ANY(%s)",
        sorted(acknowledged),
    )
    seen = answers(outcomes)
    record.update(
        fault="kill -9 during ingest",
        kills=kills,
        requests=len(outcomes),
        acknowledged=len(acknowledged),
        lost=len(acknowledged) - int(stored),
        answers=dict(seen),
    )
    assert int(stored) == len(acknowledged), record
    # Only 200, 503 (stopping or the database busy) or no answer (the process died).
    assert set(seen) <= {"200", "503", "no answer"}, seen


async def _more_stored(db_url: str, than: int) -> bool:
    return await stored_count(db_url) > than


def drain_payloads(per_queue: int) -> list[dict[str, Any]]:
    """`per_queue` actions in each of QUEUES queues of RATE a second."""
    fields = {"maxThroughput": str(RATE), "timeUnit": "seconds"}
    return [
        action_payload(portal_id=PORTAL, workflow_id=81000 + q, input_fields=fields)
        for _ in range(per_queue)
        for q in range(QUEUES)
    ]


def violations(times: list[float], limit: int) -> int:
    """How many sends ended a one-second window holding more than `limit` sends."""
    ordered = sorted(times)
    return sum(1 for i, t in enumerate(ordered) if max_in_window(ordered[: i + 1], 1.0) > limit)


@pytest.mark.timeout(scale(240, 900))
async def test_kill_9_during_drain_completes_everything_once_per_window(
    daemons: Daemons, fake_hubspot: FakeHubSpot, db_url: str, rng: random.Random, record: Any
) -> None:
    kills = tries(2, 20)
    # Enough work that the last kill still lands mid-drain (about 1 s of sending per run).
    payloads = drain_payloads(per_queue=kills * RATE + 10)
    ids = [p["callbackId"] for p in payloads]
    first = daemons()
    await connect(first, fake_hubspot, PORTAL)
    await first.start()
    async with aiohttp.ClientSession() as session:
        posted = await asyncio.gather(*(post_signed(session, first.url, p) for p in payloads))
    assert [o.status for o in posted] == [200] * len(payloads)

    killed: list[float] = []
    daemon = first
    for k in range(kills):
        if k:
            daemon = daemons()
            await daemon.start()
        # Once this run is sending, at a random moment within its drain.
        sent = len(fake_hubspot.received)
        await wait_for(lambda s=sent: len(fake_hubspot.received) > s, timeout=60)
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        killed.append(await kill(daemon))
    assert len(fake_hubspot.completed.keys() & set(ids)) < len(ids), "drained before the kills"

    last = daemons()
    await last.start()
    await wait_for(lambda: set(ids) <= fake_hubspot.completed.keys(), timeout=scale(90, 300))
    last.send_signal(signal.SIGTERM)
    assert await last.wait(EXIT_WAIT_S) == 0, last.log_tail()
    states = dict(
        await query(
            db_url,
            "SELECT state, count(*) FROM actions WHERE callback_id = ANY(%s) GROUP BY 1",
            ids,
        )
    )

    sends: dict[str, list[float]] = {}
    for r in fake_hubspot.received:
        for callback_id in r.callback_ids:
            sends.setdefault(callback_id, []).append(r.at)
    twice = {i: sorted(at) for i, at in sends.items() if len(at) > 1}
    # A second send only after a kill that came after the first (that request was in flight).
    unexplained = {
        i: at
        for i, at in twice.items()
        if not all(any(a <= k < b for k in killed) for a, b in itertools.pairwise(at))
    }
    by_queue: dict[int, list[float]] = {}
    for p in payloads:
        by_queue.setdefault(p["context"]["workflowId"], []).extend(sends[p["callbackId"]])
    over = {q: violations(times, RATE) for q, times in by_queue.items()}
    record.update(
        fault="kill -9 during drain",
        kills=kills,
        actions=len(ids),
        completed=len(fake_hubspot.completed.keys() & set(ids)),
        lost=len(set(ids) - fake_hubspot.completed.keys()),
        sent_twice=len(twice),
        sent_twice_unexplained=len(unexplained),
        window_violations=sum(over.values()),
    )
    assert states == {"done": len(ids)}, states
    assert unexplained == {}, unexplained
    assert over == dict.fromkeys(by_queue, 0), over
