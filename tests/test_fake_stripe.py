"""The stand-in for Stripe's servers that the billing tests use: the real `stripe` library
talks to it, and its webhook signatures verify exactly as Stripe's do."""

from __future__ import annotations

import json
import time

import pytest
import stripe

from tests.support.fake_stripe import FakeStripe, sign

SECRET = "whsec_test_" + "s" * 24


@pytest.fixture
def fake():
    server = FakeStripe().start()
    yield server
    server.stop()


@pytest.fixture
def client(fake) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_fake", base_addresses={"api": fake.url}, max_network_retries=0)


class TestTheRealLibraryTalksToIt:
    def test_customer_and_checkout_session_round_trip(self, fake, client):
        customer = client.v1.customers.create(params={"email": "a@example.com", "metadata": {"user_id": "u1"}})
        session = client.v1.checkout.sessions.create(params={
            "mode": "payment", "customer": customer.id, "client_reference_id": "u1",
            "line_items": [{"quantity": 1, "price_data": {"currency": "usd", "unit_amount": 900,
                                                          "product_data": {"name": "500 credits"}}}],
            "metadata": {"user_id": "u1", "pack": "p500"},
            "success_url": "http://frontend.test/ok", "cancel_url": "http://frontend.test/no",
        }, options={"idempotency_key": "purchase-1"})
        assert session.id.startswith("cs_") and session.url and session.payment_status == "unpaid"
        assert session.metadata["pack"] == "p500" and session.amount_total == 900
        again = client.v1.checkout.sessions.create(params={"mode": "payment"}, options={"idempotency_key": "purchase-1"})
        assert again.id == session.id  # a retried create with the same key is the same session
        fake.pay_session(session.id)
        paid = client.v1.checkout.sessions.retrieve(session.id)
        assert paid.payment_status == "paid" and paid.payment_intent.startswith("pi_")

    def test_events_are_listed_newest_first_since_a_time(self, fake, client):
        old = fake.event("invoice.paid", {"id": "in_1"}, created=1000)
        new = fake.event("invoice.paid", {"id": "in_2"}, created=2000)
        listed = client.v1.events.list(params={"created": {"gt": 1500}})
        assert [e.id for e in listed.data] == [new["id"]] and old["id"] not in [e.id for e in listed.data]

    def test_a_call_the_fake_does_not_serve_fails_loudly(self, client):
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.products.create(params={"name": "x"})


class TestSignatures:
    def test_a_delivery_verifies_with_stripes_own_check(self, fake):
        event = fake.event("checkout.session.completed", {"id": "cs_1"})
        body, headers = fake.delivery(event, SECRET)
        verified = stripe.Webhook.construct_event(body, headers["Stripe-Signature"], SECRET)
        assert verified.id == event["id"] and verified.type == "checkout.session.completed"

    @pytest.mark.parametrize("header", [
        lambda body: sign(body, "whsec_wrong"),
        lambda body: sign(body, SECRET, timestamp=int(time.time()) - 3600),
        lambda body: "t=1,v1=deadbeef",
    ], ids=["wrong-secret", "stale", "garbage"])
    def test_what_stripe_refuses_it_refuses(self, header):
        body = json.dumps({"id": "evt_1", "object": "event"}).encode()
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(body, header(body), SECRET)
