"""/api/users: the caller's profile, credits and ledger."""

from __future__ import annotations

import falcon

from models.credits import initialize_user, list_transactions
from models.admission import credit_summary

from . import schemas
from .context import current_user
from .openapi import operation, validate
from .serialize import media


class MeResource:
    @operation("Your profile and balance", responses={200: schemas.UserEnvelope}, errors=(404,))
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = media(schemas.UserEnvelope(user=current_user(req)))


class CreditsResource:
    @operation("Your credits: both buckets, what pending tasks reserve, what is available",
               responses={200: schemas.CreditsOut}, errors=(404,))
    def on_get(self, req, resp) -> None:
        summary = credit_summary(req.context.session, current_user(req))
        resp.media = media(schemas.CreditsOut(
            credits=summary.credits, plan_credits=summary.plan_credits, purchased_credits=summary.purchased_credits,
            reserved=summary.reserved, available=summary.available, next_reset_at=summary.next_reset_at,
            credit_reset_at=summary.next_reset_at))


class TransactionsResource:
    @operation("Your ledger, newest first", query=schemas.TransactionQuery, responses={200: schemas.TransactionPage},
               errors=(404,))
    def on_get(self, req, resp, query: schemas.TransactionQuery) -> None:
        user = current_user(req)
        before = int(query.cursor) if query.cursor else None
        rows = list_transactions(req.context.session, user.id, before_id=before, limit=query.limit + 1)
        page = rows[:query.limit]
        resp.media = media(schemas.TransactionPage(
            transactions=page,
            next_cursor=str(page[-1].id) if len(rows) > query.limit else None,
        ))


class InitializeResource:
    @operation("Create your user on the free plan with its first credits (idempotent)",
               body=schemas.InitializeBody, body_required=False,
               responses={201: schemas.InitializedUser, 200: schemas.InitializedUser})
    def on_post(self, req, resp, body: schemas.InitializeBody) -> None:
        # What the body leaves out comes from the token, held to the same schema.
        claims = req.context.identity.claims
        given = {"email": claims.get("email"), "name": claims.get("name"), **body.model_dump(exclude_unset=True)}
        profile = validate(schemas.InitializeBody, given)
        user, created = initialize_user(req.context.session, req.context.identity.clerk_id, email=profile.email,
                                        name=profile.name)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.media = media(schemas.InitializedUser(user=user, created=created))
