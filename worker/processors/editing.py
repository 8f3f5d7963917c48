"""advanced_editing: an ordered list of image operations (filled in by the processing issue)."""

from __future__ import annotations

from typing import Any

from .base import InputFile, PermanentError, ProcessContext


def edit_image(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    raise PermanentError("advanced_editing is not available yet", code="not_implemented")
