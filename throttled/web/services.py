"""What the HTTP handlers share: the daemon's services, and JSON error bodies."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from throttled.config import Config
from throttled.db.repository import Repository
from throttled.ingest import Ingest
from throttled.intake import Intake
from throttled.liveness import LoopMonitor
from throttled.steering import Steering
from throttled.tokens import Tokens
from throttled.web.admin import AdminAuth

_MAX_ECHO = 200  # characters of a path or header value an error body repeats


@dataclass(eq=False, kw_only=True)
class Services:
    """What the handlers need, built by the daemon."""

    config: Config
    repo: Repository
    ingest: Ingest
    intake: Intake
    secrets: tuple[str, ...]
    expiration: str
    tokens: Tokens
    admin: AdminAuth
    auth_base_url: str
    clock: Callable[[], float]
    steering: Steering
    ping: asyncio.Future[None] | None = None  # the readiness query under way (shared)
    stopping: bool = False
    loop: LoopMonitor | None = None  # (for /healthz)
    schema_problem: str = ""  # why the schema is not current, found at start (for /readyz)

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
ERROR_CODE = web.ResponseKey("error_code", str)  # set on every error() answer


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    """A JSON error body that names the problem."""
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    response = web.json_response(
        {"error": code, "message": message, **extra}, status=status, headers=headers
    )
    response[ERROR_CODE] = code  # (the action endpoint counts its answers by it)
    return response


# What a body read raises when the bytes are not a valid message body: a broken chunked
# encoding, a connection that closed before the end.
BODY_ERRORS = (web.RequestPayloadError, HttpProcessingError, ConnectionError)


def invalid_body(request: web.Request, exc: BaseException) -> web.Response:
    """The 400 for a body that could not be read whole (one of BODY_ERRORS)."""
    if isinstance(exc, ConnectionError):
        message = "the connection closed before the whole body was received"
    else:
        message = f"the body could not be read ({clip(str(exc), 100)})"
    response = error(400, "invalid_body", message)
    response.force_close()  # what follows the broken body cannot be parsed as a request
    # The parser has given up on this body and feeds it no more. Marked ended, aiohttp does not
    # try to drain it after the answer (which would raise, and log, the same error again).
    request.content.feed_eof()
    return response


def storage_unavailable(services: Services) -> web.Response:
    """The 503 for a request the database could not serve: retry after ingest.retry_after_s."""
    return error(
        503,
        "database_unavailable",
        "storage is unavailable; retry",
        retry_after=services.config.ingest.retry_after_s,
    )


def encode_cursor(raw: bytes) -> str:
    """An opaque page cursor."""
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(text: str) -> bytes | None:
    """What encode_cursor() was given, or None: a cursor must be exactly one it made
    (base64 decoding alone skips stray characters, and ignores some trailing ones)."""
    if len(text) > 400:
        return None
    try:
        raw = base64.urlsafe_b64decode(text.encode("ascii"))
    except (ValueError, UnicodeError, binascii.Error):
        return None
    return raw if encode_cursor(raw) == text else None


def clip(text: str, limit: int = _MAX_ECHO) -> str:
    """Text cut to what an error body may repeat."""
    return text if len(text) <= limit else text[:limit] + "…"
