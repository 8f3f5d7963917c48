"""Stripe's API on loopback, with state, for the billing tests: the real `stripe` library
talks to it through STRIPE_API_BASE (StripeClient's `base_addresses`), and webhook bodies
are signed with Stripe's real scheme (`t=<unix time>,v1=HMAC-SHA256(secret, "t.body")`).

It keeps customers, Checkout Sessions, subscriptions, invoices, charges and the event log,
so a test can play a whole purchase or subscription and then deliver (or withhold) the
events Stripe would send. Only what the service calls is served; anything else is a 404 in
Stripe's error shape, so a call the service should not make fails loudly.
"""

from __future__ import annotations

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
        self.events: list[dict] = []
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, params)
        self._idempotent: dict[str, tuple[int, dict]] = {}
        self._lock = threading.Lock()
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
                self.subscriptions[sub_id].update({k: v for k, v in params.items() if k != "items"})
                return 200, self.subscriptions[sub_id]
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
            price = item.get("price_data") or {}
            amount += int(price.get("unit_amount", 0)) * int(item.get("quantity", 1))
        session = {
            "id": session_id, "object": "checkout.session", "mode": params.get("mode", "payment"),
            "status": "open", "payment_status": "unpaid", "customer": params.get("customer"),
            "client_reference_id": params.get("client_reference_id"), "metadata": params.get("metadata", {}),
            "success_url": params.get("success_url"), "cancel_url": params.get("cancel_url"),
            "amount_total": amount, "currency": (line_items[0].get("price_data") or {}).get("currency", "usd")
            if line_items else "usd",
            "payment_intent": None, "subscription": None, "livemode": False,
            "url": f"{self.url}/pay/{session_id}", "created": int(time.time()),
        }
        self.sessions[session_id] = session
        return session

    def _list_events(self, params: dict) -> dict:
        created = params.get("created") or {}
        after = int(created.get("gt", 0)) if isinstance(created, dict) else 0
        limit = int(params.get("limit", 10))
        found = [e for e in reversed(self.events) if e["created"] > after]  # newest first, as Stripe lists
        return {"object": "list", "data": found[:limit], "has_more": len(found) > limit, "url": "/v1/events"}

    # --- what happens on Stripe's side, for tests ---------------------------------------------

    def event(self, type: str, obj: dict, *, created: int | None = None) -> dict:
        """Record an event as Stripe would (also listed by /v1/events); return it."""
        event = {"id": new_id("evt"), "object": "event", "type": type, "api_version": "2026-10-28.endive",
                 "created": created or int(time.time()), "livemode": False, "data": {"object": dict(obj)},
                 "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}}
        with self._lock:
            self.events.append(event)
        return event

    def pay_session(self, session_id: str) -> dict:
        """The customer pays a payment-mode session: a payment intent and a charge exist, and
        `checkout.session.completed` is emitted (returned, not delivered)."""
        session = self.sessions[session_id]
        intent, charge = new_id("pi"), new_id("ch")
        session.update(status="complete", payment_status="paid", payment_intent=intent)
        self.charges[charge] = {"id": charge, "object": "charge", "payment_intent": intent,
                                "amount": session["amount_total"], "amount_refunded": 0,
                                "currency": session["currency"], "refunded": False}
        return self.event("checkout.session.completed", session)

    def delivery(self, event: dict, secret: str, *, timestamp: int | None = None) -> tuple[bytes, dict[str, str]]:
        """The body and headers of a webhook delivery of `event`."""
        body = json.dumps(event).encode()
        return body, {"Stripe-Signature": sign(body, secret, timestamp), "Content-Type": "application/json"}
