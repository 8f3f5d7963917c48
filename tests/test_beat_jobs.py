"""Invariant 5 and the beat jobs: monthly resets once per period (Stripe's events are
tests/test_billing_*.py's), lost messages re-sent, stuck tasks reaped — run by real workers, fired repeatedly."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from models import AiTask, Transaction, User, utcnow
from models.billing import change_plan
from models.credits import ledger_sum
from models.resets import reset_plan_credits
from models.db import session_scope
from models.leases import task_lease
from tests.support.builders import make_charged_task, make_task, make_user
from tests.support.concurrency import at_once
from tests.support.workers import wait_for

pytestmark = pytest.mark.e2e


def count(session, user_id, type_):
    return session.scalar(select(func.count()).where(Transaction.user_id == user_id, Transaction.type == type_))


@pytest.fixture
def user_id(e2e_db):
    with session_scope(e2e_db) as s:
        user = make_user(s)
    return user.id


def make_due(e2e_db, user_id, ago=timedelta(minutes=1)):
    with session_scope(e2e_db) as s:
        s.execute(update(User).where(User.id == user_id).values(credit_reset_at=utcnow() - ago))


class TestMonthlyReset:
    def test_reset_expires_plan_credits_and_grants_the_plan_once(self, e2e_db, user_id):
        with session_scope(e2e_db) as s:
            from models.credits import post_entry

            post_entry(s, user_id, type="credit_purchase", purchased_delta=5, stripe_event_id="evt_keep")
            post_entry(s, user_id, type="admin_adjustment", plan_delta=-7)
        make_due(e2e_db, user_id)
        with session_scope(e2e_db) as s:
            assert reset_plan_credits(s, user_id) is True
            assert reset_plan_credits(s, user_id) is False  # next period is in the future now
        with e2e_db() as s:
            user = s.get(User, user_id)
            assert (user.plan_credits, user.purchased_credits) == (20, 5)  # purchased never expire
            assert user.credit_reset_at > utcnow()
            assert count(s, user_id, "credit_expiry") == count(s, user_id, "monthly_reset") == 1
            assert user.credits == ledger_sum(s, user_id)

    def test_twenty_concurrent_resets_of_one_user_reset_once(self, e2e_db, user_id):
        make_due(e2e_db, user_id)

        def reset(_):
            with session_scope(e2e_db) as s:
                return reset_plan_credits(s, user_id)

        assert sum(at_once(20, reset)) == 1
        with e2e_db() as s:
            assert count(s, user_id, "monthly_reset") == 1
            assert s.get(User, user_id).credits == ledger_sum(s, user_id) == 20

    def test_a_user_away_for_months_gets_one_reset(self, e2e_db, user_id):
        make_due(e2e_db, user_id, ago=timedelta(days=100))
        with session_scope(e2e_db) as s:
            assert reset_plan_credits(s, user_id)
            assert not reset_plan_credits(s, user_id)

    def test_beat_firing_five_times_at_once_through_real_workers_resets_once(self, e2e_db, user_id, e2e_worker,
                                                                             e2e_queue):
        make_due(e2e_db, user_id)
        for _ in range(5):
            e2e_queue.celery.send_task("maintenance.reset_monthly_credits")
        with e2e_db() as s:
            wait_for(lambda: count(s, user_id, "monthly_reset") >= 1, 30, message="reset")
        time.sleep(2)  # the other four runs finish within this; none may reset again
        with e2e_db() as s:
            assert count(s, user_id, "monthly_reset") == 1
            assert s.get(User, user_id).credits == ledger_sum(s, user_id)


class TestLostMessageSweep:
    def test_a_pending_task_whose_message_was_lost_is_resent_and_completes(self, e2e_db, user_id, e2e_worker,
                                                                          e2e_queue, e2e_settings):
        key = f"uploads/{user_id}/lost"
        (e2e_settings.media_root / key).parent.mkdir(parents=True, exist_ok=True)
        (e2e_settings.media_root / key).write_bytes(b"x")
        from models.uploads import add_upload

        with session_scope(e2e_db) as s:
            upload = add_upload(s, user_id, content_type="application/octet-stream", size=1, sha256="0" * 64,
                                storage_key=key)
            task = make_task(s, s.get(User, user_id), input=str(upload.id))
            # Committed, never sent, and old enough to be considered lost.
            task.created_at = utcnow() - timedelta(hours=1)
        e2e_queue.celery.send_task("maintenance.sweep_lost_messages")
        with e2e_db() as s:
            wait_for(lambda: s.scalar(select(AiTask.status).where(AiTask.id == task.id).execution_options(
                populate_existing=True)) == "completed", 30, message="swept task to complete")
            s.expire_all()
            assert count(s, user_id, "credit_deduction") == 1


class TestStuckTaskReaper:
    def _stuck(self, e2e_db, user_id):
        with session_scope(e2e_db) as s:
            change_plan(s, user_id, "pro")
            task = make_charged_task(s, s.get(User, user_id))
            task.started_at = utcnow() - timedelta(hours=3)
        return task.id

    def test_stuck_task_without_a_runner_is_failed_and_refunded(self, e2e_db, user_id, e2e_worker, e2e_queue):
        task_id = self._stuck(e2e_db, user_id)
        e2e_queue.celery.send_task("maintenance.reap_stuck_tasks")
        with e2e_db() as s:
            wait_for(lambda: s.scalar(select(AiTask.status).where(AiTask.id == task_id).execution_options(
                populate_existing=True)) == "failed", 30, message="reaped")
            task = s.get(AiTask, task_id, populate_existing=True)
            assert task.error_code == "stuck"
            assert count(s, user_id, "credit_refund") == 1
            assert s.get(User, user_id).credits == ledger_sum(s, user_id)

    def test_a_task_whose_runner_is_alive_is_left_alone(self, e2e_db, e2e_engine, user_id, e2e_worker, e2e_queue):
        alive = self._stuck(e2e_db, user_id)
        dead = self._stuck(e2e_db, user_id)
        with task_lease(e2e_engine, alive) as lease:
            assert lease is not None
            e2e_queue.celery.send_task("maintenance.reap_stuck_tasks")
            with e2e_db() as s:
                # The same run reaps the dead one, so it has looked at both.
                wait_for(lambda: s.scalar(select(AiTask.status).where(AiTask.id == dead).execution_options(
                    populate_existing=True)) == "failed", 30, message="dead task reaped")
                assert s.scalar(select(AiTask.status).where(AiTask.id == alive)) == "processing"
