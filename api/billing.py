"""/api/billing: the public plan list and price table (Stripe routes come with billing)."""

from __future__ import annotations

from models.plans import list_plans

from .serialize import plans_json


class PlansResource:
    auth = None

    def on_get(self, req, resp) -> None:
        resp.media = plans_json(list_plans(req.context.session))
