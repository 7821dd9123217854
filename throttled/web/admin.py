"""Admin authentication and the portals operator surface (`/api/portals...`).

Admin tokens come from `admin.tokens` (each a token or its SHA-256) and THROTTLED_ADMIN_TOKEN.
Only their SHA-256 digests are kept in memory; a presented bearer token is hashed and compared
with every digest in constant time. Logs name the token's id, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from aiohttp import web

from throttled.config import MAX_ADMIN_TOKEN_CHARS, AdminConfig
from throttled.db.repository import Backlog, PortalRow
from throttled.tokens import Tokens

log = structlog.get_logger(__name__)

NOT_CONFIGURED = (
    "the admin API is disabled: no admin token is configured. Add one to throttled.toml "
    '([[admin.tokens]] with id = "..." and token = "..." or token_sha256 = "...") or set '
    "THROTTLED_ADMIN_TOKEN, then restart; generate a token with: throttled keys generate"
)
_BEARER = re.compile(r"Bearer[ \t]+([\x21-\x7e]+)[ \t]*", re.IGNORECASE)
_PORTAL_ID = re.compile(r"[0-9]{1,19}")
MAX_PORTAL_ID = 2**63 - 1


@dataclass(frozen=True)
class AdminAuth:
    """The configured admin tokens, as (id, sha256 digest)."""

    digests: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_config(cls, admin: AdminConfig) -> AdminAuth:
        """Digests of every configured token (a token_sha256 is taken as it is)."""
        entries = []
        for entry in admin.tokens:
            if entry.token:
                digest = hashlib.sha256(entry.token.reveal().encode()).digest()
            else:
                digest = bytes.fromhex(entry.token_sha256)
            entries.append((entry.id, digest))
        return cls(tuple(entries))

    def identify(self, presented: str) -> str | None:
        """The id of the token presented, or None. Every digest is compared, so the time
        taken does not say which one (or whether any) matched."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for token_id, expected in self.digests:
            if hmac.compare_digest(digest, expected) and found is None:
                found = token_id
        return found


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACTOR = web.RequestKey("actor", str)  # who made an admin request (a token id)


def actor(request: web.Request) -> str:
    """Who is making this admin request, for the audit log: the admin token's id."""
    return str(request.get(ACTOR, "unknown"))


Error = Callable[..., web.Response]


def admin_only(handler: Handler, auth: Callable[[web.Request], AdminAuth], error: Error) -> Handler:
    """The handler behind a bearer-token check: 403 with none configured, 401 without a
    valid one (with WWW-Authenticate: Bearer)."""

    async def check(request: web.Request) -> web.StreamResponse:
        admin = auth(request)
        if not admin.digests:
            return error(403, "admin_disabled", NOT_CONFIGURED)
        header = request.headers.get("Authorization", "")
        match = _BEARER.fullmatch(header) if len(header) <= MAX_ADMIN_TOKEN_CHARS + 20 else None
        token_id = admin.identify(match.group(1)) if match else None
        if token_id is None:
            log.warning(
                "admin_auth_failed",
                method=request.method,
                path=request.path[:200],
                reason="wrong token" if match else "no bearer token",
                remote=request.remote,
            )
            response = error(
                401,
                "unauthorized",
                "a valid admin token is required: Authorization: Bearer <token>"
                if not match
                else "the admin token is not valid",
            )
            challenge = 'Bearer realm="throttled"'
            if match:
                challenge += ', error="invalid_token"'
            response.headers["WWW-Authenticate"] = challenge
            return response
        log.info("admin_request", method=request.method, path=request.path[:200], token_id=token_id)
        request[ACTOR] = token_id
        return await handler(request)

    check.__name__ = check.__qualname__ = handler.__name__
    check.__doc__ = handler.__doc__
    return check


def portal_id(request: web.Request) -> int | None:
    """The `{id}` path segment as a portal id (1..2^63-1), or None."""
    text = request.match_info.get("id", "")
    if not _PORTAL_ID.fullmatch(text) or not 1 <= int(text) <= MAX_PORTAL_ID:
        return None
    return int(text)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _clip(value: str | None, limit: int = 300) -> str | None:
    if value is None:
        return None
    return value if len(value) <= limit else value[:limit] + "…"


def portal_view(row: PortalRow, backlog: Backlog, tokens: Tokens | None) -> dict[str, Any]:
    """A portal as the operator surface shows it: never a token."""
    health = tokens.health.portal(row.portal_id) if tokens is not None else None
    snapshot = health.snapshot() if health is not None else {}
    connected = row.connected
    if connected:
        state = "connected"
    else:
        state = "not_connected" if row.status == "not_connected" else "disconnected"
        snapshot["state"] = "unhealthy"  # (whatever its last requests said)
    return {
        "portal_id": row.portal_id,
        "connection": state,
        "disconnected_reason": _clip(row.disconnected_reason) if state != "connected" else None,
        "disconnected_at": _iso(row.disconnected_at),
        "scopes": [s[:100] for s in row.scopes[:200]],
        "hub_domain": _clip(row.hub_domain, 255),
        "token_expires_at": _iso(row.access_expires_at) if connected else None,
        "last_refresh_at": _iso(row.last_refresh_at),
        "last_refresh_error": _clip(row.last_refresh_error),
        "connected_at": _iso(row.connected_at),
        "health": snapshot.get("state", "healthy"),
        "error_rate": snapshot.get("error_rate", 0.0),
        "average_latency_ms": snapshot.get("average_latency_ms"),
        "consecutive_failures": snapshot.get("consecutive_failures", 0),
        "rate_limit": snapshot.get("rate_limit"),
        "backlog": {
            "pending": backlog.pending,
            "failed": backlog.failed,
            "expired": backlog.expired,
        },
    }
