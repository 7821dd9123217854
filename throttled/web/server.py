"""The HTTP server around the app: aiohttp's connection handler and runner, with JSON
answers of their own and a shutdown that ends by the daemon's deadline.

These subclass aiohttp internals (RequestHandler.handle_error, Server.__call__,
AppRunner._make_server): setup.cfg pins aiohttp 3.14.x; recheck them on an upgrade.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from throttled.web.services import clip, error


class _Connection(web.RequestHandler):
    """aiohttp's handler of one connection, whose own answers are JSON like ours: to a
    request it cannot parse (a bad header, no Host, an unknown method...), for one."""

    __slots__ = ("_head", "_request_start")

    def __init__(self, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        # Whether the request being received is a HEAD, whose answer has no body: aiohttp
        # answers a request it could not parse without knowing its method.
        self._head = False
        self._request_start = True

    def data_received(self, data: bytes) -> None:
        """Note whether a request starting here is a HEAD, then parse as aiohttp does."""
        if self._request_start and data:
            self._head = data.startswith(b"HEAD ")
            self._request_start = False
        super().data_received(data)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Send an answer; a client sends its next request after it (pipelining aside)."""
        self._request_start = True
        return await super().finish_response(request, resp, start_time)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's error answer (which logs the error), re-made as a JSON body."""
        super().handle_error(request, status, exc, message)
        if status >= 500:
            response = error(status, "internal_error", "the request could not be handled")
        else:
            # The first line only: the rest repeats the offending bytes (a header's value).
            reason = (message or "").strip().partition("\n")[0].rstrip(":")
            response = error(status, "bad_request", clip(reason or "malformed request"))
        if self._head:
            response.body = b""
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's server, handing its connections to _Connection."""

    def __call__(self) -> web.RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """An AppRunner whose cleanup ends by a deadline set when the daemon stops. aiohttp's own
    `shutdown_timeout` is fixed when the runner is made, and it waits that long twice: for
    the handlers still running, then again for them to unwind once cancelled."""

    def __init__(self, app: web.Application, *, timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, shutdown_timeout=timeout_s / 2, **kwargs)
        self._timeout_s = timeout_s
        self.deadline: float | None = None  # the loop time by which cleanup() ends

    async def _make_server(self) -> web.Server:
        # aiohttp makes its Server itself; the same one, with JSON answers of its own.
        made = await super()._make_server()
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **made._kwargs,
        )

    async def shutdown(self) -> None:
        """Run on_shutdown, then close the open connections by the deadline.

        cleanup() calls this once the sites have stopped listening and idle connections are
        closed; aiohttp's own wait on open connections that follows then finds none."""
        await super().shutdown()
        if self.server is None:
            return
        now = asyncio.get_running_loop().time()
        deadline = now + self._timeout_s if self.deadline is None else self.deadline
        # Half to let handlers finish, half for the cancelled ones to unwind. Never 0, which
        # aiohttp takes for "no timeout"; over 5 s aiohttp rounds up to a whole second.
        phase = max((deadline - now) / 2, 0.01)
        await self.server.shutdown(phase - 1 if phase > 6 else phase)
