"""What frontends expect of a job API: an estimate before submitting, deadlines (startBy →
expired, never charged), retries linked both ways, queue positions and timings."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from falcon import testing
from sqlalchemy import func, select

from api.app import create_app
from models import AiTask, Event, Transaction, utcnow
from models.audit import run_checks
from models.db import session_scope
from models.uploads import add_upload
from tests.support.builders import make_user
from tests.support.env import isolated_broker, worker_env
from tests.support.http import bearer
from tests.support.processors import OVERRIDES
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

IMAGE = {"type": "image_analysis", "input": "https://example.com/cat.jpg"}
IMAGE_UPLOAD = {"type": "image_analysis", "input": None, "params": {"sleep": 0}}  # an upload of the user's
VIDEO = {"type": "video_generation", "input": ["https://example.com/a.png"], "params": {"duration": 4}}


def create(client, headers, body=IMAGE, **extra):
    return client.simulate_post("/api/tasks/create", headers=headers, json={**body, **extra})


class TestEstimate:
    def test_it_answers_what_create_would_meet_and_creates_nothing(self, client, user_headers, session):
        r = client.simulate_post("/api/tasks/estimate", headers=user_headers, json=VIDEO)
        assert r.status_code == 200, r.json
        assert r.json == {"cost": 8, "available": 20, "affordable": True, "planAllows": False, "inFlight": 0,
                          "maxInFlight": 2, "hasRoom": True, "wouldBeAccepted": False}
        assert create(client, user_headers, VIDEO).status_code == 403  # as the estimate said
        ok = client.simulate_post("/api/tasks/estimate", headers=user_headers, json=IMAGE).json
        assert (ok["cost"], ok["wouldBeAccepted"]) == (1, True)
        assert session.scalar(select(func.count()).select_from(AiTask)) == 0

    def test_available_counts_pending_reservations_and_the_in_flight_limit(self, client, user_headers):
        for _ in range(2):
            assert create(client, user_headers).status_code == 201
        r = client.simulate_post("/api/tasks/estimate", headers=user_headers, json=IMAGE).json
        assert (r["available"], r["inFlight"], r["hasRoom"], r["wouldBeAccepted"]) == (18, 2, False, False)

    @pytest.mark.parametrize("body", [
        {"type": "nope", "input": "https://example.com/a.png"},
        {"type": "image_analysis"},
        {"type": "advanced_editing", "input": "https://example.com/a.png", "params": {"operations": [{"op": "x"}]}},
        {"type": "image_analysis", "input": "http://169.254.169.254/latest"},
        {**IMAGE, "startBy": -5},
    ])
    def test_a_bad_body_gets_the_same_400_as_create(self, client, user_headers, body):
        estimate = client.simulate_post("/api/tasks/estimate", headers=user_headers, json=body)
        created = create(client, user_headers, body)
        assert estimate.status_code == created.status_code == 400
        assert estimate.json == created.json


class TestDeadlines:
    def test_start_by_seconds_or_a_time_or_the_plans_default(self, client, user_headers):
        before = utcnow()
        by_seconds = create(client, user_headers, startBy=90).json["task"]["startBy"]
        assert by_seconds > (before + timedelta(seconds=89)).isoformat()[:19]
        at = (utcnow() + timedelta(hours=2)).replace(microsecond=0)
        assert create(client, user_headers, startBy=at.isoformat()).json["task"]["startBy"].startswith(
            at.isoformat()[:19])

    def test_the_free_plans_default_is_an_hour(self, client, user_headers):
        task = create(client, user_headers).json["task"]
        created = task["createdAt"]
        assert task["startBy"] > created and task["startBy"][:13] != "" and task["queuePosition"] >= 1

    @pytest.mark.parametrize("start_by, code", [
        ("2020-01-01T00:00:00Z", "invalid_start_by"), ("2030-01-01T00:00:00", "invalid_start_by"),
        (0, "invalid_start_by"), (31 * 86400, "invalid_start_by"), ("soon", "invalid_start_by")])
    def test_a_deadline_in_the_past_or_malformed_is_a_400(self, client, user_headers, start_by, code):
        r = create(client, user_headers, startBy=start_by)
        assert r.status_code == 400 and r.json["code"] == code, r.json


# --- with real workers ----------------------------------------------------------------------

ISOLATED_REDIS_DB = 3  # nobody consumes it unless a test starts a worker on it


@pytest.fixture
def quiet(e2e_settings, e2e_engine, e2e_db, make_token):
    """An API on a broker no worker consumes yet, and a pro user of it."""
    settings = isolated_broker(e2e_settings, ISOLATED_REDIS_DB)
    celery = create_celery(settings)
    client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db,
                                           queue=TaskQueue(celery)))
    with session_scope(e2e_db) as s:
        user = make_user(s, plan="pro")
        key = f"uploads/{user.id}/in"
        (settings.media_root / key).parent.mkdir(parents=True, exist_ok=True)
        (settings.media_root / key).write_bytes(b"input")
        upload = add_upload(s, user.id, content_type="application/octet-stream", size=5, sha256="0" * 64,
                            storage_key=key)
    IMAGE_UPLOAD["input"] = str(upload.id)
    return settings, celery, client, bearer(make_token(user.clerk_id)), user.id


def worker(settings, celery, tmp_path, queues=("image_analysis", "maintenance")) -> CeleryWorker:
    return CeleryWorker(worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES), queues=queues, concurrency=2,
                        name=f"cf{uuid.uuid4().hex[:6]}", log_path=tmp_path / "worker.log").start(celery)


def task_of(client, headers, task_id) -> dict:
    return client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"]


def charges(db, task_id) -> int:
    with db() as s:
        return s.scalar(select(func.count()).where(Transaction.task_id == uuid.UUID(task_id)))


@pytest.mark.e2e
class TestDeadlinesWithWorkers:
    def test_a_task_no_worker_started_in_time_expires_uncharged_and_frees_its_reservation(self, quiet, e2e_db,
                                                                                          tmp_path):
        settings, celery, client, headers, user_id = quiet
        late = create(client, headers, IMAGE_UPLOAD, startBy=1).json["task"]
        kept = create(client, headers, IMAGE_UPLOAD, startBy=600).json["task"]
        assert client.simulate_get("/api/users/credits", headers=headers).json["reserved"] == 2
        time.sleep(1.2)
        with worker(settings, celery, tmp_path):  # the worker comes too late for the first
            expired = wait_for(lambda: (t := task_of(client, headers, late["id"]))["status"] == "expired" and t, 30,
                               message="expired")
            done = wait_for(lambda: (t := task_of(client, headers, kept["id"]))["status"] == "completed" and t, 30,
                            message="completed")
        assert expired["errorCode"] == "expired" and expired["startedAt"] is None and expired["runTime"] is None
        assert charges(e2e_db, late["id"]) == 0 and charges(e2e_db, kept["id"]) == 1
        assert done["queueTime"] > 1 and done["runTime"] >= 0
        assert client.simulate_get("/api/users/credits", headers=headers).json["reserved"] == 0
        with e2e_db() as s:
            assert s.scalar(select(Event.type).where(Event.task_id == uuid.UUID(late["id"]))) == "task.expired"
            assert list(run_checks(s)) == []

    def test_a_deadline_passing_behind_a_long_task_in_its_queue_expires_it_uncharged(self, quiet, e2e_db, tmp_path):
        settings, celery, client, headers, _ = quiet
        long = create(client, headers, {**IMAGE_UPLOAD, "params": {"sleep": 3}}).json["task"]
        with CeleryWorker(worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES), queues=("image_analysis",),
                          concurrency=1, name=f"one{uuid.uuid4().hex[:6]}", log_path=tmp_path / "one.log").start(celery):
            wait_for(lambda: task_of(client, headers, long["id"])["status"] == "processing", 30, message="long runs")
            behind = create(client, headers, IMAGE_UPLOAD, startBy=1).json["task"]
            assert task_of(client, headers, behind["id"])["queuePosition"] == 1
            final = wait_for(lambda: (t := task_of(client, headers, behind["id"]))["status"] in
                             ("expired", "completed") and t, 30, message="the task behind to end")
            assert wait_for(lambda: task_of(client, headers, long["id"])["status"] == "completed", 30,
                            message="the long task")
        assert final["status"] == "expired" and final["startedAt"] is None
        assert charges(e2e_db, behind["id"]) == 0 and charges(e2e_db, long["id"]) == 1

    def test_the_sweep_expires_overdue_tasks_nobody_picks_up(self, quiet, e2e_db, tmp_path):
        settings, celery, client, headers, _ = quiet
        late = create(client, headers, startBy=1).json["task"]
        time.sleep(1.2)
        with worker(settings, celery, tmp_path, queues=("maintenance",)):  # no image worker at all
            celery.send_task("maintenance.sweep_lost_messages")
            wait_for(lambda: task_of(client, headers, late["id"])["status"] == "expired", 30, message="swept")


@pytest.mark.e2e
class TestRetry:
    def test_a_cancelled_task_retried_is_a_new_task_linked_both_ways_and_charged_once(self, quiet, e2e_db,
                                                                                      tmp_path, make_token):
        settings, celery, client, headers, _ = quiet
        first = create(client, headers, IMAGE_UPLOAD).json["task"]
        assert client.simulate_patch(f"/api/tasks/{first['id']}/cancel", headers=headers).status_code == 200
        r = client.simulate_post(f"/api/tasks/{first['id']}/retry", headers=headers)
        assert r.status_code == 201, r.json
        retry = r.json["task"]
        assert retry["id"] != first["id"] and retry["retryOf"] == first["id"]
        assert (retry["type"], retry["input"], retry["params"]) == (first["type"], first["input"], first["params"])
        assert task_of(client, headers, first["id"])["retries"] == [retry["id"]]
        # A task still in flight cannot be retried; another user's is not found.
        assert client.simulate_post(f"/api/tasks/{retry['id']}/retry", headers=headers).status_code == 409
        stranger = bearer(make_token(f"user_{uuid.uuid4().hex[:8]}"))
        client.simulate_post("/api/users/initialize", headers=stranger)
        assert client.simulate_post(f"/api/tasks/{first['id']}/retry", headers=stranger).status_code == 404
        with worker(settings, celery, tmp_path):
            wait_for(lambda: task_of(client, headers, retry["id"])["status"] == "completed", 30, message="retry ran")
        assert charges(e2e_db, first["id"]) == 0 and charges(e2e_db, retry["id"]) == 1


@pytest.mark.e2e
class TestQueuePosition:
    def test_pending_tasks_know_their_place_in_their_queue_oldest_first(self, quiet):
        _, _, client, headers, _ = quiet
        ids = [create(client, headers).json["task"]["id"] for _ in range(3)]
        video = create(client, headers, VIDEO).json["task"]  # another queue: first in its own
        assert [task_of(client, headers, i)["queuePosition"] for i in ids] == [1, 2, 3]
        assert video["queuePosition"] == 1
        listed = {t["id"]: t["queuePosition"] for t in client.simulate_get("/api/tasks", headers=headers).json["tasks"]}
        assert [listed[i] for i in ids] == [1, 2, 3]
        client.simulate_patch(f"/api/tasks/{ids[0]}/cancel", headers=headers)
        assert [task_of(client, headers, i)["queuePosition"] for i in ids] == [None, 1, 2]
        pending = task_of(client, headers, ids[1])
        assert pending["queueTime"] >= 0 and pending["runTime"] is None
