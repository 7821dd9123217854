"""`throttled action-definition`: the "Throttle" custom action's definition, as the body of
HubSpot's automation v4 definitions API (`POST /automation/v4/actions/{appId}?hapikey=...`),
printed, or created at HubSpot with --publish.

The input fields are the ones throttled reads (throttled.rates and throttled.intake); their
labels, options and formats say what those accept. The developer API key is sent only as the
`hapikey` query parameter and never printed: errors are rebuilt here, without the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from throttled import rates
from throttled.cli import _config, _Fatal
from throttled.intake import MAX_STORED_TEXT, PRIORITY_RANGE

if TYPE_CHECKING:
    import aiohttp

    from throttled.config import Config

ACTION_PATH = "/api/hubspot/action"  # the action endpoint's route (throttled/web/app.py)
OBJECT_TYPES = ("CONTACT", "COMPANY", "DEAL", "TICKET")
ACTION_NAME = "Throttle"
ACTION_DESCRIPTION = (
    "Holds each enrolled record here and lets it continue at the rate you set (for example "
    "10 per second or 500 per hour), optionally only on some days and hours. Records wait in "
    "a queue per step, or in a named queue shared by several workflows."
)
MAX_ERROR_CHARS = 300
MAX_ANSWER_BYTES = 1 << 20

EXAMPLES = """\
examples:
  throttled action-definition --config /etc/throttled/throttled.toml > action.json
  THROTTLED_HUBSPOT_DEVELOPER_API_KEY=... throttled action-definition --publish

--publish creates a new definition each time it runs (HubSpot keeps both). It needs
hubspot.app_id and hubspot.developer_api_key (or THROTTLED_HUBSPOT_APP_ID and
THROTTLED_HUBSPOT_DEVELOPER_API_KEY), and server.public_url for the actionUrl.
"""


@dataclass(frozen=True, kw_only=True)
class Input:
    """One input field of the action, with its English label and description."""

    name: str
    type: str  # FieldTypeDefinition.type
    field_type: str  # FieldTypeDefinition.fieldType: how the workflow editor shows it
    label: str
    description: str
    options: tuple[tuple[str, str], ...] = ()  # (value, label) of an enumeration
    from_records: bool = True  # the value may also come from a record property

    def definition(self) -> dict[str, Any]:
        """The InputFieldDefinition JSON (never required: an empty field falls through to
        the action's rate config, then the service's defaults)."""
        options = [
            {"label": label, "value": value, "displayOrder": i}
            for i, (value, label) in enumerate(self.options)
        ]
        return {
            "typeDefinition": {
                "name": self.name,
                "type": self.type,
                "fieldType": self.field_type,
                "options": options,
                "externalOptions": False,
            },
            "supportedValueTypes": [
                "STATIC_VALUE",
                *(["OBJECT_PROPERTY"] if self.from_records else []),
            ],
            "isRequired": False,
        }


_EMPTY_RATE = "Empty: the rate configured for this action, else the service's default."
INPUTS: tuple[Input, ...] = (
    Input(
        name="maxThroughput",
        type="number",
        field_type="number",
        label="Max throughput",
        description=(
            f"How many records continue per time period: a whole number 1..{rates.MAX_LIMIT}. "
            + _EMPTY_RATE
        ),
    ),
    Input(
        name="timePeriod",
        type="number",
        field_type="number",
        label="Time period",
        description=(
            "The length of the period, in the time unit: a positive number such as 1 or 0.5 "
            "(the period is 1 millisecond to 366 days). Empty: 1."
        ),
    ),
    Input(
        name="timeUnit",
        type="enumeration",
        field_type="select",
        label="Time unit",
        description="The unit of the time period. " + _EMPTY_RATE,
        options=(
            ("seconds", "Seconds"),
            ("minutes", "Minutes"),
            ("hours", "Hours"),
            ("days", "Days"),
        ),
        from_records=False,
    ),
    Input(
        name="pacing",
        type="enumeration",
        field_type="select",
        label="Pacing",
        description=(
            "Window: up to the max throughput at once, the next batch one period later. "
            "Even: one record every period / max throughput. Empty: window."
        ),
        options=(("window", "Window (in batches)"), ("even", "Even (spread out)")),
        from_records=False,
    ),
    Input(
        name="queueName",
        type="string",
        field_type="text",
        label="Queue name",
        description=(
            "Steps that give the same queue name share one queue and one limit, across "
            f"workflows (at most {MAX_STORED_TEXT} characters). Empty: this step has its own."
        ),
    ),
    Input(
        name="priority",
        type="number",
        field_type="number",
        label="Priority",
        description=(
            f"A whole number {PRIORITY_RANGE[0]}..{PRIORITY_RANGE[1]}: within a queue, higher "
            "continues first, then the earlier arrival. Empty: 0."
        ),
    ),
    Input(
        name="releaseDays",
        type="string",
        field_type="text",
        label="Release days",
        description=(
            "The weekdays on which records continue, e.g. MON-FRI or MON,WED,FRI (day names "
            "or their first three letters; ranges allowed). Empty: every day."
        ),
    ),
    Input(
        name="releaseHours",
        type="string",
        field_type="text",
        label="Release hours",
        description=(
            "The hours of each release day during which records continue, HH:MM-HH:MM in the "
            "time zone, e.g. 09:00-17:00 (an end before the start ends the next day). "
            "Empty: all day."
        ),
    ),
    Input(
        name="timezone",
        type="string",
        field_type="text",
        label="Time zone",
        description=(
            "The IANA time zone of the release days and hours, e.g. America/New_York. Empty: UTC."
        ),
    ),
    Input(
        name="startAt",
        type="string",
        field_type="text",
        label="Start at",
        description=(
            "Nothing continues before this ISO-8601 date-time, e.g. 2026-07-01T09:00:00-04:00 "
            "(without an offset: in the time zone). Empty: at once."
        ),
    ),
)

# What the action answers (hubspot-api.md §1.3): `hs_execution_state` BLOCK with
# `hs_expiration_duration` at once, then SUCCESS (released at the rate) or FAIL_CONTINUE
# (released by an operator) in the callback completion. The doc describes these as values of
# the response's outputFields, not as declared outputs: declaring hs_execution_state lets a
# later step branch on how the throttle ended, but whether HubSpot accepts (or needs) an
# hs_-named output definition is UNCONFIRMED, hence --no-output-fields. hs_expiration_duration
# is not declared: only the BLOCK answer carries it, so a later step would always see it empty.
STATE_OUTPUT = Input(
    name="hs_execution_state",
    type="enumeration",
    field_type="select",
    label="Throttle outcome",
    description="",
    options=(("SUCCESS", "Released at the rate"), ("FAIL_CONTINUE", "Released by an operator")),
    from_records=False,
)


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register `action-definition` on the top-level subparsers."""
    text = "print the custom action's definition for HubSpot, or create it there (--publish)"
    p = sub.add_parser(
        "action-definition",
        help=text,
        description=text,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="config file (default ./throttled.toml, then /etc/throttled/throttled.toml)",
    )
    p.add_argument(
        "--publish",
        action="store_true",
        help="create the definition at HubSpot (POST hubspot.definitions_path with the "
        "developer API key) and print its id",
    )
    p.add_argument(
        "--visible",
        action="store_true",
        help='set "published": true: every portal that installs the app sees the action '
        "(default false: only the developer account's test portals do)",
    )
    p.add_argument(
        "--no-output-fields",
        action="store_true",
        help="declare no output fields (whether HubSpot takes the hs_execution_state output "
        "declared by default is unconfirmed)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON only, on one line (with --publish: HubSpot's answer)",
    )
    p.set_defaults(func=_run, command="action-definition")


def definition(cfg: Config, *, published: bool = False, outputs: bool = True) -> dict[str, Any]:
    """The body of `POST /automation/v4/actions/{appId}` for this installation."""
    labels: dict[str, Any] = {
        "actionName": ACTION_NAME,
        "actionDescription": ACTION_DESCRIPTION,
        "inputFieldLabels": {i.name: i.label for i in INPUTS},
        "inputFieldDescriptions": {i.name: i.description for i in INPUTS},
    }
    body: dict[str, Any] = {
        "actionUrl": action_url(cfg),
        "published": published,
        "objectTypes": list(OBJECT_TYPES),
        "inputFields": [i.definition() for i in INPUTS],
        "functions": [],  # (the spec's create body requires the list)
        "labels": {"en": labels},
    }
    if outputs:
        output = STATE_OUTPUT.definition()
        body["outputFields"] = [{"typeDefinition": output["typeDefinition"]}]
        labels["outputFieldLabels"] = {STATE_OUTPUT.name: STATE_OUTPUT.label}
    return body


def action_url(cfg: Config) -> str:
    """server.public_url + the action endpoint: the URI HubSpot signs must be this one."""
    base = cfg.server.public_url.rstrip("/")
    if not base:
        raise _Fatal(
            "server.public_url is not set (or BASE_URL): it is the https base URL HubSpot "
            "calls, and the actionUrl is it + " + ACTION_PATH
        )
    return base + ACTION_PATH


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    body = definition(cfg, published=args.visible, outputs=not args.no_output_fields)
    if not body["actionUrl"].startswith("https://") and not args.json:
        print("note: HubSpot calls an actionUrl over HTTPS; this one is not", file=sys.stderr)
    if not args.publish:
        _print_json(body, compact=args.json)
        if not args.json:
            print(
                "create it at HubSpot: throttled action-definition --publish (needs "
                "hubspot.app_id and hubspot.developer_api_key)",
                file=sys.stderr,
            )
        return 0
    answer = asyncio.run(publish(cfg, body))
    if args.json:
        _print_json(answer, compact=True)
        return 0
    print(
        f"action definition {_text(answer.get('id'))} created for app {cfg.hubspot.app_id} "
        f"(revision {_text(answer.get('revisionId', '-'))}, published: "
        f"{'true' if body['published'] else 'false'}): {body['actionUrl']}"
    )
    return 0


def _print_json(value: Any, *, compact: bool) -> None:
    # (ASCII: HubSpot's answer cannot put raw control text on the terminal)
    print(json.dumps(value, separators=(",", ":")) if compact else json.dumps(value, indent=2))


async def publish(cfg: Config, body: dict[str, Any]) -> dict[str, Any]:
    """POST the definition with the developer API key; HubSpot's answer (a definition with
    its `id`). Every failure is one _Fatal line, never showing the key or the URL."""
    import aiohttp

    hs = cfg.hubspot
    key = _publish_credentials(cfg)
    path = hs.definitions_path.replace("{app_id}", str(hs.app_id))
    url = hs.api_base_url.rstrip("/") + path
    timeout = aiohttp.ClientTimeout(total=hs.request_timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                url, params={"hapikey": key}, json=body, allow_redirects=False
            ) as response,
        ):
            status, text = response.status, await _read(response)
    except TimeoutError:
        raise _Fatal(f"HubSpot did not answer within {hs.request_timeout_s:g} s ({path})") from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:  # (their text may hold the URL)
        raise _Fatal(f"cannot reach HubSpot at {hs.api_base_url}: {_reason(exc)}") from None
    return _answer(status, text, path, key)


async def _read(response: aiohttp.ClientResponse) -> str:
    """The answer's body as text, at most MAX_ANSWER_BYTES of it (a definition is a few KB)."""
    data = bytearray()
    async for chunk in response.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > MAX_ANSWER_BYTES:
            raise _Fatal(f"HubSpot's answer is larger than {MAX_ANSWER_BYTES} bytes")
    return data.decode("utf-8", errors="replace")


def _reason(exc: BaseException) -> str:
    """Why a request failed, from the OS error if there is one: never the error's own text,
    which may hold the URL and so the key."""
    os_error = exc if isinstance(exc, OSError) else getattr(exc, "os_error", None)
    strerror = getattr(os_error, "strerror", None)
    return f"{type(exc).__name__} ({strerror})" if strerror else type(exc).__name__


def _publish_credentials(cfg: Config) -> str:
    """The developer API key, once the app id and the key are both configured."""
    hs = cfg.hubspot
    if hs.mock:
        raise _Fatal(
            "hubspot.mock is on: there is no HubSpot to create the definition at; "
            "print it without --publish"
        )
    missing = [
        name
        for name, ok in (
            ("hubspot.app_id (THROTTLED_HUBSPOT_APP_ID)", hs.app_id > 0),
            (
                "hubspot.developer_api_key (THROTTLED_HUBSPOT_DEVELOPER_API_KEY)",
                bool(hs.developer_api_key),
            ),
        )
        if not ok
    ]
    if missing:
        raise _Fatal(
            f"--publish needs {' and '.join(missing)}: the app's id and the developer "
            "account's API key, both in the HubSpot developer account"
        )
    return hs.developer_api_key.reveal()


def _answer(status: int, text: str, path: str, key: str) -> dict[str, Any]:
    """HubSpot's created definition, or a _Fatal with its status and message."""
    text = text.replace(key, "***")  # (in case an error message quotes the request)
    try:
        doc = json.loads(text) if text else None
    except (ValueError, RecursionError):
        doc = None
    if status in (200, 201) and isinstance(doc, dict) and doc.get("id") not in (None, ""):
        return doc
    if 200 <= status < 300:
        raise _Fatal(f"HubSpot answered {status} to POST {path} without a definition id")
    hint = _HINTS.get(status, "")
    raise _Fatal(
        f"HubSpot refused the action definition: HTTP {status} ({path}): "
        f"{_error_detail(doc, text)}{hint}"
    )


_HINTS = {
    401: " (check hubspot.developer_api_key)",
    403: " (check hubspot.developer_api_key and hubspot.app_id)",
    404: " (check hubspot.app_id)",
}


def _error_detail(doc: Any, text: str) -> str:
    """HubSpot's category, message and correlation id (or the start of a non-JSON body)."""
    if not isinstance(doc, dict):
        return _text(text) or "(no body)"
    parts = [_text(doc.get(k)) for k in ("category", "message") if doc.get(k)]
    if doc.get("correlationId"):
        parts.append(f"(correlationId {_text(doc['correlationId'])})")
    return " ".join(parts) or "(no message)"


def _text(value: object) -> str:
    """One line of printable text, cut short (HubSpot's answer is not trusted with a terminal)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(value)).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
