"""GET / (the console: a small reference client in plain HTML, CSS and JS) and its assets
under GET /console/{asset}, served from the checkout's `console/` directory.

The console is a client like any frontend: it has no route or permission of its own and
talks to the API only through the public contract (bearer token, JSON, /openapi.json). Its
pages carry a Content-Security-Policy that allows only this origin (plus `blob:` images and
videos, which are outputs it fetched with the token itself), so nothing is loaded from a
CDN and no injected inline script runs. In development `make run` hands the token over in
the console link's URL fragment (`/#token=…`), which browsers never send to a server.
"""

from __future__ import annotations

from pathlib import Path

import falcon

from .openapi import operation

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
# Only these files are served (no path from the request ever reaches the filesystem).
ASSETS = {"app.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",
    "media-src 'self' blob:",
    "connect-src 'self'",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
))


def _secure(resp: falcon.Response) -> None:
    resp.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    resp.set_header("X-Content-Type-Options", "nosniff")
    resp.set_header("Referrer-Policy", "no-referrer")
    resp.set_header("X-Frame-Options", "DENY")
    # Small files; a deploy must show its new console at once.
    resp.set_header("Cache-Control", "no-cache")


class ConsolePageResource:
    auth = None
    uses_db = False

    def __init__(self, directory: Path = CONSOLE_DIR):
        self._page = directory / "index.html"

    @operation("The console: a reference client of this API in a browser (HTML)", tags=("service",),
               responses={200: {"text/html": {"schema": {"type": "string"}}}})
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _secure(resp)
        resp.content_type = falcon.MEDIA_HTML
        resp.data = self._page.read_bytes()


class ConsoleAssetResource:
    auth = None
    uses_db = False

    def __init__(self, directory: Path = CONSOLE_DIR):
        self._directory = directory

    @operation("A script, stylesheet or icon of the console", tags=("service",), errors=(404,),
               responses={200: {"text/javascript": {"schema": {"type": "string"}},
                                "text/css": {"schema": {"type": "string"}},
                                "image/svg+xml": {"schema": {"type": "string"}}}})
    def on_get(self, req: falcon.Request, resp: falcon.Response, asset: str) -> None:
        content_type = ASSETS.get(asset)
        if content_type is None:
            raise falcon.HTTPNotFound(title="Not found", description="No such console asset", code="not_found")
        _secure(resp)
        resp.content_type = content_type
        resp.data = (self._directory / asset).read_bytes()
