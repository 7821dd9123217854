"""The HubSpot client's send-instant hooks, against a raw socket on loopback."""

from __future__ import annotations

import select
import socket

import aiohttp

from throttled.hubspot.client import HubSpotClient, trace_config


async def test_on_written_runs_once_the_request_is_in_the_peers_socket():
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    port = server.getsockname()[1]
    events: list[object] = []
    accepted: list[socket.socket] = []

    def on_sent() -> None:
        events.append("sent")

    def on_written() -> None:
        conn, _ = server.accept()  # the client connected before it wrote anything
        accepted.append(conn)
        readable, _, _ = select.select([conn], [], [], 0)
        events.append(("written", bool(readable)))
        request = conn.recv(65536)
        events.append(request.split(b"\r\n", 1)[0])
        conn.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")

    try:
        async with aiohttp.ClientSession(trace_configs=[trace_config()]) as session:
            client = HubSpotClient(
                session,
                api_base_url=f"http://127.0.0.1:{port}",
                timeout_s=5.0,
            )
            body = client.completion_body(["cb-1"])
            result = await client.complete_batch("token", body, on_sent, on_written)
    finally:
        for conn in accepted:
            conn.close()
        server.close()
    assert result.status == 204
    # on_sent just before the write; on_written only once the bytes are in the peer's socket
    assert events == [
        "sent",
        ("written", True),
        b"POST /automation/v4/actions/callbacks/complete HTTP/1.1",
    ]
