"""video_generation makes a real H.264 MP4 (decoded back here to check it), streams frames to
ffmpeg while a drawing thread draws the next ones, stops ffmpeg and its threads when
the task is cancelled or anything fails, keeps memory flat in the video's length, and fails
permanently on bad input."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import tracemalloc
import weakref
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image, ImageDraw

import worker.processors.video as video
from tests.support.context import Recorder, make_ctx
from worker.processors.base import Cancelled, InputFile, PermanentError
from worker.processors.video import Timeline, generate_video

SMALL = {"width": 320, "height": 240, "fps": 12}
RED, BLUE = (220, 30, 30), (30, 40, 220)


def image_file(tmp_path: Path, name: str, image: Image.Image) -> InputFile:
    path = tmp_path / name
    image.save(path)
    return InputFile(path, "image/png")


def solid(tmp_path: Path, name: str, colour) -> InputFile:
    return image_file(tmp_path, name, Image.new("RGB", (400, 300), colour))


def pattern(tmp_path: Path, name: str = "pattern.png") -> InputFile:
    """Stripes and a marker, so motion shows up as changed pixels."""
    image = Image.new("RGB", (640, 480), (90, 90, 90))
    draw = ImageDraw.Draw(image)
    for x in range(0, 640, 40):
        draw.rectangle([x, 0, x + 19, 479], fill=(200, 180, 60))
    draw.ellipse([260, 180, 380, 300], fill=(20, 20, 200))
    return image_file(tmp_path, name, image)


def decode(path: Path) -> tuple[dict, list[np.ndarray]]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]
    return meta, frames


def run(tmp_path: Path, inputs: list[InputFile], ctx=None, **params) -> tuple[dict, dict, list[np.ndarray]]:
    ctx = ctx or make_ctx(tmp_path)
    output = generate_video(inputs, {**SMALL, **params}, ctx)
    meta, frames = decode(ctx.storage.path(output["file"]["key"]))
    return output, meta, frames


def our_threads() -> list[str]:
    """The processor's own threads still alive (the drawing thread)."""
    return [t.name for t in threading.enumerate() if t.name.startswith("video-frames")]


@pytest.fixture
def ffmpegs(monkeypatch) -> list[subprocess.Popen]:
    """Every ffmpeg the processor starts to encode, to check none is left running."""
    video.video_encoder()  # asks ffmpeg for its encoders once per process: not one to count
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(video.subprocess, "Popen", recording_popen)
    return started


def photo(tmp_path: Path, name: str, seed: int) -> Path:
    """A noisy JPEG (big enough that cutting it leaves a valid header and missing pixels)."""
    rng = np.random.default_rng(seed)
    path = tmp_path / name
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def mean_colour(frame: np.ndarray) -> np.ndarray:
    h, w, _ = frame.shape
    return frame[h // 4: 3 * h // 4, w // 4: 3 * w // 4].reshape(-1, 3).mean(axis=0)


class TestTheMp4:
    def test_frame_count_size_codec_and_the_file_contract(self, tmp_path):
        output, meta, frames = run(tmp_path, [pattern(tmp_path), solid(tmp_path, "r.png", RED)], duration=2)
        assert meta["codec"] == "h264" and meta["size"] == (320, 240) and meta["fps"] == 12
        assert meta["pix_fmt"].startswith("yuv420p")
        assert len(frames) == 24 == output["frames"]
        assert output["file"] == {"key": "outputs/task-1/video.mp4", "contentType": "video/mp4",
                                  "size": (tmp_path / "storage/outputs/task-1/video.mp4").stat().st_size,
                                  "name": "video.mp4"}
        assert (output["durationSeconds"], output["fps"], output["width"], output["height"]) == (2.0, 12, 320, 240)
        assert output["encoder"] == "libx264"

    def test_faststart_puts_the_index_before_the_media(self, tmp_path):
        output, _, _ = run(tmp_path, [pattern(tmp_path)], duration=1)
        head = (tmp_path / "storage" / output["file"]["key"]).read_bytes()[:4096]
        assert 0 <= head.find(b"moov") < head.find(b"mdat") or b"mdat" not in head

    def test_fractional_durations_round_to_whole_frames(self, tmp_path):
        output, _, frames = run(tmp_path, [pattern(tmp_path)], duration=1.25, fps=10, motion="none")
        assert output["frames"] == len(frames) == 13

    def test_portrait_sizes(self, tmp_path):
        _, meta, frames = run(tmp_path, [pattern(tmp_path)], duration=0.5, width=240, height=320)
        assert meta["size"] == (240, 320) and frames[0].shape == (320, 240, 3)


class TestTimeline:
    def test_slots_and_crossfade_weights(self):
        timeline = Timeline(images=2, duration=2, fps=10, transition="crossfade", transition_seconds=0.5)
        assert timeline.frames == 20
        assert [i for i, _, _ in timeline.at(0)] == [0]
        mid = timeline.at(7)  # t = 0.75 s: half-way through the 0.5 s crossfade ending at 1.0 s
        assert [i for i, _, _ in mid] == [0, 1] and mid[1][2] == pytest.approx(0.5)
        assert [i for i, _, _ in timeline.at(19)] == [1]

    def test_a_transition_never_takes_more_than_half_a_slot(self):
        assert Timeline(images=4, duration=2, fps=10, transition="crossfade", transition_seconds=5).overlap == 0.25

    def test_one_image_has_no_transition(self):
        assert Timeline(images=1, duration=2, fps=10, transition="crossfade", transition_seconds=1).transition == "none"


class TestPictures:
    def test_crossfade_blends_one_image_into_the_next(self, tmp_path):
        _, _, frames = run(tmp_path, [solid(tmp_path, "r.png", RED), solid(tmp_path, "b.png", BLUE)],
                           duration=2, fps=10, motion="none", transition="crossfade", transitionDuration=0.5)
        # Frame 7 shows t = 0.75 s, half-way through the crossfade over 0.5 .. 1.0 s.
        first, middle, last = mean_colour(frames[0]), mean_colour(frames[7]), mean_colour(frames[-1])
        assert np.allclose(first, RED, atol=12) and np.allclose(last, BLUE, atol=12)
        assert 70 < middle[0] < 180 and 70 < middle[2] < 180

    def test_fade_dips_to_black_at_the_cut(self, tmp_path):
        _, _, frames = run(tmp_path, [solid(tmp_path, "r.png", RED), solid(tmp_path, "b.png", BLUE)],
                           duration=2, fps=10, motion="none", transition="fade", transitionDuration=0.8)
        assert mean_colour(frames[10]).max() < 80 or mean_colour(frames[9]).max() < 80
        assert np.allclose(mean_colour(frames[0]), RED, atol=12)

    def test_no_transition_cuts(self, tmp_path):
        _, _, frames = run(tmp_path, [solid(tmp_path, "r.png", RED), solid(tmp_path, "b.png", BLUE)],
                           duration=2, fps=10, motion="none", transition="none")
        assert np.allclose(mean_colour(frames[9]), RED, atol=12) and np.allclose(mean_colour(frames[10]), BLUE, atol=12)

    @pytest.mark.parametrize("motion", ["zoom_in", "zoom_out", "pan_left", "pan_right", "ken_burns"])
    def test_motion_moves_the_picture(self, tmp_path, motion):
        _, _, frames = run(tmp_path, [pattern(tmp_path)], duration=1, fps=8, motion=motion)
        assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 5

    def test_no_motion_holds_still(self, tmp_path):
        _, _, frames = run(tmp_path, [pattern(tmp_path)], duration=1, fps=8, motion="none")
        assert np.abs(frames[1].astype(int) - frames[-1].astype(int)).mean() < 2

    def test_caption_is_drawn_where_asked(self, tmp_path):
        plain = run(tmp_path, [solid(tmp_path, "r.png", RED)], duration=0.5, motion="none")[2][0].astype(int)
        captioned = run(tmp_path, [solid(tmp_path, "r.png", RED)], duration=0.5, motion="none",
                        caption="Hello from StudioX", captionPosition="bottom")[2][0].astype(int)
        difference = np.abs(plain - captioned).sum(axis=2) > 60
        rows = np.nonzero(difference.any(axis=1))[0]
        assert rows.size and rows.min() > 240 // 2

    def test_contain_letterboxes_on_the_background(self, tmp_path):
        tall = image_file(tmp_path, "tall.png", Image.new("RGB", (200, 400), RED))
        _, _, frames = run(tmp_path, [tall], duration=0.5, motion="none", fit="contain", background="#00ff00")
        assert np.allclose(frames[0][120, 10], (0, 255, 0), atol=20)
        assert np.allclose(frames[0][120, 160], RED, atol=20)

    def test_exif_orientation_is_applied(self, tmp_path):
        upright = Image.new("RGB", (300, 400), BLUE)
        ImageDraw.Draw(upright).rectangle([0, 0, 299, 199], fill=RED)  # red on top when upright
        exif = Image.Exif()
        exif[0x0112] = 6
        path = tmp_path / "side.jpg"
        upright.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
        _, _, frames = run(tmp_path, [InputFile(path, "image/jpeg")], duration=0.5, motion="none", fit="contain")
        assert frames[0][30, 160][0] > 150 and frames[0][210, 160][2] > 150


class TestProgressAndCancellation:
    def test_progress_by_frame_to_100(self, tmp_path):
        recorder = Recorder()
        run(tmp_path, [pattern(tmp_path)], ctx=make_ctx(tmp_path, recorder), duration=2, fps=10)
        assert recorder.values == sorted(recorder.values) and recorder.values[-1] == 100
        assert len(recorder.values) >= 20

    def test_cancel_mid_video_kills_ffmpeg_and_saves_nothing(self, tmp_path, ffmpegs):
        recorder = Recorder(cancel_after_progress=15)
        ctx = make_ctx(tmp_path, recorder)
        with pytest.raises(Cancelled):
            generate_video([pattern(tmp_path)], {**SMALL, "duration": 10, "fps": 25}, ctx)
        assert len(recorder.values) == 15  # stopped at the first check after the flip
        assert len(ffmpegs) == 1 and ffmpegs[0].poll() is not None
        assert our_threads() == []  # the drawing thread was joined
        assert not (tmp_path / "storage" / "outputs").exists()
        assert not (tmp_path / "work" / "video.mp4").exists()

    def test_drawing_stops_within_the_queue_of_the_cancel(self, tmp_path, monkeypatch):
        recorder = Recorder(cancel_after_progress=10)
        drawn_after_cancel = []
        real_render = video.render_frame

        def render_and_count(sources, timeline, frame, *args):
            if recorder.is_cancelled():
                drawn_after_cancel.append(frame)
            return real_render(sources, timeline, frame, *args)

        monkeypatch.setattr(video, "render_frame", render_and_count)
        with pytest.raises(Cancelled):
            generate_video([pattern(tmp_path), pattern(tmp_path, "p2.png")], {**SMALL, "duration": 10},
                           make_ctx(tmp_path, recorder))
        # The drawing thread is at most a queue ahead, and stops after the frame in hand.
        assert len(drawn_after_cancel) <= video.QUEUE_FRAMES + 1
        assert our_threads() == []


class TestTheDrawingThread:
    """Frames are drawn on a thread of their own while the task's thread feeds them to
    ffmpeg: whatever goes wrong, the task fails with the real error and nothing it started
    is left behind."""

    def test_drawing_runs_ahead_of_ffmpeg_by_at_most_the_queue(self, tmp_path, monkeypatch):
        written = [0]
        ahead: list[int] = []
        real_render, real_write = video.render_frame, video._Encoder.write

        def render_and_measure(sources, timeline, frame, *args):
            ahead.append(frame - written[0])
            return real_render(sources, timeline, frame, *args)

        def slow_write(self, frame):
            time.sleep(0.005)  # an encoder slower than the drawing
            real_write(self, frame)
            written[0] += 1

        monkeypatch.setattr(video, "render_frame", render_and_measure)
        monkeypatch.setattr(video._Encoder, "write", slow_write)
        run(tmp_path, [pattern(tmp_path)], duration=2, fps=25)
        # It does draw ahead (the overlap), and no further than the queue plus the frame
        # being written (the bound on memory).
        assert max(ahead) == video.QUEUE_FRAMES + 1

    def test_an_error_in_the_drawing_thread_fails_the_task_and_reaps_ffmpeg_and_the_threads(
            self, tmp_path, monkeypatch, ffmpegs):
        real_render = video.render_frame

        def render_then_break(sources, timeline, frame, *args):
            if frame == 30:
                raise RuntimeError("the drawing broke")
            return real_render(sources, timeline, frame, *args)

        monkeypatch.setattr(video, "render_frame", render_then_break)
        with pytest.raises(RuntimeError, match="the drawing broke"):
            generate_video([pattern(tmp_path), solid(tmp_path, "r.png", RED)], {**SMALL, "duration": 5},
                           make_ctx(tmp_path))
        assert len(ffmpegs) == 1 and ffmpegs[0].poll() is not None
        assert our_threads() == []
        assert not (tmp_path / "storage" / "outputs").exists()
        assert not (tmp_path / "work" / "video.mp4").exists()

    def test_an_image_that_fails_to_decode_mid_video_fails_the_task(self, tmp_path, ffmpegs):
        whole = photo(tmp_path, "whole.jpg", seed=3).read_bytes()
        cut = tmp_path / "cut.jpg"
        cut.write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels stop half-way
        with pytest.raises(PermanentError) as caught:
            generate_video([pattern(tmp_path), solid(tmp_path, "r.png", RED), InputFile(cut, "image/jpeg")],
                           {**SMALL, "duration": 6}, make_ctx(tmp_path))
        assert caught.value.code == "invalid_image"
        assert len(ffmpegs) == 1 and ffmpegs[0].poll() is not None
        assert our_threads() == []
        assert not (tmp_path / "storage" / "outputs").exists()

    def test_a_time_limit_stops_ffmpeg_and_the_drawing(self, tmp_path, ffmpegs):
        """Celery's soft time limit is a signal whose handler raises in the task's thread,
        wherever it is waiting: for a drawn frame, or for ffmpeg to take one."""

        class SoftLimit(Exception):
            pass

        def over_time(signum, frame):
            raise SoftLimit()

        previous = signal.signal(signal.SIGALRM, over_time)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(SoftLimit):
                generate_video([pattern(tmp_path)], {**SMALL, "duration": 60, "fps": 25}, make_ctx(tmp_path))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert len(ffmpegs) == 1 and ffmpegs[0].poll() is not None
        assert our_threads() == []
        assert not (tmp_path / "work" / "video.mp4").exists()

    def test_ffmpeg_dying_mid_video_fails_the_task_and_stops_the_drawing(self, tmp_path, ffmpegs):
        class KillingRecorder(Recorder):
            def progress(self, value: int) -> None:
                super().progress(value)
                if value == 20:
                    ffmpegs[0].kill()

        with pytest.raises(PermanentError) as caught:
            generate_video([pattern(tmp_path)], {**SMALL, "duration": 10, "fps": 25},
                           make_ctx(tmp_path, KillingRecorder()))
        assert caught.value.code == "encoder_failed" and "exit -9" in caught.value.message
        assert ffmpegs[0].poll() is not None
        assert our_threads() == []


class TestMemory:
    def test_memory_does_not_grow_with_the_length(self, tmp_path):
        inputs = [pattern(tmp_path), solid(tmp_path, "r.png", RED)]

        def peak_bytes(seconds: float) -> int:
            tracemalloc.start()  # numpy (and so every OpenCV result) reports its buffers to it
            try:
                generate_video(inputs, {**SMALL, "duration": seconds, "fps": 25}, make_ctx(tmp_path / str(seconds)))
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        peak_bytes(0.2)  # first use fills caches (fonts, codecs) that are not per video
        short, long = peak_bytes(1), peak_bytes(8)
        frame = SMALL["width"] * SMALL["height"] * 3
        # The long video holds the same few frames as the short one, not 8x as many.
        assert long < short + 4 * frame, (short, long)

    def test_at_most_two_images_are_decoded_at_a_time(self, tmp_path, monkeypatch):
        alive: weakref.WeakSet = weakref.WeakSet()
        most = [0]
        real_init, real_render = video._Source.__init__, video.render_frame

        def tracked_init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            alive.add(self)

        def render_and_count(*args, **kwargs):
            most[0] = max(most[0], len(alive))
            return real_render(*args, **kwargs)

        monkeypatch.setattr(video._Source, "__init__", tracked_init)
        monkeypatch.setattr(video, "render_frame", render_and_count)
        colours = [RED, BLUE, (20, 200, 20), (200, 200, 20), (200, 20, 200)]
        _, _, frames = run(tmp_path, [solid(tmp_path, f"{i}.png", c) for i, c in enumerate(colours)],
                           duration=5, fps=10, motion="none", transition="crossfade")
        assert most[0] == 2
        # Each image still shows in its own slot.
        for i, colour in enumerate(colours):
            assert np.allclose(mean_colour(frames[10 * i + 3]), colour, atol=12)


class TestFailures:
    def test_a_text_file_fails_before_ffmpeg_starts(self, tmp_path, monkeypatch):
        path = tmp_path / "notes.png"
        path.write_text("no pixels here")
        monkeypatch.setattr(video.subprocess, "Popen", lambda *a, **k: pytest.fail("ffmpeg started"))
        with pytest.raises(PermanentError) as caught:
            generate_video([InputFile(path, "image/png")], dict(SMALL), make_ctx(tmp_path))
        assert caught.value.code == "invalid_image"

    def test_a_bad_later_image_stops_ffmpeg(self, tmp_path):
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        with pytest.raises(PermanentError) as caught:
            generate_video([pattern(tmp_path), InputFile(broken, "image/png")], {**SMALL, "duration": 2},
                           make_ctx(tmp_path))
        assert caught.value.code == "invalid_image"
        assert not (tmp_path / "storage" / "outputs").exists()

    def test_an_image_over_the_pixel_limit(self, tmp_path):
        with pytest.raises(PermanentError) as caught:
            generate_video([pattern(tmp_path)], dict(SMALL), make_ctx(tmp_path, max_image_pixels=100_000))
        assert caught.value.code == "image_too_large"

    def test_an_ffmpeg_failure_reports_its_stderr(self, tmp_path, monkeypatch):
        monkeypatch.setattr(video, "encoder_args", lambda name: ["-c:v", "no_such_encoder"])
        with pytest.raises(PermanentError) as caught:
            generate_video([pattern(tmp_path)], {**SMALL, "duration": 1}, make_ctx(tmp_path))
        assert caught.value.code == "encoder_failed"
        assert "no_such_encoder" in caught.value.message

    def test_invalid_params_fail_permanently(self, tmp_path):
        with pytest.raises(PermanentError) as caught:
            generate_video([pattern(tmp_path)], {"fps": 500}, make_ctx(tmp_path))
        assert caught.value.code == "invalid_params"
