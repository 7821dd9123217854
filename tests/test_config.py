"""Configuration: TOML parsing, environment overrides, validation, masking."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import typing
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
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    path = _write(
        tmp_path,
        f'[hubspot]\nclient_secret = "{secret}"\n[security]\nencryption_key = "{key}"\n'
        f'[database]\nurl = "postgresql://u:{secret}@db/x"\n',
    )
    cfg = config_module.load(path, environ={})
    assert secret not in repr(cfg)
    assert key not in repr(cfg)
    shown = json.dumps(config_module.masked(cfg))
    assert secret not in shown
    assert key not in shown


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


def _key(size: int = 32) -> str:
    return base64.b64encode(secrets.token_bytes(size)).decode()


def _build(raw: dict, environ: dict) -> config_module.Config:
    """A validated Config from a TOML-shaped mapping and an environment."""
    cfg = config_module.from_mapping(config_module._apply_env(raw, environ))
    config_module.validate(cfg)
    return cfg


def _rejected(raw: dict, environ: dict | None = None) -> str:
    """The ConfigError message for a config mapping (plus environment) that must fail."""
    with pytest.raises(ConfigError) as caught:
        _build(raw, environ or {})
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- A: hubspot.block_expiration ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "P3000000D",
        "P99999999999999999999D",
        "P" + "9" * 5000 + "D",
        "PT" + "9" * 400 + "S",
        "P366D",
        "P53W",
        "P0D",
        "PT0S",
        "PT1\u017f",  # LATIN SMALL LETTER LONG S: upper() turns it into S
    ],
)
def test_block_expiration_beyond_a_year_or_not_positive_is_refused(text):
    message = _rejected({"hubspot": {"block_expiration": text}})
    assert message.startswith("hubspot.block_expiration: ")
    assert len(message) < 200


def test_block_expiration_says_the_limit_and_accepts_up_to_a_year():
    message = _rejected({"hubspot": {"block_expiration": "P3000000D"}})
    assert "must be at most P365D (365 days)" in message
    for text in ("P365D", "P52W", "PT1S", "P7D"):
        cfg = config_module.from_mapping({"hubspot": {"block_expiration": text}})
        config_module.validate(cfg)
        assert 0 < cfg.block_expiration_s() <= 365 * 86400


@pytest.mark.parametrize(
    "text", ["P" + "9" * 5000 + "D", "PT" + "1" * 400 + ".5S", "P1\u0663D", None, 7, "p7d\x00"]
)
def test_parse_iso_duration_raises_only_value_error_and_never_returns_inf(text):
    with pytest.raises(ValueError, match="duration"):
        config_module.parse_iso_duration(text)


# --- B: masking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u@h/db?password=hunter2", "postgresql://u@h/db?password=***"),
        (
            "postgresql://u:pw9@h:5432/db?sslmode=require&PassWord=hunter2&sslkey=/k&x=1",
            "postgresql://u:***@h:5432/db?sslmode=require&PassWord=***&sslkey=***&x=1",
        ),
        (
            "postgres://u@h/db?auth_token=hunter2&client_secret=hunter2&api_credential=hunter2",
            "postgres://u@h/db?auth_token=***&client_secret=***&api_credential=***",
        ),
        ("postgresql://u@h/db?pass%77ord=hunter2", "postgresql://u@h/db?pass%77ord=***"),
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_check_config_masks_credential_query_parameters(tmp_path, url, shown):
    path = _write(tmp_path, f'[database]\nurl = "{url}"\n')
    assert config_module.masked(config_module.load(path, environ={}))["database"]["url"] == shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@h:notaport/db",
        "postgresql://u:hunter2@[::1/db",
        "postgresql://u:hunter2@h:99999999/db",
        "hunter2",
        "://u:hunter2@",
        "postgresql://u:hunter2@h/db#hunter2",
        "postgresql://u:hunter2@h/db?token",
    ],
)
def test_mask_url_survives_malformed_urls(url):
    shown = config_module.mask_url(url)
    assert "hunter2" not in shown


def test_a_bad_database_url_is_refused_without_echoing_it():
    for url in ("postgresql://u:hunter2@h:notaport/db", "mysql://u:hunter2@h/db", "hunter2"):
        message = _rejected({"database": {"url": url}})
        assert message.startswith("database.url: ")
        assert "hunter2" not in message


def test_a_secret_that_looks_like_a_url_is_still_masked():
    cfg = config_module.from_mapping(
        {"hubspot": {"client_secret": "x://hunter2", "previous_client_secrets": ["y://hunter2"]}}
    )
    shown = config_module.masked(cfg)["hubspot"]
    assert (shown["client_secret"], shown["previous_client_secrets"]) == ("***", ["***"])


# --- C: values that passed check-config and then crashed or misbehaved ----------------------


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("retention", "done_days", 1000000.0),
        ("retention", "done_days", 1e300),
        ("retention", "failed_days", -1),
        ("retention", "days", 0),
        ("alerts", "error_rate_threshold", 0),
        ("alerts", "max_attempts", 0),
        ("retention", "interval_s", 0),
        ("ingest", "retry_after_s", -5),
        ("hubspot", "request_timeout_s", -5),
        ("server", "shutdown_timeout_s", float("inf")),
        ("server", "shutdown_timeout_s", float("nan")),
        ("server", "shutdown_timeout_s", 10**400),
        ("server", "body_timeout_s", 0),
        ("server", "port", 10**400),
        ("sender", "hold_after_failures", 0),
        ("sender", "max_attempts", 10**6),
        ("sender", "hold_s", 1e12),
        ("database", "connect_timeout_s", -1),
    ],
)
def test_numbers_out_of_range_name_the_key(section, key, value):
    message = _rejected({section: {key: value}})
    assert message.startswith(f"{section}.{key}: ")


def test_done_and_failed_retention_default_to_retention_days():
    cfg = config_module.from_mapping({"retention": {"days": 10.0}})
    assert (cfg.retention.done_after_days(), cfg.retention.failed_after_days()) == (10.0, 10.0)
    cfg = config_module.from_mapping({"retention": {"days": 10.0, "done_days": 2.0}})
    assert (cfg.retention.done_after_days(), cfg.retention.failed_after_days()) == (2.0, 10.0)
    defaults = config_module.Config().retention
    assert (defaults.done_after_days(), defaults.failed_after_days()) == (30.0, 30.0)


def test_the_alert_webhook_url_is_a_secret_checked_without_echo():
    url = "https://hooks.slack.com/services/T000/B000/s3cretPathPart"
    cfg = config_module.load(None, environ={"THROTTLED_ALERTS_WEBHOOK_URL": url})
    assert cfg.alerts.webhook_url.reveal() == url
    assert "s3cretPathPart" not in repr(cfg)
    assert config_module.masked(cfg)["alerts"]["webhook_url"] == "***"
    for bad in ("hooks.slack.com/s3cretPathPart", "https:///s3cretPathPart", "ftp://x/s3cret"):
        message = _rejected({"alerts": {"webhook_url": bad}})
        assert message.startswith("alerts.webhook_url: ")
        assert "s3cret" not in message


def test_toml_inf_nan_and_huge_integers_are_one_clean_error(tmp_path):
    for text in ("inf", "nan", "-inf", "1e400", str(10**400)):
        with pytest.raises(ConfigError, match=r"^server\.shutdown_timeout_s: "):
            config_module.load(_write(tmp_path, f"[server]\nshutdown_timeout_s = {text}\n"), {})
    with pytest.raises(ConfigError, match="invalid TOML"):
        config_module.load(_write(tmp_path, f"[server]\nport = {'9' * 5000}\n"), {})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("THROTTLED_RETENTION_DONE_DAYS", "inf"),
        ("THROTTLED_RETENTION_DONE_DAYS", "nan"),
        ("THROTTLED_RETENTION_DONE_DAYS", "9" * 5000),
        ("THROTTLED_RETENTION_BATCH_SIZE", "9" * 5000),
        ("THROTTLED_SERVER_SHUTDOWN_TIMEOUT_S", "1e999"),
        ("PORT", "-1"),
    ],
)
def test_environment_numbers_are_bounded(name, value):
    message = _rejected({}, {name: value})
    assert len(message) < 300
    section_key = {"PORT": "server.port"}.get(name) or name[10:].lower().replace("_", ".", 1)
    assert message.startswith(section_key)


@pytest.mark.parametrize(
    ("security", "message"),
    [
        ({"encryption_key": "not base64 at all!"}, r"^security\.encryption_key: "),
        ({"encryption_key": _key(16)}, r"^security\.encryption_key: .*32 bytes"),
        (
            {"encryption_key": _key(), "previous_encryption_keys": [_key(), _key(), _key(16)]},
            r"^security\.previous_encryption_keys\[2\]: ",
        ),
        ({"previous_encryption_keys": ["zz"]}, r"^security\.previous_encryption_keys\[0\]: "),
        ({"previous_encryption_keys": [_key(), ""]}, r"previous_encryption_keys\[1\]: "),
    ],
)
def test_encryption_keys_are_checked_at_validate_time(security, message):
    assert re.search(message, _rejected({"security": security}))


def test_an_empty_encryption_key_is_allowed_at_validate_time():
    cfg = config_module.from_mapping({"security": {"encryption_key": ""}})
    config_module.validate(cfg)
    environ = {"THROTTLED_SECURITY_PREVIOUS_ENCRYPTION_KEYS": f" {_key()} ,, {_key()},"}
    cfg = config_module.load(None, environ=environ)
    assert len(cfg.security.previous_encryption_keys) == 2


def test_check_config_rejects_a_bad_key_without_printing_it(tmp_path):
    key = _key(16)
    path = _write(tmp_path, f'[security]\nencryption_key = "{key}"\n')
    run = subprocess.run(
        [sys.executable, "-m", "throttled", "check-config", "--config", path],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("throttled: security.encryption_key: ")
    assert key not in run.stdout + run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_config_file_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "throttled.toml"
    path.write_bytes(b'[hubspot]\nclient_id = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        config_module.load(str(path), environ={})


def test_a_config_path_that_is_a_directory_or_empty_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        config_module.load(str(tmp_path), environ={})
    with pytest.raises(ConfigError, match="empty path"):
        config_module.load("", environ={})
    with pytest.raises(ConfigError, match="cannot read"):
        config_module.load("x" * 5000, environ={})


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_config_file_is_one_error(tmp_path):
    path = Path(_write(tmp_path, "[server]\n"))
    path.chmod(0)
    with pytest.raises(ConfigError, match="cannot read"):
        config_module.load(str(path), environ={})


def test_every_numeric_key_has_a_range_documented_in_the_example():
    example = Path("throttled.toml").read_text()
    ranges = config_module.ranges()
    for section, cls in config_module.sections().items():
        for name, kind in typing.get_type_hints(cls).items():
            if kind not in (int, float):
                continue
            key = f"{section}.{name}"
            assert key in ranges, f"{key} has no range"
            assert str(ranges[key]) in _comment(example, section, name), f"{key}: not documented"


def _comment(example: str, section: str, key: str) -> str:
    """The comment of a key in the example file, with its continuation lines."""
    body = example.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
    first, *rest = body.split(f"\n{key} =", 1)[1].splitlines()
    more = itertools.takewhile(lambda line: line.lstrip().startswith("#"), rest)
    return " ".join([first, *more])


def test_rate_errors_become_config_errors(monkeypatch):
    message = _rejected({"defaults": {"time_period": 400, "time_unit": "days"}})
    assert message.startswith("defaults.time_period")

    def overflow(specs):
        raise OverflowError("date value out of range")

    monkeypatch.setattr(config_module.rates, "resolve", overflow)
    assert _rejected({}).startswith("defaults: ")


# --- more of the same kind -------------------------------------------------------------------


def test_a_key_set_twice_in_the_environment_is_an_error():
    message = _rejected({}, {"THROTTLED_SERVER_PORT": "1", "THROTTLED_server_port": "2"})
    assert message.startswith("server.port: set twice")
    message = _rejected({}, {"THROTTLED_SERVER_PROT": "1"})
    assert "THROTTLED_SERVER_PROT" in message
    assert "server.prot" in message


def test_the_throttled_form_wins_over_a_legacy_name():
    cfg = config_module.load(None, environ={"PORT": "9100", "THROTTLED_SERVER_PORT": "9200"})
    assert cfg.server.port == 9200


def test_an_environment_value_error_names_the_variable():
    message = _rejected({}, {"PORT": "eighty"})
    assert message.startswith("server.port (from PORT): expected an integer")


def test_a_section_that_is_not_a_table_is_an_error_even_with_env_overrides():
    assert _rejected({"server": 1}, {"THROTTLED_SERVER_PORT": "1"}).startswith("server: must")
    assert _rejected({"server": [1]}).startswith("server: must be a table")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"database": {"data_dir": "var\x00x"}}, r"^database\.data_dir: .*control"),
        ({"server": {"host": "127.0.0.1\n"}}, r"^server\.host: .*control"),
        ({"hubspot": {"client_secret": "a\x00b"}}, r"^hubspot\.client_secret: "),
        ({"hubspot": {"mock": "true"}}, r"^hubspot\.mock: expected true or false"),
        ({"hubspot": {"previous_client_secrets": ["ok", 5]}}, r"previous_client_secrets\[1\]"),
        ({"hubspot": {"previous_client_secrets": "ok"}}, r"expected a list"),
        ({"hubspot": {"api_base_url": "http://"}}, r"^hubspot\.api_base_url: "),
        ({"hubspot": {"api_base_url": "https://h:99999"}}, r"^hubspot\.api_base_url: "),
        ({"hubspot": {"redirect_uri": "nope"}}, r"^hubspot\.redirect_uri: "),
        ({"hubspot": {"token_path": "oauth/v1/token"}}, r"^hubspot\.token_path: "),
        ({"server": {"port": 80.0}}, r"^server\.port: expected an integer"),
        ({"server": {"port": True}}, r"^server\.port: expected an integer"),
    ],
)
def test_more_values_that_would_crash_later_are_refused(raw, message):
    assert re.search(message, _rejected(raw))


def test_an_environment_value_that_is_not_utf8_is_refused():
    message = _rejected({}, {"HUBSPOT_CLIENT_SECRET": "s\udcff"})
    assert message.startswith("hubspot.client_secret (from HUBSPOT_CLIENT_SECRET): not valid")


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a..b", ".", "x" * 300])
def test_a_host_name_that_cannot_be_looked_up_is_refused(host: str) -> None:
    raw = {"hubspot": {"api_base_url": f"https://{host}/", "client_secret": "x"}}
    with pytest.raises(config_module.ConfigError, match=r"hubspot\.api_base_url"):
        config_module.validate(config_module.from_mapping(raw))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "8_080"),
        ("PORT", "٨٠٨٠"),
        ("THROTTLED_SENDER_BACKOFF_BASE_S", "1_0"),
        ("THROTTLED_SENDER_BACKOFF_BASE_S", "１"),
        ("THROTTLED_SENDER_BACKOFF_BASE_S", "nan"),
        ("THROTTLED_INGEST_FLUSHERS", "0x2"),
    ],
)
def test_environment_numbers_are_plain_ascii_decimals(name: str, value: str) -> None:
    with pytest.raises(config_module.ConfigError, match=name):
        config_module.load(None, environ={name: value})


def test_the_token_refresh_margin_is_at_most_half_a_token_lifetime() -> None:
    raw = {"hubspot": {"token_refresh_margin_s": 1000.0}}
    with pytest.raises(config_module.ConfigError, match=r"hubspot\.token_refresh_margin_s"):
        config_module.validate(config_module.from_mapping(raw))


# --- the custom action's definition (`throttled action-definition --publish`) ----------------


def test_the_developer_api_key_is_masked_and_set_from_the_environment(tmp_path):
    key = "dev-key-" + secrets.token_hex(12)
    path = _write(
        tmp_path, '[hubspot]\ndefinitions_path = "/automation/actions/2026-03/{app_id}"\n'
    )
    env = {"THROTTLED_HUBSPOT_DEVELOPER_API_KEY": key, "THROTTLED_HUBSPOT_APP_ID": "1234567"}
    cfg = config_module.load(path, environ=env)
    assert cfg.hubspot.developer_api_key.reveal() == key
    assert cfg.hubspot.app_id == 1234567
    assert cfg.hubspot.definitions_path == "/automation/actions/2026-03/{app_id}"
    assert key not in repr(cfg)
    shown = config_module.masked(cfg)["hubspot"]
    assert (shown["developer_api_key"], shown["app_id"]) == ("***", 1234567)
    defaults = config_module.load(None, environ={}).hubspot
    assert (defaults.app_id, defaults.developer_api_key.reveal()) == (0, "")
    assert defaults.definitions_path == "/automation/v4/actions/{app_id}"


def test_check_config_masks_the_developer_api_key(tmp_path):
    key = "dev-key-" + secrets.token_hex(12)
    path = _write(tmp_path, f'[hubspot]\napp_id = 42\ndeveloper_api_key = "{key}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("THROTTLED_")}
    run = subprocess.run(
        [sys.executable, "-m", "throttled", "check-config", "--config", path],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert key not in run.stdout + run.stderr
    assert '"developer_api_key": "***"' in run.stdout


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"hubspot": {"app_id": -1}}, r"^hubspot\.app_id: must be 0\.\.2147483647"),
        ({"hubspot": {"app_id": 2**31}}, r"^hubspot\.app_id: must be 0\.\.2147483647"),
        ({"hubspot": {"app_id": "12"}}, r"^hubspot\.app_id: expected an integer"),
        ({"hubspot": {"definitions_path": "/automation/v4/actions"}}, r"must contain \{app_id\}"),
        ({"hubspot": {"definitions_path": "automation/{app_id}"}}, r"^hubspot\.definitions_path"),
        ({"hubspot": {"developer_api_key": "has space-hunter2"}}, r"^hubspot\.developer_api_key"),
    ],
)
def test_bad_definition_settings_name_the_key(raw, message):
    shown = _rejected(raw)
    assert re.search(message, shown), shown
    assert "hunter2" not in shown
