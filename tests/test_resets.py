"""Monthly resets, set-based (models/resets.py): the same ledger rows as a per-user reset,
each user's own anchor day, once per period whoever runs it and however many at once."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text, update

from models import Transaction, User, utcnow
from models.audit import run_checks
from models.credits import ledger_sum, post_entry
from models.db import session_scope
from models.resets import add_months, reset_due_users, reset_plan_credits
from tests.support.builders import make_user
from tests.support.concurrency import at_once
from worker.jobs import reset_due


def at(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def due_at(session, user_id, moment: datetime, day: int | None = None) -> None:
    session.execute(update(User).where(User.id == user_id).values(credit_reset_at=moment,
                                                                   credit_reset_day=day or moment.day))


def entries(session, user_id, *types) -> list[Transaction]:
    return list(session.scalars(select(Transaction).where(Transaction.user_id == user_id, Transaction.type.in_(types))
                                .order_by(Transaction.id)))


class TestOneReset:
    def test_expires_the_plan_bucket_and_grants_the_plan_keeping_purchased_credits(self, session):
        user = make_user(session, plan="pro", plan_credits=37, purchased=5)
        due_at(session, user.id, at(2027, 3, 10, 9, 30))
        assert reset_due_users(session, limit=10, now=at(2027, 3, 10, 9, 45)) == 1
        user = session.get(User, user.id, populate_existing=True)
        assert (user.plan_credits, user.purchased_credits) == (500, 5)
        expiry, grant = entries(session, user.id, "credit_expiry", "monthly_reset")
        assert (expiry.type, expiry.amount, expiry.plan_delta, expiry.bucket, expiry.balance_after) == (
            "credit_expiry", -37, -37, "plan", 5)
        assert (grant.type, grant.amount, grant.balance_after) == ("monthly_reset", 500, 505)
        assert expiry.period == grant.period == at(2027, 3, 10).date()
        assert grant.description == "Monthly credits for the Pro plan"
        assert expiry.description == "Unused plan credits expired"
        assert user.credits == ledger_sum(session, user.id)
        assert user.credit_reset_at == at(2027, 4, 10, 9, 30)

    def test_an_empty_plan_bucket_writes_no_expiry(self, session):
        user = make_user(session, plan="free", plan_credits=0)
        due_at(session, user.id, at(2027, 3, 10))
        assert reset_due_users(session, limit=10, now=at(2027, 3, 11)) == 1
        assert [e.type for e in entries(session, user.id, "credit_expiry", "monthly_reset")] == ["monthly_reset"]

    def test_not_due_and_stripe_subscribers_are_left_alone(self, session):
        later = make_user(session)
        subscriber = make_user(session)
        due_at(session, later.id, at(2027, 3, 12))
        due_at(session, subscriber.id, at(2027, 3, 1))
        session.execute(update(User).where(User.id == subscriber.id).values(stripe_subscription_id="sub_x"))
        assert reset_due_users(session, limit=10, now=at(2027, 3, 11)) == 0

    def test_a_second_run_in_the_same_period_does_nothing(self, session):
        user = make_user(session)
        due_at(session, user.id, at(2027, 3, 10))
        assert reset_plan_credits(session, user.id, now=at(2027, 3, 10, 1))
        assert not reset_plan_credits(session, user.id, now=at(2027, 3, 10, 2))
        assert len(entries(session, user.id, "monthly_reset")) == 1

    def test_a_period_already_reset_moves_the_date_without_a_second_reset(self, session):
        # Only a subscription ending on the day of a beat reset makes this: the date moves on.
        user = make_user(session)
        due_at(session, user.id, at(2027, 3, 10))
        assert reset_plan_credits(session, user.id, now=at(2027, 3, 10, 1))
        due_at(session, user.id, at(2027, 3, 10, 18))  # the same period's date again
        assert reset_plan_credits(session, user.id, now=at(2027, 3, 10, 19))
        assert len(entries(session, user.id, "monthly_reset")) == 1
        assert session.get(User, user.id, populate_existing=True).credit_reset_at == at(2027, 4, 10, 18)


class TestAnchor:
    @pytest.mark.parametrize("anchor, steps", [
        (31, [at(2027, 1, 31, 10), at(2027, 2, 28, 10), at(2027, 3, 31, 10), at(2027, 4, 30, 10),
              at(2027, 5, 31, 10)]),
        (30, [at(2028, 1, 30, 8), at(2028, 2, 29, 8), at(2028, 3, 30, 8)]),  # a leap year's February
        (29, [at(2027, 12, 29), at(2028, 1, 29), at(2028, 2, 29), at(2028, 3, 29)]),
        (15, [at(2027, 11, 15, 23, 59), at(2027, 12, 15, 23, 59), at(2028, 1, 15, 23, 59)]),
    ])
    def test_each_reset_moves_one_period_on_from_the_users_own_anchor(self, session, anchor, steps):
        user = make_user(session)
        due_at(session, user.id, steps[0], day=anchor)
        for current, following in zip(steps, steps[1:]):
            assert reset_plan_credits(session, user.id, now=current + timedelta(minutes=5))
            assert session.get(User, user.id, populate_existing=True).credit_reset_at == following
        periods = [e.period for e in entries(session, user.id, "monthly_reset")]
        assert periods == [step.date() for step in steps[:-1]]

    def test_a_user_away_for_three_months_gets_one_reset_and_the_next_date_ahead(self, session):
        user = make_user(session, plan_credits=3)
        due_at(session, user.id, at(2027, 1, 31, 10), day=31)
        now = at(2027, 5, 2, 12)
        assert reset_plan_credits(session, user.id, now=now)
        assert not reset_plan_credits(session, user.id, now=now)
        assert session.get(User, user.id, populate_existing=True).credit_reset_at == at(2027, 5, 31, 10)
        assert len(entries(session, user.id, "monthly_reset")) == 1

    def test_a_date_off_its_anchor_moves_to_the_anchor_of_the_next_month_not_later_this_month(self, session):
        # E.g. a period paid by Stripe ended on the 27th and the anchor is still the 31st.
        user = make_user(session)
        due_at(session, user.id, at(2027, 11, 27, 3, 5), day=31)
        assert reset_plan_credits(session, user.id, now=at(2027, 11, 27, 3, 6))
        assert session.get(User, user.id, populate_existing=True).credit_reset_at == at(2027, 12, 31, 3, 5)

    def test_a_sign_up_on_the_31st_is_anchored_on_the_31st(self):
        from models.resets import start_monthly_resets

        user = User()
        start_monthly_resets(user, now=at(2027, 1, 31, 7))
        assert (user.credit_reset_at, user.credit_reset_day) == (at(2027, 2, 28, 7), 31)
        assert add_months(at(2027, 1, 31), 13) == at(2028, 2, 29)


# --- committed data: batches, locks, concurrency ----------------------------------------------


def make_due_users(db, n: int, *, plan: str = "free") -> list[uuid.UUID]:
    """`n` users due a minute ago, made in bulk through the real sign-up."""
    with session_scope(db) as s:
        ids = [make_user(s, plan=plan).id for _ in range(n)]
        s.execute(update(User).where(User.id.in_(ids)).values(credit_reset_at=utcnow() - timedelta(minutes=1)))
    return ids


def assert_each_reset_once(db, ids) -> None:
    with db() as s:
        resets = dict(s.execute(select(Transaction.user_id, func.count()).where(
            Transaction.type == "monthly_reset").group_by(Transaction.user_id)).all())
        assert {resets.get(i, 0) for i in ids} == {1}
        assert s.scalar(select(func.count()).where(User.id.in_(ids), User.credit_reset_at <= utcnow())) == 0
        # Each user's newest ledger row carries their balance (the rows were written in order).
        last = s.execute(text(
            "SELECT DISTINCT ON (user_id) user_id, balance_after FROM transactions ORDER BY user_id, id DESC")).all()
        credits = dict(s.execute(select(User.id, User.credits)).all())
        assert [user_id for user_id, balance in last if credits[user_id] != balance] == []
        assert list(run_checks(s)) == []


@pytest.mark.e2e
class TestBatches:
    def test_batches_cover_every_due_user_once(self, e2e_db):
        ids = make_due_users(e2e_db, 250)
        assert reset_due(e2e_db, limit=100, batch=40) == {"done": 100, "skipped": 0}
        assert reset_due(e2e_db, batch=40) == {"done": 150, "skipped": 0}
        assert reset_due(e2e_db, batch=40) == {"done": 0, "skipped": 0}
        assert_each_reset_once(e2e_db, ids)

    def test_a_user_another_transaction_holds_is_skipped_and_reset_by_the_next_run(self, e2e_db, e2e_engine):
        ids = make_due_users(e2e_db, 5)
        with e2e_engine.connect() as holder:
            with holder.begin():
                holder.execute(select(User.id).where(User.id == ids[0]).with_for_update())
                assert reset_due(e2e_db)["done"] == 4  # no wait on the held row
        assert reset_due(e2e_db)["done"] == 1
        assert_each_reset_once(e2e_db, ids)

    def test_eight_runs_at_once_split_the_work_and_reset_each_user_once(self, e2e_db):
        ids = make_due_users(e2e_db, 600)
        done = at_once(8, lambda _: reset_due(e2e_db, batch=25)["done"])
        assert sum(done) == 600
        assert_each_reset_once(e2e_db, ids)

    def test_runs_racing_with_spending_keep_every_balance_right(self, e2e_db):
        from models.credits import spend_credits

        ids = make_due_users(e2e_db, 200)
        stop = threading.Event()

        def spend(i):
            spent = 0
            while not stop.is_set() and spent < 30:
                with session_scope(e2e_db) as s:
                    spend_credits(s, ids[(i * 37 + spent) % len(ids)], 1, type="admin_adjustment")
                spent += 1
            return spent

        def reset(_):
            return reset_due(e2e_db, batch=10)["done"]

        results = at_once(8, lambda i: spend(i) if i < 4 else reset(i))
        stop.set()
        assert sum(results[4:]) == 200
        assert_each_reset_once(e2e_db, ids)

    def test_purchased_credits_survive_a_reset(self, e2e_db):
        with session_scope(e2e_db) as s:
            user = make_user(s, plan="pro", purchased=40)
            post_entry(s, user.id, type="admin_adjustment", plan_delta=-100)
            s.execute(update(User).where(User.id == user.id).values(credit_reset_at=utcnow() - timedelta(days=1)))
        assert reset_due(e2e_db)["done"] == 1
        with e2e_db() as s:
            user = s.get(User, user.id)
            assert (user.plan_credits, user.purchased_credits) == (500, 40)
