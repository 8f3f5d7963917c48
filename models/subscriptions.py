"""Stripe subscriptions: the plan follows the subscription, paid periods follow invoices.

- `customer.subscription.*` events update the `subscriptions` record; an event older than
  what was last applied never moves it back (an event of the same second is settled by
  re-reading the subscription from Stripe). An upgrade takes effect at once and tops the
  plan bucket up to the new plan's monthly credits, once per upgrade; a downgrade waits
  for the next paid period; the end of the subscription moves the user to free.
- `invoice.paid` for a new subscription or a renewal starts the paid period exactly once
  per invoice: the unused plan credits expire and the plan's monthly credits are granted,
  and `credit_reset_at` moves to the period's end. Beat's monthly reset never serves a
  user with a subscription, so no period is granted twice (invariant 5).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Boolean, ForeignKey, String, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, stripe_id, utcnow
from .billing import BillingContext, StripeApi, ensure_customer, record_plan_change
from .errors import NoSubscription, PlanNotPurchasable
from .credits import Transaction, post_entry
from .plans import FREE_PLAN_ID, get_plan
from .resets import anchor_resets
from .users import User, lock_user, user_for_customer

LIVE_STATUSES = ("active", "trialing")
# A subscription in these states is still the user's (past_due and unpaid get no new
# period until an invoice is paid); beat leaves its user alone.
HELD_STATUSES = ("active", "trialing", "past_due", "unpaid", "paused")
ENDED_STATUSES = ("canceled", "incomplete_expired")


class Subscription(Base):
    __tablename__ = "subscriptions"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    plan_id: Mapped[str | None] = mapped_column(ForeignKey("plans.id"))
    price_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(32))
    current_period_start: Mapped[datetime | None]
    current_period_end: Mapped[datetime | None]
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # What was last applied: the Stripe time of the state recorded here, and its event.
    state_as_of: Mapped[datetime | None]
    last_event_id: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


def _time(epoch: Any) -> datetime | None:
    return datetime.fromtimestamp(int(epoch), timezone.utc) if epoch is not None else None


def _item(subscription: Mapping[str, Any]) -> Mapping[str, Any]:
    items = (subscription.get("items") or {}).get("data") or [{}]
    return items[0]


def _price_of(node: Mapping[str, Any]) -> str | None:
    """The price id of a subscription item or an invoice line, across API shapes."""
    price = node.get("price")
    if price:
        return stripe_id(price)
    details = ((node.get("pricing") or {}).get("price_details") or {})
    return stripe_id(details.get("price"))


def _lock_record(session: Session, subscription_id: str, user: User, status: str) -> Subscription:
    session.execute(insert(Subscription).values(id=subscription_id, user_id=user.id, status=status,
                                                created_at=utcnow(), updated_at=utcnow())
                    .on_conflict_do_nothing(index_elements=[Subscription.id]))
    return session.scalar(select(Subscription).where(Subscription.id == subscription_id).with_for_update()
                          .execution_options(populate_existing=True))


def apply_subscription(session: Session, subscription: Mapping[str, Any], ctx: BillingContext, *,
                       as_of: int, event_id: str | None = None, deleted: bool = False) -> str:
    """Apply a subscription's state as Stripe reported it at `as_of` (the event's `created`)."""
    user = user_for_customer(session, subscription.get("customer"), subscription.get("metadata"))
    if user is None:
        return "unknown_customer"
    record = _lock_record(session, subscription["id"], user, subscription.get("status") or "incomplete")
    moment = _time(as_of)
    if record.state_as_of is not None:
        if moment < record.state_as_of:
            return "stale"  # an older state than the one applied: created after updated, say
        if moment == record.state_as_of and ctx.stripe is not None:
            # Same second: the events cannot be ordered, so ask Stripe what is true now.
            subscription = ctx.stripe.retrieve_subscription(subscription["id"])
            deleted = subscription.get("status") in ENDED_STATUSES
    item = _item(subscription)
    record.status = "canceled" if deleted else (subscription.get("status") or record.status)
    record.price_id = _price_of(item) or record.price_id
    record.plan_id = ctx.plan_for_price(record.price_id)
    record.current_period_start = _time(item.get("current_period_start") or subscription.get("current_period_start"))
    record.current_period_end = _time(item.get("current_period_end") or subscription.get("current_period_end"))
    record.cancel_at_period_end = bool(subscription.get("cancel_at_period_end"))
    record.state_as_of, record.last_event_id = moment, event_id
    session.flush()

    user = lock_user(session, user.id)
    if record.status in ENDED_STATUSES:
        return _end(session, user, record)
    # A subscription the user did not hold yet starts with its first paid invoice, which
    # grants the period; only a change to the one they hold is an upgrade.
    held = user.stripe_subscription_id == record.id
    if record.status in HELD_STATUSES:
        user.stripe_subscription_id = record.id
    if held and record.status in LIVE_STATUSES and record.plan_id is not None:
        current, offered = get_plan(session, user.plan_id), get_plan(session, record.plan_id)
        if offered.monthly_credits > current.monthly_credits:
            return _upgrade(session, user, record, event_id)
    session.flush()
    return "subscription_updated"


def _upgrade(session: Session, user: User, record: Subscription, event_id: str | None) -> str:
    """The plan changes at once; the plan bucket is topped up to the new plan's monthly
    credits, once per (subscription, plan, period)."""
    old, new = get_plan(session, user.plan_id), get_plan(session, record.plan_id)
    period = int(record.current_period_start.timestamp()) if record.current_period_start else 0
    key = f"{record.id}:{new.id}:{period}"
    user.plan_id = new.id
    record_plan_change(session, user.id, old.id, new.id, reason="upgrade", subscription_id=record.id)
    top_up = new.monthly_credits - user.plan_credits
    if top_up > 0 and not _entry_exists(session, "plan_upgrade", key):
        post_entry(session, user.id, type="plan_upgrade", plan_delta=top_up, stripe_object_id=key,
                   stripe_event_id=event_id, description=f"Upgrade from {old.name} to {new.name}")
    session.flush()
    return "plan_upgraded"


def _end(session: Session, user: User, record: Subscription) -> str:
    """The subscription is over: the user is on free, and beat's monthly reset serves them
    again from now (it expires what is left of the paid plan's credits)."""
    if user.stripe_subscription_id not in (None, record.id):
        return "subscription_ended"  # the user has moved on to another subscription
    if user.plan_id != FREE_PLAN_ID:
        record_plan_change(session, user.id, user.plan_id, FREE_PLAN_ID, reason="subscription_ended",
                           subscription_id=record.id)
    user.plan_id = FREE_PLAN_ID
    if user.stripe_subscription_id is not None:
        anchor_resets(user, utcnow())
    user.stripe_subscription_id = None
    session.flush()
    return "subscription_ended"


def apply_invoice_paid(session: Session, invoice: Mapping[str, Any], ctx: BillingContext, *,
                       event_id: str | None = None) -> str:
    """Start the paid period of a subscription invoice, once per invoice."""
    reason = invoice.get("billing_reason")
    if reason == "subscription_update":
        return "proration_ignored"  # an upgrade's top-up is all it grants
    if reason not in ("subscription_create", "subscription_cycle"):
        return "ignored"
    subscription_id = stripe_id(invoice.get("subscription")) or stripe_id(
        ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription"))
    user = user_for_customer(session, invoice.get("customer"))
    if user is None or subscription_id is None:
        return "unknown_customer"
    # Under the subscription's lock (before the user's, the order every rule takes), so an
    # upgrade or the end applied concurrently is seen, not overwritten.
    record = session.scalar(select(Subscription).where(Subscription.id == subscription_id).with_for_update()
                            .execution_options(populate_existing=True))
    if record is not None and record.status in ENDED_STATUSES:
        return "subscription_already_ended"
    # The period's line: the subscription's own, not a proration of an earlier change.
    lines = [line for line in (invoice.get("lines") or {}).get("data") or [] if not _is_proration(line)]
    line = next((line for line in lines if ctx.plan_for_price(_price_of(line))), lines[0] if lines else {})
    plan_id = ctx.plan_for_price(_price_of(line))
    issued = _time(invoice.get("created"))
    if record is not None and record.plan_id and record.status in HELD_STATUSES and (
            plan_id is None or issued is None or (record.state_as_of is not None and record.state_as_of >= issued)):
        plan_id = record.plan_id  # a change applied after the invoice was issued is the truth
    if plan_id is None and ctx.stripe is not None:
        plan_id = ctx.plan_for_price(_price_of(_item(ctx.stripe.retrieve_subscription(subscription_id))))
    if plan_id is None:
        raise LookupError(f"invoice {invoice['id']}: no plan matches its price")
    period = line.get("period") or {}
    start, end = _time(period.get("start") or invoice.get("period_start")), _time(period.get("end"))

    user = lock_user(session, user.id)
    if _entry_exists(session, "monthly_reset", invoice["id"]):
        return "period_already_started"
    plan = get_plan(session, plan_id)
    if user.plan_credits:
        post_entry(session, user.id, type="credit_expiry", plan_delta=-user.plan_credits, period=start.date(),
                   stripe_object_id=invoice["id"], stripe_event_id=event_id,
                   description="Unused plan credits expired")
    post_entry(session, user.id, type="monthly_reset", plan_delta=plan.monthly_credits, period=start.date(),
               stripe_object_id=invoice["id"], stripe_event_id=event_id,
               description=f"{plan.name} plan credits for the period paid by invoice {invoice['id']}")
    if user.plan_id != plan.id:
        record_plan_change(session, user.id, user.plan_id, plan.id,
                           reason="subscription_started" if reason == "subscription_create" else "renewal",
                           subscription_id=subscription_id)
    user.plan_id = plan.id
    user.stripe_subscription_id = subscription_id
    if end is not None and (user.credit_reset_at is None or end > user.credit_reset_at):
        user.credit_reset_at = end
    session.flush()
    return "period_started"


def _is_proration(line: Mapping[str, Any]) -> bool:
    details = (line.get("parent") or {}).get("subscription_item_details") or {}
    return bool(details.get("proration") or line.get("proration"))


def subscription_paid_by(session: Session, user: User, intent: str | None, stripe: StripeApi) -> str | None:
    """The subscription whose paid invoice `intent` paid, among the user's recent paid
    periods (read from Stripe with their payments); None if it paid none of them."""
    if not intent:
        return None
    invoices = session.scalars(select(Transaction.stripe_object_id).where(
        Transaction.user_id == user.id, Transaction.type == "monthly_reset", Transaction.stripe_object_id.is_not(None))
        .order_by(Transaction.id.desc()).limit(13))
    for invoice_id in list(invoices):
        invoice = stripe.retrieve_invoice(invoice_id)
        payments = (invoice.get("payments") or {}).get("data") or []
        if any(stripe_id((p.get("payment") or {}).get("payment_intent")) == intent for p in payments):
            return stripe_id(invoice.get("subscription")) or stripe_id(
                ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription"))
    return None


def _entry_exists(session: Session, type: str, stripe_object_id: str) -> bool:
    return session.scalar(select(Transaction.id).where(Transaction.type == type,
                                                       Transaction.stripe_object_id == stripe_object_id)) is not None


def user_subscription(session: Session, user: User) -> Subscription | None:
    if user.stripe_subscription_id is None:
        return None
    return session.get(Subscription, user.stripe_subscription_id)


# --- what the user asks for ------------------------------------------------------------------------

def request_plan_change(session: Session, user: User, plan_id: str, stripe: StripeApi, prices: Mapping[str, str], *,
                        return_urls: tuple[str, str], idempotency_key: str) -> dict[str, Any]:
    """Ask Stripe for the change and say what will happen; the plan itself changes when
    Stripe's events say so. To a paid plan without a subscription: a Checkout Session; with
    one: its item moves to the new price (Stripe prorates); to free: it cancels at period end."""
    target = get_plan(session, plan_id)  # unknown plan: 400
    current = get_plan(session, user.plan_id)
    if target.id == FREE_PLAN_ID:
        if user.stripe_subscription_id is None:
            if current.id == FREE_PLAN_ID:
                return _answer("unchanged", target.id, "unchanged", "You are on the free plan.")
            raise NoSubscription("Your plan was not bought through Stripe; an operator set it")
        stripe.update_subscription(user.stripe_subscription_id, {"cancel_at_period_end": True},
                                   idempotency_key=f"{idempotency_key}:cancel")
        return _answer("cancel_at_period_end", target.id, "period_end",
                       "Your subscription ends at the end of the paid period; then you move to the free plan.")
    price = prices.get(target.id)
    if not price:
        raise PlanNotPurchasable(f"The {target.name} plan cannot be bought on this server (no Stripe price is set)")
    if user.stripe_subscription_id is None:
        customer = ensure_customer(session, user, stripe)
        success_url, cancel_url = return_urls
        checkout = stripe.create_checkout_session({
            "mode": "subscription", "customer": customer, "client_reference_id": str(user.id),
            "line_items": [{"price": price, "quantity": 1}],
            "metadata": {"user_id": str(user.id), "plan_id": target.id},
            "subscription_data": {"metadata": {"user_id": str(user.id), "plan_id": target.id}},
            "success_url": success_url, "cancel_url": cancel_url,
        }, idempotency_key=idempotency_key)
        return _answer("checkout", target.id, "after_payment",
                       f"Complete the payment to start the {target.name} plan.", url=checkout["url"],
                       session_id=checkout["id"])
    subscription = stripe.retrieve_subscription(user.stripe_subscription_id)
    item = _item(subscription)
    if _price_of(item) == price and not subscription.get("cancel_at_period_end"):
        return _answer("unchanged", target.id, "unchanged", f"You are already on the {target.name} plan.")
    upgrade = target.monthly_credits > current.monthly_credits
    # An upgrade is invoiced (prorated) at once, as its credits come at once; a downgrade
    # starts with the next period, so nothing is prorated back.
    stripe.update_subscription(user.stripe_subscription_id, {
        "items": [{"id": item["id"], "price": price}], "cancel_at_period_end": False,
        "proration_behavior": "always_invoice" if upgrade else "none",
    }, idempotency_key=idempotency_key)
    if upgrade:
        return _answer("subscription_updated", target.id, "now",
                       f"Upgrading to {target.name}: your plan credits are topped up as soon as Stripe confirms.")
    return _answer("subscription_updated", target.id, "period_end",
                   f"You move to {target.name} at the end of the paid period.")


def _answer(action: str, plan_id: str, effective: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"action": action, "plan_id": plan_id, "effective": effective, "message": message, **extra}


def next_billing_date(session: Session, user: User) -> dict[str, Any]:
    record = user_subscription(session, user)
    if record is None:
        return {"plan_id": user.plan_id, "kind": "reset", "next_date": user.credit_reset_at,
                "subscription_status": None, "cancel_at_period_end": False}
    return {"plan_id": user.plan_id, "kind": "renewal",
            "next_date": record.current_period_end or user.credit_reset_at,
            "subscription_status": record.status, "cancel_at_period_end": record.cancel_at_period_end}
