"""Security, case by case, against a running daemon (real PostgreSQL, the fake HubSpot):
signatures (unsigned, wrongly signed, v3 replayed, v3 from the future), admin routes without
a valid token, OAuth state reuse, no plaintext token in the database, error bodies without
stack traces or secrets, and request bodies over the limit refused before they are read
whole. Each test also shows its control (the same request done right is accepted, changes
the database, is read), so that it can fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

import psycopg
import pytest
import structlog
from multidict import CIMultiDict

from tests.conftest import (
    CLIENT_SECRET,
    Daemon,
    action_payload,
    eventually,
    make_config,
    running,
    wait_for,
    with_database,
)
from tests.daemon_process import free_port
from throttled import crypto
from throttled.hubspot.fake import Consent, FakeHubSpot
from throttled.hubspot.signature import (
    SIGNATURE,
    SIGNATURE_V3,
    SIGNATURE_VERSION,
    TIMESTAMP,
    sign_headers,
)
from throttled.tokens import token_aad
from throttled.web import openapi

ACTION = "/api/hubspot/action"
TOKEN = "security-admin-token-" + secrets.token_hex(12)
HASHED = "security-hashed-token-" + secrets.token_hex(12)  # configured by its SHA-256 only
ADMIN = {
    "admin": {
        "tokens": [
            {"id": "ops", "token": TOKEN},
            {"id": "hashed", "token_sha256": hashlib.sha256(HASHED.encode()).hexdigest()},
        ]
    }
}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PORTAL, ACTION_ID = 62515, 1234567
SNAPSHOT = """
SELECT (SELECT count(*) FROM actions),
       (SELECT coalesce(md5(string_agg(state || callback_id, ',' ORDER BY id)), '') FROM actions),
       (SELECT coalesce(md5(string_agg(key || policy::text || coalesce(override::text, '')
                                       || coalesce(paused_at::text, ''), ',' ORDER BY id)), '')
          FROM queues),
       (SELECT coalesce(md5(string_agg(portal_id || ':' || action_id || policy::text, ','
                                       ORDER BY portal_id, action_id)), '') FROM action_configs),
       (SELECT coalesce(md5(string_agg(portal_id || status, ',' ORDER BY portal_id)), '')
          FROM portals),
       (SELECT count(*) FROM audit_log),
       (SELECT version FROM change_counter)
"""


def snapshot(db_url: str) -> tuple[Any, ...]:
    """What a request may have changed: actions, queues, configs, portals, audit, changes."""
    with psycopg.connect(db_url) as conn:
        row = conn.execute(SNAPSHOT).fetchone()
    assert row is not None
    return tuple(row)


def count_actions(db_url: str) -> int:
    return int(snapshot(db_url)[0])


async def post(daemon: Daemon, body: bytes, headers: Any) -> tuple[int, dict[str, Any]]:
    async with daemon.session.post(daemon.url + ACTION, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


def body_of(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


JSON = {"Content-Type": "application/json"}


# --- signatures -------------------------------------------------------------------------------


async def test_unsigned_and_wrongly_signed_actions_are_401_and_store_nothing(
    daemon_factory, db_url
):
    async with daemon_factory() as daemon:
        url = daemon.url + ACTION
        body = body_of(action_payload())
        v2 = sign_headers(CLIENT_SECRET, "POST", url, body)
        v3 = sign_headers(CLIENT_SECRET, "POST", url, body, version="v3")
        wrong_v3 = sign_headers("not-the-secret", "POST", url, body, version="v3")
        cases: dict[str, Any] = {
            "no signature header": {},
            "only the version header": {SIGNATURE_VERSION: "v2"},
            "an empty signature": {SIGNATURE: "", SIGNATURE_VERSION: "v2"},
            "only a v3 timestamp": {TIMESTAMP: v3[TIMESTAMP]},
            "v2 with another secret": sign_headers("not-the-secret", "POST", url, body),
            "v2 of another body": sign_headers(CLIENT_SECRET, "POST", url, body + b" "),
            "v2 of another URL": sign_headers(CLIENT_SECRET, "POST", url + "?x=1", body),
            "v2 of another method": sign_headers(CLIENT_SECRET, "GET", url, body),
            "v2 in upper case": {**v2, SIGNATURE: v2[SIGNATURE].upper()},
            "v2 right, v3 wrong": {**v2, **{k: wrong_v3[k] for k in (SIGNATURE_V3, TIMESTAMP)}},
            "v3 right, v2 wrong": {**v3, SIGNATURE: "0" * 64},
            "v3 alone, another secret": {k: wrong_v3[k] for k in (SIGNATURE_V3, TIMESTAMP)},
            "v1 (it signs the body only)": sign_headers(
                CLIENT_SECRET, "POST", url, body, version="v1"
            ),
            "an unknown version": {**v2, SIGNATURE_VERSION: "v4"},
            "the signature twice": CIMultiDict([*v2.items(), (SIGNATURE, "0" * 64)]),
        }
        before = snapshot(db_url)
        for what, signature in cases.items():
            headers = CIMultiDict(JSON)
            headers.extend(signature)
            status, answer = await post(daemon, body, headers)
            assert (status, answer.get("error")) == (401, "invalid_signature"), (what, answer)
            assert snapshot(db_url) == before, f"{what}: the database changed"
        # the control: the very same body, signed right, is stored (v2, then v3: one row)
        for signature in (v2, v3):
            status, answer = await post(daemon, body, {**JSON, **signature})
            assert status == 200, answer
        assert count_actions(db_url) == 1


async def test_a_v3_request_replayed_after_five_minutes_is_401_and_stores_nothing(
    daemon_factory, db_url
):
    async with daemon_factory() as daemon:
        url = daemon.url + ACTION
        body = body_of(action_payload())
        sent_ms = int(time.time() * 1000) - 301_000  # what HubSpot sent 5 min 1 s ago
        captured = sign_headers(CLIENT_SECRET, "POST", url, body, version="v3", now_ms=sent_ms)
        now = str(int(time.time() * 1000))
        replays = {
            "as captured": captured,
            "v3 alone": {k: captured[k] for k in (SIGNATURE_V3, TIMESTAMP)},
            "with a fresh timestamp": {**captured, TIMESTAMP: now},  # (cannot be re-signed)
            "with the timestamp in seconds": {**captured, TIMESTAMP: now[:-3]},
            "an hour later": sign_headers(
                CLIENT_SECRET, "POST", url, body, version="v3", now_ms=sent_ms - 3_300_000
            ),
        }
        for what, headers in replays.items():
            status, answer = await post(daemon, body, {**JSON, **headers})
            assert (status, answer.get("error")) == (401, "invalid_signature"), (what, answer)
        assert count_actions(db_url) == 0
        # A request replayed within the window is the same delivery again: the same answer,
        # no second row. Without its v3 headers (v2 is always verified, v3 when present:
        # hubspot-api.md §1.2) it is accepted as v2, and is as harmless.
        fresh = sign_headers(CLIENT_SECRET, "POST", url, body, version="v3")
        first = await post(daemon, body, {**JSON, **fresh})
        assert first[0] == 200, first
        before = snapshot(db_url)
        v2_only = {k: fresh[k] for k in (SIGNATURE, SIGNATURE_VERSION)}
        for headers in (fresh, fresh, v2_only):
            assert await post(daemon, body, {**JSON, **headers}) == first
        assert snapshot(db_url) == before
        assert count_actions(db_url) == 1


async def test_a_v3_timestamp_from_the_future_is_401_and_stores_nothing(daemon_factory, db_url):
    async with daemon_factory() as daemon:
        url = daemon.url + ACTION
        now_ms = int(time.time() * 1000)
        for ahead_s in (301, 600, 86_400, 10**9):  # (HubSpot's own library lets these pass)
            body = body_of(action_payload())
            signed = sign_headers(
                CLIENT_SECRET, "POST", url, body, version="v3", now_ms=now_ms + ahead_s * 1000
            )
            status, answer = await post(daemon, body, {**JSON, **signed})
            assert (status, answer.get("error")) == (401, "invalid_signature"), ahead_s
            assert "timestamp" in answer["message"]
        assert count_actions(db_url) == 0
        # the control: a clock a little ahead (inside the 5 minutes) is accepted
        body = body_of(action_payload())
        signed = sign_headers(
            CLIENT_SECRET, "POST", url, body, version="v3", now_ms=int(time.time() * 1000) + 280_000
        )
        status, answer = await post(daemon, body, {**JSON, **signed})
        assert status == 200, answer
        assert count_actions(db_url) == 1


# --- admin routes -----------------------------------------------------------------------------


def admin_operations() -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path template, operation) of every operation the API document secures with
    the admin token (tests/test_openapi.py checks that it names every route served)."""
    ops = []
    for path, item in openapi.document()["paths"].items():
        for method, op in item.items():
            if isinstance(op, dict) and {"adminBearer": []} in op.get("security", []):
                ops.append((method.upper(), path, op))
    return ops


BAD_CREDENTIALS: dict[str, dict[str, str]] = {
    "no Authorization header": {},
    "an empty header": {"Authorization": ""},
    "the scheme alone": {"Authorization": "Bearer"},
    "the scheme and a space": {"Authorization": "Bearer "},
    "the token without a scheme": {"Authorization": TOKEN},
    "Basic with the token": {"Authorization": f"Basic {TOKEN}"},
    "Basic user:token": {
        "Authorization": "Basic " + base64.b64encode(f"ops:{TOKEN}".encode()).decode()
    },
    "the token and more": {"Authorization": f"Bearer {TOKEN}x"},
    "the token but its last character": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "the token in upper case": {"Authorization": f"Bearer {TOKEN.upper()}"},
    "the token twice": {"Authorization": f"Bearer {TOKEN} {TOKEN}"},
    "the configured digest as the token": {
        "Authorization": f"Bearer {hashlib.sha256(HASHED.encode()).hexdigest()}"
    },
    "the token's id": {"Authorization": "Bearer ops"},
    "another header": {"X-Admin-Token": TOKEN, "X-Api-Key": TOKEN},
    "a cookie": {"Cookie": f"token={TOKEN}; access_token={TOKEN}"},
}


def _done(db_url: str) -> bool:
    """Whether the first action is completed and its row written (the rest wait an hour)."""
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT count(*) FROM actions WHERE state = 'done'").fetchone() == (1,)


async def _seed(daemon: Daemon, fake: FakeHubSpot) -> dict[str, Any]:
    """A connected portal with a config and a queue: one action done, two pending."""
    await daemon.connect_portal(fake, PORTAL)
    fields = {"maxThroughput": "1", "timeUnit": "hours"}
    callbacks = []
    for _ in range(3):
        payload = action_payload(portal_id=PORTAL, action_id=ACTION_ID, input_fields=fields)
        status, answer = await daemon.post_action(payload)
        assert status == 200, answer
        callbacks.append(payload["callbackId"])
    await eventually(lambda: asyncio.to_thread(_done, daemon.runtime.config.database.url.reveal()))
    config = {"portal_id": PORTAL, "action_id": ACTION_ID, "max_throughput": 5}
    async with daemon.session.post(daemon.url + "/api/config", json=config, headers=AUTH) as r:
        assert r.status == 200, await r.text()
    async with daemon.session.get(daemon.url + "/api/queues", headers=AUTH) as r:
        (queue,) = (await r.json())["queues"]
    return {
        "id": str(queue["id"]),
        "portal_id": str(PORTAL),
        "action_id": str(ACTION_ID),
        "callback_id": callbacks[-1],
        "config": config,
    }


def fill(path: str, known: dict[str, Any]) -> str:
    """A path template with the seeded rows' ids."""
    ids = dict(known, id=str(PORTAL) if path.startswith("/api/portals/") else known["id"])
    return re.sub(r"\{(\w+)\}", lambda m: quote(ids[m[1]], safe=""), path)


BODIES = {
    "POST /api/config": lambda known: {**known["config"], "max_throughput": 7},
    "PUT /api/queues/{id}/rate": lambda known: {"max_throughput": "3", "time_unit": "minutes"},
    "POST /api/queues/{id}/fail-pending": lambda known: {"confirm": True},
}


@pytest.mark.timeout(120)
async def test_every_admin_route_refuses_every_bad_credential_and_changes_nothing(
    daemon_factory, fake_hubspot, db_url
):
    operations = admin_operations()
    assert len(operations) >= 20, "the document lists the admin routes"
    async with daemon_factory(**ADMIN) as daemon:
        known = await _seed(daemon, fake_hubspot)
        before = snapshot(db_url)
        refused = 0
        for method, template, _ in operations:
            path = fill(template, known)
            body = BODIES.get(f"{method} {template}", lambda _: None)(known)
            variants = [(m, path) for m in ([method, "HEAD"] if method == "GET" else [method])]
            variants.append((method, path + f"?token={TOKEN}&access_token={TOKEN}"))
            for (verb, target), (what, headers) in (
                (v, c) for v in variants for c in BAD_CREDENTIALS.items()
            ):
                async with daemon.session.request(
                    verb, daemon.url + target, json=body, headers=headers
                ) as resp:
                    where = f"{verb} {target} with {what}"
                    assert resp.status == 401, f"{where}: {resp.status} {await resp.text()}"
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer"), where
                    if verb != "HEAD":
                        answer = await resp.json()
                        assert set(answer) == {"error", "message"}, f"{where}: {answer}"
                        assert answer["error"] == "unauthorized", where
                        assert TOKEN not in json.dumps(answer), where
                    refused += 1
        assert snapshot(db_url) == before, "a refused admin request changed the database"
        # the control: the same requests with a token (either) are served, and change it
        for n, (method, template, _) in enumerate(operations):
            body = BODIES.get(f"{method} {template}", lambda _: None)(known)
            headers = {"Authorization": f"Bearer {(TOKEN, HASHED)[n % 2]}"}
            async with daemon.session.request(
                method, daemon.url + fill(template, known), json=body, headers=headers
            ) as resp:
                assert resp.status not in (401, 403), f"{method} {template}: {resp.status}"
                assert resp.status < 500, f"{method} {template}: {await resp.text()}"
        assert snapshot(db_url) != before
    assert refused >= len(operations) * len(BAD_CREDENTIALS) * 2


# --- OAuth state -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def installer(db_url: str, fake: FakeHubSpot, **sections: Any) -> AsyncIterator[Daemon]:
    """A daemon whose install flow goes to the fake (consent page and API on one server)."""
    port = free_port()
    server = {"port": port, "public_url": f"http://127.0.0.1:{port}"}
    hubspot = {"auth_base_url": fake.base_url}
    cfg = make_config(db_url, fake.base_url, server=server, hubspot=hubspot, **sections)
    async with running(cfg) as daemon:
        yield daemon


async def consent_redirect(daemon: Daemon) -> str:
    """The flow up to HubSpot's redirect back: the callback URL (with code and state)."""
    async with daemon.session.get(
        daemon.url + "/api/oauth/authorize", allow_redirects=False
    ) as resp:
        assert resp.status == 302
        to_hubspot = resp.headers["Location"]
    async with daemon.session.get(to_hubspot, allow_redirects=False) as resp:
        assert resp.status == 302
        return str(resp.headers["Location"])


async def get(daemon: Daemon, url: str) -> tuple[int, str]:
    async with daemon.session.get(url, allow_redirects=False) as resp:
        return resp.status, await resp.text()


def exchanges(fake: FakeHubSpot) -> int:
    return sum(1 for r in fake.token_requests if r.get("grant_type") == "authorization_code")


def portals(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("SELECT portal_id, status FROM portals").fetchall()


async def test_an_oauth_state_used_at_once_by_many_is_used_once(db_url, fake_hubspot):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    async with installer(db_url, fake_hubspot) as daemon:
        callback = await consent_redirect(daemon)
        answers = await asyncio.gather(*(get(daemon, callback) for _ in range(8)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] + [400] * 7, statuses
    assert sum("already used" in text for _, text in answers) == 7
    assert exchanges(fake_hubspot) == 1
    assert portals(db_url) == [(PORTAL, "connected")]


async def test_an_oauth_state_is_spent_by_a_failed_or_declined_callback(db_url, fake_hubspot):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    async with installer(db_url, fake_hubspot) as daemon:
        # HubSpot fails the code exchange: the state is spent all the same
        callback = await consent_redirect(daemon)
        fake_hubspot.fail_token_next(503)
        assert (await get(daemon, callback))[0] == 502
        status, text = await get(daemon, callback)
        assert (status, "already used" in text) == (400, True), text
        # a declined callback spends its state: the code that comes with it later is refused
        callback = await consent_redirect(daemon)
        state = parse_qs(urlsplit(callback).query)["state"][0]
        declined = f"{daemon.url}/api/oauth/callback?error=access_denied&state={state}"
        assert (await get(daemon, declined))[0] == 400
        status, text = await get(daemon, callback)
        assert (status, "already used" in text) == (400, True), text
        assert exchanges(fake_hubspot) == 1  # (the failed one)
        assert portals(db_url) == []
        # the control: a fresh state connects
        assert (await get(daemon, await consent_redirect(daemon)))[0] == 200
    assert portals(db_url) == [(PORTAL, "connected")]


# --- tokens at rest ---------------------------------------------------------------------------


def encodings(value: str) -> set[str]:
    """A secret as text, hex and base64: a stored copy in any of them is a plaintext copy."""
    raw = value.encode()
    b64 = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    return {value, raw.hex(), b64, b64.rstrip("="), url, url.rstrip("=")}


def dump(db_url: str) -> tuple[str, list[bytes]]:
    """Every row of every table as text, and every bytea value as bytes."""
    with psycopg.connect(db_url) as conn:
        tables = [
            t
            for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        text = [row for t in tables for (row,) in conn.execute(f'SELECT t::text FROM "{t}" t')]
        columns = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND data_type = 'bytea'"
        ).fetchall()
        blobs = [
            bytes(v)
            for t, c in columns
            for (v,) in conn.execute(f'SELECT "{c}" FROM "{t}" WHERE "{c}" IS NOT NULL')
        ]
    return "\n".join(text), blobs


async def test_the_database_holds_no_token_in_any_plain_encoding_only_ciphertexts(
    db_url, fake_hubspot
):
    fake_hubspot.consent = Consent(portal_id=PORTAL)
    async with installer(db_url, fake_hubspot, **ADMIN) as daemon:
        key = daemon.runtime.config.security.encryption_key.reveal()
        assert (await get(daemon, await consent_redirect(daemon)))[0] == 200  # an install
        live_state = parse_qs(urlsplit(await consent_redirect(daemon)).query)["state"][0]
        for _ in range(2):  # a send, then (tokens expired) a refresh and a send
            payload = action_payload(portal_id=PORTAL)
            assert (await daemon.post_action(payload))[0] == 200
            await wait_for(lambda p=payload: p["callbackId"] in fake_hubspot.completed)
            fake_hubspot.expire_tokens()
    assert any(r.get("grant_type") == "refresh_token" for r in fake_hubspot.token_requests)
    issued = set(fake_hubspot._tokens) | set(fake_hubspot._refresh_tokens)  # (the fake's books)
    issued |= {r["code"] for r in fake_hubspot.token_requests if "code" in r}
    issued |= {live_state, TOKEN, CLIENT_SECRET, key}
    text, blobs = dump(db_url)
    for value in issued:
        for form in encodings(value):
            assert form not in text, "a secret is stored in plain (or plainly encoded)"
        assert not any(value.encode() in blob for blob in blobs), "a secret is in a bytea"
    raw_key = crypto.parse_key(key)
    assert not any(raw_key in blob for blob in blobs)
    assert raw_key.hex() not in text
    # what is stored is the tokens, encrypted: they open with the key (and with no other)
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT refresh_token, access_token FROM portals WHERE portal_id = %s", (PORTAL,)
        ).fetchone()
    assert row is not None
    ring, other = crypto.KeyRing(raw_key), crypto.KeyRing(secrets.token_bytes(32))
    for sealed, kind in zip(row, ("refresh", "access"), strict=True):
        plain = ring.decrypt(sealed, aad=token_aad(PORTAL, kind))
        assert plain in issued
        with pytest.raises(crypto.CryptoError):
            other.decrypt(sealed, aad=token_aad(PORTAL, kind))
        with pytest.raises(crypto.CryptoError):  # bound to its portal and column
            ring.decrypt(sealed, aad=token_aad(PORTAL + 1, kind))


# --- error bodies -----------------------------------------------------------------------------

PASSWORD = "pw-" + secrets.token_hex(10)  # in database.url (trust auth: never asked for)
LEAKS = [
    re.compile(p)
    for p in (
        r"Traceback",
        r'File "[^"]*", line \d+',
        r"\.py\b",
        r"\basyncpg\b",
        r"\bpsycopg\b",
        r"(?i)\brelation\b",
        r"(?i)\b(select|insert into|delete from|update \w+ set)\b",
        r"(?i)exception|error:",
        r"postgres(ql)?://",
        r"127\.0\.0\.1:5432",
    )
]


def leaks(body: str, secrets_: list[str]) -> list[str]:
    found = [p.pattern for p in LEAKS if p.search(body)]
    return found + [f"secret {s[:6]}..." for s in secrets_ if s in body]


async def _answers(daemon: Daemon, requests: list[tuple[str, str, Any, dict[str, str]]]):
    out = []
    for method, path, data, headers in requests:
        async with daemon.session.request(
            method, daemon.url + path, data=data, headers=headers, allow_redirects=False
        ) as resp:
            out.append((f"{method} {path[:80]}", resp.status, await resp.text()))
    return out


def _bad_requests(daemon: Daemon, known: dict[str, Any]) -> list[Any]:
    """Requests that each fail in their own way (4xx)."""
    url = daemon.url + ACTION
    valid = body_of(action_payload())
    signed = sign_headers(CLIENT_SECRET, "POST", url, valid)
    sig = {**JSON, **signed}
    wrong = {**JSON, **sign_headers("not-the-secret", "POST", url, valid)}

    def resigned(body: bytes, **extra: str) -> dict[str, str]:
        return {**JSON, **sign_headers(CLIENT_SECRET, "POST", url, body), **extra}

    bad_bodies = [b"{", b"[]", b'{"callbackId": 5}', b"\xff\xfe", b"[" * 5000, b"1e999"]
    queue = f"/api/queues/{known['id']}"
    return [
        ("POST", ACTION, valid, JSON),
        ("POST", ACTION, valid, wrong),
        ("POST", ACTION, valid, {**sig, "Content-Type": "text/plain"}),
        ("POST", ACTION, valid, {**sig, "Content-Encoding": "br"}),
        ("POST", ACTION, valid, {**resigned(valid), "Content-Encoding": "gzip"}),
        ("POST", ACTION, b"x" * 20_000, resigned(b"x" * 20_000)),
        *(("POST", ACTION, b, resigned(b)) for b in bad_bodies),
        ("GET", ACTION, None, {}),
        ("GET", "/nope/" + "a" * 5000, None, {}),
        ("GET", "/api/queues", None, {"Authorization": f"Bearer {TOKEN}x"}),
        ("GET", "/api/queues?sort=nope&limit=-1", None, AUTH),
        ("GET", "/api/queues?cursor=%ff%fe", None, AUTH),
        ("GET", "/api/queues/999999", None, AUTH),
        ("GET", "/api/queues/" + "9" * 40, None, AUTH),
        ("GET", "/api/actions/" + "x" * 300, None, AUTH),
        ("GET", "/api/config/0/-1", None, AUTH),
        ("GET", "/api/portals/abc", None, AUTH),
        ("POST", "/api/config", b"{", {**AUTH, **JSON}),
        ("POST", "/api/config", b'{"portal_id": "x", "a": 1, "a": 2}', {**AUTH, **JSON}),
        ("POST", "/api/config", json.dumps({"portal_id": 2**80}).encode(), {**AUTH, **JSON}),
        ("PUT", queue + "/rate", b'{"max_throughput": "NaN"}', {**AUTH, **JSON}),
        ("POST", queue + "/fail-pending", b"{}", {**AUTH, **JSON}),
        ("DELETE", "/api/portals/777/connection", None, AUTH),
        ("GET", "/api/oauth/callback?state=x&code=y", None, {}),
        ("GET", "/api/oauth/callback?state=a&state=b", None, {}),
        ("GET", "/api/oauth/callback?error=%3Cscript%3E&state=" + "s" * 300, None, {}),
        ("GET", "/static/../../etc/passwd", None, {}),
        ("GET", "/static/vendor/%2e%2e%2fdashboard.js", None, {}),
    ]


# Tables renamed away while a daemon runs: a handler then meets the driver's own error
# (UndefinedTable, with the SQL and the table's name in its message).
SABOTAGED = ("action_configs", "audit_log")


def _broken_requests(known: dict[str, Any]) -> list[Any]:
    queue = f"/api/queues/{known['id']}"
    config = json.dumps({**known["config"], "max_throughput": 9}).encode()
    return [
        ("POST", "/api/config", config, {**AUTH, **JSON}),
        ("GET", "/api/config", None, AUTH),
        ("GET", f"/api/config/{PORTAL}/{ACTION_ID}", None, AUTH),
        ("DELETE", f"/api/config/{PORTAL}/{ACTION_ID}", None, AUTH),
        ("GET", "/api/audit", None, AUTH),
        ("POST", queue + "/pause", None, AUTH),
        ("PUT", queue + "/rate", b'{"max_throughput": "2"}', {**AUTH, **JSON}),
    ]


@pytest.mark.timeout(120)
async def test_error_bodies_hold_no_stack_trace_sql_or_secret(pg_server_url, db_url, fake_hubspot):
    name = urlsplit(db_url).path.lstrip("/")
    parts = urlsplit(with_database(pg_server_url, name))
    # (the password put into the URL as it is, host, port and ?host= of a Unix socket kept)
    where = parts.netloc.rpartition("@")[2]
    secret_url = urlunsplit(parts._replace(netloc=f"postgres:{PASSWORD}@{where}"))
    cfg = make_config(secret_url, fake_hubspot.base_url, retention={"interval_s": 86_400}, **ADMIN)
    key = cfg.security.encryption_key.reveal()
    hidden = [CLIENT_SECRET, TOKEN, HASHED, key, PASSWORD]
    async with running(cfg) as daemon:
        known = await _seed(daemon, fake_hubspot)
        answers = await _answers(daemon, _bad_requests(daemon, known))
        with psycopg.connect(db_url, autocommit=True) as conn:
            for table in SABOTAGED:
                conn.execute(f'ALTER TABLE "{table}" RENAME TO "{table}_gone"')
            try:
                broken = await _answers(daemon, _broken_requests(known))
            finally:
                for table in SABOTAGED:
                    conn.execute(f'ALTER TABLE "{table}_gone" RENAME TO "{table}"')
        assert not daemon.task.done(), "the daemon died"
    problems = []
    for where, status, text in answers + broken:
        if found := leaks(text, hidden):
            problems.append(f"{where}: {status} leaks {found}: {text[:300]!r}")
        if len(text) > 2000:
            problems.append(f"{where}: {status}, a {len(text)}-character error body")
    assert problems == []
    assert [(w, s) for w, s, _ in answers if not 400 <= s < 500] == []  # (each is refused)
    assert sum(s >= 500 for _, s, _ in broken) >= len(broken) - 1, broken  # (the path ran)


# --- body limits ----------------------------------------------------------------------------

LIMIT = 4096  # ingest.max_body_bytes in these tests
HEAD_TIMEOUT_S = 5.0


async def _exchange_head(
    daemon: Daemon, head: bytes, first: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.runtime.port)
    writer.write(head + first)
    await writer.drain()
    return reader, writer


async def _status(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes] | None:
    """The status and head of the response, if it comes within timeout."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (TimeoutError, asyncio.IncompleteReadError):  # (none yet, or closed without one)
        return None
    return int(head.split(b" ", 2)[1]), head


def _head(method: str, path: str, **headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
# Every route that reads a body (the action endpoint, and read_json's admin writes), with the
# status a body over the limit gets; then an admin write without a token (never read).
TARGETS = [
    ("POST", ACTION, JSON, 413),
    ("POST", "/api/config", BEARER, 413),
    ("PUT", "/api/queues/1/rate", BEARER, 413),
    ("POST", "/api/queues/1/fail-pending", BEARER, 413),
    ("POST", "/api/config", JSON, 401),
]
READERS = TARGETS[:4]


@pytest.mark.timeout(60)
async def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(daemon_factory, db_url):
    async with daemon_factory(ingest={"max_body_bytes": LIMIT}, **ADMIN) as daemon:
        for method, path, headers, expected in TARGETS:
            for length in (LIMIT + 1, 10**12):
                head = _head(method, path, **headers, **{"Content-Length": str(length)})
                reader, writer = await _exchange_head(daemon, head, b" " * 100)
                try:  # (100 bytes sent: the rest never is, and the answer comes anyway)
                    answer = await _status(reader, HEAD_TIMEOUT_S)
                finally:
                    writer.close()
                assert answer is not None, f"{method} {path}: no answer before the body"
                assert answer[0] == expected, (method, path, length, answer)
    assert count_actions(db_url) == 0


@pytest.mark.timeout(60)
async def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(daemon_factory, db_url):
    chunk = 16 << 10
    whole = 64 << 20  # what the client would send: it is refused long before
    async with daemon_factory(ingest={"max_body_bytes": LIMIT}, **ADMIN) as daemon:
        for method, path, headers, expected in READERS:
            head = _head(method, path, **headers, **{"Transfer-Encoding": "chunked"})
            reader, writer = await _exchange_head(daemon, head)
            sent, answer = 0, None
            deadline = time.monotonic() + 10
            try:
                while answer is None and sent < whole and time.monotonic() < deadline:
                    writer.write(b"%x\r\n%s\r\n" % (chunk, b" " * chunk))
                    await writer.drain()
                    sent += chunk
                    answer = await _status(reader, 0.02)
            except ConnectionError:  # the server closed after answering: read it
                answer = await _status(reader, HEAD_TIMEOUT_S)
            finally:
                writer.close()
            assert answer is not None, f"{method} {path}: no answer after {sent} bytes"
            assert answer[0] == expected, (method, path, answer)
            assert sent <= 8 << 20, f"{method} {path}: answered only after {sent} bytes"
        # a compressed body small on the wire, 1,000 times the limit once decoded
        bomb = gzip.compress(b" " * (LIMIT * 1000))
        assert len(bomb) < LIMIT
        url = daemon.url + ACTION
        headers = {
            **JSON,
            "Content-Encoding": "gzip",
            **sign_headers(CLIENT_SECRET, "POST", url, bomb),
        }
        status, answer = await post(daemon, bomb, headers)
        assert (status, answer["error"]) == (413, "payload_too_large")
        # the control: a body within the limit, sent chunked, is read and stored
        body = body_of(action_payload())

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 100):
                yield body[i : i + 100]

        signed = {**JSON, **sign_headers(CLIENT_SECRET, "POST", url, body)}
        async with daemon.session.post(url, data=pieces(), headers=signed) as resp:
            assert resp.status == 200, await resp.text()
    assert count_actions(db_url) == 1


@pytest.mark.timeout(60)
async def test_a_body_cut_short_is_a_400_and_logs_no_server_error_on_any_route_reading_one(
    daemon_factory, db_url
):
    async with daemon_factory(ingest={"max_body_bytes": LIMIT}, **ADMIN) as daemon:
        with structlog.testing.capture_logs() as events:
            for method, path, headers, _ in READERS:
                head = _head(method, path, **headers, **{"Content-Length": "1000"})
                reader, writer = await _exchange_head(daemon, head, b'{"portal_id": 1')
                try:
                    await asyncio.sleep(0.1)  # (the handler is reading: the body stops here)
                    writer.write_eof()
                    answer = await _status(reader, HEAD_TIMEOUT_S)
                finally:
                    writer.close()
                # (aiohttp may close a half-closed connection before the answer is written)
                assert answer is None or answer[0] == 400, (method, path, answer)
            await asyncio.sleep(0.2)  # (a handler that failed logs as it ends)
        failed = [e for e in events if e.get("log_level") in ("error", "critical")]
        assert failed == []
    assert count_actions(db_url) == 0
