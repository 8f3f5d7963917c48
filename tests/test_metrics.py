"""Prometheus metrics: the API's (behind METRICS_TOKEN, right under several gunicorn
workers) and a worker's (its children's, and the queues' depth, on its own address)."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from falcon import testing
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from devenv.embedded import free_port
from tests.support.env import isolated_broker, worker_env
from tests.support.http import bearer, sign_up
from tests.support.web import Gunicorn
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import create_celery

TOKEN = "metrics-token-" + "m" * 20


def samples(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


class TestApiMetrics:
    @pytest.fixture
    def client(self, settings, engine, session_factory, task_queue):
        return testing.TestClient(create_app(settings.with_(metrics_token=TOKEN), engine=engine,
                                             session_factory=session_factory, queue=task_queue))

    def test_not_readable_without_the_token(self, client, settings, engine, session_factory, task_queue):
        assert client.simulate_get("/metrics").status_code == 401
        wrong = client.simulate_get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json["code"] == "metrics_unauthorized"
        unset = testing.TestClient(create_app(settings, engine=engine, session_factory=session_factory,
                                              queue=task_queue))
        assert unset.simulate_get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401

    @pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")  # the invented method below
    def test_requests_by_route_template_tasks_by_type_and_refusals_by_code(self, client, make_token):
        def scrape() -> str:
            answer = client.simulate_get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
            return answer.text

        before = scrape()
        headers, _ = sign_up(client, make_token())
        task_id = "00000000-0000-0000-0000-000000000000"
        client.simulate_get(f"/api/tasks/{task_id}", headers=headers)
        created = client.simulate_post("/api/tasks/create", headers=headers,
                                       json={"type": "image_analysis", "input": "https://example.com/a.png"})
        assert created.status_code == 201
        refused = client.simulate_post("/api/tasks/create", headers=headers,
                                       json={"type": "video_generation", "input": ["https://example.com/a.png"]})
        assert refused.status_code == 403
        after = scrape()
        route = {"route": "/api/tasks/{task_id}", "method": "GET", "status": "404"}
        assert samples(after, "studiox_http_requests_total", **route) - samples(
            before, "studiox_http_requests_total", **route) == 1  # the template, not the id
        assert samples(after, "studiox_http_request_duration_seconds_count", route="/api/tasks/create",
                       method="POST") - samples(before, "studiox_http_request_duration_seconds_count",
                                                route="/api/tasks/create", method="POST") == 2
        assert samples(after, "studiox_tasks_created_total", type="image_analysis") - samples(
            before, "studiox_tasks_created_total", type="image_analysis") == 1
        assert samples(after, "studiox_refusals_total", status="403", code="plan_does_not_allow") - samples(
            before, "studiox_refusals_total", status="403", code="plan_does_not_allow") == 1
        # A method a client makes up is counted as "other": no new series per invention.
        client.simulate_request("BREW", "/nope")
        assert "BREW" not in scrape()


def test_counts_are_right_under_several_gunicorn_workers(settings, tmp_path):
    web = Gunicorn(worker_env(settings, METRICS_TOKEN=TOKEN), workers=3, log_path=tmp_path / "gunicorn.log").start()
    try:
        for _ in range(60):
            assert web.request("GET", "/api/billing/plans")[0] == 200
        scrapes = []
        for _ in range(6):  # whichever worker answers, it reports every worker's counts
            status, _, body = web.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            assert status == 200
            scrapes.append(samples(body.decode(), "studiox_http_requests_total", route="/api/billing/plans",
                                   method="GET", status="200"))
        assert scrapes == [60.0] * 6
    finally:
        web.stop()


def test_a_worker_serves_its_childrens_metrics_and_the_queue_depths(settings, tmp_path):
    isolated = isolated_broker(settings, 4)
    port = free_port()
    celery = create_celery(isolated)
    worker = CeleryWorker(worker_env(isolated, WORKER_METRICS_PORT=str(port)), concurrency=2,
                          queues=("maintenance", "image_analysis"), log_path=tmp_path / "worker.log")
    worker.start(celery)
    try:
        celery.send_task("maintenance.reset_monthly_credits")
        celery.send_task("tasks.image_analysis", args=["not-a-task-id"])

        def scraped() -> str | None:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            done = samples(text, "studiox_job_runs_total", job="reset", result="ok") >= 1 and samples(
                text, "studiox_task_outcomes_total", type="image_analysis", outcome="dropped") >= 1
            return text if done else None

        text = wait_for(scraped, 30, message="the worker's metrics")
        assert re.search(r'studiox_queue_depth\{queue="video_generation"\} 0', text)
        assert samples(text, "studiox_task_duration_seconds_count", type="image_analysis") >= 1
    finally:
        worker.stop()
