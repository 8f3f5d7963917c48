"""Request id, body size limit, and the per-request database session (falcon-sqla's shape)."""

from __future__ import annotations

import logging
import re
import uuid

import falcon
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("studiox.api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


class RequestIdMiddleware:
    """Takes a sane X-Request-ID from the caller or makes one; echoes it on the response."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        given = req.get_header("X-Request-ID") or ""
        req.context.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        resp.set_header("X-Request-ID", getattr(req.context, "request_id", "") or uuid.uuid4().hex)


class _CappedStream:
    """Reads at most `limit` bytes of a body of unknown length, then refuses with 413."""

    def __init__(self, stream, limit: int):
        self._stream, self._left = stream, limit

    def read(self, size: int = -1) -> bytes:
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        data = self._stream.read(want)
        self._left -= len(data)
        if self._left < 0:
            raise _too_large()
        return data

    def readline(self, size: int = -1) -> bytes:  # multipart parsing reads lines
        data = self._stream.readline(self._left + 1 if size is None or size < 0 else min(size, self._left + 1))
        self._left -= len(data)
        if self._left < 0:
            raise _too_large()
        return data


def _too_large() -> falcon.HTTPContentTooLarge:
    return falcon.HTTPContentTooLarge(title="Payload too large", description="The request body is too large",
                                      code="payload_too_large")


class BodyLimitMiddleware:
    """Refuses bodies over the limit; a resource may raise its own (`max_body_bytes`)."""

    def __init__(self, default_limit: int):
        self.default_limit = default_limit

    def process_resource(self, req: falcon.Request, resp, resource, params) -> None:
        limit = getattr(resource, "max_body_bytes", None) or self.default_limit
        length = req.content_length
        if length is not None:
            if length > limit:
                raise _too_large()
        elif req.method in ("POST", "PUT", "PATCH"):
            req.stream = _CappedStream(req.stream, limit)


class SessionMiddleware:
    """One session per request on `req.context.session`: committed when the responder
    succeeded, rolled back otherwise. After-commit hooks (task messages) run at commit."""

    def __init__(self, factory: sessionmaker[Session]):
        self.factory = factory

    def process_resource(self, req, resp, resource, params) -> None:
        if resource is not None and getattr(resource, "uses_db", True):
            req.context.session = self.factory()

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        session: Session | None = req.context.get("session")
        if session is None:
            return
        try:
            if req_succeeded:
                session.commit()
            else:
                session.rollback()
        finally:
            session.close()
            req.context.session = None
