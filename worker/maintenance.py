"""Beat jobs on the `maintenance` queue. Each is safe to run twice or concurrently: the
row locks and unique keys in `models/` decide, not the schedule."""

from __future__ import annotations

import logging
from datetime import timedelta

from celeryconfig import TIME_LIMITS
from models.credits import reset_plan_credits, users_due_for_reset
from models.db import session_scope
from models.leases import task_lease
from models.tasks import (
    fail_task,
    lost_pending_tasks,
    mark_enqueued,
    stuck_processing_tasks,
)

from . import runtime
from .app import app
from .queue import TaskQueue

log = logging.getLogger(__name__)


@app.task(name="maintenance.reset_monthly_credits", ignore_result=True)
def reset_monthly_credits() -> int:
    """Reset every user whose period ended; one transaction per user so one bad row
    cannot hold back the rest."""
    done = 0
    with session_scope(runtime.sessions()) as session:
        due = users_due_for_reset(session)
    for user_id in due:
        with session_scope(runtime.sessions()) as session:
            done += reset_plan_credits(session, user_id)
    return done


@app.task(name="maintenance.sweep_lost_messages", ignore_result=True)
def sweep_lost_messages() -> int:
    """Re-send pending tasks whose message never got picked up. A second message for a
    task is harmless: the first delivery moves it out of `pending`, the other is dropped."""
    queue = TaskQueue(app)
    age = timedelta(seconds=runtime.settings().lost_message_after_seconds)
    with session_scope(runtime.sessions()) as session:
        lost = lost_pending_tasks(session, age)
        for task in lost:
            queue.send(task.type, task.id)
        mark_enqueued(session, [task.id for task in lost])
    return len(lost)


@app.task(name="maintenance.reap_stuck_tasks", ignore_result=True)
def reap_stuck_tasks() -> int:
    """Fail and refund tasks stuck in `processing` past their hard time limit, but only
    when no live runner holds their lease."""
    margin = runtime.settings().stuck_margin_seconds
    limits = {name: timedelta(seconds=limit["hard"] + margin) for name, limit in TIME_LIMITS.items()}
    reaped = 0
    with session_scope(runtime.sessions()) as session:
        candidates = stuck_processing_tasks(session, limits)
    for task_id in candidates:
        # Fail it while holding its lease, so a redelivery cannot start it in between.
        with task_lease(runtime.engine(), task_id) as lease:
            if lease is None:
                continue  # a live runner holds it
            with lease.transaction() as session:
                reaped += fail_task(session, task_id, "The task stopped responding and was given up", "stuck")
    return reaped
