"""Waiting and live status against real workers: `Prefer: wait` on create and read (with the
per-process cap), and GET /api/tasks/{id}/events as Server-Sent Events from gunicorn with
gevent workers, as the Procfile's `events` process runs it, woken through Redis pub/sub."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
from falcon import testing
from sqlalchemy import select

from api.app import create_app
from models import Event
from models.db import session_scope
from tests.support.builders import make_user
from tests.support.env import isolated_broker, worker_env
from tests.support.http import bearer
from tests.support.processors import OVERRIDES
from tests.support.web import Gunicorn
from tests.support.workers import CeleryWorker
from worker.queue import TaskQueue, create_celery

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WORKED_REDIS_DB = 7  # this module's worker consumes it
QUIET_REDIS_DB = 4  # nobody consumes it: tasks sent there stay pending
KEEPALIVE_SECONDS = 1


@pytest.fixture(scope="module")
def worked(e2e_settings):
    """Settings on a broker this module's worker consumes, with waiting on (Redis wake-ups)."""
    settings = isolated_broker(e2e_settings, WORKED_REDIS_DB)
    return settings.with_(events_redis_url=settings.broker_url, wait_max_per_process=200)


@pytest.fixture(scope="module")
def live_worker(worked, tmp_path_factory):
    log = tmp_path_factory.mktemp("live") / "worker.log"
    worker = CeleryWorker(worker_env(worked, PROCESSOR_OVERRIDES=OVERRIDES), queues=("image_analysis",),
                          concurrency=2, name=f"live{uuid.uuid4().hex[:6]}", log_path=log)
    worker.start(create_celery(worked))
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def events_server(worked, tmp_path_factory):
    """The API under gunicorn (gevent), as the `events` process serves it."""
    log = tmp_path_factory.mktemp("live") / "gunicorn.log"
    # Polling so slow that only a Redis wake-up can answer a wait in time.
    server = Gunicorn(worker_env(worked, EVENTS_KEEPALIVE_SECONDS=str(KEEPALIVE_SECONDS), EVENTS_POLL_SECONDS="60",
                                 WEB_CONCURRENCY="1"), log_path=log).start()
    yield server
    server.stop()


@dataclass
class Member:
    headers: dict[str, str]
    user_id: uuid.UUID
    uploads: list[str] = field(default_factory=list)


@pytest.fixture
def member(e2e_db, worked, make_token) -> Member:
    """A pro user with an upload to use as input (the stand-in processor reads its bytes)."""
    from models.uploads import add_upload

    with session_scope(e2e_db) as s:
        user = make_user(s, plan="pro")
        key = f"uploads/{user.id}/in"
        (worked.media_root / key).parent.mkdir(parents=True, exist_ok=True)
        (worked.media_root / key).write_bytes(b"input")
        upload = add_upload(s, user.id, content_type="application/octet-stream", size=5, sha256="0" * 64,
                            storage_key=key)
    return Member(bearer(make_token(user.clerk_id)), user.id, [str(upload.id)])


def task_body(member: Member, sleep: float = 0) -> dict:
    # An upload of the user's as input: the stand-in processor reads its bytes.
    return {"type": "image_analysis", "input": member.uploads[0], "params": {"sleep": sleep}}


def client_for(settings, e2e_engine, e2e_db) -> testing.TestClient:
    return testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db,
                                         queue=TaskQueue(create_celery(settings))))


@pytest.fixture
def quiet(worked, e2e_engine, e2e_db):
    """An API whose tasks nobody processes (a broker database no worker consumes)."""
    return client_for(isolated_broker(worked, QUIET_REDIS_DB), e2e_engine, e2e_db)


# --- Prefer: wait ------------------------------------------------------------------------------

class TestPreferWait:
    def test_create_with_prefer_wait_answers_the_completed_task_in_one_request(
            self, worked, live_worker, e2e_engine, e2e_db, member):
        # Polling so slow that only the worker's wake-up can end the wait in time.
        client = client_for(worked.with_(events_poll_seconds=60), e2e_engine, e2e_db)
        began = time.monotonic()
        r = client.simulate_post("/api/tasks/create", headers={**member.headers, "Prefer": "wait=30"},
                                 json=task_body(member, sleep=0.5))
        assert r.status_code == 201, r.text
        assert r.json["task"]["status"] == "completed" and r.json["task"]["output"]["steps"] == 20
        assert r.headers["Preference-Applied"] == "wait=30"
        assert time.monotonic() - began < 10  # woken by the worker's commit, not by the deadline

    def test_under_gunicorn_the_wait_is_woken_by_the_worker(self, events_server, live_worker, member):
        began = time.monotonic()
        status, headers, body = events_server.request(
            "POST", "/api/tasks/create", body=json.dumps(task_body(member, sleep=0.5)).encode(), timeout=40,
            headers={**member.headers, "Content-Type": "application/json", "Prefer": "wait=30"})
        assert status == 201 and json.loads(body)["task"]["status"] == "completed", body
        assert headers["preference-applied"] == "wait=30" and time.monotonic() - began < 10

    def test_the_worker_publishes_each_committed_event_on_the_task_and_user_channels(
            self, worked, live_worker, e2e_engine, e2e_db, member):
        import redis

        client = client_for(worked, e2e_engine, e2e_db)
        pubsub = redis.Redis.from_url(worked.events_redis_url).pubsub(ignore_subscribe_messages=True)
        pubsub.psubscribe("studiox:*")
        try:
            pubsub.get_message(timeout=1)
            task = client.simulate_post("/api/tasks/create", headers={**member.headers, "Prefer": "wait=30"},
                                        json=task_body(member, sleep=0.5)).json["task"]
            heard: dict[str, list[int]] = {}
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                message = pubsub.get_message(timeout=0.2)
                if message:
                    heard.setdefault(message["channel"].decode(), []).append(int(message["data"]))
        finally:
            pubsub.close()
        ids = [event_id for event_id, _ in logged(e2e_db, task["id"])]
        assert heard[f"studiox:task:{task['id']}"] == ids
        assert heard[f"studiox:user:{member.user_id}"] == ids

    def test_without_redis_the_wait_polls_the_database(self, worked, live_worker, e2e_engine, e2e_db, member):
        client = client_for(worked.with_(events_redis_url="", events_poll_seconds=0.2), e2e_engine, e2e_db)
        r = client.simulate_post("/api/tasks/create", headers={**member.headers, "Prefer": "wait"},
                                 json=task_body(member))
        assert r.status_code == 201 and r.json["task"]["status"] == "completed", r.text
        assert r.headers["Preference-Applied"] == "wait=60"

    def test_with_the_wake_up_redis_down_waits_poll_and_changes_still_commit(
            self, worked, live_worker, e2e_engine, e2e_db, member):
        down = worked.with_(events_redis_url="redis://127.0.0.1:1/0", events_poll_seconds=0.2)  # refused
        client = client_for(down, e2e_engine, e2e_db)
        r = client.simulate_post("/api/tasks/create", headers={**member.headers, "Prefer": "wait=20"},
                                 json=task_body(member))
        assert r.status_code == 201 and r.json["task"]["status"] == "completed", r.text
        pending = client_for(isolated_broker(down, QUIET_REDIS_DB), e2e_engine, e2e_db).simulate_post(
            "/api/tasks/create", headers=member.headers, json=task_body(member)).json["task"]
        cancelled = client.simulate_patch(f"/api/tasks/{pending['id']}/cancel", headers=member.headers)
        assert cancelled.status_code == 200  # its event's publish failed; the cancel stands
        assert [kind for _, kind in logged(e2e_db, pending["id"])] == ["task.cancelled"]

    def test_a_task_nobody_processes_is_answered_pending_when_the_time_is_up(self, quiet, member):
        task = quiet.simulate_post("/api/tasks/create", headers=member.headers, json=task_body(member)).json["task"]
        began = time.monotonic()
        r = quiet.simulate_get(f"/api/tasks/{task['id']}", headers={**member.headers, "Prefer": "wait=1"})
        elapsed = time.monotonic() - began
        assert r.status_code == 200 and r.json["task"]["status"] == "pending"
        assert r.headers["Preference-Applied"] == "wait=1" and "Prefer" in r.headers["Vary"]
        assert 0.9 <= elapsed < 4, elapsed

    def test_past_the_cap_a_request_answers_at_once_without_preference_applied(
            self, worked, e2e_engine, e2e_db, member):
        client = client_for(isolated_broker(worked, QUIET_REDIS_DB).with_(wait_max_per_process=1),
                            e2e_engine, e2e_db)
        task = client.simulate_post("/api/tasks/create", headers=member.headers, json=task_body(member)).json["task"]
        path, prefer = f"/api/tasks/{task['id']}", {**member.headers, "Prefer": "wait=3"}
        first: dict = {}
        waiter = threading.Thread(target=lambda: first.update(r=client.simulate_get(path, headers=prefer)))
        waiter.start()
        time.sleep(0.7)  # the first one is waiting now, and holds no pooled connection
        assert e2e_engine.pool.checkedout() == 0
        began = time.monotonic()
        second = client.simulate_get(path, headers=prefer)
        assert time.monotonic() - began < 0.7
        assert second.status_code == 200 and "Preference-Applied" not in second.headers
        waiter.join(10)
        assert first["r"].headers["Preference-Applied"] == "wait=3"
        # The slot is free again.
        again = client.simulate_get(path, headers={**member.headers, "Prefer": "wait=1"})
        assert again.headers["Preference-Applied"] == "wait=1"

    @pytest.mark.parametrize("prefer", ["respond-async", "wait=soon", "wait=0", "return=minimal"])
    def test_other_or_malformed_preferences_are_ignored(self, quiet, member, prefer):
        task = quiet.simulate_post("/api/tasks/create", headers={**member.headers, "Prefer": prefer},
                                   json=task_body(member))
        assert task.status_code == 201 and "Preference-Applied" not in task.headers

    def test_a_final_task_is_answered_at_once(self, worked, live_worker, e2e_engine, e2e_db, member):
        client = client_for(worked, e2e_engine, e2e_db)
        done = client.simulate_post("/api/tasks/create", headers={**member.headers, "Prefer": "wait=30"},
                                    json=task_body(member)).json["task"]
        began = time.monotonic()
        r = client.simulate_get(f"/api/tasks/{done['id']}", headers={**member.headers, "Prefer": "wait=30"})
        assert r.json["task"]["status"] == "completed" and time.monotonic() - began < 2


class TestPreferHeader:
    @pytest.mark.parametrize("header, seconds", [
        ("wait=10", 10), ("wait", 60), ("WAIT=5", 5), ("wait=600", 60), ('wait="7"', 7),
        ("respond-async, wait=3", 3), ("return=minimal; foo, wait=2", 2), ("wait=0", None), ("wait=-1", None),
        ("wait=1.5", None), ("respond-async", None), ("", None)])
    def test_the_preference_is_read_as_rfc_7240_says(self, header, seconds):
        from api.live import preferred_wait

        assert preferred_wait(testing.create_req(headers={"Prefer": header})) == seconds


class TestSettings:
    def test_wake_ups_use_the_redis_broker_unless_told_otherwise(self):
        from settings import Settings

        base = {"APP_ENV": "test", "DATABASE_URL": "postgresql://x/y"}
        redis_broker = Settings.from_env({**base, "REDIS_URL": "redis://r:6379/0"})
        assert redis_broker.events_redis_url == "redis://r:6379/0" and redis_broker.wait_max_per_process == 200
        rabbit = Settings.from_env({**base, "BROKER_URL": "amqp://guest@q//"})
        assert rabbit.events_redis_url == ""  # waits poll the database
        chosen = Settings.from_env({**base, "BROKER_URL": "amqp://guest@q//", "EVENTS_REDIS_URL": "redis://e/1",
                                    "WAIT_MAX_PER_PROCESS": "5", "EVENTS_KEEPALIVE_SECONDS": "3"})
        assert (chosen.events_redis_url, chosen.wait_max_per_process, chosen.events_keepalive_seconds) == (
            "redis://e/1", 5, 3.0)


# --- Server-Sent Events --------------------------------------------------------------------------

class TestEventStreamOfAnEndedTask:
    """In process (the stream of a final task ends at once)."""

    def test_a_task_that_ended_before_the_event_log_gets_one_final_event_with_the_task(
            self, client, session, make_token):
        from tests.support.builders import make_task_row

        user = make_user(session, plan="pro")
        task = make_task_row(session, user.id, status="completed")
        session.commit()
        r = client.simulate_get(f"/api/tasks/{task.id}/events", headers=bearer(make_token(user.clerk_id)))
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        blocks = [b for b in r.text.split("\n\n") if b.strip()]
        assert blocks[0] == "retry: 2000"
        event = dict(line.split(": ", 1) for line in blocks[1].splitlines())
        assert "id" not in event and event["event"] == "task.completed"
        assert json.loads(event["data"])["task"]["id"] == str(task.id)
        assert len(blocks) == 2

    def test_reconnecting_after_the_end_is_204(self, client, session, make_token):
        from tests.support.builders import make_task_row

        user = make_user(session, plan="pro")
        task = make_task_row(session, user.id, status="failed")
        session.commit()
        r = client.simulate_get(f"/api/tasks/{task.id}/events",
                                headers={**bearer(make_token(user.clerk_id)), "Last-Event-ID": "5"})
        assert r.status_code == 204 and r.text == ""


# --- against gunicorn -----------------------------------------------------------------------

@dataclass
class SseEvent:
    id: int | None
    type: str
    data: dict


class SseStream:
    """A real HTTP client of the stream: reads events (and comments) as they arrive."""

    def __init__(self, server: Gunicorn, path: str, headers: dict[str, str], timeout: float = 20):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.comments: list[str] = []
        self.retry: int | None = None

    @property
    def status(self) -> int:
        return self.response.status

    def next_event(self) -> SseEvent | None:
        """The next event, or None at the end of the stream."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\n")
            if not line:
                if "event" in fields or "data" in fields:
                    return SseEvent(int(fields["id"]) if "id" in fields else None, fields.get("event", "message"),
                                    json.loads(fields.get("data", "null")))
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            if name == "retry":
                self.retry = int(value.strip())
            else:
                fields[name] = value[1:] if value.startswith(" ") else value

    def events(self) -> list[SseEvent]:
        found = []
        while (event := self.next_event()) is not None:
            found.append(event)
        return found

    def close(self) -> None:
        self.conn.close()


def logged(e2e_db, task_id: str) -> list[tuple[int, str]]:
    with session_scope(e2e_db) as s:
        return [(e.id, e.type) for e in s.scalars(select(Event).where(Event.task_id == uuid.UUID(task_id))
                                                  .order_by(Event.id))]


def submit(server: Gunicorn, member: Member, sleep: float) -> dict:
    status, _, body = server.request("POST", "/api/tasks/create", body=json.dumps(task_body(member, sleep)).encode(),
                                     headers={**member.headers, "Content-Type": "application/json"})
    assert status == 201, body
    return json.loads(body)["task"]


class TestEventStream:
    def test_a_client_follows_a_task_with_progress_to_its_final_event(
            self, events_server, live_worker, e2e_db, member):
        task = submit(events_server, member, sleep=2)
        stream = SseStream(events_server, f"/api/tasks/{task['id']}/events", member.headers)
        try:
            assert stream.status == 200
            assert stream.response.getheader("Content-Type").startswith("text/event-stream")
            events = stream.events()
        finally:
            stream.close()
        sent = [e for e in events if e.id is not None]
        assert [e.type for e in sent][0] == "task.started"
        assert [e.type for e in sent][-1] == "task.completed"
        progress = [e.data["progress"] for e in sent if e.type == "task.progress"]
        # The worker writes progress at most every so often; each tenth crossed is one event.
        assert progress == sorted(set(progress)) and len(progress) >= 2 and progress[-1] == 100
        final = sent[-1].data["task"]
        assert final["id"] == task["id"] and final["status"] == "completed" and final["output"]["steps"] == 20
        assert [(e.id, e.type) for e in sent] == logged(e2e_db, task["id"])  # the log, in order, once
        assert stream.retry == 2000

    def test_a_reconnecting_client_gets_exactly_what_it_missed(self, events_server, live_worker, e2e_db, member):
        task = submit(events_server, member, sleep=3)
        path = f"/api/tasks/{task['id']}/events"
        first = SseStream(events_server, path, member.headers)
        seen: list[SseEvent] = []
        while len(seen) < 3:
            event = first.next_event()
            assert event is not None
            if event.id is not None:
                seen.append(event)
        first.close()  # dropped mid-way
        time.sleep(1)  # events go on without it
        second = SseStream(events_server, path, {**member.headers, "Last-Event-ID": str(seen[-1].id)})
        try:
            rest = [e for e in second.events() if e.id is not None]
        finally:
            second.close()
        ids = [e.id for e in seen + rest]
        assert ids == sorted(set(ids)), ids  # strictly increasing: no duplicates
        assert rest[-1].type == "task.completed" and rest[-1].data["task"]["status"] == "completed"
        assert [(e.id, e.type) for e in seen + rest] == logged(e2e_db, task["id"])
        # After the final event there is nothing more: 204, so an EventSource stops reconnecting.
        done = SseStream(events_server, path, {**member.headers, "Last-Event-ID": str(rest[-1].id)})
        assert done.status == 204
        done.close()
        # The query parameter does what the header does.
        again = SseStream(events_server, f"{path}?lastEventId={seen[-1].id}", member.headers)
        assert [e.id for e in again.events() if e.id is not None] == [e.id for e in rest]
        again.close()

    def test_an_idle_stream_gets_keep_alives_and_queue_position_then_ends_when_cancelled(
            self, events_server, quiet, e2e_db, member):
        # Submitted where no worker consumes: pending until cancelled.
        task = quiet.simulate_post("/api/tasks/create", headers=member.headers, json=task_body(member)).json["task"]
        stream = SseStream(events_server, f"/api/tasks/{task['id']}/events", member.headers)
        try:
            queued = stream.next_event()
            assert (queued.type, queued.id, queued.data["queuePosition"]) == ("queue", None, 1)
            collected: list[SseEvent] = []
            reader = threading.Thread(target=lambda: collected.extend(stream.events()))
            reader.start()
            time.sleep(KEEPALIVE_SECONDS * 2.5)
            assert len(stream.comments) >= 2 and set(stream.comments) == {": keep-alive"}
            status, _, body = events_server.request("PATCH", f"/api/tasks/{task['id']}/cancel",
                                                    headers=member.headers)
            assert status == 200, body
            began = time.monotonic()
            reader.join(10)
            assert not reader.is_alive() and time.monotonic() - began < 3  # woken, not polled
        finally:
            stream.close()
        assert [e.type for e in collected] == ["task.cancelled"]
        assert collected[0].data["task"]["status"] == "cancelled"

    def test_another_users_task_is_404_before_the_stream_starts(self, events_server, quiet, e2e_db, member,
                                                                 make_token):
        task = quiet.simulate_post("/api/tasks/create", headers=member.headers, json=task_body(member)).json["task"]
        with session_scope(e2e_db) as s:
            other = bearer(make_token(make_user(s, plan="pro").clerk_id))
        status, headers, body = events_server.request("GET", f"/api/tasks/{task['id']}/events", headers=other)
        assert status == 404 and headers["content-type"].startswith("application/json")
        # The usual error shape, as reading the task answers.
        _, _, read = events_server.request("GET", f"/api/tasks/{task['id']}", headers=other)
        assert json.loads(body) == json.loads(read)
        assert json.loads(body)["statusCode"] == 404 and json.loads(body)["code"] == "task_not_found"

    def test_a_malformed_last_event_id_is_a_400(self, events_server, quiet, member):
        task = quiet.simulate_post("/api/tasks/create", headers=member.headers, json=task_body(member)).json["task"]
        status, _, body = events_server.request("GET", f"/api/tasks/{task['id']}/events",
                                                headers={**member.headers, "Last-Event-ID": "abc"})
        assert status == 400 and json.loads(body)["code"] == "invalid_last_event_id"
