"""A queue's in-memory state, shared by the scheduler (claims) and the senders (sends)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import structlog

from throttled import metrics, rates

log = structlog.get_logger(__name__)

_PLACEHOLDER = rates.RatePolicy(limit=1, period_s=1.0)  # of a queue held from the start


class QueueLimiter(rates.Limiter):
    """A queue's limiter that contains faults: a policy that cannot be evaluated holds its
    queue (nothing is released, its actions wait, pending) and is reported, instead of
    raising into the scheduler, a sender or maintenance. A new policy ends the hold."""

    __slots__ = ("fault", "key")

    def __init__(self, policy: rates.RatePolicy | None, *, key: str) -> None:
        super().__init__(policy or _PLACEHOLDER)
        self.key = key
        self.fault: str | None = None

    def set_policy(self, policy: rates.RatePolicy) -> None:
        """Change the rate and end any hold."""
        super().set_policy(policy)
        self.fault = None

    def hold(self, reason: str) -> None:
        """Hold the queue: its policy cannot be evaluated."""
        if self.fault is None:
            metrics.QUEUE_POLICY_ERRORS.inc()
            log.error("queue_policy_held", queue=self.key, reason=reason[:300])
        self.fault = reason

    def allowance(self, at: float) -> int:
        """As Limiter.allowance; 0 while held."""
        if self.fault is None:
            try:
                return super().allowance(at)
            except Exception as exc:  # contained: the rest of the daemon goes on
                self._failed("allowance", at, exc)
        return 0

    def earliest(self, at: float) -> float:
        """As Limiter.earliest; never (inf) while held."""
        if self.fault is None:
            try:
                return super().earliest(at)
            except Exception as exc:
                self._failed("earliest", at, exc)
        return math.inf

    def plan(self, at: float, horizon_s: float, max_n: int) -> list[float]:
        """As Limiter.plan; nothing while held."""
        if self.fault is None:
            try:
                return super().plan(at, horizon_s, max_n)
            except Exception as exc:
                self._failed("plan", at, exc)
        return []

    def count_within(self, at: float, horizon_s: float, max_n: int) -> int:
        """As Limiter.count_within; 0 while held."""
        if self.fault is None:
            try:
                return super().count_within(at, horizon_s, max_n)
            except Exception as exc:
                self._failed("count_within", at, exc)
        return 0

    def backlog_eta(self, at: float, backlog: int) -> float:
        """As Limiter.backlog_eta; never (inf) while held."""
        if self.fault is None:
            try:
                return super().backlog_eta(at, backlog)
            except Exception as exc:
                self._failed("backlog_eta", at, exc)
        return math.inf

    def describe(self) -> str:
        """The rate, or why the queue is held."""
        if self.fault is not None:
            return f"held: {self.fault}"
        return self.policy.describe()

    def _failed(self, method: str, at: float, exc: Exception) -> None:
        self.hold(f"{method}({at!r}) raised {type(exc).__name__}: {exc}")


@dataclass(eq=False, slots=True)
class QueueState:
    """One queue: identity, effective rate policy and its exact-rate guard."""

    id: int
    key: str
    portal_id: int
    limiter: QueueLimiter
    override: dict[str, Any] | None = None
    sent: int = 0
    paused: bool = False  # an operator holds it: nothing is claimed, nothing kept in a sender
    releasing: bool = False  # rows an operator released (fail-pending) wait to be completed
    complete_as: str | None = None  # set on a release's own state: its rows' completion state


def release_of(queue: QueueState, state: str) -> QueueState:
    """The state that carries a queue's released rows (fail-pending) to the senders: its
    own limiter, which holds nothing back (the portal's budget still does), and nothing
    charged to the queue's rate."""
    unlimited = rates.RatePolicy(limit=rates.MAX_LIMIT, period_s=rates.MIN_PERIOD_S)
    return QueueState(
        id=queue.id,
        key=queue.key,
        portal_id=queue.portal_id,
        limiter=QueueLimiter(unlimited, key=f"{queue.key} (released)"),
        complete_as=state,
    )


def effective_policy(stored: dict[str, Any], override: dict[str, Any] | None) -> rates.RatePolicy:
    """The operator's override (a partial spec) over the policy resolved at intake. An
    override that is a whole rate stands alone when the stored policy cannot be read (so an
    operator can repair a queue held by one)."""
    if not override:
        return rates.RatePolicy.from_json(stored)
    spec = rates.spec_from_mapping(override, where="override")
    try:
        base = rates.RatePolicy.from_json(stored)
    except ValueError:
        return rates.resolve([spec])
    return rates.resolve([spec, policy_as_spec(base)])


def safe_policy(
    stored: Any, override: Any
) -> tuple[rates.RatePolicy | None, str | None, str | None]:
    """(policy, why it is held, why the override is not applied). A stored row may hold
    anything: an override that cannot be read is not applied (the stored policy is); a
    stored policy that cannot be read gives no policy, and the queue is held."""
    override_error = None
    try:
        return (
            effective_policy(stored, override if isinstance(override, dict) else None),
            None,
            None,
        )
    except Exception as exc:
        if override is not None:
            override_error = str(exc)[:300]
    try:
        if not isinstance(stored, dict):
            raise ValueError(f"not an object: {type(stored).__name__}")
        return rates.RatePolicy.from_json(stored), None, override_error
    except Exception as exc:
        return None, f"stored policy unreadable: {type(exc).__name__}: {str(exc)[:200]}", None


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
