import uuid

import pytest
from falcon import testing

from api.app import create_app
from models.uploads import add_upload
from tests.support.env import BROKERS, broker_settings, worker_env
from tests.support.http import sign_up
from tests.support.processors import OVERRIDES
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

pytestmark = pytest.mark.e2e


@pytest.fixture(params=BROKERS)
def client(request, e2e_settings, e2e_engine, e2e_db, e2e_client, tmp_path):
    """The API with a worker behind it: the session's on Redis, its own on RabbitMQ."""
    if request.param == "redis":
        request.getfixturevalue("e2e_worker")
        yield e2e_client
        return
    settings = broker_settings(e2e_settings, "rabbitmq", 0)
    celery = create_celery(settings)
    with CeleryWorker(worker_env(settings, PROCESSOR_OVERRIDES=OVERRIDES), concurrency=2, name="smoke",
                      log_path=tmp_path / "worker.log").start(celery):
        yield testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db,
                                            queue=TaskQueue(celery)))


def test_task_completes_through_real_worker(client, e2e_db, e2e_settings, make_token):
    headers, user = sign_up(client, make_token())
    with e2e_db() as s:
        up = add_upload(s, uuid.UUID(user["id"]), filename="a.bin", content_type="application/octet-stream",
                        size=3, sha256="0" * 64, storage_key="uploads/x")
        s.commit()
    (e2e_settings.media_root / "uploads").mkdir(exist_ok=True)
    (e2e_settings.media_root / "uploads" / "x").write_bytes(b"abc")
    r = client.simulate_post("/api/tasks/create", headers=headers,
                             json={"type": "image_analysis", "input": str(up.id), "params": {"sleep": 0.2}})
    assert r.status_code == 201, r.json
    tid = r.json["task"]["id"]
    task = wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{tid}", headers=headers).json["task"])
                    ["status"] in ("completed", "failed") and t, timeout=30)
    assert task["status"] == "completed", task
    assert task["output"] == {"bytes": 3, "steps": 20}
    credits = client.simulate_get("/api/users/credits", headers=headers).json
    assert credits["credits"] == 19
