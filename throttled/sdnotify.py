"""systemd's notify protocol (sd_notify(3)), from asyncio without blocking: one datagram per
message to `$NOTIFY_SOCKET`; READY=1, STOPPING=1, STATUS=..., and WATCHDOG=1 from a task on
the event loop itself, so that a stuck loop stops the pings and systemd restarts the daemon."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

from throttled.aio import wait_event

log = structlog.get_logger(__name__)

STATUS_EVERY_S = 5.0  # how often STATUS= is refreshed (sent only when it changed)


class Notifier:
    """Sends notify messages to the service manager; without NOTIFY_SOCKET it does nothing."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._socket: socket.socket | None = None
        self._failed = False
        if address:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)  # a full queue drops the message; the loop never waits
            self._socket = sock

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Notifier:
        """The notifier for `$NOTIFY_SOCKET`: a path, or `@name` for an abstract socket."""
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        return cls(address if len(address) > 1 and address[0] in "/\0" else None)

    def send(self, *lines: str) -> bool:
        """Send `lines` as one message (newline-separated); False if it could not go."""
        if self._socket is None or self.address is None:
            return False
        try:
            self._socket.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:  # (BlockingIOError included) the manager is gone or busy
            if not self._failed:
                log.warning("sd_notify_failed", error=str(exc), message=lines[0].split("=")[0])
            self._failed = True
            return False
        self._failed = False
        return True

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


MIN_WATCHDOG_S = 0.01  # pings at most this often, whatever WATCHDOG_USEC says


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), None when the watchdog is
    off or meant for another process (WATCHDOG_PID)."""
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    usec = environ.get("WATCHDOG_USEC", "")
    # (ASCII digits only, at most 20: str.isdigit() takes '²', which int() refuses)
    if not (usec.isascii() and usec.isdigit() and len(usec) <= 20) or int(usec) == 0:
        return None
    return max(int(usec) / 2e6, MIN_WATCHDOG_S)


async def keepalive(
    notifier: Notifier,
    stop: asyncio.Event,
    *,
    watchdog_s: float | None,
    status: Callable[[], str],
) -> None:
    """Until `stop`: WATCHDOG=1 every `watchdog_s`, and STATUS= whenever it changed (looked
    at every few seconds)."""
    if notifier.address is None:
        return
    tick = min(watchdog_s or STATUS_EVERY_S, STATUS_EVERY_S)
    loop = asyncio.get_running_loop()
    next_status, last = 0.0, ""
    while not stop.is_set():
        lines = ["WATCHDOG=1"] if watchdog_s else []
        if loop.time() >= next_status:
            next_status = loop.time() + STATUS_EVERY_S
            if (text := status()) != last:
                lines.append(f"STATUS={text}")
                last = text
        if lines:
            notifier.send(*lines)
        await wait_event(stop, tick)
