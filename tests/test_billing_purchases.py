"""Credit packs through Stripe Checkout, end to end: the API creates the session, the fake
Stripe (on loopback, driven by the real `stripe` library) takes the payment, the webhook
stores the events and a real worker applies them. Invariants 1, 2, 4 and 7 after each."""

from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import func, select

from models import Purchase, StripeEvent, User
from models.credits import post_entry
from models.db import session_scope
from tests.support.billing import (
    OLD_SECRET,
    SECRET,
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
from tests.support.concurrency import at_once
from tests.support.fake_stripe import sign
from tests.support.http import sign_up
from tests.support.workers import wait_for

pytestmark = pytest.mark.e2e
__all__ = ["billing_client", "billing_queue", "billing_settings", "billing_worker", "fake", "member"]  # fixtures


def buy(client, headers, pack="credits_100", **extra_headers) -> dict:
    result = client.simulate_post("/api/billing/purchase-credits", json={"pack": pack},
                                  headers={**headers, **extra_headers})
    assert result.status_code == 201, result.text
    return result.json


def purchase_row(db, session_id) -> Purchase:
    with db() as s:
        return s.scalar(select(Purchase).where(Purchase.stripe_session_id == session_id))


def spend_purchased(db, user_id, amount):
    """Credits spent from the purchased bucket (as tasks would once the plan bucket is empty)."""
    with session_scope(db) as s:
        post_entry(s, user_id, type="admin_adjustment", purchased_delta=-amount, description="spent")


def paid_purchase(client, fake, db, headers, pack="credits_100"):
    checkout = buy(client, headers, pack)
    deliver(client, fake.pay_session(checkout["sessionId"]))
    settle(db)
    purchase = purchase_row(db, checkout["sessionId"])
    assert purchase.status == "paid"
    return purchase


class TestCheckout:
    def test_a_purchase_starts_a_checkout_session_for_the_pack_and_grants_nothing(self, billing_client, fake, e2e_db,
                                                                                 member):
        headers, user_id = member
        checkout = buy(billing_client, headers, "credits_500", **{"Idempotency-Key": "click-1"})
        assert checkout["url"].startswith(fake.url) and checkout["sessionId"].startswith("cs_")
        session = fake.sessions[checkout["sessionId"]]
        assert session["mode"] == "payment" and session["client_reference_id"] == str(user_id)
        assert session["metadata"] == {"user_id": str(user_id), "pack_id": "credits_500", "credits": "500"}
        assert session["amount_total"] == 2000 and session["currency"] == "usd"  # inline price_data
        assert session["success_url"].startswith("http://frontend.test/billing/success")
        assert session["cancel_url"].startswith("http://frontend.test/")
        user = user_row(e2e_db, user_id)
        assert user.stripe_customer_id == session["customer"] and user.purchased_credits == 0
        assert purchase_row(e2e_db, checkout["sessionId"]).status == "pending"
        # The same click retried is the same session (Stripe's idempotency key).
        again = buy(billing_client, headers, "credits_500", **{"Idempotency-Key": "click-1"})
        assert again["sessionId"] == checkout["sessionId"]
        with e2e_db() as s:
            assert s.scalar(select(func.count()).select_from(Purchase)) == 1

    def test_an_unknown_pack_is_a_400(self, billing_client, member):
        result = billing_client.simulate_post("/api/billing/purchase-credits", json={"pack": "credits_7"},
                                              headers=member[0])
        assert result.status_code == 400 and result.json["code"] == "unknown_pack"

    def test_the_webhook_grants_the_pack_once_and_records_the_payment(self, billing_client, billing_worker, fake,
                                                                     e2e_db, member):
        headers, user_id = member
        purchase = paid_purchase(billing_client, fake, e2e_db, headers)
        user = user_row(e2e_db, user_id)
        assert user.purchased_credits == 100 and user.plan_credits == 20
        assert purchase.payment_intent.startswith("pi_") and purchase.amount_paid == 500 and purchase.currency == "usd"
        history = billing_client.simulate_get("/api/billing/history", headers=headers).json
        assert [e["kind"] for e in history["entries"]] == ["purchase"]
        assert history["entries"][0]["purchase"]["status"] == "paid"
        assert_invariants(e2e_db)

    def test_one_completed_event_delivered_fifty_times_at_once_credits_once(self, billing_client, billing_worker,
                                                                            fake, e2e_db, member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        event = fake.pay_session(checkout["sessionId"])
        results = at_once(50, lambda _: deliver(billing_client, event).json)
        assert sum(not r["duplicate"] for r in results) == 1
        settle(e2e_db)
        with e2e_db() as s:
            assert len(entries(s, user_id, "credit_purchase")) == 1
            assert s.get(User, user_id).purchased_credits == 100
            assert s.scalar(select(StripeEvent.attempts).where(StripeEvent.id == event["id"])) == 1
        assert outcome(e2e_db, event["id"]) == "credits_granted"
        assert_invariants(e2e_db)

    def test_the_success_page_and_the_webhook_racing_credit_once(self, billing_client, billing_worker, fake, e2e_db,
                                                                 member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        event = fake.pay_session(checkout["sessionId"])
        sync_path = f"/api/billing/purchases/{checkout['sessionId']}/sync"

        def race(i):
            if i % 2:
                return deliver(billing_client, event).status_code
            result = billing_client.simulate_post(sync_path, headers=headers)
            assert result.status_code == 200, result.text
            return result.json["outcome"]

        results = at_once(20, race)
        settle(e2e_db)
        granted = [r for r in results if r == "credits_granted"]
        with e2e_db() as s:
            assert len(entries(s, user_id, "credit_purchase")) == 1
            assert s.get(User, user_id).purchased_credits == 100
        assert len(granted) + (outcome(e2e_db, event["id"]) == "credits_granted") == 1
        assert_invariants(e2e_db)

    def test_the_success_page_grants_before_the_webhook_arrives(self, billing_client, billing_worker, fake, e2e_db,
                                                               member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        event = fake.pay_session(checkout["sessionId"])
        synced = billing_client.simulate_post(f"/api/billing/purchases/{checkout['sessionId']}/sync", headers=headers)
        assert synced.json["outcome"] == "credits_granted" and synced.json["credits"] == 120
        deliver(billing_client, event)
        settle(e2e_db)
        assert outcome(e2e_db, event["id"]) == "already_fulfilled"
        assert user_row(e2e_db, user_id).purchased_credits == 100

    def test_another_users_session_is_not_found(self, billing_client, fake, member, make_token):
        checkout = buy(billing_client, member[0])
        other, _ = sign_up(billing_client, make_token())
        result = billing_client.simulate_post(f"/api/billing/purchases/{checkout['sessionId']}/sync", headers=other)
        assert result.status_code == 404 and result.json["code"] == "purchase_not_found"

    def test_an_unpaid_session_synced_grants_nothing(self, billing_client, member):
        checkout = buy(billing_client, member[0])
        synced = billing_client.simulate_post(f"/api/billing/purchases/{checkout['sessionId']}/sync",
                                              headers=member[0])
        assert synced.json["outcome"] == "awaiting_payment" and synced.json["purchase"]["status"] == "pending"

    def test_a_completed_session_we_did_not_create_grants_nothing(self, billing_client, billing_worker, fake, e2e_db,
                                                                   member):
        _, user_id = member
        stranger = fake._create_session({"mode": "payment", "metadata": {"user_id": str(user_id), "credits": "9999"},
                                         "client_reference_id": str(user_id)})
        event = fake.pay_session(stranger["id"])
        deliver(billing_client, event)
        settle(e2e_db)
        assert outcome(e2e_db, event["id"]) == "unknown_session"
        assert user_row(e2e_db, user_id).purchased_credits == 0

    def test_an_expired_session_closes_the_purchase_with_nothing_granted(self, billing_client, billing_worker, fake,
                                                                         e2e_db, member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        deliver(billing_client, fake.expire_session(checkout["sessionId"]))
        settle(e2e_db)
        assert purchase_row(e2e_db, checkout["sessionId"]).status == "expired"
        assert user_row(e2e_db, user_id).purchased_credits == 0

    def test_a_delayed_payment_is_granted_when_it_succeeds(self, billing_client, billing_worker, fake, e2e_db, member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        session = fake.sessions[checkout["sessionId"]]
        session.update(status="complete", payment_status="unpaid")
        deliver(billing_client, fake.event("checkout.session.completed", session))
        settle(e2e_db)
        assert user_row(e2e_db, user_id).purchased_credits == 0
        session.update(payment_status="paid", payment_intent="pi_delayed")
        deliver(billing_client, fake.event("checkout.session.async_payment_succeeded", session))
        settle(e2e_db)
        assert user_row(e2e_db, user_id).purchased_credits == 100


class TestRefundsAndDisputes:
    def test_a_refund_after_part_was_spent_empties_the_bucket_and_records_the_rest(self, billing_client,
                                                                                  billing_worker, fake, e2e_db, member):
        headers, user_id = member
        purchase = paid_purchase(billing_client, fake, e2e_db, headers)
        spend_purchased(e2e_db, user_id, 70)
        for event in fake.refund(fake.charge_of(purchase.payment_intent)["id"], 500):
            deliver(billing_client, event)
        settle(e2e_db)
        purchase = purchase_row(e2e_db, purchase.stripe_session_id)
        assert (purchase.credits_taken_back, purchase.shortfall, purchase.amount_refunded) == (30, 70, 500)
        assert user_row(e2e_db, user_id).purchased_credits == 0
        with e2e_db() as s:
            assert [e.amount for e in entries(s, user_id, "credit_clawback")] == [-30]
        assert_invariants(e2e_db)

    def test_two_partial_refunds_take_only_their_new_part_in_any_order(self, billing_client, billing_worker, fake,
                                                                      e2e_db, member):
        headers, user_id = member
        purchase = paid_purchase(billing_client, fake, e2e_db, headers)
        charge = fake.charge_of(purchase.payment_intent)["id"]
        first = fake.refund(charge, 200)  # 40% of the price: 40 credits
        second = fake.refund(charge, 100)  # 60% in all: 20 more
        for event in second + first + second:  # the later state first, then a redelivery
            deliver(billing_client, event)
        settle(e2e_db)
        purchase = purchase_row(e2e_db, purchase.stripe_session_id)
        assert purchase.credits_taken_back == 60 and purchase.shortfall == 0
        assert user_row(e2e_db, user_id).purchased_credits == 40
        assert_invariants(e2e_db)

    def test_partial_refunds_in_order_take_each_new_part(self, billing_client, billing_worker, fake, e2e_db, member):
        headers, user_id = member
        purchase = paid_purchase(billing_client, fake, e2e_db, headers)
        charge = fake.charge_of(purchase.payment_intent)["id"]
        for amount in (200, 100):
            for event in fake.refund(charge, amount):
                deliver(billing_client, event)
            settle(e2e_db)
        with e2e_db() as s:
            assert [e.amount for e in entries(s, user_id, "credit_clawback")] == [-40, -20]
        assert_invariants(e2e_db)

    def test_a_dispute_takes_the_credits_back_and_a_won_dispute_gives_back_exactly_that(self, billing_client,
                                                                                         billing_worker, fake, e2e_db,
                                                                                         member):
        headers, user_id = member
        purchase = paid_purchase(billing_client, fake, e2e_db, headers)
        spend_purchased(e2e_db, user_id, 25)
        opened = fake.dispute(fake.charge_of(purchase.payment_intent)["id"])
        deliver(billing_client, opened)
        deliver(billing_client, fake.event("charge.dispute.funds_withdrawn", opened["data"]["object"]))
        settle(e2e_db)
        taken = purchase_row(e2e_db, purchase.stripe_session_id)
        assert (taken.dispute_taken, taken.shortfall, taken.dispute_state) == (75, 25, "open")
        assert user_row(e2e_db, user_id).purchased_credits == 0
        won = fake.close_dispute(opened["data"]["object"]["id"], won=True)
        for event in won + won:
            deliver(billing_client, event)
        settle(e2e_db)
        back = purchase_row(e2e_db, purchase.stripe_session_id)
        assert (back.dispute_reinstated, back.credits_taken_back, back.shortfall, back.dispute_state) == (
            75, 0, 0, "reinstated")
        assert user_row(e2e_db, user_id).purchased_credits == 75
        with e2e_db() as s:
            assert [e.amount for e in entries(s, user_id, "credit_reinstated")] == [75]
        assert_invariants(e2e_db)

    def test_a_lost_dispute_is_final(self, billing_client, billing_worker, fake, e2e_db, member):
        headers, user_id = member
        purchase = paid_purchase(billing_client, fake, e2e_db, headers)
        dispute = fake.dispute(fake.charge_of(purchase.payment_intent)["id"])
        deliver(billing_client, dispute)
        for event in fake.close_dispute(dispute["data"]["object"]["id"], won=False):
            deliver(billing_client, event)
        settle(e2e_db)
        lost = purchase_row(e2e_db, purchase.stripe_session_id)
        assert lost.dispute_state == "lost" and lost.credits_taken_back == 100
        assert user_row(e2e_db, user_id).purchased_credits == 0
        assert_invariants(e2e_db)

    def test_refunds_and_redeliveries_applied_at_once_take_back_exactly_the_refunded_share(
            self, billing_client, billing_worker, fake, e2e_db, member):
        headers, user_id = member
        purchase = paid_purchase(billing_client, fake, e2e_db, headers)
        charge = fake.charge_of(purchase.payment_intent)["id"]
        events = [event for amount in (50, 120, 30, 100) for event in fake.refund(charge, amount)]
        # Every delivery three times, all at once: 300 of 500 cents refunded is 60 credits.
        at_once(len(events) * 3, lambda i: deliver(billing_client, events[i % len(events)]))
        settle(e2e_db)
        refunded = purchase_row(e2e_db, purchase.stripe_session_id)
        assert (refunded.amount_refunded, refunded.credits_taken_back, refunded.shortfall) == (300, 60, 0)
        assert user_row(e2e_db, user_id).purchased_credits == 40
        assert_invariants(e2e_db)

    def test_a_refund_that_overtakes_the_payments_event_is_not_lost(self, billing_client, billing_worker, fake,
                                                                     e2e_db, member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        completed = fake.pay_session(checkout["sessionId"])
        charge = fake.charge_of(fake.sessions[checkout["sessionId"]]["payment_intent"])["id"]
        refunded = fake.refund(charge, 500)[1]
        deliver(billing_client, refunded)  # before the payment's own event
        settle(e2e_db)
        assert outcome(e2e_db, refunded["id"]) == "credits_taken_back"
        deliver(billing_client, completed)
        settle(e2e_db)
        assert outcome(e2e_db, completed["id"]) == "already_fulfilled"
        purchase = purchase_row(e2e_db, checkout["sessionId"])
        assert (purchase.status, purchase.credits_taken_back) == ("paid", 100)
        assert user_row(e2e_db, user_id).purchased_credits == 0
        assert_invariants(e2e_db)

    def test_a_refund_then_a_dispute_never_take_more_than_the_grant(self, billing_client, billing_worker, fake,
                                                                    e2e_db, member):
        headers, user_id = member
        purchase = paid_purchase(billing_client, fake, e2e_db, headers)
        charge = fake.charge_of(purchase.payment_intent)["id"]
        for event in fake.refund(charge, 250):
            deliver(billing_client, event)
        deliver(billing_client, fake.dispute(charge))
        settle(e2e_db)
        both = purchase_row(e2e_db, purchase.stripe_session_id)
        assert both.refund_claim + both.dispute_claim == 100 and both.credits_taken_back == 100
        assert_invariants(e2e_db)


class TestWebhookRefusals:
    """Refused deliveries are a 400 in the error shape, and nothing is stored."""

    def _post(self, client, body: bytes, headers: dict):
        return client.simulate_post("/api/billing/webhook", body=body, headers=headers)

    @pytest.mark.parametrize("case", ["bad-signature", "stale", "wrong-secret", "malformed", "missing-header",
                                      "not-an-event", "not-utf8", "huge-created", "long-id", "garbage-header",
                                      "non-ascii-signature"])
    def test_refused_and_nothing_stored(self, billing_client, fake, e2e_db, case):
        event = fake.event("checkout.session.completed", {"id": "cs_nope", "payment_status": "paid"})
        body = json.dumps(event).encode()
        headers = {"Stripe-Signature": sign(body, SECRET), "Content-Type": "application/json"}
        if case == "bad-signature":
            headers["Stripe-Signature"] = sign(body + b" ", SECRET)
        elif case == "stale":
            headers["Stripe-Signature"] = sign(body, SECRET, timestamp=int(time.time()) - 3600)
        elif case == "wrong-secret":
            headers["Stripe-Signature"] = sign(body, "whsec_somebody_else")
        elif case == "malformed":
            body = b'{"id": "evt_1", "type": '
            headers["Stripe-Signature"] = sign(body, SECRET)
        elif case == "missing-header":
            del headers["Stripe-Signature"]
        elif case == "not-an-event":
            body = b"[1, 2, 3]"
            headers["Stripe-Signature"] = sign(body, SECRET)
        elif case == "not-utf8":
            body = b'{"id": "\xff\xfe"}'
            headers["Stripe-Signature"] = sign(body, SECRET)
        elif case in ("huge-created", "long-id"):
            # Signed, so only a leaked secret could send it: still a 400, never a 500.
            body = json.dumps({**event, "created": 10**30} if case == "huge-created"
                              else {**event, "id": "evt_" + "x" * 10_000}).encode()
            headers["Stripe-Signature"] = sign(body, SECRET)
        elif case == "non-ascii-signature":
            headers["Stripe-Signature"] = f"t={int(time.time())},v1=\u00e9"
        elif case == "garbage-header":
            headers["Stripe-Signature"] = "t=abc,v1=\u00ff,,=="
        result = self._post(billing_client, body, headers)
        assert result.status_code == 400, result.text
        assert set(result.json) >= {"error", "statusCode", "code"} and result.json["statusCode"] == 400
        with e2e_db() as s:
            assert s.scalar(select(func.count()).select_from(StripeEvent)) == 0

    def test_an_event_signed_with_the_rolled_secret_is_accepted(self, billing_client, fake, e2e_db):
        event = fake.event("customer.created", {"id": "cus_rolled"})
        assert deliver(billing_client, event, secret=OLD_SECRET).json == {"received": True, "duplicate": False}

    def test_an_unknown_event_type_is_stored_and_acknowledged(self, billing_client, billing_worker, fake, e2e_db):
        event = fake.event("payout.paid", {"id": "po_1"})
        deliver(billing_client, event)
        settle(e2e_db)
        assert outcome(e2e_db, event["id"]) == "ignored"

    def test_an_event_of_the_other_mode_is_acknowledged_and_ignored(self, billing_client, billing_worker, fake,
                                                                    e2e_db, member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        event = fake.pay_session(checkout["sessionId"])
        event["livemode"] = True  # a live event reaching a test-mode deployment
        deliver(billing_client, event)
        settle(e2e_db)
        assert outcome(e2e_db, event["id"]) == "ignored_livemode"
        assert user_row(e2e_db, user_id).purchased_credits == 0


class TestWithoutStripe:
    @pytest.fixture
    def bare_client(self, e2e_settings, e2e_engine, e2e_db, billing_queue):
        from falcon import testing

        from api.app import create_app

        return testing.TestClient(create_app(e2e_settings, engine=e2e_engine, session_factory=e2e_db,
                                             queue=billing_queue))

    def test_stripe_routes_answer_503_and_the_rest_works(self, bare_client, make_token):
        headers, _ = sign_up(bare_client, make_token())
        for method, path in (("post", "/api/billing/purchase-credits"), ("post", "/api/billing/upgrade-plan"),
                             ("post", "/api/users/upgrade-plan"), ("post", "/api/billing/portal"),
                             ("post", "/api/billing/purchases/cs_1/sync")):
            body = {"pack": "credits_100"} if "purchase-credits" in path else {"planId": "pro"}
            result = getattr(bare_client, f"simulate_{method}")(path, headers=headers, json=body)
            assert result.status_code == 503 and result.json["code"] == "billing_not_configured", path
        webhook = bare_client.simulate_post("/api/billing/webhook", body=b"{}", headers={"Stripe-Signature": "t=1"})
        assert webhook.status_code == 503 and webhook.json["code"] == "billing_not_configured"
        plans = bare_client.simulate_get("/api/billing/plans").json
        assert [p["credits"] for p in plans["packs"]] == [100, 500, 2000]
        assert not any(p["purchasable"] for p in plans["plans"])
        assert bare_client.simulate_get("/api/billing/history", headers=headers).status_code == 200
        assert bare_client.simulate_get("/api/billing/next-date", headers=headers).json["kind"] == "reset"


class TestReconciliation:
    def test_a_webhook_that_never_arrived_is_applied_by_the_reconciliation(self, billing_client, billing_worker,
                                                                           billing_queue, fake, e2e_db, member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        lost = fake.pay_session(checkout["sessionId"])  # Stripe has it; we never get it
        billing_queue.celery.send_task("maintenance.reconcile_stripe")
        wait_for(lambda: outcome(e2e_db, lost["id"]) == "credits_granted", 30, message="the lost event applied")
        assert user_row(e2e_db, user_id).purchased_credits == 100
        assert_invariants(e2e_db)

    def test_a_whole_subscription_never_delivered_is_applied_in_stripes_order(self, billing_client, billing_worker,
                                                                             billing_queue, fake, e2e_db, member):
        headers, user_id = member
        answer = billing_client.simulate_post("/api/billing/upgrade-plan", json={"planId": "pro"}, headers=headers)
        fake.subscribe(answer.json["sessionId"])  # created, invoice paid, completed: none delivered
        billing_queue.celery.send_task("maintenance.reconcile_stripe")

        def subscribed():
            user = user_row(e2e_db, user_id)
            return user.plan_id == "pro" and user.plan_credits == 500

        wait_for(subscribed, 30, message="the subscription applied from Stripe's event list")
        settle(e2e_db)
        assert_invariants(e2e_db)

    def test_an_event_that_fails_to_apply_is_applied_by_the_retry(self, billing_client, billing_worker,
                                                                  billing_queue, fake, e2e_db, member):
        headers, user_id = member
        checkout = buy(billing_client, headers)
        event = fake.pay_session(checkout["sessionId"])
        refund = fake.refund(fake.charge_of(fake.sessions[checkout["sessionId"]]["payment_intent"])["id"], 500)[0]
        # refund.created re-reads its charge from Stripe; Stripe does not know it for now.
        charge_id = refund["data"]["object"]["charge"]
        hidden = fake.charges.pop(charge_id)
        deliver(billing_client, event)
        deliver(billing_client, refund)

        def failed_once():
            with e2e_db() as s:
                row = s.get(StripeEvent, refund["id"], populate_existing=True)
                return row is not None and row.attempts >= 1 and row.handled_at is None and row.last_error

        wait_for(failed_once, 30, message="the failed apply recorded")
        fake.charges[charge_id] = hidden
        billing_queue.celery.send_task("maintenance.reconcile_stripe")
        wait_for(lambda: outcome(e2e_db, refund["id"]) == "credits_taken_back", 30, message="the retry applied it")
        assert user_row(e2e_db, user_id).purchased_credits == 0
        assert_invariants(e2e_db)
