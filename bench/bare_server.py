"""A bare aiohttp server for bench/ingest.py's baseline: read the body, answer BLOCK, no I/O.

It serves the same route and the same 200 JSON as the daemon, so the ratio of the two
throughputs is what throttled's own work (signature, parsing, group commit) costs.
Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse

from aiohttp import web

ANSWER = {"outputFields": {"hs_execution_state": "BLOCK", "hs_expiration_duration": "P7D"}}


async def handle_action(request: web.Request) -> web.Response:
    """Read the whole body, then answer like the daemon does."""
    await request.read()
    return web.json_response(ANSWER)


async def handle_healthz(request: web.Request) -> web.Response:
    """Readiness probe for the benchmark."""
    return web.json_response({"status": "ok"})


def main() -> None:
    """Serve until signalled."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=65536)
    app.router.add_post("/api/hubspot/action", handle_action)
    app.router.add_get("/healthz", handle_healthz)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
