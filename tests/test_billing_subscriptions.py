"""A subscription's whole life through Stripe's events, in Stripe's order and out of it:
created, paid, upgraded (top-up once), renewed (a new period once, the old plan credits
expired), past_due (no new period), paid late, cancelled at period end, deleted. Beat's
monthly reset never grants a subscriber's period (invariant 5)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from models import Subscription, User, utcnow
from models.resets import reset_due_users, reset_plan_credits
from models.db import session_scope
from tests.support.billing import (
    assert_invariants,
    billing_client,
    billing_queue,
    billing_settings,
    billing_worker,
    deliver,
    entries,
    fake,
    member,
    outcome,
    settle,
    user_row,
)
from tests.support.http import sign_up

pytestmark = pytest.mark.e2e
__all__ = ["billing_client", "billing_queue", "billing_settings", "billing_worker", "fake", "member"]  # fixtures


def change_plan(client, headers, plan_id) -> dict:
    result = client.simulate_post("/api/billing/upgrade-plan", json={"planId": plan_id}, headers=headers)
    assert result.status_code == 200, result.text
    return result.json


def deliver_all(client, db, events):
    for event in events:
        deliver(client, event)
    settle(db)


def subscribe(client, fake, db, headers, plan="pro") -> tuple[str, list[dict]]:
    answer = change_plan(client, headers, plan)
    assert answer["action"] == "checkout" and answer["effective"] == "after_payment"
    session = fake.sessions[answer["sessionId"]]
    assert session["mode"] == "subscription" and session["line_items_"] == [{"price": f"price_{plan}", "quantity": "1"}]
    events = fake.subscribe(answer["sessionId"])
    return fake.sessions[answer["sessionId"]]["subscription"], events


def new_events(fake, since: int) -> list[dict]:
    return fake.events[since:]


class TestSubscriptionLife:
    def test_created_paid_upgraded_renewed_past_due_paid_late_cancelled_deleted(self, billing_client, billing_worker,
                                                                                fake, e2e_db, member):
        headers, user_id = member
        sub_id, started = subscribe(billing_client, fake, e2e_db, headers)
        user = user_row(e2e_db, user_id)
        assert user.plan_id == "free"  # nothing changes before Stripe says so
        deliver_all(billing_client, e2e_db, started)
        user = user_row(e2e_db, user_id)
        assert (user.plan_id, user.plan_credits, user.stripe_subscription_id) == ("pro", 500, sub_id)
        period_end = fake.subscriptions[sub_id]["items"]["data"][0]["current_period_end"]
        assert int(user.credit_reset_at.timestamp()) == period_end
        next_date = billing_client.simulate_get("/api/billing/next-date", headers=headers).json
        assert next_date["kind"] == "renewal" and next_date["subscriptionStatus"] == "active"

        # Some credits spent, then the upgrade: the plan bucket is topped up to 5,000 once.
        with session_scope(e2e_db) as s:
            from models.credits import post_entry

            post_entry(s, user_id, type="admin_adjustment", plan_delta=-200, description="spent")
        mark = len(fake.events)
        answer = change_plan(billing_client, headers, "enterprise")
        assert answer["action"] == "subscription_updated" and answer["effective"] == "now"
        upgrade = new_events(fake, mark)
        assert [e["type"] for e in upgrade] == ["customer.subscription.updated", "invoice.paid"]
        update_call = [params for method, path, params in fake.requests if path == f"/v1/subscriptions/{sub_id}"
                       and method == "POST"][-1]
        assert update_call["proration_behavior"] == "always_invoice"  # the upgrade is paid for at once
        deliver_all(billing_client, e2e_db, upgrade + upgrade)
        user = user_row(e2e_db, user_id)
        assert (user.plan_id, user.plan_credits) == ("enterprise", 5000)
        with e2e_db() as s:
            assert [e.amount for e in entries(s, user_id, "plan_upgrade")] == [4700]
        assert outcome(e2e_db, upgrade[1]["id"]) == "proration_ignored"

        # Renewal: the old period's plan credits expire and the new period is granted once.
        with session_scope(e2e_db) as s:
            post_entry(s, user_id, type="admin_adjustment", plan_delta=-1000, description="spent")
        renewal = fake.renew(sub_id)
        deliver_all(billing_client, e2e_db, renewal + renewal)
        user = user_row(e2e_db, user_id)
        assert user.plan_credits == 5000
        with e2e_db() as s:
            # The free plan's 20 expired when the subscription started; 4,000 of the 5,000 now.
            assert [e.amount for e in entries(s, user_id, "credit_expiry")] == [-20, -4000]
            assert [e.amount for e in entries(s, user_id, "monthly_reset")] == [500, 5000]

        # A renewal whose payment fails: past_due, no new period; purchased credits keep working.
        late = fake.renew(sub_id, paid=False)
        deliver_all(billing_client, e2e_db, late)
        with e2e_db() as s:
            assert s.get(Subscription, sub_id).status == "past_due"
            assert len(entries(s, user_id, "monthly_reset")) == 2
        invoice_id = late[1]["data"]["object"]["id"]
        deliver_all(billing_client, e2e_db, fake.pay_invoice(invoice_id))
        with e2e_db() as s:
            assert len(entries(s, user_id, "monthly_reset")) == 3
            assert s.get(Subscription, sub_id).status == "active"

        # Cancelled at period end: the plan stays until the end, then free.
        mark = len(fake.events)
        answer = change_plan(billing_client, headers, "free")
        assert answer["action"] == "cancel_at_period_end" and answer["effective"] == "period_end"
        deliver_all(billing_client, e2e_db, new_events(fake, mark))
        assert user_row(e2e_db, user_id).plan_id == "enterprise"
        assert billing_client.simulate_get("/api/billing/next-date", headers=headers).json["cancelAtPeriodEnd"] is True
        deliver_all(billing_client, e2e_db, fake.renew(sub_id))
        user = user_row(e2e_db, user_id)
        assert (user.plan_id, user.stripe_subscription_id) == ("free", None)
        with e2e_db() as s:
            # Beat serves them again, from now: the paid leftovers expire, free credits come.
            assert reset_plan_credits(s, user_id)
            s.commit()
        assert user_row(e2e_db, user_id).plan_credits == 20

        # The audit finds nothing wrong in the whole life (the beat reset after the end included).
        from models.audit import run_checks

        with e2e_db() as s:
            assert list(run_checks(s)) == []
        history = billing_client.simulate_get("/api/billing/history", headers=headers, params={"limit": 3}).json
        assert len(history["entries"]) == 3 and history["nextCursor"]
        rest = billing_client.simulate_get("/api/billing/history", headers=headers,
                                           params={"cursor": history["nextCursor"], "limit": 100}).json
        kinds = [e["kind"] for e in history["entries"] + rest["entries"]]
        assert kinds.count("subscription_period") == 3 and "plan_change" in kinds
        assert_invariants(e2e_db)

    def test_updated_before_created_ends_in_the_right_state(self, billing_client, billing_worker, fake, e2e_db,
                                                           member):
        headers, user_id = member
        sub_id, (created, paid, completed) = subscribe(billing_client, fake, e2e_db, headers)
        mark = len(fake.events)
        # Upgraded (in Stripe's portal, say) before any of its events reached us.
        fake._update_subscription(sub_id, {"items": [{"price": "price_enterprise"}]})
        updated, proration = new_events(fake, mark)
        # Stripe's clock: created is older than updated.
        created["created"] = updated["created"] - 5
        paid["created"] = created["created"]
        deliver_all(billing_client, e2e_db, [updated, completed, proration])
        deliver_all(billing_client, e2e_db, [created, paid])  # applied after updated, though older
        assert outcome(e2e_db, created["id"]) == "stale"
        with e2e_db() as s:
            record = s.get(Subscription, sub_id)
            assert (record.plan_id, record.status) == ("enterprise", "active")
            user = s.get(User, user_id)
            assert user.plan_id == "enterprise" and user.plan_credits == 5000
        assert_invariants(e2e_db)

    def test_an_older_state_never_moves_the_subscription_back(self, billing_client, billing_worker, fake, e2e_db,
                                                             member):
        headers, user_id = member
        sub_id, started = subscribe(billing_client, fake, e2e_db, headers)
        deliver_all(billing_client, e2e_db, started)
        mark = len(fake.events)
        change_plan(billing_client, headers, "free")
        (cancelling,) = new_events(fake, mark)
        stale = dict(started[0], id="evt_stale_copy", created=cancelling["created"] - 60)
        deliver_all(billing_client, e2e_db, [cancelling, stale])
        with e2e_db() as s:
            assert s.get(Subscription, sub_id).cancel_at_period_end is True
        assert outcome(e2e_db, "evt_stale_copy") == "stale"

    def test_a_dispute_on_a_subscription_payment_cancels_the_subscription(self, billing_client, billing_worker, fake,
                                                                         e2e_db, member):
        headers, user_id = member
        sub_id, started = subscribe(billing_client, fake, e2e_db, headers)
        deliver_all(billing_client, e2e_db, started)
        charge = next(c for c in fake.charges.values() if c["customer"] == fake.subscriptions[sub_id]["customer"])
        mark = len(fake.events)
        dispute = fake.dispute(charge["id"])
        deliver_all(billing_client, e2e_db, [dispute])
        assert outcome(e2e_db, dispute["id"]) == "subscription_cancelled"
        assert fake.subscriptions[sub_id]["status"] == "canceled"
        deliver_all(billing_client, e2e_db, [e for e in new_events(fake, mark) if e["type"].startswith("customer.")])
        assert user_row(e2e_db, user_id).plan_id == "free"
        assert_invariants(e2e_db)


class TestPlanRequests:
    def test_a_plan_without_a_stripe_price_cannot_be_bought(self, billing_client, billing_settings, e2e_engine,
                                                             e2e_db, billing_queue, make_token):
        from falcon import testing

        from api.app import create_app

        settings = billing_settings.with_(stripe_prices={"pro": "price_pro"})
        client = testing.TestClient(create_app(settings, engine=e2e_engine, session_factory=e2e_db,
                                               queue=billing_queue))
        headers, _ = sign_up(client, make_token())
        result = client.simulate_post("/api/billing/upgrade-plan", json={"planId": "enterprise"}, headers=headers)
        assert result.status_code == 400 and result.json["code"] == "plan_not_purchasable"
        unknown = client.simulate_post("/api/users/upgrade-plan", json={"planId": "platinum"}, headers=headers)
        assert unknown.status_code == 400 and unknown.json["code"] == "unknown_plan"
        plans = client.simulate_get("/api/billing/plans").json["plans"]
        assert {p["id"]: p["purchasable"] for p in plans} == {"free": False, "pro": True, "enterprise": False}

    def test_free_to_free_is_unchanged_and_the_portal_needs_a_customer(self, billing_client, member):
        headers, _ = member
        assert change_plan(billing_client, headers, "free")["action"] == "unchanged"
        portal = billing_client.simulate_post("/api/billing/portal", headers=headers)
        assert portal.status_code == 409 and portal.json["code"] == "no_billing_account"

    def test_the_portal_returns_stripes_url(self, billing_client, fake, member):
        headers, _ = member
        billing_client.simulate_post("/api/billing/purchase-credits", json={"pack": "credits_100"}, headers=headers)
        portal = billing_client.simulate_post("/api/billing/portal", headers=headers)
        assert portal.status_code == 200 and portal.json["url"].startswith(fake.url)


class TestBeatLeavesSubscribersToStripe:
    def test_a_subscriber_whose_reset_date_passed_is_not_reset_by_beat(self, billing_client, billing_worker, fake,
                                                                       e2e_db, member):
        headers, user_id = member
        _, started = subscribe(billing_client, fake, e2e_db, headers)
        deliver_all(billing_client, e2e_db, started)
        with session_scope(e2e_db) as s:
            s.execute(update(User).where(User.id == user_id).values(credit_reset_at=utcnow() - timedelta(days=1)))
        with session_scope(e2e_db) as s:
            assert reset_plan_credits(s, user_id) is False
            assert reset_due_users(s, limit=1000) == 0  # nobody else is due either
        with e2e_db() as s:
            assert len(entries(s, user_id, "monthly_reset")) == 1  # the invoice's only
