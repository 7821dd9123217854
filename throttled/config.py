"""Configuration: `throttled.toml` parsed once into frozen dataclasses, then env overrides."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from throttled import rates

DEFAULT_PATHS = (Path("throttled.toml"), Path("/etc/throttled/throttled.toml"))


class ConfigError(Exception):
    """A configuration file or environment value is invalid; the message names the key."""


class Secret:
    """A string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret text."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    shutdown_timeout_s: float = 30.0


@dataclass(frozen=True, kw_only=True)
class DatabaseConfig:
    url: Secret = field(default_factory=lambda: Secret(""))
    data_dir: str = "var"
    pool_min: int = 2
    pool_max: int = 10
    auto_migrate: bool = False
    connect_timeout_s: float = 5.0


@dataclass(frozen=True, kw_only=True)
class HubSpotConfig:
    client_id: str = ""
    client_secret: Secret = field(default_factory=lambda: Secret(""))
    previous_client_secrets: tuple[Secret, ...] = ()
    redirect_uri: str = ""
    scopes: str = "automation"
    api_base_url: str = "https://api.hubapi.com"
    auth_base_url: str = "https://app.hubspot.com"
    mock: bool = False
    block_expiration: str = "P7D"
    request_timeout_s: float = 10.0
    batch_complete_path: str = "/automation/v4/actions/callbacks/complete"
    token_path: str = "/oauth/v1/token"
    send_typed_outputs: bool = False
    accept_v1_signatures: bool = False
    token_refresh_margin_s: float = 300.0


@dataclass(frozen=True, kw_only=True)
class DefaultsConfig:
    max_throughput: int = 10
    time_period: float = 1
    time_unit: str = "seconds"
    pacing: str = "window"
    release_days: str = ""
    release_hours: str = ""
    timezone: str = ""
    start_at: str = ""


@dataclass(frozen=True, kw_only=True)
class SenderConfig:
    batch_size: int = 100
    portal_requests: int = 100
    portal_interval_seconds: float = 10.0
    max_attempts: int = 10
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    hold_after_failures: int = 3
    hold_s: float = 1800.0
    lookahead_s: float = 0.5
    claim_ahead_s: float = 2.0
    send_margin_ms: float = 2.0
    max_in_flight: int = 8


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    max_body_bytes: int = 65536
    max_pending: int = 20000
    batch_max: int = 2000
    linger_ms: float = 0.0
    overlap_ms: float = 1.5
    flushers: int = 2
    retry_after_s: int = 5


@dataclass(frozen=True, kw_only=True)
class SecurityConfig:
    encryption_key: Secret = field(default_factory=lambda: Secret(""))
    previous_encryption_keys: tuple[Secret, ...] = ()


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    token: Secret = field(default_factory=lambda: Secret(""))


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    done_days: float = 7.0
    failed_days: float = 30.0
    batch_size: int = 5000
    interval_s: float = 60.0


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    hubspot: HubSpotConfig = field(default_factory=HubSpotConfig)
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    sender: SenderConfig = field(default_factory=SenderConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "(defaults)"

    def default_policy_spec(self) -> rates.PolicySpec:
        """The `[defaults]` section as the last rate source."""
        return rates.spec_from_mapping(dataclasses.asdict(self.defaults), where="defaults")

    def block_expiration_s(self) -> float:
        """`hubspot.block_expiration` in seconds."""
        return parse_iso_duration(self.hubspot.block_expiration)


# Environment variables of the original Throttle, then our own THROTTLED_SECTION_KEY form.
LEGACY_ENV = {
    "DATABASE_URL": ("database", "url"),
    "ENCRYPTION_KEY": ("security", "encryption_key"),
    "HUBSPOT_CLIENT_ID": ("hubspot", "client_id"),
    "HUBSPOT_CLIENT_SECRET": ("hubspot", "client_secret"),
    "HUBSPOT_REDIRECT_URI": ("hubspot", "redirect_uri"),
    "BASE_URL": ("server", "public_url"),
    "PORT": ("server", "port"),
}


def find_config_path(explicit: str | None) -> Path | None:
    """The file to read: the one named, else the first default path that exists."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    return next((p for p in DEFAULT_PATHS if p.is_file()), None)


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and return the effective configuration."""
    found = find_config_path(path)
    raw: dict[str, Any] = {}
    if found is not None:
        try:
            raw = tomllib.loads(found.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{found}: invalid TOML: {exc}") from None
    merged = _apply_env(raw, os.environ if environ is None else environ)
    config = from_mapping(merged, source=str(found) if found else "(defaults)")
    validate(config)
    return config


def _apply_env(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    overrides: list[tuple[str, str, str]] = []
    for name, (section, key) in LEGACY_ENV.items():
        if environ.get(name):
            overrides.append((section, key, environ[name]))
    sections = {f.name for f in dataclasses.fields(Config) if f.name != "source"}
    for name, value in environ.items():
        if not name.startswith("THROTTLED_") or name.startswith("THROTTLED_TEST_"):
            continue
        rest = name[len("THROTTLED_") :].lower()
        section = next((s for s in sections if rest.startswith(s + "_")), "")
        if not section:
            raise ConfigError(f"environment variable {name}: unknown config section")
        overrides.append((section, rest[len(section) + 1 :], value))
    for section, key, value in overrides:
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a table")
        target[key] = _EnvText(value)
    return merged


class _EnvText(str):
    """A value that came from the environment: coerced from text to the field's type."""


def from_mapping(raw: Mapping[str, Any], *, source: str = "(mapping)") -> Config:
    """Build a Config from a parsed TOML mapping; unknown keys are errors."""
    kwargs: dict[str, Any] = {}
    section_fields = {f.name: f for f in dataclasses.fields(Config) if f.name != "source"}
    hints = typing.get_type_hints(Config)
    for name, value in raw.items():
        if name not in section_fields:
            raise ConfigError(f"unknown config section [{name}]")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: must be a table, e.g. [{name}]")
        kwargs[name] = _build_section(hints[name], value, name)
    return Config(**kwargs, source=source)


def _build_section(cls: type[Any], values: Mapping[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {section}.{key}")
        kwargs[key] = _coerce(hints[key], value, f"{section}.{key}")
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        (item_kind, _) = typing.get_args(kind)
        items = value.split(",") if isinstance(value, _EnvText) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        return tuple(_coerce(item_kind, v, where) for v in items if v != "")
    if origin is types.UnionType:
        raise ConfigError(f"{where}: unsupported type")
    return _coerce_scalar(kind, value, where)


def _coerce_scalar(kind: Any, value: Any, where: str) -> Any:
    from_env = isinstance(value, _EnvText)
    if kind is Secret:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string")
        return Secret(str(value))
    if kind is bool:
        if from_env:
            return _parse_bool(value, where)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if from_env:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if from_env:
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {kind!r}")


def _parse_bool(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {text!r}")


def validate(config: Config) -> None:
    """Check cross-field rules and value ranges; raise ConfigError naming the key."""
    checks: list[tuple[bool, str]] = [
        (0 <= config.server.port <= 65535, "server.port: must be 0..65535 (0: any free port)"),
        (config.server.shutdown_timeout_s > 0, "server.shutdown_timeout_s: must be > 0"),
        (1 <= config.sender.batch_size <= 100, "sender.batch_size: must be 1..100"),
        (config.sender.portal_requests >= 1, "sender.portal_requests: must be >= 1"),
        (config.sender.portal_interval_seconds > 0, "sender.portal_interval_seconds: must be > 0"),
        (config.sender.max_attempts >= 1, "sender.max_attempts: must be >= 1"),
        (config.sender.max_in_flight >= 1, "sender.max_in_flight: must be >= 1"),
        (config.sender.lookahead_s >= 0, "sender.lookahead_s: must be >= 0"),
        (config.sender.claim_ahead_s >= 0, "sender.claim_ahead_s: must be >= 0"),
        (0 <= config.sender.send_margin_ms <= 1000, "sender.send_margin_ms: must be 0..1000"),
        (config.ingest.max_body_bytes >= 1024, "ingest.max_body_bytes: must be >= 1024"),
        (config.ingest.max_pending >= 1, "ingest.max_pending: must be >= 1"),
        (config.ingest.batch_max >= 1, "ingest.batch_max: must be >= 1"),
        (config.ingest.flushers >= 1, "ingest.flushers: must be >= 1"),
        (0 <= config.ingest.linger_ms <= 1000, "ingest.linger_ms: must be 0..1000"),
        (0 <= config.ingest.overlap_ms <= 100, "ingest.overlap_ms: must be 0..100"),
        (config.database.pool_min >= 1, "database.pool_min: must be >= 1"),
        (
            config.database.pool_max >= config.database.pool_min + config.ingest.flushers,
            "database.pool_max: must be >= pool_min + ingest.flushers",
        ),
        (
            config.logging.level in ("debug", "info", "warning", "error"),
            "logging.level: must be debug, info, warning or error",
        ),
        (
            config.logging.format in ("auto", "json", "console"),
            "logging.format: must be auto, json or console",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for key in ("api_base_url", "auth_base_url"):
        url = getattr(config.hubspot, key)
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"hubspot.{key}: must be an http(s) URL")
    if config.server.public_url and not config.server.public_url.startswith(
        ("http://", "https://")
    ):
        raise ConfigError("server.public_url: must be an http(s) URL")
    try:
        seconds = config.block_expiration_s()
    except ValueError as exc:
        raise ConfigError(f"hubspot.block_expiration: {exc}") from None
    if seconds <= 0:
        raise ConfigError("hubspot.block_expiration: must be a positive duration")
    try:
        rates.resolve([config.default_policy_spec()])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def parse_iso_duration(text: str) -> float:
    """Parse an ISO-8601 duration such as P7D, PT15M or P1WT1H into seconds."""
    import re

    match = re.fullmatch(
        r"P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?"
        r"(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?",
        text.strip().upper(),
    )
    if not match or text.strip().upper() in ("P", "PT") or text.strip().upper().endswith("T"):
        raise ValueError(f"{text!r} is not an ISO-8601 duration like P7D or PT15M")
    parts = {k: float(v) if v else 0.0 for k, v in match.groupdict().items()}
    return (
        parts["w"] * 604800 + parts["d"] * 86400 + parts["h"] * 3600 + parts["m"] * 60 + parts["s"]
    )


def masked(config: Config) -> dict[str, Any]:
    """The effective config as a plain mapping with every secret masked (for check-config)."""

    def show(value: Any) -> Any:
        if isinstance(value, Secret) and "://" in value.reveal():
            return mask_url(value.reveal())
        if isinstance(value, Secret):
            return "***" if value else ""
        if isinstance(value, tuple):
            return [show(v) for v in value]
        return value

    out: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        if section.name == "source":
            continue
        obj = getattr(config, section.name)
        out[section.name] = {f.name: show(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return out


def mask_url(url: str) -> str:
    """A connection URL with its password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
