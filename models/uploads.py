"""Uploaded input files: owned by one user, usable as task input by that user only."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, String, bindparam, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from .base import Base, utcnow
from .errors import DomainError, UploadNotFound
from .params import input_sources, source_ref


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


# The image formats the service accepts, by media type, with the Pillow decoder for each.
# Pillow can open more (EPS hands the file to Ghostscript, for one); an upload is untrusted,
# so only the common raster formats get through, at upload and again in the processors.
IMAGE_FORMATS = {
    "image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF", "image/webp": "WEBP",
    "image/bmp": "BMP", "image/tiff": "TIFF",
}

# Magic numbers of the formats the processors read. Sniffed from the bytes, never taken
# from a file name or a client's Content-Type, which cost nothing to forge.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"BM", "image/bmp"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
)


def sniff_content_type(head: bytes) -> str:
    """The media type the first bytes of a file announce; application/octet-stream if unknown."""
    for offset, magic, media_type in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1"):
            return "image/heic"
        if brand == b"qt  ":
            return "video/quicktime"
        return "video/mp4"
    return "application/octet-stream"


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
    refs = [ref for kind, ref in map(source_ref, input_sources(task_type, input)) if kind == "upload"]
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
