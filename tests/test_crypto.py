"""AES-256-GCM key ring: roundtrip, authentication, rotation, key parsing, no key leaks."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttled.crypto import CryptoError, KeyRing, generate_key, key_id, parse_key

TOKEN = "placeholder-access-token-0000"


def ring(*previous: str) -> KeyRing:
    return KeyRing.from_texts(generate_key(), previous)


def flip(token: str, index: int) -> str:
    """Flip one bit of the decoded nonce + ciphertext of a token."""
    head, _, b64 = token.rpartition(".")
    blob = bytearray(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)))
    blob[index] ^= 1
    return f"{head}.{base64.urlsafe_b64encode(bytes(blob)).decode().rstrip('=')}"


@settings(max_examples=50)
@given(plaintext=st.text(alphabet=st.characters(codec="utf-8")), aad=st.binary(max_size=64))
def test_roundtrip(plaintext: str, aad: bytes) -> None:
    keys = KeyRing(os.urandom(32))
    assert keys.decrypt(keys.encrypt(plaintext, aad=aad), aad=aad) == plaintext


def test_token_format() -> None:
    keys = ring()
    token = keys.encrypt(TOKEN)
    version, kid, b64 = token.split(".")
    assert (version, kid) == ("v1", keys.primary_id)
    assert kid == key_id(keys.primary) == keys.primary_id
    assert len(kid) == 8
    assert set(b64) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))) == 12 + len(TOKEN) + 16
    assert TOKEN not in token


def test_nonces_are_fresh() -> None:
    keys = ring()
    assert keys.encrypt(TOKEN) != keys.encrypt(TOKEN)


def test_aad_mismatch_fails() -> None:
    keys = ring()
    token = keys.encrypt(TOKEN, aad=b"hub:62515")
    with pytest.raises(CryptoError, match="failed authentication"):
        keys.decrypt(token, aad=b"hub:62516")
    with pytest.raises(CryptoError, match="failed authentication"):
        keys.decrypt(token)


@pytest.mark.parametrize("index", [0, 11, 12, -17, -1])
def test_tamper_fails(index: int) -> None:
    keys = ring()
    with pytest.raises(CryptoError, match="failed authentication"):
        keys.decrypt(flip(keys.encrypt(TOKEN), index))


def test_wrong_key_with_same_id_slot_fails() -> None:
    keys, other = ring(), ring()
    forged = other.encrypt(TOKEN).replace(other.primary_id, keys.primary_id)
    with pytest.raises(CryptoError, match="failed authentication"):
        keys.decrypt(forged)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v1.abcd1234",
        "v2.abcd1234.AAAA",
        "v1.abcd1234.AAAA.extra",
        "v1.{kid}.not base64!",
        "v1.{kid}.AAAA",  # shorter than nonce + tag
        "v1.{kid}." + "A" * 36 + "+/",  # standard alphabet is not accepted
        "v1.{kid}." + "A" * 37,  # impossible base64 length
    ],
)
def test_malformed_ciphertext(token: str) -> None:
    keys = ring()
    with pytest.raises(CryptoError, match="malformed ciphertext"):
        keys.decrypt(token.format(kid=keys.primary_id))


def test_unknown_key_id() -> None:
    keys = ring()
    with pytest.raises(CryptoError, match="unknown key id"):
        keys.decrypt(ring().encrypt(TOKEN))


def test_rotation() -> None:
    old_text, new_text = generate_key(), generate_key()
    old = KeyRing.from_texts(old_text)
    token = old.encrypt(TOKEN, aad=b"hub:1")
    assert not old.needs_rotation(token)

    rotated = KeyRing.from_texts(new_text, [old_text])
    assert rotated.needs_rotation(token)
    assert rotated.decrypt(token, aad=b"hub:1") == TOKEN
    fresh = rotated.encrypt(TOKEN, aad=b"hub:1")
    assert not rotated.needs_rotation(fresh)
    assert fresh.split(".")[1] == rotated.primary_id != old.primary_id

    retired = KeyRing.from_texts(new_text)
    assert retired.decrypt(fresh, aad=b"hub:1") == TOKEN
    with pytest.raises(CryptoError, match="unknown key id"):
        retired.decrypt(token, aad=b"hub:1")


def test_needs_rotation_rejects_malformed() -> None:
    with pytest.raises(CryptoError, match="malformed"):
        ring().needs_rotation("garbage")


def test_parse_key_formats() -> None:
    raw = os.urandom(32)
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode()
    for text in (std, std.rstrip("="), url, url.rstrip("="), raw.hex(), raw.hex().upper()):
        assert parse_key(text) == raw
        assert parse_key(f"  {text}\n") == raw
    assert len(parse_key(generate_key())) == 32


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a key",
        base64.b64encode(b"k" * 16).decode(),  # AES-128 size
        base64.b64encode(b"k" * 33).decode(),
        "ab" * 31,  # 62 hex chars
        "zz" * 32,
        "é" * 43,
        base64.b64encode(b"k" * 32).decode()[:-3] + "!!=",
    ],
)
def test_parse_key_errors_name_format_without_echo(text: str) -> None:
    with pytest.raises(CryptoError, match="32 bytes as base64") as info:
        parse_key(text)
    if text:
        assert text not in str(info.value)
    # No chained decoder error that could carry the input along.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_keyring_rejects_wrong_key_size() -> None:
    with pytest.raises(CryptoError, match="32 bytes"):
        KeyRing(b"k" * 16)


def test_from_texts_rejects_a_bare_string_as_previous() -> None:
    with pytest.raises(TypeError):
        KeyRing.from_texts(generate_key(), generate_key())


def test_repr_hides_key_material() -> None:
    old_text = generate_key()
    keys = KeyRing.from_texts(generate_key(), [old_text])
    text = f"{keys!r} {keys!s}"
    for key in (keys.primary, *keys.previous):
        assert repr(key) not in text
        assert key.hex() not in text
        assert base64.b64encode(key).decode() not in text
        assert base64.urlsafe_b64encode(key).decode().rstrip("=") not in text
    assert old_text not in text
    assert text.count(keys.primary_id) == 2
    assert key_id(keys.previous[0]) in text
