"""The fake HubSpot's custom action definitions: ``POST /automation/v4/actions/{appId}``.

Authenticated with the developer API key in the ``hapikey`` query parameter, as HubSpot's
automation v4 spec says (security scheme ``developer_hapikey``). Served by ``FakeHubSpot``,
which registers ``add_routes``. Choices where HubSpot documents nothing:

- A missing or wrong ``hapikey`` is a 401 ``INVALID_AUTHENTICATION``; an app id other than
  ``app_id`` is a 404 ``OBJECT_NOT_FOUND``.
- The body must hold ``actionUrl`` (an http(s) URL), ``inputFields`` (each with a
  ``typeDefinition`` whose ``name`` is unique, a known ``type`` and a boolean ``isRequired``),
  a non-empty ``objectTypes`` and ``labels.en.actionName``; ``published`` and ``functions``
  are optional here (the spec marks them required). Anything else is a 400
  ``VALIDATION_ERROR`` naming the field.
- A definition is answered 201 with the body plus ``id`` and ``revisionId`` (the spec's
  ``PublicActionDefinition``), and kept in ``created``; the same body twice is two
  definitions, as at HubSpot.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

from aiohttp import web

DEFINITIONS_PATH = "/automation/v4/actions/{appId}"
DEVELOPER_API_KEY = "fake-developer-api-key"
FIELD_TYPES = frozenset(  # (the spec's FieldTypeDefinition.type)
    (
        "string",
        "number",
        "bool",
        "datetime",
        "enumeration",
        "date",
        "phone_number",
        "currency_number",
        "json",
        "object_coordinates",
    )
)
_BAD_KEY = "The API key provided is invalid."


class _Invalid(Exception):
    """A definition body the fake answers with 400 VALIDATION_ERROR."""


class FakeDefinitions:
    """HubSpot's action definitions of one app, in memory."""

    def __init__(self, *, app_id: int, developer_api_key: str = DEVELOPER_API_KEY) -> None:
        self.app_id = app_id
        self.developer_api_key = developer_api_key
        self.created: dict[str, dict[str, Any]] = {}  # id -> the body as received
        self.requests = 0
        self._next_id = 7_000_001

    def add_routes(self, app: web.Application) -> None:
        """Serve the definitions endpoint on app."""
        app.router.add_post(DEFINITIONS_PATH, self._create)

    async def _create(self, request: web.Request) -> web.Response:
        """POST /automation/v4/actions/{appId}?hapikey=...: 201 with the new definition."""
        self.requests += 1
        key = request.query.get("hapikey", "")
        if not secrets.compare_digest(key.encode(), self.developer_api_key.encode()):
            return _error(401, "INVALID_AUTHENTICATION", _BAD_KEY)
        if request.match_info["appId"] != str(self.app_id):
            return _error(404, "OBJECT_NOT_FOUND", "app not found for this developer account")
        try:
            body = json.loads(await request.read())
            _check_definition(body)
        except (ValueError, RecursionError):
            return _error(400, "VALIDATION_ERROR", "Invalid input JSON")
        except _Invalid as exc:
            return _error(400, "VALIDATION_ERROR", str(exc))
        definition_id = str(self._next_id)
        self._next_id += 1
        self.created[definition_id] = body
        answer = {"functions": [], "published": False, **body}
        answer.update(id=definition_id, revisionId="1")
        return web.json_response(answer, status=201)


def _check_definition(body: Any) -> None:
    """Raise _Invalid naming the first field of a definition body that is wrong."""
    if not isinstance(body, dict):
        raise _Invalid("the body must be a JSON object")
    url = body.get("actionUrl")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise _Invalid("actionUrl: must be an http(s) URL")
    types = body.get("objectTypes")
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise _Invalid("objectTypes: must be a non-empty list of strings")
    _check_fields(body.get("inputFields"))
    labels = body.get("labels")
    en = labels.get("en") if isinstance(labels, dict) else None
    if not isinstance(en, dict) or not isinstance(en.get("actionName"), str):
        raise _Invalid("labels.en.actionName: required")
    if not isinstance(body.get("published", False), bool):
        raise _Invalid("published: must be true or false")
    if not isinstance(body.get("functions", []), list):
        raise _Invalid("functions: must be a list")


def _check_fields(fields: Any) -> None:
    """inputFields: a list of typed, uniquely named field definitions."""
    if not isinstance(fields, list):
        raise _Invalid("inputFields: must be a list")
    names: set[str] = set()
    for i, item in enumerate(fields):
        spec = item.get("typeDefinition") if isinstance(item, dict) else None
        name = spec.get("name") if isinstance(spec, dict) else None
        if not isinstance(name, str) or not name or name in names:
            raise _Invalid(f"inputFields[{i}].typeDefinition.name: required and unique")
        names.add(name)
        if spec is None or spec.get("type") not in FIELD_TYPES:
            raise _Invalid(f"inputFields[{i}].typeDefinition.type: unknown type")
        if not isinstance(item.get("isRequired"), bool):
            raise _Invalid(f"inputFields[{i}].isRequired: must be true or false")


def _error(status: int, category: str, message: str) -> web.Response:
    """A HubSpot ``Error`` JSON response."""
    body = {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
    }
    return web.json_response(body, status=status)
