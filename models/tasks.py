"""AI tasks and their lifecycle: start (charge), complete, fail (refund), cancel, expire.
Admission (submit, estimate, retry) is `models/admission.py`.

pending ──start──▶ processing ──▶ completed | failed (+refund) | cancelled (+refund)
pending ──▶ cancelled | failed (never charged)

Every transition locks the task row first, so a cancel racing a completion, or two
deliveries of one message, are serialized and exactly one of them acts.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapped, Session, defer, mapped_column

from tasktypes import TASK_TYPES
from tasktypes.inputs import input_sources, source_ref

from .base import Base, check_storable, sql_in, utcnow
from .credits import Transaction, reverse_entry, spend_credits
from .db import enqueue_after_commit
from .events import record_event
from .errors import (
    DomainError,
    InsufficientCredits,
    InvalidInput,
    InvalidTransition,
    TaskAlreadyFinal,
    TaskNotFound,
)
from .users import User

STATUSES = ("pending", "processing", "completed", "failed", "cancelled", "expired")
# Starts of one task (first delivery, retries, redeliveries after a dead worker) before it
# is failed and refunded.
MAX_ATTEMPTS = 5
FINAL_STATUSES = ("completed", "failed", "cancelled", "expired")
IN_FLIGHT = ("pending", "processing")


# Completed tasks whose output file is still stored: the retention job's partial index and its
# query share the predicate word for word, so the planner matches them under a generic plan
# too (a bound status, or `output['file']`, would not prove it).
_OUTPUT_UNEXPIRED_SQL = "status = 'completed' AND output_expired_at IS NULL AND (output -> 'file') IS NOT NULL"


class AiTask(Base):
    __tablename__ = "ai_tasks"
    __table_args__ = (
        CheckConstraint(sql_in("type", TASK_TYPES), name="type_known"),
        CheckConstraint(sql_in("status", STATUSES), name="status_known"),
        CheckConstraint("credits_used > 0", name="credits_used_positive"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress_range"),
        CheckConstraint("attempt >= 0", name="attempt_nonnegative"),
        Index("uq_ai_tasks_user_idempotency_key", "user_id", "idempotency_key", unique=True,
              postgresql_where=text("idempotency_key IS NOT NULL")),
        # Keyset pages for the list route, with and without its filters.
        Index("ix_ai_tasks_user_created", "user_id", text("created_at DESC"), text("id DESC")),
        Index("ix_ai_tasks_user_status_created", "user_id", "status", text("created_at DESC"), text("id DESC")),
        Index("ix_ai_tasks_user_type_created", "user_id", "type", text("created_at DESC"), text("id DESC")),
        # Admission (in-flight count, reserved credits) and the beat sweeps only look here.
        Index("ix_ai_tasks_in_flight", "status", "created_at",
              postgresql_where=text("status IN ('pending', 'processing')")),
        # Queue position: the pending tasks of a queue, oldest first.
        Index("ix_ai_tasks_pending_queue", "queue", "created_at", "id", postgresql_where=text("status = 'pending'")),
        Index("ix_ai_tasks_retry_of_id", "retry_of_id", postgresql_where=text("retry_of_id IS NOT NULL")),
        # The retention job's scan: completed tasks whose output file is still stored.
        Index("ix_ai_tasks_output_unexpired", "completed_at", "id", postgresql_where=text(_OUTPUT_UNEXPIRED_SQL)),
        CheckConstraint("(webhook_url IS NULL) = (webhook_events IS NULL)", name="webhook_with_events"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    type: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    input: Mapped[Any] = mapped_column(JSONB)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    credits_used: Mapped[int] = mapped_column(Integer)
    progress: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    queue: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]
    # When retention deleted the output file (RETENTION_DAYS); the output's JSON stays.
    output_expired_at: Mapped[datetime | None]
    # A task no worker has started by then ends `expired`, never charged.
    start_by: Mapped[datetime | None]
    # The task this one retries (POST /api/tasks/{id}/retry).
    retry_of_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("ai_tasks.id"))
    # The task's own webhook (models/webhooks.py delivers it, signed with the user's secret).
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(ARRAY(String(32)))

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class OutputExpired(DomainError):
    """The task's output file was deleted by retention."""

    status_code = 410
    code = "output_expired"


# Failing a task never reads its request or output: not loading them means a stored request
# nobody can read can still be failed and refunded.
_WITHOUT_REQUEST = (defer(AiTask.input), defer(AiTask.params), defer(AiTask.output))


# Plain Core on the table, for the statements the worker runs on every task: a conditional
# UPDATE says by its row count (or RETURNING) whether it matched, and keeps no ORM object
# in step; a caller that holds one re-reads it.
_tasks = AiTask.__table__


def _lock_task(session: Session, task_id: uuid.UUID, user_id: uuid.UUID | None = None, *,
               without_request: bool = False) -> AiTask | None:
    task = session.get(AiTask, task_id, with_for_update=True, populate_existing=True,
                       options=_WITHOUT_REQUEST if without_request else None)
    if task is None or (user_id is not None and task.user_id != user_id):
        return None
    return task


def retries_of(session: Session, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[uuid.UUID]]:
    """The retries made of each task, oldest first (the other direction of `retry_of_id`)."""
    if not task_ids:
        return {}
    found: dict[uuid.UUID, list[uuid.UUID]] = {}
    for retry_of, retry in session.execute(select(AiTask.retry_of_id, AiTask.id).where(
            AiTask.retry_of_id.in_(task_ids)).order_by(AiTask.created_at)):
        found.setdefault(retry_of, []).append(retry)
    return found


def queue_positions(session: Session, tasks: list[AiTask]) -> dict[uuid.UUID, int]:
    """1-based position of each pending task among the pending tasks of its queue, oldest
    first (index-only counts on ix_ai_tasks_pending_queue)."""
    positions = {}
    for task in tasks:
        if task.status != "pending":
            continue
        ahead = session.scalar(select(func.count()).select_from(AiTask).where(
            AiTask.status == "pending", AiTask.queue == task.queue,
            tuple_(AiTask.created_at, AiTask.id) < tuple_(task.created_at, task.id)))
        positions[task.id] = ahead + 1
    return positions


@dataclass(frozen=True)
class TaskWork:
    """What a worker needs to run a task once it holds it (no ORM object crosses sessions)."""

    id: uuid.UUID
    user_id: uuid.UUID
    type: str
    input: Any
    params: dict[str, Any]
    attempt: int
    credits: int = 0  # the task's price
    charged: bool = False  # charged by this start (False when resumed)


_LOCK_FOR_START = (
    select(_tasks.c.user_id, _tasks.c.type, _tasks.c.status, _tasks.c.input, _tasks.c.params,
           _tasks.c.credits_used, _tasks.c.attempt, _tasks.c.start_by)
    .where(_tasks.c.id == bindparam("task_id")).with_for_update()
)


_MARK_STARTED = (
    _tasks.update().where(_tasks.c.id == bindparam("task_id"))
    .values(status="processing", started_at=bindparam("now"), attempt=_tasks.c.attempt + 1)
)
_MARK_RESUMED = _tasks.update().where(_tasks.c.id == bindparam("task_id")).values(attempt=_tasks.c.attempt + 1)
_MARK_UNFUNDED = (
    _tasks.update().where(_tasks.c.id == bindparam("task_id"))
    .values(status="failed", error_code="insufficient_credits", error=bindparam("error"), completed_at=bindparam("now"))
)
# Returns the progress it replaced too (the row as it was, read under the same lock), so
# a step past a tenth is announced once.
_REPORT_PROGRESS = text("""
    UPDATE ai_tasks t SET progress = :progress
    FROM (SELECT id, progress FROM ai_tasks WHERE id = :task_id FOR UPDATE) AS before
    WHERE t.id = before.id AND t.status = 'processing'
    RETURNING t.status, t.user_id, before.progress AS previous
""")
_COMPLETE = (
    _tasks.update().where(_tasks.c.id == bindparam("task_id"), _tasks.c.status == "processing")
    .values(status="completed", output=bindparam("output", type_=JSONB), progress=100,
            completed_at=bindparam("now"), error=None, error_code=None)
    .returning(_tasks.c.user_id)
)
_EXPIRE = (
    _tasks.update().where(_tasks.c.id == bindparam("task_id"), _tasks.c.status == "pending")
    .values(status="expired", completed_at=bindparam("now"), error_code="expired",
            error="No worker started the task before its startBy deadline")
    .returning(_tasks.c.user_id)
)


def start_task(session: Session, task_id: uuid.UUID, *, may_resume: bool = False) -> TaskWork | None:
    """Charge and move a pending task to processing; or resume one whose runner died.

    Returns None when the message is stale: the task is gone, final, or processing under
    another live runner (a duplicate delivery). `may_resume` is True only when the caller
    holds the task's lease, which proves the earlier runner is dead; resuming never
    charges again (and the unique charge index would refuse it anyway).

    Plain statements on the tables, as every task runs them: a caller that holds the task or
    its user as objects re-reads them.
    """
    session.flush()  # what the caller has pending comes first
    # The row lock serializes this start with a cancel, a second delivery and the reaper.
    row = session.execute(_LOCK_FOR_START, {"task_id": task_id}).one_or_none()
    if row is None:
        return None
    if row.status == "pending" and row.start_by is not None and row.start_by <= utcnow():
        expire_task(session, task_id)
        return None
    if row.status == "pending":
        try:
            # spend_credits raises before it writes anything, so no savepoint is needed.
            spend_credits(session, row.user_id, row.credits_used, type="credit_deduction", task_id=task_id,
                          description=f"{row.type} task")
        except InsufficientCredits:
            session.execute(_MARK_UNFUNDED, {"task_id": task_id, "now": utcnow(),
                                             "error": f"Not enough credits: this task costs {row.credits_used}"})
            record_event(session, "task.failed", user_id=row.user_id, task_id=task_id,
                         data={"status": "failed", "errorCode": "insufficient_credits"})
            return None
        session.execute(_MARK_STARTED, {"task_id": task_id, "now": utcnow()})
        record_event(session, "task.started", user_id=row.user_id, task_id=task_id,
                     data={"status": "processing", "attempt": row.attempt + 1})
    elif row.status == "processing" and may_resume:
        if row.attempt >= MAX_ATTEMPTS:
            # A task that keeps killing its worker (out of memory, a crashing decoder) would
            # otherwise be redelivered forever while charged: give up and refund.
            fail_task(session, task_id, "The task stopped its worker repeatedly and was given up", "worker_lost")
            return None
        session.execute(_MARK_RESUMED, {"task_id": task_id})
    else:
        return None
    return TaskWork(task_id, row.user_id, row.type, row.input, dict(row.params or {}), row.attempt + 1,
                    credits=row.credits_used, charged=row.status == "pending")


def report_progress(session: Session, task_id: uuid.UUID, progress: int) -> str | None:
    """Store progress while processing; return the task's current status (for cancellation)."""
    progress = max(0, min(100, int(progress)))
    row = session.execute(_REPORT_PROGRESS, {"task_id": task_id, "progress": progress}).one_or_none()
    if row is None:
        return task_status(session, task_id)
    if progress // 10 > row.previous // 10:  # a tenth more done: announced (at most ten a task)
        record_event(session, "task.progress", user_id=row.user_id, task_id=task_id,
                     data={"status": "processing", "progress": progress})
    return row.status


def task_status(session: Session, task_id: uuid.UUID) -> str | None:
    return session.scalar(select(AiTask.status).where(AiTask.id == task_id))


def complete_task(session: Session, task_id: uuid.UUID, output: dict[str, Any]) -> bool:
    """Store the output if the task is still processing; False means drop the result.

    One conditional UPDATE: it takes the row lock, and after waiting for a concurrent cancel
    it re-checks `status` on the newest row version, so exactly one of the two acts.

    Raises InvalidInput (code output_invalid) for an output PostgreSQL cannot store (NUL
    characters, lone surrogates, NaN), so the caller fails and refunds instead.
    """
    check_storable(output, "output", code="output_invalid")
    user_id = session.execute(_COMPLETE, {"task_id": task_id, "output": output, "now": utcnow()}).scalar_one_or_none()
    if user_id is None:
        return False
    record_event(session, "task.completed", user_id=user_id, task_id=task_id, data={"status": "completed"})
    return True


def expire_task(session: Session, task_id: uuid.UUID) -> bool:
    """End a pending task past its deadline: `expired`, never charged, its reservation
    released (a reservation is a pending task's price)."""
    user_id = session.execute(_EXPIRE, {"task_id": task_id, "now": utcnow()}).scalar_one_or_none()
    if user_id is None:
        return False
    record_event(session, "task.expired", user_id=user_id, task_id=task_id,
                 data={"status": "expired", "errorCode": "expired"})
    return True


def expire_overdue_tasks(session: Session, now: datetime | None = None, limit: int = 500) -> int:
    """Expire pending tasks whose deadline passed (beat's sweep): each locked, skipped if
    a worker holds it at this moment (it will expire or start it itself)."""
    overdue = session.scalars(
        select(AiTask.id).where(AiTask.status == "pending", AiTask.start_by <= (now or utcnow()))
        .order_by(AiTask.start_by).limit(limit).with_for_update(skip_locked=True)
    ).all()
    return sum(expire_task(session, task_id) for task_id in overdue)


def refund_task(session: Session, task: AiTask, reason: str) -> Row | None:
    """Refund the task's charge, if it was charged and not refunded yet."""
    charge = session.scalar(
        select(Transaction).where(Transaction.task_id == task.id, Transaction.type == "credit_deduction")
    )
    if charge is None:
        return None
    already = session.scalar(select(Transaction.id).where(Transaction.refund_of_id == charge.id))
    if already is not None:
        return None
    return reverse_entry(session, charge, description=reason)


def fail_task(session: Session, task_id: uuid.UUID, message: str, code: str = "processing_failed") -> bool:
    """Fail a pending or processing task and refund what it was charged."""
    task = _lock_task(session, task_id, without_request=True)
    if task is None or task.is_final:
        return False
    task.status, task.error, task.error_code, task.completed_at = "failed", message[:2000], code, utcnow()
    refund_task(session, task, f"Refund: {task.type} task failed")
    session.flush()
    record_event(session, "task.failed", user_id=task.user_id, task_id=task.id,
                 data={"status": "failed", "errorCode": code})
    return True


def cancel_task(session: Session, user: User, task_id: uuid.UUID) -> AiTask:
    """Cancel the user's task; refund it if a worker already charged it."""
    task = _lock_task(session, task_id, user.id)
    if task is None:
        raise TaskNotFound()
    if task.is_final:
        raise TaskAlreadyFinal(f"The task is already {task.status}")
    task.status, task.completed_at = "cancelled", utcnow()
    task.error_code, task.error = "cancelled", "Cancelled by the user"
    refund_task(session, task, f"Refund: {task.type} task cancelled")
    session.flush()
    record_event(session, "task.cancelled", user_id=task.user_id, task_id=task.id,
                 data={"status": "cancelled", "errorCode": "cancelled"})
    return task


ADMIN_STATUSES = ("failed", "pending")


def admin_set_status(session: Session, task_id: uuid.UUID, status: str, message: str | None = None) -> AiTask:
    """Operators may fail a task (which refunds) or re-queue a pending one. Nothing else:
    marking unpaid work completed, or reviving a final task, is not an operator's shortcut."""
    if status not in ADMIN_STATUSES:
        raise InvalidTransition(f"Operators may set status to {' or '.join(ADMIN_STATUSES)} only")
    task = _lock_task(session, task_id)
    if task is None:
        raise TaskNotFound()
    if status == "failed":
        if task.is_final:
            raise TaskAlreadyFinal(f"The task is already {task.status}")
        fail_task(session, task_id, message or "Failed by an operator", code="failed_by_operator")
    elif task.status != "pending":
        raise InvalidTransition("Only a pending task can be re-queued")
    else:
        enqueue_after_commit(session, task.type, task.id)
    session.refresh(task)
    return task


def get_task_of(session: Session, clerk_id: str, task_id: uuid.UUID) -> AiTask:
    """The task if it belongs to the user with this clerk id, in one query (the hot read
    of a polling frontend); another user's task is a 404 like a missing one."""
    task = session.scalar(
        select(AiTask).join(User, User.id == AiTask.user_id).where(AiTask.id == task_id, User.clerk_id == clerk_id)
    )
    if task is None:
        raise TaskNotFound()
    return task


def encode_cursor(task: AiTask) -> str:
    raw = f"{task.created_at.isoformat()}|{task.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, task_id = raw.split("|", 1)
        return datetime.fromisoformat(created), uuid.UUID(task_id)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("cursor is not valid", code="invalid_cursor") from None


def list_tasks_query(
    user_id: uuid.UUID, *, status: str | None = None, task_type: str | None = None, cursor: str | None = None,
    limit: int = 20,
):
    """Newest first; keyset on (created_at, id), served by the (user, [filter,] created_at, id)
    indexes: a page costs the same whether it is the first or the five-thousandth."""
    if status is not None and status not in STATUSES:
        raise InvalidInput(f"status must be one of {', '.join(STATUSES)}", code="invalid_status")
    if task_type is not None and task_type not in TASK_TYPES:
        raise InvalidInput(f"type must be one of {', '.join(TASK_TYPES)}", code="invalid_task_type")
    query = select(AiTask).where(AiTask.user_id == user_id)
    if status:
        query = query.where(AiTask.status == status)
    if task_type:
        query = query.where(AiTask.type == task_type)
    if cursor:
        created, last_id = decode_cursor(cursor)
        # A row comparison, which PostgreSQL turns into one index range condition.
        query = query.where(tuple_(AiTask.created_at, AiTask.id) < tuple_(created, last_id))
    return query.order_by(AiTask.created_at.desc(), AiTask.id.desc()).limit(limit + 1)


def list_tasks(
    session: Session, user: User, *, status: str | None = None, task_type: str | None = None,
    cursor: str | None = None, limit: int = 20,
) -> tuple[list[AiTask], str | None]:
    query = list_tasks_query(user.id, status=status, task_type=task_type, cursor=cursor, limit=limit)
    rows = list(session.scalars(query))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def task_stats(session: Session, user: User) -> dict[str, Any]:
    by_status = dict(session.execute(
        select(AiTask.status, func.count()).where(AiTask.user_id == user.id).group_by(AiTask.status)
    ).all())
    by_type = dict(session.execute(
        select(AiTask.type, func.count()).where(AiTask.user_id == user.id).group_by(AiTask.type)
    ).all())
    spent, refunded = session.execute(
        select(
            func.coalesce(-func.sum(Transaction.amount).filter(Transaction.type == "credit_deduction"), 0),
            func.coalesce(func.sum(Transaction.amount).filter(Transaction.type == "credit_refund"), 0),
        ).where(Transaction.user_id == user.id)
    ).one()
    return {
        "total": sum(by_status.values()),
        "byStatus": {s: by_status.get(s, 0) for s in STATUSES},
        "byType": {t: by_type.get(t, 0) for t in TASK_TYPES},
        "creditsSpent": int(spent),
        "creditsRefunded": int(refunded),
        "netCreditsSpent": int(spent) - int(refunded),
    }


def requeue_lost_tasks(session: Session, older_than: timedelta, limit: int = 500) -> int:
    """Re-send pending tasks whose message should long have been picked up (the broker lost
    it, or the send after commit failed). A second message for a task is harmless: the first
    delivery moves it out of `pending`, the other finds it stale. Reads ids and types only."""
    cutoff = utcnow() - older_than
    lost = session.execute(
        select(AiTask.id, AiTask.type)
        .where(AiTask.status == "pending", func.coalesce(AiTask.enqueued_at, AiTask.created_at) < cutoff)
        .order_by(AiTask.created_at).limit(limit)
    ).all()
    if lost:
        session.execute(update(AiTask).where(AiTask.id.in_([row.id for row in lost])).values(enqueued_at=utcnow()),
                        execution_options={"synchronize_session": False})
    for row in lost:
        enqueue_after_commit(session, row.type, row.id)
    return len(lost)


def stuck_processing_tasks(session: Session, older_than: dict[str, timedelta], limit: int = 500) -> list[uuid.UUID]:
    now = utcnow()
    conditions = [and_(AiTask.type == t, AiTask.started_at < now - age) for t, age in older_than.items()]
    if not conditions:
        return []
    return list(session.scalars(
        select(AiTask.id).where(AiTask.status == "processing", or_(*conditions)).order_by(AiTask.started_at).limit(limit)
    ))


# --- retention ------------------------------------------------------------------------------

def output_file_key(task_id: uuid.UUID, file: Any) -> str | None:
    """The storage key of the task's output file (`output["file"]["key"]`), if it lies under
    the task's own prefix `outputs/<task id>/`; None otherwise. Only such a key is served or
    deleted, so a processor's bad output can never reach another user's upload or output."""
    key = file.get("key") if isinstance(file, dict) else None
    if not isinstance(key, str) or not key.startswith(f"outputs/{task_id}/") or ".." in key.split("/"):
        return None
    return key


def lock_outputs_to_expire(session: Session, completed_before: datetime, *,
                           after: tuple[datetime, uuid.UUID] | None = None, limit: int = 200) -> list[Row]:
    """Up to `limit` tasks completed before `completed_before` whose output file is still
    stored, oldest first (after the keyset `after`), locked; rows another run holds are
    skipped, so two runs never take the same task. Each row: id, completed_at, file (the
    output's `file` object)."""
    query = (
        select(AiTask.id, AiTask.completed_at, AiTask.output["file"].label("file"))
        .where(text(_OUTPUT_UNEXPIRED_SQL), AiTask.completed_at < completed_before)
        .order_by(AiTask.completed_at, AiTask.id).limit(limit)
        .with_for_update(skip_locked=True, of=AiTask)
    )
    if after is not None:
        query = query.where(tuple_(AiTask.completed_at, AiTask.id) > tuple_(*after))
    return list(session.execute(query))


def mark_outputs_expired(session: Session, task_ids: list[uuid.UUID], now: datetime | None = None) -> int:
    """Note that these tasks' output files are deleted (GET .../output answers 410 from now
    on); a task already noted keeps its date. Touches nothing else: no status, no ledger."""
    if not task_ids:
        return 0
    result = session.execute(
        update(AiTask).where(AiTask.id.in_(task_ids), AiTask.output_expired_at.is_(None))
        .values(output_expired_at=now or utcnow()),
        execution_options={"synchronize_session": False})
    return result.rowcount


def uploads_in_flight(session: Session, user_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Upload ids named as input by the users' tasks still pending or processing: their
    files must stay until the task is final. Few rows: admission holds each user to their
    plan's limit of tasks in flight."""
    if not user_ids:
        return set()
    in_use: set[uuid.UUID] = set()
    rows = session.execute(
        select(AiTask.type, AiTask.input).where(AiTask.status.in_(IN_FLIGHT), AiTask.user_id.in_(user_ids)))
    for task_type, input in rows:
        try:
            refs = [ref for kind, ref in map(source_ref, input_sources(task_type, input)) if kind == "upload"]
        except ValueError:
            continue  # a request the worker will fail as unreadable: it reads no upload
        for ref in refs:
            try:
                in_use.add(uuid.UUID(ref))
            except ValueError:
                pass
    return in_use
