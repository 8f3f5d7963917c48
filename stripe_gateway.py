"""Every call StudioX makes to Stripe, through the official `stripe` library.

Create a customer; create and retrieve Checkout Sessions; retrieve, update and cancel
subscriptions; create a billing-portal session; list events; retrieve a charge or an
invoice. Nothing else. Objects come back as plain dicts (the shape of the pinned API version,
`stripe._api_version`) with JSON types (a decimal field as its string), the same shape a
webhook body carries, so one set of rules in
`models/` reads both. A refusal or an unreachable Stripe is a `BillingProviderError` (502).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import stripe

from models.billing import BillingContext
from models.errors import BillingProviderError
from settings import Settings

API_VERSION = stripe.api_version  # what the webhook endpoint must be created with


def _provider_error(exc: stripe.StripeError) -> BillingProviderError:
    if isinstance(exc, stripe.APIConnectionError):
        return BillingProviderError("Stripe could not be reached; try again")
    return BillingProviderError(f"Stripe refused the request: {exc.user_message or type(exc).__name__}")


def _plain(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs) -> dict[str, Any]:
        try:
            return method(self, *args, **kwargs).to_dict(for_json=True)
        except stripe.StripeError as exc:
            raise _provider_error(exc) from exc

    return call


class StripeGateway:
    def __init__(self, settings: Settings, *, timeout: float = 20.0, max_network_retries: int = 2):
        base = {"api": settings.stripe_api_base} if settings.stripe_api_base else None
        self.client = stripe.StripeClient(
            settings.stripe_secret_key, base_addresses=base, max_network_retries=max_network_retries,
            http_client=stripe.new_default_http_client(timeout=timeout),
        )
        # A live key only serves live events, a test key test ones.
        self.livemode = settings.stripe_secret_key.startswith(("sk_live_", "rk_live_"))

    @_plain
    def create_customer(self, *, user_id: str, email: str | None, name: str | None):
        # One customer per user, even when two requests race: the key names the user.
        return self.client.v1.customers.create(
            params={"email": email or "", "name": name or "", "metadata": {"user_id": user_id}},
            options={"idempotency_key": f"customer:{user_id}"},
        )

    @_plain
    def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str):
        return self.client.v1.checkout.sessions.create(params=params, options={"idempotency_key": idempotency_key})

    @_plain
    def retrieve_checkout_session(self, session_id: str):
        return self.client.v1.checkout.sessions.retrieve(session_id)

    @_plain
    def retrieve_subscription(self, subscription_id: str):
        return self.client.v1.subscriptions.retrieve(subscription_id)

    @_plain
    def update_subscription(self, subscription_id: str, params: dict[str, Any], *, idempotency_key: str):
        return self.client.v1.subscriptions.update(subscription_id, params=params,
                                                   options={"idempotency_key": idempotency_key})

    @_plain
    def cancel_subscription(self, subscription_id: str):
        return self.client.v1.subscriptions.cancel(subscription_id)

    @_plain
    def retrieve_charge(self, charge_id: str):
        return self.client.v1.charges.retrieve(charge_id)

    @_plain
    def retrieve_invoice(self, invoice_id: str):
        # With its payments: which payment intent paid it.
        return self.client.v1.invoices.retrieve(invoice_id, params={"expand": ["payments"]})

    @_plain
    def create_portal_session(self, *, customer: str, return_url: str):
        return self.client.v1.billing_portal.sessions.create(params={"customer": customer, "return_url": return_url})

    def list_events(self, *, since: datetime) -> Iterator[dict[str, Any]]:
        """Every event created at or after `since`, newest first (Stripe's order), page by page."""
        try:
            page = self.client.v1.events.list(params={"created": {"gte": int(since.timestamp())}, "limit": 100})
            for event in page.auto_paging_iter():
                yield event.to_dict(for_json=True)
        except stripe.StripeError as exc:
            raise _provider_error(exc) from exc


def billing_context(settings: Settings) -> BillingContext:
    """What applying Stripe's events needs: the plans' prices, and Stripe when configured."""
    gateway = StripeGateway(settings) if settings.stripe_configured else None
    return BillingContext(prices=dict(settings.stripe_prices), stripe=gateway,
                          livemode=gateway.livemode if gateway is not None else None)
