"""The tasks routes through falcon.testing against create_app: admission rules and shapes."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from models import AiTask, Transaction, User
from models.billing import change_plan
from models.credits import post_entry
from models.tasks import start_task
from tests.support.builders import make_task_row
from tests.support.http import bearer, sign_up
from tests.support.ledger import refunds

IMAGE = {"type": "image_analysis", "input": "https://example.com/cat.jpg"}


def create(client, headers, body=IMAGE, **kw):
    return client.simulate_post("/api/tasks/create", headers=headers, json=body, **kw)


@pytest.fixture
def me(client, user_headers, session):
    clerk_id = client.simulate_get("/api/users/me", headers=user_headers).json["user"]["clerkId"]
    return session.scalar(select(User).where(User.clerk_id == clerk_id))


class TestCreateTask:
    def test_created_task_is_pending_with_its_price_fixed(self, client, user_headers):
        r = create(client, user_headers)
        assert r.status_code == 201
        task = r.json["task"]
        assert task["status"] == "pending" and task["creditsUsed"] == 1 and task["queue"] == "image_analysis"
        assert task["progress"] == 0 and task["type"] == "image_analysis"

    def test_nothing_is_charged_at_submission_but_it_is_reserved(self, client, user_headers):
        create(client, user_headers)
        credits = client.simulate_get("/api/users/credits", headers=user_headers).json
        assert credits["credits"] == 20 and credits["reserved"] == 1 and credits["available"] == 19

    @pytest.mark.parametrize("body, code", [
        ({"type": "nope", "input": "x"}, "invalid_task_type"),
        ({"input": "x"}, "invalid_task_type"),
        ({"type": "image_analysis"}, "invalid_input"),
        ({"type": "image_analysis", "input": 12}, "invalid_input"),
        ({"type": "image_analysis", "input": "x", "params": [1]}, "invalid_params"),
        ({"type": "video_generation", "input": "x", "params": {"duration": -1}}, "invalid_params"),
        ({"type": "image_analysis", "input": "x", "params": []}, "invalid_params"),
        ({"type": "image_analysis", "input": "x", "params": ""}, "invalid_params"),
        ({"type": "image_analysis", "input": {"url": "file:///etc/passwd"}}, "invalid_input"),
        ({"type": "image_analysis", "input": "ftp://example.com/a.png"}, "invalid_input"),
    ])
    def test_invalid_request_is_400_with_a_code(self, client, user_headers, body, code):
        r = create(client, user_headers, body)
        assert r.status_code == 400, r.json
        assert r.json["code"] == code and r.json["statusCode"] == 400

    def test_another_users_upload_is_404_at_submission(self, client, user_headers):
        r = create(client, user_headers, {"type": "image_analysis", "input": str(uuid.uuid4())})
        assert r.status_code == 404 and r.json["code"] == "upload_not_found"

    def test_plan_must_allow_the_type(self, client, user_headers):
        r = create(client, user_headers, {"type": "video_generation", "input": "https://example.com/x.jpg", "params": {"duration": 2}})
        assert r.status_code == 403 and r.json["code"] == "plan_does_not_allow"

    def test_in_flight_tasks_are_capped_by_the_plan(self, client, user_headers):
        assert [create(client, user_headers).status_code for _ in range(2)] == [201, 201]
        r = create(client, user_headers)
        assert r.status_code == 429 and r.json["code"] == "too_many_tasks_in_flight"

    def test_available_credits_must_cover_the_cost(self, client, user_headers, me, session):
        change_plan(session, me.id, "pro")
        session.commit()
        # Pro grants 500; leave 7 and ask for a 4-second video (8 credits).
        post_entry(session, me.id, type="admin_adjustment", plan_delta=-(me.plan_credits - 7))
        session.commit()
        r = create(client, user_headers, {"type": "video_generation", "input": "https://example.com/x.jpg", "params": {"duration": 4}})
        assert r.status_code == 402 and r.json["code"] == "insufficient_credits"

    def test_pending_reservations_count_against_available(self, client, user_headers, me, session):
        post_entry(session, me.id, type="admin_adjustment", plan_delta=-(me.plan_credits - 3))
        session.commit()
        assert create(client, user_headers, {"type": "advanced_editing", "input": "https://example.com/x.jpg"}).status_code == 201  # 2
        r = create(client, user_headers, {"type": "advanced_editing", "input": "https://example.com/y.jpg"})  # 2 more, 1 left
        assert r.status_code == 402


class TestBodiesPostgreSQLCannotStore:
    @pytest.mark.parametrize("body, code", [
        ('{"type": "image_analysis", "input": "https://x.test/a\\u0000.png"}', "invalid_input"),
        ('{"type": "image_analysis", "input": "https://x.test/a.png", "params": {"k": "\\ud800"}}', "invalid_input"),
        ('{"type": "image_analysis", "input": "https://x.test/a.png", "params": {"q": NaN}}', "invalid_json"),
        ('{"type": "image_analysis", "input": "https://x.test/a.png", "params": {"q": -Infinity}}', "invalid_json"),
        ("[" * 100_000 + "]" * 100_000, "json_too_deep"),
    ])
    def test_refused_with_400_not_500(self, client, user_headers, body, code):
        r = client.simulate_post("/api/tasks/create", headers={**user_headers, "Content-Type": "application/json"},
                                 body=body)
        assert r.status_code == 400 and r.json["code"] == code, r.json

    def test_initialize_refuses_a_nul_in_the_name(self, client, make_token):
        r = client.simulate_post("/api/users/initialize", headers=bearer(make_token()),
                                 body='{"name": "a\\u0000b"}', content_type="application/json")
        assert r.status_code == 400 and r.json["code"] == "invalid_input"


class TestIdempotencyKey:
    def test_same_key_same_body_returns_the_same_task(self, client, user_headers, session):
        headers = {**user_headers, "Idempotency-Key": "abc-1"}
        first, second = create(client, headers), create(client, headers)
        assert first.status_code == 201 and second.status_code == 200
        assert first.json["task"]["id"] == second.json["task"]["id"]
        assert second.headers.get("Idempotent-Replayed") == "true"
        assert session.scalar(select(AiTask).where(AiTask.idempotency_key == "abc-1")) is not None

    def test_same_key_different_body_is_409(self, client, user_headers):
        headers = {**user_headers, "Idempotency-Key": "abc-2"}
        assert create(client, headers).status_code == 201
        r = create(client, headers, {**IMAGE, "input": "https://example.com/dog.jpg"})
        assert r.status_code == 409 and r.json["code"] == "idempotency_key_reused"

    def test_keys_are_per_user(self, client, user_headers, make_token):
        other, _ = sign_up(client, make_token())
        a = create(client, {**user_headers, "Idempotency-Key": "shared"})
        b = create(client, {**other, "Idempotency-Key": "shared"})
        assert a.status_code == b.status_code == 201 and a.json["task"]["id"] != b.json["task"]["id"]


class TestReadTasks:
    def test_another_users_task_is_404_not_403(self, client, user_headers, make_token):
        tid = create(client, user_headers).json["task"]["id"]
        other, _ = sign_up(client, make_token())
        for call in (client.simulate_get(f"/api/tasks/{tid}", headers=other),
                     client.simulate_patch(f"/api/tasks/{tid}/cancel", headers=other)):
            assert call.status_code == 404 and call.json["code"] == "task_not_found"
        assert client.simulate_get(f"/api/tasks/{tid}", headers=user_headers).status_code == 200

    def test_malformed_id_is_404(self, client, user_headers):
        assert client.simulate_get("/api/tasks/not-a-uuid", headers=user_headers).status_code == 404

    def test_list_pages_newest_first_with_filters(self, client, user_headers, me, session):
        for i in range(7):
            make_task_row(session, me.id, task_type="image_analysis" if i % 2 else "advanced_editing",
                          status="completed" if i < 5 else "failed", input=f"in-{i}")
        session.commit()
        seen, cursor = [], None
        while True:
            r = client.simulate_get("/api/tasks", headers=user_headers,
                                    params={"limit": 3, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200
            seen += [t["input"] for t in r.json["tasks"]]
            cursor = r.json["nextCursor"]
            if not cursor:
                break
        assert seen == [f"in-{i}" for i in reversed(range(7))]
        failed = client.simulate_get("/api/tasks", headers=user_headers, params={"status": "failed"}).json["tasks"]
        assert {t["input"] for t in failed} == {"in-5", "in-6"}
        edits = client.simulate_get("/api/tasks", headers=user_headers, params={"type": "advanced_editing"}).json
        assert len(edits["tasks"]) == 4

    @pytest.mark.parametrize("params", [{"status": "nope"}, {"type": "nope"}, {"cursor": "!!"}, {"limit": "0"},
                                        {"limit": "x"}])
    def test_bad_list_parameters_are_400(self, client, user_headers, params):
        r = client.simulate_get("/api/tasks", headers=user_headers, params=params)
        assert r.status_code == 400 and set(r.json) - {"details"} == {"error", "statusCode", "code"}

    def test_stats_count_by_status_and_type_and_credits(self, client, user_headers, me, session):
        create(client, user_headers)
        tid = uuid.UUID(create(client, user_headers, {**IMAGE, "input": "https://example.com/b.jpg"}).json["task"]["id"])
        start_task(session, tid)
        session.commit()
        client.simulate_patch(f"/api/tasks/{tid}/cancel", headers=user_headers)
        stats = client.simulate_get("/api/tasks/stats", headers=user_headers).json
        assert stats["total"] == 2
        assert stats["byStatus"]["pending"] == 1 and stats["byStatus"]["cancelled"] == 1
        assert stats["byType"]["image_analysis"] == 2
        assert stats["creditsSpent"] == 1 and stats["creditsRefunded"] == 1 and stats["netCreditsSpent"] == 0


class TestCancel:
    def test_cancel_pending_refunds_nothing_because_nothing_was_charged(self, client, user_headers, session):
        tid = create(client, user_headers).json["task"]["id"]
        r = client.simulate_patch(f"/api/tasks/{tid}/cancel", headers=user_headers)
        assert r.status_code == 200 and r.json["task"]["status"] == "cancelled"
        assert session.scalars(select(Transaction).where(Transaction.task_id == uuid.UUID(tid))).all() == []

    def test_cancel_processing_refunds_the_charge(self, client, user_headers, session):
        tid = uuid.UUID(create(client, user_headers).json["task"]["id"])
        assert start_task(session, tid) is not None
        session.commit()
        assert client.simulate_get("/api/users/credits", headers=user_headers).json["credits"] == 19
        r = client.simulate_patch(f"/api/tasks/{tid}/cancel", headers=user_headers)
        assert r.json["task"]["status"] == "cancelled"
        assert client.simulate_get("/api/users/credits", headers=user_headers).json["credits"] == 20

    def test_cancel_twice_is_409_and_refunds_once(self, client, user_headers, session):
        tid = uuid.UUID(create(client, user_headers).json["task"]["id"])
        start_task(session, tid)
        session.commit()
        client.simulate_patch(f"/api/tasks/{tid}/cancel", headers=user_headers)
        r = client.simulate_patch(f"/api/tasks/{tid}/cancel", headers=user_headers)
        assert r.status_code == 409 and r.json["code"] == "task_already_final"
        assert len(refunds(session, tid)) == 1


class TestAdminStatus:
    @pytest.fixture
    def admin(self, make_token):
        return bearer(make_token(role="admin"))

    def test_operator_fails_a_processing_task_which_refunds(self, client, user_headers, admin, session):
        tid = uuid.UUID(create(client, user_headers).json["task"]["id"])
        start_task(session, tid)
        session.commit()
        r = client.simulate_patch(f"/api/tasks/{tid}/status", headers=admin, json={"status": "failed", "error": "ops"})
        assert r.status_code == 200 and r.json["task"]["status"] == "failed"
        assert r.json["task"]["errorCode"] == "failed_by_operator"
        assert client.simulate_get("/api/users/credits", headers=user_headers).json["credits"] == 20

    def test_operator_cannot_mark_work_completed(self, client, user_headers, admin):
        tid = create(client, user_headers).json["task"]["id"]
        r = client.simulate_patch(f"/api/tasks/{tid}/status", headers=admin, json={"status": "completed"})
        assert r.status_code == 409 and r.json["code"] == "invalid_transition"

    def test_operator_requeues_a_pending_task(self, client, user_headers, admin):
        tid = create(client, user_headers).json["task"]["id"]
        r = client.simulate_patch(f"/api/tasks/{tid}/status", headers=admin, json={"status": "pending"})
        assert r.status_code == 200 and r.json["task"]["status"] == "pending"

    def test_users_are_not_operators(self, client, user_headers):
        tid = create(client, user_headers).json["task"]["id"]
        r = client.simulate_patch(f"/api/tasks/{tid}/status", headers=user_headers, json={"status": "failed"})
        assert r.status_code == 403
