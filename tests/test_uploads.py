"""POST /api/uploads and GET /api/uploads/{id}: judged by content, capped, owner only."""

from __future__ import annotations

import hashlib
import io
import uuid

import pytest
from falcon import testing
from PIL import Image

from api.app import create_app
from models.errors import InvalidInput, UploadNotFound
from models.uploads import check_inputs_owned
from tests.support.builders import image_bytes, make_task_row
from tests.support.env import isolated_broker, worker_env
from tests.support.http import sign_up
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery


def multipart(fields: dict[str, tuple[str | None, bytes, str] | str]) -> tuple[bytes, str]:
    """A multipart/form-data body: a value is text, or (filename, bytes, content type) for a file."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data, content_type = value
            disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            out.write(f"Content-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n".encode())
            out.write(data)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post_file(client, headers, data: bytes, filename="photo.png", content_type="image/png", **extra_fields):
    body, ctype = multipart({**extra_fields, "file": (filename, data, content_type)})
    return client.simulate_post("/api/uploads", headers={**headers, "Content-Type": ctype}, body=body)


def post_raw(client, headers, data: bytes, content_type="image/png", filename=None):
    extra = {"X-Filename": filename} if filename else {}
    return client.simulate_post("/api/uploads", headers={**headers, "Content-Type": content_type, **extra}, body=data)


def app_with(settings, engine, session_factory, task_queue, **changes) -> testing.TestClient:
    return testing.TestClient(create_app(settings.with_(**changes), engine=engine,
                                         session_factory=session_factory, queue=task_queue))


class TestUploadRoundTrip:
    def test_multipart_upload_is_stored_and_described(self, client, user_headers, settings):
        data = image_bytes("PNG", (32, 24))
        r = post_file(client, user_headers, data, filename="holiday.png", note="ignored field")
        assert r.status_code == 201, r.json
        upload = r.json["upload"]
        assert upload["contentType"] == "image/png"
        assert (upload["size"], upload["width"], upload["height"]) == (len(data), 32, 24)
        assert upload["filename"] == "holiday.png"
        assert upload["sha256"] == hashlib.sha256(data).hexdigest()
        assert upload["createdAt"]
        me = client.simulate_get("/api/users/me", headers=user_headers).json["user"]
        stored = settings.media_root / "uploads" / me["id"] / upload["id"]
        assert stored.read_bytes() == data

        again = client.simulate_get(f"/api/uploads/{upload['id']}", headers=user_headers)
        assert again.status_code == 200
        assert again.json["upload"] == upload

    def test_raw_upload_is_typed_by_its_bytes_not_its_header(self, client, user_headers):
        data = image_bytes("JPEG", (40, 30))
        r = post_raw(client, user_headers, data, content_type="image/png", filename="../../etc/cam.jpg")
        assert r.status_code == 201, r.json
        upload = r.json["upload"]
        assert upload["contentType"] == "image/jpeg"
        assert (upload["width"], upload["height"]) == (40, 30)
        assert upload["filename"] == "cam.jpg"  # a display name only, never a path

    @pytest.mark.parametrize("fmt,mime", [("GIF", "image/gif"), ("WEBP", "image/webp"), ("BMP", "image/bmp"),
                                          ("TIFF", "image/tiff")])
    def test_other_image_formats_are_accepted(self, client, user_headers, fmt, mime):
        r = post_raw(client, user_headers, image_bytes(fmt), content_type="application/octet-stream")
        assert r.status_code == 201, r.json
        assert r.json["upload"]["contentType"] == mime

    def test_upload_needs_a_user(self, client):
        assert post_raw(client, {}, image_bytes()).status_code == 401


class TestContentChecks:
    def test_a_text_file_named_png_is_refused(self, client, user_headers):
        r = post_file(client, user_headers, b"just some text, not a picture\n" * 10, filename="x.png")
        assert r.status_code == 415
        assert r.json["code"] == "unsupported_media_type"
        assert "not a supported image" in r.json["error"]

    def test_html_sent_as_raw_image_is_refused(self, client, user_headers):
        r = post_raw(client, user_headers, b"<html><script>alert(1)</script></html>", content_type="image/png")
        assert r.status_code == 415 and r.json["code"] == "unsupported_media_type"

    def test_a_raw_body_must_claim_to_be_an_image(self, client, user_headers):
        r = post_raw(client, user_headers, image_bytes(), content_type="text/plain")
        assert r.status_code == 415 and r.json["code"] == "unsupported_media_type"

    def test_a_corrupt_image_is_refused(self, client, user_headers):
        data = image_bytes("PNG", (64, 64))
        r = post_raw(client, user_headers, data[:16] + b"\x00" * 200)
        assert r.status_code == 400 and r.json["code"] == "invalid_image", r.json

    def test_a_truncated_jpeg_is_refused(self, client, user_headers):
        buffer = io.BytesIO()
        Image.effect_noise((256, 256), 64).convert("RGB").save(buffer, "JPEG")
        r = post_raw(client, user_headers, buffer.getvalue()[:2000], content_type="image/jpeg")
        assert r.status_code == 400 and r.json["code"] == "invalid_image", r.json

    def test_an_empty_file_is_refused(self, client, user_headers):
        r = post_raw(client, user_headers, b"")
        assert r.status_code == 400 and r.json["code"] == "empty_file"

    def test_a_form_without_a_file_field_is_refused(self, client, user_headers):
        body, ctype = multipart({"other": "x"})
        r = client.simulate_post("/api/uploads", headers={**user_headers, "Content-Type": ctype}, body=body)
        assert r.status_code == 400 and r.json["code"] == "file_required"

    def test_a_malformed_form_is_a_clear_400(self, client, user_headers):
        r = client.simulate_post("/api/uploads", body=b"--abc\r\nbroken",
                                 headers={**user_headers, "Content-Type": "multipart/form-data; boundary=abc"})
        assert r.status_code == 400 and r.json["code"] == "invalid_multipart"


class TestLimits:
    def test_a_file_over_the_size_cap_is_413(self, settings, engine, session_factory, task_queue, user_headers):
        client = app_with(settings, engine, session_factory, task_queue, max_upload_bytes=2000)
        big = image_bytes("BMP", (40, 40))  # about 4.8 kB, uncompressed
        raw = post_raw(client, user_headers, big, content_type="image/bmp")
        assert raw.status_code == 413 and raw.json["code"] == "payload_too_large"
        # Multipart: the body fits the framing allowance, the file itself does not.
        form = post_file(client, user_headers, big, filename="big.bmp", content_type="image/bmp")
        assert form.status_code == 413 and form.json["code"] == "payload_too_large"
        assert "2,000" in form.json["error"]
        assert post_raw(client, user_headers, image_bytes("PNG", (8, 8))).status_code == 201

    def test_an_image_over_the_pixel_limit_is_refused(self, settings, engine, session_factory, task_queue,
                                                      user_headers):
        client = app_with(settings, engine, session_factory, task_queue, max_image_pixels=500)
        r = post_raw(client, user_headers, image_bytes("PNG", (30, 20)))
        assert r.status_code == 400 and r.json["code"] == "image_too_large"
        assert "500" in r.json["error"]
        assert post_raw(client, user_headers, image_bytes("PNG", (20, 20))).status_code == 201

    @pytest.mark.parametrize("size", [(9000, 8000), (20000, 10000)])
    def test_decompression_bombs_are_refused(self, client, user_headers, size):
        # Tiny files (a flat 1-bit image compresses to almost nothing) that would decode to
        # 72 and 200 megapixels: over our default limit, and over Pillow's own bomb limit.
        bomb = image_bytes("PNG", size, 0, mode="1")
        assert len(bomb) < 1_000_000
        r = post_raw(client, user_headers, bomb)
        assert r.status_code == 400 and r.json["code"] == "image_too_large", r.json


class TestOwnership:
    def test_another_users_upload_is_404(self, client, user_headers, make_token):
        upload_id = post_raw(client, user_headers, image_bytes()).json["upload"]["id"]
        other, _ = sign_up(client, make_token())
        r = client.simulate_get(f"/api/uploads/{upload_id}", headers=other)
        assert r.status_code == 404 and r.json["code"] == "upload_not_found"
        assert client.simulate_get("/api/uploads/not-a-uuid", headers=other).status_code == 404

    def test_check_inputs_owned(self, client, user_headers, make_token, session):
        upload_id = post_raw(client, user_headers, image_bytes()).json["upload"]["id"]
        owner = uuid.UUID(client.simulate_get("/api/users/me", headers=user_headers).json["user"]["id"])
        stranger = uuid.UUID(sign_up(client, make_token())[1]["id"])

        check_inputs_owned(session, owner, "image_analysis", upload_id)
        check_inputs_owned(session, owner, "image_analysis", {"uploadId": upload_id})
        check_inputs_owned(session, owner, "image_analysis", "https://example.com/a.png")
        check_inputs_owned(session, owner, "video_generation", [upload_id, {"url": "http://example.com/b.png"}])
        for input in (upload_id, {"uploadId": upload_id}, ["https://example.com/a.png", upload_id]):
            with pytest.raises(UploadNotFound):
                check_inputs_owned(session, stranger, "video_generation", input)
        with pytest.raises(UploadNotFound):
            check_inputs_owned(session, owner, "image_analysis", str(uuid.uuid4()))
        with pytest.raises(UploadNotFound):
            check_inputs_owned(session, owner, "image_analysis", "not-an-id")
        with pytest.raises(InvalidInput):
            check_inputs_owned(session, owner, "image_analysis", "ftp://example.com/a.png")


# --- end to end: an upload as task input, through a real worker ----------------------

ISOLATED_REDIS_DB = 9  # a broker database no other test's worker consumes


@pytest.fixture(scope="module")
def isolated_settings(e2e_settings):
    return isolated_broker(e2e_settings, ISOLATED_REDIS_DB)


@pytest.fixture(scope="module")
def real_worker(isolated_settings, tmp_path_factory):
    """The real image_analysis processor (no overrides)."""
    log = tmp_path_factory.mktemp("logs") / "uploads-worker.log"
    worker = CeleryWorker(worker_env(isolated_settings), queues=("image_analysis",), concurrency=1,
                          name="uploads", log_path=log)
    worker.start(create_celery(isolated_settings))
    yield worker
    worker.stop()


@pytest.fixture
def isolated_client(isolated_settings, e2e_engine, e2e_db):
    return testing.TestClient(create_app(isolated_settings, engine=e2e_engine, session_factory=e2e_db,
                                         queue=TaskQueue(create_celery(isolated_settings))))


@pytest.mark.e2e
class TestUploadAsTaskInput:
    def test_owner_runs_image_analysis_on_an_upload(self, isolated_client, real_worker, make_token):
        client = isolated_client
        headers, _ = sign_up(client, make_token())
        upload = post_file(client, headers, image_bytes("PNG", (48, 32))).json["upload"]
        r = client.simulate_post("/api/tasks/create", headers=headers,
                                 json={"type": "image_analysis", "input": upload["id"]})
        assert r.status_code == 201, r.json
        task_id = r.json["task"]["id"]
        task = wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"])
                        ["status"] in ("completed", "failed") and t, timeout=60, message="task final")
        assert task["status"] == "completed", task
        assert isinstance(task["output"], dict)

    def test_another_users_upload_is_refused_at_submission(self, isolated_client, make_token):
        client = isolated_client
        (owner, _), (thief, _) = sign_up(client, make_token()), sign_up(client, make_token())
        upload = post_raw(client, owner, image_bytes()).json["upload"]
        r = client.simulate_post("/api/tasks/create", headers=thief,
                                 json={"type": "image_analysis", "input": upload["id"]})
        assert r.status_code == 404 and r.json["code"] == "upload_not_found"

    def test_the_worker_refuses_another_users_upload_too_and_refunds(
        self, isolated_client, isolated_settings, real_worker, make_token, e2e_db
    ):
        """Belt and braces: a task that names someone else's upload (admitted before the
        API check existed, or re-queued by an operator) fails in the worker and refunds."""
        from models.db import session_scope

        client = isolated_client
        (owner, _), (thief, _) = sign_up(client, make_token()), sign_up(client, make_token())
        upload = post_raw(client, owner, image_bytes()).json["upload"]
        thief_id = uuid.UUID(client.simulate_get("/api/users/me", headers=thief).json["user"]["id"])
        with session_scope(e2e_db) as s:
            # submit_task refuses it now, so the row is written as older rules admitted it.
            task = make_task_row(s, thief_id, status="pending", credits=1, input=upload["id"])
        TaskQueue(create_celery(isolated_settings)).send("image_analysis", task.id)
        task_json = wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{task.id}", headers=thief).json["task"])
                             ["status"] in ("completed", "failed") and t, timeout=60, message="task final")
        assert task_json["status"] == "failed" and task_json["errorCode"] == "input_not_found", task_json
        credits = client.simulate_get("/api/users/credits", headers=thief).json
        assert credits["credits"] == 20  # charged, then refunded
