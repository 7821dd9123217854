"""HubSpot request signatures: doc vectors, the hubspot-api-client oracle, verify() rules."""

from __future__ import annotations

import secrets as random_secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hubspot.exceptions import InvalidSignatureTimestampError
from hubspot.utils.signature import Signature
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from throttled.hubspot.signature import (
    SignatureError,
    compute_v1,
    compute_v2,
    compute_v3,
    sign_headers,
    verify,
)

# hubspot-api.md §3.3: HubSpot's published examples.
DOC_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
DOC_URI = "https://www.example.com/webhook_uri"
DOC_V1_BODY = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
    b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,'
    b'"changeSource":"CRM","changeFlag":"NEW","appId":54321}]'
)

# hubspot-api.md §3.3: custom-action vectors.
CA_SECRET = "a1b2c3d4-0000-4000-8000-123456789abc"
CA_URI = "https://throttle.example.com/hubspot/action?portal=62515"
CA_BODY = (
    b'{"callbackId":"ap-62515-987654321-1-0","origin":{"portalId":62515,'
    b'"actionDefinitionId":1234567,"actionDefinitionVersion":1,'
    b'"actionExecutionIndexIdentifier":{"enrollmentId":987654321,"actionExecutionIndex":0},'
    b'"extensionDefinitionId":1234567,"extensionDefinitionVersionId":1},'
    b'"context":{"source":"WORKFLOWS","workflowId":55555},'
    b'"object":{"objectId":101,"objectType":"CONTACT"},'
    b'"inputFields":{"queue":"default"},"fields":{"queue":"default"}}'
)
CA_TS = "1735689600000"
NOW_MS = 1735689600000

# fmt: off
V3_CODES = {
    "%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$",
    "%27": "'", "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";",
}
# fmt: on


def reference_v3_uri(uri: str) -> str:
    """Selective decoding done independently: plain replaces, upper and lower case."""
    for code, char in V3_CODES.items():
        uri = uri.replace(code, char).replace(code.lower(), char)
    return uri


def new_secret() -> str:
    return str(random_secrets.token_hex(16))


# --- §3.3 vectors ---------------------------------------------------------------------------


def test_doc_v1_vector() -> None:
    expected = "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"
    assert compute_v1(DOC_SECRET, DOC_V1_BODY) == expected


def test_doc_v2_get_vector() -> None:
    expected = "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e"
    assert compute_v2(DOC_SECRET, "GET", DOC_URI, b"") == expected


def test_doc_v2_post_vector() -> None:
    expected = "9569219f8ba981ffa6f6f16aa0f48637d35d728c7e4d93d0d52efaa512af7900"
    assert compute_v2(DOC_SECRET, "POST", DOC_URI, b'{"example_field":"example_value"}') == expected


def test_library_v3_vector() -> None:
    body = b"{'example_field':'example_value'}"
    expected = "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw="
    assert compute_v3(DOC_SECRET, "POST", DOC_URI, body, "15000000") == expected


def test_custom_action_v1_vector() -> None:
    expected = "24fb58ac6e15652f2ed48e0065bd373402eb8d9313c8bdbba53aa6cd235baac2"
    assert compute_v1(CA_SECRET, CA_BODY) == expected


def test_custom_action_v2_vector() -> None:
    expected = "2e4443d2b246baff108933b6be322e79a618fe30dea77a3d84845ad5afc52929"
    assert compute_v2(CA_SECRET, "POST", CA_URI, CA_BODY) == expected


def test_custom_action_v3_vector() -> None:
    expected = "ThiPNwr2yBIM/28M/ngmd7/l0SGJWYBn61C69BU4myg="
    assert compute_v3(CA_SECRET, "POST", CA_URI, CA_BODY, CA_TS) == expected


@pytest.mark.parametrize("encoded", ["%40", "%40".lower()])
def test_v3_url_decoding_vector(encoded: str) -> None:
    raw = f"https://throttle.example.com/hubspot/action?email=a{encoded}b.com"
    decoded = "https://throttle.example.com/hubspot/action?email=a@b.com"
    expected = "lBNvULgRxGf6ZHlFW+QJLDseoH9UxzzWRtFcrRi6LtY="
    assert compute_v3(CA_SECRET, "POST", raw, CA_BODY, CA_TS) == expected
    assert compute_v3(CA_SECRET, "POST", decoded, CA_BODY, CA_TS) == expected


def test_v3_raw_uri_vector_is_what_we_do_not_send() -> None:
    raw = "https://throttle.example.com/hubspot/action?email=a%40b.com"
    undecoded = "/BV+F7c398sgkMzWzOapDLMW3Yu6q9QaesVlSiET/Wg="
    body = CA_BODY.decode()
    assert Signature.get_signature(CA_SECRET, body, "v3", raw, "POST", CA_TS) == undecoded
    assert compute_v3(CA_SECRET, "POST", raw, CA_BODY, CA_TS) != undecoded


@pytest.mark.parametrize(
    ("uri", "hashed_as"),
    [
        ("https://h/p?a=%3a%2f%3F%40", "https://h/p?a=:/?@"),
        ("https://h/p?a=%21%24%27%28%29%2a%2C%3b", "https://h/p?a=!$'()*,;"),
        ("https://h/p?a=%20%25%3A", "https://h/p?a=%20%25:"),  # others are left alone
        ("https://h/p?a=%253A", "https://h/p?a=%253A"),  # single pass, no double decoding
        ("https://h/p?a=%3%3A%", "https://h/p?a=%3:%"),
    ],
)
def test_v3_decodes_only_the_listed_sequences(uri: str, hashed_as: str) -> None:
    expected = Signature.get_signature(CA_SECRET, "", "v3", hashed_as, "POST", CA_TS)
    assert compute_v3(CA_SECRET, "POST", uri, b"", CA_TS) == expected


# --- the hubspot-api-client oracle ----------------------------------------------------------

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
uri_pieces = st.sampled_from(
    [*V3_CODES, *(c.lower() for c in V3_CODES), "%20", "%25", "%2G", "%", "a", "/", "?", "=", "&"]
)
uris = st.lists(st.one_of(uri_pieces, texts), max_size=20).map(
    lambda parts: "https://throttle.example.com/a?" + "".join(parts)
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE"])
timestamps = st.integers(min_value=0, max_value=10**13).map(str)


@settings(max_examples=50)
@given(secret=texts, body=texts)
def test_v1_matches_oracle(secret: str, body: str) -> None:
    expected = Signature.get_signature(secret, body, "v1")
    assert compute_v1(secret, body.encode()) == expected


@settings(max_examples=50)
@given(secret=texts, method=methods, uri=uris, body=texts)
def test_v2_matches_oracle(secret: str, method: str, uri: str, body: str) -> None:
    expected = Signature.get_signature(secret, body, "v2", uri, method)
    assert compute_v2(secret, method, uri, body.encode()) == expected


@settings(max_examples=50)
@given(secret=texts, method=methods, uri=uris, body=texts, ts=timestamps)
def test_v3_matches_oracle_on_decoded_uri(
    secret: str, method: str, uri: str, body: str, ts: str
) -> None:
    expected = Signature.get_signature(secret, body, "v3", reference_v3_uri(uri), method, ts)
    assert compute_v3(secret, method, uri, body.encode(), ts) == expected


def test_oracle_accepts_our_headers() -> None:
    now_ms = int(time.time() * 1000)  # the oracle reads the wall clock itself
    h = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY, version="v3", now_ms=now_ms)
    body = CA_BODY.decode()
    assert Signature.is_valid(h["X-HubSpot-Signature"], CA_SECRET, body, CA_URI, "POST", "v2")
    sig_v3 = h["X-HubSpot-Signature-v3"]
    ts = h["X-HubSpot-Request-Timestamp"]
    assert Signature.is_valid(sig_v3, CA_SECRET, body, CA_URI, "POST", "v3", ts)
    with pytest.raises(InvalidSignatureTimestampError):
        Signature.is_valid(sig_v3, CA_SECRET, body, CA_URI, "POST", "v3", str(now_ms - 301_000))


# --- verify() -------------------------------------------------------------------------------


def check(
    headers: Mapping[str, str],
    *,
    secrets: Sequence[str] = (CA_SECRET,),
    method: str = "POST",
    uri: str = CA_URI,
    body: bytes = CA_BODY,
    now_ms: int = NOW_MS,
    max_skew_s: int = 300,
) -> str:
    """verify() the custom-action request, with overrides."""
    return verify(
        headers,
        secrets=secrets,
        method=method,
        uri=uri,
        body=body,
        now_ms=now_ms,
        max_skew_s=max_skew_s,
    )


def v3_headers(ts_ms: int, uri: str = CA_URI) -> dict[str, str]:
    return sign_headers(CA_SECRET, "POST", uri, CA_BODY, version="v3", now_ms=ts_ms)


def only_v3(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if "v3" in k or "Timestamp" in k}


def reason(headers: Mapping[str, str], **overrides: Any) -> str:
    with pytest.raises(SignatureError) as info:
        check(headers, **overrides)
    assert str(info.value) == info.value.reason
    return info.value.reason


def test_sign_headers_shapes() -> None:
    assert sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY, version="v1") == {
        "X-HubSpot-Signature": "24fb58ac6e15652f2ed48e0065bd373402eb8d9313c8bdbba53aa6cd235baac2",
        "X-HubSpot-Signature-Version": "v1",
    }
    v2 = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY)
    assert v2 == {
        "X-HubSpot-Signature": "2e4443d2b246baff108933b6be322e79a618fe30dea77a3d84845ad5afc52929",
        "X-HubSpot-Signature-Version": "v2",
    }
    assert v3_headers(NOW_MS) == v2 | {
        "X-HubSpot-Signature-v3": "ThiPNwr2yBIM/28M/ngmd7/l0SGJWYBn61C69BU4myg=",
        "X-HubSpot-Request-Timestamp": CA_TS,
    }
    with pytest.raises(ValueError, match="unsupported"):
        sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY, version="v4")


def test_good_signatures_pass() -> None:
    v1 = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY, version="v1")
    assert check(v1) == "v1"
    assert check(sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY)) == "v2"
    assert check(v3_headers(NOW_MS)) == "v3"
    assert check(only_v3(v3_headers(NOW_MS))) == "v3"


@settings(max_examples=50)
@given(body=st.binary(max_size=200))
def test_arbitrary_body_bytes_never_crash(body: bytes) -> None:
    headers = sign_headers(CA_SECRET, "POST", CA_URI, body, version="v3", now_ms=NOW_MS)
    assert check(headers, body=body) == "v3"


def test_aiohttp_headers_and_duplicates() -> None:
    good = CIMultiDictProxy(CIMultiDict(v3_headers(NOW_MS)))
    assert check(good) == "v3"
    twice = CIMultiDict(v3_headers(NOW_MS))
    twice.add("x-hubspot-signature", "0" * 64)
    assert reason(CIMultiDictProxy(twice)) == "duplicate X-HubSpot-Signature header"


def test_header_names_are_case_insensitive() -> None:
    headers = {k.upper(): v for k, v in v3_headers(NOW_MS).items()}
    assert check(headers) == "v3"
    v2 = {k.lower(): v for k, v in sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY).items()}
    assert check(v2) == "v2"


def test_missing_version_header_means_v2() -> None:
    v2 = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY)
    del v2["X-HubSpot-Signature-Version"]
    assert check(v2) == "v2"
    v1 = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY, version="v1")
    del v1["X-HubSpot-Signature-Version"]
    assert reason(v1) == "v2 signature mismatch"


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize(
    "override",
    [
        {"body": CA_BODY + b" "},
        {"body": CA_BODY.replace(b"62515", b"62516")},
        {"uri": CA_URI + "&x=1"},
        {"uri": CA_URI.replace("https", "http")},
        {"method": "PUT"},
        {"secrets": ["b1b2c3d4-0000-4000-8000-123456789abc"]},
    ],
)
def test_tampering_fails(version: str, override: dict[str, Any]) -> None:
    headers = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY, version=version, now_ms=NOW_MS)
    assert reason(headers, **override) == "v2 signature mismatch"
    if version == "v3":
        assert reason(only_v3(headers), **override) == "v3 signature mismatch"


def test_tampered_v1_signature_fails() -> None:
    headers = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY, version="v1")
    assert reason(headers, body=b"{}") == "v1 signature mismatch"


def test_both_kinds_must_pass() -> None:
    good_v3 = v3_headers(NOW_MS)
    bad_v2 = good_v3 | {"X-HubSpot-Signature": "0" * 64}
    assert reason(bad_v2) == "v2 signature mismatch"
    bad_v3 = good_v3 | {
        "X-HubSpot-Signature-v3": compute_v3("other", "POST", CA_URI, CA_BODY, CA_TS)
    }
    assert reason(bad_v3) == "v3 signature mismatch"


def test_missing_headers_fail() -> None:
    assert reason({}) == "missing signature headers"
    assert reason({"Content-Type": "application/json"}) == "missing signature headers"
    assert reason({"X-HubSpot-Signature-Version": "v2"}) == "missing X-HubSpot-Signature header"
    no_ts = v3_headers(NOW_MS)
    del no_ts["X-HubSpot-Request-Timestamp"]
    assert reason(no_ts) == "missing X-HubSpot-Request-Timestamp header"


def test_unsupported_version_fails() -> None:
    headers = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY) | {
        "X-HubSpot-Signature-Version": "v9"
    }
    assert reason(headers) == "unsupported signature version 'v9'"


def test_v3_window() -> None:
    for offset_ms in (-300_000, -1, 0, 1, 300_000):
        assert check(v3_headers(NOW_MS + offset_ms)) == "v3"
    for offset_ms in (-301_000, -300_001, 300_001, 301_000, 3_600_000):
        assert reason(v3_headers(NOW_MS + offset_ms)) == (
            "v3 timestamp is more than 300 s off (epoch ms expected)"
        )


def test_v3_custom_skew() -> None:
    headers = v3_headers(NOW_MS - 30_000)
    assert check(headers, max_skew_s=30) == "v3"
    assert reason(headers, max_skew_s=29).startswith("v3 timestamp is more than 29 s off")


def test_v3_timestamp_in_seconds_fails() -> None:
    headers = v3_headers(NOW_MS // 1000)
    assert "more than 300 s off" in reason(headers)


@pytest.mark.parametrize("ts", ["", "abc", "1735689600000.0", "1.7e12", " 1735689600000", "-5"])
def test_v3_unparsable_timestamp_fails(ts: str) -> None:
    headers = only_v3(v3_headers(NOW_MS)) | {"X-HubSpot-Request-Timestamp": ts}
    assert reason(headers) == "v3 timestamp is not an integer of epoch milliseconds"


def test_v3_plus_mangled_to_space_still_passes() -> None:
    uri = CA_URI + "&n=1"  # chosen so that the signature contains a '+'
    headers = only_v3(v3_headers(NOW_MS, uri))
    sig = headers["X-HubSpot-Signature-v3"]
    assert "+" in sig
    mangled = headers | {"X-HubSpot-Signature-v3": sig.replace("+", " ")}
    assert check(mangled, uri=uri) == "v3"


def test_rotated_secret_passes() -> None:
    old, new = new_secret(), new_secret()
    for version in ("v1", "v2", "v3"):
        headers = sign_headers(old, "POST", CA_URI, CA_BODY, version=version, now_ms=NOW_MS)
        assert check(headers, secrets=[new, old]) == version
        with pytest.raises(SignatureError):
            check(headers, secrets=[new])


def test_secrets_must_be_a_non_empty_sequence() -> None:
    headers = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY)
    with pytest.raises(ValueError, match="secrets"):
        check(headers, secrets=[])
    with pytest.raises(ValueError, match="secrets"):
        check(headers, secrets=CA_SECRET)


def test_non_ascii_header_value_is_a_mismatch_not_a_crash() -> None:
    headers = sign_headers(CA_SECRET, "POST", CA_URI, CA_BODY) | {"X-HubSpot-Signature": "é" * 64}
    assert reason(headers) == "v2 signature mismatch"


def test_reasons_never_contain_secret_or_signature() -> None:
    secret = new_secret()
    good = sign_headers(secret, "POST", CA_URI, CA_BODY, version="v3", now_ms=NOW_MS)
    cases: list[tuple[dict[str, str], dict[str, Any]]] = [
        (good, {"body": b"x"}),
        (only_v3(good), {"body": b"x"}),
        (good, {"now_ms": NOW_MS + 10**9}),
        (good | {"X-HubSpot-Signature-Version": "v9"}, {}),
        (good | {"X-HubSpot-Request-Timestamp": "later"}, {}),
        ({"X-HubSpot-Signature-Version": "v2"}, {}),
        ({}, {}),
    ]
    values = [secret, good["X-HubSpot-Signature"], good["X-HubSpot-Signature-v3"]]
    for headers, overrides in cases:
        with pytest.raises(SignatureError) as info:
            check(headers, secrets=[secret], **overrides)
        text = f"{info.value} {info.value!r} {info.value.reason}"
        assert not any(v in text for v in values)
