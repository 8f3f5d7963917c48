"""What a task's `input` may be: one image source, or for video_generation several.

A source is an upload id, an http(s) URL, `{"uploadId": id}` or `{"url": url}`. `source_ref`
is the one reading of a source, shared by admission, the ownership check and the worker; it
raises plain ValueError (this package imports nothing of `models`), which the API turns into
a 400 `invalid_input`.

`TaskSource` and `TaskInput` describe the same thing as pydantic types for the OpenAPI
document; the reading itself is `source_ref` / `input_sources`.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_VIDEO_IMAGES = 20
MAX_SOURCE_CHARS = 2048


def source_ref(source: Any, where: str = "input") -> tuple[str, str]:
    """Read one input source as ("upload", id) or ("url", http(s) URL); ValueError otherwise."""
    if isinstance(source, dict) and len(source) != 1:
        # Nothing but the one key is read, so nothing else is kept either.
        raise ValueError(f"{where} must be {{uploadId}} or {{url}} with no other keys")
    if isinstance(source, dict) and isinstance(source.get("uploadId"), str):
        kind, ref = "upload", source["uploadId"].strip()
    elif isinstance(source, dict) and isinstance(source.get("url"), str):
        kind, ref = "url", source["url"].strip()
    elif isinstance(source, str):
        ref = source.strip()
        kind = "url" if "://" in ref else "upload"
    else:
        raise ValueError(f"{where} must be an upload id, an http(s) URL, or {{uploadId}} / {{url}}")
    if not ref or len(ref) > MAX_SOURCE_CHARS:
        raise ValueError(f"{where} must be an upload id or an http(s) URL")
    if kind == "url" and not ref.lower().startswith(("http://", "https://")):
        raise ValueError(f"{where} must be an upload id or an http(s) URL")
    return kind, ref


def input_sources(task_type: str, input: Any) -> list[Any]:
    """The image sources a task reads: one for the image types, one or more for video.

    The sources themselves are not checked here (see `source_ref`)."""
    if task_type == "video_generation" and isinstance(input, dict) and "images" in input:
        if len(input) != 1:
            raise ValueError("input must be {images: [...]} with no other keys")
        images = input["images"]
        if not isinstance(images, list) or not 1 <= len(images) <= MAX_VIDEO_IMAGES:
            raise ValueError(f"input.images must be a list of 1 to {MAX_VIDEO_IMAGES} sources")
        return images
    if task_type == "video_generation" and isinstance(input, list):
        if not 1 <= len(input) <= MAX_VIDEO_IMAGES:
            raise ValueError(f"input must hold 1 to {MAX_VIDEO_IMAGES} sources")
        return input
    return [input]


# --- for the OpenAPI document ------------------------------------------------------------------

_NOT_BLANK = r"\S"
_HTTP_URL = r"^\s*[Hh][Tt][Tt][Pp][Ss]?://"
# An http(s) URL, or an id without a colon (what the service's upload ids look like).
_ID_OR_HTTP_URL = r"^\s*([Hh][Tt][Tt][Pp][Ss]?://.*|[^:\s][^:]*)$"


class UploadSource(BaseModel):
    """An upload of the caller's, by id."""

    model_config = ConfigDict(title="UploadSource")

    uploadId: str = Field(title="Upload id", min_length=1, max_length=MAX_SOURCE_CHARS, pattern=_NOT_BLANK,
                          description="The id POST /api/uploads returned.")


class UrlSource(BaseModel):
    """An image the worker downloads."""

    model_config = ConfigDict(title="UrlSource")

    url: str = Field(title="URL", min_length=1, max_length=MAX_SOURCE_CHARS, pattern=_HTTP_URL,
                     description="An http(s) URL.")


TaskSource = Annotated[
    Union[
        Annotated[str, Field(min_length=1, max_length=MAX_SOURCE_CHARS, pattern=_ID_OR_HTTP_URL,
                             description="An upload id, or an http(s) URL (a string containing \"://\").")],
        UploadSource,
        UrlSource,
    ],
    Field(description="One image: an upload id, an http(s) URL, {\"uploadId\": id} or {\"url\": url}."),
]


class VideoImages(BaseModel):
    """The images of a video, in order."""

    model_config = ConfigDict(title="VideoImages")

    images: list[TaskSource] = Field(min_length=1, max_length=MAX_VIDEO_IMAGES,
                                     description=f"1 to {MAX_VIDEO_IMAGES} images, in order.")


TaskInput = Annotated[
    Union[
        TaskSource,
        Annotated[list[TaskSource], Field(min_length=1, max_length=MAX_VIDEO_IMAGES,
                                          description=f"video_generation: 1 to {MAX_VIDEO_IMAGES} images, "
                                                      f"in order.")],
        VideoImages,
    ],
    Field(description="The image a task reads; video_generation also takes a list of 1 to "
                      f"{MAX_VIDEO_IMAGES} images, or {{\"images\": [...]}}."),
]


__all__ = [
    "MAX_SOURCE_CHARS", "MAX_VIDEO_IMAGES", "TaskInput", "TaskSource", "UploadSource", "UrlSource", "VideoImages",
    "input_sources", "source_ref",
]
