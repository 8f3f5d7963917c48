"""The real processors through a real worker: an edit chain and a video from uploads,
outputs streamed back to their owner, and a video cancelled mid-encode refunded."""

from __future__ import annotations

import io
import uuid

import pytest
from falcon import testing
from PIL import Image

from api.app import create_app
from models import Transaction
from models.db import session_scope
from tests.support.builders import image_bytes, make_user
from tests.support.env import BROKERS, broker_settings, worker_env
from tests.support.http import bearer, sign_up, upload_image
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

pytestmark = pytest.mark.e2e
ISOLATED_REDIS_DB = 13  # a broker database no other test's worker consumes


@pytest.fixture(scope="module", params=BROKERS)
def media_settings(request, e2e_settings):
    return broker_settings(e2e_settings, request.param, ISOLATED_REDIS_DB)


@pytest.fixture(scope="module")
def media_worker(media_settings, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "media-worker.log"
    worker = CeleryWorker(worker_env(media_settings), queues=("advanced_editing", "video_generation"),
                          concurrency=2, name="media", log_path=log)
    worker.start(create_celery(media_settings))
    yield worker
    worker.stop()


@pytest.fixture
def client(media_settings, e2e_engine, e2e_db):
    return testing.TestClient(create_app(media_settings, engine=e2e_engine, session_factory=e2e_db,
                                         queue=TaskQueue(create_celery(media_settings))))


@pytest.fixture
def pro_user(make_token, e2e_db):
    """The headers of a user on the pro plan."""
    with session_scope(e2e_db) as s:
        user = make_user(s, plan="pro")
    return bearer(make_token(user.clerk_id))


def wait_final(client, headers, task_id, timeout=120):
    return wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"])
                    ["status"] in ("completed", "failed", "cancelled") and t, timeout, message="task final")


class TestRealProcessorsThroughAWorker:
    def test_edit_chain_output_is_streamed_to_its_owner_only(self, client, pro_user, media_worker, make_token):
        source = upload_image(client, pro_user, image_bytes("PNG", (320, 240), (200, 30, 30)))
        r = client.simulate_post("/api/tasks/create", headers=pro_user, json={
            "type": "advanced_editing", "input": source,
            "params": {"operations": [{"op": "resize", "width": 160}, {"op": "grayscale"}], "format": "webp"}})
        assert r.status_code == 201, r.json
        task = wait_final(client, pro_user, r.json["task"]["id"])
        assert task["status"] == "completed", task
        assert task["outputUrl"] == f"/api/tasks/{task['id']}/output" and task["outputType"] == "image/webp"
        out = client.simulate_get(task["outputUrl"], headers=pro_user)
        assert out.status_code == 200 and out.headers["Content-Type"] == "image/webp"
        assert Image.open(io.BytesIO(out.content)).size == (160, 120)
        stranger, _ = sign_up(client, make_token())
        assert client.simulate_get(task["outputUrl"], headers=stranger).status_code == 404

    def test_video_from_two_uploads_is_an_mp4(self, client, pro_user, media_worker):
        images = [upload_image(client, pro_user, image_bytes("PNG", (320, 240), color))
                  for color in ((200, 30, 30), (30, 30, 200))]
        r = client.simulate_post("/api/tasks/create", headers=pro_user, json={
            "type": "video_generation", "input": images,
            "params": {"duration": 2, "fps": 10, "width": 320, "height": 240, "transition": "crossfade"}})
        assert r.status_code == 201, r.json
        assert r.json["task"]["creditsUsed"] == 4
        task = wait_final(client, pro_user, r.json["task"]["id"])
        assert task["status"] == "completed", task
        assert task["output"]["frames"] == 20 and task["outputType"] == "video/mp4"
        out = client.simulate_get(task["outputUrl"], headers=pro_user)
        assert out.status_code == 200 and out.content[4:8] == b"ftyp"

    def test_video_cancelled_mid_encode_is_refunded_and_leaves_no_output(
        self, client, pro_user, media_worker, media_settings, e2e_db
    ):
        images = [upload_image(client, pro_user, image_bytes("PNG", (1280, 720), (10, 120, 10)))]
        before = client.simulate_get("/api/users/credits", headers=pro_user).json["credits"]
        r = client.simulate_post("/api/tasks/create", headers=pro_user, json={
            "type": "video_generation", "input": images,
            "params": {"duration": 120, "fps": 25, "width": 1280, "height": 720}})
        task_id = r.json["task"]["id"]
        wait_for(lambda: client.simulate_get(f"/api/tasks/{task_id}", headers=pro_user).json["task"]["progress"] >= 2,
                 60, message="encoding under way")
        assert client.simulate_patch(f"/api/tasks/{task_id}/cancel", headers=pro_user).status_code == 200
        task = wait_final(client, pro_user, task_id)
        assert task["status"] == "cancelled" and task["output"] is None
        assert client.simulate_get("/api/users/credits", headers=pro_user).json["credits"] == before
        with e2e_db() as s:
            kinds = sorted(t.type for t in s.query(Transaction).filter(Transaction.task_id == uuid.UUID(task_id)))
        assert kinds == ["credit_deduction", "credit_refund"]
        # The worker notices at its next check (throttled to 0.5 s), stops encoding — the
        # rest of this 120 s video would take tens of seconds — and saves nothing.
        inspect = create_celery(media_settings).control.inspect(timeout=0.5)
        wait_for(lambda: not any((inspect.active() or {}).values()), 5, interval=0.2, message="worker idle")
        out_dir = media_settings.media_root / "outputs" / task_id
        assert not out_dir.exists() or not any(out_dir.iterdir())
