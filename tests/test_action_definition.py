"""`throttled action-definition`: the custom action's definition body, and --publish against
the fake HubSpot's definitions endpoint (which is tested here too)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import types
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpClient

from throttled import cli, intake, rates
from throttled import config as config_module
from throttled.cli_definition import ACTION_PATH, INPUTS, definition
from throttled.hubspot import fake_definitions
from throttled.hubspot.fake import FAKE_APP_ID, FakeHubSpot

PUBLIC_URL = "https://throttle.example.com/"  # (a trailing slash is not doubled)
ACTION_URL = "https://throttle.example.com/api/hubspot/action"
NAMES = [
    "maxThroughput",
    "timePeriod",
    "timeUnit",
    "pacing",
    "queueName",
    "priority",
    "releaseDays",
    "releaseHours",
    "timezone",
    "startAt",
]


@pytest.fixture(autouse=True)
def no_environment_config(monkeypatch):
    """cli.main reads the environment: only the config files written here count."""
    for name in list(os.environ):
        if name.startswith("THROTTLED_") and not name.startswith("THROTTLED_TEST_"):
            monkeypatch.delenv(name)
    for name in config_module.LEGACY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def developer_key() -> str:
    return "dev-key-" + secrets.token_hex(12)


def _config_file(tmp_path: Path, *, hubspot: dict[str, Any], public_url: str = PUBLIC_URL) -> str:
    lines = ['[hubspot]\nclient_secret = "test-secret"\n']
    lines += [f"{key} = {json.dumps(value)}\n" for key, value in hubspot.items()]
    lines.append(f"[server]\npublic_url = {json.dumps(public_url)}\n" if public_url else "")
    path = tmp_path / "throttled.toml"
    path.write_text("".join(lines))
    return str(path)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["action-definition", *argv])
    out, err = capsys.readouterr()
    return code, out, err


async def _run_off_loop(capsys, *argv: str) -> tuple[int, str, str]:
    """The CLI runs its own event loop: off this one, which serves the fake HubSpot."""
    code = await asyncio.to_thread(cli.main, ["action-definition", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2, out + err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("throttled: ")
    return lines[0]


def _publishing(tmp_path: Path, fake: FakeHubSpot, key: str, **hubspot: Any) -> str:
    settings = {"api_base_url": fake.base_url, "app_id": FAKE_APP_ID, "developer_api_key": key}
    return _config_file(tmp_path, hubspot={**settings, **hubspot})


# --- the body ------------------------------------------------------------------------------


def test_the_definition_has_every_input_field_with_its_options(capsys, tmp_path):
    code, out, err = _run(capsys, "--config", _config_file(tmp_path, hubspot={}))
    assert code == 0, err
    body = json.loads(out)
    assert body["actionUrl"] == ACTION_URL
    assert body["published"] is False
    assert {"CONTACT", "COMPANY", "DEAL", "TICKET"} <= set(body["objectTypes"])
    fields = {f["typeDefinition"]["name"]: f for f in body["inputFields"]}
    assert list(fields) == NAMES
    for field in fields.values():
        spec = field["typeDefinition"]
        assert {"name", "type", "fieldType", "options"} <= set(spec)
        assert "STATIC_VALUE" in field["supportedValueTypes"]
        assert field["isRequired"] is False  # (an empty field falls through to the config)
    unit = fields["timeUnit"]["typeDefinition"]
    assert (unit["type"], unit["fieldType"]) == ("enumeration", "select")
    assert [o["value"] for o in unit["options"]] == ["seconds", "minutes", "hours", "days"]
    pacing = fields["pacing"]["typeDefinition"]
    assert [o["value"] for o in pacing["options"]] == ["window", "even"]
    assert all(o["label"] for o in unit["options"] + pacing["options"])
    en = body["labels"]["en"]
    assert en["actionName"] == "Throttle"
    assert en["actionDescription"]
    assert list(en["inputFieldLabels"]) == NAMES
    assert list(en["inputFieldDescriptions"]) == NAMES
    outputs = [o["typeDefinition"]["name"] for o in body["outputFields"]]
    assert outputs == ["hs_execution_state"]
    assert set(en["outputFieldLabels"]) == set(outputs)
    assert "--publish" in err


def test_the_fields_and_options_are_what_throttled_reads():
    primary = {names[0] for names in rates._INPUT_NAMES.values()}
    assert {i.name for i in INPUTS} == primary | {"priority", "queueName"}
    assert {i.name for i in INPUTS} <= intake.STORED_INPUT_KEYS
    options = {i.name: [value for value, _ in i.options] for i in INPUTS}
    for unit in options["timeUnit"]:
        rates.parse_unit(unit)
    for pacing in options["pacing"]:
        rates.parse_pacing(pacing)
    descriptions = {i.name: i.description for i in INPUTS}
    examples = [
        ("releaseDays", "MON-FRI", rates.parse_days),
        ("releaseDays", "MON,WED,FRI", rates.parse_days),
        ("releaseHours", "09:00-17:00", rates.parse_hours),
        ("timezone", "America/New_York", rates.parse_timezone),
        ("startAt", "2026-07-01T09:00:00-04:00", rates.parse_start_at),
    ]
    for name, example, parse in examples:
        assert example in descriptions[name]
        parse(example)  # (raises if throttled would not take it)


def test_the_action_url_is_the_route_the_daemon_serves():
    from throttled.web.app import handle_action, make_app

    app = make_app(types.SimpleNamespace(config=config_module.Config()))
    posts = {r.resource.canonical: r.handler for r in app.router.routes() if r.method == "POST"}
    assert posts[ACTION_PATH] is handle_action


def test_json_is_the_same_body_on_one_line(capsys, tmp_path):
    path = _config_file(tmp_path, hubspot={})
    _, pretty, _ = _run(capsys, "--config", path)
    code, out, err = _run(capsys, "--config", path, "--json")
    assert code == 0
    assert err == ""
    assert len(out.strip().splitlines()) == 1
    assert json.loads(out) == json.loads(pretty)


def test_visible_and_no_output_fields(capsys, tmp_path):
    path = _config_file(tmp_path, hubspot={})
    _, out, _ = _run(capsys, "--config", path, "--json", "--visible", "--no-output-fields")
    body = json.loads(out)
    assert body["published"] is True
    assert "outputFields" not in body
    assert "outputFieldLabels" not in body["labels"]["en"]


def test_without_a_public_url_there_is_no_action_url(capsys, tmp_path):
    path = _config_file(tmp_path, hubspot={}, public_url="")
    line = _one_error_line(*_run(capsys, "--config", path))
    assert "server.public_url is not set" in line


def test_help_shows_an_example(capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert "examples:" in out
    assert "throttled action-definition --publish" in out
    assert "throttled action-definition --config" in out


# --- --publish -----------------------------------------------------------------------------


async def test_publish_creates_the_definition_at_hubspot(
    capsys, tmp_path, fake_hubspot, developer_key
):
    fake_hubspot.definitions.developer_api_key = developer_key
    path = _publishing(tmp_path, fake_hubspot, developer_key)
    code, out, err = await _run_off_loop(capsys, "--config", path, "--publish")
    assert code == 0, err
    [(definition_id, stored)] = fake_hubspot.definitions.created.items()
    assert out.startswith(f"action definition {definition_id} created for app {FAKE_APP_ID}")
    assert ACTION_URL in out
    assert stored == definition(config_module.load(path))
    assert developer_key not in out + err

    code, out, err = await _run_off_loop(capsys, "--config", path, "--publish", "--json")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["id"] in fake_hubspot.definitions.created
    assert answer["id"] != definition_id  # (each --publish is a new definition)
    assert answer["actionUrl"] == ACTION_URL
    assert developer_key not in out + err


async def test_a_wrong_developer_key_is_one_line_without_the_key(
    capsys, tmp_path, fake_hubspot, developer_key, monkeypatch
):
    wrong = "wrong-" + developer_key
    # Even an error message that quotes the key does not show it.
    monkeypatch.setattr(fake_definitions, "_BAD_KEY", f"The API key {wrong} is invalid.")
    path = _publishing(tmp_path, fake_hubspot, wrong)
    line = _one_error_line(*await _run_off_loop(capsys, "--config", path, "--publish"))
    assert "HubSpot refused the action definition: HTTP 401" in line
    assert "INVALID_AUTHENTICATION" in line
    assert "The API key *** is invalid." in line
    assert "check hubspot.developer_api_key" in line
    assert wrong not in line
    assert "hapikey" not in line
    assert fake_hubspot.definitions.created == {}
    assert fake_hubspot.definitions.requests == 1


async def test_an_unknown_app_id_names_the_key_to_check(
    capsys, tmp_path, fake_hubspot, developer_key
):
    fake_hubspot.definitions.developer_api_key = developer_key
    path = _publishing(tmp_path, fake_hubspot, developer_key, app_id=FAKE_APP_ID + 1)
    line = _one_error_line(*await _run_off_loop(capsys, "--config", path, "--publish"))
    assert f"HTTP 404 (/automation/v4/actions/{FAKE_APP_ID + 1})" in line
    assert "check hubspot.app_id" in line


async def test_hubspot_unreachable_is_one_line_without_the_key(capsys, tmp_path, developer_key):
    settings = {
        "api_base_url": "http://127.0.0.1:1",
        "app_id": 5,
        "developer_api_key": developer_key,
    }
    path = _config_file(tmp_path, hubspot=settings)
    line = _one_error_line(*await _run_off_loop(capsys, "--config", path, "--publish"))
    assert "cannot reach HubSpot at http://127.0.0.1:1" in line
    assert developer_key not in line


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (web.json_response({"revisionId": "1"}, status=201), "answered 201 to POST"),
        (web.Response(body=b"x" * (2 << 20), status=201), "larger than 1048576 bytes"),
        (web.Response(text="<html>oops</html>", status=502), "HTTP 502 (/automation/v4/"),
    ],
)
async def test_an_odd_answer_is_one_line(
    capsys, tmp_path, aiohttp_server, developer_key, answer, expected
):
    async def handler(request: web.Request) -> web.Response:
        return answer

    app = web.Application()
    app.router.add_post("/automation/v4/actions/{appId}", handler)
    server = await aiohttp_server(app)
    settings = {"api_base_url": str(server.make_url("")), "app_id": 5}
    path = _config_file(tmp_path, hubspot={**settings, "developer_api_key": developer_key})
    line = _one_error_line(*await _run_off_loop(capsys, "--config", path, "--publish"))
    assert expected in line
    assert developer_key not in line


@pytest.mark.parametrize(
    ("settings", "missing"),
    [
        ({}, ["hubspot.app_id", "hubspot.developer_api_key"]),
        ({"app_id": 5}, ["hubspot.developer_api_key"]),
        ({"developer_api_key": "k"}, ["hubspot.app_id"]),
    ],
)
def test_publish_without_an_app_id_or_key_says_which(capsys, tmp_path, settings, missing):
    path = _config_file(tmp_path, hubspot=settings)
    line = _one_error_line(*_run(capsys, "--config", path, "--publish"))
    assert line.startswith("throttled: --publish needs ")
    for key in ["hubspot.app_id", "hubspot.developer_api_key"]:
        assert (key in line) == (key in missing), line


def test_publish_is_refused_in_mock_mode(capsys, tmp_path):
    path = _config_file(tmp_path, hubspot={"mock": True, "app_id": 5, "developer_api_key": "k"})
    assert "hubspot.mock is on" in _one_error_line(*_run(capsys, "--config", path, "--publish"))


# --- the fake's endpoint -------------------------------------------------------------------


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Any:
    return await aiohttp_client(FakeHubSpot().make_app())


def _path(app_id: int = FAKE_APP_ID, key: str = fake_definitions.DEVELOPER_API_KEY) -> str:
    return f"/automation/v4/actions/{app_id}?hapikey={key}"


def _valid_body() -> dict[str, Any]:
    return definition(config_module.from_mapping({"server": {"public_url": PUBLIC_URL}}))


async def test_the_fake_answers_201_with_an_id_like_hubspot(client):
    resp = await client.post(_path(), json=_valid_body())
    assert resp.status == 201
    answer = await resp.json()
    assert answer["id"]
    assert answer["revisionId"] == "1"
    assert answer["actionUrl"] == ACTION_URL


@pytest.mark.parametrize("path", [_path(key="nope"), "/automation/v4/actions/1000001"])
async def test_the_fake_refuses_a_missing_or_wrong_key(client, path):
    resp = await client.post(path, json=_valid_body())
    assert resp.status == 401
    assert (await resp.json())["category"] == "INVALID_AUTHENTICATION"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"actionUrl": "ftp://x"}, "actionUrl"),
        ({"actionUrl": None}, "actionUrl"),
        ({"objectTypes": []}, "objectTypes"),
        ({"inputFields": None}, "inputFields"),
        ({"inputFields": [{"typeDefinition": {"name": "a"}, "isRequired": False}]}, "type"),
        ({"inputFields": [{"typeDefinition": {"type": "string"}, "isRequired": False}]}, "name"),
        ({"labels": {"de": {"actionName": "Drossel"}}}, "labels.en.actionName"),
        ({"published": "yes"}, "published"),
    ],
)
async def test_the_fake_validates_the_body(client, change, named):
    resp = await client.post(_path(), json={**_valid_body(), **change})
    assert resp.status == 400
    body = await resp.json()
    assert body["category"] == "VALIDATION_ERROR"
    assert named in body["message"]


async def test_the_fake_refuses_duplicate_field_names(client):
    body = _valid_body()
    body["inputFields"].append(body["inputFields"][0])
    resp = await client.post(_path(), json=body)
    assert resp.status == 400
    assert "unique" in (await resp.json())["message"]
