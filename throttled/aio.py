"""What the long-running loops share: interruptible waits, and riding out a database outage."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

OUTAGE_FIRST_S = 1.0  # the first retry after a failure; doubled per failure ...
OUTAGE_MAX_S = 30.0  # ... up to this


T = TypeVar("T")


async def in_steps(items: Iterable[T], per_step: int) -> AsyncIterator[T]:
    """The items, `per_step` of them a loop step: work started for each (a task's first step,
    a callback) runs a slice at a time, with I/O between, not all in one long step."""
    for k, item in enumerate(items):
        if k and k % per_step == 0:
            await asyncio.sleep(0)
        yield item


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
    """An interruptible sleep for one sleeper, without a task or a coroutine per wait: ring()
    ends the current sleep at once, or the next one if none is under way. sleep() and until()
    return the future to await (one allocation per wait: the hot path of 10,000 queue
    coroutines)."""

    __slots__ = ("_on_done", "_rung", "_timer", "_waiter", "_watched")

    def __init__(self) -> None:
        self._waiter: asyncio.Future[bool] | None = None
        self._rung = False
        self._timer: asyncio.TimerHandle | None = None
        self._watched: asyncio.Future[Any] | None = None  # until()'s future, while it is not done
        self._on_done = self._watched_done  # (bound once, not per wait)

    def ring(self) -> None:
        """Wake the sleeper (now, or at its next sleep)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)
            self._cancel_timer()
        else:
            self._rung = True

    def until(self, future: asyncio.Future[Any]) -> asyncio.Future[bool]:
        """Wait until `future` is done or the alarm rings (the future is not cancelled); the
        result is whether it rang. (A wait may also end early once the future is done.)"""
        if future.done():
            return self._now(False)
        if self._rung:
            self._rung = False
            return self._now(True)
        waiter = self._arm()
        self.watch(future)
        return waiter

    def watch(self, future: asyncio.Future[Any]) -> None:
        """From now on, `future` being done ends the current sleep (not the next one)."""
        if future is not self._watched:  # (one callback per future, however often rung)
            self._watched = future
            future.add_done_callback(self._on_done)

    def sleep(self, delay: float | None) -> asyncio.Future[bool]:
        """Sleep `delay` seconds (None: until rung); the result is whether it was rung."""
        if self._rung:
            self._rung = False
            return self._now(True)
        if delay is not None and delay <= 0:
            return self._now(False)
        waiter = self._arm()
        if delay is not None:
            self._timer = asyncio.get_running_loop().call_later(delay, _ring_off, waiter)
        return waiter

    def _arm(self) -> asyncio.Future[bool]:
        self._cancel_timer()
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @staticmethod
    def _now(rung: bool) -> asyncio.Future[bool]:
        done = asyncio.get_running_loop().create_future()
        done.set_result(rung)
        return done

    def _watched_done(self, future: asyncio.Future[Any]) -> None:
        if future is self._watched:
            self._watched = None
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(False)
                self._cancel_timer()


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
