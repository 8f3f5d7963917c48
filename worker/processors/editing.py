"""advanced_editing: an ordered list of image operations, applied with Pillow.

The vocabulary and its defaults are defined once, in `tasktypes.params` (EditParams, one
model per operation), and validated there before a task is admitted; this module applies
each operation in order, reading the plain dicts `normalize_params` makes of them.

Conventions a user relies on:
- Photos are turned upright from their EXIF orientation first (params.autoOrient, default
  true), so coordinates and sizes refer to the image as a viewer shows it.
- Rotation is clockwise in degrees; a multiple of 90 with expand is lossless.
- Output metadata is stripped (no GPS leaves with an edited photo) except the colour
  profile. Transparency is kept by PNG and WebP and flattened onto params.background for JPEG.
- The default output format is the input's when it is JPEG, PNG or WebP, otherwise PNG.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from .base import InputFile, PermanentError, ProcessContext
from .imaging import (
    flatten,
    font,
    max_image_pixels,
    open_image,
    oriented,
    read_params,
    scratch_dir,
    store_output,
    to_working_mode,
)

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_DEFAULT_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp"}


class _Chain:
    """What the operations share: the pixel limit, and where the current one is in the list."""

    def __init__(self, limit: int):
        self.limit = limit
        self.where = ""

    def refuse(self, message: str, code: str = "invalid_params") -> PermanentError:
        return PermanentError(f"{self.where}: {message}", code=code)

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.limit:
            raise self.refuse(f"the result would be {width}x{height} ({width * height:,} pixels); "
                              f"the limit is {self.limit:,}", code="image_too_large")


def _colour_only(image: Image.Image, fn: Callable[[Image.Image], Image.Image]) -> Image.Image:
    """Apply fn to the colour channels and keep alpha as it was (ImageEnhance would dim alpha too)."""
    if image.mode in ("RGBA", "LA"):
        alpha = image.getchannel("A")
        result = fn(image.convert(image.mode[:-1]))
        result.putalpha(alpha)
        return result
    return fn(image)


def _fill_for(image: Image.Image, colour: tuple[int, int, int, int] | None) -> tuple[Image.Image, Any]:
    """The fill for uncovered area: transparent when the image has alpha, black otherwise; a
    see-through colour on an opaque image gives it an alpha channel."""
    if colour is None:
        colour = (0, 0, 0, 0) if image.mode in ("RGBA", "LA") else (0, 0, 0, 255)
    if colour[3] < 255 and image.mode in ("RGB", "L"):
        image = image.convert(image.mode + "A")
    if image.mode == "RGBA":
        return image, colour
    if image.mode == "RGB":
        return image, colour[:3]
    luma = round(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])
    return image, (luma, colour[3]) if image.mode == "LA" else luma


def _resize(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    width, height, fit = op["width"], op["height"], op["fit"]
    w0, h0 = image.size
    if width is None or height is None:
        # One side given: scale proportionally, whatever the fit.
        factor = width / w0 if width is not None else height / h0
        target = (max(1, round(w0 * factor)), max(1, round(h0 * factor)))
        chain.check_size(*target)
        return image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    chain.check_size(width, height)
    if fit == "fill":
        return image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
    if fit == "cover":
        return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
    factor = min(width / w0, height / h0)
    inner = (max(1, round(w0 * factor)), max(1, round(h0 * factor)))
    resized = image.resize(inner, Image.Resampling.LANCZOS, reducing_gap=3.0)
    if fit == "inside":
        return resized
    # contain: letterbox to exactly width x height.
    resized, fill = _fill_for(resized, op["background"])
    canvas = Image.new(resized.mode, (width, height), fill)
    canvas.paste(resized, ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas


def _crop(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    left, top, right, bottom = op["box"]
    if right > image.width or bottom > image.height:
        raise chain.refuse(f"the box ({left}, {top}, {right}, {bottom}) reaches outside the "
                           f"{image.width}x{image.height} image")
    return image.crop((left, top, right, bottom))


def _rotate(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    degrees = op["degrees"] % 360
    if degrees == 0:
        return image
    if op["expand"] and degrees in (90, 180, 270):
        # Pillow's transposes turn counter-clockwise; ours are clockwise.
        return image.transpose({90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
                                270: Image.Transpose.ROTATE_90}[int(degrees)])
    if op["expand"]:
        radians = math.radians(degrees)
        cos, sin = abs(math.cos(radians)), abs(math.sin(radians))
        chain.check_size(math.ceil(image.width * cos + image.height * sin),
                         math.ceil(image.width * sin + image.height * cos))
    image, fill = _fill_for(image, op["fill"])
    return image.rotate(-degrees, resample=Image.Resampling.BICUBIC, expand=op["expand"], fillcolor=fill)


def _flip(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT if op["direction"] == "horizontal"
                           else Image.Transpose.FLIP_TOP_BOTTOM)


def _auto_orient(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    return oriented(image)


def _grayscale(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    return image.convert("LA" if image.mode in ("RGBA", "LA") else "L")


def _enhancer(kind: type) -> Callable[[Image.Image, dict[str, Any], _Chain], Image.Image]:
    def apply(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
        return _colour_only(image, lambda im: kind(im).enhance(op["factor"]))
    return apply


def _saturation(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    if image.mode in ("L", "LA"):
        return image
    return _colour_only(image, lambda im: ImageEnhance.Color(im).enhance(op["factor"]))


def _sharpen(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    mask = ImageFilter.UnsharpMask(radius=op["radius"], percent=op["amount"], threshold=op["threshold"])
    return _colour_only(image, lambda im: im.filter(mask))


def _blur(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(op["radius"]))


def _auto_contrast(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    return _colour_only(image, lambda im: ImageOps.autocontrast(im, cutoff=op["cutoff"]))


def _watermark(image: Image.Image, op: dict[str, Any], chain: _Chain) -> Image.Image:
    short = min(image.size)
    face = font(max(6, round(op["size"] * short)))
    margin = round(op["margin"] * short)
    stroke = max(1, face.size // 16) if hasattr(face, "size") else 1
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), op["text"], font=face, stroke_width=stroke)
    text_w, text_h = right - left, bottom - top
    column, row = _anchor(op["position"])
    x = {0: margin, 1: (image.width - text_w) // 2, 2: image.width - text_w - margin}[column] - left
    y = {0: margin, 1: (image.height - text_h) // 2, 2: image.height - text_h - margin}[row] - top
    alpha = round(255 * op["opacity"])
    r, g, b, a = op["color"]
    # A dark outline keeps light text legible on light areas (and the reverse for dark text).
    outline = (0, 0, 0) if (0.299 * r + 0.587 * g + 0.114 * b) > 128 else (255, 255, 255)
    draw.text((x, y), op["text"], font=face, fill=(r, g, b, round(alpha * a / 255)),
              stroke_width=stroke, stroke_fill=outline + (round(alpha * 0.6),))
    mode = image.mode
    base = image.convert("RGBA")
    base.alpha_composite(layer)
    return base if mode == "RGBA" else base.convert(mode)


def _anchor(position: str) -> tuple[int, int]:
    """(column, row) with 0 = left/top, 1 = centre, 2 = right/bottom."""
    column = 0 if "left" in position else 2 if "right" in position else 1
    row = 0 if position.startswith("top") else 2 if position.startswith("bottom") else 1
    return column, row


OPERATIONS: dict[str, Callable[[Image.Image, dict[str, Any], _Chain], Image.Image]] = {
    "resize": _resize,
    "crop": _crop,
    "rotate": _rotate,
    "flip": _flip,
    "auto_orient": _auto_orient,
    "grayscale": _grayscale,
    "brightness": _enhancer(ImageEnhance.Brightness),
    "contrast": _enhancer(ImageEnhance.Contrast),
    "saturation": _saturation,
    "sharpen": _sharpen,
    "blur": _blur,
    "auto_contrast": _auto_contrast,
    "watermark": _watermark,
}


def _encode(image: Image.Image, spec: dict[str, Any], path, icc: bytes | None) -> None:
    fmt = spec["format"]
    extra: dict[str, Any] = {}
    if icc and image.mode in ("RGB", "RGBA"):
        extra["icc_profile"] = icc
    if fmt == "jpeg":
        image = flatten(image, spec["background"])
        image.save(path, "JPEG", quality=spec["quality"], optimize=True, **extra)
    elif fmt == "webp":
        image.save(path, "WEBP", quality=spec["quality"], method=4, **extra)
    else:
        image.save(path, "PNG", compress_level=6, **extra)


def edit_image(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    spec = read_params("advanced_editing", params)
    operations = spec["operations"]
    chain = _Chain(max_image_pixels(ctx))
    steps = len(operations) + 2
    with open_image(inputs[0].path, chain.limit) as source:
        spec["format"] = spec["format"] or _DEFAULT_FORMATS.get(source.format or "", "png")
        # An RGB profile stays valid through these operations; a CMYK one would not after conversion.
        icc = source.info.get("icc_profile") if source.mode in ("RGB", "RGBA") else None
        image = oriented(source) if spec["autoOrient"] else source
        image = to_working_mode(image)
        if image is source:
            # Operations may return their input unchanged; the result must outlive the file.
            image = source.copy()
    ctx.progress(round(100 / steps))
    for index, op in enumerate(operations):
        ctx.check_cancelled()
        chain.where = f"operations[{index}] ({op['op']})"
        image = OPERATIONS[op["op"]](image, op, chain)
        ctx.progress(round(100 * (index + 2) / steps))
    ctx.check_cancelled()

    fmt = spec["format"]
    name = f"edited.{EXTENSIONS[fmt]}"
    with scratch_dir(ctx) as workdir:
        path = workdir / name
        _encode(image, spec, path, icc)
        ctx.check_cancelled()
        file = store_output(ctx, path, name, CONTENT_TYPES[fmt])
    ctx.progress(100)
    return {"file": file, "width": image.width, "height": image.height, "format": fmt,
            "operations": len(operations)}
