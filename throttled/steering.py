"""Operator changes: throttle configs, queue rate overrides, pauses, retries and releases.

Each change is one transaction: the change, its audit entry, the change counter, and a
NOTIFY (delivered at commit) that every daemon on the database acts on. The daemon's own
changes (the admin API) are then taken up at once; the CLI's reach the daemon through the
notification, or, if that is lost, through the counter it polls (see changes.py).

Which actions a config change affects: every action not yet sent in a queue whose latest
intake came from that (portal, action definition), for the fields that the workflow's input
fields and an operator's override do not set; then every new action.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from throttled import rates
from throttled.db.operator import QueueDetail
from throttled.db.repository import Repository, readable_json
from throttled.intake import Intake

if TYPE_CHECKING:
    from throttled.drain.supervisor import Supervisor

log = structlog.get_logger(__name__)

MAX_QUEUE_ID = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")
_RATE_KEYS = ("max_throughput", "time_period", "time_unit")
_UNITS = (("days", 86_400), ("hours", 3_600), ("minutes", 60), ("seconds", 1))


class QueueNotFound(LookupError):
    """No queue has this id or key."""


def queue_ident(text: str) -> int | str | None:
    """A queue's id (digits) or key (`queue:...`, as the path gave it, decoded); None if it
    can be neither."""
    if _DIGITS.fullmatch(text):
        number = int(text)
        return number if 1 <= number <= MAX_QUEUE_ID else None
    if text.startswith("queue:") and len(text) <= 400 and text.isprintable():
        return text  # (PostgreSQL text holds no NUL: such a key names no queue)
    return None


def rate_as_fields(policy: rates.RatePolicy) -> dict[str, Any]:
    """A policy's rate as the original's three fields, in the largest exact unit."""
    period = policy.period_s
    for unit, seconds in _UNITS:
        count = period / seconds
        if count >= 1 and count.is_integer():
            return {"max_throughput": policy.limit, "time_period": int(count), "time_unit": unit}
    return {"max_throughput": policy.limit, "time_period": period, "time_unit": "seconds"}


def complete_override(override: Mapping[str, Any], current: rates.RatePolicy) -> dict[str, Any]:
    """An override that names part of the rate gets the rest from the queue's current rate
    (`{"max_throughput": 5}` on "10 per minute" is 5 per minute)."""
    out = dict(override)
    if any(key in out for key in _RATE_KEYS):
        fields = rate_as_fields(current)
        if "time_unit" in out and "time_period" not in out:
            fields["time_period"] = 1
        out = {**fields, **out}
    return out


def readable_config(stored: Any) -> rates.PolicySpec | None:
    """A stored config as a rate source; None if it cannot be read (reported)."""
    try:
        if not isinstance(stored, dict):
            raise ValueError(f"not an object: {type(stored).__name__}")
        return rates.spec_from_mapping(stored, where="action_config")
    except Exception as exc:  # a stored row: anything may be in it
        log.error("action_config_invalid", error=str(exc)[:300])
        return None


class Steering:
    """The operator's changes, shared by the admin API and the CLI."""

    def __init__(
        self, repo: Repository, intake: Intake, *, scheduler: Supervisor | None = None
    ) -> None:
        self.repo = repo
        self.intake = intake
        self.scheduler = scheduler
        self.lock = asyncio.Lock()  # one change at a time: memory and database end the same
        self.own_versions: set[int] = set()  # changes made here, already taken up
        # A portal connected or disconnected elsewhere (the daemon's token store's reread)
        self.on_portal: Callable[[int], Awaitable[None]] | None = None

    async def find_queue(self, text: str) -> QueueDetail:
        """A queue by id or key; QueueNotFound otherwise."""
        ident = queue_ident(text)
        found = None if ident is None else await self.repo.find_queue(ident)
        if found is None:
            raise QueueNotFound(text[:200])
        return found

    # -- configs ----------------------------------------------------------------------------

    async def set_config(
        self, actor: str, portal_id: int, action_id: int, policy: dict[str, Any] | None
    ) -> bool:
        """Store (or, with None, delete) a config, re-resolve the queues it rates and record
        it; whether anything changed (False: a delete of a config that is not there)."""
        spec = None if policy is None else rates.spec_from_mapping(policy, where="config")
        target = f"config:{portal_id}:{action_id}"
        async with self.lock:
            async with self.repo.transaction() as tx:
                before = await tx.get_action_config(portal_id, action_id)
                if policy is None:
                    if not await tx.delete_action_config(portal_id, action_id):
                        return False
                else:
                    await tx.set_action_config(portal_id, action_id, policy)
                changed = await self._reresolve(tx, portal_id, action_id, spec)
                action = "config.delete" if policy is None else "config.set"
                await tx.add_audit(actor, action, target, before, policy)
                self._own(
                    await tx.announce({"configs": [[portal_id, action_id]], "queues": changed})
                )
            self.intake.set_config(portal_id, action_id, spec)
            await self._refresh(changed)
        return True

    async def _reresolve(
        self, tx: Repository, portal_id: int, action_id: int, spec: rates.PolicySpec | None
    ) -> list[int]:
        """Queues of this action definition get the policy their latest intake's inputs
        resolve to under the new config; the ids of those that changed."""
        changed: list[int] = []
        cache: dict[str, dict[str, Any]] = {}
        for row in await tx.queues_of_action(portal_id, action_id):
            inputs = row["inputs"]
            if not isinstance(inputs, dict):  # unknown (a queue older than this record)
                continue
            key = json.dumps(inputs, sort_keys=True, default=str)
            if key not in cache:
                try:
                    cache[key] = self.intake.resolve(inputs, spec)
                except ValueError as exc:
                    log.error("queue_reresolve_failed", queue_id=row["id"], error=str(exc)[:200])
                    continue
            if cache[key] != row["policy"]:
                await tx.set_queue_policy(row["id"], cache[key])
                changed.append(row["id"])
        return changed

    # -- queues -----------------------------------------------------------------------------

    async def pause(self, actor: str, queue: QueueDetail, paused: bool) -> QueueDetail:
        """Pause (or resume) a queue; kept across restarts."""
        async with self.lock:
            async with self.repo.transaction() as tx:
                if paused:
                    await tx.pause_queue(queue.id)
                else:
                    await tx.resume_queue(queue.id)
                after = await tx.find_queue(queue.id)
                await tx.add_audit(
                    actor,
                    "queue.pause" if paused else "queue.resume",
                    f"queue:{queue.id}",
                    {"paused": queue.paused_at is not None},
                    {"paused": paused},
                )
                self._own(await tx.announce({"queues": [queue.id]}))
            await self._refresh([queue.id])
        return after or queue

    async def set_override(
        self, actor: str, queue: QueueDetail, override: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """Set (or, with None, remove) a queue's rate override; the override stored."""
        if override is not None:
            try:
                current: rates.RatePolicy | None = _stored_policy(queue)
            except ValueError:
                current = None  # (held: only an override with a whole rate repairs it)
            if current is not None:
                override = complete_override(override, current)
            # (ValueError: the caller validated the fields; the whole must make a rate)
            specs = [rates.spec_from_mapping(override, where="override")]
            rates.resolve(specs if current is None else [*specs, _spec_of(queue)])
        async with self.lock:
            async with self.repo.transaction() as tx:
                await tx.set_override(queue.id, override)
                await tx.add_audit(
                    actor,
                    "queue.rate.clear" if override is None else "queue.rate.set",
                    f"queue:{queue.id}",
                    readable_json(queue.override),
                    override,
                )
                self._own(await tx.announce({"queues": [queue.id]}))
            await self._refresh([queue.id])
        return override

    async def retry_failed(self, actor: str, queue: QueueDetail) -> tuple[int, int]:
        """Failed actions go again: (retried, still failed because their block expired)."""
        async with self.lock:
            async with self.repo.transaction() as tx:
                retried, left = await tx.retry_failed(queue.id)
                await tx.add_audit(
                    actor,
                    "queue.retry_failed",
                    f"queue:{queue.id}",
                    None,
                    {"retried": retried, "not_retried_expired": left},
                )
                self._own(await tx.announce({"queues": [queue.id]}))
            await self._refresh([queue.id])
        return retried, left

    async def fail_pending(self, actor: str, queue: QueueDetail) -> int:
        """Release every pending action, to be completed FAIL_CONTINUE, with the rows this
        instance's sender held unsent; how many."""
        async with self.lock:
            held = self.scheduler.recall(queue.id) if self.scheduler is not None else []
            try:
                async with self.repo.transaction() as tx:
                    released = await tx.fail_pending(queue.id)
                    if held:
                        released += await tx.release_claimed([r.id for r in held])
                    await tx.add_audit(
                        actor,
                        "queue.fail_pending",
                        f"queue:{queue.id}",
                        None,
                        {"released": released, "complete_as": "FAIL_CONTINUE"},
                    )
                    # (the queue's owner, if another instance, takes back what its sender
                    # holds too: see apply)
                    announced = {"queues": [queue.id], "fail_held": [queue.id]}
                    self._own(await tx.announce(announced))
            except BaseException:
                if self.scheduler is not None:
                    self.scheduler.put_back(queue.id, held)
                raise
            await self._refresh([queue.id])
        return released

    async def _fail_held(self, queue_ids: list[int]) -> None:
        """Another instance failed these queues' pending rows: the rows this one's senders
        hold for them (claimed ahead, unsent) join the release."""
        if self.scheduler is None:
            return
        async with self.lock:
            for queue_id in queue_ids:
                held = self.scheduler.recall(queue_id)
                if not held:
                    continue
                try:
                    await self.repo.release_claimed([r.id for r in held])
                except BaseException:
                    self.scheduler.put_back(queue_id, held)
                    raise

    # -- taking up changes ------------------------------------------------------------------

    async def apply(self, change: Mapping[str, Any]) -> None:
        """A change another process announced: reload what it names."""
        if change.get("all") is True:
            await self.reload_all()
            return
        for pair in _pairs(change.get("configs")):
            stored = await self.repo.get_action_config(*pair)
            self.intake.set_config(*pair, None if stored is None else readable_config(stored))
        failed = change.get("fail_held")
        if isinstance(failed, list):
            await self._fail_held([i for i in failed[:10_000] if type(i) is int])
        ids = change.get("queues")
        if isinstance(ids, list):
            await self._refresh([i for i in ids[:10_000] if type(i) is int])
        portals = change.get("portals")
        if isinstance(portals, list) and self.on_portal is not None:
            for portal_id in portals[:1_000]:
                if type(portal_id) is int:
                    await self.on_portal(portal_id)

    async def reload_all(self) -> None:
        """Reload every config and every queue this instance tracks (the backstop)."""
        configs = await self.repo.action_configs()
        specs = {k: s for k, v in configs.items() if (s := readable_config(v)) is not None}
        self.intake.replace_configs(specs)
        if self.scheduler is not None:
            tracked = list(self.scheduler.queues)
            for start in range(0, len(tracked), 5_000):
                await self.scheduler.refresh(tracked[start : start + 5_000])
            await self.scheduler.refresh_releasing()
            await self.scheduler.refresh_active()  # (queues this instance never saw: imported)

    def _own(self, version: int) -> None:
        if len(self.own_versions) > 10_000:
            self.own_versions.clear()  # (a listener that never ran: the counter still works)
        self.own_versions.add(version)

    async def _refresh(self, queue_ids: list[int]) -> None:
        if self.scheduler is not None and queue_ids:
            await self.scheduler.refresh(queue_ids)


def _pairs(value: Any) -> list[tuple[int, int]]:
    if not isinstance(value, list):
        return []
    return [
        (p[0], p[1])
        for p in value[:1000]
        if isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)
    ]


def _stored_policy(queue: QueueDetail) -> rates.RatePolicy:
    """The policy intake resolved for the queue (ValueError if it cannot be read)."""
    if not isinstance(queue.policy, dict):
        raise ValueError("the queue's stored policy cannot be read")
    return rates.RatePolicy.from_json(queue.policy)


def _spec_of(queue: QueueDetail) -> rates.PolicySpec:
    from throttled.queues import policy_as_spec

    return policy_as_spec(_stored_policy(queue))
