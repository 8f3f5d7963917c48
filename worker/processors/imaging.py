"""Shared image plumbing for the processors: safe decoding, orientation, params, fonts, output files.

Every processor opens its inputs through `open_image`, so the refusals are the same
everywhere: a file Pillow cannot decode is `invalid_image`, one with more pixels than
`settings.max_image_pixels` (read from the header, before any pixel is decoded) is
`image_too_large`.
"""

from __future__ import annotations

import errno
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageFont, ImageOps, UnidentifiedImageError, features
from pydantic import ValidationError

from tasktypes.formats import IMAGE_FORMATS
from tasktypes.params import normalize_params
from tasktypes.validation import validation_failures

from .base import PermanentError, ProcessContext

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
# The formats the service accepts (tasktypes.formats), decoded by these Pillow plugins only.
# (Multi-picture JPEGs from phones open through the JPEG plugin and report "MPO".)
ALLOWED_FORMATS = tuple(IMAGE_FORMATS.values())
ORIENTATION_TAG = 0x0112


def max_image_pixels(ctx: ProcessContext) -> int:
    return int(getattr(ctx.settings, "max_image_pixels", None) or DEFAULT_MAX_IMAGE_PIXELS)


def read_params(task_type: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The normalized params (tasktypes.params). The API validated them already; a task
    admitted under older rules fails permanently instead of crashing the processor."""
    try:
        return normalize_params(task_type, params)
    except ValidationError as exc:
        raise PermanentError(params_problem(exc, params), code="invalid_params") from None


def params_problem(exc: ValidationError, params: Any) -> str:
    """The first failure as the API words it: `params.operations[2].degrees: must be ...`."""
    first = validation_failures(exc, params, "params")[0]
    return f"{first['path']}: {first['message']}"


def _too_large(width: int, height: int, limit: int) -> PermanentError:
    return PermanentError(f"The image is {width}x{height} ({width * height:,} pixels); the limit is {limit:,} pixels",
                          code="image_too_large")


@contextmanager
def open_image(path: Path | str, limit: int, *, draft: tuple[int, int] | None = None) -> Iterator[Image.Image]:
    """The decoded first frame of an image file, closed on exit.

    `draft` lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) no smaller than the given
    size: much faster when only a working copy is needed.
    """
    try:
        image = Image.open(path, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise PermanentError(f"The image is too large to decode safely: {exc}", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PermanentError(f"The input is not a readable image ({type(exc).__name__})",
                             code="invalid_image") from None
    try:
        # The header gives the size before any pixel is decoded: a small file that
        # inflates to gigabytes (a decompression bomb) stops here.
        if image.width * image.height > limit:
            raise _too_large(image.width, image.height, limit)
        if image.width < 1 or image.height < 1:
            raise PermanentError("The image has no pixels", code="invalid_image")
        # draft() below changes size and mode to the reduced decode; keep the stored ones.
        image._stored = (image.size, image.mode)  # type: ignore[attr-defined]
        if draft and image.format in ("JPEG", "MPO"):
            image.draft("RGB" if image.mode not in ("L", "CMYK") else image.mode, draft)
        try:
            image.load()
        except Image.DecompressionBombError as exc:
            raise PermanentError(f"The image is too large to decode safely: {exc}", code="image_too_large") from None
        except MemoryError:
            raise PermanentError("The image is too large to decode", code="image_too_large") from None
        except Exception as exc:  # noqa: BLE001 — decoders raise many types on malformed data
            raise PermanentError(f"The image could not be decoded ({type(exc).__name__}: {exc})",
                                 code="invalid_image") from None
        yield image
    finally:
        image.close()


def stored_size(image: Image.Image) -> tuple[int, int]:
    return getattr(image, "_stored", (image.size,))[0]


def stored_mode(image: Image.Image) -> str:
    return getattr(image, "_stored", (None, image.mode))[1]


def orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 — a broken EXIF block must not fail the task
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def oriented(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it (EXIF orientation applied); itself when upright."""
    if orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_working_mode(image: Image.Image) -> Image.Image:
    """RGB or RGBA (L / LA stay grey): the modes every operation below handles."""
    if image.mode in ("RGB", "RGBA", "L", "LA"):
        return image
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("PA", "RGBa", "La"):
        return image.convert("RGBA")
    if image.mode.startswith("I") or image.mode == "F":
        # 16/32-bit greyscale: scale to 8 bits rather than clip.
        import numpy as np

        data = np.asarray(image, dtype=np.float64)
        lo, hi = float(data.min()), float(data.max())
        scaled = (data - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(data)
        return Image.fromarray(scaled.astype("uint8"), "L")
    return image.convert("RGB")


def flatten(image: Image.Image, background: tuple[int, int, int, int]) -> Image.Image:
    """Alpha composited over an opaque background (for formats without transparency)."""
    if image.mode not in ("RGBA", "LA"):
        return image
    base = Image.new("RGBA", image.size, background[:3] + (255,))
    base.alpha_composite(image.convert("RGBA"))
    return base.convert("RGB" if image.mode == "RGBA" else "L")


# Pillow's bundled font covers Latin letters only; DejaVu Sans (on most Linux systems)
# also has accents, dashes, Greek and Cyrillic, so it is used when present.
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(4, int(size))
    if not features.check("freetype2"):
        return ImageFont.load_default()
    for candidate in FONT_CANDIDATES:
        if Path(candidate).is_file():
            try:
                return ImageFont.truetype(candidate, size)
            except OSError:
                continue
    return ImageFont.load_default(size=size)


@contextmanager
def scratch_dir(ctx: ProcessContext) -> Iterator[Path]:
    """The task's work directory, or a temporary one when the context has none."""
    if ctx.workdir is not None:
        Path(ctx.workdir).mkdir(parents=True, exist_ok=True)
        yield Path(ctx.workdir)
        return
    with tempfile.TemporaryDirectory(prefix=f"task-{ctx.task_id}-") as tmp:
        yield Path(tmp)


def store_output(ctx: ProcessContext, path: Path, name: str, content_type: str) -> dict[str, Any]:
    """Save a finished file under the task's output prefix; the "file" dict the output route streams."""
    key = f"outputs/{ctx.task_id}/{name}"
    try:
        size = ctx.storage.save_file(key, path)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # The store is full: this task fails (refunded) with a code an operator can alert
            # on; the worker goes on with the next task, which may be smaller.
            raise PermanentError("There was no space left to store the output", "storage_full") from exc
        raise
    return {"key": key, "contentType": content_type, "size": size, "name": name}
