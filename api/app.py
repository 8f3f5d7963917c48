"""The Falcon app: `create_app(settings, ...)` wires real parts through constructors."""

from __future__ import annotations

import json

import falcon
import falcon.media
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.db import create_engine, make_session_factory
from models.params import check_storable
from settings import Settings
from storage import LocalStorage

from . import billing, errors, health, outputs, tasks, uploads, users
from .auth import AuthMiddleware, TokenVerifier
from .logs import configure_logging
from .middleware import BodyLimitMiddleware, RequestIdMiddleware, SessionMiddleware


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    session_factory: sessionmaker[Session] | None = None,
    queue=None,
    storage=None,
) -> falcon.App:
    engine = engine or create_engine(settings.database_url)
    session_factory = session_factory or make_session_factory(engine)
    if queue is None:
        from worker.queue import TaskQueue, create_celery

        queue = TaskQueue(create_celery(settings))
    if storage is None:
        storage = LocalStorage(settings.media_root)

    app = falcon.App(
        middleware=[
            RequestIdMiddleware(),
            falcon.CORSMiddleware(
                allow_origins=settings.frontend_url, allow_credentials=settings.frontend_url,
                expose_headers=["X-Request-ID", "Idempotent-Replayed"],
            ),
            BodyLimitMiddleware(settings.max_body_bytes),
            AuthMiddleware(TokenVerifier(settings)),
            SessionMiddleware(session_factory),
        ],
    )
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.media_handlers[falcon.MEDIA_JSON] = falcon.media.JSONHandler(loads=load_json_body)
    errors.install(app)

    app.add_route("/health", health.HealthResource(engine, queue))
    app.add_route("/api/users/me", users.MeResource())
    app.add_route("/api/users/credits", users.CreditsResource())
    app.add_route("/api/users/transactions", users.TransactionsResource())
    app.add_route("/api/users/initialize", users.InitializeResource())
    app.add_route("/api/users/upgrade-plan", users.UpgradePlanResource())
    app.add_route("/api/billing/plans", billing.PlansResource())
    app.add_route("/api/tasks", tasks.TasksResource())
    app.add_route("/api/tasks/create", tasks.CreateTaskResource(queue))
    app.add_route("/api/tasks/stats", tasks.TaskStatsResource())
    app.add_route("/api/tasks/{task_id}", tasks.TaskResource())
    app.add_route("/api/tasks/{task_id}/cancel", tasks.CancelTaskResource())
    app.add_route("/api/tasks/{task_id}/status", tasks.TaskStatusResource(queue))
    app.add_route("/api/tasks/{task_id}/output", outputs.TaskOutputResource(storage))
    app.add_route("/api/uploads", uploads.UploadsResource(storage, settings))
    app.add_route("/api/uploads/{upload_id}", uploads.UploadResource())
    return app


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json_body(text: str):
    """Strict JSON for request bodies: no NaN/Infinity, no pathological nesting, and
    nothing PostgreSQL cannot store (refused with 400 before any handler sees it)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("the JSON body is nested too deeply") from None
    check_storable(value)
    return value


def wsgi() -> falcon.App:
    """gunicorn entry point: `gunicorn 'api.app:wsgi()'`."""
    settings = Settings.from_env()
    configure_logging(settings)
    return create_app(settings)
