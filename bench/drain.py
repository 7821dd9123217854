"""Drain benchmark: many backlogged queues at 1 per second each, against a fake HubSpot.

1. A scratch database gets Q queues (policy: 1 per 1 s, window pacing) spread over P portals
   (ids 1..P) and enough pending actions per queue for the whole run, inserted directly
   with INSERT … SELECT generate_series, rows of all queues interleaved as arrivals would be.
2. bench/fake_server.py runs throttled's FakeHubSpot in its own process (HubSpot's per-portal
   limit of 110 requests per 10 s enforced); bench/wiretap.py captures the requests sent to
   it on lo with kernel timestamps (needs root or CAP_NET_RAW; without it the window check
   falls back to the fake's stamps, and says so); `throttled portals connect` stores a
   refresh token for each portal.
3. `throttled serve` (hubspot.api_base_url = the fake) drains for --duration seconds. Every
   --probe-interval a signed action goes to a fresh, idle queue over HTTP; its first-send
   latency is the time from the daemon's 200 answer to the fake's arrival of its callback.
4. SIGTERM to the daemon, then to the wiretap and the fake, which dump their logs.

Printed: callbacks/s over the steady part (after --warmup, before the stop); window
violations (backlog queues with more than 1 send in some half-open 1 s window, retries and
rejected requests included) at the wire, from the kernel timestamp of each request's first
segment (the figure in the summary), then the same check at the fake's handler (stamped when
its event loop reads the request's first bytes, so off by its loop lag: a few ms on a busy
machine, enough to see sends 1.002 s apart as 0.999 s) and on the daemon's own send instants
(the rows' sent_at); callbacks on the wire against the fake's log, the delay from sent_at to
the wire and to the fake, and each request's fake stamp against its wire stamp; each queue's
achieved share of its limit, the daemon's CPU seconds per 1,000 callbacks
(/proc/<pid>/stat), the idle-queue first-send latency broken down with the probe rows' own
timestamps, claim statements per second (distinct claimed_at: each claim statement stamps
its rows with its own unique stamp), the per-portal request peak, the daemon's /healthz latency
(event-loop stalls), whether the graceful stop left rows 'claimed', and the daemon's RSS
(VmRSS, /proc/<pid>/status) at the end of the steady window.

--instances N runs N `throttled serve` processes on the same database (own port, config file,
log); the probes go to each in turn, the window checks merge every process's sends (all reach
the same fake), the CPU figure is their sum.

5. The baseline: bench/bare_drainer.py (claim, post, mark done, nothing else, paced at 100
   requests per 10 s per portal) drains a fresh backlog in a second scratch database against
   a fresh fake with the same limit for --bare-duration seconds; printed: its callbacks/s,
   CPU per 1,000 callbacks and RSS, and the daemon's CPU per callback over the bare drainer's.

The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import harness
from harness import fmt_ms, percentile, phase
from wiretap import EXIT_NO_CAPTURE

from throttled.hubspot.fake import max_in_window
from throttled.hubspot.signature import sign_headers
from throttled.rates import RatePolicy

ACTION_ID = 7
ACTION_PATH = "/api/hubspot/action"
PROBE_WORKFLOW_BASE = 900_000_000
CLIENT_ID = "bench-client-id"


# Presets: (queues, portals). 1/s per queue over P portals is Q/P callbacks/s per portal,
# against the daemon's 100 requests x 100 callbacks per 10 s (1,000/s) and HubSpot's 110
# (1,100/s): 20k over 40 portals is 500/s each (40 portals allow ~44,000 callbacks/s).
SCALES = {"10k": (10_000, 20), "20k": (20_000, 40)}
BARE_PORTAL_RATE = 100 * 100 / 10  # callbacks/s per portal: 100 requests of 100 per 10 s


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short smoke run (10 s of draining)")
    p.add_argument("--duration", type=float, help="seconds of draining (default 60)")
    p.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default="10k",
        help="preset: 10k = 10,000 queues over 20 portals (default), 20k = 20,000 over 40",
    )
    p.add_argument("--queues", type=int, help="backlogged queues (default: the preset's)")
    p.add_argument("--portals", type=int, help="portals, ids 1..P (default: the preset's)")
    p.add_argument(
        "--instances", type=int, default=1, help="`throttled serve` processes on the database"
    )
    p.add_argument(
        "--rows-per-queue", type=int, help="backlog per queue (default: duration x 1.2 + 10)"
    )
    p.add_argument("--warmup", type=float, help="seconds left out at the start of the rate")
    p.add_argument("--probe-interval", type=float, default=0.2, help="idle-queue probe period")
    p.add_argument(
        "--fake-budget", default="110/10", help="fake's per-portal limit, requests/s ('none')"
    )
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        help="event loop of the bare drainer and of the daemon (server.event_loop); "
        "default: asyncio for the bare drainer, the daemon's own default (asyncio)",
    )
    p.add_argument("--no-bare", action="store_true", help="skip the bare drainer's phase")
    p.add_argument(
        "--bare-duration", type=float, help="seconds of the bare drainer (default 6 quick, 20)"
    )
    p.add_argument("--bare-tick-ms", type=float, default=5.0, help="the bare drainer's step")
    harness.add_common_args(p)
    args = p.parse_args()
    queues, portals = SCALES[args.scale]
    args.queues = args.queues or queues
    args.portals = args.portals or portals
    if args.instances < 1:
        p.error("--instances must be at least 1")
    if args.loop == "uvloop" and not args.no_bare and importlib.util.find_spec("uvloop") is None:
        p.error("--loop uvloop: uvloop is not installed (the bare drainer needs it)")
    args.duration = args.duration or (10.0 if args.quick else 60.0)
    args.rows_per_queue = args.rows_per_queue or math.ceil(args.duration * 1.2) + 10
    if args.warmup is None:
        args.warmup = min(10.0, max(3.0, args.duration * 0.15))
    args.bare_duration = args.bare_duration or (6.0 if args.quick else 20.0)
    args.bare_warmup = min(2.0, args.bare_duration * 0.2)
    # Enough for the bare drainer at its pacing's ceiling for the whole phase, and then some.
    ceiling = args.portals * BARE_PORTAL_RATE * (args.bare_duration + 2) * 1.1
    args.bare_rows_per_queue = math.ceil(ceiling / args.queues) + 1
    return args


def daemon_has_event_loop_setting() -> bool:
    """Whether throttled's config has server.event_loop (drain.py then passes --loop on)."""
    from throttled.config import ServerConfig

    return "event_loop" in {f.name for f in dataclasses.fields(ServerConfig)}


def daemon_default_event_loop() -> str:
    """The daemon's event loop when its config does not name one."""
    from throttled.config import ServerConfig

    return str(ServerConfig().event_loop)


# -- seeding ----------------------------------------------------------------------------------

SEED_QUEUES = """
INSERT INTO queues (key, portal_id, policy)
SELECT 'queue:' || ((g - 1) %% %s + 1) || ':' || g || ':' || %s || ':0',
       (g - 1) %% %s + 1, %s::jsonb
FROM generate_series(1, %s) AS g
ORDER BY g
"""

# Interleaved by arrival (n), as a backlog built by many workflows at once would be.
SEED_ACTIONS = """
INSERT INTO actions (callback_id, queue_id, portal_id, deadline, workflow_id,
                     object_type, object_id, input_fields)
SELECT 'ap-' || q.portal_id || '-' || q.id || '-' || n, q.id, q.portal_id,
       now() + interval '6 days', q.id, 'CONTACT', (q.id * 100000 + n)::text, '{}'::jsonb
FROM generate_series(1, %s) AS n CROSS JOIN queues q
ORDER BY n, q.id
"""


def seed(db: harness.ScratchDatabase, args: argparse.Namespace, rows: int) -> dict[str, Any]:
    """Insert the queues and `rows` actions each; VACUUM ANALYZE so the planner knows them."""
    policy = json.dumps(RatePolicy(limit=1, period_s=1.0, pacing="window").to_json())
    with db.connect() as conn:
        conn.execute(SEED_QUEUES, (args.portals, ACTION_ID, args.portals, policy, args.queues))
        conn.execute(SEED_ACTIONS, (rows,))
        conn.commit()
    with db.connect(autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE queues")
        conn.execute("VACUUM ANALYZE actions")
        row = conn.execute("SELECT count(*), count(DISTINCT queue_id) FROM actions").fetchone()
    return {"policy": policy, "actions": row[0] if row else 0, "queues": row[1] if row else 0}


# -- sampling while the daemon runs --------------------------------------------------------------


class Sampler:
    """Every `period` s (in a thread): CPU of the named processes and the database's backends,
    the named processes' RSS (snapshot["rss"], KiB), the database's commits."""

    def __init__(self, meter: harness.CpuMeter, pg_url: str, db: str, pids: dict[str, int]) -> None:
        self.meter = meter
        self.samples: list[tuple[float, dict[str, Any], int]] = []
        self._pids = pids
        self._stats = harness.psycopg.connect(pg_url, autocommit=True)
        self._db = db
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> None:
        """Begin sampling."""
        self._thread.start()

    def _run(self, period: float = 0.5) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(period)

    def sample(self) -> None:
        """Take one sample now."""
        row = self._stats.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self._db,)
        ).fetchone()
        snap = self.meter.snapshot(self._pids)
        snap["rss"] = {name: harness.rss_kib(pid) for name, pid in self._pids.items()}
        self.samples.append((time.time(), snap, int(row[0]) if row else 0))

    def stop(self) -> None:
        """Stop sampling (one last sample is taken)."""
        self._stop.set()
        self._thread.join(5)
        self._stats.close()

    def rss(self, names: Iterable[str], start: float, end: float) -> dict[str, tuple[int, int]]:
        """Each named process's RSS (KiB) in the sample nearest `end`, and its peak over the
        samples between start and end."""
        near = self.at(end)
        inside = [s[1]["rss"] for s in self.samples if start <= s[0] <= end] or (
            [near[0]["rss"]] if near else []
        )
        out = {}
        for name in names:
            now = (near[0]["rss"].get(name) or 0) if near else 0
            out[name] = (now, max(now, *(r.get(name) or 0 for r in inside)))
        return out

    def at(self, t: float) -> tuple[dict[str, Any], int, float] | None:
        """The sample nearest to wall time t: (snapshot, commits, its wall time)."""
        if not self.samples:
            return None
        nearest = min(self.samples, key=lambda s: abs(s[0] - t))
        return nearest[1], nearest[2], nearest[0]


# -- idle-queue probes ---------------------------------------------------------------------------


async def probe(
    base_urls: Sequence[str], secret: str, args: argparse.Namespace, stop_at: float
) -> list[dict[str, Any]]:
    """Every probe_interval, one signed action to a fresh idle queue (to each instance in
    turn, each signed for its own URL); record the 200's time."""
    results: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(session: aiohttp.ClientSession, k: int) -> None:
        url = base_urls[k % len(base_urls)] + ACTION_PATH
        portal = 1 + k % args.portals
        cid = f"ap-{portal}-idle{k}-0"
        body = json.dumps(
            {
                "callbackId": cid,
                "origin": {"portalId": portal, "actionDefinitionId": ACTION_ID},
                "context": {"source": "WORKFLOWS", "workflowId": PROBE_WORKFLOW_BASE + k},
                "object": {"objectId": k, "objectType": "CONTACT"},
                "inputFields": {},
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        headers.update(sign_headers(secret, "POST", url, body, version="v2"))
        sent = time.time()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                answered = time.time()
                results.append({"cid": cid, "status": resp.status, "sent": sent, "at": answered})
        except (aiohttp.ClientError, TimeoutError) as exc:
            results.append({"cid": cid, "status": type(exc).__name__, "sent": sent, "at": None})

    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        k = 0
        t0 = time.monotonic()
        while time.time() < stop_at:
            tasks.append(asyncio.create_task(one(session, k)))
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * args.probe_interval - time.monotonic()))
        await asyncio.gather(*tasks)
    return results


async def poll_health(base_url: str, stop_at: float, period: float = 0.05) -> list[float]:
    """GET /healthz every `period` s; its latency shows the daemon's event-loop stalls."""
    lat: list[float] = []
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.time() < stop_at:
            t = time.monotonic()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(base_url + "/healthz") as resp:
                    await resp.read()
                    lat.append(time.monotonic() - t)
            await asyncio.sleep(max(0.0, period - (time.monotonic() - t)))
    return lat


async def during_run(
    base_urls: Sequence[str], secret: str, args: argparse.Namespace, stop_at: float
) -> tuple[list[dict[str, Any]], list[float]]:
    """Probes and a health poller per instance, side by side (their latencies merged)."""
    probes, *health = await asyncio.gather(
        probe(base_urls, secret, args, stop_at), *(poll_health(u, stop_at) for u in base_urls)
    )
    return probes, [x for h in health for x in h]


# -- the window check ----------------------------------------------------------------------------


def backlog_sends(requests: Iterable[tuple[float, Sequence[str]]]) -> dict[str, list[float]]:
    """Each backlog queue's send instants (idle-queue probes left out), from (at, callbackIds)."""
    sends: dict[str, list[float]] = defaultdict(list)
    for at, cids in requests:
        for cid in cids:
            if "-idle" not in cid:
                sends[cid.rsplit("-", 1)[0]].append(at)
    return sends


def print_violations(label: str, source: str, sends: dict[str, list[float]]) -> int:
    """Print and return how many queues have more than 1 send in some half-open 1 s window."""
    violations = [q for q, t in sends.items() if max_in_window(t, 1.0) > 1]
    gaps = [y - x for t in sends.values() for x, y in itertools.pairwise(sorted(t))]
    print(
        f"  {label:<20}: {len(violations)} queue(s); smallest gap between a queue's sends "
        f"{min(gaps, default=math.nan):.4f} s, p0.1 {percentile(gaps, 0.1):.4f} s ({source})"
    )
    for q in violations[:5]:
        t = sorted(sends[q])
        close = [f"{y - x:.4f}" for x, y in itertools.pairwise(t) if y - x < 1.0]
        print(f"    {q}: gaps < 1 s: {', '.join(close[:5])}")
    return len(violations)


def by_send(requests: Iterable[tuple[float, Sequence[str]]]) -> dict[tuple[str, int], float]:
    """Request instants keyed by (first callbackId, times that id led a request before): the
    same request gets the same key in the wire's log and the fake's."""
    seen: Counter[str] = Counter()
    out: dict[tuple[str, int], float] = {}
    for at, cids in requests:
        if cids:
            out[cids[0], seen[cids[0]]] = at
            seen[cids[0]] += 1
    return out


# -- the benchmark -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Instance:
    """One `throttled serve` process: its name in the CPU figures, port, config, log."""

    name: str
    port: int
    config: Path
    log: Path
    profile: Path | None

    @property
    def base_url(self) -> str:
        """Where it listens (and its server.public_url)."""
        return f"http://127.0.0.1:{self.port}"


def steady_window(
    done_at: list[tuple[float, int]], warmup: float, stopped_at: float
) -> dict[str, Any]:
    """The steady part of a phase: after the warm-up, up to 0.5 s before the stop, a whole
    number of seconds (so that every queue's once-a-second burst counts the same number of
    times); its callbacks/s and per-second counts. length < 1: too short for one."""
    first = min((at for at, _ in done_at), default=math.nan)
    start = first + warmup
    length = math.floor(stopped_at - 0.5 - start) if not math.isnan(first) else 0
    out: dict[str, Any] = {"first": first, "start": start, "end": start, "length": length}
    out.update(rate=math.nan, buckets=[])
    if length >= 1:
        end = start + length
        in_window = sum(n for at, n in done_at if start <= at < end)
        per_s = Counter(math.floor(at - start) for at, n in done_at for _ in range(n))
        out.update(end=end, rate=in_window / length)
        out["buckets"] = [per_s.get(i, 0) for i in range(length)]
    return out


def cpu_between(
    sampler: Sampler, start: float, end: float, done_at: list[tuple[float, int]]
) -> tuple[dict[str, float], int] | None:
    """CPU seconds by name between the samples nearest start and end (plus "commits", the
    database's), and the callbacks completed between those samples' own wall times."""
    a, b = sampler.at(start), sampler.at(end)
    if a is None or b is None or end <= start or b[2] <= a[2]:
        return None
    d = harness.CpuMeter.delta(a[0], b[0])
    d["commits"] = b[1] - a[1]
    return d, sum(k for at, k in done_at if a[2] <= at < b[2])


def mib(kib: float) -> str:
    """KiB as MiB text."""
    return f"{kib / 1024:,.1f} MiB"


class DrainBench(harness.Bench):
    """One run of the drain benchmark."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, "drain")
        self.fake_out = self.tmp / "fake-log.json"
        self.wire_out = self.tmp / "wire.json"
        self.wiretap: subprocess.Popen[bytes] | None = None
        self.wire_note = ""  # why the wiretap is unavailable, if it is
        self.sampler: Sampler | None = None
        self.encryption_key = base64.b64encode(secrets.token_bytes(32)).decode()
        self.instances = [Instance("daemon", self.port, self.config, self.daemon_log, self.profile)]
        if args.instances > 1:
            self.instances = [
                Instance(
                    f"daemon{n}",
                    self.port if n == 1 else harness.free_port(),
                    self.config if n == 1 else self.tmp / f"throttled-{n}.toml",
                    self.daemon_log if n == 1 else self.tmp / f"daemon-{n}.log",
                    None if self.profile is None else self.tmp / f"daemon-{n}.prof",
                )
                for n in range(1, args.instances + 1)
            ]
            self.profile = self.instances[0].profile
        self.daemon_loop = bool(args.loop) and daemon_has_event_loop_setting()
        self.bare_db = harness.ScratchDatabase(args.pg_url, f"{self.db.name}_bare")
        self.bare_sampler: Sampler | None = None
        self.bare_meter: harness.CpuMeter | None = None

    def run(self) -> str:
        """The whole benchmark; returns the summary line."""
        a = self.args
        print(f"drain benchmark: temp dir {self.tmp}, database {self.db.name}")
        per_portal = a.queues / a.portals
        print(
            f"{a.queues:,} queues at 1/s (window) over {a.portals} portals (--scale {a.scale}"
            f"{', overridden' if SCALES[a.scale] != (a.queues, a.portals) else ''}: "
            f"{per_portal:,.0f} callbacks/s per portal; HubSpot allows 1,100, the daemon's "
            f"budget 1,000), {a.duration:g} s, {a.rows_per_queue} rows per queue; "
            f"{a.instances} daemon instance(s); probe every {a.probe_interval:g} s; fake HubSpot "
            f"per-portal limit {a.fake_budget}; cpus: {os.cpu_count()}"
        )
        if per_portal > 1000:
            print("!! more than 1,000 callbacks/s per portal: the daemon's portal budget caps it")
        print(f"event loop: {self._loop_note()}")
        self.fake, fake_url = self._start_fake("fake", self.fake_out)
        self._start_wiretap(urlsplit(fake_url).port or 0)
        with phase("scratch database + migrate"):
            self.db.create()
            self._write_config(fake_url)
            out = harness.run_cli(["migrate", "--config", str(self.config)], harness.child_env())
            print("   " + out.strip())
        with phase("seeding the backlog"):
            seeded = seed(self.db, a, a.rows_per_queue)
            print(f"   {seeded['actions']:,} actions in {seeded['queues']:,} queues")
            print(f"   policy {seeded['policy']}")
        with phase(f"connecting {a.portals} portals (throttled portals connect)"):
            self._connect_portals()
        run = self._drain()
        figures = self._report(run)
        bare = None if a.no_bare else self._bare_phase(figures)
        if a.keep:
            print(f"kept {self.tmp}")
        return self._summary(figures, bare)

    def _loop_note(self) -> str:
        """Which event loop the daemon and the bare drainer run on."""
        loop = self.args.loop or "asyncio"
        if not daemon_has_event_loop_setting():
            return (
                f"bare drainer {loop}, daemon asyncio (throttled's config has no "
                "server.event_loop setting: --loop reaches the bare drainer only)"
            )
        if self.daemon_loop:
            return f"{loop} for both (daemon: server.event_loop = {loop!r})"
        default = daemon_default_event_loop()
        return f"bare drainer asyncio, daemon {default} (its server.event_loop default)"

    def _start_fake(self, name: str, out: Path) -> tuple[subprocess.Popen[bytes], str]:
        """fake_server.py with HubSpot's per-portal limit (--fake-budget); its base URL."""
        ready = self.tmp / f"{name}.url"
        argv = [
            harness.PYTHON, str(harness.BENCH / "fake_server.py"),
            "--client-id", CLIENT_ID, "--client-secret", self.secret,
            "--portal-budget", self.args.fake_budget,
            "--ready-file", str(ready), "--out", str(out),
        ]  # fmt: skip
        log = self.tmp / f"{name}.log"
        proc = self.children.start(name, argv, env=harness.child_env(), stderr=log)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake HubSpot did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        url = ready.read_text().strip()
        print(f"fake HubSpot at {url} (pid {proc.pid})")
        return proc, url

    def _start_wiretap(self, port: int) -> None:
        """Capture the requests to the fake on lo (wiretap.py); on failure, say so and go on."""
        ready = self.tmp / "wiretap.ready"
        log = self.tmp / "wiretap.log"
        argv = [
            harness.PYTHON, str(harness.BENCH / "wiretap.py"), "--port", str(port),
            "--out", str(self.wire_out), "--ready-file", str(ready),
        ]  # fmt: skip
        proc = self.children.start("wiretap", argv, env=harness.child_env(), stderr=log)
        deadline = time.monotonic() + 30
        while not ready.exists():
            code = proc.poll()
            if code is not None or time.monotonic() > deadline:
                self.children.stop(proc)
                kind = {EXIT_NO_CAPTURE: "no capture permission", None: "not ready in 30 s"}
                self.wire_note = f"wiretap unavailable, {kind.get(code, f'exit code {code}')}"
                print(
                    f"!! {self.wire_note} ({log.read_text().strip()[-300:] or 'no message'}); "
                    "the window check falls back to the fake's stamps"
                )
                return
            time.sleep(0.05)
        self.wiretap = proc
        print(f"wiretap on lo, tcp dst port {port} (pid {proc.pid})")

    def _stop_wiretap(self) -> dict[str, Any] | None:
        """SIGTERM the wiretap and load its dump (None, with wire_note set, if there is none)."""
        assert self.wiretap is not None
        code = self.children.stop(self.wiretap, timeout=60)
        if code != 0 or not self.wire_out.exists():
            self.wire_note = f"wiretap failed, exit code {code}"
            tail = (self.tmp / "wiretap.log").read_text().strip()[-300:] or "no message"
            print(f"!! {self.wire_note} ({tail}); the window check falls back to the fake's stamps")
            return None
        wire: dict[str, Any] = json.loads(self.wire_out.read_text())
        print(
            f"   {len(wire['requests']):,} callback requests and {wire['other_requests']} others "
            f"captured; {wire['packets']:,} packets, {wire['drops']} dropped by the kernel, "
            f"{wire['stream_gaps']} stream gaps, {wire['unparsed']} unparsed, "
            f"{wire['truncated']} truncated"
        )
        return wire

    def _config_sections(self, inst: Instance, fake_url: str, db_url: str) -> dict[str, Any]:
        """A daemon config: its own port, public URL and data dir; the shared database,
        fake HubSpot, secrets and key; --loop if the config knows server.event_loop."""
        server: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": inst.port,
            "public_url": inst.base_url,
            "shutdown_timeout_s": 20.0,
        }
        if self.daemon_loop:
            server["event_loop"] = self.args.loop
        return harness.merged(
            {
                "server": server,
                "database": {"url": db_url, "data_dir": str(self.tmp / f"var-{inst.name}")},
                "hubspot": {
                    "mock": False,
                    "client_id": CLIENT_ID,
                    "client_secret": self.secret,
                    "api_base_url": fake_url,
                    "auth_base_url": fake_url,
                },
                "security": {"encryption_key": self.encryption_key},
                "logging": {"level": "warning", "format": "json"},
            },
            harness.config_overrides(self.args.daemon_config),
        )

    def _write_config(self, fake_url: str) -> None:
        """One config file per instance, all on the scratch database."""
        for inst in self.instances:
            harness.write_config(inst.config, self._config_sections(inst, fake_url, self.db.url))

    def _connect_portals(self, parallel: int = 4) -> None:
        env = harness.child_env()
        pending = list(range(1, self.args.portals + 1))
        running: list[tuple[int, subprocess.Popen[bytes]]] = []
        while pending or running:
            while pending and len(running) < parallel:
                portal = pending.pop(0)
                argv = [
                    str(harness.THROTTLED), "portals", "connect", "--portal-id", str(portal),
                    "--refresh-token", f"mock-refresh-{portal}", "--config", str(self.config),
                ]  # fmt: skip
                running.append((portal, self.children.start(f"connect-{portal}", argv, env=env)))
            portal, proc = running.pop(0)
            if proc.wait(60) != 0:
                raise RuntimeError(f"throttled portals connect --portal-id {portal} failed")

    def _drain(self) -> dict[str, Any]:
        a = self.args
        procs = [
            self.children.start(
                inst.name,
                harness.serve_argv(inst.config, inst.profile),
                env=harness.child_env(),
                stderr=inst.log,
            )
            for inst in self.instances
        ]  # all started at once, then waited for
        for inst, proc in zip(self.instances, procs, strict=True):
            harness.wait_http(inst.base_url + "/readyz", proc, 60, inst.log)
        ready_at = time.time()
        self.meter = harness.CpuMeter(a.pg_url, self.db.name)
        daemons = {inst.name: proc.pid for inst, proc in zip(self.instances, procs, strict=True)}
        pids = {**daemons, "fake": self.fake.pid, "bench": os.getpid()}
        if self.wiretap is not None:
            pids["wiretap"] = self.wiretap.pid
        self.sampler = Sampler(self.meter, a.pg_url, self.db.name, pids)
        self.sampler.start()
        urls = [inst.base_url for inst in self.instances]
        which = ", ".join(f"{name} pid {pid}" for name, pid in daemons.items())
        with phase(f"draining for {a.duration:g} s ({which})"):
            stop_at = ready_at + a.duration
            probes, health = asyncio.run(during_run(urls, self.secret, a, stop_at))
            time.sleep(max(0.0, stop_at - time.time()))
            self.sampler.sample()
            metrics = harness.http_get(self.base_url + "/metrics")
        with phase(f"stopping the daemon{'s' if len(procs) > 1 else ''} (SIGTERM)"):
            stopped_at = time.time()
            with ThreadPoolExecutor(len(procs)) as pool:  # side by side, each timed out alone
                codes = list(pool.map(lambda p: self.children.stop(p, timeout=40), procs))
            stop_s = time.time() - stopped_at
            exit_code: Any = codes[0] if len(codes) == 1 else codes
            print(f"   exit code {exit_code} after {stop_s:.1f} s")
        self.sampler.stop()
        wire = None
        if self.wiretap is not None:
            with phase("stopping the wiretap (dumps its capture)"):
                wire = self._stop_wiretap()
        with phase("stopping the fake HubSpot (dumps its receive log)"):
            self.children.stop(self.fake, timeout=60)
            fake = json.loads(self.fake_out.read_text())
            print(f"   {len(fake['requests']):,} requests received")
        return {
            "ready_at": ready_at,
            "stopped_at": stopped_at,
            "exit_code": exit_code,
            "stop_s": stop_s,
            "probes": probes,
            "health": health,
            "fake": fake,
            "wire": wire,
            "metrics": metrics,
        }

    def _report(self, run: dict[str, Any]) -> dict[str, Any]:
        """Print the daemon phase's figures; return what the summary and the baseline use."""
        a = self.args
        requests = run["fake"]["requests"]
        status = Counter(str(r[2]) for r in requests)
        done_at: list[tuple[float, int]] = []
        completed: Counter[str] = Counter()
        per_portal: dict[int, list[float]] = defaultdict(list)
        probe_arrival: dict[str, float] = {}
        for at, portal, code, cids in requests:
            per_portal[portal or 0].append(at)
            backlog = 0
            for cid in cids:
                if code == 204:
                    completed[cid] += 1
                    if "-idle" in cid:
                        probe_arrival.setdefault(cid, at)
                    else:
                        backlog += 1
            if backlog:
                done_at.append((at, backlog))
        # Every send counts for the window check, retries and rejected requests included.
        backlog_queues = backlog_sends((r[0], r[3]) for r in requests)
        duplicates = sum(1 for n in completed.values() if n > 1)

        print("\n== drain results ==")
        steady = steady_window(done_at, a.warmup, run["stopped_at"])
        start, end, length = steady["start"], steady["end"], steady["length"]
        rate, buckets = steady["rate"], steady["buckets"]
        if length >= 1:
            print(
                f"first callback {steady['first'] - run['ready_at']:.2f} s after the "
                f"{'last daemon' if a.instances > 1 else 'daemon'} was ready; steady window "
                f"{length} s from +{start - run['ready_at']:.1f} s"
            )
        else:
            print("!! run too short for a steady window (raise --duration or lower --warmup)")
        target = 0.98 * a.queues
        total_done = sum(n for _, n in done_at)
        print(f"callbacks/s (steady)  : {rate:,.0f}  (ideal {a.queues:,}; target >= {target:,.0f})")
        if buckets:
            print(
                f"  per second          : min {min(buckets):,}  median "
                f"{statistics.median(buckets):,.0f}  max {max(buckets):,}"
            )
        print(
            f"  whole run           : {total_done:,} backlog callbacks completed, "
            f"{duplicates} completed twice"
        )
        counted = [len(t) for q, t in backlog_queues.items()]
        print(
            f"  queues served       : {len(backlog_queues):,} of {a.queues:,}; sends per queue "
            f"min {min(counted, default=0)} max {max(counted, default=0)}"
        )
        print(
            "window violations     : queues with > 1 send in some 1 s window (must be 0; every "
            "request sent counts, retries and rejected ones included)"
        )
        wire = run["wire"]
        if wire is not None:
            violations = print_violations(
                "at the wire",
                "kernel timestamps of the request's first segment",
                backlog_sends(wire["requests"]),
            )
            source = f"at the wire, {wire['drops']} packets dropped by the capture"
        else:
            print(f"  at the wire         : n/a, {self.wire_note}")
        fake_violations = print_violations(
            "at the fake",
            "at the fake's handler: stamped by its event loop; jitter = its loop lag",
            backlog_queues,
        )
        if wire is None:
            violations, source = fake_violations, f"at the fake: {self.wire_note}"
        self._send_side(requests, wire, run["stopped_at"])
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(status.items()))
        peak = {p: max_in_window(t, 10.0) for p, t in per_portal.items()}
        print(
            f"fake HubSpot requests : {len(requests):,} ({codes}); busiest portal "
            f"{max(peak.values(), default=0)} requests in a 10 s window (daemon budget 100, "
            f"HubSpot 110); token requests {run['fake']['token_requests']}"
        )
        cpu = self._cpu(start, end, done_at)
        rss = self._rss(start, end)
        probes = self._probes(run["probes"], probe_arrival, run["ready_at"])
        health = run["health"]
        lag = run["fake"].get("loop_lag", {})
        hd = run["fake"].get("handler_delay", {})
        print(
            f"daemon responsiveness : GET /healthz every 50 ms, latency p50 "
            f"{fmt_ms(percentile(health, 50))}, p99 {fmt_ms(percentile(health, 99))}, max "
            f"{fmt_ms(max(health, default=math.nan))} ({len(health)} polls)"
        )
        print(
            f"fake's own loop lag   : p50 {fmt_ms(lag.get('p50', math.nan))}, p99 "
            f"{fmt_ms(lag.get('p99', math.nan))}, max {fmt_ms(lag.get('max', math.nan))} "
            "(bounds how late it can stamp an arrival)"
        )
        print(
            f"fake's handler delay  : first bytes -> handler start p50 "
            f"{fmt_ms(hd.get('p50', math.nan))}, p99 {fmt_ms(hd.get('p99', math.nan))}, max "
            f"{fmt_ms(hd.get('max', math.nan))} (arrivals are stamped at the first bytes)"
        )
        claims = self._claims(start, end)
        print(
            f"daemon stopped with exit code {run['exit_code']} in {run['stop_s']:.1f} s; "
            f"rows by state after the stop: {claims['states']}"
        )
        bad = 0
        for inst in self.instances:
            title = "daemon log" + (f" of {inst.name}" if len(self.instances) > 1 else "")
            bad += harness.print_log_events(inst.log, title + " (level >= warning)")
        if self.profile is not None:
            harness.print_profile(self.profile)
            print("!! --profile: the daemon ran under cProfile; its figures above are not valid")
        return {
            "rate": rate,
            "target": target,
            "violations": violations,
            "source": source,
            "cpu": cpu,
            "rss": rss,
            "probes": probes,
            "claims": claims,
            "non_2xx": sum(v for k, v in status.items() if k != "204"),
            "log_warnings": bad,
        }

    def _summary(self, f: dict[str, Any], bare: dict[str, Any] | None) -> str:
        """The one-line SUMMARY."""
        a = self.args
        rss = "+".join(mib(now) for now, _ in f["rss"].values()).replace(" MiB", "") + " MiB"
        instances = f"{a.instances} instances, " if a.instances > 1 else ""
        if bare is None:
            baseline = "bare drainer not run" if a.no_bare else "bare drainer failed"
        else:
            baseline = (
                f"daemon/bare CPU per callback {bare['ratio']:.2f}x (bare drainer "
                f"{bare['cpu']:.3f} s per 1,000 at {bare['rate']:,.0f} callbacks/s, "
                f"{bare['loop']}, paced <= 100 requests/10 s per portal)"
            )
        probes, claims = f["probes"], f["claims"]
        return (
            f"SUMMARY drain: {f['rate']:,.0f} callbacks/s steady (target >= {f['target']:,.0f}, "
            f"{instances}{a.queues:,} queues x 1/s, {a.portals} portals); window violations "
            f"{f['violations']} (must be 0; {f['source']}); daemon CPU {f['cpu']:.3f} s per "
            f"1,000 callbacks; {baseline}; daemon RSS {rss}; idle first-send p99 "
            f"{fmt_ms(probes['p99'])} (target < 100 ms, {probes['n']} probes, "
            f"{probes['missing']} missing); claim statements {claims['per_s']:.1f}/s; "
            f"non-2xx from fake {f['non_2xx']}; daemon log warnings+ {f['log_warnings']}"
        )

    def _send_side(
        self, requests: list[list[Any]], wire: dict[str, Any] | None, stopped_at: float
    ) -> None:
        """The same check on the daemon's own send instants (sent_at); the wire against the
        fake's log and sent_at; the delivery delay to the fake.

        A gap under 1 s at the fake but not on the wire is the fake's own event-loop lag, not an
        early send.
        """
        with self.db.connect() as conn:
            gaps = conn.execute(
                "SELECT count(DISTINCT queue_id) FILTER (WHERE gap < interval '1 second'), "
                "extract(epoch FROM min(gap)), extract(epoch FROM avg(gap)), "
                "percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM gap))"
                " FROM (SELECT queue_id, sent_at - lag(sent_at) "
                "OVER (PARTITION BY queue_id ORDER BY sent_at) AS gap FROM actions "
                "WHERE sent_at IS NOT NULL AND callback_id NOT LIKE '%%-idle%%') s"
            ).fetchone()
            sent = dict(
                conn.execute(
                    "SELECT callback_id, extract(epoch FROM sent_at)::float8 FROM actions "
                    "WHERE sent_at IS NOT NULL"
                ).fetchall()
            )
            left = conn.execute(
                "SELECT count(*), extract(epoch FROM min(claimed_at))::float8, "
                "extract(epoch FROM max(claimed_at))::float8 FROM actions "
                "WHERE state = 'claimed'"
            ).fetchone()
        delays = [at - sent[c] for at, _, _, cids in requests for c in cids if c in sent]
        bad, min_gap, mean_gap, pcts = gaps if gaps else (0, None, None, None)
        p50, p99 = pcts if pcts else (math.nan, math.nan)
        mean = float(mean_gap or math.nan)
        print(
            f"  at the daemon       : {bad} queue(s) with a gap < 1 s between the sent_at of "
            f"their rows (min gap {float(min_gap or math.nan):.6f} s)"
        )
        print(
            f"  send interval       : a queue's consecutive sends (sent_at) are {mean:.4f} s apart"
            f" on average (p50 {p50:.4f}, p99 {p99:.4f}): each queue runs at "
            f"{100 / mean:.1f}% of its 1/s limit"
        )
        if wire is not None:
            self._wire_side(wire, requests, sent)
        print(
            f"  delivery delay      : fake arrival - daemon sent_at p50 "
            f"{fmt_ms(percentile(delays, 50))}, p99 {fmt_ms(percentile(delays, 99))}, max "
            f"{fmt_ms(max(delays, default=math.nan))}"
        )
        if left and left[0]:
            print(
                f"!! rows still 'claimed' after the graceful stop: {left[0]:,}, claimed "
                f"{left[1] - stopped_at:+.3f} s to {left[2] - stopped_at:+.3f} s from SIGTERM"
            )

    def _wire_side(
        self, wire: dict[str, Any], requests: list[list[Any]], sent: dict[str, float]
    ) -> None:
        """Cross-checks: callbacks on the wire against the fake's log, and against sent_at."""
        n_wire = sum(len(cids) for _, cids in wire["requests"])
        n_fake = sum(len(r[3]) for r in requests)
        print(
            f"  wire vs fake        : {n_wire:,} callbacks in {len(wire['requests']):,} requests "
            f"on the wire, {n_fake:,} in {len(requests):,} received by the fake (difference "
            f"{n_wire - n_fake:+,}); other requests on the wire {wire['other_requests']}"
        )
        last = {c: at for at, cids in wire["requests"] for c in cids}  # sent_at is the last send
        delay = [at - sent[c] for c, at in last.items() if c in sent]
        print(
            f"  wire - sent_at      : first segment on the wire - daemon sent_at p50 "
            f"{fmt_ms(percentile(delay, 50))}, p99 {fmt_ms(percentile(delay, 99))}, max "
            f"{fmt_ms(max(delay, default=math.nan))}, min {fmt_ms(min(delay, default=math.nan))}"
            f" ({len(delay):,} callbacks; sent_at is the send instant + sender.send_margin_ms)"
        )
        at_wire = by_send(wire["requests"])
        at_fake = by_send((r[0], r[3]) for r in requests)
        lag = [at_fake[k] - at_wire[k] for k in at_fake.keys() & at_wire.keys()]
        print(
            f"  fake - wire         : the fake's arrival stamp - the wire's, per request, p50 "
            f"{fmt_ms(percentile(lag, 50))}, p99 {fmt_ms(percentile(lag, 99))}, max "
            f"{fmt_ms(max(lag, default=math.nan))}, min {fmt_ms(min(lag, default=math.nan))} "
            f"({len(lag):,} requests matched)"
        )

    def _cpu(self, start: float, end: float, done_at: list[tuple[float, int]]) -> float:
        """Daemon (and backend) CPU per 1,000 callbacks over the steady window; with several
        instances, 'daemon' is the sum of their processes."""
        assert self.sampler is not None
        got = cpu_between(self.sampler, start, end, done_at)
        if got is None:
            print("daemon CPU            : n/a")
            return math.nan
        d, n = got
        names = [inst.name for inst in self.instances]
        d["daemon"] = sum(d[name] for name in names)
        per_k = d["daemon"] / max(1, n) * 1000
        each = ""
        if len(names) > 1:
            each = " = " + " + ".join(f"{name} {d[name] / d['wall']:.2f}" for name in names)
        print(
            f"daemon CPU            : {per_k:.3f} s per 1,000 callbacks "
            f"({d['daemon'] / d['wall']:.2f} cores{each}); PostgreSQL backends "
            f"{d['postgres'] / max(1, n) * 1000:.3f} s per 1,000 "
            f"({d['postgres'] / d['wall']:.2f} cores); machine "
            f"{d['machine'] / d['wall']:.2f} of {os.cpu_count()} cores busy"
        )
        print(
            "  cores busy          : "
            + harness.cpu_text(
                d, [*names, *(k for k in ("postgres", "fake", "wiretap", "bench") if k in d)]
            )
            + "; 'other' is PostgreSQL's background processes, the kernel and anything else "
            "running on this machine"
        )
        commits = (d["commits"]) / d["wall"] if d["wall"] else math.nan
        self.commits_per_s = commits
        return per_k

    def _rss(self, start: float, end: float) -> dict[str, tuple[int, int]]:
        """Each daemon process's RSS at the end of the steady window, and its peak in it."""
        assert self.sampler is not None
        rss = self.sampler.rss([inst.name for inst in self.instances], start, end)
        text = ", ".join(
            f"{name} {mib(now)} (peak {mib(peak)})"
            if len(rss) > 1
            else f"{mib(now)} (peak {mib(peak)})"
            for name, (now, peak) in rss.items()
        )
        print(
            f"daemon RSS            : {text} at the end of the steady window (VmRSS, "
            f"/proc/<pid>/status; {self.args.queues:,} active queues)"
        )
        return rss

    def _probes(
        self, probes: list[dict[str, Any]], arrivals: dict[str, float], ready_at: float
    ) -> dict[str, Any]:
        """First-send latency of the idle-queue probes."""
        answered = [p for p in probes if p["status"] == 200]
        lat = [arrivals[p["cid"]] - p["at"] for p in answered if p["cid"] in arrivals]
        slow = sum(1 for x in lat if x >= 0.1)
        missing = len(answered) - len(lat)
        other = Counter(str(p["status"]) for p in probes if p["status"] != 200)
        answer = [p["at"] - p["sent"] for p in answered]
        print(
            f"idle first-send       : {len(lat)} probes, p50 {fmt_ms(percentile(lat, 50))}, "
            f"p99 {fmt_ms(percentile(lat, 99))}, max {fmt_ms(max(lat, default=math.nan))} "
            f"(target p99 < 100 ms), {slow} at or over 100 ms; {missing} answered but not "
            "received by the fake before the stop; "
            f"non-200 answers {dict(other) or 'none'}; intake answer p99 "
            f"{fmt_ms(percentile(answer, 99))}"
        )
        slowest = sorted(
            (
                (arrivals[p["cid"]] - p["at"], p["sent"] - ready_at)
                for p in answered
                if p["cid"] in arrivals
            ),
            reverse=True,
        )[:5]
        print(
            "  slowest probes       : "
            + ", ".join(f"{fmt_ms(x)} (sent at +{t:.1f} s)" for x, t in slowest)
            + f"; p90 {fmt_ms(percentile(lat, 90))}, p95 {fmt_ms(percentile(lat, 95))}"
        )
        self._probe_segments(answered, arrivals)
        return {"p99": percentile(lat, 99), "n": len(lat), "missing": missing}

    def _probe_segments(self, answered: list[dict[str, Any]], arrivals: dict[str, float]) -> None:
        """Where a probe's time goes, from the row's own timestamps (same machine clock)."""
        with self.db.connect() as conn:
            rows = conn.execute(
                "SELECT a.callback_id, a.state, extract(epoch FROM a.received_at)::float8, "
                "extract(epoch FROM a.claimed_at)::float8, extract(epoch FROM a.sent_at)::float8,"
                " (SELECT count(*) FROM actions b WHERE b.claimed_at = a.claimed_at) "
                "FROM actions a WHERE a.callback_id LIKE %s",
                ("%-idle%",),
            ).fetchall()
        db = {r[0]: r[2:] for r in rows}
        unsent = Counter(r[1] for r in rows if r[0] not in arrivals)
        if unsent:
            print(f"  probes not received by the fake, by state: {dict(unsent)}")
        seg: dict[str, list[float]] = defaultdict(list)
        for p in answered:
            got = db.get(p["cid"])
            if got is None or None in got or p["cid"] not in arrivals:
                continue
            received, claimed, sent, batch = got
            seg["POST sent -> INSERT began (received_at)"].append(received - p["sent"])
            seg["INSERT began -> 200 read by the client"].append(p["at"] - received)
            seg["200 -> its claim statement began"].append(claimed - p["at"])
            seg["claim began -> request built (sent_at)"].append(sent - claimed)
            seg["request built -> fake received it"].append(arrivals[p["cid"]] - sent)
            seg["rows claimed by that statement"].append(batch / 1000.0)  # shown x1000 below
        if not seg:
            return
        print("  where the time goes (p50 / p99 / max):")
        for name, values in seg.items():
            if name.startswith("rows"):
                print(
                    f"    {name:<42} {percentile(values, 50) * 1000:,.0f} / "
                    f"{percentile(values, 99) * 1000:,.0f} / {max(values) * 1000:,.0f}"
                )
                continue
            print(
                f"    {name:<42} {fmt_ms(percentile(values, 50))} / "
                f"{fmt_ms(percentile(values, 99))} / {fmt_ms(max(values))}"
            )

    def _claims(self, start: float, end: float) -> dict[str, Any]:
        """Claim statements in the window: each stamps its rows with its own unique stamp."""
        with self.db.connect() as conn:
            row = conn.execute(
                "SELECT count(DISTINCT claimed_at), count(*) FROM actions "
                "WHERE claimed_at >= %s AND claimed_at < %s",
                (datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)),
            ).fetchone()
            states = dict(conn.execute("SELECT state, count(*) FROM actions GROUP BY 1").fetchall())
        statements, rows = (row[0], row[1]) if row else (0, 0)
        length = max(1e-9, end - start)
        per_s = statements / length
        print(
            f"claim statements      : {per_s:.1f}/s ({statements:,} statements that claimed "
            f"rows, {rows / max(1, statements):,.0f} rows each; counted as distinct claimed_at, "
            f"statements that found nothing are not seen); database commits "
            f"{getattr(self, 'commits_per_s', math.nan):,.1f}/s (all statements)"
        )
        return {"per_s": per_s, "states": states}

    # -- the baseline: bare_drainer.py on a fresh backlog ------------------------------------

    def _bare_phase(self, daemon: dict[str, Any]) -> dict[str, Any] | None:
        """bare_drainer.py on a fresh scratch database (same queues and portals, its own
        backlog) against a fresh fake HubSpot with the same limit; its CPU per callback."""
        a = self.args
        print(
            f"\n== bare drainer baseline: {a.bare_duration:g} s, {a.bare_rows_per_queue} rows per "
            f"queue, database {self.bare_db.name} =="
        )
        fake, fake_url = self._start_fake("bare-fake", self.tmp / "bare-fake-log.json")
        with phase("bare drainer: scratch database + migrate + seed"):
            self.bare_db.create()
            config = self.tmp / "throttled-bare.toml"  # for `throttled migrate` only
            harness.write_config(
                config, self._config_sections(self.instances[0], fake_url, self.bare_db.url)
            )
            harness.run_cli(["migrate", "--config", str(config)], harness.child_env())
            seeded = seed(self.bare_db, a, a.bare_rows_per_queue)
            print(f"   {seeded['actions']:,} actions in {seeded['queues']:,} queues")
        ready, out, log = (self.tmp / f"bare.{x}" for x in ("ready", "json", "log"))
        argv = [
            harness.PYTHON, str(harness.BENCH / "bare_drainer.py"),
            "--db-url", self.bare_db.url, "--api-url", fake_url,
            "--client-id", CLIENT_ID, "--client-secret", self.secret,
            "--portals", str(a.portals), "--tick-ms", str(a.bare_tick_ms),
            "--loop", a.loop or "asyncio", "--ready-file", str(ready), "--out", str(out),
        ]  # fmt: skip
        proc = self.children.start("bare", argv, env=harness.child_env(), stderr=log)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                self.children.stop(proc)
                self.children.stop(fake)
                tail = log.read_text().strip()[-500:] or "no message"
                print(f"!! the bare drainer did not start (exit code {proc.returncode}): {tail}")
                return None
            time.sleep(0.02)
        ready_at = time.time()
        self.bare_meter = harness.CpuMeter(a.pg_url, self.bare_db.name)
        pids = {"bare": proc.pid, "fake": fake.pid, "bench": os.getpid()}
        self.bare_sampler = Sampler(self.bare_meter, a.pg_url, self.bare_db.name, pids)
        self.bare_sampler.start()
        with phase(f"bare drainer draining for {a.bare_duration:g} s (pid {proc.pid})"):
            time.sleep(max(0.0, ready_at + a.bare_duration - time.time()))
            self.bare_sampler.sample()
        with phase("stopping the bare drainer and its fake HubSpot"):
            stopped_at = time.time()
            code = self.children.stop(proc, timeout=40)
            self.bare_sampler.stop()
            self.children.stop(fake, timeout=60)
            requests = json.loads((self.tmp / "bare-fake-log.json").read_text())["requests"]
            print(f"   exit code {code}; the fake received {len(requests):,} requests")
        own = json.loads(out.read_text()) if out.exists() else {}
        return self._bare_report(daemon, requests, own, ready_at, stopped_at)

    def _bare_report(
        self,
        daemon: dict[str, Any],
        requests: list[list[Any]],
        own: dict[str, Any],
        ready_at: float,
        stopped_at: float,
    ) -> dict[str, Any] | None:
        """The bare drainer's figures, and the daemon's CPU per callback against its."""
        a = self.args
        assert self.bare_sampler is not None
        done_at = [(at, len(cids)) for at, _, code, cids in requests if code == 204 and cids]
        status = Counter(str(r[2]) for r in requests)
        per_portal: dict[int, list[float]] = defaultdict(list)
        for at, portal, _, _ in requests:
            per_portal[portal or 0].append(at)
        steady = steady_window(done_at, a.bare_warmup, stopped_at)
        got = cpu_between(self.bare_sampler, steady["start"], steady["end"], done_at)
        if steady["length"] < 1 or got is None:
            print("!! bare drainer: no steady window (raise --bare-duration)")
            return None
        d, n = got
        per_k = d["bare"] / max(1, n) * 1000
        rss = self.bare_sampler.rss(["bare"], steady["start"], steady["end"])["bare"]
        buckets = steady["buckets"]
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(status.items()))
        peak = max((max_in_window(t, 10.0) for t in per_portal.values()), default=0)
        loop = own.get("loop", a.loop or "asyncio")
        print(
            f"first callback {steady['first'] - ready_at:.2f} s after it was ready; steady "
            f"window {steady['length']} s from +{steady['start'] - ready_at:.1f} s"
        )
        print(
            f"callbacks/s (steady)  : {steady['rate']:,.0f} (per second min {min(buckets):,} "
            f"median {statistics.median(buckets):,.0f} max {max(buckets):,}); its pacing allows "
            f"{a.portals * BARE_PORTAL_RATE:,.0f}"
        )
        print(
            "  pacing              : no rate logic, no portal budget; per portal at most one "
            "request every 0.1 s (100 requests of <= 100 callbacks per 10 s, under the fake's "
            f"{a.fake_budget}): busiest portal {peak} requests in a 10 s window"
        )
        print(f"  fake's answers      : {codes}")
        claim, mark = own.get("claim_ms", {}), own.get("mark_ms", {})
        late, claims = own.get("tick_late_ms", {}), own.get("claims", 0)
        print(
            f"  its own counts      : {claims:,} claim statements "
            f"({own.get('claimed_rows', 0) / max(1, claims):,.0f} rows each, p50 "
            f"{claim.get('p50', math.nan):.1f} ms, p99 {claim.get('p99', math.nan):.1f} ms), "
            f"{own.get('mark_statements', 0):,} mark-done statements (p50 "
            f"{mark.get('p50', math.nan):.1f} ms, p99 {mark.get('p99', math.nan):.1f} ms), "
            f"{own.get('ticks', 0):,} steps of {a.bare_tick_ms:g} ms (late p99 "
            f"{late.get('p99', math.nan):.1f} ms); loop {loop}"
        )
        print(
            f"bare drainer CPU      : {per_k:.3f} s per 1,000 callbacks "
            f"({d['bare'] / d['wall']:.2f} cores); PostgreSQL backends "
            f"{d['postgres'] / max(1, n) * 1000:.3f} s per 1,000 "
            f"({d['postgres'] / d['wall']:.2f} cores); RSS {mib(rss[0])} (peak {mib(rss[1])})"
        )
        print(
            "  cores busy          : "
            + harness.cpu_text(d, ["bare", *(k for k in ("postgres", "fake", "bench") if k in d)])
        )
        ratio = daemon["cpu"] / per_k if per_k > 0 else math.nan
        print(
            f"daemon / bare CPU     : {ratio:.2f}x per callback (daemon {daemon['cpu']:.3f} s "
            f"per 1,000 at {daemon['rate']:,.0f} callbacks/s; bare drainer {per_k:.3f} s per "
            f"1,000 at {steady['rate']:,.0f} callbacks/s); event loop: {self._loop_note()}"
        )
        return {"ratio": ratio, "cpu": per_k, "rate": steady["rate"], "loop": loop}

    def cleanup(self) -> None:
        """Stop the samplers, then everything the base class owns, and the baseline's
        database."""
        for sampler in (self.sampler, self.bare_sampler):
            if sampler is not None:
                sampler.stop()
        if self.bare_meter is not None:
            self.bare_meter.close()
        super().cleanup()
        try:
            self.bare_db.drop()
        except Exception as exc:
            print(f"!! could not drop database {self.bare_db.name}: {exc}", file=sys.stderr)


def main() -> int:
    """Run the benchmark."""
    args = parse_args()
    return harness.run_main("drain", DrainBench(args))


if __name__ == "__main__":
    sys.exit(main())
