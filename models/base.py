"""Declarative base with a naming convention so Alembic names constraints predictably."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, MetaData
from sqlalchemy.orm import DeclarativeBase

from .errors import InvalidInput

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True)}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def stripe_id(value: Any) -> str | None:
    """An expandable Stripe field: the id whether it came as a string or as an object."""
    if isinstance(value, dict):
        return value.get("id")
    return value


def sql_in(column: str, values: tuple[str, ...]) -> str:
    """`column IN ('a', 'b')` for CHECK constraints over a fixed vocabulary."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


# Deeper JSON than this is refused at the edge: no request of the contract nests past a
# handful of levels, and the stored value must load again (json and psycopg recurse).
MAX_JSON_DEPTH = 32


def check_storable(value: Any, what: str = "body", *, code: str = "invalid_input",
                   max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse what PostgreSQL's JSON and text columns cannot hold (NUL characters, lone
    surrogates, NaN and infinities, which Python's json accepts), and JSON nested past
    `max_depth` levels."""
    stack = [(value, 1)]
    while stack:  # iterative: a deeply nested body must not overflow the stack
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth > max_depth:
                raise InvalidInput(f"The {what} is nested more than {max_depth} levels deep", code="json_too_deep")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            if not storable_text(item):
                problem = "a NUL character" if "\x00" in item else "an invalid Unicode character"
                raise InvalidInput(f"The {what} holds {problem}", code=code)
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput(f"The {what} holds NaN or an infinity", code=code)
        elif not (item is None or isinstance(item, (bool, int, float))):
            raise InvalidInput(f"The {what} holds a value that is not JSON", code=code)


def storable_text(value: str) -> bool:
    """Whether PostgreSQL can hold the string in a text column (no NUL, no lone surrogate)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
