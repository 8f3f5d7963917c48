"""Retention (RETENTION_DAYS): old output files and uploads are deleted from storage, the
task keeps a note (GET .../output is then 410 output_expired), the ledger is never touched,
an upload a task in flight reads is kept, and running the job twice or at once is harmless.

The job's function runs on the committed e2e database with a storage of the test's own; the
last test sends the beat job to a real worker that stores on S3 (moto on loopback)."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta

import pytest
from falcon import testing
from sqlalchemy import select, update

from api.app import create_app
from models import AiTask, Transaction, Upload, User, utcnow
from models.db import session_scope
from models.tasks import complete_task, fail_task
from models.uploads import add_upload
from settings import ConfigError, Settings
from storage import LocalStorage, S3Storage
from tests.support.builders import image_bytes, make_charged_task, make_task, make_task_row, make_user
from tests.support.concurrency import at_once
from tests.support.env import isolated_broker, worker_env
from tests.support.http import bearer
from tests.support.s3 import moto_s3
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery
from worker.retention import expire_stored_files

KEEP = timedelta(days=30)
OLD = timedelta(days=40)
# Every number 0-15 is some module's; this one's other users hold it only while their own
# module (or test) runs, and no two modules' workers run at once.
ISOLATED_REDIS_DB = 0


class RecordingStorage(LocalStorage):
    """A local directory that remembers every delete, and can fail from the n-th one on."""

    def __init__(self, root, fail_from: int | None = None):
        super().__init__(root)
        self.deleted: list[str] = []
        self.fail_from = fail_from

    def delete(self, key: str) -> None:
        if self.fail_from is not None and len(self.deleted) + 1 >= self.fail_from:
            raise ConnectionError("the store went away")
        super().delete(key)
        self.deleted.append(key)


@pytest.fixture
def store(tmp_path):
    return RecordingStorage(tmp_path / "store")


@pytest.fixture
def client(e2e_settings, e2e_engine, e2e_db, e2e_queue, store):
    return testing.TestClient(create_app(e2e_settings, engine=e2e_engine, session_factory=e2e_db, queue=e2e_queue,
                                         storage=store))


@pytest.fixture
def user(e2e_db):
    with session_scope(e2e_db) as s:
        return make_user(s, plan="pro")


def run(e2e_db, store, **options) -> dict[str, int]:
    return expire_stored_files(e2e_db, store, KEEP, **options)


def save_upload(s, store, user: User, *, age: timedelta = OLD) -> uuid.UUID:
    upload_id = uuid.uuid4()
    key = f"uploads/{user.id}/{upload_id}"
    data = image_bytes("PNG")
    store.save(key, data)
    upload = add_upload(s, user.id, id=upload_id, content_type="image/png", size=len(data), sha256="0" * 64,
                        storage_key=key)
    upload.created_at = utcnow() - age
    return upload_id


def completed_with_file(s, store, user: User, *, age: timedelta = OLD, charged: bool = False, **task) -> uuid.UUID:
    """A completed task whose output file is in `store`, completed `age` ago; charged through
    the real operations, or a bare row."""
    task_row = make_charged_task(s, user, **task) if charged else make_task_row(s, user.id, status="processing")
    key = f"outputs/{task_row.id}/result.png"
    size = store.save(key, image_bytes("PNG"))
    complete_task(s, task_row.id, {"analysis": {"width": 64}, "file": {"key": key, "contentType": "image/png",
                                                                      "size": size, "name": "result.png"}})
    s.execute(update(AiTask).where(AiTask.id == task_row.id).values(completed_at=utcnow() - age))
    return task_row.id


def ledger(s, user_id: uuid.UUID) -> list[tuple]:
    return [tuple(row) for row in s.execute(
        select(Transaction.id, Transaction.amount, Transaction.type, Transaction.task_id, Transaction.balance_after)
        .where(Transaction.user_id == user_id).order_by(Transaction.id))]


def expired_at(s, model, row_id):
    column = model.output_expired_at if model is AiTask else model.expired_at
    return s.scalar(select(column).where(model.id == row_id).execution_options(populate_existing=True))


class TestExpiredOutputs:
    def test_an_old_output_is_deleted_and_its_route_answers_410(self, client, e2e_db, store, user, make_token):
        with session_scope(e2e_db) as s:
            task_id = completed_with_file(s, store, s.get(User, user.id), charged=True)
            before = ledger(s, user.id)
        key = f"outputs/{task_id}/result.png"
        headers = bearer(make_token(user.clerk_id))
        assert client.simulate_get(f"/api/tasks/{task_id}/output", headers=headers).status_code == 200

        assert run(e2e_db, store) == {"outputs": 1, "uploads": 0, "uploads_in_use": 0}
        assert not store.exists(key) and store.deleted == [key]
        r = client.simulate_get(f"/api/tasks/{task_id}/output", headers=headers)
        assert r.status_code == 410
        assert r.json == {"error": r.json["error"], "statusCode": 410, "code": "output_expired"}
        assert "deleted on" in r.json["error"]
        task = client.simulate_get(f"/api/tasks/{task_id}", headers=headers).json["task"]
        assert task["status"] == "completed" and task["outputExpiredAt"] is not None
        assert task["outputUrl"] is None and task["output"]["analysis"] == {"width": 64}
        assert task["outputType"] == "image/png"  # what was made, though it is gone
        with e2e_db() as s:
            assert ledger(s, user.id) == before  # no refund, no entry of any kind
            assert s.get(User, user.id).credits == sum(row[1] for row in before)

    def test_recent_outputs_and_those_of_unfinished_tasks_stay(self, client, e2e_db, store, user, make_token):
        with session_scope(e2e_db) as s:
            u = s.get(User, user.id)
            recent = completed_with_file(s, store, u, age=timedelta(days=29))
            no_file = make_task_row(s, user.id, status="processing")
            complete_task(s, no_file.id, {"analysis": {}})
            s.execute(update(AiTask).where(AiTask.id == no_file.id).values(completed_at=utcnow() - OLD))
            # A failed task is never completed: the job has no business with its row.
            failed = make_task_row(s, user.id, status="processing")
            fail_task(s, failed.id, "broken")
        assert run(e2e_db, store) == {"outputs": 0, "uploads": 0, "uploads_in_use": 0}
        assert store.deleted == []
        headers = bearer(make_token(user.clerk_id))
        assert client.simulate_get(f"/api/tasks/{recent}/output", headers=headers).status_code == 200
        with e2e_db() as s:
            assert expired_at(s, AiTask, no_file.id) is None and expired_at(s, AiTask, failed.id) is None

    def test_a_file_outside_the_tasks_own_prefix_is_never_deleted(self, e2e_db, store, user):
        with session_scope(e2e_db) as s:
            someone = save_upload(s, store, s.get(User, user.id), age=timedelta(days=1))
            stray = make_task_row(s, user.id, status="processing")
            complete_task(s, stray.id, {"file": {"key": f"uploads/{user.id}/{someone}"}})
            s.execute(update(AiTask).where(AiTask.id == stray.id).values(completed_at=utcnow() - OLD))
        assert run(e2e_db, store)["outputs"] == 1  # noted as expired (it was never served)...
        assert store.exists(f"uploads/{user.id}/{someone}") and store.deleted == []  # ...and nothing deleted


class TestExpiredUploads:
    def test_an_upload_a_task_in_flight_reads_is_kept_until_the_task_is_final(self, e2e_db, store, user):
        with session_scope(e2e_db) as s:
            u = s.get(User, user.id)
            pending_in, processing_in, done_in, unused = (save_upload(s, store, u) for _ in range(4))
            pending = make_task(s, u, input={"uploadId": str(pending_in)})
            processing = make_charged_task(s, u, input=str(processing_in))
            done = make_charged_task(s, u, input=str(done_in))
            complete_task(s, done.id, {"analysis": {}})

        assert run(e2e_db, store) == {"outputs": 0, "uploads": 2, "uploads_in_use": 2}
        assert sorted(store.deleted) == sorted(f"uploads/{user.id}/{i}" for i in (done_in, unused))
        with e2e_db() as s:
            for kept in (pending_in, processing_in):
                assert store.exists(f"uploads/{user.id}/{kept}") and expired_at(s, Upload, kept) is None
            assert expired_at(s, Upload, unused) is not None

        with session_scope(e2e_db) as s:
            fail_task(s, pending.id, "gave up")
            complete_task(s, processing.id, {"analysis": {}})
        assert run(e2e_db, store) == {"outputs": 0, "uploads": 2, "uploads_in_use": 0}
        assert not store.exists(f"uploads/{user.id}/{pending_in}")

    def test_a_submission_under_way_and_the_job_take_turns_on_the_upload(self, e2e_db, store, user):
        with session_scope(e2e_db) as s:
            upload_id = save_upload(s, store, s.get(User, user.id))
        # A submission naming the upload, admitted but not committed yet: the job must neither
        # wait for it nor delete the file under it.
        with e2e_db() as submitting:
            make_task(submitting, submitting.get(User, user.id), input=str(upload_id))
            assert run(e2e_db, store) == {"outputs": 0, "uploads": 0, "uploads_in_use": 0}
            submitting.commit()
        assert run(e2e_db, store) == {"outputs": 0, "uploads": 0, "uploads_in_use": 1}
        assert store.exists(f"uploads/{user.id}/{upload_id}")

    def test_an_expired_upload_is_no_longer_a_task_input(self, client, e2e_db, store, user, make_token):
        with session_scope(e2e_db) as s:
            upload_id = save_upload(s, store, s.get(User, user.id))
        run(e2e_db, store)
        headers = bearer(make_token(user.clerk_id))
        shown = client.simulate_get(f"/api/uploads/{upload_id}", headers=headers).json["upload"]
        assert shown["expiredAt"] is not None
        r = client.simulate_post("/api/tasks/create", headers=headers,
                                 json={"type": "image_analysis", "input": str(upload_id)})
        assert r.status_code == 404 and r.json["code"] == "upload_expired" and "upload it again" in r.json["error"]

    def test_recent_uploads_stay(self, e2e_db, store, user):
        with session_scope(e2e_db) as s:
            recent = save_upload(s, store, s.get(User, user.id), age=timedelta(days=29))
        assert run(e2e_db, store)["uploads"] == 0
        assert store.exists(f"uploads/{user.id}/{recent}")


class TestRunningTwice:
    def test_two_runs_at_once_delete_each_file_once_and_a_third_finds_nothing(self, e2e_db, store, user):
        with session_scope(e2e_db) as s:
            u = s.get(User, user.id)
            tasks = [completed_with_file(s, store, u, age=OLD + timedelta(minutes=i)) for i in range(25)]
            uploads = [save_upload(s, store, u, age=OLD + timedelta(minutes=i)) for i in range(25)]
        results = at_once(2, lambda _: run(e2e_db, store, batch=4))
        assert sum(r["outputs"] for r in results) == 25 and sum(r["uploads"] for r in results) == 25
        assert all(count == 1 for count in Counter(store.deleted).values()) and len(store.deleted) == 50
        with e2e_db() as s:
            first = {t: expired_at(s, AiTask, t) for t in tasks}
            assert all(first.values()) and all(expired_at(s, Upload, u) for u in uploads)
        assert run(e2e_db, store) == {"outputs": 0, "uploads": 0, "uploads_in_use": 0}
        with e2e_db() as s:
            assert {t: expired_at(s, AiTask, t) for t in tasks} == first  # the note keeps its first date

    def test_a_storage_failure_keeps_what_was_done_and_the_next_run_finishes(self, e2e_db, tmp_path, user):
        failing = RecordingStorage(tmp_path / "store", fail_from=3)
        with session_scope(e2e_db) as s:
            tasks = [completed_with_file(s, failing, s.get(User, user.id), age=OLD + timedelta(minutes=i))
                     for i in range(4)]
        with pytest.raises(ConnectionError):
            run(e2e_db, failing)
        with e2e_db() as s:
            noted = [expired_at(s, AiTask, t) is not None for t in tasks]
        assert sum(noted) == 2 == len(failing.deleted)  # each deleted file noted; none noted undeleted
        failing.fail_from = None
        assert run(e2e_db, failing)["outputs"] == 2
        assert len(failing.deleted) == 4


class TestContract:
    def test_openapi_documents_the_410_and_the_expiry_fields(self, client):
        document = client.simulate_get("/openapi.json").json
        gone = document["paths"]["/api/tasks/{task_id}/output"]["get"]["responses"]["410"]
        assert gone["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        schemas = document["components"]["schemas"]
        assert "outputExpiredAt" in schemas["TaskOut"]["properties"]
        assert "expiredAt" in schemas["UploadOut"]["properties"]


class TestRetentionSettings:
    BASE = {"APP_ENV": "test", "DATABASE_URL": "postgresql://x/y", "REDIS_URL": "redis://x"}

    def test_retention_is_off_unless_set_and_then_beat_runs_it(self):
        off = Settings.from_env(dict(self.BASE))
        assert off.retention_days == 0 and "expire-stored-files" not in create_celery(off).conf.beat_schedule
        on = Settings.from_env({**self.BASE, "RETENTION_DAYS": "30", "BEAT_RETENTION_SECONDS": "900"})
        assert on.retention_days == 30
        assert create_celery(on).conf.beat_schedule["expire-stored-files"] == {
            "task": "maintenance.expire_stored_files", "schedule": 900.0}

    @pytest.mark.parametrize("name,value", [("RETENTION_DAYS", "-1"), ("RETENTION_DAYS", "month"),
                                            ("BEAT_RETENTION_SECONDS", "0")])
    def test_a_bad_value_is_refused_naming_it(self, name, value):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({**self.BASE, name: value})


# --- the beat job on a real worker, storing on S3 -----------------------------------------

@pytest.fixture(scope="module")
def s3():
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def retention_worker(s3, e2e_settings, tmp_path_factory):
    bucket = s3.new_bucket()
    settings = isolated_broker(e2e_settings, ISOLATED_REDIS_DB).with_(
        storage_url=f"s3://{bucket}", s3_endpoint_url=s3.endpoint_url, retention_days=30)
    worker = CeleryWorker(worker_env(settings, RETENTION_DAYS="30", **s3.env(bucket)), queues=("maintenance",),
                          concurrency=1, name="retention", log_path=tmp_path_factory.mktemp("logs") / "retention.log")
    worker.start(create_celery(settings))
    yield bucket, settings
    worker.stop()


@pytest.mark.e2e
def test_the_beat_job_on_a_worker_expires_an_old_output_on_s3(s3, retention_worker, e2e_engine, e2e_db, user,
                                                              make_token):
    bucket, settings = retention_worker
    store = S3Storage(bucket, endpoint_url=s3.endpoint_url)
    with session_scope(e2e_db) as s:
        u = s.get(User, user.id)
        old = completed_with_file(s, store, u, charged=True)
        recent = completed_with_file(s, store, u, age=timedelta(days=1), charged=True)
        before = ledger(s, user.id)
    queue = TaskQueue(create_celery(settings))
    queue.celery.send_task("maintenance.expire_stored_files")
    queue.celery.send_task("maintenance.expire_stored_files")  # twice: the second finds nothing to do
    with e2e_db() as s:
        wait_for(lambda: expired_at(s, AiTask, old) is not None, 30, message="output expired")
    assert s3.keys(bucket) == [f"outputs/{recent}/result.png"]
    client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db, queue=queue))
    headers = bearer(make_token(user.clerk_id))
    assert client.simulate_get(f"/api/tasks/{old}/output", headers=headers).json["code"] == "output_expired"
    assert client.simulate_get(f"/api/tasks/{recent}/output", headers=headers).status_code == 200
    with e2e_db() as s:
        assert ledger(s, user.id) == before
