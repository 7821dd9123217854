"""A fake HubSpot on loopback: OAuth (install flow, v1 and v3) and v4 callback completion.

Used by mock mode, the test suite and the benchmarks, so per-request work stays small. One
aiohttp app serves both HubSpot hosts (``app.hubspot.com`` for the consent page,
``api.hubapi.com`` for everything else), so one base URL stands in for both.

Endpoints:

- ``GET /oauth/authorize``: the consent page, answered at once as ``self.consent`` says.
  A bad ``client_id`` or a missing/non-http(s) ``redirect_uri`` gets a 400 HTML page and no
  redirect; otherwise a 302 to ``redirect_uri`` with ``code`` (or ``error=access_denied``)
  and ``state`` added to whatever query it already has.
- ``POST /oauth/v1/token``, ``GET /oauth/v1/access-tokens/{token}``,
  ``GET /oauth/v1/refresh-tokens/{token}``, ``DELETE /oauth/v1/refresh-tokens/{token}``:
  v1, errors as ``{"status": <CODE>, "message", "correlationId"}``. The token body has no
  ``scopes``: a v1 client learns them from token-info.
- ``POST /oauth/v3/token``, ``POST /oauth/v3/token/introspect`` and
  ``POST /oauth/{version}/token/revoke`` (any version segment, e.g. ``v3`` or ``2026-03``;
  token and introspect also answer on date-versioned paths like ``/oauth/2026-03/token``):
  v3, body-only parameters, errors as RFC 6749 ``error``/``error_description`` plus the v1
  ``status``/``message``/``correlationId``.
- ``POST /automation/v4/actions/callbacks/complete`` and ``.../{callbackId}/complete``.
- ``POST /automation/v4/actions/{appId}`` (``hapikey``): action definitions, see
  ``fake_definitions``.

Behaviour HubSpot leaves undocumented (see docs hubspot-api.md) is chosen here as follows:

- Batches hold at most ``MAX_BATCH_INPUTS`` inputs; a larger batch is a 400.
- Re-completing an already completed callbackId is accepted silently.
- Every callbacks request from an authenticated portal counts against that portal's
  sliding window and its daily count, including the ones answered 429.
- Callbacks responses of an authenticated portal carry the burst headers and, unlike what
  HubSpot says it does for OAuth apps, the daily ones (``daily_limit`` minus every request
  counted so far; never reset). Set ``daily_limit = None`` to omit them.
- Rate-limit 429s caused by ``portal_budget`` carry no ``Retry-After`` (HubSpot does not
  document one); injected faults carry it only when ``fail_next(retry_after=...)`` asks.
- With ``accept_any_refresh_token``, ``mock-refresh-<portalId>`` maps to that portal and any
  other unknown refresh token maps to portal 0, a wildcard portal whose tokens may
  complete callbacks of every portal (so mock mode works with whatever tokens it holds).
  Revoked tokens and portals passed to ``revoke_portal`` are still refused. Introspection
  only knows registered refresh tokens.
- Unknown or missing bearer tokens get 401 ``INVALID_AUTHENTICATION``; issued tokens that
  expired (TTL or ``expire_tokens``) get 401 ``EXPIRED_AUTHENTICATION`` like HubSpot.
- Authorize: a missing ``scope`` is not an error (nothing requested is granted); ``state``
  is echoed only when sent; PKCE parameters are ignored. Codes never expire.
- v3 refuses a request with any query string at all (token, introspect and revoke) with 400
  ``invalid_request``/``BAD_REQUEST``. A bad client is 401 ``invalid_client`` (v1: 400, as
  HubSpot does). A missing ``grant_type`` is ``invalid_request``, an unknown one
  ``unsupported_grant_type``; a missing code or refresh token is ``invalid_grant`` like an
  unknown one.
- Refresh tokens are not rotated unless ``rotate_refresh_tokens``; then each refresh
  returns a new one and the old one keeps working.
- Revoking a refresh token (v1 DELETE or v3 revoke) leaves its access tokens alive, as
  HubSpot's v1 docs say. v3 revoke of a live access token kills that access token
  (RFC 7009 allows it). v3 revoke of an unknown token answers 200 ``{}`` (RFC 7009).
- Introspection of a refresh token has no ``exp`` (refresh tokens do not expire).
- ``token_delay_s`` and ``fail_token_next`` apply to the two grant endpoints (v1 and v3
  ``/token``) only; an injected fault answers before any validation.

Nothing here logs, and the access log is off: token-info URLs contain tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web

from throttled.hubspot.fake_definitions import FakeDefinitions

MAX_BATCH_INPUTS = 100
EXECUTION_STATES = frozenset({"SUCCESS", "FAIL_CONTINUE"})
DEFAULT_RATE_LIMIT = (110, 10.0)  # public-app burst limit: requests per interval seconds
DAILY_LIMIT = 500_000  # what the daily headers claim; HubSpot has none for OAuth apps
WILDCARD_PORTAL = 0
CONSENT_PORTAL = 62515
FAKE_APP_ID = 1_000_001
FAKE_USER_ID = 1
FAKE_SCOPES = ("automation", "oauth")
CALLBACKS_PATH = "/automation/v4/actions/callbacks"
DECLINED = "The user declined to grant access to the app."

_MOCK_REFRESH = re.compile(r"mock-refresh-(\d+)")
_V3 = r"{version:v3|\d{4}-\d{2}}"
_CATEGORIES = {
    400: "VALIDATION_ERROR",
    401: "INVALID_AUTHENTICATION",
    403: "MISSING_SCOPES",
    404: "OBJECT_NOT_FOUND",
    409: "CONFLICT",
}


@dataclass(frozen=True, kw_only=True)
class Received:
    """One request to a callbacks endpoint, as the fake saw and answered it."""

    at: float
    portal_id: int | None
    callback_ids: tuple[str, ...]
    status: int
    body: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Consent:
    """How the auto-answered consent page answers: which portal, and what it grants."""

    portal_id: int = CONSENT_PORTAL
    decline: bool = False
    granted: tuple[str, ...] | None = None  # None: the requested and optional scopes


@dataclass(frozen=True, kw_only=True)
class _Grant:
    """What a refresh token stands for."""

    portal_id: int
    scopes: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class _Token:
    """An issued access token."""

    portal_id: int
    scopes: tuple[str, ...]
    expires_at: float
    generation: int


@dataclass(frozen=True, kw_only=True)
class _Code:
    """An authorization code waiting to be exchanged."""

    portal_id: int
    redirect_uri: str | None
    scopes: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class _Fault:
    """One injected failure for the next callbacks (or token) request."""

    status: int
    retry_after: float | None
    policy_name: str | None


@dataclass(frozen=True, kw_only=True)
class _Arrival:
    """What was decided synchronously when a callbacks request arrived."""

    at: float
    portal_id: int | None
    auth_category: str | None
    fault: _Fault | None
    used: int
    daily: int


class _Invalid(Exception):
    """A completion body the fake answers with 400 VALIDATION_ERROR."""


class _OAuthError(Exception):
    """An OAuth failure: RFC 6749 ``error`` (v3) and HubSpot's code for ``status``."""

    def __init__(self, error: str, code: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.code = code


class FakeHubSpot:
    """HubSpot's OAuth and callbacks API, served from memory with fault injection."""

    def __init__(
        self,
        *,
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret",
        token_ttl_s: int = 1800,
        accept_any_refresh_token: bool = False,
        portal_budget: tuple[int, float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.received: list[Received] = []
        self.completed: dict[str, tuple[float, dict[str, str]]] = {}
        self.token_requests: list[dict[str, str]] = []
        self.token_paths: list[str] = []
        self.authorize_requests: list[dict[str, str]] = []
        self.introspections: list[dict[str, str]] = []
        self.revoked: list[str] = []
        self.consent = Consent()
        self.delay_s = 0.0
        self.token_delay_s = 0.0
        self.rotate_refresh_tokens = False
        self.introspect_minimal = False
        # False: token responses leave out hub_id (and v3's scopes), as before 2025-08-18
        self.token_names_portal = True
        self.daily_limit: int | None = DAILY_LIMIT
        self.base_url: str | None = None
        self.definitions = FakeDefinitions(app_id=FAKE_APP_ID)
        self._client_id = client_id
        self._client_secret = client_secret
        self._token_ttl_s = token_ttl_s
        self._accept_any = accept_any_refresh_token
        self._budget = portal_budget
        self._limit = portal_budget or DEFAULT_RATE_LIMIT
        self._clock = clock
        self._refresh_tokens: dict[str, _Grant] = {}
        self._dead: set[str] = set()  # revoked refresh tokens, refused even by accept_any
        self._uninstalled: set[int] = set()  # revoke_portal, for accept_any's mapped tokens
        self._codes: dict[str, _Code] = {}
        self._tokens: dict[str, _Token] = {}
        self._generation = 0
        self._faults: deque[_Fault] = deque()
        self._outage: _Fault | None = None  # while set, every callbacks request gets it
        self._token_faults: deque[_Fault] = deque()
        self._rejected: set[str] = set()
        self._windows: dict[int, deque[float]] = {}
        self._daily: dict[int, int] = {}
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"FakeHubSpot(base_url={self.base_url!r})"

    # -- lifecycle -------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """Build the aiohttp application serving this fake."""
        app = web.Application()
        app.router.add_post(f"{CALLBACKS_PATH}/complete", self._complete_batch)
        app.router.add_post(f"{CALLBACKS_PATH}/{{callbackId}}/complete", self._complete_one)
        app.router.add_get("/oauth/authorize", self._authorize)
        app.router.add_post("/oauth/v1/token", self._token_v1)
        app.router.add_get("/oauth/v1/access-tokens/{token}", self._token_info)
        app.router.add_get("/oauth/v1/refresh-tokens/{token}", self._refresh_token_info)
        app.router.add_delete("/oauth/v1/refresh-tokens/{token}", self._delete_refresh_token)
        app.router.add_post(f"/oauth/{_V3}/token", self._token_v3)
        app.router.add_post(f"/oauth/{_V3}/token/introspect", self._introspect)
        app.router.add_post("/oauth/{version}/token/revoke", self._revoke)
        self.definitions.add_routes(app)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on host:port (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("FakeHubSpot already started")
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, host, port).start()
        bound_port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    async def close(self) -> None:
        """Stop serving; safe to call when not started."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- test controls ----------------------------------------------------------------

    def register_portal(
        self, portal_id: int, refresh_token: str, scopes: Iterable[str] = FAKE_SCOPES
    ) -> None:
        """Make refresh_token a valid refresh token for portal_id, granting scopes."""
        self._refresh_tokens[refresh_token] = _Grant(portal_id=portal_id, scopes=tuple(scopes))
        self._dead.discard(refresh_token)
        self._uninstalled.discard(portal_id)

    def issue_code(
        self,
        portal_id: int,
        redirect_uri: str | None = None,
        scopes: Iterable[str] = FAKE_SCOPES,
    ) -> str:
        """Return a one-use authorization code for portal_id (redirect_uri checked if given)."""
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Code(
            portal_id=portal_id, redirect_uri=redirect_uri, scopes=tuple(scopes)
        )
        return code

    def issue_token(self, portal_id: int, scopes: Iterable[str] = FAKE_SCOPES) -> str:
        """Mint an access token for portal_id without going through HTTP."""
        token = secrets.token_urlsafe(48)
        self._tokens[token] = _Token(
            portal_id=portal_id,
            scopes=tuple(scopes),
            expires_at=self._clock() + self._token_ttl_s,
            generation=self._generation,
        )
        return token

    def expire_tokens(self) -> None:
        """Invalidate every access token issued so far."""
        self._generation += 1

    def revoke_portal(self, portal_id: int, *, access_tokens: bool = False) -> None:
        """Uninstall the app from a portal: its refresh tokens (and maybe access tokens) die.

        Not recorded in ``revoked``, which holds only the revocations clients asked for.
        """
        dead = [t for t, grant in self._refresh_tokens.items() if grant.portal_id == portal_id]
        for token in dead:
            del self._refresh_tokens[token]
        self._dead.update(dead)
        self._uninstalled.add(portal_id)
        if access_tokens:
            self._tokens = {t: e for t, e in self._tokens.items() if e.portal_id != portal_id}

    def fail_next(
        self,
        status: int,
        *,
        count: int = 1,
        retry_after: float | None = None,
        policy_name: str | None = None,
    ) -> None:
        """Answer the next `count` callbacks requests with `status`, after earlier faults."""
        self._faults.extend([_make_fault(status, retry_after, policy_name)] * count)

    def fail_all(
        self,
        status: int | None,
        *,
        retry_after: float | None = None,
        policy_name: str | None = None,
    ) -> None:
        """Answer every callbacks request with `status` from now on (an outage at HubSpot),
        before any fault queued by fail_next; None ends it."""
        self._outage = None if status is None else _make_fault(status, retry_after, policy_name)

    def fail_token_next(
        self, status: int, count: int = 1, *, retry_after: float | None = None
    ) -> None:
        """Answer the next `count` grant requests (v1 or v3 /token) with `status`."""
        self._token_faults.extend([_make_fault(status, retry_after, None)] * count)

    def reject_callbacks(self, ids: Iterable[str]) -> None:
        """Answer 400 to any completion that includes one of these callback ids."""
        self._rejected.update(ids)

    def sends_for(self, callback_ids: Iterable[str]) -> list[float]:
        """Arrival times of callbacks requests carrying these ids, one per id per request."""
        wanted = set(callback_ids)
        return [r.at for r in self.received for _ in wanted.intersection(r.callback_ids)]

    # -- callbacks endpoints ------------------------------------------------------------

    async def _complete_batch(self, request: web.Request) -> web.StreamResponse:
        """POST /automation/v4/actions/callbacks/complete."""
        return await self._callbacks(request, None)

    async def _complete_one(self, request: web.Request) -> web.StreamResponse:
        """POST /automation/v4/actions/callbacks/{callbackId}/complete."""
        return await self._callbacks(request, request.match_info["callbackId"])

    async def _callbacks(self, request: web.Request, path_id: str | None) -> web.StreamResponse:
        """Answer one completion request and record it."""
        arrival = self._arrive(request)
        body = await _read_json(request)
        response = self._verdict(arrival, body, path_id)
        if arrival.portal_id is not None:
            response.headers.update(self._rate_headers(arrival.used, arrival.daily))
        self._record(arrival, body, path_id, response.status)
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        return response

    def _arrive(self, request: web.Request) -> _Arrival:
        """Authenticate, count and take a fault, all before the first await."""
        at = self._clock()
        portal_id, category = self._authenticate(request.headers.get("Authorization", ""), at)
        used = daily = 0
        if portal_id is not None:
            used = self._count(portal_id, at)
            daily = self._daily[portal_id] = self._daily.get(portal_id, 0) + 1
        fault = self._outage or (self._faults.popleft() if self._faults else None)
        return _Arrival(
            at=at, portal_id=portal_id, auth_category=category, fault=fault, used=used, daily=daily
        )

    def _authenticate(self, header: str, now: float) -> tuple[int | None, str | None]:
        """Return (portal, None) for a live bearer token, else (None, 401 category)."""
        scheme, _, token = header.partition(" ")
        entry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if entry is None:
            return None, "INVALID_AUTHENTICATION"
        if not self._live(entry, now):
            return None, "EXPIRED_AUTHENTICATION"
        return entry.portal_id, None

    def _live(self, entry: _Token, now: float) -> bool:
        """Whether an issued token is neither expired nor invalidated."""
        return entry.generation == self._generation and now < entry.expires_at

    def _count(self, portal_id: int, at: float) -> int:
        """Add this request to the portal's window (at - interval, at]; return its size."""
        window = self._windows.setdefault(portal_id, deque())
        while window and window[0] <= at - self._limit[1]:
            window.popleft()
        window.append(at)
        return len(window)

    def _verdict(self, arrival: _Arrival, body: Any, path_id: str | None) -> web.Response:
        """Pick the response: fault, auth, budget, validation, then success."""
        if arrival.fault is not None:
            return _fault_response(arrival.fault, arrival.portal_id)
        if arrival.portal_id is None:
            category = arrival.auth_category or "INVALID_AUTHENTICATION"
            return _error(401, category, _AUTH_MESSAGES[category])
        if self._budget is not None and arrival.used > self._budget[0]:
            return _rate_limited("TEN_SECONDLY_ROLLING", arrival.portal_id)
        try:
            pairs = _parse_inputs(body, path_id)
            self._check_allowed(pairs, arrival.portal_id)
        except _Invalid as exc:
            return _error(400, "VALIDATION_ERROR", str(exc))
        self.completed.update((cid, (arrival.at, fields)) for cid, fields in pairs)
        return web.Response(status=204)

    def _check_allowed(self, pairs: list[tuple[str, dict[str, str]]], portal_id: int) -> None:
        """Raise _Invalid for a rejected id or an id owned by another portal."""
        for cid, _ in pairs:
            if cid in self._rejected:
                raise _Invalid(f"Callback {cid} cannot be completed")
            owner = _owner_portal(cid)
            if owner is not None and portal_id not in (owner, WILDCARD_PORTAL):
                raise _Invalid(f"Callback {cid} belongs to portal {owner}, not {portal_id}")

    def _rate_headers(self, used: int, daily: int) -> dict[str, str]:
        """HubSpot's rate-limit headers for a window holding `used` requests."""
        limit, interval_s = self._limit
        headers = {
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(round(interval_s * 1000)),
            "X-HubSpot-RateLimit-Max": str(limit),
            "X-HubSpot-RateLimit-Remaining": str(max(0, limit - used)),
        }
        if self.daily_limit is not None:
            headers["X-HubSpot-RateLimit-Daily"] = str(self.daily_limit)
            remaining = max(0, self.daily_limit - daily)
            headers["X-HubSpot-RateLimit-Daily-Remaining"] = str(remaining)
        return headers

    def _record(self, arrival: _Arrival, body: Any, path_id: str | None, status: int) -> None:
        """Append the request to `received`, kept in arrival order."""
        entry = Received(
            at=arrival.at,
            portal_id=arrival.portal_id,
            callback_ids=_callback_ids(body, path_id),
            status=status,
            body=body if isinstance(body, dict) else {},
        )
        # Bodies are read concurrently, so a later arrival can finish first.
        index = len(self.received)
        while index and self.received[index - 1].at > arrival.at:
            index -= 1
        self.received.insert(index, entry)

    # -- OAuth: consent page ------------------------------------------------------------

    async def _authorize(self, request: web.Request) -> web.Response:
        """GET /oauth/authorize: the consent page, answered as ``self.consent`` says."""
        query = {key: request.query[key] for key in request.query}
        self.authorize_requests.append(query)
        redirect_uri = query.get("redirect_uri", "")
        if not _same(query.get("client_id", ""), self._client_id):
            return _consent_error("Unknown client_id.")
        if not _redirectable(redirect_uri):
            return _consent_error("redirect_uri must be an absolute http(s) URL.")
        params = self._consent_answer(query, redirect_uri)
        if "state" in query:
            params["state"] = query["state"]
        return web.Response(status=302, headers={"Location": _with_query(redirect_uri, params)})

    def _consent_answer(self, query: dict[str, str], redirect_uri: str) -> dict[str, str]:
        """The redirect's parameters: a new code for the granted scopes, or the refusal."""
        consent = self.consent
        if consent.decline:
            return {"error": "access_denied", "error_description": DECLINED}
        granted = consent.granted
        if granted is None:
            words = query.get("scope", "").split() + query.get("optional_scope", "").split()
            granted = tuple(dict.fromkeys(words))
        return {"code": self.issue_code(consent.portal_id, redirect_uri, granted)}

    # -- OAuth: grants ------------------------------------------------------------------

    async def _token_v1(self, request: web.Request) -> web.Response:
        """POST /oauth/v1/token (refresh_token and authorization_code grants)."""
        form, fault = await self._token_arrival(request)
        if fault is not None:
            return _fault_response(fault, None)
        try:
            self._check_client(form)
            refresh_token, grant = self._grant(form)
        except _OAuthError as exc:
            return _oauth_error(400, exc.code, str(exc))
        return web.json_response(self._token_body(refresh_token, grant))

    async def _token_v3(self, request: web.Request) -> web.Response:
        """POST /oauth/v3/token: the v1 grants, body-only, RFC 6749 errors, scopes shown."""
        form, fault = await self._token_arrival(request)
        if fault is not None:
            return _fault_response(fault, None)
        try:
            _check_body_only(request)
            self._check_client(form)
            refresh_token, grant = self._grant(form)
        except _OAuthError as exc:
            return _oauth_error_v3(exc)
        body = self._token_body(refresh_token, grant)
        body.update(scopes=list(grant.scopes), token_use="access_token", user_id=FAKE_USER_ID)
        return web.json_response(body)

    async def _token_arrival(self, request: web.Request) -> tuple[dict[str, str], _Fault | None]:
        """Read and record a grant request, take its fault, then wait ``token_delay_s``."""
        form = await _read_form(request)
        self.token_requests.append(form)
        self.token_paths.append(request.path)
        fault = self._token_faults.popleft() if self._token_faults else None
        if self.token_delay_s > 0:
            await asyncio.sleep(self.token_delay_s)
        return form, fault

    def _check_client(self, form: Mapping[str, str]) -> None:
        """Raise unless the form carries this app's client id and secret."""
        if not _same(form.get("client_id", ""), self._client_id):
            raise _OAuthError("invalid_client", "BAD_CLIENT_ID", "missing or unknown client id")
        if not _same(form.get("client_secret", ""), self._client_secret):
            raise _OAuthError(
                "invalid_client", "BAD_CLIENT_SECRET", "missing or invalid client secret"
            )

    def _grant(self, form: dict[str, str]) -> tuple[str, _Grant]:
        """Return (refresh token to hand out, its grant), else raise _OAuthError."""
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            refresh_token = form.get("refresh_token", "")
            grant = self._refresh_grant(refresh_token)
            if self.rotate_refresh_tokens:
                refresh_token = self._new_refresh_token(grant)
            return refresh_token, grant
        if grant_type == "authorization_code":
            return self._redeem_code(form)
        error = "unsupported_grant_type" if grant_type else "invalid_request"
        raise _OAuthError(error, "BAD_GRANT_TYPE", "missing or unsupported grant type")

    def _refresh_grant(self, refresh_token: str) -> _Grant:
        """What a live refresh token stands for, honouring accept_any_refresh_token."""
        grant = self._refresh_tokens.get(refresh_token)
        if grant is not None:
            return grant
        if self._accept_any and refresh_token and refresh_token not in self._dead:
            match = _MOCK_REFRESH.fullmatch(refresh_token)
            portal_id = int(match.group(1)) if match else WILDCARD_PORTAL
            if portal_id not in self._uninstalled:
                return _Grant(portal_id=portal_id, scopes=FAKE_SCOPES)
        raise _OAuthError("invalid_grant", "BAD_REFRESH_TOKEN", "missing or invalid refresh token")

    def _redeem_code(self, form: dict[str, str]) -> tuple[str, _Grant]:
        """Exchange a one-use code for a fresh refresh token."""
        redirect_uri = form.get("redirect_uri", "")
        code = self._codes.get(form.get("code", ""))
        if code is None:
            raise _OAuthError("invalid_grant", "BAD_AUTH_CODE", "missing or unknown auth code")
        if not redirect_uri or code.redirect_uri not in (None, redirect_uri):
            raise _OAuthError("invalid_grant", "BAD_REDIRECT_URI", "redirect_uri does not match")
        del self._codes[form["code"]]
        self._uninstalled.discard(code.portal_id)
        grant = _Grant(portal_id=code.portal_id, scopes=code.scopes)
        return self._new_refresh_token(grant), grant

    def _new_refresh_token(self, grant: _Grant) -> str:
        """Register and return a fresh refresh token for grant."""
        refresh_token = str(uuid.uuid4())
        self._refresh_tokens[refresh_token] = grant
        return refresh_token

    def _token_body(self, refresh_token: str, grant: _Grant) -> dict[str, Any]:
        """The v1 200 body of a token grant, with a freshly minted access token."""
        return {
            "token_type": "bearer",
            "access_token": self.issue_token(grant.portal_id, grant.scopes),
            "refresh_token": refresh_token,
            "expires_in": self._token_ttl_s,
            **({"hub_id": grant.portal_id} if self.token_names_portal else {}),
        }

    # -- OAuth: token metadata and revocation -------------------------------------------

    async def _token_info(self, request: web.Request) -> web.Response:
        """GET /oauth/v1/access-tokens/{token}."""
        token = request.match_info["token"]
        entry = self._tokens.get(token)
        now = self._clock()
        if entry is None or not self._live(entry, now):
            return _error(404, "OBJECT_NOT_FOUND", "access token not found")
        return web.json_response(_token_info_body(token, entry, now))

    async def _refresh_token_info(self, request: web.Request) -> web.Response:
        """GET /oauth/v1/refresh-tokens/{token} (registered refresh tokens only)."""
        token = request.match_info["token"]
        grant = self._refresh_tokens.get(token)
        if grant is None:
            return _error(404, "OBJECT_NOT_FOUND", "refresh token not found")
        body = {"token": token, **self._grant_fields(grant.portal_id, grant.scopes)}
        body.update(token_type="refresh", user_id=FAKE_USER_ID)
        return web.json_response(body)

    async def _delete_refresh_token(self, request: web.Request) -> web.Response:
        """DELETE /oauth/v1/refresh-tokens/{token}: 204, or 404 for an unknown token."""
        token = request.match_info["token"]
        if not self._revoke_refresh(token):
            return _error(404, "OBJECT_NOT_FOUND", "refresh token not found")
        self.revoked.append(token)
        return web.Response(status=204)

    async def _revoke(self, request: web.Request) -> web.Response:
        """POST /oauth/{version}/token/revoke (RFC 7009: unknown tokens answer 200 too)."""
        form = await _read_form(request)
        try:
            _check_body_only(request)
            self._check_client(form)
            token = form.get("token", "")
            if not token:
                raise _OAuthError("invalid_request", "BAD_REQUEST", "token is required")
        except _OAuthError as exc:
            return _oauth_error_v3(exc)
        if not self._revoke_refresh(token):
            self._tokens.pop(token, None)
        self.revoked.append(token)
        return web.json_response({})

    def _revoke_refresh(self, refresh_token: str) -> bool:
        """Kill a live refresh token; return whether it was one."""
        try:
            self._refresh_grant(refresh_token)
        except _OAuthError:
            return False
        self._refresh_tokens.pop(refresh_token, None)
        self._dead.add(refresh_token)
        return True

    async def _introspect(self, request: web.Request) -> web.Response:
        """POST /oauth/v3/token/introspect (RFC 7662)."""
        form = await _read_form(request)
        self.introspections.append(form)
        try:
            _check_body_only(request)
            self._check_client(form)
        except _OAuthError as exc:
            return _oauth_error_v3(exc)
        return web.json_response(self._introspection(form.get("token", "")))

    def _introspection(self, token: str) -> dict[str, Any]:
        """RFC 7662's answer for a token: live access or registered refresh token, or not."""
        entry = self._tokens.get(token)
        grant = self._refresh_tokens.get(token)
        if entry is not None and self._live(entry, self._clock()):
            extra: dict[str, Any] = {"token_type": "access_token", "exp": int(entry.expires_at)}
            grant = _Grant(portal_id=entry.portal_id, scopes=entry.scopes)
        elif grant is not None:
            extra = {"token_type": "refresh_token"}
        else:
            return {"active": False}
        if self.introspect_minimal:
            return {"active": True}
        fields = self._grant_fields(grant.portal_id, grant.scopes)
        return {"active": True, **fields, "client_id": self._client_id, **extra}

    def _grant_fields(self, portal_id: int, scopes: tuple[str, ...]) -> dict[str, Any]:
        """The portal and scope fields every token description shares."""
        return {"hub_id": portal_id, "scopes": list(scopes), "hub_domain": _hub_domain(portal_id)}


_AUTH_MESSAGES = {
    "INVALID_AUTHENTICATION": (
        "Authentication credentials not found. This API supports OAuth 2.0 authentication."
    ),
    "EXPIRED_AUTHENTICATION": "The OAuth token used to make this call expired.",
}
_BODY_ONLY = "parameters must be sent in the request body"


def _make_fault(status: int, retry_after: float | None, policy_name: str | None) -> _Fault:
    """A validated fault."""
    if not 400 <= status <= 599:
        raise ValueError(f"a fault needs a 4xx or 5xx status, got {status}")
    return _Fault(status=status, retry_after=retry_after, policy_name=policy_name)


def _same(given: str, expected: str) -> bool:
    """Constant-time string comparison that also takes non-ASCII input."""
    return secrets.compare_digest(given.encode(), expected.encode())


def _check_body_only(request: web.Request) -> None:
    """v3 takes nothing from the query string."""
    if request.query_string:
        raise _OAuthError("invalid_request", "BAD_REQUEST", _BODY_ONLY)


def _redirectable(uri: str) -> bool:
    """Whether uri is an absolute http(s) URL that fits in a Location header."""
    if not uri.isascii() or not uri.isprintable() or " " in uri:
        return False
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _with_query(url: str, params: Mapping[str, str]) -> str:
    """url with params appended to its query, keeping what is already there."""
    parts = urlsplit(url)
    pairs = [*parse_qsl(parts.query, keep_blank_values=True), *params.items()]
    return urlunsplit(parts._replace(query=urlencode(pairs)))


def _consent_error(message: str) -> web.Response:
    """The 400 page HubSpot shows instead of redirecting."""
    html = f"<!doctype html><title>Authorization error</title><h1>Error</h1><p>{message}</p>"
    return web.Response(status=400, text=html, content_type="text/html")


def _hub_domain(portal_id: int) -> str:
    """The fake's domain for a portal."""
    return f"portal-{portal_id}.fake.hubspot.test"


async def _read_json(request: web.Request) -> Any:
    """The parsed JSON body, or None when it is missing or malformed."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


async def _read_form(request: web.Request) -> dict[str, str]:
    """The form-encoded body's text fields; empty if unparsable."""
    try:
        form = await request.post()
    except ValueError:
        return {}
    return {key: value for key, value in form.items() if isinstance(value, str)}


def _parse_inputs(body: Any, path_id: str | None) -> list[tuple[str, dict[str, str]]]:
    """Validate a completion body; return its (callbackId, outputFields) pairs."""
    if not isinstance(body, dict):
        raise _Invalid("Invalid input JSON: expected an object")
    if path_id is not None:
        return [(path_id, _output_fields(body, path_id))]
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _Invalid("inputs must be a non-empty list")
    if len(inputs) > MAX_BATCH_INPUTS:
        raise _Invalid(f"inputs has {len(inputs)} items; at most {MAX_BATCH_INPUTS} allowed")
    return [_batch_input(item) for item in inputs]


def _batch_input(item: Any) -> tuple[str, dict[str, str]]:
    """Validate one batch input."""
    callback_id = item.get("callbackId") if isinstance(item, dict) else None
    if not isinstance(callback_id, str) or not callback_id:
        raise _Invalid("every input needs a string callbackId")
    return callback_id, _output_fields(item, callback_id)


def _output_fields(item: dict[str, Any], callback_id: str) -> dict[str, str]:
    """Validate outputFields (string map with a final hs_execution_state) and typedOutputs."""
    fields = item.get("outputFields")
    if not isinstance(fields, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in fields.items()
    ):
        raise _Invalid(f"{callback_id}: outputFields must map strings to strings")
    if fields.get("hs_execution_state") not in EXECUTION_STATES:
        raise _Invalid(f"{callback_id}: hs_execution_state must be SUCCESS or FAIL_CONTINUE")
    if not isinstance(item.get("typedOutputs", {}), dict):
        raise _Invalid(f"{callback_id}: typedOutputs must be an object")
    return fields


def _callback_ids(body: Any, path_id: str | None) -> tuple[str, ...]:
    """The callback ids a request names, valid or not."""
    if path_id is not None:
        return (path_id,)
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list):
        return ()
    return tuple(
        item["callbackId"]
        for item in inputs
        if isinstance(item, dict) and isinstance(item.get("callbackId"), str)
    )


def _owner_portal(callback_id: str) -> int | None:
    """The portal encoded in an ``ap-<portalId>-...`` callback id, if any."""
    prefix, _, rest = callback_id.partition("-")
    digits = rest.partition("-")[0]
    return int(digits) if prefix == "ap" and digits.isdigit() else None


def _correlation_id() -> str:
    """A fresh HubSpot-style correlation id."""
    return str(uuid.uuid4())


def _error(status: int, category: str, message: str) -> web.Response:
    """A HubSpot ``Error`` JSON response."""
    body = {
        "status": "error",
        "message": message,
        "correlationId": _correlation_id(),
        "category": category,
    }
    return web.json_response(body, status=status)


def _oauth_error(status: int, code: str, message: str) -> web.Response:
    """An OAuth error as HubSpot sends it: the error code in ``status``."""
    body = {"status": code, "message": message, "correlationId": _correlation_id()}
    return web.json_response(body, status=status)


def _oauth_error_v3(exc: _OAuthError) -> web.Response:
    """A v3 OAuth error: RFC 6749's fields beside HubSpot's; a bad client is a 401."""
    message = str(exc)
    body = {
        "error": exc.error,
        "error_description": message,
        "status": exc.code,
        "message": message,
        "correlationId": _correlation_id(),
    }
    return web.json_response(body, status=401 if exc.error == "invalid_client" else 400)


def _rate_limited(policy_name: str, portal_id: int | None) -> web.Response:
    """A 429 shaped like HubSpot's (see hubspot-api.md §5)."""
    policy = policy_name.lower()
    body = {
        "status": "error",
        "message": f"You have reached your {policy} limit.",
        "errorType": "RATE_LIMIT",
        "correlationId": _correlation_id(),
        "policyName": policy_name,
        "groupName": f"publicapi:fake-{policy}:{portal_id or 0}",
    }
    return web.json_response(body, status=429)


def _fault_response(fault: _Fault, portal_id: int | None) -> web.Response:
    """The response for an injected fault."""
    if fault.status == 429:
        response = _rate_limited(fault.policy_name or "TEN_SECONDLY_ROLLING", portal_id)
    else:
        category = _CATEGORIES.get(fault.status, "INTERNAL_ERROR")
        response = _error(fault.status, category, f"Injected failure ({fault.status})")
    if fault.retry_after is not None:
        response.headers["Retry-After"] = f"{fault.retry_after:g}"
    return response


def _token_info_body(token: str, entry: _Token, now: float) -> dict[str, Any]:
    """The body of GET /oauth/v1/access-tokens/{token}."""
    return {
        "token": token,
        "hub_id": entry.portal_id,
        "app_id": FAKE_APP_ID,
        "scopes": list(entry.scopes),
        "expires_in": max(0, int(entry.expires_at - now)),
        "token_type": "access",
        "user_id": FAKE_USER_ID,
        "hub_domain": _hub_domain(entry.portal_id),
    }


def max_in_window(times: Sequence[float], period_s: float) -> int:
    """Most of `times` inside any half-open window (t - period_s, t]."""
    if period_s <= 0:
        raise ValueError("period_s must be positive")
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - period_s:
            start += 1
        best = max(best, end - start + 1)
    return best
