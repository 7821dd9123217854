"""Alert delivery: JSON posted to `alerts.webhook_url` from a task of its own.

`send()` never waits: it puts the alert on a bounded queue (a full queue drops the new alert,
with a log line). The task posts the alerts one at a time, in order (a `resolved` never
overtakes its `firing`), each attempt bounded by `alerts.timeout_s`; a failure (no answer, a
5xx, a 429) is retried with exponential backoff and jitter, up to `alerts.max_attempts`, then
given up with a log line. Any other answer (a 3xx or 4xx: a wrong or revoked URL) is given up
at once. A webhook URL is a secret (Slack's carries its token in the path): logs show its
scheme and host only, and error messages are scrubbed of it.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from throttled import metrics
from throttled.aio import wait_event

log = structlog.get_logger(__name__)

MAX_ANSWER_BYTES = 64 << 10  # of a receiver's answer read (its status is what counts)

MAX_QUEUED = 100
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0

ALERTS = metrics.Counter(
    "throttled_alerts_total",
    "Alert deliveries by outcome: sent, failed (given up after retries), dropped (queue full).",
    "outcome",
)


class Webhook:
    """Posts alerts to one URL (empty: alerts are not sent, only logged by the monitor)."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_attempts: int,
        backoff_base_s: float = BACKOFF_BASE_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_attempts = max_attempts
        self._backoff = (backoff_base_s, backoff_max_s)
        self._max_queued = max_queued
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._unreported_drops = 0

    @property
    def enabled(self) -> bool:
        """Whether a URL is configured."""
        return bool(self._url)

    @property
    def where(self) -> str:
        """The URL as logs show it: scheme and host, never the path or query."""
        parts = urlsplit(self._url)
        return f"{parts.scheme}://{parts.hostname}/…" if self._url else ""

    @property
    def queued(self) -> int:
        """Alerts waiting to be posted."""
        return len(self._queue)

    def send(self, payload: dict[str, Any]) -> None:
        """Queue an alert for delivery; never blocks. Past the queue's bound the alert is
        dropped: counted, and reported in one line per burst (flush_drops), not per alert."""
        if not self._url:
            return
        if len(self._queue) >= self._max_queued:
            self.dropped += 1
            self._unreported_drops += 1
            ALERTS.inc(outcome="dropped")
            return
        self._queue.append(payload)
        self._wake.set()

    def flush_drops(self) -> None:
        """Report the alerts dropped since the last report, in one line."""
        if self._unreported_drops:
            log.error("alerts_dropped", count=self._unreported_drops, queued=len(self._queue))
            self._unreported_drops = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver queued alerts until `stop`. A post or backoff under way then is cut short
        (the shutdown does not wait for a slow receiver); what is still queued is given up."""
        if not self._url:
            await stop.wait()
            return
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            worker = asyncio.create_task(self._work(session), name="alert-posts")
            await wait_event(stop, None, self._ended(worker))
            worker.cancel()
            await asyncio.wait([worker])
            if not worker.cancelled() and (error := worker.exception()) is not None:
                raise error  # (a bug in delivery: the daemon stops rather than hide it)
        if self._queue:
            log.warning("alerts_not_sent", count=len(self._queue), reason="shutdown")

    def _ended(self, worker: asyncio.Task[None]) -> asyncio.Event:
        """An event set when the worker ends (on its own only through a bug)."""
        ended = asyncio.Event()
        worker.add_done_callback(lambda _: ended.set())
        return ended

    async def _work(self, session: aiohttp.ClientSession) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._deliver(session, self._queue[0])
            self._queue.popleft()  # (only now: one cut short at shutdown is still queued)

    async def _deliver(self, session: aiohttp.ClientSession, payload: dict[str, Any]) -> bool:
        """Post one alert, retrying; whether it was delivered."""
        attempt = 0
        while True:
            attempt += 1
            error, retry = await self._post(session, payload)
            if not error:
                self.sent += 1
                ALERTS.inc(outcome="sent")
                return True
            if not retry or attempt >= self._max_attempts:
                break
            await asyncio.sleep(self.backoff(attempt))  # (run() cancels it at shutdown)
        self.failed += 1
        ALERTS.inc(outcome="failed")
        log.error(
            "alert_delivery_failed",
            alert=payload.get("alert"),
            status=payload.get("status"),
            attempts=attempt,
            error=error,
            webhook=self.where,
        )
        return False

    def backoff(self, attempt: int) -> float:
        """Seconds before the next try: doubling from the base, capped, jittered."""
        base, most = self._backoff
        cap = min(most, base * 2.0 ** min(attempt - 1, 30))
        return random.uniform(cap / 2, cap)

    async def _post(
        self, session: aiohttp.ClientSession, payload: dict[str, Any]
    ) -> tuple[str, bool]:
        """One attempt: ("", _) when delivered, else (why, whether to retry)."""
        try:
            async with session.post(self._url, json=payload, allow_redirects=False) as resp:
                await resp.content.read(MAX_ANSWER_BYTES)  # (the rest is never read)
                if 200 <= resp.status < 300:
                    return "", False
                return f"HTTP {resp.status}", resp.status >= 500 or resp.status == 429
        except TimeoutError:
            return f"no answer within {self._timeout.total} s", True
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return self._scrubbed(f"{type(exc).__name__}: {exc}"), True

    def _scrubbed(self, text: str) -> str:
        """An error message without the URL's secret parts."""
        parts = urlsplit(self._url)
        for secret in (self._url, parts.path if len(parts.path) > 1 else "", parts.query):
            if secret:
                text = text.replace(secret, "***")
        return text[:300]
