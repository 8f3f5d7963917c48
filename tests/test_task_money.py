"""Invariant 3 at the model level: a task is charged at most once and refunded at most
once, a refund mirrors its charge, and the database refuses anything else, also when many
threads race on one task."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from models import AiTask, Transaction, User
from models.credits import ledger_sum, post_entry
from models.db import session_scope
from models.tasks import cancel_task, complete_task, fail_task, start_task
from tests.support.builders import make_charged_task, make_task, make_user
from tests.support.concurrency import at_once
from tests.support.ledger import charges, refunds


class TestRowsInTheSession:
    """Operations write through the session: a rollback takes their rows with it, and a
    caller that needs a balance after one re-reads it."""

    def test_a_new_task_has_no_output_in_sql(self, session):
        task = make_task(session, make_user(session))
        assert session.scalar(select(AiTask.output.is_(None)).where(AiTask.id == task.id))

    def test_rolled_back_rows_are_not_left_in_the_session(self, session):
        user = make_user(session)
        nested = session.begin_nested()
        task = make_task(session, user)
        entry = post_entry(session, user.id, type="admin_adjustment", purchased_delta=5)
        nested.rollback()
        assert task not in session
        assert session.get(AiTask, task.id) is None and session.get(Transaction, entry.id) is None
        session.refresh(user)
        assert user.credits == ledger_sum(session, user.id) == 20

    def test_start_decides_on_the_row_not_on_a_callers_stale_copy(self, session):
        user = make_user(session)
        task = make_task(session, user)
        session.execute(AiTask.__table__.update().where(AiTask.id == task.id).values(status="cancelled"))
        assert task.status == "pending"  # stale, as a caller's copy can be
        assert start_task(session, task.id) is None
        assert charges(session, task.id) == []
        session.refresh(task)  # callers re-read what they hold
        assert task.status == "cancelled"


class TestChargeTask:
    def test_start_charges_once_and_moves_to_processing(self, session):
        user = make_user(session)
        task = make_task(session, user)
        work = start_task(session, task.id)
        assert work is not None and work.attempt == 1
        session.refresh(task), session.refresh(user)  # operations write rows; callers re-read
        assert task.status == "processing" and len(charges(session, task.id)) == 1
        assert user.credits == 19 and ledger_sum(session, user.id) == 19

    def test_duplicate_delivery_charges_once(self, session):
        task = make_task(session, make_user(session))
        assert start_task(session, task.id) is not None
        assert start_task(session, task.id) is None  # no lease: a live runner has it
        assert len(charges(session, task.id)) == 1

    def test_resume_after_a_dead_runner_does_not_charge_again(self, session):
        task = make_charged_task(session, make_user(session))
        work = start_task(session, task.id, may_resume=True)
        assert work is not None and work.attempt == 2
        assert len(charges(session, task.id)) == 1

    def test_no_credits_fails_the_task_and_charges_nothing(self, session):
        user = make_user(session)
        task = make_task(session, user)
        post_entry(session, user.id, type="admin_adjustment", plan_delta=-user.plan_credits)
        assert start_task(session, task.id) is None
        session.refresh(task)
        assert task.status == "failed" and task.error_code == "insufficient_credits"
        assert charges(session, task.id) == []

    def test_plan_bucket_is_spent_before_purchased(self, session):
        user = make_user(session)
        post_entry(session, user.id, type="credit_purchase", purchased_delta=10, stripe_event_id="evt_x")
        post_entry(session, user.id, type="admin_adjustment", plan_delta=-(user.plan_credits - 1))
        task = make_task(session, user, "advanced_editing")  # costs 2: 1 from plan, 1 purchased
        start_task(session, task.id)
        (charge,) = charges(session, task.id)
        assert (charge.plan_delta, charge.purchased_delta, charge.bucket) == (-1, -1, "both")
        session.refresh(user)
        assert (user.plan_credits, user.purchased_credits) == (0, 9)

    def test_a_stale_message_for_a_final_task_is_dropped(self, session):
        task = make_charged_task(session, make_user(session))
        complete_task(session, task.id, {"ok": True})
        assert start_task(session, task.id, may_resume=True) is None
        assert len(charges(session, task.id)) == 1


class TestRefundTask:
    def test_failure_refunds_exactly_the_charge_into_its_buckets(self, session):
        user = make_user(session)
        task = make_charged_task(session, user)
        assert fail_task(session, task.id, "boom")
        (charge,), (refund,) = charges(session, task.id), refunds(session, task.id)
        assert refund.amount == -charge.amount and refund.refund_of_id == charge.id
        assert (refund.plan_delta, refund.purchased_delta) == (-charge.plan_delta, -charge.purchased_delta)
        assert user.credits == 20 == ledger_sum(session, user.id)

    def test_failing_twice_refunds_once(self, session):
        task = make_charged_task(session, make_user(session))
        assert fail_task(session, task.id, "boom") is True
        assert fail_task(session, task.id, "boom") is False
        assert len(refunds(session, task.id)) == 1

    def test_failing_a_pending_task_refunds_nothing(self, session):
        task = make_task(session, make_user(session))
        assert fail_task(session, task.id, "lost")
        assert refunds(session, task.id) == []

    def test_completion_after_cancel_is_dropped(self, session):
        user = make_user(session)
        task = make_charged_task(session, user)
        cancel_task(session, user, task.id)
        assert complete_task(session, task.id, {"late": True}) is False
        assert task.status == "cancelled" and task.output is None


class TestDatabaseRefusesDoubleMoney:
    """The constraints themselves, bypassing the operations."""

    def _charged(self, session):
        task = make_charged_task(session, make_user(session))
        return task, charges(session, task.id)[0]

    def test_a_second_charge_row_is_refused(self, session):
        task, charge = self._charged(session)
        with pytest.raises(IntegrityError), session.begin_nested():
            post_entry(session, task.user_id, type="credit_deduction", plan_delta=-1, task_id=task.id)

    def test_a_second_refund_of_one_charge_is_refused(self, session):
        task, charge = self._charged(session)
        fail_task(session, task.id, "x")
        with pytest.raises(IntegrityError), session.begin_nested():
            post_entry(session, task.user_id, type="credit_refund", plan_delta=1, task_id=task.id, refund_of=charge)

    def test_a_refund_of_another_amount_is_refused(self, session):
        task, charge = self._charged(session)
        with pytest.raises(IntegrityError), session.begin_nested():
            session.add(Transaction(user_id=task.user_id, amount=5, plan_delta=5, purchased_delta=0, bucket="plan",
                                    balance_after=24, type="credit_refund", task_id=task.id,
                                    refund_of_id=charge.id, refund_of_amount=-5))
            session.flush()

    def test_a_refund_without_a_charge_is_refused(self, session):
        task = make_task(session, make_user(session))
        with pytest.raises(IntegrityError), session.begin_nested():
            session.add(Transaction(user_id=task.user_id, amount=1, plan_delta=1, purchased_delta=0, bucket="plan",
                                    balance_after=21, type="credit_refund", task_id=task.id,
                                    refund_of_id=999_999, refund_of_amount=-1))
            session.flush()


class TestConcurrentTransitions:
    """Committed data, many threads on one task at once (each with its own connection)."""

    @pytest.fixture
    def charged_task(self, e2e_db):
        with session_scope(e2e_db) as s:
            user = make_user(s, plan="pro")
            task = make_task(s, user)
        return user.id, task.id

    def test_twenty_concurrent_starts_charge_once(self, e2e_db, charged_task):
        user_id, task_id = charged_task

        def start(_):
            with session_scope(e2e_db) as s:
                return start_task(s, task_id) is not None

        assert sum(at_once(20, start)) == 1
        with e2e_db() as s:
            assert len(charges(s, task_id)) == 1
            assert s.get(User, user_id).credits == ledger_sum(s, user_id) == 499

    def test_twenty_concurrent_fails_and_cancels_refund_once(self, e2e_db, charged_task):
        user_id, task_id = charged_task
        with session_scope(e2e_db) as s:
            start_task(s, task_id)

        def finish(i):
            with session_scope(e2e_db) as s:
                if i % 2:
                    return fail_task(s, task_id, "x")
                try:
                    cancel_task(s, s.get(User, user_id), task_id)
                    return True
                except Exception:
                    return False

        assert sum(at_once(20, finish)) == 1
        with e2e_db() as s:
            assert len(refunds(s, task_id)) == 1
            assert s.get(User, user_id).credits == ledger_sum(s, user_id) == 500

    def test_cancel_racing_completion_exactly_one_wins(self, e2e_db):
        with session_scope(e2e_db) as s:
            user = make_user(s, plan="enterprise")
        outcomes = set()
        for _ in range(40):
            with session_scope(e2e_db) as s:
                task = make_charged_task(s, s.get(User, user.id))

            def act(i, task_id=task.id):
                with session_scope(e2e_db) as s:
                    if i == 0:
                        return "completed" if complete_task(s, task_id, {"ok": 1}) else None
                    try:
                        cancel_task(s, s.get(User, user.id), task_id)
                        return "cancelled"
                    except Exception:
                        return None

            winners = [w for w in at_once(2, act) if w]
            assert len(winners) == 1
            outcomes.add(winners[0])
            with e2e_db() as s:
                final = s.get(AiTask, task.id)
                assert final.status == winners[0]
                assert len(charges(s, task.id)) == 1
                assert len(refunds(s, task.id)) == (1 if final.status == "cancelled" else 0)
        with e2e_db() as s:
            assert s.get(User, user.id).credits == ledger_sum(s, user.id)
            assert s.scalar(select(func.min(User.plan_credits))) >= 0
