"""Flower, as the Procfile starts it: its login guards /metrics and /healthcheck too."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from devenv.embedded import free_port
from tests.support.env import worker_env

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flower(e2e_settings, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "flower.log"
    env = worker_env(e2e_settings, FLOWER_BASIC_AUTH="ops:s3cret")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker.flower", "--address=127.0.0.1", f"--port={port}"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower exited; log: {log}")
        try:
            urllib.request.urlopen(base + "/healthcheck", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 without a login)
        except OSError:
            time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(10)


def _get(url: str, login: str | None = None) -> int:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("path", ["/metrics", "/healthcheck", "/api/workers"])
def test_every_page_needs_the_login(flower, path):
    assert _get(flower + path) == 401
    assert _get(flower + path, "ops:wrong") == 401
    assert _get(flower + path, "ops:s3cret") == 200


def _get_json(url: str, login: str):
    import json

    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.e2e
def test_a_finished_task_is_read_back_through_flowers_api(flower, e2e_worker, e2e_client, make_token):
    from tests.support.http import sign_up
    from tests.support.workers import wait_for

    headers, _ = sign_up(e2e_client, make_token())
    created = e2e_client.simulate_post("/api/tasks/create", headers=headers,
                                       json={"type": "image_analysis", "input": "https://example.com/a.png"})
    task_id = created.json["task"]["id"]

    def finished():
        tasks = _get_json(flower + "/api/tasks?limit=1000", "ops:s3cret")
        return next((celery_id for celery_id, task in tasks.items()
                     if task_id in str(task.get("args")) and task.get("state") == "SUCCESS"), None)

    celery_id = wait_for(finished, 30, message="Flower to see the task finish")
    info = _get_json(f"{flower}/api/task/info/{celery_id}", "ops:s3cret")
    assert info["name"] == "tasks.image_analysis" and info["state"] == "SUCCESS" and info["worker"]
    assert _get(f"{flower}/api/task/info/{celery_id}") == 401  # not without the password
    queues = _get_json(flower + "/api/workers?refresh=1", "ops:s3cret")
    assert any("image_analysis" in str(worker.get("active_queues")) for worker in queues.values())
