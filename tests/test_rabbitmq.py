"""RabbitMQ works with the same code (broker URL only), and there a whole worker killed
mid-task gives its message back at once: the next worker resumes it, charged once.

(On Redis the same message comes back after the visibility timeout; a killed pool child
is covered on Redis in test_pipeline_e2e.) Runs when TEST_RABBITMQ_URL is set.
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest
from falcon import testing
from sqlalchemy import func, select

from api.app import create_app
from models import Transaction, User
from models.db import session_scope
from models.uploads import add_upload
from tests.support.env import RABBITMQ_URL, purged_broker, worker_env
from tests.support.http import sign_up
from tests.support.processors import OVERRIDES
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not RABBITMQ_URL, reason="TEST_RABBITMQ_URL is not set")]


@pytest.fixture
def amqp(e2e_settings, e2e_db, e2e_engine, make_token):
    settings = purged_broker(e2e_settings, RABBITMQ_URL)
    celery = create_celery(settings)
    client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db,
                                           queue=TaskQueue(celery)))
    headers, user = sign_up(client, make_token())
    user_id = uuid.UUID(user["id"])
    key = f"uploads/{user_id}/in"
    (settings.media_root / key).parent.mkdir(parents=True, exist_ok=True)
    (settings.media_root / key).write_bytes(b"abc")
    with session_scope(e2e_db) as s:
        upload = add_upload(s, user_id, content_type="application/octet-stream", size=3, sha256="0" * 64,
                            storage_key=key)

    class Amqp:
        pass

    ctx = Amqp()
    ctx.settings, ctx.celery, ctx.client, ctx.headers, ctx.user_id = settings, celery, client, headers, user_id
    ctx.env = worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES, BROKER_URL=settings.broker_url)

    def submit(**params):
        r = client.simulate_post("/api/tasks/create", headers=headers,
                                 json={"type": "image_analysis", "input": str(upload.id), "params": params})
        assert r.status_code == 201, r.json
        return r.json["task"]["id"]

    def task(task_id):
        return client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"]

    ctx.submit, ctx.task = submit, task
    return ctx


class TestRabbitMQBroker:
    def test_the_same_code_runs_a_task_over_amqp(self, amqp, e2e_db, tmp_path):
        with CeleryWorker(amqp.env, queues=("image_analysis",), concurrency=1, name="amqp",
                          log_path=tmp_path / "w.log").start(amqp.celery):
            tid = amqp.submit()
            task = wait_for(lambda: (t := amqp.task(tid))["status"] == "completed" and t, 60, message="amqp task")
        assert task["output"]["bytes"] == 3
        with e2e_db() as s:
            assert s.scalar(select(User.credits).where(User.id == amqp.user_id)) == 19

    def test_a_whole_worker_killed_mid_task_hands_it_to_the_next_worker_charged_once(self, amqp, e2e_db, tmp_path):
        first = CeleryWorker(amqp.env, queues=("image_analysis",), concurrency=1, name="doomed",
                             log_path=tmp_path / "doomed.log").start(amqp.celery)
        tid = amqp.submit(sleep=4)
        wait_for(lambda: amqp.task(tid)["progress"] >= 10, 30, message="progress")
        # The machine dies: main process and pool child at once.
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait()
        with CeleryWorker(amqp.env, queues=("image_analysis",), concurrency=1, name="heir",
                          log_path=tmp_path / "heir.log").start(amqp.celery):
            task = wait_for(lambda: (t := amqp.task(tid))["status"] == "completed" and t, 60, message="resumed")
        assert task["attempt"] == 2
        with e2e_db() as s:
            charges = s.scalar(select(func.count()).where(Transaction.task_id == uuid.UUID(tid),
                                                         Transaction.type == "credit_deduction"))
            user = s.get(User, amqp.user_id)
            assert charges == 1 and user.credits == 19
