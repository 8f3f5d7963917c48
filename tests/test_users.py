"""/api/users (profile, credits, ledger pages, initialize), the public plan list, and /health."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from falcon import testing
from sqlalchemy import func, select

from api.app import create_app
from models import Plan, Transaction, User
from models.credits import post_entry
from models.db import create_engine
from tasktypes import TASK_TYPES
from tests.support.builders import make_task_row
from tests.support.concurrency import at_once
from tests.support.http import bearer, sign_up
from worker.queue import TaskQueue, create_celery

ERROR_KEYS = {"error", "statusCode", "code"}


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class TestMe:
    def test_me_returns_the_callers_profile_in_camel_case(self, client, make_token):
        sub = f"user_{uuid.uuid4().hex[:8]}"
        headers, _ = sign_up(client, make_token(sub), email="ada@example.com", name="Ada")
        result = client.simulate_get("/api/users/me", headers=headers)
        assert result.status_code == 200
        user = result.json["user"]
        assert user["clerkId"] == sub
        assert user["email"] == "ada@example.com" and user["name"] == "Ada"
        assert user["planId"] == "free"
        assert user["credits"] == user["planCredits"] + user["purchasedCredits"]
        assert {"id", "createdAt", "creditResetAt"} <= set(user)

    def test_me_for_unknown_user_is_404_user_not_found(self, client, make_token):
        result = client.simulate_get("/api/users/me", headers=bearer(make_token()))
        assert result.status_code == 404
        assert set(result.json) == ERROR_KEYS and result.json["code"] == "user_not_found"


class TestCredits:
    def test_credits_show_buckets_reservations_and_next_reset(self, client, make_token, session):
        headers, user = sign_up(client, make_token())
        user_id = uuid.UUID(user["id"])
        post_entry(session, user_id, type="credit_purchase", purchased_delta=7, stripe_event_id=f"evt_{uuid.uuid4().hex}")
        make_task_row(session, user_id, status="pending", credits=3)
        make_task_row(session, user_id, status="pending", credits=2, task_type="advanced_editing")
        make_task_row(session, user_id, status="processing", credits=4)  # charged already; not a reservation
        make_task_row(session, user_id, status="completed", credits=1)
        session.commit()

        result = client.simulate_get("/api/users/credits", headers=headers)
        assert result.status_code == 200
        body = result.json
        free = session.get(Plan, "free")
        assert body["planCredits"] == free.monthly_credits
        assert body["purchasedCredits"] == 7
        assert body["credits"] == free.monthly_credits + 7
        assert body["reserved"] == 5
        assert body["available"] == body["credits"] - 5
        next_reset = parse_time(body["nextResetAt"])
        now = datetime.now(timezone.utc)
        assert now + timedelta(days=27) < next_reset < now + timedelta(days=32)

    def test_available_never_goes_below_zero(self, client, make_token, session):
        headers, user = sign_up(client, make_token())
        user_id = uuid.UUID(user["id"])
        post_entry(session, user_id, type="admin_adjustment", plan_delta=-user["planCredits"] + 1)
        make_task_row(session, user_id, status="pending", credits=3)
        session.commit()
        body = client.simulate_get("/api/users/credits", headers=headers).json
        assert body["credits"] == 1 and body["reserved"] == 3 and body["available"] == 0


class TestTransactions:
    ROWS = 30

    @pytest.fixture
    def ledger(self, client, make_token, session):
        """A user with the signup grant and 30 more ledger rows; their ids newest first."""
        headers, user = sign_up(client, make_token())
        user_id = uuid.UUID(user["id"])
        for n in range(self.ROWS):
            if n % 3 == 2:
                post_entry(session, user_id, type="admin_adjustment", plan_delta=-1, description=f"row {n}")
            else:
                post_entry(session, user_id, type="admin_adjustment", purchased_delta=n + 1, description=f"row {n}")
        session.commit()
        ids = list(session.scalars(select(Transaction.id).where(Transaction.user_id == user_id)
                                   .order_by(Transaction.id.desc())))
        assert len(ids) == self.ROWS + 1
        return headers, user_id, ids

    def test_newest_first_with_default_page(self, client, ledger):
        headers, _, ids = ledger
        body = client.simulate_get("/api/users/transactions", headers=headers).json
        page = [int(t["id"]) for t in body["transactions"]]
        assert page == ids[:20]
        assert body["nextCursor"] is not None
        newest = body["transactions"][0]
        assert newest["description"] == f"row {self.ROWS - 1}"
        assert {"amount", "bucket", "balanceAfter", "type", "taskId", "createdAt"} <= set(newest)

    @pytest.mark.parametrize("limit", [1, 7, 31, 100])
    def test_cursor_pages_have_no_duplicates_or_gaps(self, client, ledger, limit):
        headers, _, ids = ledger
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
            result = client.simulate_get("/api/users/transactions", headers=headers, params=params)
            assert result.status_code == 200, result.text
            page = result.json["transactions"]
            assert len(page) <= limit
            seen += [int(t["id"]) for t in page]
            pages += 1
            cursor = result.json["nextCursor"]
            if cursor is None:
                break
            assert len(page) == limit
        assert seen == ids  # every row once, newest first
        assert pages == -(-len(ids) // limit)

    def test_balance_after_follows_the_ledger(self, client, ledger):
        headers, _, _ = ledger
        rows = client.simulate_get("/api/users/transactions", headers=headers, params={"limit": 100}).json["transactions"]
        running = 0
        for row in reversed(rows):
            running += row["amount"]
            assert row["balanceAfter"] == running

    def test_another_users_ledger_is_not_listed(self, client, make_token, ledger):
        _, _, ids = ledger
        other_headers, _ = sign_up(client, make_token())
        rows = client.simulate_get("/api/users/transactions", headers=other_headers,
                                   params={"limit": 100, "cursor": str(2**63 - 1)}).json["transactions"]
        assert len(rows) == 1 and rows[0]["type"] == "signup_grant"
        assert int(rows[0]["id"]) not in ids

    @pytest.mark.parametrize("cursor", ["abc", "-5", "1.5", "²", "١٢", "9" * 40, str(2**63), " 12"])
    def test_invalid_cursor_is_400(self, client, ledger, cursor):
        headers, _, _ = ledger
        result = client.simulate_get("/api/users/transactions", headers=headers, params={"cursor": cursor})
        assert result.status_code == 400, result.text
        assert set(result.json) - {"details"} == ERROR_KEYS and result.json["code"] == "invalid_cursor"

    @pytest.mark.parametrize("limit", ["0", "101", "-1", "ten"])
    def test_invalid_limit_is_400(self, client, ledger, limit):
        headers, _, _ = ledger
        result = client.simulate_get("/api/users/transactions", headers=headers, params={"limit": limit})
        assert result.status_code == 400
        assert result.json["code"] == "invalid_limit"


class TestInitialize:
    def test_initialize_creates_a_free_user_with_the_signup_grant(self, client, make_token, session):
        headers, user = sign_up(client, make_token())
        free = session.get(Plan, "free")
        assert user["planId"] == "free"
        assert user["credits"] == user["planCredits"] == free.monthly_credits
        rows = session.scalars(select(Transaction).where(Transaction.user_id == uuid.UUID(user["id"]))).all()
        assert [(r.type, r.amount, r.balance_after) for r in rows] == [("signup_grant", free.monthly_credits, free.monthly_credits)]

    def test_second_initialize_returns_the_same_user_without_a_second_grant(self, client, make_token, session):
        headers, user = sign_up(client, make_token())
        again = client.simulate_post("/api/users/initialize", headers=headers)
        assert again.status_code == 200
        assert again.json["created"] is False
        assert again.json["user"]["id"] == user["id"]
        assert again.json["user"]["credits"] == user["credits"]
        assert session.scalar(select(func.count()).select_from(Transaction)
                              .where(Transaction.user_id == uuid.UUID(user["id"]))) == 1

    @pytest.mark.parametrize("body", [{"email": 5}, {"name": "x" * 256}, {"name": ["a"]}])
    def test_invalid_profile_fields_are_400(self, client, make_token, body):
        result = client.simulate_post("/api/users/initialize", headers=bearer(make_token()), json=body)
        assert result.status_code == 400
        assert set(result.json) - {"details"} == ERROR_KEYS

    def test_twenty_concurrent_initializations_create_one_user_and_one_grant(self, e2e_client, e2e_db, make_token):
        sub = f"user_{uuid.uuid4().hex[:12]}"
        headers = bearer(make_token(sub))
        results = at_once(20, lambda _: e2e_client.simulate_post("/api/users/initialize", headers=headers))
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200] * 19 + [201], [r.text for r in results if r.status_code >= 400]
        assert len({r.json["user"]["id"] for r in results}) == 1

        with e2e_db() as s:
            users = s.scalars(select(User).where(User.clerk_id == sub)).all()
            assert len(users) == 1
            grants = s.scalars(select(Transaction).where(Transaction.user_id == users[0].id)).all()
            assert [g.type for g in grants] == ["signup_grant"]
            free = s.get(Plan, "free")
            assert users[0].credits == users[0].plan_credits == free.monthly_credits == grants[0].amount


class TestUpgradePlan:
    def test_upgrade_without_billing_is_503_billing_not_configured(self, client, user_headers):
        result = client.simulate_post("/api/users/upgrade-plan", headers=user_headers, json={"planId": "pro"})
        assert result.status_code == 503
        assert set(result.json) - {"details"} == ERROR_KEYS
        assert result.json["code"] == "billing_not_configured"

    def test_upgrade_needs_a_token(self, client):
        assert client.simulate_post("/api/users/upgrade-plan", json={"planId": "pro"}).status_code == 401


class TestPlans:
    def test_plans_are_public_and_list_the_three_plans(self, client):
        result = client.simulate_get("/api/billing/plans")
        assert result.status_code == 200
        plans = {p["id"]: p for p in result.json["plans"]}
        assert list(plans) == ["free", "pro", "enterprise"]
        for plan in plans.values():
            assert isinstance(plan["monthlyCredits"], int) and plan["monthlyCredits"] >= 0
            assert isinstance(plan["price"], (int, float)) and plan["price"] >= 0
            assert set(plan["allowedTaskTypes"]) <= set(TASK_TYPES) and plan["allowedTaskTypes"]
            assert isinstance(plan["maxConcurrentTasks"], int) and plan["maxConcurrentTasks"] > 0
        assert plans["free"]["price"] == 0
        assert plans["free"]["monthlyCredits"] < plans["pro"]["monthlyCredits"] < plans["enterprise"]["monthlyCredits"]
        assert set(result.json["taskCosts"]) == set(TASK_TYPES)

    def test_plans_match_the_database(self, client, session):
        listed = {p["id"]: p for p in client.simulate_get("/api/billing/plans").json["plans"]}
        for plan in session.scalars(select(Plan)):
            assert listed[plan.id]["monthlyCredits"] == plan.monthly_credits
            assert listed[plan.id]["maxConcurrentTasks"] == plan.max_concurrent_tasks
            assert listed[plan.id]["allowedTaskTypes"] == list(plan.allowed_task_types)


CLOSED_PORT_DB = "postgresql+psycopg://studiox@127.0.0.1:1/studiox"
CLOSED_PORT_BROKER = "redis://127.0.0.1:1/0"


class TestHealth:
    def test_health_is_ok_without_auth(self, client):
        result = client.simulate_get("/health")
        assert result.status_code == 200
        assert result.json["status"] == "ok"

    def test_health_reuses_pooled_broker_connections(self, client, settings):
        import redis as redis_lib

        stats = redis_lib.Redis.from_url(settings.broker_url)
        before = stats.info("stats")["total_connections_received"]
        for _ in range(20):
            assert client.simulate_get("/health").status_code == 200
        assert stats.info("stats")["total_connections_received"] - before <= 3

    def test_health_is_503_when_the_broker_is_down(self, settings, engine, session_factory):
        queue = TaskQueue(create_celery(settings.with_(broker_url=CLOSED_PORT_BROKER)))
        client = testing.TestClient(create_app(settings, engine=engine, session_factory=session_factory, queue=queue))
        result = client.simulate_get("/health")
        assert result.status_code == 503
        assert ERROR_KEYS == set(result.json) and result.json["statusCode"] == 503
        assert "broker" in result.json["error"] and "database" not in result.json["error"]

    def test_health_is_503_when_the_database_is_down(self, settings, session_factory, task_queue):
        down = create_engine(CLOSED_PORT_DB, connect_args={"connect_timeout": 2})
        try:
            client = testing.TestClient(create_app(settings, engine=down, session_factory=session_factory, queue=task_queue))
            result = client.simulate_get("/health")
        finally:
            down.dispose()
        assert result.status_code == 503
        assert ERROR_KEYS == set(result.json) and result.json["statusCode"] == 503
        assert "database" in result.json["error"] and "broker" not in result.json["error"]


class TestSignupWithoutAGrant:
    def test_a_plan_that_grants_nothing_still_sets_the_first_reset_date(self, session, monkeypatch):
        import models.plans
        from models.credits import initialize_user

        session.execute(Plan.__table__.update().where(Plan.id == "free").values(monthly_credits=0))
        monkeypatch.setattr(models.plans, "_PLAN_CACHE", {})
        user, created = initialize_user(session, f"u_{uuid.uuid4().hex[:10]}")
        assert created and user.credits == 0 and user.credit_reset_at is not None
        session.expire_all()
        assert session.get(User, user.id).credit_reset_at is not None
