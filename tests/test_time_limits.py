"""Per-type time limits from configuration, and the retry/refund paths, through a real worker."""

from __future__ import annotations

import uuid

import pytest
from falcon import testing
from sqlalchemy import select

from api.app import create_app
from settings import ConfigError, TimeLimit, default_time_limits, time_limits_from_env
from models import Transaction
from tests.support.builders import image_bytes
from tests.support.env import isolated_broker, worker_env
from tests.support.http import sign_up, upload_image
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery


class TestTimeLimitConfiguration:
    def test_defaults_without_configuration(self):
        assert time_limits_from_env({}) == default_time_limits()
        assert default_time_limits()["video_generation"] == TimeLimit(900, 960)

    def test_one_type_is_overridden_by_its_variable(self):
        limits = time_limits_from_env({"TIME_LIMIT_VIDEO_GENERATION": "1800, 1860"})
        assert limits["video_generation"] == TimeLimit(1800, 1860)
        assert limits["image_analysis"] == default_time_limits()["image_analysis"]

    def test_settings_carry_them_and_the_celery_app_applies_them(self):
        from settings import Settings
        from worker.queue import create_celery

        settings = Settings.from_env({"APP_ENV": "test", "DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x",
                                      "TIME_LIMIT_IMAGE_ANALYSIS": "7,9"}, dotenv=False)
        assert settings.time_limits["image_analysis"] == TimeLimit(7, 9)
        conf = create_celery(settings).conf
        assert conf.task_annotations["tasks.image_analysis"] == {"soft_time_limit": 7, "time_limit": 9}
        assert conf.broker_transport_options["visibility_timeout"] == 2 * 960 + 600

    @pytest.mark.parametrize("raw", ["60", "a,b", "10,5", "0,5", "5,5", "1,2,3"])
    def test_nonsense_is_refused_with_the_variable_named(self, raw):
        with pytest.raises(ConfigError, match="TIME_LIMIT_IMAGE_ANALYSIS"):
            time_limits_from_env({"TIME_LIMIT_IMAGE_ANALYSIS": raw})


# --- end to end ----------------------------------------------------------------------

ISOLATED_REDIS_DB = 11  # a broker database no other test's worker consumes


@pytest.fixture(scope="module")
def isolated_settings(e2e_settings):
    return isolated_broker(e2e_settings, ISOLATED_REDIS_DB)


@pytest.fixture(scope="module")
def limited_worker(isolated_settings, tmp_path_factory):
    """image_analysis runs the sleepy stand-in with a 1 s soft / 3 s hard limit."""
    env = worker_env(isolated_settings, PROCESSOR_OVERRIDES="image_analysis=tests.support.processors:sleepy",
                     TIME_LIMIT_IMAGE_ANALYSIS="1,3")
    worker = CeleryWorker(env, queues=("image_analysis",), concurrency=1, name="limits",
                          log_path=tmp_path_factory.mktemp("logs") / "limits-worker.log")
    worker.start(create_celery(isolated_settings))
    yield worker
    worker.stop()


@pytest.fixture
def customer(isolated_settings, e2e_engine, e2e_db, make_token):
    client = testing.TestClient(create_app(isolated_settings, engine=e2e_engine, session_factory=e2e_db,
                                           queue=TaskQueue(create_celery(isolated_settings))))
    headers, _ = sign_up(client, make_token())
    return client, headers, upload_image(client, headers, image_bytes("PNG"))


def run_task(customer, params: dict, timeout: float = 60) -> dict:
    client, headers, upload_id = customer
    r = client.simulate_post("/api/tasks/create", headers=headers,
                             json={"type": "image_analysis", "input": upload_id, "params": params})
    assert r.status_code == 201, r.json
    task_id = r.json["task"]["id"]
    return wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"])
                    ["status"] in ("completed", "failed") and t, timeout=timeout, message="task final")


def assert_charge_refunded(customer, e2e_db, task: dict) -> None:
    client, headers, _ = customer
    with e2e_db() as s:
        entries = sorted((t.type, t.amount) for t in s.scalars(
            select(Transaction).where(Transaction.task_id == uuid.UUID(task["id"]))))
    assert entries == [("credit_deduction", -task["creditsUsed"]), ("credit_refund", task["creditsUsed"])]
    credits = client.simulate_get("/api/users/credits", headers=headers).json
    assert credits["credits"] == 20  # back where the free plan's grant started
    ledger = client.simulate_get("/api/users/transactions", headers=headers).json["transactions"]
    assert sum(entry["amount"] for entry in ledger) == credits["credits"]


@pytest.mark.e2e
class TestLimitsAndRetriesThroughAWorker:
    def test_a_task_over_its_soft_limit_fails_and_is_refunded(self, limited_worker, customer, e2e_db):
        task = run_task(customer, {"sleep": 5})
        assert task["status"] == "failed", task
        assert task["errorCode"] == "time_limit_exceeded"
        assert task["progress"] < 100
        assert_charge_refunded(customer, e2e_db, task)

    def test_a_task_within_its_limit_completes(self, limited_worker, customer):
        task = run_task(customer, {"sleep": 0.2})
        assert task["status"] == "completed", task

    def test_a_transient_error_is_retried_then_fails_with_a_refund(self, limited_worker, customer, e2e_db):
        task = run_task(customer, {"fail": "transient"}, timeout=90)
        assert task["status"] == "failed", task
        assert task["errorCode"] == "fetch_failed"
        assert task["attempt"] > 1  # retried with backoff before giving up
        assert_charge_refunded(customer, e2e_db, task)

    def test_a_permanent_error_fails_at_once_with_a_readable_message(self, limited_worker, customer, e2e_db):
        task = run_task(customer, {"fail": "permanent"})
        assert task["status"] == "failed", task
        assert task["attempt"] == 1
        assert (task["errorCode"], task["error"]) == ("bad_input_for_test", "This input can never work")
        assert_charge_refunded(customer, e2e_db, task)
