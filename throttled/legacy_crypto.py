"""Reading the original Throttle's encrypted tokens (`throttled import-throttle`).

Its `ENCRYPTION_KEY` is base64; a value is base64 of either
- version 2: `0x02 || iv[12] || tag[16] || ciphertext`, AES-256-GCM, empty associated data;
- legacy: `iv[16] || ciphertext`, AES-256-CBC with PKCS#7 padding.
Very old versions used SHA-256 of the decoded key when it was not 32 bytes, so that derived
key is tried too. CBC has no authentication: a wrong key is caught by what it gives, which
must be valid padding and a token (printable ASCII): odds below 2**-50 for a random block
of 30 characters or more.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from throttled.hubspot.oauth import valid_token

VERSION_2 = 0x02
GCM_IV, GCM_TAG, CBC_IV, BLOCK = 12, 16, 16, 16
MAX_KEY_TEXT = 1024
_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class KeyFormatError(ValueError):
    """The original's key is not base64 (the message never holds the key)."""


class NotCiphertext(ValueError):
    """The value is in neither format (it may be a token stored as plaintext)."""


class CannotDecrypt(ValueError):
    """The value looks like a ciphertext, and no key candidate opens it to a token."""


def parse_old_key(text: str) -> tuple[bytes, ...]:
    """The keys to try for an `ENCRYPTION_KEY` text: the decoded key when it is 32 bytes,
    and its SHA-256 (what very old versions used)."""
    cleaned = text.strip()
    if not cleaned or len(cleaned) > MAX_KEY_TEXT:
        raise KeyFormatError(f"the original's key must be base64, 1..{MAX_KEY_TEXT} characters")
    b64 = cleaned.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError("the original's key is not base64") from None
    if not raw:
        raise KeyFormatError("the original's key is empty")
    derived = hashlib.sha256(raw).digest()
    return (raw, derived) if len(raw) == 32 else (derived,)


def decrypt(value: str, keys: tuple[bytes, ...]) -> str:
    """The token a stored value holds. Raises NotCiphertext or CannotDecrypt."""
    data = _decode(value)
    fits_cbc = len(data) >= CBC_IV + BLOCK and len(data) % BLOCK == 0
    fits_gcm = len(data) >= 1 + GCM_IV + GCM_TAG and data[0] == VERSION_2
    if not (fits_gcm or fits_cbc):
        raise NotCiphertext("not in either format")
    for key in keys:
        plain = _open_gcm(data, key) if fits_gcm else None
        if plain is None and fits_cbc:  # (a 0x02 first byte may be a CBC iv's)
            plain = _open_cbc(data, key)
        if plain is not None:
            return plain
    raise CannotDecrypt("no key opens it")


def _decode(value: str) -> bytes:
    text = value.strip()
    if not _B64.fullmatch(text) or len(text) % 4:
        raise NotCiphertext("not base64")
    return base64.b64decode(text, validate=True)


def _token(plain: bytes) -> str | None:
    try:
        text = plain.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if valid_token(text) else None


def _open_gcm(data: bytes, key: bytes) -> str | None:
    iv, tag = data[1 : 1 + GCM_IV], data[1 + GCM_IV : 1 + GCM_IV + GCM_TAG]
    try:
        plain = AESGCM(key).decrypt(iv, data[1 + GCM_IV + GCM_TAG :] + tag, b"")
    except InvalidTag:
        return None
    return _token(plain)


def _open_cbc(data: bytes, key: bytes) -> str | None:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(data[:CBC_IV])).decryptor()
    padded = decryptor.update(data[CBC_IV:]) + decryptor.finalize()
    unpadder = padding.PKCS7(BLOCK * 8).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        return None
    return _token(plain)
