"""What a production install relies on: the migrations shipped as package data, /readyz on a
schema that is not this build's, and the systemd unit and example files matching the code.
(The wheel itself is built, installed and run by .ci/wheel-check.)"""

from __future__ import annotations

import configparser
import hashlib
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest

import throttled
from throttled import config as config_module
from throttled.db import migrate

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "throttled.service"


def test_the_migrations_are_package_data():
    folder = Path(throttled.__file__).parent / "migrations"
    with migrate._folder() as found:
        assert found == folder
    ids = [m.id for m in migrate._read_migrations()]
    assert ids[0] == "0001.initial"
    assert ids == sorted(p.stem for p in folder.glob("*.sql"))
    assert not (ROOT / "migrations").exists()  # (one copy, in the package)
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert "migrations/*.sql" in setup["options.package_data"]["throttled"]


def test_an_empty_migrations_folder_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.setattr(migrate, "MIGRATIONS_DIR", tmp_path)
    with pytest.raises(migrate.MigrationError) as caught:
        migrate.check("postgresql://postgres@127.0.0.1:1/x")
    assert str(caught.value) == (
        f"no migrations found in {tmp_path}; the installation is incomplete"
    )


def test_schema_state_is_current_on_a_migrated_database(db_url):
    state = migrate.check(db_url)
    assert state == migrate.SchemaState(pending=(), unknown=0)
    assert state.problem() == ""


def _add_unknown_migration(db_url: str) -> None:
    """A migration applied by a newer version of throttled than this one."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO _yoyo_migration (migration_hash, migration_id, applied_at_utc)"
            " VALUES (%s, '9999.from-the-future', now())",
            (hashlib.sha256(b"9999.from-the-future").hexdigest(),),
        )


async def test_readyz_is_503_on_a_schema_from_a_newer_version(db_url, daemon_factory):
    _add_unknown_migration(db_url)
    assert migrate.check(db_url).unknown == 1
    async with daemon_factory() as daemon:
        async with daemon.session.get(daemon.url + "/readyz") as resp:
            body = await resp.json()
        assert resp.status == 503
        assert body["status"] == "migrations_not_current"
        assert "1 migration(s) this build does not have" in body["reason"]
        async with daemon.session.get(daemon.url + "/healthz") as resp:
            assert resp.status == 200  # (alive, only not ready)


async def test_readyz_is_200_on_a_current_schema(daemon_factory):
    async with daemon_factory() as daemon, daemon.session.get(daemon.url + "/readyz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ready"})


def _unit() -> dict[str, list[str]]:
    """The unit's [Service] settings, every value of each (they may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_is_a_notify_service_with_migrations_first():
    unit = _unit()
    assert unit["Type"] == ["notify"]
    assert unit["NotifyAccess"] == ["main"]
    assert unit["WatchdogSec"] == ["30s"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["DynamicUser"] == ["yes"]
    assert unit["ExecStartPre"][0].split()[1:3] == ["migrate", "--config"]
    assert unit["ExecStart"][0].split()[1] == "serve"
    assert "ProcSubset" not in unit  # (it would empty the metrics' process collector)
    # the drain (server.shutdown_timeout_s, 30 s by default) ends before SIGKILL
    assert (
        int(unit["TimeoutStopSec"][0].rstrip("s")) > config_module.ServerConfig().shutdown_timeout_s
    )


def test_the_units_credentials_are_names_throttled_reads():
    known = {*config_module.credential_names(), config_module.ADMIN_CREDENTIAL}
    lines = [
        line.lstrip("# ") for line in UNIT.read_text().splitlines() if "LoadCredential=" in line
    ]
    names = [line.partition("=")[2].partition(":")[0] for line in lines]
    assert {"database_url", "security_encryption_key", "hubspot_client_secret"} <= set(names)
    assert set(names) <= known


def test_the_production_example_config_is_valid(tmp_path):
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "database_url").write_text("postgresql://throttled:x@127.0.0.1:5432/throttled")
    (creds / "hubspot_client_secret").write_text("placeholder")
    example = ROOT / "systemd" / "throttled.toml.example"
    cfg = config_module.load(str(example), {"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.logging.format == "json"
    assert not cfg.database.auto_migrate  # (ExecStartPre= migrates)
    assert cfg.server.shutdown_timeout_s < 45  # TimeoutStopSec=45s


def test_the_env_example_sets_only_known_variables(tmp_path):
    example = ROOT / "systemd" / "throttled.env.example"
    environ = {}
    for line in example.read_text().splitlines():
        text = line.lstrip("# ")
        name, eq, value = text.partition("=")
        if eq and name.isupper() and " " not in name:
            environ[name] = value
    assert "THROTTLED_SERVER_PORT" in environ
    assert "DATABASE_URL" in environ
    assert all(
        name in config_module.LEGACY_ENV or name.startswith("THROTTLED_") for name in environ
    )
    overrides = {n: v for n, v in environ.items() if n.startswith("THROTTLED_") and "<" not in v}
    config_module.from_mapping(config_module._apply_env({}, overrides))  # (known keys only)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_the_units_exposure_is_at_most_2():
    report = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=True,
        env={"SYSTEMD_COLORS": "0", "PATH": "/usr/bin:/bin"},
    ).stdout
    line = next(line for line in report.splitlines() if "Overall exposure level" in line)
    assert float(line.split(":")[1].split()[0]) <= 2.0, line
