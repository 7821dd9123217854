"""Throttle configs, compatible with the original's API: `POST /api/config`,
`GET /api/config[/{portal_id}/{action_id}]`, `DELETE /api/config/{portal_id}/{action_id}`.

A body is checked in two steps: its shape by a strict pydantic model (unknown fields, wrong
types; numbers may come as numeric strings, as the original accepted), then each rate field
by the same rules intake applies (rates.spec_from_mapping), so that a 422 names every bad
field at once. A stored config takes effect at once for new actions on this instance.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from throttled import rates
from throttled.db.repository import DatabaseError
from throttled.web.admin import actor
from throttled.web.services import (
    BODY_ERRORS,
    SERVICES,
    decode_cursor,
    encode_cursor,
    error,
    invalid_body,
    storage_unavailable,
)

MAX_ID = 2**63 - 1
MAX_BODY_BYTES = 16 << 10
PAGE_DEFAULT, PAGE_MAX = 100, 1000
_NUMERIC = r"^\s*[0-9]{1,19}\s*$"
Numeric = StrictInt | Annotated[str, StringConstraints(pattern=_NUMERIC)]
Text = Annotated[str, StringConstraints(max_length=255)]
Unit = Literal["seconds", "minutes", "hours", "days", "second", "minute", "hour", "day"]
_DIGITS = re.compile(r"[0-9]{1,19}")


_GOOD = {"max_throughput": 1, "time_period": 1, "time_unit": "seconds"}
RATE_FIELDS = (
    "max_throughput",
    "time_period",
    "time_unit",
    "pacing",
    "release_days",
    "release_hours",
    "timezone",
    "start_at",
)


class RateFields(BaseModel):
    """The rate fields of a config or an override, named as in the original's API. Each is
    checked by the rules intake applies, on its own (beside good values for the rest), so
    that every bad field is named at once."""

    model_config = ConfigDict(strict=True, extra="forbid")

    max_throughput: Numeric | None = None
    time_period: Numeric | None = None
    time_unit: Unit | None = None
    pacing: Literal["window", "even"] | None = None
    release_days: Text | None = None
    release_hours: Text | None = None
    timezone: Text | None = None
    start_at: Text | None = None

    @field_validator(*RATE_FIELDS)
    @classmethod
    def _a_rate_field(cls, value: Any, info: ValidationInfo) -> Any:
        name = info.field_name or ""
        if value is not None:
            try:
                rates.spec_from_mapping({**_GOOD, name: value}, where="config")
            except (ValueError, ArithmeticError) as exc:
                raise ValueError(_message(exc, name)) from None
        return value

    def policy(self) -> dict[str, Any]:
        """The rate fields given, as stored: numbers as integers, text stripped, blank text
        left out (it means "not given")."""
        out: dict[str, Any] = {}
        for key in RATE_FIELDS:
            value = getattr(self, key)
            if isinstance(value, str):
                value = value.strip()
                if key in ("max_throughput", "time_period"):
                    value = int(value)
            if value is not None and value != "":
                out[key] = value
        return out


class ThrottleConfig(RateFields):
    """A (portal, action definition) rate: the original's five fields, plus pacing and a
    release schedule."""

    # (the minimum is what the document says; the validators below give the messages)
    portal_id: Numeric = Field(json_schema_extra={"minimum": 1})
    action_id: Numeric = Field(json_schema_extra={"minimum": 1})
    max_throughput: Numeric = Field(json_schema_extra={"minimum": 1})
    time_period: Numeric = Field(default=1, json_schema_extra={"minimum": 1})
    time_unit: Unit = "seconds"

    @field_validator("portal_id", "action_id")
    @classmethod
    def _an_id(cls, value: int | str) -> int:
        number = int(value)
        if not 1 <= number <= MAX_ID:
            raise ValueError(f"must be an integer 1..{MAX_ID}")
        return number

    @model_validator(mode="after")
    def _a_rate(self) -> ThrottleConfig:
        try:
            rates.resolve([rates.spec_from_mapping(self.policy(), where="config")])
        except (ValueError, ArithmeticError) as exc:
            text = " ".join(str(exc).split())
            named = re.match(r"config\.([a-z_]+): ", text)
            field = named.group(1) if named and named.group(1) in RATE_FIELDS else "time_period"
            raise PydanticCustomError(
                "rate", "{field}: {message}", {"field": field, "message": _message(exc, field)}
            ) from None
        return self


def _problems(exc: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors as {field, message}, one per field (a whole-rate error names
    time_period)."""
    seen: dict[str, str] = {}
    for item in exc.errors(include_url=False, include_input=False):
        path = [str(p) for p in item["loc"] if not isinstance(p, int)]
        context = item.get("ctx") or {}
        where = path[0] if path else str(context.get("field", "body"))
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        if item["type"] == "rate":
            message = str(context.get("message", message))
        seen.setdefault(where, message.removeprefix("Value error, ")[:200])
    return [{"field": f, "message": m} for f, m in seen.items()]


def validate(body: Any) -> tuple[int, int, dict[str, Any]] | list[dict[str, str]]:
    """(portal_id, action_id, stored policy) or every problem found."""
    if not isinstance(body, dict):
        return [{"field": "body", "message": "must be a JSON object"}]
    try:
        model = ThrottleConfig.model_validate(body)
    except ValidationError as exc:
        return _problems(exc)
    return int(model.portal_id), int(model.action_id), model.policy()


class _Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(f"{key[:100]!r} is given more than once")
        self.key = key[:100]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once (else which one wins is a guess)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _message(exc: BaseException, key: str) -> str:
    text = " ".join(str(exc).split())
    return text.removeprefix(f"config.{key}: ")[:200]


def _invalid(problems: list[dict[str, str]]) -> web.Response:
    names = ", ".join(p["field"] for p in problems)
    return error(422, "invalid_config", f"invalid fields: {names}", fields=problems)


def _view(portal: int, action: int, policy: Any) -> dict[str, Any]:
    """A stored config as answered: its ids, then the rate fields it holds (a row edited by
    hand may hold anything else; that is not shown)."""
    shown = policy if isinstance(policy, dict) else {}
    return {
        "portal_id": portal,
        "action_id": action,
        **{k: shown[k] for k in RATE_FIELDS if k in shown},
    }


async def read_json(request: web.Request) -> Any:
    """An admin request's JSON body (uncompressed, at most MAX_BODY_BYTES, each key once,
    in time), or the error response to answer instead."""
    services = request.app[SERVICES]
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("identity", ""):
        return error(415, "unsupported_media_type", "admin request bodies must not be compressed")
    # (aiohttp reads at most ingest.max_body_bytes, its client_max_size: the lower bound wins)
    limit = min(MAX_BODY_BYTES, services.config.ingest.max_body_bytes)
    too_large = error(413, "payload_too_large", f"request body exceeds {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        return too_large
    try:
        async with asyncio.timeout(services.config.server.body_timeout_s):
            raw = await request.read()  # (whole, but at most the limit)
    except web.HTTPRequestEntityTooLarge:
        return too_large
    except TimeoutError:
        return error(408, "body_timeout", "the request body did not arrive in time")
    except BODY_ERRORS as exc:  # a broken body, or the client gone before its end
        return invalid_body(request, exc)
    if len(raw) > limit:
        return too_large
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        return error(
            422, "invalid_body", str(exc), fields=[{"field": exc.key, "message": str(exc)}]
        )
    except (ValueError, RecursionError):
        return error(400, "invalid_json", "the body is not JSON", field="body")


async def set_config(request: web.Request) -> web.Response:
    """POST /api/config: create or update one config; answers the stored config."""
    services = request.app[SERVICES]
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    checked = validate(body)
    if isinstance(checked, list):
        return _invalid(checked)
    portal, action, policy = checked
    try:
        await services.steering.set_config(actor(request), portal, action, policy)
    except DatabaseError:
        return storage_unavailable(request.app[SERVICES])
    return web.json_response(_view(portal, action, policy))


def _path_ids(request: web.Request) -> tuple[int, int] | web.Response:
    ids = []
    for name in ("portal_id", "action_id"):
        text = request.match_info.get(name, "")
        if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_ID:
            return error(
                400, f"invalid_{name}", f"{name} must be an integer 1..{MAX_ID}", field=name
            )
        ids.append(int(text))
    return ids[0], ids[1]


async def get_config(request: web.Request) -> web.Response:
    """GET /api/config/{portal_id}/{action_id}."""
    ids = _path_ids(request)
    if isinstance(ids, web.Response):
        return ids
    try:
        policy = await request.app[SERVICES].repo.get_action_config(*ids)
    except DatabaseError:
        return storage_unavailable(request.app[SERVICES])
    if policy is None:
        return error(404, "config_not_found", f"no config for portal {ids[0]}, action {ids[1]}")
    return web.json_response(_view(*ids, policy))


async def delete_config(request: web.Request) -> web.Response:
    """DELETE /api/config/{portal_id}/{action_id}: new actions fall back to the defaults."""
    services = request.app[SERVICES]
    ids = _path_ids(request)
    if isinstance(ids, web.Response):
        return ids
    try:
        deleted = await services.steering.set_config(actor(request), *ids, None)
    except DatabaseError:
        return storage_unavailable(request.app[SERVICES])
    if not deleted:
        return error(404, "config_not_found", f"no config for portal {ids[0]}, action {ids[1]}")
    return web.json_response({"portal_id": ids[0], "action_id": ids[1], "deleted": True})


def _cursor(text: str) -> tuple[int, int] | None:
    """An opaque cursor: base64 of 'portal:action' (the last row of the previous page)."""
    raw = decode_cursor(text)
    try:
        portal, _, action = ("" if raw is None else raw.decode()).partition(":")
    except UnicodeError:
        return None
    if not (_DIGITS.fullmatch(portal) and _DIGITS.fullmatch(action)):
        return None
    if not (int(portal) <= MAX_ID and int(action) <= MAX_ID):
        return None
    return int(portal), int(action)


async def list_configs(request: web.Request) -> web.Response:
    """GET /api/config?limit=&cursor=: configs in (portal, action) order."""
    limit_text = request.query.get("limit", str(PAGE_DEFAULT))
    if not _DIGITS.fullmatch(limit_text) or not 1 <= int(limit_text) <= PAGE_MAX:
        return error(400, "invalid_limit", f"limit must be an integer 1..{PAGE_MAX}", field="limit")
    after = None
    if "cursor" in request.query:
        after = _cursor(request.query["cursor"][:100])
        if after is None:
            return error(400, "invalid_cursor", "cursor is not one this API gave", field="cursor")
    limit = int(limit_text)
    try:
        rows = await request.app[SERVICES].repo.list_action_configs(after, limit + 1)
    except DatabaseError:
        return storage_unavailable(request.app[SERVICES])
    page = rows[:limit]
    body: dict[str, Any] = {"configs": [_view(p, a, policy) for p, a, policy in page]}
    if len(rows) > limit:
        last = page[-1]
        body["next_cursor"] = encode_cursor(f"{last[0]}:{last[1]}".encode())
    else:
        body["next_cursor"] = None
    return web.json_response(body)
