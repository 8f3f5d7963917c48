"""What a task request may contain, checked before it is admitted (400 on the first problem).

Pure validation: no processing, no I/O. The API calls `validate_task_request` before a task
is admitted; the processors call `normalize_params` on the stored params to get the same
reading with every default filled in, so the vocabulary below is defined once.

Params keys are camelCase like the rest of the HTTP contract; the snake_case spelling of a
multi-word key (`transition_duration`) is accepted too. Unknown top-level keys are ignored
(clients may send extra keys, and newer keys must not break older workers); unknown options
inside an edit operation are refused, because a mistyped option would silently do nothing.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import InvalidInput
from .plans import VIDEO_DEFAULT_SECONDS, VIDEO_MAX_SECONDS

MAX_VIDEO_IMAGES = 20

# advanced_editing
MAX_EDIT_OPERATIONS = 50
MAX_EDIT_DIMENSION = 10_000
MAX_CROP_COORDINATE = 100_000
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
VIDEO_TRANSITIONS = ("none", "crossfade", "fade")
VIDEO_FITS = ("cover", "contain")
CAPTION_POSITIONS = ("top", "center", "bottom")
VIDEO_MAX_LONG_SIDE = 1920
VIDEO_MAX_SHORT_SIDE = 1080
VIDEO_MIN_SIDE = 32
VIDEO_MAX_TRANSITION_SECONDS = 5.0

# image_analysis
MAX_PALETTE_SIZE = 16

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


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_params")


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
    if isinstance(value, list) and len(value) in (3, 4) and all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value
    ):
        return (value[0], value[1], value[2], value[3] if len(value) == 4 else 255)
    return None


class _Reader:
    """Reads the options of one object (the params, or one edit operation) with messages that
    say where the problem is: "params.fps ..." or "operations[2] (rotate): degrees ..."."""

    def __init__(self, data: dict[str, Any], where: str, *, aliases: dict[str, str] | None = None):
        self.data = data
        self.where = where
        self.aliases = aliases or {}
        self.read: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.where}{key}"

    def has(self, key: str) -> bool:
        return self._key(key) is not None

    def _key(self, key: str) -> str | None:
        for candidate in (key, self.aliases.get(key)):
            if candidate is not None and candidate in self.data and self.data[candidate] is not None:
                return candidate
        return None

    def raw(self, key: str) -> Any:
        self.read.add(key)
        if key in self.aliases:
            self.read.add(self.aliases[key])
        found = self._key(key)
        return None if found is None else self.data[found]

    def number(self, key: str, lo: float, hi: float, default: float | None = None, *, required: bool = False,
               integer: bool = False, lo_open: bool = False) -> Any:
        value = self.raw(key)
        if value is None:
            if required:
                raise _invalid(f"{self.name(key)} is required")
            return default
        kind = "an integer" if integer else "a number"
        bounds = f"greater than {lo:g} and at most {hi:g}" if lo_open else f"from {lo:g} to {hi:g}"
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            raise _invalid(f"{self.name(key)} must be {kind} {bounds}")
        if value > hi or value < lo or (lo_open and value == lo):
            raise _invalid(f"{self.name(key)} must be {kind} {bounds}, not {value:g}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _invalid(f"{self.name(key)} must be true or false")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None, *,
               aliases: dict[str, str] | None = None) -> str | None:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, str):
            value = (aliases or {}).get(value.lower(), value.lower())
            if value in choices:
                return value
        raise _invalid(f"{self.name(key)} must be one of {', '.join(choices)}")

    def text(self, key: str, max_chars: int, *, required: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                raise _invalid(f"{self.name(key)} is required")
            return None
        if not isinstance(value, str):
            raise _invalid(f"{self.name(key)} must be a string")
        value = value.strip()
        if required and not value:
            raise _invalid(f"{self.name(key)} must not be empty")
        if len(value) > max_chars:
            raise _invalid(f"{self.name(key)} must be at most {max_chars} characters")
        return value or None

    def color(self, key: str, default: str | None) -> Color | None:
        value = self.raw(key)
        if value is None:
            return None if default is None else parse_color(default)
        color = parse_color(value)
        if color is None:
            raise _invalid(f"{self.name(key)} must be a colour: \"#rrggbb\", \"#rrggbbaa\", a name "
                           f"({', '.join(_NAMED_COLORS)}) or [r, g, b(, a)]")
        return color

    def refuse_unknown(self, allowed: tuple[str, ...]) -> None:
        known = set(allowed) | {self.aliases[k] for k in allowed if k in self.aliases}
        for key in self.data:
            if key not in known:
                listed = ", ".join(allowed) if allowed else "none"
                raise _invalid(f"{self.where}unknown option {key!r} (allowed: {listed})")


# --- advanced_editing ------------------------------------------------------------------------
# Each operation reader returns the operation's normalized options. The processor
# (worker/processors/editing.py) applies them in order; README lists the same vocabulary.

def _op_resize(r: _Reader) -> dict[str, Any]:
    width = r.number("width", 1, MAX_EDIT_DIMENSION, integer=True)
    height = r.number("height", 1, MAX_EDIT_DIMENSION, integer=True)
    if width is None and height is None:
        raise _invalid(f"{r.where}width or height is required")
    return {"width": width, "height": height, "fit": r.choice("fit", RESIZE_FITS, "inside"),
            "background": r.color("background", "#000000")}


def _op_crop(r: _Reader) -> dict[str, Any]:
    if r.has("box"):
        if any(r.has(k) for k in ("left", "top", "width", "height")):
            raise _invalid(f"{r.where}give either box or left/top/width/height, not both")
        box = r.raw("box")
        if not (isinstance(box, list) and len(box) == 4
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in box)):
            raise _invalid(f"{r.name('box')} must be [left, top, right, bottom] in whole pixels")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise _invalid(f"{r.name('box')} must have right > left and bottom > top")
        return {"box": tuple(box)}
    left = r.number("left", 0, MAX_CROP_COORDINATE, 0, integer=True)
    top = r.number("top", 0, MAX_CROP_COORDINATE, 0, integer=True)
    width = r.number("width", 1, MAX_CROP_COORDINATE, required=True, integer=True)
    height = r.number("height", 1, MAX_CROP_COORDINATE, required=True, integer=True)
    return {"box": (left, top, left + width, top + height)}


def _op_rotate(r: _Reader) -> dict[str, Any]:
    return {"degrees": r.number("degrees", -360, 360, required=True), "expand": r.boolean("expand", True),
            "fill": r.color("fill", None)}


def _op_flip(r: _Reader) -> dict[str, Any]:
    return {"direction": r.choice("direction", FLIP_DIRECTIONS, "horizontal")}


def _op_factor(r: _Reader) -> dict[str, Any]:
    return {"factor": r.number("factor", 0, 10, required=True)}


def _op_sharpen(r: _Reader) -> dict[str, Any]:
    return {"radius": r.number("radius", 0.1, 50, 2.0), "amount": r.number("amount", 1, 1000, 150, integer=True),
            "threshold": r.number("threshold", 0, 255, 3, integer=True)}


def _op_blur(r: _Reader) -> dict[str, Any]:
    return {"radius": r.number("radius", 0, 100, 2.0, lo_open=True)}


def _op_auto_contrast(r: _Reader) -> dict[str, Any]:
    return {"cutoff": r.number("cutoff", 0, 49, 0)}


def _op_watermark(r: _Reader) -> dict[str, Any]:
    return {"text": r.text("text", MAX_TEXT_CHARS, required=True),
            "position": r.choice("position", POSITIONS, "bottom-right"),
            "opacity": r.number("opacity", 0, 1, 0.5),
            "size": r.number("size", 0.01, 0.5, 0.05),
            "color": r.color("color", "#ffffff"),
            "margin": r.number("margin", 0, 0.25, 0.02)}


def _op_plain(r: _Reader) -> dict[str, Any]:
    return {}


# name -> (allowed option keys, reader)
EDIT_OPERATIONS: dict[str, tuple[tuple[str, ...], Any]] = {
    "resize": (("width", "height", "fit", "background"), _op_resize),
    "crop": (("left", "top", "width", "height", "box"), _op_crop),
    "rotate": (("degrees", "expand", "fill"), _op_rotate),
    "flip": (("direction",), _op_flip),
    "auto_orient": ((), _op_plain),
    "grayscale": ((), _op_plain),
    "brightness": (("factor",), _op_factor),
    "contrast": (("factor",), _op_factor),
    "saturation": (("factor",), _op_factor),
    "sharpen": (("radius", "amount", "threshold"), _op_sharpen),
    "blur": (("radius",), _op_blur),
    "auto_contrast": (("cutoff",), _op_auto_contrast),
    "watermark": (("text", "position", "opacity", "size", "color", "margin"), _op_watermark),
}
_OP_NAME_ALIASES = {"autoorient": "auto_orient", "autocontrast": "auto_contrast", "greyscale": "grayscale"}


def _edit_operation(index: int, item: Any) -> dict[str, Any]:
    if isinstance(item, str):
        item = {"op": item}
    if not isinstance(item, dict):
        raise _invalid(f"operations[{index}] must be an object like {{\"op\": \"resize\", ...}} or an operation name")
    raw_name = item.get("op", item.get("type"))
    if not isinstance(raw_name, str):
        raise _invalid(f"operations[{index}]: op is required (one of {', '.join(EDIT_OPERATIONS)})")
    name = raw_name.strip().lower().replace("-", "_")
    name = _OP_NAME_ALIASES.get(name.replace("_", ""), name)
    if name not in EDIT_OPERATIONS:
        raise _invalid(f"operations[{index}] ({raw_name}): unknown operation (one of {', '.join(EDIT_OPERATIONS)})")
    allowed, read = EDIT_OPERATIONS[name]
    options = {k: v for k, v in item.items() if k not in ("op", "type")}
    reader = _Reader(options, f"operations[{index}] ({name}): ")
    reader.refuse_unknown(allowed)
    return {"op": name, **read(reader)}


def normalize_edit_params(params: dict[str, Any]) -> dict[str, Any]:
    r = _Reader(params, "params.", aliases={"autoOrient": "auto_orient"})
    # No operations is a plain re-encode: upright, metadata stripped, in the chosen format.
    operations = r.raw("operations")
    if operations is None:
        operations = []
    if not isinstance(operations, list) or len(operations) > MAX_EDIT_OPERATIONS:
        raise _invalid(f"params.operations must be a list of at most {MAX_EDIT_OPERATIONS} operations")
    return {
        "operations": [_edit_operation(i, item) for i, item in enumerate(operations)],
        "format": r.choice("format", OUTPUT_FORMATS, None, aliases=FORMAT_ALIASES),
        "quality": r.number("quality", 1, 100, 85, integer=True),
        "background": r.color("background", "#ffffff"),
        "autoOrient": r.boolean("autoOrient", True),
    }


# --- video_generation ------------------------------------------------------------------------

_MOTION_ALIASES = {"zoom-in": "zoom_in", "zoom-out": "zoom_out", "pan-left": "pan_left", "pan-right": "pan_right",
                   "kenburns": "ken_burns", "ken-burns": "ken_burns"}


def normalize_video_params(params: dict[str, Any]) -> dict[str, Any]:
    r = _Reader(params, "params.", aliases={"transitionDuration": "transition_duration",
                                              "captionPosition": "caption_position", "captionSize": "caption_size"})
    duration = r.number("duration", 0, VIDEO_MAX_SECONDS, VIDEO_DEFAULT_SECONDS, lo_open=True)
    fps = r.number("fps", 1, 60, 25, integer=True)
    if r.has("width") != r.has("height"):
        raise _invalid("params.width and params.height must be given together")
    width = r.number("width", VIDEO_MIN_SIDE, VIDEO_MAX_LONG_SIDE, 1280, integer=True)
    height = r.number("height", VIDEO_MIN_SIDE, VIDEO_MAX_LONG_SIDE, 720, integer=True)
    if width % 2 or height % 2:
        raise _invalid("params.width and params.height must be even numbers (H.264 with 4:2:0 chroma)")
    if min(width, height) > VIDEO_MAX_SHORT_SIDE:
        raise _invalid(f"params.width x params.height must fit {VIDEO_MAX_LONG_SIDE}x{VIDEO_MAX_SHORT_SIDE} "
                       f"(or {VIDEO_MAX_SHORT_SIDE}x{VIDEO_MAX_LONG_SIDE})")
    return {
        "duration": float(duration),
        "fps": fps,
        "width": width,
        "height": height,
        "motion": r.choice("motion", VIDEO_MOTIONS, "ken_burns", aliases=_MOTION_ALIASES),
        "transition": r.choice("transition", VIDEO_TRANSITIONS, "crossfade"),
        "transitionDuration": float(r.number("transitionDuration", 0, VIDEO_MAX_TRANSITION_SECONDS, 0.5)),
        "caption": r.text("caption", MAX_TEXT_CHARS),
        "captionPosition": r.choice("captionPosition", CAPTION_POSITIONS, "bottom"),
        "captionSize": float(r.number("captionSize", 0.02, 0.2, 0.06)),
        "fit": r.choice("fit", VIDEO_FITS, "cover"),
        "background": r.color("background", "#000000"),
    }


# --- image_analysis --------------------------------------------------------------------------

def normalize_analysis_params(params: dict[str, Any]) -> dict[str, Any]:
    r = _Reader(params, "params.", aliases={"paletteSize": "palette_size", "detectFaces": "detect_faces"})
    return {"paletteSize": r.number("paletteSize", 1, MAX_PALETTE_SIZE, 5, integer=True),
            "detectFaces": r.boolean("detectFaces", True)}


_NORMALIZERS = {
    "image_analysis": normalize_analysis_params,
    "advanced_editing": normalize_edit_params,
    "video_generation": normalize_video_params,
}


def normalize_params(task_type: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The params of a task of this type with defaults filled in; InvalidInput on the first problem."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _invalid("params must be an object")
    normalize = _NORMALIZERS.get(task_type)
    return normalize(params) if normalize else dict(params)


# --- inputs ----------------------------------------------------------------------------------

def source_ref(source: Any, where: str = "input") -> tuple[str, str]:
    """Read one input source as ("upload", id) or ("url", http(s) URL); InvalidInput otherwise.

    The one reading of a source shared by admission, the ownership check and the worker.
    """
    if isinstance(source, dict) and isinstance(source.get("uploadId"), str):
        kind, ref = "upload", source["uploadId"].strip()
    elif isinstance(source, dict) and isinstance(source.get("url"), str):
        kind, ref = "url", source["url"].strip()
    elif isinstance(source, str):
        ref = source.strip()
        kind = "url" if "://" in ref else "upload"
    else:
        raise InvalidInput(f"{where} must be an upload id, an http(s) URL, or {{uploadId}} / {{url}}",
                           code="invalid_input")
    if not ref or len(ref) > 2048:
        raise InvalidInput(f"{where} must be an upload id or an http(s) URL", code="invalid_input")
    if kind == "url" and not ref.lower().startswith(("http://", "https://")):
        raise InvalidInput(f"{where} must be an upload id or an http(s) URL", code="invalid_input")
    return kind, ref


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
        source_ref(source, "input" if not isinstance(input, (list, dict)) or task_type != "video_generation"
                      else f"input[{index}]")
    normalize_params(task_type, params)


def check_storable(value: Any, what: str = "body", *, code: str = "invalid_input") -> None:
    """Refuse what PostgreSQL's JSON and text columns cannot hold: NUL characters, lone
    surrogates, NaN and infinities (Python's json accepts all of them)."""
    stack = [value]
    while stack:  # iterative: a deeply nested body must not overflow the stack
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise InvalidInput(f"The {what} holds a NUL character", code=code)
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInput(f"The {what} holds an invalid Unicode character", code=code) from None
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidInput(f"The {what} holds NaN or an infinity", code=code)
        elif not (item is None or isinstance(item, (bool, int, float))):
            raise InvalidInput(f"The {what} holds a value that is not JSON", code=code)
