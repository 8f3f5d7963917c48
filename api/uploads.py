"""/api/uploads: a user's input files, usable as task input by that user only.

A file arrives as multipart/form-data (a `file` field) or as a raw body (Content-Type
image/* or application/octet-stream, optional X-Filename). It is streamed to a temporary
file under the size cap, then judged by its bytes alone: the magic number names the
format and Pillow must open and verify it with that format's decoder. The claimed
Content-Type and the file name decide nothing. Videos are not accepted: every processor
reads images (video_generation makes an MP4 *from* images).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import falcon
from PIL import Image

from models.errors import InvalidInput, UploadNotFound
from models.uploads import ImageTooLarge, InvalidImage, UnsupportedMediaType, add_upload, get_upload
from tasktypes import IMAGE_FORMATS, sniff_content_type

from . import schemas
from .context import current_user, parse_uuid
from .openapi import operation
from .serialize import media

_BINARY = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_CONTENT = {
    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/UploadForm"}},
    "image/*": _BINARY,
    "application/octet-stream": _BINARY,
}

log = logging.getLogger("studiox.api")

CHUNK = 1 << 16
# Multipart framing (boundaries, part headers, small fields) comes on top of the file.
MULTIPART_OVERHEAD = 64 * 1024
# Images up to this size are decoded in full as a last check (JPEGs at a reduced scale);
# larger ones only get Pillow's structural verify(), to keep the API's memory bounded.
FULL_DECODE_PIXELS = 16_000_000


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int


def inspect_image(path: Path, max_pixels: int) -> ImageInfo:
    """What image the file holds, judged by its bytes; refuses non-images, broken images
    and pixel bombs (a small file that would decode to gigabytes)."""
    with open(path, "rb") as f:
        content_type = sniff_content_type(f.read(32))
    pil_format = IMAGE_FORMATS.get(content_type)
    if pil_format is None:
        raise UnsupportedMediaType(
            "The file is not a supported image; upload a JPEG, PNG, GIF, WebP, BMP or TIFF file"
        )
    too_large = ImageTooLarge(f"The image has more than {max_pixels:,} pixels; upload a smaller one")
    try:
        with warnings.catch_warnings():
            # Pillow warns past its own bomb threshold and raises past twice that; both are refusals.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=[pil_format]) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise too_large
                image.verify()
            if width * height <= FULL_DECODE_PIXELS:
                with Image.open(path, formats=[pil_format]) as image:
                    if pil_format == "JPEG":
                        image.draft("RGB", (1024, 1024))
                    image.load()
    except ImageTooLarge:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error… on bad data
        # Pillow's message may name our temporary file: keep the server's paths out of it.
        detail = str(exc).replace(str(path), "the file")
        raise InvalidImage(f"The file is not a readable {pil_format} image ({detail})"[:300]) from None
    if width <= 0 or height <= 0:
        raise InvalidImage("The image has no pixels")
    return ImageInfo(content_type, width, height)


def clean_filename(name: str | None) -> str | None:
    """A display name only (storage keys never use it): last path segment, no control characters."""
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:255] or None


def storage_unavailable(exc: Exception) -> falcon.HTTPServiceUnavailable:
    """The file store (S3 or the shared directory) failed: a 503 the client may retry."""
    log.warning("storage unavailable: %s: %s", type(exc).__name__, exc)
    return falcon.HTTPServiceUnavailable(title="Service unavailable", code="storage_unavailable", retry_after=5,
                                         description="The file store is unavailable; try again shortly")


def _too_large(limit: int) -> falcon.HTTPContentTooLarge:
    return falcon.HTTPContentTooLarge(title="Payload too large", code="payload_too_large",
                                      description=f"The file is larger than the {limit:,} byte limit")


def copy_capped(source: BinaryIO, out: BinaryIO, limit: int) -> tuple[int, str]:
    """Copy a stream to `out`, refusing more than `limit` bytes; returns (size, sha256)."""
    digest, size = hashlib.sha256(), 0
    while True:
        chunk = source.read(min(CHUNK, limit + 1 - size))
        if not chunk:
            return size, digest.hexdigest()
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        digest.update(chunk)
        out.write(chunk)


class UploadsResource:
    def __init__(self, storage, settings):
        self.storage = storage
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_image_pixels = settings.max_image_pixels
        # Read by BodyLimitMiddleware; the file itself is held to max_upload_bytes below.
        self.max_body_bytes = settings.max_upload_bytes + MULTIPART_OVERHEAD

    def _receive_multipart(self, req: falcon.Request, out: BinaryIO) -> tuple[int, str, str | None]:
        if req.content_length is None:
            # Falcon's multipart parser needs the length to bound its reads.
            raise falcon.HTTPLengthRequired(title="Length required", code="length_required",
                                            description="A multipart upload needs a Content-Length header")
        received = None
        try:
            for part in req.get_media():
                if part.name != "file":
                    continue  # other fields are skipped; the parser discards their bytes
                if received is not None:
                    raise InvalidInput("Send one file per upload", code="too_many_files")
                size, sha = copy_capped(part.stream, out, self.max_upload_bytes)
                received = (size, sha, clean_filename(part.filename))
        except falcon.MultipartParseError as exc:
            raise InvalidInput(f"The multipart body is malformed: {exc.description}",
                               code="invalid_multipart") from None
        except UnicodeDecodeError:
            # A part's name or filename that is not UTF-8 (Falcon decodes them on access).
            raise InvalidInput("The multipart body has a part name or filename that is not UTF-8",
                               code="invalid_multipart") from None
        if received is None:
            raise InvalidInput("The form has no `file` field", code="file_required")
        return received

    def _receive_raw(self, req: falcon.Request, out: BinaryIO) -> tuple[int, str, str | None]:
        claimed = (req.content_type or "").split(";", 1)[0].strip().lower()
        if not (claimed.startswith("image/") or claimed == "application/octet-stream"):
            raise UnsupportedMediaType(
                "Send the file as multipart/form-data (field `file`) or as a raw body with an image/* Content-Type"
            )
        # With a Content-Length the bounded stream stops there; without one (chunked) the
        # body-limit middleware has already wrapped req.stream in a capped reader.
        source = req.bounded_stream if req.content_length is not None else req.stream
        size, sha = copy_capped(source, out, self.max_upload_bytes)
        return size, sha, clean_filename(req.get_header("X-Filename"))

    @operation("Upload an image to use as task input", request_content=UPLOAD_CONTENT, links={201: {
                   "GetUpload": {"operationId": "get_api_uploads_upload_id",
                                 "parameters": {"upload_id": "$response.body#/upload/id"}}}},
               responses={201: schemas.UploadEnvelope}, errors=(411,),
               description="multipart/form-data with a `file` field, or the raw image as the body (optional "
                           "X-Filename header). The bytes decide the type: JPEG, PNG, GIF, WebP, BMP or TIFF.")
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        user = current_user(req)
        multipart = (req.content_type or "").lower().startswith("multipart/form-data")
        with tempfile.NamedTemporaryFile(prefix="upload-") as tmp:
            size, sha, filename = (self._receive_multipart if multipart else self._receive_raw)(req, tmp)
            tmp.flush()
            if size == 0:
                raise InvalidInput("The file is empty", code="empty_file")
            info = inspect_image(Path(tmp.name), self.max_image_pixels)
            upload_id = uuid.uuid4()
            key = f"uploads/{user.id}/{upload_id}"
            try:
                self.storage.save_file(key, Path(tmp.name))
            except Exception as exc:
                raise storage_unavailable(exc) from None
        try:
            upload = add_upload(
                req.context.session, user.id, id=upload_id, filename=filename, content_type=info.content_type,
                size=size, sha256=sha, storage_key=key, width=info.width, height=info.height,
            )
        except Exception:
            self.storage.delete(key)  # no row will name this file
            raise
        resp.status = falcon.HTTP_201
        resp.media = media(schemas.UploadEnvelope(upload=upload))


class UploadResource:
    @operation("Read one of your uploads", responses={200: schemas.UploadEnvelope}, errors=(404,))
    def on_get(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        upload = get_upload(req.context.session, current_user(req).id,
                            parse_uuid(upload_id, not_found=UploadNotFound))
        resp.media = media(schemas.UploadEnvelope(upload=upload))
