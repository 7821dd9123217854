"""The original's config API: POST /api/config, GET/DELETE /api/config/{portal}/{action}."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest

from tests.conftest import Daemon, action_payload, wait_for
from throttled.hubspot.action import parse

TOKEN = "config-api-admin-token-0123456789"
ADMIN = {"admin": {"tokens": [{"id": "ops", "token": TOKEN}]}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def call(daemon: Daemon, method: str, path: str, body: Any = None, **kw: Any):
    async with daemon.session.request(
        method, daemon.url + path, json=body, headers=kw.pop("headers", AUTH), **kw
    ) as resp:
        return resp.status, await resp.json()


async def test_a_config_is_stored_answered_and_used_at_once(daemon_factory, fake_hubspot, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        body = {
            "portal_id": "62515",  # numeric strings, as the original accepted
            "action_id": 1234567,
            "max_throughput": "3",
            "time_period": 1,
            "time_unit": "minute",  # singular too
        }
        status, stored = await call(daemon, "POST", "/api/config", body)
        assert status == 200, stored
        assert stored == {  # (stored normalized: numbers as integers)
            "portal_id": 62515,
            "action_id": 1234567,
            "max_throughput": 3,
            "time_period": 1,
            "time_unit": "minute",
        }
        assert (await call(daemon, "GET", "/api/config/62515/1234567")) == (200, stored)
        # a new action of that (portal, action) gets the rate, without a restart
        await daemon.connect_portal(fake_hubspot, 62515)
        payload = action_payload(portal_id=62515, action_id=1234567)
        assert (await daemon.post_action(payload))[0] == 200
        with psycopg.connect(db_url) as conn:
            await wait_for(lambda: conn.execute("SELECT count(*) FROM queues").fetchone() == (1,))
            (policy,) = conn.execute("SELECT policy FROM queues").fetchone()
        assert (policy["limit"], policy["period_s"]) == (3, 60.0)
        # replaced, then deleted
        body["max_throughput"] = 5
        assert (await call(daemon, "POST", "/api/config", body))[1]["max_throughput"] == 5
        status, deleted = await call(daemon, "DELETE", "/api/config/62515/1234567")
        assert (status, deleted["deleted"]) == (200, True)
        assert (await call(daemon, "GET", "/api/config/62515/1234567"))[0] == 404
        assert (await call(daemon, "DELETE", "/api/config/62515/1234567"))[0] == 404


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"portal_id": 1, "action_id": 2, "max_throughput": 0}, ["max_throughput"]),
        (
            {"portal_id": 0, "action_id": -1, "max_throughput": "x", "time_unit": "weeks"},
            ["portal_id", "action_id", "max_throughput", "time_unit"],
        ),
        (
            {"portal_id": 1, "action_id": 2, "max_throughput": 1, "timezone": "Mars/Base"},
            ["timezone"],
        ),
        ({"portal_id": 1, "action_id": 2, "max_throughput": 1, "pacing": "bursty"}, ["pacing"]),
        ({"portal_id": 1, "action_id": 2, "max_throughput": 1, "extra": 1}, ["extra"]),
        ({"portal_id": 1, "action_id": 2, "max_throughput": True}, ["max_throughput"]),
        ({"portal_id": 1, "action_id": 2, "max_throughput": 1.5}, ["max_throughput"]),
        ({"portal_id": 1, "action_id": 2}, ["max_throughput"]),
        (
            {
                "portal_id": 1,
                "action_id": 2,
                "max_throughput": 1,
                "time_period": 400,
                "time_unit": "days",
            },
            ["time_period"],
        ),
        (
            {"portal_id": 1, "action_id": 2, "max_throughput": 1, "release_hours": "25:00-26:00"},
            ["release_hours"],
        ),
        (
            {"portal_id": 1, "action_id": 2, "max_throughput": 1, "start_at": "x" * 300},
            ["start_at"],
        ),
        ({"portal_id": "1" * 30, "action_id": 2, "max_throughput": 1}, ["portal_id"]),
    ],
)
async def test_a_bad_config_is_a_422_naming_every_bad_field(daemon_factory, db_url, body, fields):
    async with daemon_factory(**ADMIN) as daemon:
        status, answer = await call(daemon, "POST", "/api/config", body)
    assert status == 422, answer
    assert answer["error"] == "invalid_config"
    assert sorted(f["field"] for f in answer["fields"]) == sorted(fields)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM action_configs").fetchone() == (0,)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1]", b"1", b"null", b"[" * 10000])
async def test_a_body_that_is_not_an_object_is_a_4xx(daemon_factory, raw):
    async with (
        daemon_factory(**ADMIN) as daemon,
        daemon.session.post(
            daemon.url + "/api/config",
            data=raw,
            headers={**AUTH, "Content-Type": "application/json"},
        ) as resp,
    ):
        assert 400 <= resp.status < 500
        assert "error" in await resp.json()


async def test_the_list_is_paginated_with_a_cursor(daemon_factory):
    async with daemon_factory(**ADMIN) as daemon:
        for portal in (3, 1, 2):
            for action in (20, 10):
                body = {"portal_id": portal, "action_id": action, "max_throughput": portal}
                assert (await call(daemon, "POST", "/api/config", body))[0] == 200
        seen, cursor = [], None
        while True:
            path = "/api/config?limit=4" + (f"&cursor={cursor}" if cursor else "")
            status, page = await call(daemon, "GET", path)
            assert status == 200
            seen += [(c["portal_id"], c["action_id"]) for c in page["configs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [(p, a) for p in (1, 2, 3) for a in (10, 20)]
        for bad in ("limit=0", "limit=1001", "limit=x", "cursor=%%%", "cursor=bm9wZQ"):
            status, answer = await call(daemon, "GET", f"/api/config?{bad}")
            assert status == 400, (bad, answer)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/config"),
        ("GET", "/api/config"),
        ("GET", "/api/config/1/2"),
        ("DELETE", "/api/config/1/2"),
    ],
)
async def test_the_config_api_needs_an_admin_token(daemon_factory, method, path):
    async with daemon_factory(**ADMIN) as daemon:
        status, answer = await call(daemon, method, path, {}, headers={})
    assert status == 401
    assert answer["error"] == "unauthorized"


@pytest.mark.parametrize(
    "path", ["/api/config/0/1", "/api/config/1/x", "/api/config/99999999999999999999/1"]
)
async def test_bad_path_ids_are_400(daemon_factory, path):
    async with daemon_factory(**ADMIN) as daemon:
        status, answer = await call(daemon, "GET", path)
    assert status == 400
    assert answer["field"] in ("portal_id", "action_id")


async def test_a_body_sent_in_slow_pieces_is_read_whole(daemon_factory):
    body = json.dumps({"portal_id": 1, "action_id": 2, "max_throughput": 7}).encode()

    async def pieces():
        for i in range(0, len(body), 5):
            yield body[i : i + 5]
            await asyncio.sleep(0.02)

    async with daemon_factory(**ADMIN) as daemon:
        async with daemon.session.post(
            daemon.url + "/api/config",
            data=pieces(),
            headers={**AUTH, "Content-Type": "application/json"},
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["max_throughput"] == 7
        big = b'{"portal_id": 1, "pad": "' + b"x" * 20000 + b'"}'
        async with daemon.session.post(daemon.url + "/api/config", data=big, headers=AUTH) as resp:
            assert resp.status == 413


async def test_each_new_config_is_used_at_once_even_where_an_old_one_was_cached(
    daemon_factory, db_url
):
    async with daemon_factory(**ADMIN) as daemon:
        intake = daemon.runtime.services.intake
        for limit in range(1, 60):
            body = {"portal_id": 7, "action_id": 8, "max_throughput": limit}
            assert (await call(daemon, "POST", "/api/config", body))[0] == 200
            request = parse(json.dumps(action_payload(portal_id=7, action_id=8)).encode())
            action = intake.build(request)
            assert action.policy["limit"] == limit


async def test_concurrent_writes_leave_memory_and_the_database_agreeing(daemon_factory, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        for _ in range(5):
            bodies = [{"portal_id": 7, "action_id": 8, "max_throughput": n} for n in range(1, 31)]
            await asyncio.gather(*(call(daemon, "POST", "/api/config", b) for b in bodies))
            with psycopg.connect(db_url) as conn:
                (stored,) = conn.execute("SELECT policy FROM action_configs").fetchone()
            assert (
                daemon.runtime.services.intake.action_configs[7, 8].limit
                == stored["max_throughput"]
            )


async def test_a_whole_rate_error_names_the_field_at_fault(daemon_factory):
    body = {
        "portal_id": 1,
        "action_id": 2,
        "max_throughput": 1,
        "start_at": "1970-01-01T00:00",
        "timezone": "Asia/Tokyo",
    }
    async with daemon_factory(**ADMIN) as daemon:
        status, answer = await call(daemon, "POST", "/api/config", body)
    assert status == 422
    assert [f["field"] for f in answer["fields"]] == ["start_at"]


async def test_a_stored_row_cannot_change_the_ids_shown(daemon_factory, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "INSERT INTO action_configs (portal_id, action_id, policy) VALUES (10, 7, %s)",
                ('{"portal_id": "spoof", "action_id": null, "max_throughput": 2, "x": 1}',),
            )
        status, shown = await call(daemon, "GET", "/api/config/10/7")
        assert (status, shown) == (200, {"portal_id": 10, "action_id": 7, "max_throughput": 2})
        status, page = await call(daemon, "GET", "/api/config")
        assert page["configs"] == [shown]
        beyond = "OTk5OTk5OTk5OTk5OTk5OTk5OTox"  # 9999999999999999999:1, past a bigint
        assert (await call(daemon, "GET", f"/api/config?cursor={beyond}"))[0] == 400


async def test_a_compressed_body_or_a_key_given_twice_is_refused(daemon_factory, db_url):
    async with daemon_factory(**ADMIN) as daemon:
        raw = b'{"portal_id": 1, "action_id": 2, "max_throughput": 0, "max_throughput": 3}'
        async with daemon.session.post(daemon.url + "/api/config", data=raw, headers=AUTH) as resp:
            answer = await resp.json()
            assert resp.status == 422
            assert answer["fields"][0]["field"] == "max_throughput"
        headers = {**AUTH, "Content-Encoding": "gzip"}
        async with daemon.session.post(
            daemon.url + "/api/config", data=b"x", headers=headers
        ) as resp:
            assert resp.status == 415
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM action_configs").fetchone() == (0,)
