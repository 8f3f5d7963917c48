"""PostgreSQL restarts (a fast shutdown, and an immediate one that needs crash recovery)
while the API and a worker are busy: requests get a quick 503 in the error shape during the
outage, the API and the worker recover without being restarted, and every task that was
queued, being charged, running or completing ends final, charged once or not at all (here:
completed, charged once)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from devenv.embedded import migrate
from models import AiTask
from models.db import create_engine, make_session_factory
from tests.support.servers import (  # noqa: F401 (fixtures)
    Member,
    Service,
    private_postgres,
    private_redis,
    task_outcomes,
)
from tests.support.workers import wait_for

pytestmark = pytest.mark.e2e

BOUNDED = 10.0  # seconds an answer may take while the database is down


def _count(session_factory, *statuses: str) -> int:
    with session_factory() as s:
        query = select(func.count()).select_from(AiTask)
        if statuses:
            query = query.where(AiTask.status.in_(statuses))
        return s.scalar(query)


def _unavailable(status: int, body: dict, took: float) -> None:
    assert status == 503, (status, body)
    assert body == {"error": body.get("error"), "statusCode": 503, "code": "database_unavailable"}, body
    assert took < BOUNDED, took


@pytest.fixture
def stack(private_postgres, private_redis, e2e_settings, tmp_path):
    migrate(private_postgres.url)
    settings = e2e_settings.with_(database_url=private_postgres.url, broker_url=private_redis.url(0),
                                  media_root=tmp_path / "media")
    engine = create_engine(settings.database_url, pool_size=2, max_overflow=2)
    # Tight beat jobs: lost messages re-sent after 3 s, tasks stuck in processing reaped 1 s
    # past their 25 s hard limit (later than a retried task needs to resume and finish).
    service = Service(settings, tmp_path / "service", concurrency=3,
                      BEAT_SWEEP_SECONDS="1", BEAT_REAP_SECONDS="1", LOST_MESSAGE_AFTER_SECONDS="3",
                      STUCK_MARGIN_SECONDS="1", TIME_LIMIT_IMAGE_ANALYSIS="20,25")
    try:
        yield service.start(), make_session_factory(engine), private_postgres
    finally:
        service.close()
        engine.dispose()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarted_under_load(stack, mode):
    service, db, postgres = stack
    member = Member(service, db, credits=100)
    accepted = []
    # Three run at once (concurrency 3), writing progress; three wait in the queue.
    for _ in range(6):
        status, body, _ = member.submit(sleep=3)
        assert status == 201, body
        accepted.append(body["task"]["id"])
    wait_for(lambda: _count(db, "processing") == 3, 20, message="three tasks running")

    postgres.stop(mode)
    try:
        status, body, took = member.submit(sleep=0)
        _unavailable(status, body, took)
        _unavailable(*member.task(accepted[0]))
        status, body, took = service.request("GET", "/health")
        assert status == 503 and "database" in body["error"] and took < BOUNDED, (status, body, took)
        time.sleep(2)  # the running tasks' progress writes and the queued tasks' starts fail meanwhile
        _unavailable(*member.submit(sleep=0))
    finally:
        postgres.start()

    # No process was restarted: the API answers again at once, and the worker takes new work.
    status, body, took = member.submit(sleep=0.5)
    assert status == 201 and took < BOUNDED, (status, body, took)
    accepted.append(body["task"]["id"])
    status, body, _ = member.task(accepted[0])
    assert status == 200, body
    try:
        wait_for(lambda: _count(db) == _count(db, "completed", "failed", "cancelled"), 45, interval=0.5,
                 message="every task to be final")
    except AssertionError:
        raise AssertionError(service.logs(120)) from None
    assert service.alive()
    outcomes = task_outcomes(db)  # final, each charged at most once, the audit clean
    assert sorted(outcomes) == sorted(accepted)
    # A task the outage interrupted (starting, charging, running, completing) is retried once
    # the database is back: resumed under its lease without a second charge, or started if
    # its charge never committed. None is failed for the database's sake.
    assert set(outcomes.values()) == {"completed"}, outcomes


def test_connections_ask_the_server_for_tcp_keepalives(databases):
    """So a worker host that vanishes does not keep its session (and its task's lease) for
    the two hours of Linux's defaults: the server probes after 30 s and gives up in a minute."""
    from sqlalchemy import text

    from models.db import create_engine

    engine = create_engine(databases["unit"])
    try:
        with engine.connect() as conn:
            # Set by this client at connect (on a Unix socket SHOW says 0: no TCP to probe).
            sources = dict(conn.execute(text(
                "SELECT name, source FROM pg_settings WHERE name LIKE 'tcp_keepalives_%'")).all())
        assert sources == {"tcp_keepalives_idle": "client", "tcp_keepalives_interval": "client",
                           "tcp_keepalives_count": "client"}
    finally:
        engine.dispose()
