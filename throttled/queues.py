"""A queue's in-memory state, shared by the scheduler (claims) and the senders (sends)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from throttled import rates


@dataclass(eq=False, slots=True)
class QueueState:
    """One queue: identity, effective rate policy and its exact-rate guard."""

    id: int
    key: str
    portal_id: int
    limiter: rates.Limiter
    stored_policy: dict[str, Any]
    override: dict[str, Any] | None = None
    in_sender: int = 0  # claimed rows the sender holds, not yet dispatched
    active: bool = False  # may have claimable rows
    generation: int = 0  # bumped on every notification; a claim that raced one stays active
    held_until: float | None = None  # earliest retry backoff known to be pending
    next_at: float = float("inf")  # earliest claim time in the scheduler's heap
    claiming: bool = False  # a claim statement for this queue is in flight
    sent: int = 0


def effective_policy(stored: dict[str, Any], override: dict[str, Any] | None) -> rates.RatePolicy:
    """The operator's override (a partial spec) over the policy resolved at intake."""
    base = rates.RatePolicy.from_json(stored)
    if not override:
        return base
    spec = rates.spec_from_mapping(override, where="override")
    return rates.resolve([spec, policy_as_spec(base)])


def policy_as_spec(policy: rates.RatePolicy) -> rates.PolicySpec:
    """A full policy as the lowest-priority source."""
    schedule = policy.schedule
    if schedule is None:
        return rates.PolicySpec(limit=policy.limit, period_s=policy.period_s, pacing=policy.pacing)
    hours = (
        (schedule.start, schedule.end)
        if schedule.start is not None and schedule.end is not None
        else None
    )
    return rates.PolicySpec(
        limit=policy.limit,
        period_s=policy.period_s,
        pacing=policy.pacing,
        days=schedule.days,
        hours=hours,
        tz=schedule.tz,
        start_at=schedule.start_at,
    )
