"""The baseline of the pipeline benchmark: bare Celery running a no-op task.

It takes every setting from our `celeryconfig` (late ack, reject on worker lost, prefetch
1, JSON, no results, task events), so the only difference from our pipeline is what our
task and API do around the work. Each task INCRs a Redis counter; the one that reaches
`total` records the time, which ends the measurement.

`celery -A bench.bare_app worker -Q bench_bare -c <n>` with BENCH_BARE_BROKER set.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

QUEUE = "bench_bare"
COUNTER = "bench:bare:done"
FINISHED_AT = "bench:bare:finished_at"

app = Celery("bench_bare", broker=os.environ.get("BENCH_BARE_BROKER", "redis://127.0.0.1:6379/0"),
             set_as_current=False)
app.config_from_object("celeryconfig")
app.conf.task_routes = {"bench.noop": {"queue": QUEUE}}
app.conf.beat_schedule = {}

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:  # per pool child, after fork
        _client = redis.Redis.from_url(app.conf.broker_url)
    return _client


@app.task(name="bench.noop", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def noop(self, index: int, total: int) -> None:
    if _redis().incr(COUNTER) == total:
        _redis().set(FINISHED_AT, repr(time.time()))
