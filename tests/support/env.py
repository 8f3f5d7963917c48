"""Settings and environments for code that runs outside the test process: worker
processes and the brokers they consume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from settings import Settings

ROOT = Path(__file__).resolve().parents[2]
# `.ci/run` sets it when a RabbitMQ answers on the machine (amqp://guest:guest@127.0.0.1:5672//).
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "")
BROKERS = ("redis", "rabbitmq")


def redis_db(url: str, db: int) -> str:
    """The same Redis server URL, on database number `db`."""
    return url.rsplit("/", 1)[0] + f"/{db}" if url.count("/") >= 3 else f"{url}/{db}"


def isolated_broker(settings: Settings, db: int) -> Settings:
    """The same settings on an emptied Redis database that no other test's worker consumes
    (each test module that starts its own worker takes its own number)."""
    isolated = settings.with_(broker_url=redis_db(settings.broker_url, db))
    redis.Redis.from_url(isolated.broker_url).flushdb()
    return isolated


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a worker process configured with `settings`, plus `extra` variables."""
    # Each process tree makes its own metrics directory (PROMETHEUS_MULTIPROC_DIR).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_URL", "REDIS_URL", "BROKER_URL", "PROMETHEUS_MULTIPROC_DIR"))}
    env.update(
        APP_ENV="test",
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.broker_url,
        JWT_SECRET=settings.jwt_secret,
        MEDIA_ROOT=str(settings.media_root),
        STUDIOX_DOTENV="/nonexistent",
        PYTHONPATH=str(ROOT),
        # As for Settings made in the test process: no rate limits unless a test sets them.
        RATE_LIMIT_IP="0", RATE_LIMIT_FREE="0", RATE_LIMIT_PRO="0", RATE_LIMIT_ENTERPRISE="0",
    )
    env.update(extra)
    return env


def purged_broker(settings: Settings, url: str) -> Settings:
    """The same settings on a shared broker (RabbitMQ) with every queue declared and emptied."""
    from worker.queue import create_celery

    moved = settings.with_(broker_url=url)
    celery = create_celery(moved)
    with celery.connection_for_write() as conn:
        for queue in celery.conf.task_queues:
            queue.bind(conn).declare()
            queue.bind(conn).purge()
    return moved


def broker_settings(settings: Settings, broker: str, redis_db_number: int) -> Settings:
    """The same settings on an empty broker of kind `broker` ("redis": a Redis database of
    its own; "rabbitmq": the shared RabbitMQ with its queues purged, or the test skipped when
    TEST_RABBITMQ_URL is not set). The end-to-end tests are parametrized over BROKERS."""
    if broker == "rabbitmq":
        if not RABBITMQ_URL:
            pytest.skip("TEST_RABBITMQ_URL is not set")
        return purged_broker(settings, RABBITMQ_URL)
    return isolated_broker(settings, redis_db_number)
