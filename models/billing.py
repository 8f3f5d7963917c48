"""Billing's shared parts: what the rules need of Stripe, plan changes, and the history.

`models/` never imports the Stripe library: the rules that must call Stripe receive a
`StripeApi` (the `stripe_gateway.StripeGateway` of the process, or
None when Stripe is not configured) through a `BillingContext`.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import ForeignKey, String, func, literal, select, tuple_, union_all, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, utcnow
from .credits import Transaction, post_entry
from .errors import InvalidInput, NoSubscription
from .plans import get_plan
from .purchases import Purchase
from .users import User, lock_user


class StripeApi(Protocol):
    """The Stripe calls the rules make (implemented by `stripe_gateway.StripeGateway`)."""

    def create_customer(self, *, user_id: str, email: str | None, name: str | None) -> dict[str, Any]: ...

    def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]: ...

    def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    def update_subscription(self, subscription_id: str, params: dict[str, Any], *,
                            idempotency_key: str) -> dict[str, Any]: ...

    def cancel_subscription(self, subscription_id: str) -> dict[str, Any]: ...

    def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]: ...

    def retrieve_charge(self, charge_id: str) -> dict[str, Any]: ...

    def retrieve_invoice(self, invoice_id: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BillingContext:
    """What applying Stripe's events needs besides the database."""

    # plan id -> Stripe price id (STRIPE_PRICE_PRO, STRIPE_PRICE_ENTERPRISE)
    prices: Mapping[str, str] = field(default_factory=dict)
    stripe: StripeApi | None = None
    # The mode of the secret key (sk_live_ or sk_test_); an event of the other mode is ignored.
    livemode: bool | None = None

    def plan_for_price(self, price_id: str | None) -> str | None:
        if not price_id:
            return None
        return next((plan for plan, price in self.prices.items() if price == price_id), None)


class PlanChange(Base):
    """A change of a user's plan, for the billing history."""

    __tablename__ = "plan_changes"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    from_plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"))
    to_plan_id: Mapped[str] = mapped_column(ForeignKey("plans.id"))
    reason: Mapped[str] = mapped_column(String(32))
    subscription_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


def ensure_customer(session: Session, user: User, stripe: StripeApi) -> str:
    """The user's Stripe customer id, created the first time (one per user even when two
    requests race: Stripe's idempotency key names the user, and only the first id is kept)."""
    if user.stripe_customer_id:
        return user.stripe_customer_id
    customer = stripe.create_customer(user_id=str(user.id), email=user.email, name=user.name)
    session.execute(update(User).where(User.id == user.id, User.stripe_customer_id.is_(None))
                    .values(stripe_customer_id=customer["id"]))
    session.refresh(user)
    return user.stripe_customer_id


def record_plan_change(session: Session, user_id: uuid.UUID, from_plan: str, to_plan: str, *, reason: str,
                       subscription_id: str | None = None) -> None:
    if from_plan != to_plan:
        session.add(PlanChange(user_id=user_id, from_plan_id=from_plan, to_plan_id=to_plan, reason=reason,
                               subscription_id=subscription_id))


def change_plan(session: Session, user_id: uuid.UUID, plan_id: str, *, reason: str = "admin"):
    """Move a user without a Stripe subscription to a plan; an upgrade tops the plan bucket
    up to the new plan's monthly credits at once (never past them, however often the plan
    is changed), a downgrade keeps what the user has until the next reset."""
    user = lock_user(session, user_id)
    if user.stripe_subscription_id is not None:
        raise NoSubscription(f"The user has the Stripe subscription {user.stripe_subscription_id}; "
                             "its events set the plan (change it in Stripe)")
    old, new = get_plan(session, user.plan_id), get_plan(session, plan_id)
    record_plan_change(session, user.id, old.id, new.id, reason=reason)
    user.plan_id = new.id
    top_up = new.monthly_credits - user.plan_credits if new.monthly_credits > old.monthly_credits else 0
    if top_up > 0:
        post_entry(session, user.id, type="plan_upgrade", plan_delta=top_up,
                   description=f"Upgrade from {old.name} to {new.name}")
    session.flush()
    session.refresh(user)  # the top-up moved its buckets
    return user


# --- the history -------------------------------------------------------------------------------

@dataclass(frozen=True)
class HistoryEntry:
    kind: str  # purchase | plan_change | subscription_period
    at: datetime
    item: Any  # Purchase | PlanChange | Transaction


def _cursor(entry: HistoryEntry) -> str:
    raw = f"{entry.at.isoformat()}|{entry.kind}|{_key(entry)}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _key(entry: HistoryEntry) -> str:
    return str(entry.item.id)


def _parse_cursor(cursor: str) -> tuple[datetime, str, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, kind, key = raw.split("|", 2)
        return datetime.fromisoformat(at), kind, key
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("cursor: not a cursor this API returned", code="invalid_cursor") from None


def billing_history(session: Session, user_id: uuid.UUID, *, cursor: str | None, limit: int
                    ) -> tuple[list[HistoryEntry], str | None]:
    """Purchases (with what refunds and disputes did to them), plan changes and paid
    subscription periods, newest first, in keyset pages."""
    sources = union_all(
        select(literal("purchase").label("kind"), Purchase.id.cast(String).label("key"),
               Purchase.created_at.label("at")).where(Purchase.user_id == user_id),
        select(literal("plan_change"), PlanChange.id.cast(String), PlanChange.created_at)
        .where(PlanChange.user_id == user_id),
        select(literal("subscription_period"), Transaction.id.cast(String), Transaction.created_at)
        .where(Transaction.user_id == user_id, Transaction.type == "monthly_reset",
               Transaction.stripe_object_id.is_not(None)),
    ).subquery()
    query = select(sources.c.kind, sources.c.key, sources.c.at)
    if cursor:
        query = query.where(tuple_(sources.c.at, sources.c.kind, sources.c.key) < tuple_(*_parse_cursor(cursor)))
    rows = session.execute(query.order_by(sources.c.at.desc(), sources.c.kind.desc(), sources.c.key.desc())
                           .limit(limit + 1)).all()
    models = {"purchase": Purchase, "plan_change": PlanChange, "subscription_period": Transaction}
    entries = []
    for row in rows[:limit]:
        model = models[row.kind]
        key = int(row.key) if model is Transaction else uuid.UUID(row.key)
        entries.append(HistoryEntry(row.kind, row.at, session.get(model, key)))
    return entries, (_cursor(entries[-1]) if len(rows) > limit else None)
