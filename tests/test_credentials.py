"""Secrets as files in $CREDENTIALS_DIRECTORY (systemd's LoadCredential=): each file sets the
secret key its name says; bounded, strict, and never shown."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import pytest

from throttled import config as config_module
from throttled.config import ConfigError

KEY = base64.b64encode(secrets.token_bytes(32)).decode()
OTHER_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    folder = tmp_path / "credentials"
    folder.mkdir(mode=0o700)
    return folder


def _load(tmp_path: Path, creds: Path, **environ: str) -> config_module.Config:
    config = tmp_path / "throttled.toml"
    if not config.exists():
        config.write_text('[hubspot]\nclient_secret = "from-the-file"\n')
    return config_module.load(str(config), {"CREDENTIALS_DIRECTORY": str(creds), **environ})


def test_each_credential_sets_its_secret_key(tmp_path, creds):
    url = "postgresql://throttled:pw-Cr3d-only@127.0.0.1:5432/throttled"
    (creds / "database_url").write_text(url + "\n")  # (as `echo` writes it)
    (creds / "security_encryption_key").write_text(KEY)
    (creds / "security_previous_encryption_keys").write_text(OTHER_KEY)
    (creds / "hubspot_client_secret").write_text("  from-the-credential\n")
    (creds / "hubspot_previous_client_secrets").write_text("old-one,older-one")
    (creds / "admin_token").write_text("admin-token-from-a-credential\n")
    cfg = _load(tmp_path, creds)
    assert cfg.database.url.reveal() == url
    assert cfg.security.encryption_key.reveal() == KEY
    assert [k.reveal() for k in cfg.security.previous_encryption_keys] == [OTHER_KEY]
    assert cfg.hubspot.client_secret.reveal() == "from-the-credential"  # over the file's
    assert [s.reveal() for s in cfg.hubspot.previous_client_secrets] == ["old-one", "older-one"]
    (token,) = cfg.admin.tokens
    assert (token.id, token.token.reveal()) == ("credential", "admin-token-from-a-credential")
    shown = repr(cfg) + repr(config_module.masked(cfg))
    for secret in ("pw-Cr3d-only", KEY, "from-the-credential", "admin-token-from-a-credential"):
        assert secret not in shown


def test_every_secret_key_has_a_credential_name():
    names = config_module.credential_names()
    assert names["database_url"] == ("database", "url")
    assert names["security_encryption_key"] == ("security", "encryption_key")
    assert names["hubspot_client_secret"] == ("hubspot", "client_secret")
    assert names["hubspot_developer_api_key"] == ("hubspot", "developer_api_key")
    assert "hubspot_client_id" not in names  # not a secret


def test_no_credentials_directory_means_none(tmp_path):
    (tmp_path / "throttled.toml").write_text("")
    for environ in ({}, {"CREDENTIALS_DIRECTORY": ""}):
        cfg = config_module.load(str(tmp_path / "throttled.toml"), environ)
        assert not cfg.security.encryption_key


def test_a_legacy_variable_gives_way_to_a_credential(tmp_path, creds):
    (creds / "security_encryption_key").write_text(KEY)
    cfg = _load(tmp_path, creds, ENCRYPTION_KEY=OTHER_KEY)
    assert cfg.security.encryption_key.reveal() == KEY


def test_a_key_set_by_a_credential_and_its_variable_is_an_error(tmp_path, creds):
    (creds / "security_encryption_key").write_text(KEY)
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, creds, THROTTLED_SECURITY_ENCRYPTION_KEY=OTHER_KEY)
    assert str(caught.value) == (
        "security.encryption_key: set twice "
        "(THROTTLED_SECURITY_ENCRYPTION_KEY, credential security_encryption_key)"
    )


def test_the_env_and_credential_admin_tokens_are_two_tokens(tmp_path, creds):
    (creds / "admin_token").write_text("admin-token-from-a-credential")
    cfg = _load(tmp_path, creds, THROTTLED_ADMIN_TOKEN="admin-token-from-the-env")
    assert [t.id for t in cfg.admin.tokens] == ["env", "credential"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("server_port", b"9000", "credential 'server_port': not a secret of throttled ("),
        ("surprise", b"x", "credential 'surprise': not a secret of throttled ("),
        ("database_url", b"  \n", "credential 'database_url': empty"),
        ("database_url", b"\xff\xfe-pw-s3cret", "credential 'database_url': not UTF-8 text"),
        ("database_url", b"x" * (64 << 10) + b"1", "credential 'database_url': larger than"),
        ("admin_token", b"short-s3cret", "credential admin_token.token: must be 16..512"),
        ("security_encryption_key", b"not-a-key-s3cret", "security.encryption_key: "),
        ("database_url", b"mysql://u:pw-s3cret@h/db", "database.url: must be a postgresql"),
        ("database_url", b"postgresql://u:pw-s3cret\x01@h/db", "database.url (from credential"),
    ],
)
def test_a_bad_credential_is_an_error_naming_it_not_its_value(
    tmp_path, creds, name, content, message
):
    (creds / name).write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, creds)
    text = str(caught.value)
    assert text.startswith(message), text
    assert "s3cret" not in text
    assert "\n" not in text


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, creds):
    os.mkfifo(creds / "database_url")
    with pytest.raises(ConfigError, match="credential 'database_url': not a regular file"):
        _load(tmp_path, creds)


def test_a_missing_or_unreadable_directory_is_an_error(tmp_path, creds):
    with pytest.raises(ConfigError, match=r"CREDENTIALS_DIRECTORY .*nope: cannot read"):
        _load(tmp_path, tmp_path / "nope")
    (creds / "database_url").mkdir()
    with pytest.raises(ConfigError, match="credential 'database_url': cannot read"):
        _load(tmp_path, creds)
