"""Uploaded input files: owned by one user, usable as task input by that user only."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    bindparam,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapped, Session, mapped_column

from tasktypes.inputs import input_sources, source_ref

from .base import Base, utcnow
from .errors import DomainError, InvalidInput, UploadNotFound


class Upload(Base):
    __tablename__ = "uploads"
    __table_args__ = (
        CheckConstraint("size >= 0", name="size_nonnegative"),
        # The retention job's scan: uploads whose file is still stored, oldest first.
        Index("ix_uploads_unexpired_created", "created_at", "id", postgresql_where=text("expired_at IS NULL")),
    )

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
    # When retention deleted the file (RETENTION_DAYS); the row stays, naming what it was.
    expired_at: Mapped[datetime | None]


class UploadExpired(UploadNotFound):
    """The upload's file was deleted by retention."""

    code = "upload_expired"


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
_FILE_OF = select(Upload.storage_key, Upload.content_type, Upload.expired_at).where(*_OWN_UPLOAD)
# FOR SHARE: a task admitted with an upload as input holds it until the task row commits,
# and the retention job (FOR UPDATE SKIP LOCKED) passes it by; once that job has locked an
# upload, an admission waits for it and then reads the upload as expired. Either way no
# task in flight names a deleted file.
_OWNED = (
    select(Upload.id, Upload.expired_at)
    .where(Upload.id.in_(bindparam("ids", expanding=True)), Upload.user_id == bindparam("user_id"))
    .with_for_update(read=True)
)


def _expired(upload_id: Any, expired_at: datetime) -> UploadExpired:
    return UploadExpired(f"Upload {upload_id} has expired: its file was deleted on {expired_at:%Y-%m-%d}; "
                         "upload it again")


def upload_file(session: Session, user_id: uuid.UUID, upload_id: uuid.UUID) -> tuple[str, str]:
    """(storage key, content type) of the user's own upload; another user's is a 404, an
    expired one UploadExpired. What a worker needs to read an input, without the whole row."""
    row = session.execute(_FILE_OF, {"upload_id": upload_id, "user_id": user_id}).one_or_none()
    if row is None:
        raise UploadNotFound()
    if row.expired_at is not None:
        raise _expired(upload_id, row.expired_at)
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
    owned = {row.id: row.expired_at for row in session.execute(_OWNED, {"ids": sorted(ids), "user_id": user_id})}
    missing = [str(i) for i in ids - owned.keys()]
    if missing:
        raise UploadNotFound(f"Upload {missing[0]} not found")
    for upload_id, expired_at in owned.items():
        if expired_at is not None:
            raise _expired(upload_id, expired_at)


# --- retention ------------------------------------------------------------------------------

def lock_uploads_to_expire(session: Session, created_before: datetime, *,
                           after: tuple[datetime, uuid.UUID] | None = None, limit: int = 200) -> list[Row]:
    """Up to `limit` uploads made before `created_before` whose file is still stored, oldest
    first (after the keyset `after`), locked. Rows another run holds are skipped, so two
    runs never take the same upload. Each row: id, user_id, storage_key, created_at."""
    query = (
        select(Upload.id, Upload.user_id, Upload.storage_key, Upload.created_at)
        .where(Upload.expired_at.is_(None), Upload.created_at < created_before)
        .order_by(Upload.created_at, Upload.id).limit(limit)
        .with_for_update(skip_locked=True)
    )
    if after is not None:
        query = query.where(tuple_(Upload.created_at, Upload.id) > tuple_(*after))
    return list(session.execute(query))


def mark_uploads_expired(session: Session, upload_ids: list[uuid.UUID], now: datetime | None = None) -> int:
    """Note that these uploads' files are deleted; an upload already noted keeps its date."""
    if not upload_ids:
        return 0
    result = session.execute(
        update(Upload).where(Upload.id.in_(upload_ids), Upload.expired_at.is_(None)).values(expired_at=now or utcnow()),
        execution_options={"synchronize_session": False})
    return result.rowcount
