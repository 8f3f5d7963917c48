"""/api/users: the caller's profile, credits and ledger."""

from __future__ import annotations

import re

import falcon

from models.credits import credit_summary, list_transactions
from models.errors import BillingNotConfigured, InvalidInput
from models.users import initialize_user

from .context import current_user, json_body, limit_param
from .serialize import credits_json, transaction_json, user_json

_CURSOR = re.compile(r"[0-9]{1,19}")
_MAX_ID = 2**63 - 1


class MeResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"user": user_json(current_user(req))}


class CreditsResource:
    def on_get(self, req, resp) -> None:
        resp.media = credits_json(credit_summary(req.context.session, current_user(req)))


class TransactionsResource:
    def on_get(self, req, resp) -> None:
        user = current_user(req)
        cursor = req.get_param("cursor")
        before = None
        if cursor:
            # ASCII digits only (str.isdigit also takes "²", which int() refuses), and within
            # the BIGINT id column so the query cannot fail with "out of range".
            if not _CURSOR.fullmatch(cursor) or int(cursor) > _MAX_ID:
                raise InvalidInput("cursor is not valid", code="invalid_cursor")
            before = int(cursor)
        limit = limit_param(req)
        rows = list_transactions(req.context.session, user.id, before_id=before, limit=limit + 1)
        page = rows[:limit]
        resp.media = {
            "transactions": [transaction_json(t) for t in page],
            "nextCursor": str(page[-1].id) if len(rows) > limit else None,
        }


class InitializeResource:
    def on_post(self, req, resp) -> None:
        body = json_body(req, required=False)
        claims = req.context.identity.claims
        email, name = body.get("email", claims.get("email")), body.get("name", claims.get("name"))
        for field, value in (("email", email), ("name", name)):
            if value is not None and (not isinstance(value, str) or len(value) > 255):
                raise InvalidInput(f"{field} must be a string of at most 255 characters")
        user, created = initialize_user(req.context.session, req.context.identity.clerk_id, email=email, name=name)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.media = {"user": user_json(user), "created": created}


class UpgradePlanResource:
    """Same as POST /api/billing/upgrade-plan; delegates to it when billing is configured."""

    def __init__(self, billing_upgrade=None):
        self.billing_upgrade = billing_upgrade

    def on_post(self, req, resp) -> None:
        if self.billing_upgrade is None:
            raise BillingNotConfigured()
        self.billing_upgrade.on_post(req, resp)
