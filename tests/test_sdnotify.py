"""systemd's notify protocol: the messages a daemon under systemd sends, read from a socket the
test binds (a path and the abstract `@name` form); the watchdog's environment; /healthz."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from tests.conftest import action_payload, make_config, running
from throttled import sdnotify
from throttled.liveness import LoopMonitor
from throttled.sdnotify import Notifier, watchdog_interval


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's, named in NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # (a short path: 108 bytes at most)
        if request.param == "path":
            address = str(Path(folder) / "notify")
            sock.bind(address)
        else:
            name = f"throttled-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            address = "@" + name
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        yield sock
        sock.close()


async def _receive(sock: socket.socket, timeout: float = 10.0) -> str:
    loop = asyncio.get_running_loop()
    return (await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)).decode()


def _drain(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


async def _until(sock: socket.socket, line: str, seen: list[str]) -> None:
    """Receive until a message holds `line` (collecting every message in `seen`)."""
    while not any(line in m.splitlines() for m in seen):
        seen.append(await _receive(sock))


async def test_daemon_sends_ready_watchdog_status_and_stopping(
    notify_socket, monkeypatch, db_url, fake_hubspot
):
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setattr(sdnotify, "STATUS_EVERY_S", 0.05)
    cfg = make_config(db_url, fake_hubspot.base_url)
    with structlog.testing.capture_logs() as logs:
        async with running(cfg) as daemon:
            ready = await _receive(notify_socket)
            assert ready.splitlines()[0] == "READY=1"  # the first message
            assert ready.splitlines()[1].startswith("STATUS=0 queues (0 active, 0 at risk)")
            async with daemon.session.get(daemon.url + "/healthz") as resp:  # (port bound)
                assert resp.status == 200
            seen: list[str] = []
            await _until(notify_socket, "WATCHDOG=1", seen)
            while sum("WATCHDOG=1" in m.splitlines() for m in seen) < 5:
                seen.append(await _receive(notify_socket))
            status, _ = await daemon.post_action(action_payload())
            assert status == 200
            # the summary changes once the action's queue is tracked
            while not any("STATUS=1 queues" in m for m in seen):
                seen.append(await _receive(notify_socket))
        after = _drain(notify_socket)
    assert any(m.startswith("STOPPING=1") for m in after), after
    assert not any("READY=1" in m for m in seen + after)
    notified = [e for e in logs if e["event"] == "systemd_notified"]
    assert notified == [{"event": "systemd_notified", "watchdog_s": 0.05, "log_level": "info"}]


async def test_without_a_watchdog_only_ready_status_and_stopping(
    notify_socket, monkeypatch, db_url, fake_hubspot
):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setattr(sdnotify, "STATUS_EVERY_S", 0.05)
    async with running(make_config(db_url, fake_hubspot.base_url)):
        assert (await _receive(notify_socket)).startswith("READY=1\nSTATUS=")
        await asyncio.sleep(0.3)  # (the absence of pings: a short look suffices)
        during = _drain(notify_socket)
    after = _drain(notify_socket)
    assert not any("WATCHDOG=1" in m for m in during + after)
    assert any(m.startswith("STOPPING=1") for m in after)


@pytest.mark.parametrize(
    ("environ", "pid", "expected"),
    [
        ({}, 7, None),
        ({"WATCHDOG_USEC": "30000000"}, 7, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7, None),  # someone else's
        ({"WATCHDOG_USEC": "0"}, 7, None),
        ({"WATCHDOG_USEC": "-5"}, 7, None),
        ({"WATCHDOG_USEC": "soon"}, 7, None),
        ({"WATCHDOG_USEC": "²"}, 7, None),  # (isdigit() says yes; int() says no)
        ({"WATCHDOG_USEC": "1" + "0" * 400}, 7, None),
        ({"WATCHDOG_USEC": "9" * 5000}, 7, None),
        ({"WATCHDOG_USEC": "1"}, 7, 0.01),  # a floor: never a busy loop of pings
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(environ, pid, expected):
    assert watchdog_interval(environ, pid=pid) == expected


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("", None),
        ("relative/path", None),
        ("@", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract", "\0abstract"),
    ],
)
def test_notify_socket_forms(value, address):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value} if value else {})
    try:
        assert notifier.address == address
    finally:
        notifier.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier.from_env({})
    assert notifier.send("READY=1") is False


def test_a_message_that_cannot_go_is_dropped_and_logged_once(tmp_path):
    notifier = Notifier(str(tmp_path / "nobody-listens"))
    with structlog.testing.capture_logs() as logs:
        assert notifier.send("WATCHDOG=1") is False
        assert notifier.send("WATCHDOG=1") is False
    notifier.close()
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    assert logs[0]["message"] == "WATCHDOG"


def test_a_full_socket_never_blocks(tmp_path):
    path = str(tmp_path / "n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        notifier = Notifier(path)
        with structlog.testing.capture_logs():
            results = [notifier.send("STATUS=" + "x" * 1000) for _ in range(10_000)]
        notifier.close()
    assert results[0] is True
    assert results[-1] is False  # the queue filled up: dropped, not waited for


@pytest.fixture
async def keepalive_pair(tmp_path: Path) -> AsyncIterator[tuple[socket.socket, Notifier]]:
    path = str(tmp_path / "k")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    notifier = Notifier(path)
    yield sock, notifier
    notifier.close()
    sock.close()


async def test_keepalive_sends_status_only_when_it_changed(keepalive_pair, monkeypatch):
    sock, notifier = keepalive_pair
    monkeypatch.setattr(sdnotify, "STATUS_EVERY_S", 0.01)
    texts = iter(["a", "a", "a", "b"])
    last = ["b"]

    def status() -> str:
        last[0] = next(texts, last[0])
        return last[0]

    stop = asyncio.Event()
    task = asyncio.create_task(sdnotify.keepalive(notifier, stop, watchdog_s=None, status=status))
    seen = [await _receive(sock), await _receive(sock)]
    await asyncio.sleep(0.05)
    stop.set()
    await task
    assert seen == ["STATUS=a", "STATUS=b"]
    assert _drain(sock) == []


async def test_healthz_reports_the_loop_lag(daemon_factory):
    async with daemon_factory() as daemon:
        async with daemon.session.get(daemon.url + "/healthz") as resp:
            body = await resp.json()
        assert resp.status == 200
        assert body["status"] == "ok"
        assert body["loop_lag_ms"] >= 0
        assert body["last_tick_s_ago"] < 10


def test_loop_monitor_stale_after_no_tick():
    now = [100.0]
    monitor = LoopMonitor(lambda: now[0])
    monitor.tick(0.25)
    now[0] += 5
    alive, details = monitor.snapshot()
    assert alive
    assert details == {"loop_lag_ms": 250.0, "loop_max_lag_ms": 250.0, "last_tick_s_ago": 5.0}
    now[0] += 6
    assert monitor.snapshot()[0] is False


async def test_loop_monitor_measures_a_blocked_loop():
    loop = asyncio.get_running_loop()
    monitor = LoopMonitor(loop.time, tick_s=0.01)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    await asyncio.sleep(0.02)
    time.sleep(0.1)  # blocks the loop on purpose
    await asyncio.sleep(0.03)
    stop.set()
    await task
    assert monitor.max_lag_s >= 0.05
