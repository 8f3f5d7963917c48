"""Uploaded input files: owned by one user, usable as task input by that user only."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, String, bindparam, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from tasktypes.inputs import input_sources, source_ref

from .base import Base, utcnow
from .errors import DomainError, InvalidInput, UploadNotFound


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


class UnsupportedMediaType(DomainError):
    """The file is not a supported image."""

    status_code = 415
    code = "unsupported_media_type"


class InvalidImage(DomainError):
    """The file looks like an image but cannot be read."""

    status_code = 400
    code = "invalid_image"


class ImageTooLarge(DomainError):
    """The image has more pixels than this server accepts."""

    status_code = 400
    code = "image_too_large"


def add_upload(session: Session, user_id: uuid.UUID, **fields) -> Upload:
    upload = Upload(user_id=user_id, **fields)
    session.add(upload)
    session.flush()
    return upload


_OWN_UPLOAD = (Upload.id == bindparam("upload_id"), Upload.user_id == bindparam("user_id"))
_GET = select(Upload).where(*_OWN_UPLOAD)
_FILE_OF = select(Upload.storage_key, Upload.content_type).where(*_OWN_UPLOAD)
_OWNED = select(Upload.id).where(Upload.id.in_(bindparam("ids", expanding=True)), Upload.user_id == bindparam("user_id"))


def upload_file(session: Session, user_id: uuid.UUID, upload_id: uuid.UUID) -> tuple[str, str]:
    """(storage key, content type) of the user's own upload; another user's is a 404.
    What a worker needs to read an input, without loading the whole row."""
    row = session.execute(_FILE_OF, {"upload_id": upload_id, "user_id": user_id}).one_or_none()
    if row is None:
        raise UploadNotFound()
    return row.storage_key, row.content_type


def get_upload(session: Session, user_id: uuid.UUID, upload_id: uuid.UUID) -> Upload:
    """The user's own upload; another user's is a 404, like a missing one."""
    upload = session.scalar(_GET, {"upload_id": upload_id, "user_id": user_id})
    if upload is None:
        raise UploadNotFound()
    return upload


def check_inputs_owned(session: Session, user_id: uuid.UUID, task_type: str, input: Any) -> None:
    """Every upload a task input names exists and belongs to the user; otherwise 404.

    The worker checks again when it resolves the inputs (an upload could be deleted in
    between); this check only spares the user a charge-and-refund for a typo.
    """
    try:
        refs = [ref for kind, ref in map(source_ref, input_sources(task_type, input)) if kind == "upload"]
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_input") from None
    if not refs:
        return
    ids: set[uuid.UUID] = set()
    for ref in refs:
        try:
            ids.add(uuid.UUID(ref))
        except ValueError:
            raise UploadNotFound(f"Upload {ref[:64]} not found") from None
    owned = set(session.scalars(_OWNED, {"ids": list(ids), "user_id": user_id}))
    missing = [str(i) for i in ids - owned]
    if missing:
        raise UploadNotFound(f"Upload {missing[0]} not found")
