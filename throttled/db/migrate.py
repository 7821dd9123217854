"""Schema migrations with yoyo (SQL files shipped in the package, `throttled/migrations/`);
its errors become MigrationError."""

from __future__ import annotations

import contextlib
import importlib.resources
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from throttled.config import mask_url

MIGRATIONS_DIR: Path | None = None  # None: the package's own; tests point it elsewhere
DEFAULT_CONNECT_TIMEOUT_S = 10.0


class MigrationError(Exception):
    """Migrations cannot be read or applied; the message is one line, without credentials."""


@dataclass(frozen=True, kw_only=True)
class MigrationStatus:
    """One migration and whether it is applied."""

    id: str
    applied: bool


def yoyo_url(url: str) -> str:
    """yoyo wants an explicit driver in the scheme; psycopg 3 is ours."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _with_connect_timeout(url: str, seconds: float) -> str:
    """libpq's connect_timeout (whole seconds, at least 2) unless the URL sets one."""
    rest, hash_sign, fragment = url.partition("#")
    if "connect_timeout=" in rest.partition("?")[2]:
        return url
    joiner = "&" if "?" in rest else "?"
    return f"{rest}{joiner}connect_timeout={max(2, math.ceil(seconds))}{hash_sign}{fragment}"


def _yoyo() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import yoyo
        import yoyo.connections
        import yoyo.exceptions

        return yoyo


@contextlib.contextmanager
def _folder() -> Iterator[Path]:
    """The migrations folder as a path (yoyo reads a directory): the package data, or
    MIGRATIONS_DIR when set."""
    if MIGRATIONS_DIR is not None:
        yield MIGRATIONS_DIR
        return
    with importlib.resources.as_file(importlib.resources.files("throttled") / "migrations") as p:
        yield p


def _read_migrations() -> Any:
    """The migration set; an empty or missing folder means an incomplete installation."""
    with _folder() as folder:
        missing = MigrationError(f"no migrations found in {folder}; the installation is incomplete")
        if not folder.is_dir():
            raise missing
        migrations = _yoyo().read_migrations(str(folder))
    if not migrations:
        raise missing
    return migrations


def _backend(url: str, connect_timeout_s: float) -> Any:
    return _yoyo().get_backend(_with_connect_timeout(yoyo_url(url), connect_timeout_s))


def _errors() -> tuple[type[BaseException], ...]:
    """What reading, connecting and applying can raise (driver, yoyo, URL and file errors)."""
    import psycopg

    yoyo = _yoyo()
    return (
        psycopg.Error,
        yoyo.connections.BadConnectionURI,
        yoyo.exceptions.BadMigration,
        yoyo.exceptions.LockTimeout,
        yoyo.exceptions.MigrationConflict,
        ImportError,
        OSError,
        ValueError,
    )


@contextlib.contextmanager
def _translated(url: str, doing: str) -> Iterator[None]:
    """Raise what fails as MigrationError with a one-line message and no credentials."""
    try:
        yield
    except MigrationError:
        raise
    except _errors() as exc:
        raise MigrationError(f"{doing}: {type(exc).__name__}: {_scrubbed(exc, url)}") from None


def _scrubbed(exc: BaseException, url: str) -> str:
    """The error text on one line, the URL masked and its password removed."""
    text = " ".join(str(exc).split())
    for form in (yoyo_url(url), url):
        if form:
            text = text.replace(form, mask_url(form))
    authority = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0]
    userinfo, at, _ = authority.rpartition("@")
    password = userinfo.partition(":")[2] if at else ""
    for secret in {password, unquote(password)} - {""}:
        text = text.replace(secret, "***")
    return text


def status(
    url: str, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
) -> list[MigrationStatus]:
    """Every migration with its applied flag (blocking; run in a thread from async code)."""
    with _translated(url, "cannot read the migration status"):
        migrations = _read_migrations()
        backend = _backend(url, connect_timeout_s)
        try:
            with backend.lock():
                applied = {m.id for m in migrations if backend.is_applied(m)}
        finally:
            backend.connection.close()
    return [MigrationStatus(id=m.id, applied=m.id in applied) for m in migrations]


@dataclass(frozen=True, kw_only=True)
class SchemaState:
    """How the database's schema compares with this build's migrations."""

    pending: tuple[str, ...]  # this build's, not applied yet
    unknown: int  # applied, but not this build's (a newer version migrated the database)

    def problem(self) -> str:
        """Why the schema is not current, or "" when it is."""
        if self.pending:
            return f"{len(self.pending)} migration(s) pending ({', '.join(self.pending)})"
        if self.unknown:
            return (
                f"the database has {self.unknown} migration(s) this build does not have: "
                "it was migrated by a newer version of throttled"
            )
        return ""


def check(url: str, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> SchemaState:
    """The schema's state against this build (blocking; run in a thread from async code)."""
    with _translated(url, "cannot read the migration status"):
        migrations = _read_migrations()
        backend = _backend(url, connect_timeout_s)
        try:
            with backend.lock():
                applied = set(backend.get_applied_migration_hashes())
        finally:
            backend.connection.close()
    ours = {m.hash for m in migrations}
    return SchemaState(
        pending=tuple(m.id for m in migrations if m.hash not in applied),
        unknown=len(applied - ours),
    )


def pending(url: str, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> list[str]:
    """Ids of migrations not yet applied."""
    return [m.id for m in status(url, connect_timeout_s=connect_timeout_s) if not m.applied]


def apply(url: str, *, connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> list[str]:
    """Apply pending migrations; return the ids applied."""
    with _translated(url, "cannot apply migrations"):
        migrations = _read_migrations()
        backend = _backend(url, connect_timeout_s)
        try:
            with backend.lock():
                todo = backend.to_apply(migrations)
                backend.apply_migrations(todo)
        finally:
            backend.connection.close()
    return [m.id for m in todo]
