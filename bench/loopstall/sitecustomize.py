"""Loop-stall census for a benchmark's daemon: where the event loop's long steps go.

Loaded by Python at start-up when this directory is on PYTHONPATH, and active only in a
`throttled serve` process (its command line names throttled and serve), with
LOOPSTALL_OUT=<file> set (with --instances 2, both write to it: give each run its own file):

    PYTHONPATH=bench/loopstall LOOPSTALL_OUT=/tmp/stalls.txt \\
        .venv/bin/python bench/drain.py --quick --no-bare
    .venv/bin/python bench/loopstall/summary.py /tmp/stalls.txt

Every loop step (BaseEventLoop._run_once, less its wait in select) longer than
LOOPSTALL_MS (default 10) is written as one line: its duration, the ready callbacks before
and after it, the garbage collections inside it, and the callbacks that ran in it by kind
(the task's coroutine, or the callback's name) with their count and time. It times every
callback, so the daemon runs a little slower under it: compare two trees both under it.
"""

from __future__ import annotations

import asyncio.base_events
import asyncio.events
import gc
import os
import sys
import time
from typing import Any

_OUT = os.environ.get("LOOPSTALL_OUT")


def _kind(callback: Any) -> str:
    owner = getattr(callback, "__self__", None)
    if owner is not None and hasattr(owner, "get_coro"):
        return str(getattr(owner.get_coro(), "__qualname__", "task"))
    return str(getattr(callback, "__qualname__", type(callback).__name__))


def _install(path: str) -> None:
    out = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)
    threshold = float(os.environ.get("LOOPSTALL_MS", "10")) / 1000
    kinds: dict[str, list[float]] = {}
    gc_state = {"started": 0.0, "total": 0.0}
    waited = [0.0]

    run_handle = asyncio.events.Handle._run

    def timed_run(self: asyncio.events.Handle) -> None:
        t0 = time.perf_counter()
        try:
            run_handle(self)
        finally:
            entry = kinds.setdefault(_kind(self._callback), [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - t0

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_state["started"] = time.perf_counter()
        else:
            gc_state["total"] += time.perf_counter() - gc_state["started"]

    run_once = asyncio.base_events.BaseEventLoop._run_once

    def timed_run_once(self: Any) -> None:
        selector = self._selector
        if not getattr(selector, "_loopstall", False):
            select = selector.select

            def timed_select(timeout: float | None = None) -> Any:
                t = time.perf_counter()
                try:
                    return select(timeout)
                finally:
                    waited[0] += time.perf_counter() - t

            selector.select = timed_select
            selector._loopstall = True
        before = len(self._ready)
        waited[0] = 0.0
        gc_state["total"] = 0.0
        kinds.clear()
        t0 = time.perf_counter()
        run_once(self)
        busy = time.perf_counter() - t0 - waited[0]
        if busy > threshold:
            top = sorted(kinds.items(), key=lambda kv: -kv[1][1])[:6]
            ran = " ".join(f"{k}={int(c)}/{t * 1000:.1f}ms" for k, (c, t) in top)
            out.write(
                f"STEP {busy * 1000:.1f} ms at={time.time():.3f} ready={before}->"
                f"{len(self._ready)} gc={gc_state['total'] * 1000:.1f}ms {ran}\n"
            )

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
    asyncio.base_events.BaseEventLoop._run_once = timed_run_once  # type: ignore[method-assign]
    gc.callbacks.append(on_gc)


if _OUT and any("throttled" in arg for arg in sys.argv) and "serve" in sys.argv:
    _install(_OUT)
