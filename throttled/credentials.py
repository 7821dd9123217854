"""Secrets from files: systemd's `LoadCredential=` puts each in `$CREDENTIALS_DIRECTORY`, one
file per credential, readable by the service alone. config.load() maps their names onto keys;
here they are only read, bounded in size, and never shown."""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"
MAX_BYTES = 64 << 10  # a key, a token or a database URL is far smaller
MAX_FILES = 64


class CredentialError(Exception):
    """A credential cannot be read; the message names it, never its value."""


def read(directory: str) -> dict[str, str]:
    """Every credential in `directory` by name, without surrounding whitespace (a file
    written with `echo` ends with a newline)."""
    folder = Path(directory)
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError as exc:
        raise CredentialError(f"{DIRECTORY_ENV} {directory}: cannot read: {_reason(exc)}") from None
    if len(names) > MAX_FILES:
        raise CredentialError(f"{DIRECTORY_ENV} {directory}: more than {MAX_FILES} files")
    return {name: _read_one(folder / name, name) for name in names}


def _read_one(path: Path, name: str) -> str:
    try:  # (O_NONBLOCK: a FIFO put there must not hang the start)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CredentialError(f"credential {name!r}: not a regular file")
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise CredentialError(f"credential {name!r}: cannot read: {_reason(exc)}") from None
    if len(data) > MAX_BYTES:
        raise CredentialError(f"credential {name!r}: larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff").strip()  # (a BOM is no part of it)
    except UnicodeDecodeError:
        raise CredentialError(f"credential {name!r}: not UTF-8 text") from None
    if not text:
        raise CredentialError(f"credential {name!r}: empty")
    return text


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
