"""The output store full: the task fails with `storage_full` and is refunded, and the same
worker goes on to complete the next task once there is room. The store is a 2 MB tmpfs
mounted by the test (skipped where mounting is not allowed)."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from falcon import testing
from sqlalchemy import func, select

from api.app import create_app
from models import Transaction
from models.audit import run_checks
from models.db import session_scope
from tests.support.builders import image_bytes, make_user
from tests.support.env import isolated_broker, worker_env
from tests.support.http import bearer, upload_image
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

pytestmark = pytest.mark.e2e
ISOLATED_REDIS_DB = 6


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "media"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory, leave: int = 0) -> None:
    """Write a file that takes all the free space but `leave` bytes."""
    import os

    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(directory / "filler", "wb") as out:
        out.write(b"\0" * max(0, free - leave))


def test_a_full_store_fails_the_task_refunded_and_the_worker_goes_on(small_disk, e2e_settings, e2e_engine, e2e_db,
                                                                     make_token, tmp_path):
    settings = isolated_broker(e2e_settings, ISOLATED_REDIS_DB).with_(media_root=small_disk)
    celery = create_celery(settings)
    client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db, queue=TaskQueue(celery)))
    with session_scope(e2e_db) as s:
        user = make_user(s, plan="pro")
    headers = bearer(make_token(user.clerk_id))
    source = upload_image(client, headers, image_bytes("PNG", (400, 300), (20, 160, 90)))
    edit = {"type": "advanced_editing", "input": source,
            "params": {"operations": [{"op": "resize", "width": 380}], "format": "png"}}

    def submit_and_wait() -> dict:
        created = client.simulate_post("/api/tasks/create", headers=headers, json=edit)
        assert created.status_code == 201, created.json
        task_id = created.json["task"]["id"]
        return wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"])
                        ["status"] in ("completed", "failed", "cancelled") and t, 60, message="task final")

    with CeleryWorker(worker_env(settings), queues=("advanced_editing",), concurrency=1, name="diskfull",
                      log_path=tmp_path / "worker.log").start(celery):
        fill(small_disk)
        full = submit_and_wait()
        assert (full["status"], full["errorCode"]) == ("failed", "storage_full"), full
        assert "no space" in full["error"]
        (small_disk / "filler").unlink()
        fine = submit_and_wait()  # the same worker, room again
        assert fine["status"] == "completed", fine
        assert client.simulate_get(fine["outputUrl"], headers=headers).status_code == 200
    with e2e_db() as s:
        kinds = sorted(s.scalars(select(Transaction.type).where(Transaction.task_id == uuid.UUID(full["id"]))))
        assert kinds == ["credit_deduction", "credit_refund"]
        assert s.scalar(select(func.count()).where(Transaction.task_id == uuid.UUID(fine["id"]))) == 1
        assert list(run_checks(s)) == []
    # Nothing half-written is left in the store: only the upload and the good output.
    leftovers = [p for p in small_disk.rglob("*") if p.is_file() and ".part-" in p.name]
    assert leftovers == []
