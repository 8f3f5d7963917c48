"""The credits ledger: the only code that changes a balance.

Every change to a bucket goes through `post_entry`, which moves the bucket with a
conditional UPDATE (no bucket can go below zero, whatever runs concurrently) and appends
the ledger row with the resulting balance in the same transaction. The ledger is
append-only; `sum(amount)` per user always equals `users.credits`.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    bindparam,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, sql_in, utcnow
from .errors import InsufficientCredits, InvalidInput, UserNotFound
from .events import record_event
from .plans import FREE_PLAN_ID, Plan, get_plan
from .resets import start_monthly_resets
from .users import User, get_user, lock_user

TRANSACTION_TYPES = (
    "signup_grant",
    "monthly_reset",
    "credit_expiry",
    "credit_deduction",
    "credit_refund",
    "credit_purchase",
    "plan_upgrade",
    "admin_adjustment",
    # Billing: a refund or a dispute takes a purchase's credits back; a won dispute gives
    # back what it took.
    "credit_clawback",
    "credit_reinstated",
)
# Entries written for a Stripe object carry its id (`stripe_object_id`), unique per type: no
# delivery order or repetition of Stripe's events applies one twice (invariant 4).
STRIPE_OBJECT_TYPES = ("credit_purchase", "plan_upgrade", "monthly_reset", "credit_expiry", "credit_clawback",
                       "credit_reinstated")


class Transaction(Base):
    __tablename__ = "transactions"
    __table_args__ = (
        CheckConstraint(sql_in("type", TRANSACTION_TYPES), name="type_known"),
        CheckConstraint("bucket IN ('plan', 'purchased', 'both')", name="bucket_known"),
        CheckConstraint("amount = plan_delta + purchased_delta", name="amount_is_sum_of_deltas"),
        CheckConstraint("amount <> 0", name="amount_nonzero"),
        CheckConstraint("balance_after >= 0", name="balance_after_nonnegative"),
        CheckConstraint("type <> 'credit_deduction' OR (task_id IS NOT NULL AND amount < 0)", name="deduction_names_task"),
        # A refund names the charge it reverses and mirrors its amount exactly; the
        # composite foreign key below makes the DB check that charge exists for this task.
        CheckConstraint(
            "(type = 'credit_refund') = (refund_of_id IS NOT NULL)"
            " AND (refund_of_id IS NULL OR (task_id IS NOT NULL AND refund_of_amount < 0"
            " AND amount = -refund_of_amount))",
            name="refund_mirrors_charge",
        ),
        CheckConstraint(
            "(period IS NOT NULL) = (type IN ('monthly_reset', 'credit_expiry'))", name="period_for_resets"
        ),
        UniqueConstraint("id", "task_id", "amount", name="uq_transactions_id_task_amount"),
        ForeignKeyConstraint(
            ["refund_of_id", "task_id", "refund_of_amount"],
            ["transactions.id", "transactions.task_id", "transactions.amount"],
            name="fk_transactions_refund_of_charge",
        ),
        # Invariant 3: at most one charge per task and at most one refund per charge.
        Index("uq_transactions_one_charge_per_task", "task_id", unique=True,
              postgresql_where=text("type = 'credit_deduction'")),
        Index("uq_transactions_one_refund_per_charge", "refund_of_id", unique=True,
              postgresql_where=text("refund_of_id IS NOT NULL")),
        # Invariant 4: a Stripe event moves money at most once per kind of entry.
        Index("uq_transactions_stripe_event", "stripe_event_id", "type", unique=True,
              postgresql_where=text("stripe_event_id IS NOT NULL")),
        # Invariant 4 again, by Stripe object: one purchase grant per Checkout Session, one
        # paid period per invoice, one top-up per upgrade, one clawback per refund state or
        # dispute, one reinstatement per dispute.
        Index("uq_transactions_stripe_object", "type", "stripe_object_id", unique=True,
              postgresql_where=text("stripe_object_id IS NOT NULL")),
        CheckConstraint(
            f"stripe_object_id IS NULL OR {sql_in('type', STRIPE_OBJECT_TYPES)}", name="stripe_object_types"
        ),
        CheckConstraint(
            "type NOT IN ('credit_clawback', 'credit_reinstated')"
            " OR (purchase_id IS NOT NULL AND stripe_object_id IS NOT NULL AND plan_delta = 0)",
            name="clawbacks_name_purchase",
        ),
        # Invariant 5: one reset (and one expiry) per user per period of beat's; a paid
        # period (an invoice) is unique by its invoice id above.
        Index("uq_transactions_user_period", "user_id", "type", "period", unique=True,
              postgresql_where=text("period IS NOT NULL AND stripe_object_id IS NULL")),
        # Keyset pagination, newest first.
        Index("ix_transactions_user_id_id", "user_id", text("id DESC")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    amount: Mapped[int] = mapped_column(Integer)
    plan_delta: Mapped[int] = mapped_column(Integer)
    purchased_delta: Mapped[int] = mapped_column(Integer)
    bucket: Mapped[str] = mapped_column(String(16))
    balance_after: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    task_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("ai_tasks.id"), index=True)
    refund_of_id: Mapped[int | None] = mapped_column(BigInteger)
    refund_of_amount: Mapped[int | None] = mapped_column(Integer)
    stripe_event_id: Mapped[str | None] = mapped_column(String(255))
    stripe_object_id: Mapped[str | None] = mapped_column(String(255))
    purchase_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("purchases.id"), index=True)
    period: Mapped[date | None] = mapped_column(Date)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


# Plain Core on the tables (no ORM object is kept in step: a caller that holds the User
# re-reads it). The UPDATE only matches while both buckets stay >= 0.
_users = User.__table__
# The user's low-balance threshold, returned by the same UPDATE (a primary-key lookup on
# the small plans table), so noticing a crossing costs no statement of its own.
_LOW_THRESHOLD = func.coalesce(
    _users.c.low_credits_threshold,
    select(Plan.low_credits_threshold).where(Plan.id == _users.c.plan_id).correlate(_users).scalar_subquery(),
).label("low_threshold")
_MOVE_BUCKETS = (
    _users.update()
    .where(_users.c.id == bindparam("user_id"),
           _users.c.plan_credits + bindparam("plan_delta") >= 0,
           _users.c.purchased_credits + bindparam("purchased_delta") >= 0)
    .values(plan_credits=_users.c.plan_credits + bindparam("plan_delta"),
            purchased_credits=_users.c.purchased_credits + bindparam("purchased_delta"))
    .returning(_users.c.plan_credits, _users.c.purchased_credits, _users.c.credits, _LOW_THRESHOLD)
)
_LOCK_BUCKETS = (
    select(_users.c.plan_credits, _users.c.purchased_credits).where(_users.c.id == bindparam("user_id"))
    .with_for_update()
)
_APPEND_ENTRY = Transaction.__table__.insert().returning(*Transaction.__table__.c)


def post_entry(
    session: Session,
    user_id: uuid.UUID,
    *,
    type: str,
    plan_delta: int = 0,
    purchased_delta: int = 0,
    task_id: uuid.UUID | None = None,
    refund_of: Transaction | Row | None = None,
    stripe_event_id: str | None = None,
    stripe_object_id: str | None = None,
    purchase_id: uuid.UUID | None = None,
    period: date | None = None,
    description: str | None = None,
) -> Row:
    """Move the user's buckets by the deltas and append the ledger row, atomically; return
    the ledger row (its columns as attributes). A User the session holds is not updated:
    re-read it.

    The UPDATE only matches while both buckets stay >= 0 after the change; PostgreSQL
    re-checks that condition on the newest row version after waiting for a concurrent
    writer, so concurrent spenders can never overdraw. No match means not enough credits.
    """
    if plan_delta == 0 and purchased_delta == 0:
        raise ValueError("a ledger entry must move credits")
    session.flush()  # what the caller has pending comes first
    balances = session.execute(_MOVE_BUCKETS, {"user_id": user_id, "plan_delta": plan_delta,
                                              "purchased_delta": purchased_delta}).one_or_none()
    if balances is None:
        if session.scalar(select(User.id).where(User.id == user_id)) is None:
            raise UserNotFound()
        raise InsufficientCredits()
    # One INSERT .. RETURNING: the entry comes back as a row (id, amounts, balance_after, ...),
    # not as an object the session tracks.
    entry = session.execute(_APPEND_ENTRY, dict(
        user_id=user_id,
        amount=plan_delta + purchased_delta,
        plan_delta=plan_delta,
        purchased_delta=purchased_delta,
        bucket="both" if plan_delta and purchased_delta else ("plan" if plan_delta else "purchased"),
        balance_after=balances.credits,
        type=type,
        task_id=task_id,
        refund_of_id=refund_of.id if refund_of is not None else None,
        refund_of_amount=refund_of.amount if refund_of is not None else None,
        stripe_event_id=stripe_event_id,
        stripe_object_id=stripe_object_id,
        purchase_id=purchase_id,
        period=period,
        description=description,
        created_at=utcnow(),
    )).one()
    # Crossing the threshold downward is announced once, in this transaction; the balance
    # must be back at or above it before another crossing (the row lock orders them). An
    # expiry is not: the period's grant follows it in the same transaction.
    amount = plan_delta + purchased_delta
    if (amount < 0 and type != "credit_expiry"
            and balances.credits < (balances.low_threshold or 0) <= balances.credits - amount):
        record_event(session, "credits.low", user_id=user_id, data={
            "balance": balances.credits, "threshold": balances.low_threshold, "transactionId": str(entry.id),
            "transactionType": type})
    return entry


def spend_credits(
    session: Session, user_id: uuid.UUID, amount: int, *, type: str, task_id: uuid.UUID | None = None,
    description: str | None = None,
) -> Row:
    """Take `amount` credits, from the plan bucket first (they expire), then purchased."""
    if amount <= 0:
        raise ValueError("amount must be positive")
    # The lock makes the split below the one the UPDATE applies.
    buckets = session.execute(_LOCK_BUCKETS, {"user_id": user_id}).one_or_none()
    if buckets is None:
        raise UserNotFound()
    if buckets.plan_credits + buckets.purchased_credits < amount:
        raise InsufficientCredits()
    from_plan = min(buckets.plan_credits, amount)
    return post_entry(
        session, user_id, type=type, plan_delta=-from_plan, purchased_delta=-(amount - from_plan),
        task_id=task_id, description=description,
    )


def reverse_entry(session: Session, charge: Transaction | Row, *, description: str | None = None) -> Row:
    """Refund a charge into the buckets it came from. The DB refuses a second refund."""
    return post_entry(
        session, charge.user_id, type="credit_refund", plan_delta=-charge.plan_delta,
        purchased_delta=-charge.purchased_delta, task_id=charge.task_id, refund_of=charge,
        description=description,
    )


def adjust_credits(session: Session, user_id: uuid.UUID, amount: int, *, bucket: str, reason: str) -> Row:
    """An operator's grant (amount > 0) or take (amount < 0) on one bucket, with their
    reason in the ledger (`admin_adjustment`). A take never drives the bucket negative."""
    if bucket not in ("plan", "purchased"):
        raise InvalidInput("bucket must be plan or purchased")
    if amount == 0:
        raise InvalidInput("amount must not be zero")
    if not reason.strip():
        raise InvalidInput("a reason is required")
    deltas = {"plan_delta": amount} if bucket == "plan" else {"purchased_delta": amount}
    try:
        return post_entry(session, user_id, type="admin_adjustment", description=f"Operator: {reason.strip()}",
                          **deltas)
    except InsufficientCredits:
        raise InsufficientCredits(f"The {bucket} bucket holds less than {-amount} credits") from None


def initialize_user(
    session: Session, clerk_id: str, *, email: str | None = None, name: str | None = None
) -> tuple[User, bool]:
    """Create the user on the free plan with its first grant; return the existing one otherwise.

    Idempotent under concurrency: the INSERT .. ON CONFLICT waits on the unique clerk_id
    of a concurrent initializer, so exactly one caller creates the row and grants credits.
    """
    user_id = session.scalar(
        insert(User)
        .values(id=uuid.uuid4(), clerk_id=clerk_id, email=email, name=name, plan_id=FREE_PLAN_ID)
        .on_conflict_do_nothing(index_elements=[User.clerk_id])
        .returning(User.id)
    )
    if user_id is None:
        return get_user(session, clerk_id), False
    user = lock_user(session, user_id)
    grant_signup_credits(session, user)
    session.flush()
    session.refresh(user)  # the grant moved its buckets
    return user, True


def grant_signup_credits(session: Session, user: User) -> Row | None:
    plan = get_plan(session, user.plan_id)
    start_monthly_resets(user)
    if plan.monthly_credits == 0:
        return None
    return post_entry(session, user.id, type="signup_grant", plan_delta=plan.monthly_credits,
                      description=f"Welcome to the {plan.name} plan")


def list_transactions(
    session: Session, user_id: uuid.UUID, *, before_id: int | None = None, limit: int = 20
) -> list[Transaction]:
    """Newest first, keyset-paginated on the identity column (monotonic per insert order)."""
    query = select(Transaction).where(Transaction.user_id == user_id)
    if before_id is not None:
        query = query.where(Transaction.id < before_id)
    return list(session.scalars(query.order_by(Transaction.id.desc()).limit(limit)))


def ledger_sum(session: Session, user_id: uuid.UUID) -> int:
    return session.scalar(select(func.coalesce(func.sum(Transaction.amount), 0)).where(Transaction.user_id == user_id))
