"""What HubSpot's answer to a completion request means for its rows.

A portal's sender sends a request and hands the answer here; the Judge turns it into an
Outcome (outcomes.py) for the result writer:

- 2xx: every row done, at the instant charged to the limiters;
- 429: every row retried uncounted after HubSpot's wait, and the portal paused for it;
- 401: the token, not the actions: retried uncounted with a fresh token, until HubSpot has
  refused AUTH_RETRIES different tokens in a row (then it counts as a failure, below);
- 400: a batch is bisected to find the rows HubSpot rejects; a single row fails for good;
- anything else (5xx, a network error, the last 401s): a counted failure, each row retried
  with backoff (held for a while every `hold_after_failures` failures) or, once it has used
  its attempts, failed with the reason; and the portal paused for a backoff that grows
  with the requests failed in a row (HubSpot down: one probe a backoff, not a flood).

Every request that went out, answered or not, keeps its place in the rate log (`sends`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from throttled import metrics
from throttled.db.repository import Retry
from throttled.drain.outcomes import Outcome, Rows, bisect, retry_all, sends, utc
from throttled.hubspot.client import CompletionResult

if TYPE_CHECKING:
    from throttled.drain.dispatcher import Dispatcher

log = structlog.get_logger(__name__)

AUTH_RETRIES = 3  # different access tokens refused (401) in a row before a 401 counts


class Judge:
    """One portal's judge: the answers to its requests, as outcomes (and its 401 streak)."""

    def __init__(
        self, portal_id: int, dispatcher: Dispatcher, pause: Callable[[float], None]
    ) -> None:
        self.portal_id = portal_id
        self._d = dispatcher
        self._pause = pause  # stop the portal's sends until an instant (a 429)
        self._refused_token: str | None = None  # the last token HubSpot answered 401 to
        self._refused_tokens = 0  # different tokens refused in a row
        self._failing = 0  # requests failed in a row (5xx, no answer): the portal backs off

    def judge(self, rows: Rows, at: float, result: CompletionResult, token: str) -> Outcome:
        """The outcome of a request of `rows`, charged at `at`, sent with `token`."""
        now = self._d.clock()
        if result.ok:
            metrics.COMPLETED.inc(len(rows))
            self._refused_tokens = 0
            self._failing = 0
            return Outcome(done=[(r, at) for _, r in rows])
        if result.status == 429:
            return self._rate_limited(rows, at, now, result)
        if result.status == 401 and (outcome := self._unauthorized(rows, at, now, result, token)):
            return outcome
        if result.status == 400:
            return self._rejected(rows, at, result)
        reason = f"{result.status or 'network'} {result.message}".strip()
        # HubSpot failing (an outage, a timeout) fails every request alike: the portal backs
        # off as a whole, so an outage costs one request a backoff, not the rows' attempts.
        self._failing += 1
        self._pause(now + self._d.backoff(self._failing))
        return self.failure(rows, at, now, reason)

    def _rate_limited(self, rows: Rows, at: float, now: float, result: CompletionResult) -> Outcome:
        waits: tuple[float | None, ...]
        if result.policy_name == "DAILY":  # (the burst window's headers say nothing of it)
            waits = (result.retry_after_s, self._d.config.daily_limit_wait_s)
        else:
            waits = (result.retry_after_s, result.rate_interval_s)
        wait = next((w for w in waits if w is not None), self._d.config.portal_interval_seconds)
        self._pause(now + wait)
        log.warning(
            "rate_limited", portal_id=self.portal_id, wait_s=wait, policy=result.policy_name
        )
        return retry_all(rows, at, now + wait, f"429 {result.message}", counted=False, sent=True)

    def _unauthorized(
        self, rows: Rows, at: float, now: float, result: CompletionResult, token: str
    ) -> Outcome | None:
        """Retried uncounted with a new token (whose refresh may find the portal
        disconnected, and then they wait); None once AUTH_RETRIES different tokens were
        refused in a row: then the 401 counts as a failure."""
        self._d.tokens.invalidate(self.portal_id)
        if token != self._refused_token:
            self._refused_token = token
            self._refused_tokens += 1
        if self._refused_tokens > AUTH_RETRIES:
            return None
        wait = self._d.backoff(self._refused_tokens)
        return retry_all(rows, at, now + wait, f"401 {result.message}", counted=False, sent=True)

    def _rejected(self, rows: Rows, at: float, result: CompletionResult) -> Outcome:
        """A 400: a batch is split to find the bad rows; a single row fails for good."""
        if len(rows) > 1:
            return bisect(rows, at, result.message, self._d.new_group)
        _, row = rows[0]
        log.warning(
            "callback_rejected",
            portal_id=self.portal_id,
            callback_id=row.callback_id,
            error=result.message,
        )
        # The row's own sent_at keeps this send in the rate log.
        return Outcome(failed=[(row, f"400 {result.message}", at)])

    def failure(self, rows: Rows, at: float, now: float, reason: str) -> Outcome:
        """A counted failure: each row retried with backoff, or failed once out of attempts."""
        config = self._d.config
        outcome = Outcome(sends=sends(rows, at))
        for queue, row in rows:
            if row.attempts + 1 >= config.max_attempts:
                outcome.failed.append(
                    (row, f"gave up after {row.attempts + 1} attempts: {reason}", None)
                )
                continue
            failures = row.failures + 1
            hold = failures % config.hold_after_failures == 0
            delay = config.hold_s if hold else self._d.backoff(failures)
            retry = Retry(
                id=row.id,
                not_before=utc(now + delay),
                error=reason,
                counted=True,
                split_group=row.split_group,
            )
            outcome.retry.append((queue, retry))
        log.warning("send_failed", portal_id=self.portal_id, rows=len(rows), reason=reason)
        return outcome
