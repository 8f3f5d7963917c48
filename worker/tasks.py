"""The AI task messages: one Celery task per type (routed to its own queue), all thin.

A message carries only the task id. The flow and every money decision live in
`models.tasks`; this module holds the lease, resolves inputs, runs the processor and
reports back.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from celery.exceptions import Retry, SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError

import metrics

from models.db import database_unreachable, session_scope
from models.errors import DomainError
from models.leases import Lease, task_lease
from models.tasks import (
    TaskWork,
    complete_task,
    fail_task,
    report_progress,
    start_task,
    task_status,
)

from tasktypes import TASK_TYPE_SPECS

from . import runtime
from .app import app
from .inputs import resolve_inputs
from .processors import (
    Cancelled,
    PermanentError,
    ProcessContext,
    TransientError,
    get_processor,
)

log = logging.getLogger(__name__)

MAX_RETRIES = 3
# A database that went away (a restart, a failover) is waited out: the message is retried
# after 1, 2, 4, 8, 15, 15… seconds, about 75 s in all, and the retry resumes the task under
# its lease, charged once (or starts it, if the charge never committed). Past that the
# message is dropped, and the lost-message sweep (pending) or the reaper (processing)
# settles the task.
DATABASE_RETRIES = 8
# A killed runner's database session ends within milliseconds of its process; waiting
# this long for its lease tells a redelivery from a live duplicate.
LEASE_WAIT_SECONDS = 3.0


class _Progress:
    """Throttled progress writes that also notice cancellation."""

    def __init__(self, task_id: uuid.UUID, lease: Lease, min_interval: float = 0.5):
        self.task_id, self.lease, self.min_interval = task_id, lease, min_interval
        self._last_write, self._last_value, self._cancelled = 0.0, -1, False
        self._last_check = 0.0

    def __call__(self, value: int) -> None:
        now = time.monotonic()
        value = int(value)
        if value == self._last_value or (now - self._last_write < self.min_interval and value < 100):
            return
        with self.lease.session() as session:
            status = report_progress(session, self.task_id, value)
        self._last_write, self._last_value, self._last_check = now, value, now
        self._cancelled = status != "processing"

    def is_cancelled(self) -> bool:
        now = time.monotonic()
        if not self._cancelled and now - self._last_check >= self.min_interval:
            with self.lease.session() as session:
                self._cancelled = task_status(session, self.task_id) != "processing"
            self._last_check = now
        return self._cancelled


def _fail(task_id: uuid.UUID, message: str, code: str, work: TaskWork | None = None) -> tuple[str, str]:
    # A fresh pooled connection: a soft time limit may have interrupted the lease's mid-query.
    with session_scope(runtime.sessions()) as session:
        failed = fail_task(session, task_id, message, code)
    if failed and work is not None:
        metrics.CREDITS_REFUNDED.labels(work.type).inc(work.credits)  # charged, so refunded
    return "failed", code


def _process(work: TaskWork, lease: Lease) -> dict:
    settings = runtime.settings()
    progress = _Progress(work.id, lease)
    # Made on first use (URL inputs, encoders): most tasks never need a scratch directory.
    workdir = Path(tempfile.gettempdir()) / f"studiox-task-{work.id}-{uuid.uuid4().hex[:8]}"
    try:
        with lease.session() as session:
            inputs = resolve_inputs(session, work.user_id, work.type, work.input, storage=runtime.storage(),
                                    settings=settings, workdir=workdir)
        ctx = ProcessContext(progress=progress, is_cancelled=progress.is_cancelled, storage=runtime.storage(),
                             task_id=str(work.id), settings=settings, workdir=workdir)
        processor = get_processor(work.type, settings.processor_overrides)
        return processor(inputs, work.params, ctx)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_ai_task(celery_task, task_id: str, task_type: str = "unknown") -> str:
    """Run one task message; return its outcome (completed, failed, cancelled, duplicate,
    stale, dropped), recorded in the worker's metrics with the time it took."""
    began = time.monotonic()
    outcome, code = "error", ""
    try:
        outcome, code = _run(celery_task, task_id, task_type)
        return outcome
    except Retry:
        outcome = "retry"
        raise
    except DBAPIError as exc:
        if not database_unreachable(exc):
            raise
        outcome, code = "retry", "database_unavailable"
        _retry_when_the_database_is_back(celery_task, task_id, exc)  # raises Retry, or
        outcome = "error"
        raise  # retried too often: the sweep or the reaper settles the task
    finally:
        metrics.TASK_OUTCOMES.labels(task_type, outcome, code).inc()
        metrics.TASK_DURATION.labels(task_type, outcome).observe(time.monotonic() - began)


def _retry_when_the_database_is_back(celery_task, task_id: str, exc: DBAPIError) -> None:
    """Raise Retry (the message comes back after a backoff), or return once retried enough."""
    retries = celery_task.request.retries
    if retries >= DATABASE_RETRIES:
        log.error("task %s: the database is still unavailable after %d retries; the sweep or the reaper "
                  "will settle it", task_id, retries)
        return
    countdown = min(2 ** retries, 15)
    log.warning("task %s: the database is unavailable (%s); retrying in %d s", task_id,
                type(exc.orig or exc).__name__, countdown)
    raise celery_task.retry(exc=exc, countdown=countdown, max_retries=DATABASE_RETRIES)


def _run(celery_task, task_id: str, task_type: str) -> tuple[str, str]:
    try:
        tid = uuid.UUID(task_id)
    except ValueError:
        log.warning("dropping a message with a malformed task id %r", task_id)
        return "dropped", ""
    with task_lease(runtime.engine(), tid, wait_seconds=LEASE_WAIT_SECONDS) as lease:
        if lease is None:
            log.info("task %s is running elsewhere; duplicate message dropped", tid)
            return "duplicate", ""
        # The task's statements run on the lease's connection: one checkout per task.
        try:
            with lease.session() as session:
                work = start_task(session, tid, may_resume=True)
        except DBAPIError:
            # The database, not the task: retried (run_ai_task), and the task stays pending
            # (or, if the charge did commit, processing: the retry resumes it uncharged).
            raise
        except Exception:
            # A stored request this worker cannot read: acking it silently would leave the
            # task pending for ever, holding a slot and a reservation.
            log.exception("task %s cannot be started", tid)
            return _fail(tid, "The task's request cannot be read", "unprocessable_task")
        if work is None:
            return "stale", ""
        log.info("started %s (attempt %d)%s", work.type, work.attempt, ", charged" if work.charged else "")
        if work.charged:
            metrics.CREDITS_CHARGED.labels(work.type).inc(work.credits)
        try:
            output = _process(work, lease)
            with lease.session() as session:
                completed = complete_task(session, tid, output)
        except Cancelled:
            return "cancelled", ""
        except TransientError as exc:
            if celery_task.request.retries < MAX_RETRIES:
                # Retry with backoff; the lease is released before the retry can arrive.
                raise celery_task.retry(exc=exc, countdown=2 ** celery_task.request.retries, max_retries=MAX_RETRIES)
            return _fail(tid, exc.message, exc.code, work)
        except (PermanentError, DomainError) as exc:  # DomainError: an output we cannot store
            return _fail(tid, exc.message, exc.code, work)
        except SoftTimeLimitExceeded:
            return _fail(tid, "The task took longer than its time limit", "time_limit_exceeded", work)
        except DBAPIError as exc:
            if database_unreachable(exc):
                raise  # the database, not the task: retried (run_ai_task), resumed uncharged
            log.exception("task %s failed", tid)
            return _fail(tid, "Processing failed unexpectedly", "processing_failed", work)
        except Exception:
            log.exception("task %s failed", tid)
            return _fail(tid, "Processing failed unexpectedly", "processing_failed", work)
        return ("completed", "") if completed else ("cancelled", "")


_OPTIONS = dict(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)


def _register(spec):
    def run(self, task_id: str) -> str:
        return run_ai_task(self, task_id, spec.name)

    run.__name__ = run.__qualname__ = spec.name
    return app.task(name=spec.celery_task, **_OPTIONS)(run)


# One Celery task per type, each routed to its own queue (celeryconfig.task_routes).
AI_TASKS = {name: _register(spec) for name, spec in TASK_TYPE_SPECS.items()}
