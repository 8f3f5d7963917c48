"""One builder per thing a test needs, with sensible defaults: override what the test is about.

Users and tasks are made through the real operations (the ones the API and the workers
call), so a built row is one the application could have produced. `make_task_row` is the
exception, for rows the operations would refuse or never produce (a price of your own,
a status reached without its charge).
"""

from __future__ import annotations

import io
import uuid
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session

from models import AiTask, User
from models.billing import change_plan
from models.credits import initialize_user, post_entry
from models.admission import submit_task
from models.tasks import start_task

DEFAULT_INPUT = "https://example.com/in.png"


def make_user(session: Session, *, plan: str = "free", plan_credits: int | None = None, purchased: int = 0,
              clerk_id: str | None = None, email: str | None = None, name: str | None = None) -> User:
    """A user on `plan`: initialized (signup grant), moved to the plan (its top-up), with the
    plan bucket adjusted to `plan_credits` when given and `purchased` credits bought."""
    user, created = initialize_user(session, clerk_id or f"user_{uuid.uuid4().hex[:12]}", email=email, name=name)
    assert created, f"user {user.clerk_id} exists already"
    if plan != user.plan_id:
        user = change_plan(session, user.id, plan)
    if plan_credits is not None and plan_credits != user.plan_credits:
        post_entry(session, user.id, type="admin_adjustment", plan_delta=plan_credits - user.plan_credits)
    if purchased:
        post_entry(session, user.id, type="credit_purchase", purchased_delta=purchased)
    return user


def make_task(session: Session, user: User, task_type: str = "image_analysis", *, input: Any = DEFAULT_INPUT,
              params: dict[str, Any] | None = None, idempotency_key: str | None = None) -> AiTask:
    """A pending task, admitted by `submit_task` (reserved, not charged; sent after commit)."""
    task, created = submit_task(session, user, task_type, input, params or {}, idempotency_key=idempotency_key)
    assert created
    return task


def make_charged_task(session: Session, user: User, task_type: str = "image_analysis", **submit) -> AiTask:
    """A processing task: submitted, then started (charged once) by `start_task`."""
    task = make_task(session, user, task_type, **submit)
    assert start_task(session, task.id) is not None, "the task could not be started"
    return task


def make_task_row(session: Session, user_id: uuid.UUID, *, status: str = "pending", credits: int = 1,
                  task_type: str = "image_analysis", input: Any = DEFAULT_INPUT,
                  params: dict[str, Any] | None = None) -> AiTask:
    """A task row written directly, bypassing admission and the ledger: no charge is posted
    whatever the status, and `credits` is the price it records."""
    task = AiTask(user_id=user_id, type=task_type, status=status, input=input, params=params or {},
                  credits_used=credits, queue=task_type)
    session.add(task)
    session.flush()
    return task


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (8, 6), color: Any = (200, 30, 30), *,
                mode: str = "RGB") -> bytes:
    """An image of one colour, encoded as `fmt` (a Pillow format name)."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)
    return buffer.getvalue()
