"""Models as the contract's response schemas (`api/schemas.py`)."""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from models import AiTask, CreditPack, Plan, Purchase, utcnow
from models.billing import HistoryEntry
from models.plans import price_list

from . import schemas


def media(model: BaseModel) -> dict[str, Any]:
    """What goes in `resp.media`: camelCase keys, JSON types."""
    return model.model_dump(mode="json", by_alias=True)


def plan_out(plan: Plan, prices: Mapping[str, str]) -> schemas.PlanOut:
    return schemas.PlanOut(
        id=plan.id, name=plan.name, monthly_credits=plan.monthly_credits, price=plan.price_cents / 100,
        price_cents=plan.price_cents, currency="usd", allowed_task_types=list(plan.allowed_task_types),
        max_concurrent_tasks=plan.max_concurrent_tasks, purchasable=plan.id in prices,
    )


def pack_out(pack: CreditPack) -> schemas.PackOut:
    return schemas.PackOut(id=pack.id, name=pack.name, credits=pack.credits, price=pack.price_cents / 100,
                           price_cents=pack.price_cents, currency=pack.currency)


def plans_out(plans: list[Plan], packs: list[CreditPack], prices: Mapping[str, str]) -> schemas.PlansOut:
    return schemas.PlansOut(plans=[plan_out(p, prices) for p in plans], packs=[pack_out(p) for p in packs],
                            task_costs=price_list())


def purchase_out(purchase: Purchase) -> schemas.PurchaseOut:
    return schemas.PurchaseOut(
        id=purchase.id, session_id=purchase.stripe_session_id, pack_id=purchase.pack_id, credits=purchase.credits,
        status=purchase.status, amount_paid=purchase.amount_paid, currency=purchase.currency,
        amount_refunded=purchase.amount_refunded, credits_taken_back=purchase.credits_taken_back,
        shortfall=purchase.shortfall, dispute_state=purchase.dispute_state, created_at=purchase.created_at,
        paid_at=purchase.paid_at,
    )


def history_entry_out(entry: HistoryEntry) -> schemas.HistoryEntryOut:
    out = schemas.HistoryEntryOut(kind=entry.kind, at=entry.at)
    if entry.kind == "purchase":
        out.purchase = purchase_out(entry.item)
    elif entry.kind == "plan_change":
        out.plan_change = schemas.PlanChangeOut.model_validate(entry.item)
    else:
        row = entry.item
        out.period = schemas.PeriodOut(invoice_id=row.stripe_object_id, credits=row.amount,
                                       period=row.period, description=row.description, created_at=row.created_at)
    return out


def output_file(task: AiTask) -> dict[str, Any] | None:
    """The file a processor stored for the task: `output["file"]` with at least a `key`
    (optionally `contentType`, `size`, `name`)."""
    file = task.output.get("file") if isinstance(task.output, dict) else None
    if isinstance(file, dict) and isinstance(file.get("key"), str) and file["key"]:
        return file
    return None


def output_file_type(file: dict[str, Any]) -> str | None:
    declared = file.get("contentType")
    if isinstance(declared, str) and "/" in declared:
        return declared
    return mimetypes.guess_type(file.get("name") or file["key"])[0]


def _seconds(start, end) -> float | None:
    return round((end - start).total_seconds(), 3) if start is not None and end is not None else None


def task_out(task: AiTask, *, position: int | None = None, retries: list | None = None,
             now: datetime | None = None) -> schemas.TaskOut:
    file = output_file(task)
    now = now or utcnow()
    ended = task.completed_at or (None if task.status in ("pending", "processing") else now)
    return schemas.TaskOut(
        id=task.id, user_id=task.user_id, type=task.type, status=task.status, input=task.input,
        params=task.params or {}, output=task.output, credits_used=task.credits_used, progress=task.progress,
        error=task.error, error_code=task.error_code, queue=task.queue, attempt=task.attempt,
        created_at=task.created_at, started_at=task.started_at, completed_at=task.completed_at,
        # An expired output keeps its type and size (what was made) but no URL (it is gone).
        output_url=f"/api/tasks/{task.id}/output" if file is not None and task.output_expired_at is None else None,
        output_size=file.get("size") if file is not None and isinstance(file.get("size"), int) else None,
        output_type=output_file_type(file) if file is not None else None,
        output_expired_at=task.output_expired_at,
        start_by=task.start_by, queue_position=position, retry_of=task.retry_of_id, retries=retries or [],
        queue_time=_seconds(task.created_at, task.started_at or ended or now),
        run_time=_seconds(task.started_at, ended or now) if task.started_at is not None else None,
    )
