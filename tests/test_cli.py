"""`studiox`, the operator's CLI: each command on a real database of its own (migrated),
the audit shown to catch corrupted data in copies of it. Errors are one line and a
non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from cli.main import studiox
from devenv.embedded import migrate
from models import AiTask, StripeEvent, Transaction, User
from models.db import make_session_factory, session_scope
from models.stripe_events import apply_event, store_event
from models.billing import BillingContext
from tests.support.builders import make_charged_task, make_task, make_user
from tests.support.env import isolated_broker

STUDIOX = Path(sys.executable).with_name("studiox")


def _url(admin: str, name: str) -> str:
    return make_url(admin).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def cli_db(databases) -> Iterator[str]:
    """A migrated database of this module's, with users, tasks and ledger rows."""
    name = f"studiox_cli_{uuid.uuid4().hex[:8]}"
    admin = create_engine(databases["admin"], isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = _url(databases["admin"], name)
    migrate(url)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="module")
def data(cli_db):
    """Real data made by the real operations: a charged task, a refunded one, a pending one."""
    engine = create_engine(cli_db)
    sessions = make_session_factory(engine)
    with session_scope(sessions) as s:
        ops = make_user(s, clerk_id="cli_ops", email="ops@example.com", plan="pro", purchased=30)
        charged = make_charged_task(s, ops)
        refunded = make_charged_task(s, ops)
        pending = make_task(s, ops)
    with session_scope(sessions) as s:
        from models.tasks import fail_task

        fail_task(s, refunded.id, "broke", "processing_failed")
    engine.dispose()
    return {"user": "cli_ops", "charged": charged.id, "refunded": refunded.id, "pending": pending.id}


def run(url: str, *args: str, **env: str):
    return CliRunner().invoke(studiox, list(args), env={"DATABASE_URL": url, "APP_ENV": "test",
                                                        "STUDIOX_DOTENV": "/nonexistent", **env})


def sessions_of(url: str):
    return make_session_factory(create_engine(url))


class TestUsersAndCredits:
    def test_show_by_clerk_id_or_email(self, cli_db, data):
        shown = run(cli_db, "users", "show", "cli_ops")
        assert shown.exit_code == 0, shown.output
        assert "plan       pro" in shown.output and "reserved 1" in shown.output and "credit_deduction" in shown.output
        assert run(cli_db, "users", "show", "OPS@example.com").exit_code == 0

    def test_an_unknown_user_is_one_line_and_exit_1(self, cli_db, data):
        missing = run(cli_db, "users", "show", "nobody")
        assert missing.exit_code == 1 and missing.output.strip() == "studiox: no user with clerk id or email 'nobody'"

    def test_grant_and_take_write_an_adjustment_with_the_reason(self, cli_db, data):
        granted = run(cli_db, "credits", "grant", "cli_ops", "15", "--bucket", "purchased", "--reason", "ticket 42")
        assert granted.exit_code == 0, granted.output
        taken = run(cli_db, "credits", "take", "cli_ops", "5", "--bucket", "plan", "--reason", "goodwill undone")
        assert taken.exit_code == 0, taken.output
        with sessions_of(cli_db)() as s:
            rows = list(s.scalars(select(Transaction).where(Transaction.type == "admin_adjustment")
                                  .order_by(Transaction.id)))
            assert [(r.purchased_delta, r.plan_delta, r.description) for r in rows[-2:]] == [
                (15, 0, "Operator: ticket 42"), (0, -5, "Operator: goodwill undone")]

    def test_a_take_never_drives_a_bucket_negative(self, cli_db, data):
        with sessions_of(cli_db)() as s:
            before = s.scalar(select(User.purchased_credits).where(User.clerk_id == "cli_ops"))
        refused = run(cli_db, "credits", "take", "cli_ops", str(before + 1), "--reason", "too much")
        assert refused.exit_code == 1 and "holds less than" in refused.output
        assert "Traceback" not in refused.output
        with sessions_of(cli_db)() as s:
            assert s.scalar(select(User.purchased_credits).where(User.clerk_id == "cli_ops")) == before

    def test_a_reason_is_required(self, cli_db, data):
        assert run(cli_db, "credits", "grant", "cli_ops", "1").exit_code == 2


class TestPlansAndTasks:
    def test_plans_set_tops_up_an_upgrade_and_refuses_a_stripe_subscriber(self, cli_db, data):
        with session_scope(sessions_of(cli_db)) as s:
            make_user(s, clerk_id="cli_free")
            subscriber = make_user(s, clerk_id="cli_sub")
            subscriber.stripe_subscription_id = "sub_cli"
        moved = run(cli_db, "plans", "set", "cli_free", "enterprise")
        assert moved.exit_code == 0 and "free -> enterprise" in moved.output
        # Back and forth makes no credits: an upgrade tops up to the plan's amount, no further.
        for plan in ("free", "enterprise", "free", "enterprise"):
            assert run(cli_db, "plans", "set", "cli_free", plan).exit_code == 0
        with sessions_of(cli_db)() as s:
            assert s.scalar(select(User.plan_credits).where(User.clerk_id == "cli_free")) == 5000
        refused = run(cli_db, "plans", "set", "cli_sub", "pro")
        assert refused.exit_code == 1 and "sub_cli" in refused.output
        assert run(cli_db, "plans", "set", "cli_free", "platinum").exit_code == 1

    def test_tasks_show_and_fail_refunds_a_charged_task(self, cli_db, data):
        shown = run(cli_db, "tasks", "show", str(data["charged"]))
        assert shown.exit_code == 0 and "processing" in shown.output and "credit_deduction" in shown.output
        failed = run(cli_db, "tasks", "fail", str(data["charged"]), "--reason", "stuck on a bad host")
        assert failed.exit_code == 0 and "failed" in failed.output
        with sessions_of(cli_db)() as s:
            assert s.scalar(select(func.count()).where(Transaction.task_id == data["charged"],
                                                       Transaction.type == "credit_refund")) == 1
        again = run(cli_db, "tasks", "fail", str(data["charged"]))
        assert again.exit_code == 1 and "already failed" in again.output
        assert run(cli_db, "tasks", "show", "not-a-uuid").exit_code == 1

    def test_requeue_sends_a_pending_tasks_message(self, cli_db, data, settings):
        import redis

        broker = isolated_broker(settings, 7).broker_url
        sent = run(cli_db, "tasks", "requeue", str(data["pending"]), REDIS_URL=broker)
        assert sent.exit_code == 0, sent.output
        assert redis.Redis.from_url(broker).llen("image_analysis") == 1

    def test_reset_due_runs_the_resets_beat_runs(self, cli_db, data):
        with session_scope(sessions_of(cli_db)) as s:
            s.execute(text("UPDATE users SET credit_reset_at = now() - interval '1 day' WHERE clerk_id = 'cli_free'"))
        result = run(cli_db, "credits", "reset-due")
        assert result.exit_code == 0 and result.output.startswith("reset 1 user(s) in ")
        assert run(cli_db, "credits", "reset-due").output.startswith("reset 0 user(s)")


    def test_a_task_failed_by_an_operator_wakes_whoever_waits_on_it(self, cli_db, data, settings):
        # Last of the class: it fails the pending task the tests above use.
        import redis

        url = isolated_broker(settings, 7).broker_url
        listener = redis.Redis.from_url(url).pubsub()
        listener.subscribe(f"studiox:task:{data['pending']}")
        assert listener.get_message(timeout=2)["type"] == "subscribe"
        assert run(cli_db, "tasks", "fail", str(data["pending"]), REDIS_URL=url).exit_code == 0
        message = listener.get_message(timeout=5)
        assert message is not None and message["type"] == "message"  # the event's id
        listener.close()

class TestStripe:
    def test_replay_applies_a_stored_event_again_without_moving_money_twice(self, cli_db, data):
        sessions = sessions_of(cli_db)
        event = {"id": "evt_cli_replay", "type": "payout.paid", "created": 1, "livemode": False,
                 "data": {"object": {"id": "po_1"}}}
        with session_scope(sessions) as s:
            store_event(s, event)
            apply_event(s, event["id"], BillingContext())
        refused = run(cli_db, "stripe", "replay", "evt_cli_replay")  # without Stripe's settings
        assert refused.exit_code == 1 and "STRIPE_SECRET_KEY" in refused.output
        stripe = {"STRIPE_SECRET_KEY": "sk_test_cli", "STRIPE_WEBHOOK_SECRET": "whsec_cli",
                  "STRIPE_PRICE_PRO": "price_pro", "STRIPE_API_BASE": "http://127.0.0.1:9"}
        replayed = run(cli_db, "stripe", "replay", "evt_cli_replay", **stripe)
        assert replayed.exit_code == 0 and replayed.output.strip() == "evt_cli_replay: ignored"
        with sessions() as s:
            assert s.get(StripeEvent, "evt_cli_replay").attempts == 2
        assert run(cli_db, "stripe", "replay", "evt_none", **stripe).exit_code == 1

    def test_reconcile_without_stripe_says_so(self, cli_db, data):
        result = run(cli_db, "stripe", "reconcile")
        assert result.exit_code == 1 and "STRIPE_SECRET_KEY" in result.output


class TestAudit:
    @pytest.fixture
    def copy(self, cli_db, data, databases) -> Iterator[str]:
        """A copy of the module's data (CREATE DATABASE .. TEMPLATE), to corrupt."""
        name = f"studiox_cli_copy_{uuid.uuid4().hex[:8]}"
        admin = create_engine(databases["admin"], isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                              f"'{make_url(cli_db).database}' AND pid <> pg_backend_pid()"))
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{make_url(cli_db).database}"'))
        yield _url(databases["admin"], name)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    def corrupt(self, url: str, *statements: str) -> None:
        with create_engine(url).begin() as conn:
            for statement in statements:
                conn.execute(text(statement))

    def test_clean_data_passes_with_a_one_line_summary(self, copy):
        result = subprocess.run([str(STUDIOX), "audit"], capture_output=True, text=True, timeout=60,
                                env={"PATH": "/usr/bin:/bin", "DATABASE_URL": copy, "APP_ENV": "test",
                                     "STUDIOX_DOTENV": "/nonexistent"})
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(result.stdout.strip().splitlines()) == 1 and result.stdout.startswith("ok: ")

    @pytest.mark.parametrize("case", ["corrupted-balance", "ledger-differs", "charge-without-task",
                                      "refund-without-charge"])
    def test_it_catches(self, copy, data, case):
        user = "(SELECT id FROM users WHERE clerk_id = 'cli_ops')"
        if case == "corrupted-balance":
            # Only possible with the guard removed: what a bad restore or manual fix leaves.
            self.corrupt(copy, "ALTER TABLE users DROP CONSTRAINT ck_users_purchased_credits_nonnegative",
                         f"UPDATE users SET purchased_credits = -3 WHERE id = {user}")
            expected = ["no_negative_bucket", "balance_is_ledger"]
        elif case == "ledger-differs":
            self.corrupt(copy, f"UPDATE users SET plan_credits = plan_credits + 7 WHERE id = {user}")
            expected = ["balance_is_ledger"]
        elif case == "charge-without-task":
            self.corrupt(copy, "ALTER TABLE transactions DROP CONSTRAINT fk_transactions_task_id_ai_tasks",
                         f"INSERT INTO transactions (user_id, amount, plan_delta, purchased_delta, bucket, "
                         f"balance_after, type, task_id) SELECT id, -1, -1, 0, 'plan', 0, 'credit_deduction', "
                         f"'{uuid.uuid4()}' FROM users WHERE id = {user}")
            expected = ["charge_names_its_task"]
        else:
            self.corrupt(copy, "ALTER TABLE transactions DROP CONSTRAINT fk_transactions_refund_of_charge",
                         f"INSERT INTO transactions (user_id, amount, plan_delta, purchased_delta, bucket, "
                         f"balance_after, type, task_id, refund_of_id, refund_of_amount) SELECT user_id, 1, 1, 0, "
                         f"'plan', 1, 'credit_refund', id, 999999, -1 FROM ai_tasks WHERE id = '{data['pending']}'")
            expected = ["refund_mirrors_its_charge"]
        result = run(copy, "audit")
        assert result.exit_code == 1, result.output
        found = {line.split(":", 1)[0] for line in result.output.splitlines()[:-1]}
        assert set(expected) <= found, result.output
        assert "violation(s)" in result.output.splitlines()[-1]


class TestWhereItFindsItsServers:
    def test_the_servers_of_a_running_make_run(self, cli_db, data, tmp_path):
        (tmp_path / "services.env").write_text(f"APP_ENV=development\nDATABASE_URL={cli_db}\nREDIS_URL=\n")
        result = CliRunner().invoke(studiox, ["users", "show", "cli_ops"],
                                    env={"DATABASE_URL": "", "STUDIOX_VAR_DIR": str(tmp_path),
                                         "STUDIOX_DOTENV": "/nonexistent", "APP_ENV": ""})
        assert result.exit_code == 0, result.output

    def test_a_database_url_it_cannot_use_is_one_line(self):
        result = run("mysql://x/y", "audit")
        assert result.exit_code == 2 and result.output.startswith("studiox: configuration: ")
        assert "Traceback" not in result.output

    def test_production_needs_only_the_database(self, cli_db, data):
        result = CliRunner().invoke(studiox, ["audit"], env={"DATABASE_URL": cli_db, "APP_ENV": "production",
                                                             "REDIS_URL": "", "JWT_SECRET": "",
                                                             "STUDIOX_DOTENV": "/nonexistent"})
        assert result.exit_code == 0, result.output

    def test_an_unreachable_database_is_one_line(self):
        result = run("postgresql+psycopg://nobody@127.0.0.1:1/none", "audit")
        assert result.exit_code == 1 and result.output.startswith("studiox: database: ")
        assert "Traceback" not in result.output
