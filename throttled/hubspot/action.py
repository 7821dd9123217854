"""The request HubSpot sends to a custom action's `actionUrl`: parsing and validation."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

_INT64 = (-(2**63), 2**63 - 1)
_INT_TEXT = re.compile(r"\s*-?[0-9]{1,19}\s*")  # ASCII digits only: no '²', '--5' or 5,000 digits
MAX_CALLBACK_ID = 255


class PayloadError(Exception):
    """The payload is not a valid custom-action request; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# Not frozen: one is built per request, and a frozen __init__ (object.__setattr__ per
# field) costs about a microsecond more. Never mutated.
@dataclass(kw_only=True, slots=True)
class ActionRequest:
    """The fields of a custom-action request that throttled uses."""

    callback_id: str
    portal_id: int
    action_definition_id: int
    workflow_id: int
    execution_index: int
    object_type: str | None
    object_id: str | None
    input_fields: dict[str, Any]

    @property
    def queue_name(self) -> str | None:
        """The shared queue named by the step's `queueName` input field, if any."""
        value = self.input_fields.get("queueName")
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()  # (its length is bounded at intake)
        return None

    def queue_key(self) -> str:
        """The queue this action waits in (the original Throttle's key format)."""
        if self.queue_name is not None:
            return f"queue:{self.portal_id}:named:{self.queue_name}"
        return (
            f"queue:{self.portal_id}:{self.workflow_id}:"
            f"{self.action_definition_id}:{self.execution_index}"
        )


_BOM = b"\xef\xbb\xbf"


def parse(body: bytes) -> ActionRequest:
    """Parse and validate a raw request body; raise PayloadError naming the bad field."""
    # orjson: strict RFC 8259 (UTF-8 only, no NaN/Infinity, no lone surrogates, nesting up to
    # 1,024 levels), so whatever it returns PostgreSQL's jsonb can store; several times faster
    # than the json module on these bodies. Integers beyond 64 bits are read as floats, as
    # JavaScript reads them. A UTF-8 byte order mark is ignored (RFC 8259 §8.1 allows it).
    try:
        doc = orjson.loads(body[3:] if body.startswith(_BOM) else body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError("body", f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise PayloadError("body", "must be a JSON object")
    origin = _object(doc, "origin")
    context = _object(doc, "context")
    index = origin.get("actionExecutionIndexIdentifier")
    execution_index = 0
    if index is not None:
        if not isinstance(index, dict):
            raise PayloadError("origin.actionExecutionIndexIdentifier", "must be an object")
        execution_index = _int(
            index, "actionExecutionIndex", "origin.actionExecutionIndexIdentifier"
        )
    obj = doc.get("object")
    if obj is not None and not isinstance(obj, dict):
        raise PayloadError("object", "must be an object")
    return ActionRequest(
        callback_id=_callback_id(doc),
        portal_id=_int(origin, "portalId", "origin", positive=True),
        action_definition_id=_int(origin, "actionDefinitionId", "origin", positive=True),
        workflow_id=_int(context, "workflowId", "context", positive=True),
        execution_index=execution_index,
        object_type=_opt_str(obj, "objectType"),
        object_id=_opt_str(obj, "objectId"),
        input_fields=_input_fields(doc),
    )


def _object(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name)
    if value is None:
        raise PayloadError(name, "is required")
    if not isinstance(value, dict):
        raise PayloadError(name, "must be an object")
    return value


def _callback_id(doc: Mapping[str, Any]) -> str:
    value = doc.get("callbackId")
    if value is None:
        raise PayloadError("callbackId", "is required")
    if not isinstance(value, str) or not value.strip():
        raise PayloadError("callbackId", "must be a non-empty string")
    if len(value) > MAX_CALLBACK_ID or "\x00" in value:
        raise PayloadError("callbackId", f"must be at most {MAX_CALLBACK_ID} printable characters")
    return value


def _int(doc: Mapping[str, Any], key: str, where: str, *, positive: bool = False) -> int:
    value = doc.get(key)
    if type(value) is int and (1 if positive else _INT64[0]) <= value <= _INT64[1]:
        return value  # the usual case, checked first
    if value is None:
        raise PayloadError(f"{where}.{key}", "is required")
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{where}.{key}", "must be an integer")
    if not _INT64[0] <= value <= _INT64[1] or (positive and value <= 0):
        message = "is out of range" + (" (must be > 0)" if positive else "")
        raise PayloadError(f"{where}.{key}", message)
    return value


def _opt_str(obj: Mapping[str, Any] | None, key: str) -> str | None:
    value = None if obj is None else obj.get(key)
    if value is None:
        return None
    if type(value) is str and len(value) <= 255 and "\x00" not in value:
        return value  # the usual case, checked first
    if type(value) is int:
        return str(value)  # at most 64 bits (parse): short, and no NUL
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PayloadError(f"object.{key}", "must be a string or an integer")
    text = str(value)
    if "\x00" in text or len(text) > 255:
        raise PayloadError(f"object.{key}", "must be at most 255 printable characters")
    return text


def _input_fields(doc: Mapping[str, Any]) -> dict[str, Any]:
    value = doc.get("inputFields")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError("inputFields", "must be an object")
    nul = False  # PostgreSQL's jsonb cannot hold U+0000, in a key or in a value
    for key, item in value.items():
        if type(item) is str:
            nul = nul or "\x00" in item
        elif item is not None and not isinstance(item, int | float):  # bool is an int
            raise PayloadError(f"inputFields.{key}", "must be a string or a number")
        nul = nul or "\x00" in key
    if nul:  # reported after every value's type has been checked
        raise PayloadError("inputFields", "must not contain NUL characters")
    return value  # freshly parsed: ours to keep
