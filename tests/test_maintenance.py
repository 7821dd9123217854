"""Maintenance passes, driven directly (run-once): deadline warnings, retention."""

from __future__ import annotations

import psycopg

from tests.conftest import action_payload, wait_for
from throttled import metrics
from throttled.daemon import maintain_once


async def test_backlog_that_outlives_its_deadline_is_reported(daemon_factory):
    # 1 per hour with a 10-minute block: the third action cannot go out in time.
    async with daemon_factory(hubspot={"block_expiration": "PT10M"}) as daemon:
        slow = {"maxThroughput": "1", "timeUnit": "hours", "queueName": "slow"}
        fast = {"maxThroughput": "100", "timeUnit": "hours", "queueName": "fine"}
        for _ in range(3):
            assert (await daemon.post_action(action_payload(input_fields=slow)))[0] == 200
            assert (await daemon.post_action(action_payload(input_fields=fast)))[0] == 200
        scheduler = daemon.runtime.scheduler
        # The check uses each queue's rate log, so wait until the scheduler tracks both.
        await wait_for(lambda: len(scheduler.queues) == 2)
        await maintain_once(daemon.runtime)
        at_risk = {scheduler.queues[q].key for q in scheduler.at_risk}
        assert at_risk == {"queue:62515:named:slow"}
        assert metrics.QUEUES_AT_RISK.read() == 1.0


async def test_retention_deletes_old_finished_rows_only(daemon_factory, db_url):
    async with daemon_factory(retention={"done_days": 1.0, "failed_days": 3.0}) as daemon:
        ids = []
        for _ in range(4):
            payload = action_payload(input_fields={"timeUnit": "days", "maxThroughput": "1"})
            await daemon.post_action(payload)
            ids.append(payload["callbackId"])
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "UPDATE actions SET state = 'done', completed_at = now() - interval '2 days' "
                "WHERE callback_id = %s",
                (ids[0],),
            )
            conn.execute(
                "UPDATE actions SET state = 'failed', completed_at = now() - interval '2 days' "
                "WHERE callback_id = %s",
                (ids[1],),
            )
            conn.execute(
                "UPDATE actions SET state = 'expired', completed_at = now() - interval '4 days' "
                "WHERE callback_id = %s",
                (ids[2],),
            )
        await maintain_once(daemon.runtime)
        with psycopg.connect(db_url) as conn:
            left = {r[0] for r in conn.execute("SELECT callback_id FROM actions")}
        assert left == {ids[1], ids[3]}
