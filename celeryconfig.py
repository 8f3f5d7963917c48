"""Celery settings. The broker URL and the time limits come from Settings (REDIS_URL, or
BROKER_URL for RabbitMQ; TIME_LIMIT_<TYPE>), applied by `worker.queue.create_celery`.

The database is the state of every task: no result backend is needed, and a message only
carries a task id.
"""

from __future__ import annotations

from datetime import timedelta

from kombu import Queue

from tasktypes import MAINTENANCE_QUEUE, TASK_TYPE_SPECS

# One queue per task type (named in `tasktypes`), plus `maintenance` for beat jobs.
# Routing is by task name. Time limits come from Settings: `worker.queue.create_celery`
# sets `task_annotations` and the visibility timeout from them.
task_queues = [Queue(spec.queue) for spec in TASK_TYPE_SPECS.values()] + [Queue(MAINTENANCE_QUEUE)]
task_default_queue = MAINTENANCE_QUEUE
task_routes = {
    **{spec.celery_task: {"queue": spec.queue} for spec in TASK_TYPE_SPECS.values()},
    "maintenance.*": {"queue": MAINTENANCE_QUEUE},
}

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

broker_connection_retry_on_startup = True
# A worker that loses the broker keeps trying to reconnect for as long as it takes (the
# default gives up after 100 tries and exits), and lets the tasks it is running finish:
# their results are in PostgreSQL, and a message Redis lost meanwhile is re-sent by the
# lost-message sweep (its redelivery, if any, finds the task final and is dropped).
broker_connection_max_retries = None
worker_cancel_long_running_tasks_on_connection_loss = False

# Flower and operators see task events from `task-received` on. The `task-sent` event is
# off: it would be a second broker publish inside every API submission.
worker_send_task_events = True
task_send_sent_event = False
task_track_started = True

timezone = "UTC"
enable_utc = True

# Beat's schedule is built from Settings (BEAT_*_SECONDS) by `worker.queue.create_celery`.
