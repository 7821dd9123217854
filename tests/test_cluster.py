"""Portal leases across instances (throttled/cluster.py): two Cluster objects, each with its own
pool as two processes would have, on one real PostgreSQL with short leases. Alone, an instance
takes every portal with work; a second one gets a fair share; a stopping one hands its portals
over at once; a killed one's are taken over once its leases expire; a lease lapses locally
before it expires in the database; and no portal is ever owned by two at once. Then the
operator's views: GET /api/cluster and `throttled cluster`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import config_mapping, wait_for
from tests.pg_proxy import pg_proxy
from throttled import cli, logs
from throttled import config as config_module
from throttled.cluster import Cluster
from throttled.config import ConfigError
from throttled.db.repository import Repository

TOKEN = "cluster-admin-token-0123456789abcdef"
ADMIN = {"admin": {"tokens": [{"id": "ops", "token": TOKEN}]}}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PORTALS = [101, 102, 103, 104, 105, 106]
_n = itertools.count(1)


@dataclass(eq=False)
class Member:
    """One instance's Cluster, its run() task, and what its callbacks were told."""

    cluster: Cluster
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    gained: dict[int, str | None] = field(default_factory=dict)  # portal -> previous owner
    lost: list[set[int]] = field(default_factory=list)

    async def on_gained(self, portals: set[int], previous: dict[int, str | None]) -> None:
        assert set(previous) == portals
        assert all(self.cluster.owns(p) for p in portals)  # (owned before it is told)
        self.gained.update(previous)

    async def on_lost(self, portals: set[int]) -> None:
        assert not any(self.cluster.owns(p) for p in portals)  # (no longer owned when told)
        self.lost.append(set(portals))

    def run(self) -> None:
        self.task = asyncio.create_task(self.cluster.run(self.stop_event))

    async def kill(self) -> None:
        """The process dies: its loop stops mid-way, nothing is handed back."""
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def end(self) -> None:
        self.stop_event.set()
        if self.task is not None and not self.task.done():
            await asyncio.wait_for(self.task, 30)


@contextlib.asynccontextmanager
async def member(url: str, lease_s: float, name: str, *, run: bool = True) -> AsyncIterator[Member]:
    """An instance on its own pool: started (and running, unless `run` is false)."""
    async with Repository.open(url, min_size=1, max_size=4) as repo:
        cluster = Cluster(repo, lease_s=lease_s, name=name)
        m = Member(cluster)
        cluster.on_gained, cluster.on_lost = m.on_gained, m.on_lost
        await cluster.start()
        if run:
            m.run()
        try:
            yield m
        finally:
            await m.end()
            await cluster.stop()


@contextlib.asynccontextmanager
async def observer(url: str) -> AsyncIterator[Repository]:
    async with Repository.open(url, min_size=1, max_size=2) as repo:
        yield repo


async def seed(repo: Repository, portals: list[int]) -> None:
    """A queue with one pending action for each portal: work that needs an owner."""
    for p in portals:
        n = next(_n)
        queue_id = await repo.pool.fetchval(
            "INSERT INTO queues (key, portal_id, policy) VALUES ($1, $2, '{}') RETURNING id",
            f"queue:{p}:1:{n}:0",
            p,
        )
        await repo.pool.execute(
            "INSERT INTO actions (callback_id, queue_id, portal_id, deadline)"
            " VALUES ($1, $2, $3, now() + interval '1 day')",
            f"cb-{p}-{n}",
            queue_id,
            p,
        )


async def leases(repo: Repository) -> dict[int, str]:
    """Valid leases by the database's clock: portal -> instance."""
    rows = await repo.pool.fetch(
        "SELECT portal_id, instance_id FROM portal_leases WHERE expires_at > now()"
    )
    return {r["portal_id"]: r["instance_id"] for r in rows}


@contextlib.asynccontextmanager
async def never_both(*members: Member) -> AsyncIterator[list[str]]:
    """Watch, every few milliseconds, that no portal is owned by two instances at once."""
    overlaps: list[str] = []

    async def sample() -> None:
        while True:
            owned = [(m.cluster.name, m.cluster.owned) for m in members]
            for (a, mine), (b, theirs) in itertools.combinations(owned, 2):
                if mine & theirs:
                    overlaps.append(f"{sorted(mine & theirs)} owned by {a} and {b}")
            await asyncio.sleep(0.005)

    task = asyncio.create_task(sample())
    try:
        yield overlaps
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def owners_agree(db: dict[int, str], *members: Member) -> bool:
    """Every valid lease is its instance's (and only its), as each instance reckons."""
    for m in members:
        mine = {p for p, owner in db.items() if owner == m.cluster.id}
        if m.cluster.owned != mine:
            return False
    return True


# --- ownership -------------------------------------------------------------------------------


async def test_alone_an_instance_takes_every_portal_with_work(db_url):
    async with observer(db_url) as db:
        await seed(db, PORTALS)
        async with member(db_url, 1.5, "a") as a:
            await wait_for(lambda: a.cluster.owned == set(PORTALS))
            assert a.gained == dict.fromkeys(PORTALS)  # (nobody owned them before)
            assert await leases(db) == dict.fromkeys(PORTALS, a.cluster.id)
            assert await db.owner_of([*PORTALS, 999]) == dict.fromkeys(PORTALS, a.cluster.id)
            assert all(a.cluster.owns(p) for p in PORTALS)
            assert not a.cluster.owns(999)
            # work for a new portal: taken at once, not at the next heartbeat
            await seed(db, [107])
            assert await a.cluster.acquire([107]) == {107}
            assert a.cluster.owns(107)
            assert a.lost == []


async def test_a_second_instance_gets_a_fair_share_and_no_portal_is_owned_by_both(db_url):
    async with observer(db_url) as db:
        await seed(db, PORTALS)
        async with member(db_url, 2.0, "a") as a:
            await wait_for(lambda: a.cluster.owned == set(PORTALS))
            async with member(db_url, 2.0, "b") as b, never_both(a, b) as overlaps:
                await wait_for(lambda: len(b.cluster.owned) == 3 and len(a.cluster.owned) == 3)
                assert a.cluster.owned | b.cluster.owned == set(PORTALS)
                assert set().union(*a.lost) == b.cluster.owned  # handed over, not taken
                assert owners_agree(await leases(db), a, b)
                # a portal another instance owns is not taken from it
                await seed(db, [107])
                assert await b.cluster.acquire([107]) == {107}
                assert await a.cluster.acquire([107]) == set()
                assert await db.owner_of([107]) == {107: b.cluster.id}
                # the balance holds over a few heartbeats
                await asyncio.sleep(2.0)
                assert not a.cluster.owned & b.cluster.owned
                assert a.cluster.owned | b.cluster.owned == {*PORTALS, 107}
            assert overlaps == []


async def test_a_stopping_instance_hands_its_portals_over_at_once(db_url):
    lease_s = 120.0  # heartbeats 40 s apart: whatever moves within the test moved by NOTIFY
    async with observer(db_url) as db:
        await seed(db, PORTALS)
        async with member(db_url, lease_s, "a") as a:
            await wait_for(lambda: a.cluster.owned == set(PORTALS))
            async with member(db_url, lease_s, "b") as b, never_both(a, b) as overlaps:
                await wait_for(lambda: len(b.cluster.owned) == 3, timeout=lease_s / 4)
                held_by_a = a.cluster.owned
                await a.cluster.stop()  # (its run() ends too)
                assert a.cluster.owned == set()
                assert a.task is not None
                await asyncio.wait_for(a.task, 10)
                await wait_for(lambda: b.cluster.owned == set(PORTALS), timeout=lease_s / 4)
                assert {p: b.gained[p] for p in held_by_a} == dict.fromkeys(held_by_a)
                assert await leases(db) == dict.fromkeys(PORTALS, b.cluster.id)
                stopped = await db.pool.fetchval(
                    "SELECT stopped_at IS NOT NULL FROM instances WHERE id = $1", a.cluster.id
                )
                assert stopped
            assert overlaps == []


async def test_a_killed_instance_s_portals_are_taken_over_once_its_leases_expire(db_url):
    lease_s = 1.5
    async with observer(db_url) as db:
        await seed(db, PORTALS[:4])
        async with member(db_url, lease_s, "a") as a:
            await wait_for(lambda: a.cluster.owned == set(PORTALS[:4]))
            await a.kill()  # no stop(): the leases stay until they expire
            async with member(db_url, lease_s, "b") as b, never_both(a, b) as overlaps:
                await wait_for(lambda: b.cluster.owned == set(PORTALS[:4]))
                # taken over from a: the scheduler will reset what a left claimed
                assert b.gained == dict.fromkeys(PORTALS[:4], a.cluster.id)
                assert await leases(db) == dict.fromkeys(PORTALS[:4], b.cluster.id)
                assert a.cluster.owned == set()  # (its own reckoning had let them go)
            assert overlaps == []


async def test_leases_lapse_locally_before_they_expire_in_the_database(db_url):
    lease_s = 6.0
    async with observer(db_url) as db, pg_proxy(db_url) as proxy:
        await seed(db, PORTALS[:3])
        valid_in_db: list[int] = []
        checked = asyncio.Event()
        async with member(proxy.url_for(db_url), lease_s, "a") as a:
            await wait_for(lambda: a.cluster.owned == set(PORTALS[:3]))
            told = a.on_lost

            async def on_lost(portals: set[int]) -> None:
                await told(portals)
                # (the database, not through the proxy: the leases are still a's there)
                valid = await leases(db)
                valid_in_db.extend(p for p in portals if valid.get(p) == a.cluster.id)
                checked.set()

            a.cluster.on_lost = on_lost
            proxy.cut()  # renewals fail from here on
            await asyncio.wait_for(checked.wait(), timeout=lease_s * 3)
            assert not any(a.cluster.owns(p) for p in PORTALS[:3])
            assert sorted(valid_in_db) == PORTALS[:3]
            proxy.restore()
            # the database answers again: the leases nobody took over are a's again
            await wait_for(lambda: a.cluster.owned == set(PORTALS[:3]), timeout=lease_s * 5)
            assert a.gained == dict.fromkeys(PORTALS[:3], a.cluster.id)


async def test_a_request_may_last_only_while_the_lease_cannot_have_expired(db_url):
    """lease_left (how long a request started now may last) never reaches past the lease's
    expiry in the database. Once the database is cut off, it is 0 at once (sending is
    suspended: the listening connection was closed), and the lease lapses here while it is
    still valid there (renewals failing); once the database is back, a heartbeat resumes."""
    lease_s = 4.5
    portal = PORTALS[0]
    expiry = (
        "SELECT extract(epoch FROM expires_at - now())::float8 FROM portal_leases"
        " WHERE portal_id = $1"
    )
    async with observer(db_url) as db, pg_proxy(db_url) as proxy:
        await seed(db, [portal])
        async with member(proxy.url_for(db_url), lease_s, "a") as a:
            await wait_for(lambda: a.cluster.owned == {portal})
            for _ in range(10):
                left = a.cluster.lease_left(portal)
                assert 0 < left <= min(lease_s, await db.pool.fetchval(expiry, portal))
                await asyncio.sleep(0.05)
            assert a.cluster.lease_left(PORTALS[1]) == 0.0  # (not ours)
            proxy.cut()
            await wait_for(lambda: a.cluster.lease_left(portal) == 0.0, timeout=lease_s / 3)
            assert a.cluster.suspended
            assert a.cluster.owns(portal)  # (not lapsed yet: only no request starts)
            samples = 0
            while a.cluster.owns(portal):
                db_left = await db.pool.fetchval(expiry, portal)
                assert a.cluster.lease_left(portal) == 0.0
                samples += 1
                await asyncio.sleep(0.05)
            assert await db.pool.fetchval(expiry, portal) > 0  # lapsed here first
            assert samples > 5
            assert db_left > 0
            proxy.restore()
            await wait_for(lambda: not a.cluster.suspended, timeout=lease_s * 3)


async def test_a_handed_back_portal_goes_to_the_instance_with_room(db_url):
    async with observer(db_url) as db:
        await seed(db, PORTALS[:3])
        async with member(db_url, 60.0, "a") as a:
            await wait_for(lambda: a.cluster.owned == set(PORTALS[:3]))
            async with member(db_url, 60.0, "b") as b, never_both(a, b) as overlaps:
                await wait_for(lambda: len(b.cluster.owned) == 1, timeout=15)  # (fair: 2 each)
                portal = min(a.cluster.owned)
                assert await a.cluster.release([portal, 999]) == {portal}
                assert not a.cluster.owns(portal)
                assert {portal} in a.lost
                await wait_for(lambda: b.cluster.owns(portal), timeout=15)  # (by NOTIFY)
                assert len(a.cluster.owned) == 1
            assert overlaps == []


def test_a_lease_must_be_a_positive_number_of_seconds():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="lease_s"):
            Cluster(None, lease_s=bad)  # type: ignore[arg-type]
    cluster = Cluster(None, lease_s=0.5, name="x" * 500)  # type: ignore[arg-type]
    assert len(cluster.name) == config_module.MAX_INSTANCE_NAME
    assert cluster.owned == set()
    assert not cluster.owns(1)


# --- config ----------------------------------------------------------------------------------


def test_the_cluster_section_is_validated():
    cfg = config_module.from_mapping({})
    assert (cfg.cluster.lease_s, cfg.cluster.instance_name) == (15.0, "")
    for raw, message in (
        ({"lease_s": 2.9}, "cluster.lease_s: must be 3..600"),
        ({"lease_s": 601}, "cluster.lease_s: must be 3..600"),
        ({"instance_name": "x" * 101}, "cluster.instance_name: at most 100 characters"),
        ({"instance_name": 7}, "cluster.instance_name: expected a string"),
        ({"lease": 7}, "unknown config key cluster.lease"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_module.validate(config_module.from_mapping({"cluster": raw}))
    cfg = config_module.from_mapping({"cluster": {"lease_s": 3, "instance_name": "vm-1"}})
    config_module.validate(cfg)
    env = config_module._apply_env({}, {"THROTTLED_CLUSTER_LEASE_S": "30"})
    assert config_module.from_mapping(env).cluster.lease_s == 30.0


# --- the operator's views ----------------------------------------------------------------------


async def test_the_cluster_api_lists_instances_heartbeats_and_portals(daemon_factory, db_url):
    async with daemon_factory(**ADMIN, cluster={"lease_s": 5.0}) as daemon:
        url = daemon.url + "/api/cluster"
        async with daemon.session.get(url) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        async with observer(db_url) as db:
            await seed(db, PORTALS[:2])
            async with member(db_url, 5.0, "api-a") as a:
                both = (a.cluster, daemon.runtime.cluster)  # (the daemon is a member too)
                await wait_for(lambda: all(len(c.owned) == 1 for c in both))
                async with daemon.session.get(url, headers=AUTH) as resp:
                    assert resp.status == 200
                    body = await resp.json()
                owned = sorted(a.cluster.owned)
            assert body["lease_s"] == 5.0
            (mine,) = [i for i in body["instances"] if i["id"] == a.cluster.id]
            assert mine["name"] == "api-a"
            assert mine["live"] is True
            assert mine["stopped_at"] is None
            assert (mine["portals"], mine["portal_count"]) == (owned, 1)
            (daemon_view,) = [i for i in body["instances"] if i["id"] == daemon.runtime.cluster.id]
            assert daemon_view["portals"] == sorted(set(PORTALS[:2]) - set(owned))
            assert 0 <= mine["heartbeat_age_s"] < 5.0
            assert set(mine) == {
                "id",
                "name",
                "started_at",
                "heartbeat_at",
                "heartbeat_age_s",
                "stopped_at",
                "live",
                "portals",
                "portal_count",
            }
            async with daemon.session.get(url, headers=AUTH) as resp:  # (after its stop)
                (mine,) = [i for i in (await resp.json())["instances"] if i["id"] == a.cluster.id]
            assert (mine["live"], mine["portals"], mine["portal_count"]) == (False, [], 0)
            assert mine["stopped_at"] is not None


async def test_the_cluster_api_needs_an_admin_token_configured(daemon_factory):
    async with (
        daemon_factory() as daemon,
        daemon.session.get(daemon.url + "/api/cluster", headers=AUTH) as resp,
    ):
        assert resp.status == 403
        assert (await resp.json())["error"] == "admin_disabled"


@pytest.fixture
def cli_config(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config file for this test's database; nothing from the environment."""
    for name in list(os.environ):
        if name.startswith("THROTTLED_") and not name.startswith("THROTTLED_TEST_"):
            monkeypatch.delenv(name)
    for name in config_module.LEGACY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(logs, "setup", lambda *args, **kwargs: None)
    raw = config_mapping(db_url, "http://127.0.0.1:9", cluster={"lease_s": 30.0})
    path = tmp_path / "throttled.toml"
    path.write_text(
        "".join(
            f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
            for section, values in raw.items()
        )
    )
    return path


async def _cli(capsys: Any, path: Path, *argv: str) -> tuple[int, str, str]:
    """`throttled ...` in this process, off this event loop (the CLI runs its own)."""
    capsys.readouterr()  # (what this test logged before)
    code = await asyncio.to_thread(cli.main, [*argv, "--config", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


async def test_the_cluster_command_prints_a_table_or_the_api_json(cli_config, db_url, capsys):
    code, out, err = await _cli(capsys, cli_config, "cluster")
    assert (code, err) == (0, "")
    assert out.startswith("no instance has registered yet")
    async with observer(db_url) as db:
        await seed(db, PORTALS)
        async with member(db_url, 30.0, "cli-a", run=False) as a:
            assert await a.cluster.acquire(PORTALS) == set(PORTALS)
            code, out, err = await _cli(capsys, cli_config, "cluster")
            assert (code, err) == (0, "")
            header, row, summary = out.strip().splitlines()
            assert header.split()[0] == "ID"
            assert header.split()[-2:] == ["PORTALS", "OWNS"]
            assert row.split()[:3] == [a.cluster.id, "cli-a", "live"]
            assert row.split()[-1] == ",".join(map(str, PORTALS))
            assert summary == "(1 live; a lease lasts 30s unrenewed)"
            code, out, err = await _cli(capsys, cli_config, "cluster", "--json")
            assert (code, err) == (0, "")
            view = json.loads(out)
            assert view["lease_s"] == 30.0
            (instance,) = view["instances"]
            assert (instance["id"], instance["portals"]) == (a.cluster.id, PORTALS)
        code, out, err = await _cli(capsys, cli_config, "cluster")  # (stopped: handed back)
        assert out.splitlines()[1].split()[2:3] == ["stopped"]
        assert out.strip().endswith("(0 live; a lease lasts 30s unrenewed)")


def test_the_cluster_command_has_help_with_an_example(capsys):
    assert cli.main(["cluster", "--help"]) == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert "throttled cluster --json" in out
