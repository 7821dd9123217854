"""`throttled portals list/show/test/disconnect/connect` and `throttled keys generate/rotate`,
run as the operator runs them (a subprocess, the daemon down) against a real PostgreSQL and
the fake HubSpot."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from tests.conftest import config_mapping, make_config
from throttled import crypto
from throttled.crypto import CryptoError, KeyRing
from throttled.daemon import make_tokens
from throttled.db.repository import Repository
from throttled.hubspot.fake import FakeHubSpot
from throttled.tokens import token_aad


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # (a JSON string is a TOML basic string)


class Cli:
    """Writes a config file and runs `python -m throttled` with it, off the event loop (the
    fake HubSpot serves from the test's loop meanwhile)."""

    def __init__(self, tmp_path: Path, db_url: str, fake: FakeHubSpot) -> None:
        self.tmp_path = tmp_path
        self.db_url = db_url
        self.fake = fake
        self.key = _key()
        self.previous: list[str] = []
        self.sections: dict[str, dict[str, Any]] = {}

    def mapping(self) -> dict[str, dict[str, Any]]:
        security = {"encryption_key": self.key, "previous_encryption_keys": self.previous}
        return config_mapping(self.db_url, self.fake.base_url, security=security, **self.sections)

    def config_file(self) -> str:
        text = "".join(
            f"[{section}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
            for section, values in self.mapping().items()
        )
        path = self.tmp_path / "throttled.toml"
        path.write_text(text)
        return str(path)

    async def __call__(
        self, *args: str, stdin: str | None = None, config: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "throttled", *args]
        if config:
            argv += ["--config", self.config_file()]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("THROTTLED_", "DATABASE"))}
        env.pop("ENCRYPTION_KEY", None)
        return await asyncio.to_thread(
            subprocess.run,
            argv,
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            timeout=120,
            check=False,
        )

    async def json(self, *args: str) -> Any:
        run = await self(*args, "--json")
        assert run.returncode in (0, 1), run.stderr
        return json.loads(run.stdout)  # nothing else on stdout

    async def connect(self, portal_id: int) -> str:
        """Register a refresh token at the fake and connect it with the CLI."""
        token = f"refresh-{portal_id}-{secrets.token_hex(6)}"
        self.fake.register_portal(portal_id, token)
        run = await self("portals", "connect", "--portal-id", str(portal_id), stdin=token + "\n")
        assert run.returncode == 0, run.stderr
        assert token not in run.stdout + run.stderr
        return token


@pytest.fixture
def cli(tmp_path, db_url, fake_hubspot) -> Cli:
    return Cli(tmp_path, db_url, fake_hubspot)


def _one_error_line(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("throttled: ")
    return lines[0]


def _stored(db_url: str) -> dict[int, tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT portal_id, refresh_token, access_token, status, disconnected_reason "
            "FROM portals ORDER BY portal_id"
        ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def _add_actions(db_url: str, portal_id: int, states: list[str]) -> None:
    """A queue of the portal with actions in these states (as the daemon would store them)."""
    with psycopg.connect(db_url) as conn:
        (queue_id,) = conn.execute(
            "INSERT INTO queues (key, portal_id, policy) VALUES (%s, %s, '{}') RETURNING id",
            (f"test-queue-{portal_id}-{secrets.token_hex(3)}", portal_id),
        ).fetchone()
        for state in states:
            conn.execute(
                "INSERT INTO actions (callback_id, queue_id, portal_id, state, deadline, "
                "last_error) VALUES (%s, %s, %s, %s, now() + interval '1 day', %s)",
                (
                    f"cb-{secrets.token_hex(8)}",
                    queue_id,
                    portal_id,
                    state,
                    "a test failure" if state == "failed" else None,
                ),
            )


async def _three_portals(cli: Cli) -> None:
    """101 connected and tested, 102 disconnected by HubSpot's refusal, 103 only actions."""
    await cli.connect(101)
    assert (await cli("portals", "test", "101")).returncode == 0
    await cli.connect(102)
    cli.fake.revoke_portal(102)  # the app was uninstalled: the next refresh is refused
    assert (await cli("portals", "test", "102")).returncode == 1
    _add_actions(cli.db_url, 101, ["pending"])
    _add_actions(cli.db_url, 103, ["pending", "pending", "failed", "expired", "done"])


# --- list and show ---------------------------------------------------------------------------


async def test_portals_list_json_matches_the_api_shape_with_health_unknown(cli):
    await _three_portals(cli)
    doc = await cli.json("portals", "list")
    views = {v["portal_id"]: v for v in doc["portals"]}
    assert list(views) == [101, 102, 103]

    connected = views[101]
    assert connected["connection"] == "connected"
    assert connected["disconnected_reason"] is None
    assert "automation" in connected["scopes"]
    assert connected["hub_domain"]
    assert connected["token_expires_at"] is not None
    assert connected["last_refresh_at"] is not None
    assert connected["backlog"] == {"pending": 1, "failed": 0, "expired": 0}

    disconnected = views[102]
    assert disconnected["connection"] == "disconnected"
    assert "HubSpot refused the refresh token" in disconnected["disconnected_reason"]
    assert disconnected["token_expires_at"] is None

    only_actions = views[103]
    assert only_actions["connection"] == "not_connected"
    assert only_actions["backlog"] == {"pending": 2, "failed": 1, "expired": 1}

    for view in views.values():  # the daemon's memory: unknown here, not "healthy"
        for name in ("health", "error_rate", "average_latency_ms", "consecutive_failures"):
            assert view[name] is None
        assert "refresh_token" not in json.dumps(view)  # never a token


async def test_portals_list_table_is_aligned(cli):
    await _three_portals(cli)
    run = await cli("portals", "list")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = lines[0]
    assert header.split("  ")[0].strip() == "PORTAL"
    for name in ("CONNECTION", "SCOPES", "TOKEN EXPIRES", "LAST REFRESH", "PENDING"):
        assert name in header
    assert "REASON" in header  # (there is a disconnected portal)
    rows = {int(line.split()[0]): line for line in lines[1:]}
    assert list(rows) == [101, 102, 103]
    start = header.index("CONNECTION")
    assert rows[101][start:].startswith("connected ")
    assert rows[102][start:].startswith("disconnected ")
    assert rows[103][start:].startswith("not_connected ")
    end = header.index("PENDING") + len("PENDING")  # numbers are right-aligned under it
    assert rows[103][end - 1] == "2"
    assert rows[101][end - 1] == "1"
    assert "HubSpot refused the refresh token" in rows[102][header.index("REASON") :]
    assert "(in " in rows[101]  # the token's expiry, relative


async def test_portals_list_with_no_portals(cli):
    run = await cli("portals", "list")
    assert run.returncode == 0, run.stderr
    assert "no portals" in run.stdout
    assert await cli.json("portals", "list") == {"portals": []}


async def test_portals_show_both_forms_and_an_unknown_id(cli):
    await _three_portals(cli)
    listed = {v["portal_id"]: v for v in (await cli.json("portals", "list"))["portals"]}
    for pid in (101, 102, 103):
        assert await cli.json("portals", "show", str(pid)) == listed[pid]

    run = await cli("portals", "show", "102")
    assert run.returncode == 0, run.stderr
    fields = dict(line.split(":", 1) for line in run.stdout.splitlines())
    assert fields["connection"].strip() == "disconnected"
    assert "HubSpot refused the refresh token" in fields["disconnected reason"]
    assert fields["health"].strip().startswith("unknown")
    starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in run.stdout.splitlines()}
    assert len(starts) == 1, run.stdout  # the values are aligned
    shown = await cli("portals", "show", "103")
    assert "2 pending, 1 failed, 1 expired" in shown.stdout

    line = _one_error_line(await cli("portals", "show", "999"))
    assert line == "throttled: portal 999 is not connected and has no actions"
    assert "must be an integer" in _one_error_line(await cli("portals", "show", "0"))


# --- test ------------------------------------------------------------------------------------


async def test_portals_test_ok_then_failing_after_revocation(cli):
    await cli.connect(201)
    run = await cli("portals", "test", "201")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("portal 201: ok (")
    assert "hub id:      201" in run.stdout
    assert "automation" in run.stdout

    body = await cli.json("portals", "test", "201")
    assert body["ok"] is True
    assert body["hub_id"] == 201
    assert body["latency_ms"] >= 0
    assert "automation" in body["scopes"]
    assert body["error"] is None

    cli.fake.revoke_portal(201, access_tokens=True)
    failed = await cli("portals", "test", "201")
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.startswith("portal 201: FAILED (")
    body = await cli.json("portals", "test", "201")  # (exit 1 too)
    assert body["ok"] is False
    assert body["error"]
    assert _stored(cli.db_url)[201][2] == "disconnected"


async def test_portals_test_unknown_never_connected_and_mock_mode(cli):
    line = _one_error_line(await cli("portals", "test", "777"))
    assert line == "throttled: portal 777 is not connected and has no actions"
    _add_actions(cli.db_url, 778, ["pending"])
    body = await cli.json("portals", "test", "778")
    assert body["ok"] is False
    assert "not connected" in body["error"]

    await cli.connect(779)
    cli.sections["hubspot"] = {"mock": True}
    line = _one_error_line(await cli("portals", "test", "779"))
    assert "hubspot.mock is on" in line
    body = await cli.json("portals", "disconnect", "779")  # no HubSpot to revoke at
    assert (body["revoked"], body["revocation"]) == (False, "mock")
    assert cli.fake.revoked == []
    assert _stored(cli.db_url)[779][:3] == (None, None, "disconnected")


# --- disconnect ------------------------------------------------------------------------------


async def test_portals_disconnect_revokes_at_hubspot_and_clears_the_tokens(cli):
    token = await cli.connect(301)
    assert (await cli("portals", "test", "301")).returncode == 0  # (an access token too)
    assert _stored(cli.db_url)[301][1] is not None
    _add_actions(cli.db_url, 301, ["pending"])

    run = await cli("portals", "disconnect", "301")
    assert run.returncode == 0, run.stderr
    assert "HubSpot confirmed the revocation" in run.stdout
    assert token in cli.fake.revoked
    refresh, access, status, reason = _stored(cli.db_url)[301]
    assert (refresh, access, status) == (None, None, "disconnected")
    assert reason == "disconnected by an operator (CLI)"
    view = await cli.json("portals", "show", "301")
    assert view["connection"] == "disconnected"
    assert view["backlog"]["pending"] == 1  # its actions are kept: they wait

    again = await cli.json("portals", "disconnect", "301")  # nothing left to do
    assert again["revocation"] == "already_disconnected"
    assert _stored(cli.db_url)[301][3] == "disconnected by an operator (CLI)"


async def test_portals_disconnect_no_revoke_json_and_unknown(cli):
    token = await cli.connect(302)
    body = await cli.json("portals", "disconnect", "302", "--no-revoke")
    assert body == {
        "portal_id": 302,
        "connection": "disconnected",
        "revoked": False,
        "revocation": "not_requested",
    }
    assert token not in cli.fake.revoked
    assert _stored(cli.db_url)[302][:3] == (None, None, "disconnected")

    line = _one_error_line(await cli("portals", "disconnect", "399"))
    assert line == "throttled: portal 399 is not connected and has no actions"
    _add_actions(cli.db_url, 398, ["pending"])
    assert "never connected" in _one_error_line(await cli("portals", "disconnect", "398"))
    assert 399 not in _stored(cli.db_url)  # (no row made for an unknown portal)


async def test_portals_disconnect_reports_a_revocation_hubspot_refused(cli):
    await cli.connect(303)
    cli.sections["hubspot"] = {"client_secret": "not-the-apps-secret"}
    body = await cli.json("portals", "disconnect", "303")
    assert body["revoked"] is False
    assert body["revocation"] == "failed"
    assert _stored(cli.db_url)[303][:3] == (None, None, "disconnected")


# --- keys --------------------------------------------------------------------------------------


async def test_keys_generate_prints_one_parseable_key(cli):
    first = await cli("keys", "generate", config=False)
    second = await cli("keys", "generate", config=False)
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 1
    assert len(crypto.parse_key(first.stdout.strip())) == 32
    assert first.stdout != second.stdout
    assert "security.encryption_key" in first.stderr
    assert "ENCRYPTION_KEY" in first.stderr


def _key_id(text: str) -> str:
    return crypto.key_id(crypto.parse_key(text))


async def test_keys_rotate_round_trip(cli):
    key_a = cli.key
    for pid in (401, 402, 403):
        await cli.connect(pid)
    assert (await cli("portals", "test", "401")).returncode == 0  # both columns stored
    before = _stored(cli.db_url)
    assert before[401][1] is not None

    key_b = _key()
    cli.key, cli.previous = key_b, [key_a]
    body = await cli.json("keys", "rotate", "--batch-size", "2")  # (two batches)
    assert body == {
        "key_id": _key_id(key_b),
        "rotated": 3,
        "current": 0,
        "unreadable": 0,
        "unreadable_portals": [],
    }
    after = _stored(cli.db_url)
    ring_b = KeyRing.from_texts(key_b)  # key B only
    prefix = f"v1.{_key_id(key_b)}."
    for pid, (refresh, access, *_) in after.items():
        assert refresh.startswith(prefix)  # (a) every ciphertext is under B
        assert ring_b.decrypt(refresh, aad=token_aad(pid, "refresh")).startswith(f"refresh-{pid}")
        if access:
            assert access.startswith(prefix)
            ring_b.decrypt(access, aad=token_aad(pid, "access"))
    assert after[401][1] is not None

    cli.previous = []  # (b) the daemon's token store with key B only
    for pid in (401, 402):
        ok = await cli.json("portals", "test", str(pid))
        assert ok["ok"] is True, ok

    again = await cli("keys", "rotate")  # (c) idempotent
    assert again.returncode == 0, again.stderr
    assert f"key {_key_id(key_b)}: 0 portal(s) re-encrypted, 3 already under it" in again.stdout

    # (d) a ciphertext no key in the ring opens: reported, left as it is
    stray = KeyRing.from_texts(_key()).encrypt("lost", aad=token_aad(404, "refresh"))
    with psycopg.connect(cli.db_url) as conn:
        conn.execute("INSERT INTO portals (portal_id, refresh_token) VALUES (404, %s)", (stray,))
    cli.previous = [key_a]
    run = await cli("keys", "rotate")
    assert run.returncode == 1, run.stderr
    assert "0 portal(s) re-encrypted, 3 already under it, 1 unreadable" in run.stdout
    assert "portal 404 (refresh_token: unknown key id" in run.stdout
    assert _stored(cli.db_url)[404][0] == stray
    body = await cli.json("keys", "rotate")
    assert (body["rotated"], body["current"], body["unreadable"]) == (0, 3, 1)
    [entry] = body["unreadable_portals"]
    assert entry["portal_id"] == 404
    assert entry["columns"]["refresh_token"].startswith("unknown key id")


async def test_a_ciphertext_copied_to_another_portal_does_not_decrypt(cli, db_url, fake_hubspot):
    await cli.connect(501)
    await cli.connect(502)
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE portals SET refresh_token = "
            "(SELECT refresh_token FROM portals WHERE portal_id = 501) WHERE portal_id = 502"
        )
    copied = _stored(db_url)[502][0]
    assert copied == _stored(db_url)[501][0]

    cfg = make_config(db_url, fake_hubspot.base_url, security={"encryption_key": cli.key})
    keyring = KeyRing.from_texts(cli.key)
    async with (
        Repository.open(db_url, min_size=1, max_size=2) as repo,
        aiohttp.ClientSession() as session,
    ):
        tokens = make_tokens(cfg, repo, session, keyring, fake_hubspot.base_url)
        with pytest.raises(CryptoError):
            await tokens.access_token(502)
        assert await tokens.access_token(501)  # (the original still works)

    failed = await cli.json("portals", "test", "502")
    assert failed["ok"] is False
    assert "ciphertext failed authentication" in failed["error"]

    body = await cli.json("keys", "rotate")
    assert body["unreadable"] == 1
    assert body["unreadable_portals"] == [
        {"portal_id": 502, "columns": {"refresh_token": "ciphertext failed authentication"}}
    ]
    assert _stored(db_url)[502][0] == copied  # left as it is


async def test_keys_rotate_refuses_a_bad_key_in_one_line(cli):
    cli.key = "not-a-key"
    line = _one_error_line(await cli("keys", "rotate"))
    assert "security.encryption_key" in line


async def test_stored_text_a_terminal_cannot_encode_is_escaped_not_a_crash(
    cli, db_url, monkeypatch
):
    await cli.connect(204)
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE portals SET hub_domain = %s, disconnected_reason = %s",
            ("caf\u00e9\u2603.example\u009b31m\u202e", "r\u00e9" * 200),
        )
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")
    for args in (
        ("portals", "show", "204"),
        ("portals", "list"),
        ("portals", "show", "204", "--json"),
    ):
        run = await cli(*args)
        assert run.returncode == 0, run.stderr
        assert "\u009b" not in run.stdout
        assert "\u202e" not in run.stdout
        assert "Traceback" not in run.stderr
    document = json.loads((await cli("portals", "show", "204", "--json")).stdout)
    assert document["hub_domain"].startswith("caf\u00e9")


async def test_keys_rotate_reaches_every_row_whatever_its_portal_id(cli):
    key_a = cli.key
    ring_a = KeyRing.from_texts(key_a)
    with psycopg.connect(cli.db_url) as conn:  # rows edited by hand: ids 0 and below
        for pid in (0, -7, -(2**63)):
            conn.execute(
                "INSERT INTO portals (portal_id, refresh_token) VALUES (%s, %s)",
                (pid, ring_a.encrypt(f"rt{pid}", aad=token_aad(pid, "refresh"))),
            )
    cli.key, cli.previous = _key(), [key_a]
    body = await cli.json("keys", "rotate", "--batch-size", "1")
    assert (body["rotated"], body["unreadable"]) == (3, 0)
    prefix = f"v1.{_key_id(cli.key)}."
    assert all(refresh.startswith(prefix) for refresh, *_ in _stored(cli.db_url).values())
