"""The billing rules in `models/`, one transaction each (rolled back after the test): what
the database itself refuses (invariants 4 and 7 hold even against a buggy caller), and the
rules reached other than by a first delivery (the same invoice or session in a second
event, an operator's replay)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from models import CreditPack, Purchase, Subscription
from models.billing import BillingContext
from models.credits import post_entry
from models.purchases import apply_dispute, apply_refund, fulfil_checkout, record_purchase
from models.subscriptions import apply_invoice_paid, apply_subscription
from tests.support.builders import make_user

CTX = BillingContext(prices={"pro": "price_pro", "enterprise": "price_enterprise"})


@pytest.fixture
def buyer(session):
    user = make_user(session)
    user.stripe_customer_id = f"cus_{user.id.hex[:12]}"
    session.flush()
    return user


def paid(session, user, credits_pack="credits_100", session_id="cs_rules", intent="pi_rules", amount=500):
    record_purchase(session, user.id, session.get(CreditPack, credits_pack), session_id)
    assert fulfil_checkout(session, {"id": session_id, "payment_status": "paid", "payment_intent": intent,
                                     "amount_total": amount, "currency": "usd"}) == "credits_granted"
    return session.query(Purchase).filter_by(stripe_session_id=session_id).one()


def invoice(user, invoice_id="in_rules", reason="subscription_cycle", price="price_pro", sub="sub_rules"):
    now = int(time.time())
    return {"id": invoice_id, "customer": user.stripe_customer_id, "billing_reason": reason,
            "parent": {"subscription_details": {"subscription": sub}},
            "lines": {"data": [{"period": {"start": now, "end": now + 2592000},
                                "pricing": {"price_details": {"price": price}}}]}}


class TestTheDatabaseRefuses:
    def test_a_second_grant_of_one_session(self, session, buyer):
        purchase = paid(session, buyer)
        with pytest.raises(IntegrityError), session.begin_nested():
            post_entry(session, buyer.id, type="credit_purchase", purchased_delta=100, purchase_id=purchase.id,
                       stripe_object_id="cs_rules")

    def test_a_clawback_without_its_purchase(self, session, buyer):
        paid(session, buyer)
        with pytest.raises(IntegrityError), session.begin_nested():
            post_entry(session, buyer.id, type="credit_clawback", purchased_delta=-1, stripe_object_id="dp_1")

    def test_taking_back_more_than_was_granted(self, session, buyer):
        purchase = paid(session, buyer)
        with pytest.raises(IntegrityError), session.begin_nested():
            session.execute(update(Purchase).where(Purchase.id == purchase.id).values(credits_taken_back=60,
                                                                                      shortfall=41))

    def test_reinstating_more_than_a_dispute_took(self, session, buyer):
        purchase = paid(session, buyer)
        with pytest.raises(IntegrityError), session.begin_nested():
            session.execute(update(Purchase).where(Purchase.id == purchase.id).values(
                dispute_claim=10, dispute_taken=10, dispute_reinstated=11))


class TestRulesReachedTwice:
    def test_one_invoice_in_two_events_starts_one_period(self, session, buyer):
        assert apply_invoice_paid(session, invoice(buyer), CTX, event_id="evt_a") == "period_started"
        assert apply_invoice_paid(session, invoice(buyer), CTX, event_id="evt_b") == "period_already_started"
        session.refresh(buyer)
        assert (buyer.plan_id, buyer.plan_credits, buyer.stripe_subscription_id) == ("pro", 500, "sub_rules")

    def test_a_session_fulfilled_twice_grants_once(self, session, buyer):
        paid(session, buyer)
        again = {"id": "cs_rules", "payment_status": "paid", "payment_intent": "pi_rules", "amount_total": 500}
        assert fulfil_checkout(session, again) == "already_fulfilled"
        session.refresh(buyer)
        assert buyer.purchased_credits == 100

    def test_a_dispute_replayed_takes_once_and_a_reinstatement_replayed_gives_once(self, session, buyer):
        paid(session, buyer)
        dispute = {"id": "dp_rules", "payment_intent": "pi_rules", "amount": 500, "status": "needs_response"}
        for _ in range(2):
            apply_dispute(session, dispute, event_type="charge.dispute.created")
        session.refresh(buyer)
        assert buyer.purchased_credits == 0
        for _ in range(2):
            apply_dispute(session, {**dispute, "status": "won"}, event_type="charge.dispute.funds_reinstated")
        session.refresh(buyer)
        assert buyer.purchased_credits == 100

    def test_a_refund_after_a_won_dispute_takes_its_share(self, session, buyer):
        paid(session, buyer)
        dispute = {"id": "dp_won", "payment_intent": "pi_rules", "amount": 500, "status": "needs_response"}
        apply_dispute(session, dispute, event_type="charge.dispute.created")
        apply_dispute(session, {**dispute, "status": "won"}, event_type="charge.dispute.closed")
        assert apply_refund(session, {"id": "ch_rules", "payment_intent": "pi_rules", "amount": 500,
                                      "amount_refunded": 500}) == "credits_taken_back"
        session.refresh(buyer)
        assert buyer.purchased_credits == 0

    def test_a_refund_share_rounds_down(self, session, buyer):
        paid(session, buyer)
        apply_refund(session, {"id": "ch_rules", "payment_intent": "pi_rules", "amount": 500, "amount_refunded": 333})
        session.refresh(buyer)
        assert buyer.purchased_credits == 100 - 66  # floor(100 * 333 / 500)


class TestRenewalInvoices:
    def test_the_period_comes_from_the_subscription_line_not_a_proration(self, session, buyer):
        renewal = invoice(buyer, price="price_pro")
        proration = {**renewal["lines"]["data"][0], "pricing": {"price_details": {"price": "price_enterprise"}},
                     "parent": {"subscription_item_details": {"proration": True}}}
        renewal["lines"]["data"].insert(0, proration)  # "unused time on Enterprise" first
        assert apply_invoice_paid(session, renewal, CTX) == "period_started"
        session.refresh(buyer)
        assert (buyer.plan_id, buyer.plan_credits) == ("pro", 500)


class TestSubscriptionOrder:
    def _subscription(self, user, price="price_pro", status="active", cancel=False):
        now = int(time.time())
        return {"id": "sub_order", "customer": user.stripe_customer_id, "status": status,
                "cancel_at_period_end": cancel,
                "items": {"data": [{"id": "si_1", "price": {"id": price}, "current_period_start": now,
                                    "current_period_end": now + 2592000}]}}

    def test_an_older_state_is_stale_and_a_newer_one_applies(self, session, buyer):
        assert apply_subscription(session, self._subscription(buyer, cancel=True), CTX, as_of=2000) != "stale"
        assert apply_subscription(session, self._subscription(buyer, cancel=False), CTX, as_of=1000) == "stale"
        assert session.get(Subscription, "sub_order").cancel_at_period_end is True
        apply_subscription(session, self._subscription(buyer, cancel=False), CTX, as_of=3000)
        assert session.get(Subscription, "sub_order").cancel_at_period_end is False

    def test_deleted_moves_the_holder_to_free_and_beat_serves_them_from_now(self, session, buyer):
        apply_invoice_paid(session, invoice(buyer, sub="sub_order"), CTX, event_id="evt_1")
        apply_subscription(session, self._subscription(buyer), CTX, as_of=1000)
        assert apply_subscription(session, self._subscription(buyer, status="canceled"), CTX, as_of=2000,
                                  deleted=True) == "subscription_ended"
        session.refresh(buyer)
        assert (buyer.plan_id, buyer.stripe_subscription_id) == ("free", None)
        # A late invoice of the ended subscription starts nothing.
        assert apply_invoice_paid(session, invoice(buyer, "in_late", sub="sub_order"), CTX) == \
            "subscription_already_ended"


class TestCoalescedApplyJob:
    """The webhook's apply job is coalesced by the sender: a burst of stored events costs one
    message, and a commit after that message is due gets a new one (nothing is left behind)."""

    def test_a_burst_sends_one_job_and_a_later_commit_another(self, settings):
        import redis

        from tasktypes import APPLY_STRIPE_EVENTS_JOB
        from tests.support.env import isolated_broker
        from worker.queue import TaskQueue, create_celery

        isolated = isolated_broker(settings, 6)
        queue = TaskQueue(create_celery(isolated))
        broker = redis.Redis.from_url(isolated.broker_url)
        for _ in range(50):
            queue.send(APPLY_STRIPE_EVENTS_JOB, "")
        assert broker.llen("maintenance") == 1
        time.sleep(TaskQueue.COALESCE_SECONDS * 1.5)
        queue.send(APPLY_STRIPE_EVENTS_JOB, "")
        assert broker.llen("maintenance") == 2
