"""AES-256-GCM key ring for encrypting OAuth tokens at rest."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
TOKEN_VERSION = "v1"
_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}")
_URLSAFE_B64 = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_KEY_FORMAT = "a key must be 32 bytes as base64 (standard or urlsafe) or as 64 hex characters"


class CryptoError(Exception):
    """A key or ciphertext is unusable."""


def parse_key(text: str) -> bytes:
    """Parse a 32-byte key given as base64 (any alphabet, padding optional) or 64 hex chars."""
    text = text.strip()
    if _HEX_KEY.fullmatch(text):
        return bytes.fromhex(text)
    b64 = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise CryptoError(_KEY_FORMAT) from None
    if len(key) != KEY_BYTES:
        raise CryptoError(_KEY_FORMAT)
    return key


def generate_key() -> str:
    """Return a new random 256-bit key as standard base64."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> str:
    """Return the key's id: the first 8 hex chars of its sha256."""
    return hashlib.sha256(key).hexdigest()[:8]


def _b64encode(data: bytes) -> str:
    """Encode urlsafe base64 without padding."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    """Decode urlsafe base64 with or without padding, strictly."""
    if not _URLSAFE_B64.fullmatch(text):
        raise ValueError("not urlsafe base64")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, repr=False)
class KeyRing:
    """The primary key encrypts; the primary and previous keys decrypt."""

    primary: bytes
    previous: tuple[bytes, ...] = ()
    _ciphers: dict[str, AESGCM] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        ciphers: dict[str, AESGCM] = {}
        seen: dict[str, bytes] = {}
        for key in (self.primary, *self.previous):
            if len(key) != KEY_BYTES:
                raise CryptoError(_KEY_FORMAT)
            kid = key_id(key)
            if seen.setdefault(kid, key) != key:
                raise CryptoError(f"two different keys share key id {kid}")
            ciphers[kid] = AESGCM(key)
        object.__setattr__(self, "_ciphers", ciphers)

    @classmethod
    def from_texts(cls, primary: str, previous: Sequence[str] = ()) -> KeyRing:
        """Build a ring from key texts as accepted by parse_key."""
        if isinstance(previous, str):
            raise TypeError("previous must be a sequence of key texts, not one string")
        return cls(parse_key(primary), tuple(parse_key(p) for p in previous))

    @property
    def primary_id(self) -> str:
        """Return the primary key's id."""
        return key_id(self.primary)

    def __repr__(self) -> str:
        previous = tuple(key_id(k) for k in self.previous)
        return f"KeyRing(primary_id={self.primary_id!r}, previous_ids={previous!r})"

    def encrypt(self, plaintext: str, *, aad: bytes = b"") -> str:
        """Encrypt under the primary key as 'v1.<keyid>.<urlsafe-b64(nonce + ciphertext)>'."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.primary_id].encrypt(nonce, plaintext.encode("utf-8"), aad)
        return f"{TOKEN_VERSION}.{self.primary_id}.{_b64encode(nonce + sealed)}"

    def decrypt(self, token: str, *, aad: bytes = b"") -> str:
        """Decrypt a token made by encrypt under any key of the ring."""
        kid, blob = _split(token)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise CryptoError(f"unknown key id {kid[:16]!r}")
        try:
            plain = cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except InvalidTag:
            raise CryptoError("ciphertext failed authentication") from None
        return plain.decode("utf-8")

    def needs_rotation(self, token: str) -> bool:
        """Return True when the token is not encrypted under the primary key."""
        return _split(token)[0] != self.primary_id


def _split(token: str) -> tuple[str, bytes]:
    """Split a token into its key id and nonce + ciphertext."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION:
        raise CryptoError("malformed ciphertext")
    try:
        blob = _b64decode(parts[2])
    except (binascii.Error, ValueError):
        raise CryptoError("malformed ciphertext") from None
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError("malformed ciphertext")
    return parts[1], blob
