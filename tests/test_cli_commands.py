"""The command line against a real PostgreSQL: migrate, serve's refusal, portals, demo."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import with_database
from throttled import cli, logs
from throttled import config as config_module
from throttled.db import migrate


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


# --- every command fails with one line on stderr ---------------------------------------------

UNREACHABLE = "postgresql://postgres:pw-s3cret-9@127.0.0.1:1/x"


@pytest.fixture
def in_process(monkeypatch):
    """Run cli.main in this process: no environment config, no global logging set-up."""
    for name in list(os.environ):
        if name.startswith("THROTTLED_") and not name.startswith("THROTTLED_TEST_"):
            monkeypatch.delenv(name)
    for name in config_module.LEGACY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(logs, "setup", lambda *args, **kwargs: None)


def _one_line(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert exit 2 and exactly one 'throttled: ' line on stderr."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("throttled: "), err
    return lines[0]


def _config_file(tmp_path, url: str, **extra: str) -> str:
    path = tmp_path / "throttled.toml"
    text = f'[database]\nurl = "{url}"\nconnect_timeout_s = 2.0\n'
    text += f'[security]\nencryption_key = "{base64.b64encode(secrets.token_bytes(32)).decode()}"\n'
    text += '[hubspot]\nclient_secret = "cli-test-secret"\n[server]\nport = 0\n'
    path.write_text(text + "".join(f"{line}\n" for line in extra.values()))
    return str(path)


def test_sign_with_a_missing_or_directory_body_is_one_line(in_process, capsys, tmp_path):
    base = ["sign", "--secret", "s", "--url", "https://example.com/x", "--body"]
    line = _one_line(capsys, [*base, str(tmp_path / "missing.json")])
    assert "--body: cannot read" in line
    assert "No such file" in line
    assert "Is a directory" in _one_line(capsys, [*base, str(tmp_path)])
    assert "--body: empty path" in _one_line(capsys, [*base, ""])


@pytest.mark.parametrize("portal_id", ["99999999999999999999999", "0", "-1", "x", "9" * 5000])
def test_portal_id_out_of_range_is_one_line(in_process, capsys, portal_id):
    line = _one_line(
        capsys, ["portals", "connect", "--portal-id", portal_id, "--refresh-token", "x"]
    )
    assert "--portal-id: must be an integer 1..9223372036854775807" in line
    assert len(line) < 300


def test_an_empty_config_path_is_an_error(in_process, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no default file here: the old code silently used defaults
    for command in (["check-config"], ["serve"], ["migrate"], ["migrate", "--status"]):
        assert _one_line(capsys, [*command, "--config", ""]) == "throttled: --config: empty path"


def test_a_config_path_that_is_a_directory_is_one_line(in_process, capsys, tmp_path):
    assert "is a directory" in _one_line(capsys, ["check-config", "--config", str(tmp_path)])


def test_an_unexpected_error_is_one_internal_error_line(in_process, capsys, monkeypatch):
    def boom(cfg):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(config_module, "masked", boom)
    line = _one_line(capsys, ["check-config", "--config", "throttled.dev.toml"])
    assert line == "throttled: internal error: RuntimeError: boom second line"


def test_an_unexpected_error_in_json_mode_logs_the_traceback_as_one_json_line(tmp_path):
    config = _config_file(tmp_path, UNREACHABLE, logging='[logging]\nformat = "json"')
    script = (
        "import sys, throttled.daemon as d\n"
        "async def serve(cfg, stop): raise KeyError('kaput')\n"
        "d.serve = serve\n"
        "from throttled import cli\n"
        f"sys.exit(cli.main(['serve', '--config', {config!r}]))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[-1] == "throttled: internal error: KeyError: 'kaput'"
    logged = [json.loads(line) for line in lines[:-1]]
    assert [entry["event"] for entry in logged] == ["command_failed"]
    assert logged[0]["level"] == "error"
    assert "Traceback" in logged[0]["exception"]


@pytest.mark.parametrize(
    "command",
    [
        ["serve"],
        ["migrate"],
        ["migrate", "--status"],
        ["portals", "connect", "--portal-id", "7"],
        ["portals", "list"],
        ["portals", "show", "7"],
        ["portals", "test", "7"],
        ["portals", "disconnect", "7"],
        ["keys", "rotate"],
    ],
)
def test_an_unreachable_database_is_one_line_without_the_password(tmp_path, command):
    config = _config_file(tmp_path, UNREACHABLE, logging='[logging]\nformat = "json"')
    run = subprocess.run(
        [str(Path(sys.executable).parent / "throttled"), *command, "--config", config],
        capture_output=True,
        text=True,
        input="refresh-token\n",
        env={k: v for k, v in os.environ.items() if not k.startswith(("THROTTLED_", "DATABASE"))},
        timeout=60,
        check=False,
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(("throttled: cannot ", "throttled: database unavailable: "))
    assert "Connection refused" in lines[0] or "Connect call failed" in lines[0]
    assert "pw-s3cret-9" not in run.stdout + run.stderr


# --- an installation without its migrations refuses to migrate or serve -----------------------


@pytest.mark.parametrize("folder", ["empty", "missing"])
@pytest.mark.parametrize("command", [["migrate"], ["migrate", "--status"], ["serve"]])
def test_no_migrations_found_refuses(
    in_process, capsys, monkeypatch, tmp_path, empty_db, folder, command
):
    migrations = tmp_path / "migrations"
    if folder == "empty":
        migrations.mkdir()
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", migrations)
    line = _one_line(capsys, [*command, "--config", _config_file(tmp_path, empty_db)])
    assert line == (
        f"throttled: no migrations found in {migrations}; the installation is incomplete"
    )
    with psycopg.connect(empty_db) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)


def test_pending_raises_migration_error_when_the_folder_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", tmp_path / "nope")
    with pytest.raises(migrate.MigrationError, match="no migrations found"):
        migrate.pending(UNREACHABLE)


def test_migration_errors_never_show_the_password():
    with pytest.raises(migrate.MigrationError) as caught:
        migrate.apply("postgresql://postgres:pw-s3cret-9@127.0.0.1:notaport/x")
    assert "pw-s3cret-9" not in str(caught.value)
    with pytest.raises(migrate.MigrationError) as caught:
        migrate.status("nodriver://postgres:pw-s3cret-9@127.0.0.1/x")
    assert "pw-s3cret-9" not in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["portals"], "required: {list,show,test,disconnect,connect}"),
        (["keys"], "required: {generate,rotate}"),
        (["portals", "show"], "required: ID"),
        (["portals", "test", "x"], "argument ID: must be an integer 1..9223372036854775807"),
        (["portals", "disconnect", "0"], "argument ID: must be an integer"),
        (["keys", "rotate", "--batch-size", "0"], "--batch-size: must be an integer 1..10000"),
        (["keys", "generate", "--config", "x"], "2 unrecognized argument(s) (not shown)"),
        (["portals", "connect", "--portal-id", "5", "a-token-typed-here"], "(not shown)"),
    ],
)
def test_portals_and_keys_usage_errors_are_one_line(in_process, capsys, argv, expected):
    assert expected in _one_line(capsys, argv)


def test_keys_generate_needs_no_config(in_process, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["keys", "generate"]) == 0
    out, err = capsys.readouterr()
    assert len(base64.b64decode(out.strip(), validate=True)) == 32
    assert out.count("\n") == 1
    assert "throttled keys rotate" in err


TOKEN_LIKE = "5f1c7d2e-8a9b-4c3d-9e0f-1a2b3c4d5e6f"


@pytest.mark.parametrize(
    "argv",
    [
        ["portals", "connect", "--portal-id", "5", TOKEN_LIKE],
        ["portals", "connect", "--portal-id", TOKEN_LIKE],
        ["portals", "show", TOKEN_LIKE],
    ],
)
def test_a_token_typed_in_the_wrong_place_is_not_echoed(in_process, capsys, argv):
    line = _one_line(capsys, argv)
    assert TOKEN_LIKE not in line


@pytest.mark.parametrize("portal_id", ["١٢٣", "1_000", "+5", " 5 ", "5.0", "0x10"])
def test_a_portal_id_is_plain_ascii_digits(in_process, capsys, portal_id):
    assert "must be an integer" in _one_line(capsys, ["portals", "show", portal_id])


@pytest.mark.parametrize("token", ["has space token", "é" * 40, "tab\there", "x" * 4097])
def test_connect_refuses_a_token_no_refresh_could_send(in_process, capsys, tmp_path, token):
    config = _config_file(tmp_path, UNREACHABLE)
    line = _one_line(
        capsys,
        ["portals", "connect", "--portal-id", "5", "--refresh-token", token, "--config", config],
    )
    assert "printable ASCII characters without spaces" in line
    assert token not in line
