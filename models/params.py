"""What a task request may contain, checked before it is admitted (400 on the first problem).

Pure validation: no processing, no I/O. The processors read the normalized params.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidInput

MAX_VIDEO_IMAGES = 20


def _check_source(value: Any, where: str) -> None:
    if isinstance(value, str):
        if not value.strip() or len(value) > 2048:
            raise InvalidInput(f"{where} must be an upload id or an http(s) URL", code="invalid_input")
        return
    if isinstance(value, dict) and (isinstance(value.get("uploadId"), str) or isinstance(value.get("url"), str)):
        return
    raise InvalidInput(f"{where} must be an upload id, an http(s) URL, or {{uploadId}} / {{url}}", code="invalid_input")


def input_sources(task_type: str, input: Any) -> list[Any]:
    """The image sources a task reads: one for the image types, one or more for video."""
    if task_type == "video_generation" and isinstance(input, dict) and "images" in input:
        images = input["images"]
        if not isinstance(images, list) or not 1 <= len(images) <= MAX_VIDEO_IMAGES:
            raise InvalidInput(f"input.images must be a list of 1 to {MAX_VIDEO_IMAGES} sources", code="invalid_input")
        return images
    if task_type == "video_generation" and isinstance(input, list):
        if not 1 <= len(input) <= MAX_VIDEO_IMAGES:
            raise InvalidInput(f"input must hold 1 to {MAX_VIDEO_IMAGES} sources", code="invalid_input")
        return input
    return [input]


def validate_task_request(task_type: str, input: Any, params: dict[str, Any]) -> None:
    if input is None:
        raise InvalidInput("input is required", code="invalid_input")
    for index, source in enumerate(input_sources(task_type, input)):
        _check_source(source, "input" if not isinstance(input, (list, dict)) or task_type != "video_generation"
                      else f"input[{index}]")
