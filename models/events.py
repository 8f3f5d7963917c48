"""The event log: what happened to a user's tasks and credits, in order, once.

Every change a client may want to hear of is appended here in the transaction that makes
it (a task started, progressed by a tenth, completed, failed, was cancelled or expired; a
balance fell below its threshold), so the log and the state never disagree. Readers go by
id: a Server-Sent Events stream resumes after `Last-Event-ID`, webhook deliveries fan out
from a cursor, and a request waiting on a task (`Prefer: wait`) re-reads it when woken.

After the outermost commit, the session's notifier (set by the API and the workers; see
`set_notifier`) is told of the new events, to wake waiters at once (Redis pub/sub). A
notification is only a wake-up: the log is the truth, and a lost one delays, never loses.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Identity, Index, String, event, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from .base import Base, sql_in, utcnow

log = logging.getLogger(__name__)

TASK_EVENT_TYPES = ("task.started", "task.progress", "task.completed", "task.failed", "task.cancelled",
                    "task.expired")
EVENT_TYPES = (*TASK_EVENT_TYPES, "credits.low")


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint(sql_in("type", EVENT_TYPES), name="type_known"),
        CheckConstraint("(task_id IS NOT NULL) = (type LIKE 'task.%')", name="task_events_name_task"),
        Index("ix_events_task_id_id", "task_id", "id", postgresql_where=text("task_id IS NOT NULL")),
        Index("ix_events_user_id_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    task_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("ai_tasks.id"))
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict, server_default="{}")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


@dataclass(frozen=True)
class Notice:
    """What a notifier is told of a committed event."""

    id: int
    type: str
    user_id: uuid.UUID
    task_id: uuid.UUID | None


Notify = Callable[[list[Notice]], None]
_PENDING = "studiox.events"
_NOTIFIER = "studiox.notify"

_APPEND = Event.__table__.insert().returning(Event.__table__.c.id)


def record_event(session: Session, type: str, *, user_id: uuid.UUID, task_id: uuid.UUID | None = None,
                 data: dict[str, Any] | None = None) -> int:
    """Append an event in the caller's transaction; its notice goes out after commit."""
    event_id = session.execute(_APPEND, {"user_id": user_id, "task_id": task_id, "type": type, "data": data or {},
                                         "created_at": utcnow()}).scalar_one()
    session.info.setdefault(_PENDING, []).append(Notice(event_id, type, user_id, task_id))
    return event_id


def set_notifier(target: Session | sessionmaker, notify: Notify) -> None:
    """Give a session, or every session a sessionmaker makes from now on, the notifier."""
    if isinstance(target, sessionmaker):
        target.kw.setdefault("info", {})[_NOTIFIER] = notify
    else:
        target.info[_NOTIFIER] = notify


@event.listens_for(Session, "after_commit")
def _notify(session: Session) -> None:
    if session.in_nested_transaction():
        return
    notices = session.info.pop(_PENDING, None)
    notify = session.info.get(_NOTIFIER)
    if not notices or notify is None:
        return
    try:
        notify(notices)
    except Exception:  # a wake-up only: waiters re-read on their own deadline
        log.warning("notifying %d event(s) failed", len(notices), exc_info=True)


@event.listens_for(Session, "after_soft_rollback")
def _forget(session: Session, previous_transaction) -> None:
    # A rolled-back savepoint's events would only cause a spurious wake-up; the outer
    # rollback drops them all.
    if previous_transaction.parent is None:
        session.info.pop(_PENDING, None)
