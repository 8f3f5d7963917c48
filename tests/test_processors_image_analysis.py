"""image_analysis on real files drawn by Pillow: metadata, EXIF, colours, tone, sharpness,
hashes, faces, classification, and the inputs it must refuse."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageDraw, ImageFilter, ImageFont
from PIL.TiffImagePlugin import IFDRational as Fraction

from tests.support.context import Recorder, make_ctx
from worker.processors.base import Cancelled, InputFile, PermanentError
from worker.processors.image_analysis import (
    _dct_matrix,
    analyse_image,
    hamming_distance,
)

# --- images ----------------------------------------------------------------------------------

def photo_like(width=960, height=720, seed=1) -> Image.Image:
    """Smooth gradients, soft shapes and sensor-like noise: what a camera image looks like to statistics."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 80 * np.sin(x / width * 3 + seed), 100 + 60 * np.cos(y / height * 2),
                     90 + 50 * np.sin((x + y) / (width + height) * 5)], -1)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(20):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(width // 40, width // 8)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def screenshot_like(width=1280, height=800) -> Image.Image:
    image = Image.new("RGB", (width, height), "#f4f4f4")
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width, 40], fill="#2d2d30")
    draw.rectangle([0, 40, 220, height], fill="#e8e8e8")
    face = ImageFont.load_default(size=14)
    for i in range(28):
        draw.text((240, 60 + i * 24), f"Line {i}: the quick brown fox jumps over the lazy dog", fill="#222", font=face)
    for i in range(12):
        draw.text((16, 60 + i * 28), f"Menu item {i}", fill="#333", font=face)
    return image


def graphic_like(size=600) -> Image.Image:
    image = Image.new("RGB", (size, size), "#ffcc00")
    draw = ImageDraw.Draw(image)
    draw.ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill="#0044aa")
    draw.polygon([(size // 2, size // 6), (5 * size // 6, 5 * size // 6), (size // 6, 5 * size // 6)],
                 outline="#ffffff", width=10)
    return image


def drawn_face(size=300) -> Image.Image:
    """A grey cartoon face that OpenCV's frontal-face Haar cascade does detect."""
    image = Image.new("L", (size, size), 60)
    draw = ImageDraw.Draw(image)
    s = size / 100
    draw.ellipse([20 * s, 8 * s, 80 * s, 95 * s], fill=190)
    draw.ellipse([15 * s, 0, 85 * s, 30 * s], fill=50)
    draw.rectangle([26 * s, 34 * s, 46 * s, 38 * s], fill=70)
    draw.rectangle([54 * s, 34 * s, 74 * s, 38 * s], fill=70)
    draw.ellipse([29 * s, 41 * s, 43 * s, 49 * s], fill=40)
    draw.ellipse([57 * s, 41 * s, 71 * s, 49 * s], fill=40)
    draw.polygon([(50 * s, 48 * s), (45 * s, 66 * s), (55 * s, 66 * s)], fill=165)
    draw.ellipse([44 * s, 63 * s, 56 * s, 68 * s], fill=120)
    draw.ellipse([37 * s, 74 * s, 63 * s, 82 * s], fill=90)
    return image.filter(ImageFilter.GaussianBlur(3)).convert("RGB")


def dms(value: float) -> tuple:
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = round(((value - degrees) * 60 - minutes) * 60 * 100)
    return Fraction(degrees), Fraction(minutes), Fraction(seconds, 100)


def camera_exif(*, latitude=None, longitude=None, orientation=1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "StudioCam"
    exif[0x0110] = "SC-1 Mark II"
    exif[0x0112] = orientation
    exif[0x0132] = "2024:05:01 10:00:00"
    sub = exif.get_ifd(ExifTags.IFD.Exif)
    sub[0x9003] = "2024:05:01 12:30:45"
    sub[0x9011] = "+02:00"
    sub[0xA434] = "SC 35mm F1.8"
    sub[0x829A] = Fraction(1, 250)
    sub[0x829D] = Fraction(18, 10)
    sub[0x8827] = 200
    if latitude is not None:
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps[1] = "N" if latitude >= 0 else "S"
        gps[2] = dms(abs(latitude))
        gps[3] = "E" if longitude >= 0 else "W"
        gps[4] = dms(abs(longitude))
        gps[5] = 0
        gps[6] = Fraction(355, 10)
    return exif


# --- the processor, called directly --------------------------------------------------------

def save(tmp_path: Path, image: Image.Image, name: str, **options) -> InputFile:
    path = tmp_path / name
    image.save(path, **options)
    return InputFile(path, "application/octet-stream")


def analyse(tmp_path: Path, source: InputFile, params=None, **settings) -> dict:
    return analyse_image([source], params or {}, make_ctx(tmp_path, **settings))["analysis"]


# --- behaviour -------------------------------------------------------------------------------

class TestMetadata:
    def test_format_size_mode_and_alpha(self, tmp_path):
        image = Image.new("RGBA", (321, 123), (10, 20, 30, 128))
        result = analyse(tmp_path, save(tmp_path, image, "a.png"))
        assert (result["format"], result["width"], result["height"], result["mode"]) == ("PNG", 321, 123, "RGBA")
        assert result["hasAlpha"] is True and result["frames"] == 1 and result["exif"] is None
        assert result["fileSize"] == (tmp_path / "a.png").stat().st_size

    def test_large_jpeg_reports_its_stored_size_though_decoded_at_reduced_scale(self, tmp_path):
        result = analyse(tmp_path, save(tmp_path, photo_like(3000, 2000), "big.jpg", quality=85))
        assert (result["width"], result["height"], result["megapixels"], result["mode"]) == (3000, 2000, 6.0, "RGB")

    def test_animated_gif_counts_frames(self, tmp_path):
        frames = [Image.new("RGB", (40, 40), (80 * i, 0, 0)) for i in range(3)]
        path = tmp_path / "a.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
        result = analyse(tmp_path, InputFile(path, "image/gif"))
        assert result["format"] == "GIF" and result["frames"] == 3


class TestExif:
    def test_camera_lens_time_exposure_and_gps_in_decimal_degrees(self, tmp_path):
        exif = camera_exif(latitude=48.858222, longitude=2.2945)
        result = analyse(tmp_path, save(tmp_path, photo_like(), "p.jpg", exif=exif))["exif"]
        assert result["make"] == "StudioCam" and result["model"] == "SC-1 Mark II" and result["lens"] == "SC 35mm F1.8"
        assert result["capturedAt"] == "2024-05-01T12:30:45+02:00"
        assert result["orientation"] == 1
        assert result["exposureTime"] == pytest.approx(0.004) and result["fNumber"] == pytest.approx(1.8)
        assert result["iso"] == 200
        assert result["gps"]["latitude"] == pytest.approx(48.858222, abs=1e-5)
        assert result["gps"]["longitude"] == pytest.approx(2.2945, abs=1e-5)
        assert result["gps"]["altitude"] == pytest.approx(35.5)

    def test_southern_and_western_coordinates_are_negative(self, tmp_path):
        exif = camera_exif(latitude=-33.856784, longitude=-70.6693)
        gps = analyse(tmp_path, save(tmp_path, photo_like(), "p.jpg", exif=exif))["exif"]["gps"]
        assert gps["latitude"] == pytest.approx(-33.856784, abs=1e-5)
        assert gps["longitude"] == pytest.approx(-70.6693, abs=1e-5)

    def test_no_gps_block_means_gps_null(self, tmp_path):
        result = analyse(tmp_path, save(tmp_path, photo_like(), "p.jpg", exif=camera_exif()))
        assert result["exif"]["gps"] is None

    def test_zero_denominator_rationals_do_not_break_the_analysis(self, tmp_path):
        exif = camera_exif()
        exif.get_ifd(ExifTags.IFD.Exif)[0x829D] = Fraction(0, 1)
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps[1], gps[2], gps[3], gps[4] = "N", (1, 2, 3), "E", (4, 5, 6)
        result = analyse(tmp_path, save(tmp_path, photo_like(), "p.jpg", exif=exif))["exif"]
        assert result["fNumber"] == 0.0 and result["gps"]["latitude"] == pytest.approx(1 + 2 / 60 + 3 / 3600)


class TestColoursAndTone:
    def test_dominant_colours_with_proportions(self, tmp_path):
        image = Image.new("RGB", (400, 200), (220, 20, 20))
        ImageDraw.Draw(image).rectangle([0, 0, 99, 199], fill=(20, 40, 200))
        colours = analyse(tmp_path, save(tmp_path, image, "c.png"), {"paletteSize": 4})["colors"]["dominant"]
        assert colours[0]["hex"] == "#dc1414" and colours[0]["proportion"] == pytest.approx(0.75, abs=0.02)
        assert colours[1]["rgb"] == [20, 40, 200] and colours[1]["proportion"] == pytest.approx(0.25, abs=0.02)
        assert len(colours) <= 4

    def test_palette_size_is_honoured(self, tmp_path):
        colours = analyse(tmp_path, save(tmp_path, photo_like(), "p.jpg"), {"paletteSize": 8})["colors"]["dominant"]
        assert len(colours) == 8
        assert sum(c["proportion"] for c in colours) == pytest.approx(1.0, abs=0.01)
        assert [c["proportion"] for c in colours] == sorted((c["proportion"] for c in colours), reverse=True)

    def test_transparent_pixels_do_not_count(self, tmp_path):
        image = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
        ImageDraw.Draw(image).rectangle([0, 0, 29, 99], fill=(0, 200, 0, 255))
        colours = analyse(tmp_path, save(tmp_path, image, "t.png"))["colors"]["dominant"]
        assert colours[0]["rgb"] == [0, 200, 0] and colours[0]["proportion"] > 0.9

    def test_brightness_and_contrast(self, tmp_path):
        dark = analyse(tmp_path, save(tmp_path, Image.new("L", (64, 64), 20), "d.png"))["tone"]
        assert dark["label"] == "dark" and dark["brightness"] == pytest.approx(20 / 255, abs=0.01)
        assert dark["contrast"] == 0.0
        halves = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(halves).rectangle([32, 0, 63, 63], fill=255)
        tone = analyse(tmp_path, save(tmp_path, halves, "h.png"))["tone"]
        assert tone["label"] == "normal" and tone["contrast"] == pytest.approx(0.5, abs=0.01)
        assert tone["clippedShadows"] == pytest.approx(0.5, abs=0.01)


class TestSharpness:
    def test_a_blurred_copy_scores_lower_and_is_flagged(self, tmp_path):
        crisp = graphic_like()
        sharp = analyse(tmp_path, save(tmp_path, crisp, "s.png"))["sharpness"]
        soft = analyse(tmp_path, save(tmp_path, crisp.filter(ImageFilter.GaussianBlur(6)), "b.png"))["sharpness"]
        assert sharp["laplacianVariance"] > 10 * soft["laplacianVariance"]
        assert sharp["blurry"] is False and soft["blurry"] is True


class TestPerceptualHashes:
    def test_dct_matrix_is_orthonormal(self):
        d = _dct_matrix(32)
        assert np.allclose(d @ d.T, np.eye(32))

    def test_near_duplicates_hash_close_and_different_images_far(self, tmp_path):
        original = photo_like(seed=3)
        a = analyse(tmp_path, save(tmp_path, original, "a.png"))["hashes"]
        b = analyse(tmp_path, save(tmp_path, original.resize((480, 360)), "b.jpg", quality=60))["hashes"]
        c = analyse(tmp_path, save(tmp_path, graphic_like(), "c.png"))["hashes"]
        assert len(a["phash"]) == 16 and len(a["dhash"]) == 16 and int(a["phash"], 16) >= 0
        assert hamming_distance(a["phash"], b["phash"]) <= 6
        assert hamming_distance(a["dhash"], b["dhash"]) <= 8
        assert hamming_distance(a["phash"], c["phash"]) >= 20


class TestFaces:
    def test_a_face_is_found_where_it_is(self, tmp_path):
        scene = photo_like(1200, 900, seed=5)
        scene.paste(drawn_face(300), (700, 250))
        faces = analyse(tmp_path, save(tmp_path, scene, "f.png"))["faces"]
        assert faces["available"] is True and faces["count"] == 1
        box = faces["boxes"][0]
        centre = (box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        assert abs(centre[0] - 850) < 60 and abs(centre[1] - 420) < 80
        assert 180 < box["width"] < 380

    def test_faces_are_found_in_the_upright_image_of_a_rotated_photo(self, tmp_path):
        upright = photo_like(900, 1200, seed=6)
        upright.paste(drawn_face(300), (300, 400))
        # Stored turned on its side, with EXIF orientation 6 ("rotate 90° clockwise to view").
        stored = upright.transpose(Image.Transpose.ROTATE_90)
        result = analyse(tmp_path, save(tmp_path, stored, "r.jpg", exif=camera_exif(orientation=6), quality=92))
        assert (result["width"], result["height"], result["exif"]["orientation"]) == (1200, 900, 6)
        assert result["faces"]["count"] == 1
        box = result["faces"]["boxes"][0]
        assert abs(box["x"] + box["width"] / 2 - 450) < 60 and abs(box["y"] + box["height"] / 2 - 570) < 80

    def test_no_face_gives_an_empty_list(self, tmp_path):
        faces = analyse(tmp_path, save(tmp_path, graphic_like(), "g.png"))["faces"]
        assert faces["count"] == 0 and faces["boxes"] == []

    def test_detection_can_be_turned_off(self, tmp_path):
        assert analyse(tmp_path, save(tmp_path, graphic_like(), "g.png"), {"detectFaces": False})["faces"] is None


class TestClassification:
    def test_photo_screenshot_graphic(self, tmp_path):
        def label(image, name, **options):
            return analyse(tmp_path, save(tmp_path, image, name, **options))["classification"]["label"]

        assert label(photo_like(), "p.jpg", quality=85) == "photo"
        assert label(photo_like(), "p.png") == "photo"
        assert label(screenshot_like(), "s.png") == "screenshot"
        assert label(screenshot_like(), "s.jpg", quality=80) == "screenshot"
        assert label(screenshot_like(1100, 700), "odd-size.png") == "screenshot"  # text edges, not the size
        assert label(graphic_like(), "g.png") == "graphic"
        assert label(graphic_like(), "g.jpg", quality=85) == "graphic"

    def test_camera_exif_makes_a_photo_and_signals_are_reported(self, tmp_path):
        result = analyse(tmp_path, save(tmp_path, graphic_like(), "g.jpg", exif=camera_exif()))["classification"]
        assert result["label"] == "photo" and result["reason"] == "camera EXIF present"
        assert set(result["signals"]) >= {"cameraExif", "topColorShare", "flatRatio", "textEdges", "screenSize"}

    def test_a_transparent_logo_is_a_graphic(self, tmp_path):
        logo = Image.new("RGBA", (1280, 720), (0, 0, 0, 0))
        draw = ImageDraw.Draw(logo)
        draw.ellipse([400, 100, 880, 620], fill=(200, 30, 30, 255))
        draw.text((500, 330), "LOGO", fill=(255, 255, 255, 255), font=ImageFont.load_default(size=60))
        assert analyse(tmp_path, save(tmp_path, logo, "l.png"))["classification"]["label"] == "graphic"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


class TestRefusals:
    def refused(self, tmp_path, data: bytes, name: str, **settings) -> PermanentError:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(PermanentError) as caught:
            analyse(tmp_path, InputFile(path, "application/octet-stream"), **settings)
        return caught.value

    def test_a_text_file_is_not_an_image(self, tmp_path):
        assert self.refused(tmp_path, b"hello, this is not a picture\n" * 20, "x.jpg").code == "invalid_image"

    def test_a_truncated_jpeg(self, tmp_path):
        path = tmp_path / "full.jpg"
        photo_like().save(path, quality=90)
        data = path.read_bytes()
        assert self.refused(tmp_path, data[: len(data) // 3], "cut.jpg").code == "invalid_image"

    def test_a_format_outside_the_allow_list(self, tmp_path):
        path = tmp_path / "x.ppm"
        Image.new("RGB", (10, 10)).save(path)
        assert self.refused(tmp_path, path.read_bytes(), "x.ppm").code == "invalid_image"

    def test_more_pixels_than_the_setting_allows(self, tmp_path):
        path = tmp_path / "big.png"
        Image.new("RGB", (200, 200)).save(path)
        error = self.refused(tmp_path, path.read_bytes(), "big.png", max_image_pixels=30_000)
        assert error.code == "image_too_large" and "200x200" in error.message

    def test_a_decompression_bomb_is_refused_from_its_header(self, tmp_path):
        # 9000 x 9000 = 81 MP: over the 64 MP setting, under Pillow's own warning threshold.
        error = self.refused(tmp_path, png_header_only(9000, 9000), "bomb.png")
        assert error.code == "image_too_large"

    def test_a_huge_decompression_bomb_trips_pillows_guard_too(self, tmp_path):
        error = self.refused(tmp_path, png_header_only(60000, 60000), "bomb.png", max_image_pixels=10**10)
        assert error.code == "image_too_large"


class TestProgressAndCancellation:
    def test_progress_rises_to_100(self, tmp_path):
        recorder = Recorder()
        analyse_image([save(tmp_path, photo_like(), "p.jpg")], {}, make_ctx(tmp_path, recorder))
        assert recorder.values == sorted(recorder.values) and recorder.values[-1] == 100 and len(recorder.values) >= 5

    def test_cancellation_between_steps(self, tmp_path):
        recorder = Recorder(cancel_after_progress=2)
        with pytest.raises(Cancelled):
            analyse_image([save(tmp_path, photo_like(), "p.jpg")], {}, make_ctx(tmp_path, recorder))
        assert recorder.values[-1] < 100

    def test_invalid_params_fail_permanently(self, tmp_path):
        with pytest.raises(PermanentError) as caught:
            analyse_image([save(tmp_path, graphic_like(), "g.png")], {"paletteSize": 99}, make_ctx(tmp_path))
        assert caught.value.code == "invalid_params"
