"""Beat jobs on the `maintenance` queue. Each is safe to run twice or concurrently: the
row locks and unique keys in `models/` decide, not the schedule."""

from __future__ import annotations

import logging
from datetime import timedelta

import metrics
from models.db import session_scope
from models.leases import task_lease
from models.tasks import (
    expire_overdue_tasks,
    fail_task,
    requeue_lost_tasks,
    stuck_processing_tasks,
)

from . import jobs, retention, runtime, webhooks
from .app import app
from .jobs import JobReport

log = logging.getLogger(__name__)


@app.task(name="maintenance.reset_monthly_credits", ignore_result=True)
def reset_monthly_credits() -> dict[str, int]:
    """Reset every user whose period ended, one transaction per user (`worker.jobs`)."""
    return jobs.reset_due(runtime.sessions())


@app.task(name="maintenance.sweep_lost_messages", ignore_result=True)
def sweep_lost_messages() -> int:
    """Expire pending tasks past their deadline (startBy), and re-send pending tasks whose
    message never got picked up (after this job commits).
    It reads ids and types only, so no stored request, however odd, can stop it."""
    age = timedelta(seconds=runtime.settings().lost_message_after_seconds)
    with session_scope(runtime.sessions()) as session:
        # Past their deadline first: an expired task is not worth a message.
        expired = expire_overdue_tasks(session)
    with session_scope(runtime.sessions()) as session:
        resent = requeue_lost_tasks(session, age)
    metrics.JOB_RUNS.labels("sweep", "ok").inc()
    metrics.JOB_ROWS.labels("sweep", "done").inc(resent)
    metrics.JOB_ROWS.labels("expire", "done").inc(expired)
    return resent


@app.task(name="maintenance.reap_stuck_tasks", ignore_result=True)
def reap_stuck_tasks() -> dict[str, int]:
    """Fail and refund tasks stuck in `processing` past their hard time limit, but only
    when no live runner holds their lease."""
    margin = runtime.settings().stuck_margin_seconds
    limits = {name: timedelta(seconds=limit.hard + margin) for name, limit in runtime.settings().time_limits.items()}
    report = JobReport("reap")
    with session_scope(runtime.sessions()) as session:
        candidates = stuck_processing_tasks(session, limits)
    for task_id in candidates:
        def reap(task_id=task_id):
            # Fail it while holding its lease, so a redelivery cannot start it in between.
            with task_lease(runtime.engine(), task_id) as lease:
                if lease is None:
                    return False  # a live runner holds it
                with lease.session() as session:
                    return fail_task(session, task_id, "The task stopped responding and was given up", "stuck")

        report.run(task_id, reap)
    return report.result()


@app.task(name="maintenance.expire_stored_files", ignore_result=True)
def expire_stored_files() -> dict[str, int]:
    """Delete uploads and output files older than RETENTION_DAYS (`worker.retention`);
    nothing when retention is off (0)."""
    days = runtime.settings().retention_days
    if days <= 0:
        return {}
    return retention.expire_stored_files(runtime.sessions(), runtime.storage(), timedelta(days=days))


@app.task(name="maintenance.deliver_webhooks", ignore_result=True)
def deliver_webhooks() -> dict[str, int]:
    """Fan new events out into webhook deliveries and send the due ones (`worker.webhooks`)."""
    return webhooks.deliver_webhooks(runtime.sessions(), runtime.settings())
