"""Celery settings. The broker URL comes from Settings (REDIS_URL, or BROKER_URL for RabbitMQ).

The database is the state of every task: no result backend is needed, and a message only
carries a task id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

from kombu import Queue

# One queue per task type, plus `maintenance` for beat jobs. Routing is by task name.
TASK_QUEUES = ("image_analysis", "advanced_editing", "video_generation")
task_queues = [Queue(name) for name in (*TASK_QUEUES, "maintenance")]
task_default_queue = "maintenance"
task_routes = {
    "tasks.image_analysis": {"queue": "image_analysis"},
    "tasks.advanced_editing": {"queue": "advanced_editing"},
    "tasks.video_generation": {"queue": "video_generation"},
    "maintenance.*": {"queue": "maintenance"},
}

# Per-type time limits (seconds): soft raises inside the task so it can fail and refund;
# hard kills the child. The stuck-task reaper uses the hard limit plus a margin.
# TIME_LIMIT_<TYPE>=soft,hard overrides a type (e.g. TIME_LIMIT_VIDEO_GENERATION=1800,1860);
# every process (workers, beat) must see the same values, so set them in the shared env.
DEFAULT_TIME_LIMITS = {
    "image_analysis": {"soft": 120, "hard": 150},
    "advanced_editing": {"soft": 180, "hard": 210},
    "video_generation": {"soft": 900, "hard": 960},
}


def time_limits_from_env(env: Mapping[str, str]) -> dict[str, dict[str, float]]:
    limits = {name: dict(values) for name, values in DEFAULT_TIME_LIMITS.items()}
    for name in limits:
        variable = f"TIME_LIMIT_{name.upper()}"
        raw = (env.get(variable) or "").strip()
        if not raw:
            continue
        try:
            soft, hard = (float(part) for part in raw.split(","))
        except ValueError:
            raise ValueError(f"{variable} must be 'soft,hard' in seconds, got {raw!r}") from None
        if not 0 < soft < hard:
            # The soft limit must fire first, or the child is killed before it can refund.
            raise ValueError(f"{variable}: need 0 < soft < hard, got {raw!r}")
        limits[name] = {"soft": soft, "hard": hard}
    return limits


TIME_LIMITS = time_limits_from_env(os.environ)
task_annotations = {f"tasks.{name}": {"soft_time_limit": limits["soft"], "time_limit": limits["hard"]}
                    for name, limits in TIME_LIMITS.items()}

# JSON only: a message is a task id and nothing that could execute.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None

# A task is acknowledged after it ran, and a child killed mid-task (SIGKILL, OOM) puts its
# message back: the worker's lease (models/leases.py) makes the redelivery resume the
# task without charging it again.
task_acks_late = True
task_reject_on_worker_lost = True
# Long jobs: a worker child takes one message at a time, so a slow video does not hold
# other messages hostage in its prefetch buffer.
worker_prefetch_multiplier = 1

# Redis redelivers a message nobody acknowledged after the visibility timeout. It must be
# longer than the longest hard time limit, or a long task would run twice at once.
broker_transport_options = {
    "visibility_timeout": 2 * max(limits["hard"] for limits in TIME_LIMITS.values()) + 600,
}
broker_connection_retry_on_startup = True

# Flower and operators see task events from `task-received` on. The `task-sent` event is
# off: it would be a second broker publish inside every API submission.
worker_send_task_events = True
task_send_sent_event = False
task_track_started = True

timezone = "UTC"
enable_utc = True

# Beat. The ordering matters little: every job is idempotent under the row locks and
# unique keys of models/, so a job firing twice (or two beats) changes nothing twice.
beat_schedule = {
    "reset-monthly-credits": {"task": "maintenance.reset_monthly_credits", "schedule": timedelta(minutes=10)},
    "sweep-lost-messages": {"task": "maintenance.sweep_lost_messages", "schedule": timedelta(minutes=2)},
    "reap-stuck-tasks": {"task": "maintenance.reap_stuck_tasks", "schedule": timedelta(minutes=5)},
}
