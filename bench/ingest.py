"""Ingest benchmark: signed ~1 KiB actions over loopback, the daemon against a bare server.

Phases, all in one run:

1. bare   - bench/bare_server.py (reads the body, answers the same 200 BLOCK JSON, no I/O)
            under wrk (T threads, C connections, D seconds), cycling through the
            pre-signed requests.
2. daemon - `throttled serve` (scratch PostgreSQL database, built-in fake HubSpot, defaults
            of 1 per day so the sender stays idle) under the same wrk load; each pre-signed
            request is sent at most once (a wrk thread stops when its share runs out), so
            every 200 is a distinct callbackId.
3. half   - the daemon at half of the rate measured in phase 2, from an open-loop client
            (2 processes, raw keep-alive HTTP/1.1 on asyncio streams, requests scheduled at a
            constant rate; latency is measured from each request's scheduled instant, so a
            stall is not hidden).
4. floor  - the same fixed-rate client against the bare server, to show what the client
            and the machine add by themselves.

Then the daemon is stopped (SIGTERM) and the `actions` table is checked against the answers:
every callbackId answered 200 must have its row.

Without wrk (apt-get install -y wrk), phases 1 and 2 use the same Python client in closed
loop (2 processes, the same number of connections in total) instead; it says so loudly.

The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import fmt_ms, percentile, phase

from throttled.hubspot.signature import sign_headers

PORTAL = 62515
ACTION_ID = 7
ACTION_PATH = "/api/hubspot/action"
FILLER = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "

# wrk script: each thread reads its own file of pre-built HTTP requests ("<len>\n<raw>").
# mode "once": stop the thread when its file is exhausted (no callbackId is sent twice);
# mode "cycle": start over (for the bare server, where repeats cost nothing different).
WRK_LUA = r"""
local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  f = assert(io.open(args[1] .. "." .. tid, "rb"))
  mode = args[2]
  sent, wraps, exhausted, block = 0, 0, 0, 0
  st = {}
end

local function next_request()
  local n = f:read("*l")
  if n == nil then
    if mode == "once" then return nil end
    wraps = wraps + 1
    f:seek("set", 0)
    n = f:read("*l")
  end
  return f:read(tonumber(n))
end

function request()
  local r = next_request()
  if r == nil then
    exhausted = 1
    wrk.thread:stop()
    return wrk.format("GET", "/healthz")
  end
  sent = sent + 1
  return r
end

function response(status, headers, body)
  local k = tostring(status)
  st[k] = (st[k] or 0) + 1
  if status == 200 and body and string.find(body, "BLOCK", 1, true) then
    block = block + 1
  end
end

function done(summary, latency, requests)
  local tot = {sent = 0, wraps = 0, exhausted = 0, block = 0}
  local st_all = {}
  for _, t in ipairs(threads) do
    for k, _ in pairs(tot) do tot[k] = tot[k] + (t:get(k) or 0) end
    for code, n in pairs(t:get("st") or {}) do st_all[code] = (st_all[code] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(st_all) do parts[#parts + 1] = string.format('"%s":%d', code, n) end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"duration_us":%d,"requests":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"p999_us":%d,"max_us":%d,"sent":%d,"block":%d,"exhausted":%d,' ..
    '"wraps":%d,"status":{%s}}\n',
    summary.duration, summary.requests, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, tot.sent, tot.block, tot.exhausted, tot.wraps,
    table.concat(parts, ",")))
end
"""


# -- request bodies ---------------------------------------------------------------------------


def make_body(i: int, tag: str, queues: int, size: int, fields: str) -> bytes:
    """A custom-action request body of about `size` bytes with callbackId ap-P-WF-<tag><i>-0."""
    wf = 1 + i % queues
    doc: dict[str, Any] = {
        "callbackId": f"ap-{PORTAL}-{wf}-{tag}{i}-0",
        "origin": {
            "portalId": PORTAL,
            "actionDefinitionId": ACTION_ID,
            "actionDefinitionVersion": 1,
            "actionExecutionIndexIdentifier": {"enrollmentId": i, "actionExecutionIndex": 0},
            "extensionDefinitionId": ACTION_ID,
            "extensionDefinitionVersionId": 1,
        },
        "context": {"source": "WORKFLOWS", "workflowId": wf},
        "object": {"objectId": 1_000_000 + i, "objectType": "CONTACT"},
        "inputFields": {},
    }
    if fields == "unique":  # record-specific values, as `{{contact.email}}` fields give
        doc["inputFields"] = {"email": f"user{tag}{i}@example.com", "note": f"{tag}{i}:"}
    else:  # the step's configuration only: the same for every action of a workflow
        doc["inputFields"] = {"segment": f"wf{wf}", "note": f"wf{wf}:"}
    base = len(json.dumps(doc, separators=(",", ":")))
    need = max(0, size - base)
    note = doc["inputFields"]["note"]
    doc["inputFields"]["note"] = (note + FILLER * (need // len(FILLER) + 1))[: len(note) + need]
    return json.dumps(doc, separators=(",", ":")).encode()


def signed_requests(
    indices: range, tag: str, args: argparse.Namespace, secret: str, url: str
) -> Iterator[tuple[bytes, dict[str, str]]]:
    """(body, headers) for each index, signed v2 for `url`."""
    for i in indices:
        body = make_body(i, tag, args.queues, args.body_size, args.input_fields)
        headers = {"Content-Type": "application/json"}
        headers.update(sign_headers(secret, "POST", url, body, version="v2"))
        yield body, headers


def write_wrk_files(prefix: Path, args: argparse.Namespace, secret: str, url: str) -> int:
    """One file of raw HTTP requests per wrk thread (thread t gets i % T == t); total bytes."""
    files = [open(f"{prefix}.{t}", "wb") for t in range(args.threads)]  # noqa: SIM115
    total = 0
    try:
        for i, (body, headers) in enumerate(
            signed_requests(range(args.requests), "", args, secret, url)
        ):
            raw = raw_request(body, headers)
            files[i % args.threads].write(b"%d\n" % len(raw) + raw)
            total += len(body)
    finally:
        for f in files:
            f.close()
    return total


# -- load generators --------------------------------------------------------------------------


def run_wrk(
    base_url: str, prefix: Path, mode: str, args: argparse.Namespace, lua: Path, duration: float
) -> dict[str, Any]:
    """Run wrk against base_url; return the figures its done() printed."""
    argv = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        base_url + ACTION_PATH,
        "--",
        str(prefix),
        mode,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 120, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    r: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
    seconds = r["duration_us"] / 1e6
    ok = r["block"]
    return {
        "tool": "wrk",
        "seconds": seconds,
        "responses": r["requests"],
        "ok": ok,
        "rps": r["requests"] / seconds,
        "ok_rps": ok / seconds,
        "p50": r["p50_us"] / 1e6,
        "p90": r["p90_us"] / 1e6,
        "p99": r["p99_us"] / 1e6,
        "p999": r["p999_us"] / 1e6,
        "max": r["max_us"] / 1e6,
        "status": {k: v for k, v in r["status"].items()},
        "socket_errors": {
            k: r[f"err_{k}"] for k in ("connect", "read", "write", "timeout") if r[f"err_{k}"]
        },
        "exhausted": r["exhausted"],
        "wraps": r["wraps"],
        "sent": r["sent"],
        "loadgen_cpu_s": cpu,
    }


def run_clients(
    children: harness.Children,
    tmp: Path,
    name: str,
    client_args: list[str],
    procs: int,
    timeout: float,
    on_start: Callable[[], None] = lambda: None,
) -> list[dict[str, Any]]:
    """Start `procs` client processes, release them together, collect their JSON results.

    `on_start` is called when the clients begin (after they have built their requests)."""
    go = tmp / f"{name}.go"
    go.unlink(missing_ok=True)
    started = []
    for p in range(procs):
        out = tmp / f"{name}.{p}.json"
        out.unlink(missing_ok=True)
        (tmp / f"{name}.{p}.ready").unlink(missing_ok=True)
        argv = [harness.PYTHON, __file__, "_client", *client_args]
        argv += ["--proc-index", str(p), "--procs", str(procs), "--out", str(out)]
        argv += ["--go-file", str(go), "--ready-file", str(tmp / f"{name}.{p}.ready")]
        proc = children.start(f"{name}-{p}", argv, env=harness.child_env(), stderr=tmp / "c.err")
        started.append((proc, out))
    deadline = time.monotonic() + 120
    while not all((tmp / f"{name}.{p}.ready").exists() for p in range(procs)):
        if any(proc.poll() is not None for proc, _ in started):
            raise RuntimeError(f"a {name} client exited early:\n{_tail(tmp / 'c.err')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} clients not ready within 120 s")
        time.sleep(0.05)
    start_at = time.time() + 0.3
    go.write_text(repr(start_at))
    time.sleep(max(0.0, start_at - time.time()))
    on_start()
    results = []
    for proc, out in started:
        proc.wait(timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{name} client exited {proc.returncode}:\n{_tail(tmp / 'c.err')}")
        results.append(json.loads(out.read_text()))
    return results


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def merge_clients(results: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Combine per-process client results."""
    lat = [x for r in results for x in r["lat_sched"]]
    service = [x for r in results for x in r["lat_service"]]
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for r in results:
        status.update(r["status"])
        errors.update(r["errors"])
    ok = sum(r["ok"] for r in results)
    seconds = max(r["elapsed"] for r in results) or duration
    return {
        "tool": "raw asyncio client",
        "seconds": seconds,
        "responses": sum(status.values()),
        "ok": ok,
        "rps": sum(status.values()) / seconds,
        "ok_rps": ok / seconds,
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "p999": percentile(lat, 99.9),
        "max": max(lat, default=math.nan),
        "service_p50": percentile(service, 50),
        "service_p99": percentile(service, 99),
        "status": dict(status),
        "socket_errors": dict(errors),
        "ok_ids": [i for r in results for i in r["ok_ids"]],
        "max_lag": max(r["max_lag"] for r in results),
        "scheduled": sum(r["scheduled"] for r in results),
        "loadgen_cpu_s": sum(r["cpu_s"] for r in results),
    }


# -- the client process -----------------------------------------------------------------------


class RawPool:
    """Keep-alive HTTP/1.1 connections to one server, raw bytes out, minimal parsing in.

    Far cheaper per request than aiohttp's client, which matters on 2 cores shared with the
    server under test."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.opened = 0

    async def open_all(self) -> None:
        """Connect every connection up front, outside the measured time."""
        while self.opened < self.size:
            self.opened += 1
            self.idle.append(await asyncio.open_connection(self.host, self.port))

    async def acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle connection (waiting for one if all are busy)."""
        while not self.idle:
            if self.opened < self.size:
                self.opened += 1
                return await asyncio.open_connection(self.host, self.port)
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter
        return self.idle.pop()

    def release(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], ok: bool) -> None:
        """Give a connection back (or drop it after an error)."""
        if ok:
            self.idle.append(conn)
        else:
            conn[1].close()
            self.opened -= 1
        while self.waiters:
            waiter = self.waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                break

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send one pre-built request; return (status, body)."""
        conn = await self.acquire()
        reader, writer = conn
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"content-length:")
            length = int(lower[at + 15 : lower.find(b"\r\n", at)]) if at >= 0 else 0
            body = await reader.readexactly(length)
        except BaseException:
            self.release(conn, False)
            raise
        self.release(conn, b"connection: close" not in lower)
        return status, body

    def close(self) -> None:
        """Close the idle connections."""
        for _, writer in self.idle:
            writer.close()


def raw_request(body: bytes, headers: dict[str, str]) -> bytes:
    """The HTTP/1.1 request bytes for one signed action."""
    head = f"POST {ACTION_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    """Open loop (constant rate) or closed loop (N connections), from pre-signed requests."""
    tag = f"{args.tag}{args.proc_index}x"
    count = args.count
    signed = list(signed_requests(range(count), tag, args, args.secret, args.signed_url))
    requests = [raw_request(body, headers) for body, headers in signed]
    ids = [json.loads(body)["callbackId"] for body, _ in signed]
    del signed
    host, _, port = args.url.removeprefix("http://").partition(":")
    pool = RawPool(host, int(port), args.connections)
    await pool.open_all()
    Path(args.ready_file).write_text("ready")
    go = Path(args.go_file)
    while not go.exists():
        await asyncio.sleep(0.01)
    start_at = float(go.read_text())
    await asyncio.sleep(max(0.0, start_at - time.time()))

    lat_sched: list[float] = []
    lat_service: list[float] = []
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    ok_ids: list[str] = []
    t0 = time.monotonic()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    stop_at = t0 + args.duration
    max_lag = 0.0

    async def one(i: int, scheduled: float) -> None:
        sent = time.monotonic()
        try:
            async with asyncio.timeout(10.0):  # (wait_for would start one more task each)
                code, text = await pool.request(requests[i])
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
        ) as exc:
            errors[type(exc).__name__] += 1
            return
        end = time.monotonic()
        status[str(code)] += 1
        lat_sched.append(end - scheduled)
        lat_service.append(end - sent)
        if code == 200 and b"BLOCK" in text:
            ok_ids.append(ids[i])

    scheduled = 0
    if args.mode == "open":
        tasks = []
        rate = args.rate
        while scheduled < count:
            now = time.monotonic()
            if now >= stop_at:
                break
            due = min(count, int((now - t0) * rate) + 1)
            while scheduled < due:
                at = t0 + scheduled / rate
                max_lag = max(max_lag, now - at)
                tasks.append(asyncio.create_task(one(scheduled, at)))
                scheduled += 1
            await asyncio.sleep(max(0.0, t0 + scheduled / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    else:
        it = iter(range(count))

        async def worker() -> None:
            nonlocal scheduled
            for i in it:
                if time.monotonic() >= stop_at:
                    return
                scheduled += 1
                await one(i, time.monotonic())

        await asyncio.gather(*(worker() for _ in range(args.connections)))
    elapsed = min(time.monotonic(), stop_at) - t0 if args.mode == "closed" else args.duration
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    pool.close()
    return {
        "cpu_s": usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime,
        "lat_sched": lat_sched,
        "lat_service": lat_service,
        "status": dict(status),
        "errors": dict(errors),
        "ok": len(ok_ids),
        "ok_ids": ok_ids,
        "max_lag": max_lag,
        "elapsed": elapsed,
        "scheduled": scheduled,
    }


def client_command(argv: list[str]) -> int:
    """`ingest.py _client …`: one load-generating process (internal)."""
    p = argparse.ArgumentParser(prog="ingest.py _client")
    p.add_argument("--url", required=True)
    p.add_argument("--signed-url", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--mode", choices=("open", "closed"), required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--queues", type=int, required=True)
    p.add_argument("--body-size", type=int, required=True)
    p.add_argument("--input-fields", required=True)
    p.add_argument("--proc-index", type=int, required=True)
    p.add_argument("--procs", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--go-file", required=True)
    p.add_argument("--ready-file", required=True)
    args = p.parse_args(argv)
    result = asyncio.run(client_main(args))
    Path(args.out).write_text(json.dumps(result))
    return 0


# -- the benchmark ----------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short smoke run (~15 s of load)")
    p.add_argument("--requests", type=int, help="pre-signed requests for wrk (default 450000)")
    p.add_argument("--queues", type=int, default=1000, help="distinct workflowIds (queues)")
    p.add_argument("--body-size", type=int, default=1024, help="request body bytes")
    p.add_argument(
        "--input-fields",
        choices=("unique", "per-queue"),
        default="unique",
        help="inputFields differ per request (default) or only per workflow",
    )
    p.add_argument("--duration", type=float, help="seconds per wrk phase (default 20)")
    p.add_argument("--half-duration", type=float, help="seconds of the half-rate phase (20)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--connections", type=int, default=64, help="wrk connections")
    p.add_argument("--client-procs", type=int, default=2, help="processes of the Python client")
    p.add_argument("--rate-connections", type=int, default=64, help="per half-rate process")
    p.add_argument("--half-rate", type=float, help="fixed rate for phase 3 (default: max/2)")
    p.add_argument("--no-wrk", action="store_true", help="use the Python client even if wrk")
    p.add_argument("--skip-bare", action="store_true", help="skip the bare-server phase")
    harness.add_common_args(p)
    args = p.parse_args()
    args.duration = args.duration or (4.0 if args.quick else 20.0)
    args.half_duration = args.half_duration or (4.0 if args.quick else 20.0)
    args.requests = args.requests or (60_000 if args.quick else 450_000)
    return args


class IngestBench(harness.Bench):
    """One run: bare server, daemon at max, daemon at half rate, durability check."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, "ingest")
        self.signed_url = self.base_url + ACTION_PATH
        self.wrk = shutil.which("wrk") if not args.no_wrk else None
        self.results: dict[str, Any] = {}
        self.server_pids: dict[str, int] = {}
        self.bare_url = ""
        self._before: dict[str, Any] = {}

    def run(self) -> str:
        """The whole benchmark; returns the summary line."""
        a = self.args
        self._describe()
        with phase("scratch database + migrate"):
            self.db.create()
            self._write_config()
            out = harness.run_cli(["migrate", "--config", str(self.config)], harness.child_env())
            print("   " + out.strip())
        if self.wrk:
            with phase(f"pre-signing {a.requests:,} requests for wrk"):
                size = write_wrk_files(self.tmp / "req", a, self.secret, self.signed_url)
                print(f"   {a.requests:,} bodies, mean {size / a.requests:.0f} B")
        else:
            why = "not used (--no-wrk)" if a.no_wrk else "not found (apt-get install -y wrk)"
            print(
                f"!! wrk {why}: phases 1-2 use the closed-loop "
                f"Python client ({a.client_procs} processes, {a.connections} "
                "connections in total), which is slower than wrk and shares the 2 cores"
            )
        self.meter = harness.CpuMeter(a.pg_url, self.db.name)
        if not a.skip_bare:
            self._start_bare()
            self.results["bare"] = self._measured(
                "phase 1: bare aiohttp server, max rate",
                "bare",
                lambda: self._load(self.bare_url, "cycle", a.duration, "b"),
            )
        self.results["daemon"] = self._daemon_phases()
        if not a.skip_bare:
            rate = self.results["daemon"]["half_rate"]
            self.results["bare_half"] = self._measured(
                f"phase 4: bare aiohttp server at the same fixed {rate:,.0f}/s "
                "(what the client and the machine add by themselves)",
                "bare @ fixed",
                lambda: self._fixed_rate(self.bare_url, rate, "g"),
            )
        return self._report()

    def _describe(self) -> None:
        a = self.args
        print(f"ingest benchmark: temp dir {self.tmp}, database {self.db.name}")
        print(
            f"load: {a.threads} wrk threads / {a.connections} connections, {a.duration:g} s "
            f"per phase; body ~{a.body_size} B, {a.queues} queues, inputFields {a.input_fields}"
        )
        with harness.psycopg.connect(a.pg_url) as conn:
            rows = conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync','synchronous_commit','wal_sync_method','shared_buffers')"
            ).fetchall()
        print("postgresql: " + ", ".join(f"{n}={s}" for n, s in rows))
        print(f"cpus: {os.cpu_count()}")

    def _write_config(self) -> None:
        harness.write_config(
            self.config,
            harness.merged(
                {
                    "server": {
                        "host": "127.0.0.1",
                        "port": self.port,
                        "public_url": self.base_url,
                        "shutdown_timeout_s": 20.0,
                    },
                    "database": {"url": self.db.url, "data_dir": str(self.tmp / "var")},
                    "hubspot": {
                        "mock": True,
                        "client_id": "bench-client-id",
                        "client_secret": self.secret,
                    },
                    "defaults": {"max_throughput": 1, "time_period": 1, "time_unit": "days"},
                    "logging": {"level": "warning", "format": "json"},
                },
                harness.config_overrides(self.args.daemon_config),
            ),
        )

    def _load(self, base_url: str, mode: str, duration: float, tag: str) -> dict[str, Any]:
        """Max-rate load: wrk, or the closed-loop Python client."""
        a = self.args
        if self.wrk:
            lua = self.tmp / "ingest.lua"
            lua.write_text(WRK_LUA)
            return run_wrk(base_url, self.tmp / "req", mode, a, lua, duration)
        per_proc = max(1, a.connections // a.client_procs)
        client_args = self._client_args(base_url, tag, duration)
        client_args += ["--mode", "closed", "--connections", str(per_proc)]
        client_args += ["--count", str(math.ceil(a.requests / a.client_procs))]
        results = run_clients(
            self.children,
            self.tmp,
            tag,
            client_args,
            a.client_procs,
            duration + 60,
            self._mark_start,
        )
        return merge_clients(results, duration)

    def _client_args(self, base_url: str, tag: str, duration: float) -> list[str]:
        a = self.args
        return [
            "--url", base_url, "--signed-url", self.signed_url, "--secret", self.secret,
            "--duration", str(duration), "--tag", tag, "--queues", str(a.queues),
            "--body-size", str(a.body_size), "--input-fields", a.input_fields,
        ]  # fmt: skip

    def _start_bare(self) -> None:
        port = harness.free_port()
        self.bare_url = f"http://127.0.0.1:{port}"
        log = self.tmp / "bare.log"
        argv = [harness.PYTHON, str(harness.BENCH / "bare_server.py"), "--port", str(port)]
        proc = self.children.start("bare", argv, env=harness.child_env(), stderr=log)
        harness.wait_http(self.bare_url + "/healthz", proc, 20, log)
        self.server_pids["bare"] = proc.pid

    def _measured(
        self, title: str, name: str, load: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Run one load phase, with the CPU used by each party during it."""
        with phase(title):
            self._mark_start()
            r = load()
            cpu = harness.CpuMeter.delta(self._before, self.meter.snapshot(self.server_pids))
            cpu["loadgen"] = r["loadgen_cpu_s"]
            r["cpu"] = cpu
            self._print_load(name, r)
            names = [*self.server_pids, "postgres", "loadgen"]
            print("   cpu: " + harness.cpu_text(cpu, names))
        return r

    def _mark_start(self) -> None:
        """The load starts now: CPU is counted from here."""
        assert self.meter is not None
        self._before = self.meter.snapshot(self.server_pids)

    def _fixed_rate(self, base_url: str, rate: float, tag: str) -> dict[str, Any]:
        """The open-loop client at `rate` requests/s in total."""
        a = self.args
        per = rate / a.client_procs
        client_args = self._client_args(base_url, tag, a.half_duration)
        client_args += ["--mode", "open", "--rate", str(per)]
        client_args += ["--connections", str(a.rate_connections)]
        client_args += ["--count", str(math.ceil(per * a.half_duration))]
        results = run_clients(
            self.children,
            self.tmp,
            tag,
            client_args,
            a.client_procs,
            a.half_duration + 60,
            self._mark_start,
        )
        return merge_clients(results, a.half_duration)

    def _daemon_phases(self) -> dict[str, Any]:
        a = self.args
        argv = harness.serve_argv(self.config, self.profile)
        proc = self.children.start("daemon", argv, env=harness.child_env(), stderr=self.daemon_log)
        harness.wait_http(self.base_url + "/readyz", proc, 60, self.daemon_log)
        self.server_pids = {"daemon": proc.pid, **self.server_pids}
        r: dict[str, Any] = {"pid": proc.pid}
        r["max"] = self._measured(
            "phase 2: throttled serve, max rate",
            "daemon",
            lambda: self._load(self.base_url, "once", a.duration, "c"),
        )
        if r["max"].get("exhausted"):
            print(
                "   note: wrk used up the pre-signed requests before the end "
                "(use --requests to make more); the rate is over the time it ran"
            )
        rate = a.half_rate or r["max"]["ok_rps"] / 2
        r["half_rate"] = rate
        r["half"] = self._measured(
            f"phase 3: throttled serve at a fixed {rate:,.0f}/s for {a.half_duration:g} s",
            "daemon @ half",
            lambda: self._fixed_rate(self.base_url, rate, "h"),
        )
        text = harness.http_get(self.base_url + "/metrics")
        r["accepted_metric"] = harness.metric(text, "throttled_actions_accepted_total")
        with phase("stopping the daemon (SIGTERM)"):
            t = time.monotonic()
            r["exit_code"] = self.children.stop(proc, timeout=40)
            r["stop_s"] = time.monotonic() - t
            del self.server_pids["daemon"]
            print(f"   exit code {r['exit_code']} after {r['stop_s']:.1f} s")
        r["db"] = self._check_rows(r)
        return r

    def _print_load(self, name: str, r: dict[str, Any]) -> None:
        codes = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["status"].items()))
        print(
            f"   {name}: {r['rps']:,.0f} responses/s ({r['ok_rps']:,.0f}/s 200 BLOCK) over "
            f"{r['seconds']:.1f} s [{r['tool']}]; latency p50 {fmt_ms(r['p50'])}, p90 "
            f"{fmt_ms(r['p90'])}, p99 {fmt_ms(r['p99'])}, p99.9 {fmt_ms(r['p999'])}, "
            f"max {fmt_ms(r['max'])}"
        )
        print(f"   status codes: {codes or 'none'}; socket errors: {r['socket_errors'] or 'none'}")
        if "service_p99" in r:
            print(
                f"   (from send instead of schedule: p50 {fmt_ms(r['service_p50'])}, p99 "
                f"{fmt_ms(r['service_p99'])}; client's worst scheduling lag "
                f"{fmt_ms(r['max_lag'])}; {r['scheduled']:,} scheduled)"
            )

    def _check_rows(self, r: dict[str, Any]) -> dict[str, Any]:
        """Rows in `actions` against the 200 answers."""
        ids = r["half"]["ok_ids"]
        with self.db.connect() as conn:
            total = conn.execute("SELECT count(*) FROM actions").fetchone()
            # Each group commit stamps its rows with its own now(): distinct received_at values
            # count the INSERT statements.
            wrk_rows = conn.execute(
                "SELECT count(*), count(DISTINCT received_at) FROM actions "
                "WHERE callback_id ~ '^ap-[0-9]+-[0-9]+-c?[0-9]+'"
            ).fetchone()
            half_rows = conn.execute(
                "SELECT count(*), count(DISTINCT received_at) FROM actions "
                "WHERE callback_id LIKE %s",
                (f"ap-{PORTAL}-%-h%",),
            ).fetchone()
            present = conn.execute(
                "SELECT count(*) FROM actions WHERE callback_id = ANY(%s)", (ids,)
            ).fetchone()
            queues = conn.execute("SELECT count(*) FROM queues").fetchone()
            states = conn.execute("SELECT state, count(*) FROM actions GROUP BY 1").fetchall()
        return {
            "total": total[0] if total else 0,
            "max_rows": wrk_rows[0] if wrk_rows else 0,
            "half_rows": half_rows[0] if half_rows else 0,
            "max_commits": wrk_rows[1] if wrk_rows else 0,
            "half_commits": half_rows[1] if half_rows else 0,
            "half_ok_present": present[0] if present else 0,
            "queues": queues[0] if queues else 0,
            "states": dict(states),
        }

    def _report(self) -> str:
        a = self.args
        d = self.results["daemon"]
        bare = self.results.get("bare")
        mx, half, db = d["max"], d["half"], d["db"]
        print("\n== ingest results ==")
        if bare:
            print(
                f"bare aiohttp   : {bare['ok_rps']:>9,.0f} req/s   p50 {fmt_ms(bare['p50'])}"
                f"  p99 {fmt_ms(bare['p99'])}"
            )
        per_action = {k: mx["cpu"][k] / max(1, mx["ok"]) * 1e6 for k in ("daemon", "postgres")}
        print(
            f"throttled      : {mx['ok_rps']:>9,.0f} req/s   p50 {fmt_ms(mx['p50'])}"
            f"  p99 {fmt_ms(mx['p99'])}   (CPU per action: daemon {per_action['daemon']:.0f} µs,"
            f" PostgreSQL backends {per_action['postgres']:.0f} µs)"
        )
        print(
            f"group commits  : {db['max_commits']:,} INSERTs for {db['max_rows']:,} rows at max "
            f"rate ({db['max_rows'] / max(1, db['max_commits']):.1f} rows each), "
            f"{db['half_commits']:,} for {db['half_rows']:,} at half rate "
            f"({db['half_rows'] / max(1, db['half_commits']):.1f} rows each)"
        )
        ratio = mx["ok_rps"] / bare["ok_rps"] if bare else math.nan
        print(f"ratio daemon/bare: {ratio:.2f} (target >= 0.6)")
        print(
            f"half rate      : {half['ok_rps']:>9,.0f} req/s (asked {d['half_rate']:,.0f})"
            f"   p50 {fmt_ms(half['p50'])}  p99 {fmt_ms(half['p99'])} (target < 50 ms)"
            f"  max {fmt_ms(half['max'])}"
        )
        non200: Counter[str] = Counter()
        for res in (mx, half):
            non200.update({k: v for k, v in res["status"].items() if k != "200"})
            non200.update({f"socket {k}": v for k, v in res["socket_errors"].items()})
        non200_text = ", ".join(f"{k}: {v:,}" for k, v in sorted(non200.items())) or "none"
        bh = self.results.get("bare_half")
        if bh:
            print(
                f"bare, same rate: {bh['ok_rps']:>9,.0f} req/s   p50 {fmt_ms(bh['p50'])}"
                f"  p99 {fmt_ms(bh['p99'])}  max {fmt_ms(bh['max'])}  (client + machine floor)"
            )
        print(f"daemon non-200 answers: {non200_text}")
        ok200 = mx["ok"] + half["ok"]
        inflight = a.connections  # requests in flight when the load generator stopped
        max_ok = mx["ok"] <= db["max_rows"] <= mx["ok"] + inflight
        half_ok = db["half_ok_present"] == half["ok"] == db["half_rows"]
        durable = max_ok and half_ok
        print(
            f"durability: rows in actions {db['total']:,} (states {db['states']}), "
            f"distinct 200 BLOCK answers {ok200:,}; accepted metric {d['accepted_metric']}"
        )
        print(
            f"  max-rate phase : {db['max_rows']:,} rows for {mx['ok']:,} answers 200 "
            f"(a row may exist without its answer for requests cut off by the end of the "
            f"load, at most {inflight}): {'OK' if max_ok else 'MISMATCH'}"
        )
        print(
            f"  half-rate phase: {db['half_ok_present']:,} of {half['ok']:,} callbackIds "
            f"answered 200 have their row; {db['half_rows']:,} rows in all: "
            f"{'OK' if half_ok else 'MISMATCH'}"
        )
        print(f"daemon stopped with exit code {d['exit_code']} in {d['stop_s']:.1f} s")
        bad = harness.print_log_events(self.daemon_log, "daemon log (level >= warning)")
        if self.profile is not None:
            harness.print_profile(self.profile)
            print("!! --profile: the daemon ran under cProfile; its figures above are not valid")
        if a.keep:
            print(f"kept {self.tmp}")
        return (
            f"SUMMARY ingest: throttled {mx['ok_rps']:,.0f} req/s vs bare "
            f"{bare['ok_rps'] if bare else math.nan:,.0f} req/s = {ratio:.2f} (target >=0.6); "
            f"p50/p99 at max {fmt_ms(mx['p50'])}/{fmt_ms(mx['p99'])}; p99 at half rate "
            f"{d['half_rate']:,.0f}/s {fmt_ms(half['p99'])} (target <50 ms); rows "
            f"{db['total']:,} vs 200s {ok200:,} {'OK' if durable else 'MISMATCH'}; non-200 "
            f"{sum(non200.values())}; daemon log warnings+ {bad}"
        )


def main() -> int:
    """Run the benchmark (or, internally, one client process)."""
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client_command(sys.argv[2:])
    args = parse_args()
    return harness.run_main("ingest", IngestBench(args))


if __name__ == "__main__":
    sys.exit(main())
