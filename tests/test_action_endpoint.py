"""The action endpoint's answers: every status code, duplicates, nothing invalid stored."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from tests.conftest import CLIENT_SECRET, action_payload
from throttled.hubspot.signature import sign_headers
from throttled.web.app import guarded


def _count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT count(*) FROM actions").fetchone()
    assert row is not None
    return int(row[0])


async def _post_raw(daemon, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    async with daemon.session.post(
        daemon.url + "/api/hubspot/action", data=body, headers=headers
    ) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


def _signed(daemon, body: bytes, **extra: str) -> dict[str, str]:
    url = daemon.url + "/api/hubspot/action"
    return {
        "Content-Type": "application/json",
        **sign_headers(CLIENT_SECRET, "POST", url, body),
        **extra,
    }


async def test_duplicate_callback_gets_same_answer_and_one_row(daemon_factory, db_url):
    async with daemon_factory(defaults={"time_unit": "days"}) as daemon:
        payload = action_payload()
        first = await daemon.post_action(payload)
        second = await daemon.post_action(payload)
        assert first == second
        assert first[0] == 200
        assert _count(db_url) == 1


async def test_v3_signature_is_checked_when_present(daemon_factory, db_url):
    async with daemon_factory(defaults={"time_unit": "days"}) as daemon:
        status, _ = await daemon.post_action(action_payload(), version="v3")
        assert status == 200
        body = json.dumps(action_payload()).encode()
        headers = _signed(daemon, body, **{"X-HubSpot-Signature-v3": "A" * 43 + "="})
        headers["X-HubSpot-Request-Timestamp"] = "1735689600000"
        status, answer, _ = await _post_raw(daemon, body, headers)
        assert status == 401
        assert answer["error"] == "invalid_signature"
        assert _count(db_url) == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda p: p.pop("callbackId"), "callbackId"),
        (lambda p: p.update(callbackId=17), "callbackId"),
        (lambda p: p["origin"].pop("portalId"), "origin.portalId"),
        (lambda p: p["origin"].update(portalId="abc"), "origin.portalId"),
        (lambda p: p["origin"].update(actionDefinitionId=None), "origin.actionDefinitionId"),
        (lambda p: p["context"].pop("workflowId"), "context.workflowId"),
        (lambda p: p.pop("origin"), "origin"),
        (lambda p: p.update(inputFields=[1, 2]), "inputFields"),
        (lambda p: p.update(inputFields={"x": {"nested": 1}}), "inputFields.x"),
        (
            lambda p: p["origin"]["actionExecutionIndexIdentifier"].update(
                actionExecutionIndex="x"
            ),
            "origin.actionExecutionIndexIdentifier.actionExecutionIndex",
        ),
        (lambda p: p["origin"].update(portalId=2**70), "origin.portalId"),
        (lambda p: p.update(callbackId="a\x00b"), "callbackId"),
        (lambda p: p["object"].update(objectType="CON\x00TACT"), "object.objectType"),
        (lambda p: p["object"].update(objectId="12\x0034"), "object.objectId"),
        (lambda p: p.update(inputFields={"note": "a\x00b"}), "inputFields"),
        (lambda p: p.update(inputFields={"no\x00te": "ab"}), "inputFields"),
        (lambda p: p.update(inputFields={"queueName": "shared\x00"}), "inputFields"),
    ],
)
async def test_invalid_payload_is_400_naming_the_field(daemon_factory, db_url, mutate, field):
    async with daemon_factory() as daemon:
        payload = action_payload()
        mutate(payload)
        status, body = await daemon.post_action(payload)
        assert status == 400
        assert body["error"] == "invalid_payload"
        assert body["field"] == field
        assert _count(db_url) == 0


async def test_malformed_json_is_400(daemon_factory, db_url):
    async with daemon_factory() as daemon:
        body = b'{"callbackId": '
        status, answer, _ = await _post_raw(daemon, body, _signed(daemon, body))
        assert status == 400
        assert answer["field"] == "body"
        assert _count(db_url) == 0


async def test_json_that_python_accepts_but_is_not_storable_is_400(daemon_factory, db_url):
    # (an input field already there, so each insertion below leaves the rest valid JSON)
    valid = json.dumps(action_payload(input_fields={"queueName": "q"}))
    bodies = [
        # NaN and Infinity: Python's json reads them, PostgreSQL's jsonb does not
        valid.replace('"inputFields": {', '"inputFields": {"maxThroughput": NaN, ', 1),
        valid.replace('"inputFields": {', '"inputFields": {"timePeriod": -Infinity, ', 1),
        # an integer past Python's 4,300-digit limit
        valid.replace('"inputFields": {', '"inputFields": {"n": ' + "9" * 5000 + ", ", 1),
        # nesting deep enough to exhaust the recursion limit
        '{"callbackId": ' + "[" * 20_000 + "]" * 20_000 + "}",
        # a number Python's json reads as infinity
        valid.replace('"inputFields": {', '"inputFields": {"maxThroughput": 1e400, ', 1),
        # an escaped lone surrogate: not Unicode, and not storable
        valid.replace('"inputFields": {', '"inputFields": {"s": "\\ud800", ', 1),
    ]
    async with daemon_factory() as daemon:
        for text in bodies:
            body = text.encode()
            assert body != valid.encode()
            status, answer, _ = await _post_raw(daemon, body, _signed(daemon, body))
            assert status == 400, answer
            assert answer["field"] == "body"
        assert _count(db_url) == 0


async def test_bad_or_missing_signature_is_401(daemon_factory, db_url):
    async with daemon_factory() as daemon:
        status, body = await daemon.post_action(action_payload(), secret="not-the-secret")
        assert (status, body["error"]) == (401, "invalid_signature")
        raw = json.dumps(action_payload()).encode()
        status, body, _ = await _post_raw(daemon, raw, {"Content-Type": "application/json"})
        assert status == 401
        assert "missing" in body["message"]
        assert _count(db_url) == 0


async def test_oversized_body_is_413(daemon_factory, db_url):
    async with daemon_factory(ingest={"max_body_bytes": 2048}) as daemon:
        payload = action_payload(input_fields={"pad": "x" * 4096})
        status, body = await daemon.post_action(payload)
        assert (status, body["error"]) == (413, "payload_too_large")
        assert _count(db_url) == 0


async def test_oversized_body_without_content_length_is_413(daemon_factory, db_url):
    big = json.dumps(action_payload(input_fields={"pad": "x" * 4096})).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    small = json.dumps(action_payload()).encode()
    async with daemon_factory(ingest={"max_body_bytes": 2048}) as daemon:
        for data, headers in (
            (chunked(), _signed(daemon, big)),
            # 1 KiB on the wire, 100 KiB once aiohttp has decompressed it
            (gzip.compress(b" " * 100_000 + small), {"Content-Encoding": "gzip"}),
        ):
            headers = {"Content-Type": "application/json", **headers}
            async with daemon.session.post(
                daemon.url + "/api/hubspot/action", data=data, headers=headers
            ) as resp:
                answer = await resp.json()
                assert (resp.status, answer["error"]) == (413, "payload_too_large"), answer
        assert _count(db_url) == 0


async def test_body_sent_in_chunks_is_stored(daemon_factory, db_url):
    body = json.dumps(action_payload()).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100):
            yield body[i : i + 100]
            await asyncio.sleep(0.01)  # the handler runs before the whole body is here

    async with daemon_factory() as daemon:
        async with daemon.session.post(
            daemon.url + "/api/hubspot/action", data=chunked(), headers=_signed(daemon, body)
        ) as resp:
            answer = await resp.json()
        assert resp.status == 200, answer
        assert answer["outputFields"]["hs_execution_state"] == "BLOCK"
        assert _count(db_url) == 1


async def test_non_json_content_type_is_415(daemon_factory, db_url):
    async with daemon_factory() as daemon:
        body = json.dumps(action_payload()).encode()
        headers = _signed(daemon, body)
        headers["Content-Type"] = "text/plain"
        status, answer, _ = await _post_raw(daemon, body, headers)
        assert (status, answer["error"]) == (415, "unsupported_media_type")
        assert _count(db_url) == 0


async def test_full_buffer_is_429_with_retry_after(daemon_factory, db_url):
    async with daemon_factory(ingest={"max_pending": 1, "retry_after_s": 7}) as daemon:
        daemon.runtime.ingest._items.append(object())  # type: ignore[arg-type]  # buffer is full
        try:
            status, body = await daemon.post_action(action_payload())
        finally:
            daemon.runtime.ingest._items.clear()
        assert (status, body["error"]) == (429, "overloaded")
        status, _, _ = await _post_raw(daemon, b"", {})
        assert status == 415
        assert _count(db_url) == 0


async def test_stopping_daemon_answers_503_with_retry_after(daemon_factory, db_url):
    # The configured Retry-After (not the default of 5), whether the request is refused on
    # arrival or reaches intake just as it closes.
    async with daemon_factory(ingest={"retry_after_s": 9}) as daemon:
        answers = []
        for where in ("services", "ingest"):
            if where == "services":
                daemon.runtime.services.stopping = True
            else:
                daemon.runtime.ingest._closed = True
            try:
                body = json.dumps(action_payload()).encode()
                answers.append(await _post_raw(daemon, body, _signed(daemon, body)))
            finally:
                daemon.runtime.services.stopping = False
                daemon.runtime.ingest._closed = False
        for status, answer, headers in answers:
            assert (status, answer["error"]) == (503, "stopping")
            assert headers["Retry-After"] == "9"
        assert _count(db_url) == 0


async def test_unknown_route_and_method_are_json_4xx(daemon_factory):
    async with daemon_factory() as daemon:
        async with daemon.session.get(daemon.url + "/api/hubspot/action") as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "POST"
            assert (await resp.json())["error"] == "method_not_allowed"
        async with daemon.session.post(daemon.url + "/healthz") as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET, HEAD"
        async with daemon.session.head(daemon.url + "/healthz") as resp:
            assert resp.status == 200
        async with daemon.session.get(daemon.url + "/nope") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"


async def test_health_ready_and_metrics(daemon_factory):
    async with daemon_factory() as daemon:
        await daemon.post_action(action_payload())
        async with daemon.session.get(daemon.url + "/healthz") as resp:
            assert resp.status == 200
        async with daemon.session.get(daemon.url + "/readyz") as resp:
            assert (resp.status, (await resp.json())["status"]) == (200, "ready")
        async with daemon.session.get(daemon.url + "/metrics") as resp:
            text = await resp.text()
        assert "throttled_actions_accepted_total" in text
        assert "throttled_gc_longest_pause_seconds" in text
        assert 'throttled_gc_pause_seconds_total{generation="2"}' in text  # start-up collect
        assert CLIENT_SECRET not in text


async def test_queue_key_and_rate_from_input_fields(daemon_factory, db_url):
    async with daemon_factory() as daemon:
        await daemon.post_action(
            action_payload(
                portal_id=7,
                workflow_id=8,
                action_id=9,
                index=2,
                input_fields={"maxThroughPut": "500", "time": "1", "period": "hours"},
            )
        )
        await daemon.post_action(
            action_payload(
                portal_id=7, input_fields={"queueName": "shared", "maxThroughput": "ten"}
            )
        )
    with psycopg.connect(db_url) as conn:
        rows = dict(conn.execute("SELECT key, policy FROM queues").fetchall())
    assert rows["queue:7:8:9:2"]["limit"] == 500
    assert rows["queue:7:8:9:2"]["period_s"] == 3600
    # invalid maxThroughput falls through to [defaults] (10 per second)
    assert rows["queue:7:named:shared"]["limit"] == 10
    assert rows["queue:7:named:shared"]["period_s"] == 1


async def test_only_the_input_fields_throttled_reads_are_stored(daemon_factory, db_url):
    fields = {
        "maxThroughput": "5",
        "timeUnit": "seconds",
        "priority": "3",
        "queueName": "shared",
        "email": "someone@example.com",  # mapped in by the workflow: not ours to keep
        "note": "x" * 500,
    }
    async with daemon_factory() as daemon:
        status, _ = await daemon.post_action(action_payload(input_fields=fields))
        assert status == 200
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT input_fields, priority FROM actions").fetchone()
    assert row is not None
    assert row[0] == {k: fields[k] for k in ("maxThroughput", "timeUnit", "priority", "queueName")}
    assert row[1] == 3


# -- hardening: no request, signed or not, gets a 500 ------------------------------------------


async def _raw_exchange(daemon, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return the first response's status, headers (lower-case) and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.runtime.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        length = 0 if request.startswith(b"HEAD ") else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return int(lines[0].split(" ", 2)[1]), headers, body
    finally:
        writer.close()


def _raw_request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    fields = {"Host": "x", "Content-Length": str(len(body)), **headers}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return (head + "\r\n").encode("latin-1") + body


@pytest.mark.parametrize("coding", ["gzip", "deflate", "GZIP"])
@pytest.mark.parametrize("signed", [False, True])
async def test_undecodable_compressed_body_is_400_naming_it(daemon_factory, db_url, coding, signed):
    body = b"this is not compressed data" * 4
    async with daemon_factory() as daemon:
        headers = _signed(daemon, body) if signed else {"Content-Type": "application/json"}
        status, answer, _ = await _post_raw(daemon, body, {**headers, "Content-Encoding": coding})
        assert (status, answer["error"]) == (400, "invalid_body"), answer
        assert f"Content-Encoding: {coding.lower()}" in answer["message"]
        status, _ = await daemon.post_action(action_payload())  # and it still serves
        assert status == 200
    assert _count(db_url) == 1


async def test_body_errors_of_every_kind_are_json_4xx(daemon_factory, db_url):
    async with daemon_factory(ingest={"max_body_bytes": 2048}) as daemon:
        valid = json.dumps(action_payload()).encode()
        deflated = zlib.compress(valid)
        cases = [
            # a deflate stream cut short (aiohttp finds out only at the end of the body)
            _raw_request(
                "POST",
                ACTION,
                deflated[:-6],
                **{"Content-Type": JSON, "Content-Encoding": "deflate"},
            ),
            # a broken chunked encoding
            b"POST /api/hubspot/action HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            # gzip, chunked, larger than max_body_bytes once decompressed
            _chunked_gzip(b" " * 200_000 + valid),
            # a Content-Length shorter than the body: the rest is not a request
            _raw_request("POST", ACTION, b"{}", **{"Content-Type": JSON, "Content-Length": "1"}),
            # codings aiohttp cannot decode here, or none it knows
            _raw_request("POST", ACTION, b"{}", **{"Content-Type": JSON, "Content-Encoding": "br"}),
            _raw_request(
                "POST", ACTION, b"{}", **{"Content-Type": JSON, "Content-Encoding": "zstd"}
            ),
        ]
        for request in cases:
            status, _, _ = await _raw_exchange(daemon, request)
            assert 400 <= status < 500, request[:200]
    assert _count(db_url) == 0


def _chunked_gzip(data: bytes) -> bytes:
    packed = gzip.compress(data)
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(packed[i : i + 500]), packed[i : i + 500])
        for i in range(0, len(packed), 500)
    )
    return (
        b"POST /api/hubspot/action HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )


ACTION = "/api/hubspot/action"
JSON = "application/json"


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, gzip", "foo"])
async def test_unknown_content_encoding_is_415(daemon_factory, db_url, coding):
    async with daemon_factory() as daemon:
        body = json.dumps(action_payload()).encode()
        headers = {**_signed(daemon, body), "Content-Encoding": coding}
        status, answer, _ = await _post_raw(daemon, body, headers)
        assert (status, answer["error"]) == (415, "unsupported_media_type")
        assert "Content-Encoding" in answer["message"]
    assert _count(db_url) == 0


@pytest.mark.parametrize(
    ("coding", "pack"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),  # a zlib stream, as RFC 9110 has it
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some send
        ("identity", lambda data: data),
    ],
)
async def test_compressed_bodies_are_decoded_and_stored(daemon_factory, db_url, coding, pack):
    async with daemon_factory() as daemon:
        body = json.dumps(action_payload()).encode()
        headers = {**_signed(daemon, body), "Content-Encoding": coding}
        status, answer, _ = await _post_raw(daemon, pack(body), headers)
        assert status == 200, answer
    assert _count(db_url) == 1


@pytest.mark.parametrize(
    "wire",
    [
        gzip.compress(b"{}" * 100, mtime=0)[:-4],  # the end of the stream (its length) missing
        gzip.compress(b"{}" * 100, mtime=0)[:20],
        gzip.compress(b"{}", mtime=0) + b"trailing bytes",
        b"",
    ],
    ids=["no-trailer", "cut", "trailing-bytes", "empty"],
)
async def test_a_gzip_stream_that_is_not_whole_is_400(daemon_factory, db_url, wire):
    async with daemon_factory() as daemon:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        status, answer, _ = await _post_raw(daemon, wire, headers)
        assert (status, answer["error"]) == (400, "invalid_body"), answer
    assert _count(db_url) == 0


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; a*",  # the email package's parser raises IndexError on this
        "application/json;;;=;charset",
        "Application/JSON ; charset=UTF-8",
        "application/json; charset=\"utf-8\"; x*=utf-8''%ff",
    ],
)
async def test_content_type_parameters_never_give_a_500(daemon_factory, db_url, content_type):
    async with daemon_factory() as daemon:
        body = json.dumps(action_payload()).encode()
        status, answer, _ = await _post_raw(
            daemon, body, {**_signed(daemon, body), "Content-Type": content_type}
        )
        assert status == 200, answer
        status, answer, _ = await _post_raw(daemon, body, {"Content-Type": content_type})
        assert (status, answer["error"]) == (401, "invalid_signature")
    assert _count(db_url) == 1


PATH_VARIANTS = [
    ("POST", "/api/hubspot%2Faction", 404),
    ("POST", "/api/hubspot%2faction", 404),
    ("GET", "/api/hubspot%2Faction", 404),
    ("POST", "/api/hubspot/action/", 404),
    ("POST", "//api/hubspot/action", 404),
    ("POST", "/API/hubspot/action", 404),
    ("POST", "/api/hubspot/action%20", 404),
    ("POST", "/api/hubspot/%61ction", 401),  # the action path itself, unsigned
    ("GET", "/api/hubspot/%61ction", 405),
    ("GET", "/healthz%00", 404),
    ("GET", "/healthz%2F", 404),
    ("GET", "/%2e%2e/healthz", 404),
    ("GET", "/healthz?x=%zz", 200),
    ("GET", "/" + "a" * 5000, 404),
    ("GET", "/%ff%fe", 404),
    ("HEAD", "/api/hubspot/action", 405),
    ("OPTIONS", "/api/hubspot/action", 405),
    ("DELETE", "/healthz", 405),
]


@pytest.mark.parametrize(("method", "path", "expected"), PATH_VARIANTS)
async def test_path_variants_get_json_answers_that_fit_the_method(
    daemon_factory, method, path, expected
):
    async with daemon_factory() as daemon:
        body_headers = {"Content-Type": JSON} if method == "POST" else {}
        request = _raw_request(method, path, b"{}" if method == "POST" else b"", **body_headers)
        status, headers, body = await _raw_exchange(daemon, request)
        assert status == expected, body[:300]
        assert headers["content-type"].startswith("application/json")
        if status == 405:
            assert method not in headers["allow"].split(", ")
        if method != "HEAD":
            answer = json.loads(body)
            assert len(answer.get("message", "")) < 300
            assert "a" * 300 not in body.decode()


async def test_an_unexpected_failure_is_logged_and_answered_json_500(daemon_factory, db_url):
    async with daemon_factory() as daemon:

        def broken(request: Any) -> Any:
            raise RuntimeError("a bug")

        daemon.runtime.services.intake.build = broken  # type: ignore[method-assign]
        with structlog.testing.capture_logs() as events:
            status, answer = await daemon.post_action(action_payload())
        assert (status, answer["error"]) == (500, "internal_error")
        assert "Traceback" not in json.dumps(answer)
        assert "a bug" not in json.dumps(answer)
        [failed] = [e for e in events if e["event"] == "request_failed"]
        assert failed["log_level"] == "error"
        assert failed["exc_info"] is True
        assert failed["path"] == "/api/hubspot/action"
    assert _count(db_url) == 0


async def test_guarded_handlers_answer_json_whatever_they_raise():
    request = make_mocked_request("GET", "/healthz")

    async def bug(_: web.Request) -> web.Response:
        raise KeyError("x")

    async def refusal(_: web.Request) -> web.Response:
        raise web.HTTPBadRequest(reason="Bad Thing")

    with structlog.testing.capture_logs():
        response = await guarded(bug)(request)
    assert response.status == 500
    assert json.loads(response.body)["error"] == "internal_error"  # type: ignore[arg-type]
    response = await guarded(refusal)(request)
    assert response.status == 400
    assert json.loads(response.body) == {"error": "bad_thing", "message": "Bad Thing"}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"BREW /api/hubspot/action HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /api/hubspot/action HTTP/1.1\r\nContent-Length: 0\r\n\r\n",  # no Host
        b"POST /api/hubspot/action HTTP/1.1\r\nHost: x\r\n"
        b"X-HubSpot-Signature: sekrit\x00\r\nContent-Length: 0\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-N: 1\r\n" * 200 + b"\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # TLS on the HTTP port
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["unknown-method", "no-host", "nul-in-header", "long-header", "201-headers", "tls", "star"],
)
async def test_requests_aiohttp_refuses_itself_get_json_answers(daemon_factory, request_bytes):
    async with daemon_factory() as daemon:
        status, headers, body = await _raw_exchange(daemon, request_bytes)
        assert status in (400, 404, 405), body
        assert headers["content-type"].startswith("application/json")
        answer = json.loads(body)
        assert isinstance(answer["error"], str)
        assert len(answer["message"]) <= 210
        assert b"sekrit" not in body


async def test_a_head_request_aiohttp_refuses_gets_no_body(daemon_factory):
    async with daemon_factory() as daemon:
        url = daemon.url + "/api/hubspot/action"
        # a clean request first, so that the refused one comes on a kept-alive connection
        async with daemon.session.get(url) as resp:
            assert resp.status == 405
        duplicate = CIMultiDict([("Content-Type", JSON), ("Content-Type", JSON)])
        for _ in range(2):
            async with daemon.session.head(url, headers=duplicate) as resp:
                assert resp.status == 400  # (aiohttp's client fails on a body after a HEAD)
                assert resp.headers["Content-Type"].startswith("application/json")
        async with daemon.session.post(url, data=b"{}", headers=duplicate) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "bad_request"
