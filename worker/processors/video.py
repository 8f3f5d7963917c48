"""video_generation: an MP4 from images (filled in by the processing issue)."""

from __future__ import annotations

from typing import Any

from .base import InputFile, PermanentError, ProcessContext


def generate_video(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    raise PermanentError("video_generation is not available yet", code="not_implemented")
