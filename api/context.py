"""Helpers resources share to read the request's identity and user."""

from __future__ import annotations

import uuid

import falcon

from models import User
from models.errors import InvalidInput
from models.users import get_user


def current_user(req: falcon.Request) -> User:
    """The caller's user; its plan's rate limit is counted once per request here."""
    user = get_user(req.context.session, req.context.identity.clerk_id)
    limiter = req.context.get("rate_limiter")
    if limiter is not None and not req.context.get("user_limited"):
        req.context.user_limited = True
        limiter.limit_user(req, user.clerk_id, user.plan_id)
    return user


def parse_uuid(value: str, what: str = "id", not_found: type[Exception] | None = None) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError):
        if not_found is not None:
            raise not_found() from None
        raise InvalidInput(f"{what} is not a valid id") from None
