"""The monitor's live dashboard at ``/``: one static page with its script and stylesheet, from package data.

Why static files and no template: the page holds no data of its own.  Every number it shows comes from the
monitor's ``/api/snapshot`` and ``/api/stream`` (server-sent events), so the dashboard can never disagree with
the API, needs no build step, and has nothing to escape on the server side.  The script inserts data with
``textContent`` only.

Why the Content-Security-Policy: it makes "no request leaves the machine" a property the browser enforces,
not just a habit of the page: scripts, styles and connections are allowed from this origin only, so a CDN
link slipped in later would be refused (and the dashboard test, which records every request, would fail).

The operator's control token is never in the page: the script asks for it once, keeps it in the browser's
localStorage and sends it only as ``Authorization: Bearer`` on ``POST /api/alerts/{id}/acknowledge``.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

#: URL path -> (file under alphapulse/monitor/static, content type).
ROUTES: dict[str, tuple[str, str]] = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}

#: Only this origin, for everything; ``data:`` images for the empty favicon.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Asset:
    """One file of the page, read once, with the validator a browser sends back to avoid re-downloading it."""

    body: bytes
    content_type: str
    etag: str


ASSETS: web.AppKey[dict[str, Asset]] = web.AppKey("dashboard_assets", dict)


def load_assets() -> dict[str, Asset]:
    """Read the page's files from the installed package (works from a wheel as well as a checkout)."""
    static = resources.files("alphapulse.monitor").joinpath("static")
    out: dict[str, Asset] = {}
    for path, (name, ctype) in ROUTES.items():
        body = static.joinpath(name).read_bytes()
        out[path] = Asset(body, ctype, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


async def _load(app: web.Application) -> None:
    """Start-up hook: the files are read in a worker thread, so serving never touches the disk."""
    app[ASSETS].update(await asyncio.to_thread(load_assets))


async def _serve(request: web.Request) -> web.Response:
    asset = request.app[ASSETS].get(request.path)
    if asset is None:  # cannot happen for a registered path once start-up has run
        raise web.HTTPNotFound()
    headers = {
        "ETag": asset.etag,
        # Revalidate every time: a monitor upgrade must never leave an old script running against a new API.
        "Cache-Control": "no-cache",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


def register_dashboard(app: web.Application) -> None:
    """Add ``GET /`` (the page) and its script and stylesheet to the monitor's application (before it is frozen).

    The files are loaded by an ``on_startup`` hook, off the event loop, before the first request is served.
    """
    app[ASSETS] = {}
    app.on_startup.append(_load)
    for path in ROUTES:
        app.router.add_get(path, _serve)
