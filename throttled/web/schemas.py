"""The shapes of the HTTP answers, as pydantic models, for the OpenAPI document only: the
handlers build plain dicts (on the hot path a model would cost time for nothing), and the
schemathesis test checks every answer against these. A closed shape forbids other keys, so
a key a handler adds without documenting it fails that test; an open one (a stored JSON
value, a row edited by hand) is typed `Any`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from throttled.db.cluster import MAX_LISTED_PORTALS
from throttled.web.config_api import Unit

# (queue_view.SOURCES and STATES as types; tests/test_openapi.py checks they agree)
Source = Literal["override", "input_fields", "config", "defaults"]
QueueState = Literal["paused", "releasing", "held", "draining", "idle"]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(_Closed):
    """One bad field of a request."""

    field: str
    message: str


class Error(_Closed):
    """Every JSON error answer: a stable code, a sentence, and what was wrong."""

    error: str = Field(description="a stable code, e.g. invalid_limit, queue_not_found")
    message: str
    field: str | None = Field(default=None, description="the parameter or field at fault")
    fields: list[Problem] | None = Field(default=None, description="every bad field (422)")


class Block(_Closed):
    """The answer to an accepted action: HubSpot holds the workflow until throttled completes
    the callback."""

    outputFields: dict[str, str] = Field(  # (HubSpot's names)
        description='{"hs_execution_state": "BLOCK", "hs_expiration_duration": "P...D"}'
    )


class ActionRequest(BaseModel):
    """The body HubSpot sends to a custom action's actionUrl (what throttled reads; the rest
    is allowed and ignored)."""

    model_config = ConfigDict(extra="allow")

    callbackId: str = Field(max_length=255)
    origin: dict[str, Any]
    context: dict[str, Any] | None = None
    object: dict[str, Any] | None = None
    inputFields: dict[str, Any] | None = None


class Status(_Closed):
    """A health probe's answer."""

    status: str = Field(
        description="ok, loop_stalled, ready, stopping, migrations_not_current or "
        "database_unavailable"
    )
    reason: str | None = Field(default=None, description="why the schema is not current")
    loop_lag_ms: float | None = Field(default=None, description="how late the loop last woke")
    loop_max_lag_ms: float | None = None
    last_tick_s_ago: float | None = None


class ConfigView(_Closed):
    """A stored throttle config: its ids, then the rate fields it holds."""

    portal_id: int
    action_id: int
    max_throughput: int | None = None
    time_period: int | None = None
    time_unit: Unit | None = None
    pacing: Literal["window", "even"] | None = None
    release_days: str | None = None
    release_hours: str | None = None
    timezone: str | None = None
    start_at: str | None = None


class ConfigPage(_Closed):
    """Configs in (portal, action) order."""

    configs: list[ConfigView]
    next_cursor: str | None = Field(description="the cursor of the next page, if any")


class ConfigDeleted(_Closed):
    """A config removed: new actions fall back to the defaults."""

    portal_id: int
    action_id: int
    deleted: Literal[True]


class AuditEntry(_Closed):
    """One change made through the admin API, the CLI or an install."""

    id: int
    at: AwareDatetime
    actor: str
    action: str
    target: str
    before: Any = Field(description="the value before (JSON; {unreadable} if unreadable)")
    after: Any


class AuditPage(_Closed):
    """Audit entries, newest first."""

    entries: list[AuditEntry]
    next_cursor: str | None


class ActionView(_Closed):
    """One action: its state, queue, attempts, last error and times."""

    id: int
    callback_id: str
    state: Literal["pending", "claimed", "done", "failed", "expired"]
    portal_id: int
    queue_id: int
    queue_key: str | None
    priority: int
    attempts: int
    failures: int
    last_error: str | None
    complete_as: str | None = Field(description="FAIL_CONTINUE once failed by an operator")
    received_at: AwareDatetime
    claimed_at: AwareDatetime | None
    sent_at: AwareDatetime | None
    completed_at: AwareDatetime | None
    not_before: AwareDatetime | None
    deadline: AwareDatetime


class Schedule(_Closed):
    """When a queue may release: weekdays (0 = Monday), local hours in a zone, a start."""

    days: list[int]
    start: str | None
    end: str | None
    tz: str
    start_at: str | None


class QueueRate(_Closed):
    """A queue's effective rate."""

    max_throughput: int
    time_period: int | float
    time_unit: Literal["seconds", "minutes", "hours", "days"]
    period_s: float
    pacing: Literal["window", "even"]
    schedule: Schedule | None
    text: str = Field(description="the rate in words")


class QueueView(_Closed):
    """A queue as operators see it. Times in the future are ISO 8601, or "never"."""

    id: int
    key: str
    portal_id: int
    action_id: int | None
    state: QueueState
    paused: bool
    paused_at: AwareDatetime | None
    backlog: int
    released: int = Field(description="pending actions marked to fail (fail-pending)")
    oldest_pending_age_s: float | None
    rate: QueueRate | None = Field(description="null when the stored rate cannot be read")
    held: str | None = Field(description="why nothing is sent, if held")
    rate_sources: dict[str, Source] = Field(
        description="where each part of the rate came from (rate, pacing, release_days, ...)"
    )
    override: Any = Field(description="the operator's override (stored JSON), or null")
    next_send_at: str | None
    drains_at: str | None
    oldest_deadline: str | None
    latest_deadline: str | None
    beats_oldest_deadline: bool | None
    at_risk: bool
    failed: int
    expired: int
    created_at: AwareDatetime
    updated_at: AwareDatetime


class QueuePage(_Closed):
    """Queues in the order asked for."""

    queues: list[QueueView]
    next_cursor: str | None


class QueueChanged(_Closed):
    """The queue after an operation (pause, resume, rate)."""

    queue: QueueView


class QueueRetried(_Closed):
    """The queue after retry-failed."""

    retried: int
    not_retried_block_expired: int
    queue: QueueView


class QueueFailed(_Closed):
    """The queue after fail-pending."""

    released: int = Field(description="pending actions that will be completed FAIL_CONTINUE")
    queue: QueueView


class Backlog(_Closed):
    """A portal's actions that are not done."""

    pending: int
    failed: int
    expired: int


class PortalView(_Closed):
    """A portal: its connection, token times, health and backlog (never a token)."""

    portal_id: int
    connection: Literal["connected", "not_connected", "disconnected"]
    disconnected_reason: str | None
    disconnected_at: AwareDatetime | None
    scopes: list[str]
    hub_domain: str | None
    token_expires_at: AwareDatetime | None
    last_refresh_at: AwareDatetime | None
    last_refresh_error: str | None
    connected_at: AwareDatetime | None
    health: Literal["healthy", "degraded", "unhealthy"]
    error_rate: float
    average_latency_ms: float | None
    consecutive_failures: int
    rate_limit: dict[str, int] | None = Field(description="HubSpot's last X-HubSpot-RateLimit-*")
    backlog: Backlog


class PortalPage(_Closed):
    """Every known portal."""

    portals: list[PortalView]


class PortalTest(_Closed):
    """A token-info call with a fresh token."""

    portal_id: int
    ok: bool
    latency_ms: float
    error: str | None
    hub_id: int | None
    scopes: list[str] | None
    hub_domain: str | None


class PortalDisconnected(_Closed):
    """A portal disconnected: its tokens are gone, its actions wait."""

    portal_id: int
    connection: Literal["disconnected"]
    revoked: bool = Field(description="whether HubSpot confirmed the revocation")


class Failure(_Closed):
    """An action that finished without being completed."""

    callback_id: str
    queue_id: int
    queue_key: str | None
    portal_id: int
    state: Literal["failed", "expired"]
    last_error: str | None
    completed_at: AwareDatetime


class FailurePage(_Closed):
    """The latest failed or expired actions, newest first."""

    failures: list[Failure]


class MinuteCount(_Closed):
    """Actions completed in one minute, by how they ended."""

    t: int = Field(description="the minute's start, in Unix seconds")
    done: int
    failed: int
    expired: int


class QueueDone(_Closed):
    """Actions of one queue completed (done) in the window."""

    queue_id: int
    done: int


class Throughput(_Closed):
    """Completions per minute, oldest first, every minute of the window (the current one
    last, still counting), and per queue."""

    minutes: int
    points: list[MinuteCount]
    done_by_queue: list[QueueDone] = Field(description="only queues with any done")


class ClusterInstance(_Closed):
    """One instance sharing the database, and the portals it validly leases."""

    id: str = Field(description="random, one per process start")
    name: str = Field(description="cluster.instance_name, or hostname:pid")
    started_at: AwareDatetime
    heartbeat_at: AwareDatetime
    heartbeat_age_s: float = Field(ge=0, description="seconds since its last heartbeat")
    stopped_at: AwareDatetime | None = Field(description="set by a graceful stop")
    live: bool = Field(description="not stopped, and a heartbeat within lease_s")
    portals: list[int] = Field(description=f"the portals it owns (the first {MAX_LISTED_PORTALS})")
    portal_count: int = Field(ge=0)


class ClusterView(_Closed):
    """The instances sharing the database, oldest first (the database's clock throughout)."""

    lease_s: float = Field(description="cluster.lease_s of the instance that answered")
    instances: list[ClusterInstance]
