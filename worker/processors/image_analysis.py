"""image_analysis: what is in an image (filled in by the processing issue)."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageStat, UnidentifiedImageError

from .base import InputFile, PermanentError, ProcessContext


def analyse_image(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    try:
        with Image.open(inputs[0].path) as image:
            image.load()
            ctx.progress(50)
            ctx.check_cancelled()
            stat = ImageStat.Stat(image.convert("RGB"))
            result = {"format": image.format, "width": image.width, "height": image.height, "mode": image.mode,
                      "meanColor": [round(v, 2) for v in stat.mean]}
    except (UnidentifiedImageError, OSError) as exc:
        raise PermanentError(f"The input is not a readable image: {exc}", code="invalid_image") from None
    ctx.progress(100)
    return {"analysis": result}
