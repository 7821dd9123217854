"""What the long-running loops share: interruptible waits, and riding out a database outage."""

from __future__ import annotations

import asyncio
import random
from typing import Any

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


class Alarm:
    """An interruptible sleep for one sleeper, without a task per wait: ring() ends the
    current sleep at once, or the next one if none is under way."""

    __slots__ = ("_rung", "_waiter")

    def __init__(self) -> None:
        self._waiter: asyncio.Future[bool] | None = None
        self._rung = False

    def ring(self) -> None:
        """Wake the sleeper (now, or at its next sleep)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)
        else:
            self._rung = True

    async def until(self, future: asyncio.Future[Any]) -> None:
        """Wait until `future` is done or the alarm rings (the future is not cancelled)."""
        if future.done():
            return
        if self._rung:
            self._rung = False
            return
        waiter = self._waiter = asyncio.get_running_loop().create_future()

        def done(_: asyncio.Future[Any]) -> None:
            if not waiter.done():
                waiter.set_result(False)

        future.add_done_callback(done)
        try:
            await waiter
        finally:
            self._waiter = None
            future.remove_done_callback(done)

    async def sleep(self, delay: float | None) -> bool:
        """Sleep `delay` seconds (None: until rung); whether it was rung."""
        if self._rung:
            self._rung = False
            return True
        if delay is not None and delay <= 0:
            return False
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if delay is None else loop.call_later(delay, _ring_off, waiter)
        try:
            rung: bool = await waiter
            return rung
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


def _ring_off(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


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
