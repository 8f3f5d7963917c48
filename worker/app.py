"""The Celery app of the worker processes: `celery -A worker.app worker|beat|flower`."""

from __future__ import annotations

from metrics_dir import use_multiprocess_dir

# Before prometheus_client is imported: the prefork children write their metrics there.
use_multiprocess_dir("worker")

from celery import signals  # noqa: E402

from settings import Settings  # noqa: E402
from worker.queue import create_celery  # noqa: E402

from tasktypes import TASK_TYPE_SPECS  # noqa: E402

app = create_celery(Settings.from_env())
_AI_TASK_NAMES = tuple(spec.celery_task for spec in TASK_TYPE_SPECS.values())
app.conf.imports = ("worker.tasks", "worker.maintenance", "worker.billing")


@signals.setup_logging.connect
def _logging(**_):
    # Connected: Celery leaves the logging to us. Its lines, ours and SQLAlchemy's share
    # one handler and one format (JSON outside development).
    from logconfig import configure_logging
    from worker import runtime

    configure_logging(runtime.settings().log_format)


@signals.task_prerun.connect
def _task_context(task=None, args=None, **_):
    # An AI task's id is its message's argument; a job's, its Celery id.
    import logconfig

    logconfig.TASK_ID.set(str(args[0]) if task is not None and task.name in _AI_TASK_NAMES and args else
                          (task.request.id if task is not None else None))
    logconfig.REQUEST_ID.set(getattr(task.request, logconfig.REQUEST_ID_HEADER, None) if task is not None else None)


@signals.task_postrun.connect
def _task_context_end(**_):
    import logconfig

    logconfig.TASK_ID.set(None)
    logconfig.REQUEST_ID.set(None)


@signals.worker_shutting_down.connect
def _grace_period(sig=None, how=None, exitcode=None, **_):
    """SIGTERM starts a warm shutdown: running tasks finish. Past the grace period the
    worker turns it into a cold one (SIGQUIT to itself): the children stop and, with late
    acks, the unfinished tasks' messages return to the queue, to resume under their lease
    on another worker without a second charge."""
    import os
    import signal
    import threading

    from worker import runtime

    grace = runtime.settings().worker_shutdown_grace_seconds
    if how == "Warm" and grace > 0:
        timer = threading.Timer(grace, os.kill, args=(os.getpid(), signal.SIGQUIT))
        timer.daemon = True
        timer.start()


@signals.worker_process_init.connect
def _fresh_resources_per_child(**_):
    # A forked child must not share the parent's database connections.
    from worker import runtime

    runtime.reset()


@signals.worker_ready.connect
def _serve_metrics(sender=None, **_):
    """The worker's metrics (every child's, and the depth of its queues) on
    WORKER_METRICS_ADDRESS:WORKER_METRICS_PORT, when a port is set."""
    from worker import runtime

    settings = runtime.settings()
    if not settings.worker_metrics_port:
        return
    from prometheus_client import start_http_server

    from worker.observability import worker_registry

    try:
        start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_address,
                          registry=worker_registry(app))
    except OSError as exc:  # another process has the port: say so, loudly (signals only log)
        import logging

        logging.getLogger(__name__).error(
            "worker metrics NOT served: %s:%s is taken (%s); give each worker process its own "
            "WORKER_METRICS_PORT", settings.worker_metrics_address, settings.worker_metrics_port, exc)
