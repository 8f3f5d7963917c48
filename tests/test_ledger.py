"""The credits ledger: invariants 1 and 2 of DESIGN.md under concurrency, and the DB's own guards.

1. credits == plan_credits + purchased_credits == sum(ledger amounts), for every user.
2. No bucket is ever negative.
Plus invariant 3's ledger half: a refund mirrors exactly one charge, at most once.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from models import Transaction, User
from models.credits import ledger_sum, post_entry, reverse_entry, spend_credits
from models.db import session_scope
from models.errors import InsufficientCredits
from tests.support.builders import make_task_row, make_user
from tests.support.concurrency import at_once

THREADS = 20


def assert_ledger_consistent(session, user_id: uuid.UUID) -> list[Transaction]:
    """Invariants 1 and 2 for one user, on the committed rows; returns the ledger oldest first."""
    user = session.scalar(select(User).where(User.id == user_id).execution_options(populate_existing=True))
    rows = session.scalars(select(Transaction).where(Transaction.user_id == user_id).order_by(Transaction.id)).all()
    assert user.plan_credits >= 0 and user.purchased_credits >= 0
    assert user.credits == user.plan_credits + user.purchased_credits == sum(r.amount for r in rows)
    assert user.plan_credits == sum(r.plan_delta for r in rows)
    assert user.purchased_credits == sum(r.purchased_delta for r in rows)
    # Replaying the ledger in id order reproduces every recorded balance, and neither
    # bucket dips below zero at any point in that history.
    plan = purchased = 0
    for row in rows:
        plan += row.plan_delta
        purchased += row.purchased_delta
        assert plan >= 0 and purchased >= 0, row.id
        assert row.balance_after == plan + purchased, (row.id, row.balance_after, plan + purchased)
    return rows


class TestLedgerUnderConcurrency:
    def test_concurrent_mixed_operations_keep_every_invariant(self, e2e_db):
        with session_scope(e2e_db) as s:
            user_id = make_user(s, purchased=10).id
        with e2e_db() as s:
            rows_before = s.scalar(select(func.count()).select_from(Transaction).where(Transaction.user_id == user_id))
            credits_before = s.get(User, user_id).credits

        def work(i: int) -> Counter:
            rng = random.Random(i)
            done: Counter = Counter()
            for _ in range(8):
                op = rng.choice(["grant", "spend", "spend", "buy", "spend_purchased", "expire_plan"])
                amount = rng.randint(1, 3) if op in ("grant", "buy") else rng.randint(2, 9)
                try:
                    with session_scope(e2e_db) as session:
                        if op == "grant":
                            post_entry(session, user_id, type="admin_adjustment", plan_delta=amount)
                            delta = amount
                        elif op == "buy":
                            post_entry(session, user_id, type="credit_purchase", purchased_delta=amount,
                                       stripe_event_id=f"evt_{uuid.uuid4().hex}")
                            delta = amount
                        elif op == "spend":
                            spend_credits(session, user_id, amount, type="admin_adjustment")
                            delta = -amount
                        elif op == "spend_purchased":
                            post_entry(session, user_id, type="admin_adjustment", purchased_delta=-amount)
                            delta = -amount
                        else:
                            post_entry(session, user_id, type="admin_adjustment", plan_delta=-amount)
                            delta = -amount
                except InsufficientCredits:
                    done["refused"] += 1
                    continue
                done["ok"] += 1
                done["delta"] += delta
            return done

        totals: Counter = Counter()
        for done in at_once(THREADS, work):
            totals.update(done)  # update() keeps negative sums, `+` would drop them
        # The workload must reach both outcomes, or it proves nothing about the edge.
        assert totals["ok"] > 20 and totals["refused"] > 5, totals

        with e2e_db() as s:
            rows = assert_ledger_consistent(s, user_id)
            assert len(rows) - rows_before == totals["ok"]  # no lost or phantom update
            assert s.get(User, user_id).credits == credits_before + totals["delta"]

    def test_concurrent_spends_never_overdraw(self, e2e_db):
        with session_scope(e2e_db) as s:
            user_id = make_user(s).id  # the free plan's 20 credits
        with e2e_db() as s:
            start = s.get(User, user_id).credits
        assert start == 20

        def spend(i: int) -> bool:
            try:
                with session_scope(e2e_db) as session:
                    spend_credits(session, user_id, 3, type="admin_adjustment")
                return True
            except InsufficientCredits:
                return False

        results = at_once(THREADS, spend)
        assert results.count(True) == start // 3
        with e2e_db() as s:
            assert_ledger_consistent(s, user_id)
            assert s.get(User, user_id).credits == start % 3

    def test_concurrent_bucket_moves_never_overdraw_either_bucket(self, e2e_db):
        with session_scope(e2e_db) as s:
            user_id = make_user(s, purchased=9).id  # plan 20, purchased 9

        def drain(i: int) -> bool:
            try:
                with session_scope(e2e_db) as session:
                    if i % 2:
                        post_entry(session, user_id, type="admin_adjustment", purchased_delta=-2)
                    else:
                        post_entry(session, user_id, type="admin_adjustment", plan_delta=-3)
                return True
            except InsufficientCredits:
                return False

        results = at_once(THREADS, drain)
        assert sum(results[1::2]) == 4 and sum(results[0::2]) == 6
        with e2e_db() as s:
            user = s.get(User, user_id)
            assert (user.plan_credits, user.purchased_credits) == (2, 1)
            assert_ledger_consistent(s, user_id)


@pytest.fixture
def user(session) -> User:
    return make_user(session)


def refresh(session, user: User) -> User:
    return session.scalar(select(User).where(User.id == user.id).execution_options(populate_existing=True))


class TestSpendOrder:
    def test_spend_takes_the_plan_bucket_first_then_purchased(self, session, user):
        post_entry(session, user.id, type="credit_purchase", purchased_delta=10, stripe_event_id=f"evt_{uuid.uuid4().hex}")
        post_entry(session, user.id, type="admin_adjustment", plan_delta=-(user.plan_credits - 5))
        user = refresh(session, user)
        assert (user.plan_credits, user.purchased_credits) == (5, 10)

        both = spend_credits(session, user.id, 7, type="admin_adjustment")
        assert (both.plan_delta, both.purchased_delta, both.bucket, both.balance_after) == (-5, -2, "both", 8)
        purchased_only = spend_credits(session, user.id, 3, type="admin_adjustment")
        assert (purchased_only.plan_delta, purchased_only.purchased_delta, purchased_only.bucket) == (0, -3, "purchased")
        user = refresh(session, user)
        assert (user.plan_credits, user.purchased_credits, user.credits) == (0, 5, 5)

    def test_spend_from_plan_only_leaves_purchased_untouched(self, session, user):
        post_entry(session, user.id, type="credit_purchase", purchased_delta=4, stripe_event_id=f"evt_{uuid.uuid4().hex}")
        entry = spend_credits(session, user.id, 2, type="admin_adjustment")
        assert (entry.plan_delta, entry.purchased_delta, entry.bucket) == (-2, 0, "plan")

    def test_spending_more_than_the_balance_changes_nothing(self, session, user):
        before = (user.plan_credits, user.purchased_credits)
        rows_before = session.scalar(select(func.count()).select_from(Transaction).where(Transaction.user_id == user.id))
        with pytest.raises(InsufficientCredits):
            spend_credits(session, user.id, user.credits + 1, type="admin_adjustment")
        user = refresh(session, user)
        assert (user.plan_credits, user.purchased_credits) == before
        assert session.scalar(select(func.count()).select_from(Transaction).where(Transaction.user_id == user.id)) == rows_before

    def test_a_bucket_cannot_be_overdrawn_even_when_the_other_covers_it(self, session, user):
        post_entry(session, user.id, type="credit_purchase", purchased_delta=50, stripe_event_id=f"evt_{uuid.uuid4().hex}")
        with pytest.raises(InsufficientCredits):
            post_entry(session, user.id, type="admin_adjustment", plan_delta=-(user.plan_credits + 1))
        assert ledger_sum(session, user.id) == refresh(session, user).credits


class TestDatabaseGuards:
    @pytest.mark.parametrize("column", ["plan_credits", "purchased_credits"])
    def test_check_constraint_refuses_a_negative_bucket_via_raw_sql(self, session, user, column):
        with pytest.raises(IntegrityError, match=f"{column}_nonnegative"):
            with session.begin_nested():
                session.execute(text(f"UPDATE users SET {column} = -1 WHERE id = :id"), {"id": user.id})

    def test_balance_is_generated_and_cannot_be_written(self, session, user):
        with pytest.raises(DBAPIError, match="credits"):
            with session.begin_nested():
                session.execute(text("UPDATE users SET credits = 1000 WHERE id = :id"), {"id": user.id})


class TestRefundMirrorsCharge:
    @pytest.fixture
    def task(self, session, user):
        """A processing task priced at 3 credits whose charge each test posts itself."""
        return make_task_row(session, user.id, status="processing", credits=3)

    def test_refund_restores_the_buckets_the_charge_took_from(self, session, user, task):
        post_entry(session, user.id, type="credit_purchase", purchased_delta=5, stripe_event_id=f"evt_{uuid.uuid4().hex}")
        post_entry(session, user.id, type="admin_adjustment", plan_delta=-(user.plan_credits - 1))
        charge = spend_credits(session, user.id, 3, type="credit_deduction", task_id=task.id)
        refund = reverse_entry(session, charge)
        assert (refund.plan_delta, refund.purchased_delta, refund.refund_of_id) == (1, 2, charge.id)
        user = refresh(session, user)
        assert (user.plan_credits, user.purchased_credits) == (1, 5)

    def test_mismatched_refund_is_refused(self, session, user, task):
        charge = spend_credits(session, user.id, 3, type="credit_deduction", task_id=task.id)
        with pytest.raises(IntegrityError, match="refund_mirrors_charge"):
            with session.begin_nested():
                post_entry(session, user.id, type="credit_refund", plan_delta=5, task_id=task.id, refund_of=charge)
        assert refresh(session, user).credits == ledger_sum(session, user.id)

    def test_refund_naming_a_charge_it_does_not_mirror_is_refused_via_raw_sql(self, session, user, task):
        # The row is self-consistent (amount == -refund_of_amount) but no such charge exists.
        charge = spend_credits(session, user.id, 3, type="credit_deduction", task_id=task.id)
        with pytest.raises(IntegrityError, match="fk_transactions_refund_of_charge"):
            with session.begin_nested():
                session.execute(text(
                    "INSERT INTO transactions (user_id, amount, plan_delta, purchased_delta, bucket, balance_after,"
                    " type, task_id, refund_of_id, refund_of_amount)"
                    " VALUES (:user, 2, 2, 0, 'plan', 100, 'credit_refund', :task, :charge, -2)"
                ), {"user": user.id, "task": task.id, "charge": charge.id})

    def test_refund_of_another_tasks_charge_is_refused(self, session, user, task):
        other = make_task_row(session, user.id, status="processing", credits=3)
        charge = spend_credits(session, user.id, 3, type="credit_deduction", task_id=task.id)
        with pytest.raises(IntegrityError, match="fk_transactions_refund_of_charge"):
            with session.begin_nested():
                post_entry(session, user.id, type="credit_refund", plan_delta=3, task_id=other.id, refund_of=charge)

    def test_refund_without_a_charge_is_refused(self, session, user, task):
        with pytest.raises(IntegrityError, match="refund_mirrors_charge"):
            with session.begin_nested():
                post_entry(session, user.id, type="credit_refund", plan_delta=3, task_id=task.id)

    def test_second_refund_for_the_same_charge_is_refused(self, session, user, task):
        charge = spend_credits(session, user.id, 3, type="credit_deduction", task_id=task.id)
        reverse_entry(session, charge)
        credits = refresh(session, user).credits
        with pytest.raises(IntegrityError, match="uq_transactions_one_refund_per_charge"):
            with session.begin_nested():
                reverse_entry(session, charge)
        assert refresh(session, user).credits == credits == ledger_sum(session, user.id)

    def test_second_charge_for_the_same_task_is_refused(self, session, user, task):
        spend_credits(session, user.id, 3, type="credit_deduction", task_id=task.id)
        with pytest.raises(IntegrityError, match="uq_transactions_one_charge_per_task"):
            with session.begin_nested():
                spend_credits(session, user.id, 3, type="credit_deduction", task_id=task.id)

    def test_deduction_must_name_a_task(self, session, user):
        with pytest.raises(IntegrityError, match="deduction_names_task"):
            with session.begin_nested():
                spend_credits(session, user.id, 1, type="credit_deduction")
