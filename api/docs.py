"""GET /openapi.json (built from the route table on its first request) and GET /docs (Swagger UI,
served from the swagger-ui-bundle wheel under /docs/assets: no CDN at run time)."""

from __future__ import annotations

import json

import falcon
from swagger_ui_bundle import swagger_ui_path

from .openapi import operation

ASSETS_PATH = swagger_ui_path

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>StudioX API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
                                 persistAuthorization: true});
  </script>
</body>
</html>
"""


class OpenApiResource:
    auth = None
    uses_db = False

    def __init__(self, document_factory):
        self._factory = document_factory
        self._text: str | None = None

    @operation("This document (OpenAPI 3.1)", responses={200: {"application/json": {"schema": {"type": "object"}}}})
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._text is None:
            self._text = json.dumps(self._factory())
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self._text


class DocsResource:
    auth = None
    uses_db = False

    @operation("The API documentation in a browser (Swagger UI)",
               responses={200: {"text/html": {"schema": {"type": "string"}}}})
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.text = _PAGE
