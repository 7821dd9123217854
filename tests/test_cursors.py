"""Page cursors: exactly what the API gave, nothing else (base64 decoding alone skips stray
characters and ignores some trailing ones)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import Daemon
from throttled.web.services import decode_cursor, encode_cursor

TOKEN = "cursor-admin-token-0123456789abcd"
ADMIN = {"admin": {"tokens": [{"id": "ops", "token": TOKEN}]}}


@given(st.binary(max_size=200))
def test_a_cursor_decodes_to_what_was_encoded(raw):
    assert decode_cursor(encode_cursor(raw)) == raw


@given(st.binary(max_size=100), st.text(min_size=1, max_size=8))
def test_text_appended_to_a_cursor_is_never_read_as_it(raw, extra):
    text = encode_cursor(raw)
    got = decode_cursor(text + extra)
    # (whole base64 groups appended make another cursor: never this one read leniently)
    assert got is None or (encode_cursor(got) == text + extra and got != raw)


@given(st.text(max_size=60))
def test_any_text_is_a_cursor_only_if_it_is_one(text):
    raw = decode_cursor(text)
    assert raw is None or encode_cursor(raw) == text


async def test_every_listing_refuses_a_cursor_with_junk(daemon_factory):
    async with daemon_factory(**ADMIN) as daemon:
        good = {
            "/api/config": encode_cursor(b"1:2"),
            "/api/queues": encode_cursor(b"[1, 2]"),
            "/api/audit": "12",
        }
        for path, cursor in good.items():
            for bad in (cursor + "x", cursor + "%20", "!" + cursor, cursor + "=="):
                status, body = await _get(daemon, f"{path}?cursor={bad}")
                assert (status, body.get("field")) == (400, "cursor"), (path, bad, body)
            assert (await _get(daemon, f"{path}?cursor={cursor}"))[0] == 200


async def _get(daemon: Daemon, path: str) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with daemon.session.get(daemon.url + path, headers=headers) as resp:
        return resp.status, await resp.json()
