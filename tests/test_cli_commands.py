"""The command line against a real PostgreSQL: migrate, serve's refusal, portals, demo."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import with_database


@pytest.fixture
def empty_db(pg_server_url: str) -> Iterator[str]:
    """A database with no schema at all."""
    name = f"throttled_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield with_database(pg_server_url, name)
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _run(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("THROTTLED_", "DATABASE"))}
    return subprocess.run(
        [sys.executable, "-m", "throttled", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        input=stdin,
        timeout=120,
        check=False,
    )


def test_serve_refuses_pending_migrations_then_migrate_applies_them(empty_db, tmp_path):
    env = {
        "DATABASE_URL": empty_db,
        "HUBSPOT_CLIENT_SECRET": "cli-test-secret",
        "ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "THROTTLED_SERVER_PORT": "0",
    }
    config = tmp_path / "throttled.toml"
    config.write_text("[logging]\nformat = 'json'\n")
    refused = _run("serve", "--config", str(config), env=env)
    assert refused.returncode == 2
    assert "migration(s) pending" in refused.stderr
    assert "throttled migrate" in refused.stderr

    status = _run("migrate", "--status", "--config", str(config), env=env)
    assert status.returncode == 0, status.stderr
    assert "pending  0001.initial" in status.stdout

    applied = _run("migrate", "--config", str(config), env=env)
    assert applied.returncode == 0, applied.stderr
    assert "0001.initial" in applied.stdout
    status = _run("migrate", "--status", "--config", str(config), env=env)
    assert "applied  0001.initial" in status.stdout


def test_portals_connect_stores_the_token_encrypted(db_url, tmp_path):
    env = {
        "DATABASE_URL": db_url,
        "ENCRYPTION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    }
    config = tmp_path / "throttled.toml"
    config.write_text("")
    token = "refresh-" + secrets.token_hex(8)
    done = _run(
        "portals",
        "connect",
        "--portal-id",
        "77",
        "--config",
        str(config),
        env=env,
        stdin=token + "\n",
    )
    assert done.returncode == 0, done.stderr
    assert token not in done.stdout + done.stderr
    with psycopg.connect(db_url) as conn:
        stored = conn.execute("SELECT refresh_token FROM portals WHERE portal_id = 77").fetchone()
    assert stored is not None
    assert stored[0].startswith("v1.")
    assert token not in stored[0]
    bad = _run(
        "portals",
        "connect",
        "--portal-id",
        "0",
        "--refresh-token",
        "x",
        "--config",
        str(config),
        env=env,
    )
    assert bad.returncode == 2


def test_demo_drains_its_queues_and_reports_rates(db_url):
    env = {
        "DATABASE_URL": db_url,
        "THROTTLED_SERVER_PORT": "0",
        "THROTTLED_SERVER_PUBLIC_URL": "",
        "THROTTLED_LOGGING_LEVEL": "warning",
    }
    run = _run("demo", "--config", "throttled.dev.toml", "--per-queue", "4", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["queue", "configured"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"fast", "even", "burst"}
    limits = {"fast": 10, "even": 4, "burst": 15}
    for name, tokens in rows.items():
        sent, peak = int(tokens[-6]), int(tokens[-5])
        assert sent == 4, tokens  # every queue drained
        assert peak <= limits[name], tokens  # never more than the limit in a window
