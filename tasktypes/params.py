"""The schema of each task type's `params`: what a task request may ask for, with its ranges
and defaults, as pydantic models (their JSON Schema is what /openapi.json shows).

Pure: no I/O, no ORM, no Celery. The API parses a request's params with `parse_params`
before the task is admitted (a 400 naming the failing field on the first problem); the
processors call `normalize_params` on the stored params to get the same reading as a plain
dict with every default filled in, so the vocabulary below is defined once.

Conventions:
- Keys are camelCase like the rest of the HTTP contract; the snake_case spelling of a
  multi-word key (`transition_duration`) is accepted too. A key whose value is null means
  "use the default".
- Unknown top-level keys are ignored (clients may send extra keys, and newer keys must not
  break older workers); unknown options inside an edit operation are refused, because a
  mistyped option would silently do nothing.
- Types are strict, as JSON has them: a number is a JSON number (not "5", not true), an
  integer is a whole number (not 10.5), NaN and infinities are refused; a boolean is true
  or false. Choices are case-insensitive and accept a few aliases (`jpg`, `zoom-in`).
- An edit operation is `{"op": name, ...options}`; a bare name ("grayscale") is accepted
  for an operation without required options, as is the legacy key `type` for `op`.
"""

from __future__ import annotations

import json
import re
from functools import cache
from types import MappingProxyType
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# video_generation: what a video may last (the price is per second, see tasktypes/__init__.py).
VIDEO_DEFAULT_SECONDS = 4
VIDEO_MAX_SECONDS = 120

# advanced_editing
MAX_EDIT_OPERATIONS = 50
MAX_EDIT_DIMENSION = 10_000
MAX_CROP_COORDINATE = 100_000
# A crop box's right/bottom may reach left + width at most, as the left/top/width/height form does.
MAX_CROP_BOX_COORDINATE = 2 * MAX_CROP_COORDINATE
OUTPUT_FORMATS = ("jpeg", "png", "webp")
FORMAT_ALIASES = {"jpg": "jpeg"}
RESIZE_FITS = ("inside", "contain", "cover", "fill")
FLIP_DIRECTIONS = ("horizontal", "vertical")
POSITIONS = (
    "top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right",
)
MAX_TEXT_CHARS = 200

# video_generation
VIDEO_MOTIONS = ("none", "zoom_in", "zoom_out", "pan_left", "pan_right", "ken_burns")
MOTION_ALIASES = {"zoom-in": "zoom_in", "zoom-out": "zoom_out", "pan-left": "pan_left", "pan-right": "pan_right",
                  "kenburns": "ken_burns", "ken-burns": "ken_burns"}
VIDEO_TRANSITIONS = ("none", "crossfade", "fade")
VIDEO_FITS = ("cover", "contain")
CAPTION_POSITIONS = ("top", "center", "bottom")
VIDEO_MAX_LONG_SIDE = 1920
VIDEO_MAX_SHORT_SIDE = 1080
VIDEO_MIN_SIDE = 32
VIDEO_MAX_TRANSITION_SECONDS = 5.0

# image_analysis
MAX_PALETTE_SIZE = 16


# --- errors ------------------------------------------------------------------------------------

def _error(kind: str, message: str, **context: Any) -> PydanticCustomError:
    """A validation error whose message reads after the field's path: "must be ...".
    (Only `{name}` for a name in `context` is a placeholder; other braces stay as they are.)"""
    return PydanticCustomError(kind, message, context or None)


def _error_at(model: str, key: str, kind: str, message: str, value: Any = None) -> ValidationError:
    """A cross-field error located at one key (`params.width`), not at the whole object.

    Raised inside a validator, pydantic merges it into the outer error with the outer path
    in front (`operations[2]` + `box`)."""
    error = _error(kind, message) if kind != "missing" else "missing"
    return ValidationError.from_exception_data(model, [InitErrorDetails(type=error, loc=(key,), input=value)])


# --- colours -----------------------------------------------------------------------------------

Color = tuple[int, int, int, int]

_NAMED_COLORS: dict[str, Color] = {
    "transparent": (0, 0, 0, 0),
    "black": (0, 0, 0, 255),
    "white": (255, 255, 255, 255),
    "gray": (128, 128, 128, 255),
    "grey": (128, 128, 128, 255),
    "red": (255, 0, 0, 255),
    "green": (0, 128, 0, 255),
    "blue": (0, 0, 255, 255),
    "yellow": (255, 255, 0, 255),
}
_HEX = re.compile(r"#?([0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})")
COLOR_HELP = (f"\"#rgb\", \"#rgba\", \"#rrggbb\", \"#rrggbbaa\", a name ({', '.join(_NAMED_COLORS)}) "
              f"or [r, g, b(, a)] with channels 0-255")


def parse_color(value: Any) -> Color | None:
    """An RGBA tuple from "#rgb", "#rgba", "#rrggbb", "#rrggbbaa", a few names, or [r, g, b(, a)]."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in _NAMED_COLORS:
            return _NAMED_COLORS[name]
        match = _HEX.fullmatch(name)
        if not match:
            return None
        digits = match.group(1)
        if len(digits) <= 4:
            digits = "".join(c * 2 for c in digits)
        channels = [int(digits[i:i + 2], 16) for i in range(0, len(digits), 2)]
        return (*channels[:3], channels[3] if len(channels) == 4 else 255)  # type: ignore[return-value]
    if isinstance(value, (list, tuple)) and len(value) in (3, 4) and all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value
    ):
        return (value[0], value[1], value[2], value[3] if len(value) == 4 else 255)
    return None


def _color(value: Any) -> Color:
    color = parse_color(value)
    if color is None:
        raise _error("colour", f"must be a colour: {COLOR_HELP}")
    return color


_COLOR_JSON_SCHEMA = {
    "oneOf": [
        {"type": "string", "description": "\"#rgb\", \"#rgba\", \"#rrggbb\", \"#rrggbbaa\" or a colour name",
         "pattern": "^(#?([0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8})|" + "|".join(_NAMED_COLORS) + ")$"},
        {"type": "array", "description": "[r, g, b] or [r, g, b, a], channels 0-255",
         "items": {"type": "integer", "minimum": 0, "maximum": 255}, "minItems": 3, "maxItems": 4},
    ],
}


def _color_out(value: Any) -> list[int]:
    # A default ("#000000") is written as what it reads as.
    return list(value if isinstance(value, tuple) else _color(value))


# Read into an RGBA tuple; written back as [r, g, b, a] (which reads the same again).
ColorValue = Annotated[
    Color,
    PlainValidator(_color),
    PlainSerializer(_color_out, return_type=list[int]),
    WithJsonSchema(_COLOR_JSON_SCHEMA),
]


# --- choices and text ------------------------------------------------------------------------

def _lower(aliases: Mapping[str, str] | None = None):
    """Choices are case-insensitive; a few aliases are read as the canonical value."""
    def read(value: Any) -> Any:
        if isinstance(value, str):
            value = value.lower()
            return (aliases or {}).get(value, value)
        return value
    return BeforeValidator(read)


def _text(max_chars: int, *, required: bool):
    """Surrounding whitespace is dropped; then at most `max_chars`. An empty optional text is none."""
    def read(value: Any) -> Any:
        if not isinstance(value, str):
            return value  # the str validator refuses it
        value = value.strip()
        if required and not value:
            raise _error("string_empty", "must not be empty")
        if len(value) > max_chars:
            raise _error("string_too_long", f"must be at most {max_chars} characters", max_length=max_chars)
        return value or None
    return BeforeValidator(read)


OutputFormat = Annotated[Literal["jpeg", "png", "webp"], _lower(FORMAT_ALIASES)]
ResizeFit = Annotated[Literal["inside", "contain", "cover", "fill"], _lower()]
FlipDirection = Annotated[Literal["horizontal", "vertical"], _lower()]
Position = Annotated[Literal["top-left", "top", "top-right", "left", "center", "right",
                             "bottom-left", "bottom", "bottom-right"], _lower()]
VideoMotion = Annotated[Literal["none", "zoom_in", "zoom_out", "pan_left", "pan_right", "ken_burns"],
                        _lower(MOTION_ALIASES)]
VideoTransition = Annotated[Literal["none", "crossfade", "fade"], _lower()]
VideoFit = Annotated[Literal["cover", "contain"], _lower()]
CaptionPosition = Annotated[Literal["top", "center", "bottom"], _lower()]

# The aliases above must not drift from the tuples the rest of the code reads.
for _choice, _values in ((OutputFormat, OUTPUT_FORMATS), (ResizeFit, RESIZE_FITS), (FlipDirection, FLIP_DIRECTIONS),
                         (Position, POSITIONS), (VideoMotion, VIDEO_MOTIONS), (VideoTransition, VIDEO_TRANSITIONS),
                         (VideoFit, VIDEO_FITS), (CaptionPosition, CAPTION_POSITIONS)):
    assert _choice.__origin__.__args__ == _values, _values  # type: ignore[attr-defined]


def _camel(name: str, snake: str, **kwargs: Any) -> Any:
    """A field spelled `name` (camelCase, what the schema shows) or `snake` in a request."""
    return Field(alias=name, validation_alias=AliasChoices(name, snake), title=snake.replace("_", " ").capitalize(),
                 **kwargs)


# --- the models --------------------------------------------------------------------------------

_STRICT = dict(strict=True, allow_inf_nan=False)


class TaskParams(BaseModel):
    """The params of one task type. Unknown keys are ignored; a null value means the default."""

    model_config = ConfigDict(extra="ignore", **_STRICT)

    @model_validator(mode="before")
    @classmethod
    def _an_object_without_nulls(cls, data: Any) -> Any:
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise _error("object_type", "must be an object")
        return {key: value for key, value in data.items() if value is not None}

    def normalized(self) -> dict[str, Any]:
        """The plain dict the processors read: camelCase keys, every default filled in."""
        raise NotImplementedError


# advanced_editing: one model per operation, told apart by `op`. The processor
# (worker/processors/editing.py) applies them in order.

class EditOperation(BaseModel):
    model_config = ConfigDict(extra="forbid", **_STRICT)

    op: str

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        # Only for known options: an unknown one is refused even when null.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}
        return data

    def normalized(self) -> dict[str, Any]:
        return {"op": self.op, **{name: getattr(self, name) for name in type(self).model_fields if name != "op"}}


class ResizeOp(EditOperation):
    """Scale to `width` and/or `height`; one side alone keeps the aspect ratio."""

    op: Literal["resize"]
    width: Annotated[int, Field(ge=1, le=MAX_EDIT_DIMENSION)] | None = Field(
        None, description="Target width in pixels (width or height is required).")
    height: Annotated[int, Field(ge=1, le=MAX_EDIT_DIMENSION)] | None = Field(
        None, description="Target height in pixels (width or height is required).")
    fit: ResizeFit = Field("inside", description="With both sides: inside (fit within, keep ratio), contain "
                                                 "(fit within, pad to exactly width x height), cover (fill and "
                                                 "crop), fill (stretch).")
    background: ColorValue = Field("#000000", validate_default=True,
                                   description="The padding colour for fit=contain.")

    @model_validator(mode="after")
    def _one_side_at_least(self) -> ResizeOp:
        if self.width is None and self.height is None:
            raise _error_at("ResizeOp", "width", "size_required", "width or height is required")
        return self


CropBox = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_CROP_BOX_COORDINATE)]],
    Field(min_length=4, max_length=4),
]


def _crop_box(value: Any) -> Any:
    if not (isinstance(value, list) and len(value) == 4
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CROP_BOX_COORDINATE
                    for v in value)):
        raise _error("crop_box", f"must be [left, top, right, bottom] in whole pixels "
                                 f"(0 to {MAX_CROP_BOX_COORDINATE})")
    return value


class CropOp(EditOperation):
    """Keep a rectangle: `box` [left, top, right, bottom], or `left`/`top`/`width`/`height`."""

    op: Literal["crop"]
    box: Annotated[CropBox, BeforeValidator(_crop_box)] | None = Field(
        None, description="[left, top, right, bottom] in pixels, right > left and bottom > top "
                          "(instead of left/top/width/height).")
    # None (not 0) when absent, so that a dump of a box crop (left: null, ...) reads the same again.
    left: Annotated[int, Field(ge=0, le=MAX_CROP_COORDINATE)] | None = Field(
        None, description="Left edge in pixels (without box).", json_schema_extra={"default": 0})
    top: Annotated[int, Field(ge=0, le=MAX_CROP_COORDINATE)] | None = Field(
        None, description="Top edge in pixels (without box).", json_schema_extra={"default": 0})
    width: Annotated[int, Field(ge=1, le=MAX_CROP_COORDINATE)] | None = Field(
        None, description="Width in pixels (required without box).")
    height: Annotated[int, Field(ge=1, le=MAX_CROP_COORDINATE)] | None = Field(
        None, description="Height in pixels (required without box).")

    @model_validator(mode="after")
    def _box_or_sides(self) -> CropOp:
        if self.box is not None:
            if any(side is not None for side in (self.left, self.top, self.width, self.height)):
                raise _error_at("CropOp", "box", "crop_both", "give either box or left/top/width/height, not both",
                                self.box)
            left, top, right, bottom = self.box
            if right <= left or bottom <= top:
                raise _error_at("CropOp", "box", "crop_box", "must have right > left and bottom > top", self.box)
            return self
        for side in ("width", "height"):
            if getattr(self, side) is None:
                raise _error_at("CropOp", side, "missing", "is required")
        return self

    def normalized(self) -> dict[str, Any]:
        if self.box is not None:
            return {"op": "crop", "box": tuple(self.box)}
        assert self.width is not None and self.height is not None
        left, top = self.left or 0, self.top or 0
        return {"op": "crop", "box": (left, top, left + self.width, top + self.height)}


class RotateOp(EditOperation):
    """Rotate clockwise; a multiple of 90 with expand is lossless."""

    op: Literal["rotate"]
    degrees: float = Field(ge=-360, le=360, description="Clockwise, in degrees.")
    expand: bool = Field(True, description="Grow the canvas to hold the whole rotated image.")
    fill: ColorValue | None = Field(None, description="The colour of uncovered corners (default: transparent "
                                                      "when the image has alpha, black otherwise).")


class FlipOp(EditOperation):
    """Mirror the image."""

    op: Literal["flip"]
    direction: FlipDirection = Field("horizontal", description="horizontal (left-right) or vertical (top-bottom).")


class AutoOrientOp(EditOperation):
    """Turn the image upright from its EXIF orientation."""

    op: Literal["auto_orient"]


class GrayscaleOp(EditOperation):
    """Convert to greyscale (alpha is kept)."""

    op: Literal["grayscale"]


_FACTOR_HELP = "0 gives {zero}, 1 keeps the image, above 1 {more}."


class BrightnessOp(EditOperation):
    """Scale the brightness."""

    op: Literal["brightness"]
    factor: float = Field(ge=0, le=10, description=_FACTOR_HELP.format(zero="black", more="brightens"))


class ContrastOp(EditOperation):
    """Scale the contrast."""

    op: Literal["contrast"]
    factor: float = Field(ge=0, le=10, description=_FACTOR_HELP.format(zero="flat grey", more="adds contrast"))


class SaturationOp(EditOperation):
    """Scale the colour saturation."""

    op: Literal["saturation"]
    factor: float = Field(ge=0, le=10, description=_FACTOR_HELP.format(zero="greyscale", more="saturates"))


class SharpenOp(EditOperation):
    """Unsharp mask."""

    op: Literal["sharpen"]
    radius: float = Field(2.0, ge=0.1, le=50, description="Blur radius of the mask, in pixels.")
    amount: int = Field(150, ge=1, le=1000, description="Strength, in percent.")
    threshold: int = Field(3, ge=0, le=255, description="Minimum brightness change to sharpen.")


class BlurOp(EditOperation):
    """Gaussian blur."""

    op: Literal["blur"]
    radius: float = Field(2.0, gt=0, le=100, description="Radius in pixels.")


class AutoContrastOp(EditOperation):
    """Stretch the histogram to the full range."""

    op: Literal["auto_contrast"]
    cutoff: float = Field(0, ge=0, le=49, description="Percent of the darkest and lightest pixels to ignore.")


class WatermarkOp(EditOperation):
    """Draw a line of text over the image."""

    op: Literal["watermark"]
    # The constraints are what the schema shows; the before-validator enforces them first,
    # on the stripped text, with its own message.
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=r"\S"),
                    _text(MAX_TEXT_CHARS, required=True)] = Field(
        description=f"The text (at most {MAX_TEXT_CHARS} characters).")
    position: Position = Field("bottom-right", description="Where the text goes.")
    opacity: float = Field(0.5, ge=0, le=1, description="0 (invisible) to 1 (opaque).")
    size: float = Field(0.05, ge=0.01, le=0.5, description="Text height as a fraction of the image's shorter side.")
    color: ColorValue = Field("#ffffff", validate_default=True, description="The text colour.")
    margin: float = Field(0.02, ge=0, le=0.25, description="Distance from the edge, as a fraction of the shorter side.")


OPERATION_MODELS: tuple[type[EditOperation], ...] = (
    ResizeOp, CropOp, RotateOp, FlipOp, AutoOrientOp, GrayscaleOp, BrightnessOp, ContrastOp, SaturationOp,
    SharpenOp, BlurOp, AutoContrastOp, WatermarkOp,
)
# name -> the model of its options
EDIT_OPERATIONS: Mapping[str, type[EditOperation]] = MappingProxyType({
    model.model_fields["op"].annotation.__args__[0]: model for model in OPERATION_MODELS  # type: ignore[union-attr]
})
OPERATION_NAMES: tuple[str, ...] = tuple(EDIT_OPERATIONS)
OP_NAME_ALIASES = {"autoorient": "auto_orient", "autocontrast": "auto_contrast", "greyscale": "grayscale"}


def operation_name(raw: str) -> str | None:
    """The canonical name of an operation ("Auto-Orient" -> "auto_orient"); None if unknown."""
    name = raw.strip().lower().replace("-", "_")
    name = OP_NAME_ALIASES.get(name.replace("_", ""), name)
    return name if name in EDIT_OPERATIONS else None


def _read_operation(item: Any) -> Any:
    """One operation: a name or {"op"/"type": name, ...options}, read by its own model.

    Validated here rather than by the union, so an error's path is the operation's index and
    the option (`operations[2].degrees`), with no union tag between them."""
    if isinstance(item, EditOperation):
        return item
    if isinstance(item, str):
        item = {"op": item}
    if not isinstance(item, dict):
        raise _error("operation_type", 'must be an object like {"op": "resize", ...} or an operation name')
    raw_name = item.get("op", item.get("type"))
    key = "op" if "op" in item or "type" not in item else "type"
    if not isinstance(raw_name, str):
        raise _error_at("EditOperation", key, "operation_missing",
                        f"is required (one of {', '.join(OPERATION_NAMES)})", raw_name)
    name = operation_name(raw_name)
    if name is None:
        raise _error_at("EditOperation", key, "operation_unknown",
                        f"unknown operation {raw_name!r}; must be one of {', '.join(OPERATION_NAMES)}", raw_name)
    options = {k: v for k, v in item.items() if k not in ("op", "type")}
    return EDIT_OPERATIONS[name].model_validate({"op": name, **options})


def _valid_alone(name: str) -> bool:
    try:
        EDIT_OPERATIONS[name].model_validate({"op": name})
    except ValidationError:
        return False
    return True


_BARE_NAMES = tuple(name for name in EDIT_OPERATIONS if _valid_alone(name))


class _BareNamesInSchema:
    """The JSON Schema of an operation also shows the bare-name form ("grayscale")."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        schema = handler(core_schema)
        bare = {"type": "string", "enum": list(_BARE_NAMES),
                "description": "An operation without required options, by name alone."}
        return {"anyOf": [schema, bare]}


Operation = Annotated[
    Union[tuple(OPERATION_MODELS)],  # type: ignore[valid-type]
    Field(discriminator="op"),
    BeforeValidator(_read_operation),
    _BareNamesInSchema(),
]


class EditParams(TaskParams):
    """advanced_editing: an ordered list of operations, then the output encoding.

    No operations is a plain re-encode: upright, metadata stripped, in the chosen format."""

    operations: list[Operation] = Field(
        default_factory=list, max_length=MAX_EDIT_OPERATIONS,
        description=f"Applied in order (at most {MAX_EDIT_OPERATIONS}); each is {{\"op\": name, ...options}} "
                    f"or a bare name. Operation names also accept the legacy key \"type\".")
    format: OutputFormat | None = Field(
        None, description="Output format (jpg is read as jpeg); default: the input's when it is JPEG, PNG or "
                          "WebP, otherwise PNG.")
    quality: int = Field(85, ge=1, le=100, description="JPEG/WebP quality.")
    background: ColorValue = Field("#ffffff", validate_default=True,
                                   description="What transparency is flattened onto for JPEG.")
    auto_orient: bool = _camel("autoOrient", "auto_orient", default=True,
                               description="Turn photos upright from their EXIF orientation first.")

    @field_validator("operations", mode="before")
    @classmethod
    def _a_short_list(cls, value: Any) -> Any:
        if not isinstance(value, list) or len(value) > MAX_EDIT_OPERATIONS:
            raise _error("operations_list", f"must be a list of at most {MAX_EDIT_OPERATIONS} operations")
        return value

    def normalized(self) -> dict[str, Any]:
        return {
            "operations": [op.normalized() for op in self.operations],
            "format": self.format,
            "quality": self.quality,
            "background": self.background,
            "autoOrient": self.auto_orient,
        }


class VideoParams(TaskParams):
    """video_generation: an MP4 from one or more images, with motion, transitions and a caption."""

    model_config = ConfigDict(json_schema_extra={"dependentRequired": {"width": ["height"], "height": ["width"]}})

    duration: float = Field(VIDEO_DEFAULT_SECONDS, gt=0, le=VIDEO_MAX_SECONDS,
                            description="Seconds (the price is per second, rounded up).")
    fps: int = Field(25, ge=1, le=60, description="Frames per second.")
    width: int = Field(1280, ge=VIDEO_MIN_SIDE, le=VIDEO_MAX_LONG_SIDE, json_schema_extra={"multipleOf": 2},
                       description=f"Even, given with height; at most {VIDEO_MAX_LONG_SIDE}x{VIDEO_MAX_SHORT_SIDE} "
                                   f"or {VIDEO_MAX_SHORT_SIDE}x{VIDEO_MAX_LONG_SIDE}.")
    height: int = Field(720, ge=VIDEO_MIN_SIDE, le=VIDEO_MAX_LONG_SIDE, json_schema_extra={"multipleOf": 2},
                        description="Even, given with width.")
    motion: VideoMotion = Field("ken_burns", description="Camera motion over each image.")
    transition: VideoTransition = Field("crossfade", description="Between images.")
    transition_duration: float = _camel("transitionDuration", "transition_duration", default=0.5, ge=0,
                                        le=VIDEO_MAX_TRANSITION_SECONDS, description="Seconds.")
    caption: Annotated[Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None,
                       _text(MAX_TEXT_CHARS, required=False)] = Field(
        None, description=f"Text drawn over the video (at most {MAX_TEXT_CHARS} characters; blank is none).")
    caption_position: CaptionPosition = _camel("captionPosition", "caption_position", default="bottom",
                                               description="Where the caption goes.")
    caption_size: float = _camel("captionSize", "caption_size", default=0.06, ge=0.02, le=0.2,
                                 description="Caption height as a fraction of the video's height.")
    fit: VideoFit = Field("cover", description="cover (fill the frame, cropping) or contain (letterbox).")
    background: ColorValue = Field("#000000", validate_default=True, description="The letterbox colour.")

    @model_validator(mode="after")
    def _frame_size(self) -> VideoParams:
        given = self.model_fields_set
        if ("width" in given) != ("height" in given):
            missing = "height" if "width" in given else "width"
            raise _error_at("VideoParams", missing, "video_size_pair", "width and height must be given together")
        if self.width % 2 or self.height % 2:
            odd = "width" if self.width % 2 else "height"
            raise _error_at("VideoParams", odd, "video_size_even",
                            "width and height must be even numbers (H.264 with 4:2:0 chroma)", getattr(self, odd))
        if min(self.width, self.height) > VIDEO_MAX_SHORT_SIDE:
            raise _error_at("VideoParams", "width", "video_size_fit",
                            f"width x height must fit {VIDEO_MAX_LONG_SIDE}x{VIDEO_MAX_SHORT_SIDE} "
                            f"(or {VIDEO_MAX_SHORT_SIDE}x{VIDEO_MAX_LONG_SIDE})", self.width)
        return self

    def normalized(self) -> dict[str, Any]:
        return {
            "duration": float(self.duration),
            "fps": self.fps,
            "width": self.width,
            "height": self.height,
            "motion": self.motion,
            "transition": self.transition,
            "transitionDuration": float(self.transition_duration),
            "caption": self.caption,
            "captionPosition": self.caption_position,
            "captionSize": float(self.caption_size),
            "fit": self.fit,
            "background": self.background,
        }


class AnalysisParams(TaskParams):
    """image_analysis: what to compute besides the metadata."""

    palette_size: int = _camel("paletteSize", "palette_size", default=5, ge=1, le=MAX_PALETTE_SIZE,
                               description="How many dominant colours to report.")
    detect_faces: bool = _camel("detectFaces", "detect_faces", default=True, description="Look for faces.")

    def normalized(self) -> dict[str, Any]:
        return {"paletteSize": self.palette_size, "detectFaces": self.detect_faces}


def _schema_of(task_type: str) -> type[TaskParams] | None:
    # The registry (tasktypes/__init__.py, which imports this module) names each type's schema.
    from . import TASK_TYPE_SPECS

    spec = TASK_TYPE_SPECS.get(task_type)
    return spec.params if spec is not None else None


# The params of a type without a schema: any object, kept as it is.
_ANY_OBJECT = TypeAdapter(dict[str, Any], config=ConfigDict(strict=True))


def parse_params(task_type: str, raw: Any) -> TaskParams:
    """The params of a task of this type as their model; pydantic.ValidationError otherwise.

    None is no params ({}); anything but an object is refused."""
    model = _schema_of(task_type)
    if model is None:
        raise ValueError(f"no params schema for task type {task_type!r}")
    return model.model_validate({} if raw is None else raw)


# Unknown top-level keys (a newer client's, a stand-in processor's) are kept up to this size;
# what the schema knows is bounded by the schema itself.
MAX_UNKNOWN_PARAMS_BYTES = 1024


@cache
def _accepted_keys(model: type[BaseModel]) -> frozenset[str]:
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        keys.update(k for k in (name, info.alias, info.serialization_alias) if k)
        choices = getattr(info.validation_alias, "choices", None) or [info.validation_alias]
        keys.update(c for c in choices if isinstance(c, str))
    return frozenset(keys)


def stored_params(task_type: str, raw: dict[str, Any], parsed: TaskParams) -> dict[str, Any]:
    """What a task keeps of its params: what the schema read, as it reads it (camelCase),
    plus unknown top-level keys up to MAX_UNKNOWN_PARAMS_BYTES (ValueError past that)."""
    known = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    accepted = _accepted_keys(type(parsed))
    unknown = {key: value for key, value in raw.items() if key not in accepted}
    if unknown and len(json.dumps(unknown)) > MAX_UNKNOWN_PARAMS_BYTES:
        raise ValueError(f"holds more than {MAX_UNKNOWN_PARAMS_BYTES} bytes of options the "
                         f"{task_type} schema does not know ({', '.join(sorted(unknown)[:5])})")
    return {**unknown, **known}


def normalize_params(task_type: str, raw: Any) -> dict[str, Any]:
    """The params as the processors read them: a plain dict with camelCase keys and every
    default filled in, colours as RGBA tuples, a crop as its box tuple. A parsed model is
    taken as it is. pydantic.ValidationError when they are not valid; a type without a schema
    gets its params back as a dict."""
    if isinstance(raw, TaskParams):
        return raw.normalized()
    if _schema_of(task_type) is None:
        return dict(_ANY_OBJECT.validate_python({} if raw is None else raw))
    return parse_params(task_type, raw).normalized()


__all__ = [
    "AnalysisParams", "AutoContrastOp", "AutoOrientOp", "BlurOp", "BrightnessOp", "CAPTION_POSITIONS", "COLOR_HELP",
    "Color", "ColorValue", "ContrastOp", "CropOp", "EDIT_OPERATIONS", "EditOperation", "EditParams", "FLIP_DIRECTIONS",
    "FORMAT_ALIASES", "FlipOp", "GrayscaleOp", "MAX_CROP_BOX_COORDINATE", "MAX_CROP_COORDINATE",
    "MAX_EDIT_DIMENSION", "MAX_EDIT_OPERATIONS", "MAX_PALETTE_SIZE", "MAX_TEXT_CHARS", "MOTION_ALIASES",
    "OPERATION_MODELS", "OPERATION_NAMES", "OP_NAME_ALIASES", "OUTPUT_FORMATS", "Operation",
    "POSITIONS", "RESIZE_FITS", "ResizeOp", "RotateOp", "SaturationOp", "SharpenOp", "TaskParams",
    "VIDEO_DEFAULT_SECONDS", "VIDEO_FITS", "VIDEO_MAX_LONG_SIDE", "VIDEO_MAX_SECONDS", "VIDEO_MAX_SHORT_SIDE",
    "VIDEO_MAX_TRANSITION_SECONDS", "VIDEO_MIN_SIDE", "VIDEO_MOTIONS", "VIDEO_TRANSITIONS", "VideoParams",
    "WatermarkOp", "normalize_params", "operation_name", "parse_color", "parse_params",
]
