"""Outgoing calls to HubSpot: batch callback completion (OAuth is in hubspot/oauth.py)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import aiohttp


@dataclass(frozen=True, kw_only=True, slots=True)
class CompletionResult:
    """What HubSpot answered to one batch completion request (status 0: no answer)."""

    status: int
    message: str = ""
    retry_after_s: float | None = None
    policy_name: str | None = None
    rate_interval_s: float | None = None
    # X-HubSpot-RateLimit-*: what is left of the portal's rolling and daily limits
    rate_max: int | None = None
    rate_remaining: int | None = None
    daily_max: int | None = None
    daily_remaining: int | None = None

    @property
    def ok(self) -> bool:
        """HubSpot accepted the batch (204)."""
        return 200 <= self.status < 300


# What HubSpot answers is outside input too: every value taken from it is bounded here.
MAX_RETRY_AFTER_S = 86_400.0  # a DAILY limit resets within a day
MAX_TOKEN_LIFETIME_S = 86_400.0  # HubSpot grants 30 minutes
# A request that got no answer: a timeout, a network error, or a host name that cannot
# even be looked up (UnicodeError, a ValueError).
_UNREACHABLE = (TimeoutError, OSError, ValueError, aiohttp.ClientError)
_DIGITS = re.compile(r"[0-9]{1,12}")
_SECONDS = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")


class TokenError(Exception):
    """The token endpoint refused or could not be reached; `permanent` if retrying won't help."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class HubSpotClient:
    """A thin, typed wrapper over one aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_base_url: str,
        timeout_s: float,
        batch_complete_path: str = "/automation/v4/actions/callbacks/complete",
        send_typed_outputs: bool = False,
    ) -> None:
        self._session = session
        self._complete_url = api_base_url.rstrip("/") + batch_complete_path
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._typed = send_typed_outputs

    def completion_body(self, callback_ids: Sequence[str], state: str = "SUCCESS") -> bytes:
        """The batch completion JSON for these callbacks."""
        extra: dict[str, Any] = {"typedOutputs": {}} if self._typed else {}
        inputs = [
            {"callbackId": cid, "outputFields": {"hs_execution_state": state}, **extra}
            for cid in callback_ids
        ]
        return json.dumps({"inputs": inputs}, separators=(",", ":")).encode()

    async def complete_batch(
        self,
        access_token: str,
        body: bytes,
        on_sent: Callable[[], None] | None = None,
        on_written: Callable[[], None] | None = None,
        timeout_s: float | None = None,
    ) -> CompletionResult:
        """POST one batch completion; network failures come back as status 0. `timeout_s`
        shortens the client's timeout for this request (never lengthens it).

        `on_sent` runs right before the request is written to the socket, and `on_written`
        at the event loop's next step, once the write has certainly returned (see
        `trace_config`): nothing can delay the write past that second instant, not even a
        garbage collection between the first and the write.
        """
        headers = {
            "Authorization": f"Bearer {access_token}",
            "Content-Type": "application/json",
        }
        ctx = SimpleNamespace(on_sent=on_sent, on_written=on_written)
        timeout = self._timeout
        if timeout_s is not None and timeout.total is not None and timeout_s < timeout.total:
            timeout = aiohttp.ClientTimeout(total=max(timeout_s, 0.001))
        try:
            async with self._session.post(
                self._complete_url,
                data=body,
                headers=headers,
                timeout=timeout,
                trace_request_ctx=ctx,
            ) as resp:
                text = await resp.text() if resp.status != 204 else ""
                return _result(resp.status, resp.headers, text)
        except _UNREACHABLE as exc:
            return CompletionResult(status=0, message=f"{type(exc).__name__}: {exc}"[:500])


def retry_after_s(raw: str | None, now: float) -> float | None:
    """Retry-After as seconds within 0..MAX_RETRY_AFTER_S: delay-seconds or an HTTP-date
    (RFC 9110); None if absent or unreadable."""
    if not raw:
        return None
    text = raw.strip()
    if _SECONDS.fullmatch(text):  # (RFC 9110 says an integer; a fraction is taken too)
        return min(float(text), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(when.timestamp() - now, 0.0), MAX_RETRY_AFTER_S)


def _result(status: int, headers: Any, text: str) -> CompletionResult:
    retry_after = retry_after_s(headers.get("Retry-After"), time.time())
    interval_ms = headers.get("X-HubSpot-RateLimit-Interval-Milliseconds") or ""
    doc = _json(text)
    policy = doc.get("policyName") if isinstance(doc, dict) else None
    return CompletionResult(
        status=status,
        message=_error_message(text) if status >= 300 else "",
        retry_after_s=retry_after,
        policy_name=policy if isinstance(policy, str) else None,
        rate_interval_s=min(int(interval_ms) / 1000, MAX_RETRY_AFTER_S)
        if _DIGITS.fullmatch(interval_ms) and int(interval_ms) > 0
        else None,
        rate_max=_count(headers, "X-HubSpot-RateLimit-Max"),
        rate_remaining=_count(headers, "X-HubSpot-RateLimit-Remaining"),
        daily_max=_count(headers, "X-HubSpot-RateLimit-Daily"),
        daily_remaining=_count(headers, "X-HubSpot-RateLimit-Daily-Remaining"),
    )


def _count(headers: Any, name: str) -> int | None:
    """A rate-limit header's count (at most 12 digits), or None."""
    text = (headers.get(name) or "").strip()
    return int(text) if _DIGITS.fullmatch(text) else None


def _json(text: str) -> Any:
    """A response body as JSON; None if it is not (too deep, too big a number, or not JSON)."""
    try:
        return json.loads(text) if text else None
    except (ValueError, RecursionError):  # (JSONDecodeError is a ValueError)
        return None


def _error_message(text: str) -> str:
    """HubSpot's error message, without echoing anything that could be a credential."""
    doc = _json(text)
    if isinstance(doc, dict):
        parts = [str(doc.get(k)) for k in ("category", "status", "message") if doc.get(k)]
        return ": ".join(parts)[:500]
    return text[:300]


async def _on_chunk_sent(
    session: aiohttp.ClientSession,
    ctx: SimpleNamespace,
    params: aiohttp.TraceRequestChunkSentParams,
) -> None:
    """Tell the caller the request is going out now (once; the awaiting writer sends next,
    in the same step), then, from the loop's next step, that it has gone."""
    request_ctx: Any = getattr(ctx, "trace_request_ctx", None)
    callback = getattr(request_ctx, "on_sent", None)
    if callback is not None:
        request_ctx.on_sent = None
        callback()
        written = getattr(request_ctx, "on_written", None)
        if written is not None:
            asyncio.get_running_loop().call_soon(written)


def trace_config() -> aiohttp.TraceConfig:
    """Client tracing that reports the instant a completion request hits the socket."""
    config = aiohttp.TraceConfig()
    config.on_request_chunk_sent.append(_on_chunk_sent)
    return config
