"""Task webhooks (Standard Webhooks): registration and its address checks, another user's
endpoint (404), the low-balance threshold, and, with a real worker, real beat and a real
receiver on loopback: each event delivered once per webhook-id after two failures, the
delivery log, an endpoint that keeps failing disabled with its reason, credits.low once
per crossing, and a task's own webhook signed with the user's secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from falcon import testing
from sqlalchemy import func, select

from api.app import create_app
from models import Event, WebhookDelivery, WebhookEndpoint, utcnow
from models.credits import adjust_credits, post_entry
from models.db import session_scope
from models.events import record_event
from models.uploads import add_upload
from models.webhooks import fan_out_events, sign
from tests.support.builders import make_user
from tests.support.env import ROOT, isolated_broker, worker_env
from tests.support.http import bearer, sign_up
from tests.support.processors import OVERRIDES
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

ISOLATED_REDIS_DB = 5  # this module's worker and beat consume it
TASK_EVENTS = ["task.started", "task.progress", "task.completed", "task.failed", "task.cancelled", "task.expired"]


def verify(secret: str, headers, body: bytes) -> bool:
    """The receiver's check, written from the spec (not with the sender's code)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(part.split(",", 1)[1], expected)
               for part in headers["webhook-signature"].split() if part.startswith("v1,"))


class TestSignature:
    def test_the_standard_webhooks_reference_vector(self):
        assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                    b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


# --- registration and ownership (in process) -------------------------------------------------------

def register(client, headers, url="https://hooks.example.com/studiox", events=None):
    return client.simulate_post("/api/webhooks", headers=headers, json={"url": url, **({"events": events} if events
                                                                                         else {})})


class TestRegistration:
    def test_the_secret_is_answered_once_and_never_again(self, client, user_headers):
        r = register(client, user_headers, events=["task.completed", "credits.low"])
        assert r.status_code == 201, r.json
        secret = r.json["secret"]
        assert secret.startswith("whsec_") and 24 <= len(base64.b64decode(secret[6:])) <= 32
        hook = r.json["webhook"]
        assert (hook["status"], hook["events"], hook["disabledReason"]) == ("enabled", ["task.completed",
                                                                                        "credits.low"], None)
        listed = client.simulate_get("/api/webhooks", headers=user_headers)
        assert listed.status_code == 200 and [h["id"] for h in listed.json["webhooks"]] == [hook["id"]]
        assert secret not in listed.text

    def test_events_default_to_all_and_unknown_ones_are_refused(self, client, user_headers):
        assert register(client, user_headers).json["webhook"]["events"] == [*TASK_EVENTS, "credits.low"]
        r = register(client, user_headers, events=["task.exploded"])
        assert (r.status_code, r.json["code"]) == (400, "invalid_webhook_events")

    @pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.0.0.5/",
                                     "http://[::1]/x", "http://2130706433/"])
    def test_loopback_and_private_addresses_are_refused_without_the_allowance(self, client, user_headers, url):
        r = register(client, user_headers, url=url)
        assert (r.status_code, r.json["code"]) == (400, "url_not_allowed"), r.json

    def test_the_allowance_lets_a_loopback_port_through(self, settings, engine, session_factory, task_queue,
                                                         make_token):
        allowed = testing.TestClient(create_app(settings.with_(fetch_allowed_hosts=("127.0.0.1:8080",)),
                                                engine=engine, session_factory=session_factory, queue=task_queue))
        headers, _ = sign_up(allowed, make_token())
        assert register(allowed, headers, url="http://127.0.0.1:8080/hook").status_code == 201
        assert register(allowed, headers, url="http://127.0.0.1:8081/hook").json["code"] == "url_not_allowed"

    @pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "http://metadata.google.internal/",
                                     "http://[fd00:ec2::254]/"])
    def test_metadata_addresses_are_refused_whatever_the_allowance(self, settings, engine, session_factory,
                                                                    task_queue, make_token, url):
        lax = testing.TestClient(create_app(settings.with_(fetch_allow_private=True), engine=engine,
                                            session_factory=session_factory, queue=task_queue))
        headers, _ = sign_up(lax, make_token())
        r = register(lax, headers, url=url)
        assert (r.status_code, r.json["code"]) == (400, "url_not_allowed")

    @pytest.mark.parametrize("url", ["ftp://example.com/x", "https://user:pw@example.com/x", "example.com"])
    def test_what_is_not_an_http_url_is_refused(self, client, user_headers, url):
        assert register(client, user_headers, url=url).status_code == 400


class TestOwnership:
    def test_another_users_endpoint_is_not_found(self, client, user_headers, make_token):
        hook = register(client, user_headers).json["webhook"]["id"]
        other, _ = sign_up(client, make_token())
        for call, path in ((client.simulate_delete, f"/api/webhooks/{hook}"),
                           (client.simulate_get, f"/api/webhooks/{hook}/deliveries")):
            r = call(path, headers=other)
            assert (r.status_code, r.json["code"]) == (404, "webhook_not_found")
        assert client.simulate_get("/api/webhooks", headers=other).json["webhooks"] == []
        assert client.simulate_get(f"/api/webhooks/{hook}/deliveries", headers=user_headers).status_code == 200

    def test_a_deleted_endpoint_is_gone(self, client, user_headers):
        hook = register(client, user_headers).json["webhook"]["id"]
        r = client.simulate_delete(f"/api/webhooks/{hook}", headers=user_headers)
        assert (r.status_code, r.json["webhook"]["status"]) == (200, "deleted")
        assert client.simulate_delete(f"/api/webhooks/{hook}", headers=user_headers).status_code == 404
        assert client.simulate_get(f"/api/webhooks/{hook}/deliveries", headers=user_headers).status_code == 404
        assert client.simulate_get("/api/webhooks", headers=user_headers).json["webhooks"] == []
        assert client.simulate_get("/api/webhooks/not-an-id/deliveries", headers=user_headers).status_code == 404

    def test_another_users_task_deliveries_are_not_found(self, client, user_headers, make_token):
        task = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "image_analysis", "input": "https://example.com/a.png",
            "webhook": "https://hooks.example.com/t"}).json["task"]
        other, _ = sign_up(client, make_token())
        assert client.simulate_get(f"/api/tasks/{task['id']}/webhook-deliveries", headers=other).status_code == 404
        mine = client.simulate_get(f"/api/tasks/{task['id']}/webhook-deliveries", headers=user_headers).json
        assert (mine["webhook"], mine["webhookEvents"], mine["deliveries"]) == (
            "https://hooks.example.com/t", ["task.completed", "task.failed", "task.cancelled", "task.expired"], [])


class TestTaskWebhookAdmission:
    @pytest.mark.parametrize("extra, code", [
        ({"webhook": "http://127.0.0.1/hook"}, "url_not_allowed"),
        ({"webhook": "http://169.254.169.254/"}, "url_not_allowed"),
        ({"webhook": "ftp://example.com/"}, "invalid_webhook_url"),
        ({"webhookEvents": ["task.completed"]}, "invalid_webhook_events"),
        ({"webhook": "https://hooks.example.com/", "webhookEvents": ["credits.low"]}, "invalid_webhook_events"),
    ])
    def test_a_bad_webhook_is_refused_before_anything_is_made(self, client, user_headers, extra, code):
        r = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "image_analysis", "input": "https://example.com/a.png", **extra})
        assert (r.status_code, r.json["code"]) == (400, code), r.json

    def test_the_webhook_is_part_of_an_idempotent_submission(self, client, user_headers):
        body = {"type": "image_analysis", "input": "https://example.com/a.png", "webhook": "https://h.example.com/1"}
        key = {**user_headers, "Idempotency-Key": "k-1"}
        first = client.simulate_post("/api/tasks/create", headers=key, json=body)
        again = client.simulate_post("/api/tasks/create", headers=key, json=body)
        assert (first.status_code, again.status_code) == (201, 200)
        other = client.simulate_post("/api/tasks/create", headers=key, json={**body, "webhook": "https://h.example.com/2"})
        assert (other.status_code, other.json["code"]) == (409, "idempotency_key_reused")

    def test_an_estimate_refuses_a_bad_webhook_as_create_does(self, client, user_headers):
        body = {"type": "image_analysis", "input": "https://example.com/a.png", "webhook": "http://10.1.2.3/"}
        r = client.simulate_post("/api/tasks/estimate", headers=user_headers, json=body)
        assert (r.status_code, r.json["code"]) == (400, "url_not_allowed")

    def test_the_signing_secret_is_made_once_and_stays(self, client, user_headers, make_token):
        first = client.simulate_get("/api/webhooks/signing-secret", headers=user_headers).json["secret"]
        assert first.startswith("whsec_")
        assert client.simulate_get("/api/webhooks/signing-secret", headers=user_headers).json["secret"] == first
        other, _ = sign_up(client, make_token())
        assert client.simulate_get("/api/webhooks/signing-secret", headers=other).json["secret"] != first


# --- the low-balance threshold -------------------------------------------------------------------

def lows(session, user_id) -> list[dict]:
    return [e.data for e in session.scalars(select(Event).where(Event.user_id == user_id, Event.type == "credits.low")
                                            .order_by(Event.id))]


class TestLowBalance:
    def test_crossing_emits_once_and_again_only_after_the_balance_is_back(self, session):
        user = make_user(session)  # free: 20 credits, threshold 5
        adjust_credits(session, user.id, -14, bucket="plan", reason="spend")  # 6: above
        assert lows(session, user.id) == []
        entry = adjust_credits(session, user.id, -2, bucket="plan", reason="spend")  # 4: crossed
        adjust_credits(session, user.id, -3, bucket="plan", reason="spend")  # 1: still below
        assert lows(session, user.id) == [{"balance": 4, "threshold": 5, "transactionId": str(entry.id),
                                           "transactionType": "admin_adjustment"}]
        post_entry(session, user.id, type="credit_purchase", purchased_delta=4)  # 5: back at it
        adjust_credits(session, user.id, -1, bucket="purchased", reason="spend")  # 4: crossed again
        assert [low["balance"] for low in lows(session, user.id)] == [4, 4]

    def test_from_above_to_zero_in_one_step_counts_once(self, session):
        user = make_user(session)
        adjust_credits(session, user.id, -20, bucket="plan", reason="all of it")
        assert [low["balance"] for low in lows(session, user.id)] == [0]

    def test_an_expiry_followed_by_its_periods_grant_is_not_a_crossing(self, session):
        user = make_user(session)
        post_entry(session, user.id, type="credit_expiry", plan_delta=-20, period=utcnow().date(),
                   stripe_object_id="in_test")
        post_entry(session, user.id, type="monthly_reset", plan_delta=20, period=utcnow().date(),
                   stripe_object_id="in_test")
        assert lows(session, user.id) == []

    def test_the_users_own_threshold_and_zero_for_never(self, client, user_headers, session):
        r = client.simulate_get("/api/webhooks/settings", headers=user_headers).json
        assert r == {"lowCreditsThreshold": 5, "planDefault": 5, "override": None}
        put = client.simulate_put("/api/webhooks/settings", headers=user_headers, json={"lowCreditsThreshold": 0})
        assert put.json == {"lowCreditsThreshold": 0, "planDefault": 5, "override": 0}
        user_id = client.simulate_get("/api/users/me", headers=user_headers).json["user"]["id"]
        adjust_credits(session, uuid.UUID(user_id), -20, bucket="plan", reason="all of it")
        assert lows(session, uuid.UUID(user_id)) == []
        back = client.simulate_put("/api/webhooks/settings", headers=user_headers, json={"lowCreditsThreshold": None})
        assert back.json["lowCreditsThreshold"] == 5
        bad = client.simulate_put("/api/webhooks/settings", headers=user_headers, json={"lowCreditsThreshold": -1})
        assert (bad.status_code, bad.json["code"]) == (400, "invalid_threshold")

    def test_plans_have_their_defaults(self, session):
        from models import Plan

        assert dict(session.execute(select(Plan.id, Plan.low_credits_threshold)).all()) == {
            "free": 5, "pro": 50, "enterprise": 200}


# --- end to end: a real worker, real beat, a real receiver -----------------------------------------

class Receiver:
    """A webhook receiver on loopback. Per path: `flaky` answers 500 to the first two
    attempts of each webhook-id and 200 after; `down` always 500; anything else 200. Every
    request is kept with whether its signature verified against the path's secret."""

    def __init__(self):
        self.requests: list[dict] = []
        self.secrets: dict[str, str] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.strip("/")
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    seen = sum(1 for r in receiver.requests if r["id"] == headers.get("webhook-id"))
                    secret = receiver.secrets.get(path)
                    status = 200
                    if path.startswith("flaky") and seen < 2 or path.startswith("down"):
                        status = 500
                    receiver.requests.append({
                        "path": path, "id": headers.get("webhook-id"), "status": status, "body": json.loads(body),
                        "signed": secret is not None and verify(secret, headers, body),
                        "timestamp": int(headers.get("webhook-timestamp", 0))})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def to(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def stop(self):
        self.server.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def blocked_port():
    """A loopback port the API lets users register but the workers may not deliver to."""
    return free_port()


@pytest.fixture(scope="module")
def hooks_settings(e2e_settings, receiver, blocked_port):
    return isolated_broker(e2e_settings, ISOLATED_REDIS_DB).with_(
        fetch_allowed_hosts=(f"127.0.0.1:{receiver.port}", f"127.0.0.1:{blocked_port}"))


@pytest.fixture(scope="module")
def hooks_services(hooks_settings, receiver, tmp_path_factory):
    """A worker (tasks and maintenance) and beat, firing the webhook job every second with
    a retry schedule shrunk to seconds and a "day" of failures shrunk to 5 s."""
    logs = tmp_path_factory.mktemp("webhook-logs")
    env = worker_env(hooks_settings, PROCESSOR_OVERRIDES=OVERRIDES, FETCH_ALLOWED_HOSTS=f"127.0.0.1:{receiver.port}",
                     BEAT_WEBHOOKS_SECONDS="1", WEBHOOK_RETRY_SECONDS=",".join(["0.5"] * 12),
                     WEBHOOK_DISABLE_AFTER_SECONDS="5", WEBHOOK_TIMEOUT_SECONDS="3",
                     BEAT_RESET_SECONDS="3600", BEAT_SWEEP_SECONDS="3600", BEAT_REAP_SECONDS="3600",
                     BEAT_RECONCILE_SECONDS="3600")
    celery = create_celery(hooks_settings)
    worker = CeleryWorker(env, queues=("image_analysis", "maintenance"), concurrency=4,
                          name=f"hooks{uuid.uuid4().hex[:6]}", log_path=logs / "worker.log").start(celery)
    beat_log = open(logs / "beat.log", "ab")
    beat = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "beat", "-l", "info",
                             "-s", str(logs / "beat-schedule"), "--pidfile="],
                            cwd=ROOT, env=env, stdout=beat_log, stderr=subprocess.STDOUT, start_new_session=True)
    yield celery
    beat.terminate()
    beat.wait(10)
    worker.stop()


@pytest.fixture
def hooks(hooks_settings, hooks_services, e2e_engine, e2e_db, make_token, receiver):
    """The API of the webhook services, and a pro user of it with an upload to process."""
    with receiver.lock:
        receiver.requests.clear()
        receiver.secrets.clear()
    client = testing.TestClient(create_app(hooks_settings, engine=e2e_engine, session_factory=e2e_db,
                                           queue=TaskQueue(hooks_services)))
    with session_scope(e2e_db) as s:
        user = make_user(s, plan="pro")
        key = f"uploads/{user.id}/in"
        (hooks_settings.media_root / key).parent.mkdir(parents=True, exist_ok=True)
        (hooks_settings.media_root / key).write_bytes(b"input")
        upload = add_upload(s, user.id, content_type="application/octet-stream", size=5, sha256="0" * 64,
                            storage_key=key)
    return client, bearer(make_token(user.clerk_id)), user.id, str(upload.id)


def submit(client, headers, upload_id, **extra) -> dict:
    r = client.simulate_post("/api/tasks/create", headers=headers, json={
        "type": "image_analysis", "input": upload_id, "params": {"sleep": 0.2}, **extra})
    assert r.status_code == 201, r.json
    return r.json["task"]


def endpoint(client, headers, receiver, path, events=None) -> str:
    r = register(client, headers, url=receiver.url(path), events=events)
    assert r.status_code == 201, r.json
    receiver.secrets[path] = r.json["secret"]
    return r.json["webhook"]["id"]


def all_deliveries(client, headers, path) -> list[dict]:
    found, cursor = [], None
    while True:
        page = client.simulate_get(path, headers=headers, params={"limit": 5, **({"cursor": cursor} if cursor
                                                                                 else {})}).json
        found += page["deliveries"]
        cursor = page["nextCursor"]
        if cursor is None:
            return found


@pytest.mark.e2e
class TestDelivery:
    def test_each_event_arrives_signed_and_once_per_webhook_id_after_two_failures(self, hooks, receiver, e2e_db):
        client, headers, _, upload = hooks
        hook = endpoint(client, headers, receiver, "flaky", events=TASK_EVENTS)
        task = submit(client, headers, upload)

        def accepted():
            return [r for r in receiver.to("flaky") if r["status"] == 200]

        wait_for(lambda: any(r["body"]["type"] == "task.completed" for r in accepted()), 60,
                 message="the completion accepted")
        time.sleep(2.5)  # anything still due arrives, and nothing more comes
        with e2e_db() as s:
            logged = Counter(s.scalars(select(Event.type).where(Event.task_id == uuid.UUID(task["id"]))))
        assert logged["task.started"] == logged["task.completed"] == 1 and logged["task.progress"] >= 1
        requests = receiver.to("flaky")
        assert all(r["signed"] for r in requests)
        by_id = Counter(r["id"] for r in requests)
        # Every event of the task, each under one webhook-id tried three times: 500, 500, 200.
        assert len(by_id) == sum(logged.values()) and set(by_id.values()) == {3}
        assert Counter(r["id"] for r in accepted()) == Counter({i: 1 for i in by_id})
        bodies = {r["id"]: r["body"] for r in accepted()}
        assert Counter(b["type"] for b in bodies.values()) == logged
        done = next(b for b in bodies.values() if b["type"] == "task.completed")
        assert done["data"]["taskId"] == task["id"] and done["data"]["task"]["status"] == "completed"
        assert done["data"]["task"]["id"] == task["id"] and "timestamp" in done
        assert abs(requests[-1]["timestamp"] - time.time()) < 60

        # The log: newest first, keyset pages, each attempt with its status code and latency.
        log = all_deliveries(client, headers, f"/api/webhooks/{hook}/deliveries")
        ids = [int(d["id"]) for d in log]
        assert len(log) == len(by_id) and ids == sorted(ids, reverse=True)
        for delivery in log:
            assert delivery["status"] == "delivered" and delivery["attemptCount"] == 3
            assert [a["statusCode"] for a in delivery["attempts"]] == [500, 500, 200]
            assert [a["error"] for a in delivery["attempts"]] == ["HTTP 500", "HTTP 500", None]
            assert all(a["latencyMs"] >= 0 for a in delivery["attempts"]) and delivery["nextAttemptAt"] is None
            assert delivery["webhookId"] in by_id
        hooks_listed = client.simulate_get("/api/webhooks", headers=headers).json["webhooks"]
        assert (hooks_listed[0]["status"], hooks_listed[0]["failingSince"]) == ("enabled", None)

    def test_an_endpoint_failing_past_the_day_is_disabled_with_its_reason(self, hooks, receiver, e2e_db):
        client, headers, user_id, upload = hooks
        hook = endpoint(client, headers, receiver, "down", events=["task.started", "task.completed"])
        submit(client, headers, upload)

        def status():
            return client.simulate_get("/api/webhooks", headers=headers).json["webhooks"][0]

        wait_for(lambda: status()["status"] == "disabled", 60, message="the endpoint disabled")
        shown = status()
        assert "failed" in shown["disabledReason"] and "HTTP 500" in shown["disabledReason"]
        assert shown["disabledAt"] is not None
        time.sleep(2.5)
        sent = len(receiver.to("down"))
        time.sleep(2.5)
        assert len(receiver.to("down")) == sent  # its pending deliveries stopped
        log = all_deliveries(client, headers, f"/api/webhooks/{hook}/deliveries")
        assert {d["status"] for d in log} <= {"failed", "cancelled"} and len(log) == 2
        assert all(a["statusCode"] == 500 for d in log for a in d["attempts"])
        # Events after the disabling are not fanned out to it.
        submit(client, headers, upload)
        time.sleep(3)
        with e2e_db() as s:
            assert s.scalar(select(func.count()).select_from(WebhookDelivery)
                            .where(WebhookDelivery.endpoint_id == uuid.UUID(hook))) == 2

    def test_a_name_resolving_to_a_forbidden_address_fails_the_attempt(self, hooks, blocked_port):
        client, headers, _, upload = hooks
        # The API was told this port is fine; the workers were not: each attempt is refused.
        r = register(client, headers, url=f"http://127.0.0.1:{blocked_port}/x", events=["task.completed"])
        assert r.status_code == 201
        hook = r.json["webhook"]["id"]
        submit(client, headers, upload)

        def attempts():
            log = all_deliveries(client, headers, f"/api/webhooks/{hook}/deliveries")
            return log[0]["attempts"] if log else []

        found = wait_for(lambda: len(attempts()) >= 2 and attempts(), 60, message="refused attempts recorded")
        assert all(a["statusCode"] is None and a["error"].startswith("url_not_allowed") for a in found)

    def test_credits_low_is_sent_once_per_crossing(self, hooks, receiver, e2e_db):
        client, headers, user_id, _ = hooks
        endpoint(client, headers, receiver, "low", events=["credits.low"])
        with session_scope(e2e_db) as s:  # pro: 500 credits, threshold 50
            adjust_credits(s, user_id, -460, bucket="plan", reason="spend")  # 40: crossed
        with session_scope(e2e_db) as s:
            adjust_credits(s, user_id, -10, bucket="plan", reason="spend")  # 30: still below
        with session_scope(e2e_db) as s:
            adjust_credits(s, user_id, 30, bucket="purchased", reason="top-up")  # 60: back above
        with session_scope(e2e_db) as s:
            adjust_credits(s, user_id, -15, bucket="plan", reason="spend")  # 45: crossed again
        wait_for(lambda: len(receiver.to("low")) >= 2, 30, message="two credits.low deliveries")
        time.sleep(2)
        # Sent in parallel: in the log's order by event id.
        got = sorted(receiver.to("low"), key=lambda r: int(r["body"]["data"]["eventId"]))
        assert [(r["body"]["type"], r["body"]["data"]["balance"], r["body"]["data"]["threshold"]) for r in got] == [
            ("credits.low", 40, 50), ("credits.low", 45, 50)]
        assert all(r["signed"] for r in got)

    def test_a_tasks_own_webhook_is_signed_with_the_users_secret(self, hooks, receiver):
        client, headers, _, upload = hooks
        receiver.secrets["task-hook"] = client.simulate_get("/api/webhooks/signing-secret",
                                                            headers=headers).json["secret"]
        task = submit(client, headers, upload, webhook=receiver.url("task-hook"))
        wait_for(lambda: receiver.to("task-hook"), 60, message="the task's webhook")
        time.sleep(2)
        [got] = receiver.to("task-hook")  # the default events: only how it ended
        assert got["signed"]
        assert got["body"]["type"] == "task.completed" and got["body"]["data"]["task"]["id"] == task["id"]
        log = client.simulate_get(f"/api/tasks/{task['id']}/webhook-deliveries", headers=headers).json
        assert (log["webhook"], log["webhookEvents"]) == (receiver.url("task-hook"), [
            "task.completed", "task.failed", "task.cancelled", "task.expired"])
        [delivery] = log["deliveries"]
        assert delivery["status"] == "delivered" and delivery["webhookId"] == got["id"]
        assert [a["statusCode"] for a in delivery["attempts"]] == [200]

    def test_a_tasks_own_webhook_with_chosen_events_and_retries(self, hooks, receiver):
        client, headers, _, upload = hooks
        receiver.secrets["flaky-task"] = client.simulate_get("/api/webhooks/signing-secret",
                                                             headers=headers).json["secret"]
        submit(client, headers, upload, webhook=receiver.url("flaky-task"),
               webhookEvents=["task.started", "task.completed"])
        wait_for(lambda: len([r for r in receiver.to("flaky-task") if r["status"] == 200]) == 2, 60,
                 message="both events accepted")
        got = receiver.to("flaky-task")
        assert all(r["signed"] for r in got) and len(got) == 6
        assert sorted(r["body"]["type"] for r in got if r["status"] == 200) == ["task.completed", "task.started"]


# --- the fan-out's cursor and overlapping runs (in process, on committed data) ----------------------

def no_tasks(session, tasks):
    return {}


@pytest.mark.e2e
class TestFanOut:
    def test_an_event_committed_after_a_later_one_is_still_fanned_out(self, e2e_db):
        with session_scope(e2e_db) as s:
            user = make_user(s)
            s.add(WebhookEndpoint(user_id=user.id, url="https://hooks.example.com/x", events=["credits.low"],
                                  secret="whsec_" + base64.b64encode(b"k" * 32).decode(), created_at=utcnow()))
        slow = e2e_db()
        early = record_event(slow, "credits.low", user_id=user.id, data={"n": "early"})  # not committed yet
        with session_scope(e2e_db) as s:
            late = record_event(s, "credits.low", user_id=user.id, data={"n": "late"})
        assert late > early
        with session_scope(e2e_db) as s:
            fan_out_events(s, no_tasks)
        slow.commit()
        slow.close()
        with session_scope(e2e_db) as s:
            fan_out_events(s, no_tasks)
            fan_out_events(s, no_tasks)  # nothing twice
        with e2e_db() as s:
            made = s.scalars(select(WebhookDelivery.event_id).where(WebhookDelivery.user_id == user.id)).all()
        assert sorted(made) == [early, late]

    def test_runs_at_once_send_each_delivery_once(self, e2e_db, receiver, hooks_settings):
        from worker.webhooks import deliver_webhooks

        with session_scope(e2e_db) as s:
            user = make_user(s)
            hook = WebhookEndpoint(user_id=user.id, url=receiver.url("together"), events=["credits.low"],
                                   secret="whsec_" + base64.b64encode(b"t" * 32).decode(), created_at=utcnow())
            s.add(hook)
            s.flush()
            receiver.secrets["together"] = hook.secret
            for n in range(40):
                record_event(s, "credits.low", user_id=user.id, data={"n": n})
        settings = hooks_settings.with_(webhook_concurrency=3)
        results = []
        runs = [threading.Thread(target=lambda: results.append(deliver_webhooks(e2e_db, settings)))
                for _ in range(4)]
        for run in runs:
            run.start()
        for run in runs:
            run.join()
        wait_for(lambda: len(receiver.to("together")) >= 40, 30, message="every delivery sent")
        time.sleep(1.5)  # and none sent again
        got = receiver.to("together")
        assert len(got) == 40 and len({r["id"] for r in got}) == 40 and all(r["signed"] for r in got)
        assert sorted(r["body"]["data"]["n"] for r in got) == list(range(40))
        with e2e_db() as s:
            assert set(s.scalars(select(WebhookDelivery.status).where(WebhookDelivery.user_id == user.id))) == {
                "delivered"}
