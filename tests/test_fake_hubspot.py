"""Tests for the fake HubSpot server used by mock mode, tests and benchmarks."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st
from pytest_aiohttp.plugin import AiohttpClient

from throttled.hubspot.fake import FakeHubSpot, max_in_window

PORTAL = 62515
REFRESH = "refresh-62515"
BATCH = "/automation/v4/actions/callbacks/complete"
TOKEN = "/oauth/v1/token"
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
    assert (await limited.json())["policyName"] == "TEN_SECONDLY_ROLLING"
    _, other = await refresh(client, "refresh-1")
    assert (await complete(client, other["access_token"], batch(cid(1, 1)))).status == 204
    clock.now += 8.0  # t=11: window (1, 11] still holds t=2, 3 and the rejected t=3
    assert (await complete(client, token, batch(cid(9)))).status == 429
    clock.now += 2.0  # t=13: window (3, 13] holds only the t=11 request
    assert (await complete(client, token, batch(cid(9)))).status == 204
    times = [r.at for r in fake.received if r.portal_id == PORTAL and r.status == 204]
    assert max_in_window(times, 10.0) <= 3


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
