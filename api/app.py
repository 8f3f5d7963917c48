"""The Falcon app: `create_app(settings, ...)` wires real parts through constructors."""

from __future__ import annotations

import json
from typing import Any

import falcon
import falcon.media
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from models.db import create_engine, make_session_factory
from models.base import MAX_JSON_DEPTH, check_storable
from models.errors import InvalidInput
from models.events import set_notifier
from models.admission import UrlPolicy
from notify import RedisNotifier
from settings import Settings
from storage import storage_from_settings

from . import billing, console, docs, errors, health, live, observability, outputs, tasks, uploads, users, webhooks
from .auth import AuthMiddleware, TokenVerifier
from logconfig import configure_logging
from .middleware import BodyLimitMiddleware, CorsMiddleware, RequestIdMiddleware, SessionMiddleware
from .openapi import build_document
from .ratelimit import RateLimiter, RateLimitMiddleware


# Not counted against the per-IP limit: load balancers probe /health, Stripe delivers to
# its webhook (a limit would only make it retry), Prometheus scrapes /metrics.
RATE_LIMIT_EXEMPT = ("/health", "/api/billing/webhook", "/metrics")


def routes(settings: Settings, engine: Engine, queue, storage, *,
           sessions: sessionmaker[Session] | None = None) -> list[tuple[str, Any]]:
    """Every route of the API: registered on the app and documented in /openapi.json alike."""
    money = billing.Billing(settings)
    # Prefer: wait and the event streams of this process (nothing connects until one waits).
    waits = live.Waits.from_settings(settings)
    upgrade = billing.UpgradePlanResource(money)
    url_policy = UrlPolicy(settings.fetch_allow_private, tuple(settings.fetch_allowed_hosts))
    table: list[tuple[str, Any]] = [
        ("/health", health.HealthResource(engine, queue)),
        ("/api/users/me", users.MeResource()),
        ("/api/users/credits", users.CreditsResource()),
        ("/api/users/transactions", users.TransactionsResource()),
        ("/api/users/initialize", users.InitializeResource()),
        ("/api/users/upgrade-plan", upgrade),
        ("/api/billing/plans", billing.PlansResource(money)),
        ("/api/billing/webhook", billing.WebhookResource(money, engine, queue)),
        ("/api/billing/purchase-credits", billing.PurchaseCreditsResource(money)),
        ("/api/billing/purchases/{session_id}/sync", billing.SyncPurchaseResource(money)),
        ("/api/billing/upgrade-plan", upgrade),
        ("/api/billing/history", billing.HistoryResource()),
        ("/api/billing/next-date", billing.NextDateResource()),
        ("/api/billing/portal", billing.PortalResource(money)),
        ("/api/tasks", tasks.TasksResource()),
        ("/api/tasks/create", tasks.CreateTaskResource(url_policy, waits)),
        ("/api/tasks/estimate", tasks.EstimateTaskResource(url_policy)),
        ("/api/tasks/{task_id}/retry", tasks.RetryTaskResource(url_policy, waits)),
        ("/api/tasks/stats", tasks.TaskStatsResource()),
        ("/api/tasks/{task_id}", tasks.TaskResource(waits)),
        ("/api/tasks/{task_id}/events", live.TaskEventsResource(
            sessions, waits, keepalive_seconds=settings.events_keepalive_seconds)),
        ("/api/tasks/{task_id}/cancel", tasks.CancelTaskResource()),
        ("/api/tasks/{task_id}/status", tasks.TaskStatusResource()),
        ("/api/tasks/{task_id}/output", outputs.TaskOutputResource(storage)),
        ("/api/uploads", uploads.UploadsResource(storage, settings)),
        ("/api/uploads/{upload_id}", uploads.UploadResource()),
        ("/api/tasks/{task_id}/webhook-deliveries", webhooks.TaskWebhookDeliveriesResource()),
        ("/api/webhooks", webhooks.WebhooksResource(url_policy)),
        ("/api/webhooks/signing-secret", webhooks.SigningSecretResource()),
        ("/api/webhooks/settings", webhooks.WebhookSettingsResource()),
        ("/api/webhooks/{webhook_id}", webhooks.WebhookResource()),
        ("/api/webhooks/{webhook_id}/deliveries", webhooks.WebhookDeliveriesResource()),
    ]
    table.append(("/metrics", observability.MetricsResource(settings.metrics_token)))
    table.append(("/openapi.json", docs.OpenApiResource(lambda: build_document(table))))
    table.append(("/docs", docs.DocsResource()))
    # The console: a reference client on the public contract (no route or permission of its own).
    table.append(("/", console.ConsolePageResource()))
    table.append(("/console/{asset}", console.ConsoleAssetResource()))
    return table


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
    if settings.events_redis_url:
        # Wakes waiters (here and in other processes) when a request commits events (a cancel).
        set_notifier(session_factory, RedisNotifier(settings.events_redis_url))
    if queue is None:
        from worker.queue import TaskQueue, create_celery

        queue = TaskQueue(create_celery(settings))
    if storage is None:
        storage = storage_from_settings(settings)

    app = falcon.App(
        middleware=[
            observability.MetricsMiddleware(),
            RequestIdMiddleware(),
            CorsMiddleware(
                allow_origins=settings.frontend_url, allow_credentials=settings.frontend_url,
                expose_headers=["X-Request-ID", "Idempotent-Replayed", "Preference-Applied"],
            ),
            # Authenticate before a byte of the body is read: an anonymous upload is refused
            # with 401 at its headers, not spooled first.
            AuthMiddleware(TokenVerifier(settings)),
            BodyLimitMiddleware(settings.max_body_bytes),
            RateLimitMiddleware(RateLimiter(
                settings.rate_limit_redis_url, per_plan=settings.rate_limit_plans, per_ip=settings.rate_limit_ip,
                window=settings.rate_limit_window_seconds, trusted_proxies=settings.trusted_proxies),
                exempt=RATE_LIMIT_EXEMPT),
            # Task messages committed by a request go out through the queue (models.db's outbox).
            SessionMiddleware(session_factory, send_task=queue.send),
        ],
    )
    app.req_options.strip_url_path_trailing_slash = True
    app.req_options.media_handlers[falcon.MEDIA_JSON] = falcon.media.JSONHandler(loads=load_json_body)
    # JSON and multipart (uploads) only: a form-encoded body must not reach a JSON route.
    app.req_options.media_handlers.pop(falcon.MEDIA_URLENCODED, None)
    errors.install(app)

    for path, resource in routes(settings, engine, queue, storage, sessions=session_factory):
        app.add_route(path, resource)
    app.add_static_route("/docs/assets", docs.ASSETS_PATH)
    return app


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json_body(text: str):
    """Strict JSON for request bodies: no NaN/Infinity, nothing nested past MAX_JSON_DEPTH,
    and nothing PostgreSQL cannot store (refused with 400 before any handler sees it)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidInput(f"The body is nested more than {MAX_JSON_DEPTH} levels deep", code="json_too_deep") from None
    check_storable(value)
    return value


def wsgi() -> falcon.App:
    """gunicorn entry point: `gunicorn 'api.app:wsgi()'`."""
    settings = Settings.from_env()
    configure_logging(settings.log_format)
    return create_app(settings)
