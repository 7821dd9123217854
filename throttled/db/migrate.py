"""Schema migrations with yoyo (SQL files in `migrations/`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


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


def _backend_and_migrations(url: str) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from yoyo import get_backend, read_migrations

        return get_backend(yoyo_url(url)), read_migrations(str(MIGRATIONS_DIR))


def status(url: str) -> list[MigrationStatus]:
    """Every migration with its applied flag (blocking; run in a thread from async code)."""
    backend, migrations = _backend_and_migrations(url)
    try:
        with backend.lock():
            applied = {m.id for m in migrations if backend.is_applied(m)}
    finally:
        backend.connection.close()
    return [MigrationStatus(id=m.id, applied=m.id in applied) for m in migrations]


def pending(url: str) -> list[str]:
    """Ids of migrations not yet applied."""
    return [m.id for m in status(url) if not m.applied]


def apply(url: str) -> list[str]:
    """Apply pending migrations; return the ids applied."""
    backend, migrations = _backend_and_migrations(url)
    try:
        with backend.lock():
            todo = backend.to_apply(migrations)
            backend.apply_migrations(todo)
    finally:
        backend.connection.close()
    return [m.id for m in todo]
