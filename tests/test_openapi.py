"""The OpenAPI document at /api/openapi.json: served without a token, valid OpenAPI 3.1, it
names every route the app serves and no other, its statuses are plausible, and a short
schemathesis run against a daemon (with real rows behind the path parameters) finds no 5xx
and no answer the document does not describe."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import schemathesis
from aiohttp import hdrs
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Daemon, action_payload
from throttled.queue_view import SORTS, SOURCES, STATES
from throttled.web import openapi
from throttled.web.app import make_app

TOKEN = "openapi-admin-token-0123456789abcdef"
ADMIN = {"admin": {"tokens": [{"id": "ops", "token": TOKEN}]}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PORTAL, ACTION = 62515, 1234567
METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 25  # per operation at most (small input spaces run fewer): ~500 requests in all
# authorize needs a redirect URI to answer 302 (else 503: not configured)
SECTIONS: dict[str, dict[str, Any]] = {
    **ADMIN,
    "hubspot": {"redirect_uri": "http://127.0.0.1:9/api/oauth/callback"},
}


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    """(method, path template) of every operation in the document."""
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (m.upper(), path, op)
        for path, item in doc["paths"].items()
        for m, op in item.items()
        if m in METHODS
    ]


async def fetch_document(daemon: Daemon) -> tuple[int, str, dict[str, Any]]:
    async with daemon.session.get(daemon.url + openapi.PATH) as resp:  # no token
        return resp.status, resp.content_type, await resp.json()


async def test_the_document_is_served_without_a_token_and_is_valid_openapi_3_1(daemon_factory):
    async with daemon_factory(**ADMIN) as daemon:
        status, content_type, doc = await fetch_document(daemon)
        assert (status, content_type) == (200, "application/json")
        assert (await fetch_document(daemon))[2] == doc  # (kept: the same each time)
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on anything that is not OpenAPI 3.1
    assert doc == openapi.document()


async def test_the_document_names_every_route_the_app_serves_and_no_other(daemon_factory):
    async with daemon_factory(**ADMIN) as daemon:
        app = make_app(daemon.runtime.services)
    served = set()
    for route in app.router.routes():
        if route.method in (hdrs.METH_ANY, hdrs.METH_HEAD):  # the catch-all; GET's HEAD twin
            continue
        assert route.resource is not None
        served.add((route.method, route.resource.canonical))
    doc = openapi.document()
    assert sorted(served - documented(doc)) == [], "served but not documented"
    assert sorted(documented(doc) - served) == [], "documented but not served"


def test_each_operation_documents_only_the_statuses_it_can_answer():
    doc = openapi.document()
    for method, path, op in operations(doc):
        where = f"{method} {path}"
        codes = {int(code) for code in op["responses"]}  # (no "default", no ranges)
        secured = [name for entry in op.get("security", []) for name in entry]
        admin = secured == ["adminBearer"]
        body = "requestBody" in op
        parameters = [*doc["paths"][path].get("parameters", []), *op.get("parameters", [])]
        assert any(200 <= c < 400 for c in codes), where
        assert 500 not in codes, where  # a 500 is a bug, never part of the contract
        if admin:
            assert {401, 403, 503} <= codes, where
        else:
            assert 403 not in codes or path == "/api/oauth/callback", where  # (scope refused)
        assert (401 in codes) == bool(secured), where
        if body and admin:
            assert {400, 408, 413, 415, 422} <= codes, where
        if not body:
            assert not codes & {408, 413, 415, 422}, where
        if any(p["in"] == "query" for p in parameters):
            assert 400 in codes, where
        if 404 in codes:
            assert "{" in path, f"{where}: a 404 needs a path parameter"
        if 302 in codes:
            assert path == "/api/oauth/authorize", where
        if 422 in codes:
            assert body, where


def test_the_queue_enums_are_the_code_s():
    schemas = openapi.document()["components"]["schemas"]
    assert schemas["QueueView"]["properties"]["state"]["enum"] == list(STATES)
    sources = schemas["QueueView"]["properties"]["rate_sources"]["additionalProperties"]
    assert sources["enum"] == list(SOURCES)
    (listing,) = [
        p
        for p in openapi.document()["paths"]["/api/queues"]["get"]["parameters"]
        if p["name"] == "sort"
    ]
    assert listing["schema"]["enum"] == list(SORTS)


@dataclass
class Known:
    """Rows the fuzzer's path parameters should hit, by operation path, and bodies that are
    valid beyond their JSON Schema (a rate within bounds), by operation."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: dict[str, Any] = field(default_factory=dict)


async def seed(daemon: Daemon, fake: Any) -> Known:
    """A connected portal, a config, a queue with pending actions, another never connected."""
    await daemon.connect_portal(fake, PORTAL)
    fields = {"maxThroughput": "1", "timeUnit": "hours"}  # (the rest stay pending)
    callbacks = []
    for portal in (PORTAL, PORTAL, PORTAL, 777):
        payload = action_payload(portal_id=portal, action_id=ACTION, input_fields=fields)
        status, body = await daemon.post_action(payload)
        assert status == 200, body
        callbacks.append(payload["callbackId"])
    config = {"portal_id": PORTAL, "action_id": ACTION, "max_throughput": 5, "time_unit": "minute"}
    async with daemon.session.post(daemon.url + "/api/config", json=config, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
    async with daemon.session.get(
        daemon.url + f"/api/queues?portal_id={PORTAL}", headers=AUTH
    ) as r:
        (queue,) = (await r.json())["queues"]
    ids = {"portal_id": PORTAL, "action_id": ACTION}
    known = Known()
    for path in openapi.document()["paths"]:
        if path.startswith("/api/queues/{id}"):
            known.values[path] = {"id": queue["id"]}
        elif path.startswith("/api/portals/{id}"):
            known.values[path] = {"id": PORTAL}
        elif path.startswith("/api/config/"):
            known.values[path] = ids
        elif path.startswith("/api/actions/"):
            known.values[path] = {"callback_id": callbacks[0]}
    known.values["/static/{name}"] = {"name": "dashboard.js"}
    known.values["/static/vendor/{name}"] = {"name": "uPlot.min.css"}
    known.values["/api/queues/{id}/pause"] = {"id": queue["key"]}
    known.bodies["POST /api/config"] = {**config, "action_id": ACTION + 1, "pacing": "even"}
    known.bodies["PUT /api/queues/{id}/rate"] = {"max_throughput": "3", "time_unit": "minutes"}
    return known


@dataclass
class Run:
    """What the fuzzer did."""

    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def clip(text: str, limit: int = 3000) -> str:
    """A failure's report without the kilobytes of a long URL it repeats."""
    return text if len(text) <= limit else text[: limit // 2] + " … " + text[-limit // 2 :]


def fuzz(base_url: str, known: Known) -> Run:
    """schemathesis on every operation: positive and negative cases, and positive ones whose
    path parameters are rows that exist. Blocking (requests): run it in a thread."""
    # (a Config of its own: no schemathesis.toml found on the way up changes the run)
    schema = schemathesis.openapi.from_url(base_url + openapi.PATH, config=schemathesis.Config())
    session = requests.Session()
    run = Run()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        try:
            fuzz_one(operation, known, base_url, session, run)
        except (Exception, BaseExceptionGroup) as exc:  # (schemathesis's failures are a group)
            run.failures.append(f"{label}: {clip(str(exc))}")  # every operation's, not the first
    run.seconds = time.monotonic() - started
    return run


def fuzz_one(
    operation: Any, known: Known, base_url: str, session: requests.Session, run: Run
) -> None:
    """One operation's cases, each called and checked."""
    label = f"{operation.method.upper()} {operation.path}"
    modes = [operation.as_strategy(GenerationMode.POSITIVE)]
    if operation.path_parameters or operation.query or operation.body:
        modes.append(operation.as_strategy(GenerationMode.NEGATIVE))
    fixed = known.values.get(operation.path)
    if fixed is not None:
        modes.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=fixed))
    if label in known.bodies:
        body = known.bodies[label]
        modes.append(operation.as_strategy(path_parameters=fixed or {}, body=body))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(modes))
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            base_url=base_url, session=session, headers=AUTH, checks=CHECKS
        )
        run.calls[label] += 1
        run.statuses[label, response.status_code] += 1

    check()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    daemon_factory, fake_hubspot
):
    async with daemon_factory(**SECTIONS) as daemon:
        known = await seed(daemon, fake_hubspot)
        run = await asyncio.to_thread(fuzz, daemon.url, known)
    print(f"schemathesis: {sum(run.calls.values())} cases in {run.seconds:.1f} s")
    for (label, status), n in sorted(run.statuses.items()):
        print(f"  {label} -> {status}: {n}")
    assert run.failures == []
    # (schemathesis leaves out the operation that served it the document: test 1 has it)
    every = {f"{m} {p}" for m, p in documented(openapi.document()) if p != openapi.PATH}
    assert set(run.calls) == every
