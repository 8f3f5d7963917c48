"""advanced_editing applies each operation of the vocabulary, in order, and writes the result
through storage; bad inputs and impossible operations fail permanently, naming the operation."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageDraw, ImageFilter
from PIL.TiffImagePlugin import IFDRational

from tests.support.context import Recorder, make_ctx
from worker.processors.base import Cancelled, InputFile, PermanentError
from worker.processors.editing import edit_image

RED, BLUE, GREEN = (230, 20, 20), (20, 40, 220), (20, 200, 40)


def marked(width=200, height=100) -> Image.Image:
    """Grey with a red block at the top-left corner and a blue one at the bottom-right: where
    each ends up tells what a geometric operation did."""
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width // 5 - 1, height // 5 - 1], fill=RED)
    draw.rectangle([width - width // 5, height - height // 5, width - 1, height - 1], fill=BLUE)
    return image


def source(tmp_path: Path, image: Image.Image, name="in.png", **options) -> InputFile:
    path = tmp_path / name
    image.save(path, **options)
    return InputFile(path, "image/png")


def edit(tmp_path: Path, image_or_input, operations, ctx=None, **params) -> tuple[dict, Image.Image]:
    inp = image_or_input if isinstance(image_or_input, InputFile) else source(tmp_path, image_or_input)
    ctx = ctx or make_ctx(tmp_path)
    output = edit_image([inp], {"operations": operations, **params}, ctx)
    result = Image.open(ctx.storage.path(output["file"]["key"]))
    result.load()
    return output, result


def near(pixel, colour, tolerance=30) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, colour))


class TestOutput:
    def test_the_file_contract(self, tmp_path):
        output, result = edit(tmp_path, marked(), [{"op": "resize", "width": 100}], format="jpeg", quality=90)
        assert output["file"]["key"] == "outputs/task-1/edited.jpg"
        assert output["file"]["contentType"] == "image/jpeg" and output["file"]["name"] == "edited.jpg"
        assert output["file"]["size"] == (tmp_path / "storage" / "outputs/task-1/edited.jpg").stat().st_size
        assert (output["width"], output["height"], output["operations"], output["format"]) == (100, 50, 1, "jpeg")
        assert result.format == "JPEG" and result.size == (100, 50)

    @pytest.mark.parametrize("fmt, pillow_format, content_type", [
        ("png", "PNG", "image/png"), ("webp", "WEBP", "image/webp"), ("jpeg", "JPEG", "image/jpeg"),
    ])
    def test_formats(self, tmp_path, fmt, pillow_format, content_type):
        output, result = edit(tmp_path, marked(), [], format=fmt)
        assert result.format == pillow_format and output["file"]["contentType"] == content_type

    def test_the_default_format_is_the_inputs_when_it_can_be_written(self, tmp_path):
        assert edit(tmp_path, source(tmp_path, marked(), "a.webp"), [])[1].format == "WEBP"
        assert edit(tmp_path, source(tmp_path, marked(), "a.jpg"), [])[1].format == "JPEG"
        assert edit(tmp_path, source(tmp_path, marked(), "a.bmp"), [])[1].format == "PNG"

    def test_quality_trades_size(self, tmp_path):
        photo = marked(400, 300).filter(ImageFilter.GaussianBlur(3))
        noisy = Image.fromarray((np.asarray(photo) + np.random.default_rng(1).normal(0, 12, (300, 400, 3)))
                                .clip(0, 255).astype(np.uint8))
        low = edit(tmp_path, noisy, [], format="jpeg", quality=20)[0]["file"]["size"]
        high = edit(tmp_path, noisy, [], format="jpeg", quality=95)[0]["file"]["size"]
        assert high > 2 * low

    def test_transparency_is_kept_in_png_and_flattened_on_the_background_for_jpeg(self, tmp_path):
        image = Image.new("RGBA", (50, 50), (0, 0, 0, 0))
        png = edit(tmp_path, image, [], format="png")[1]
        assert png.mode == "RGBA" and png.getpixel((10, 10))[3] == 0
        jpeg = edit(tmp_path, image, [], format="jpeg", background="#00ff00")[1]
        assert near(jpeg.getpixel((10, 10)), (0, 255, 0), 5)

    def test_metadata_is_stripped(self, tmp_path):
        exif = Image.Exif()
        exif[0x010F] = "StudioCam"
        gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
        gps[1], gps[2] = "N", (IFDRational(48), IFDRational(51), IFDRational(30))
        result = edit(tmp_path, source(tmp_path, marked(), "e.jpg", exif=exif), [], format="jpeg")[1]
        assert not result.getexif()


class TestGeometry:
    @pytest.mark.parametrize("op, size", [
        ({"op": "resize", "width": 100, "height": 100, "fit": "inside"}, (100, 50)),
        ({"op": "resize", "width": 100, "height": 100, "fit": "contain"}, (100, 100)),
        ({"op": "resize", "width": 100, "height": 100, "fit": "cover"}, (100, 100)),
        ({"op": "resize", "width": 100, "height": 100, "fit": "fill"}, (100, 100)),
        ({"op": "resize", "width": 400, "height": 400}, (400, 200)),
        ({"op": "resize", "height": 25}, (50, 25)),
        ({"op": "crop", "left": 10, "top": 5, "width": 60, "height": 40}, (60, 40)),
        ({"op": "crop", "box": [0, 0, 200, 100]}, (200, 100)),
        ({"op": "rotate", "degrees": 90}, (100, 200)),
        ({"op": "rotate", "degrees": 90, "expand": False}, (200, 100)),
    ])
    def test_sizes(self, tmp_path, op, size):
        output, result = edit(tmp_path, marked(), [op], format="png")
        assert result.size == size == (output["width"], output["height"])

    def test_rotate_by_an_angle_expands_to_hold_the_corners(self, tmp_path):
        result = edit(tmp_path, marked(), [{"op": "rotate", "degrees": 45}], format="png")[1]
        assert all(212 <= side <= 215 for side in result.size)

    def test_contain_letterboxes_with_the_background(self, tmp_path):
        result = edit(tmp_path, marked(), [{"op": "resize", "width": 100, "height": 100, "fit": "contain",
                                            "background": "#00ff00"}], format="png")[1]
        assert near(result.getpixel((50, 5)), (0, 255, 0), 2) and near(result.getpixel((50, 50)), (128, 128, 128))

    def test_cover_crops_the_overflow_from_the_centre(self, tmp_path):
        result = edit(tmp_path, marked(), [{"op": "resize", "width": 100, "height": 100, "fit": "cover"}],
                      format="png")[1]
        # The red block (x < 40 of 200) is cut off by the centred square crop (x 50..150).
        assert near(result.getpixel((2, 2)), (128, 128, 128))

    def test_rotate_is_clockwise(self, tmp_path):
        result = edit(tmp_path, marked(), [{"op": "rotate", "degrees": 90}], format="png")[1]
        assert near(result.getpixel((result.width - 3, 3)), RED) and near(result.getpixel((3, result.height - 3)), BLUE)

    def test_rotate_fill_and_transparency(self, tmp_path):
        filled = edit(tmp_path, marked(), [{"op": "rotate", "degrees": 30, "fill": "#00ff00"}], format="png")[1]
        assert near(filled.getpixel((1, 1)), (0, 255, 0), 2)
        clear = edit(tmp_path, marked(), [{"op": "rotate", "degrees": 30, "fill": "transparent"}], format="png")[1]
        assert clear.mode == "RGBA" and clear.getpixel((1, 1))[3] == 0

    def test_flip(self, tmp_path):
        horizontal = edit(tmp_path, marked(), [{"op": "flip"}], format="png")[1]
        assert near(horizontal.getpixel((197, 2)), RED) and near(horizontal.getpixel((2, 97)), BLUE)
        vertical = edit(tmp_path, marked(), [{"op": "flip", "direction": "vertical"}], format="png")[1]
        assert near(vertical.getpixel((2, 97)), RED)

    def test_crop_takes_the_box(self, tmp_path):
        result = edit(tmp_path, marked(), [{"op": "crop", "box": [160, 80, 200, 100]}], format="png")[1]
        assert result.size == (40, 20) and near(result.getpixel((20, 10)), BLUE)

    def test_a_crop_outside_the_image_names_the_operation(self, tmp_path):
        with pytest.raises(PermanentError) as caught:
            edit(tmp_path, marked(), [{"op": "resize", "width": 100}, {"op": "crop", "box": [0, 0, 120, 40]}])
        assert caught.value.code == "invalid_params"
        assert caught.value.message.startswith("operations[1] (crop): the box (0, 0, 120, 40) reaches outside the 100x50")

    def test_chains_apply_in_order(self, tmp_path):
        rotate_then_crop = edit(tmp_path, marked(), [{"op": "rotate", "degrees": 90},
                                                     {"op": "crop", "box": [0, 0, 100, 40]}], format="png")[1]
        assert near(rotate_then_crop.getpixel((97, 3)), RED)
        crop_then_rotate = edit(tmp_path, marked(), [{"op": "crop", "box": [0, 0, 100, 40]},
                                                     {"op": "rotate", "degrees": 90}], format="png")[1]
        assert crop_then_rotate.size == (40, 100) and near(crop_then_rotate.getpixel((37, 3)), RED)


class TestOrientation:
    def sideways(self, tmp_path) -> InputFile:
        exif = Image.Exif()
        exif[0x0112] = 6  # stored turned left: viewers rotate 90° clockwise
        return source(tmp_path, marked().transpose(Image.Transpose.ROTATE_90), "side.jpg", exif=exif, quality=95)

    def test_photos_are_made_upright_first_by_default(self, tmp_path):
        output, result = edit(tmp_path, self.sideways(tmp_path), [])
        assert result.size == (200, 100) and near(result.getpixel((3, 3)), RED)

    def test_auto_orient_as_an_operation(self, tmp_path):
        stored = edit(tmp_path, self.sideways(tmp_path), [], autoOrient=False)[1]
        assert stored.size == (100, 200)
        upright = edit(tmp_path, self.sideways(tmp_path), ["auto_orient"], autoOrient=False)[1]
        assert upright.size == (200, 100) and near(upright.getpixel((3, 3)), RED)


class TestTone:
    def test_grayscale_writes_a_grey_image(self, tmp_path):
        result = edit(tmp_path, marked(), ["grayscale"], format="png")[1]
        assert result.mode == "L"

    def test_grayscale_keeps_alpha(self, tmp_path):
        result = edit(tmp_path, Image.new("RGBA", (10, 10), (255, 0, 0, 100)), ["grayscale"], format="png")[1]
        assert result.mode == "LA" and result.getpixel((5, 5))[1] == 100

    def test_brightness_contrast_saturation(self, tmp_path):
        black = edit(tmp_path, marked(), [{"op": "brightness", "factor": 0}], format="png")[1]
        assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
        flat = edit(tmp_path, marked(), [{"op": "contrast", "factor": 0}], format="png")[1]
        assert all(high - low <= 1 for low, high in flat.getextrema())
        grey = np.asarray(edit(tmp_path, marked(), [{"op": "saturation", "factor": 0}], format="png")[1]).astype(int)
        assert np.abs(grey[..., 0] - grey[..., 2]).max() <= 1

    def test_brightness_leaves_alpha_alone(self, tmp_path):
        result = edit(tmp_path, Image.new("RGBA", (10, 10), (200, 100, 50, 120)),
                      [{"op": "brightness", "factor": 0.5}], format="png")[1]
        assert result.getpixel((5, 5)) == (100, 50, 25, 120)

    def test_auto_contrast_stretches_to_the_full_range(self, tmp_path):
        dull = Image.fromarray(np.tile(np.linspace(100, 150, 64, dtype=np.uint8), (32, 1)), "L").convert("RGB")
        result = edit(tmp_path, dull, [{"op": "auto_contrast"}], format="png")[1]
        assert result.convert("L").getextrema() == (0, 255)

    def test_sharpen_and_blur_move_sharpness_the_right_way(self, tmp_path):
        import cv2

        def laplacian(image):
            return cv2.Laplacian(np.asarray(image.convert("L")), cv2.CV_64F).var()

        soft = marked(300, 200).filter(ImageFilter.GaussianBlur(2))
        before = laplacian(soft)
        assert laplacian(edit(tmp_path, soft, [{"op": "sharpen", "amount": 300}], format="png")[1]) > before * 1.5
        assert laplacian(edit(tmp_path, soft, [{"op": "blur", "radius": 4}], format="png")[1]) < before / 2


class TestWatermark:
    def test_text_lands_in_the_chosen_corner_only(self, tmp_path):
        plain = Image.new("RGB", (400, 300), (40, 40, 40))
        result = np.asarray(edit(tmp_path, plain, [{"op": "watermark", "text": "StudioX", "position": "bottom-right",
                                                    "opacity": 1, "size": 0.1}], format="png")[1]).astype(int)
        changed = np.abs(result - 40).sum(axis=2) > 30
        ys, xs = np.nonzero(changed)
        assert changed.any() and xs.min() > 200 and ys.min() > 200

    def test_opacity_zero_changes_nothing(self, tmp_path):
        plain = Image.new("RGB", (200, 100), (40, 40, 40))
        result = edit(tmp_path, plain, [{"op": "watermark", "text": "x", "opacity": 0}], format="png")[1]
        assert result.getextrema() == ((40, 40), (40, 40), (40, 40))


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


class TestRefusals:
    def refused(self, tmp_path, path: Path, operations=(), **settings) -> PermanentError:
        ctx = make_ctx(tmp_path, **settings)
        with pytest.raises(PermanentError) as caught:
            edit_image([InputFile(path, "image/png")], {"operations": list(operations)}, ctx)
        assert not (tmp_path / "storage" / "outputs").exists()
        return caught.value

    def test_text_file(self, tmp_path):
        path = tmp_path / "notes.png"
        path.write_text("not an image")
        assert self.refused(tmp_path, path).code == "invalid_image"

    def test_truncated_png(self, tmp_path):
        path = tmp_path / "cut.png"
        noise = np.random.default_rng(2).integers(0, 255, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        path.write_bytes(path.read_bytes()[:50_000])
        assert self.refused(tmp_path, path).code == "invalid_image"

    def test_decompression_bomb(self, tmp_path):
        path = tmp_path / "bomb.png"
        path.write_bytes(png_header_only(20000, 20000))
        assert self.refused(tmp_path, path).code == "image_too_large"

    def test_a_resize_past_the_pixel_limit(self, tmp_path):
        path = tmp_path / "small.png"
        marked().save(path)
        error = self.refused(tmp_path, path, [{"op": "resize", "width": 1000, "height": 1000, "fit": "fill"}],
                             max_image_pixels=500_000)
        assert error.code == "image_too_large" and error.message.startswith("operations[0] (resize)")

    def test_params_that_skipped_validation_fail_permanently(self, tmp_path):
        path = tmp_path / "a.png"
        marked().save(path)
        error = self.refused(tmp_path, path, [{"op": "rotate"}])
        assert error.code == "invalid_params" and error.message == "params.operations[0].degrees: is required"


class TestProgressAndCancellation:
    def test_progress_per_operation(self, tmp_path):
        recorder = Recorder()
        edit(tmp_path, marked(), ["grayscale", {"op": "blur"}, {"op": "flip"}], ctx=make_ctx(tmp_path, recorder))
        assert recorder.values == [20, 40, 60, 80, 100]

    def test_cancelled_between_operations_saves_nothing(self, tmp_path):
        recorder = Recorder(cancel_after_progress=2)
        with pytest.raises(Cancelled):
            edit(tmp_path, marked(), ["grayscale", {"op": "blur"}, {"op": "flip"}], ctx=make_ctx(tmp_path, recorder))
        assert recorder.values == [20, 40]
        assert not (tmp_path / "storage" / "outputs").exists()
