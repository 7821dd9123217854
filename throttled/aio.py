"""What the long-running loops share: an interruptible wait, and riding out a database outage."""

from __future__ import annotations

import asyncio
import random

import structlog

log = structlog.get_logger(__name__)

OUTAGE_FIRST_S = 1.0  # the first retry after a failure; doubled per failure ...
OUTAGE_MAX_S = 30.0  # ... up to this


async def wait_event(event: asyncio.Event, timeout: float | None, *others: asyncio.Event) -> None:
    """Wait until `event` (or any of `others`) is set, or `timeout` seconds pass (None: no
    timeout)."""
    if event.is_set() or any(e.is_set() for e in others):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in (event, *others)]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Outage:
    """A loop's run of consecutive database failures: one warning when it starts (not one per
    try), how long to wait before the next try (doubling, capped, jittered so that the loops do
    not retry in step), and one line when the database answers again."""

    def __init__(self, loop: str, event: str) -> None:
        self.loop = loop
        self.event = event  # the warning's event name
        self.failures = 0
        self._since = 0.0

    def failed(self, exc: BaseException, **context: object) -> float:
        """Count a failure; return the seconds to wait before the next try."""
        self.failures += 1
        cap = min(OUTAGE_MAX_S, OUTAGE_FIRST_S * 2.0 ** min(self.failures - 1, 16))
        delay = random.uniform(cap / 2, cap)
        if self.failures == 1:
            self._since = asyncio.get_running_loop().time()
            log.warning(
                self.event, loop=self.loop, error=str(exc), retry_in_s=round(delay, 2), **context
            )
        return delay

    def over(self) -> None:
        """The database answered: end the run of failures, if there was one."""
        if self.failures:
            seconds = asyncio.get_running_loop().time() - self._since
            log.info(
                "database_outage_over",
                loop=self.loop,
                failures=self.failures,
                seconds=round(seconds, 1),
            )
            self.failures = 0
