"""/api/billing: plans and packs, Stripe Checkout for packs and plans, the webhook, the history.

The routes that call Stripe answer 503 `billing_not_configured` without STRIPE_SECRET_KEY,
and the webhook without STRIPE_WEBHOOK_SECRET; the plan list always works. Credits and
plans change only through Stripe's events (or the success page's sync, which fulfils
through the same rule).
"""

from __future__ import annotations

import json
import logging
import uuid

import falcon
import stripe
from pydantic import ValidationError

from models.billing import billing_history, ensure_customer
from models.errors import BillingNotConfigured, InvalidInput, NoBillingAccount
from models.plans import FREE_PLAN_ID, list_plans
import metrics
from models.base import check_storable
from models.purchases import checkout_params, get_pack, list_packs, record_purchase, sync_checkout, user_purchase
from models.stripe_events import store_event
from models.subscriptions import next_billing_date, request_plan_change
from settings import Settings
from tasktypes import APPLY_STRIPE_EVENTS_JOB
from stripe_gateway import StripeGateway

from . import schemas
from .context import current_user
from .openapi import operation
from .serialize import history_entry_out, media, plans_out, purchase_out

log = logging.getLogger(__name__)

SIGNATURE_HEADER = {
    "name": "Stripe-Signature", "in": "header", "required": True, "schema": {"type": "string"},
    "description": "Stripe's signature of the raw body: `t=<unix time>,v1=<HMAC-SHA256 hex>`",
}
IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255},
    "description": "A retried request with the same key returns the same Checkout Session",
}


class Billing:
    """What the billing resources share: the settings and, when configured, Stripe."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stripe = StripeGateway(settings) if settings.stripe_configured else None

    def gateway(self) -> StripeGateway:
        if self.stripe is None:
            raise BillingNotConfigured("Billing is not configured on this server (STRIPE_SECRET_KEY is not set)")
        return self.stripe

    def return_urls(self) -> tuple[str, str]:
        base = self.settings.frontend_url
        return f"{base}/billing/success?session_id={{CHECKOUT_SESSION_ID}}", f"{base}/billing/cancel"

    def idempotency_key(self, req: falcon.Request, user_id: uuid.UUID, what: str) -> str:
        given = (req.get_header("Idempotency-Key") or "").strip()[:255]
        return f"{what}:{user_id}:{given or uuid.uuid4()}"


class PlansResource:
    auth = None

    def __init__(self, billing: Billing):
        self.billing = billing

    @operation("The plans, the credit packs and the price of each task type", responses={200: schemas.PlansOut})
    def on_get(self, req, resp) -> None:
        session = req.context.session
        resp.media = media(plans_out(list_plans(session), list_packs(session), self.billing.settings.stripe_prices))


class PurchaseCreditsResource:
    def __init__(self, billing: Billing):
        self.billing = billing

    @operation("Start a Stripe Checkout for a credit pack (credits come when Stripe says it is paid)",
               body=schemas.PurchaseCreditsBody, headers=(IDEMPOTENCY_HEADER,), responses={201: schemas.CheckoutOut},
               errors=(404, 502))
    def on_post(self, req, resp, body: schemas.PurchaseCreditsBody) -> None:
        stripe_api = self.billing.gateway()
        session, user = req.context.session, current_user(req)
        pack = get_pack(session, body.pack)
        customer = ensure_customer(session, user, stripe_api)
        session.commit()  # the customer is kept; no row stays locked across the next call to Stripe
        checkout = stripe_api.create_checkout_session(
            checkout_params(pack, user, customer, *self.billing.return_urls()),
            idempotency_key=self.billing.idempotency_key(req, user.id, f"purchase:{pack.id}"),
        )
        record_purchase(session, user.id, pack, checkout["id"])
        resp.status = falcon.HTTP_201
        resp.media = media(schemas.CheckoutOut(url=checkout["url"], session_id=checkout["id"]))


class SyncPurchaseResource:
    def __init__(self, billing: Billing):
        self.billing = billing

    @operation("Fulfil your Checkout Session now (the success page), through the webhook's own rule",
               responses={200: schemas.SyncOut}, errors=(404, 502))
    def on_post(self, req, resp, session_id: str) -> None:
        stripe_api = self.billing.gateway()
        session, user = req.context.session, current_user(req)
        user_purchase(session, user.id, session_id)  # yours, or 404
        outcome = sync_checkout(session, stripe_api.retrieve_checkout_session(session_id))
        purchase = user_purchase(session, user.id, session_id)
        session.refresh(user)
        resp.media = media(schemas.SyncOut(purchase=purchase_out(purchase), outcome=outcome, credits=user.credits))


class UpgradePlanResource:
    def __init__(self, billing: Billing):
        self.billing = billing

    @operation("Change your plan: Checkout for a first subscription, an update of the current one, or free "
               "at the end of the paid period", body=schemas.UpgradePlanBody, headers=(IDEMPOTENCY_HEADER,),
               responses={200: schemas.UpgradeOut}, errors=(404, 409, 502))
    def on_post(self, req, resp, body: schemas.UpgradePlanBody) -> None:
        stripe_api = self.billing.gateway()
        session, user = req.context.session, current_user(req)
        if body.plan_id != FREE_PLAN_ID and user.stripe_subscription_id is None:
            ensure_customer(session, user, stripe_api)
            session.commit()  # as for a purchase: no row locked across the Checkout call
        result = request_plan_change(
            session, user, body.plan_id, stripe_api, self.billing.settings.stripe_prices,
            return_urls=self.billing.return_urls(),
            idempotency_key=self.billing.idempotency_key(req, user.id, f"plan:{body.plan_id}"),
        )
        resp.media = media(schemas.UpgradeOut(**result))


class HistoryResource:
    @operation("Your purchases (with refunds and disputes), plan changes and paid periods, newest first",
               query=schemas.HistoryQuery, responses={200: schemas.HistoryPage}, errors=(404,))
    def on_get(self, req, resp, query: schemas.HistoryQuery) -> None:
        user = current_user(req)
        entries, cursor = billing_history(req.context.session, user.id, cursor=query.cursor, limit=query.limit)
        resp.media = media(schemas.HistoryPage(entries=[history_entry_out(e) for e in entries], next_cursor=cursor))


class NextDateResource:
    @operation("When your plan renews (paid plan) or your credits reset (free plan)",
               responses={200: schemas.NextDateOut}, errors=(404,))
    def on_get(self, req, resp) -> None:
        resp.media = media(schemas.NextDateOut(**next_billing_date(req.context.session, current_user(req))))


class PortalResource:
    def __init__(self, billing: Billing):
        self.billing = billing

    @operation("A Stripe customer-portal URL (invoices, payment methods, cancellation)",
               responses={200: schemas.PortalOut}, errors=(404, 409, 502))
    def on_post(self, req, resp) -> None:
        stripe_api = self.billing.gateway()
        user = current_user(req)
        if not user.stripe_customer_id:
            raise NoBillingAccount()
        portal = stripe_api.create_portal_session(customer=user.stripe_customer_id,
                                                  return_url=f"{self.billing.settings.frontend_url}/billing")
        resp.media = media(schemas.PortalOut(url=portal["url"]))


class WebhookResource:
    """Stripe's deliveries: verified on the raw body, stored by event id, applied by a worker.

    The store is one statement, so it runs in autocommit on a connection of its own (no
    request session): once it returns the event is committed, and the apply job goes out.
    """

    auth = None
    uses_db = False
    rate_limited = False  # Stripe's deliveries: a limit would only make Stripe retry

    def __init__(self, billing: Billing, engine, queue):
        self.secrets = billing.settings.stripe_webhook_secrets
        self.engine, self.queue = engine, queue

    @operation("Stripe's webhook: the raw body is verified against STRIPE_WEBHOOK_SECRET, stored once, then applied",
               headers=(SIGNATURE_HEADER,), request_content={"application/json": {"schema": {"type": "object"}}},
               responses={200: schemas.WebhookAck}, body_required=True, tags=("billing",))
    def on_post(self, req, resp) -> None:
        if not self.secrets:
            raise BillingNotConfigured("The webhook is not configured on this server (STRIPE_WEBHOOK_SECRET is not set)")
        try:
            event = self._verified(req)
        except InvalidInput:
            metrics.WEBHOOK_DELIVERIES.labels("unknown", "refused").inc()
            raise
        with self.engine.connect() as conn:
            inserted, waiting = store_event(conn.execution_options(isolation_level="AUTOCOMMIT"), event)
        metrics.WEBHOOK_DELIVERIES.labels(event["type"], "stored" if inserted else "duplicate").inc()
        if waiting:
            try:
                self.queue.send(APPLY_STRIPE_EVENTS_JOB, "")
            except Exception:  # stored: the reconciliation applies it
                log.exception("queueing the apply of Stripe event %s failed", event["id"])
        resp.media = media(schemas.WebhookAck(received=True, duplicate=not inserted))

    def _verified(self, req) -> dict:
        header = req.get_header("Stripe-Signature")
        if not header:
            raise InvalidInput("The Stripe-Signature header is missing", code="missing_signature")
        body = req.bounded_stream.read()
        verify(body, header, self.secrets)
        try:
            event = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidInput("The body is not valid JSON", code="invalid_event") from None
        if not isinstance(event, dict):
            raise InvalidInput("The body is not a Stripe event", code="invalid_event")
        try:
            schemas.StripeEventEnvelope.model_validate(event)
        except ValidationError as exc:
            raise InvalidInput.from_validation(exc, event, code="invalid_event") from None
        check_storable(event, code="invalid_event")
        return event


def verify(body: bytes, header: str, secrets: tuple[str, ...]) -> None:
    """Stripe's signature check, with its timestamp tolerance, against each configured secret.

    It is the check `stripe.Webhook.construct_event` runs before it parses; the body is
    parsed here, after it, so that a signed body that is not an event is a 400 too.
    """
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(body, header, secret, stripe.Webhook.DEFAULT_TOLERANCE)
            return
        except stripe.SignatureVerificationError:
            continue
        except (ValueError, TypeError):  # a body that is not UTF-8, a header that is not ASCII
            break
    raise InvalidInput("The Stripe signature does not verify (wrong secret, altered body or stale timestamp)",
                       code="invalid_signature")
