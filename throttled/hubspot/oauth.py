"""HubSpot's OAuth endpoints, v1 and v3: code exchange, refresh, token info, revoke.

Every value HubSpot answers is bounded here (see hubspot-api.md §4): tokens are printable
ASCII of at most MAX_TOKEN_CHARS (HubSpot says to allow 300), a lifetime is clamped to a day,
`hub_id` is a positive 64-bit integer, scopes are short names. v3 takes every parameter in
the form body; its errors carry RFC 6749 `error` / `error_description` beside the older
`status` / `message`, and both sets are read.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from throttled import metrics
from throttled.hubspot.client import _UNREACHABLE, MAX_TOKEN_LIFETIME_S, TokenError

MAX_TOKEN_CHARS = 4096
MAX_SCOPES = 200
MAX_ANSWER_BYTES = 1 << 20  # an OAuth answer is a few hundred bytes
_TOKEN = re.compile(rf"[\x21-\x7e]{{1,{MAX_TOKEN_CHARS}}}")
_SCOPE = re.compile(r"[\x21-\x7e]{1,100}")
MAX_PORTAL_ID = 2**63 - 1
# The error codes that mean the refresh token is dead (revoked, app uninstalled): v3/RFC
# 6749 and v1 spellings.
REVOKED_CODES = frozenset({"invalid_grant", "BAD_REFRESH_TOKEN"})


@dataclass(frozen=True, kw_only=True, slots=True)
class Grant:
    """A successful token request."""

    access_token: str
    refresh_token: str
    expires_in: float
    hub_id: int | None = None
    scopes: tuple[str, ...] | None = None  # None: the response did not say
    hub_domain: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenInfo:
    """What token-info (v1) or introspection (v3) said of an access token."""

    active: bool
    hub_id: int | None = None
    scopes: tuple[str, ...] | None = None
    hub_domain: str | None = None
    expires_in: float | None = None


class OAuthRefused(TokenError):
    """HubSpot answered an OAuth request with an error; `code` is its error code."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message, permanent=400 <= status < 500 and status != 429)
        self.status = status
        self.code = code

    @property
    def revoked(self) -> bool:
        """The refresh token is dead: only a new install brings the portal back."""
        return self.code in REVOKED_CODES


class OAuth:
    """The OAuth calls of one HubSpot app, in the configured version's dialect."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_base_url: str,
        client_id: str,
        client_secret: str,
        timeout_s: float,
        version: str,
        paths: Mapping[str, str],
    ) -> None:
        if version not in ("v1", "v3"):
            raise ValueError(f"unknown OAuth version {version!r}")
        self._session = session
        self._base = api_base_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.version = version
        self._paths = dict(paths)

    def _url(self, name: str, token: str = "") -> str:
        return self._base + self._paths[name].replace("{token}", quote(token, safe=""))

    def _client_form(self) -> dict[str, str]:
        return {"client_id": self._client_id, "client_secret": self._client_secret}

    async def exchange_code(self, code: str, redirect_uri: str) -> Grant:
        """Exchange an authorization code (with the authorize request's redirect_uri)."""
        form = {
            "grant_type": "authorization_code",
            **self._client_form(),
            "redirect_uri": redirect_uri,
            "code": code,
        }
        status, doc = await self._call("POST", self._url("token"), "code exchange", form)
        return _grant(status, doc, "code exchange", old_refresh=None)

    async def refresh(self, refresh_token: str) -> Grant:
        """A new access token; the refresh token HubSpot returns (or the same one)."""
        form = {
            "grant_type": "refresh_token",
            **self._client_form(),
            "refresh_token": refresh_token,
        }
        status, doc = await self._call("POST", self._url("token"), "token refresh", form)
        return _grant(status, doc, "token refresh", old_refresh=refresh_token)

    async def token_info(self, access_token: str) -> TokenInfo:
        """The portal and scopes of an access token."""
        if self.version == "v1":
            url = self._url("token_info", access_token)
            status, doc = await self._call("GET", url, "token info", None)
            if status == 404:  # v1: an unknown or expired token
                return TokenInfo(active=False)
            _check(status, doc, "token info")
            return _info(doc, active=True)
        form = {"token": access_token, "token_type_hint": "access_token", **self._client_form()}
        status, doc = await self._call("POST", self._url("token_info"), "introspection", form)
        _check(status, doc, "introspection")
        return _info(doc, active=isinstance(doc, dict) and doc.get("active") is True)

    async def revoke(self, refresh_token: str) -> None:
        """Revoke a refresh token at HubSpot; one HubSpot does not know counts as revoked."""
        if self.version == "v1":
            url = self._url("revoke", refresh_token)
            status, doc = await self._call("DELETE", url, "revoke", None)
        else:
            form = {
                "token": refresh_token,
                "token_type_hint": "refresh_token",
                **self._client_form(),
            }
            status, doc = await self._call("POST", self._url("revoke"), "revoke", form)
        if status == 404:
            return
        _check(status, doc, "revoke")

    async def _call(
        self, method: str, url: str, what: str, form: dict[str, str] | None
    ) -> tuple[int, Any]:
        """One request: (status, JSON body or None). Unreachable: TokenError."""
        started = time.monotonic()
        try:
            async with self._session.request(
                method, url, data=form, timeout=self._timeout, allow_redirects=False
            ) as resp:
                answer = resp.status, _json(await _read_bounded(resp, MAX_ANSWER_BYTES))
        except _UNREACHABLE as exc:
            _observe(what, started, 0)  # (0: no whole answer)
            raise TokenError(
                f"{what}: HubSpot unreachable ({type(exc).__name__})", permanent=False
            ) from None
        _observe(what, started, answer[0])
        return answer


def _observe(what: str, started: float, status: int) -> None:
    """One OAuth request's latency, by endpoint (code_exchange, token_refresh, token_info,
    introspection, revoke) and status."""
    endpoint = what.replace(" ", "_")
    metrics.HUBSPOT_LATENCY.observe(
        time.monotonic() - started, endpoint=endpoint, status=str(status)
    )


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, however it arrives; None (unreadable) beyond `limit` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        return None
    body = bytearray()
    async for chunk in resp.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _json(data: bytes | None) -> Any:
    try:
        return json.loads(data) if data else None
    except (ValueError, RecursionError):
        return None


def _check(status: int, doc: Any, what: str) -> None:
    """Raise OAuthRefused for anything but a 2xx."""
    if 200 <= status < 300:
        return
    code, description = _error_fields(doc)
    detail = f"{code}: {description}" if description else code
    raise OAuthRefused(f"{what} refused ({status}): {detail}", status=status, code=code)


def _error_fields(doc: Any) -> tuple[str, str]:
    """The error code and description: RFC 6749's fields, else HubSpot's older ones."""
    if not isinstance(doc, dict):
        return "unknown_error", ""
    status = doc.get("status") if doc.get("status") != "error" else None  # (the generic body)
    code = doc.get("error") or status or doc.get("category") or "unknown_error"
    description = doc.get("error_description") or doc.get("message") or ""
    return _clip(code, 64), _clip(description, 200)


def _clip(value: Any, limit: int) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _grant(status: int, doc: Any, what: str, *, old_refresh: str | None) -> Grant:
    _check(status, doc, what)
    try:
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        access = _token(doc["access_token"])
        refresh_value = doc.get("refresh_token") or old_refresh
        if refresh_value is None:
            raise ValueError("no refresh token")
        expires_in = doc["expires_in"]
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            raise ValueError("expires_in")
        seconds = float(expires_in)
        if not math.isfinite(seconds):
            raise ValueError("expires_in")
        return Grant(
            access_token=access,
            refresh_token=_token(refresh_value),
            expires_in=min(max(seconds, 0.0), MAX_TOKEN_LIFETIME_S),
            hub_id=_hub_id(doc.get("hub_id")),
            scopes=_scopes(doc.get("scopes")),
            hub_domain=_domain(doc.get("hub_domain")),
        )
    except (KeyError, TypeError, ValueError, OverflowError):
        raise TokenError(f"{what}: HubSpot answered an unexpected body", permanent=False) from None


def _info(doc: Any, *, active: bool) -> TokenInfo:
    if not active or not isinstance(doc, dict):
        return TokenInfo(active=active)
    expires = doc.get("expires_in")
    return TokenInfo(
        active=True,
        hub_id=_hub_id(doc.get("hub_id")),
        scopes=_scopes(doc.get("scopes")),
        hub_domain=_domain(doc.get("hub_domain")),
        expires_in=float(expires)
        if isinstance(expires, int) and not isinstance(expires, bool) and 0 <= expires < 10**9
        else None,
    )


def valid_token(value: object) -> bool:
    """Whether a value can be a token: 1..MAX_TOKEN_CHARS printable ASCII, no spaces (it
    goes in an Authorization header and a form body)."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def _token(value: Any) -> str:
    if not valid_token(value):
        raise ValueError("token")
    return str(value)


def _hub_id(value: Any) -> int | None:
    """A portal id as HubSpot sends it (a number; a digit string is taken too)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PORTAL_ID:
        return value
    return None


def _scopes(value: Any) -> tuple[str, ...] | None:
    """Granted scopes: a list (or a space-separated string) of short names."""
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or len(value) > MAX_SCOPES:
        return None
    return tuple(s for s in value if isinstance(s, str) and _SCOPE.fullmatch(s))


def _domain(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= 255 and value.isprintable():
        return value
    return None
