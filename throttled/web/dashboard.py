"""The operator's dashboard: one page (`GET /`) and its files (`GET /static/...`), served from
the package, no token needed (they hold no data: the page asks for the admin token and sends
it with every API call it makes). No build step, nothing from a CDN: the page's own script
and style sheet, and a vendored uPlot for the throughput chart."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from throttled.web.services import clip, error

# No inline script or style, nothing from elsewhere, no framing, no form posted anywhere
# (the login form is handled by the script: the token never goes into a URL).
CSP = (
    "default-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}
# The page's own files change with each release under the same names: always revalidated.
# The vendored ones change only when upgraded: kept a day.
NO_CACHE = "no-cache"
VENDOR_CACHE = "public, max-age=86400"


@dataclass(frozen=True, slots=True)
class Asset:
    """A file served as it is."""

    body: bytes
    content_type: str
    cache: str


@functools.cache
def assets() -> dict[str, Asset]:
    """Every served file by its path under /static/ (read once, on first use)."""
    root = resources.files("throttled.web") / "static"
    found: dict[str, Asset] = {}
    for folder, prefix, cache in ((root, "", NO_CACHE), (root / "vendor", "vendor/", VENDOR_CACHE)):
        for entry in folder.iterdir():
            suffix = "." + entry.name.rpartition(".")[2]
            if entry.is_file() and suffix in _TYPES:
                found[prefix + entry.name] = Asset(entry.read_bytes(), _TYPES[suffix], cache)
    return found


def _send(asset: Asset) -> web.Response:
    response = web.Response(body=asset.body, content_type=asset.content_type, charset="utf-8")
    response.headers["Cache-Control"] = asset.cache
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def page(request: web.Request) -> web.Response:
    """GET /: the dashboard."""
    response = _send(assets()["index.html"])
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    return response


def _file(prefix: str, name: str) -> web.Response:
    asset = assets().get(prefix + name) if name != "index.html" else None
    if asset is None:
        return error(404, "not_found", f"no such file: {clip(prefix + name, 100)}")
    return _send(asset)


async def static_file(request: web.Request) -> web.Response:
    """GET /static/{name}: the dashboard's script, style sheet and icon."""
    return _file("", request.match_info["name"])


async def vendor_file(request: web.Request) -> web.Response:
    """GET /static/vendor/{name}: the vendored chart library."""
    return _file("vendor/", request.match_info["name"])
