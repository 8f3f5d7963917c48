"""Task params are checked before a task is admitted: a 400 that names what is wrong."""

from __future__ import annotations

import math

import pytest

from models.errors import InvalidInput
from models.params import (
    MAX_EDIT_OPERATIONS,
    normalize_analysis_params,
    normalize_edit_params,
    normalize_video_params,
    parse_color,
    validate_task_request,
)


def refusal(task_type: str, params, input="upload-id") -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        validate_task_request(task_type, input, params)
    assert caught.value.status_code == 400
    return caught.value


def edit_refusal(*operations, **top) -> str:
    error = refusal("advanced_editing", {"operations": list(operations), **top})
    assert error.code == "invalid_params"
    return error.message


class TestEditOperations:
    def test_a_full_chain_is_accepted_with_defaults_filled_in(self):
        spec = normalize_edit_params({"operations": [
            {"op": "auto_orient"}, {"op": "resize", "width": 800}, {"op": "crop", "box": [0, 0, 400, 300]},
            {"op": "rotate", "degrees": -12.5}, {"op": "flip", "direction": "vertical"}, "grayscale",
            {"op": "brightness", "factor": 1.2}, {"op": "contrast", "factor": 0.8}, {"op": "saturation", "factor": 0},
            {"op": "sharpen"}, {"op": "blur", "radius": 1.5}, {"op": "auto_contrast", "cutoff": 2},
            {"op": "watermark", "text": "  © me  "},
        ], "format": "jpg", "quality": 70})
        ops = spec["operations"]
        assert [op["op"] for op in ops][:6] == ["auto_orient", "resize", "crop", "rotate", "flip", "grayscale"]
        assert ops[1] == {"op": "resize", "width": 800, "height": None, "fit": "inside", "background": (0, 0, 0, 255)}
        assert ops[2]["box"] == (0, 0, 400, 300)
        assert ops[3] == {"op": "rotate", "degrees": -12.5, "expand": True, "fill": None}
        assert ops[9] == {"op": "sharpen", "radius": 2.0, "amount": 150, "threshold": 3}
        assert ops[12]["text"] == "© me" and ops[12]["position"] == "bottom-right" and ops[12]["opacity"] == 0.5
        assert spec["format"] == "jpeg" and spec["quality"] == 70 and spec["autoOrient"] is True

    def test_crop_by_left_top_width_height(self):
        spec = normalize_edit_params({"operations": [{"op": "crop", "left": 10, "top": 20, "width": 30, "height": 40}]})
        assert spec["operations"][0]["box"] == (10, 20, 40, 60)

    def test_the_message_names_the_operation_by_index_and_name(self):
        message = edit_refusal({"op": "resize", "width": 10}, "grayscale", {"op": "rotate", "degrees": "ninety"})
        assert message == "operations[2] (rotate): degrees must be a number from -360 to 360"

    @pytest.mark.parametrize("operation, expected", [
        ({"op": "rotate"}, "operations[0] (rotate): degrees is required"),
        ({"op": "rotate", "degrees": 400}, "operations[0] (rotate): degrees must be a number from -360 to 360, not 400"),
        ({"op": "rotate", "degrees": 90, "expand": "yes"}, "operations[0] (rotate): expand must be true or false"),
        ({"op": "rotate", "degrees": 90, "fill": "mauve-ish"}, "operations[0] (rotate): fill must be a colour"),
        ({"op": "resize"}, "operations[0] (resize): width or height is required"),
        ({"op": "resize", "width": 0}, "operations[0] (resize): width must be an integer from 1 to 10000"),
        ({"op": "resize", "width": 10.5}, "operations[0] (resize): width must be an integer"),
        ({"op": "resize", "width": 10, "fit": "stretch"}, "operations[0] (resize): fit must be one of inside, contain"),
        ({"op": "resize", "width": 10, "mode": "x"}, "operations[0] (resize): unknown option 'mode'"),
        ({"op": "crop", "box": [0, 0, 10]}, "operations[0] (crop): box must be [left, top, right, bottom]"),
        ({"op": "crop", "box": [10, 0, 5, 10]}, "operations[0] (crop): box must have right > left"),
        ({"op": "crop", "box": [0, 0, 5, 5], "left": 1}, "operations[0] (crop): give either box"),
        ({"op": "crop", "left": 1, "height": 5}, "operations[0] (crop): width is required"),
        ({"op": "flip", "direction": "diagonal"}, "operations[0] (flip): direction must be one of horizontal, vertical"),
        ({"op": "brightness"}, "operations[0] (brightness): factor is required"),
        ({"op": "contrast", "factor": -1}, "operations[0] (contrast): factor must be a number from 0 to 10"),
        ({"op": "saturation", "factor": True}, "operations[0] (saturation): factor must be a number"),
        ({"op": "sharpen", "amount": 5000}, "operations[0] (sharpen): amount must be an integer from 1 to 1000"),
        ({"op": "blur", "radius": 0}, "operations[0] (blur): radius must be a number greater than 0"),
        ({"op": "auto_contrast", "cutoff": 50}, "operations[0] (auto_contrast): cutoff must be a number from 0 to 49"),
        ({"op": "watermark"}, "operations[0] (watermark): text is required"),
        ({"op": "watermark", "text": "   "}, "operations[0] (watermark): text must not be empty"),
        ({"op": "watermark", "text": "x" * 201}, "operations[0] (watermark): text must be at most 200 characters"),
        ({"op": "watermark", "text": "x", "opacity": 2}, "operations[0] (watermark): opacity must be a number from 0 to 1"),
        ({"op": "watermark", "text": "x", "position": "middle"}, "operations[0] (watermark): position must be one of"),
        ({"op": "grayscale", "amount": 1}, "operations[0] (grayscale): unknown option 'amount' (allowed: none)"),
        ({"op": "posterize"}, "operations[0] (posterize): unknown operation"),
        ({"width": 10}, "operations[0]: op is required"),
        (42, "operations[0] must be an object"),
    ])
    def test_each_option_is_checked(self, operation, expected):
        assert edit_refusal(operation).startswith(expected)

    def test_not_a_finite_number_is_refused(self):
        assert "factor must be a number" in edit_refusal({"op": "brightness", "factor": math.nan})
        assert "factor must be a number" in edit_refusal({"op": "brightness", "factor": math.inf})

    def test_operation_names_are_forgiving_about_case_and_dashes(self):
        spec = normalize_edit_params({"operations": ["Auto-Orient", {"type": "autoContrast"}, "greyscale"]})
        assert [op["op"] for op in spec["operations"]] == ["auto_orient", "auto_contrast", "grayscale"]

    @pytest.mark.parametrize("params, expected", [
        ({"operations": "resize"}, "params.operations must be a list"),
        ({"operations": ["grayscale"] * (MAX_EDIT_OPERATIONS + 1)}, "params.operations must be a list of at most 50"),
        ({"operations": [], "format": "gif"}, "params.format must be one of jpeg, png, webp"),
        ({"operations": [], "quality": 0}, "params.quality must be an integer from 1 to 100"),
        ({"operations": [], "quality": 101}, "params.quality must be an integer from 1 to 100"),
        ({"operations": [], "background": "nope"}, "params.background must be a colour"),
        ({"operations": [], "autoOrient": 1}, "params.autoOrient must be true or false"),
    ])
    def test_top_level_params_are_checked(self, params, expected):
        error = refusal("advanced_editing", params)
        assert error.message.startswith(expected)

    def test_no_operations_is_a_plain_re_encode(self):
        assert normalize_edit_params({})["operations"] == []
        assert normalize_edit_params({"operations": None, "format": "webp"})["format"] == "webp"

    def test_unknown_top_level_keys_are_ignored(self):
        validate_task_request("advanced_editing", "upload-id", {"operations": [], "clientTag": "x"})
        validate_task_request("image_analysis", "upload-id", {"sleep": 0.1})

    def test_params_must_be_an_object(self):
        assert refusal("image_analysis", ["paletteSize"]).message == "params must be an object"


class TestColors:
    @pytest.mark.parametrize("value, expected", [
        ("#fff", (255, 255, 255, 255)), ("#11223344", (0x11, 0x22, 0x33, 0x44)), ("00ff00", (0, 255, 0, 255)),
        ("transparent", (0, 0, 0, 0)), ("White", (255, 255, 255, 255)), ([1, 2, 3], (1, 2, 3, 255)),
        ([1, 2, 3, 4], (1, 2, 3, 4)), ("#12345", None), ([256, 0, 0], None), ([True, 0, 0], None), (7, None),
    ])
    def test_colour_forms(self, value, expected):
        assert parse_color(value) == expected


class TestVideoParams:
    def test_defaults(self):
        spec = normalize_video_params({})
        assert spec == {
            "duration": 4.0, "fps": 25, "width": 1280, "height": 720, "motion": "ken_burns",
            "transition": "crossfade", "transitionDuration": 0.5, "caption": None, "captionPosition": "bottom",
            "captionSize": 0.06, "fit": "cover", "background": (0, 0, 0, 255),
        }

    def test_portrait_and_snake_case_aliases(self):
        spec = normalize_video_params({"width": 1080, "height": 1920, "transition_duration": 1.5,
                                       "caption_position": "top", "motion": "zoom-in", "caption": " Hi "})
        assert (spec["width"], spec["height"], spec["transitionDuration"]) == (1080, 1920, 1.5)
        assert spec["captionPosition"] == "top" and spec["motion"] == "zoom_in" and spec["caption"] == "Hi"

    @pytest.mark.parametrize("params, expected", [
        ({"duration": 0}, "params.duration must be a number greater than 0 and at most 120"),
        ({"duration": 121}, "params.duration must be a number"),
        ({"duration": "5"}, "params.duration must be a number"),
        ({"fps": 0}, "params.fps must be an integer from 1 to 60"),
        ({"fps": 61}, "params.fps must be an integer from 1 to 60"),
        ({"fps": 29.97}, "params.fps must be an integer"),
        ({"width": 641, "height": 480}, "params.width and params.height must be even numbers"),
        ({"width": 1920, "height": 1200}, "params.width x params.height must fit 1920x1080"),
        ({"width": 2560, "height": 1440}, "params.width must be an integer from 32 to 1920"),
        ({"width": 16, "height": 16}, "params.width must be an integer from 32"),
        ({"width": 640}, "params.width and params.height must be given together"),
        ({"motion": "spin"}, "params.motion must be one of none, zoom_in, zoom_out, pan_left, pan_right, ken_burns"),
        ({"transition": "wipe"}, "params.transition must be one of none, crossfade, fade"),
        ({"transitionDuration": 6}, "params.transitionDuration must be a number from 0 to 5"),
        ({"caption": "x" * 201}, "params.caption must be at most 200 characters"),
        ({"caption": 5}, "params.caption must be a string"),
        ({"fit": "stretch"}, "params.fit must be one of cover, contain"),
    ])
    def test_each_param_is_checked(self, params, expected):
        error = refusal("video_generation", params, input=["a", "b"])
        assert error.code == "invalid_params"
        assert error.message.startswith(expected)

    def test_too_many_images(self):
        error = refusal("video_generation", {}, input=[f"id-{i}" for i in range(21)])
        assert error.code == "invalid_input"


class TestAnalysisParams:
    def test_defaults(self):
        assert normalize_analysis_params({}) == {"paletteSize": 5, "detectFaces": True}
        assert normalize_analysis_params({"palette_size": 16, "detectFaces": False}) == {
            "paletteSize": 16, "detectFaces": False}

    @pytest.mark.parametrize("params, expected", [
        ({"paletteSize": 0}, "params.paletteSize must be an integer from 1 to 16"),
        ({"paletteSize": 17}, "params.paletteSize must be an integer from 1 to 16"),
        ({"detectFaces": "no"}, "params.detectFaces must be true or false"),
    ])
    def test_each_param_is_checked(self, params, expected):
        assert refusal("image_analysis", params).message.startswith(expected)


class TestCreateTaskRefusesBadParams:
    """Through the API: the 400 body carries the message naming the operation."""

    def test_bad_operation_is_a_400_naming_it(self, client, user_headers):
        response = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "advanced_editing", "input": "00000000-0000-0000-0000-000000000000",
            "params": {"operations": [{"op": "resize", "width": 100}, {"op": "rotate", "degrees": "left"}]},
        })
        assert response.status_code == 400
        assert response.json == {"error": "operations[1] (rotate): degrees must be a number from -360 to 360",
                                  "statusCode": 400, "code": "invalid_params"}

    def test_bad_video_size_is_a_400(self, client, user_headers):
        response = client.simulate_post("/api/tasks/create", headers=user_headers, json={
            "type": "video_generation", "input": ["00000000-0000-0000-0000-000000000000"],
            "params": {"duration": 2, "width": 1001, "height": 500},
        })
        assert response.status_code == 400
        assert response.json["code"] == "invalid_params"
        assert "even numbers" in response.json["error"]
