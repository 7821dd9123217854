"""throttled's FakeHubSpot in a process of its own, for bench/drain.py.

Serves OAuth (any `mock-refresh-<portal>` refresh token is accepted for that portal) and the
callbacks API on loopback; writes its base URL to --ready-file once it listens. On SIGTERM or
SIGINT it stops listening and dumps its receive log to --out as JSON:

    {"url": …, "requests": [[arrival_epoch_s, portal_id, status, [callbackId, …]], …],
     "token_requests": n, "loop_lag": {"p50": s, "p99": s, "p999": s, "max": s},
     "handler_delay": {…}}

Arrival times are the fake's time.time() when the first bytes of each request were read from
its socket (FakeHubSpot runs with a clock that returns that instant while it handles the
request), not when the handler got to run: in a burst of a hundred requests the last handler
starts tens of ms after its bytes arrived, and stamping then would invent early sends.
"handler_delay" is that difference; "loop_lag" (how late a 2 ms timer fires) bounds how late
even the socket read can be.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web, web_protocol

from throttled.hubspot.fake import FakeHubSpot

_first_bytes: dict[int, float] = {}  # id(connection) -> when its current request began to arrive
_arrival: contextvars.ContextVar[float | None] = contextvars.ContextVar("arrival", default=None)
_handler_delay: list[float] = []


def stamp_first_bytes() -> None:
    """Note, per connection, when the bytes of its next request start to arrive."""
    original = web_protocol.RequestHandler.data_received

    def data_received(self: web_protocol.RequestHandler, data: bytes) -> None:
        _first_bytes.setdefault(id(self), time.time())
        original(self, data)

    web_protocol.RequestHandler.data_received = data_received  # type: ignore[method-assign]


@web.middleware
async def arrival_stamp(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Run the handler with the clock set to its request's first-bytes instant."""
    key = id(request.protocol)
    at = _first_bytes.get(key)
    if at is not None:
        _handler_delay.append(time.time() - at)
    token = _arrival.set(at)
    try:
        return await handler(request)
    finally:
        _arrival.reset(token)
        _first_bytes.pop(key, None)  # the client sends its next request after this answer


def clock() -> float:
    """The current request's arrival instant inside a handler, else the time."""
    at = _arrival.get()
    return at if at is not None else time.time()


def parse_budget(text: str) -> tuple[int, float] | None:
    """'110/10' → (110, 10.0); 'none' → None (count but never answer 429)."""
    if text.lower() == "none":
        return None
    requests, _, seconds = text.partition("/")
    return int(requests), float(seconds or "10")


async def serve(args: argparse.Namespace) -> None:
    """Run until signalled, then dump the log."""
    fake = FakeHubSpot(
        client_id=args.client_id,
        client_secret=args.client_secret,
        accept_any_refresh_token=True,
        portal_budget=parse_budget(args.portal_budget),
        clock=clock,
    )
    stamp_first_bytes()
    app = fake.make_app()
    app.middlewares.append(arrival_stamp)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    url = f"http://{args.host}:{runner.addresses[0][1]}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    lags: list[float] = []
    ticker = asyncio.create_task(loop_lag(stop, lags), name="loop-lag")
    ready = Path(args.ready_file)
    ready.with_suffix(".tmp").write_text(url)
    os.replace(ready.with_suffix(".tmp"), ready)
    await stop.wait()
    await ticker
    await runner.cleanup()
    log = {
        "loop_lag": summarise_lag(lags),
        "handler_delay": summarise_lag(_handler_delay),
        "url": url,
        "requests": [[r.at, r.portal_id, r.status, list(r.callback_ids)] for r in fake.received],
        "token_requests": len(fake.token_requests),
    }
    out = Path(args.out)
    out.with_suffix(".tmp").write_text(json.dumps(log))
    os.replace(out.with_suffix(".tmp"), out)


async def loop_lag(stop: asyncio.Event, lags: list[float], period: float = 0.002) -> None:
    """How late this process's event loop wakes up: an arrival waits at least that long
    before its handler stamps it, so this bounds the error of the arrival times."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + period
        await asyncio.sleep(period)
        lags.append(loop.time() - due)


def summarise_lag(lags: list[float]) -> dict[str, float]:
    """p50/p99/p99.9/max of delays in seconds."""
    ordered = sorted(lags) or [0.0]

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {"p50": pct(50), "p99": pct(99), "p999": pct(99.9), "max": ordered[-1]}


def main() -> None:
    """Parse options and serve."""
    # The fake is the measuring instrument: a full collection over its growing receive log
    # would stall its loop for tens of ms and stamp arrivals late. Its objects hold no cycles
    # worth collecting during a run of a few minutes.
    gc.disable()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--client-id", required=True)
    p.add_argument("--client-secret", required=True)
    p.add_argument(
        "--portal-budget",
        default="110/10",
        help="requests/seconds per portal before 429 (HubSpot: 110/10), or 'none'",
    )
    p.add_argument("--ready-file", required=True, help="gets the base URL once listening")
    p.add_argument("--out", required=True, help="receive log (JSON) written at exit")
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
