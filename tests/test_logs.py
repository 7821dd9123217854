"""Logs: one JSON object per line, from structlog and from the standard library alike; long
values cut; secrets masked; a daemon receiving malformed requests keeps to that."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from tests.conftest import action_payload
from tests.daemon_process import post_signed, started_daemon
from throttled import logs
from throttled.hubspot.fake import FakeHubSpot


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], io.StringIO]]:
    """Call logs.setup(..., "json") writing to a buffer; everything it changed is restored."""
    root = logging.getLogger()
    saved = (root.level, sys.excepthook, threading.excepthook, sys.unraisablehook)

    def configure() -> io.StringIO:
        # (in the test itself: pytest puts its own sys.stderr back between set-up and call)
        buffer = io.StringIO()
        monkeypatch.setattr(sys, "stderr", buffer)
        logs.setup("info", "json")
        return buffer

    try:
        yield configure
    finally:
        logging.captureWarnings(False)
        for handler in [h for h in root.handlers if isinstance(h, logs._Handler)]:
            root.removeHandler(handler)
        root.setLevel(saved[0])
        sys.excepthook, threading.excepthook, sys.unraisablehook = saved[1:]
        structlog.reset_defaults()


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    """Every line written, each parsed as a JSON object (any other line fails the test)."""
    out = []
    for line in buffer.getvalue().splitlines():
        doc = json.loads(line)
        assert isinstance(doc, dict), line
        out.append(doc)
    return out


def test_long_values_are_cut_in_structlog_events(json_logs):
    stderr = json_logs()
    timezone = "A" * 5000
    structlog.get_logger("t").warning(
        "input_field_invalid", problem=f"timezone: unknown {timezone!r}", nested=[{"v": timezone}]
    )
    [event] = _lines(stderr)
    assert event["event"] == "input_field_invalid"
    assert len(event["problem"]) < 350
    assert event["problem"].endswith(f"…({len('timezone: unknown ') + 5002} chars)")
    assert event["nested"][0]["v"] == "A" * 300 + "…(5000 chars)"


def test_stdlib_exception_is_one_json_line_with_its_traceback(json_logs):
    stderr = json_logs()
    try:
        raise ZeroDivisionError("boom\nsecond line")
    except ZeroDivisionError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "1.2.3.4")
    [event] = _lines(stderr)
    assert event["event"] == "Error handling request from 1.2.3.4"
    assert (event["level"], event["logger"]) == ("error", "aiohttp.server")
    assert "Traceback (most recent call last)" in event["exception"]
    assert "ZeroDivisionError: boom\nsecond line" in event["exception"]
    assert "timestamp" in event


def test_long_tracebacks_keep_their_start_and_end(json_logs):
    stderr = json_logs()
    try:
        raise ValueError("x" * 20_000 + " the real cause")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    [event] = _lines(stderr)
    assert len(event["exception"]) < logs.MAX_TRACEBACK_CHARS + 100
    assert event["exception"].startswith("Traceback (most recent call last)")
    assert event["exception"].endswith("x the real cause")
    assert " chars)…" in event["exception"]


def test_secrets_are_masked_in_stdlib_records(json_logs):
    stderr = json_logs()
    log = logging.getLogger("aiohttp.server")
    log.warning("bad header %s", "b'Authorization: Bearer sekrit-1\\x00'")
    log.warning("retrying", extra={"token": "sekrit-2", "Authorization": "sekrit-3"})
    log.error("connect failed: postgresql://app:sekrit-4@db/throttled")
    try:
        raise RuntimeError("X-HubSpot-Signature: sekrit-5 refresh_token=sekrit-6")
    except RuntimeError:
        log.exception("Error handling request")
    structlog.get_logger("t").error("oops", error="client_secret='sekrit-7'")
    structlog.get_logger("t").error(
        "publish failed",
        error="GET https://api.hubapi.com/automation/v4/actions/1?hapikey=sekrit-8 refused",
        webhook_url="https://hooks.slack.com/services/T0/B0/sekrit-9",
        detail="posting to https://hooks.slack.com/services/T0/B0/sekrit-10 timed out",
        developer_api_key="sekrit-11",
    )
    text = stderr.getvalue()
    events = _lines(stderr)
    assert len(events) == 6
    for n in range(1, 12):
        assert f"sekrit-{n}" not in text
    assert events[1]["token"] == "***"


def test_setup_twice_adds_no_second_handler(json_logs):
    stderr = json_logs()
    logs.setup("info", "json")
    root = logging.getLogger()
    assert sum(isinstance(h, logs._Handler) for h in root.handlers) == 1
    logging.getLogger("yoyo").warning("once")
    assert [e["event"] for e in _lines(stderr)] == ["once"]


def test_a_record_that_cannot_be_formatted_is_still_one_json_line(json_logs):
    stderr = json_logs()
    [handler] = [h for h in logging.getLogger().handlers if isinstance(h, logs._Handler)]
    # (through our handler alone: pytest's own capture handler fails the test on such a record)
    handler.handle(logging.makeLogRecord({"name": "lib", "msg": "%s %s", "args": ("one",)}))
    [event] = _lines(stderr)
    assert event["event"] == "log_record_unformattable"
    assert event["logger"] == "lib"
    assert "TypeError" in event["exception"]


def test_warnings_and_thread_exceptions_become_json_lines(json_logs):
    stderr = json_logs()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something odd\nover two lines", RuntimeWarning, stacklevel=1)
    thread = threading.Thread(target=lambda: 1 / 0, name="worker")
    thread.start()
    thread.join()
    warned, failed = _lines(stderr)
    assert warned["logger"] == "py.warnings"
    assert "something odd" in warned["event"]
    assert (failed["event"], failed["thread"]) == ("thread_exception", "worker")
    assert "ZeroDivisionError" in failed["exception"]


# -- a real daemon ----------------------------------------------------------------------------


@pytest.fixture
async def daemon(tmp_path: Path, db_url: str, fake_hubspot: FakeHubSpot) -> AsyncIterator[Any]:
    assert fake_hubspot.base_url is not None
    async with started_daemon(tmp_path, db_url=db_url, api_base_url=fake_hubspot.base_url) as proc:
        yield proc


async def _send_raw(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


def _request(headers: str, body: bytes = b"{}") -> bytes:
    head = f"POST /api/hubspot/action HTTP/1.1\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


async def test_daemon_logs_stay_json_lines_under_malformed_requests(daemon):
    malformed = [
        _request("Host: x\r\nX-HubSpot-Signature: sekrit-sig\x00\r\n"),  # a NUL in a header
        _request("Host: x\r\nAuthorization: Bearer sekrit-bearer\x01\r\n"),
        _request("Host: x\r\nX-Long: " + "a" * 8000 + "\x00\r\n"),  # ... in a long one
        _request("Host: x\r\nX-Long: " + "a" * 8191 + "\r\n"),  # over aiohttp's limit
        _request(""),  # no Host header
        _request("Host: x\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"),
    ]
    for request in malformed:
        answer = await _send_raw(daemon.url, request)
        assert answer.startswith(b"HTTP/1.")
        assert b" 500 " not in answer.split(b"\r\n")[0]
    async with aiohttp.ClientSession() as session:  # the daemon still answers
        outcome = await post_signed(session, daemon.url, action_payload())
    assert outcome.status == 200, outcome
    await asyncio.sleep(0.5)  # let the child write its log lines
    text = daemon.log_path.read_text(encoding="utf-8")
    events = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    errors = [e for e in events if e.get("logger") == "aiohttp.server"]
    assert len(errors) == 5, text[-3000:]  # (the bad gzip body is our 400, not an error)
    assert all("Traceback (most recent call last)" in e["exception"] for e in errors)
    assert any(" chars)…" in e["exception"] for e in errors)  # the long header, cut
    assert all(len(line) < logs.MAX_TRACEBACK_CHARS + 1000 for line in text.splitlines())
    assert "sekrit" not in text
