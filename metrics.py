"""Prometheus metrics of the API and the workers (prometheus_client).

Processes that fork (gunicorn's workers, Celery's prefork children) run the client
library's multiprocess mode: each process writes its values under PROMETHEUS_MULTIPROC_DIR
and a scrape merges them, so the figures are right whichever worker answered. The
directory must be in the environment before `prometheus_client` is imported:
`gunicorn.conf.py` and `worker/app.py` call `metrics_dir.use_multiprocess_dir` first. Without
it (a single process, the tests' in-process app) the default registry is used.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

# --- the API ---------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter("studiox_http_requests_total", "Requests answered, by route template and status",
                        ["route", "method", "status"])
HTTP_LATENCY = Histogram("studiox_http_request_duration_seconds", "Time to answer a request, by route template",
                         ["route", "method"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TASKS_CREATED = Counter("studiox_tasks_created_total", "Tasks admitted, by type", ["type"])
REFUSALS = Counter("studiox_refusals_total", "Requests refused by the money and limit rules (402, 403, 429), by code",
                   ["status", "code"])
WEBHOOK_DELIVERIES = Counter("studiox_stripe_webhook_deliveries_total",
                             "Stripe webhook deliveries, by event type and result (stored, duplicate, refused)",
                             ["type", "result"])
RATE_LIMIT_FAILED_OPEN = Counter("studiox_rate_limit_failed_open_total",
                                 "Requests let through unchecked because the limiter's Redis was unreachable")
API_REFUNDS = Counter("studiox_api_refunded_credits_total", "Credits refunded by cancellations through the API")

# --- the workers -----------------------------------------------------------------------------------

TASK_DURATION = Histogram("studiox_task_duration_seconds", "Time a worker spent on a task, by type and outcome",
                          ["type", "outcome"],
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
TASK_OUTCOMES = Counter("studiox_task_outcomes_total",
                        "Task messages handled, by type and outcome (completed, failed, cancelled, duplicate, stale)",
                        ["type", "outcome", "code"])
CREDITS_CHARGED = Counter("studiox_credits_charged_total", "Credits charged when workers started tasks", ["type"])
CREDITS_REFUNDED = Counter("studiox_credits_refunded_total", "Credits refunded when workers failed tasks", ["type"])
JOB_RUNS = Counter("studiox_job_runs_total", "Beat and maintenance job runs, by job and result (ok, partial, error)",
                   ["job", "result"])
JOB_ROWS = Counter("studiox_job_rows_total", "Rows a job acted on or skipped", ["job", "kind"])
STRIPE_EVENTS_APPLIED = Counter("studiox_stripe_events_applied_total", "Stripe events applied, by type and outcome",
                                ["type", "outcome"])


def multiprocess_mode() -> bool:
    """Whether this process's metrics are written to the directory (decided at import)."""
    return values.ValueClass is not values.MutexValue


def registry() -> CollectorRegistry:
    """What a scrape reads: every process's values in multiprocess mode, else this one's."""
    if multiprocess_mode():
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return merged
    from prometheus_client import REGISTRY

    return REGISTRY


def exposition(extra: CollectorRegistry | None = None) -> tuple[bytes, str]:
    body = generate_latest(registry())
    if extra is not None:
        body += generate_latest(extra)
    return body, CONTENT_TYPE_LATEST


def process_gone(pid: int) -> None:
    """Drop a dead process's live gauges (gunicorn's child_exit hook)."""
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid)
