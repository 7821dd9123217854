"""The HTTP surface: the action endpoint and the operations endpoints."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from throttled import metrics
from throttled.config import Config
from throttled.db.repository import DatabaseError, DatabaseUnavailable, Repository
from throttled.hubspot import signature
from throttled.hubspot.action import PayloadError, parse
from throttled.ingest import Ingest, Overloaded, Stopping
from throttled.intake import Intake

log = structlog.get_logger(__name__)


@dataclass(eq=False, kw_only=True)
class Services:
    """What the handlers need, built by the daemon."""

    config: Config
    repo: Repository
    ingest: Ingest
    intake: Intake
    secrets: tuple[str, ...]
    expiration: str
    stopping: bool = False

    @property
    def block_body(self) -> bytes:
        """The 200 BLOCK answer: the same bytes for every action, so built once."""
        if self._block_body is None:
            self._block_body = json.dumps(
                {
                    "outputFields": {
                        "hs_execution_state": "BLOCK",
                        "hs_expiration_duration": self.expiration,
                    }
                }
            ).encode()
        return self._block_body

    _block_body: bytes | None = None


SERVICES = web.AppKey("services", Services)


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    """A JSON error body that names the problem."""
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    metrics.REJECTED.inc(reason=code)
    return web.json_response(
        {"error": code, "message": message, **extra}, status=status, headers=headers
    )


def signed_uri(request: web.Request, public_url: str) -> str:
    """The URI HubSpot signed: the configured public base URL + the raw path and query."""
    if public_url:
        return public_url.rstrip("/") + request.raw_path
    return f"{request.scheme}://{request.host}{request.raw_path}"


async def handle_action(request: web.Request) -> web.Response:
    """POST /api/hubspot/action: verify, validate, store durably, answer BLOCK."""
    services = request.app[SERVICES]
    cfg = services.config
    if services.stopping:
        return error(503, "stopping", "throttled is shutting down; retry", retry_after=5)
    if request.content_length is not None and request.content_length > cfg.ingest.max_body_bytes:
        return _too_large(cfg.ingest.max_body_bytes)
    if request.content_type != "application/json":
        return error(415, "unsupported_media_type", "Content-Type must be application/json")
    content = request.content
    if content.is_eof():  # the whole body is here (the usual case): take it without a wait
        body = content.read_nowait()
        if len(body) > cfg.ingest.max_body_bytes:  # (decompressed, or sent chunked)
            return _too_large(cfg.ingest.max_body_bytes)
    else:
        try:
            body = await request.read()  # aiohttp enforces client_max_size (= max_body_bytes)
        except web.HTTPRequestEntityTooLarge:
            return _too_large(cfg.ingest.max_body_bytes)
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
        action = services.intake.build(parse(body))
    except PayloadError as exc:
        return error(400, "invalid_payload", exc.message, field=exc.field)
    return await _store(services, action)


async def _store(services: Services, action: Any) -> web.Response:
    retry = services.config.ingest.retry_after_s
    try:
        await services.ingest.submit(action)
    except Overloaded:
        return error(429, "overloaded", "intake buffer is full; retry later", retry_after=retry)
    except Stopping:
        return error(503, "stopping", "throttled is shutting down; retry", retry_after=retry)
    except DatabaseUnavailable:
        return error(
            503, "database_unavailable", "storage is unavailable; retry", retry_after=retry
        )
    except DatabaseError:
        log.exception("action_store_failed", callback_id=action.callback_id)
        return error(
            503, "storage_error", "the action could not be stored; retry", retry_after=retry
        )
    metrics.ACCEPTED.inc()
    return web.Response(body=services.block_body, content_type="application/json")


def _too_large(limit: int) -> web.Response:
    return error(413, "payload_too_large", f"request body exceeds {limit} bytes")


async def handle_healthz(request: web.Request) -> web.Response:
    """GET /healthz: the process is up."""
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """GET /readyz: accepting actions and the database answers."""
    services = request.app[SERVICES]
    if services.stopping:
        return web.json_response({"status": "stopping"}, status=503)
    try:
        await services.repo.ping()
    except DatabaseError:
        return web.json_response({"status": "database_unavailable"}, status=503)
    return web.json_response({"status": "ready"})


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8")


def make_app(services: Services) -> web.Application:
    """The aiohttp application. Unknown paths and methods are answered as JSON by a catch-all
    route rather than a middleware, which would wrap every request, the hot one included."""
    app = web.Application(client_max_size=services.config.ingest.max_body_bytes)
    app[SERVICES] = services
    routes = {
        "/api/hubspot/action": ("POST", handle_action),
        "/healthz": ("GET", handle_healthz),
        "/readyz": ("GET", handle_readyz),
        "/metrics": ("GET", handle_metrics),
    }
    for path, (method, handler) in routes.items():
        if method == "GET":
            app.router.add_get(path, handler)  # and HEAD
        else:
            app.router.add_route(method, path, handler)
    allowed = {
        path: method + (", HEAD" if method == "GET" else "") for path, (method, _) in routes.items()
    }

    async def unmatched(request: web.Request) -> web.Response:
        methods = allowed.get(request.path)
        if methods is None:
            return error(404, "not_found", f"no such path: {request.path}")
        response = error(405, "method_not_allowed", f"{request.path} accepts {methods}")
        response.headers["Allow"] = methods
        return response

    app.router.add_route("*", "/{tail:.*}", unmatched)
    return app
