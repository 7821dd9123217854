"""Fault 3: PostgreSQL unreachable under ingest load, then back.

Three ways: a PostgreSQL server of the test's own (embedded) really stopped (`pg_ctl stop
-m fast`: its connections are ended by the server) and started again; or the daemon reaches
PostgreSQL through the fault proxy, which either resets every connection and refuses new
ones (the host is down) or holds everything until the end (a network partition: nothing
comes back meanwhile). While
it lasts every answer is a 503 with Retry-After, never a 500 and never a 200 that was not
committed; within 5 s of its end every request is acknowledged again; nothing acknowledged is
lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import action_payload
from tests.daemon_process import fire, query
from tests.faults.conftest import Daemons, connect, scale
from tests.pg_proxy import pg_proxy
from throttled.db.embedded import start_blocking, stop_blocking
from throttled.hubspot.fake import FakeHubSpot

PORTAL = 62515
BACK_WITHIN_S = 5.0  # the bound for "back to normal"


Switch = Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def database(fault: str, db_url: str) -> AsyncIterator[tuple[str, str, Switch, Switch]]:
    """(the daemon's database URL, the URL to check it by, stop it, start it again)."""
    if fault != "stopped":
        async with pg_proxy(db_url) as proxy:

            async def cut() -> None:
                getattr(proxy, fault)()

            async def heal() -> None:
                proxy.heal()

            yield proxy.url_for(db_url), db_url, cut, heal
        return
    root = tempfile.mkdtemp(prefix="thr-pg-", dir="/tmp")  # (short: a Unix socket's path)
    server, url = await asyncio.to_thread(start_blocking, root)

    async def stop() -> None:
        await asyncio.to_thread(stop_blocking, server)

    async def start() -> None:  # (start_blocking would hand back the same, stopped handle)
        await asyncio.to_thread(server.ensure_postgres_running)

    try:
        yield url, url, stop, start
    finally:
        await asyncio.to_thread(stop_blocking, server)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("fault", ["stopped", "reset", "partition"])
@pytest.mark.timeout(scale(120, 300))
async def test_a_database_outage_under_load_is_503s_then_back_within_5_s(
    daemons: Daemons, fake_hubspot: FakeHubSpot, db_url: str, record: Any, fault: str
) -> None:
    outage_s = scale(6, 30)
    async with database(fault, db_url) as (daemon_url, check_url, down, up):
        # (a commit timeout well inside the outage: requests begun in it are answered in it)
        daemon = daemons(db_url_=daemon_url, ingest={"commit_timeout_s": 2.0})
        if fault == "stopped":
            await daemon.cli("migrate")
        await connect(daemon, fake_hubspot, PORTAL)
        await daemon.start()
        stop = threading.Event()
        load = asyncio.create_task(
            fire(daemon.url, lambda: action_payload(portal_id=PORTAL), stop, concurrency=10)
        )
        try:
            await asyncio.sleep(1.0)  # under load
            await down()
            down_at = time.time()  # (down from here: a stop takes a moment)
            await asyncio.sleep(outage_s)
            up_at = time.time()  # (still down until up() is done)
            await up()
            await asyncio.sleep(BACK_WITHIN_S + 1.5)
        finally:
            stop.set()
            outcomes = await load
        daemon.send_signal(signal.SIGTERM)
        code = await daemon.wait(60)
        acknowledged = {o.callback_id for o in outcomes if o.status == 200}
        [(stored,)] = await query(
            check_url,
            "SELECT count(*) FROM actions WHERE callback_id = ANY(%s)",
            sorted(acknowledged),
        )
    during = [o for o in outcomes if down_at < o.started and o.finished < up_at]
    # (a request that began in the outage cannot have been committed before it ended)
    false_acks = [o for o in during if o.status == 200]
    after = [o for o in outcomes if o.started > up_at]
    first_ok = min((o.finished for o in after if o.status == 200), default=None)
    settled = [o for o in after if o.started > up_at + BACK_WITHIN_S]
    seen = Counter(str(o.status) if o.status is not None else "no answer" for o in outcomes)
    record.update(
        fault=f"database {fault} for {outage_s:g} s under load",
        requests=len(outcomes),
        acknowledged=len(acknowledged),
        lost=len(acknowledged) - int(stored),
        answers=dict(seen),
        answers_in_outage=dict(Counter(str(o.status) for o in during)),
        back_after_s=None if first_ok is None else round(first_ok - up_at, 3),
    )
    assert code == 0, daemon.log_tail()
    assert int(stored) == len(acknowledged), record
    assert set(seen) <= {"200", "503"}, record  # no 500, and it answered throughout
    assert false_acks == [], false_acks[:3]
    assert during, "no request was answered during the outage"
    assert all(o.status == 503 and o.retry_after for o in during), record
    assert first_ok is not None, record
    assert first_ok - up_at <= BACK_WITHIN_S, record
    assert settled, record
    assert all(o.status == 200 for o in settled), Counter(o.status for o in settled)
