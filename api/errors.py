"""One rendering for every error: `{"error", "statusCode", "code"}`, never a stack trace."""

from __future__ import annotations

import json
import logging

import falcon
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

import metrics
from models.db import database_unreachable  # noqa: F401 (also read from here)
from models.errors import DomainError

log = logging.getLogger("studiox.api")

DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    429: "too_many_requests",
    500: "internal_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, code: str | None = None) -> dict:
    return {"error": message, "statusCode": status, "code": code or DEFAULT_CODES.get(status, "error")}


def _write(resp: falcon.Response, status: int, body: dict) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(body)


def serialize_http_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    status = exc.status_code
    message = exc.description or exc.title or DEFAULT_CODES.get(status, "error")
    if status == 404 and exc.description is None:
        message = f"No route for {req.method} {req.path}"
    if status == 405 and exc.description is None:
        message = f"{req.method} is not allowed on {req.path}"
    if isinstance(exc, falcon.MediaMalformedError):
        code = "invalid_json"
        message = "The request body is not valid JSON"
    else:
        code = exc.code if isinstance(exc.code, str) else None
    _write(resp, status, error_body(status, message, code))


def handle_domain_error(req: falcon.Request, resp: falcon.Response, exc: DomainError, params) -> None:
    body = error_body(exc.status_code, exc.message, exc.code)
    if exc.details:
        body["details"] = exc.details
    if exc.status_code in (402, 403, 429):
        metrics.REFUSALS.labels(str(exc.status_code), exc.code).inc()
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        resp.set_header("Retry-After", str(retry_after))
    _write(resp, exc.status_code, body)


def handle_database_unavailable(req: falcon.Request, resp: falcon.Response, exc: DBAPIError, params) -> None:
    """A 503 the client may retry when the database is out of reach; any other database error
    is a bug or a limit, answered (and logged) as the 500 it is."""
    if not database_unreachable(exc):
        handle_unexpected(req, resp, exc, params)
        return
    log.warning("database unavailable on %s %s: %s", req.method, req.path, exc.orig or exc)
    resp.set_header("Retry-After", "5")
    _write(resp, 503, error_body(503, "The database is unavailable; try again shortly", "database_unavailable"))


class BrokerUnavailable(Exception):
    """Work could not be queued because the broker is out of reach; nothing was kept."""


def handle_broker_unavailable(req: falcon.Request, resp: falcon.Response, exc: BrokerUnavailable, params) -> None:
    log.warning("broker unavailable on %s %s: %s", req.method, req.path, exc)
    resp.set_header("Retry-After", "5")
    _write(resp, 503, error_body(503, "The task queue is unavailable; nothing was submitted, try again shortly",
                                 "broker_unavailable"))


def handle_unexpected(req: falcon.Request, resp: falcon.Response, exc: Exception, params) -> None:
    if isinstance(exc, falcon.HTTPError):  # pragma: no cover - falcon routes these to the serializer
        serialize_http_error(req, resp, exc)
        return
    log.exception("unhandled error on %s %s [request_id=%s]", req.method, req.path,
                  getattr(req.context, "request_id", "-"))
    _write(resp, 500, error_body(500, "Internal server error", "internal_error"))


def install(app: falcon.App) -> None:
    app.set_error_serializer(serialize_http_error)
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(DomainError, handle_domain_error)
    app.add_error_handler((OperationalError, InterfaceError), handle_database_unavailable)
    app.add_error_handler(BrokerUnavailable, handle_broker_unavailable)
