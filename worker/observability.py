"""What a worker's metrics endpoint serves: every prefork child's metrics (multiprocess
mode), and the depth of each queue, read from the broker at scrape time."""

from __future__ import annotations

import logging

from celery import Celery
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.core import GaugeMetricFamily

from tasktypes import MAINTENANCE_QUEUE, TASK_TYPE_SPECS

log = logging.getLogger(__name__)

QUEUES = tuple(dict.fromkeys([spec.queue for spec in TASK_TYPE_SPECS.values()] + [MAINTENANCE_QUEUE]))


class QueueDepthCollector:
    """Messages waiting in each queue (kombu's passive declare: Redis and RabbitMQ alike)."""

    def __init__(self, celery: Celery):
        self.celery = celery

    def collect(self):
        gauge = GaugeMetricFamily("studiox_queue_depth", "Messages waiting in each queue", labels=["queue"])
        try:
            with self.celery.connection_for_read() as conn:
                for queue in QUEUES:
                    gauge.add_metric([queue], self._depth(conn, queue))
        except Exception as exc:  # the broker is down: no depth, but the rest of the scrape stands
            log.warning("queue depth unavailable: %s", exc)
        yield gauge

    @staticmethod
    def _depth(conn, queue: str) -> int:
        channel = conn.channel()
        try:
            return channel.queue_declare(queue=queue, passive=True).message_count
        except conn.channel_errors:
            return 0  # never declared: nothing waits in it
        finally:
            try:
                channel.close()
            except Exception:
                pass


def worker_registry(celery: Celery) -> CollectorRegistry:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # worker/app.py always sets its directory
    registry.register(QueueDepthCollector(celery))
    return registry
