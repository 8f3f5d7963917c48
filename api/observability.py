"""The API's metrics: a count and a latency per route template and status, and
`GET /metrics` (Prometheus text), readable only with METRICS_TOKEN as a bearer token."""

from __future__ import annotations

import hmac
import time

import falcon

import metrics

from .openapi import operation

TOKEN_HEADER = {
    "name": "Authorization", "in": "header", "required": True, "schema": {"type": "string"},
    "description": "`Bearer <METRICS_TOKEN>` (not a user's token)",
}


# Label values come from a fixed set: a client inventing methods must not invent series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        # The template, not the path: one series per route, whatever ids are in the URL.
        route = req.uri_template if resource is not None and req.uri_template else "unmatched"
        method = req.method if req.method in METHODS else "other"
        status = resp.status_code if hasattr(resp, "status_code") else int(str(resp.status).split()[0])
        metrics.HTTP_REQUESTS.labels(route, method, str(status)).inc()
        started = req.context.get("started")
        if started is not None:
            metrics.HTTP_LATENCY.labels(route, method).observe(time.perf_counter() - started)


class MetricsResource:
    auth = None  # its own credential, below
    uses_db = False
    rate_limited = False

    def __init__(self, token: str):
        self.token = token

    @operation("Prometheus metrics of every API process (METRICS_TOKEN)", headers=(TOKEN_HEADER,),
               responses={200: {"text/plain": {"schema": {"type": "string"}}}}, errors=(401,), tags=("service",))
    def on_get(self, req, resp) -> None:
        given = (req.get_header("Authorization") or "").removeprefix("Bearer ").strip()
        if not self.token or not hmac.compare_digest(given.encode(), self.token.encode()):
            raise falcon.HTTPUnauthorized(title="Unauthorized", code="metrics_unauthorized",
                                          challenges=['Bearer realm="metrics"'],
                                          description="The metrics need METRICS_TOKEN as a bearer token"
                                          + ("" if self.token else " (it is not set on this server)"))
        body, content_type = metrics.exposition()
        resp.content_type = content_type
        resp.data = body
