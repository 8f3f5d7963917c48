"""Stripe's events: stored once by id, then applied once (invariant 4).

The webhook (or the reconciliation job) stores an event with an insert-or-skip on its id
and commits, then queues the apply job (`tasktypes.APPLY_STRIPE_EVENTS_JOB`); a worker
applies it. Applying locks the event's row, runs the rule for
its type and marks it handled in the same transaction as the rule's effect, so a second
delivery, a second apply or a crash in between changes nothing twice; an event whose
apply failed stays unhandled, with its attempts and last error, for the next retry.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Boolean, Index, Integer, String, Text, bindparam, func, select, text
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, stripe_id, utcnow
from .billing import BillingContext
from .purchases import apply_dispute, apply_refund, close_checkout, fulfil_checkout
from .subscriptions import apply_invoice_paid, apply_subscription, subscription_paid_by
from .users import user_for_customer


class StripeEvent(Base):
    __tablename__ = "stripe_events"
    __table_args__ = (
        Index("ix_stripe_events_unhandled", "received_at", postgresql_where=text("handled_at IS NULL")),
        Index("ix_stripe_events_created", "created"),
    )

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    livemode: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # Stripe's own time of the event (`created`); the reconciliation lists from it.
    created: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    handled_at: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    # What applying it did (credits_granted, stale, unknown_session, ignored, ...).
    outcome: Mapped[str | None] = mapped_column(String(64))


class SyncCursor(Base):
    """Where a job that reads a remote list got to (the reconciliation's place in Stripe's events)."""

    __tablename__ = "sync_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


_STORE = (
    insert(StripeEvent.__table__)
    .values(id=bindparam("id"), type=bindparam("type"), payload=bindparam("payload", type_=JSONB),
            livemode=bindparam("livemode"), created=bindparam("created"), received_at=bindparam("received_at"))
    .on_conflict_do_nothing(index_elements=[StripeEvent.__table__.c.id])
    .returning(StripeEvent.__table__.c.id)
)
_HANDLED = select(StripeEvent.handled_at).where(StripeEvent.id == bindparam("id"))


def store_event(conn: Connection | Session, event: Mapping[str, Any]) -> tuple[bool, bool]:
    """Store a verified event unless its id is known (one INSERT .. ON CONFLICT DO NOTHING,
    fine in autocommit). Returns (new, waiting): whether it was new, and whether it still
    waits to be applied, for the caller to queue the apply job once this is committed."""
    created = event.get("created")
    inserted = conn.scalar(_STORE, {
        "id": event["id"], "type": event["type"], "payload": dict(event), "livemode": bool(event.get("livemode")),
        "created": datetime.fromtimestamp(int(created), timezone.utc) if created is not None else None,
        "received_at": utcnow(),
    }) is not None
    return inserted, inserted or conn.scalar(_HANDLED, {"id": event["id"]}) is None


def apply_event(session: Session, event_id: str, ctx: BillingContext) -> str:
    """Apply a stored event once; its effect and its handled mark commit together."""
    row = session.scalar(select(StripeEvent).where(StripeEvent.id == event_id).with_for_update()
                         .execution_options(populate_existing=True))
    if row is None:
        return "not_stored"
    return _apply_row(session, row, ctx)


def replay_event(session: Session, event_id: str, ctx: BillingContext) -> str:
    """An operator's replay: run the event's rule again, handled or not. Every rule is
    idempotent (the purchase's state, the subscription's last applied state and the
    ledger's unique keys decide), so a replay changes only what was never applied."""
    session.execute(_APPLIER_LOCK)  # taking turns with the workers' batches
    row = session.scalar(select(StripeEvent).where(StripeEvent.id == event_id).with_for_update()
                         .execution_options(populate_existing=True))
    if row is None:
        raise LookupError(f"no stored Stripe event {event_id}")
    return _apply_row(session, row, ctx, replay=True)


def _apply_row(session: Session, row: StripeEvent, ctx: BillingContext, *, replay: bool = False) -> str:
    """Apply an event whose row this transaction holds locked."""
    if row.handled_at is not None and not replay:
        return "duplicate"
    if ctx.livemode is not None and row.livemode != ctx.livemode:
        outcome = "ignored_livemode"
    else:
        handler = HANDLERS.get(row.type)
        outcome = handler(session, row.payload, ctx) if handler else "ignored"
    row.attempts += 1
    row.handled_at, row.outcome, row.last_error = utcnow(), outcome, None
    session.flush()
    return outcome


# One applier at a time (a transaction-level advisory lock): two batches holding the row
# locks of different users could otherwise wait on each other.
_APPLIER_LOCK = text("SELECT pg_advisory_xact_lock(2026112911)")


def apply_waiting_events(session: Session, ctx: BillingContext, *, limit: int = 50,
                         exclude: Collection[str] = ()) -> tuple[list[tuple[str, str, str]], list[tuple[str, Exception]]]:
    """Apply up to `limit` waiting events, in Stripe's order, in this transaction (one
    commit for the batch, not one per event). Returns (event id, type, outcome) for each applied
    and (event id, error) for each that failed.

    The batch runs in one savepoint; if an event fails, that savepoint is rolled back and
    the batch is redone with a savepoint per event, so only the failing one is left out
    (its failure recorded) and the others are applied.
    """
    session.execute(_APPLIER_LOCK)
    rows = list(session.scalars(
        select(StripeEvent).where(StripeEvent.id.in_(unhandled_events(session, limit=limit, exclude=exclude)))
        .order_by(StripeEvent.created.nulls_last(), StripeEvent.received_at)
        .with_for_update().execution_options(populate_existing=True)))
    try:
        with session.begin_nested():
            return [(row.id, row.type, _apply_row(session, row, ctx)) for row in rows], []
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise  # the batch is lost with its connection; the next run redoes it
    except Exception:
        pass
    applied: list[tuple[str, str, str]] = []
    failed: list[tuple[str, Exception]] = []
    for row in rows:
        try:
            with session.begin_nested():
                applied.append((row.id, row.type, _apply_row(session, row, ctx)))
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise
            failed.append((row.id, exc))
        except Exception as exc:
            failed.append((row.id, exc))
        if failed and failed[-1][0] == row.id:
            record_failure(session, row.id, f"{type(failed[-1][1]).__name__}: {failed[-1][1]}")
    return applied, failed


def record_failure(session: Session, event_id: str, error: str) -> None:
    """Count a failed apply (in its own transaction: the apply's was rolled back)."""
    session.execute(StripeEvent.__table__.update().where(StripeEvent.id == event_id, StripeEvent.handled_at.is_(None))
                    .values(attempts=StripeEvent.attempts + 1, last_error=error[:2000]))


# An event that failed this often is left for an operator (its last error says why).
MAX_ATTEMPTS = 25


def unhandled_events(session: Session, *, limit: int = 500, exclude: Collection[str] = ()) -> list[str]:
    """Stored events still waiting (their apply failed fewer than MAX_ATTEMPTS times, or has
    not run yet), except those in `exclude`."""
    query = select(StripeEvent.id).where(StripeEvent.handled_at.is_(None), StripeEvent.attempts < MAX_ATTEMPTS)
    if exclude:
        query = query.where(StripeEvent.id.not_in(list(exclude)))
    return list(session.scalars(
        query
        # In Stripe's order: a payment's event before its refund's.
        .order_by(StripeEvent.created.nulls_last(), StripeEvent.received_at).limit(limit)
    ))


def cursor_position(session: Session, name: str) -> datetime | None:
    return session.scalar(select(SyncCursor.position).where(SyncCursor.name == name))


def move_cursor(session: Session, name: str, position: datetime) -> None:
    session.execute(insert(SyncCursor).values(name=name, position=position, updated_at=utcnow())
                    .on_conflict_do_update(index_elements=[SyncCursor.name],
                                           set_={"position": position, "updated_at": utcnow()}))


# --- the rules by event type ---------------------------------------------------------------------

def _object(event: Mapping[str, Any]) -> Mapping[str, Any]:
    return (event.get("data") or {}).get("object") or {}


def _checkout_completed(session: Session, event, ctx: BillingContext) -> str:
    checkout = _object(event)
    if checkout.get("mode") == "subscription":
        _link_customer(session, checkout)
        return "subscription_checkout"  # the subscription's own events do the rest
    return fulfil_checkout(session, checkout, event_id=event["id"])


def _link_customer(session: Session, checkout: Mapping[str, Any]) -> None:
    user = user_for_customer(session, None, {"user_id": checkout.get("client_reference_id")})
    customer = stripe_id(checkout.get("customer"))
    if user is not None and customer and user.stripe_customer_id is None:
        user.stripe_customer_id = customer


def _subscription(deleted: bool) -> Callable:
    def handle(session: Session, event, ctx: BillingContext) -> str:
        return apply_subscription(session, _object(event), ctx, as_of=int(event["created"]), event_id=event["id"],
                                  deleted=deleted)

    return handle


def _charge_refunded(session: Session, event, ctx: BillingContext) -> str:
    return apply_refund(session, _object(event), stripe=ctx.stripe, event_id=event["id"])


def _refund(session: Session, event, ctx: BillingContext) -> str:
    # A refund names its charge; the charge's cumulative amount refunded decides (and its
    # own `charge.refunded` event carries the same, for a refund without a charge id).
    refund = _object(event)
    if refund.get("status") != "succeeded" or not refund.get("charge") or ctx.stripe is None:
        return "refund_not_succeeded"
    charge = ctx.stripe.retrieve_charge(stripe_id(refund["charge"]))
    return apply_refund(session, charge, stripe=ctx.stripe, event_id=event["id"])


def _dispute(session: Session, event, ctx: BillingContext) -> str:
    dispute = _object(event)
    outcome = apply_dispute(session, dispute, event_type=event["type"], stripe=ctx.stripe, event_id=event["id"])
    if outcome is not None:
        return outcome
    if event["type"] != "charge.dispute.created" or ctx.stripe is None or not dispute.get("charge"):
        return "not_a_purchase"
    # A dispute on a subscription payment (positively: one of the user's paid invoices was
    # paid by it) cancels that subscription, if it is still theirs; its deleted event then
    # moves them to free.
    charge = ctx.stripe.retrieve_charge(stripe_id(dispute["charge"]))
    user = user_for_customer(session, charge.get("customer"))
    if user is None:
        return "not_a_purchase"
    subscription_id = subscription_paid_by(session, user, stripe_id(dispute.get("payment_intent")), ctx.stripe)
    if subscription_id is None:
        return "not_a_purchase"
    if subscription_id != user.stripe_subscription_id:
        return "subscription_already_ended"
    ctx.stripe.cancel_subscription(subscription_id)
    return "subscription_cancelled"


HANDLERS: dict[str, Callable[[Session, Mapping[str, Any], BillingContext], str]] = {
    "checkout.session.completed": _checkout_completed,
    "checkout.session.async_payment_succeeded": _checkout_completed,
    "checkout.session.async_payment_failed": lambda s, e, c: close_checkout(s, _object(e), "failed"),
    "checkout.session.expired": lambda s, e, c: close_checkout(s, _object(e), "expired"),
    "customer.subscription.created": _subscription(False),
    "customer.subscription.updated": _subscription(False),
    "customer.subscription.deleted": _subscription(True),
    "invoice.paid": lambda s, e, c: apply_invoice_paid(s, _object(e), c, event_id=e["id"]),
    "charge.refunded": _charge_refunded,
    "refund.created": _refund,
    "refund.updated": _refund,
    "charge.dispute.created": _dispute,
    "charge.dispute.funds_withdrawn": _dispute,
    "charge.dispute.funds_reinstated": _dispute,
    "charge.dispute.closed": _dispute,
}
