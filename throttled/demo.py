"""`throttled demo`: mock mode end to end, with live per-queue progress and achieved rates."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from throttled.config import Config
from throttled.daemon import Runtime, serve
from throttled.hubspot.fake import max_in_window
from throttled.hubspot.signature import sign_headers


@dataclass(frozen=True, kw_only=True)
class DemoQueue:
    """One demo queue: a named queue with its rate input fields."""

    name: str
    limit: int
    period_s: float
    unit: str
    count_per_unit: int
    pacing: str

    def input_fields(self) -> dict[str, str]:
        """The step's input fields that configure this queue."""
        return {
            "queueName": self.name,
            "maxThroughput": str(self.limit),
            "timePeriod": str(self.count_per_unit),
            "timeUnit": self.unit,
            "pacing": self.pacing,
        }


QUEUES = (
    DemoQueue(name="fast", limit=10, period_s=1, unit="seconds", count_per_unit=1, pacing="window"),
    DemoQueue(name="even", limit=4, period_s=1, unit="seconds", count_per_unit=1, pacing="even"),
    DemoQueue(
        name="burst", limit=15, period_s=5, unit="seconds", count_per_unit=5, pacing="window"
    ),
)
PORTAL = 62515


def _demo_config(cfg: Config) -> Config:
    hubspot = dataclasses.replace(cfg.hubspot, mock=True)
    database = dataclasses.replace(cfg.database, auto_migrate=True)
    return dataclasses.replace(cfg, hubspot=hubspot, database=database)


async def run_demo(cfg: Config, *, per_queue: int = 30) -> int:
    """Run the demo; return an exit code."""
    cfg = _demo_config(cfg)
    stop = asyncio.Event()
    ready: asyncio.Future[Runtime] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, on_ready=ready.set_result))
    waiters: list[asyncio.Future[Any]] = [ready, task]
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        return 1
    runtime = ready.result()
    try:
        ids = await _send_all(runtime, cfg, per_queue)
        await _watch(runtime, ids)
        _report(runtime, ids)
    finally:
        stop.set()
        await task
    return 0


async def _send_all(runtime: Runtime, cfg: Config, per_queue: int) -> dict[str, list[str]]:
    secret = cfg.hubspot.client_secret.reveal() or "mock-client-secret"
    base = cfg.server.public_url.rstrip("/") or runtime.url
    url = base + "/api/hubspot/action"
    ids: dict[str, list[str]] = {q.name: [] for q in QUEUES}
    async with aiohttp.ClientSession() as session:
        for n in range(per_queue):
            for queue in QUEUES:
                callback_id = f"ap-{PORTAL}-{uuid.uuid4().int % 10**9}-{n}-0"
                body = json.dumps(_payload(callback_id, queue, n)).encode()
                headers = {"Content-Type": "application/json"}
                headers.update(sign_headers(secret, "POST", url, body))
                async with session.post(
                    runtime.url + "/api/hubspot/action", data=body, headers=headers
                ) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"daemon answered {resp.status}: {await resp.text()}")
                ids[queue.name].append(callback_id)
    print(f"sent {per_queue} signed actions to each of {len(QUEUES)} queues", file=sys.stderr)
    return ids


def _payload(callback_id: str, queue: DemoQueue, n: int) -> dict[str, object]:
    return {
        "callbackId": callback_id,
        "origin": {
            "portalId": PORTAL,
            "actionDefinitionId": 1,
            "actionExecutionIndexIdentifier": {"enrollmentId": n, "actionExecutionIndex": 0},
        },
        "context": {"source": "WORKFLOWS", "workflowId": 100},
        "object": {"objectId": n, "objectType": "CONTACT"},
        "inputFields": queue.input_fields(),
    }


async def _watch(runtime: Runtime, ids: dict[str, list[str]]) -> None:
    fake = runtime.fake
    assert fake is not None
    total = sum(len(v) for v in ids.values())
    start = time.monotonic()
    while True:
        counts = {name: sum(1 for c in cids if c in fake.completed) for name, cids in ids.items()}
        line = "  ".join(f"{name}: {counts[name]:>3}/{len(ids[name])}" for name in ids)
        if sys.stderr.isatty():
            print(
                f"\r[{time.monotonic() - start:5.1f}s] {line}", end="", file=sys.stderr, flush=True
            )
        if sum(counts.values()) >= total:
            print(file=sys.stderr)
            return
        await asyncio.sleep(0.25)


def _report(runtime: Runtime, ids: dict[str, list[str]]) -> None:
    fake = runtime.fake
    assert fake is not None
    print(f"{'queue':<8} {'configured':<22} {'sent':>5} {'max/window':>10} {'achieved':>14}")
    for queue in QUEUES:
        times = sorted(fake.sends_for(ids[queue.name]))
        peak = max_in_window(times, queue.period_s)
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        # Window pacing sends N at once: the first batch opens the clock. Even pacing: one per gap.
        head = 1 if queue.pacing == "even" else sum(1 for t in times if t < times[0] + 0.5)
        achieved = (len(times) - head) / span * queue.period_s if span else 0.0
        configured = f"{queue.limit} per {queue.period_s:g} s ({queue.pacing})"
        print(
            f"{queue.name:<8} {configured:<22} {len(times):>5} {peak:>10} "
            f"{achieved:>8.2f} per {queue.period_s:g} s"
        )
