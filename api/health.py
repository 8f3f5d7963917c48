"""GET /health: database and broker reachability; 503 when either is down."""

from __future__ import annotations

import falcon
from sqlalchemy import text
from sqlalchemy.engine import Engine

from api.errors import error_body


class HealthResource:
    auth = None
    uses_db = False

    def __init__(self, engine: Engine, queue):
        self.engine, self.queue = engine, queue

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks = {"database": "ok", "broker": "ok"}
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # any failure means "not reachable" to an operator
            checks["database"] = f"error: {type(exc).__name__}"
        try:
            self.queue.ping()
        except Exception as exc:
            checks["broker"] = f"error: {type(exc).__name__}"
        healthy = all(v == "ok" for v in checks.values())
        if healthy:
            resp.media = {"status": "ok", "checks": checks}
        else:
            down = ", ".join(k for k, v in checks.items() if v != "ok")
            resp.status = falcon.HTTP_503
            resp.media = {**error_body(503, f"Unavailable: {down}", "dependency_unavailable"), "checks": checks}
