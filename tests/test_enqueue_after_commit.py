"""A task message is sent only once the row it names is committed, and never on rollback."""

from __future__ import annotations

import socket
import uuid

import pytest
from sqlalchemy import select

from models import AiTask, User
from models.db import on_commit, session_scope
from models.tasks import submit_task
from models.users import initialize_user
from tests.conftest import worker_env
from tests.support.processors import OVERRIDES
from tests.support.workers import CeleryWorker, wait_for


class TestAfterCommit:
    def test_callback_runs_after_commit_and_sees_the_row_from_another_connection(self, e2e_db):
        seen = []
        with e2e_db() as s:
            user, _ = initialize_user(s, f"u_{uuid.uuid4().hex[:8]}")
            task, _ = submit_task(s, user, "image_analysis", "x", {})

            def check():
                with e2e_db() as other:  # a different connection, as a worker would be
                    seen.append(other.get(AiTask, task.id) is not None)

            on_commit(s, check)
            assert seen == []
            s.commit()
        assert seen == [True]

    def test_callback_is_dropped_on_rollback(self, e2e_db):
        called = []
        with e2e_db() as s:
            initialize_user(s, f"u_{uuid.uuid4().hex[:8]}")
            on_commit(s, lambda: called.append(1))
            s.rollback()
            s.commit()
        assert called == []

    def test_a_savepoint_release_is_not_a_commit(self, e2e_db):
        called = []
        with e2e_db() as s:
            with s.begin_nested():
                on_commit(s, lambda: called.append(1))
            assert called == []
            s.commit()
        assert called == [1]

    def test_a_failing_send_does_not_undo_the_committed_task(self, e2e_db):
        with e2e_db() as s:
            user, _ = initialize_user(s, f"u_{uuid.uuid4().hex[:8]}")
            task, _ = submit_task(s, user, "image_analysis", "x", {})
            on_commit(s, lambda: 1 / 0)  # the broker is down: logged, the sweeper re-sends later
            s.commit()
        with e2e_db() as s:
            assert s.get(AiTask, task.id).status == "pending"


def _rabbitmq_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.mark.e2e
@pytest.mark.skipif(not _rabbitmq_up(), reason="no RabbitMQ on 127.0.0.1:5672")
class TestRabbitMQBroker:
    def test_the_same_code_runs_a_task_over_amqp(self, e2e_settings, e2e_db, e2e_engine, tmp_path):
        from falcon import testing

        from api.app import create_app
        from models.uploads import add_upload
        from tests.conftest import bearer
        from worker.queue import TaskQueue, create_celery

        settings = e2e_settings.with_(broker_url="amqp://guest:guest@127.0.0.1:5672//")
        celery = create_celery(settings)
        with celery.connection_for_write() as conn:
            for queue in celery.conf.task_queues:
                queue.bind(conn).declare()
                queue.bind(conn).purge()
        client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db,
                                               queue=TaskQueue(celery)))
        import jwt
        import time

        token = jwt.encode({"sub": f"amqp_{uuid.uuid4().hex[:6]}", "exp": time.time() + 300},
                           settings.jwt_secret, "HS256")
        headers = bearer(token)
        user_id = client.simulate_post("/api/users/initialize", headers=headers).json["user"]["id"]
        key = f"uploads/{user_id}/in"
        (settings.media_root / key).parent.mkdir(parents=True, exist_ok=True)
        (settings.media_root / key).write_bytes(b"abc")
        with session_scope(e2e_db) as s:
            upload = add_upload(s, uuid.UUID(user_id), content_type="application/octet-stream", size=3,
                                sha256="0" * 64, storage_key=key)
        env = worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES, BROKER_URL=settings.broker_url)
        with CeleryWorker(env, queues=("image_analysis",), concurrency=1, name="amqp",
                          log_path=tmp_path / "w.log").start(celery):
            tid = client.simulate_post("/api/tasks/create", headers=headers,
                                       json={"type": "image_analysis", "input": str(upload.id)}).json["task"]["id"]
            task = wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{tid}", headers=headers).json["task"])
                            ["status"] == "completed" and t, 60, message="amqp task")
        assert task["output"]["bytes"] == 3
        with e2e_db() as s:
            assert s.scalar(select(User.credits).where(User.id == uuid.UUID(user_id))) == 19
