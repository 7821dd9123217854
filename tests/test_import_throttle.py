"""`throttled import-throttle`: a database in the original Throttle's schema (built here, on
the test server, with ciphertexts of every format made with a key generated here) imported
into throttled's, through `throttled.cli.main` as an operator runs it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import config_mapping, with_database
from throttled import cli, legacy_crypto, logs
from throttled import config as config_module
from throttled.crypto import KeyRing
from throttled.tokens import token_aad

# The original's schema (Ecto: varchar(255) strings, timestamp(0) in UTC). callback_id is
# text here so that a value longer than HubSpot's 255 can be stored and refused.
SCHEMA = """
CREATE TABLE action_executions (
    id bigserial PRIMARY KEY,
    queue_id varchar(255), callback_id text, processed boolean DEFAULT false,
    max_throughput varchar(255), "time" varchar(255), period varchar(255),
    consecutive_failures integer DEFAULT 0, last_failure_reason varchar(255),
    on_hold_until timestamp(0), total_attempts integer NOT NULL DEFAULT 0,
    permanently_failed boolean NOT NULL DEFAULT false,
    inserted_at timestamp(0) NOT NULL, updated_at timestamp(0) NOT NULL DEFAULT now()
);
CREATE TABLE throttle_configs (
    id bigserial PRIMARY KEY, portal_id integer, action_id varchar(255),
    max_throughput integer, time_period integer, time_unit varchar(255),
    inserted_at timestamp(0) NOT NULL DEFAULT now(), updated_at timestamp(0) NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX throttle_configs_portal_action ON throttle_configs (portal_id, action_id);
CREATE TABLE oauth_tokens (
    id bigserial PRIMARY KEY, portal_id integer, access_token text, refresh_token text,
    expires_at timestamp(0), token_response jsonb,
    inserted_at timestamp(0) NOT NULL DEFAULT now(), updated_at timestamp(0) NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX oauth_tokens_portal ON oauth_tokens (portal_id);
"""

NOW = datetime.now(UTC).replace(tzinfo=None, microsecond=0)  # (naive UTC, as Ecto stores)
WEEK = timedelta(days=7)  # hubspot.block_expiration's default, P7D


def _token(kind: str, portal: int) -> str:
    return f"na1-{kind}-{portal}-{secrets.token_hex(12)}"


def gcm_v2(key: bytes, text: str) -> str:
    """The original's current format: 0x02 || iv || tag || ciphertext."""
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, text.encode(), b"")
    return base64.b64encode(b"\x02" + iv + sealed[-16:] + sealed[:-16]).decode()


def cbc(key: bytes, text: str, iv: bytes | None = None) -> str:
    """The original's legacy format: iv || AES-256-CBC(PKCS#7)."""
    iv = iv or os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(text.encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + encryptor.update(padded) + encryptor.finalize()).decode()


class Source:
    """The original's database, and the plaintexts its ciphertexts hold."""

    def __init__(self, url: str, key: bytes) -> None:
        self.url = url
        self.key = key
        self.key_text = base64.b64encode(key).decode()
        self.tokens: dict[int, tuple[str, str | None]] = {}

    def execute(self, sql: str, *rows: tuple[Any, ...]) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            if not rows:
                conn.execute(sql)
            for row in rows:
                conn.execute(sql, row)

    def token(self, portal: int, refresh: str | None, access: str | None, expires: Any) -> None:
        self.execute(
            "INSERT INTO oauth_tokens (portal_id, refresh_token, access_token, expires_at) "
            "VALUES (%s, %s, %s, %s)",
            (portal, refresh, access, expires),
        )

    def config(self, *rows: tuple[Any, ...]) -> None:
        self.execute(
            "INSERT INTO throttle_configs (portal_id, action_id, max_throughput, time_period, "
            "time_unit) VALUES (%s, %s, %s, %s, %s)",
            *rows,
        )

    def action(self, queue_id: str, callback_id: str, **values: Any) -> None:
        row = {
            "queue_id": queue_id,
            "callback_id": callback_id,
            "max_throughput": "10",
            "time": "1",
            "period": "seconds",
            "inserted_at": NOW - timedelta(hours=1),
            **values,
        }
        names = ", ".join(f'"{k}"' for k in row)
        marks = ", ".join(["%s"] * len(row))
        self.execute(
            f"INSERT INTO action_executions ({names}) VALUES ({marks})", tuple(row.values())
        )


@pytest.fixture
def source(db_url: str) -> Any:
    """A fresh database in the original's schema, on the same server as db_url."""
    name = f"throttle_src_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(db_url, autocommit=True) as conn:  # (any database is a way in)
        conn.execute(f'CREATE DATABASE "{name}"')
    src = Source(with_database(db_url, name), os.urandom(32))
    src.execute(SCHEMA)
    yield src
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(src: Source) -> None:
    """Rows of every kind: good ones in each format, and bad ones, each with its reason."""
    key, derived = src.key, hashlib.sha256(src.key).digest()
    for portal, seal in (
        (101, lambda t: gcm_v2(key, t)),  # current format
        (102, lambda t: cbc(key, t)),  # legacy
        (103, lambda t: cbc(derived, t)),  # very old: SHA-256 of the key
        (104, lambda t: cbc(key, t, b"\x02" + os.urandom(15))),  # CBC whose iv starts 0x02
    ):
        refresh, access = _token("refresh", portal), _token("access", portal)
        src.tokens[portal] = (refresh, access)
        src.token(portal, seal(refresh), seal(access), NOW + timedelta(minutes=20))
    refresh = _token("refresh", 105)
    src.tokens[105] = (refresh, None)
    src.token(105, cbc(key, refresh), None, None)  # no access token
    src.token(106, gcm_v2(os.urandom(32), _token("refresh", 106)), None, NOW)  # other key
    src.token(107, _token("refresh", 107), None, NOW)  # plaintext
    src.token(108, gcm_v2(key, _token("refresh", 108)), None, NOW)  # already in throttled
    src.token(109, None, None, None)
    src.config(
        (101, "7001", 10, 1, "second"),
        (101, "7002", 100, 2, "minutes"),
        (102, "7003", 5, 1, "hour"),
        (102, "abc", 5, 1, "day"),
        (103, "7004", 0, 1, "days"),
        (103, "7005", 5, 1, "fortnight"),
        (108, "7006", 3, 1, "second"),  # already configured in throttled
    )
    q1, q2, q3, q4 = (
        "queue:101:9001:7001:0",
        "queue:102:9002:7003:1",
        "queue:101:9001:7002:0",
        "queue:103:9003:7004:0",
    )
    hold = NOW + timedelta(hours=1)
    counters = {"total_attempts": 2, "consecutive_failures": 1, "on_hold_until": hold}
    src.action(q1, "cb-1", max_throughput="3", last_failure_reason="HTTP 500", **counters)
    src.action(q1, "cb-2", inserted_at=NOW - timedelta(minutes=30))  # the latest: 10 per 1 s
    src.action(q2, "cb-3", max_throughput="5", time="2", period="minute")
    src.action(q3, "cb-4", max_throughput=None, time=None, period=None)  # the config's rate
    src.action(q4, "cb-5", max_throughput="lots")  # invalid: the defaults' rate
    src.action(q1, "cb-done", processed=True)
    src.action(q1, "cb-failed", permanently_failed=True)
    src.action(q1, "cb-old", inserted_at=NOW - WEEK - timedelta(minutes=1))
    src.action(q1, "x" * 300)
    src.action("bogus", "cb-bogus")
    src.action(q1, "cb-1", inserted_at=NOW - timedelta(minutes=10))  # a duplicate
    src.action(q1, "cb-existing")  # already in throttled


def seed_throttled(db_url: str) -> None:
    """What throttled holds already: a portal, a config, an action."""
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO portals (portal_id, refresh_token) VALUES (108, 'v1.kept.x')")
        conn.execute(
            "INSERT INTO action_configs (portal_id, action_id, policy) VALUES "
            """(108, 7006, '{"max_throughput": 99}')"""
        )
        (queue_id,) = conn.execute(
            "INSERT INTO queues (key, portal_id, policy) VALUES ('queue:1:1:1:0', 1, '{}') "
            "RETURNING id"
        ).fetchone()
        conn.execute(
            "INSERT INTO actions (callback_id, queue_id, portal_id, deadline) VALUES "
            "('cb-existing', %s, 1, now() + interval '1 day')",
            (queue_id,),
        )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


class Run:
    """`throttled import-throttle` in this process, with a written config file."""

    def __init__(self, tmp_path: Any, db_url: str, src: Source, capsys: Any) -> None:
        raw = config_mapping(db_url, "http://127.0.0.1:9")
        raw["defaults"] = {"max_throughput": 7, "time_period": 3, "time_unit": "seconds"}
        self.key = raw["security"]["encryption_key"]
        path = tmp_path / "throttled.toml"
        path.write_text(
            "".join(
                f"[{section}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
                for section, values in raw.items()
            )
        )
        self.config, self.src, self.capsys = str(path), src, capsys

    def __call__(self, *extra: str, source: str | None = None) -> tuple[int, str, str]:
        argv = ["import-throttle", "--from", source or self.src.url, "--config", self.config]
        code = cli.main([*argv, *extra])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *extra: str) -> dict[str, Any]:
        code, out, err = self("--json", *extra)
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def run(tmp_path, db_url, source, capsys, monkeypatch) -> Run:
    """No configuration from the environment; the original's key in its variable."""
    for name in list(os.environ):
        if name.startswith("THROTTLED_") and not name.startswith("THROTTLED_TEST_"):
            monkeypatch.delenv(name)
    for name in config_module.LEGACY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(logs, "setup", lambda *args, **kwargs: None)
    monkeypatch.setenv("THROTTLE_ENCRYPTION_KEY", source.key_text)
    return Run(tmp_path, db_url, source, capsys)


def snapshot(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    tables = {
        "portals": "portal_id",
        "action_configs": "portal_id, action_id",
        "queues": "id",
        "actions": "id",
        "audit_log": "id",
    }
    with psycopg.connect(db_url) as conn:
        return {
            t: conn.execute(f"SELECT * FROM {t} ORDER BY {o}").fetchall() for t, o in tables.items()
        }


def one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("throttled: ")
    return lines[0]


EXPECTED = {
    "oauth_tokens": {
        "imported": 5,
        "skipped": 4,
        "skip_reasons": {
            "already in throttled": 1,
            "plaintext token (see --accept-plaintext-tokens)": 1,
            "refresh_token cannot decrypt": 1,
            "refresh_token empty": 1,
        },
        "notes": {},
    },
    "throttle_configs": {
        "imported": 3,
        "skipped": 4,
        "skip_reasons": {
            "already configured": 1,
            "invalid action_id": 1,
            "invalid max_throughput": 1,
            "invalid time_unit": 1,
        },
        "notes": {},
    },
    "action_executions": {
        "imported": 5,
        "skipped": 5,
        "skip_reasons": {
            "already in throttled": 1,
            "block expired": 1,
            "callback_id too long": 1,
            "duplicate callback_id": 1,
            "queue_id not queue:{portal}:{workflow}:{action}:{index}": 1,
        },
        "notes": {"queues whose rate fields are invalid (config or defaults used)": 1},
    },
}


def _counts(body: dict[str, Any]) -> dict[str, Any]:
    return {t: {k: v for k, v in c.items() if k != "examples"} for t, c in body["tables"].items()}


def test_import_everything_once(run, source, db_url):
    fill(source)
    seed_throttled(db_url)
    body = run.json()
    assert _counts(body) == EXPECTED
    assert body["dry_run"] is False
    assert body["plaintext_token_portals"] == [107]
    assert body["source"].startswith("import:")
    assert "/throttle_src_" in body["source"]  # the database, by name (a host or a socket)
    examples = body["tables"]["action_executions"]["examples"]
    assert examples["block expired"] == ["cb-old"]
    with psycopg.connect(db_url) as conn:
        portals = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT portal_id, refresh_token, access_token, access_expires_at, status "
                "FROM portals ORDER BY portal_id"
            )
        }
        configs = dict(
            ((r[0], r[1]), r[2])
            for r in conn.execute("SELECT portal_id, action_id, policy FROM action_configs")
        )
        actions = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT a.callback_id, q.key, q.policy, a.state, a.attempts, a.failures, "
                "a.not_before, a.deadline, a.received_at, a.last_error, a.input_fields, "
                "a.portal_id, a.workflow_id FROM actions a JOIN queues q ON q.id = a.queue_id"
            )
        }
        audit = conn.execute(
            "SELECT actor, action, target, before, after FROM audit_log"
        ).fetchall()

    # tokens: decrypted from every format, stored under throttled's key, bound to the portal
    ring = KeyRing.from_texts(run.key)
    assert set(portals) == {101, 102, 103, 104, 105, 108}
    assert portals[108][0] == "v1.kept.x"  # never overwritten
    for pid, (refresh, access) in source.tokens.items():
        sealed_refresh, sealed_access, expires, status = portals[pid]
        assert status == "connected"
        assert refresh not in sealed_refresh
        assert ring.decrypt(sealed_refresh, aad=token_aad(pid, "refresh")) == refresh
        if access is None:
            assert sealed_access is None
        else:
            assert ring.decrypt(sealed_access, aad=token_aad(pid, "access")) == access
            assert expires == (NOW + timedelta(minutes=20)).replace(tzinfo=UTC)

    # configs: as POST /api/config stores them; singular and plural units
    assert configs == {
        (101, 7001): {"max_throughput": 10, "time_period": 1, "time_unit": "second"},
        (101, 7002): {"max_throughput": 100, "time_period": 2, "time_unit": "minutes"},
        (102, 7003): {"max_throughput": 5, "time_period": 1, "time_unit": "hour"},
        (108, 7006): {"max_throughput": 99},  # already configured: kept
    }

    # pending actions: in their queues, with their rates, counters, hold and deadline
    assert set(actions) == {"cb-1", "cb-2", "cb-3", "cb-4", "cb-5", "cb-existing"}

    def policy(limit: int, period: float) -> dict[str, Any]:
        return {"limit": limit, "period_s": period, "pacing": "window", "schedule": None}

    utc = NOW.replace(tzinfo=UTC)
    key, pol, state, attempts, failures, hold, deadline, received, error, fields, portal, wf = (
        actions["cb-1"]
    )
    assert (key, pol, state) == ("queue:101:9001:7001:0", policy(10, 1.0), "pending")
    assert (attempts, failures, error) == (2, 1, "HTTP 500")
    assert hold == utc + timedelta(hours=1)
    assert received == utc - timedelta(hours=1)
    assert deadline == received + WEEK
    assert fields == {"maxThroughput": "3", "time": "1", "period": "seconds"}
    assert (portal, wf) == (101, 9001)
    assert actions["cb-2"][0] == "queue:101:9001:7001:0"
    assert actions["cb-2"][3:6] == (0, 0, None)
    assert actions["cb-3"][:2] == ("queue:102:9002:7003:1", policy(5, 120.0))
    assert actions["cb-4"][:2] == ("queue:101:9001:7002:0", policy(100, 120.0))  # its config
    assert actions["cb-5"][:2] == ("queue:103:9003:7004:0", policy(7, 3.0))  # the defaults

    # one audit entry, with the counts and no secret
    assert len(audit) == 1
    actor, action, target, before, after = audit[0]
    assert actor.startswith("cli:")
    assert (action, target, before) == ("import.throttle", body["source"], None)
    assert after["tables"] == EXPECTED
    assert source.key_text not in json.dumps(after)


def test_text_output_names_counts_and_no_secret(run, source):
    fill(source)
    code, out, err = run()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("import:")
    assert any(
        line.startswith("oauth_tokens") and "6 imported, 3 skipped" in line for line in lines
    )
    assert any(line.startswith("action_executions") and "6 imported" in line for line in lines)
    assert "tokens stored unencrypted in the original: portal(s) 107" in err
    for refresh, access in source.tokens.values():
        assert refresh not in out + err
        assert access is None or access not in out + err
    assert source.key_text not in out + err


def test_second_run_imports_nothing_and_changes_nothing(run, source, db_url):
    fill(source)
    first = run.json()
    before = snapshot(db_url)
    second = run.json()
    assert snapshot(db_url) == before
    for table, counts in second["tables"].items():
        assert counts["imported"] == 0, table
        assert (
            counts["skipped"]
            == first["tables"][table]["skipped"] + first["tables"][table]["imported"]
        )
    assert second["tables"]["oauth_tokens"]["skip_reasons"]["already in throttled"] == 6
    assert second["tables"]["throttle_configs"]["skip_reasons"]["already configured"] == 4
    assert second["tables"]["action_executions"]["skip_reasons"]["already in throttled"] == 6


def test_dry_run_reports_and_writes_nothing(run, source, db_url):
    fill(source)
    seed_throttled(db_url)
    before = snapshot(db_url)
    body = run.json("--dry-run")
    assert body["dry_run"] is True
    assert _counts(body) == EXPECTED
    assert snapshot(db_url) == before
    code, out, _ = run("--dry-run")
    assert code == 0
    assert "(dry run: nothing was written)" in out.splitlines()[0]
    assert snapshot(db_url) == before


def test_wrong_key_is_one_line_and_imports_nothing(run, source, db_url, monkeypatch):
    fill(source)
    before = snapshot(db_url)
    monkeypatch.setenv("THROTTLE_ENCRYPTION_KEY", base64.b64encode(os.urandom(32)).decode())
    line = one_error_line(*run())
    assert "probably the wrong key" in line
    assert snapshot(db_url) == before


def test_key_file_and_plaintext_tokens(run, source, db_url, monkeypatch, tmp_path):
    fill(source)
    monkeypatch.delenv("THROTTLE_ENCRYPTION_KEY")
    key_file = tmp_path / "old.key"
    key_file.write_text(source.key_text + "\n")
    body = run.json("--old-encryption-key-file", str(key_file), "--accept-plaintext-tokens")
    assert body["tables"]["oauth_tokens"]["imported"] == 7  # 107's plaintext, 108's too
    assert body["plaintext_token_portals"] == [107]
    with psycopg.connect(db_url) as conn:
        (sealed,) = conn.execute(
            "SELECT refresh_token FROM portals WHERE portal_id = 107"
        ).fetchone()
    assert (
        KeyRing.from_texts(run.key)
        .decrypt(sealed, aad=token_aad(107, "refresh"))
        .startswith("na1-refresh-107-")
    )


def test_missing_key_missing_table_and_unreachable_source(run, source, monkeypatch):
    fill(source)
    monkeypatch.delenv("THROTTLE_ENCRYPTION_KEY")
    assert "THROTTLE_ENCRYPTION_KEY" in one_error_line(*run())
    assert "not base64" in one_error_line(*run("--old-encryption-key", "not base64!"))
    source.execute("DROP TABLE action_executions")
    line = one_error_line(*run("--old-encryption-key", source.key_text))
    assert "no table action_executions" in line
    password = "pw-s3cret-" + secrets.token_hex(4)
    code, out, err = run(source=f"postgresql://postgres:{password}@127.0.0.1:1/throttle")
    assert "cannot connect to the original's database 127.0.0.1:1/throttle" in one_error_line(
        code, out, err
    )
    assert password not in out + err
    assert "postgresql://" in one_error_line(*run(source="mysql://x@y/z"))


def test_an_older_schema_without_the_later_columns(run, source, db_url):
    for column in ("consecutive_failures", "last_failure_reason", "on_hold_until"):
        source.execute(f"ALTER TABLE action_executions DROP COLUMN {column}")
    source.execute("ALTER TABLE action_executions DROP COLUMN total_attempts")
    source.execute("ALTER TABLE action_executions DROP COLUMN permanently_failed")
    source.action("queue:201:1:2:0", "cb-a")
    source.action("queue:201:1:2:0", "cb-b", processed=True)
    body = run.json()
    assert body["tables"]["action_executions"]["imported"] == 1
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT callback_id, attempts, failures, not_before, last_error FROM actions"
        ).fetchall()
    assert row == [("cb-a", 0, 0, None, None)]


def test_help_has_an_example(capsys):
    assert cli.main(["import-throttle", "--help"]) == 0
    out = capsys.readouterr().out
    assert "throttled import-throttle --from postgresql://" in out
    assert "--old-encryption-key-file" in out


# --- the original's token formats ------------------------------------------------------------


def test_decrypts_every_format_and_tells_failures_apart():
    key = os.urandom(32)
    keys = legacy_crypto.parse_old_key(base64.b64encode(key).decode())
    assert keys == (key, hashlib.sha256(key).digest())
    for sealed in (gcm_v2(key, "tok-1"), cbc(key, "tok-1"), cbc(keys[1], "tok-1")):
        assert legacy_crypto.decrypt(sealed, keys) == "tok-1"
    with pytest.raises(legacy_crypto.CannotDecrypt):
        legacy_crypto.decrypt(gcm_v2(os.urandom(32), "tok-1"), keys)
    with pytest.raises(legacy_crypto.CannotDecrypt):
        legacy_crypto.decrypt(cbc(os.urandom(32), "a-longer-token-" * 3), keys)
    for plain in ("na1-abc-def", "c2hvcnQ="):  # not base64; base64 of a too-short value
        with pytest.raises(legacy_crypto.NotCiphertext):
            legacy_crypto.decrypt(plain, keys)


def test_a_key_not_32_bytes_long_is_used_through_sha256():
    short = os.urandom(20)
    keys = legacy_crypto.parse_old_key(base64.b64encode(short).decode().rstrip("="))
    assert keys == (hashlib.sha256(short).digest(),)
    assert legacy_crypto.decrypt(cbc(keys[0], "tok-2"), keys) == "tok-2"
    for bad in ("", "   ", "not base64!"):
        with pytest.raises(legacy_crypto.KeyFormatError):
            legacy_crypto.parse_old_key(bad)
