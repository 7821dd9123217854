"""The result writer after a statement fails part-way: what was written is not written again."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from throttled.db.repository import ClaimedAction, DatabaseError, Repository, Retry
from throttled.drain.outcomes import Outcome
from throttled.drain.result_writer import ResultWriter

FAIL_FAILED_WRITES = """
CREATE TABLE fail_flag ();
CREATE FUNCTION refuse_failed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.state = 'failed' AND EXISTS (SELECT 1 FROM fail_flag) THEN
    RAISE EXCEPTION 'injected: the failed write fails';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER refuse_failed BEFORE UPDATE ON actions FOR EACH ROW EXECUTE FUNCTION refuse_failed();
INSERT INTO fail_flag DEFAULT VALUES;
"""


async def test_a_retry_written_before_a_failure_is_not_written_again(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO queues (id, key, portal_id, policy) VALUES (1, 'q', 1, '{}'::jsonb)"
        )
        conn.execute(
            "INSERT INTO actions (callback_id, queue_id, portal_id, deadline)"
            " SELECT 'cb-' || g, 1, 1, now() + interval '1 day' FROM generate_series(1, 3) g"
        )
        conn.execute(FAIL_FAILED_WRITES)
    async with Repository.open(db_url, min_size=1, max_size=2) as repo:
        done, retried, failed = sorted(
            await repo.claim([1], [3], datetime.now(UTC)), key=lambda r: r.callback_id
        )
        queue: Any = SimpleNamespace(id=1)
        outcome = Outcome(
            done=[(done, time.time())],
            retry=[
                (
                    queue,
                    Retry(
                        id=retried.id, not_before=None, error="503", counted=True, split_group=None
                    ),
                )
            ],
            failed=[(failed, "400 rejected", None)],
        )
        writer = ResultWriter(repo)
        writer.add(outcome)
        with pytest.raises(DatabaseError):
            await writer.flush()  # done and retry written, then the failed write fails
        with psycopg.connect(db_url, autocommit=True) as conn:
            # meanwhile the retried row is claimed again, for another send
            conn.execute("UPDATE actions SET state = 'claimed' WHERE id = %s", (retried.id,))
            conn.execute("DELETE FROM fail_flag")
        await writer.flush()
    with psycopg.connect(db_url) as conn:
        states = dict(conn.execute("SELECT callback_id, state FROM actions").fetchall())
    assert states == {"cb-1": "done", "cb-2": "claimed", "cb-3": "failed"}


async def test_claimed_rows_are_built_positionally_as_by_name(db_url: str) -> None:
    """ClaimedAction.from_rows takes CLAIM's columns in order (the fast path): the rows it
    builds are those built by column name, and columns in another order are taken by name."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO queues (id, key, portal_id, policy) VALUES (1, 'q', 7, '{}'::jsonb)"
        )
        conn.execute(
            "INSERT INTO actions (callback_id, queue_id, portal_id, deadline, priority)"
            " SELECT 'cb-' || g, 1, 7, now() + interval '1 day', g FROM generate_series(1, 3) g"
        )
    async with Repository.open(db_url, min_size=1, max_size=2) as repo:
        claimed = await repo.claim([1], [3], datetime.now(UTC))
        raw = await repo.pool.fetch(
            "SELECT split_group, failures, attempts, deadline, priority, portal_id, queue_id,"
            " callback_id, id FROM actions ORDER BY id"
        )
    by_name = [ClaimedAction.from_row(r) for r in raw]
    assert ClaimedAction.from_rows(raw) == by_name  # (reordered columns: by name)
    assert sorted(claimed, key=lambda r: r.id) == by_name
    assert {(r.callback_id, r.portal_id, r.priority) for r in claimed} == {
        ("cb-1", 7, 1),
        ("cb-2", 7, 2),
        ("cb-3", 7, 3),
    }
