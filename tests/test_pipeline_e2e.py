"""The task pipeline with real Celery worker processes: races, crashes, duplicates.

Money is checked from the database after the dust settles: every task final, the
balance equal to the ledger, each charged task either completed or refunded.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid

import pytest
from sqlalchemy import func, select

from models import AiTask, Transaction, User
from models.credits import ledger_sum
from models.db import session_scope
from models.tasks import FINAL_STATUSES
from models.uploads import add_upload
from tests.support.builders import make_user
from tests.support.concurrency import at_once
from tests.support.env import BROKERS, broker_settings, worker_env
from tests.support.http import bearer
from tests.support.processors import OVERRIDES
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

pytestmark = pytest.mark.e2e


@pytest.fixture
def upload_for(e2e_db, e2e_settings):
    """Make a real input file owned by a user and return its upload id."""

    def make(user_id) -> str:
        key = f"uploads/{user_id}/{uuid.uuid4()}"
        path = e2e_settings.media_root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"input-bytes")
        with session_scope(e2e_db) as s:
            upload = add_upload(s, user_id, filename="in.bin", content_type="application/octet-stream", size=11,
                                sha256="0" * 64, storage_key=key)
        return str(upload.id)

    return make


@pytest.fixture
def customer(e2e_client, e2e_db, make_token, upload_for):
    """A user on a plan (with `credits` in the plan bucket when given) and an upload to use
    as input, calling the API; returns a helper."""

    class Customer:
        def __init__(self, plan="enterprise", credits=None, client=None):
            self.client = client or e2e_client
            with session_scope(e2e_db) as s:
                user = make_user(s, plan=plan, plan_credits=credits)
            self.id, self.headers = user.id, bearer(make_token(user.clerk_id))
            self.upload = upload_for(self.id)

        def submit(self, sleep=0.0, headers=None, **params):
            return self.client.simulate_post(
                "/api/tasks/create", headers={**self.headers, **(headers or {})},
                json={"type": "image_analysis", "input": self.upload, "params": {"sleep": sleep, **params}})

        def cancel(self, task_id):
            return self.client.simulate_patch(f"/api/tasks/{task_id}/cancel", headers=self.headers)

        def task(self, task_id):
            return self.client.simulate_get(f"/api/tasks/{task_id}", headers=self.headers).json["task"]

        def wait_final(self, task_id, timeout=60):
            return wait_for(lambda: (t := self.task(task_id))["status"] in FINAL_STATUSES and t, timeout,
                            message=f"task {task_id} to finish")

    return Customer


def assert_money_consistent(session_factory, user_id):
    with session_factory() as s:
        user = s.get(User, user_id)
        assert user.plan_credits >= 0 and user.purchased_credits >= 0
        assert user.credits == user.plan_credits + user.purchased_credits == ledger_sum(s, user_id)
        tasks = s.scalars(select(AiTask).where(AiTask.user_id == user_id)).all()
        for task in tasks:
            charged = s.scalar(select(func.count()).where(Transaction.task_id == task.id,
                                                          Transaction.type == "credit_deduction"))
            refunded = s.scalar(select(func.count()).where(Transaction.task_id == task.id,
                                                           Transaction.type == "credit_refund"))
            assert charged <= 1 and refunded <= charged
            if task.status == "completed":
                assert (charged, refunded) == (1, 0), task.id
            elif task.status in ("failed", "cancelled"):
                assert refunded == charged, task.id
        return user, tasks


class TestConcurrentSubmitAndCancel:
    def test_twenty_threads_submit_and_cancel_while_workers_process(self, customer, e2e_db, running):
        # 30 credits for 80 one-credit submissions: many must be refused (402 or 429).
        c = customer(plan="enterprise", credits=30, client=running[0])
        accepted, refused, lock = [], [], threading.Lock()

        def client_thread(i):
            rng = random.Random(i)
            for _ in range(4):
                r = c.submit(sleep=rng.choice([0, 0.05, 0.2]))
                with lock:
                    (accepted if r.status_code == 201 else refused).append(r)
                if r.status_code == 201 and rng.random() < 0.4:
                    time.sleep(rng.random() * 0.2)
                    assert c.cancel(r.json["task"]["id"]).status_code in (200, 409)

        at_once(20, client_thread)
        assert accepted and refused
        assert {r.status_code for r in refused} <= {402, 429}
        for r in accepted:
            c.wait_final(r.json["task"]["id"])
        user, tasks = assert_money_consistent(e2e_db, c.id)
        assert len(tasks) == len(accepted)
        # Admission reserved credits for pending tasks, so no accepted task found the
        # balance short when a worker came to charge it.
        assert not [t for t in tasks if t.error_code == "insufficient_credits"]
        assert any(t.status == "completed" for t in tasks) and any(t.status == "cancelled" for t in tasks)


def _client(settings, engine, db):
    from falcon import testing

    from api.app import create_app
    return testing.TestClient(create_app(settings, engine=engine, session_factory=db,
                                         queue=TaskQueue(create_celery(settings))))


@pytest.fixture(params=BROKERS)
def private_broker(request, e2e_settings, e2e_engine, e2e_db):
    """Settings and an API client on a broker no other worker consumes: a Redis database of
    its own, and RabbitMQ too when TEST_RABBITMQ_URL is set (its queues purged)."""
    settings = broker_settings(e2e_settings, request.param, 3)
    return settings, _client(settings, e2e_engine, e2e_db)


@pytest.fixture(params=BROKERS)
def running(request, e2e_settings, e2e_engine, e2e_db, e2e_client, e2e_queue, tmp_path):
    """An API client and the queue it sends to, with a worker on every queue consuming it:
    the session's worker on Redis, and one started for the test on RabbitMQ when
    TEST_RABBITMQ_URL is set."""
    if request.param == "redis":
        request.getfixturevalue("e2e_worker")
        yield e2e_client, e2e_queue
        return
    settings = broker_settings(e2e_settings, "rabbitmq", 0)
    celery = create_celery(settings)
    with CeleryWorker(worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES), concurrency=4, name="amqp",
                      log_path=tmp_path / "worker.log").start(celery):
        yield _client(settings, e2e_engine, e2e_db), TaskQueue(celery)


class TestAdmissionUnderConcurrency:
    def test_twenty_simultaneous_submissions_never_promise_more_than_the_balance(self, customer, private_broker, e2e_db):
        # Nobody consumes this broker, so every accepted task stays pending and reserved.
        c = customer(plan="enterprise", credits=10, client=private_broker[1])
        codes = at_once(20, lambda i: c.submit(sleep=0, nonce=i).status_code)
        assert codes.count(201) == 10 and codes.count(402) == 10
        credits = c.client.simulate_get("/api/users/credits", headers=c.headers).json
        assert credits["reserved"] == 10 and credits["available"] == 0


class TestWorkerKilledMidTask:
    def test_sigkilled_child_redelivers_and_charges_once(self, customer, e2e_db, private_broker, tmp_path):
        settings, client = private_broker
        c = customer(client=client)
        celery = create_celery(settings)
        env = worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES)
        # Its own worker on its own queue set, concurrency 1, so we know which child runs it.
        with CeleryWorker(env, queues=("image_analysis",), concurrency=1, name="killme",
                          log_path=tmp_path / "w.log").start(celery) as worker:
            task_id = c.submit(sleep=4).json["task"]["id"]
            wait_for(lambda: c.task(task_id)["progress"] >= 10, 30, message="progress")
            (child,) = worker.children()
            os.kill(child, signal.SIGKILL)
            task = c.wait_final(task_id, timeout=60)
        assert task["status"] == "completed", task
        assert task["attempt"] == 2
        assert_money_consistent(e2e_db, c.id)
        with e2e_db() as s:
            assert s.scalar(select(func.count()).where(Transaction.task_id == uuid.UUID(task_id))) == 1


class TestGracefulShutdown:
    def test_sigterm_lets_the_running_task_finish(self, customer, e2e_db, private_broker, tmp_path):
        settings, client = private_broker
        c = customer(client=client)
        worker = CeleryWorker(worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES), queues=("image_analysis",),
                              concurrency=1, name="term", log_path=tmp_path / "w.log").start(create_celery(settings))
        task_id = c.submit(sleep=3).json["task"]["id"]
        wait_for(lambda: c.task(task_id)["progress"] >= 10, 30, message="progress")
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(60) == 0
        task = c.task(task_id)
        assert (task["status"], task["attempt"]) == ("completed", 1), task
        assert_money_consistent(e2e_db, c.id)

    def test_past_the_grace_period_the_task_goes_back_and_resumes_charged_once(self, customer, e2e_db,
                                                                               private_broker, tmp_path):
        settings, client = private_broker
        c = customer(client=client)
        celery = create_celery(settings)
        env = worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES, WORKER_SHUTDOWN_GRACE_SECONDS="1")
        first = CeleryWorker(env, queues=("image_analysis",), concurrency=1, name="grace1",
                             log_path=tmp_path / "w1.log").start(celery)
        task_id = c.submit(sleep=6).json["task"]["id"]
        wait_for(lambda: c.task(task_id)["progress"] >= 10, 30, message="progress")
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(30)  # gone after about a second, its task unfinished
        assert c.task(task_id)["status"] == "processing"
        with CeleryWorker(env, queues=("image_analysis",), concurrency=1, name="grace2",
                          log_path=tmp_path / "w2.log").start(celery):
            task = c.wait_final(task_id, timeout=60)
        assert (task["status"], task["attempt"]) == ("completed", 2), task
        assert_money_consistent(e2e_db, c.id)
        with e2e_db() as s:
            assert s.scalar(select(func.count()).where(Transaction.task_id == uuid.UUID(task_id),
                                                       Transaction.type == "credit_deduction")) == 1


class TestDuplicateDelivery:
    def test_same_message_twice_charges_once(self, customer, e2e_db, running):
        client, queue = running
        c = customer(client=client)
        task_id = c.submit(sleep=0.5).json["task"]["id"]
        queue.send("image_analysis", uuid.UUID(task_id))  # the same message again, at once
        queue.send("image_analysis", uuid.UUID(task_id))
        assert c.wait_final(task_id)["status"] == "completed"
        time.sleep(1.0)  # let the duplicates be consumed (and dropped)
        queue.send("image_analysis", uuid.UUID(task_id))  # and once more after completion
        time.sleep(0.5)
        _, tasks = assert_money_consistent(e2e_db, c.id)
        assert tasks[0].status == "completed"
        with e2e_db() as s:
            assert s.scalar(select(func.count()).where(Transaction.task_id == uuid.UUID(task_id))) == 1


class TestCancelRacingCompletion:
    def test_exactly_one_of_completed_or_refunded_wins(self, customer, e2e_db, running):
        c = customer(client=running[0])
        rng = random.Random(7)
        finals = []
        for _ in range(15):
            task_id = c.submit(sleep=rng.choice([0.0, 0.02, 0.05])).json["task"]["id"]
            time.sleep(rng.random() * 0.3)
            c.cancel(task_id)
            finals.append(c.wait_final(task_id)["status"])
        _, tasks = assert_money_consistent(e2e_db, c.id)
        assert set(finals) <= {"completed", "cancelled"}


class TestIdempotencyUnderConcurrency:
    def test_ten_simultaneous_retries_make_one_task_and_one_reservation(self, customer, e2e_client, e2e_db):
        c = customer(plan="free")
        responses = at_once(10, lambda _: c.submit(sleep=0, headers={"Idempotency-Key": "same-key"}))
        assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
        assert len({r.json["task"]["id"] for r in responses}) == 1
        credits = e2e_client.simulate_get("/api/users/credits", headers=c.headers).json
        assert credits["reserved"] in (0, 1)  # 1 while pending (no worker runs in this test)
        with e2e_db() as s:
            assert s.scalar(select(func.count()).select_from(AiTask).where(AiTask.user_id == c.id)) == 1


class TestTasksThatCannotFinish:
    def _run_with(self, processor, customer, private_broker, tmp_path, timeout=90):
        settings, client = private_broker
        c = customer(client=client)
        env = worker_env(settings, PROCESSOR_OVERRIDES=f"image_analysis=tests.support.processors:{processor}")
        with CeleryWorker(env, queues=("image_analysis",), concurrency=1, name=processor,
                          log_path=tmp_path / "w.log").start(create_celery(settings)):
            task_id = c.submit().json["task"]["id"]
            return c, c.wait_final(task_id, timeout=timeout)

    def test_a_task_that_keeps_killing_its_worker_is_given_up_and_refunded(
        self, customer, private_broker, tmp_path, e2e_db
    ):
        from models.tasks import MAX_ATTEMPTS

        c, task = self._run_with("dies", customer, private_broker, tmp_path)
        assert task["status"] == "failed" and task["errorCode"] == "worker_lost", task
        assert task["attempt"] == MAX_ATTEMPTS
        assert_money_consistent(e2e_db, c.id)

    def test_an_output_postgresql_cannot_store_fails_and_refunds(self, customer, private_broker, tmp_path, e2e_db):
        c, task = self._run_with("unstorable", customer, private_broker, tmp_path, timeout=30)
        assert task["status"] == "failed" and task["errorCode"] == "output_invalid", task
        assert_money_consistent(e2e_db, c.id)
