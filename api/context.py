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


def json_body(req: falcon.Request, *, required: bool = True) -> dict:
    """The JSON object body; an empty body is `{}` when not required."""
    if not required and not req.content_length:
        return {}
    body = req.get_media(default_when_empty=None if required else {})
    if body is None:
        raise InvalidInput("A JSON body is required", code="body_required")
    if not isinstance(body, dict):
        raise InvalidInput("The JSON body must be an object", code="invalid_body")
    return body


def limit_param(req: falcon.Request, default: int = 20, maximum: int = 100) -> int:
    raw = req.get_param("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput("limit must be an integer", code="invalid_limit") from None
    if not 1 <= value <= maximum:
        raise InvalidInput(f"limit must be between 1 and {maximum}", code="invalid_limit")
    return value
