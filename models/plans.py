"""Plans and the price list: what each plan grants and allows, what each task costs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CheckConstraint, Integer, String, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, Session, mapped_column

from tasktypes import TASK_TYPE_SPECS, spec_for

from .base import Base
from .errors import PlanNotFound


class Plan(Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("monthly_credits >= 0", name="monthly_credits_nonnegative"),
        CheckConstraint("price_cents >= 0", name="price_nonnegative"),
        CheckConstraint("max_concurrent_tasks > 0", name="max_concurrent_positive"),
        CheckConstraint("default_start_by_seconds > 0", name="default_start_by_positive"),
        CheckConstraint("low_credits_threshold >= 0", name="low_credits_threshold_nonnegative"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    monthly_credits: Mapped[int] = mapped_column(Integer)
    price_cents: Mapped[int] = mapped_column(Integer)
    stripe_price_id: Mapped[str | None] = mapped_column(String(128))
    allowed_task_types: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    max_concurrent_tasks: Mapped[int] = mapped_column(Integer)
    # A task not started within this many seconds of its submission expires (unless it
    # says otherwise with startBy); NULL: no default deadline.
    default_start_by_seconds: Mapped[int | None] = mapped_column(Integer)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    # A balance falling below this emits `credits.low` (0: never); a user may override it.
    low_credits_threshold: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    def allows(self, task_type: str) -> bool:
        return task_type in self.allowed_task_types


FREE_PLAN_ID = "free"


def task_cost(task_type: str, params) -> int:
    """Credits a task of this type and (validated) params costs, from the price list in
    `tasktypes`. Deterministic from the request alone, and fixed on the task at submission
    (`ai_tasks.credits_used`), so a change of price never re-prices an accepted task."""
    price = spec_for(task_type).price
    if "per_second" in price:
        # Whole seconds, rounded up: a 2.5 s video costs as much as a 3 s one.
        return max(price["min"], price["base"] + price["per_second"] * math.ceil(params.duration))
    return price["base"]


def price_list() -> dict[str, dict[str, Any]]:
    return {name: dict(spec.price) for name, spec in TASK_TYPE_SPECS.items()}


def list_plans(session: Session) -> list[Plan]:
    return list(session.scalars(select(Plan).order_by(Plan.sort_order)))


@dataclass(frozen=True)
class PlanRules:
    """What the money rules read of a plan; a snapshot safe to share across sessions."""

    id: str
    name: str
    monthly_credits: int
    allowed_task_types: tuple[str, ...]
    max_concurrent_tasks: int
    default_start_by_seconds: int | None = None

    def allows(self, task_type: str) -> bool:
        return task_type in self.allowed_task_types


# Plans change only through migrations (which restart the processes), so each process
# reads a plan once instead of on every submission and charge.
_PLAN_CACHE: dict[str, PlanRules] = {}


def get_plan(session: Session, plan_id: str) -> PlanRules:
    rules = _PLAN_CACHE.get(plan_id)
    if rules is None:
        plan = session.get(Plan, plan_id)
        if plan is None:
            raise PlanNotFound(f"Unknown plan {plan_id!r}")
        rules = _PLAN_CACHE[plan_id] = PlanRules(plan.id, plan.name, plan.monthly_credits,
                                                 tuple(plan.allowed_task_types), plan.max_concurrent_tasks,
                                                 plan.default_start_by_seconds)
    return rules
