"""Configuration: `throttled.toml` parsed once into frozen dataclasses, then env overrides."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from throttled import credentials, crypto, rates

DEFAULT_PATHS = (Path("throttled.toml"), Path("/etc/throttled/throttled.toml"))
MAX_FILE_BYTES = 1 << 20
MAX_BLOCK_EXPIRATION_S = 365 * 86_400.0
MAX_APP_ID = 2**31 - 1  # (appId is an int32 in the automation v4 spec)
_CREDENTIAL_WORDS = ("pass", "secret", "token", "key", "auth", "credential")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DATABASE_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


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


@dataclass(frozen=True)
class Range:
    """The documented bounds of a numeric key: lo..hi, or > lo and <= hi when `above`."""

    lo: float
    hi: float
    above: bool = False

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (value > self.lo if self.above else value >= self.lo) and value <= self.hi

    def __str__(self) -> str:
        lo, hi = _number_text(self.lo), _number_text(self.hi)
        return f"> {lo} and <= {hi}" if self.above else f"{lo}..{hi}"


def _number_text(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


def _num(default: float, lo: float, hi: float, *, above: bool = False) -> Any:
    """A numeric field with its documented range (validate() enforces it)."""
    return field(default=default, metadata={"range": Range(lo, hi, above)})


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = _num(8080, 0, 65535)
    public_url: str = ""
    shutdown_timeout_s: float = _num(30.0, 1, 3600)
    body_timeout_s: float = _num(10.0, 0.1, 300)
    trust_forwarded_for: bool = False  # the client is X-Forwarded-For's last entry
    event_loop: str = "asyncio"  # the serve's event loop: asyncio (the standard one), or uvloop


@dataclass(frozen=True, kw_only=True)
class DatabaseConfig:
    url: Secret = field(default_factory=lambda: Secret(""))
    data_dir: str = "var"
    pool_min: int = _num(2, 1, 100)
    pool_max: int = _num(10, 2, 1000)
    auto_migrate: bool = False
    connect_timeout_s: float = _num(5.0, 0.1, 300)
    command_timeout_s: float = _num(30.0, 1, 3600)


@dataclass(frozen=True, kw_only=True)
class HubSpotConfig:
    client_id: str = ""
    client_secret: Secret = field(default_factory=lambda: Secret(""))
    previous_client_secrets: tuple[Secret, ...] = ()
    redirect_uri: str = ""  # empty: {server.public_url}/api/oauth/callback
    scopes: str = "automation oauth"
    optional_scopes: str = ""
    api_base_url: str = "https://api.hubapi.com"
    auth_base_url: str = "https://app.hubspot.com"
    oauth_version: str = "v3"
    authorize_path: str = "/oauth/authorize"
    token_path: str = ""  # empty: the oauth_version's path (see OAUTH_PATHS)
    token_info_path: str = ""
    revoke_path: str = ""
    mock: bool = False
    block_expiration: str = "P7D"
    request_timeout_s: float = _num(10.0, 0.1, 300)
    batch_complete_path: str = "/automation/v4/actions/callbacks/complete"
    send_typed_outputs: bool = False
    accept_v1_signatures: bool = False
    token_refresh_margin_s: float = _num(300.0, 0, 900)  # (HubSpot tokens last 1,800 s)
    # The custom action's definition (`throttled action-definition --publish`) only.
    app_id: int = _num(0, 0, MAX_APP_ID)  # 0: not set
    developer_api_key: Secret = field(default_factory=lambda: Secret(""))  # sent as hapikey
    definitions_path: str = "/automation/v4/actions/{app_id}"

    def oauth_path(self, name: str) -> str:
        """An OAuth endpoint's path: the configured one, else the version's default."""
        configured: str = getattr(self, f"{name}_path")
        return configured or OAUTH_PATHS[self.oauth_version][name]

    def callback_url(self, public_url: str) -> str:
        """The redirect URI sent to HubSpot (the same at authorize and at code exchange)."""
        return self.redirect_uri or public_url.rstrip("/") + "/api/oauth/callback"


# Each OAuth version's endpoint paths; `{token}` is replaced (URL-quoted) by the token.
OAUTH_PATHS = {
    "v1": {
        "token": "/oauth/v1/token",
        "token_info": "/oauth/v1/access-tokens/{token}",
        "revoke": "/oauth/v1/refresh-tokens/{token}",
    },
    "v3": {
        "token": "/oauth/v3/token",
        "token_info": "/oauth/v3/token/introspect",
        "revoke": "/oauth/v3/token/revoke",
    },
}


@dataclass(frozen=True, kw_only=True)
class DefaultsConfig:
    max_throughput: int = _num(10, 1, rates.MAX_LIMIT)
    time_period: float = _num(1, 0.001, rates.MAX_PERIOD_S)
    time_unit: str = "seconds"
    pacing: str = "window"
    release_days: str = ""
    release_hours: str = ""
    timezone: str = ""
    start_at: str = ""


@dataclass(frozen=True, kw_only=True)
class SenderConfig:
    batch_size: int = _num(100, 1, 100)
    portal_requests: int = _num(100, 1, 100_000)
    portal_interval_seconds: float = _num(10.0, 0.1, 86400)
    daily_limit_wait_s: float = _num(3600.0, 1, 86400)
    max_attempts: int = _num(10, 1, 1000)
    backoff_base_s: float = _num(1.0, 0.01, 3600)
    backoff_max_s: float = _num(300.0, 0.01, 86400)
    hold_after_failures: int = _num(3, 1, 1000)
    hold_s: float = _num(1800.0, 0, 86400)
    lookahead_s: float = _num(0.5, 0, 60)
    claim_ahead_s: float = _num(2.0, 0, 600)
    send_margin_ms: float = _num(2.0, 0, 1000)
    max_in_flight: int = _num(8, 1, 256)
    disconnected_retry_s: float = _num(60.0, 0.05, 3600)


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    max_body_bytes: int = _num(65536, 1024, 16 << 20)
    max_pending: int = _num(20000, 1, 1_000_000)
    batch_max: int = _num(2000, 1, 100_000)
    linger_ms: float = _num(0.0, 0, 1000)
    overlap_ms: float = _num(1.5, 0, 100)
    flushers: int = _num(2, 1, 64)
    retry_after_s: int = _num(5, 1, 3600)
    commit_timeout_s: float = _num(5.0, 0.1, 120)


@dataclass(frozen=True, kw_only=True)
class SecurityConfig:
    encryption_key: Secret = field(default_factory=lambda: Secret(""))
    previous_encryption_keys: tuple[Secret, ...] = ()


@dataclass(frozen=True, kw_only=True)
class AdminToken:
    """One admin API token: the token itself, or its SHA-256 (hex) so the file need not hold it."""

    id: str = ""
    token: Secret = field(default_factory=lambda: Secret(""))
    token_sha256: str = ""


@dataclass(frozen=True, kw_only=True)
class AdminConfig:
    tokens: tuple[AdminToken, ...] = ()
    # how often the change counter is read: the backstop for a lost change notification
    change_check_s: float = _num(5.0, 0.1, 3600)


EVENT_LOOPS = ("uvloop", "asyncio")  # server.event_loop
ADMIN_ENV = "THROTTLED_ADMIN_TOKEN"  # adds one admin token, id "env"
MIN_ADMIN_TOKEN_CHARS = 16
MAX_ADMIN_TOKEN_CHARS = 512
_ADMIN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_ADMIN_TOKEN = re.compile(r"[\x21-\x7e]+")  # (what an Authorization header carries)


@dataclass(frozen=True, kw_only=True)
class RetentionConfig:
    days: float = _num(30.0, 0, 36500, above=True)  # done, failed and expired actions
    done_days: float = _num(0.0, 0, 36500)  # 0: `days`
    failed_days: float = _num(0.0, 0, 36500)  # failed and expired; 0: `days`
    audit_days: float = _num(730.0, 0, 36500, above=True)
    batch_size: int = _num(5000, 1, 100_000)
    interval_s: float = _num(60.0, 1, 86400)  # retention (deletes)
    expire_interval_s: float = _num(5.0, 0.1, 3600)
    prune_interval_s: float = _num(60.0, 1, 86400)  # the rate log
    deadline_interval_s: float = _num(60.0, 1, 86400)
    stale_claim_interval_s: float = _num(600.0, 1, 86400)

    def done_after_days(self) -> float:
        """How long done actions are kept."""
        return self.done_days or self.days

    def failed_after_days(self) -> float:
        """How long failed and expired actions are kept."""
        return self.failed_days or self.days


@dataclass(frozen=True, kw_only=True)
class AlertsConfig:
    webhook_url: Secret = field(default_factory=lambda: Secret(""))  # empty: no alerts sent
    check_interval_s: float = _num(300.0, 1, 86400)
    error_rate_threshold: float = _num(0.05, 0, 1, above=True)
    timeout_s: float = _num(10.0, 0.1, 300)
    max_attempts: int = _num(5, 1, 100)


MAX_INSTANCE_NAME = 100


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    lease_s: float = _num(15.0, 3, 600)  # a portal's lease, renewed every third of it
    instance_name: str = ""  # empty: hostname:pid


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
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "(defaults)"

    def default_policy_spec(self) -> rates.PolicySpec:
        """The `[defaults]` section as the last rate source."""
        return rates.spec_from_mapping(dataclasses.asdict(self.defaults), where="defaults")

    def block_expiration_s(self) -> float:
        """`hubspot.block_expiration` in seconds."""
        return parse_iso_duration(self.hubspot.block_expiration)


def sections() -> dict[str, type[Any]]:
    """Each config section's name and dataclass."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "source"}


def ranges() -> dict[str, Range]:
    """Every numeric key (`section.key`) with its documented range."""
    return {
        f"{name}.{f.name}": f.metadata["range"]
        for name, cls in sections().items()
        for f in dataclasses.fields(cls)
        if "range" in f.metadata
    }


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _name(name: str) -> str:
    """A section, key or variable name nobody declared, for a message: as it is when plain,
    else quoted and cut short (it may hold a newline or a control character, or be long)."""
    return name if _PLAIN_NAME.fullmatch(name) else brief(name)


def brief(value: object) -> str:
    """A config value's repr for a message, cut short."""
    return rates.brief(value, 40)


# Environment variables of the original Throttle, then our own THROTTLED_SECTION_KEY form
# (which wins when both name the same key).
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
    if explicit is None:
        return next((p for p in DEFAULT_PATHS if _regular_file(p, required=False)), None)
    if not explicit:
        raise ConfigError("config file: empty path")
    path = Path(explicit)
    _regular_file(path, required=True)
    return path


def _regular_file(path: Path, *, required: bool) -> bool:
    """Whether path is a regular file; when required, a ConfigError says why it is not."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        if required:
            raise ConfigError(f"config file not found: {path}") from None
        return False
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read: {_reason(exc)}") from None
    if stat.S_ISREG(mode) or not required:
        return stat.S_ISREG(mode)
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    raise ConfigError(f"{path}: is {kind}, not a config file")


def _reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and return the effective configuration."""
    found = find_config_path(path)
    raw = _read_toml(found) if found is not None else {}
    environ = os.environ if environ is None else environ
    files = _credentials(environ)
    merged = _apply_env(raw, environ, files)
    config = from_mapping(merged, source=str(found) if found else "(defaults)")
    config = _with_env_admin_token(config, environ.get(ADMIN_ENV))
    config = _with_env_admin_token(
        config,
        files.get(ADMIN_CREDENTIAL),
        where=f"credential {ADMIN_CREDENTIAL}",
        token_id="credential",
    )
    validate(config)
    return config


# A credential (a file in $CREDENTIALS_DIRECTORY, from systemd's LoadCredential=) sets a
# secret key. Its name is its THROTTLED_ variable's, lower case and without the prefix:
# database_url, security_encryption_key, hubspot_client_secret, ... and admin_token.
ADMIN_CREDENTIAL = ADMIN_ENV[len("THROTTLED_") :].lower()


def credential_names() -> dict[str, tuple[str, str]]:
    """Each credential name that sets a key, with its (section, key): the secret keys."""
    names: dict[str, tuple[str, str]] = {}
    for name, cls in sections().items():
        hints = typing.get_type_hints(cls)  # (once a section: it is not cheap)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (Secret, tuple[Secret, ...]):
                names[f"{name}_{f.name}"] = (name, f.name)
    return names


def _credentials(environ: Mapping[str, str]) -> dict[str, str]:
    """The credentials in $CREDENTIALS_DIRECTORY by name (none when it is unset)."""
    directory = environ.get(credentials.DIRECTORY_ENV, "")
    if not directory:
        return {}
    try:
        found = credentials.read(directory)
    except credentials.CredentialError as exc:
        raise ConfigError(str(exc)) from None
    known = credential_names()
    for name in found:
        if name not in known and name != ADMIN_CREDENTIAL:
            names = ", ".join([*sorted(known), ADMIN_CREDENTIAL])
            raise ConfigError(f"credential {brief(name)}: not a secret of throttled ({names})")
    return found


def _with_env_admin_token(
    config: Config, value: str | None, *, where: str = ADMIN_ENV, token_id: str = "env"
) -> Config:
    """THROTTLED_ADMIN_TOKEN adds one admin token, with id `env` (the admin_token credential
    another, with id `credential`)."""
    if value is None:
        return config
    token = _to_secret(value.strip(), where)
    if not token:
        raise ConfigError(f"{where}: must not be empty (unset it for no token)")
    extra = AdminToken(id=token_id, token=token)
    admin = dataclasses.replace(config.admin, tokens=(*config.admin.tokens, extra))
    return dataclasses.replace(config, admin=admin)


def _read_toml(path: Path) -> dict[str, Any]:
    """A config file's TOML as a mapping; every failure is one ConfigError line."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {_reason(exc)}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a config file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start})") from None
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"{path}: invalid TOML: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _apply_env(
    raw: dict[str, Any], environ: Mapping[str, str], files: Mapping[str, str] | None = None
) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    overrides = _env_overrides(environ)
    for name, setting in credential_names().items():
        if not files or name not in files:
            continue
        other = overrides.get(setting, ("",))[0]
        if other.startswith("THROTTLED_"):  # (a legacy variable gives way, as to THROTTLED_)
            raise ConfigError(f"{'.'.join(setting)}: set twice ({other}, credential {name})")
        overrides[setting] = (f"credential {name}", files[name])
    for (section, key), (name, value) in overrides.items():
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a table, e.g. [{section}]")
        target[key] = _EnvText(value, name)
    return merged


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, str], tuple[str, str]]:
    """(section, key) -> (variable, value); a THROTTLED_ name wins over a legacy one."""
    legacy = {LEGACY_ENV[n]: (n, v) for n, v in environ.items() if n in LEGACY_ENV and v}
    ours: dict[tuple[str, str], tuple[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith("THROTTLED_") or name.startswith("THROTTLED_TEST_"):
            continue
        if name == ADMIN_ENV:  # (added to admin.tokens by load())
            continue
        target = _env_target(name)
        if target in ours:
            other = ours[target][0]
            raise ConfigError(f"{'.'.join(target)}: set twice in the environment ({other}, {name})")
        ours[target] = (name, value)
    return {**legacy, **ours}


def _env_target(name: str) -> tuple[str, str]:
    """The (section, key) a THROTTLED_SECTION_KEY variable sets."""
    rest = name[len("THROTTLED_") :].lower()
    known = sections()
    section = next((s for s in known if rest.startswith(s + "_")), "")
    if not section:
        raise ConfigError(f"environment variable {_name(name)}: unknown config section")
    key = rest[len(section) + 1 :]
    if key not in {f.name for f in dataclasses.fields(known[section])}:
        raise ConfigError(
            f"environment variable {_name(name)}: unknown config key {section}.{_name(key)}"
        )
    return section, key


class _EnvText(str):
    """A value that came from the environment: coerced from text to the field's type."""

    variable: str

    def __new__(cls, value: str, variable: str) -> _EnvText:
        text = super().__new__(cls, value)
        text.variable = variable
        return text


def from_mapping(raw: Mapping[str, Any], *, source: str = "(mapping)") -> Config:
    """Build a Config from a parsed TOML mapping; unknown keys are errors."""
    kwargs: dict[str, Any] = {}
    known = sections()
    for name, value in raw.items():
        if name not in known:
            raise ConfigError(f"unknown config section [{_name(name)}]")
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: must be a table, e.g. [{name}]")
        kwargs[name] = _build_section(known[name], value, name)
    return Config(**kwargs, source=source)


def _build_section(cls: type[Any], values: Mapping[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {section}.{_name(key)}")
        where = f"{section}.{key}"
        if isinstance(value, _EnvText):
            where += f" (from {value.variable})"
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        return _coerce_list(typing.get_args(kind)[0], value, where)
    if isinstance(kind, type) and dataclasses.is_dataclass(
        kind
    ):  # an array of tables, e.g. [[admin.tokens]]
        if not isinstance(value, Mapping) or isinstance(value, _EnvText):
            raise ConfigError(f'{where}: expected a table, e.g. {{ id = "a", token = "..." }}')
        return _build_section(kind, value, where)
    if origin is types.UnionType:
        raise ConfigError(f"{where}: unsupported type")
    convert = _SCALARS.get(kind)
    if convert is None:
        raise ConfigError(f"{where}: unsupported type {kind!r}")
    return convert(value, where)


def _coerce_list(item_kind: Any, value: Any, where: str) -> tuple[Any, ...]:
    """A list key: a TOML array, or comma-separated text from the environment."""
    if isinstance(value, _EnvText):
        items: Any = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise ConfigError(f"{where}: expected a list")
    for i, item in enumerate(items):
        if item == "":
            raise ConfigError(f"{where}[{i}]: must not be empty")
    return tuple(_coerce(item_kind, item, f"{where}[{i}]") for i, item in enumerate(items))


def _to_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {brief(value)}")
    _check_text(value, where)
    return str(value)


def _to_secret(value: Any, where: str) -> Secret:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    _check_text(value, where)
    return Secret(str(value))


def _check_text(value: str, where: str) -> None:
    """Text must be valid UTF-8 without control characters (the value is never echoed)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: not valid UTF-8 text") from None
    if _CONTROL.search(value):
        raise ConfigError(f"{where}: must not contain control characters")


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, _EnvText):
        return _parse_bool(value, where)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false (unquoted), got {brief(value)}")
    return value


# Numbers from the environment: plain ASCII decimals (int() and float() also take '8_080',
# Arabic-Indic or full-width digits, 'inf' and 'nan').
_ENV_INT = re.compile(r"[+-]?[0-9]{1,30}")
_ENV_FLOAT = re.compile(
    r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})(?:[eE][+-]?[0-9]{1,3})?"
)


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, _EnvText):
        if not _ENV_INT.fullmatch(value.strip()):
            raise ConfigError(f"{where}: expected an integer, got {brief(value)}")
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {brief(value)}")
    return int(value)


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | _EnvText):
        raise ConfigError(f"{where}: expected a number, got {brief(value)}")
    if isinstance(value, _EnvText) and not _ENV_FLOAT.fullmatch(value.strip()):
        raise ConfigError(f"{where}: expected a number, got {brief(value)}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where}: expected a number, got {brief(value)}") from None
    except OverflowError:  # an integer beyond the float range
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{where}: must be a finite number, got {brief(value)}")
    return number


_SCALARS: dict[Any, Any] = {
    str: _to_str,
    Secret: _to_secret,
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
}


def _parse_bool(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {brief(str(text))}")


def validate(config: Config) -> None:
    """Check every key's range and the cross-field rules; raise ConfigError naming the key."""
    _check_ranges(config)
    _check_rules(config)
    _check_urls(config)
    _check_block_expiration(config.hubspot.block_expiration)
    _check_keys(config.security)
    _check_admin_tokens(config.admin)
    _check_rates(config)


def _check_ranges(config: Config) -> None:
    """Each numeric key within its documented range (finite, so no inf or nan)."""
    for name in sections():
        section = getattr(config, name)
        for f in dataclasses.fields(section):
            bounds = f.metadata.get("range")
            value = getattr(section, f.name)
            if bounds is not None and value not in bounds:
                raise ConfigError(f"{name}.{f.name}: must be {bounds}, got {brief(value)}")


def _check_rules(config: Config) -> None:
    """Rules between keys, and keys with a fixed set of values."""
    checks: list[tuple[bool, str]] = [
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
        (
            config.server.event_loop in EVENT_LOOPS,
            "server.event_loop: must be uvloop or asyncio",
        ),
        (
            config.hubspot.oauth_version in OAUTH_PATHS,
            "hubspot.oauth_version: must be v1 or v3",
        ),
        (
            all(_SCOPE.fullmatch(w) for w in _scope_words(config.hubspot)),
            "hubspot.scopes, hubspot.optional_scopes: scope names separated by spaces",
        ),
        (
            "automation" in config.hubspot.scopes.split(),
            "hubspot.scopes: must include automation (completing callbacks needs it)",
        ),
        (
            len(config.cluster.instance_name) <= MAX_INSTANCE_NAME,
            f"cluster.instance_name: at most {MAX_INSTANCE_NAME} characters",
        ),
        (
            not _PID_SUFFIX.search(config.cluster.instance_name),
            "cluster.instance_name: must not end in ':' and digits (that is the default"
            " hostname:pid form, which an instance starting on the same host checks against"
            " its process table to end a crashed process's leases)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_urls(config: Config) -> None:
    """URLs and URL paths that the daemon builds requests from."""
    hs = config.hubspot
    _check_http_url(hs.api_base_url, "hubspot.api_base_url")
    _check_http_url(hs.auth_base_url, "hubspot.auth_base_url")
    for value, where in (
        (config.server.public_url, "server.public_url"),
        (hs.redirect_uri, "hubspot.redirect_uri"),
    ):
        if value:
            _check_http_url(value, where)
    for key in ("batch_complete_path", "authorize_path", "definitions_path"):
        _check_path(getattr(hs, key), f"hubspot.{key}")
    if "{app_id}" not in hs.definitions_path:
        raise ConfigError("hubspot.definitions_path: must contain {app_id}")
    _check_developer_key(hs.developer_api_key)
    for key in ("token", "token_info", "revoke"):
        if getattr(hs, f"{key}_path"):
            _check_path(getattr(hs, f"{key}_path"), f"hubspot.{key}_path")
    _check_database_url(config.database.url.reveal())
    _check_webhook_url(config.alerts.webhook_url.reveal())


def _check_developer_key(key: Secret) -> None:
    """Empty, or what can go in a query string as it is (the key is never echoed)."""
    if key and not _DEVELOPER_KEY.fullmatch(key.reveal()):
        raise ConfigError(
            "hubspot.developer_api_key: must be 1..512 letters, digits, '-', '_' or '.'"
        )


_DEVELOPER_KEY = re.compile(r"[A-Za-z0-9_.-]{1,512}")


def _check_path(value: str, where: str) -> None:
    if not value.startswith("/") or " " in value or "?" in value or "#" in value:
        raise ConfigError(f"{where}: must be a URL path starting with /, got {brief(value)}")


_PID_SUFFIX = re.compile(r":[0-9]+\Z")  # the default instance name's form
_SCOPE = re.compile(r"[A-Za-z0-9._:-]{1,100}")


def _scope_words(hs: HubSpotConfig) -> list[str]:
    return [*hs.scopes.split(), *hs.optional_scopes.split()]


def _check_http_url(value: str, where: str) -> None:
    message = f"{where}: must be an http(s) URL, got {brief(value)}"
    if not value.startswith(("http://", "https://")) or " " in value:
        raise ConfigError(message)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises ValueError for a port that is not 0..65535)
    except ValueError:
        raise ConfigError(message) from None
    if not parts.hostname or not _resolvable_name(parts.hostname):
        raise ConfigError(message)


def _resolvable_name(host: str) -> bool:
    """Whether a host name can be looked up at all (IDNA: labels of 1..63, 253 in all);
    otherwise the first request fails with a UnicodeError, not a connection error."""
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _check_database_url(url: str) -> None:
    """Empty (embedded PostgreSQL) or a postgresql:// URL; the URL is never echoed."""
    if not url:
        return
    message = "database.url: must be a postgresql://user:password@host:port/db URL"
    if not url.startswith(_DATABASE_SCHEMES) or " " in url:
        raise ConfigError(message + " (or empty for the embedded PostgreSQL)")
    try:
        urlsplit(url).port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError:
        raise ConfigError(message + "; its host or port is malformed") from None


def _check_webhook_url(url: str) -> None:
    """Empty (no alerts) or an http(s) URL; never echoed (a Slack webhook's path is its
    secret)."""
    if not url:
        return
    message = "alerts.webhook_url: must be an http(s) URL (or empty for no alerts)"
    if not url.startswith(("http://", "https://")) or " " in url:
        raise ConfigError(message)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not 0..65535)
    except ValueError:
        raise ConfigError(message) from None
    if not parts.hostname or not _resolvable_name(parts.hostname):
        raise ConfigError(message)


def _check_block_expiration(text: str) -> None:
    """A positive ISO-8601 duration of at most P365D."""
    where = "hubspot.block_expiration"
    try:
        seconds = parse_iso_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if seconds <= 0:
        raise ConfigError(f"{where}: must be a positive duration, got {brief(text)}")
    if seconds > MAX_BLOCK_EXPIRATION_S:
        raise ConfigError(f"{where}: must be at most P365D (365 days), got {brief(text)}")


def _check_keys(security: SecurityConfig) -> None:
    """Encryption keys parse as 32-byte keys (an empty primary is generated in mock mode)."""
    named = [
        (f"security.previous_encryption_keys[{i}]", key)
        for i, key in enumerate(security.previous_encryption_keys)
    ]
    if security.encryption_key:
        named.insert(0, ("security.encryption_key", security.encryption_key))
    keys = [_parse_key(secret, where) for where, secret in named]
    if keys and security.encryption_key:
        try:
            crypto.KeyRing(keys[0], tuple(keys[1:]))
        except crypto.CryptoError as exc:
            raise ConfigError(f"security.previous_encryption_keys: {exc}") from None


def _check_admin_tokens(admin: AdminConfig) -> None:
    """Each admin token has a unique id and exactly one of token / token_sha256."""
    seen: set[str] = set()
    for i, entry in enumerate(admin.tokens):
        where = {"env": ADMIN_ENV, "credential": f"credential {ADMIN_CREDENTIAL}"}.get(
            entry.id, f"admin.tokens[{i}]"
        )
        if not _ADMIN_ID.fullmatch(entry.id):
            raise ConfigError(f"{where}.id: 1..64 letters, digits, '.', '_' or '-'")
        if entry.id in seen:
            raise ConfigError(f"{where}.id: {entry.id!r} is used twice")
        seen.add(entry.id)
        if bool(entry.token) == bool(entry.token_sha256):
            raise ConfigError(f"{where}: give exactly one of token or token_sha256")
        size = len(entry.token.reveal())
        if entry.token and not MIN_ADMIN_TOKEN_CHARS <= size <= MAX_ADMIN_TOKEN_CHARS:
            raise ConfigError(
                f"{where}.token: must be {MIN_ADMIN_TOKEN_CHARS}..{MAX_ADMIN_TOKEN_CHARS} "
                "characters (generate one: throttled keys generate)"
            )
        if entry.token and not _ADMIN_TOKEN.fullmatch(entry.token.reveal()):
            raise ConfigError(f"{where}.token: must be printable ASCII without spaces")
        if entry.token_sha256 and not _SHA256_HEX.fullmatch(entry.token_sha256.lower()):
            raise ConfigError(f"{where}.token_sha256: must be 64 hex characters (sha256sum)")


def _parse_key(secret: Secret, where: str) -> bytes:
    try:
        return crypto.parse_key(secret.reveal())
    except crypto.CryptoError as exc:
        raise ConfigError(f"{where}: {exc}; make one with: throttled keys generate") from None


def _check_rates(config: Config) -> None:
    """The `[defaults]` section makes a rate policy."""
    try:
        rates.resolve([config.default_policy_spec()])
    except (ValueError, ArithmeticError) as exc:
        message = _one_line(exc)[:300]  # a rate message quotes the value, maybe a long one
        shown = message if message.startswith("defaults.") else f"defaults: {message}"
        raise ConfigError(shown) from None


_ISO_DURATION = re.compile(
    r"P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?"
    r"(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?",
    re.ASCII,
)
_DURATION_SECONDS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_iso_duration(text: str) -> float:
    """Parse an ISO-8601 duration such as P7D, PT15M or P1WT1H into (finite) seconds."""
    cleaned = text.strip().upper() if isinstance(text, str) and text.isascii() else ""
    match = _ISO_DURATION.fullmatch(cleaned)
    if not match or cleaned in ("P", "PT") or cleaned.endswith("T"):
        raise ValueError(f"{brief(text)} is not an ISO-8601 duration like P7D or PT15M")
    parts = match.groupdict()
    total = sum(float(v) * _DURATION_SECONDS[k] for k, v in parts.items() if v)
    if not math.isfinite(total):
        raise ValueError(f"{brief(text)} is too long a duration")
    return total


def masked(config: Config) -> dict[str, Any]:
    """The effective config as a plain mapping with every secret masked (for check-config)."""
    out: dict[str, Any] = {}
    for name in sections():
        obj = getattr(config, name)
        out[name] = {
            f.name: _shown(getattr(obj, f.name), url=(name, f.name) == ("database", "url"))
            for f in dataclasses.fields(obj)
        }
    return out


def _shown(value: Any, *, url: bool) -> Any:
    if isinstance(value, Secret) and url:
        return mask_url(value.reveal())
    if isinstance(value, Secret):
        return "***" if value else ""
    if isinstance(value, tuple):
        return [_shown(v, url=url) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _shown(getattr(value, f.name), url=False) for f in dataclasses.fields(value)
        }
    return value


def mask_url(url: str) -> str:
    """A connection URL with its password and credential-like query parameters as ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if url else ""
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.partition(':')[0]}:***@{host}"
    return f"{scheme}://{authority}{_mask_query(tail)}"


def _mask_query(tail: str) -> str:
    """Path, query and fragment with credential-like parameters (and any fragment) masked."""
    tail, hash_sign, _ = tail.partition("#")
    path, question, query = tail.partition("?")
    if question:
        path += "?" + "&".join(_mask_param(p) for p in query.split("&"))
    return path + ("#***" if hash_sign else "")


def _mask_param(param: str) -> str:
    name, equals, _ = param.partition("=")
    lowered = unquote(name).lower()
    if equals and any(word in lowered for word in _CREDENTIAL_WORDS):
        return f"{name}=***"
    return param
