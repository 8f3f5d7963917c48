"""Money jobs through faults, with real worker and beat processes: a worker SIGKILLed in the
middle of a reset batch or of applying a Stripe event applies nothing twice and loses
nothing; two beats at once reset each user once.

"In the middle" is made certain, not hoped for: a statement trigger on the ledger sleeps
after the job's INSERT, so the batch's rows are written but not committed when the worker
dies. The trigger is dropped before anything else runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
from sqlalchemy import func, select, text

from models import Purchase, StripeEvent, Transaction, User
from tests.support.billing import (
    assert_invariants,
    billing_client,
    billing_env,
    billing_queue,
    billing_settings,
    deliver,
    fake,
    member,
    settle,
)
from tests.support.env import ROOT, isolated_broker, worker_env
from tests.support.workers import CeleryWorker, wait_for
from tests.test_resets import assert_each_reset_once, make_due_users
from worker.queue import create_celery

pytestmark = pytest.mark.e2e
__all__ = ["billing_client", "billing_queue", "billing_settings", "fake", "member"]  # fixtures
ISOLATED_REDIS_DB = 6  # this module's own broker database for its reset workers


@contextmanager
def ledger_writes_stall(engine, seconds: float = 4.0):
    """Every INSERT into the ledger waits `seconds` after writing its rows, uncommitted."""
    with engine.begin() as conn:
        conn.execute(text(f"""
            CREATE OR REPLACE FUNCTION test_stall() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;
            CREATE TRIGGER test_stall AFTER INSERT ON transactions FOR EACH STATEMENT EXECUTE FUNCTION test_stall();
        """))
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS test_stall ON transactions; DROP FUNCTION IF EXISTS test_stall()"))


def stalled_backends(engine) -> list[int]:
    with engine.connect() as conn:
        return list(conn.scalars(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'PgSleep'")))


def kill_mid_statement(engine, worker: CeleryWorker) -> None:
    """SIGKILL the whole worker (main process and children) while a ledger INSERT of its is
    stalled, then wait until PostgreSQL has noticed and rolled that transaction back."""
    wait_for(lambda: stalled_backends(engine), 30, interval=0.05, message="the job's INSERT to be under way")
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(10)
    wait_for(lambda: not stalled_backends(engine), 30, interval=0.1, message="the orphaned transaction to end")


@pytest.fixture
def reset_settings(e2e_settings, e2e_db):
    return isolated_broker(e2e_settings, ISOLATED_REDIS_DB)


def ops_worker(settings, tmp_path, name, env=None) -> CeleryWorker:
    worker = CeleryWorker(env or worker_env(settings), queues=("maintenance",), concurrency=2, name=name,
                          log_path=tmp_path / f"{name}.log")
    return worker.start(create_celery(settings))


class TestWorkerKilledMidResetBatch:
    def test_the_batch_rolls_back_whole_and_the_next_run_completes_it(self, e2e_db, e2e_engine, reset_settings,
                                                                      tmp_path):
        ids = make_due_users(e2e_db, 300)
        celery = create_celery(reset_settings)
        worker = ops_worker(reset_settings, tmp_path, "reset-killed")
        try:
            with ledger_writes_stall(e2e_engine):
                celery.send_task("maintenance.reset_monthly_credits")
                kill_mid_statement(e2e_engine, worker)
        finally:
            worker.stop()
        with e2e_db() as s:
            assert s.scalar(select(func.count()).where(Transaction.type.in_(("monthly_reset", "credit_expiry")))) == 0
            assert s.scalar(select(func.count()).where(User.id.in_(ids), User.credit_reset_at > func.now())) == 0
        with ops_worker(reset_settings, tmp_path, "reset-next"):
            celery.send_task("maintenance.reset_monthly_credits")
            with e2e_db() as s:
                wait_for(lambda: s.scalar(select(func.count()).where(Transaction.type == "monthly_reset")) == 300,
                         30, message="the next run to reset everyone")
        assert_each_reset_once(e2e_db, ids)


class TestTwoBeatsAtOnce:
    def test_two_beats_and_two_workers_reset_each_user_once(self, e2e_db, reset_settings, tmp_path):
        ids = make_due_users(e2e_db, 400)
        env = worker_env(reset_settings, BEAT_RESET_SECONDS="1", BEAT_SWEEP_SECONDS="3600",
                         BEAT_REAP_SECONDS="3600", BEAT_RECONCILE_SECONDS="3600")
        beats = []
        with ops_worker(reset_settings, tmp_path, "ops1", env), ops_worker(reset_settings, tmp_path, "ops2", env):
            try:
                for i in range(2):
                    log = open(tmp_path / f"beat{i}.log", "ab")
                    beats.append(subprocess.Popen(
                        [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "-l", "info",
                         "-s", str(tmp_path / f"beat{i}-schedule")],
                        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
                with e2e_db() as s:
                    wait_for(lambda: s.scalar(select(func.count()).where(Transaction.type == "monthly_reset")) >= 400,
                             60, message="the beats' runs to reset everyone")
                    # More ticks of both beats, every one finding nobody due.
                    runs = lambda: sum((tmp_path / f"beat{i}.log").read_text().count(  # noqa: E731
                        "maintenance.reset_monthly_credits") for i in range(2))
                    seen = runs()
                    wait_for(lambda: runs() >= seen + 4, 30, message="more beat ticks")
            finally:
                for beat in beats:
                    beat.terminate()
                    beat.wait(10)
        assert_each_reset_once(e2e_db, ids)


class TestWorkerKilledMidStripeApply:
    def test_the_event_stays_unapplied_and_is_applied_once_later(self, billing_client, billing_settings, fake, e2e_db,
                                                                 e2e_engine, member, tmp_path):
        headers, user_id = member
        checkout = billing_client.simulate_post("/api/billing/purchase-credits", json={"pack": "credits_100"},
                                                headers=headers).json
        paid = fake.pay_session(checkout["sessionId"])
        env = billing_env(billing_settings)
        worker = ops_worker(billing_settings, tmp_path, "stripe-killed", env)
        try:
            with ledger_writes_stall(e2e_engine):
                deliver(billing_client, paid)  # stored; the API queues the apply job
                kill_mid_statement(e2e_engine, worker)
        finally:
            worker.stop()
        with e2e_db() as s:
            event = s.get(StripeEvent, paid["id"])
            assert event is not None and event.handled_at is None  # stored, not applied
            assert s.scalar(select(func.count()).where(Transaction.type == "credit_purchase")) == 0
            assert s.scalar(select(Purchase.status).where(Purchase.stripe_session_id == checkout["sessionId"])) != "paid"
            assert s.get(User, user_id).purchased_credits == 0
        with ops_worker(billing_settings, tmp_path, "stripe-next", env):
            deliver(billing_client, paid)  # Stripe retries: the same event again, and the apply job is queued
            settle(e2e_db)
        with e2e_db() as s:
            assert s.scalar(select(func.count()).where(Transaction.type == "credit_purchase")) == 1
            assert s.get(User, user_id).purchased_credits == 100
            assert s.get(StripeEvent, paid["id"]).outcome == "credits_granted"
        assert_invariants(e2e_db)
