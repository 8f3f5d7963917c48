"""GET /api/tasks/{id}/output: the output file, to its owner only, once the task completed.

Tasks are driven through the real lifecycle operations (submit, start = charge, complete)
and their files written through the storage interface, as a processor does.
"""

from __future__ import annotations

import uuid

import pytest

from models import User
from models.tasks import complete_task
from storage import LocalStorage
from tests.support.builders import image_bytes, make_charged_task, make_task
from tests.support.http import sign_up


@pytest.fixture
def owner(client, user_headers, session):
    user_id = uuid.UUID(client.simulate_get("/api/users/me", headers=user_headers).json["user"]["id"])
    return session.get(User, user_id), user_headers


@pytest.fixture
def output_task(session, settings):
    """A task of the user's in `status`; a completed one with `output`, naming `file` (its
    key formatted with the task id) whose `data` is saved through storage."""
    storage = LocalStorage(settings.media_root)

    def make(user: User, *, status="completed", file: dict | None = None, data: bytes | None = None,
             output: dict | None = None):
        task = make_task(session, user) if status == "pending" else make_charged_task(session, user)
        if status == "completed":
            if file is not None:
                file = {key: value.format(task=task.id) if isinstance(value, str) else value
                        for key, value in file.items()}
                if data is not None:
                    file.setdefault("size", storage.save(file["key"], data))
            complete_task(session, task.id, {**(output or {"analysis": {}}), **({"file": file} if file else {})})
        session.commit()
        return str(task.id)

    return make


class TestOutputDownload:
    def test_owner_gets_the_file_with_its_type_length_and_name(self, client, owner, output_task):
        user, headers = owner
        data = image_bytes("PNG")
        task_id = output_task(user, file={"key": "outputs/{task}/result.png", "contentType": "image/png",
                                        "name": "result.png"}, data=data)
        r = client.simulate_get(f"/api/tasks/{task_id}/output", headers=headers)
        assert r.status_code == 200
        assert r.content == data
        assert r.headers["Content-Type"] == "image/png"
        assert r.headers["Content-Length"] == str(len(data))
        assert r.headers["Content-Disposition"] == 'attachment; filename="result.png"'
        assert r.headers["X-Content-Type-Options"] == "nosniff"

        task = client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"]
        assert task["outputUrl"] == f"/api/tasks/{task_id}/output"
        assert task["outputSize"] == len(data)
        assert task["outputType"] == "image/png"

    def test_type_is_inferred_when_the_processor_did_not_declare_it(self, client, owner, output_task):
        user, headers = owner
        by_name = output_task(user, file={"key": "outputs/{task}/clip.mp4"}, data=b"\x00\x00\x00\x18ftypmp42rest")
        r = client.simulate_get(f"/api/tasks/{by_name}/output", headers=headers)
        assert r.status_code == 200 and r.headers["Content-Type"] == "video/mp4"
        by_bytes = output_task(user, file={"key": "outputs/{task}/blob"}, data=image_bytes("PNG"))
        r = client.simulate_get(f"/api/tasks/{by_bytes}/output", headers=headers)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
        assert 'filename="blob"' in r.headers["Content-Disposition"]

    def test_non_ascii_file_names_are_encoded(self, client, owner, output_task):
        user, headers = owner
        task_id = output_task(user, file={"key": "outputs/{task}/out.png", "name": "café ☕.png"}, data=image_bytes("PNG"))
        r = client.simulate_get(f"/api/tasks/{task_id}/output", headers=headers)
        assert r.status_code == 200
        assert "filename*=UTF-8''caf%C3%A9%20%E2%98%95.png" in r.headers["Content-Disposition"]


class TestOutputAccess:
    def test_another_users_task_output_is_404(self, client, owner, output_task, make_token):
        user, _ = owner
        task_id = output_task(user, file={"key": "outputs/{task}/result.png"}, data=image_bytes("PNG"))
        stranger, _ = sign_up(client, make_token())
        r = client.simulate_get(f"/api/tasks/{task_id}/output", headers=stranger)
        assert r.status_code == 404 and r.json["code"] == "task_not_found"
        assert client.simulate_get("/api/tasks/nonsense/output", headers=stranger).json["code"] == "task_not_found"

    def test_output_needs_a_user(self, client, owner, output_task):
        user, _ = owner
        task_id = output_task(user, file={"key": "outputs/{task}/result.png"}, data=image_bytes("PNG"))
        assert client.simulate_get(f"/api/tasks/{task_id}/output").status_code == 401

    @pytest.mark.parametrize("status", ["pending", "processing"])
    def test_unfinished_task_has_no_output_yet(self, client, owner, output_task, status):
        user, headers = owner
        task_id = output_task(user, status=status)
        r = client.simulate_get(f"/api/tasks/{task_id}/output", headers=headers)
        assert r.status_code == 404 and r.json["code"] == "output_not_ready"
        assert client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"]["outputUrl"] is None

    def test_completed_task_without_a_file_has_no_output(self, client, owner, output_task):
        user, headers = owner
        task_id = output_task(user, output={"analysis": {"width": 1}})
        r = client.simulate_get(f"/api/tasks/{task_id}/output", headers=headers)
        assert r.status_code == 404 and r.json["code"] == "output_not_ready"
        task = client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"]
        assert (task["outputUrl"], task["outputSize"], task["outputType"]) == (None, None, None)

    def test_a_file_outside_the_tasks_own_prefix_is_never_served(self, client, owner, output_task, settings):
        # An output naming someone's upload (a processor bug) must not become a way to read it.
        user, headers = owner
        LocalStorage(settings.media_root).save("uploads/someone/secret", b"private bytes")
        task_id = output_task(user, file={"key": "uploads/someone/secret"})
        r = client.simulate_get(f"/api/tasks/{task_id}/output", headers=headers)
        assert r.status_code == 404 and r.json["code"] == "output_not_ready"

    def test_a_missing_file_is_not_ready_not_a_500(self, client, owner, output_task):
        user, headers = owner
        task_id = output_task(user, file={"key": "outputs/{task}/gone.png"})
        r = client.simulate_get(f"/api/tasks/{task_id}/output", headers=headers)
        assert r.status_code == 404 and r.json["code"] == "output_not_ready"
