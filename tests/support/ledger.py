"""Reading a task's money back from the ledger."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import Transaction


def charges(session: Session, task_id: uuid.UUID) -> list[Transaction]:
    return list(session.scalars(select(Transaction).where(Transaction.task_id == task_id,
                                                          Transaction.type == "credit_deduction")))


def refunds(session: Session, task_id: uuid.UUID) -> list[Transaction]:
    return list(session.scalars(select(Transaction).where(Transaction.task_id == task_id,
                                                          Transaction.type == "credit_refund")))
