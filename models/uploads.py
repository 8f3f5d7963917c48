"""Uploaded input files: owned by one user, usable as task input by that user only."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, String, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, utcnow
from .errors import UploadNotFound


class Upload(Base):
    __tablename__ = "uploads"
    __table_args__ = (CheckConstraint("size >= 0", name="size_nonnegative"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    filename: Mapped[str | None] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(127))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(512))
    width: Mapped[int | None]
    height: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


def add_upload(session: Session, user_id: uuid.UUID, **fields) -> Upload:
    upload = Upload(user_id=user_id, **fields)
    session.add(upload)
    session.flush()
    return upload


def get_upload(session: Session, user_id: uuid.UUID, upload_id: uuid.UUID) -> Upload:
    """The user's own upload; another user's is a 404, like a missing one."""
    upload = session.scalar(select(Upload).where(Upload.id == upload_id, Upload.user_id == user_id))
    if upload is None:
        raise UploadNotFound()
    return upload
