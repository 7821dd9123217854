"""Changes made elsewhere reach a daemon: a config set through one instance is in a second
instance's Intake at once by NOTIFY, and within the backstop interval when no notification
comes (a change counted but not announced, as after a lost listening connection)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import psycopg
import pytest

from tests.conftest import action_payload, wait_for
from throttled import rates
from throttled.changes import ChangeWatcher
from throttled.db.repository import Repository
from throttled.intake import Intake
from throttled.steering import Steering

TOKEN = "changes-admin-token-0123456789ab"
ADMIN = {"admin": {"tokens": [{"id": "ops", "token": TOKEN}]}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEFAULTS = rates.PolicySpec(limit=10, period_s=1.0)


@contextlib.asynccontextmanager
async def second_instance(
    db_url: str, check_s: float
) -> AsyncIterator[tuple[Intake, ChangeWatcher]]:
    """Another instance's Intake and watcher on the same database."""
    async with Repository.open(db_url) as repo:
        intake = Intake(defaults=DEFAULTS, block_expiration_s=3600, clock=time.time)
        watcher = ChangeWatcher(repo, Steering(repo, intake), check_s=check_s)
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        await wait_for(lambda: watcher.version is not None)
        try:
            yield intake, watcher
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


async def test_a_config_reaches_another_instance_at_once_by_notify(daemon_factory, db_url):
    # a backstop too slow to matter here: what arrives, arrives by NOTIFY
    async with daemon_factory(**ADMIN) as daemon, second_instance(db_url, 3600) as (intake, _):
        body = {"portal_id": 5, "action_id": 6, "max_throughput": 7, "time_unit": "minutes"}
        async with daemon.session.post(daemon.url + "/api/config", json=body, headers=AUTH) as r:
            assert r.status == 200
        await wait_for(lambda: (5, 6) in intake.action_configs, timeout=5)
        assert intake.action_configs[5, 6].limit == 7
        assert intake.action_configs[5, 6].period_s == 60.0
        async with daemon.session.delete(daemon.url + "/api/config/5/6", headers=AUTH) as r:
            assert r.status == 200
        await wait_for(lambda: (5, 6) not in intake.action_configs, timeout=5)


@pytest.mark.parametrize("check_s", [0.3])
async def test_an_unannounced_change_is_found_by_the_version_check(db_url, check_s):
    async with second_instance(db_url, check_s) as (intake, watcher):
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO action_configs (portal_id, action_id, policy) VALUES "
                '(8, 9, \'{"max_throughput": 2, "time_unit": "hours"}\')'
            )
            conn.execute("UPDATE change_counter SET version = version + 1")  # no NOTIFY
        await wait_for(lambda: (8, 9) in intake.action_configs, timeout=check_s * 20)
        assert intake.action_configs[8, 9].period_s == 3600.0
        assert watcher.applied >= 1


async def test_a_cli_pause_reaches_the_running_daemon(daemon_factory, fake_hubspot, db_url):
    """A change through a Steering of another process (the CLI's) pauses the daemon's queue."""
    async with daemon_factory(**ADMIN) as daemon:
        await daemon.connect_portal(fake_hubspot, 62515)
        fields = {"maxThroughput": "2", "timeUnit": "seconds"}
        ids = []
        for _ in range(8):
            payload = action_payload(input_fields=fields)
            assert (await daemon.post_action(payload))[0] == 200
            ids.append(payload["callbackId"])
        await wait_for(lambda: sum(c in fake_hubspot.completed for c in ids) >= 1)
        async with Repository.open(db_url) as repo:
            intake = Intake(defaults=DEFAULTS, block_expiration_s=3600, clock=time.time)
            steering = Steering(repo, intake)
            queue = await steering.find_queue("1")
            await steering.pause("cli:tester", queue, True)
        scheduler = daemon.runtime.scheduler
        await wait_for(lambda: scheduler.queues[queue.id].paused, timeout=5)
        sent = sum(c in fake_hubspot.completed for c in ids)
        await asyncio.sleep(1.2)
        assert sum(c in fake_hubspot.completed for c in ids) == sent
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT actor, action FROM audit_log").fetchall() == [
            ("cli:tester", "queue.pause")
        ]
