import uuid

import pytest

from models.uploads import add_upload
from tests.support.http import sign_up
from tests.support.workers import wait_for

pytestmark = pytest.mark.e2e


def test_task_completes_through_real_worker(e2e_client, e2e_db, e2e_worker, e2e_settings, make_token):
    headers, user = sign_up(e2e_client, make_token())
    with e2e_db() as s:
        up = add_upload(s, uuid.UUID(user["id"]), filename="a.bin", content_type="application/octet-stream",
                        size=3, sha256="0" * 64, storage_key="uploads/x")
        s.commit()
    (e2e_settings.media_root / "uploads").mkdir(exist_ok=True)
    (e2e_settings.media_root / "uploads" / "x").write_bytes(b"abc")
    r = e2e_client.simulate_post("/api/tasks/create", headers=headers,
                                 json={"type": "image_analysis", "input": str(up.id), "params": {"sleep": 0.2}})
    assert r.status_code == 201, r.json
    tid = r.json["task"]["id"]
    task = wait_for(lambda: (t := e2e_client.simulate_get(f"/api/tasks/{tid}", headers=headers).json["task"])
                    ["status"] in ("completed", "failed") and t, timeout=30)
    assert task["status"] == "completed", task
    assert task["output"] == {"bytes": 3, "steps": 20}
    credits = e2e_client.simulate_get("/api/users/credits", headers=headers).json
    assert credits["credits"] == 19
