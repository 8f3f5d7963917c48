"""The broker dies (SIGKILL, nothing kept) while tasks are queued and running, then comes
back empty on the same port: the API refuses new work with a quick 503 instead of hanging
or half-writing it, recovers by itself, the lost-message sweep re-sends what Redis lost,
and every task ends final with its money straight."""

from __future__ import annotations

import pytest
from falcon import testing
from sqlalchemy import func, select, update

from api.app import create_app
from models import AiTask
from tests.support.http import sign_up
from worker.queue import BrokerUnavailable
from tests.support.servers import Member, Service, private_redis, task_outcomes  # noqa: F401 (fixture)
from tests.support.workers import wait_for

pytestmark = pytest.mark.e2e

BOUNDED = 10.0  # seconds an answer may take while the broker is down


def _count(session_factory, **where) -> int:
    with session_factory() as s:
        query = select(func.count()).select_from(AiTask)
        for column, value in where.items():
            query = query.where(getattr(AiTask, column) == value)
        return s.scalar(query)


def _error_shape(status: int, body: dict, code: str) -> None:
    assert body == {"error": body.get("error"), "statusCode": status, "code": code}, body
    assert isinstance(body["error"], str) and body["error"]


@pytest.fixture
def service(private_redis, e2e_settings, e2e_db, tmp_path):
    settings = e2e_settings.with_(broker_url=private_redis.url(0))
    service = Service(settings, tmp_path / "service", concurrency=2,
                      BEAT_SWEEP_SECONDS="1", LOST_MESSAGE_AFTER_SECONDS="2")
    try:
        yield service.start()
    finally:
        service.close()


def test_redis_killed_and_restarted_empty(private_redis, service, e2e_db):
    member = Member(service, e2e_db, credits=100)
    accepted = []
    # Two run at once (concurrency 2); the other four wait in Redis behind them.
    for _ in range(6):
        status, body, _ = member.submit(sleep=4)
        assert status == 201, body
        accepted.append(body["task"]["id"])
    wait_for(lambda: _count(e2e_db, status="processing") == 2, 20, message="two tasks running")
    assert _count(e2e_db, status="pending") == 4

    private_redis.kill()
    try:
        # New work is refused at once, in the error shape, and nothing of it is kept.
        for _ in range(3):
            status, body, took = member.submit(sleep=0)
            assert status == 503, body
            _error_shape(503, body, "broker_unavailable")
            assert took < BOUNDED, took
        status, body, took = service.request("GET", "/health")
        assert status == 503 and took < BOUNDED, (status, body, took)
        _error_shape(503, body, "dependency_unavailable")
        assert "broker" in body["error"]
        assert _count(e2e_db) == len(accepted)
        # Reading needs only the database.
        status, body, _ = member.task(accepted[0])
        assert status == 200 and body["task"]["status"] in ("processing", "completed"), body
        # The running tasks finish: their work and their money are in PostgreSQL.
        wait_for(lambda: _count(e2e_db, status="completed") == 2, 20, message="the running tasks to complete")
    finally:
        private_redis.start()  # empty: the four queued messages are gone

    # The API recovers by itself: the next submission is sent.
    status, body, took = member.submit(sleep=0)
    assert status == 201 and took < BOUNDED, (status, body, took)
    accepted.append(body["task"]["id"])
    status, body, _ = service.request("GET", "/health")
    assert status == 200, body

    # The sweep (beat, every second) re-sends the four whose messages Redis lost.
    try:
        wait_for(lambda: _count(e2e_db, status="completed") == len(accepted), 60, interval=0.5,
                 message="every task to complete")
    except AssertionError:
        raise AssertionError(f"{service.logs()}") from None
    assert service.alive()
    outcomes = task_outcomes(e2e_db)
    assert sorted(outcomes) == sorted(accepted)
    assert set(outcomes.values()) == {"completed"}


# --- the two answers a failed send can get, in process -------------------------------------------

class RefusingQueue:
    """A broker that never takes a message; `meanwhile` runs first (a worker that got it)."""

    def __init__(self, meanwhile=None):
        self.meanwhile = meanwhile

    def send(self, name, task_id):
        if self.meanwhile is not None:
            self.meanwhile(task_id)
        raise BrokerUnavailable("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def ping(self):
        raise BrokerUnavailable("down")


def _submit(settings, engine, session_factory, make_token, queue):
    client = testing.TestClient(create_app(settings, engine=engine, session_factory=session_factory, queue=queue))
    headers, _ = sign_up(client, make_token())
    return client.simulate_post("/api/tasks/create", headers={**headers, "Idempotency-Key": "k1"},
                                json={"type": "image_analysis", "input": "https://example.com/a.png"})


def test_an_unsent_task_is_withdrawn_and_refused(settings, engine, session_factory, session, make_token):
    before = session.scalar(select(func.count()).select_from(AiTask))
    result = _submit(settings, engine, session_factory, make_token, RefusingQueue())
    assert result.status_code == 503, result.text
    _error_shape(503, result.json, "broker_unavailable")
    assert result.headers.get("Retry-After") == "5"
    assert session.scalar(select(func.count()).select_from(AiTask)) == before


def test_an_unsent_task_a_worker_already_has_is_kept(settings, engine, session_factory, connection, session,
                                                     make_token):
    def worker_took_it(task_id):  # the message did reach the broker before the error
        connection.execute(update(AiTask).where(AiTask.id == task_id).values(status="processing"))

    result = _submit(settings, engine, session_factory, make_token, RefusingQueue(worker_took_it))
    assert result.status_code == 201, result.text
    assert session.get(AiTask, result.json["task"]["id"]) is not None
