"""What a probe found from outside, each reproduced through the API (real gunicorn and real
sockets where the finding is about the server): slow clients, poison tasks, params
amplification, 500s on user input, bodies read before authentication, CORS caching, URLs
that can never be fetched, and a database that goes away."""

from __future__ import annotations

import contextlib
import json
import select as io_select
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

import api.tasks
from devenv.embedded import migrate, start_postgres
from models import AiTask, Transaction, User
from tests.support.builders import image_bytes, make_task, make_user
from tests.support.env import isolated_broker, worker_env
from tests.support.http import bearer
from tests.support.web import Gunicorn
from tests.support.workers import wait_for

ISOLATED_REDIS_DB = 15


def _error(result, status: int, code: str | None = None) -> dict:
    assert result.status_code == status, result.text
    body = result.json
    assert body["statusCode"] == status and isinstance(body["error"], str)
    if code is not None:
        assert body["code"] == code, body
    return body


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def _ledger_rows(session_factory) -> int:
    with session_factory() as s:
        return s.scalar(select(func.count()).select_from(Transaction))


# --- the real server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(e2e_settings, tmp_path_factory):
    settings = isolated_broker(e2e_settings, ISOLATED_REDIS_DB)
    web = Gunicorn(worker_env(settings), workers=1, log_path=tmp_path_factory.mktemp("logs") / "gunicorn.log")
    yield web.start()
    web.stop()


@pytest.fixture
def member(server, make_token, e2e_db) -> dict[str, str]:
    headers = bearer(make_token())
    assert server.request("POST", "/api/users/initialize", headers=headers)[0] == 201
    return headers


def _trickle(port: int, stop: threading.Event, *, body: bool) -> None:
    """A client that sends a request a line (or a byte) at a time, as a slowloris would."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            if body:
                sock.sendall(b"POST /api/tasks/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n")
            else:
                sock.sendall(b"GET /api/users/me HTTP/1.1\r\n")
            while not stop.wait(1.0):
                sock.sendall(b"{" if body else b"X-Slow: 1\r\n")
    except OSError:
        pass  # the server may hang up on a client this slow: that is allowed


class TestSlowClients:
    @pytest.mark.parametrize("body", [False, True], ids=["headers", "body"])
    def test_dozens_of_trickling_clients_do_not_stall_the_api(self, server, member, body):
        stop = threading.Event()
        clients = [threading.Thread(target=_trickle, args=(server.port, stop), kwargs={"body": body}, daemon=True)
                   for _ in range(48)]
        for client in clients:
            client.start()
        try:
            time.sleep(2)  # every slow client is connected and mid-request
            for _ in range(5):
                status, _, payload = server.request("GET", "/api/users/me", headers=member, timeout=10)
                assert status == 200, payload
        finally:
            stop.set()
            for client in clients:
                client.join(5)


    def test_a_client_that_trickles_its_headers_is_cut_off(self, server):
        # gunicorn reads a request's line and headers under WEB_KEEPALIVE (5 s by default).
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"GET /api/users/me HTTP/1.1\r\n")
            closed = False
            for _ in range(20):  # one header line a second, for at most 20 s
                readable, _, _ = io_select.select([sock], [], [], 1.0)
                if readable:
                    closed = sock.recv(1024) == b""  # the server hung up
                    break
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:  # reset: hung up too
                    closed = True
                    break
            assert closed, "the server kept a client that never finished its headers"


class TestFramingOnTheRealServer:
    def test_a_chunk_size_that_is_not_hex_is_400(self, server, member):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /api/tasks/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: {member['Authorization']}\r\n".encode()
                         + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
            reply = sock.recv(65536).decode(errors="replace")
        status = int(reply.split(" ", 2)[1])
        assert 400 <= status < 500, reply
        if status == 400 and "\r\n\r\n" in reply and reply.split("\r\n\r\n", 1)[1].startswith("{"):
            assert json.loads(reply.split("\r\n\r\n", 1)[1])["statusCode"] == 400

    def test_a_multipart_filename_that_is_not_utf8_is_400(self, server, member):
        boundary = b"b0undary"
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a\xffb.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + image_bytes() + b"\r\n--" + boundary + b"--\r\n")
        status, _, payload = server.request(
            "POST", "/api/uploads", body=body,
            headers={**member, "Content-Type": f"multipart/form-data; boundary={boundary.decode()}"})
        assert status == 400, payload
        assert json.loads(payload)["code"] == "invalid_multipart"

    def test_a_body_for_a_method_the_route_lacks_is_not_read(self, server):
        # 405 at the headers, even for a chunked body announced to go on for ever.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"PUT /api/uploads HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n10000\r\n" + b"x" * 1000)
            reply = sock.recv(65536).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 405"), reply

    def test_an_anonymous_body_is_refused_at_its_headers(self, server):
        # 60 MB announced, none sent: the 401 comes without the server waiting for it.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /api/uploads HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 60000000\r\n\r\n")
            reply = sock.recv(65536).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 401"), reply
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST /api/uploads HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n10000\r\n" + b"x" * 1000)
            reply = sock.recv(65536).decode(errors="replace")
        assert reply.startswith("HTTP/1.1 401"), reply


# --- through the app ---------------------------------------------------------------------------

class TestPoisonRequests:
    @pytest.mark.parametrize("depth", [33, 960, 5000])
    def test_params_nested_past_the_limit_are_400(self, client, user_headers, depth):
        body = '{"type": "image_analysis", "input": "https://example.com/a.png", "params": ' + _nested(depth) + "}"
        result = client.simulate_post("/api/tasks/create", headers={**user_headers, "Content-Type": "application/json"},
                                      body=body)
        _error(result, 400, "json_too_deep")

    def test_nesting_within_the_limit_is_fine(self, client, user_headers):
        result = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "image_analysis", "input": "https://example.com/a.png", "params": json.loads(_nested(10))})
        assert result.status_code == 201, result.text

    def test_an_integer_beyond_float_range_is_400(self, client, user_headers):
        body = ('{"type": "video_generation", "input": "https://example.com/a.png", "params": {"duration": 1'
                + "0" * 400 + "}}")
        result = client.simulate_post("/api/tasks/create", headers={**user_headers, "Content-Type": "application/json"},
                                      body=body)
        _error(result, 400)

    @pytest.mark.parametrize("path, body", [
        ("/api/tasks/create", "type=image_analysis&input=http://example.com/a%00b"),
        ("/api/users/initialize", "name=a%00b"),
    ])
    def test_a_form_encoded_body_on_a_json_route_is_415(self, client, user_headers, path, body):
        result = client.simulate_post(path, body=body,
                                      headers={**user_headers, "Content-Type": "application/x-www-form-urlencoded"})
        _error(result, 415, "unsupported_media_type")


class TestTokenClaims:
    @pytest.mark.parametrize("sub", ["user\x00x", "user\ud800x", "u" * 256])
    def test_a_subject_the_users_table_cannot_hold_is_401(self, client, make_token, sub):
        headers = bearer(make_token(sub))
        _error(client.simulate_post("/api/users/initialize", headers=headers), 401, "invalid_token")
        _error(client.simulate_get("/api/users/me", headers=headers), 401, "invalid_token")

    @pytest.mark.parametrize("claims", [{"email": "a\x00@x.com"}, {"name": "x\udfff"}, {"name": "n" * 256}])
    def test_profile_claims_the_table_cannot_hold_are_400(self, client, make_token, claims):
        _error(client.simulate_post("/api/users/initialize", headers=bearer(make_token(**claims))), 400)


class TestParamsAmplification:
    def test_unknown_params_are_capped(self, client, user_headers):
        result = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "image_analysis", "input": "https://example.com/a.png", "params": {"junk": "x" * 2000}})
        _error(result, 400, "invalid_params")

    def test_what_is_stored_is_what_the_schema_read_and_params_are_sent_once(self, client, user_headers):
        result = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "advanced_editing", "input": "https://example.com/a.png",
            "params": {"operations": ["grayscale"], "format": "JPG", "note": "mine"}})
        assert result.status_code == 201, result.text
        task = result.json["task"]
        assert "metadata" not in task
        assert task["params"] == {"operations": [{"op": "grayscale"}], "format": "jpeg", "note": "mine"}

    def test_extra_keys_in_an_input_source_are_refused(self, client, user_headers):
        result = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "image_analysis", "input": {"url": "https://example.com/a.png", "junk": "x" * 100}})
        _error(result, 400, "invalid_input")

    def test_a_list_page_stops_at_its_byte_budget_and_the_cursor_resumes(self, client, user_headers, session,
                                                                         monkeypatch):
        from models.users import get_user
        from tests.support.builders import make_task_row

        me = get_user(session, client.simulate_get("/api/users/me", headers=user_headers).json["user"]["clerkId"])
        for _ in range(12):
            make_task_row(session, me.id, status="cancelled")
        monkeypatch.setattr(api.tasks, "MAX_PAGE_BYTES", 3000)
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = client.simulate_get("/api/tasks", headers=user_headers, params=params).json
            assert 1 <= len(page["tasks"]) < 12 and len(json.dumps(page["tasks"])) <= 3000 + 2000
            seen += [t["id"] for t in page["tasks"]]
            pages += 1
            cursor = page["nextCursor"]
            if cursor is None:
                break
        assert pages > 1 and len(seen) == len(set(seen)) == 12


class TestUrlsThatCanNeverBeFetched:
    @pytest.mark.parametrize("url", [
        "http://127.0.0.1/a.png", "http://2130706433/a.png", "http://[::1]/a.png", "http://10.1.2.3/a.png",
        "http://169.254.169.254/latest/meta-data", "http://metadata.google.internal/x", "http://localhost:8000/a",
        "https://user:pw@example.com/a.png", "http://[::ffff:192.168.0.1]/a.png", "http://[64:ff9b::a00:1]/a.png",
    ])
    def test_refused_at_admission_with_nothing_charged(self, client, user_headers, session, url):
        before = session.scalar(select(func.count()).select_from(Transaction))
        result = client.simulate_post("/api/tasks/create", headers=user_headers,
                                      json={"type": "image_analysis", "input": url})
        _error(result, 400, "url_not_allowed")
        assert session.scalar(select(func.count()).select_from(Transaction)) == before

    @pytest.mark.parametrize("url", ["https://example.com/a.png", "http://[64:ff9b::808:808]/a.png",
                                     "http://8.8.8.8/a.png"])
    def test_a_public_name_or_address_is_left_to_the_fetcher(self, client, user_headers, url):
        # A NAT64 address (DNS64 on an IPv6-only network) is judged by the IPv4 it carries.
        result = client.simulate_post("/api/tasks/create", headers=user_headers,
                                      json={"type": "image_analysis", "input": url})
        assert result.status_code == 201, result.text

    def test_the_fetch_allowances_apply_at_admission_too(self, settings, engine, session_factory, task_queue,
                                                         make_token):
        from falcon import testing

        from api.app import create_app

        allowed = testing.TestClient(create_app(settings.with_(fetch_allowed_hosts=("127.0.0.1:9999",)), engine=engine,
                                                session_factory=session_factory, queue=task_queue))
        headers = bearer(make_token())
        assert allowed.simulate_post("/api/users/initialize", headers=headers).status_code == 201
        ok = allowed.simulate_post("/api/tasks/create", headers=headers,
                                   json={"type": "image_analysis", "input": "http://127.0.0.1:9999/a.png"})
        assert ok.status_code == 201, ok.text
        metadata = allowed.simulate_post("/api/tasks/create", headers=headers,
                                         json={"type": "image_analysis", "input": "http://169.254.169.254/"})
        _error(metadata, 400, "url_not_allowed")


class TestCors:
    def test_every_answer_varies_by_origin(self, client, user_headers):
        for origin in ("http://frontend.test", "https://evil.example"):
            result = client.simulate_get("/api/users/me", headers={**user_headers, "Origin": origin})
            assert "origin" in result.headers.get("Vary", "").lower()
        assert "origin" in client.simulate_get("/health").headers.get("Vary", "").lower()


# --- a task nobody can read, and beat jobs with one bad row ---------------------------------

def _poison(engine, task_id: uuid.UUID, depth: int = 3000) -> None:
    # Written as SQL text: no client of ours would write it, but an older release might have.
    with engine.begin() as conn:
        conn.execute(text("UPDATE ai_tasks SET params = CAST(:p AS jsonb) WHERE id = :id"),
                     {"p": _nested(depth), "id": task_id})


@pytest.mark.e2e
class TestPoisonTasks:
    def test_a_charged_task_whose_request_cannot_be_read_fails_and_is_refunded(
            self, e2e_client, e2e_db, e2e_engine, e2e_worker, e2e_queue, make_token):
        from models.tasks import start_task

        headers = bearer(make_token())
        assert e2e_client.simulate_post("/api/users/initialize", headers=headers).status_code == 201
        with e2e_db() as s:
            # Charged and processing, as a worker that died mid-task leaves it; no message yet
            # (this session has no sender).
            user = s.get(User, uuid.UUID(e2e_client.simulate_get("/api/users/me", headers=headers).json["user"]["id"]))
            task_id = make_task(s, user, params={"sleep": 30}).id
            assert start_task(s, task_id) is not None
            s.commit()
        _poison(e2e_engine, task_id)
        e2e_queue.send("image_analysis", task_id)

        def final():
            with e2e_db() as s:
                status = s.scalar(select(AiTask.status).where(AiTask.id == task_id))
            return status if status in ("failed", "completed") else None

        assert wait_for(final, timeout=60, message="task final") == "failed"
        with e2e_db() as s:
            code = s.scalar(select(AiTask.error_code).where(AiTask.id == task_id))
            types = sorted(s.scalars(select(Transaction.type).where(Transaction.task_id == task_id)))
        assert code == "unprocessable_task" and types == ["credit_deduction", "credit_refund"]
        credits = e2e_client.simulate_get("/api/users/credits", headers=headers).json
        assert credits["credits"] == 20 and credits["reserved"] == 0

    def test_the_sweep_resends_others_past_a_poison_row(self, e2e_db, e2e_engine, e2e_worker, e2e_queue):
        with e2e_db() as s:
            # Two pending tasks whose messages were lost (this session has no sender).
            user = make_user(s)
            ids = [make_task(s, user).id for _ in range(2)]
            s.commit()
        _poison(e2e_engine, ids[0])
        with e2e_engine.begin() as conn:
            conn.execute(text("UPDATE ai_tasks SET created_at = now() - interval '1 hour' WHERE id = ANY(:ids)"),
                         {"ids": ids})
        e2e_queue.celery.send_task("maintenance.sweep_lost_messages")

        def statuses():
            with e2e_db() as s:
                found = dict(s.execute(select(AiTask.id, AiTask.status).where(AiTask.id.in_(ids))).all())
            return found if all(v in ("failed", "completed") for v in found.values()) else None

        found = wait_for(statuses, timeout=60, message="both tasks final")
        assert found[ids[0]] == "failed"  # unreadable: failed, nothing was charged
        assert found[ids[1]] != "pending"  # the other was re-sent and ran
        with e2e_db() as s:
            assert s.scalar(select(AiTask.error_code).where(AiTask.id == ids[0])) == "unprocessable_task"

    def test_a_user_whose_period_was_already_granted_does_not_stop_the_others(self, e2e_db, e2e_worker, e2e_queue):
        from datetime import timedelta

        from models import Transaction, User
        from models.base import utcnow
        from models.credits import post_entry

        with e2e_db() as s:
            good, odd = make_user(s), make_user(s)
            due = utcnow() - timedelta(days=1)
            for user in (good, odd):
                user.credit_reset_at = due
            # The odd user's monthly grant for that period already exists: a second one would
            # collide with the unique (user, type, period) index. The batch goes on, and that
            # user's date moves on without a second grant.
            post_entry(s, odd.id, type="monthly_reset", plan_delta=1, period=due.date())
            s.commit()
            good_id, odd_id = good.id, odd.id
        e2e_queue.celery.send_task("maintenance.reset_monthly_credits")

        def reset_done():
            with e2e_db() as s:
                return s.get(User, good_id).credit_reset_at > utcnow()

        wait_for(reset_done, timeout=60, message="the good user's reset")
        with e2e_db() as s:
            assert s.get(User, odd_id).credit_reset_at > utcnow()
            grants = s.scalars(select(Transaction.plan_delta).where(Transaction.user_id == odd_id,
                                                                   Transaction.type == "monthly_reset")).all()
            assert grants == [1]  # the one that was there


# --- the database goes away ----------------------------------------------------------------------

@pytest.fixture
def own_postgres(settings, make_token, tmp_path):
    base = Path(tempfile.mkdtemp(prefix="studiox-pgdown-"))
    pg = start_postgres(base / "pg")
    try:
        migrate(pg.url)
        yield pg
    finally:
        with contextlib.suppress(Exception):  # the test may have stopped it already
            pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_the_database_down_is_503_not_500(own_postgres, e2e_settings, make_token, tmp_path):
    settings = isolated_broker(e2e_settings.with_(database_url=own_postgres.url), ISOLATED_REDIS_DB)
    web = Gunicorn(worker_env(settings), workers=1, log_path=tmp_path / "gunicorn.log").start()
    try:
        headers = bearer(make_token())
        assert web.request("POST", "/api/users/initialize", headers=headers)[0] == 201
        assert web.request("GET", "/api/users/me", headers=headers)[0] == 200
        own_postgres.stop()
        for path in ("/api/users/me", "/api/tasks", "/api/users/credits"):
            status, head, payload = web.request("GET", path, headers=headers)
            assert status == 503, payload
            body = json.loads(payload)
            assert body == {"error": body["error"], "statusCode": 503, "code": "database_unavailable"}
            assert head.get("retry-after") == "5"
    finally:
        web.stop()
