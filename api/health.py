"""GET /health: database and broker reachability; 503 when either is down."""

from __future__ import annotations

import logging

import falcon
from sqlalchemy import text
from sqlalchemy.engine import Engine

from . import schemas
from .errors import error_body
from .openapi import operation
from .serialize import media

log = logging.getLogger("studiox.api")


class HealthResource:
    auth = None
    uses_db = False
    rate_limited = False  # load balancers probe it

    def __init__(self, engine: Engine, queue):
        self.engine, self.queue = engine, queue

    @operation("Database and broker reachability (503 when either is down)", responses={200: schemas.HealthOut})
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        down = []
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # any failure means "not reachable" to an operator
            log.warning("health: database unreachable", exc_info=True)
            down.append("database")
        try:
            self.queue.ping()
        except Exception:
            log.warning("health: broker unreachable", exc_info=True)
            down.append("broker")
        if down:
            resp.status = falcon.HTTP_503
            resp.media = error_body(503, f"Unavailable: {', '.join(down)}", "dependency_unavailable")
        else:
            resp.media = media(schemas.HealthOut(status="ok", checks={"database": "ok", "broker": "ok"}))
