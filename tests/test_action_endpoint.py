"""The action endpoint's answers: every status code, duplicates, nothing invalid stored."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator

import psycopg
import pytest

from tests.conftest import CLIENT_SECRET, action_payload
from throttled.hubspot.signature import sign_headers


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
    async with daemon_factory(ingest={"retry_after_s": 9}) as daemon:
        daemon.runtime.services.stopping = True
        body = json.dumps(action_payload()).encode()
        status, answer, headers = await _post_raw(daemon, body, _signed(daemon, body))
        daemon.runtime.services.stopping = False
        assert (status, answer["error"]) == (503, "stopping")
        assert headers["Retry-After"] == "5"
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
