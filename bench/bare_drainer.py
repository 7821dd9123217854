"""A bare drainer: the least a process can do to drain the actions table, as drain.py's baseline.

No rate logic, no queues, no portal budget beyond what keeps HubSpot's limit: every --tick-ms
(5 ms) one loop step

1. marks the rows of every batch answered 204 since the last step `done`, in one statement;
2. claims pending rows of all queues in one statement (`UPDATE actions SET state = 'claimed'
   … WHERE id = ANY(ARRAY(SELECT id … WHERE state = 'pending' … ORDER BY id LIMIT n FOR
   UPDATE SKIP LOCKED))`; `id IN (SELECT …)` would be planned as a hash join over the whole
   table) when its per-portal buffers are short of a batch (n tops them up to two batches
   per portal); a cursor (`id > last claimed`) keeps each claim from walking the dead
   versions of the rows claimed before (it starts over from 0 once a claim comes back
   short, so released rows are found again);
3. posts a batch of up to --batch (100) callbacks to the batch-complete endpoint for each
   portal whose next request is due: at most one request per portal every
   --portal-interval / --portal-requests seconds (10 s / 100: never more than 100 in any
   10 s window, under HubSpot's 110). A batch answered anything but 204 goes back to the
   front of its portal's buffer (and is counted).

Access tokens come from the fake's OAuth endpoint (refresh_token grant with
`mock-refresh-<portal>`, the token `throttled portals connect` stores), once per portal at the
start and again after a 401. The body is the one throttled's HubSpotClient sends.

    python bench/bare_drainer.py --db-url URL --api-url URL --client-id ID \
        --client-secret S --portals P --ready-file F --out FILE [--loop uvloop]

writes F once connected and holding its tokens, drains until SIGTERM or SIGINT, then waits for
the requests in flight, marks them, puts the rows it holds back to 'pending' and writes FILE:

    {"loop": "asyncio.unix_events", "requests": {"204": n, …}, "callbacks_done": n,
     "claims": n, "claimed_rows": n, "claim_ms": {"p50": …, "p99": …, "max": …}, "mark_ms": …,
     "mark_statements": n, "ticks": n, "tick_late_ms": {…}, "token_requests": n,
     "released_at_stop": n}

Exit code 4 if --loop uvloop is asked for and uvloop is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

EXIT_NO_LOOP = 4

CLAIM = """
UPDATE actions SET state = 'claimed', claimed_at = now()
WHERE id = ANY(ARRAY(
    SELECT id FROM actions
    WHERE state = 'pending' AND id > $1 AND deadline > now()
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
))
RETURNING id, callback_id, portal_id
"""

# (`a.state <> 'done'`, not `= 'claimed'`: the table's statistics, from the seeding, know no
# claimed row, so `= 'claimed'` is estimated at one row and planned as a nested loop over a
# sequential scan, quadratic in the batch. Only this process writes the rows it holds.)
MARK_DONE = """
UPDATE actions a
SET state = 'done', completed_at = now(), sent_at = to_timestamp(x.sent_at),
    last_error = NULL, attempts = a.attempts + 1, failures = 0
FROM unnest($1::bigint[], $2::float8[]) AS x(id, sent_at)
WHERE a.id = x.id AND a.state <> 'done'
"""

RELEASE = "UPDATE actions SET state = 'pending' WHERE id = ANY($1::bigint[]) AND state = 'claimed'"

Row = tuple[int, str]  # (id, callback_id)


def summary(values: list[float]) -> dict[str, float]:
    """p50/p99/max of a list of milliseconds (zeros if empty)."""
    ordered = sorted(values) or [0.0]

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {"p50": pct(50), "p99": pct(99), "max": ordered[-1]}


class BareDrainer:
    """Claim, post, mark done; nothing else."""

    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession) -> None:
        self.args = args
        self.session = session
        self.url = args.api_url.rstrip("/") + "/automation/v4/actions/callbacks/complete"
        self.portals = list(range(1, args.portals + 1))
        self.tokens: dict[int, str] = {}
        self.buffers: dict[int, deque[Row]] = {p: deque() for p in self.portals}
        self.interval = args.portal_interval / args.portal_requests
        self.done_ids: list[int] = []
        self.done_sent: list[float] = []
        self.inflight: set[asyncio.Task[None]] = set()
        self.statuses: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.claim_ms: list[float] = []
        self.mark_ms: list[float] = []
        self.tick_late_ms: list[float] = []

    async def token(self, portal: int) -> None:
        """An access token for the portal, from the refresh token `portals connect` stores."""
        form = {
            "grant_type": "refresh_token",
            "client_id": self.args.client_id,
            "client_secret": self.args.client_secret,
            "refresh_token": f"mock-refresh-{portal}",
        }
        async with self.session.post(self.args.api_url + "/oauth/v1/token", data=form) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"token for portal {portal}: {resp.status} {body}")
        self.tokens[portal] = body["access_token"]
        self.stats["token_requests"] += 1

    async def post(self, portal: int, rows: list[Row]) -> None:
        """One batch completion; its rows are marked done at the next step, or go back."""
        inputs = [
            {"callbackId": cid, "outputFields": {"hs_execution_state": "SUCCESS"}}
            for _, cid in rows
        ]
        body = json.dumps({"inputs": inputs}, separators=(",", ":")).encode()
        headers = {
            "Authorization": f"Bearer {self.tokens[portal]}",
            "Content-Type": "application/json",
        }
        sent = time.time()
        try:
            async with self.session.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        self.statuses[str(status)] += 1
        if status == 204:
            self.done_ids.extend(r[0] for r in rows)
            self.done_sent.extend([sent] * len(rows))
            return
        self.buffers[portal].extendleft(reversed(rows))
        if status == 401:
            await self.token(portal)

    async def run(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        """Loop steps every tick until stop is set."""
        a = self.args
        loop = asyncio.get_running_loop()
        tick = a.tick_ms / 1000.0
        target = 2 * a.batch * len(self.portals)
        start = time.monotonic()
        next_at = {
            p: start + i * self.interval / len(self.portals) for i, p in enumerate(self.portals)
        }
        cursor, short = 0, False
        due = loop.time()
        while not stop.is_set():
            self.stats["ticks"] += 1
            await self.mark(conn)
            buffered = sum(len(b) for b in self.buffers.values())
            if target - buffered >= a.batch:
                t = time.perf_counter()
                rows = await conn.fetch(CLAIM, cursor, target - buffered)
                self.claim_ms.append((time.perf_counter() - t) * 1000)
                self.stats["claims"] += 1
                self.stats["claimed_rows"] += len(rows)
                for r in rows:
                    self.buffers[r["portal_id"]].append((r["id"], r["callback_id"]))
                short = len(rows) < target - buffered
                cursor = 0 if short else max(r["id"] for r in rows)
            now = time.monotonic()
            for p in self.portals:
                buf = self.buffers[p]
                if next_at[p] <= now and (len(buf) >= a.batch or (buf and short)):
                    batch = [buf.popleft() for _ in range(min(a.batch, len(buf)))]
                    next_at[p] = now + self.interval
                    self.spawn(self.post(p, batch))
            due += tick
            late = loop.time() - due
            if late > 0:
                self.tick_late_ms.append(late * 1000)
                due = loop.time()  # a slow step: the next one starts a tick from now
            else:
                self.tick_late_ms.append(0.0)
                await asyncio.sleep(-late)

    def spawn(self, coro: Any) -> None:
        """A task that is kept until done."""
        task = asyncio.get_running_loop().create_task(coro)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def mark(self, conn: asyncpg.Connection) -> None:
        """Mark the answered rows done, in one statement."""
        if not self.done_ids:
            return
        ids, sent = self.done_ids, self.done_sent
        self.done_ids, self.done_sent = [], []
        t = time.perf_counter()
        await conn.execute(MARK_DONE, ids, sent)
        self.mark_ms.append((time.perf_counter() - t) * 1000)
        self.stats["mark_statements"] += 1
        self.stats["callbacks_done"] += len(ids)

    async def finish(self, conn: asyncpg.Connection) -> None:
        """Wait for the requests in flight, mark them, release what is still held."""
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=20)
        await self.mark(conn)
        held = [r[0] for b in self.buffers.values() for r in b]
        if held:
            await conn.execute(RELEASE, held)
        self.stats["released_at_stop"] = len(held)

    def report(self) -> dict[str, Any]:
        """What --out gets."""
        return {
            "loop": type(asyncio.get_running_loop()).__module__,
            "requests": dict(self.statuses),
            "claim_ms": summary(self.claim_ms),
            "mark_ms": summary(self.mark_ms),
            "tick_late_ms": summary(self.tick_late_ms),
            **{k: self.stats[k] for k in ("callbacks_done", "claims", "claimed_rows", "ticks")},
            **{k: self.stats[k] for k in ("mark_statements", "token_requests", "released_at_stop")},
        }


async def main(args: argparse.Namespace) -> None:
    """Connect, fetch tokens, say ready, drain until signalled, write the report."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    conn = await asyncpg.connect(args.db_url)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        drainer = BareDrainer(args, session)
        await asyncio.gather(*(drainer.token(p) for p in drainer.portals))
        write_atomic(Path(args.ready_file), str(os.getpid()))
        try:
            await drainer.run(conn, stop)
        finally:
            await drainer.finish(conn)
            await conn.close()
        write_atomic(Path(args.out), json.dumps(drainer.report()))


def write_atomic(path: Path, text: str) -> None:
    """Write text so that a reader never sees half of it."""
    path.with_suffix(".tmp").write_text(text)
    os.replace(path.with_suffix(".tmp"), path)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """asyncio's default loop (None), or uvloop's; exit EXIT_NO_LOOP without uvloop."""
    if name == "asyncio":
        return None
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        print("bare_drainer: --loop uvloop, but uvloop is not installed", file=sys.stderr)
        sys.exit(EXIT_NO_LOOP)
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--db-url", required=True, help="the database holding the actions table")
    p.add_argument("--api-url", required=True, help="the fake HubSpot's base URL")
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    p.add_argument("--portals", type=int, required=True, help="portals 1..P")
    p.add_argument("--batch", type=int, default=100, help="callbacks per request (max 100)")
    p.add_argument("--tick-ms", type=float, default=5.0, help="loop step period")
    p.add_argument("--portal-requests", type=int, default=100, help="requests per interval")
    p.add_argument("--portal-interval", type=float, default=10.0, help="seconds")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--ready-file", required=True, help="written once draining starts")
    p.add_argument("--out", required=True, help="report (JSON) written at exit")
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    with asyncio.Runner(loop_factory=loop_factory(arguments.loop)) as runner:
        runner.run(main(arguments))
