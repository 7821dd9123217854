"""The HTTP surface: the action endpoint and the operations endpoints."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from throttled import metrics
from throttled.config import Config
from throttled.db.repository import DatabaseError, DatabaseUnavailable, NewAction
from throttled.hubspot import signature
from throttled.hubspot.action import PayloadError, parse
from throttled.ingest import Overloaded, Stopping
from throttled.web import (
    actions_api,
    audit_api,
    cluster_api,
    config_api,
    dashboard,
    dashboard_api,
    oauth,
    openapi,
    portals,
    queues_api,
)
from throttled.web.admin import admin_only
from throttled.web.services import (
    BODY_ERRORS,
    ERROR_CODE,
    SERVICES,
    Services,
    clip,
    error,
    invalid_body,
    storage_unavailable,
)

log = structlog.get_logger(__name__)

METRICS: web.AppKey[Handler] = web.AppKey("metrics")  # the /metrics handler, over its registry


def signed_uri(request: web.Request, public_url: str) -> str:
    """The URI HubSpot signed: the configured public base URL + the raw path and query."""
    if public_url:
        return public_url.rstrip("/") + request.raw_path
    return f"{request.scheme}://{request.host}{request.raw_path}"


# The content codings the action endpoint decodes itself (aiohttp's decoding is off: it
# reported bad data as an exception from the body read, br or zstd as a plain-text 400 from
# its parser, and it does not notice a stream cut short), and the "no coding" ones.
_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity", ""})
_DECODED = frozenset({"gzip", "x-gzip", "deflate"})


async def handle_action(request: web.Request) -> web.StreamResponse:
    """POST /api/hubspot/action: verify, validate, store durably, answer BLOCK."""
    response = await _answer_action(request)
    result = "accepted" if response.status == 200 else response.get(ERROR_CODE, "unknown")
    metrics.RECEIVED.inc(result=result)
    if result != "accepted":
        metrics.REJECTED.inc(reason=result)
    return response


async def _answer_action(request: web.Request) -> web.StreamResponse:
    try:  # no handler may answer a bare 500: anything unexpected is logged, answered JSON
        services = request.app[SERVICES]
        cfg = services.config
        refused = _refuse(request, services)
        if refused is not None:
            return refused
        content = request.content
        try:
            if content.is_eof():  # the whole body is here (the usual case): no wait
                body = content.read_nowait()
            else:
                read = await _read_slowly(request, cfg)
                if isinstance(read, web.Response):
                    return read
                body = read
        except BODY_ERRORS as exc:
            return invalid_body(request, exc)
        if len(body) > cfg.ingest.max_body_bytes:  # (sent chunked)
            return _too_large(cfg.ingest.max_body_bytes)
        coding = request.headers.get(hdrs.CONTENT_ENCODING)
        if coding is not None and (coding := coding.strip().lower()) in _DECODED:
            decoded = _decode(body, coding, cfg.ingest.max_body_bytes)
            if isinstance(decoded, web.Response):
                return decoded
            body = decoded
        action = _accept(request, services, body)
        if isinstance(action, web.Response):
            return action
        return await _store(services, action)
    except Exception as exc:
        return internal_error(request, exc)


def _stopping(services: Services) -> web.Response:
    """The 503 of a daemon shutting down, before or after the request reached intake."""
    retry = services.config.ingest.retry_after_s
    return error(503, "stopping", "throttled is shutting down; retry", retry_after=retry)


def _refuse(request: web.Request, services: Services) -> web.Response | None:
    """The answer to a request refused on its headers alone, if it is."""
    if services.stopping:
        return _stopping(services)
    limit = services.config.ingest.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _too_large(limit)
    # The media type from the raw header: aiohttp's parser (the email package's) raises on
    # some parameters, e.g. `application/json; a*`.
    content_type = request.headers.get(hdrs.CONTENT_TYPE, "")
    if content_type != "application/json" and not _is_json(content_type):
        return error(415, "unsupported_media_type", "Content-Type must be application/json")
    if hdrs.CONTENT_ENCODING in request.headers:
        return _check_coding(request)
    return None


def _is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


def _check_coding(request: web.Request) -> web.Response | None:
    codings = request.headers.getall(hdrs.CONTENT_ENCODING)
    if len(codings) == 1 and codings[0].strip().lower() in _CODINGS:
        return None
    return error(
        415,
        "unsupported_media_type",
        f"Content-Encoding {clip(', '.join(codings), 40)!r} is not supported "
        "(gzip, deflate or none)",
    )


async def _read_slowly(request: web.Request, cfg: Config) -> bytes | web.Response:
    """The rest of a body still arriving, bounded in size and in time."""
    try:
        async with asyncio.timeout(cfg.server.body_timeout_s):
            return await request.read()  # aiohttp enforces client_max_size (= max_body_bytes)
    except web.HTTPRequestEntityTooLarge:
        return _too_large(cfg.ingest.max_body_bytes)
    except TimeoutError:
        response = error(
            408,
            "body_timeout",
            f"the request body did not arrive within {cfg.server.body_timeout_s:g} s",
        )
        response.force_close()  # the rest of the body may still come: not a request
        return response


def _decode(body: bytes, coding: str, limit: int) -> bytes | web.Response:
    """The body decoded from gzip or deflate: at most `limit` bytes, from a whole stream."""
    if coding != "deflate":
        wbits = 16 + zlib.MAX_WBITS  # gzip
    elif body[:1] and body[0] & 0x0F == 8:  # a zlib stream: deflate as RFC 9110 means it
        wbits = zlib.MAX_WBITS
    else:  # raw deflate, which some clients send instead
        wbits = -zlib.MAX_WBITS
    stream = zlib.decompressobj(wbits)
    try:
        decoded = stream.decompress(body, limit + 1)  # (a small body may inflate a lot)
    except zlib.error:
        decoded = b""
    else:
        if len(decoded) > limit:
            return _too_large(limit)
        if stream.eof and not stream.unused_data:
            return decoded
    # not compressed data, a stream cut short, or bytes after its end
    return error(400, "invalid_body", f"the body could not be decoded (Content-Encoding: {coding})")


def _accept(request: web.Request, services: Services, body: bytes) -> NewAction | web.Response:
    """The row to store, once the signature is verified and the payload valid."""
    cfg = services.config
    try:
        version = signature.verify(
            request.headers,
            secrets=services.secrets,
            method=request.method,
            uri=signed_uri(request, cfg.server.public_url),
            body=body,
            now_ms=int(time.time() * 1000),
        )
    except signature.SignatureError as exc:
        return error(401, "invalid_signature", exc.reason)
    if version == "v1" and not cfg.hubspot.accept_v1_signatures:
        return error(401, "invalid_signature", "v1 signatures are not accepted for actions")
    try:
        return services.intake.build(parse(body))
    except PayloadError as exc:
        return error(400, "invalid_payload", exc.message, field=exc.field)


async def _store(services: Services, action: NewAction) -> web.Response:
    retry = services.config.ingest.retry_after_s
    try:
        await services.ingest.submit(action)
    except Overloaded:
        return error(429, "overloaded", "intake buffer is full; retry later", retry_after=retry)
    except Stopping:
        return _stopping(services)
    except DatabaseUnavailable:
        return storage_unavailable(services)
    except DatabaseError:
        log.exception("action_store_failed", callback_id=action.callback_id)
        return error(
            503, "storage_error", "the action could not be stored; retry", retry_after=retry
        )
    metrics.ACCEPTED.inc()
    return web.Response(body=services.block_body, content_type="application/json")


def _too_large(limit: int) -> web.Response:
    return error(413, "payload_too_large", f"request body exceeds {limit} bytes")


def internal_error(request: web.Request, exc: Exception) -> web.Response:
    """The answer to a request whose handler failed: logged in full, answered without detail."""
    if isinstance(exc, web.HTTPException):  # raised on purpose: its status, as JSON
        code = exc.reason.lower().replace(" ", "_")
        return error(exc.status, code, exc.reason)
    log.exception("request_failed", method=request.method, path=clip(request.path))
    return error(500, "internal_error", "an unexpected error occurred; it has been logged")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(handler: Handler) -> Handler:
    """The handler, answering JSON even when it raises (handle_action does this inline)."""

    async def guard(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Exception as exc:
            return internal_error(request, exc)

    guard.__name__ = guard.__qualname__ = handler.__name__
    guard.__doc__ = handler.__doc__
    return guard


async def handle_healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is up and its event loop keeps time (the loop's lag; 503 if
    its ticker has not run for a while). A loop stuck for good cannot answer at all: that is
    systemd's watchdog's to catch."""
    loop = request.app[SERVICES].loop
    if loop is None:
        return web.json_response({"status": "ok"})
    alive, details = loop.snapshot()
    status = "ok" if alive else "loop_stalled"
    return web.json_response({"status": status, **details}, status=200 if alive else 503)


async def handle_readyz(request: web.Request) -> web.Response:
    """GET /readyz: accepting actions, the schema is this build's and the database answers."""
    services = request.app[SERVICES]
    if services.stopping:
        return web.json_response({"status": "stopping"}, status=503)
    if services.schema_problem:
        body = {"status": "migrations_not_current", "reason": services.schema_problem}
        return web.json_response(body, status=503)
    if not await _database_answers(services):
        return web.json_response({"status": "database_unavailable"}, status=503)
    return web.json_response({"status": "ready"})


READY_PING_S = 2.0  # a database that does not answer within this is not ready


async def _database_answers(services: Services) -> bool:
    """Whether a trivial query answers within READY_PING_S. Probes that come together share
    one query, so a database that hangs (a partition) never ties up a connection per probe."""
    ping = services.ping
    if ping is None or ping.done():
        ping = services.ping = asyncio.ensure_future(services.repo.ping())
        ping.add_done_callback(_collect)
    try:
        async with asyncio.timeout(READY_PING_S):
            await asyncio.shield(ping)
    except (DatabaseError, TimeoutError):
        return False
    return True


def _collect(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


async def handle_metrics(request: web.Request) -> web.StreamResponse:
    """GET /metrics: Prometheus text format (OpenMetrics if asked), from memory only."""
    return await request.app[METRICS](request)


def make_app(services: Services, registry: CollectorRegistry | None = None) -> web.Application:
    """The aiohttp application; /metrics serves `registry` (default: one without a daemon's
    readings). Unknown paths and methods are answered as JSON by a catch-all route rather
    than a middleware, which would wrap every request, the hot one included."""
    app = web.Application(
        client_max_size=services.config.ingest.max_body_bytes,
        handler_args={"auto_decompress": False},  # the action endpoint decodes (see _decode)
    )
    app[SERVICES] = services
    app[METRICS] = make_aiohttp_handler(registry or metrics.app_registry())

    def admin(handler: Handler) -> Handler:
        return guarded(admin_only(handler, lambda request: request.app[SERVICES].admin, error))

    # Token-free: the action endpoint (signed), the OAuth flow (its state), health, metrics,
    # the OpenAPI document and the dashboard's page and files (they hold no secrets).
    routes: list[tuple[str, str, Handler]] = [
        ("POST", "/api/hubspot/action", handle_action),
        ("GET", "/api/oauth/authorize", guarded(oauth.authorize)),
        ("GET", "/api/oauth/callback", guarded(oauth.callback)),
        ("POST", "/api/config", admin(config_api.set_config)),
        ("GET", "/api/config", admin(config_api.list_configs)),
        ("GET", "/api/config/{portal_id}/{action_id}", admin(config_api.get_config)),
        ("DELETE", "/api/config/{portal_id}/{action_id}", admin(config_api.delete_config)),
        ("GET", "/api/audit", admin(audit_api.list_audit)),
        ("GET", "/api/actions/{callback_id}", admin(actions_api.show_action)),
        ("GET", "/api/queues", admin(queues_api.list_queues)),
        ("GET", "/api/queues/{id}", admin(queues_api.get_queue)),
        ("POST", "/api/queues/{id}/pause", admin(queues_api.pause)),
        ("POST", "/api/queues/{id}/resume", admin(queues_api.resume)),
        ("PUT", "/api/queues/{id}/rate", admin(queues_api.set_rate)),
        ("DELETE", "/api/queues/{id}/rate", admin(queues_api.clear_rate)),
        ("POST", "/api/queues/{id}/retry-failed", admin(queues_api.retry_failed)),
        ("POST", "/api/queues/{id}/fail-pending", admin(queues_api.fail_pending)),
        ("GET", "/api/portals", admin(portals.list_portals)),
        ("GET", "/api/portals/{id}", admin(portals.show_portal)),
        ("POST", "/api/portals/{id}/test", admin(portals.test_portal)),
        ("DELETE", "/api/portals/{id}/connection", admin(portals.disconnect_portal)),
        ("GET", "/api/failures", admin(dashboard_api.list_failures)),
        ("GET", "/api/throughput", admin(dashboard_api.throughput)),
        ("GET", "/api/cluster", admin(cluster_api.show_cluster)),
        ("GET", "/", guarded(dashboard.page)),
        ("GET", "/static/{name}", guarded(dashboard.static_file)),
        ("GET", "/static/vendor/{name}", guarded(dashboard.vendor_file)),
        ("GET", "/healthz", guarded(handle_healthz)),
        ("GET", "/readyz", guarded(handle_readyz)),
        ("GET", "/metrics", guarded(handle_metrics)),
        ("GET", openapi.PATH, guarded(openapi.serve)),
    ]
    known: list[web.AbstractResource] = []
    for method, path, handler in routes:
        if method == "GET":  # and HEAD, except where it would store or spend a state
            route = app.router.add_get(path, handler, allow_head=not path.startswith("/api/oauth/"))
        else:
            route = app.router.add_route(method, path, handler)
        if route.resource is not None and route.resource not in known:
            known.append(route.resource)

    async def unmatched(request: web.Request) -> web.StreamResponse:
        # The path the router matched against: percent-decoded, except %2F and %25, so that
        # /api/hubspot%2Faction, which no route matched, is not taken for a known path.
        path = request.rel_url.path_safe
        allowed: set[str] = set()
        for resource in known:
            _, methods = await resource.resolve(request)
            allowed |= methods
        if not allowed:
            return error(404, "not_found", f"no such path: {clip(path)}")
        shown = ", ".join(sorted(allowed))
        response = error(405, "method_not_allowed", f"{clip(path)} accepts {shown}")
        response.headers["Allow"] = shown
        return response

    anything = _AnyPath("/{tail:.*}")
    app.router.register_resource(anything)
    anything.add_route("*", guarded(unmatched))
    return app


class _AnyPath(web.DynamicResource):
    """The catch-all: any path, even one without a leading / (`OPTIONS *`), which would
    otherwise get aiohttp's plain-text 404."""

    def _match(self, path: str) -> dict[str, str] | None:
        return {"tail": path}
