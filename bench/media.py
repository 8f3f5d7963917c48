"""The media processors against the same library calls made directly.

`python -m bench.media [--quick]` prints one table:

- image_analysis: images analysed per second on a ~2 MP photo-like JPEG, beside a baseline
  that makes the same Pillow / OpenCV calls straight (decode, EXIF, thumbnail, palette,
  statistics, Laplacian, hash, Haar cascade) without the processor around them.
- advanced_editing: a 5-operation chain (resize, brightness, contrast, sharpen, watermark,
  then JPEG) on a 12 MP image, beside the same Pillow calls made directly.
- video_generation: seconds of 720p video made per wall-clock second, beside ffmpeg encoding
  frames that were drawn beforehand and are piped in raw (so the gap is what our frame
  drawing costs on top of the encoder): the very frames of our video as rgb24 (ffmpeg
  converts them) and as yuv420p (ffmpeg only encodes), and the first 2 s looped (the
  baseline before issue 13). Ours and the baselines take turns over a few rounds; the
  median is reported.
- peak memory of every measurement, each run in a fresh child process (spawned, not forked,
  so no parent memory is counted): the Python process's VmHWM, and ffmpeg's peak RSS; and the
  video encoder's peak for a 10 s and a 60 s video side by side, which must not grow with
  the length since frames are streamed.

Ratio = ours / baseline (rates: higher is better; memory: lower is better). Results are also
written to var/bench/media.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "var" / "bench" / "media.json"


# --- inputs ----------------------------------------------------------------------------------

def photo_like(width: int, height: int, seed: int = 1):
    """Gradients, soft shapes and sensor-like noise: statistically like a photo."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 80 * np.sin(x / width * 3 + seed), 100 + 60 * np.cos(y / height * 2),
                     90 + 50 * np.sin((x + y) / (width + height) * 5)], -1)
    del x, y
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    del base
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 40, width // 8)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(max(1, width // 800)))
    noise = rng.normal(0, 5, (height, width, 3)).astype(np.float32)
    return Image.fromarray((np.asarray(image, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8))


# --- measurements (each runs in a fresh child process) ---------------------------------------

def _peak_self_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ChildMemory:
    """Peak VmHWM of this process's ffmpeg children, sampled from /proc while they run.

    getrusage(RUSAGE_CHILDREN) would not do: a child's ru_maxrss includes the parent's
    resident pages it inherited at fork, before exec replaced them with ffmpeg.
    """

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval, self.peak_kb = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ChildMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024

    def _watch(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    status = Path(entry.path, "status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                # Between fork and exec a child still shows this process's memory: count it
                # only once it is ffmpeg.
                if (fields.get("PPid", "").strip() == me and "ffmpeg" in fields.get("Name", "")
                        and "VmHWM" in fields):
                    self.peak_kb = max(self.peak_kb, int(fields["VmHWM"].split()[0]))
            self._stop.wait(self.interval)


def _ctx(workdir: Path, task_id: str):
    from storage import LocalStorage
    from worker.processors.base import ProcessContext

    return ProcessContext(progress=lambda value: None, is_cancelled=lambda: False,
                          storage=LocalStorage(workdir / "storage"), task_id=task_id, workdir=workdir / "work")


def _timed(fn, rounds: int) -> float:
    fn()  # warm: imports, caches, the cascade file
    began = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - began) / rounds


def measure_analysis_ours(path: str, rounds: int, workdir: str) -> dict[str, float]:
    from worker.processors.base import InputFile
    from worker.processors.image_analysis import analyse_image

    ctx = _ctx(Path(workdir), "bench-analysis")
    seconds = _timed(lambda: analyse_image([InputFile(Path(path), "image/jpeg")], {}, ctx), rounds)
    return {"seconds": seconds, "peak_mb": _peak_self_mb()}


def measure_analysis_direct(path: str, rounds: int, workdir: str) -> dict[str, float]:
    import cv2
    import numpy as np
    from PIL import Image, ImageOps

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def once():
        with Image.open(path) as image:
            image.draft("RGB", (1024, 1024))
            image.load()
            image.getexif()
            work = ImageOps.exif_transpose(image).convert("RGB")
        work.thumbnail((1024, 1024))
        thumb = work.copy()
        thumb.thumbnail((128, 128))
        palette = thumb.quantize(colors=5, method=Image.Quantize.MEDIANCUT)
        np.bincount(np.asarray(palette).reshape(-1))
        gray = np.asarray(work.convert("L"))
        gray.mean(), gray.std(), np.percentile(gray, [5, 95])
        cv2.Laplacian(gray, cv2.CV_64F).var()
        small = np.float32(cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA))
        low = cv2.dct(small)[:8, :8]
        low > np.median(low)
        np.unique(np.asarray(work) >> 3, axis=None)
        faces = cv2.resize(gray, (640, round(640 * gray.shape[0] / gray.shape[1])), interpolation=cv2.INTER_AREA)
        cascade.detectMultiScale(cv2.equalizeHist(faces), 1.1, 5, minSize=(20, 20))

    return {"seconds": _timed(once, rounds), "peak_mb": _peak_self_mb()}


def edit_chain(width: int) -> list[dict[str, Any]]:
    return [
        {"op": "resize", "width": width},
        {"op": "brightness", "factor": 1.1},
        {"op": "contrast", "factor": 1.2},
        {"op": "sharpen"},
        {"op": "watermark", "text": "StudioX"},
    ]


def measure_edit_ours(path: str, rounds: int, workdir: str, width: int) -> dict[str, float]:
    from worker.processors.base import InputFile
    from worker.processors.editing import edit_image

    ctx = _ctx(Path(workdir), "bench-edit")
    params = {"operations": edit_chain(width), "format": "jpeg", "quality": 85}
    seconds = _timed(lambda: edit_image([InputFile(Path(path), "image/jpeg")], params, ctx), rounds)
    return {"seconds": seconds, "peak_mb": _peak_self_mb()}


def measure_edit_direct(path: str, rounds: int, workdir: str, width: int) -> dict[str, float]:
    from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

    from worker.processors.imaging import font

    target = Path(workdir) / "direct.jpg"

    def once():
        with Image.open(path) as image:
            image.load()
            image = image.convert("RGB")
        image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS,
                             reducing_gap=3.0)
        image = ImageEnhance.Brightness(image).enhance(1.1)
        image = ImageEnhance.Contrast(image).enhance(1.2)
        image = image.filter(ImageFilter.UnsharpMask(radius=2, percent=150, threshold=3))
        layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
        face = font(round(0.05 * min(image.size)))
        ImageDraw.Draw(layer).text((image.width - 400, image.height - 200), "StudioX", font=face,
                                   fill=(255, 255, 255, 128), stroke_width=face.size // 16,
                                   stroke_fill=(0, 0, 0, 77))
        base = image.convert("RGBA")
        base.alpha_composite(layer)
        base.convert("RGB").save(target, "JPEG", quality=85, optimize=True)

    return {"seconds": _timed(once, rounds), "peak_mb": _peak_self_mb()}


def video_params(seconds: float, size: tuple[int, int], fps: int) -> dict[str, Any]:
    return {"duration": seconds, "fps": fps, "width": size[0], "height": size[1], "motion": "ken_burns",
            "transition": "crossfade", "caption": "StudioX benchmark"}


def measure_video_ours(paths: list[str], seconds: float, size: tuple[int, int], fps: int,
                       workdir: str) -> dict[str, float]:
    from worker.processors.base import InputFile
    from worker.processors.video import generate_video, video_encoder

    ctx = _ctx(Path(workdir), f"bench-video-{int(seconds)}")
    # Which encoder the bundled ffmpeg has is asked once per worker process (and by the
    # baselines before their clock starts): not part of making a video.
    video_encoder()
    with ChildMemory() as ffmpeg:
        began = time.perf_counter()
        output = generate_video([InputFile(Path(p), "image/jpeg") for p in paths],
                                video_params(seconds, size, fps), ctx)
        elapsed = time.perf_counter() - began
    return {"seconds": elapsed, "video_seconds": output["durationSeconds"], "peak_mb": _peak_self_mb(),
            "ffmpeg_peak_mb": ffmpeg.peak_mb, "frames": output["frames"]}


def _drawn_frames(paths: list[str], params: dict[str, Any], pixel_format: str, count: int | None = None):
    """The first `count` frames of the video (all by default), drawn by the processor's own
    functions, as raw bytes (the source images go with the generator, once it is done)."""
    from tasktypes.params import normalize_params
    from worker.processors.base import InputFile
    from worker.processors.video import Caption, Timeline, _Sources, render_frame, to_yuv420p

    spec = normalize_params("video_generation", params)
    width, height = spec["width"], spec["height"]
    timeline = Timeline(len(paths), spec["duration"], spec["fps"], spec["transition"], spec["transitionDuration"])
    sources = _Sources([InputFile(Path(p), "image/jpeg") for p in paths], spec, 10**9)
    caption = Caption(spec["caption"], width, height, spec["captionPosition"], spec["captionSize"]) \
        if spec["caption"] else None
    for i in range(min(count or timeline.frames, timeline.frames)):
        picture = render_frame(sources, timeline, i, spec, spec["motion"])
        if caption is not None:
            caption.draw_on(picture)
        yield (to_yuv420p(picture) if pixel_format == "yuv420p" else picture).tobytes()


def measure_video_direct(paths: list[str], seconds: float, size: tuple[int, int], fps: int,
                         workdir: str, pixel_format: str = "rgb24", frames: str = "same") -> dict[str, float]:
    """ffmpeg alone, encoding raw frames piped in as fast as it reads them.

    frames="same": every frame of our video, drawn beforehand by the processor's own
    functions (caption included) into a file, then read back and piped: ffmpeg encodes
    exactly what it encodes for us. frames="loop": the first 2 s of the video without the
    caption, kept in memory and piped in a loop for the whole length (the baseline up to
    issue 13: easier to encode than the real video, ~12% less encoder CPU). rgb24 pipes the
    frames as drawn and lets ffmpeg convert them; yuv420p pipes them already converted, as
    ours does, which leaves ffmpeg only the encode."""
    from worker.processors.video import ffmpeg_command, video_encoder, widen_pipe

    params = video_params(seconds, size, fps)
    total = max(1, int(seconds * fps + 0.5))
    raw = Path(workdir) / "frames.raw"
    if frames == "loop":
        looped = list(_drawn_frames(paths, {**params, "caption": None}, pixel_format, 2 * fps))
    else:
        with open(raw, "wb") as out:
            for frame in _drawn_frames(paths, params, pixel_format):
                out.write(frame)
            # On disk before the clock starts: the kernel writing them back must not compete
            # with the encode (they are read back from the page cache).
            out.flush()
            os.fsync(out.fileno())
    frame_bytes = size[0] * size[1] * 3 if pixel_format == "rgb24" else size[0] * size[1] * 3 // 2
    target = Path(workdir) / "direct.mp4"
    command = ffmpeg_command(size[0], size[1], fps, target, video_encoder(), pixel_format)
    with ChildMemory() as ffmpeg:
        began = time.perf_counter()
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, bufsize=0)
        widen_pipe(process.stdin)  # fed the way ours is: the gap is the drawing, not the pipe
        if frames == "loop":
            for i in range(total):
                process.stdin.write(looped[i % len(looped)])
        else:
            buffer = memoryview(bytearray(frame_bytes))
            with open(raw, "rb", buffering=0) as source:
                while read := source.readinto(buffer):
                    process.stdin.write(buffer[:read])
        process.stdin.close()
        stderr = process.stderr.read()
        if process.wait() != 0:
            raise RuntimeError(stderr.decode(errors="replace"))
        elapsed = time.perf_counter() - began
    raw.unlink(missing_ok=True)
    return {"seconds": elapsed, "video_seconds": total / fps, "peak_mb": _peak_self_mb(),
            "ffmpeg_peak_mb": ffmpeg.peak_mb, "frames": total}


def _in_child(fn, *args) -> dict[str, float]:
    # spawn, not fork: a forked child starts with the parent's resident memory (the test
    # images) counted in its peak.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


# --- the table -------------------------------------------------------------------------------

def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (its own peaks with it), out of interleaved rounds."""
    ranked = sorted(runs, key=lambda run: run["video_seconds"] / run["seconds"])
    return {**ranked[len(ranked) // 2], "rates": [run["video_seconds"] / run["seconds"] for run in runs]}


# The video baselines: (name in the table and results, pixel format piped, which frames).
VIDEO_BASELINES = (
    ("same frames, rgb24", "rgb24", "same"),
    ("same frames, yuv420p", "yuv420p", "same"),
    ("first 2 s looped, rgb24", "rgb24", "loop"),
)


def run(quick: bool = False, video_rounds: int | None = None) -> dict[str, Any]:
    analysis_size = (1200, 900) if quick else (1732, 1155)          # ~1 MP / ~2 MP
    edit_size = (2000, 1500) if quick else (4000, 3000)             # 3 MP / 12 MP
    video_size = (640, 360) if quick else (1280, 720)
    fps = 25
    lengths = (4, 12) if quick else (10, 60)
    analysis_rounds, edit_rounds = (5, 2) if quick else (20, 5)
    # The video rows are a few seconds each, and the encoder has every core: one busy moment
    # elsewhere on the machine moves a single run by 20%. Ours and the baselines take turns,
    # and the median of the rounds is reported.
    video_rounds = video_rounds or (1 if quick else 3)

    scratch = Path(tempfile.mkdtemp(prefix="studiox-bench-media-"))
    analysis_path = scratch / "analysis.jpg"
    photo_like(*analysis_size, seed=1).save(analysis_path, quality=90)
    edit_path = scratch / "edit.jpg"
    photo_like(*edit_size, seed=2).save(edit_path, quality=90)
    video_paths = []
    for seed in range(3):
        path = scratch / f"video-{seed}.jpg"
        photo_like(*((2000, 1500) if quick else (4000, 3000)), seed=10 + seed).save(path, quality=90)
        video_paths.append(str(path))
    edit_width = edit_size[0] * 3 // 4

    for name in ("a1", "a2", "e1", "e2", "v"):
        (scratch / name).mkdir()
    print(f"measuring in child processes under {scratch} ...", file=sys.stderr, flush=True)
    a_ours = _in_child(measure_analysis_ours, str(analysis_path), analysis_rounds, str(scratch / "a1"))
    a_base = _in_child(measure_analysis_direct, str(analysis_path), analysis_rounds, str(scratch / "a2"))
    e_ours = _in_child(measure_edit_ours, str(edit_path), edit_rounds, str(scratch / "e1"), edit_width)
    e_base = _in_child(measure_edit_direct, str(edit_path), edit_rounds, str(scratch / "e2"), edit_width)

    def workdir() -> str:
        return tempfile.mkdtemp(dir=scratch / "v")

    ours_runs: list[dict[str, Any]] = []
    base_runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in VIDEO_BASELINES}
    for _ in range(video_rounds):
        ours_runs.append(_in_child(measure_video_ours, video_paths, lengths[0], video_size, fps, workdir()))
        for name, pixel_format, frames in VIDEO_BASELINES:
            base_runs[name].append(_in_child(measure_video_direct, video_paths, lengths[0], video_size, fps,
                                             workdir(), pixel_format, frames))
    v_ours = _median_run(ours_runs)
    v_bases = {name: _median_run(runs) for name, runs in base_runs.items()}
    v_long = _in_child(measure_video_ours, video_paths, lengths[1], video_size, fps, workdir())

    a_mp = analysis_size[0] * analysis_size[1] / 1e6
    e_mp = edit_size[0] * edit_size[1] / 1e6
    vw, vh = video_size
    rows = [["measurement", "ours", "baseline", "ratio", "peak MB ours", "peak MB baseline"]]

    def rate_row(name, unit, ours, base):
        rows.append([name, f"{ours:.2f} {unit}", f"{base:.2f} {unit}", f"{ours / base:.2f}", "", ""])

    rate_row(f"image_analysis, {a_mp:.1f} MP JPEG", "img/s", 1 / a_ours["seconds"], 1 / a_base["seconds"])
    rows[-1][4:] = [f"{a_ours['peak_mb']:.0f}", f"{a_base['peak_mb']:.0f}"]
    rate_row(f"advanced_editing, 5 ops, {e_mp:.0f} MP", "edits/s", 1 / e_ours["seconds"], 1 / e_base["seconds"])
    rows[-1][4:] = [f"{e_ours['peak_mb']:.0f}", f"{e_base['peak_mb']:.0f}"]
    for i, (name, v_base) in enumerate(v_bases.items()):
        label = f"video {vh}p{fps}, {lengths[0]} s, 3 images, vs {name}" if i == 0 else f"  vs {name}"
        rate_row(label, "video s/s", v_ours["video_seconds"] / v_ours["seconds"],
                 v_base["video_seconds"] / v_base["seconds"])
        rows[-1][4:] = [f"{v_ours['peak_mb']:.0f} + ffmpeg {v_ours['ffmpeg_peak_mb']:.0f}" if i == 0 else "",
                        f"{v_base['peak_mb']:.0f} + ffmpeg {v_base['ffmpeg_peak_mb']:.0f}"]
    memory = [["video memory by length", f"{lengths[0]} s", f"{lengths[1]} s", "ratio"]]
    memory.append(["python process peak MB", f"{v_ours['peak_mb']:.0f}", f"{v_long['peak_mb']:.0f}",
                   f"{v_long['peak_mb'] / v_ours['peak_mb']:.2f}"])
    memory.append(["ffmpeg peak MB", f"{v_ours['ffmpeg_peak_mb']:.0f}", f"{v_long['ffmpeg_peak_mb']:.0f}",
                   f"{v_long['ffmpeg_peak_mb'] / v_ours['ffmpeg_peak_mb']:.2f}"])
    memory.append(["wall seconds", f"{v_ours['seconds']:.1f}", f"{v_long['seconds']:.1f}",
                   f"{v_long['seconds'] / v_ours['seconds']:.2f}"])

    print("\n== media processors ==")
    print(_table(rows))
    print()
    print(_table(memory))
    print(f"parameters: quick={quick}, cpus={os.cpu_count()}, analysis rounds={analysis_rounds}, "
          f"edit rounds={edit_rounds}, video {vw}x{vh}@{fps} (median of {video_rounds} interleaved "
          f"rounds), encoder libx264 veryfast crf 20")
    print("note: the video baselines are ffmpeg alone on a raw pipe: our frames drawn beforehand "
          "(same frames) and piped as rgb24 (ffmpeg converts them, as before issue 13) or as yuv420p "
          "(as ours pipes them: ffmpeg only encodes), or the first 2 s looped (the baseline before "
          "issue 13, easier to encode). Ours streams frames and holds two source images; the looped "
          "baseline keeps 2 s of raw frames in memory.")
    sys.stdout.flush()

    payload = {
        "benchmark": "media", "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "quick": quick,
        "analysis": {"ours": a_ours, "baseline": a_base, "megapixels": a_mp},
        "editing": {"ours": e_ours, "baseline": e_base, "megapixels": e_mp, "chain": edit_chain(edit_width)},
        "video": {"ours": v_ours, "baselines": v_bases, "long": v_long, "size": video_size, "fps": fps,
                  "rounds": video_rounds},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {RESULTS.relative_to(ROOT)}")
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.media", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller images, 360p and shorter videos")
    parser.add_argument("--video-rounds", type=int, help="interleaved rounds of the video rows (default 3, quick 1)")
    args, _ = parser.parse_known_args(argv)
    run(quick=args.quick, video_rounds=args.video_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
