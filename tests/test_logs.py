"""Structured logs: one JSON object per line (LOG_FORMAT=json, the default outside
development); a request's lines carry its request id and the user's clerk id, gunicorn's
included; a worker's lines carry the task id and the id of the request that submitted it."""

from __future__ import annotations

import json
import uuid

import pytest
from falcon import testing

from api.app import create_app
from tests.support.env import isolated_broker, worker_env
from tests.support.http import bearer, sign_up
from tests.support.processors import OVERRIDES
from tests.support.web import Gunicorn
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

pytestmark = pytest.mark.e2e


def json_lines(path) -> list[dict]:
    """Every log line (JSON objects; anything else is a startup banner or a traceback's print)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_api_lines_are_json_with_the_request_id_and_the_user(e2e_settings, e2e_db, make_token, tmp_path):
    log = tmp_path / "gunicorn.log"
    web = Gunicorn(worker_env(e2e_settings, LOG_FORMAT="json"), workers=1, log_path=log).start()
    try:
        token = make_token()
        status, _, _ = web.request("POST", "/api/users/initialize", body=b"{}",
                                   headers={**bearer(token), "Content-Type": "application/json",
                                            "X-Request-ID": "req-logs-1"})
        assert status == 201
        assert web.request("GET", "/api/tasks/not-a-task", headers={**bearer(token), "X-Request-ID": "req-logs-2"})[0] \
            == 404
    finally:
        web.stop()
    lines = json_lines(log)
    raw = [line for line in log.read_text().splitlines() if line.strip()]
    assert len(lines) == len(raw), [line for line in raw if not line.startswith("{")][:5]
    access = [line for line in lines if line["logger"] == "gunicorn.access" and line.get("request_id") == "req-logs-2"]
    assert access and access[0]["clerk_id"] and "GET /api/tasks/not-a-task" in access[0]["message"]
    assert any(line["logger"] == "gunicorn.error" for line in lines)  # gunicorn's own, same format


def test_worker_lines_carry_the_task_and_its_submitting_request(e2e_settings, e2e_engine, e2e_db, make_token,
                                                                tmp_path):
    settings = isolated_broker(e2e_settings, 0)  # this module's own broker database
    log = tmp_path / "worker.log"
    queue = TaskQueue(create_celery(settings))
    worker = CeleryWorker(worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES, LOG_FORMAT="json"), concurrency=1,
                          log_path=log)
    worker.start(queue.celery)
    try:
        client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db, queue=queue))
        headers, _ = sign_up(client, make_token())
        created = client.simulate_post("/api/tasks/create", headers={**headers, "X-Request-ID": "req-submit-7"},
                                       json={"type": "image_analysis", "input": "https://example.com/a.png"})
        assert created.status_code == 201
        task_id = created.json["task"]["id"]

        def task_lines():
            found = [line for line in json_lines(log) if line.get("task_id") == task_id]
            return found if any("started" in line["message"] for line in found) else None

        lines = wait_for(task_lines, 30, message="the worker's lines of the task")
        assert all(line["request_id"] == "req-submit-7" for line in lines)
        assert any(line["logger"].startswith(("celery", "worker")) for line in lines)
    finally:
        worker.stop()
    uuid.UUID(task_id)
