"""Stripe's API on loopback, with state, for the billing tests: the real `stripe` library
talks to it through STRIPE_API_BASE (StripeClient's `base_addresses`), and webhook bodies
are signed with Stripe's real scheme (`t=<unix time>,v1=HMAC-SHA256(secret, "t.body")`).

It keeps customers, Checkout Sessions, subscriptions, invoices, charges and the event log,
so a test can play a whole purchase or subscription and then deliver (or withhold) the
events Stripe would send. Only what the service calls is served; anything else is a 404 in
Stripe's error shape, so a call the service should not make fails loudly.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

_ids = itertools.count(1)


def new_id(prefix: str) -> str:
    return f"{prefix}_test{next(_ids):08d}"


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header Stripe would send with `payload`."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def form_to_dict(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][0][c]=v`) back into nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        *path, last = re.findall(r"[^\[\]]+", key)
        node = root
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    # Objects whose keys are 0, 1, 2, ... were arrays.
    if not isinstance(node, dict):
        return node
    items = {key: _lists(value) for key, value in node.items()}
    if items and all(key.isdigit() for key in items):
        return [items[key] for key in sorted(items, key=int)]
    return items


class FakeStripe:
    def __init__(self) -> None:
        self.customers: dict[str, dict] = {}
        self.sessions: dict[str, dict] = {}
        self.subscriptions: dict[str, dict] = {}
        self.invoices: dict[str, dict] = {}
        self.charges: dict[str, dict] = {}
        self.disputes: dict[str, dict] = {}
        self.events: list[dict] = []
        # price id -> unit amount, for subscription-mode sessions and subscription items
        self.prices: dict[str, int] = {}
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, params)
        self._idempotent: dict[str, tuple[int, dict]] = {}
        self._lock = threading.RLock()  # handlers record events under it too
        self._server: ThreadingHTTPServer | None = None

    # --- the server ------------------------------------------------------------------------

    def start(self) -> FakeStripe:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                params = form_to_dict(parse_qsl(parts.query, keep_blank_values=True)
                                      + parse_qsl(body, keep_blank_values=True))
                status, payload = fake.handle(self.command, parts.path, params,
                                              self.headers.get("Idempotency-Key"))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", new_id("req"))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # --- the API -----------------------------------------------------------------------------

    def handle(self, method: str, path: str, params: dict, idempotency_key: str | None) -> tuple[int, dict]:
        with self._lock:
            self.requests.append((method, path, params))
            if method == "POST" and idempotency_key:
                replay = self._idempotent.get(idempotency_key)
                if replay is not None:
                    return replay
            answer = self._route(method, path, params)
            if method == "POST" and idempotency_key:
                self._idempotent[idempotency_key] = answer
            return answer

    def _route(self, method: str, path: str, params: dict) -> tuple[int, dict]:
        segments = path.strip("/").split("/")
        match (method, segments):
            case ("POST", ["v1", "customers"]):
                customer = {"id": new_id("cus"), "object": "customer", "email": params.get("email"),
                            "metadata": params.get("metadata", {}), "created": int(time.time())}
                self.customers[customer["id"]] = customer
                return 200, customer
            case ("POST", ["v1", "checkout", "sessions"]):
                return 200, self._create_session(params)
            case ("GET", ["v1", "checkout", "sessions", session_id]) if session_id in self.sessions:
                return 200, self.sessions[session_id]
            case ("GET", ["v1", "subscriptions", sub_id]) if sub_id in self.subscriptions:
                return 200, self.subscriptions[sub_id]
            case ("POST", ["v1", "subscriptions", sub_id]) if sub_id in self.subscriptions:
                return 200, self._update_subscription(sub_id, params)
            case ("DELETE", ["v1", "subscriptions", sub_id]) if sub_id in self.subscriptions:
                return 200, self._end_subscription(sub_id)
            case ("GET", ["v1", "disputes", dispute_id]) if dispute_id in self.disputes:
                return 200, self.disputes[dispute_id]
            case ("GET", ["v1", "invoices", invoice_id]) if invoice_id in self.invoices:
                return 200, self.invoices[invoice_id]
            case ("GET", ["v1", "charges", charge_id]) if charge_id in self.charges:
                return 200, self.charges[charge_id]
            case ("POST", ["v1", "billing_portal", "sessions"]):
                return 200, {"id": new_id("bps"), "object": "billing_portal.session",
                             "customer": params.get("customer"), "url": f"{self.url}/portal/{new_id('p')}"}
            case ("GET", ["v1", "events"]):
                return 200, self._list_events(params)
        return 404, {"error": {"type": "invalid_request_error", "message": f"No such route: {method} {path}"}}

    def _create_session(self, params: dict) -> dict:
        session_id = new_id("cs")
        line_items = params.get("line_items") or []
        amount = 0
        for item in line_items:
            price = item.get("price_data") or {"unit_amount": self.prices.get(item.get("price"), 0)}
            amount += int(price.get("unit_amount", 0)) * int(item.get("quantity", 1))
        session = {
            "id": session_id, "object": "checkout.session", "mode": params.get("mode", "payment"),
            "status": "open", "payment_status": "unpaid", "customer": params.get("customer"),
            "client_reference_id": params.get("client_reference_id"), "metadata": params.get("metadata", {}),
            "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url"),
            "amount_total": amount, "currency": (line_items[0].get("price_data") or {}).get("currency", "usd")
            if line_items else "usd",
            "payment_intent": None, "subscription": None, "livemode": False, "line_items_": line_items,
            "subscription_data": params.get("subscription_data") or {},
            "url": f"{self.url}/pay/{session_id}", "created": int(time.time()),
        }
        self.sessions[session_id] = session
        return session

    def _list_events(self, params: dict) -> dict:
        created = params.get("created") or {}
        after = int(created.get("gt", -1)) if isinstance(created, dict) else -1
        since = int(created.get("gte", 0)) if isinstance(created, dict) else 0
        limit = int(params.get("limit", 10))
        # Newest first, as Stripe lists; `starting_after` pages on.
        found = [e for e in reversed(self.events) if e["created"] > after and e["created"] >= since]
        if params.get("starting_after"):
            ids = [e["id"] for e in found]
            found = found[ids.index(params["starting_after"]) + 1:] if params["starting_after"] in ids else []
        return {"object": "list", "data": found[:limit], "has_more": len(found) > limit, "url": "/v1/events"}

    # --- what happens on Stripe's side, for tests ---------------------------------------------

    def event(self, type: str, obj: dict, *, created: int | None = None) -> dict:
        """Record an event as Stripe would (also listed by /v1/events); return it."""
        event = {"id": new_id("evt"), "object": "event", "type": type, "api_version": "2026-10-28.endive",
                 "created": created or int(time.time()), "livemode": False, "data": {"object": copy.deepcopy(obj)},
                 "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}}
        with self._lock:
            self.events.append(event)
        return event

    def pay_session(self, session_id: str) -> dict:
        """The customer pays a payment-mode session: a payment intent and a charge exist, and
        `checkout.session.completed` is emitted (returned, not delivered). A subscription-mode
        session also starts its subscription: see `subscribe`."""
        session = self.sessions[session_id]
        if session["mode"] == "subscription":
            return self.subscribe(session_id)[-1]
        intent = new_id("pi")
        session.update(status="complete", payment_status="paid", payment_intent=intent)
        self._charge(intent, session["amount_total"], session["currency"], session["customer"])
        return self.event("checkout.session.completed", session)

    def charge_of(self, payment_intent: str) -> dict:
        return next(c for c in self.charges.values() if c["payment_intent"] == payment_intent)

    def _charge(self, intent: str, amount: int, currency: str, customer: str | None) -> dict:
        charge = new_id("ch")
        self.charges[charge] = {"id": charge, "object": "charge", "payment_intent": intent, "amount": amount,
                                "amount_refunded": 0, "currency": currency, "refunded": False,
                                "customer": customer, "disputed": False}
        return self.charges[charge]

    def expire_session(self, session_id: str) -> dict:
        self.sessions[session_id].update(status="expired")
        return self.event("checkout.session.expired", self.sessions[session_id])

    # --- subscriptions, as Stripe runs them -----------------------------------------------------

    PERIOD = 30 * 86400

    def subscribe(self, session_id: str) -> list[dict]:
        """A subscription-mode session is paid: the subscription starts and its first invoice
        is paid. Returns the events in Stripe's order: subscription created, invoice paid,
        session completed."""
        session = self.sessions[session_id]
        price = session["line_items_"][0]["price"]
        now = int(time.time())
        sub_id = new_id("sub")
        sub = {"id": sub_id, "object": "subscription", "customer": session["customer"], "status": "active",
               "cancel_at_period_end": False, "livemode": False, "created": now,
               "metadata": (session.get("subscription_data") or {}).get("metadata", {}),
               "items": {"object": "list", "data": [{"id": new_id("si"), "object": "subscription_item",
                                                     "price": self._price(price), "quantity": 1,
                                                     "current_period_start": now,
                                                     "current_period_end": now + self.PERIOD}]}}
        self.subscriptions[sub_id] = sub
        session.update(status="complete", payment_status="paid", subscription=sub_id)
        created = self.event("customer.subscription.created", sub)
        invoice = self._invoice(sub, "subscription_create", paid=True)
        return [created, invoice, self.event("checkout.session.completed", session)]

    def _invoice(self, sub: dict, reason: str, *, paid: bool, amount: int | None = None) -> dict:
        """An invoice of the subscription's current period; returns its `invoice.paid` (or
        `invoice.payment_failed`) event."""
        item = sub["items"]["data"][0]
        price = item["price"]["id"]
        invoice_id = new_id("in")
        amount = self.prices.get(price, 0) if amount is None else amount
        invoice = {
            "id": invoice_id, "object": "invoice", "customer": sub["customer"], "billing_reason": reason,
            "status": "paid" if paid else "open", "amount_paid": amount if paid else 0, "amount_due": amount,
            "currency": "usd", "livemode": False, "created": int(time.time()),
            "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub["id"]}},
            "lines": {"object": "list", "data": [{
                "id": new_id("il"), "object": "line_item", "amount": amount,
                "period": {"start": item["current_period_start"], "end": item["current_period_end"]},
                "pricing": {"type": "price_details", "price_details": {"price": price, "product": "prod_x"},
                            "unit_amount_decimal": str(amount)},
                "parent": {"type": "subscription_item_details", "subscription_item_details": {
                    "subscription": sub["id"], "subscription_item": item["id"],
                    "proration": reason == "subscription_update"}},
            }]},
            "payments": {"object": "list", "data": []},
        }
        self.invoices[invoice_id] = invoice
        if paid:
            self._pay(invoice)
            return self.event("invoice.paid", invoice)
        return self.event("invoice.payment_failed", invoice)

    def _pay(self, invoice: dict) -> None:
        intent = new_id("pi")
        self._charge(intent, invoice["amount_due"], "usd", invoice["customer"])
        invoice["payments"]["data"].append({"object": "invoice_payment", "payment": {
            "type": "payment_intent", "payment_intent": intent}, "status": "paid"})

    def _price(self, price_id: str) -> dict:
        # `unit_amount_decimal` is a decimal the library parses as one, as Stripe sends it.
        amount = self.prices.get(price_id, 0)
        return {"id": price_id, "object": "price", "unit_amount": amount, "unit_amount_decimal": str(amount),
                "currency": "usd", "recurring": {"interval": "month", "interval_count": 1}}

    def _update_subscription(self, sub_id: str, params: dict) -> dict:
        sub = self.subscriptions[sub_id]
        item = sub["items"]["data"][0]
        old_price = item["price"]["id"]
        for change in params.get("items") or []:
            item["price"] = self._price(change["price"])
        if "cancel_at_period_end" in params:
            sub["cancel_at_period_end"] = params["cancel_at_period_end"] in ("true", True)
        self.event("customer.subscription.updated", sub)
        new_price = item["price"]["id"]
        if new_price != old_price and self.prices.get(new_price, 0) > self.prices.get(old_price, 0):
            self._invoice(sub, "subscription_update", paid=True,
                          amount=self.prices[new_price] - self.prices.get(old_price, 0))
        return sub

    def _end_subscription(self, sub_id: str) -> dict:
        sub = self.subscriptions[sub_id]
        sub["status"] = "canceled"
        self.event("customer.subscription.deleted", sub)
        return sub

    def renew(self, sub_id: str, *, paid: bool = True) -> list[dict]:
        """The period ends: a subscription set to cancel ends (deleted); otherwise a new period
        and its invoice, paid or failed (past_due)."""
        sub = self.subscriptions[sub_id]
        if sub["cancel_at_period_end"]:
            self._end_subscription(sub_id)
            return [self.events[-1]]
        item = sub["items"]["data"][0]
        item["current_period_start"] = item["current_period_end"]
        item["current_period_end"] += self.PERIOD
        sub["status"] = "active" if paid else "past_due"
        invoice = self._invoice(sub, "subscription_cycle", paid=paid)
        return [self.event("customer.subscription.updated", sub), invoice]

    def pay_invoice(self, invoice_id: str) -> list[dict]:
        """A failed invoice is paid late: the subscription is active again."""
        invoice = self.invoices[invoice_id]
        invoice.update(status="paid", amount_paid=invoice["amount_due"])
        self._pay(invoice)
        sub = self.subscriptions[invoice["parent"]["subscription_details"]["subscription"]]
        sub["status"] = "active"
        return [self.event("invoice.paid", invoice), self.event("customer.subscription.updated", sub)]

    # --- refunds and disputes ---------------------------------------------------------------------

    def refund(self, charge_id: str, amount: int) -> list[dict]:
        charge = self.charges[charge_id]
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        refund = {"id": new_id("re"), "object": "refund", "amount": amount, "charge": charge_id,
                  "payment_intent": charge["payment_intent"], "status": "succeeded", "currency": charge["currency"]}
        return [self.event("refund.created", refund), self.event("charge.refunded", charge)]

    def dispute(self, charge_id: str) -> dict:
        charge = self.charges[charge_id]
        charge["disputed"] = True
        dispute = {"id": new_id("dp"), "object": "dispute", "charge": charge_id, "amount": charge["amount"],
                   "payment_intent": charge["payment_intent"], "currency": charge["currency"],
                   "status": "needs_response", "reason": "fraudulent", "livemode": False}
        self.disputes[dispute["id"]] = dispute
        return self.event("charge.dispute.created", dispute)

    def close_dispute(self, dispute_id: str, *, won: bool) -> list[dict]:
        dispute = self.disputes[dispute_id]
        dispute["status"] = "won" if won else "lost"
        events = [self.event("charge.dispute.funds_reinstated", dispute)] if won else []
        return events + [self.event("charge.dispute.closed", dispute)]

    def delivery(self, event: dict, secret: str, *, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
        """The body and headers of a webhook delivery of `event`."""
        body = json.dumps(event).encode()
        return body, {"Stripe-Signature": sign(body, secret, timestamp), "Content-Type": "application/json"}
