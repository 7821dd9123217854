"""Fuzz the action endpoint of a real running daemon with hypothesis.

How hypothesis is driven
------------------------
``@given`` cannot take the function-scoped async fixtures (database, fake HubSpot, daemon),
and the daemon lives in the test's event loop, which a synchronous ``@given`` body cannot
await on. So each test starts ONE daemon, then calls an ordinary ``@given``-decorated inner
function in a worker thread (``asyncio.to_thread``). Each example hands its HTTP request to
the daemon's loop with ``asyncio.run_coroutine_threadsafe`` and blocks on the answer; the
loop stays free to serve it. Database checks use a synchronous psycopg connection in that
worker thread, so they never stall the loop either. Unlike drawing a list of cases first and
sending them afterwards, this keeps all of hypothesis: the assertions run inside the example,
so each distinct failure (one exception class per kind of failure and server-side location,
so ``report_multiple_bugs`` tells them apart) is shrunk to a minimal example, replayed
against the same daemon, and saved in the example database.

The daemon keeps state between examples (stored rows, its policy cache), so a failure can
depend on an earlier example; the failure message then names the earlier request when it
can (a policy mismatch lists earlier requests whose rate fields compare equal, and a signed
case may send a "twin" with equal values of other types: True/1/1.0). When the daemon dies
(a background task raised), later examples do nothing, and the test fails after the run
with the daemon's traceback and the last requests it accepted.

Checked for every request (see fuzz_strategies for verdicts): an answer, no 5xx (the
database is up: a 503 fails too); a 4xx has a JSON body with "error" (and "field" for
invalid_payload, naming a field that was not valid) and changed nothing (actions counted,
queue keys and policies hashed, before and after); a 200 is
``{"outputFields": {"hs_execution_state": "BLOCK", ...}}``, its row exists, a redelivery
changes nothing, and (signed cases) the queue key and policy are what a fresh Intake (no
cache) computes for that body; a request whose fields are all valid gets 200, one with an
invalid field (or a bad signature, method, path...) a 4xx. After the run: the daemon task
and its loops (ingest, scheduler, dispatcher, maintenance) are alive,
``maintain_once(full=True)`` does not raise, /healthz answers 200, no failed or expired row
lacks a reason, and one valid action for a connected portal is completed at the fake
HubSpot. Portals the strategies favour are connected first, so the sender also completes
(or has rejected) what the fuzzer stored.

Environment: THROTTLED_FUZZ_EXAMPLES examples per test (default 1000: the file takes about
30-60 s on 2 cores). With ``CI`` set the run is derandomized and uses no example database;
locally failing examples are saved under .hypothesis/ and replayed first.
THROTTLED_FUZZ_SEED=n fixes the seed (and uses no example database).
THROTTLED_FUZZ_COLLECT=1 records every failure instead of stopping at the first ones, and
lists each distinct failure once at the end with its smallest request (no shrinking).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
import structlog
from hypothesis import HealthCheck, example, given, seed, settings
from multidict import CIMultiDict
from yarl import URL

import throttled.daemon
from tests import fuzz_strategies as fs
from tests.conftest import CLIENT_SECRET, action_payload, wait_for
from throttled.hubspot import signature as sig
from throttled.hubspot.action import parse
from throttled.intake import Intake

EXAMPLES = int(os.environ.get("THROTTLED_FUZZ_EXAMPLES", "1000"))
SEED = os.environ.get("THROTTLED_FUZZ_SEED")
IN_CI = bool(os.environ.get("CI"))
# Collect mode (local exploration): record every failure, keep going, and list each distinct
# one (with its smallest request) at the end, instead of stopping and shrinking.
COLLECT = os.environ.get("THROTTLED_FUZZ_COLLECT", "") not in ("", "0")
TIMEOUT_S = max(120, 90 + EXAMPLES * 3 // 50)  # about 25 ms an example, and shrinking
ACTION_PATH = "/api/hubspot/action"
RAW_MAX_BODY = 8192  # small, so bodies of max_body_bytes +- 1 are cheap
E2E_PORTAL = 7_777_777_777  # the portal of the final end-to-end check (connected)
# portals connected before the run (ids the strategies favour), so what is stored for them
# really goes through the sender to the fake HubSpot, hostile callbackIds included
CONNECTED_PORTALS = (1, 62515, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1)

SNAPSHOT = """
SELECT (SELECT count(*) FROM actions),
       (SELECT count(*) FROM queues),
       (SELECT coalesce(md5(string_agg(key || ' ' || policy::text, E'\\n' ORDER BY key)), '')
          FROM queues)
"""
ROW = """
SELECT q.key, q.policy, q.override FROM actions a JOIN queues q ON q.id = a.queue_id
WHERE a.callback_id = %s
"""


def with_examples(cases: list[Any]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """@example for each case (the defects found so far: checked first, in every run)."""

    def decorate(test: Callable[..., None]) -> Callable[..., None]:
        for case in reversed(cases):
            test = example(case=case)(test)
        return test

    return decorate


def fuzz_settings(test: Callable[..., None]) -> Callable[..., None]:
    """The hypothesis settings (and seed) of both tests."""
    chosen = settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=IN_CI,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=True,
        print_blob=True,
        # CI, or a run with a chosen seed: no example database (nothing replayed or saved)
        **({"database": None} if IN_CI or SEED else {}),
    )
    test = chosen(test)
    return seed(int(SEED))(test) if SEED and not IN_CI else test


# --- server-side errors ---------------------------------------------------------------------


@dataclass
class ServerError:
    """An error the daemon logged (aiohttp's 500 traceback, a structlog error event)."""

    at: float
    text: str
    where: str


class ServerErrors:
    """Collects the daemon's error logs while a test runs (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.items: list[ServerError] = []
        self.warnings: Counter[str] = Counter()

    def add(self, text: str, exc_info: Any) -> None:
        where = ""
        if exc_info and exc_info is not True and exc_info[2] is not None:
            where = _location(exc_info)
            text += "\n" + "".join(traceback.format_exception(*exc_info))[-3000:]
        with self._lock:
            self.items.append(ServerError(time.monotonic(), text, where))

    def since(self, mark: int) -> list[ServerError]:
        with self._lock:
            return self.items[mark:]

    def mark(self) -> int:
        with self._lock:
            return len(self.items)


def _location(exc_info: Any) -> str:
    """The innermost throttled frame of a traceback, with the exception type."""
    frames = traceback.extract_tb(exc_info[2])
    ours = [f for f in frames if f"{os.sep}throttled{os.sep}" in f.filename] or frames
    frame = ours[-1]
    path = frame.filename.split(f"{os.sep}throttled{os.sep}")[-1]
    return f"throttled/{path}:{frame.lineno} in {frame.name}: {exc_info[0].__name__}"


class _Handler(logging.Handler):
    def __init__(self, errors: ServerErrors) -> None:
        super().__init__(logging.ERROR)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.add(f"{record.name}: {record.getMessage()}", record.exc_info)


@contextlib.contextmanager
def capture_server_errors() -> Iterator[ServerErrors]:
    """Record aiohttp's error log and structlog's error events; drop structlog's info and
    warning lines (counted: thousands of them would bury a failure report)."""
    errors = ServerErrors()
    handler = _Handler(errors)
    loggers = [logging.getLogger(name) for name in ("aiohttp.server", "aiohttp.web")]
    for logger in loggers:
        logger.addHandler(handler)
    old = structlog.get_config()

    def capture(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        name = str(event.get("event"))
        if method in ("error", "exception", "critical") or event.get("exc_info"):
            exc_info = event.get("exc_info")
            errors.add(f"structlog {method}: {event}", sys.exc_info() if exc_info else None)
            return event
        if method in ("debug", "info", "warning", "warn"):
            errors.warnings[name] += 1
            raise structlog.DropEvent
        return event

    structlog.configure(processors=[capture, *old["processors"]])
    try:
        yield errors
    finally:
        structlog.configure(**old)
        for logger in loggers:
            logger.removeHandler(handler)


# --- failures -------------------------------------------------------------------------------

_FAILURE_TYPES: dict[str, type[AssertionError]] = {}


class _Recorded(Exception):
    """Collect mode: this request's failure was recorded; go on with the next example."""


def failure_type(key: str) -> type[AssertionError]:
    """One exception class per kind of failure, so hypothesis reports each separately."""
    if key not in _FAILURE_TYPES:
        name = "Fuzz_" + re.sub(r"\W+", "_", key).strip("_")[:100]
        _FAILURE_TYPES[key] = type(name, (AssertionError,), {})
    return _FAILURE_TYPES[key]


@dataclass
class Request:
    """One HTTP request as sent, and the body the daemon should see (decoded)."""

    method: str
    path: str
    headers: CIMultiDict[str]
    wire: bytes
    body: bytes
    chunked: bool = False
    skip_auto: tuple[str, ...] = ()

    def describe(self) -> str:
        shown = {
            k: (v[:12] + "..." if k.lower().startswith("x-hubspot-signature") else v)
            for k, v in self.headers.items()
        }
        body = (
            self.body
            if len(self.body) <= 600
            else self.body[:600] + b"...(%d bytes)" % len(self.body)
        )
        return (
            f"{self.method} {self.path} chunked={self.chunked} headers={shown}\n    body={body!r}"
        )


@dataclass
class Outcome:
    status: int
    content_type: str
    raw: bytes
    doc: Any = None


@dataclass(frozen=True)
class Snapshot:
    actions: int
    queues: int
    queue_hash: str


async def _chunks(data: bytes) -> Any:
    for i in range(0, len(data), 700):
        yield data[i : i + 700]


# --- the harness ----------------------------------------------------------------------------


@dataclass
class Harness:
    """Sends requests to the daemon from hypothesis's thread and checks every answer."""

    daemon: Any
    db_url: str
    loop: asyncio.AbstractEventLoop
    errors: ServerErrors
    stopped: bool = False
    dead: bool = False
    statuses: Counter[int] = field(default_factory=Counter)
    accepted: list[tuple[float, str]] = field(default_factory=list)
    _conn: psycopg.Connection[Any] | None = None
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _seen: set[str] = field(default_factory=set)
    _rate_reprs: dict[Any, set[str]] = field(default_factory=dict)
    collected: dict[str, tuple[int, str]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    died_seen_at: float = 0.0

    # -- plumbing

    def unique(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            self._conn = psycopg.connect(self.db_url, autocommit=True)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def snapshot(self) -> Snapshot:
        row = self.conn.execute(SNAPSHOT).fetchone()
        assert row is not None
        return Snapshot(int(row[0]), int(row[1]), str(row[2]))

    def idle(self) -> bool:
        """True when examples must do nothing: the test is over or the daemon died."""
        if not self.dead and self.daemon.task.done():
            self.dead, self.died_seen_at = True, time.monotonic()
        return self.stopped or self.dead

    async def _send(self, req: Request) -> Outcome:
        url = URL(self.daemon.url + req.path, encoded=True)
        data: Any = _chunks(req.wire) if req.chunked else req.wire
        async with self.daemon.session.request(
            req.method,
            url,
            data=data,
            headers=req.headers,
            skip_auto_headers=req.skip_auto,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            return Outcome(resp.status, resp.headers.get("Content-Type", ""), await resp.read())

    def fail(self, kind: str, req: Request, detail: str, *, key: str = "") -> None:
        message = f"{kind}: {detail}\n  request: {req.describe()}"
        name = f"{kind} {key}".strip()
        if COLLECT:
            count, smallest = self.collected.get(name, (0, message))
            if len(message) < len(smallest):
                smallest = message
            self.collected[name] = (count + 1, smallest)
            raise _Recorded
        raise failure_type(name)(message)

    # -- one request

    def exchange(
        self,
        req: Request,
        *,
        verdict: int,
        blamable: set[str] | None = None,
        oracle: bool = False,
        copies: int = 1,
    ) -> Outcome | None:
        """Send req (`copies` times at once) and check the answers; None when the daemon
        is gone."""
        before = self.snapshot()
        mark = self.errors.mark()

        async def send_all() -> list[Any]:
            sends = [self._send(req) for _ in range(copies)]
            return await asyncio.gather(*sends, return_exceptions=True)

        outs: list[Outcome] = []
        for out in self.call(send_all()):
            if isinstance(out, aiohttp.ClientError | TimeoutError | ConnectionError):
                self.call(asyncio.sleep(0.2))
                if self.idle():
                    return None
                problem = f"{type(out).__name__}: {out}"
                self.fail("no answer", req, problem, key=problem.split(":")[0])
            if isinstance(out, BaseException):
                raise out
            outs.append(out)
        logged = self.errors.since(mark)
        for out in outs:
            self._check_answer(req, out, logged)
        out = outs[0]
        if len({o.status for o in outs}) > 1:
            self.fail(
                "identical concurrent requests answered differently",
                req,
                str([(o.status, o.raw[:200]) for o in outs]),
            )
        if req.method == "HEAD":
            return out
        if out.status == 200:
            self._check_accepted(req, out, before, verdict, oracle and copies == 1)
            if copies > 1 and self.snapshot().actions > before.actions + 1:
                self.fail("one action stored twice", req, f"{before} -> {self.snapshot()}")
        else:
            self._check_rejected(req, out, before, verdict, blamable)
        return out

    def _check_answer(self, req: Request, out: Outcome, logged: list[ServerError]) -> None:
        """A 2xx/4xx status, and a JSON body (HEAD has none)."""
        self.statuses[out.status] += 1
        if out.status >= 500 or out.status < 200 or 300 <= out.status < 400:
            where = next((e.where for e in logged if e.where), "")
            code = _error_code(out.raw)
            detail = f"status {out.status}, body {out.raw[:300]!r}"
            if logged:
                detail += "\n  daemon logged:\n" + "\n".join(e.text for e in logged[-2:])
            self.fail(f"status {out.status}", req, detail, key=f"{code} {where}")
        if req.method == "HEAD":
            return
        try:
            out.doc = json.loads(out.raw)
        except ValueError:
            self.fail(
                "non-JSON answer",
                req,
                f"status {out.status}, {out.content_type}, body {out.raw[:300]!r}",
                key=f"{out.status} {out.raw.decode(errors='replace').partition(chr(10))[0][:60]}",
            )

    def _check_rejected(
        self, req: Request, out: Outcome, before: Snapshot, verdict: int, blamable: set[str] | None
    ) -> None:
        doc = out.doc
        if not isinstance(doc, dict) or not isinstance(doc.get("error"), str):
            self.fail("4xx without error key", req, f"{out.status} {doc!r}", key=str(out.status))
        if doc["error"] == "invalid_payload" and not isinstance(doc.get("field"), str):
            self.fail("invalid_payload without field", req, f"{out.status} {doc!r}")
        after = self.snapshot()
        if after != before:
            self.fail("4xx changed the database", req, f"{out.status} {doc!r}: {before} -> {after}")
        if verdict == fs.VALID:
            self.fail(
                "valid request rejected",
                req,
                f"{out.status} {doc!r}",
                key=f"{out.status} {doc.get('error')} {doc.get('field', '')}",
            )
        if (
            blamable is not None
            and doc["error"] == "invalid_payload"
            and doc["field"] not in blamable
        ):
            self.fail(
                "400 names a valid field",
                req,
                f"{doc!r}; fields not valid in this request: {sorted(blamable)}",
                key=str(doc["field"]),
            )

    def _check_accepted(
        self, req: Request, out: Outcome, before: Snapshot, verdict: int, oracle: bool
    ) -> None:
        doc = out.doc
        fields = doc.get("outputFields") if isinstance(doc, dict) else None
        if not isinstance(fields, dict) or fields.get("hs_execution_state") != "BLOCK":
            self.fail("200 is not BLOCK", req, repr(doc))
        if verdict == fs.INVALID:
            self.fail("invalid request accepted", req, repr(doc))
        callback_id = _callback_id(req.body)
        if callback_id is None:  # a body only the daemon can read: at least nothing lost
            if self.snapshot().actions < before.actions:
                self.fail("200 lost rows", req, repr(doc))
            return
        row = self.conn.execute(ROW, (callback_id,)).fetchone()
        if row is None:
            self.fail("200 without a stored row", req, f"callbackId {callback_id!r}")
            return
        self.accepted.append((time.monotonic(), req.describe()))
        first = callback_id not in self._seen
        self._seen.add(callback_id)
        if not first and (after := self.snapshot()) != before:
            # a redelivered action must have no side effect at all (ingest._store)
            self.fail("redelivery changed the database", req, f"{before} -> {after}")
        if oracle and first and row[2] is None:
            self.counts["policy checked"] += 1
            self._check_policy(req, row[0], row[1])

    def _check_policy(self, req: Request, key: str, policy: Any) -> None:
        """The stored queue key and policy are what a fresh Intake (no cache) computes."""
        cfg = self.daemon.runtime.config
        fresh = Intake(
            defaults=cfg.default_policy_spec(),
            block_expiration_s=cfg.block_expiration_s(),
            clock=time.time,
        )
        try:
            request = parse(req.body)
            expected = fresh.build(request)
        except Exception as exc:
            self.fail("200 for a body intake rejects", req, f"{type(exc).__name__}: {exc}")
            return
        rate = {k: v for k, v in request.input_fields.items() if k in fs.RATE_KEYS}
        try:
            equal_key: Any = frozenset(rate.items())
        except TypeError:
            equal_key = None
        shown = repr(sorted(rate.items(), key=repr))
        earlier = self._rate_reprs.setdefault(equal_key, set()) if equal_key is not None else set()
        want = json.loads(json.dumps(expected.policy))
        if key != expected.queue_key or policy != want:
            others = sorted(earlier - {shown})
            hint = f"\n  earlier requests with equal rate fields: {others}" if others else ""
            self.fail(
                "stored policy differs from a fresh computation",
                req,
                f"queue {key!r}: stored {policy}, fresh {want} (key {expected.queue_key!r}){hint}",
            )
        earlier.add(shown)

    # -- signed cases

    def signed_request(self, case: fs.SignedCase, payload: Any) -> Request:
        text = fs.encode(
            payload, ascii_only=case.ascii_only, spaced=case.spaced, unique=self.unique
        )
        body = (case.wrap + text + case.wrap).encode("utf-8")
        path = ACTION_PATH + case.query
        headers = CIMultiDict({"Content-Type": "application/json"})
        url = self.daemon.url + path
        headers.update(sig.sign_headers(CLIENT_SECRET, "POST", url, body, version=case.signing))
        return Request("POST", path, headers, body, body)

    def check_signed(self, case: fs.SignedCase) -> None:
        with contextlib.suppress(_Recorded):
            self._check_signed(case)

    def _check_signed(self, case: fs.SignedCase) -> None:
        if self.idle():
            return
        limit = self.daemon.runtime.config.ingest.max_body_bytes
        req = self.signed_request(case, case.payload)
        verdict = max(case.verdict, fs.INVALID if len(req.body) > limit else fs.VALID)
        if self.exchange(req, verdict=verdict, blamable=case.blamable(), oracle=True) is None:
            return
        fields = case.payload.get("inputFields") if isinstance(case.payload, dict) else None
        if not case.twin or not isinstance(fields, dict):
            return
        twin_fields = {k: fs.twin_value(v) for k, v in fields.items()}
        if all(type(twin_fields[k]) is type(v) for k, v in fields.items()):
            return
        verdicts = dict(case.verdicts)
        verdicts.update(
            {
                f"inputFields.{fs.expand(k)}": fs.input_value_verdict(k, v)
                for k, v in twin_fields.items()
            }
        )
        self.counts["twins"] += 1
        twin = fs.SignedCase(
            payload={**case.payload, "inputFields": twin_fields},
            verdicts=verdicts,
            signing=case.signing,
            query=case.query,
            ascii_only=case.ascii_only,
            spaced=case.spaced,
        )
        req = self.signed_request(twin, twin.payload)
        verdict = max(twin.verdict, fs.INVALID if len(req.body) > limit else fs.VALID)
        self.exchange(req, verdict=verdict, blamable=twin.blamable(), oracle=True)

    # -- raw cases

    def raw_body(self, spec: tuple[Any, ...], limit: int) -> bytes:
        kind = spec[0]
        payload = action_payload(callback_id=self.unique("ap-62515-raw-"))
        base = json.dumps(payload).encode()
        fields_at = b'"inputFields": {}'
        if kind == "wrapped":
            return spec[1].encode() + base + spec[1].encode()
        if kind == "size":
            payload["inputFields"] = {"pad": ""}
            empty = json.dumps(payload).encode()
            payload["inputFields"] = {"pad": "x" * (limit + spec[1] - len(empty))}
            return json.dumps(payload).encode()
        if kind == "truncate":
            return base[: int(len(base) * spec[1])]
        if kind == "mutate":
            data = bytearray(base)
            for where, op, byte in spec[1]:
                i = min(int(where * len(data)), max(len(data) - 1, 0))
                if op == "insert" or not data:
                    data.insert(i, byte)
                elif op == "delete":
                    del data[i]
                elif op == "flip":
                    data[i] ^= byte or 1
                else:
                    data[i] = byte
            return bytes(data)
        if kind == "random":
            return bytes(spec[1])
        if kind == "nest":
            depth, how = spec[1], spec[2]
            if how == "array":
                return b"[" * depth + b"]" * depth
            if how == "object":
                return b'{"a":' * depth + b"1" + b"}" * depth
            return base.replace(
                fields_at, b'"inputFields": {"x": ' + b"[" * depth + b"]" * depth + b"}"
            )
        if kind == "top":
            return b"[" + base + b"]" if spec[1] == "valid-in-array" else spec[1].encode()
        if kind == "utf16":
            return base.decode().encode(spec[1])
        if kind == "bom":
            return b"\xef\xbb\xbf" + base
        if kind == "empty":
            return b""
        if kind == "tokens":
            return base.replace(
                fields_at, b'"inputFields": {"maxThroughput": ' + spec[1].encode() + b"}"
            )
        if kind == "dupkeys":
            return b'{"callbackId": "' + self.unique("dup-").encode() + b'", ' + base[1:]
        if kind == "garbage_tail":
            return base + spec[1].encode("latin-1")
        return base

    def raw_request(self, case: fs.RawCase) -> Request:
        limit = self.daemon.runtime.config.ingest.max_body_bytes
        body = self.raw_body(case.body, limit)
        url = self.daemon.url + case.path
        pairs = _signature_headers(case.signing, url, body)
        headers: CIMultiDict[str] = CIMultiDict(pairs)
        skip: tuple[str, ...] = ()
        if case.content_type is None:
            skip = ("Content-Type",)
        else:
            headers["Content-Type"] = case.content_type
        if case.host:
            headers["Host"] = case.host
        _extra_headers(headers, case.extra)
        wire = body
        encoding = case.encoding
        if encoding == "gzip":
            wire = gzip.compress(body)
        elif encoding == "deflate":
            wire = zlib.compress(body)
        elif encoding == "gzip-truncated":
            wire = gzip.compress(body)[: max(1, len(gzip.compress(body)) // 2)]
        elif encoding == "gzip, gzip":
            wire = gzip.compress(gzip.compress(body))
        if encoding:
            headers["Content-Encoding"] = _ENCODING_HEADER.get(encoding, encoding)
        return Request(case.method, case.path, headers, wire, body, case.chunked, skip)

    def check_raw(self, case: fs.RawCase) -> None:
        with contextlib.suppress(_Recorded):
            self._check_raw(case)

    def _check_raw(self, case: fs.RawCase) -> None:
        if self.idle():
            return
        req = self.raw_request(case)
        if case.concurrent:
            self.exchange(req, verdict=case.verdict, copies=case.repeat)
            return
        for _ in range(case.repeat):
            if self.exchange(req, verdict=case.verdict) is None:
                return


def _extra_headers(headers: CIMultiDict[str], extra: str) -> None:
    """Apply one of fuzz_strategies.EXTRA_HEADERS."""
    if extra == "expect":
        headers["Expect"] = "100-continue"
    elif extra == "dup_content_type" and "Content-Type" in headers:  # (twice, not once)
        headers.add("Content-Type", "application/json")
    elif extra == "sig_non_ascii":
        headers[sig.SIGNATURE] = "\u00e9" * 64
    elif extra in ("sig_5000", "sig_10000"):
        headers[sig.SIGNATURE] = "a" * int(extra[4:])
    elif extra == "version_long":
        headers[sig.SIGNATURE_VERSION] = "v" * 5000
    elif extra == "many_headers":
        for i in range(120):
            headers[f"X-Pad-{i}"] = str(i)
    elif extra == "ts_long":
        headers[sig.SIGNATURE_V3] = "A" * 43 + "="
        headers[sig.TIMESTAMP] = "9" * 5000


_ENCODING_HEADER = {
    "gzip-invalid": "gzip",
    "gzip-truncated": "gzip",
    "deflate-invalid": "deflate",
    "br-invalid": "br",
    "zstd-invalid": "zstd",
}


def _signature_headers(mode: str, url: str, body: bytes) -> list[tuple[str, str]]:
    """The signature headers of one signing mode (fuzz_strategies.SIGNINGS)."""
    now = int(time.time() * 1000)
    v2 = sig.sign_headers(CLIENT_SECRET, "POST", url, body)
    v3 = sig.sign_headers(CLIENT_SECRET, "POST", url, body, version="v3", now_ms=now)
    wrong = sig.sign_headers("not-the-secret", "POST", url, body, version="v3", now_ms=now)
    only_v3 = {k: v for k, v in v3.items() if k in (sig.SIGNATURE_V3, sig.TIMESTAMP)}
    modes: dict[str, Any] = {
        "v2": v2,
        "v3": v3,
        "v3_only": only_v3,
        "v2_no_version": {sig.SIGNATURE: v2[sig.SIGNATURE]},
        "v2_upper": {**v2, sig.SIGNATURE: v2[sig.SIGNATURE].upper()},
        "v3_space": {**v3, sig.SIGNATURE_V3: v3[sig.SIGNATURE_V3].replace("+", " ")},
        "v3_ts_only": {**v2, sig.TIMESTAMP: str(now)},
        "none": {},
        "v2_wrong_secret": sig.sign_headers("not-the-secret", "POST", url, body),
        "v2_other_body": sig.sign_headers(CLIENT_SECRET, "POST", url, body + b" "),
        "v2_other_uri": sig.sign_headers(
            CLIENT_SECRET, "POST", url + ("&" if "?" in url else "?") + "x=1", body
        ),
        "v2_get": sig.sign_headers(CLIENT_SECRET, "GET", url, body),
        "v3_stale": sig.sign_headers(
            CLIENT_SECRET, "POST", url, body, version="v3", now_ms=now - 600_000
        ),
        "v3_future": sig.sign_headers(
            CLIENT_SECRET, "POST", url, body, version="v3", now_ms=now + 600_000
        ),
        "v3_seconds": sig.sign_headers(
            CLIENT_SECRET, "POST", url, body, version="v3", now_ms=now // 1000
        ),
        "v3_garbage_ts": {**v3, sig.TIMESTAMP: "1e12"},
        "v3_wrong_secret": {**v2, **{k: wrong[k] for k in (sig.SIGNATURE_V3, sig.TIMESTAMP)}},
        "v1": sig.sign_headers(CLIENT_SECRET, "POST", url, body, version="v1"),
        "version_v4": {**v2, sig.SIGNATURE_VERSION: "v4"},
        "empty_sig": {sig.SIGNATURE: "", sig.SIGNATURE_VERSION: "v2"},
        "sig_version_only": {sig.SIGNATURE_VERSION: "v2"},
        "garbage_sig": {sig.SIGNATURE: "zz" * 32, sig.SIGNATURE_VERSION: "v2"},
    }
    if mode == "dup_sig":
        return [*v2.items(), (sig.SIGNATURE, "0" * 64)]
    return list(modes[mode].items())


def _callback_id(body: bytes) -> str | None:
    try:
        doc = orjson.loads(body[3:] if body.startswith(b"\xef\xbb\xbf") else body)
    except orjson.JSONDecodeError:
        return None
    value = doc.get("callbackId") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _error_code(raw: bytes) -> str:
    try:
        doc = json.loads(raw)
    except ValueError:
        return "non-JSON"
    return str(doc.get("error")) if isinstance(doc, dict) else "non-object"


# --- running a fuzz test ----------------------------------------------------------------------


async def _drive(harness: Harness, run: Callable[[], None]) -> BaseException | None:
    """Run hypothesis in a worker thread; return what it raised."""
    try:
        await asyncio.to_thread(run)
    except Exception as exc:  # hypothesis's report (one failure or a group)
        return exc
    finally:
        harness.stopped = True
        await asyncio.to_thread(harness.close)
    return None


async def _final_checks(
    harness: Harness, daemon: Any, fake_hubspot: Any, *, maintain: bool
) -> list[str]:
    """The daemon survived: loops alive, maintenance runs, it serves, it completes."""
    await asyncio.sleep(0.5)  # a background task that is failing gets the time to fail
    if daemon.task.done():
        return [_death_report(harness, daemon)]
    problems: list[str] = []
    tasks = {task.get_name(): task for task in asyncio.all_tasks()}
    for name in ("ingest", "scheduler", "dispatcher", "maintenance"):
        task = tasks.get(name)
        if task is None or task.done():
            problems.append(f"daemon task {name!r} is not running ({task!r})")
    try:
        await _serves_and_completes(daemon, fake_hubspot, problems, maintain=maintain)
    except Exception:
        problems.append("the final checks raised:\n" + traceback.format_exc()[-3000:])
    harness.counts["completed at the fake"] = len(fake_hubspot.completed)
    with psycopg.connect(harness.db_url) as conn:
        states = conn.execute("SELECT state, count(*) FROM actions GROUP BY state").fetchall()
        harness.counts.update({f"rows {state}": n for state, n in states})
        row = conn.execute(
            "SELECT count(*), min(callback_id) FROM actions"
            " WHERE state IN ('failed', 'expired') AND coalesce(last_error, '') = ''"
        ).fetchone()
    if row and row[0]:
        problems.append(f"{row[0]} failed/expired actions without a reason, e.g. {row[1]!r}")
    if daemon.task.done():
        problems.append(_death_report(harness, daemon))
    return problems


async def _serves_and_completes(
    daemon: Any, fake_hubspot: Any, problems: list[str], *, maintain: bool
) -> None:
    if maintain:
        try:
            await throttled.daemon.maintain_once(daemon.runtime, full=True)
        except Exception:
            problems.append("maintain_once(full=True) raised:\n" + traceback.format_exc())
    async with daemon.session.get(daemon.url + "/healthz") as resp:
        if resp.status != 200:
            problems.append(f"/healthz answered {resp.status}")
    await daemon.connect_portal(fake_hubspot, E2E_PORTAL)
    payload = action_payload(
        portal_id=E2E_PORTAL, input_fields={"maxThroughput": "100", "timeUnit": "seconds"}
    )
    status, body = await daemon.post_action(payload)
    if status != 200:
        problems.append(f"a valid action after the run got {status} {body}")
        return
    try:
        await wait_for(lambda: payload["callbackId"] in fake_hubspot.completed, timeout=30)
    except AssertionError:
        state = "dead" if daemon.task.done() else "alive"
        problems.append(
            f"a valid action after the run was not completed within 30 s (daemon {state})"
        )


def _death_report(harness: Harness, daemon: Any) -> str:
    exc = daemon.task.exception() if not daemon.task.cancelled() else None
    text = "".join(traceback.format_exception(exc))[-6000:] if exc else "(cancelled)"
    now = time.monotonic()
    recent = "\n".join(f"  {now - at:.1f} s ago: {what}" for at, what in harness.accepted[-5:])
    return f"the daemon died during the fuzz run:\n{text}\nlast accepted requests:\n{recent}"


async def _finish(
    harness: Harness, failure: BaseException | None, problems: list[str], label: str
) -> None:
    summary = (
        f"{label}: {sum(harness.statuses.values())} requests, statuses "
        f"{dict(sorted(harness.statuses.items()))}; {dict(harness.counts)}; "
        f"dropped log lines {dict(harness.errors.warnings.most_common(5))}"
    )
    print(summary)
    if harness.collected:
        problems = [
            f"[{count}x] {message}" for count, message in harness.collected.values()
        ] + problems
    if failure is not None:
        for problem in problems:
            failure.add_note(problem)
        failure.add_note(summary)
        raise failure
    assert not problems, "\n\n".join(problems)


@contextlib.asynccontextmanager
async def _fuzzing(
    daemon_factory: Any, fake_hubspot: Any, **sections: Any
) -> AsyncIterator[Harness]:
    """A running daemon (portals connected) and its harness. If the daemon died, stopping it
    re-raises its error: that becomes a note on the test's own failure, not a replacement."""
    with capture_server_errors() as errors:
        running = daemon_factory(**sections)
        daemon = await running.__aenter__()
        try:
            for portal in CONNECTED_PORTALS:
                await daemon.connect_portal(fake_hubspot, portal)
            yield Harness(
                daemon,
                daemon.runtime.config.database.url.reveal(),
                asyncio.get_running_loop(),
                errors,
            )
        except BaseException as failure:
            try:
                await running.__aexit__(None, None, None)
            except Exception as exc:
                text = "".join(traceback.format_exception(exc))[-6000:]
                failure.add_note(f"stopping the daemon raised (it had died):\n{text}")
            raise
        await running.__aexit__(None, None, None)


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT_S)
async def test_fuzz_signed_payloads(daemon_factory, fake_hubspot):
    """Signed requests built from the payload schema, each field valid or hostile."""
    async with _fuzzing(daemon_factory, fake_hubspot) as harness:

        def run() -> None:
            @fuzz_settings
            @given(case=fs.signed_cases())
            @with_examples(fs.SIGNED_EXAMPLES)
            def signed_payloads(case: fs.SignedCase) -> None:
                harness.check_signed(case)

            signed_payloads()

        failure = await _drive(harness, run)
        problems = await _final_checks(harness, harness.daemon, fake_hubspot, maintain=True)
        await _finish(harness, failure, problems, "signed payloads")


@pytest.mark.timeout(TIMEOUT_S)
async def test_fuzz_raw_requests(daemon_factory, fake_hubspot):
    """Raw mutated bodies, headers, encodings, signatures, methods and paths."""
    async with _fuzzing(
        daemon_factory, fake_hubspot, ingest={"max_body_bytes": RAW_MAX_BODY}
    ) as harness:

        def run() -> None:
            @fuzz_settings
            @given(case=fs.raw_cases())
            @with_examples(fs.RAW_EXAMPLES)
            def raw_requests(case: fs.RawCase) -> None:
                harness.check_raw(case)

            raw_requests()

        failure = await _drive(harness, run)
        problems = await _final_checks(harness, harness.daemon, fake_hubspot, maintain=True)
        await _finish(harness, failure, problems, "raw requests")
