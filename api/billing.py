"""/api/billing: the public plan list and price table.

The Stripe routes of the contract are registered and documented, and answer 503
`billing_not_configured` until billing is built (see the README).
"""

from __future__ import annotations

from models.errors import BillingNotConfigured
from models.plans import list_plans

from . import schemas
from .openapi import operation
from .serialize import media, plans_out


class PlansResource:
    auth = None

    @operation("The plans and the price of each task type", responses={200: schemas.PlansOut})
    def on_get(self, req, resp) -> None:
        resp.media = media(plans_out(list_plans(req.context.session)))


def _not_built(method: str, summary: str, *, auth: str | None = "user") -> type:
    @operation(summary, responses={200: {}}, errors=(503,))
    def responder(self, req, resp, **params) -> None:
        raise BillingNotConfigured()

    return type(f"Billing{method.title()}Resource", (), {"auth": auth, "uses_db": False, f"on_{method}": responder})


WebhookResource = _not_built("post", "Stripe's webhook (signature-verified)", auth=None)
PurchaseCreditsResource = _not_built("post", "Start a Stripe Checkout for a credit pack")
SyncPurchaseResource = _not_built("post", "Fulfil a Checkout Session from the success page")
UpgradePlanResource = _not_built("post", "Upgrade, downgrade or cancel your subscription")
HistoryResource = _not_built("get", "Your purchases and subscription payments")
NextDateResource = _not_built("get", "When your credits reset and your subscription renews")
PortalResource = _not_built("post", "A Stripe customer-portal URL")
