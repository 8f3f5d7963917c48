"""video_generation makes a real H.264 MP4 (decoded back here to check it), streams frames to
ffmpeg, stops ffmpeg when the task is cancelled, and fails permanently on bad input."""

from __future__ import annotations

import subprocess
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

    def test_cancel_mid_video_kills_ffmpeg_and_saves_nothing(self, tmp_path, monkeypatch):
        started: list[subprocess.Popen] = []
        real_popen = subprocess.Popen

        def recording_popen(*args, **kwargs):
            process = real_popen(*args, **kwargs)
            started.append(process)
            return process

        monkeypatch.setattr(video.subprocess, "Popen", recording_popen)
        recorder = Recorder(cancel_after_progress=15)
        ctx = make_ctx(tmp_path, recorder)
        with pytest.raises(Cancelled):
            generate_video([pattern(tmp_path)], {**SMALL, "duration": 10, "fps": 25}, ctx)
        assert len(recorder.values) == 15  # stopped at the first check after the flip
        assert len(started) == 1 and started[0].poll() is not None
        assert not (tmp_path / "storage" / "outputs").exists()
        assert not (tmp_path / "work" / "video.mp4").exists()


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
