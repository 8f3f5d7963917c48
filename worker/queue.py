"""The Celery app factory and the enqueue interface the API uses.

The API sends by task name through this app object and never imports the task modules
or the processors behind them.
"""

from __future__ import annotations

import threading
import time
import uuid

from celery import Celery
from kombu.exceptions import OperationalError

import logconfig

from settings import Settings
from tasktypes import APPLY_STRIPE_EVENTS_JOB, TASK_TYPE_SPECS, spec_for

# Seconds a Redis broker has to accept a connection and to answer a command.
REDIS_SOCKET_TIMEOUTS = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}


def create_celery(settings: Settings) -> Celery:
    app = Celery("studiox", broker=settings.broker_url, set_as_current=False)
    app.config_from_object("celeryconfig")
    limits = settings.time_limits
    app.conf.task_annotations = {
        spec.celery_task: {"soft_time_limit": limits[name].soft, "time_limit": limits[name].hard}
        for name, spec in TASK_TYPE_SPECS.items()
    }
    # Beat. The ordering matters little: every job is idempotent under the row locks and
    # unique keys of models/, so a job firing twice (or two beats) changes nothing twice.
    app.conf.beat_schedule = {
        name: {"task": f"maintenance.{task}", "schedule": float(seconds)}
        for name, task, seconds in (
            ("reset-monthly-credits", "reset_monthly_credits", settings.beat_reset_seconds),
            ("sweep-lost-messages", "sweep_lost_messages", settings.beat_sweep_seconds),
            ("reap-stuck-tasks", "reap_stuck_tasks", settings.beat_reap_seconds),
            ("reconcile-stripe", "reconcile_stripe", settings.beat_reconcile_seconds),
        )
    }
    # Webhooks: a tick that found the previous one still queued (workers busy or down) is
    # dropped rather than piled up; each run covers everything due when it starts.
    app.conf.beat_schedule["deliver-webhooks"] = {
        "task": "maintenance.deliver_webhooks", "schedule": float(settings.beat_webhooks_seconds),
        "options": {"expires": float(settings.beat_webhooks_seconds)}}
    if settings.retention_days > 0:  # RETENTION_DAYS unset or 0: files are kept for ever
        app.conf.beat_schedule["expire-stored-files"] = {
            "task": "maintenance.expire_stored_files", "schedule": float(settings.beat_retention_seconds)}
    # Redis redelivers a message nobody acknowledged after the visibility timeout. It must be
    # longer than the longest hard time limit, or a long task would run twice at once.
    app.conf.broker_transport_options = {
        "visibility_timeout": 2 * max(limit.hard for limit in limits.values()) + 600,
    }
    if settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        # A Redis that stops answering (frozen, or gone without closing the connection)
        # fails a command within these bounds instead of holding the caller for ever. The
        # worker's BRPOP runs in its event loop with its own checks, not under socket_timeout.
        app.conf.broker_transport_options.update(REDIS_SOCKET_TIMEOUTS)
    return app


class BrokerUnavailable(ConnectionError):
    """The broker did not take a message within the bounded publish retry."""


class TaskQueue:
    """Publishes task messages; one message names one committed `ai_tasks` row."""

    # Jobs that act on every row waiting when they run: one message sent this long ahead
    # covers every request that commits before it is due.
    COALESCED = (APPLY_STRIPE_EVENTS_JOB,)
    COALESCE_SECONDS = 0.5
    # A publish to a broker that is down is retried briefly, then given up: the caller (an
    # API request) answers 503 within a few seconds, and the lost-message sweep re-sends
    # whatever was committed. Each try is bounded by REDIS_SOCKET_TIMEOUTS on Redis.
    PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}

    def __init__(self, celery: Celery):
        self.celery = celery
        self._lock = threading.Lock()
        self._covered_until: dict[str, float] = {}

    def send(self, name: str, task_id: uuid.UUID | str) -> None:
        """Send a task type's message, or a maintenance job's (`maintenance.*`) with its argument.

        Raises BrokerUnavailable (a ConnectionError) when the broker cannot be reached within
        PUBLISH_RETRY_POLICY and the socket timeouts: a few seconds at worst, never a hang."""
        if name in self.COALESCED:
            return self._send_coalesced(name)
        # Routing by name (celeryconfig.task_routes) picks the queue.
        task = name if name.startswith("maintenance.") else spec_for(name).celery_task
        # The worker's log lines of this task carry the id of the request that sent it.
        request_id = logconfig.REQUEST_ID.get()
        self._publish(task, args=[str(task_id)],
                      headers={logconfig.REQUEST_ID_HEADER: request_id} if request_id else None)

    def _publish(self, task: str, **options) -> None:
        try:
            self.celery.send_task(task, retry=True, retry_policy=self.PUBLISH_RETRY_POLICY, **options)
        except OperationalError as exc:  # kombu's: the connection failed after the retries
            raise BrokerUnavailable(str(exc)) from exc

    def _send_coalesced(self, name: str) -> None:
        # The caller has committed. A job already queued to run after this moment will see
        # that commit, so nothing more is sent; otherwise one is queued a moment ahead.
        now = time.time()
        with self._lock:
            if now < self._covered_until.get(name, 0.0):
                return
            self._covered_until[name] = now + self.COALESCE_SECONDS
        try:
            self._publish(name, countdown=self.COALESCE_SECONDS)
        except Exception:
            with self._lock:
                self._covered_until[name] = 0.0
            raise

    def ping(self, timeout: float = 2.0) -> None:
        """Raise if the broker cannot be reached.

        Uses a pooled connection (a health check every second must not open a new one);
        on Redis it round-trips a PING, elsewhere a connected pooled connection counts.
        """
        with self.celery.pool.acquire(block=True, timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            client = getattr(conn.default_channel, "client", None)
            if client is not None and hasattr(client, "ping"):
                client.ping()
