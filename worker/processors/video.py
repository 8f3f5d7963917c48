"""video_generation: an H.264 MP4 from one or more images, with motion, transitions and a caption.

Frames are drawn one at a time (an OpenCV sub-pixel warp of a pre-scaled source, blends
for transitions, the caption composited on top), converted to YUV 4:2:0 and piped raw to
ffmpeg (the binary shipped in the imageio-ffmpeg wheel), which encodes them with libx264.

Drawing and encoding overlap. A drawing thread renders the frames in order into a small
bounded queue; the task's thread takes them from it and writes them to ffmpeg's stdin
(OpenCV and the pipe write release the GIL). The encoder is most of the work and uses most
of the machine's cores, so the drawing is made to take as little CPU from it as possible:

- frames are handed over in the encoder's own pixel format: OpenCV converts RGB to 4:2:0 in
  a tenth of the time ffmpeg's scaler takes, and half the bytes cross the pipe;
- the pipe is widened to 1 MiB, so ffmpeg's reader wakes up a few times a frame, not twenty;
- OpenCV runs single-threaded meanwhile: a warp is no faster on two threads here, and the
  second thread's CPU would come out of the encoder's share.

Memory is bounded by the queue (QUEUE_FRAMES frames) and the two source images in play,
whatever the length. Progress, cancellation and errors stay on the task's thread: a cancel
is seen before the next frame is written, the drawing thread stops after the frame in hand,
and on every way out ffmpeg is killed and reaped and every thread joined. An exception in
the drawing thread is raised on the task's thread as the task's failure.

Timeline: the duration is split evenly between the images. With a crossfade, image i+1
fades in over the last `transitionDuration` seconds of image i's slot; with a fade, the
picture dips to black and back across the cut. The transition is shortened to half a slot
when the slots are short. Each image moves over the whole time it is visible:

- zoom_in / zoom_out: centred zoom between 1.0 and 1.25
- pan_left / pan_right: a horizontal pan across a 1.2x view
- ken_burns: a slow zoom (1.0 -> 1.2 or back) combined with a drift, its direction varied
  from image to image
- none: still

`fit` cover fills the frame (cropping the overflow); contain letterboxes onto `background`.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from PIL import Image, ImageDraw

from .base import Cancelled, InputFile, PermanentError, ProcessContext
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

STDERR_TAIL_CHARS = 2000
# libx264 first; the others only if a build lacks it (the output then says which was used).
ENCODER_PREFERENCE = ("libx264", "libopenh264", "mpeg4")
ZOOM = 1.25
SOURCE_SCALE = 1.12
PAN_VIEW = 1.2
KEN_BURNS_ZOOM = 1.2
# Frames drawn ahead of ffmpeg: enough to carry the encoder over the moments the drawing
# thread is off the CPU, few enough that memory does not depend on the video's length
# (4 x 1.4 MB at 720p, 4 x 3 MB at 1080p).
QUEUE_FRAMES = 4
# ffmpeg's pipe buffer: 1 MiB (Linux's ceiling for an unprivileged process) instead of the
# default 64 KiB, so a 720p frame crosses in two wakeups of ffmpeg's reader instead of
# twenty-odd; every wakeup is CPU taken from the encoder (a few percent of a video's time).
PIPE_BYTES = 1 << 20


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


@lru_cache(maxsize=1)
def video_encoder() -> str:
    listed = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True,
                            timeout=30).stdout
    names = {line.split()[1] for line in listed.splitlines() if len(line.split()) > 1 and line.startswith(" V")}
    for name in ENCODER_PREFERENCE:
        if name in names:
            return name
    raise PermanentError("The bundled ffmpeg has no H.264 or MPEG-4 encoder", code="encoder_unavailable")


def encoder_args(encoder: str) -> list[str]:
    if encoder == "libx264":
        # veryfast keeps a 1080p60 two-minute video well inside the task's time limit on two
        # cores; CRF 20 is visually clean for photos in motion.
        return ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20"]
    if encoder == "libopenh264":
        return ["-c:v", "libopenh264", "-b:v", "6M"]
    return ["-c:v", "mpeg4", "-q:v", "3"]


def ffmpeg_command(width: int, height: int, fps: int, target: Path, encoder: str,
                   pixel_format: str = "yuv420p") -> list[str]:
    """ffmpeg encoding raw frames of `pixel_format` (yuv420p: what to_yuv420p makes) from stdin."""
    return [
        ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
        "-f", "rawvideo", "-pix_fmt", pixel_format, "-s", f"{width}x{height}", "-r", str(fps), "-i", "-",
        *encoder_args(encoder), "-pix_fmt", "yuv420p", "-r", str(fps), "-movflags", "+faststart",
        "-an", str(target),
    ]


# --- sources and motion ----------------------------------------------------------------------

class _Source:
    """One input image, scaled once so that every view the motion asks for is a warp of it."""

    def __init__(self, image: Image.Image, width: int, height: int, fit: str, background):
        frame_aspect = width / height
        # Transparent areas show the background colour.
        image = flatten(to_working_mode(image), background).convert("RGB")
        if fit == "contain":
            # Letterbox onto a canvas of the frame's aspect; motion then moves the whole canvas.
            w, h = image.size
            if w / h > frame_aspect:
                canvas_size = (w, max(1, round(w / frame_aspect)))
            else:
                canvas_size = (max(1, round(h * frame_aspect)), h)
            canvas = Image.new("RGB", canvas_size, tuple(background[:3]))
            canvas.paste(image, ((canvas_size[0] - w) // 2, (canvas_size[1] - h) // 2))
            image = canvas
        # The widest view (zoom 1.0) is the biggest frame-aspect rectangle in the image. Scaled
        # so that it is SOURCE_SCALE x the frame, every view is drawn from between 1.12x
        # (zoom 1.0) and 0.9x (zoom 1.25) the output's pixels: too little downscaling for the
        # bilinear warp to alias, too little upscaling to look soft.
        w, h = image.size
        base_w = min(w, h * frame_aspect)
        scale = min(1.0, (width * SOURCE_SCALE) / base_w)
        if scale < 1.0:
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS,
                                 reducing_gap=2.0)
        self.pixels = np.ascontiguousarray(np.asarray(image))
        h, w = self.pixels.shape[:2]
        self.base_w = min(w, h * frame_aspect)
        self.base_h = self.base_w / frame_aspect

    def view(self, zoom: float, fx: float, fy: float) -> tuple[float, float, float, float]:
        """The source rectangle for a zoom (>= 1), placed at fractions fx, fy of the free play."""
        h, w = self.pixels.shape[:2]
        vw, vh = self.base_w / zoom, self.base_h / zoom
        x0 = (w - vw) * fx
        y0 = (h - vh) * fy
        return (x0, y0, x0 + vw, y0 + vh)

    def render(self, box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
        """The box warped onto width x height. Sub-pixel exact (slow motion does not judder);
        OpenCV's bilinear warp is 3-4x faster than Pillow's box resize and uses every core."""
        x0, y0, x1, y1 = box
        sx, sy = (x1 - x0) / width, (y1 - y0) / height
        # Output pixel centres (x + 0.5) map to source coordinates; -0.5 back to OpenCV's grid.
        matrix = np.float32([[sx, 0, x0 + 0.5 * sx - 0.5], [0, sy, y0 + 0.5 * sy - 0.5]])
        return cv2.warpAffine(self.pixels, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)


def _ease(t: float) -> float:
    return t * t * (3 - 2 * t)


def motion_view(motion: str, index: int, t: float) -> tuple[float, float, float]:
    """(zoom, fx, fy) for image `index` at progress t in [0, 1] of its visible time."""
    t = _ease(min(1.0, max(0.0, t)))
    if motion == "zoom_in":
        return 1 + (ZOOM - 1) * t, 0.5, 0.5
    if motion == "zoom_out":
        return ZOOM - (ZOOM - 1) * t, 0.5, 0.5
    if motion == "pan_left":
        return PAN_VIEW, 1 - t, 0.5
    if motion == "pan_right":
        return PAN_VIEW, t, 0.5
    if motion == "ken_burns":
        # Alternate zooming in and out, and drift between corners in a different direction
        # for each image, so a slideshow does not repeat one move.
        zoom_in = index % 2 == 0
        zoom = 1 + (KEN_BURNS_ZOOM - 1) * (t if zoom_in else 1 - t)
        start, end = [((0.2, 0.3), (0.8, 0.6)), ((0.8, 0.3), (0.3, 0.7)), ((0.5, 0.8), (0.5, 0.2)),
                      ((0.3, 0.7), (0.7, 0.3))][index % 4]
        return zoom, start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t
    return 1.0, 0.5, 0.5


class _Sources:
    """The decoded, pre-scaled images, at most two at a time (the slideshow only ever
    shows image i and i+1 together), so memory does not grow with the number of images."""

    def __init__(self, inputs: list[InputFile], spec: dict[str, Any], limit: int):
        self.inputs, self.spec, self.limit = inputs, spec, limit
        self._cache: OrderedDict[int, _Source] = OrderedDict()

    def get(self, index: int) -> _Source:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        spec = self.spec
        draft = (round(spec["width"] * SOURCE_SCALE), round(spec["height"] * SOURCE_SCALE))
        with open_image(self.inputs[index].path, self.limit, draft=draft) as image:
            upright = oriented(image)
            if upright is image:
                upright = image.copy()  # _Source may keep it as is, and the file closes here
            source = _Source(upright, spec["width"], spec["height"], spec["fit"], spec["background"])
        self._cache[index] = source
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return source


# --- the timeline ----------------------------------------------------------------------------

class Timeline:
    def __init__(self, images: int, duration: float, fps: int, transition: str, transition_seconds: float):
        self.images = images
        self.frames = max(1, int(duration * fps + 0.5))
        self.fps = fps
        self.slot = duration / images
        self.transition = transition if images > 1 else "none"
        # A transition longer than half a slot would overlap the next one.
        self.overlap = min(transition_seconds, self.slot / 2) if self.transition != "none" else 0.0

    def at(self, frame: int) -> list[tuple[int, float, float]]:
        """What frame `frame` shows: [(image index, motion progress, weight)]. One entry with
        a weight under 1 is a fade towards black; two entries are a crossfade, the second
        entry's weight being how far it has faded in."""
        t = (frame + 0.5) / self.fps
        index = min(self.images - 1, int(t / self.slot))
        shown = [(index, self._progress(index, t), 1.0)]
        if self.overlap <= 0:
            return shown
        slot_end = (index + 1) * self.slot
        slot_start = index * self.slot
        if self.transition == "crossfade" and index + 1 < self.images and t > slot_end - self.overlap:
            mix = (t - (slot_end - self.overlap)) / self.overlap
            return [(index, shown[0][1], 1 - mix), (index + 1, self._progress(index + 1, t), mix)]
        if self.transition == "fade":
            half = self.overlap / 2
            if index + 1 < self.images and t > slot_end - half:
                return [(index, shown[0][1], (slot_end - t) / half)]
            if index > 0 and t < slot_start + half:
                return [(index, shown[0][1], (t - slot_start) / half)]
        return shown

    def _progress(self, index: int, t: float) -> float:
        start = index * self.slot - (self.overlap if self.transition == "crossfade" and index > 0 else 0.0)
        end = (index + 1) * self.slot
        return (t - start) / (end - start)


# --- frames ----------------------------------------------------------------------------------

class Caption:
    """The caption drawn once (wrapped, white on a soft dark band) and blended onto each frame."""

    def __init__(self, text: str, width: int, height: int, position: str, size: float):
        face = font(max(8, round(size * height)))
        margin = round(height * 0.04)
        measure = ImageDraw.Draw(Image.new("L", (1, 1)))
        lines: list[str] = []
        for paragraph in text.splitlines() or [text]:
            line = ""
            for word in paragraph.split():
                candidate = f"{line} {word}".strip()
                if line and measure.textlength(candidate, font=face) > width - 2 * margin:
                    lines.append(line)
                    line = word
                else:
                    line = candidate
            lines.append(line)
        block = "\n".join(lines)
        points = getattr(face, "size", 12)
        stroke = max(1, points // 14)
        left, top, right, bottom = measure.multiline_textbbox((0, 0), block, font=face, stroke_width=stroke,
                                                              align="center")
        pad = max(4, round(points * 0.4))
        layer_w = min(width, right - left + 2 * pad)
        layer_h = min(height, bottom - top + 2 * pad)
        layer = Image.new("RGBA", (layer_w, layer_h), (0, 0, 0, 110))
        ImageDraw.Draw(layer).multiline_text((pad - left, pad - top), block, font=face, fill=(255, 255, 255, 255),
                                             stroke_width=stroke, stroke_fill=(0, 0, 0, 200), align="center")
        rgba = np.asarray(layer)
        self.colour = np.ascontiguousarray(rgba[..., :3])
        self.alpha = rgba[..., 3].astype(np.float32) / 255.0
        self.keep = 1.0 - self.alpha
        self.x = (width - layer_w) // 2
        self.y = max(0, {"top": margin, "center": (height - layer_h) // 2,
                         "bottom": height - layer_h - margin}[position])

    def draw_on(self, frame: np.ndarray) -> None:
        h, w = self.alpha.shape[:2]
        region = frame[self.y:self.y + h, self.x:self.x + w]
        # One OpenCV pass (region x keep + colour x alpha, rounded) instead of four float
        # arrays the size of the band.
        region[:] = cv2.blendLinear(region, self.colour, self.keep, self.alpha)


def render_frame(sources: _Sources, timeline: Timeline, frame: int, spec: dict[str, Any], motion: str) -> np.ndarray:
    """One frame as a (height, width, 3) uint8 array: rgb24, ready for ffmpeg's pipe."""
    width, height = spec["width"], spec["height"]
    views = []
    for index, progress, weight in timeline.at(frame):
        source = sources.get(index)
        zoom, fx, fy = motion_view(motion, index, progress)
        views.append((source.render(source.view(zoom, fx, fy), width, height), weight))
    if len(views) == 2:  # crossfade: the next image's weight is the mix
        return cv2.addWeighted(views[0][0], 1.0 - views[1][1], views[1][0], views[1][1], 0.0)
    picture, weight = views[0]
    if weight < 1:  # fade: towards black
        return cv2.convertScaleAbs(picture, alpha=max(0.0, weight))
    return picture


def to_yuv420p(picture: np.ndarray) -> np.ndarray:
    """An rgb24 frame as planar YUV 4:2:0, the encoder's own input: BT.601 limited range like
    ffmpeg's scaler (luma within 1 level; chroma averaged over each 2x2 block)."""
    return cv2.cvtColor(picture, cv2.COLOR_RGB2YUV_I420)


# --- overlap --------------------------------------------------------------------------------

class _Failure:
    """What the drawing thread raised, carried through the queue to the task's thread."""

    def __init__(self, error: BaseException):
        self.error = error


class _Drawing:
    """The video's frames, drawn in order by `draw` on a background thread into a queue of
    at most `depth` frames (the thread waits while it is full: memory stays flat)."""

    def __init__(self, draw: Callable[[int], np.ndarray], frames: int, depth: int = QUEUE_FRAMES):
        self._draw, self._frames = draw, frames
        self._queue: queue.Queue[np.ndarray | _Failure] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="video-frames", daemon=True)
        self._thread.start()

    def next(self) -> np.ndarray:
        """The next frame, once drawn; what the drawing raised, raised here instead."""
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        """Stop drawing and join the thread: it finishes the frame in hand at most. Safe to
        call twice, and after the last frame."""
        self._stop.set()
        while self._thread.is_alive():
            # Empty the queue so that a put waiting for room returns and sees the stop.
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(0.05)

    def _run(self) -> None:
        try:
            for frame in range(self._frames):
                if self._stop.is_set():
                    return
                self._queue.put(self._draw(frame))
        except BaseException as exc:  # noqa: BLE001 — every failure is the task's, raised by next()
            self._queue.put(_Failure(exc))


# --- ffmpeg ----------------------------------------------------------------------------------

def widen_pipe(stream) -> None:
    """Give the pipe behind `stream` PIPE_BYTES of buffer where the OS allows it; elsewhere
    (not Linux, or over the user's pipe quota) it keeps its size: slower, not wrong."""
    try:
        import fcntl

        fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


class _Encoder:
    """ffmpeg reading raw frames on stdin; its stderr goes to a file (a pipe nobody reads
    could fill and stall it)."""

    def __init__(self, command: list[str], stderr_path: Path):
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                            stderr=self._stderr, bufsize=0)
        except OSError as exc:
            self._stderr.close()
            raise PermanentError(f"ffmpeg could not be started: {exc}", code="encoder_failed") from None
        widen_pipe(self.process.stdin)

    def write(self, frame: np.ndarray) -> None:
        # Unbuffered: the frame goes straight from the array to the pipe, no copy. A raw
        # write may be partial, hence the loop.
        view = memoryview(np.ascontiguousarray(frame)).cast("B")
        try:
            while view:
                written = self.process.stdin.write(view)
                view = view[written or 0:]
        except (BrokenPipeError, ValueError):
            self.process.wait(timeout=30)
            raise self.failure() from None

    def finish(self, timeout: float = 300) -> None:
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PermanentError("ffmpeg did not finish in time", code="encoder_failed") from None
        finally:
            self._stderr.close()
        if code != 0:
            raise self.failure()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass
        if not self._stderr.closed:
            self._stderr.close()

    def failure(self) -> PermanentError:
        self._stderr.flush()
        tail = self.stderr_path.read_bytes()[-STDERR_TAIL_CHARS:].decode("utf-8", "replace").strip()
        return PermanentError(f"ffmpeg failed (exit {self.process.returncode}): {tail or 'no message'}",
                              code="encoder_failed")


def generate_video(inputs: list[InputFile], params: dict[str, Any], ctx: ProcessContext) -> dict[str, Any]:
    spec = read_params("video_generation", params)
    if not inputs:
        raise PermanentError("video_generation needs at least one image", code="invalid_input")
    width, height, fps = spec["width"], spec["height"], spec["fps"]
    timeline = Timeline(len(inputs), spec["duration"], fps, spec["transition"], spec["transitionDuration"])
    sources = _Sources(inputs, spec, max_image_pixels(ctx))
    motion = spec["motion"]
    caption = Caption(spec["caption"], width, height, spec["captionPosition"], spec["captionSize"]) \
        if spec["caption"] else None

    def draw(frame: int) -> np.ndarray:  # on the drawing thread
        picture = render_frame(sources, timeline, frame, spec, motion)
        if caption is not None:
            caption.draw_on(picture)
        return to_yuv420p(picture)

    opencv_threads = cv2.getNumThreads()
    try:
        # Decode the first image before starting ffmpeg: a bad input fails without a process to clean up.
        sources.get(0)
        encoder_name = video_encoder()
        with scratch_dir(ctx) as workdir:
            target = workdir / "video.mp4"
            encoder = _Encoder(ffmpeg_command(width, height, fps, target, encoder_name), workdir / "ffmpeg.log")
            drawing = None
            try:
                cv2.setNumThreads(1)  # restored below, once the drawing thread is joined
                drawing = _Drawing(draw, timeline.frames)
                reported = -1
                for frame in range(timeline.frames):
                    if ctx.is_cancelled():
                        raise Cancelled()
                    encoder.write(drawing.next())
                    percent = 99 * (frame + 1) // timeline.frames
                    if percent != reported:
                        ctx.progress(percent)
                        reported = percent
                encoder.finish()
            except BaseException:
                # Cancelled, a failed frame, a time limit: ffmpeg must not outlive the task.
                encoder.kill()
                target.unlink(missing_ok=True)
                raise
            finally:
                if drawing is not None:
                    drawing.close()
            if not target.is_file() or target.stat().st_size == 0:
                raise PermanentError("ffmpeg produced no video", code="encoder_failed")
            ctx.check_cancelled()
            file = store_output(ctx, target, "video.mp4", "video/mp4")
    finally:
        cv2.setNumThreads(opencv_threads)
    ctx.progress(100)
    return {"file": file, "durationSeconds": round(timeline.frames / fps, 3), "fps": fps, "width": width,
            "height": height, "frames": timeline.frames, "images": len(inputs), "motion": motion,
            "transition": timeline.transition, "codec": "h264" if encoder_name != "mpeg4" else "mpeg4",
            "encoder": encoder_name}
