"""Scale benchmark: many known queues at rest, and a backlog of a million actions drained.

    python bench/scale.py queues  [--known 100000 --active 10000]
    python bench/scale.py backlog [--actions 1000000 --queues 10000 --rate 1]

Both start the real daemon (`throttled serve`) against a scratch database on the PostgreSQL
server and bench/fake_server.py (throttled's FakeHubSpot, HubSpot's 110 requests / 10 s per
portal enforced), seed the database in SQL (INSERT ... SELECT generate_series: rows as the
daemon writes them), stop by themselves (--max-seconds), and clean up after themselves
(processes stopped by pid, scratch database dropped WITH (FORCE), temp dir removed) on
Ctrl-C, SIGTERM, a failure or the time limit too.

queues: --known queues (portals 1..P, policy 1 per hour, one finished action each: their
history), of which --active have --pending-per-queue pending actions and a send 5 minutes ago
(their rate log), so none is due for 55 minutes. Measured after the daemon started and
settled (every active queue has its coroutine, asleep): the daemon's RSS (VmRSS) and idle CPU
over --idle-seconds (utime + stime from /proc/<pid>/stat, and the database's backends), with
nothing sent. The daemon loads only queues with pending work at start-up; a queue it has
served stays in its memory. So the second step sends one signed action over HTTP (the real
endpoint) to each of the other queues, lets them complete (at the [defaults] rate, 10/s), and
measures RSS and idle CPU again: then the daemon holds every known queue, the active ones
asleep. A baseline RSS (the daemon on the empty database) comes first.

backlog: --actions pending actions over --queues queues (portals 1..P, policy --rate, window
pacing), seeded in SQL; a sample of them (--http-sample) goes through the real endpoint
instead, into a daemon whose queues are paused meanwhile (paused_at: nothing is sent), for
the ingest rate with the table full. Then the queues are unpaused and a fresh daemon drains
the whole backlog against the fake. Every --sample-s: callbacks completed (the daemon's
/metrics), daemon and PostgreSQL backend CPU (/proc), RSS, dead tuples. Printed: a table by
remaining-backlog decile (callbacks/s, CPU per 1,000 callbacks, claim and mark-done statements
from the rows' claimed_at / completed_at stamps), the window check (at the wire with
bench/wiretap.py, else at the fake), and EXPLAIN (ANALYZE, BUFFERS) of the daemon's claim
statement (throttled.db.queries.CLAIM) with one row per queue pending, with the full backlog
pending, and after the drain with one row per queue pending again (before and after a
VACUUM: the server may run without autovacuum).

The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import resource
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drain
import harness
import ingest
from harness import fmt_ms, percentile, phase

from throttled.db import queries
from throttled.hubspot.fake import max_in_window
from throttled.hubspot.signature import sign_headers
from throttled.rates import RatePolicy

ACTION_ID = drain.ACTION_ID
ACTION_PATH = drain.ACTION_PATH
BACKSTOP_S = 90.0  # after --max-seconds: if the cleanup itself hangs, kill and exit
RSS_TARGET_KIB = 300e6 / 1024  # the RSS target: 300 MB (286.1 MiB)
IDLE_CORES = 0.02  # "idle CPU ~0": under 2 % of one core


# -- options ----------------------------------------------------------------------------------


def parse_rate(text: str) -> tuple[int, float]:
    """'10' -> (10, 1.0); '5/2' -> 5 per 2 s."""
    limit, _, period = text.partition("/")
    try:
        out = int(limit), float(period or "1")
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rate wants N or N/SECONDS, got {text!r}") from None
    if out[0] < 1 or out[1] <= 0:
        raise argparse.ArgumentTypeError(f"--rate wants N >= 1 per SECONDS > 0, got {text!r}")
    return out


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="mode", required=True)
    q = sub.add_parser("queues", help="known queues at rest: RSS and idle CPU")
    q.add_argument("--known", type=int, default=100_000, help="queues in the database")
    q.add_argument("--active", type=int, default=10_000, help="of them with pending work")
    q.add_argument("--pending-per-queue", type=int, default=10, help="rows per active queue")
    q.add_argument("--portals", type=int, default=20, help="portals, ids 1..P")
    q.add_argument("--settle", type=float, default=10.0, help="seconds after settling")
    q.add_argument("--idle-seconds", type=float, default=60.0, help="idle CPU window")
    q.add_argument("--no-touch", action="store_true", help="skip the second step")
    q.add_argument("--max-seconds", type=float, default=900.0, help="whole-run time limit")
    b = sub.add_parser("backlog", help="a large backlog: ingest it, drain it")
    b.add_argument("--actions", type=int, default=1_000_000, help="backlog size")
    b.add_argument("--queues", type=int, default=10_000, help="backlogged queues")
    b.add_argument(
        "--rate", type=parse_rate, default=(1, 1.0), help="per queue: N or N/SECONDS (window)"
    )
    b.add_argument("--portals", type=int, default=20, help="portals, ids 1..P")
    b.add_argument("--http-sample", type=int, default=20_000, help="of them sent over HTTP")
    b.add_argument("--sample-s", type=float, default=5.0, help="sampling period while draining")
    b.add_argument("--explain-queues", type=int, default=1000, help="queues in the EXPLAINed claim")
    b.add_argument("--explain-rows", type=int, default=1, help="rows per queue in it")
    b.add_argument("--no-wiretap", action="store_true", help="window check at the fake only")
    b.add_argument("--max-seconds", type=float, default=900.0, help="whole-run time limit")
    for sp in (q, b):
        sp.add_argument("--connections", type=int, default=64, help="HTTP client connections")
        sp.add_argument(
            "--fake-budget", default="110/10", help="fake's per-portal limit, requests/s ('none')"
        )
        harness.add_common_args(sp)
    args = p.parse_args()
    args.instances, args.loop = 1, None  # (what DrainBench reads)
    if args.mode == "queues" and not 0 < args.active <= args.known:
        p.error("--active must be 1..--known")
    if args.mode == "backlog" and not 0 <= args.http_sample <= args.actions - args.queues:
        p.error("--http-sample must be 0..--actions - --queues (one SQL row per queue first)")
    return args


# -- small helpers ----------------------------------------------------------------------------


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (the peak resident set) of a process, KiB; None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def mib(kib: float | None) -> str:
    """KiB as MiB text."""
    return "n/a" if kib is None else f"{kib / 1024:,.1f} MiB"


def metrics_of(base_url: str) -> str:
    """The daemon's /metrics text ('' if it does not answer)."""
    try:
        return harness.http_get(base_url + "/metrics", timeout=5.0)
    except OSError:
        return ""


def completed_of(text: str) -> float:
    """Callbacks HubSpot accepted, from /metrics text (0 if it has none)."""
    return harness.metric(text, "throttled_callbacks_completed_total") or 0.0


def body_for(portal: int, queue_id: int, cid: str, n: int) -> bytes:
    """A signed-ready custom-action body for queue `queue:<portal>:<queue_id>:7:0`."""
    return json.dumps(
        {
            "callbackId": cid,
            "origin": {"portalId": portal, "actionDefinitionId": ACTION_ID},
            "context": {"source": "WORKFLOWS", "workflowId": queue_id},
            "object": {"objectId": queue_id * 1000 + n, "objectType": "CONTACT"},
            "inputFields": {},
        },
        separators=(",", ":"),
    ).encode()


def signed(bodies: Sequence[bytes], secret: str, url: str) -> list[bytes]:
    """Raw HTTP/1.1 requests, each signed v2 for `url` (as HubSpot signs them)."""
    out = []
    for body in bodies:
        headers = {"Content-Type": "application/json"}
        headers.update(sign_headers(secret, "POST", url, body, version="v2"))
        out.append(ingest.raw_request(body, headers))
    return out


async def post_all(base_url: str, requests: Sequence[bytes], connections: int) -> dict[str, Any]:
    """Send each pre-built request once, closed loop over `connections` keep-alive
    connections (ingest.py's RawPool); count the answers."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    pool = ingest.RawPool(host, int(port), connections)
    await pool.open_all()
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lat: list[float] = []
    ok = 0
    it = iter(requests)

    async def worker() -> None:
        nonlocal ok
        for raw in it:
            sent = time.monotonic()
            try:
                async with asyncio.timeout(10.0):
                    code, text = await pool.request(raw)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                errors["socket"] += 1
                continue
            lat.append(time.monotonic() - sent)
            status[str(code)] += 1
            ok += code == 200 and b"BLOCK" in text

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    seconds = time.monotonic() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    pool.close()
    return {
        "seconds": seconds,
        "ok": ok,
        "status": dict(status),
        "errors": dict(errors),
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "client_cpu": usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime,
    }


class Monitor:
    """Every `period` s (a thread): CPU of named processes and of the scratch database's
    backends (this monitor's own backend left out), their RSS, the database's commits and
    the actions table's dead tuples; with `metrics_url`, the daemon's completed callbacks."""

    def __init__(
        self,
        pg_url: str,
        db: harness.ScratchDatabase,
        pids: dict[str, int],
        period: float,
        metrics_url: str | None = None,
    ) -> None:
        self.meter = harness.CpuMeter(pg_url, db.name)
        self.pids = pids
        self.period = period
        self.metrics_url = metrics_url
        self.samples: list[dict[str, Any]] = []
        self._server = harness.psycopg.connect(pg_url, autocommit=True)
        self._db_name = db.name
        self._table = db.connect(autocommit=True) if metrics_url else None
        self._own_backend = (
            int(self._table.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
            if self._table
            else None
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        """Take a first sample and begin sampling."""
        self.sample()
        self._thread.start()

    def _run(self) -> None:
        try:  # (every 0.5 s until the first callback: the start-up is its own row)
            while not self._stop.wait(self.period if self._started() else 0.5):
                self.sample()
        except Exception as exc:  # (the main thread reports it)
            self.error = exc

    def _started(self) -> bool:
        return self.metrics_url is None or bool(self.samples and self.samples[-1]["completed"])

    def sample(self) -> dict[str, Any]:
        """One sample now."""
        snap = self.meter.snapshot(self.pids)
        snap["backends"].pop(self._own_backend, None)
        row = self._server.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self._db_name,)
        ).fetchone()
        s: dict[str, Any] = {
            "t": time.time(),
            "snap": snap,
            "rss": {name: harness.rss_kib(pid) for name, pid in self.pids.items()},
            "commits": int(row[0]) if row else 0,
        }
        if self.metrics_url is not None:
            text = metrics_of(self.metrics_url)  # (a failed scrape keeps the last figure)
            last = self.samples[-1]["completed"] if self.samples else 0.0
            s["completed"] = max(last, completed_of(text)) if text else last
        if self._table is not None:
            t = self._table.execute(
                "SELECT n_live_tup, n_dead_tup, vacuum_count + autovacuum_count "
                "FROM pg_stat_user_tables WHERE relname = 'actions'"
            ).fetchone()
            s["live"], s["dead"], s["vacuums"] = t if t else (0, 0, 0)
        self.samples.append(s)
        return s

    def stop(self) -> None:
        """Stop sampling (one last sample is taken); close the connections."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(10)
            with contextlib.suppress(Exception):
                self.sample()
        for conn in (self._server, self._table):
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
        self.meter.close()


def cpu_delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """CPU seconds by name between two samples ('postgres': the backends), with 'commits'."""
    d = harness.CpuMeter.delta(a["snap"], b["snap"])
    d["commits"] = b["commits"] - a["commits"]
    return d


PLAN_MODES = {"custom": "force_custom_plan", "generic": "force_generic_plan"}


def explain_claim(
    db: harness.ScratchDatabase, queue_ids: Sequence[int], rows: int, repeats: int = 5
) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the daemon's claim statement for these queues, `rows`
    each, as the daemon runs it: a prepared statement (asyncpg prepares every statement), so
    with plan_cache_mode = auto its first 5 executions on a connection get custom plans (the
    arrays' values known) and later ones the generic plan if PostgreSQL finds it no dearer.
    Both are measured (`repeats` times each, every run in a transaction rolled back: the
    UPDATE does run), and which one auto settles on after 7 executions."""
    ids = "'{" + ",".join(str(i) for i in queue_ids) + "}'::bigint[]"
    lims = "'{" + ",".join(str(rows) for _ in queue_ids) + "}'::int[]"
    prepare = f"PREPARE scale_claim (bigint[], int[], timestamptz) AS {queries.CLAIM}"
    explain = f"EXPLAIN (ANALYZE, BUFFERS, FORMAT @) EXECUTE scale_claim({ids}, {lims}, now())"
    out: dict[str, Any] = {}
    with db.connect(autocommit=True) as conn:

        def once(fmt: str = "JSON") -> Any:
            conn.execute("BEGIN")
            try:
                got = conn.execute(explain.replace("@", fmt, 1)).fetchall()
            finally:
                conn.execute("ROLLBACK")
            return got[0][0][0] if fmt == "JSON" else "\n".join(r[0] for r in got)

        for name, mode in PLAN_MODES.items():
            conn.execute(prepare)
            conn.execute(f"SET plan_cache_mode = {mode}")
            runs = [once() for _ in range(repeats)]
            out[name] = _summary(runs)
            out[name]["text"] = once("TEXT")
            conn.execute("DEALLOCATE scale_claim")
        conn.execute("SET plan_cache_mode = auto")
        conn.execute(prepare)
        auto = [once() for _ in range(7)]
        conn.execute("DEALLOCATE scale_claim")
        # (told apart by the planner's estimate: a generic plan does not know the arrays)
        cost = auto[-1]["Plan"]["Total Cost"]
        near = min(PLAN_MODES, key=lambda name: abs(out[name]["cost"] - cost))
        out["auto"] = near
        size = conn.execute(
            "SELECT pg_relation_size('actions'), pg_relation_size('actions_pending'), "
            "(SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'actions'), "
            "(SELECT count(*) FROM actions WHERE state = 'pending')"
        ).fetchone()
    assert size is not None
    out.update(table_mb=size[0] / 2**20, index_mb=size[1] / 2**20, dead=size[2], pending=size[3])
    return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median execution time of EXPLAIN runs; the median run's buffers and scan nodes."""
    times = [r["Execution Time"] for r in runs]
    median_run = sorted(runs, key=lambda r: r["Execution Time"])[len(runs) // 2]
    top = median_run["Plan"]
    return {
        "exec_ms": statistics.median(times),
        "min_ms": min(times),
        "max_ms": max(times),
        "plan_ms": statistics.median(r["Planning Time"] for r in runs),
        "rows": top.get("Actual Rows", 0),
        "cost": top.get("Total Cost", 0.0),
        "hit": top.get("Shared Hit Blocks", 0),
        "read": top.get("Shared Read Blocks", 0),
        "scans": list(_scans(top)),
    }


def _scans(node: dict[str, Any]) -> Any:
    """The scans of a JSON plan, depth first: (what, loops, ms per loop, rows per loop,
    buffers)."""
    if "Relation Name" in node:
        what = f"{node['Node Type']} {node.get('Index Name', node['Relation Name'])}"
        yield (
            what,
            node.get("Actual Loops", 0),
            node.get("Actual Total Time", 0.0),
            node.get("Actual Rows", 0),
            node.get("Shared Hit Blocks", 0) + node.get("Shared Read Blocks", 0),
        )
    for child in node.get("Plans", []):
        yield from _scans(child)


def print_explain(label: str, e: dict[str, Any]) -> None:
    """One EXPLAIN point: both plans, a line each, and their scans."""
    print(
        f"  {label}: {e['pending']:,} pending, {e['dead']:,} dead tuples, table "
        f"{e['table_mb']:,.0f} MiB, actions_pending {e['index_mb']:,.1f} MiB; a prepared "
        f"statement settles on the {e['auto']} plan"
    )
    for name in PLAN_MODES:
        p = e[name]
        scans = "; ".join(
            f"{what} {loops:,} x {ms * 1000:,.0f} µs ({rows:,} rows, {blocks:,} buffers)"
            for what, loops, ms, rows, blocks in p["scans"]
        )
        print(
            f"    {name:<7} plan: {p['exec_ms']:8.1f} ms (min {p['min_ms']:.1f}, max "
            f"{p['max_ms']:.1f}; planning {p['plan_ms']:.1f} ms), {p['rows']:,} rows, buffers hit "
            f"{p['hit']:,} read {p['read']:,}; scans: {scans}"
        )


# -- the benchmark ------------------------------------------------------------------------------


class ScaleBench(drain.DrainBench):
    """One run of `scale.py queues` or `scale.py backlog` (DrainBench's fake HubSpot,
    wiretap, config and portal helpers)."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.monitor: Monitor | None = None
        self.daemon: Any = None
        self.defaults: dict[str, Any] = {}
        self.signed_url = self.base_url + ACTION_PATH
        self.started = time.monotonic()

    # -- shared steps -------------------------------------------------------------------------

    def run(self) -> str:
        """The whole benchmark; returns the summary line."""
        self._arm_guard(self.args.max_seconds)
        a = self.args
        with harness.psycopg.connect(a.pg_url) as conn:
            rows = conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', "
                "'shared_buffers', 'synchronous_commit', 'max_connections') ORDER BY name"
            ).fetchall()
        print(f"scale benchmark ({a.mode}): temp dir {self.tmp}, database {self.db.name}")
        print(
            "postgresql: "
            + ", ".join(f"{n}={s}" for n, s in rows)
            + f"; cpus {os.cpu_count()}; --max-seconds {a.max_seconds:g}"
        )
        if dict(rows).get("autovacuum") == "off":
            print(
                "!! autovacuum is off on this server: dead tuples are only cleared by the "
                "VACUUMs this benchmark runs itself (said where)"
            )
        return self._queues() if a.mode == "queues" else self._backlog()

    def _arm_guard(self, seconds: float) -> None:
        """SIGALRM after `seconds` unwinds through the cleanup (as Ctrl-C does); should the
        cleanup hang, a backstop thread kills the children, drops the database and exits."""

        def on_alarm(_signum: int, _frame: object) -> None:
            raise harness.Interrupted(f"--max-seconds {seconds:g} reached")

        def backstop() -> None:
            time.sleep(seconds + BACKSTOP_S)
            print("!! cleanup did not finish: killing the children", file=sys.stderr, flush=True)
            for _, proc in self.children.procs:
                with contextlib.suppress(Exception):
                    proc.kill()
            with contextlib.suppress(Exception):
                self.db.drop()
            os._exit(124)

        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, math.ceil(seconds)))
        threading.Thread(target=backstop, name="backstop", daemon=True).start()

    def _write_config(self, fake_url: str) -> None:
        """The daemon's config (DrainBench's) with this run's [defaults]; --daemon-config
        still has the last word."""
        sections = self._config_sections(self.instances[0], fake_url, self.db.url)
        sections = harness.merged(sections, {"defaults": self.defaults})
        sections = harness.merged(sections, harness.config_overrides(self.args.daemon_config))
        harness.write_config(self.config, sections)

    def _setup(self, *, wiretap: bool) -> None:
        """Fake HubSpot (and wiretap), scratch database, config, migrations."""
        self.fake, fake_url = self._start_fake("fake", self.fake_out)
        if wiretap:
            self._start_wiretap(urlsplit(fake_url).port or 0)
        with phase("scratch database + migrate"):
            self.db.create()
            self._write_config(fake_url)
            out = harness.run_cli(["migrate", "--config", str(self.config)], harness.child_env())
            print("   " + out.strip())

    def _start_daemon(self) -> Any:
        """`throttled serve`, waited for until /readyz answers."""
        proc = self.children.start(
            "daemon",
            harness.serve_argv(self.config, self.profile),
            env=harness.child_env(),
            stderr=self.daemon_log,
        )
        harness.wait_http(self.base_url + "/readyz", proc, 120, self.daemon_log)
        self.daemon = proc
        return proc

    def _stop_daemon(self) -> tuple[int | None, float]:
        """SIGTERM the daemon; its exit code and how long it took."""
        t = time.monotonic()
        code = self.children.stop(self.daemon, timeout=40)
        self.daemon = None
        return code, time.monotonic() - t

    def _wait_metrics(
        self, ok: Callable[[str], bool], timeout: float, what: str, period: float = 0.5
    ) -> float:
        """Poll /metrics until ok(text) holds 3 polls in a row; seconds it took."""
        t0 = time.monotonic()
        streak = 0
        while time.monotonic() - t0 < timeout:
            if self.daemon is not None and self.daemon.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited ({self.daemon.returncode}) waiting for {what}"
                )
            streak = streak + 1 if ok(metrics_of(self.base_url)) else 0
            if streak >= 3:
                return time.monotonic() - t0
            time.sleep(period)
        raise RuntimeError(f"{what}: not reached within {timeout:.0f} s")

    def _ingest(self, label: str, bodies: Sequence[bytes]) -> dict[str, Any]:
        """Send these bodies (signed) through the real endpoint; print the rate and CPU."""
        requests = signed(bodies, self.secret, self.signed_url)
        meter = harness.CpuMeter(self.args.pg_url, self.db.name)
        try:
            pids = {"daemon": self.daemon.pid}
            before = meter.snapshot(pids)
            r = asyncio.run(post_all(self.base_url, requests, self.args.connections))
            d = harness.CpuMeter.delta(before, meter.snapshot(pids))
        finally:
            meter.close()
        n = max(1, r["ok"])
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["status"].items())) or "none"
        r.update(rate=r["ok"] / r["seconds"], cpu=d)
        print(
            f"   {label}: {r['ok']:,} answered 200 BLOCK in {r['seconds']:.1f} s = "
            f"{r['rate']:,.0f} actions/s (closed loop, {self.args.connections} connections, "
            f"one Python client process); latency p50 {fmt_ms(r['p50'])}, p99 {fmt_ms(r['p99'])}"
        )
        print(
            f"   answers {codes}; socket errors {r['errors'] or 'none'}; CPU per action: daemon "
            f"{d['daemon'] / n * 1e6:,.0f} µs, PostgreSQL backends {d['postgres'] / n * 1e6:,.0f}"
            f" µs, client {r['client_cpu'] / n * 1e6:,.0f} µs; "
            + harness.cpu_text(d, ["daemon", "postgres"])
        )
        return r

    def cleanup(self) -> None:
        """Stop the monitor, then everything DrainBench and Bench own."""
        signal.alarm(0)
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.stop()
        super().cleanup()

    # -- queues ----------------------------------------------------------------------------

    QUEUE_POLICY = RatePolicy(limit=1, period_s=3600.0, pacing="window")

    def _queues(self) -> str:
        a = self.args
        self.defaults = {"max_throughput": 10, "time_period": 1, "time_unit": "seconds"}
        print(
            f"{a.known:,} known queues over {a.portals} portals, {a.active:,} of them active "
            f"({a.pending_per_queue} pending each, policy {self.QUEUE_POLICY.describe()}, a "
            f"send 5 min ago: next one due in 55 min); the rest idle (last send 2 h ago)"
        )
        self._setup(wiretap=False)
        with phase("baseline: the daemon on the empty database"):
            self._start_daemon()
            time.sleep(3)
            base = harness.rss_kib(self.daemon.pid)
            print(f"   RSS {mib(base)}")
            self._stop_daemon()
        with phase("seeding"):
            self._seed_queues()
        with phase(f"connecting {a.portals} portals (throttled portals connect)"):
            self._connect_portals()
        with phase("daemon start-up"):
            t0 = time.monotonic()
            self._start_daemon()
            ready = time.monotonic() - t0
            settled = self._wait_settled(a.active, 180)
            print(
                f"   pid {self.daemon.pid}: ready after {ready:.1f} s; all {a.active:,} active "
                f"queues running {settled:.1f} s later"
            )
        first = self._idle(f"step 1: {a.active:,} active queues loaded (the idle ones not)")
        second = None
        if not a.no_touch:
            self._touch()
            second = self._idle(
                f"step 2: all {a.known:,} queues known, {a.active:,} active (asleep)"
            )
        with phase("stopping the daemon (SIGTERM)"):
            code, took = self._stop_daemon()
            print(f"   exit code {code} after {took:.1f} s")
        bad = harness.print_log_events(self.daemon_log, "daemon log (level >= warning)")
        last = second or first
        rss_ok = "met" if last["rss"] <= RSS_TARGET_KIB else "NOT met"
        cpu_ok = "met" if last["daemon_cores"] < IDLE_CORES and last["sent"] == 0 else "NOT met"
        return (
            f"SUMMARY scale queues: {a.known:,} known / {a.active:,} active: RSS "
            f"{mib(first['rss'])} with the active loaded, {mib(second['rss']) if second else 'n/a'}"
            f" with all known (target <= 300 MB = 286.1 MiB: {rss_ok}; empty database {mib(base)});"
            f" idle CPU daemon {first['daemon_cores']:.4f} / "
            f"{second['daemon_cores'] if second else math.nan:.4f} cores "
            f"({last['daemon_cores'] * 60:.2f} CPU-s/min; ~0 taken as < {IDLE_CORES} cores: "
            f"{cpu_ok}), PostgreSQL backends {last['pg_cores']:.4f} cores; sent while idle "
            f"{last['sent']:,.0f}; daemon log warnings+ {bad}"
        )

    def _seed_queues(self) -> None:
        a = self.args
        policy = json.dumps(self.QUEUE_POLICY.to_json())
        t0 = time.monotonic()
        with self.db.connect() as conn:
            conn.execute(
                "INSERT INTO queues (key, portal_id, policy, action_id, inputs, created_at, "
                "updated_at) "
                "SELECT 'queue:' || ((g - 1) %% %(p)s + 1) || ':' || g || ':' || %(action)s "
                "|| ':0', (g - 1) %% %(p)s + 1, %(policy)s::jsonb, %(action)s, '{}'::jsonb, "
                "now() - interval '1 day', now() - interval '1 day' "
                "FROM generate_series(1, %(known)s) AS g ORDER BY g",
                {"p": a.portals, "action": ACTION_ID, "policy": policy, "known": a.known},
            )
            # History: one finished action per queue (sent 5 min ago for the active ones: their
            # rate log holds them for 55 min; 2 h ago for the others).
            conn.execute(
                "INSERT INTO actions (callback_id, queue_id, portal_id, state, received_at, "
                "deadline, attempts, claimed_at, sent_at, completed_at, workflow_id, "
                "object_type, object_id, input_fields) "
                "SELECT 'hist-' || portal_id || '-' || id, id, portal_id, 'done', at - "
                "interval '1 minute', at + interval '7 days', 1, at, at, at + interval '50 ms', "
                "id, 'CONTACT', id::text, '{}'::jsonb FROM (SELECT id, portal_id, now() - CASE "
                "WHEN id <= %(active)s THEN interval '5 minutes' ELSE interval '2 hours' END "
                "AS at FROM queues) q ORDER BY q.id",
                {"active": a.active},
            )
            conn.execute(
                "INSERT INTO actions (callback_id, queue_id, portal_id, deadline, workflow_id, "
                "object_type, object_id, input_fields) "
                "SELECT 'ap-' || q.portal_id || '-' || q.id || '-' || n, q.id, q.portal_id, "
                "now() + interval '6 days', q.id, 'CONTACT', (q.id * 1000 + n)::text, "
                "'{}'::jsonb FROM generate_series(1, %(m)s) AS n CROSS JOIN queues q "
                "WHERE q.id <= %(active)s ORDER BY n, q.id",
                {"m": a.pending_per_queue, "active": a.active},
            )
            conn.commit()
        with self.db.connect(autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE queues")
            conn.execute("VACUUM ANALYZE actions")
            states = dict(conn.execute("SELECT state, count(*) FROM actions GROUP BY 1").fetchall())
        print(f"   {a.known:,} queues, actions by state {states} in {time.monotonic() - t0:.1f} s")

    def _wait_settled(self, active: int, timeout: float) -> float:
        """Until `active` queues have a coroutine and no claimed row waits in a sender."""

        def ok(text: str) -> bool:
            return (
                harness.metric(text, "throttled_active_queues") == active
                and harness.metric(text, "throttled_sender_held") == 0
                and harness.metric(text, "throttled_ingest_pending") == 0
            )

        return self._wait_metrics(ok, timeout, f"{active:,} active queues")

    def _idle(self, title: str) -> dict[str, Any]:
        """RSS and idle CPU over --idle-seconds (nothing scraped meanwhile: a /metrics
        scrape is work for the daemon), after --settle seconds."""
        a = self.args
        print(f"\n== {title} ==")
        time.sleep(a.settle)
        sent0 = completed_of(metrics_of(self.base_url))
        mon = Monitor(a.pg_url, self.db, {"daemon": self.daemon.pid}, period=1.0)
        self.monitor = mon
        mon.start()
        time.sleep(a.idle_seconds)
        mon.stop()
        self.monitor = None
        sent = completed_of(metrics_of(self.base_url)) - sent0
        samples = mon.samples
        d = cpu_delta(samples[0], samples[-1])
        wall = d["wall"]
        cores = d["daemon"] / wall
        pg = d["postgres"] / wall
        rss = samples[-1]["rss"]["daemon"] or 0
        rss_peak = max(s["rss"]["daemon"] or 0 for s in samples)
        hwm = peak_rss_kib(self.daemon.pid)
        slices = [cpu_delta(x, y) for x, y in zip(samples[::5], samples[5::5], strict=False)]
        print(
            f"daemon RSS         : {mib(rss)} (max over the window {mib(rss_peak)}; VmHWM, the "
            f"peak since start {mib(hwm)}) (target <= 300 MB = 286.1 MiB)"
        )
        print(
            f"daemon idle CPU    : {cores:.4f} cores = {d['daemon'] * 60 / wall:.2f} CPU-s per "
            f"minute over {wall:.1f} s (target ~0); PostgreSQL backends {pg:.4f} cores = "
            f"{d['postgres'] * 60 / wall:.2f} CPU-s per minute; {d['commits'] / wall:.1f} "
            f"database transactions/s"
        )
        print(
            "  CPU ms per 5 s    : daemon "
            + " ".join(f"{s['daemon'] * 1000:.0f}" for s in slices)
            + " | postgres "
            + " ".join(f"{s['postgres'] * 1000:.0f}" for s in slices)
        )
        print(f"  callbacks sent while idle: {sent:,.0f} (must be 0: nothing is due)")
        return {"rss": rss, "daemon_cores": cores, "pg_cores": pg, "sent": sent}

    def _touch(self) -> None:
        """One signed action over HTTP to every idle queue; wait until they are completed."""
        a = self.args
        with self.db.connect() as conn:
            rows = conn.execute(
                "SELECT id, portal_id FROM queues WHERE id > %s ORDER BY id", (a.active,)
            ).fetchall()
        print(
            f"\n-- step 2: one action over HTTP to each of the {len(rows):,} idle queues "
            f"(their policy becomes [defaults], 10/s: sent at once)"
        )
        done0 = completed_of(metrics_of(self.base_url))
        bodies = [body_for(p, q, f"ap-{p}-{q}-t", 0) for q, p in rows]
        self._ingest("intake", bodies)
        took = self._wait_metrics(
            lambda t: completed_of(t) >= done0 + len(rows), 300, "the touched queues completed"
        )
        with self.db.connect() as conn:
            left = conn.execute(
                "SELECT count(*) FROM actions WHERE state IN ('pending', 'claimed') "
                "AND queue_id > %s",
                (a.active,),
            ).fetchone()
        print(
            f"   all {len(rows):,} completed {took:.1f} s after the last answer; rows of them "
            f"left pending or claimed: {left[0] if left else '?'}"
        )
        settled = self._wait_settled(a.active, 180)
        print(f"   back to {a.active:,} queues with a coroutine after {settled:.1f} s")

    # -- backlog ---------------------------------------------------------------------------

    def _backlog(self) -> str:
        a = self.args
        limit, period = a.rate
        self.policy = RatePolicy(limit=limit, period_s=period, pacing="window")
        self.defaults = {"max_throughput": limit, "time_period": period, "time_unit": "seconds"}
        ideal = a.queues * limit / period
        print(
            f"{a.actions:,} actions over {a.queues:,} queues ({self.policy.describe()}) and "
            f"{a.portals} portals: ideal {ideal:,.0f} callbacks/s ({ideal / a.portals:,.0f} per "
            f"portal; the daemon's budget 1,000, HubSpot's 1,100), ~{a.actions / ideal:,.0f} s "
            f"to drain; {a.http_sample:,} of them over HTTP"
        )
        if ideal / a.portals > 1000:
            print("!! more than 1,000 callbacks/s per portal: the portals' budget caps it")
        self._setup(wiretap=not a.no_wiretap)
        explains: dict[str, dict[str, Any]] = {}
        with phase(f"seeding {a.queues:,} queues (paused) and one pending row each"):
            t0 = time.monotonic()
            self._seed_backlog_queues()
            print(f"   {time.monotonic() - t0:.1f} s")
        ids = list(range(1, min(a.explain_queues, a.queues) + 1))
        with phase(f"EXPLAIN claim, {a.queues:,} pending (one per queue)"):
            explains["fresh"] = explain_claim(self.db, ids, a.explain_rows)
        sql_rows = a.actions - a.http_sample
        with phase(f"seeding the rest of the {sql_rows:,} rows in SQL"):
            t0 = time.monotonic()
            self._seed_backlog_rows(sql_rows)
            took = time.monotonic() - t0
            print(f"   {sql_rows - a.queues:,} rows in {took:.1f} s (VACUUM ANALYZE included)")
        with phase(f"connecting {a.portals} portals (throttled portals connect)"):
            self._connect_portals()
        sample = self._http_sample() if a.http_sample else None
        with phase("unpausing the queues; VACUUM ANALYZE"):
            with self.db.connect(autocommit=True) as conn:
                conn.execute("UPDATE queues SET paused_at = NULL")
                conn.execute("VACUUM ANALYZE actions")
                pending = conn.execute(
                    "SELECT count(*) FROM actions WHERE state = 'pending'"
                ).fetchone()
            print(f"   {pending[0] if pending else 0:,} pending")
        with phase(f"EXPLAIN claim, {a.actions:,} pending"):
            explains["full"] = explain_claim(self.db, ids, a.explain_rows)
        run = self._drain_backlog()
        table = self._report_drain(run)
        with phase(f"after the drain: one new pending row per queue ({a.queues:,}); EXPLAIN"):
            self._seed_after()
            explains["after"] = explain_claim(self.db, ids, a.explain_rows)
            with self.db.connect(autocommit=True) as conn:
                conn.execute("VACUUM actions")
            explains["vacuumed"] = explain_claim(self.db, ids, a.explain_rows)
        self._print_explains(explains)
        return self._backlog_summary(run, table, sample, explains)

    def _seed_backlog_queues(self) -> None:
        a = self.args
        policy = json.dumps(self.policy.to_json())
        with self.db.connect() as conn:
            conn.execute(
                "INSERT INTO queues (key, portal_id, policy, action_id, inputs, paused_at) "
                "SELECT 'queue:' || ((g - 1) %% %(p)s + 1) || ':' || g || ':' || %(action)s "
                "|| ':0', (g - 1) %% %(p)s + 1, %(policy)s::jsonb, %(action)s, '{}'::jsonb, "
                "now() FROM generate_series(1, %(q)s) AS g ORDER BY g",
                {"p": a.portals, "action": ACTION_ID, "policy": policy, "q": a.queues},
            )
            self._insert_rows(conn, 1, 1)
            conn.commit()
        with self.db.connect(autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE queues")
            conn.execute("VACUUM ANALYZE actions")

    @staticmethod
    def _insert_rows(conn: Any, first: int, last: int, cap: int | None = None) -> None:
        """Rows n = first..last of every queue, interleaved by n (as arrivals would be);
        with `cap`, only the first `cap` of them in that order."""
        conn.execute(
            "INSERT INTO actions (callback_id, queue_id, portal_id, deadline, workflow_id, "
            "object_type, object_id, input_fields) "
            "SELECT 'ap-' || q.portal_id || '-' || q.id || '-' || n, q.id, q.portal_id, "
            "now() + interval '6 days', q.id, 'CONTACT', (q.id * 100000 + n)::text, "
            "'{}'::jsonb FROM generate_series(%s::int, %s::int) AS n CROSS JOIN queues q "
            "ORDER BY n, q.id LIMIT %s::bigint",
            (first, last, cap),
        )

    def _seed_backlog_rows(self, sql_rows: int) -> None:
        a = self.args
        rest = sql_rows - a.queues
        if rest > 0:
            with self.db.connect() as conn:
                self._insert_rows(conn, 2, 1 + math.ceil(rest / a.queues), rest)
                conn.commit()
        with self.db.connect(autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE actions")

    def _seed_after(self) -> None:
        n = 1 + math.ceil(self.args.actions / self.args.queues) + 1
        with self.db.connect() as conn:
            self._insert_rows(conn, n, n)
            conn.commit()

    def _http_sample(self) -> dict[str, Any]:
        """--http-sample actions through the real endpoint, to the paused backlog queues
        (round robin), into a daemon that sends nothing meanwhile."""
        a = self.args
        print(f"\n-- HTTP ingest sample: {a.http_sample:,} actions into the full table")
        with self.db.connect() as conn:
            queues = conn.execute("SELECT id, portal_id FROM queues ORDER BY id").fetchall()
        bodies = []
        for k in range(a.http_sample):
            q, p = queues[k % len(queues)]
            bodies.append(body_for(p, q, f"ap-{p}-{q}-h{k}", k))
        with phase("daemon (queues paused: it sends nothing)"):
            self._start_daemon()
            self._wait_metrics(
                lambda t: harness.metric(t, "throttled_ingest_pending") == 0, 60, "start-up"
            )
        r = self._ingest("intake", bodies)
        with phase("stopping that daemon"):
            sent = completed_of(metrics_of(self.base_url))
            code, took = self._stop_daemon()
            with self.db.connect() as conn:
                got = conn.execute(
                    "SELECT count(*) FROM actions WHERE callback_id LIKE 'ap-%%-h%%'"
                ).fetchone()
            print(
                f"   exit code {code} after {took:.1f} s; {got[0] if got else 0:,} sample rows "
                f"stored for {r['ok']:,} answers 200; callbacks sent meanwhile {sent:,.0f}"
            )
        return r

    def _drain_backlog(self) -> dict[str, Any]:
        a = self.args
        print(f"\n== draining {a.actions:,} actions ==")
        t0 = time.time()
        proc = self.children.start(
            "daemon",
            harness.serve_argv(self.config, self.profile),
            env=harness.child_env(),
            stderr=self.daemon_log,
        )
        self.daemon = proc
        pids = {"daemon": proc.pid, "fake": self.fake.pid, "bench": os.getpid()}
        if self.wiretap is not None:
            pids["wiretap"] = self.wiretap.pid
        mon = Monitor(a.pg_url, self.db, pids, a.sample_s, metrics_url=self.base_url)
        self.monitor = mon
        mon.start()
        harness.wait_http(self.base_url + "/readyz", proc, 120, self.daemon_log)
        ready_at = time.time()
        print(f"   daemon pid {proc.pid} ready after {ready_at - t0:.1f} s")
        deadline = self.started + a.max_seconds - 120  # (room for the stop and the report)
        last_print = 0.0
        progress = (0.0, time.monotonic())  # (completed, when it last moved)
        while True:
            if mon.error is not None:
                raise RuntimeError(f"monitor failed: {mon.error!r}")
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode} while draining")
            s = mon.samples[-1]
            done = s.get("completed", 0.0)
            if done >= a.actions:
                break
            if time.monotonic() > deadline:
                print(f"!! not drained before the time limit: {done:,.0f} of {a.actions:,} done")
                break
            if done > progress[0]:
                progress = (done, time.monotonic())
            elif time.monotonic() - progress[1] > 60:
                print(f"!! no callback completed for 60 s: {done:,.0f} of {a.actions:,} done")
                break
            if time.time() - last_print >= 30:
                last_print = time.time()
                print(
                    f"   +{s['t'] - ready_at:5.0f} s: {done:,.0f} completed, "
                    f"RSS {mib(s['rss']['daemon'])}",
                    flush=True,
                )
            time.sleep(0.5)
        drained_at = time.time()
        time.sleep(1.0)
        mon.stop()
        self.monitor = None
        with phase("stopping the daemon (SIGTERM)"):
            code, took = self._stop_daemon()
            print(f"   exit code {code} after {took:.1f} s")
        wire = None
        if self.wiretap is not None:
            with phase("stopping the wiretap (dumps its capture)"):
                wire = self._stop_wiretap()
        with phase("stopping the fake HubSpot (dumps its receive log)"):
            self.children.stop(self.fake, timeout=120)
            fake = json.loads(self.fake_out.read_text())
            print(f"   {len(fake['requests']):,} requests received")
        with self.db.connect() as conn:
            states = dict(conn.execute("SELECT state, count(*) FROM actions GROUP BY 1").fetchall())
            claims = conn.execute(
                "SELECT extract(epoch FROM claimed_at)::float8, count(*) FROM actions "
                "WHERE claimed_at IS NOT NULL GROUP BY claimed_at"
            ).fetchall()
            marks = conn.execute(
                "SELECT extract(epoch FROM completed_at)::float8, count(*) FROM actions "
                "WHERE completed_at IS NOT NULL AND state = 'done' AND callback_id LIKE 'ap-%%' "
                "GROUP BY completed_at"
            ).fetchall()
        return {
            "t0": t0,
            "ready_at": ready_at,
            "drained_at": drained_at,
            "samples": mon.samples,
            "fake": fake,
            "wire": wire,
            "states": states,
            "claims": claims,
            "marks": marks,
            "exit_code": code,
        }

    def _report_drain(self, run: dict[str, Any]) -> dict[str, Any]:
        """The table by decile, the rate, the window check."""
        a = self.args
        n_total = a.actions
        samples = run["samples"]
        rows = decile_rows(samples, n_total, run["claims"], run["marks"])
        print("\n== drain by remaining backlog (deciles of the completed callbacks) ==")
        print(
            "  remaining         wall s  callbacks/s  daemon s/1k  pg s/1k  daemon cores  "
            "pg cores  rest cores  claims/s  rows/claim  marks/s  dead tuples  RSS MiB"
        )
        for r in rows:
            print(
                f"  {r['label']:<16} {r['wall']:7.1f}  {r['rate']:11,.0f}  {r['daemon_k']:11.3f}  "
                f"{r['pg_k']:7.3f}  {r['daemon_cores']:12.2f}  {r['pg_cores']:8.2f}  "
                f"{r['other_cores']:10.2f}  "
                f"{r['claims_s']:8.1f}  {r['rows_per_claim']:10.1f}  {r['marks_s']:7.1f}  "
                f"{r['dead']:11,}  {r['rss'] / 1024:7.1f}"
            )
        print(
            f"  (rest cores: the rest of the machine's {os.cpu_count()} cores busy: the fake, the "
            "wiretap, this script, PostgreSQL's background processes, anything else running; "
            "claims and marks: distinct claimed_at / completed_at stamps, one per statement)"
        )
        deciles = [r for r in rows if r["decile"] is not None]
        first, last = deciles[0], deciles[-1]
        mid = [r for r in deciles if 1 <= r["decile"] <= 8]
        mid_rate = sum(r["callbacks"] for r in mid) / max(1e-9, sum(r["wall"] for r in mid))
        limit, period = a.rate
        ideal = a.queues * limit / period
        print(
            f"  cost, last decile / first: daemon {ratio(last['daemon_k'], first['daemon_k'])}, "
            f"PostgreSQL {ratio(last['pg_k'], first['pg_k'])} (per 1,000 callbacks; the first "
            "decile's rows exclude the start-up row)"
        )
        print(
            f"  callbacks/s over deciles 2-9: {mid_rate:,.0f} of the ideal {ideal:,.0f} "
            f"({mid_rate / ideal:.1%}); drained in {run['drained_at'] - run['ready_at']:.1f} s "
            f"after ready (ideal {n_total / ideal:.0f} s); rows by state after the stop: "
            f"{run['states']}"
        )
        fake = run["fake"]["requests"]
        status = Counter(str(r[2]) for r in fake)
        completed: Counter[str] = Counter(c for r in fake if r[2] == 204 for c in r[3])
        twice = sum(1 for v in completed.values() if v > 1)
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(status.items()))
        print(
            f"  fake HubSpot: {len(fake):,} requests ({codes}); "
            f"{len(completed):,} callbacks completed, {twice} completed twice"
        )
        wire = run["wire"]
        if wire is not None:
            sends = drain.backlog_sends(wire["requests"])
            source = (
                f"at the wire (kernel stamps; {wire['drops']} packets dropped, "
                f"{wire['stream_gaps']} stream gaps, {wire['unparsed']} unparsed)"
            )
        else:
            sends = drain.backlog_sends((r[0], r[3]) for r in fake)
            source = f"at the fake's handler ({self.wire_note or 'no wiretap'})"
        violations = window_violations(sends, limit, period)
        share = queue_shares(sends, limit, period)
        print(
            f"window violations: {len(violations)} queue(s) with more than {limit} send(s) in "
            f"some {period:g} s window (must be 0; {source}; {len(sends):,} queues, "
            f"{sum(len(t) for t in sends.values()):,} sends)"
        )
        for q in violations[:5]:
            print(f"    {q}")
        print(
            f"queue rate: each queue's achieved share of its limit while it had a backlog: "
            f"median {percentile(share, 50):.1%}, p1 {percentile(share, 1):.1%}, min "
            f"{min(share, default=math.nan):.1%}"
        )
        peak = max(s["rss"]["daemon"] or 0 for s in samples)
        return {
            "rows": rows,
            "first": first,
            "last": last,
            "mid_rate": mid_rate,
            "ideal": ideal,
            "violations": len(violations),
            "source": "wire" if wire is not None else "fake",
            "twice": twice,
            "rss_peak": peak,
            "share_median": percentile(share, 50),
        }

    def _print_explains(self, e: dict[str, dict[str, Any]]) -> None:
        a = self.args
        q = min(a.explain_queues, a.queues)
        print(
            f"\n== EXPLAIN (ANALYZE, BUFFERS) of the claim statement (throttled.db.queries.CLAIM"
            f"), {q:,} queues x {a.explain_rows} row(s), median of 5, each rolled back =="
        )
        print_explain(f"{a.queues:,} pending (fresh table)", e["fresh"])
        print_explain(f"{a.actions:,} pending", e["full"])
        print_explain(f"{a.queues:,} pending after the drain", e["after"])
        print_explain("the same after VACUUM", e["vacuumed"])
        (self.tmp / "explain.txt").write_text(
            "\n\n".join(
                f"== {k}, {name} plan\n{v[name]['text']}"
                for k, v in e.items()
                for name in PLAN_MODES
            )
        )
        print(f"  (text plans in {self.tmp / 'explain.txt'}, kept with --keep)")
        for name in PLAN_MODES:
            print(f"  {name} plan at the full backlog:")
            for line in e["full"][name]["text"].splitlines():
                print("    " + line)

    def _backlog_summary(
        self,
        run: dict[str, Any],
        t: dict[str, Any],
        sample: dict[str, Any] | None,
        e: dict[str, dict[str, Any]],
    ) -> str:
        a = self.args
        bad = harness.print_log_events(self.daemon_log, "daemon log (level >= warning)")
        first, last = t["first"], t["last"]
        ingest_text = f"HTTP ingest {sample['rate']:,.0f}/s" if sample else "no HTTP sample"
        q = e["full"]["auto"]  # (the plan the daemon's prepared statement settles on)

        def ms(point: str) -> str:
            return f"{e[point][q]['exec_ms']:.1f}"

        return (
            f"SUMMARY scale backlog: {a.actions:,} actions, {a.queues:,} queues x "
            f"{self.policy.describe()}: drained in {run['drained_at'] - run['ready_at']:.0f} s, "
            f"{t['mid_rate']:,.0f} callbacks/s (ideal {t['ideal']:,.0f}); daemon CPU per 1,000 "
            f"first decile {first['daemon_k']:.3f} s, last {last['daemon_k']:.3f} s; PostgreSQL "
            f"{first['pg_k']:.3f} / {last['pg_k']:.3f} s; claim EXPLAIN ({q} plan) {ms('fresh')}"
            f" ms at {a.queues:,} pending, {ms('full')} ms at {a.actions:,}, {ms('after')} ms "
            f"after the drain ({ms('vacuumed')} vacuumed); window violations {t['violations']} "
            f"({t['source']}); completed twice {t['twice']}; {ingest_text}; peak RSS "
            f"{mib(t['rss_peak'])}; daemon log "
            f"warnings+ {bad}"
        )


# -- the drain's figures --------------------------------------------------------------------------


def ratio(x: float, y: float) -> str:
    """x / y as 'N.NNx'."""
    return f"{x / y:.2f}x" if y > 0 else "n/a"


def decile_rows(
    samples: list[dict[str, Any]],
    total: int,
    claims: Sequence[tuple[float, int]],
    marks: Sequence[tuple[float, int]],
) -> list[dict[str, Any]]:
    """Each interval between samples, split over the deciles of completed callbacks it
    spans (in proportion); the intervals before the first completion are the start-up row,
    those after the last, the tail. Claim and mark-done statements (distinct claimed_at,
    completed_at) are put in the row whose time span holds them."""
    keys = ("wall", "callbacks", "daemon", "postgres", "machine", "claims", "claim_rows", "marks")
    acc: dict[Any, dict[str, float]] = {}
    spans: list[tuple[float, float, Any]] = []
    dead: dict[Any, int] = {}
    rss: dict[Any, int] = {}

    def add(key: Any, f: float, d: dict[str, float], n: float, t0: float, t1: float) -> None:
        row = acc.setdefault(key, dict.fromkeys(keys, 0.0))
        row["wall"] += f * d["wall"]
        row["callbacks"] += n
        row["daemon"] += f * d["daemon"]
        row["postgres"] += f * d["postgres"]
        row["machine"] += f * d["machine"]
        spans.append((t0, t1, key))

    for a, b in itertools.pairwise(samples):
        ca, cb = min(total, a.get("completed", 0.0)), min(total, b.get("completed", 0.0))
        d = cpu_delta(a, b)
        touched: list[Any] = []
        if cb <= ca:
            key = (
                "start-up" if ca <= 0 else ("tail" if ca >= total else min(9, int(ca * 10 / total)))
            )
            add(key, 1.0, d, 0.0, a["t"], b["t"])
            touched.append(key)
        else:
            for k in range(10):
                lo, hi = k * total / 10, (k + 1) * total / 10
                overlap = min(hi, cb) - max(lo, ca)
                if overlap > 0:
                    f = overlap / (cb - ca)
                    t0 = a["t"] + (max(lo, ca) - ca) / (cb - ca) * (b["t"] - a["t"])
                    t1 = a["t"] + (min(hi, cb) - ca) / (cb - ca) * (b["t"] - a["t"])
                    add(k, f, d, overlap, t0, t1)
                    touched.append(k)
        for key in touched:  # (as of the end of the interval)
            dead[key] = b.get("dead", 0)
            rss[key] = b["rss"].get("daemon") or 0
    for stamps, name in ((claims, "claims"), (marks, "marks")):
        for t, n in stamps:
            for t0, t1, key in spans:
                if t0 <= t < t1:
                    acc[key][name] += 1
                    if name == "claims":
                        acc[key]["claim_rows"] += n
                    break
    order = ["start-up", *range(10), "tail"]
    out = []
    for key in order:
        r = acc.get(key)
        if r is None:
            continue
        n, wall = r["callbacks"], max(1e-9, r["wall"])
        if isinstance(key, int):
            label = f"{total - key * total // 10:>9,} →{total - (key + 1) * total // 10:>9,}"
        else:
            label = key
        out.append(
            {
                "decile": key if isinstance(key, int) else None,
                "label": label,
                "wall": r["wall"],
                "callbacks": n,
                "rate": n / wall,
                "daemon_k": r["daemon"] / n * 1000 if n else math.nan,
                "pg_k": r["postgres"] / n * 1000 if n else math.nan,
                "daemon_cores": r["daemon"] / wall,
                "pg_cores": r["postgres"] / wall,
                "other_cores": (r["machine"] - r["daemon"] - r["postgres"]) / wall,
                "claims_s": r["claims"] / wall,
                "rows_per_claim": r["claim_rows"] / r["claims"] if r["claims"] else math.nan,
                "marks_s": r["marks"] / wall,
                "dead": dead.get(key, 0),
                "rss": rss.get(key, 0),
            }
        )
    return out


def window_violations(sends: dict[str, list[float]], limit: int, period: float) -> list[str]:
    """Queues with more than `limit` sends in some half-open window of `period` s."""
    return [q for q, t in sends.items() if max_in_window(t, period) > limit]


def queue_shares(sends: dict[str, list[float]], limit: int, period: float) -> list[float]:
    """Each queue's share of its limit while it drained: the time its sends would take at
    exactly its limit (window pacing: a batch of `limit` every `period`) over the time they
    took, first send to last."""
    out = []
    for t in sends.values():
        batches = math.ceil(len(t) / limit)
        if batches < 2:
            continue
        took = max(t) - min(t)
        out.append((batches - 1) * period / took if took > 0 else math.nan)
    return out


def main() -> int:
    """Run the benchmark."""
    args = parse_args()
    return harness.run_main(f"scale {args.mode}", ScaleBench(args))


if __name__ == "__main__":
    sys.exit(main())
