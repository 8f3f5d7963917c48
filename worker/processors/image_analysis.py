"""image_analysis: what is in an image, computed offline with Pillow, NumPy and OpenCV.

Reported (all keys camelCase, as the API's JSON):

- format, width/height (stored pixels), mode, frames, hasAlpha, fileSize
- exif: camera make/model, lens, capture time (ISO 8601), GPS latitude/longitude in decimal
  degrees (+ altitude), orientation, exposure settings; null when the file has none
- colors: the dominant colours (median-cut palette of `paletteSize` colours on a thumbnail),
  each with its share of the image's opaque pixels, largest first
- tone: brightness (mean luma 0..1), contrast (RMS: luma standard deviation 0..1), the 5th
  and 95th luma percentiles, clipped shadows/highlights, and a label dark | normal | bright
- sharpness: variance of the Laplacian of the grey working copy; below 100 is "blurry"
- hashes: 64-bit perceptual hashes, pHash (DCT) and dHash (gradient), as 16 hex digits
- faces: OpenCV's frontal-face Haar cascade; boxes in the upright (EXIF-oriented) image's pixels
- classification: photo | screenshot | graphic, with the signals it was decided from
  (see `classify`)

Statistics are computed on a working copy whose long side is at most WORKING_SIZE, so
scores are comparable between a phone photo and its thumbnail and a 50 MP file costs about
as much as a 2 MP one (JPEG decodes at 1/2, 1/4 or 1/8 scale straight from the DCT).
"""

from __future__ import annotations

import datetime as dt
import math
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, TiffImagePlugin

from .base import InputFile, ProcessContext
from .imaging import (
    flatten,
    max_image_pixels,
    open_image,
    orientation,
    oriented,
    read_params,
    stored_mode,
    stored_size,
    to_working_mode,
)

WORKING_SIZE = 1024
PALETTE_THUMBNAIL = 128
HASH_SIZE = 8
BLUR_THRESHOLD = 100.0
FACE_CASCADE = "haarcascade_frontalface_default.xml"
# Faces are searched at this long side: a face under ~1/25 of the frame is rarely the
# subject, and the cascade's cost grows with the pixel count.
FACE_SEARCH_SIZE = 640

# Common screen sizes (either orientation) for the screenshot signal: desktop and laptop
# panels, and phone/tablet screens at their native resolutions.
SCREEN_SIZES = {
    (1280, 720), (1280, 800), (1280, 1024), (1366, 768), (1440, 900), (1536, 864), (1600, 900), (1680, 1050),
    (1920, 1080), (1920, 1200), (2048, 1536), (2560, 1440), (2560, 1600), (2880, 1800), (3024, 1964),
    (3456, 2234), (3840, 2160), (1024, 768), (2732, 2048), (2388, 1668), (2360, 1640),
    (750, 1334), (828, 1792), (1080, 1920), (1080, 2340), (1080, 2400), (1125, 2436), (1170, 2532),
    (1179, 2556), (1242, 2688), (1284, 2778), (1290, 2796), (1440, 3200), (1440, 3120),
}


def analyse_image(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    options = read_params("image_analysis", params)
    source = inputs[0]
    with open_image(source.path, max_image_pixels(ctx), draft=(WORKING_SIZE, WORKING_SIZE)) as image:
        width, height = stored_size(image)
        result: dict[str, Any] = {
            "format": image.format,
            "width": width,
            "height": height,
            "megapixels": round(width * height / 1e6, 2),
            "mode": stored_mode(image),
            "frames": int(getattr(image, "n_frames", 1)),
            "hasAlpha": image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info,
            "fileSize": Path(source.path).stat().st_size,
        }
        result["exif"] = read_exif(image)
        ctx.progress(10)
        ctx.check_cancelled()
        working = _working_copy(image)

    rgb, alpha = _split_alpha(working)
    gray = np.asarray(rgb.convert("L"), dtype=np.uint8)

    result["colors"] = {"dominant": dominant_colors(rgb, alpha, options["paletteSize"])}
    ctx.progress(30)
    ctx.check_cancelled()

    result["tone"] = tone(gray)
    result["sharpness"] = sharpness(gray)
    ctx.progress(45)
    ctx.check_cancelled()

    result["hashes"] = {"phash": phash(gray), "dhash": dhash(gray)}
    ctx.progress(55)
    ctx.check_cancelled()

    # The working copy is upright and scaled down; boxes are given in the upright full-size image.
    result["faces"] = detect_faces(gray, scale=max(width, height) / max(gray.shape)) if options["detectFaces"] else None
    ctx.progress(85)
    ctx.check_cancelled()

    result["classification"] = classify(rgb, gray, result, alpha)
    ctx.progress(100)
    return {"analysis": result}


def _working_copy(image: Image.Image) -> Image.Image:
    """Upright, RGB or RGBA, long side at most WORKING_SIZE; independent of the open file."""
    working = to_working_mode(oriented(image))
    working = working.convert("RGBA" if working.mode in ("RGBA", "LA") else "RGB")
    if working is image:
        working = image.copy()
    if max(working.size) > WORKING_SIZE:
        working.thumbnail((WORKING_SIZE, WORKING_SIZE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return working


def _split_alpha(image: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """The colours over white (what a viewer shows) and the alpha channel, if any."""
    if image.mode == "RGBA":
        return flatten(image, (255, 255, 255, 255)), np.asarray(image.getchannel("A"))
    return image, None


# --- EXIF ------------------------------------------------------------------------------------

_EXIF_TAGS = {
    "exposureTime": 0x829A, "fNumber": 0x829D, "iso": 0x8827, "focalLength": 0x920A,
    "focalLength35mm": 0xA405, "flash": 0x9209,
}


def _clean(value: Any) -> Any:
    """JSON-able EXIF values: rationals to floats (NaN for x/0 becomes None), bytes dropped."""
    if isinstance(value, TiffImagePlugin.IFDRational):
        number = float(value) if value.denominator else math.nan
        return None if not math.isfinite(number) else round(number, 6)
    if isinstance(value, bytes):
        return None
    if isinstance(value, str):
        text = value.replace("\x00", "").strip()
        return text[:200] or None
    if isinstance(value, tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return value
    return None


def _capture_time(raw: Any, offset: Any) -> str | None:
    if not isinstance(raw, str):
        return None
    try:
        moment = dt.datetime.strptime(raw.replace("\x00", "").strip()[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    text = moment.isoformat()
    if isinstance(offset, str) and len(offset.strip("\x00 ")) == 6 and offset[0] in "+-":
        text += offset.strip("\x00 ")
    return text


def _gps_decimal(dms: Any, ref: Any) -> float | None:
    try:
        degrees, minutes, seconds = (float(v) for v in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = degrees + minutes / 60 + seconds / 3600
    if not math.isfinite(value):
        return None
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "ignore")
    if isinstance(ref, str) and ref.strip("\x00 ").upper() in ("S", "W"):
        value = -value
    return round(value, 7)


def read_exif(image: Image.Image) -> dict[str, Any] | None:
    try:
        exif = image.getexif()
        if not exif:
            return None
        sub = exif.get_ifd(ExifTags.IFD.Exif)
        gps_ifd = exif.get_ifd(ExifTags.IFD.GPSInfo)
    except Exception:  # noqa: BLE001 — malformed EXIF is common and never fatal
        return None
    result: dict[str, Any] = {
        "make": _clean(exif.get(0x010F)),
        "model": _clean(exif.get(0x0110)),
        "lensMake": _clean(sub.get(0xA433)),
        "lens": _clean(sub.get(0xA434)),
        "software": _clean(exif.get(0x0131)),
        "capturedAt": _capture_time(sub.get(0x9003) or exif.get(0x0132), sub.get(0x9011)),
        "orientation": orientation(image),
    }
    for name, tag in _EXIF_TAGS.items():
        result[name] = _clean(sub.get(tag))
    gps = None
    if gps_ifd:
        latitude = _gps_decimal(gps_ifd.get(2), gps_ifd.get(1))
        longitude = _gps_decimal(gps_ifd.get(4), gps_ifd.get(3))
        if latitude is not None and longitude is not None and abs(latitude) <= 90 and abs(longitude) <= 180:
            gps = {"latitude": latitude, "longitude": longitude}
            altitude = _clean(gps_ifd.get(6))
            if isinstance(altitude, float):
                gps["altitude"] = -altitude if gps_ifd.get(5) in (1, b"\x01") else altitude
    result["gps"] = gps
    return result


# --- colours and tone ------------------------------------------------------------------------

def dominant_colors(rgb: Image.Image, alpha: np.ndarray | None, count: int) -> list[dict[str, Any]]:
    """Median-cut palette of a thumbnail; transparent pixels (alpha < 128) do not count."""
    thumb = rgb.copy()
    thumb.thumbnail((PALETTE_THUMBNAIL, PALETTE_THUMBNAIL), Image.Resampling.BILINEAR)
    pixels = np.asarray(thumb).reshape(-1, 3)
    if alpha is not None:
        small_alpha = Image.fromarray(alpha).resize(thumb.size, Image.Resampling.BILINEAR)
        pixels = pixels[np.asarray(small_alpha).reshape(-1) >= 128]
    if len(pixels) == 0:
        return []
    strip = Image.fromarray(np.ascontiguousarray(pixels.reshape(1, -1, 3)), "RGB")
    quantized = strip.quantize(colors=count, method=Image.Quantize.MEDIANCUT)
    palette = quantized.getpalette() or []
    counts = np.bincount(np.asarray(quantized).reshape(-1), minlength=count)
    total = counts.sum()
    colours = []
    for index in np.argsort(-counts):
        if counts[index] == 0:
            continue
        r, g, b = palette[3 * index:3 * index + 3]
        colours.append({"hex": f"#{r:02x}{g:02x}{b:02x}", "rgb": [r, g, b],
                        "proportion": round(float(counts[index]) / float(total), 4)})
    return colours


def tone(gray: np.ndarray) -> dict[str, Any]:
    values = gray.astype(np.float32) / 255.0
    mean = float(values.mean())
    p5, p95 = (float(v) for v in np.percentile(values, [5, 95]))
    return {
        "brightness": round(mean, 4),
        "contrast": round(float(values.std()), 4),
        "p5": round(p5, 4),
        "p95": round(p95, 4),
        "clippedShadows": round(float((gray <= 4).mean()), 4),
        "clippedHighlights": round(float((gray >= 251).mean()), 4),
        "label": "dark" if mean < 0.25 else "bright" if mean > 0.75 else "normal",
    }


def sharpness(gray: np.ndarray) -> dict[str, Any]:
    import cv2

    variance = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    return {"laplacianVariance": round(variance, 2), "blurry": variance < BLUR_THRESHOLD, "threshold": BLUR_THRESHOLD}


# --- perceptual hashes -----------------------------------------------------------------------

@lru_cache(maxsize=4)
def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: D @ x is the DCT of the column vector x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    matrix[0, :] = np.sqrt(1.0 / n)
    return matrix


def _bits_to_hex(bits: np.ndarray) -> str:
    value = 0
    for bit in bits.reshape(-1):
        value = (value << 1) | int(bit)
    return f"{value:0{bits.size // 4}x}"


def phash(gray: np.ndarray) -> str:
    """pHash: 32x32 grey, 2-D DCT, the 8x8 lowest frequencies against their median."""
    size = HASH_SIZE * 4
    small = np.asarray(Image.fromarray(gray).resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _dct_matrix(size)
    low = (d @ small @ d.T)[:HASH_SIZE, :HASH_SIZE]
    return _bits_to_hex(low > np.median(low))


def dhash(gray: np.ndarray) -> str:
    """dHash: 9x8 grey, each pixel brighter than its right neighbour."""
    small = np.asarray(Image.fromarray(gray).resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS),
                       dtype=np.int16)
    return _bits_to_hex(small[:, 1:] > small[:, :-1])


def hamming_distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


# --- faces -----------------------------------------------------------------------------------

_cascade_lock = threading.Lock()


@lru_cache(maxsize=1)
def _face_cascade():
    import cv2

    candidates = []
    data = getattr(cv2, "data", None)
    if data is not None and getattr(data, "haarcascades", None):
        candidates.append(Path(data.haarcascades) / FACE_CASCADE)
    candidates.append(Path(cv2.__file__).parent / "data" / FACE_CASCADE)
    if not hasattr(cv2, "CascadeClassifier"):
        return None
    for path in candidates:
        if path.is_file():
            cascade = cv2.CascadeClassifier(str(path))
            if not cascade.empty():
                return cascade
    return None


def detect_faces(gray: np.ndarray, *, scale: float = 1.0) -> dict[str, Any]:
    """Frontal faces; boxes scaled back to the full-size upright image."""
    import cv2

    cascade = _face_cascade()
    if cascade is None:
        return {"available": False, "count": 0, "boxes": [], "detector": None}
    height, width = gray.shape
    shrink = FACE_SEARCH_SIZE / max(height, width)
    if shrink < 1:
        gray = cv2.resize(gray, (round(width * shrink), round(height * shrink)), interpolation=cv2.INTER_AREA)
        scale /= shrink
    equalized = cv2.equalizeHist(gray)
    min_side = max(20, min(gray.shape) // 24)
    with _cascade_lock:
        found = cascade.detectMultiScale(equalized, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    boxes = [
        {"x": round(x * scale), "y": round(y * scale), "width": round(w * scale), "height": round(h * scale)}
        for (x, y, w, h) in (found if len(found) else [])
    ]
    boxes.sort(key=lambda box: -box["width"] * box["height"])
    return {"available": True, "count": len(boxes), "boxes": boxes, "detector": "opencv-haar-frontalface-default"}


# --- classification --------------------------------------------------------------------------

def classify(rgb: Image.Image, gray: np.ndarray, analysis: dict[str, Any], alpha: np.ndarray | None = None
             ) -> dict[str, Any]:
    """photo | screenshot | graphic, from signals a person would use too:

    - cameraExif: a make, model or exposure time in EXIF: a camera took it.
    - topColorShare: share of pixels in the 8 most common colours (5 bits per channel).
      Light and sensor noise spread a photo over thousands of colours (a share under 0.25
      is usual); UIs and artwork are mostly a few flat fills (over 0.5).
    - flatRatio: share of pixels whose right and lower neighbours have exactly their grey
      value. Photos stay under 0.2 even when smooth; flat fills push it over 0.4.
    - textEdges: share of pixels on a step of 60+ grey levels to a neighbour: rendered text
      and UI lines (a few percent), rare in graphics with large shapes.
    - screenSize: the stored size is a common screen resolution.
    - transparent: some pixel is see-through (logos and icons are; screenshots are not).

    Decision: cameraExif -> photo. topColorShare < 0.35 and flatRatio < 0.3 -> photo.
    Otherwise, opaque with screenSize or textEdges >= 0.02 -> screenshot; else graphic.
    Calibrated on real photos, terminal and documentation screenshots, logos and diagrams;
    a diagram full of text reads as a screenshot, which is the expected confusion.
    """
    exif = analysis.get("exif") or {}
    camera = bool(exif.get("make") or exif.get("model") or exif.get("exposureTime"))

    g = gray.astype(np.int16)
    dx = np.abs(np.diff(g, axis=1))[:-1, :]
    dy = np.abs(np.diff(g, axis=0))[:, :-1]
    flat_ratio = float(((dx == 0) & (dy == 0)).mean()) if dx.size else 1.0
    text_edges = float((np.maximum(dx, dy) >= 60).mean()) if dx.size else 0.0

    quantized = (np.asarray(rgb, dtype=np.uint8) >> 3).astype(np.int32)
    codes = ((quantized[..., 0] << 10) | (quantized[..., 1] << 5) | quantized[..., 2]).reshape(-1)
    if alpha is not None:
        codes = codes[alpha.reshape(-1) >= 128]
    counts = np.bincount(codes, minlength=1 << 15) if codes.size else np.zeros(1)
    top_share = float(np.sort(counts)[-8:].sum() / max(1, codes.size))
    transparent = bool(alpha is not None and (alpha < 250).any())

    size = (analysis["width"], analysis["height"])
    screen_size = size in SCREEN_SIZES or size[::-1] in SCREEN_SIZES
    signals = {"cameraExif": camera, "topColorShare": round(top_share, 4), "flatRatio": round(flat_ratio, 4),
               "textEdges": round(text_edges, 4), "screenSize": screen_size, "transparent": transparent,
               "distinctColors": int((counts > 0).sum())}

    if camera:
        label, reason = "photo", "camera EXIF present"
    elif top_share < 0.35 and flat_ratio < 0.3:
        label, reason = "photo", "many colours, no flat fills"
    elif not transparent and (screen_size or text_edges >= 0.02):
        label, reason = "screenshot", "flat fills at a screen size" if screen_size else "flat fills with text/UI edges"
    else:
        label, reason = "graphic", "flat fills, few colours"
    return {"label": label, "reason": reason, "signals": signals}
