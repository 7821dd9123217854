"""The OpenAPI 3.1 document of the HTTP surface, served at `GET /api/openapi.json`.

It needs no admin token: it holds no secrets (it describes the routes, not their data), and
an operator's tooling fetches it before it is given one. Request bodies are described by the
handlers' own pydantic models, and answers by throttled.web.schemas, so that the document
follows the code; tests/test_openapi.py checks that it names every route the app serves and
runs schemathesis against a daemon with it. Built on the first request, then kept (it
depends on nothing configured).
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from throttled.hubspot.signature import SIGNATURE, SIGNATURE_V3, SIGNATURE_VERSION, TIMESTAMP
from throttled.queue_view import SORTS, STATES
from throttled.web import dashboard_api, schemas
from throttled.web.config_api import MAX_BODY_BYTES, MAX_ID, PAGE_MAX, RateFields, ThrottleConfig
from throttled.web.oauth import MAX_CODE_CHARS, MAX_STATE_CHARS
from throttled.web.queues_api import FailPending, RateOverride

PATH = "/api/openapi.json"
_REF = "#/components/schemas/{model}"
_MODELS: tuple[type[BaseModel], ...] = (
    ThrottleConfig,
    RateFields,
    RateOverride,
    FailPending,
    schemas.Error,
    schemas.Block,
    schemas.ActionRequest,
    schemas.Status,
    schemas.ConfigView,
    schemas.ConfigPage,
    schemas.ConfigDeleted,
    schemas.AuditPage,
    schemas.ActionView,
    schemas.QueueView,
    schemas.QueuePage,
    schemas.QueueChanged,
    schemas.QueueRetried,
    schemas.QueueFailed,
    schemas.PortalView,
    schemas.PortalPage,
    schemas.PortalTest,
    schemas.PortalDisconnected,
    schemas.FailurePage,
    schemas.Throughput,
    schemas.ClusterView,
)

# What each error status means, unless an operation says more.
_WHY = {
    400: "a parameter or the body is malformed",
    401: "no valid admin token (WWW-Authenticate: Bearer)",
    403: "the admin API is disabled: no admin token is configured",
    404: "not found",
    408: "the request body did not arrive within server.body_timeout_s",
    413: "the request body is too large",
    415: "a compressed body (admin bodies are plain JSON)",
    422: "the body is JSON but not valid: `fields` names every bad field",
    429: "too many requests; retry after Retry-After seconds",
    503: "storage is unavailable; retry after Retry-After seconds",
}
_ADMIN = (401, 403, 503)
_BODY = (400, 408, 413, 415, 422)
_RETRY_AFTER = {"description": "seconds", "schema": {"type": "integer"}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(description: str, schema: dict[str, Any], **headers: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        answer["headers"] = {name.replace("_", "-"): h for name, h in headers.items()}
    return answer


def _html(description: str, **headers: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"text/html": {"schema": {"type": "string"}}},
    }
    if headers:
        answer["headers"] = {name.replace("_", "-"): h for name, h in headers.items()}
    return answer


def _with_json(answer: dict[str, Any], why: str) -> dict[str, Any]:
    """An HTML answer that the server itself may give as a JSON error instead."""
    answer["description"] += f"; {why}"
    answer["content"]["application/json"] = {"schema": _ref("Error")}
    return answer


def _errors(*codes: int, **why: str) -> dict[str, Any]:
    """JSON error answers; `why` (as e400="...") says what a status means for this route."""
    out = {}
    for code in codes:
        headers: dict[str, Any] = {}
        if code in (429, 503):
            headers["Retry_After"] = _RETRY_AFTER
        text = why.get(f"e{code}", _WHY[code])
        out[str(code)] = _json(text, _ref("Error"), **headers)
    return out


def _param(where: str, name: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": text,
        "schema": schema,
    }


_ID = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
_LIMIT = _param(
    "query",
    "limit",
    {"type": "integer", "minimum": 1, "maximum": PAGE_MAX, "default": 100},
    "entries per page",
)


def _cursor(text: str = "the next_cursor of the previous page") -> dict[str, Any]:
    return _param("query", "cursor", {"type": "string"}, text)


def _admin(
    op_id: str,
    tag: str,
    summary: str,
    ok: dict[str, Any],
    *,
    errors: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    body: str | None = None,
) -> dict[str, Any]:
    """An admin operation: bearer token; 401, 403 and 503 besides its own answers."""
    responses = {"200": ok, **(errors or {}), **_errors(*_ADMIN)}
    responses["401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    op: dict[str, Any] = {
        "operationId": op_id,
        "tags": [tag],
        "summary": summary,
        "security": [{"adminBearer": []}],
    }
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "description": f"JSON, uncompressed, at most {MAX_BODY_BYTES} bytes, each key once",
            "content": {"application/json": {"schema": _ref(body)}},
        }
        responses |= _errors(*_BODY, e400="the body is not JSON")
    op["responses"] = dict(sorted(responses.items()))
    return op


def _action() -> dict[str, Any]:
    post = {
        "operationId": "handle_action",
        "tags": ["action"],
        "summary": "A workflow action from HubSpot: verified, stored durably, held (BLOCK)",
        "description": (
            "Signed by HubSpot with the app's client secret: v3 "
            f"({SIGNATURE_V3} and {TIMESTAMP}, within 5 minutes) or v2 ({SIGNATURE} and "
            f"{SIGNATURE_VERSION}); no admin token. The body may be gzip or deflate "
            "encoded (Content-Encoding). Duplicates (same callbackId) get the same answer."
        ),
        "security": [{"hubspotSignature": []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref("ActionRequest")}},
        },
        "responses": {
            "200": _json("stored; the workflow waits for the callback", _ref("Block")),
            **_errors(
                400,
                401,
                408,
                413,
                415,
                429,
                503,
                e400="the body cannot be read or decoded, or the payload is not valid",
                e401="the signature is missing, wrong or too old",
                e413="the body exceeds ingest.max_body_bytes (after decoding too)",
                e415="Content-Type is not application/json, or an unknown Content-Encoding",
                e429="the intake buffer is full; retry after Retry-After seconds",
                e503="shutting down, or storage is unavailable; retry after Retry-After",
            ),
        },
    }
    return {"/api/hubspot/action": {"post": post}}


def _oauth() -> dict[str, Any]:
    retry = {"Retry_After": _RETRY_AFTER}
    authorize = {
        "operationId": "oauth_authorize",
        "tags": ["oauth"],
        "summary": "Start an install: redirect to HubSpot's consent page with a fresh state",
        "responses": {
            "302": _html("to HubSpot's consent page", Location={"schema": {"type": "string"}}),
            "429": _html("this address has too many installs under way", **retry),
            "503": _html("not configured (client_id, public_url), or storage is down", **retry),
        },
    }
    text = {"type": "string"}
    callback = {
        "operationId": "oauth_callback",
        "tags": ["oauth"],
        "summary": "HubSpot's redirect back: take the state, exchange the code, store tokens",
        "parameters": [
            _param("query", "state", {**text, "maxLength": MAX_STATE_CHARS}, "from authorize"),
            _param("query", "code", {**text, "maxLength": MAX_CODE_CHARS}, "HubSpot's code"),
            _param("query", "error", {**text, "maxLength": 200}, "HubSpot's refusal"),
            _param("query", "error_description", {**text, "maxLength": 500}, "its reason"),
        ],
        "responses": {
            "200": _html("the portal is connected"),
            "400": _with_json(
                _html("a missing, repeated, unknown, used or expired parameter; declined"),
                "(JSON) a request line too long to parse (over 8190 bytes)",
            ),
            "403": _html("the automation scope was not granted (nothing stored)"),
            "502": _html("HubSpot could not be reached, or did not name the portal"),
            "503": _html("storage is unavailable", **retry),
        },
    }
    return {
        "/api/oauth/authorize": {"get": authorize},
        "/api/oauth/callback": {"get": callback},
    }


def _configs() -> dict[str, Any]:
    ids = [
        _param("path", "portal_id", _ID, "the HubSpot portal (hub) id"),
        _param("path", "action_id", _ID, "the custom action definition id"),
    ]
    bad_ids = _errors(400, 404, e400="portal_id or action_id is not 1..2^63-1", e404="no config")
    return {
        "/api/config": {
            "post": _admin(
                "set_config",
                "configs",
                "Create or update a throttle config; takes effect at once",
                _json("the stored config", _ref("ConfigView")),
                body="ThrottleConfig",
            ),
            "get": _admin(
                "list_configs",
                "configs",
                "Configs in (portal, action) order",
                _json("a page of configs", _ref("ConfigPage")),
                params=[_LIMIT, _cursor()],
                errors=_errors(400, e400="limit or cursor is not valid"),
            ),
        },
        "/api/config/{portal_id}/{action_id}": {
            "parameters": ids,
            "get": _admin(
                "get_config",
                "configs",
                "One config",
                _json("the config", _ref("ConfigView")),
                errors=bad_ids,
            ),
            "delete": _admin(
                "delete_config",
                "configs",
                "Delete a config: new actions fall back to the defaults",
                _json("deleted", _ref("ConfigDeleted")),
                errors=bad_ids,
            ),
        },
    }


def _audit_and_actions() -> dict[str, Any]:
    target = {"type": "string", "maxLength": 300}
    return {
        "/api/audit": {
            "get": _admin(
                "list_audit",
                "audit",
                "The audit log of changes, newest first",
                _json("a page of entries", _ref("AuditPage")),
                params=[
                    _param("query", "target", target, "e.g. config:62515:7, portal:62515"),
                    _LIMIT,
                    _cursor(),
                ],
                errors=_errors(400, e400="limit, cursor or target is not valid"),
            )
        },
        "/api/actions/{callback_id}": {
            "get": _admin(
                "show_action",
                "actions",
                "One action: state, queue, attempts, last error, times",
                _json("the action", _ref("ActionView")),
                params=[
                    _param(
                        "path",
                        "callback_id",
                        {"type": "string", "minLength": 1, "maxLength": 255},
                        "HubSpot's callbackId (printable)",
                    )
                ],
                errors=_errors(400, 404, e400="not 1..255 printable characters"),
            )
        },
    }


def _queues() -> dict[str, Any]:
    queue_id = _param(
        "path",
        "id",
        {"anyOf": [_ID, {"type": "string", "pattern": "^queue:", "maxLength": 400}]},
        "the queue's id, or its key URL-encoded (queue%3A62515%3A9%3A7%3A0)",
    )
    missing = _errors(404, e404="no such queue")
    changed = _json("the queue", _ref("QueueChanged"))

    def operation(op_id: str, summary: str, ok: dict[str, Any], **kw: Any) -> dict[str, Any]:
        errors = {**missing, **kw.pop("errors", {})}
        return _admin(op_id, "queues", summary, ok, errors=errors, **kw)

    return {
        "/api/queues": {
            "get": _admin(
                "list_queues",
                "queues",
                "Queues: backlog, effective rate and its sources, drain estimate, risk",
                _json("a page of queues", _ref("QueuePage")),
                params=[
                    _param("query", "portal_id", _ID, "only this portal's queues"),
                    _param("query", "state", {"enum": list(STATES)}, "only queues in this state"),
                    _param("query", "at_risk", {"type": "boolean"}, "true or false"),
                    _param(
                        "query", "sort", {"enum": list(SORTS), "default": "backlog"}, "the order"
                    ),
                    _LIMIT,
                    _cursor(),
                ],
                errors=_errors(400, e400="a query parameter is not valid (`field` names it)"),
            )
        },
        "/api/queues/{id}": {
            "parameters": [queue_id],
            "get": operation("get_queue", "One queue", _json("the queue", _ref("QueueView"))),
        },
        "/api/queues/{id}/pause": {
            "parameters": [queue_id],
            "post": operation("pause", "Pause: nothing is sent until resumed", changed),
        },
        "/api/queues/{id}/resume": {
            "parameters": [queue_id],
            "post": operation("resume", "Resume a paused queue", changed),
        },
        "/api/queues/{id}/rate": {
            "parameters": [queue_id],
            "put": operation(
                "set_rate",
                "Override any subset of the rate fields (at least one)",
                changed,
                body="RateOverride",
            ),
            "delete": operation("clear_rate", "Remove the operator's override", changed),
        },
        "/api/queues/{id}/retry-failed": {
            "parameters": [queue_id],
            "post": operation(
                "retry_failed",
                "Send failed actions again (those whose block has not expired)",
                _json("what was retried, and the queue", _ref("QueueRetried")),
            ),
        },
        "/api/queues/{id}/fail-pending": {
            "parameters": [queue_id],
            "post": operation(
                "fail_pending",
                'Complete every pending action FAIL_CONTINUE (send {"confirm": true})',
                _json("how many were released, and the queue", _ref("QueueFailed")),
                body="FailPending",
            ),
        },
    }


def _portals() -> dict[str, Any]:
    portal = [_param("path", "id", _ID, "the HubSpot portal (hub) id")]
    errors = _errors(400, 404, e400="not a portal id 1..2^63-1", e404="no such portal")
    return {
        "/api/portals": {
            "get": _admin(
                "list_portals",
                "portals",
                "Every known portal",
                _json("the portals", _ref("PortalPage")),
            )
        },
        "/api/portals/{id}": {
            "parameters": portal,
            "get": _admin(
                "show_portal",
                "portals",
                "One portal: connection, token, health, backlog",
                _json("the portal", _ref("PortalView")),
                errors=errors,
            ),
        },
        "/api/portals/{id}/test": {
            "parameters": portal,
            "post": _admin(
                "test_portal",
                "portals",
                "Token-info for a fresh token, with its latency",
                _json("the result (ok false names the problem)", _ref("PortalTest")),
                errors=errors,
            ),
        },
        "/api/portals/{id}/connection": {
            "parameters": portal,
            "delete": _admin(
                "disconnect_portal",
                "portals",
                "Revoke at HubSpot and drop the tokens; the actions wait",
                _json("disconnected", _ref("PortalDisconnected")),
                errors=errors,
            ),
        },
    }


def _dashboard_data() -> dict[str, Any]:
    def bounded(name: str, default: int, largest: int, text: str) -> dict[str, Any]:
        schema = {"type": "integer", "minimum": 1, "maximum": largest, "default": default}
        return _param("query", name, schema, text)

    failures = dashboard_api.FAILURES_DEFAULT, dashboard_api.FAILURES_MAX
    minutes = dashboard_api.MINUTES_DEFAULT, dashboard_api.MINUTES_MAX
    return {
        "/api/failures": {
            "get": _admin(
                "list_failures",
                "dashboard",
                "The latest failed or expired actions, newest first",
                _json("the failures", _ref("FailurePage")),
                params=[bounded("limit", *failures, "how many")],
                errors=_errors(400, e400="limit is not valid"),
            )
        },
        "/api/throughput": {
            "get": _admin(
                "throughput",
                "dashboard",
                "Completions per minute (done, failed, expired), and done per queue",
                _json("every minute of the window, oldest first", _ref("Throughput")),
                params=[bounded("minutes", *minutes, "the window, up to now")],
                errors=_errors(400, e400="minutes is not valid"),
            )
        },
    }


def _cluster() -> dict[str, Any]:
    return {
        "/api/cluster": {
            "get": _admin(
                "show_cluster",
                "cluster",
                "The instances sharing the database: heartbeats, and the portals each owns",
                _json("the instances", _ref("ClusterView")),
            )
        }
    }


def _dashboard_page() -> dict[str, Any]:
    cache = {"Cache_Control": {"schema": {"type": "string"}}}

    def files(op_id: str, summary: str) -> dict[str, Any]:
        code = {"schema": {"type": "string"}}
        ok = {
            "description": "the file",
            "content": {"text/javascript": code, "text/css": code, "image/svg+xml": code},
            "headers": {name.replace("_", "-"): h for name, h in cache.items()},
        }
        return {
            "parameters": [_param("path", "name", {"type": "string"}, "the file's name")],
            "get": {
                "operationId": op_id,
                "tags": ["dashboard"],
                "summary": summary,
                "responses": {"200": ok, **_errors(404, e404="no such file")},
            },
        }

    csp = {"Content_Security_Policy": {"schema": {"type": "string"}}}
    return {
        "/": {
            "get": {
                "operationId": "dashboard",
                "tags": ["dashboard"],
                "summary": "The operator's dashboard (the page asks for the admin token)",
                "responses": {"200": _html("the page", **cache, **csp)},
            }
        },
        "/static/{name}": files("dashboard_file", "The dashboard's script, style sheet, icon"),
        "/static/vendor/{name}": files("dashboard_vendor_file", "The vendored chart library"),
    }


def _operations() -> dict[str, Any]:
    def probe(op_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
        return {
            "get": {
                "operationId": op_id,
                "tags": ["health"],
                "summary": summary,
                "responses": responses,
            }
        }

    status = _ref("Status")
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "/healthz": probe(
            "healthz",
            "The process is up and its event loop keeps time",
            {"200": _json("ok", status), "503": _json("loop_stalled", status)},
        ),
        "/readyz": probe(
            "readyz",
            "Accepting actions, the schema is current, and the database answers",
            {
                "200": _json("ready", status),
                "503": _json("stopping, migrations_not_current or database_unavailable", status),
            },
        ),
        "/metrics": probe(
            "metrics",
            "Prometheus metrics",
            {"200": {"description": "Prometheus text format", "content": text}},
        ),
        PATH: {
            "get": {
                "operationId": "openapi",
                "tags": ["meta"],
                "summary": "This document (no token needed: it holds no secrets)",
                "responses": {
                    "200": _json("the OpenAPI 3.1 document", {"type": "object"}),
                },
            }
        },
    }


def components() -> dict[str, Any]:
    """Every model's JSON Schema, the models they nest pulled up beside them."""
    out: dict[str, Any] = {}
    for model in _MODELS:
        schema = model.model_json_schema(ref_template=_REF)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return dict(sorted(out.items()))


_DESCRIPTION = """\
A rate-limiting buffer for HubSpot custom workflow actions.

Admin routes need `Authorization: Bearer <token>` (`[[admin.tokens]]` or
THROTTLED_ADMIN_TOKEN); with none configured they answer 403. Errors are JSON
(`{"error", "message", "field"?, "fields"?}`), except the OAuth pages, which are HTML.
Every GET route except the OAuth ones also answers HEAD. A path no route serves is a JSON
404, a method a path does not accept a JSON 405 with `Allow`, and a request the server
cannot parse (a request line or header over 8190 bytes, say) a JSON 400.
"""


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route make_app serves."""
    try:
        version = importlib.metadata.version("throttled")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    paths = {**_action(), **_oauth(), **_configs(), **_audit_and_actions()}
    paths |= {**_queues(), **_portals(), **_dashboard_data(), **_operations()}
    paths |= {**_dashboard_page(), **_cluster()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "throttled", "version": version, "description": _DESCRIPTION},
        "tags": [{"name": name} for name in _TAGS],
        "paths": paths,
        "components": {
            "schemas": components(),
            "securitySchemes": {
                "adminBearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "an admin token from [[admin.tokens]]",
                },
                "hubspotSignature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": SIGNATURE_V3,
                    "description": "HubSpot's request signature (see the action endpoint)",
                },
            },
        },
    }


_TAGS = (
    "action",
    "oauth",
    "configs",
    "queues",
    "portals",
    "actions",
    "audit",
    "dashboard",
    "cluster",
    "health",
    "meta",
)


@functools.cache
def _encoded() -> bytes:
    return json.dumps(document(), separators=(",", ":")).encode()


async def serve(request: web.Request) -> web.Response:
    """GET /api/openapi.json: this API's OpenAPI 3.1 document (no admin token needed)."""
    return web.Response(body=_encoded(), content_type="application/json")
