"""The Celery app of the worker processes: `celery -A worker.app worker|beat|flower`."""

from __future__ import annotations

from celery import signals

from settings import Settings
from worker.queue import create_celery

app = create_celery(Settings.from_env())
app.conf.imports = ("worker.tasks", "worker.maintenance", "worker.billing")


@signals.worker_process_init.connect
def _fresh_resources_per_child(**_):
    # A forked child must not share the parent's database connections.
    from worker import runtime

    runtime.reset()
