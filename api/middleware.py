"""Request id, body size limit, and the per-request database session (falcon-sqla's shape)."""

from __future__ import annotations

import logging
import re
import tempfile
import uuid

import falcon

import logconfig
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from models.db import SendTask, set_sender
from models.errors import InvalidInput

log = logging.getLogger("studiox.api")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,128}")
_CHUNK = 64 * 1024
_SPOOL_IN_MEMORY = 1_048_576  # larger chunked bodies (uploads) go to a temporary file


class RequestIdMiddleware:
    """Takes a sane X-Request-ID from the caller or makes one; echoes it on the response."""

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        given = req.get_header("X-Request-ID") or ""
        req.context.request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        # Every log line of this request (and the task messages it sends) carries it.
        logconfig.REQUEST_ID.set(req.context.request_id)
        logconfig.CLERK_ID.set(None)

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        resp.set_header("X-Request-ID", getattr(req.context, "request_id", "") or uuid.uuid4().hex)


class CorsMiddleware(falcon.CORSMiddleware):
    """Falcon's CORS, plus `Vary: Origin` on every answer: the CORS headers depend on the
    request's Origin, and a shared cache must not hand one origin's answer to another."""

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        super().process_response(req, resp, resource, req_succeeded)
        resp.append_header("Vary", "Origin")


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


def _spool_capped(stream, limit: int):
    """The whole body of unknown length in a temporary file, refusing more than `limit` bytes."""
    capped, spool = _CappedStream(stream, limit), tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
    try:
        while chunk := capped.read(_CHUNK):
            spool.write(chunk)
    except falcon.HTTPError:
        spool.close()
        raise
    except Exception:
        # The server's HTTP parser refused the framing (a chunk size that is not hex, a
        # missing terminator) or the client went away: the body cannot be read.
        spool.close()
        log.info("unreadable chunked body", exc_info=True)
        raise InvalidInput("The chunked request body is malformed", code="invalid_body") from None
    except BaseException:
        spool.close()
        raise
    size = spool.tell()
    spool.seek(0)
    return spool, size


class BodyLimitMiddleware:
    """Refuses bodies over the limit; a resource may raise its own (`max_body_bytes`).

    A chunked body has no Content-Length, and Falcon's bounded stream (what `get_media`
    and the multipart parser read) reads nothing without one, so such a body would be
    silently taken as empty. It is read here instead, capped at the limit, and handed on
    with its length as if the client had sent one.
    """

    def __init__(self, default_limit: int):
        self.default_limit = default_limit

    def process_resource(self, req: falcon.Request, resp, resource, params) -> None:
        # No resource (404), no responder for the method (405) or a CORS preflight: the
        # answer needs no body, so none is read, however it is framed.
        if resource is None or req.method == "OPTIONS" or not hasattr(resource, f"on_{req.method.lower()}"):
            return
        limit = getattr(resource, "max_body_bytes", None) or self.default_limit
        length = req.content_length
        if length is not None:
            if length > limit:
                raise _too_large()
        elif "chunked" in (req.get_header("Transfer-Encoding") or "").lower():
            body, size = _spool_capped(req.env["wsgi.input"], limit)
            req.context.spooled_body = body  # closed by process_response
            req.env["wsgi.input"] = req.stream = body
            req.env["CONTENT_LENGTH"] = str(size)
        elif req.method in ("POST", "PUT", "PATCH"):
            req.stream = _CappedStream(req.stream, limit)

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        body = req.context.get("spooled_body")
        if body is not None:
            body.close()


class SessionMiddleware:
    """One session per request on `req.context.session`: committed when the responder
    succeeded, rolled back otherwise. After-commit hooks (task messages) run at commit."""

    def __init__(self, factory: sessionmaker[Session], *, send_task: SendTask | None = None):
        self.factory, self.send_task = factory, send_task

    def process_resource(self, req, resp, resource, params) -> None:
        if resource is not None and getattr(resource, "uses_db", True):
            session = req.context.session = self.factory()
            if self.send_task is not None:
                set_sender(session, self.send_task)

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        session: Session | None = req.context.get("session")
        if session is None:
            return
        try:
            if req_succeeded:
                session.commit()
            else:
                session.rollback()
        except DBAPIError:
            # The database went away mid-request: the error already answered says so (503);
            # a rollback on a dead connection has nothing to undo.
            if req_succeeded:
                raise
            log.warning("rollback failed; the connection is gone", exc_info=True)
        finally:
            session.close()
            req.context.session = None
