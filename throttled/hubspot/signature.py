"""HubSpot request signatures v1, v2 and v3 (hubspot-api.md §3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence

SIGNATURE = "X-HubSpot-Signature"
SIGNATURE_VERSION = "X-HubSpot-Signature-Version"
SIGNATURE_V3 = "X-HubSpot-Signature-v3"
TIMESTAMP = "X-HubSpot-Request-Timestamp"
_HEADERS = (SIGNATURE, SIGNATURE_VERSION, SIGNATURE_V3, TIMESTAMP)
# the keys of _lowered()'s answer
_SIG, _SIG_VERSION, _SIG_V3, _TS = (name.lower() for name in _HEADERS)

# §3.1: v3 URL-decodes only these sequences; the docs don't say whether lower-case hex
# counts, so both cases are decoded (the match is case-insensitive).
# fmt: off
_V3_DECODE = {
    "3A": ":", "2F": "/", "3F": "?", "40": "@", "21": "!", "24": "$",
    "27": "'", "28": "(", "29": ")", "2A": "*", "2C": ",", "3B": ";",
}
# fmt: on
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_TIMESTAMP = re.compile(r"[0-9]{1,20}")


class SignatureError(Exception):
    """A request signature is missing, malformed or wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _utf8(text: str) -> bytes:
    """Encode text as UTF-8 without ever failing (lone surrogates simply won't match)."""
    return text.encode("utf-8", "surrogatepass")


def _v3_uri(uri: str) -> str:
    """Apply v3's selective URL-decoding to a URI."""
    return _PERCENT.sub(lambda m: _V3_DECODE.get(m[1].upper(), m[0]), uri)


def compute_v1(secret: str, body: bytes) -> str:
    """Return the v1 signature: hex sha256(secret + body)."""
    return hashlib.sha256(_utf8(secret) + body).hexdigest()


def compute_v2(secret: str, method: str, uri: str, body: bytes) -> str:
    """Return the v2 signature: hex sha256(secret + method + uri + body)."""
    return hashlib.sha256(_utf8(secret + method + uri) + body).hexdigest()


def compute_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """Return the v3 signature: base64 HMAC-SHA256(secret, method + decoded uri + body + ts)."""
    msg = _utf8(method + _v3_uri(uri)) + body + _utf8(timestamp)
    return base64.b64encode(hmac.digest(_utf8(secret), msg, hashlib.sha256)).decode("ascii")


_WANTED = {name.lower(): name for name in _HEADERS}


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    """Return the signature headers keyed by lower-case name; a repeated one is an error."""
    getall = getattr(headers, "getall", None)
    if getall is not None:  # a case-insensitive multidict (aiohttp's): four lookups
        found: dict[str, str] = {}
        for name, original in _WANTED.items():
            values = getall(name, ())
            if len(values) > 1:
                raise SignatureError(f"duplicate {original} header")
            if values:
                found[name] = values[0]
        return found
    found = {}
    for key, value in headers.items():
        name = key.lower()
        if name in _WANTED:
            if name in found:
                raise SignatureError(f"duplicate {_WANTED[name]} header")
            found[name] = value
    return found


def _matches(candidates: Sequence[str], expected: Sequence[str]) -> bool:
    """Compare every candidate with every expected value in constant time."""
    hit = False
    for c in candidates:
        given = _utf8(c)
        for e in expected:  # every one, even after a hit
            hit |= hmac.compare_digest(given, _utf8(e))
    return hit


def _check_timestamp(value: str | None, now_ms: int, max_skew_s: int) -> str:
    """Return the v3 timestamp; reject one missing, unparsable or out of window either way."""
    if value is None:
        raise SignatureError(f"missing {TIMESTAMP} header")
    if not _TIMESTAMP.fullmatch(value):
        raise SignatureError("v3 timestamp is not an integer of epoch milliseconds")
    if abs(now_ms - int(value)) > max_skew_s * 1000:
        raise SignatureError(f"v3 timestamp is more than {max_skew_s} s off (epoch ms expected)")
    return value


def _verify_v3(
    h: dict[str, str],
    secrets: Sequence[str],
    method: str,
    uri: str,
    body: bytes,
    now_ms: int,
    max_skew_s: int,
) -> None:
    """Check the v3 timestamp window and HMAC."""
    ts = _check_timestamp(h.get(_TS), now_ms, max_skew_s)
    given = h[_SIG_V3]
    # A '+' in the base64 value has been reported arriving as a space (§6.5).
    candidates = [given, given.replace(" ", "+")] if " " in given else [given]
    if not _matches(candidates, [compute_v3(s, method, uri, body, ts) for s in secrets]):
        raise SignatureError("v3 signature mismatch")


def _verify_v1_v2(
    h: dict[str, str], secrets: Sequence[str], method: str, uri: str, body: bytes
) -> str:
    """Check X-HubSpot-Signature under its declared version; return that version."""
    # The docs are silent on a missing version header. Treat it as v2: that is what custom
    # actions send, it is hubspot-api-client's default, and it is the stricter of the two.
    version = h.get(_SIG_VERSION, "v2")
    if version == "v1":
        expected = [compute_v1(s, body) for s in secrets]
    elif version == "v2":
        expected = [compute_v2(s, method, uri, body) for s in secrets]
    else:
        raise SignatureError(f"unsupported signature version {version[:20]!r}")
    if not _matches([h[_SIG]], expected):
        raise SignatureError(f"{version} signature mismatch")
    return version


def verify(
    headers: Mapping[str, str],
    *,
    secrets: Sequence[str],
    method: str,
    uri: str,
    body: bytes,
    now_ms: int,
    max_skew_s: int = 300,
) -> str:
    """Verify every signature present; return the strongest version verified."""
    if isinstance(secrets, str) or not secrets:
        raise ValueError("secrets must be a non-empty sequence of client secrets")
    h = _lowered(headers)
    has_v3, has_sig = _SIG_V3 in h, _SIG in h
    if not has_sig and _SIG_VERSION in h:
        raise SignatureError(f"missing {SIGNATURE} header")
    if not (has_v3 or has_sig):
        raise SignatureError("missing signature headers")
    legacy = _verify_v1_v2(h, secrets, method, uri, body) if has_sig else ""
    if has_v3:
        _verify_v3(h, secrets, method, uri, body, now_ms, max_skew_s)
        return "v3"
    return legacy


def sign_headers(
    secret: str,
    method: str,
    uri: str,
    body: bytes,
    *,
    version: str = "v2",
    now_ms: int | None = None,
) -> dict[str, str]:
    """Return the signature headers HubSpot would send (v3 also carries the v2 pair)."""
    if version == "v1":
        return {SIGNATURE: compute_v1(secret, body), SIGNATURE_VERSION: "v1"}
    if version not in ("v2", "v3"):
        raise ValueError(f"unsupported signature version {version!r}")
    headers = {SIGNATURE: compute_v2(secret, method, uri, body), SIGNATURE_VERSION: "v2"}
    if version == "v3":
        ts = str(int(time.time() * 1000) if now_ms is None else now_ms)
        headers[SIGNATURE_V3] = compute_v3(secret, method, uri, body, ts)
        headers[TIMESTAMP] = ts
    return headers
