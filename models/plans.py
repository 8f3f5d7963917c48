"""Plans and the price list: what each plan grants and allows, what each task costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import CheckConstraint, Integer, String, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base
from .errors import InvalidInput, PlanNotFound

TASK_TYPES = ("image_analysis", "advanced_editing", "video_generation")


class Plan(Base):
    __tablename__ = "plans"
    __table_args__ = (
        CheckConstraint("monthly_credits >= 0", name="monthly_credits_nonnegative"),
        CheckConstraint("price_cents >= 0", name="price_nonnegative"),
        CheckConstraint("max_concurrent_tasks > 0", name="max_concurrent_positive"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    monthly_credits: Mapped[int] = mapped_column(Integer)
    price_cents: Mapped[int] = mapped_column(Integer)
    stripe_price_id: Mapped[str | None] = mapped_column(String(128))
    allowed_task_types: Mapped[list[str]] = mapped_column(ARRAY(String(32)))
    max_concurrent_tasks: Mapped[int] = mapped_column(Integer)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)

    def allows(self, task_type: str) -> bool:
        return task_type in self.allowed_task_types


FREE_PLAN_ID = "free"

# The price list, in credits. Costs are fixed at submission (`ai_tasks.credits_used`), so a
# change here never re-prices a task already accepted.
TASK_COSTS: dict[str, dict[str, Any]] = {
    "image_analysis": {"base": 1, "unit": "task", "description": "1 credit per image"},
    "advanced_editing": {
        "base": 2,
        "per_operation": 0,
        "unit": "task",
        "description": "2 credits per edit chain (any number of operations)",
    },
    "video_generation": {
        "base": 0,
        "per_second": 2,
        "min": 4,
        "unit": "second",
        "description": "2 credits per second of video, at least 4",
    },
}

VIDEO_DEFAULT_SECONDS = 4
VIDEO_MAX_SECONDS = 120


def task_cost(task_type: str, params: dict[str, Any]) -> int:
    """Credits a task of this type and params costs. Deterministic from the request alone."""
    if task_type not in TASK_COSTS:
        raise InvalidInput(f"Unknown task type {task_type!r}", code="invalid_task_type")
    price = TASK_COSTS[task_type]
    if task_type == "video_generation":
        seconds = params.get("duration", VIDEO_DEFAULT_SECONDS)
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds <= VIDEO_MAX_SECONDS:
            raise InvalidInput(f"params.duration must be a number of seconds in (0, {VIDEO_MAX_SECONDS}]", code="invalid_params")
        # Whole seconds, rounded up: a 2.5 s video costs as much as a 3 s one.
        return max(price["min"], price["per_second"] * -int(-seconds // 1))
    return price["base"]


def price_list() -> dict[str, dict[str, Any]]:
    return {name: dict(entry) for name, entry in TASK_COSTS.items()}


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
                                                 tuple(plan.allowed_task_types), plan.max_concurrent_tasks)
    return rules
