"""Queues for operators: `GET /api/queues[/{id}]` and the operations on one queue (pause,
resume, rate override, retry-failed, fail-pending). `{id}` is the queue's number or its key,
URL-encoded (`queue%3A62515%3A9%3A7%3A0`). Each operation takes effect at once."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from throttled.db.operator import QueueDetail
from throttled.db.repository import DatabaseError
from throttled.queue_view import SORTS, STATES, QueueFilter, ordered, queue_view
from throttled.steering import QueueNotFound, Steering
from throttled.web.admin import actor
from throttled.web.config_api import MAX_ID, RateFields, _problems, read_json
from throttled.web.services import (
    SERVICES,
    Services,
    clip,
    decode_cursor,
    encode_cursor,
    error,
    storage_unavailable,
)

PAGE_DEFAULT, PAGE_MAX = 100, 1000
_DIGITS = re.compile(r"[0-9]{1,19}")


class RateOverride(RateFields):
    """`PUT /api/queues/{id}/rate`: any subset of the policy fields of `POST /api/config`
    (at least one); a part of the rate given alone takes the rest from the queue's rate."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"minProperties": 1})


class FailPending(BaseModel):
    """`POST /api/queues/{id}/fail-pending`: the operator confirms."""

    model_config = ConfigDict(strict=True, extra="forbid")

    confirm: StrictBool = Field(json_schema_extra={"const": True})

    @field_validator("confirm")
    @classmethod
    def _true(cls, value: bool) -> bool:
        if value is not True:
            raise ValueError("must be true")
        return value


def _now(services: Services) -> float:
    return services.clock()


async def _view(services: Services, detail: QueueDetail) -> dict[str, Any]:
    stats = (await services.repo.queue_stats([detail.id])).get(detail.id)
    scheduler = services.steering.scheduler
    live = scheduler.queues.get(detail.id) if scheduler is not None else None
    config = services.intake.action_configs.get((detail.portal_id, detail.action_id or 0))
    return queue_view(
        detail,
        stats,
        live,
        config=config,
        defaults=services.intake.defaults,
        now=_now(services),
        held=scheduler.held_of(detail.id) if scheduler is not None else 0,
    )


async def _queue(request: web.Request) -> QueueDetail | web.Response:
    text = request.match_info.get("id", "")
    try:
        return await request.app[SERVICES].steering.find_queue(text)
    except QueueNotFound:
        return error(404, "queue_not_found", f"no queue {clip(text, 100)!r}", field="id")


async def get_queue(request: web.Request) -> web.Response:
    """GET /api/queues/{id}."""
    services = request.app[SERVICES]
    try:
        found = await _queue(request)
        if isinstance(found, web.Response):
            return found
        return web.json_response(await _view(services, found))
    except DatabaseError:
        return storage_unavailable(services)


def _bad(name: str, message: str) -> web.Response:
    return error(400, f"invalid_{name}", message, field=name)


def _listing_args(
    query: Any,
) -> tuple[QueueFilter, str, int, tuple[float, int] | None] | web.Response:
    portal = None
    if "portal_id" in query:
        text = query["portal_id"]
        if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_ID:
            return _bad("portal_id", f"portal_id must be an integer 1..{MAX_ID}")
        portal = int(text)
    state = query.get("state")
    if state is not None and state not in STATES:
        return _bad("state", f"state must be one of {', '.join(STATES)}")
    at_risk = None
    if "at_risk" in query:
        if query["at_risk"] not in ("true", "false"):
            return _bad("at_risk", "at_risk must be true or false")
        at_risk = query["at_risk"] == "true"
    sort = query.get("sort", "backlog")
    if sort not in SORTS:
        return _bad("sort", f"sort must be one of {', '.join(SORTS)}")
    limit_text = query.get("limit", str(PAGE_DEFAULT))
    if not _DIGITS.fullmatch(limit_text) or not 1 <= int(limit_text) <= PAGE_MAX:
        return _bad("limit", f"limit must be an integer 1..{PAGE_MAX}")
    after = None
    if "cursor" in query:
        after = _cursor(query["cursor"][:200])
        if after is None:
            return _bad("cursor", "cursor is not one this API gave")
    return QueueFilter(portal, state, at_risk), sort, int(limit_text), after


def _cursor(text: str) -> tuple[float, int] | None:
    """A cursor this API gave: base64 (exactly as encoded) of [sort key, id], finite."""
    raw = decode_cursor(text)
    if raw is None:
        return None
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(value, list) and len(value) == 2):
        return None
    key, ident = value
    if type(ident) is not int or not isinstance(key, int | float) or isinstance(key, bool):
        return None
    if not math.isfinite(key) or not 0 <= ident <= MAX_ID:
        return None
    return float(key), ident


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a cursor value")


def _encode(key: tuple[float, int]) -> str:
    number = (
        key[0] if key[0] not in (float("inf"), float("-inf")) else (1e308 if key[0] > 0 else -1e308)
    )
    return encode_cursor(json.dumps([number, key[1]]).encode())


async def list_queues(request: web.Request) -> web.Response:
    """GET /api/queues?portal_id=&state=&at_risk=&sort=backlog|urgency|id&limit=&cursor="""
    services = request.app[SERVICES]
    parsed = _listing_args(request.query)
    if isinstance(parsed, web.Response):
        return parsed
    keep, sort, limit, after = parsed
    try:
        details = await services.repo.list_queues(keep.portal_id)
        stats = await services.repo.queue_stats(None)
    except DatabaseError:
        return storage_unavailable(services)
    now = _now(services)
    views = [v for v in _views(services, details, stats, now) if keep.keeps(v)]
    page = [(k, v) for k, v in ordered(views, sort, now) if after is None or _past(k, after)]
    body: dict[str, Any] = {"queues": [v for _, v in page[:limit]], "next_cursor": None}
    if len(page) > limit:
        body["next_cursor"] = _encode(page[limit - 1][0])
    return web.json_response(body)


def _past(key: tuple[float, int], after: tuple[float, int]) -> bool:
    first = max(min(key[0], 1e308), -1e308)
    return (first, key[1]) > after


def _views(
    services: Services, details: list[QueueDetail], stats: dict[int, Any], now: float
) -> list[dict[str, Any]]:
    scheduler = services.steering.scheduler
    live = scheduler.queues if scheduler is not None else {}
    configs = services.intake.action_configs
    defaults = services.intake.defaults
    return [
        queue_view(
            d,
            stats.get(d.id),
            live.get(d.id),
            config=configs.get((d.portal_id, d.action_id or 0)),
            defaults=defaults,
            now=now,
            held=scheduler.held_of(d.id) if scheduler is not None else 0,
        )
        for d in details
    ]


async def _operate(request: web.Request, op: str) -> web.Response:
    services = request.app[SERVICES]
    steering: Steering = services.steering
    try:
        found = await _queue(request)
        if isinstance(found, web.Response):
            return found
        who = actor(request)
        extra: dict[str, Any] = {}
        if op in ("pause", "resume"):
            found = await steering.pause(who, found, op == "pause")
        elif op == "clear-rate":
            await steering.set_override(who, found, None)
        elif op == "retry-failed":
            retried, left = await steering.retry_failed(who, found)
            extra = {"retried": retried, "not_retried_block_expired": left}
        detail = await services.repo.find_queue(found.id)
        return web.json_response({**extra, "queue": await _view(services, detail or found)})
    except DatabaseError:
        return storage_unavailable(services)


async def pause(request: web.Request) -> web.Response:
    """POST /api/queues/{id}/pause: nothing is sent until resumed (kept across restarts)."""
    return await _operate(request, "pause")


async def resume(request: web.Request) -> web.Response:
    """POST /api/queues/{id}/resume."""
    return await _operate(request, "resume")


async def clear_rate(request: web.Request) -> web.Response:
    """DELETE /api/queues/{id}/rate: the override is removed."""
    return await _operate(request, "clear-rate")


async def retry_failed(request: web.Request) -> web.Response:
    """POST /api/queues/{id}/retry-failed: failed actions whose block has not expired go
    again, with a fresh count of attempts."""
    return await _operate(request, "retry-failed")


async def set_rate(request: web.Request) -> web.Response:
    """PUT /api/queues/{id}/rate: an operator override of any subset of the policy fields."""
    services = request.app[SERVICES]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body, dict) or not body:
        fields = [{"field": "body", "message": "must be a JSON object with at least one field"}]
        return error(422, "invalid_rate", "invalid fields: body", fields=fields)
    try:
        override = RateOverride.model_validate(body).policy()
    except ValidationError as exc:
        problems = _problems(exc)
        names = ", ".join(p["field"] for p in problems)
        return error(422, "invalid_rate", f"invalid fields: {names}", fields=problems)
    if not override:
        fields = [{"field": "body", "message": "at least one field must be given"}]
        return error(422, "invalid_rate", "invalid fields: body", fields=fields)
    try:
        found = await _queue(request)
        if isinstance(found, web.Response):
            return found
        try:
            await services.steering.set_override(actor(request), found, override)
        except ValueError as exc:
            message = " ".join(str(exc).split())[:200]
            fields = [{"field": "time_period", "message": message}]
            return error(422, "invalid_rate", f"invalid rate: {message}", fields=fields)
        detail = await services.repo.find_queue(found.id)
        return web.json_response({"queue": await _view(services, detail or found)})
    except DatabaseError:
        return storage_unavailable(services)


async def fail_pending(request: web.Request) -> web.Response:
    """POST /api/queues/{id}/fail-pending with {"confirm": true}: every pending action is
    completed FAIL_CONTINUE, within the portal's API budget, not the queue's rate."""
    services = request.app[SERVICES]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    try:
        FailPending.model_validate(body)
    except ValidationError:
        fields = [{"field": "confirm", "message": "must be true: every pending action fails"}]
        return error(
            422, "confirmation_required", 'send {"confirm": true}', fields=fields, field="confirm"
        )
    try:
        found = await _queue(request)
        if isinstance(found, web.Response):
            return found
        released = await services.steering.fail_pending(actor(request), found)
        detail = await services.repo.find_queue(found.id)
        return web.json_response(
            {"released": released, "queue": await _view(services, detail or found)}
        )
    except DatabaseError:
        return storage_unavailable(services)
