"""Configuration: TOML parsing, environment overrides, validation, masking."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from throttled import config as config_module
from throttled.config import ConfigError


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "throttled.toml"
    path.write_text(text)
    return str(path)


def test_example_config_is_valid_and_documents_every_key():
    cfg = config_module.load("throttled.toml", environ={})
    example = Path("throttled.toml").read_text()
    for section, values in config_module.masked(cfg).items():
        assert f"[{section}]" in example
        for key in values:
            assert f"\n{key} =" in example, f"{section}.{key} is not documented"


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_module.load(None, environ={})
    assert cfg.server.port == 8080
    assert cfg.sender.batch_size == 100
    assert (cfg.sender.portal_requests, cfg.sender.portal_interval_seconds) == (100, 10.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown config key server.prot"),
        ("[nope]\nx = 1\n", "unknown config section [nope]"),
        ("[server]\nport = 'eighty'\n", "server.port: expected an integer"),
        ("[server]\nport = 70000\n", "server.port"),
        ("[sender]\nbatch_size = 101\n", "sender.batch_size"),
        ("[hubspot]\nblock_expiration = 'one week'\n", "hubspot.block_expiration"),
        ("[hubspot]\nmock = 'yes'\n", "hubspot.mock: expected true or false"),
        ("[defaults]\ntime_unit = 'fortnights'\n", "time_unit"),
        ("[defaults]\nmax_throughput = 0\n", "max_throughput"),
        ("server = 1\n", "server: must be a table"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_module.load(_write(tmp_path, text), environ={})


def test_environment_overrides_including_the_original_names(tmp_path):
    path = _write(tmp_path, "[server]\nport = 9000\n")
    cfg = config_module.load(
        path,
        environ={
            "PORT": "9100",
            "DATABASE_URL": "postgresql://u:pw@db:5432/x",
            "HUBSPOT_CLIENT_SECRET": "s3cret-from-env",
            "BASE_URL": "https://throttle.example.com",
            "THROTTLED_SENDER_BATCH_SIZE": "50",
            "THROTTLED_HUBSPOT_MOCK": "true",
        },
    )
    assert cfg.server.port == 9100
    assert cfg.database.url.reveal() == "postgresql://u:pw@db:5432/x"
    assert cfg.hubspot.client_secret.reveal() == "s3cret-from-env"
    assert cfg.server.public_url == "https://throttle.example.com"
    assert cfg.sender.batch_size == 50
    assert cfg.hubspot.mock is True


def test_bad_environment_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"sender\.batch_size"):
        config_module.load(None, environ={"THROTTLED_SENDER_BATCH_SIZE": "many"})
    with pytest.raises(ConfigError, match="THROTTLED_NOPE_X"):
        config_module.load(None, environ={"THROTTLED_NOPE_X": "1"})


def test_secrets_never_show_in_repr_or_masked_output(tmp_path):
    secret = "s3cret-value-do-not-print"
    path = _write(
        tmp_path,
        f'[hubspot]\nclient_secret = "{secret}"\n[security]\nencryption_key = "{secret}"\n'
        f'[database]\nurl = "postgresql://u:{secret}@db/x"\n',
    )
    cfg = config_module.load(path, environ={})
    assert secret not in repr(cfg)
    assert secret not in json.dumps(config_module.masked(cfg))


def test_check_config_cli_masks_secrets_and_rejects_bad_files(tmp_path):
    secret = "another-s3cret-value"
    good = _write(tmp_path, f'[hubspot]\nclient_secret = "{secret}"\n')
    run = subprocess.run(
        [sys.executable, "-m", "throttled", "check-config", "--config", good],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert secret not in run.stdout + run.stderr
    assert '"client_secret": "***"' in run.stdout
    bad = _write(tmp_path, "[server]\nprot = 1\n")
    run = subprocess.run(
        [sys.executable, "-m", "throttled", "check-config", "--config", bad],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert "unknown config key server.prot" in run.stderr


def test_iso_durations():
    assert config_module.parse_iso_duration("P7D") == 7 * 86400
    assert config_module.parse_iso_duration("PT15M") == 900
    assert config_module.parse_iso_duration("P1WT1H") == 7 * 86400 + 3600
    for bad in ("", "P", "PT", "7D", "P1Y"):
        with pytest.raises(ValueError, match="ISO-8601"):
            config_module.parse_iso_duration(bad)


def test_database_url_is_shown_with_only_the_password_masked(tmp_path):
    path = _write(tmp_path, '[database]\nurl = "postgresql://app:pw-s3cret@db.internal:5432/thr"\n')
    shown = config_module.masked(config_module.load(path, environ={}))["database"]["url"]
    assert shown == "postgresql://app:***@db.internal:5432/thr"


def test_sign_cli_matches_the_documented_vector(tmp_path):
    body = tmp_path / "body.json"
    body.write_bytes(b'{"example_field":"example_value"}')
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "throttled",
            "sign",
            "--secret",
            "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy",
            "--url",
            "https://www.example.com/webhook_uri",
            "--body",
            str(body),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = dict(line.split(": ", 1) for line in run.stdout.strip().splitlines())
    assert lines["X-HubSpot-Signature"] == (
        "9569219f8ba981ffa6f6f16aa0f48637d35d728c7e4d93d0d52efaa512af7900"
    )
    assert lines["X-HubSpot-Signature-Version"] == "v2"
