"""Billing under test: the fake Stripe on loopback, an API and a `maintenance` worker both
configured to talk to it, and the checks every billing scenario ends with.

Test modules import the fixtures they use from here (`from tests.support.billing import ...`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import MappingProxyType

import pytest
from falcon import testing
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from models import Purchase, StripeEvent, Transaction, User
from settings import Settings
from tests.support.env import isolated_broker, worker_env
from tests.support.fake_stripe import FakeStripe, sign
from tests.support.workers import CeleryWorker, wait_for
from worker.queue import TaskQueue, create_celery

SECRET = "whsec_test_" + "b" * 24
OLD_SECRET = "whsec_test_" + "a" * 24  # still accepted while the secret is rolled
PRICES = {"pro": "price_pro", "enterprise": "price_enterprise"}
BILLING_REDIS_DB = 5


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeStripe]:
    server = FakeStripe().start()
    server.prices.update({"price_pro": 1900, "price_enterprise": 9900})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def billing_settings(e2e_settings, fake) -> Settings:
    return isolated_broker(e2e_settings, BILLING_REDIS_DB).with_(
        stripe_secret_key="sk_test_fake", stripe_webhook_secrets=(SECRET, OLD_SECRET), stripe_api_base=fake.url,
        stripe_prices=MappingProxyType(dict(PRICES)),
    )


def billing_env(settings: Settings) -> dict[str, str]:
    return worker_env(settings, STRIPE_SECRET_KEY=settings.stripe_secret_key,
                      STRIPE_WEBHOOK_SECRET=",".join(settings.stripe_webhook_secrets),
                      STRIPE_API_BASE=settings.stripe_api_base,
                      **{f"STRIPE_PRICE_{plan.upper()}": price for plan, price in settings.stripe_prices.items()})


@pytest.fixture(scope="module")
def billing_queue(billing_settings) -> TaskQueue:
    return TaskQueue(create_celery(billing_settings))


@pytest.fixture(scope="module")
def billing_worker(billing_settings, billing_queue, tmp_path_factory) -> Iterator[CeleryWorker]:
    """A real worker on `maintenance`, applying Stripe's events against the fake."""
    log = tmp_path_factory.mktemp("billing-logs") / "worker.log"
    worker = CeleryWorker(billing_env(billing_settings), queues=("maintenance",), concurrency=4, log_path=log)
    worker.start(billing_queue.celery)
    yield worker
    worker.stop()


@pytest.fixture
def billing_client(billing_settings, e2e_engine, e2e_db, billing_queue) -> testing.TestClient:
    return testing.TestClient(create_app(billing_settings, engine=e2e_engine, session_factory=e2e_db,
                                         queue=billing_queue))


@pytest.fixture
def member(billing_client, make_token):
    """A signed-up user of the billing client: (headers, user id)."""
    import uuid

    from tests.support.http import sign_up

    headers, user = sign_up(billing_client, make_token(), email="member@example.com")
    return headers, uuid.UUID(user["id"])


def user_row(db: sessionmaker[Session], user_id) -> User:
    with db() as s:
        return s.get(User, user_id)


def deliver(client: testing.TestClient, event: dict, *, secret: str = SECRET) -> testing.Result:
    """POST one delivery of `event`, signed as Stripe signs it; 200 required."""
    body = json.dumps(event).encode()
    result = client.simulate_post("/api/billing/webhook", body=body,
                                  headers={"Stripe-Signature": sign(body, secret), "Content-Type": "application/json"})
    assert result.status_code == 200, result.text
    return result


def settle(db: sessionmaker[Session], *, expected: int | None = None, timeout: float = 30) -> None:
    """Wait until every stored event is handled (and at least `expected` are stored)."""
    def done():
        with db() as s:
            stored = s.scalar(select(func.count()).select_from(StripeEvent))
            waiting = s.scalar(select(func.count()).where(StripeEvent.handled_at.is_(None)))
        return waiting == 0 and (expected is None or stored >= expected)

    wait_for(done, timeout, message="every stored Stripe event to be applied")


def outcome(db: sessionmaker[Session], event_id: str) -> str | None:
    with db() as s:
        return s.scalar(select(StripeEvent.outcome).where(StripeEvent.id == event_id))


def entries(session: Session, user_id, type_: str) -> list[Transaction]:
    return list(session.scalars(select(Transaction).where(Transaction.user_id == user_id, Transaction.type == type_)
                                .order_by(Transaction.id)))


def assert_invariants(db: sessionmaker[Session]) -> None:
    """The design's money invariants over every user and purchase: balance = both buckets =
    ledger sum, nothing negative (1, 2), and what was taken back never exceeds a purchase's
    grant, nor a reinstatement what its dispute took (7)."""
    with db() as s:
        for user in s.scalars(select(User)):
            ledger = s.scalar(select(func.coalesce(func.sum(Transaction.amount), 0))
                              .where(Transaction.user_id == user.id))
            assert user.credits == user.plan_credits + user.purchased_credits == ledger, user.id
            assert user.plan_credits >= 0 and user.purchased_credits >= 0
        for purchase in s.scalars(select(Purchase)):
            taken = -s.scalar(select(func.coalesce(func.sum(Transaction.amount), 0)).where(
                Transaction.purchase_id == purchase.id, Transaction.type.in_(("credit_clawback", "credit_reinstated"))))
            assert taken == purchase.credits_taken_back
            assert purchase.credits_taken_back + purchase.shortfall <= purchase.credits
            assert purchase.dispute_reinstated <= purchase.dispute_taken
            granted = s.scalar(select(func.count()).where(Transaction.purchase_id == purchase.id,
                                                          Transaction.type == "credit_purchase"))
            assert granted == (1 if purchase.status == "paid" else 0)
        # And `studiox audit`'s checks, over everything.
        from models.audit import run_checks

        assert [f"{v.check}: {v.message}" for v in run_checks(s)] == []
        # Invariant 4: no Stripe object moved money twice (the unique key makes it so).
        assert s.execute(text("SELECT type, stripe_object_id FROM transactions WHERE stripe_object_id IS NOT NULL"
                              " GROUP BY 1, 2 HAVING count(*) > 1")).all() == []
