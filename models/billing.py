"""Stripe events and plan changes: every event is recorded once and moves money once."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import String, func, select
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, utcnow
from .credits import post_entry
from .errors import InvalidInput
from .plans import get_plan
from .users import User, lock_user


class StripeEvent(Base):
    __tablename__ = "stripe_events"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    received_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    processed_at: Mapped[datetime | None]


def change_plan(
    session: Session, user_id: uuid.UUID, plan_id: str, *, stripe_event_id: str | None = None,
    subscription_id: str | None = None,
) -> User:
    """Move the user to a plan; an upgrade tops the plan bucket up by the difference in
    monthly credits at once, a downgrade keeps what the user has until the next reset."""
    user = lock_user(session, user_id)
    old, new = get_plan(session, user.plan_id), get_plan(session, plan_id)
    user.plan_id = new.id
    if subscription_id is not None:
        user.stripe_subscription_id = subscription_id
    top_up = new.monthly_credits - old.monthly_credits
    if top_up > 0:
        post_entry(session, user.id, type="plan_upgrade", plan_delta=top_up, stripe_event_id=stripe_event_id,
                   description=f"Upgrade from {old.name} to {new.name}")
    session.flush()
    session.refresh(user)  # the top-up moved its buckets
    return user


def purchase_credits(session: Session, user_id: uuid.UUID, credits: int, *, stripe_event_id: str) -> None:
    if credits <= 0:
        raise InvalidInput("credits must be positive")
    post_entry(session, user_id, type="credit_purchase", purchased_delta=credits, stripe_event_id=stripe_event_id,
               description=f"Purchased {credits} credits")


def _user_for(session: Session, obj: dict[str, Any]) -> User | None:
    metadata = obj.get("metadata") or {}
    if metadata.get("user_id"):
        try:
            return session.get(User, uuid.UUID(metadata["user_id"]))
        except ValueError:
            return None
    if obj.get("customer"):
        return session.scalar(select(User).where(User.stripe_customer_id == obj["customer"]))
    return None


def record_stripe_event(session: Session, event: dict[str, Any]) -> bool:
    """Store the event; False if this id was received before (Stripe retries deliveries)."""
    inserted = session.scalar(
        insert(StripeEvent).values(id=event["id"], type=event["type"], payload=event)
        .on_conflict_do_nothing(index_elements=[StripeEvent.id]).returning(StripeEvent.id)
    )
    return inserted is not None


def apply_stripe_event(session: Session, event: dict[str, Any]) -> str:
    """Apply a verified Stripe event at most once (invariant 4).

    The event row is inserted first; a concurrent second delivery blocks on its primary
    key until the first commits and then finds it, so only one delivery moves money. The
    ledger's unique (stripe_event_id, type) index backs this up.
    """
    if not record_stripe_event(session, event):
        return "duplicate"
    obj = (event.get("data") or {}).get("object") or {}
    result = "ignored"
    if event["type"] == "checkout.session.completed" and obj.get("payment_status", "paid") == "paid":
        user = _user_for(session, obj)
        metadata = obj.get("metadata") or {}
        if user is not None and metadata.get("kind") == "credits":
            purchase_credits(session, user.id, int(metadata["credits"]), stripe_event_id=event["id"])
            result = "credits_purchased"
        elif user is not None and metadata.get("kind") == "plan":
            change_plan(session, user.id, metadata["plan_id"], stripe_event_id=event["id"],
                        subscription_id=obj.get("subscription"))
            result = "plan_changed"
        if user is not None and obj.get("customer") and not user.stripe_customer_id:
            user.stripe_customer_id = obj["customer"]
    session.execute(
        StripeEvent.__table__.update().where(StripeEvent.id == event["id"]).values(processed_at=utcnow())
    )
    session.flush()
    return result
