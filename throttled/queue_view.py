"""A queue as operators see it (the admin API and the CLI): backlog, effective rate and
where each part of it came from, next send, projected drain and whether it beats the
deadlines, failed and expired counts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from throttled import rates
from throttled.db.operator import QueueDetail, QueueStats
from throttled.db.repository import readable_json
from throttled.queues import QueueLimiter, QueueState, safe_policy
from throttled.steering import rate_as_fields

STATES = ("paused", "releasing", "held", "draining", "idle")
SORTS = ("backlog", "urgency", "id")
SOURCES = ("override", "input_fields", "config", "defaults")


@dataclass(frozen=True, slots=True)
class QueueFilter:
    """What a listing keeps."""

    portal_id: int | None = None
    state: str | None = None
    at_risk: bool | None = None

    def keeps(self, view: Mapping[str, Any]) -> bool:
        """Whether a queue's view passes."""
        if self.portal_id is not None and view["portal_id"] != self.portal_id:
            return False
        if self.state is not None and view["state"] != self.state:
            return False
        return self.at_risk is None or view["at_risk"] == self.at_risk


def _iso(ts: float | None) -> str | None:
    return None if ts is None or math.isnan(ts) else rates.iso_instant(ts)


def _datetime_iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _policy_json(policy: rates.RatePolicy) -> dict[str, Any]:
    out: dict[str, Any] = {
        **rate_as_fields(policy),
        "period_s": policy.period_s,
        "pacing": policy.pacing,
        "schedule": None if policy.schedule is None else policy.schedule.to_json(),
        "text": policy.describe(),
    }
    return out


def sources(
    detail: QueueDetail, config: rates.PolicySpec | None, defaults: rates.PolicySpec
) -> dict[str, str]:
    """Which source each part of the effective rate came from, as resolution takes them:
    the operator's override, the latest intake's input fields, the admin config, the
    defaults."""
    specs: list[tuple[str, rates.PolicySpec]] = []
    if isinstance(detail.override, dict) and detail.override:
        # (an unreadable override is not applied: see drain.supervisor._safe_policy)
        with contextlib.suppress(ValueError):
            specs.append(("override", rates.spec_from_mapping(detail.override, where="override")))
    if isinstance(detail.inputs, dict):
        specs.append(("input_fields", rates.parse_input_fields(detail.inputs)[0]))
    if config is not None:
        specs.append(("config", config))
    specs.append(("defaults", defaults))

    def first(*names: str) -> str | None:
        return next(
            (name for name, spec in specs if all(getattr(spec, n) is not None for n in names)),
            None,
        )

    # (a part no source sets is absent: pacing then is "window", and there is no schedule)
    found = {
        "rate": first("limit", "period_s"),
        "pacing": first("pacing"),
        "release_days": first("days"),
        "release_hours": first("hours"),
        "timezone": first("tz"),
        "start_at": first("start_at"),
    }
    return {k: v for k, v in found.items() if v is not None}


def queue_view(
    detail: QueueDetail,
    stats: QueueStats | None,
    live: QueueState | None,
    *,
    config: rates.PolicySpec | None,
    defaults: rates.PolicySpec,
    now: float,
    held: int = 0,
    at_risk_known: bool | None = None,
) -> dict[str, Any]:
    """One queue's view. `live` is the daemon's own state of it (its limiter knows what was
    sent recently); without it (the CLI) the estimate starts from an empty rate window."""
    stats = stats or QueueStats()
    policy, fault = _policy(detail)
    if live is not None and live.limiter.fault is None:
        limiter = live.limiter  # (read only: a view never changes what the scheduler holds)
        policy = limiter.policy
    else:
        limiter = QueueLimiter(policy, key=detail.key)
        if live is not None and live.limiter.fault is not None:
            fault = live.limiter.fault
        if fault is not None or policy is None:
            limiter.hold(fault or "no policy")
    backlog = stats.pending + held  # (rows claimed and held in a sender are still to send)
    paused = detail.paused_at is not None
    normal = backlog - stats.released
    next_send = drains = None
    if normal > 0 and not paused:
        next_send = limiter.earliest(now)
        drains = limiter.backlog_eta(now, normal)
    oldest_deadline = stats.oldest_deadline.timestamp() if stats.oldest_deadline else None
    latest_deadline = stats.latest_deadline.timestamp() if stats.latest_deadline else None
    at_risk = (
        bool(
            normal > 0
            and latest_deadline is not None
            and (paused or (drains or 0) > latest_deadline)
        )
        if at_risk_known is None
        else at_risk_known
    )
    if paused:
        state = "paused"
    elif detail.releasing and stats.released:
        state = "releasing"
    elif limiter.fault is not None:
        state = "held"
    elif backlog:
        state = "draining"
    else:
        state = "idle"
    oldest_age = now - stats.oldest_received.timestamp() if stats.oldest_received else None
    return {
        "id": detail.id,
        "key": detail.key,
        "portal_id": detail.portal_id,
        "action_id": detail.action_id,
        "state": state,
        "paused": paused,
        "paused_at": _datetime_iso(detail.paused_at),
        "backlog": backlog,
        "released": stats.released,
        "oldest_pending_age_s": None if oldest_age is None else round(max(oldest_age, 0.0), 3),
        "rate": None if policy is None else _policy_json(policy),
        "held": limiter.fault,
        "rate_sources": sources(detail, config, defaults),
        "override": readable_json(detail.override),
        "next_send_at": _iso(next_send),
        "drains_at": _iso(drains),
        "oldest_deadline": _iso(oldest_deadline),
        "latest_deadline": _iso(latest_deadline),
        "beats_oldest_deadline": (
            None if drains is None or oldest_deadline is None else drains <= oldest_deadline
        ),
        "at_risk": at_risk,
        "failed": stats.failed,
        "expired": stats.expired,
        "created_at": _datetime_iso(detail.created_at),
        "updated_at": _datetime_iso(detail.updated_at),
    }


def _policy(detail: QueueDetail) -> tuple[rates.RatePolicy | None, str | None]:
    """The effective policy as the scheduler takes it (queues.safe_policy)."""
    policy, fault, _ = safe_policy(detail.policy, detail.override)
    return policy, fault


def urgency(view: Mapping[str, Any], now: float) -> float:
    """Seconds of slack before the latest pending action's deadline, once drained (less is
    more urgent); a queue with nothing to send is the least urgent."""
    if not view["backlog"]:
        return math.inf
    latest = view["latest_deadline"]
    drains = view["drains_at"]
    if latest is None:
        return math.inf
    end = datetime.fromisoformat(latest).timestamp()
    if drains in (None, "never") or view["paused"]:
        return end - now - 1e12  # never drains: ahead of every queue that does, by deadline
    return end - datetime.fromisoformat(drains).timestamp()


def sort_key(view: Mapping[str, Any], sort: str, now: float) -> tuple[float, int]:
    """A listing's order: largest backlog first, most urgent first, or by id."""
    if sort == "backlog":
        return (-float(view["backlog"]), view["id"])
    if sort == "urgency":
        return (urgency(view, now), view["id"])
    return (0.0, view["id"])


def ordered(
    views: Iterable[dict[str, Any]], sort: str, now: float
) -> list[tuple[tuple[float, int], dict[str, Any]]]:
    """Views with their sort keys, in order."""
    keyed = [(sort_key(v, sort, now), v) for v in views]
    keyed.sort(key=lambda kv: kv[0])
    return keyed
