"""Credit packs and their purchases: what we sold is what we grant, and what refunds and
disputes take back never exceeds it.

A purchase row is written when the Checkout Session is created (pending) and is the only
source of the credits granted: an event's metadata never is. Fulfilment, refunds and
disputes each lock the purchase row first, then move the buckets through `post_entry`
with a ledger row keyed by the Stripe object, unique per type (invariants 4 and 7).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Integer, String, bindparam, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, sql_in, stripe_id, utcnow
from .credits import post_entry
from .errors import PackNotFound, PurchaseNotFound

if TYPE_CHECKING:
    from .billing import StripeApi
from .users import User, user_for_customer

PURCHASE_STATUSES = ("pending", "paid", "failed", "expired")
PAID_PAYMENT_STATUSES = ("paid", "no_payment_required")
DISPUTE_STATES = ("open", "reinstated", "lost")


class CreditPack(Base):
    __tablename__ = "credit_packs"
    __table_args__ = (
        CheckConstraint("credits > 0", name="credits_positive"),
        CheckConstraint("price_cents > 0", name="price_positive"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    credits: Mapped[int] = mapped_column(Integer)
    price_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    stripe_price_id: Mapped[str | None] = mapped_column(String(128))
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    sort_order: Mapped[int] = mapped_column(Integer, default=0)


class Purchase(Base):
    """One Checkout Session for a credit pack, and everything Stripe later says about it.

    Credits (all in credits, not cents): `credits` were granted when paid; refunds claim
    `refund_claim` of them and the dispute `dispute_claim`; of the claims, what the
    purchased bucket still held was taken (`credits_taken_back`, net of a reinstatement) and
    the rest had been spent (`shortfall`).
    """

    __tablename__ = "purchases"
    __table_args__ = (
        CheckConstraint(sql_in("status", PURCHASE_STATUSES), name="status_known"),
        CheckConstraint(f"dispute_state IS NULL OR {sql_in('dispute_state', DISPUTE_STATES)}", name="dispute_state_known"),
        CheckConstraint("credits > 0", name="credits_positive"),
        CheckConstraint("amount_refunded >= 0 AND refund_claim >= 0 AND dispute_claim >= 0 AND dispute_taken >= 0"
                        " AND dispute_reinstated >= 0 AND credits_taken_back >= 0 AND shortfall >= 0",
                        name="amounts_nonnegative"),
        # Invariant 7: what is taken back (or owed) never exceeds what was granted, and a
        # reinstatement never exceeds what its dispute took.
        CheckConstraint("credits_taken_back + shortfall <= credits", name="takes_within_grant"),
        # A reinstated dispute's claim is over: only an active one counts against the grant.
        CheckConstraint("refund_claim + CASE WHEN dispute_state = 'reinstated' THEN 0 ELSE dispute_claim END"
                        " <= credits", name="claims_within_grant"),
        CheckConstraint("dispute_taken <= dispute_claim AND dispute_reinstated <= dispute_taken",
                        name="reinstated_within_taken"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    pack_id: Mapped[str] = mapped_column(ForeignKey("credit_packs.id"))
    credits: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    stripe_session_id: Mapped[str] = mapped_column(String(255), unique=True)
    payment_intent: Mapped[str | None] = mapped_column(String(255), unique=True)
    amount_paid: Mapped[int | None] = mapped_column(Integer)
    currency: Mapped[str | None] = mapped_column(String(3))
    amount_refunded: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    refund_claim: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    dispute_id: Mapped[str | None] = mapped_column(String(255))
    dispute_state: Mapped[str | None] = mapped_column(String(16))
    dispute_amount: Mapped[int | None] = mapped_column(Integer)
    dispute_claim: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    dispute_taken: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    dispute_reinstated: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    credits_taken_back: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    shortfall: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    paid_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now(), onupdate=utcnow)


def list_packs(session: Session) -> list[CreditPack]:
    return list(session.scalars(select(CreditPack).where(CreditPack.active).order_by(CreditPack.sort_order)))


def get_pack(session: Session, pack_id: str) -> CreditPack:
    pack = session.get(CreditPack, pack_id)
    if pack is None or not pack.active:
        raise PackNotFound(f"Unknown credit pack {pack_id!r}")
    return pack


def record_purchase(session: Session, user_id: uuid.UUID, pack: CreditPack, stripe_session_id: str) -> Purchase:
    """The pending purchase of a Checkout Session just created (a retried create with the
    same idempotency key returns the same session, and the same row)."""
    existing = session.scalar(select(Purchase).where(Purchase.stripe_session_id == stripe_session_id))
    if existing is not None:
        return existing
    purchase = Purchase(user_id=user_id, pack_id=pack.id, credits=pack.credits, stripe_session_id=stripe_session_id)
    session.add(purchase)
    session.flush()
    return purchase


def user_purchase(session: Session, user_id: uuid.UUID, stripe_session_id: str) -> Purchase:
    """The user's purchase of that session; another user's, or none, is not found (invariant 6)."""
    purchase = session.scalar(select(Purchase).where(Purchase.stripe_session_id == stripe_session_id,
                                                     Purchase.user_id == user_id))
    if purchase is None:
        raise PurchaseNotFound()
    return purchase


def checkout_params(pack: CreditPack, user: User, customer: str, success_url: str, cancel_url: str) -> dict[str, Any]:
    """A payment-mode Checkout Session for one pack: its Stripe price, or inline price data."""
    if pack.stripe_price_id:
        line = {"price": pack.stripe_price_id, "quantity": 1}
    else:
        line = {"quantity": 1, "price_data": {"currency": pack.currency, "unit_amount": pack.price_cents,
                                              "product_data": {"name": f"StudioX: {pack.name}"}}}
    metadata = {"user_id": str(user.id), "pack_id": pack.id, "credits": str(pack.credits)}
    return {
        "mode": "payment", "customer": customer, "client_reference_id": str(user.id), "line_items": [line],
        "metadata": metadata, "payment_intent_data": {"metadata": metadata},
        "success_url": success_url, "cancel_url": cancel_url,
    }


def sync_checkout(session: Session, checkout: Mapping[str, Any]) -> str:
    """The success page's fulfilment: the session as Stripe has it now, through the same rule
    as the webhook (whichever comes first grants; the other finds it done)."""
    if checkout.get("status") == "expired":
        return close_checkout(session, checkout, "expired")
    return fulfil_checkout(session, checkout)


_LOCK_BY_SESSION = (select(Purchase).where(Purchase.stripe_session_id == bindparam("key"))
                    .with_for_update().execution_options(populate_existing=True))
_LOCK_BY_INTENT = (select(Purchase).where(Purchase.payment_intent == bindparam("key"))
                   .with_for_update().execution_options(populate_existing=True))


def _purchased_credits(session: Session, user_id: uuid.UUID) -> int:
    # The lock makes what is taken below what the bucket holds when the UPDATE runs.
    return session.scalar(select(User.purchased_credits).where(User.id == user_id).with_for_update())


# --- fulfilment ---------------------------------------------------------------------------------

def fulfil_checkout(session: Session, checkout: Mapping[str, Any], *, event_id: str | None = None) -> str:
    """Grant the pack of a paid Checkout Session, once, whoever asks first (the webhook or
    the success page's sync). Returns what happened."""
    purchase = session.scalar(_LOCK_BY_SESSION, {"key": checkout["id"]})
    if purchase is None:
        return "unknown_session"  # not one we created: nothing is granted
    if purchase.status == "paid":
        return "already_fulfilled"
    if checkout.get("payment_status") not in PAID_PAYMENT_STATUSES:
        return "awaiting_payment"
    post_entry(session, purchase.user_id, type="credit_purchase", purchased_delta=purchase.credits,
               purchase_id=purchase.id, stripe_object_id=checkout["id"], stripe_event_id=event_id,
               description=f"Purchased {purchase.credits} credits")
    purchase.status = "paid"
    purchase.paid_at = utcnow()
    purchase.payment_intent = stripe_id(checkout.get("payment_intent"))
    purchase.amount_paid = checkout.get("amount_total")
    purchase.currency = checkout.get("currency")
    session.flush()
    return "credits_granted"


def close_checkout(session: Session, checkout: Mapping[str, Any], status: str) -> str:
    """A session that expired, or whose delayed payment failed: closed, nothing granted."""
    purchase = session.scalar(_LOCK_BY_SESSION, {"key": checkout["id"]})
    if purchase is None:
        return "unknown_session"
    if purchase.status != "pending":
        return f"already_{purchase.status}"
    purchase.status = status
    session.flush()
    return f"purchase_{status}"


# --- refunds and disputes ------------------------------------------------------------------------

def apply_refund(session: Session, charge: Mapping[str, Any], *, stripe: StripeApi | None = None,
                 event_id: str | None = None) -> str:
    """A charge's refunds (cumulative `amount_refunded`) take back their share of the pack:
    floor(credits * refunded / paid) in all, so a second partial refund takes only the new part."""
    purchase = _purchase_paid_by(session, stripe_id(charge.get("payment_intent")), charge.get("customer"), stripe)
    if purchase is None or purchase.status != "paid":
        return "not_a_purchase"
    refunded = int(charge.get("amount_refunded") or 0)
    if refunded <= purchase.amount_refunded:
        return "refund_already_applied"
    purchase.amount_refunded = refunded
    target = min(_share(purchase, refunded), purchase.credits - _active_dispute_claim(purchase))
    claim = target - purchase.refund_claim
    if claim <= 0:
        session.flush()
        return "refund_recorded"
    taken = _take_back(session, purchase, claim, object_id=f"{charge['id']}:refunded:{refunded}", event_id=event_id,
                       description=f"Refund of {refunded / 100:.2f} {purchase.currency or ''}".rstrip())
    purchase.refund_claim = target
    session.flush()
    return "credits_taken_back" if taken else "refund_after_spending"


def apply_dispute(session: Session, dispute: Mapping[str, Any], *, event_type: str, stripe: StripeApi | None = None,
                  event_id: str | None = None) -> str | None:
    """A dispute on a credit purchase: opened (or funds withdrawn) takes the disputed share
    back; reinstated funds (or a dispute closed as won) give back exactly what it took;
    lost is final. None when the disputed payment is not a credit purchase."""
    intent = stripe_id(dispute.get("payment_intent"))
    purchase = session.scalar(_LOCK_BY_INTENT, {"key": intent}) if intent else None
    if purchase is None and stripe is not None and dispute.get("charge"):
        customer = stripe.retrieve_charge(stripe_id(dispute["charge"])).get("customer")
        purchase = _purchase_paid_by(session, intent, customer, stripe)
    if purchase is None:
        return None
    if purchase.status != "paid":
        return "not_a_purchase"
    if purchase.dispute_id not in (None, dispute["id"]):
        return "other_dispute"  # Stripe allows one dispute per charge
    purchase.dispute_id = dispute["id"]
    status = dispute.get("status")
    if event_type == "charge.dispute.funds_reinstated" or (event_type == "charge.dispute.closed"
                                                           and status in ("won", "warning_closed")):
        return _reinstate(session, purchase, event_id)
    if event_type == "charge.dispute.closed" and status == "lost":
        if purchase.dispute_state != "reinstated":
            purchase.dispute_state = "lost"
        outcome = _claim_dispute(session, purchase, dispute, event_id)
        return outcome if outcome != "dispute_already_applied" else "dispute_lost"
    return _claim_dispute(session, purchase, dispute, event_id)


def _purchase_paid_by(session: Session, intent: str | None, customer: Any, stripe: StripeApi | None
                      ) -> Purchase | None:
    """The credit purchase a payment intent paid for, locked.

    A refund or a dispute can overtake the event of the payment itself (Stripe does not
    promise an order). Then the payer's pending purchases are looked up in Stripe: the one
    whose session this intent paid is fulfilled first, by the same rule as its own event,
    so what the refund takes back was granted and nothing is lost.
    """
    if not intent:
        return None
    purchase = session.scalar(_LOCK_BY_INTENT, {"key": intent})
    if purchase is not None or stripe is None:
        return purchase
    user = user_for_customer(session, customer)
    if user is None:
        return None
    pending = session.scalars(select(Purchase.stripe_session_id).where(
        Purchase.user_id == user.id, Purchase.status == "pending").order_by(Purchase.created_at.desc()).limit(5))
    for session_id in list(pending):
        checkout = stripe.retrieve_checkout_session(session_id)
        if stripe_id(checkout.get("payment_intent")) == intent:
            fulfil_checkout(session, checkout)
            return session.scalar(_LOCK_BY_INTENT, {"key": intent})
    return None


def _claim_dispute(session: Session, purchase: Purchase, dispute: Mapping[str, Any], event_id: str | None) -> str:
    if purchase.dispute_state == "reinstated" or purchase.dispute_claim:
        session.flush()
        return "dispute_already_applied"
    purchase.dispute_state = purchase.dispute_state or "open"
    purchase.dispute_amount = int(dispute.get("amount") or purchase.amount_paid or 0)
    target = min(_share(purchase, purchase.dispute_amount), purchase.credits - purchase.refund_claim)
    if target <= 0:
        session.flush()
        return "dispute_recorded"
    purchase.dispute_taken = _take_back(session, purchase, target, object_id=dispute["id"], event_id=event_id,
                                        description="Payment disputed")
    purchase.dispute_claim = target
    session.flush()
    return "credits_taken_back" if purchase.dispute_taken else "dispute_after_spending"


def _reinstate(session: Session, purchase: Purchase, event_id: str | None) -> str:
    if purchase.dispute_state == "reinstated":
        return "dispute_already_reinstated"
    purchase.dispute_state = "reinstated"
    if purchase.dispute_taken:
        post_entry(session, purchase.user_id, type="credit_reinstated", purchased_delta=purchase.dispute_taken,
                   purchase_id=purchase.id, stripe_object_id=purchase.dispute_id, stripe_event_id=event_id,
                   description="Dispute won: credits reinstated")
    # What the dispute claimed is no longer owed: neither what it took nor what was spent.
    purchase.credits_taken_back -= purchase.dispute_taken
    purchase.shortfall -= purchase.dispute_claim - purchase.dispute_taken
    purchase.dispute_reinstated = purchase.dispute_taken
    session.flush()
    return "credits_reinstated"


def _take_back(session: Session, purchase: Purchase, claim: int, *, object_id: str, event_id: str | None,
               description: str) -> int:
    """Take up to `claim` credits from the purchased bucket (never below zero); what was
    already spent is recorded as the purchase's shortfall. Returns what was taken."""
    taken = min(claim, _purchased_credits(session, purchase.user_id))
    if taken:
        post_entry(session, purchase.user_id, type="credit_clawback", purchased_delta=-taken,
                   purchase_id=purchase.id, stripe_object_id=object_id, stripe_event_id=event_id,
                   description=description)
    purchase.credits_taken_back += taken
    purchase.shortfall += claim - taken
    return taken


def _share(purchase: Purchase, amount: int) -> int:
    """The credits that `amount` (in the smallest currency unit) of the payment bought."""
    if not purchase.amount_paid:
        return purchase.credits if amount > 0 else 0
    return min(purchase.credits, purchase.credits * amount // purchase.amount_paid)


def _active_dispute_claim(purchase: Purchase) -> int:
    return 0 if purchase.dispute_state == "reinstated" else purchase.dispute_claim
