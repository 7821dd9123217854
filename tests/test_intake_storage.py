"""From a parsed request to its stored row: NUL checks, the one-parameter INSERT, isolation."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import ManualClock, action_payload, eventually, wait_for
from throttled.db.repository import DatabaseError, NewAction, Repository
from throttled.hubspot.action import PayloadError, parse
from throttled.ingest import Ingest

POLICY = {"limit": 1, "period_s": 86400.0}


def _parse(payload: dict[str, Any]) -> Any:
    return parse(json.dumps(payload).encode())


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"a": "x\x00y"}, "inputFields"),
        ({"a\x00": "x"}, "inputFields"),
        ({"ok": "x", "b": 1, "c": "\x00"}, "inputFields"),
        # Every value's type is checked before any NUL, as before.
        ({"a": "x\x00", "b": {"nested": 1}}, "inputFields.b"),
    ],
)
def test_nul_in_input_fields_names_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(PayloadError) as caught:
        _parse(action_payload(input_fields=fields))
    assert caught.value.field == field


def test_escaped_backslash_u0000_text_is_not_a_nul() -> None:
    # The six characters \u0000 (an escaped backslash in the JSON) are ordinary text.
    body = b'"inputFields": {"a": "\\\\u0000", "b": "\\u005cu0000"}'
    payload = json.dumps(action_payload()).encode().replace(b'"inputFields": {}', body)
    assert parse(payload).input_fields == {"a": "\\u0000", "b": "\\u0000"}


def test_body_is_strict_utf8_json() -> None:
    payload = action_payload(input_fields={"maxThroughput": "5", "name": "Zoë"})
    text = json.dumps(payload, ensure_ascii=False)
    # a UTF-8 byte order mark is ignored (RFC 8259 §8.1)
    assert parse(b"\xef\xbb\xbf" + text.encode()).input_fields["name"] == "Zoë"
    for body in (
        text.encode("utf-16"),  # JSON between systems is UTF-8 (RFC 8259 §8.1)
        text.encode("latin-1"),  # "ë" is not valid UTF-8
    ):
        with pytest.raises(PayloadError) as caught:
            parse(body)
        assert caught.value.field == "body"


def test_integers_past_64_bits_read_as_numbers() -> None:
    body = json.dumps(action_payload()).encode()
    body = body.replace(b'"inputFields": {}', b'"inputFields": {"n": 123456789012345678901234}')
    assert parse(body).input_fields["n"] == pytest.approx(1.2345678901234568e23)
    big_portal = json.dumps(action_payload()).encode()
    big_portal = big_portal.replace(b'"portalId": 62515', b'"portalId": ' + b"9" * 25)
    with pytest.raises(PayloadError) as caught:
        parse(big_portal)
    assert caught.value.field == "origin.portalId"


def _action(callback_id: str, **kw: Any) -> NewAction:
    values: dict[str, Any] = {
        "queue_key": "queue:1:named:storage",
        "portal_id": 1,
        "priority": 0,
        "deadline": 1_900_000_000.5,
        "policy": POLICY,
        "workflow_id": 10,
        "object_type": "CONTACT",
        "object_id": "42",
        "input_fields": {},
        **kw,
    }
    return NewAction(callback_id=callback_id, **values)


async def _queue_id(repo: Repository) -> int:
    [row] = await repo.upsert_queues(["queue:1:named:storage"], [1], [POLICY])
    return row.id


async def _rows(repo: Repository) -> list[dict[str, Any]]:
    records = await repo.pool.fetch(
        "SELECT callback_id, queue_id, portal_id, priority, deadline, workflow_id, object_type,"
        " object_id, input_fields, state FROM actions ORDER BY id"
    )
    return [dict(r) for r in records]


SPECIAL = "é ß 中文 😀 \"quoted\" 'single' back\\slash \\u0000 \t\n\r \x01\x1f \u2028 %s $1 ;--"


async def test_insert_round_trips_nulls_unicode_and_special_characters(db_url: str) -> None:
    fields = {
        "text": SPECIAL,
        SPECIAL: "a key too",
        "big": 12345678901234567890,
        "negative": -(2**63),
        "float": 0.1,
        "tiny": 1e-300,
        "true": True,
        "none": None,
        "empty": "",
    }
    actions = [
        _action(
            "cb-1 " + SPECIAL,
            priority=1_000_000,
            deadline=1_900_000_000.123456,
            object_type="Ünïcode 😀",
            object_id=SPECIAL,
            input_fields=fields,
        ),
        _action(
            "cb-2",
            priority=-1_000_000,
            workflow_id=None,
            object_type=None,
            object_id=None,
            input_fields={},
        ),
        _action("cb-3", deadline=1_900_000_000.5),
    ]
    async with Repository.open(db_url, min_size=1, max_size=2) as repo:
        queue_id = await _queue_id(repo)
        await repo.insert_actions(actions, [queue_id] * 3)
        # A duplicate callback_id, alone or in a batch, is ignored and changes nothing.
        await repo.insert_actions(
            [_action("cb-2", priority=5, object_type="other"), _action("cb-4")], [queue_id] * 2
        )
        rows = await _rows(repo)

    assert [r["callback_id"] for r in rows] == ["cb-1 " + SPECIAL, "cb-2", "cb-3", "cb-4"]
    for row, action in zip(rows, [*actions, _action("cb-4")], strict=True):
        assert row["queue_id"] == queue_id
        assert row["portal_id"] == action.portal_id
        assert row["priority"] == action.priority
        assert row["workflow_id"] == action.workflow_id
        assert row["object_type"] == action.object_type
        assert row["object_id"] == action.object_id
        assert row["input_fields"] == action.input_fields
        assert row["state"] == "pending"
        # Microsecond precision (PostgreSQL rounds the float to the microsecond).
        expected = datetime.fromtimestamp(action.deadline, UTC)
        assert abs(row["deadline"] - expected) <= timedelta(microseconds=1)
    assert rows[1]["workflow_id"] is None
    assert rows[1]["object_type"] is None
    assert rows[1]["object_id"] is None
    assert rows[0]["input_fields"]["big"] == 12345678901234567890
    assert type(rows[0]["input_fields"]["float"]) is float
    assert rows[2]["deadline"] == datetime(2030, 3, 17, 17, 46, 40, 500000, tzinfo=UTC)


@pytest.mark.parametrize(
    "bad",
    [
        {"input_fields": {"x": "nul \x00"}},  # jsonb has no U+0000
        {"callback_id": "lone \ud800 surrogate"},  # not valid Unicode
        {"object_id": "lone \udfff surrogate"},
    ],
)
async def test_a_row_that_cannot_be_stored_fails_alone(
    db_url: str, bad: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Repository.open(db_url, min_size=1, max_size=3) as repo:
        await _queue_id(repo)
        sizes: list[int] = []
        insert = Repository.insert_actions

        async def counted(self: Repository, actions: list[NewAction], ids: list[int]) -> None:
            sizes.append(len(actions))
            await insert(self, actions, ids)

        # (on the class: the flusher runs its statements over a Repository of its own)
        monkeypatch.setattr(Repository, "insert_actions", counted)
        ingest = Ingest(repo, batch_max=100, max_pending=100, flushers=1)
        stop = asyncio.Event()
        runner = asyncio.create_task(ingest.run(stop))
        await ingest.submit(_action("warm"))  # the queue is known: the batch is one INSERT
        sizes.clear()
        fields = {"callback_id": "bad", **bad}
        actions = [_action("good-1"), _action(**fields), _action("good-2")]
        results = await asyncio.gather(*(ingest.submit(a) for a in actions), return_exceptions=True)
        stop.set()
        await runner
        rows = await _rows(repo)
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], DatabaseError), results[1]
    assert sizes == [3, 1, 1, 1]  # the batch failed as a whole, then row by row
    assert [r["callback_id"] for r in rows] == ["warm", "good-1", "good-2"]


async def _batches(repo: Repository, callback_ids: list[str]) -> list[list[str]]:
    """The given rows grouped by the INSERT that stored them (a batch shares its now())."""
    records = await repo.pool.fetch(
        "SELECT array_agg(callback_id ORDER BY callback_id) AS ids FROM actions"
        " WHERE callback_id = ANY($1) GROUP BY received_at ORDER BY min(id)",
        callback_ids,
    )
    return [list(r["ids"]) for r in records]


async def _waiting_on_a_lock(repo: Repository) -> bool:
    """Whether a statement of this database waits for a lock (the held commit's INSERT)."""
    waiting = await repo.pool.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE NOT l.granted AND a.datname = current_database()"
    )
    return bool(waiting)


@contextlib.asynccontextmanager
async def _held_commit(repo: Repository, ingest: Ingest) -> AsyncIterator[asyncio.Task[None]]:
    """A flusher's commit that waits until the block ends: another transaction has inserted
    the same callback_id and not committed yet, so ON CONFLICT makes the INSERT wait for it."""
    queue_id = await _queue_id(repo)
    async with repo.pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "INSERT INTO actions (callback_id, queue_id, portal_id, deadline)"
            " VALUES ('a', $1, 1, now() + interval '1 day')",
            queue_id,
        )
        held = asyncio.create_task(ingest.submit(_action("a")))
        await eventually(lambda: _waiting_on_a_lock(repo))  # its INSERT waits for the blocker
        yield held
        assert not held.done()
        await tx.commit()
    await asyncio.wait_for(held, timeout=20)


async def test_rows_arriving_during_a_commit_wait_for_it_and_go_together(db_url: str) -> None:
    # The overlap is measured on a clock that stands still: the free flusher may join in
    # only once the held commit has taken overlap_s by it, which here is never.
    clock = ManualClock()
    async with Repository.open(db_url, min_size=1, max_size=4) as repo:
        ingest = Ingest(
            repo, batch_max=100, max_pending=100, flushers=2, overlap_s=2.0, clock=clock
        )
        stop = asyncio.Event()
        runner = asyncio.create_task(ingest.run(stop))
        async with _held_commit(repo, ingest):
            b1 = asyncio.create_task(ingest.submit(_action("b1")))
            await wait_for(lambda: ingest.pending == 1 or b1.done())  # b1 first, then b2
            b2 = asyncio.create_task(ingest.submit(_action("b2")))
            await wait_for(lambda: ingest.pending == 2 or b2.done())
            # the free flusher has not started a commit of its own
            assert (b1.done(), b2.done()) == (False, False)
        await asyncio.wait_for(asyncio.gather(b1, b2), timeout=20)
        stop.set()
        await runner
        assert await _batches(repo, ["b1", "b2"]) == [["b1", "b2"]]


@pytest.mark.parametrize("overlap_s", [0.0, 0.3])
async def test_a_slow_commit_holds_the_next_back_no_longer_than_overlap(
    db_url: str, overlap_s: float
) -> None:
    # The overlap is measured on a clock the test moves: a commit beside the held one starts
    # once the clock has moved overlap_s past the latest commit's start, not before.
    clock = ManualClock()
    async with Repository.open(db_url, min_size=1, max_size=4) as repo:
        ingest = Ingest(
            repo, batch_max=100, max_pending=100, flushers=2, overlap_s=overlap_s, clock=clock
        )
        stop = asyncio.Event()
        runner = asyncio.create_task(ingest.run(stop))
        async with _held_commit(repo, ingest):
            # committed by the other flusher while the first commit is still held
            for name in ("b1", "b2"):
                row = asyncio.create_task(ingest.submit(_action(name)))
                if overlap_s:
                    await wait_for(lambda row=row: ingest.pending == 1 or row.done())
                    assert not row.done()  # held back: the clock has not moved
                    clock.advance(overlap_s)
                await asyncio.wait_for(row, timeout=20)
        stop.set()
        await runner
        assert await _batches(repo, ["b1", "b2"]) == [["b1"], ["b2"]]


def test_policy_follows_the_rate_fields_and_only_them() -> None:
    from throttled import rates
    from throttled.intake import Intake

    intake = Intake(
        defaults=rates.spec_from_mapping(
            {"max_throughput": 1, "time_period": 1, "time_unit": "days"}, where="defaults"
        ),
        block_expiration_s=3600.0,
        clock=lambda: 1_900_000_000.0,
    )

    def built(fields: dict[str, Any]) -> NewAction:
        return intake.build(_parse(action_payload(input_fields=fields)))

    ten = built({"maxThroughput": "10", "timeUnit": "seconds", "priority": "3", "x": "y"})
    assert (ten.policy["limit"], ten.policy["period_s"]) == (10, 1.0)
    assert ten.input_fields == {"maxThroughput": "10", "timeUnit": "seconds", "priority": "3"}
    assert ten.priority == 3
    # the same rate with another priority: the same policy; another rate: another policy
    again = built({"timeUnit": "seconds", "maxThroughput": "10", "priority": "-7"})
    assert again.policy == ten.policy
    assert again.priority == -7
    five = built({"maxThroughput": "5", "timeUnit": "minutes"})
    assert (five.policy["limit"], five.policy["period_s"]) == (5, 60.0)
    # no rate fields, or a value that is not a rate: the defaults
    for fields in ({}, {"maxThroughput": "lots", "timeUnit": "seconds"}):
        assert (built(fields).policy["limit"], built(fields).policy["period_s"]) == (1, 86400.0)


async def test_a_row_that_crashes_alone_leaves_no_submitter_waiting(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    insert = Repository.insert_actions

    async def crashing(self: Repository, actions: list[NewAction], ids: list[int]) -> None:
        if [a.callback_id for a in actions] == ["crash"]:
            raise RuntimeError("a bug, not a database error")
        await insert(self, actions, ids)

    monkeypatch.setattr(Repository, "insert_actions", crashing)
    async with Repository.open(db_url, min_size=1, max_size=3) as repo:
        await _queue_id(repo)
        ingest = Ingest(repo, batch_max=100, max_pending=100, flushers=1)
        stop = asyncio.Event()
        runner = asyncio.create_task(ingest.run(stop))
        # the NUL row fails the batch (row by row next), then "crash" crashes on its own
        actions = [
            _action("good-1"),
            _action("nul", input_fields={"x": "\x00"}),
            _action("crash"),
            _action("good-2"),
        ]
        results = await asyncio.wait_for(
            asyncio.gather(*(ingest.submit(a) for a in actions), return_exceptions=True), 20
        )
        stop.set()
        await runner
        rows = await _rows(repo)
    assert results[0] is None
    assert isinstance(results[1], DatabaseError)
    assert isinstance(results[2], DatabaseError)
    assert results[3] is None
    assert [r["callback_id"] for r in rows] == ["good-1", "good-2"]
