"""structlog set-up: JSON lines under systemd (or when asked), a console renderer in a terminal.

Everything the process logs goes through the same processors: structlog's own events and the
standard library's records (aiohttp, asyncio, yoyo, ...), which a `ProcessorFormatter` renders.
In JSON mode each record is one line: a traceback is a field of it, long values are cut, and
warnings, thread and unraisable exceptions are logged as events instead of printed as text.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import structlog

# Keys whose values must never reach a log line, whatever the caller passes.
_SECRET_KEYS = frozenset(
    {
        "token",
        "access_token",
        "refresh_token",
        "secret",
        "client_secret",
        "signature",
        "authorization",
        "encryption_key",
        "password",
        "developer_api_key",
        "hapikey",
        "api_key",
        "webhook_url",
        "admin_token",
    }
)

# The same secrets inside free text (a stdlib message, an exception): a header line, a
# `key=value` or `"key": "value"` pair, a bearer token, the password of a URL.
_SECRET_TEXT = re.compile(
    r"""(?ix)
    (?P<header>\b(?:proxy-)?authorization\s*:\s*|\bx-hubspot-signature(?:-v3)?\s*:\s*
        |\b(?:set-)?cookie\s*:\s*)(?:(?!\\[rn])[^\r\n'"])+
    |(?P<pair>\b(?:access_token|refresh_token|client_secret|encryption_key|secret|token
        |password|passwd|signature|authorization|hapikey|developer_api_key|api_key
        |webhook_url|admin_token)["']?\s*[=:]\s*["']?)
        (?:(?:bearer|basic)\s+)?[^\s&"',;)}\]]+
    |(?P<bearer>\bbearer\s+)[\w.~+/=-]+
    |(?P<hook>\bhooks\.slack\.com/(?:services|workflows|triggers)/)[^\s'"]+
    |(?P<userinfo>\b[a-z][a-z0-9+.-]*://[^\s/:@'"]*:)[^\s/@'"]+(?=@)
    """
)

MAX_VALUE_CHARS = 300  # a logged string longer than this is cut
MAX_TRACEBACK_CHARS = 8192  # ... except a traceback, which keeps its head and its end
MAX_ITEMS = 100  # items of a logged list or dict
_TRACEBACK_KEYS = frozenset({"exception", "stack", "stack_info"})


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in [k for k in event if k.lower() in _SECRET_KEYS]:
        event[key] = "***"
    return event


def _scrub_text(text: str) -> str:
    """Mask the secrets found in free text."""
    return _SECRET_TEXT.sub(lambda m: (m.group(m.lastgroup or 0) or "") + "***", text)


def _cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


def _cut_traceback(text: str) -> str:
    """Keep where a traceback starts and where it ends (the exception itself)."""
    if len(text) <= MAX_TRACEBACK_CHARS:
        return text
    head = MAX_TRACEBACK_CHARS // 4
    tail = text[len(text) - (MAX_TRACEBACK_CHARS - head) :]
    return f"{text[:head]}…({len(text)} chars)…{tail}"


def _bound(value: Any, depth: int = 0) -> Any:
    """The value with its secrets masked, its strings cut and its containers capped."""
    if isinstance(value, str):
        return _cut(_scrub_text(value))
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict) and depth < 4:
        items = list(value.items())
        out = {
            str(k): "***" if str(k).lower() in _SECRET_KEYS else _bound(v, depth + 1)
            for k, v in items[:MAX_ITEMS]
        }
        if len(items) > MAX_ITEMS:
            out["…"] = f"({len(items)} items)"
        return out
    if isinstance(value, list | tuple | set | frozenset) and depth < 4:
        seq = list(value)
        cut = [_bound(v, depth + 1) for v in seq[:MAX_ITEMS]]
        return [*cut, f"…({len(seq)} items)"] if len(seq) > MAX_ITEMS else cut
    return _cut(_scrub_text(repr(value)))  # what the JSON renderer would print


def _truncate(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if key == "exc_info" or key.startswith("_"):
            continue  # (the console renderer formats exc_info itself)
        if key in _TRACEBACK_KEYS and isinstance(value, str):
            event[key] = _cut_traceback(_scrub_text(value))
        else:
            event[key] = _bound(value)
    return event


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler: one line per record, even when a record cannot be formatted."""

    def handleError(self, record: logging.LogRecord) -> None:
        # The default prints a multi-line traceback to stderr; say it in one JSON line.
        with contextlib.suppress(Exception):  # logging must never raise
            msg = _cut(_scrub_text(repr(record.msg)))
            structlog.get_logger(record.name).error(
                "log_record_unformattable", logger=record.name, msg=msg, exc_info=True
            )


json_lines = False  # whether setup() chose JSON lines (a traceback then stays one line)


def setup(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and stdlib logging; called again, it replaces its own handler."""
    global json_lines
    json_out = json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    tail: list[Any] = (
        [structlog.processors.format_exc_info, _truncate, structlog.processors.JSONRenderer()]
        if json_out
        else [_truncate, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _setup_stdlib(shared, tail, max(numeric, logging.WARNING), sys.stderr)
    if json_out:
        _capture_stray_output()


def _setup_stdlib(shared: list[Any], tail: list[Any], level: int, stream: TextIO) -> None:
    """Send the standard library's records through the same processors and renderer."""
    handler = _Handler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(),
                *shared,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _capture_stray_output() -> None:
    """Warnings and exceptions that Python would print as text become log events."""
    logging.captureWarnings(True)
    log = structlog.get_logger("throttled")

    def excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        log.critical("uncaught_exception", exc_info=(kind, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
            thread = args.thread.name if args.thread else None
            log.error("thread_exception", thread=thread, exc_info=exc_info)

    def unraisable_hook(args: Any) -> None:
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
        log.error("unraisable_exception", message=args.err_msg, obj=args.object, exc_info=exc_info)

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook
