"""Shape models as the frontend's camelCase JSON."""

from __future__ import annotations

import mimetypes
from datetime import datetime
from typing import Any

from models import AiTask, Plan, Transaction, Upload, User
from models.credits import CreditSummary
from models.plans import price_list


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def user_json(user: User) -> dict[str, Any]:
    return {
        "id": str(user.id),
        "clerkId": user.clerk_id,
        "email": user.email,
        "name": user.name,
        "planId": user.plan_id,
        "credits": user.credits,
        "planCredits": user.plan_credits,
        "purchasedCredits": user.purchased_credits,
        "creditResetAt": iso(user.credit_reset_at),
        "stripeCustomerId": user.stripe_customer_id,
        "createdAt": iso(user.created_at),
    }


def credits_json(summary: CreditSummary) -> dict[str, Any]:
    return {
        "credits": summary.credits,
        "planCredits": summary.plan_credits,
        "purchasedCredits": summary.purchased_credits,
        "reserved": summary.reserved,
        "available": summary.available,
        "nextResetAt": iso(summary.next_reset_at),
        "creditResetAt": iso(summary.next_reset_at),
    }


def transaction_json(entry: Transaction) -> dict[str, Any]:
    return {
        "id": str(entry.id),
        "amount": entry.amount,
        "bucket": entry.bucket,
        "planDelta": entry.plan_delta,
        "purchasedDelta": entry.purchased_delta,
        "balanceAfter": entry.balance_after,
        "type": entry.type,
        "taskId": str(entry.task_id) if entry.task_id else None,
        "description": entry.description,
        "createdAt": iso(entry.created_at),
    }


def plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "id": plan.id,
        "name": plan.name,
        "monthlyCredits": plan.monthly_credits,
        "price": plan.price_cents / 100,
        "priceCents": plan.price_cents,
        "currency": "usd",
        "allowedTaskTypes": list(plan.allowed_task_types),
        "maxConcurrentTasks": plan.max_concurrent_tasks,
    }


def plans_json(plans: list[Plan]) -> dict[str, Any]:
    return {"plans": [plan_json(p) for p in plans], "taskCosts": price_list()}


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


def task_json(task: AiTask) -> dict[str, Any]:
    file = output_file(task)
    return {
        "id": str(task.id),
        "userId": str(task.user_id),
        "type": task.type,
        "status": task.status,
        "input": task.input,
        "params": task.params,
        "metadata": task.params,
        "output": task.output,
        "creditsUsed": task.credits_used,
        "progress": task.progress,
        "error": task.error,
        "errorCode": task.error_code,
        "queue": task.queue,
        "attempt": task.attempt,
        "createdAt": iso(task.created_at),
        "startedAt": iso(task.started_at),
        "completedAt": iso(task.completed_at),
        "outputUrl": f"/api/tasks/{task.id}/output" if file is not None else None,
        "outputSize": file.get("size") if file is not None and isinstance(file.get("size"), int) else None,
        "outputType": output_file_type(file) if file is not None else None,
    }


def upload_json(upload: Upload) -> dict[str, Any]:
    return {
        "id": str(upload.id),
        "contentType": upload.content_type,
        "size": upload.size,
        "width": upload.width,
        "height": upload.height,
        "filename": upload.filename,
        "sha256": upload.sha256,
        "createdAt": iso(upload.created_at),
    }
