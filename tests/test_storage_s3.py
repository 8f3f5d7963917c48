"""Storage: one contract for the local directory and for S3 (moto's S3 server on loopback,
which real boto3 talks to over HTTP), the backend chosen by STORAGE_URL, and a task run by
the API and a real worker that share nothing but the bucket."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig
from falcon import testing
from PIL import Image

from api.app import create_app
from models.db import session_scope
from settings import ConfigError, Settings
from storage import LocalStorage, S3Storage, storage_from_settings
from tests.support.builders import image_bytes, make_user
from tests.support.env import isolated_broker, worker_env
from tests.support.http import bearer, upload_image
from tests.support.s3 import moto_s3
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

MB = 1024 * 1024
# Every number 0-15 is some module's; this one's other user (test_logs) holds it only inside
# one test, and no two modules' workers run at once.
ISOLATED_REDIS_DB = 0


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    s3 = request.getfixturevalue("s3")
    return S3Storage(s3.new_bucket(), "media", endpoint_url=s3.endpoint_url)


def small_parts(store) -> None:
    """Multipart uploads from 5 MB (S3's smallest part), so a test file of a few MB takes
    several requests to store."""
    if isinstance(store, S3Storage):
        store.transfer = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_concurrency=2)


class FailingStream(io.RawIOBase):
    """Gives `good` bytes, then fails as a dropped client connection would."""

    def __init__(self, good: int):
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            raise ConnectionResetError("the client went away")
        n = min(len(buffer), self.left, 64 * 1024)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


class TestStorageContract:
    def test_saved_bytes_read_back_with_their_size(self, store):
        assert store.save("uploads/u1/a", b"hello") == 5
        assert store.exists("uploads/u1/a") and store.size("uploads/u1/a") == 5
        with store.open("uploads/u1/a") as f:
            assert f.read() == b"hello"

    def test_a_stream_is_saved_whole(self, store):
        data = os.urandom(300_000)
        assert store.save("outputs/t1/out.bin", io.BytesIO(data)) == len(data)
        with store.open("outputs/t1/out.bin") as f:
            assert f.read() == data

    def test_save_file_copies_a_local_file_and_leaves_it(self, store, tmp_path):
        source = tmp_path / "src.png"
        source.write_bytes(image_bytes("PNG"))
        assert store.save_file("outputs/t1/result.png", source) == source.stat().st_size
        assert source.exists()
        with store.open("outputs/t1/result.png") as f:
            assert f.read() == source.read_bytes()

    def test_local_file_is_a_readable_copy_in_the_place_given(self, store, tmp_path):
        store.save("uploads/u1/b", b"input bytes")
        path = store.local_file("uploads/u1/b", tmp_path / "work" / "input-0")
        assert path.read_bytes() == b"input bytes"
        if isinstance(store, S3Storage):
            assert path == tmp_path / "work" / "input-0"

    def test_saving_again_replaces_the_file(self, store):
        store.save("outputs/t1/x", b"first version, longer")
        store.save("outputs/t1/x", b"second")
        assert store.size("outputs/t1/x") == 6
        with store.open("outputs/t1/x") as f:
            assert f.read() == b"second"

    def test_a_missing_key_is_file_not_found_and_deleting_it_is_harmless(self, store, tmp_path):
        assert not store.exists("uploads/u1/none")
        for read in (store.open, store.size, lambda key: store.local_file(key, tmp_path / "dest")):
            with pytest.raises(FileNotFoundError):
                read("uploads/u1/none")
        store.delete("uploads/u1/none")

    def test_delete_removes_the_file_and_twice_is_harmless(self, store):
        store.save("outputs/t2/a", b"a")
        store.save("outputs/t2/b", b"b")
        store.delete("outputs/t2/a")
        store.delete("outputs/t2/a")
        assert not store.exists("outputs/t2/a") and store.exists("outputs/t2/b")

    def test_keys_are_separate_names(self, store):
        store.save("outputs/t3/a", b"1")
        store.save("outputs/t3/ab", b"2")
        store.save("outputs/t3a", b"3")
        assert [store.size(k) for k in ("outputs/t3/a", "outputs/t3/ab", "outputs/t3a")] == [1, 1, 1]
        store.delete("outputs/t3/a")
        assert store.exists("outputs/t3/ab") and store.exists("outputs/t3a")

    @pytest.mark.parametrize("key", ["", "../escape", "uploads/../../etc/passwd", "/absolute", "a//b", "a/./b",
                                     "a/", "a\\b"])
    def test_keys_that_could_leave_the_root_are_refused(self, store, key):
        for use in (lambda: store.save(key, b"x"), lambda: store.open(key), lambda: store.exists(key),
                    lambda: store.delete(key)):
            with pytest.raises(ValueError):
                use()

    def test_a_reader_sees_the_old_file_or_the_new_one_never_a_part(self, store, tmp_path):
        key = "outputs/t4/big.bin"
        old, new = b"old" * 1000, os.urandom(12 * MB)
        store.save(key, old)
        small_parts(store)
        source = tmp_path / "new.bin"
        source.write_bytes(new)
        digests = {hashlib.sha256(old).hexdigest(): "old", hashlib.sha256(new).hexdigest(): "new"}
        seen: list[str] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                with store.open(key) as f:
                    seen.append(digests.get(hashlib.sha256(f.read()).hexdigest(), "partial"))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            store.save_file(key, source)
        finally:
            done.set()
            reader.join()
        assert seen and "partial" not in seen
        with store.open(key) as f:
            assert f.read() == new
        if isinstance(store, S3Storage):  # it really went up in parts (an ETag of "<md5>-<parts>")
            etag = store.client.head_object(Bucket=store.bucket, Key=store.object_key(key))["ETag"]
            assert etag.strip('"').endswith("-3")

    def test_a_save_that_fails_midway_leaves_the_key_as_it_was(self, store, tmp_path):
        key = "uploads/u5/file"
        store.save(key, b"the original")
        small_parts(store)
        with pytest.raises(Exception):
            store.save(key, io.BufferedReader(FailingStream(6 * MB)))  # one whole part, then the failure
        with store.open(key) as f:
            assert f.read() == b"the original"
        with pytest.raises(Exception):
            store.save("uploads/u5/new", io.BufferedReader(FailingStream(100)))
        assert not store.exists("uploads/u5/new")
        if isinstance(store, S3Storage):  # the multipart upload was aborted, not left to bill
            assert not store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")
        else:
            assert sorted(p.name for p in (store.root / "uploads" / "u5").iterdir()) == ["file"]


class TestS3Keys:
    def test_objects_live_under_the_prefix_and_prefixes_do_not_meet(self, s3):
        bucket = s3.new_bucket()
        first = S3Storage(bucket, "one", endpoint_url=s3.endpoint_url)
        second = S3Storage(bucket, "/two/", endpoint_url=s3.endpoint_url)
        first.save("uploads/u/x", b"1")
        second.save("uploads/u/x", b"22")
        assert s3.keys(bucket) == ["one/uploads/u/x", "two/uploads/u/x"]
        assert first.size("uploads/u/x") == 1 and second.size("uploads/u/x") == 2
        S3Storage(bucket, endpoint_url=s3.endpoint_url).save("outputs/t/y", b"3")
        assert "outputs/t/y" in s3.keys(bucket)


class TestStorageFromSettings:
    def test_unset_is_the_local_media_root(self, tmp_path):
        store = storage_from_settings(Settings(media_root=tmp_path / "media"))
        assert isinstance(store, LocalStorage) and store.root == (tmp_path / "media").resolve()

    @pytest.mark.parametrize("form", ["file://{}", "{}"])
    def test_a_file_url_or_a_path_is_that_directory(self, tmp_path, form):
        store = storage_from_settings(Settings(storage_url=form.format(tmp_path / "elsewhere"),
                                               media_root=tmp_path / "media"))
        assert isinstance(store, LocalStorage) and store.root == (tmp_path / "elsewhere").resolve()

    def test_s3_url_is_the_bucket_and_prefix_at_the_endpoint(self, s3):
        bucket = s3.new_bucket()
        store = storage_from_settings(Settings(storage_url=f"s3://{bucket}/media/prod",
                                               s3_endpoint_url=s3.endpoint_url))
        assert isinstance(store, S3Storage) and (store.bucket, store.prefix) == (bucket, "media/prod")
        store.save("uploads/u/z", b"z")  # the environment's credentials, the configured endpoint
        assert s3.keys(bucket) == ["media/prod/uploads/u/z"]

    @pytest.mark.parametrize("url", ["ftp://host/x", "s3://", "s3:///prefix", "s3://bucket/../x",
                                     "file://host/dir", "s3://bucket?x=1"])
    def test_an_unusable_storage_url_is_refused_naming_it(self, url):
        with pytest.raises(ConfigError, match="STORAGE_URL"):
            Settings.from_env({"APP_ENV": "test", "DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x",
                               "STORAGE_URL": url})

    def test_storage_variables_are_read(self):
        settings = Settings.from_env({"APP_ENV": "test", "DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x",
                                      "STORAGE_URL": "s3://bucket/p", "S3_ENDPOINT_URL": "http://minio:9000"})
        assert (settings.storage_url, settings.s3_endpoint_url) == ("s3://bucket/p", "http://minio:9000")


# --- end to end: the API and a worker sharing only a bucket ---------------------------------

@pytest.fixture(scope="module")
def s3_settings(s3, e2e_settings, tmp_path_factory):
    """The API's settings: STORAGE_URL at a fresh bucket on moto, and a MEDIA_ROOT nothing
    may write to."""
    bucket = s3.new_bucket()
    settings = isolated_broker(e2e_settings, ISOLATED_REDIS_DB).with_(
        storage_url=f"s3://{bucket}/media", s3_endpoint_url=s3.endpoint_url,
        media_root=tmp_path_factory.mktemp("unused-media-root"))
    return bucket, settings


@pytest.fixture(scope="module")
def s3_worker(s3, s3_settings, tmp_path_factory):
    bucket, settings = s3_settings
    log = tmp_path_factory.mktemp("logs") / "s3-worker.log"
    worker = CeleryWorker(worker_env(settings, **s3.env(bucket, "media")), queues=("advanced_editing",),
                          concurrency=1, name="s3", log_path=log)
    worker.start(create_celery(settings))
    yield worker
    worker.stop()


@pytest.mark.e2e
class TestTaskThroughS3:
    def test_upload_edit_and_download_with_nothing_on_the_local_disk(self, s3, s3_settings, s3_worker, e2e_engine,
                                                                     e2e_db, make_token):
        bucket, settings = s3_settings
        # No storage passed: the app builds it from the settings, as gunicorn's would.
        client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db,
                                               queue=TaskQueue(create_celery(settings))))
        with session_scope(e2e_db) as s:
            user = make_user(s, plan="pro")
        headers = bearer(make_token(user.clerk_id))
        upload_id = upload_image(client, headers, image_bytes("PNG", (320, 240), (200, 30, 30)))
        r = client.simulate_post("/api/tasks/create", headers=headers, json={
            "type": "advanced_editing", "input": upload_id,
            "params": {"operations": [{"op": "resize", "width": 160}, {"op": "grayscale"}], "format": "png"}})
        assert r.status_code == 201, r.json
        task_id = r.json["task"]["id"]
        task = wait_for(lambda: (t := client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"])
                        ["status"] in ("completed", "failed", "cancelled") and t, 60, message="task final")
        assert task["status"] == "completed", task

        out = client.simulate_get(task["outputUrl"], headers=headers)
        assert out.status_code == 200 and out.headers["Content-Type"] == "image/png"
        assert int(out.headers["Content-Length"]) == len(out.content) == task["outputSize"]
        image = Image.open(io.BytesIO(out.content))
        assert image.size == (160, 120) and image.mode in ("L", "LA")

        output_key = task["output"]["file"]["key"]
        assert s3.keys(bucket) == sorted([f"media/uploads/{user.id}/{upload_id}", f"media/{output_key}"])
        assert list(Path(settings.media_root).rglob("*")) == []
        # The worker's downloaded input went with the task's scratch directory.
        assert not any(Path(p).name.startswith(f"studiox-task-{task_id}") for p in os.listdir(tempfile.gettempdir()))

    def test_an_output_missing_from_the_bucket_is_not_ready_not_a_500(self, s3, s3_settings, e2e_engine, e2e_db,
                                                                      make_token):
        from models.tasks import complete_task
        from tests.support.builders import make_charged_task

        bucket, settings = s3_settings
        client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db,
                                               queue=TaskQueue(create_celery(settings))))
        with session_scope(e2e_db) as s:
            user = make_user(s)
            task = make_charged_task(s, user)
            complete_task(s, task.id, {"file": {"key": f"outputs/{task.id}/gone.png", "contentType": "image/png"}})
        r = client.simulate_get(f"/api/tasks/{task.id}/output", headers=bearer(make_token(user.clerk_id)))
        assert r.status_code == 404 and r.json["code"] == "output_not_ready"

