"""A fake HubSpot on loopback: OAuth v1 tokens and automation v4 callback completion.

Used by mock mode, the test suite and the benchmarks, so per-request work stays small.
Behaviour HubSpot leaves undocumented (see docs hubspot-api.md) is chosen here as follows:

- Batches hold at most ``MAX_BATCH_INPUTS`` inputs; a larger batch is a 400.
- Re-completing an already completed callbackId is accepted silently.
- Every callbacks request from an authenticated portal counts against that portal's
  sliding window, including the ones answered 429.
- Rate-limit 429s caused by ``portal_budget`` carry no ``Retry-After`` (HubSpot does not
  document one); injected faults carry it only when ``fail_next(retry_after=...)`` asks.
- With ``accept_any_refresh_token``, ``mock-refresh-<portalId>`` maps to that portal and any
  other unknown refresh token maps to portal 0, a wildcard portal whose tokens may
  complete callbacks of every portal (so mock mode works with whatever tokens it holds).
- Unknown or missing bearer tokens get 401 ``INVALID_AUTHENTICATION``; issued tokens that
  expired (TTL or ``expire_tokens``) get 401 ``EXPIRED_AUTHENTICATION`` like HubSpot.

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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

MAX_BATCH_INPUTS = 100
EXECUTION_STATES = frozenset({"SUCCESS", "FAIL_CONTINUE"})
DEFAULT_RATE_LIMIT = (110, 10.0)  # public-app burst limit: requests per interval seconds
WILDCARD_PORTAL = 0
FAKE_APP_ID = 1_000_001
FAKE_SCOPES = ("automation", "oauth")
CALLBACKS_PATH = "/automation/v4/actions/callbacks"

_MOCK_REFRESH = re.compile(r"mock-refresh-(\d+)")
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
class _Token:
    """An issued access token."""

    portal_id: int
    expires_at: float
    generation: int


@dataclass(frozen=True, kw_only=True)
class _Code:
    """An authorization code waiting to be exchanged."""

    portal_id: int
    redirect_uri: str | None


@dataclass(frozen=True, kw_only=True)
class _Fault:
    """One injected failure for the next callbacks request."""

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


class _Invalid(Exception):
    """A completion body the fake answers with 400 VALIDATION_ERROR."""


class _OAuthError(Exception):
    """An OAuth failure, answered like HubSpot: the code goes in ``status``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
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
        self.delay_s = 0.0
        self.base_url: str | None = None
        self._client_id = client_id
        self._client_secret = client_secret
        self._token_ttl_s = token_ttl_s
        self._accept_any = accept_any_refresh_token
        self._budget = portal_budget
        self._limit = portal_budget or DEFAULT_RATE_LIMIT
        self._clock = clock
        self._refresh_tokens: dict[str, int] = {}
        self._codes: dict[str, _Code] = {}
        self._tokens: dict[str, _Token] = {}
        self._generation = 0
        self._faults: deque[_Fault] = deque()
        self._rejected: set[str] = set()
        self._windows: dict[int, deque[float]] = {}
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        return f"FakeHubSpot(base_url={self.base_url!r})"

    # -- lifecycle -------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """Build the aiohttp application serving this fake."""
        app = web.Application()
        app.router.add_post(f"{CALLBACKS_PATH}/complete", self._complete_batch)
        app.router.add_post(f"{CALLBACKS_PATH}/{{callbackId}}/complete", self._complete_one)
        app.router.add_post("/oauth/v1/token", self._token)
        app.router.add_get("/oauth/v1/access-tokens/{token}", self._token_info)
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

    def register_portal(self, portal_id: int, refresh_token: str) -> None:
        """Make refresh_token a valid refresh token for portal_id."""
        self._refresh_tokens[refresh_token] = portal_id

    def issue_code(self, portal_id: int, redirect_uri: str | None = None) -> str:
        """Return a one-use authorization code for portal_id (redirect_uri checked if given)."""
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Code(portal_id=portal_id, redirect_uri=redirect_uri)
        return code

    def issue_token(self, portal_id: int) -> str:
        """Mint an access token for portal_id without going through HTTP."""
        token = secrets.token_urlsafe(48)
        expires_at = self._clock() + self._token_ttl_s
        self._tokens[token] = _Token(
            portal_id=portal_id, expires_at=expires_at, generation=self._generation
        )
        return token

    def expire_tokens(self) -> None:
        """Invalidate every access token issued so far."""
        self._generation += 1

    def fail_next(
        self,
        status: int,
        *,
        count: int = 1,
        retry_after: float | None = None,
        policy_name: str | None = None,
    ) -> None:
        """Answer the next `count` callbacks requests with `status`, after earlier faults."""
        if not 400 <= status <= 599:
            raise ValueError(f"fail_next needs a 4xx or 5xx status, got {status}")
        fault = _Fault(status=status, retry_after=retry_after, policy_name=policy_name)
        self._faults.extend([fault] * count)

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
            response.headers.update(self._rate_headers(arrival.used))
        self._record(arrival, body, path_id, response.status)
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        return response

    def _arrive(self, request: web.Request) -> _Arrival:
        """Authenticate, count and take a fault, all before the first await."""
        at = self._clock()
        portal_id, category = self._authenticate(request.headers.get("Authorization", ""), at)
        used = self._count(portal_id, at) if portal_id is not None else 0
        fault = self._faults.popleft() if self._faults else None
        return _Arrival(at=at, portal_id=portal_id, auth_category=category, fault=fault, used=used)

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

    def _rate_headers(self, used: int) -> dict[str, str]:
        """HubSpot's burst rate-limit headers for a window holding `used` requests."""
        limit, interval_s = self._limit
        return {
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(round(interval_s * 1000)),
            "X-HubSpot-RateLimit-Max": str(limit),
            "X-HubSpot-RateLimit-Remaining": str(max(0, limit - used)),
        }

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

    # -- OAuth endpoints ----------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        """POST /oauth/v1/token (refresh_token and authorization_code grants)."""
        form = await _read_form(request)
        self.token_requests.append(form)
        try:
            self._check_client(form)
            portal_id, refresh_token = self._grant(form)
        except _OAuthError as exc:
            return _oauth_error(400, exc.code, str(exc))
        return web.json_response(self._token_response(portal_id, refresh_token))

    def _check_client(self, form: dict[str, str]) -> None:
        """Raise unless the form carries this app's client id and secret."""
        if not secrets.compare_digest(form.get("client_id", ""), self._client_id):
            raise _OAuthError("BAD_CLIENT_ID", "missing or unknown client id")
        if not secrets.compare_digest(form.get("client_secret", ""), self._client_secret):
            raise _OAuthError("BAD_CLIENT_SECRET", "missing or invalid client secret")

    def _grant(self, form: dict[str, str]) -> tuple[int, str]:
        """Return (portal, refresh token) for a valid grant, else raise _OAuthError."""
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            refresh_token = form.get("refresh_token", "")
            return self._refresh_portal(refresh_token), refresh_token
        if grant_type == "authorization_code":
            return self._redeem_code(form)
        raise _OAuthError("BAD_GRANT_TYPE", "missing or unsupported grant type")

    def _refresh_portal(self, refresh_token: str) -> int:
        """Portal of a refresh token, honouring accept_any_refresh_token."""
        portal_id = self._refresh_tokens.get(refresh_token)
        if portal_id is not None:
            return portal_id
        if not self._accept_any or not refresh_token:
            raise _OAuthError("BAD_REFRESH_TOKEN", "missing or invalid refresh token")
        match = _MOCK_REFRESH.fullmatch(refresh_token)
        return int(match.group(1)) if match else WILDCARD_PORTAL

    def _redeem_code(self, form: dict[str, str]) -> tuple[int, str]:
        """Exchange a one-use code for a fresh refresh token."""
        redirect_uri = form.get("redirect_uri", "")
        code = self._codes.get(form.get("code", ""))
        if code is None:
            raise _OAuthError("BAD_AUTH_CODE", "missing or unknown auth code")
        if not redirect_uri or code.redirect_uri not in (None, redirect_uri):
            raise _OAuthError("BAD_REDIRECT_URI", "redirect_uri does not match")
        del self._codes[form["code"]]
        refresh_token = str(uuid.uuid4())
        self._refresh_tokens[refresh_token] = code.portal_id
        return code.portal_id, refresh_token

    def _token_response(self, portal_id: int, refresh_token: str) -> dict[str, Any]:
        """The 200 body of a token grant, with a freshly minted access token."""
        return {
            "token_type": "bearer",
            "access_token": self.issue_token(portal_id),
            "refresh_token": refresh_token,
            "expires_in": self._token_ttl_s,
            "hub_id": portal_id,
        }

    async def _token_info(self, request: web.Request) -> web.Response:
        """GET /oauth/v1/access-tokens/{token}."""
        token = request.match_info["token"]
        entry = self._tokens.get(token)
        now = self._clock()
        if entry is None or not self._live(entry, now):
            return _error(404, "OBJECT_NOT_FOUND", "access token not found")
        return web.json_response(_token_info_body(token, entry, now))


_AUTH_MESSAGES = {
    "INVALID_AUTHENTICATION": (
        "Authentication credentials not found. This API supports OAuth 2.0 authentication."
    ),
    "EXPIRED_AUTHENTICATION": "The OAuth token used to make this call expired.",
}


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
        "scopes": list(FAKE_SCOPES),
        "expires_in": max(0, int(entry.expires_at - now)),
        "token_type": "access",
        "user_id": 1,
        "hub_domain": f"portal-{entry.portal_id}.fake.hubspot.test",
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
