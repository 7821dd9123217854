"""The OAuth install flow: `GET /api/oauth/authorize` and `GET /api/oauth/callback`.

authorize stores a random `state` (only its SHA-256, in PostgreSQL: it works behind several
instances and across a restart) and sends the browser to HubSpot's consent page. callback
takes the state back (single use: taking it deletes it; it lives STATE_TTL_S), exchanges the
code with the same redirect_uri, learns the portal and the granted scopes (from the token
response, else from token-info / introspection), refuses an install without `automation`,
and stores the tokens encrypted. Every answer is a small self-contained HTML page, values
escaped; nothing from the query is echoed unescaped or unbounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import ipaddress
import secrets
from datetime import UTC, datetime
from urllib.parse import quote, urlencode

import structlog
from aiohttp import web

from throttled.db.repository import DatabaseError
from throttled.hubspot.client import TokenError
from throttled.hubspot.oauth import OAuthRefused
from throttled.web.services import SERVICES, Services

log = structlog.get_logger(__name__)

STATE_TTL_S = 600.0
# Installs under way at once: per client (a person needs one or two), and in all.
MAX_CLIENT_STATES = 20
MAX_LIVE_STATES = 100_000
MAX_STATE_CHARS = 256
MAX_CODE_CHARS = 2048
REQUIRED_SCOPE = "automation"
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em;"
    "color:#222;line-height:1.5}h1{font-size:1.4em}code{background:#f3f3f3;padding:0 .2em}"
)
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "Referrer-Policy": "no-referrer",  # the callback's URL carries the code
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def page(status: int, title: str, *paragraphs: str, retry_after: int | None = None) -> web.Response:
    """A plain HTML page; `title` and `paragraphs` are text (escaped here)."""
    body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    text = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)} · throttled</title><style>{_STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    headers = dict(_HEADERS)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.Response(
        status=status, text=text, content_type="text/html", charset="utf-8", headers=headers
    )


def client_key(request: web.Request, *, trust_forwarded_for: bool) -> bytes:
    """Who asked, for the per-client cap: a hash of the client's address, an IPv6 address by
    its /64 (one subscriber's usual allocation). Behind a trusted proxy, the last entry of
    X-Forwarded-For (the address the proxy saw)."""
    address = request.remote or ""
    if trust_forwarded_for:
        forwarded = request.headers.getall("X-Forwarded-For", [])
        last = ",".join(forwarded).rsplit(",", 1)[-1].strip()
        address = last or address
    try:
        parsed = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        text = address[:100]
    else:
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            parsed = parsed.ipv4_mapped
        if isinstance(parsed, ipaddress.IPv6Address):
            text = str(ipaddress.ip_network(f"{parsed}/64", strict=False))
        else:
            text = str(parsed)
    return hashlib.sha256(text.encode()).digest()[:16]


def _digest(state: str) -> bytes:
    return hashlib.sha256(state.encode()).digest()


def _redirect_uri(request: web.Request, services: Services) -> str | None:
    """hubspot.redirect_uri, else {server.public_url}/api/oauth/callback; in mock mode the
    address the request came to will do."""
    cfg = services.config
    if cfg.hubspot.redirect_uri or cfg.server.public_url:
        return cfg.hubspot.callback_url(cfg.server.public_url)
    if cfg.hubspot.mock:
        return f"{request.scheme}://{request.host}/api/oauth/callback"
    return None


def _client_id(services: Services) -> str:
    hs = services.config.hubspot
    return hs.client_id or ("mock-client-id" if hs.mock else "")


def _now(services: Services) -> datetime:
    return datetime.fromtimestamp(services.clock(), UTC)


async def authorize(request: web.Request) -> web.Response:
    """GET /api/oauth/authorize: 302 to HubSpot's consent page with a fresh state."""
    services = request.app[SERVICES]
    hs = services.config.hubspot
    client_id = _client_id(services)
    redirect_uri = _redirect_uri(request, services)
    if not client_id or redirect_uri is None:
        missing = (
            "hubspot.client_id" if not client_id else "server.public_url or hubspot.redirect_uri"
        )
        return page(503, "Not configured", f"throttled cannot start an install: set {missing}.")
    state = secrets.token_urlsafe(32)
    now = services.clock()
    try:
        refused = await services.repo.add_oauth_state(
            _digest(state),
            redirect_uri,
            client=client_key(
                request, trust_forwarded_for=services.config.server.trust_forwarded_for
            ),
            expires_at=datetime.fromtimestamp(now + STATE_TTL_S, UTC),
            now=datetime.fromtimestamp(now, UTC),
            limits=(MAX_CLIENT_STATES, MAX_LIVE_STATES),
        )
    except DatabaseError:
        return _storage_down(services)
    if refused == "client":
        log.warning("oauth_states_client_limit", limit=MAX_CLIENT_STATES)
        return page(
            429,
            "Too many installs started",
            f"This address has {MAX_CLIENT_STATES} installs under way; finish one, or try "
            "again in 10 minutes.",
            retry_after=int(STATE_TTL_S),
        )
    if refused is not None:
        log.warning("oauth_states_full", limit=MAX_LIVE_STATES)
        return page(
            503, "Too many installs under way", "Try again in a few minutes.", retry_after=60
        )
    scopes = " ".join(hs.scopes.split())
    params = {"client_id": client_id, "redirect_uri": redirect_uri, "scope": scopes}
    if hs.optional_scopes.split():
        params["optional_scope"] = " ".join(hs.optional_scopes.split())
    params["state"] = state
    location = (
        services.auth_base_url.rstrip("/")
        + hs.authorize_path
        + "?"
        + urlencode(params, quote_via=quote)  # (spaces as %20, as HubSpot's examples)
    )
    log.info("oauth_authorize", scopes=scopes)
    response = page(302, "Connecting to HubSpot", "Redirecting to HubSpot…")
    response.headers["Location"] = location
    return response


class _Invalid(Exception):
    """A query parameter that is repeated, too long or not printable text."""


def _param(request: web.Request, name: str, limit: int) -> str | None:
    """One query parameter (None when absent)."""
    values = request.query.getall(name, [])
    if not values:
        return None
    if len(values) > 1:
        raise _Invalid(f"The {name} parameter appears more than once.")
    value: str = values[0]
    if len(value) > limit or not value.isprintable():
        raise _Invalid(f"The {name} parameter is not valid.")
    return value


def _storage_down(services: Services) -> web.Response:
    retry = services.config.ingest.retry_after_s
    return page(
        503,
        "Try again",
        "throttled's storage is unavailable; try again shortly.",
        retry_after=retry,
    )


async def callback(request: web.Request) -> web.Response:
    """GET /api/oauth/callback: take the state, exchange the code, store the tokens."""
    services = request.app[SERVICES]
    try:
        state = _param(request, "state", MAX_STATE_CHARS)
        code = _param(request, "code", MAX_CODE_CHARS)
        declined = _param(request, "error", 200)
        description = _param(request, "error_description", 500)
    except _Invalid as exc:
        return page(400, "Invalid request", str(exc), _AGAIN)
    try:
        taken = await services.repo.take_oauth_state(_digest(state)) if state else None
    except DatabaseError:
        return _storage_down(services)
    if declined is not None:  # the user declined, or HubSpot refused the request
        log.info("oauth_declined", error=declined[:64])
        return page(
            400,
            "The portal was not connected",
            f"HubSpot answered: {declined}" + (f" ({description})" if description else "") + ".",
            "Nothing was stored. To try again, open /api/oauth/authorize.",
        )
    if not state or not code:
        missing = "state" if not state else "code"
        return page(400, "Invalid request", f"The {missing} parameter is missing.", _AGAIN)
    if taken is None:
        log.warning("oauth_state_unknown")
        return page(
            400, "This link is not valid", "The state is unknown or was already used.", _AGAIN
        )
    redirect_uri, expires_at = taken
    if expires_at <= _now(services):
        log.warning("oauth_state_expired")
        return page(
            400, "This link has expired", "An install must finish within 10 minutes.", _AGAIN
        )
    return await _connect(services, code, redirect_uri)


_AGAIN = "Nothing was stored. Start again from /api/oauth/authorize."


async def _give_back(services: Services, refresh_token: str) -> None:
    """Revoke tokens throttled will not keep (best effort: they were never stored)."""
    with contextlib.suppress(TokenError):
        await services.tokens.oauth.revoke(refresh_token)


async def _connect(services: Services, code: str, redirect_uri: str) -> web.Response:
    oauth = services.tokens.oauth
    try:
        grant = await oauth.exchange_code(code, redirect_uri)
        hub_id, scopes, domain = grant.hub_id, grant.scopes, grant.hub_domain
        if oauth.version == "v1" or hub_id is None or scopes is None:
            info = await oauth.token_info(grant.access_token)
            hub_id = hub_id or info.hub_id
            scopes = info.scopes if info.scopes is not None else scopes
            domain = domain or info.hub_domain
    except OAuthRefused as exc:
        log.warning("oauth_code_refused", error=str(exc))
        if not exc.permanent:  # HubSpot failed (5xx, 429): the code may still be good
            return page(502, "HubSpot could not be reached", "Try the install again shortly.")
        return page(400, "HubSpot refused the install", f"HubSpot answered: {exc.code}.", _AGAIN)
    except TokenError as exc:
        log.warning("oauth_exchange_failed", error=str(exc))
        return page(502, "HubSpot could not be reached", "Try the install again shortly.")
    if hub_id is None:
        log.warning("oauth_portal_unknown")
        await _give_back(services, grant.refresh_token)
        return page(
            502,
            "HubSpot did not say which portal this is",
            "Neither the token nor its token-info named the portal. Nothing was stored; "
            "try the install again.",
        )
    granted = tuple(scopes or ())
    if REQUIRED_SCOPE not in granted:
        log.warning("oauth_scope_missing", portal_id=hub_id, scopes=list(granted)[:50])
        await _give_back(services, grant.refresh_token)
        return page(
            403,
            "The automation scope was not granted",
            f"Portal {hub_id} granted: {' '.join(granted) or 'no scopes'}. throttled needs "
            f"'{REQUIRED_SCOPE}' to complete workflow actions.",
            "Nothing was stored. Check the app's scopes in HubSpot, then install again.",
        )
    try:
        before = await services.repo.get_portal(hub_id)
        await services.tokens.install(hub_id, grant, granted, domain)
        await services.repo.add_audit(
            "oauth",
            "portal.install",
            f"portal:{hub_id}",
            None if before is None else {"connection": before.status},
            {"connection": "connected", "scopes": list(granted), "hub_domain": domain},
        )
    except DatabaseError:
        return _storage_down(services)
    log.info("oauth_installed", portal_id=hub_id, scopes=list(granted)[:50])
    where = f"Portal {hub_id}" + (f" ({domain})" if domain else "")
    return page(
        200,
        "Portal connected",
        f"{where} is connected to throttled.",
        "Next: in HubSpot, add the Throttle action to a workflow; enrolled records now pass "
        "through at the rate you set on the action.",
    )
