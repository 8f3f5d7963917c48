"""Helpers resources share to read the request's identity and user."""

from __future__ import annotations

import uuid

import falcon

from models import User
from models.errors import InvalidInput
from models.users import get_user


def current_user(req: falcon.Request) -> User:
    return get_user(req.context.session, req.context.identity.clerk_id)


def parse_uuid(value: str, what: str = "id", not_found: type[Exception] | None = None) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError):
        if not_found is not None:
            raise not_found() from None
        raise InvalidInput(f"{what} is not a valid id") from None
