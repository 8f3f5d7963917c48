"""`studiox`: the operator's commands, on the same `Settings` and the same `models/`
operations as the API and the workers.

Commands that need only the database connect only to it. An error is one line on stderr
and a non-zero exit (1: refused or found a problem; 2: usage or configuration), never a
traceback.
"""

from __future__ import annotations

import functools
import sys
import time
import uuid

import click
from sqlalchemy import func, or_, select
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from models.audit import CHECKS, run_checks
from models.billing import change_plan
from models.credits import Transaction, adjust_credits, list_transactions
from models.db import create_engine, make_session_factory, session_scope, set_sender
from models.errors import DomainError
from models.admission import credit_summary
from models.tasks import AiTask, admin_set_status
from models.users import User
from settings import ConfigError

from . import services


class Context:
    def __init__(self, *, broker: bool = False):
        self.settings = services.settings(broker=broker)
        self.engine = create_engine(self.settings.database_url, pool_size=2, max_overflow=2)
        self.queue = None
        if broker:
            from worker.queue import TaskQueue, create_celery

            self.queue = TaskQueue(create_celery(self.settings))
        self.sessions = make_session_factory(self.engine)
        if self.settings.events_redis_url:
            # A task an operator fails wakes the requests and streams waiting on it at once.
            from models.events import set_notifier
            from notify import RedisNotifier

            set_notifier(self.sessions, RedisNotifier(self.settings.events_redis_url))


def command(*, broker: bool = False):
    """A command run against a fresh `Context`, its errors as one line."""
    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(Context(broker=broker), *args, **kwargs)
            except ConfigError as exc:
                fail(f"configuration: {exc}", 2)
            except DomainError as exc:
                fail(exc.message)
            except LookupError as exc:
                fail(str(exc.args[0]) if exc.args else str(exc))
            except DBAPIError as exc:
                fail(f"database: {str(exc.orig).strip().splitlines()[0] if exc.orig else exc}")
            except (ArgumentError, NoSuchModuleError, ImportError) as exc:
                fail(f"configuration: DATABASE_URL is not a PostgreSQL URL this can use ({exc})", 2)

        return run

    return decorate


def fail(message: str, code: int = 1):
    click.echo(f"studiox: {message}", err=True)
    sys.exit(code)


def find_user(session, who: str) -> User:
    """A user by clerk id, or by email when exactly one user has it."""
    users = list(session.scalars(select(User).where(or_(User.clerk_id == who, func.lower(User.email) == who.lower()))
                                 .limit(3)))
    exact = [u for u in users if u.clerk_id == who]
    if exact:
        return exact[0]
    if not users:
        raise LookupError(f"no user with clerk id or email {who!r}")
    if len(users) > 1:
        raise LookupError(f"several users have the email {who!r}; give the clerk id")
    return users[0]


def task_id_of(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise LookupError(f"{value!r} is not a task id") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def studiox() -> None:
    """StudioX operations. Reads the same settings as the service (environment, `.env`, or
    the servers of a running `make run`)."""


# --- users ----------------------------------------------------------------------------------------

@studiox.group()
def users() -> None:
    """Look up users."""


@users.command("show")
@click.argument("who")
@click.option("--entries", default=10, show_default=True, help="How many ledger rows to show")
@command()
def users_show(ctx: Context, who: str, entries: int) -> None:
    """A user's plan, buckets, reserved credits, subscription and last ledger rows."""
    with ctx.sessions() as session:
        user = find_user(session, who)
        summary = credit_summary(session, user)
        click.echo(f"user       {user.id}  clerk {user.clerk_id}  email {user.email or '-'}")
        click.echo(f"plan       {user.plan_id}   next reset/renewal {user.credit_reset_at or '-'}")
        click.echo(f"credits    {user.credits} = plan {user.plan_credits} + purchased {user.purchased_credits};"
                   f" reserved {summary.reserved}, available {summary.available}")
        click.echo(f"stripe     customer {user.stripe_customer_id or '-'}  subscription "
                   f"{user.stripe_subscription_id or '-'}")
        click.echo("ledger (newest first):")
        for row in list_transactions(session, user.id, limit=entries):
            click.echo(f"  {row.id:>8}  {row.created_at:%Y-%m-%d %H:%M:%S}  {row.type:<18} {row.amount:>+7}"
                       f"  -> {row.balance_after:<7} {row.description or ''}")


# --- credits --------------------------------------------------------------------------------------

@studiox.group()
def credits() -> None:
    """Adjust balances; run the monthly resets."""


def _adjust(sign: int):
    @click.argument("clerk_id")
    @click.argument("amount", type=click.IntRange(min=1))
    @click.option("--bucket", type=click.Choice(["plan", "purchased"]), default="purchased", show_default=True)
    @click.option("--reason", required=True, help="Why: kept in the ledger row")
    @command()
    def adjust(ctx: Context, clerk_id: str, amount: int, bucket: str, reason: str) -> None:
        with session_scope(ctx.sessions) as session:
            user = find_user(session, clerk_id)
            row = adjust_credits(session, user.id, sign * amount, bucket=bucket, reason=reason)
        click.echo(f"{user.clerk_id}: {row.amount:+} {bucket} credits (ledger row {row.id}); balance {row.balance_after}")

    return adjust


credits.command("grant", help="Give a user credits (an admin_adjustment ledger row with the reason).")(_adjust(1))
credits.command("take", help="Take credits from a bucket; never below zero.")(_adjust(-1))


@credits.command("reset-due")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many users (default: all due)")
@click.option("--parallel", type=click.IntRange(min=1, max=16), default=None,
              help="Batches run at once, each on its own connection (default 2, as beat)")
@command()
def credits_reset_due(ctx: Context, limit: int | None, parallel: int | None) -> None:
    """Run the due monthly resets now: the code beat runs."""
    from worker.jobs import reset_due

    began = time.monotonic()
    result = reset_due(ctx.sessions, limit=limit, **({"parallel": parallel} if parallel else {}))
    elapsed = time.monotonic() - began
    rate = f" ({result['done'] / elapsed:,.0f} users/s)" if result["done"] and elapsed > 0 else ""
    click.echo(f"reset {result['done']} user(s) in {elapsed:.2f} s{rate}"
               + ("; a batch failed and was rolled back (see the log)" if result["skipped"] else ""))
    if result["skipped"]:
        sys.exit(1)


# --- plans ----------------------------------------------------------------------------------------

@studiox.group()
def plans() -> None:
    """Set a user's plan."""


@plans.command("set")
@click.argument("clerk_id")
@click.argument("plan")
@command()
def plans_set(ctx: Context, clerk_id: str, plan: str) -> None:
    """Move a user without a Stripe subscription to PLAN (an upgrade tops up at once)."""
    with session_scope(ctx.sessions) as session:
        user = find_user(session, clerk_id)
        before = user.plan_id  # a Stripe subscriber is refused under the user's lock
        user = change_plan(session, user.id, plan, reason="operator")
    click.echo(f"{user.clerk_id}: {before} -> {user.plan_id}; plan credits {user.plan_credits}")


# --- tasks ----------------------------------------------------------------------------------------

@studiox.group()
def tasks() -> None:
    """Inspect, fail or re-queue a task."""


def _describe(task: AiTask, charges: list[Transaction]) -> None:
    click.echo(f"task       {task.id}  {task.type}  {task.status}  progress {task.progress}%  attempt {task.attempt}")
    click.echo(f"user       {task.user_id}  price {task.credits_used}  queue {task.queue}")
    click.echo(f"times      created {task.created_at}  started {task.started_at or '-'}  "
               f"finished {task.completed_at or '-'}")
    if task.error:
        click.echo(f"error      {task.error_code}: {task.error}")
    for row in charges:
        click.echo(f"ledger     {row.id}  {row.type}  {row.amount:+}")


@tasks.command("show")
@click.argument("task_id")
@command()
def tasks_show(ctx: Context, task_id: str) -> None:
    """A task, with its charge and refund."""
    with ctx.sessions() as session:
        task = session.get(AiTask, task_id_of(task_id))
        if task is None:
            raise LookupError(f"no task {task_id}")
        _describe(task, list(session.scalars(select(Transaction).where(Transaction.task_id == task.id)
                                             .order_by(Transaction.id))))


@tasks.command("fail")
@click.argument("task_id")
@click.option("--reason", default="Failed by an operator", show_default=True)
@command()
def tasks_fail(ctx: Context, task_id: str, reason: str) -> None:
    """Fail a task that is not final (a charged one is refunded)."""
    with session_scope(ctx.sessions) as session:
        task = admin_set_status(session, task_id_of(task_id), "failed", reason)
    click.echo(f"{task.id}: {task.status} ({task.error_code})")


@tasks.command("requeue")
@click.argument("task_id")
@command(broker=True)
def tasks_requeue(ctx: Context, task_id: str) -> None:
    """Send a pending task's message again (after this commits)."""
    sent: list[tuple[str, object]] = []
    # The message goes out here, after the commit, so a broker that refuses it is an error
    # (the lost-message sweep would re-send it later anyway).
    with session_scope(ctx.sessions) as session:
        set_sender(session, lambda name, task: sent.append((name, task)))
        task = admin_set_status(session, task_id_of(task_id), "pending")
    try:
        for name, arg in sent:
            ctx.queue.send(name, arg)
    except Exception as exc:
        fail(f"broker: the message could not be sent ({type(exc).__name__}: {exc}); the sweep re-sends it later")
    click.echo(f"{task.id}: re-sent to {task.queue}")


# --- stripe ---------------------------------------------------------------------------------------

@studiox.group()
def stripe() -> None:
    """Replay a stored Stripe event; reconcile with Stripe's event list."""


@stripe.command("replay")
@click.argument("event_id")
@command()
def stripe_replay(ctx: Context, event_id: str) -> None:
    """Apply a stored event again (its rule changes only what was never applied)."""
    from models.stripe_events import replay_event
    from stripe_gateway import billing_context

    if not ctx.settings.stripe_configured or not ctx.settings.stripe_prices:
        # Without them a rule would misread the event (no plan for a price, no charge to
        # re-read) and still mark it handled.
        raise LookupError("replaying needs Stripe configured as the service has it "
                          "(STRIPE_SECRET_KEY and STRIPE_PRICE_*)")
    with session_scope(ctx.sessions) as session:
        outcome = replay_event(session, event_id, billing_context(ctx.settings))
    click.echo(f"{event_id}: {outcome}")


@stripe.command("reconcile")
@command()
def stripe_reconcile(ctx: Context) -> None:
    """Run the reconciliation once: store the events never received, apply what waits."""
    from stripe_gateway import billing_context
    from worker.jobs import reconcile_stripe

    if not ctx.settings.stripe_configured:
        raise LookupError("Stripe is not configured (STRIPE_SECRET_KEY is not set)")
    result = reconcile_stripe(ctx.sessions, billing_context(ctx.settings))
    click.echo(f"listed {result['fetched']} event(s) from Stripe, {result['new']} never received; "
               f"applied {result['done']}, {result['skipped']} failed")
    if result["skipped"]:
        sys.exit(1)


# --- audit ----------------------------------------------------------------------------------------

@studiox.command()
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Print at most this many violations (all are counted)")
@command()
def audit(ctx: Context, limit: int) -> None:
    """Check every invariant of the design over all the data; exit 1 if one is broken."""
    began = time.monotonic()
    found = 0
    with ctx.sessions() as session:
        for violation in run_checks(session):
            found += 1
            if found <= limit:
                click.echo(f"{violation.check}: {violation.message}")
        users_count = session.scalar(select(func.count()).select_from(User))
        rows = session.scalar(select(func.count()).select_from(Transaction))
    elapsed = time.monotonic() - began
    if found:
        fail(f"{found} violation(s) in {len(CHECKS)} checks ({elapsed:.1f} s)")
    click.echo(f"ok: {len(CHECKS)} checks over {users_count} users and {rows} ledger rows, no violation "
               f"({elapsed:.1f} s)")


def main() -> None:
    studiox(prog_name="studiox")
