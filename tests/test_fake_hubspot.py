"""Tests for the fake HubSpot server used by mock mode, tests and benchmarks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pytest_aiohttp.plugin import AiohttpClient

from throttled.hubspot.fake import Consent, FakeHubSpot, max_in_window

PORTAL = 62515
REFRESH = "refresh-62515"
BATCH = "/automation/v4/actions/callbacks/complete"
TOKEN = "/oauth/v1/token"
TOKEN_V3 = "/oauth/v3/token"
INTROSPECT = "/oauth/v3/token/introspect"
REVOKE_PATHS = ["/oauth/v3/token/revoke", "/oauth/2026-03/token/revoke"]
CALLBACK = "https://t.example/cb"
CREDS = {"client_id": "fake-client-id", "client_secret": "fake-client-secret"}

Client = TestClient[Any, Any]


class Clock:
    """A settable clock for the fake."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def cid(n: int, portal: int = PORTAL) -> str:
    """A callback id in HubSpot's observed format."""
    return f"ap-{portal}-987654321-{n}-0"


def item(callback_id: str, state: str = "SUCCESS") -> dict[str, Any]:
    """One batch input."""
    return {"callbackId": callback_id, "outputFields": {"hs_execution_state": state}}


def batch(*ids: str) -> dict[str, Any]:
    """A batch completion body."""
    return {"inputs": [item(i) for i in ids]}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeHubSpot:
    hub = FakeHubSpot(clock=clock)
    hub.register_portal(PORTAL, REFRESH)
    return hub


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, fake: FakeHubSpot) -> Client:
    return await aiohttp_client(fake.make_app())


async def refresh(client: Client, refresh_token: str = REFRESH, **form: str) -> Any:
    """POST a refresh grant; return (status, JSON body)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **CREDS, **form}
    resp = await client.post(TOKEN, data=data)
    return resp.status, await resp.json()


async def access_token(client: Client) -> str:
    """A valid access token for PORTAL."""
    status, body = await refresh(client)
    assert status == 200
    return str(body["access_token"])


async def post_form(client: Client, path: str, form: dict[str, str]) -> tuple[int, Any]:
    """POST a form with the app's credentials; return (status, JSON body)."""
    resp = await client.post(path, data={**CREDS, **form})
    return resp.status, await resp.json()


async def refresh_v3(client: Client, refresh_token: str = REFRESH, **form: str) -> Any:
    """POST a v3 refresh grant; return (status, JSON body)."""
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **form}
    return await post_form(client, TOKEN_V3, data)


async def authorize(client: Client, **params: str) -> aiohttp.ClientResponse:
    """GET the consent page without following its redirect."""
    query = {"client_id": CREDS["client_id"], "redirect_uri": CALLBACK, **params}
    return await client.get("/oauth/authorize", params=query, allow_redirects=False)


def redirect_query(resp: aiohttp.ClientResponse) -> dict[str, list[str]]:
    """The query of a 302's Location."""
    assert resp.status == 302
    return parse_qs(urlsplit(resp.headers["Location"]).query, keep_blank_values=True)


async def install_code(client: Client, **params: str) -> str:
    """Run the consent page and return the code it redirected with."""
    return redirect_query(await authorize(client, **params))["code"][0]


async def exchange(
    client: Client, code: str, path: str = TOKEN, redirect_uri: str = CALLBACK
) -> tuple[int, Any]:
    """Exchange a code at the v1 or v3 token endpoint."""
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
    return await post_form(client, path, form)


async def token_info(client: Client, token: str) -> Any:
    """The v1 token-info body of a live access token."""
    resp = await client.get(f"/oauth/v1/access-tokens/{token}")
    assert resp.status == 200
    return await resp.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def complete(client: Client, token: str, body: Any) -> aiohttp.ClientResponse:
    """POST a batch completion."""
    return await client.post(BATCH, json=body, headers=bearer(token))


# -- OAuth -----------------------------------------------------------------------------


async def test_refresh_token_happy_path(client: Client, fake: FakeHubSpot) -> None:
    status, body = await refresh(client)
    assert status == 200
    assert body["token_type"] == "bearer"
    assert body["hub_id"] == PORTAL
    assert body["expires_in"] == 1800
    assert body["refresh_token"] == REFRESH
    assert len(body["access_token"]) >= 40
    assert fake.token_requests[-1]["grant_type"] == "refresh_token"
    info = await client.get(f"/oauth/v1/access-tokens/{body['access_token']}")
    assert info.status == 200
    details = await info.json()
    assert details["hub_id"] == PORTAL
    assert "automation" in details["scopes"]
    assert 0 < details["expires_in"] <= 1800


async def test_access_tokens_are_unique(client: Client) -> None:
    tokens = {await access_token(client) for _ in range(5)}
    assert len(tokens) == 5


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"client_secret": "wrong"}, "BAD_CLIENT_SECRET"),
        ({"client_id": "wrong"}, "BAD_CLIENT_ID"),
        ({"refresh_token": "unknown"}, "BAD_REFRESH_TOKEN"),
        ({"grant_type": "password"}, "BAD_GRANT_TYPE"),
    ],
)
async def test_refresh_errors(client: Client, form: dict[str, str], code: str) -> None:
    status, body = await refresh(client, **form)
    assert status == 400
    assert body["status"] == code
    uuid.UUID(body["correlationId"])


async def test_token_endpoint_without_form(client: Client) -> None:
    resp = await client.post(TOKEN, data=b"not a form", headers={"Content-Type": "text/plain"})
    assert resp.status == 400


@pytest.mark.parametrize(
    ("refresh_token", "portal"), [("mock-refresh-42", 42), ("anything-else", 0)]
)
async def test_accept_any_refresh_token(
    aiohttp_client: AiohttpClient, refresh_token: str, portal: int
) -> None:
    client = await aiohttp_client(FakeHubSpot(accept_any_refresh_token=True).make_app())
    status, body = await refresh(client, refresh_token)
    assert (status, body["hub_id"]) == (200, portal)


async def test_wildcard_portal_completes_any_portal(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(FakeHubSpot(accept_any_refresh_token=True).make_app())
    _, body = await refresh(client, "whatever")
    resp = await complete(client, body["access_token"], batch(cid(1, 7), cid(2, 8)))
    assert resp.status == 204


async def test_authorization_code_grant(client: Client, fake: FakeHubSpot) -> None:
    code = fake.issue_code(PORTAL, "https://t.example/cb")
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": "https://t.example/cb",
    }
    resp = await client.post(TOKEN, data={**form, **CREDS})
    body = await resp.json()
    assert (resp.status, body["hub_id"]) == (200, PORTAL)
    status, again = await refresh(client, body["refresh_token"])
    assert (status, again["hub_id"]) == (200, PORTAL)
    reused = await client.post(TOKEN, data={**form, **CREDS})
    assert (reused.status, (await reused.json())["status"]) == (400, "BAD_AUTH_CODE")


async def test_authorization_code_wrong_redirect(client: Client, fake: FakeHubSpot) -> None:
    code = fake.issue_code(PORTAL, "https://t.example/cb")
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": "https://evil/cb"}
    resp = await client.post(TOKEN, data={**form, **CREDS})
    assert (resp.status, (await resp.json())["status"]) == (400, "BAD_REDIRECT_URI")


async def test_token_info_unknown_is_404(client: Client) -> None:
    resp = await client.get("/oauth/v1/access-tokens/nope")
    assert resp.status == 404


async def test_token_ttl_expiry(client: Client, clock: Clock) -> None:
    token = await access_token(client)
    clock.now += 1800
    resp = await complete(client, token, batch(cid(1)))
    assert resp.status == 401
    assert (await resp.json())["category"] == "EXPIRED_AUTHENTICATION"


# -- OAuth install flow ------------------------------------------------------------------


async def test_authorize_redirects_with_code_and_state(client: Client, fake: FakeHubSpot) -> None:
    resp = await authorize(
        client,
        redirect_uri=f"{CALLBACK}?x=1&y=",
        scope="automation oauth",
        optional_scope="crm.objects.contacts.read",
        state="s t&=/",
    )
    assert resp.status == 302
    location = urlsplit(resp.headers["Location"])
    assert (location.scheme, location.netloc, location.path) == ("https", "t.example", "/cb")
    query = parse_qs(location.query, keep_blank_values=True)
    assert (query["x"], query["y"], query["state"]) == (["1"], [""], ["s t&=/"])
    assert len(query["code"]) == 1
    assert fake.authorize_requests[-1]["scope"] == "automation oauth"
    assert fake.authorize_requests[-1]["state"] == "s t&=/"
    status, body = await exchange(client, query["code"][0], redirect_uri=f"{CALLBACK}?x=1&y=")
    assert (status, body["hub_id"]) == (200, 62515)
    assert "scopes" not in body
    info = await token_info(client, body["access_token"])
    assert info["scopes"] == ["automation", "oauth", "crm.objects.contacts.read"]
    assert info["hub_domain"] == "portal-62515.fake.hubspot.test"
    status, again = await refresh(client, body["refresh_token"])
    assert status == 200
    assert (await token_info(client, again["access_token"]))["scopes"] == info["scopes"]


async def test_authorize_without_state(client: Client) -> None:
    query = redirect_query(await authorize(client, scope="automation"))
    assert set(query) == {"code"}


async def test_authorize_then_v3_exchange(client: Client, fake: FakeHubSpot) -> None:
    fake.consent = Consent(portal_id=7)
    code = await install_code(client, scope="automation oauth automation")
    status, body = await exchange(client, code, TOKEN_V3)
    assert status == 200
    assert (body["hub_id"], body["scopes"]) == (7, ["automation", "oauth"])
    assert (body["token_type"], body["token_use"], body["expires_in"]) == (
        "bearer",
        "access_token",
        1800,
    )
    assert isinstance(body["user_id"], int)
    status, again = await exchange(client, code, TOKEN_V3)
    assert (status, again["error"], again["status"]) == (400, "invalid_grant", "BAD_AUTH_CODE")
    assert fake.token_paths == [TOKEN_V3, TOKEN_V3]


async def test_authorize_custom_grant(client: Client, fake: FakeHubSpot) -> None:
    fake.consent = Consent(portal_id=9, granted=("automation",))
    code = await install_code(client, scope="automation oauth", optional_scope="crm.x")
    status, body = await exchange(client, code, TOKEN_V3)
    assert (status, body["hub_id"], body["scopes"]) == (200, 9, ["automation"])
    status, doc = await post_form(client, INTROSPECT, {"token": body["access_token"]})
    assert (status, doc["scopes"], doc["hub_id"]) == (200, ["automation"], 9)
    _, refreshed = await refresh_v3(client, body["refresh_token"])
    assert refreshed["scopes"] == ["automation"]


async def test_authorize_decline(client: Client, fake: FakeHubSpot) -> None:
    fake.consent = Consent(decline=True)
    resp = await authorize(client, scope="automation", state="xyz")
    assert "error=access_denied&error_description=The+user+declined" in resp.headers["Location"]
    query = redirect_query(resp)
    assert "code" not in query
    assert query["error"] == ["access_denied"]
    assert query["error_description"][0].startswith("The user declined")
    assert query["state"] == ["xyz"]
    assert len(fake.authorize_requests) == 1


@pytest.mark.parametrize(
    "params",
    [
        {"client_id": "someone-else"},
        {"redirect_uri": ""},
        {"redirect_uri": "ftp://t.example/cb"},
        {"redirect_uri": "/relative/cb"},
        {"redirect_uri": "https://t.example/c b"},
        {"client_id": "ünicode"},
    ],
    ids=repr,
)
async def test_authorize_refuses_without_redirect(
    client: Client, fake: FakeHubSpot, params: dict[str, str]
) -> None:
    resp = await authorize(client, scope="automation", state="s", **params)
    assert resp.status == 400
    assert resp.content_type == "text/html"
    assert "Location" not in resp.headers
    assert "<p>" in await resp.text()
    assert len(fake.authorize_requests) == 1


async def test_authorize_missing_redirect_uri(client: Client) -> None:
    query = {"client_id": CREDS["client_id"], "scope": "automation"}
    resp = await client.get("/oauth/authorize", params=query, allow_redirects=False)
    assert resp.status == 400


async def test_code_redirect_uri_must_match(client: Client) -> None:
    code = await install_code(client, scope="automation")
    status, body = await exchange(client, code, TOKEN_V3, redirect_uri="https://evil/cb")
    assert (status, body["error"], body["status"]) == (400, "invalid_grant", "BAD_REDIRECT_URI")
    status, body = await exchange(client, code, TOKEN_V3)
    assert status == 200


# -- OAuth v3 ----------------------------------------------------------------------------


async def test_v3_refresh(client: Client, fake: FakeHubSpot) -> None:
    status, body = await refresh_v3(client)
    assert status == 200
    assert set(body) == {
        "token_type",
        "access_token",
        "refresh_token",
        "expires_in",
        "hub_id",
        "scopes",
        "token_use",
        "user_id",
    }
    assert (body["hub_id"], body["refresh_token"]) == (PORTAL, REFRESH)
    assert body["scopes"] == ["automation", "oauth"]
    assert (await complete(client, body["access_token"], batch(cid(1)))).status == 204
    assert fake.token_requests[-1]["grant_type"] == "refresh_token"


@pytest.mark.parametrize("path", [TOKEN_V3, INTROSPECT, "/oauth/2026-03/token", *REVOKE_PATHS])
async def test_v3_refuses_query_parameters(client: Client, fake: FakeHubSpot, path: str) -> None:
    form = {"grant_type": "refresh_token", "refresh_token": REFRESH, "token": REFRESH}
    resp = await client.post(path, params={"client_id": "x"}, data={**CREDS, **form})
    assert resp.status == 400
    body = await resp.json()
    assert (body["error"], body["status"]) == ("invalid_request", "BAD_REQUEST")
    assert body["error_description"] == "parameters must be sent in the request body"
    assert body["message"] == body["error_description"]
    assert not fake.revoked
    assert (await refresh(client))[0] == 200


@pytest.mark.parametrize(
    ("form", "http", "error", "code"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client", "BAD_CLIENT_SECRET"),
        ({"client_id": "wrong"}, 401, "invalid_client", "BAD_CLIENT_ID"),
        ({"client_id": "ünicode"}, 401, "invalid_client", "BAD_CLIENT_ID"),
        ({"refresh_token": "unknown"}, 400, "invalid_grant", "BAD_REFRESH_TOKEN"),
        ({"refresh_token": ""}, 400, "invalid_grant", "BAD_REFRESH_TOKEN"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type", "BAD_GRANT_TYPE"),
        ({"grant_type": ""}, 400, "invalid_request", "BAD_GRANT_TYPE"),
        (
            {"grant_type": "authorization_code", "code": "nope", "redirect_uri": CALLBACK},
            400,
            "invalid_grant",
            "BAD_AUTH_CODE",
        ),
    ],
)
async def test_v3_errors(
    client: Client, form: dict[str, str], http: int, error: str, code: str
) -> None:
    status, body = await refresh_v3(client, **form)
    assert status == http
    assert (body["error"], body["status"]) == (error, code)
    assert body["error_description"] == body["message"] != ""
    uuid.UUID(body["correlationId"])


async def test_v3_date_versioned_token_path(client: Client, fake: FakeHubSpot) -> None:
    data = {"grant_type": "refresh_token", "refresh_token": REFRESH}
    status, body = await post_form(client, "/oauth/2026-03/token", data)
    assert (status, body["scopes"]) == (200, ["automation", "oauth"])
    assert fake.token_paths == ["/oauth/2026-03/token"]


async def test_introspect_access_and_refresh_tokens(
    client: Client, fake: FakeHubSpot, clock: Clock
) -> None:
    token = await access_token(client)
    form = {"token": token, "token_type_hint": "access_token"}
    status, doc = await post_form(client, INTROSPECT, form)
    assert status == 200
    assert doc == {
        "active": True,
        "hub_id": PORTAL,
        "scopes": ["automation", "oauth"],
        "client_id": CREDS["client_id"],
        "token_type": "access_token",
        "exp": int(clock.now + 1800),
        "hub_domain": f"portal-{PORTAL}.fake.hubspot.test",
    }
    status, doc = await post_form(client, INTROSPECT, {"token": REFRESH})
    assert (status, doc["active"], doc["token_type"], doc["hub_id"]) == (
        200,
        True,
        "refresh_token",
        PORTAL,
    )
    assert fake.introspections[0]["token"] == token
    assert fake.introspections[0]["token_type_hint"] == "access_token"
    assert len(fake.introspections) == 2


async def test_introspect_inactive(client: Client, fake: FakeHubSpot, clock: Clock) -> None:
    assert (await post_form(client, INTROSPECT, {"token": "nope"})) == (200, {"active": False})
    assert (await post_form(client, INTROSPECT, {})) == (200, {"active": False})
    token = await access_token(client)
    clock.now += 1800
    assert (await post_form(client, INTROSPECT, {"token": token})) == (200, {"active": False})
    fresh = await access_token(client)
    fake.expire_tokens()
    assert (await post_form(client, INTROSPECT, {"token": fresh})) == (200, {"active": False})


async def test_introspect_minimal(client: Client, fake: FakeHubSpot) -> None:
    fake.introspect_minimal = True
    token = await access_token(client)
    assert (await post_form(client, INTROSPECT, {"token": token})) == (200, {"active": True})
    assert (await post_form(client, INTROSPECT, {"token": REFRESH})) == (200, {"active": True})
    assert (await post_form(client, INTROSPECT, {"token": "x"})) == (200, {"active": False})


async def test_introspect_bad_client(client: Client) -> None:
    token = await access_token(client)
    status, body = await post_form(client, INTROSPECT, {"token": token, "client_secret": "no"})
    assert (status, body["error"], body["status"]) == (401, "invalid_client", "BAD_CLIENT_SECRET")


# -- OAuth scopes, token info, revocation --------------------------------------------------


async def test_v1_token_info_reports_token_scopes(client: Client, fake: FakeHubSpot) -> None:
    fake.register_portal(5, "refresh-5", scopes=("automation", "crm.objects.deals.read"))
    status, body = await refresh(client, "refresh-5")
    assert status == 200
    assert "scopes" not in body
    info = await token_info(client, body["access_token"])
    assert info["scopes"] == ["automation", "crm.objects.deals.read"]
    assert (info["hub_id"], info["hub_domain"]) == (5, "portal-5.fake.hubspot.test")
    direct = await token_info(client, fake.issue_token(6, scopes=["oauth"]))
    assert (direct["hub_id"], direct["scopes"]) == (6, ["oauth"])


async def test_refresh_token_info(client: Client) -> None:
    resp = await client.get(f"/oauth/v1/refresh-tokens/{REFRESH}")
    assert resp.status == 200
    body = await resp.json()
    assert (body["token"], body["hub_id"], body["scopes"]) == (
        REFRESH,
        PORTAL,
        ["automation", "oauth"],
    )
    assert (await client.get("/oauth/v1/refresh-tokens/nope")).status == 404


async def test_revoke_v1(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    resp = await client.delete(f"/oauth/v1/refresh-tokens/{REFRESH}")
    assert resp.status == 204
    assert fake.revoked == [REFRESH]
    status, body = await refresh(client)
    assert (status, body["status"]) == (400, "BAD_REFRESH_TOKEN")
    status, body = await refresh_v3(client)
    assert (status, body["error"], body["status"]) == (400, "invalid_grant", "BAD_REFRESH_TOKEN")
    # HubSpot: deleting a refresh token leaves issued access tokens alive.
    assert (await complete(client, token, batch(cid(1)))).status == 204
    again = await client.delete(f"/oauth/v1/refresh-tokens/{REFRESH}")
    assert again.status == 404
    body = await again.json()
    assert (body["status"], body["category"]) == ("error", "OBJECT_NOT_FOUND")
    uuid.UUID(body["correlationId"])
    assert fake.revoked == [REFRESH]


@pytest.mark.parametrize("path", REVOKE_PATHS)
async def test_revoke_v3(client: Client, fake: FakeHubSpot, path: str) -> None:
    form = {"token": REFRESH, "token_type_hint": "refresh_token"}
    assert await post_form(client, path, form) == (200, {})
    status, body = await refresh_v3(client)
    assert (status, body["error"], body["status"]) == (400, "invalid_grant", "BAD_REFRESH_TOKEN")
    status, body = await refresh(client)
    assert (status, body["status"]) == (400, "BAD_REFRESH_TOKEN")
    assert await post_form(client, path, {"token": "never-issued"}) == (200, {})
    assert fake.revoked == [REFRESH, "never-issued"]
    status, body = await post_form(client, path, {"token": REFRESH, "client_id": "x"})
    assert (status, body["error"]) == (401, "invalid_client")
    status, body = await post_form(client, path, {})
    assert (status, body["error"]) == (400, "invalid_request")
    assert len(fake.revoked) == 2


async def test_revoke_v3_access_token(client: Client) -> None:
    token = await access_token(client)
    assert await post_form(client, REVOKE_PATHS[0], {"token": token}) == (200, {})
    assert (await complete(client, token, batch(cid(1)))).status == 401
    assert (await refresh(client))[0] == 200


async def test_revoke_portal(client: Client, fake: FakeHubSpot) -> None:
    fake.register_portal(PORTAL, "second-62515")
    fake.register_portal(1, "refresh-1")
    token = await access_token(client)
    fake.revoke_portal(PORTAL)
    for refresh_token in (REFRESH, "second-62515"):
        status, body = await refresh(client, refresh_token)
        assert (status, body["status"]) == (400, "BAD_REFRESH_TOKEN")
    assert (await refresh(client, "refresh-1"))[0] == 200
    assert (await complete(client, token, batch(cid(1)))).status == 204
    assert not fake.revoked
    fake.revoke_portal(PORTAL, access_tokens=True)
    assert (await complete(client, token, batch(cid(2)))).status == 401
    fake.register_portal(PORTAL, REFRESH)
    assert (await refresh(client))[0] == 200


async def test_revoke_portal_reinstall_by_code(client: Client, fake: FakeHubSpot) -> None:
    fake.revoke_portal(PORTAL)
    status, body = await exchange(client, await install_code(client, scope="automation"))
    assert (status, body["hub_id"]) == (200, PORTAL)
    assert (await refresh(client, body["refresh_token"]))[0] == 200
    assert (await refresh(client))[0] == 400


async def test_accept_any_honours_revocation(aiohttp_client: AiohttpClient) -> None:
    fake = FakeHubSpot(accept_any_refresh_token=True)
    client = await aiohttp_client(fake.make_app())
    assert (await client.delete("/oauth/v1/refresh-tokens/mock-refresh-42")).status == 204
    assert (await refresh(client, "mock-refresh-42"))[0] == 400
    fake.revoke_portal(43)
    assert (await refresh(client, "mock-refresh-43"))[0] == 400
    assert (await refresh(client, "mock-refresh-44"))[0] == 200


@pytest.mark.parametrize("refresh_call", [refresh, refresh_v3])
async def test_rotate_refresh_tokens(client: Client, fake: FakeHubSpot, refresh_call: Any) -> None:
    fake.register_portal(PORTAL, REFRESH, scopes=("automation",))
    fake.rotate_refresh_tokens = True
    status, body = await refresh_call(client)
    assert status == 200
    rotated = body["refresh_token"]
    assert rotated != REFRESH
    status, newer = await refresh_call(client, rotated)
    assert (status, newer["hub_id"]) == (200, PORTAL)
    assert newer["refresh_token"] not in (REFRESH, rotated)
    assert (await token_info(client, newer["access_token"]))["scopes"] == ["automation"]
    assert (await refresh_call(client))[0] == 200  # the old one keeps working


async def test_token_delay_overlaps_refreshes(client: Client, fake: FakeHubSpot) -> None:
    fake.token_delay_s = 0.3
    first = asyncio.ensure_future(refresh(client))
    second = asyncio.ensure_future(refresh_v3(client))
    while len(fake.token_requests) < 2:
        await asyncio.sleep(0.001)
    assert not first.done()
    assert not second.done()
    (s1, b1), (s2, b2) = await asyncio.gather(first, second)
    assert (s1, s2) == (200, 200)
    assert b1["access_token"] != b2["access_token"]


async def test_fail_token_next(client: Client, fake: FakeHubSpot) -> None:
    fake.fail_token_next(503, count=2)
    status, body = await refresh(client)
    assert (status, body["status"]) == (503, "error")
    uuid.UUID(body["correlationId"])
    status, body = await refresh_v3(client)
    assert status == 503
    assert (await refresh(client))[0] == 200
    assert fake.token_paths == [TOKEN, TOKEN_V3, TOKEN]
    assert len(fake.token_requests) == 3
    fake.fail_token_next(429, retry_after=1)
    resp = await client.post(TOKEN_V3, data={"grant_type": "refresh_token"})
    assert (resp.status, resp.headers["Retry-After"]) == (429, "1")
    fake.fail_token_next(400)
    assert (await refresh_v3(client))[0] == 400
    assert (await refresh_v3(client))[0] == 200
    # callbacks faults are separate
    token = await access_token(client)
    assert (await complete(client, token, batch(cid(1)))).status == 204


def test_fail_token_next_rejects_success_status() -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        FakeHubSpot().fail_token_next(302)


# -- callbacks -------------------------------------------------------------------------


async def test_batch_completion_recorded(client: Client, fake: FakeHubSpot, clock: Clock) -> None:
    token = await access_token(client)
    body = batch(cid(1), cid(2))
    body["inputs"][1]["outputFields"] = {"hs_execution_state": "FAIL_CONTINUE", "why": "x"}
    body["inputs"][1]["typedOutputs"] = {}
    resp = await complete(client, token, body)
    assert resp.status == 204
    assert await resp.read() == b""
    assert resp.headers["X-HubSpot-RateLimit-Max"] == "110"
    assert resp.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    assert resp.headers["X-HubSpot-RateLimit-Remaining"] == "109"
    assert resp.headers["X-HubSpot-RateLimit-Daily"] == "500000"
    assert resp.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "499999"
    assert fake.completed[cid(1)] == (clock.now, {"hs_execution_state": "SUCCESS"})
    assert fake.completed[cid(2)][1]["why"] == "x"
    [received] = fake.received
    assert (received.status, received.portal_id) == (204, PORTAL)
    assert received.callback_ids == (cid(1), cid(2))
    assert received.body == body


async def test_single_completion(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    body = {"outputFields": {"hs_execution_state": "SUCCESS"}, "typedOutputs": {}}
    url = f"/automation/v4/actions/callbacks/{cid(5)}/complete"
    resp = await client.post(url, json=body, headers=bearer(token))
    assert resp.status == 204
    assert cid(5) in fake.completed
    assert fake.received[0].callback_ids == (cid(5),)


async def test_recompletion_accepted(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    for _ in range(2):
        assert (await complete(client, token, batch(cid(1)))).status == 204
    assert len(fake.sends_for([cid(1)])) == 2


@pytest.mark.parametrize(
    "headers", [{}, bearer("not-a-token"), {"Authorization": "Basic abc"}], ids=str
)
async def test_missing_or_unknown_token_401(
    client: Client, fake: FakeHubSpot, headers: dict[str, str]
) -> None:
    resp = await client.post(BATCH, json=batch(cid(1)), headers=headers)
    assert resp.status == 401
    body = await resp.json()
    assert (body["status"], body["category"]) == ("error", "INVALID_AUTHENTICATION")
    uuid.UUID(body["correlationId"])
    assert fake.received[0].portal_id is None
    assert fake.received[0].status == 401
    assert not fake.completed


async def test_expire_tokens(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    fake.expire_tokens()
    resp = await complete(client, token, batch(cid(1)))
    assert resp.status == 401
    assert (await client.get(f"/oauth/v1/access-tokens/{token}")).status == 404
    fresh = await access_token(client)
    assert (await complete(client, fresh, batch(cid(1)))).status == 204


async def test_fail_next_429_then_success(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    fake.fail_next(429, retry_after=2)
    resp = await complete(client, token, batch(cid(1)))
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "2"
    body = await resp.json()
    assert body["policyName"] == "TEN_SECONDLY_ROLLING"
    assert body["errorType"] == "RATE_LIMIT"
    assert body["message"] == "You have reached your ten_secondly_rolling limit."
    assert cid(1) not in fake.completed
    assert (await complete(client, token, batch(cid(1)))).status == 204
    assert [r.status for r in fake.received] == [429, 204]


async def test_fail_next_daily_policy(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    fake.fail_next(429, policy_name="DAILY")
    resp = await complete(client, token, batch(cid(1)))
    body = await resp.json()
    assert (body["policyName"], body["message"]) == ("DAILY", "You have reached your daily limit.")
    assert "Retry-After" not in resp.headers


async def test_fail_next_503_count(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    fake.fail_next(503, count=2)
    for _ in range(2):
        resp = await complete(client, token, batch(cid(1)))
        assert resp.status == 503
        body = await resp.json()
        assert body["status"] == "error"
        uuid.UUID(body["correlationId"])
    assert (await complete(client, token, batch(cid(1)))).status == 204


def test_fail_next_rejects_success_status() -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        FakeHubSpot().fail_next(200)


async def test_reject_callbacks(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    fake.reject_callbacks([cid(2)])
    resp = await complete(client, token, batch(cid(1), cid(2)))
    assert resp.status == 400
    body = await resp.json()
    assert body["category"] == "VALIDATION_ERROR"
    assert cid(2) in body["message"]
    assert not fake.completed
    url = f"/automation/v4/actions/callbacks/{cid(2)}/complete"
    single = await client.post(url, json=batch(cid(2))["inputs"][0], headers=bearer(token))
    assert single.status == 400


async def test_batch_size_limit(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    resp = await complete(client, token, batch(*(cid(n) for n in range(101))))
    assert resp.status == 400
    assert not fake.completed
    assert (await complete(client, token, batch(*(cid(n) for n in range(100))))).status == 204
    assert len(fake.completed) == 100


async def test_malformed_json(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    headers = {**bearer(token), "Content-Type": "application/json"}
    resp = await client.post(BATCH, data=b'{"inputs": [', headers=headers)
    assert resp.status == 400
    assert (await resp.json())["category"] == "VALIDATION_ERROR"
    assert fake.received[0].body == {}


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"inputs": []},
        {"inputs": "x"},
        {"inputs": [{"outputFields": {"hs_execution_state": "SUCCESS"}}]},
        {"inputs": [{"callbackId": 5, "outputFields": {"hs_execution_state": "SUCCESS"}}]},
        {"inputs": [{"callbackId": "ap-62515-1", "outputFields": {}}]},
        {"inputs": [{"callbackId": "ap-62515-1"}]},
        {"inputs": [item("ap-62515-1", "BLOCK")]},
        {
            "inputs": [
                {"callbackId": "c", "outputFields": {"hs_execution_state": "SUCCESS", "n": 1}}
            ]
        },
        {"inputs": [{**item("c"), "typedOutputs": []}]},
        {"inputs": [item("c"), 7]},
    ],
    ids=repr,
)
async def test_invalid_bodies(client: Client, fake: FakeHubSpot, body: Any) -> None:
    token = await access_token(client)
    resp = await complete(client, token, body)
    assert resp.status == 400
    assert (await resp.json())["category"] == "VALIDATION_ERROR"
    assert not fake.completed


async def test_wrong_portal(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    resp = await complete(client, token, batch(cid(1), cid(2, portal=999)))
    assert resp.status == 400
    assert cid(2, portal=999) in (await resp.json())["message"]
    assert not fake.completed


async def test_portal_budget(aiohttp_client: AiohttpClient, clock: Clock) -> None:
    fake = FakeHubSpot(portal_budget=(3, 10.0), clock=clock)
    fake.register_portal(PORTAL, REFRESH)
    fake.register_portal(1, "refresh-1")
    client = await aiohttp_client(fake.make_app())
    token = await access_token(client)
    remaining = []
    for n in range(3):
        clock.now += 1
        resp = await complete(client, token, batch(cid(n)))
        assert resp.status == 204
        remaining.append(resp.headers["X-HubSpot-RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    limited = await complete(client, token, batch(cid(9)))
    assert limited.status == 429
    assert limited.headers["X-HubSpot-RateLimit-Max"] == "3"
    assert limited.headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert limited.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    assert limited.headers["X-HubSpot-RateLimit-Daily"] == "500000"
    assert limited.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "499996"
    assert (await limited.json())["policyName"] == "TEN_SECONDLY_ROLLING"
    _, other = await refresh(client, "refresh-1")
    assert (await complete(client, other["access_token"], batch(cid(1, 1)))).status == 204
    clock.now += 8.0  # t=11: window (1, 11] still holds t=2, 3 and the rejected t=3
    assert (await complete(client, token, batch(cid(9)))).status == 429
    clock.now += 2.0  # t=13: window (3, 13] holds only the t=11 request
    assert (await complete(client, token, batch(cid(9)))).status == 204
    times = [r.at for r in fake.received if r.portal_id == PORTAL and r.status == 204]
    assert max_in_window(times, 10.0) <= 3


async def test_daily_headers_optional(client: Client, fake: FakeHubSpot) -> None:
    token = await access_token(client)
    fake.daily_limit = None
    resp = await complete(client, token, batch(cid(1)))
    assert resp.headers["X-HubSpot-RateLimit-Max"] == "110"
    assert "X-HubSpot-RateLimit-Daily" not in resp.headers
    assert "X-HubSpot-RateLimit-Daily-Remaining" not in resp.headers


async def test_sends_for(client: Client, fake: FakeHubSpot, clock: Clock) -> None:
    token = await access_token(client)
    fake.fail_next(503)
    await complete(client, token, batch(cid(1), cid(2)))
    clock.now += 1
    await complete(client, token, batch(cid(1), cid(3)))
    assert fake.sends_for([cid(1)]) == [clock.now - 1, clock.now]
    assert fake.sends_for([cid(1), cid(2), cid(3)]) == [clock.now - 1] * 2 + [clock.now] * 2
    assert fake.sends_for([cid(4)]) == []


async def test_started_server_end_to_end() -> None:
    async with FakeHubSpot() as fake:
        fake.register_portal(PORTAL, REFRESH)
        fake.delay_s = 0.01
        assert fake.base_url is not None
        assert fake.base_url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession(fake.base_url) as session:
            data = {"grant_type": "refresh_token", "refresh_token": REFRESH, **CREDS}
            async with session.post(TOKEN, data=data) as resp:
                token = (await resp.json())["access_token"]
            async with session.post(BATCH, json=batch(cid(1)), headers=bearer(token)) as resp:
                assert resp.status == 204
        assert cid(1) in fake.completed


# -- max_in_window ---------------------------------------------------------------------


def brute_max_in_window(times: Sequence[float], period_s: float) -> int:
    """Reference: try every window ending at a sample."""
    return max((sum(t - period_s < x <= t for x in times) for t in times), default=0)


@pytest.mark.parametrize(
    ("times", "period", "expected"),
    [
        ([], 1.0, 0),
        ([5.0], 1.0, 1),
        ([0.0, 1.0], 1.0, 1),  # half-open: 0.0 is outside (0.0, 1.0]
        ([0.0, 0.5, 1.0], 1.0, 2),
        ([3.0, 1.0, 2.0, 1.0], 10.0, 4),
        ([0.0, 0.0, 0.0, 5.0], 1.0, 3),
    ],
)
def test_max_in_window_examples(times: list[float], period: float, expected: int) -> None:
    assert max_in_window(times, period) == expected


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(
    st.lists(st.one_of(finite, st.integers(0, 20).map(float)), max_size=40),
    st.one_of(st.floats(min_value=1e-3, max_value=1e3), st.integers(1, 5).map(float)),
)
def test_max_in_window_matches_brute_force(times: list[float], period: float) -> None:
    assert max_in_window(times, period) == brute_max_in_window(times, period)


def test_max_in_window_rejects_nonpositive_period() -> None:
    with pytest.raises(ValueError, match="positive"):
        max_in_window([1.0], 0.0)
